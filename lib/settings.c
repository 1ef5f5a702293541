#include "settings.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <libpq-fe.h>

#include "duration.h"

int settings_parse_size(const char *text, int64_t *bytes)
{
    static const struct {
        const char *unit;
        int shift;
    } units[] = {{"", 0},     {"b", 0},  {"kb", 10}, {"kib", 10}, {"k", 10}, {"mb", 20},
                 {"mib", 20}, {"m", 20}, {"gb", 30}, {"gib", 30}, {"g", 30}};
    if (!text || *text < '0' || *text > '9')
        return -1;
    char *end;
    errno = 0;
    long long v = strtoll(text, &end, 10);
    if (errno || v < 0)
        return -1;
    for (size_t i = 0; i < sizeof(units) / sizeof(units[0]); i++) {
        if (strcasecmp(end, units[i].unit))
            continue;
        if (v > (INT64_MAX >> units[i].shift))
            return -1;
        *bytes = (int64_t)v << units[i].shift;
        return 0;
    }
    return -1;
}

static char *read_secret_file(const char *path, char *err, size_t errlen, const char *env)
{
    FILE *f = fopen(path, "r");
    if (!f) {
        snprintf(err, errlen, "%s_FILE: cannot read %s: %s", env, path, strerror(errno));
        return NULL;
    }
    char buf[8192];
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = '\0';
    while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == '\r'))
        buf[--n] = '\0'; /* files written by editors and `echo` end in a newline */
    char *s = strdup(buf);
    if (!s)
        snprintf(err, errlen, "out of memory");
    return s;
}

static int store(const struct setting *s, const char *text, const char *source, char *err,
                 size_t errlen)
{
    switch (s->type) {
    case SETTING_STRING: {
        char **var = s->var;
        char *copy = strdup(text);
        if (!copy) {
            snprintf(err, errlen, "out of memory");
            return -1;
        }
        free(*var);
        *var = copy;
        return 0;
    }
    case SETTING_INT: {
        char *end;
        errno = 0;
        long long v = strtoll(text, &end, 10);
        if (errno || end == text || *end || v < s->min || (s->max && v > s->max)) {
            snprintf(err, errlen, "%s (--%s / %s): \"%s\" is not a whole number from %lld to %lld",
                     source, s->flag, s->env, text, (long long)s->min, (long long)s->max);
            return -1;
        }
        *(int *)s->var = (int)v;
        return 0;
    }
    case SETTING_DURATION: {
        int64_t ms;
        if (duration_parse(text, &ms) || ms < s->min || (s->max && ms > s->max)) {
            snprintf(err, errlen,
                     "%s (--%s / %s): \"%s\" is not a duration like 250ms, 5s, 1m in range", source,
                     s->flag, s->env, text);
            return -1;
        }
        *(int64_t *)s->var = ms;
        return 0;
    }
    case SETTING_SIZE: {
        int64_t bytes;
        if (settings_parse_size(text, &bytes) || bytes < s->min || (s->max && bytes > s->max)) {
            snprintf(err, errlen,
                     "%s (--%s / %s): \"%s\" is not a size like 512KB, 16MB, 1GB from %lld to "
                     "%lld bytes",
                     source, s->flag, s->env, text, (long long)s->min, (long long)s->max);
            return -1;
        }
        *(int64_t *)s->var = bytes;
        return 0;
    }
    }
    return -1;
}

void settings_usage(const struct setting *table, size_t count, const char *prog)
{
    printf("usage: %s [--flag=value ...]\n\nEvery flag has an environment variable; flags win.\n\n",
           prog);
    for (size_t i = 0; i < count; i++)
        printf("  --%-22s %-26s %s%s%s%s\n", table[i].flag, table[i].env, table[i].help,
               table[i].def ? " (default " : "", table[i].def ? table[i].def : "",
               table[i].def ? ")" : "");
}

int settings_load(const struct setting *table, size_t count, int argc, char **argv,
                  const char *prog, char *err, size_t errlen)
{
    const char **flag_values = calloc(count ? count : 1, sizeof(*flag_values));
    int rc = -1;
    if (!flag_values) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    for (int i = 0; i < argc; i++) {
        const char *arg = argv[i];
        if (!strcmp(arg, "--help") || !strcmp(arg, "-h")) {
            settings_usage(table, count, prog);
            rc = 1;
            goto out;
        }
        if (strncmp(arg, "--", 2)) {
            snprintf(err, errlen, "unexpected argument \"%s\" (flags look like --name=value)", arg);
            goto out;
        }
        const char *name = arg + 2;
        const char *eq = strchr(name, '=');
        size_t nlen = eq ? (size_t)(eq - name) : strlen(name);
        size_t k;
        for (k = 0; k < count; k++)
            if (strlen(table[k].flag) == nlen && !strncmp(table[k].flag, name, nlen))
                break;
        if (k == count) {
            snprintf(err, errlen, "unknown flag --%.*s (see --help)", (int)nlen, name);
            goto out;
        }
        if (eq) {
            flag_values[k] = eq + 1;
        } else if (i + 1 < argc) {
            flag_values[k] = argv[++i];
        } else {
            snprintf(err, errlen, "flag --%s needs a value", table[k].flag);
            goto out;
        }
    }
    for (size_t k = 0; k < count; k++) {
        const struct setting *s = &table[k];
        char source[160];
        const char *text = flag_values[k];
        char *owned = NULL;
        snprintf(source, sizeof(source), "setting %s", s->env);
        if (!text)
            text = getenv(s->env);
        if (!text) {
            char file_env[128];
            snprintf(file_env, sizeof(file_env), "%s_FILE", s->env);
            const char *path = getenv(file_env);
            if (path) {
                owned = read_secret_file(path, err, errlen, s->env);
                if (!owned)
                    goto out;
                text = owned;
            }
        }
        if (!text)
            text = s->def;
        if (!text) {
            if (s->type == SETTING_STRING)
                continue; /* optional, left NULL */
            snprintf(err, errlen, "%s (--%s) is required", s->env, s->flag);
            goto out;
        }
        int r = store(s, text, source, err, errlen);
        free(owned);
        if (r)
            goto out;
    }
    rc = 0;
out:
    free(flag_values);
    return rc;
}

void settings_free(const struct setting *table, size_t count)
{
    for (size_t k = 0; k < count; k++) {
        if (table[k].type == SETTING_STRING) {
            char **var = table[k].var;
            free(*var);
            *var = NULL;
        }
    }
}

void settings_redact_conninfo(const char *conninfo, char *out, size_t outlen)
{
    char *errmsg = NULL;
    PQconninfoOption *opts = PQconninfoParse(conninfo ? conninfo : "", &errmsg);
    if (!opts) {
        PQfreemem(errmsg);
        snprintf(out, outlen, "(unparsable connection string)");
        return;
    }
    size_t len = 0;
    out[0] = '\0';
    for (PQconninfoOption *o = opts; o->keyword; o++) {
        if (!o->val || !*o->val)
            continue;
        const char *val = strcmp(o->keyword, "password") ? o->val : "*****";
        int n = snprintf(out + len, outlen - len, "%s%s=%s", len ? " " : "", o->keyword, val);
        if (n < 0 || (size_t)n >= outlen - len)
            break;
        len += (size_t)n;
    }
    PQconninfoFree(opts);
}
