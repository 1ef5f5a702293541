/* dev-broker: a local Kafka-protocol broker for development and tests. NOT a Kafka broker for
 * production: it is librdkafka's in-memory mock cluster (rdkafka_mock.h) behind a command line.
 * Nothing is persisted and each partition keeps only about the last 5 MB / 100,000 batches.
 *
 * Usage:
 *   dev-broker [--port N] [--brokers N] [--partitions N] [--topic NAME[:PARTITIONS]]...
 *
 *   --port N        TCP port of broker 1 on 127.0.0.1 (default: a free port chosen by the
 *                   kernel). Other brokers always get free ports.
 *   --brokers N     number of brokers in the cluster, 1..32 (default 1).
 *   --partitions N  partition count for --topic flags without ":PARTITIONS" (default 4).
 *   --topic T[:P]   create topic T (with P partitions) before reporting ready. Repeatable.
 *   --no-long-poll  answer an empty Fetch after its whole MaxWait, as the mock itself does
 *                   (also DEV_BROKER_LONG_POLL=0, or off/false/no); clients should then shorten
 * their fetch.wait.max.ms (KAFKA_FETCH_WAIT_MAX_MS for this project's daemons). By default a Fetch
 * that finds no data is answered as soon as a Produce to one of its topics is acknowledged, as a
 * real broker does (longpoll.h).
 *
 * Once the cluster accepts connections, prints exactly one line to stdout and flushes it:
 *   bootstrap=127.0.0.1:PORT
 * (broker 1; clients discover the other brokers from it). Then runs until SIGTERM or SIGINT
 * and exits 0. Bad flags exit 2 with a message naming the flag; a start-up failure exits 1.
 * DEV_BROKER_LONG_POLL and DEV_BROKER_NODELAY (TCP_NODELAY, below) are switches, on unless
 * 0/off/false/no; any value other than those and 1/on/true/yes exits 2 naming the variable.
 *
 * Topics need no setup: the mock creates an unknown topic on its first Metadata request
 * (a producer's or a subscribing consumer's) with 4 partitions and replication factor
 * min(3, brokers). That count is fixed inside librdkafka 2.0.2 (no API changes it), so
 * --partitions only applies to --topic.
 *
 * Control protocol (fault injection for tests): one command per line on stdin; each gets one
 * answer line on stdout, "ok" or "error <reason>". End of stdin only stops reading commands.
 * BROKER is a broker id (1..N) or "all"; API is a Kafka request name (Produce, Fetch,
 * Metadata, ListOffsets, OffsetCommit, OffsetFetch, FindCoordinator, JoinGroup, Heartbeat,
 * LeaveGroup, SyncGroup, ApiVersions, InitProducerId, AddPartitionsToTxn, AddOffsetsToTxn,
 * EndTxn, TxnOffsetCommit; case-insensitive) or its number; ERROR is a librdkafka error name
 * with or without the RD_KAFKA_RESP_ERR_ prefix (NOT_LEADER_FOR_PARTITION,
 * REQUEST_TIMED_OUT, ...) or its number.
 *   ping                            answers ok (to synchronise with the broker)
 *   down BROKER                     disconnect the broker and refuse new connections
 *   up BROKER                       accept connections again
 *   rtt BROKER MS                   delay every response of the broker by MS milliseconds
 *   errors API COUNT ERROR...       fail the next COUNT requests of API, cluster-wide, with
 *                                   ERROR (one ERROR: repeated COUNT times; else COUNT of them)
 *   clear API                       drop the errors still queued for API
 *   topic NAME PARTITIONS           create a topic
 *   topic-error NAME ERROR          report ERROR for the topic in Metadata (NO_ERROR clears)
 *   leader NAME PARTITION BROKER    move a partition's leader (BROKER -1: no leader)
 *
 * TCP_NODELAY: librdkafka 2.0.2's mock never sets it on accepted sockets, so with several
 * requests in flight its replies wait ~40 ms for the client's delayed ACK. nodelay.c,
 * linked into this executable, interposes accept() to set it (see nodelay.h). --port works
 * the same way: bind() below rewrites the port of the first listener the mock creates. */
#include "longpoll.h"
#include "nodelay.h"

#include <ctype.h>
#include <dlfcn.h>
#include <errno.h>
#include <ev.h>
#include <fcntl.h>
#include <limits.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#include <librdkafka/rdkafka.h>
#include <librdkafka/rdkafka_mock.h>

#define DEV_BROKER_MAX_BROKERS 32
#define DEV_BROKER_MAX_PARTITIONS 10000
#define DEV_BROKER_DEFAULT_PARTITIONS 4 /* the mock's own default for auto-created topics */
#define DEV_BROKER_LINE_MAX 1024
#define DEV_BROKER_MAX_ERRORS 1000

struct dev_broker_topic {
    char *name;     /* owned */
    int partitions; /* 0: use --partitions */
};

struct dev_broker_options {
    int port; /* 0: any free port */
    int brokers;
    int partitions;
    struct dev_broker_topic *topics; /* owned */
    size_t topic_count;
    int help;      /* --help given: print usage, exit 0 */
    int long_poll; /* 0: --no-long-poll (or DEV_BROKER_LONG_POLL=0) */
    int nodelay;   /* 0: DEV_BROKER_NODELAY=0 */
};

struct dev_broker {
    rd_kafka_t *rk;                   /* owned; the handle the mock cluster lives in */
    rd_kafka_mock_cluster_t *cluster; /* owned */
    int replication_factor;
    struct ev_loop *loop; /* borrowed (default loop) */
    ev_io stdin_watcher;
    ev_signal sigterm_watcher;
    ev_signal sigint_watcher;
    char line[DEV_BROKER_LINE_MAX + 1];
    size_t line_len;
    int line_too_long; /* discarding the rest of an over-long line */
};

/* ---- bind() interposer for --port ---------------------------------------------------------
 * rd_kafka_mock_cluster_new() binds each broker's listener to 127.0.0.1 port 0 and offers no
 * way to choose the port. Like accept() in nodelay.c, this definition of bind() wins over
 * libc's for librdkafka's calls. While requested_port is nonzero, the first AF_INET bind to
 * port 0 is given that port instead; the mock reads the real port back with getsockname(). */
static atomic_int requested_port;

typedef int (*bind_fn)(int, __CONST_SOCKADDR_ARG, socklen_t);

int bind(int fd, __CONST_SOCKADDR_ARG addr, socklen_t len)
{
    static _Atomic(bind_fn) real_bind;
    bind_fn fn = atomic_load(&real_bind);
    if (!fn) {
        void *sym = dlsym(RTLD_NEXT, "bind");
        if (!sym) {
            fprintf(stderr, "dev-broker: dlsym(RTLD_NEXT, \"bind\") failed: %s\n", dlerror());
            abort();
        }
        memcpy(&fn, &sym, sizeof(fn)); /* ISO C has no void * -> function pointer cast */
        atomic_store(&real_bind, fn);
    }

    const struct sockaddr_in *in = addr.__sockaddr_in__;
    if (len >= sizeof(*in) && in->sin_family == AF_INET && in->sin_port == 0) {
        int port = atomic_exchange(&requested_port, 0);
        if (port > 0) {
            struct sockaddr_in chosen = *in;
            __CONST_SOCKADDR_ARG chosen_arg = {.__sockaddr_in__ = &chosen};
            chosen.sin_port = htons((uint16_t)port);
            return fn(fd, chosen_arg, sizeof(chosen));
        }
    }
    return fn(fd, addr, len);
}

/* ---- output ----------------------------------------------------------------------------- */

static void dev_broker_reply(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Writes one answer line to stdout and flushes it: the reader is a script waiting for it. */
static void dev_broker_reply(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stdout, fmt, ap);
    va_end(ap);
    fputc('\n', stdout);
    fflush(stdout);
}

/* librdkafka log lines go to stderr, except the mock handle's own complaint that it has no
 * bootstrap.servers: it is never meant to connect anywhere. */
static void dev_broker_log_cb(const rd_kafka_t *rk, int level, const char *fac, const char *buf)
{
    if (strcmp(fac, "CONFWARN") == 0 && strstr(buf, "bootstrap.servers"))
        return;
    fprintf(stderr, "dev-broker: librdkafka %d %s: %s\n", level, fac, buf);
}

/* ---- parsing helpers ---------------------------------------------------------------------- */

/* Parses a whole decimal integer in [min, max]. Returns 0 or -1. */
static int dev_broker_parse_int(const char *text, long min, long max, long *out)
{
    char *end = NULL;
    long v;

    if (!text || !*text || isspace((unsigned char)*text))
        return -1;
    errno = 0;
    v = strtol(text, &end, 10);
    if (errno || *end || v < min || v > max)
        return -1;
    *out = v;
    return 0;
}

/* Kafka's rule for topic names: 1..249 characters from [A-Za-z0-9._-], not "." or "..". */
static int dev_broker_topic_name_valid(const char *name, size_t len)
{
    if (len == 0 || len > 249)
        return 0;
    if ((len == 1 && name[0] == '.') || (len == 2 && name[0] == '.' && name[1] == '.'))
        return 0;
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)name[i];
        if (!isalnum(c) && c != '.' && c != '_' && c != '-')
            return 0;
    }
    return 1;
}

static const struct {
    const char *name;
    int16_t key;
} dev_broker_apis[] = {
    {"Produce", 0},
    {"Fetch", 1},
    {"ListOffsets", 2},
    {"Metadata", 3},
    {"OffsetCommit", 8},
    {"OffsetFetch", 9},
    {"FindCoordinator", 10},
    {"JoinGroup", 11},
    {"Heartbeat", 12},
    {"LeaveGroup", 13},
    {"SyncGroup", 14},
    {"DescribeGroups", 15},
    {"ListGroups", 16},
    {"ApiVersions", 18},
    {"ApiVersion", 18},
    {"CreateTopics", 19},
    {"DeleteTopics", 20},
    {"InitProducerId", 22},
    {"OffsetForLeaderEpoch", 23},
    {"AddPartitionsToTxn", 24},
    {"AddOffsetsToTxn", 25},
    {"EndTxn", 26},
    {"TxnOffsetCommit", 28},
};

/* Kafka ApiKey from a request name or number. Returns 0 or -1. */
static int dev_broker_parse_api(const char *text, int16_t *key)
{
    long v;
    for (size_t i = 0; i < sizeof(dev_broker_apis) / sizeof(dev_broker_apis[0]); i++) {
        if (strcasecmp(text, dev_broker_apis[i].name) == 0) {
            *key = dev_broker_apis[i].key;
            return 0;
        }
    }
    if (dev_broker_parse_int(text, 0, 100, &v) == 0) {
        *key = (int16_t)v;
        return 0;
    }
    return -1;
}

/* librdkafka error code from its name (RD_KAFKA_RESP_ERR_ prefix optional) or number.
 * Returns 0 or -1. */
static int dev_broker_parse_error(const char *text, rd_kafka_resp_err_t *err)
{
    const struct rd_kafka_err_desc *descs;
    size_t count;
    long v;
    const char *prefix = "RD_KAFKA_RESP_ERR_";

    if (strncasecmp(text, prefix, strlen(prefix)) == 0)
        text += strlen(prefix);
    rd_kafka_get_err_descs(&descs, &count);
    for (size_t i = 0; i < count; i++) {
        if (descs[i].name && strcasecmp(text, descs[i].name) == 0) {
            *err = descs[i].code;
            return 0;
        }
    }
    if (dev_broker_parse_int(text, -200, 200, &v) == 0 && strcmp(rd_kafka_err2name(v), "") &&
        strncmp(rd_kafka_err2name(v), "ERR_", 4) != 0) {
        *err = (rd_kafka_resp_err_t)v;
        return 0;
    }
    return -1;
}

/* Broker id: 1..N or "all" (-1, which the mock API reads as every broker). */
static int dev_broker_parse_broker(const char *text, int32_t *id)
{
    long v;
    if (strcasecmp(text, "all") == 0) {
        *id = -1;
        return 0;
    }
    if (dev_broker_parse_int(text, 0, INT32_MAX, &v) != 0)
        return -1;
    *id = (int32_t)v;
    return 0;
}

/* ---- command line ------------------------------------------------------------------------ */

static void dev_broker_usage(FILE *out)
{
    fprintf(out, "usage: dev-broker [--port N] [--brokers N] [--partitions N] "
                 "[--topic NAME[:PARTITIONS]]... [--no-long-poll]\n");
}

/* The on/off switch in environment variable name: unset or empty gives dflt; 1, on, true,
 * yes give 1; 0, off, false, no give 0 (any case). Anything else: a message naming the
 * variable on stderr, and -1. */
static int dev_broker_env_switch(const char *name, int dflt)
{
    static const char *const on[] = {"1", "on", "true", "yes"};
    static const char *const off[] = {"0", "off", "false", "no"};
    const char *value = getenv(name);
    if (!value || !*value)
        return dflt;
    for (size_t i = 0; i < sizeof(on) / sizeof(on[0]); i++) {
        if (strcasecmp(value, on[i]) == 0)
            return 1;
        if (strcasecmp(value, off[i]) == 0)
            return 0;
    }
    fprintf(stderr,
            "dev-broker: %s=\"%s\" is not a switch: use 1 or 0 (on/off, true/false, "
            "yes/no)\n",
            name, value);
    return -1;
}

/* Fills *opts from argv and the environment (DEV_BROKER_LONG_POLL, DEV_BROKER_NODELAY).
 * Returns 0, or 2 (the exit status) after printing a message that names the bad flag or
 * variable. opts->topics (and the names in it) is owned by the caller even on
 * failure. */
__attribute__((warn_unused_result)) static int
dev_broker_parse_args(int argc, char **argv, struct dev_broker_options *opts)
{
    opts->port = 0;
    opts->brokers = 1;
    opts->partitions = DEV_BROKER_DEFAULT_PARTITIONS;
    opts->topics = NULL;
    opts->topic_count = 0;
    opts->help = 0;
    opts->long_poll = dev_broker_env_switch("DEV_BROKER_LONG_POLL", 1);
    opts->nodelay = dev_broker_env_switch("DEV_BROKER_NODELAY", 1);
    if (opts->long_poll < 0 || opts->nodelay < 0)
        return 2;

    for (int i = 1; i < argc; i++) {
        const char *arg = argv[i];
        const char *value = NULL;
        char flag[32];
        const char *eq = strchr(arg, '=');
        long v;

        if (strcmp(arg, "--help") == 0 || strcmp(arg, "-h") == 0) {
            opts->help = 1;
            return 0;
        }
        if (strcmp(arg, "--no-long-poll") == 0) {
            opts->long_poll = 0;
            continue;
        }
        if (strncmp(arg, "--", 2) != 0 || (eq && (size_t)(eq - arg) >= sizeof(flag))) {
            fprintf(stderr, "dev-broker: unknown argument '%s'\n", arg);
            dev_broker_usage(stderr);
            return 2;
        }
        /* --flag=value or --flag value */
        if (eq) {
            memcpy(flag, arg, (size_t)(eq - arg));
            flag[eq - arg] = '\0';
            value = eq + 1;
        } else {
            snprintf(flag, sizeof(flag), "%s", arg);
        }
        if (strcmp(flag, "--port") != 0 && strcmp(flag, "--brokers") != 0 &&
            strcmp(flag, "--partitions") != 0 && strcmp(flag, "--topic") != 0) {
            fprintf(stderr, "dev-broker: unknown flag '%s'\n", flag);
            dev_broker_usage(stderr);
            return 2;
        }
        if (!value) {
            if (i + 1 >= argc) {
                fprintf(stderr, "dev-broker: flag '%s' needs a value\n", flag);
                return 2;
            }
            value = argv[++i];
        }

        if (strcmp(flag, "--port") == 0) {
            if (dev_broker_parse_int(value, 1, 65535, &v) != 0) {
                fprintf(stderr, "dev-broker: --port: '%s' is not a port number (1..65535)\n",
                        value);
                return 2;
            }
            opts->port = (int)v;
        } else if (strcmp(flag, "--brokers") == 0) {
            if (dev_broker_parse_int(value, 1, DEV_BROKER_MAX_BROKERS, &v) != 0) {
                fprintf(stderr, "dev-broker: --brokers: '%s' is not a number in 1..%d\n", value,
                        DEV_BROKER_MAX_BROKERS);
                return 2;
            }
            opts->brokers = (int)v;
        } else if (strcmp(flag, "--partitions") == 0) {
            if (dev_broker_parse_int(value, 1, DEV_BROKER_MAX_PARTITIONS, &v) != 0) {
                fprintf(stderr, "dev-broker: --partitions: '%s' is not a number in 1..%d\n", value,
                        DEV_BROKER_MAX_PARTITIONS);
                return 2;
            }
            opts->partitions = (int)v;
        } else {
            const char *colon = strchr(value, ':');
            size_t name_len = colon ? (size_t)(colon - value) : strlen(value);
            struct dev_broker_topic *grown;
            int partitions = 0;

            if (!dev_broker_topic_name_valid(value, name_len)) {
                fprintf(stderr,
                        "dev-broker: --topic: '%s' is not a valid topic name "
                        "(1..249 of A-Z a-z 0-9 . _ -)\n",
                        value);
                return 2;
            }
            if (colon) {
                if (dev_broker_parse_int(colon + 1, 1, DEV_BROKER_MAX_PARTITIONS, &v) != 0) {
                    fprintf(stderr,
                            "dev-broker: --topic: '%s': partition count is not a number in "
                            "1..%d\n",
                            value, DEV_BROKER_MAX_PARTITIONS);
                    return 2;
                }
                partitions = (int)v;
            }
            grown = realloc(opts->topics, (opts->topic_count + 1) * sizeof(*grown));
            if (!grown) {
                fprintf(stderr, "dev-broker: out of memory\n");
                abort();
            }
            opts->topics = grown;
            opts->topics[opts->topic_count].name = strndup(value, name_len);
            if (!opts->topics[opts->topic_count].name) {
                fprintf(stderr, "dev-broker: out of memory\n");
                abort();
            }
            opts->topics[opts->topic_count].partitions = partitions;
            opts->topic_count++;
        }
    }
    return 0;
}

/* ---- control protocol ----------------------------------------------------------------------
 */

/* Splits line into at most max whitespace-separated words, in place. Returns the count, or
 * max + 1 if there were more. */
static int dev_broker_split(char *line, char **words, int max)
{
    int n = 0;
    char *save = NULL;
    for (char *w = strtok_r(line, " \t\r", &save); w; w = strtok_r(NULL, " \t\r", &save)) {
        if (n == max)
            return max + 1;
        words[n++] = w;
    }
    return n;
}

static void dev_broker_reply_err(rd_kafka_resp_err_t err)
{
    if (err)
        dev_broker_reply("error %s: %s", rd_kafka_err2name(err), rd_kafka_err2str(err));
    else
        dev_broker_reply("ok");
}

/* Runs one control command and writes its answer line. */
static void dev_broker_command(struct dev_broker *broker, char *line)
{
    char *w[3 + DEV_BROKER_MAX_ERRORS];
    int n = dev_broker_split(line, w, (int)(sizeof(w) / sizeof(w[0])));
    int32_t id;
    long v;

    if (n == 0)
        return; /* blank lines get no answer, so that scripts may send them freely */
    if (n > (int)(sizeof(w) / sizeof(w[0]))) {
        dev_broker_reply("error too many words");
        return;
    }

    if (strcmp(w[0], "ping") == 0 && n == 1) {
        dev_broker_reply("ok");
    } else if ((strcmp(w[0], "down") == 0 || strcmp(w[0], "up") == 0) && n == 2) {
        if (dev_broker_parse_broker(w[1], &id) != 0) {
            dev_broker_reply("error bad broker id '%s'", w[1]);
            return;
        }
        dev_broker_reply_err(w[0][0] == 'd' ? rd_kafka_mock_broker_set_down(broker->cluster, id)
                                            : rd_kafka_mock_broker_set_up(broker->cluster, id));
        longpoll_wake_all(); /* a held Fetch learns of it now, as from a broker */
    } else if (strcmp(w[0], "rtt") == 0 && n == 3) {
        if (dev_broker_parse_broker(w[1], &id) != 0) {
            dev_broker_reply("error bad broker id '%s'", w[1]);
            return;
        }
        if (dev_broker_parse_int(w[2], 0, 3600 * 1000, &v) != 0) {
            dev_broker_reply("error bad milliseconds '%s'", w[2]);
            return;
        }
        dev_broker_reply_err(rd_kafka_mock_broker_set_rtt(broker->cluster, id, (int)v));
    } else if (strcmp(w[0], "errors") == 0 && n >= 4) {
        rd_kafka_resp_err_t errs[DEV_BROKER_MAX_ERRORS];
        int16_t key;
        int given = n - 3;

        if (dev_broker_parse_api(w[1], &key) != 0) {
            dev_broker_reply("error unknown API '%s'", w[1]);
            return;
        }
        if (dev_broker_parse_int(w[2], 1, DEV_BROKER_MAX_ERRORS, &v) != 0) {
            dev_broker_reply("error bad count '%s' (1..%d)", w[2], DEV_BROKER_MAX_ERRORS);
            return;
        }
        if (given != 1 && given != v) {
            dev_broker_reply("error give one ERROR or exactly COUNT of them");
            return;
        }
        for (long i = 0; i < v; i++) {
            const char *name = w[3 + (given == 1 ? 0 : i)];
            if (dev_broker_parse_error(name, &errs[i]) != 0) {
                dev_broker_reply("error unknown error name '%s'", name);
                return;
            }
        }
        rd_kafka_mock_push_request_errors_array(broker->cluster, key, (size_t)v, errs);
        dev_broker_reply("ok");
        longpoll_wake_all();
    } else if (strcmp(w[0], "clear") == 0 && n == 2) {
        int16_t key;
        if (dev_broker_parse_api(w[1], &key) != 0) {
            dev_broker_reply("error unknown API '%s'", w[1]);
            return;
        }
        rd_kafka_mock_clear_request_errors(broker->cluster, key);
        dev_broker_reply("ok");
    } else if (strcmp(w[0], "topic") == 0 && n == 3) {
        if (!dev_broker_topic_name_valid(w[1], strlen(w[1]))) {
            dev_broker_reply("error bad topic name '%s'", w[1]);
            return;
        }
        if (dev_broker_parse_int(w[2], 1, DEV_BROKER_MAX_PARTITIONS, &v) != 0) {
            dev_broker_reply("error bad partition count '%s'", w[2]);
            return;
        }
        dev_broker_reply_err(
            rd_kafka_mock_topic_create(broker->cluster, w[1], (int)v, broker->replication_factor));
    } else if (strcmp(w[0], "topic-error") == 0 && n == 3) {
        rd_kafka_resp_err_t err;
        if (!dev_broker_topic_name_valid(w[1], strlen(w[1]))) {
            dev_broker_reply("error bad topic name '%s'", w[1]);
            return;
        }
        if (dev_broker_parse_error(w[2], &err) != 0) {
            dev_broker_reply("error unknown error name '%s'", w[2]);
            return;
        }
        rd_kafka_mock_topic_set_error(broker->cluster, w[1], err);
        dev_broker_reply("ok");
        longpoll_wake_all();
    } else if (strcmp(w[0], "leader") == 0 && n == 4) {
        long partition;
        if (!dev_broker_topic_name_valid(w[1], strlen(w[1]))) {
            dev_broker_reply("error bad topic name '%s'", w[1]);
            return;
        }
        if (dev_broker_parse_int(w[2], 0, DEV_BROKER_MAX_PARTITIONS, &partition) != 0) {
            dev_broker_reply("error bad partition '%s'", w[2]);
            return;
        }
        if (dev_broker_parse_int(w[3], -1, INT32_MAX, &v) != 0) {
            dev_broker_reply("error bad broker id '%s'", w[3]);
            return;
        }
        dev_broker_reply_err(rd_kafka_mock_partition_set_leader(broker->cluster, w[1],
                                                                (int32_t)partition, (int32_t)v));
        longpoll_wake_all();
    } else {
        dev_broker_reply("error unknown command or wrong number of arguments: '%s'", w[0]);
    }
}

static void dev_broker_stdin_cb(struct ev_loop *loop, ev_io *watcher, int revents)
{
    struct dev_broker *broker = watcher->data;
    char buf[4096];
    ssize_t got = read(watcher->fd, buf, sizeof(buf));

    if (got < 0 && (errno == EAGAIN || errno == EINTR))
        return;
    if (got <= 0) {
        /* End of the control channel, not of the broker: keep serving until a signal. */
        ev_io_stop(loop, watcher);
        return;
    }
    for (ssize_t i = 0; i < got; i++) {
        if (buf[i] == '\n') {
            if (broker->line_too_long)
                dev_broker_reply("error line longer than %d bytes", DEV_BROKER_LINE_MAX);
            else {
                broker->line[broker->line_len] = '\0';
                dev_broker_command(broker, broker->line);
            }
            broker->line_len = 0;
            broker->line_too_long = 0;
        } else if (broker->line_len < DEV_BROKER_LINE_MAX) {
            broker->line[broker->line_len++] = buf[i];
        } else {
            broker->line_too_long = 1;
        }
    }
}

static void dev_broker_signal_cb(struct ev_loop *loop, ev_signal *watcher, int revents)
{
    ev_break(loop, EVBREAK_ALL);
}

/* ---- start and stop ---------------------------------------------------------------------- */

/* Returns 0 if 127.0.0.1:port can be bound now, else -1 (message printed). */
static int dev_broker_port_free(int port)
{
    struct sockaddr_in addr = {.sin_family = AF_INET,
                               .sin_port = htons((uint16_t)port),
                               .sin_addr = {.s_addr = htonl(INADDR_LOOPBACK)}};
    int on = 1;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int rc = -1;

    if (fd < 0) {
        fprintf(stderr, "dev-broker: socket: %s\n", strerror(errno));
        return -1;
    }
    if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, sizeof(on)) != 0 ||
        bind(fd, (struct sockaddr *)&addr, sizeof(addr)) != 0)
        fprintf(stderr, "dev-broker: --port %d: cannot listen on 127.0.0.1:%d: %s\n", port, port,
                strerror(errno));
    else
        rc = 0;
    close(fd);
    return rc;
}

/* Creates the mock cluster and the requested topics. Returns 0 or -1 (message printed). */
__attribute__((warn_unused_result)) static int
dev_broker_start(struct dev_broker *broker, const struct dev_broker_options *opts)
{
    char errstr[512];
    rd_kafka_conf_t *conf = rd_kafka_conf_new();

    rd_kafka_conf_set_log_cb(conf, dev_broker_log_cb);
    /* rd_kafka_new() takes ownership of conf only on success. */
    broker->rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof(errstr));
    if (!broker->rk) {
        rd_kafka_conf_destroy(conf);
        fprintf(stderr, "dev-broker: cannot create the librdkafka handle: %s\n", errstr);
        return -1;
    }

    /* librdkafka 2.0.2 asserts (aborts) when a mock listener cannot bind, so a busy --port is
     * detected here first, with the same SO_REUSEADDR the mock sets. */
    if (opts->port && dev_broker_port_free(opts->port) != 0)
        return -1;

    nodelay_set_enabled(opts->nodelay);
    if (opts->long_poll) {
        /* Fatal: without it the dev setup's consumers (librdkafka's 500 ms fetch wait) would
         * wait up to half a second per hop, and only this message would say why. */
        if (longpoll_start() != 0)
            return -1;
        nodelay_set_accept_hook(longpoll_wrap);
    }

    atomic_store(&requested_port, opts->port);
    broker->cluster = rd_kafka_mock_cluster_new(broker->rk, opts->brokers);
    atomic_store(&requested_port, 0);
    if (!broker->cluster) {
        if (opts->port)
            fprintf(stderr, "dev-broker: cannot listen on 127.0.0.1:%d (in use?)\n", opts->port);
        else
            fprintf(stderr, "dev-broker: cannot start the mock cluster\n");
        return -1;
    }
    broker->replication_factor = opts->brokers < 3 ? opts->brokers : 3;

    for (size_t i = 0; i < opts->topic_count; i++) {
        const struct dev_broker_topic *topic = &opts->topics[i];
        int partitions = topic->partitions ? topic->partitions : opts->partitions;
        rd_kafka_resp_err_t err = rd_kafka_mock_topic_create(
            broker->cluster, topic->name, partitions, broker->replication_factor);
        if (err) {
            fprintf(stderr, "dev-broker: --topic %s: %s\n", topic->name, rd_kafka_err2str(err));
            return -1;
        }
    }
    return 0;
}

static void dev_broker_stop(struct dev_broker *broker)
{
    if (broker->cluster)
        rd_kafka_mock_cluster_destroy(broker->cluster);
    broker->cluster = NULL;
    if (broker->rk)
        rd_kafka_destroy(broker->rk);
    broker->rk = NULL;
}

int main(int argc, char **argv)
{
    struct dev_broker_options opts;
    struct dev_broker broker;
    const char *bootstraps;
    size_t first_len;
    int status = dev_broker_parse_args(argc, argv, &opts);

    if (status != 0)
        goto out;
    if (opts.help) {
        dev_broker_usage(stdout);
        goto out;
    }

    fprintf(stderr, "dev-broker: DEVELOPMENT TOOL, NOT A KAFKA BROKER FOR PRODUCTION. This is "
                    "librdkafka's in-memory mock cluster: nothing is persisted and each "
                    "partition keeps only its last ~5 MB.\n");

    /* A control-channel reader that went away must not kill the broker. */
    signal(SIGPIPE, SIG_IGN);

    memset(&broker, 0, sizeof(broker));
    /* Signal watchers first: a SIGTERM during start-up then still ends in a clean exit 0. */
    broker.loop = ev_default_loop(0);
    if (!broker.loop) {
        fprintf(stderr, "dev-broker: cannot initialise libev\n");
        status = 1;
        goto out;
    }
    ev_signal_init(&broker.sigterm_watcher, dev_broker_signal_cb, SIGTERM);
    ev_signal_init(&broker.sigint_watcher, dev_broker_signal_cb, SIGINT);
    ev_signal_start(broker.loop, &broker.sigterm_watcher);
    ev_signal_start(broker.loop, &broker.sigint_watcher);
    if (dev_broker_start(&broker, &opts) != 0) {
        dev_broker_stop(&broker);
        status = 1;
        goto out;
    }

    if (fcntl(STDIN_FILENO, F_GETFD) != -1) {
        ev_io_init(&broker.stdin_watcher, dev_broker_stdin_cb, STDIN_FILENO, EV_READ);
        broker.stdin_watcher.data = &broker;
        ev_io_start(broker.loop, &broker.stdin_watcher);
    }

    /* Listeners are bound and listening once rd_kafka_mock_cluster_new() returns: ready. */
    bootstraps = rd_kafka_mock_cluster_bootstraps(broker.cluster);
    first_len = strcspn(bootstraps, ",");
    fprintf(stderr, "dev-broker: %d broker(s): %s\n", opts.brokers, bootstraps);
    dev_broker_reply("bootstrap=%.*s", (int)first_len, bootstraps);

    ev_run(broker.loop, 0);

    /* No rd_kafka_mock_cluster_destroy() here: in librdkafka 2.0.2 it takes a full second
     * (its thread finishes a poll timeout), and the cluster holds nothing worth saving. The
     * process ends at once instead, without running exit handlers while librdkafka's threads
     * are still alive. */
    fprintf(stderr, "dev-broker: stopping\n");
    fflush(stdout);
    fflush(stderr);
    _exit(0);
out:
    for (size_t i = 0; i < opts.topic_count; i++)
        free(opts.topics[i].name);
    free(opts.topics);
    return status;
}
