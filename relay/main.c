/* outbox-relay: publishes outbox tables to Kafka. Config, wiring and the loop; the work is
 * in outbox_table.c (one publisher per table) and producer.c (the Kafka side). */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
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

static void hup_cb(struct ev_loop *loop, ev_signal *w, int revents)
{
    /* Nothing is reloadable yet: the sources and the producer need a restart. */
    log_info("SIGHUP: nothing to reload; restart the relay to change its settings");
}

static void describe_metrics(void)
{
    metrics_describe("relay_rows_published_total", "counter",
                     "Rows acknowledged by Kafka, per table and topic.");
    metrics_describe("relay_rows_claimed_total", "counter",
                     "Rows read from the outbox and produced.");
    metrics_describe("relay_rows_deleted_total", "counter",
                     "Acknowledged rows deleted from the outbox.");
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

    relay.tables = calloc(source_count, sizeof(*relay.tables));
    if (!relay.tables && source_count) {
        log_error("out of memory");
        goto out;
    }
    for (size_t i = 0; i < source_count; i++) {
        relay.tables[i] = outbox_table_create(&relay, &sources[i]);
        if (!relay.tables[i]) {
            log_error("out of memory creating table publishers");
            goto out;
        }
        relay.table_count++;
    }

    ev_signal_init(&sig_term, stop_cb, SIGTERM);
    ev_signal_init(&sig_int, stop_cb, SIGINT);
    ev_signal_init(&sig_hup, hup_cb, SIGHUP);
    ev_signal_start(relay.loop, &sig_term);
    ev_signal_start(relay.loop, &sig_int);
    ev_signal_start(relay.loop, &sig_hup);
    signal(SIGPIPE, SIG_IGN);
    ev_timer_init(&status_timer, status_cb, 0.0, 0.5);
    ev_timer_start(relay.loop, &status_timer);

    log_at(LOG_INFO, LOG_FIELDS("brokers", relay.settings.kafka_brokers),
           "outbox-relay starting with %zu table(s)", relay.table_count);
    for (size_t i = 0; i < relay.table_count; i++)
        outbox_table_start(relay.tables[i]);

    ev_run(relay.loop, 0);
    status = 0;

out:
    if (relay.loop)
        relay_producer_stop(&relay);
    for (size_t i = 0; i < relay.table_count; i++)
        outbox_table_destroy(relay.tables[i]);
    free(relay.tables);
    admin_stop(admin);
    relay_sources_free(sources, source_count);
    relay_settings_free(&relay.settings);
    if (status == 0)
        log_info("outbox-relay stopped");
    return status;
}
