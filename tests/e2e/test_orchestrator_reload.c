/* saga-orchestrator start-up and SIGHUP: definitions are validated and registered at start
 * (any error: exit 2 naming it); SIGHUP loads new ones without stopping, and a rejected set
 * changes nothing. Also the database sessions' set-up, which every (re)connection runs.
 * Real binary, real PostgreSQL, the dev broker. */
#include <arpa/inet.h>
#include <criterion/criterion.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <librdkafka/rdkafka.h>

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

/* extra: up to two more environment entries (may be NULL). */
static void start_orchestrator_env(struct proc *p, const char *url, const struct devbroker *b,
                                   const char *dir, const char *extra1, const char *extra2)
{
    static char env[4][1200];
    snprintf(env[0], sizeof(env[0]), "SAGA_DATABASE_URL=%s", url);
    snprintf(env[1], sizeof(env[1]), "SAGA_KAFKA_BROKERS=%s", b->bootstrap);
    snprintf(env[2], sizeof(env[2]), "SAGA_DEFINITIONS_DIR=%s", dir);
    snprintf(env[3], sizeof(env[3]), "SAGA_ADMIN_ADDR=");
    const char *envp[] = {env[0], env[1], env[2], env[3], extra1, extra1 ? extra2 : NULL, NULL};
    const char *argv[] = {getenv("SAGA_ORCHESTRATOR_BIN"), NULL};
    cr_assert_not_null(argv[0], "SAGA_ORCHESTRATOR_BIN is not set");
    struct proc_options opts = {.name = "orchestrator"};
    proc_start(p, argv, envp, &opts);
}

static void start_orchestrator(struct proc *p, const struct pgtest_db *db,
                               const struct devbroker *b, const char *dir)
{
    start_orchestrator_env(p, db->url, b, dir, NULL, NULL);
}

/* SIGTERM, then a clean exit 0 within 20 s. */
static void stop_orchestrator(struct proc *p)
{
    proc_signal(p, SIGTERM);
    cr_assert(proc_wait_exit(p, 20000));
    cr_assert_eq(proc_exit_code(p), 0);
    proc_cleanup(p);
}

/* A test's fresh database (not migrated), dev broker and definitions directory. */
struct fixture {
    struct pgtest_db db;
    PGconn *conn;
    struct devbroker b;
    char dir[32];
};

static void begin(struct fixture *f)
{
    f->conn = pgtest_fresh(&f->db, false);
    devbroker_start(&f->b, NULL);
    snprintf(f->dir, sizeof(f->dir), "/tmp/saga-reload-XXXXXX");
    cr_assert_not_null(mkdtemp(f->dir));
}

/* The end of a test: the broker, the definitions directory and the database go. */
static void finish(struct fixture *f)
{
    devbroker_stop(&f->b);
    char cmd[600];
    snprintf(cmd, sizeof(cmd), "rm -rf %s", f->dir);
    cr_assert_eq(system(cmd), 0);
    PQfinish(f->conn);
    pgtest_db_drop(&f->db);
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

/* Starts a saga of `name` and waits (bounded) until the outbox holds `want` commands of type
 * `command`; on failure dumps the orchestrator and fails with `why`. */
static void start_and_expect(struct fixture *f, struct proc *p, const char *name,
                             const char *command, long want, const char *why)
{
    char sql[200];
    snprintf(sql, sizeof(sql), "SELECT saga.start('%s', '{}')", name);
    PQclear(pgtest_query(f->conn, sql, 0, NULL));
    snprintf(sql, sizeof(sql), "SELECT count(*) FROM saga.outbox WHERE event_type = '%s'", command);
    if (!wait_count(f->conn, sql, want, 20000)) {
        proc_dump(p, "orchestrator", 16384);
        cr_assert_fail("%s", why);
    }
}

Test(orchestrator_reload, sighup_loads_new_definitions_and_keeps_old_on_error)
{
    struct fixture f;
    begin(&f);
    write_def(f.dir, "a.json", "alpha", 1, "DoA");

    struct proc p;
    start_orchestrator(&p, &f.db, &f.b, f.dir);
    cr_assert(proc_wait_log(&p, "saga-orchestrator started", NULL, 30000, NULL, 0),
              "the orchestrator did not start");

    /* A new saga and a new version of the old one, then SIGHUP. */
    write_def(f.dir, "b.json", "beta", 1, "DoB");
    write_def(f.dir, "a2.json", "alpha", 2, "DoA2");
    proc_signal(&p, SIGHUP);
    cr_assert(wait_count(f.conn, "SELECT count(*) FROM saga.definitions", 3, 20000),
              "SIGHUP did not register the new definitions");
    cr_assert(proc_wait_log(&p, "definition version(s) loaded", NULL, 20000, NULL, 0));
    /* The new saga runs: its command goes to the outbox. */
    PQclear(pgtest_query(f.conn, "SELECT saga.start('beta', '{}')", 0, NULL));
    cr_assert(
        wait_count(f.conn, "SELECT count(*) FROM saga.outbox WHERE event_type = 'DoB'", 1, 20000),
        "a saga of the reloaded definition did not run");
    /* saga.start takes the highest version. */
    PQclear(pgtest_query(f.conn, "SELECT saga.start('alpha', '{}')", 0, NULL));
    cr_assert(
        wait_count(f.conn, "SELECT count(*) FROM saga.outbox WHERE event_type = 'DoA2'", 1, 20000));

    /* Changed content under a registered version: rejected, nothing changes, still running. */
    write_def(f.dir, "b.json", "beta", 1, "Changed");
    proc_signal(&p, SIGHUP);
    cr_assert(proc_wait_log(&p, "definitions rejected", NULL, 20000, NULL, 0));
    char *log = proc_read_stdout(&p);
    cr_assert(strstr(log, "already registered with different content"), "%s", log);
    free(log);
    cr_assert_eq(pgtest_count(f.conn, "SELECT count(*) FROM saga.definitions", 0, NULL), 3);
    PQclear(pgtest_query(f.conn, "SELECT saga.start('beta', '{}')", 0, NULL));
    cr_assert(
        wait_count(f.conn, "SELECT count(*) FROM saga.outbox WHERE event_type = 'DoB'", 2, 20000),
        "the orchestrator stopped running the previous definitions");

    proc_signal(&p, SIGTERM);
    cr_assert(proc_wait_exit(&p, 20000));
    cr_assert_eq(proc_exit_code(&p), 0);

    /* At start the same change is fatal: exit 2, naming the file. */
    struct proc q;
    start_orchestrator(&q, &f.db, &f.b, f.dir);
    cr_assert(proc_wait_exit(&q, 30000));
    cr_assert_eq(proc_exit_code(&q), 2);
    char *err = proc_read_stderr(&q);
    cr_assert(strstr(err, "b.json") && strstr(err, "different content"), "%s", err);
    free(err);

    proc_cleanup(&p);
    proc_cleanup(&q);
    finish(&f);
}

Test(orchestrator_reload, invalid_definitions_at_start_exit_2_with_every_error)
{
    struct fixture f;
    begin(&f);
    char path[512];
    snprintf(path, sizeof(path), "%s/bad.json", f.dir);
    FILE *out = fopen(path, "w");
    cr_assert_not_null(out);
    fputs("{\"saga\": \"x\", \"version\": 0, \"reply_topic\": \"bad topic\", \"steps\": []}", out);
    fclose(out);
    struct proc p;
    start_orchestrator(&p, &f.db, &f.b, f.dir);
    cr_assert(proc_wait_exit(&p, 30000));
    cr_assert_eq(proc_exit_code(&p), 2);
    char *err = proc_read_stderr(&p);
    cr_assert(strstr(err, "bad.json: $.version") && strstr(err, "bad.json: $.reply_topic") &&
                  strstr(err, "bad.json: $.steps"),
              "every error must be listed with its path:\n%s", err);
    free(err);
    cr_assert_eq(pgtest_count(f.conn, "SELECT count(*) FROM saga.definitions", 0, NULL), 0);
    proc_cleanup(&p);
    devbroker_stop(&f.b);
    snprintf(path, sizeof(path), "rm -rf %s", f.dir);
    cr_assert_eq(system(path), 0);
    PQfinish(f.conn);
    pgtest_db_drop(&f.db);
}

/* KAFKA_STATISTICS_INTERVAL_MS=0 turns librdkafka's statistics off, and /readyz reads from
 * them that Kafka is reachable again after an outage: refused at start, exit 2 naming the
 * setting. (Before, the orchestrator ran, and after the first Kafka outage its /readyz said
 * "kafka down" for good.) */
Test(orchestrator_reload, kafka_statistics_off_exit_2)
{
    struct fixture f;
    begin(&f);
    write_def(f.dir, "a.json", "alpha", 1, "DoA");
    struct proc p;
    start_orchestrator_env(&p, f.db.url, &f.b, f.dir, "KAFKA_STATISTICS_INTERVAL_MS=0", NULL);
    if (!proc_wait_exit(&p, 30000)) {
        proc_dump(&p, "orchestrator", 16384);
        cr_assert_fail("the orchestrator runs with KAFKA_STATISTICS_INTERVAL_MS=0");
    }
    cr_assert_eq(proc_exit_code(&p), 2);
    char *err = proc_read_stderr(&p);
    cr_assert(strstr(err, "KAFKA_STATISTICS_INTERVAL_MS"), "%s", err);
    free(err);
    proc_cleanup(&p);
    /* Refused before the database was touched: no migration applied. */
    cr_assert_eq(
        pgtest_count(f.conn, "SELECT count(*) FROM pg_namespace WHERE nspname = 'saga'", 0, NULL),
        0, "a refused configuration applied the migrations");

    /* A positive interval is fine. */
    start_orchestrator_env(&p, f.db.url, &f.b, f.dir, "KAFKA_STATISTICS_INTERVAL_MS=2000", NULL);
    cr_assert(proc_wait_log(&p, "saga-orchestrator started", NULL, 30000, NULL, 0));
    stop_orchestrator(&p);
    finish(&f);
}

/* A setting librdkafka only checks when the client is made (a TLS file that does not exist):
 * exit 2 naming it, before the migrations. (Before, the migrations ran and then the start
 * failed.) */
Test(orchestrator_reload, kafka_tls_file_missing_exit_2)
{
    struct fixture f;
    begin(&f);
    write_def(f.dir, "a.json", "alpha", 1, "DoA");
    struct proc p;
    start_orchestrator_env(&p, f.db.url, &f.b, f.dir, "KAFKA_SECURITY_PROTOCOL=ssl",
                           "KAFKA_SSL_CA_LOCATION=/nonexistent/ca.pem");
    if (!proc_wait_exit(&p, 30000)) {
        proc_dump(&p, "orchestrator", 16384);
        cr_assert_fail("the orchestrator runs with a missing CA file");
    }
    cr_assert_eq(proc_exit_code(&p), 2);
    char *err = proc_read_stderr(&p);
    cr_assert(strstr(err, "ssl.ca.location") || strstr(err, "/nonexistent/ca.pem"), "%s", err);
    free(err);
    proc_cleanup(&p);
    cr_assert_eq(
        pgtest_count(f.conn, "SELECT count(*) FROM pg_namespace WHERE nspname = 'saga'", 0, NULL),
        0, "a refused configuration applied the migrations");
    finish(&f);
}

/* Another orchestrator registered a version this one has not loaded: it loads it when a saga
 * needs it, instead of skipping the saga forever. */
Test(orchestrator_reload, a_version_registered_elsewhere_is_loaded_on_demand)
{
    struct fixture f;
    begin(&f);
    write_def(f.dir, "a.json", "alpha", 1, "DoA");
    struct proc p;
    start_orchestrator(&p, &f.db, &f.b, f.dir);
    cr_assert(proc_wait_log(&p, "saga-orchestrator started", NULL, 30000, NULL, 0));

    char body[1024];
    snprintf(body, sizeof(body), saga_json, "alpha", 2, "DoA2");
    const char *params[1] = {body};
    PQclear(
        pgtest_query(f.conn, "SELECT saga.register_definition('alpha', 2, $1::jsonb)", 1, params));
    PQclear(pgtest_query(f.conn, "SELECT saga.start('alpha', '{}')", 0, NULL));
    cr_assert(
        wait_count(f.conn, "SELECT count(*) FROM saga.outbox WHERE event_type = 'DoA2'", 1, 20000),
        "the saga of a version registered elsewhere did not run");
    /* The orchestrator reloaded by itself: no signal came, and its logs do not say one did. */
    char line[2048];
    cr_assert(proc_wait_log(&p, "definition version(s) loaded", NULL, 1000, line, sizeof(line)));
    cr_assert(strstr(line, "\"reload: 2 definition version(s) loaded\""), "%s", line);
    cr_assert_eq(proc_count_log(&p, "SIGHUP:"), 0);
    stop_orchestrator(&p);
    finish(&f);
}

/* A SIGHUP that comes while a reload runs is not dropped: one more reload runs after it, so
 * that a change made after the running reload read the directory is loaded. The first reload
 * is held (the test locks saga.definitions) until the second SIGHUP was handled. */
Test(orchestrator_reload, a_sighup_during_a_reload_is_queued)
{
    struct fixture f;
    begin(&f);
    write_def(f.dir, "a.json", "alpha", 1, "DoA");
    struct proc p;
    start_orchestrator(&p, &f.db, &f.b, f.dir);
    cr_assert(proc_wait_log(&p, "saga-orchestrator started", NULL, 30000, NULL, 0));

    /* The first reload reads the directory (alpha only), then waits for the lock. */
    PGconn *locker = pgtest_connect(f.db.url);
    pgtest_exec(locker, "BEGIN; LOCK TABLE saga.definitions IN SHARE MODE");
    proc_signal(&p, SIGHUP);
    cr_assert(wait_count(f.conn,
                         "SELECT count(*) FROM pg_stat_activity WHERE datname = "
                         "current_database() AND wait_event_type = 'Lock'",
                         1, 20000),
              "the first reload did not wait for the lock on saga.definitions");

    /* A new definition, and a SIGHUP for it while the first reload runs. */
    write_def(f.dir, "b.json", "beta", 1, "DoB");
    size_t from = 0;
    proc_signal(&p, SIGHUP);
    cr_assert(proc_wait_log(&p, "SIGHUP: a reload is", &from, 20000, NULL, 0),
              "the second SIGHUP was not handled while the first reload ran");
    pgtest_exec(locker, "COMMIT");
    PQfinish(locker);

    if (!wait_count(f.conn, "SELECT count(*) FROM saga.definitions WHERE name = 'beta'", 1,
                    20000)) {
        proc_dump(&p, "orchestrator", 16384);
        cr_assert_fail("the SIGHUP that came during a reload was dropped");
    }
    cr_assert(proc_wait_log(&p, "2 definition version(s) loaded", NULL, 20000, NULL, 0));
    PQclear(pgtest_query(f.conn, "SELECT saga.start('beta', '{}')", 0, NULL));
    cr_assert(
        wait_count(f.conn, "SELECT count(*) FROM saga.outbox WHERE event_type = 'DoB'", 1, 20000),
        "a saga of the definition loaded by the queued reload did not run");
    /* Two SIGHUPs, two reloads: no more. */
    cr_assert_eq(proc_count_log(&p, "SIGHUP: 1 definition version(s) loaded"), 1);
    cr_assert_eq(proc_count_log(&p, "definition version(s) loaded"), 2);

    stop_orchestrator(&p);
    finish(&f);
}

/* The claim is prepared once per session (its parse and plan cost more than running it when
 * it finds nothing, every poll interval at rest): not on every claim, again when a reload
 * changes the loaded versions, and again on a new session. (Before, every claim sent its
 * whole text to be parsed and planned.) The log at debug level says when it is prepared. */
Test(orchestrator_reload, the_claim_is_prepared_once_per_session_and_set_of_versions)
{
    struct fixture f;
    begin(&f);
    write_def(f.dir, "a.json", "alpha", 1, "DoA");
    struct proc p;
    start_orchestrator_env(&p, f.db.url, &f.b, f.dir, "SAGA_LOG_LEVEL=debug", NULL);
    cr_assert(proc_wait_log(&p, "saga-orchestrator started", NULL, 30000, NULL, 0));
    /* The reply partitions change the claim (reply timeouts wait without them): once they are
     * assigned, the claim's text stays the same until the next reload. */
    cr_assert(proc_wait_log(&p, "partition(s) assigned", NULL, 30000, NULL, 0));
    start_and_expect(&f, &p, "alpha", "DoA", 1, "no command for the first saga");
    size_t prepared = proc_count_log(&p, "claim statement prepared");
    cr_assert(prepared >= 1, "the claim was never prepared");
    char line[2048];
    cr_assert(proc_wait_log(&p, "claim statement prepared", NULL, 1000, line, sizeof(line)));
    cr_assert(strstr(line, "\"definition_versions\":\"1\""), "%s", line);

    /* More claims (a saga, each poll): the same statement. */
    start_and_expect(&f, &p, "alpha", "DoA", 2, "no command for the second saga");
    cr_assert_eq(proc_count_log(&p, "claim statement prepared"), prepared,
                 "the claim was prepared again without a change");

    /* A reload that loads another version: prepared again, with it. */
    size_t from = 0;
    write_def(f.dir, "b.json", "beta", 1, "DoB");
    proc_signal(&p, SIGHUP);
    cr_assert(proc_wait_log(&p, "2 definition version(s) loaded", &from, 20000, NULL, 0));
    start_and_expect(&f, &p, "beta", "DoB", 1, "no command for the reloaded version");
    cr_assert(proc_wait_log(&p, "claim statement prepared", &from, 1000, line, sizeof(line)),
              "the claim was not prepared again after a reload");
    cr_assert(strstr(line, "\"definition_versions\":\"2\""), "%s", line);
    cr_assert_eq(proc_count_log(&p, "claim statement prepared"), prepared + 1);

    /* Another version's migration changes the type of a column the claim returns: every
     * EXECUTE of the statement prepared before fails ("cached plan must not change result
     * type"); the claim is prepared again after the failure and goes on. */
    PQclear(pgtest_query(
        f.conn, "ALTER TABLE saga.instances ALTER COLUMN request_reason TYPE varchar(2000)", 0,
        NULL));
    start_and_expect(&f, &p, "alpha", "DoA", 3,
                     "no claim after a column the claim returns changed its type");
    cr_assert(proc_wait_log(&p, "claim statement prepared", &from, 1000, NULL, 0),
              "the claim was not prepared again after it failed");

    /* A new session: prepared on it. */
    PQclear(pgtest_query(f.conn,
                         "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = "
                         "current_database() AND pid <> pg_backend_pid()",
                         0, NULL));
    cr_assert(proc_wait_log(&p, "database connection lost", &from, 20000, NULL, 0));
    start_and_expect(&f, &p, "alpha", "DoA", 4, "no claim after the session was lost");
    cr_assert(proc_wait_log(&p, "claim statement prepared", &from, 1000, NULL, 0),
              "the claim was not prepared on the new session");

    stop_orchestrator(&p);
    finish(&f);
}

/* A free TCP port on loopback (the kernel's pick; a race with another process is unlikely and
 * only fails the server's start). */
static int free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    cr_assert(fd >= 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof(a);
    cr_assert_eq(bind(fd, (struct sockaddr *)&a, sizeof(a)), 0);
    cr_assert_eq(getsockname(fd, (struct sockaddr *)&a, &len), 0);
    close(fd);
    return ntohs(a.sin_port);
}

/* A PostgreSQL server in recovery (a fresh cluster with standby.signal and no primary): it
 * accepts connections, SET works, LISTEN is refused ("cannot execute LISTEN during
 * recovery"), as on a standby an orchestrator might reach after a failover. */
/* The server in recovery that a test started and has not stopped yet: stopped by the
 * test's .fini when an assertion ends the test early (nothing may be left running). */
static char standby_running[64];

static void standby_stop_quietly(const char *dir)
{
    char cmd[1024];
    snprintf(cmd, sizeof(cmd),
             "pgbin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1); as=; "
             "if [ \"$(id -u)\" = 0 ]; then as='runuser -u postgres --'; fi; "
             "$as $pgbin/pg_ctl -D %s/data -m immediate -w stop >/dev/null 2>&1; rm -rf %s",
             dir, dir);
    int rc = system(cmd);
    (void)rc; /* best effort: the directory is a throwaway */
}

static void standby_cleanup(void)
{
    if (standby_running[0])
        standby_stop_quietly(standby_running);
    standby_running[0] = '\0';
}

static void standby_start(const char *dir, int port)
{
    char cmd[2048];
    snprintf(cmd, sizeof(cmd),
             "set -e; pgbin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1); "
             "as=; if [ \"$(id -u)\" = 0 ]; then chown postgres: %s; as='runuser -u postgres --'; "
             "fi; $as $pgbin/initdb -D %s/data -U postgres -A trust --no-sync >%s/initdb.log 2>&1; "
             "touch %s/data/standby.signal; "
             "$as $pgbin/pg_ctl -D %s/data -l %s/server.log -w -t 60 -o '-p %d -k %s "
             "-c listen_addresses=127.0.0.1 -c fsync=off' start >/dev/null",
             dir, dir, dir, dir, dir, dir, port, dir);
    snprintf(standby_running, sizeof(standby_running), "%s", dir);
    cr_assert_eq(system(cmd), 0, "cannot start a server in recovery in %s", dir);
}

static void standby_stop(const char *dir)
{
    standby_stop_quietly(dir);
    standby_running[0] = '\0';
}

/* The libpq service "orch" (SAGA_DATABASE_URL=service=orch): libpq reads the file at every
 * connection, so the test moves the orchestrator's next sessions from one server to another. */
static void write_service(const char *path, const char *host, int port, const char *dbname)
{
    char tmp[600];
    snprintf(tmp, sizeof(tmp), "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    cr_assert_not_null(f);
    fprintf(f, "[orch]\nhost=%s\nport=%d\ndbname=%s\nuser=postgres\n", host, port, dbname);
    fclose(f);
    cr_assert_eq(rename(tmp, path), 0);
}

/* A session whose set-up fails (LISTEN on a server in recovery) is closed and opened again,
 * with backoff, until the set-up succeeds: once the database is a primary again, the claim
 * worker LISTENs and claims. (Before, the worker rolled back and went on with that session
 * for good: no LISTEN, and every claim refused by the server in recovery.) */
Test(orchestrator_reload, a_failed_session_setup_reconnects, .fini = standby_cleanup)
{
    struct fixture f;
    begin(&f);
    write_def(f.dir, "a.json", "alpha", 1, "DoA");
    char standby[] = "/tmp/saga-standby-XXXXXX";
    cr_assert_not_null(mkdtemp(standby));
    int standby_port = free_port();
    standby_start(standby, standby_port);

    char services[600], env_services[700];
    snprintf(services, sizeof(services), "%s/pg_service.conf", f.dir);
    snprintf(env_services, sizeof(env_services), "PGSERVICEFILE=%s", services);
    const char *host = PQhost(f.conn);
    int port = atoi(PQport(f.conn));
    write_service(services, host && *host ? host : "127.0.0.1", port, f.db.name);
    struct proc p;
    start_orchestrator_env(&p, "service=orch", &f.b, f.dir, env_services, "SAGA_RECONNECT_MAX=1s");
    cr_assert(proc_wait_log(&p, "saga-orchestrator started", NULL, 30000, NULL, 0));
    size_t from = 0;
    cr_assert(proc_wait_log(&p, "database connected", &from, 20000, NULL, 0));
    cr_assert(proc_wait_log(&p, "database connected", &from, 20000, NULL, 0));

    /* The next sessions reach the server in recovery. */
    write_service(services, "127.0.0.1", standby_port, "postgres");
    PQclear(pgtest_query(f.conn,
                         "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = "
                         "current_database() AND pid <> pg_backend_pid()",
                         0, NULL));
    char line[2048];
    for (int i = 0; i < 2; i++)
        if (!proc_wait_log(&p, "database session setup failed; reconnecting", &from, 20000, line,
                           sizeof(line))) {
            proc_dump(&p, "orchestrator", 16384);
            cr_assert_fail("a failed session set-up did not close the session (try %d)", i + 1);
        }
    cr_assert(strstr(line, "\"worker\":\"claims\"") && strstr(line, "25006") &&
                  strstr(line, "LISTEN"),
              "%s", line);

    /* The primary is back: a new session sets up in full, and sagas are claimed. */
    write_service(services, host && *host ? host : "127.0.0.1", port, f.db.name);
    start_and_expect(&f, &p, "alpha", "DoA", 1,
                     "the claim worker did not come back after its session set-up failed");

    stop_orchestrator(&p);
    standby_stop(standby);
    finish(&f);
}

/* A server in recovery that holds the saga schema in database dbname (as a standby of the
 * primary would): a cluster migrated by `saga-orchestrator migrate` while it was a primary,
 * then restarted in recovery (standby.signal, no primary to follow). Stopped by
 * standby_cleanup when the test ends early. */
static void standby_start_migrated(const char *dir, int port, const char *dbname)
{
    char cmd[4096];
    snprintf(cmd, sizeof(cmd),
             "set -e; pgbin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1); "
             "as=; if [ \"$(id -u)\" = 0 ]; then chown postgres: %s; as='runuser -u postgres --'; "
             "fi; $as $pgbin/initdb -D %s/data -U postgres -A trust --no-sync >%s/initdb.log 2>&1; "
             "opts='-p %d -k %s -c listen_addresses=127.0.0.1 -c fsync=off'; "
             "$as $pgbin/pg_ctl -D %s/data -l %s/server.log -w -t 60 -o \"$opts\" start "
             ">/dev/null; "
             "$pgbin/psql -X -q -h 127.0.0.1 -p %d -U postgres -d postgres -c 'CREATE DATABASE "
             "\"%s\"'; "
             "SAGA_DATABASE_URL='host=127.0.0.1 port=%d user=postgres dbname=%s' %s migrate "
             ">%s/migrate.log 2>&1; "
             "$as $pgbin/pg_ctl -D %s/data -m fast -w stop >/dev/null; "
             "touch %s/data/standby.signal; "
             "$as $pgbin/pg_ctl -D %s/data -l %s/server.log -w -t 60 -o \"$opts\" start "
             ">/dev/null",
             dir, dir, dir, port, dir, dir, dir, port, dbname, port, dbname,
             getenv("SAGA_ORCHESTRATOR_BIN"), dir, dir, dir, dir, dir);
    snprintf(standby_running, sizeof(standby_running), "%s", dir);
    cr_assert_eq(system(cmd), 0, "cannot start a migrated server in recovery in %s", dir);
}

/* The service "orch" over two servers, tried in this order (libpq's multiple hosts). */
static void write_service_hosts(const char *path, const char *host1, int port1, const char *host2,
                                int port2, const char *dbname, const char *target)
{
    char tmp[600];
    snprintf(tmp, sizeof(tmp), "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    cr_assert_not_null(f);
    fprintf(f,
            "[orch]\nhost=%s,%s\nport=%d,%d\ndbname=%s\nuser=postgres\n"
            "target_session_attrs=%s\n",
            host1, host2, port1, port2, dbname, target);
    fclose(f);
    cr_assert_eq(rename(tmp, path), 0);
}

/* A well-formed reply (for a saga no database knows) on reload.replies; waits for the ack. */
static void produce_reply(const char *bootstrap)
{
    char errstr[512];
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    cr_assert_eq(rd_kafka_conf_set(conf, "bootstrap.servers", bootstrap, errstr, sizeof(errstr)),
                 RD_KAFKA_CONF_OK, "%s", errstr);
    rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof(errstr));
    cr_assert_not_null(rk, "%s", errstr);
    rd_kafka_resp_err_t err = rd_kafka_producev(
        rk, RD_KAFKA_V_TOPIC("reload.replies"), RD_KAFKA_V_VALUE("{}", 2),
        RD_KAFKA_V_HEADER("message-id", "6c1f2a4e-0d7b-4c55-9a43-5b0e8f1d2c01", -1),
        RD_KAFKA_V_HEADER("in-reply-to", "6c1f2a4e-0d7b-4c55-9a43-5b0e8f1d2c02", -1),
        RD_KAFKA_V_HEADER("saga-id", "6c1f2a4e-0d7b-4c55-9a43-5b0e8f1d2c03", -1),
        RD_KAFKA_V_HEADER("outcome", "success", -1), RD_KAFKA_V_END);
    cr_assert_eq(err, RD_KAFKA_RESP_ERR_NO_ERROR, "%s", rd_kafka_err2str(err));
    cr_assert_eq(rd_kafka_flush(rk, 15000), RD_KAFKA_RESP_ERR_NO_ERROR, "the reply was not acked");
    rd_kafka_destroy(rk);
}

/* A reply worker whose session reached a server in recovery (after a failover, a connection
 * string whose first host is now a standby) sets up (its set-up only SETs), then every batch
 * is refused (SQLSTATE 25006). After a few refusals in a row it closes the session and opens
 * a new one, with backoff, so that target_session_attrs=read-write finds the primary. (Before,
 * it retried the batch on the same session for good: the reply was never applied.) */
Test(orchestrator_reload, a_read_only_session_reconnects, .fini = standby_cleanup)
{
    struct fixture f;
    begin(&f);
    write_def(f.dir, "a.json", "alpha", 1, "DoA");
    char standby[] = "/tmp/saga-standby-XXXXXX";
    cr_assert_not_null(mkdtemp(standby));
    int standby_port = free_port();
    standby_start_migrated(standby, standby_port, f.db.name);

    char services[600], env_services[700];
    snprintf(services, sizeof(services), "%s/pg_service.conf", f.dir);
    snprintf(env_services, sizeof(env_services), "PGSERVICEFILE=%s", services);
    const char *h = PQhost(f.conn);
    char host[256];
    snprintf(host, sizeof(host), "%s", h && *h ? h : "127.0.0.1");
    int port = atoi(PQport(f.conn));
    write_service(services, host, port, f.db.name);
    struct proc p;
    start_orchestrator_env(&p, "service=orch", &f.b, f.dir, env_services, "SAGA_RECONNECT_MAX=1s");
    cr_assert(proc_wait_log(&p, "saga-orchestrator started", NULL, 30000, NULL, 0));
    cr_assert(proc_wait_log(&p, "partition(s) assigned", NULL, 30000, NULL, 0));

    /* A failover: the first host of the connection string is now a server in recovery. */
    write_service_hosts(services, "127.0.0.1", standby_port, host, port, f.db.name, "any");
    size_t from = 0;
    char line[2048];
    proc_wait_log(&p, "saga-orchestrator started", &from, 1000, NULL, 0);
    PQclear(pgtest_query(f.conn,
                         "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = "
                         "current_database() AND pid <> pg_backend_pid()",
                         0, NULL));
    bool replies_connected = false;
    int64_t give_up = proc_now_ms() + 30000; /* the claims worker reconnects every second */
    while (!replies_connected && proc_now_ms() < give_up &&
           proc_wait_log(&p, "database connected", &from, 20000, line, sizeof(line)))
        replies_connected = strstr(line, "\"worker\":\"replies\"") != NULL;
    cr_assert(replies_connected, "the reply worker did not connect again");
    /* (The terminated sessions may linger a moment.) */
    cr_assert(wait_count(f.conn,
                         "SELECT count(*) FROM pg_stat_activity WHERE datname = "
                         "current_database() AND pid <> pg_backend_pid() AND backend_type = "
                         "'client backend'",
                         0, 10000),
              "a session reached the primary: the test cannot tell anything");

    produce_reply(f.b.bootstrap);
    if (!proc_wait_log(&p, "the database refuses writes", &from, 30000, line, sizeof(line))) {
        proc_dump(&p, "orchestrator", 16384);
        cr_assert_fail("the reply worker stayed on the server in recovery");
    }
    cr_assert(strstr(line, "\"worker\":\"replies\"") && strstr(line, "25006"), "%s", line);

    /* Sessions that must write: the next connection skips the server in recovery. */
    write_service_hosts(services, "127.0.0.1", standby_port, host, port, f.db.name, "read-write");
    if (!wait_count(f.conn, "SELECT count(*) FROM saga.replies_received", 1, 30000)) {
        proc_dump(&p, "orchestrator", 16384);
        cr_assert_fail("the reply was not applied on the primary");
    }

    stop_orchestrator(&p);
    standby_stop(standby);
    finish(&f);
}
