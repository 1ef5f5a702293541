#include "migrate.h"

#include "log.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* The bookkeeping table. Created (under the lock) before anything else, so that the first
 * migration can already be recorded in it; it lives in schema saga because everything does. */
static const char bootstrap_sql[] =
    "BEGIN;"
    "SET LOCAL client_min_messages = warning;" /* no "already exists, skipping" notices */
    "CREATE SCHEMA IF NOT EXISTS saga;"
    "CREATE TABLE IF NOT EXISTS saga.schema_migrations ("
    " version int PRIMARY KEY,"
    " name text NOT NULL,"
    " checksum text NOT NULL,"
    " applied_at timestamptz NOT NULL DEFAULT now());"
    "COMMIT;";

const struct migrate_options migrate_default_options = {
    .lock_timeout_ms = 3000,
    .max_attempts = 10,
    .backoff_ms = 200,
    .backoff_max_ms = 5000,
};

static void set_err(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void set_err(char *err, size_t errlen, const char *fmt, ...)
{
    if (!err || errlen == 0)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

/* 1-based line of a 1-based character position in text (PostgreSQL counts characters, not
 * bytes; UTF-8 continuation bytes are skipped). */
static int line_of_position(const char *text, long position)
{
    int line = 1;
    long chars = 0;
    for (const unsigned char *p = (const unsigned char *)text; *p; p++) {
        if ((*p & 0xC0) == 0x80)
            continue;
        if (++chars >= position)
            break;
        if (*p == '\n')
            line++;
    }
    return line;
}

/* The server's message for a failed result, without the "ERROR:  " prefix or the trailing
 * newline; falls back to the connection's message (connection lost, out of memory). When
 * sql is given and the server reported a position, appends the line within sql. */
static void describe_failure(PGconn *conn, const PGresult *res, const char *sql, char *buf,
                             size_t len)
{
    const char *primary = res ? PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY) : NULL;
    if (primary) {
        const char *pos = PQresultErrorField(res, PG_DIAG_STATEMENT_POSITION);
        const char *sqlstate = PQresultErrorField(res, PG_DIAG_SQLSTATE);
        if (sql && pos)
            snprintf(buf, len, "%s (line %d, SQLSTATE %s)", primary,
                     line_of_position(sql, strtol(pos, NULL, 10)), sqlstate ? sqlstate : "?");
        else
            snprintf(buf, len, "%s (SQLSTATE %s)", primary, sqlstate ? sqlstate : "?");
        return;
    }
    const char *msg = PQerrorMessage(conn);
    snprintf(buf, len, "%s", msg && *msg ? msg : "unknown error");
    size_t n = strlen(buf);
    while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == ' '))
        buf[--n] = '\0';
}

/* Runs sql (one or more statements); returns 0 when the last result is a success, else -1
 * with the server's message in msg. */
static int exec_simple(PGconn *conn, const char *sql, char *msg, size_t msglen)
{
    PGresult *res = PQexec(conn, sql);
    ExecStatusType st = res ? PQresultStatus(res) : PGRES_FATAL_ERROR;
    int rc = 0;
    if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK) {
        describe_failure(conn, res, NULL, msg, msglen);
        rc = -1;
    }
    PQclear(res);
    return rc;
}

/* Leaves the session as the runner found it: no open transaction, lock released. Errors
 * here are ignored: the original error is the one worth reporting, and a broken connection
 * drops the session lock anyway. */
static void finish_session(PGconn *conn, bool locked)
{
    if (PQtransactionStatus(conn) == PQTRANS_INTRANS ||
        PQtransactionStatus(conn) == PQTRANS_INERROR)
        PQclear(PQexec(conn, "ROLLBACK"));
    if (locked) {
        char sql[96];
        snprintf(sql, sizeof(sql), "SELECT pg_advisory_unlock(%" PRId64 ")",
                 (int64_t)MIGRATE_LOCK_KEY);
        PQclear(PQexec(conn, sql));
    }
}

void migrate_checksum(const char *sql, char out[17])
{
    uint64_t hash = UINT64_C(0xcbf29ce484222325);
    for (const unsigned char *p = (const unsigned char *)sql; *p; p++) {
        hash ^= *p;
        hash *= UINT64_C(0x100000001b3);
    }
    snprintf(out, 17, "%016" PRIx64, hash);
}

/* A failure that trying again can mend: the migration lost a race for a lock with the
 * services using the database (lock_not_available: its lock_timeout; deadlock_detected;
 * serialization_failure). */
static bool lock_failure(const PGresult *res)
{
    const char *state = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
    return state && (!strcmp(state, "55P03") || !strcmp(state, "40P01") || !strcmp(state, "40001"));
}

/* Applies one migration in its own transaction and records it. Returns 0, -1, or -2 when it
 * failed on a lock (lock_failure) and may be tried again; err says why. */
static int apply_one(PGconn *conn, const struct migration *m, const char *checksum,
                     int lock_timeout_ms, char *err, size_t errlen)
{
    char msg[1024];
    char begin[128] = "BEGIN; SET LOCAL client_min_messages = warning";
    if (lock_timeout_ms > 0) /* else the role's or database's own lock_timeout, if any */
        snprintf(begin + strlen(begin), sizeof(begin) - strlen(begin),
                 "; SET LOCAL lock_timeout = %d", lock_timeout_ms);
    if (exec_simple(conn, begin, msg, sizeof(msg))) {
        set_err(err, errlen, "migration %03d_%s: %s", m->version, m->name, msg);
        return -1;
    }

    PGresult *res = PQexec(conn, m->sql);
    ExecStatusType st = res ? PQresultStatus(res) : PGRES_FATAL_ERROR;
    if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK && st != PGRES_EMPTY_QUERY) {
        describe_failure(conn, res, m->sql, msg, sizeof(msg));
        /* Only a failure inside the migration's own transaction is tried again: when the file
         * committed part of itself (a COMMIT in it) that part would be applied twice. */
        bool in_transaction = PQtransactionStatus(conn) == PQTRANS_INERROR;
        bool retry = lock_failure(res) && in_transaction;
        PQclear(res);
        if (!in_transaction && PQstatus(conn) == CONNECTION_OK) {
            set_err(err, errlen,
                    "migration %03d_%s: %s; the file ends its transaction (COMMIT/ROLLBACK) "
                    "before that: migrations must not contain transaction control",
                    m->version, m->name, msg);
            return -1;
        }
        set_err(err, errlen, "migration %03d_%s: %s", m->version, m->name, msg);
        return retry ? -2 : -1;
    }
    PQclear(res);
    /* A COMMIT or ROLLBACK inside the file would break the all-or-nothing promise (and the
     * record would land in a transaction of its own): refuse such a file. */
    if (PQtransactionStatus(conn) != PQTRANS_INTRANS) {
        set_err(err, errlen,
                "migration %03d_%s: the file ends its transaction (COMMIT/ROLLBACK); "
                "migrations must not contain transaction control",
                m->version, m->name);
        return -1;
    }

    char version[16];
    snprintf(version, sizeof(version), "%d", m->version);
    const char *params[3] = {version, m->name, checksum};
    res = PQexecParams(conn,
                       "INSERT INTO saga.schema_migrations (version, name, checksum) "
                       "VALUES ($1::int, $2, $3)",
                       3, NULL, params, NULL, NULL, 0);
    st = res ? PQresultStatus(res) : PGRES_FATAL_ERROR;
    if (st != PGRES_COMMAND_OK) {
        describe_failure(conn, res, NULL, msg, sizeof(msg));
        PQclear(res);
        set_err(err, errlen, "migration %03d_%s: recording it failed: %s", m->version, m->name,
                msg);
        return -1;
    }
    PQclear(res);

    /* A COMMIT that fails (a serialization failure under default_transaction_isolation =
     * serializable, say) leaves nothing applied: tried again like a lock failure. */
    res = PQexec(conn, "COMMIT");
    st = res ? PQresultStatus(res) : PGRES_FATAL_ERROR;
    if (st != PGRES_COMMAND_OK) {
        describe_failure(conn, res, NULL, msg, sizeof(msg));
        bool retry = lock_failure(res);
        PQclear(res);
        set_err(err, errlen, "migration %03d_%s: %s", m->version, m->name, msg);
        return retry ? -2 : -1;
    }
    PQclear(res);
    /* COMMIT of a failed transaction "succeeds" as a ROLLBACK; that cannot happen here since
     * every statement above succeeded, but the status is cheap to check. */
    if (PQtransactionStatus(conn) != PQTRANS_IDLE) {
        set_err(err, errlen, "migration %03d_%s: the commit did not complete", m->version, m->name);
        return -1;
    }
    return 0;
}

/* The checksum recorded for version, or NULL when it is not recorded (res borrowed). */
static const char *recorded_checksum(const PGresult *res, int version)
{
    for (int row = 0; row < PQntuples(res); row++) {
        if (atoi(PQgetvalue(res, row, 0)) == version)
            return PQgetvalue(res, row, 1);
    }
    return NULL;
}

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) == -1)
        ;
}

/* apply_one, tried again after a lock failure (struct migrate_options). Between tries the
 * failed transaction is rolled back; the migration lock stays held. */
static int apply_with_retries(PGconn *conn, const struct migration *m, const char *checksum,
                              const struct migrate_options *o, char *err, size_t errlen)
{
    int wait = o->backoff_ms > 0 ? o->backoff_ms : 1;
    for (int attempt = 1;; attempt++) {
        int rc = apply_one(conn, m, checksum, o->lock_timeout_ms, err, errlen);
        if (rc != -2)
            return rc;
        if (PQtransactionStatus(conn) == PQTRANS_INTRANS ||
            PQtransactionStatus(conn) == PQTRANS_INERROR)
            PQclear(PQexec(conn, "ROLLBACK"));
        if (attempt >= o->max_attempts) {
            size_t n = strlen(err);
            if (n < errlen)
                snprintf(err + n, errlen - n,
                         " (gave up after %d attempts, each lock wait bounded by lock_timeout "
                         "%d ms: a transaction of the database's users holds a lock it needs; "
                         "pg_stat_activity and pg_locks show which)",
                         attempt, o->lock_timeout_ms);
            return -1;
        }
        if (o->on_retry) {
            char note[1200];
            snprintf(note, sizeof(note),
                     "%s; rolled back, trying again in %d ms (attempt %d of %d)", err, wait,
                     attempt + 1, o->max_attempts);
            o->on_retry(o->on_retry_arg, note);
        }
        sleep_ms(wait);
        wait = wait * 2 > o->backoff_max_ms ? o->backoff_max_ms : wait * 2;
    }
}

void migrate_log_retry(void *arg, const char *message)
{
    (void)arg;
    log_warn("%s", message);
}

int migrate_apply(PGconn *conn, const struct migration *list, size_t count, char *err,
                  size_t errlen)
{
    return migrate_apply_with(conn, list, count, NULL, err, errlen);
}

int migrate_apply_with(PGconn *conn, const struct migration *list, size_t count,
                       const struct migrate_options *options, char *err, size_t errlen)
{
    const struct migrate_options *o = options ? options : &migrate_default_options;
    char msg[1024];
    bool locked = false;
    PGresult *recorded = NULL;
    int applied = 0;
    int rc = -1;

    set_err(err, errlen, "%s", "");
    if (!conn || PQstatus(conn) != CONNECTION_OK) {
        set_err(err, errlen, "migrate: no database connection");
        return -1;
    }
    if (PQtransactionStatus(conn) != PQTRANS_IDLE) {
        set_err(err, errlen, "migrate: the connection is inside a transaction");
        return -1;
    }
    for (size_t i = 0; i < count; i++) {
        if (list[i].version < 1 || (i > 0 && list[i].version <= list[i - 1].version)) {
            set_err(err, errlen, "migrate: migration %03d_%s is out of order", list[i].version,
                    list[i].name);
            return -1;
        }
    }

    /* A session lock (not a transaction one) because each migration commits on its own. It
     * waits for another process that is migrating; that process's work is then seen below. */
    char lock_sql[96];
    snprintf(lock_sql, sizeof(lock_sql), "SELECT pg_advisory_lock(%" PRId64 ")",
             (int64_t)MIGRATE_LOCK_KEY);
    if (exec_simple(conn, lock_sql, msg, sizeof(msg))) {
        set_err(err, errlen, "migrate: taking the migration lock: %s", msg);
        goto cleanup;
    }
    locked = true;

    /* Only create what is missing: a least-privileged role (the orchestrator's) that may
     * not CREATE in the database must still be able to find the schema up to date. */
    PGresult *have = PQexec(conn, "SELECT to_regclass('saga.schema_migrations') IS NOT NULL");
    bool bootstrapped = have && PQresultStatus(have) == PGRES_TUPLES_OK && PQntuples(have) == 1 &&
                        !strcmp(PQgetvalue(have, 0, 0), "t");
    PQclear(have);
    if (!bootstrapped && exec_simple(conn, bootstrap_sql, msg, sizeof(msg))) {
        set_err(err, errlen, "migrate: creating saga.schema_migrations: %s", msg);
        goto cleanup;
    }

    recorded = PQexec(conn, "SELECT version, checksum FROM saga.schema_migrations");
    if (!recorded || PQresultStatus(recorded) != PGRES_TUPLES_OK) {
        describe_failure(conn, recorded, NULL, msg, sizeof(msg));
        set_err(err, errlen, "migrate: reading saga.schema_migrations: %s", msg);
        goto cleanup;
    }

    /* Check every recorded one first: a changed old migration means this binary and the
     * database disagree about the schema, so nothing newer should be applied on top. */
    for (size_t i = 0; i < count; i++) {
        char sum[17];
        migrate_checksum(list[i].sql, sum);
        const char *was = recorded_checksum(recorded, list[i].version);
        if (was && strcmp(was, sum) != 0) {
            set_err(err, errlen, "migration %03d_%s was changed after it was applied",
                    list[i].version, list[i].name);
            goto cleanup;
        }
    }
    /* Versions recorded that this list lacks were applied by a newer binary: fine. */
    for (size_t i = 0; i < count; i++) {
        if (recorded_checksum(recorded, list[i].version))
            continue;
        char sum[17];
        migrate_checksum(list[i].sql, sum);
        if (apply_with_retries(conn, &list[i], sum, o, err, errlen))
            goto cleanup;
        set_err(err, errlen, "%s", ""); /* a failed try's message, if any */
        applied++;
    }
    rc = applied;

cleanup:
    PQclear(recorded);
    finish_session(conn, locked);
    return rc;
}

int migrate_current_version(PGconn *conn, int *version, char *err, size_t errlen)
{
    char msg[1024];
    *version = 0;
    PGresult *res = PQexec(conn, "SELECT CASE WHEN to_regclass('saga.schema_migrations') IS NULL "
                                 "THEN NULL ELSE 1 END");
    if (!res || PQresultStatus(res) != PGRES_TUPLES_OK) {
        describe_failure(conn, res, NULL, msg, sizeof(msg));
        PQclear(res);
        set_err(err, errlen, "migrate: %s", msg);
        return -1;
    }
    bool exists = !PQgetisnull(res, 0, 0);
    PQclear(res);
    if (!exists)
        return 0;
    res = PQexec(conn, "SELECT coalesce(max(version), 0) FROM saga.schema_migrations");
    if (!res || PQresultStatus(res) != PGRES_TUPLES_OK) {
        describe_failure(conn, res, NULL, msg, sizeof(msg));
        PQclear(res);
        set_err(err, errlen, "migrate: reading saga.schema_migrations: %s", msg);
        return -1;
    }
    *version = atoi(PQgetvalue(res, 0, 0));
    PQclear(res);
    return 0;
}
