/* pgtest: helpers for Criterion tests that need a real PostgreSQL (see tests/with-postgres).
 *
 * Every test gets its own freshly created database on the cluster named by SAGA_TEST_PGURL,
 * because Criterion runs tests in parallel processes. Helpers that can fail fail the current
 * test with the server's message (cr_fatal), so tests read as straight-line code. */
#ifndef SAGA_PGTEST_H
#define SAGA_PGTEST_H

#include <stdbool.h>
#include <stddef.h>

#include <libpq-fe.h>

/* A database created for one test. */
struct pgtest_db {
    char name[64];  /* saga_test_<pid>_<n>_<random> */
    char url[1024]; /* connection string for it: a URI or a conninfo string, as libpq takes */
};

/* SAGA_TEST_PGURL (the cluster's maintenance database); fails the test when it is unset
 * ("run through tests/with-postgres or scripts/test"). The string is the environment's. */
const char *pgtest_server_url(void);

/* Writes into out (size len) the connection string of url with its database replaced by
 * dbname. url may be a postgresql:// URI (its path is replaced) or a key=value conninfo
 * string. Fails the test when the result does not fit or url cannot be parsed. */
void pgtest_url_for(const char *url, const char *dbname, char *out, size_t len);

/* Connects to url; fails the test with libpq's message on error. Notices are silenced. The
 * caller owns the connection (PQfinish). */
PGconn *pgtest_connect(const char *url);

/* Creates a new empty database with a unique name and fills *db. */
void pgtest_db_create(struct pgtest_db *db);

/* Creates a new database (as pgtest_db_create), applies the built-in migrations when
 * migrated is true, and returns a connection to it (caller's, PQfinish). */
PGconn *pgtest_fresh(struct pgtest_db *db, bool migrated);

/* Drops the database, disconnecting whoever is still connected (WITH (FORCE)). Best effort:
 * the whole cluster is thrown away at the end anyway. */
void pgtest_db_drop(const struct pgtest_db *db);

/* Runs sql (one or more statements, no parameters) and fails the test unless it succeeds. */
void pgtest_exec(PGconn *conn, const char *sql);

/* Runs sql with nparams text parameters ($1..; NULL entries are SQL NULL) and fails the test
 * unless it succeeds. Returns the result (caller's, PQclear). */
PGresult *pgtest_query(PGconn *conn, const char *sql, int nparams, const char *const *params);

/* Runs a one-row, one-column query and returns the value as a new string (caller frees), or
 * NULL for SQL NULL. Fails the test unless there is exactly one row. */
char *pgtest_value(PGconn *conn, const char *sql, int nparams, const char *const *params);

/* The value of a one-row, one-column query as a long (for counts). */
long pgtest_count(PGconn *conn, const char *sql, int nparams, const char *const *params);

/* Runs sql expecting it to fail: fails the test if it succeeds. Copies the SQLSTATE into
 * sqlstate (6 bytes) and the primary message into msg (size msglen); either may be NULL. */
void pgtest_expect_error(PGconn *conn, const char *sql, int nparams, const char *const *params,
                         char sqlstate[6], char *msg, size_t msglen);

/* Waits (at most timeout_ms, polling the socket, no sleeps) for a notification on conn,
 * which must LISTEN already. Returns it (caller's, PQfreemem) or NULL on timeout. */
PGnotify *pgtest_wait_notify(PGconn *conn, int timeout_ms);

/* Waits (at most timeout_ms, polling pg_stat_activity on observer every 2 ms from the client)
 * until the backend pid (text, as pg_backend_pid() gives it) waits for a lock; fails the test
 * on timeout. */
void pgtest_wait_blocked(PGconn *observer, const char *pid, int timeout_ms);

/* Returns an already received notification without waiting (after one round trip to the
 * server, so that whatever the server had sent is read), or NULL. Caller's, PQfreemem. */
PGnotify *pgtest_poll_notify(PGconn *conn);

#endif
