/* relay_config: the relay's settings table, its sources, and the start-up table check. */
#include <ctype.h>
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cjson/cJSON.h>
#include <libpq-fe.h>

#include "relay.h"
#include "settings.h"

#define SETTINGS_TABLE(s)                                                                          \
    {                                                                                              \
        {"database-url",                                                                           \
         "RELAY_DATABASE_URL",                                                                     \
         SETTING_STRING,                                                                           \
         &(s)->database_url,                                                                       \
         NULL,                                                                                     \
         "libpq conninfo or URI of the database of RELAY_OUTBOX_TABLES",                           \
         true,                                                                                     \
         0,                                                                                        \
         0},                                                                                       \
            {"kafka-brokers",                                                                      \
             "RELAY_KAFKA_BROKERS",                                                                \
             SETTING_STRING,                                                                       \
             &(s)->kafka_brokers,                                                                  \
             NULL,                                                                                 \
             "Kafka bootstrap servers (host:port,...)",                                            \
             false,                                                                                \
             0,                                                                                    \
             0},                                                                                   \
            {"outbox-tables",                                                                      \
             "RELAY_OUTBOX_TABLES",                                                                \
             SETTING_STRING,                                                                       \
             &(s)->outbox_tables,                                                                  \
             "saga.outbox",                                                                        \
             "comma list of schema.table",                                                         \
             false,                                                                                \
             0,                                                                                    \
             0},                                                                                   \
            {"config",                                                                             \
             "RELAY_CONFIG",                                                                       \
             SETTING_STRING,                                                                       \
             &(s)->config_file,                                                                    \
             NULL,                                                                                 \
             "JSON file with several sources (databases and their tables)",                        \
             false,                                                                                \
             0,                                                                                    \
             0},                                                                                   \
            {"admin-addr",                                                                         \
             "RELAY_ADMIN_ADDR",                                                                   \
             SETTING_STRING,                                                                       \
             &(s)->admin_addr,                                                                     \
             "127.0.0.1:9188",                                                                     \
             "host:port of /healthz, /readyz and /metrics (empty: off)",                           \
             false,                                                                                \
             0,                                                                                    \
             0},                                                                                   \
            {"log-level",                                                                          \
             "RELAY_LOG_LEVEL",                                                                    \
             SETTING_STRING,                                                                       \
             &(s)->log_level,                                                                      \
             "info",                                                                               \
             "debug, info, warn or error",                                                         \
             false,                                                                                \
             0,                                                                                    \
             0},                                                                                   \
            {"batch-size", "RELAY_BATCH_SIZE", SETTING_INT, &(s)->batch_size,                      \
             "3000",       "rows per claim",   false,       1,                                     \
             100000},                                                                              \
            {"max-inflight", "RELAY_MAX_INFLIGHT",                                                 \
             SETTING_INT,    &(s)->max_inflight,                                                   \
             "6000",         "rows in the producer (not yet acknowledged), per table",             \
             false,          1,                                                                    \
             10000000},                                                                            \
            {"max-inflight-bytes",                                                                 \
             "RELAY_MAX_INFLIGHT_BYTES",                                                           \
             SETTING_SIZE,                                                                         \
             &(s)->max_inflight_bytes,                                                             \
             "16MB",                                                                               \
             "payload, key and header bytes of the rows in the producer, per table",               \
             false,                                                                                \
             1,                                                                                    \
             INT64_C(1) << 40},                                                                    \
            {"poll-interval",                                                                      \
             "RELAY_POLL_INTERVAL",                                                                \
             SETTING_DURATION,                                                                     \
             &(s)->poll_ms,                                                                        \
             "500ms",                                                                              \
             "fallback poll when no notification arrives",                                         \
             false,                                                                                \
             1,                                                                                    \
             3600000},                                                                             \
            {"leader-retry",                                                                       \
             "RELAY_LEADER_RETRY",                                                                 \
             SETTING_DURATION,                                                                     \
             &(s)->leader_retry_ms,                                                                \
             "1s",                                                                                 \
             "how often a standby tries to take a table over",                                     \
             false,                                                                                \
             10,                                                                                   \
             3600000},                                                                             \
            {"reconnect-max",                                                                      \
             "RELAY_RECONNECT_MAX",                                                                \
             SETTING_DURATION,                                                                     \
             &(s)->reconnect_max_ms,                                                               \
             "10s",                                                                                \
             "longest wait between reconnection attempts",                                         \
             false,                                                                                \
             100,                                                                                  \
             3600000},                                                                             \
            {"drain-timeout",                                                                      \
             "RELAY_DRAIN_TIMEOUT",                                                                \
             SETTING_DURATION,                                                                     \
             &(s)->drain_timeout_ms,                                                               \
             "30s",                                                                                \
             "on SIGTERM, how long to wait for acknowledgements",                                  \
             false,                                                                                \
             0,                                                                                    \
             3600000},                                                                             \
            {"linger",                                                                             \
             "RELAY_LINGER",                                                                       \
             SETTING_DURATION,                                                                     \
             &(s)->linger_ms,                                                                      \
             "0ms",                                                                                \
             "producer linger.ms (batching delay)",                                                \
             false,                                                                                \
             0,                                                                                    \
             60000},                                                                               \
    }

static bool ident_ok(const char *s, size_t n)
{
    if (n == 0 || n > 63 || !(isalpha((unsigned char)s[0]) || s[0] == '_'))
        return false;
    for (size_t i = 1; i < n; i++)
        if (!(isalnum((unsigned char)s[i]) || s[i] == '_'))
            return false;
    return true;
}

/* "schema.table" -> source; error names the setting. */
static int add_table(struct outbox_source **srcs, size_t *count, const char *conninfo,
                     const char *spec, const char *where, char *err, size_t errlen)
{
    while (isspace((unsigned char)*spec))
        spec++;
    size_t n = strlen(spec);
    while (n && isspace((unsigned char)spec[n - 1]))
        n--;
    const char *dot = memchr(spec, '.', n);
    if (!dot || !ident_ok(spec, (size_t)(dot - spec)) ||
        !ident_ok(dot + 1, n - (size_t)(dot - spec) - 1)) {
        snprintf(err, errlen,
                 "%s: \"%.*s\" is not a table name like schema.outbox (letters, digits, _)", where,
                 (int)n, spec);
        return -1;
    }
    for (size_t i = 0; i < *count; i++) {
        if (!strcmp((*srcs)[i].conninfo, conninfo) &&
            strlen((*srcs)[i].schema) == (size_t)(dot - spec) &&
            !strncmp((*srcs)[i].schema, spec, (size_t)(dot - spec)) &&
            !strncmp((*srcs)[i].table, dot + 1, n - (size_t)(dot - spec) - 1) &&
            strlen((*srcs)[i].table) == n - (size_t)(dot - spec) - 1) {
            snprintf(err, errlen, "%s: table %.*s is listed twice", where, (int)n, spec);
            return -1;
        }
    }
    struct outbox_source *grown = realloc(*srcs, (*count + 1) * sizeof(**srcs));
    if (!grown) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    *srcs = grown;
    struct outbox_source *s = &grown[*count];
    s->conninfo = strdup(conninfo);
    s->schema = strndup(spec, (size_t)(dot - spec));
    s->table = strndup(dot + 1, n - (size_t)(dot - spec) - 1);
    s->where = strdup(where);
    (*count)++;
    if (!s->conninfo || !s->schema || !s->table || !s->where) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    return 0;
}

/* Replaces, in place, every occurrence of secret (len bytes) in msg (size bytes of storage)
 * by "*****"; a message that no longer fits is cut. */
static void mask_in(char *msg, size_t size, const char *secret, size_t len)
{
    static const char mask[] = "*****";
    const size_t keep = sizeof(mask) - 1;
    if (!len)
        return;
    char *from = msg;
    for (;;) {
        char *hit = NULL;
        for (char *p = from; *p && !hit; p++)
            if (!strncmp(p, secret, len))
                hit = p;
        if (!hit)
            return;
        size_t pos = (size_t)(hit - msg);
        if (pos + keep + 1 > size) {
            *hit = '\0';
            return;
        }
        size_t tail = strlen(hit + len) + 1; /* with its NUL */
        if (pos + keep + tail > size)
            tail = size - pos - keep;
        memmove(hit + keep, hit + len, tail);
        memcpy(hit, mask, keep);
        msg[size - 1] = '\0';
        from = hit + keep;
    }
}

/* libpq's parse errors quote the URI or a fragment of it ("end of string reached when looking
 * for matching "]" in IPv6 host address in URI: "postgresql://user:secret@[::1/db""), so a
 * password in it must be masked before the message is shown: the one in the URI's userinfo
 * and every password=VALUE (URI query parameter or key=value). */
static void mask_passwords(char *msg, size_t size, const char *conninfo)
{
    const char *scheme = strstr(conninfo, "://");
    if (scheme) {
        const char *user = scheme + 3;
        const char *end = user + strcspn(user, "/?");
        const char *at = NULL;
        for (const char *p = user; p < end; p++)
            if (*p == '@')
                at = p;
        const char *colon = at ? memchr(user, ':', (size_t)(at - user)) : NULL;
        if (colon)
            mask_in(msg, size, colon + 1, (size_t)(at - colon - 1));
    }
    for (const char *p = conninfo; (p = strstr(p, "password")); p += 8) {
        const char *v = p + 8;
        while (*v == ' ')
            v++;
        if (*v != '=')
            continue;
        v++;
        while (*v == ' ')
            v++;
        if (*v == '\'') {
            v++;
            mask_in(msg, size, v, strcspn(v, "'"));
        } else {
            mask_in(msg, size, v, strcspn(v, " &#"));
        }
    }
}

static int check_conninfo(const char *conninfo, const char *where, char *err, size_t errlen)
{
    char *msg = NULL;
    PQconninfoOption *opts = PQconninfoParse(conninfo, &msg);
    if (!opts) {
        char text[1024];
        snprintf(text, sizeof(text), "%s", msg ? msg : "cannot parse");
        PQfreemem(msg);
        size_t n = strlen(text);
        while (n && text[n - 1] == '\n')
            text[--n] = '\0';
        mask_passwords(text, sizeof(text), conninfo);
        snprintf(err, errlen, "%s: malformed connection string: %s", where, text);
        return -1;
    }
    PQconninfoFree(opts);
    return 0;
}

static int load_config_file(const char *path, struct outbox_source **srcs, size_t *count, char *err,
                            size_t errlen)
{
    FILE *f = fopen(path, "r");
    if (!f) {
        snprintf(err, errlen, "RELAY_CONFIG: cannot read %s: %s", path, strerror(errno));
        return -1;
    }
    char *text = NULL;
    size_t len = 0, cap = 0;
    for (;;) {
        if (len + 4096 > cap) {
            cap = cap ? cap * 2 : 8192;
            char *grown = realloc(text, cap);
            if (!grown) {
                free(text);
                fclose(f);
                snprintf(err, errlen, "out of memory");
                return -1;
            }
            text = grown;
        }
        size_t n = fread(text + len, 1, cap - len - 1, f);
        len += n;
        if (n == 0)
            break;
    }
    fclose(f);
    text[len] = '\0';
    int rc = -1;
    /* The error position from the parse itself, not cJSON_GetErrorPtr(): that is one global,
     * and a SIGHUP reload parses this file in a thread while the loop parses headers. */
    const char *at = NULL;
    cJSON *doc = cJSON_ParseWithLengthOpts(text, len, &at, false);
    if (!doc) {
        int line = 1, col = 1;
        for (const char *p = text; at && p < at && *p; p++) {
            if (*p == '\n') {
                line++;
                col = 1;
            } else {
                col++;
            }
        }
        snprintf(err, errlen, "%s:%d:%d: invalid JSON", path, line, col);
        goto out;
    }
    cJSON *sources = cJSON_GetObjectItemCaseSensitive(doc, "sources");
    if (!cJSON_IsObject(doc) || !cJSON_IsArray(sources)) {
        snprintf(err, errlen, "%s: $.sources: expected an array of sources", path);
        goto out;
    }
    for (cJSON *c = doc->child; c; c = c->next) {
        if (strcmp(c->string, "sources")) {
            snprintf(err, errlen, "%s: $.%s: unknown key", path, c->string);
            goto out;
        }
    }
    int i = 0;
    for (cJSON *s = sources->child; s; s = s->next, i++) {
        char where[512];
        if (!cJSON_IsObject(s)) {
            snprintf(err, errlen, "%s: $.sources[%d]: expected an object", path, i);
            goto out;
        }
        for (cJSON *c = s->child; c; c = c->next) {
            if (strcmp(c->string, "name") && strcmp(c->string, "database_url") &&
                strcmp(c->string, "database_url_env") && strcmp(c->string, "tables")) {
                snprintf(err, errlen,
                         "%s: $.sources[%d].%s: unknown key (known: name, database_url, "
                         "database_url_env, tables)",
                         path, i, c->string);
                goto out;
            }
        }
        cJSON *url = cJSON_GetObjectItemCaseSensitive(s, "database_url");
        cJSON *url_env = cJSON_GetObjectItemCaseSensitive(s, "database_url_env");
        cJSON *tables = cJSON_GetObjectItemCaseSensitive(s, "tables");
        const char *conninfo = NULL;
        if (cJSON_IsString(url) && !url_env) {
            conninfo = url->valuestring;
            snprintf(where, sizeof(where), "%s: $.sources[%d].database_url", path, i);
        } else if (cJSON_IsString(url_env) && !url) {
            conninfo = getenv(url_env->valuestring);
            snprintf(where, sizeof(where), "%s: $.sources[%d].database_url_env (%s)", path, i,
                     url_env->valuestring);
            if (!conninfo) {
                snprintf(err, errlen, "%s: the variable is not set", where);
                goto out;
            }
        } else {
            snprintf(err, errlen,
                     "%s: $.sources[%d]: needs exactly one of database_url or database_url_env",
                     path, i);
            goto out;
        }
        if (check_conninfo(conninfo, where, err, errlen))
            goto out;
        if (!cJSON_IsArray(tables) || !cJSON_GetArraySize(tables)) {
            snprintf(err, errlen, "%s: $.sources[%d].tables: expected a non-empty array", path, i);
            goto out;
        }
        int j = 0;
        for (cJSON *tb = tables->child; tb; tb = tb->next, j++) {
            char twhere[600];
            snprintf(twhere, sizeof(twhere), "%s: $.sources[%d].tables[%d]", path, i, j);
            if (!cJSON_IsString(tb)) {
                snprintf(err, errlen, "%s: expected a string", twhere);
                goto out;
            }
            if (add_table(srcs, count, conninfo, tb->valuestring, twhere, err, errlen))
                goto out;
        }
    }
    rc = 0;
out:
    cJSON_Delete(doc);
    free(text);
    return rc;
}

int relay_sources_load(const struct relay_settings *settings, struct outbox_source **sources,
                       size_t *count, char *err, size_t errlen)
{
    *sources = NULL;
    *count = 0;
    if (settings->sources_from_env) {
        const char *conninfo = settings->database_url ? settings->database_url : "";
        if (check_conninfo(conninfo, "RELAY_DATABASE_URL (--database-url)", err, errlen))
            return -1;
        char *list = strdup(settings->outbox_tables);
        if (!list) {
            snprintf(err, errlen, "out of memory");
            return -1;
        }
        char *save = NULL;
        int any = 0;
        for (char *tok = strtok_r(list, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
            any = 1;
            if (add_table(sources, count, conninfo, tok, "RELAY_OUTBOX_TABLES (--outbox-tables)",
                          err, errlen)) {
                free(list);
                return -1;
            }
        }
        free(list);
        if (!any) {
            snprintf(err, errlen, "RELAY_OUTBOX_TABLES (--outbox-tables): no table given");
            return -1;
        }
    }
    if (settings->config_file &&
        load_config_file(settings->config_file, sources, count, err, errlen))
        return -1;
    return 0;
}

int relay_config_load(int argc, char **argv, struct relay_settings *settings,
                      struct outbox_source **sources, size_t *count, char *err, size_t errlen)
{
    struct setting table[] = SETTINGS_TABLE(settings);
    size_t n = sizeof(table) / sizeof(table[0]);
    *sources = NULL;
    *count = 0;
    int rc = settings_load(table, n, argc, argv, "outbox-relay", err, errlen);
    if (rc)
        return rc;
    if (!settings->kafka_brokers || !*settings->kafka_brokers) {
        snprintf(err, errlen, "RELAY_KAFKA_BROKERS (--kafka-brokers) is required");
        return -1;
    }
    if (strcmp(settings->log_level, "debug") && strcmp(settings->log_level, "info") &&
        strcmp(settings->log_level, "warn") && strcmp(settings->log_level, "error")) {
        snprintf(err, errlen,
                 "RELAY_LOG_LEVEL (--log-level): \"%s\" is not one of debug, info, warn, error",
                 settings->log_level);
        return -1;
    }
    /* RELAY_OUTBOX_TABLES goes with RELAY_DATABASE_URL (or libpq's PG* variables) unless
     * RELAY_CONFIG alone names the sources. */
    bool tables_given = getenv("RELAY_OUTBOX_TABLES") != NULL;
    for (int i = 0; i < argc; i++)
        if (!strncmp(argv[i], "--outbox-tables", 15))
            tables_given = true;
    settings->sources_from_env = settings->database_url || !settings->config_file || tables_given;
    if (relay_sources_load(settings, sources, count, err, errlen))
        return -1;
    if (settings->admin_addr && *settings->admin_addr && !strchr(settings->admin_addr, ':')) {
        snprintf(err, errlen, "RELAY_ADMIN_ADDR (--admin-addr): \"%s\" is not host:port",
                 settings->admin_addr);
        return -1;
    }
    return 0;
}

void relay_settings_free(struct relay_settings *settings)
{
    struct setting table[] = SETTINGS_TABLE(settings);
    settings_free(table, sizeof(table) / sizeof(table[0]));
}

void relay_sources_free(struct outbox_source *sources, size_t count)
{
    for (size_t i = 0; i < count; i++) {
        free(sources[i].conninfo);
        free(sources[i].schema);
        free(sources[i].table);
        free(sources[i].where);
    }
    free(sources);
}

static const struct {
    const char *column;
    const char *type;
} required_columns[] = {
    {"id", "uuid"},         {"seq", "bigint"},
    {"topic", "text"},      {"key", "text"},
    {"event_type", "text"}, {"payload", "jsonb"},
    {"headers", "jsonb"},   {"created_at", "timestamp with time zone"},
};

/* The check's bounds. connect_timeout bounds the connection (libpq: per address, the whole
 * start-up included); a statement has CHECK_STATEMENT_MS from its send to its result, waited
 * for here (a server that accepted the connection and then never answers, or a network gone
 * silent, would otherwise block the check forever: at start, and in the SIGHUP reload's
 * thread), and the server cancels it at the same bound (statement_timeout, set by a statement
 * rather than the startup packet's options, which poolers such as PgBouncer refuse). TCP
 * keepalives and tcp_user_timeout make the kernel give up on a peer gone away; the user's own
 * values of these win. */
#define CHECK_CONNECT_TIMEOUT "10"
#define CHECK_STATEMENT_MS 10000

static void trim_message(char *msg)
{
    size_t n = strlen(msg);
    while (n && (msg[n - 1] == '\n' || msg[n - 1] == ' '))
        msg[--n] = '\0';
}

/* Waits until conn has a whole result to give (!PQisBusy), at most until CHECK_STATEMENT_MS
 * after start; 0, or -1 with why. */
static int wait_result(PGconn *conn, const struct timespec *start, char *why, size_t whylen)
{
    while (PQisBusy(conn)) {
        struct timespec now;
        clock_gettime(CLOCK_MONOTONIC, &now);
        int64_t spent =
            (int64_t)(now.tv_sec - start->tv_sec) * 1000 + (now.tv_nsec - start->tv_nsec) / 1000000;
        if (PQsocket(conn) < 0) {
            snprintf(why, whylen, "%s", PQerrorMessage(conn));
            trim_message(why);
            return -1;
        }
        struct pollfd pfd = {PQsocket(conn), POLLIN, 0};
        int ready =
            spent < CHECK_STATEMENT_MS ? poll(&pfd, 1, (int)(CHECK_STATEMENT_MS - spent)) : 0;
        if (ready < 0 && errno == EINTR)
            continue;
        if (ready == 0) {
            snprintf(why, whylen, "no answer from the database within %d s",
                     CHECK_STATEMENT_MS / 1000);
            return -1;
        }
        if (ready < 0 || !PQconsumeInput(conn)) {
            snprintf(why, whylen, "%s", ready < 0 ? strerror(errno) : PQerrorMessage(conn));
            trim_message(why);
            return -1;
        }
    }
    return 0;
}

/* Runs one statement with parameters and waits at most CHECK_STATEMENT_MS for all of its
 * results (the end of the statement included: a server gone silent between a result and
 * the next message would otherwise block PQgetResult). Returns the result (caller PQclears)
 * when it is PGRES_TUPLES_OK or PGRES_COMMAND_OK, or NULL with why. */
static PGresult *exec_bounded(PGconn *conn, const char *sql, int nparams, const char *const *params,
                              char *why, size_t whylen)
{
    if (!PQsendQueryParams(conn, sql, nparams, NULL, params, NULL, NULL, 0)) {
        snprintf(why, whylen, "%s", PQerrorMessage(conn));
        trim_message(why);
        return NULL;
    }
    struct timespec start;
    clock_gettime(CLOCK_MONOTONIC, &start);
    if (wait_result(conn, &start, why, whylen))
        return NULL;
    PGresult *res = PQgetResult(conn);
    for (;;) {
        if (wait_result(conn, &start, why, whylen)) {
            PQclear(res);
            return NULL;
        }
        PGresult *more = PQgetResult(conn);
        if (!more)
            break;
        PQclear(more);
    }
    ExecStatusType st = PQresultStatus(res);
    if (st != PGRES_TUPLES_OK && st != PGRES_COMMAND_OK) {
        snprintf(why, whylen, "%s", res ? PQresultErrorMessage(res) : PQerrorMessage(conn));
        trim_message(why);
        PQclear(res);
        return NULL;
    }
    return res;
}

static int check_columns(PGconn *conn, const char *schema, const char *table, bool dead,
                         const char *db, char *err, size_t errlen)
{
    const char *params[2] = {schema, table};
    char why[512];
    PGresult *res = exec_bounded(conn,
                                 "SELECT column_name, data_type FROM information_schema.columns "
                                 "WHERE table_schema = $1 AND table_name = $2",
                                 2, params, why, sizeof(why));
    if (!res) {
        snprintf(err, errlen, "table %s.%s (%s): cannot read its columns: %s", schema, table, db,
                 why);
        return -1;
    }
    int rows = PQntuples(res);
    if (rows == 0) {
        snprintf(err, errlen, "table %s.%s does not exist in database %s%s", schema, table, db,
                 dead ? " (the relay's dead-letter table: create the outbox with "
                        "saga.create_outbox())"
                      : " (create it with SELECT saga.create_outbox('schema'))");
        PQclear(res);
        return -1;
    }
    size_t ncols = sizeof(required_columns) / sizeof(required_columns[0]);
    for (size_t k = 0; k < ncols + (dead ? 1 : 0); k++) {
        const char *col = k < ncols ? required_columns[k].column : "error";
        const char *type = k < ncols ? required_columns[k].type : "text";
        int found = -1;
        for (int i = 0; i < rows; i++)
            if (!strcmp(PQgetvalue(res, i, 0), col))
                found = i;
        if (found < 0) {
            snprintf(err, errlen, "table %s.%s (%s): column %s is missing (expected %s)", schema,
                     table, db, col, type);
            PQclear(res);
            return -1;
        }
        if (strcmp(PQgetvalue(res, found, 1), type)) {
            snprintf(err, errlen, "table %s.%s (%s): column %s is %s, expected %s", schema, table,
                     db, col, PQgetvalue(res, found, 1), type);
            PQclear(res);
            return -1;
        }
    }
    PQclear(res);
    return 0;
}

int outbox_table_check(const struct outbox_source *src, char *err, size_t errlen)
{
    char db[512];
    settings_redact_conninfo(src->conninfo, db, sizeof(db));
    /* A bounded connect: an unreachable database at start is a configuration error. The
     * keywords after dbname (expanded from the conninfo) override it, so those the user may
     * have set are only added when the conninfo leaves them out. */
    const char *keys[16] = {"dbname", "connect_timeout", "application_name"};
    const char *vals[16] = {src->conninfo, CHECK_CONNECT_TIMEOUT, "outbox-relay"};
    int n = 3;
    static const char *const bounds[][2] = {
        {"keepalives", "1"},       {"keepalives_idle", "5"},      {"keepalives_interval", "2"},
        {"keepalives_count", "3"}, {"tcp_user_timeout", "10000"},
    };
    PQconninfoOption *given = PQconninfoParse(src->conninfo, NULL);
    for (size_t b = 0; b < sizeof(bounds) / sizeof(bounds[0]); b++) {
        bool set = false;
        for (PQconninfoOption *o = given; o && o->keyword; o++)
            if (!strcmp(o->keyword, bounds[b][0]) && o->val && *o->val)
                set = true;
        if (!set) {
            keys[n] = bounds[b][0];
            vals[n++] = bounds[b][1];
        }
    }
    keys[n] = vals[n] = NULL;
    PGconn *conn = PQconnectdbParams(keys, vals, 1);
    PQconninfoFree(given);
    int rc = -1;
    char why[2048];
    if (PQstatus(conn) != CONNECTION_OK) {
        char msg[512];
        snprintf(msg, sizeof(msg), "%s", PQerrorMessage(conn));
        trim_message(msg);
        snprintf(why, sizeof(why), "cannot connect to database %s for table %s.%s: %s", db,
                 src->schema, src->table, msg);
        goto out;
    }
    /* One read-only transaction (read committed whatever the server's default: a
     * serializable deferrable default would wait for a safe snapshot), its statement_timeout
     * local to it: behind a pooler in
     * transaction mode the statements stay on one server session and leave nothing set on
     * it. The transaction ends with the connection (PQfinish). */
    char timeout[24], failed[512];
    snprintf(timeout, sizeof(timeout), "%d", CHECK_STATEMENT_MS);
    PGresult *res = exec_bounded(conn, "BEGIN ISOLATION LEVEL READ COMMITTED READ ONLY", 0, NULL,
                                 failed, sizeof(failed));
    if (res) {
        PQclear(res);
        res = exec_bounded(conn, "SELECT set_config('statement_timeout', $1, true)", 1,
                           (const char *[]){timeout}, failed, sizeof(failed));
    }
    if (!res) {
        snprintf(why, sizeof(why), "table %s.%s (%s): cannot start the check: %s", src->schema,
                 src->table, db, failed);
        goto out;
    }
    PQclear(res);
    if (check_columns(conn, src->schema, src->table, false, db, why, sizeof(why)))
        goto out;
    char dead[128];
    snprintf(dead, sizeof(dead), "%s_dead_letters", src->table);
    if (check_columns(conn, src->schema, dead, true, db, why, sizeof(why)))
        goto out;
    rc = 0;
out:
    if (rc)
        snprintf(err, errlen, "%s%s%s", src->where ? src->where : "", src->where ? ": " : "", why);
    PQfinish(conn);
    return rc;
}
