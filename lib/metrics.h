/* metrics: a process-wide registry of counters, gauges and histograms, rendered in the
 * Prometheus text format. Thread-safe (the admin endpoint renders from its own thread).
 *
 * labels is the text between the braces, e.g. `table="saga.outbox",topic="x"`, or NULL.
 * Series are created on first use; names and labels are copied. */
#ifndef SAGA_METRICS_H
#define SAGA_METRICS_H

#include <stddef.h>
#include <stdint.h>

/* Declares HELP and TYPE ("counter", "gauge", "histogram") for a metric name. */
void metrics_describe(const char *name, const char *type, const char *help);

void metrics_counter_add(const char *name, const char *labels, uint64_t value);
void metrics_gauge_set(const char *name, const char *labels, double value);
void metrics_gauge_add(const char *name, const char *labels, double value);
/* Buckets are fixed per name by metrics_histogram_buckets() (default: latency seconds). */
void metrics_histogram_observe(const char *name, const char *labels, double value);
void metrics_histogram_buckets(const char *name, const double *bounds, size_t count);

/* Hot paths: look a series up once (type "counter", "gauge" or "histogram"; created if
 * absent), then add to it (counter, gauge) or observe into it (histogram) without the lookup
 * by name and labels. The handle lives as long as the process. */
struct metrics_series;
struct metrics_series *metrics_series(const char *name, const char *labels, const char *type);
void metrics_series_add(struct metrics_series *s, double value);
void metrics_series_observe(struct metrics_series *s, double value);

/* Reads a counter or gauge (0 when absent): for tests and /readyz. */
double metrics_value(const char *name, const char *labels);

/* Renders every series. Returns a new string the caller frees, or NULL on allocation
 * failure. */
char *metrics_render(void);

/* Writes `key="value"` into out, escaping the value as Prometheus requires. */
void metrics_label(char *out, size_t outlen, const char *key, const char *value);

#endif
