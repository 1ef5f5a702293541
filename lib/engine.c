#include "engine.h"

#include <ctype.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "template.h"

/* The engine is deterministic on purpose: the same definition, state and events (and the same
 * uuid source) always give the same effects, so the state machine can be tested exhaustively
 * and replayed. That is why backoff has no jitter here: a fleet of sagas retrying the same
 * participant is already spread by their different start times, and an orchestrator that
 * wants jitter can add it to the deadline it schedules. */

/* Work in progress for one event. st starts as a shallow copy of the caller's state; the
 * owned field that changes (error) is replaced by a new allocation, never modified in place,
 * so that on failure the caller's state is untouched and on success the old one is freed.
 * input, correlation_id and trace_id never change. The replies are not copied: a succeeded
 * action's reply waits in new_reply (its key set) and goes into the state's replies object
 * at the end, when nothing can fail any more (copying the whole object at every reply was a
 * visible share of the orchestrator's CPU); context_build shows it in the meantime. */
struct work {
    const struct saga_definition *def;
    const struct saga_engine_env *env;
    const struct saga_state *orig;
    struct saga_state st;
    struct saga_effects *fx;
    int64_t now;
    cJSON *new_reply;   /* owned until the end: stored under new_reply->string */
    cJSON *new_replies; /* owned until the end: the replies object of a state without one */
};

/* ---- names ---- */

static const char *const status_names[] = {
    [SAGA_PENDING] = "pending",           [SAGA_RUNNING] = "running",
    [SAGA_COMPENSATING] = "compensating", [SAGA_COMPLETED] = "completed",
    [SAGA_COMPENSATED] = "compensated",   [SAGA_FAILED] = "failed",
};

const char *saga_status_name(enum saga_status status)
{
    if ((unsigned)status < sizeof(status_names) / sizeof(status_names[0]))
        return status_names[status];
    return "unknown";
}

int saga_status_parse(const char *name, enum saga_status *out)
{
    for (size_t i = 0; name && i < sizeof(status_names) / sizeof(status_names[0]); i++) {
        if (strcmp(name, status_names[i]) == 0) {
            *out = (enum saga_status)i;
            return 0;
        }
    }
    return -1;
}

const char *saga_phase_name(enum saga_phase phase)
{
    return phase == SAGA_PHASE_COMPENSATION ? "compensation" : "action";
}

const char *saga_history_status_name(enum saga_history_status status)
{
    switch (status) {
    case SAGA_HIST_SENT:
        return "sent";
    case SAGA_HIST_SUCCEEDED:
        return "succeeded";
    case SAGA_HIST_FAILED:
        return "failed";
    case SAGA_HIST_TIMED_OUT:
        return "timed_out";
    }
    return "unknown";
}

bool saga_status_is_terminal(enum saga_status status)
{
    return status == SAGA_COMPLETED || status == SAGA_COMPENSATED;
}

/* saga_uuid_random is in uuid.c (its random bytes come from the same pool as version 7 ids). */

/* ---- state ---- */

/* Copies s into out[size] (cut to fit), as snprintf(out, size, "%s", s) does, without the
 * format parsing (a visible share of the engine's CPU: several ids per event). */
static void copy_str(char *out, size_t size, const char *s)
{
    size_t n = strnlen(s, size - 1);
    memcpy(out, s, n);
    out[n] = '\0';
}

static char *xstrdup_or_abort(const char *s)
{
    char *copy = strdup(s);
    if (!copy) {
        fputs("saga_state_init: out of memory\n", stderr);
        abort();
    }
    return copy;
}

/* The hex digits of s (dashes skipped), lowercased, up to n of them; returns how many. */
static size_t hex_digits(const char *s, char *out, size_t n)
{
    size_t k = 0;
    for (; s && *s && k < n; s++) {
        if (isxdigit((unsigned char)*s))
            out[k++] = (char)tolower((unsigned char)*s);
    }
    out[k] = '\0';
    return k;
}

static bool all_zero(const char *hex)
{
    for (; *hex; hex++)
        if (*hex != '0')
            return false;
    return true;
}

static bool valid_trace_id(const char *t)
{
    if (!t || strlen(t) != 32 || all_zero(t))
        return false;
    for (; *t; t++)
        if (!isdigit((unsigned char)*t) && !(*t >= 'a' && *t <= 'f'))
            return false;
    return true;
}

/* A W3C trace-id from the saga id: its 32 hex digits. The all-zero id is invalid in W3C, so
 * an id without enough usable digits gets a fixed non-zero one. */
static void trace_id_from_saga_id(const char *id, char out[33])
{
    if (hex_digits(id, out, 32) != 32 || all_zero(out))
        memcpy(out, "00000000000000000000000000000001", 33);
}

void saga_state_init(struct saga_state *state, const char *id, cJSON *input,
                     const char *correlation_id, const char *trace_id)
{
    memset(state, 0, sizeof(*state));
    copy_str(state->id, sizeof(state->id), id);
    state->status = SAGA_PENDING;
    state->phase = SAGA_PHASE_ACTION;
    state->wait = SAGA_WAIT_NONE;
    state->input = input;
    state->replies = NULL; /* created with the first reply */
    state->correlation_id = correlation_id ? xstrdup_or_abort(correlation_id) : NULL;
    /* A trace id that is not 32 hex digits would make every traceparent invalid: start a new
     * trace instead (uppercase digits are accepted and lowercased). */
    char hex[33];
    if (!trace_id || strlen(trace_id) != 32 || hex_digits(trace_id, hex, 32) != 32 || all_zero(hex))
        trace_id_from_saga_id(id, hex);
    state->trace_id = xstrdup_or_abort(hex);
}

void saga_state_clear(struct saga_state *state)
{
    if (!state)
        return;
    cJSON_Delete(state->input);
    cJSON_Delete(state->replies);
    free(state->correlation_id);
    free(state->trace_id);
    free(state->error);
    memset(state, 0, sizeof(*state));
}

/* ---- effects ---- */

/* topic, type and every header's name and value live in the headers' allocation
 * (message_build): one free for them all. */
static void message_clear(struct saga_message *m)
{
    free(m->key);
    free(m->payload);
    free(m->headers);
    memset(m, 0, sizeof(*m));
}

void saga_effects_clear(struct saga_effects *fx)
{
    if (!fx)
        return;
    for (size_t i = 0; i < fx->message_count; i++)
        message_clear(&fx->messages[i]);
    free(fx->messages);
    for (size_t i = 0; i < fx->history_count; i++)
        cJSON_Delete(fx->history[i].reply);
    free(fx->history);
    memset(fx, 0, sizeof(*fx));
}

/* Appends a history row; takes ownership of reply (freed on failure too). */
static int history_add(struct work *w, enum saga_history_status status, const char *message_id,
                       cJSON *reply)
{
    struct saga_effects *fx = w->fx;
    struct saga_history_entry *h = realloc(fx->history, (fx->history_count + 1) * sizeof(*h));
    if (!h) {
        cJSON_Delete(reply);
        return -1;
    }
    fx->history = h;
    h = &fx->history[fx->history_count++];
    memset(h, 0, sizeof(*h));
    h->status = status;
    h->step = w->st.step;
    h->phase = w->st.phase;
    h->attempt = w->st.attempt;
    copy_str(h->message_id, sizeof(h->message_id), message_id);
    h->reply = reply;
    return 0;
}

/* ---- small helpers on the work copy ---- */

static const struct saga_step_def *cur_step(const struct work *w)
{
    return &w->def->steps[w->st.step];
}

/* True when the step is before the pivot (or there is none): its failures compensate. */
static bool is_compensatable(const struct saga_definition *def, int step)
{
    return def->pivot_index < 0 || step < def->pivot_index;
}

static int max_attempts(const struct saga_step_def *s)
{
    return s->retry.max_attempts < 1 ? 1 : s->retry.max_attempts;
}

static bool budget_left(const struct work *w)
{
    return w->st.attempt - w->st.budget_base < max_attempts(cur_step(w));
}

static int64_t add_sat(int64_t a, int64_t b)
{
    if (b > 0 && a > INT64_MAX - b)
        return INT64_MAX;
    return a + b;
}

/* A deadline is never 0 while the saga waits: 0 means "none". */
static int64_t deadline_after(int64_t now, int64_t delay)
{
    int64_t d = add_sat(now, delay < 0 ? 0 : delay);
    return d <= 0 ? 1 : d;
}

/* The wait before resending after the n-th send failed: backoff * 2^(n-1), capped. */
static int64_t backoff_delay(const struct saga_retry_policy *r, int n)
{
    int64_t base = r->backoff_ms < 0 ? 0 : r->backoff_ms;
    int64_t cap = r->max_backoff_ms < 0 ? 0 : r->max_backoff_ms;
    int64_t d = base;
    for (int i = 1; i < n && d < cap; i++)
        d = d > cap / 2 ? cap : d * 2;
    return d < cap ? d : cap;
}

/* Replaces the error text of the work copy (the old one belongs to whoever owns it). */
static int set_error(struct work *w, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static int set_error(struct work *w, const char *fmt, ...)
{
    char *msg = NULL;
    va_list ap;
    va_start(ap, fmt);
    int n = vasprintf(&msg, fmt, ap);
    va_end(ap);
    if (n < 0)
        return -1;
    if (w->st.error != w->orig->error)
        free(w->st.error);
    w->st.error = msg;
    return 0;
}

static void wait_none(struct work *w)
{
    w->st.wait = SAGA_WAIT_NONE;
    w->st.deadline_ms = 0;
    w->st.waiting_message_id[0] = '\0';
}

/* Waits before resending. The exponent counts the sends since the budget was last reset, so
 * a RETRY of a failed compensation starts again from the first backoff. */
static void wait_backoff(struct work *w)
{
    int n = w->st.attempt - w->st.budget_base;
    w->st.wait = SAGA_WAIT_BACKOFF;
    w->st.deadline_ms = deadline_after(w->now, backoff_delay(&cur_step(w)->retry, n < 1 ? 1 : n));
    w->st.waiting_message_id[0] = '\0';
}

/* ---- messages ---- */

/* The template context lives only while one message is rendered, and everything it refers to
 * (the state, the definition, the pending reply) outlives it: so it is made of cJSON nodes on
 * the caller's stack that point into those (a node for an object or array shares its
 * children), linked by hand and never given to cJSON_Delete. (Built with cJSON's constructors
 * it cost a dozen allocations and frees a command.) The templates only read it. */
#define CONTEXT_LOCAL_STEPS 8
struct context {
    cJSON root, input, steps, saga, id, name, corr;
    cJSON *nodes; /* 2 a reply: the step's object and its "reply" */
    cJSON local[2 * CONTEXT_LOCAL_STEPS];
};

/* Appends item (not in any list) to parent's children, as cJSON links them: the first
 * child's prev is the last one. */
static void context_link(cJSON *parent, cJSON *item, const char *key)
{
    item->string = (char *)key;
    item->next = NULL;
    if (!parent->child) {
        parent->child = item;
        item->prev = item;
    } else {
        cJSON *last = parent->child->prev;
        last->next = item;
        item->prev = last;
        parent->child->prev = item;
    }
}

/* A node that reads as v (its children shared: a reference), under key. */
static void context_borrow(cJSON *parent, cJSON *node, const cJSON *v, const char *key)
{
    *node = *v;
    node->type |= cJSON_IsReference;
    context_link(parent, node, key);
}

static void context_string(cJSON *parent, cJSON *node, const char *value, const char *key)
{
    memset(node, 0, sizeof(*node));
    node->type = cJSON_String | cJSON_IsReference;
    node->valuestring = (char *)value;
    context_link(parent, node, key);
}

/* The template context: input, the replies of the succeeded steps (new_reply in place of the
 * first of the same name, or after them all) and the saga itself. Returns 0, or -1 when out
 * of memory (context_clear in both cases). */
static int context_build(const struct work *w, struct context *c)
{
    memset(c, 0, offsetof(struct context, local));
    c->root.type = c->steps.type = c->saga.type = cJSON_Object;
    if (w->st.input) {
        context_borrow(&c->root, &c->input, w->st.input, "input");
    } else {
        c->input.type = cJSON_Object;
        context_link(&c->root, &c->input, "input");
    }
    context_link(&c->root, &c->steps, "steps");
    size_t n = w->new_reply ? 1 : 0;
    for (const cJSON *r = w->st.replies ? w->st.replies->child : NULL; r; r = r->next)
        n++;
    c->nodes = n <= CONTEXT_LOCAL_STEPS ? c->local : calloc(2 * n, sizeof(*c->nodes));
    if (!c->nodes)
        return -1;
    size_t k = 0;
    bool placed = !w->new_reply;
    for (const cJSON *r = w->st.replies ? w->st.replies->child : NULL; r; r = r->next) {
        const cJSON *value = r;
        if (!placed && r->string && !strcmp(r->string, w->new_reply->string)) {
            value = w->new_reply;
            placed = true;
        }
        cJSON *entry = &c->nodes[k++], *reply = &c->nodes[k++];
        memset(entry, 0, sizeof(*entry));
        entry->type = cJSON_Object;
        context_link(&c->steps, entry, value->string);
        context_borrow(entry, reply, value, "reply");
    }
    if (!placed) {
        cJSON *entry = &c->nodes[k++], *reply = &c->nodes[k++];
        memset(entry, 0, sizeof(*entry));
        entry->type = cJSON_Object;
        context_link(&c->steps, entry, w->new_reply->string);
        context_borrow(entry, reply, w->new_reply, "reply");
    }
    context_link(&c->root, &c->saga, "saga");
    context_string(&c->saga, &c->id, w->st.id, "id");
    context_string(&c->saga, &c->name, w->def->name ? w->def->name : "", "name");
    context_string(&c->saga, &c->corr, w->st.correlation_id ? w->st.correlation_id : w->st.id,
                   "correlation_id");
    return 0;
}

static void context_clear(struct context *c)
{
    if (c->nodes != c->local)
        free(c->nodes);
    c->nodes = NULL;
}

#define HEADER_COUNT 10

/* Where message_build writes the strings of its block. */
struct block_writer {
    char *at;
};

static char *block_put(struct block_writer *bw, const char *s, size_t n)
{
    char *out = bw->at;
    memcpy(out, s, n);
    out[n] = '\0';
    bw->at += n + 1;
    return out;
}

/* traceparent "00-<trace-id>-<span-id>-01". The span id is the last 16 hex digits of the
 * message id, so a message always carries the same span (replays and tests see the same
 * value). With version 7 ids those are the variant and 62 random bits; the first 16 are the
 * time and a counter, which two orchestrators share within a millisecond (tracing tools expect
 * random span ids). W3C forbids the all-zero span: then the first 16 digits (or 1) are used. */
static void traceparent_build(const struct saga_state *st, const char *message_id, char out[56])
{
    char trace[33], hex[33], span[17];
    if (valid_trace_id(st->trace_id))
        memcpy(trace, st->trace_id, 33);
    else
        trace_id_from_saga_id(st->id, trace);
    size_t n = hex_digits(message_id, hex, 32);
    if (n == 32 && !all_zero(hex + 16)) {
        memcpy(span, hex + 16, 17);
    } else {
        memcpy(span, hex, 16);
        span[16] = '\0';
        if (n < 16 || all_zero(span))
            memcpy(span, "0000000000000001", 17);
    }
    memcpy(out, "00-", 3);
    memcpy(out + 3, trace, 32);
    out[35] = '-';
    memcpy(out + 36, span, 16);
    memcpy(out + 52, "-01", 4);
}

/* Builds the message for (st.step, st.phase, st.attempt) into m (zeroed on failure). */
static int message_build(struct work *w, struct saga_message *m, const char *message_id)
{
    const struct saga_step_def *s = cur_step(w);
    bool comp = w->st.phase == SAGA_PHASE_COMPENSATION;
    const struct saga_message_def *md = comp ? &s->compensation : &s->command;
    /* A compensation goes to the same partition as its command unless it says otherwise. */
    const cJSON *key_tmpl = md->key ? md->key : (comp ? s->command.key : NULL);
    char err[256] = "";
    char traceparent[56];
    struct context context;
    const cJSON *ctx = NULL;
    int rc = -1;

    context.nodes = NULL;

    memset(m, 0, sizeof(*m));
    copy_str(m->message_id, sizeof(m->message_id), message_id);
    m->step = w->st.step;
    m->phase = w->st.phase;
    m->attempt = w->st.attempt;

    /* The headers, topic and type in one allocation: the header names are constants, the
     * values (some the same strings as topic and type) are known now. One malloc instead of
     * 22 strdups a command. */
    const char *topic = md->topic ? md->topic : "";
    const char *type = md->type ? md->type : "";
    const char *saga_name = w->def->name ? w->def->name : "";
    const char *phase = saga_phase_name(w->st.phase);
    const char *reply_to = w->def->reply_topic ? w->def->reply_topic : "";
    const char *corr = w->st.correlation_id ? w->st.correlation_id : w->st.id;
    static const char *const names[HEADER_COUNT] = {
        "message-id", "event-type",      "saga-id",  "saga-name",      "saga-step",
        "saga-phase", "idempotency-key", "reply-to", "correlation-id", "traceparent"};
    size_t l_topic = strlen(topic), l_type = strlen(type), l_mid = strlen(message_id),
           l_id = strlen(w->st.id), l_name = strlen(saga_name), l_step = strlen(s->name),
           l_phase = strlen(phase), l_reply = strlen(reply_to), l_corr = strlen(corr);
    /* idempotency-key: "<saga id>/<step>/<phase>", as the former snprintf into a buffer of
     * SAGA_UUID_LEN + 256 wrote it (cut to fit). */
    char idem[SAGA_UUID_LEN + 256];
    size_t l_idem = 0;
    {
        const char *parts[5] = {w->st.id, "/", s->name, "/", phase};
        size_t lens[5] = {l_id, 1, l_step, 1, l_phase};
        for (int i = 0; i < 5; i++) {
            size_t n = lens[i] < sizeof(idem) - 1 - l_idem ? lens[i] : sizeof(idem) - 1 - l_idem;
            memcpy(idem + l_idem, parts[i], n);
            l_idem += n;
        }
        idem[l_idem] = '\0';
    }
    traceparent_build(&w->st, message_id, traceparent);
    size_t l_tp = strlen(traceparent);
    size_t strings = l_topic + l_type + l_mid + l_id + l_name + l_step + l_phase + l_idem +
                     l_reply + l_corr + l_tp + 11;
    char *block = malloc(HEADER_COUNT * sizeof(*m->headers) + strings);
    if (!block)
        goto cleanup;
    m->headers = (struct saga_header *)(void *)block;
    struct block_writer bw = {block + HEADER_COUNT * sizeof(*m->headers)};
    m->topic = block_put(&bw, topic, l_topic);
    m->type = block_put(&bw, type, l_type);
    char *values[HEADER_COUNT] = {
        block_put(&bw, message_id, l_mid), m->type,
        block_put(&bw, w->st.id, l_id),    block_put(&bw, saga_name, l_name),
        block_put(&bw, s->name, l_step),   block_put(&bw, phase, l_phase),
        block_put(&bw, idem, l_idem),      block_put(&bw, reply_to, l_reply),
        block_put(&bw, corr, l_corr),      block_put(&bw, traceparent, l_tp)};
    for (size_t i = 0; i < HEADER_COUNT; i++) {
        m->headers[i].name = names[i];
        m->headers[i].value = values[i];
    }
    m->header_count = HEADER_COUNT;

    if (context_build(w, &context) < 0)
        goto cleanup;
    ctx = &context.root;
    if (key_tmpl) {
        if (template_render_text(key_tmpl, ctx, &m->key, err, sizeof(err)) < 0)
            goto cleanup;
    } else if (!(m->key = strdup(w->st.id))) {
        goto cleanup;
    }
    if (md->payload) {
        /* Rendered straight to text: the same bytes as printing the rendered value. */
        if (template_render_json(md->payload, ctx, &m->payload, err, sizeof(err)) < 0)
            goto cleanup;
    } else {
        m->payload = strdup("{}");
    }
    if (!m->payload)
        goto cleanup;
    rc = 0;
cleanup:
    context_clear(&context);
    if (rc < 0)
        message_clear(m);
    return rc;
}

/* Sends the next attempt of (st.step, st.phase): one message, one SENT row, wait for its
 * reply until the step's timeout. */
static int send_attempt(struct work *w)
{
    struct saga_effects *fx = w->fx;
    char id[SAGA_UUID_LEN + 1] = "";

    w->st.attempt++;
    if (w->st.phase == SAGA_PHASE_ACTION && w->st.step == w->def->pivot_index)
        w->st.pivot_sent = 1;
    w->env->new_uuid(id, w->env->arg);

    struct saga_message *msgs = realloc(fx->messages, (fx->message_count + 1) * sizeof(*msgs));
    if (!msgs)
        return -1;
    fx->messages = msgs;
    if (message_build(w, &fx->messages[fx->message_count], id) < 0)
        return -1;
    fx->message_count++;
    if (history_add(w, SAGA_HIST_SENT, id, NULL) < 0)
        return -1;

    w->st.wait = SAGA_WAIT_REPLY;
    copy_str(w->st.waiting_message_id, sizeof(w->st.waiting_message_id), id);
    w->st.deadline_ms = deadline_after(w->now, cur_step(w)->timeout_ms);
    return 0;
}

/* ---- transitions ---- */

/* Compensates downward from the first step at or below from that has a compensation; with
 * none left the saga is compensated. Steps at or after the pivot are never compensated. */
static int compensate_from(struct work *w, int from)
{
    int limit = w->def->pivot_index >= 0 ? w->def->pivot_index - 1 : (int)w->def->step_count - 1;
    int i = from < limit ? from : limit;
    while (i >= 0 && !w->def->steps[i].has_compensation)
        i--;

    w->st.phase = SAGA_PHASE_COMPENSATION;
    w->st.attempt = 0;
    w->st.budget_base = 0;
    if (i < 0) {
        /* Nothing (left) to undo. step keeps the last cursor: informational only. */
        w->st.status = SAGA_COMPENSATED;
        wait_none(w);
        return 0;
    }
    w->st.status = SAGA_COMPENSATING;
    w->st.step = i;
    return send_attempt(w);
}

/* The current compensation gave up: the saga waits for an operator. The error names the
 * compensation and keeps the reason the saga was compensating. */
static int fail_saga(struct work *w, const char *what)
{
    const char *cause = w->st.error ? w->st.error : "";
    const char *prev = strstr(cause, "; cause: ");
    if (prev)
        cause = prev + strlen("; cause: ");
    if (set_error(w, "compensation of step %s %s after %d attempts; cause: %s", cur_step(w)->name,
                  what, w->st.attempt - w->st.budget_base, cause) < 0)
        return -1;
    w->st.status = SAGA_FAILED;
    wait_none(w);
    return 0;
}

static int on_start(struct work *w)
{
    if (w->st.status != SAGA_PENDING)
        return SAGA_IGNORED;
    w->st.status = SAGA_RUNNING;
    w->st.step = 0;
    w->st.phase = SAGA_PHASE_ACTION;
    w->st.attempt = 0;
    w->st.budget_base = 0;
    return send_attempt(w) < 0 ? -1 : SAGA_APPLIED;
}

/* Stores a copy of a succeeded action's reply data under the step's name: made ready here
 * (everything allocated), put into the replies by replies_commit. */
static int replies_store(struct work *w, const cJSON *reply)
{
    cJSON *data = reply ? cJSON_Duplicate(reply, 1) : cJSON_CreateNull();
    if (!data)
        return -1;
    /* The key belongs to the item: allocated and freed through cJSON's hooks (cJSON_Delete
     * frees it with them), so not with libc's strdup and free. */
    if (!(data->type & cJSON_StringIsConst))
        cJSON_free(data->string); /* the key the duplicated item had, if any */
    data->type &= ~cJSON_StringIsConst;
    const char *name = cur_step(w)->name;
    size_t len = strlen(name) + 1;
    if ((data->string = cJSON_malloc(len)))
        memcpy(data->string, name, len);
    if (!data->string ||
        (!w->st.replies && !w->new_replies && !(w->new_replies = cJSON_CreateObject()))) {
        cJSON_Delete(data);
        return -1;
    }
    cJSON_Delete(w->new_reply);
    w->new_reply = data;
    return 0;
}

/* Puts new_reply into the state's replies, in place of the first of the same name or last,
 * as cJSON_ReplaceItemInObjectCaseSensitive / cJSON_AddItemToObject would. Cannot fail:
 * nothing is allocated. */
static void replies_commit(struct work *w)
{
    if (!w->new_reply)
        return;
    cJSON *replies = w->st.replies ? w->st.replies : w->new_replies;
    if (replies == w->new_replies)
        w->new_replies = NULL;
    cJSON *same = replies->child;
    while (same && !(same->string && !strcmp(same->string, w->new_reply->string)))
        same = same->next;
    if (same)
        cJSON_ReplaceItemViaPointer(replies, same, w->new_reply);
    else
        cJSON_AddItemToArray(replies, w->new_reply);
    w->new_reply = NULL;
    w->st.replies = replies;
}

static int on_reply(struct work *w, const struct saga_event *ev)
{
    if ((w->st.status != SAGA_RUNNING && w->st.status != SAGA_COMPENSATING) ||
        w->st.wait != SAGA_WAIT_REPLY || !ev->in_reply_to ||
        strcmp(ev->in_reply_to, w->st.waiting_message_id) != 0)
        return SAGA_IGNORED;

    cJSON *copy = NULL;
    if (ev->reply && !(copy = cJSON_Duplicate(ev->reply, 1)))
        return -1;
    if (history_add(w, ev->success ? SAGA_HIST_SUCCEEDED : SAGA_HIST_FAILED,
                    w->st.waiting_message_id, copy) < 0)
        return -1;

    const struct saga_step_def *s = cur_step(w);
    int rc;
    if (w->st.phase == SAGA_PHASE_ACTION) {
        if (ev->success) {
            if (replies_store(w, ev->reply) < 0)
                return -1;
            if ((size_t)w->st.step + 1 < w->def->step_count) {
                w->st.step++;
                w->st.attempt = 0;
                w->st.budget_base = 0;
                rc = send_attempt(w);
            } else {
                w->st.status = SAGA_COMPLETED;
                wait_none(w);
                rc = 0;
            }
        } else if (w->def->pivot_index >= 0 && w->st.step > w->def->pivot_index) {
            /* After the pivot the saga must go forward: a failure is retried. */
            wait_backoff(w);
            rc = 0;
        } else {
            /* A business failure: this step did not apply, undo the ones before it. */
            rc = set_error(w, "step %s failed", s->name);
            if (rc == 0)
                rc = compensate_from(w, w->st.step - 1);
        }
    } else if (ev->success) {
        rc = compensate_from(w, w->st.step - 1);
    } else if (budget_left(w)) {
        wait_backoff(w);
        rc = 0;
    } else {
        rc = fail_saga(w, "failed");
    }
    return rc < 0 ? -1 : SAGA_APPLIED;
}

static int on_timeout(struct work *w)
{
    if ((w->st.status != SAGA_RUNNING && w->st.status != SAGA_COMPENSATING) ||
        w->st.wait == SAGA_WAIT_NONE || w->st.deadline_ms == 0 || w->now < w->st.deadline_ms)
        return SAGA_IGNORED;

    int rc;
    if (w->st.wait == SAGA_WAIT_BACKOFF) {
        rc = send_attempt(w);
        return rc < 0 ? -1 : SAGA_APPLIED;
    }
    if (history_add(w, SAGA_HIST_TIMED_OUT, w->st.waiting_message_id, NULL) < 0)
        return -1;
    if (w->st.phase == SAGA_PHASE_COMPENSATION) {
        if (budget_left(w)) {
            wait_backoff(w);
            rc = 0;
        } else {
            rc = fail_saga(w, "timed out");
        }
    } else if (!is_compensatable(w->def, w->st.step) || budget_left(w)) {
        /* The pivot and the steps after it may have applied and cannot be undone: they are
         * retried without limit. */
        wait_backoff(w);
        rc = 0;
    } else {
        /* Out of attempts: the step may have applied, so it is compensated too. */
        rc = set_error(w, "step %s timed out after %d attempts", cur_step(w)->name, w->st.attempt);
        if (rc == 0)
            rc = compensate_from(w, w->st.step);
    }
    return rc < 0 ? -1 : SAGA_APPLIED;
}

static int reject(struct work *w, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static int reject(struct work *w, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(w->fx->error, sizeof(w->fx->error), fmt, ap);
    va_end(ap);
    return SAGA_REJECTED;
}

static int on_abort(struct work *w, const struct saga_event *ev)
{
    const char *reason = ev->reason && ev->reason[0] ? ev->reason : "no reason given";
    switch (w->st.status) {
    case SAGA_PENDING:
        /* Nothing was sent: nothing to undo. */
        if (set_error(w, "aborted: %s", reason) < 0)
            return -1;
        w->st.status = SAGA_COMPENSATED;
        w->st.phase = SAGA_PHASE_COMPENSATION;
        wait_none(w);
        return SAGA_APPLIED;
    case SAGA_RUNNING:
        if (w->st.pivot_sent)
            return reject(w, "saga %s has passed its pivot (step %s) and cannot be aborted",
                          w->st.id, w->def->steps[w->def->pivot_index].name);
        if (set_error(w, "aborted: %s", reason) < 0)
            return -1;
        /* The outstanding attempt may apply: compensate it too. Its reply, if it comes, no
         * longer matches and is ignored. */
        return compensate_from(w, w->st.attempt > 0 ? w->st.step : w->st.step - 1) < 0
                   ? -1
                   : SAGA_APPLIED;
    case SAGA_COMPENSATING:
        return reject(w, "saga %s is already compensating", w->st.id);
    case SAGA_FAILED:
        return reject(w, "saga %s has failed while compensating; retry it instead", w->st.id);
    case SAGA_COMPLETED:
    case SAGA_COMPENSATED:
        return reject(w, "saga %s is already %s", w->st.id, saga_status_name(w->st.status));
    }
    return reject(w, "saga %s has an unknown status", w->st.id);
}

/* RETRY is an operator request, so on anything but a failed saga (a pending one included) it
 * is REJECTED with a reason rather than silently IGNORED. */
static int on_retry(struct work *w)
{
    if (w->st.status != SAGA_FAILED)
        return reject(w, "saga %s is %s, only a failed saga can be retried", w->st.id,
                      saga_status_name(w->st.status));
    /* A fresh budget for the same compensation, sent now. */
    w->st.status = SAGA_COMPENSATING;
    w->st.budget_base = w->st.attempt;
    return send_attempt(w) < 0 ? -1 : SAGA_APPLIED;
}

int saga_engine_apply(const struct saga_definition *def, struct saga_state *state,
                      const struct saga_event *ev, const struct saga_engine_env *env,
                      struct saga_effects *fx)
{
    struct work w = {
        .def = def, .env = env, .orig = state, .st = *state, .fx = fx, .now = ev->now_ms};
    int rc;

    memset(fx, 0, sizeof(*fx));
    /* A state that does not fit its definition (a corrupted row, a definition edited under
     * the same version) would index out of bounds: refuse it rather than crash the daemon. */
    if (def->step_count == 0 || state->step < 0 || (size_t)state->step >= def->step_count)
        return -1;

    switch (ev->kind) {
    case SAGA_EV_START:
        rc = on_start(&w);
        break;
    case SAGA_EV_REPLY:
        rc = on_reply(&w, ev);
        break;
    case SAGA_EV_TIMEOUT:
        rc = on_timeout(&w);
        break;
    case SAGA_EV_ABORT:
        rc = on_abort(&w, ev);
        break;
    case SAGA_EV_RETRY:
        rc = on_retry(&w);
        break;
    default:
        rc = SAGA_IGNORED;
        break;
    }

    if (rc < 0) {
        cJSON_Delete(w.new_reply);
        cJSON_Delete(w.new_replies);
        if (w.st.error != state->error)
            free(w.st.error);
        saga_effects_clear(fx);
        return -1;
    }
    fx->outcome = (enum saga_outcome)rc;
    if (fx->outcome != SAGA_APPLIED) {
        cJSON_Delete(w.new_reply); /* none: w.st was not touched */
        cJSON_Delete(w.new_replies);
        return 0;
    }
    replies_commit(&w);
    cJSON_Delete(w.new_replies); /* not needed after all */
    if (w.st.error != state->error)
        free(state->error);
    *state = w.st;
    return 0;
}
