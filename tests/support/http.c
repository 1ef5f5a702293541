#include "http.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <criterion/criterion.h>

#include "proc.h"

int http_get(int port, const char *path, char **body)
{
    *body = NULL;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        cr_assert_fail("socket: %s", strerror(errno));
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&sa, sizeof(sa))) {
        close(fd); /* not listening (yet, or any more) */
        return 0;
    }
    char req[512];
    int len = snprintf(req, sizeof(req), "GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n", path);
    proc_write_all(fd, req, (size_t)len);
    /* HTTP/1.0: the server closes the connection after the body, so read until EOF. */
    size_t cap = 65536, used = 0;
    char *buf = malloc(cap);
    if (!buf)
        cr_assert_fail("out of memory");
    int64_t deadline = proc_now_ms() + HTTP_TIMEOUT_MS;
    for (;;) {
        int64_t left = deadline - proc_now_ms();
        struct pollfd pfd = {fd, POLLIN, 0};
        if (left <= 0 || poll(&pfd, 1, (int)left) <= 0) {
            free(buf);
            close(fd);
            return 0;
        }
        if (cap - used < 4096) {
            cap *= 2;
            char *grown = realloc(buf, cap);
            if (!grown)
                cr_assert_fail("out of memory");
            buf = grown;
        }
        ssize_t got = read(fd, buf + used, cap - used - 1);
        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0)
            break;
        used += (size_t)got;
    }
    close(fd);
    buf[used] = '\0';
    int status = 0;
    if (sscanf(buf, "HTTP/1.%*d %d", &status) != 1)
        status = -1;
    char *sep = strstr(buf, "\r\n\r\n");
    *body = strdup(sep ? sep + 4 : "");
    free(buf);
    if (!*body)
        cr_assert_fail("out of memory");
    return status;
}

double http_metric(const char *metrics, const char *series)
{
    size_t len = strlen(series);
    for (const char *s = metrics; s && *s;) {
        if (!strncmp(s, series, len) && s[len] == ' ')
            return strtod(s + len + 1, NULL);
        s = strchr(s, '\n');
        if (s)
            s++;
    }
    return -1;
}

double http_get_metric(int port, const char *series)
{
    char *body;
    int status = http_get(port, "/metrics", &body);
    double v = status == 200 ? http_metric(body, series) : -1;
    free(body);
    return v;
}
