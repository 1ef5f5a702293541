/* The migration runner (lib/migrate.c) against a real PostgreSQL. */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <criterion/criterion.h>

#include "migrate.h"
#include "pgtest.h"

static struct pgtest_db db;
static PGconn *conn;

static void setup(void)
{
    conn = pgtest_fresh(&db, false);
}

static void teardown(void)
{
    PQfinish(conn);
    pgtest_db_drop(&db);
}

TestSuite(migrate, .init = setup, .fini = teardown, .timeout = 120);

static int last_version(void)
{
    return migrations_builtin[migrations_builtin_count - 1].version;
}

/* Is the migration lock free? Asked from another session: a lock held by conn itself would
 * be granted to conn again (advisory locks are reentrant). */
static bool lock_is_free(void)
{
    PGconn *other = pgtest_connect(db.url);
    char key[32];
    snprintf(key, sizeof(key), "%lld", (long long)MIGRATE_LOCK_KEY);
    const char *params[] = {key};
    char *got = pgtest_value(other, "SELECT pg_try_advisory_lock($1::bigint)", 1, params);
    bool free_ = got && !strcmp(got, "t");
    if (free_)
        pgtest_exec(other, "SELECT pg_advisory_unlock_all()");
    free(got);
    PQfinish(other);
    return free_;
}

Test(migrate, builtin_list_is_ordered_and_named)
{
    cr_assert_gt(migrations_builtin_count, 0);
    cr_assert_eq(migrations_builtin[0].version, 1);
    cr_assert_str_eq(migrations_builtin[0].name, "schema");
    for (size_t i = 1; i < migrations_builtin_count; i++)
        cr_assert_gt(migrations_builtin[i].version, migrations_builtin[i - 1].version);
}

Test(migrate, checksum_is_fnv1a_64_hex)
{
    char sum[17];
    migrate_checksum("", sum);
    cr_assert_str_eq(sum, "cbf29ce484222325");
    migrate_checksum("a", sum);
    cr_assert_str_eq(sum, "af63dc4c8601ec8c");
}

Test(migrate, fresh_database_gets_everything_then_nothing)
{
    char err[1024];
    int version = -1;
    cr_assert_eq(migrate_current_version(conn, &version, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(version, 0);

    int n = migrate_apply(conn, migrations_builtin, migrations_builtin_count, err, sizeof(err));
    cr_assert_eq(n, (int)migrations_builtin_count, "%s", err);
    cr_assert_eq(PQtransactionStatus(conn), PQTRANS_IDLE);
    cr_assert(lock_is_free(), "the migration lock is still held after success");

    cr_assert_eq(pgtest_count(conn, "SELECT count(*) FROM saga.schema_migrations", 0, NULL),
                 (long)migrations_builtin_count);
    for (size_t i = 0; i < migrations_builtin_count; i++) {
        char sum[17], version_text[16];
        migrate_checksum(migrations_builtin[i].sql, sum);
        snprintf(version_text, sizeof(version_text), "%d", migrations_builtin[i].version);
        const char *params[] = {version_text};
        char *got = pgtest_value(
            conn, "SELECT checksum || ' ' || name FROM saga.schema_migrations WHERE version = $1",
            1, params);
        char want[128];
        snprintf(want, sizeof(want), "%s %s", sum, migrations_builtin[i].name);
        cr_assert_str_eq(got, want);
        free(got);
    }
    /* The schema is there, outbox included. */
    cr_assert_eq(pgtest_count(conn,
                              "SELECT count(*) FROM pg_tables WHERE schemaname = 'saga' AND "
                              "tablename IN ('definitions', 'instances', 'step_history', 'inbox', "
                              "'dead_letters', 'outbox', 'outbox_dead_letters')",
                              0, NULL),
                 7);
    cr_assert_eq(migrate_current_version(conn, &version, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(version, last_version());

    n = migrate_apply(conn, migrations_builtin, migrations_builtin_count, err, sizeof(err));
    cr_assert_eq(n, 0, "%s", err);
    cr_assert_eq(pgtest_count(conn, "SELECT count(*) FROM saga.schema_migrations", 0, NULL),
                 (long)migrations_builtin_count);
}

struct racer {
    const char *url;
    pthread_barrier_t *start;
    int applied;
    char err[1024];
};

static void quiet_cb(void *arg, const char *message)
{
    (void)arg;
    (void)message;
}

static void *racer_run(void *arg)
{
    struct racer *r = arg;
    PGconn *c = PQconnectdb(r->url);
    /* Everyone connects first, then all migrate at once. */
    pthread_barrier_wait(r->start);
    if (PQstatus(c) != CONNECTION_OK) {
        snprintf(r->err, sizeof(r->err), "connect: %s", PQerrorMessage(c));
        r->applied = -1;
    } else {
        PQsetNoticeProcessor(c, quiet_cb, NULL);
        r->applied =
            migrate_apply(c, migrations_builtin, migrations_builtin_count, r->err, sizeof(r->err));
    }
    PQfinish(c);
    return NULL;
}

Test(migrate, eight_processes_at_once_apply_each_migration_once)
{
    enum { N = 8 };
    struct racer racers[N];
    pthread_t threads[N];
    pthread_barrier_t start;
    cr_assert_eq(pthread_barrier_init(&start, NULL, N), 0);
    for (int i = 0; i < N; i++) {
        racers[i] = (struct racer){.url = db.url, .start = &start};
        cr_assert_eq(pthread_create(&threads[i], NULL, racer_run, &racers[i]), 0);
    }
    int total = 0;
    for (int i = 0; i < N; i++) {
        pthread_join(threads[i], NULL);
    }
    pthread_barrier_destroy(&start);
    for (int i = 0; i < N; i++) {
        cr_expect_geq(racers[i].applied, 0, "racer %d: %s", i, racers[i].err);
        if (racers[i].applied > 0)
            total += racers[i].applied;
    }
    /* Exactly one of them applied each migration; the others found it recorded. */
    cr_assert_eq(total, (int)migrations_builtin_count);
    cr_assert_eq(pgtest_count(conn,
                              "SELECT count(*) FROM (SELECT version FROM saga.schema_migrations "
                              "GROUP BY version HAVING count(*) = 1) v",
                              0, NULL),
                 (long)migrations_builtin_count);
    cr_assert(lock_is_free());
}

Test(migrate, changed_migration_is_detected)
{
    char err[1024];
    cr_assert_geq(
        migrate_apply(conn, migrations_builtin, migrations_builtin_count, err, sizeof(err)), 0,
        "%s", err);

    struct migration changed[64];
    cr_assert_leq(migrations_builtin_count, 64);
    memcpy(changed, migrations_builtin, migrations_builtin_count * sizeof(changed[0]));
    size_t len = strlen(migrations_builtin[0].sql);
    char *text = malloc(len + 32);
    cr_assert_not_null(text);
    snprintf(text, len + 32, "%s\n-- edited\n", migrations_builtin[0].sql);
    changed[0].sql = text;
    /* A new migration after it must not be applied on top of a disagreeing schema. */
    changed[migrations_builtin_count] =
        (struct migration){900, "after_change", "CREATE TABLE saga.after_change (x int);"};

    int n = migrate_apply(conn, changed, migrations_builtin_count + 1, err, sizeof(err));
    cr_assert_eq(n, -1);
    cr_assert_str_eq(err, "migration 001_schema was changed after it was applied");
    cr_assert_eq(pgtest_count(conn,
                              "SELECT count(*) FROM pg_tables WHERE tablename = 'after_change'", 0,
                              NULL),
                 0);
    cr_assert(lock_is_free(), "the lock is still held after the checksum error");
    free(text);
}

Test(migrate, failing_migration_rolls_back_and_releases_the_lock)
{
    char err[1024];
    struct migration list[66];
    memcpy(list, migrations_builtin, migrations_builtin_count * sizeof(list[0]));
    size_t count = migrations_builtin_count;
    list[count++] = (struct migration){901, "broken",
                                       "CREATE TABLE saga.half_done (x int);\n"
                                       "INSERT INTO saga.half_done VALUES (1);\n"
                                       "SELECT 1 / 0;\n"};

    int n = migrate_apply(conn, list, count, err, sizeof(err));
    cr_assert_eq(n, -1);
    cr_assert(!strncmp(err, "migration 901_broken: division by zero", 38), "got: %s", err);
    cr_assert_eq(PQtransactionStatus(conn), PQTRANS_IDLE);
    cr_assert(lock_is_free(), "the lock is still held after a failed migration");

    /* The migrations before it committed; the broken one left nothing. */
    cr_assert_eq(pgtest_count(conn, "SELECT count(*) FROM saga.schema_migrations", 0, NULL),
                 (long)migrations_builtin_count);
    cr_assert_eq(
        pgtest_count(conn, "SELECT count(*) FROM pg_tables WHERE tablename = 'half_done'", 0, NULL),
        0);

    /* A syntax error names its line. */
    list[count - 1] = (struct migration){901, "broken", "SELECT 1;\n\nSELEC 2;\n"};
    n = migrate_apply(conn, list, count, err, sizeof(err));
    cr_assert_eq(n, -1);
    cr_assert(strstr(err, "migration 901_broken: syntax error") == err, "got: %s", err);
    cr_assert(strstr(err, "line 3"), "got: %s", err);

    /* Fixed, a later run applies it; the lock was free for it. */
    list[count - 1] = (struct migration){901, "fixed", "CREATE TABLE saga.half_done (x int);"};
    n = migrate_apply(conn, list, count, err, sizeof(err));
    cr_assert_eq(n, 1, "%s", err);
    cr_assert_eq(pgtest_count(conn, "SELECT count(*) FROM saga.half_done", 0, NULL), 0);
}

Test(migrate, transaction_control_in_a_migration_is_refused)
{
    char err[1024];
    struct migration list[66];
    memcpy(list, migrations_builtin, migrations_builtin_count * sizeof(list[0]));
    size_t count = migrations_builtin_count;
    list[count++] = (struct migration){902, "commits", "SELECT 1; COMMIT;"};
    int n = migrate_apply(conn, list, count, err, sizeof(err));
    cr_assert_eq(n, -1);
    cr_assert(strstr(err, "migration 902_commits: ") == err, "got: %s", err);
    cr_assert(strstr(err, "transaction control"), "got: %s", err);
    cr_assert_eq(pgtest_count(conn,
                              "SELECT count(*) FROM saga.schema_migrations WHERE version = 902", 0,
                              NULL),
                 0);
    cr_assert(lock_is_free());
}

Test(migrate, versions_from_a_newer_binary_are_fine)
{
    char err[1024];
    struct migration list[66];
    memcpy(list, migrations_builtin, migrations_builtin_count * sizeof(list[0]));
    size_t count = migrations_builtin_count;
    list[count++] = (struct migration){950, "from_the_future", "SELECT 1;"};
    cr_assert_eq(migrate_apply(conn, list, count, err, sizeof(err)), (int)count, "%s", err);

    /* An older binary knows only the built-in ones: nothing to do, no error. */
    cr_assert_eq(
        migrate_apply(conn, migrations_builtin, migrations_builtin_count, err, sizeof(err)), 0,
        "%s", err);
    int version = 0;
    cr_assert_eq(migrate_current_version(conn, &version, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(version, 950);
}

Test(migrate, out_of_order_list_is_refused)
{
    char err[1024];
    struct migration list[] = {{2, "b", "SELECT 1;"}, {1, "a", "SELECT 1;"}};
    cr_assert_eq(migrate_apply(conn, list, 2, err, sizeof(err)), -1);
    cr_assert(strstr(err, "out of order"), "got: %s", err);
}

Test(migrate, refuses_a_connection_inside_a_transaction)
{
    char err[1024];
    pgtest_exec(conn, "BEGIN");
    cr_assert_eq(
        migrate_apply(conn, migrations_builtin, migrations_builtin_count, err, sizeof(err)), -1);
    cr_assert(strstr(err, "inside a transaction"), "got: %s", err);
    pgtest_exec(conn, "ROLLBACK");
}

/* ---- Locks: a migration waits for them at most lock_timeout, and tries again ---- */

/* A migration run in a thread on its own connection (its backend pid published first), with
 * the options of the test; each retry is counted and its message kept. */
struct locked_run {
    const char *url;
    const struct migration *list;
    size_t count;
    struct migrate_options options;
    const char *session_sql; /* run on the connection before migrating (NULL: none) */
    _Atomic int pid;
    _Atomic int retries;
    char first_retry[1400];
    int applied;
    char err[1400];
};

static void count_retry(void *arg, const char *message)
{
    struct locked_run *r = arg;
    /* The first retry's message only: the test reads it once the count is 1 or more. */
    if (atomic_load(&r->retries) == 0)
        snprintf(r->first_retry, sizeof(r->first_retry), "%s", message);
    atomic_fetch_add(&r->retries, 1);
}

static void *locked_run_main(void *arg)
{
    struct locked_run *r = arg;
    PGconn *c = PQconnectdb(r->url);
    r->applied = -1;
    if (PQstatus(c) != CONNECTION_OK) {
        snprintf(r->err, sizeof(r->err), "connect: %s", PQerrorMessage(c));
        atomic_store(&r->pid, -1);
    } else {
        PQsetNoticeProcessor(c, quiet_cb, NULL);
        if (r->session_sql)
            PQclear(PQexec(c, r->session_sql));
        r->options.on_retry = count_retry;
        r->options.on_retry_arg = r;
        atomic_store(&r->pid, PQbackendPID(c));
        r->applied = migrate_apply_with(c, r->list, r->count, &r->options, r->err, sizeof(r->err));
    }
    PQfinish(c);
    return NULL;
}

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* Waits up to timeout_ms for count_sql (with the backend pid as $1) to count something. */
static bool wait_for_count(PGconn *c, const char *count_sql, int pid, int timeout_ms)
{
    char pid_text[16];
    snprintf(pid_text, sizeof(pid_text), "%d", pid);
    const char *params[] = {pid_text};
    for (int waited = 0; waited <= timeout_ms; waited += 10) {
        if (pgtest_count(c, count_sql, 1, params) > 0)
            return true;
        sleep_ms(10);
    }
    return false;
}

static bool wait_for_retries(struct locked_run *r, int n, int timeout_ms)
{
    for (int waited = 0; waited <= timeout_ms; waited += 10) {
        if (atomic_load(&r->retries) >= n)
            return true;
        sleep_ms(10);
    }
    return false;
}

/* conn migrated with the built-in migrations, and list filled with them plus extra: returns
 * the count. */
static size_t migrated_plus(struct migration list[66], struct migration extra)
{
    char err[1024];
    cr_assert_geq(
        migrate_apply(conn, migrations_builtin, migrations_builtin_count, err, sizeof(err)), 0,
        "%s", err);
    memcpy(list, migrations_builtin, migrations_builtin_count * sizeof(list[0]));
    list[migrations_builtin_count] = extra;
    return migrations_builtin_count + 1;
}

static const char waiting_sql[] =
    "SELECT count(*) FROM pg_locks WHERE pid = $1::int AND NOT granted";

Test(migrate, a_migration_queued_behind_a_long_transaction_lets_writers_through_then_retries)
{
    pgtest_exec(conn, "CREATE TABLE public.busy (x int)");
    struct migration list[66];
    size_t count = migrated_plus(
        list, (struct migration){901, "alter_busy", "ALTER TABLE public.busy ADD y int;"});

    /* A long transaction (a report, say) reads the table: its lock conflicts with ALTER's. */
    PGconn *reader = pgtest_connect(db.url);
    pgtest_exec(reader, "BEGIN");
    pgtest_exec(reader, "SELECT count(*) FROM public.busy");

    struct locked_run *run = calloc(1, sizeof(*run));
    cr_assert(run);
    *run = (struct locked_run){.url = db.url, .list = list, .count = count};
    run->options = (struct migrate_options){
        .lock_timeout_ms = 300, .max_attempts = 100, .backoff_ms = 50, .backoff_max_ms = 200};
    pthread_t thread;
    cr_assert_eq(pthread_create(&thread, NULL, locked_run_main, run), 0);

    /* Its first try gives up the wait after lock_timeout, rolls back, and says so. */
    cr_assert(wait_for_retries(run, 1, 20000), "no retry within 20 s: %s", run->err);
    cr_assert(strstr(run->first_retry, "migration 901_alter_busy: canceling statement due to "
                                       "lock timeout"),
              "got: %s", run->first_retry);
    cr_assert(strstr(run->first_retry, "SQLSTATE 55P03"), "got: %s", run->first_retry);
    cr_assert(strstr(run->first_retry, "attempt 2 of 100"), "got: %s", run->first_retry);

    /* A writer of the table, queued behind the migration's lock request while it waits, gets
     * through when that wait ends, while the long transaction is still open. Without the
     * bound it would wait for the reader (here: until its statement_timeout). */
    PGconn *writer = pgtest_connect(db.url);
    pgtest_exec(writer, "SET statement_timeout = '20s'");
    cr_assert(wait_for_count(conn, waiting_sql, atomic_load(&run->pid), 10000),
              "the migration is not waiting for its lock again");
    pgtest_exec(writer, "INSERT INTO public.busy (x) VALUES (1)");
    PQfinish(writer);

    /* The reader ends: a later try takes the lock and the migration is applied once. */
    pgtest_exec(reader, "COMMIT");
    PQfinish(reader);
    pthread_join(thread, NULL);
    cr_assert_eq(run->applied, 1, "%s", run->err);
    cr_assert_eq(pgtest_count(conn,
                              "SELECT count(*) FROM information_schema.columns WHERE "
                              "table_name = 'busy' AND column_name = 'y'",
                              0, NULL),
                 1);
    cr_assert_eq(pgtest_count(conn,
                              "SELECT count(*) FROM saga.schema_migrations WHERE version = 901", 0,
                              NULL),
                 1);
    cr_assert_eq(pgtest_count(conn, "SELECT count(*) FROM public.busy", 0, NULL), 1);
    cr_assert(lock_is_free());
    free(run);
}

Test(migrate, a_migration_that_deadlocks_with_a_service_is_tried_again)
{
    pgtest_exec(conn, "CREATE TABLE public.first (x int); CREATE TABLE public.second (x int)");
    struct migration list[66];
    size_t count = migrated_plus(
        list,
        (struct migration){902, "two_locks", "LOCK TABLE public.first; LOCK TABLE public.second;"});

    /* A service's transaction holds second and will want first: the order 008 could meet. */
    PGconn *service = pgtest_connect(db.url);
    pgtest_exec(service, "SET deadlock_timeout = '60s'");
    pgtest_exec(service, "BEGIN");
    pgtest_exec(service, "LOCK TABLE public.second");

    struct locked_run *run = calloc(1, sizeof(*run));
    cr_assert(run);
    *run = (struct locked_run){
        .url = db.url, .list = list, .count = count, .session_sql = "SET deadlock_timeout = '2s'"};
    run->options = (struct migrate_options){
        .lock_timeout_ms = 30000, .max_attempts = 3, .backoff_ms = 50, .backoff_max_ms = 50};
    pthread_t thread;
    cr_assert_eq(pthread_create(&thread, NULL, locked_run_main, run), 0);
    for (int i = 0; i < 1000 && atomic_load(&run->pid) == 0; i++)
        sleep_ms(10);
    int mpid = atomic_load(&run->pid);
    cr_assert_gt(mpid, 0, "%s", run->err);
    cr_assert(wait_for_count(conn, waiting_sql, mpid, 10000), "the migration does not wait");

    /* The cycle: the service now waits for first, which the migration holds. The migration,
     * waiting longer and with the shorter deadlock_timeout, finds the deadlock and is the one
     * rolled back; the service gets its lock. */
    cr_assert(PQsendQuery(service, "LOCK TABLE public.first"));
    int spid = PQbackendPID(service);
    cr_assert(wait_for_count(conn, waiting_sql, spid, 10000), "the service does not wait");
    char pids[2][16];
    snprintf(pids[0], sizeof(pids[0]), "%d", mpid);
    snprintf(pids[1], sizeof(pids[1]), "%d", spid);
    const char *params[] = {pids[0], pids[1]};
    if (pgtest_count(conn,
                     "SELECT count(*) FROM pg_locks m, pg_locks s WHERE m.pid = $1::int AND "
                     "NOT m.granted AND s.pid = $2::int AND NOT s.granted AND "
                     "coalesce(s.waitstart, now()) - m.waitstart >= interval '1.8 s'",
                     2, params) > 0)
        cr_skip_test("the service started waiting too late for the migration to be the victim");
    PGresult *res;
    bool service_ok = true;
    while ((res = PQgetResult(service))) {
        if (PQresultStatus(res) != PGRES_COMMAND_OK)
            service_ok = false;
        PQclear(res);
    }
    cr_assert(service_ok, "the service was the one rolled back: %s", PQerrorMessage(service));
    /* (The server released the migration's locks before its client heard of the error.) */
    cr_assert(wait_for_retries(run, 1, 10000), "the migration did not retry: %s", run->err);
    cr_assert(strstr(run->first_retry, "migration 902_two_locks: deadlock detected"), "got: %s",
              run->first_retry);
    cr_assert(strstr(run->first_retry, "SQLSTATE 40P01"), "got: %s", run->first_retry);
    pgtest_exec(service, "COMMIT");
    PQfinish(service);

    pthread_join(thread, NULL);
    cr_assert_eq(run->applied, 1, "%s", run->err);
    cr_assert_eq(atomic_load(&run->retries), 1);
    cr_assert_eq(pgtest_count(conn,
                              "SELECT count(*) FROM saga.schema_migrations WHERE version = 902", 0,
                              NULL),
                 1);
    cr_assert(lock_is_free());
    free(run);
}

Test(migrate, a_migration_that_keeps_failing_on_a_lock_gives_up_and_says_why)
{
    char err[1400];
    pgtest_exec(conn, "CREATE TABLE public.held (x int)");
    struct migration list[66];
    size_t count =
        migrated_plus(list, (struct migration){903, "lock_held", "LOCK TABLE public.held;"});
    PGconn *holder = pgtest_connect(db.url);
    pgtest_exec(holder, "BEGIN");
    pgtest_exec(holder, "LOCK TABLE public.held IN ACCESS SHARE MODE");

    struct migrate_options o = {
        .lock_timeout_ms = 50, .max_attempts = 3, .backoff_ms = 10, .backoff_max_ms = 10};
    cr_assert_eq(migrate_apply_with(conn, list, count, &o, err, sizeof(err)), -1);
    cr_assert(strstr(err, "migration 903_lock_held: canceling statement due to lock timeout") ==
                  err,
              "got: %s", err);
    cr_assert(strstr(err, "gave up after 3 attempts"), "got: %s", err);
    cr_assert(strstr(err, "lock_timeout 50 ms"), "got: %s", err);
    cr_assert_eq(PQtransactionStatus(conn), PQTRANS_IDLE);
    cr_assert(lock_is_free());
    cr_assert_eq(pgtest_count(conn,
                              "SELECT count(*) FROM saga.schema_migrations WHERE version = 903", 0,
                              NULL),
                 0);
    pgtest_exec(holder, "ROLLBACK");
    PQfinish(holder);
}

/* A file that commits part of itself and then fails on a lock is not tried again: the part
 * it committed would be applied once more. It is refused as transaction control. */
Test(migrate, a_lock_failure_after_a_commit_in_the_file_is_not_retried)
{
    pgtest_exec(conn, "CREATE TABLE public.applied (x int); CREATE TABLE public.row_held (x int);"
                      " INSERT INTO public.row_held VALUES (1)");
    struct migration list[66];
    size_t count =
        migrated_plus(list, (struct migration){904, "commits_then_waits",
                                               "INSERT INTO public.applied VALUES (1); COMMIT; "
                                               "SELECT * FROM public.row_held FOR UPDATE NOWAIT;"});
    PGconn *holder = pgtest_connect(db.url);
    pgtest_exec(holder, "BEGIN");
    pgtest_exec(holder, "SELECT * FROM public.row_held FOR UPDATE");

    struct locked_run run = {.url = db.url, .list = list, .count = count};
    run.options = (struct migrate_options){
        .lock_timeout_ms = 1000, .max_attempts = 3, .backoff_ms = 10, .backoff_max_ms = 10};
    locked_run_main(&run);
    cr_assert_eq(run.applied, -1);
    cr_assert(strstr(run.err, "must not contain transaction control"), "got: %s", run.err);
    cr_assert_eq(atomic_load(&run.retries), 0);
    cr_assert_eq(pgtest_count(conn, "SELECT count(*) FROM public.applied", 0, NULL), 1);
    cr_assert(lock_is_free());
    pgtest_exec(holder, "ROLLBACK");
    PQfinish(holder);
}

/* A migration whose COMMIT fails with a serialization failure (here a deferred constraint
 * trigger that raises 40001 the first time, as SERIALIZABLE would at commit) left nothing
 * applied: it is tried again, and applied once. */
Test(migrate, a_serialization_failure_at_commit_is_retried)
{
    pgtest_exec(conn, "CREATE TABLE public.committed (x int); "
                      "CREATE SEQUENCE public.commit_tries; "
                      "CREATE FUNCTION public.refuse_first_commit() RETURNS trigger "
                      "LANGUAGE plpgsql AS $$ BEGIN "
                      "IF nextval('public.commit_tries') = 1 THEN "
                      "RAISE EXCEPTION 'could not serialize access' USING ERRCODE = '40001'; "
                      "END IF; RETURN NULL; END $$; "
                      "CREATE CONSTRAINT TRIGGER refuse_first_commit AFTER INSERT ON "
                      "public.committed DEFERRABLE INITIALLY DEFERRED FOR EACH ROW "
                      "EXECUTE FUNCTION public.refuse_first_commit()");
    struct migration list[66];
    size_t count =
        migrated_plus(list, (struct migration){905, "refused_at_commit",
                                               "INSERT INTO public.committed VALUES (1);"});
    struct locked_run run = {.url = db.url, .list = list, .count = count};
    run.options = (struct migrate_options){
        .lock_timeout_ms = 1000, .max_attempts = 3, .backoff_ms = 10, .backoff_max_ms = 10};
    locked_run_main(&run);
    cr_assert_eq(run.applied, 1, "%s", run.err);
    cr_assert_eq(atomic_load(&run.retries), 1);
    cr_assert(
        strstr(run.first_retry, "migration 905_refused_at_commit: could not serialize access"),
        "got: %s", run.first_retry);
    cr_assert_eq(pgtest_count(conn, "SELECT count(*) FROM public.committed", 0, NULL), 1);
    cr_assert_eq(pgtest_count(conn,
                              "SELECT count(*) FROM saga.schema_migrations WHERE version = 905", 0,
                              NULL),
                 1);
    cr_assert(lock_is_free());
}

/* sql/012: saga.instances' value rules move from table CHECKs to domains without rewriting
 * the table (a catalog change, its rows and storage kept), and every rule still refuses a bad
 * value. Run on a database holding sagas migrated up to 011. */
Test(migrate, instances_rules_become_domains_without_a_rewrite)
{
    char err[1024];
    size_t before = 0;
    while (before < migrations_builtin_count && migrations_builtin[before].version <= 11)
        before++;
    cr_assert_lt(before, migrations_builtin_count, "no migration after 011");
    cr_assert_eq(migrate_apply(conn, migrations_builtin, before, err, sizeof(err)), (int)before,
                 "%s", err);
    pgtest_exec(conn,
                "SELECT saga.register_definition('o', 1, '{\"saga\": \"o\", \"version\": 1, "
                "\"steps\": [{\"name\": \"a\"}]}');"
                "SELECT saga.start('o', jsonb_build_object('n', i)) FROM generate_series(1, 50) i;"
                "UPDATE saga.instances SET status = 'running', phase = 'compensation', "
                "wait = 'backoff', pending_request = 'retry' WHERE input->>'n' = '7'");
    const char *file = "SELECT pg_relation_filenode('saga.instances')::text";
    const char *rows = "SELECT md5(string_agg(i::text, ',' ORDER BY id)) FROM saga.instances i";
    char *file_before = pgtest_value(conn, file, 0, NULL);
    char *rows_before = pgtest_value(conn, rows, 0, NULL);

    cr_assert_eq(
        migrate_apply(conn, migrations_builtin, migrations_builtin_count, err, sizeof(err)),
        (int)(migrations_builtin_count - before), "%s", err);
    char *file_after = pgtest_value(conn, file, 0, NULL);
    char *rows_after = pgtest_value(conn, rows, 0, NULL);
    cr_assert_str_eq(file_after, file_before, "saga.instances was rewritten");
    cr_assert_str_eq(rows_after, rows_before, "saga.instances' rows changed");
    cr_assert_eq(pgtest_count(conn,
                              "SELECT count(*) FROM pg_constraint WHERE contype = 'c' "
                              "AND conrelid = 'saga.instances'::regclass",
                              0, NULL),
                 0, "table CHECKs left on saga.instances");

    static const char *const bad[][2] = {{"status = 'paused'", "saga_status"},
                                         {"phase = 'undo'", "saga_phase"},
                                         {"wait = 'forever'", "saga_wait"},
                                         {"trace_id = 'ABC'", "trace_id"},
                                         {"pending_request = 'pause'", "operator_request"}};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        char sql[256], state[6], msg[256];
        snprintf(sql, sizeof(sql), "UPDATE saga.instances SET %s WHERE input->>'n' = '1'",
                 bad[i][0]);
        pgtest_expect_error(conn, sql, 0, NULL, state, msg, sizeof(msg));
        cr_assert_str_eq(state, "23514", "%s: %s", bad[i][0], msg);
        cr_assert(strstr(msg, bad[i][1]), "%s: %s", bad[i][0], msg);
    }
    /* The values the rules allow still go in. */
    pgtest_exec(conn, "UPDATE saga.instances SET status = 'failed', phase = 'action', wait = "
                      "'reply', pending_request = 'abort', trace_id = repeat('ab', 16) "
                      "WHERE input->>'n' = '1'");
    free(file_before);
    free(rows_before);
    free(file_after);
    free(rows_after);
}

/* sql/012 cannot change the type of a column a view reads: it stops first, names the view and
 * says what to do, and changes nothing; without the view it goes through. */
Test(migrate, instances_domains_wait_for_views_on_the_columns)
{
    char err[1024];
    size_t before = 0;
    while (before < migrations_builtin_count && migrations_builtin[before].version <= 11)
        before++;
    cr_assert_eq(migrate_apply(conn, migrations_builtin, before, err, sizeof(err)), (int)before,
                 "%s", err);
    pgtest_exec(conn, "CREATE VIEW public.saga_dashboard AS "
                      "SELECT status, count(*) FROM saga.instances GROUP BY status");
    cr_assert_eq(
        migrate_apply(conn, migrations_builtin, migrations_builtin_count, err, sizeof(err)), -1);
    cr_assert(strstr(err, "view saga_dashboard") && strstr(err, "drop them"), "%s", err);
    cr_assert_eq(pgtest_count(conn, "SELECT max(version) FROM saga.schema_migrations", 0, NULL),
                 11);
    cr_assert_eq(
        pgtest_count(conn, "SELECT count(*) FROM pg_type WHERE typname = 'saga_status'", 0, NULL),
        0, "a domain was left behind");
    pgtest_exec(conn, "DROP VIEW public.saga_dashboard");
    cr_assert_eq(
        migrate_apply(conn, migrations_builtin, migrations_builtin_count, err, sizeof(err)),
        (int)(migrations_builtin_count - before), "%s", err);
}
