/* admin: the HTTP admin endpoint of a daemon: /healthz, /readyz and /metrics.
 *
 * Served by libmicrohttpd from its own thread, so a slow scraper never blocks the event
 * loop. The loop publishes what the endpoint reports (admin_set_status, admin_heartbeat);
 * the endpoint only reads that snapshot and the metrics registry. */
#ifndef SAGA_ADMIN_H
#define SAGA_ADMIN_H

#include <stdbool.h>
#include <stddef.h>

struct admin;

/* Starts serving on addr ("host:port"; port 0 picks a free one). Returns NULL with a message
 * in err (naming addr) when it cannot bind. Free with admin_stop(). */
struct admin *admin_start(const char *addr, const char *setting, char *err, size_t errlen);

/* The port actually bound. */
int admin_port(const struct admin *a);

/* From the loop: readiness and its explanation (copied) for /readyz. */
void admin_set_status(struct admin *a, bool ready, const char *text);

/* From the loop, at least every few seconds: /healthz fails when the loop stops beating. */
void admin_heartbeat(struct admin *a);

/* The container HEALTHCHECK: GETs /healthz from the admin address in environment variable
 * env (default def) with a 3-second bound. Returns the process exit code: 0 when it answered
 * 200, 1 otherwise (a line on stderr says why). Blocking: only for `DAEMON healthcheck`. */
int admin_healthcheck(const char *env, const char *def);

/* Stops the server thread and frees. Accepts NULL. */
void admin_stop(struct admin *a);

#endif
