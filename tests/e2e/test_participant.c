/* example-participant end to end: the real binary against a throwaway PostgreSQL and the dev
 * broker. Commands are produced with librdkafka as outbox-relay would publish them; the
 * replies are checked in the participant's outbox (publishing them is the relay's job). */
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <criterion/criterion.h>
#include <librdkafka/rdkafka.h>

#include "devbroker.h"
#include "pgtest.h"
#include "proc.h"

static struct pgtest_db db;
static PGconn *conn;
static struct devbroker broker;

static void setup(void)
{
    conn = pgtest_fresh(&db, false);
    const char *args[] = {"--topic", "inventory.commands:2", NULL};
    devbroker_start(&broker, args);
}

static void teardown(void)
{
    devbroker_stop(&broker);
    PQfinish(conn);
    pgtest_db_drop(&db);
}

TestSuite(participant, .init = setup, .fini = teardown, .timeout = 180);

static void participant_start_session(struct proc *p, const char *session_timeout);

static void participant_start(struct proc *p)
{
    participant_start_session(p, "KAFKA_SESSION_TIMEOUT_MS=6000");
}

static void participant_start_session(struct proc *p, const char *session_timeout)
{
    const char *bin = getenv("SAGA_PARTICIPANT_BIN");
    cr_assert(bin && *bin, "SAGA_PARTICIPANT_BIN is not set (run the test through meson)");
    static char url[1100], brokers[300];
    snprintf(url, sizeof(url), "PARTICIPANT_DATABASE_URL=%s", db.url);
    snprintf(brokers, sizeof(brokers), "PARTICIPANT_KAFKA_BROKERS=%s", broker.bootstrap);
    const char *argv[] = {bin, "--service", "inventory", "--retry-max", "200ms", NULL};
    /* The mock cluster keeps a group in rebalance for session.timeout.ms - 1 s after its last
     * member left: a short session lets the second participant of a test join quickly. */
    const char *env[] = {url,
                         brokers,
                         "PARTICIPANT_LOG_LEVEL=debug",
                         session_timeout,
                         "KAFKA_HEARTBEAT_INTERVAL_MS=1000",
                         NULL};
    struct proc_options opts = {.name = "participant"};
    proc_start(p, argv, env, &opts);
    if (!proc_wait_log(p, "example participant starting", NULL, 30000, NULL, 0)) {
        proc_dump(p, "example-participant", 8192);
        cr_assert_fail("example-participant did not start");
    }
}

static void participant_stop(struct proc *p)
{
    proc_signal(p, SIGTERM);
    bool exited = proc_wait_exit(p, 30000);
    if (!exited || proc_exit_code(p) != 0)
        proc_dump(p, "example-participant", 8192);
    cr_assert(exited, "no exit within 30 s of SIGTERM");
    cr_assert_eq(proc_exit_code(p), 0);
    cr_assert(proc_count_log(p, "example participant stopped") == 1);
}

static rd_kafka_t *producer_new(void)
{
    char err[512];
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    cr_assert_eq(rd_kafka_conf_set(conf, "bootstrap.servers", broker.bootstrap, err, sizeof(err)),
                 RD_KAFKA_CONF_OK, "%s", err);
    rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, err, sizeof(err));
    cr_assert(rk, "%s", err);
    return rk;
}

/* Produces one message to inventory.commands; headers are name/value pairs ending in NULL. */
static void produce(rd_kafka_t *rk, const char *key, const char *value, ...)
{
    rd_kafka_headers_t *hdrs = rd_kafka_headers_new(12);
    va_list ap;
    va_start(ap, value);
    const char *name;
    while ((name = va_arg(ap, const char *)) != NULL) {
        const char *v = va_arg(ap, const char *);
        rd_kafka_header_add(hdrs, name, -1, v, -1);
    }
    va_end(ap);
    rd_kafka_resp_err_t err = rd_kafka_producev(
        rk, RD_KAFKA_V_TOPIC("inventory.commands"), RD_KAFKA_V_KEY(key, strlen(key)),
        RD_KAFKA_V_VALUE((void *)value, strlen(value)), RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
        RD_KAFKA_V_HEADERS(hdrs), RD_KAFKA_V_END);
    cr_assert_eq(err, RD_KAFKA_RESP_ERR_NO_ERROR, "%s", rd_kafka_err2str(err));
}

static void flush(rd_kafka_t *rk)
{
    cr_assert_eq(rd_kafka_flush(rk, 10000), RD_KAFKA_RESP_ERR_NO_ERROR);
    cr_assert_eq(rd_kafka_outq_len(rk), 0);
}

static const char items[] = "{\"orderId\": \"o-1\", \"items\": [{\"sku\": \"a\", \"qty\": 2}]}";

/* Produces a ReserveStock command of saga (key o-1: every command of a test on one partition,
 * in order) with the given payload. */
static void produce_reserve_of(rd_kafka_t *rk, const char *saga, const char *msgid,
                               const char *payload)
{
    char ikey[128];
    snprintf(ikey, sizeof(ikey), "%s/reserve_inventory/action", saga);
    produce(rk, "o-1", payload, "message-id", msgid, "event-type", "ReserveStock", "saga-id", saga,
            "saga-name", "order_fulfillment", "saga-step", "reserve_inventory", "saga-phase",
            "action", "idempotency-key", ikey, "reply-to", "saga.replies", "correlation-id",
            "corr-1", "traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            NULL);
}

static void produce_reserve(rd_kafka_t *rk, const char *saga, const char *msgid)
{
    produce_reserve_of(rk, saga, msgid, items);
}

static long outbox_rows(void)
{
    return pgtest_count(conn, "SELECT count(*) FROM inventory.outbox", 0, NULL);
}

/* Waits (bounded, woken by the outbox trigger's NOTIFY) until the outbox holds n rows. */
static void wait_outbox_rows(struct proc *p, long n)
{
    int64_t deadline = proc_now_ms() + 30000;
    while (outbox_rows() < n) {
        int64_t left = deadline - proc_now_ms();
        if (left <= 0) {
            proc_dump(p, "example-participant", 8192);
            cr_assert_fail("the outbox has %ld rows, expected %ld", outbox_rows(), n);
        }
        PGnotify *note = pgtest_wait_notify(conn, (int)(left < 1000 ? left : 1000));
        if (note)
            PQfreemem(note);
    }
}

/* Waits (a bounded poll, each round waiting 20 ms in the server) until a handle_commands call in
 * this test's database (other suites share the cluster) other than other's (NULL: any) waits for
 * a lock (of type wait_event, e.g. "advisory"; NULL: any); fails the test with the participant's
 * log and message otherwise. */
static void wait_batch_waits(struct proc *p, const char *wait_event, PGconn *other,
                             const char *message)
{
    char pid[16];
    snprintf(pid, sizeof(pid), "%d", other ? PQbackendPID(other) : 0);
    const char *params[] = {wait_event, pid};
    int64_t deadline = proc_now_ms() + 30000;
    while (pgtest_count(conn,
                        "SELECT count(*) FROM pg_stat_activity, pg_sleep(0.02)"
                        " WHERE wait_event_type = 'Lock' AND wait_event = coalesce($1, wait_event)"
                        "   AND pid <> $2::int AND query LIKE '%handle_commands%'"
                        "   AND datname = current_database()", /* not another test's */
                        2, params) == 0) {
        if (proc_now_ms() > deadline) {
            proc_dump(p, "example-participant", 8192);
            cr_assert_fail("%s", message);
        }
    }
}

Test(participant, handles_commands_skips_malformed_ones_and_commits_offsets)
{
    struct proc p;
    participant_start(&p);
    cr_assert(proc_wait_log(&p, "schema applied", NULL, 1000, NULL, 0));
    pgtest_exec(conn, "INSERT INTO inventory.stock VALUES ('a', 10)");
    pgtest_exec(conn, "LISTEN saga_outbox");

    rd_kafka_t *rk = producer_new();
    produce(rk, "o-1", "not json", "message-id", "bad-1", NULL);
    produce_reserve(rk, "s1", "m1");
    produce(rk, "o-1", items, "message-id", "bad-2", "event-type", "ReserveStock", NULL);
    produce_reserve(rk, "s1", "m2"); /* the orchestrator's retry: same idempotency-key */
    flush(rk);

    wait_outbox_rows(&p, 2);
    cr_assert_eq(pgtest_count(conn, "SELECT available FROM inventory.stock", 0, NULL), 8);
    cr_assert_eq(pgtest_count(conn,
                              "SELECT count(*) FROM inventory.outbox WHERE topic = 'saga.replies' "
                              "AND key = 's1' AND event_type = 'ReserveStock.Reply' "
                              "AND headers->>'outcome' = 'success' "
                              "AND headers->>'in-reply-to' IN ('m1', 'm2') "
                              "AND headers->>'correlation-id' = 'corr-1' "
                              "AND payload->>'reservationId' = "
                              "(SELECT id::text FROM inventory.reservations)",
                              0, NULL),
                 2);
    cr_assert(proc_wait_log(&p, "malformed command skipped", NULL, 10000, NULL, 0));
    participant_stop(&p);
    cr_assert_eq(proc_count_log(&p, "malformed command skipped"), 2);
    cr_assert(proc_count_log(&p, "\\\"malformed\\\":2"), "exit counts");
    proc_cleanup(&p);

    /* Offsets were committed: a new participant in the same group handles only the new
     * command (a redelivery would add replay replies to the outbox). */
    struct proc p2;
    participant_start(&p2);
    produce_reserve(rk, "s2", "m3");
    flush(rk);
    wait_outbox_rows(&p2, 3);
    participant_stop(&p2);
    cr_assert_eq(outbox_rows(), 3);
    cr_assert_eq(pgtest_count(conn, "SELECT available FROM inventory.stock", 0, NULL), 6);
    proc_cleanup(&p2);
    rd_kafka_destroy(rk);
}

/* SIGTERM with a broker that answers nothing (60 s round trips): the participant still exits 0
 * within seconds. (The close's bound is tested in test_kafka_conf.c, where it fails without
 * it; here librdkafka returned within seconds either way.) */
Test(participant, sigterm_with_the_broker_gone_exits_within_seconds)
{
    struct proc p;
    participant_start_session(&p, "KAFKA_SESSION_TIMEOUT_MS=45000");
    cr_assert(proc_wait_log(&p, "schema applied", NULL, 1000, NULL, 0));
    pgtest_exec(conn, "INSERT INTO inventory.stock VALUES ('a', 10)");
    rd_kafka_t *rk = producer_new();
    produce_reserve(rk, "s1", "m1");
    flush(rk);
    wait_outbox_rows(&p, 1); /* a member of the group, partitions assigned */
    rd_kafka_destroy(rk);
    devbroker_command(&broker, "rtt all 60000");
    proc_signal(&p, SIGTERM);
    bool exited = proc_wait_exit(&p, 15000);
    if (!exited || proc_exit_code(&p) != 0)
        proc_dump(&p, "example-participant", 8192);
    cr_assert(exited, "no exit within 15 s of SIGTERM with the broker gone");
    cr_assert_eq(proc_exit_code(&p), 0);
    cr_assert(proc_count_log(&p, "example participant stopped") == 1);
    proc_cleanup(&p);
}

Test(participant, retries_a_batch_the_database_refused)
{
    struct proc p;
    participant_start(&p);
    pgtest_exec(conn, "INSERT INTO inventory.stock VALUES ('a', 10)");
    /* Without its outbox, handle_commands fails: the batch must be retried, not lost. */
    pgtest_exec(conn, "ALTER TABLE inventory.outbox RENAME TO outbox_away");
    rd_kafka_t *rk = producer_new();
    produce_reserve(rk, "s1", "m1");
    flush(rk);
    size_t from = 0;
    if (!proc_wait_log(&p, "batch not committed", &from, 30000, NULL, 0)) {
        proc_dump(&p, "example-participant", 8192);
        cr_assert_fail("no database error reported");
    }
    cr_assert(proc_wait_log(&p, "batch not committed", &from, 30000, NULL, 0), "retried");
    pgtest_exec(conn, "LISTEN saga_outbox");
    pgtest_exec(conn, "ALTER TABLE inventory.outbox_away RENAME TO outbox");
    wait_outbox_rows(&p, 1);
    cr_assert_eq(pgtest_count(conn, "SELECT available FROM inventory.stock", 0, NULL), 8);
    participant_stop(&p);
    proc_cleanup(&p);
    rd_kafka_destroy(rk);
}

Test(participant, isolates_a_command_the_database_refuses_and_handles_the_rest)
{
    struct proc p;
    participant_start(&p);
    pgtest_exec(conn, "INSERT INTO inventory.stock VALUES ('a', 10)");
    /* A data error outside handle_commands' per-command guard fails the whole call: here a
     * trigger refuses the inbox row of one command. The others must still be handled. */
    pgtest_exec(conn,
                "CREATE FUNCTION inventory.poison() RETURNS trigger LANGUAGE plpgsql AS $$ "
                "BEGIN IF NEW.message_id = 'poison' THEN "
                "RAISE EXCEPTION 'refused' USING ERRCODE = '22023'; END IF; RETURN NEW; END $$; "
                "CREATE TRIGGER poison BEFORE INSERT ON inventory.inbox "
                "FOR EACH ROW EXECUTE FUNCTION inventory.poison()");
    pgtest_exec(conn, "LISTEN saga_outbox");
    rd_kafka_t *rk = producer_new();
    produce_reserve(rk, "s1", "m1");
    produce_reserve(rk, "s2", "poison");
    produce_reserve(rk, "s3", "m3");
    flush(rk);
    wait_outbox_rows(&p, 2);
    cr_assert(proc_wait_log(&p, "the database refused a command; skipped", NULL, 10000, NULL, 0));
    participant_stop(&p);
    cr_assert_eq(pgtest_count(conn,
                              "SELECT count(*) FROM inventory.outbox "
                              "WHERE headers->>'in-reply-to' IN ('m1', 'm3')",
                              0, NULL),
                 2);
    cr_assert_eq(outbox_rows(), 2);
    cr_assert_eq(pgtest_count(conn, "SELECT available FROM inventory.stock", 0, NULL), 6);
    proc_cleanup(&p);
    rd_kafka_destroy(rk);
}

Test(participant, sigterm_finishes_the_batch_in_hand_and_commits_it)
{
    struct proc p;
    participant_start(&p);
    pgtest_exec(conn, "INSERT INTO inventory.stock VALUES ('a', 10)");
    /* Hold the batch inside its transaction: the inbox insert waits for an advisory lock the
     * test holds. */
    pgtest_exec(conn, "SELECT pg_advisory_lock(4242)");
    pgtest_exec(conn, "CREATE FUNCTION inventory.hold() RETURNS trigger LANGUAGE plpgsql AS $$ "
                      "BEGIN PERFORM pg_advisory_xact_lock(4242); RETURN NEW; END $$; "
                      "CREATE TRIGGER hold BEFORE INSERT ON inventory.inbox "
                      "FOR EACH ROW EXECUTE FUNCTION inventory.hold()");
    pgtest_exec(conn, "LISTEN saga_outbox");
    rd_kafka_t *rk = producer_new();
    produce_reserve(rk, "s1", "m1");
    flush(rk);

    wait_batch_waits(&p, "advisory", NULL, "the batch never reached the database");
    proc_signal(&p, SIGTERM);
    cr_assert(proc_wait_log(&p, "stopping: finishing the batch in hand", NULL, 10000, NULL, 0));
    pgtest_exec(conn, "SELECT pg_advisory_unlock(4242)");
    participant_stop(&p);
    cr_assert_eq(outbox_rows(), 1);
    proc_cleanup(&p);

    /* Its offset was committed: the next participant does not get m1 again. */
    pgtest_exec(conn, "DROP TRIGGER hold ON inventory.inbox");
    struct proc p2;
    participant_start(&p2);
    produce_reserve(rk, "s2", "m2");
    flush(rk);
    wait_outbox_rows(&p2, 2);
    participant_stop(&p2);
    cr_assert_eq(outbox_rows(), 2);
    cr_assert_eq(pgtest_count(conn, "SELECT available FROM inventory.stock", 0, NULL), 6);
    proc_cleanup(&p2);
    rd_kafka_destroy(rk);
}

/* handle_commands' argument for one ReserveStock of qty 1 of sku, as the participant builds it
 * (the test's own session plays a second replica). */
static void reserve_json(char *out, size_t len, const char *saga, const char *sku)
{
    snprintf(out, len,
             "[{\"message_id\": \"%s-m\", \"headers\": {\"message-id\": \"%s-m\", "
             "\"event-type\": \"ReserveStock\", \"saga-id\": \"%s\", \"saga-step\": "
             "\"reserve_inventory\", \"saga-phase\": \"action\", \"idempotency-key\": "
             "\"%s/reserve_inventory/action\", \"reply-to\": \"saga.replies\"}, "
             "\"payload\": {\"orderId\": \"o-%s\", \"items\": [{\"sku\": \"%s\", \"qty\": 1}]}}]",
             saga, saga, saga, saga, saga, sku);
}

/* The reply to msgid: "<outcome> <reservationId>" (the reservation must be saga's). */
static void assert_one_reply(const char *msgid, const char *saga)
{
    const char *params[] = {msgid, saga};
    cr_assert_eq(pgtest_count(conn,
                              "SELECT count(*) FROM inventory.outbox o"
                              " WHERE o.headers->>'in-reply-to' = $1",
                              1, params),
                 1, "one reply to %s", msgid);
    cr_assert_eq(pgtest_count(conn,
                              "SELECT count(*) FROM inventory.outbox o"
                              "  JOIN inventory.reservations r"
                              "    ON r.id::text = o.payload->>'reservationId'"
                              " WHERE o.headers->>'in-reply-to' = $1 AND o.key = $2"
                              "   AND o.headers->>'outcome' = 'success' AND r.saga_id = $2"
                              "   AND r.status = 'reserved'",
                              2, params),
                 1, "the reply to %s is a success naming saga %s's reservation", msgid, saga);
}

/* Two replicas' batches that lock the same two stock rows in opposite orders deadlock (the
 * comment above inventory.execute's row locks). The test's own session plays the other
 * replica: one transaction, [t1: b], then [t2: a]. The participant gets m0 (c) and then m1
 * (a and b, which it locks in sku order: a, then b, where it waits for the replica). When the
 * replica asks for a, PostgreSQL aborts the participant's batch (40P01); its retry must apply
 * each command once and reply to each once, whether m0 came in m1's batch or before it.
 *
 * Who is aborted: the backend whose deadlock_timeout expires while the cycle exists looks for
 * it and aborts its own transaction, and it looks once per wait. The participant waits first
 * (for b), so its look must come after the replica closed the cycle: the participant's
 * sessions get 5 s (ALTER DATABASE), the replica 10 min. The test closes the cycle as soon as
 * it sees the participant wait, so 5 s is a margin, not a measurement: on a machine stalled
 * for longer, the wait for the participant's 40P01 fails the test, with its log. */
Test(participant, a_deadlocked_batch_is_retried_and_applied_once)
{
    char sql[256];
    snprintf(sql, sizeof(sql), "ALTER DATABASE %s SET deadlock_timeout = '5s'", db.name);
    pgtest_exec(conn, sql);
    struct proc p;
    participant_start(&p);
    pgtest_exec(conn, "INSERT INTO inventory.stock VALUES ('a', 10), ('b', 10), ('c', 10)");

    /* The other replica: holds b's row until it commits. */
    PGconn *replica = pgtest_connect(db.url);
    pgtest_exec(replica, "SET deadlock_timeout = '10min'");
    pgtest_exec(replica, "BEGIN");
    char batch[1024];
    reserve_json(batch, sizeof(batch), "t1", "b");
    const char *params[] = {batch};
    PQclear(pgtest_query(replica, "SELECT inventory.handle_commands($1::jsonb)", 1, params));

    rd_kafka_t *rk = producer_new();
    produce_reserve_of(rk, "s0", "m0",
                       "{\"orderId\": \"o-0\", \"items\": [{\"sku\": \"c\", "
                       "\"qty\": 2}]}");
    produce_reserve_of(rk, "s1", "m1",
                       "{\"orderId\": \"o-1\", \"items\": [{\"sku\": \"b\", "
                       "\"qty\": 2}, {\"sku\": \"a\", \"qty\": 2}]}");
    flush(rk);
    /* Until m1 waits for b, holding a. */
    wait_batch_waits(&p, NULL, replica, "the participant's batch never waited for b's row");

    /* The replica now wants a: the cycle. */
    reserve_json(batch, sizeof(batch), "t2", "a");
    cr_assert(PQsendQueryParams(replica, "SELECT inventory.handle_commands($1::jsonb)", 1, NULL,
                                params, NULL, NULL, 0),
              "%s", PQerrorMessage(replica));
    if (!proc_wait_log(&p, "\"sqlstate\":\"40P01\"", NULL, 30000, NULL, 0)) {
        proc_dump(&p, "example-participant", 8192);
        cr_assert_fail("the participant's batch was not the one aborted by the deadlock");
    }
    PGresult *res = PQgetResult(replica); /* its wait for a ended with the abort */
    cr_assert_eq(PQresultStatus(res), PGRES_TUPLES_OK, "the replica's batch: %s",
                 PQresultErrorMessage(res));
    PQclear(res);
    while ((res = PQgetResult(replica)) != NULL)
        PQclear(res);
    pgtest_exec(conn, "LISTEN saga_outbox");
    pgtest_exec(replica, "COMMIT");
    PQfinish(replica);

    /* The retry (it waited for the replica's commit) applies m1 once, and m0 once. */
    wait_outbox_rows(&p, 4);
    participant_stop(&p);
    cr_assert_eq(outbox_rows(), 4, "t1, t2, m0, m1: one reply each");
    assert_one_reply("m0", "s0");
    assert_one_reply("m1", "s1");
    assert_one_reply("t1-m", "t1");
    assert_one_reply("t2-m", "t2");
    char *stock = pgtest_value(
        conn, "SELECT string_agg(sku || '=' || available, ' ' ORDER BY sku) FROM inventory.stock",
        0, NULL);
    /* a: 10 - 1 (t2) - 2 (s1); b: 10 - 1 (t1) - 2 (s1); c: 10 - 2 (s0). */
    cr_assert_str_eq(stock, "a=7 b=7 c=8", "stock %s", stock);
    free(stock);
    cr_assert_eq(pgtest_count(conn,
                              "SELECT count(*) FROM inventory.reservations"
                              " WHERE status = 'reserved'",
                              0, NULL),
                 4, "t1, t2, s0, s1 reserved once each");
    cr_assert_eq(
        pgtest_count(conn, "SELECT count(DISTINCT saga_id) FROM inventory.reservations", 0, NULL),
        4, "one reservation per saga");
    cr_assert_eq(pgtest_count(conn,
                              "SELECT count(*) FROM inventory.inbox WHERE replies = 1"
                              " AND idempotency_key IN ('s0/reserve_inventory/action',"
                              "                         's1/reserve_inventory/action')",
                              0, NULL),
                 2, "each command recorded once, answered once");
    /* One database error (the deadlock); m0 and m1 handled once each in the end. */
    cr_assert_eq(proc_count_log(&p, "\"sqlstate\":\"40P01\""), 1);
    cr_assert(proc_count_log(&p, "\\\"handled\\\":2,"), "exit counts: two commands handled");
    cr_assert(proc_count_log(&p, "\\\"db_errors\\\":1}"), "exit counts: one database error");
    proc_cleanup(&p);
    rd_kafka_destroy(rk);
}
