/* kafka_consume: an in-process librdkafka consumer for end-to-end tests.
 *
 * Reads the given topics from the beginning of every partition (explicit assignment, no
 * consumer group: nothing to join, nothing to commit) on a thread of its own, so that messages
 * are collected while the test produces them (the dev broker keeps only about the last 5 MB
 * of a partition). The test then waits, with a bound, for a count or a predicate, and reads a
 * snapshot of what arrived. Helpers fail the test when they cannot go on. */
#ifndef SAGA_TEST_KAFKA_CONSUME_H
#define SAGA_TEST_KAFKA_CONSUME_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct kheader {
    char *name;  /* owned, NUL-terminated */
    char *value; /* owned, NUL-terminated copy (NULL for a null header value) */
    size_t len;
};

/* One consumed message; every string is a NUL-terminated copy owned by the consumer. */
struct kmsg {
    char *topic;
    int32_t partition;
    int64_t offset;
    char *key; /* NULL for a null key */
    size_t key_len;
    char *value; /* NULL for a null value */
    size_t value_len;
    int64_t timestamp;  /* ms */
    int timestamp_type; /* rd_kafka_timestamp_type_t */
    struct kheader *headers;
    size_t header_count;
    size_t index; /* arrival order in this consumer */
};

struct kconsumer;

/* Connects to brokers and starts reading topics (NULL-terminated) from the beginning. Waits
 * (bounded) for every topic's partitions in the metadata. Free with kconsumer_stop(). */
struct kconsumer *kconsumer_start(const char *brokers, const char *const topics[]);

/* Stops the thread and frees every message. Accepts NULL. */
void kconsumer_stop(struct kconsumer *c);

/* Messages collected so far. */
size_t kconsumer_count(struct kconsumer *c);

/* Waits at most timeout_ms until at least n messages arrived; returns whether they did. */
bool kconsumer_wait_count(struct kconsumer *c, size_t n, int timeout_ms);

/* Waits at most timeout_ms until pred(messages, count, arg) is true; pred runs with the
 * consumer's lock held, after every batch of arrivals (and once at the start). */
bool kconsumer_wait_until(struct kconsumer *c,
                          bool (*pred)(struct kmsg *const *msgs, size_t n, void *arg), void *arg,
                          int timeout_ms);

/* A copy of the array of messages collected so far, in arrival order (the caller frees the
 * array, not the messages, which live until kconsumer_stop). */
struct kmsg **kconsumer_snapshot(struct kconsumer *c, size_t *n);

/* The value of the first header called name, or NULL; *count (may be NULL) gets how many
 * headers have that name. */
const char *kmsg_header(const struct kmsg *m, const char *name, size_t *count);

#endif
