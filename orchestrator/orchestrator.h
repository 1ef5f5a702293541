/* orchestrator: the saga-orchestrator daemon's shared types. See ARCHITECTURE.md.
 *
 * Two workers, each with its own nonblocking PostgreSQL session:
 * - the claim worker runs batches of due work (new sagas, deadlines, operator requests),
 *   claimed with FOR UPDATE SKIP LOCKED so that several orchestrators share it;
 * - the reply worker applies batches of replies consumed from Kafka, deduplicated by
 *   (message-id, in-reply-to): an applied reply is on the step_history row of the attempt it
 *   answers, the others in saga.inbox; the consumer offsets are committed only after that
 *   transaction commits.
 * Both persist exactly what the pure engine returns (saga.apply_batch), in one transaction
 * per batch. A batch that fails is run again after a pause (transient SQLSTATE) or bisected
 * down to the one reply (dead-lettered) or saga (left alone for a while) that fails on its
 * own (worker.c). */
#ifndef SAGA_ORCHESTRATOR_H
#define SAGA_ORCHESTRATOR_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <cjson/cJSON.h>
#include <ev.h>
#include <librdkafka/rdkafka.h>

#include "definition.h"
#include "engine.h"
#include "pgloop.h"

struct orch_settings {
    char *database_url;
    char *kafka_brokers;
    char *definitions_dir;
    char *admin_addr;
    char *log_level;
    char *group_id;
    int batch_size;
    int64_t poll_ms;
    int64_t reconnect_max_ms;
};

/* Every definition version the database knows, parsed. */
struct registry {
    struct saga_definition **defs;
    size_t count;
};

/* Loads the definitions directory (exit 2 on any error), registers each (name, version) with
 * saga.register_definition, then loads every registered version from saga.definitions (one
 * this binary cannot parse is skipped with a warning: its sagas are left to others).
 * Blocking: runs before the loop, or on the reload thread. Returns 0, or -1 with err (every
 * error, one per line). */
__attribute__((warn_unused_result)) int registry_load(struct registry *reg, const char *conninfo,
                                                      const char *dir, char *err, size_t errlen);
const struct saga_definition *registry_find(const struct registry *reg, const char *name,
                                            int version);
void registry_clear(struct registry *reg);

/* A saga row as read from saga.instances, turned into engine state. */
struct saga_row {
    struct saga_state state;
    const struct saga_definition *def;
    char name[128];
    int version;
    char pending_request[16]; /* "", "retry" or "abort" */
    char *request_reason;     /* owned */
    bool touched;             /* an event was applied: persist it */
    bool clear_request;
};

/* Column list and reader for saga.instances (orchestrator/store.c). store_read_row returns
 * 0, -1 for a row that cannot be read, -2 when its definition version is not loaded. */
extern const char *const store_instance_columns;
__attribute__((warn_unused_result)) int store_read_row(const struct registry *reg, void *res,
                                                       int row, struct saga_row *out, char *err,
                                                       size_t errlen);
void store_row_clear(struct saga_row *row);

/* Accumulates one batch's persistence document for saga.apply_batch: one JSON text per
 * array of the document (the sections), joined by store_batch_finish. Every add function
 * returns 0, or -1 when out of memory (the batch must then be cleared). */
enum store_section {
    STORE_INSTANCES,
    STORE_SENT,
    STORE_RESOLVED,
    STORE_OUTBOX,
    STORE_IGNORED,
    STORE_INBOX,
    STORE_DEAD_LETTERS,
    STORE_SECTIONS
};
struct store_text {
    char *text; /* owned: the array's elements, comma-separated, without the brackets */
    size_t len, cap;
    bool failed; /* an append ran out of memory */
};
struct store_batch {
    struct store_text sec[STORE_SECTIONS];
};
__attribute__((warn_unused_result)) int store_batch_init(struct store_batch *b);
/* Adds the effects of one applied event (fx borrowed). reply_message_id: the message-id of the
 * reply the event is (NULL for other events), recorded on the attempt it resolves, where the
 * reply's deduplication finds it (sql/011). */
__attribute__((warn_unused_result)) int store_batch_add_effects(struct store_batch *b,
                                                                const struct saga_row *row,
                                                                const struct saga_effects *fx,
                                                                const char *reply_message_id);
/* Adds the final state of a touched saga. */
__attribute__((warn_unused_result)) int store_batch_add_instance(struct store_batch *b,
                                                                 const struct saga_row *row);
/* A reply's inbox record (one not applied: sql/011); disposition: ignored or unknown. */
__attribute__((warn_unused_result)) int
store_batch_add_inbox(struct store_batch *b, const char *message_id, const char *in_reply_to,
                      const char *saga_id, const char *topic, int partition, int64_t offset,
                      const char *disposition);
/* A reply the saga was not waiting for (reply borrowed, may be NULL). */
__attribute__((warn_unused_result)) int store_batch_add_ignored(struct store_batch *b,
                                                                const char *in_reply_to,
                                                                const char *saga_id,
                                                                const cJSON *reply);
/* A malformed reply for saga.dead_letters (key_text and payload may be NULL: omitted;
 * headers borrowed). */
__attribute__((warn_unused_result)) int
store_batch_add_dead_letter(struct store_batch *b, const char *topic, int partition, int64_t offset,
                            const char *key_text, const cJSON *headers, const char *payload,
                            const char *error);
/* Renders the document (caller frees; NULL when out of memory) and clears the batch. */
char *store_batch_finish(struct store_batch *b);
void store_batch_clear(struct store_batch *b);

/* A reply consumed from Kafka. */
struct reply_msg {
    rd_kafka_message_t *msg; /* owned until the offsets are committed */
    char message_id[SAGA_UUID_LEN + 1];
    char in_reply_to[SAGA_UUID_LEN + 1];
    char saga_id[SAGA_UUID_LEN + 1];
    bool success;
    /* The trace-id of the traceparent header (32 lowercase hex digits), "" when the header is
     * missing or malformed. Never a reason to refuse a reply: compared with the saga's trace
     * id only to count and log replies that left the trace (worker.c). */
    char trace_id[33];
    char traceparent[64]; /* the header as received (reply_text, cut), "" when missing */
    cJSON *data;          /* owned */
    char *error;          /* owned: why it is malformed, NULL when well-formed */
};

/* Parses a consumed message; never fails: a malformed one gets error set. Takes ownership
 * of msg. */
void reply_parse(rd_kafka_message_t *msg, struct reply_msg *out);
void reply_clear(struct reply_msg *r);
/* A copy of n bytes of Kafka data (a key, a value, a header) as text PostgreSQL accepts:
 * invalid UTF-8 and NUL bytes become U+FFFD. Caller frees; NULL when out of memory. */
char *reply_text(const void *data, size_t n);

struct orchestrator;

/* The two workers (orchestrator/worker.c). */
struct worker;
struct worker *worker_create(struct orchestrator *o, bool replies);
void worker_start(struct worker *w);
void worker_kick(struct worker *w);
bool worker_idle(const struct worker *w);
bool worker_ready(const struct worker *w);
void worker_destroy(struct worker *w);

struct orchestrator {
    struct ev_loop *loop;
    struct orch_settings settings;
    struct registry registry;
    struct saga_engine_env env;
    struct worker *claimer;
    struct worker *replier;
    rd_kafka_t *consumer;
    int consumer_fds[2];
    ev_io consumer_io;
    ev_timer consumer_timer;
    struct reply_msg *pending; /* consumed, not yet applied */
    size_t pending_count, pending_cap;
    bool stopping;
    bool kafka_up;
    /* Partitions the reply consumer holds now. While it holds none (a rebalance, a restart whose
     * killed predecessor still sits in the group until its session times out) no reply can
     * arrive, so reply timeouts are not fired: a timeout measures the participant, not our own
     * deafness. */
    int assigned_partitions;
};

/* Consumer (orchestrator/replies.c). */
/* Checks the consumer's configuration (KAFKA_* variables included) without creating it, so
 * that a bad one is refused before the database is touched. */
__attribute__((warn_unused_result)) int replies_check_config(const struct orch_settings *st,
                                                             char *err, size_t errlen);
__attribute__((warn_unused_result)) int replies_start(struct orchestrator *o, char *err,
                                                      size_t errlen);
/* Subscribes to the reply topics of every loaded definition (after a reload). */
__attribute__((warn_unused_result)) int replies_resubscribe(struct orchestrator *o);
/* Polls what is available into o->pending (bounded). */
void replies_poll(struct orchestrator *o);
/* Commits the offsets of the first n pending replies and drops them. */
void replies_commit(struct orchestrator *o, size_t n);
void replies_stop(struct orchestrator *o);

int64_t orch_now_ms(void);

/* Reloads the definitions in the background (as SIGHUP does): a saga references a version
 * another orchestrator registered after this one started. */
void orch_request_reload(void);

#endif
