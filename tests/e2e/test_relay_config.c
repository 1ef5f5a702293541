/* End-to-end: the outbox relay's start-up: bad configuration exits 2 with a message on stderr
 * that names the problem and never shows a password; SIGTERM during start-up exits 0. And
 * SIGHUP: RELAY_CONFIG read again, tables added and removed while the others run on, a bad
 * file rejected as a whole. */
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

/* ---- SIGHUP ------------------------------------------------------------------------------ */

/* Writes RELAY_CONFIG: one source, e's database, with the tables given (NULL-terminated). The
 * file is written aside and renamed over, as a deployment would, so the relay never reads a
 * half-written file. */
static void write_config(const char *path, const struct e2e *e, const char *const tables[])
{
    char tmp[300];
    snprintf(tmp, sizeof(tmp), "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    cr_assert(f, "cannot write %s", tmp);
    fprintf(f, "{\"sources\": [{\"name\": \"main\", \"database_url\": \"%s\", \"tables\": [",
            e->db.url);
    for (size_t i = 0; tables[i]; i++)
        fprintf(f, "%s\"%s\"", i ? ", " : "", tables[i]);
    fprintf(f, "]}]}\n");
    cr_assert(!fclose(f));
    cr_assert(!rename(tmp, path));
}

static void write_text(const char *path, const char *text)
{
    char tmp[300];
    snprintf(tmp, sizeof(tmp), "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    cr_assert(f, "cannot write %s", tmp);
    fputs(text, f);
    cr_assert(!fclose(f));
    cr_assert(!rename(tmp, path));
}

/* Starts the relay with RELAY_CONFIG=path alone (no RELAY_DATABASE_URL, no
 * RELAY_OUTBOX_TABLES) and more env (NULL-terminated, may be NULL). */
static void start_with_config(struct e2e *e, struct proc *p, const char *path,
                              const char *const more[])
{
    static char config[320];
    snprintf(config, sizeof(config), "RELAY_CONFIG=%s", path);
    const char *env[16] = {config, "RELAY_DATABASE_URL", "RELAY_OUTBOX_TABLES"};
    size_t n = 3;
    for (size_t i = 0; more && more[i] && n < 15; i++)
        env[n++] = more[i];
    env[n] = NULL;
    e2e_relay_start(e, p, env);
}

/* As e2e_start, with RELAY_CONFIG=path (see start_with_config): a consumer of both topics,
 * the relay, its admin port. run's consumer and relay are the caller's to end (e2e_finish). */
static void start_run_with_config(struct e2e *e, struct e2e_run *run, const char *path,
                                  const char *const more[])
{
    run->c = e2e_consume(e);
    start_with_config(e, &run->relay, path, more);
    run->port = e2e_admin_port(&run->relay);
}

/* Waits (15 s each) for times more lines of p's log with needle, from *from on (moved past
 * them). */
static void wait_log_times(struct proc *p, const char *needle, int times, size_t *from)
{
    for (int i = 0; i < times; i++)
        cr_assert(proc_wait_log(p, needle, from, 15000, NULL, 0), "\"%s\": %d of %d lines", needle,
                  i, times);
}

/* Lines of the relay's log where it starts leading the table (the message, then its field). */
static size_t leading_lines(const struct proc *p, const char *table)
{
    char needle[200];
    snprintf(needle, sizeof(needle), "leading: publishing this table\",\"table\":\"%s\"", table);
    return proc_count_log(p, needle);
}

/* Inserts rows [from, to) of the model into table. */
static void insert_into(struct e2e *e, const char *table, long from, long to)
{
    snprintf(e->table, sizeof(e->table), "%s", table);
    e2e_insert(e, from, to);
}

/* The relay's metric series, or -1. */
static double metric_now(int port, const char *series)
{
    char *body;
    int status = e2e_http_get(port, "/metrics", &body);
    double v = status == 200 ? e2e_metric(body, series) : -2;
    free(body);
    return v;
}

/* Granted holders of the relay's leader lock of schema.table in e's database (outbox_sql.c: a
 * 64-bit FNV-1a hash of "saga-relay:schema.table", a bigint advisory lock, so classid is its
 * high half; other tests' databases have the same keys). */
static long lock_holders(struct e2e *e, const char *table)
{
    uint64_t h = 1469598103934665603ULL;
    char key[200];
    snprintf(key, sizeof(key), "saga-relay:%s", table);
    for (const char *p = key; *p; p++)
        h = (h ^ (unsigned char)*p) * 1099511628211ULL;
    char classid[24], objid[24];
    snprintf(classid, sizeof(classid), "%" PRIu32, (uint32_t)(h >> 32));
    snprintf(objid, sizeof(objid), "%" PRIu32, (uint32_t)h);
    const char *params[] = {classid, objid};
    return pgtest_count(e->conn,
                        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                        "AND classid = $1::oid AND objid = $2::oid AND objsubid = 1 AND database = "
                        "(SELECT oid FROM pg_database WHERE datname = current_database())",
                        2, params);
}

/* Rows [0, total) not in the table (deleted): have they all been consumed? (A predicate for
 * kconsumer_wait_until.) */
struct deleted_rows {
    long total;
    unsigned char *in_table, *seen;
    size_t processed; /* messages looked at */
    long count;       /* deleted rows consumed */
};

static bool deleted_rows_seen(struct kmsg *const *msgs, size_t n, void *arg)
{
    struct deleted_rows *d = arg;
    long deleted = 0;
    for (long g = 0; g < d->total; g++)
        deleted += !d->in_table[g];
    for (; d->processed < n; d->processed++) {
        long g = id_row(kmsg_header(msgs[d->processed], "message-id", NULL));
        if (g >= 0 && g < d->total && !d->in_table[g] && !d->seen[g]) {
            d->seen[g] = 1;
            d->count++;
        }
    }
    return d->count >= deleted;
}

/* (a) A table added to the file and SIGHUP: it is published; the table already published is
 * not touched (it never leads a second time, never reconnects). */
Test(relay_config, sighup_adds_a_table)
{
    struct e2e e;
    e2e_setup(&e, "hupadd", 10);
    pgtest_exec(e.conn, "SELECT saga.create_outbox('inventory')");
    char path[256];
    snprintf(path, sizeof(path), "/tmp/saga-e2e-%d-hup-add.json", (int)getpid());
    write_config(path, &e, (const char *[]){"saga.outbox", NULL});
    struct e2e_run run;
    start_run_with_config(&e, &run, path, NULL);
    cr_assert(proc_wait_log(&run.relay, "leading: publishing", NULL, 15000, NULL, 0));
    insert_into(&e, "saga.outbox", 0, 200);
    cr_assert(e2e_wait_all(run.c, 200, 30000, NULL), "saga.outbox is not published");
    /* Rows of the second table before it is in the file stay there. */
    insert_into(&e, "inventory.outbox", 200, 400);

    write_config(path, &e, (const char *[]){"saga.outbox", "inventory.outbox", NULL});
    size_t from = 0;
    proc_signal(&run.relay, SIGHUP);
    char line[2048];
    if (!proc_wait_log(&run.relay, "sources reloaded", &from, 15000, line, sizeof(line))) {
        proc_dump(&run.relay, "relay", 6000);
        cr_assert_fail("no reload logged within 15 s of SIGHUP");
    }
    cr_assert(strstr(line, "\"added\":\"1\"") && strstr(line, "\"removed\":\"0\"") &&
                  strstr(line, "\"unchanged\":\"1\"") && strstr(line, "inventory.outbox") &&
                  strstr(line, "\"level\":\"info\""),
              "%s", line);
    insert_into(&e, "inventory.outbox", 400, 600);
    insert_into(&e, "saga.outbox", 600, 800);
    long distinct = 0;
    if (!e2e_wait_all(run.c, 800, 30000, &distinct)) {
        proc_dump(&run.relay, "relay", 6000);
        cr_assert_fail("%ld of 800 rows arrived after the table was added", distinct);
    }
    cr_assert(e2e_wait_table_empty(&e, "inventory.outbox", 20000));
    cr_assert(e2e_wait_table_empty(&e, "saga.outbox", 20000));
    e2e_verify_opts(&e, run.c, 800, true, false);
    cr_assert_eq(leading_lines(&run.relay, "inventory.outbox"), 1);
    cr_assert_eq(leading_lines(&run.relay, "saga.outbox"), 1, "saga.outbox led again after SIGHUP");
    cr_assert_eq(proc_count_log(&run.relay, "lost the"), 0, "a session was lost");
    /* No reconnect: the counter is absent (never counted) or 0; -2 would be a failed GET. */
    double reconnects =
        metric_now(run.port, e2e_series(&e, "relay_db_reconnects_total{table=\"saga.outbox\"}"));
    cr_assert(reconnects == 0 || reconnects == -1, "relay_db_reconnects_total is %g", reconnects);
    cr_assert_eq(metric_now(run.port, "relay_config_reloads_total{result=\"ok\"}"), 1.0);
    char *body = e2e_wait_ready(run.port, 15000);
    cr_assert(strstr(body, "saga.outbox leading") && strstr(body, "inventory.outbox leading"), "%s",
              body);
    free(body);
    e2e_finish(&e, &run);
    unlink(path);
}

/* (b) A table removed from the file and SIGHUP while rows of it are in flight (every broker
 * response is delayed): it stops claiming, what it claimed is acknowledged and deleted, then
 * it lets the table go (its lock is free); rows inserted afterwards stay in the table, and
 * another relay publishes them, each row exactly once in all. The other table runs on. */
Test(relay_config, sighup_removes_a_table)
{
    struct e2e e;
    e2e_setup(&e, "hupdel", 10);
    pgtest_exec(e.conn, "SELECT saga.create_outbox('inventory')");
    char path[256];
    snprintf(path, sizeof(path), "/tmp/saga-e2e-%d-hup-del.json", (int)getpid());
    write_config(path, &e, (const char *[]){"saga.outbox", "inventory.outbox", NULL});
    struct e2e_run run;
    const char *env[] = {"RELAY_BATCH_SIZE=50", "RELAY_MAX_INFLIGHT=200", NULL};
    start_run_with_config(&e, &run, path, env);
    size_t from = 0;
    wait_log_times(&run.relay, "leading: publishing", 2, &from);
    cr_assert_eq(lock_holders(&e, "inventory.outbox"), 1);

    devbroker_command(&e.broker, "rtt 1 300");
    const long first = 3000;
    insert_into(&e, "inventory.outbox", 0, first);
    /* Wait (bounded) until /readyz shows rows of inventory.outbox in flight. */
    bool inflight = false;
    for (int64_t deadline = proc_now_ms() + 20000; !inflight && proc_now_ms() < deadline;) {
        char *body;
        if (e2e_http_get(run.port, "/readyz", &body)) {
            const char *at = body ? strstr(body, "inventory.outbox leading inflight=") : NULL;
            inflight = at && atol(at + strlen("inventory.outbox leading inflight=")) > 0;
        }
        free(body);
        if (!inflight) {
            struct timespec ts = {0, 20 * 1000000L};
            nanosleep(&ts, NULL);
        }
    }
    cr_assert(inflight, "no row of inventory.outbox in flight within 20 s");

    write_config(path, &e, (const char *[]){"saga.outbox", NULL});
    proc_signal(&run.relay, SIGHUP);
    char line[2048];
    if (!proc_wait_log(&run.relay, "sources reloaded", &from, 15000, line, sizeof(line))) {
        proc_dump(&run.relay, "relay", 6000);
        cr_assert_fail("no reload logged within 15 s of SIGHUP");
    }
    cr_assert(strstr(line, "\"added\":\"0\"") && strstr(line, "\"removed\":\"1\"") &&
                  strstr(line, "\"unchanged\":\"1\""),
              "%s", line);
    if (!proc_wait_log(&run.relay, "letting the table go", &from, 30000, line, sizeof(line))) {
        proc_dump(&run.relay, "relay", 6000);
        cr_assert_fail("the removed table was not let go within 30 s");
    }
    cr_assert(strstr(line, "every claimed row is acknowledged and deleted") &&
                  strstr(line, "inventory.outbox"),
              "%s", line);
    /* The lock is free (the server ends the closed session on its own time: bounded wait),
     * the other table's is not. */
    long holders = 1;
    for (int64_t deadline = proc_now_ms() + 10000;
         (holders = lock_holders(&e, "inventory.outbox")) && proc_now_ms() < deadline;) {
        struct timespec ts = {0, 20 * 1000000L};
        nanosleep(&ts, NULL);
    }
    cr_assert_eq(holders, 0, "the removed table's lock is still held after 10 s");
    cr_assert_eq(lock_holders(&e, "saga.outbox"), 1);
    devbroker_command(&e.broker, "rtt 1 0");

    /* Every row deleted was published (the consumer may lag: wait, bounded, for them), and no
     * row still in the table was. */
    struct deleted_rows d = {first, calloc((size_t)first, 1), calloc((size_t)first, 1), 0, 0};
    cr_assert(d.in_table && d.seen);
    PGresult *res = pgtest_query(e.conn, "SELECT id::text FROM inventory.outbox", 0, NULL);
    long left = PQntuples(res);
    for (long i = 0; i < left; i++) {
        long g = id_row(PQgetvalue(res, (int)i, 0));
        cr_assert(g >= 0 && g < first, "row %ld in inventory.outbox", g);
        d.in_table[g] = 1;
    }
    PQclear(res);
    cr_assert(left < first, "nothing of inventory.outbox was deleted");
    if (!kconsumer_wait_until(run.c, deleted_rows_seen, &d, 20000))
        cr_assert_fail("%ld of the %ld rows deleted from inventory.outbox were published", d.count,
                       first - left);
    size_t n;
    struct kmsg **msgs = kconsumer_snapshot(run.c, &n);
    for (size_t i = 0; i < n; i++) {
        long g = id_row(kmsg_header(msgs[i], "message-id", NULL));
        cr_assert(g < 0 || g >= first || !d.in_table[g],
                  "row %ld is published and still in the table", g);
    }
    free(msgs);
    free(d.in_table);
    free(d.seen);

    /* Rows inserted now stay in the removed table while the other table is published. */
    insert_into(&e, "inventory.outbox", first, first + 100);
    insert_into(&e, "saga.outbox", first + 100, first + 200);
    cr_assert(e2e_wait_table_empty(&e, "saga.outbox", 20000), "saga.outbox no longer published");
    cr_assert_eq(e2e_table_count(&e, "inventory.outbox"), left + 100);
    cr_assert_eq(leading_lines(&run.relay, "saga.outbox"), 1, "saga.outbox led again after SIGHUP");

    /* Another relay takes the table over and publishes the rest: each row exactly once. */
    struct proc second;
    const char *env2[] = {"RELAY_OUTBOX_TABLES=inventory.outbox", "RELAY_CONFIG", NULL};
    e2e_relay_start(&e, &second, env2);
    cr_assert(proc_wait_log(&second, "leading: publishing", NULL, 15000, NULL, 0),
              "the second relay does not take the table");
    long distinct = 0;
    if (!e2e_wait_all(run.c, first + 200, 30000, &distinct)) {
        proc_dump(&second, "second relay", 6000);
        cr_assert_fail("%ld of %ld rows arrived", distinct, first + 200);
    }
    cr_assert(e2e_wait_table_empty(&e, "inventory.outbox", 20000));
    e2e_verify_opts(&e, run.c, first + 200, true, false);
    cr_assert_eq(metric_now(run.port, "relay_config_reloads_total{result=\"ok\"}"), 1.0);
    e2e_relay_stop(&second);
    e2e_relay_stop(&run.relay);
    proc_cleanup(&second);
    proc_cleanup(&run.relay);
    unlink(path);
    kconsumer_stop(run.c);
    e2e_teardown(&e);
}

/* (b') A table removed while the broker is away: its rows cannot be acknowledged, so at
 * RELAY_DRAIN_TIMEOUT it lets the table go anyway (its lock is free at once), with its
 * messages still in the producer. When the broker is back they are delivered, and their
 * reports reach the released table, which frees itself and deletes nothing (the rows stay:
 * whoever leads the table now publishes them again, same message-id). The other table runs
 * on; the relay exits 0. */
Test(relay_config, sighup_removes_a_table_while_the_broker_is_down)
{
    struct e2e e;
    e2e_setup(&e, "hupdown", 10);
    pgtest_exec(e.conn, "SELECT saga.create_outbox('inventory')");
    char path[256];
    snprintf(path, sizeof(path), "/tmp/saga-e2e-%d-hup-down.json", (int)getpid());
    write_config(path, &e, (const char *[]){"saga.outbox", "inventory.outbox", NULL});
    struct e2e_run run;
    run.c = e2e_consume(&e);
    const char *env[] = {"RELAY_DRAIN_TIMEOUT=1s", "RELAY_LOG_LEVEL=debug", NULL};
    start_with_config(&e, &run.relay, path, env);
    size_t from = 0;
    wait_log_times(&run.relay, "leading: publishing", 2, &from);
    /* Both topics known to the producer before the broker goes. */
    insert_into(&e, "saga.outbox", 0, 100);
    cr_assert(e2e_wait_all(run.c, 100, 30000, NULL));

    devbroker_command(&e.broker, "down 1");
    /* A transaction left open with a row of inventory.outbox: a hole below the rows after it. */
    PGconn *open_tx = PQconnectdb(e.db.url);
    cr_assert_eq(PQstatus(open_tx), CONNECTION_OK);
    const char *hole_params[] = {e.topic_a};
    PQclear(pgtest_query(open_tx, "BEGIN", 0, NULL));
    PQclear(pgtest_query(open_tx,
                         "INSERT INTO inventory.outbox (id, topic, key, event_type, payload) "
                         "VALUES ('" E2E_EXTRA_ID_PREFIX "0000-4000-8000-000000000001', $1, "
                         "'kx', 'Ev', '{}')",
                         1, hole_params));
    insert_into(&e, "inventory.outbox", 100, 300);
    /* Claimed (so in the producer): wait (bounded) for the claim counter. */
    run.port = e2e_admin_port(&run.relay);
    cr_assert(e2e_wait_metric(
                  run.port, e2e_series(&e, "relay_rows_claimed_total{table=\"inventory.outbox\"}"),
                  200, 20000),
              "the rows of inventory.outbox were not claimed");
    /* The gauges of the table, measured (the backlog every 5 s). */
    static const char *const gauges[] = {
        "relay_backlog_rows{table=\"inventory.outbox\"}",
        "relay_backlog_oldest_seconds{table=\"inventory.outbox\"}",
        "relay_claim_holes{table=\"inventory.outbox\"}",
        "relay_table_leader{table=\"inventory.outbox\"}",
    };
    static const double measured[] = {200, 1, 1, 1};
    for (size_t i = 0; i < sizeof(gauges) / sizeof(gauges[0]); i++) {
        const char *series = e2e_series(&e, gauges[i]);
        cr_assert(e2e_wait_metric(run.port, series, measured[i], 20000),
                  "%s never reached %g (now %g)", series, measured[i],
                  metric_now(run.port, series));
    }
    write_config(path, &e, (const char *[]){"saga.outbox", NULL});
    proc_signal(&run.relay, SIGHUP);
    char line[2048];
    if (!proc_wait_log(&run.relay, "letting the table go", &from, 20000, line, sizeof(line))) {
        proc_dump(&run.relay, "relay", 6000);
        cr_assert_fail("the removed table was not let go within 20 s");
    }
    cr_assert(strstr(line, "drain timeout") && strstr(line, "\"level\":\"warn\""), "%s", line);
    /* /metrics no longer reports the removed table as having rows waiting or holes, nor as
     * led: its gauges read 0 (a series cannot be removed; they are set when it is let go). */
    for (size_t i = 0; i < sizeof(gauges) / sizeof(gauges[0]); i++) {
        const char *series = e2e_series(&e, gauges[i]);
        cr_assert(metric_now(run.port, series) == 0, "%s is %g after the table was let go", series,
                  metric_now(run.port, series));
    }
    long holders = 1;
    for (int64_t deadline = proc_now_ms() + 10000;
         (holders = lock_holders(&e, "inventory.outbox")) && proc_now_ms() < deadline;) {
        struct timespec ts = {0, 20 * 1000000L};
        nanosleep(&ts, NULL);
    }
    cr_assert_eq(holders, 0, "the removed table's lock is still held after 10 s");
    cr_assert_eq(proc_count_log(&run.relay, "removed table freed"), 0,
                 "freed while its messages are in the producer");

    devbroker_command(&e.broker, "up 1");
    insert_into(&e, "saga.outbox", 300, 400);
    if (!proc_wait_log(&run.relay, "removed table freed", &from, 60000, NULL, 0)) {
        proc_dump(&run.relay, "relay", 6000);
        cr_assert_fail("the removed table was not freed within 60 s of the broker's return");
    }
    /* Its rows were delivered after it let go: none was deleted. */
    PQclear(pgtest_query(open_tx, "ROLLBACK", 0, NULL));
    PQfinish(open_tx);
    cr_assert_eq(e2e_table_count(&e, "inventory.outbox"), 200);
    cr_assert(e2e_wait_table_empty(&e, "saga.outbox", 30000), "saga.outbox is not published");
    long distinct = 0;
    if (!e2e_wait_all(run.c, 300, 30000, &distinct))
        cr_assert_fail("%ld of 300 rows arrived", distinct); /* inventory's late deliveries */
    e2e_finish(&e, &run);
    unlink(path);
}

/* (c) A broken file and SIGHUP: an ERROR naming the file and the place in it, nothing changes,
 * the tables keep being published. Also a file whose new table does not exist (the check of
 * start-up): rejected as a whole, though its other table is fine. */
Test(relay_config, sighup_rejects_a_broken_file)
{
    struct e2e e;
    e2e_setup(&e, "hupbad", 10);
    char path[256];
    snprintf(path, sizeof(path), "/tmp/saga-e2e-%d-hup-bad.json", (int)getpid());
    write_config(path, &e, (const char *[]){"saga.outbox", NULL});
    struct e2e_run run;
    start_run_with_config(&e, &run, path, NULL);
    size_t from = 0;
    cr_assert(proc_wait_log(&run.relay, "leading: publishing", &from, 15000, NULL, 0));
    insert_into(&e, "saga.outbox", 0, 100);
    cr_assert(e2e_wait_all(run.c, 100, 30000, NULL));

    char text[2048];
    snprintf(text, sizeof(text),
             "{\"sources\": [{\"database_url\": \"%s\", \"tables\": [\"saga.outbox\"],\n"
             "  \"colour\": \"red\"}]}\n",
             e.db.url);
    write_text(path, text);
    proc_signal(&run.relay, SIGHUP);
    char line[4096];
    if (!proc_wait_log(&run.relay, "RELAY_CONFIG rejected", &from, 15000, line, sizeof(line))) {
        proc_dump(&run.relay, "relay", 6000);
        cr_assert_fail("no rejection logged within 15 s of SIGHUP");
    }
    cr_assert(strstr(line, "\"level\":\"error\"") && strstr(line, path) &&
                  strstr(line, "$.sources[0].colour"),
              "%s", line);

    write_text(path, "{\"sources\": [\n");
    proc_signal(&run.relay, SIGHUP);
    if (!proc_wait_log(&run.relay, "RELAY_CONFIG rejected", &from, 15000, line, sizeof(line)))
        cr_assert_fail("no rejection of invalid JSON logged within 15 s of SIGHUP");
    cr_assert(strstr(line, path) && strstr(line, "invalid JSON"), "%s", line);

    write_config(path, &e, (const char *[]){"saga.outbox", "nosuch.outbox", NULL});
    proc_signal(&run.relay, SIGHUP);
    if (!proc_wait_log(&run.relay, "RELAY_CONFIG rejected", &from, 15000, line, sizeof(line)))
        cr_assert_fail("no rejection of a missing table logged within 15 s of SIGHUP");
    cr_assert(strstr(line, path) && strstr(line, "nosuch.outbox") && strstr(line, "does not exist"),
              "%s", line);
    char place[600];
    snprintf(place, sizeof(place), "%s: $.sources[0].tables[1]: table nosuch.outbox", path);
    cr_assert(strstr(line, place), "the error does not say \"%s\": %s", place, line);

    /* Still publishing, never reloaded, never led again. */
    insert_into(&e, "saga.outbox", 100, 300);
    long distinct = 0;
    if (!e2e_wait_all(run.c, 300, 30000, &distinct)) {
        proc_dump(&run.relay, "relay", 6000);
        cr_assert_fail("%ld of 300 rows arrived after the rejected reloads", distinct);
    }
    cr_assert(e2e_wait_table_empty(&e, "saga.outbox", 20000));
    e2e_verify(&e, run.c, 300, true);
    cr_assert_eq(proc_count_log(&run.relay, "sources reloaded"), 0);
    cr_assert_eq(leading_lines(&run.relay, "saga.outbox"), 1);
    cr_assert_eq(metric_now(run.port, "relay_config_reloads_total{result=\"error\"}"), 3.0);
    cr_assert(metric_now(run.port, "relay_config_reloads_total{result=\"ok\"}") <= 0);
    e2e_finish(&e, &run);
    unlink(path);
}

/* ---- a database that never answers -------------------------------------------------------- */

/* A "database" on a listening socket of the test: it accepts one connection, completes the
 * start-up (AuthenticationOk, ReadyForQuery: no password, no TLS) and then reads the first
 * query and never answers it. Every wait is bounded; fails the test otherwise. */
struct silent_db {
    int lfd, cfd;
    int port;
};

static void silent_db_listen(struct silent_db *s)
{
    s->cfd = -1;
    s->lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof(sa);
    cr_assert(s->lfd >= 0 && !bind(s->lfd, (struct sockaddr *)&sa, sizeof(sa)) &&
              !listen(s->lfd, 4) && !getsockname(s->lfd, (struct sockaddr *)&sa, &len));
    s->port = ntohs(sa.sin_port);
}

/* Reads exactly n bytes from fd, each wait bounded by timeout_ms. */
static bool read_exact(int fd, void *buf, size_t n, int timeout_ms)
{
    size_t got = 0;
    while (got < n) {
        struct pollfd pfd = {fd, POLLIN, 0};
        if (poll(&pfd, 1, timeout_ms) != 1)
            return false;
        ssize_t r = read(fd, (char *)buf + got, n - got);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return false;
        got += (size_t)r;
    }
    return true;
}

/* Accepts the relay's connection, answers its start-up, and waits for its first query. */
static void silent_db_serve(struct silent_db *s)
{
    struct pollfd pfd = {s->lfd, POLLIN, 0};
    cr_assert_eq(poll(&pfd, 1, 15000), 1, "the relay did not connect to the silent database");
    s->cfd = accept(s->lfd, NULL, NULL);
    cr_assert(s->cfd >= 0);
    unsigned char head[4];
    cr_assert(read_exact(s->cfd, head, 4, 15000), "no start-up packet");
    uint32_t len =
        (uint32_t)head[0] << 24 | (uint32_t)head[1] << 16 | (uint32_t)head[2] << 8 | head[3];
    cr_assert(len > 8 && len < 10000, "start-up packet of %u bytes", len);
    char body[10000];
    cr_assert(read_exact(s->cfd, body, len - 4, 15000), "short start-up packet");
    cr_assert(body[0] == 0 && body[1] == 3, "not a protocol 3 start-up packet (TLS or GSS?)");
    static const char ready[] = {'R', 0, 0, 0, 8, 0,  0, 0, 0, /* AuthenticationOk */
                                 'Z', 0, 0, 0, 5, 'I'};        /* ReadyForQuery */
    proc_write_all(s->cfd, ready, sizeof(ready));
    /* The query's first bytes: from now on the relay waits for an answer. */
    cr_assert(read_exact(s->cfd, head, 1, 15000), "no query after the start-up");
}

static void silent_db_close(struct silent_db *s)
{
    if (s->cfd >= 0)
        close(s->cfd);
    close(s->lfd);
}

/* SIGTERM while a SIGHUP reload checks a table of a database that accepted the connection and
 * never answers the check's query: the relay exits 0 at once, leaving the check behind (its
 * result would not be applied anyway), instead of waiting for it. */
Test(relay_config, sigterm_during_a_stuck_reload_exits_0)
{
    struct e2e e;
    e2e_setup(&e, "hupstuck", 10);
    struct silent_db silent;
    silent_db_listen(&silent);
    char path[256];
    snprintf(path, sizeof(path), "/tmp/saga-e2e-%d-hup-stuck.json", (int)getpid());
    write_config(path, &e, (const char *[]){"saga.outbox", NULL});
    struct proc relay;
    start_with_config(&e, &relay, path, NULL);
    cr_assert(proc_wait_log(&relay, "leading: publishing", NULL, 15000, NULL, 0));

    char text[2048];
    snprintf(text, sizeof(text),
             "{\"sources\": [{\"database_url\": \"%s\", \"tables\": [\"saga.outbox\"]},\n"
             "  {\"database_url\": \"postgresql://postgres@127.0.0.1:%d/silent?sslmode=disable"
             "&gssencmode=disable\", \"tables\": [\"saga.outbox\"]}]}\n",
             e.db.url, silent.port);
    write_text(path, text);
    proc_signal(&relay, SIGHUP);
    silent_db_serve(&silent);
    proc_signal(&relay, SIGTERM);
    bool exited = proc_wait_exit(&relay, 15000);
    if (!exited) {
        proc_kill(&relay);
        proc_dump(&relay, "relay", 6000);
    }
    cr_assert(exited, "the relay did not exit within 15 s of SIGTERM during a stuck reload");
    cr_assert_eq(proc_exit_code(&relay), 0, "exit %d", proc_exit_code(&relay));
    cr_assert_eq(proc_count_log(&relay, "the reload is abandoned"), 1,
                 "the relay did not leave the stuck reload behind");
    cr_assert_eq(proc_count_log(&relay, "sources reloaded"), 0);
    silent_db_close(&silent);
    proc_cleanup(&relay);
    unlink(path);
    e2e_teardown(&e);
}

/* A table removed from the file of a relay that stands by for it (another relay leads it):
 * the line that lets it go says there was nothing to drain, not that claimed rows were
 * acknowledged and deleted (it claimed none). The leader is not touched. */
Test(relay_config, sighup_removes_a_standby_table)
{
    struct e2e e;
    e2e_setup(&e, "hupstandby", 10);
    pgtest_exec(e.conn, "SELECT saga.create_outbox('inventory')");
    char path_a[256], path_b[256];
    snprintf(path_a, sizeof(path_a), "/tmp/saga-e2e-%d-hup-standby-a.json", (int)getpid());
    snprintf(path_b, sizeof(path_b), "/tmp/saga-e2e-%d-hup-standby-b.json", (int)getpid());
    write_config(path_a, &e, (const char *[]){"saga.outbox", "inventory.outbox", NULL});
    write_config(path_b, &e, (const char *[]){"saga.outbox", "inventory.outbox", NULL});
    struct proc leader, standby;
    start_with_config(&e, &leader, path_a, NULL);
    size_t from = 0;
    wait_log_times(&leader, "leading: publishing", 2, &from);
    start_with_config(&e, &standby, path_b, NULL);
    from = 0;
    wait_log_times(&standby, "standing by", 2, &from);

    write_config(path_b, &e, (const char *[]){"saga.outbox", NULL});
    proc_signal(&standby, SIGHUP);
    char line[2048];
    if (!proc_wait_log(&standby, "letting the table go", &from, 15000, line, sizeof(line))) {
        proc_dump(&standby, "standby relay", 6000);
        cr_assert_fail("the removed table was not let go within 15 s");
    }
    cr_assert(strstr(line, "inventory.outbox") && strstr(line, "\"level\":\"info\""), "%s", line);
    cr_assert(strstr(line, "not leading this table (standby)") &&
                  strstr(line, "nothing is to drain") && strstr(line, "\"role\":\"standby\""),
              "%s", line);
    cr_assert(!strstr(line, "acknowledged and deleted"), "%s", line);
    cr_assert_eq(leading_lines(&standby, "inventory.outbox"), 0);
    cr_assert_eq(lock_holders(&e, "inventory.outbox"), 1, "the leader lost its lock");
    e2e_relay_stop(&standby);
    e2e_relay_stop(&leader);
    proc_cleanup(&standby);
    proc_cleanup(&leader);
    unlink(path_a);
    unlink(path_b);
    e2e_teardown(&e);
}

/* At start, a table of RELAY_CONFIG that fails its check: the error names the file and the
 * table's JSON path (and the password of its URL never shows); one of RELAY_OUTBOX_TABLES
 * names that setting. */
Test(relay_config, table_check_errors_name_the_json_path)
{
    struct pgtest_db db;
    PGconn *conn = pgtest_fresh(&db, true);
    pgtest_exec(conn, "CREATE SCHEMA nodl; CREATE TABLE nodl.outbox (LIKE saga.outbox)");
    char url[1200];
    url_with_secret(&db, url, sizeof(url));
    char path[256], config[300];
    snprintf(path, sizeof(path), "/tmp/saga-e2e-%d-check-path.json", (int)getpid());
    snprintf(config, sizeof(config), "RELAY_CONFIG=%s", path);
    char text[3000];
    snprintf(text, sizeof(text),
             "{\"sources\": [{\"database_url\": \"%s\", \"tables\": [\"saga.outbox\"]},\n"
             "  {\"database_url\": \"%s\", \"tables\": [\"saga.outbox\", \"nosuch.outbox\"]}]}\n",
             db.url, url);
    write_text(path, text);
    const char *brokers = "RELAY_KAFKA_BROKERS=127.0.0.1:9";
    char missing_at[400];
    snprintf(missing_at, sizeof(missing_at),
             "%s: $.sources[1].tables[1]: table nosuch.outbox does not exist", path);
    const char *missing[] = {config, brokers, "RELAY_DATABASE_URL", "RELAY_OUTBOX_TABLES", NULL};
    expect_exit_2(missing, NULL, (const char *[]){missing_at, NULL});

    snprintf(text, sizeof(text),
             "{\"sources\": [{\"database_url\": \"%s\", \"tables\": [\"nodl.outbox\"]}]}\n", url);
    write_text(path, text);
    char dead_at[400];
    snprintf(dead_at, sizeof(dead_at),
             "%s: $.sources[0].tables[0]: table nodl.outbox_dead_letters does not exist", path);
    expect_exit_2(missing, NULL, (const char *[]){dead_at, NULL});

    char env_url[1300];
    snprintf(env_url, sizeof(env_url), "RELAY_DATABASE_URL=%s", url);
    const char *from_env[] = {env_url, brokers, "RELAY_OUTBOX_TABLES=nosuch.outbox", NULL};
    expect_exit_2(from_env, NULL,
                  (const char *[]){"RELAY_OUTBOX_TABLES (--outbox-tables): table nosuch.outbox "
                                   "does not exist",
                                   NULL});
    unlink(path);
    PQfinish(conn);
    pgtest_db_drop(&db);
}

/* The same schema.table in two databases (two services, each with its saga.outbox): every
 * per-table series carries the database's name (never the rest of its URL), so each table
 * has its own series. */
Test(relay_config, same_table_in_two_databases_has_two_series)
{
    struct e2e e;
    e2e_setup(&e, "twodb", 10);
    struct pgtest_db other;
    PGconn *other_conn = pgtest_fresh(&other, true);
    char other_url[1200];
    url_with_secret(&other, other_url, sizeof(other_url));
    char path[256];
    snprintf(path, sizeof(path), "/tmp/saga-e2e-%d-two-db.json", (int)getpid());
    char text[3000];
    snprintf(text, sizeof(text),
             "{\"sources\": [{\"database_url\": \"%s\", \"tables\": [\"saga.outbox\"]},\n"
             "  {\"database_url\": \"%s\", \"tables\": [\"saga.outbox\"]}]}\n",
             e.db.url, other_url);
    write_text(path, text);
    struct e2e_run run;
    start_run_with_config(&e, &run, path, NULL);
    size_t from = 0;
    wait_log_times(&run.relay, "leading: publishing", 2, &from);
    insert_into(&e, "saga.outbox", 0, 100);
    const char *params[] = {e.topic_a};
    PQclear(pgtest_query(other_conn,
                         "INSERT INTO saga.outbox (id, topic, key, event_type, payload) "
                         "SELECT ('" E2E_EXTRA_ID_PREFIX "0000-4000-8000-' || lpad(g::text, 12, "
                         "'0'))::uuid, $1, 'kx', 'Ev', '{}' FROM generate_series(1, 40) g",
                         1, params));
    cr_assert(e2e_wait_table_empty(&e, "saga.outbox", 30000));
    for (int64_t deadline = proc_now_ms() + 30000;
         pgtest_count(other_conn, "SELECT count(*) FROM saga.outbox", 0, NULL) &&
         proc_now_ms() < deadline;) {
        struct timespec ts = {0, 20 * 1000000L};
        nanosleep(&ts, NULL);
    }
    cr_assert_eq(pgtest_count(other_conn, "SELECT count(*) FROM saga.outbox", 0, NULL), 0);

    char series[3][600];
    snprintf(series[0], sizeof(series[0]), "%s",
             e2e_series(&e, "relay_rows_deleted_total{table=\"saga.outbox\"}"));
    snprintf(series[1], sizeof(series[1]), "%s",
             e2e_series_db(&other, "relay_rows_deleted_total{table=\"saga.outbox\"}"));
    char published[300];
    snprintf(published, sizeof(published),
             "relay_rows_published_total{table=\"saga.outbox\",topic=\"%s\"}", e.topic_a);
    snprintf(series[2], sizeof(series[2]), "%s", e2e_series_db(&other, published));
    cr_assert(e2e_wait_metric(run.port, series[0], 100, 20000), "%s: %g", series[0],
              metric_now(run.port, series[0]));
    cr_assert(e2e_wait_metric(run.port, series[1], 40, 20000), "%s: %g", series[1],
              metric_now(run.port, series[1]));
    cr_assert_eq(metric_now(run.port, series[0]), 100);
    cr_assert_eq(metric_now(run.port, series[1]), 40);
    cr_assert_eq(metric_now(run.port, series[2]), 40);
    char *body;
    cr_assert_eq(e2e_http_get(run.port, "/metrics", &body), 200);
    cr_assert(!strstr(body, "{table=\"saga.outbox\"}"), "a series without its database: %s", body);
    cr_assert(!strstr(body, SECRET), "the password is in /metrics");
    /* Every series with a table label has a database label. */
    size_t per_table = 0;
    for (char *line = strtok(body, "\n"); line; line = strtok(NULL, "\n")) {
        if (line[0] == '#' || !strstr(line, "table=\""))
            continue;
        per_table++;
        cr_assert(strstr(line, "database=\"") && strstr(line, "server=\""),
                  "a per-table series without its database and server: %s", line);
    }
    cr_assert(per_table > 10, "%zu per-table series", per_table);
    free(body);
    e2e_finish(&e, &run);
    unlink(path);
    PQfinish(other_conn);
    pgtest_db_drop(&other);
}
