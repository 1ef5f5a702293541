#include "system.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <cjson/cJSON.h>
#include <criterion/criterion.h>

#include "http.h"

const char *const sys_service_names[SYS_SERVICES] = {"inventory", "payment", "orders", "shipping"};

/* The demo's initial stock (scripts/demo-run), with s->stock units of each sku-N (1000 in the
 * demo); sys_check compares against it. */
static void stock_values(const struct sys *s, char *buf, size_t len)
{
    snprintf(buf, len,
             "('sku-1', %d), ('sku-2', %d), ('sku-3', %d), ('sku-4', %d), ('rare-item', 3)",
             s->stock, s->stock, s->stock, s->stock);
}

void sys_pause_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

int sys_rand(unsigned *state, int lo, int hi)
{
    unsigned x = *state ? *state : 0x9e3779b9u; /* xorshift32 never leaves 0 */
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    *state = x;
    return lo + (int)(x % (unsigned)(hi - lo + 1));
}

int sys_saga_count(void)
{
    const char *v = getenv("SAGA_SYSTEM_SAGAS");
    int n = v && *v ? atoi(v) : 1000;
    return n > 0 ? n : 1000;
}

unsigned sys_seed(const char *test)
{
    const char *v = getenv("SAGA_SYSTEM_SEED");
    unsigned seed;
    if (v && *v) {
        seed = (unsigned)strtoul(v, NULL, 0);
    } else {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        seed = (unsigned)(ts.tv_nsec ^ ts.tv_sec ^ ((long)getpid() << 16));
    }
    fprintf(stderr, "%s: seed %u (SAGA_SYSTEM_SEED=%u repeats the schedule), %d sagas\n", test,
            seed, seed, sys_saga_count());
    return seed;
}

static const char *bin_env(const char *name)
{
    const char *v = getenv(name);
    if (!v || !*v)
        cr_assert_fail("%s is not set (run the test through meson)", name);
    return v;
}

static struct proc *current(struct sys_daemon *d)
{
    return d->count ? &d->runs[d->count - 1] : NULL;
}

static struct proc *next_run(struct sys_daemon *d)
{
    if (d->count >= SYS_MAX_RUNS)
        cr_assert_fail("%s: more than %d starts in one test", d->name, SYS_MAX_RUNS);
    return &d->runs[d->count++];
}

static void daemon_kill(struct sys_daemon *d)
{
    if (d->running)
        proc_kill(current(d));
    d->running = false;
}

/* Waits for the count-th line with needle in the current incarnation's log. */
static void wait_lines(struct sys *s, struct sys_daemon *d, const char *needle, int count,
                       int timeout_ms, char *line, size_t len)
{
    struct proc *p = current(d);
    size_t from = 0;
    int64_t end = proc_now_ms() + timeout_ms;
    for (int i = 0; i < count; i++) {
        int left = (int)(end - proc_now_ms());
        if (left < 1 || !proc_wait_log(p, needle, &from, left, line, len)) {
            sys_dump(s);
            cr_assert_fail("%s (start %d) did not log \"%s\" %d time(s) within %d ms", d->name,
                           d->count, needle, count, timeout_ms);
        }
    }
}

void sys_orchestrator_start(struct sys *s, int i)
{
    struct sys_daemon *d = &s->orchestrator[i];
    char url[1100], brokers[300], dir[1100], session[64], heartbeat[64];
    snprintf(url, sizeof(url), "SAGA_DATABASE_URL=%s", s->orch_db.url);
    snprintf(session, sizeof(session), "KAFKA_SESSION_TIMEOUT_MS=%d", s->session_timeout_ms);
    snprintf(heartbeat, sizeof(heartbeat), "KAFKA_HEARTBEAT_INTERVAL_MS=%d",
             s->session_timeout_ms / 3);
    snprintf(brokers, sizeof(brokers), "SAGA_KAFKA_BROKERS=%s", s->broker.bootstrap);
    snprintf(dir, sizeof(dir), "SAGA_DEFINITIONS_DIR=%s", s->sagas_dir);
    /* As scripts/demo-run: the mock keeps a group rebalancing for session.timeout.ms after a
     * member vanished, so a short session lets a restarted consumer rejoin quickly. */
    const char *env[] = {url,     brokers,   dir, "SAGA_ADMIN_ADDR=127.0.0.1:0",
                         session, heartbeat, NULL};
    const char *bin = getenv("SAGA_SYSTEM_ORCHESTRATOR_BIN");
    const char *argv[] = {bin && *bin ? bin : bin_env("SAGA_ORCHESTRATOR_BIN"), NULL};
    struct proc_options opts = {.name = d->name};
    proc_start(next_run(d), argv, env, &opts);
    d->running = true;
    char line[2048];
    wait_lines(s, d, "admin endpoint", 1, 60000, line, sizeof(line));
    const char *at = strstr(line, "\"port\":\"");
    cr_assert(at, "no port in \"%s\"", line);
    d->admin_port = atoi(at + 8);
    wait_lines(s, d, "saga-orchestrator started", 1, 60000, NULL, 0);
}

void sys_orchestrator_wait_assigned(struct sys *s, int i)
{
    wait_lines(s, &s->orchestrator[i], "partition(s) assigned", 1, 60000, NULL, 0);
}

void sys_participant_start(struct sys *s, enum sys_service svc)
{
    struct sys_daemon *d = &s->participant[svc];
    char service[64], url[1100], brokers[300], session[64], heartbeat[64];
    snprintf(service, sizeof(service), "PARTICIPANT_SERVICE=%s", sys_service_names[svc]);
    snprintf(session, sizeof(session), "KAFKA_SESSION_TIMEOUT_MS=%d", s->session_timeout_ms);
    snprintf(heartbeat, sizeof(heartbeat), "KAFKA_HEARTBEAT_INTERVAL_MS=%d",
             s->session_timeout_ms / 3);
    snprintf(url, sizeof(url), "PARTICIPANT_DATABASE_URL=%s", s->svc_db[svc].url);
    snprintf(brokers, sizeof(brokers), "PARTICIPANT_KAFKA_BROKERS=%s", s->broker.bootstrap);
    const char *env[] = {service, url, brokers, session, heartbeat, NULL};
    const char *argv[] = {bin_env("SAGA_PARTICIPANT_BIN"), NULL};
    struct proc_options opts = {.name = d->name};
    proc_start(next_run(d), argv, env, &opts);
    d->running = true;
    wait_lines(s, d, "example participant starting", 1, 60000, NULL, 0);
}

void sys_relay_start(struct sys *s)
{
    struct sys_daemon *d = &s->relay;
    char config[200], brokers[300];
    snprintf(config, sizeof(config), "RELAY_CONFIG=%s", s->relay_config);
    snprintf(brokers, sizeof(brokers), "RELAY_KAFKA_BROKERS=%s", s->broker.bootstrap);
    const char *env[] = {config, brokers, "RELAY_ADMIN_ADDR=127.0.0.1:0", NULL};
    const char *argv[] = {bin_env("SAGA_RELAY_BIN"), NULL};
    struct proc_options opts = {.name = d->name};
    proc_start(next_run(d), argv, env, &opts);
    d->running = true;
    /* One "leading" line per table: after a SIGKILL the new relay waits until PostgreSQL has
     * ended the old sessions (and their advisory locks). */
    wait_lines(s, d, "leading", 1 + SYS_SERVICES, 60000, NULL, 0);
}

void sys_orchestrator_kill(struct sys *s, int i)
{
    daemon_kill(&s->orchestrator[i]);
}

void sys_participant_kill(struct sys *s, enum sys_service svc)
{
    daemon_kill(&s->participant[svc]);
}

void sys_relay_kill(struct sys *s)
{
    daemon_kill(&s->relay);
}

static void write_relay_config(struct sys *s)
{
    cJSON *root = cJSON_CreateObject();
    cJSON *sources = cJSON_AddArrayToObject(root, "sources");
    cr_assert(root && sources, "out of memory");
    for (int i = -1; i < SYS_SERVICES; i++) {
        char table[64];
        snprintf(table, sizeof(table), "%s.outbox", i < 0 ? "saga" : sys_service_names[i]);
        cJSON *src = cJSON_CreateObject();
        cJSON *tables = cJSON_CreateArray();
        cr_assert(src && tables, "out of memory");
        cJSON_AddItemToArray(sources, src);
        cr_assert(cJSON_AddStringToObject(src, "database_url",
                                          i < 0 ? s->orch_db.url : s->svc_db[i].url));
        cJSON_AddItemToObject(src, "tables", tables);
        cJSON_AddItemToArray(tables, cJSON_CreateString(table));
    }
    char *text = cJSON_Print(root);
    cr_assert(text, "out of memory");
    snprintf(s->relay_config, sizeof(s->relay_config), "/tmp/saga-e2e-%d-relay.json",
             (int)getpid());
    FILE *f = fopen(s->relay_config, "w");
    cr_assert(f, "cannot write %s", s->relay_config);
    fputs(text, f);
    cr_assert_eq(fclose(f), 0);
    free(text);
    cJSON_Delete(root);
}

/* Writes a copy of sagas/order_fulfillment.json with every step's timeout set to timeout into
 * a new directory, s->sagas_dir. */
static void write_definitions(struct sys *s, const char *timeout)
{
    char path[1100];
    snprintf(path, sizeof(path), "%s/order_fulfillment.json", s->sagas_dir);
    FILE *f = fopen(path, "r");
    cr_assert(f, "cannot read %s", path);
    static char text[1 << 16];
    size_t len = fread(text, 1, sizeof(text) - 1, f);
    fclose(f);
    text[len] = '\0';
    cJSON *def = cJSON_Parse(text);
    cr_assert(def, "%s is not JSON", path);
    cJSON *defaults = cJSON_GetObjectItem(def, "defaults");
    cJSON *steps = cJSON_GetObjectItem(def, "steps");
    cr_assert(defaults && steps, "%s has no defaults or steps", path);
    cJSON_DeleteItemFromObject(defaults, "timeout");
    cr_assert(cJSON_AddStringToObject(defaults, "timeout", timeout));
    cJSON *step;
    cJSON_ArrayForEach(step, steps)
    {
        cJSON_DeleteItemFromObject(step, "timeout");
        cr_assert(cJSON_AddStringToObject(step, "timeout", timeout));
    }
    char *out = cJSON_Print(def);
    cr_assert(out, "out of memory");
    snprintf(s->sagas_dir, sizeof(s->sagas_dir), "/tmp/saga-e2e-%d-sagas-XXXXXX", (int)getpid());
    cr_assert(mkdtemp(s->sagas_dir), "mkdtemp failed");
    s->own_sagas_dir = true;
    snprintf(path, sizeof(path), "%s/order_fulfillment.json", s->sagas_dir);
    f = fopen(path, "w");
    cr_assert(f, "cannot write %s", path);
    fputs(out, f);
    cr_assert_eq(fclose(f), 0);
    free(out);
    cJSON_Delete(def);
}

void sys_setup(struct sys *s, const char *test, const struct sys_options *opts)
{
    static const struct sys_options defaults = {0};
    if (!opts)
        opts = &defaults;
    memset(s, 0, sizeof(*s));
    s->test = test;
    s->seed = sys_seed(test);
    int orchestrators = opts->orchestrators ? opts->orchestrators : 1;
    const char *step_timeout = opts->step_timeout;
    s->session_timeout_ms = opts->session_timeout_ms ? opts->session_timeout_ms : 6000;
    s->stock = opts->stock ? opts->stock : 1000;
    cr_assert(orchestrators >= 1 && orchestrators <= SYS_MAX_ORCHESTRATORS);
    s->orchestrators = orchestrators;
    static const char *const orch_names[] = {"orchestrator-a", "orchestrator-b"};
    for (int i = 0; i < SYS_MAX_ORCHESTRATORS; i++)
        s->orchestrator[i].name = orch_names[i];
    for (int i = 0; i < SYS_SERVICES; i++)
        s->participant[i].name = sys_service_names[i];
    s->relay.name = "relay";
    snprintf(s->sagas_dir, sizeof(s->sagas_dir), "%s/sagas", bin_env("SAGA_SOURCE_ROOT"));
    if (step_timeout)
        write_definitions(s, step_timeout);

    pgtest_db_create(&s->orch_db);
    s->orch = pgtest_connect(s->orch_db.url);
    for (int i = 0; i < SYS_SERVICES; i++)
        pgtest_db_create(&s->svc_db[i]);

    /* Four partitions everywhere, as the broker's auto-creation would make them: created up
     * front so that every consumer sees them from its first metadata request. */
    const char *args[] = {"--topic", "saga.replies:4",      "--topic", "inventory.commands:4",
                          "--topic", "payment.commands:4",  "--topic", "orders.commands:4",
                          "--topic", "shipping.commands:4", NULL};
    devbroker_start(&s->broker, args);

    /* The first orchestrator applies the migrations and registers the definitions. */
    for (int i = 0; i < orchestrators; i++)
        sys_orchestrator_start(s, i);
    for (int i = 0; i < SYS_SERVICES; i++)
        sys_participant_start(s, (enum sys_service)i);
    for (int i = 0; i < SYS_SERVICES; i++)
        s->svc[i] = pgtest_connect(s->svc_db[i].url);

    /* The demo's business: stock, a payment limit, a blocked customer; shipping fails a few
     * times (retried after the pivot), inventory loses two commands (timeouts, resent). */
    char stock[256], sql[512];
    stock_values(s, stock, sizeof(stock));
    snprintf(sql, sizeof(sql),
             "INSERT INTO inventory.stock (sku, available) VALUES %s"
             " ON CONFLICT (sku) DO UPDATE SET available = excluded.available",
             stock);
    pgtest_exec(s->svc[SYS_INVENTORY], sql);
    pgtest_exec(s->svc[SYS_PAYMENT], "UPDATE payment.settings SET decline_above = 1000");
    pgtest_exec(s->svc[SYS_ORDERS],
                "UPDATE orders.settings SET reject_customers = '{blocked-customer}'");
    pgtest_exec(s->svc[SYS_SHIPPING], "UPDATE shipping.behavior SET fail_next = 5");
    pgtest_exec(s->svc[SYS_INVENTORY], "UPDATE inventory.behavior SET drop_next = 2");

    write_relay_config(s);
    sys_relay_start(s);
}

void sys_teardown(struct sys *s)
{
    struct sys_daemon *all[SYS_MAX_ORCHESTRATORS + SYS_SERVICES + 1];
    size_t n = 0;
    for (int i = 0; i < SYS_MAX_ORCHESTRATORS; i++)
        all[n++] = &s->orchestrator[i];
    for (int i = 0; i < SYS_SERVICES; i++)
        all[n++] = &s->participant[i];
    all[n++] = &s->relay;
    /* SAGA_SYSTEM_KEEP_LOGS: leave the daemons' logs in /tmp for a post-mortem. */
    bool keep = getenv("SAGA_SYSTEM_KEEP_LOGS") != NULL;
    for (size_t i = 0; i < n; i++) {
        daemon_kill(all[i]);
        for (int r = 0; r < all[i]->count && !keep; r++)
            proc_cleanup(&all[i]->runs[r]);
    }
    devbroker_stop(&s->broker);
    if (s->relay_config[0])
        unlink(s->relay_config);
    if (s->own_sagas_dir) {
        char path[1100];
        snprintf(path, sizeof(path), "%s/order_fulfillment.json", s->sagas_dir);
        unlink(path);
        rmdir(s->sagas_dir);
    }
    PQfinish(s->orch);
    pgtest_db_drop(&s->orch_db);
    for (int i = 0; i < SYS_SERVICES; i++) {
        PQfinish(s->svc[i]);
        pgtest_db_drop(&s->svc_db[i]);
    }
}

void sys_dump(struct sys *s)
{
    struct sys_daemon *all[SYS_MAX_ORCHESTRATORS + SYS_SERVICES + 1];
    size_t n = 0;
    for (int i = 0; i < s->orchestrators; i++)
        all[n++] = &s->orchestrator[i];
    for (int i = 0; i < SYS_SERVICES; i++)
        all[n++] = &s->participant[i];
    all[n++] = &s->relay;
    for (size_t i = 0; i < n; i++) {
        /* The last two incarnations: the one killed last and the one that followed it. */
        for (int r = all[i]->count - 2; r < all[i]->count; r++) {
            if (r < 0)
                continue;
            char title[96];
            snprintf(title, sizeof(title), "%s (start %d of %d)", all[i]->name, r + 1,
                     all[i]->count);
            proc_dump(&all[i]->runs[r], title, 4096);
        }
    }
}

/* Starts sagas number from..to (inclusive) with saga.start() in one statement, saga i's input
 * being the SQL expression input (over i). */
static void start_range(struct sys *s, int from, int to, const char *input)
{
    char a[16], b[16], sql[2048];
    snprintf(a, sizeof(a), "%d", from);
    snprintf(b, sizeof(b), "%d", to);
    snprintf(sql, sizeof(sql),
             "SELECT count(*) FROM (SELECT saga.start('order_fulfillment', %s,"
             " 'demo-order-' || i, 'corr-' || i)"
             " FROM generate_series($1::int, $2::int) i) s",
             input);
    const char *params[] = {a, b};
    cr_assert_eq(pgtest_count(s->orch, sql, 2, params), to - from + 1);
    s->sagas = to;
}

void sys_start_sagas(struct sys *s, int from, int to)
{
    /* scripts/demo-run's mix: every 7th order is too expensive (declined), every 11th wants the
     * rare item (out of stock after three), every 13th comes from a blocked customer
     * (rejected at the pivot). */
    start_range(s, from, to,
                "jsonb_build_object("
                "  'orderId', 'order-' || i,"
                "  'customerId', CASE WHEN i % 13 = 0 THEN 'blocked-customer'"
                "                     ELSE 'customer-' || (i % 17) END,"
                "  'items', jsonb_build_array(jsonb_build_object("
                "     'sku', CASE WHEN i % 11 = 0 THEN 'rare-item' ELSE 'sku-' || (1 + i % 4) END,"
                "     'qty', 1 + i % 3)),"
                "  'amount', CASE WHEN i % 7 = 0 THEN 5000 ELSE 20 + i % 400 END)");
}

void sys_start_completing_sagas(struct sys *s, int from, int to)
{
    /* Amounts below the payment limit (1000), never 'blocked-customer' nor 'rare-item'. */
    start_range(s, from, to,
                "jsonb_build_object("
                "  'orderId', 'order-' || i, 'customerId', 'customer-' || (i % 17),"
                "  'items', jsonb_build_array(jsonb_build_object('sku', 'sku-' || (1 + i % 4),"
                "                                                'qty', 1)),"
                "  'amount', 20 + i % 400)");
}

void sys_chaos(struct sys *s, int n, const char *what,
               void (*kill_restart)(struct sys *s, void *arg), void *arg)
{
    unsigned state = s->seed;
    int kills = sys_rand(&state, 5, 10);
    int chunk = (n + kills - 1) / kills;
    int from = s->sagas + 1, last = s->sagas + n;
    int64_t t0 = proc_now_ms();
    for (int k = 0; k < kills; k++) {
        if (from <= last) {
            int to = from + chunk - 1 < last ? from + chunk - 1 : last;
            sys_start_sagas(s, from, to);
            from = to + 1;
        }
        int ms = sys_rand(&state, 500, 2000);
        sys_pause_ms(ms);
        long running = sys_unfinished(s);
        fprintf(stderr, "%s: %s %d/%d after %d ms (t=%.1f s, %ld of %d sagas unfinished)\n",
                s->test, what, k + 1, kills, ms, (double)(proc_now_ms() - t0) / 1000.0, running,
                s->sagas);
        kill_restart(s, arg);
    }
    if (from <= last)
        sys_start_sagas(s, from, last);
}

long sys_unfinished(struct sys *s)
{
    return pgtest_count(s->orch,
                        "SELECT count(*) FROM saga.instances"
                        " WHERE status NOT IN ('completed', 'compensated', 'failed')",
                        0, NULL);
}

static long outbox_rows(struct sys *s)
{
    long n = pgtest_count(s->orch, "SELECT count(*) FROM saga.outbox", 0, NULL);
    for (int i = 0; i < SYS_SERVICES; i++) {
        char sql[96];
        snprintf(sql, sizeof(sql), "SELECT count(*) FROM %s.outbox", sys_service_names[i]);
        n += pgtest_count(s->svc[i], sql, 0, NULL);
    }
    return n;
}

static void print_rows(PGresult *r, int max)
{
    int rows = PQntuples(r), cols = PQnfields(r);
    for (int i = 0; i < rows && i < max; i++) {
        fprintf(stderr, "    ");
        for (int c = 0; c < cols; c++)
            fprintf(stderr, "%s%s=%s", c ? ", " : "", PQfname(r, c),
                    PQgetisnull(r, i, c) ? "NULL" : PQgetvalue(r, i, c));
        fprintf(stderr, "\n");
    }
    if (rows > max)
        fprintf(stderr, "    ... %d rows in all\n", rows);
}

static void print_query(struct sys *s, const char *title, const char *sql)
{
    PGresult *r = pgtest_query(s->orch, sql, 0, NULL);
    fprintf(stderr, "%s: %s:\n", s->test, title);
    print_rows(r, 20);
    PQclear(r);
}

void sys_wait_finished(struct sys *s, int timeout_ms)
{
    int64_t t0 = proc_now_ms(), end = t0 + timeout_ms;
    long left;
    while ((left = sys_unfinished(s)) > 0 && proc_now_ms() < end)
        sys_pause_ms(200);
    if (left > 0) {
        print_query(s, "unfinished sagas",
                    "SELECT status, current_step, count(*) FROM saga.instances"
                    " WHERE status NOT IN ('completed', 'compensated', 'failed')"
                    " GROUP BY 1, 2 ORDER BY 3 DESC");
        sys_dump(s);
        cr_assert_fail("%ld of %d sagas still unfinished %d s after the last kill", left, s->sagas,
                       timeout_ms / 1000);
    }
    int64_t t1 = proc_now_ms();
    long rows;
    while ((rows = outbox_rows(s)) > 0 && proc_now_ms() < end + 60000)
        sys_pause_ms(200);
    if (rows > 0) {
        sys_dump(s);
        cr_assert_fail("%ld outbox rows still unpublished 60 s after the sagas ended", rows);
    }
    fprintf(stderr,
            "%s: all %d sagas finished %.1f s after the chaos, outboxes empty %.1f s later\n",
            s->test, s->sagas, (double)(t1 - t0) / 1000.0, (double)(proc_now_ms() - t1) / 1000.0);
    print_query(
        s, "outcomes",
        "SELECT status, error, count(*) FROM saga.instances GROUP BY 1, 2 ORDER BY 1, 3 DESC");
}

/* Copies a participant's table into a temporary table of the orchestrator's session, so that
 * one query can join it with saga.instances (the databases are separate). */
static void import_table(struct sys *s, enum sys_service svc, const char *table, const char *temp,
                         const char *columns)
{
    char sql[512];
    snprintf(sql, sizeof(sql), "SELECT coalesce(json_agg(t), '[]')::text FROM %s.%s t",
             sys_service_names[svc], table);
    char *json = pgtest_value(s->svc[svc], sql, 0, NULL);
    snprintf(sql, sizeof(sql),
             "CREATE TEMP TABLE %s AS SELECT * FROM json_to_recordset($1::json) AS x(%s)", temp,
             columns);
    const char *params[] = {json};
    PQclear(pgtest_query(s->orch, sql, 1, params));
    free(json);
}

/* Runs a query that returns the rows breaking an invariant; prints them when there are any. */
static int violations(struct sys *s, const char *what, const char *sql)
{
    PGresult *r = pgtest_query(s->orch, sql, 0, NULL);
    int rows = PQntuples(r);
    if (rows) {
        fprintf(stderr, "%s: VIOLATED: %s (%d rows):\n", s->test, what, rows);
        print_rows(r, 10);
    }
    PQclear(r);
    return rows ? 1 : 0;
}

void sys_check(struct sys *s, bool expect_mix)
{
    cr_assert_eq(pgtest_count(s->orch, "SELECT count(*) FROM saga.instances", 0, NULL), s->sagas);
    pgtest_exec(s->orch, "DROP TABLE IF EXISTS p_reservations, p_stock, p_payments, p_orders,"
                         " p_shipments");
    import_table(s, SYS_INVENTORY, "reservations", "p_reservations",
                 "saga_id text, order_id text, items jsonb, status text");
    import_table(s, SYS_INVENTORY, "stock", "p_stock", "sku text, available int");
    import_table(s, SYS_PAYMENT, "payments", "p_payments",
                 "saga_id text, order_id text, amount numeric, status text");
    import_table(s, SYS_ORDERS, "orders", "p_orders",
                 "saga_id text, order_id text, customer_id text, status text");
    import_table(s, SYS_SHIPPING, "shipments", "p_shipments",
                 "saga_id text, order_id text, status text");

    int failed = 0;
    failed += violations(s, "every saga ended completed or compensated",
                         "SELECT id, status, current_step, error FROM saga.instances"
                         " WHERE status NOT IN ('completed', 'compensated')");
    failed += violations(s, "at most one reservation, payment, order and shipment per saga",
                         "SELECT 'reservations' AS t, saga_id, count(*) FROM p_reservations"
                         " GROUP BY saga_id HAVING count(*) > 1"
                         " UNION ALL SELECT 'payments', saga_id, count(*) FROM p_payments"
                         " GROUP BY saga_id HAVING count(*) > 1"
                         " UNION ALL SELECT 'orders', saga_id, count(*) FROM p_orders"
                         " GROUP BY saga_id HAVING count(*) > 1"
                         " UNION ALL SELECT 'shipments', saga_id, count(*) FROM p_shipments"
                         " GROUP BY saga_id HAVING count(*) > 1");
    failed +=
        violations(s, "participants' rows belong to known sagas",
                   "SELECT t, saga_id FROM (SELECT 'reservations' t, saga_id FROM p_reservations"
                   " UNION ALL SELECT 'payments', saga_id FROM p_payments"
                   " UNION ALL SELECT 'orders', saga_id FROM p_orders"
                   " UNION ALL SELECT 'shipments', saga_id FROM p_shipments) x"
                   " WHERE saga_id NOT IN (SELECT id::text FROM saga.instances)");
    char stock[256], conserved[1024];
    stock_values(s, stock, sizeof(stock));
    snprintf(conserved, sizeof(conserved),
             "WITH init(sku, qty) AS (VALUES %s),"
             " held AS (SELECT i->>'sku' AS sku, sum((i->>'qty')::int) AS qty"
             "            FROM p_reservations r, jsonb_array_elements(r.items) i"
             "           WHERE r.status = 'reserved' GROUP BY 1)"
             " SELECT init.sku, init.qty AS initial, st.available, held.qty AS reserved"
             "   FROM init LEFT JOIN p_stock st USING (sku) LEFT JOIN held USING (sku)"
             "  WHERE init.qty <> coalesce(st.available, 0) + coalesce(held.qty, 0)",
             stock);
    failed += violations(s, "stock conserved (initial = available + reserved)", conserved);
    failed += violations(
        s, "a compensated saga holds no reservation, payment, approved order or shipment",
        "SELECT i.id, 'reserved stock' AS what FROM saga.instances i"
        "  JOIN p_reservations r ON r.saga_id = i.id::text"
        " WHERE i.status = 'compensated' AND r.status = 'reserved'"
        " UNION ALL SELECT i.id, 'authorized payment' FROM saga.instances i"
        "  JOIN p_payments p ON p.saga_id = i.id::text"
        " WHERE i.status = 'compensated' AND p.status = 'authorized'"
        " UNION ALL SELECT i.id, 'approved order' FROM saga.instances i"
        "  JOIN p_orders o ON o.saga_id = i.id::text"
        " WHERE i.status = 'compensated' AND o.status = 'approved'"
        " UNION ALL SELECT i.id, 'shipment' FROM saga.instances i"
        "  JOIN p_shipments sh ON sh.saga_id = i.id::text WHERE i.status = 'compensated'");
    failed += violations(
        s,
        "a completed saga has reserved stock, an authorized payment, an approved order and a "
        "shipment",
        "SELECT i.id, i.input->>'orderId' AS order_id FROM saga.instances i"
        " WHERE i.status = 'completed' AND NOT ("
        "   EXISTS (SELECT 1 FROM p_reservations r WHERE r.saga_id = i.id::text"
        "            AND r.status = 'reserved')"
        "   AND EXISTS (SELECT 1 FROM p_payments p WHERE p.saga_id = i.id::text"
        "            AND p.status = 'authorized')"
        "   AND EXISTS (SELECT 1 FROM p_orders o WHERE o.saga_id = i.id::text"
        "            AND o.status = 'approved')"
        "   AND EXISTS (SELECT 1 FROM p_shipments sh WHERE sh.saga_id = i.id::text))");
    failed += violations(s, "orders that must fail (declined, blocked customer) did not complete",
                         "SELECT id, input FROM saga.instances WHERE status = 'completed'"
                         " AND ((input->>'amount')::numeric > 1000"
                         "      OR input->>'customerId' = 'blocked-customer')");
    failed += violations(s, "at most one succeeded action and compensation per saga and step",
                         "SELECT saga_id, step, phase, count(*) FROM saga.step_history"
                         " WHERE phase IN ('action', 'compensation') AND status = 'succeeded'"
                         " GROUP BY 1, 2, 3 HAVING count(*) > 1");
    failed += violations(s, "a completed saga has one succeeded action per step (four)",
                         "SELECT i.id, count(h.saga_id) FROM saga.instances i"
                         "  LEFT JOIN saga.step_history h ON h.saga_id = i.id"
                         "   AND h.phase = 'action' AND h.status = 'succeeded'"
                         " WHERE i.status = 'completed' GROUP BY i.id"
                         " HAVING count(h.saga_id) <> 4");
    failed += violations(s, "no reply was applied to two attempts",
                         "SELECT reply_message_id, count(*) FROM saga.step_history"
                         " WHERE reply_message_id IS NOT NULL GROUP BY 1 HAVING count(*) > 1");
    failed += violations(s, "every attempt a reply resolved records that reply",
                         "SELECT saga_id, step, phase, attempt FROM saga.step_history"
                         " WHERE status IN ('succeeded', 'failed') AND reply_message_id IS NULL");
    failed += violations(s, "no reply is recorded twice (applied and also late, stale, unknown)",
                         "SELECT message_id, count(*) FROM saga.replies_received"
                         " GROUP BY 1 HAVING count(*) > 1");
    failed += violations(s, "no attempt of a finished saga still waits for its reply",
                         "SELECT h.saga_id, h.step, h.phase, h.attempt FROM saga.step_history h"
                         "  JOIN saga.instances i ON i.id = h.saga_id"
                         " WHERE h.status = 'sent'");
    if (expect_mix)
        failed += violations(s, "no step ran out of attempts (every participant answers)",
                             "SELECT id, status, error FROM saga.instances"
                             " WHERE error LIKE '%timed out%'");
    if (expect_mix && s->sagas >= 30)
        failed += violations(s, "the mix has completed and compensated sagas",
                             "SELECT status FROM (VALUES ('completed'), ('compensated')) v(status)"
                             " WHERE NOT EXISTS (SELECT 1 FROM saga.instances i"
                             "                    WHERE i.status = v.status)");
    if (failed) {
        sys_dump(s);
        cr_assert_fail("%d invariant(s) violated (seed %u; see above)", failed, s->seed);
    }
}

double sys_orchestrator_metric(struct sys *s, int i, const char *series)
{
    return http_get_metric(s->orchestrator[i].admin_port, series);
}
