/* saga-orchestrator start-up and SIGHUP: definitions are validated and registered at start
 * (any error: exit 2 naming it); SIGHUP loads new ones without stopping, and a rejected set
 * changes nothing. Real binary, real PostgreSQL, the dev broker. */
#include <criterion/criterion.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "devbroker.h"
#include "pgtest.h"
#include "proc.h"

static const char *saga_json =
    "{\"saga\": \"%s\", \"version\": %d, \"reply_topic\": \"reload.replies\",\n"
    " \"steps\": [{\"name\": \"only\", \"participant\": \"p\", \"compensation\": null,\n"
    "   \"command\": {\"topic\": \"reload.commands\", \"type\": \"%s\", \"payload\": {}}}]}\n";

static void write_def(const char *dir, const char *file, const char *name, int version,
                      const char *type)
{
    char path[512];
    snprintf(path, sizeof(path), "%s/%s", dir, file);
    FILE *f = fopen(path, "w");
    cr_assert_not_null(f);
    fprintf(f, saga_json, name, version, type);
    fclose(f);
}

static void start_orchestrator(struct proc *p, const struct pgtest_db *db,
                               const struct devbroker *b, const char *dir)
{
    static char env[4][1200];
    snprintf(env[0], sizeof(env[0]), "SAGA_DATABASE_URL=%s", db->url);
    snprintf(env[1], sizeof(env[1]), "SAGA_KAFKA_BROKERS=%s", b->bootstrap);
    snprintf(env[2], sizeof(env[2]), "SAGA_DEFINITIONS_DIR=%s", dir);
    snprintf(env[3], sizeof(env[3]), "SAGA_ADMIN_ADDR=");
    const char *envp[] = {env[0], env[1], env[2], env[3], NULL};
    const char *argv[] = {getenv("SAGA_ORCHESTRATOR_BIN"), NULL};
    cr_assert_not_null(argv[0], "SAGA_ORCHESTRATOR_BIN is not set");
    struct proc_options opts = {.name = "orchestrator"};
    proc_start(p, argv, envp, &opts);
}

static bool wait_count(PGconn *conn, const char *sql, long want, int timeout_ms)
{
    int64_t end = proc_now_ms() + timeout_ms;
    while (proc_now_ms() < end) {
        if (pgtest_count(conn, sql, 0, NULL) == want)
            return true;
        usleep(50 * 1000);
    }
    return false;
}

Test(orchestrator_reload, sighup_loads_new_definitions_and_keeps_old_on_error)
{
    struct pgtest_db db;
    PGconn *conn = pgtest_fresh(&db, false);
    struct devbroker b;
    devbroker_start(&b, NULL);
    char dir[] = "/tmp/saga-reload-XXXXXX";
    cr_assert_not_null(mkdtemp(dir));
    write_def(dir, "a.json", "alpha", 1, "DoA");

    struct proc p;
    start_orchestrator(&p, &db, &b, dir);
    cr_assert(proc_wait_log(&p, "saga-orchestrator started", NULL, 30000, NULL, 0),
              "the orchestrator did not start");

    /* A new saga and a new version of the old one, then SIGHUP. */
    write_def(dir, "b.json", "beta", 1, "DoB");
    write_def(dir, "a2.json", "alpha", 2, "DoA2");
    proc_signal(&p, SIGHUP);
    cr_assert(wait_count(conn, "SELECT count(*) FROM saga.definitions", 3, 20000),
              "SIGHUP did not register the new definitions");
    cr_assert(proc_wait_log(&p, "definition version(s) loaded", NULL, 20000, NULL, 0));
    /* The new saga runs: its command goes to the outbox. */
    PQclear(pgtest_query(conn, "SELECT saga.start('beta', '{}')", 0, NULL));
    cr_assert(
        wait_count(conn, "SELECT count(*) FROM saga.outbox WHERE event_type = 'DoB'", 1, 20000),
        "a saga of the reloaded definition did not run");
    /* saga.start takes the highest version. */
    PQclear(pgtest_query(conn, "SELECT saga.start('alpha', '{}')", 0, NULL));
    cr_assert(
        wait_count(conn, "SELECT count(*) FROM saga.outbox WHERE event_type = 'DoA2'", 1, 20000));

    /* Changed content under a registered version: rejected, nothing changes, still running. */
    write_def(dir, "b.json", "beta", 1, "Changed");
    proc_signal(&p, SIGHUP);
    cr_assert(proc_wait_log(&p, "definitions rejected", NULL, 20000, NULL, 0));
    char *log = proc_read_stdout(&p);
    cr_assert(strstr(log, "already registered with different content"), "%s", log);
    free(log);
    cr_assert_eq(pgtest_count(conn, "SELECT count(*) FROM saga.definitions", 0, NULL), 3);
    PQclear(pgtest_query(conn, "SELECT saga.start('beta', '{}')", 0, NULL));
    cr_assert(
        wait_count(conn, "SELECT count(*) FROM saga.outbox WHERE event_type = 'DoB'", 2, 20000),
        "the orchestrator stopped running the previous definitions");

    proc_signal(&p, SIGTERM);
    cr_assert(proc_wait_exit(&p, 20000));
    cr_assert_eq(proc_exit_code(&p), 0);

    /* At start the same change is fatal: exit 2, naming the file. */
    struct proc q;
    start_orchestrator(&q, &db, &b, dir);
    cr_assert(proc_wait_exit(&q, 30000));
    cr_assert_eq(proc_exit_code(&q), 2);
    char *err = proc_read_stderr(&q);
    cr_assert(strstr(err, "b.json") && strstr(err, "different content"), "%s", err);
    free(err);

    proc_cleanup(&p);
    proc_cleanup(&q);
    devbroker_stop(&b);
    char cmd[600];
    snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
    cr_assert_eq(system(cmd), 0);
    PQfinish(conn);
    pgtest_db_drop(&db);
}

Test(orchestrator_reload, invalid_definitions_at_start_exit_2_with_every_error)
{
    struct pgtest_db db;
    PGconn *conn = pgtest_fresh(&db, false);
    struct devbroker b;
    devbroker_start(&b, NULL);
    char dir[] = "/tmp/saga-reload-XXXXXX";
    cr_assert_not_null(mkdtemp(dir));
    char path[512];
    snprintf(path, sizeof(path), "%s/bad.json", dir);
    FILE *f = fopen(path, "w");
    cr_assert_not_null(f);
    fputs("{\"saga\": \"x\", \"version\": 0, \"reply_topic\": \"bad topic\", \"steps\": []}", f);
    fclose(f);
    struct proc p;
    start_orchestrator(&p, &db, &b, dir);
    cr_assert(proc_wait_exit(&p, 30000));
    cr_assert_eq(proc_exit_code(&p), 2);
    char *err = proc_read_stderr(&p);
    cr_assert(strstr(err, "bad.json: $.version") && strstr(err, "bad.json: $.reply_topic") &&
                  strstr(err, "bad.json: $.steps"),
              "every error must be listed with its path:\n%s", err);
    free(err);
    cr_assert_eq(pgtest_count(conn, "SELECT count(*) FROM saga.definitions", 0, NULL), 0);
    proc_cleanup(&p);
    devbroker_stop(&b);
    snprintf(path, sizeof(path), "rm -rf %s", dir);
    cr_assert_eq(system(path), 0);
    PQfinish(conn);
    pgtest_db_drop(&db);
}

/* Another orchestrator registered a version this one has not loaded: it loads it when a saga
 * needs it, instead of skipping the saga forever. */
Test(orchestrator_reload, a_version_registered_elsewhere_is_loaded_on_demand)
{
    struct pgtest_db db;
    PGconn *conn = pgtest_fresh(&db, false);
    struct devbroker b;
    devbroker_start(&b, NULL);
    char dir[] = "/tmp/saga-reload-XXXXXX";
    cr_assert_not_null(mkdtemp(dir));
    write_def(dir, "a.json", "alpha", 1, "DoA");
    struct proc p;
    start_orchestrator(&p, &db, &b, dir);
    cr_assert(proc_wait_log(&p, "saga-orchestrator started", NULL, 30000, NULL, 0));

    char body[1024];
    snprintf(body, sizeof(body), saga_json, "alpha", 2, "DoA2");
    const char *params[1] = {body};
    PQclear(
        pgtest_query(conn, "SELECT saga.register_definition('alpha', 2, $1::jsonb)", 1, params));
    PQclear(pgtest_query(conn, "SELECT saga.start('alpha', '{}')", 0, NULL));
    cr_assert(
        wait_count(conn, "SELECT count(*) FROM saga.outbox WHERE event_type = 'DoA2'", 1, 20000),
        "the saga of a version registered elsewhere did not run");
    proc_signal(&p, SIGTERM);
    cr_assert(proc_wait_exit(&p, 20000));
    cr_assert_eq(proc_exit_code(&p), 0);
    proc_cleanup(&p);
    devbroker_stop(&b);
    char cmd[600];
    snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
    cr_assert_eq(system(cmd), 0);
    PQfinish(conn);
    pgtest_db_drop(&db);
}

/* A SIGHUP that comes while a reload runs is not dropped: one more reload runs after it, so
 * that a change made after the running reload read the directory is loaded. The first reload
 * is held (the test locks saga.definitions) until the second SIGHUP was handled. */
Test(orchestrator_reload, a_sighup_during_a_reload_is_queued)
{
    struct pgtest_db db;
    PGconn *conn = pgtest_fresh(&db, false);
    struct devbroker b;
    devbroker_start(&b, NULL);
    char dir[] = "/tmp/saga-reload-XXXXXX";
    cr_assert_not_null(mkdtemp(dir));
    write_def(dir, "a.json", "alpha", 1, "DoA");
    struct proc p;
    start_orchestrator(&p, &db, &b, dir);
    cr_assert(proc_wait_log(&p, "saga-orchestrator started", NULL, 30000, NULL, 0));

    /* The first reload reads the directory (alpha only), then waits for the lock. */
    PGconn *locker = pgtest_connect(db.url);
    pgtest_exec(locker, "BEGIN; LOCK TABLE saga.definitions IN SHARE MODE");
    proc_signal(&p, SIGHUP);
    cr_assert(wait_count(conn,
                         "SELECT count(*) FROM pg_stat_activity WHERE datname = "
                         "current_database() AND wait_event_type = 'Lock'",
                         1, 20000),
              "the first reload did not wait for the lock on saga.definitions");

    /* A new definition, and a SIGHUP for it while the first reload runs. */
    write_def(dir, "b.json", "beta", 1, "DoB");
    size_t from = 0;
    proc_signal(&p, SIGHUP);
    cr_assert(proc_wait_log(&p, "SIGHUP: a reload is", &from, 20000, NULL, 0),
              "the second SIGHUP was not handled while the first reload ran");
    pgtest_exec(locker, "COMMIT");
    PQfinish(locker);

    if (!wait_count(conn, "SELECT count(*) FROM saga.definitions WHERE name = 'beta'", 1, 20000)) {
        proc_dump(&p, "orchestrator", 16384);
        cr_assert_fail("the SIGHUP that came during a reload was dropped");
    }
    cr_assert(proc_wait_log(&p, "2 definition version(s) loaded", NULL, 20000, NULL, 0));
    PQclear(pgtest_query(conn, "SELECT saga.start('beta', '{}')", 0, NULL));
    cr_assert(
        wait_count(conn, "SELECT count(*) FROM saga.outbox WHERE event_type = 'DoB'", 1, 20000),
        "a saga of the definition loaded by the queued reload did not run");
    /* Two SIGHUPs, two reloads: no more. */
    cr_assert_eq(proc_count_log(&p, "SIGHUP: 1 definition version(s) loaded"), 1);
    cr_assert_eq(proc_count_log(&p, "definition version(s) loaded"), 2);

    proc_signal(&p, SIGTERM);
    cr_assert(proc_wait_exit(&p, 20000));
    cr_assert_eq(proc_exit_code(&p), 0);
    proc_cleanup(&p);
    devbroker_stop(&b);
    char cmd[600];
    snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
    cr_assert_eq(system(cmd), 0);
    PQfinish(conn);
    pgtest_db_drop(&db);
}
