/* engine: the saga state machine. Pure: no I/O, no clock, no randomness of its own.
 *
 * Given a definition, a saga's state and an event, saga_engine_apply() updates the state and
 * returns what must be persisted with it, in one transaction: the commands to write into the
 * outbox, the step-history rows to insert or update, and the next deadline (in the state).
 * The orchestrator persists exactly that and nothing else.
 *
 * Semantics (see README "Saga semantics"):
 * - Steps run in order. A step before the pivot is compensatable: a failure reply starts
 *   compensation of the steps that succeeded before it; a timeout is retried with exponential
 *   backoff up to retry.max_attempts, then compensation starts with the timed-out step itself
 *   (it may have been applied).
 * - The pivot: a failure reply compensates the steps before it (the pivot did not apply); a
 *   timeout is retried without limit (it may have applied and cannot be compensated).
 * - Steps after the pivot: failures and timeouts are retried without limit, with backoff.
 * - Compensations run in reverse order, skipping steps without one; each is retried with
 *   backoff (failure reply or timeout) up to its retry.max_attempts, then the saga is
 *   `failed` and waits for an operator: RETRY resumes the same compensation with a fresh
 *   budget.
 * - ABORT: a pending saga is compensated at once; a running saga compensates every step whose
 *   action was sent, the current one included; a saga whose pivot was sent cannot be aborted.
 * - A reply whose in_reply_to is not the message the saga waits for is ignored (stale). */
#ifndef SAGA_ENGINE_H
#define SAGA_ENGINE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <cjson/cJSON.h>

#include "definition.h"

#define SAGA_UUID_LEN 36 /* text form, without the NUL */

enum saga_status {
    SAGA_PENDING,
    SAGA_RUNNING,
    SAGA_COMPENSATING,
    SAGA_COMPLETED,   /* terminal */
    SAGA_COMPENSATED, /* terminal */
    SAGA_FAILED,      /* compensation budget exhausted; waits for RETRY */
};

enum saga_phase { SAGA_PHASE_ACTION, SAGA_PHASE_COMPENSATION };

/* What the saga waits for now. */
enum saga_wait {
    SAGA_WAIT_NONE,    /* pending, terminal or failed */
    SAGA_WAIT_REPLY,   /* the message waiting_message_id was sent; deadline = its timeout */
    SAGA_WAIT_BACKOFF, /* a resend of (step, phase) is due at deadline */
};

struct saga_state {
    char id[SAGA_UUID_LEN + 1];
    enum saga_status status;
    int step; /* index of the current step (action) or compensation cursor */
    enum saga_phase phase;
    int attempt;     /* sends of (step, phase) so far; history numbers them 1, 2, ... */
    int budget_base; /* attempt count when the retry budget was last reset (RETRY) */
    enum saga_wait wait;
    char waiting_message_id[SAGA_UUID_LEN + 1]; /* "" unless wait == SAGA_WAIT_REPLY */
    int64_t deadline_ms;                        /* 0: none; else unix ms when TIMEOUT is due */
    int pivot_sent;                             /* 1 once the pivot's action has been sent */
    cJSON *input;                               /* owned: the saga input object */
    cJSON *replies;       /* owned: object step name -> reply data of the succeeded action */
    char *correlation_id; /* owned, may be NULL (then the saga id is used) */
    char *trace_id;       /* owned: 32 lowercase hex digits (W3C trace-id) */
    char *error;          /* owned, may be NULL: why the saga compensates or failed */
};

enum saga_event_kind {
    SAGA_EV_START,   /* a pending saga begins */
    SAGA_EV_REPLY,   /* a participant replied */
    SAGA_EV_TIMEOUT, /* the state's deadline passed */
    SAGA_EV_ABORT,   /* operator: compensate now */
    SAGA_EV_RETRY,   /* operator: resume a failed saga */
};

struct saga_event {
    enum saga_event_kind kind;
    int64_t now_ms;          /* the caller's clock, unix ms */
    const char *in_reply_to; /* REPLY: the command's message-id (borrowed) */
    bool success;            /* REPLY: outcome */
    const cJSON *reply;      /* REPLY: reply data (borrowed, may be NULL) */
    const char *reason;      /* ABORT: operator's reason (borrowed, may be NULL) */
};

/* Never freed one by one: name is a static string (the engine's constant header names);
 * value lives in the message's headers allocation (see saga_message). */
struct saga_header {
    const char *name;
    char *value;
};

/* One message to write into the orchestrator's outbox. The engine makes every message and
 * saga_effects_clear() frees it: topic, type and the headers' values live in the headers'
 * one allocation (not to be freed one by one); the headers' names are static strings. */
struct saga_message {
    char message_id[SAGA_UUID_LEN + 1];
    char *topic;                 /* in the headers' allocation */
    char *key;                   /* owned */
    char *type;                  /* in the headers' allocation: event-type */
    char *payload;               /* owned: rendered JSON text */
    struct saga_header *headers; /* owned array: every header the spec lists */
    size_t header_count;
    int step;
    enum saga_phase phase;
    int attempt;
};

/* One step-history change. SENT inserts a row; the others update the row of message_id. */
enum saga_history_status {
    SAGA_HIST_SENT,
    SAGA_HIST_SUCCEEDED,
    SAGA_HIST_FAILED,
    SAGA_HIST_TIMED_OUT,
};

struct saga_history_entry {
    enum saga_history_status status;
    int step;
    enum saga_phase phase;
    int attempt;
    char message_id[SAGA_UUID_LEN + 1];
    cJSON *reply; /* owned, may be NULL: the reply data of SUCCEEDED / FAILED */
};

enum saga_outcome {
    SAGA_APPLIED,  /* the event changed the state; persist the state and effects */
    SAGA_IGNORED,  /* stale reply, early or stale timeout, event for a terminal saga: nothing */
    SAGA_REJECTED, /* an operator request that does not apply (reason in effects.error) */
};

struct saga_effects {
    enum saga_outcome outcome;
    struct saga_message *messages; /* owned array */
    size_t message_count;
    struct saga_history_entry *history; /* owned array */
    size_t history_count;
    char error[256]; /* REJECTED: why */
};

/* Where new message ids come from: a fresh random uuid in production, a counter in tests. */
struct saga_engine_env {
    void (*new_uuid)(char out[SAGA_UUID_LEN + 1], void *arg);
    void *arg;
};

/* Initialises a pending saga. Takes ownership of input (an object); copies the strings.
 * correlation_id may be NULL; trace_id may be NULL (then derived from the saga id). */
void saga_state_init(struct saga_state *state, const char *id, cJSON *input,
                     const char *correlation_id, const char *trace_id);

/* Frees what the state owns (not the state itself). */
void saga_state_clear(struct saga_state *state);

/* Applies ev. On return *fx holds the effects (release with saga_effects_clear()), whatever
 * the outcome. Returns 0, or -1 on allocation failure or a malformed template (the state is
 * then unchanged). def, ev and env are borrowed. */
__attribute__((warn_unused_result)) int saga_engine_apply(const struct saga_definition *def,
                                                          struct saga_state *state,
                                                          const struct saga_event *ev,
                                                          const struct saga_engine_env *env,
                                                          struct saga_effects *fx);

/* Frees what the effects own and zeroes them. */
void saga_effects_clear(struct saga_effects *fx);

/* True for completed and compensated: such a saga never changes again. */
bool saga_status_is_terminal(enum saga_status status);

/* Names as they appear in saga.instances.status / step_history.phase / .status. */
const char *saga_status_name(enum saga_status status);
int saga_status_parse(const char *name, enum saga_status *out);
const char *saga_phase_name(enum saga_phase phase);
const char *saga_history_status_name(enum saga_history_status status);

/* Fills out with a fresh random (v4) uuid: the production saga_engine_env.new_uuid. */
void saga_uuid_random(char out[SAGA_UUID_LEN + 1], void *arg);

#endif
