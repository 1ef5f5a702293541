/* http: what the end-to-end tests read from a daemon's admin endpoint (/metrics, /readyz,
 * /healthz): one HTTP/1.0 GET on 127.0.0.1, and one series out of a Prometheus text page.
 *
 * The one implementation of both for tests/support (saga_e2e.c and system.c call it). Every
 * read is bounded (HTTP_TIMEOUT_MS); an endpoint that does not answer is a value the caller
 * checks, not a failed test, because tests poll endpoints that are not up yet. */
#ifndef SAGA_TEST_HTTP_H
#define SAGA_TEST_HTTP_H

/* How long one GET may take, connect to end of body. Long enough for an orchestrator busy
 * with thousands of replies on a loaded 2-core machine (e2e_system_load polls it). */
#define HTTP_TIMEOUT_MS 10000

/* GET path on 127.0.0.1:port. Returns the HTTP status and sets *body to the body (a new
 * string, caller frees); returns 0 with *body NULL when nothing answers (connection refused,
 * or no complete answer within HTTP_TIMEOUT_MS), -1 with the body when the answer is not
 * HTTP. Fails the test only when no socket can be made, or out of memory. */
int http_get(int port, const char *path, char **body);

/* The value of the series in a Prometheus text page: the line "<series> <value>", series
 * being "name{labels}" exactly as the daemon prints it (or a bare name). -1 when absent. */
double http_metric(const char *metrics, const char *series);

/* http_get of /metrics, then http_metric; -1 when the endpoint does not answer 200 or the
 * series is absent. */
double http_get_metric(int port, const char *series);

#endif
