/* example-participant: the example saga participants (inventory, payment, orders, shipping)
 * in one small program. Copy it for a new service (examples/README.md says how).
 *
 * It consumes its command topic in a consumer group and hands each batch of commands to ONE
 * SQL call, SELECT <service>.handle_commands($1::jsonb), which dedupes by idempotency-key,
 * changes the business tables, records the inbox and writes the replies into the service's
 * own outbox, all in that one transaction (examples/<service>/schema.sql). outbox-relay
 * publishes the replies. Offsets are committed only after that transaction committed, so a
 * crash can only deliver commands again, and the inbox answers those without redoing them.
 *
 * Everything runs on one libev loop: librdkafka wakes it through the consumer queue's
 * io-event fd, PostgreSQL is a nonblocking pgloop connection. The only blocking work is at
 * start (migrations and schema, before the loop runs) and at exit (the last offset commit,
 * leaving the group). */
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cjson/cJSON.h>
#include <ev.h>
#include <libpq-fe.h>
#include <librdkafka/rdkafka.h>

#include "kafka_conf.h"
#include "log.h"
#include "migrate.h"
#include "pgloop.h"
#include "schemas.h"
#include "settings.h"

struct config {
    char *service;
    char *database_url;
    char *kafka_brokers;
    char *topic;
    char *group;
    char *log_level;
    int batch_size;
    int64_t retry_max_ms;
    int64_t drain_timeout_ms;
};

/* The batch in hand: read from Kafka, not yet committed to the database. It is kept until
 * the database accepted it (retried as often as needed), then its offsets are committed. */
struct batch {
    cJSON *commands;                          /* JSON array sent to handle_commands */
    rd_kafka_topic_partition_list_t *offsets; /* next offset per partition, to commit */
    char *text;                               /* commands printed, or the single one sent */
    int single;                               /* -1: whole batch; else index sent alone */
    bool in_flight;
};

struct participant {
    struct config cfg;
    struct ev_loop *loop;
    char sql[128];

    rd_kafka_t *rk;
    int event_fds[2];
    ev_io kafka_io;
    ev_timer kafka_poll;

    struct pgloop *pg;
    ev_timer reconnect;
    int64_t reconnect_ms;

    struct batch batch;
    bool have_batch;
    ev_timer retry;
    int64_t retry_ms;

    bool stopping;
    ev_signal sig_term, sig_int;
    ev_timer drain_deadline;
    int exit_status;

    /* Counters, logged at exit (and per batch at debug level). */
    long handled, replayed, failed, dropped, skipped, malformed, db_errors;
};

static struct participant p = {.event_fds = {-1, -1}};

static void fill_batch(void);
static void send_batch(void);

/* ---------------------------------------------------------------------------------------
 * Configuration
 * ------------------------------------------------------------------------------------- */

static const struct setting settings_table[] = {
    {"service", "PARTICIPANT_SERVICE", SETTING_STRING, &p.cfg.service, NULL,
     "inventory, payment, orders or shipping", false, 0, 0},
    {"database-url", "PARTICIPANT_DATABASE_URL", SETTING_STRING, &p.cfg.database_url, NULL,
     "libpq conninfo or URI of the service's own database", true, 0, 0},
    {"kafka-brokers", "PARTICIPANT_KAFKA_BROKERS", SETTING_STRING, &p.cfg.kafka_brokers, NULL,
     "Kafka bootstrap servers (host:port,...)", false, 0, 0},
    {"topic", "PARTICIPANT_TOPIC", SETTING_STRING, &p.cfg.topic, NULL,
     "command topic (default <service>.commands)", false, 0, 0},
    {"group", "PARTICIPANT_GROUP", SETTING_STRING, &p.cfg.group, NULL,
     "consumer group (default <service>)", false, 0, 0},
    {"batch-size", "PARTICIPANT_BATCH_SIZE", SETTING_INT, &p.cfg.batch_size, "500",
     "commands per database transaction", false, 1, 10000},
    {"retry-max", "PARTICIPANT_RETRY_MAX", SETTING_DURATION, &p.cfg.retry_max_ms, "10s",
     "longest wait between database retries and reconnects", false, 10, 3600000},
    {"drain-timeout", "PARTICIPANT_DRAIN_TIMEOUT", SETTING_DURATION, &p.cfg.drain_timeout_ms, "30s",
     "on SIGTERM, how long to keep retrying the batch in hand", false, 0, 3600000},
    {"log-level", "PARTICIPANT_LOG_LEVEL", SETTING_STRING, &p.cfg.log_level, "info",
     "debug, info, warn or error", false, 0, 0},
};
#define SETTINGS_COUNT (sizeof(settings_table) / sizeof(settings_table[0]))

static const struct participant_schema *find_schema(const char *service)
{
    for (size_t i = 0; i < participant_schema_count; i++)
        if (!strcmp(participant_schemas[i].service, service))
            return &participant_schemas[i];
    return NULL;
}

/* Returns 0, 1 (--help) or -1 with a message in err naming the setting. */
static int config_load(int argc, char **argv, char *err, size_t errlen)
{
    int rc = settings_load(settings_table, SETTINGS_COUNT, argc, argv, "example-participant", err,
                           errlen);
    if (rc)
        return rc;
    if (!p.cfg.service || !find_schema(p.cfg.service)) {
        size_t len =
            (size_t)snprintf(err, errlen, "--service / PARTICIPANT_SERVICE: must be one of");
        for (size_t i = 0; i < participant_schema_count && len < errlen; i++)
            len += (size_t)snprintf(err + len, errlen - len, " %s", participant_schemas[i].service);
        return -1;
    }
    if (!p.cfg.kafka_brokers || !*p.cfg.kafka_brokers) {
        snprintf(err, errlen, "--kafka-brokers / PARTICIPANT_KAFKA_BROKERS: required");
        return -1;
    }
    enum log_level level;
    if (log_level_parse(p.cfg.log_level, &level)) {
        snprintf(err, errlen,
                 "--log-level / PARTICIPANT_LOG_LEVEL: \"%s\" is not one of debug, "
                 "info, warn, error",
                 p.cfg.log_level);
        return -1;
    }
    log_min_level = level;
    char def[256];
    if (!p.cfg.topic) {
        snprintf(def, sizeof(def), "%s.commands", p.cfg.service);
        p.cfg.topic = strdup(def);
    }
    if (!p.cfg.group)
        p.cfg.group = strdup(p.cfg.service);
    if (!p.cfg.database_url)
        p.cfg.database_url = strdup(""); /* libpq's PG* variables */
    if (!p.cfg.topic || !p.cfg.group || !p.cfg.database_url) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    /* The service name is one of the four above, so it is a safe identifier. */
    snprintf(p.sql, sizeof(p.sql), "SELECT %s.handle_commands($1::jsonb)", p.cfg.service);
    return 0;
}

/* ---------------------------------------------------------------------------------------
 * Start-up: the saga schema (for saga.create_outbox) and the service's schema, blocking,
 * before the loop runs.
 * ------------------------------------------------------------------------------------- */

static int exec_ok(PGconn *conn, const char *sql, char *err, size_t errlen)
{
    PGresult *res = PQexec(conn, sql);
    ExecStatusType st = PQresultStatus(res);
    int rc = 0;
    if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK) {
        const char *msg = PQresultErrorMessage(res);
        snprintf(err, errlen, "%s", msg && *msg ? msg : PQerrorMessage(conn));
        size_t n = strlen(err);
        while (n && (err[n - 1] == '\n' || err[n - 1] == ' '))
            err[--n] = '\0';
        rc = -1;
    }
    PQclear(res);
    return rc;
}

static int schema_install(char *err, size_t errlen)
{
    char msg[768];
    int rc = -1;
    PGconn *conn = PQconnectdb(p.cfg.database_url);
    if (PQstatus(conn) != CONNECTION_OK) {
        snprintf(err, errlen, "--database-url / PARTICIPANT_DATABASE_URL: cannot connect: %s",
                 PQerrorMessage(conn));
        goto out;
    }
    struct migrate_options o = migrate_default_options;
    o.on_retry = migrate_log_retry;
    int applied = migrate_apply_with(conn, migrations_builtin, migrations_builtin_count, &o, msg,
                                     sizeof(msg));
    if (applied < 0) {
        snprintf(err, errlen, "saga schema: %s", msg);
        goto out;
    }
    /* Several replicas may start at once: CREATE OR REPLACE FUNCTION run concurrently can fail
     * with "tuple concurrently updated", so the schema is applied under an advisory lock. The
     * contract and then the service's schema are each one implicit transaction (PQexec of several
     * statements); a stop between the two leaves the contract alone, and the next start
     * applies both again (idempotent). */
    char lock[160];
    snprintf(lock, sizeof(lock), "SELECT pg_advisory_lock(hashtext('example-participant/%s'))",
             p.cfg.service);
    if (exec_ok(conn, "SET client_min_messages = warning", msg, sizeof(msg)) ||
        exec_ok(conn, lock, msg, sizeof(msg))) {
        snprintf(err, errlen, "schema %s: %s", p.cfg.service, msg);
        goto out;
    }
    const struct participant_schema *schema = find_schema(p.cfg.service);
    if (exec_ok(conn, schema->contract, msg, sizeof(msg))) {
        snprintf(err, errlen, "examples/contract.sql (for %s): %s", p.cfg.service, msg);
        goto out;
    }
    if (exec_ok(conn, schema->sql, msg, sizeof(msg))) {
        snprintf(err, errlen, "examples/%s/schema.sql: %s", p.cfg.service, msg);
        goto out;
    }
    log_at(LOG_INFO, LOG_FIELDS("service", p.cfg.service), "schema applied (%d saga migration(s))",
           applied);
    rc = 0;
out:
    PQfinish(conn); /* also releases the advisory lock */
    return rc;
}

/* ---------------------------------------------------------------------------------------
 * Kafka messages to commands
 * ------------------------------------------------------------------------------------- */

/* true when s[0..len) is well-formed UTF-8 without NUL (what PostgreSQL's json accepts). */
static bool utf8_valid(const unsigned char *s, size_t len)
{
    size_t i = 0;
    while (i < len) {
        unsigned char c = s[i];
        size_t n;
        unsigned int cp;
        if (c == 0)
            return false;
        if (c < 0x80) {
            i++;
            continue;
        } else if ((c & 0xE0) == 0xC0) {
            n = 1;
            cp = c & 0x1F;
        } else if ((c & 0xF0) == 0xE0) {
            n = 2;
            cp = c & 0x0F;
        } else if ((c & 0xF8) == 0xF0) {
            n = 3;
            cp = c & 0x07;
        } else {
            return false;
        }
        for (size_t k = 1; k <= n; k++) {
            if (i + k >= len || (s[i + k] & 0xC0) != 0x80)
                return false;
            cp = (cp << 6) | (s[i + k] & 0x3F);
        }
        /* overlong forms, surrogates, beyond U+10FFFF */
        if ((n == 1 && cp < 0x80) || (n == 2 && cp < 0x800) || (n == 3 && cp < 0x10000) ||
            (cp >= 0xD800 && cp <= 0xDFFF) || cp > 0x10FFFF)
            return false;
        i += n + 1;
    }
    return true;
}

static const char *const required_headers[] = {"message-id", "event-type", "saga-id",
                                               "idempotency-key", "reply-to"};

/* Turns one message into {"message_id", "headers", "payload", "topic", "partition",
 * "offset"}. Returns the new item (caller's), or NULL with the reason in why. */
static cJSON *command_from_message(const rd_kafka_message_t *m, char *why, size_t whylen)
{
    cJSON *item = cJSON_CreateObject();
    cJSON *headers = cJSON_AddObjectToObject(item, "headers");
    if (!item || !headers) {
        snprintf(why, whylen, "out of memory");
        goto fail;
    }
    rd_kafka_headers_t *hdrs = NULL;
    if (rd_kafka_message_headers(m, &hdrs) != RD_KAFKA_RESP_ERR_NO_ERROR) {
        snprintf(why, whylen, "no headers");
        goto fail;
    }
    const char *name;
    const void *val;
    size_t size;
    for (size_t idx = 0; !rd_kafka_header_get_all(hdrs, idx, &name, &val, &size); idx++) {
        if (!val || !utf8_valid(val, size) ||
            !utf8_valid((const unsigned char *)name, strlen(name))) {
            snprintf(why, whylen, "header %.64s is not UTF-8 text", name);
            goto fail;
        }
        char *copy = strndup(val, size);
        cJSON *s = copy ? cJSON_CreateString(copy) : NULL;
        free(copy);
        if (!s) {
            snprintf(why, whylen, "out of memory");
            goto fail;
        }
        cJSON_DeleteItemFromObjectCaseSensitive(headers, name); /* the last one wins */
        cJSON_AddItemToObject(headers, name, s);
    }
    for (size_t i = 0; i < sizeof(required_headers) / sizeof(required_headers[0]); i++) {
        cJSON *h = cJSON_GetObjectItemCaseSensitive(headers, required_headers[i]);
        if (!cJSON_IsString(h) || !*h->valuestring) {
            snprintf(why, whylen, "header %s missing", required_headers[i]);
            goto fail;
        }
    }
    if (!m->payload || !utf8_valid(m->payload, m->len)) {
        snprintf(why, whylen, "value is not UTF-8 text");
        goto fail;
    }
    const char *end = NULL;
    cJSON *payload = cJSON_ParseWithLengthOpts(m->payload, m->len, &end, false);
    if (!cJSON_IsObject(payload)) {
        cJSON_Delete(payload);
        snprintf(why, whylen, "value is not a JSON object");
        goto fail;
    }
    cJSON_AddItemToObject(item, "payload", payload);
    cJSON *mid = cJSON_GetObjectItemCaseSensitive(headers, "message-id");
    if (!cJSON_AddStringToObject(item, "message_id", mid->valuestring) ||
        !cJSON_AddStringToObject(item, "topic", rd_kafka_topic_name(m->rkt)) ||
        !cJSON_AddNumberToObject(item, "partition", m->partition) ||
        !cJSON_AddNumberToObject(item, "offset", (double)m->offset)) {
        snprintf(why, whylen, "out of memory");
        goto fail;
    }
    return item;
fail:
    cJSON_Delete(item);
    return NULL;
}

/* ---------------------------------------------------------------------------------------
 * Batches
 * ------------------------------------------------------------------------------------- */

static void batch_free(void)
{
    cJSON_Delete(p.batch.commands);
    if (p.batch.offsets)
        rd_kafka_topic_partition_list_destroy(p.batch.offsets);
    free(p.batch.text);
    memset(&p.batch, 0, sizeof(p.batch));
    p.have_batch = false;
}

static void commit_cb(rd_kafka_t *rk, rd_kafka_resp_err_t err,
                      rd_kafka_topic_partition_list_t *offsets, void *opaque)
{
    /* A failed commit loses nothing: the commands come again and the inbox answers them. */
    if (err && err != RD_KAFKA_RESP_ERR__NO_OFFSET)
        log_at(LOG_WARN, LOG_FIELDS("error", rd_kafka_err2name(err)),
               "offset commit failed; the batch will be delivered again (deduplicated)");
}

static void finish(void)
{
    ev_break(p.loop, EVBREAK_ALL);
}

/* The database committed the batch (or it held only malformed messages): commit offsets. */
static void batch_done(void)
{
    if (p.batch.offsets && p.batch.offsets->cnt) {
        /* Asynchronous, also when stopping: the consumer's close (consumer_stop) waits for
         * the commits in flight, within its bound. A synchronous one here waited ~the session
         * timeout with the broker down (45 s by default), outside any bound. */
        rd_kafka_resp_err_t err = rd_kafka_commit(p.rk, p.batch.offsets, 1);
        if (err)
            commit_cb(p.rk, err, p.batch.offsets, NULL);
    }
    batch_free();
    p.retry_ms = 0;
    if (p.stopping)
        finish();
    else
        fill_batch();
}

static void add_counts(const char *json)
{
    cJSON *doc = cJSON_Parse(json);
    struct {
        const char *name;
        long *counter;
    } fields[] = {{"handled", &p.handled},
                  {"replayed", &p.replayed},
                  {"failed", &p.failed},
                  {"dropped", &p.dropped},
                  {"skipped", &p.skipped}};
    for (size_t i = 0; i < sizeof(fields) / sizeof(fields[0]); i++) {
        cJSON *n = cJSON_GetObjectItemCaseSensitive(doc, fields[i].name);
        if (cJSON_IsNumber(n))
            *fields[i].counter += (long)n->valuedouble;
    }
    cJSON_Delete(doc);
}

static void schedule_retry(void)
{
    p.retry_ms = p.retry_ms ? p.retry_ms * 2 : 100;
    if (p.retry_ms > p.cfg.retry_max_ms)
        p.retry_ms = p.cfg.retry_max_ms;
    ev_timer_stop(p.loop, &p.retry);
    ev_timer_set(&p.retry, (double)p.retry_ms / 1000.0, 0.0);
    ev_timer_start(p.loop, &p.retry);
}

static void result_cb(struct pgloop *pg, PGresult *res, void *arg)
{
    p.batch.in_flight = false;
    int count = cJSON_GetArraySize(p.batch.commands);
    if (res && PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) == 1) {
        const char *counts = PQgetvalue(res, 0, 0);
        add_counts(counts);
        log_at(LOG_DEBUG, LOG_FIELDS("counts", counts), "batch of %d command(s) committed",
               p.batch.single < 0 ? count : 1);
        if (p.batch.single >= 0 && ++p.batch.single < count) {
            send_batch(); /* isolating a bad command: the next one alone */
            return;
        }
        batch_done();
        return;
    }
    const char *state = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
    const char *msg = res ? PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY) : pgloop_error(pg);
    /* Class 22 (data exception) from the call itself means the array was refused as a whole
     * (handle_commands turns a bad command into a failure reply): find the command that
     * PostgreSQL refuses by sending them one by one, and skip only that one. */
    if (state && !strncmp(state, "22", 2)) {
        if (p.batch.single < 0 && count > 1) {
            log_at(LOG_WARN, LOG_FIELDS("sqlstate", state, "error", msg),
                   "the database refused the batch; handling its %d commands one by one", count);
            p.batch.single = 0;
            send_batch();
            return;
        }
        int idx = p.batch.single < 0 ? 0 : p.batch.single;
        cJSON *bad = cJSON_GetArrayItem(p.batch.commands, idx);
        cJSON *mid = cJSON_GetObjectItemCaseSensitive(bad, "message_id");
        log_at(LOG_ERROR,
               LOG_FIELDS("sqlstate", state, "error", msg, "message_id",
                          cJSON_IsString(mid) ? mid->valuestring : NULL),
               "the database refused a command; skipped");
        p.malformed++;
        if (p.batch.single >= 0 && ++p.batch.single < count) {
            send_batch();
            return;
        }
        batch_done();
        return;
    }
    p.db_errors++;
    log_at(LOG_WARN, LOG_FIELDS("sqlstate", state, "error", msg),
           "batch not committed; retrying (offsets not committed)");
    schedule_retry();
}

static void send_batch(void)
{
    if (!p.have_batch || p.batch.in_flight || !pgloop_ready(p.pg) || pgloop_busy(p.pg))
        return; /* the reconnect or the retry timer sends it later */
    free(p.batch.text);
    if (p.batch.single < 0) {
        p.batch.text = cJSON_PrintUnformatted(p.batch.commands);
    } else {
        cJSON *one = cJSON_CreateArray();
        cJSON *dup = cJSON_Duplicate(cJSON_GetArrayItem(p.batch.commands, p.batch.single), true);
        if (one && dup)
            cJSON_AddItemToArray(one, dup);
        else
            cJSON_Delete(dup);
        p.batch.text = one && dup ? cJSON_PrintUnformatted(one) : NULL;
        cJSON_Delete(one);
    }
    if (!p.batch.text) {
        log_error("out of memory printing a batch; exiting (offsets not committed)");
        p.exit_status = 1;
        finish();
        return;
    }
    const char *params[] = {p.batch.text};
    if (pgloop_query(p.pg, p.sql, 1, params, result_cb, NULL)) {
        schedule_retry(); /* the connection is reported lost from the loop */
        return;
    }
    p.batch.in_flight = true;
}

/* Reads up to batch-size messages that are already here (never waits) into a new batch. */
static void fill_batch(void)
{
    if (p.have_batch || p.stopping || !pgloop_ready(p.pg))
        return;
    p.batch.commands = cJSON_CreateArray();
    p.batch.offsets = rd_kafka_topic_partition_list_new(8);
    p.batch.single = -1;
    if (!p.batch.commands || !p.batch.offsets) {
        log_error("out of memory creating a batch; exiting");
        batch_free();
        p.exit_status = 1;
        finish();
        return;
    }
    p.have_batch = true;
    int commands = 0;
    while (commands < p.cfg.batch_size) {
        rd_kafka_message_t *m = rd_kafka_consumer_poll(p.rk, 0);
        if (!m)
            break;
        if (m->err) {
            if (m->err != RD_KAFKA_RESP_ERR__PARTITION_EOF)
                log_at(LOG_WARN, LOG_FIELDS("error", rd_kafka_err2name(m->err)), "kafka: %s",
                       rd_kafka_message_errstr(m));
            rd_kafka_message_destroy(m);
            continue;
        }
        const char *topic = rd_kafka_topic_name(m->rkt);
        rd_kafka_topic_partition_t *tp =
            rd_kafka_topic_partition_list_find(p.batch.offsets, topic, m->partition);
        if (!tp)
            tp = rd_kafka_topic_partition_list_add(p.batch.offsets, topic, m->partition);
        tp->offset = m->offset + 1;
        char why[160];
        cJSON *item = command_from_message(m, why, sizeof(why));
        if (item) {
            cJSON_AddItemToArray(p.batch.commands, item);
            commands++;
        } else {
            char part[16], off[24];
            snprintf(part, sizeof(part), "%d", (int)m->partition);
            snprintf(off, sizeof(off), "%lld", (long long)m->offset);
            p.malformed++;
            log_at(LOG_WARN, LOG_FIELDS("topic", topic, "partition", part, "offset", off),
                   "malformed command skipped: %s", why);
        }
        rd_kafka_message_destroy(m);
    }
    if (!p.batch.offsets->cnt) {
        batch_free(); /* nothing came */
        return;
    }
    if (!commands) {
        batch_done(); /* only malformed messages: skip them */
        return;
    }
    send_batch();
}

/* ---------------------------------------------------------------------------------------
 * Wiring: database state, Kafka wake-ups, signals
 * ------------------------------------------------------------------------------------- */

static void reconnect_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    if (pgloop_connect(p.pg)) {
        log_at(LOG_WARN, LOG_FIELDS("error", pgloop_error(p.pg)), "database connect failed");
        p.reconnect_ms = p.reconnect_ms ? p.reconnect_ms * 2 : 100;
        if (p.reconnect_ms > p.cfg.retry_max_ms)
            p.reconnect_ms = p.cfg.retry_max_ms;
        ev_timer_set(&p.reconnect, (double)p.reconnect_ms / 1000.0, 0.0);
        ev_timer_start(loop, &p.reconnect);
    }
}

static void db_state_cb(struct pgloop *pg, bool ok, void *arg)
{
    if (ok) {
        log_info("database connected");
        p.reconnect_ms = 0;
        if (p.have_batch)
            send_batch();
        else
            fill_batch();
        return;
    }
    p.batch.in_flight = false;
    p.reconnect_ms = p.reconnect_ms ? p.reconnect_ms * 2 : 100;
    if (p.reconnect_ms > p.cfg.retry_max_ms)
        p.reconnect_ms = p.cfg.retry_max_ms;
    log_at(LOG_WARN, LOG_FIELDS("error", pgloop_error(pg)),
           "database connection lost; reconnecting in %lld ms", (long long)p.reconnect_ms);
    ev_timer_stop(p.loop, &p.reconnect);
    ev_timer_set(&p.reconnect, (double)p.reconnect_ms / 1000.0, 0.0);
    ev_timer_start(p.loop, &p.reconnect);
}

static void retry_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    send_batch();
}

static void kafka_io_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    char buf[256];
    while (read(p.event_fds[0], buf, sizeof(buf)) > 0)
        ;
    fill_batch();
}

static void kafka_poll_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    fill_batch(); /* a safety net (and serves librdkafka's callbacks); the io-event wakes us */
}

static void drain_deadline_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    log_warn("drain timeout: exiting without committing the batch in hand; its commands come "
             "again and are deduplicated");
    finish();
}

static void stop_cb(struct ev_loop *loop, ev_signal *w, int revents)
{
    if (p.stopping)
        return;
    p.stopping = true;
    log_at(LOG_INFO, LOG_FIELDS("signal", w->signum == SIGTERM ? "SIGTERM" : "SIGINT"),
           "stopping: finishing the batch in hand");
    if (!p.have_batch) {
        finish();
        return;
    }
    ev_timer_init(&p.drain_deadline, drain_deadline_cb, (double)p.cfg.drain_timeout_ms / 1000.0,
                  0.0);
    ev_timer_start(loop, &p.drain_deadline);
}

static void error_cb(rd_kafka_t *rk, int err, const char *reason, void *opaque)
{
    log_at(LOG_WARN, LOG_FIELDS("error", rd_kafka_err2name((rd_kafka_resp_err_t)err)), "kafka: %s",
           reason);
}

static int consumer_start(char *err, size_t errlen)
{
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    /* Offsets are committed by hand, after the database transaction committed. */
    const char *props[][2] = {
        {"bootstrap.servers", p.cfg.kafka_brokers},
        {"group.id", p.cfg.group},
        {"enable.auto.commit", "false"},
        {"enable.auto.offset.store", "false"},
        {"auto.offset.reset", "earliest"},
        {"client.id", "example-participant"},
    };
    for (size_t i = 0; i < sizeof(props) / sizeof(props[0]); i++) {
        char what[128];
        snprintf(what, sizeof(what), "consumer property %s", props[i][0]);
        if (kafka_conf_set(conf, props[i][0], props[i][1], what, err, errlen)) {
            rd_kafka_conf_destroy(conf);
            return -1;
        }
    }
    if (kafka_conf_apply_env(conf, err, errlen)) {
        rd_kafka_conf_destroy(conf);
        return -1;
    }
    kafka_conf_log_json(conf); /* librdkafka's lines as JSON lines, like ours */
    rd_kafka_conf_set_error_cb(conf, error_cb);
    rd_kafka_conf_set_offset_commit_cb(conf, commit_cb);
    char reason[512];
    p.rk = rd_kafka_new(RD_KAFKA_CONSUMER, conf, reason, sizeof(reason));
    if (!p.rk) {
        rd_kafka_conf_destroy(conf);
        snprintf(err, errlen, "cannot create the Kafka consumer: %s", reason);
        return -1;
    }
    rd_kafka_poll_set_consumer(p.rk); /* callbacks are served by rd_kafka_consumer_poll */
    rd_kafka_topic_partition_list_t *topics = rd_kafka_topic_partition_list_new(1);
    rd_kafka_topic_partition_list_add(topics, p.cfg.topic, RD_KAFKA_PARTITION_UA);
    rd_kafka_resp_err_t serr = rd_kafka_subscribe(p.rk, topics);
    rd_kafka_topic_partition_list_destroy(topics);
    if (serr) {
        snprintf(err, errlen, "--topic / PARTICIPANT_TOPIC: cannot subscribe to %s: %s",
                 p.cfg.topic, rd_kafka_err2str(serr));
        return -1;
    }
    if (pipe2(p.event_fds, O_NONBLOCK | O_CLOEXEC)) {
        snprintf(err, errlen, "pipe: out of file descriptors");
        return -1;
    }
    rd_kafka_queue_t *q = rd_kafka_queue_get_consumer(p.rk);
    rd_kafka_queue_io_event_enable(q, p.event_fds[1], "1", 1);
    rd_kafka_queue_destroy(q);
    ev_io_init(&p.kafka_io, kafka_io_cb, p.event_fds[0], EV_READ);
    ev_io_start(p.loop, &p.kafka_io);
    ev_timer_init(&p.kafka_poll, kafka_poll_cb, 0.1, 0.1);
    ev_timer_start(p.loop, &p.kafka_poll);
    return 0;
}

static void consumer_stop(void)
{
    if (!p.rk)
        return;
    ev_io_stop(p.loop, &p.kafka_io);
    ev_timer_stop(p.loop, &p.kafka_poll);
    /* Completes the commit of the last batch in flight (batch_done) and leaves the group,
     * waiting 5 s at most; on the way out (main), so a consumer not closed in time is left to
     * the exit, with its pipe. */
    bool closed = kafka_consumer_close(p.rk, 5000);
    p.rk = NULL;
    if (!closed) {
        log_at(LOG_WARN, NULL,
               "consumer not closed within 5 s (Kafka unreachable?): exiting without it; its "
               "partitions move to the other replicas at the session timeout at the latest");
        return;
    }
    for (int i = 0; i < 2; i++)
        if (p.event_fds[i] >= 0)
            close(p.event_fds[i]);
}

int main(int argc, char **argv)
{
    char err[1024];
    log_init(stdout, "example-participant");
    int rc = config_load(argc - 1, argv + 1, err, sizeof(err));
    if (rc == 1) {
        settings_free(settings_table, SETTINGS_COUNT);
        return 0;
    }
    if (rc) {
        log_error("configuration: %s", err);
        fprintf(stderr, "example-participant: %s\n", err);
        settings_free(settings_table, SETTINGS_COUNT);
        return 2;
    }
    if (schema_install(err, sizeof(err))) {
        log_error("%s", err);
        fprintf(stderr, "example-participant: %s\n", err);
        settings_free(settings_table, SETTINGS_COUNT);
        return 1;
    }

    p.loop = ev_default_loop(EVFLAG_AUTO);
    p.pg = pgloop_create(p.loop, p.cfg.database_url, db_state_cb, NULL, NULL);
    if (!p.pg) {
        log_error("out of memory");
        p.exit_status = 1;
        goto out;
    }
    ev_timer_init(&p.reconnect, reconnect_cb, 0.0, 0.0);
    ev_timer_init(&p.retry, retry_cb, 0.0, 0.0);
    if (consumer_start(err, sizeof(err))) {
        log_error("configuration: %s", err);
        fprintf(stderr, "example-participant: %s\n", err);
        p.exit_status = 2;
        goto out;
    }
    ev_signal_init(&p.sig_term, stop_cb, SIGTERM);
    ev_signal_init(&p.sig_int, stop_cb, SIGINT);
    ev_signal_start(p.loop, &p.sig_term);
    ev_signal_start(p.loop, &p.sig_int);
    signal(SIGPIPE, SIG_IGN);
    ev_timer_start(p.loop, &p.reconnect); /* connects at once */

    log_at(LOG_INFO,
           LOG_FIELDS("service", p.cfg.service, "topic", p.cfg.topic, "group", p.cfg.group,
                      "brokers", p.cfg.kafka_brokers),
           "example participant starting");
    ev_run(p.loop, 0);

out:
    consumer_stop();
    batch_free();
    pgloop_destroy(p.pg);
    char counts[256];
    snprintf(counts, sizeof(counts),
             "{\"handled\":%ld,\"replayed\":%ld,\"failed\":%ld,\"dropped\":%ld,\"skipped\":%ld,"
             "\"malformed\":%ld,\"db_errors\":%ld}",
             p.handled, p.replayed, p.failed, p.dropped, p.skipped, p.malformed, p.db_errors);
    log_at(LOG_INFO, LOG_FIELDS("counts", counts), "example participant stopped");
    settings_free(settings_table, SETTINGS_COUNT);
    return p.exit_status;
}
