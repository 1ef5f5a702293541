/* kafka_conf: librdkafka configuration from the environment, as in Confluent's images. */
#ifndef SAGA_KAFKA_CONF_H
#define SAGA_KAFKA_CONF_H

#include <stdbool.h>
#include <stddef.h>

#include <librdkafka/rdkafka.h>

/* Applies every KAFKA_<NAME>=value environment variable to conf as the property <name>,
 * lower-cased with '_' turned into '.' (KAFKA_SECURITY_PROTOCOL -> security.protocol).
 * KAFKA_<NAME>_FILE reads the value from a file (for secrets). Returns 0, or -1 with a
 * message in err naming the variable; librdkafka's reason may quote a rejected value (an
 * enum like "zip"), never one it accepted. conf is borrowed. */
__attribute__((warn_unused_result)) int kafka_conf_apply_env(rd_kafka_conf_t *conf, char *err,
                                                             size_t errlen);

/* Sets one property; on failure writes "what: librdkafka's reason" into err. */
__attribute__((warn_unused_result)) int kafka_conf_set(rd_kafka_conf_t *conf, const char *name,
                                                       const char *value, const char *what,
                                                       char *err, size_t errlen);

/* From a librdkafka statistics document (the stats callback's JSON, statistics.interval.ms):
 * true when at least one real broker (nodeid >= 0) is UP. The error callback only says when
 * every broker is down, never that one came back; readiness reads this instead. */
bool kafka_stats_any_broker_up(const char *json, size_t len);

/* Routes librdkafka's own log lines (configuration warnings, broker state) to log.h as JSON
 * lines ("kafka: ..." with facility and client), instead of its "%4|..." text on stderr.
 * librdkafka calls it from its threads; log_write is safe there. */
void kafka_conf_log_json(rd_kafka_conf_t *conf);

/* Limits glibc's malloc arenas to two (unless MALLOC_ARENA_MAX is set): less resident memory
 * with librdkafka's threads. Call at the start of main, before any thread starts. */
void kafka_limit_malloc_arenas(void);

/* Closes a consumer (offset commits in flight complete, it leaves its group; rebalance and
 * commit callbacks are served meanwhile, messages fetched and not polled are dropped) and
 * destroys it, waiting at most about timeout_ms; true when done. rd_kafka_consumer_close waits for
 * the group coordinator: with the broker down and an offset commit in flight it did not return
 * within 100 s (librdkafka 2.0.2; a participant stopped together with the dev broker hung in it for
 * good, 2026-11-26). false: not closed in time (or the close failed), and the handle is NOT
 * destroyed (that would wait the same way): the caller is exiting and must not use it again, nor
 * close the fds its queues write to. The group sees the member go at its session timeout at the
 * latest; a commit still in flight may not land (its batch comes again: our consumers
 * deduplicate). */
bool kafka_consumer_close(rd_kafka_t *rk, int timeout_ms);

#endif
