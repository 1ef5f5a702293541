/* outbox_table: publishes one outbox table, in seq order, through one PostgreSQL session.
 *
 * The table's "lock connection" holds the session advisory lock that makes this relay the
 * table's only publisher, and runs every write: deletes and dead-letter moves. That is the
 * fencing: a relay whose connection (and so whose lock) is gone cannot delete anything, and a
 * new connection must win the lock again first. While leading, a second "claim connection"
 * runs the claims, so that PostgreSQL reads the next batch while the lock connection deletes
 * the last one (two backends, two cores; one connection serialised them). Claims are fenced
 * by a second advisory lock, the claim lock, which the claim session takes (once the lock
 * session leads) before its first claim and holds as long as it lives: two relays can never
 * claim at the same time. A relay whose lock session died without it noticing yet may still
 * claim, but the new leader, holding the leader lock, waits for the claim lock until the old
 * claim session ends (its relay closes it as soon as it notices, at its next delete or
 * backlog query, or the process dies); what the old one published meanwhile is published
 * again, with the same message-id, in the same order. (A fence read from pg_locks in every
 * claim cost PostgreSQL ~0.17 core at 1,000 claims/s, measured.)
 *
 * Claims do not lock rows and do not wait for acknowledgements (pipeline): the leader keeps
 * in memory which rows it has claimed and not yet deleted, with `cursor` the highest seq
 * claimed and `low` the lowest seq claimed and not yet deleted. The next claim reads
 *   seq < low  (rows committed late with a seq below everything in flight)  and  seq > cursor
 * so that a transaction that commits after a higher seq was published is still found once
 * the rows around it are gone. Acknowledged rows are deleted in batches (DELETE ... WHERE seq
 * = ANY($1)), rejected-for-good rows are moved to <table>_dead_letters, each in one statement.
 *
 * Crash at any point: rows are only deleted after Kafka acknowledged them, so a crash (of the
 * relay, the database connection or the broker) can only make rows be published again, with
 * the same message-id (the row's id). After a lost connection the in-memory state is
 * dropped (a new generation) and the table is read again from its head. */
#include <inttypes.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "log.h"
#include "metrics.h"
#include "holes.h"
#include "outbox_sql.h"
#include "relay.h"
#include "settings.h"

enum row_state { ROW_INFLIGHT, ROW_ACKED, ROW_DEAD, ROW_DONE };

struct batch;

struct topic_label {
    char *name;
    char labels[1400];
    struct metrics_series *published; /* relay_rows_published_total of this table and topic */
};

struct row {
    int64_t seq;
    uint32_t topic; /* index into the table's topics */
    uint32_t bytes; /* counted in in_producer_bytes while in the producer (see row_bytes) */
    struct batch *batch;
    enum row_state state;
    char *dead_error; /* owned when ROW_DEAD */
    int64_t created_ms;
};

struct batch {
    struct batch *next;
    struct outbox_table *table;
    unsigned gen;      /* the table generation that claimed it */
    size_t count;      /* rows claimed */
    size_t unresolved; /* rows still waiting for a delivery report */
    size_t done;       /* rows deleted or dead-lettered */
    size_t first_open; /* rows[0 .. first_open) are ROW_DONE */
    struct row rows[];
};

enum table_phase {
    PHASE_DISCONNECTED, /* waiting for the reconnect timer */
    PHASE_CONNECTING,
    PHASE_LOCKING,   /* pg_try_advisory_lock in flight */
    PHASE_STANDBY,   /* another relay leads; retry the lock on a timer */
    PHASE_LISTENING, /* LISTEN in flight */
    PHASE_LEADING,
};

enum claim_phase { CLAIM_DOWN, CLAIM_CONNECTING, CLAIM_PREPARING, CLAIM_READY };

struct row_vec {
    struct row **items;
    size_t count, cap;
};

struct dead_orphan {
    int64_t seq;
    char *error; /* owned */
};

struct outbox_table {
    struct relay *relay;
    const struct outbox_source *src;
    char label[256];    /* schema.table, for logs */
    char mlabels[1100]; /* table="schema.table",database="db",server="host:port", for metrics */
    struct metrics_series *ack_latency; /* relay_commit_to_ack_seconds: per row, looked up once */
    struct topic_label *topics;         /* every topic seen, for per-topic metrics */
    size_t topic_count;
    char redacted[512]; /* the conninfo without password */
    struct outbox_sql sql;
    struct pgloop *pg;
    enum table_phase phase;
    /* The claim connection (see the header comment); up only while leading. */
    struct pgloop *cpg;
    enum claim_phase cphase;
    ev_timer ctimer; /* its reconnect */
    int64_t cbackoff_ms;
    /* Monotonic ms since when the leader has had no ready claim session (not counting a wait
     * for the previous leader's claim lock); 0 while it has one. See give_up_leadership. */
    int64_t claim_down_since;
    ev_timer timer; /* reconnect, standby retry, poll fallback */
    ev_idle kick;   /* runs the next step from the loop */
    int64_t backoff_ms;
    int64_t backlog_ms; /* when the backlog gauges were last measured */
    unsigned gen;
    unsigned claim_gen;   /* the generation that sent the claim in flight */
    int claim_limit;      /* the LIMIT of the claim in flight */
    int64_t claim_budget; /* its byte cap ($5 of the claim) */
    /* The claim in flight: its number, low watermark and cursor (see holes.h). */
    uint64_t claims_sent, claim_no;
    int64_t claim_low, claim_cursor;
    struct holes *holes;
    uint64_t sweep_no;       /* the sweep in flight */
    unsigned sweep_gen;      /* the generation that sent it */
    int64_t sweep_ms;        /* when the last sweep was sent (or a pause's end) */
    int64_t sweep_every_ms;  /* SWEEP_MIN_MS, doubling while the oldest hole stays */
    int64_t sweep_floor;     /* the oldest hole when the last sweep was sent */
    bool cache_warned;       /* the seq sequence's CACHE is not 1 (logged once) */
    int64_t fail_backoff_ms; /* pause after a delivery failure; doubles (note_failure) */
    int64_t fail_seq;        /* the row whose failure set it: its delivery resets it */
    int64_t fail_last_ms;    /* when the last failure was noted (monotonic ms) */
    unsigned failure_gen;    /* the generation whose failed rows were noted */
    bool failure_noted;
    int64_t claim_hold_until;  /* no claim before this (monotonic ms) */
    bool claiming;             /* false after SIGTERM */
    bool released;             /* outbox_table_release: no session, never reconnects */
    size_t in_producer;        /* messages produced, not yet reported (any generation) */
    int64_t in_producer_bytes; /* their bytes (row_bytes), bounded by RELAY_MAX_INFLIGHT_BYTES */
    double row_bytes_avg;      /* bytes per row of recent claims; 0 until the first claim */
    uint32_t row_bytes_max;    /* the largest row claimed in this process (row_bytes) */
    uint64_t rows_seen;        /* rows claimed in this process */
    int64_t gauge_bytes;       /* in_producer_bytes as relay_inflight_bytes shows it */
    struct metrics_series *inflight_bytes; /* relay_inflight_bytes of this table */
    bool more;                             /* the last claim was full or a NOTIFY arrived */
    bool reprepared; /* the claim was prepared again after a failure, none succeeded since */
    int64_t cursor;
    size_t inflight; /* claimed rows not yet deleted (this generation) */
    struct batch *head, *tail;
    struct row_vec acked;    /* waiting for DELETE */
    struct row_vec deleting; /* the DELETE in flight */
    struct row *dead_row;    /* the dead-letter move in flight */
    struct row_vec dead;     /* waiting for the dead-letter move */
    /* Rows Kafka rejected for good whose move a reset interrupted (the rows of the dead list
     * belong to batches a reset lets go): the move still happens, before the next claim. */
    struct dead_orphan *orphans;
    size_t orphan_count, orphan_cap;
    bool orphan_inflight; /* orphan_sent is the move in flight */
    struct dead_orphan orphan_sent;
    int64_t dead_retry_ms; /* after a failed dead-letter move: none before (monotonic ms) */
    int64_t
        orphan_gate_ms; /* when orphans last appeared: claims wait for their moves 1 s at most */
    /* Rows just moved by an orphan move while claims ran (a claim sent before the move's
     * answer may have read them): seqs, and the last claim number that may have. */
    int64_t *moved;
    size_t moved_count, moved_cap;
    uint64_t moved_claim_no;
};

static void step(struct outbox_table *t);

static uint32_t topic_index(struct outbox_table *t, const char *topic)
{
    for (size_t i = 0; i < t->topic_count; i++)
        if (!strcmp(t->topics[i].name, topic))
            return (uint32_t)i;
    struct topic_label *grown = realloc(t->topics, (t->topic_count + 1) * sizeof(*grown));
    if (!grown) {
        log_error("out of memory adding a topic");
        abort();
    }
    t->topics = grown;
    struct topic_label *tl = &t->topics[t->topic_count];
    tl->name = strdup(topic);
    if (!tl->name) {
        log_error("out of memory adding a topic");
        abort();
    }
    char topic_label[300];
    metrics_label(topic_label, sizeof(topic_label), "topic", topic);
    snprintf(tl->labels, sizeof(tl->labels), "%s,%s", t->mlabels, topic_label);
    tl->published = metrics_series("relay_rows_published_total", tl->labels, "counter");
    return (uint32_t)t->topic_count++;
}

static void vec_push(struct row_vec *v, struct row *r)
{
    if (v->count == v->cap) {
        size_t cap = v->cap ? v->cap * 2 : 1024;
        struct row **items = realloc(v->items, cap * sizeof(*items));
        if (!items) {
            log_error("out of memory growing a row list");
            abort();
        }
        v->items = items;
        v->cap = cap;
    }
    v->items[v->count++] = r;
}

static void kick(struct outbox_table *t)
{
    if (!ev_is_active(&t->kick))
        ev_idle_start(t->relay->loop, &t->kick);
}

static void batch_free_if_unused(struct batch *b)
{
    if (b->unresolved)
        return;
    for (size_t i = 0; i < b->count; i++)
        free(b->rows[i].dead_error);
    free(b);
}

/* Forgets every claimed row: they stay in the table and will be claimed again. Batches still
 * in the producer are freed by their last delivery report. */
static void orphan_push(struct outbox_table *t, int64_t seq, const char *error)
{
    for (size_t i = 0; i < t->orphan_count; i++)
        if (t->orphans[i].seq == seq)
            return; /* known already */
    if (!t->orphan_count && !t->orphan_inflight)
        t->orphan_gate_ms = relay_now_ms(); /* see claim_due in step */
    if (t->orphan_count == t->orphan_cap) {
        size_t cap = t->orphan_cap ? t->orphan_cap * 2 : 16;
        struct dead_orphan *o = realloc(t->orphans, cap * sizeof(*o));
        if (!o) {
            log_error("out of memory keeping a dead-letter move");
            abort();
        }
        t->orphans = o;
        t->orphan_cap = cap;
    }
    char *e = strdup(error ? error : "rejected");
    if (!e) {
        log_error("out of memory keeping a dead-letter move");
        abort();
    }
    t->orphans[t->orphan_count++] = (struct dead_orphan){seq, e};
}

/* If seq is a row rejected for good whose move is still to be sent, takes it out of the list
 * and returns its error (the caller owns it); else NULL. */
static char *orphan_take(struct outbox_table *t, int64_t seq)
{
    for (size_t i = 0; i < t->orphan_count; i++)
        if (t->orphans[i].seq == seq) {
            char *e = t->orphans[i].error;
            t->orphans[i] = t->orphans[--t->orphan_count];
            return e;
        }
    return NULL;
}

/* Before closing the lock session with pgloop_close (which drops the callbacks in flight):
 * a dead-letter move in flight will never be answered, so it is kept to be sent again (moving
 * a row twice moves nothing). Without this the table waited for that answer for ever. */
static void dead_moves_abandon(struct outbox_table *t)
{
    if (t->orphan_inflight) {
        orphan_push(t, t->orphan_sent.seq, t->orphan_sent.error);
        free(t->orphan_sent.error);
        t->orphan_inflight = false;
    }
    if (t->dead_row) {
        orphan_push(t, t->dead_row->seq, t->dead_row->dead_error);
        t->dead_row = NULL;
    }
}

static void reset_state(struct outbox_table *t)
{
    /* A row Kafka rejected for good stays rejected: a reset (a delivery failure of another
     * row, a new producer) must not publish it again. Without this, a row a broker rejects
     * after later rows of its partition were queued came back after every producer restart
     * (enable.gapless.guarantee), and never reached the dead-letter table. */
    for (size_t i = 0; i < t->dead.count; i++)
        orphan_push(t, t->dead.items[i]->seq, t->dead.items[i]->dead_error);
    if (t->dead_row) {
        /* Its move is in flight on a live session (a session closed without its callbacks
         * goes through dead_moves_abandon first): dead_result_cb takes it as an orphan. */
        char *e = strdup(t->dead_row->dead_error ? t->dead_row->dead_error : "rejected");
        if (!e) {
            log_error("out of memory keeping a dead-letter move");
            abort();
        }
        t->orphan_sent = (struct dead_orphan){t->dead_row->seq, e};
        t->orphan_inflight = true;
        t->dead_row = NULL;
    }
    t->gen++;
    struct batch *b = t->head;
    while (b) {
        struct batch *next = b->next;
        b->next = NULL;
        batch_free_if_unused(b);
        b = next;
    }
    t->head = t->tail = NULL;
    t->acked.count = t->deleting.count = t->dead.count = 0;
    t->dead_row = NULL;
    t->cursor = 0;
    t->inflight = 0;
    t->more = true;
    holes_clear(t->holes); /* the new generation reads the table from its head */
}

static void mark_done(struct outbox_table *t, struct row *r)
{
    r->state = ROW_DONE;
    r->batch->done++;
    t->inflight--;
}

/* Drops fully deleted batches from the head and returns the lowest seq not yet deleted,
 * or cursor + 1 when nothing is claimed. */
static int64_t low_watermark(struct outbox_table *t)
{
    while (t->head && t->head->done == t->head->count && !t->head->unresolved) {
        struct batch *b = t->head;
        t->head = b->next;
        if (!t->head)
            t->tail = NULL;
        batch_free_if_unused(b);
    }
    int64_t low = t->cursor + 1;
    for (struct batch *b = t->head; b; b = b->next) {
        while (b->first_open < b->count && b->rows[b->first_open].state == ROW_DONE)
            b->first_open++;
        if (b->first_open < b->count && b->rows[b->first_open].seq < low)
            low = b->rows[b->first_open].seq;
    }
    return low;
}

int64_t relay_now_ms(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (int64_t)now.tv_sec * 1000 + now.tv_nsec / 1000000;
}

/* The delivery-failure pause's next value: 100 ms, doubling while failures follow each other
 * (RELAY_RECONNECT_MAX at most), from 100 ms again when the last one is older than that. It
 * also goes back when the failed row is delivered (fail_seq). */
static int64_t next_fail_backoff(struct outbox_table *t, int64_t seq)
{
    int64_t now = relay_now_ms(), max = t->relay->settings.reconnect_max_ms;
    if (t->fail_backoff_ms && now - t->fail_last_ms > max + t->fail_backoff_ms)
        t->fail_backoff_ms = 0;
    t->fail_backoff_ms = t->fail_backoff_ms ? t->fail_backoff_ms * 2 : 100;
    if (t->fail_backoff_ms > max)
        t->fail_backoff_ms = max;
    t->fail_last_ms = now;
    t->fail_seq = seq;
    return t->fail_backoff_ms;
}

static void set_phase(struct outbox_table *t, enum table_phase phase)
{
    t->phase = phase;
    metrics_gauge_set("relay_table_leader", t->mlabels, phase == PHASE_LEADING ? 1 : 0);
}

static void schedule(struct outbox_table *t, int64_t ms)
{
    ev_timer_stop(t->relay->loop, &t->timer);
    ev_timer_set(&t->timer, (double)ms / 1000.0, 0.0);
    ev_timer_start(t->relay->loop, &t->timer);
}

/* Closes the claim connection; a claim in flight is dropped unanswered (its rows stay in the
 * table, and the cursor only moves when a claim's rows arrive). */
static void claim_close(struct outbox_table *t)
{
    pgloop_close(t->cpg);
    t->cphase = CLAIM_DOWN;
    ev_timer_stop(t->relay->loop, &t->ctimer);
}

/* A leader whose claim session has not been ready for this many RELAY_LEADER_RETRY periods
 * lets the table go (give_up_leadership). */
#define CLAIM_GIVE_UP_RETRIES 10

static void claim_connect(struct outbox_table *t)
{
    t->cphase = CLAIM_CONNECTING;
    if (pgloop_connect(t->cpg)) {
        t->cphase = CLAIM_DOWN;
        ev_timer_set(&t->ctimer, (double)t->cbackoff_ms / 1000.0, 0.0);
        ev_timer_start(t->relay->loop, &t->ctimer);
    }
}

static void claim_prepared_cb(struct pgloop *pg, PGresult *res, void *arg)
{
    struct outbox_table *t = arg;
    if (!res)
        return; /* lost: claim_state_cb follows */
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        log_at(LOG_ERROR, LOG_FIELDS("table", t->label, "error", PQresultErrorMessage(res)),
               "preparing the claim failed");
        if (!t->claim_down_since)
            t->claim_down_since = relay_now_ms(); /* also when it had been ready (prepared again) */
        claim_close(t);
        /* Again after the doubling claim backoff (not a hot loop of PREPAREs, but tried
         * again before give_up_leadership's bound). */
        ev_timer_set(&t->ctimer, (double)t->cbackoff_ms / 1000.0, 0.0);
        ev_timer_start(t->relay->loop, &t->ctimer);
        t->cbackoff_ms *= 2;
        if (t->cbackoff_ms > t->relay->settings.reconnect_max_ms)
            t->cbackoff_ms = t->relay->settings.reconnect_max_ms;
        return;
    }
    if (strcmp(PQgetvalue(res, 0, 0), "t")) {
        /* The claim lock is held by another session: the claim session of a previous leader
         * that has not yet noticed it lost the leader lock. It may still be claiming; wait
         * until it lets go (see the header comment). */
        log_at(LOG_WARN, LOG_FIELDS("table", t->label),
               "the previous leader's claim session still holds the claim lock; waiting for it "
               "to end before publishing");
        t->claim_down_since = relay_now_ms(); /* a wait no other relay would end sooner */
        claim_close(t);
        ev_timer_set(&t->ctimer, (double)t->relay->settings.leader_retry_ms / 1000.0, 0.0);
        ev_timer_start(t->relay->loop, &t->ctimer);
        return;
    }
    t->cphase = CLAIM_READY;
    t->cbackoff_ms = 100;
    t->claim_down_since = 0;
    t->more = true;
    kick(t);
}

static void claim_state_cb(struct pgloop *pg, bool ok, void *arg)
{
    struct outbox_table *t = arg;
    if (ok) {
        t->cphase = CLAIM_PREPARING;
        t->reprepared = false; /* a new session prepares from scratch */
        if (pgloop_query_simple(t->cpg, t->sql.claim_session, claim_prepared_cb, t))
            return; /* a failed send is reported through this callback */
        return;
    }
    log_at(LOG_WARN, LOG_FIELDS("table", t->label, "error", pgloop_error(t->cpg)),
           "lost the claim connection; reconnecting (leadership kept)");
    if (!t->claim_down_since)
        t->claim_down_since = relay_now_ms();
    claim_close(t);
    metrics_counter_add("relay_db_reconnects_total", t->mlabels, 1);
    if (t->phase != PHASE_LEADING)
        return;
    ev_timer_set(&t->ctimer, (double)t->cbackoff_ms / 1000.0, 0.0);
    ev_timer_start(t->relay->loop, &t->ctimer);
    t->cbackoff_ms *= 2;
    if (t->cbackoff_ms > t->relay->settings.reconnect_max_ms)
        t->cbackoff_ms = t->relay->settings.reconnect_max_ms;
}

static void give_up_leadership(struct outbox_table *t);

/* True when the leader has had no working claim session for long enough to let the table go:
 * CLAIM_GIVE_UP_RETRIES leader retries, and RELAY_RECONNECT_MAX at least (a short leader
 * retry must not give a table up while a slow connect is still under way), and only while
 * claiming (a SIGTERM drain or a removed table needs no claim session). */
static bool claim_session_hopeless(const struct outbox_table *t)
{
    if (!t->claim_down_since || !t->claiming || t->cphase == CLAIM_READY)
        return false;
    int64_t bound = CLAIM_GIVE_UP_RETRIES * t->relay->settings.leader_retry_ms;
    if (bound < t->relay->settings.reconnect_max_ms)
        bound = t->relay->settings.reconnect_max_ms;
    return relay_now_ms() - t->claim_down_since >= bound;
}

static void ctimer_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct outbox_table *t = w->data;
    if (t->phase != PHASE_LEADING || t->cphase != CLAIM_DOWN)
        return;
    if (claim_session_hopeless(t))
        give_up_leadership(t);
    else
        claim_connect(t);
}

static void connection_lost(struct outbox_table *t)
{
    if (t->phase == PHASE_LEADING)
        log_at(LOG_WARN, LOG_FIELDS("table", t->label, "error", pgloop_error(t->pg)),
               "lost the database connection; leadership released, claimed rows will be "
               "published again");
    else
        log_at(LOG_WARN, LOG_FIELDS("table", t->label, "error", pgloop_error(t->pg)),
               "cannot connect to the database; retrying");
    dead_moves_abandon(t);
    pgloop_close(t->pg);
    claim_close(t);
    reset_state(t);
    set_phase(t, PHASE_DISCONNECTED);
    metrics_counter_add("relay_db_reconnects_total", t->mlabels, 1);
    schedule(t, t->backoff_ms);
    t->backoff_ms *= 2;
    if (t->backoff_ms > t->relay->settings.reconnect_max_ms)
        t->backoff_ms = t->relay->settings.reconnect_max_ms;
}

/* The leader cannot claim (its claim session cannot connect or prepare: a per-role
 * connection limit, max_connections, a pooler that lets one session through): holding the
 * leader lock would keep every standby from publishing the table for as long as that lasts.
 * Let the table go as a lost connection does (nothing of ours can be deleted any more; the
 * claimed rows are published again by whoever leads), and try the lock again only after a
 * few standby retries, so that a standby takes it first. */
static void give_up_leadership(struct outbox_table *t)
{
    log_at(LOG_WARN, LOG_FIELDS("table", t->label, "error", pgloop_error(t->cpg)),
           "no claim session for %lld ms; leadership released so that another relay can "
           "publish this table (claimed rows will be published again)",
           (long long)(relay_now_ms() - t->claim_down_since));
    dead_moves_abandon(t);
    pgloop_close(t->pg);
    claim_close(t);
    reset_state(t);
    t->claim_down_since = 0;
    set_phase(t, PHASE_DISCONNECTED);
    schedule(t, 3 * t->relay->settings.leader_retry_ms);
}

static void state_cb(struct pgloop *pg, bool ok, void *arg)
{
    struct outbox_table *t = arg;
    if (!ok) {
        connection_lost(t);
        return;
    }
    log_at(LOG_DEBUG, LOG_FIELDS("table", t->label), "connected");
    set_phase(t, PHASE_LOCKING);
    kick(t);
}

static void notify_cb(struct pgloop *pg, const char *channel, const char *payload, void *arg)
{
    struct outbox_table *t = arg;
    if (payload && strcmp(payload, t->label))
        return; /* another table of the same database */
    t->more = true;
    kick(t);
}

static void timer_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct outbox_table *t = w->data;
    if (t->released)
        return;
    switch (t->phase) {
    case PHASE_DISCONNECTED:
        set_phase(t, PHASE_CONNECTING);
        if (pgloop_connect(t->pg))
            connection_lost(t);
        return;
    case PHASE_STANDBY:
        set_phase(t, PHASE_LOCKING);
        kick(t);
        return;
    case PHASE_LEADING:
        t->more = true; /* fallback poll: notifications are lost while disconnected */
        kick(t);
        return;
    default:
        return;
    }
}

static void kick_cb(struct ev_loop *loop, ev_idle *w, int revents)
{
    struct outbox_table *t = w->data;
    ev_idle_stop(loop, w);
    step(t);
}

static bool result_ok(struct outbox_table *t, PGresult *res, const char *what)
{
    if (!res)
        return false; /* connection lost: state_cb follows */
    ExecStatusType st = PQresultStatus(res);
    if (st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK)
        return true;
    const char *msg = PQresultErrorMessage(res);
    log_at(LOG_ERROR, LOG_FIELDS("table", t->label, "error", msg), "%s failed", what);
    return false;
}

static void lock_result_cb(struct pgloop *pg, PGresult *res, void *arg)
{
    struct outbox_table *t = arg;
    if (!result_ok(t, res, "leader lock")) {
        if (res)
            schedule(t, t->relay->settings.leader_retry_ms);
        return;
    }
    if (strcmp(PQgetvalue(res, 0, 0), "t")) {
        if (t->phase != PHASE_STANDBY)
            log_at(LOG_INFO, LOG_FIELDS("table", t->label),
                   "another relay publishes this table; standing by");
        set_phase(t, PHASE_STANDBY);
        schedule(t, t->relay->settings.leader_retry_ms);
        return;
    }
    set_phase(t, PHASE_LISTENING);
    kick(t);
}

static void listen_result_cb(struct pgloop *pg, PGresult *res, void *arg)
{
    struct outbox_table *t = arg;
    if (!result_ok(t, res, "LISTEN"))
        return;
    log_at(LOG_INFO, LOG_FIELDS("table", t->label), "leading: publishing this table");
    t->backoff_ms = 100;
    t->dead_retry_ms = 0; /* a new session: moves are tried at once */
    reset_state(t);
    set_phase(t, PHASE_LEADING);
    if (t->cphase != CLAIM_READY)
        t->claim_down_since = relay_now_ms();
    if (t->cphase == CLAIM_DOWN)
        claim_connect(t);
    kick(t);
}

static rd_kafka_headers_t *make_headers(const char *id, const char *event_type, const char *extra,
                                        size_t extra_len)
{
    rd_kafka_headers_t *h = rd_kafka_headers_new(extra_len <= 2 ? 2 : 12);
    rd_kafka_header_add(h, "message-id", -1, id, -1);
    rd_kafka_header_add(h, "event-type", -1, event_type, -1);
    if (extra_len <= 2)
        return h; /* "{}" */
    cJSON *obj = cJSON_ParseWithLength(extra, extra_len);
    if (cJSON_IsObject(obj)) {
        for (cJSON *c = obj->child; c; c = c->next) {
            if (!strcmp(c->string, "message-id") || !strcmp(c->string, "event-type"))
                continue; /* the row's own columns win */
            if (cJSON_IsString(c)) {
                rd_kafka_header_add(h, c->string, -1, c->valuestring, -1);
            } else {
                char *text = cJSON_PrintUnformatted(c);
                if (text)
                    rd_kafka_header_add(h, c->string, -1, text, -1);
                free(text);
            }
        }
    }
    cJSON_Delete(obj);
    return h;
}

/* The claim's columns arrive in binary format (see send_claim): */
static int64_t be64(const char *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = v << 8 | (unsigned char)p[i];
    return (int64_t)v;
}

/* timestamptz: microseconds since 2000-01-01 00:00 UTC -> milliseconds since the epoch. */
static int64_t pg_time_ms(const char *p)
{
    int64_t us = be64(p);
    int64_t ms = us / 1000 - (us % 1000 < 0 ? 1 : 0);
    return ms + INT64_C(946684800000);
}

static void uuid_text(const char *raw, char out[37])
{
    static const char hex[] = "0123456789abcdef";
    size_t o = 0;
    for (int i = 0; i < 16; i++) {
        if (i == 4 || i == 6 || i == 8 || i == 10)
            out[o++] = '-';
        out[o++] = hex[(unsigned char)raw[i] >> 4];
        out[o++] = hex[(unsigned char)raw[i] & 15];
    }
    out[o] = '\0';
}

/* payload and headers come as text (outbox_sql.c renders them): in binary format, the text's
 * bytes. */
static void text_value(PGresult *res, int row, int col, const char **text, size_t *len)
{
    *text = PQgetvalue(res, row, col);
    *len = (size_t)PQgetlength(res, row, col);
}

/* The fixed-size columns have their size, and payload and headers (NOT NULL columns) are not
 * NULL. */
static bool claim_shape_ok(PGresult *res)
{
    if (PQnfields(res) != 9)
        return false;
    for (int i = 0; i < PQntuples(res); i++)
        if (PQgetlength(res, i, 0) != 8 || PQgetlength(res, i, 1) != 16 ||
            PQgetlength(res, i, 7) != 8 || PQgetlength(res, i, 8) != 8 || PQgetisnull(res, i, 5) ||
            PQgetisnull(res, i, 6))
            return false;
    return true;
}

/* What one row costs while the producer holds it: the payload, the key and the headers the
 * producer copies (message-id, event-type and the headers column, counted as its JSON text:
 * names, values and a few bytes of quotes). librdkafka's own per-message overhead (a few hundred
 * bytes) is not counted: RELAY_MAX_INFLIGHT bounds the number of messages. */
/* What the relay holds of a row in the producer. relay_claim_capped (outbox_sql.c) counts
 * the same: keep the two together. */
static uint32_t row_bytes(size_t payload_len, size_t key_len, size_t extra_len, size_t type_len)
{
    uint64_t n = (uint64_t)payload_len + key_len + extra_len + type_len + sizeof("message-id") - 1 +
                 36 + sizeof("event-type") - 1;
    return n > UINT32_MAX ? UINT32_MAX : (uint32_t)n;
}

/* The row size the next claims expect (claim_room): a claim of larger rows than expected
 * raises it at once, so that only that one claim overshoots; a claim of smaller rows lowers
 * it by half the difference, so that one large row among small ones does not keep claims
 * small for long. */
static void learn_row_bytes(struct outbox_table *t, int64_t bytes, int rows)
{
    if (rows <= 0)
        return;
    double avg = (double)bytes / rows;
    if (avg < 1)
        avg = 1;
    if (avg >= t->row_bytes_avg)
        t->row_bytes_avg = avg;
    else
        t->row_bytes_avg = (t->row_bytes_avg + avg) / 2;
}

/* relay_inflight_bytes follows in_producer_bytes; updated per claim and per step, not per
 * delivery report (a metrics update is a mutex). */
static void note_bytes(struct outbox_table *t)
{
    if (t->released || t->in_producer_bytes == t->gauge_bytes)
        return;
    metrics_series_add(t->inflight_bytes, (double)(t->in_producer_bytes - t->gauge_bytes));
    t->gauge_bytes = t->in_producer_bytes;
}

static void note_holes(struct outbox_table *t)
{
    metrics_gauge_set("relay_claim_holes", t->mlabels, (double)holes_count(t->holes));
}

static void claim_result_cb(struct pgloop *pg, PGresult *res, void *arg)
{
    struct outbox_table *t = arg;
    if (!result_ok(t, res, "claim")) {
        if (!res)
            return;
        const char *state = PQresultErrorField(res, PG_DIAG_SQLSTATE);
        if (state && (!strcmp(state, "0A000") || !strcmp(state, "26000")) && !t->reprepared) {
            /* The prepared claim itself may be broken: a column it returns changed its type
             * ("cached plan must not change result type", at every EXECUTE) or the statement
             * is gone. It is prepared again on the same session, which keeps the claim lock
             * (taking it again only stacks it); nothing claimed is lost: the cursor moves only
             * with rows. Once per failure streak: if the fresh statement fails the same way,
             * the error is not the statement's and the claim waits like any failed one. */
            log_at(LOG_WARN, LOG_FIELDS("table", t->label, "sqlstate", state),
                   "the prepared claim no longer runs; preparing it again");
            t->reprepared = true;
            char *sql = NULL;
            if (asprintf(&sql, "DEALLOCATE ALL; %s", t->sql.claim_session) < 0) {
                log_error("out of memory preparing the claim");
                abort();
            }
            t->cphase = CLAIM_PREPARING;
            if (!t->claim_down_since)
                t->claim_down_since = relay_now_ms(); /* a PREPARE that hangs counts too */
            if (pgloop_query_simple(t->cpg, sql, claim_prepared_cb, t))
                log_at(LOG_WARN, LOG_FIELDS("table", t->label),
                       "cannot send the claim's preparation; the claim session reconnects");
            free(sql); /* a failed send is a lost session: claim_state_cb follows */
            return;
        }
        schedule(t, 1000);
        return;
    }
    t->reprepared = false; /* a claim ran: a later 0A000/26000 may be the statement again */
    if (t->claim_gen != t->gen) {
        /* Sent before a reset (a delivery failed meanwhile): its rows come from above the old
         * cursor. Producing them now would put them before the earlier rows that the new
         * generation publishes again, out of order per key. They stay in the table. */
        t->more = true;
        kick(t);
        return;
    }
    if (!claim_shape_ok(res)) {
        /* Cannot happen with the columns outbox_table_check accepted; never guess. */
        log_at(LOG_ERROR, LOG_FIELDS("table", t->label),
               "claim returned columns of an unexpected binary shape; retrying");
        schedule(t, 1000);
        return;
    }
    int n = PQntuples(res);
    /* Full: as many rows as asked for, or the byte cap reached (the statement may have cut
     * rows after the last one; when the last row merely happens to reach it, one more claim
     * finds nothing). A full claim may have left rows behind in either branch. */
    bool full =
        n >= t->claim_limit || (n > 0 && be64(PQgetvalue(res, n - 1, 8)) >= t->claim_budget);
    /* send_claim cleared `more`; if it is set now, a NOTIFY (or the poll) came while the claim
     * ran, whose snapshot may not have seen those rows: keep it, or they wait for the next
     * poll. A full claim sets it too; full means as many rows as asked for, which is fewer
     * than RELAY_BATCH_SIZE when RELAY_MAX_INFLIGHT's room limited it (comparing with the
     * batch size left the rest of the backlog to the poll: 12,000-15,000 rows/s). */
    if (full)
        t->more = true;
    if (n == 0) {
        holes_claim_done(t->holes, t->claim_no, t->claim_low); /* searched: nothing there */
        note_holes(t);
        kick(t);
        return;
    }
    struct batch *b = calloc(1, sizeof(*b) + (size_t)n * sizeof(struct row));
    if (!b) {
        log_error("out of memory claiming %d rows", n);
        abort();
    }
    b->table = t;
    b->gen = t->gen;
    int produced = 0;
    /* Holes: seq values above the claim's cursor that it skipped (see holes.h). `searched`:
     * how far below the watermark this claim has looked at every row: all of [floor, low)
     * unless the LIMIT cut the lower branch or the producer refused a row (rows not taken
     * are not handled, and a hole's row must never be forgotten unhandled). */
    int64_t expect = t->claim_cursor + 1, searched = t->claim_low;
    int64_t claim_bytes = 0; /* of the rows looked at (all n unless the producer refused one) */
    int looked = 0;
    if (full) {
        int64_t last = be64(PQgetvalue(res, n - 1, 0));
        if (last < t->claim_low)
            searched = last + 1;
    }
    for (int i = 0; i < n; i++) {
        struct row *r = &b->rows[i];
        r->seq = be64(PQgetvalue(res, i, 0));
        r->batch = b;
        r->created_ms = pg_time_ms(PQgetvalue(res, i, 7));
        looked++;
        char id[37];
        uuid_text(PQgetvalue(res, i, 1), id);
        const char *topic = PQgetvalue(res, i, 2); /* text in binary: its bytes, NUL-ended */
        r->topic = topic_index(t, topic);
        bool key_null = PQgetisnull(res, i, 3);
        const char *key = PQgetvalue(res, i, 3);
        const char *payload = "", *extra = "";
        size_t payload_len = 0, extra_len = 0;
        text_value(res, i, 5, &payload, &payload_len);
        text_value(res, i, 6, &extra, &extra_len);
        const char *event_type = PQgetvalue(res, i, 4);
        rd_kafka_headers_t *h = make_headers(id, event_type, extra, extra_len);
        size_t key_len = key_null ? 0 : (size_t)PQgetlength(res, i, 3);
        r->bytes = row_bytes(payload_len, key_len, extra_len, strlen(event_type));
        claim_bytes += r->bytes;
        if (r->bytes > t->row_bytes_max)
            t->row_bytes_max = r->bytes;
        b->count++;
        b->unresolved++;
        /* A row Kafka rejected for good whose move a reset interrupted: not produced again
         * (that would be one more rejection, and with the gapless guarantee one more new
         * producer), moved as a rejected row. */
        char *rejected = t->orphan_count ? orphan_take(t, r->seq) : NULL;
        const char *known = NULL;
        if (!rejected && t->orphan_inflight && t->orphan_sent.seq == r->seq)
            known = t->orphan_sent.error;
        for (size_t m = 0; !rejected && !known && m < t->moved_count; m++)
            if (t->moved[m] == r->seq)
                known = "rejected by Kafka for good (moved already)";
        if (known && !(rejected = strdup(known))) {
            log_error("out of memory keeping a rejected row out");
            abort();
        }
        rd_kafka_resp_err_t err =
            rejected ? RD_KAFKA_RESP_ERR_INVALID_RECORD
                     : relay_produce(t->relay, topic, key_null ? NULL : key, key_len, payload,
                                     payload_len, r->created_ms, h, r);
        if (err == RD_KAFKA_RESP_ERR_NO_ERROR || relay_error_is_permanent(err)) {
            if (r->seq > t->claim_cursor) {
                if (r->seq > expect)
                    holes_open(t->holes, expect, r->seq - 1);
                expect = r->seq + 1;
            } else {
                holes_fill(t->holes, r->seq);
            }
        }
        if (err == RD_KAFKA_RESP_ERR_NO_ERROR) {
            produced++;
            t->in_producer++;
            t->in_producer_bytes += r->bytes;
            t->inflight++;
            if (r->seq > t->cursor)
                t->cursor = r->seq;
            continue;
        }
        rd_kafka_headers_destroy(h);
        b->unresolved--;
        if (relay_error_is_permanent(err)) {
            t->inflight++;
            if (r->seq > t->cursor)
                t->cursor = r->seq;
            r->state = ROW_DEAD;
            r->dead_error = rejected ? rejected : strdup(rd_kafka_err2str(err));
            vec_push(&t->dead, r);
            continue;
        }
        /* Refused, not for good: leave this row and the rest of the batch in the table; they
         * are claimed again (above the cursor, or still holes below it). A full local queue
         * empties by itself: again in 100 ms. Anything else (the producer remembers that the
         * broker refused the topic, TOPIC_AUTHORIZATION_FAILED say, until its next metadata
         * refresh) waits the doubling pause of delivery failures, so that it is neither a
         * claim every 100 ms nor a WARN line each time. */
        b->count--;
        if (r->seq < searched)
            searched = r->seq;
        if (err == RD_KAFKA_RESP_ERR__FATAL || t->relay->producer_down) {
            /* The producer stopped while this claim ran: a new one comes (producer.c) and
             * kicks the table; nothing to report. */
            t->more = true;
            break;
        }
        int64_t pause = 100;
        if (err != RD_KAFKA_RESP_ERR__QUEUE_FULL) {
            pause = next_fail_backoff(t, r->seq);
            metrics_counter_add("relay_publish_errors_total", t->mlabels, 1);
        }
        log_at(LOG_WARN,
               LOG_FIELDS("table", t->label, "topic", topic, "error", rd_kafka_err2str(err)),
               "the producer refused a message; claiming it again in %" PRId64 " ms", pause);
        t->more = false;
        t->claim_hold_until = relay_now_ms() + pause; /* a NOTIFY does not cut the pause short */
        schedule(t, pause);
        break;
    }
    if (b->count == 0) {
        free(b);
    } else {
        if (t->tail)
            t->tail->next = b;
        else
            t->head = b;
        t->tail = b;
    }
    if (t->moved_count && t->claim_no >= t->moved_claim_no)
        t->moved_count = 0; /* the claims that could have read them are in */
    holes_claim_done(t->holes, t->claim_no, searched);
    note_holes(t);
    learn_row_bytes(t, claim_bytes, looked);
    t->rows_seen += (uint64_t)looked;
    note_bytes(t);
    metrics_counter_add("relay_rows_claimed_total", t->mlabels, (uint64_t)produced);
    metrics_histogram_observe("relay_claim_batch_rows", t->mlabels, (double)n);
    kick(t);
}

/* A sweep's result: the transactions holding RowExclusiveLock on the table now. */
static void sweep_result_cb(struct pgloop *pg, PGresult *res, void *arg)
{
    struct outbox_table *t = arg;
    if (!result_ok(t, res, "writers sweep"))
        return; /* a statement error: the holes stay (safe), the next sweep tries again */
    if (t->sweep_gen != t->gen || PQntuples(res) < 1) {
        kick(t);
        return;
    }
    /* The rule of holes.h needs every seq value to come from nextval inside the INSERT, one
     * at a time: with a sequence CACHE above 1 a backend hands out values it took long
     * before, so a hole can be filled by a transaction that held no lock when it was seen.
     * Then holes are never forgotten (the claim reads from the first one, as before holes
     * existed), and sweeps pause for a minute. */
    const char *cache = PQgetvalue(res, 0, 0);
    if (strcmp(cache, "1")) {
        if (!t->cache_warned)
            log_at(LOG_WARN, LOG_FIELDS("table", t->label, "cache", cache[0] ? cache : "unknown"),
                   "the seq column's sequence does not have CACHE 1 (or is not an identity or "
                   "serial sequence): seq values may commit far out of order, so skipped ones "
                   "are searched for ever; set CACHE 1 on the outbox's seq");
        t->cache_warned = true;
        t->sweep_ms = relay_now_ms() + 60000;
        kick(t);
        return;
    }
    int n = PQntuples(res);
    const char **vx = calloc((size_t)n + 1, sizeof(*vx));
    if (!vx) {
        log_error("out of memory reading a sweep");
        abort();
    }
    size_t m = 0;
    for (int i = 0; i < n; i++)
        if (!PQgetisnull(res, i, 1))
            vx[m++] = PQgetvalue(res, i, 1);
    holes_sweep_done(t->holes, t->sweep_no, vx, m, t->claims_sent + 1);
    free(vx);
    note_holes(t);
    kick(t);
}

static void delete_result_cb(struct pgloop *pg, PGresult *res, void *arg)
{
    struct outbox_table *t = arg;
    if (!result_ok(t, res, "delete")) {
        /* Not deleted: on a live connection (a statement error) try again; a lost
         * connection resets the state and the rows are published again. */
        if (res) {
            for (size_t i = 0; i < t->deleting.count; i++)
                vec_push(&t->acked, t->deleting.items[i]);
            t->deleting.count = 0;
            schedule(t, 1000);
        }
        return;
    }
    for (size_t i = 0; i < t->deleting.count; i++)
        mark_done(t, t->deleting.items[i]);
    metrics_counter_add("relay_rows_deleted_total", t->mlabels, (uint64_t)t->deleting.count);
    t->deleting.count = 0;
    kick(t);
}

static void dead_result_cb(struct pgloop *pg, PGresult *res, void *arg)
{
    struct outbox_table *t = arg;
    if (t->orphan_inflight) {
        struct dead_orphan o = t->orphan_sent;
        t->orphan_inflight = false;
        if (!result_ok(t, res, "dead-letter move")) {
            /* Again later, on this session or the next (moving a row twice moves nothing).
             * A statement error (the dead-letter table dropped, a privilege revoked) must not
             * stop the table: claims go on meanwhile, and the row may be published again. */
            orphan_push(t, o.seq, o.error);
            if (res) {
                t->dead_retry_ms = relay_now_ms() + 1000;
                schedule(t, 1000);
            }
            free(o.error);
            return;
        }
        t->dead_retry_ms = 0;
        if (atoi(PQcmdTuples(res)) > 0) { /* 0: moved or deleted already */
            if (pgloop_busy(t->cpg)) {    /* a claim in flight: number claims_sent */
                if (t->moved_count == t->moved_cap) {
                    size_t cap = t->moved_cap ? t->moved_cap * 2 : 16;
                    int64_t *m = realloc(t->moved, cap * sizeof(*m));
                    if (!m) {
                        log_error("out of memory noting a dead-letter move");
                        abort();
                    }
                    t->moved = m;
                    t->moved_cap = cap;
                }
                t->moved[t->moved_count++] = o.seq;
                t->moved_claim_no = t->claims_sent;
            }
            char seq[24];
            snprintf(seq, sizeof(seq), "%" PRId64, o.seq);
            log_at(LOG_WARN, LOG_FIELDS("table", t->label, "seq", seq, "error", o.error),
                   "row rejected by Kafka for good; moved to the dead-letter table");
            metrics_counter_add("relay_dead_letters_total", t->mlabels, 1);
        }
        free(o.error);
        kick(t);
        return;
    }
    struct row *r = t->dead_row;
    t->dead_row = NULL;
    if (!result_ok(t, res, "dead-letter move")) {
        if (res && r) {
            vec_push(&t->dead, r); /* again in a second, not at every step */
            t->dead_retry_ms = relay_now_ms() + 1000;
            schedule(t, 1000);
        } else if (r) {
            /* The session is gone (a reset follows and lets the row's batch go): the row
             * stays rejected, its move is sent again on the next session. */
            orphan_push(t, r->seq, r->dead_error);
        }
        return;
    }
    t->dead_retry_ms = 0;
    if (r) {
        if (atoi(PQcmdTuples(res)) > 0) { /* 0: moved already (a move a reset interrupted) */
            char seq[24];
            snprintf(seq, sizeof(seq), "%" PRId64, r->seq);
            log_at(LOG_WARN, LOG_FIELDS("table", t->label, "seq", seq, "error", r->dead_error),
                   "row rejected by Kafka for good; moved to the dead-letter table");
            metrics_counter_add("relay_dead_letters_total", t->mlabels, 1);
        }
        mark_done(t, r);
    }
    kick(t);
}

static void send_delete(struct outbox_table *t)
{
    /* Build '{1,2,3}' from the acknowledged rows. */
    size_t cap = t->acked.count * 21 + 3;
    char *arr = malloc(cap);
    if (!arr) {
        log_error("out of memory deleting rows");
        abort();
    }
    size_t len = 0;
    arr[len++] = '{';
    for (size_t i = 0; i < t->acked.count; i++)
        len += (size_t)snprintf(arr + len, cap - len, "%s%" PRId64, i ? "," : "",
                                t->acked.items[i]->seq);
    arr[len++] = '}';
    arr[len] = '\0';
    struct row_vec tmp = t->deleting;
    t->deleting = t->acked;
    t->acked = tmp;
    t->acked.count = 0;
    const char *params[1] = {arr};
    if (pgloop_query_prepared(t->pg, "relay_delete", 1, params, delete_result_cb, t)) {
        for (size_t i = 0; i < t->deleting.count; i++)
            vec_push(&t->acked, t->deleting.items[i]);
        t->deleting.count = 0;
    }
    free(arr);
}

static void send_dead(struct outbox_table *t)
{
    if (!t->dead.count) {
        /* The oldest first (a failed move goes to the back): one failing move does not
         * starve the others. */
        struct dead_orphan o = t->orphans[0];
        memmove(t->orphans, t->orphans + 1, (--t->orphan_count) * sizeof(*t->orphans));
        char seq[24];
        snprintf(seq, sizeof(seq), "%" PRId64, o.seq);
        const char *params[2] = {seq, o.error};
        t->orphan_sent = o;
        t->orphan_inflight = true;
        if (pgloop_query_prepared(t->pg, "relay_dead", 2, params, dead_result_cb, t)) {
            t->orphan_inflight = false;
            memmove(t->orphans + 1, t->orphans, t->orphan_count++ * sizeof(*t->orphans));
            t->orphans[0] = o;
        }
        return;
    }
    struct row *r = t->dead.items[--t->dead.count];
    char seq[24];
    snprintf(seq, sizeof(seq), "%" PRId64, r->seq);
    const char *params[2] = {seq, r->dead_error ? r->dead_error : "rejected"};
    t->dead_row = r;
    if (pgloop_query_prepared(t->pg, "relay_dead", 2, params, dead_result_cb, t)) {
        t->dead_row = NULL;
        vec_push(&t->dead, r);
    }
}

/* Rows the next claim may take. RELAY_MAX_INFLIGHT bounds the rows in the producer (their
 * copies are what costs memory); rows acknowledged and waiting for their DELETE cost a few
 * dozen bytes each and are bounded apart, at ACKED_FACTOR times as many. Counting those too
 * made every third claim wait for the previous batch's delete (a drain at 5,000 rows per
 * claim and 10,000 in flight: 82,000-84,000 rows/s, against 96,000 with a window large
 * enough not to wait). */
#define ACKED_FACTOR 4
/* The first claim's LIMIT (the table's row size is not known yet): at most 8 rows of any size
 * before the relay knows how large they are, a handful of milliseconds for a small-row table
 * (the next claim is sized from this one). */
#define FIRST_CLAIM_ROWS 8
/* Claims are byte-capped in the statement (relay_claim_capped) until this many times
 * RELAY_BATCH_SIZE rows have been claimed in this process: more than a claim's worth, so that
 * after a restart the claims that reach the rows behind the head are capped (see send_claim). */
#define CAPPED_CLAIMS_ROWS 4
static int64_t claim_room(const struct outbox_table *t)
{
    if (t->claim_hold_until && relay_now_ms() < t->claim_hold_until)
        return 0;
    int64_t max = t->relay->settings.max_inflight;
    if ((int64_t)t->inflight >= ACKED_FACTOR * max)
        return 0;
    int64_t room = max - (int64_t)t->in_producer;
    if (room > t->relay->settings.batch_size)
        room = t->relay->settings.batch_size;
    if (room <= 0)
        return 0;
    /* RELAY_MAX_INFLIGHT_BYTES, in two parts. The LIMIT: the room in bytes over the real row
     * size of recent claims (FIRST_CLAIM_ROWS while no claim has told it), the tight bound
     * for a table whose rows keep their size. The statement's byte cap (relay_claim_capped,
     * chosen in send_claim): it stops at the room by the rows' sizes as row_bytes counts
     * them, for a claim sized for small rows that meets large ones. When the room is less
     * than one expected row, the claim waits for acknowledgements, unless
     * nothing is in the producer: then one row, however large, goes. */
    int64_t bytes_room = t->relay->settings.max_inflight_bytes - t->in_producer_bytes;
    int64_t by_bytes =
        t->row_bytes_avg > 0 ? (int64_t)((double)bytes_room / t->row_bytes_avg) : FIRST_CLAIM_ROWS;
    if (by_bytes > bytes_room)
        by_bytes = bytes_room; /* no row is smaller than a byte */
    if (by_bytes < 1)
        by_bytes = t->in_producer == 0 ? 1 : 0;
    return room < by_bytes ? room : by_bytes;
}

static void send_claim(struct outbox_table *t)
{
    char low[24], cursor[24], limit[24], floor_text[24], budget[24];
    int64_t lowv = low_watermark(t), floor;
    if (!holes_floor(t->holes, &floor) || floor > lowv)
        floor = lowv; /* no hole below the watermark: the lower branch reads nothing */
    snprintf(low, sizeof(low), "%" PRId64, lowv);
    snprintf(cursor, sizeof(cursor), "%" PRId64, t->cursor);
    snprintf(floor_text, sizeof(floor_text), "%" PRId64, floor);
    int64_t room = claim_room(t);
    snprintf(limit, sizeof(limit), "%" PRId64, room);
    t->claim_limit = (int)room;
    /* The statement's byte cap: the bytes room left (see claim_room; at least 1, so the first
     * row always comes). */
    t->claim_budget = t->relay->settings.max_inflight_bytes - t->in_producer_bytes;
    if (t->claim_budget < 1)
        t->claim_budget = 1;
    snprintf(budget, sizeof(budget), "%" PRId64, t->claim_budget);
    const char *params[5] = {low, cursor, limit, floor_text, budget};
    /* The byte-capped statement costs PostgreSQL ~1 us a row (outbox_sql.c); the plain one
     * is enough when LIMIT rows as large as the largest this process has claimed from the
     * table fit in the room, once the table has shown enough rows (CAPPED_CLAIMS_ROWS). A
     * table whose rows grow past anything seen may then overshoot with one claim (up to
     * LIMIT x the new size); if that costs the process, the next one starts capped, and the
     * claims that reach those rows again are capped: never a crash loop. */
    bool capped = t->rows_seen < (uint64_t)CAPPED_CLAIMS_ROWS * t->relay->settings.batch_size ||
                  room * (int64_t)t->row_bytes_max > t->claim_budget;
    const char *statement = capped ? "relay_claim_capped" : "relay_claim";
    t->more = false;
    t->claim_gen = t->gen;
    t->claim_no = ++t->claims_sent;
    t->claim_low = lowv;
    t->claim_cursor = t->cursor;
    /* Binary results: seq, the uuid and the timestamp need no text conversion on either side
     * (extract(epoch ...) alone cost about a fifth of the claim, measured). */
    if (pgloop_query_prepared_binary(t->cpg, statement, capped ? 5 : 4, params, true,
                                     claim_result_cb, t))
        t->more = true;
}

/* Rows waiting (an upper bound: max(seq) - min(seq) + 1, both read from the seq index, so
 * it never scans the table) and the age of the oldest, for /metrics. */
static void backlog_result_cb(struct pgloop *pg, PGresult *res, void *arg)
{
    struct outbox_table *t = arg;
    if (!result_ok(t, res, "backlog"))
        return;
    double rows = PQgetisnull(res, 0, 0) ? 0 : strtod(PQgetvalue(res, 0, 0), NULL);
    double age = PQgetisnull(res, 0, 1) ? 0 : strtod(PQgetvalue(res, 0, 1), NULL);
    metrics_gauge_set("relay_backlog_rows", t->mlabels, rows);
    metrics_gauge_set("relay_backlog_oldest_seconds", t->mlabels, age);
    kick(t);
}

/* Writers sweeps (pg_locks): at least this far apart, doubling up to the maximum while the
 * oldest hole waits for the same transactions. */
#define SWEEP_MIN_MS 20
#define SWEEP_MAX_MS 500

/* The one place that decides what this table's connection does next. */
static void step(struct outbox_table *t)
{
    if (!pgloop_ready(t->pg))
        return;
    bool busy = pgloop_busy(t->pg);
    if (busy && t->phase != PHASE_LEADING)
        return;
    switch (t->phase) {
    case PHASE_LOCKING: {
        const char *params[1] = {t->sql.lock_key};
        if (pgloop_query(t->pg, "SELECT pg_try_advisory_lock($1::bigint)", 1, params,
                         lock_result_cb, t))
            return;
        return;
    }
    case PHASE_LISTENING:
        /* LISTEN, and the statements prepared once per session: no parse and plan per
         * claim (about half a millisecond each, measured). */
        if (pgloop_query_simple(t->pg, t->sql.session, listen_result_cb, t))
            return; /* a failed send is reported through state_cb */
        return;
    case PHASE_LEADING:
        break;
    default:
        return;
    }
    /* A claim session that stays not ready (a connect or a PREPARE that hangs, behind a
     * pooler's queue or a lock) is checked here too, not only when it fails (ctimer_cb). */
    if (claim_session_hopeless(t)) {
        give_up_leadership(t);
        return;
    }
    note_bytes(t);
    /* The lock connection: deletes first, then dead-letter moves, then (every few seconds,
     * when nothing else is to be done) the backlog gauges. */
    /* No claim while the producer is being replaced (producer.c), nor while the moves of
     * rows rejected for good that a reset kept are under way (the claim would read them
     * again); while those moves fail, claims go on, and claim_result_cb keeps such rows out
     * of the producer. */
    bool claim_due = t->claiming && t->more && !t->relay->stopping && !t->relay->producer_down &&
                     (!(t->orphan_count || t->orphan_inflight) || t->dead_retry_ms ||
                      relay_now_ms() - t->orphan_gate_ms >= 1000) &&
                     claim_room(t) > 0;
    if (!busy) {
        if (t->acked.count) {
            send_delete(t);
        } else if ((t->dead.count || t->orphan_count) && relay_now_ms() >= t->dead_retry_ms) {
            send_dead(t);
        } else if (holes_want_sweep(t->holes) &&
                   relay_now_ms() - t->sweep_ms >= t->sweep_every_ms) {
            /* Only while holes wait for one (see holes.h), every SWEEP_MIN_MS while holes
             * come and go, less often while the oldest stays: a transaction that keeps a
             * writer's lock on the table for minutes made it 50 reads of pg_locks a second
             * (each takes every lock-manager partition lock of the server). */
            int64_t floor;
            bool have = holes_floor(t->holes, &floor);
            if (have && floor == t->sweep_floor) {
                t->sweep_every_ms *= 2;
                if (t->sweep_every_ms > SWEEP_MAX_MS)
                    t->sweep_every_ms = SWEEP_MAX_MS;
            } else {
                t->sweep_every_ms = SWEEP_MIN_MS;
            }
            t->sweep_floor = have ? floor : INT64_MIN;
            metrics_counter_add("relay_writers_sweeps_total", t->mlabels, 1);
            t->sweep_ms = relay_now_ms();
            t->sweep_gen = t->gen;
            t->sweep_no = holes_sweep_sent(t->holes);
            if (pgloop_query_prepared(t->pg, "relay_writers", 0, NULL, sweep_result_cb, t))
                t->sweep_ms = 0;
        } else if (!claim_due) {
            int64_t now = relay_now_ms();
            if (now - t->backlog_ms >= 5000) {
                t->backlog_ms = now;
                if (pgloop_query_prepared(t->pg, "relay_backlog", 0, NULL, backlog_result_cb, t))
                    t->backlog_ms = 0;
            }
        }
    }
    /* The claim connection, at the same time: the next batch. */
    if (claim_due && t->cphase == CLAIM_READY && !pgloop_busy(t->cpg))
        send_claim(t);
    /* Idle: wait for a NOTIFY, an acknowledgement or the fallback poll. */
    if (!ev_is_active(&t->timer))
        schedule(t, t->relay->settings.poll_ms);
}

static bool purged(rd_kafka_resp_err_t err)
{
    return err == RD_KAFKA_RESP_ERR__PURGE_QUEUE || err == RD_KAFKA_RESP_ERR__PURGE_INFLIGHT;
}

/* A row's delivery failed, not for good: the table waits a pause that doubles while failures
 * go on (an error that keeps coming back, a broker policy say, made this a hot loop of claims,
 * and with the gapless guarantee a loop of new producers), once per attempt (the generation
 * that claimed the failed rows). The
 * pause goes back to 100 ms only when that row is delivered or dead-lettered (fail_seq): the
 * other partitions' rows keep being acknowledged while one partition's keeps failing. */
static void note_failure(struct outbox_table *t, rd_kafka_resp_err_t err, int64_t seq, unsigned gen)
{
    /* The other rows of the same attempt, or an older attempt's late reports (wrap-safe). */
    if (t->failure_noted && (int)(gen - t->failure_gen) <= 0)
        return;
    t->failure_gen = gen;
    t->failure_noted = true;
    next_fail_backoff(t, seq);
    if (t->phase != PHASE_LEADING)
        return; /* its timer is the reconnect's or the standby's now: leave it alone */
    t->claim_hold_until = relay_now_ms() + t->fail_backoff_ms;
    log_at(LOG_WARN, LOG_FIELDS("table", t->label, "error", rd_kafka_err2str(err)),
           "delivery failed; publishing the table again from its first row, retrying in "
           "%" PRId64 " ms",
           t->fail_backoff_ms);
    metrics_counter_add("relay_publish_errors_total", t->mlabels, 1);
    schedule(t, t->fail_backoff_ms + 1);
}

void outbox_table_delivered(void *row_opaque, rd_kafka_resp_err_t err, const char *errstr,
                            int32_t partition, int64_t offset)
{
    struct row *r = row_opaque;
    struct batch *b = r->batch;
    struct outbox_table *t = b->table;
    b->unresolved--;
    t->in_producer--;
    t->in_producer_bytes -= r->bytes;
    if (b->gen != t->gen) {
        /* Claimed before a reset: the row is still in the table and is claimed again. The
         * reset detached this batch; its last report frees it. Its bytes left the producer:
         * a claim waiting for room may go (not at the next poll). A failure still counts:
         * the reset may have come first (a fatal producer error reports the purged messages
         * before the failed batch): a rejection for good keeps the row out (orphans), any
         * other failure sets the table's pause. */
        if (relay_error_is_permanent(err))
            orphan_push(t, r->seq, errstr ? errstr : rd_kafka_err2str(err));
        else if (err != RD_KAFKA_RESP_ERR_NO_ERROR && !purged(err))
            note_failure(t, err, r->seq, b->gen);
        batch_free_if_unused(b);
        kick(t);
        return;
    }
    if (err == RD_KAFKA_RESP_ERR_NO_ERROR) {
        r->state = ROW_ACKED;
        vec_push(&t->acked, r);
        /* The loop's clock (wall time, read once per loop iteration) and series looked up
         * once: this runs for every row (a clock_gettime and two lookups by name were ~10%
         * of the relay's CPU in a drain). */
        double now_s = ev_now(t->relay->loop);
        metrics_series_observe(t->ack_latency, now_s - (double)r->created_ms / 1000.0);
        metrics_series_add(t->topics[r->topic].published, 1);
        if (t->fail_backoff_ms && r->seq == t->fail_seq)
            t->fail_backoff_ms = 0;
    } else if (relay_error_is_permanent(err)) {
        r->state = ROW_DEAD;
        r->dead_error = strdup(errstr ? errstr : rd_kafka_err2str(err));
        vec_push(&t->dead, r);
        if (t->fail_backoff_ms && r->seq == t->fail_seq)
            t->fail_backoff_ms = 0;
    } else if (purged(err)) {
        /* Purged with a stopped producer (producer.c): not this table's failure. Start over
         * from the table (order per key); the new producer kicks it. */
        log_at(LOG_INFO, LOG_FIELDS("table", t->label),
               "messages purged with the stopped producer; publishing the table again from its "
               "first unacknowledged row");
        reset_state(t); /* frees b too once nothing in the producer refers to it */
    } else {
        /* A failure the producer gave up on: start over from the table so that order per
         * key holds (what was delivered meanwhile is published again, same message-id). */
        note_failure(t, err, r->seq, b->gen);
        reset_state(t);
    }
    kick(t);
}

/* The metrics' database and server labels of a conninfo, as libpq picks them: the database
 * is its dbname, else PGDATABASE, else the user name (its user, PGUSER, or the system user's);
 * the server is host:port from the conninfo or PGHOST/PGPORT ("local" for the default Unix
 * socket, 5432 for the default port; a multi-host list kept whole). Never the rest of the
 * conninfo (a password). Two services often have the same schema.table in their own
 * databases: these labels tell their series apart. */
static void conninfo_labels(const char *conninfo, char *database, size_t dblen, char *server,
                            size_t serverlen)
{
    const char *dbname = NULL, *user = NULL, *host = NULL, *port = NULL;
    PQconninfoOption *opts = PQconninfoParse(conninfo, NULL);
    for (PQconninfoOption *o = opts; o && o->keyword; o++) {
        if (!o->val || !*o->val)
            continue;
        if (!strcmp(o->keyword, "dbname"))
            dbname = o->val;
        else if (!strcmp(o->keyword, "user"))
            user = o->val;
        else if (!strcmp(o->keyword, "host"))
            host = o->val;
        else if (!strcmp(o->keyword, "hostaddr") && !host)
            host = o->val;
        else if (!strcmp(o->keyword, "port"))
            port = o->val;
    }
    const char *env;
    if (!dbname && (env = getenv("PGDATABASE")) && *env)
        dbname = env;
    if (!dbname && !user && (env = getenv("PGUSER")) && *env)
        user = env;
    if (!dbname && !user) {
        struct passwd *pw = getpwuid(geteuid());
        user = pw ? pw->pw_name : NULL;
    }
    if (!host && (env = getenv("PGHOST")) && *env)
        host = env;
    if (!port && (env = getenv("PGPORT")) && *env)
        port = env;
    snprintf(database, dblen, "%s", dbname ? dbname : user ? user : "");
    snprintf(server, serverlen, "%s:%s", host ? host : "local", port ? port : "5432");
    PQconninfoFree(opts);
}

struct outbox_table *outbox_table_create(struct relay *relay, const struct outbox_source *src)
{
    struct outbox_table *t = calloc(1, sizeof(*t));
    if (!t)
        return NULL;
    t->relay = relay;
    t->src = src;
    snprintf(t->label, sizeof(t->label), "%s.%s", src->schema, src->table);
    char table_label[300], database[128], database_label[300], server[300], server_label[400];
    metrics_label(table_label, sizeof(table_label), "table", t->label);
    conninfo_labels(src->conninfo, database, sizeof(database), server, sizeof(server));
    metrics_label(database_label, sizeof(database_label), "database", database);
    metrics_label(server_label, sizeof(server_label), "server", server);
    snprintf(t->mlabels, sizeof(t->mlabels), "%s,%s,%s", table_label, database_label, server_label);
    t->ack_latency = metrics_series("relay_commit_to_ack_seconds", t->mlabels, "histogram");
    t->inflight_bytes = metrics_series("relay_inflight_bytes", t->mlabels, "gauge");
    settings_redact_conninfo(src->conninfo, t->redacted, sizeof(t->redacted));
    t->holes = holes_new();
    if (!t->holes || outbox_sql_build(src->schema, src->table, &t->sql)) {
        outbox_table_destroy(t);
        return NULL;
    }
    t->pg = pgloop_create(relay->loop, src->conninfo, state_cb, notify_cb, t);
    t->cpg = pgloop_create(relay->loop, src->conninfo, claim_state_cb, NULL, t);
    if (!t->pg || !t->cpg) {
        outbox_table_destroy(t);
        return NULL;
    }
    ev_init(&t->timer, timer_cb);
    t->timer.data = t;
    ev_idle_init(&t->kick, kick_cb);
    t->kick.data = t;
    ev_init(&t->ctimer, ctimer_cb);
    t->ctimer.data = t;
    t->cbackoff_ms = 100;
    t->sweep_every_ms = SWEEP_MIN_MS;
    t->sweep_floor = INT64_MIN;
    t->claiming = true;
    t->backoff_ms = 100;
    t->phase = PHASE_DISCONNECTED;
    return t;
}

void outbox_table_start(struct outbox_table *t)
{
    schedule(t, 0);
}

void outbox_table_stop_claiming(struct outbox_table *t)
{
    t->claiming = false;
    kick(t);
}

/* Closing the sessions ends the advisory lock with the lock session. The generation moves on
 * (reset_state), so that reports of batches still in the producer only free them; kick() may
 * still run step(), which stops at once without a connection, and timer_cb ignores a released
 * table, so nothing connects again. */
void outbox_table_release(struct outbox_table *t)
{
    t->released = true;
    t->claiming = false;
    ev_timer_stop(t->relay->loop, &t->timer);
    ev_idle_stop(t->relay->loop, &t->kick);
    claim_close(t);
    dead_moves_abandon(t);
    pgloop_close(t->pg);
    reset_state(t);
    set_phase(t, PHASE_DISCONNECTED);
    /* Its gauges would keep their last values in /metrics, as if the table were still
     * published (the metrics library cannot remove a series): 0, as for a table with nothing
     * waiting. No callback of this table sets them again (its sessions are closed). */
    metrics_gauge_set("relay_backlog_rows", t->mlabels, 0);
    metrics_gauge_set("relay_backlog_oldest_seconds", t->mlabels, 0);
    metrics_gauge_set("relay_claim_holes", t->mlabels, 0);
    metrics_series_add(t->inflight_bytes, (double)-t->gauge_bytes);
    t->gauge_bytes = 0;
}

void outbox_table_kick(struct outbox_table *t)
{
    kick(t);
}

size_t outbox_table_in_producer(const struct outbox_table *t)
{
    return t->in_producer;
}

bool outbox_table_drained(const struct outbox_table *t)
{
    if (t->phase != PHASE_LEADING)
        return true; /* nothing of ours can be deleted without the lock anyway */
    /* Rejected rows whose moves a reset kept are waited for too, unless those moves fail:
     * else the next leader would meet the rejection again. */
    bool orphans = (t->orphan_count || t->orphan_inflight) && !t->dead_retry_ms;
    return t->inflight == 0 && !orphans && !pgloop_busy(t->pg) && !pgloop_busy(t->cpg);
}

static const char *const phase_names[] = {"disconnected", "connecting", "locking",
                                          "standby",      "listening",  "leading"};

const char *outbox_table_role(const struct outbox_table *t)
{
    return phase_names[t->phase];
}

void outbox_table_describe(const struct outbox_table *t, char *buf, size_t size, bool *ready)
{
    static const char *const claims[] = {"down", "connecting", "preparing", "ready"};
    size_t len = strlen(buf);
    if (t->phase == PHASE_LEADING)
        snprintf(buf + len, size - len, "%s leading inflight=%zu claims=%s\n", t->label,
                 t->inflight, claims[t->cphase]);
    else
        snprintf(buf + len, size - len, "%s %s inflight=%zu\n", t->label, phase_names[t->phase],
                 t->inflight);
    /* A leader that cannot claim (its claim session is down, or waits for the claim lock an
     * old leader's claim session still holds) publishes nothing: not ready. */
    if ((t->phase != PHASE_LEADING && t->phase != PHASE_STANDBY) ||
        (t->phase == PHASE_LEADING && t->cphase != CLAIM_READY))
        *ready = false;
}

void outbox_table_destroy(struct outbox_table *t)
{
    if (!t)
        return;
    if (t->relay && t->relay->loop) {
        ev_timer_stop(t->relay->loop, &t->timer);
        ev_idle_stop(t->relay->loop, &t->kick);
    }
    if (t->relay && t->relay->loop)
        ev_timer_stop(t->relay->loop, &t->ctimer);
    pgloop_destroy(t->cpg);
    pgloop_destroy(t->pg);
    struct batch *b = t->head;
    while (b) {
        struct batch *next = b->next;
        for (size_t i = 0; i < b->count; i++)
            free(b->rows[i].dead_error);
        free(b);
        b = next;
    }
    for (size_t i = 0; i < t->topic_count; i++)
        free(t->topics[i].name);
    free(t->topics);
    free(t->acked.items);
    free(t->deleting.items);
    free(t->dead.items);
    for (size_t i = 0; i < t->orphan_count; i++)
        free(t->orphans[i].error);
    free(t->orphans);
    free(t->moved);
    if (t->orphan_inflight)
        free(t->orphan_sent.error);
    outbox_sql_free(&t->sql);
    holes_free(t->holes);
    free(t);
}
