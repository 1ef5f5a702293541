/* relay: the outbox relay's shared types. See ARCHITECTURE.md for the data flow:
 * outbox table --(claim, pgloop)--> producer --(delivery report)--> delete / dead-letter. */
#ifndef SAGA_RELAY_H
#define SAGA_RELAY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <ev.h>
#include <pthread.h>
#include <librdkafka/rdkafka.h>

#include "pgloop.h"

struct relay;
struct outbox_table;

/* Settings of the relay process (relay/relay_config.c). */
struct relay_settings {
    char *database_url;         /* RELAY_DATABASE_URL: source of RELAY_OUTBOX_TABLES */
    char *kafka_brokers;        /* RELAY_KAFKA_BROKERS */
    char *outbox_tables;        /* RELAY_OUTBOX_TABLES */
    char *config_file;          /* RELAY_CONFIG */
    char *admin_addr;           /* RELAY_ADMIN_ADDR */
    char *log_level;            /* RELAY_LOG_LEVEL */
    int batch_size;             /* rows per claim */
    int max_inflight;           /* claimed rows not yet deleted, per table */
    int64_t max_inflight_bytes; /* payload+key+headers bytes in the producer, per table */
    int64_t poll_ms;            /* fallback poll when no NOTIFY arrives */
    int64_t leader_retry_ms;
    int64_t reconnect_max_ms;
    int64_t drain_timeout_ms; /* SIGTERM: how long to wait for acknowledgements */
    int64_t linger_ms;
    bool sources_from_env; /* RELAY_OUTBOX_TABLES is used (decided once, at start) */
};

/* One outbox table of one database. */
struct outbox_source {
    char *conninfo; /* owned */
    char *schema;   /* owned */
    char *table;    /* owned */
    char *where;    /* owned: where it is configured, for errors ("FILE: $.sources[i].tables[j]"
                       or "RELAY_OUTBOX_TABLES (--outbox-tables)") */
};

/* Parses the settings and the sources (RELAY_OUTBOX_TABLES against RELAY_DATABASE_URL, plus
 * every source of RELAY_CONFIG). Returns 0, 1 for --help, or -1 with err naming the setting.
 * *sources is a new array the caller frees with relay_sources_free(). */
__attribute__((warn_unused_result)) int relay_config_load(int argc, char **argv,
                                                          struct relay_settings *settings,
                                                          struct outbox_source **sources,
                                                          size_t *count, char *err, size_t errlen);
void relay_sources_free(struct outbox_source *sources, size_t count);

/* The sources again, from settings already loaded by relay_config_load (SIGHUP): those of
 * RELAY_OUTBOX_TABLES as at start (the environment of a running process does not change) and
 * those of RELAY_CONFIG read anew, with the same checks and errors (naming the file and the
 * JSON path). Touches no global state but getenv, so it may run off the loop. Returns 0, or -1
 * with err. *sources is a new array the caller frees with relay_sources_free(), also on
 * failure. */
__attribute__((warn_unused_result)) int relay_sources_load(const struct relay_settings *settings,
                                                           struct outbox_source **sources,
                                                           size_t *count, char *err, size_t errlen);
void relay_settings_free(struct relay_settings *settings);

/* Checks, with a blocking connection (bounded: connect, statements, TCP), that the table and
 * its dead-letter table exist with the columns the relay needs. Returns 0, or -1 with err
 * naming where the table is configured (src->where), the table and the column. */
__attribute__((warn_unused_result)) int outbox_table_check(const struct outbox_source *src,
                                                           char *err, size_t errlen);

/* Creates the publisher of one table (not started). src is borrowed for the table's life. */
struct outbox_table *outbox_table_create(struct relay *relay, const struct outbox_source *src);
void outbox_table_destroy(struct outbox_table *t);

/* Starts connecting (and then leading or standing by). */
void outbox_table_start(struct outbox_table *t);

/* Stop claiming; keep deleting what is acknowledged. */
void outbox_table_stop_claiming(struct outbox_table *t);

/* Lets the table go (a source removed by SIGHUP): closes both sessions, which releases the
 * leader lock, forgets what it claimed (those rows stay in the table) and never reconnects.
 * Delivery reports of its messages still in the producer may arrive afterwards and are
 * dropped; destroy the table only once outbox_table_in_producer() is 0. */
void outbox_table_release(struct outbox_table *t);

/* Messages of this table handed to the producer and not yet reported: while it is not 0 the
 * producer may still call outbox_table_delivered() for it. */
size_t outbox_table_in_producer(const struct outbox_table *t);

/* What the table's session does now, for logs: "leading", "standby" (another relay leads),
 * "disconnected", "connecting", "locking" or "listening". A static string. */
const char *outbox_table_role(const struct outbox_table *t);

/* True when nothing claimed is left unresolved (all acknowledged rows deleted). */
bool outbox_table_drained(const struct outbox_table *t);

/* Readiness for /readyz: appends "label role state\n" to buf. */
void outbox_table_describe(const struct outbox_table *t, char *buf, size_t size, bool *ready);

/* Delivery report for one message produced by this table (called by the producer). */
void outbox_table_delivered(void *row_opaque, rd_kafka_resp_err_t err, const char *errstr,
                            int32_t partition, int64_t offset);

struct relay {
    struct ev_loop *loop;
    struct relay_settings settings;
    rd_kafka_t *producer;
    struct outbox_table **tables;
    struct outbox_source **sources; /* sources[i] is tables[i]'s, owned (one allocation each) */
    size_t table_count;
    bool stopping;
    bool kafka_up;
    ev_io kafka_io;
    ev_timer kafka_poll;
    int kafka_event_fds[2];
    /* A fatal producer error (enable.gapless.guarantee: a batch failed for good or with an
     * error no retry fixes; or a broken sequence) stops the producer: no claim until a new
     * one replaces it (producer.c, restart_cb). */
    bool producer_down;
    rd_kafka_t *old_producer;     /* the stopped one, while its reports are served */
    ev_timer producer_restart;    /* the drain of old_producer, then the new producer */
    int64_t restart_at;           /* monotonic ms: no new producer before */
    int64_t last_restart_ms;      /* when the last new producer was made (monotonic ms) */
    int64_t restart_deadline_ms;  /* the drain's bound (monotonic ms) */
    int64_t restart_backoff_ms;   /* the least time between new producers (error_cb) */
    bool delivered_since_restart; /* the current producer has delivered a message */
    pthread_t destroyer;          /* destroys the last stopped producer (joined at stop) */
    bool destroyer_running;
};

/* Monotonic milliseconds (not libev's ev_now, which is wall time): the relay's pauses and
 * deadlines must not follow a wall clock step. */
int64_t relay_now_ms(void);

/* Runs the table's next step from the loop (after a new producer, say). */
void outbox_table_kick(struct outbox_table *t);

/* Produces one message; on failure returns the error (the row is not in flight). Headers are
 * taken over on success. */
rd_kafka_resp_err_t relay_produce(struct relay *relay, const char *topic, const char *key,
                                  size_t key_len, const char *value, size_t value_len,
                                  int64_t timestamp_ms, rd_kafka_headers_t *headers, void *opaque);

/* True for errors that no retry can fix: the row goes to the dead-letter table. */
bool relay_error_is_permanent(rd_kafka_resp_err_t err);

#endif
