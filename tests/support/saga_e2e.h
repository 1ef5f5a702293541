/* saga_e2e: the world of saga-orchestrator's end-to-end tests, and a scripted participant.
 *
 * Each test gets its own database, dev broker, definitions directory, saga-orchestrator and
 * outbox-relay (the real binaries: SAGA_ORCHESTRATOR_BIN, SAGA_RELAY_BIN, SAGA_DEV_BROKER_BIN,
 * set by tests/meson.build). The test itself plays the participants: it reads the commands
 * the relay publishes from saga.outbox (an in-process consumer of the four command topics),
 * checks them, and produces replies with librdkafka, as a participant's relay would. The
 * orchestrator only sees Kafka, so it cannot tell.
 *
 * The definitions directory holds four sagas shaped like sagas/order_fulfillment.json
 * (reserve_inventory, authorize_payment, approve_order (pivot), schedule_shipping):
 * - e2e_order: 10 s timeouts (never reached unless a test wants it), 3 attempts, backoff 50 ms
 *   capped at 200 ms; schedule_shipping is retried without limit (after the pivot);
 * - e2e_timeout: the same, but authorize_payment times out after 2 s and has 2 attempts, so
 *   that timeouts happen within a test's time;
 * - e2e_patient: authorize_payment times out after 2 s and has 100 attempts (for a test that
 *   cannot tell how many attempts time out, e.g. around a restart);
 * - e2e_pivot: approve_order (the pivot) times out after 2 s and has 2 attempts (which do not
 *   limit a pivot).
 *
 * Every wait is bounded; helpers fail the test (with the daemons' logs) when a bound is
 * reached, so tests read as straight-line scripts. */
#ifndef SAGA_TEST_SAGA_E2E_H
#define SAGA_TEST_SAGA_E2E_H

#include <stdbool.h>
#include <stddef.h>

#include <librdkafka/rdkafka.h>
#include <libpq-fe.h>

#include "devbroker.h"
#include "kafka_consume.h"
#include "pgtest.h"
#include "proc.h"

#define SAGA_E2E_REPLY_TOPIC "saga.replies"

struct saga_e2e {
    struct pgtest_db db;
    PGconn *conn;
    struct devbroker broker;
    struct proc orch;
    bool orch_running;
    struct proc relay;
    bool relay_running;
    char sagas_dir[128]; /* the definitions directory written by saga_e2e_setup */
    int admin_port;      /* the orchestrator's admin endpoint (last start) */
    int starts;          /* orchestrator starts so far */
    struct kconsumer *commands;
    rd_kafka_t *producer;
    unsigned char *taken; /* by kmsg index: handed out by saga_e2e_next_command */
    size_t taken_cap;
    size_t redelivered; /* commands skipped as redeliveries (a message-id seen before) */
};

/* A started saga. */
struct saga_ref {
    char id[37];
    char name[64];
    char trace_id[33];
    char correlation_id[128]; /* what the commands must carry: the given one or the saga id */
    char order_id[64];
};

/* Creates the database, broker, definitions, starts the orchestrator (which migrates), then the
 * relay, waits for the orchestrator's consumer to be assigned its partitions, and starts the
 * command consumer and the reply producer. */
void saga_e2e_setup(struct saga_e2e *w);

/* Stops everything (SIGKILL where needed), removes files, drops the database. */
void saga_e2e_teardown(struct saga_e2e *w);

/* Starts the orchestrator (another time) and waits for "saga-orchestrator started". */
void saga_e2e_orch_start(struct saga_e2e *w);

/* SIGTERM; fails the test unless the orchestrator exits 0 within a bound. */
void saga_e2e_orch_stop(struct saga_e2e *w);

/* Prints the orchestrator's and the relay's logs to stderr (for a failing test). */
void saga_e2e_dump(struct saga_e2e *w);

/* Starts a saga with saga.start(name, input, NULL, correlation_id, traceparent) (both may be
 * NULL) and fills *ref. The input is {"orderId": order_id, "customerId": "c-7",
 * "items": [{"sku": "sku-1", "qty": 2}], "amount": 42}. */
void saga_e2e_start(struct saga_e2e *w, const char *name, const char *order_id,
                    const char *correlation_id, const char *traceparent, struct saga_ref *ref);

/* Waits (at most timeout_ms) for the next command of saga_id (NULL: of any saga) not handed out
 * before, in arrival order, marks it handed out and returns it (it lives until teardown).
 * Redeliveries (a message-id seen before: the relay publishes at least once) are skipped, as a
 * participant's inbox would, and counted in w->redelivered. Fails the test on timeout. */
const struct kmsg *saga_e2e_next_command(struct saga_e2e *w, const char *saga_id, int timeout_ms);

/* Checks everything about a command: topic, key (the order id), event-type, the saga headers,
 * idempotency-key, reply-to, correlation-id, traceparent (the saga's trace id), a uuid
 * message-id, and that the value is exactly payload_json (compared as JSON; NULL: not
 * checked). Fails the test with the command's details otherwise. */
void saga_e2e_check_command(const struct kmsg *m, const struct saga_ref *ref, const char *topic,
                            const char *type, const char *step, const char *phase,
                            const char *payload_json);

/* next_command + check_command. */
const struct kmsg *saga_e2e_expect(struct saga_e2e *w, const struct saga_ref *ref,
                                   const char *topic, const char *type, const char *step,
                                   const char *phase, const char *payload_json);

/* Replies to command m as a participant does: to its reply-to topic, key = saga id, headers
 * message-id (message_id, or a new uuid when NULL), in-reply-to, saga-id, outcome, event-type
 * (<type>Replied), correlation-id, traceparent; value data_json. Waits for the broker's ack.
 * Copies the reply's message-id into out_message_id (37 bytes) when not NULL. */
void saga_e2e_reply(struct saga_e2e *w, const struct kmsg *m, const char *outcome,
                    const char *data_json, const char *message_id, char *out_message_id);

/* Produces one raw message to the reply topic: key (may be NULL), value (may be NULL), and
 * headers as name, value pairs ending in NULL. Waits for the broker's ack. */
void saga_e2e_produce_raw(struct saga_e2e *w, const char *key, const char *value, ...)
    __attribute__((sentinel));

/* A fresh random uuid (text form) in out (37 bytes). */
void saga_e2e_uuid(char out[37]);

/* Runs a query of one column and at most one row (the saga id, or any text, as $1 when saga_id
 * is not NULL) and returns its value as a new string ("(null)" for SQL NULL, "(no row)");
 * caller frees. */
char *saga_e2e_value(struct saga_e2e *w, const char *sql, const char *saga_id);

/* Waits (at most timeout_ms) until the one-value query (saga id as $1) returns want; fails the
 * test with the last value and the logs otherwise. */
void saga_e2e_wait_value(struct saga_e2e *w, const char *sql, const char *saga_id, const char *want,
                         int timeout_ms);

/* Waits until the saga's status is want. */
void saga_e2e_wait_status(struct saga_e2e *w, const struct saga_ref *ref, const char *want,
                          int timeout_ms);

/* The saga's command history, "step:phase:attempt:status" for each saga.step_history row of
 * phase action or compensation, in insertion order, separated by spaces (caller frees). */
char *saga_e2e_history(struct saga_e2e *w, const char *saga_id);

/* Checks that the commands published for the saga (redeliveries aside) are exactly the ones
 * saga.step_history says were sent, in that order (same message-ids), that every one was handed out
 * by saga_e2e_next_command, and that saga.outbox holds nothing of it any more. Waits (bounded) for
 * the stragglers to arrive first. */
void saga_e2e_check_all_commands(struct saga_e2e *w, const struct saga_ref *ref);

/* GET path on the orchestrator's admin endpoint; returns the HTTP status and the body (caller
 * frees), or 0 when it does not answer. */
int saga_e2e_http_get(struct saga_e2e *w, const char *path, char **body);

/* Waits (bounded) until the orchestrator's /readyz answers 200; fails the test with its last
 * answer otherwise. */
void saga_e2e_wait_ready(struct saga_e2e *w, int timeout_ms);

/* The value of the orchestrator's metrics series ("name{labels}" exactly as printed), or -1. */
double saga_e2e_metric(struct saga_e2e *w, const char *series);

/* Waits (bounded) until the metric series reaches at least value; fails the test otherwise. */
void saga_e2e_wait_metric(struct saga_e2e *w, const char *series, double value, int timeout_ms);

#endif
