/* saga-orchestrator: runs the sagas defined in SAGA_DEFINITIONS_DIR. Config, start-up
 * definitions), wiring and the loop; the work is in worker.c, replies.c and store.c. */
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <libpq-fe.h>

#include "admin.h"
#include "kafka_conf.h"
#include "log.h"
#include "metrics.h"
#include "migrate.h"
#include "orchestrator.h"
#include "settings.h"
#include "uuid.h"

#define SETTINGS_TABLE(s)                                                                          \
    {                                                                                              \
        {"database-url",                                                                           \
         "SAGA_DATABASE_URL",                                                                      \
         SETTING_STRING,                                                                           \
         &(s)->database_url,                                                                       \
         NULL,                                                                                     \
         "libpq conninfo or URI (libpq's PG* variables also work)",                                \
         true,                                                                                     \
         0,                                                                                        \
         0},                                                                                       \
            {"kafka-brokers",                                                                      \
             "SAGA_KAFKA_BROKERS",                                                                 \
             SETTING_STRING,                                                                       \
             &(s)->kafka_brokers,                                                                  \
             NULL,                                                                                 \
             "Kafka bootstrap servers of the replies consumer",                                    \
             false,                                                                                \
             0,                                                                                    \
             0},                                                                                   \
            {"definitions-dir",                                                                    \
             "SAGA_DEFINITIONS_DIR",                                                               \
             SETTING_STRING,                                                                       \
             &(s)->definitions_dir,                                                                \
             "sagas",                                                                              \
             "directory of saga definitions (*.json)",                                             \
             false,                                                                                \
             0,                                                                                    \
             0},                                                                                   \
            {"admin-addr",                                                                         \
             "SAGA_ADMIN_ADDR",                                                                    \
             SETTING_STRING,                                                                       \
             &(s)->admin_addr,                                                                     \
             "127.0.0.1:9187",                                                                     \
             "host:port of /healthz, /readyz and /metrics (empty: off)",                           \
             false,                                                                                \
             0,                                                                                    \
             0},                                                                                   \
            {"log-level",                                                                          \
             "SAGA_LOG_LEVEL",                                                                     \
             SETTING_STRING,                                                                       \
             &(s)->log_level,                                                                      \
             "info",                                                                               \
             "debug, info, warn or error",                                                         \
             false,                                                                                \
             0,                                                                                    \
             0},                                                                                   \
            {"group-id",                                                                           \
             "SAGA_CONSUMER_GROUP",                                                                \
             SETTING_STRING,                                                                       \
             &(s)->group_id,                                                                       \
             "saga-orchestrator",                                                                  \
             "Kafka consumer group of the replies",                                                \
             false,                                                                                \
             0,                                                                                    \
             0},                                                                                   \
            {"batch-size", "SAGA_BATCH_SIZE",                                                      \
             SETTING_INT,  &(s)->batch_size,                                                       \
             "200",        "sagas or replies per transaction",                                     \
             false,        1,                                                                      \
             10000},                                                                               \
            {"poll-interval",                                                                      \
             "SAGA_POLL_INTERVAL",                                                                 \
             SETTING_DURATION,                                                                     \
             &(s)->poll_ms,                                                                        \
             "100ms",                                                                              \
             "how often due deadlines are looked for",                                             \
             false,                                                                                \
             1,                                                                                    \
             60000},                                                                               \
            {"reconnect-max",                                                                      \
             "SAGA_RECONNECT_MAX",                                                                 \
             SETTING_DURATION,                                                                     \
             &(s)->reconnect_max_ms,                                                               \
             "10s",                                                                                \
             "longest wait between reconnection attempts",                                         \
             false,                                                                                \
             100,                                                                                  \
             3600000},                                                                             \
    }

static struct orchestrator orch;
static struct admin *admin;
static ev_signal sig_term, sig_int, sig_hup;
static ev_timer status_timer, drain_timer;

static void update_status(void)
{
    char text[1024];
    bool db = worker_ready(orch.claimer) && worker_ready(orch.replier);
    bool ready = db && orch.kafka_up && !orch.stopping;
    snprintf(text, sizeof(text), "database %s\nkafka %s\n%s", db ? "up" : "down",
             orch.kafka_up ? "up" : "down", orch.stopping ? "stopping\n" : "");
    admin_set_status(admin, ready, text);
    admin_heartbeat(admin);
    metrics_gauge_set("saga_replies_queued", NULL, (double)orch.pending_count);
}

static void status_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    update_status();
}

static void drain_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    if (worker_idle(orch.claimer) && worker_idle(orch.replier)) {
        log_info("transactions in hand are finished; exiting");
        ev_break(loop, EVBREAK_ALL);
    }
}

static void stop_cb(struct ev_loop *loop, ev_signal *w, int revents)
{
    if (orch.stopping)
        return;
    log_at(LOG_INFO, LOG_FIELDS("signal", w->signum == SIGTERM ? "SIGTERM" : "SIGINT"),
           "stopping: finishing the transaction in hand");
    orch.stopping = true;
    update_status();
    ev_timer_init(&drain_timer, drain_cb, 0.0, 0.01);
    ev_timer_start(loop, &drain_timer);
}

/* SIGHUP: definitions are validated and registered again, off the loop (a thread with its
 * own blocking connection), then swapped in on the loop. A rejected set changes nothing.
 * The previous registry is retired, not freed: a batch in flight may still point into it.
 * A request that comes while a reload runs is queued, not dropped: the running reload may
 * have read the directory (or saga.definitions) before the change the request is about.
 * Any number of such requests make one more reload, once the running one is done. */
static struct {
    pthread_t thread;
    bool running;
    bool queued; /* requested while running: one more reload after it */
    /* What the logs call the running reload, and the queued one: "SIGHUP" when a signal
     * asked for it, "reload" when the orchestrator did (sagas of a version not loaded here). */
    const char *cause, *queued_cause;
    ev_async done;
    struct registry fresh;
    struct registry retired;
    int rc;
    char err[8192];
} reload;

static void *reload_main(void *arg)
{
    memset(&reload.fresh, 0, sizeof(reload.fresh));
    reload.rc =
        registry_load(&reload.fresh, orch.settings.database_url ? orch.settings.database_url : "",
                      orch.settings.definitions_dir, reload.err, sizeof(reload.err));
    ev_async_send(orch.loop, &reload.done);
    return arg;
}

static void reload_start(const char *cause, const char *why);

static void reload_swap(void)
{
    if (reload.rc) {
        log_at(LOG_ERROR, LOG_FIELDS("errors", reload.err),
               "%s: definitions rejected; still running the previous ones", reload.cause);
        registry_clear(&reload.fresh);
        return;
    }
    struct saga_definition **grown = realloc(
        reload.retired.defs, (reload.retired.count + orch.registry.count + 1) * sizeof(*grown));
    if (!grown) {
        log_error("%s: out of memory; still running the previous definitions", reload.cause);
        registry_clear(&reload.fresh);
        return;
    }
    reload.retired.defs = grown;
    for (size_t i = 0; i < orch.registry.count; i++)
        reload.retired.defs[reload.retired.count++] = orch.registry.defs[i];
    free(orch.registry.defs);
    orch.registry = reload.fresh;
    memset(&reload.fresh, 0, sizeof(reload.fresh));
    if (replies_resubscribe(&orch))
        log_warn("%s: could not subscribe to the reply topics of the new definitions",
                 reload.cause);
    log_info("%s: %zu definition version(s) loaded", reload.cause, orch.registry.count);
}

static void reload_done_cb(struct ev_loop *loop, ev_async *w, int revents)
{
    pthread_join(reload.thread, NULL);
    reload.running = false;
    reload_swap();
    if (reload.queued && !orch.stopping) {
        reload.queued = false;
        reload_start(reload.queued_cause, "a reload requested while the previous one ran");
    }
}

/* Starts a reload, or queues one when a reload is running (see above). cause names it in
 * the logs ("SIGHUP" or "reload", static); a queued reload is a SIGHUP's when any of the
 * requests it stands for was. Loop thread only. */
static void reload_start(const char *cause, const char *why)
{
    if (reload.running) {
        if (!reload.queued)
            log_at(LOG_INFO, LOG_FIELDS("reason", why),
                   "%s: a reload is running; another one follows it", cause);
        if (!reload.queued || !strcmp(cause, "SIGHUP"))
            reload.queued_cause = cause;
        reload.queued = true;
        return;
    }
    reload.running = true;
    reload.cause = cause;
    if (pthread_create(&reload.thread, NULL, reload_main, NULL)) {
        reload.running = false;
        log_error("%s: cannot start the definitions reload thread", cause);
    }
}

void orch_request_reload(void)
{
    reload_start("reload", "sagas of a definition version not loaded here");
}

static void hup_cb(struct ev_loop *loop, ev_signal *w, int revents)
{
    reload_start("SIGHUP", "SIGHUP");
}

static void describe_metrics(void)
{
    metrics_describe("saga_sagas_started_total", "counter", "Sagas that left pending.");
    metrics_describe("saga_sagas_completed_total", "counter", "Sagas completed.");
    metrics_describe("saga_sagas_compensated_total", "counter", "Sagas compensated.");
    metrics_describe("saga_sagas_failed_total", "counter",
                     "Sagas whose compensation gave up (waiting for saga.retry).");
    metrics_describe("saga_replies_total", "counter",
                     "Replies by result: applied, duplicate, late, unknown, malformed, "
                     "dead_lettered.");
    metrics_describe("saga_replies_trace_mismatch_total", "counter",
                     "Replies to a known saga (applied or late) whose traceparent is missing, "
                     "malformed or of another trace than the saga's.");
    metrics_describe("saga_deadlines_fired_total", "counter", "Step timeouts and backoffs fired.");
    metrics_describe("saga_step_latency_seconds", "histogram", "From a command to its reply.");
    metrics_describe("saga_batch_sagas", "histogram", "Sagas per transaction.");
    static const double bounds[] = {1, 2, 5, 10, 20, 50, 100, 200, 500, 1000};
    metrics_histogram_buckets("saga_batch_sagas", bounds, sizeof(bounds) / sizeof(bounds[0]));
    metrics_describe("saga_replies_queued", "gauge", "Replies consumed, not yet applied.");
    metrics_describe("saga_replies_queue_full_total", "counter",
                     "Times the replies consumed and not yet applied reached the in-memory cap "
                     "(1,000): the rest waited in the consumer.");
    metrics_counter_add("saga_replies_queue_full_total", NULL, 0);
    metrics_describe("saga_sagas_in_flight", "gauge",
                     "Sagas not finished, by status (all orchestrators; measured every 5 s).");
    metrics_describe("saga_db_reconnects_total", "counter",
                     "Lost or failed database connections (or session setups).");
}

static int migrate_now(const char *conninfo, char *err, size_t errlen)
{
    PGconn *conn = PQconnectdb(conninfo ? conninfo : "");
    int rc = -1;
    if (PQstatus(conn) != CONNECTION_OK) {
        snprintf(err, errlen, "cannot connect to the database (SAGA_DATABASE_URL): %s",
                 PQerrorMessage(conn));
    } else {
        struct migrate_options o = migrate_default_options;
        o.on_retry = migrate_log_retry;
        int n =
            migrate_apply_with(conn, migrations_builtin, migrations_builtin_count, &o, err, errlen);
        if (n >= 0) {
            if (n)
                log_info("applied %d migration(s)", n);
            rc = 0;
        }
    }
    PQfinish(conn);
    return rc;
}

int main(int argc, char **argv)
{
    char err[8192];
    struct orch_settings *s = &orch.settings;
    struct setting table[] = SETTINGS_TABLE(s);
    size_t nset = sizeof(table) / sizeof(table[0]);
    bool migrate_only = argc > 1 && !strcmp(argv[1], "migrate");
    int status = 1;

    if (argc > 1 && !strcmp(argv[1], "healthcheck"))
        return admin_healthcheck("SAGA_ADMIN_ADDR", "127.0.0.1:9187");
    log_init(stdout, "saga-orchestrator");
    kafka_limit_malloc_arenas();
    int rc = settings_load(table, nset, argc - 1 - migrate_only, argv + 1 + migrate_only,
                           "saga-orchestrator [migrate]", err, sizeof(err));
    if (rc == 1)
        return 0;
    enum log_level level = LOG_INFO;
    if (!rc && log_level_parse(s->log_level, &level)) {
        snprintf(err, sizeof(err),
                 "SAGA_LOG_LEVEL (--log-level): \"%s\" is not one of debug, info, warn, error",
                 s->log_level);
        rc = -1;
    }
    if (!rc && !migrate_only && (!s->kafka_brokers || !*s->kafka_brokers)) {
        snprintf(err, sizeof(err), "SAGA_KAFKA_BROKERS (--kafka-brokers) is required");
        rc = -1;
    }
    /* The consumer's configuration is checked before the migrations: a bad one changes
     * nothing. */
    if (!rc && !migrate_only && replies_check_config(s, err, sizeof(err)))
        rc = -1;
    if (rc) {
        log_error("configuration: %s", err);
        fprintf(stderr, "saga-orchestrator: %s\n", err);
        settings_free(table, nset);
        return 2;
    }
    log_min_level = level;
    describe_metrics();

    if (migrate_now(s->database_url, err, sizeof(err))) {
        log_error("migrations: %s", err);
        fprintf(stderr, "saga-orchestrator: %s\n", err);
        status = 2;
        goto out;
    }
    if (migrate_only) {
        status = 0;
        goto out;
    }
    if (registry_load(&orch.registry, s->database_url ? s->database_url : "", s->definitions_dir,
                      err, sizeof(err))) {
        log_error("definitions: %s", err);
        fprintf(stderr, "saga-orchestrator: definitions rejected:\n%s\n", err);
        status = 2;
        goto out;
    }
    log_info("loaded %zu definition version(s) from %s and saga.definitions", orch.registry.count,
             s->definitions_dir);

    orch.loop = ev_default_loop(EVFLAG_AUTO);
    orch.env.new_uuid = saga_uuid_v7;
    if (replies_start(&orch, err, sizeof(err))) {
        log_error("configuration: %s", err);
        fprintf(stderr, "saga-orchestrator: %s\n", err);
        status = 2;
        goto out;
    }
    if (s->admin_addr && *s->admin_addr) {
        admin = admin_start(s->admin_addr, "SAGA_ADMIN_ADDR", err, sizeof(err));
        if (!admin) {
            log_error("configuration: %s", err);
            fprintf(stderr, "saga-orchestrator: %s\n", err);
            status = 2;
            goto out;
        }
        char port[16];
        snprintf(port, sizeof(port), "%d", admin_port(admin));
        log_at(LOG_INFO, LOG_FIELDS("port", port), "admin endpoint on %s", s->admin_addr);
    }
    orch.claimer = worker_create(&orch, false);
    orch.replier = worker_create(&orch, true);
    if (!orch.claimer || !orch.replier) {
        log_error("out of memory");
        goto out;
    }
    ev_signal_init(&sig_term, stop_cb, SIGTERM);
    ev_signal_init(&sig_int, stop_cb, SIGINT);
    ev_signal_init(&sig_hup, hup_cb, SIGHUP);
    ev_signal_start(orch.loop, &sig_term);
    ev_signal_start(orch.loop, &sig_int);
    ev_signal_start(orch.loop, &sig_hup);
    ev_async_init(&reload.done, reload_done_cb);
    ev_async_start(orch.loop, &reload.done);
    signal(SIGPIPE, SIG_IGN);
    ev_timer_init(&status_timer, status_cb, 0.0, 0.5);
    ev_timer_start(orch.loop, &status_timer);
    worker_start(orch.claimer);
    worker_start(orch.replier);
    log_info("saga-orchestrator started");
    ev_run(orch.loop, 0);
    status = 0;

out:
    replies_stop(&orch);
    worker_destroy(orch.claimer);
    worker_destroy(orch.replier);
    admin_stop(admin);
    if (reload.running)
        pthread_join(reload.thread, NULL);
    registry_clear(&reload.fresh);
    registry_clear(&reload.retired);
    registry_clear(&orch.registry);
    settings_free(table, nset);
    if (status == 0 && !migrate_only)
        log_info("saga-orchestrator stopped");
    return status;
}
