#include <criterion/criterion.h>

#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "engine.h"

/* ---- definitions built by hand (no dependency on the JSON loader) ---- */

struct step_spec {
    const char *name;
    bool pivot;
    const char *topic, *type, *key, *payload;     /* key, payload: JSON text; key may be NULL */
    const char *ctopic, *ctype, *ckey, *cpayload; /* ctype NULL: "compensation": null */
    int64_t timeout_ms;
    int max_attempts;
    int64_t backoff_ms, max_backoff_ms;
};

static char *xstrdup(const char *s)
{
    char *c = strdup(s);
    cr_assert_not_null(c);
    return c;
}

static cJSON *json_or_null(const char *text)
{
    if (!text)
        return NULL;
    cJSON *v = cJSON_Parse(text);
    cr_assert_not_null(v, "bad JSON in test: %s", text);
    return v;
}

static struct saga_definition *def_build(const char *name, const struct step_spec *specs, size_t n)
{
    struct saga_definition *def = calloc(1, sizeof(*def));
    cr_assert_not_null(def);
    def->name = xstrdup(name);
    def->version = 1;
    def->reply_topic = xstrdup("saga.replies");
    def->default_timeout_ms = 10000;
    def->default_retry = (struct saga_retry_policy){3, 200, 5000};
    def->steps = calloc(n, sizeof(*def->steps));
    cr_assert_not_null(def->steps);
    def->step_count = n;
    def->pivot_index = -1;
    def->source_label = xstrdup("sagas/test.json");
    for (size_t i = 0; i < n; i++) {
        const struct step_spec *sp = &specs[i];
        struct saga_step_def *s = &def->steps[i];
        s->name = xstrdup(sp->name);
        s->participant = xstrdup("participant");
        s->pivot = sp->pivot;
        if (sp->pivot)
            def->pivot_index = (int)i;
        s->command.topic = xstrdup(sp->topic);
        s->command.type = xstrdup(sp->type);
        s->command.key = json_or_null(sp->key);
        s->command.payload = json_or_null(sp->payload ? sp->payload : "{}");
        s->has_compensation = sp->ctype != NULL;
        if (sp->ctype) {
            s->compensation.topic = xstrdup(sp->ctopic ? sp->ctopic : sp->topic);
            s->compensation.type = xstrdup(sp->ctype);
            s->compensation.key = json_or_null(sp->ckey);
            s->compensation.payload = json_or_null(sp->cpayload ? sp->cpayload : "{}");
        }
        s->timeout_ms = sp->timeout_ms ? sp->timeout_ms : def->default_timeout_ms;
        s->retry.max_attempts = sp->max_attempts ? sp->max_attempts : 3;
        s->retry.backoff_ms = sp->backoff_ms ? sp->backoff_ms : 200;
        s->retry.max_backoff_ms = sp->max_backoff_ms ? sp->max_backoff_ms : 5000;
    }
    return def;
}

static void msgdef_free(struct saga_message_def *m)
{
    free(m->topic);
    free(m->type);
    cJSON_Delete(m->key);
    cJSON_Delete(m->payload);
}

static void def_free(struct saga_definition *def)
{
    if (!def)
        return;
    for (size_t i = 0; i < def->step_count; i++) {
        free(def->steps[i].name);
        free(def->steps[i].participant);
        msgdef_free(&def->steps[i].command);
        if (def->steps[i].has_compensation)
            msgdef_free(&def->steps[i].compensation);
    }
    free(def->steps);
    free(def->name);
    free(def->reply_topic);
    free(def->source_label);
    free(def);
}

/* The order saga of the README, plus a step with nothing to undo and one after the pivot. */
static const struct step_spec order_steps[] = {
    {.name = "reserve_inventory",
     .topic = "inventory.commands",
     .type = "ReserveStock",
     .key = "\"{{input.orderId}}\"",
     .payload = "{\"orderId\": \"{{input.orderId}}\", \"items\": \"{{input.items}}\"}",
     .ctype = "ReleaseStock",
     .cpayload = "{\"orderId\": \"{{input.orderId}}\","
                 " \"reservationId\": \"{{steps.reserve_inventory.reply.reservationId}}\"}",
     .timeout_ms = 5000,
     .max_attempts = 4,
     .backoff_ms = 200,
     .max_backoff_ms = 500},
    {.name = "authorize_payment",
     .topic = "payment.commands",
     .type = "AuthorizePayment",
     .key = "\"cust-{{input.customerId}}\"",
     .payload = "{\"orderId\": \"{{input.orderId}}\", \"amount\": \"{{input.amount}}\","
                " \"note\": \"order {{input.orderId}} for {{input.amount}} ({{input.missing}})\","
                " \"reservation\": \"{{steps.reserve_inventory.reply.reservationId}}\"}",
     .ctopic = "payment.compensations",
     .ctype = "VoidPayment",
     .cpayload = "{\"authorizationId\": \"{{steps.authorize_payment.reply.authorizationId}}\"}",
     .max_attempts = 2,
     .backoff_ms = 100,
     .max_backoff_ms = 1000},
    {.name = "notify_customer",
     .topic = "notify.commands",
     .type = "NotifyCustomer",
     .payload = "{\"customer\": \"{{input.customerId}}\","
                " \"reservation\": \"{{steps.reserve_inventory.reply}}\"}",
     .max_attempts = 3},
    {.name = "approve_order",
     .pivot = true,
     .topic = "orders.commands",
     .type = "ApproveOrder",
     .key = "\"{{input.orderId}}\"",
     .payload = "{\"orderId\": \"{{input.orderId}}\","
                " \"authorizationId\": \"{{steps.authorize_payment.reply.authorizationId}}\"}",
     .max_attempts = 2,
     .backoff_ms = 1000,
     .max_backoff_ms = 4000},
    {.name = "schedule_shipping",
     .topic = "shipping.commands",
     .type = "ScheduleShipping",
     .payload = "{\"orderId\": \"{{input.orderId}}\", \"saga\": \"{{saga.id}}\","
                " \"name\": \"{{saga.name}}\", \"corr\": \"{{saga.correlation_id}}\","
                " \"ids\": \"{{saga.id}}/{{saga.correlation_id}}\"}",
     .max_attempts = 1,
     .backoff_ms = 50,
     .max_backoff_ms = 100},
};
#define ORDER_STEPS (sizeof(order_steps) / sizeof(order_steps[0]))

static const char *order_input = "{\"orderId\": \"o-17\", \"customerId\": \"c-3\","
                                 " \"items\": [{\"sku\": \"a\", \"qty\": 2}], \"amount\": 99.5}";

#define SAGA_ID "5a6a0000-0000-4000-8000-000000000001"
#define TRACE_ID "4bf92f3577b34da6a3ce929d0e0e4736"

/* ---- the harness: applies events and checks every effect ---- */

struct harness {
    struct saga_definition *def;
    struct saga_state st;
    struct saga_engine_env env;
    unsigned long uuid_counter;
    int64_t now;
    struct saga_effects fx;
    char sent[512][SAGA_UUID_LEN + 1]; /* every message id sent, in order */
    int sent_count;
    char last_replied[SAGA_UUID_LEN + 1];
    char trace[1024];
};

/* Message ids from a counter, in the first group and in the last (where span ids come from,
 * so that they differ). */
static void counter_uuid(char out[SAGA_UUID_LEN + 1], void *arg)
{
    unsigned long *counter = arg;
    ++*counter;
    snprintf(out, SAGA_UUID_LEN + 1, "%08lx-0000-4000-8000-%04lx0000abcd", *counter,
             *counter & 0xffff);
}

static void harness_init(struct harness *h, struct saga_definition *def, const char *input,
                         const char *correlation_id, const char *trace_id)
{
    memset(h, 0, sizeof(*h));
    h->def = def;
    h->env.new_uuid = counter_uuid;
    h->env.arg = &h->uuid_counter;
    h->now = 1000000;
    saga_state_init(&h->st, SAGA_ID, json_or_null(input), correlation_id, trace_id);
}

static void harness_fini(struct harness *h)
{
    saga_effects_clear(&h->fx);
    saga_state_clear(&h->st);
}

static const char *header_get(const struct saga_message *m, const char *name)
{
    for (size_t i = 0; i < m->header_count; i++)
        if (strcmp(m->headers[i].name, name) == 0)
            return m->headers[i].value;
    return NULL;
}

/* The expected traceparent, computed independently: the last 16 hex digits of the message id
 * (none of the test's ids has them all zero). */
static void expected_traceparent(const struct saga_state *st, const char *message_id, char *out,
                                 size_t len)
{
    char hex[33];
    size_t k = 0;
    for (const char *p = message_id; *p && k < 32; p++)
        if (*p != '-')
            hex[k++] = *p;
    hex[k] = '\0';
    snprintf(out, len, "00-%s-%s-01", st->trace_id, k == 32 ? hex + 16 : "(short id)");
}

/* Every header, in order, with its value. */
static void check_message(const struct saga_definition *def, const struct saga_state *st,
                          const struct saga_message *m)
{
    const struct saga_step_def *s = &def->steps[m->step];
    bool comp = m->phase == SAGA_PHASE_COMPENSATION;
    const struct saga_message_def *md = comp ? &s->compensation : &s->command;
    char idem[512], tp[128];

    cr_assert(m->step >= 0 && (size_t)m->step < def->step_count);
    cr_assert(!comp || s->has_compensation, "compensation sent for %s which has none", s->name);
    cr_assert_str_eq(m->topic, md->topic);
    cr_assert_str_eq(m->type, md->type);
    cr_assert_not_null(m->key);
    cr_assert_not_null(m->payload);
    cJSON *payload = cJSON_Parse(m->payload);
    cr_assert_not_null(payload, "payload is not JSON: %s", m->payload);
    cJSON_Delete(payload);

    snprintf(idem, sizeof(idem), "%s/%s/%s", st->id, s->name, comp ? "compensation" : "action");
    expected_traceparent(st, m->message_id, tp, sizeof(tp));
    const char *expected[][2] = {
        {"message-id", m->message_id},
        {"event-type", md->type},
        {"saga-id", st->id},
        {"saga-name", def->name},
        {"saga-step", s->name},
        {"saga-phase", comp ? "compensation" : "action"},
        {"idempotency-key", idem},
        {"reply-to", def->reply_topic},
        {"correlation-id", st->correlation_id ? st->correlation_id : st->id},
        {"traceparent", tp},
    };
    cr_assert_eq(m->header_count, 10);
    for (size_t i = 0; i < 10; i++) {
        cr_assert_str_eq(m->headers[i].name, expected[i][0]);
        cr_assert_str_eq(m->headers[i].value, expected[i][1], "header %s", expected[i][0]);
    }
}

static void check_consistent(const struct saga_state *st)
{
    bool idle = st->status == SAGA_PENDING || st->status == SAGA_COMPLETED ||
                st->status == SAGA_COMPENSATED || st->status == SAGA_FAILED;
    cr_assert_eq(st->wait == SAGA_WAIT_NONE, st->deadline_ms == 0, "wait %d deadline %" PRId64,
                 st->wait, st->deadline_ms);
    cr_assert_eq(st->wait == SAGA_WAIT_NONE, idle, "wait %d status %s", st->wait,
                 saga_status_name(st->status));
    cr_assert_eq(st->wait == SAGA_WAIT_REPLY, st->waiting_message_id[0] != '\0');
    if (st->status == SAGA_RUNNING)
        cr_assert_eq(st->phase, SAGA_PHASE_ACTION);
    if (st->status == SAGA_COMPENSATING || st->status == SAGA_FAILED)
        cr_assert_eq(st->phase, SAGA_PHASE_COMPENSATION);
}

/* Applies ev and checks what must hold whatever the event; fills h->trace with a summary:
 * "<outcome>" or "applied <status> <history rows> wait=<none|reply+ms|backoff+ms>". */
static enum saga_outcome harness_apply(struct harness *h, const struct saga_event *ev)
{
    struct saga_state before;
    char *replies_before = h->st.replies ? cJSON_PrintUnformatted(h->st.replies) : NULL;
    char waiting_before[SAGA_UUID_LEN + 1];

    memcpy(&before, &h->st, sizeof(before));
    memcpy(waiting_before, h->st.waiting_message_id, sizeof(waiting_before));
    saga_effects_clear(&h->fx);
    int rc = saga_engine_apply(h->def, &h->st, ev, &h->env, &h->fx);
    cr_assert_eq(rc, 0);
    check_consistent(&h->st);

    if (h->fx.outcome != SAGA_APPLIED) {
        cr_assert(memcmp(&before, &h->st, sizeof(before)) == 0, "state changed");
        char *replies_after = h->st.replies ? cJSON_PrintUnformatted(h->st.replies) : NULL;
        cr_assert((!replies_before && !replies_after) ||
                  (replies_before && replies_after && !strcmp(replies_before, replies_after)));
        free(replies_after);
        cr_assert_eq(h->fx.message_count, 0);
        cr_assert_eq(h->fx.history_count, 0);
        if (h->fx.outcome == SAGA_REJECTED)
            cr_assert_neq(h->fx.error[0], '\0', "a rejection says why");
        snprintf(h->trace, sizeof(h->trace), "%s",
                 h->fx.outcome == SAGA_IGNORED ? "ignored" : "rejected");
        free(replies_before);
        return h->fx.outcome;
    }
    free(replies_before);
    cr_assert(!saga_status_is_terminal(before.status), "a terminal saga changed");

    /* Messages and SENT rows go together, in order; the last one is what the saga waits for. */
    size_t sent_rows = 0;
    size_t len =
        (size_t)snprintf(h->trace, sizeof(h->trace), "applied %s", saga_status_name(h->st.status));
    for (size_t i = 0; i < h->fx.history_count; i++) {
        const struct saga_history_entry *e = &h->fx.history[i];
        if (e->status == SAGA_HIST_SENT) {
            cr_assert_lt(sent_rows, h->fx.message_count);
            const struct saga_message *m = &h->fx.messages[sent_rows++];
            cr_assert_str_eq(e->message_id, m->message_id);
            cr_assert_eq(e->step, m->step);
            cr_assert_eq(e->phase, m->phase);
            cr_assert_eq(e->attempt, m->attempt);
            cr_assert_null(e->reply);
            cr_assert_lt(h->sent_count, 512);
            memcpy(h->sent[h->sent_count++], m->message_id, SAGA_UUID_LEN + 1);
        } else {
            /* Outcomes update the row of the message the saga was waiting for. */
            cr_assert_str_eq(e->message_id, waiting_before);
            cr_assert_eq(e->step, before.step);
            cr_assert_eq(e->phase, before.phase);
            cr_assert_eq(e->attempt, before.attempt);
        }
        len += (size_t)snprintf(h->trace + len, sizeof(h->trace) - len, " %s:%s/%c#%d",
                                saga_history_status_name(e->status), h->def->steps[e->step].name,
                                e->phase == SAGA_PHASE_ACTION ? 'a' : 'c', e->attempt);
    }
    cr_assert_eq(sent_rows, h->fx.message_count);
    cr_assert_leq(h->fx.message_count, 1);
    for (size_t i = 0; i < h->fx.message_count; i++)
        check_message(h->def, &h->st, &h->fx.messages[i]);
    if (h->fx.message_count) {
        const struct saga_message *m = &h->fx.messages[h->fx.message_count - 1];
        cr_assert_str_eq(h->st.waiting_message_id, m->message_id);
        cr_assert_eq(h->st.step, m->step);
        cr_assert_eq(h->st.phase, m->phase);
        cr_assert_eq(h->st.attempt, m->attempt);
    }
    if (h->st.wait == SAGA_WAIT_NONE)
        snprintf(h->trace + len, sizeof(h->trace) - len, " wait=none");
    else
        snprintf(h->trace + len, sizeof(h->trace) - len, " wait=%s+%" PRId64,
                 h->st.wait == SAGA_WAIT_REPLY ? "reply" : "backoff", h->st.deadline_ms - h->now);
    return h->fx.outcome;
}

/* Default reply data, so that templates downstream have something to use. */
static const char *default_reply(const char *step)
{
    if (!strcmp(step, "reserve_inventory"))
        return "{\"reservationId\": \"r-1\"}";
    if (!strcmp(step, "authorize_payment"))
        return "{\"authorizationId\": \"a-9\"}";
    return "{}";
}

/* Runs one event written as text:
 *   start | ok [JSON] | fail [JSON] | timeout | early | late | stale | dup | unknown |
 *   abort [reason] | retry
 * late: a success reply to the last message sent (after it timed out); stale: to the one
 * before; dup: to the last message already replied to; unknown: to an id never sent. */
static enum saga_outcome harness_event(struct harness *h, const char *text)
{
    struct saga_event ev = {.now_ms = h->now};
    cJSON *reply = NULL;
    char word[16] = "";
    const char *arg = NULL;

    sscanf(text, "%15s", word);
    arg = text + strlen(word);
    while (*arg == ' ')
        arg++;
    if (!*arg)
        arg = NULL;

    if (!strcmp(word, "start")) {
        ev.kind = SAGA_EV_START;
    } else if (!strcmp(word, "ok") || !strcmp(word, "fail")) {
        ev.kind = SAGA_EV_REPLY;
        ev.success = word[0] == 'o';
        ev.in_reply_to = h->st.waiting_message_id;
        reply = json_or_null(arg ? arg : default_reply(h->def->steps[h->st.step].name));
        ev.reply = reply;
    } else if (!strcmp(word, "timeout")) {
        ev.kind = SAGA_EV_TIMEOUT;
        h->now = h->st.deadline_ms ? h->st.deadline_ms : h->now + 1000;
        ev.now_ms = h->now;
    } else if (!strcmp(word, "early")) {
        ev.kind = SAGA_EV_TIMEOUT;
        ev.now_ms = h->st.deadline_ms - 1;
    } else if (!strcmp(word, "late") || !strcmp(word, "stale")) {
        ev.kind = SAGA_EV_REPLY;
        ev.success = true;
        int back = word[0] == 'l' ? 1 : 2;
        cr_assert_geq(h->sent_count, back);
        ev.in_reply_to = h->sent[h->sent_count - back];
    } else if (!strcmp(word, "dup")) {
        ev.kind = SAGA_EV_REPLY;
        ev.success = true;
        ev.in_reply_to = h->last_replied;
    } else if (!strcmp(word, "unknown")) {
        ev.kind = SAGA_EV_REPLY;
        ev.success = true;
        ev.in_reply_to = "ffffffff-ffff-4fff-bfff-ffffffffffff";
    } else if (!strcmp(word, "abort")) {
        ev.kind = SAGA_EV_ABORT;
        ev.reason = arg;
    } else if (!strcmp(word, "retry")) {
        ev.kind = SAGA_EV_RETRY;
    } else {
        cr_assert_fail("unknown test event %s", text);
    }
    char in_reply_to[SAGA_UUID_LEN + 1] = "";
    if (ev.kind == SAGA_EV_REPLY)
        snprintf(in_reply_to, sizeof(in_reply_to), "%s", ev.in_reply_to);
    enum saga_outcome out = harness_apply(h, &ev);
    if (ev.kind == SAGA_EV_REPLY && out == SAGA_APPLIED)
        memcpy(h->last_replied, in_reply_to, sizeof(in_reply_to));
    cJSON_Delete(reply);
    return out;
}

/* ---- scenario table ---- */

struct scenario_step {
    const char *event;
    const char *expect; /* the trace */
};

struct scenario {
    const char *name;
    struct scenario_step steps[40];
};

#define START_R                                                                                    \
    {                                                                                              \
        "start", "applied running sent:reserve_inventory/a#1 wait=reply+5000"                      \
    }
#define OK_R                                                                                       \
    {                                                                                              \
        "ok", "applied running succeeded:reserve_inventory/a#1 sent:authorize_payment/a#1 "        \
              "wait=reply+10000"                                                                   \
    }
#define OK_A                                                                                       \
    {                                                                                              \
        "ok", "applied running succeeded:authorize_payment/a#1 sent:notify_customer/a#1 "          \
              "wait=reply+10000"                                                                   \
    }
#define OK_N                                                                                       \
    {                                                                                              \
        "ok", "applied running succeeded:notify_customer/a#1 sent:approve_order/a#1 "              \
              "wait=reply+10000"                                                                   \
    }
#define OK_P                                                                                       \
    {                                                                                              \
        "ok", "applied running succeeded:approve_order/a#1 sent:schedule_shipping/a#1 "            \
              "wait=reply+10000"                                                                   \
    }

static const struct scenario scenarios[] = {
    {"happy path",
     {START_R,
      OK_R,
      OK_A,
      OK_N,
      OK_P,
      {"ok", "applied completed succeeded:schedule_shipping/a#1 wait=none"},
      {"ok", "ignored"},
      {"dup", "ignored"},
      {"late", "ignored"},
      {"timeout", "ignored"},
      {"abort", "rejected"},
      {"retry", "rejected"},
      {"start", "ignored"}}},
    {"events on a pending saga",
     {{"ok", "ignored"},
      {"fail", "ignored"},
      {"unknown", "ignored"},
      {"timeout", "ignored"},
      {"retry", "rejected"},
      START_R,
      {"start", "ignored"}}},
    {"business failure at the first step: nothing to undo",
     {START_R,
      {"fail", "applied compensated failed:reserve_inventory/a#1 wait=none"},
      {"ok", "ignored"},
      {"abort", "rejected"},
      {"retry", "rejected"}}},
    {"business failure at the second step",
     {START_R,
      OK_R,
      {"fail", "applied compensating failed:authorize_payment/a#1 "
               "sent:reserve_inventory/c#1 wait=reply+5000"},
      {"dup", "ignored"},
      {"stale", "ignored"},
      {"abort", "rejected"},
      {"early", "ignored"},
      {"ok", "applied compensated succeeded:reserve_inventory/c#1 wait=none"},
      {"retry", "rejected"}}},
    {"business failure at the step without compensation",
     {START_R,
      OK_R,
      OK_A,
      {"fail", "applied compensating failed:notify_customer/a#1 "
               "sent:authorize_payment/c#1 wait=reply+10000"},
      {"ok", "applied compensating succeeded:authorize_payment/c#1 "
             "sent:reserve_inventory/c#1 wait=reply+5000"},
      {"ok", "applied compensated succeeded:reserve_inventory/c#1 wait=none"}}},
    {"pivot failure compensates the steps before it",
     {START_R,
      OK_R,
      OK_A,
      OK_N,
      {"fail", "applied compensating failed:approve_order/a#1 "
               "sent:authorize_payment/c#1 wait=reply+10000"},
      {"ok", "applied compensating succeeded:authorize_payment/c#1 "
             "sent:reserve_inventory/c#1 wait=reply+5000"},
      {"ok", "applied compensated succeeded:reserve_inventory/c#1 wait=none"}}},
    {"timeouts retried with growing backoff, then the timed-out step is compensated",
     {START_R,
      {"early", "ignored"},
      {"timeout", "applied running timed_out:reserve_inventory/a#1 wait=backoff+200"},
      {"early", "ignored"},
      {"late", "ignored"},
      {"timeout", "applied running sent:reserve_inventory/a#2 wait=reply+5000"},
      {"stale", "ignored"},
      {"timeout", "applied running timed_out:reserve_inventory/a#2 wait=backoff+400"},
      {"timeout", "applied running sent:reserve_inventory/a#3 wait=reply+5000"},
      {"timeout", "applied running timed_out:reserve_inventory/a#3 wait=backoff+500"},
      {"timeout", "applied running sent:reserve_inventory/a#4 wait=reply+5000"},
      {"timeout", "applied compensating timed_out:reserve_inventory/a#4 "
                  "sent:reserve_inventory/c#1 wait=reply+5000"},
      {"stale", "ignored"},
      {"ok", "applied compensated succeeded:reserve_inventory/c#1 wait=none"}}},
    {"timeout budget exhausted at the second step compensates it and the first",
     {START_R,
      OK_R,
      {"timeout", "applied running timed_out:authorize_payment/a#1 wait=backoff+100"},
      {"timeout", "applied running sent:authorize_payment/a#2 wait=reply+10000"},
      {"timeout", "applied compensating timed_out:authorize_payment/a#2 "
                  "sent:authorize_payment/c#1 wait=reply+10000"},
      {"ok", "applied compensating succeeded:authorize_payment/c#1 "
             "sent:reserve_inventory/c#1 wait=reply+5000"},
      {"ok", "applied compensated succeeded:reserve_inventory/c#1 wait=none"}}},
    {"timeout budget exhausted at the step without compensation",
     {START_R,
      OK_R,
      OK_A,
      {"timeout", "applied running timed_out:notify_customer/a#1 wait=backoff+200"},
      {"timeout", "applied running sent:notify_customer/a#2 wait=reply+10000"},
      {"timeout", "applied running timed_out:notify_customer/a#2 wait=backoff+400"},
      {"timeout", "applied running sent:notify_customer/a#3 wait=reply+10000"},
      {"timeout", "applied compensating timed_out:notify_customer/a#3 "
                  "sent:authorize_payment/c#1 wait=reply+10000"}}},
    {"a retried step that then succeeds goes on",
     {START_R,
      {"timeout", "applied running timed_out:reserve_inventory/a#1 wait=backoff+200"},
      {"timeout", "applied running sent:reserve_inventory/a#2 wait=reply+5000"},
      {"ok", "applied running succeeded:reserve_inventory/a#2 sent:authorize_payment/a#1 "
             "wait=reply+10000"}}},
    {"pivot timeouts are retried beyond max_attempts",
     {START_R,
      OK_R,
      OK_A,
      OK_N,
      {"timeout", "applied running timed_out:approve_order/a#1 wait=backoff+1000"},
      {"abort", "rejected"},
      {"timeout", "applied running sent:approve_order/a#2 wait=reply+10000"},
      {"timeout", "applied running timed_out:approve_order/a#2 wait=backoff+2000"},
      {"timeout", "applied running sent:approve_order/a#3 wait=reply+10000"},
      {"timeout", "applied running timed_out:approve_order/a#3 wait=backoff+4000"},
      {"timeout", "applied running sent:approve_order/a#4 wait=reply+10000"},
      {"timeout", "applied running timed_out:approve_order/a#4 wait=backoff+4000"},
      {"timeout", "applied running sent:approve_order/a#5 wait=reply+10000"},
      {"stale", "ignored"},
      {"ok", "applied running succeeded:approve_order/a#5 sent:schedule_shipping/a#1 "
             "wait=reply+10000"}}},
    {"after the pivot failures are retried until success, nothing compensated",
     {START_R,
      OK_R,
      OK_A,
      OK_N,
      OK_P,
      {"fail", "applied running failed:schedule_shipping/a#1 wait=backoff+50"},
      {"abort", "rejected"},
      {"timeout", "applied running sent:schedule_shipping/a#2 wait=reply+10000"},
      {"fail", "applied running failed:schedule_shipping/a#2 wait=backoff+100"},
      {"timeout", "applied running sent:schedule_shipping/a#3 wait=reply+10000"},
      {"timeout", "applied running timed_out:schedule_shipping/a#3 wait=backoff+100"},
      {"timeout", "applied running sent:schedule_shipping/a#4 wait=reply+10000"},
      {"late", "applied completed succeeded:schedule_shipping/a#4 wait=none"}}},
    {"compensation fails until the saga is failed, then RETRY completes it",
     {START_R,
      OK_R,
      {"fail", "applied compensating failed:authorize_payment/a#1 "
               "sent:reserve_inventory/c#1 wait=reply+5000"},
      {"retry", "rejected"},
      {"fail", "applied compensating failed:reserve_inventory/c#1 wait=backoff+200"},
      {"late", "ignored"},
      {"timeout", "applied compensating sent:reserve_inventory/c#2 wait=reply+5000"},
      {"fail", "applied compensating failed:reserve_inventory/c#2 wait=backoff+400"},
      {"timeout", "applied compensating sent:reserve_inventory/c#3 wait=reply+5000"},
      {"timeout", "applied compensating timed_out:reserve_inventory/c#3 wait=backoff+500"},
      {"timeout", "applied compensating sent:reserve_inventory/c#4 wait=reply+5000"},
      {"fail", "applied failed failed:reserve_inventory/c#4 wait=none"},
      {"late", "ignored"},
      {"timeout", "ignored"},
      {"abort", "rejected"},
      {"start", "ignored"},
      {"retry", "applied compensating sent:reserve_inventory/c#5 wait=reply+5000"},
      {"retry", "rejected"},
      {"fail", "applied compensating failed:reserve_inventory/c#5 wait=backoff+200"},
      {"timeout", "applied compensating sent:reserve_inventory/c#6 wait=reply+5000"},
      {"ok", "applied compensated succeeded:reserve_inventory/c#6 wait=none"},
      {"retry", "rejected"}}},
    {"a compensation that times out to the end fails the saga; RETRY resumes with a fresh budget",
     {START_R,
      OK_R,
      OK_A,
      {"fail", "applied compensating failed:notify_customer/a#1 "
               "sent:authorize_payment/c#1 wait=reply+10000"},
      {"timeout", "applied compensating timed_out:authorize_payment/c#1 wait=backoff+100"},
      {"timeout", "applied compensating sent:authorize_payment/c#2 wait=reply+10000"},
      {"timeout", "applied failed timed_out:authorize_payment/c#2 wait=none"},
      {"retry", "applied compensating sent:authorize_payment/c#3 wait=reply+10000"},
      {"timeout", "applied compensating timed_out:authorize_payment/c#3 wait=backoff+100"},
      {"timeout", "applied compensating sent:authorize_payment/c#4 wait=reply+10000"},
      {"fail", "applied failed failed:authorize_payment/c#4 wait=none"},
      {"retry", "applied compensating sent:authorize_payment/c#5 wait=reply+10000"},
      {"ok", "applied compensating succeeded:authorize_payment/c#5 "
             "sent:reserve_inventory/c#1 wait=reply+5000"},
      {"ok", "applied compensated succeeded:reserve_inventory/c#1 wait=none"}}},
    {"abort a pending saga",
     {{"abort", "applied compensated wait=none"}, {"start", "ignored"}, {"abort", "rejected"}}},
    {"abort while the first step waits for its reply",
     {START_R,
      {"abort", "applied compensating sent:reserve_inventory/c#1 wait=reply+5000"},
      {"stale", "ignored"},
      {"abort", "rejected"},
      {"ok", "applied compensated succeeded:reserve_inventory/c#1 wait=none"},
      {"abort", "rejected"}}},
    {"abort during a backoff of the step without compensation",
     {START_R,
      OK_R,
      OK_A,
      {"timeout", "applied running timed_out:notify_customer/a#1 wait=backoff+200"},
      {"abort", "applied compensating sent:authorize_payment/c#1 wait=reply+10000"},
      {"ok", "applied compensating succeeded:authorize_payment/c#1 "
             "sent:reserve_inventory/c#1 wait=reply+5000"},
      {"ok", "applied compensated succeeded:reserve_inventory/c#1 wait=none"}}},
    {"abort after the pivot was sent is rejected",
     {START_R, OK_R, OK_A, OK_N, {"abort", "rejected"}, OK_P, {"abort", "rejected"}}},
    {"stale, duplicate and unknown replies are ignored",
     {START_R,
      {"unknown", "ignored"},
      OK_R,
      {"dup", "ignored"},
      {"stale", "ignored"},
      {"unknown", "ignored"},
      {"early", "ignored"},
      OK_A}},
};

static void run_scenario(const struct scenario *sc)
{
    struct saga_definition *def = def_build("order_fulfillment", order_steps, ORDER_STEPS);
    struct harness *h = malloc(sizeof(*h));
    cr_assert_not_null(h);
    harness_init(h, def, order_input, "corr-1", TRACE_ID);
    for (int i = 0; sc->steps[i].event; i++) {
        harness_event(h, sc->steps[i].event);
        cr_expect_str_eq(h->trace, sc->steps[i].expect, "%s, event %d (%s)", sc->name, i,
                         sc->steps[i].event);
        if (strcmp(h->trace, sc->steps[i].expect) != 0)
            break; /* the rest would only cascade */
    }
    harness_fini(h);
    free(h);
    def_free(def);
}

Test(engine, scenarios)
{
    for (size_t i = 0; i < sizeof(scenarios) / sizeof(scenarios[0]); i++)
        run_scenario(&scenarios[i]);
}

/* ---- messages, rendering, errors ---- */

static cJSON *payload_of(const struct saga_message *m)
{
    cJSON *p = cJSON_Parse(m->payload);
    cr_assert_not_null(p);
    return p;
}

static void expect_payload(const struct saga_message *m, const char *expected_json)
{
    cJSON *got = payload_of(m);
    cJSON *want = json_or_null(expected_json);
    char *g = cJSON_PrintUnformatted(got);
    cr_expect(cJSON_Compare(got, want, true), "payload %s, expected %s", g, expected_json);
    free(g);
    cJSON_Delete(got);
    cJSON_Delete(want);
}

Test(engine, messages_render_payloads_keys_and_headers)
{
    struct saga_definition *def = def_build("order_fulfillment", order_steps, ORDER_STEPS);
    struct harness *h = malloc(sizeof(*h));
    harness_init(h, def, order_input, "corr-1", TRACE_ID);

    harness_event(h, "start");
    const struct saga_message *m = &h->fx.messages[0];
    cr_assert_str_eq(m->message_id, "00000001-0000-4000-8000-00010000abcd");
    cr_assert_str_eq(m->topic, "inventory.commands");
    cr_assert_str_eq(m->type, "ReserveStock");
    cr_assert_str_eq(m->key, "o-17");
    expect_payload(m, "{\"orderId\": \"o-17\", \"items\": [{\"sku\": \"a\", \"qty\": 2}]}");
    cr_assert_str_eq(header_get(m, "idempotency-key"), SAGA_ID "/reserve_inventory/action");
    cr_assert_str_eq(header_get(m, "traceparent"), "00-" TRACE_ID "-800000010000abcd-01");
    cr_assert_str_eq(header_get(m, "correlation-id"), "corr-1");
    cr_assert_str_eq(header_get(m, "reply-to"), "saga.replies");
    cr_assert_str_eq(header_get(m, "saga-name"), "order_fulfillment");
    cr_assert_str_eq(header_get(m, "saga-phase"), "action");
    cr_assert_eq(m->attempt, 1);

    harness_event(h, "ok {\"reservationId\": \"res-42\", \"lines\": 2}");
    m = &h->fx.messages[0];
    cr_assert_str_eq(m->key, "cust-c-3");
    /* An exact placeholder keeps the number's type; interpolation renders it as text and a
     * missing input as "". */
    expect_payload(m, "{\"orderId\": \"o-17\", \"amount\": 99.5,"
                      " \"note\": \"order o-17 for 99.5 ()\", \"reservation\": \"res-42\"}");
    /* The reply data of the succeeded step is stored under its name. */
    cJSON *stored = cJSON_GetObjectItemCaseSensitive(h->st.replies, "reserve_inventory");
    cr_assert_not_null(stored);
    cr_assert_str_eq(cJSON_GetObjectItemCaseSensitive(stored, "reservationId")->valuestring,
                     "res-42");
    /* The SUCCEEDED row carries a copy of the reply. */
    cr_assert_eq(h->fx.history[0].status, SAGA_HIST_SUCCEEDED);
    cr_assert_not_null(h->fx.history[0].reply);
    cr_assert_eq(cJSON_GetObjectItemCaseSensitive(h->fx.history[0].reply, "lines")->valueint, 2);

    harness_event(h, "ok {\"authorizationId\": \"auth-7\"}");
    m = &h->fx.messages[0];
    cr_assert_str_eq(m->key, SAGA_ID, "no key template: the saga id");
    expect_payload(m, "{\"customer\": \"c-3\","
                      " \"reservation\": {\"reservationId\": \"res-42\", \"lines\": 2}}");

    /* Failure at the third step: compensations in reverse, each with its own reply. */
    harness_event(h, "fail {\"reason\": \"no address\"}");
    cr_assert_eq(h->fx.history[0].status, SAGA_HIST_FAILED);
    cr_assert_str_eq(
        cJSON_GetObjectItemCaseSensitive(h->fx.history[0].reply, "reason")->valuestring,
        "no address");
    cr_assert_str_eq(h->st.error, "step notify_customer failed");
    m = &h->fx.messages[0];
    cr_assert_str_eq(m->topic, "payment.compensations");
    cr_assert_str_eq(m->type, "VoidPayment");
    cr_assert_str_eq(m->key, "cust-c-3", "the compensation key defaults to the command's");
    expect_payload(m, "{\"authorizationId\": \"auth-7\"}");
    cr_assert_str_eq(header_get(m, "saga-phase"), "compensation");
    cr_assert_str_eq(header_get(m, "event-type"), "VoidPayment");
    cr_assert_str_eq(header_get(m, "idempotency-key"), SAGA_ID "/authorize_payment/compensation");

    harness_event(h, "ok");
    m = &h->fx.messages[0];
    cr_assert_str_eq(m->topic, "inventory.commands");
    cr_assert_str_eq(m->type, "ReleaseStock");
    cr_assert_str_eq(m->key, "o-17");
    expect_payload(m, "{\"orderId\": \"o-17\", \"reservationId\": \"res-42\"}");

    harness_event(h, "ok");
    cr_assert_eq(h->st.status, SAGA_COMPENSATED);
    cr_assert_str_eq(h->st.error, "step notify_customer failed");
    harness_fini(h);
    free(h);
    def_free(def);
}

Test(engine, idempotency_key_is_stable_across_retries_and_message_ids_are_not)
{
    struct saga_definition *def = def_build("order_fulfillment", order_steps, ORDER_STEPS);
    struct harness *h = malloc(sizeof(*h));
    harness_init(h, def, order_input, NULL, NULL);
    char first_id[SAGA_UUID_LEN + 1];

    harness_event(h, "start");
    snprintf(first_id, sizeof(first_id), "%s", h->fx.messages[0].message_id);
    /* No correlation id: the saga id. No trace id: derived from the saga id. */
    cr_assert_str_eq(header_get(&h->fx.messages[0], "correlation-id"), SAGA_ID);
    cr_assert_str_eq(h->st.trace_id, "5a6a0000000040008000000000000001");
    harness_event(h, "timeout");
    harness_event(h, "timeout");
    const struct saga_message *m = &h->fx.messages[0];
    cr_assert_eq(m->attempt, 2);
    cr_assert_str_neq(m->message_id, first_id);
    cr_assert_str_eq(header_get(m, "idempotency-key"), SAGA_ID "/reserve_inventory/action");
    cr_assert_str_eq(header_get(m, "traceparent"),
                     "00-5a6a0000000040008000000000000001-800000020000abcd-01");
    harness_fini(h);
    free(h);
    def_free(def);
}

Test(engine, schedule_shipping_renders_saga_fields)
{
    struct saga_definition *def = def_build("order_fulfillment", order_steps, ORDER_STEPS);
    struct harness *h = malloc(sizeof(*h));
    harness_init(h, def, order_input, "corr-1", TRACE_ID);
    const char *events[] = {"start", "ok", "ok", "ok", "ok"};
    for (size_t i = 0; i < 5; i++)
        harness_event(h, events[i]);
    const struct saga_message *m = &h->fx.messages[0];
    cr_assert_str_eq(m->type, "ScheduleShipping");
    expect_payload(m, "{\"orderId\": \"o-17\", \"saga\": \"" SAGA_ID "\","
                      " \"name\": \"order_fulfillment\", \"corr\": \"corr-1\","
                      " \"ids\": \"" SAGA_ID "/corr-1\"}");
    /* The pivot was sent, and only then. */
    cr_assert_eq(h->st.pivot_sent, 1);
    harness_fini(h);
    free(h);
    def_free(def);
}

Test(engine, pivot_sent_is_set_when_the_pivot_is_first_sent)
{
    struct saga_definition *def = def_build("order_fulfillment", order_steps, ORDER_STEPS);
    struct harness *h = malloc(sizeof(*h));
    harness_init(h, def, order_input, NULL, TRACE_ID);
    harness_event(h, "start");
    harness_event(h, "ok");
    harness_event(h, "ok");
    cr_assert_eq(h->st.pivot_sent, 0);
    harness_event(h, "ok");
    cr_assert_eq(h->st.pivot_sent, 1);
    cr_assert_str_eq(h->fx.messages[0].type, "ApproveOrder");
    expect_payload(&h->fx.messages[0], "{\"orderId\": \"o-17\", \"authorizationId\": \"a-9\"}");
    harness_fini(h);
    free(h);
    def_free(def);
}

Test(engine, errors_name_the_cause)
{
    struct saga_definition *def = def_build("order_fulfillment", order_steps, ORDER_STEPS);
    struct harness *h = malloc(sizeof(*h));

    harness_init(h, def, order_input, NULL, TRACE_ID);
    cr_assert_eq(harness_event(h, "abort customer cancelled"), SAGA_APPLIED);
    cr_assert_str_eq(h->st.error, "aborted: customer cancelled");
    cr_assert_eq(harness_event(h, "abort"), SAGA_REJECTED);
    cr_assert(strstr(h->fx.error, "compensated") != NULL, "%s", h->fx.error);
    harness_fini(h);

    harness_init(h, def, order_input, NULL, TRACE_ID);
    harness_event(h, "start");
    harness_event(h, "abort");
    cr_assert_str_eq(h->st.error, "aborted: no reason given");
    cr_assert_eq(harness_event(h, "abort"), SAGA_REJECTED);
    cr_assert(strstr(h->fx.error, "compensating") != NULL, "%s", h->fx.error);
    harness_fini(h);

    harness_init(h, def, order_input, NULL, TRACE_ID);
    harness_event(h, "start");
    for (int i = 0; i < 7; i++)
        harness_event(h, "timeout");
    cr_assert_eq(h->st.status, SAGA_COMPENSATING);
    cr_assert_str_eq(h->st.error, "step reserve_inventory timed out after 4 attempts");
    for (int i = 0; i < 7; i++)
        harness_event(h, "timeout");
    cr_assert_eq(h->st.status, SAGA_FAILED);
    cr_assert_str_eq(h->st.error, "compensation of step reserve_inventory timed out after 4 "
                                  "attempts; cause: step reserve_inventory timed out after 4 "
                                  "attempts");
    cr_assert_eq(harness_event(h, "abort"), SAGA_REJECTED);
    cr_assert(strstr(h->fx.error, "failed") != NULL, "%s", h->fx.error);
    /* Failing again after RETRY does not stack the messages. */
    harness_event(h, "retry");
    harness_event(h, "fail");
    harness_event(h, "timeout");
    harness_event(h, "fail");
    harness_event(h, "timeout");
    harness_event(h, "fail");
    harness_event(h, "timeout");
    harness_event(h, "fail");
    cr_assert_eq(h->st.status, SAGA_FAILED);
    cr_assert_str_eq(h->st.error, "compensation of step reserve_inventory failed after 4 "
                                  "attempts; cause: step reserve_inventory timed out after 4 "
                                  "attempts");
    cr_assert_eq(harness_event(h, "retry"), SAGA_APPLIED);
    cr_assert_eq(h->st.attempt, 9);
    cr_assert_eq(h->st.budget_base, 8);
    harness_fini(h);

    harness_init(h, def, order_input, NULL, TRACE_ID);
    harness_event(h, "start");
    harness_event(h, "ok");
    harness_event(h, "ok");
    harness_event(h, "ok");
    cr_assert_eq(harness_event(h, "abort"), SAGA_REJECTED);
    cr_assert(strstr(h->fx.error, "pivot") != NULL, "%s", h->fx.error);
    cr_assert_eq(harness_event(h, "retry"), SAGA_REJECTED);
    cr_assert(strstr(h->fx.error, "running") != NULL, "%s", h->fx.error);
    harness_fini(h);
    free(h);
    def_free(def);
}

/* The state's fields, for comparing before/after a failed apply. */
static char *state_describe(const struct saga_state *st)
{
    char *in = st->input ? cJSON_PrintUnformatted(st->input) : NULL;
    char *rep = st->replies ? cJSON_PrintUnformatted(st->replies) : NULL;
    char *out = NULL;
    cr_assert(asprintf(&out, "%s %d %d %d %d %d %d %s %" PRId64 " %d %s %s %s %s %s", st->id,
                       st->status, st->step, st->phase, st->attempt, st->budget_base, st->wait,
                       st->waiting_message_id, st->deadline_ms, st->pivot_sent, in ? in : "-",
                       rep ? rep : "-", st->correlation_id ? st->correlation_id : "-",
                       st->trace_id ? st->trace_id : "-", st->error ? st->error : "-") > 0);
    free(in);
    free(rep);
    return out;
}

Test(engine, malformed_template_fails_and_leaves_the_state_alone)
{
    struct step_spec specs[] = {
        {.name = "one", .topic = "t", .type = "One", .ctype = "UndoOne"},
        {.name = "two", .topic = "t", .type = "Two", .payload = "{\"x\": \"{{input.x\"}"},
    };
    struct saga_definition *def = def_build("broken", specs, 2);
    struct harness *h = malloc(sizeof(*h));
    harness_init(h, def, "{\"x\": 1}", NULL, TRACE_ID);
    harness_event(h, "start");

    char *before = state_describe(&h->st);
    cJSON *reply = cJSON_Parse("{\"r\": 1}");
    struct saga_event ev = {.kind = SAGA_EV_REPLY,
                            .now_ms = h->now,
                            .in_reply_to = h->st.waiting_message_id,
                            .success = true,
                            .reply = reply};
    struct saga_effects fx;
    memset(&fx, 0x5a, sizeof(fx));
    cr_assert_eq(saga_engine_apply(def, &h->st, &ev, &h->env, &fx), -1);
    cr_assert_eq(fx.message_count, 0);
    cr_assert_eq(fx.history_count, 0);
    cr_assert_null(fx.messages);
    char *after = state_describe(&h->st);
    cr_assert_str_eq(after, before);
    free(after);
    saga_effects_clear(&fx);

    /* An abort still works: compensating "one" needs no broken template. */
    cr_assert_eq(harness_event(h, "abort"), SAGA_APPLIED);
    cr_assert_str_eq(h->fx.messages[0].type, "UndoOne");
    free(before);
    cJSON_Delete(reply);
    harness_fini(h);
    free(h);
    def_free(def);
}

/* ---- allocation failures ----
 *
 * Fails the n-th allocation of any kind made by this thread while armed: the engine's own
 * malloc/calloc/realloc, strdup and vasprintf (glibc allocates through these) and cJSON's
 * default hooks (malloc and free). Thread-local so that Criterion's threads are never
 * counted. The replacements forward to glibc's allocator (__libc_malloc and the rest, which
 * glibc exports); free stays glibc's own. Not inlined: the callers in this file would then
 * be warned about a NULL they never get while unarmed (-Wnull-dereference). Under
 * AddressSanitizer malloc is not replaced (free would be ASan's), and valgrind replaces the
 * replacements with its own: there only cJSON's allocations are failed, through its hooks. */
static _Thread_local long alloc_countdown = -1;

static bool alloc_should_fail(void)
{
    return alloc_countdown >= 0 && alloc_countdown-- == 0;
}

#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#define TEST_ASAN 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__) && !defined(TEST_ASAN)
#define TEST_ASAN 1
#endif

static void *failing_cjson_malloc(size_t size)
{
    return alloc_should_fail() ? NULL : malloc(size);
}

#ifndef TEST_ASAN
extern void *__libc_malloc(size_t size);
extern void *__libc_calloc(size_t n, size_t size);
extern void *__libc_realloc(void *p, size_t size);

__attribute__((noinline)) void *malloc(size_t size)
{
    if (alloc_should_fail()) {
        errno = ENOMEM;
        return NULL;
    }
    return __libc_malloc(size);
}

__attribute__((noinline)) void *calloc(size_t n, size_t size)
{
    if (alloc_should_fail()) {
        errno = ENOMEM;
        return NULL;
    }
    return __libc_calloc(n, size);
}

__attribute__((noinline)) void *realloc(void *p, size_t size)
{
    if (alloc_should_fail()) {
        errno = ENOMEM;
        return NULL;
    }
    return __libc_realloc(p, size);
}
#endif

/* Whether the malloc this process calls is the one above (not under ASan or valgrind). */
static bool malloc_replaced(void)
{
#ifdef TEST_ASAN
    return false;
#else
    void *(*volatile alloc)(size_t) = malloc;
    alloc_countdown = 0;
    void *p = alloc(16);
    bool replaced = !p && alloc_countdown < 0;
    alloc_countdown = -1;
    free(p);
    return replaced;
#endif
}

/* The effects, every field, for comparing a run against the reference run. */
static char *effects_describe(const struct saga_effects *fx)
{
    char *out = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&out, &len);
    cr_assert_not_null(f);
    fprintf(f, "outcome %d error [%s]\n", fx->outcome, fx->error);
    for (size_t i = 0; i < fx->message_count; i++) {
        const struct saga_message *m = &fx->messages[i];
        fprintf(f, "message %s %s %s %s %s %d %d %d\n", m->message_id, m->topic, m->key, m->type,
                m->payload, m->step, m->phase, m->attempt);
        for (size_t k = 0; k < m->header_count; k++)
            fprintf(f, "  %s: %s\n", m->headers[k].name, m->headers[k].value);
    }
    for (size_t i = 0; i < fx->history_count; i++) {
        const struct saga_history_entry *e = &fx->history[i];
        char *reply = e->reply ? cJSON_PrintUnformatted(e->reply) : NULL;
        fprintf(f, "history %d %d %d %d %s %s\n", e->status, e->step, e->phase, e->attempt,
                e->message_id, reply ? reply : "-");
        free(reply);
    }
    cr_assert_eq(fclose(f), 0);
    return out;
}

/* A saga driven through path[0..upto) and the event path[upto] (start, ok, fail or timeout),
 * with stored_replies replies r0, r1, ... in its state from the beginning. */
struct fault_case {
    const struct saga_definition *def;
    const char *const *path;
    size_t path_len;
    int stored_replies;
};

static void fault_prepare(struct harness *h, const struct fault_case *c, size_t upto,
                          struct saga_event *ev, cJSON **reply)
{
    harness_init(h, (struct saga_definition *)c->def, order_input, "corr", TRACE_ID);
    if (c->stored_replies > 0) {
        h->st.replies = cJSON_CreateObject();
        cr_assert_not_null(h->st.replies);
        for (int i = 0; i < c->stored_replies; i++) {
            char name[16];
            snprintf(name, sizeof(name), "r%d", i);
            cJSON *r = cJSON_AddObjectToObject(h->st.replies, name);
            cr_assert_not_null(r);
            cr_assert_not_null(cJSON_AddNumberToObject(r, "k", i));
        }
    }
    for (size_t i = 0; i < upto; i++)
        cr_assert_eq(harness_event(h, c->path[i]), SAGA_APPLIED, "%s", c->path[i]);
    const char *word = c->path[upto];
    *reply = cJSON_Parse("{\"reservationId\": \"r\", \"authorizationId\": \"a\", \"v\": [1]}");
    cr_assert_not_null(*reply);
    *ev = (struct saga_event){.now_ms = h->now, .reply = *reply};
    if (!strcmp(word, "start")) {
        ev->kind = SAGA_EV_START;
    } else if (!strcmp(word, "timeout")) {
        ev->kind = SAGA_EV_TIMEOUT;
        ev->now_ms = h->st.deadline_ms;
    } else {
        cr_assert(!strcmp(word, "ok") || !strcmp(word, "fail"), "unknown event %s", word);
        ev->kind = SAGA_EV_REPLY;
        ev->in_reply_to = h->st.waiting_message_id;
        ev->success = word[0] == 'o';
    }
}

/* For every event of the path and every n, fails the n-th allocation of the apply: it either
 * fails and leaves the state and the effects alone, or gives the reference result (glibc may
 * recover from a failed allocation inside vasprintf). Returns the failed applies. */
static int fault_run(const struct fault_case *c)
{
    int failures = 0;
    for (size_t upto = 0; upto < c->path_len; upto++) {
        struct harness *h = malloc(sizeof(*h));
        cr_assert_not_null(h);
        struct saga_event ev;
        cJSON *reply = NULL;
        struct saga_effects fx;

        /* The reference: the same event with no failure. */
        fault_prepare(h, c, upto, &ev, &reply);
        cr_assert_eq(saga_engine_apply(c->def, &h->st, &ev, &h->env, &fx), 0);
        cr_assert_eq(fx.outcome, SAGA_APPLIED, "%s", c->path[upto]);
        char *want_state = state_describe(&h->st);
        char *want_fx = effects_describe(&fx);
        saga_effects_clear(&fx);
        cJSON_Delete(reply);
        harness_fini(h);

        for (long n = 0;; n++) {
            fault_prepare(h, c, upto, &ev, &reply);
            char *before = state_describe(&h->st);
            memset(&fx, 0x5a, sizeof(fx));
            alloc_countdown = n;
            int rc = saga_engine_apply(c->def, &h->st, &ev, &h->env, &fx);
            bool exhausted = alloc_countdown >= 0; /* the n-th allocation never came */
            alloc_countdown = -1;
            char *after = state_describe(&h->st);
            if (rc < 0) {
                failures++;
                cr_assert(!exhausted, "event %zu (%s) failed with no failed allocation", upto,
                          c->path[upto]);
                cr_assert_str_eq(after, before, "event %zu (%s), allocation %ld", upto,
                                 c->path[upto], n);
                cr_assert_eq(fx.message_count, 0);
                cr_assert_null(fx.messages);
                cr_assert_eq(fx.history_count, 0);
                cr_assert_null(fx.history);
            } else {
                cr_assert_eq(rc, 0);
                char *got_fx = effects_describe(&fx);
                cr_assert_str_eq(after, want_state, "event %zu (%s), allocation %ld", upto,
                                 c->path[upto], n);
                cr_assert_str_eq(got_fx, want_fx, "event %zu (%s), allocation %ld", upto,
                                 c->path[upto], n);
                free(got_fx);
            }
            saga_effects_clear(&fx);
            free(before);
            free(after);
            cJSON_Delete(reply);
            harness_fini(h);
            if (exhausted)
                break;
        }
        free(want_state);
        free(want_fx);
        free(h);
    }
    return failures;
}

Test(engine, allocation_failures_leave_the_state_alone)
{
    bool every = malloc_replaced(); /* else only cJSON's allocations fail */
    cJSON_Hooks hooks = {failing_cjson_malloc, free};
    if (!every)
        cJSON_InitHooks(&hooks);
    struct saga_definition *def = def_build("order_fulfillment", order_steps, ORDER_STEPS);
    /* A path through every kind of transition, from no stored reply on. */
    const char *const path[] = {"start", "ok",   "timeout", "timeout", "ok",
                                "fail",  "fail", "timeout", "ok",      "ok"};
    struct fault_case order = {def, path, sizeof(path) / sizeof(path[0]), 0};
    int failures = fault_run(&order);
    cr_assert_gt(failures, every ? 100 : 20, "%d", failures);

    /* More replies than the template context keeps on the stack (8): its nodes are
     * allocated. Templates that use them, in commands and compensations. */
    struct step_spec specs[] = {
        {.name = "s0",
         .topic = "t",
         .type = "S0",
         .ctype = "U0",
         .cpayload = "{\"last\": \"{{steps.r11.reply}}\", \"s0\": \"{{steps.s0.reply.v}}\"}"},
        {.name = "s1",
         .topic = "t",
         .type = "S1",
         .key = "\"{{steps.r11.reply.k}}-{{steps.s0.reply}}\"",
         .payload = "{\"first\": \"{{steps.r0.reply}}\", \"last\": \"{{steps.r11.reply}}\", "
                    "\"s0\": \"{{steps.s0.reply.v}}\", \"id\": \"{{saga.id}}\"}"},
        {.name = "s2", .topic = "t", .type = "S2", .payload = "{\"s1\": \"{{steps.s1.reply}}\"}"},
    };
    struct saga_definition *many = def_build("many", specs, 3);
    const char *const through[] = {"start", "ok", "ok", "ok"};
    const char *const back[] = {"start", "ok", "fail", "ok"};
    struct fault_case c1 = {many, through, 4, 12}, c2 = {many, back, 4, 12};
    int more = fault_run(&c1);
    more += fault_run(&c2);
    cr_assert_gt(more, every ? 50 : 10, "%d", more);
    if (!every)
        cJSON_InitHooks(NULL);
    def_free(many);
    def_free(def);
}

/* cJSON's hooks handing out marked blocks: a block freed through them that they did not give
 * (a key made with strdup), or one of theirs freed with free(), is seen. */
#define HOOK_MARK 0x5a6a7a8a9aaabacaULL
static long hook_foreign_frees;

static void *marked_malloc(size_t size)
{
    unsigned long long *p = malloc(size + 16);
    if (!p)
        return NULL;
    p[0] = HOOK_MARK;
    return (char *)p + 16;
}

static void marked_free(void *ptr)
{
    if (!ptr)
        return;
    unsigned long long *p = (void *)((char *)ptr - 16);
    if (p[0] != HOOK_MARK) {
        hook_foreign_frees++; /* not ours: leaked rather than freed at the wrong address */
        return;
    }
    p[0] = 0;
    free(p);
}

/* The key a stored reply gets (and the one its data had) is cJSON's: made and freed through
 * its hooks, as cJSON_Delete frees it. */
Test(engine, stored_replies_keys_use_cjsons_allocator)
{
    cJSON_Hooks hooks = {marked_malloc, marked_free};
    cJSON_InitHooks(&hooks);
    struct saga_definition *def = def_build("order_fulfillment", order_steps, ORDER_STEPS);
    unsigned long counter = 0;
    struct saga_engine_env env = {counter_uuid, &counter};
    struct saga_state st;
    saga_state_init(&st, SAGA_ID, json_or_null(order_input), NULL, NULL);
    struct saga_effects fx;
    struct saga_event ev = {.kind = SAGA_EV_START, .now_ms = 1};
    cr_assert_eq(saga_engine_apply(def, &st, &ev, &env, &fx), 0);
    saga_effects_clear(&fx);
    /* Reply data that is an object's member: its duplicate comes with the key "data". */
    cJSON *wrapper = json_or_null("{\"data\": {\"reservationId\": \"r-1\"}}");
    char irt[SAGA_UUID_LEN + 1];
    snprintf(irt, sizeof(irt), "%s", st.waiting_message_id);
    ev = (struct saga_event){.kind = SAGA_EV_REPLY,
                             .now_ms = 2,
                             .in_reply_to = irt,
                             .success = true,
                             .reply = cJSON_GetObjectItem(wrapper, "data")};
    cr_assert_eq(saga_engine_apply(def, &st, &ev, &env, &fx), 0);
    cr_assert_eq(fx.outcome, SAGA_APPLIED);
    cr_assert_not_null(st.replies);
    cr_assert_not_null(st.replies->child);
    cr_assert_str_eq(st.replies->child->string, "reserve_inventory");
    cr_assert_null(st.replies->child->next);
    cr_assert_str_eq(cJSON_GetStringValue(cJSON_GetObjectItem(st.replies->child, "reservationId")),
                     "r-1");
    saga_effects_clear(&fx);
    cJSON_Delete(wrapper);
    saga_state_clear(&st);
    def_free(def);
    cJSON_InitHooks(NULL);
    cr_assert_eq(hook_foreign_frees, 0);
}

Test(engine, backoff_is_capped_without_overflow)
{
    struct step_spec specs[] = {
        {.name = "pivot",
         .pivot = true,
         .topic = "t",
         .type = "P",
         .timeout_ms = 1,
         .max_attempts = 1,
         .backoff_ms = INT64_MAX / 4,
         .max_backoff_ms = INT64_MAX / 2},
    };
    struct saga_definition *def = def_build("big", specs, 1);
    struct saga_state st;
    struct saga_effects fx = {0};
    unsigned long counter = 0;
    struct saga_engine_env env = {counter_uuid, &counter};
    saga_state_init(&st, SAGA_ID, cJSON_CreateObject(), NULL, NULL);
    struct saga_event ev = {.kind = SAGA_EV_START, .now_ms = 0};
    cr_assert_eq(saga_engine_apply(def, &st, &ev, &env, &fx), 0);
    saga_effects_clear(&fx);
    /* Deadlines are never 0 while waiting, even at now = 0. */
    cr_assert_eq(st.deadline_ms, 1);
    int64_t prev = 0;
    for (int i = 0; i < 200; i++) {
        ev.kind = SAGA_EV_TIMEOUT;
        ev.now_ms = 1000;
        cr_assert_eq(saga_engine_apply(def, &st, &ev, &env, &fx), 0);
        saga_effects_clear(&fx);
        if (st.wait == SAGA_WAIT_BACKOFF) {
            int64_t delay = st.deadline_ms - 1000;
            cr_assert_geq(delay, prev, "attempt %d", st.attempt);
            cr_assert_leq(delay, INT64_MAX / 2);
            cr_assert_gt(delay, 0);
            prev = delay;
            st.deadline_ms = 1000; /* bring it due */
        } else {
            st.deadline_ms = 1000;
        }
    }
    cr_assert_eq(prev, INT64_MAX / 2);
    cr_assert_gt(st.attempt, 90);
    saga_state_clear(&st);
    def_free(def);
}

static void zero_uuid(char out[SAGA_UUID_LEN + 1], void *arg)
{
    snprintf(out, SAGA_UUID_LEN + 1, "%s", (const char *)arg);
}

Test(engine, traceparent_never_uses_an_all_zero_span)
{
    struct step_spec specs[] = {{.name = "s", .topic = "t", .type = "S"}};
    struct saga_definition *def = def_build("z", specs, 1);
    struct saga_state st;
    struct saga_effects fx = {0};
    struct saga_engine_env env = {zero_uuid, "0190a1b2-c3d4-7e5f-0000-000000000000"};
    /* A bad trace id given by the caller is replaced by one derived from the saga id. The
     * message id's last 16 digits are all zero: its first 16 make the span. */
    saga_state_init(&st, "00000000-0000-4000-8000-000000000007", NULL, NULL, "XYZ");
    struct saga_event ev = {.kind = SAGA_EV_START, .now_ms = 5};
    cr_assert_eq(saga_engine_apply(def, &st, &ev, &env, &fx), 0);
    cr_assert_str_eq(header_get(&fx.messages[0], "traceparent"),
                     "00-00000000000040008000000000000007-0190a1b2c3d47e5f-01");
    cr_assert_str_eq(fx.messages[0].payload, "{}");
    saga_effects_clear(&fx);
    saga_state_clear(&st);

    /* Otherwise the last 16 (a version 7 id's random bits), whatever the first are. */
    env.arg = "00000000-0000-0000-8000-00000000abcd";
    saga_state_init(&st, "00000000-0000-4000-8000-000000000007", NULL, NULL, NULL);
    cr_assert_eq(saga_engine_apply(def, &st, &ev, &env, &fx), 0);
    cr_assert_str_eq(header_get(&fx.messages[0], "traceparent"),
                     "00-00000000000040008000000000000007-800000000000abcd-01");
    saga_effects_clear(&fx);
    saga_state_clear(&st);

    /* The nil uuid as saga id and message id still gives valid, non-zero ids. */
    env.arg = "00000000-0000-0000-0000-000000000000";
    saga_state_init(&st, "00000000-0000-0000-0000-000000000000", NULL, NULL, NULL);
    cr_assert_eq(saga_engine_apply(def, &st, &ev, &env, &fx), 0);
    cr_assert_str_eq(header_get(&fx.messages[0], "traceparent"),
                     "00-00000000000000000000000000000001-0000000000000001-01");
    saga_effects_clear(&fx);
    saga_state_clear(&st);
    def_free(def);
}

Test(engine, names_round_trip)
{
    enum saga_status all[] = {SAGA_PENDING,   SAGA_RUNNING,     SAGA_COMPENSATING,
                              SAGA_COMPLETED, SAGA_COMPENSATED, SAGA_FAILED};
    const char *names[] = {"pending",   "running",     "compensating",
                           "completed", "compensated", "failed"};
    for (size_t i = 0; i < 6; i++) {
        enum saga_status s;
        cr_assert_str_eq(saga_status_name(all[i]), names[i]);
        cr_assert_eq(saga_status_parse(names[i], &s), 0);
        cr_assert_eq(s, all[i]);
        cr_assert_eq(saga_status_is_terminal(all[i]),
                     all[i] == SAGA_COMPLETED || all[i] == SAGA_COMPENSATED);
    }
    enum saga_status s;
    cr_assert_eq(saga_status_parse("done", &s), -1);
    cr_assert_eq(saga_status_parse(NULL, &s), -1);
    cr_assert_str_eq(saga_phase_name(SAGA_PHASE_ACTION), "action");
    cr_assert_str_eq(saga_phase_name(SAGA_PHASE_COMPENSATION), "compensation");
    cr_assert_str_eq(saga_history_status_name(SAGA_HIST_SENT), "sent");
    cr_assert_str_eq(saga_history_status_name(SAGA_HIST_SUCCEEDED), "succeeded");
    cr_assert_str_eq(saga_history_status_name(SAGA_HIST_FAILED), "failed");
    cr_assert_str_eq(saga_history_status_name(SAGA_HIST_TIMED_OUT), "timed_out");
}

static int cmp_id(const void *a, const void *b)
{
    return strcmp(a, b);
}

/* Across several refills of the random pool (256 ids each): every id a lowercase v4 uuid,
 * no two alike. */
Test(engine, uuid_random_is_a_lowercase_v4_uuid)
{
    enum { N = 1000 };
    static char ids[N][SAGA_UUID_LEN + 1];
    for (int n = 0; n < N; n++) {
        char *a = ids[n];
        saga_uuid_random(a, NULL);
        cr_assert_eq(strlen(a), SAGA_UUID_LEN);
        for (int i = 0; i < SAGA_UUID_LEN; i++) {
            if (i == 8 || i == 13 || i == 18 || i == 23)
                cr_assert_eq(a[i], '-');
            else
                cr_assert(isxdigit((unsigned char)a[i]) && !isupper((unsigned char)a[i]), "%s", a);
        }
        cr_assert_eq(a[14], '4', "%s", a);
        cr_assert(strchr("89ab", a[19]) != NULL, "%s", a);
    }
    qsort(ids, N, sizeof(ids[0]), cmp_id);
    for (int n = 1; n < N; n++)
        cr_assert_str_neq(ids[n - 1], ids[n]);
}

/* ---- randomized: many sagas, random definitions, random events, invariants after each ---- */

static uint64_t rng_state;

static uint64_t rng_next(void)
{
    /* xorshift64*: small, fast and the same everywhere, so a seed replays a run. */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 2685821657736338717ULL;
}

static int rng_below(int n)
{
    return (int)(rng_next() % (uint64_t)n);
}

#define MAX_RSTEPS 6

struct random_def {
    struct step_spec specs[MAX_RSTEPS];
    char names[MAX_RSTEPS][16];
    char payloads[MAX_RSTEPS][256];
    char cpayloads[MAX_RSTEPS][256];
};

static struct saga_definition *random_definition(struct random_def *rd)
{
    int n = 1 + rng_below(MAX_RSTEPS);
    int pivot = rng_below(3) == 0 ? -1 : rng_below(n);
    memset(rd, 0, sizeof(*rd));
    for (int i = 0; i < n; i++) {
        struct step_spec *sp = &rd->specs[i];
        snprintf(rd->names[i], sizeof(rd->names[i]), "s%d", i);
        /* The action carries the previous step's reply; the compensation its own one. */
        snprintf(rd->payloads[i], sizeof(rd->payloads[i]),
                 "{\"k\": \"{{input.k}}\", \"prev\": \"{{steps.s%d.reply.v}}\", \"i\": %d}", i - 1,
                 i);
        snprintf(rd->cpayloads[i], sizeof(rd->cpayloads[i]),
                 "{\"own\": \"{{steps.s%d.reply.v}}\", \"txt\": \"undo {{steps.s%d.reply.v}}\"}", i,
                 i);
        sp->name = rd->names[i];
        sp->pivot = i == pivot;
        sp->topic = "cmd";
        sp->type = "Do";
        sp->key = rng_below(2) ? "\"{{input.k}}\"" : NULL;
        sp->payload = rd->payloads[i];
        bool compensatable = pivot < 0 || i < pivot;
        if (compensatable && rng_below(4) != 0) {
            sp->ctopic = "undo";
            sp->ctype = "Undo";
            sp->ckey = rng_below(3) == 0 ? "\"undo-{{saga.id}}\"" : NULL;
            sp->cpayload = rd->cpayloads[i];
        }
        sp->timeout_ms = 1 + rng_below(100);
        sp->max_attempts = 1 + rng_below(3);
        sp->backoff_ms = 1 + rng_below(50);
        sp->max_backoff_ms = 1 + rng_below(200);
    }
    return def_build("random", rd->specs, (size_t)n);
}

/* What happened to one saga so far, as seen from its effects. */
struct model {
    int action_attempts[MAX_RSTEPS]; /* last attempt sent */
    int comp_attempts[MAX_RSTEPS];
    int action_ok[MAX_RSTEPS];
    int comp_ok[MAX_RSTEPS];
    int reply_v[MAX_RSTEPS]; /* the "v" of the succeeded action's reply */
    bool pivot_failed;       /* the pivot's action got a failure reply */
    int highest_action;      /* -1: none sent */
    int last_comp;           /* lowest compensation step sent so far; INT_MAX: none */
    bool comp_started;
};

static void check_random_effects(const struct harness *h, struct model *md,
                                 enum saga_status before_status)
{
    const struct saga_definition *def = h->def;
    const struct saga_state *st = &h->st;
    int pivot = def->pivot_index;

    for (size_t i = 0; i < h->fx.history_count; i++) {
        const struct saga_history_entry *e = &h->fx.history[i];
        if (e->status == SAGA_HIST_FAILED && e->phase == SAGA_PHASE_ACTION && e->step == pivot)
            md->pivot_failed = true;
        if (e->status != SAGA_HIST_SUCCEEDED)
            continue;
        if (e->phase == SAGA_PHASE_ACTION) {
            cr_assert_eq(md->action_ok[e->step]++, 0, "action of step %d succeeded twice", e->step);
            cJSON *v = cJSON_GetObjectItemCaseSensitive(e->reply, "v");
            md->reply_v[e->step] = v ? v->valueint : -1;
        } else {
            cr_assert_eq(md->comp_ok[e->step]++, 0, "compensation of %d succeeded twice", e->step);
        }
    }
    for (size_t i = 0; i < h->fx.message_count; i++) {
        const struct saga_message *m = &h->fx.messages[i];
        const struct saga_step_def *s = &def->steps[m->step];
        int max = s->retry.max_attempts;
        cJSON *p = payload_of(m);
        if (m->phase == SAGA_PHASE_ACTION) {
            cr_assert(!md->comp_started, "an action after compensation began");
            cr_assert(m->step == md->highest_action || m->step == md->highest_action + 1);
            for (int k = 0; k < m->step; k++)
                cr_assert_eq(md->action_ok[k], 1, "step %d sent before %d succeeded", m->step, k);
            cr_assert_eq(m->attempt, md->action_attempts[m->step] + 1);
            md->action_attempts[m->step] = m->attempt;
            if (m->step > md->highest_action)
                md->highest_action = m->step;
            if (pivot < 0 || m->step < pivot)
                cr_assert_leq(m->attempt, max, "step %d attempt %d over budget %d", m->step,
                              m->attempt, max);
            if (m->step == pivot)
                cr_assert_eq(st->pivot_sent, 1);
            /* The previous step's reply reached this payload. */
            cJSON *prev = cJSON_GetObjectItemCaseSensitive(p, "prev");
            if (m->step > 0 && md->reply_v[m->step - 1] >= 0)
                cr_assert(cJSON_IsNumber(prev) && prev->valueint == md->reply_v[m->step - 1]);
            else
                cr_assert(cJSON_IsNull(prev), "a reply without v renders null");
        } else {
            md->comp_started = true;
            cr_assert(s->has_compensation);
            cr_assert(pivot < 0 || m->step < pivot, "step %d at/after the pivot compensated",
                      m->step);
            cr_assert_gt(md->action_attempts[m->step], 0, "compensation of an unsent step");
            cr_assert_leq(m->step, md->highest_action);
            cr_assert_leq(m->step, md->last_comp, "compensations out of order");
            cr_assert_eq(md->comp_ok[m->step], 0);
            md->last_comp = m->step;
            cr_assert_eq(m->attempt, md->comp_attempts[m->step] + 1);
            md->comp_attempts[m->step] = m->attempt;
            cr_assert_leq(m->attempt - st->budget_base, max, "compensation over budget");
            /* Its own reply, if the action succeeded; null if it timed out. */
            cJSON *own = cJSON_GetObjectItemCaseSensitive(p, "own");
            if (md->action_ok[m->step] && md->reply_v[m->step] >= 0)
                cr_assert(cJSON_IsNumber(own) && own->valueint == md->reply_v[m->step]);
            else
                cr_assert(cJSON_IsNull(own));
            const char *want_key = s->compensation.key ? NULL : (s->command.key ? "k1" : st->id);
            if (want_key)
                cr_assert_str_eq(m->key, want_key);
        }
        cJSON_Delete(p);
    }
    cr_assert_eq(st->pivot_sent, pivot >= 0 && md->action_attempts[pivot] > 0);
    if (st->status == SAGA_COMPLETED && before_status != SAGA_COMPLETED) {
        for (size_t k = 0; k < def->step_count; k++)
            cr_assert_eq(md->action_ok[k], 1);
        cr_assert(!md->comp_started);
    }
    if (st->status == SAGA_COMPENSATED && before_status != SAGA_COMPENSATED) {
        for (size_t k = 0; k < def->step_count; k++)
            if (def->steps[k].has_compensation && md->action_ok[k])
                cr_assert_eq(md->comp_ok[k], 1, "step %zu succeeded and was not compensated", k);
        /* Past the pivot only its failure reply leads back. */
        if (pivot >= 0 && md->action_attempts[pivot] > 0)
            cr_assert(md->pivot_failed, "compensated after the pivot was sent");
    }
}

Test(engine, randomized, .timeout = 120)
{
    const char *env_seed = getenv("SAGA_ENGINE_SEED");
    uint64_t seed =
        env_seed ? strtoull(env_seed, NULL, 0) : (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 32);
    if (seed == 0)
        seed = 1; /* xorshift's one bad state */
    fprintf(stderr, "engine randomized test: SAGA_ENGINE_SEED=%" PRIu64 "\n", seed);
    cr_log_info("SAGA_ENGINE_SEED=%" PRIu64, seed);
    rng_state = seed;

    long events = 0, sagas = 0, applied = 0;
    long by_status[6] = {0};
    struct harness *h = malloc(sizeof(*h));
    struct random_def *rd = malloc(sizeof(*rd));
    cr_assert(h && rd);

    while (events < 120000) {
        struct saga_definition *def = random_definition(rd);
        harness_init(h, def, "{\"k\": \"k1\"}", rng_below(2) ? "corr" : NULL,
                     rng_below(2) ? TRACE_ID : NULL);
        struct model md = {.highest_action = -1, .last_comp = 1 << 30};
        int budget = 10 + rng_below(120);
        int after_terminal = 0;
        sagas++;

        for (int n = 0; n < budget && after_terminal < 4; n++, events++) {
            struct saga_event ev = {.now_ms = h->now};
            cJSON *reply = NULL;
            char in_reply_to[SAGA_UUID_LEN + 1] = "";
            int r = rng_below(100);
            enum saga_status before_status = h->st.status;
            if (before_status == SAGA_PENDING && rng_below(2))
                r = 99; /* most sagas start soon, some get other events first */

            if (r < 40) {
                /* A reply to the awaited message (or to whatever was sent last). */
                ev.kind = SAGA_EV_REPLY;
                ev.success = rng_below(100) < 80;
                if (h->st.waiting_message_id[0])
                    snprintf(in_reply_to, sizeof(in_reply_to), "%s", h->st.waiting_message_id);
                else if (h->sent_count)
                    snprintf(in_reply_to, sizeof(in_reply_to), "%s", h->sent[h->sent_count - 1]);
                ev.in_reply_to = in_reply_to;
                if (rng_below(10)) {
                    reply = cJSON_CreateObject();
                    cJSON_AddNumberToObject(reply, "v", rng_below(1000));
                }
                ev.reply = reply;
            } else if (r < 47) {
                ev.kind = SAGA_EV_REPLY;
                ev.success = rng_below(2);
                ev.in_reply_to = h->sent_count ? h->sent[rng_below(h->sent_count)]
                                               : "ffffffff-ffff-4fff-bfff-ffffffffffff";
                if (rng_below(3) == 0)
                    ev.in_reply_to = "ffffffff-ffff-4fff-bfff-ffffffffffff";
                if (h->st.wait == SAGA_WAIT_REPLY &&
                    !strcmp(ev.in_reply_to, h->st.waiting_message_id))
                    ev.in_reply_to = "eeeeeeee-ffff-4fff-bfff-ffffffffffff";
            } else if (r < 82) {
                ev.kind = SAGA_EV_TIMEOUT;
                if (h->st.deadline_ms > h->now)
                    h->now = h->st.deadline_ms + rng_below(3);
                else
                    h->now += rng_below(5);
                ev.now_ms = h->now;
            } else if (r < 89) {
                ev.kind = SAGA_EV_TIMEOUT;
                if (h->st.deadline_ms > h->now)
                    ev.now_ms = h->now + rng_below((int)(h->st.deadline_ms - h->now));
            } else if (r < 92) {
                ev.kind = SAGA_EV_ABORT;
                ev.reason = rng_below(2) ? "random abort" : NULL;
            } else if (r < 97) {
                ev.kind = SAGA_EV_RETRY;
            } else {
                ev.kind = SAGA_EV_START;
            }

            bool early = ev.kind == SAGA_EV_TIMEOUT && h->st.deadline_ms > ev.now_ms;
            bool stale =
                ev.kind == SAGA_EV_REPLY && (h->st.wait != SAGA_WAIT_REPLY ||
                                             strcmp(ev.in_reply_to, h->st.waiting_message_id) != 0);
            enum saga_outcome out = harness_apply(h, &ev);
            if (out == SAGA_APPLIED)
                applied++;
            if (early || stale)
                cr_assert_eq(out, SAGA_IGNORED, "early timeout or stale reply not ignored");
            if (saga_status_is_terminal(before_status))
                cr_assert_neq(out, SAGA_APPLIED);
            if (ev.kind == SAGA_EV_RETRY)
                cr_assert_eq(out == SAGA_APPLIED, before_status == SAGA_FAILED);
            if (ev.kind == SAGA_EV_ABORT && out == SAGA_APPLIED)
                cr_assert(before_status == SAGA_PENDING ||
                          (before_status == SAGA_RUNNING && h->st.status != SAGA_RUNNING));
            check_random_effects(h, &md, before_status);
            cJSON_Delete(reply);
            if (saga_status_is_terminal(h->st.status))
                after_terminal++;
        }
        by_status[h->st.status]++;
        harness_fini(h);
        def_free(def);
    }
    fprintf(stderr,
            "engine randomized test: %ld events (%ld applied) over %ld sagas; final status: "
            "pending %ld, running %ld, compensating %ld, completed %ld, compensated %ld, "
            "failed %ld\n",
            events, applied, sagas, by_status[0], by_status[1], by_status[2], by_status[3],
            by_status[4], by_status[5]);
    cr_assert_geq(events, 100000);
    /* The run is only worth something if it reached every outcome. */
    cr_assert_gt(by_status[SAGA_COMPLETED], 0);
    cr_assert_gt(by_status[SAGA_COMPENSATED], 0);
    cr_assert_gt(by_status[SAGA_FAILED], 0);
    free(rd);
    free(h);
}

/* A succeeded action's reply goes into the state's replies when the event is applied: in place
 * of a reply already there under the step's name (the others, and their order, kept), after
 * them otherwise; the next command's template sees it; an event that fails or is ignored
 * leaves the replies as they were. */
Test(engine, a_reply_replaces_its_steps_entry_in_place)
{
    struct step_spec specs[] = {
        {.name = "a", .topic = "t", .type = "A", .ctype = "UndoA"},
        {.name = "b",
         .topic = "t",
         .type = "B",
         .key = "\"{{steps.a.reply.k}}\"",
         .payload = "{\"all\": \"{{steps}}\", \"a\": \"{{steps.a.reply}}\"}",
         .ctype = "UndoB"},
    };
    struct saga_definition *def = def_build("r", specs, 2);
    unsigned long counter = 0;
    struct saga_engine_env env = {counter_uuid, &counter};
    struct saga_state st;
    saga_state_init(&st, SAGA_ID, cJSON_CreateObject(), NULL, NULL);
    struct saga_effects fx = {0};
    struct saga_event ev = {.kind = SAGA_EV_START, .now_ms = 1};
    cr_assert_eq(saga_engine_apply(def, &st, &ev, &env, &fx), 0);
    saga_effects_clear(&fx);
    /* As if read back from the database with entries already there (x, then a, then y). */
    st.replies = cJSON_Parse("{\"x\": 1, \"a\": {\"old\": true}, \"y\": [2]}");
    cJSON *reply = cJSON_Parse("{\"k\": \"new-key\", \"n\": 5}");
    /* A reply to another message: ignored, replies untouched. */
    ev = (struct saga_event){.kind = SAGA_EV_REPLY,
                             .now_ms = 2,
                             .in_reply_to = "00000000-0000-4000-8000-999999999999",
                             .success = true,
                             .reply = reply};
    cr_assert_eq(saga_engine_apply(def, &st, &ev, &env, &fx), 0);
    cr_assert_eq(fx.outcome, SAGA_IGNORED);
    saga_effects_clear(&fx);
    char *text = cJSON_PrintUnformatted(st.replies);
    cr_assert_str_eq(text, "{\"x\":1,\"a\":{\"old\":true},\"y\":[2]}");
    free(text);

    char irt[SAGA_UUID_LEN + 1];
    snprintf(irt, sizeof(irt), "%s", st.waiting_message_id);
    ev.in_reply_to = irt;
    cr_assert_eq(saga_engine_apply(def, &st, &ev, &env, &fx), 0);
    cr_assert_eq(fx.outcome, SAGA_APPLIED);
    text = cJSON_PrintUnformatted(st.replies);
    cr_assert_str_eq(text, "{\"x\":1,\"a\":{\"k\":\"new-key\",\"n\":5},\"y\":[2]}");
    free(text);
    cr_assert_eq(fx.message_count, 1);
    cr_assert_str_eq(fx.messages[0].key, "new-key");
    cr_assert_str_eq(fx.messages[0].payload,
                     "{\"all\":{\"x\":{\"reply\":1},\"a\":{\"reply\":{\"k\":\"new-key\",\"n\":5}},"
                     "\"y\":{\"reply\":[2]}},\"a\":{\"k\":\"new-key\",\"n\":5}}");
    saga_effects_clear(&fx);

    /* The last step's reply, into a state without replies: a new object holding it alone. */
    cJSON_Delete(st.replies);
    st.replies = NULL;
    snprintf(irt, sizeof(irt), "%s", st.waiting_message_id);
    cr_assert_eq(saga_engine_apply(def, &st, &ev, &env, &fx), 0);
    cr_assert_eq(st.status, SAGA_COMPLETED);
    text = cJSON_PrintUnformatted(st.replies);
    cr_assert_str_eq(text, "{\"b\":{\"k\":\"new-key\",\"n\":5}}");
    free(text);
    saga_effects_clear(&fx);
    cJSON_Delete(reply);
    saga_state_clear(&st);
    def_free(def);
}

/* The template context holds every reply however many there are (beyond the ones it keeps
 * on the stack, 8). */
Test(engine, the_context_holds_many_replies)
{
    struct step_spec specs[] = {
        {.name = "s0", .topic = "t", .type = "S0", .ctype = "U0"},
        {.name = "s1",
         .topic = "t",
         .type = "S1",
         .key = "\"{{steps.r11.reply.k}}-{{steps.s0.reply}}\"",
         .payload = "{\"first\": \"{{steps.r0.reply}}\", \"last\": \"{{steps.r11.reply}}\", "
                    "\"s0\": \"{{steps.s0.reply.v}}\", \"id\": \"{{saga.id}}\"}"},
    };
    struct saga_definition *def = def_build("many", specs, 2);
    unsigned long counter = 0;
    struct saga_engine_env env = {counter_uuid, &counter};
    struct saga_state st;
    saga_state_init(&st, SAGA_ID, cJSON_CreateObject(), NULL, NULL);
    struct saga_effects fx = {0};
    struct saga_event ev = {.kind = SAGA_EV_START, .now_ms = 1};
    cr_assert_eq(saga_engine_apply(def, &st, &ev, &env, &fx), 0);
    saga_effects_clear(&fx);
    st.replies = cJSON_CreateObject();
    for (int i = 0; i < 12; i++) {
        char name[8];
        snprintf(name, sizeof(name), "r%d", i);
        cJSON *r = cJSON_AddObjectToObject(st.replies, name);
        cJSON_AddNumberToObject(r, "k", i);
    }
    cJSON *reply = cJSON_Parse("{\"v\": \"x\"}");
    char irt[SAGA_UUID_LEN + 1];
    snprintf(irt, sizeof(irt), "%s", st.waiting_message_id);
    ev = (struct saga_event){
        .kind = SAGA_EV_REPLY, .now_ms = 2, .in_reply_to = irt, .success = true, .reply = reply};
    cr_assert_eq(saga_engine_apply(def, &st, &ev, &env, &fx), 0);
    cr_assert_eq(fx.message_count, 1);
    cr_assert_str_eq(fx.messages[0].key, "11-{\"v\":\"x\"}");
    char want[256];
    snprintf(want, sizeof(want),
             "{\"first\":{\"k\":0},\"last\":{\"k\":11},\"s0\":\"x\",\"id\":\"%s\"}", SAGA_ID);
    cr_assert_str_eq(fx.messages[0].payload, want);
    saga_effects_clear(&fx);
    cJSON_Delete(reply);
    saga_state_clear(&st);
    def_free(def);
}
