/* The example participants' SQL (examples/contract.sql, examples/<service>/schema.sql):
 * <service>.handle_commands against a real PostgreSQL, without Kafka. Each test gets a fresh
 * database with the saga schema and one service's schema. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <criterion/criterion.h>

#include "pgtest.h"

static struct pgtest_db db;
static PGconn *conn;

/* Commands passed straight to handle() are freed at teardown (ASan checks for leaks). */
static char *made[64];
static size_t made_count;

static void setup(void)
{
    conn = pgtest_fresh(&db, true);
}

static void teardown(void)
{
    for (size_t i = 0; i < made_count; i++)
        free(made[i]);
    made_count = 0;
    PQfinish(conn);
    pgtest_db_drop(&db);
}

TestSuite(participants, .init = setup, .fini = teardown, .timeout = 120);

static char *read_file(const char *rel)
{
    const char *root = getenv("SAGA_SOURCE_ROOT");
    cr_assert(root, "SAGA_SOURCE_ROOT is not set");
    char path[1024];
    snprintf(path, sizeof(path), "%s/%s", root, rel);
    FILE *f = fopen(path, "r");
    cr_assert(f, "cannot read %s", path);
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *text = calloc(1, (size_t)len + 1);
    cr_assert(text);
    cr_assert_eq(fread(text, 1, (size_t)len, f), (size_t)len);
    fclose(f);
    return text;
}

/* examples/contract.sql with __SERVICE__ replaced by service, as example-participant applies
 * it (examples/embed-schemas.py). Caller frees. */
static char *read_contract(const char *service)
{
    char *text = read_file("examples/contract.sql");
    const char *mark = "__SERVICE__";
    size_t count = 0;
    for (const char *at = text; (at = strstr(at, mark)) != NULL; at += strlen(mark))
        count++;
    cr_assert(count > 0, "examples/contract.sql has no %s", mark);
    char *out = malloc(strlen(text) + count * strlen(service) + 1);
    cr_assert(out);
    char *w = out;
    const char *r = text;
    for (const char *at; (at = strstr(r, mark)) != NULL; r = at + strlen(mark)) {
        memcpy(w, r, (size_t)(at - r));
        w += at - r;
        memcpy(w, service, strlen(service));
        w += strlen(service);
    }
    strcpy(w, r);
    free(text);
    return out;
}

/* The contract, then the service's own schema, as example-participant applies them. */
static void install(const char *service)
{
    char *contract = read_contract(service);
    pgtest_exec(conn, contract);
    free(contract);
    char rel[256];
    snprintf(rel, sizeof(rel), "examples/%s/schema.sql", service);
    char *sql = read_file(rel);
    pgtest_exec(conn, sql);
    free(sql);
}

/* One command as handle_commands takes it. Message ids are "<saga>-<tag>". */
static char *command(const char *saga, const char *step, const char *phase, const char *type,
                     const char *msgid, const char *payload)
{
    char *out = NULL;
    int n = asprintf(&out,
                     "{\"message_id\": \"%s\", \"headers\": {\"message-id\": \"%s\", "
                     "\"event-type\": \"%s\", \"saga-id\": \"%s\", \"saga-name\": "
                     "\"order_fulfillment\", \"saga-step\": \"%s\", \"saga-phase\": \"%s\", "
                     "\"idempotency-key\": \"%s/%s/%s\", \"reply-to\": \"saga.replies\", "
                     "\"correlation-id\": \"corr-%s\", \"traceparent\": "
                     "\"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\"}, "
                     "\"payload\": %s}",
                     msgid, msgid, type, saga, step, phase, saga, step, phase, saga, payload);
    cr_assert(n > 0);
    return out;
}

/* command() for handle()'s argument list: freed at teardown. */
static char *cmd_(const char *saga, const char *step, const char *phase, const char *type,
                  const char *msgid, const char *payload)
{
    cr_assert(made_count < sizeof(made) / sizeof(made[0]));
    return made[made_count++] = command(saga, step, phase, type, msgid, payload);
}

/* Calls <service>.handle_commands with the given items (NULL-terminated) and returns its
 * counts (caller frees). */
static char *handle(const char *service, ...)
{
    size_t cap = 64, len = 1;
    char *array = malloc(cap);
    cr_assert(array);
    strcpy(array, "[");
    va_list ap;
    va_start(ap, service);
    const char *item;
    while ((item = va_arg(ap, const char *)) != NULL) {
        size_t need = len + strlen(item) + 3;
        if (need > cap) {
            cap = need * 2;
            array = realloc(array, cap);
            cr_assert(array);
        }
        if (len > 1)
            array[len++] = ',';
        strcpy(array + len, item);
        len += strlen(item);
    }
    va_end(ap);
    strcpy(array + len, "]");
    char sql[128];
    snprintf(sql, sizeof(sql), "SELECT %s.handle_commands($1::jsonb)::text", service);
    const char *params[] = {array};
    char *counts = pgtest_value(conn, sql, 1, params);
    free(array);
    return counts;
}

/* handle() with one command, freeing it; returns nothing. */
static void handle1(const char *service, char *cmd)
{
    free(handle(service, cmd, NULL));
    free(cmd);
}

static long count(const char *sql)
{
    return pgtest_count(conn, sql, 0, NULL);
}

static long count1(const char *sql, const char *param)
{
    const char *params[] = {param};
    return pgtest_count(conn, sql, 1, params);
}

/* A field of the reply to msgid: an SQL expression over the outbox row r. */
static char *reply_field(const char *service, const char *msgid, const char *expr)
{
    char sql[512];
    snprintf(sql, sizeof(sql), "SELECT %s FROM %s.outbox r WHERE r.headers->>'in-reply-to' = $1",
             expr, service);
    const char *params[] = {msgid};
    return pgtest_value(conn, sql, 1, params);
}

static void assert_reply(const char *service, const char *msgid, const char *field,
                         const char *expected)
{
    char *v = reply_field(service, msgid, field);
    cr_assert(v, "reply to %s: %s is NULL", msgid, field);
    cr_assert_str_eq(v, expected, "reply to %s: %s", msgid, field);
    free(v);
}

static long replies_to(const char *service, const char *msgid)
{
    char sql[256];
    snprintf(sql, sizeof(sql), "SELECT count(*) FROM %s.outbox WHERE headers->>'in-reply-to' = $1",
             service);
    return count1(sql, msgid);
}

static long available(const char *sku)
{
    return count1("SELECT available FROM inventory.stock WHERE sku = $1", sku);
}

static const char reserve_ab[] = "{\"orderId\": \"o-1\", \"items\": [{\"sku\": \"a\", \"qty\": 2}, "
                                 "{\"sku\": \"b\", \"qty\": 1}]}";

/* ---------------------------------------------------------------------------------------
 * inventory
 * ------------------------------------------------------------------------------------- */

/* Lines given out of sku order, one sku twice: the reservation keeps one line per sku, summed,
 * in sku order (the order inventory.execute locks the rows in), and takes each line's stock. */
Test(participants, inventory_reserve_sums_lines_per_sku_in_sku_order)
{
    install("inventory");
    pgtest_exec(conn, "INSERT INTO inventory.stock VALUES ('a', 5), ('b', 9), ('c', 4)");
    char *counts = handle("inventory",
                          cmd_("s1", "reserve_inventory", "action", "ReserveStock", "s1-m1",
                               "{\"orderId\": \"o-1\", \"items\": [{\"sku\": \"c\", \"qty\": 1}, "
                               "{\"sku\": \"b\", \"qty\": 1}, {\"sku\": \"a\", \"qty\": 2}, "
                               "{\"sku\": \"b\", \"quantity\": 3}]}"),
                          NULL);
    cr_assert(strstr(counts, "\"handled\": 1"), "%s", counts);
    free(counts);
    cr_assert_eq(available("a"), 3);
    cr_assert_eq(available("b"), 5);
    cr_assert_eq(available("c"), 3);
    char *items = pgtest_value(conn, "SELECT items::text FROM inventory.reservations", 0, NULL);
    cr_assert_str_eq(items, "[{\"qty\": 2, \"sku\": \"a\"}, {\"qty\": 4, \"sku\": \"b\"}, "
                            "{\"qty\": 1, \"sku\": \"c\"}]");
    free(items);
}

Test(participants, inventory_reserve_changes_stock_records_inbox_and_replies)
{
    install("inventory");
    pgtest_exec(conn, "INSERT INTO inventory.stock VALUES ('a', 5), ('b', 2)");
    char *counts = handle(
        "inventory", cmd_("s1", "reserve_inventory", "action", "ReserveStock", "s1-m1", reserve_ab),
        NULL);
    cr_assert(strstr(counts, "\"handled\": 1"), "%s", counts);
    free(counts);

    cr_assert_eq(available("a"), 3);
    cr_assert_eq(available("b"), 1);
    cr_assert_eq(count("SELECT count(*) FROM inventory.reservations WHERE status = 'reserved' "
                       "AND saga_id = 's1' AND order_id = 'o-1'"),
                 1);
    cr_assert_eq(count("SELECT count(*) FROM inventory.inbox WHERE idempotency_key = "
                       "'s1/reserve_inventory/action' AND outcome = 'success' AND message_id = "
                       "'s1-m1'"),
                 1);
    cr_assert_eq(count("SELECT count(*) FROM inventory.outbox"), 1);
    assert_reply("inventory", "s1-m1", "topic", "saga.replies");
    assert_reply("inventory", "s1-m1", "key", "s1");
    assert_reply("inventory", "s1-m1", "event_type", "ReserveStock.Reply");
    assert_reply("inventory", "s1-m1", "headers->>'outcome'", "success");
    assert_reply("inventory", "s1-m1", "headers->>'saga-id'", "s1");
    assert_reply("inventory", "s1-m1", "headers->>'correlation-id'", "corr-s1");
    assert_reply("inventory", "s1-m1", "headers->>'traceparent'",
                 "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
    /* Headers are strings only (the relay publishes them as they are); the new message-id is
     * the row id, which the relay adds. */
    assert_reply("inventory", "s1-m1",
                 "(SELECT string_agg(k || '=' || jsonb_typeof(v), ',' ORDER BY k) "
                 "FROM jsonb_each(r.headers) AS e(k, v))",
                 "correlation-id=string,in-reply-to=string,outcome=string,saga-id=string,"
                 "traceparent=string");
    assert_reply(
        "inventory", "s1-m1",
        "(r.payload->>'reservationId' = (SELECT id::text FROM inventory.reservations))::text",
        "true");
}

/* Stock rows are updated by every reservation: the table keeps room on its pages for the new
 * versions (fillfactor 50), so that the updates are HOT (no index entry). One update of every
 * row of a full table, counted in the updating transaction itself. */
Test(participants, inventory_stock_updates_stay_on_their_page)
{
    install("inventory");
    pgtest_exec(conn, "INSERT INTO inventory.stock SELECT 'sku-' || i, 100 "
                      "FROM generate_series(1, 2000) i");
    pgtest_exec(conn, "BEGIN");
    pgtest_exec(conn, "UPDATE inventory.stock SET available = available - 1");
    long hot = count("SELECT pg_stat_get_xact_tuples_hot_updated('inventory.stock'::regclass)");
    pgtest_exec(conn, "ROLLBACK");
    cr_assert_geq(hot, 1800, "%ld of 2000 stock updates were HOT", hot);
}

/* The schema is applied at every start: the fillfactor is set only the first time (an ALTER
 * TABLE at each start would rewrite the table's catalog row, lock it, and make every session
 * using it re-plan). */
Test(participants, inventory_fillfactor_is_set_once)
{
    install("inventory");
    char *before = pgtest_value(
        conn, "SELECT xmin::text FROM pg_class WHERE oid = 'inventory.stock'::regclass", 0, NULL);
    install("inventory");
    char *after = pgtest_value(
        conn, "SELECT xmin::text FROM pg_class WHERE oid = 'inventory.stock'::regclass", 0, NULL);
    cr_assert_str_eq(before, after,
                     "inventory.stock's catalog row was rewritten by a second start");
    char *options = pgtest_value(conn,
                                 "SELECT array_to_string(reloptions, ',') FROM pg_class WHERE "
                                 "oid = 'inventory.stock'::regclass",
                                 0, NULL);
    cr_assert_str_eq(options, "fillfactor=50");
    free(before);
    free(after);
    free(options);
}

Test(participants, inventory_same_idempotency_key_replies_again_and_changes_nothing)
{
    install("inventory");
    pgtest_exec(conn, "INSERT INTO inventory.stock VALUES ('a', 5), ('b', 2)");
    handle1("inventory",
            command("s1", "reserve_inventory", "action", "ReserveStock", "s1-m1", reserve_ab));
    /* The orchestrator's retry (new message-id) and a redelivery of the first, in one batch. */
    char *counts = handle(
        "inventory", cmd_("s1", "reserve_inventory", "action", "ReserveStock", "s1-m2", reserve_ab),
        cmd_("s1", "reserve_inventory", "action", "ReserveStock", "s1-m1", reserve_ab), NULL);
    cr_assert(strstr(counts, "\"replayed\": 2"), "%s", counts);
    free(counts);

    cr_assert_eq(available("a"), 3);
    cr_assert_eq(available("b"), 1);
    cr_assert_eq(count("SELECT count(*) FROM inventory.reservations"), 1);
    cr_assert_eq(count("SELECT count(*) FROM inventory.inbox"), 1);
    cr_assert_eq(replies_to("inventory", "s1-m1"), 2);
    cr_assert_eq(replies_to("inventory", "s1-m2"), 1);
    assert_reply("inventory", "s1-m2", "headers->>'outcome'", "success");
    cr_assert_eq(count("SELECT count(DISTINCT payload) FROM inventory.outbox"), 1);
    cr_assert_eq(count("SELECT count(DISTINCT id) FROM inventory.outbox"), 3);
}

Test(participants, inventory_out_of_stock_is_all_or_nothing)
{
    install("inventory");
    pgtest_exec(conn, "INSERT INTO inventory.stock VALUES ('a', 5), ('b', 0)");
    handle1("inventory",
            command("s1", "reserve_inventory", "action", "ReserveStock", "s1-m1", reserve_ab));
    assert_reply("inventory", "s1-m1", "headers->>'outcome'", "failure");
    assert_reply("inventory", "s1-m1", "payload::text",
                 "{\"sku\": \"b\", \"reason\": \"out of stock\"}");
    cr_assert_eq(available("a"), 5);
    cr_assert_eq(available("b"), 0);
    cr_assert_eq(count("SELECT count(*) FROM inventory.reservations"), 0);

    /* An unknown sku is out of stock too; the failure is recorded and replayed as it was. */
    handle1("inventory",
            command("s2", "reserve_inventory", "action", "ReserveStock", "s2-m1",
                    "{\"orderId\": \"o-2\", \"items\": [{\"sku\": \"zz\", \"qty\": 1}]}"));
    assert_reply("inventory", "s2-m1", "payload->>'sku'", "zz");
    pgtest_exec(conn, "INSERT INTO inventory.stock VALUES ('zz', 10)");
    handle1("inventory",
            command("s2", "reserve_inventory", "action", "ReserveStock", "s2-m2",
                    "{\"orderId\": \"o-2\", \"items\": [{\"sku\": \"zz\", \"qty\": 1}]}"));
    assert_reply("inventory", "s2-m2", "headers->>'outcome'", "failure");
    cr_assert_eq(available("zz"), 10);
}

Test(participants, inventory_release_gives_stock_back_exactly_once)
{
    install("inventory");
    pgtest_exec(conn, "INSERT INTO inventory.stock VALUES ('a', 5), ('b', 2)");
    handle1("inventory",
            command("s1", "reserve_inventory", "action", "ReserveStock", "s1-m1", reserve_ab));
    /* The payload's reservationId is null (the action's reply was lost): the recorded reply
     * still finds the reservation. */
    handle1("inventory", command("s1", "reserve_inventory", "compensation", "ReleaseStock", "s1-c1",
                                 "{\"orderId\": \"o-1\", \"reservationId\": null}"));
    cr_assert_eq(available("a"), 5);
    cr_assert_eq(available("b"), 2);
    assert_reply("inventory", "s1-c1", "headers->>'outcome'", "success");
    assert_reply("inventory", "s1-c1", "event_type", "ReleaseStock.Reply");
    cr_assert_eq(count("SELECT count(*) FROM inventory.reservations WHERE status = 'released'"), 1);

    /* Retried and redelivered compensations, and a late retry of the action: nothing more. */
    handle1("inventory", command("s1", "reserve_inventory", "compensation", "ReleaseStock", "s1-c2",
                                 "{\"orderId\": \"o-1\"}"));
    handle1("inventory",
            command("s1", "reserve_inventory", "action", "ReserveStock", "s1-m2", reserve_ab));
    cr_assert_eq(available("a"), 5);
    cr_assert_eq(available("b"), 2);
    assert_reply("inventory", "s1-c2", "headers->>'outcome'", "success");
    assert_reply("inventory", "s1-m2", "headers->>'outcome'", "success");
    cr_assert_eq(count("SELECT count(*) FROM inventory.reservations"), 1);
}

/* A new command and its redelivery in one batch: the second is answered from the first's
 * inbox row (written with the batch's others, before the second is looked up). */
Test(participants, inventory_a_new_command_twice_in_one_batch_is_handled_once)
{
    install("inventory");
    pgtest_exec(conn, "INSERT INTO inventory.stock VALUES ('a', 5), ('b', 2)");
    char *counts = handle(
        "inventory", cmd_("s1", "reserve_inventory", "action", "ReserveStock", "s1-m1", reserve_ab),
        cmd_("s2", "reserve_inventory", "action", "ReserveStock", "s2-m1", reserve_ab),
        cmd_("s1", "reserve_inventory", "action", "ReserveStock", "s1-m1", reserve_ab), NULL);
    cr_assert(strstr(counts, "\"handled\": 2") && strstr(counts, "\"replayed\": 1"), "%s", counts);
    free(counts);
    cr_assert_eq(available("a"), 1);
    cr_assert_eq(available("b"), 0);
    cr_assert_eq(count("SELECT count(*) FROM inventory.reservations"), 2);
    cr_assert_eq(replies_to("inventory", "s1-m1"), 2);
    cr_assert_eq(count("SELECT count(DISTINCT payload) FROM inventory.outbox "
                       "WHERE headers->>'in-reply-to' = 's1-m1'"),
                 1);
}

/* An action and its compensation in one batch (the participant lagged behind the saga's
 * timeout): the compensation finds the action's inbox row, which handle_batch writes with the
 * batch's others, and undoes it; then a new reservation in the same batch still succeeds. */
Test(participants, inventory_reserve_and_release_in_one_batch_give_the_stock_back)
{
    install("inventory");
    pgtest_exec(conn, "INSERT INTO inventory.stock VALUES ('a', 5), ('b', 2)");
    char *counts = handle(
        "inventory", cmd_("s1", "reserve_inventory", "action", "ReserveStock", "s1-m1", reserve_ab),
        cmd_("s1", "reserve_inventory", "compensation", "ReleaseStock", "s1-c1",
             "{\"orderId\": \"o-1\", \"reservationId\": null}"),
        cmd_("s2", "reserve_inventory", "action", "ReserveStock", "s2-m1", reserve_ab), NULL);
    cr_assert(strstr(counts, "\"handled\": 3"), "%s", counts);
    free(counts);
    assert_reply("inventory", "s1-c1", "payload->>'released'", "true");
    cr_assert_eq(available("a"), 3);
    cr_assert_eq(available("b"), 1);
    cr_assert_eq(count("SELECT count(*) FROM inventory.reservations WHERE status = 'released'"), 1);
    cr_assert_eq(count("SELECT count(*) FROM inventory.inbox WHERE NOT tombstone"), 3);
}

/* Two replicas given the same command (a rebalance): replica A's batch [X, K] has looked its
 * keys up and waits for a stock row that B holds; B handles K and commits. A's batch then fails
 * at its inbox insert (unique violation) and leaves nothing behind; run again, it answers K as
 * a replay. K's reservation happens once. (A per-command lookup replayed K in A's first run;
 * an insert that skipped existing keys would have reserved K twice.) */
Test(participants, a_key_another_replica_commits_mid_batch_fails_the_batch_and_applies_once)
{
    install("inventory");
    pgtest_exec(conn, "INSERT INTO inventory.stock VALUES ('a', 100), ('b', 100)");
    PGconn *ra = pgtest_connect(db.url), *rb = pgtest_connect(db.url);
    char *pid = pgtest_value(ra, "SELECT pg_backend_pid()::text", 0, NULL);
    const char *on_b = "{\"orderId\": \"o-x\", \"items\": [{\"sku\": \"b\", \"qty\": 1}]}";
    const char *on_a = "{\"orderId\": \"o-k\", \"items\": [{\"sku\": \"a\", \"qty\": 1}]}";
    char *x = command("sx", "reserve_inventory", "action", "ReserveStock", "sx-m", on_b);
    char *k1 = command("sk", "reserve_inventory", "action", "ReserveStock", "sk-m1", on_a);
    char *k2 = command("sk", "reserve_inventory", "action", "ReserveStock", "sk-m2", on_a);
    char *batch_a = NULL, *batch_b = NULL;
    cr_assert(asprintf(&batch_a, "[%s, %s]", x, k1) > 0 && asprintf(&batch_b, "[%s]", k2) > 0);
    const char *sql = "SELECT inventory.handle_commands($1::jsonb)::text";

    pgtest_exec(rb, "BEGIN");
    pgtest_exec(rb, "SELECT 1 FROM inventory.stock WHERE sku = 'b' FOR UPDATE");
    const char *pa[] = {batch_a};
    cr_assert_eq(PQsendQueryParams(ra, sql, 1, NULL, pa, NULL, NULL, 0), 1, "%s",
                 PQerrorMessage(ra));
    pgtest_wait_blocked(conn, pid, 20000);
    const char *pb[] = {batch_b};
    char *counts_b = pgtest_value(rb, sql, 1, pb);
    cr_assert(strstr(counts_b, "\"handled\": 1"), "%s", counts_b);
    pgtest_exec(rb, "COMMIT");

    PGresult *res = PQgetResult(ra);
    cr_assert_eq(PQresultStatus(res), PGRES_FATAL_ERROR, "A's batch: %s",
                 PQresStatus(PQresultStatus(res)));
    cr_assert_str_eq(PQresultErrorField(res, PG_DIAG_SQLSTATE), "23505", "%s",
                     PQresultErrorMessage(res));
    PQclear(res);
    cr_assert_null(PQgetResult(ra));
    cr_assert_eq(available("a"), 99, "K reserved once, by B");
    cr_assert_eq(available("b"), 100, "X undone with A's batch");

    char *counts_a = pgtest_value(ra, sql, 1, pa); /* the participant's retry */
    cr_assert(strstr(counts_a, "\"handled\": 1") && strstr(counts_a, "\"replayed\": 1"), "%s",
              counts_a);
    cr_assert_eq(available("a"), 99);
    cr_assert_eq(available("b"), 99);
    cr_assert_eq(count("SELECT count(*) FROM inventory.reservations"), 2);
    cr_assert_eq(replies_to("inventory", "sk-m1"), 1);
    cr_assert_eq(replies_to("inventory", "sk-m2"), 1);

    free(counts_a);
    free(counts_b);
    free(batch_a);
    free(batch_b);
    free(x);
    free(k1);
    free(k2);
    free(pid);
    PQfinish(ra);
    PQfinish(rb);
}

/* The reservation's conditional UPDATE tests the stock of its snapshot and does not wait for
 * a transaction holding the row: one that is giving stock back (a release, a restock) would
 * make it answer "out of stock" for stock about to be there. A line found short is locked
 * (which waits for that transaction) and tried again. */
Test(participants, inventory_reserve_waits_for_stock_being_given_back)
{
    install("inventory");
    pgtest_exec(conn, "INSERT INTO inventory.stock VALUES ('a', 5)");
    PGconn *ra = pgtest_connect(db.url), *rb = pgtest_connect(db.url);
    char *pid = pgtest_value(ra, "SELECT pg_backend_pid()::text", 0, NULL);
    pgtest_exec(rb, "BEGIN");
    pgtest_exec(rb, "UPDATE inventory.stock SET available = available + 10 WHERE sku = 'a'");
    char *cmd = command("s1", "reserve_inventory", "action", "ReserveStock", "s1-m1",
                        "{\"orderId\": \"o-1\", \"items\": [{\"sku\": \"a\", \"qty\": 8}]}");
    char *batch = NULL;
    cr_assert(asprintf(&batch, "[%s]", cmd) > 0);
    const char *p[] = {batch};
    cr_assert_eq(PQsendQueryParams(ra, "SELECT inventory.handle_commands($1::jsonb)::text", 1, NULL,
                                   p, NULL, NULL, 0),
                 1, "%s", PQerrorMessage(ra));
    pgtest_wait_blocked(conn, pid, 20000); /* fails the test if the reservation did not wait */
    pgtest_exec(rb, "COMMIT");
    PGresult *res = PQgetResult(ra);
    cr_assert_eq(PQresultStatus(res), PGRES_TUPLES_OK, "%s", PQresultErrorMessage(res));
    PQclear(res);
    cr_assert_null(PQgetResult(ra));
    assert_reply("inventory", "s1-m1", "headers->>'outcome'", "success");
    cr_assert_eq(available("a"), 7);
    free(batch);
    free(cmd);
    free(pid);
    PQfinish(ra);
    PQfinish(rb);
}

Test(participants, inventory_every_item_needs_a_positive_qty_not_only_their_sum)
{
    install("inventory");
    pgtest_exec(conn, "INSERT INTO inventory.stock VALUES ('a', 10)");
    handle1("inventory", command("s1", "reserve_inventory", "action", "ReserveStock", "s1-m1",
                                 "{\"orderId\": \"o-1\", \"items\": [{\"sku\": \"a\", "
                                 "\"qty\": 5}, {\"sku\": \"a\", \"qty\": -3}]}"));
    assert_reply("inventory", "s1-m1", "payload->>'detail'",
                 "payload.items: every item needs a positive qty");
    cr_assert_eq(available("a"), 10);
}

Test(participants, inventory_release_before_reserve_is_a_noop_and_refuses_the_late_reserve)
{
    install("inventory");
    pgtest_exec(conn, "INSERT INTO inventory.stock VALUES ('a', 5), ('b', 2)");
    handle1("inventory", command("s1", "reserve_inventory", "compensation", "ReleaseStock", "s1-c1",
                                 "{\"orderId\": \"o-1\", \"reservationId\": null}"));
    assert_reply("inventory", "s1-c1", "headers->>'outcome'", "success");
    cr_assert_eq(available("a"), 5);

    handle1("inventory",
            command("s1", "reserve_inventory", "action", "ReserveStock", "s1-m1", reserve_ab));
    assert_reply("inventory", "s1-m1", "headers->>'outcome'", "failure");
    cr_assert_eq(available("a"), 5);
    cr_assert_eq(available("b"), 2);
    cr_assert_eq(count("SELECT count(*) FROM inventory.reservations"), 0);
    /* Another saga is not affected. */
    handle1("inventory",
            command("s2", "reserve_inventory", "action", "ReserveStock", "s2-m1", reserve_ab));
    assert_reply("inventory", "s2-m1", "headers->>'outcome'", "success");
}

Test(participants, inventory_release_after_a_failed_reserve_gives_nothing_back)
{
    install("inventory");
    pgtest_exec(conn, "INSERT INTO inventory.stock VALUES ('a', 5), ('b', 0)");
    handle1("inventory",
            command("s1", "reserve_inventory", "action", "ReserveStock", "s1-m1", reserve_ab));
    handle1("inventory", command("s1", "reserve_inventory", "compensation", "ReleaseStock", "s1-c1",
                                 "{\"orderId\": \"o-1\"}"));
    assert_reply("inventory", "s1-c1", "headers->>'outcome'", "success");
    cr_assert_eq(available("a"), 5);
    cr_assert_eq(available("b"), 0);
}

Test(participants, inventory_bad_commands_do_not_stop_the_batch)
{
    install("inventory");
    pgtest_exec(conn, "INSERT INTO inventory.stock VALUES ('a', 5), ('b', 2)");
    char *good = command("s1", "reserve_inventory", "action", "ReserveStock", "s1-m1", reserve_ab);
    char *bad_qty =
        command("s2", "reserve_inventory", "action", "ReserveStock", "s2-m1",
                "{\"orderId\": \"o-2\", \"items\": [{\"sku\": \"a\", \"qty\": \"x\"}]}");
    char *no_items = command("s3", "reserve_inventory", "action", "ReserveStock", "s3-m1",
                             "{\"orderId\": \"o-3\"}");
    char *unknown = command("s4", "reserve_inventory", "action", "CountStock", "s4-m1", "{}");
    char *no_sku = command("s5", "reserve_inventory", "action", "ReserveStock", "s5-m1",
                           "{\"orderId\": \"o-5\", \"items\": [{\"sku\": \"a\", \"qty\": 1}, "
                           "{\"sku\": \"\", \"qty\": 1}]}");
    char *counts = handle("inventory", "{\"payload\": {}}", bad_qty, "{\"headers\": {}}", no_items,
                          unknown, no_sku, good, NULL);
    cr_assert(strstr(counts, "\"skipped\": 2"), "%s", counts);
    cr_assert(strstr(counts, "\"handled\": 5"), "%s", counts);
    cr_assert(strstr(counts, "\"failed\": 4"), "%s", counts);
    free(counts);
    free(good);
    free(bad_qty);
    free(no_items);
    free(unknown);
    free(no_sku);
    assert_reply("inventory", "s1-m1", "headers->>'outcome'", "success");
    assert_reply("inventory", "s2-m1", "payload->>'reason'", "invalid command");
    assert_reply("inventory", "s3-m1", "payload->>'reason'", "invalid command");
    assert_reply("inventory", "s4-m1", "payload->>'reason'", "unknown command type");
    assert_reply("inventory", "s5-m1", "payload->>'detail'",
                 "payload.items: every item needs a sku (a non-empty string)");
    cr_assert_eq(available("a"), 3); /* the bad qty and the empty sku changed nothing */
    /* An invalid command is a recorded failure: its retry gets the same answer. */
    cr_assert_eq(count("SELECT count(*) FROM inventory.inbox WHERE outcome = 'failure'"), 4);
}

Test(participants, inventory_drop_and_fail_knobs)
{
    install("inventory");
    pgtest_exec(conn, "INSERT INTO inventory.stock VALUES ('a', 5), ('b', 2)");
    pgtest_exec(conn, "UPDATE inventory.behavior SET drop_next = 1, fail_next = 1");
    char *counts = handle(
        "inventory", cmd_("s1", "reserve_inventory", "action", "ReserveStock", "s1-m1", reserve_ab),
        cmd_("s1", "reserve_inventory", "action", "ReserveStock", "s1-m2", reserve_ab),
        cmd_("s1", "reserve_inventory", "action", "ReserveStock", "s1-m3", reserve_ab), NULL);
    cr_assert(strstr(counts, "\"dropped\": 1"), "%s", counts);
    free(counts);
    /* m1 dropped: no reply, nothing recorded. m2 failed without effect or record. m3 done. */
    cr_assert_eq(replies_to("inventory", "s1-m1"), 0);
    assert_reply("inventory", "s1-m2", "headers->>'outcome'", "failure");
    assert_reply("inventory", "s1-m2", "payload->>'reason'", "injected failure");
    assert_reply("inventory", "s1-m3", "headers->>'outcome'", "success");
    cr_assert_eq(available("a"), 3);
    cr_assert_eq(count("SELECT drop_next + fail_next FROM inventory.behavior"), 0);
    cr_assert_eq(count("SELECT count(*) FROM inventory.inbox"), 1);

    /* command_type limits the knobs to one command type. */
    pgtest_exec(conn, "UPDATE inventory.behavior SET drop_next = 1, command_type = 'ReleaseStock'");
    handle1("inventory",
            command("s2", "reserve_inventory", "action", "ReserveStock", "s2-m1", reserve_ab));
    assert_reply("inventory", "s2-m1", "headers->>'outcome'", "success");
    handle1("inventory", command("s2", "reserve_inventory", "compensation", "ReleaseStock", "s2-c1",
                                 "{\"orderId\": \"o-1\"}"));
    cr_assert_eq(replies_to("inventory", "s2-c1"), 0);
    cr_assert_eq(available("a"), 1);
}

Test(participants, inventory_delay_knob_sleeps_before_handling)
{
    install("inventory");
    pgtest_exec(conn, "INSERT INTO inventory.stock VALUES ('a', 5), ('b', 2)");
    pgtest_exec(conn, "UPDATE inventory.behavior SET delay_ms = 300");
    /* pg_sleep sleeps at least that long: a lower bound, never flaky. */
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    handle1("inventory",
            command("s1", "reserve_inventory", "action", "ReserveStock", "s1-m1",
                    "{\"orderId\": \"o\", \"items\": [{\"sku\": \"a\", \"qty\": 1}]}"));
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double ms = (double)(t1.tv_sec - t0.tv_sec) * 1000.0 + (double)(t1.tv_nsec - t0.tv_nsec) / 1e6;
    cr_assert_geq(ms, 300.0);
    cr_assert_eq(available("a"), 4);
}

Test(participants, schemas_apply_twice_and_keep_their_data)
{
    const char *services[] = {"inventory", "payment", "orders", "shipping"};
    for (size_t i = 0; i < 4; i++)
        install(services[i]);
    pgtest_exec(conn, "INSERT INTO inventory.stock VALUES ('a', 5)");
    pgtest_exec(conn, "UPDATE payment.settings SET decline_above = 50");
    for (size_t i = 0; i < 4; i++)
        install(services[i]);
    cr_assert_eq(available("a"), 5);
    cr_assert_eq(count("SELECT decline_above FROM payment.settings"), 50);
    cr_assert_eq(count("SELECT count(*) FROM payment.behavior"), 1);
    /* Each service has the outbox the relay expects, with its dead-letter table. */
    for (size_t i = 0; i < 4; i++) {
        char name[64];
        snprintf(name, sizeof(name), "%s.outbox_dead_letters", services[i]);
        cr_assert_eq(count1("SELECT count(*) FROM pg_class WHERE oid = to_regclass($1)", name), 1);
    }
}

/* The services' value rules are domains, not table CHECKs (a table's CHECKs are planned again
 * at every statement that writes it: each command's own INSERT or UPDATE), and every rule still
 * refuses a bad value. */
Test(participants, value_rules_are_domains_and_still_refuse)
{
    const char *services[] = {"inventory", "payment", "orders", "shipping"};
    for (size_t i = 0; i < 4; i++)
        install(services[i]);
    cr_assert_eq(count("SELECT count(*) FROM pg_constraint WHERE contype = 'c' AND conrelid IN "
                       "('inventory.stock'::regclass, 'inventory.reservations'::regclass, "
                       "'payment.payments'::regclass, 'orders.orders'::regclass, "
                       "'shipping.shipments'::regclass)"),
                 0, "a business table still has a CHECK");
    static const char *const bad[] = {
        "INSERT INTO inventory.stock VALUES ('a', -1)",
        "INSERT INTO inventory.reservations (saga_id, order_id, items, status) "
        "VALUES ('s', 'o', '[]', 'lost')",
        "INSERT INTO payment.payments (saga_id, order_id, customer_id, amount, status) "
        "VALUES ('s', 'o', 'c', 0, 'authorized')",
        "INSERT INTO payment.payments (saga_id, order_id, customer_id, amount, status) "
        "VALUES ('s', 'o', 'c', 1, 'pending')",
        "INSERT INTO orders.orders (order_id, saga_id, status) VALUES ('o', 's', 'maybe')",
        "INSERT INTO shipping.shipments (saga_id, order_id, status) VALUES ('s', 'o', 'lost')"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        char state[6], msg[256];
        pgtest_expect_error(conn, bad[i], 0, NULL, state, msg, sizeof(msg));
        cr_assert_str_eq(state, "23514", "%s: %s", bad[i], msg);
    }
    /* A stock going below zero through an update is refused too. */
    pgtest_exec(conn, "INSERT INTO inventory.stock VALUES ('a', 1)");
    char state[6];
    pgtest_expect_error(conn, "UPDATE inventory.stock SET available = available - 2", 0, NULL,
                        state, NULL, 0);
    cr_assert_str_eq(state, "23514");
    cr_assert_eq(available("a"), 1);
}

/* ---------------------------------------------------------------------------------------
 * payment
 * ------------------------------------------------------------------------------------- */

static const char pay_42[] =
    "{\"orderId\": \"o-1\", \"customerId\": \"c-1\", \"amount\": 42.5, \"reservationId\": \"r\"}";

Test(participants, payment_authorize_replay_and_refund_once)
{
    install("payment");
    handle1("payment",
            command("s1", "authorize_payment", "action", "AuthorizePayment", "s1-m1", pay_42));
    assert_reply("payment", "s1-m1", "headers->>'outcome'", "success");
    assert_reply("payment", "s1-m1", "event_type", "AuthorizePayment.Reply");
    assert_reply("payment", "s1-m1",
                 "(r.payload->>'authorizationId' = (SELECT id::text FROM payment.payments))::text",
                 "true");
    cr_assert_eq(count("SELECT count(*) FROM payment.payments WHERE status = 'authorized' AND "
                       "amount = 42.5 AND customer_id = 'c-1' AND saga_id = 's1'"),
                 1);

    handle1("payment",
            command("s1", "authorize_payment", "action", "AuthorizePayment", "s1-m2", pay_42));
    cr_assert_eq(count("SELECT count(*) FROM payment.payments"), 1);
    char *a = reply_field("payment", "s1-m1", "payload::text");
    char *b = reply_field("payment", "s1-m2", "payload::text");
    cr_assert_str_eq(a, b);
    free(a);
    free(b);

    handle1("payment", command("s1", "authorize_payment", "compensation", "RefundPayment", "s1-c1",
                               "{\"orderId\": \"o-1\", \"authorizationId\": null}"));
    handle1("payment", command("s1", "authorize_payment", "compensation", "RefundPayment", "s1-c2",
                               "{\"orderId\": \"o-1\"}"));
    assert_reply("payment", "s1-c1", "payload->>'refunded'", "true");
    assert_reply("payment", "s1-c2", "payload->>'refunded'", "true"); /* the same answer */
    cr_assert_eq(count("SELECT count(*) FROM payment.payments WHERE status = 'refunded'"), 1);
    cr_assert_eq(count("SELECT replies FROM payment.inbox WHERE idempotency_key = "
                       "'s1/authorize_payment/compensation'"),
                 2);
}

Test(participants, payment_declines_above_the_limit)
{
    install("payment");
    handle1("payment",
            command("s1", "authorize_payment", "action", "AuthorizePayment", "s1-m1",
                    "{\"orderId\": \"o-1\", \"customerId\": \"c\", \"amount\": 1000.01}"));
    assert_reply("payment", "s1-m1", "headers->>'outcome'", "failure");
    assert_reply("payment", "s1-m1", "payload::text", "{\"reason\": \"declined\"}");
    pgtest_exec(conn, "UPDATE payment.settings SET decline_above = 10");
    handle1("payment",
            command("s2", "authorize_payment", "action", "AuthorizePayment", "s2-m1", pay_42));
    assert_reply("payment", "s2-m1", "payload->>'reason'", "declined");
    cr_assert_eq(count("SELECT count(*) FROM payment.payments"), 0);
}

Test(participants, payment_refund_before_authorize_refuses_the_late_authorize)
{
    install("payment");
    handle1("payment", command("s1", "authorize_payment", "compensation", "RefundPayment", "s1-c1",
                               "{\"orderId\": \"o-1\", \"authorizationId\": null}"));
    assert_reply("payment", "s1-c1", "headers->>'outcome'", "success");
    handle1("payment",
            command("s1", "authorize_payment", "action", "AuthorizePayment", "s1-m1", pay_42));
    assert_reply("payment", "s1-m1", "headers->>'outcome'", "failure");
    cr_assert_eq(count("SELECT count(*) FROM payment.payments"), 0);
}

Test(participants, payment_drop_knob_lets_the_retry_through)
{
    install("payment");
    pgtest_exec(conn, "UPDATE payment.behavior SET drop_next = 2");
    for (int i = 1; i <= 3; i++) {
        char msgid[16];
        snprintf(msgid, sizeof(msgid), "s1-m%d", i);
        handle1("payment",
                command("s1", "authorize_payment", "action", "AuthorizePayment", msgid, pay_42));
    }
    cr_assert_eq(replies_to("payment", "s1-m1"), 0);
    cr_assert_eq(replies_to("payment", "s1-m2"), 0);
    assert_reply("payment", "s1-m3", "headers->>'outcome'", "success");
    cr_assert_eq(count("SELECT count(*) FROM payment.payments"), 1);
}

/* ---------------------------------------------------------------------------------------
 * orders
 * ------------------------------------------------------------------------------------- */

Test(participants, orders_approve_reject_and_replay)
{
    install("orders");
    pgtest_exec(conn, "UPDATE orders.settings SET reject_customers = '{c-bad}'");
    handle1("orders", command("s1", "approve_order", "action", "ApproveOrder", "s1-m1",
                              "{\"orderId\": \"o-1\", \"customerId\": \"c-1\", "
                              "\"authorizationId\": \"x\"}"));
    handle1("orders", command("s2", "approve_order", "action", "ApproveOrder", "s2-m1",
                              "{\"orderId\": \"o-2\", \"customerId\": \"c-bad\"}"));
    assert_reply("orders", "s1-m1", "headers->>'outcome'", "success");
    assert_reply("orders", "s1-m1", "event_type", "ApproveOrder.Reply");
    assert_reply("orders", "s2-m1", "headers->>'outcome'", "failure");
    assert_reply("orders", "s2-m1", "payload->>'reason'", "rejected");
    cr_assert_eq(count("SELECT count(*) FROM orders.orders WHERE order_id = 'o-1' AND status = "
                       "'approved' AND saga_id = 's1'"),
                 1);
    cr_assert_eq(count("SELECT count(*) FROM orders.orders WHERE order_id = 'o-2' AND status = "
                       "'rejected'"),
                 1);

    /* A retry after the customer was allowed still gets the recorded answer. */
    pgtest_exec(conn, "UPDATE orders.settings SET reject_customers = '{}'");
    handle1("orders", command("s2", "approve_order", "action", "ApproveOrder", "s2-m2",
                              "{\"orderId\": \"o-2\", \"customerId\": \"c-bad\"}"));
    assert_reply("orders", "s2-m2", "headers->>'outcome'", "failure");
    cr_assert_eq(count("SELECT count(*) FROM orders.orders WHERE status = 'rejected'"), 1);
}

/* ---------------------------------------------------------------------------------------
 * shipping
 * ------------------------------------------------------------------------------------- */

static const char ship[] = "{\"orderId\": \"o-1\", \"customerId\": \"c-1\", \"items\": "
                           "[{\"sku\": \"a\", \"qty\": 1}], \"reservationId\": \"r\"}";

Test(participants, shipping_fail_next_then_success_then_replay)
{
    install("shipping");
    pgtest_exec(conn, "UPDATE shipping.behavior SET fail_next = 2");
    for (int i = 1; i <= 4; i++) {
        char msgid[16];
        snprintf(msgid, sizeof(msgid), "s1-m%d", i);
        handle1("shipping",
                command("s1", "schedule_shipping", "action", "ScheduleShipment", msgid, ship));
    }
    assert_reply("shipping", "s1-m1", "headers->>'outcome'", "failure");
    assert_reply("shipping", "s1-m2", "headers->>'outcome'", "failure");
    assert_reply("shipping", "s1-m3", "headers->>'outcome'", "success");
    assert_reply("shipping", "s1-m4", "headers->>'outcome'", "success");
    assert_reply("shipping", "s1-m3", "event_type", "ScheduleShipment.Reply");
    assert_reply("shipping", "s1-m4",
                 "(r.payload->>'shipmentId' = (SELECT id::text FROM shipping.shipments))::text",
                 "true");
    cr_assert_eq(count("SELECT count(*) FROM shipping.shipments WHERE order_id = 'o-1' AND "
                       "status = 'scheduled'"),
                 1);
}

Test(participants, shipping_drop_next_sends_no_reply_and_records_nothing)
{
    install("shipping");
    pgtest_exec(conn, "UPDATE shipping.behavior SET drop_next = 1");
    handle1("shipping",
            command("s1", "schedule_shipping", "action", "ScheduleShipment", "s1-m1", ship));
    cr_assert_eq(count("SELECT count(*) FROM shipping.outbox"), 0);
    cr_assert_eq(count("SELECT count(*) FROM shipping.inbox"), 0);
    cr_assert_eq(count("SELECT count(*) FROM shipping.shipments"), 0);
    handle1("shipping",
            command("s1", "schedule_shipping", "action", "ScheduleShipment", "s1-m2", ship));
    assert_reply("shipping", "s1-m2", "headers->>'outcome'", "success");
    cr_assert_eq(count("SELECT count(*) FROM shipping.shipments"), 1);
}

/* ---------------------------------------------------------------------------------------
 * The contract part of handle_commands, the same in every service
 * ------------------------------------------------------------------------------------- */

/* Each service with an action that succeeds (inventory once its stock is in). */
static const struct {
    const char *service, *step, *action, *payload;
} services[] = {
    {"inventory", "reserve_inventory", "ReserveStock", reserve_ab},
    {"payment", "authorize_payment", "AuthorizePayment", pay_42},
    {"orders", "approve_order", "ApproveOrder",
     "{\"orderId\": \"o-1\", \"customerId\": \"c-1\", \"authorizationId\": \"x\"}"},
    {"shipping", "schedule_shipping", "ScheduleShipment", ship},
};

static void install_with_stock(const char *service)
{
    install(service);
    if (!strcmp(service, "inventory"))
        pgtest_exec(conn, "INSERT INTO inventory.stock VALUES ('a', 10), ('b', 10)");
}

/* "<in-reply-to>:<outcome> ..." of the service's outbox rows, in seq order (the relay's publish
 * order). Caller frees. */
static char *replies_in_seq_order(const char *service)
{
    char sql[256];
    snprintf(sql, sizeof(sql),
             "SELECT string_agg((headers->>'in-reply-to') || ':' || (headers->>'outcome'), ' '"
             " ORDER BY seq) FROM %s.outbox",
             service);
    return pgtest_value(conn, sql, 0, NULL);
}

/* One batch whose replies come from every path of handle_commands (a new command, a recorded
 * failure, a compensation before its action, a replay, an invalid command, an action refused
 * by its tombstone): the outbox rows' seq order is the commands' order in the batch, which is
 * what the relay publishes in, whatever path produced each reply. The message ids are in no
 * order of their own (neither sorted nor by saga), so that another order shows. */
Test(participants, replies_keep_the_order_of_the_batch_in_every_service)
{
    for (size_t i = 0; i < sizeof(services) / sizeof(services[0]); i++) {
        const char *svc = services[i].service, *step = services[i].step;
        install_with_stock(svc);
        char *counts =
            handle(svc, cmd_("p1", step, "action", services[i].action, "k7", services[i].payload),
                   cmd_("p2", step, "action", "NoSuchCommand", "k3", "{\"orderId\": \"o-2\"}"),
                   cmd_("p3", step, "compensation", "Undo", "k9", "{\"orderId\": \"o-3\"}"),
                   cmd_("p1", step, "action", services[i].action, "k2", services[i].payload),
                   cmd_("p5", step, "action", services[i].action, "k5", "{}"),
                   cmd_("p3", step, "action", services[i].action, "k1", services[i].payload), NULL);
        char *order = replies_in_seq_order(svc);
        cr_assert_str_eq(order, "k7:success k3:failure k9:success k2:success k5:failure k1:failure",
                         "%s: the replies in seq order: %s (counts %s)", svc, order, counts);
        free(order);
        free(counts);
    }
}

/* A batch with nothing to answer inserts no outbox row, and so sends no NOTIFY (the outbox's
 * trigger fires per statement, even for no rows, and wakes the relay for nothing): here
 * duplicates of an answered command and a new one that drop_next drops, a command without
 * reply-to (skipped), and an empty batch. The answered command's reply is the positive
 * control: it is inserted and notified. */
Test(participants, a_batch_with_nothing_to_answer_inserts_no_row_in_every_service)
{
    pgtest_exec(conn, "LISTEN saga_outbox");
    for (size_t i = 0; i < sizeof(services) / sizeof(services[0]); i++) {
        const char *svc = services[i].service, *step = services[i].step;
        install_with_stock(svc);
        PGnotify *note;
        while ((note = pgtest_poll_notify(conn)) != NULL) /* the earlier services' */
            PQfreemem(note);

        handle1(svc,
                command("q1", step, "action", services[i].action, "q1-m1", services[i].payload));
        note = pgtest_poll_notify(conn);
        cr_assert(note, "%s: a reply is notified", svc);
        PQfreemem(note);
        char sql[256];
        snprintf(sql, sizeof(sql), "DELETE FROM %s.outbox", svc); /* published by the relay */
        pgtest_exec(conn, sql);
        snprintf(sql, sizeof(sql), "UPDATE %s.behavior SET drop_next = 3", svc);
        pgtest_exec(conn, sql);

        /* No reply-to: skipped, and not counted against drop_next. */
        char *no_reply_to = cmd_("q3", step, "action", services[i].action, "q3-m1", "{}");
        char *at = strstr(no_reply_to, "\"reply-to\"");
        cr_assert(at);
        memcpy(at, "\"reply-xx\"", strlen("\"reply-xx\""));
        char *counts = handle(
            svc, cmd_("q1", step, "action", services[i].action, "q1-m2", services[i].payload),
            no_reply_to,
            cmd_("q1", step, "action", services[i].action, "q1-m3", services[i].payload),
            cmd_("q2", step, "action", services[i].action, "q2-m1", services[i].payload), NULL);
        char *empty = handle(svc, NULL);
        const char *params[] = {counts, empty};
        cr_assert_eq(
            pgtest_count(conn,
                         "SELECT count(*) FROM (VALUES ($1::jsonb, 3, 1), ($2::jsonb, 0, 0))"
                         "  AS c(counts, dropped, skipped)"
                         " WHERE (counts->>'dropped')::int = dropped"
                         "   AND (counts->>'skipped')::int = skipped"
                         "   AND (counts->>'handled')::int = 0"
                         "   AND (counts->>'replayed')::int = 0",
                         2, params),
            2, "%s: counts %s, then %s", svc, counts, empty);
        free(counts);
        free(empty);

        snprintf(sql, sizeof(sql), "SELECT count(*) FROM %s.outbox", svc);
        cr_assert_eq(count(sql), 0, "%s: no reply", svc);
        note = pgtest_poll_notify(conn);
        cr_assert_null(note, "%s: a NOTIFY on %s for no row", svc, note ? note->relname : "");
        snprintf(sql, sizeof(sql),
                 "SELECT string_agg(idempotency_key || '=' || replies, ' ') FROM %s.inbox", svc);
        char *inbox = pgtest_value(conn, sql, 0, NULL);
        char want[128];
        snprintf(want, sizeof(want), "q1/%s/action=1", step);
        cr_assert_str_eq(inbox, want, "%s: the inbox (dropped commands leave no row)", svc);
        free(inbox);
    }
}

/* A JSON array of n new actions of services[i] (sagas s0..s<n-1>). Caller frees. */
static char *new_actions(size_t i, int n)
{
    size_t cap = 1 << 17, len = 0;
    char *array = malloc(cap);
    cr_assert(array);
    array[len++] = '[';
    for (int k = 0; k < n; k++) {
        char saga[32], msgid[32];
        snprintf(saga, sizeof(saga), "s%d", k);
        snprintf(msgid, sizeof(msgid), "s%d-m", k);
        char *c = command(saga, services[i].step, "action", services[i].action, msgid,
                          services[i].payload);
        cr_assert(len + strlen(c) + 2 < cap);
        len += (size_t)sprintf(array + len, "%s%s", k ? "," : "", c);
        free(c);
    }
    array[len++] = ']';
    array[len] = '\0';
    return array;
}

/* The batch's inbox lookup probes the inbox's primary key, whatever its size: an EXISTS under
 * an OR was planned as a hashed subplan that reads the whole inbox at every batch, chosen up to
 * ~40,000 rows (and kept while the cached plan is not renewed). 20,000 rows analyzed, a batch
 * of 100 new commands: the scans of the inbox it adds (the session's counts, which also hold
 * its earlier transactions' until they are reported) are index scans only. */
Test(participants, a_batch_looks_up_the_inbox_by_its_key_not_by_a_scan)
{
    install("payment");
    pgtest_exec(conn, "INSERT INTO payment.inbox (idempotency_key, message_id, saga_id, event_type,"
                      " outcome, reply) SELECT 'old' || i || '/authorize_payment/action', 'm' || i,"
                      " 'old' || i, 'AuthorizePayment', 'success', '{}'"
                      " FROM generate_series(1, 20000) i");
    pgtest_exec(conn, "ANALYZE payment.inbox");
    const char *scans = "SELECT seq_scan || ' ' || idx_scan FROM pg_stat_xact_user_tables"
                        " WHERE relid = 'payment.inbox'::regclass";
    char *array = new_actions(1, 100);
    const char *params[] = {array};
    pgtest_exec(conn, "BEGIN");
    char *before = pgtest_value(conn, scans, 0, NULL);
    cr_assert_eq(pgtest_count(conn, "SELECT (payment.handle_commands($1::jsonb)->>'handled')::int",
                              1, params),
                 100);
    char *after = pgtest_value(conn, scans, 0, NULL);
    pgtest_exec(conn, "COMMIT");
    long seq0, idx0, seq1, idx1;
    cr_assert_eq(sscanf(before, "%ld %ld", &seq0, &idx0), 2);
    cr_assert_eq(sscanf(after, "%ld %ld", &seq1, &idx1), 2);
    cr_assert_eq(seq1, seq0,
                 "the inbox was read by a sequential scan (seq_scan idx_scan: %s, then %s)", before,
                 after);
    cr_assert_geq(idx1 - idx0, 100, "one probe a key (seq_scan idx_scan: %s, then %s)", before,
                  after);
    free(before);
    free(after);
    free(array);
}

/* A batch of valid commands takes one subtransaction, not one per command: past 64 in one
 * transaction PostgreSQL's snapshots overflow their cache of subtransaction ids, and every
 * session of the server then reads pg_subtrans to decide visibility (saga-bench: a quarter
 * more CPU per saga, in every database). A row's xmin is the id of the (sub)transaction that
 * wrote it: the business and inbox rows of 100 commands carry one. The isolating path (a
 * command that raises) is exercised by replies_keep_the_order_of_the_batch_in_every_service. */
Test(participants, a_batch_of_valid_commands_takes_one_subtransaction_in_every_service)
{
    const char *tables[] = {"inventory.reservations", "payment.payments", "orders.orders",
                            "shipping.shipments"};
    for (size_t i = 0; i < sizeof(services) / sizeof(services[0]); i++) {
        const char *svc = services[i].service;
        cr_assert(!strncmp(tables[i], svc, strlen(svc)));
        install_with_stock(svc);
        if (!strcmp(svc, "inventory"))
            pgtest_exec(conn, "UPDATE inventory.stock SET available = 1000");
        char *array = new_actions(i, 100);
        char sql[128];
        snprintf(sql, sizeof(sql), "SELECT (%s.handle_commands($1::jsonb)->>'handled')::int", svc);
        const char *params[] = {array};
        cr_assert_eq(pgtest_count(conn, sql, 1, params), 100, "%s: handled", svc);
        char rows[256];
        snprintf(rows, sizeof(rows),
                 "SELECT count(DISTINCT x) FROM (SELECT xmin::text AS x FROM %s UNION ALL "
                 "SELECT xmin::text FROM %s.inbox) AS w",
                 tables[i], svc);
        long writers = count(rows);
        cr_assert_eq(writers, 1, "%s and its inbox: rows written by %ld (sub)transactions",
                     tables[i], writers);
        free(array);
    }
}
