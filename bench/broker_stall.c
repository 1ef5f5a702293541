/* broker_stall: measures the librdkafka 2.0.2 mock broker's Nagle stall, and its removal by
 * tools/nodelay.c (TCP_NODELAY on accepted sockets, as dev-broker does).
 *
 * For each mode, an in-process mock cluster (1 broker, topic "bench" with 4 partitions, the
 * mock's default) and an idempotent producer configured like the relay
 * (enable.idempotence=true, acks=all, linger.ms=5, max.in.flight=5) send N small keyed
 * messages in bursts of WINDOW: produce WINDOW messages, wait until all are acknowledged,
 * repeat (a relay claiming a batch of rows and waiting for its acknowledgements). Prints
 * messages/s and the p50/p99/max latency from produce call to delivery report.
 *
 * Why bursts: librdkafka sends one ProduceRequest per partition, so a burst puts several
 * requests in flight at once. The mock answers the first at once; the other small answers are
 * held back by Nagle until the client ACKs the first, and a client with nothing more to send
 * delays that ACK by ~40 ms. --stream keeps up to WINDOW messages outstanding continuously
 * instead; the client then keeps sending, its requests carry the ACKs, and the stall mostly
 * hides (the difference is smaller).
 *
 *   broker_stall [--messages N] [--window N] [--size BYTES] [--partitions N] [--stream]
 *                [--mode both|nagle|nodelay] [--client-nodelay]
 *
 * nagle: the interposer passes accept() through (the mock's own behaviour); nodelay: accepted
 * sockets get TCP_NODELAY. --client-nodelay also sets socket.nagle.disable=true on the
 * producer (librdkafka's default is false, which the relay keeps). Not run by the tests. */
#include "nodelay.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <librdkafka/rdkafka.h>
#include <librdkafka/rdkafka_mock.h>

struct bench_options {
    long messages;
    long window;
    long size;
    long partitions;
    int nagle;   /* run the mode without TCP_NODELAY */
    int nodelay; /* run the mode with TCP_NODELAY */
    int client_nodelay;
    int bursts; /* refill the window only once it is empty */
};

struct bench_run {
    uint64_t *sent_ns;    /* owned; produce time per message index */
    uint64_t *latency_ns; /* owned; one per delivered message */
    long acked;
    long failed;
    rd_kafka_resp_err_t first_error;
};

static uint64_t bench_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void bench_dr_cb(rd_kafka_t *rk, const rd_kafka_message_t *msg, void *opaque)
{
    struct bench_run *run = opaque;
    long index = (long)(intptr_t)msg->_private;

    if (msg->err) {
        if (!run->failed)
            run->first_error = msg->err;
        run->failed++;
        return;
    }
    if (index >= 0) /* -1: the warm-up message */
        run->latency_ns[run->acked++] = bench_now_ns() - run->sent_ns[index];
}

static int bench_cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static void bench_die(const char *what, const char *detail)
{
    fprintf(stderr, "broker_stall: %s: %s\n", what, detail);
    exit(1);
}

static void bench_conf_set(rd_kafka_conf_t *conf, const char *name, const char *value)
{
    char errstr[256];
    if (rd_kafka_conf_set(conf, name, value, errstr, sizeof(errstr)) != RD_KAFKA_CONF_OK)
        bench_die(name, errstr);
}

/* Runs one mode; prints one result line. */
static void bench_mode(const struct bench_options *opts, int nodelay)
{
    char errstr[256];
    struct bench_run run = {0};
    char *payload = malloc((size_t)opts->size);
    rd_kafka_conf_t *conf;
    rd_kafka_t *mock_rk, *rk;
    rd_kafka_mock_cluster_t *cluster;
    rd_kafka_resp_err_t err;
    uint64_t start, elapsed;
    long next = 0;

    run.sent_ns = calloc((size_t)opts->messages, sizeof(*run.sent_ns));
    run.latency_ns = calloc((size_t)opts->messages, sizeof(*run.latency_ns));
    if (!payload || !run.sent_ns || !run.latency_ns)
        bench_die("allocation", "out of memory");
    memset(payload, 'x', (size_t)opts->size);

    /* Decided before the cluster exists, so the producer's connection is accepted with it. */
    nodelay_set_enabled(nodelay);

    conf = rd_kafka_conf_new();
    bench_conf_set(conf, "log_level", "3");
    mock_rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof(errstr));
    if (!mock_rk)
        bench_die("mock handle", errstr);
    cluster = rd_kafka_mock_cluster_new(mock_rk, 1);
    if (!cluster)
        bench_die("mock cluster", "rd_kafka_mock_cluster_new failed");
    if ((err = rd_kafka_mock_topic_create(cluster, "bench", (int)opts->partitions, 1)))
        bench_die("topic", rd_kafka_err2str(err));

    conf = rd_kafka_conf_new();
    bench_conf_set(conf, "bootstrap.servers", rd_kafka_mock_cluster_bootstraps(cluster));
    bench_conf_set(conf, "enable.idempotence", "true");
    bench_conf_set(conf, "acks", "all");
    bench_conf_set(conf, "linger.ms", "5");
    bench_conf_set(conf, "max.in.flight.requests.per.connection", "5");
    bench_conf_set(conf, "queue.buffering.max.messages", "2000000");
    bench_conf_set(conf, "log_level", "3");
    if (opts->client_nodelay)
        bench_conf_set(conf, "socket.nagle.disable", "true");
    rd_kafka_conf_set_dr_msg_cb(conf, bench_dr_cb);
    rd_kafka_conf_set_opaque(conf, &run);
    rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof(errstr));
    if (!rk)
        bench_die("producer", errstr);

    /* Warm-up: connection, ApiVersions, InitProducerId and metadata are not measured. */
    if ((err = rd_kafka_producev(rk, RD_KAFKA_V_TOPIC("bench"), RD_KAFKA_V_VALUE(payload, 1),
                                 RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
                                 RD_KAFKA_V_OPAQUE((void *)(intptr_t)-1), RD_KAFKA_V_END)))
        bench_die("warm-up produce", rd_kafka_err2str(err));
    if (rd_kafka_flush(rk, 30000) != RD_KAFKA_RESP_ERR_NO_ERROR || run.failed)
        bench_die("warm-up", "not delivered within 30 s");

    start = bench_now_ns();
    int refilling = 1;
    while (run.acked + run.failed < opts->messages) {
        long outstanding = next - run.acked - run.failed;
        if (opts->bursts && outstanding == 0)
            refilling = 1;
        if (opts->bursts && outstanding >= opts->window)
            refilling = 0;
        if (next < opts->messages && outstanding < opts->window && refilling) {
            char key[16];
            /* Keyed, so that all partitions are busy at once as with real outbox traffic:
             * librdkafka sends one ProduceRequest per partition, hence several in flight. */
            int key_len = snprintf(key, sizeof(key), "k%ld", next % 1000);
            run.sent_ns[next] = bench_now_ns();
            err = rd_kafka_producev(rk, RD_KAFKA_V_TOPIC("bench"),
                                    RD_KAFKA_V_KEY(key, (size_t)key_len),
                                    RD_KAFKA_V_VALUE(payload, (size_t)opts->size),
                                    RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
                                    RD_KAFKA_V_OPAQUE((void *)(intptr_t)next), RD_KAFKA_V_END);
            if (err == RD_KAFKA_RESP_ERR__QUEUE_FULL) {
                rd_kafka_poll(rk, 1);
                continue;
            }
            if (err)
                bench_die("produce", rd_kafka_err2str(err));
            next++;
            rd_kafka_poll(rk, 0);
        } else {
            /* Window full (or all sent): wait for delivery reports. */
            rd_kafka_poll(rk, 100);
        }
    }
    elapsed = bench_now_ns() - start;

    if (run.failed)
        fprintf(stderr, "broker_stall: %ld deliveries failed, first: %s\n", run.failed,
                rd_kafka_err2str(run.first_error));
    qsort(run.latency_ns, (size_t)run.acked, sizeof(*run.latency_ns), bench_cmp_u64);
    printf("%-8s %12.0f %10.2f %10.2f %10.2f\n", nodelay ? "nodelay" : "nagle",
           (double)run.acked / ((double)elapsed / 1e9),
           run.acked ? (double)run.latency_ns[run.acked / 2] / 1e6 : 0.0,
           run.acked ? (double)run.latency_ns[run.acked * 99 / 100] / 1e6 : 0.0,
           run.acked ? (double)run.latency_ns[run.acked - 1] / 1e6 : 0.0);
    fflush(stdout);

    rd_kafka_destroy(rk);
    rd_kafka_mock_cluster_destroy(cluster);
    rd_kafka_destroy(mock_rk);
    free(run.latency_ns);
    free(run.sent_ns);
    free(payload);
}

static long bench_parse_long(const char *flag, const char *text, long min, long max)
{
    char *end = NULL;
    long v = text ? strtol(text, &end, 10) : 0;
    if (!text || !*text || *end || v < min || v > max) {
        fprintf(stderr, "broker_stall: %s: '%s' is not a number in %ld..%ld\n", flag,
                text ? text : "", min, max);
        exit(2);
    }
    return v;
}

int main(int argc, char **argv)
{
    struct bench_options opts = {200000, 1000, 64, 4, 1, 1, 0, 1};

    for (int i = 1; i < argc; i++) {
        const char *next = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(argv[i], "--messages") == 0) {
            opts.messages = bench_parse_long("--messages", next, 1, 100000000);
            i++;
        } else if (strcmp(argv[i], "--window") == 0) {
            opts.window = bench_parse_long("--window", next, 1, 2000000);
            i++;
        } else if (strcmp(argv[i], "--size") == 0) {
            opts.size = bench_parse_long("--size", next, 1, 1000000);
            i++;
        } else if (strcmp(argv[i], "--partitions") == 0) {
            opts.partitions = bench_parse_long("--partitions", next, 1, 1000);
            i++;
        } else if (strcmp(argv[i], "--mode") == 0 && next) {
            opts.nagle = strcmp(next, "both") == 0 || strcmp(next, "nagle") == 0;
            opts.nodelay = strcmp(next, "both") == 0 || strcmp(next, "nodelay") == 0;
            if (!opts.nagle && !opts.nodelay) {
                fprintf(stderr, "broker_stall: --mode: '%s' is not both, nagle or nodelay\n", next);
                return 2;
            }
            i++;
        } else if (strcmp(argv[i], "--stream") == 0) {
            opts.bursts = 0;
        } else if (strcmp(argv[i], "--client-nodelay") == 0) {
            opts.client_nodelay = 1;
        } else {
            fprintf(stderr, "broker_stall: unknown or incomplete flag '%s'\n", argv[i]);
            return 2;
        }
    }

    printf("broker_stall: %ld messages of %ld bytes, %s %ld, idempotent producer "
           "(acks=all, linger.ms=5, max.in.flight=5%s), librdkafka %s mock, 1 broker, "
           "%ld partition(s), keyed\n",
           opts.messages, opts.size, opts.bursts ? "bursts of" : "streaming, window", opts.window,
           opts.client_nodelay ? ", socket.nagle.disable=true" : "", rd_kafka_version_str(),
           opts.partitions);
    printf("%-8s %12s %10s %10s %10s\n", "mode", "msgs/s", "p50 ms", "p99 ms", "max ms");
    if (opts.nagle)
        bench_mode(&opts, 0);
    if (opts.nodelay)
        bench_mode(&opts, 1);
    return 0;
}
