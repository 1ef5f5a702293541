/* settings: one table of {flag, environment variable, type, variable, default} per daemon.
 *
 * Precedence: command-line flag (--name=value or --name value), then the environment
 * variable, then <VAR>_FILE (a file holding the value, as container images accept for
 * secrets), then the default. Every error names the flag and the variable. */
#ifndef SAGA_SETTINGS_H
#define SAGA_SETTINGS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

enum setting_type {
    SETTING_STRING,   /* char *: owned by the table's variable after settings_load */
    SETTING_INT,      /* int, >= 0 */
    SETTING_DURATION, /* int64_t milliseconds ("250ms", "5s") */
    SETTING_SIZE,     /* int64_t bytes ("512KB", "16MB", "1GB": powers of 1024; no unit: bytes) */
};

struct setting {
    const char *flag; /* "database-url" for --database-url */
    const char *env;  /* "RELAY_DATABASE_URL" */
    enum setting_type type;
    void *var;
    const char *def; /* default text, or NULL for none */
    const char *help;
    bool secret;      /* never printed (connection strings may carry passwords) */
    int64_t min, max; /* bounds for INT, DURATION and SIZE (max 0: none) */
};

/* Loads every setting. Returns 0; or -1 with a message in err naming the setting (the caller
 * exits 2). argv may hold only flags; "--help" returns 1 after printing usage to stdout. */
__attribute__((warn_unused_result)) int settings_load(const struct setting *table, size_t count,
                                                      int argc, char **argv, const char *prog,
                                                      char *err, size_t errlen);

/* Parses a size: a whole number with an optional unit B, KB, MB or GB (powers of 1024; "KiB",
 * "MiB", "GiB" and lower case too). Returns 0, or -1 (*bytes untouched) for anything else or a
 * value past INT64_MAX. */
__attribute__((warn_unused_result)) int settings_parse_size(const char *text, int64_t *bytes);

/* Frees the strings settings_load stored into the table's variables. */
void settings_free(const struct setting *table, size_t count);

/* Prints the usage: one line per setting with flag, variable, default and help. */
void settings_usage(const struct setting *table, size_t count, const char *prog);

/* Writes conninfo into out without its password (key/value or URI form), for logs and
 * errors. A string libpq cannot parse becomes "(unparsable connection string)". */
void settings_redact_conninfo(const char *conninfo, char *out, size_t outlen);

#endif
