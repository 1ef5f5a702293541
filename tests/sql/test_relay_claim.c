/* The relay's claim statement and claim session (relay/outbox_sql.c), run exactly as the relay
 * runs them: the rows a claim returns (in [floor, low) and above the cursor, never in between),
 * their binary columns, and the claim lock that lets one claim session at a time claim. */
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <criterion/criterion.h>

#include "outbox_sql.h"
#include "pgtest.h"

static struct pgtest_db db;
static PGconn *conn;
static struct outbox_sql sql;
static char url[1024];

static void setup(void)
{
    conn = pgtest_fresh(&db, true);
    pgtest_url_for(pgtest_server_url(), db.name, url, sizeof(url));
    cr_assert_eq(outbox_sql_build("saga", "outbox", &sql), 0);
}

static void teardown(void)
{
    outbox_sql_free(&sql);
    PQfinish(conn);
    pgtest_db_drop(&db);
}

TestSuite(relay_claim, .init = setup, .fini = teardown, .timeout = 120);

static void insert_rows(int n)
{
    for (int i = 0; i < n; i++)
        pgtest_exec(conn, "INSERT INTO saga.outbox (id, topic, key, event_type, payload) VALUES "
                          "(gen_random_uuid(), 't', 'k', 'e', '{\"a\": 1}')");
}

static int64_t be64(const char *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = v << 8 | (unsigned char)p[i];
    return (int64_t)v;
}

/* Runs the claim on the claimer's session (binary results, as the relay asks) and writes
 * the seqs it returned, comma-separated, into out. Returns the row count. */
/* budget NULL: relay_claim; else relay_claim_capped with that byte cap. */
static int claim_budget(PGconn *claimer, const char *floor, const char *low, const char *cursor,
                        const char *budget, char *out, size_t outlen)
{
    const char *params[] = {low, cursor, "100", floor, budget};
    PGresult *r = PQexecPrepared(claimer, budget ? "relay_claim_capped" : "relay_claim",
                                 budget ? 5 : 4, params, NULL, NULL, 1);
    cr_assert_eq(PQresultStatus(r), PGRES_TUPLES_OK, "claim: %s", PQresultErrorMessage(r));
    size_t len = 0;
    out[0] = '\0';
    for (int i = 0; i < PQntuples(r); i++) {
        cr_assert_eq(PQgetlength(r, i, 0), 8, "seq is a binary int8");
        cr_assert_eq(PQgetlength(r, i, 1), 16, "id is a binary uuid");
        /* payload and headers as text: their bytes, no jsonb version byte */
        cr_assert_eq(PQgetlength(r, i, 5), 8, "payload is its text");
        cr_assert_str_eq(PQgetvalue(r, i, 5), "{\"a\": 1}");
        cr_assert_str_eq(PQgetvalue(r, i, 6), "{}", "headers is its text");
        cr_assert_eq(PQgetlength(r, i, 7), 8, "created_at is a binary timestamptz");
        cr_assert_eq(PQgetlength(r, i, 8), 8, "upto is a binary int8");
        len += (size_t)snprintf(out + len, outlen - len, "%s%lld", i ? "," : "",
                                (long long)be64(PQgetvalue(r, i, 0)));
    }
    int n = PQntuples(r);
    PQclear(r);
    return n;
}

static int claim_from(PGconn *claimer, const char *floor, const char *low, const char *cursor,
                      char *out, size_t outlen)
{
    /* Both statements return the same rows when the cap does not bind. */
    char capped[256];
    int n = claim_budget(claimer, floor, low, cursor, "1000000000", capped, sizeof(capped));
    cr_assert_eq(claim_budget(claimer, floor, low, cursor, NULL, out, outlen), n);
    cr_assert_str_eq(out, capped);
    return n;
}

/* The claim with no hole below the watermark (its lower branch starts at low: empty). */
static int claim(PGconn *claimer, const char *low, const char *cursor, char *out, size_t outlen)
{
    return claim_from(claimer, low, low, cursor, out, outlen);
}

/* A session set up as the relay sets up its claim session: the PREPARE, then the claim
 * lock; *locked says whether it got the lock. */
static PGconn *claimer_session(bool *locked)
{
    PGconn *c = pgtest_connect(url);
    PGresult *r = PQexec(c, sql.claim_session); /* two statements: the last one's result */
    cr_assert_eq(PQresultStatus(r), PGRES_TUPLES_OK, "%s", PQresultErrorMessage(r));
    *locked = !strcmp(PQgetvalue(r, 0, 0), "t");
    PQclear(r);
    return c;
}

Test(relay_claim, rows_below_low_and_above_cursor_only)
{
    insert_rows(6); /* seq 1..6 */
    char got[256];
    bool locked;
    PGconn *claimer = claimer_session(&locked);
    cr_assert(locked);
    cr_assert_eq(claim(claimer, "1", "0", got, sizeof(got)), 6);
    cr_assert_str_eq(got, "1,2,3,4,5,6");
    /* Rows 3 and 4 in flight (low 3, cursor 4): 1 and 2 committed late (holes from 1), 5
     * and 6 are new. */
    cr_assert_eq(claim_from(claimer, "1", "3", "4", got, sizeof(got)), 4);
    cr_assert_str_eq(got, "1,2,5,6");
    /* Only hole 2 still open: the lower branch reads from it, not from the head. */
    cr_assert_eq(claim_from(claimer, "2", "3", "4", got, sizeof(got)), 3);
    cr_assert_str_eq(got, "2,5,6");
    /* No hole: nothing below the watermark is read. */
    cr_assert_eq(claim(claimer, "3", "4", got, sizeof(got)), 2);
    cr_assert_str_eq(got, "5,6");
    PQfinish(claimer);
}

/* The byte cap ($5): a row comes only while the bytes of the rows before it are under
 * the cap, so the first row always does, however large; upto is the running total. */
Test(relay_claim, byte_cap_stops_the_claim_after_the_row_that_reaches_it)
{
    insert_rows(6); /* seq 1..6 */
    char got[256];
    bool locked;
    PGconn *claimer = claimer_session(&locked);
    cr_assert(locked);
    /* One row's bytes as the statement (and row_bytes in the relay) counts them: payload and
     * headers text, key, event type, 56 for the message-id and event-type headers. */
    char *one = pgtest_value(conn,
                             "SELECT (octet_length(payload::text) + octet_length(headers::text) + "
                             "octet_length(key) + octet_length(event_type) + 56)::text FROM "
                             "saga.outbox WHERE seq = 1",
                             0, NULL);
    long size = atol(one);
    free(one);
    cr_assert(size > 0);
    char cap[24];
    snprintf(cap, sizeof(cap), "%ld", 2 * size); /* the third row starts at the cap */
    cr_assert_eq(claim_budget(claimer, "1", "1", "0", cap, got, sizeof(got)), 2);
    cr_assert_str_eq(got, "1,2");
    snprintf(cap, sizeof(cap), "%ld", 2 * size + 1);
    cr_assert_eq(claim_budget(claimer, "1", "1", "0", cap, got, sizeof(got)), 3);
    cr_assert_str_eq(got, "1,2,3");
    cr_assert_eq(claim_budget(claimer, "1", "1", "0", "1", got, sizeof(got)), 1,
                 "the first row always");
    cr_assert_str_eq(got, "1");
    /* Across both branches, in seq order: hole 1 below the watermark, then 5, 6 above. */
    snprintf(cap, sizeof(cap), "%ld", 2 * size);
    cr_assert_eq(claim_budget(claimer, "1", "3", "4", cap, got, sizeof(got)), 2);
    cr_assert_str_eq(got, "1,2");
    PGresult *r =
        PQexecPrepared(claimer, "relay_claim_capped", 5,
                       (const char *[]){"3", "4", "100", "1", "1000000000"}, NULL, NULL, 0);
    cr_assert_eq(PQresultStatus(r), PGRES_TUPLES_OK, "%s", PQresultErrorMessage(r));
    cr_assert_eq(PQntuples(r), 4);
    for (int i = 0; i < 4; i++)
        cr_assert_eq(atol(PQgetvalue(r, i, 8)), (i + 1) * size, "upto of row %d", i);
    PQclear(r);
    PQfinish(claimer);
}

/* A compressed payload counts its full size, not its stored one: 200 KB of one letter is
 * stored in a few KB (pglz), and a cap counted in stored bytes let a claim read far past it. */
Test(relay_claim, byte_cap_counts_compressed_payloads_in_full)
{
    insert_rows(1);
    pgtest_exec(conn, "INSERT INTO saga.outbox (id, topic, key, event_type, payload) VALUES "
                      "(gen_random_uuid(), 't', 'k', 'e', jsonb_build_object('x', repeat('a', "
                      "200000)))");
    insert_rows(1);
    long stored = pgtest_count(
        conn, "SELECT pg_column_size(payload) FROM saga.outbox WHERE seq = 2", 0, NULL);
    cr_assert(stored < 20000, "the payload was not compressed (%ld bytes stored)", stored);
    bool locked;
    PGconn *claimer = claimer_session(&locked);
    cr_assert(locked);
    /* 50,000 bytes: above the first row and the stored size of the second, below its size. */
    PGresult *r = PQexecPrepared(claimer, "relay_claim_capped", 5,
                                 (const char *[]){"1", "0", "100", "1", "50000"}, NULL, NULL, 1);
    cr_assert_eq(PQresultStatus(r), PGRES_TUPLES_OK, "%s", PQresultErrorMessage(r));
    cr_assert_eq(PQntuples(r), 2, "%d rows: the row after the compressed one came within the cap",
                 PQntuples(r));
    cr_assert_eq(be64(PQgetvalue(r, 0, 0)), 1);
    cr_assert_eq(be64(PQgetvalue(r, 1, 0)), 2);
    cr_assert(be64(PQgetvalue(r, 1, 8)) > 200000, "upto %" PRId64 " after the compressed row",
              be64(PQgetvalue(r, 1, 8)));
    PQclear(r);
    PQfinish(claimer);
}

/* The claim lock (the fence between two relays' claims) is not the leader lock, and one
 * claim session at a time holds it: a second one (a new leader's, while the old leader's
 * claim session lives) does not get it until the first session ends. */
Test(relay_claim, one_claim_session_at_a_time)
{
    cr_assert_str_neq(sql.lock_key, sql.claim_lock_key);
    bool first, second;
    PGconn *a = claimer_session(&first);
    cr_assert(first, "the first claim session takes the claim lock");
    PGconn *b = claimer_session(&second);
    cr_assert_not(second, "a second claim session must not get it while the first lives");
    PQfinish(b);
    const char *pid[] = {NULL};
    char *apid = pgtest_value(a, "SELECT pg_backend_pid()::text", 0, NULL);
    pid[0] = apid;
    PQfinish(a);
    long gone = 0;
    for (int i = 0; i < 500 && !gone; i++) /* the backend exits asynchronously */
        gone = pgtest_count(conn,
                            "SELECT count(*) FROM (SELECT pg_sleep(0.01)) s WHERE NOT EXISTS "
                            "(SELECT 1 FROM pg_stat_activity WHERE pid = $1::int)",
                            1, pid);
    free(apid);
    cr_assert(gone, "the first claim session's backend did not exit within 5 s");
    PGconn *c = claimer_session(&second);
    cr_assert(second, "the claim lock is free once the first claim session ended");
    PQfinish(c);
}

/* The plan of stmt (an EXPLAIN) on session c, one line per row, into plan. */
static void explain(PGconn *c, const char *stmt, char *plan, size_t size)
{
    PGresult *r = PQexec(c, stmt);
    cr_assert_eq(PQresultStatus(r), PGRES_TUPLES_OK, "%s", PQresultErrorMessage(r));
    size_t len = 0;
    plan[0] = '\0';
    for (int k = 0; k < PQntuples(r) && len < size - 1; k++)
        len += (size_t)snprintf(plan + len, size - len, "%s\n", PQgetvalue(r, k, 0));
    PQclear(r);
}

/* The claims are prepared once per session, typically when the outbox is empty and has no
 * statistics yet, and their generic plans kept while the backlog grows: those plans must read
 * the outbox through its seq index (a sequential scan would read the whole backlog at every
 * claim). */
Test(relay_claim, plans_made_on_an_empty_outbox_use_the_seq_index)
{
    bool locked;
    PGconn *c = claimer_session(&locked);
    cr_assert(locked);
    char seqs[64];
    for (int i = 0; i < 8; i++) /* past the 5 custom plans: the generic one from now on */
        claim(c, "1", "0", seqs, sizeof(seqs));
    pgtest_exec(conn, "INSERT INTO saga.outbox (id, topic, key, event_type, payload) "
                      "SELECT gen_random_uuid(), 't', 'k', 'e', '{\"a\": 1}' "
                      "FROM generate_series(1, 20000)");
    const char *plans[] = {"EXPLAIN EXECUTE relay_claim(1, 0, 100, 1)",
                           "EXPLAIN EXECUTE relay_claim_capped(1, 0, 100, 1, 1000000)"};
    for (size_t i = 0; i < 2; i++) {
        char plan[4096];
        explain(c, plans[i], plan, sizeof(plan));
        cr_expect(!strstr(plan, "Seq Scan"), "%s:\n%s", plans[i], plan);
        cr_expect(strstr(plan, "outbox_seq_key"), "%s:\n%s", plans[i], plan);
    }
    PQfinish(c);
}

/* The deletes too: the session that deletes published rows (set up as the relay sets up its
 * lock session) makes its plan while the outbox is small and keeps it; with the backlog grown
 * (here 20,000 rows, as dead rows between two autovacuums are), it must still delete through
 * the seq index, not read the table (it did: a sequential scan, 8 ms a delete at 3,000
 * pages). */
Test(relay_claim, delete_plans_made_on_a_small_outbox_use_the_seq_index)
{
    PGconn *c = pgtest_connect(url);
    PGresult *r = PQexec(c, sql.session);
    cr_assert_eq(PQresultStatus(r), PGRES_COMMAND_OK, "%s", PQresultErrorMessage(r));
    PQclear(r);
    /* No autoanalyze in between: it would replan the statement, and the test would pass
     * without the session's settings. */
    pgtest_exec(conn, "ALTER TABLE saga.outbox SET (autovacuum_enabled = off)");
    insert_rows(20);
    for (int i = 1; i <= 16; i += 2) { /* past the 5 custom plans */
        char arr[32];
        snprintf(arr, sizeof(arr), "{%d,%d}", i, i + 1);
        const char *params[] = {arr};
        r = PQexecPrepared(c, "relay_delete", 1, params, NULL, NULL, 0);
        cr_assert_eq(PQresultStatus(r), PGRES_COMMAND_OK, "%s", PQresultErrorMessage(r));
        cr_assert_str_eq(PQcmdTuples(r), "2");
        PQclear(r);
    }
    pgtest_exec(conn, "INSERT INTO saga.outbox (id, topic, key, event_type, payload) "
                      "SELECT gen_random_uuid(), 't', 'k', 'e', '{\"a\": 1}' "
                      "FROM generate_series(1, 20000)");
    char plan[4096];
    explain(c, "EXPLAIN EXECUTE relay_delete('{17,18}')", plan, sizeof(plan));
    cr_expect(!strstr(plan, "Seq Scan"), "relay_delete:\n%s", plan);
    cr_expect(strstr(plan, "outbox_seq_key"), "relay_delete:\n%s", plan);
    PQfinish(c);
}

/* Both claims return payload and headers as text (the relay sends their text), and the capped
 * claim's window does not hold the candidates' rendered text: a claim sized for small rows that
 * meets large ones must not write them all to temporary files (with temp_file_limit set, it
 * would fail at every retry). 40 rows of ~360 KB, work_mem 64kB, a byte cap of 1: one row
 * returned, no temporary file written. */
Test(relay_claim, claims_return_text_and_the_capped_window_holds_no_text)
{
    bool locked;
    PGconn *c = claimer_session(&locked);
    cr_assert(locked);
    pgtest_exec(conn, "INSERT INTO saga.outbox (id, topic, key, event_type, payload) "
                      "SELECT gen_random_uuid(), 't', 'k', 'e', jsonb_build_object('blob', "
                      "(SELECT string_agg(md5(i::text || '-' || j::text), '') "
                      "FROM generate_series(1, 11000) j)) FROM generate_series(1, 40) i");
    const char *params[] = {"1", "0", "40", "1", "1"};
    for (int capped = 0; capped < 2; capped++) {
        PGresult *r = PQexecPrepared(c, capped ? "relay_claim_capped" : "relay_claim",
                                     capped ? 5 : 4, params, NULL, NULL, 1);
        cr_assert_eq(PQresultStatus(r), PGRES_TUPLES_OK, "%s", PQresultErrorMessage(r));
        cr_assert_eq(PQntuples(r), capped ? 1 : 40);
        cr_expect_eq(PQftype(r, 5), 25, "payload is text (oid 25), not %u", PQftype(r, 5));
        cr_expect_eq(PQftype(r, 6), 25, "headers is text (oid 25), not %u", PQftype(r, 6));
        cr_expect_gt(PQgetlength(r, 0, 5), 350000, "the whole payload's text");
        PQclear(r);
    }
    pgtest_exec(c, "SET work_mem = '64kB'");
    PGresult *r = PQexec(c, "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF, TIMING OFF) "
                            "EXECUTE relay_claim_capped(1, 0, 40, 1, 1)");
    cr_assert_eq(PQresultStatus(r), PGRES_TUPLES_OK, "%s", PQresultErrorMessage(r));
    char plan[8192] = "";
    size_t len = 0;
    bool temp = false;
    for (int k = 0; k < PQntuples(r); k++) {
        const char *line = PQgetvalue(r, k, 0);
        /* "Buffers: ... temp read=N written=M", or a node's "Storage: Disk" */
        if ((strstr(line, "Buffers:") && strstr(line, "temp ")) || strstr(line, "Storage: Disk"))
            temp = true;
        if (len < sizeof(plan) - 1)
            len += (size_t)snprintf(plan + len, sizeof(plan) - len, "%s\n", line);
    }
    PQclear(r);
    cr_expect(!temp, "the capped claim wrote temporary files:\n%s", plan);
    PQfinish(c);
}
