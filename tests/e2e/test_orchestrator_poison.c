/* saga-orchestrator end to end: one reply or one saga whose transaction always fails must not
 * stop the others (orchestrator/worker.c). A trigger created by the test makes the database
 * refuse exactly one reply or one saga: the poison reply ends in saga.dead_letters and the
 * consumer goes on; a transient error (SQLSTATE 40001) is retried after growing pauses and
 * finally applied; a saga that cannot be persisted is left alone for a while and the others
 * start; sagas of a definition version the orchestrator cannot load are left out of its claims
 * until a SIGHUP loads it. The test plays the participants (tests/support/saga_e2e.h). */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>
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

TestSuite(orchestrator_poison, .init = setup, .fini = teardown, .timeout = 240);

/* sql with $1 = arg (a saga id, a message id) or no parameter. */
static void assert_value(const char *sql, const char *arg, const char *want)
{
    char *got = saga_e2e_value(&w, sql, arg);
    if (strcmp(got, want))
        saga_e2e_dump(&w);
    cr_assert_str_eq(got, want, "%s: \"%s\", expected \"%s\"", sql, got, want);
    free(got);
}

static void assert_history(const struct saga_ref *s, const char *want)
{
    char *got = saga_e2e_history(&w, s->id);
    cr_assert_str_eq(got, want, "saga %s history:\n  %s\nexpected:\n  %s", s->id, got, want);
    free(got);
}

static const struct kmsg *expect_step(const struct saga_ref *s, const char *step)
{
    static const char *const steps[][3] = {
        {"reserve_inventory", "inventory.commands", "ReserveStock"},
        {"authorize_payment", "payment.commands", "AuthorizePayment"},
        {"approve_order", "orders.commands", "ApproveOrder"},
    };
    for (size_t i = 0; i < sizeof(steps) / sizeof(steps[0]); i++)
        if (!strcmp(steps[i][0], step))
            return saga_e2e_expect(&w, s, steps[i][1], steps[i][2], step, "action", NULL);
    cr_assert_fail("no step %s", step);
    return NULL;
}

/* A trigger on saga.step_history's update that records an applied reply (reply_message_id,
 * written by saga.apply_batch for every reply it applies) that runs body for the replies of
 * one saga. */
static void applied_reply_trigger(const char *saga_id, const char *body)
{
    char sql[2048];
    snprintf(sql, sizeof(sql),
             "CREATE FUNCTION public.poison() RETURNS trigger LANGUAGE plpgsql AS $$\n"
             "BEGIN\n"
             "  IF NEW.saga_id = '%s' AND NEW.reply_message_id IS NOT NULL THEN %s END IF;\n"
             "  RETURN NEW;\n"
             "END $$;\n"
             "CREATE TRIGGER poison BEFORE UPDATE ON saga.step_history FOR EACH ROW "
             "EXECUTE FUNCTION public.poison()",
             saga_id, body);
    pgtest_exec(w.conn, sql);
}

static void wait_log(const char *needle, int timeout_ms)
{
    if (!proc_wait_log(&w.orch, needle, NULL, timeout_ms, NULL, 0)) {
        saga_e2e_dump(&w);
        cr_assert_fail("the orchestrator never logged \"%s\"", needle);
    }
}

/* The first reply of five is refused by the database whenever it is applied: it is
 * dead-lettered (error, SQLSTATE, where it came from, its headers and value), the four good
 * ones behind it are applied, the consumer goes on, and its offset is committed (after a
 * restart it does not come again). */
Test(orchestrator_poison, poison_reply_is_dead_lettered)
{
    struct saga_ref p, g[4];
    saga_e2e_start(&w, "e2e_order", "o-poison", NULL, NULL, &p);
    for (int i = 0; i < 4; i++) {
        char order[32];
        snprintf(order, sizeof(order), "o-good-%d", i);
        saga_e2e_start(&w, "e2e_order", order, NULL, NULL, &g[i]);
    }
    const struct kmsg *pm = expect_step(&p, "reserve_inventory");
    const struct kmsg *gm[4];
    for (int i = 0; i < 4; i++)
        gm[i] = expect_step(&g[i], "reserve_inventory");
    /* Refused as a transient error while public.poison_hold has a row: the reply worker
     * retries the batch at the head of its queue after pauses, and the good replies queue up
     * behind it. Once they are all queued the hold is lifted: the poison fails, for good,
     * within one batch with the four, which is then bisected. */
    pgtest_exec(w.conn, "CREATE SEQUENCE public.poison_tries; "
                        "CREATE TABLE public.poison_hold (x int); "
                        "INSERT INTO public.poison_hold VALUES (1)");
    applied_reply_trigger(p.id, "PERFORM nextval('public.poison_tries'); "
                                "IF EXISTS (SELECT 1 FROM public.poison_hold) THEN "
                                "RAISE EXCEPTION 'not now' USING ERRCODE = '40001'; END IF; "
                                "RAISE EXCEPTION 'poisoned reply for saga %', NEW.saga_id;");

    /* The poison first: before the fix everything behind it waited forever. It is at the head
     * of the queue (tried once) before the good ones are produced. */
    char poison_id[37];
    saga_e2e_reply(&w, pm, "success", "{\"reservationId\": \"r-poison\"}", NULL, poison_id);
    saga_e2e_wait_value(&w, "SELECT is_called::text FROM public.poison_tries", NULL, "true", 30000);
    for (int i = 0; i < 4; i++)
        saga_e2e_reply(&w, gm[i], "success", "{\"reservationId\": \"r-good\"}", NULL, NULL);
    saga_e2e_wait_metric(&w, "saga_replies_queued", 5, 30000);
    pgtest_exec(w.conn, "DELETE FROM public.poison_hold");
    const struct kmsg *ga[4];
    for (int i = 0; i < 4; i++)
        ga[i] = expect_step(&g[i], "authorize_payment");

    saga_e2e_wait_value(&w,
                        "SELECT count(*) FROM saga.dead_letters WHERE headers->>'message-id' = $1",
                        poison_id, "1", 30000);
    char want[256];
    snprintf(want, sizeof(want), "true true saga.replies true %s r-poison", p.id);
    assert_value("SELECT (error LIKE '%SQLSTATE P0001%poisoned reply for saga%')::text || ' ' || "
                 "(error LIKE '%apply_batch%')::text || ' ' || topic || ' ' || "
                 "(partition >= 0 AND \"offset\" >= 0)::text || ' ' || (headers->>'saga-id') || "
                 "' ' || (payload::jsonb->>'reservationId') "
                 "FROM saga.dead_letters WHERE headers->>'message-id' = $1",
                 poison_id, want);
    assert_value("SELECT count(*) FROM saga.dead_letters", NULL, "1");
    saga_e2e_wait_metric(&w, "saga_replies_total{result=\"dead_lettered\"}", 1, 10000);
    char line[4096];
    cr_assert(proc_wait_log(&w.orch, "moved to saga.dead_letters; the consumer goes on", NULL,
                            10000, line, sizeof(line)));
    cr_assert(strstr(line, "\"level\":\"error\"") && strstr(line, p.id) && strstr(line, poison_id),
              "%s", line);
    /* It failed for good in one batch with the four good replies: bisected from 5. */
    cr_assert(proc_wait_log(&w.orch, "the batch is bisected to find what fails", NULL, 1000, line,
                            sizeof(line)));
    cr_assert(strstr(line, "\"batch\":\"5\"") && strstr(line, "P0001"),
              "the first deterministic failure was not of the batch of five: %s", line);

    /* The poison saga did not move and its reply is recorded nowhere; the good ones were applied.
     */
    assert_history(&p, "reserve_inventory:action:1:sent");
    assert_value("SELECT count(*) FROM saga.replies_received WHERE message_id = $1::uuid",
                 poison_id, "0");
    assert_value("SELECT count(*) FROM saga.replies_received WHERE disposition = 'applied'", NULL,
                 "4");
    cr_assert_eq(saga_e2e_metric(&w, "saga_replies_total{result=\"applied\"}"), 4);

    /* The consumer goes on: later replies are applied. */
    saga_e2e_reply(&w, ga[0], "success", "{\"authorizationId\": \"a-1\"}", NULL, NULL);
    expect_step(&g[0], "approve_order");

    /* Its offset was committed with the others: after a restart it does not come again. A
     * malformed reply on the poison's partition (same key), produced after the restart, is
     * dead-lettered behind where the poison was: by then the poison would have come again. */
    saga_e2e_orch_stop(&w);
    saga_e2e_orch_start(&w);
    char mid[37];
    saga_e2e_uuid(mid);
    saga_e2e_produce_raw(&w, p.id, "{}", "message-id", mid, "saga-id", p.id, NULL);
    saga_e2e_wait_metric(&w, "saga_replies_total{result=\"malformed\"}", 1, 60000);
    cr_assert_lt(saga_e2e_metric(&w, "saga_replies_total{result=\"dead_lettered\"}"), 1,
                 "the poison reply was consumed again after the restart");
    assert_value("SELECT count(*) FROM saga.dead_letters", NULL, "2");
}

/* The database refuses a reply three times with SQLSTATE 40001 (serialization failure), then
 * takes it: the batch is run again after pauses of 500 ms, 1 s, 2 s, the reply is applied once,
 * nothing is dead-lettered. */
Test(orchestrator_poison, transient_failure_is_retried_with_backoff)
{
    struct saga_ref s, g;
    saga_e2e_start(&w, "e2e_order", "o-flaky", NULL, NULL, &s);
    saga_e2e_start(&w, "e2e_order", "o-steady", NULL, NULL, &g);
    const struct kmsg *m = expect_step(&s, "reserve_inventory");
    const struct kmsg *gm = expect_step(&g, "reserve_inventory");
    /* A sequence counts the attempts: nextval is not rolled back with the transaction. */
    pgtest_exec(w.conn, "CREATE SEQUENCE public.poison_tries");
    applied_reply_trigger(s.id,
                          "IF nextval('public.poison_tries') <= 3 THEN "
                          "RAISE EXCEPTION 'could not serialize' USING ERRCODE = '40001'; END IF;");
    char reply_id[37];
    saga_e2e_reply(&w, m, "success", "{\"reservationId\": \"r-flaky\"}", NULL, reply_id);
    saga_e2e_reply(&w, gm, "success", "{\"reservationId\": \"r-steady\"}", NULL, NULL);
    expect_step(&s, "authorize_payment");
    expect_step(&g, "authorize_payment");

    assert_value("SELECT last_value FROM public.poison_tries", NULL, "4");
    assert_value("SELECT count(*) FROM saga.dead_letters", NULL, "0");
    assert_value("SELECT disposition FROM saga.replies_received WHERE message_id = $1::uuid",
                 reply_id, "applied");
    assert_history(&s, "reserve_inventory:action:1:succeeded authorize_payment:action:1:sent");
    cr_assert_eq(saga_e2e_metric(&w, "saga_transaction_retries_total{worker=\"replies\"}"), 3);
    cr_assert_lt(saga_e2e_metric(&w, "saga_replies_total{result=\"dead_lettered\"}"), 1);
    /* The pause doubles. */
    size_t from = 0;
    cr_assert(
        proc_wait_log(&w.orch, "transient failure; retrying in 500 ms", &from, 1000, NULL, 0));
    cr_assert(
        proc_wait_log(&w.orch, "transient failure; retrying in 1000 ms", &from, 1000, NULL, 0));
    cr_assert(
        proc_wait_log(&w.orch, "transient failure; retrying in 2000 ms", &from, 1000, NULL, 0));
}

/* A saga whose state cannot be written (a trigger refuses it) is claimed with the others: the
 * claim is bisected, the one saga is left alone for a while, the others start. Once the cause is
 * gone it starts too. */
Test(orchestrator_poison, poison_saga_does_not_block_claims)
{
    pgtest_exec(w.conn, "CREATE FUNCTION public.stuck() RETURNS trigger LANGUAGE plpgsql AS $$\n"
                        "BEGIN\n"
                        "  IF NEW.input->>'orderId' = 'o-stuck' THEN\n"
                        "    RAISE EXCEPTION 'this saga cannot be written';\n"
                        "  END IF;\n"
                        "  RETURN NEW;\n"
                        "END $$;\n"
                        "CREATE TRIGGER stuck BEFORE UPDATE ON saga.instances FOR EACH ROW "
                        "EXECUTE FUNCTION public.stuck()");
    /* In one transaction, so that one claim takes the four: it is bisected. */
    struct saga_ref p, g[3];
    pgtest_exec(w.conn, "BEGIN");
    saga_e2e_start(&w, "e2e_order", "o-stuck", NULL, NULL, &p);
    for (int i = 0; i < 3; i++) {
        char order[32];
        snprintf(order, sizeof(order), "o-free-%d", i);
        saga_e2e_start(&w, "e2e_order", order, NULL, NULL, &g[i]);
    }
    pgtest_exec(w.conn, "COMMIT");
    for (int i = 0; i < 3; i++)
        expect_step(&g[i], "reserve_inventory");
    saga_e2e_wait_metric(&w, "saga_sagas_quarantined_total", 1, 10000);
    char line[4096];
    cr_assert(proc_wait_log(&w.orch, "the saga is left alone for a while", NULL, 10000, line,
                            sizeof(line)));
    cr_assert(strstr(line, p.id) && strstr(line, "P0001"), "%s", line);
    assert_value("SELECT status FROM saga.instances WHERE id = $1", p.id, "pending");

    /* The cause goes away: the saga starts at its next try (10 s after it failed). */
    pgtest_exec(w.conn, "DROP TRIGGER stuck ON saga.instances");
    expect_step(&p, "reserve_inventory");
    saga_e2e_wait_status(&w, &p, "running", 30000);
}

/* Registers e2e_order's definition as e2e_future version 1, with a member this release does
 * not know: a version this orchestrator cannot load. */
static void register_future(void)
{
    char path[256];
    snprintf(path, sizeof(path), "%s/e2e_order.json", w.sagas_dir);
    FILE *f = fopen(path, "r");
    cr_assert_not_null(f);
    char text[16384];
    size_t n = fread(text, 1, sizeof(text) - 1, f);
    fclose(f);
    text[n] = '\0';
    cJSON *body = cJSON_Parse(text);
    cr_assert_not_null(body);
    cJSON_ReplaceItemInObject(body, "saga", cJSON_CreateString("e2e_future"));
    cJSON_AddBoolToObject(body, "future_option", true);
    char *json = cJSON_PrintUnformatted(body);
    cJSON_Delete(body);
    const char *params[1] = {json};
    PQclear(pgtest_query(w.conn, "SELECT saga.register_definition('e2e_future', 1, $1::jsonb)", 1,
                         params));
    free(json);
}

/* The warning about sagas of a version not loaded here counts them whatever their status
 * (pending, running, compensating). (Before, it counted the sagas of one status only: the
 * in-flight count comes by status, and the warning, once a minute, took its first row.) */
Test(orchestrator_poison, unknown_version_warning_counts_every_status)
{
    register_future();
    /* In one transaction, so that the in-flight count sees the three statuses at once. */
    struct saga_ref f[5];
    pgtest_exec(w.conn, "BEGIN");
    for (int i = 0; i < 5; i++) {
        char order[32];
        snprintf(order, sizeof(order), "o-future-%d", i);
        saga_e2e_start(&w, "e2e_future", order, NULL, NULL, &f[i]);
    }
    const char *params[2] = {f[0].id, f[1].id};
    PQclear(pgtest_query(w.conn,
                         "UPDATE saga.instances SET status = 'running', step_index = 0 "
                         "WHERE id IN ($1::uuid, $2::uuid)",
                         2, params));
    params[0] = f[2].id;
    PQclear(pgtest_query(w.conn,
                         "UPDATE saga.instances SET status = 'compensating', step_index = 0, "
                         "phase = 'compensation' WHERE id = $1::uuid",
                         1, params));
    pgtest_exec(w.conn, "COMMIT");
    char line[4096];
    cr_assert(proc_wait_log(&w.orch, "definition version this orchestrator has not loaded", NULL,
                            30000, line, sizeof(line)),
              "no warning about the unknown version");
    cr_assert(strstr(line, "\"saga_name\":\"e2e_future\"") && strstr(line, "\"sagas\":\"5\""),
              "the warning does not count the 5 sagas (2 pending, 2 running, 1 compensating): %s",
              line);
}

/* Sagas of a definition version this orchestrator cannot load (registered by a newer one) are
 * left out of its claims: the other sagas run, a warning names the version, and once the version
 * can be loaded a SIGHUP brings it in and its sagas start. */
Test(orchestrator_poison, unknown_definition_version_does_not_block)
{
    register_future();

    struct saga_ref fut, g[3];
    saga_e2e_start(&w, "e2e_future", "o-future", NULL, NULL, &fut);
    for (int i = 0; i < 3; i++) {
        char order[32];
        snprintf(order, sizeof(order), "o-now-%d", i);
        saga_e2e_start(&w, "e2e_order", order, NULL, NULL, &g[i]);
    }
    for (int i = 0; i < 3; i++)
        expect_step(&g[i], "reserve_inventory");
    char line[4096];
    cr_assert(proc_wait_log(&w.orch, "definition version this orchestrator has not loaded", NULL,
                            30000, line, sizeof(line)),
              "no warning about the unknown version");
    cr_assert(strstr(line, "\"level\":\"warn\"") && strstr(line, "e2e_future"), "%s", line);
    assert_value("SELECT status FROM saga.instances WHERE id = $1", fut.id, "pending");
    /* At most once a minute per version. */
    cr_assert_eq(proc_count_log(&w.orch, "definition version this orchestrator has not loaded"), 1);

    /* The orchestrator tried a reload by itself, which skipped the version: wait for it to
     * finish, so that the log counts below are those of the SIGHUP's own reload. */
    size_t from = 0;
    wait_log("cannot be read by this orchestrator", 30000);
    cr_assert(proc_wait_log(&w.orch, "definition version(s) loaded", &from, 30000, NULL, 0));
    /* This release learns to read it (as if upgraded), and SIGHUP loads it. */
    pgtest_exec(w.conn, "UPDATE saga.definitions SET body = body - 'future_option', "
                        "checksum = md5((body - 'future_option')::text) WHERE name = 'e2e_future'");
    proc_signal(&w.orch, SIGHUP);
    cr_assert(proc_wait_log(&w.orch, "definition version(s) loaded", &from, 30000, NULL, 0));
    expect_step(&fut, "reserve_inventory");
    saga_e2e_wait_status(&w, &fut, "running", 30000);
}
