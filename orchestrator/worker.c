/* worker: one PostgreSQL session that runs the orchestrator's transactions, one batch at a
 * time, as a small state machine driven by pgloop callbacks.
 *
 * Claim worker:  BEGIN; SELECT ... FOR UPDATE SKIP LOCKED (pending sagas, due deadlines,
 *                operator requests, of the definition versions this process has loaded) ->
 *                engine -> saga.apply_batch -> COMMIT
 * Reply worker:  BEGIN; SELECT ... FOR UPDATE (the sagas of the batch, in id order) ->
 *                SELECT seen before (inbox, step_history) -> engine -> saga.apply_batch ->
 *                COMMIT -> commit the Kafka offsets
 *
 * Crash at any point before COMMIT: the transaction rolls back, nothing was sent (the
 * commands are outbox rows of the same transaction), and the same work is claimed or
 * consumed again. Crash after COMMIT and before the offset commit: the replies come again
 * and the deduplication (an applied reply is on its attempt's step_history row, the others in
 * the inbox; and the engine's in-reply-to check) drops them.
 *
 * When a statement fails on a live connection, the transaction is rolled back and the
 * failure is classified by its SQLSTATE (sqlstate_transient):
 * - transient (connection, serialization, deadlock, resources, a lock timeout, a missing
 *   grant or function...): the same batch is tried again after a pause that doubles from
 *   500 ms up to SAGA_RECONNECT_MAX, and nothing else runs meanwhile (state W_WAIT);
 * - deterministic (a constraint, a trigger that raises, bad data): the batch is bisected.
 *   Its first half runs alone, then the rest, down to the one reply or saga that fails on
 *   its own. That reply goes to saga.dead_letters (dead_letter) and its offset is committed
 *   with the others; that saga is left alone for a while (quarantine) and claimed again
 *   later, as a workflow task that fails is retried with backoff in Temporal.
 *
 * Dead-lettering a reply, step by step, and what a crash between the steps does:
 * 1. the batch fails and rolls back; bisection runs smaller batches, each committed (with
 *    its offsets) or rolled back as above. Crash: the uncommitted replies come again and
 *    the bisection starts over; the committed ones are dropped as seen before.
 * 2. the reply fails alone and rolls back. Crash: it comes again, step 1.
 * 3. INSERT INTO saga.dead_letters, in its own transaction. Crash before its commit: as 2.
 *    Crash after it: the reply comes again, fails again, and its second dead letter is
 *    dropped by the unique index on (topic, partition, offset).
 * 4. its offset is committed (replies_commit), only after step 3 committed. Crash before:
 *    as after step 3. The offset of a reply is never committed before the reply was
 *    applied, recorded or dead-lettered in a committed transaction. */
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <libpq-fe.h>

#include "log.h"
#include "metrics.h"
#include "orchestrator.h"

/* W_WAIT: connected, pausing after a transient failure; only the timer ends it (a kick, a
 * notification or newly consumed replies do not). */
enum wstate { W_DOWN, W_CONNECTING, W_LISTEN, W_IDLE, W_BUSY, W_WAIT };

/* What to do once the failed transaction is rolled back. */
enum wfail { F_NONE, F_PAUSE, F_BISECT, F_PREFIX };

#define RETRY_FIRST_MS 500
#define QUARANTINE_FIRST_MS 10000
#define QUARANTINE_MAX_MS 300000
#define UNKNOWN_VERSION_WARN_MS 60000
/* Batches in a row refused with SQLSTATE 25006 before the session is closed and opened again. */
#define READ_ONLY_RECONNECT 3

/* A saga whose transaction failed on its own: not claimed before until_ms. */
struct quarantined {
    char id[SAGA_UUID_LEN + 1];
    int64_t until_ms;
    int64_t backoff_ms;
};

/* A definition version some in-flight sagas use and this process has not loaded. */
struct unknown_version {
    char name[128];
    int version;
    int64_t warned_ms;
};

struct worker {
    struct orchestrator *o;
    bool replies;
    const char *name;
    struct pgloop *pg;
    enum wstate state;
    ev_timer timer;
    ev_idle kick;
    int64_t backoff_ms;
    bool more;
    /* the batch in flight */
    struct saga_row *rows;
    size_t row_count;
    size_t reply_count; /* replies of o->pending in this batch */
    char *apply_doc;
    uint64_t started, completed, compensated, failed, deadlines, applied, duplicates, late, unknown,
        malformed, trace_mismatches;
    int64_t counted_ms; /* when saga_sagas_in_flight was last measured */
    /* check_trace's warnings, per kind: when the last was written, how many not since. */
    int64_t trace_warned_ms[3];
    uint64_t trace_unwritten[3];
    /* The failure being handled: set by failed(), acted upon once ROLLBACK returns. */
    enum wfail fail;
    size_t fail_items; /* replies or sagas in the failed batch */
    char fail_state[6];
    char *fail_error; /* owned */
    int64_t retry_ms; /* the next pause after a transient failure; 0 after a success */
    int read_only;    /* batches in a row refused as read-only (25006) on this session */
    /* Bisection. Replies: the first `suspect` of o->pending hold one that fails (0: none
     * known), and the next batch takes at most `limit` of them (0: SAGA_BATCH_SIZE). Claims:
     * the ids of the failed batch, of which the first try_count are claimed next. */
    size_t suspect, limit;
    char (*suspects)[SAGA_UUID_LEN + 1];
    size_t suspect_count, try_count;
    bool trying_suspects; /* the claim in flight is of suspects */
    struct quarantined *quarantine;
    size_t quarantine_count;
    struct unknown_version *unknown_versions;
    size_t unknown_version_count;
    int64_t reload_ms; /* when a reload was last requested for unknown versions */
    /* The text of the claim prepared as saga_claim on this session (owned; NULL: none, or
     * not known to be), and the one being prepared by the claim in flight (owned). */
    char *claim_prepared;
    char *claim_preparing;
    /* A reply worker's two statements (saga_lock, saga_dedupe) are prepared on this session. */
    bool replies_prepared;
};

int64_t orch_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void step(struct worker *w);

/* The claim prepared on the session is gone or not known to be there any more. */
static void forget_claim(struct worker *w)
{
    free(w->claim_prepared);
    free(w->claim_preparing);
    w->claim_prepared = w->claim_preparing = NULL;
    w->replies_prepared = false;
}

static void schedule(struct worker *w, int64_t ms)
{
    ev_timer_stop(w->o->loop, &w->timer);
    ev_timer_set(&w->timer, (double)ms / 1000.0, 0.0);
    ev_timer_start(w->o->loop, &w->timer);
}

void worker_kick(struct worker *w)
{
    if (w && !ev_is_active(&w->kick))
        ev_idle_start(w->o->loop, &w->kick);
}

static void batch_reset(struct worker *w)
{
    for (size_t i = 0; i < w->row_count; i++)
        store_row_clear(&w->rows[i]);
    free(w->rows);
    w->rows = NULL;
    w->row_count = 0;
    w->reply_count = 0;
    free(w->apply_doc);
    w->apply_doc = NULL;
    w->started = w->completed = w->compensated = w->failed = w->deadlines = 0;
    w->applied = w->duplicates = w->late = w->unknown = w->malformed = w->trace_mismatches = 0;
}

/* The session is gone or unusable: close it and connect again after a pause that doubles up
 * to SAGA_RECONNECT_MAX (reset once a session is set up: listen_cb). */
static void reconnect_later(struct worker *w)
{
    pgloop_close(w->pg);
    w->read_only = 0;
    forget_claim(w); /* prepared statements go with the session */
    batch_reset(w);  /* the server rolled the transaction back */
    w->fail = F_NONE;
    w->state = W_DOWN;
    metrics_counter_add("saga_db_reconnects_total", NULL, 1);
    schedule(w, w->backoff_ms);
    w->backoff_ms = w->backoff_ms * 2 > w->o->settings.reconnect_max_ms
                        ? w->o->settings.reconnect_max_ms
                        : w->backoff_ms * 2;
}

static void lost(struct worker *w)
{
    log_at(LOG_WARN, LOG_FIELDS("worker", w->name, "error", pgloop_error(w->pg)),
           "database connection lost or refused; retrying");
    reconnect_later(w);
}

/* Whether a failed statement may well succeed when the same batch runs again later: the
 * failure lies with the server or the deployment, not with a reply or a saga of the batch.
 * Bisecting such a failure would dead-letter good replies one by one (a revoked grant or a
 * missing migration fails every one of them). Unknown or absent SQLSTATE: transient too. */
static bool sqlstate_transient(const char *state)
{
    if (!state || strlen(state) != 5)
        return true;
    static const char *const classes[] = {
        "08", /* connection exception */
        "25", /* invalid transaction state: ours (a read-only session after a failover too) */
        "40", /* serialization failure, deadlock */
        "53", /* insufficient resources */
        "57", /* operator intervention: shutdown, cancel, statement timeout */
        "58", /* system error (I/O) */
        "XX", /* internal error */
        "28", /* authorization */
        "3D", /* invalid catalog */
        "3F", /* invalid schema */
        "42", /* undefined table or function, insufficient privilege: the deployment */
        "0A", /* feature not supported */
        "26", /* invalid SQL statement name: a prepared statement gone (a pooler between us) */
    };
    for (size_t i = 0; i < sizeof(classes) / sizeof(classes[0]); i++)
        if (!strncmp(state, classes[i], 2))
            return true;
    return !strcmp(state, "55P03") /* lock not available */ ||
           !strcmp(state, "55006") /* object in use */;
}

/* After a transient failure: the same work again once the pause is over. */
static void pause_retry(struct worker *w)
{
    int64_t cap = w->o->settings.reconnect_max_ms;
    if (w->retry_ms <= 0)
        w->retry_ms = RETRY_FIRST_MS < cap ? RETRY_FIRST_MS : cap;
    char labels[64];
    snprintf(labels, sizeof(labels), "worker=\"%s\"", w->name);
    metrics_counter_add("saga_transaction_retries_total", labels, 1);
    log_at(LOG_WARN, LOG_FIELDS("worker", w->name, "sqlstate", w->fail_state),
           "transient failure; retrying in %" PRId64 " ms", w->retry_ms);
    w->state = W_WAIT;
    schedule(w, w->retry_ms);
    w->retry_ms = w->retry_ms * 2 > cap ? cap : w->retry_ms * 2;
}

static struct quarantined *quarantine_find(struct worker *w, const char *id)
{
    for (size_t i = 0; i < w->quarantine_count; i++)
        if (!strcmp(w->quarantine[i].id, id))
            return &w->quarantine[i];
    return NULL;
}

/* A saga whose transaction fails on its own: not claimed for a while (doubling each time
 * it fails again), so that it cannot hold back the others. Kept in memory only: another
 * orchestrator, or this one after a restart, tries it again sooner, which is harmless. */
static void quarantine_add(struct worker *w, const char *id)
{
    struct quarantined *q = quarantine_find(w, id);
    if (!q) {
        struct quarantined *grown =
            realloc(w->quarantine, (w->quarantine_count + 1) * sizeof(*grown));
        if (!grown) {
            log_error("out of memory");
            abort();
        }
        w->quarantine = grown;
        q = &w->quarantine[w->quarantine_count++];
        memset(q, 0, sizeof(*q));
        snprintf(q->id, sizeof(q->id), "%s", id);
        q->backoff_ms = QUARANTINE_FIRST_MS;
    } else {
        q->backoff_ms =
            q->backoff_ms * 2 > QUARANTINE_MAX_MS ? QUARANTINE_MAX_MS : q->backoff_ms * 2;
    }
    q->until_ms = orch_now_ms() + q->backoff_ms;
    char secs[32];
    snprintf(secs, sizeof(secs), "%" PRId64, q->backoff_ms / 1000);
    metrics_counter_add("saga_sagas_quarantined_total", NULL, 1);
    log_at(LOG_ERROR,
           LOG_FIELDS("saga_id", id, "sqlstate", w->fail_state, "error", w->fail_error,
                      "retry_in_seconds", secs),
           "a saga's transaction fails on its own; the saga is left alone for a while, the "
           "others go on");
}

/* The sagas of a batch that committed: their quarantine is over. */
static void quarantine_release(struct worker *w)
{
    for (size_t r = 0; r < w->row_count; r++)
        for (size_t i = 0; i < w->quarantine_count; i++)
            if (!strcmp(w->quarantine[i].id, w->rows[r].state.id)) {
                w->quarantine[i] = w->quarantine[--w->quarantine_count];
                break;
            }
}

static void dead_letter(struct worker *w);
static void bisect(struct worker *w);

static void rollback_cb(struct pgloop *pg, PGresult *res, void *arg)
{
    struct worker *w = arg;
    if (!res)
        return;
    enum wfail f = w->fail;
    w->fail = F_NONE;
    w->state = W_IDLE;
    if (f == F_BISECT)
        bisect(w);
    else if (f == F_PREFIX)
        worker_kick(w); /* w->limit is set: the replies before the one we cannot apply */
    else
        pause_retry(w);
}

/* A statement failed on a live connection: roll back, then retry after a pause (transient)
 * or bisect the batch (deterministic). */
static void failed(struct worker *w, PGresult *res, const char *what)
{
    if (!res)
        return; /* connection lost: state_cb follows */
    const char *state = PQresultErrorField(res, PG_DIAG_SQLSTATE);
    const char *primary = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);
    size_t items = w->replies ? w->reply_count : w->row_count;
    bool transient = sqlstate_transient(state) || items == 0;
    snprintf(w->fail_state, sizeof(w->fail_state), "%s", state ? state : "");
    free(w->fail_error);
    size_t len = strlen(what) + (primary ? strlen(primary) : 0) + 64;
    w->fail_error = malloc(len);
    if (!w->fail_error) {
        log_error("out of memory");
        abort();
    }
    snprintf(w->fail_error, len, "%s failed (SQLSTATE %s): %s", what, state ? state : "none",
             primary ? primary : "no message");
    w->fail_items = items;
    w->fail = transient ? F_PAUSE : F_BISECT;
    /* The reply statements are prepared again with the next batch, whatever failed: some
     * failures stick to a prepared statement ("cached plan must not change result type" after
     * another version's migration, at every EXECUTE). */
    w->replies_prepared = false;
    /* A session on a server that refuses writes (a standby in recovery, reached after a
     * failover; a primary fenced with default_transaction_read_only) refuses every batch,
     * and nothing changes for as long as the connection lasts. After a few refusals in a
     * row the session is closed and opened again, with the reconnection's backoff: a
     * connection string with several hosts and target_session_attrs=read-write (or a name
     * that moved) then reaches the primary. The pauses between the refusals keep growing
     * across sessions (retry_ms is reset only by a commit). */
    w->read_only = state && !strcmp(state, "25006") ? w->read_only + 1 : 0;
    if (w->read_only >= READ_ONLY_RECONNECT) {
        char count[16];
        snprintf(count, sizeof(count), "%d", w->read_only);
        log_at(LOG_WARN,
               LOG_FIELDS("worker", w->name, "sqlstate", w->fail_state, "error",
                          PQresultErrorMessage(res), "refusals", count),
               "the database refuses writes (a server in recovery or read-only); reconnecting "
               "to find a primary");
        reconnect_later(w); /* the server rolls the transaction back with the session */
        return;
    }
    if (!transient && !w->replies) {
        /* The ids of the failed claim: the suspects bisection claims by halves. */
        free(w->suspects);
        w->suspects = malloc(items * sizeof(*w->suspects));
        if (!w->suspects) {
            log_error("out of memory");
            abort();
        }
        for (size_t i = 0; i < items; i++)
            memcpy(w->suspects[i], w->rows[i].state.id, sizeof(w->suspects[i]));
        w->suspect_count = items;
    }
    char count[32];
    snprintf(count, sizeof(count), "%zu", items);
    log_at(transient ? LOG_WARN : LOG_ERROR,
           LOG_FIELDS("worker", w->name, "sqlstate", w->fail_state, "error",
                      PQresultErrorMessage(res), "batch", count),
           "%s failed; rolling back (%s)", what,
           transient ? "transient: the batch runs again after a pause"
                     : "the batch is bisected to find what fails");
    batch_reset(w);
    if (pgloop_query_simple(w->pg, "ROLLBACK", rollback_cb, w))
        w->state = W_IDLE;
}

/* After a deterministic failure of a batch of fail_items: run its first half alone, or, for
 * one item, set it aside. */
static void bisect(struct worker *w)
{
    size_t n = w->fail_items;
    if (w->replies) {
        if (n > 1) {
            w->suspect = n;
            w->limit = n / 2;
            worker_kick(w);
        } else {
            dead_letter(w);
        }
        return;
    }
    if (n > 1) {
        w->try_count = n / 2;
    } else {
        if (w->suspect_count)
            quarantine_add(w, w->suspects[0]);
        w->suspect_count = w->try_count = 0;
    }
    w->more = true;
    worker_kick(w);
}

static bool ok(PGresult *res)
{
    return res &&
           (PQresultStatus(res) == PGRES_COMMAND_OK || PQresultStatus(res) == PGRES_TUPLES_OK);
}

static void count_transition(struct worker *w, enum saga_status before, enum saga_status after)
{
    if (before == after)
        return;
    if (after == SAGA_COMPLETED)
        w->completed++;
    else if (after == SAGA_COMPENSATED)
        w->compensated++;
    else if (after == SAGA_FAILED)
        w->failed++;
    if (before == SAGA_PENDING && after != SAGA_PENDING)
        w->started++;
}

static void commit_cb(struct pgloop *pg, PGresult *res, void *arg)
{
    struct worker *w = arg;
    if (!ok(res)) {
        failed(w, res, "commit");
        return;
    }
    metrics_counter_add("saga_sagas_started_total", NULL, w->started);
    metrics_counter_add("saga_sagas_completed_total", NULL, w->completed);
    metrics_counter_add("saga_sagas_compensated_total", NULL, w->compensated);
    metrics_counter_add("saga_sagas_failed_total", NULL, w->failed);
    metrics_counter_add("saga_deadlines_fired_total", NULL, w->deadlines);
    metrics_counter_add("saga_replies_total", "result=\"applied\"", w->applied);
    metrics_counter_add("saga_replies_total", "result=\"duplicate\"", w->duplicates);
    metrics_counter_add("saga_replies_total", "result=\"late\"", w->late);
    metrics_counter_add("saga_replies_total", "result=\"unknown\"", w->unknown);
    metrics_counter_add("saga_replies_total", "result=\"malformed\"", w->malformed);
    metrics_counter_add("saga_replies_trace_mismatch_total", NULL, w->trace_mismatches);
    metrics_histogram_observe("saga_batch_sagas", NULL, (double)w->row_count);
    size_t replies = w->reply_count;
    bool full = w->row_count >= (size_t)w->o->settings.batch_size;
    if (!w->replies)
        quarantine_release(w);
    batch_reset(w);
    w->state = W_IDLE;
    w->backoff_ms = 100;
    w->retry_ms = 0;
    w->read_only = 0;
    if (w->replies) {
        /* Bisecting: what failed is among the rest of the suspects; try its first half. */
        w->suspect = w->suspect > replies ? w->suspect - replies : 0;
        w->limit = w->suspect > 1 ? w->suspect / 2 : w->suspect;
        replies_commit(w->o, replies); /* only now: the replies are applied for good */
    } else if (w->trying_suspects) {
        size_t done = w->try_count < w->suspect_count ? w->try_count : w->suspect_count;
        memmove(w->suspects, w->suspects + done, (w->suspect_count - done) * sizeof(*w->suspects));
        w->suspect_count -= done;
        w->try_count = w->suspect_count > 1 ? w->suspect_count / 2 : w->suspect_count;
        w->more = true;
    } else {
        /* A notification read while the claim ran stays: its saga may have committed after
         * the claim's snapshot (it comes with the COMMIT's answer, since a backend forwards
         * notifications only between transactions). Overwriting it left that saga to the next
         * poll; keeping one that the claim had seen costs one claim that finds nothing. */
        w->more = w->more || full;
    }
    worker_kick(w);
}

static void apply_cb(struct pgloop *pg, PGresult *res, void *arg)
{
    struct worker *w = arg;
    if (!ok(res)) {
        failed(w, res, "saga.apply_batch");
        return;
    }
    if (pgloop_query_simple(w->pg, "COMMIT", commit_cb, w))
        return;
}

static void send_apply(struct worker *w, struct store_batch *b)
{
    for (size_t i = 0; i < w->row_count; i++)
        if (w->rows[i].touched && store_batch_add_instance(b, &w->rows[i])) {
            log_error("out of memory building a batch");
            abort();
        }
    w->apply_doc = store_batch_finish(b);
    if (!w->apply_doc) {
        log_error("out of memory rendering a batch");
        abort();
    }
    const char *params[1] = {w->apply_doc};
    if (pgloop_query(w->pg, "SELECT saga.apply_batch($1::jsonb)", 1, params, apply_cb, w))
        return;
}

/* Applies one event to a row; adds its effects to the batch. */
static void apply_event(struct worker *w, struct saga_row *row, const struct saga_event *ev,
                        const char *reply_message_id, struct store_batch *b,
                        enum saga_outcome *outcome)
{
    struct saga_effects fx;
    enum saga_status before = row->state.status;
    /* The step before the event, for the logs (the definition outlives the row). */
    const char *stepname = row->state.step >= 0 && (size_t)row->state.step < row->def->step_count
                               ? row->def->steps[row->state.step].name
                               : "-";
    if (saga_engine_apply(row->def, &row->state, ev, &w->o->env, &fx)) {
        log_at(LOG_ERROR, LOG_FIELDS("saga_id", row->state.id, "step", stepname),
               "the engine could not apply an event (a template that cannot render?)");
        saga_effects_clear(&fx);
        if (outcome)
            *outcome = SAGA_IGNORED;
        return;
    }
    if (outcome)
        *outcome = fx.outcome;
    if (fx.outcome == SAGA_APPLIED) {
        row->touched = true;
        if (store_batch_add_effects(b, row, &fx, reply_message_id)) {
            log_error("out of memory building a batch");
            abort();
        }
        count_transition(w, before, row->state.status);
        if (LOG_ENABLED(LOG_DEBUG))
            log_at(LOG_DEBUG,
                   LOG_FIELDS("saga_id", row->state.id, "step", stepname, "correlation_id",
                              row->state.correlation_id, "trace_id", row->state.trace_id, "status",
                              saga_status_name(row->state.status)),
                   "saga advanced (%zu command(s))", fx.message_count);
        if (row->state.status != before &&
            (row->state.status == SAGA_COMPENSATING || row->state.status == SAGA_FAILED))
            log_at(LOG_INFO,
                   LOG_FIELDS("saga_id", row->state.id, "step", stepname, "correlation_id",
                              row->state.correlation_id, "trace_id", row->state.trace_id, "error",
                              row->state.error),
                   "saga %s", saga_status_name(row->state.status));
    } else if (fx.outcome == SAGA_REJECTED) {
        log_at(LOG_WARN, LOG_FIELDS("saga_id", row->state.id, "reason", fx.error),
               "operator request rejected");
    }
    saga_effects_clear(&fx);
}

/* Sagas of a definition version this process has not loaded (another orchestrator, newer,
 * registered it): a warning at most once a minute per version, and a reload, which brings
 * the version in unless this binary cannot read it (then the sagas are left to the
 * orchestrators that can). */
static void note_unknown_version(struct worker *w, const char *name, int version, long count)
{
    struct unknown_version *u = NULL;
    for (size_t i = 0; i < w->unknown_version_count && !u; i++)
        if (w->unknown_versions[i].version == version && !strcmp(w->unknown_versions[i].name, name))
            u = &w->unknown_versions[i];
    if (!u) {
        struct unknown_version *grown = realloc(
            w->unknown_versions, (w->unknown_version_count + 1) * sizeof(*w->unknown_versions));
        if (!grown) {
            log_error("out of memory");
            abort();
        }
        w->unknown_versions = grown;
        u = &w->unknown_versions[w->unknown_version_count++];
        memset(u, 0, sizeof(*u));
        snprintf(u->name, sizeof(u->name), "%s", name);
        u->version = version;
        u->warned_ms = -UNKNOWN_VERSION_WARN_MS;
    }
    int64_t now = orch_now_ms();
    if (now - u->warned_ms >= UNKNOWN_VERSION_WARN_MS) {
        u->warned_ms = now;
        char ver[16], n[32];
        snprintf(ver, sizeof(ver), "%d", version);
        snprintf(n, sizeof(n), "%ld", count);
        log_at(LOG_WARN,
               LOG_FIELDS("worker", w->name, "saga_name", name, "saga_version", ver, "sagas",
                          count >= 0 ? n : NULL),
               "sagas of a definition version this orchestrator has not loaded are left to "
               "other orchestrators (reload with SIGHUP once it can be loaded)");
    }
    if (now - w->reload_ms >= UNKNOWN_VERSION_WARN_MS) {
        w->reload_ms = now;
        orch_request_reload();
    }
}

/* Reads the locked rows into w->rows. A row of a definition version this process has not
 * loaded is left out; its saga id is appended to *unknown (caller frees) when unknown is
 * not NULL. Returns how many were left out so, or -1 when out of memory. */
static int read_rows(struct worker *w, PGresult *res, char (**unknown)[SAGA_UUID_LEN + 1])
{
    int n = PQntuples(res);
    int missing = 0;
    w->rows = calloc(n ? (size_t)n : 1, sizeof(*w->rows));
    if (!w->rows)
        return -1;
    for (int i = 0; i < n; i++) {
        char err[512];
        struct saga_row *row = &w->rows[w->row_count];
        int rc = store_read_row(&w->o->registry, res, i, row, err, sizeof(err));
        if (rc == -2) {
            note_unknown_version(w, row->name, row->version, -1);
            if (unknown) {
                char(*grown)[SAGA_UUID_LEN + 1] =
                    realloc(*unknown, ((size_t)missing + 1) * sizeof(**unknown));
                if (!grown)
                    return -1;
                *unknown = grown;
                snprintf(grown[missing], sizeof(grown[missing]), "%s", PQgetvalue(res, i, 0));
            }
            missing++;
            memset(row, 0, sizeof(*row));
            continue;
        }
        if (rc) {
            log_at(LOG_ERROR, LOG_FIELDS("error", err), "skipping a saga that cannot be read");
            continue;
        }
        w->row_count++;
    }
    return missing;
}

/* ---- claim worker ---------------------------------------------------------------------- */

static void claim_cb(struct pgloop *pg, PGresult *res, void *arg)
{
    struct worker *w = arg;
    if (w->claim_preparing) {
        /* Whether the PREPARE went through or not, DEALLOCATE ALL starts over next time. */
        free(w->claim_prepared);
        w->claim_prepared = ok(res) ? w->claim_preparing : NULL;
        if (!ok(res))
            free(w->claim_preparing);
        w->claim_preparing = NULL;
        if (ok(res) && LOG_ENABLED(LOG_DEBUG)) {
            char versions[32];
            snprintf(versions, sizeof(versions), "%zu", w->o->registry.count);
            log_at(LOG_DEBUG, LOG_FIELDS("worker", w->name, "definition_versions", versions),
                   "claim statement prepared");
        }
    }
    if (!ok(res)) {
        /* Prepared again next time: some failures stick to the prepared statement itself
         * (another version's migration changed a column it returns: "cached plan must not
         * change result type" at every EXECUTE). */
        forget_claim(w);
        failed(w, res, "claim");
        return;
    }
    /* The claim takes only loaded versions: one left out here was registered and claimed
     * in between (its lock goes with the COMMIT). */
    if (read_rows(w, res, NULL) < 0) {
        log_error("out of memory reading sagas");
        abort();
    }
    if (w->row_count == 0) {
        if (pgloop_query_simple(w->pg, "COMMIT", commit_cb, w))
            return;
        return;
    }
    struct store_batch b;
    if (store_batch_init(&b)) {
        log_error("out of memory building a batch");
        abort();
    }
    int64_t now = orch_now_ms();
    for (size_t i = 0; i < w->row_count; i++) {
        struct saga_row *row = &w->rows[i];
        if (row->pending_request[0]) {
            struct saga_event ev = {.now_ms = now};
            ev.kind = strcmp(row->pending_request, "abort") ? SAGA_EV_RETRY : SAGA_EV_ABORT;
            ev.reason = row->request_reason;
            apply_event(w, row, &ev, NULL, &b, NULL);
            row->touched = true; /* the request is consumed either way */
            row->clear_request = true;
        }
        if (row->state.status == SAGA_PENDING) {
            struct saga_event ev = {.kind = SAGA_EV_START, .now_ms = now};
            apply_event(w, row, &ev, NULL, &b, NULL);
        }
        /* A reply timeout waits while the reply consumer holds no partition (see
         * assigned_partitions); a backoff is ours and fires regardless. */
        bool deaf = row->state.wait == SAGA_WAIT_REPLY && w->o->assigned_partitions == 0;
        if (row->state.deadline_ms && row->state.deadline_ms <= now && !deaf) {
            struct saga_event ev = {.kind = SAGA_EV_TIMEOUT, .now_ms = now};
            enum saga_outcome out;
            apply_event(w, row, &ev, NULL, &b, &out);
            if (out == SAGA_APPLIED)
                w->deadlines++;
        }
    }
    send_apply(w, &b);
}

/* ---- reply worker ---------------------------------------------------------------------- */

static cJSON *headers_json(rd_kafka_message_t *m)
{
    cJSON *o = cJSON_CreateObject();
    rd_kafka_headers_t *hdrs = NULL;
    if (!o || rd_kafka_message_headers(m, &hdrs))
        return o;
    const char *name;
    const void *val;
    size_t size;
    /* Anything may come from Kafka: keep only text PostgreSQL accepts (reply_text). */
    for (size_t i = 0; !rd_kafka_header_get_all(hdrs, i, &name, &val, &size); i++) {
        char *n = reply_text(name, strlen(name));
        char *v = val ? reply_text(val, size) : NULL;
        if (n && v)
            cJSON_AddStringToObject(o, n, v);
        else if (n)
            cJSON_AddNullToObject(o, n);
        free(n);
        free(v);
    }
    return o;
}

static void dead_letter_cb(struct pgloop *pg, PGresult *res, void *arg)
{
    struct worker *w = arg;
    if (!res)
        return; /* connection lost: the reply stays first in line */
    struct reply_msg *r = &w->o->pending[0];
    if (!ok(res)) {
        log_at(LOG_ERROR,
               LOG_FIELDS("saga_id", r->saga_id[0] ? r->saga_id : NULL, "message_id",
                          r->message_id[0] ? r->message_id : NULL, "error",
                          PQresultErrorMessage(res)),
               "cannot record a dead letter; the reply is tried again after a pause");
        w->state = W_IDLE;
        pause_retry(w);
        return;
    }
    rd_kafka_message_t *m = r->msg;
    char part[16], offset[32];
    snprintf(part, sizeof(part), "%" PRId32, m->partition);
    snprintf(offset, sizeof(offset), "%" PRId64, m->offset);
    log_at(LOG_ERROR,
           LOG_FIELDS("saga_id", r->saga_id[0] ? r->saga_id : NULL, "message_id",
                      r->message_id[0] ? r->message_id : NULL, "topic", rd_kafka_topic_name(m->rkt),
                      "partition", part, "offset", offset, "sqlstate", w->fail_state, "error",
                      w->fail_error),
           "a reply that cannot be applied was moved to saga.dead_letters; the consumer goes on");
    metrics_counter_add("saga_replies_total", "result=\"dead_lettered\"", 1);
    w->state = W_IDLE;
    w->retry_ms = 0;
    w->suspect = w->limit = 0; /* the rest of the batch is tried as a whole again */
    replies_commit(w->o, 1);   /* only now: the dead letter is committed */
    worker_kick(w);
}

/* The first pending reply failed on its own, deterministically: it goes to saga.dead_letters
 * in a transaction of its own (a single autocommitted INSERT), recorded like a malformed
 * reply, with the error and its SQLSTATE (see the top of this file for crashes). */
static void dead_letter(struct worker *w)
{
    struct reply_msg *r = &w->o->pending[0];
    rd_kafka_message_t *m = r->msg;
    char part[16], offset[32];
    snprintf(part, sizeof(part), "%" PRId32, m->partition);
    snprintf(offset, sizeof(offset), "%" PRId64, m->offset);
    char *key = m->key ? reply_text(m->key, m->key_len) : NULL;
    char *payload = m->payload ? reply_text(m->payload, m->len) : NULL;
    cJSON *h = headers_json(m);
    char *headers = h ? cJSON_PrintUnformatted(h) : NULL;
    cJSON_Delete(h);
    if ((m->key && !key) || (m->payload && !payload) || !headers) {
        log_error("out of memory recording a dead letter");
        abort();
    }
    const char *params[7] = {
        rd_kafka_topic_name(m->rkt), part, offset, key, headers, payload, w->fail_error};
    w->state = W_BUSY;
    int rc = pgloop_query(w->pg,
                          "INSERT INTO saga.dead_letters (topic, partition, \"offset\", key, "
                          "headers, payload, error) VALUES ($1, $2::int, $3::bigint, $4, "
                          "$5::jsonb, $6, $7) ON CONFLICT DO NOTHING",
                          7, params, dead_letter_cb, w);
    free(key);
    free(payload);
    free(headers);
    if (rc)
        w->state = W_IDLE;
}

/* A reply should carry the trace of the saga it answers (its command's traceparent, sent
 * back). One without it, or from another trace, is applied all the same (tracing never
 * decides what a saga does), but counted and logged: a participant that drops or replaces
 * the traceparent breaks the saga's trace. Counted at commit, with the batch's other counts. */
static void check_trace(struct worker *w, const struct reply_msg *r, const struct saga_row *row)
{
    if (row->state.trace_id && !strcmp(r->trace_id, row->state.trace_id))
        return;
    w->trace_mismatches++;
    int kind = !r->traceparent[0] ? 0 : !r->trace_id[0] ? 1 : 2;
    static const char *const what[3] = {"a reply without a traceparent",
                                        "a reply with a malformed traceparent",
                                        "a reply from another trace than its saga's"};
    /* At most one line a second per kind and worker: a participant that never passes the
     * traceparent on would otherwise write a line per reply (the counter counts them all). */
    int64_t now = orch_now_ms();
    if (w->trace_warned_ms[kind] && now - w->trace_warned_ms[kind] < 1000) {
        w->trace_unwritten[kind]++;
        return;
    }
    char more[96] = "";
    if (w->trace_unwritten[kind])
        snprintf(more, sizeof(more), " (and %llu more since the last such line)",
                 (unsigned long long)w->trace_unwritten[kind]);
    w->trace_warned_ms[kind] = now;
    w->trace_unwritten[kind] = 0;
    log_at(LOG_WARN,
           LOG_FIELDS("saga_id", r->saga_id, "message_id", r->message_id, "trace_id",
                      row->state.trace_id, "reply_trace_id", r->trace_id[0] ? r->trace_id : NULL,
                      "reply_traceparent", r->traceparent[0] ? r->traceparent : NULL),
           "%s; applied all the same%s", what[kind], more);
}

/* The inbox record of reply r (its disposition known once the engine has seen it). */
static void add_inbox(struct store_batch *b, const struct reply_msg *r, const char *disposition)
{
    rd_kafka_message_t *m = r->msg;
    if (store_batch_add_inbox(b, r->message_id, r->in_reply_to, r->saga_id,
                              rd_kafka_topic_name(m->rkt), m->partition, m->offset, disposition)) {
        log_error("out of memory building a batch");
        abort();
    }
}

/* The batch's strings (message-ids, saga ids) in a small open-addressing table (slots hold an
 * index + 1): a reply's duplicates and its row are found in one probe or two (comparing each
 * reply with every one before it, and with every row, was a visible share of the
 * orchestrator's CPU in batches of 200). */
struct strset {
    size_t *slot;
    size_t mask;
};

static size_t str_hash(const char *s)
{
    uint64_t h = 1469598103934665603ULL; /* FNV-1a */
    for (; *s; s++) {
        h ^= (unsigned char)*s;
        h *= 1099511628211ULL;
    }
    return (size_t)h;
}

/* A table for n strings; aborts when out of memory, as the rest of the batch's building. */
static void strset_init(struct strset *t, size_t n)
{
    size_t cap = 16;
    while (cap < 2 * n)
        cap *= 2;
    t->slot = calloc(cap, sizeof(*t->slot));
    if (!t->slot) {
        log_error("out of memory");
        abort();
    }
    t->mask = cap - 1;
}

/* The index of a string equal to s (key(i, arg) gives string i), or -1 after adding index i
 * for it (i == SIZE_MAX: only look). */
static long strset_find_add(struct strset *t, const char *s, size_t i,
                            const char *(*key)(size_t, const void *), const void *arg)
{
    for (size_t h = str_hash(s) & t->mask;; h = (h + 1) & t->mask) {
        if (!t->slot[h]) {
            if (i != SIZE_MAX)
                t->slot[h] = i + 1;
            return -1;
        }
        if (!strcmp(key(t->slot[h] - 1, arg), s))
            return (long)(t->slot[h] - 1);
    }
}

static const char *reply_key(size_t i, const void *o)
{
    return ((const struct orchestrator *)o)->pending[i].message_id;
}

static const char *row_key(size_t i, const void *w)
{
    return ((const struct worker *)w)->rows[i].state.id;
}

static void dedupe_cb(struct pgloop *pg, PGresult *res, void *arg)
{
    struct worker *w = arg;
    if (!ok(res)) {
        failed(w, res, "inbox lookup");
        return;
    }
    struct store_batch b;
    if (store_batch_init(&b)) {
        log_error("out of memory building a batch");
        abort();
    }
    int64_t now = orch_now_ms();
    int dups = PQntuples(res);
    /* The batch's message-ids so far (well-formed replies), and its rows by saga id. */
    struct strset mids, rows;
    strset_init(&mids, w->reply_count);
    strset_init(&rows, w->row_count);
    for (size_t k = 0; k < w->row_count; k++)
        (void)strset_find_add(&rows, w->rows[k].state.id, k, row_key, w);
    for (size_t i = 0; i < w->reply_count; i++) {
        struct reply_msg *r = &w->o->pending[i];
        rd_kafka_message_t *m = r->msg;
        if (r->error) {
            char *k = m->key ? reply_text(m->key, m->key_len) : NULL;
            char *p = m->payload ? reply_text(m->payload, m->len) : NULL;
            cJSON *h = headers_json(m);
            /* As dead_letter(): a dead letter without its key, payload or headers would lose
             * what an operator needs to see. */
            if ((m->key && !k) || (m->payload && !p) || !h ||
                store_batch_add_dead_letter(&b, rd_kafka_topic_name(m->rkt), m->partition,
                                            m->offset, k, h, p, r->error)) {
                log_error("out of memory building a batch");
                abort();
            }
            cJSON_Delete(h);
            free(k);
            free(p);
            w->malformed++;
            log_at(LOG_WARN, LOG_FIELDS("topic", rd_kafka_topic_name(m->rkt), "error", r->error),
                   "malformed reply moved to saga.dead_letters");
            continue;
        }
        /* A well-formed reply before it in the batch has its message-id. */
        bool dup = strset_find_add(&mids, r->message_id, i, reply_key, w->o) >= 0;
        for (int k = 0; k < dups && !dup; k++)
            dup = !strcmp(PQgetvalue(res, k, 0), r->message_id);
        if (dup) {
            w->duplicates++;
            continue;
        }
        /* A saga's row appears once (the lock reads saga.instances by primary key). */
        long found = strset_find_add(&rows, r->saga_id, SIZE_MAX, row_key, w);
        struct saga_row *row = found >= 0 ? &w->rows[found] : NULL;
        if (!row) {
            add_inbox(&b, r, "unknown");
            w->unknown++;
            log_at(LOG_WARN, LOG_FIELDS("saga_id", r->saga_id, "message_id", r->message_id),
                   "reply for an unknown saga recorded and ignored");
            continue;
        }
        check_trace(w, r, row);
        int64_t sent_ms = 0;
        if (row->state.wait == SAGA_WAIT_REPLY && row->state.step >= 0 &&
            (size_t)row->state.step < row->def->step_count)
            sent_ms = row->state.deadline_ms - row->def->steps[row->state.step].timeout_ms;
        struct saga_event ev = {.kind = SAGA_EV_REPLY,
                                .now_ms = now,
                                .in_reply_to = r->in_reply_to,
                                .success = r->success,
                                .reply = r->data};
        enum saga_outcome out;
        apply_event(w, row, &ev, r->message_id, &b, &out);
        if (out == SAGA_APPLIED) {
            /* Recorded on its attempt (reply_message_id), not in the inbox. */
            w->applied++;
            if (sent_ms > 0 && now >= sent_ms)
                metrics_histogram_observe("saga_step_latency_seconds", NULL,
                                          (double)(now - sent_ms) / 1000.0);
        } else {
            add_inbox(&b, r, "ignored");
            if (store_batch_add_ignored(&b, r->in_reply_to, r->saga_id, r->data)) {
                log_error("out of memory building a batch");
                abort();
            }
            w->late++;
            log_at(LOG_INFO,
                   LOG_FIELDS("saga_id", r->saga_id, "message_id", r->message_id, "in_reply_to",
                              r->in_reply_to),
                   "late or stale reply recorded and ignored");
        }
    }
    free(rows.slot);
    free(mids.slot);
    send_apply(w, &b);
}

static void lock_cb(struct pgloop *pg, PGresult *res, void *arg)
{
    struct worker *w = arg;
    if (!ok(res)) {
        failed(w, res, "locking sagas");
        return;
    }
    char(*unknown)[SAGA_UUID_LEN + 1] = NULL;
    int rr = read_rows(w, res, &unknown);
    if (rr < 0) {
        log_error("out of memory reading sagas");
        abort();
    }
    if (rr > 0) {
        /* Not "unknown saga": the saga exists, this process lacks its definition. Its reply
         * cannot be applied, nor skipped (its offset must not be committed): the replies
         * before it are applied, then it waits, with a pause that grows, for the reload
         * (requested by read_rows) or for the partition to move to another orchestrator. */
        size_t k = 0;
        bool hit = false;
        for (; k < w->reply_count && !hit; k++)
            for (int u = 0; u < rr && !hit; u++)
                hit = !w->o->pending[k].error && !strcmp(w->o->pending[k].saga_id, unknown[u]);
        k = hit ? k - 1 : 0;
        free(unknown);
        if (k > 0) {
            w->limit = k;
            w->fail = F_PREFIX;
        } else {
            /* The reload is asked for by note_unknown_version (at most once a minute). */
            snprintf(w->fail_state, sizeof(w->fail_state), "%s", "");
            w->fail = F_PAUSE;
            log_at(LOG_WARN, LOG_FIELDS("saga_id", w->o->pending[0].saga_id),
                   "a reply for a saga of a definition version this orchestrator has not "
                   "loaded waits for the definitions to be loaded");
        }
        batch_reset(w);
        if (pgloop_query_simple(w->pg, "ROLLBACK", rollback_cb, w))
            w->state = W_IDLE;
        return;
    }
    /* Which replies were applied before (redelivery after a crash, a participant's
     * duplicate)? Asked after the locks, so a concurrent applier's commit is visible. An
     * applied reply is recorded on the attempt it answers (step_history.reply_message_id); a
     * late, stale or unknown one in the inbox. */
    size_t cap = w->reply_count * 40 + 3;
    char *mids = malloc(cap), *irts = malloc(cap);
    if (!mids || !irts) {
        log_error("out of memory");
        abort();
    }
    size_t len = 0, ilen = 0;
    mids[len++] = '{';
    irts[ilen++] = '{';
    for (size_t i = 0; i < w->reply_count; i++) {
        struct reply_msg *r = &w->o->pending[i];
        if (r->error)
            continue;
        /* Validated uuids, SAGA_UUID_LEN each: 40 bytes a reply is room enough. */
        if (len > 1)
            mids[len++] = ',';
        memcpy(mids + len, r->message_id, SAGA_UUID_LEN);
        len += SAGA_UUID_LEN;
        if (ilen > 1)
            irts[ilen++] = ',';
        memcpy(irts + ilen, r->in_reply_to, SAGA_UUID_LEN);
        ilen += SAGA_UUID_LEN;
    }
    mids[len++] = '}';
    mids[len] = '\0';
    irts[ilen++] = '}';
    irts[ilen] = '\0';
    const char *params[2] = {mids, irts};
    int rc = pgloop_query_prepared(w->pg, "saga_dedupe", 2, params, dedupe_cb, w);
    free(mids);
    free(irts);
    if (rc)
        return;
}

/* A growing SQL text (the claim has one literal per loaded version and quarantined saga). */
struct sqlbuf {
    char *text;
    size_t len, cap;
};

/* Room for n more bytes and a NUL (out of memory aborts: a claim cannot be half written). */
static void sql_reserve(struct sqlbuf *b, size_t n)
{
    if (b->text && b->len + n < b->cap)
        return;
    size_t cap = (b->cap ? b->cap * 2 : 4096) + n;
    char *grown = realloc(b->text, cap);
    if (!grown) {
        log_error("out of memory");
        abort();
    }
    b->text = grown;
    b->cap = cap;
}

static void sql_add(struct sqlbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void sql_add(struct sqlbuf *b, const char *fmt, ...)
{
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int n =
            vsnprintf(b->text ? b->text + b->len : NULL, b->text ? b->cap - b->len : 0, fmt, ap);
        va_end(ap);
        if (n < 0) {
            log_error("cannot format a claim");
            abort();
        }
        if (b->text && b->len + (size_t)n < b->cap) {
            b->len += (size_t)n;
            return;
        }
        sql_reserve(b, (size_t)n);
    }
}

/* Appends n bytes as they are (no format to parse). */
static void sql_put(struct sqlbuf *b, const char *s, size_t n)
{
    sql_reserve(b, n);
    memcpy(b->text + b->len, s, n);
    b->len += n;
    b->text[b->len] = '\0';
}

static void start_reply_batch(struct worker *w)
{
    struct orchestrator *o = w->o;
    size_t n = o->pending_count;
    if (n > (size_t)o->settings.batch_size)
        n = (size_t)o->settings.batch_size;
    if (w->limit && n > w->limit)
        n = w->limit; /* bisecting */
    w->reply_count = n;
    /* The saga ids are validated uuids: safe to inline, which lets BEGIN and the locks share
     * one round trip. Sorted locking (ORDER BY id) keeps two appliers from deadlocking.
     * Both statements of a reply batch are prepared once per session (and again after a
     * failure), in the first batch's round trip: a statement sent as text was planned at
     * every batch, ~0.1-0.2 ms each (pg_stat_statements with track_planning, 2026-11-26),
     * more than the lock itself took to run. The session's plan_cache_mode (state_cb) makes
     * their one plan the generic one from the first EXECUTE. */
    struct sqlbuf b = {0};
    if (!w->replies_prepared)
        sql_add(&b,
                "DEALLOCATE ALL; "
                "PREPARE saga_lock(uuid[]) AS SELECT %s FROM saga.instances WHERE id = ANY ($1) "
                "ORDER BY id FOR UPDATE; "
                /* Index probes per reply (a UNION of two ANY scans was planned in parallel
                 * over large tables: ~20 ms a batch against ~3). OFFSET 0 keeps each EXISTS a
                 * probe: the generic plan, made once per session, hashed the whole inbox at
                 * every batch while its statistics said it was small (EXPLAIN, empty tables),
                 * and kept doing so until the next invalidation however much it grew. */
                "PREPARE saga_dedupe(uuid[], uuid[]) AS SELECT r.mid::text "
                "FROM unnest($1, $2) AS r(mid, irt) "
                "WHERE EXISTS (SELECT 1 FROM saga.inbox b WHERE b.message_id = r.mid OFFSET 0) "
                "OR EXISTS (SELECT 1 FROM saga.step_history h WHERE h.message_id = r.irt "
                "AND h.reply_message_id = r.mid OFFSET 0); ",
                store_instance_columns);
    sql_add(&b, "BEGIN; EXECUTE saga_lock('{");
    size_t ids = 0;
    for (size_t i = 0; i < n; i++) {
        if (o->pending[i].error)
            continue;
        if (ids++)
            sql_put(&b, ",", 1);
        sql_put(&b, o->pending[i].saga_id, strlen(o->pending[i].saga_id));
    }
    sql_add(&b, "}')");
    w->state = W_BUSY;
    int rc = pgloop_query_simple(w->pg, b.text, lock_cb, w);
    free(b.text);
    if (rc)
        w->state = W_IDLE;
    else
        w->replies_prepared = true; /* until a failure says otherwise (failed()) */
}

/* The claim's filter: the definition versions this process has loaded (sagas of other
 * versions are left to the orchestrators that have them), and no quarantined saga. Each of
 * the claim's index range scans applies it, so a saga left alone never takes a place in
 * its LIMIT. Names are quoted by PQescapeLiteral: they come from the database. */
static void claim_filter(struct worker *w, struct sqlbuf *b)
{
    const struct registry *reg = &w->o->registry;
    PGconn *conn = pgloop_conn(w->pg);
    sql_add(b, " AND (saga_name, saga_version) IN (");
    size_t added = 0;
    for (size_t i = 0; i < reg->count && conn; i++) {
        char *lit = PQescapeLiteral(conn, reg->defs[i]->name, strlen(reg->defs[i]->name));
        if (!lit) {
            log_error("out of memory");
            abort();
        }
        sql_add(b, "%s(%s, %d)", added++ ? ", " : "", lit, reg->defs[i]->version);
        PQfreemem(lit);
    }
    if (!added)
        sql_add(b, "(NULL, NULL)");
    sql_add(b, ")");
    int64_t now = orch_now_ms();
    added = 0;
    for (size_t i = 0; i < w->quarantine_count; i++) {
        if (w->quarantine[i].until_ms + QUARANTINE_MAX_MS < now) {
            /* Not failed again since long (finished elsewhere, or fine): forget it. */
            w->quarantine[i--] = w->quarantine[--w->quarantine_count];
            continue;
        }
        if (w->quarantine[i].until_ms <= now)
            continue;
        sql_add(b, "%s'%s'", added++ ? ", " : " AND id NOT IN (", w->quarantine[i].id);
    }
    if (added)
        sql_add(b, ")");
}

/* The claim of due work, prepared once per session as saga_claim (see start_claim_batch). */
static void claim_statement(struct worker *w, const char *filter, struct sqlbuf *b)
{
    int n = w->o->settings.batch_size;
    /* Three index range scans, one per kind of work (each on its partial index, so a claim
     * costs the work it finds, not the size of saga.instances: an OR of the three let the
     * planner pick a sequential scan, measured at 5 ms per claim with 3,000 finished sagas).
     * Each branch locks with SKIP LOCKED itself: with the lock only on the outer query, a
     * second orchestrator's branches picked the same first rows as the first one's, skipped
     * them all and claimed nothing. The outer FOR UPDATE (locks this transaction already
     * holds: no wait) reads the rows' latest versions. Without a partition of the replies,
     * due reply timeouts are left alone (see assigned_partitions): claiming them would only
     * lock them. */
    sql_add(b,
            "WITH p AS (SELECT id FROM saga.instances WHERE status = 'pending'%s "
            "ORDER BY created_at LIMIT %d FOR UPDATE SKIP LOCKED), "
            "d AS (SELECT id FROM saga.instances WHERE deadline <= now()%s%s ORDER BY "
            "deadline LIMIT %d FOR UPDATE SKIP LOCKED), "
            "r AS (SELECT id FROM saga.instances WHERE pending_request IS NOT NULL%s ORDER BY "
            "updated_at LIMIT %d FOR UPDATE SKIP LOCKED) "
            "SELECT %s FROM saga.instances WHERE id IN (SELECT id FROM p UNION SELECT id "
            "FROM d UNION SELECT id FROM r) LIMIT %d FOR UPDATE",
            filter, n, w->o->assigned_partitions ? "" : " AND wait <> 'reply'", filter, n, filter,
            n, store_instance_columns, n);
}

static void start_claim_batch(struct worker *w)
{
    struct sqlbuf filter = {0}, b = {0};
    claim_filter(w, &filter);
    w->trying_suspects = w->suspect_count > 0;
    free(w->claim_preparing);
    w->claim_preparing = NULL;
    if (w->trying_suspects) {
        /* Bisecting a claim whose transaction failed: its first try_count sagas again (rare:
         * not worth a prepared statement). */
        sql_add(&b, "BEGIN; SELECT %s FROM saga.instances WHERE id IN (", store_instance_columns);
        size_t k =
            w->try_count && w->try_count < w->suspect_count ? w->try_count : w->suspect_count;
        w->try_count = k;
        for (size_t i = 0; i < k; i++)
            sql_add(&b, "%s'%s'", i ? ", " : "", w->suspects[i]);
        sql_add(&b, ")%s ORDER BY id FOR UPDATE SKIP LOCKED", filter.text);
    } else {
        /* The claim runs every poll interval and on every wake-up, and its parse and plan
         * cost PostgreSQL more than running it when it finds nothing. So it is prepared once
         * per session and only executed after that: prepared again when its text changes (a
         * reload changed the loaded versions, a saga entered or left quarantine, the reply
         * partitions came or went) and on every new session (reconnect_later forgets it).
         * Its only variables are in its text, not parameters: a statement without parameters
         * always runs its one generic plan, never planned again (until the server
         * invalidates it, after an ANALYZE or DDL on the table). The PREPARE rides in the
         * claim's own round trip; DEALLOCATE ALL (this session prepares nothing else) cannot
         * fail, whether or not a previous PREPARE went through, since a failed claim's
         * ROLLBACK (failed()) always comes before the next claim. */
        struct sqlbuf stmt = {0};
        claim_statement(w, filter.text, &stmt);
        if (w->claim_prepared && !strcmp(w->claim_prepared, stmt.text)) {
            free(stmt.text);
            sql_add(&b, "BEGIN; EXECUTE saga_claim");
        } else {
            sql_add(&b, "DEALLOCATE ALL; PREPARE saga_claim AS %s; BEGIN; EXECUTE saga_claim",
                    stmt.text);
            w->claim_preparing = stmt.text; /* becomes claim_prepared once it worked */
        }
    }
    free(filter.text);
    w->more = false;
    w->state = W_BUSY;
    if (pgloop_query_simple(w->pg, b.text, claim_cb, w)) {
        w->state = W_IDLE;
        w->more = true;
    }
    free(b.text);
}

/* ---- connection and scheduling --------------------------------------------------------- */

/* The session's settings (and the claim worker's LISTEN) are sent once per connection. When
 * they fail (a server in recovery refuses LISTEN, say, after a failover to a standby), the
 * session is not usable as it is: rolling back and going on would leave a claim worker that
 * never hears a notification and sessions without the planner settings, for as long as the
 * connection lasts. So the session is closed and set up again on a new connection, with the
 * reconnection's backoff (which only a session set up in full resets). */
static void listen_cb(struct pgloop *pg, PGresult *res, void *arg)
{
    struct worker *w = arg;
    if (!res)
        return; /* connection lost: state_cb follows */
    if (!ok(res)) {
        const char *state = PQresultErrorField(res, PG_DIAG_SQLSTATE);
        log_at(LOG_WARN,
               LOG_FIELDS("worker", w->name, "sqlstate", state, "error", PQresultErrorMessage(res)),
               "database session setup failed; reconnecting");
        reconnect_later(w);
        return;
    }
    w->backoff_ms = 100;
    w->state = W_IDLE;
    w->more = true;
    worker_kick(w);
}

static void state_cb(struct pgloop *pg, bool up, void *arg)
{
    struct worker *w = arg;
    if (!up) {
        lost(w);
        return;
    }
    log_at(LOG_INFO, LOG_FIELDS("worker", w->name), "database connected");
    w->state = W_LISTEN;
    /* Every statement of ours touches a handful of rows through an index. The saga tables
     * grow fast and their statistics lag (autovacuum's analyze comes much later), and with
     * stale statistics the planner joined saga.apply_batch's few hundred rows to the whole of
     * saga.step_history by sequential scan: 43 ms per batch with 13,000 history rows,
     * measured. Nested loops over index scans are right for every query of this session.
     * Bitmap scans too: with a backlog, the claim's "pending" branch read every pending saga
     * through a bitmap scan and sorted them all to keep one batch (37 ms per claim with 5,000
     * pending), where the ordered scan of its partial index stops after the batch.
     * With such plans a statement's plan depends little on its parameters' values (and the
     * lookup of replies seen before is kept to probes: saga_dedupe's OFFSET 0), so
     * plan_cache_mode = force_generic_plan: each prepared statement (saga_lock, saga_dedupe,
     * saga.apply_batch's statements) is planned once (and again after an invalidation), where
     * PostgreSQL would plan it at each of its first five executions in the session before it
     * settles on the generic plan. */
#define SESSION_PLANNER                                                                            \
    "SET enable_seqscan = off; SET enable_hashjoin = off; SET enable_mergejoin = off; "            \
    "SET enable_bitmapscan = off; SET plan_cache_mode = force_generic_plan"
    const char *session = w->replies ? SESSION_PLANNER : SESSION_PLANNER "; LISTEN saga_wakeup";
#undef SESSION_PLANNER
    if (pgloop_query_simple(w->pg, session, listen_cb, w))
        return;
}

static void notify_cb(struct pgloop *pg, const char *channel, const char *payload, void *arg)
{
    struct worker *w = arg;
    w->more = true;
    worker_kick(w);
}

static void timer_cb(struct ev_loop *loop, ev_timer *t, int revents)
{
    struct worker *w = t->data;
    if (w->state == W_DOWN) {
        w->state = W_CONNECTING;
        if (pgloop_connect(w->pg))
            lost(w);
        return;
    }
    if (w->state == W_WAIT)
        w->state = W_IDLE; /* the pause after a transient failure is over */
    if (!w->replies)
        w->more = true; /* deadlines come due without a notification */
    worker_kick(w);
}

static void kick_cb(struct ev_loop *loop, ev_idle *i, int revents)
{
    struct worker *w = i->data;
    ev_idle_stop(loop, i);
    step(w);
}

static void count_cb(struct pgloop *pg, PGresult *res, void *arg)
{
    struct worker *w = arg;
    w->state = W_IDLE;
    if (!res)
        return;
    if (ok(res)) {
        double by_status[3] = {0, 0, 0};
        static const char *const names[] = {"pending", "running", "compensating"};
        for (int i = 0; i < PQntuples(res); i++) {
            for (int k = 0; k < 3; k++)
                if (!strcmp(PQgetvalue(res, i, 0), names[k]))
                    by_status[k] += strtod(PQgetvalue(res, i, 3), NULL);
            /* A version not loaded here: warned about once, with its sagas of every status
             * (the rows come by status; the first row of the version counts them all). */
            const char *name = PQgetvalue(res, i, 1);
            int version = atoi(PQgetvalue(res, i, 2));
            if (registry_find(&w->o->registry, name, version))
                continue;
            bool seen = false;
            for (int j = 0; j < i && !seen; j++)
                seen =
                    atoi(PQgetvalue(res, j, 2)) == version && !strcmp(PQgetvalue(res, j, 1), name);
            if (seen)
                continue;
            long sagas = 0;
            for (int j = i; j < PQntuples(res); j++)
                if (atoi(PQgetvalue(res, j, 2)) == version && !strcmp(PQgetvalue(res, j, 1), name))
                    sagas += strtol(PQgetvalue(res, j, 3), NULL, 10);
            note_unknown_version(w, name, version, sagas);
        }
        for (int k = 0; k < 3; k++) {
            char labels[64];
            snprintf(labels, sizeof(labels), "status=\"%s\"", names[k]);
            metrics_gauge_set("saga_sagas_in_flight", labels, by_status[k]);
        }
    }
    worker_kick(w);
}

/* Every few seconds, when idle: how many sagas are not finished (all orchestrators), and
 * whether some of them use a definition version this process has not loaded (the claims
 * leave them out, so only this count sees them). */
static void count_in_flight(struct worker *w)
{
    w->counted_ms = orch_now_ms();
    w->state = W_BUSY;
    if (pgloop_query_simple(w->pg,
                            "SELECT status, saga_name, saga_version, count(*) FROM "
                            "saga.instances WHERE status IN ('pending', 'running', "
                            "'compensating') GROUP BY status, saga_name, saga_version",
                            count_cb, w))
        w->state = W_IDLE;
}

static void step(struct worker *w)
{
    if (w->state != W_IDLE || pgloop_busy(w->pg) || w->o->stopping)
        return;
    if (w->replies) {
        if (w->o->pending_count)
            start_reply_batch(w);
        return;
    }
    if (w->more) {
        start_claim_batch(w);
    } else if (orch_now_ms() - w->counted_ms >= 5000) {
        count_in_flight(w);
    } else if (!ev_is_active(&w->timer)) {
        schedule(w, w->o->settings.poll_ms);
    }
}

struct worker *worker_create(struct orchestrator *o, bool replies)
{
    struct worker *w = calloc(1, sizeof(*w));
    if (!w)
        return NULL;
    w->o = o;
    w->replies = replies;
    w->name = replies ? "replies" : "claims";
    w->pg = pgloop_create(o->loop, o->settings.database_url ? o->settings.database_url : "",
                          state_cb, replies ? NULL : notify_cb, w);
    if (!w->pg) {
        free(w);
        return NULL;
    }
    ev_init(&w->timer, timer_cb);
    w->timer.data = w;
    ev_idle_init(&w->kick, kick_cb);
    w->kick.data = w;
    w->backoff_ms = 100;
    w->reload_ms = -UNKNOWN_VERSION_WARN_MS;
    metrics_describe("saga_transaction_retries_total", "counter",
                     "Batches rolled back by a transient error and run again after a pause.");
    metrics_describe("saga_sagas_quarantined_total", "counter",
                     "Sagas whose transaction failed on its own, left alone for a while.");
    return w;
}

void worker_start(struct worker *w)
{
    schedule(w, 0);
}

bool worker_idle(const struct worker *w)
{
    return w->state != W_BUSY && w->state != W_LISTEN;
}

bool worker_ready(const struct worker *w)
{
    return w->state == W_IDLE || w->state == W_BUSY || w->state == W_WAIT;
}

void worker_destroy(struct worker *w)
{
    if (!w)
        return;
    ev_timer_stop(w->o->loop, &w->timer);
    ev_idle_stop(w->o->loop, &w->kick);
    batch_reset(w);
    pgloop_destroy(w->pg);
    free(w->fail_error);
    free(w->suspects);
    free(w->quarantine);
    free(w->unknown_versions);
    forget_claim(w);
    free(w);
}
