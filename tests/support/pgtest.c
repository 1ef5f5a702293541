#include "pgtest.h"

#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <criterion/criterion.h>

#include "migrate.h"

static void notice_ignore_cb(void *arg, const char *message)
{
    (void)arg;
    (void)message;
}

const char *pgtest_server_url(void)
{
    const char *url = getenv("SAGA_TEST_PGURL");
    if (!url || !*url)
        cr_assert_fail(
            "SAGA_TEST_PGURL is not set: run through tests/with-postgres or scripts/test");
    return url;
}

static bool is_uri(const char *url)
{
    return !strncmp(url, "postgresql://", 13) || !strncmp(url, "postgres://", 11);
}

void pgtest_url_for(const char *url, const char *dbname, char *out, size_t len)
{
    int n;
    if (is_uri(url)) {
        /* postgresql://[userinfo@]host[:port][/dbname][?params]: replace the path. */
        const char *authority = strstr(url, "://") + 3;
        size_t auth_len = strcspn(authority, "/?");
        const char *rest = authority + auth_len;
        const char *query = strchr(rest, '?');
        n = snprintf(out, len, "%.*s/%s%s", (int)(authority - url + auth_len), url, dbname,
                     query ? query : "");
    } else {
        char *errmsg = NULL;
        PQconninfoOption *opts = PQconninfoParse(url, &errmsg);
        if (!opts)
            cr_assert_fail("SAGA_TEST_PGURL cannot be parsed: %s",
                           errmsg ? errmsg : "out of memory");
        size_t used = 0;
        out[0] = '\0';
        for (PQconninfoOption *o = opts; o->keyword; o++) {
            if (!o->val || !strcmp(o->keyword, "dbname"))
                continue;
            /* Values are quoted, with ' and \ escaped, as conninfo strings want. */
            int w = snprintf(out + used, len - used, "%s='", o->keyword);
            if (w < 0 || (size_t)w >= len - used)
                cr_assert_fail("pgtest_url_for: connection string too long");
            used += (size_t)w;
            for (const char *c = o->val; *c; c++) {
                if (used + 3 >= len)
                    cr_assert_fail("pgtest_url_for: connection string too long");
                if (*c == '\'' || *c == '\\')
                    out[used++] = '\\';
                out[used++] = *c;
            }
            out[used++] = '\'';
            out[used++] = ' ';
            out[used] = '\0';
        }
        PQconninfoFree(opts);
        n = snprintf(out + used, len - used, "dbname=%s", dbname);
        if (n >= 0)
            n += (int)used;
    }
    if (n < 0 || (size_t)n >= len)
        cr_assert_fail("pgtest_url_for: connection string too long");
}

PGconn *pgtest_connect(const char *url)
{
    PGconn *conn = PQconnectdb(url);
    if (!conn)
        cr_assert_fail("pgtest_connect: out of memory");
    if (PQstatus(conn) != CONNECTION_OK) {
        char msg[512];
        snprintf(msg, sizeof(msg), "%s", PQerrorMessage(conn));
        PQfinish(conn);
        cr_assert_fail("cannot connect to the test database: %s", msg);
    }
    PQsetNoticeProcessor(conn, notice_ignore_cb, NULL);
    return conn;
}

void pgtest_db_create(struct pgtest_db *db)
{
    static unsigned counter;
    const char *server = pgtest_server_url();
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    /* pid: unique among the parallel test processes; counter: within one; the clock: across
     * runs against a cluster that outlives them (scripts/test). */
    snprintf(db->name, sizeof(db->name), "saga_test_%ld_%u_%lx", (long)getpid(), counter++,
             (unsigned long)((uint64_t)ts.tv_nsec ^ ((uint64_t)ts.tv_sec << 20)) & 0xffffffffUL);
    pgtest_url_for(server, db->name, db->url, sizeof(db->url));

    PGconn *admin = pgtest_connect(server);
    char sql[160];
    snprintf(sql, sizeof(sql), "CREATE DATABASE %s", db->name);
    pgtest_exec(admin, sql);
    PQfinish(admin);
}

PGconn *pgtest_fresh(struct pgtest_db *db, bool migrated)
{
    pgtest_db_create(db);
    PGconn *conn = pgtest_connect(db->url);
    if (migrated) {
        char err[1024];
        int n = migrate_apply(conn, migrations_builtin, migrations_builtin_count, err, sizeof(err));
        if (n < 0)
            cr_assert_fail("migrating the test database failed: %s", err);
    }
    return conn;
}

void pgtest_db_drop(const struct pgtest_db *db)
{
    const char *url = getenv("SAGA_TEST_PGURL");
    if (!url || !*url || !db->name[0])
        return;
    PGconn *admin = PQconnectdb(url);
    if (admin && PQstatus(admin) == CONNECTION_OK) {
        char sql[160];
        snprintf(sql, sizeof(sql), "DROP DATABASE IF EXISTS %s WITH (FORCE)", db->name);
        PQclear(PQexec(admin, sql));
    }
    PQfinish(admin);
}

static bool result_ok(const PGresult *res)
{
    ExecStatusType st = res ? PQresultStatus(res) : PGRES_FATAL_ERROR;
    return st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK;
}

static void fail_with(PGconn *conn, PGresult *res, const char *sql)
{
    char msg[1024];
    snprintf(msg, sizeof(msg), "%s", res ? PQresultErrorMessage(res) : PQerrorMessage(conn));
    PQclear(res);
    cr_assert_fail("SQL failed: %s\n  in: %s", msg, sql);
}

void pgtest_exec(PGconn *conn, const char *sql)
{
    PGresult *res = PQexec(conn, sql);
    if (!result_ok(res))
        fail_with(conn, res, sql);
    PQclear(res);
}

PGresult *pgtest_query(PGconn *conn, const char *sql, int nparams, const char *const *params)
{
    PGresult *res = PQexecParams(conn, sql, nparams, NULL, params, NULL, NULL, 0);
    if (!result_ok(res))
        fail_with(conn, res, sql);
    return res;
}

char *pgtest_value(PGconn *conn, const char *sql, int nparams, const char *const *params)
{
    PGresult *res = pgtest_query(conn, sql, nparams, params);
    if (PQntuples(res) != 1 || PQnfields(res) < 1) {
        int rows = PQntuples(res);
        PQclear(res);
        cr_assert_fail("expected one row, got %d\n  in: %s", rows, sql);
    }
    char *value = NULL;
    if (!PQgetisnull(res, 0, 0)) {
        value = strdup(PQgetvalue(res, 0, 0));
        if (!value)
            cr_assert_fail("pgtest_value: out of memory");
    }
    PQclear(res);
    return value;
}

long pgtest_count(PGconn *conn, const char *sql, int nparams, const char *const *params)
{
    char *value = pgtest_value(conn, sql, nparams, params);
    if (!value)
        cr_assert_fail("expected a number, got NULL\n  in: %s", sql);
    long n = strtol(value, NULL, 10);
    free(value);
    return n;
}

void pgtest_expect_error(PGconn *conn, const char *sql, int nparams, const char *const *params,
                         char sqlstate[6], char *msg, size_t msglen)
{
    PGresult *res = PQexecParams(conn, sql, nparams, NULL, params, NULL, NULL, 0);
    if (result_ok(res)) {
        PQclear(res);
        cr_assert_fail("expected an error, but it succeeded\n  in: %s", sql);
    }
    const char *state = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
    const char *primary = res ? PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY) : NULL;
    if (sqlstate)
        snprintf(sqlstate, 6, "%s", state ? state : "");
    if (msg && msglen)
        snprintf(msg, msglen, "%s", primary ? primary : PQerrorMessage(conn));
    PQclear(res);
}

PGnotify *pgtest_poll_notify(PGconn *conn)
{
    PGnotify *note = PQnotifies(conn);
    if (note)
        return note;
    pgtest_exec(conn, "SELECT 1");
    return PQnotifies(conn);
}

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

void pgtest_wait_blocked(PGconn *observer, const char *pid, int timeout_ms)
{
    /* A client-side loop: pg_stat_activity is read once per transaction by the server, so a
     * poll inside one statement would not see the change. */
    const char *params[] = {pid};
    int64_t until = now_ms() + timeout_ms;
    while (pgtest_count(observer,
                        "SELECT count(*) FROM pg_stat_activity"
                        " WHERE pid = $1::int AND wait_event_type = 'Lock'",
                        1, params) != 1) {
        cr_assert(now_ms() < until, "backend %s never waited for a lock (%d ms)", pid, timeout_ms);
        struct timespec pause = {0, 2 * 1000000L};
        nanosleep(&pause, NULL);
    }
}

PGnotify *pgtest_wait_notify(PGconn *conn, int timeout_ms)
{
    int64_t until = now_ms() + timeout_ms;
    for (;;) {
        if (!PQconsumeInput(conn))
            cr_assert_fail("waiting for a notification: %s", PQerrorMessage(conn));
        PGnotify *note = PQnotifies(conn);
        if (note)
            return note;
        int64_t left = until - now_ms();
        if (left <= 0)
            return NULL;
        struct pollfd pfd = {.fd = PQsocket(conn), .events = POLLIN};
        int rc = poll(&pfd, 1, (int)left);
        if (rc < 0 && errno != EINTR)
            cr_assert_fail("poll: %s", strerror(errno));
    }
}
