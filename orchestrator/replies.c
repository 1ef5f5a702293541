/* replies: the reply consumer (a Kafka consumer group on every reply topic), on the libev
 * loop through the consumer queue's io-event fd. Offsets are committed only after the
 * transaction that applied the replies committed (replies_commit). */
#include <ctype.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kafka_conf.h"
#include "log.h"
#include "metrics.h"
#include "orchestrator.h"

#define MAX_PENDING 1000

/* Length of the valid UTF-8 sequence (RFC 3629: no overlong forms, no surrogates, at most
 * U+10FFFF) at s, or 0. */
static size_t utf8_char_len(const unsigned char *s, size_t n)
{
    unsigned char c = s[0];
    size_t len;
    uint32_t cp;
    if (c < 0x80)
        return 1;
    if (c >= 0xC2 && c <= 0xDF) {
        len = 2;
        cp = c & 0x1F;
    } else if (c >= 0xE0 && c <= 0xEF) {
        len = 3;
        cp = c & 0x0F;
    } else if (c >= 0xF0 && c <= 0xF4) {
        len = 4;
        cp = c & 0x07;
    } else {
        return 0;
    }
    if (n < len)
        return 0;
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xC0) != 0x80)
            return 0;
        cp = (cp << 6) | (s[i] & 0x3F);
    }
    if (len == 3 && (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF)))
        return 0;
    if (len == 4 && (cp < 0x10000 || cp > 0x10FFFF))
        return 0;
    return len;
}

/* reply_text's conversion into out (room for n * 3 + 1 bytes); returns the length. */
static size_t text_into(const void *data, size_t n, char *out)
{
    const unsigned char *s = data;
    size_t o = 0;
    for (size_t i = 0; i < n;) {
        size_t len = s[i] ? utf8_char_len(s + i, n - i) : 0;
        if (len) {
            memcpy(out + o, s + i, len);
            o += len;
            i += len;
        } else {
            memcpy(out + o, "\xEF\xBF\xBD", 3);
            o += 3;
            i++;
        }
    }
    out[o] = '\0';
    return o;
}

char *reply_text(const void *data, size_t n)
{
    char *out = malloc(n * 3 + 1); /* each bad byte becomes U+FFFD, 3 bytes */
    if (out)
        text_into(data, n, out);
    return out;
}

/* Why PostgreSQL could not store a reply's value as jsonb, or NULL. Such a reply must be
 * dead-lettered here: sent to the database it fails the whole batch's transaction, again
 * and again, and the consumer never gets past it. cJSON accepts both, so this is checked
 * on the bytes. */
static const char *value_problem(const char *s, size_t n)
{
    for (size_t i = 0; i < n;) {
        size_t len = s[i] ? utf8_char_len((const unsigned char *)s + i, n - i) : 0;
        if (!len)
            return "value is not valid UTF-8 text";
        i += len;
    }
    /* A backslash only occurs in JSON inside a string, as an escape. */
    for (size_t i = 0; i + 1 < n; i++) {
        if (s[i] != '\\')
            continue;
        if (s[i + 1] == 'u' && i + 5 < n && !memcmp(s + i + 2, "0000", 4))
            return "value contains \\u0000, which PostgreSQL (jsonb) cannot store";
        i++; /* skip the escaped character */
    }
    return NULL;
}

static bool uuid_ok(const char *s, size_t n)
{
    if (n != SAGA_UUID_LEN)
        return false;
    for (size_t i = 0; i < n; i++) {
        if (i == 8 || i == 13 || i == 18 || i == 23) {
            if (s[i] != '-')
                return false;
        } else if (!isxdigit((unsigned char)s[i])) {
            return false;
        }
    }
    return true;
}

/* A header's value as rd_kafka_header_get_last would give it. */
struct header_value {
    const void *val; /* NULL: missing, or a header without a value */
    size_t size;
};

static int header_uuid(const struct header_value *h, char out[SAGA_UUID_LEN + 1])
{
    const void *val = h->val;
    size_t size = h->size;
    if (!val || !uuid_ok(val, size))
        return -1;
    memcpy(out, val, size);
    out[size] = '\0';
    for (size_t i = 0; i < size; i++)
        out[i] = (char)tolower((unsigned char)out[i]);
    return 0;
}

static bool hex_run(const char *s, size_t n)
{
    bool nonzero = false;
    for (size_t i = 0; i < n; i++) {
        if (!isxdigit((unsigned char)s[i]))
            return false;
        nonzero = nonzero || s[i] != '0';
    }
    return nonzero;
}

/* The trace-id of a W3C traceparent ("00-<32 hex>-<16 hex>-<2 hex>"; a later version may add
 * fields after a '-'), lowercased, into out; "" when missing or malformed (version ff, an
 * all-zero trace or parent id). The raw header, as text, goes to raw (cut to fit). */
static void header_trace_id(const struct header_value *h, char out[33], char raw[64])
{
    const void *val = h->val;
    size_t size = h->size;
    out[0] = raw[0] = '\0';
    if (!val)
        return;
    /* As text, cut to 63 bytes (a cut may split a character, as ever). */
    char text[63 * 3 + 1];
    size_t len = text_into(val, size < 63 ? size : 63, text);
    if (len > 63)
        len = 63;
    memcpy(raw, text, len);
    raw[len] = '\0';
    const char *s = val;
    if (size < 55 || (size > 55 && s[55] != '-') || !isxdigit((unsigned char)s[0]) ||
        !isxdigit((unsigned char)s[1]) ||
        (tolower((unsigned char)s[0]) == 'f' && tolower((unsigned char)s[1]) == 'f') ||
        s[2] != '-' || s[35] != '-' || s[52] != '-' || !hex_run(s + 3, 32) ||
        !hex_run(s + 36, 16) || !isxdigit((unsigned char)s[53]) ||
        !isxdigit((unsigned char)s[54]) || (s[0] == '0' && s[1] == '0' && size != 55))
        return;
    for (size_t i = 0; i < 32; i++)
        out[i] = (char)tolower((unsigned char)s[3 + i]);
    out[32] = '\0';
}

enum { H_MESSAGE_ID, H_IN_REPLY_TO, H_SAGA_ID, H_OUTCOME, H_TRACEPARENT, H_WANTED };

/* The last value of each header reply_parse reads, in one pass over the headers (five
 * rd_kafka_header_get_last calls compared every name five times). One difference:
 * rd_kafka_header_get_all gives a name without its size, so a name with a NUL inside
 * ("saga-id\0x") counts here as the name before the NUL, where get_last compared the sizes
 * too and skipped it. A producer sends such a name only on purpose; the value is checked as
 * ever. */
static void headers_wanted(rd_kafka_headers_t *hdrs, struct header_value h[H_WANTED])
{
    static const char *const names[H_WANTED] = {"message-id", "in-reply-to", "saga-id", "outcome",
                                                "traceparent"};
    memset(h, 0, H_WANTED * sizeof(*h));
    const char *name;
    const void *val;
    size_t size;
    for (size_t idx = 0; hdrs && !rd_kafka_header_get_all(hdrs, idx, &name, &val, &size); idx++)
        for (int k = 0; k < H_WANTED; k++)
            if (!strcmp(name, names[k])) {
                h[k].val = val;
                h[k].size = size;
                break;
            }
}

void reply_parse(rd_kafka_message_t *msg, struct reply_msg *out)
{
    memset(out, 0, sizeof(*out));
    out->msg = msg;
    rd_kafka_headers_t *hdrs = NULL;
    rd_kafka_message_headers(msg, &hdrs);
    const char *problem = NULL;
    struct header_value h[H_WANTED];
    headers_wanted(hdrs, h);
    const void *val = h[H_OUTCOME].val;
    size_t size = h[H_OUTCOME].size;
    header_trace_id(&h[H_TRACEPARENT], out->trace_id, out->traceparent);
    if (header_uuid(&h[H_MESSAGE_ID], out->message_id))
        problem = "header message-id is missing or not a uuid";
    else if (header_uuid(&h[H_IN_REPLY_TO], out->in_reply_to))
        problem = "header in-reply-to is missing or not a uuid";
    else if (header_uuid(&h[H_SAGA_ID], out->saga_id))
        problem = "header saga-id is missing or not a uuid";
    else if (!val)
        problem = "header outcome is missing";
    else if (size == 7 && !memcmp(val, "success", 7))
        out->success = true;
    else if (size == 7 && !memcmp(val, "failure", 7))
        out->success = false;
    else
        problem = "header outcome is neither success nor failure";
    if (!problem && msg->payload)
        problem = value_problem(msg->payload, msg->len);
    if (!problem) {
        out->data = msg->payload ? cJSON_ParseWithLength(msg->payload, msg->len) : NULL;
        if (!cJSON_IsObject(out->data))
            problem = "value is not a JSON object";
    }
    if (problem) {
        /* Without its error a malformed reply would look well-formed: nothing sensible is
         * left to do without memory, as elsewhere in the worker. */
        if (!(out->error = strdup(problem))) {
            log_error("out of memory");
            abort();
        }
        cJSON_Delete(out->data);
        out->data = NULL;
    }
}

void reply_clear(struct reply_msg *r)
{
    if (r->msg)
        rd_kafka_message_destroy(r->msg);
    cJSON_Delete(r->data);
    free(r->error);
    memset(r, 0, sizeof(*r));
}

void replies_poll(struct orchestrator *o)
{
    size_t before = o->pending_count;
    while (!o->stopping && o->pending_count < MAX_PENDING) {
        rd_kafka_message_t *m = rd_kafka_consumer_poll(o->consumer, 0);
        if (!m)
            break;
        if (m->err) {
            if (m->err != RD_KAFKA_RESP_ERR__PARTITION_EOF)
                log_at(LOG_WARN, LOG_FIELDS("error", rd_kafka_err2name(m->err)),
                       "reply consumer: %s", rd_kafka_message_errstr(m));
            rd_kafka_message_destroy(m);
            continue;
        }
        if (o->pending_count == o->pending_cap) {
            size_t cap = o->pending_cap ? o->pending_cap * 2 : 256;
            struct reply_msg *grown = realloc(o->pending, cap * sizeof(*grown));
            if (!grown) {
                log_error("out of memory queueing replies");
                abort();
            }
            o->pending = grown;
            o->pending_cap = cap;
        }
        reply_parse(m, &o->pending[o->pending_count++]);
    }
    /* The queue reached its cap: the rest waits in librdkafka's queue (backpressure). Counted
     * once per time it fills, not per poll that finds it full; the saga_replies_queued gauge
     * is only sampled by the status timer and misses a cap reached and drained in between. */
    if (before < MAX_PENDING && o->pending_count >= MAX_PENDING)
        metrics_counter_add("saga_replies_queue_full_total", NULL, 1);
    if (o->pending_count)
        worker_kick(o->replier);
}

void replies_commit(struct orchestrator *o, size_t n)
{
    if (n > o->pending_count)
        n = o->pending_count;
    rd_kafka_topic_partition_list_t *list = rd_kafka_topic_partition_list_new((int)n);
    for (size_t i = 0; i < n; i++) {
        rd_kafka_message_t *m = o->pending[i].msg;
        const char *topic = rd_kafka_topic_name(m->rkt);
        rd_kafka_topic_partition_t *p =
            rd_kafka_topic_partition_list_find(list, topic, m->partition);
        if (!p)
            p = rd_kafka_topic_partition_list_add(list, topic, m->partition);
        if (p->offset < m->offset + 1)
            p->offset = m->offset + 1;
    }
    if (list->cnt) {
        rd_kafka_resp_err_t err = rd_kafka_commit(o->consumer, list, 1);
        if (err)
            log_at(LOG_WARN, LOG_FIELDS("error", rd_kafka_err2name(err)),
                   "offset commit failed; the replies may be delivered again (dropped "
                   "as seen before)");
    }
    rd_kafka_topic_partition_list_destroy(list);
    for (size_t i = 0; i < n; i++)
        reply_clear(&o->pending[i]);
    memmove(o->pending, o->pending + n, (o->pending_count - n) * sizeof(*o->pending));
    o->pending_count -= n;
    replies_poll(o); /* the queue may hold more than fit before */
}

static void consumer_io_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    struct orchestrator *o = w->data;
    char buf[256];
    while (read(o->consumer_fds[0], buf, sizeof(buf)) > 0)
        ;
    replies_poll(o);
}

static void consumer_timer_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct orchestrator *o = w->data;
    /* rd_kafka_consumer_poll serves errors and statistics too: rd_kafka_poll_set_consumer
     * forwarded the main queue to it. Calling rd_kafka_poll here as well tripped librdkafka's
     * assertion in rd_kafka_q_serve (res != RD_KAFKA_OP_RES_PASS) when it met a fetched
     * message under load (seen in bench/saga-bench). */
    replies_poll(o);
}

static void rebalance_cb(rd_kafka_t *rk, rd_kafka_resp_err_t err,
                         rd_kafka_topic_partition_list_t *parts, void *opaque)
{
    struct orchestrator *o = opaque;
    if (err == RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS) {
        log_info("reply consumer: %d partition(s) assigned", parts->cnt);
        rd_kafka_assign(rk, parts);
        o->assigned_partitions = parts->cnt;
    } else {
        log_info("reply consumer: %d partition(s) revoked", parts->cnt);
        rd_kafka_assign(rk, NULL);
        o->assigned_partitions = 0;
    }
}

static void error_cb(rd_kafka_t *rk, int err, const char *reason, void *opaque)
{
    struct orchestrator *o = opaque;
    if (err == RD_KAFKA_RESP_ERR__ALL_BROKERS_DOWN)
        o->kafka_up = false;
    log_at(LOG_WARN, LOG_FIELDS("error", rd_kafka_err2name((rd_kafka_resp_err_t)err)), "kafka: %s",
           reason);
}

/* Kafka is reachable when a broker is UP in the consumer's statistics (every second). The
 * error callback only reports that every broker is down, never that one came back, so
 * without this /readyz stayed "kafka down" after the first outage. */
static int stats_cb(rd_kafka_t *rk, char *json, size_t len, void *opaque)
{
    struct orchestrator *o = opaque;
    bool up = kafka_stats_any_broker_up(json, len);
    if (up != o->kafka_up)
        log_info("kafka %s", up ? "reachable" : "unreachable");
    o->kafka_up = up;
    return 0; /* librdkafka frees json */
}

int replies_resubscribe(struct orchestrator *o)
{
    rd_kafka_topic_partition_list_t *topics = rd_kafka_topic_partition_list_new(4);
    for (size_t i = 0; i < o->registry.count; i++) {
        const char *t = o->registry.defs[i]->reply_topic;
        if (!rd_kafka_topic_partition_list_find(topics, t, RD_KAFKA_PARTITION_UA))
            rd_kafka_topic_partition_list_add(topics, t, RD_KAFKA_PARTITION_UA);
    }
    rd_kafka_resp_err_t e = RD_KAFKA_RESP_ERR_NO_ERROR;
    if (topics->cnt) {
        /* The same set again is not a change for the group: no rebalance. */
        rd_kafka_topic_partition_list_t *current = NULL;
        bool same =
            !rd_kafka_subscription(o->consumer, &current) && current && current->cnt == topics->cnt;
        for (int i = 0; same && i < topics->cnt; i++)
            same = rd_kafka_topic_partition_list_find(current, topics->elems[i].topic,
                                                      RD_KAFKA_PARTITION_UA) != NULL;
        if (current)
            rd_kafka_topic_partition_list_destroy(current);
        if (!same) {
            e = rd_kafka_subscribe(o->consumer, topics);
            if (e)
                log_at(LOG_ERROR, LOG_FIELDS("error", rd_kafka_err2str(e)),
                       "cannot subscribe to the reply topics");
        }
    }
    rd_kafka_topic_partition_list_destroy(topics);
    return e ? -1 : 0;
}

/* The consumer's configuration from the settings and KAFKA_* variables, checked; NULL with
 * why. The caller owns the result. */
static rd_kafka_conf_t *consumer_conf_new(const struct orch_settings *st, char *err, size_t errlen)
{
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    const char *props[][2] = {
        {"bootstrap.servers", st->kafka_brokers},
        {"group.id", st->group_id},
        {"enable.auto.commit", "false"},
        {"enable.auto.offset.store", "false"},
        {"auto.offset.reset", "earliest"},
        {"client.id", "saga-orchestrator"},
        /* fetch.wait.max.ms stays librdkafka's 500 ms: a Kafka broker (and dev-broker, unless
         * --no-long-poll) answers a Fetch as soon as data arrives, so the wait only spaces out
         * an idle consumer's Fetches (and delays a newly assigned partition's first Fetch by
         * up to that much). KAFKA_FETCH_WAIT_MAX_MS overrides it. */
        {"statistics.interval.ms", "1000"}, /* stats_cb: is Kafka reachable? */
    };
    for (size_t i = 0; i < sizeof(props) / sizeof(props[0]); i++) {
        char what[128];
        snprintf(what, sizeof(what), "consumer property %s", props[i][0]);
        if (kafka_conf_set(conf, props[i][0], props[i][1], what, err, errlen)) {
            rd_kafka_conf_destroy(conf);
            return NULL;
        }
    }
    if (kafka_conf_apply_env(conf, err, errlen)) {
        rd_kafka_conf_destroy(conf);
        return NULL;
    }
    kafka_conf_log_json(conf);
    /* /readyz learns that Kafka is reachable again after an outage from the statistics only
     * (stats_cb): with them off it would say "kafka down" for good after the first outage.
     * Refused at start rather than a readiness that cannot recover. */
    char interval[32];
    size_t interval_size = sizeof(interval);
    if (rd_kafka_conf_get(conf, "statistics.interval.ms", interval, &interval_size) ==
            RD_KAFKA_CONF_OK &&
        atol(interval) <= 0) {
        snprintf(err, errlen,
                 "KAFKA_STATISTICS_INTERVAL_MS (statistics.interval.ms) is %s: the statistics "
                 "must stay on (/readyz reads from them that Kafka is reachable again after an "
                 "outage); leave it unset (1000) or give a positive value",
                 interval);
        rd_kafka_conf_destroy(conf);
        return NULL;
    }
    return conf;
}

int replies_check_config(const struct orch_settings *st, char *err, size_t errlen)
{
    rd_kafka_conf_t *conf = consumer_conf_new(st, err, errlen);
    if (!conf)
        return -1;
    /* Some settings are only checked when the client is made: the TLS files
     * (KAFKA_SSL_CA_LOCATION and the like are read then), the SASL mechanism's
     * availability. Made and destroyed here, before the migrations, so that such an error is
     * an exit 2 that changes nothing. Not subscribed: it joins no group, but librdkafka may
     * start a coordinator lookup at a bootstrap broker before the destroy (~10 ms). */
    char reason[512];
    rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_CONSUMER, conf, reason, sizeof(reason));
    if (!rk) {
        rd_kafka_conf_destroy(conf);
        snprintf(err, errlen, "Kafka consumer configuration (KAFKA_* variables): %s", reason);
        return -1;
    }
    rd_kafka_destroy(rk);
    return 0;
}

int replies_start(struct orchestrator *o, char *err, size_t errlen)
{
    o->consumer_fds[0] = o->consumer_fds[1] = -1; /* none yet: replies_stop closes what is */
    rd_kafka_conf_t *conf = consumer_conf_new(&o->settings, err, errlen);
    if (!conf)
        return -1;
    rd_kafka_conf_set_rebalance_cb(conf, rebalance_cb);
    rd_kafka_conf_set_error_cb(conf, error_cb);
    rd_kafka_conf_set_stats_cb(conf, stats_cb);
    rd_kafka_conf_set_opaque(conf, o);
    char reason[512];
    o->consumer = rd_kafka_new(RD_KAFKA_CONSUMER, conf, reason, sizeof(reason));
    if (!o->consumer) {
        rd_kafka_conf_destroy(conf);
        snprintf(err, errlen, "cannot create the Kafka consumer: %s", reason);
        return -1;
    }
    rd_kafka_poll_set_consumer(o->consumer);
    if (replies_resubscribe(o)) {
        snprintf(err, errlen, "cannot subscribe to the reply topics");
        return -1;
    }
    if (pipe2(o->consumer_fds, O_NONBLOCK | O_CLOEXEC)) {
        snprintf(err, errlen, "pipe: out of file descriptors");
        return -1;
    }
    rd_kafka_queue_t *q = rd_kafka_queue_get_consumer(o->consumer);
    rd_kafka_queue_io_event_enable(q, o->consumer_fds[1], "1", 1);
    rd_kafka_queue_destroy(q);
    ev_io_init(&o->consumer_io, consumer_io_cb, o->consumer_fds[0], EV_READ);
    o->consumer_io.data = o;
    ev_io_start(o->loop, &o->consumer_io);
    ev_timer_init(&o->consumer_timer, consumer_timer_cb, 0.05, 0.05);
    o->consumer_timer.data = o;
    ev_timer_start(o->loop, &o->consumer_timer);
    o->kafka_up = true;
    return 0;
}

void replies_stop(struct orchestrator *o)
{
    if (!o->consumer)
        return;
    ev_io_stop(o->loop, &o->consumer_io);
    ev_timer_stop(o->loop, &o->consumer_timer);
    for (size_t i = 0; i < o->pending_count; i++)
        reply_clear(&o->pending[i]); /* not applied: their offsets were not committed */
    o->pending_count = 0;
    free(o->pending);
    o->pending = NULL;
    /* Called once, on the way out (main): a consumer that did not close in time is left to
     * the exit with the pipe its queue writes to. */
    bool closed = kafka_consumer_close(o->consumer, 5000);
    o->consumer = NULL;
    if (!closed) {
        log_warn("reply consumer: not closed within 5 s (Kafka unreachable?): exiting without "
                 "it; its partitions move to the others at the session timeout at the latest");
        return;
    }
    for (int i = 0; i < 2; i++)
        if (o->consumer_fds[i] >= 0)
            close(o->consumer_fds[i]);
}
