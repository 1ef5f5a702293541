/* store: saga.instances rows <-> engine state, and the saga.apply_batch document. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <libpq-fe.h>

#include "orchestrator.h"

const char *const store_instance_columns =
    "id, saga_name, saga_version, status, step_index, phase, attempt, budget_base, wait, "
    "waiting_message_id, (extract(epoch FROM deadline) * 1000)::bigint, pivot_sent, "
    "input::text, replies::text, correlation_id, trace_id, error, pending_request, "
    "request_reason";

static const char *const wait_names[] = {"none", "reply", "backoff"};

int store_read_row(const struct registry *reg, void *result, int i, struct saga_row *out, char *err,
                   size_t errlen)
{
    PGresult *res = result;
    memset(out, 0, sizeof(*out));
    const char *id = PQgetvalue(res, i, 0);
    snprintf(out->name, sizeof(out->name), "%s", PQgetvalue(res, i, 1));
    out->version = atoi(PQgetvalue(res, i, 2));
    out->def = registry_find(reg, out->name, out->version);
    if (!out->def) {
        snprintf(err, errlen, "saga %s: definition %s version %d is not loaded", id, out->name,
                 out->version);
        return -2; /* registered by another orchestrator since we loaded: reload */
    }
    cJSON *input = cJSON_Parse(PQgetvalue(res, i, 12));
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
        snprintf(st->waiting_message_id, sizeof(st->waiting_message_id), "%s",
                 PQgetvalue(res, i, 9));
    st->deadline_ms = PQgetisnull(res, i, 10) ? 0 : strtoll(PQgetvalue(res, i, 10), NULL, 10);
    st->pivot_sent = !strcmp(PQgetvalue(res, i, 11), "t");
    st->replies = cJSON_Parse(PQgetvalue(res, i, 13));
    if (!PQgetisnull(res, i, 16))
        st->error = strdup(PQgetvalue(res, i, 16));
    if (!PQgetisnull(res, i, 17))
        snprintf(out->pending_request, sizeof(out->pending_request), "%s", PQgetvalue(res, i, 17));
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

int store_batch_init(struct store_batch *b)
{
    memset(b, 0, sizeof(*b));
    b->doc = cJSON_CreateObject();
    if (!b->doc)
        return -1;
    if (!(b->instances = cJSON_AddArrayToObject(b->doc, "instances")) ||
        !(b->sent = cJSON_AddArrayToObject(b->doc, "sent")) ||
        !(b->resolved = cJSON_AddArrayToObject(b->doc, "resolved")) ||
        !(b->outbox = cJSON_AddArrayToObject(b->doc, "outbox")) ||
        !(b->ignored = cJSON_AddArrayToObject(b->doc, "ignored")) ||
        !(b->inbox = cJSON_AddArrayToObject(b->doc, "inbox")) ||
        !(b->dead_letters = cJSON_AddArrayToObject(b->doc, "dead_letters"))) {
        store_batch_clear(b);
        return -1;
    }
    return 0;
}

void store_batch_clear(struct store_batch *b)
{
    cJSON_Delete(b->doc);
    memset(b, 0, sizeof(*b));
}

char *store_batch_finish(struct store_batch *b)
{
    char *text = cJSON_PrintUnformatted(b->doc);
    store_batch_clear(b);
    return text;
}

/* An integer member, written as its digits. cJSON_AddNumberToObject prints a number through
 * a double: snprintf("%1.15g"), then an sscanf back to check the round trip. Number printing
 * was ~12% of the orchestrator's CPU in a profile of the saga benchmark, these among it.
 * Returns 0 or -1 (out of memory). */
static int add_int(cJSON *o, const char *name, long long v)
{
    char digits[24];
    snprintf(digits, sizeof(digits), "%lld", v);
    cJSON *n = cJSON_CreateRaw(digits);
    if (!n)
        return -1;
    cJSON_AddItemToObject(o, name, n);
    return 0;
}

static const char *step_name(const struct saga_definition *def, int step)
{
    return step >= 0 && (size_t)step < def->step_count ? def->steps[step].name : "-";
}

int store_batch_add_effects(struct store_batch *b, const struct saga_row *row,
                            const struct saga_effects *fx)
{
    const struct saga_definition *def = row->def;
    for (size_t i = 0; i < fx->message_count; i++) {
        const struct saga_message *m = &fx->messages[i];
        cJSON *o = cJSON_CreateObject();
        cJSON *headers = cJSON_CreateObject();
        if (!o || !headers) {
            cJSON_Delete(o);
            cJSON_Delete(headers);
            return -1;
        }
        cJSON_AddItemToArray(b->outbox, o);
        cJSON_AddStringToObject(o, "id", m->message_id);
        cJSON_AddStringToObject(o, "topic", m->topic);
        cJSON_AddStringToObject(o, "key", m->key);
        cJSON_AddStringToObject(o, "event_type", m->type);
        cJSON_AddItemToObject(o, "payload", cJSON_CreateRaw(m->payload));
        for (size_t h = 0; h < m->header_count; h++) {
            /* message-id and event-type come from the outbox row's id and event_type. */
            if (!strcmp(m->headers[h].name, "message-id") ||
                !strcmp(m->headers[h].name, "event-type"))
                continue;
            cJSON_AddStringToObject(headers, m->headers[h].name, m->headers[h].value);
        }
        cJSON_AddItemToObject(o, "headers", headers);
    }
    for (size_t i = 0; i < fx->history_count; i++) {
        const struct saga_history_entry *h = &fx->history[i];
        cJSON *o = cJSON_CreateObject();
        if (!o)
            return -1;
        cJSON_AddStringToObject(o, "message_id", h->message_id);
        if (h->status == SAGA_HIST_SENT) {
            cJSON_AddItemToArray(b->sent, o);
            cJSON_AddStringToObject(o, "saga_id", row->state.id);
            cJSON_AddStringToObject(o, "step", step_name(def, h->step));
            cJSON_AddStringToObject(o, "phase", saga_phase_name(h->phase));
            if (add_int(o, "attempt", h->attempt))
                return -1;
        } else {
            cJSON_AddItemToArray(b->resolved, o);
            cJSON_AddStringToObject(o, "status", saga_history_status_name(h->status));
            if (h->reply)
                cJSON_AddItemToObject(o, "reply", cJSON_Duplicate(h->reply, 1));
        }
    }
    return 0;
}

int store_batch_add_instance(struct store_batch *b, const struct saga_row *row)
{
    const struct saga_state *st = &row->state;
    cJSON *o = cJSON_CreateObject();
    if (!o)
        return -1;
    cJSON_AddItemToArray(b->instances, o);
    cJSON_AddStringToObject(o, "id", st->id);
    cJSON_AddStringToObject(o, "status", saga_status_name(st->status));
    cJSON_AddStringToObject(o, "current_step", step_name(row->def, st->step));
    if (add_int(o, "step_index", st->step))
        return -1;
    cJSON_AddStringToObject(o, "phase", saga_phase_name(st->phase));
    if (add_int(o, "attempt", st->attempt) || add_int(o, "budget_base", st->budget_base))
        return -1;
    cJSON_AddStringToObject(o, "wait", wait_names[st->wait]);
    if (st->waiting_message_id[0])
        cJSON_AddStringToObject(o, "waiting_message_id", st->waiting_message_id);
    else
        cJSON_AddNullToObject(o, "waiting_message_id");
    if (!st->deadline_ms)
        cJSON_AddNullToObject(o, "deadline_ms");
    else if (add_int(o, "deadline_ms", st->deadline_ms))
        return -1;
    cJSON_AddBoolToObject(o, "pivot_sent", st->pivot_sent);
    if (st->replies)
        cJSON_AddItemToObject(o, "replies", cJSON_CreateObjectReference(st->replies->child));
    if (st->error)
        cJSON_AddStringToObject(o, "error", st->error);
    else
        cJSON_AddNullToObject(o, "error");
    cJSON_AddBoolToObject(o, "clear_request", row->clear_request);
    return 0;
}
