/* relay_latency: commit-to-consume latency through a running outbox-relay, measured from the
 * inserting client's side. Run by bench/relay-bench (which starts PostgreSQL, dev-broker and
 * the relay); see bench/README.md for the figures.
 *
 * Inserters (one thread and one blocking libpq connection each) insert rows into the outbox
 * table, one autocommitted INSERT per transaction of --rows-per-tx rows, at a fixed total rate
 * (open loop: each connection keeps its own schedule and catches up when it falls behind, so a
 * slow database shows as a lower achieved rate, not as a hidden pause). Every row's payload
 * carries its sample index i; the inserter records the monotonic time the INSERT's result came
 * back (the commit, seen by the client). A consumer in this process reads the topic from the
 * beginning of every partition while the rows are inserted (the dev broker keeps only ~5 MB
 * per partition) and records when message i arrives. latency = arrival - commit: it includes
 * the relay's wake-up, claim, produce, the broker's acknowledgement-free path to the
 * consumer's fetch, and the consumer's own fetch wait (not the relay's delete).
 *
 *   relay_latency --brokers HOST:PORT --topic T [--pg URL] [--table S.T]
 *                 [--rate ROWS_PER_S --duration S [--connections N] [--rows-per-tx N]
 *                  [--warmup S]] | [--idle N]  [--keys N] [--size BYTES]
 *
 * --idle N: one row at a time, N samples: insert, wait until it arrives, pause 20-50 ms
 * (random) so that the relay is idle again, repeat. The PostgreSQL URL defaults to
 * SAGA_TEST_PGURL. Prints one result line; exit 1 when rows did not arrive within 30 s. */
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <libpq-fe.h>
#include <librdkafka/rdkafka.h>

struct bench_options {
    const char *pg_url;
    const char *brokers;
    const char *topic;
    const char *table;
    double rate; /* rows/s over all connections */
    double duration_s;
    double warmup_s; /* samples committed before start + warmup are not counted */
    long connections;
    long rows_per_tx;
    long idle;  /* > 0: idle mode, that many samples (after IDLE_WARMUP uncounted ones) */
    int direct; /* idle mode without the database and the relay: produce directly */
    long keys;
    long size;
};

/* Idle mode: the first rows pay for the producer's and consumer's first metadata and fetch
 * of the topic; they are not counted. */
#define IDLE_WARMUP 5

struct bench_state {
    const struct bench_options *opts;
    char *insert_sql;   /* owned */
    char *pad;          /* owned: payload padding */
    int64_t *send_ns;   /* owned; per sample index: INSERT sent */
    int64_t *commit_ns; /* owned; per sample index: INSERT result received (0: not yet) */
    int64_t *arrive_ns; /* owned; per sample index: consumed (0: not yet) */
    long capacity;
    atomic_long issued;    /* sample indexes handed out */
    atomic_long committed; /* rows committed */
    long arrived;          /* rows consumed (consumer thread only) */
    long duplicates;
    int64_t start_ns, end_ns;
};

struct bench_inserter {
    struct bench_state *state;
    long number;
    pthread_t thread;
};

static int64_t bench_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void bench_sleep_until(int64_t ns)
{
    struct timespec ts = {(time_t)(ns / 1000000000), (long)(ns % 1000000000)};
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL))
        ;
}

static void bench_die(const char *what, const char *detail)
{
    fprintf(stderr, "relay_latency: %s: %s\n", what, detail);
    exit(1);
}

static PGconn *bench_connect(const struct bench_state *s)
{
    PGconn *conn = PQconnectdb(s->opts->pg_url);
    if (PQstatus(conn) != CONNECTION_OK)
        bench_die("connect", PQerrorMessage(conn));
    PGresult *res = PQprepare(conn, "ins", s->insert_sql, 0, NULL);
    if (PQresultStatus(res) != PGRES_COMMAND_OK)
        bench_die("prepare", PQresultErrorMessage(res));
    PQclear(res);
    return conn;
}

/* Inserts rows [first, first + rows) in one transaction; records send and commit times. */
static void bench_insert(struct bench_state *s, PGconn *conn, long first, long rows)
{
    char first_text[24], keys_text[24], rows_text[24];
    snprintf(first_text, sizeof(first_text), "%ld", first);
    snprintf(keys_text, sizeof(keys_text), "%ld", s->opts->keys);
    snprintf(rows_text, sizeof(rows_text), "%ld", rows);
    const char *params[5] = {s->opts->topic, s->pad, first_text, keys_text, rows_text};
    int64_t sent = bench_now_ns();
    PGresult *res = PQexecPrepared(conn, "ins", 5, params, NULL, NULL, 0);
    int64_t done = bench_now_ns();
    if (PQresultStatus(res) != PGRES_COMMAND_OK)
        bench_die("insert", PQresultErrorMessage(res));
    PQclear(res);
    for (long i = first; i < first + rows; i++) {
        s->send_ns[i] = sent;
        s->commit_ns[i] = done;
    }
    atomic_fetch_add(&s->committed, rows);
}

static void *bench_inserter_main(void *arg)
{
    struct bench_inserter *ins = arg;
    struct bench_state *s = ins->state;
    const struct bench_options *o = s->opts;
    PGconn *conn = bench_connect(s);
    /* Each connection sends one transaction every `interval`; the connections are spread
     * evenly over the first interval. */
    int64_t interval = (int64_t)(1e9 * (double)(o->rows_per_tx * o->connections) / o->rate);
    int64_t next = s->start_ns + interval * ins->number / o->connections;
    for (;;) {
        if (next >= s->end_ns)
            break;
        bench_sleep_until(next);
        long first = atomic_fetch_add(&s->issued, o->rows_per_tx);
        if (first + o->rows_per_tx > s->capacity)
            break;
        bench_insert(s, conn, first, o->rows_per_tx);
        next += interval;
    }
    PQfinish(conn);
    return NULL;
}

static void bench_conf_set(rd_kafka_conf_t *conf, const char *name, const char *value)
{
    char errstr[256];
    if (rd_kafka_conf_set(conf, name, value, errstr, sizeof(errstr)) != RD_KAFKA_CONF_OK)
        bench_die(name, errstr);
}

/* A consumer assigned to every partition of the topic, from the beginning. */
static rd_kafka_t *bench_consumer_start(const struct bench_options *o)
{
    char errstr[256];
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    bench_conf_set(conf, "bootstrap.servers", o->brokers);
    bench_conf_set(conf, "group.id", "relay-latency"); /* required by the API; not joined */
    bench_conf_set(conf, "enable.auto.commit", "false");
    bench_conf_set(conf, "enable.partition.eof", "false");
    /* Short fetch waits: the consumer's own wait is part of every figure. */
    bench_conf_set(conf, "fetch.wait.max.ms", "5");
    bench_conf_set(conf, "fetch.error.backoff.ms", "5");
    bench_conf_set(conf, "log_level", "3");
    rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_CONSUMER, conf, errstr, sizeof(errstr));
    if (!rk)
        bench_die("consumer", errstr);
    rd_kafka_topic_t *rkt = rd_kafka_topic_new(rk, o->topic, NULL);
    const struct rd_kafka_metadata *md = NULL;
    rd_kafka_topic_partition_list_t *list = rd_kafka_topic_partition_list_new(64);
    for (int attempt = 0;; attempt++) {
        rd_kafka_resp_err_t err = rd_kafka_metadata(rk, 0, rkt, &md, 5000);
        if (!err && md->topic_cnt == 1 && !md->topics[0].err && md->topics[0].partition_cnt > 0)
            break;
        if (md)
            rd_kafka_metadata_destroy(md);
        md = NULL;
        if (attempt == 50)
            bench_die("consumer", "no partitions for the topic within ~15 s");
        bench_sleep_until(bench_now_ns() + 300000000);
    }
    for (int i = 0; i < md->topics[0].partition_cnt; i++)
        rd_kafka_topic_partition_list_add(list, o->topic, md->topics[0].partitions[i].id)->offset =
            RD_KAFKA_OFFSET_BEGINNING;
    rd_kafka_metadata_destroy(md);
    rd_kafka_topic_destroy(rkt);
    rd_kafka_resp_err_t err = rd_kafka_assign(rk, list);
    rd_kafka_topic_partition_list_destroy(list);
    if (err)
        bench_die("assign", rd_kafka_err2str(err));
    return rk;
}

/* --direct: a producer configured like the relay's (idempotent, acks=all) but with
 * linger.ms=0, to measure the broker-and-consumer part of the latency without the relay. */
static rd_kafka_t *bench_producer_start(const struct bench_options *o)
{
    char errstr[256];
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    bench_conf_set(conf, "bootstrap.servers", o->brokers);
    bench_conf_set(conf, "enable.idempotence", "true");
    bench_conf_set(conf, "acks", "all");
    bench_conf_set(conf, "linger.ms", "0");
    bench_conf_set(conf, "log_level", "3");
    rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof(errstr));
    if (!rk)
        bench_die("producer", errstr);
    return rk;
}

/* --direct: produces sample i as the relay would publish it; "sent" and "commit" are both the
 * produce call. */
static void bench_produce(struct bench_state *s, rd_kafka_t *rk, long i)
{
    char value[64];
    int len = snprintf(value, sizeof(value), "{\"i\": %ld, \"pad\": \"x\"}", i);
    s->send_ns[i] = s->commit_ns[i] = bench_now_ns();
    rd_kafka_resp_err_t err =
        rd_kafka_producev(rk, RD_KAFKA_V_TOPIC(s->opts->topic), RD_KAFKA_V_KEY("k", 1),
                          RD_KAFKA_V_VALUE(value, (size_t)len),
                          RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY), RD_KAFKA_V_END);
    if (err)
        bench_die("produce", rd_kafka_err2str(err));
    rd_kafka_poll(rk, 0);
    atomic_fetch_add(&s->committed, 1);
}

/* Polls the consumer for at most timeout_ms and records what arrived. */
static void bench_consume(struct bench_state *s, rd_kafka_t *rk, int timeout_ms)
{
    rd_kafka_message_t *m = rd_kafka_consumer_poll(rk, timeout_ms);
    while (m) {
        int64_t now = bench_now_ns();
        if (m->err) {
            fprintf(stderr, "relay_latency: consumer: %s\n", rd_kafka_message_errstr(m));
        } else if (m->payload) {
            /* PostgreSQL prints jsonb as {"i": 123, "pad": "..."}. */
            char text[64];
            size_t n = m->len < sizeof(text) - 1 ? m->len : sizeof(text) - 1;
            memcpy(text, m->payload, n);
            text[n] = '\0';
            const char *p = strstr(text, "\"i\": ");
            long i = p ? strtol(p + 5, NULL, 10) : -1;
            if (i >= 0 && i < s->capacity) {
                if (s->arrive_ns[i]) {
                    s->duplicates++;
                } else {
                    s->arrive_ns[i] = now;
                    s->arrived++;
                }
            }
        }
        rd_kafka_message_destroy(m);
        m = rd_kafka_consumer_poll(rk, 0);
    }
}

static int bench_cmp_i64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return x < y ? -1 : x > y;
}

/* Sorts v (n entries) and returns the q-quantile, in ms. */
static double bench_quantile_ms(int64_t *v, long n, double q)
{
    if (n == 0)
        return 0.0;
    long k = (long)(q * (double)(n - 1) + 0.5);
    return (double)v[k] / 1e6;
}

static void bench_report(struct bench_state *s, const char *mode, double achieved)
{
    const struct bench_options *o = s->opts;
    long n = atomic_load(&s->issued);
    if (n > s->capacity)
        n = s->capacity;
    int64_t *lat = malloc((size_t)(n ? n : 1) * sizeof(*lat));
    int64_t *ins = malloc((size_t)(n ? n : 1) * sizeof(*ins));
    if (!lat || !ins)
        bench_die("report", "out of memory");
    long count = 0, missing = 0, early = 0;
    int64_t counted_from = s->start_ns + (int64_t)(o->warmup_s * 1e9);
    for (long i = o->idle ? IDLE_WARMUP : 0; i < n; i++) {
        if (!s->commit_ns[i])
            continue; /* issued, never committed (capacity reached) */
        if (!s->arrive_ns[i]) {
            missing++;
            continue;
        }
        if (s->commit_ns[i] < counted_from)
            continue;
        int64_t d = s->arrive_ns[i] - s->commit_ns[i];
        if (d < 0) {
            early++; /* consumed before the client saw its commit: a tie, counted as 0 */
            d = 0;
        }
        ins[count] = s->commit_ns[i] - s->send_ns[i];
        lat[count++] = d;
    }
    qsort(lat, (size_t)count, sizeof(*lat), bench_cmp_i64);
    qsort(ins, (size_t)count, sizeof(*ins), bench_cmp_i64);
    printf("%-6s target %7.0f rows/s achieved %8.0f rows/s  samples %7ld  commit-to-consume ms: "
           "p50 %7.2f p99 %7.2f max %7.2f  insert ms: p50 %5.2f p99 %6.2f  missing %ld dup %ld "
           "early %ld\n",
           mode, o->idle ? 0.0 : o->rate, achieved, count, bench_quantile_ms(lat, count, 0.5),
           bench_quantile_ms(lat, count, 0.99), count ? (double)lat[count - 1] / 1e6 : 0.0,
           bench_quantile_ms(ins, count, 0.5), bench_quantile_ms(ins, count, 0.99), missing,
           s->duplicates, early);
    fflush(stdout);
    free(lat);
    free(ins);
}

static long bench_parse_long(const char *flag, const char *text, long min, long max)
{
    char *end = NULL;
    long v = text ? strtol(text, &end, 10) : 0;
    if (!text || !*text || *end || v < min || v > max) {
        fprintf(stderr, "relay_latency: %s: '%s' is not a number in %ld..%ld\n", flag,
                text ? text : "", min, max);
        exit(2);
    }
    return v;
}

static double bench_parse_double(const char *flag, const char *text, double min, double max)
{
    char *end = NULL;
    double v = text ? strtod(text, &end) : 0;
    if (!text || !*text || *end || v < min || v > max) {
        fprintf(stderr, "relay_latency: %s: '%s' is not a number in %g..%g\n", flag,
                text ? text : "", min, max);
        exit(2);
    }
    return v;
}

int main(int argc, char **argv)
{
    struct bench_options o = {.pg_url = getenv("SAGA_TEST_PGURL"),
                              .table = "bench.outbox",
                              .rate = 1000,
                              .duration_s = 15,
                              .warmup_s = 1,
                              .connections = 4,
                              .rows_per_tx = 1,
                              .keys = 10000,
                              .size = 300};
    for (int i = 1; i < argc; i++) {
        const char *next = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(argv[i], "--pg") && next)
            o.pg_url = argv[++i];
        else if (!strcmp(argv[i], "--brokers") && next)
            o.brokers = argv[++i];
        else if (!strcmp(argv[i], "--topic") && next)
            o.topic = argv[++i];
        else if (!strcmp(argv[i], "--table") && next)
            o.table = argv[++i];
        else if (!strcmp(argv[i], "--rate"))
            o.rate = bench_parse_double("--rate", argv[++i], 1, 1e6);
        else if (!strcmp(argv[i], "--duration"))
            o.duration_s = bench_parse_double("--duration", argv[++i], 1, 3600);
        else if (!strcmp(argv[i], "--warmup"))
            o.warmup_s = bench_parse_double("--warmup", argv[++i], 0, 3600);
        else if (!strcmp(argv[i], "--connections"))
            o.connections = bench_parse_long("--connections", argv[++i], 1, 64);
        else if (!strcmp(argv[i], "--rows-per-tx"))
            o.rows_per_tx = bench_parse_long("--rows-per-tx", argv[++i], 1, 10000);
        else if (!strcmp(argv[i], "--idle"))
            o.idle = bench_parse_long("--idle", argv[++i], 1, 100000);
        else if (!strcmp(argv[i], "--direct"))
            o.direct = 1;
        else if (!strcmp(argv[i], "--keys"))
            o.keys = bench_parse_long("--keys", argv[++i], 1, 100000000);
        else if (!strcmp(argv[i], "--size"))
            o.size = bench_parse_long("--size", argv[++i], 40, 1000000);
        else {
            fprintf(stderr, "relay_latency: unknown or incomplete flag '%s'\n", argv[i]);
            return 2;
        }
    }
    if (o.direct && !o.idle)
        o.idle = 200;
    if ((!o.pg_url && !o.direct) || !o.brokers || !o.topic) {
        fprintf(stderr, "relay_latency: --brokers and --topic are required, and --pg or "
                        "SAGA_TEST_PGURL\n");
        return 2;
    }
    if (strspn(o.table, "abcdefghijklmnopqrstuvwxyz0123456789_.") != strlen(o.table))
        bench_die("--table", "only lower-case letters, digits, '_' and '.'");

    struct bench_state s = {.opts = &o};
    /* One statement, one transaction: rows [$3, $3 + $5) with keys k0..k($4 - 1). */
    if (asprintf(&s.insert_sql,
                 "INSERT INTO %s (id, topic, key, event_type, payload) "
                 "SELECT gen_random_uuid(), $1, 'k' || (i %% $4::bigint), 'bench', "
                 "jsonb_build_object('i', i, 'pad', $2::text) "
                 "FROM generate_series($3::bigint, $3::bigint + $5::bigint - 1) i",
                 o.table) < 0)
        bench_die("allocation", "out of memory");
    /* {"i": 1234567, "pad": "..."} is about 25 bytes plus the padding. */
    s.pad = malloc((size_t)o.size);
    if (!s.pad)
        bench_die("allocation", "out of memory");
    memset(s.pad, 'x', (size_t)o.size - 26);
    s.pad[o.size - 26] = '\0';
    s.capacity = o.idle ? o.idle + IDLE_WARMUP
                        : (long)(o.rate * o.duration_s) + o.rows_per_tx * o.connections;
    s.send_ns = calloc((size_t)s.capacity, sizeof(int64_t));
    s.commit_ns = calloc((size_t)s.capacity, sizeof(int64_t));
    s.arrive_ns = calloc((size_t)s.capacity, sizeof(int64_t));
    if (!s.send_ns || !s.commit_ns || !s.arrive_ns)
        bench_die("allocation", "out of memory");

    rd_kafka_t *rk = bench_consumer_start(&o);
    int status = 0;
    if (o.idle) {
        PGconn *conn = o.direct ? NULL : bench_connect(&s);
        rd_kafka_t *producer = o.direct ? bench_producer_start(&o) : NULL;
        o.warmup_s = 0;
        s.start_ns = bench_now_ns();
        srand(42);
        for (long i = 0; i < s.capacity; i++) {
            atomic_store(&s.issued, i + 1);
            if (producer)
                bench_produce(&s, producer, i);
            else
                bench_insert(&s, conn, i, 1);
            int64_t deadline = bench_now_ns() + 30000000000;
            while (!s.arrive_ns[i] && bench_now_ns() < deadline)
                bench_consume(&s, rk, 1);
            if (!s.arrive_ns[i]) {
                fprintf(stderr, "relay_latency: row %ld did not arrive within 30 s\n", i);
                status = 1;
                break;
            }
            int64_t pause = (20 + rand() % 31) * 1000000LL;
            int64_t until = bench_now_ns() + pause;
            while (bench_now_ns() < until)
                bench_consume(&s, rk, 5);
        }
        if (producer)
            rd_kafka_destroy(producer);
        PQfinish(conn);
        bench_report(&s, o.direct ? "direct" : "idle", 0.0);
    } else {
        struct bench_inserter *ins = calloc((size_t)o.connections, sizeof(*ins));
        if (!ins)
            bench_die("allocation", "out of memory");
        /* Connections and prepared statements first, then the clock starts. */
        s.start_ns = bench_now_ns() + 500000000;
        s.end_ns = s.start_ns + (int64_t)(o.duration_s * 1e9);
        for (long c = 0; c < o.connections; c++) {
            ins[c].state = &s;
            ins[c].number = c;
            if (pthread_create(&ins[c].thread, NULL, bench_inserter_main, &ins[c]))
                bench_die("pthread_create", "failed");
        }
        while (bench_now_ns() < s.end_ns)
            bench_consume(&s, rk, 10);
        for (long c = 0; c < o.connections; c++)
            pthread_join(ins[c].thread, NULL);
        int64_t finished = bench_now_ns();
        double achieved =
            (double)atomic_load(&s.committed) / ((double)(finished - s.start_ns) / 1e9);
        int64_t deadline = bench_now_ns() + 30000000000;
        while (s.arrived < atomic_load(&s.committed) && bench_now_ns() < deadline)
            bench_consume(&s, rk, 10);
        if (s.arrived < atomic_load(&s.committed)) {
            fprintf(stderr, "relay_latency: %ld of %ld rows did not arrive within 30 s\n",
                    atomic_load(&s.committed) - s.arrived, atomic_load(&s.committed));
            status = 1;
        }
        bench_report(&s, "rate", achieved);
        free(ins);
    }
    rd_kafka_consumer_close(rk);
    rd_kafka_destroy(rk);
    free(s.send_ns);
    free(s.commit_ns);
    free(s.arrive_ns);
    free(s.pad);
    free(s.insert_sql);
    return status;
}
