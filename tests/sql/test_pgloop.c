/* lib/pgloop.c against a real PostgreSQL: notifications that arrive while a query runs. The
 * server sends them just before the query's end (ReadyForQuery), in the same read as its
 * result; the socket then has nothing more to say, so they must be delivered with that result
 * and not wait for the connection's next event (an idle relay table waited for its fallback
 * poll: RELAY_POLL_INTERVAL). */
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>

#include <criterion/criterion.h>
#include <ev.h>

#include "pgloop.h"
#include "pgtest.h"

static struct pgtest_db db;
static PGconn *conn;

static void setup(void)
{
    conn = pgtest_fresh(&db, false);
}

static void teardown(void)
{
    PQfinish(conn);
    pgtest_db_drop(&db);
}

TestSuite(pgloop, .init = setup, .fini = teardown, .timeout = 60);

struct ctx {
    bool ready;
    int states; /* state_cb calls: connected or failed */
    int results;
    int notifies;
    int notifies_at_result; /* notifies delivered when the last result came */
    char payload[64];
};

static void state_cb(struct pgloop *pg, bool ok, void *arg)
{
    struct ctx *c = arg;
    c->ready = ok;
    c->states++;
}

static void notify_cb(struct pgloop *pg, const char *channel, const char *payload, void *arg)
{
    struct ctx *c = arg;
    c->notifies++;
    snprintf(c->payload, sizeof(c->payload), "%s", payload ? payload : "");
}

static void result_cb(struct pgloop *pg, PGresult *res, void *arg)
{
    struct ctx *c = arg;
    cr_assert(
        res && (PQresultStatus(res) == PGRES_TUPLES_OK || PQresultStatus(res) == PGRES_COMMAND_OK),
        "query failed: %s", res ? PQresultErrorMessage(res) : "no result");
    c->results++;
    c->notifies_at_result = c->notifies;
}

static void tick_cb(struct ev_loop *loop, ev_timer *w, int revents) {}

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Runs the loop until *count reaches want, at most timeout_ms (a 10 ms timer keeps it
 * turning: the condition is checked after every event). */
static bool run_until(struct ev_loop *loop, const int *count, int want, int timeout_ms)
{
    ev_timer tick;
    ev_timer_init(&tick, tick_cb, 0.01, 0.01);
    ev_timer_start(loop, &tick);
    for (int64_t until = now_ms() + timeout_ms; *count < want && now_ms() < until;)
        ev_run(loop, EVRUN_ONCE);
    ev_timer_stop(loop, &tick);
    return *count >= want;
}

/* A connected pgloop that LISTENs on channel c. */
static struct pgloop *listening(struct ev_loop *loop, struct ctx *c)
{
    struct pgloop *pg = pgloop_create(loop, db.url, state_cb, notify_cb, c);
    cr_assert(pg);
    cr_assert_eq(pgloop_connect(pg), 0);
    run_until(loop, &c->states, 1, 10000);
    cr_assert(c->ready, "not connected: %s", pgloop_error(pg) ? pgloop_error(pg) : "timeout");
    cr_assert_eq(pgloop_query_simple(pg, "LISTEN c", result_cb, c), 0);
    cr_assert(run_until(loop, &c->results, 1, 10000), "LISTEN never completed");
    return pg;
}

/* The session notifies itself: the server sends the notification between the query's result
 * and its end, and it is delivered no later than the result (this held before the fix too;
 * the next test is the one that failed). */
Test(pgloop, a_notification_sent_by_the_query_comes_with_its_result)
{
    struct ev_loop *loop = ev_loop_new(EVFLAG_AUTO);
    struct ctx c = {0};
    struct pgloop *pg = listening(loop, &c);
    cr_assert_eq(pgloop_query_simple(pg, "SELECT pg_notify('c', 'self')", result_cb, &c), 0);
    cr_assert(run_until(loop, &c.results, 2, 10000), "the query never completed");
    cr_assert_eq(c.notifies_at_result, 1,
                 "the notification was not delivered with the query's end (%d by then)",
                 c.notifies_at_result);
    cr_assert_str_eq(c.payload, "self");
    pgloop_destroy(pg);
    ev_loop_destroy(loop);
}

/* Bytes waiting on the socket, unread. */
static int unread(struct pgloop *pg)
{
    int n = 0;
    cr_assert_eq(ioctl(PQsocket(pgloop_conn(pg)), FIONREAD, &n), 0);
    return n;
}

static void pause_1ms(void)
{
    struct timespec ms = {0, 1000000L};
    nanosleep(&ms, NULL);
}

/* Waits (at most timeout_ms, 1 ms apart: the socket has no event to wait on outside the loop)
 * until more than `than` bytes wait on pg's socket; returns how many. */
static int wait_unread(struct pgloop *pg, int than, int timeout_ms)
{
    int n;
    for (int64_t until = now_ms() + timeout_ms; (n = unread(pg)) <= than && now_ms() < until;)
        pause_1ms();
    return n;
}

/* A NOTIFY that reaches the client right behind a query's end, in the same read: the query's
 * result and the notification are both on the socket before the loop looks (as when the relay
 * is busy elsewhere). libpq reads both at once and parses the notification into its list while
 * it finishes the query; pgloop asked for notifications only before a read's results, so with
 * nothing more to come on the socket it waited for the connection's next event. */
Test(pgloop, a_notification_read_behind_a_query_is_not_left_behind)
{
    struct ev_loop *loop = ev_loop_new(EVFLAG_AUTO);
    struct ctx c = {0};
    struct pgloop *pg = listening(loop, &c);
    char pid[16];
    snprintf(pid, sizeof(pid), "%d", PQbackendPID(pgloop_conn(pg)));
    const char *params[] = {pid};
    cr_assert_eq(pgloop_query_simple(pg, "SELECT 1", result_cb, &c), 0);
    /* The server is done with the query (idle again) and its answer is on the socket. */
    int64_t until = now_ms() + 10000;
    while (pgtest_count(conn,
                        "SELECT count(*) FROM pg_stat_activity WHERE pid = $1::int "
                        "AND state = 'idle' AND query = 'SELECT 1'",
                        1, params) != 1) {
        cr_assert_lt(now_ms(), until, "the query never ended");
        pause_1ms();
    }
    int result_bytes = wait_unread(pg, 0, 10000);
    cr_assert_gt(result_bytes, 0, "no answer on the socket");
    pgtest_exec(conn, "NOTIFY c, 'behind'");
    cr_assert_gt(wait_unread(pg, result_bytes, 10000), result_bytes,
                 "the notification never reached the socket");

    cr_assert(run_until(loop, &c.results, 2, 10000), "the query's result was never delivered");
    /* Nothing more will come on the socket: 1 s of loop to deliver what it holds. */
    run_until(loop, &c.notifies, 1, 1000);
    cr_assert_eq(c.notifies, 1, "the notification was left in libpq's buffer");
    cr_assert_str_eq(c.payload, "behind");
    pgloop_destroy(pg);
    ev_loop_destroy(loop);
}
