/* producer: the relay's one idempotent Kafka producer, driven by the libev loop through the
 * main queue's io-event fd; delivery reports go back to the table that claimed the row. */
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "kafka_conf.h"
#include "log.h"
#include "metrics.h"
#include "relay.h"

int relay_producer_start(struct relay *r, char *err, size_t errlen);
void relay_producer_stop(struct relay *r);

bool relay_error_is_permanent(rd_kafka_resp_err_t err)
{
    switch (err) {
    case RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE:
    case RD_KAFKA_RESP_ERR_RECORD_LIST_TOO_LARGE:
    case RD_KAFKA_RESP_ERR_INVALID_RECORD:
    case RD_KAFKA_RESP_ERR_TOPIC_EXCEPTION:
    case RD_KAFKA_RESP_ERR__UNKNOWN_TOPIC:
    case RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART:
    case RD_KAFKA_RESP_ERR__INVALID_ARG:
    case RD_KAFKA_RESP_ERR_INVALID_MSG:
        return true;
    default:
        return false;
    }
}

static void dr_msg_cb(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque)
{
    /* Not rd_kafka_message_errstr(): for a delivery report it returns the message's payload
     * (it is meant for consumer error events, whose payload is the error text), and that is
     * not even NUL-terminated. */
    const char *errstr = m->err ? rd_kafka_err2str(m->err) : NULL;
    if (!m->err)
        ((struct relay *)opaque)->delivered_since_restart = true;
    outbox_table_delivered(m->_private, m->err, errstr, m->partition, m->offset);
}

/* The least time between two new producers (see error_cb). */
#define RESTART_GAP_MS 100

static void error_cb(rd_kafka_t *rk, int err, const char *reason, void *opaque)
{
    struct relay *r = opaque;
    if (err == RD_KAFKA_RESP_ERR__ALL_BROKERS_DOWN) {
        r->kafka_up = false;
        metrics_gauge_set("relay_kafka_up", NULL, 0);
    }
    if (err == RD_KAFKA_RESP_ERR__FATAL) {
        /* The producer cannot continue. With enable.gapless.guarantee librdkafka raises this
         * for any batch the broker fails for good or with an error no retry fixes (a policy,
         * an authorization, an invalid record), since the messages behind it in its
         * partition would otherwise be published first; also for a broken sequence. Its
         * messages are purged and reported failed: each table that had some reads again
         * from its first unacknowledged row, after its own doubling pause (the table whose
         * row failed) or at once (the others: duplicates, same message-id); rows rejected for
         * good go to the dead-letter table. A new producer (a new producer id) replaces it.
         * Before, the process exited and its supervisor restarted it. */
        if (rk != r->producer || r->producer_down)
            return; /* already being replaced */
        char fatal[512];
        rd_kafka_resp_err_t ferr = rd_kafka_fatal_error(rk, fatal, sizeof(fatal));
        r->producer_down = true;
        /* New producers RESTART_GAP_MS apart while the last one delivered something (the
         * tables' own pauses space the retries of what failed), else a pause that doubles up
         * to RELAY_RECONNECT_MAX: a fatal error that fails no message (the producer id
         * refused: an ACL, a broker without idempotence) pauses no table, and made this a
         * new producer ten times a second. */
        int64_t now = relay_now_ms();
        if (r->delivered_since_restart || !r->restart_backoff_ms)
            r->restart_backoff_ms = RESTART_GAP_MS;
        else if ((r->restart_backoff_ms *= 2) > r->settings.reconnect_max_ms)
            r->restart_backoff_ms = r->settings.reconnect_max_ms;
        r->restart_at = r->last_restart_ms + r->restart_backoff_ms;
        if (r->restart_at < now)
            r->restart_at = now;
        log_at(LOG_ERROR, LOG_FIELDS("error", rd_kafka_err2name(ferr), "reason", fatal),
               "fatal producer error; its messages are purged and published again (same "
               "message-id) by a new producer, %lld ms after the last one at the earliest",
               (long long)r->restart_backoff_ms);
        metrics_counter_add("relay_producer_restarts_total", NULL, 1);
        ev_timer_set(&r->producer_restart, 0, 0); /* the purge at once, from the loop */
        ev_timer_start(r->loop, &r->producer_restart);
        return;
    }
    log_at(LOG_WARN, LOG_FIELDS("error", rd_kafka_err2name((rd_kafka_resp_err_t)err)), "kafka: %s",
           reason);
}

static int stats_cb(rd_kafka_t *rk, char *json, size_t len, void *opaque)
{
    struct relay *r = opaque;
    bool up = kafka_stats_any_broker_up(json, len);
    if (up != r->kafka_up)
        log_info("kafka %s", up ? "reachable" : "unreachable");
    r->kafka_up = up;
    metrics_gauge_set("relay_kafka_up", NULL, up ? 1 : 0);
    return 0; /* librdkafka frees json */
}

static void serve(struct relay *r)
{
    /* The io-event fires when the queue becomes non-empty: serve until it is empty. */
    while (rd_kafka_poll(r->producer, 0) > 0)
        ;
}

static void kafka_io_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    struct relay *r = w->data;
    char buf[256];
    while (read(r->kafka_event_fds[0], buf, sizeof(buf)) > 0)
        ;
    serve(r);
}

static void kafka_poll_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    serve(w->data); /* a safety net; the io-event does the real work */
}

/* A producer with the relay's configuration, its reports served through the io-event pipe.
 * NULL with err on failure. */
static rd_kafka_t *producer_new(struct relay *r, char *err, size_t errlen)
{
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    char linger[32];
    snprintf(linger, sizeof(linger), "%lld", (long long)r->settings.linger_ms);
    /* message.timeout.ms=0: never give up on a transient error; the idempotent producer then
     * keeps order and loses nothing while a broker is away. Rows Kafka rejects for good are
     * reported at once and dead-lettered. enable.gapless.guarantee (below): when a batch
     * fails for good or with an error no retry fixes, the producer stops instead of
     * publishing the messages behind it (see error_cb). KAFKA_* variables may override any
     * of these. */
    const char *props[][2] = {
        {"bootstrap.servers", r->settings.kafka_brokers},
        {"enable.idempotence", "true"},
        {"acks", "all"},
        {"message.timeout.ms", "0"},
        {"linger.ms", linger},
        {"batch.num.messages", "10000"},
        {"queue.buffering.max.messages", "2000000"},
        {"queue.buffering.max.kbytes", "2097151"},
        {"statistics.interval.ms", "1000"},
        {"client.id", "outbox-relay"},
    };
    for (size_t i = 0; i < sizeof(props) / sizeof(props[0]); i++) {
        char what[128];
        snprintf(what, sizeof(what), "producer property %s", props[i][0]);
        if (kafka_conf_set(conf, props[i][0], props[i][1], what, err, errlen)) {
            rd_kafka_conf_destroy(conf);
            return NULL;
        }
    }
    if (kafka_conf_apply_env(conf, err, errlen)) {
        rd_kafka_conf_destroy(conf);
        return NULL;
    }
    /* The gapless guarantee needs the idempotent producer: on unless KAFKA_ENABLE_IDEMPOTENCE
     * turned that off (then order per key after a failed batch is not kept, README) or
     * KAFKA_ENABLE_GAPLESS_GUARANTEE says otherwise. */
    char idem[16];
    size_t idem_len = sizeof(idem);
    if (!getenv("KAFKA_ENABLE_GAPLESS_GUARANTEE") &&
        rd_kafka_conf_get(conf, "enable.idempotence", idem, &idem_len) == RD_KAFKA_CONF_OK &&
        !strcmp(idem, "true") &&
        kafka_conf_set(conf, "enable.gapless.guarantee", "true",
                       "producer property enable.gapless.guarantee", err, errlen)) {
        rd_kafka_conf_destroy(conf);
        return NULL;
    }
    rd_kafka_conf_set_dr_msg_cb(conf, dr_msg_cb);
    rd_kafka_conf_set_error_cb(conf, error_cb);
    rd_kafka_conf_set_stats_cb(conf, stats_cb);
    kafka_conf_log_json(conf);
    rd_kafka_conf_set_opaque(conf, r);
    char reason[512];
    rd_kafka_t *p = rd_kafka_new(RD_KAFKA_PRODUCER, conf, reason, sizeof(reason));
    if (!p) {
        rd_kafka_conf_destroy(conf);
        snprintf(err, errlen, "cannot create the Kafka producer: %s", reason);
        return NULL;
    }
    rd_kafka_queue_t *q = rd_kafka_queue_get_main(p);
    rd_kafka_queue_io_event_enable(q, r->kafka_event_fds[1], "1", 1);
    rd_kafka_queue_destroy(q);
    return p;
}

static void *destroy_thread(void *arg)
{
    rd_kafka_destroy(arg);
    return NULL;
}

/* How long the stopped producer may take to report its purged messages. */
#define RESTART_DRAIN_MS 5000

/* Waits (bounded) for the thread destroying the previous stopped producer. */
static void join_destroyer(struct relay *r)
{
    if (!r->destroyer_running)
        return;
    struct timespec until;
    clock_gettime(CLOCK_MONOTONIC, &until);
    until.tv_sec += 5;
    if (pthread_clockjoin_np(r->destroyer, NULL, CLOCK_MONOTONIC, &until))
        log_warn("a stopped producer is still being destroyed after 5 s");
    r->destroyer_running = false;
}

/* After a fatal error (error_cb): purge the stopped producer, serve the reports of its
 * messages (each table that had some starts over from its first unacknowledged row), then
 * put a new producer in its place. The old one is destroyed on a thread of its own
 * (rd_kafka_destroy joins librdkafka's threads: not a call for the loop), with its queue's
 * io-event off first, since the pipe is the new producer's now; relay_producer_stop joins
 * that thread. */
static void restart_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct relay *r = w->data;
    int64_t now_ms = relay_now_ms();
    if (!r->old_producer) {
        r->old_producer = r->producer;
        rd_kafka_purge(r->old_producer, RD_KAFKA_PURGE_F_QUEUE | RD_KAFKA_PURGE_F_INFLIGHT |
                                            RD_KAFKA_PURGE_F_NON_BLOCKING);
        r->restart_deadline_ms = now_ms + RESTART_DRAIN_MS;
    }
    serve(r); /* r->producer is still the old one: its reports go to their tables */
    int pending = rd_kafka_outq_len(r->old_producer);
    if (pending > 0 && now_ms > r->restart_deadline_ms) {
        /* Never seen; the rows are safe in their tables, so a new process is the way out. */
        log_at(LOG_ERROR, NULL,
               "the stopped producer still holds %d messages or reports after %d ms; exiting "
               "so that a new process starts (their rows stay in their tables)",
               pending, RESTART_DRAIN_MS);
        fflush(stdout);
        _exit(1);
    }
    if (pending > 0 || now_ms < r->restart_at) {
        ev_timer_set(w, pending > 0 ? 0.01 : (double)(r->restart_at - now_ms) / 1000.0, 0);
        ev_timer_start(loop, w);
        return;
    }
    char err[512];
    rd_kafka_t *fresh = producer_new(r, err, sizeof(err));
    if (!fresh) {
        log_at(LOG_ERROR, LOG_FIELDS("error", err), "no new producer; trying again in %lld ms",
               (long long)r->settings.reconnect_max_ms);
        r->restart_at = now_ms + r->settings.reconnect_max_ms;
        r->restart_deadline_ms = INT64_MAX; /* nothing pending: the old one is drained */
        ev_timer_set(w, (double)r->settings.reconnect_max_ms / 1000.0, 0);
        ev_timer_start(loop, w);
        return;
    }
    rd_kafka_queue_t *q = rd_kafka_queue_get_main(r->old_producer);
    rd_kafka_queue_io_event_enable(q, -1, NULL, 0);
    rd_kafka_queue_destroy(q);
    /* The previous stopped producer's thread: joined if done, else let go (its queue's
     * io-event is off; nothing else of it is shared), never waited for on the loop. */
    if (r->destroyer_running && pthread_tryjoin_np(r->destroyer, NULL) != 0)
        pthread_detach(r->destroyer);
    r->destroyer_running = false;
    if (pthread_create(&r->destroyer, NULL, destroy_thread, r->old_producer) == 0)
        r->destroyer_running = true;
    else
        rd_kafka_destroy(r->old_producer);
    r->old_producer = NULL;
    r->producer = fresh;
    r->producer_down = false;
    r->last_restart_ms = now_ms;
    r->delivered_since_restart = false;
    log_info("a new producer replaces the stopped one");
    for (size_t i = 0; i < r->table_count; i++)
        outbox_table_kick(r->tables[i]);
}

int relay_producer_start(struct relay *r, char *err, size_t errlen)
{
    if (pipe2(r->kafka_event_fds, O_NONBLOCK | O_CLOEXEC)) {
        snprintf(err, errlen, "pipe: out of file descriptors");
        return -1;
    }
    r->producer = producer_new(r, err, errlen);
    if (!r->producer)
        return -1;
    ev_io_init(&r->kafka_io, kafka_io_cb, r->kafka_event_fds[0], EV_READ);
    r->kafka_io.data = r;
    ev_io_start(r->loop, &r->kafka_io);
    ev_timer_init(&r->kafka_poll, kafka_poll_cb, 0.1, 0.1);
    r->kafka_poll.data = r;
    ev_timer_start(r->loop, &r->kafka_poll);
    ev_timer_init(&r->producer_restart, restart_cb, 0, 0);
    r->producer_restart.data = r;
    return 0;
}

rd_kafka_resp_err_t relay_produce(struct relay *r, const char *topic, const char *key,
                                  size_t key_len, const char *value, size_t value_len,
                                  int64_t timestamp_ms, rd_kafka_headers_t *headers, void *opaque)
{
    return rd_kafka_producev(r->producer, RD_KAFKA_V_TOPIC(topic), RD_KAFKA_V_KEY(key, key_len),
                             RD_KAFKA_V_VALUE((void *)value, value_len),
                             RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
                             RD_KAFKA_V_TIMESTAMP(timestamp_ms), RD_KAFKA_V_HEADERS(headers),
                             RD_KAFKA_V_OPAQUE(opaque), RD_KAFKA_V_END);
}

void relay_producer_stop(struct relay *r)
{
    if (!r->producer)
        return;
    ev_io_stop(r->loop, &r->kafka_io);
    ev_timer_stop(r->loop, &r->kafka_poll);
    ev_timer_stop(r->loop, &r->producer_restart);
    r->old_producer = NULL; /* it is r->producer while a restart drains it */
    join_destroyer(r);
    /* Whatever is still queued was not acknowledged, so its rows were not deleted: purge
     * rather than wait, the rows are published again by the next leader. */
    rd_kafka_purge(r->producer, RD_KAFKA_PURGE_F_QUEUE | RD_KAFKA_PURGE_F_INFLIGHT);
    rd_kafka_destroy(r->producer); /* reports of purged messages are dropped, not served */
    r->producer = NULL;
    /* Every producer of the process gone, those let go by restart_cb included, before the
     * caller returns from main (exit's handlers must not run under librdkafka's threads).
     * After the destroy above: it waits for every handle, the live one included. */
    if (rd_kafka_wait_destroyed(5000) == -1)
        log_warn("a stopped producer is still being destroyed after 5 s");
    close(r->kafka_event_fds[0]);
    close(r->kafka_event_fds[1]);
}
