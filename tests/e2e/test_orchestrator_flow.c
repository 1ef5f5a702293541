/* saga-orchestrator end to end, the main paths: the real orchestrator and relay against
 * PostgreSQL and the dev broker, the test playing the participants (tests/support/saga_e2e.h).
 * Each test checks saga.instances, saga.step_history, saga.replies_received and every command
 * seen. */
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

TestSuite(orchestrator_flow, .init = setup, .fini = teardown, .timeout = 240);

#define ITEMS "[{\"sku\": \"sku-1\", \"qty\": 2}]"

static const struct kmsg *expect_reserve(const struct saga_ref *s)
{
    char payload[256];
    snprintf(payload, sizeof(payload), "{\"orderId\": \"%s\", \"items\": " ITEMS "}", s->order_id);
    return saga_e2e_expect(&w, s, "inventory.commands", "ReserveStock", "reserve_inventory",
                           "action", payload);
}

static const struct kmsg *expect_authorize(const struct saga_ref *s, const char *reservation)
{
    char payload[256];
    snprintf(payload, sizeof(payload),
             "{\"orderId\": \"%s\", \"customerId\": \"c-7\", \"amount\": 42, "
             "\"reservationId\": \"%s\"}",
             s->order_id, reservation);
    return saga_e2e_expect(&w, s, "payment.commands", "AuthorizePayment", "authorize_payment",
                           "action", payload);
}

static const struct kmsg *expect_approve(const struct saga_ref *s, const char *authorization)
{
    char payload[256];
    snprintf(payload, sizeof(payload), "{\"orderId\": \"%s\", \"authorizationId\": \"%s\"}",
             s->order_id, authorization);
    return saga_e2e_expect(&w, s, "orders.commands", "ApproveOrder", "approve_order", "action",
                           payload);
}

static const struct kmsg *expect_ship(const struct saga_ref *s, const char *reservation)
{
    char payload[256];
    snprintf(payload, sizeof(payload),
             "{\"orderId\": \"%s\", \"items\": " ITEMS ", \"reservationId\": \"%s\"}", s->order_id,
             reservation);
    return saga_e2e_expect(&w, s, "shipping.commands", "ScheduleShipment", "schedule_shipping",
                           "action", payload);
}

static const struct kmsg *expect_release(const struct saga_ref *s, const char *reservation_json)
{
    char payload[256];
    snprintf(payload, sizeof(payload), "{\"orderId\": \"%s\", \"reservationId\": %s}", s->order_id,
             reservation_json);
    return saga_e2e_expect(&w, s, "inventory.commands", "ReleaseStock", "reserve_inventory",
                           "compensation", payload);
}

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

/* Every step succeeds: completed, replies kept for later templates, /metrics counts it. */
Test(orchestrator_flow, happy_path)
{
    struct saga_ref s;
    saga_e2e_start(&w, "e2e_order", "o-happy", NULL, NULL, &s);

    const struct kmsg *m = expect_reserve(&s);
    saga_e2e_reply(&w, m, "success", "{\"reservationId\": \"r-1\"}", NULL, NULL);
    m = expect_authorize(&s, "r-1");
    saga_e2e_reply(&w, m, "success", "{\"authorizationId\": \"a-1\"}", NULL, NULL);
    m = expect_approve(&s, "a-1");
    saga_e2e_reply(&w, m, "success", "{\"approved\": true}", NULL, NULL);
    m = expect_ship(&s, "r-1");
    saga_e2e_reply(&w, m, "success", "{\"shipmentId\": \"s-1\"}", NULL, NULL);

    saga_e2e_wait_status(&w, &s, "completed", 30000);
    assert_value("SELECT (completed_at IS NOT NULL AND completed_at >= created_at)::text || ' ' || "
                 "coalesce(error, '-') || ' ' || saga_name || ' ' || saga_version "
                 "FROM saga.instances WHERE id = $1",
                 &s, "true - e2e_order 1");
    assert_history(&s, "reserve_inventory:action:1:succeeded authorize_payment:action:1:succeeded "
                       "approve_order:action:1:succeeded schedule_shipping:action:1:succeeded");
    /* Each reply's data is kept with its history row and in the saga's replies (for the
     * templates of later steps and compensations). */
    assert_value("SELECT string_agg(reply::text, ' ' ORDER BY id) FROM saga.step_history "
                 "WHERE saga_id = $1",
                 &s,
                 "{\"reservationId\": \"r-1\"} {\"authorizationId\": \"a-1\"} "
                 "{\"approved\": true} {\"shipmentId\": \"s-1\"}");
    assert_value("SELECT replies->'reserve_inventory'->>'reservationId' || ' ' || "
                 "(replies->'authorize_payment'->>'authorizationId') FROM saga.instances "
                 "WHERE id = $1",
                 &s, "r-1 a-1");
    assert_value("SELECT count(*) FILTER (WHERE replied_at >= sent_at) || '/' || count(*) "
                 "FROM saga.step_history WHERE saga_id = $1",
                 &s, "4/4");
    assert_value("SELECT string_agg(disposition, ' ' ORDER BY received_at, \"offset\") || ' ' || "
                 "count(DISTINCT in_reply_to) FROM saga.replies_received WHERE saga_id = $1",
                 &s, "applied applied applied applied 4");
    assert_value("SELECT count(*) FROM saga.dead_letters", NULL, "0");
    saga_e2e_check_all_commands(&w, &s);

    saga_e2e_wait_metric(&w, "saga_sagas_completed_total", 1, 10000);
    cr_assert_eq(saga_e2e_metric(&w, "saga_sagas_completed_total"), 1);
    cr_assert_eq(saga_e2e_metric(&w, "saga_sagas_started_total"), 1);
    cr_assert_eq(saga_e2e_metric(&w, "saga_sagas_compensated_total"), 0);
    cr_assert_eq(saga_e2e_metric(&w, "saga_replies_total{result=\"applied\"}"), 4);
    cr_assert_eq(saga_e2e_metric(&w, "saga_replies_total{result=\"malformed\"}"), 0);
    char *body;
    cr_assert_eq(saga_e2e_http_get(&w, "/metrics", &body), 200);
    cr_assert(strstr(body, "# TYPE saga_sagas_completed_total counter"), "%s", body);
    cr_assert(strstr(body, "saga_step_latency_seconds_count 4"), "%s", body);
    free(body);
    cr_assert_eq(saga_e2e_http_get(&w, "/healthz", &body), 200);
    free(body);
}

/* Payment declined: ReleaseStock only (the failed step did nothing to undo), compensated. */
Test(orchestrator_flow, payment_declined)
{
    struct saga_ref s;
    saga_e2e_start(&w, "e2e_order", "o-declined", NULL, NULL, &s);
    const struct kmsg *m = expect_reserve(&s);
    saga_e2e_reply(&w, m, "success", "{\"reservationId\": \"r-2\"}", NULL, NULL);
    m = expect_authorize(&s, "r-2");
    saga_e2e_reply(&w, m, "failure", "{\"reason\": \"card declined\"}", NULL, NULL);
    m = expect_release(&s, "\"r-2\"");
    saga_e2e_wait_status(&w, &s, "compensating", 30000);
    assert_value("SELECT current_step FROM saga.instances WHERE id = $1", &s, "reserve_inventory");
    saga_e2e_reply(&w, m, "success", "{\"released\": true}", NULL, NULL);

    saga_e2e_wait_status(&w, &s, "compensated", 30000);
    assert_history(&s, "reserve_inventory:action:1:succeeded authorize_payment:action:1:failed "
                       "reserve_inventory:compensation:1:succeeded");
    assert_value("SELECT (completed_at IS NOT NULL)::text FROM saga.instances WHERE id = $1", &s,
                 "true");
    /* The error says which step failed (the participant's reason is in its history row). */
    char *err = saga_e2e_value(&w, "SELECT error FROM saga.instances WHERE id = $1", s.id);
    cr_assert(strstr(err, "authorize_payment"), "error: %s", err);
    free(err);
    assert_value("SELECT reply->>'reason' FROM saga.step_history WHERE saga_id = $1 AND "
                 "step = 'authorize_payment'",
                 &s, "card declined");
    assert_value(
        "SELECT count(*) FROM saga.replies_received WHERE saga_id = $1 AND disposition = 'applied'",
        &s, "3");
    saga_e2e_check_all_commands(&w, &s);
    saga_e2e_wait_metric(&w, "saga_sagas_compensated_total", 1, 10000);
    cr_assert_eq(saga_e2e_metric(&w, "saga_sagas_completed_total"), 0);
}

/* The first step fails: nothing succeeded, so nothing is compensated. */
Test(orchestrator_flow, out_of_stock)
{
    struct saga_ref s;
    saga_e2e_start(&w, "e2e_order", "o-nostock", NULL, NULL, &s);
    const struct kmsg *m = expect_reserve(&s);
    saga_e2e_reply(&w, m, "failure", "{\"reason\": \"out of stock\"}", NULL, NULL);
    saga_e2e_wait_status(&w, &s, "compensated", 30000);
    assert_history(&s, "reserve_inventory:action:1:failed");
    saga_e2e_check_all_commands(&w, &s);
    assert_value("SELECT (completed_at IS NOT NULL AND error IS NOT NULL)::text "
                 "FROM saga.instances WHERE id = $1",
                 &s, "true");
}

/* A step after the pivot is retried until it succeeds; nothing is compensated. */
Test(orchestrator_flow, after_pivot_retried_until_success)
{
    struct saga_ref s;
    saga_e2e_start(&w, "e2e_order", "o-pivot", NULL, NULL, &s);
    const struct kmsg *m = expect_reserve(&s);
    saga_e2e_reply(&w, m, "success", "{\"reservationId\": \"r-3\"}", NULL, NULL);
    m = expect_authorize(&s, "r-3");
    saga_e2e_reply(&w, m, "success", "{\"authorizationId\": \"a-3\"}", NULL, NULL);
    m = expect_approve(&s, "a-3");
    saga_e2e_reply(&w, m, "success", "{}", NULL, NULL);
    /* More failures than max_attempts (3): after the pivot there is no limit. */
    char first_id[37] = "";
    for (int i = 0; i < 4; i++) {
        m = expect_ship(&s, "r-3");
        const char *mid = kmsg_header(m, "message-id", NULL);
        if (i == 0)
            snprintf(first_id, sizeof(first_id), "%s", mid);
        else
            cr_assert_str_neq(mid, first_id, "a retry reuses the message-id");
        saga_e2e_reply(&w, m, "failure", "{\"reason\": \"carrier unavailable\"}", NULL, NULL);
    }
    m = expect_ship(&s, "r-3");
    saga_e2e_reply(&w, m, "success", "{\"shipmentId\": \"s-3\"}", NULL, NULL);
    saga_e2e_wait_status(&w, &s, "completed", 30000);
    assert_history(&s, "reserve_inventory:action:1:succeeded authorize_payment:action:1:succeeded "
                       "approve_order:action:1:succeeded schedule_shipping:action:1:failed "
                       "schedule_shipping:action:2:failed schedule_shipping:action:3:failed "
                       "schedule_shipping:action:4:failed schedule_shipping:action:5:succeeded");
    assert_value("SELECT coalesce(error, '-') FROM saga.instances WHERE id = $1", &s, "-");
    saga_e2e_check_all_commands(&w, &s);
}

/* saga.start with a traceparent and a correlation id: every command carries them. */
Test(orchestrator_flow, traceparent_and_correlation_id)
{
    struct saga_ref s;
    saga_e2e_start(&w, "e2e_order", "o-trace", "corr-42",
                   "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", &s);
    cr_assert_str_eq(s.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
    /* saga_e2e_check_command checks traceparent and correlation-id on each command. */
    const struct kmsg *m = expect_reserve(&s);
    saga_e2e_reply(&w, m, "success", "{\"reservationId\": \"r-4\"}", NULL, NULL);
    m = expect_authorize(&s, "r-4");
    saga_e2e_reply(&w, m, "failure", "{}", NULL, NULL);
    m = expect_release(&s, "\"r-4\"");
    saga_e2e_reply(&w, m, "success", "{}", NULL, NULL);
    saga_e2e_wait_status(&w, &s, "compensated", 30000);
    saga_e2e_check_all_commands(&w, &s);
    assert_value("SELECT correlation_id FROM saga.instances WHERE id = $1", &s, "corr-42");
}

/* What the participant does with a command of saga number i of many_sagas_at_once. */
static const char *many_outcome(int i, const char *step, const char *phase, int shipping_tries)
{
    if (!strcmp(phase, "compensation"))
        return "success";
    if (!strcmp(step, "reserve_inventory"))
        return i % 4 == 0 ? "failure" : "success";
    if (!strcmp(step, "authorize_payment"))
        return i % 4 == 1 ? "failure" : "success";
    if (!strcmp(step, "schedule_shipping"))
        return i % 4 == 3 && shipping_tries == 1 ? "failure" : "success";
    return "success";
}

/* Many sagas started in one transaction, driven at once: batches of several sagas (claims and
 * replies) keep each saga's story apart. */
Test(orchestrator_flow, many_sagas_at_once)
{
    enum { N = 24 };
    static const int commands_per_kind[4] = {1, 3, 4, 5};
    struct saga_ref s[N];
    int shipping_tries[N] = {0};
    pgtest_exec(w.conn, "BEGIN");
    for (int i = 0; i < N; i++) {
        char order[32];
        snprintf(order, sizeof(order), "o-many-%02d", i);
        saga_e2e_start(&w, "e2e_order", order, NULL, NULL, &s[i]);
    }
    pgtest_exec(w.conn, "COMMIT");
    int total = 0;
    for (int i = 0; i < N; i++)
        total += commands_per_kind[i % 4];

    for (int n = 0; n < total; n++) {
        const struct kmsg *m = saga_e2e_next_command(&w, NULL, 30000);
        const char *sid = kmsg_header(m, "saga-id", NULL);
        int i = 0;
        while (i < N && strcmp(s[i].id, sid))
            i++;
        cr_assert(i < N, "command for a saga of no test: %s", sid);
        const char *step = kmsg_header(m, "saga-step", NULL);
        const char *phase = kmsg_header(m, "saga-phase", NULL);
        cr_assert(step && phase, "command without saga-step or saga-phase");
        char reservation[32], data[64];
        snprintf(reservation, sizeof(reservation), "r-many-%02d", i);
        if (!strcmp(phase, "compensation")) {
            char payload[256];
            snprintf(payload, sizeof(payload), "{\"orderId\": \"%s\", \"reservationId\": \"%s\"}",
                     s[i].order_id, reservation);
            saga_e2e_check_command(m, &s[i], "inventory.commands", "ReleaseStock",
                                   "reserve_inventory", "compensation", payload);
            snprintf(data, sizeof(data), "{}");
        } else if (!strcmp(step, "reserve_inventory")) {
            saga_e2e_check_command(m, &s[i], "inventory.commands", "ReserveStock", step, phase,
                                   NULL);
            snprintf(data, sizeof(data), "{\"reservationId\": \"%s\"}", reservation);
        } else if (!strcmp(step, "authorize_payment")) {
            char payload[192];
            snprintf(payload, sizeof(payload),
                     "{\"orderId\": \"%s\", \"customerId\": \"c-7\", \"amount\": 42, "
                     "\"reservationId\": \"%s\"}",
                     s[i].order_id, reservation);
            saga_e2e_check_command(m, &s[i], "payment.commands", "AuthorizePayment", step, phase,
                                   payload);
            snprintf(data, sizeof(data), "{\"authorizationId\": \"a-many-%02d\"}", i);
        } else if (!strcmp(step, "approve_order")) {
            char payload[128];
            snprintf(payload, sizeof(payload),
                     "{\"orderId\": \"%s\", \"authorizationId\": \"a-many-%02d\"}", s[i].order_id,
                     i);
            saga_e2e_check_command(m, &s[i], "orders.commands", "ApproveOrder", step, phase,
                                   payload);
            snprintf(data, sizeof(data), "{}");
        } else {
            saga_e2e_check_command(m, &s[i], "shipping.commands", "ScheduleShipment",
                                   "schedule_shipping", phase, NULL);
            shipping_tries[i]++;
            snprintf(data, sizeof(data), "{}");
        }
        saga_e2e_reply(&w, m, many_outcome(i, step, phase, shipping_tries[i]), data, NULL, NULL);
    }

    static const char *const want_status[4] = {"compensated", "compensated", "completed",
                                               "completed"};
    static const char *const want_history[4] = {
        "reserve_inventory:action:1:failed",
        "reserve_inventory:action:1:succeeded authorize_payment:action:1:failed "
        "reserve_inventory:compensation:1:succeeded",
        "reserve_inventory:action:1:succeeded authorize_payment:action:1:succeeded "
        "approve_order:action:1:succeeded schedule_shipping:action:1:succeeded",
        "reserve_inventory:action:1:succeeded authorize_payment:action:1:succeeded "
        "approve_order:action:1:succeeded schedule_shipping:action:1:failed "
        "schedule_shipping:action:2:succeeded",
    };
    for (int i = 0; i < N; i++) {
        saga_e2e_wait_status(&w, &s[i], want_status[i % 4], 30000);
        assert_history(&s[i], want_history[i % 4]);
        saga_e2e_check_all_commands(&w, &s[i]);
    }
    assert_value("SELECT count(*) FROM saga.replies_received WHERE disposition = 'applied'", NULL,
                 "78");
    assert_value("SELECT count(*) FROM saga.replies_received", NULL, "78");
    saga_e2e_wait_metric(&w, "saga_sagas_completed_total", N / 2, 10000);
    cr_assert_eq(saga_e2e_metric(&w, "saga_sagas_compensated_total"), N / 2);
    cr_assert_eq(saga_e2e_metric(&w, "saga_sagas_started_total"), N);
}

/* The pivot fails: the steps before it are compensated in reverse order, each compensation
 * rendered with its step's reply. */
Test(orchestrator_flow, pivot_failure)
{
    struct saga_ref s;
    saga_e2e_start(&w, "e2e_order", "o-pivot-fail", NULL, NULL, &s);
    const struct kmsg *m = expect_reserve(&s);
    saga_e2e_reply(&w, m, "success", "{\"reservationId\": \"r-5\"}", NULL, NULL);
    m = expect_authorize(&s, "r-5");
    saga_e2e_reply(&w, m, "success", "{\"authorizationId\": \"a-5\"}", NULL, NULL);
    m = expect_approve(&s, "a-5");
    saga_e2e_reply(&w, m, "failure", "{\"reason\": \"fraud check\"}", NULL, NULL);
    m = saga_e2e_expect(&w, &s, "payment.commands", "RefundPayment", "authorize_payment",
                        "compensation",
                        "{\"orderId\": \"o-pivot-fail\", \"authorizationId\": \"a-5\", "
                        "\"amount\": 42}");
    saga_e2e_reply(&w, m, "success", "{}", NULL, NULL);
    m = expect_release(&s, "\"r-5\"");
    saga_e2e_reply(&w, m, "success", "{}", NULL, NULL);
    saga_e2e_wait_status(&w, &s, "compensated", 30000);
    assert_history(&s, "reserve_inventory:action:1:succeeded authorize_payment:action:1:succeeded "
                       "approve_order:action:1:failed authorize_payment:compensation:1:succeeded "
                       "reserve_inventory:compensation:1:succeeded");
    saga_e2e_check_all_commands(&w, &s);
}

/* The pivot times out: retried beyond its max_attempts (it may have applied and can never be
 * compensated), until it answers. */
Test(orchestrator_flow, pivot_timeout_retried_beyond_max_attempts)
{
    struct saga_ref s;
    saga_e2e_start(&w, "e2e_pivot", "o-pivot-slow", NULL, NULL, &s);
    const struct kmsg *m = expect_reserve(&s);
    saga_e2e_reply(&w, m, "success", "{\"reservationId\": \"r-6\"}", NULL, NULL);
    m = expect_authorize(&s, "r-6");
    saga_e2e_reply(&w, m, "success", "{\"authorizationId\": \"a-6\"}", NULL, NULL);
    for (int i = 0; i < 3; i++)
        m = expect_approve(&s, "a-6"); /* max_attempts is 2: the third is beyond it */
    saga_e2e_reply(&w, m, "success", "{}", NULL, NULL);
    m = expect_ship(&s, "r-6");
    saga_e2e_reply(&w, m, "success", "{}", NULL, NULL);
    saga_e2e_wait_status(&w, &s, "completed", 30000);
    assert_history(&s, "reserve_inventory:action:1:succeeded authorize_payment:action:1:succeeded "
                       "approve_order:action:1:timed_out approve_order:action:2:timed_out "
                       "approve_order:action:3:succeeded schedule_shipping:action:1:succeeded");
    saga_e2e_check_all_commands(&w, &s);
}
