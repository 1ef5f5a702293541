/* The orchestrator's saga.apply_batch document (orchestrator/store.c): written as JSON text
 * directly, so what it writes must parse, and every string must come back as it went in,
 * whatever bytes it holds (error texts, header values and reply data come from outside). */
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>
#include <criterion/criterion.h>

#include "orchestrator.h"

/* Quotes, backslashes, every control character, a DEL and UTF-8. */
static const char nasty[] = "q\" b\\ n\n r\r t\t b\b f\f \x01\x02\x1f del\x7f / é ∑ 😀 end";

static const char *get_str(const cJSON *o, const char *name)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, name);
    cr_assert(cJSON_IsString(v), "%s is not a string", name);
    return v->valuestring;
}

static const cJSON *only(const cJSON *doc, const char *section)
{
    const cJSON *a = cJSON_GetObjectItemCaseSensitive(doc, section);
    cr_assert(cJSON_IsArray(a), "%s is not an array", section);
    cr_assert_eq(cJSON_GetArraySize(a), 1, "%s holds %d elements", section, cJSON_GetArraySize(a));
    return cJSON_GetArrayItem(a, 0);
}

Test(store, an_empty_batch_is_seven_empty_arrays)
{
    struct store_batch b;
    cr_assert_eq(store_batch_init(&b), 0);
    char *text = store_batch_finish(&b);
    cr_assert_str_eq(text, "{\"sent\":[],\"inbox\":[],\"outbox\":[],\"ignored\":[],"
                           "\"resolved\":[],\"instances\":[],\"dead_letters\":[]}");
    free(text);
}

/* Are o's keys in jsonb's order (shorter first, then bytewise), the order PostgreSQL sorts
 * them into when it reads the document? (Its sort returns after one pass over sorted keys.) */
static void assert_jsonb_order(const cJSON *o, const char *what)
{
    const cJSON *prev = NULL;
    for (const cJSON *k = o->child; k; prev = k, k = k->next) {
        if (!prev)
            continue;
        size_t lp = strlen(prev->string), lk = strlen(k->string);
        cr_assert(lp < lk || (lp == lk && memcmp(prev->string, k->string, lk) < 0),
                  "%s: \"%s\" before \"%s\"", what, prev->string, k->string);
    }
}

/* A saga of one step, reserve_inventory (step, def and row filled; the caller owns them). */
static void one_step_saga(struct saga_step_def *step, struct saga_definition *def,
                          struct saga_row *row)
{
    memset(step, 0, sizeof(*step));
    step->name = "reserve_inventory";
    memset(def, 0, sizeof(*def));
    def->steps = step;
    def->step_count = 1;
    memset(row, 0, sizeof(*row));
    row->def = def;
    strcpy(row->state.id, "11111111-2222-3333-4444-555555555555");
}

Test(store, every_string_comes_back_as_it_went_in)
{
    struct saga_step_def steps[1];
    struct saga_definition def;
    struct saga_row row;
    one_step_saga(steps, &def, &row);
    row.state.status = SAGA_RUNNING;
    row.state.wait = SAGA_WAIT_REPLY;
    strcpy(row.state.waiting_message_id, "aaaaaaaa-2222-3333-4444-555555555555");
    row.state.deadline_ms = 1795676434123LL;
    row.state.attempt = 2;
    row.state.error = (char *)nasty;
    row.state.replies = cJSON_CreateObject();
    cJSON_AddStringToObject(row.state.replies, "reserve_inventory", nasty);

    struct saga_header headers[] = {{"message-id", "skipped"},
                                    {"event-type", "skipped"},
                                    {"correlation-id", (char *)nasty},
                                    {"saga-id", row.state.id}};
    struct saga_message msg;
    memset(&msg, 0, sizeof(msg));
    strcpy(msg.message_id, "bbbbbbbb-2222-3333-4444-555555555555");
    msg.topic = "inventory.commands";
    msg.key = (char *)nasty;
    msg.type = "ReserveStock";
    msg.payload = "{\"orderId\":\"o-1\",\"n\":[1,2.5,null]}";
    msg.headers = headers;
    msg.header_count = sizeof(headers) / sizeof(headers[0]);
    cJSON *reply = cJSON_CreateObject();
    cJSON_AddStringToObject(reply, "reason", nasty);
    struct saga_history_entry hist[2];
    memset(hist, 0, sizeof(hist));
    hist[0].status = SAGA_HIST_SENT;
    hist[0].attempt = 2;
    strcpy(hist[0].message_id, msg.message_id);
    hist[1].status = SAGA_HIST_FAILED;
    hist[1].reply = reply;
    strcpy(hist[1].message_id, "cccccccc-2222-3333-4444-555555555555");
    struct saga_effects fx;
    memset(&fx, 0, sizeof(fx));
    fx.messages = &msg;
    fx.message_count = 1;
    fx.history = hist;
    fx.history_count = 2;

    struct store_batch b;
    cr_assert_eq(store_batch_init(&b), 0);
    cr_assert_eq(store_batch_add_effects(&b, &row, &fx, "dddddddd-2222-3333-4444-555555555555"), 0);
    cr_assert_eq(store_batch_add_instance(&b, &row), 0);
    cr_assert_eq(store_batch_add_inbox(&b, "m-1", "r-1", row.state.id, nasty, 7, 9007199254740993LL,
                                       "ignored"),
                 0);
    cr_assert_eq(store_batch_add_ignored(&b, "r-1", row.state.id, reply), 0);
    cJSON *dl_headers = cJSON_CreateObject();
    cJSON_AddStringToObject(dl_headers, "h", nasty);
    cr_assert_eq(
        store_batch_add_dead_letter(&b, "saga.replies", 3, 42, NULL, dl_headers, nasty, nasty), 0);
    char *text = store_batch_finish(&b);
    cr_assert(text);
    cJSON *doc = cJSON_Parse(text);
    cr_assert(doc, "not JSON: %s", text);

    assert_jsonb_order(doc, "the document");
    assert_jsonb_order(only(doc, "instances"), "instances");
    assert_jsonb_order(only(doc, "outbox"), "outbox");
    assert_jsonb_order(cJSON_GetObjectItemCaseSensitive(only(doc, "outbox"), "headers"), "headers");
    assert_jsonb_order(only(doc, "sent"), "sent");
    assert_jsonb_order(only(doc, "resolved"), "resolved");
    assert_jsonb_order(only(doc, "inbox"), "inbox");
    assert_jsonb_order(only(doc, "ignored"), "ignored");
    assert_jsonb_order(only(doc, "dead_letters"), "dead_letters");

    const cJSON *in = only(doc, "instances");
    cr_assert_str_eq(get_str(in, "error"), nasty);
    cr_assert_str_eq(get_str(in, "status"), "running");
    cr_assert_str_eq(get_str(in, "wait"), "reply");
    cr_assert_str_eq(get_str(in, "current_step"), "reserve_inventory");
    cr_assert_str_eq(get_str(cJSON_GetObjectItemCaseSensitive(in, "replies"), "reserve_inventory"),
                     nasty);
    /* Integers as digits: a double would round 2^53 + 1 (the offset below) and the deadline. */
    cr_assert(strstr(text, "\"deadline_ms\":1795676434123"));
    cr_assert(strstr(text, "\"offset\":9007199254740993"));
    cr_assert(cJSON_IsFalse(cJSON_GetObjectItemCaseSensitive(in, "pivot_sent")));

    const cJSON *out = only(doc, "outbox");
    cr_assert_str_eq(get_str(out, "key"), nasty);
    const cJSON *h = cJSON_GetObjectItemCaseSensitive(out, "headers");
    cr_assert_str_eq(get_str(h, "correlation-id"), nasty);
    cr_assert_str_eq(get_str(h, "saga-id"), row.state.id);
    cr_assert_eq(cJSON_GetArraySize(h), 2);
    cr_assert_null(cJSON_GetObjectItemCaseSensitive(h, "message-id"));
    cr_assert_null(cJSON_GetObjectItemCaseSensitive(h, "event-type"));
    const cJSON *payload = cJSON_GetObjectItemCaseSensitive(out, "payload");
    cr_assert_eq(cJSON_GetArraySize(cJSON_GetObjectItemCaseSensitive(payload, "n")), 3);

    const cJSON *sent = only(doc, "sent");
    cr_assert_str_eq(get_str(sent, "step"), "reserve_inventory");
    cr_assert_eq(cJSON_GetObjectItemCaseSensitive(sent, "attempt")->valueint, 2);
    const cJSON *res = only(doc, "resolved");
    cr_assert_str_eq(get_str(res, "status"), "failed");
    /* The reply applied: recorded on the attempt it resolves (sql/011), not in the inbox. */
    cr_assert_str_eq(get_str(res, "reply_message_id"), "dddddddd-2222-3333-4444-555555555555");
    cr_assert_str_eq(get_str(cJSON_GetObjectItemCaseSensitive(res, "reply"), "reason"), nasty);

    cr_assert_str_eq(get_str(only(doc, "inbox"), "topic"), nasty);
    cr_assert_str_eq(get_str(only(doc, "inbox"), "disposition"), "ignored");
    cr_assert_str_eq(
        get_str(cJSON_GetObjectItemCaseSensitive(only(doc, "ignored"), "reply"), "reason"), nasty);
    const cJSON *dl = only(doc, "dead_letters");
    cr_assert_null(cJSON_GetObjectItemCaseSensitive(dl, "key"));
    cr_assert_str_eq(get_str(dl, "payload"), nasty);
    cr_assert_str_eq(get_str(dl, "error"), nasty);
    cr_assert_str_eq(get_str(cJSON_GetObjectItemCaseSensitive(dl, "headers"), "h"), nasty);

    cJSON_Delete(doc);
    cJSON_Delete(dl_headers);
    cJSON_Delete(reply);
    cJSON_Delete(row.state.replies);
    free(text);
}

/* Headers are sorted for speed only: every one of a command's headers is in the document once
 * with its value, however many there are, beyond the ones the sort handles (16) too. */
static void check_headers(size_t count)
{
    struct saga_step_def steps[1];
    struct saga_definition def;
    struct saga_row row;
    one_step_saga(steps, &def, &row);
    struct saga_header headers[24];
    char names[24][32], values[24][32];
    cr_assert_leq(count, 24);
    for (size_t i = 0; i < count; i++) {
        /* message-id and event-type (not written), then x-<n> in descending order. */
        if (i < 2)
            snprintf(names[i], sizeof(names[i]), "%s", i ? "event-type" : "message-id");
        else
            snprintf(names[i], sizeof(names[i]), "x-%zu", count - i);
        snprintf(values[i], sizeof(values[i]), "v%zu", i);
        headers[i] = (struct saga_header){names[i], values[i]};
    }
    struct saga_message msg;
    memset(&msg, 0, sizeof(msg));
    strcpy(msg.message_id, "bbbbbbbb-2222-3333-4444-555555555555");
    msg.topic = "t";
    msg.key = "k";
    msg.type = "T";
    msg.payload = "{}";
    msg.headers = headers;
    msg.header_count = count;
    struct saga_effects fx;
    memset(&fx, 0, sizeof(fx));
    fx.messages = &msg;
    fx.message_count = 1;
    struct store_batch b;
    cr_assert_eq(store_batch_init(&b), 0);
    cr_assert_eq(store_batch_add_effects(&b, &row, &fx, NULL), 0);
    char *text = store_batch_finish(&b);
    cJSON *doc = cJSON_Parse(text);
    cr_assert(doc, "not JSON: %s", text);
    const cJSON *h = cJSON_GetObjectItemCaseSensitive(only(doc, "outbox"), "headers");
    size_t n = 0;
    for (const cJSON *k = h->child; k; k = k->next) {
        n++;
        for (const cJSON *o = k->next; o; o = o->next)
            cr_assert_str_neq(k->string, o->string, "%zu headers: %s twice", count, k->string);
    }
    cr_assert_eq(n, count - 2, "%zu headers: %zu in the document: %s", count, n, text);
    for (size_t i = 2; i < count; i++)
        cr_assert_str_eq(get_str(h, names[i]), values[i], "%zu headers", count);
    if (count <= 16)
        assert_jsonb_order(h, "headers");
    cJSON_Delete(doc);
    free(text);
}

Test(store, every_header_once_however_many)
{
    for (size_t count = 4; count <= 24; count++)
        check_headers(count);
}

/* A timeout resolves its attempt without a reply, and an event that is no reply has no id:
 * neither resolved entry names a reply (sql/011 would record it as applied). */
Test(store, only_a_reply_names_itself_on_the_attempt)
{
    struct saga_step_def steps[1];
    struct saga_definition def;
    struct saga_row row;
    one_step_saga(steps, &def, &row);
    struct saga_history_entry hist[1];
    memset(hist, 0, sizeof(hist));
    hist[0].status = SAGA_HIST_TIMED_OUT;
    strcpy(hist[0].message_id, "cccccccc-2222-3333-4444-555555555555");
    struct saga_effects fx;
    memset(&fx, 0, sizeof(fx));
    fx.history = hist;
    fx.history_count = 1;

    for (int with_id = 0; with_id < 2; with_id++) {
        struct store_batch b;
        cr_assert_eq(store_batch_init(&b), 0);
        /* A timed-out entry, even were an id passed; then a failure with no id. */
        hist[0].status = with_id ? SAGA_HIST_TIMED_OUT : SAGA_HIST_FAILED;
        cr_assert_eq(store_batch_add_effects(
                         &b, &row, &fx, with_id ? "dddddddd-2222-3333-4444-555555555555" : NULL),
                     0);
        char *text = store_batch_finish(&b);
        cr_assert(text);
        cJSON *doc = cJSON_Parse(text);
        cr_assert(doc, "not JSON: %s", text);
        cr_assert_null(cJSON_GetObjectItemCaseSensitive(only(doc, "resolved"), "reply_message_id"),
                       "%s", text);
        cJSON_Delete(doc);
        free(text);
    }
}
