/* Least privilege and secrets: the orchestrator and the relay run under the saga_* group
 * roles of sql/004_roles.sql, with their connection strings read from *_FILE variables; a
 * password never shows in their logs, errors or /metrics. Real binaries, real PostgreSQL. */
#include "relay_e2e.h"

#define SECRET "s3cr3t-Pa55word"

static void make_user(PGconn *conn, const char *name, const char *group)
{
    char sql[512];
    snprintf(sql, sizeof(sql),
             "DO $$ BEGIN CREATE ROLE %s LOGIN PASSWORD '%s' IN ROLE %s; "
             "EXCEPTION WHEN duplicate_object THEN NULL; END $$",
             name, SECRET, group);
    pgtest_exec(conn, sql);
}

/* A connection string for user on db, with the password in it (the test cluster trusts
 * loopback, so the password is not checked: it is there to be leaked, or not). */
static void user_url(const struct pgtest_db *db, const char *user, char *out, size_t len)
{
    const char *at = strstr(db->url, "://");
    cr_assert(at, "expected a URI: %s", db->url);
    const char *host = strchr(at + 3, '@');
    host = host ? host + 1 : at + 3;
    snprintf(out, len, "postgresql://%s:%s@%s", user, SECRET, host);
}

static void write_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    cr_assert_not_null(f);
    fprintf(f, "%s\n", text);
    fclose(f);
}

static void assert_no_secret(struct proc *p, const char *who)
{
    char *out = proc_read_stdout(p), *err = proc_read_stderr(p);
    cr_assert(!strstr(out, SECRET) && !strstr(err, SECRET), "%s leaked the password:\n%s\n%s", who,
              out, err);
    free(out);
    free(err);
}

Test(roles, daemons_work_under_least_privilege_and_never_print_passwords)
{
    struct pgtest_db db;
    PGconn *conn = pgtest_fresh(&db, true);
    char orch_user[80], relay_user[80], client_user[80], op_user[80];
    snprintf(orch_user, sizeof(orch_user), "%s_orch", db.name);
    snprintf(relay_user, sizeof(relay_user), "%s_relay", db.name);
    snprintf(client_user, sizeof(client_user), "%s_client", db.name);
    snprintf(op_user, sizeof(op_user), "%s_op", db.name);
    make_user(conn, orch_user, "saga_orchestrator");
    make_user(conn, relay_user, "saga_relay");
    make_user(conn, client_user, "saga_client");
    make_user(conn, op_user, "saga_operator");

    char url[1200], path_orch[128], path_relay[128];
    snprintf(path_orch, sizeof(path_orch), "/tmp/saga-roles-%d-orch", getpid());
    snprintf(path_relay, sizeof(path_relay), "/tmp/saga-roles-%d-relay", getpid());
    user_url(&db, orch_user, url, sizeof(url));
    write_file(path_orch, url);
    user_url(&db, relay_user, url, sizeof(url));
    write_file(path_relay, url);

    struct devbroker b;
    devbroker_start(&b, NULL);
    char env[6][1300];
    snprintf(env[0], sizeof(env[0]), "SAGA_DATABASE_URL_FILE=%s", path_orch);
    snprintf(env[1], sizeof(env[1]), "SAGA_KAFKA_BROKERS=%s", b.bootstrap);
    snprintf(env[2], sizeof(env[2]), "SAGA_DEFINITIONS_DIR=%s/sagas", getenv("SAGA_SOURCE_ROOT"));
    snprintf(env[3], sizeof(env[3]), "SAGA_ADMIN_ADDR=127.0.0.1:0");
    const char *orch_env[] = {env[0], env[1], env[2], env[3], "SAGA_DATABASE_URL", NULL};
    const char *orch_argv[] = {getenv("SAGA_ORCHESTRATOR_BIN"), NULL};
    struct proc orch;
    struct proc_options oo = {.name = "orchestrator"};
    proc_start(&orch, orch_argv, orch_env, &oo);
    if (!proc_wait_log(&orch, "saga-orchestrator started", NULL, 30000, NULL, 0)) {
        proc_dump(&orch, "orchestrator", 4000);
        cr_assert_fail("the orchestrator did not start under saga_orchestrator");
    }

    snprintf(env[4], sizeof(env[4]), "RELAY_DATABASE_URL_FILE=%s", path_relay);
    snprintf(env[5], sizeof(env[5]), "RELAY_KAFKA_BROKERS=%s", b.bootstrap);
    const char *relay_env[] = {env[4], env[5], "RELAY_ADMIN_ADDR=127.0.0.1:0", "RELAY_DATABASE_URL",
                               NULL};
    const char *relay_argv[] = {getenv("SAGA_RELAY_BIN"), NULL};
    struct proc relay;
    struct proc_options ro = {.name = "relay"};
    proc_start(&relay, relay_argv, relay_env, &ro);
    int relay_port = e2e_admin_port(&relay);

    /* A service starts a saga under saga_client; the orchestrator sends its first command;
     * the relay publishes and deletes it. */
    char client_url[1200];
    user_url(&db, client_user, client_url, sizeof(client_url));
    PGconn *client = pgtest_connect(client_url);
    PQclear(pgtest_query(client,
                         "SELECT saga.start('order_fulfillment', '{\"orderId\": \"o1\", "
                         "\"customerId\": \"c1\", \"items\": [], \"amount\": 5}')",
                         0, NULL));
    int64_t end = proc_now_ms() + 30000;
    while (proc_now_ms() < end &&
           (pgtest_count(conn, "SELECT count(*) FROM saga.step_history", 0, NULL) < 1 ||
            pgtest_count(conn, "SELECT count(*) FROM saga.outbox", 0, NULL) > 0))
        usleep(50 * 1000);
    cr_assert_eq(pgtest_count(conn, "SELECT count(*) FROM saga.step_history", 0, NULL), 1,
                 "the orchestrator did not send the first command");
    char published[600];
    snprintf(published, sizeof(published), "%s",
             e2e_series_db(&db, "relay_rows_published_total{table=\"saga.outbox\","
                                "topic=\"inventory.commands\"}"));
    cr_assert(e2e_wait_metric(relay_port, published, 1, 30000),
              "the relay did not publish under saga_relay");

    /* The relay role sees nothing but outboxes; the operator role only reads. */
    char relay_url[1200], op_url[1200], sqlstate[6];
    user_url(&db, relay_user, relay_url, sizeof(relay_url));
    PGconn *r = pgtest_connect(relay_url);
    pgtest_expect_error(r, "SELECT count(*) FROM saga.instances", 0, NULL, sqlstate, NULL, 0);
    cr_assert_str_eq(sqlstate, "42501");
    pgtest_expect_error(r,
                        "INSERT INTO saga.outbox (id, topic, event_type, payload) VALUES "
                        "(gen_random_uuid(), 't', 'e', '{}')",
                        0, NULL, sqlstate, NULL, 0);
    cr_assert_str_eq(sqlstate, "42501");
    user_url(&db, op_user, op_url, sizeof(op_url));
    PGconn *op = pgtest_connect(op_url);
    cr_assert_eq(pgtest_count(op, "SELECT count(*) FROM saga.instances", 0, NULL), 1);
    pgtest_expect_error(op, "UPDATE saga.instances SET error = 'x'", 0, NULL, sqlstate, NULL, 0);
    cr_assert_str_eq(sqlstate, "42501");

    /* No password in /metrics, the logs, or the errors of a bad configuration. */
    char *body = NULL;
    cr_assert_eq(e2e_http_get(relay_port, "/metrics", &body), 200);
    cr_assert(!strstr(body, SECRET));
    free(body);
    proc_signal(&relay, SIGTERM);
    proc_signal(&orch, SIGTERM);
    cr_assert(proc_wait_exit(&relay, 20000) && proc_wait_exit(&orch, 20000));
    cr_assert_eq(proc_exit_code(&relay), 0);
    cr_assert_eq(proc_exit_code(&orch), 0);
    assert_no_secret(&relay, "the relay");
    assert_no_secret(&orch, "the orchestrator");

    const char *bad_env[] = {env[4], env[5], "RELAY_OUTBOX_TABLES=nope.outbox",
                             "RELAY_DATABASE_URL", NULL};
    struct proc bad;
    proc_start(&bad, relay_argv, bad_env, &ro);
    cr_assert(proc_wait_exit(&bad, 30000));
    cr_assert_eq(proc_exit_code(&bad), 2);
    char *err = proc_read_stderr(&bad);
    cr_assert(strstr(err, "nope.outbox"), "%s", err);
    free(err);
    assert_no_secret(&bad, "the relay's configuration error");

    PQfinish(r);
    PQfinish(op);
    PQfinish(client);
    proc_cleanup(&orch);
    proc_cleanup(&relay);
    proc_cleanup(&bad);
    devbroker_stop(&b);
    unlink(path_orch);
    unlink(path_relay);
    PQfinish(conn);
    pgtest_db_drop(&db);
}
