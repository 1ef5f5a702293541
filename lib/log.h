/* log: one JSON object per line on stdout: {"ts":"...","level":"info","msg":"...",...}.
 *
 * The level is checked before anything is formatted, so a debug line in a hot path costs a
 * comparison when debug is off. Fields are given as key/value string pairs ending in NULL. */
#ifndef SAGA_LOG_H
#define SAGA_LOG_H

#include <stdio.h>

enum log_level { LOG_DEBUG, LOG_INFO, LOG_WARN, LOG_ERROR };

extern enum log_level log_min_level;

/* Parses "debug", "info", "warn" or "error". Returns 0 or -1. */
int log_level_parse(const char *text, enum log_level *out);

/* Sets where lines go (default stdout) and the process name added to every line as "app". */
void log_init(FILE *out, const char *app);

/* Writes one line: msg is formatted with printf rules; then (key, value) pairs of strings
 * follow, terminated by NULL; a NULL value skips its pair. Never fails loudly: a line that
 * cannot be formatted is dropped. All arguments are borrowed. */
void log_write(enum log_level level, const char *fields[], const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

#define LOG_ENABLED(level) ((level) >= log_min_level)

/* log_at(LOG_INFO, LOG_FIELDS("table", name), "claimed %d rows", n) */
#define LOG_FIELDS(...) ((const char *[]){__VA_ARGS__, NULL})
#define log_at(level, fields, ...)                                                                 \
    do {                                                                                           \
        if (LOG_ENABLED(level))                                                                    \
            log_write((level), (fields), __VA_ARGS__);                                             \
    } while (0)
#define log_debug(...) log_at(LOG_DEBUG, NULL, __VA_ARGS__)
#define log_info(...) log_at(LOG_INFO, NULL, __VA_ARGS__)
#define log_warn(...) log_at(LOG_WARN, NULL, __VA_ARGS__)
#define log_error(...) log_at(LOG_ERROR, NULL, __VA_ARGS__)

/* Appends s to buf as a JSON string body (no quotes), escaping as JSON requires. Returns the
 * new length, or (size_t)-1 when buf is too small. */
size_t log_json_escape(char *buf, size_t size, size_t len, const char *s);

#endif
