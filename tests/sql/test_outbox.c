/* saga.create_outbox and the outbox tables it makes. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <criterion/criterion.h>

#include "pgtest.h"

static struct pgtest_db db;
static PGconn *conn;

static void setup(void)
{
    conn = pgtest_fresh(&db, true);
}

static void teardown(void)
{
    PQfinish(conn);
    pgtest_db_drop(&db);
}

TestSuite(outbox, .init = setup, .fini = teardown, .timeout = 120);

static void create_outbox(const char *schema)
{
    const char *params[] = {schema};
    PQclear(pgtest_query(conn, "SELECT saga.create_outbox($1)", 1, params));
}

/* The columns of schema.table as "name type nullable default identity" lines, in order. */
static char *describe_columns(const char *schema, const char *table)
{
    const char *params[] = {schema, table};
    return pgtest_value(
        conn,
        "SELECT string_agg(format('%s %s %s %s %s', column_name, data_type, is_nullable, "
        "coalesce(column_default, '-'), coalesce(identity_generation, '-')), E'\\n' "
        "ORDER BY ordinal_position) "
        "FROM information_schema.columns WHERE table_schema = $1 AND table_name = $2",
        2, params);
}

static const char outbox_columns[] = "id uuid NO - -\n"
                                     "seq bigint NO - ALWAYS\n"
                                     "topic text NO - -\n"
                                     "key text YES - -\n"
                                     "event_type text NO - -\n"
                                     "payload jsonb NO - -\n"
                                     "headers jsonb NO '{}'::jsonb -\n"
                                     "created_at timestamp with time zone NO now() -";

Test(outbox, has_exactly_the_spec_shape)
{
    create_outbox("inventory");
    char *cols = describe_columns("inventory", "outbox");
    cr_assert_str_eq(cols, outbox_columns);
    free(cols);

    /* id is the primary key; seq has a unique index. */
    char *pk = pgtest_value(conn,
                            "SELECT string_agg(a.attname, ',') FROM pg_index i "
                            "JOIN pg_attribute a ON a.attrelid = i.indrelid "
                            "AND a.attnum = ANY (i.indkey) "
                            "WHERE i.indrelid = 'inventory.outbox'::regclass AND i.indisprimary",
                            0, NULL);
    cr_assert_str_eq(pk, "id");
    free(pk);
    cr_assert_eq(pgtest_count(conn,
                              "SELECT count(*) FROM pg_index i JOIN pg_attribute a "
                              "ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey) "
                              "WHERE i.indrelid = 'inventory.outbox'::regclass "
                              "AND i.indisunique AND i.indnatts = 1 AND a.attname = 'seq'",
                              0, NULL),
                 1);

    char *dead = describe_columns("inventory", "outbox_dead_letters");
    cr_assert_str_eq(dead, "id uuid NO - -\n"
                           "seq bigint YES - -\n"
                           "topic text NO - -\n"
                           "key text YES - -\n"
                           "event_type text NO - -\n"
                           "payload jsonb NO - -\n"
                           "headers jsonb NO '{}'::jsonb -\n"
                           "created_at timestamp with time zone NO now() -\n"
                           "error text NO - -\n"
                           "failed_at timestamp with time zone NO now() -");
    free(dead);

    /* The orchestrator's own outbox has the same shape. */
    cols = describe_columns("saga", "outbox");
    cr_assert_str_eq(cols, outbox_columns);
    free(cols);
}

Test(outbox, creating_twice_is_fine)
{
    create_outbox("payment");
    pgtest_exec(conn, "INSERT INTO payment.outbox (id, topic, event_type, payload) "
                      "VALUES (gen_random_uuid(), 't', 'E', '{}')");
    create_outbox("payment");
    cr_assert_eq(pgtest_count(conn, "SELECT count(*) FROM payment.outbox", 0, NULL), 1);
    cr_assert_eq(pgtest_count(conn,
                              "SELECT count(*) FROM pg_trigger "
                              "WHERE tgrelid = 'payment.outbox'::regclass AND NOT tgisinternal",
                              0, NULL),
                 1);
    /* Statement level (tgtype bit 0 clear): a bulk insert wakes the relay once, not per row;
     * PostgreSQL would fold the identical notifications anyway, so the NOTIFY test below
     * cannot tell the two apart. */
    cr_assert_eq(pgtest_count(conn,
                              "SELECT tgtype & 1 FROM pg_trigger "
                              "WHERE tgrelid = 'payment.outbox'::regclass AND NOT tgisinternal",
                              0, NULL),
                 0);
    /* A name that needs quoting is quoted, not spliced. */
    create_outbox("Shipping Dept");
    cr_assert_eq(pgtest_count(conn, "SELECT count(*) FROM \"Shipping Dept\".outbox", 0, NULL), 0);
}

Test(outbox, rejects_bad_names)
{
    static const char *const bad[] = {NULL, "", "   "};
    for (size_t i = 0; i < 3; i++) {
        const char *params[] = {bad[i]};
        char state[6], msg[256];
        pgtest_expect_error(conn, "SELECT saga.create_outbox($1)", 1, params, state, msg,
                            sizeof(msg));
        cr_assert_str_eq(state, "22023");
        cr_assert_str_eq(msg, "saga.create_outbox: the schema name must not be empty");
    }
    char longname[80];
    memset(longname, 'x', 64);
    longname[64] = '\0';
    const char *params[] = {longname};
    char state[6], msg[256];
    pgtest_expect_error(conn, "SELECT saga.create_outbox($1)", 1, params, state, msg, sizeof(msg));
    cr_assert_str_eq(state, "22023");
    cr_assert(strstr(msg, "longer than 63 bytes"), "got: %s", msg);
}

Test(outbox, defaults_fill_seq_headers_and_created_at)
{
    create_outbox("inventory");
    pgtest_exec(conn, "INSERT INTO inventory.outbox (id, topic, event_type, payload) VALUES "
                      "('11111111-1111-4111-8111-111111111111', 'inventory.events', "
                      "'StockReserved', '{\"n\": 1}')");
    PGresult *res = pgtest_query(conn,
                                 "SELECT seq IS NOT NULL, headers::text, "
                                 "created_at > now() - interval '1 hour', key IS NULL "
                                 "FROM inventory.outbox",
                                 0, NULL);
    cr_assert_eq(PQntuples(res), 1);
    cr_assert_str_eq(PQgetvalue(res, 0, 0), "t");
    cr_assert_str_eq(PQgetvalue(res, 0, 1), "{}");
    cr_assert_str_eq(PQgetvalue(res, 0, 2), "t");
    cr_assert_str_eq(PQgetvalue(res, 0, 3), "t");
    PQclear(res);

    /* seq is generated: a caller cannot set it by mistake. */
    char state[6];
    pgtest_expect_error(conn,
                        "INSERT INTO inventory.outbox (id, seq, topic, event_type, payload) "
                        "VALUES (gen_random_uuid(), 5, 't', 'E', '{}')",
                        0, NULL, state, NULL, 0);
    cr_assert_str_eq(state, "428C9");
}

Test(outbox, seq_follows_insert_order)
{
    create_outbox("inventory");
    for (int i = 0; i < 5; i++) {
        char n[8];
        snprintf(n, sizeof(n), "%d", i);
        const char *params[] = {n};
        PQclear(pgtest_query(conn,
                             "INSERT INTO inventory.outbox (id, topic, event_type, payload) "
                             "VALUES (gen_random_uuid(), 't', 'E', jsonb_build_object('n', "
                             "$1::int))",
                             1, params));
    }
    pgtest_exec(conn, "INSERT INTO inventory.outbox (id, topic, event_type, payload) "
                      "SELECT gen_random_uuid(), 't', 'E', jsonb_build_object('n', 5 + g) "
                      "FROM generate_series(0, 4) g ORDER BY g");
    char *order = pgtest_value(
        conn, "SELECT string_agg(payload->>'n', ',' ORDER BY seq) FROM inventory.outbox", 0, NULL);
    cr_assert_str_eq(order, "0,1,2,3,4,5,6,7,8,9");
    free(order);
}

Test(outbox, an_insert_statement_notifies_once)
{
    create_outbox("inventory");
    PGconn *listener = pgtest_connect(db.url);
    pgtest_exec(listener, "LISTEN saga_outbox");

    pgtest_exec(conn, "INSERT INTO inventory.outbox (id, topic, event_type, payload) "
                      "SELECT gen_random_uuid(), 't', 'E', '{}' FROM generate_series(1, 3)");
    PGnotify *note = pgtest_wait_notify(listener, 10000);
    cr_assert_not_null(note, "no saga_outbox notification within 10 s");
    cr_assert_str_eq(note->relname, "saga_outbox");
    cr_assert_str_eq(note->extra, "inventory.outbox");
    PQfreemem(note);
    note = pgtest_poll_notify(listener);
    cr_assert_null(note, "a second notification for the same statement: %s",
                   note ? note->extra : "");

    /* The orchestrator's outbox names itself too. */
    pgtest_exec(conn, "INSERT INTO saga.outbox (id, topic, event_type, payload) "
                      "VALUES (gen_random_uuid(), 't', 'E', '{}')");
    note = pgtest_wait_notify(listener, 10000);
    cr_assert_not_null(note);
    cr_assert_str_eq(note->extra, "saga.outbox");
    PQfreemem(note);
    PQfinish(listener);
}

/* saga.apply_batch (sql/007) runs a statement only for the document's non-empty arrays: a
 * batch without commands inserts nothing into saga.outbox and so does not wake the relay (the
 * outbox's NOTIFY trigger fires per statement, even for no rows); one with a command does. */
Test(outbox, apply_batch_without_commands_does_not_notify)
{
    create_outbox("inventory");
    PGconn *listener = pgtest_connect(db.url);
    pgtest_exec(listener, "LISTEN saga_outbox");
    pgtest_exec(conn, "SELECT saga.apply_batch('{\"instances\": [], \"sent\": [], "
                      "\"resolved\": [], \"outbox\": [], \"ignored\": [], \"inbox\": [], "
                      "\"dead_letters\": []}')");
    pgtest_exec(conn, "SELECT saga.apply_batch('{}')"); /* every array missing: the same */
    /* A marker on another table: the first notification the listener gets must be its. */
    pgtest_exec(conn, "INSERT INTO inventory.outbox (id, topic, event_type, payload) "
                      "VALUES (gen_random_uuid(), 't', 'E', '{}')");
    PGnotify *note = pgtest_wait_notify(listener, 10000);
    cr_assert_not_null(note);
    cr_assert_str_eq(note->extra, "inventory.outbox", "a batch without commands notified %s",
                     note->extra);
    PQfreemem(note);

    pgtest_exec(conn, "SELECT saga.apply_batch(jsonb_build_object('outbox', jsonb_build_array("
                      "jsonb_build_object('id', gen_random_uuid(), 'topic', 't', 'key', 'k', "
                      "'event_type', 'E', 'payload', '{}'::jsonb, 'headers', '{}'::jsonb))))");
    note = pgtest_wait_notify(listener, 10000);
    cr_assert_not_null(note, "a batch with a command did not notify");
    cr_assert_str_eq(note->extra, "saga.outbox");
    PQfreemem(note);
    cr_assert_eq(pgtest_count(conn, "SELECT count(*) FROM saga.outbox", 0, NULL), 1);
    PQfinish(listener);
}

/* saga.apply_batch (sql/011): an applied reply is recorded on the attempt it resolves; a reply
 * that another orchestrator applied after this one looked for duplicates (its commit came
 * between) reaches the batch as late, and is not recorded a second time in the inbox. A late
 * reply that nobody applied is. */
Test(outbox, apply_batch_records_an_applied_reply_once)
{
    static const char saga[] = "11111111-2222-3333-4444-555555555555";
    static const char cmd[] = "22222222-2222-3333-4444-555555555555";
    static const char reply[] = "33333333-2222-3333-4444-555555555555";
    static const char other[] = "44444444-2222-3333-4444-555555555555";
    pgtest_exec(conn, "INSERT INTO saga.step_history (saga_id, step, phase, attempt, status, "
                      "message_id) VALUES ('11111111-2222-3333-4444-555555555555', 's', "
                      "'action', 1, 'sent', '22222222-2222-3333-4444-555555555555')");
    const char *params[] = {cmd, reply, saga, other};
    PQclear(pgtest_query(
        conn,
        "SELECT saga.apply_batch(jsonb_build_object('resolved', jsonb_build_array("
        "jsonb_build_object('message_id', $1::text, 'status', 'succeeded', 'reply', '{}'::jsonb, "
        "'reply_message_id', $2::text))))",
        2, params));
    cr_assert_eq(pgtest_count(conn,
                              "SELECT count(*) FROM saga.step_history WHERE message_id = $1 AND "
                              "reply_message_id = $2 AND status = 'succeeded'",
                              2, params),
                 1);
    /* The same reply again, as another orchestrator's late one; then a late one nobody
     * applied. */
    const char *late = "SELECT saga.apply_batch(jsonb_build_object('inbox', jsonb_build_array("
                       "jsonb_build_object('message_id', $2::text, 'in_reply_to', $1::text, "
                       "'saga_id', $3::text, 'disposition', 'ignored', 'topic', 't', "
                       "'partition', 0, 'offset', 1))))";
    PQclear(pgtest_query(conn, late, 3, params));
    cr_assert_eq(pgtest_count(conn, "SELECT count(*) FROM saga.inbox", 0, NULL), 0);
    const char *params2[] = {cmd, other, saga};
    PQclear(pgtest_query(conn, late, 3, params2));
    cr_assert_eq(
        pgtest_count(conn, "SELECT count(*) FROM saga.inbox WHERE disposition = 'late'", 0, NULL),
        1);
    cr_assert_eq(pgtest_count(conn,
                              "SELECT count(*) FROM saga.replies_received WHERE message_id IN "
                              "($1::uuid, $2::uuid)",
                              2, (const char *[]){reply, other}),
                 2);
}

/* saga.set_outbox_notify (sql/003): off stops the notifications and survives create_outbox
 * running again; on brings them back; idempotent; NULL is refused. */
Test(outbox, notify_can_be_turned_off_and_on)
{
    create_outbox("inventory");
    PGconn *listener = pgtest_connect(db.url);
    pgtest_exec(listener, "LISTEN saga_outbox");
    const char *insert = "INSERT INTO inventory.outbox (id, topic, event_type, payload) "
                         "VALUES (gen_random_uuid(), 't', 'E', '{}')";

    pgtest_exec(conn, "SELECT saga.set_outbox_notify('inventory.outbox', false)");
    pgtest_exec(conn, "SELECT saga.set_outbox_notify('inventory.outbox', false)");
    create_outbox("inventory"); /* a redeployment keeps the choice */
    pgtest_exec(conn, insert);
    /* A marker on another table proves the listener is live and ordered after the insert. */
    pgtest_exec(conn, "INSERT INTO saga.outbox (id, topic, event_type, payload) "
                      "VALUES (gen_random_uuid(), 't', 'E', '{}')");
    PGnotify *note = pgtest_wait_notify(listener, 10000);
    cr_assert_not_null(note);
    cr_assert_str_eq(note->extra, "saga.outbox", "inventory.outbox notified while off");
    PQfreemem(note);

    pgtest_exec(conn, "SELECT saga.set_outbox_notify('inventory.outbox', true)");
    pgtest_exec(conn, insert);
    note = pgtest_wait_notify(listener, 10000);
    cr_assert_not_null(note, "no notification after turning it back on");
    cr_assert_str_eq(note->extra, "inventory.outbox");
    PQfreemem(note);

    char sqlstate[6];
    pgtest_expect_error(conn, "SELECT saga.set_outbox_notify('inventory.outbox', NULL)", 0, NULL,
                        sqlstate, NULL, 0);
    cr_assert_str_eq(sqlstate, "22023");
    PQfinish(listener);
}
