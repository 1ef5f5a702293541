/* metric_wait: waits until a counter on a daemon's /metrics reaches a value, then prints the
 * wall-clock time it saw it (seconds since the epoch, with nanoseconds, as `date +%s.%N`).
 * Run by bench/relay-bench to time the end of a drain.
 *
 *   metric_wait PORT METRIC TARGET [INTERVAL_MS] [TIMEOUT_S]
 *
 * The metric is summed over its label sets (every line "METRIC{...} v" or "METRIC v").
 * INTERVAL_MS defaults to 10, TIMEOUT_S to 600. Exit 0 when reached, 1 on timeout or when
 * the endpoint stops answering (a dead daemon), 2 on bad arguments.
 *
 * Why not curl in a shell loop: each poll forked curl, awk and sleep. At 50 polls a second
 * they took ~19% of this 2-core machine during a drain (perf), CPU that the relay and
 * PostgreSQL were waiting for; one process polling over a socket costs ~1%. */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* One GET /metrics; returns a malloc'd body (headers included: harmless to the scan), or NULL
 * when the endpoint does not answer within a second. */
static char *get_metrics(int port)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0)
        return NULL;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    const char req[] = "GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
    if (connect(fd, (struct sockaddr *)&a, sizeof(a)) < 0 ||
        write(fd, req, sizeof(req) - 1) != (ssize_t)(sizeof(req) - 1)) {
        close(fd);
        return NULL;
    }
    size_t len = 0, cap = 65536;
    char *buf = malloc(cap);
    for (;;) {
        if (!buf)
            break;
        if (len + 1 == cap) {
            char *nb = realloc(buf, cap * 2);
            if (!nb) {
                free(buf);
                buf = NULL;
                break;
            }
            buf = nb;
            cap *= 2;
        }
        struct pollfd p = {.fd = fd, .events = POLLIN};
        if (poll(&p, 1, 1000) <= 0) {
            free(buf);
            buf = NULL;
            break;
        }
        ssize_t n = read(fd, buf + len, cap - 1 - len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            if (n < 0) {
                free(buf);
                buf = NULL;
            }
            break;
        }
        len += (size_t)n;
    }
    close(fd);
    if (buf)
        buf[len] = '\0';
    return buf;
}

static double metric_sum(const char *body, const char *name)
{
    size_t nlen = strlen(name);
    double sum = 0;
    for (const char *line = body; line && *line;) {
        const char *nl = strchr(line, '\n');
        size_t len = nl ? (size_t)(nl - line) : strlen(line);
        if (len > nlen && !strncmp(line, name, nlen) && (line[nlen] == ' ' || line[nlen] == '{')) {
            const char *sp = line + len; /* the value is after the line's last space */
            while (sp > line && sp[-1] != ' ')
                sp--;
            sum += strtod(sp, NULL);
        }
        line = nl ? nl + 1 : NULL;
    }
    return sum;
}

int main(int argc, char **argv)
{
    if (argc < 4 || argc > 6) {
        fprintf(stderr, "usage: metric_wait PORT METRIC TARGET [INTERVAL_MS] [TIMEOUT_S]\n");
        return 2;
    }
    int port = atoi(argv[1]);
    double target = strtod(argv[3], NULL);
    long interval_ms = argc > 4 ? atol(argv[4]) : 10;
    long timeout_s = argc > 5 ? atol(argv[5]) : 600;
    if (port <= 0 || port > 65535 || interval_ms <= 0 || timeout_s <= 0) {
        fprintf(stderr, "metric_wait: bad arguments\n");
        return 2;
    }
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (;;) {
        char *body = get_metrics(port);
        if (!body) {
            fprintf(stderr, "metric_wait: 127.0.0.1:%d/metrics does not answer\n", port);
            return 1;
        }
        double v = metric_sum(body, argv[2]);
        free(body);
        if (v >= target) {
            struct timespec wall;
            clock_gettime(CLOCK_REALTIME, &wall);
            printf("%lld.%09ld\n", (long long)wall.tv_sec, wall.tv_nsec);
            return 0;
        }
        clock_gettime(CLOCK_MONOTONIC, &now);
        if (now.tv_sec - start.tv_sec > timeout_s) {
            fprintf(stderr, "metric_wait: %s is %.0f after %ld s, waiting for %.0f\n", argv[2], v,
                    timeout_s, target);
            return 1;
        }
        struct timespec d = {.tv_sec = interval_ms / 1000,
                             .tv_nsec = (interval_ms % 1000) * 1000000};
        nanosleep(&d, NULL);
    }
}
