/* orchestrator_cpu: the saga-orchestrator's own CPU per saga, in process: no PostgreSQL, no
 * Kafka round trips, only the C the orchestrator runs for each saga.
 *
 * For N sagas of sagas/order_fulfillment.json (4 steps, no failure), in batches of B (the
 * orchestrator's SAGA_BATCH_SIZE, 200 by default), five transactions' worth of work per saga:
 * - the claim: the locked rows read (store_read_row on a PGresult holding the columns
 *   PostgreSQL would send), START applied (saga_engine_apply), the effects and the instances
 *   written into the apply document (store_batch_add_effects / _add_instance / _finish), the
 *   rows cleared at commit (store_row_clear), as worker.c's claim_cb, apply_event, send_apply
 *   and commit_cb do;
 * - four reply batches: each reply parsed from a real consumed Kafka message (reply_parse:
 *   headers and payload as a participant's reply carries them through the relay), the
 *   lock's id list and the dedupe's arrays formatted, the rows read, the replies applied
 *   (dedupe_cb's loop), the document finished, rows and replies cleared at commit
 *   (store_row_clear, reply_clear).
 * The real functions of lib/engine.c, lib/template.c, orchestrator/store.c and
 * orchestrator/replies.c run; the few lines of worker.c's glue around them (static there) are
 * copied below, marked "as worker.c". Not included: libpq's and librdkafka's own work
 * (receiving, parsing results, producing), libev, the metrics and the logs.
 *
 * Set-up, not timed: the replies are produced to an in-process librdkafka mock cluster and
 * consumed back (so reply_parse gets real consumer messages); between transactions the
 * "database" (the rows' column texts, jsonb's output format) is updated from the applied
 * state. Message ids come from a seeded generator and the clock is fixed, so every run
 * writes the same documents: their FNV-1a hash is printed, and must not change with an
 * optimisation (compare it between builds).
 *
 * Prints CPU per saga: the process's (CLOCK_PROCESS_CPUTIME_ID: librdkafka's idle threads
 * included) and the main thread's, sagas per second of CPU, and peak RSS (the set-up, the
 * consumed messages above all, included: the RSS after set-up is printed beside it).
 *
 * On a machine shared with other work the CPU time of the same run varies by tens of
 * percent. Instructions do not: under callgrind only the timed parts are counted,
 *   valgrind --tool=callgrind --collect-atstart=no --callgrind-out-file=/dev/null \
 *       build/bench/orchestrator_cpu --sagas 2000
 * ("Collected" in its summary, divided by the sagas, is instructions per saga).
 *
 *   orchestrator_cpu [--sagas N] [--batch B] [--definition PATH]
 *
 * Not run by the tests. */
#include "nodelay.h"

#include <inttypes.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#include <cjson/cJSON.h>
#include <libpq-fe.h>
#include <librdkafka/rdkafka.h>
#include <librdkafka/rdkafka_mock.h>

#include "definition.h"
#include "diag.h"
#include "engine.h"
#include "log.h"
#include "orchestrator.h"

#define STEPS 4
#define COLUMNS 19
#define REPLY_TOPIC "saga.replies"
#define NOW_MS INT64_C(1795000000000) /* fixed: the documents are the same at every run */
/* Sagas per partition of the reply topic: the mock cluster keeps a few MB per partition and
 * drops older messages beyond that. */
#define PER_PARTITION 1000

/* replies.c's replies_poll kicks the reply worker (worker.c, not linked). */
void worker_kick(struct worker *w);
void worker_kick(struct worker *w)
{
    (void)w;
}

static void die(const char *what)
{
    fprintf(stderr, "orchestrator_cpu: %s\n", what);
    exit(1);
}

static void *xmalloc(size_t n)
{
    void *p = malloc(n);
    if (!p)
        die("out of memory");
    return p;
}

static char *xstrdup(const char *s)
{
    char *p = strdup(s);
    if (!p)
        die("out of memory");
    return p;
}

/* ---- clocks ---- */

static double now_cpu(clockid_t id)
{
    struct timespec ts;
    clock_gettime(id, &ts);
    return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

static double proc_ns, thread_ns, proc_t0, thread_t0;

/* Under callgrind, the timed parts only are counted (see the top of the file); elsewhere these
 * are no-ops. */
#if __has_include(<valgrind/callgrind.h>)
#include <valgrind/callgrind.h>
#define COUNT_TOGGLE() CALLGRIND_TOGGLE_COLLECT
#else
#define COUNT_TOGGLE() ((void)0)
#endif

static void timing_on(void)
{
    proc_t0 = now_cpu(CLOCK_PROCESS_CPUTIME_ID);
    thread_t0 = now_cpu(CLOCK_THREAD_CPUTIME_ID);
    COUNT_TOGGLE();
}

static void timing_off(void)
{
    COUNT_TOGGLE();
    thread_ns += now_cpu(CLOCK_THREAD_CPUTIME_ID) - thread_t0;
    proc_ns += now_cpu(CLOCK_PROCESS_CPUTIME_ID) - proc_t0;
}

/* ---- deterministic ids ---- */

static uint64_t rng_state = 0x9e3779b97f4a7c15u;

static uint64_t rng_next(void)
{
    uint64_t x = rng_state; /* xorshift64* */
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    rng_state = x;
    return x * 0x2545f4914f6cdd1dULL;
}

static void fake_uuid(char out[SAGA_UUID_LEN + 1])
{
    unsigned char b[16];
    uint64_t a = rng_next(), c = rng_next();
    memcpy(b, &a, 8);
    memcpy(b + 8, &c, 8);
    b[6] = (unsigned char)((b[6] & 0x0f) | 0x40);
    b[8] = (unsigned char)((b[8] & 0x3f) | 0x80);
    static const char hex[] = "0123456789abcdef";
    size_t o = 0;
    for (int i = 0; i < 16; i++) {
        if (i == 4 || i == 6 || i == 8 || i == 10)
            out[o++] = '-';
        out[o++] = hex[b[i] >> 4];
        out[o++] = hex[b[i] & 15];
    }
    out[o] = '\0';
}

/* The engine's message ids: handed out in order from the precomputed list. */
struct id_source {
    char (*ids)[SAGA_UUID_LEN + 1];
    size_t next, count;
};

static void id_next(char out[SAGA_UUID_LEN + 1], void *arg)
{
    struct id_source *s = arg;
    if (s->next >= s->count)
        die("more message ids asked for than a 4-step saga sends");
    memcpy(out, s->ids[s->next++], SAGA_UUID_LEN + 1);
}

/* ---- jsonb's text output (what input::text and replies::text return) ---- */

struct buf {
    char *text;
    size_t len, cap;
};

static void buf_put(struct buf *b, const char *s, size_t n)
{
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap * 2 : 256;
        while (cap < b->len + n + 1)
            cap *= 2;
        char *grown = realloc(b->text, cap);
        if (!grown)
            die("out of memory");
        b->text = grown;
        b->cap = cap;
    }
    memcpy(b->text + b->len, s, n);
    b->len += n;
    b->text[b->len] = '\0';
}

static void buf_puts(struct buf *b, const char *s)
{
    buf_put(b, s, strlen(s));
}

static int jsonb_key_order(const void *pa, const void *pb)
{
    const cJSON *a = *(const cJSON *const *)pa, *b = *(const cJSON *const *)pb;
    size_t la = strlen(a->string), lb = strlen(b->string);
    if (la != lb)
        return la < lb ? -1 : 1;
    return memcmp(a->string, b->string, la);
}

static void jsonb_text(struct buf *b, const cJSON *v)
{
    if (cJSON_IsObject(v)) {
        size_t n = 0;
        for (const cJSON *c = v->child; c; c = c->next)
            n++;
        const cJSON **keys = xmalloc((n ? n : 1) * sizeof(*keys));
        n = 0;
        for (const cJSON *c = v->child; c; c = c->next)
            keys[n++] = c;
        qsort(keys, n, sizeof(*keys), jsonb_key_order);
        buf_puts(b, "{");
        for (size_t i = 0; i < n; i++) {
            cJSON *k = cJSON_CreateString(keys[i]->string);
            char *kt = k ? cJSON_PrintUnformatted(k) : NULL;
            if (!kt)
                die("out of memory");
            buf_puts(b, i ? ", " : "");
            buf_puts(b, kt);
            buf_puts(b, ": ");
            free(kt);
            cJSON_Delete(k);
            jsonb_text(b, keys[i]);
        }
        buf_puts(b, "}");
        free(keys);
    } else if (cJSON_IsArray(v)) {
        buf_puts(b, "[");
        for (const cJSON *c = v->child; c; c = c->next) {
            buf_puts(b, c == v->child ? "" : ", ");
            jsonb_text(b, c);
        }
        buf_puts(b, "]");
    } else {
        char *t = cJSON_PrintUnformatted(v);
        if (!t)
            die("out of memory");
        buf_puts(b, t);
        free(t);
    }
}

static char *jsonb_of(const cJSON *v)
{
    struct buf b = {0};
    jsonb_text(&b, v);
    return b.text;
}

static char *jsonb_of_text(const char *json)
{
    cJSON *v = cJSON_Parse(json);
    if (!v)
        die("bad JSON in the set-up");
    char *t = jsonb_of(v);
    cJSON_Delete(v);
    return t;
}

/* ---- the "database": each saga's saga.instances columns, as text ---- */

struct saga_db {
    char id[SAGA_UUID_LEN + 1];
    char trace_id[33];
    char *col[COLUMNS]; /* owned, NULL: SQL NULL */
    char msg_ids[STEPS][SAGA_UUID_LEN + 1];
};

static void col_set(struct saga_db *s, int c, const char *v)
{
    free(s->col[c]);
    s->col[c] = v ? xstrdup(v) : NULL;
}

static void col_int(struct saga_db *s, int c, long long v)
{
    char t[32];
    snprintf(t, sizeof(t), "%lld", v);
    col_set(s, c, t);
}

static const char *const wait_names[] = {"none", "reply", "backoff"};

/* What saga.apply_batch leaves in the row: the state the document carries. */
static void db_update(struct saga_db *s, const struct saga_row *row)
{
    const struct saga_state *st = &row->state;
    col_set(s, 3, saga_status_name(st->status));
    col_int(s, 4, st->step);
    col_set(s, 5, saga_phase_name(st->phase));
    col_int(s, 6, st->attempt);
    col_int(s, 7, st->budget_base);
    col_set(s, 8, wait_names[st->wait]);
    col_set(s, 9, st->waiting_message_id[0] ? st->waiting_message_id : NULL);
    if (st->deadline_ms)
        col_int(s, 10, st->deadline_ms);
    else
        col_set(s, 10, NULL);
    col_set(s, 11, st->pivot_sent ? "t" : "f");
    free(s->col[13]);
    s->col[13] = st->replies ? jsonb_of(st->replies) : NULL;
    col_set(s, 16, st->error);
}

/* The locked rows as PostgreSQL returns them (text format). */
static PGresult *db_result(struct saga_db *const *rows, size_t n)
{
    static const char *const names[COLUMNS] = {
        "id",       "saga_name",  "saga_version",    "status",        "step_index",
        "phase",    "attempt",    "budget_base",     "wait",          "waiting_message_id",
        "int8",     "pivot_sent", "input",           "replies",       "correlation_id",
        "trace_id", "error",      "pending_request", "request_reason"};
    PGresult *res = PQmakeEmptyPGresult(NULL, PGRES_TUPLES_OK);
    PGresAttDesc attrs[COLUMNS];
    memset(attrs, 0, sizeof(attrs));
    for (int c = 0; c < COLUMNS; c++) {
        attrs[c].name = (char *)names[c];
        attrs[c].typid = 25; /* text: store_read_row reads text only */
        attrs[c].typlen = -1;
        attrs[c].atttypmod = -1;
    }
    if (!res || !PQsetResultAttrs(res, COLUMNS, attrs))
        die("cannot make a PGresult");
    /* Fields left unset are NULL; each row's first (the id) is never NULL. */
    for (size_t i = 0; i < n; i++)
        for (int c = 0; c < COLUMNS; c++)
            if (rows[i]->col[c] &&
                !PQsetvalue(res, (int)i, c, rows[i]->col[c], (int)strlen(rows[i]->col[c])))
                die("cannot fill a PGresult");
    return res;
}

/* ---- the replies, through an in-process mock cluster ---- */

/* The data each participant replies with (examples/<service>/schema.sql, execute), as jsonb
 * prints it: the relay sends the outbox row's payload text. */
static char *reply_payload(int step, const struct saga_db *s, long i)
{
    char text[256], uuid[SAGA_UUID_LEN + 1];
    fake_uuid(uuid);
    switch (step) {
    case 0:
        snprintf(text, sizeof(text), "{\"reservationId\": \"%s\"}", uuid);
        break;
    case 1:
        snprintf(text, sizeof(text), "{\"amount\": %ld, \"authorizationId\": \"%s\"}", 10 + i % 100,
                 uuid);
        break;
    case 2:
        snprintf(text, sizeof(text), "{\"status\": \"approved\", \"orderId\": \"tp-%ld\"}", i + 1);
        break;
    default:
        snprintf(text, sizeof(text), "{\"shipmentId\": \"%s\"}", uuid);
        break;
    }
    (void)s;
    return xstrdup(text);
}

static void produce_replies(rd_kafka_t *p, struct saga_db *sagas, long n,
                            const struct saga_definition *def)
{
    for (int k = 0; k < STEPS; k++) {
        char type[160];
        snprintf(type, sizeof(type), "%s.Reply", def->steps[k].command.type);
        for (long i = 0; i < n; i++) {
            struct saga_db *s = &sagas[i];
            char mid[SAGA_UUID_LEN + 1], tp[96];
            fake_uuid(mid);
            /* The command's traceparent, sent back: the span is the message id's last 16
             * hex digits (engine.c, traceparent_build). */
            char hex[33];
            size_t o = 0;
            for (const char *c = s->msg_ids[k]; *c && o < 32; c++)
                if (*c != '-')
                    hex[o++] = *c;
            hex[o] = '\0';
            snprintf(tp, sizeof(tp), "00-%s-%s-01", s->trace_id, o == 32 ? hex + 16 : hex);
            char *payload = reply_payload(k, s, i);
            rd_kafka_resp_err_t err;
            for (;;) {
                err = rd_kafka_producev(p, RD_KAFKA_V_TOPIC(REPLY_TOPIC),
                                        RD_KAFKA_V_PARTITION((int32_t)(i / PER_PARTITION)),
                                        RD_KAFKA_V_KEY(s->id, SAGA_UUID_LEN),
                                        RD_KAFKA_V_VALUE(payload, strlen(payload)),
                                        RD_KAFKA_V_HEADER("message-id", mid, -1),
                                        RD_KAFKA_V_HEADER("event-type", type, -1),
                                        RD_KAFKA_V_HEADER("outcome", "success", -1),
                                        RD_KAFKA_V_HEADER("saga-id", s->id, -1),
                                        RD_KAFKA_V_HEADER("in-reply-to", s->msg_ids[k], -1),
                                        RD_KAFKA_V_HEADER("traceparent", tp, -1),
                                        RD_KAFKA_V_HEADER("correlation-id", s->id, -1),
                                        RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY), RD_KAFKA_V_END);
                if (err != RD_KAFKA_RESP_ERR__QUEUE_FULL)
                    break;
                rd_kafka_poll(p, 100);
            }
            free(payload);
            if (err)
                die(rd_kafka_err2str(err));
            rd_kafka_poll(p, 0);
        }
    }
    if (rd_kafka_flush(p, 120000))
        die("the replies were not all produced within 2 minutes");
}

static rd_kafka_conf_t *conf_of(const char *const kv[][2], size_t n)
{
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    char err[256];
    for (size_t i = 0; i < n; i++)
        if (rd_kafka_conf_set(conf, kv[i][0], kv[i][1], err, sizeof(err)) != RD_KAFKA_CONF_OK)
            die(err);
    return conf;
}

/* Consumes the replies of n sagas into out: saga i's reply to step k at out[k * n + i]. Saga i's
 * replies are in partition i / PER_PARTITION, step by step (produce_replies). */
static void consume_replies(rd_kafka_t *c, rd_kafka_message_t **out, long n)
{
    int partitions = (int)((n + PER_PARTITION - 1) / PER_PARTITION);
    rd_kafka_topic_partition_list_t *parts = rd_kafka_topic_partition_list_new(partitions);
    for (int p = 0; p < partitions; p++)
        rd_kafka_topic_partition_list_add(parts, REPLY_TOPIC, p)->offset =
            RD_KAFKA_OFFSET_BEGINNING;
    if (rd_kafka_assign(c, parts))
        die("cannot assign the reply partitions");
    size_t got = 0, want = (size_t)n * STEPS;
    memset(out, 0, want * sizeof(*out));
    int idle = 0;
    while (got < want) {
        rd_kafka_message_t *m = rd_kafka_consumer_poll(c, 1000);
        if (!m) {
            if (++idle > 120)
                die("no reply consumed for 2 minutes");
            continue;
        }
        idle = 0;
        if (m->err) {
            if (m->err != RD_KAFKA_RESP_ERR__PARTITION_EOF)
                die(rd_kafka_message_errstr(m));
            rd_kafka_message_destroy(m);
            continue;
        }
        long first = (long)m->partition * PER_PARTITION;
        long count = n - first < PER_PARTITION ? n - first : PER_PARTITION;
        if (m->partition < 0 || m->partition >= partitions || m->offset < 0 ||
            m->offset >= count * STEPS)
            die("a reply at an unexpected offset (did the mock cluster drop messages?)");
        size_t at = (size_t)(m->offset / count) * (size_t)n + (size_t)(first + m->offset % count);
        if (out[at])
            die("a reply consumed twice");
        out[at] = m;
        got++;
    }
    /* Nothing more to fetch: the consumer's threads stay idle while the work is timed. */
    rd_kafka_pause_partitions(c, parts);
    rd_kafka_topic_partition_list_destroy(parts);
}

/* ---- worker.c's glue, copied ---- */

struct counts {
    long applied, ignored, started, completed, mismatches;
};

/* As worker.c's apply_event (without the logs). */
static void apply_event(const struct saga_engine_env *env, struct saga_row *row,
                        const struct saga_event *ev, const char *reply_message_id,
                        struct store_batch *b, enum saga_outcome *outcome, struct counts *n)
{
    struct saga_effects fx;
    enum saga_status before = row->state.status;
    const char *stepname = row->state.step >= 0 && (size_t)row->state.step < row->def->step_count
                               ? row->def->steps[row->state.step].name
                               : "-";
    (void)stepname; /* for the logs */
    if (saga_engine_apply(row->def, &row->state, ev, env, &fx))
        die("the engine could not apply an event");
    *outcome = fx.outcome;
    if (fx.outcome == SAGA_APPLIED) {
        row->touched = true;
        if (store_batch_add_effects(b, row, &fx, reply_message_id))
            die("out of memory building a batch");
        if (before == SAGA_PENDING && row->state.status != SAGA_PENDING)
            n->started++;
        if (before != row->state.status && row->state.status == SAGA_COMPLETED)
            n->completed++;
        if (LOG_ENABLED(LOG_DEBUG))
            die("debug logging is on");
    }
    saga_effects_clear(&fx);
}

/* As worker.c's read_rows. */
static struct saga_row *read_rows(const struct registry *reg, PGresult *res, size_t *count)
{
    int n = PQntuples(res);
    struct saga_row *rows = calloc(n ? (size_t)n : 1, sizeof(*rows));
    if (!rows)
        die("out of memory");
    *count = 0;
    for (int i = 0; i < n; i++) {
        char err[512];
        if (store_read_row(reg, res, i, &rows[*count], err, sizeof(err)))
            die(err);
        (*count)++;
    }
    return rows;
}

/* As worker.c's send_apply (the document then goes to PostgreSQL). */
static char *send_apply(struct saga_row *rows, size_t n, struct store_batch *b)
{
    for (size_t i = 0; i < n; i++)
        if (rows[i].touched && store_batch_add_instance(b, &rows[i]))
            die("out of memory building a batch");
    char *doc = store_batch_finish(b);
    if (!doc)
        die("out of memory rendering a batch");
    return doc;
}

/* As worker.c's sql_add / start_reply_batch's id list and lock_cb's dedupe arrays. */
static void lock_and_dedupe_texts(const struct reply_msg *r, size_t n)
{
    struct buf sql = {0};
    buf_puts(&sql, "BEGIN; EXECUTE saga_lock('{");
    size_t ids = 0;
    for (size_t i = 0; i < n; i++) {
        if (r[i].error)
            continue;
        if (ids++)
            buf_put(&sql, ",", 1);
        buf_put(&sql, r[i].saga_id, strlen(r[i].saga_id));
    }
    buf_puts(&sql, "}')");
    size_t cap = n * 40 + 3;
    char *mids = xmalloc(cap), *irts = xmalloc(cap);
    size_t len = 0, ilen = 0;
    mids[len++] = '{';
    irts[ilen++] = '{';
    for (size_t i = 0; i < n; i++) {
        if (r[i].error)
            continue;
        if (len > 1)
            mids[len++] = ',';
        memcpy(mids + len, r[i].message_id, SAGA_UUID_LEN);
        len += SAGA_UUID_LEN;
        if (ilen > 1)
            irts[ilen++] = ',';
        memcpy(irts + ilen, r[i].in_reply_to, SAGA_UUID_LEN);
        ilen += SAGA_UUID_LEN;
    }
    mids[len++] = '}';
    mids[len] = '\0';
    irts[ilen++] = '}';
    irts[ilen] = '\0';
    free(mids);
    free(irts);
    free(sql.text);
}

/* As worker.c's dedupe_cb: the batch's strings (message-ids, saga ids) in a small
 * open-addressing table (slots hold an index + 1): a reply's duplicates and its row are found
 * in one probe or two (comparing each reply with every one before it, and with every row, was
 * a visible share of the orchestrator's CPU in batches of 200). */
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
    if (!t->slot)
        die("out of memory");
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

static const char *reply_key(size_t i, const void *pending)
{
    return ((const struct reply_msg *)pending)[i].message_id;
}

static const char *row_key(size_t i, const void *rows)
{
    return ((const struct saga_row *)rows)[i].state.id;
}

/* ---- main ---- */

static uint64_t fnv1a(uint64_t h, const char *s)
{
    for (; *s; s++) {
        h ^= (unsigned char)*s;
        h *= 0x100000001b3ULL;
    }
    return h;
}

static long peak_rss_kb(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_maxrss;
}

int main(int argc, char **argv)
{
    long n_sagas = 20000, batch = 200;
    const char *path = "sagas/order_fulfillment.json";
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--sagas") && i + 1 < argc)
            n_sagas = atol(argv[++i]);
        else if (!strcmp(argv[i], "--batch") && i + 1 < argc)
            batch = atol(argv[++i]);
        else if (!strcmp(argv[i], "--definition") && i + 1 < argc)
            path = argv[++i];
        else {
            fprintf(stderr, "usage: orchestrator_cpu [--sagas N] [--batch B] [--definition "
                            "PATH]\n");
            return 2;
        }
    }
    if (n_sagas < 1 || batch < 1)
        die("--sagas and --batch must be positive");
    log_init(stderr, "orchestrator_cpu");

    struct saga_definition *def = NULL;
    struct diag_list errs;
    memset(&errs, 0, sizeof(errs));
    if (saga_definition_load_file(path, &def, &errs) || !def) {
        diag_clear(&errs);
        fprintf(stderr,
                "orchestrator_cpu: cannot load %s (run from the source tree or give "
                "--definition)\n",
                path);
        return 1;
    }
    diag_clear(&errs);
    if (def->step_count != STEPS)
        die("the definition must have 4 steps");
    struct registry reg = {.defs = &def, .count = 1};

    /* The sagas as saga.start leaves them (bench/saga-bench-run's input), and the message ids
     * the engine will give their commands. */
    struct saga_db *sagas = calloc((size_t)n_sagas, sizeof(*sagas));
    struct id_source ids = {.ids = xmalloc((size_t)n_sagas * STEPS * sizeof(*ids.ids)),
                            .count = (size_t)n_sagas * STEPS};
    if (!sagas)
        die("out of memory");
    for (long i = 0; i < n_sagas; i++) {
        struct saga_db *s = &sagas[i];
        fake_uuid(s->id);
        char t[SAGA_UUID_LEN + 1];
        fake_uuid(t);
        size_t o = 0;
        for (const char *c = t; *c; c++)
            if (*c != '-')
                s->trace_id[o++] = *c;
        s->trace_id[o] = '\0';
        char input[256], version[16];
        snprintf(input, sizeof(input),
                 "{\"orderId\": \"tp-%ld\", \"customerId\": \"c-%ld\", \"items\": [{\"sku\": "
                 "\"sku-%ld\", \"qty\": 1}], \"amount\": %ld}",
                 i + 1, (i + 1) % 100, 1 + (i + 1) % 1000, 10 + (i + 1) % 100);
        snprintf(version, sizeof(version), "%d", def->version);
        col_set(s, 0, s->id);
        col_set(s, 1, def->name);
        col_set(s, 2, version);
        col_set(s, 3, "pending");
        col_set(s, 4, "0");
        col_set(s, 5, "action");
        col_set(s, 6, "0");
        col_set(s, 7, "0");
        col_set(s, 8, "none");
        col_set(s, 11, "f");
        s->col[12] = jsonb_of_text(input);
        col_set(s, 15, s->trace_id);
    }
    /* The engine asks for ids in the order the transactions run: batch by batch, step by
     * step, saga by saga. */
    {
        size_t next = 0;
        for (long b0 = 0; b0 < n_sagas; b0 += batch) {
            long b1 = b0 + batch < n_sagas ? b0 + batch : n_sagas;
            for (int k = 0; k < STEPS; k++)
                for (long i = b0; i < b1; i++) {
                    fake_uuid(ids.ids[next]);
                    memcpy(sagas[i].msg_ids[k], ids.ids[next], SAGA_UUID_LEN + 1);
                    next++;
                }
        }
    }
    struct saga_engine_env env = {.new_uuid = id_next, .arg = &ids};

    /* The replies through the mock cluster: the producer hosts it. */
    nodelay_set_enabled(1);
    const char *const pconf[][2] = {{"test.mock.num.brokers", "1"},
                                    {"log_level", "4"},
                                    {"enable.idempotence", "true"},
                                    {"linger.ms", "5"},
                                    {"queue.buffering.max.messages", "1000000"},
                                    {"queue.buffering.max.kbytes", "2097151"}};
    char errstr[512];
    rd_kafka_t *producer =
        rd_kafka_new(RD_KAFKA_PRODUCER, conf_of(pconf, 6), errstr, sizeof(errstr));
    if (!producer)
        die(errstr);
    rd_kafka_mock_cluster_t *mc = rd_kafka_handle_mock_cluster(producer);
    if (!mc || rd_kafka_mock_topic_create(mc, REPLY_TOPIC,
                                          (int)((n_sagas + PER_PARTITION - 1) / PER_PARTITION), 1))
        die("cannot create the mock cluster's reply topic");
    produce_replies(producer, sagas, n_sagas, def);
    const char *const cconf[][2] = {{"bootstrap.servers", rd_kafka_mock_cluster_bootstraps(mc)},
                                    {"group.id", "orchestrator_cpu"},
                                    {"enable.auto.commit", "false"},
                                    {"enable.auto.offset.store", "false"},
                                    {"queued.max.messages.kbytes", "2097151"},
                                    {"queued.min.messages", "10000000"}};
    rd_kafka_t *consumer =
        rd_kafka_new(RD_KAFKA_CONSUMER, conf_of(cconf, 6), errstr, sizeof(errstr));
    if (!consumer)
        die(errstr);
    rd_kafka_poll_set_consumer(consumer);
    rd_kafka_message_t **msgs = xmalloc((size_t)n_sagas * STEPS * sizeof(*msgs));
    consume_replies(consumer, msgs, n_sagas);
    long setup_rss = peak_rss_kb();

    /* The work, batch by batch: the claim, then each step's replies. */
    struct counts cnt = {0};
    uint64_t hash = 0xcbf29ce484222325ULL;
    struct saga_db **locked = xmalloc((size_t)batch * sizeof(*locked));
    struct reply_msg *pending = xmalloc((size_t)batch * sizeof(*pending));
    size_t msg_next = 0;
    for (long b0 = 0; b0 < n_sagas; b0 += batch) {
        long b1 = b0 + batch < n_sagas ? b0 + batch : n_sagas;
        size_t bn = (size_t)(b1 - b0);
        for (size_t i = 0; i < bn; i++)
            locked[i] = &sagas[b0 + (long)i];
        for (int stage = 0; stage <= STEPS; stage++) {
            PGresult *res = db_result(locked, bn);
            struct store_batch b;
            size_t row_count;
            struct saga_row *rows;
            char *doc;
            timing_on();
            if (stage == 0) {
                /* claim_cb */
                rows = read_rows(&reg, res, &row_count);
                if (store_batch_init(&b))
                    die("store_batch_init");
                for (size_t i = 0; i < row_count; i++) {
                    if (rows[i].state.status != SAGA_PENDING)
                        die("a claimed saga is not pending");
                    struct saga_event ev = {.kind = SAGA_EV_START, .now_ms = NOW_MS};
                    enum saga_outcome out;
                    apply_event(&env, &rows[i], &ev, NULL, &b, &out, &cnt);
                }
                doc = send_apply(rows, row_count, &b);
            } else {
                /* replies_poll, start_reply_batch, lock_cb, dedupe_cb */
                size_t base = (size_t)(stage - 1) * (size_t)n_sagas + (size_t)b0;
                for (size_t i = 0; i < bn; i++)
                    reply_parse(msgs[base + i], &pending[i]);
                lock_and_dedupe_texts(pending, bn);
                rows = read_rows(&reg, res, &row_count);
                if (store_batch_init(&b))
                    die("store_batch_init");
                int64_t now = NOW_MS + stage * 1000;
                struct strset mids, index;
                strset_init(&mids, bn);
                strset_init(&index, row_count);
                for (size_t k = 0; k < row_count; k++)
                    (void)strset_find_add(&index, rows[k].state.id, k, row_key, rows);
                for (size_t i = 0; i < bn; i++) {
                    struct reply_msg *r = &pending[i];
                    if (r->error)
                        die(r->error);
                    if (strset_find_add(&mids, r->message_id, i, reply_key, pending) >= 0)
                        die("a duplicate reply");
                    long found = strset_find_add(&index, r->saga_id, SIZE_MAX, row_key, rows);
                    struct saga_row *row = found >= 0 ? &rows[found] : NULL;
                    if (!row)
                        die("a reply for an unknown saga");
                    if (!row->state.trace_id || strcmp(r->trace_id, row->state.trace_id))
                        cnt.mismatches++; /* check_trace */
                    struct saga_event ev = {.kind = SAGA_EV_REPLY,
                                            .now_ms = now,
                                            .in_reply_to = r->in_reply_to,
                                            .success = r->success,
                                            .reply = r->data};
                    enum saga_outcome out;
                    apply_event(&env, row, &ev, r->message_id, &b, &out, &cnt);
                    if (out == SAGA_APPLIED)
                        cnt.applied++;
                    else
                        cnt.ignored++;
                }
                free(index.slot);
                free(mids.slot);
                doc = send_apply(rows, row_count, &b);
            }
            timing_off();
            /* PostgreSQL runs the document: the rows change. */
            hash = fnv1a(hash, doc);
            for (size_t i = 0; i < row_count; i++)
                for (size_t k = 0; k < bn; k++)
                    if (!strcmp(locked[k]->id, rows[i].state.id)) {
                        db_update(locked[k], &rows[i]);
                        break;
                    }
            timing_on();
            /* commit_cb: batch_reset, and replies_commit's reply_clear */
            for (size_t i = 0; i < row_count; i++)
                store_row_clear(&rows[i]);
            free(rows);
            free(doc);
            if (stage > 0)
                for (size_t i = 0; i < bn; i++)
                    reply_clear(&pending[i]);
            timing_off();
            PQclear(res);
            msg_next += stage > 0 ? bn : 0;
        }
    }
    if (msg_next != (size_t)n_sagas * STEPS || cnt.applied != n_sagas * STEPS || cnt.ignored ||
        cnt.completed != n_sagas || cnt.started != n_sagas)
        die("not every saga completed with every reply applied");
    for (long i = 0; i < n_sagas; i++)
        if (strcmp(sagas[i].col[3], "completed"))
            die("a saga did not complete");

    printf("orchestrator_cpu: %ld sagas (4 steps), batches of %ld, definition %s\n", n_sagas, batch,
           path);
    printf("  CPU per saga: %.0f ns (process), %.0f ns (main thread)\n", proc_ns / n_sagas,
           thread_ns / n_sagas);
    printf("  sagas/s of CPU: %.0f (process), %.0f (main thread)\n", n_sagas / (proc_ns / 1e9),
           n_sagas / (thread_ns / 1e9));
    printf("  peak RSS: %.1f MB (after set-up: %.1f MB)\n", peak_rss_kb() / 1024.0,
           setup_rss / 1024.0);
    printf("  trace mismatches: %ld; documents' hash: %016" PRIx64 "\n", cnt.mismatches, hash);

    rd_kafka_consumer_close(consumer);
    rd_kafka_destroy(consumer);
    rd_kafka_destroy(producer);
    for (long i = 0; i < n_sagas; i++)
        for (int c = 0; c < COLUMNS; c++)
            free(sagas[i].col[c]);
    free(sagas);
    free(ids.ids);
    free(msgs);
    free(locked);
    free(pending);
    saga_definition_destroy(def);
    return 0;
}
