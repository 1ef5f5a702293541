/* The relay's claim statement (relay/outbox_sql.c), run exactly as the relay runs it: its rows
 * (below the low watermark and above the cursor, never in between), their binary columns, and
 * the fence: rows come back only while the session named by $4 (pid) and $5 (backend_start)
 * holds the table's leader lock. */
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

/* A session that takes the leader lock; its pid and backend_start go into *pid, *start. */
static PGconn *leader(char pid[16], char start[64])
{
    PGconn *c = pgtest_connect(url);
    const char *params[] = {sql.lock_key};
    PGresult *r = pgtest_query(c,
                               "SELECT pg_try_advisory_lock($1::bigint), pg_backend_pid(), "
                               "(SELECT backend_start FROM pg_stat_activity WHERE pid = "
                               "pg_backend_pid())",
                               1, params);
    cr_assert_str_eq(PQgetvalue(r, 0, 0), "t", "the leader lock is free");
    snprintf(pid, 16, "%s", PQgetvalue(r, 0, 1));
    snprintf(start, 64, "%s", PQgetvalue(r, 0, 2));
    PQclear(r);
    return c;
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
static int claim(PGconn *claimer, const char *low, const char *cursor, const char *pid,
                 const char *start, char *out, size_t outlen)
{
    const char *params[] = {low, cursor, "100", pid, start};
    PGresult *r = PQexecPrepared(claimer, "relay_claim", 5, params, NULL, NULL, 1);
    cr_assert_eq(PQresultStatus(r), PGRES_TUPLES_OK, "claim: %s", PQresultErrorMessage(r));
    size_t len = 0;
    out[0] = '\0';
    for (int i = 0; i < PQntuples(r); i++) {
        cr_assert_eq(PQgetlength(r, i, 0), 8, "seq is a binary int8");
        cr_assert_eq(PQgetlength(r, i, 1), 16, "id is a binary uuid");
        cr_assert_eq(PQgetvalue(r, i, 5)[0], 1, "payload is binary jsonb (version 1)");
        cr_assert_str_eq(PQgetvalue(r, i, 5) + 1, "{\"a\": 1}");
        cr_assert_eq(PQgetlength(r, i, 7), 8, "created_at is a binary timestamptz");
        len += (size_t)snprintf(out + len, outlen - len, "%s%lld", i ? "," : "",
                                (long long)be64(PQgetvalue(r, i, 0)));
    }
    int n = PQntuples(r);
    PQclear(r);
    return n;
}

static PGconn *claimer_session(void)
{
    PGconn *c = pgtest_connect(url);
    PQclear(pgtest_query(c, sql.claim_session, 0, NULL));
    return c;
}

Test(relay_claim, rows_below_low_and_above_cursor_only)
{
    insert_rows(6); /* seq 1..6 */
    char pid[16], start[64], got[256];
    PGconn *lead = leader(pid, start);
    PGconn *claimer = claimer_session();
    cr_assert_eq(claim(claimer, "1", "0", pid, start, got, sizeof(got)), 6);
    cr_assert_str_eq(got, "1,2,3,4,5,6");
    /* Rows 3 and 4 in flight (low 3, cursor 4): 1 and 2 committed late, 5 and 6 are new. */
    cr_assert_eq(claim(claimer, "3", "4", pid, start, got, sizeof(got)), 4);
    cr_assert_str_eq(got, "1,2,5,6");
    PQfinish(claimer);
    PQfinish(lead);
}

Test(relay_claim, fenced_by_the_lock_holder)
{
    insert_rows(3);
    char pid[16], start[64], got[256];
    PGconn *lead = leader(pid, start);
    PGconn *claimer = claimer_session();
    cr_assert_eq(claim(claimer, "1", "0", pid, start, got, sizeof(got)), 3, "the leader claims");

    /* Another pid, or the same pid with another start time (a reused pid): nothing. */
    cr_assert_eq(claim(claimer, "1", "0", "1", start, got, sizeof(got)), 0);
    cr_assert_eq(claim(claimer, "1", "0", pid, "2000-01-01 00:00:00+00", got, sizeof(got)), 0);

    /* The holder lets the lock go: nothing; takes it again: rows again. */
    const char *params[] = {sql.lock_key};
    PQclear(pgtest_query(lead, "SELECT pg_advisory_unlock($1::bigint)", 1, params));
    cr_assert_eq(claim(claimer, "1", "0", pid, start, got, sizeof(got)), 0, "lock released");
    PQclear(pgtest_query(lead, "SELECT pg_advisory_lock($1::bigint)", 1, params));
    cr_assert_eq(claim(claimer, "1", "0", pid, start, got, sizeof(got)), 3);

    /* The holder's session ends (a crashed relay, a terminated backend) and another session
     * takes the lock: the old holder's claims get nothing, the new one's get the rows. */
    PQfinish(lead);
    const char *pidp[] = {pid};
    long gone = 0;
    for (int i = 0; i < 500 && !gone; i++) /* the backend exits asynchronously */
        gone = pgtest_count(conn,
                            "SELECT count(*) FROM (SELECT pg_sleep(0.01)) s WHERE NOT EXISTS "
                            "(SELECT 1 FROM pg_stat_activity WHERE pid = $1::int)",
                            1, pidp);
    cr_assert(gone, "the leader's backend did not exit within 5 s");
    cr_assert_eq(claim(claimer, "1", "0", pid, start, got, sizeof(got)), 0, "holder gone");
    char pid2[16], start2[64];
    PGconn *lead2 = leader(pid2, start2);
    cr_assert_eq(claim(claimer, "1", "0", pid, start, got, sizeof(got)), 0, "another holder");
    cr_assert_eq(claim(claimer, "1", "0", pid2, start2, got, sizeof(got)), 3);
    PQfinish(claimer);
    PQfinish(lead2);
}
