#include "kafka_consume.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <criterion/criterion.h>
#include <librdkafka/rdkafka.h>

struct kconsumer {
    rd_kafka_t *rk;
    pthread_t thread;
    atomic_bool stop;
    pthread_mutex_t lock;
    pthread_cond_t arrived;
    struct kmsg **msgs;
    size_t count, cap;
};

static char *dup_bytes(const void *data, size_t len)
{
    char *s = malloc(len + 1);
    if (!s) {
        fprintf(stderr, "kafka_consume: out of memory\n");
        abort();
    }
    if (len)
        memcpy(s, data, len);
    s[len] = '\0';
    return s;
}

static struct kmsg *copy_message(const rd_kafka_message_t *rm, size_t index)
{
    struct kmsg *m = calloc(1, sizeof(*m));
    if (!m) {
        fprintf(stderr, "kafka_consume: out of memory\n");
        abort();
    }
    m->topic = dup_bytes(rd_kafka_topic_name(rm->rkt), strlen(rd_kafka_topic_name(rm->rkt)));
    m->partition = rm->partition;
    m->offset = rm->offset;
    if (rm->key) {
        m->key = dup_bytes(rm->key, rm->key_len);
        m->key_len = rm->key_len;
    }
    if (rm->payload) {
        m->value = dup_bytes(rm->payload, rm->len);
        m->value_len = rm->len;
    }
    rd_kafka_timestamp_type_t tstype;
    m->timestamp = rd_kafka_message_timestamp(rm, &tstype);
    m->timestamp_type = (int)tstype;
    rd_kafka_headers_t *hdrs = NULL;
    if (rd_kafka_message_headers(rm, &hdrs) == RD_KAFKA_RESP_ERR_NO_ERROR && hdrs) {
        size_t n = rd_kafka_header_cnt(hdrs);
        m->headers = calloc(n ? n : 1, sizeof(*m->headers));
        if (!m->headers) {
            fprintf(stderr, "kafka_consume: out of memory\n");
            abort();
        }
        for (size_t i = 0; i < n; i++) {
            const char *name;
            const void *value;
            size_t size;
            if (rd_kafka_header_get_all(hdrs, i, &name, &value, &size))
                break;
            m->headers[i].name = dup_bytes(name, strlen(name));
            m->headers[i].value = value ? dup_bytes(value, size) : NULL;
            m->headers[i].len = size;
            m->header_count++;
        }
    }
    m->index = index;
    return m;
}

static void free_message(struct kmsg *m)
{
    free(m->topic);
    free(m->key);
    free(m->value);
    for (size_t i = 0; i < m->header_count; i++) {
        free(m->headers[i].name);
        free(m->headers[i].value);
    }
    free(m->headers);
    free(m);
}

static void *consume_thread(void *arg)
{
    struct kconsumer *c = arg;
    while (!atomic_load(&c->stop)) {
        rd_kafka_message_t *rm = rd_kafka_consumer_poll(c->rk, 50);
        if (!rm)
            continue;
        if (rm->err) {
            /* Transport errors while a test takes the broker down are expected; the consumer
             * reconnects by itself. */
            rd_kafka_message_destroy(rm);
            continue;
        }
        pthread_mutex_lock(&c->lock);
        if (c->count == c->cap) {
            size_t cap = c->cap ? c->cap * 2 : 4096;
            struct kmsg **grown = realloc(c->msgs, cap * sizeof(*grown));
            if (!grown) {
                fprintf(stderr, "kafka_consume: out of memory\n");
                abort();
            }
            c->msgs = grown;
            c->cap = cap;
        }
        c->msgs[c->count] = copy_message(rm, c->count);
        c->count++;
        pthread_cond_broadcast(&c->arrived);
        pthread_mutex_unlock(&c->lock);
        rd_kafka_message_destroy(rm);
    }
    return NULL;
}

static void set(rd_kafka_conf_t *conf, const char *name, const char *value)
{
    char err[512];
    if (rd_kafka_conf_set(conf, name, value, err, sizeof(err)) != RD_KAFKA_CONF_OK)
        cr_assert_fail("kafka_consume: %s=%s: %s", name, value, err);
}

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Adds every partition of topic to list, waiting (bounded) for the metadata to have them. */
static void add_partitions(rd_kafka_t *rk, const char *topic, rd_kafka_topic_partition_list_t *list)
{
    rd_kafka_topic_t *rkt = rd_kafka_topic_new(rk, topic, NULL);
    if (!rkt)
        cr_assert_fail("kafka_consume: rd_kafka_topic_new(%s) failed", topic);
    int64_t deadline = now_ms() + 15000;
    const char *why = "no answer";
    for (;;) {
        const struct rd_kafka_metadata *md = NULL;
        rd_kafka_resp_err_t err = rd_kafka_metadata(rk, 0, rkt, &md, 2000);
        if (!err && md->topic_cnt == 1 && !md->topics[0].err && md->topics[0].partition_cnt > 0) {
            for (int i = 0; i < md->topics[0].partition_cnt; i++)
                rd_kafka_topic_partition_list_add(list, topic, md->topics[0].partitions[i].id)
                    ->offset = RD_KAFKA_OFFSET_BEGINNING;
            rd_kafka_metadata_destroy(md);
            break;
        }
        why = err             ? rd_kafka_err2str(err)
              : md->topic_cnt ? rd_kafka_err2str(md->topics[0].err)
                              : "topic missing";
        if (md)
            rd_kafka_metadata_destroy(md);
        if (now_ms() > deadline)
            cr_assert_fail("kafka_consume: no partitions for topic %s within 15 s: %s", topic, why);
        struct timespec ts = {0, 50 * 1000000L};
        nanosleep(&ts, NULL);
    }
    rd_kafka_topic_destroy(rkt);
}

struct kconsumer *kconsumer_start(const char *brokers, const char *const topics[])
{
    struct kconsumer *c = calloc(1, sizeof(*c));
    if (!c)
        cr_assert_fail("out of memory");
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    set(conf, "bootstrap.servers", brokers);
    set(conf, "group.id", "saga-e2e-test"); /* required by the API; no group is joined */
    set(conf, "enable.auto.commit", "false");
    set(conf, "enable.auto.offset.store", "false");
    set(conf, "enable.partition.eof", "false");
    set(conf, "fetch.wait.max.ms", "20");
    set(conf, "fetch.error.backoff.ms", "20");
    set(conf, "reconnect.backoff.ms", "20");
    set(conf, "reconnect.backoff.max.ms", "300");
    set(conf, "allow.auto.create.topics", "true");
    /* Should the consumer lose its place in a partition (an offset reset after a leader
     * change, say), it reads the partition again from the start (duplicates, which the
     * tests tell apart) rather than from its end: the default, "latest", would skip
     * messages and make a row the relay did publish look lost. */
    set(conf, "auto.offset.reset", "earliest");
    set(conf, "log_level", "0"); /* the broker going down on purpose is no news */
    char err[512];
    c->rk = rd_kafka_new(RD_KAFKA_CONSUMER, conf, err, sizeof(err));
    if (!c->rk)
        cr_assert_fail("kafka_consume: rd_kafka_new: %s", err);
    rd_kafka_topic_partition_list_t *list = rd_kafka_topic_partition_list_new(16);
    for (size_t i = 0; topics[i]; i++)
        add_partitions(c->rk, topics[i], list);
    rd_kafka_resp_err_t aerr = rd_kafka_assign(c->rk, list);
    rd_kafka_topic_partition_list_destroy(list);
    if (aerr)
        cr_assert_fail("kafka_consume: assign: %s", rd_kafka_err2str(aerr));
    pthread_mutex_init(&c->lock, NULL);
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(&c->arrived, &attr);
    pthread_condattr_destroy(&attr);
    if (pthread_create(&c->thread, NULL, consume_thread, c))
        cr_assert_fail("kafka_consume: pthread_create failed");
    return c;
}

void kconsumer_stop(struct kconsumer *c)
{
    if (!c)
        return;
    atomic_store(&c->stop, true);
    pthread_join(c->thread, NULL);
    rd_kafka_consumer_close(c->rk);
    rd_kafka_destroy(c->rk);
    for (size_t i = 0; i < c->count; i++)
        free_message(c->msgs[i]);
    free(c->msgs);
    pthread_mutex_destroy(&c->lock);
    pthread_cond_destroy(&c->arrived);
    free(c);
}

size_t kconsumer_count(struct kconsumer *c)
{
    pthread_mutex_lock(&c->lock);
    size_t n = c->count;
    pthread_mutex_unlock(&c->lock);
    return n;
}

bool kconsumer_wait_until(struct kconsumer *c,
                          bool (*pred)(struct kmsg *const *msgs, size_t n, void *arg), void *arg,
                          int timeout_ms)
{
    struct timespec deadline;
    clock_gettime(CLOCK_MONOTONIC, &deadline);
    deadline.tv_sec += timeout_ms / 1000;
    deadline.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
    if (deadline.tv_nsec >= 1000000000L) {
        deadline.tv_sec++;
        deadline.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&c->lock);
    bool ok;
    for (;;) {
        ok = pred(c->msgs, c->count, arg);
        if (ok)
            break;
        int r = pthread_cond_timedwait(&c->arrived, &c->lock, &deadline);
        if (r == ETIMEDOUT) {
            ok = pred(c->msgs, c->count, arg);
            break;
        }
    }
    pthread_mutex_unlock(&c->lock);
    return ok;
}

static bool at_least(struct kmsg *const *msgs, size_t n, void *arg)
{
    return n >= *(size_t *)arg;
}

bool kconsumer_wait_count(struct kconsumer *c, size_t n, int timeout_ms)
{
    return kconsumer_wait_until(c, at_least, &n, timeout_ms);
}

struct kmsg **kconsumer_snapshot(struct kconsumer *c, size_t *n)
{
    pthread_mutex_lock(&c->lock);
    struct kmsg **copy = malloc((c->count ? c->count : 1) * sizeof(*copy));
    if (!copy)
        cr_assert_fail("out of memory");
    if (c->count)
        memcpy(copy, c->msgs, c->count * sizeof(*copy));
    *n = c->count;
    pthread_mutex_unlock(&c->lock);
    return copy;
}

const char *kmsg_header(const struct kmsg *m, const char *name, size_t *count)
{
    const char *first = NULL;
    size_t k = 0;
    for (size_t i = 0; i < m->header_count; i++) {
        if (!strcmp(m->headers[i].name, name)) {
            if (!k)
                first = m->headers[i].value;
            k++;
        }
    }
    if (count)
        *count = k;
    return first;
}
