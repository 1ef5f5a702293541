/* saga-orchestrator end to end: replies that must not move a saga. Duplicates, late replies
 * after a timeout, replies for unknown sagas, malformed replies; the consumer goes on after
 * all of them. The test plays the participants (tests/support/saga_e2e.h). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <criterion/criterion.h>

#include "saga_e2e.h"

static struct saga_e2e w;

static void setup(void)
{
    saga_e2e_setup(&w);
}

static void teardown(void)
{
    saga_e2e_teardown(&w);
}

TestSuite(orchestrator_replies, .init = setup, .fini = teardown, .timeout = 240);

static void assert_history(const struct saga_ref *s, const char *want)
{
    char *got = saga_e2e_history(&w, s->id);
    cr_assert_str_eq(got, want, "saga %s history:\n  %s\nexpected:\n  %s", s->id, got, want);
    free(got);
}

/* sql with $1 = arg (a saga id, a message id) or no parameter. */
static void assert_value(const char *sql, const char *arg, const char *want)
{
    char *got = saga_e2e_value(&w, sql, arg);
    cr_assert_str_eq(got, want, "%s: \"%s\", expected \"%s\"", sql, got, want);
    free(got);
}

static const struct kmsg *expect_step(const struct saga_ref *s, const char *step)
{
    static const char *const steps[][3] = {
        {"reserve_inventory", "inventory.commands", "ReserveStock"},
        {"authorize_payment", "payment.commands", "AuthorizePayment"},
        {"approve_order", "orders.commands", "ApproveOrder"},
        {"schedule_shipping", "shipping.commands", "ScheduleShipment"},
    };
    for (size_t i = 0; i < sizeof(steps) / sizeof(steps[0]); i++)
        if (!strcmp(steps[i][0], step))
            return saga_e2e_expect(&w, s, steps[i][1], steps[i][2], step, "action", NULL);
    cr_assert_fail("no step %s", step);
    return NULL;
}

/* The same reply (same message-id) twice in a row, and once more later: applied once,
 * recorded once, nothing else changes. */
Test(orchestrator_replies, duplicate_reply)
{
    struct saga_ref s;
    saga_e2e_start(&w, "e2e_order", "o-dup", NULL, NULL, &s);
    const struct kmsg *m = expect_step(&s, "reserve_inventory");
    char dup_id[37];
    saga_e2e_uuid(dup_id);
    saga_e2e_reply(&w, m, "success", "{\"reservationId\": \"r-20\"}", dup_id, NULL);
    saga_e2e_reply(&w, m, "success", "{\"reservationId\": \"r-20\"}", dup_id, NULL);
    const struct kmsg *a = expect_step(&s, "authorize_payment");
    saga_e2e_wait_metric(&w, "saga_replies_total{result=\"duplicate\"}", 1, 30000);
    /* Once more, while the saga waits for the next step: the same message, even with another
     * outcome, changes nothing. */
    saga_e2e_reply(&w, m, "failure", "{\"reason\": \"changed my mind\"}", dup_id, NULL);
    saga_e2e_wait_metric(&w, "saga_replies_total{result=\"duplicate\"}", 2, 30000);

    assert_value("SELECT count(*) || ' ' || min(disposition) FROM saga.replies_received WHERE "
                 "message_id = $1",
                 dup_id, "1 applied");
    assert_value("SELECT count(*) FROM saga.replies_received", NULL, "1");
    /* Applied: recorded on the attempt it answered, not in the inbox (sql/011). */
    assert_value("SELECT count(*) FROM saga.inbox", NULL, "0");
    assert_value("SELECT reply_message_id::text FROM saga.step_history WHERE message_id = $1",
                 kmsg_header(m, "message-id", NULL), dup_id);
    assert_history(&s, "reserve_inventory:action:1:succeeded authorize_payment:action:1:sent");
    assert_value("SELECT status || ' ' || current_step || ' ' || "
                 "(waiting_message_id = $1::uuid)::text FROM saga.instances",
                 kmsg_header(a, "message-id", NULL), "running authorize_payment true");
    cr_assert_eq(saga_e2e_metric(&w, "saga_replies_total{result=\"applied\"}"), 1);

    saga_e2e_reply(&w, a, "failure", "{}", NULL, NULL);
    m = saga_e2e_expect(&w, &s, "inventory.commands", "ReleaseStock", "reserve_inventory",
                        "compensation", "{\"orderId\": \"o-dup\", \"reservationId\": \"r-20\"}");
    char release_id[37];
    saga_e2e_reply(&w, m, "success", "{}", NULL, release_id);
    saga_e2e_wait_status(&w, &s, "compensated", 30000);
    /* A duplicate of the last reply, after the saga ended. */
    saga_e2e_reply(&w, m, "success", "{}", release_id, NULL);
    saga_e2e_wait_metric(&w, "saga_replies_total{result=\"duplicate\"}", 3, 30000);
    assert_history(&s, "reserve_inventory:action:1:succeeded authorize_payment:action:1:failed "
                       "reserve_inventory:compensation:1:succeeded");
    assert_value("SELECT count(*) FROM saga.replies_received", NULL, "3");
    saga_e2e_check_all_commands(&w, &s);
}

/* A reply to attempt 1 after attempt 2 was sent: recorded as late, the saga keeps waiting for
 * attempt 2, whose reply moves it on. */
Test(orchestrator_replies, late_reply_after_timeout)
{
    struct saga_ref s;
    saga_e2e_start(&w, "e2e_timeout", "o-late", NULL, NULL, &s);
    const struct kmsg *m = expect_step(&s, "reserve_inventory");
    saga_e2e_reply(&w, m, "success", "{\"reservationId\": \"r-21\"}", NULL, NULL);
    const struct kmsg *a1 = expect_step(&s, "authorize_payment");
    const struct kmsg *a2 = expect_step(&s, "authorize_payment"); /* after a 2 s timeout */
    const char *a2_id = kmsg_header(a2, "message-id", NULL);

    char late_id[37];
    saga_e2e_reply(&w, a1, "success", "{\"authorizationId\": \"a-stale\"}", NULL, late_id);
    saga_e2e_wait_value(&w, "SELECT disposition FROM saga.replies_received WHERE message_id = $1",
                        late_id, "late", 30000);
    assert_history(&s, "reserve_inventory:action:1:succeeded authorize_payment:action:1:late "
                       "authorize_payment:action:2:sent");
    assert_value("SELECT reply->>'authorizationId' || ' ' || (replied_at IS NOT NULL) "
                 "FROM saga.step_history WHERE message_id = $1",
                 kmsg_header(a1, "message-id", NULL), "a-stale true");
    assert_value("SELECT status || ' ' || current_step || ' ' || "
                 "(waiting_message_id = $1::uuid) || ' ' || (replies ? 'authorize_payment') "
                 "FROM saga.instances",
                 a2_id, "running authorize_payment true false");
    saga_e2e_wait_metric(&w, "saga_replies_total{result=\"late\"}", 1, 10000);

    saga_e2e_reply(&w, a2, "success", "{\"authorizationId\": \"a-21\"}", NULL, NULL);
    m = saga_e2e_expect(&w, &s, "orders.commands", "ApproveOrder", "approve_order", "action",
                        "{\"orderId\": \"o-late\", \"authorizationId\": \"a-21\"}");
    saga_e2e_reply(&w, m, "success", "{}", NULL, NULL);
    m = expect_step(&s, "schedule_shipping");
    saga_e2e_reply(&w, m, "success", "{}", NULL, NULL);
    saga_e2e_wait_status(&w, &s, "completed", 30000);
    assert_history(&s, "reserve_inventory:action:1:succeeded authorize_payment:action:1:late "
                       "authorize_payment:action:2:succeeded approve_order:action:1:succeeded "
                       "schedule_shipping:action:1:succeeded");
    saga_e2e_check_all_commands(&w, &s);
}

/* Replies for an unknown saga, stale replies, and malformed replies, all on the saga's own
 * partition before its good reply: recorded (inbox or dead letters) and skipped; the good
 * reply behind them is applied. */
Test(orchestrator_replies, unknown_stale_and_malformed)
{
    struct saga_ref s;
    saga_e2e_start(&w, "e2e_order", "o-bad", NULL, NULL, &s);
    const struct kmsg *m = expect_step(&s, "reserve_inventory");
    const char *cmd_id = kmsg_header(m, "message-id", NULL);

    char unknown_saga[37], unknown_id[37], stale_id[37], random_id[37], id[8][37];
    saga_e2e_uuid(unknown_saga);
    saga_e2e_uuid(unknown_id);
    saga_e2e_uuid(stale_id);
    saga_e2e_uuid(random_id);
    for (int i = 0; i < 8; i++)
        saga_e2e_uuid(id[i]);
    /* Well-formed, for a saga that does not exist. */
    saga_e2e_produce_raw(&w, s.id, "{}", "message-id", unknown_id, "in-reply-to", random_id,
                         "saga-id", unknown_saga, "outcome", "success", NULL);
    /* Well-formed, for this saga, answering no command of it. */
    saga_e2e_produce_raw(&w, s.id, "{\"reservationId\": \"r-stale\"}", "message-id", stale_id,
                         "in-reply-to", random_id, "saga-id", s.id, "outcome", "success", NULL);
    /* Malformed, each answering the very command the saga waits for. */
    saga_e2e_produce_raw(&w, s.id, "not json", "message-id", id[0], "in-reply-to", cmd_id,
                         "saga-id", s.id, "outcome", "success", NULL);
    saga_e2e_produce_raw(&w, s.id, "{}", "message-id", id[1], "saga-id", s.id, "outcome", "success",
                         NULL);
    saga_e2e_produce_raw(&w, s.id, "{}", "message-id", id[2], "in-reply-to", cmd_id, "saga-id",
                         s.id, "outcome", "maybe", NULL);
    saga_e2e_produce_raw(&w, s.id, "[1, 2]", "message-id", id[3], "in-reply-to", cmd_id, "saga-id",
                         s.id, "outcome", "failure", NULL);
    saga_e2e_produce_raw(&w, s.id, "{}", "in-reply-to", cmd_id, "saga-id", s.id, "outcome",
                         "success", NULL);
    saga_e2e_produce_raw(&w, s.id, "{}", "message-id", "not-a-uuid", "in-reply-to", cmd_id,
                         "saga-id", s.id, "outcome", "success", NULL);
    saga_e2e_produce_raw(&w, s.id, "{}", "message-id", id[4], "in-reply-to", cmd_id, "outcome",
                         "success", NULL);
    saga_e2e_produce_raw(&w, s.id, NULL, "message-id", id[5], "in-reply-to", cmd_id, "saga-id",
                         s.id, "outcome", "success", NULL);
    saga_e2e_produce_raw(&w, s.id, "{}", "message-id", id[6], "in-reply-to", cmd_id, "saga-id",
                         s.id, NULL);
    /* The good one. */
    saga_e2e_reply(&w, m, "success", "{\"reservationId\": \"r-22\"}", NULL, NULL);

    m = saga_e2e_expect(&w, &s, "payment.commands", "AuthorizePayment", "authorize_payment",
                        "action",
                        "{\"orderId\": \"o-bad\", \"customerId\": \"c-7\", \"amount\": 42, "
                        "\"reservationId\": \"r-22\"}");
    assert_history(&s, "reserve_inventory:action:1:succeeded authorize_payment:action:1:sent");
    {
        char want[128];
        snprintf(want, sizeof(want), "unknown %s", unknown_saga);
        assert_value(
            "SELECT disposition || ' ' || saga_id FROM saga.replies_received WHERE message_id = $1",
            unknown_id, want);
    }
    assert_value("SELECT disposition FROM saga.replies_received WHERE message_id = $1", stale_id,
                 "stale");
    assert_value("SELECT count(*) FROM saga.replies_received", NULL, "3");
    assert_value("SELECT string_agg(error, ' | ' ORDER BY \"offset\") FROM saga.dead_letters", NULL,
                 "value is not a JSON object | header in-reply-to is missing or not a uuid | "
                 "header outcome is neither success nor failure | value is not a JSON object | "
                 "header message-id is missing or not a uuid | "
                 "header message-id is missing or not a uuid | "
                 "header saga-id is missing or not a uuid | value is not a JSON object | "
                 "header outcome is missing");
    /* Each dead letter keeps where it came from and what it was. */
    assert_value("SELECT count(*) FILTER (WHERE topic = 'saga.replies' AND partition IS NOT NULL "
                 "AND \"offset\" IS NOT NULL AND key = $1) FROM saga.dead_letters",
                 s.id, "9");
    char want[256];
    snprintf(want, sizeof(want), "not json %s %s", id[0], cmd_id);
    assert_value("SELECT payload || ' ' || (headers->>'message-id') || ' ' || "
                 "(headers->>'in-reply-to') FROM saga.dead_letters ORDER BY \"offset\" LIMIT 1",
                 NULL, want);
    saga_e2e_wait_metric(&w, "saga_replies_total{result=\"malformed\"}", 9, 10000);
    cr_assert_eq(saga_e2e_metric(&w, "saga_replies_total{result=\"unknown\"}"), 1);

    /* The consumer goes on. */
    saga_e2e_reply(&w, m, "failure", "{}", NULL, NULL);
    m = saga_e2e_expect(&w, &s, "inventory.commands", "ReleaseStock", "reserve_inventory",
                        "compensation", "{\"orderId\": \"o-bad\", \"reservationId\": \"r-22\"}");
    saga_e2e_reply(&w, m, "success", "{}", NULL, NULL);
    saga_e2e_wait_status(&w, &s, "compensated", 30000);
    saga_e2e_check_all_commands(&w, &s);
}

/* Replies PostgreSQL cannot store as they are: a \u0000 escape (jsonb refuses it), invalid
 * UTF-8 inside a JSON string, and a malformed reply whose value, key and header are not UTF-8. Each
 * is dead-lettered; none may wedge the consumer: the good reply behind them is applied. */
Test(orchestrator_replies, replies_postgresql_cannot_store)
{
    struct saga_ref s;
    saga_e2e_start(&w, "e2e_order", "o-poison", NULL, NULL, &s);
    const struct kmsg *m = saga_e2e_expect(&w, &s, "inventory.commands", "ReserveStock",
                                           "reserve_inventory", "action", NULL);
    const char *cmd_id = kmsg_header(m, "message-id", NULL);
    char id[4][37];
    for (int i = 0; i < 4; i++)
        saga_e2e_uuid(id[i]);
    /* cJSON would read "r-" (a C string ends at the NUL): the reply would change on the way. */
    saga_e2e_produce_raw(&w, s.id, "{\"reservationId\": \"r-\\u0000\"}", "message-id", id[0],
                         "in-reply-to", cmd_id, "saga-id", s.id, "outcome", "success", NULL);
    saga_e2e_produce_raw(&w, s.id, "{\"reservationId\": \"r-\xff\xfe\"}", "message-id", id[1],
                         "in-reply-to", cmd_id, "saga-id", s.id, "outcome", "success", NULL);
    saga_e2e_produce_raw(&w, "k\xff", "\xff\xfe not json", "message-id", id[2], "in-reply-to",
                         cmd_id, "saga-id", s.id, "outcome", "\xc3\x28", NULL);
    saga_e2e_reply(&w, m, "success", "{\"reservationId\": \"r-30\"}", id[3], NULL);

    m = saga_e2e_expect(&w, &s, "payment.commands", "AuthorizePayment", "authorize_payment",
                        "action",
                        "{\"orderId\": \"o-poison\", \"customerId\": \"c-7\", \"amount\": 42, "
                        "\"reservationId\": \"r-30\"}");
    assert_history(&s, "reserve_inventory:action:1:succeeded authorize_payment:action:1:sent");
    assert_value("SELECT disposition FROM saga.replies_received WHERE message_id = $1", id[3],
                 "applied");
    assert_value("SELECT count(*) FROM saga.replies_received", NULL, "1");
    assert_value("SELECT string_agg(error, ' | ' ORDER BY error) FROM saga.dead_letters", NULL,
                 "header outcome is neither success nor failure | "
                 "value contains \\u0000, which PostgreSQL (jsonb) cannot store | "
                 "value is not valid UTF-8 text");
    /* What could not be stored as it came is stored with U+FFFD in place of the bad bytes. */
    assert_value("SELECT payload FROM saga.dead_letters WHERE error LIKE '%UTF-8%'", NULL,
                 "{\"reservationId\": \"r-\xef\xbf\xbd\xef\xbf\xbd\"}");
    assert_value("SELECT key || ' ' || payload || ' ' || (headers->>'outcome') "
                 "FROM saga.dead_letters WHERE error LIKE 'header outcome%'",
                 NULL, "k\xef\xbf\xbd \xef\xbf\xbd\xef\xbf\xbd not json \xef\xbf\xbd(");
    saga_e2e_wait_metric(&w, "saga_replies_total{result=\"malformed\"}", 3, 10000);
    saga_e2e_reply(&w, m, "failure", "{}", NULL, NULL);
    m = saga_e2e_expect(&w, &s, "inventory.commands", "ReleaseStock", "reserve_inventory",
                        "compensation", "{\"orderId\": \"o-poison\", \"reservationId\": \"r-30\"}");
    saga_e2e_reply(&w, m, "success", "{}", NULL, NULL);
    saga_e2e_wait_status(&w, &s, "compensated", 30000);
    saga_e2e_check_all_commands(&w, &s);
}

/* Transactions that fail for a while with a transient error (a trigger refuses the outbox
 * rows, then the history update of the reply, with a serialization failure): both workers roll back
 * and run the same batch again after a pause, nothing is lost or applied twice once the cause is
 * gone. (A deterministic failure, a constraint, dead-letters the reply instead:
 * test_orchestrator_poison.c.) */
Test(orchestrator_replies, failing_transactions_retried)
{
    size_t from = 0;
    pgtest_exec(w.conn, "CREATE FUNCTION e2e_refuse() RETURNS trigger LANGUAGE plpgsql AS "
                        "$$BEGIN RAISE EXCEPTION 'e2e: refused for a while' USING ERRCODE = "
                        "'40001'; END$$");
    pgtest_exec(w.conn, "CREATE TRIGGER e2e_refuse BEFORE INSERT ON saga.outbox FOR EACH ROW "
                        "EXECUTE FUNCTION e2e_refuse()");
    struct saga_ref s;
    saga_e2e_start(&w, "e2e_order", "o-refused", NULL, NULL, &s);
    if (!proc_wait_log(&w.orch, "transient: the batch runs again", &from, 30000, NULL, 0)) {
        saga_e2e_dump(&w);
        cr_assert_fail("the claim transaction did not fail");
    }
    assert_value("SELECT status FROM saga.instances WHERE id = $1", s.id, "pending");
    pgtest_exec(w.conn, "DROP TRIGGER e2e_refuse ON saga.outbox");
    const struct kmsg *m = expect_step(&s, "reserve_inventory");

    pgtest_exec(w.conn, "CREATE TRIGGER e2e_refuse BEFORE UPDATE ON saga.step_history FOR EACH ROW "
                        "EXECUTE FUNCTION e2e_refuse()");
    saga_e2e_reply(&w, m, "success", "{\"reservationId\": \"r-50\"}", NULL, NULL);
    if (!proc_wait_log(&w.orch, "transient: the batch runs again", &from, 30000, NULL, 0)) {
        saga_e2e_dump(&w);
        cr_assert_fail("the reply transaction did not fail");
    }
    assert_history(&s, "reserve_inventory:action:1:sent");
    pgtest_exec(w.conn, "DROP TRIGGER e2e_refuse ON saga.step_history");
    m = expect_step(&s, "authorize_payment");
    saga_e2e_reply(&w, m, "failure", "{}", NULL, NULL);
    m = saga_e2e_expect(&w, &s, "inventory.commands", "ReleaseStock", "reserve_inventory",
                        "compensation",
                        "{\"orderId\": \"o-refused\", \"reservationId\": \"r-50\"}");
    saga_e2e_reply(&w, m, "success", "{}", NULL, NULL);
    saga_e2e_wait_status(&w, &s, "compensated", 30000);
    assert_history(&s, "reserve_inventory:action:1:succeeded authorize_payment:action:1:failed "
                       "reserve_inventory:compensation:1:succeeded");
    assert_value("SELECT count(*) || ' ' || count(*) FILTER (WHERE disposition = 'applied') "
                 "FROM saga.replies_received",
                 NULL, "3 3");
    assert_value("SELECT count(*) FROM saga.dead_letters", NULL, "0");
    saga_e2e_check_all_commands(&w, &s);
}

/* The log line of the orchestrator that holds needle (after *from), or fails the test. */
static void expect_log(const char *needle, size_t *from, char *line, size_t len)
{
    if (!proc_wait_log(&w.orch, needle, from, 10000, line, len)) {
        saga_e2e_dump(&w);
        cr_assert_fail("no log line with \"%s\"", needle);
    }
}

/* Replies that leave the saga's trace (a traceparent of another trace, none at all) are
 * applied like any other, and counted and logged with both trace ids; a reply that keeps the
 * trace is not counted. */
Test(orchestrator_replies, replies_outside_the_sagas_trace_are_applied_and_counted)
{
    static const char foreign[] = "4bf92f3577b34da6a3ce929d0e0e4736";
    struct saga_ref s;
    saga_e2e_start(&w, "e2e_order", "o-trace", NULL, NULL, &s);
    cr_assert_str_neq(s.trace_id, foreign);
    const struct kmsg *m = expect_step(&s, "reserve_inventory");
    const char *cmd_id = kmsg_header(m, "message-id", NULL);

    /* Another trace: applied, counted, logged. */
    char id1[37];
    saga_e2e_uuid(id1);
    saga_e2e_produce_raw(&w, s.id, "{\"reservationId\": \"r-60\"}", "message-id", id1,
                         "in-reply-to", cmd_id, "saga-id", s.id, "outcome", "success",
                         "traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                         NULL);
    const struct kmsg *a = expect_step(&s, "authorize_payment");
    saga_e2e_wait_metric(&w, "saga_replies_trace_mismatch_total", 1, 10000);
    size_t from = 0;
    char line[2048];
    expect_log("a reply from another trace than its saga's", &from, line, sizeof(line));
    cr_assert(strstr(line, "\"level\":\"warn\"") && strstr(line, s.id) && strstr(line, id1) &&
                  strstr(line, s.trace_id) && strstr(line, foreign),
              "the warning must name the saga, the reply and both trace ids: %s", line);
    assert_value("SELECT disposition FROM saga.replies_received WHERE message_id = $1", id1,
                 "applied");

    /* The saga's own trace (as the participant got it): not counted. */
    saga_e2e_reply(&w, a, "success", "{\"authorizationId\": \"a-60\"}", NULL, NULL);
    m = expect_step(&s, "approve_order");
    saga_e2e_wait_metric(&w, "saga_replies_total{result=\"applied\"}", 2, 10000);
    cr_assert_eq(saga_e2e_metric(&w, "saga_replies_trace_mismatch_total"), 1);

    /* No traceparent at all: applied, counted. */
    char id3[37];
    saga_e2e_uuid(id3);
    saga_e2e_produce_raw(&w, s.id, "{}", "message-id", id3, "in-reply-to",
                         kmsg_header(m, "message-id", NULL), "saga-id", s.id, "outcome", "success",
                         NULL);
    m = expect_step(&s, "schedule_shipping");
    saga_e2e_wait_metric(&w, "saga_replies_trace_mismatch_total", 2, 10000);
    expect_log("a reply without a traceparent", &from, line, sizeof(line));
    cr_assert(strstr(line, s.id) && strstr(line, id3) && strstr(line, s.trace_id), "%s", line);

    saga_e2e_reply(&w, m, "success", "{}", NULL, NULL);
    saga_e2e_wait_status(&w, &s, "completed", 30000);
    cr_assert_eq(saga_e2e_metric(&w, "saga_replies_trace_mismatch_total"), 2);
    assert_history(&s, "reserve_inventory:action:1:succeeded authorize_payment:action:1:succeeded "
                       "approve_order:action:1:succeeded schedule_shipping:action:1:succeeded");
    saga_e2e_check_all_commands(&w, &s);
}

/* A participant that never passes the traceparent on: every reply is counted, but the
 * warning is written at most once a second (it was a line per reply). */
Test(orchestrator_replies, trace_warnings_are_rate_limited)
{
    enum { N = 10 };
    struct saga_ref s[N];
    const struct kmsg *m[N];
    for (int i = 0; i < N; i++) {
        char order[32];
        snprintf(order, sizeof(order), "o-notrace-%d", i);
        saga_e2e_start(&w, "e2e_order", order, NULL, NULL, &s[i]);
    }
    for (int i = 0; i < N; i++)
        m[i] = expect_step(&s[i], "reserve_inventory");
    for (int i = 0; i < N; i++) {
        char id[37];
        saga_e2e_uuid(id);
        saga_e2e_produce_raw(&w, s[i].id, "{\"reservationId\": \"r\"}", "message-id", id,
                             "in-reply-to", kmsg_header(m[i], "message-id", NULL), "saga-id",
                             s[i].id, "outcome", "success", NULL);
    }
    saga_e2e_wait_metric(&w, "saga_replies_trace_mismatch_total", N, 10000);
    size_t lines = proc_count_log(&w.orch, "a reply without a traceparent");
    cr_assert(lines >= 1 && lines < N, "%zu warning lines for %d replies without a traceparent",
              lines, N);
}
