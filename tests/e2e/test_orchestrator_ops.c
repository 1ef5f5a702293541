/* saga-orchestrator end to end: timeouts, compensations that fail, the operator's saga.retry
 * and saga.abort, and SIGTERM with sagas in flight. The test plays the participants
 * (tests/support/saga_e2e.h). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

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

static void assert_value_p(const char *sql, const char *arg, const char *want)
{
    char *got = saga_e2e_value(&w, sql, arg);
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

/* A compensation that is never answered times out like an action, until its budget is spent:
 * failed. saga.retry then sends it again with a fresh budget. */
Test(orchestrator_ops, compensation_timeout_then_retry)
{
    struct saga_ref s;
    saga_e2e_start(&w, "e2e_timeout", "o-comp-timeout", NULL, NULL, &s);
    reserve_ok(&s, "r-16");
    expect_authorize(&s);
    expect_authorize(&s);
    const char *refund = "{\"orderId\": \"o-comp-timeout\", \"authorizationId\": null, "
                         "\"amount\": 42}";
    const struct kmsg *r1 = saga_e2e_expect(&w, &s, "payment.commands", "RefundPayment",
                                            "authorize_payment", "compensation", refund);
    const struct kmsg *r2 = saga_e2e_expect(&w, &s, "payment.commands", "RefundPayment",
                                            "authorize_payment", "compensation", refund);
    cr_assert_str_neq(kmsg_header(r1, "message-id", NULL), kmsg_header(r2, "message-id", NULL));
    saga_e2e_wait_status(&w, &s, "failed", 30000);
    assert_contains("SELECT error FROM saga.instances WHERE id = $1", &s, "timed out");
    assert_history(&s, "reserve_inventory:action:1:succeeded authorize_payment:action:1:timed_out "
                       "authorize_payment:action:2:timed_out "
                       "authorize_payment:compensation:1:timed_out "
                       "authorize_payment:compensation:2:timed_out");

    PQclear(pgtest_query(w.conn, "SELECT saga.retry($1)", 1, (const char *[]){s.id}));
    const struct kmsg *m = saga_e2e_expect(&w, &s, "payment.commands", "RefundPayment",
                                           "authorize_payment", "compensation", refund);
    saga_e2e_reply(&w, m, "success", "{}", NULL, NULL);
    m = saga_e2e_expect(&w, &s, "inventory.commands", "ReleaseStock", "reserve_inventory",
                        "compensation",
                        "{\"orderId\": \"o-comp-timeout\", \"reservationId\": \"r-16\"}");
    saga_e2e_reply(&w, m, "success", "{}", NULL, NULL);
    saga_e2e_wait_status(&w, &s, "compensated", 30000);
    assert_history(&s, "reserve_inventory:action:1:succeeded authorize_payment:action:1:timed_out "
                       "authorize_payment:action:2:timed_out "
                       "authorize_payment:compensation:1:timed_out "
                       "authorize_payment:compensation:2:timed_out "
                       "authorize_payment:compensation:3:succeeded "
                       "reserve_inventory:compensation:1:succeeded");
    saga_e2e_check_all_commands(&w, &s);
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
    saga_e2e_wait_value(&w, "SELECT disposition FROM saga.replies_received WHERE message_id = $1",
                        late_id, "late", 30000);
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
    saga_e2e_wait_value(&w, "SELECT count(*) FROM saga.replies_received WHERE saga_id = $1", s.id,
                        "1", 30000);

    /* A saga waiting for a reply that will not come: its deadline passes while the
     * orchestrator is down. */
    struct saga_ref u;
    saga_e2e_start(&w, "e2e_patient", "o-restart-3", NULL, NULL, &u);
    reserve_ok(&u, "r-16");
    const struct kmsg *u1 = expect_authorize(&u);

    saga_e2e_orch_stop(&w);
    cr_assert_eq(proc_count_log(&w.orch, "saga-orchestrator stopped"), 1);
    saga_e2e_reply(&w, m, "success", "{\"authorizationId\": \"a-14\"}", NULL, NULL);
    saga_e2e_start(&w, "e2e_order", "o-restart-2", NULL, NULL, &t);
    assert_value("SELECT status FROM saga.instances WHERE id = $1", &t, "pending");
    /* Aborted while pending (nothing sent yet): compensated at once after the restart. */
    struct saga_ref v;
    saga_e2e_start(&w, "e2e_order", "o-restart-4", NULL, NULL, &v);
    PQclear(
        pgtest_query(w.conn, "SELECT saga.abort($1, 'changed plans')", 1, (const char *[]){v.id}));

    char *restart_ts = saga_e2e_value(&w, "SELECT clock_timestamp()::text", NULL);
    saga_e2e_orch_start(&w);
    saga_e2e_wait_status(&w, &v, "compensated", 30000);
    assert_contains("SELECT error FROM saga.instances WHERE id = $1", &v, "changed plans");
    assert_history(&v, "");
    /* u's deadline fires after the restart: attempt 2 and maybe more (the reply consumer
     * rejoins its group in a few seconds, while an attempt times out in 2), each answered. */
    const struct kmsg *u_next = expect_authorize(&u);
    cr_assert_str_neq(kmsg_header(u1, "message-id", NULL), kmsg_header(u_next, "message-id", NULL));
    int u_attempts = 1;
    while (!strcmp(kmsg_header(u_next, "event-type", NULL), "AuthorizePayment")) {
        saga_e2e_check_command(u_next, &u, "payment.commands", "AuthorizePayment",
                               "authorize_payment", "action", NULL);
        cr_assert_lt(++u_attempts, 20, "saga %s: authorize_payment never took a reply", u.id);
        saga_e2e_reply(&w, u_next, "success", "{}", NULL, NULL);
        u_next = saga_e2e_next_command(&w, u.id, 30000);
    }
    saga_e2e_check_command(u_next, &u, "orders.commands", "ApproveOrder", "approve_order", "action",
                           NULL);
    saga_e2e_reply(&w, u_next, "success", "{}", NULL, NULL);
    {
        const char *p[] = {u.id, restart_ts};
        cr_assert_eq(pgtest_count(w.conn,
                                  "SELECT count(*) FROM saga.step_history WHERE saga_id = $1 "
                                  "AND step = 'authorize_payment' AND attempt = 2 "
                                  "AND sent_at > $2::timestamptz",
                                  2, p),
                     1, "attempt 2 was not sent after the restart");
        /* Every attempt but the last timed out (and maybe got its reply late). */
        char want[64];
        snprintf(want, sizeof(want), "%d succeeded %d", u_attempts, u_attempts - 1);
        assert_value_p("SELECT count(*) || ' ' || (array_agg(status ORDER BY attempt DESC))[1] "
                       "|| ' ' || count(*) FILTER (WHERE status IN ('timed_out', 'late')) "
                       "FROM saga.step_history WHERE saga_id = $1 "
                       "AND step = 'authorize_payment'",
                       u.id, want);
    }
    free(restart_ts);
    m = saga_e2e_expect(&w, &s, "orders.commands", "ApproveOrder", "approve_order", "action",
                        "{\"orderId\": \"o-restart\", \"authorizationId\": \"a-14\"}");
    saga_e2e_reply(&w, m, "success", "{}", NULL, NULL);
    m = saga_e2e_expect(&w, &s, "shipping.commands", "ScheduleShipment", "schedule_shipping",
                        "action", NULL);
    saga_e2e_reply(&w, m, "success", "{}", NULL, NULL);
    saga_e2e_wait_status(&w, &s, "completed", 30000);
    assert_history(&s, "reserve_inventory:action:1:succeeded authorize_payment:action:1:succeeded "
                       "approve_order:action:1:succeeded schedule_shipping:action:1:succeeded");
    assert_value(
        "SELECT string_agg(disposition, ' ') FROM saga.replies_received WHERE saga_id = $1", &s,
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
    m = saga_e2e_expect(&w, &u, "shipping.commands", "ScheduleShipment", "schedule_shipping",
                        "action", NULL);
    saga_e2e_reply(&w, m, "success", "{}", NULL, NULL);
    saga_e2e_wait_status(&w, &u, "completed", 30000);
    assert_value("SELECT string_agg(step || ':' || status, ' ' ORDER BY id) FROM "
                 "saga.step_history WHERE saga_id = $1 AND step <> 'authorize_payment'",
                 &u,
                 "reserve_inventory:succeeded approve_order:succeeded "
                 "schedule_shipping:succeeded");
    saga_e2e_check_all_commands(&w, &u);
    saga_e2e_check_all_commands(&w, &v);

    saga_e2e_orch_stop(&w);
}

/* Starts n e2e_order sagas in one transaction. */
static void start_many(struct saga_ref *s, int n, const char *prefix)
{
    pgtest_exec(w.conn, "BEGIN");
    for (int i = 0; i < n; i++) {
        char order[32];
        snprintf(order, sizeof(order), "%s-%02d", prefix, i);
        saga_e2e_start(&w, "e2e_order", order, NULL, NULL, &s[i]);
    }
    pgtest_exec(w.conn, "COMMIT");
}

/* Plays every participant of the n sagas, always successful, until each sent its 4 commands;
 * calls hook(handled) after each reply. */
static void drive_success(struct saga_ref *s, int n, void (*hook)(int handled))
{
    static const char *const steps[][3] = {
        {"reserve_inventory", "inventory.commands", "ReserveStock"},
        {"authorize_payment", "payment.commands", "AuthorizePayment"},
        {"approve_order", "orders.commands", "ApproveOrder"},
        {"schedule_shipping", "shipping.commands", "ScheduleShipment"},
    };
    for (int handled = 0; handled < 4 * n;) {
        const struct kmsg *m = saga_e2e_next_command(&w, NULL, 60000);
        const char *sid = kmsg_header(m, "saga-id", NULL);
        int i = 0;
        while (i < n && strcmp(s[i].id, sid))
            i++;
        cr_assert(i < n, "command for a saga of no test: %s", sid);
        const char *step = kmsg_header(m, "saga-step", NULL);
        size_t k = 0;
        while (k < 4 && strcmp(steps[k][0], step ? step : ""))
            k++;
        cr_assert(k < 4, "saga %s: command for step %s", sid, step ? step : "(none)");
        saga_e2e_check_command(m, &s[i], steps[k][1], steps[k][2], step, "action", NULL);
        char data[64];
        if (k == 0)
            snprintf(data, sizeof(data), "{\"reservationId\": \"r-%02d\"}", i);
        else if (k == 1)
            snprintf(data, sizeof(data), "{\"authorizationId\": \"a-%02d\"}", i);
        else
            snprintf(data, sizeof(data), "{}");
        saga_e2e_reply(&w, m, "success", data, NULL, NULL);
        handled++;
        if (hook)
            hook(handled);
    }
}

/* Each saga completed with each step applied exactly once, each command sent once. */
static void check_all_completed_once(struct saga_ref *s, int n)
{
    for (int i = 0; i < n; i++) {
        saga_e2e_wait_status(&w, &s[i], "completed", 30000);
        assert_history(&s[i],
                       "reserve_inventory:action:1:succeeded authorize_payment:action:1:succeeded "
                       "approve_order:action:1:succeeded schedule_shipping:action:1:succeeded");
        saga_e2e_check_all_commands(&w, &s[i]);
    }
    char want[64];
    snprintf(want, sizeof(want), "%d %d", 4 * n, 4 * n);
    assert_value("SELECT count(*) || ' ' || count(*) FILTER (WHERE disposition = 'applied') "
                 "FROM saga.replies_received",
                 NULL, want);
    /* A redelivered reply is a duplicate, never taken for a late one. */
    cr_assert_lt(saga_e2e_metric(&w, "saga_replies_total{result=\"late\"}"), 1);
}

enum { SIGTERM_SAGAS = 12 };

static void restart_midway(int handled)
{
    if (handled == SIGTERM_SAGAS + SIGTERM_SAGAS / 2) {
        saga_e2e_orch_stop(&w); /* replies just produced are being consumed or applied */
        saga_e2e_orch_start(&w);
    }
}

/* SIGTERM while replies stream in: the transaction in hand finishes, the exit is 0, and after
 * the restart every saga completes with each step applied exactly once (replies consumed but
 * not applied come again; replies applied and committed are recognised as duplicates). */
Test(orchestrator_ops, sigterm_with_replies_in_flight)
{
    struct saga_ref s[SIGTERM_SAGAS];
    start_many(s, SIGTERM_SAGAS, "o-sig");
    drive_success(s, SIGTERM_SAGAS, restart_midway);
    check_all_completed_once(s, SIGTERM_SAGAS);
}

/* Terminates every other session of the test database (the orchestrator's two, the relay's):
 * returns how many. */
static long terminate_sessions(void)
{
    const char *p[] = {w.db.name};
    return pgtest_count(w.conn,
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE datname = $1 AND pid <> pg_backend_pid()",
                        1, p);
}

static long terminated;

static void terminate_every_5(int handled)
{
    if (handled % 5 == 0)
        terminated += terminate_sessions();
}

/* The orchestrator's database sessions are killed again and again while sagas run: it
 * reconnects, and every step is applied exactly once. */
Test(orchestrator_ops, database_sessions_terminated)
{
    enum { N = 8 };
    struct saga_ref s[N];
    start_many(s, N, "o-term");
    drive_success(s, N, terminate_every_5);
    check_all_completed_once(s, N);
    cr_assert_geq(terminated, 6, "only %ld sessions terminated", terminated);
    saga_e2e_wait_metric(&w, "saga_db_reconnects_total", 1, 10000);
}

/* The broker goes away and comes back while a saga waits: the reply consumer reconnects, and
 * the reply sent meanwhile is applied once. */
Test(orchestrator_ops, broker_down_and_up)
{
    struct saga_ref s;
    saga_e2e_start(&w, "e2e_order", "o-broker", NULL, NULL, &s);
    reserve_ok(&s, "r-40");
    const struct kmsg *m = expect_authorize(&s);
    size_t from = 0;
    /* Past the assignment (saga_e2e_setup waited for it): the next "kafka:" line is news. */
    cr_assert(proc_wait_log(&w.orch, "partition(s) assigned", &from, 30000, NULL, 0));
    devbroker_command(&w.broker, "down all");
    if (!proc_wait_log(&w.orch, "\"kafka: ", &from, 30000, NULL, 0)) {
        saga_e2e_dump(&w);
        cr_assert_fail("the orchestrator did not notice the broker going down within 30 s");
    }
    devbroker_command(&w.broker, "up all");
    saga_e2e_reply(&w, m, "success", "{\"authorizationId\": \"a-40\"}", NULL, NULL);
    m = saga_e2e_expect(&w, &s, "orders.commands", "ApproveOrder", "approve_order", "action",
                        "{\"orderId\": \"o-broker\", \"authorizationId\": \"a-40\"}");
    saga_e2e_reply(&w, m, "success", "{}", NULL, NULL);
    m = saga_e2e_expect(&w, &s, "shipping.commands", "ScheduleShipment", "schedule_shipping",
                        "action", NULL);
    saga_e2e_reply(&w, m, "success", "{}", NULL, NULL);
    saga_e2e_wait_status(&w, &s, "completed", 60000);
    assert_history(&s, "reserve_inventory:action:1:succeeded authorize_payment:action:1:succeeded "
                       "approve_order:action:1:succeeded schedule_shipping:action:1:succeeded");
    assert_value("SELECT count(*) || ' ' || count(*) FILTER (WHERE disposition = 'applied') "
                 "FROM saga.replies_received",
                 NULL, "4 4");
    saga_e2e_check_all_commands(&w, &s);
    /* Ready again: Kafka is reachable. */
    saga_e2e_wait_ready(&w, 15000);
}

/* Another orchestrator holds the oldest pending sagas (here the test's own transaction holds
 * as many as SAGA_BATCH_SIZE): this one still claims the others. (Each branch of the claim
 * picked its rows before the lock was tried, so it picked the same held rows, skipped them
 * all and claimed nothing, poll after poll: a second orchestrator was no help.) */
Test(orchestrator_ops, claims_skip_sagas_locked_elsewhere)
{
    saga_e2e_orch_stop(&w);
    setenv("SAGA_BATCH_SIZE", "2", 1); /* this test's process only: the next start */
    struct saga_ref held1, held2, free1;
    saga_e2e_start(&w, "e2e_timeout", "o-held-1", NULL, NULL, &held1);
    saga_e2e_start(&w, "e2e_timeout", "o-held-2", NULL, NULL, &held2);
    saga_e2e_start(&w, "e2e_timeout", "o-free-1", NULL, NULL, &free1);
    PGconn *other = pgtest_connect(w.db.url);
    pgtest_exec(other, "BEGIN");
    const char *ids[] = {held1.id, held2.id};
    PQclear(pgtest_query(other,
                         "SELECT id FROM saga.instances WHERE id IN ($1::uuid, $2::uuid) "
                         "FOR UPDATE",
                         2, ids));
    saga_e2e_orch_start(&w);
    saga_e2e_wait_status(&w, &free1, "running", 20000);
    char *st = saga_e2e_value(&w, "SELECT status FROM saga.instances WHERE id = $1", held1.id);
    cr_assert_str_eq(st, "pending", "a saga held by another transaction was claimed");
    free(st);
    pgtest_exec(other, "COMMIT");
    saga_e2e_wait_status(&w, &held1, "running", 20000);
    saga_e2e_wait_status(&w, &held2, "running", 20000);
    PQfinish(other);
}

/* A saga started while the claim worker's transaction runs (its snapshot cannot see it) is
 * claimed right after that transaction, not at the next poll: its notification comes with the
 * COMMIT's answer and must not be forgotten there. The poll is set to a minute so that only
 * the notification can claim it in time. */
Test(orchestrator_ops, saga_started_during_a_claim_is_not_left_to_the_poll)
{
    saga_e2e_orch_stop(&w);
    setenv("SAGA_E2E_POLL_INTERVAL", "60s", 1); /* this test's process only: the next start */
    saga_e2e_orch_start(&w);
    PGconn *other = pgtest_connect(w.db.url);
    pgtest_exec(other, "BEGIN");
    pgtest_exec(other, "LOCK TABLE saga.outbox IN EXCLUSIVE MODE");
    struct saga_ref first, second;
    saga_e2e_start(&w, "e2e_timeout", "o-during-1", NULL, NULL, &first);
    /* The claim of the first saga waits for the lock, inside its transaction. */
    int64_t deadline = proc_now_ms() + 20000;
    const char *dbname[] = {w.db.name}; /* not another suite's (they share the cluster) */
    while (pgtest_count(w.conn,
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                        "AND query LIKE '%apply_batch%' AND datname = $1",
                        1, dbname) == 0) {
        cr_assert(proc_now_ms() < deadline, "the claim never waited for the outbox lock");
        struct timespec ts = {0, 10 * 1000000L};
        nanosleep(&ts, NULL);
    }
    saga_e2e_start(&w, "e2e_timeout", "o-during-2", NULL, NULL, &second);
    pgtest_exec(other, "COMMIT");
    saga_e2e_wait_status(&w, &first, "running", 20000);
    saga_e2e_wait_status(&w, &second, "running", 10000);
    PQfinish(other);
}
