/* store: saga.instances rows <-> engine state, and the saga.apply_batch document. */
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <libpq-fe.h>

#include "orchestrator.h"
#include "template.h"

const char *const store_instance_columns =
    "id, saga_name, saga_version, status, step_index, phase, attempt, budget_base, wait, "
    "waiting_message_id, (extract(epoch FROM deadline) * 1000)::bigint, pivot_sent, "
    "input::text, replies::text, correlation_id, trace_id, error, pending_request, "
    "request_reason";

static const char *const wait_names[] = {"none", "reply", "backoff"};

/* snprintf(out, size, "%s", s) without the format parsing (every row read copies three). */
static void copy_str(char *out, size_t size, const char *s)
{
    size_t n = strnlen(s, size - 1);
    memcpy(out, s, n);
    out[n] = '\0';
}

int store_read_row(const struct registry *reg, void *result, int i, struct saga_row *out, char *err,
                   size_t errlen)
{
    PGresult *res = result;
    memset(out, 0, sizeof(*out));
    const char *id = PQgetvalue(res, i, 0);
    copy_str(out->name, sizeof(out->name), PQgetvalue(res, i, 1));
    out->version = atoi(PQgetvalue(res, i, 2));
    out->def = registry_find(reg, out->name, out->version);
    if (!out->def) {
        snprintf(err, errlen, "saga %s: definition %s version %d is not loaded", id, out->name,
                 out->version);
        return -2; /* registered by another orchestrator since we loaded: reload */
    }
    /* With the length libpq knows (the same parse as cJSON_Parse, without its strlen). */
    cJSON *input = cJSON_ParseWithLength(PQgetvalue(res, i, 12), (size_t)PQgetlength(res, i, 12));
    if (!input) {
        snprintf(err, errlen, "saga %s: input is not JSON", id);
        return -1;
    }
    saga_state_init(&out->state, id, input, PQgetisnull(res, i, 14) ? NULL : PQgetvalue(res, i, 14),
                    PQgetvalue(res, i, 15));
    struct saga_state *st = &out->state;
    if (saga_status_parse(PQgetvalue(res, i, 3), &st->status)) {
        snprintf(err, errlen, "saga %s: unknown status %s", id, PQgetvalue(res, i, 3));
        saga_state_clear(st);
        return -1;
    }
    st->step = atoi(PQgetvalue(res, i, 4));
    st->phase =
        strcmp(PQgetvalue(res, i, 5), "compensation") ? SAGA_PHASE_ACTION : SAGA_PHASE_COMPENSATION;
    st->attempt = atoi(PQgetvalue(res, i, 6));
    st->budget_base = atoi(PQgetvalue(res, i, 7));
    st->wait = SAGA_WAIT_NONE;
    for (int k = 0; k < 3; k++)
        if (!strcmp(PQgetvalue(res, i, 8), wait_names[k]))
            st->wait = (enum saga_wait)k;
    if (!PQgetisnull(res, i, 9))
        copy_str(st->waiting_message_id, sizeof(st->waiting_message_id), PQgetvalue(res, i, 9));
    st->deadline_ms = PQgetisnull(res, i, 10) ? 0 : strtoll(PQgetvalue(res, i, 10), NULL, 10);
    st->pivot_sent = !strcmp(PQgetvalue(res, i, 11), "t");
    st->replies = cJSON_ParseWithLength(PQgetvalue(res, i, 13), (size_t)PQgetlength(res, i, 13));
    if (!PQgetisnull(res, i, 16))
        st->error = strdup(PQgetvalue(res, i, 16));
    if (!PQgetisnull(res, i, 17))
        copy_str(out->pending_request, sizeof(out->pending_request), PQgetvalue(res, i, 17));
    if (!PQgetisnull(res, i, 18))
        out->request_reason = strdup(PQgetvalue(res, i, 18));
    return 0;
}

void store_row_clear(struct saga_row *row)
{
    saga_state_clear(&row->state);
    free(row->request_reason);
    row->request_reason = NULL;
}

/* The document is written as text as it goes, one buffer per section (the arrays of
 * saga.apply_batch's argument), and joined at the end: building it as a cJSON tree and
 * printing it made a dozen small allocations per saga event, and allocating and freeing them
 * was about a third of the orchestrator's CPU in a profile of the saga benchmark.
 *
 * The keys of every object the batches are made of are written in jsonb's own order (shorter
 * keys first, then bytewise): PostgreSQL sorts each object's keys when it reads the document
 * (jsonb_in), and its sort returns after one pass over keys that are in order already. A
 * batch's document is ~6.6 KB a saga; read in this order it took ~13% less time to parse
 * (300 sagas' documents: 37.9 against 43.4 ms). */
static const char *const section_names[STORE_SECTIONS] = {
    "instances", "sent", "resolved", "outbox", "ignored", "inbox", "dead_letters"};
/* The sections in that order: sent, inbox, outbox, ignored, resolved, instances, dead_letters. */
static const enum store_section section_order[STORE_SECTIONS] = {
    STORE_SENT,     STORE_INBOX,     STORE_OUTBOX,      STORE_IGNORED,
    STORE_RESOLVED, STORE_INSTANCES, STORE_DEAD_LETTERS};

/* The sections' buffers of the last batch cleared on this thread, kept for the next one: a
 * batch's sections grow to hundreds of KB by doubling, and allocating and freeing them at
 * every batch was a visible part of the orchestrator's malloc time (the daemon builds one
 * batch at a time on its loop's thread). At most one buffer per section is kept, and none
 * larger than STORE_SPARE_MAX: a batch of huge replies must not hold its memory forever. */
#define STORE_SPARE_MAX ((size_t)4 << 20)
static _Thread_local struct {
    char *text;
    size_t cap;
} spare[STORE_SECTIONS];

int store_batch_init(struct store_batch *b)
{
    memset(b, 0, sizeof(*b));
    for (int i = 0; i < STORE_SECTIONS; i++) {
        if (!spare[i].text)
            continue;
        b->sec[i].text = spare[i].text;
        b->sec[i].cap = spare[i].cap;
        b->sec[i].text[0] = '\0';
        spare[i].text = NULL;
        spare[i].cap = 0;
    }
    return 0;
}

void store_batch_clear(struct store_batch *b)
{
    for (int i = 0; i < STORE_SECTIONS; i++) {
        if (!spare[i].text && b->sec[i].text && b->sec[i].cap <= STORE_SPARE_MAX) {
            spare[i].text = b->sec[i].text;
            spare[i].cap = b->sec[i].cap;
        } else {
            free(b->sec[i].text);
        }
    }
    memset(b, 0, sizeof(*b));
}

/* Appends n bytes to a section (marks it failed when out of memory; later appends do nothing). */
static void put(struct store_text *t, const char *s, size_t n)
{
    if (t->failed)
        return;
    if (t->len + n + 1 > t->cap) {
        size_t cap = t->cap ? t->cap : 1024;
        while (t->len + n + 1 > cap)
            cap *= 2;
        char *grown = realloc(t->text, cap);
        if (!grown) {
            t->failed = true;
            return;
        }
        t->text = grown;
        t->cap = cap;
    }
    memcpy(t->text + t->len, s, n);
    t->len += n;
    t->text[t->len] = '\0';
}

static void put_s(struct store_text *t, const char *s)
{
    put(t, s, strlen(s));
}

/* A string literal, its length known at compile time. */
#define put_lit(t, lit) put((t), "" lit, sizeof(lit) - 1)

/* A JSON string (quotes and escapes: '"', '\\' and the control characters, as cJSON prints
 * them; other bytes as they are: template_print_string), or null for NULL. */
static void put_str(struct store_text *t, const char *s)
{
    if (!s) {
        put_lit(t, "null");
        return;
    }
    if (!t->failed && template_print_string(&t->text, &t->len, &t->cap, s) < 0)
        t->failed = true;
}

/* Decimal digits, as "%lld" writes them (snprintf was a visible share of the batch's CPU). */
static void put_int(struct store_text *t, long long v)
{
    char digits[24];
    size_t n = sizeof(digits);
    unsigned long long u = v < 0 ? 0ULL - (unsigned long long)v : (unsigned long long)v;
    do {
        digits[--n] = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    if (v < 0)
        digits[--n] = '-';
    put(t, digits + n, sizeof(digits) - n);
}

/* A cJSON value as JSON text (null for NULL), as cJSON_PrintUnformatted writes it, printed
 * straight into the section (template_print_json). */
static void put_json(struct store_text *t, const cJSON *v)
{
    if (!v) {
        put_lit(t, "null");
        return;
    }
    if (!t->failed && template_print_json(&t->text, &t->len, &t->cap, v) < 0)
        t->failed = true;
}

/* Starts an element of a section's array ("{" after a comma when not the first) and its first
 * key; key() writes the next ones. */
static struct store_text *begin_n(struct store_batch *b, enum store_section s, const char *open,
                                  size_t n)
{
    struct store_text *t = &b->sec[s];
    if (t->len)
        put_lit(t, ",");
    put(t, open, n);
    return t;
}
/* The keys are literals: each one's text, quotes and colon included, is one constant. */
#define begin(b, s, first) begin_n((b), (s), "{\"" first "\":", sizeof("{\"" first "\":") - 1)
#define key(t, name) put_lit((t), ",\"" name "\":")

static int end(struct store_text *t)
{
    put_lit(t, "}");
    return t->failed ? -1 : 0;
}

char *store_batch_finish(struct store_batch *b)
{
    size_t total = 2;
    for (int i = 0; i < STORE_SECTIONS; i++) {
        if (b->sec[i].failed) {
            store_batch_clear(b);
            return NULL;
        }
        total += strlen(section_names[i]) + b->sec[i].len + 8;
    }
    char *doc = malloc(total);
    if (doc) {
        size_t len = 0;
        doc[len++] = '{';
        for (int k = 0; k < STORE_SECTIONS; k++) {
            int i = (int)section_order[k];
            if (k)
                doc[len++] = ',';
            size_t nl = strlen(section_names[i]);
            doc[len++] = '"';
            memcpy(doc + len, section_names[i], nl);
            len += nl;
            memcpy(doc + len, "\":[", 3);
            len += 3;
            if (b->sec[i].len) {
                memcpy(doc + len, b->sec[i].text, b->sec[i].len);
                len += b->sec[i].len;
            }
            doc[len++] = ']';
        }
        doc[len++] = '}';
        doc[len] = '\0';
    }
    store_batch_clear(b);
    return doc;
}

/* jsonb's order of object keys: shorter first, then bytewise. */
static int jsonb_key_cmp(const char *a, const char *b)
{
    size_t la = strlen(a), lb = strlen(b);
    if (la != lb)
        return la < lb ? -1 : 1;
    return memcmp(a, b, la);
}

static void put_header(struct store_text *t, const struct saga_header *h, bool comma)
{
    if (comma)
        put_lit(t, ",");
    put_str(t, h->name);
    put_lit(t, ":");
    put_str(t, h->value);
}

/* message-id and event-type are not in the outbox row's headers: they come from its id and
 * event_type. */
static bool header_from_row(const char *name)
{
    return !strcmp(name, "message-id") || !strcmp(name, "event-type");
}

/* A command's headers as a JSON object, in jsonb's key order when there are at most
 * SORTED_HEADERS_MAX (the engine writes 10; the order is for speed only). */
#define SORTED_HEADERS_MAX 16
static void put_headers(struct store_text *t, const struct saga_message *m)
{
    size_t order[SORTED_HEADERS_MAX], n = 0;
    put_lit(t, "{");
    if (m->header_count > SORTED_HEADERS_MAX) {
        for (size_t h = 0; h < m->header_count; h++)
            if (!header_from_row(m->headers[h].name))
                put_header(t, &m->headers[h], n++ > 0);
    } else {
        for (size_t h = 0; h < m->header_count; h++) {
            if (header_from_row(m->headers[h].name))
                continue;
            size_t j = n++;
            for (; j > 0 && jsonb_key_cmp(m->headers[order[j - 1]].name, m->headers[h].name) > 0;
                 j--)
                order[j] = order[j - 1];
            order[j] = h;
        }
        for (size_t k = 0; k < n; k++)
            put_header(t, &m->headers[order[k]], k > 0);
    }
    put_lit(t, "}");
}

static const char *step_name(const struct saga_definition *def, int step)
{
    return step >= 0 && (size_t)step < def->step_count ? def->steps[step].name : "-";
}

int store_batch_add_effects(struct store_batch *b, const struct saga_row *row,
                            const struct saga_effects *fx, const char *reply_message_id)
{
    const struct saga_definition *def = row->def;
    for (size_t i = 0; i < fx->message_count; i++) {
        const struct saga_message *m = &fx->messages[i];
        struct store_text *t = begin(b, STORE_OUTBOX, "id");
        put_str(t, m->message_id);
        key(t, "key");
        put_str(t, m->key);
        key(t, "topic");
        put_str(t, m->topic);
        key(t, "headers");
        put_headers(t, m);
        key(t, "payload");
        put_s(t, m->payload ? m->payload : "null"); /* rendered JSON text */
        key(t, "event_type");
        put_str(t, m->type);
        if (end(t))
            return -1;
    }
    for (size_t i = 0; i < fx->history_count; i++) {
        const struct saga_history_entry *h = &fx->history[i];
        struct store_text *t;
        if (h->status == SAGA_HIST_SENT) {
            t = begin(b, STORE_SENT, "step");
            put_str(t, step_name(def, h->step));
            key(t, "phase");
            put_str(t, saga_phase_name(h->phase));
            key(t, "attempt");
            put_int(t, h->attempt);
            key(t, "saga_id");
            put_str(t, row->state.id);
            key(t, "message_id");
            put_str(t, h->message_id);
        } else {
            if (h->reply) {
                t = begin(b, STORE_RESOLVED, "reply");
                put_json(t, h->reply);
                key(t, "status");
            } else {
                t = begin(b, STORE_RESOLVED, "status");
            }
            put_str(t, saga_history_status_name(h->status));
            key(t, "message_id");
            put_str(t, h->message_id);
            if (reply_message_id && h->status != SAGA_HIST_TIMED_OUT) {
                key(t, "reply_message_id");
                put_str(t, reply_message_id);
            }
        }
        if (end(t))
            return -1;
    }
    return 0;
}

int store_batch_add_instance(struct store_batch *b, const struct saga_row *row)
{
    const struct saga_state *st = &row->state;
    struct store_text *t = begin(b, STORE_INSTANCES, "id");
    put_str(t, st->id);
    key(t, "wait");
    put_str(t, wait_names[st->wait]);
    key(t, "error");
    put_str(t, st->error);
    key(t, "phase");
    put_str(t, saga_phase_name(st->phase));
    key(t, "status");
    put_str(t, saga_status_name(st->status));
    key(t, "attempt");
    put_int(t, st->attempt);
    if (st->replies) {
        key(t, "replies");
        put_json(t, st->replies);
    }
    key(t, "pivot_sent");
    if (st->pivot_sent)
        put_lit(t, "true");
    else
        put_lit(t, "false");
    key(t, "step_index");
    put_int(t, st->step);
    key(t, "budget_base");
    put_int(t, st->budget_base);
    key(t, "deadline_ms");
    if (st->deadline_ms)
        put_int(t, st->deadline_ms);
    else
        put_lit(t, "null");
    key(t, "current_step");
    put_str(t, step_name(row->def, st->step));
    key(t, "clear_request");
    if (row->clear_request)
        put_lit(t, "true");
    else
        put_lit(t, "false");
    key(t, "waiting_message_id");
    put_str(t, st->waiting_message_id[0] ? st->waiting_message_id : NULL);
    return end(t);
}

int store_batch_add_inbox(struct store_batch *b, const char *message_id, const char *in_reply_to,
                          const char *saga_id, const char *topic, int partition, int64_t offset,
                          const char *disposition)
{
    struct store_text *t = begin(b, STORE_INBOX, "topic");
    put_str(t, topic);
    key(t, "offset");
    put_int(t, offset);
    key(t, "saga_id");
    put_str(t, saga_id);
    key(t, "partition");
    put_int(t, partition);
    key(t, "message_id");
    put_str(t, message_id);
    key(t, "disposition");
    put_str(t, disposition);
    key(t, "in_reply_to");
    put_str(t, in_reply_to);
    return end(t);
}

int store_batch_add_ignored(struct store_batch *b, const char *in_reply_to, const char *saga_id,
                            const cJSON *reply)
{
    struct store_text *t = begin(b, STORE_IGNORED, "reply");
    put_json(t, reply);
    key(t, "saga_id");
    put_str(t, saga_id);
    key(t, "in_reply_to");
    put_str(t, in_reply_to);
    return end(t);
}

int store_batch_add_dead_letter(struct store_batch *b, const char *topic, int partition,
                                int64_t offset, const char *key_text, const cJSON *headers,
                                const char *payload, const char *error)
{
    struct store_text *t;
    if (key_text) {
        t = begin(b, STORE_DEAD_LETTERS, "key");
        put_str(t, key_text);
        key(t, "error");
    } else {
        t = begin(b, STORE_DEAD_LETTERS, "error");
    }
    put_str(t, error);
    key(t, "topic");
    put_str(t, topic);
    key(t, "offset");
    put_int(t, offset);
    key(t, "headers");
    put_json(t, headers);
    if (payload) {
        key(t, "payload");
        put_str(t, payload);
    }
    key(t, "partition");
    put_int(t, partition);
    return end(t);
}
