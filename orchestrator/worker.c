/* worker: one PostgreSQL session that runs the orchestrator's transactions, one batch at a
 * time, as a small state machine driven by pgloop callbacks.
 *
 * Claim worker:  BEGIN; SELECT ... FOR UPDATE SKIP LOCKED (pending sagas, due deadlines,
 *                operator requests) -> engine -> saga.apply_batch -> COMMIT
 * Reply worker:  BEGIN; SELECT ... FOR UPDATE (the sagas of the batch, in id order) ->
 *                SELECT inbox (duplicates) -> engine -> saga.apply_batch -> COMMIT ->
 *                commit the Kafka offsets
 *
 * Crash at any point before COMMIT: the transaction rolls back, nothing was sent (the
 * commands are outbox rows of the same transaction), and the same work is claimed or
 * consumed again. Crash after COMMIT and before the offset commit: the replies come again
 * and the inbox (and the engine's in-reply-to check) drops them. */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <libpq-fe.h>

#include "log.h"
#include "metrics.h"
#include "orchestrator.h"

enum wstate { W_DOWN, W_CONNECTING, W_LISTEN, W_IDLE, W_BUSY };

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
        malformed;
    int64_t counted_ms; /* when saga_sagas_in_flight was last measured */
};

int64_t orch_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void step(struct worker *w);

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
    w->applied = w->duplicates = w->late = w->unknown = w->malformed = 0;
}

static void lost(struct worker *w)
{
    log_at(LOG_WARN, LOG_FIELDS("worker", w->name, "error", pgloop_error(w->pg)),
           "database connection lost or refused; retrying");
    pgloop_close(w->pg);
    batch_reset(w); /* the server rolled the transaction back */
    w->state = W_DOWN;
    metrics_counter_add("saga_db_reconnects_total", NULL, 1);
    schedule(w, w->backoff_ms);
    w->backoff_ms = w->backoff_ms * 2 > w->o->settings.reconnect_max_ms
                        ? w->o->settings.reconnect_max_ms
                        : w->backoff_ms * 2;
}

static void rollback_cb(struct pgloop *pg, PGresult *res, void *arg)
{
    struct worker *w = arg;
    if (!res)
        return;
    w->state = W_IDLE;
    schedule(w, 500); /* try the work again a little later */
}

/* A statement failed on a live connection: roll back and retry later. */
static void failed(struct worker *w, PGresult *res, const char *what)
{
    if (!res)
        return; /* connection lost: state_cb follows */
    log_at(LOG_ERROR, LOG_FIELDS("worker", w->name, "error", PQresultErrorMessage(res)),
           "%s failed; rolling back", what);
    batch_reset(w);
    if (pgloop_query_simple(w->pg, "ROLLBACK", rollback_cb, w))
        w->state = W_IDLE;
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
    metrics_histogram_observe("saga_batch_sagas", NULL, (double)w->row_count);
    size_t replies = w->reply_count;
    bool full = w->row_count >= (size_t)w->o->settings.batch_size;
    batch_reset(w);
    w->state = W_IDLE;
    w->backoff_ms = 100;
    if (w->replies) {
        replies_commit(w->o, replies); /* only now: the replies are applied for good */
    } else {
        w->more = full;
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
                        struct store_batch *b, enum saga_outcome *outcome)
{
    struct saga_effects fx;
    enum saga_status before = row->state.status;
    char stepname[128];
    snprintf(stepname, sizeof(stepname), "%s",
             row->state.step >= 0 && (size_t)row->state.step < row->def->step_count
                 ? row->def->steps[row->state.step].name
                 : "-");
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
        if (store_batch_add_effects(b, row, &fx)) {
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

static int read_rows(struct worker *w, PGresult *res)
{
    int n = PQntuples(res);
    w->rows = calloc(n ? (size_t)n : 1, sizeof(*w->rows));
    if (!w->rows)
        return -1;
    for (int i = 0; i < n; i++) {
        char err[512];
        int rc = store_read_row(&w->o->registry, res, i, &w->rows[w->row_count], err, sizeof(err));
        if (rc == -2) {
            log_at(LOG_WARN, LOG_FIELDS("error", err), "loading the definitions again");
            w->o->definitions_missing = true;
            orch_request_reload();
            return -2;
        }
        if (rc) {
            log_at(LOG_ERROR, LOG_FIELDS("error", err), "skipping a saga that cannot be read");
            continue;
        }
        w->row_count++;
    }
    return 0;
}

/* ---- claim worker ---------------------------------------------------------------------- */

static void claim_cb(struct pgloop *pg, PGresult *res, void *arg)
{
    struct worker *w = arg;
    if (!ok(res)) {
        failed(w, res, "claim");
        return;
    }
    int rr = read_rows(w, res);
    if (rr == -2) {
        failed(w, res, "reading sagas (unknown definition version)");
        return;
    }
    if (rr) {
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
            apply_event(w, row, &ev, &b, NULL);
            row->touched = true; /* the request is consumed either way */
            row->clear_request = true;
        }
        if (row->state.status == SAGA_PENDING) {
            struct saga_event ev = {.kind = SAGA_EV_START, .now_ms = now};
            apply_event(w, row, &ev, &b, NULL);
        }
        /* A reply timeout waits while the reply consumer holds no partition (see
         * assigned_partitions); a backoff is ours and fires regardless. */
        bool deaf = row->state.wait == SAGA_WAIT_REPLY && w->o->assigned_partitions == 0;
        if (row->state.deadline_ms && row->state.deadline_ms <= now && !deaf) {
            struct saga_event ev = {.kind = SAGA_EV_TIMEOUT, .now_ms = now};
            enum saga_outcome out;
            apply_event(w, row, &ev, &b, &out);
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
    for (size_t i = 0; i < w->reply_count; i++) {
        struct reply_msg *r = &w->o->pending[i];
        rd_kafka_message_t *m = r->msg;
        if (r->error) {
            cJSON *d = cJSON_CreateObject();
            cJSON_AddItemToArray(b.dead_letters, d);
            cJSON_AddStringToObject(d, "topic", rd_kafka_topic_name(m->rkt));
            cJSON_AddNumberToObject(d, "partition", m->partition);
            cJSON_AddNumberToObject(d, "offset", (double)m->offset);
            if (m->key) {
                char *k = reply_text(m->key, m->key_len);
                cJSON_AddStringToObject(d, "key", k ? k : "");
                free(k);
            }
            cJSON_AddItemToObject(d, "headers", headers_json(m));
            char *p = m->payload ? reply_text(m->payload, m->len) : NULL;
            if (p)
                cJSON_AddStringToObject(d, "payload", p);
            free(p);
            cJSON_AddStringToObject(d, "error", r->error);
            w->malformed++;
            log_at(LOG_WARN, LOG_FIELDS("topic", rd_kafka_topic_name(m->rkt), "error", r->error),
                   "malformed reply moved to saga.dead_letters");
            continue;
        }
        bool dup = false;
        for (int k = 0; k < dups && !dup; k++)
            dup = !strcmp(PQgetvalue(res, k, 0), r->message_id);
        for (size_t k = 0; k < i && !dup; k++)
            dup = !w->o->pending[k].error && !strcmp(w->o->pending[k].message_id, r->message_id);
        if (dup) {
            w->duplicates++;
            continue;
        }
        cJSON *in = cJSON_CreateObject();
        cJSON_AddItemToArray(b.inbox, in);
        cJSON_AddStringToObject(in, "message_id", r->message_id);
        cJSON_AddStringToObject(in, "in_reply_to", r->in_reply_to);
        cJSON_AddStringToObject(in, "saga_id", r->saga_id);
        cJSON_AddStringToObject(in, "topic", rd_kafka_topic_name(m->rkt));
        cJSON_AddNumberToObject(in, "partition", m->partition);
        cJSON_AddNumberToObject(in, "offset", (double)m->offset);
        struct saga_row *row = NULL;
        for (size_t k = 0; k < w->row_count && !row; k++)
            if (!strcmp(w->rows[k].state.id, r->saga_id))
                row = &w->rows[k];
        if (!row) {
            cJSON_AddStringToObject(in, "disposition", "unknown");
            w->unknown++;
            log_at(LOG_WARN, LOG_FIELDS("saga_id", r->saga_id, "message_id", r->message_id),
                   "reply for an unknown saga recorded and ignored");
            continue;
        }
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
        apply_event(w, row, &ev, &b, &out);
        if (out == SAGA_APPLIED) {
            cJSON_AddStringToObject(in, "disposition", "applied");
            w->applied++;
            if (sent_ms > 0 && now >= sent_ms)
                metrics_histogram_observe("saga_step_latency_seconds", NULL,
                                          (double)(now - sent_ms) / 1000.0);
        } else {
            cJSON_AddStringToObject(in, "disposition", "ignored");
            cJSON *g = cJSON_CreateObject();
            cJSON_AddItemToArray(b.ignored, g);
            cJSON_AddStringToObject(g, "in_reply_to", r->in_reply_to);
            cJSON_AddStringToObject(g, "saga_id", r->saga_id);
            cJSON_AddItemToObject(g, "reply", cJSON_Duplicate(r->data, 1));
            w->late++;
            log_at(LOG_INFO,
                   LOG_FIELDS("saga_id", r->saga_id, "message_id", r->message_id, "in_reply_to",
                              r->in_reply_to),
                   "late or stale reply recorded and ignored");
        }
    }
    send_apply(w, &b);
}

static void lock_cb(struct pgloop *pg, PGresult *res, void *arg)
{
    struct worker *w = arg;
    if (!ok(res)) {
        failed(w, res, "locking sagas");
        return;
    }
    int rr = read_rows(w, res);
    if (rr == -2) {
        /* Not "unknown saga": the saga exists, this process lacks its definition. Roll back
         * (the offsets stay uncommitted) and retry once the reload is done. */
        failed(w, res, "reading sagas (unknown definition version)");
        return;
    }
    if (rr) {
        log_error("out of memory reading sagas");
        abort();
    }
    /* Which replies were applied before (redelivery after a crash, a participant's
     * duplicate)? Asked after the locks, so a concurrent applier's commit is visible. */
    size_t cap = w->reply_count * 40 + 3;
    char *arr = malloc(cap);
    if (!arr) {
        log_error("out of memory");
        abort();
    }
    size_t len = 0;
    arr[len++] = '{';
    for (size_t i = 0; i < w->reply_count; i++) {
        struct reply_msg *r = &w->o->pending[i];
        if (r->error)
            continue;
        len += (size_t)snprintf(arr + len, cap - len, "%s%s", len > 1 ? "," : "", r->message_id);
    }
    arr[len++] = '}';
    arr[len] = '\0';
    const char *params[1] = {arr};
    int rc = pgloop_query(
        w->pg, "SELECT message_id::text FROM saga.inbox WHERE message_id = ANY($1::uuid[])", 1,
        params, dedupe_cb, w);
    free(arr);
    if (rc)
        return;
}

static void start_reply_batch(struct worker *w)
{
    struct orchestrator *o = w->o;
    size_t n = o->pending_count;
    if (n > (size_t)o->settings.batch_size)
        n = (size_t)o->settings.batch_size;
    w->reply_count = n;
    /* The saga ids are validated uuids: safe to inline, which lets BEGIN and the locks share
     * one round trip. Sorted locking (ORDER BY id) keeps two appliers from deadlocking. */
    size_t cap = 256 + n * 40 + strlen(store_instance_columns);
    char *sql = malloc(cap);
    if (!sql) {
        log_error("out of memory");
        abort();
    }
    size_t len = (size_t)snprintf(sql, cap, "BEGIN; SELECT %s FROM saga.instances WHERE id IN (",
                                  store_instance_columns);
    size_t ids = 0;
    for (size_t i = 0; i < n; i++) {
        if (o->pending[i].error)
            continue;
        len += (size_t)snprintf(sql + len, cap - len, "%s'%s'", ids++ ? "," : "",
                                o->pending[i].saga_id);
    }
    if (!ids)
        len += (size_t)snprintf(sql + len, cap - len, "NULL");
    snprintf(sql + len, cap - len, ") ORDER BY id FOR UPDATE");
    w->state = W_BUSY;
    int rc = pgloop_query_simple(w->pg, sql, lock_cb, w);
    free(sql);
    if (rc)
        w->state = W_IDLE;
}

static void start_claim_batch(struct worker *w)
{
    char sql[2048];
    int n = w->o->settings.batch_size;
    /* Three index range scans, one per kind of work (each on its partial index, so a claim
     * costs the work it finds, not the size of saga.instances: an OR of the three let the
     * planner pick a sequential scan, measured at 5 ms per claim with 3,000 finished sagas).
     * Without a partition of the replies, due reply timeouts are left alone (see
     * assigned_partitions): claiming them would only lock them. */
    snprintf(sql, sizeof(sql),
             "BEGIN; SELECT %s FROM saga.instances WHERE id IN ("
             "(SELECT id FROM saga.instances WHERE status = 'pending' ORDER BY created_at "
             "LIMIT %d) UNION ALL "
             "(SELECT id FROM saga.instances WHERE deadline <= now()%s ORDER BY deadline "
             "LIMIT %d) UNION ALL "
             "(SELECT id FROM saga.instances WHERE pending_request IS NOT NULL ORDER BY updated_at "
             "LIMIT %d)) "
             "LIMIT %d FOR UPDATE SKIP LOCKED",
             store_instance_columns, n, w->o->assigned_partitions ? "" : " AND wait <> 'reply'", n,
             n, n);
    w->more = false;
    w->state = W_BUSY;
    if (pgloop_query_simple(w->pg, sql, claim_cb, w)) {
        w->state = W_IDLE;
        w->more = true;
    }
}

/* ---- connection and scheduling --------------------------------------------------------- */

static void listen_cb(struct pgloop *pg, PGresult *res, void *arg)
{
    struct worker *w = arg;
    if (!ok(res)) {
        failed(w, res, "LISTEN");
        return;
    }
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
    w->backoff_ms = 100;
    w->state = W_LISTEN;
    /* Every statement of ours touches a handful of rows through an index. The saga tables
     * grow fast and their statistics lag (autovacuum's analyze comes much later), and with
     * stale statistics the planner joined saga.apply_batch's few hundred rows to the whole of
     * saga.step_history by sequential scan: 43 ms per batch with 13,000 history rows,
     * measured. Nested loops over index scans are right for every query of this session. */
    const char *session = w->replies ? "SET enable_seqscan = off; SET enable_hashjoin = off; "
                                       "SET enable_mergejoin = off"
                                     : "SET enable_seqscan = off; SET enable_hashjoin = off; "
                                       "SET enable_mergejoin = off; LISTEN saga_wakeup";
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
        for (int i = 0; i < PQntuples(res); i++)
            for (int k = 0; k < 3; k++)
                if (!strcmp(PQgetvalue(res, i, 0), names[k]))
                    by_status[k] = strtod(PQgetvalue(res, i, 1), NULL);
        for (int k = 0; k < 3; k++) {
            char labels[64];
            snprintf(labels, sizeof(labels), "status=\"%s\"", names[k]);
            metrics_gauge_set("saga_sagas_in_flight", labels, by_status[k]);
        }
    }
    worker_kick(w);
}

/* Every few seconds, when idle: how many sagas are not finished (all orchestrators). */
static void count_in_flight(struct worker *w)
{
    w->counted_ms = orch_now_ms();
    w->state = W_BUSY;
    if (pgloop_query_simple(w->pg,
                            "SELECT status, count(*) FROM saga.instances WHERE status IN "
                            "('pending', 'running', 'compensating') GROUP BY status",
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
    return w->state == W_IDLE || w->state == W_BUSY;
}

void worker_destroy(struct worker *w)
{
    if (!w)
        return;
    ev_timer_stop(w->o->loop, &w->timer);
    ev_idle_stop(w->o->loop, &w->kick);
    batch_reset(w);
    pgloop_destroy(w->pg);
    free(w);
}
