#include "log.h"

#include <stdarg.h>
#include <string.h>
#include <time.h>

enum log_level log_min_level = LOG_INFO;
static FILE *log_out;
static const char *log_app = "saga";

static const char *const level_names[] = {"debug", "info", "warn", "error"};

int log_level_parse(const char *text, enum log_level *out)
{
    for (int i = 0; i < 4; i++) {
        if (text && !strcmp(text, level_names[i])) {
            *out = (enum log_level)i;
            return 0;
        }
    }
    return -1;
}

void log_init(FILE *out, const char *app)
{
    log_out = out;
    log_app = app;
}

size_t log_json_escape(char *buf, size_t size, size_t len, const char *s)
{
    static const char hex[] = "0123456789abcdef";
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        char esc[7];
        size_t n;
        if (*p == '"' || *p == '\\') {
            esc[0] = '\\';
            esc[1] = (char)*p;
            n = 2;
        } else if (*p == '\n') {
            memcpy(esc, "\\n", 2);
            n = 2;
        } else if (*p == '\t') {
            memcpy(esc, "\\t", 2);
            n = 2;
        } else if (*p < 0x20) {
            memcpy(esc, "\\u00", 4);
            esc[4] = hex[*p >> 4];
            esc[5] = hex[*p & 15];
            n = 6;
        } else {
            esc[0] = (char)*p;
            n = 1;
        }
        if (len + n >= size)
            return (size_t)-1;
        memcpy(buf + len, esc, n);
        len += n;
    }
    buf[len] = '\0';
    return len;
}

static size_t append_raw(char *buf, size_t size, size_t len, const char *s)
{
    size_t n = strlen(s);
    if (len == (size_t)-1 || len + n >= size)
        return (size_t)-1;
    memcpy(buf + len, s, n + 1);
    return len + n;
}

static size_t append_field(char *buf, size_t size, size_t len, const char *key, const char *val)
{
    len = append_raw(buf, size, len, ",\"");
    if (len != (size_t)-1)
        len = log_json_escape(buf, size, len, key);
    len = append_raw(buf, size, len, "\":\"");
    if (len != (size_t)-1)
        len = log_json_escape(buf, size, len, val);
    return append_raw(buf, size, len, "\"");
}

void log_write(enum log_level level, const char *fields[], const char *fmt, ...)
{
    char msg[2048];
    char line[16384];
    char ts[40];
    struct timespec now;
    struct tm tm;
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);

    clock_gettime(CLOCK_REALTIME, &now);
    gmtime_r(&now.tv_sec, &tm);
    size_t n = strftime(ts, sizeof(ts), "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(ts + n, sizeof(ts) - n, ".%03ldZ", now.tv_nsec / 1000000);

    size_t len = 0;
    line[0] = '\0';
    len = append_raw(line, sizeof(line), len, "{\"ts\":\"");
    len = append_raw(line, sizeof(line), len, ts);
    len = append_raw(line, sizeof(line), len, "\",\"level\":\"");
    len = append_raw(line, sizeof(line), len, level_names[level]);
    len = append_raw(line, sizeof(line), len, "\"");
    len = append_field(line, sizeof(line), len, "app", log_app);
    len = append_field(line, sizeof(line), len, "msg", msg);
    for (size_t i = 0; fields && fields[i]; i += 2) {
        if (!fields[i + 1]) {
            /* NULL value: skip the pair, but stop at the terminating NULL key. */
            continue;
        }
        len = append_field(line, sizeof(line), len, fields[i], fields[i + 1]);
    }
    len = append_raw(line, sizeof(line), len, "}\n");
    if (len == (size_t)-1)
        return; /* too long: dropped rather than truncated into invalid JSON */
    FILE *out = log_out ? log_out : stdout;
    fputs(line, out);
    fflush(out);
}
