#include "admin.h"

#include <arpa/inet.h>
#include <errno.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>
#include <netdb.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <microhttpd.h>

#include "metrics.h"

#define HEARTBEAT_LIMIT_SEC 10

struct admin {
    struct MHD_Daemon *daemon;
    int port;
    pthread_mutex_t mu;
    bool ready;
    char *status;
    time_t beat;
};

static time_t monotonic_sec(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec;
}

static enum MHD_Result reply(struct MHD_Connection *conn, unsigned code, const char *type,
                             char *body)
{
    struct MHD_Response *resp =
        MHD_create_response_from_buffer(strlen(body), body, MHD_RESPMEM_MUST_FREE);
    if (!resp) {
        free(body);
        return MHD_NO;
    }
    MHD_add_response_header(resp, "Content-Type", type);
    enum MHD_Result r = MHD_queue_response(conn, code, resp);
    MHD_destroy_response(resp);
    return r;
}

static enum MHD_Result handler(void *cls, struct MHD_Connection *conn, const char *url,
                               const char *method, const char *version, const char *upload,
                               size_t *upload_size, void **state)
{
    struct admin *a = cls;
    if (strcmp(method, "GET") && strcmp(method, "HEAD"))
        return reply(conn, 405, "text/plain", strdup("method not allowed\n"));
    if (!strcmp(url, "/healthz")) {
        pthread_mutex_lock(&a->mu);
        bool alive = monotonic_sec() - a->beat <= HEARTBEAT_LIMIT_SEC;
        pthread_mutex_unlock(&a->mu);
        return reply(conn, alive ? 200 : 503, "text/plain",
                     strdup(alive ? "ok\n" : "event loop stalled\n"));
    }
    if (!strcmp(url, "/readyz")) {
        pthread_mutex_lock(&a->mu);
        bool ready = a->ready;
        char *body = strdup(a->status ? a->status : "starting\n");
        pthread_mutex_unlock(&a->mu);
        if (!body)
            return MHD_NO;
        return reply(conn, ready ? 200 : 503, "text/plain", body);
    }
    if (!strcmp(url, "/metrics")) {
        char *body = metrics_render();
        if (!body)
            return MHD_NO;
        return reply(conn, 200, "text/plain; version=0.0.4", body);
    }
    return reply(conn, 404, "text/plain", strdup("not found: try /healthz, /readyz, /metrics\n"));
}

struct admin *admin_start(const char *addr, const char *setting, char *err, size_t errlen)
{
    char host[256];
    const char *colon = strrchr(addr, ':');
    if (!colon || (size_t)(colon - addr) >= sizeof(host)) {
        snprintf(err, errlen, "%s: \"%s\" is not host:port", setting, addr);
        return NULL;
    }
    memcpy(host, addr, (size_t)(colon - addr));
    host[colon - addr] = '\0';
    char *end;
    long port = strtol(colon + 1, &end, 10);
    if (*end || end == colon + 1 || port < 0 || port > 65535) {
        snprintf(err, errlen, "%s: \"%s\" has no valid port", setting, addr);
        return NULL;
    }
    struct addrinfo hints = {.ai_family = AF_INET, .ai_socktype = SOCK_STREAM};
    struct addrinfo *ai = NULL;
    if (getaddrinfo(*host ? host : "0.0.0.0", NULL, &hints, &ai) || !ai) {
        snprintf(err, errlen, "%s: cannot resolve host \"%s\" (IPv4 host or address)", setting,
                 host);
        return NULL;
    }
    struct sockaddr_in sin;
    memcpy(&sin, ai->ai_addr, sizeof(sin));
    freeaddrinfo(ai);
    sin.sin_port = htons((uint16_t)port);

    struct admin *a = calloc(1, sizeof(*a));
    if (!a) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    pthread_mutex_init(&a->mu, NULL);
    a->beat = monotonic_sec();
    a->daemon = MHD_start_daemon(MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_EPOLL, 0, NULL, NULL,
                                 handler, a, MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&sin,
                                 MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)10,
                                 MHD_OPTION_CONNECTION_LIMIT, (unsigned)64, MHD_OPTION_END);
    if (!a->daemon) {
        snprintf(err, errlen, "%s: cannot listen on %s (address in use or not local?)", setting,
                 addr);
        pthread_mutex_destroy(&a->mu);
        free(a);
        return NULL;
    }
    const union MHD_DaemonInfo *info = MHD_get_daemon_info(a->daemon, MHD_DAEMON_INFO_BIND_PORT);
    a->port = info ? info->port : (int)port;
    return a;
}

int admin_port(const struct admin *a)
{
    return a->port;
}

void admin_set_status(struct admin *a, bool ready, const char *text)
{
    if (!a)
        return;
    char *copy = strdup(text);
    pthread_mutex_lock(&a->mu);
    a->ready = ready;
    if (copy) {
        free(a->status);
        a->status = copy;
    }
    pthread_mutex_unlock(&a->mu);
}

void admin_heartbeat(struct admin *a)
{
    if (!a)
        return;
    pthread_mutex_lock(&a->mu);
    a->beat = monotonic_sec();
    pthread_mutex_unlock(&a->mu);
}

void admin_stop(struct admin *a)
{
    if (!a)
        return;
    MHD_stop_daemon(a->daemon);
    pthread_mutex_destroy(&a->mu);
    free(a->status);
    free(a);
}

int admin_healthcheck(const char *env, const char *def)
{
    const char *addr = getenv(env);
    if (!addr || !*addr)
        addr = def;
    char host[256];
    const char *colon = strrchr(addr, ':');
    if (!colon || (size_t)(colon - addr) >= sizeof(host)) {
        fprintf(stderr, "healthcheck: %s: \"%s\" is not host:port\n", env, addr);
        return 1;
    }
    memcpy(host, addr, (size_t)(colon - addr));
    host[colon - addr] = '\0';
    if (!*host || !strcmp(host, "0.0.0.0"))
        strcpy(host, "127.0.0.1");
    struct addrinfo hints = {.ai_family = AF_INET, .ai_socktype = SOCK_STREAM};
    struct addrinfo *ai = NULL;
    if (getaddrinfo(host, colon + 1, &hints, &ai) || !ai) {
        fprintf(stderr, "healthcheck: cannot resolve %s\n", addr);
        return 1;
    }
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct timeval tv = {.tv_sec = 3};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    int rc = 1;
    if (fd < 0 || connect(fd, ai->ai_addr, ai->ai_addrlen)) {
        fprintf(stderr, "healthcheck: cannot connect to %s: %s\n", addr, strerror(errno));
        goto out;
    }
    static const char req[] = "GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n";
    if (write(fd, req, sizeof(req) - 1) != (ssize_t)(sizeof(req) - 1)) {
        fprintf(stderr, "healthcheck: cannot send to %s\n", addr);
        goto out;
    }
    char buf[64] = {0};
    ssize_t n = read(fd, buf, sizeof(buf) - 1);
    /* Only the status line matters: "HTTP/1.x 200 ..." */
    if (n >= 12 && !strncmp(buf, "HTTP/1.", 7) && !strncmp(buf + 9, "200", 3))
        rc = 0;
    else
        fprintf(stderr, "healthcheck: %s/healthz did not answer 200\n", addr);
out:
    if (fd >= 0)
        close(fd);
    freeaddrinfo(ai);
    return rc;
}
