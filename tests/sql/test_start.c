/* The SQL API of schema saga: register_definition, start, retry, abort. */
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <criterion/criterion.h>

#include "pgtest.h"

static struct pgtest_db db;
static PGconn *conn;

static const char order_body[] =
    "{\"saga\": \"order_fulfillment\", \"version\": 1,"
    " \"input\": {\"required\": [\"orderId\", \"customerId\", \"items\", \"amount\"]},"
    " \"steps\": [{\"name\": \"reserve_inventory\"}]}";
static const char good_input[] =
    "{\"orderId\": \"o-1\", \"customerId\": \"c-1\", \"items\": [1, 2], \"amount\": 42}";

static void register_order(void)
{
    const char *params[] = {"order_fulfillment", "1", order_body};
    char *got =
        pgtest_value(conn, "SELECT saga.register_definition($1, $2::int, $3::jsonb)", 3, params);
    cr_assert_str_eq(got, "registered");
    free(got);
}

static void setup(void)
{
    conn = pgtest_fresh(&db, true);
    register_order();
}

static void teardown(void)
{
    PQfinish(conn);
    pgtest_db_drop(&db);
}

TestSuite(start, .init = setup, .fini = teardown, .timeout = 120);
TestSuite(definitions, .init = setup, .fini = teardown, .timeout = 120);
TestSuite(operator, .init = setup, .fini = teardown, .timeout = 120);
TestSuite(history, .init = setup, .fini = teardown, .timeout = 120);
TestSuite(client, .init = setup, .fini = teardown, .timeout = 120);

static long instance_count(PGconn *c)
{
    return pgtest_count(c, "SELECT count(*) FROM saga.instances", 0, NULL);
}

/* saga.start with text parameters (NULL: SQL NULL); returns the new id (caller frees). */
static char *start_saga(PGconn *c, const char *name, const char *input, const char *key)
{
    const char *params[] = {name, input, key};
    return pgtest_value(c, "SELECT saga.start($1, $2::jsonb, $3)", 3, params);
}

static char *receive_value(PGconn *c);

/* ---- register_definition ---------------------------------------------------------------- */

Test(definitions, registered_unchanged_conflict)
{
    /* The same content in another key order or spacing is the same jsonb: unchanged. */
    const char *same[] = {"order_fulfillment", "1",
                          "{\"version\": 1, \"steps\": [{\"name\": \"reserve_inventory\"}],"
                          "\"saga\":\"order_fulfillment\","
                          "\"input\":{\"required\":[\"orderId\",\"customerId\",\"items\","
                          "\"amount\"]}}"};
    char *got =
        pgtest_value(conn, "SELECT saga.register_definition($1, $2::int, $3::jsonb)", 3, same);
    cr_assert_str_eq(got, "unchanged");
    free(got);

    const char *other[] = {"order_fulfillment", "1", "{\"changed\": true}"};
    char state[6], msg[512];
    pgtest_expect_error(conn, "SELECT saga.register_definition($1, $2::int, $3::jsonb)", 3, other,
                        state, msg, sizeof(msg));
    cr_assert_str_eq(state, "SG020");
    cr_assert_str_eq(msg, "saga definition \"order_fulfillment\" version 1 is already registered "
                          "with different content; register a new version");

    const char *v2[] = {"order_fulfillment", "2", "{\"changed\": true}"};
    got = pgtest_value(conn, "SELECT saga.register_definition($1, $2::int, $3::jsonb)", 3, v2);
    cr_assert_str_eq(got, "registered");
    free(got);

    char *sum = pgtest_value(conn,
                             "SELECT checksum = md5(body::text) FROM saga.definitions "
                             "WHERE name = 'order_fulfillment' AND version = 2",
                             0, NULL);
    cr_assert_str_eq(sum, "t");
    free(sum);

    const char *bad[] = {"", "1", "{}"};
    pgtest_expect_error(conn, "SELECT saga.register_definition($1, $2::int, $3::jsonb)", 3, bad,
                        state, msg, sizeof(msg));
    cr_assert_str_eq(state, "22023");
    const char *zero[] = {"x", "0", "{}"};
    pgtest_expect_error(conn, "SELECT saga.register_definition($1, $2::int, $3::jsonb)", 3, zero,
                        state, msg, sizeof(msg));
    cr_assert_str_eq(state, "22023");
}

Test(definitions, concurrent_registration_of_one_version)
{
    PGconn *first = pgtest_connect(db.url);
    PGconn *second = pgtest_connect(db.url);
    char pid[16];
    snprintf(pid, sizeof(pid), "%d", PQbackendPID(second));
    const char *sql = "SELECT saga.register_definition($1, $2::int, $3::jsonb)";
    const char *a[] = {"race", "1", "{\"a\": 1}"};
    const char *b[] = {"race", "1", "{\"b\": 2}"};

    /* Same content: the second waits for the first, then finds it unchanged. */
    pgtest_exec(first, "BEGIN");
    PQclear(pgtest_query(first, sql, 3, a));
    cr_assert_eq(PQsendQueryParams(second, sql, 3, NULL, a, NULL, NULL, 0), 1);
    pgtest_wait_blocked(conn, pid, 20000);
    pgtest_exec(first, "COMMIT");
    char *got = receive_value(second);
    cr_assert_str_eq(got, "unchanged");
    free(got);

    /* Other content under a version being registered: the loser gets the conflict error. */
    a[1] = b[1] = "2";
    pgtest_exec(first, "BEGIN");
    PQclear(pgtest_query(first, sql, 3, a));
    cr_assert_eq(PQsendQueryParams(second, sql, 3, NULL, b, NULL, NULL, 0), 1);
    pgtest_wait_blocked(conn, pid, 20000);
    pgtest_exec(first, "COMMIT");
    PGresult *res = PQgetResult(second);
    cr_assert_eq(PQresultStatus(res), PGRES_FATAL_ERROR);
    cr_assert_str_eq(PQresultErrorField(res, PG_DIAG_SQLSTATE), "SG020");
    PQclear(res);
    cr_assert_null(PQgetResult(second));
    PQfinish(first);
    PQfinish(second);
}

/* ---- start ----------------------------------------------------------------------------- */

Test(start, inserts_a_pending_saga_with_the_latest_version)
{
    const char *v2[] = {"order_fulfillment", "2",
                        "{\"input\": {\"required\": [\"orderId\"]}, \"v\": 2}"};
    PQclear(pgtest_query(conn, "SELECT saga.register_definition($1, $2::int, $3::jsonb)", 3, v2));

    const char *params[] = {"order_fulfillment", "{\"orderId\": \"o-9\"}", "corr-1"};
    char *id =
        pgtest_value(conn, "SELECT saga.start($1, $2::jsonb, correlation_id => $3)", 3, params);
    cr_assert_not_null(id);
    const char *idp[] = {id};
    PGresult *res = pgtest_query(conn,
                                 "SELECT saga_name, saga_version, status, input->>'orderId', "
                                 "correlation_id, idempotency_key IS NULL, step_index, phase, "
                                 "attempt, wait, pivot_sent, replies::text, trace_id ~ "
                                 "'^[0-9a-f]{32}$', pending_request IS NULL "
                                 "FROM saga.instances WHERE id = $1",
                                 1, idp);
    cr_assert_eq(PQntuples(res), 1);
    cr_assert_str_eq(PQgetvalue(res, 0, 0), "order_fulfillment");
    cr_assert_str_eq(PQgetvalue(res, 0, 1), "2");
    cr_assert_str_eq(PQgetvalue(res, 0, 2), "pending");
    cr_assert_str_eq(PQgetvalue(res, 0, 3), "o-9");
    cr_assert_str_eq(PQgetvalue(res, 0, 4), "corr-1");
    cr_assert_str_eq(PQgetvalue(res, 0, 5), "t");
    cr_assert_str_eq(PQgetvalue(res, 0, 6), "0");
    cr_assert_str_eq(PQgetvalue(res, 0, 7), "action");
    cr_assert_str_eq(PQgetvalue(res, 0, 8), "0");
    cr_assert_str_eq(PQgetvalue(res, 0, 9), "none");
    cr_assert_str_eq(PQgetvalue(res, 0, 10), "f");
    cr_assert_str_eq(PQgetvalue(res, 0, 11), "{}");
    cr_assert_str_eq(PQgetvalue(res, 0, 12), "t");
    cr_assert_str_eq(PQgetvalue(res, 0, 13), "t");
    PQclear(res);
    free(id);

    /* Without a key, every call is a new saga, each with its own trace id. */
    char *a = start_saga(conn, "order_fulfillment", "{\"orderId\": 1}", NULL);
    char *b = start_saga(conn, "order_fulfillment", "{\"orderId\": 1}", NULL);
    cr_assert_str_neq(a, b);
    free(a);
    free(b);
    cr_assert_eq(instance_count(conn), 3);
    cr_assert_eq(pgtest_count(conn, "SELECT count(DISTINCT trace_id) FROM saga.instances", 0, NULL),
                 3);
}

/* Saga ids are time-ordered (version 7, sql/013): the version and variant bits, the time of
 * the call in their first 48 bits, and later sagas sort after earlier ones by id (a
 * millisecond apart at least: within one they are random). saga.uuid_v7 works under the
 * search_path saga.start runs with. */
Test(start, saga_ids_are_time_ordered_version_7)
{
    char *ids[3];
    for (int i = 0; i < 3; i++) {
        ids[i] = start_saga(conn, "order_fulfillment", good_input, NULL);
        PQclear(pgtest_query(conn, "SELECT pg_sleep(0.002)", 0, NULL));
    }
    for (int i = 0; i < 3; i++) {
        const char *p[] = {ids[i]};
        char *ok = pgtest_value(
            conn,
            "SELECT substr($1, 15, 1) = '7' AND substr($1, 20, 1) IN ('8', '9', 'a', 'b') AND "
            "abs(('x' || lpad(replace(left($1, 13), '-', ''), 16, '0'))::bit(64)::bigint - "
            "extract(epoch FROM clock_timestamp()) * 1000) < 60000",
            1, p);
        cr_expect_str_eq(ok, "t", "saga id %s: not a version 7 uuid of now", ids[i]);
        free(ok);
        if (i > 0)
            cr_expect(strcmp(ids[i - 1], ids[i]) < 0, "%s before %s", ids[i - 1], ids[i]);
    }
    for (int i = 0; i < 3; i++)
        free(ids[i]);
    pgtest_exec(conn, "SET search_path = pg_catalog, pg_temp");
    char *v = pgtest_value(conn, "SELECT substr(saga.uuid_v7()::text, 15, 1)", 0, NULL);
    cr_expect_str_eq(v, "7");
    free(v);
    pgtest_exec(conn, "RESET search_path");
}

Test(start, is_atomic_with_the_callers_transaction)
{
    pgtest_exec(conn, "CREATE TABLE public.orders (id text PRIMARY KEY)");

    pgtest_exec(conn, "BEGIN");
    pgtest_exec(conn, "INSERT INTO public.orders VALUES ('o-1')");
    free(start_saga(conn, "order_fulfillment", good_input, NULL));
    pgtest_exec(conn, "ROLLBACK");
    cr_assert_eq(instance_count(conn), 0);
    cr_assert_eq(pgtest_count(conn, "SELECT count(*) FROM public.orders", 0, NULL), 0);

    pgtest_exec(conn, "BEGIN");
    pgtest_exec(conn, "INSERT INTO public.orders VALUES ('o-1')");
    char *id = start_saga(conn, "order_fulfillment", good_input, NULL);
    pgtest_exec(conn, "COMMIT");
    cr_assert_eq(instance_count(conn), 1);
    cr_assert_eq(pgtest_count(conn, "SELECT count(*) FROM public.orders", 0, NULL), 1);
    const char *params[] = {id};
    cr_assert_eq(pgtest_count(conn, "SELECT count(*) FROM saga.instances WHERE id = $1", 1, params),
                 1);
    free(id);
}

Test(start, same_idempotency_key_returns_the_same_saga)
{
    char *a = start_saga(conn, "order_fulfillment", good_input, "order-1");
    char *b = start_saga(conn, "order_fulfillment", good_input, "order-1");
    cr_assert_str_eq(a, b);
    cr_assert_eq(instance_count(conn), 1);

    /* The key is per saga name. */
    const char *other[] = {"other_saga", "1", "{}"};
    PQclear(
        pgtest_query(conn, "SELECT saga.register_definition($1, $2::int, $3::jsonb)", 3, other));
    char *c = start_saga(conn, "other_saga", "{}", "order-1");
    cr_assert_str_neq(a, c);
    cr_assert_eq(instance_count(conn), 2);
    free(a);
    free(b);
    free(c);
}

/* Sends saga.start on c without waiting for the result. */
static void send_start(PGconn *c, const char *key)
{
    const char *params[] = {"order_fulfillment", good_input, key};
    cr_assert_eq(PQsendQueryParams(c, "SELECT saga.start($1, $2::jsonb, $3)", 3, NULL, params, NULL,
                                   NULL, 0),
                 1, "%s", PQerrorMessage(c));
}

static char *receive_value(PGconn *c)
{
    PGresult *res = PQgetResult(c);
    cr_assert_eq(PQresultStatus(res), PGRES_TUPLES_OK, "%s", PQresultErrorMessage(res));
    char *value = strdup(PQgetvalue(res, 0, 0));
    PQclear(res);
    cr_assert_null(PQgetResult(c));
    return value;
}

Test(start, concurrent_same_key_gives_one_saga)
{
    PGconn *first = pgtest_connect(db.url);
    PGconn *second = pgtest_connect(db.url);
    char pid[16];
    snprintf(pid, sizeof(pid), "%d", PQbackendPID(second));

    pgtest_exec(first, "BEGIN");
    char *a = start_saga(first, "order_fulfillment", good_input, "race-1");
    send_start(second, "race-1");
    /* The second waits on the unique index until the first ends. */
    pgtest_wait_blocked(conn, pid, 20000);
    pgtest_exec(first, "COMMIT");
    char *b = receive_value(second);
    cr_assert_str_eq(a, b);
    cr_assert_eq(instance_count(conn), 1);
    free(a);
    free(b);

    /* If the first rolls back, the second's own insert goes through. */
    pgtest_exec(first, "BEGIN");
    a = start_saga(first, "order_fulfillment", good_input, "race-2");
    send_start(second, "race-2");
    pgtest_wait_blocked(conn, pid, 20000);
    pgtest_exec(first, "ROLLBACK");
    b = receive_value(second);
    cr_assert_str_neq(a, b);
    const char *params[] = {b};
    cr_assert_eq(pgtest_count(conn,
                              "SELECT count(*) FROM saga.instances "
                              "WHERE idempotency_key = 'race-2' AND id = $1",
                              1, params),
                 1);
    cr_assert_eq(instance_count(conn), 2);
    free(a);
    free(b);
    PQfinish(first);
    PQfinish(second);
}

/* Calls saga.start expecting an error; checks SQLSTATE and message and that nothing changed. */
static void expect_start_error(const char *name, const char *input, const char *traceparent,
                               const char *want_state, const char *want_msg)
{
    const char *params[] = {name, input, traceparent};
    char state[6], msg[512];
    pgtest_expect_error(conn, "SELECT saga.start($1, $2::jsonb, traceparent => $3)", 3, params,
                        state, msg, sizeof(msg));
    cr_assert_str_eq(state, want_state, "message: %s", msg);
    cr_assert_str_eq(msg, want_msg);
    cr_assert_eq(instance_count(conn), 0);
    cr_assert_eq(PQtransactionStatus(conn), PQTRANS_IDLE);
}

Test(start, unknown_saga)
{
    expect_start_error("no_such_saga", good_input, NULL, "SG001", "unknown saga \"no_such_saga\"");
}

Test(start, input_must_be_an_object)
{
    expect_start_error("order_fulfillment", "[1, 2]", NULL, "SG002",
                       "saga \"order_fulfillment\": input must be a JSON object, not array");
    expect_start_error("order_fulfillment", "\"text\"", NULL, "SG002",
                       "saga \"order_fulfillment\": input must be a JSON object, not string");
    expect_start_error("order_fulfillment", NULL, NULL, "SG002",
                       "saga \"order_fulfillment\": input must be a JSON object, not NULL");
}

Test(start, missing_required_keys_are_named)
{
    expect_start_error("order_fulfillment",
                       "{\"orderId\": \"o\", \"customerId\": \"c\", \"items\": []}", NULL, "SG003",
                       "saga \"order_fulfillment\": input is missing required key \"amount\"");
    expect_start_error("order_fulfillment", "{\"orderId\": \"o\", \"items\": []}", NULL, "SG003",
                       "saga \"order_fulfillment\": input is missing required keys \"customerId\", "
                       "\"amount\"");
    /* A key with a null value is present. */
    const char *params[] = {"order_fulfillment",
                            "{\"orderId\": null, \"customerId\": 1, \"items\": 2, \"amount\": 3}"};
    free(pgtest_value(conn, "SELECT saga.start($1, $2::jsonb)", 2, params));
    cr_assert_eq(instance_count(conn), 1);
}

/* The required keys come from saga.definitions.required_keys (sql/013), generated from the
 * body: set at registration, NULL without input.required (any object then starts), and
 * following a body changed by hand. */
Test(start, required_keys_are_a_column_generated_from_the_body)
{
    char *keys = pgtest_value(conn,
                              "SELECT required_keys::text FROM saga.definitions "
                              "WHERE name = 'order_fulfillment'",
                              0, NULL);
    cr_assert_str_eq(keys, "{orderId,customerId,items,amount}");
    free(keys);

    const char *plain[] = {"no_required", "1", "{\"steps\": []}"};
    PQclear(
        pgtest_query(conn, "SELECT saga.register_definition($1, $2::int, $3::jsonb)", 3, plain));
    cr_assert_eq(pgtest_count(conn,
                              "SELECT count(*) FROM saga.definitions "
                              "WHERE name = 'no_required' AND required_keys IS NULL",
                              0, NULL),
                 1);
    free(start_saga(conn, "no_required", "{}", NULL));
    cr_assert_eq(instance_count(conn), 1);

    pgtest_exec(conn, "UPDATE saga.definitions SET body = jsonb_set(body, '{input,required}', "
                      "'[\"orderId\", \"coupon\"]') WHERE name = 'order_fulfillment'");
    {
        const char *params[] = {"order_fulfillment", good_input};
        char state[6], msg[512];
        pgtest_expect_error(conn, "SELECT saga.start($1, $2::jsonb)", 2, params, state, msg,
                            sizeof(msg));
        cr_assert_str_eq(state, "SG003", "message: %s", msg);
        cr_assert_str_eq(msg,
                         "saga \"order_fulfillment\": input is missing required key \"coupon\"");
    }
    cr_assert_eq(instance_count(conn), 1);
}

Test(start, malformed_traceparent)
{
    static const char *const bad[] = {
        "",
        "garbage",
        "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
        "00-0af7651916cd43dd8448eb211c80319-b7ad6b7169203331-01",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
        "00-00000000000000000000000000000000-b7ad6b7169203331-01",
        "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        char want[256];
        snprintf(want, sizeof(want), "saga \"order_fulfillment\": malformed traceparent \"%s\"",
                 bad[i]);
        expect_start_error("order_fulfillment", good_input, bad[i], "SG004", want);
    }
}

Test(start, trace_id_comes_from_the_traceparent)
{
    const char *params[] = {"order_fulfillment", good_input,
                            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"};
    char *id = pgtest_value(conn, "SELECT saga.start($1, $2::jsonb, traceparent => $3)", 3, params);
    const char *idp[] = {id};
    char *trace = pgtest_value(conn, "SELECT trace_id FROM saga.instances WHERE id = $1", 1, idp);
    cr_assert_str_eq(trace, "0af7651916cd43dd8448eb211c80319c");
    free(trace);
    free(id);
}

Test(start, wakeup_is_notified_only_after_commit)
{
    PGconn *listener = pgtest_connect(db.url);
    pgtest_exec(listener, "LISTEN saga_wakeup");

    pgtest_exec(conn, "BEGIN");
    free(start_saga(conn, "order_fulfillment", good_input, NULL));
    PGnotify *note = pgtest_poll_notify(listener);
    cr_assert_null(note, "notified before the commit");
    pgtest_exec(conn, "COMMIT");

    note = pgtest_wait_notify(listener, 10000);
    cr_assert_not_null(note, "no saga_wakeup notification within 10 s of the commit");
    cr_assert_str_eq(note->relname, "saga_wakeup");
    cr_assert_eq(note->be_pid, PQbackendPID(conn));
    PQfreemem(note);

    /* A rolled back start notifies nobody. */
    pgtest_exec(conn, "BEGIN");
    free(start_saga(conn, "order_fulfillment", good_input, NULL));
    pgtest_exec(conn, "ROLLBACK");
    note = pgtest_poll_notify(listener);
    cr_assert_null(note, "a rolled back start notified");
    PQfinish(listener);
}

/* ---- retry and abort ------------------------------------------------------------------- */

/* Starts a saga and forces its state; returns its id (caller frees). */
static char *saga_in(const char *status, bool pivot_sent, const char *current_step)
{
    char *id = start_saga(conn, "order_fulfillment", good_input, NULL);
    const char *params[] = {id, status, pivot_sent ? "true" : "false", current_step};
    PQclear(pgtest_query(conn,
                         "UPDATE saga.instances SET status = $2, pivot_sent = $3::boolean, "
                         "current_step = $4 WHERE id = $1",
                         4, params));
    return id;
}

static long history_count(const char *id)
{
    const char *params[] = {id};
    return pgtest_count(conn, "SELECT count(*) FROM saga.step_history WHERE saga_id = $1", 1,
                        params);
}

Test(operator, unknown_id)
{
    const char *params[] = {"7b0d9d2e-2c57-4a43-9b8e-3c1c50bf0a11"};
    char state[6], msg[256];
    pgtest_expect_error(conn, "SELECT saga.retry($1::uuid)", 1, params, state, msg, sizeof(msg));
    cr_assert_str_eq(state, "SG010");
    cr_assert_str_eq(msg, "unknown saga id 7b0d9d2e-2c57-4a43-9b8e-3c1c50bf0a11");
    pgtest_expect_error(conn, "SELECT saga.abort($1::uuid, 'why')", 1, params, state, msg,
                        sizeof(msg));
    cr_assert_str_eq(state, "SG010");
    cr_assert_str_eq(msg, "unknown saga id 7b0d9d2e-2c57-4a43-9b8e-3c1c50bf0a11");
}

Test(operator, retry_only_a_failed_saga)
{
    static const char *const wrong[] = {"pending", "running", "compensating", "completed",
                                        "compensated"};
    for (size_t i = 0; i < sizeof(wrong) / sizeof(wrong[0]); i++) {
        char *id = saga_in(wrong[i], false, NULL);
        const char *params[] = {id};
        char state[6], msg[256], want[256];
        pgtest_expect_error(conn, "SELECT saga.retry($1::uuid)", 1, params, state, msg,
                            sizeof(msg));
        cr_assert_str_eq(state, "SG011");
        snprintf(want, sizeof(want), "saga %s is %s; only a failed saga can be retried", id,
                 wrong[i]);
        cr_assert_str_eq(msg, want);
        cr_assert_eq(history_count(id), 0);
        cr_assert_eq(pgtest_count(conn,
                                  "SELECT count(*) FROM saga.instances "
                                  "WHERE id = $1 AND pending_request IS NULL",
                                  1, params),
                     1);
        free(id);
    }
}

Test(operator, retry_records_the_request)
{
    PGconn *listener = pgtest_connect(db.url);
    pgtest_exec(listener, "LISTEN saga_wakeup");

    char *id = saga_in("failed", true, "release_stock");
    const char *params[] = {id};
    PQclear(pgtest_query(conn, "SELECT saga.retry($1::uuid)", 1, params));
    PGresult *res = pgtest_query(
        conn, "SELECT pending_request, request_reason IS NULL FROM saga.instances WHERE id = $1", 1,
        params);
    cr_assert_str_eq(PQgetvalue(res, 0, 0), "retry");
    cr_assert_str_eq(PQgetvalue(res, 0, 1), "t");
    PQclear(res);
    res = pgtest_query(conn,
                       "SELECT step, phase, attempt, status, message_id IS NULL, reply IS NULL "
                       "FROM saga.step_history WHERE saga_id = $1",
                       1, params);
    cr_assert_eq(PQntuples(res), 1);
    cr_assert_str_eq(PQgetvalue(res, 0, 0), "release_stock");
    cr_assert_str_eq(PQgetvalue(res, 0, 1), "operator");
    cr_assert_str_eq(PQgetvalue(res, 0, 2), "0");
    cr_assert_str_eq(PQgetvalue(res, 0, 3), "retry_requested");
    cr_assert_str_eq(PQgetvalue(res, 0, 4), "t");
    cr_assert_str_eq(PQgetvalue(res, 0, 5), "t");
    PQclear(res);

    PGnotify *note = pgtest_wait_notify(listener, 10000);
    cr_assert_not_null(note, "saga.retry did not notify saga_wakeup");
    cr_assert_str_eq(note->relname, "saga_wakeup");
    PQfreemem(note);
    PQfinish(listener);
    free(id);
}

Test(operator, abort_only_before_the_pivot_of_a_pending_or_running_saga)
{
    static const char *const wrong[] = {"compensating", "completed", "compensated", "failed"};
    char state[6], msg[256], want[256];
    for (size_t i = 0; i < sizeof(wrong) / sizeof(wrong[0]); i++) {
        char *id = saga_in(wrong[i], false, NULL);
        const char *params[] = {id};
        pgtest_expect_error(conn, "SELECT saga.abort($1::uuid, 'stop')", 1, params, state, msg,
                            sizeof(msg));
        cr_assert_str_eq(state, "SG011");
        snprintf(want, sizeof(want), "saga %s is %s; only a pending or running saga can be aborted",
                 id, wrong[i]);
        cr_assert_str_eq(msg, want);
        cr_assert_eq(history_count(id), 0);
        free(id);
    }

    char *id = saga_in("running", true, "approve_order");
    const char *params[] = {id};
    pgtest_expect_error(conn, "SELECT saga.abort($1::uuid, 'stop')", 1, params, state, msg,
                        sizeof(msg));
    cr_assert_str_eq(state, "SG012");
    snprintf(want, sizeof(want),
             "saga %s has passed its pivot step and can no longer be compensated", id);
    cr_assert_str_eq(msg, want);
    cr_assert_eq(history_count(id), 0);
    cr_assert_eq(pgtest_count(conn,
                              "SELECT count(*) FROM saga.instances "
                              "WHERE id = $1 AND pending_request IS NULL",
                              1, params),
                 1);
    free(id);
}

Test(operator, abort_records_the_request)
{
    static const char *const ok[] = {"pending", "running"};
    for (size_t i = 0; i < 2; i++) {
        char *id = saga_in(ok[i], false, i == 0 ? NULL : "reserve_inventory");
        const char *params[] = {id, "customer cancelled"};
        PQclear(pgtest_query(conn, "SELECT saga.abort($1::uuid, $2)", 2, params));
        PGresult *res = pgtest_query(
            conn, "SELECT pending_request, request_reason FROM saga.instances WHERE id = $1", 1,
            params);
        cr_assert_str_eq(PQgetvalue(res, 0, 0), "abort");
        cr_assert_str_eq(PQgetvalue(res, 0, 1), "customer cancelled");
        PQclear(res);
        res = pgtest_query(conn,
                           "SELECT step, phase, attempt, status, reply->>'reason' "
                           "FROM saga.step_history WHERE saga_id = $1",
                           1, params);
        cr_assert_eq(PQntuples(res), 1);
        cr_assert_str_eq(PQgetvalue(res, 0, 0), i == 0 ? "-" : "reserve_inventory");
        cr_assert_str_eq(PQgetvalue(res, 0, 1), "operator");
        cr_assert_str_eq(PQgetvalue(res, 0, 2), "0");
        cr_assert_str_eq(PQgetvalue(res, 0, 3), "abort_requested");
        cr_assert_str_eq(PQgetvalue(res, 0, 4), "customer cancelled");
        PQclear(res);
        free(id);
    }
}

/* The orchestrator's claim (orchestrator/worker.c, claim_statement) looks for due deadlines and
 * operator requests among the sagas of its definitions, ordered by its own partial indexes.
 * Before any ANALYZE of saga.instances (a new database; the claim is prepared once per session
 * and its plan kept while the table grows) the planner guessed "saga_name = <name>" at 0.5% of
 * the rows against a third for "deadline <= now()" and went through the idempotency key's
 * unique index instead: every saga of the name read at every claim, finished ones included
 * (3-11 ms per claim with 3,000 sagas, measured). That index now holds only keyed sagas
 * (sql/006), so those branches cannot use it. */
Test(start, claim_branches_do_not_scan_the_idempotency_index)
{
    /* Each branch, and the partial index that must serve it (the due-deadline branch also
     * comes with "wait <> 'reply'" when this orchestrator has no reply partition). */
    const char *branches[][2] = {
        {"SELECT id FROM saga.instances WHERE deadline <= now() AND (saga_name, saga_version) IN "
         "(('order_fulfillment', 1)) ORDER BY deadline LIMIT 200 FOR UPDATE SKIP LOCKED",
         "instances_deadline_idx"},
        {"SELECT id FROM saga.instances WHERE deadline <= now() AND wait <> 'reply' AND "
         "(saga_name, saga_version) IN (('order_fulfillment', 1)) ORDER BY deadline LIMIT 200 "
         "FOR UPDATE SKIP LOCKED",
         "instances_deadline_idx"},
        {"SELECT id FROM saga.instances WHERE pending_request IS NOT NULL AND "
         "(saga_name, saga_version) IN (('order_fulfillment', 1)) ORDER BY updated_at LIMIT 200 "
         "FOR UPDATE SKIP LOCKED",
         "instances_request_idx"},
    };
    /* The claim session's planner settings (worker.c, db_state_cb). */
    pgtest_exec(conn, "SET enable_seqscan = off; SET enable_hashjoin = off; "
                      "SET enable_mergejoin = off; SET enable_bitmapscan = off");
    for (size_t i = 0; i < sizeof(branches) / sizeof(branches[0]); i++) {
        char sql[512];
        snprintf(sql, sizeof(sql), "EXPLAIN %s", branches[i][0]);
        PGresult *res = pgtest_query(conn, sql, 0, NULL);
        bool uses_its_index = false;
        for (int r = 0; r < PQntuples(res); r++) {
            const char *line = PQgetvalue(res, r, 0);
            cr_expect(!strstr(line, "instances_idempotency_key"), "%s\nis planned as: %s",
                      branches[i][0], line);
            uses_its_index = uses_its_index || strstr(line, branches[i][1]);
        }
        cr_expect(uses_its_index, "%s\ndoes not use %s", branches[i][0], branches[i][1]);
        PQclear(res);
    }
    /* Keyed sagas are still deduplicated (the unique index, partial now, is the arbiter). */
    char *a = start_saga(conn, "order_fulfillment", good_input, "k-1");
    char *b = start_saga(conn, "order_fulfillment", good_input, "k-1");
    char *c = start_saga(conn, "order_fulfillment", good_input, NULL);
    char *d = start_saga(conn, "order_fulfillment", good_input, NULL);
    cr_assert_str_eq(a, b);
    cr_assert_str_neq(c, d);
    free(a), free(b), free(c), free(d);
}

/* A registered version is kept (sql/008, in place of a foreign key from saga.instances): no
 * DELETE, TRUNCATE or change of its name or version, whatever the sagas. */
Test(definitions, a_registered_version_is_never_deleted_or_renamed)
{
    const char *refused[] = {
        "DELETE FROM saga.definitions WHERE name = 'order_fulfillment'",
        "UPDATE saga.definitions SET version = 2 WHERE name = 'order_fulfillment'",
        "UPDATE saga.definitions SET name = 'other' WHERE name = 'order_fulfillment'",
        "TRUNCATE saga.definitions",
    };
    for (size_t i = 0; i < sizeof(refused) / sizeof(refused[0]); i++) {
        PGresult *res = PQexec(conn, refused[i]);
        cr_assert_eq(PQresultStatus(res), PGRES_FATAL_ERROR, "%s was allowed", refused[i]);
        cr_assert_str_eq(PQresultErrorField(res, PG_DIAG_SQLSTATE), "SG021", "%s: %s", refused[i],
                         PQresultErrorMessage(res));
        PQclear(res);
    }
    cr_assert_eq(pgtest_count(conn, "SELECT count(*) FROM saga.definitions", 0, NULL), 1);
}

/* A saga's history goes with it (sql/009, in place of a foreign key that refused the DELETE):
 * deleting a saga deletes its step_history rows, and only its. */
Test(history, deleting_a_saga_deletes_its_history)
{
    char *gone = start_saga(conn, "order_fulfillment", good_input, NULL);
    char *kept = start_saga(conn, "order_fulfillment", good_input, NULL);
    const char *p_gone[] = {gone}, *p_kept[] = {kept};
    PQclear(pgtest_query(conn, "SELECT saga.abort($1::uuid, 'operator')", 1, p_gone));
    PQclear(pgtest_query(conn, "SELECT saga.abort($1::uuid, 'operator')", 1, p_kept));
    cr_assert_eq(pgtest_count(conn, "SELECT count(*) FROM saga.step_history", 0, NULL), 2);

    PGresult *res = PQexecParams(conn, "DELETE FROM saga.instances WHERE id = $1::uuid", 1, NULL,
                                 p_gone, NULL, NULL, 0);
    cr_assert_eq(PQresultStatus(res), PGRES_COMMAND_OK, "DELETE refused: %s",
                 PQresultErrorMessage(res));
    PQclear(res);
    cr_assert_eq(
        pgtest_count(conn, "SELECT count(*) FROM saga.step_history WHERE saga_id = $1", 1, p_gone),
        0);
    cr_assert_eq(
        pgtest_count(conn, "SELECT count(*) FROM saga.step_history WHERE saga_id = $1", 1, p_kept),
        1);

    res = PQexec(conn, "TRUNCATE saga.instances");
    cr_assert_eq(PQresultStatus(res), PGRES_COMMAND_OK, "TRUNCATE refused: %s",
                 PQresultErrorMessage(res));
    PQclear(res);
    cr_assert_eq(pgtest_count(conn, "SELECT count(*) FROM saga.step_history", 0, NULL), 0);

    /* The form the foreign key asked for still works, in either order. */
    const char *both[] = {"TRUNCATE saga.instances, saga.step_history",
                          "TRUNCATE saga.step_history, saga.instances"};
    for (size_t i = 0; i < 2; i++) {
        free(start_saga(conn, "order_fulfillment", good_input, NULL));
        PQclear(pgtest_query(conn, "SELECT saga.abort(id, 'operator') FROM saga.instances LIMIT 1",
                             0, NULL));
        res = PQexec(conn, both[i]);
        cr_assert_eq(PQresultStatus(res), PGRES_COMMAND_OK, "%s: %s", both[i],
                     PQresultErrorMessage(res));
        PQclear(res);
        cr_assert_eq(pgtest_count(conn, "SELECT count(*) FROM saga.step_history", 0, NULL), 0);
    }
    free(gone);
    free(kept);
}

/* A DELETE of a saga whose history is being written waits for the writer's lock on the saga,
 * then deletes the history written meanwhile: no row is left without its saga. */
Test(history, a_delete_waiting_for_a_writer_deletes_what_it_wrote)
{
    char *id = start_saga(conn, "order_fulfillment", good_input, NULL);
    const char *params[] = {id};
    PGconn *writer = pgtest_connect(db.url);
    PGconn *deleter = pgtest_connect(db.url);
    char pid[16];
    snprintf(pid, sizeof(pid), "%d", PQbackendPID(deleter));

    pgtest_exec(writer, "BEGIN");
    PQclear(pgtest_query(writer, "SELECT saga.abort($1::uuid, 'operator')", 1, params));
    cr_assert_eq(PQsendQueryParams(deleter, "DELETE FROM saga.instances WHERE id = $1::uuid", 1,
                                   NULL, params, NULL, NULL, 0),
                 1);
    pgtest_wait_blocked(conn, pid, 20000);
    pgtest_exec(writer, "COMMIT");
    PGresult *res = PQgetResult(deleter);
    cr_assert_eq(PQresultStatus(res), PGRES_COMMAND_OK, "%s", PQresultErrorMessage(res));
    cr_assert_str_eq(PQcmdTuples(res), "1");
    PQclear(res);
    cr_assert_null(PQgetResult(deleter));
    cr_assert_eq(pgtest_count(conn,
                              "SELECT count(*) FROM saga.step_history h WHERE NOT EXISTS "
                              "(SELECT 1 FROM saga.instances i WHERE i.id = h.saga_id)",
                              0, NULL),
                 0);
    PQfinish(writer);
    PQfinish(deleter);
    free(id);
}

/* saga.start takes no lock on its definition's row: with the foreign key it took there
 * before sql/008, every start held a KEY SHARE lock on the one row all starts of that saga
 * share, which concurrent callers turned into a MultiXact extended at each start. Shown with
 * a start left uncommitted and a FOR UPDATE NOWAIT of the row from another session. */
Test(start, does_not_lock_its_definition_row)
{
    pgtest_exec(conn, "BEGIN");
    free(start_saga(conn, "order_fulfillment", good_input, NULL));
    PGconn *other = pgtest_connect(db.url);
    PGresult *res = PQexec(other, "SELECT 1 FROM saga.definitions WHERE name = "
                                  "'order_fulfillment' FOR UPDATE NOWAIT");
    cr_assert_eq(PQresultStatus(res), PGRES_TUPLES_OK, "the definition's row is locked: %s",
                 PQresultErrorMessage(res));
    PQclear(res);
    PQfinish(other);
    pgtest_exec(conn, "COMMIT");
}

/* ---- saga_client: through the functions only (sql/010) ---------------------------------- */

/* sql under role (SET ROLE; the test's user is a superuser) fails with SQLSTATE 42501. */
static void expect_denied(const char *role, const char *sql, int nparams, const char *const *params)
{
    char set[64], state[6], msg[256];
    snprintf(set, sizeof(set), "SET ROLE %s", role);
    pgtest_exec(conn, set);
    pgtest_expect_error(conn, sql, nparams, params, state, msg, sizeof(msg));
    pgtest_exec(conn, "RESET ROLE");
    cr_assert_str_eq(state, "42501", "%s as %s: %s", sql, role, msg);
}

/* As role: saga.abort of the pending saga id (recorded as a request), then, once the owner
 * made it failed, saga.retry; each audited in the history. */
static void abort_then_retry_as(const char *role, const char *id)
{
    char set[64];
    snprintf(set, sizeof(set), "SET ROLE %s", role);
    const char *params[] = {id};
    pgtest_exec(conn, set);
    PQclear(pgtest_query(conn, "SELECT saga.abort($1::uuid, 'changed my mind')", 1, params));
    pgtest_exec(conn, "RESET ROLE");
    cr_assert_eq(pgtest_count(conn,
                              "SELECT count(*) FROM saga.instances WHERE id = $1 AND "
                              "pending_request = 'abort'",
                              1, params),
                 1);
    PQclear(pgtest_query(
        conn, "UPDATE saga.instances SET status = 'failed', pending_request = NULL WHERE id = $1",
        1, params));
    pgtest_exec(conn, set);
    PQclear(pgtest_query(conn, "SELECT saga.retry($1::uuid)", 1, params));
    pgtest_exec(conn, "RESET ROLE");
    cr_assert_eq(history_count(id), 2);
}

Test(client, starts_retries_and_aborts_but_writes_no_table)
{
    pgtest_exec(conn, "SET ROLE saga_client");
    char *id = start_saga(conn, "order_fulfillment", good_input, NULL);
    pgtest_exec(conn, "RESET ROLE");
    const char *params[] = {id};
    abort_then_retry_as("saga_client", id);

    /* The tables themselves: read, never written. */
    expect_denied("saga_client", "UPDATE saga.instances SET status = 'completed' WHERE id = $1", 1,
                  params);
    expect_denied("saga_client",
                  "INSERT INTO saga.instances (id, saga_name, saga_version, status, input, "
                  "trace_id) VALUES (gen_random_uuid(), 'order_fulfillment', 1, 'pending', '{}', "
                  "repeat('a', 32))",
                  0, NULL);
    expect_denied("saga_client",
                  "INSERT INTO saga.step_history (saga_id, step, phase, attempt, status) "
                  "VALUES (gen_random_uuid(), 'x', 'operator', 0, 'retry_requested')",
                  0, NULL);
    cr_assert_eq(pgtest_count(conn, "SELECT count(*) FROM saga.step_history", 0, NULL), 2);
    free(id);
}

/* With the functions running as their owner, EXECUTE is what keeps the other roles out (a
 * guard: before sql/010 their lack of table rights did). */
Test(client, roles_that_are_not_clients_cannot_call_the_functions)
{
    char *id = start_saga(conn, "order_fulfillment", good_input, NULL);
    const char *params[] = {id};
    /* saga_test_nobody: a role of no saga group that can see the schema. */
    pgtest_exec(conn, "DO $$ BEGIN CREATE ROLE saga_test_nobody NOLOGIN; "
                      "EXCEPTION WHEN duplicate_object THEN NULL; END $$");
    pgtest_exec(conn, "GRANT USAGE ON SCHEMA saga TO saga_test_nobody");
    static const char *const roles[] = {"saga_operator", "saga_relay", "saga_test_nobody"};
    for (size_t i = 0; i < sizeof(roles) / sizeof(roles[0]); i++) {
        const char *input[] = {good_input};
        expect_denied(roles[i], "SELECT saga.start('order_fulfillment', $1::jsonb)", 1, input);
        expect_denied(roles[i], "SELECT saga.abort($1::uuid, 'no')", 1, params);
        expect_denied(roles[i], "SELECT saga.retry($1::uuid)", 1, params);
    }
    cr_assert_eq(instance_count(conn), 1);
    cr_assert_eq(history_count(id), 0);
    free(id);
}

/* sagactl retry/abort run with the orchestrator's URL: its role may retry and abort (its
 * table rights let it before sql/010), and still not start. */
Test(client, the_orchestrator_role_may_retry_and_abort)
{
    char *id = start_saga(conn, "order_fulfillment", good_input, NULL);
    abort_then_retry_as("saga_orchestrator", id);
    const char *input[] = {good_input};
    expect_denied("saga_orchestrator", "SELECT saga.start('order_fulfillment', $1::jsonb)", 1,
                  input);
    free(id);
}

/* Running with its owner's rights, saga.start must not call what the caller's search_path
 * puts before pg_catalog. */
Test(client, the_functions_ignore_the_callers_search_path)
{
    pgtest_exec(conn, "CREATE SCHEMA trap");
    pgtest_exec(conn, "CREATE FUNCTION trap.gen_random_uuid() RETURNS uuid LANGUAGE sql AS "
                      "$$SELECT '00000000-0000-0000-0000-00000000dead'::uuid$$");
    /* retry and abort wake the orchestrator with pg_notify: a caller's own must not run. */
    pgtest_exec(conn, "CREATE FUNCTION trap.pg_notify(text, text) RETURNS void LANGUAGE plpgsql "
                      "AS $$BEGIN RAISE EXCEPTION 'hijacked'; END$$");
    pgtest_exec(conn, "GRANT USAGE ON SCHEMA trap TO PUBLIC");
    pgtest_exec(conn, "SET ROLE saga_client");
    pgtest_exec(conn, "SET search_path = trap, pg_catalog");
    char *id = start_saga(conn, "order_fulfillment", good_input, NULL);
    const char *params[] = {id};
    PQclear(pgtest_query(conn, "SELECT saga.abort($1::uuid, 'x')", 1, params));
    pgtest_exec(conn, "RESET search_path");
    pgtest_exec(conn, "RESET ROLE");
    cr_assert_str_neq(id, "00000000-0000-0000-0000-00000000dead");
    PQclear(pgtest_query(
        conn, "UPDATE saga.instances SET status = 'failed', pending_request = NULL WHERE id = $1",
        1, params));
    pgtest_exec(conn, "SET ROLE saga_client");
    pgtest_exec(conn, "SET search_path = trap, pg_catalog");
    PQclear(pgtest_query(conn, "SELECT saga.retry($1::uuid)", 1, params));
    pgtest_exec(conn, "RESET search_path");
    pgtest_exec(conn, "RESET ROLE");
    cr_assert_eq(history_count(id), 2);
    free(id);
}
