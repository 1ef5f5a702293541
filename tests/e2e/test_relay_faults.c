/* End-to-end: the outbox relay under faults: kill -9 at random moments, two relays on one
 * table with the leader killed, the broker going away and refusing requests, rows Kafka
 * rejects for good. */
#include "relay_e2e.h"

TestSuite(relay_faults, .timeout = 170);

static void pause_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static unsigned test_seed(void)
{
    const char *s = getenv("SAGA_E2E_SEED");
    if (s && *s)
        return (unsigned)strtoul(s, NULL, 10);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (unsigned)(ts.tv_nsec ^ (ts.tv_sec << 10) ^ getpid());
}

/* kill -9 of the relay at random moments while rows keep being inserted, restarted each
 * time: every row arrives at least once, every message is exactly the row its message-id
 * names (so a duplicate carries the id of an earlier delivery), the first deliveries of each
 * key come in seq order, and the table ends empty. */
Test(relay_faults, kill9_at_random_moments)
{
    const unsigned first_seed = test_seed();
    unsigned seed = first_seed;
    fprintf(stderr, "kill9_at_random_moments: seed %u (SAGA_E2E_SEED=%u repeats the choices)\n",
            seed, seed);
    struct e2e e;
    e2e_setup(&e, "kill", 64);
    struct e2e_run run;
    run.c = e2e_consume(&e);
    const long max_rows = 12000;
    long inserted = 0;
    int kills = 10 + (int)(rand_r(&seed) % 5);
    /* Small claims and slow acknowledgements (every broker response is delayed) keep many
     * rows in flight at each kill. */
    devbroker_command(&e.broker, "rtt 1 30");
    const char *env[] = {"RELAY_BATCH_SIZE=200", "RELAY_LINGER=2ms", NULL};
    size_t mid_flight = 0;
    for (int i = 0; i < kills; i++) {
        e2e_relay_start(&e, &run.relay, env);
        /* Kill after 0..2.5 s: some kills land while the relay starts or takes the lock, most
         * while it publishes (its first message to a topic waits up to a second for
         * librdkafka's metadata). A burst, then rows keep coming in small transactions. */
        int64_t until = proc_now_ms() + (int64_t)(rand_r(&seed) % 2500);
        size_t before = kconsumer_count(run.c);
        long burst = 100 + (long)(rand_r(&seed) % 400);
        do {
            if (inserted < max_rows) {
                long chunk = burst ? burst : 5 + (long)(rand_r(&seed) % 16);
                burst = 0;
                if (inserted + chunk > max_rows)
                    chunk = max_rows - inserted;
                e2e_insert(&e, inserted, inserted + chunk);
                inserted += chunk;
            }
            pause_ms(20);
        } while (proc_now_ms() < until);
        size_t after = kconsumer_count(run.c);
        long left = e2e_table_count(&e, "saga.outbox");
        fprintf(stderr, "kill %d: %zu messages, %ld rows inserted, %ld in the table\n", i, after,
                inserted, left);
        if (after > before && left > 0)
            mid_flight++;
        proc_signal(&run.relay, SIGKILL);
        cr_assert(proc_wait_exit(&run.relay, 10000), "the relay survived SIGKILL");
        cr_assert_eq(proc_exit_code(&run.relay), 128 + SIGKILL,
                     "the relay exited %d before the kill", proc_exit_code(&run.relay));
        proc_cleanup(&run.relay);
    }
    fprintf(stderr,
            "kill9_at_random_moments: %d kills, %ld rows, %zu kills while rows were flowing\n",
            kills, inserted, mid_flight);
    cr_assert(mid_flight > 0, "no kill landed while rows were flowing (seed %u)", first_seed);

    /* A last run publishes what is left. */
    e2e_relay_start(&e, &run.relay, env);
    long distinct = 0;
    if (!e2e_wait_all(run.c, inserted, 60000, &distinct)) {
        proc_dump(&run.relay, "relay", 6000);
        cr_assert_fail("%ld of %ld rows arrived (seed %u)", distinct, inserted, first_seed);
    }
    cr_assert(e2e_wait_table_empty(&e, "saga.outbox", 20000), "%ld rows left (seed %u)",
              e2e_table_count(&e, "saga.outbox"), first_seed);
    size_t dups = e2e_verify(&e, run.c, inserted, false);
    fprintf(stderr, "kill9_at_random_moments: %zu messages, %zu duplicates\n",
            kconsumer_count(run.c), dups);
    e2e_finish(&e, &run);
}

/* Which of two relays logs needle first (bounded): 0, 1, or -1. */
static int first_to_log(struct proc *p, const char *needle, int timeout_ms)
{
    int64_t deadline = proc_now_ms() + timeout_ms;
    for (;;) {
        for (int i = 0; i < 2; i++)
            if (proc_wait_log(&p[i], needle, NULL, 0, NULL, 0))
                return i;
        if (proc_now_ms() > deadline)
            return -1;
        pause_ms(5);
    }
}

static double leader_gauge(const struct e2e *e, int port)
{
    char *body;
    int status = e2e_http_get(port, "/metrics", &body);
    double v = status == 200
                   ? e2e_metric(body, e2e_series(e, "relay_table_leader{table=\"saga.outbox\"}"))
                   : -2;
    free(body);
    return v;
}

/* Two relays on one table: exactly one leads; when it is killed (SIGKILL) while rows flow,
 * the standby takes over and every row arrives, in order per key (first deliveries). */
Test(relay_faults, standby_takes_over)
{
    struct e2e e;
    e2e_setup(&e, "standby", 40);
    struct kconsumer *c = e2e_consume(&e);
    const char *env[] = {"RELAY_LEADER_RETRY=200ms", "RELAY_BATCH_SIZE=200", NULL};
    struct proc relays[2];
    e2e_relay_start(&e, &relays[0], env);
    e2e_relay_start(&e, &relays[1], env);
    int ports[2] = {e2e_admin_port(&relays[0]), e2e_admin_port(&relays[1])};
    int leader = first_to_log(relays, "leading: publishing", 15000);
    cr_assert(leader >= 0, "no relay leads within 15 s");
    int standby = 1 - leader;
    cr_assert(proc_wait_log(&relays[standby], "standing by", NULL, 15000, NULL, 0),
              "the second relay does not stand by");
    cr_assert_eq(proc_count_log(&relays[standby], "leading: publishing"), 0, "both relays lead");
    cr_assert_eq(leader_gauge(&e, ports[leader]), 1.0);
    cr_assert_eq(leader_gauge(&e, ports[standby]), 0.0);

    const long total = 6000;
    for (long from = 0; from < 3000; from += 500)
        e2e_insert(&e, from, from + 500);
    cr_assert(kconsumer_wait_count(c, 600, 30000), "no flow: %zu messages", kconsumer_count(c));
    cr_assert_eq(proc_count_log(&relays[standby], "leading: publishing"), 0,
                 "the standby leads while the leader lives");
    proc_signal(&relays[leader], SIGKILL);
    int64_t killed = proc_now_ms();
    cr_assert(proc_wait_exit(&relays[leader], 10000));
    for (long from = 3000; from < total; from += 500)
        e2e_insert(&e, from, from + 500);
    cr_assert(proc_wait_log(&relays[standby], "leading: publishing", NULL, 15000, NULL, 0),
              "the standby did not take over within 15 s");
    int64_t handover = proc_now_ms() - killed;
    fprintf(stderr, "standby_takes_over: handover in %" PRId64 " ms (leader retry 200 ms)\n",
            handover);

    long distinct = 0;
    if (!e2e_wait_all(c, total, 60000, &distinct)) {
        proc_dump(&relays[standby], "standby", 6000);
        cr_assert_fail("%ld of %ld rows arrived", distinct, total);
    }
    cr_assert(e2e_wait_table_empty(&e, "saga.outbox", 20000));
    e2e_verify(&e, c, total, false);
    cr_assert_eq(leader_gauge(&e, ports[standby]), 1.0);
    e2e_relay_stop(&relays[standby]);
    proc_cleanup(&relays[0]);
    proc_cleanup(&relays[1]);
    kconsumer_stop(c);
    e2e_teardown(&e);
}

/* A leader whose claim session can never connect (here a role limited to one connection:
 * the lock session takes it) lets the table go after 10 leader retries, so that the standby
 * publishes; before, it kept the leader lock for as long as that lasted and nothing was
 * published. */
Test(relay_faults, leader_without_claim_session_hands_over)
{
    struct e2e e;
    e2e_setup(&e, "noclaim", 10);
    char role[100], sql[300], url[1200];
    snprintf(role, sizeof(role), "%s_one", e.db.name);
    snprintf(sql, sizeof(sql), "CREATE ROLE %s LOGIN CONNECTION LIMIT 1 IN ROLE saga_relay", role);
    pgtest_exec(e.conn, sql);
    const char *at = strstr(e.db.url, "://");
    cr_assert(at, "expected a URI: %s", e.db.url);
    const char *host = strchr(at + 3, '@');
    host = host ? host + 1 : at + 3;
    snprintf(url, sizeof(url), "RELAY_DATABASE_URL=postgresql://%s@%s", role, host);
    struct kconsumer *c = e2e_consume(&e);
    const char *env_one[] = {url, "RELAY_LEADER_RETRY=200ms", "RELAY_RECONNECT_MAX=1s", NULL};
    const char *env[] = {"RELAY_LEADER_RETRY=200ms", NULL};
    struct proc one, other;
    e2e_relay_start(&e, &one, env_one);
    cr_assert(proc_wait_log(&one, "leading: publishing", NULL, 15000, NULL, 0),
              "the one-connection relay does not lead");
    e2e_relay_start(&e, &other, env);
    cr_assert(proc_wait_log(&other, "standing by", NULL, 15000, NULL, 0),
              "the second relay does not stand by");
    e2e_insert(&e, 0, 200);
    if (!proc_wait_log(&one, "leadership released so that another relay", NULL, 15000, NULL, 0)) {
        proc_dump(&one, "one-connection relay", 6000);
        cr_assert_fail("the leader without a claim session kept the table");
    }
    cr_assert(proc_wait_log(&other, "leading: publishing", NULL, 15000, NULL, 0),
              "the standby did not take over");
    long distinct = 0;
    if (!e2e_wait_all(c, 200, 30000, &distinct)) {
        proc_dump(&other, "new leader", 6000);
        cr_assert_fail("%ld of 200 rows arrived", distinct);
    }
    cr_assert(e2e_wait_table_empty(&e, "saga.outbox", 20000));
    e2e_verify(&e, c, 200, true);
    e2e_relay_stop(&other);
    e2e_relay_stop(&one);
    proc_cleanup(&one);
    proc_cleanup(&other);
    kconsumer_stop(c);
    snprintf(sql, sizeof(sql), "DROP ROLE %s", role);
    e2e_teardown(&e);
    PGconn *server = pgtest_connect(pgtest_server_url());
    pgtest_exec(server, sql);
    PQfinish(server);
}

/* The leader's lock session dies while the leader is frozen (SIGSTOP), so it cannot notice:
 * its claim session lives on. A second relay then wins the leader lock but must not publish
 * before the old claim session ends (the claim lock): it says it waits; once the old leader
 * runs again, notices and closes its claim session, the new one publishes everything, in
 * order per key. */
Test(relay_faults, new_leader_waits_for_the_old_claim_session)
{
    struct e2e e;
    e2e_setup(&e, "fence", 20);
    struct kconsumer *c = e2e_consume(&e);
    const char *env[] = {"RELAY_LEADER_RETRY=200ms", "RELAY_BATCH_SIZE=100", NULL};
    struct proc old, next;
    e2e_relay_start(&e, &old, env);
    cr_assert(proc_wait_log(&old, "leading: publishing", NULL, 15000, NULL, 0));
    e2e_insert(&e, 0, 200);
    cr_assert(e2e_wait_all(c, 200, 30000, NULL));

    proc_signal(&old, SIGSTOP);
    const char *dbname[] = {e.db.name};
    long n = pgtest_count(e.conn,
                          "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE "
                          "datname = $1 AND pid <> pg_backend_pid() AND backend_type = 'client "
                          "backend' AND query NOT LIKE '%relay_claim%'",
                          1, dbname);
    cr_assert_eq(n, 1, "expected the old leader's lock session alone to be terminated");
    e2e_relay_start(&e, &next, env);
    cr_assert(proc_wait_log(&next, "leading: publishing", NULL, 15000, NULL, 0),
              "the new relay did not win the free leader lock");
    cr_assert(proc_wait_log(&next, "previous leader's claim session", NULL, 15000, NULL, 0),
              "the new leader did not wait for the old claim session");
    /* Meanwhile it publishes nothing, and says so (the status is refreshed every 0.5 s:
     * bounded polling until it shows the leading table). */
    int port = e2e_admin_port(&next);
    bool shown = false;
    for (int64_t end = proc_now_ms() + 10000; !shown && proc_now_ms() < end;) {
        char *body = NULL;
        int status = e2e_http_get(port, "/readyz", &body);
        cr_assert_eq(status, 503, "/readyz while the claims wait: %d %s", status, body ? body : "");
        shown = body && strstr(body, "saga.outbox leading");
        if (shown)
            cr_assert(!strstr(body, "claims=ready"), "%s", body);
        free(body);
        if (!shown) {
            struct timespec ts = {0, 100 * 1000000L};
            nanosleep(&ts, NULL); /* polling an HTTP status: nothing to wait on */
        }
    }
    cr_assert(shown, "/readyz never showed the table as leading");
    e2e_insert(&e, 200, 400);

    proc_signal(&old, SIGCONT);
    cr_assert(proc_wait_log(&old, "lost the database connection", NULL, 15000, NULL, 0),
              "the old leader did not notice its lost lock session");
    long distinct = 0;
    if (!e2e_wait_all(c, 400, 60000, &distinct)) {
        proc_dump(&next, "new leader", 6000);
        cr_assert_fail("%ld of 400 rows arrived", distinct);
    }
    cr_assert(e2e_wait_table_empty(&e, "saga.outbox", 20000));
    e2e_verify(&e, c, 400, false);
    e2e_relay_stop(&next);
    e2e_relay_stop(&old);
    proc_cleanup(&next);
    proc_cleanup(&old);
    kconsumer_stop(c);
    e2e_teardown(&e);
}

/* The broker goes down while rows are inserted, then comes back; then it fails Produce
 * requests with retriable errors. Nothing is lost, the first deliveries keep the order per
 * key, and the backlog drains. */
Test(relay_faults, broker_down_and_request_errors)
{
    struct e2e e;
    e2e_setup(&e, "down", 30);
    struct e2e_run run;
    /* One request in flight per connection. librdkafka 2.0.2's mock broker appends a batch
     * without checking the idempotent producer's sequence numbers: when an injected error
     * fails one request while the next one of the same partition succeeds, the client
     * counts the failed request's messages as "implicitly acked by subsequent batch
     * success" (IMPLICITACK in its eos debug log), which a real broker makes true by
     * refusing the later batch (OUT_OF_ORDER_SEQUENCE_NUMBER); the mock just lost them. */
    const char *env[] = {"RELAY_BATCH_SIZE=100", "KAFKA_MAX_IN_FLIGHT_REQUESTS_PER_CONNECTION=1",
                         NULL};
    e2e_start(&e, &run, env);
    e2e_insert(&e, 0, 500);
    cr_assert(e2e_wait_all(run.c, 500, 30000, NULL), "the first rows did not arrive");

    /* Down: the relay claims the new rows (they wait in the producer), then the broker is
     * back and they arrive. */
    devbroker_command(&e.broker, "down 1");
    for (long from = 500; from < 1500; from += 100)
        e2e_insert(&e, from, from + 100);
    cr_assert(e2e_wait_metric(run.port,
                              e2e_series(&e, "relay_rows_claimed_total{table=\"saga.outbox\"}"),
                              1500, 20000),
              "the relay did not claim the rows inserted while the broker was down");
    cr_assert_gt(e2e_table_count(&e, "saga.outbox"), 0, "rows deleted while the broker was down");
    devbroker_command(&e.broker, "up 1");
    long distinct = 0;
    if (!e2e_wait_all(run.c, 1500, 60000, &distinct)) {
        proc_dump(&run.relay, "relay", 6000);
        cr_assert_fail("after the broker came back, %ld of 1500 rows arrived", distinct);
    }

    /* Produce requests fail: a leader change, then time-outs. */
    devbroker_command(&e.broker, "errors Produce 5 NOT_LEADER_FOR_PARTITION");
    e2e_insert(&e, 1500, 2000);
    e2e_insert(&e, 2000, 2500);
    devbroker_command(&e.broker, "errors Produce 5 REQUEST_TIMED_OUT");
    e2e_insert(&e, 2500, 3000);
    devbroker_command(&e.broker, "errors Produce 4 NOT_ENOUGH_REPLICAS LEADER_NOT_AVAILABLE "
                                 "REQUEST_TIMED_OUT NOT_LEADER_FOR_PARTITION");
    e2e_insert(&e, 3000, 3500);
    if (!e2e_wait_all(run.c, 3500, 60000, &distinct)) {
        proc_dump(&run.relay, "relay", 6000);
        e2e_dump_state(&e, run.port);
        cr_assert_fail("with request errors, %ld of 3500 rows arrived", distinct);
    }
    cr_assert(e2e_wait_table_empty(&e, "saga.outbox", 20000));
    size_t dups = e2e_verify(&e, run.c, 3500, false);
    fprintf(stderr, "broker_down_and_request_errors: %zu duplicates\n", dups);
    e2e_finish(&e, &run);
}

/* A row larger than message.max.bytes moves to the dead-letter table with the error; the rows
 * behind it, of its key and others, arrive; the outbox ends empty. */
Test(relay_faults, poison_row_dead_lettered)
{
    struct e2e e;
    e2e_setup(&e, "poison", 10);
    struct e2e_run run;
    run.c = e2e_consume(&e);
    e2e_insert(&e, 0, 100);
    const char *params[] = {e.topic_b};
    PQclear(pgtest_query(e.conn,
                         "INSERT INTO saga.outbox (id, topic, key, event_type, payload) VALUES "
                         "('ffffffff-0000-4000-8000-000000000001', $1, 'k001', 'Big', "
                         "jsonb_build_object('blob', repeat('x', 50000)))",
                         1, params));
    e2e_insert(&e, 100, 200);
    const char *env[] = {"KAFKA_MESSAGE_MAX_BYTES=10000", NULL};
    e2e_relay_start(&e, &run.relay, env);
    run.port = e2e_admin_port(&run.relay);
    long distinct = 0;
    if (!e2e_wait_all(run.c, 200, 30000, &distinct)) {
        proc_dump(&run.relay, "relay", 6000);
        cr_assert_fail("%ld of 200 good rows arrived", distinct);
    }
    cr_assert(e2e_wait_table_empty(&e, "saga.outbox", 20000), "%ld rows left in the outbox",
              e2e_table_count(&e, "saga.outbox"));
    e2e_verify(&e, run.c, 200, true);
    PGresult *res = pgtest_query(e.conn,
                                 "SELECT id::text, key, topic, event_type, "
                                 "length(payload->>'blob'), error FROM saga.outbox_dead_letters",
                                 0, NULL);
    cr_assert_eq(PQntuples(res), 1, "%d dead letters", PQntuples(res));
    cr_assert_str_eq(PQgetvalue(res, 0, 0), "ffffffff-0000-4000-8000-000000000001");
    cr_assert_str_eq(PQgetvalue(res, 0, 1), "k001");
    cr_assert_str_eq(PQgetvalue(res, 0, 2), e.topic_b);
    cr_assert_str_eq(PQgetvalue(res, 0, 3), "Big");
    cr_assert_str_eq(PQgetvalue(res, 0, 4), "50000");
    cr_assert(strstr(PQgetvalue(res, 0, 5), "too large"), "error text: %s", PQgetvalue(res, 0, 5));
    PQclear(res);
    cr_assert(proc_wait_log(&run.relay, "moved to the dead-letter table", NULL, 5000, NULL, 0));
    cr_assert(e2e_wait_metric(
        run.port, e2e_series(&e, "relay_dead_letters_total{table=\"saga.outbox\"}"), 1, 10000));
    e2e_finish(&e, &run);
}

/* A topic the broker rejects for good (Kafka answers an invalid topic name with
 * TOPIC_EXCEPTION in the metadata; the dev broker is told to do the same): its row moves to
 * the dead-letter table with librdkafka's error text, and the rows behind it arrive. A topic
 * name that Kafka would refuse ("bad topic!") is accepted by the dev broker (the mock checks
 * no names): its row must not block the table either way. */
Test(relay_faults, rejected_topic_dead_lettered)
{
    struct e2e e;
    e2e_setup(&e, "rejected", 10);
    char forbidden[80];
    snprintf(forbidden, sizeof(forbidden), "%s.forbidden", e.topic_a);
    devbroker_command(&e.broker, "topic-error %s TOPIC_EXCEPTION", forbidden);
    struct e2e_run run;
    run.c = e2e_consume(&e);
    e2e_insert(&e, 0, 100);
    const char *params[] = {forbidden};
    PQclear(pgtest_query(e.conn,
                         "INSERT INTO saga.outbox (id, topic, key, event_type, payload) VALUES "
                         "('ffffffff-0000-4000-8000-000000000002', $1, 'k003', 'Rejected', "
                         "'{\"r\": 1}'), "
                         "('ffffffff-0000-4000-8000-000000000003', 'bad topic!', 'k003', "
                         "'BadName', '{\"r\": 2}')",
                         1, params));
    e2e_insert(&e, 100, 200);
    e2e_relay_start(&e, &run.relay, NULL);
    run.port = e2e_admin_port(&run.relay);
    long distinct = 0;
    if (!e2e_wait_all(run.c, 200, 30000, &distinct)) {
        proc_dump(&run.relay, "relay", 6000);
        cr_assert_fail("%ld of 200 good rows arrived", distinct);
    }
    if (!e2e_wait_table_empty(&e, "saga.outbox", 20000)) {
        proc_dump(&run.relay, "relay", 6000);
        cr_assert_fail("%ld rows left in the outbox", e2e_table_count(&e, "saga.outbox"));
    }
    e2e_verify(&e, run.c, 200, true);
    const char *id[] = {"ffffffff-0000-4000-8000-000000000002"};
    char *error = pgtest_value(e.conn,
                               "SELECT error FROM saga.outbox_dead_letters WHERE id = $1::uuid "
                               "AND event_type = 'Rejected' AND payload = '{\"r\": 1}'",
                               1, id);
    cr_assert_str_eq(error, rd_kafka_err2str(RD_KAFKA_RESP_ERR_TOPIC_EXCEPTION));
    free(error);
    /* "bad topic!": published (the dev broker) or dead-lettered (a real broker), not stuck. */
    long dead = pgtest_count(e.conn,
                             "SELECT count(*) FROM saga.outbox_dead_letters "
                             "WHERE id = 'ffffffff-0000-4000-8000-000000000003'",
                             0, NULL);
    char *body;
    cr_assert_eq(e2e_http_get(run.port, "/metrics", &body), 200);
    double published = e2e_metric(
        body,
        e2e_series(&e, "relay_rows_published_total{table=\"saga.outbox\",topic=\"bad topic!\"}"));
    free(body);
    cr_assert(dead == 1 || published == 1, "the 'bad topic!' row: dead %ld, published %g", dead,
              published);
    e2e_finish(&e, &run);
}

/* The relay's database session is terminated (pg_terminate_backend) again and again while
 * rows flow: it reconnects, takes the lock again, and nothing is lost; the first deliveries
 * of each key keep their order; the table ends empty. */
Test(relay_faults, database_session_terminated)
{
    struct e2e e;
    e2e_setup(&e, "pgkill", 30);
    struct e2e_run run;
    run.c = e2e_consume(&e);
    devbroker_command(&e.broker, "rtt 1 20"); /* keeps rows in flight */
    const char *env[] = {"RELAY_BATCH_SIZE=100", "RELAY_RECONNECT_MAX=500ms", NULL};
    e2e_relay_start(&e, &run.relay, env);
    run.port = e2e_admin_port(&run.relay);
    const long total = 5000;
    long inserted = 0;
    const int terminations = 6;
    size_t log_at = 0;
    for (int i = 0; i < terminations; i++) {
        /* Leading again (a new session holds the lock) before the next termination. */
        cr_assert(proc_wait_log(&run.relay, "leading: publishing", &log_at, 20000, NULL, 0),
                  "round %d: the relay does not lead again", i);
        size_t before = kconsumer_count(run.c);
        e2e_insert(&e, inserted, inserted + total / terminations);
        inserted += total / terminations;
        cr_assert(kconsumer_wait_count(run.c, before + 50, 30000), "round %d: no flow", i);
        const char *dbname[] = {e.db.name};
        long n = pgtest_count(e.conn,
                              "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                              "WHERE datname = $1 AND pid <> pg_backend_pid()",
                              1, dbname);
        cr_assert_geq(n, 1, "round %d: no relay session to terminate", i);
    }
    e2e_insert(&e, inserted, total);
    size_t dups = e2e_expect_all(&e, &run, total, 60000, false);
    fprintf(stderr, "database_session_terminated: %zu duplicates\n", dups);
    cr_assert_geq(proc_count_log(&run.relay, "lost the database connection"), 1);
    cr_assert(e2e_wait_metric(
        run.port, e2e_series(&e, "relay_db_reconnects_total{table=\"saga.outbox\"}"), 1, 5000));
    e2e_finish(&e, &run);
}

/* Only the relay's claim session (the one that runs relay_claim) is terminated, again and
 * again, while rows flow: the relay keeps its leadership (no new "leading" line, no lost lock
 * connection), reconnects the claim session (which takes the claim lock again), and nothing
 * is lost or reordered. */
Test(relay_faults, claim_session_terminated)
{
    struct e2e e;
    e2e_setup(&e, "claimkill", 30);
    struct e2e_run run;
    run.c = e2e_consume(&e);
    devbroker_command(&e.broker, "rtt 1 20"); /* keeps rows in flight */
    const char *env[] = {"RELAY_BATCH_SIZE=100", "RELAY_RECONNECT_MAX=500ms", NULL};
    e2e_relay_start(&e, &run.relay, env);
    run.port = e2e_admin_port(&run.relay);
    size_t log_at = 0;
    cr_assert(proc_wait_log(&run.relay, "leading: publishing", &log_at, 20000, NULL, 0));
    const long total = 5000;
    long inserted = 0;
    const int terminations = 5;
    for (int i = 0; i < terminations; i++) {
        size_t before = kconsumer_count(run.c);
        e2e_insert(&e, inserted, inserted + total / terminations);
        inserted += total / terminations;
        cr_assert(kconsumer_wait_count(run.c, before + 50, 30000), "round %d: no flow", i);
        const char *dbname[] = {e.db.name};
        /* The claim session, once it is back (bounded: 1,000 polls of 20 ms). */
        long n = 0;
        for (int k = 0; k < 1000 && n == 0; k++)
            n = pgtest_count(
                e.conn,
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity, pg_sleep(0.02) "
                "WHERE datname = $1 AND pid <> pg_backend_pid() AND query LIKE "
                "'%relay_claim%'",
                1, dbname);
        cr_assert_eq(n, 1, "round %d: expected one claim session to terminate", i);
        cr_assert(e2e_wait_metric(
                      run.port, e2e_series(&e, "relay_db_reconnects_total{table=\"saga.outbox\"}"),
                      (double)(i + 1), 20000),
                  "round %d: the loss was not counted", i);
    }
    e2e_expect_all(&e, &run, total, 60000, false);
    cr_assert_geq(proc_count_log(&run.relay, "lost the claim connection"), 1);
    cr_assert_eq(proc_count_log(&run.relay, "lost the database connection"), 0,
                 "the lock connection was never lost");
    cr_assert_eq(proc_count_log(&run.relay, "leading: publishing"), 1, "leadership was kept");
    e2e_finish(&e, &run);
}

/* SIGTERM while the broker is down: the relay cannot get its rows acknowledged, gives up
 * after RELAY_DRAIN_TIMEOUT and exits 0 with the rows still in the table; the next run, with
 * the broker back, publishes them. */
Test(relay_faults, sigterm_with_broker_down)
{
    struct e2e e;
    e2e_setup(&e, "termdown", 10);
    struct e2e_run run;
    const char *env[] = {"RELAY_DRAIN_TIMEOUT=1s", NULL};
    e2e_start(&e, &run, env);
    e2e_insert(&e, 0, 100);
    cr_assert(e2e_wait_all(run.c, 100, 30000, NULL));
    devbroker_command(&e.broker, "down 1");
    e2e_insert(&e, 100, 300);
    cr_assert(e2e_wait_metric(
        run.port, e2e_series(&e, "relay_rows_claimed_total{table=\"saga.outbox\"}"), 300, 20000));
    e2e_relay_stop(&run.relay);
    cr_assert(proc_wait_log(&run.relay, "drain timeout", NULL, 1000, NULL, 0));
    long left = e2e_table_count(&e, "saga.outbox");
    cr_assert_eq(left, 200, "%ld rows left after SIGTERM, expected the 200 never acknowledged",
                 left);
    proc_cleanup(&run.relay);
    devbroker_command(&e.broker, "up 1");
    e2e_relay_start(&e, &run.relay, NULL);
    e2e_expect_all(&e, &run, 300, 60000, false);
    e2e_finish(&e, &run);
}

/* The set-up of the tests of failed batches: a table of `keys` keys, a consumer, the broker
 * answering after rtt_ms, a relay with 50-row claims and one request in flight (see
 * non_retriable_produce_error for why one), and `warm` rows published first. run's consumer
 * and relay are the caller's to end (e2e_finish). */
static void start_one_in_flight(struct e2e *e, const char *name, int keys, int rtt_ms, long warm,
                                struct e2e_run *run)
{
    e2e_setup(e, name, keys);
    run->c = e2e_consume(e);
    devbroker_command(&e->broker, "rtt 1 %d", rtt_ms);
    const char *env[] = {"RELAY_BATCH_SIZE=50", "KAFKA_MAX_IN_FLIGHT_REQUESTS_PER_CONNECTION=1",
                         NULL};
    e2e_relay_start(e, &run->relay, env);
    run->port = e2e_admin_port(&run->relay);
    e2e_insert(e, 0, warm);
    cr_assert(e2e_wait_all(run->c, warm, 30000, NULL));
    cr_assert(e2e_wait_table_empty(e, "saga.outbox", 20000));
}

/* A Produce request fails with an error that librdkafka does not retry and the relay does
 * not count as permanent (POLICY_VIOLATION) while later rows of its partitions wait behind
 * it (50 ms answers: the claims behind it are produced meanwhile): the producer must not
 * publish those later rows first. With enable.gapless.guarantee it stops (a fatal error),
 * its messages are purged, the tables read again from their first unacknowledged row and a
 * new producer publishes them: every row arrives, the first deliveries per key in seq order.
 * Without the guarantee the order check fails in about one run of three ("key k014: first
 * delivery of n=12 ... after n=9") and the restart counter in every run.
 * One request in flight: the dev broker (librdkafka's mock) appends a request that follows a
 * failed one without checking the idempotent producer's sequence numbers, as a real broker
 * would (OUT_OF_ORDER_SEQUENCE_NUMBER), so with several in flight the mock itself reorders. */
Test(relay_faults, non_retriable_produce_error)
{
    struct e2e e;
    struct e2e_run run;
    start_one_in_flight(&e, "nonretry", 20, 50, 200, &run);
    const long total = 3000;
    for (long from = 200; from < total; from += 400) {
        devbroker_command(&e.broker, "errors Produce 1 POLICY_VIOLATION");
        e2e_insert(&e, from, from + 400 < total ? from + 400 : total);
    }
    size_t dups = e2e_expect_all(&e, &run, total, 60000, false);
    cr_assert(e2e_wait_metric(run.port, "relay_producer_restarts_total", 1, 5000),
              "no producer was replaced after the refused requests");
    fprintf(stderr, "non_retriable_produce_error: %zu duplicates, %zu producer restarts\n", dups,
            proc_count_log(&run.relay, "a new producer replaces"));
    e2e_finish(&e, &run);
}

/* Waits (bounded) until at least total - missing distinct rows of [0, total) arrived. */
static bool e2e_wait_all_but(struct kconsumer *c, long total, long missing, int timeout_ms,
                             long *arrived)
{
    int64_t deadline = proc_now_ms() + timeout_ms;
    for (;;) {
        size_t n;
        struct kmsg **msgs = kconsumer_snapshot(c, &n);
        bool *seen = calloc((size_t)total, sizeof(*seen));
        cr_assert(seen);
        *arrived = 0;
        for (size_t i = 0; i < n; i++) {
            long g = id_row(kmsg_header(msgs[i], "message-id", NULL));
            if (g >= 0 && g < total && !seen[g]) {
                seen[g] = true;
                (*arrived)++;
            }
        }
        free(seen);
        free(msgs);
        if (*arrived >= total - missing)
            return true;
        if (proc_now_ms() > deadline)
            return false;
        kconsumer_wait_count(c, n + 1, 100);
    }
}

/* The messages of the rejected requests, as the relay's "fatal producer error" lines name
 * them ("... with N message(s) failed: ..."). */
static long rejected_in_log(struct proc *relay)
{
    char *out = proc_read_stdout(relay);
    long n = 0;
    for (char *line = strstr(out, "fatal producer error"); line;
         line = strstr(line + 1, "fatal producer error")) {
        char *eol = strchr(line, '\n');
        char *with = strstr(line, " with ");
        long k;
        if (with && (!eol || with < eol) && sscanf(with, " with %ld message(s) failed", &k) == 1)
            n += k;
    }
    free(out);
    return n;
}

/* The rows of [from, total) in the dead-letter table (by row number, see id_row; a new array
 * of total flags the caller frees), each with the mock's INVALID_RECORD text; *ndead their
 * number. */
static bool *read_dead_letters(struct e2e *e, long from, long total, long *ndead)
{
    bool *dead = calloc((size_t)total, sizeof(*dead));
    cr_assert(dead);
    PGresult *res =
        pgtest_query(e->conn, "SELECT id::text, error FROM saga.outbox_dead_letters", 0, NULL);
    *ndead = PQntuples(res);
    for (long i = 0; i < *ndead; i++) {
        long g = id_row(PQgetvalue(res, (int)i, 0));
        cr_assert(g >= from && g < total, "dead letter %s", PQgetvalue(res, (int)i, 0));
        cr_assert(strstr(PQgetvalue(res, (int)i, 1), "validate record"), "error text: %s",
                  PQgetvalue(res, (int)i, 1));
        dead[g] = true;
    }
    PQclear(res);
    return dead;
}

/* Every row of [0, total) not flagged dead arrives (bounded wait); no dead row is ever
 * delivered; first deliveries per key in n order, skipping only dead rows. */
static void verify_all_but_dead(struct e2e *e, struct kconsumer *c, long total, const bool *dead)
{
    long want = 0;
    for (long g = 0; g < total; g++)
        want += !dead[g];
    long distinct = 0;
    (void)e2e_wait_all_but(c, total, total - want, 30000, &distinct);
    cr_assert_eq(distinct, want, "%ld of %ld rows arrived", distinct, want);
    size_t n = 0;
    struct kmsg **msgs = kconsumer_snapshot(c, &n);
    long *next_n = calloc((size_t)e->keys, sizeof(*next_n));
    bool *first = calloc((size_t)total, sizeof(*first));
    cr_assert(next_n && first);
    for (size_t i = 0; i < n; i++) {
        long g = e2e_check_message(e, msgs[i], total);
        cr_assert(!dead[g], "dead-lettered row %ld was delivered", g);
        if (first[g])
            continue;
        first[g] = true;
        int k = row_key(e, g);
        while (next_n[k] * e->keys + k < total && dead[next_n[k] * e->keys + k])
            next_n[k]++;
        cr_assert_eq(row_n(e, g), next_n[k], "key k%03d: first delivery of n=%ld, expected n=%ld",
                     k, row_n(e, g), next_n[k]);
        next_n[k]++;
    }
    free(next_n);
    free(first);
    free(msgs);
}

/* The broker rejects a request for good (INVALID_RECORD, permanent) while later rows wait
 * behind it: the rejected rows end in the dead-letter table, and stay there although the
 * producer is replaced (gapless guarantee) and the table read again: before, the reset that
 * follows forgot the pending moves and the rejected rows were simply published again on the
 * next attempt (or, with a broker that keeps rejecting them, the producer restarted for
 * ever). Every other row arrives, first deliveries in seq order per key, skipping only the
 * dead-lettered rows. One request in flight, as above. */
Test(relay_faults, permanent_rejection_with_rows_behind)
{
    struct e2e e;
    struct e2e_run run;
    start_one_in_flight(&e, "permbehind", 10, 10, 100, &run);
    const long total = 600;
    devbroker_command(&e.broker, "errors Produce 1 INVALID_RECORD");
    e2e_insert(&e, 100, total);
    if (!e2e_wait_table_empty(&e, "saga.outbox", 30000)) {
        proc_dump(&run.relay, "relay", 6000);
        cr_assert_fail("%ld rows left in the outbox", e2e_table_count(&e, "saga.outbox"));
    }
    long ndead;
    bool *dead = read_dead_letters(&e, 100, total, &ndead);
    if (ndead == 0) {
        proc_dump(&run.relay, "relay", 12000);
        cr_assert_fail("no row in the dead-letter table");
    }
    cr_assert(e2e_wait_metric(run.port, "relay_producer_restarts_total", 1, 5000),
              "no producer was replaced after the rejection");
    cr_assert_eq(ndead, rejected_in_log(&run.relay), "%ld dead letters, %ld rejected messages",
                 ndead, rejected_in_log(&run.relay));
    verify_all_but_dead(&e, run.c, total, dead);
    fprintf(stderr, "permanent_rejection_with_rows_behind: %ld dead letters\n", ndead);
    free(dead);
    e2e_finish(&e, &run);
}

/* As above, with dead-letter moves that take 50 ms each (a trigger that sleeps, as a busy
 * database would): the new producer's claims must not read the rejected rows again while
 * their moves are under way (a claim reads the table's first rows, where they are): each
 * would be produced again (one more rejection, or, the broker's error spent here, a rejected
 * row published). */
Test(relay_faults, slow_dead_letter_moves_keep_rejected_rows_out)
{
    struct e2e e;
    struct e2e_run run;
    start_one_in_flight(&e, "deadslow", 10, 10, 100, &run);
    pgtest_exec(e.conn, "CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS "
                        "$$ BEGIN PERFORM pg_sleep(0.05); RETURN NEW; END $$; "
                        "CREATE TRIGGER slow BEFORE INSERT ON saga.outbox_dead_letters "
                        "FOR EACH ROW EXECUTE FUNCTION slow()");
    const long total = 600;
    devbroker_command(&e.broker, "errors Produce 1 INVALID_RECORD");
    e2e_insert(&e, 100, total);
    if (!e2e_wait_table_empty(&e, "saga.outbox", 30000)) {
        proc_dump(&run.relay, "relay", 6000);
        cr_assert_fail("%ld rows left in the outbox", e2e_table_count(&e, "saga.outbox"));
    }
    long ndead;
    bool *dead = read_dead_letters(&e, 100, total, &ndead);
    cr_assert_gt(ndead, 0, "no row in the dead-letter table");
    cr_assert_eq(ndead, rejected_in_log(&run.relay), "%ld dead letters, %ld rejected messages",
                 ndead, rejected_in_log(&run.relay));
    verify_all_but_dead(&e, run.c, total, dead);
    free(dead);
    e2e_finish(&e, &run);
}

/* As above, but the dead-letter moves fail for a while (a trigger refuses the inserts, as a
 * revoked privilege would): the rows behind still go on, the rejected rows stay in the outbox
 * and, when claims read them again, are not produced again (that would be one more rejection
 * and one more new producer, or here, with the broker's error spent, a rejected row
 * published); once the moves work they end in the dead-letter table. */
Test(relay_faults, rejected_rows_stay_out_while_their_moves_fail)
{
    struct e2e e;
    struct e2e_run run;
    start_one_in_flight(&e, "deadfail", 10, 10, 100, &run);
    pgtest_exec(e.conn, "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS "
                        "$$ BEGIN RAISE EXCEPTION 'dead letters refused for the test'; END $$; "
                        "CREATE TRIGGER refuse BEFORE INSERT ON saga.outbox_dead_letters "
                        "FOR EACH ROW EXECUTE FUNCTION refuse()");
    const long total = 600;
    devbroker_command(&e.broker, "errors Produce 1 INVALID_RECORD");
    e2e_insert(&e, 100, total);
    size_t at = 0;
    cr_assert(proc_wait_log(&run.relay, "dead letters refused for the test", &at, 20000, NULL, 0),
              "no dead-letter move was refused");
    /* The rows behind arrive while the moves fail (all but the rejected ones, fewer than 100:
     * the rows of the failed request); the rejected ones wait in the outbox. */
    long arrived = 0;
    if (!e2e_wait_all_but(run.c, total, 100, 30000, &arrived)) {
        proc_dump(&run.relay, "relay", 12000);
        cr_assert_fail("%ld of %ld rows arrived while the dead-letter moves failed", arrived,
                       total);
    }
    cr_assert(e2e_table_count(&e, "saga.outbox") > 0, "no rejected row waits in the outbox");
    cr_assert_eq(e2e_table_count(&e, "saga.outbox_dead_letters"), 0);
    double restarts = 0;
    char *body = NULL;
    if (e2e_http_get(run.port, "/metrics", &body) == 200)
        restarts = e2e_metric(body, "relay_producer_restarts_total");
    free(body);
    cr_assert(restarts >= 1 && restarts <= 2, "%.0f producer restarts", restarts);
    /* The moves work again: the rejected rows end in the dead-letter table, never delivered. */
    pgtest_exec(e.conn, "DROP TRIGGER refuse ON saga.outbox_dead_letters");
    if (!e2e_wait_table_empty(&e, "saga.outbox", 20000)) {
        proc_dump(&run.relay, "relay", 12000);
        cr_assert_fail("%ld rows left in the outbox", e2e_table_count(&e, "saga.outbox"));
    }
    long ndead;
    bool *dead = read_dead_letters(&e, 100, total, &ndead);
    cr_assert_gt(ndead, 0, "the rejected rows are not in the dead-letter table");
    cr_assert_eq(ndead, rejected_in_log(&run.relay), "%ld dead letters, %ld rejected messages",
                 ndead, rejected_in_log(&run.relay));
    verify_all_but_dead(&e, run.c, total, dead);
    fprintf(stderr, "rejected_rows_stay_out_while_their_moves_fail: %ld dead letters\n", ndead);
    free(dead);
    e2e_finish(&e, &run);
}

/* A fatal error that fails no message: the broker refuses the producer id
 * (CLUSTER_AUTHORIZATION_FAILED on InitProducerId, as without the IdempotentWrite ACL). No
 * table pauses (nothing failed), so the relay spaces its new producers itself: 100, 200,
 * 400 ms while none delivers (it made a new producer every 100 ms); once the broker accepts,
 * every row arrives. */
Test(relay_faults, refused_producer_id_backs_off)
{
    struct e2e e;
    e2e_setup(&e, "pidrefused", 4);
    struct e2e_run run;
    run.c = e2e_consume(&e);
    devbroker_command(&e.broker, "errors InitProducerId 3 CLUSTER_AUTHORIZATION_FAILED");
    e2e_insert(&e, 0, 20);
    e2e_relay_start(&e, &run.relay, NULL);
    size_t at = 0;
    const char *pauses[] = {"100 ms after the last one", "200 ms after the last one",
                            "400 ms after the last one"};
    for (int i = 0; i < 3; i++)
        if (!proc_wait_log(&run.relay, pauses[i], &at, 15000, NULL, 0)) {
            proc_dump(&run.relay, "relay", 8000);
            cr_assert_fail("refusal %d: no \"%s\"", i + 1, pauses[i]);
        }
    cr_assert(e2e_wait_all(run.c, 20, 30000, NULL), "the rows did not arrive once accepted");
    cr_assert(e2e_wait_table_empty(&e, "saga.outbox", 20000));
    e2e_verify(&e, run.c, 20, false);
    e2e_finish(&e, &run);
}

/* A Produce error that keeps coming back (a broker policy rejecting every request, here four
 * in a row) makes the relay start over each time, after a pause that doubles (100, 200, 400,
 * 800 ms: it was a hot loop of claims), and back to 100 ms after a success. Nothing is lost. */
Test(relay_faults, repeated_delivery_failures_back_off)
{
    struct e2e e;
    e2e_setup(&e, "failpause", 4);
    struct e2e_run run;
    run.c = e2e_consume(&e);
    e2e_relay_start(&e, &run.relay, NULL);
    e2e_insert(&e, 0, 10);
    cr_assert(e2e_wait_all(run.c, 10, 30000, NULL));
    devbroker_command(&e.broker, "errors Produce 4 POLICY_VIOLATION");
    e2e_insert(&e, 10, 11); /* one row: one Produce request per attempt */
    size_t at = 0;
    const char *pauses[] = {"retrying in 100 ms", "retrying in 200 ms", "retrying in 400 ms",
                            "retrying in 800 ms"};
    for (int i = 0; i < 4; i++)
        cr_assert(proc_wait_log(&run.relay, pauses[i], &at, 15000, NULL, 0),
                  "attempt %d: no \"%s\"", i + 1, pauses[i]);
    cr_assert(e2e_wait_all(run.c, 11, 30000, NULL), "the row did not arrive after the errors");
    devbroker_command(&e.broker, "errors Produce 1 POLICY_VIOLATION");
    e2e_insert(&e, 11, 12);
    cr_assert(proc_wait_log(&run.relay, "retrying in 100 ms", &at, 15000, NULL, 0),
              "the pause did not start again from 100 ms after a success");
    e2e_expect_all(&e, &run, 12, 30000, false);
    e2e_finish(&e, &run);
}

/* Kafka refuses the relay's writes to a topic (TOPIC_AUTHORIZATION_FAILED: an ACL missing,
 * then fixed): the rows wait in the table (not dead-lettered: an operator's fix makes them
 * publishable), the errors are counted and logged with their name, and once the writes are
 * allowed again every row arrives. */
Test(relay_faults, topic_authorization_failed_waits)
{
    struct e2e e;
    e2e_setup(&e, "acl", 4);
    struct e2e_run run;
    const char *env[] = {"RELAY_RECONNECT_MAX=2s", NULL};
    e2e_start(&e, &run, env);
    e2e_insert(&e, 0, 10);
    cr_assert(e2e_wait_all(run.c, 10, 30000, NULL));
    devbroker_command(&e.broker, "errors Produce 3 TOPIC_AUTHORIZATION_FAILED");
    e2e_insert(&e, 10, 11);
    /* librdkafka reports the refusal as a failed delivery and, with the gapless guarantee,
     * stops the producer (a new one follows after a pause); a producer that remembers the
     * refusal refuses the topic at produce time until its next metadata refresh. Every path
     * pauses, doubling: "... in 200 ms" comes after the first refusal. */
    size_t at = 0;
    cr_assert(proc_wait_log(&run.relay, "Topic authorization failed", &at, 15000, NULL, 0),
              "the refusal was not logged");
    if (!proc_wait_log(&run.relay, " in 200 ms", &at, 15000, NULL, 0)) {
        proc_dump(&run.relay, "relay", 12000);
        cr_assert_fail("the pause does not grow");
    }
    cr_assert(e2e_wait_all(run.c, 11, 30000, NULL), "the row did not arrive once allowed");
    cr_assert(e2e_wait_metric(
        run.port, e2e_series(&e, "relay_publish_errors_total{table=\"saga.outbox\"}"), 1, 5000));
    cr_assert_eq(e2e_table_count(&e, "saga.outbox_dead_letters"), 0, "nothing dead-lettered");
    cr_assert(e2e_wait_table_empty(&e, "saga.outbox", 20000));
    e2e_verify(&e, run.c, 11, false);
    e2e_finish(&e, &run);
}

/* First delivery of the message whose id is given, as an index into the consumer's arrival
 * order, or -1. */
static long first_delivery(struct kconsumer *c, const char *id)
{
    size_t n;
    struct kmsg **msgs = kconsumer_snapshot(c, &n);
    long at = -1;
    for (size_t i = 0; i < n && at < 0; i++) {
        const char *mid = kmsg_header(msgs[i], "message-id", NULL);
        if (mid && !strcmp(mid, id))
            at = (long)i;
    }
    free(msgs);
    return at;
}

/* A claim still running when a delivery failure makes the relay start over (a new
 * generation) must not be used: its rows come from above the old cursor, and publishing them
 * first would put a row before an earlier row of its key that the new generation publishes
 * again. Made deterministic with a table lock that holds the claim while the failure
 * arrives. */
Test(relay_faults, claim_in_flight_during_reset)
{
    struct e2e e;
    e2e_setup(&e, "stale", 10);
    struct e2e_run run;
    e2e_start(&e, &run, NULL);
    /* Warm up (topic metadata, producer id) with a model row. */
    e2e_insert(&e, 0, 1);
    cr_assert(e2e_wait_all(run.c, 1, 30000, NULL));
    cr_assert(e2e_wait_table_empty(&e, "saga.outbox", 20000));

    /* Row A: its Produce request fails (not retriable), but only after a delay. */
    devbroker_command(&e.broker, "rtt 1 1000");
    devbroker_command(&e.broker, "errors Produce 1 POLICY_VIOLATION");
    const char *params[] = {e.topic_a};
    PQclear(pgtest_query(e.conn,
                         "INSERT INTO saga.outbox (id, topic, key, event_type, payload) VALUES "
                         "('ffffffff-0000-4000-8000-00000000000a', $1, 'same', 'A', '{}')",
                         1, params));
    cr_assert(e2e_wait_metric(run.port,
                              e2e_series(&e, "relay_rows_claimed_total{table=\"saga.outbox\"}"), 2,
                              15000),
              "row A was not claimed");
    /* Row B, same key, committed while the table is locked: the relay's next claim (its
     * fallback poll) waits for the lock. */
    PGconn *locker = pgtest_connect(e.db.url);
    pgtest_exec(locker, "BEGIN; LOCK TABLE saga.outbox IN ACCESS EXCLUSIVE MODE");
    PQclear(pgtest_query(locker,
                         "INSERT INTO saga.outbox (id, topic, key, event_type, payload) VALUES "
                         "('ffffffff-0000-4000-8000-00000000000b', $1, 'same', 'B', '{}')",
                         1, params));
    const char *dbname[] = {e.db.name};
    int64_t deadline = proc_now_ms() + 15000;
    while (pgtest_count(e.conn,
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 "
                        "AND wait_event_type = 'Lock'",
                        1, dbname) == 0) {
        cr_assert(proc_now_ms() < deadline, "the relay's claim never waited for the lock");
        struct timespec ts = {0, 10 * 1000000L};
        nanosleep(&ts, NULL);
    }
    /* The failure of A arrives while the claim waits. */
    cr_assert(proc_wait_log(&run.relay, "publishing the table again", NULL, 15000, NULL, 0),
              "no delivery failure");
    devbroker_command(&e.broker, "rtt 1 0");
    pgtest_exec(locker, "COMMIT");
    PQfinish(locker);

    int64_t until = proc_now_ms() + 30000;
    long a, b;
    while (((a = first_delivery(run.c, "ffffffff-0000-4000-8000-00000000000a")) < 0 ||
            (b = first_delivery(run.c, "ffffffff-0000-4000-8000-00000000000b")) < 0) &&
           proc_now_ms() < until)
        kconsumer_wait_count(run.c, kconsumer_count(run.c) + 1, 200);
    b = first_delivery(run.c, "ffffffff-0000-4000-8000-00000000000b");
    if (a < 0 || b < 0)
        proc_dump(&run.relay, "relay", 6000);
    cr_assert(a >= 0 && b >= 0, "A or B never arrived (A at %ld, B at %ld)", a, b);
    cr_assert_lt(a, b, "B (later seq, same key) was delivered before A");
    cr_assert(e2e_wait_table_empty(&e, "saga.outbox", 20000));
    e2e_finish(&e, &run);
}

/* Three brokers: partition leaders move, and a broker that leads some partitions goes down
 * and comes back, while rows flow. Nothing is lost, the first deliveries keep the order per
 * key, the table drains. */
Test(relay_faults, leaders_move_and_a_broker_fails)
{
    struct e2e e;
    const char *brokers[] = {"--brokers", "3", NULL};
    e2e_setup_broker(&e, "leaders", 24, brokers);
    struct e2e_run run;
    run.c = e2e_consume(&e);
    const char *env[] = {"RELAY_BATCH_SIZE=100", "KAFKA_TOPIC_METADATA_REFRESH_INTERVAL_MS=1000",
                         "KAFKA_RECONNECT_BACKOFF_MAX_MS=500", NULL};
    e2e_relay_start(&e, &run.relay, env);
    e2e_insert(&e, 0, 300);
    cr_assert(e2e_wait_all(run.c, 300, 30000, NULL));
    const long total = 3300;
    long from = 300;
    for (int round = 0; round < 6; round++) {
        /* Move every partition of topic a to the next broker, then insert. */
        for (int p = 0; p < 4; p++)
            devbroker_command(&e.broker, "leader %s %d %d", e.topic_a, p, 1 + (p + round) % 3);
        if (round == 2)
            devbroker_command(&e.broker, "down 2");
        if (round == 4)
            devbroker_command(&e.broker, "up 2");
        e2e_insert(&e, from, from + 500);
        from += 500;
    }
    size_t dups = e2e_expect_all(&e, &run, total, 90000, false);
    fprintf(stderr, "leaders_move_and_a_broker_fails: %zu duplicates, %zu resets\n", dups,
            proc_count_log(&run.relay, "publishing the table again"));
    if (dups) {
        char *log = proc_read_stdout(&run.relay);
        fprintf(stderr, "%s\n", log);
        free(log);
    }
    e2e_finish(&e, &run);
}

/* A rolling restart: the leader gets SIGTERM while rows flow, finishes what it claimed and
 * exits 0; the standby takes over; every row arrives, in order per key. */
Test(relay_faults, sigterm_leader_hands_over)
{
    struct e2e e;
    e2e_setup(&e, "rolling", 20);
    struct kconsumer *c = e2e_consume(&e);
    const char *env[] = {"RELAY_LEADER_RETRY=200ms", "RELAY_BATCH_SIZE=100",
                         "RELAY_MAX_INFLIGHT=300", NULL};
    struct proc relays[2];
    e2e_relay_start(&e, &relays[0], env);
    e2e_relay_start(&e, &relays[1], env);
    int leader = first_to_log(relays, "leading: publishing", 15000);
    cr_assert(leader >= 0, "no relay leads within 15 s");
    int standby = 1 - leader;
    cr_assert(proc_wait_log(&relays[standby], "standing by", NULL, 15000, NULL, 0));
    const long total = 4000;
    for (long from = 0; from < 2000; from += 500)
        e2e_insert(&e, from, from + 500);
    cr_assert(kconsumer_wait_count(c, 300, 30000), "no flow");
    e2e_relay_stop(&relays[leader]);
    for (long from = 2000; from < total; from += 500)
        e2e_insert(&e, from, from + 500);
    cr_assert(proc_wait_log(&relays[standby], "leading: publishing", NULL, 15000, NULL, 0),
              "the standby did not take over");
    long distinct = 0;
    if (!e2e_wait_all(c, total, 60000, &distinct)) {
        proc_dump(&relays[standby], "standby", 6000);
        cr_assert_fail("%ld of %ld rows arrived", distinct, total);
    }
    cr_assert(e2e_wait_table_empty(&e, "saga.outbox", 20000));
    size_t dups = e2e_verify(&e, c, total, false);
    /* The leader deleted what it published before it let go: no row twice. */
    cr_assert_eq(dups, 0, "%zu duplicates after a graceful handover", dups);
    e2e_relay_stop(&relays[standby]);
    proc_cleanup(&relays[0]);
    proc_cleanup(&relays[1]);
    kconsumer_stop(c);
    e2e_teardown(&e);
}
