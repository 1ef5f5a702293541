/* The migration runner (lib/migrate.c) against a real PostgreSQL. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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
