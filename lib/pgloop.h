/* pgloop: one nonblocking libpq connection driven by a libev loop.
 *
 * Connects with PQconnectStart/PQconnectPoll, sends one query at a time with
 * PQsendQueryParams, flushes until PQflush returns 0, reads with PQconsumeInput and
 * PQgetResult until NULL, and hands LISTEN notifications to a callback. The socket is read
 * again from PQsocket after every (re)connect. Nothing here blocks the loop. */
#ifndef SAGA_PGLOOP_H
#define SAGA_PGLOOP_H

#include <stdbool.h>

#include <ev.h>
#include <libpq-fe.h>

struct pgloop;

/* Called once per query with its last result (NULL only when the connection broke before
 * any result arrived). The result is borrowed: it is freed after the callback returns. */
typedef void (*pgloop_result_cb)(struct pgloop *pg, PGresult *res, void *arg);
/* Connection ready (ok) or failed/lost (!ok, message in pgloop_error()). */
typedef void (*pgloop_state_cb)(struct pgloop *pg, bool ok, void *arg);
/* A NOTIFY arrived: channel and payload are borrowed. Called from the loop, also while a query
 * is in flight (just before its result_cb): it cannot send a query, and must not close or
 * destroy the pgloop (set a flag, schedule work). */
typedef void (*pgloop_notify_cb)(struct pgloop *pg, const char *channel, const char *payload,
                                 void *arg);

/* Creates an unconnected handle. conninfo is copied. Callbacks may be NULL except state_cb.
 * Free with pgloop_destroy(). Returns NULL on allocation failure. */
struct pgloop *pgloop_create(struct ev_loop *loop, const char *conninfo, pgloop_state_cb state_cb,
                             pgloop_notify_cb notify_cb, void *arg);

/* Starts connecting; state_cb reports the outcome. Returns 0 or -1 (state_cb not called). */
__attribute__((warn_unused_result)) int pgloop_connect(struct pgloop *pg);

/* Sends one query (text parameters; params borrowed until the call returns). Only one query
 * may be in flight. Returns 0, or -1 when not ready or the send failed (the connection is
 * then reported lost through state_cb from the loop, never from inside this call). */
__attribute__((warn_unused_result)) int pgloop_query(struct pgloop *pg, const char *sql,
                                                     int nparams, const char *const *params,
                                                     pgloop_result_cb cb, void *cb_arg);

/* Sends a query without parameters through the simple protocol, so that sql may hold several
 * statements ("BEGIN; SELECT ..."): the callback gets the last statement's result (or the
 * first error). Same contract as pgloop_query otherwise. */
__attribute__((warn_unused_result)) int pgloop_query_simple(struct pgloop *pg, const char *sql,
                                                            pgloop_result_cb cb, void *cb_arg);

/* Executes a statement prepared on this connection (PREPARE name AS ..., or PQprepare) with
 * text parameters: no parse and plan per call. Same contract as pgloop_query otherwise. */
__attribute__((warn_unused_result)) int pgloop_query_prepared(struct pgloop *pg, const char *name,
                                                              int nparams,
                                                              const char *const *params,
                                                              pgloop_result_cb cb, void *cb_arg);

/* The same with every column of the result in binary format when binary is true (the types'
 * send functions: no text conversion of numbers, uuids or timestamps on either side). */
__attribute__((warn_unused_result)) int
pgloop_query_prepared_binary(struct pgloop *pg, const char *name, int nparams,
                             const char *const *params, bool binary, pgloop_result_cb cb,
                             void *cb_arg);
bool pgloop_ready(const struct pgloop *pg); /* connected */
bool pgloop_busy(const struct pgloop *pg);  /* a query is in flight */

/* The last connection error text (never contains a password). Borrowed. */
const char *pgloop_error(const struct pgloop *pg);

/* The underlying connection, for PQescapeIdentifier and the like (borrowed, may be NULL). */
PGconn *pgloop_conn(const struct pgloop *pg);

/* Closes the connection (no callback). The handle can connect again. */
void pgloop_close(struct pgloop *pg);

/* Closes and frees. Accepts NULL. Must not be called from inside one of its callbacks. */
void pgloop_destroy(struct pgloop *pg);

#endif
