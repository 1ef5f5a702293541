/* dev-broker (tools/dev-broker.c) and its TCP_NODELAY interposer (tools/nodelay.c).
 *
 * The interposer is linked into this test executable too, so an in-process mock cluster gets
 * the same accept() as dev-broker. The server-side sockets are then found in /proc/self/fd and
 * their TCP_NODELAY read back with getsockopt(). The last tests run the real binary, whose
 * path meson passes in DEV_BROKER. Every wait has a deadline; nothing sleeps to synchronise. */
#include <criterion/criterion.h>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <librdkafka/rdkafka.h>
#include <librdkafka/rdkafka_mock.h>

#include "nodelay.h"

#define WAIT_MS 30000 /* generous: CI machines are slow, but every wait ends */

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* A topic name no test run has used before: auto-creation must happen in this test. */
static void unique_topic(char *buf, size_t size, const char *what)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    snprintf(buf, size, "%s-%ld-%ld-%ld", what, (long)getpid(), (long)ts.tv_sec, (long)ts.tv_nsec);
}

/* Port of the first "127.0.0.1:PORT" in a bootstrap list. */
static int bootstrap_port(const char *bootstraps)
{
    const char *colon = strchr(bootstraps, ':');
    cr_assert_not_null(colon, "no port in '%s'", bootstraps);
    return atoi(colon + 1);
}

/* ---- in-process mock cluster --------------------------------------------------------------
 */

struct mock {
    rd_kafka_t *rk;
    rd_kafka_mock_cluster_t *cluster;
    const char *bootstraps; /* owned by cluster */
};

static void mock_start(struct mock *mock)
{
    char errstr[256];
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    cr_assert_eq(rd_kafka_conf_set(conf, "log_level", "3", errstr, sizeof(errstr)),
                 RD_KAFKA_CONF_OK);
    mock->rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof(errstr));
    cr_assert_not_null(mock->rk, "%s", errstr);
    mock->cluster = rd_kafka_mock_cluster_new(mock->rk, 1);
    cr_assert_not_null(mock->cluster);
    mock->bootstraps = rd_kafka_mock_cluster_bootstraps(mock->cluster);
}

static void mock_stop(struct mock *mock)
{
    rd_kafka_mock_cluster_destroy(mock->cluster);
    rd_kafka_destroy(mock->rk);
}

/* Connects to 127.0.0.1:port, sends an ApiVersions v0 request and waits for the whole
 * response. Once it has arrived the broker has certainly accepted the connection. Returns the
 * connected socket (the caller closes it). */
static int connect_and_roundtrip(int port)
{
    static const unsigned char request[] = {
        0, 0,  0,   12, /* size of what follows */
        0, 18,          /* ApiKey: ApiVersions */
        0, 0,           /* ApiVersion 0 */
        0, 0,  0,   7,  /* CorrelationId */
        0, 2,  't', 'c' /* ClientId */
    };
    struct sockaddr_in addr = {.sin_family = AF_INET,
                               .sin_port = htons((uint16_t)port),
                               .sin_addr = {.s_addr = htonl(INADDR_LOOPBACK)}};
    unsigned char header[8];
    size_t have = 0;
    int64_t deadline = now_ms() + WAIT_MS;
    int fd = socket(AF_INET, SOCK_STREAM, 0);

    cr_assert_geq(fd, 0);
    cr_assert_eq(connect(fd, (struct sockaddr *)&addr, sizeof(addr)), 0, "connect: %s",
                 strerror(errno));
    cr_assert_eq(write(fd, request, sizeof(request)), (ssize_t)sizeof(request));

    /* Size + CorrelationId first, then the rest of the body. */
    size_t want = sizeof(header);
    size_t body = 0;
    while (have < want) {
        struct pollfd pfd = {.fd = fd, .events = POLLIN};
        int left = (int)(deadline - now_ms());
        cr_assert_gt(left, 0, "no ApiVersions response within %d ms", WAIT_MS);
        if (poll(&pfd, 1, left) <= 0)
            continue;
        unsigned char buf[4096];
        size_t room = want - have < sizeof(buf) ? want - have : sizeof(buf);
        ssize_t got = read(fd, buf, room);
        cr_assert_gt(got, 0, "broker closed the connection");
        if (have < sizeof(header))
            memcpy(header + have, buf,
                   (size_t)got < sizeof(header) - have ? (size_t)got : sizeof(header) - have);
        have += (size_t)got;
        if (have >= sizeof(header) && body == 0) {
            body = ((size_t)header[0] << 24) | ((size_t)header[1] << 16) |
                   ((size_t)header[2] << 8) | header[3];
            want = 4 + body;
            cr_assert_eq(header[7], 7, "CorrelationId not echoed");
        }
    }
    return fd;
}

struct server_sockets {
    int count;   /* accepted (non-listening) TCP sockets bound to the broker's port */
    int nodelay; /* how many of them have TCP_NODELAY */
};

/* Scans this process's descriptors for the broker's side of connections to `port`. */
static struct server_sockets find_server_sockets(int port)
{
    struct server_sockets found = {0, 0};
    DIR *dir = opendir("/proc/self/fd");
    struct dirent *entry;

    cr_assert_not_null(dir);
    while ((entry = readdir(dir)) != NULL) {
        int fd = atoi(entry->d_name);
        struct sockaddr_in local;
        socklen_t len = sizeof(local);
        int listening = 0, on = 0;
        socklen_t optlen = sizeof(int);

        if (entry->d_name[0] == '.' || fd == dirfd(dir))
            continue;
        if (getsockname(fd, (struct sockaddr *)&local, &len) != 0 || local.sin_family != AF_INET ||
            ntohs(local.sin_port) != port)
            continue;
        if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &optlen) != 0 || listening)
            continue;
        optlen = sizeof(int);
        cr_assert_eq(getsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &on, &optlen), 0);
        found.count++;
        if (on)
            found.nodelay++;
    }
    closedir(dir);
    return found;
}

Test(dev_broker, accepted_sockets_have_nodelay)
{
    struct mock mock;
    mock_start(&mock);
    int port = bootstrap_port(mock.bootstraps);

    int client = connect_and_roundtrip(port);
    struct server_sockets found = find_server_sockets(port);
    cr_assert_eq(found.count, 1, "expected the one accepted socket, found %d", found.count);
    cr_assert_eq(found.nodelay, 1, "accepted socket lacks TCP_NODELAY");

    close(client);
    mock_stop(&mock);
}

/* Control case: the same check with the interposer switched off must see Nagle still on,
 * which shows that the socket option comes from nodelay.c and not from librdkafka. */
Test(dev_broker, without_interposer_nagle_stays_on)
{
    struct mock mock;
    nodelay_set_enabled(0);
    mock_start(&mock);
    int port = bootstrap_port(mock.bootstraps);

    int client = connect_and_roundtrip(port);
    struct server_sockets found = find_server_sockets(port);
    cr_assert_eq(found.count, 1);
    cr_assert_eq(found.nodelay, 0);

    close(client);
    mock_stop(&mock);
}

/* ---- librdkafka clients --------------------------------------------------------------------
 */

static rd_kafka_t *client_new(rd_kafka_type_t type, const char *bootstraps, const char *group)
{
    char errstr[256];
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    const char *settings[][2] = {
        {"bootstrap.servers", bootstraps},
        {"log_level", "3"},
        {"socket.nagle.disable", "true"},
    };
    for (size_t i = 0; i < sizeof(settings) / sizeof(settings[0]); i++)
        cr_assert_eq(
            rd_kafka_conf_set(conf, settings[i][0], settings[i][1], errstr, sizeof(errstr)),
            RD_KAFKA_CONF_OK, "%s", errstr);
    if (type == RD_KAFKA_CONSUMER) {
        cr_assert_eq(rd_kafka_conf_set(conf, "group.id", group, errstr, sizeof(errstr)),
                     RD_KAFKA_CONF_OK);
        cr_assert_eq(
            rd_kafka_conf_set(conf, "auto.offset.reset", "earliest", errstr, sizeof(errstr)),
            RD_KAFKA_CONF_OK);
        cr_assert_eq(rd_kafka_conf_set(conf, "enable.auto.commit", "false", errstr, sizeof(errstr)),
                     RD_KAFKA_CONF_OK);
    } else {
        cr_assert_eq(rd_kafka_conf_set(conf, "message.timeout.ms", "20000", errstr, sizeof(errstr)),
                     RD_KAFKA_CONF_OK);
    }
    rd_kafka_t *rk = rd_kafka_new(type, conf, errstr, sizeof(errstr));
    cr_assert_not_null(rk, "%s", errstr);
    if (type == RD_KAFKA_CONSUMER)
        rd_kafka_poll_set_consumer(rk);
    return rk;
}

static void dr_cb(rd_kafka_t *rk, const rd_kafka_message_t *msg, void *opaque)
{
    *(rd_kafka_resp_err_t *)msg->_private = msg->err;
}

/* Produces one message to topic (partition 0) and waits for its delivery report. Returns the
 * delivery error. */
static rd_kafka_resp_err_t produce_one(const char *bootstraps, const char *topic,
                                       const char *payload)
{
    char errstr[256];
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    const char *settings[][2] = {
        {"bootstrap.servers", bootstraps},
        {"log_level", "3"},
        {"message.timeout.ms", "20000"},
    };
    for (size_t i = 0; i < sizeof(settings) / sizeof(settings[0]); i++)
        cr_assert_eq(
            rd_kafka_conf_set(conf, settings[i][0], settings[i][1], errstr, sizeof(errstr)),
            RD_KAFKA_CONF_OK, "%s", errstr);
    rd_kafka_conf_set_dr_msg_cb(conf, dr_cb);
    rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof(errstr));
    cr_assert_not_null(rk, "%s", errstr);

    rd_kafka_resp_err_t delivery = RD_KAFKA_RESP_ERR__IN_PROGRESS;
    cr_assert_eq(rd_kafka_producev(rk, RD_KAFKA_V_TOPIC(topic), RD_KAFKA_V_PARTITION(0),
                                   RD_KAFKA_V_VALUE((void *)payload, strlen(payload)),
                                   RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
                                   RD_KAFKA_V_OPAQUE(&delivery), RD_KAFKA_V_END),
                 RD_KAFKA_RESP_ERR_NO_ERROR);
    /* message.timeout.ms bounds this: a report (success or error) always comes. */
    cr_assert_eq(rd_kafka_flush(rk, WAIT_MS), RD_KAFKA_RESP_ERR_NO_ERROR, "flush timed out");
    cr_assert_neq(delivery, RD_KAFKA_RESP_ERR__IN_PROGRESS);
    rd_kafka_destroy(rk);
    return delivery;
}

/* Reads from topic until a message with payload arrives. subscribe: join a group (like the
 * relay does) instead of assigning partition 0 directly. */
static void consume_expect(const char *bootstraps, const char *topic, const char *payload,
                           int subscribe)
{
    char group[128];
    unique_topic(group, sizeof(group), "group");
    rd_kafka_t *rk = client_new(RD_KAFKA_CONSUMER, bootstraps, group);
    rd_kafka_topic_partition_list_t *list = rd_kafka_topic_partition_list_new(1);

    if (subscribe) {
        rd_kafka_topic_partition_list_add(list, topic, RD_KAFKA_PARTITION_UA);
        cr_assert_eq(rd_kafka_subscribe(rk, list), RD_KAFKA_RESP_ERR_NO_ERROR);
    } else {
        rd_kafka_topic_partition_list_add(list, topic, 0)->offset = RD_KAFKA_OFFSET_BEGINNING;
        cr_assert_eq(rd_kafka_assign(rk, list), RD_KAFKA_RESP_ERR_NO_ERROR);
    }
    rd_kafka_topic_partition_list_destroy(list);

    int64_t deadline = now_ms() + WAIT_MS;
    int found = 0;
    while (!found && now_ms() < deadline) {
        rd_kafka_message_t *msg = rd_kafka_consumer_poll(rk, 200);
        if (!msg)
            continue;
        if (!msg->err && msg->len == strlen(payload) &&
            memcmp(msg->payload, payload, msg->len) == 0)
            found = 1;
        rd_kafka_message_destroy(msg);
    }
    cr_assert(found, "message '%s' not consumed from %s within %d ms", payload, topic, WAIT_MS);
    rd_kafka_consumer_close(rk);
    rd_kafka_destroy(rk);
}

Test(dev_broker, unknown_topic_is_created_on_first_produce)
{
    struct mock mock;
    char topic[128];
    mock_start(&mock);
    unique_topic(topic, sizeof(topic), "fresh");

    cr_assert_eq(produce_one(mock.bootstraps, topic, "hello"), RD_KAFKA_RESP_ERR_NO_ERROR);
    consume_expect(mock.bootstraps, topic, "hello", 0);

    /* The mock's default for auto-created topics, which dev-broker documents. */
    rd_kafka_t *rk = client_new(RD_KAFKA_PRODUCER, mock.bootstraps, NULL);
    rd_kafka_topic_t *rkt = rd_kafka_topic_new(rk, topic, NULL);
    const rd_kafka_metadata_t *md = NULL;
    cr_assert_eq(rd_kafka_metadata(rk, 0, rkt, &md, WAIT_MS), RD_KAFKA_RESP_ERR_NO_ERROR);
    cr_assert_eq(md->topic_cnt, 1);
    cr_assert_eq(md->topics[0].partition_cnt, 4);
    rd_kafka_metadata_destroy(md);
    rd_kafka_topic_destroy(rkt);
    rd_kafka_destroy(rk);

    mock_stop(&mock);
}

/* ---- the real binary ----------------------------------------------------------------------
 */

struct child {
    pid_t pid;
    int in;  /* write end of its stdin */
    int out; /* read end of its stdout */
    int err; /* read end of its stderr, or -1 when not captured */
    char buf[4096];
    size_t len;
};

static const char *dev_broker_path(void)
{
    const char *path = getenv("DEV_BROKER");
    cr_assert_not_null(path, "DEV_BROKER (path of the dev-broker binary) is not set");
    return path;
}

/* Starts dev-broker with pipes on stdin and stdout. Its stderr is piped only when
 * capture_stderr is set (a pipe nobody drains could fill up and block it), else shared. */
static void child_start(struct child *child, char *const argv[], int capture_stderr)
{
    int in[2], out[2], err[2] = {-1, -1};
    cr_assert_eq(pipe2(in, O_CLOEXEC), 0);
    cr_assert_eq(pipe2(out, O_CLOEXEC), 0);
    if (capture_stderr)
        cr_assert_eq(pipe2(err, O_CLOEXEC), 0);
    pid_t parent = getpid();
    child->pid = fork();
    cr_assert_geq(child->pid, 0);
    if (child->pid == 0) {
        /* If the test dies on a failed assertion the broker must not outlive it. */
        prctl(PR_SET_PDEATHSIG, SIGTERM);
        if (getppid() != parent)
            _exit(127);
        dup2(in[0], STDIN_FILENO);
        dup2(out[1], STDOUT_FILENO);
        if (capture_stderr)
            dup2(err[1], STDERR_FILENO);
        execv(dev_broker_path(), argv);
        _exit(127);
    }
    close(in[0]);
    close(out[1]);
    if (capture_stderr)
        close(err[1]);
    child->in = in[1];
    child->out = out[0];
    child->err = err[0];
    child->len = 0;
}

/* Reads one line of the child's stdout into line (without the newline), waiting at most
 * WAIT_MS. Returns 0, or -1 at end of file. */
static int child_read_line(struct child *child, char *line, size_t size)
{
    int64_t deadline = now_ms() + WAIT_MS;
    for (;;) {
        char *nl = memchr(child->buf, '\n', child->len);
        if (nl) {
            size_t n = (size_t)(nl - child->buf);
            cr_assert_lt(n, size);
            memcpy(line, child->buf, n);
            line[n] = '\0';
            memmove(child->buf, nl + 1, child->len - n - 1);
            child->len -= n + 1;
            return 0;
        }
        cr_assert_lt(child->len, sizeof(child->buf), "line too long");
        struct pollfd pfd = {.fd = child->out, .events = POLLIN};
        int left = (int)(deadline - now_ms());
        cr_assert_gt(left, 0, "dev-broker wrote no line within %d ms", WAIT_MS);
        if (poll(&pfd, 1, left) <= 0)
            continue;
        ssize_t got = read(child->out, child->buf + child->len, sizeof(child->buf) - child->len);
        cr_assert_geq(got, 0);
        if (got == 0)
            return -1;
        child->len += (size_t)got;
    }
}

/* Sends one control command and returns its answer line in answer. */
static void child_command(struct child *child, const char *command, char *answer, size_t size)
{
    size_t len = strlen(command);
    cr_assert_eq(write(child->in, command, len), (ssize_t)len);
    cr_assert_eq(write(child->in, "\n", 1), 1);
    cr_assert_eq(child_read_line(child, answer, size), 0, "no answer to '%s'", command);
}

/* Waits for the child to exit: its stdout reaching end of file (bounded) means it is gone or
 * going, then waitpid() collects it. Returns the wait status. */
static int child_wait(struct child *child)
{
    char line[512];
    int status = 0;
    while (child_read_line(child, line, sizeof(line)) == 0)
        ; /* discard anything left */
    cr_assert_eq(waitpid(child->pid, &status, 0), child->pid);
    close(child->in);
    close(child->out);
    return status;
}

/* Everything the child wrote to its captured stderr (it must have exited); closes it. */
static void child_stderr(struct child *child, char *text, size_t size)
{
    size_t have = 0;
    ssize_t got;
    while (have + 1 < size && (got = read(child->err, text + have, size - 1 - have)) > 0)
        have += (size_t)got;
    text[have] = '\0';
    close(child->err);
}

Test(dev_broker, binary_serves_injects_errors_and_stops_on_sigterm)
{
    struct child child;
    char line[512], topic[128];
    char *const argv[] = {(char *)"dev-broker", (char *)"--topic", (char *)"preset:2", NULL};

    child_start(&child, argv, 0);
    cr_assert_eq(child_read_line(&child, line, sizeof(line)), 0, "no bootstrap line");
    cr_assert_eq(strncmp(line, "bootstrap=127.0.0.1:", 20), 0, "got '%s'", line);
    cr_assert_gt(atoi(line + 20), 0);
    const char *bootstraps = line + strlen("bootstrap=");
    char bs[512];
    snprintf(bs, sizeof(bs), "%s", bootstraps);

    /* Auto-create through the binary, consumed by a group member like the relay. */
    unique_topic(topic, sizeof(topic), "bin");
    cr_assert_eq(produce_one(bs, topic, "through-the-binary"), RD_KAFKA_RESP_ERR_NO_ERROR);
    consume_expect(bs, topic, "through-the-binary", 1);

    /* Control protocol: an injected non-retriable Produce error reaches the producer, once. */
    child_command(&child, "ping", line, sizeof(line));
    cr_assert_str_eq(line, "ok");
    child_command(&child, "errors Produce 1 TOPIC_AUTHORIZATION_FAILED", line, sizeof(line));
    cr_assert_str_eq(line, "ok");
    cr_assert_eq(produce_one(bs, "preset", "refused"),
                 RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED);
    cr_assert_eq(produce_one(bs, "preset", "accepted"), RD_KAFKA_RESP_ERR_NO_ERROR);
    child_command(&child, "topic preset 2", line, sizeof(line));
    cr_assert_eq(strncmp(line, "error TOPIC_ALREADY_EXISTS", 26), 0, "got '%s'", line);
    child_command(&child, "down 1", line, sizeof(line));
    cr_assert_str_eq(line, "ok");
    child_command(&child, "up 1", line, sizeof(line));
    cr_assert_str_eq(line, "ok");
    child_command(&child, "down 9", line, sizeof(line));
    cr_assert_eq(strncmp(line, "error ", 6), 0, "got '%s'", line);
    child_command(&child, "frobnicate", line, sizeof(line));
    cr_assert_eq(strncmp(line, "error ", 6), 0, "got '%s'", line);

    cr_assert_eq(kill(child.pid, SIGTERM), 0);
    int status = child_wait(&child);
    cr_assert(WIFEXITED(status), "dev-broker did not exit normally (status %d)", status);
    cr_assert_eq(WEXITSTATUS(status), 0);
}

Test(dev_broker, binary_listens_on_the_requested_port)
{
    /* Ask the kernel for a free port, release it, and hand it to dev-broker. */
    struct sockaddr_in addr = {.sin_family = AF_INET,
                               .sin_addr = {.s_addr = htonl(INADDR_LOOPBACK)}};
    socklen_t len = sizeof(addr);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    cr_assert_eq(bind(fd, (struct sockaddr *)&addr, sizeof(addr)), 0);
    cr_assert_eq(getsockname(fd, (struct sockaddr *)&addr, &len), 0);
    int port = ntohs(addr.sin_port);
    close(fd);

    struct child child;
    char line[512], port_text[16], expected[64];
    snprintf(port_text, sizeof(port_text), "%d", port);
    char *const argv[] = {(char *)"dev-broker", (char *)"--port", port_text, NULL};
    child_start(&child, argv, 0);
    cr_assert_eq(child_read_line(&child, line, sizeof(line)), 0, "no bootstrap line");
    snprintf(expected, sizeof(expected), "bootstrap=127.0.0.1:%d", port);
    cr_assert_str_eq(line, expected);

    cr_assert_eq(kill(child.pid, SIGINT), 0);
    int status = child_wait(&child);
    cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);
}

Test(dev_broker, binary_rejects_a_bad_flag_naming_it)
{
    struct child child;
    char text[2048];
    char *const argv[] = {(char *)"dev-broker", (char *)"--partitions", (char *)"0", NULL};
    child_start(&child, argv, 1);
    int status = child_wait(&child);
    cr_assert(WIFEXITED(status));
    cr_assert_eq(WEXITSTATUS(status), 2);
    child_stderr(&child, text, sizeof(text));
    cr_assert_not_null(strstr(text, "--partitions"), "stderr: %s", text);

    char *const argv2[] = {(char *)"dev-broker", (char *)"--bogus", NULL};
    child_start(&child, argv2, 1);
    status = child_wait(&child);
    cr_assert(WIFEXITED(status));
    cr_assert_eq(WEXITSTATUS(status), 2);
    child_stderr(&child, text, sizeof(text));
    cr_assert_not_null(strstr(text, "--bogus"), "stderr: %s", text);
}

/* librdkafka 2.0.2 aborts when a mock listener cannot bind; dev-broker must catch a busy
 * --port first and exit 1 with a message instead of dying on SIGABRT. */
Test(dev_broker, binary_reports_a_busy_port)
{
    struct sockaddr_in addr = {.sin_family = AF_INET,
                               .sin_addr = {.s_addr = htonl(INADDR_LOOPBACK)}};
    socklen_t len = sizeof(addr);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    cr_assert_eq(bind(fd, (struct sockaddr *)&addr, sizeof(addr)), 0);
    cr_assert_eq(listen(fd, 1), 0);
    cr_assert_eq(getsockname(fd, (struct sockaddr *)&addr, &len), 0);

    struct child child;
    char text[4096], port_text[16];
    snprintf(port_text, sizeof(port_text), "%d", ntohs(addr.sin_port));
    char *const argv[] = {(char *)"dev-broker", (char *)"--port", port_text, NULL};
    child_start(&child, argv, 1);
    int status = child_wait(&child);
    close(fd);
    cr_assert(WIFEXITED(status), "dev-broker died (status %d) instead of exiting", status);
    cr_assert_eq(WEXITSTATUS(status), 1);
    child_stderr(&child, text, sizeof(text));
    cr_assert_not_null(strstr(text, "--port"), "stderr: %s", text);
}

/* ---- long polling (tools/longpoll.c) -------------------------------------------------------
 */

/* A consumer of partition 0 of topic from its beginning, whose fetches wait up to wait_ms. */
static rd_kafka_t *waiting_consumer(const char *bootstraps, const char *topic, const char *wait_ms)
{
    char errstr[256];
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    const char *settings[][2] = {
        {"bootstrap.servers", bootstraps}, {"log_level", "3"},
        {"group.id", "longpoll"},          {"enable.auto.commit", "false"},
        {"fetch.wait.max.ms", wait_ms},    {"socket.timeout.ms", "120000"},
    };
    for (size_t i = 0; i < sizeof(settings) / sizeof(settings[0]); i++)
        cr_assert_eq(
            rd_kafka_conf_set(conf, settings[i][0], settings[i][1], errstr, sizeof(errstr)),
            RD_KAFKA_CONF_OK, "%s", errstr);
    rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_CONSUMER, conf, errstr, sizeof(errstr));
    cr_assert_not_null(rk, "%s", errstr);
    rd_kafka_poll_set_consumer(rk);
    rd_kafka_topic_partition_list_t *list = rd_kafka_topic_partition_list_new(1);
    rd_kafka_topic_partition_list_add(list, topic, 0)->offset = RD_KAFKA_OFFSET_BEGINNING;
    cr_assert_eq(rd_kafka_assign(rk, list), RD_KAFKA_RESP_ERR_NO_ERROR);
    rd_kafka_topic_partition_list_destroy(list);
    return rk;
}

/* Polls rk until a message with payload arrives or within_ms pass. Returns 1 if it came. */
static int consumed_within(rd_kafka_t *rk, const char *payload, int within_ms)
{
    int64_t deadline = now_ms() + within_ms;
    while (now_ms() < deadline) {
        rd_kafka_message_t *msg = rd_kafka_consumer_poll(rk, 100);
        if (!msg)
            continue;
        int match = !msg->err && msg->len == strlen(payload) &&
                    memcmp(msg->payload, payload, msg->len) == 0;
        rd_kafka_message_destroy(msg);
        if (match)
            return 1;
    }
    return 0;
}

/* Starts dev-broker with one --topic and puts its bootstrap address in bs. */
static void broker_start(struct child *child, const char *topic, char *bs, size_t size)
{
    char line[512];
    char *const argv[] = {(char *)"dev-broker", (char *)"--topic", (char *)topic, NULL};
    child_start(child, argv, 0);
    cr_assert_eq(child_read_line(child, line, sizeof(line)), 0, "no bootstrap line");
    snprintf(bs, size, "%s", line + strlen("bootstrap="));
}

/* Stops it with SIGTERM; it must exit 0. */
static void broker_stop(struct child *child)
{
    cr_assert_eq(kill(child->pid, SIGTERM), 0);
    int status = child_wait(child);
    cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);
}

/* DEV_BROKER_LONG_POLL and DEV_BROKER_NODELAY are switches: a value that is none of 1/0,
 * on/off, true/false, yes/no is refused with the variable named, rather than taken as on. */
Test(dev_broker, binary_rejects_a_bad_switch_in_the_environment_naming_it)
{
    static const char *const names[] = {"DEV_BROKER_LONG_POLL", "DEV_BROKER_NODELAY"};
    char *const argv[] = {(char *)"dev-broker", NULL};
    struct child child;
    char text[2048];
    for (size_t i = 0; i < 2; i++) {
        cr_assert_eq(setenv(names[i], "disabled", 1), 0);
        child_start(&child, argv, 1);
        int status = child_wait(&child);
        cr_assert(WIFEXITED(status));
        cr_assert_eq(WEXITSTATUS(status), 2, "%s=disabled: exit %d", names[i], WEXITSTATUS(status));
        child_stderr(&child, text, sizeof(text));
        cr_assert_not_null(strstr(text, names[i]), "stderr: %s", text);
        cr_assert_not_null(strstr(text, "\"disabled\""), "stderr: %s", text);

        /* The words are accepted. */
        cr_assert_eq(setenv(names[i], "Off", 1), 0);
        char bs[256];
        broker_start(&child, "switch-test", bs, sizeof(bs));
        broker_stop(&child);
        cr_assert_eq(unsetenv(names[i]), 0);
    }
}

/* The mock alone answers a Fetch that finds nothing only after its whole MaxWait, even when a
 * message arrives meanwhile; dev-broker answers it when the message arrives, like Kafka. The
 * consumer waits up to 60 s per fetch: the second message must come long before that. (The
 * first one only puts the consumer's next fetch in wait at the broker.) */
Test(dev_broker, binary_answers_a_waiting_fetch_when_data_arrives, .timeout = 120)
{
    struct child child;
    char bs[512];
    broker_start(&child, "waiting:1", bs, sizeof(bs));

    rd_kafka_t *rk = waiting_consumer(bs, "waiting", "60000");
    cr_assert_eq(produce_one(bs, "waiting", "first"), RD_KAFKA_RESP_ERR_NO_ERROR);
    cr_assert(consumed_within(rk, "first", WAIT_MS), "first message not consumed");
    cr_assert_eq(produce_one(bs, "waiting", "second"), RD_KAFKA_RESP_ERR_NO_ERROR);
    cr_assert(consumed_within(rk, "second", 20000),
              "the second message waited for the fetch's MaxWait (60 s)");

    rd_kafka_destroy(rk);
    broker_stop(&child);
}

/* ---- the Kafka protocol by hand: what a held Fetch looks like on the wire ------------------ */

struct wire {
    unsigned char data[512];
    size_t len;
};

static void wire_put(struct wire *w, uint64_t v, int bytes)
{
    cr_assert_leq(w->len + (size_t)bytes, sizeof(w->data));
    for (int i = bytes - 1; i >= 0; i--)
        w->data[w->len++] = (unsigned char)(v >> (8 * i));
}

static void wire_str(struct wire *w, const char *text)
{
    size_t n = strlen(text);
    wire_put(w, n, 2);
    cr_assert_leq(w->len + n, sizeof(w->data));
    memcpy(w->data + w->len, text, n);
    w->len += n;
}

/* Appends one request frame: header v1 (client id "t") then body. */
static void wire_frame(struct wire *out, int api_key, int version, int32_t correlation_id,
                       const struct wire *body)
{
    struct wire h = {.len = 0};
    wire_put(&h, (uint64_t)api_key, 2);
    wire_put(&h, (uint64_t)version, 2);
    wire_put(&h, (uint32_t)correlation_id, 4);
    wire_str(&h, "t");
    wire_put(out, h.len + body->len, 4);
    cr_assert_leq(out->len + h.len + body->len, sizeof(out->data));
    memcpy(out->data + out->len, h.data, h.len);
    out->len += h.len;
    memcpy(out->data + out->len, body->data, body->len);
    out->len += body->len;
}

/* A Fetch v11 of partition 0 of topic from offset 0, waiting up to max_wait_ms for data. */
static void wire_fetch(struct wire *out, int32_t correlation_id, const char *topic,
                       int32_t max_wait_ms)
{
    struct wire b = {.len = 0};
    wire_put(&b, (uint32_t)-1, 4); /* ReplicaId */
    wire_put(&b, (uint32_t)max_wait_ms, 4);
    wire_put(&b, 1, 4);            /* MinBytes */
    wire_put(&b, 1 << 20, 4);      /* MaxBytes */
    wire_put(&b, 0, 1);            /* IsolationLevel */
    wire_put(&b, 0, 4);            /* SessionId */
    wire_put(&b, (uint32_t)-1, 4); /* SessionEpoch */
    wire_put(&b, 1, 4);            /* [Topics] */
    wire_str(&b, topic);
    wire_put(&b, 1, 4);            /* [Partitions] */
    wire_put(&b, 0, 4);            /* Partition */
    wire_put(&b, (uint32_t)-1, 4); /* CurrentLeaderEpoch */
    wire_put(&b, 0, 8);            /* FetchOffset */
    wire_put(&b, (uint64_t)-1, 8); /* LogStartOffset */
    wire_put(&b, 1 << 20, 4);      /* PartitionMaxBytes */
    wire_put(&b, 0, 4);            /* [ForgottenTopics] */
    wire_str(&b, "");              /* RackId */
    wire_frame(out, 1, 11, correlation_id, &b);
}

static void wire_api_versions(struct wire *out, int32_t correlation_id)
{
    struct wire empty = {.len = 0};
    wire_frame(out, 18, 0, correlation_id, &empty);
}

/* Reads one answer frame (without its size) into buf within within_ms. Returns its length, or
 * -1 when nothing complete came in time. */
static ssize_t wire_read(int fd, unsigned char *buf, size_t size, int within_ms)
{
    int64_t deadline = now_ms() + within_ms;
    unsigned char sz[4];
    size_t have = 0, want = 4, len = 0;
    while (have < want) {
        struct pollfd pfd = {.fd = fd, .events = POLLIN};
        int left = (int)(deadline - now_ms());
        if (left <= 0 || poll(&pfd, 1, left) <= 0)
            return -1;
        ssize_t got =
            want == 4 ? read(fd, sz + have, 4 - have) : read(fd, buf + (have - 4), want - have);
        cr_assert_gt(got, 0, "broker closed the connection");
        have += (size_t)got;
        if (want == 4 && have == 4) {
            len = ((size_t)sz[0] << 24) | ((size_t)sz[1] << 16) | ((size_t)sz[2] << 8) | sz[3];
            cr_assert_leq(len, size, "answer of %zu bytes", len);
            want = 4 + len;
        }
    }
    return (ssize_t)len;
}

static int64_t wire_get(const unsigned char *p, int bytes)
{
    uint64_t v = 0;
    for (int i = 0; i < bytes; i++)
        v = (v << 8) | p[i];
    if (bytes < 8 && (v >> (8 * bytes - 1)) & 1)
        v |= ~(uint64_t)0 << (8 * bytes);
    return (int64_t)v;
}

/* The parts of a Fetch v11 answer of one partition of topic that the tests look at. */
struct fetch_answer {
    int32_t correlation_id;
    int16_t error; /* the partition's */
    int64_t high_watermark;
    int32_t records; /* bytes of records; -1 or 0: none */
};

static struct fetch_answer wire_fetch_answer(const unsigned char *a, size_t len, const char *topic)
{
    size_t t = strlen(topic);
    /* CorrelationId, ThrottleTime, ErrorCode, SessionId, [Topics], Topic, [Partitions],
     * Partition, ErrorCode, HighWatermark, LastStable, LogStart, [Aborted], PreferredReplica,
     * Records. */
    size_t at_partition = 4 + 4 + 2 + 4 + 4 + 2 + t + 4;
    cr_assert_geq(len, at_partition + 4 + 2 + 8 + 8 + 8 + 4 + 4 + 4, "short Fetch answer");
    cr_assert_eq(wire_get(a + 14, 4), 1, "one topic expected");
    cr_assert_eq(memcmp(a + 20, topic, t), 0);
    const unsigned char *p = a + at_partition + 4;
    struct fetch_answer f = {.correlation_id = (int32_t)wire_get(a, 4)};
    f.error = (int16_t)wire_get(p, 2);
    f.high_watermark = wire_get(p + 2, 8);
    int64_t aborted = wire_get(p + 2 + 24, 4);
    cr_assert_leq(aborted, 0, "aborted transactions in a non-transactional topic");
    f.records = (int32_t)wire_get(p + 2 + 24 + 4 + 4, 4);
    return f;
}

/* Connects to the broker of bs ("127.0.0.1:PORT") and sends a Fetch (correlation id 10) and,
 * behind it on the same connection, an ApiVersions (11). */
static int wire_fetch_then_api_versions(const char *bs, const char *topic, int32_t max_wait_ms)
{
    struct sockaddr_in addr = {.sin_family = AF_INET,
                               .sin_port = htons((uint16_t)bootstrap_port(bs)),
                               .sin_addr = {.s_addr = htonl(INADDR_LOOPBACK)}};
    struct wire out = {.len = 0};
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    cr_assert_geq(fd, 0);
    cr_assert_eq(connect(fd, (struct sockaddr *)&addr, sizeof(addr)), 0, "connect: %s",
                 strerror(errno));
    wire_fetch(&out, 10, topic, max_wait_ms);
    wire_api_versions(&out, 11);
    cr_assert_eq(write(fd, out.data, out.len), (ssize_t)out.len);
    return fd;
}

/* Reads the next answer on fd (bounded), which must be the Fetch's (correlation id 10); why
 * names what a missing answer means. */
static struct fetch_answer wire_expect_fetch(int fd, const char *topic, const char *why)
{
    unsigned char answer[8192];
    ssize_t len = wire_read(fd, answer, sizeof(answer), WAIT_MS);
    cr_assert_gt(len, 0, "%s", why);
    struct fetch_answer f = wire_fetch_answer(answer, (size_t)len, topic);
    cr_assert_eq(f.correlation_id, 10, "the first answer is not the Fetch's");
    return f;
}

/* Reads the next answer on fd (bounded), which must be the ApiVersions' behind the Fetch. */
static void wire_expect_api_versions(int fd)
{
    unsigned char answer[8192];
    ssize_t len = wire_read(fd, answer, sizeof(answer), WAIT_MS);
    cr_assert_geq(len, 4, "no answer to the ApiVersions behind the Fetch");
    cr_assert_eq(wire_get(answer, 4), 11);
}

/* A Fetch that finds nothing is held (no answer at all, where the mock behind a poll with
 * MaxWait 0 would answer at once), a Produce to its topic wakes it, and its answer carries the
 * record; the request pipelined behind it is answered after it. Fails with --no-long-poll (the
 * mock holds the Fetch its whole 60 s) and with a relay that answers empty Fetches at once. */
Test(dev_broker, binary_holds_an_empty_fetch_until_a_produce_and_keeps_answer_order)
{
    struct child child;
    char bs[512];
    unsigned char answer[8192];
    broker_start(&child, "held:1", bs, sizeof(bs));

    int fd = wire_fetch_then_api_versions(bs, "held", 60000);
    cr_assert_eq(wire_read(fd, answer, sizeof(answer), 300), -1,
                 "an answer came before any data: the empty Fetch was not held");
    cr_assert_eq(produce_one(bs, "held", "wake up"), RD_KAFKA_RESP_ERR_NO_ERROR);

    struct fetch_answer f =
        wire_expect_fetch(fd, "held", "the held Fetch was not answered after the Produce");
    cr_assert_eq(f.error, 0);
    cr_assert_eq(f.high_watermark, 1);
    cr_assert_gt(f.records, 0, "the Fetch was answered without the record");
    wire_expect_api_versions(fd);

    close(fd);
    broker_stop(&child);
}

/* A held Fetch that no data arrives for is answered, empty, when its MaxWait has passed, and
 * what followed it on the connection after it. */
Test(dev_broker, binary_answers_a_held_fetch_empty_at_its_max_wait)
{
    struct child child;
    char bs[512];
    unsigned char answer[8192];
    broker_start(&child, "quiet:1", bs, sizeof(bs));

    int fd = wire_fetch_then_api_versions(bs, "quiet", 5000);
    cr_assert_eq(wire_read(fd, answer, sizeof(answer), 300), -1,
                 "an answer came long before the Fetch's MaxWait");
    struct fetch_answer f = wire_expect_fetch(fd, "quiet", "the held Fetch was never answered");
    cr_assert_eq(f.error, 0);
    cr_assert_eq(f.high_watermark, 0);
    cr_assert_leq(f.records, 0, "records from an empty partition");
    wire_expect_api_versions(fd);

    close(fd);
    broker_stop(&child);
}

/* A held Fetch learns at once that its partition's leader moved (a control command, no
 * Produce): it is asked again and answered with the error, as a broker would. */
Test(dev_broker, binary_answers_a_held_fetch_when_its_leader_moves)
{
    struct child child;
    char line[512], bs[512];
    unsigned char answer[8192];
    char *const argv[] = {(char *)"dev-broker", (char *)"--brokers", (char *)"2",
                          (char *)"--topic",    (char *)"moving:1",  NULL};
    child_start(&child, argv, 0);
    cr_assert_eq(child_read_line(&child, line, sizeof(line)), 0, "no bootstrap line");
    snprintf(bs, sizeof(bs), "%s", line + strlen("bootstrap="));

    /* Partition 0 led by broker 1 (the bootstrap one), then moved to 2 while the Fetch waits. */
    child_command(&child, "leader moving 0 1", line, sizeof(line));
    cr_assert_str_eq(line, "ok");
    int fd = wire_fetch_then_api_versions(bs, "moving", 60000);
    cr_assert_eq(wire_read(fd, answer, sizeof(answer), 300), -1, "the Fetch was not held");
    child_command(&child, "leader moving 0 2", line, sizeof(line));
    cr_assert_str_eq(line, "ok");
    struct fetch_answer f =
        wire_expect_fetch(fd, "moving", "the held Fetch was not answered after its leader moved");
    cr_assert_neq(f.error, 0, "no error from a broker that no longer leads the partition");

    close(fd);
    broker_stop(&child);
}

/* A frame larger than any Kafka request closes the connection, and the broker says why. */
Test(dev_broker, binary_closes_a_connection_on_an_oversized_frame_and_says_so)
{
    struct child child;
    char line[512], text[8192];
    char *const argv[] = {(char *)"dev-broker", NULL};
    child_start(&child, argv, 1);
    cr_assert_eq(child_read_line(&child, line, sizeof(line)), 0, "no bootstrap line");
    struct sockaddr_in addr = {.sin_family = AF_INET,
                               .sin_port = htons((uint16_t)bootstrap_port(line + 10)),
                               .sin_addr = {.s_addr = htonl(INADDR_LOOPBACK)}};
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    cr_assert_eq(connect(fd, (struct sockaddr *)&addr, sizeof(addr)), 0);
    static const unsigned char huge[] = {0x7f, 0xff, 0xff, 0xff};
    cr_assert_eq(write(fd, huge, sizeof(huge)), (ssize_t)sizeof(huge));

    struct pollfd pfd = {.fd = fd, .events = POLLIN};
    cr_assert_eq(poll(&pfd, 1, WAIT_MS), 1, "the connection stayed open");
    unsigned char byte;
    cr_assert_eq(read(fd, &byte, 1), 0, "an answer instead of a closed connection");
    close(fd);

    cr_assert_eq(kill(child.pid, SIGTERM), 0);
    int status = child_wait(&child);
    cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    child_stderr(&child, text, sizeof(text));
    cr_assert_not_null(strstr(text, "a frame of 2147483647 bytes"), "stderr: %s", text);
}
