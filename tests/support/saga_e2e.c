#include "saga_e2e.h"

#include <ctype.h>
#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <cjson/cJSON.h>
#include <criterion/criterion.h>
#include <uuid/uuid.h>

#include "http.h"

/* ---- definitions ------------------------------------------------------------------------ */

/* The steps of the test sagas; the two %s: authorize_payment's and approve_order's extra
 * members ("timeout", "retry"). */
static const char saga_steps_fmt[] =
    "\"steps\": [\n"
    " {\"name\": \"reserve_inventory\", \"participant\": \"inventory\",\n"
    "  \"command\": {\"topic\": \"inventory.commands\", \"type\": \"ReserveStock\",\n"
    "    \"key\": \"{{input.orderId}}\",\n"
    "    \"payload\": {\"orderId\": \"{{input.orderId}}\", \"items\": \"{{input.items}}\"}},\n"
    "  \"compensation\": {\"topic\": \"inventory.commands\", \"type\": \"ReleaseStock\",\n"
    "    \"payload\": {\"orderId\": \"{{input.orderId}}\",\n"
    "      \"reservationId\": \"{{steps.reserve_inventory.reply.reservationId}}\"}}},\n"
    " {\"name\": \"authorize_payment\", \"participant\": \"payment\",\n"
    "  \"command\": {\"topic\": \"payment.commands\", \"type\": \"AuthorizePayment\",\n"
    "    \"key\": \"{{input.orderId}}\",\n"
    "    \"payload\": {\"orderId\": \"{{input.orderId}}\", \"customerId\": "
    "\"{{input.customerId}}\",\n"
    "      \"amount\": \"{{input.amount}}\",\n"
    "      \"reservationId\": \"{{steps.reserve_inventory.reply.reservationId}}\"}},\n"
    "  \"compensation\": {\"topic\": \"payment.commands\", \"type\": \"RefundPayment\",\n"
    "    \"payload\": {\"orderId\": \"{{input.orderId}}\",\n"
    "      \"authorizationId\": \"{{steps.authorize_payment.reply.authorizationId}}\",\n"
    "      \"amount\": \"{{input.amount}}\"}}%s},\n"
    " {\"name\": \"approve_order\", \"participant\": \"orders\", \"pivot\": true,\n"
    "  \"command\": {\"topic\": \"orders.commands\", \"type\": \"ApproveOrder\",\n"
    "    \"key\": \"{{input.orderId}}\",\n"
    "    \"payload\": {\"orderId\": \"{{input.orderId}}\",\n"
    "      \"authorizationId\": \"{{steps.authorize_payment.reply.authorizationId}}\"}}%s},\n"
    " {\"name\": \"schedule_shipping\", \"participant\": \"shipping\",\n"
    "  \"command\": {\"topic\": \"shipping.commands\", \"type\": \"ScheduleShipment\",\n"
    "    \"key\": \"{{input.orderId}}\",\n"
    "    \"payload\": {\"orderId\": \"{{input.orderId}}\", \"items\": \"{{input.items}}\",\n"
    "      \"reservationId\": \"{{steps.reserve_inventory.reply.reservationId}}\"}}}\n"
    "]\n";

static void write_definition(const char *dir, const char *name, const char *authorize_extra,
                             const char *approve_extra)
{
    char path[256];
    snprintf(path, sizeof(path), "%s/%s.json", dir, name);
    FILE *f = fopen(path, "w");
    cr_assert(f, "cannot write %s: %s", path, strerror(errno));
    fprintf(f,
            "{\n\"saga\": \"%s\", \"version\": 1,\n"
            "\"description\": \"end-to-end test saga\",\n"
            "\"input\": {\"required\": [\"orderId\", \"customerId\", \"items\", \"amount\"]},\n"
            "\"reply_topic\": \"" SAGA_E2E_REPLY_TOPIC "\",\n"
            "\"defaults\": {\"timeout\": \"10s\",\n"
            "  \"retry\": {\"max_attempts\": 3, \"backoff\": \"50ms\", \"max_backoff\": "
            "\"200ms\"}},\n",
            name);
    fprintf(f, saga_steps_fmt, authorize_extra, approve_extra);
    fprintf(f, "}\n");
    cr_assert_eq(fclose(f), 0, "cannot write %s", path);
}

static void write_definitions(struct saga_e2e *w)
{
    snprintf(w->sagas_dir, sizeof(w->sagas_dir), "/tmp/saga-e2e-%d-sagas-XXXXXX", (int)getpid());
    cr_assert(mkdtemp(w->sagas_dir), "mkdtemp: %s", strerror(errno));
    const char *two_s_2 = ",\n  \"timeout\": \"2s\", \"retry\": {\"max_attempts\": 2}";
    write_definition(w->sagas_dir, "e2e_order", "", "");
    write_definition(w->sagas_dir, "e2e_timeout", two_s_2, "");
    write_definition(w->sagas_dir, "e2e_patient",
                     ",\n  \"timeout\": \"2s\", \"retry\": {\"max_attempts\": 100}", "");
    write_definition(w->sagas_dir, "e2e_pivot", "", two_s_2);
}

static void remove_definitions(struct saga_e2e *w)
{
    if (!w->sagas_dir[0])
        return;
    const char *names[] = {"e2e_order", "e2e_timeout", "e2e_patient", "e2e_pivot"};
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        char path[256];
        snprintf(path, sizeof(path), "%s/%s.json", w->sagas_dir, names[i]);
        unlink(path);
    }
    rmdir(w->sagas_dir);
}

/* ---- processes -------------------------------------------------------------------------- */

static const char *bin_env(const char *name)
{
    const char *v = getenv(name);
    if (!v || !*v)
        cr_assert_fail("%s is not set (run the test through meson)", name);
    return v;
}

void saga_e2e_dump(struct saga_e2e *w)
{
    if (w->orch.pid)
        proc_dump(&w->orch, "saga-orchestrator", 12000);
    if (w->relay.pid)
        proc_dump(&w->relay, "outbox-relay", 4000);
}

/* SAGA_E2E_KEEP_LOGS=1 keeps the daemons' log files (their paths are printed). */
static void cleanup_logs(struct proc *p)
{
    const char *keep = getenv("SAGA_E2E_KEEP_LOGS");
    if (keep && *keep && strcmp(keep, "0")) {
        fprintf(stderr, "kept %s and %s\n", p->out_path, p->err_path);
        return;
    }
    proc_cleanup(p);
}

void saga_e2e_orch_start(struct saga_e2e *w)
{
    if (w->orch.pid) {
        if (w->orch_running)
            proc_kill(&w->orch);
        cleanup_logs(&w->orch);
    }
    static char url[1100], brokers[300], dir[160], poll[80];
    snprintf(url, sizeof(url), "SAGA_DATABASE_URL=%s", w->db.url);
    snprintf(brokers, sizeof(brokers), "SAGA_KAFKA_BROKERS=%s", w->broker.bootstrap);
    snprintf(dir, sizeof(dir), "SAGA_DEFINITIONS_DIR=%s", w->sagas_dir);
    /* A test may set its own poll interval (in its own process) to show what a wake-up does
     * without the poll's help. */
    const char *poll_interval = getenv("SAGA_E2E_POLL_INTERVAL");
    snprintf(poll, sizeof(poll), "SAGA_POLL_INTERVAL=%s",
             poll_interval && *poll_interval ? poll_interval : "50ms");
    /* The mock cluster keeps a group in rebalance for session.timeout.ms - 1 s after its last
     * member left: a short session lets a restarted orchestrator rejoin quickly. */
    const char *env[] = {url,
                         brokers,
                         dir,
                         "SAGA_ADMIN_ADDR=127.0.0.1:0",
                         "SAGA_LOG_LEVEL=debug",
                         poll,
                         "KAFKA_SESSION_TIMEOUT_MS=6000",
                         "KAFKA_HEARTBEAT_INTERVAL_MS=500",
                         NULL};
    const char *argv[] = {bin_env("SAGA_ORCHESTRATOR_BIN"), NULL};
    struct proc_options opts = {.name = "orchestrator"};
    proc_start(&w->orch, argv, env, &opts);
    w->orch_running = true;
    w->starts++;
    char line[2048];
    if (!proc_wait_log(&w->orch, "saga-orchestrator started", NULL, 60000, NULL, 0)) {
        saga_e2e_dump(w);
        cr_assert_fail("saga-orchestrator did not start within 60 s");
    }
    if (!proc_wait_log(&w->orch, "admin endpoint", NULL, 1000, line, sizeof(line)))
        cr_assert_fail("saga-orchestrator logged no admin endpoint");
    const char *at = strstr(line, "\"port\":\"");
    cr_assert(at, "no port in \"%s\"", line);
    w->admin_port = atoi(at + 8);
}

void saga_e2e_orch_stop(struct saga_e2e *w)
{
    proc_signal(&w->orch, SIGTERM);
    bool exited = proc_wait_exit(&w->orch, 30000);
    w->orch_running = !exited;
    if (!exited || proc_exit_code(&w->orch) != 0)
        saga_e2e_dump(w);
    cr_assert(exited, "saga-orchestrator did not exit within 30 s of SIGTERM");
    cr_assert_eq(proc_exit_code(&w->orch), 0, "saga-orchestrator exited %d after SIGTERM",
                 proc_exit_code(&w->orch));
}

static void relay_start(struct saga_e2e *w)
{
    static char url[1100], brokers[300];
    snprintf(url, sizeof(url), "RELAY_DATABASE_URL=%s", w->db.url);
    snprintf(brokers, sizeof(brokers), "RELAY_KAFKA_BROKERS=%s", w->broker.bootstrap);
    const char *env[] = {url,
                         brokers,
                         "RELAY_OUTBOX_TABLES=saga.outbox",
                         "RELAY_ADMIN_ADDR=127.0.0.1:0",
                         "RELAY_LOG_LEVEL=info",
                         "RELAY_POLL_INTERVAL=200ms",
                         "RELAY_CONFIG",
                         NULL};
    const char *argv[] = {bin_env("SAGA_RELAY_BIN"), NULL};
    struct proc_options opts = {.name = "relay"};
    proc_start(&w->relay, argv, env, &opts);
    w->relay_running = true;
}

static rd_kafka_t *producer_new(const char *brokers)
{
    char err[512];
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    const char *props[][2] = {{"bootstrap.servers", brokers},
                              {"linger.ms", "0"},
                              {"enable.idempotence", "true"},
                              {"log_level", "0"}};
    for (size_t i = 0; i < sizeof(props) / sizeof(props[0]); i++)
        cr_assert_eq(rd_kafka_conf_set(conf, props[i][0], props[i][1], err, sizeof(err)),
                     RD_KAFKA_CONF_OK, "%s: %s", props[i][0], err);
    rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, err, sizeof(err));
    cr_assert(rk, "rd_kafka_new: %s", err);
    return rk;
}

void saga_e2e_setup(struct saga_e2e *w)
{
    memset(w, 0, sizeof(*w));
    w->conn = pgtest_fresh(&w->db, false); /* the orchestrator migrates it */
    const char *args[] = {"--topic", SAGA_E2E_REPLY_TOPIC ":4", "--topic", "inventory.commands:2",
                          "--topic", "payment.commands:2",      "--topic", "orders.commands:2",
                          "--topic", "shipping.commands:2",     NULL};
    devbroker_start(&w->broker, args);
    write_definitions(w);
    saga_e2e_orch_start(w);
    /* The relay checks saga.outbox at start: only once the orchestrator has migrated. */
    relay_start(w);
    if (!proc_wait_log(&w->orch, "partition(s) assigned", NULL, 60000, NULL, 0)) {
        saga_e2e_dump(w);
        cr_assert_fail("the orchestrator's reply consumer got no partitions within 60 s");
    }
    const char *topics[] = {"inventory.commands", "payment.commands", "orders.commands",
                            "shipping.commands", NULL};
    w->commands = kconsumer_start(w->broker.bootstrap, topics);
    w->producer = producer_new(w->broker.bootstrap);
}

void saga_e2e_teardown(struct saga_e2e *w)
{
    if (w->redelivered)
        fprintf(stderr, "saga_e2e: %zu command(s) delivered more than once (skipped)\n",
                w->redelivered);
    if (w->producer)
        rd_kafka_destroy(w->producer);
    kconsumer_stop(w->commands);
    if (w->relay.pid) {
        if (w->relay_running) {
            proc_signal(&w->relay, SIGTERM);
            if (!proc_wait_exit(&w->relay, 10000))
                proc_kill(&w->relay);
        }
        cleanup_logs(&w->relay);
    }
    if (w->orch.pid) {
        if (w->orch_running) {
            proc_signal(&w->orch, SIGTERM);
            if (!proc_wait_exit(&w->orch, 10000))
                proc_kill(&w->orch);
        }
        cleanup_logs(&w->orch);
    }
    devbroker_stop(&w->broker);
    remove_definitions(w);
    free(w->taken);
    if (w->conn)
        PQfinish(w->conn);
    pgtest_db_drop(&w->db);
}

/* ---- sagas and the database ------------------------------------------------------------- */

void saga_e2e_start(struct saga_e2e *w, const char *name, const char *order_id,
                    const char *correlation_id, const char *traceparent, struct saga_ref *ref)
{
    memset(ref, 0, sizeof(*ref));
    char input[256];
    snprintf(input, sizeof(input),
             "{\"orderId\": \"%s\", \"customerId\": \"c-7\", "
             "\"items\": [{\"sku\": \"sku-1\", \"qty\": 2}], \"amount\": 42}",
             order_id);
    const char *params[] = {name, input, correlation_id, traceparent};
    char *id = pgtest_value(w->conn, "SELECT saga.start($1, $2::jsonb, NULL, $3, $4)", 4, params);
    cr_assert(id && strlen(id) == 36, "saga.start returned %s", id ? id : "NULL");
    snprintf(ref->id, sizeof(ref->id), "%s", id);
    free(id);
    snprintf(ref->name, sizeof(ref->name), "%s", name);
    snprintf(ref->order_id, sizeof(ref->order_id), "%s", order_id);
    snprintf(ref->correlation_id, sizeof(ref->correlation_id), "%s",
             correlation_id ? correlation_id : ref->id);
    const char *p[] = {ref->id};
    char *trace = pgtest_value(w->conn, "SELECT trace_id FROM saga.instances WHERE id = $1", 1, p);
    cr_assert(trace && strlen(trace) == 32, "trace_id %s", trace ? trace : "NULL");
    snprintf(ref->trace_id, sizeof(ref->trace_id), "%s", trace);
    free(trace);
}

char *saga_e2e_value(struct saga_e2e *w, const char *sql, const char *saga_id)
{
    const char *params[] = {saga_id};
    PGresult *res = pgtest_query(w->conn, sql, saga_id ? 1 : 0, saga_id ? params : NULL);
    int rows = PQntuples(res);
    cr_assert(rows <= 1 && PQnfields(res) >= 1, "expected at most one row, got %d\n  in: %s", rows,
              sql);
    char *v = strdup(rows == 0                ? "(no row)"
                     : PQgetisnull(res, 0, 0) ? "(null)"
                                              : PQgetvalue(res, 0, 0));
    PQclear(res);
    if (!v)
        cr_assert_fail("out of memory");
    return v;
}

static void pause_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

void saga_e2e_wait_value(struct saga_e2e *w, const char *sql, const char *saga_id, const char *want,
                         int timeout_ms)
{
    int64_t deadline = proc_now_ms() + timeout_ms;
    for (;;) {
        char *v = saga_e2e_value(w, sql, saga_id);
        if (!strcmp(v, want)) {
            free(v);
            return;
        }
        if (proc_now_ms() > deadline) {
            saga_e2e_dump(w);
            char *hist = saga_id ? saga_e2e_history(w, saga_id) : strdup("");
            cr_assert_fail("after %d ms, \"%s\" is \"%s\", expected \"%s\" (history: %s)",
                           timeout_ms, sql, v, want, hist ? hist : "");
        }
        free(v);
        pause_ms(20);
    }
}

void saga_e2e_wait_status(struct saga_e2e *w, const struct saga_ref *ref, const char *want,
                          int timeout_ms)
{
    saga_e2e_wait_value(w, "SELECT status FROM saga.instances WHERE id = $1", ref->id, want,
                        timeout_ms);
}

char *saga_e2e_history(struct saga_e2e *w, const char *saga_id)
{
    return saga_e2e_value(w,
                          "SELECT coalesce(string_agg(step || ':' || phase || ':' || attempt || "
                          "':' || status, ' ' ORDER BY id), '') FROM saga.step_history "
                          "WHERE saga_id = $1 AND phase <> 'operator'",
                          saga_id);
}

/* ---- commands --------------------------------------------------------------------------- */

struct next_arg {
    struct saga_e2e *w;
    const char *saga_id;
    const struct kmsg *found;
};

static void mark_taken(struct saga_e2e *w, size_t index)
{
    if (index >= w->taken_cap) {
        size_t cap = w->taken_cap ? w->taken_cap : 64;
        while (cap <= index)
            cap *= 2;
        unsigned char *grown = realloc(w->taken, cap);
        if (!grown)
            cr_assert_fail("out of memory");
        memset(grown + w->taken_cap, 0, cap - w->taken_cap);
        w->taken = grown;
        w->taken_cap = cap;
    }
    w->taken[index] = 1;
}

/* Whether an earlier message of msgs[0..i) has the message-id of msgs[i]. */
static bool seen_before(struct kmsg *const *msgs, size_t i)
{
    const char *mid = kmsg_header(msgs[i], "message-id", NULL);
    for (size_t j = 0; mid && j < i; j++) {
        const char *other = kmsg_header(msgs[j], "message-id", NULL);
        if (other && !strcmp(other, mid))
            return true;
    }
    return false;
}

static bool next_pred(struct kmsg *const *msgs, size_t n, void *arg)
{
    struct next_arg *a = arg;
    for (size_t i = 0; i < n; i++) {
        const struct kmsg *m = msgs[i];
        if (m->index < a->w->taken_cap && a->w->taken[m->index])
            continue;
        const char *sid = kmsg_header(m, "saga-id", NULL);
        if (!sid || (a->saga_id && strcmp(sid, a->saga_id)))
            continue;
        /* The relay publishes at least once: a message-id seen before is a redelivery, which a
         * participant drops (its inbox). */
        if (seen_before(msgs, i)) {
            mark_taken(a->w, m->index);
            a->w->redelivered++;
            continue;
        }
        a->found = m;
        return true;
    }
    return false;
}

const struct kmsg *saga_e2e_next_command(struct saga_e2e *w, const char *saga_id, int timeout_ms)
{
    struct next_arg a = {w, saga_id, NULL};
    if (!kconsumer_wait_until(w->commands, next_pred, &a, timeout_ms)) {
        saga_e2e_dump(w);
        char *hist = saga_id ? saga_e2e_history(w, saga_id) : strdup("");
        cr_assert_fail("no new command for saga %s within %d ms (history: %s)",
                       saga_id ? saga_id : "(any)", timeout_ms, hist ? hist : "");
    }
    mark_taken(w, a.found->index);
    return a.found;
}

static bool is_uuid(const char *s)
{
    if (!s || strlen(s) != 36)
        return false;
    for (int i = 0; i < 36; i++) {
        if (i == 8 || i == 13 || i == 18 || i == 23) {
            if (s[i] != '-')
                return false;
        } else if (!isxdigit((unsigned char)s[i])) {
            return false;
        }
    }
    return true;
}

static bool is_lower_hex(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!isdigit((unsigned char)s[i]) && !(s[i] >= 'a' && s[i] <= 'f'))
            return false;
    return true;
}

static void check_header(const struct kmsg *m, const char *name, const char *want)
{
    size_t count;
    const char *v = kmsg_header(m, name, &count);
    cr_assert(count == 1 && v && !strcmp(v, want),
              "command %s[%d]@%lld (%s): header %s is \"%s\" (x%zu), expected \"%s\"", m->topic,
              m->partition, (long long)m->offset, m->value ? m->value : "", name, v ? v : "(none)",
              count, want);
}

void saga_e2e_check_command(const struct kmsg *m, const struct saga_ref *ref, const char *topic,
                            const char *type, const char *step, const char *phase,
                            const char *payload_json)
{
    cr_assert_str_eq(m->topic, topic, "saga %s: command %s on topic %s, expected %s", ref->id,
                     kmsg_header(m, "event-type", NULL), m->topic, topic);
    cr_assert(m->key && !strcmp(m->key, ref->order_id), "command %s: key %s, expected %s", type,
              m->key ? m->key : "(null)", ref->order_id);
    size_t count;
    const char *mid = kmsg_header(m, "message-id", &count);
    cr_assert(count == 1 && is_uuid(mid), "command %s: message-id %s (x%zu)", type,
              mid ? mid : "(none)", count);
    check_header(m, "event-type", type);
    check_header(m, "saga-id", ref->id);
    check_header(m, "saga-name", ref->name);
    check_header(m, "saga-step", step);
    check_header(m, "saga-phase", phase);
    char want[256];
    snprintf(want, sizeof(want), "%s/%s/%s", ref->id, step, phase);
    check_header(m, "idempotency-key", want);
    check_header(m, "reply-to", SAGA_E2E_REPLY_TOPIC);
    check_header(m, "correlation-id", ref->correlation_id);
    const char *tp = kmsg_header(m, "traceparent", &count);
    /* 00-<32 hex trace-id>-<16 hex parent-id>-01 */
    cr_assert(count == 1 && tp && strlen(tp) == 55 && !strncmp(tp, "00-", 3) &&
                  !strncmp(tp + 3, ref->trace_id, 32) && tp[35] == '-' &&
                  is_lower_hex(tp + 36, 16) && strspn(tp + 36, "0") < 16 && !strcmp(tp + 52, "-01"),
              "command %s: traceparent %s, expected 00-%s-<16 hex>-01", type, tp ? tp : "(none)",
              ref->trace_id);
    if (payload_json) {
        cJSON *got = m->value ? cJSON_Parse(m->value) : NULL;
        cJSON *exp = cJSON_Parse(payload_json);
        cr_assert(exp, "bad expected payload %s", payload_json);
        cr_assert(got && cJSON_Compare(got, exp, true), "command %s: value %s, expected %s", type,
                  m->value ? m->value : "(null)", payload_json);
        cJSON_Delete(got);
        cJSON_Delete(exp);
    }
}

const struct kmsg *saga_e2e_expect(struct saga_e2e *w, const struct saga_ref *ref,
                                   const char *topic, const char *type, const char *step,
                                   const char *phase, const char *payload_json)
{
    const struct kmsg *m = saga_e2e_next_command(w, ref->id, 30000);
    saga_e2e_check_command(m, ref, topic, type, step, phase, payload_json);
    return m;
}

/* ---- replies ---------------------------------------------------------------------------- */

void saga_e2e_uuid(char out[37])
{
    uuid_t u;
    uuid_generate_random(u);
    uuid_unparse_lower(u, out);
}

static void produce(struct saga_e2e *w, const char *topic, const char *key, const char *value,
                    rd_kafka_headers_t *hdrs)
{
    rd_kafka_resp_err_t err = rd_kafka_producev(
        w->producer, RD_KAFKA_V_TOPIC(topic), RD_KAFKA_V_KEY(key, key ? strlen(key) : 0),
        RD_KAFKA_V_VALUE((void *)value, value ? strlen(value) : 0),
        RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY), RD_KAFKA_V_HEADERS(hdrs), RD_KAFKA_V_END);
    if (err)
        rd_kafka_headers_destroy(hdrs);
    cr_assert_eq(err, RD_KAFKA_RESP_ERR_NO_ERROR, "produce: %s", rd_kafka_err2str(err));
    cr_assert_eq(rd_kafka_flush(w->producer, 20000), RD_KAFKA_RESP_ERR_NO_ERROR,
                 "the reply was not acknowledged within 20 s");
}

void saga_e2e_reply(struct saga_e2e *w, const struct kmsg *m, const char *outcome,
                    const char *data_json, const char *message_id, char *out_message_id)
{
    char mid[37], type[128];
    if (message_id)
        snprintf(mid, sizeof(mid), "%s", message_id);
    else
        saga_e2e_uuid(mid);
    if (out_message_id)
        memcpy(out_message_id, mid, sizeof(mid));
    const char *reply_to = kmsg_header(m, "reply-to", NULL);
    const char *saga_id = kmsg_header(m, "saga-id", NULL);
    cr_assert(reply_to && saga_id, "command without reply-to or saga-id");
    snprintf(type, sizeof(type), "%sReplied", kmsg_header(m, "event-type", NULL));
    rd_kafka_headers_t *hdrs = rd_kafka_headers_new(8);
    const char *pairs[][2] = {
        {"message-id", mid},
        {"in-reply-to", kmsg_header(m, "message-id", NULL)},
        {"saga-id", saga_id},
        {"outcome", outcome},
        {"event-type", type},
        {"correlation-id", kmsg_header(m, "correlation-id", NULL)},
        {"traceparent", kmsg_header(m, "traceparent", NULL)},
    };
    for (size_t i = 0; i < sizeof(pairs) / sizeof(pairs[0]); i++)
        if (pairs[i][1])
            rd_kafka_header_add(hdrs, pairs[i][0], -1, pairs[i][1], -1);
    produce(w, reply_to, saga_id, data_json, hdrs);
}

void saga_e2e_produce_raw(struct saga_e2e *w, const char *key, const char *value, ...)
{
    rd_kafka_headers_t *hdrs = rd_kafka_headers_new(8);
    va_list ap;
    va_start(ap, value);
    const char *name;
    while ((name = va_arg(ap, const char *)) != NULL) {
        const char *v = va_arg(ap, const char *);
        rd_kafka_header_add(hdrs, name, -1, v, -1);
    }
    va_end(ap);
    produce(w, SAGA_E2E_REPLY_TOPIC, key, value, hdrs);
}

/* ---- all commands of a saga ------------------------------------------------------------- */

struct all_arg {
    char **ids; /* message-ids of step_history, in order */
    size_t count;
};

static bool all_pred(struct kmsg *const *msgs, size_t n, void *arg)
{
    struct all_arg *a = arg;
    for (size_t k = 0; k < a->count; k++) {
        bool seen = false;
        for (size_t i = 0; i < n && !seen; i++) {
            const char *mid = kmsg_header(msgs[i], "message-id", NULL);
            seen = mid && !strcmp(mid, a->ids[k]);
        }
        if (!seen)
            return false;
    }
    return true;
}

void saga_e2e_check_all_commands(struct saga_e2e *w, const struct saga_ref *ref)
{
    const char *params[] = {ref->id};
    /* Published means deleted from the outbox (after Kafka's ack). */
    int64_t deadline = proc_now_ms() + 30000;
    long left;
    while ((left = pgtest_count(w->conn,
                                "SELECT count(*) FROM saga.outbox WHERE headers->>'saga-id' = $1",
                                1, params)) > 0) {
        if (proc_now_ms() > deadline) {
            saga_e2e_dump(w);
            cr_assert_fail("saga %s: %ld command(s) still in saga.outbox after 30 s", ref->id,
                           left);
        }
        pause_ms(20);
    }
    PGresult *res = pgtest_query(w->conn,
                                 "SELECT message_id::text FROM saga.step_history WHERE saga_id = "
                                 "$1 AND phase <> 'operator' ORDER BY id",
                                 1, params);
    struct all_arg a = {calloc((size_t)PQntuples(res) + 1, sizeof(char *)), (size_t)PQntuples(res)};
    cr_assert(a.ids, "out of memory");
    for (size_t k = 0; k < a.count; k++)
        a.ids[k] = PQgetvalue(res, (int)k, 0);
    if (!kconsumer_wait_until(w->commands, all_pred, &a, 30000)) {
        saga_e2e_dump(w);
        cr_assert_fail("saga %s: not every command of saga.step_history reached Kafka in 30 s",
                       ref->id);
    }
    size_t n;
    struct kmsg **msgs = kconsumer_snapshot(w->commands, &n);
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        const char *sid = kmsg_header(msgs[i], "saga-id", NULL);
        if (!sid || strcmp(sid, ref->id) || seen_before(msgs, i))
            continue; /* another saga's, or a redelivery (same message-id) */
        const char *mid = kmsg_header(msgs[i], "message-id", NULL);
        cr_assert(k < a.count, "saga %s: command %s (%s) is not in saga.step_history", ref->id, mid,
                  kmsg_header(msgs[i], "event-type", NULL));
        cr_assert(mid && !strcmp(mid, a.ids[k]),
                  "saga %s: command #%zu on Kafka is %s (%s), saga.step_history says %s", ref->id,
                  k + 1, mid ? mid : "(none)", kmsg_header(msgs[i], "event-type", NULL), a.ids[k]);
        cr_assert(msgs[i]->index < w->taken_cap && w->taken[msgs[i]->index],
                  "saga %s: command %s (%s) was never handled by the test", ref->id, mid,
                  kmsg_header(msgs[i], "event-type", NULL));
        k++;
    }
    cr_assert_eq(k, a.count, "saga %s: %zu commands on Kafka, %zu in saga.step_history", ref->id, k,
                 a.count);
    free(msgs);
    free(a.ids);
    PQclear(res);
}

/* ---- admin endpoint --------------------------------------------------------------------- */

int saga_e2e_http_get(struct saga_e2e *w, const char *path, char **body)
{
    return http_get(w->admin_port, path, body);
}

double saga_e2e_metric(struct saga_e2e *w, const char *series)
{
    return http_get_metric(w->admin_port, series);
}

void saga_e2e_wait_metric(struct saga_e2e *w, const char *series, double value, int timeout_ms)
{
    int64_t deadline = proc_now_ms() + timeout_ms;
    double v;
    while ((v = saga_e2e_metric(w, series)) < value) {
        if (proc_now_ms() > deadline) {
            saga_e2e_dump(w);
            cr_assert_fail("metric %s is %g after %d ms, expected at least %g", series, v,
                           timeout_ms, value);
        }
        pause_ms(20);
    }
}

void saga_e2e_wait_ready(struct saga_e2e *w, int timeout_ms)
{
    int64_t deadline = proc_now_ms() + timeout_ms;
    for (;;) {
        char *body;
        int status = saga_e2e_http_get(w, "/readyz", &body);
        if (status == 200) {
            free(body);
            return;
        }
        if (proc_now_ms() > deadline) {
            saga_e2e_dump(w);
            cr_assert_fail("/readyz answers %d after %d ms: %s", status, timeout_ms,
                           body ? body : "");
        }
        free(body);
        pause_ms(50);
    }
}
