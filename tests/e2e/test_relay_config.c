/* End-to-end: the outbox relay's start-up: bad configuration exits 2 with a message on stderr
 * that names the problem and never shows a password; SIGTERM during start-up exits 0. */
#include "relay_e2e.h"

TestSuite(relay_config, .timeout = 120);

#define SECRET "s3cretPW42"

/* Runs the relay with env (NULL-terminated) and argv extras (may be NULL); asserts exit 2
 * within 20 s, that stderr contains every string of expect (NULL-terminated), and that
 * neither stream contains SECRET. */
static void expect_exit_2(const char *const env[], const char *const args[],
                          const char *const expect[])
{
    const char *bin = getenv("SAGA_RELAY_BIN");
    cr_assert(bin && *bin, "SAGA_RELAY_BIN is not set (run the test through meson)");
    const char *argv[16] = {bin};
    size_t n = 1;
    for (size_t i = 0; args && args[i] && n < 15; i++)
        argv[n++] = args[i];
    argv[n] = NULL;
    struct proc p;
    struct proc_options opts = {.name = "badconf"};
    proc_start(&p, argv, env, &opts);
    bool exited = proc_wait_exit(&p, 20000);
    char *out = proc_read_stdout(&p);
    char *err = proc_read_stderr(&p);
    char what[512] = "";
    for (size_t i = 0; env[i]; i++) {
        size_t len = strlen(what);
        snprintf(what + len, sizeof(what) - len, "%s%s", i ? " " : "", env[i]);
    }
    for (size_t i = 0; args && args[i]; i++) {
        size_t len = strlen(what);
        snprintf(what + len, sizeof(what) - len, " %s", args[i]);
    }
    if (!exited)
        proc_kill(&p);
    cr_assert(exited, "[%s] the relay did not exit within 20 s; stdout: %s", what, out);
    cr_assert_eq(proc_exit_code(&p), 2, "[%s] exit %d, expected 2; stderr: %s; stdout: %s", what,
                 proc_exit_code(&p), err, out);
    for (size_t i = 0; expect[i]; i++)
        cr_assert(strstr(err, expect[i]), "[%s] stderr does not say \"%s\": %s", what, expect[i],
                  err);
    cr_assert(!strstr(err, SECRET), "[%s] the password is on stderr: %s", what, err);
    cr_assert(!strstr(out, SECRET), "[%s] the password is on stdout: %s", what, out);
    /* stdout keeps its one-JSON-object-per-line format: the error is logged there too. */
    cr_assert(strstr(out, "\"level\":\"error\""), "[%s] no error logged on stdout: %s", what, out);
    free(out);
    free(err);
    proc_cleanup(&p);
}

/* A free port nobody listens on (bound, then closed). */
static int closed_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof(sa);
    cr_assert(fd >= 0 && !bind(fd, (struct sockaddr *)&sa, sizeof(sa)) &&
              !getsockname(fd, (struct sockaddr *)&sa, &len));
    close(fd);
    return ntohs(sa.sin_port);
}

/* The test database's URL with a password added (trust authentication ignores it). */
static void url_with_secret(const struct pgtest_db *db, char *out, size_t len)
{
    if (!strncmp(db->url, "postgresql://", 13) || !strncmp(db->url, "postgres://", 11))
        snprintf(out, len, "%s%spassword=" SECRET, db->url, strchr(db->url, '?') ? "&" : "?");
    else
        snprintf(out, len, "%s password=" SECRET, db->url);
}

Test(relay_config, bad_settings)
{
    char url[300];
    snprintf(url, sizeof(url), "RELAY_DATABASE_URL=postgresql://postgres:" SECRET "@127.0.0.1:%d/x",
             closed_port());
    const char *brokers = "RELAY_KAFKA_BROKERS=127.0.0.1:9";

    const char *no_brokers[] = {url, "RELAY_KAFKA_BROKERS", NULL};
    expect_exit_2(no_brokers, NULL, (const char *[]){"RELAY_KAFKA_BROKERS", NULL});
    const char *empty_brokers[] = {url, "RELAY_KAFKA_BROKERS=", NULL};
    expect_exit_2(empty_brokers, NULL, (const char *[]){"RELAY_KAFKA_BROKERS", NULL});

    const char *batch_text[] = {url, brokers, "RELAY_BATCH_SIZE=lots", NULL};
    expect_exit_2(batch_text, NULL, (const char *[]){"RELAY_BATCH_SIZE", NULL});
    const char *batch_zero[] = {url, brokers, "RELAY_BATCH_SIZE=0", NULL};
    expect_exit_2(batch_zero, NULL, (const char *[]){"RELAY_BATCH_SIZE", NULL});
    const char *batch_huge[] = {url, brokers, "RELAY_BATCH_SIZE=99999999999999999999", NULL};
    expect_exit_2(batch_huge, NULL, (const char *[]){"RELAY_BATCH_SIZE", NULL});
    const char *poll_bad[] = {url, brokers, "RELAY_POLL_INTERVAL=soon", NULL};
    expect_exit_2(poll_bad, NULL, (const char *[]){"RELAY_POLL_INTERVAL", NULL});
    const char *level_bad[] = {url, brokers, "RELAY_LOG_LEVEL=loud", NULL};
    expect_exit_2(level_bad, NULL, (const char *[]){"RELAY_LOG_LEVEL", NULL});
    const char *admin_bad[] = {url, brokers, "RELAY_ADMIN_ADDR=nowhere", NULL};
    expect_exit_2(admin_bad, NULL, (const char *[]){"RELAY_ADMIN_ADDR", NULL});
    const char *tables_bad[] = {url, brokers, "RELAY_OUTBOX_TABLES=outbox", NULL};
    expect_exit_2(tables_bad, NULL, (const char *[]){"RELAY_OUTBOX_TABLES", NULL});
    const char *tables_twice[] = {url, brokers, "RELAY_OUTBOX_TABLES=a.outbox,a.outbox", NULL};
    expect_exit_2(tables_twice, NULL, (const char *[]){"RELAY_OUTBOX_TABLES", "twice", NULL});
    const char *config_missing[] = {url, brokers, "RELAY_CONFIG=/nonexistent/relay.json", NULL};
    expect_exit_2(config_missing, NULL, (const char *[]){"RELAY_CONFIG", "/nonexistent", NULL});

    const char *plain[] = {url, brokers, NULL};
    expect_exit_2(plain, (const char *[]){"--no-such-flag", NULL},
                  (const char *[]){"--no-such-flag", NULL});
    expect_exit_2(plain, (const char *[]){"--batch-size=-3", NULL},
                  (const char *[]){"batch-size", NULL});
}

Test(relay_config, bad_database_urls)
{
    const char *brokers = "RELAY_KAFKA_BROKERS=127.0.0.1:9";
    char url[300];
    /* Nobody listens: "cannot connect", at once (no retry loop at start-up). */
    snprintf(url, sizeof(url), "RELAY_DATABASE_URL=postgresql://postgres:" SECRET "@127.0.0.1:%d/x",
             closed_port());
    const char *refused[] = {url, brokers, NULL};
    expect_exit_2(refused, NULL, (const char *[]){"cannot connect", "saga.outbox", NULL});
    snprintf(url, sizeof(url),
             "RELAY_DATABASE_URL=host=127.0.0.1 port=%d password=" SECRET " dbname=x",
             closed_port());
    expect_exit_2(refused, NULL, (const char *[]){"cannot connect", NULL});

    const char *bad_uri[] = {"RELAY_DATABASE_URL=postgresql://postgres:" SECRET "@[::1/x", brokers,
                             NULL};
    expect_exit_2(bad_uri, NULL, (const char *[]){"RELAY_DATABASE_URL", "malformed", NULL});
    const char *bad_conninfo[] = {"RELAY_DATABASE_URL=host=127.0.0.1 password=" SECRET " dbname",
                                  brokers, NULL};
    expect_exit_2(bad_conninfo, NULL, (const char *[]){"RELAY_DATABASE_URL", "malformed", NULL});
    const char *bad_key[] = {"RELAY_DATABASE_URL=host=127.0.0.1 password=" SECRET " colour=red",
                             brokers, NULL};
    expect_exit_2(bad_key, NULL, (const char *[]){"RELAY_DATABASE_URL", "colour", NULL});
}

Test(relay_config, bad_tables)
{
    struct pgtest_db db;
    PGconn *conn = pgtest_fresh(&db, true);
    pgtest_exec(conn, "CREATE SCHEMA wrong; "
                      "CREATE TABLE wrong.outbox (id uuid PRIMARY KEY, "
                      "seq bigint GENERATED ALWAYS AS IDENTITY, topic text NOT NULL, key text, "
                      "event_type text NOT NULL, payload text NOT NULL, "
                      "headers jsonb NOT NULL DEFAULT '{}', "
                      "created_at timestamptz NOT NULL DEFAULT now()); "
                      "CREATE TABLE wrong.outbox_dead_letters (LIKE saga.outbox_dead_letters); "
                      "CREATE SCHEMA nodl; CREATE TABLE nodl.outbox (LIKE saga.outbox); "
                      "CREATE SCHEMA noseq; CREATE TABLE noseq.outbox (id uuid, topic text, "
                      "key text, event_type text, payload jsonb, headers jsonb, "
                      "created_at timestamptz); "
                      "CREATE TABLE noseq.outbox_dead_letters (LIKE saga.outbox_dead_letters)");
    char url[1200];
    snprintf(url, sizeof(url), "RELAY_DATABASE_URL=");
    url_with_secret(&db, url + strlen(url), sizeof(url) - strlen(url));
    const char *brokers = "RELAY_KAFKA_BROKERS=127.0.0.1:9";

    const char *missing[] = {url, brokers, "RELAY_OUTBOX_TABLES=nosuch.outbox", NULL};
    expect_exit_2(missing, NULL, (const char *[]){"nosuch.outbox", "does not exist", NULL});
    const char *wrong_type[] = {url, brokers, "RELAY_OUTBOX_TABLES=wrong.outbox", NULL};
    expect_exit_2(wrong_type, NULL,
                  (const char *[]){"wrong.outbox", "payload", "text", "jsonb", NULL});
    const char *no_dead[] = {url, brokers, "RELAY_OUTBOX_TABLES=nodl.outbox", NULL};
    expect_exit_2(no_dead, NULL,
                  (const char *[]){"nodl.outbox_dead_letters", "does not exist", NULL});
    const char *no_seq[] = {url, brokers, "RELAY_OUTBOX_TABLES=noseq.outbox", NULL};
    expect_exit_2(no_seq, NULL, (const char *[]){"noseq.outbox", "seq", "missing", NULL});
    /* The good table first, the bad one second: still refused as a whole. */
    const char *second_bad[] = {url, brokers, "RELAY_OUTBOX_TABLES=saga.outbox,wrong.outbox", NULL};
    expect_exit_2(second_bad, NULL, (const char *[]){"wrong.outbox", "payload", NULL});

    /* KAFKA_* variables librdkafka rejects: an unknown property, a bad value. */
    const char *unknown_prop[] = {url, brokers, "KAFKA_NO_SUCH_PROPERTY=1", NULL};
    expect_exit_2(unknown_prop, NULL, (const char *[]){"KAFKA_NO_SUCH_PROPERTY", NULL});
    const char *bad_value[] = {url, brokers, "KAFKA_ACKS=banana", NULL};
    expect_exit_2(bad_value, NULL, (const char *[]){"KAFKA_ACKS", NULL});
    const char *bad_enum[] = {url, brokers, "KAFKA_COMPRESSION_TYPE=zip", NULL};
    expect_exit_2(bad_enum, NULL, (const char *[]){"KAFKA_COMPRESSION_TYPE", NULL});
    PQfinish(conn);
    pgtest_db_drop(&db);
}

/* SIGTERM while the relay is still starting (here: its database does not answer yet) ends it
 * with status 0, as a SIGTERM at any other time does. */
Test(relay_config, sigterm_during_startup_exits_0)
{
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof(sa);
    cr_assert(lfd >= 0 && !bind(lfd, (struct sockaddr *)&sa, sizeof(sa)) && !listen(lfd, 4) &&
              !getsockname(lfd, (struct sockaddr *)&sa, &len));
    char url[200];
    snprintf(url, sizeof(url), "RELAY_DATABASE_URL=postgresql://postgres@127.0.0.1:%d/x",
             ntohs(sa.sin_port));
    const char *bin = getenv("SAGA_RELAY_BIN");
    cr_assert(bin && *bin);
    const char *argv[] = {bin, NULL};
    const char *env[] = {url, "RELAY_KAFKA_BROKERS=127.0.0.1:9", "RELAY_ADMIN_ADDR=127.0.0.1:0",
                         NULL};
    struct proc p;
    struct proc_options opts = {.name = "earlyterm"};
    proc_start(&p, argv, env, &opts);
    /* The relay has connected and waits for the server's answer that never comes. */
    struct pollfd pfd = {lfd, POLLIN, 0};
    cr_assert_eq(poll(&pfd, 1, 15000), 1, "the relay did not connect to the database");
    int cfd = accept(lfd, NULL, NULL);
    cr_assert(cfd >= 0);
    proc_signal(&p, SIGTERM);
    bool exited = proc_wait_exit(&p, 8000);
    if (!exited)
        proc_kill(&p);
    cr_assert(exited, "the relay did not exit within 8 s of SIGTERM");
    cr_assert_eq(proc_exit_code(&p), 0, "exit %d after SIGTERM during start-up, expected 0",
                 proc_exit_code(&p));
    close(cfd);
    close(lfd);
    proc_cleanup(&p);
}
