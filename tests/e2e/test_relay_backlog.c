/* The relay's backlog gauges: rows waiting in a table and the age of the oldest, while Kafka
 * is away; both fall back to zero once the backlog drains. */
#include "relay_e2e.h"

static double metric_now(int port, const char *series)
{
    char *body = NULL;
    double v = e2e_http_get(port, "/metrics", &body) == 200 ? e2e_metric(body, series) : -1;
    free(body);
    return v;
}

Test(relay_backlog, gauges_show_rows_waiting_and_their_age)
{
    struct e2e e;
    e2e_setup(&e, "backlog", 10);
    struct e2e_run run;
    run.c = e2e_consume(&e);
    devbroker_command(&e.broker, "down 1");
    e2e_insert(&e, 0, 300);
    e2e_relay_start(&e, &run.relay, NULL);
    run.port = e2e_admin_port(&run.relay);
    cr_assert(e2e_wait_metric(run.port, e2e_series(&e, "relay_backlog_rows{table=\"saga.outbox\"}"),
                              300, 20000),
              "relay_backlog_rows did not reach the 300 rows waiting");
    cr_assert(e2e_wait_metric(run.port,
                              e2e_series(&e, "relay_backlog_oldest_seconds{table=\"saga.outbox\"}"),
                              1, 20000),
              "relay_backlog_oldest_seconds did not report the waiting rows' age");

    devbroker_command(&e.broker, "up 1");
    cr_assert(e2e_wait_all(run.c, 300, 60000, NULL), "the backlog did not drain");
    cr_assert(e2e_wait_table_empty(&e, "saga.outbox", 20000));
    int64_t end = proc_now_ms() + 20000;
    while (proc_now_ms() < end &&
           metric_now(run.port, e2e_series(&e, "relay_backlog_rows{table=\"saga.outbox\"}")) != 0)
        usleep(100 * 1000);
    cr_assert_eq(metric_now(run.port, e2e_series(&e, "relay_backlog_rows{table=\"saga.outbox\"}")),
                 0);
    cr_assert_eq(
        metric_now(run.port, e2e_series(&e, "relay_backlog_oldest_seconds{table=\"saga.outbox\"}")),
        0);
    e2e_finish(&e, &run);
}

/* A backlog drains without waiting for the fallback poll when RELAY_MAX_INFLIGHT is not a
 * multiple of RELAY_BATCH_SIZE: a claim limited by the room left in flight (here 50 of a
 * batch of 100) is full when it returns all it asked for. (It was compared with the batch
 * size, so the relay waited for the next poll, a minute here, after every such claim.) */
Test(relay_backlog, drains_without_the_poll_when_claims_are_limited_by_inflight)
{
    struct e2e e;
    e2e_setup(&e, "roomclaim", 10);
    struct e2e_run run;
    run.c = e2e_consume(&e);
    e2e_insert(&e, 0, 2000); /* before the relay starts: no NOTIFY wakes it */
    const char *env[] = {"RELAY_BATCH_SIZE=100", "RELAY_MAX_INFLIGHT=150",
                         "RELAY_POLL_INTERVAL=60s", NULL};
    e2e_relay_start(&e, &run.relay, env);
    long distinct = 0;
    if (!e2e_wait_all(run.c, 2000, 30000, &distinct)) {
        proc_dump(&run.relay, "relay", 4000);
        cr_assert_fail("%ld of 2000 rows arrived within 30 s (the poll is 60 s)", distinct);
    }
    cr_assert(e2e_wait_table_empty(&e, "saga.outbox", 20000));
    e2e_verify(&e, run.c, 2000, true);
    e2e_finish(&e, &run);
}
