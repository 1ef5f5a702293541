/* saga-orchestrator end to end: timeouts, compensations that fail, the operator's saga.retry
 * and saga.abort, and SIGTERM with sagas in flight. The test plays the participants
 * (tests/support/saga_e2e.h). */
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

TestSuite(orchestrator_ops, .init = setup, .fini = teardown, .timeout = 240);

static void assert_history(const struct saga_ref *s, const char *want)
{
    char *got = saga_e2e_history(&w, s->id);
    cr_assert_str_eq(got, want, "saga %s history:\n  %s\nexpected:\n  %s", s->id, got, want);
    free(got);
}

static void assert_value(const char *sql, const struct saga_ref *s, const char *want)
{
    char *got = saga_e2e_value(&w, sql, s ? s->id : NULL);
    cr_assert_str_eq(got, want, "%s: \"%s\", expected \"%s\"", sql, got, want);
    free(got);
}

static void assert_contains(const char *sql, const struct saga_ref *s, const char *needle)
{
    char *got = saga_e2e_value(&w, sql, s->id);
    cr_assert(strstr(got, needle), "%s: \"%s\" does not mention \"%s\"", sql, got, needle);
    free(got);
}

/* Runs sql (saga id as $1) expecting an error with SQLSTATE want. */
static void expect_sql_error(const char *sql, const struct saga_ref *s, const char *want,
                             const char *needle)
{
    const char *params[] = {s->id};
    char state[6], msg[512];
    pgtest_expect_error(w.conn, sql, 1, params, state, msg, sizeof(msg));
    cr_assert_str_eq(state, want, "%s: SQLSTATE %s (%s), expected %s", sql, state, msg, want);
    if (needle)
        cr_assert(strstr(msg, needle), "%s: \"%s\" does not mention \"%s\"", sql, msg, needle);
}

static const struct kmsg *reserve_ok(const struct saga_ref *s, const char *reservation)
{
    const struct kmsg *m = saga_e2e_expect(&w, s, "inventory.commands", "ReserveStock",
                                           "reserve_inventory", "action", NULL);
    char data[128];
    snprintf(data, sizeof(data), "{\"reservationId\": \"%s\"}", reservation);
    saga_e2e_reply(&w, m, "success", data, NULL, NULL);
    return m;
}

static const struct kmsg *expect_authorize(const struct saga_ref *s)
{
    return saga_e2e_expect(&w, s, "payment.commands", "AuthorizePayment", "authorize_payment",
                           "action", NULL);
}

/* No reply to a compensatable step: retried with backoff (a new message-id, the same
 * idempotency-key), then compensated, the timed-out step included. */
Test(orchestrator_ops, timeout_retried_then_compensated)
{
    struct saga_ref s;
    saga_e2e_start(&w, "e2e_timeout", "o-timeout", NULL, NULL, &s);
    reserve_ok(&s, "r-10");
    const struct kmsg *a1 = expect_authorize(&s); /* not answered */
    const struct kmsg *a2 = expect_authorize(&s); /* not answered either */
    cr_assert_str_neq(kmsg_header(a1, "message-id", NULL), kmsg_header(a2, "message-id", NULL),
                      "attempt 2 reuses attempt 1's message-id");
    cr_assert_str_eq(kmsg_header(a1, "idempotency-key", NULL),
                     kmsg_header(a2, "idempotency-key", NULL));
    cr_assert_str_eq(a1->value, a2->value);

    /* Out of attempts: the timed-out step may have applied, so RefundPayment comes first (with
     * no authorization id: the step never replied), then ReleaseStock. */
    const struct kmsg *m = saga_e2e_expect(
        &w, &s, "payment.commands", "RefundPayment", "authorize_payment", "compensation",
        "{\"orderId\": \"o-timeout\", \"authorizationId\": null, \"amount\": 42}");
    saga_e2e_wait_status(&w, &s, "compensating", 30000);
    saga_e2e_reply(&w, m, "success", "{}", NULL, NULL);
    m = saga_e2e_expect(&w, &s, "inventory.commands", "ReleaseStock", "reserve_inventory",
                        "compensation",
                        "{\"orderId\": \"o-timeout\", \"reservationId\": \"r-10\"}");
    saga_e2e_reply(&w, m, "success", "{}", NULL, NULL);
    saga_e2e_wait_status(&w, &s, "compensated", 30000);

    assert_history(&s, "reserve_inventory:action:1:succeeded authorize_payment:action:1:timed_out "
                       "authorize_payment:action:2:timed_out "
                       "authorize_payment:compensation:1:succeeded "
                       "reserve_inventory:compensation:1:succeeded");
    assert_contains("SELECT error FROM saga.instances WHERE id = $1", &s, "timed out");
    /* The timed-out rows have no reply. */
    assert_value("SELECT count(*) FROM saga.step_history WHERE saga_id = $1 AND "
                 "status = 'timed_out' AND replied_at IS NULL AND reply IS NULL",
                 &s, "2");
    saga_e2e_check_all_commands(&w, &s);
    saga_e2e_wait_metric(&w, "saga_deadlines_fired_total", 3, 10000); /* 2 timeouts, 1 backoff */
}

/* A compensation that keeps failing leaves the saga failed; saga.retry resumes it at once. */
Test(orchestrator_ops, failing_compensation_then_retry)
{
    struct saga_ref s;
    saga_e2e_start(&w, "e2e_order", "o-stuck", NULL, NULL, &s);
    reserve_ok(&s, "r-11");
    const struct kmsg *m = expect_authorize(&s);
    saga_e2e_reply(&w, m, "failure", "{\"reason\": \"declined\"}", NULL, NULL);
    const char *release = "{\"orderId\": \"o-stuck\", \"reservationId\": \"r-11\"}";
    /* max_attempts 3: three failed compensations, then the saga waits for an operator. */
    for (int i = 0; i < 3; i++) {
        m = saga_e2e_expect(&w, &s, "inventory.commands", "ReleaseStock", "reserve_inventory",
                            "compensation", release);
        saga_e2e_reply(&w, m, "failure", "{\"reason\": \"inventory service broken\"}", NULL, NULL);
    }
    saga_e2e_wait_status(&w, &s, "failed", 30000);
    assert_contains("SELECT error FROM saga.instances WHERE id = $1", &s, "reserve_inventory");
    assert_value("SELECT (completed_at IS NULL AND deadline IS NULL)::text FROM saga.instances "
                 "WHERE id = $1",
                 &s, "true");
    saga_e2e_wait_metric(&w, "saga_sagas_failed_total", 1, 10000);
    expect_sql_error("SELECT saga.abort($1, 'no')", &s, "SG011", "failed");

    PQclear(pgtest_query(w.conn, "SELECT saga.retry($1)", 1, (const char *[]){s.id}));
    /* The request is handled within a second (the bound is generous for a loaded machine). */
    saga_e2e_wait_value(&w,
                        "SELECT status || ' ' || (pending_request IS NULL) FROM saga.instances "
                        "WHERE id = $1",
                        s.id, "compensating true", 3000);
    m = saga_e2e_expect(&w, &s, "inventory.commands", "ReleaseStock", "reserve_inventory",
                        "compensation", release);
    saga_e2e_reply(&w, m, "success", "{}", NULL, NULL);
    saga_e2e_wait_status(&w, &s, "compensated", 30000);

    assert_history(&s, "reserve_inventory:action:1:succeeded authorize_payment:action:1:failed "
                       "reserve_inventory:compensation:1:failed "
                       "reserve_inventory:compensation:2:failed "
                       "reserve_inventory:compensation:3:failed "
                       "reserve_inventory:compensation:4:succeeded");
    assert_value("SELECT string_agg(step || ':' || status, ' ' ORDER BY id) FROM saga.step_history "
                 "WHERE saga_id = $1 AND phase = 'operator'",
                 &s, "reserve_inventory:retry_requested");
    saga_e2e_check_all_commands(&w, &s);
    expect_sql_error("SELECT saga.retry($1)", &s, "SG011", "compensated");
}

/* saga.abort on a saga waiting for a step: the current step is compensated too, then the ones
 * before it; its reply, if it still comes, is late. Abort is refused once the pivot was sent
 * and on a finished saga. */
Test(orchestrator_ops, abort)
{
    struct saga_ref s;
    saga_e2e_start(&w, "e2e_order", "o-abort", NULL, NULL, &s);
    reserve_ok(&s, "r-12");
    const struct kmsg *a = expect_authorize(&s);
    saga_e2e_wait_value(&w,
                        "SELECT status || ' ' || current_step FROM saga.instances WHERE id = $1",
                        s.id, "running authorize_payment", 30000);
    PQclear(pgtest_query(w.conn, "SELECT saga.abort($1, 'customer cancelled')", 1,
                         (const char *[]){s.id}));
    const struct kmsg *m = saga_e2e_expect(&w, &s, "payment.commands", "RefundPayment",
                                           "authorize_payment", "compensation",
                                           "{\"orderId\": \"o-abort\", \"authorizationId\": null, "
                                           "\"amount\": 42}");
    saga_e2e_reply(&w, m, "success", "{}", NULL, NULL);
    m = saga_e2e_expect(&w, &s, "inventory.commands", "ReleaseStock", "reserve_inventory",
                        "compensation", "{\"orderId\": \"o-abort\", \"reservationId\": \"r-12\"}");
    /* The aborted step's reply arrives now: recorded, ignored. */
    char late_id[37];
    saga_e2e_reply(&w, a, "success", "{\"authorizationId\": \"a-late\"}", NULL, late_id);
    saga_e2e_wait_value(&w, "SELECT disposition FROM saga.inbox WHERE message_id = $1", late_id,
                        "late", 30000);
    saga_e2e_reply(&w, m, "success", "{}", NULL, NULL);
    saga_e2e_wait_status(&w, &s, "compensated", 30000);

    assert_contains("SELECT error FROM saga.instances WHERE id = $1", &s, "customer cancelled");
    assert_history(&s, "reserve_inventory:action:1:succeeded authorize_payment:action:1:late "
                       "authorize_payment:compensation:1:succeeded "
                       "reserve_inventory:compensation:1:succeeded");
    assert_value("SELECT string_agg(step || ':' || status || ':' || (reply->>'reason'), ' ') "
                 "FROM saga.step_history WHERE saga_id = $1 AND phase = 'operator'",
                 &s, "authorize_payment:abort_requested:customer cancelled");
    /* The late reply did not bring its data into the saga. */
    assert_value("SELECT (replies ? 'authorize_payment')::text FROM saga.instances WHERE id = $1",
                 &s, "false");
    saga_e2e_check_all_commands(&w, &s);
    expect_sql_error("SELECT saga.abort($1, 'again')", &s, "SG011", "compensated");

    /* A second saga: abort is refused once the pivot is sent, and when completed. */
    struct saga_ref t;
    saga_e2e_start(&w, "e2e_order", "o-abort-2", NULL, NULL, &t);
    reserve_ok(&t, "r-13");
    m = expect_authorize(&t);
    saga_e2e_reply(&w, m, "success", "{\"authorizationId\": \"a-13\"}", NULL, NULL);
    m = saga_e2e_expect(&w, &t, "orders.commands", "ApproveOrder", "approve_order", "action", NULL);
    saga_e2e_wait_value(&w, "SELECT pivot_sent::text FROM saga.instances WHERE id = $1", t.id,
                        "true", 30000);
    expect_sql_error("SELECT saga.abort($1, 'too late')", &t, "SG012", NULL);
    saga_e2e_reply(&w, m, "success", "{}", NULL, NULL);
    m = saga_e2e_expect(&w, &t, "shipping.commands", "ScheduleShipment", "schedule_shipping",
                        "action", NULL);
    saga_e2e_reply(&w, m, "success", "{}", NULL, NULL);
    saga_e2e_wait_status(&w, &t, "completed", 30000);
    expect_sql_error("SELECT saga.abort($1, 'way too late')", &t, "SG011", "completed");
    assert_value("SELECT count(*) FROM saga.step_history WHERE saga_id = $1 AND phase = 'operator'",
                 &t, "0");
    saga_e2e_check_all_commands(&w, &t);
}

/* SIGTERM: exit 0. A reply sent while the orchestrator is down and a saga started meanwhile
 * are handled after the restart; nothing is applied twice. */
Test(orchestrator_ops, sigterm_and_restart)
{
    struct saga_ref s, t;
    saga_e2e_start(&w, "e2e_order", "o-restart", NULL, NULL, &s);
    reserve_ok(&s, "r-14");
    const struct kmsg *m = expect_authorize(&s);
    saga_e2e_wait_value(&w, "SELECT count(*) FROM saga.inbox WHERE saga_id = $1", s.id, "1", 30000);

    saga_e2e_orch_stop(&w);
    cr_assert_eq(proc_count_log(&w.orch, "saga-orchestrator stopped"), 1);
    saga_e2e_reply(&w, m, "success", "{\"authorizationId\": \"a-14\"}", NULL, NULL);
    saga_e2e_start(&w, "e2e_order", "o-restart-2", NULL, NULL, &t);
    assert_value("SELECT status FROM saga.instances WHERE id = $1", &t, "pending");

    saga_e2e_orch_start(&w);
    m = saga_e2e_expect(&w, &s, "orders.commands", "ApproveOrder", "approve_order", "action",
                        "{\"orderId\": \"o-restart\", \"authorizationId\": \"a-14\"}");
    saga_e2e_reply(&w, m, "success", "{}", NULL, NULL);
    m = saga_e2e_expect(&w, &s, "shipping.commands", "ScheduleShipment", "schedule_shipping",
                        "action", NULL);
    saga_e2e_reply(&w, m, "success", "{}", NULL, NULL);
    saga_e2e_wait_status(&w, &s, "completed", 30000);
    assert_history(&s, "reserve_inventory:action:1:succeeded authorize_payment:action:1:succeeded "
                       "approve_order:action:1:succeeded schedule_shipping:action:1:succeeded");
    assert_value("SELECT string_agg(disposition, ' ') FROM saga.inbox WHERE saga_id = $1", &s,
                 "applied applied applied applied");
    saga_e2e_check_all_commands(&w, &s);

    reserve_ok(&t, "r-15");
    m = expect_authorize(&t);
    saga_e2e_reply(&w, m, "failure", "{}", NULL, NULL);
    m = saga_e2e_expect(&w, &t, "inventory.commands", "ReleaseStock", "reserve_inventory",
                        "compensation", NULL);
    saga_e2e_reply(&w, m, "success", "{}", NULL, NULL);
    saga_e2e_wait_status(&w, &t, "compensated", 30000);
    saga_e2e_check_all_commands(&w, &t);
    assert_value("SELECT count(*) FROM saga.dead_letters", NULL, "0");

    saga_e2e_orch_stop(&w);
}
