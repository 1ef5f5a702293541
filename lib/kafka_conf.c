#include "kafka_conf.h"

#include <ctype.h>
#include <errno.h>
#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cjson/cJSON.h>

#include "log.h"

extern char **environ;

int kafka_conf_set(rd_kafka_conf_t *conf, const char *name, const char *value, const char *what,
                   char *err, size_t errlen)
{
    char reason[512];
    if (rd_kafka_conf_set(conf, name, value, reason, sizeof(reason)) != RD_KAFKA_CONF_OK) {
        snprintf(err, errlen, "%s: %s", what, reason);
        return -1;
    }
    return 0;
}

int kafka_conf_apply_env(rd_kafka_conf_t *conf, char *err, size_t errlen)
{
    for (char **e = environ; *e; e++) {
        if (strncmp(*e, "KAFKA_", 6))
            continue;
        const char *eq = strchr(*e, '=');
        if (!eq || eq == *e + 6)
            continue;
        char var[256], name[256];
        size_t n = (size_t)(eq - *e);
        if (n >= sizeof(var))
            continue;
        memcpy(var, *e, n);
        var[n] = '\0';
        const char *value = eq + 1;
        char *file_value = NULL;
        size_t vlen = n;
        if (n > 11 && !strcmp(var + n - 5, "_FILE")) {
            FILE *f = fopen(value, "r");
            if (!f) {
                snprintf(err, errlen, "%s: cannot read %s: %s", var, value, strerror(errno));
                return -1;
            }
            char buf[8192];
            size_t len = fread(buf, 1, sizeof(buf) - 1, f);
            fclose(f);
            while (len && (buf[len - 1] == '\n' || buf[len - 1] == '\r'))
                len--;
            buf[len] = '\0';
            file_value = strdup(buf);
            if (!file_value) {
                snprintf(err, errlen, "out of memory");
                return -1;
            }
            value = file_value;
            vlen = n - 5;
        }
        size_t j = 0;
        for (size_t i = 6; i < vlen; i++)
            name[j++] = var[i] == '_' ? '.' : (char)tolower((unsigned char)var[i]);
        name[j] = '\0';
        char what[600];
        snprintf(what, sizeof(what), "environment variable %s (librdkafka property %s)", var, name);
        int rc = kafka_conf_set(conf, name, value, what, err, errlen);
        free(file_value);
        if (rc)
            return -1;
    }
    return 0;
}

bool kafka_stats_any_broker_up(const char *json, size_t len)
{
    cJSON *doc = cJSON_ParseWithLength(json, len);
    bool up = false;
    cJSON *brokers = cJSON_GetObjectItemCaseSensitive(doc, "brokers");
    for (cJSON *b = brokers ? brokers->child : NULL; b && !up; b = b->next) {
        cJSON *state = cJSON_GetObjectItemCaseSensitive(b, "state");
        cJSON *nodeid = cJSON_GetObjectItemCaseSensitive(b, "nodeid");
        up = cJSON_IsString(state) && !strcmp(state->valuestring, "UP") && cJSON_IsNumber(nodeid) &&
             nodeid->valueint >= 0;
    }
    cJSON_Delete(doc);
    return up;
}

void kafka_limit_malloc_arenas(void)
{
    /* glibc gives each thread that allocates its own arena (up to 8 per core), and
     * librdkafka's threads allocate and free messages: with the default, each arena keeps
     * its own free memory, about 2.5 MB of resident memory more in a relay drain (measured with
     * MALLOC_ARENA_MAX=1 against the default). Two arenas keep the main thread and librdkafka's
     * threads apart. An operator's MALLOC_ARENA_MAX wins. */
    if (!getenv("MALLOC_ARENA_MAX"))
        (void)mallopt(M_ARENA_MAX, 2);
}

static void kafka_log_cb(const rd_kafka_t *rk, int level, const char *fac, const char *buf)
{
    enum log_level l = level <= 3   ? LOG_ERROR
                       : level == 4 ? LOG_WARN
                       : level <= 6 ? LOG_INFO
                                    : LOG_DEBUG;
    /* A property marked experimental that the relay sets on purpose (outbox-relay's
     * producer.c): not worth a warning at every start. */
    if (!strcmp(fac, "CONFWARN") && strstr(buf, "enable.gapless.guarantee"))
        l = LOG_DEBUG;
    log_at(l, LOG_FIELDS("facility", fac, "client", rd_kafka_name(rk)), "kafka: %s", buf);
}

void kafka_conf_log_json(rd_kafka_conf_t *conf)
{
    rd_kafka_conf_set_log_cb(conf, kafka_log_cb);
}

bool kafka_consumer_close(rd_kafka_t *rk, int timeout_ms)
{
    bool closed = false;
    rd_kafka_queue_t *q = rd_kafka_queue_new(rk);
    rd_kafka_error_t *e = rd_kafka_consumer_close_queue(rk, q);
    if (e) {
        log_at(LOG_WARN, LOG_FIELDS("error", rd_kafka_error_name(e)), "kafka: consumer close: %s",
               rd_kafka_error_string(e));
        rd_kafka_error_destroy(e);
    } else {
        struct timespec t0, t;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        for (;;) {
            closed = rd_kafka_consumer_closed(rk);
            clock_gettime(CLOCK_MONOTONIC, &t);
            long long waited = (t.tv_sec - t0.tv_sec) * 1000LL + (t.tv_nsec - t0.tv_nsec) / 1000000;
            if (closed || waited >= timeout_ms)
                break;
            long long left = timeout_ms - waited;
            /* The group's queue now forwards here, with the messages fetched and not yet
             * polled: served as a consumer queue (rebalance and other callbacks run, messages
             * come back and are dropped: their offsets were never committed). Served with
             * rd_kafka_queue_poll_callback, a queued message failed librdkafka's assertion
             * (rd_kafka_q_serve: res != RD_KAFKA_OP_RES_PASS) and aborted the process. */
            rd_kafka_message_t *m = rd_kafka_consume_queue(q, left < 100 ? (int)left : 100);
            if (m)
                rd_kafka_message_destroy(m);
        }
    }
    rd_kafka_queue_destroy(q);
    /* Not closed: rd_kafka_destroy would wait for the same group termination (it joins the
     * thread that waits for it), so the handle is left to the process's exit. */
    if (closed)
        rd_kafka_destroy(rk);
    return closed;
}
