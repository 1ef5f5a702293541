/* outbox-relay: publishes outbox tables to Kafka. Config, wiring and the loop; the work is
 * in outbox_table.c (one publisher per table) and producer.c (the Kafka side). */
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "admin.h"
#include "kafka_conf.h"
#include "log.h"
#include "metrics.h"
#include "relay.h"

static struct relay relay;
static struct admin *admin;
static ev_timer status_timer, drain_timer, drain_deadline;
static ev_signal sig_term, sig_int, sig_hup;

/* A table whose source SIGHUP removed, until it is freed (see retire_cb). */
struct retiring {
    struct retiring *next;
    struct outbox_table *table;
    struct outbox_source *src; /* owned: the table borrows it until it is destroyed */
    ev_tstamp deadline;        /* of its drain (RELAY_DRAIN_TIMEOUT) */
    bool released;             /* its sessions are closed (lock released) */
};
static struct retiring *retiring;

/* On exit, how long to wait for a reload thread that is still checking tables. */
#define RELOAD_EXIT_WAIT_S 1
static ev_timer retire_timer;

int relay_producer_start(struct relay *r, char *err, size_t errlen);
void relay_producer_stop(struct relay *r);

static void update_status(void)
{
    char text[8192];
    bool ready = relay.kafka_up && !relay.stopping;
    snprintf(text, sizeof(text), "kafka %s\n", relay.kafka_up ? "up" : "down");
    for (size_t i = 0; i < relay.table_count; i++)
        outbox_table_describe(relay.tables[i], text, sizeof(text), &ready);
    if (relay.stopping) {
        size_t len = strlen(text);
        snprintf(text + len, sizeof(text) - len, "stopping\n");
    }
    admin_set_status(admin, ready, text);
    admin_heartbeat(admin);
}

static void status_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    update_status();
}

static bool all_drained(void)
{
    for (size_t i = 0; i < relay.table_count; i++)
        if (!outbox_table_drained(relay.tables[i]))
            return false;
    for (struct retiring *r = retiring; r; r = r->next)
        if (!r->released && !outbox_table_drained(r->table))
            return false;
    return true;
}

static void drain_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    if (all_drained()) {
        log_info("every claimed row is acknowledged and deleted; exiting");
        ev_break(loop, EVBREAK_ALL);
    }
}

static void drain_deadline_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    log_warn("drain timeout: exiting with rows not yet acknowledged; they stay in their "
             "tables and are published again (same message-id)");
    ev_break(loop, EVBREAK_ALL);
}

static void stop_cb(struct ev_loop *loop, ev_signal *w, int revents)
{
    if (relay.stopping)
        return;
    log_at(LOG_INFO, LOG_FIELDS("signal", w->signum == SIGTERM ? "SIGTERM" : "SIGINT"),
           "stopping: no new claims, waiting for acknowledgements in flight");
    relay.stopping = true;
    for (size_t i = 0; i < relay.table_count; i++)
        outbox_table_stop_claiming(relay.tables[i]);
    update_status();
    ev_timer_init(&drain_timer, drain_cb, 0.0, 0.01);
    ev_timer_start(loop, &drain_timer);
    ev_timer_init(&drain_deadline, drain_deadline_cb,
                  (double)relay.settings.drain_timeout_ms / 1000.0, 0.0);
    ev_timer_start(loop, &drain_deadline);
}

/* Until the loop's signal watchers take over, SIGTERM or SIGINT (say, while the start-up check
 * waits for a slow database) ends the relay at once with status 0: nothing is claimed yet, so
 * there is nothing to finish. Without this the default action killed it (status 143). */
static void early_stop_handler(int sig)
{
    (void)sig;
    _exit(0);
}

/* ---- SIGHUP: the sources of RELAY_CONFIG, reloaded ------------------------------------------
 *
 * The file is read and validated, and the tables it adds are checked (outbox_table_check: a
 * blocking connection, bounded per table: connect, statements, TCP), off the loop in a
 * thread; the result comes back through an ev_async and is applied on the loop, so that the
 * loop never waits for a database. Only one reload runs at a time. The thread reads relay.settings
 * and relay.sources, which only the loop changes, and only in reload_done_cb (after the join) and
 * after the loop ends (after the join, or never when the relay exits without the thread: see
 * the end of main).
 *
 * Sources are keyed by (conninfo, schema, table). A table kept is not touched (no reconnect, no
 * lost leadership); a table added is created and started; a table removed stops claiming,
 * drains (what it claimed is acknowledged and deleted, bounded by RELAY_DRAIN_TIMEOUT) and is
 * then let go (outbox_table_release: its sessions close, which releases its leader lock). A
 * file that fails any check changes nothing. Settings from the environment (RELAY_OUTBOX_TABLES,
 * RELAY_DATABASE_URL, RELAY_LOG_LEVEL, ...) cannot change in a running process and stay. */

static struct outbox_source *source_take(struct outbox_source *s)
{
    struct outbox_source *own = malloc(sizeof(*own));
    if (!own)
        return NULL;
    *own = *s;
    s->conninfo = s->schema = s->table = s->where = NULL; /* moved */
    return own;
}

static void source_free(struct outbox_source *s)
{
    if (!s)
        return;
    free(s->conninfo);
    free(s->schema);
    free(s->table);
    free(s->where);
    free(s);
}

/* The index of the live table of src's key, or -1. */
static long live_index(const struct outbox_source *src)
{
    for (size_t i = 0; i < relay.table_count; i++) {
        const struct outbox_source *s = relay.sources[i];
        if (!strcmp(s->conninfo, src->conninfo) && !strcmp(s->schema, src->schema) &&
            !strcmp(s->table, src->table))
            return (long)i;
    }
    return -1;
}

static struct {
    pthread_t thread;
    bool running;
    bool again; /* a SIGHUP came while the thread ran */
    ev_async done;
    /* Written by the thread, read by the loop after the join. */
    int rc;
    char err[2048];
    struct outbox_source *fresh; /* every source of the new configuration */
    size_t fresh_count;
    bool *added; /* added[i]: fresh[i] is not published yet (and passed the check) */
} reload;

static void *reload_main(void *arg)
{
    reload.rc = relay_sources_load(&relay.settings, &reload.fresh, &reload.fresh_count, reload.err,
                                   sizeof(reload.err));
    if (!reload.rc) {
        reload.added = calloc(reload.fresh_count + 1, sizeof(*reload.added));
        if (!reload.added) {
            snprintf(reload.err, sizeof(reload.err), "out of memory");
            reload.rc = -1;
        }
    }
    for (size_t i = 0; !reload.rc && i < reload.fresh_count; i++) {
        reload.added[i] = live_index(&reload.fresh[i]) < 0;
        /* The error names the file and the JSON path (outbox_source.where). */
        if (reload.added[i] && outbox_table_check(&reload.fresh[i], reload.err, sizeof(reload.err)))
            reload.rc = -1;
    }
    ev_async_send(relay.loop, &reload.done);
    return arg;
}

/* Appends ",schema.table" (no comma first) to list; a list that no longer fits ends with "...". */
static void list_add(char *list, size_t size, const struct outbox_source *src)
{
    size_t len = strlen(list);
    int n = snprintf(list + len, size - len, "%s%s.%s", len ? "," : "", src->schema, src->table);
    if (n < 0 || (size_t)n >= size - len)
        snprintf(list + (size > 4 ? size - 4 : 0), size > 4 ? 4 : size, "...");
}

/* Swaps fresh in (its sources are moved out). Creates everything first, so that on failure
 * (out of memory) nothing has changed. */
static int reload_apply(struct outbox_source *fresh, size_t n, const bool *added)
{
    struct outbox_table **tables = calloc(n + 1, sizeof(*tables));
    struct outbox_source **srcs = calloc(n + 1, sizeof(*srcs));
    bool *kept = calloc(relay.table_count + 1, sizeof(*kept));
    struct retiring *gone = NULL;
    size_t n_added = 0, n_removed = 0;
    char added_list[512] = "", removed_list[512] = "";
    if (!tables || !srcs || !kept)
        goto fail;
    for (size_t j = 0; j < n; j++) {
        if (added[j]) {
            srcs[j] = source_take(&fresh[j]);
            tables[j] = srcs[j] ? outbox_table_create(&relay, srcs[j]) : NULL;
            if (!tables[j])
                goto fail;
            n_added++;
            list_add(added_list, sizeof(added_list), srcs[j]);
            continue;
        }
        long i = live_index(&fresh[j]);
        if (i < 0)
            goto fail; /* cannot happen: only this function changes the live set */
        tables[j] = relay.tables[i];
        srcs[j] = relay.sources[i];
        kept[i] = true;
    }
    for (size_t i = 0; i < relay.table_count; i++) {
        if (kept[i])
            continue;
        struct retiring *r = calloc(1, sizeof(*r));
        if (!r)
            goto fail;
        r->table = relay.tables[i];
        r->src = relay.sources[i];
        r->next = gone;
        gone = r;
        n_removed++;
        list_add(removed_list, sizeof(removed_list), r->src);
    }

    /* Commit: nothing below can fail. */
    ev_tstamp deadline = ev_now(relay.loop) + (double)relay.settings.drain_timeout_ms / 1000.0;
    while (gone) {
        struct retiring *r = gone;
        gone = r->next;
        r->deadline = deadline;
        outbox_table_stop_claiming(r->table);
        r->next = retiring;
        retiring = r;
    }
    free(relay.tables);
    free(relay.sources);
    relay.tables = tables;
    relay.sources = srcs;
    relay.table_count = n;
    for (size_t j = 0; j < n; j++)
        if (added[j])
            outbox_table_start(tables[j]);
    if (retiring && !ev_is_active(&retire_timer))
        ev_timer_start(relay.loop, &retire_timer);
    free(kept);
    char counts[3][24];
    snprintf(counts[0], sizeof(counts[0]), "%zu", n_added);
    snprintf(counts[1], sizeof(counts[1]), "%zu", n_removed);
    snprintf(counts[2], sizeof(counts[2]), "%zu", n - n_added);
    log_at(LOG_INFO,
           LOG_FIELDS("file", relay.settings.config_file, "added", counts[0], "removed", counts[1],
                      "unchanged", counts[2], "added_tables", added_list, "removed_tables",
                      removed_list),
           "SIGHUP: sources reloaded: %zu table(s) added, %zu removed, %zu unchanged", n_added,
           n_removed, n - n_added);
    metrics_counter_add("relay_config_reloads_total", "result=\"ok\"", 1);
    update_status();
    return 0;

fail:
    for (size_t j = 0; tables && srcs && j < n; j++) {
        if (added[j]) {
            outbox_table_destroy(tables[j]); /* never started: nothing in the producer */
            source_free(srcs[j]);
        }
    }
    while (gone) {
        struct retiring *r = gone;
        gone = r->next;
        free(r);
    }
    free(tables);
    free(srcs);
    free(kept);
    return -1;
}

static void reload_start(void)
{
    reload.running = true;
    /* The thread takes no signal: they are the loop's. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int rc = pthread_create(&reload.thread, NULL, reload_main, NULL);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc) {
        reload.running = false;
        log_error("SIGHUP: cannot start the reload thread");
        metrics_counter_add("relay_config_reloads_total", "result=\"error\"", 1);
    }
}

static void hup_cb(struct ev_loop *loop, ev_signal *w, int revents)
{
    if (relay.stopping) {
        log_info("SIGHUP: the relay is stopping; nothing reloaded");
        return;
    }
    if (!relay.settings.config_file) {
        log_info("SIGHUP: RELAY_CONFIG is not set, nothing to reload (settings from the "
                 "environment need a restart)");
        return;
    }
    if (reload.running) {
        /* The file may have changed again since the thread read it: once more afterwards. */
        log_info("SIGHUP: a reload is running; the file is read again when it ends");
        reload.again = true;
        return;
    }
    reload_start();
}

static void reload_done_cb(struct ev_loop *loop, ev_async *w, int revents)
{
    pthread_join(reload.thread, NULL);
    reload.running = false;
    if (relay.stopping) {
        log_info("SIGHUP: the relay is stopping; the reloaded sources are not applied");
    } else if (reload.rc) {
        log_at(LOG_ERROR, LOG_FIELDS("file", relay.settings.config_file, "error", reload.err),
               "SIGHUP: RELAY_CONFIG rejected; still publishing the previous tables");
        metrics_counter_add("relay_config_reloads_total", "result=\"error\"", 1);
    } else if (reload_apply(reload.fresh, reload.fresh_count, reload.added)) {
        log_at(LOG_ERROR, LOG_FIELDS("file", relay.settings.config_file),
               "SIGHUP: out of memory applying RELAY_CONFIG; still publishing the previous "
               "tables");
        metrics_counter_add("relay_config_reloads_total", "result=\"error\"", 1);
    }
    relay_sources_free(reload.fresh, reload.fresh_count);
    free(reload.added);
    reload.fresh = NULL;
    reload.fresh_count = 0;
    reload.added = NULL;
    if (reload.again && !relay.stopping) {
        reload.again = false;
        reload_start();
    }
}

/* Tables removed by SIGHUP, every 50 ms until none is left. A table is let go (released) once
 * drained or at its drain deadline, and freed only once the producer holds no message of it:
 * each message carries a pointer to its row, in a batch that points to the table (and the
 * table to its source), and librdkafka cannot purge one table's messages. So after a drain
 * timeout (say, the broker is away), the table is released at once, which lets another relay
 * (or this one, if the table is added again) take it and publish its unacknowledged rows again
 * (same message-id; the first deliveries stay in order per key, since both producers send the
 * rows of a key in seq order), while the table object, closed and never reconnecting, waits
 * for its last delivery reports, which it drops. With the broker gone for good that object
 * (a few hundred bytes plus its batches) is only freed at exit. */
static void retire_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct retiring **link = &retiring;
    while (*link) {
        struct retiring *r = *link;
        if (!r->released) {
            bool drained = outbox_table_drained(r->table);
            if (!drained && ev_now(loop) < r->deadline) {
                link = &r->next;
                continue;
            }
            char label[300];
            snprintf(label, sizeof(label), "%s.%s", r->src->schema, r->src->table);
            /* Released before the line is written, so that whoever reads the line sees the
             * table let go (its lock freed, its gauges at 0). */
            const char *role = outbox_table_role(r->table);
            outbox_table_release(r->table);
            r->released = true;
            if (strcmp(role, "leading"))
                /* A standby (or a table between sessions) claims nothing: it never had rows
                 * to drain. */
                log_at(LOG_INFO, LOG_FIELDS("table", label, "role", role),
                       "removed from RELAY_CONFIG: not leading this table (%s), so nothing was "
                       "claimed and nothing is to drain; letting the table go",
                       role);
            else if (drained)
                log_at(LOG_INFO, LOG_FIELDS("table", label, "role", role),
                       "removed from RELAY_CONFIG: every claimed row is acknowledged and "
                       "deleted; letting the table go");
            else
                log_at(LOG_WARN, LOG_FIELDS("table", label),
                       "removed from RELAY_CONFIG: drain timeout; letting the table go with rows "
                       "not yet acknowledged (they stay in the table and are published again, "
                       "same message-id)");
        }
        if (outbox_table_in_producer(r->table)) {
            link = &r->next;
            continue;
        }
        *link = r->next;
        char label[300];
        snprintf(label, sizeof(label), "%s.%s", r->src->schema, r->src->table);
        log_at(LOG_DEBUG, LOG_FIELDS("table", label),
               "removed table freed: the producer holds no message of it");
        outbox_table_destroy(r->table);
        source_free(r->src);
        free(r);
    }
    if (!retiring)
        ev_timer_stop(loop, w);
}

static void describe_metrics(void)
{
    metrics_describe("relay_rows_published_total", "counter",
                     "Rows acknowledged by Kafka, per table and topic.");
    metrics_describe("relay_rows_claimed_total", "counter",
                     "Rows read from the outbox and produced.");
    metrics_describe("relay_rows_deleted_total", "counter",
                     "Acknowledged rows deleted from the outbox.");
    metrics_describe("relay_writers_sweeps_total", "counter",
                     "Reads of pg_locks for the transactions that may still fill a hole.");
    metrics_describe("relay_producer_restarts_total", "counter",
                     "Fatal producer errors, each followed by a new producer.");
    metrics_describe("relay_dead_letters_total", "counter",
                     "Rows Kafka rejected for good, moved to the dead-letter table.");
    metrics_describe("relay_publish_errors_total", "counter",
                     "Deliveries that failed transiently (the table is read again).");
    metrics_describe("relay_db_reconnects_total", "counter",
                     "Lost or failed database connections.");
    metrics_describe("relay_table_leader", "gauge", "1 when this relay publishes the table.");
    metrics_describe("relay_claim_batch_rows", "histogram", "Rows per claim.");
    static const double batch_bounds[] = {1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000};
    metrics_histogram_buckets("relay_claim_batch_rows", batch_bounds,
                              sizeof(batch_bounds) / sizeof(batch_bounds[0]));
    metrics_describe("relay_commit_to_ack_seconds", "histogram",
                     "From the row's created_at to Kafka's acknowledgement.");
    metrics_describe("relay_kafka_up", "gauge", "1 when a Kafka broker is reachable.");
    metrics_describe("relay_backlog_rows", "gauge",
                     "Rows waiting in the table (upper bound from its seq range; every 5 s).");
    metrics_describe("relay_backlog_oldest_seconds", "gauge",
                     "Age of the oldest row waiting in the table (every 5 s).");
    metrics_describe("relay_claim_holes", "gauge",
                     "Ranges of seq values below the cursor that claims still look for (rows "
                     "of transactions still running, or rolled back).");
    metrics_describe("relay_inflight_bytes", "gauge",
                     "Payload, key and header bytes of the table's rows in the producer (not yet "
                     "acknowledged).");
    metrics_describe("relay_config_reloads_total", "counter",
                     "SIGHUP reloads of RELAY_CONFIG, by result (ok, error).");
}

int main(int argc, char **argv)
{
    char err[1024];
    struct outbox_source *sources = NULL;
    size_t source_count = 0;
    int status = 1;

    if (argc > 1 && !strcmp(argv[1], "healthcheck"))
        return admin_healthcheck("RELAY_ADMIN_ADDR", "127.0.0.1:9188");
    log_init(stdout, "outbox-relay");
    kafka_limit_malloc_arenas();
    struct sigaction early = {.sa_handler = early_stop_handler};
    sigemptyset(&early.sa_mask);
    sigaction(SIGTERM, &early, NULL);
    sigaction(SIGINT, &early, NULL);
    /* A SIGHUP before the loop's watcher takes over would end the relay (default action). */
    signal(SIGHUP, SIG_IGN);
    int rc = relay_config_load(argc - 1, argv + 1, &relay.settings, &sources, &source_count, err,
                               sizeof(err));
    if (rc == 1)
        return 0;
    if (rc) {
        log_error("configuration: %s", err);
        fprintf(stderr, "outbox-relay: %s\n", err);
        relay_settings_free(&relay.settings);
        relay_sources_free(sources, source_count);
        return 2;
    }
    enum log_level level;
    if (!log_level_parse(relay.settings.log_level, &level))
        log_min_level = level;
    describe_metrics();

    for (size_t i = 0; i < source_count; i++) {
        if (outbox_table_check(&sources[i], err, sizeof(err))) {
            log_error("configuration: %s", err);
            fprintf(stderr, "outbox-relay: %s\n", err);
            status = 2;
            goto out;
        }
    }

    relay.loop = ev_default_loop(EVFLAG_AUTO);
    if (relay_producer_start(&relay, err, sizeof(err))) {
        log_error("configuration: %s", err);
        fprintf(stderr, "outbox-relay: %s\n", err);
        status = 2;
        goto out;
    }
    if (relay.settings.admin_addr && *relay.settings.admin_addr) {
        admin = admin_start(relay.settings.admin_addr, "RELAY_ADMIN_ADDR", err, sizeof(err));
        if (!admin) {
            log_error("configuration: %s", err);
            fprintf(stderr, "outbox-relay: %s\n", err);
            status = 2;
            goto out;
        }
        char port[16];
        snprintf(port, sizeof(port), "%d", admin_port(admin));
        log_at(LOG_INFO, LOG_FIELDS("port", port), "admin endpoint on %s",
               relay.settings.admin_addr);
    }

    relay.tables = calloc(source_count + 1, sizeof(*relay.tables));
    relay.sources = calloc(source_count + 1, sizeof(*relay.sources));
    if (!relay.tables || !relay.sources) {
        log_error("out of memory");
        goto out;
    }
    for (size_t i = 0; i < source_count; i++) {
        struct outbox_source *src = source_take(&sources[i]);
        struct outbox_table *t = src ? outbox_table_create(&relay, src) : NULL;
        if (!t) {
            source_free(src);
            log_error("out of memory creating table publishers");
            goto out;
        }
        relay.sources[i] = src;
        relay.tables[i] = t;
        relay.table_count++;
    }

    ev_signal_init(&sig_term, stop_cb, SIGTERM);
    ev_signal_init(&sig_int, stop_cb, SIGINT);
    ev_signal_init(&sig_hup, hup_cb, SIGHUP);
    ev_signal_start(relay.loop, &sig_term);
    ev_signal_start(relay.loop, &sig_int);
    ev_signal_start(relay.loop, &sig_hup);
    ev_async_init(&reload.done, reload_done_cb);
    ev_async_start(relay.loop, &reload.done);
    ev_timer_init(&retire_timer, retire_cb, 0.05, 0.05);
    signal(SIGPIPE, SIG_IGN);
    ev_timer_init(&status_timer, status_cb, 0.0, 0.5);
    ev_timer_start(relay.loop, &status_timer);

    log_at(LOG_INFO, LOG_FIELDS("brokers", relay.settings.kafka_brokers),
           "outbox-relay starting with %zu table(s)", relay.table_count);
    for (size_t i = 0; i < relay.table_count; i++)
        outbox_table_start(relay.tables[i]);

    ev_run(relay.loop, 0);
    status = 0;

out:;
    /* The reload thread reads relay.settings and the live sources, so they are freed only once
     * it has ended. Its table checks are bounded (outbox_table_check), but by seconds per
     * table: a stopping relay waits for it a little (RELOAD_EXIT_WAIT_S), then leaves without
     * it. What it checked would not be applied anyway (the relay is stopping), so cutting it
     * short changes nothing; the process ends with _exit (below), which no thread outlives and
     * which runs no exit handler that the thread could still be inside (libpq, OpenSSL). The
     * tables' sessions are not closed politely there: the server logs an unexpected EOF for
     * each, which is harmless (their work is done or republished). The wait is on the monotonic
     * clock: a wall-clock step does not stretch it. */
    bool reload_abandoned = false;
    if (reload.running) {
        struct timespec until;
        clock_gettime(CLOCK_MONOTONIC, &until);
        until.tv_sec += RELOAD_EXIT_WAIT_S;
        if (pthread_clockjoin_np(reload.thread, NULL, CLOCK_MONOTONIC, &until)) {
            reload_abandoned = true;
            log_at(LOG_WARN, LOG_FIELDS("file", relay.settings.config_file),
                   "exiting while the SIGHUP reload still checks its tables (a database does "
                   "not answer): the reload is abandoned and changes nothing");
        }
    }
    if (reload_abandoned) {
        if (relay.loop)
            relay_producer_stop(&relay);
        admin_stop(admin);
        if (status == 0)
            log_info("outbox-relay stopped");
        fflush(stdout);
        fflush(stderr);
        _exit(status);
    }
    relay_sources_free(reload.fresh, reload.fresh_count);
    free(reload.added);
    /* The producer first: its purged messages are dropped without reports, so no table is
     * called after this, retiring ones included. */
    if (relay.loop)
        relay_producer_stop(&relay);
    for (size_t i = 0; i < relay.table_count; i++) {
        outbox_table_destroy(relay.tables[i]);
        source_free(relay.sources[i]);
    }
    free(relay.tables);
    free(relay.sources);
    while (retiring) {
        struct retiring *r = retiring;
        retiring = r->next;
        outbox_table_destroy(r->table);
        source_free(r->src);
        free(r);
    }
    admin_stop(admin);
    relay_sources_free(sources, source_count);
    relay_settings_free(&relay.settings);
    if (status == 0)
        log_info("outbox-relay stopped");
    return status;
}
