#include "pgloop.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum pgloop_phase { PG_IDLE, PG_CONNECTING, PG_READY, PG_BROKEN };

struct pgloop {
    struct ev_loop *loop;
    char *conninfo;
    PGconn *conn;
    ev_io io;
    ev_idle broken; /* reports a failure from the loop, not from inside a caller's call */
    enum pgloop_phase phase;
    int io_fd;
    int io_events;
    pgloop_state_cb state_cb;
    pgloop_notify_cb notify_cb;
    void *arg;
    pgloop_result_cb result_cb;
    void *result_arg;
    PGresult *last;
    bool busy;
    bool want_write;
    char error[512];
};

static void io_cb(struct ev_loop *loop, ev_io *w, int revents);

static void watch(struct pgloop *pg, int events)
{
    int fd = pg->conn ? PQsocket(pg->conn) : -1;
    if (fd == pg->io_fd && events == pg->io_events && ev_is_active(&pg->io))
        return;
    ev_io_stop(pg->loop, &pg->io);
    pg->io_fd = fd;
    pg->io_events = events;
    if (fd >= 0 && events) {
        ev_io_set(&pg->io, fd, events);
        ev_io_start(pg->loop, &pg->io);
    }
}

static void set_error(struct pgloop *pg, const char *prefix)
{
    const char *msg = pg->conn ? PQerrorMessage(pg->conn) : "no connection";
    snprintf(pg->error, sizeof(pg->error), "%s%s", prefix, msg && *msg ? msg : "connection lost");
    size_t n = strlen(pg->error);
    while (n && (pg->error[n - 1] == '\n' || pg->error[n - 1] == ' '))
        pg->error[--n] = '\0';
}

void pgloop_close(struct pgloop *pg)
{
    ev_io_stop(pg->loop, &pg->io);
    ev_idle_stop(pg->loop, &pg->broken);
    pg->io_fd = -1;
    pg->io_events = 0;
    if (pg->last) {
        PQclear(pg->last);
        pg->last = NULL;
    }
    if (pg->conn) {
        PQfinish(pg->conn);
        pg->conn = NULL;
    }
    pg->phase = PG_IDLE;
    pg->busy = false;
    pg->want_write = false;
    pg->result_cb = NULL;
}

/* Fails the connection: the pending query's callback gets NULL, then state_cb(false). */
static void fail(struct pgloop *pg, const char *prefix)
{
    pgloop_result_cb cb = pg->result_cb;
    void *cb_arg = pg->result_arg;
    bool was_busy = pg->busy;
    set_error(pg, prefix);
    pgloop_close(pg);
    pg->phase = PG_BROKEN;
    if (was_busy && cb)
        cb(pg, NULL, cb_arg);
    pg->state_cb(pg, false, pg->arg);
}

static void broken_cb(struct ev_loop *loop, ev_idle *w, int revents)
{
    struct pgloop *pg = w->data;
    ev_idle_stop(loop, w);
    fail(pg, "");
}

static void schedule_fail(struct pgloop *pg)
{
    set_error(pg, "");
    ev_io_stop(pg->loop, &pg->io);
    ev_idle_start(pg->loop, &pg->broken);
}

struct pgloop *pgloop_create(struct ev_loop *loop, const char *conninfo, pgloop_state_cb state_cb,
                             pgloop_notify_cb notify_cb, void *arg)
{
    struct pgloop *pg = calloc(1, sizeof(*pg));
    if (!pg)
        return NULL;
    pg->conninfo = strdup(conninfo ? conninfo : "");
    if (!pg->conninfo) {
        free(pg);
        return NULL;
    }
    pg->loop = loop;
    pg->state_cb = state_cb;
    pg->notify_cb = notify_cb;
    pg->arg = arg;
    pg->io_fd = -1;
    ev_init(&pg->io, io_cb);
    pg->io.data = pg;
    ev_idle_init(&pg->broken, broken_cb);
    pg->broken.data = pg;
    return pg;
}

static void connect_step(struct pgloop *pg)
{
    switch (PQconnectPoll(pg->conn)) {
    case PGRES_POLLING_READING:
        watch(pg, EV_READ);
        return;
    case PGRES_POLLING_WRITING:
        watch(pg, EV_WRITE);
        return;
    case PGRES_POLLING_OK:
        if (PQsetnonblocking(pg->conn, 1) != 0) {
            fail(pg, "cannot make the connection nonblocking: ");
            return;
        }
        pg->phase = PG_READY;
        watch(pg, EV_READ); /* notifications and a server closing the connection */
        pg->state_cb(pg, true, pg->arg);
        return;
    default:
        fail(pg, "");
        return;
    }
}

int pgloop_connect(struct pgloop *pg)
{
    pgloop_close(pg);
    pg->error[0] = '\0';
    pg->conn = PQconnectStart(pg->conninfo);
    if (!pg->conn) {
        snprintf(pg->error, sizeof(pg->error), "out of memory");
        return -1;
    }
    if (PQstatus(pg->conn) == CONNECTION_BAD) {
        set_error(pg, "");
        PQfinish(pg->conn);
        pg->conn = NULL;
        return -1;
    }
    pg->phase = PG_CONNECTING;
    connect_step(pg);
    return 0;
}

static void deliver_notifies(struct pgloop *pg)
{
    PGnotify *n;
    while (pg->conn && (n = PQnotifies(pg->conn)) != NULL) {
        if (pg->notify_cb)
            pg->notify_cb(pg, n->relname, n->extra, pg->arg);
        PQfreemem(n);
    }
}

static void flush_output(struct pgloop *pg)
{
    int r = PQflush(pg->conn);
    if (r < 0) {
        fail(pg, "");
        return;
    }
    pg->want_write = r == 1;
    watch(pg, EV_READ | (pg->want_write ? EV_WRITE : 0));
}

static void read_results(struct pgloop *pg)
{
    if (!PQconsumeInput(pg->conn)) {
        fail(pg, "");
        return;
    }
    deliver_notifies(pg);
    while (pg->busy && pg->conn && !PQisBusy(pg->conn)) {
        PGresult *res = PQgetResult(pg->conn);
        if (res) {
            ExecStatusType st = pg->last ? PQresultStatus(pg->last) : PGRES_COMMAND_OK;
            if (st == PGRES_FATAL_ERROR || st == PGRES_BAD_RESPONSE) {
                PQclear(res); /* keep the first error of a multi-statement query */
                continue;
            }
            if (pg->last)
                PQclear(pg->last);
            pg->last = res;
            continue;
        }
        /* NULL: the query is complete. A NOTIFY that came while it ran was sent by the server
         * just before the query's end and was parsed by PQgetResult above, or still sits
         * unparsed in libpq's buffer behind it: the socket will not become readable for it
         * again, so it is delivered now (before the result: the query is still in flight,
         * and notify_cb cannot send one). Delivered only at the start of the next read, it
         * waited for the next event on this connection: on an idle relay table, the
         * fallback poll. */
        deliver_notifies(pg);
        PGresult *last = pg->last;
        pgloop_result_cb cb = pg->result_cb;
        void *cb_arg = pg->result_arg;
        pg->last = NULL;
        pg->busy = false;
        pg->result_cb = NULL;
        if (cb)
            cb(pg, last, cb_arg);
        PQclear(last);
        return; /* the callback may have sent the next query or closed the connection */
    }
    if (pg->conn && PQstatus(pg->conn) == CONNECTION_BAD)
        fail(pg, "");
}

static void io_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    struct pgloop *pg = w->data;
    if (pg->phase == PG_CONNECTING) {
        connect_step(pg);
        return;
    }
    if (pg->phase != PG_READY)
        return;
    if ((revents & EV_WRITE) && pg->want_write) {
        flush_output(pg);
        if (pg->phase != PG_READY)
            return;
    }
    if (revents & EV_READ)
        read_results(pg);
}

static int after_send(struct pgloop *pg, pgloop_result_cb cb, void *cb_arg);

int pgloop_query(struct pgloop *pg, const char *sql, int nparams, const char *const *params,
                 pgloop_result_cb cb, void *cb_arg)
{
    if (pg->phase != PG_READY || pg->busy)
        return -1;
    if (!PQsendQueryParams(pg->conn, sql, nparams, NULL, params, NULL, NULL, 0)) {
        schedule_fail(pg);
        return -1;
    }
    return after_send(pg, cb, cb_arg);
}

int pgloop_query_prepared(struct pgloop *pg, const char *name, int nparams,
                          const char *const *params, pgloop_result_cb cb, void *cb_arg)
{
    return pgloop_query_prepared_binary(pg, name, nparams, params, false, cb, cb_arg);
}

int pgloop_query_prepared_binary(struct pgloop *pg, const char *name, int nparams,
                                 const char *const *params, bool binary, pgloop_result_cb cb,
                                 void *cb_arg)
{
    if (pg->phase != PG_READY || pg->busy)
        return -1;
    if (!PQsendQueryPrepared(pg->conn, name, nparams, params, NULL, NULL, binary ? 1 : 0)) {
        schedule_fail(pg);
        return -1;
    }
    return after_send(pg, cb, cb_arg);
}

int pgloop_query_simple(struct pgloop *pg, const char *sql, pgloop_result_cb cb, void *cb_arg)
{
    if (pg->phase != PG_READY || pg->busy)
        return -1;
    if (!PQsendQuery(pg->conn, sql)) {
        schedule_fail(pg);
        return -1;
    }
    return after_send(pg, cb, cb_arg);
}

static int after_send(struct pgloop *pg, pgloop_result_cb cb, void *cb_arg)
{
    pg->busy = true;
    pg->result_cb = cb;
    pg->result_arg = cb_arg;
    int r = PQflush(pg->conn);
    if (r < 0) {
        pg->busy = false;
        pg->result_cb = NULL;
        schedule_fail(pg);
        return -1;
    }
    pg->want_write = r == 1;
    watch(pg, EV_READ | (pg->want_write ? EV_WRITE : 0));
    return 0;
}

bool pgloop_ready(const struct pgloop *pg)
{
    return pg->phase == PG_READY;
}

bool pgloop_busy(const struct pgloop *pg)
{
    return pg->busy;
}

const char *pgloop_error(const struct pgloop *pg)
{
    return pg->error;
}

PGconn *pgloop_conn(const struct pgloop *pg)
{
    return pg->conn;
}

void pgloop_destroy(struct pgloop *pg)
{
    if (!pg)
        return;
    pgloop_close(pg);
    free(pg->conninfo);
    free(pg);
}
