/* relay_e2e: what the relay's end-to-end tests share (included by each tests/e2e/test_relay_*.c;
 * the functions are static so that each test file is one self-contained executable).
 *
 * The model: row number g (0..) of a test has key "k%03d" (g % keys), its per-key running
 * number n = g / keys, a topic chosen by its key, an id derived from g (so a message-id
 * tells which row it is), a payload whose jsonb text form is known in advance, extra headers,
 * and created_at = 2026-01-01 + g ms. So every consumed message can be checked field by field
 * against the row it claims to be, without keeping the rows. */
#ifndef SAGA_TEST_RELAY_E2E_H
#define SAGA_TEST_RELAY_E2E_H

#include <errno.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <signal.h>
#include <time.h>
#include <unistd.h>

#include <arpa/inet.h>
#include <criterion/criterion.h>
#include <librdkafka/rdkafka.h>

#include "devbroker.h"
#include "kafka_consume.h"
#include "pgtest.h"
#include "http.h"
#include "proc.h"

/* Rows a test inserts outside the model have ids starting with this; e2e_verify skips them. */
#define E2E_EXTRA_ID_PREFIX "ffffffff-"
#define E2E_BASE_MS INT64_C(1767225600000) /* 2026-01-01T00:00:00Z */

/* One test's world: a database, a broker, two topics. */
struct e2e {
    struct pgtest_db db;
    PGconn *conn;
    struct devbroker broker;
    char topic_a[64], topic_b[64];
    char table[128]; /* schema.table, default saga.outbox */
    int keys;
};

/* As e2e_setup, with more dev-broker arguments (NULL-terminated, may be NULL). */
static inline void e2e_setup_broker(struct e2e *e, const char *name, int keys,
                                    const char *const broker_args[]);

static inline void e2e_setup(struct e2e *e, const char *name, int keys)
{
    e2e_setup_broker(e, name, keys, NULL);
}

static inline void e2e_setup_broker(struct e2e *e, const char *name, int keys,
                                    const char *const broker_args[])
{
    memset(e, 0, sizeof(*e));
    e->conn = pgtest_fresh(&e->db, true);
    snprintf(e->topic_a, sizeof(e->topic_a), "%s.a", name);
    snprintf(e->topic_b, sizeof(e->topic_b), "%s.b", name);
    snprintf(e->table, sizeof(e->table), "saga.outbox");
    e->keys = keys;
    char ta[80], tb[80];
    snprintf(ta, sizeof(ta), "%s:4", e->topic_a);
    snprintf(tb, sizeof(tb), "%s:3", e->topic_b);
    const char *args[32] = {"--topic", ta, "--topic", tb};
    size_t n = 4;
    for (size_t i = 0; broker_args && broker_args[i] && n < 31; i++)
        args[n++] = broker_args[i];
    args[n] = NULL;
    devbroker_start(&e->broker, args);
}

static inline void e2e_teardown(struct e2e *e)
{
    devbroker_stop(&e->broker);
    PQfinish(e->conn);
    pgtest_db_drop(&e->db);
}

/* ---- the row model ---------------------------------------------------------------------- */

static inline int row_key(const struct e2e *e, long g)
{
    return (int)(g % e->keys);
}

static inline const char *row_topic(const struct e2e *e, long g)
{
    return row_key(e, g) % 2 ? e->topic_b : e->topic_a;
}

static inline long row_n(const struct e2e *e, long g)
{
    return g / e->keys;
}

/* The row number a message-id names, or -1. */
static inline long id_row(const char *id)
{
    if (!id || strlen(id) != 36 || strncmp(id, "00000000-0000-4000-8000-", 24))
        return -1;
    char *end;
    long g = strtol(id + 24, &end, 16);
    return *end ? -1 : g;
}

/* payload::text as PostgreSQL prints it: keys by length, then bytes; ", " and ": ". */
static inline void row_payload_text(const struct e2e *e, long g, char *out, size_t len)
{
    char pad[64];
    int padn = (int)(g % 40);
    memset(pad, 'x', (size_t)padn);
    pad[padn] = '\0';
    snprintf(out, len, "{\"g\": %ld, \"k\": \"k%03d\", \"n\": %ld, \"pad\": \"%s\"}", g,
             row_key(e, g), row_n(e, g), pad);
}

/* Inserts rows [from, to) in one statement (one transaction), in g order. */
static inline void e2e_insert(struct e2e *e, long from, long to)
{
    char sql[2048], p_from[24], p_to[24], p_keys[24];
    snprintf(p_from, sizeof(p_from), "%ld", from);
    snprintf(p_to, sizeof(p_to), "%ld", to);
    snprintf(p_keys, sizeof(p_keys), "%d", e->keys);
    /* The payload is written in another key order and spacing than jsonb prints it, so the
     * test sees that the value is the jsonb text form. Every 97th row tries to override
     * message-id through the headers column: the row's id must win. */
    snprintf(sql, sizeof(sql),
             "INSERT INTO %s (id, topic, key, event_type, payload, headers, created_at) "
             "SELECT ('00000000-0000-4000-8000-' || lpad(to_hex(g), 12, '0'))::uuid, "
             "CASE WHEN (g %% $3::int) %% 2 = 0 THEN $4 ELSE $5 END, "
             "'k' || lpad((g %% $3::int)::text, 3, '0'), 'Ev' || (g %% 3), "
             "format('{\"pad\":\"%%s\",  \"n\":%%s,\"k\":\"k%%s\" , \"g\":%%s}', "
             "repeat('x', (g %% 40)::int), g / $3::int, lpad((g %% $3::int)::text, 3, '0'), "
             "g)::jsonb, "
             "jsonb_build_object('h-a', 'a' || g, 'trace', 'tr-' || (g %% 7)) || "
             "CASE WHEN g %% 97 = 0 THEN '{\"message-id\": \"evil\"}'::jsonb ELSE '{}' END, "
             "timestamptz '2026-01-01 00:00:00+00' + g * interval '1 millisecond' "
             "FROM generate_series($1::bigint, $2::bigint - 1) g ORDER BY g",
             e->table);
    const char *params[] = {p_from, p_to, p_keys, e->topic_a, e->topic_b};
    PQclear(pgtest_query(e->conn, sql, 5, params));
}

static inline long e2e_table_count(struct e2e *e, const char *table)
{
    char sql[256];
    snprintf(sql, sizeof(sql), "SELECT count(*) FROM %s", table);
    return pgtest_count(e->conn, sql, 0, NULL);
}

/* Waits (bounded) until the table has no row left; returns whether it emptied. */
static inline bool e2e_wait_table_empty(struct e2e *e, const char *table, int timeout_ms)
{
    int64_t deadline = proc_now_ms() + timeout_ms;
    for (;;) {
        if (e2e_table_count(e, table) == 0)
            return true;
        if (proc_now_ms() > deadline)
            return false;
        struct timespec ts = {0, 20 * 1000000L};
        nanosleep(&ts, NULL);
    }
}

/* Checks one message against the row its message-id names; returns the row number, or fails
 * the test. */
static inline long e2e_check_message(const struct e2e *e, const struct kmsg *m, long total)
{
    size_t count;
    const char *id = kmsg_header(m, "message-id", &count);
    cr_assert_eq(count, 1, "message %s[%d]@%" PRId64 ": %zu message-id headers", m->topic,
                 m->partition, m->offset, count);
    long g = id_row(id);
    cr_assert(g >= 0 && g < total, "message %s[%d]@%" PRId64 ": message-id %s is no row's id",
              m->topic, m->partition, m->offset, id ? id : "(null)");
    char expect[256];
    cr_assert_str_eq(m->topic, row_topic(e, g), "row %ld: topic", g);
    snprintf(expect, sizeof(expect), "k%03d", row_key(e, g));
    cr_assert(m->key && !strcmp(m->key, expect), "row %ld: key %s, expected %s", g,
              m->key ? m->key : "(null)", expect);
    row_payload_text(e, g, expect, sizeof(expect));
    cr_assert(m->value && !strcmp(m->value, expect), "row %ld: value %s, expected %s", g,
              m->value ? m->value : "(null)", expect);
    cr_assert_eq(m->timestamp, E2E_BASE_MS + g, "row %ld: timestamp %" PRId64 ", expected %" PRId64,
                 g, m->timestamp, E2E_BASE_MS + g);
    cr_assert_eq(m->timestamp_type, RD_KAFKA_TIMESTAMP_CREATE_TIME, "row %ld: timestamp type", g);
    snprintf(expect, sizeof(expect), "Ev%ld", g % 3);
    const char *v = kmsg_header(m, "event-type", &count);
    cr_assert(count == 1 && v && !strcmp(v, expect), "row %ld: event-type %s (x%zu)", g,
              v ? v : "(null)", count);
    snprintf(expect, sizeof(expect), "a%ld", g);
    v = kmsg_header(m, "h-a", &count);
    cr_assert(count == 1 && v && !strcmp(v, expect), "row %ld: header h-a %s", g, v ? v : "(null)");
    snprintf(expect, sizeof(expect), "tr-%ld", g % 7);
    v = kmsg_header(m, "trace", &count);
    cr_assert(count == 1 && v && !strcmp(v, expect), "row %ld: header trace %s", g,
              v ? v : "(null)");
    cr_assert_eq(m->header_count, 4, "row %ld: %zu headers, expected 4", g, m->header_count);
    return g;
}

/* Coverage of rows [0, total) as messages arrive (a predicate for kconsumer_wait_until). */
struct e2e_coverage {
    long total;
    size_t processed; /* messages looked at */
    long distinct;
    unsigned char *seen;
};

static inline bool e2e_covered(struct kmsg *const *msgs, size_t n, void *arg)
{
    struct e2e_coverage *cov = arg;
    for (; cov->processed < n; cov->processed++) {
        long g = id_row(kmsg_header(msgs[cov->processed], "message-id", NULL));
        if (g >= 0 && g < cov->total && !cov->seen[g]) {
            cov->seen[g] = 1;
            cov->distinct++;
        }
    }
    return cov->distinct >= cov->total;
}

/* Waits (bounded) until every row of [0, total) arrived at least once. */
static inline bool e2e_wait_all(struct kconsumer *c, long total, int timeout_ms, long *distinct)
{
    struct e2e_coverage cov = {total, 0, 0, calloc((size_t)total + 1, 1)};
    if (!cov.seen)
        cr_assert_fail("out of memory");
    bool ok = kconsumer_wait_until(c, e2e_covered, &cov, timeout_ms);
    if (distinct)
        *distinct = cov.distinct;
    free(cov.seen);
    return ok;
}

/* Checks every message consumed so far (but those of rows outside the model): each is exactly
 * a row; with ordered, per key, the rows' first deliveries come in seq order; every row of
 * [0, total) arrived; with exactly_once, no row arrived twice. Returns the number of
 * duplicates. */
static inline size_t e2e_verify_opts(struct e2e *e, struct kconsumer *c, long total,
                                     bool exactly_once, bool ordered)
{
    size_t n;
    struct kmsg **msgs = kconsumer_snapshot(c, &n);
    long *deliveries = calloc((size_t)total, sizeof(*deliveries));
    long *last_n = malloc((size_t)e->keys * sizeof(*last_n));
    int *partition = malloc((size_t)e->keys * sizeof(*partition));
    if (!deliveries || !last_n || !partition)
        cr_assert_fail("out of memory");
    for (int k = 0; k < e->keys; k++) {
        last_n[k] = -1;
        partition[k] = -1;
    }
    size_t dups = 0;
    for (size_t i = 0; i < n; i++) {
        const struct kmsg *m = msgs[i];
        const char *id = kmsg_header(m, "message-id", NULL);
        if (id && !strncmp(id, E2E_EXTRA_ID_PREFIX, strlen(E2E_EXTRA_ID_PREFIX)))
            continue; /* a row outside the model, checked by its test */
        long g = e2e_check_message(e, m, total);
        int k = row_key(e, g);
        /* One key, one partition: arrival order within it is offset order. */
        if (partition[k] < 0)
            partition[k] = m->partition;
        cr_assert_eq(m->partition, partition[k], "key k%03d in partitions %d and %d", k,
                     partition[k], m->partition);
        if (deliveries[g]++) {
            dups++;
            continue;
        }
        if (!ordered)
            continue;
        cr_assert(row_n(e, g) == last_n[k] + 1,
                  "key k%03d: first delivery of n=%ld (row %ld, %s[%d]@%" PRId64
                  ") after n=%ld: out of order or a row skipped",
                  k, row_n(e, g), g, m->topic, m->partition, m->offset, last_n[k]);
        last_n[k] = row_n(e, g);
    }
    for (long g = 0; g < total; g++)
        cr_assert(deliveries[g] > 0, "row %ld never arrived (%zu messages)", g, n);
    if (exactly_once)
        cr_assert_eq(dups, 0, "%zu duplicate deliveries", dups);
    free(partition);
    free(last_n);
    free(deliveries);
    free(msgs);
    return dups;
}

static inline size_t e2e_verify(struct e2e *e, struct kconsumer *c, long total, bool exactly_once)
{
    return e2e_verify_opts(e, c, total, exactly_once, true);
}

/* ---- the relay ---------------------------------------------------------------------------- */

/* Starts the relay on e's database and broker, with env entries added (NULL-terminated, may
 * be NULL); later entries override the defaults. */
static inline void e2e_relay_start(struct e2e *e, struct proc *p, const char *const more_env[])
{
    const char *bin = getenv("SAGA_RELAY_BIN");
    if (!bin || !*bin)
        cr_assert_fail("SAGA_RELAY_BIN is not set (run the test through meson)");
    static char url[1100], brokers[300], tables[160];
    snprintf(url, sizeof(url), "RELAY_DATABASE_URL=%s", e->db.url);
    snprintf(brokers, sizeof(brokers), "RELAY_KAFKA_BROKERS=%s", e->broker.bootstrap);
    snprintf(tables, sizeof(tables), "RELAY_OUTBOX_TABLES=%s", e->table);
    const char *env[64] = {url,
                           brokers,
                           tables,
                           "RELAY_ADMIN_ADDR=127.0.0.1:0",
                           "RELAY_LOG_LEVEL=info",
                           "RELAY_POLL_INTERVAL=200ms",
                           "RELAY_CONFIG"};
    size_t n = 7;
    for (size_t i = 0; more_env && more_env[i]; i++) {
        if (n + 1 >= sizeof(env) / sizeof(env[0]))
            cr_assert_fail("e2e_relay_start: too many variables");
        env[n++] = more_env[i];
    }
    env[n] = NULL;
    const char *argv[] = {bin, NULL};
    struct proc_options opts = {.name = "relay"};
    proc_start(p, argv, env, &opts);
}

/* The admin port from the relay's "admin endpoint" log line (waits, bounded). */
static inline int e2e_admin_port(struct proc *p)
{
    char line[1024];
    if (!proc_wait_log(p, "admin endpoint", NULL, 15000, line, sizeof(line))) {
        proc_dump(p, "relay", 4000);
        cr_assert_fail("the relay logged no admin endpoint within 15 s");
    }
    const char *at = strstr(line, "\"port\":\"");
    cr_assert(at, "no port in \"%s\"", line);
    return atoi(at + 8);
}

/* GET path on 127.0.0.1:port (tests/support/http.c); returns the status code and the body
 * (caller frees), or 0 with no body when the endpoint does not answer within the bound. */
static inline int e2e_http_get(int port, const char *path, char **body)
{
    return http_get(port, path, body);
}

/* The value of one metrics line "name{labels} value", or -1 when absent. */
static inline double e2e_metric(const char *metrics, const char *series)
{
    return http_metric(metrics, series);
}

/* Waits (bounded) until the relay's metric series reaches at least value. */
static inline bool e2e_wait_metric(int port, const char *series, double value, int timeout_ms)
{
    int64_t deadline = proc_now_ms() + timeout_ms;
    for (;;) {
        char *body;
        int status = e2e_http_get(port, "/metrics", &body);
        double v = status == 200 ? e2e_metric(body, series) : -1;
        free(body);
        if (v >= value)
            return true;
        if (proc_now_ms() > deadline)
            return false;
        struct timespec ts = {0, 20 * 1000000L};
        nanosleep(&ts, NULL);
    }
}

/* For a failing test's log: the rows still in the table (seq, key) and the relay's metrics
 * that say where the others are (claimed, in the producer, holes, errors). */
static inline void e2e_dump_state(struct e2e *e, int port)
{
    char sql[512];
    snprintf(sql, sizeof(sql),
             "SELECT count(*), coalesce(string_agg(seq || ':' || key, ' ' ORDER BY seq), '') "
             "FROM (SELECT seq, key FROM %s ORDER BY seq LIMIT 20) r",
             e->table);
    PGresult *res = pgtest_query(e->conn, sql, 0, NULL);
    fprintf(stderr, "rows left in %s (first 20): %s [%s]\n", e->table, PQgetvalue(res, 0, 0),
            PQgetvalue(res, 0, 1));
    PQclear(res);
    char *body = NULL;
    if (e2e_http_get(port, "/metrics", &body) == 200) {
        for (char *line = strtok(body, "\n"); line; line = strtok(NULL, "\n"))
            if (line[0] != '#' && !strstr(line, "_bucket") &&
                (strstr(line, "inflight") || strstr(line, "holes") || strstr(line, "claimed") ||
                 strstr(line, "published") || strstr(line, "errors") || strstr(line, "backlog")))
                fprintf(stderr, "  %s\n", line);
    }
    free(body);
}

/* Waits (bounded) until /readyz answers 200 and returns its body (caller frees); fails the
 * test otherwise. Kafka counts as reachable from the producer's first statistics (every
 * second), so a relay is not ready during its first second even when it publishes. */
static inline char *e2e_wait_ready(int port, int timeout_ms)
{
    int64_t deadline = proc_now_ms() + timeout_ms;
    char *body = NULL;
    int status;
    while ((status = e2e_http_get(port, "/readyz", &body)) != 200 && proc_now_ms() < deadline) {
        free(body);
        body = NULL;
        struct timespec ts = {0, 50 * 1000000L};
        nanosleep(&ts, NULL);
    }
    cr_assert_eq(status, 200, "/readyz never ready: %s", body ? body : "");
    return body;
}

/* SIGTERM, then waits (bounded) for the exit; fails the test unless the relay exits 0. */
static inline void e2e_relay_stop(struct proc *p)
{
    /* A SIGTERM that lands before main() runs (the test had nothing left to wait for) would
     * end the relay by the default action: wait until it runs its loop. */
    if (!proc_wait_log(p, "outbox-relay starting", NULL, 15000, NULL, 0)) {
        proc_kill(p);
        proc_dump(p, "relay", 6000);
        cr_assert_fail("the relay did not start its loop within 15 s");
    }
    proc_signal(p, SIGTERM);
    if (!proc_wait_exit(p, 40000)) {
        proc_kill(p);
        proc_dump(p, "relay", 6000);
        cr_assert_fail("the relay did not exit within 40 s of SIGTERM");
    }
    if (proc_exit_code(p) != 0) {
        proc_dump(p, "relay", 6000);
        cr_assert_fail("the relay exited %d after SIGTERM, expected 0", proc_exit_code(p));
    }
    /* Its producers destroyed at once (a wait for them before the last destroy cost every
     * stop 5 s and this line). */
    cr_assert_eq(proc_count_log(p, "still being destroyed"), 0,
                 "the relay waited for a producer's destruction at exit");
}

/* ---- a test's usual start and end -------------------------------------------------------- */

/* One relay under test and the consumer that watches it. */
struct e2e_run {
    struct kconsumer *c; /* owned; e2e_finish stops it */
    struct proc relay;   /* owned; e2e_finish stops it (SIGTERM, exit 0) and cleans it up */
    int port;            /* the relay's admin port (e2e_start reads it) */
};

/* A consumer of both of e's topics; the caller stops it (kconsumer_stop). */
static inline struct kconsumer *e2e_consume(struct e2e *e)
{
    const char *topics[] = {e->topic_a, e->topic_b, NULL};
    return kconsumer_start(e->broker.bootstrap, topics);
}

/* The usual start: a consumer of both topics (subscribed before the relay publishes), the
 * relay with env added (NULL-terminated, may be NULL), and its admin port (waits, bounded).
 * r's consumer and relay are the caller's to end, with e2e_finish. */
static inline void e2e_start(struct e2e *e, struct e2e_run *r, const char *const env[])
{
    r->c = e2e_consume(e);
    e2e_relay_start(e, &r->relay, env);
    r->port = e2e_admin_port(&r->relay);
}

/* The usual check that rows [0, total) went out: each arrived within timeout_ms (else the
 * relay's log and a failure), e's table (e->table) emptied within 20 s, and e2e_verify with
 * exactly_once. Returns the number of duplicates. */
static inline size_t e2e_expect_all(struct e2e *e, struct e2e_run *r, long total, int timeout_ms,
                                    bool exactly_once)
{
    long distinct = 0;
    if (!e2e_wait_all(r->c, total, timeout_ms, &distinct)) {
        proc_dump(&r->relay, "relay", 6000);
        /* Still in the table (not published yet) or gone from it (deleted unpublished, or
         * published and not consumed): different bugs. The first missing rows say which. */
        size_t n;
        struct kmsg **msgs = kconsumer_snapshot(r->c, &n);
        char *seen = calloc((size_t)total, 1);
        cr_assert(seen, "out of memory");
        for (size_t i = 0; i < n; i++) {
            long g = id_row(kmsg_header(msgs[i], "message-id", NULL));
            if (g >= 0 && g < total)
                seen[g] = 1;
        }
        free(msgs);
        char missing[512] = "";
        size_t len = 0;
        for (long g = 0, shown = 0; g < total && shown < 5; g++) {
            if (seen[g])
                continue;
            char sql[256], id[64];
            snprintf(id, sizeof(id), "00000000-0000-4000-8000-%012lx", (unsigned long)g);
            snprintf(sql, sizeof(sql), "SELECT count(*) FROM %s WHERE id = $1::uuid", e->table);
            const char *params[] = {id};
            len += (size_t)snprintf(missing + len, sizeof(missing) - len, " row %ld (%s)", g,
                                    pgtest_count(e->conn, sql, 1, params) ? "in the table"
                                                                          : "not in the table");
            shown++;
        }
        free(seen);
        cr_assert_fail("%ld of %ld rows arrived within %d ms; %ld rows still in %s; missing:%s",
                       distinct, total, timeout_ms, e2e_table_count(e, e->table), e->table,
                       missing);
    }
    cr_assert(e2e_wait_table_empty(e, e->table, 20000), "%ld rows left in %s",
              e2e_table_count(e, e->table), e->table);
    return e2e_verify(e, r->c, total, exactly_once);
}

/* The usual end: stops the relay (e2e_relay_stop: SIGTERM, exit 0, bounded), cleans it up,
 * stops the consumer and tears e down. */
static inline void e2e_finish(struct e2e *e, struct e2e_run *r)
{
    e2e_relay_stop(&r->relay);
    proc_cleanup(&r->relay);
    kconsumer_stop(r->c);
    e2e_teardown(e);
}

/* The server label the relay gives the tables of a database URL: host:port. */
static inline void e2e_server_of(const char *url, char *out, size_t len)
{
    const char *host = "local", *port = "5432";
    PQconninfoOption *opts = PQconninfoParse(url, NULL);
    for (PQconninfoOption *o = opts; o && o->keyword; o++) {
        if (!strcmp(o->keyword, "host") && o->val && *o->val)
            host = o->val;
        if (!strcmp(o->keyword, "port") && o->val && *o->val)
            port = o->val;
    }
    snprintf(out, len, "%s:%s", host, port);
    PQconninfoFree(opts);
}

/* series with the labels the relay adds after table="...": database="<db's name>" and
 * server="<host:port>". A series without a table label is returned as it is. The result
 * lives in one of 16 rotating buffers. */
static inline const char *e2e_series_db(const struct pgtest_db *db, const char *series)
{
    static char bufs[16][1024];
    static unsigned next;
    char *out = bufs[next++ % 16];
    const char *table = strstr(series, "table=\"");
    const char *end = table ? strchr(table + 7, '"') : NULL;
    if (!end) {
        snprintf(out, sizeof(bufs[0]), "%s", series);
        return out;
    }
    char server[300];
    e2e_server_of(db->url, server, sizeof(server));
    snprintf(out, sizeof(bufs[0]), "%.*s,database=\"%s\",server=\"%s\"%s", (int)(end + 1 - series),
             series, db->name, server, end + 1);
    return out;
}

static inline const char *e2e_series(const struct e2e *e, const char *series)
{
    return e2e_series_db(&e->db, series);
}

#endif
