/* producer: the relay's one idempotent Kafka producer, driven by the libev loop through the
 * main queue's io-event fd; delivery reports go back to the table that claimed the row. */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
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
    outbox_table_delivered(m->_private, m->err, errstr, m->partition, m->offset);
}

static void error_cb(rd_kafka_t *rk, int err, const char *reason, void *opaque)
{
    struct relay *r = opaque;
    if (err == RD_KAFKA_RESP_ERR__ALL_BROKERS_DOWN) {
        r->kafka_up = false;
        metrics_gauge_set("relay_kafka_up", NULL, 0);
    }
    if (err == RD_KAFKA_RESP_ERR__FATAL) {
        char fatal[512];
        rd_kafka_resp_err_t ferr = rd_kafka_fatal_error(rk, fatal, sizeof(fatal));
        /* The idempotent producer cannot continue (for example a broken sequence). Exiting
         * loses nothing: unacknowledged rows stay in their tables; the supervisor restarts
         * the relay, which publishes them again with the same message-id. */
        log_at(LOG_ERROR, LOG_FIELDS("error", rd_kafka_err2name(ferr), "reason", fatal),
               "fatal producer error; exiting so that a new producer starts");
        _exit(1);
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

int relay_producer_start(struct relay *r, char *err, size_t errlen)
{
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    char linger[32];
    snprintf(linger, sizeof(linger), "%lld", (long long)r->settings.linger_ms);
    /* message.timeout.ms=0: never give up on a transient error; the idempotent producer then
     * keeps order and loses nothing while a broker is away. Rows Kafka rejects for good are
     * reported at once and dead-lettered. KAFKA_* variables may override any of these. */
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
            return -1;
        }
    }
    if (kafka_conf_apply_env(conf, err, errlen)) {
        rd_kafka_conf_destroy(conf);
        return -1;
    }
    rd_kafka_conf_set_dr_msg_cb(conf, dr_msg_cb);
    rd_kafka_conf_set_error_cb(conf, error_cb);
    rd_kafka_conf_set_stats_cb(conf, stats_cb);
    rd_kafka_conf_set_opaque(conf, r);
    char reason[512];
    r->producer = rd_kafka_new(RD_KAFKA_PRODUCER, conf, reason, sizeof(reason));
    if (!r->producer) {
        rd_kafka_conf_destroy(conf);
        snprintf(err, errlen, "cannot create the Kafka producer: %s", reason);
        return -1;
    }
    if (pipe2(r->kafka_event_fds, O_NONBLOCK | O_CLOEXEC)) {
        snprintf(err, errlen, "pipe: out of file descriptors");
        return -1;
    }
    rd_kafka_queue_t *q = rd_kafka_queue_get_main(r->producer);
    rd_kafka_queue_io_event_enable(q, r->kafka_event_fds[1], "1", 1);
    rd_kafka_queue_destroy(q);
    ev_io_init(&r->kafka_io, kafka_io_cb, r->kafka_event_fds[0], EV_READ);
    r->kafka_io.data = r;
    ev_io_start(r->loop, &r->kafka_io);
    ev_timer_init(&r->kafka_poll, kafka_poll_cb, 0.1, 0.1);
    r->kafka_poll.data = r;
    ev_timer_start(r->loop, &r->kafka_poll);
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
    /* Whatever is still queued was not acknowledged, so its rows were not deleted: purge
     * rather than wait, the rows are published again by the next leader. */
    rd_kafka_purge(r->producer, RD_KAFKA_PURGE_F_QUEUE | RD_KAFKA_PURGE_F_INFLIGHT);
    rd_kafka_destroy(r->producer); /* reports of purged messages are dropped, not served */
    r->producer = NULL;
    close(r->kafka_event_fds[0]);
    close(r->kafka_event_fds[1]);
}
