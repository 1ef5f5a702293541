/* The orchestrator's saga.apply_batch document (orchestrator/store.c): written as JSON text
 * directly, so what it writes must parse, and every string must come back as it went in,
 * whatever bytes it holds (error texts, header values and reply data come from outside). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>
#include <criterion/criterion.h>

#include "diag.h"
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

/* ---- the whole path, byte for byte ---------------------------------------------------- */

/* A definition whose templates use every kind of placeholder: exact ones of each JSON type
 * (kept as they are), interpolations of strings, numbers, arrays and missing paths, literal
 * scalars, nested arrays and objects, keys and strings that need escaping; a compensation
 * that reads a reply; a pivot. */
static const char golden_definition[] =
    "{\"saga\": \"golden\", \"version\": 3, \"reply_topic\": \"saga.replies\","
    " \"input\": {\"required\": [\"orderId\", \"items\", \"amount\", \"ratio\", \"gift\", "
    "\"note\", \"none\", \"nope\"]},"
    " \"defaults\": {\"timeout\": \"10s\", \"retry\": {\"max_attempts\": 2, \"backoff\": "
    "\"200ms\", \"max_backoff\": \"5s\"}},"
    " \"steps\": ["
    "  {\"name\": \"reserve\", \"participant\": \"inventory\","
    "   \"command\": {\"topic\": \"inventory.commands\", \"type\": \"ReserveStock\","
    "    \"key\": \"{{input.orderId}}\","
    "    \"payload\": {\"orderId\": \"{{input.orderId}}\", \"items\": \"{{input.items}}\","
    "     \"amount\": \"{{input.amount}}\", \"ratio\": \"{{input.ratio}}\", \"gift\": "
    "\"{{input.gift}}\","
    "     \"note\": \"{{input.note}}\", \"none\": \"{{input.none}}\", \"missing\": "
    "\"{{input.nope}}\","
    "     \"text\": \"order {{input.orderId}} x{{input.amount}} {{input.items}} [{{input.nope}}] "
    "{{ saga.name }}/{{saga.id}}\","
    "     \"lit\": [1, 2.5, -3e-7, 1e300, true, false, null, \"s\\\"q\\\\\\u0001\", {\"k\\n\": "
    "[]}, "
    "{}],"
    "     \"first\": \"{{input.items.0.sku}}\", \"corr\": \"{{saga.correlation_id}}\"}},"
    "   \"compensation\": {\"topic\": \"inventory.commands\", \"type\": \"ReleaseStock\","
    "    \"payload\": {\"reservationId\": \"{{steps.reserve.reply.reservationId}}\","
    "     \"all\": \"{{steps.reserve.reply}}\", \"why\": \"undo {{steps.reserve.reply.n}}\"}},"
    "   \"timeout\": \"5s\"},"
    "  {\"name\": \"pay\", \"participant\": \"payment\","
    "   \"command\": {\"topic\": \"payment.commands\", \"type\": \"Authorize\","
    "    \"key\": \"{{steps.reserve.reply.n}}\","
    "    \"payload\": {\"reservation\": \"{{steps.reserve.reply}}\", \"amount\": "
    "\"{{input.amount}}\"}}, \"compensation\": null},"
    "  {\"name\": \"approve\", \"participant\": \"orders\", \"pivot\": true,"
    "   \"command\": {\"topic\": \"orders.commands\", \"type\": \"Approve\","
    "    \"payload\": {\"auth\": \"{{steps.pay.reply.auth}}\"}}}"
    " ]}";

static void golden_uuid(char out[SAGA_UUID_LEN + 1], void *arg)
{
    int *n = arg;
    snprintf(out, SAGA_UUID_LEN + 1, "%08x-0000-4000-8000-%012x", 0xa0000000u + (unsigned)*n,
             (unsigned)(*n * 7919));
    (*n)++;
}

/* Applies ev to row and appends the transaction's document (effects, instance; a reply the
 * saga ignores goes to the inbox and ignored) to out. */
static void golden_step(struct saga_row *row, const struct saga_event *ev,
                        const struct saga_engine_env *env, const char *reply_id, FILE *out)
{
    struct saga_effects fx;
    struct store_batch b;
    cr_assert_eq(store_batch_init(&b), 0);
    cr_assert_eq(saga_engine_apply(row->def, &row->state, ev, env, &fx), 0);
    if (fx.outcome == SAGA_APPLIED) {
        cr_assert_eq(store_batch_add_effects(&b, row, &fx, reply_id), 0);
        cr_assert_eq(store_batch_add_instance(&b, row), 0);
    } else {
        cr_assert_eq(store_batch_add_inbox(&b, reply_id, ev->in_reply_to, row->state.id,
                                           "saga.replies", 2, 77, "ignored"),
                     0);
        cr_assert_eq(store_batch_add_ignored(&b, ev->in_reply_to, row->state.id, ev->reply), 0);
    }
    saga_effects_clear(&fx);
    char *text = store_batch_finish(&b);
    cr_assert(text);
    fprintf(out, "%s\n", text);
    free(text);
}

static void golden_reply(struct saga_row *row, const struct saga_engine_env *env, bool success,
                         const char *data, const char *reply_id, FILE *out)
{
    cJSON *reply = cJSON_Parse(data);
    cr_assert(reply, "bad reply JSON: %s", data);
    char irt[SAGA_UUID_LEN + 1];
    snprintf(irt, sizeof(irt), "%s", row->state.waiting_message_id);
    struct saga_event ev = {.kind = SAGA_EV_REPLY,
                            .now_ms = 1795000002000LL,
                            .in_reply_to = irt,
                            .success = success,
                            .reply = reply};
    golden_step(row, &ev, env, reply_id, out);
    cJSON_Delete(reply);
}

/* Everything the orchestrator writes for two sagas (one completes, one fails, compensates,
 * then gets a stale reply) must stay the same to the byte: the commands' payloads, keys and
 * headers, the step history and the instances, as saga.apply_batch receives them. The
 * expected text is tests/unit/golden/apply_documents.inc (SAGA_GOLDEN_WRITE=<that file>
 * rewrites it from this build: only when a change of the output is intended). */
Test(store, the_documents_of_two_sagas_are_the_same_to_the_byte)
{
    struct saga_definition *def = NULL;
    struct diag_list errs;
    memset(&errs, 0, sizeof(errs));
    cr_assert_eq(saga_definition_parse("golden.json", golden_definition,
                                       sizeof(golden_definition) - 1, &def, &errs),
                 0, "%s", errs.count ? errs.items[0] : "");
    diag_clear(&errs);
    int counter = 1;
    struct saga_engine_env env = {.new_uuid = golden_uuid, .arg = &counter};
    char *got = NULL;
    size_t got_len = 0;
    FILE *out = open_memstream(&got, &got_len);
    cr_assert(out);

    static const char input[] =
        "{\"orderId\": \"o-\\\"1\\\\\\n\\u0002é\", \"amount\": 1234567, \"ratio\": 0.1, "
        "\"gift\": true, \"note\": null, \"items\": [{\"sku\": \"s-1\", \"qty\": 2}, {\"sku\": "
        "\"s-2\", \"qty\": 1.5e-3}], \"none\": {}}";
    for (int s = 0; s < 2; s++) {
        struct saga_row row;
        memset(&row, 0, sizeof(row));
        row.def = def;
        cJSON *in = cJSON_Parse(input);
        cr_assert(in);
        saga_state_init(&row.state,
                        s ? "22222222-2222-4222-8222-222222222222"
                          : "11111111-1111-4111-8111-111111111111",
                        in, s ? "corr-\t2" : NULL, s ? NULL : "0123456789abcdef0123456789ABCDEF");
        struct saga_event start = {.kind = SAGA_EV_START, .now_ms = 1795000001000LL};
        golden_step(&row, &start, &env, NULL, out);
        golden_reply(&row, &env, true,
                     "{\"reservationId\": \"r-\\\"x\\u001f\", \"n\": 42, \"f\": -0.25, \"big\": "
                     "12345678901234567890, \"arr\": [null, {\"a\": [1, \"\\u00e9\"]}]}",
                     "b0000000-0000-4000-8000-000000000001", out);
        if (s == 0) {
            golden_reply(&row, &env, true, "{\"auth\": \"A-1\", \"amount\": 99.99}",
                         "b0000000-0000-4000-8000-000000000002", out);
            golden_reply(&row, &env, true, "{\"status\": \"approved\"}",
                         "b0000000-0000-4000-8000-000000000003", out);
            cr_assert_eq(row.state.status, SAGA_COMPLETED);
        } else {
            struct saga_event timeout = {.kind = SAGA_EV_TIMEOUT, .now_ms = 1795001000000LL};
            golden_step(&row, &timeout, &env, NULL, out);
            timeout.now_ms += 1000;
            golden_step(&row, &timeout, &env, NULL, out); /* the backoff is over: resent */
            golden_reply(&row, &env, false, "{\"reason\": \"declined \\\"hard\\\"\"}",
                         "b0000000-0000-4000-8000-000000000004", out);
            cr_assert_eq(row.state.status, SAGA_COMPENSATING);
            struct saga_event stale = {.kind = SAGA_EV_REPLY,
                                       .now_ms = 1795001000001LL,
                                       .in_reply_to = "a0000000-0000-4000-8000-000000000000",
                                       .success = true};
            golden_step(&row, &stale, &env, "b0000000-0000-4000-8000-000000000005", out);
            golden_reply(&row, &env, true, "{\"released\": true}",
                         "b0000000-0000-4000-8000-000000000006", out);
            cr_assert_eq(row.state.status, SAGA_COMPENSATED);
        }
        store_row_clear(&row);
    }
    fclose(out);
    saga_definition_destroy(def);

    /* SAGA_GOLDEN_WRITE=<file>: writes what this build makes, as the C text of the .inc. */
    const char *write = getenv("SAGA_GOLDEN_WRITE");
    if (write) {
        FILE *f = fopen(write, "w");
        cr_assert(f, "cannot write %s", write);
        fputs("/* Generated by test_store (SAGA_GOLDEN_WRITE): the expected documents. */\n\"", f);
        for (size_t i = 0; i < got_len; i++) {
            unsigned char c = (unsigned char)got[i];
            if (c == '\n')
                fputs("\\n\"\n\"", f);
            else if (c == '"' || c == '\\')
                fprintf(f, "\\%c", c);
            else if (c < 0x20 || c >= 0x7f)
                fprintf(f, "\\%03o", c);
            else
                fputc(c, f);
        }
        fputs("\"\n", f);
        fclose(f);
    }
    /* The golden text is one literal, longer than the 4,095 bytes ISO C requires compilers to
     * support (gcc and clang take it). */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Woverlength-strings"
    static const char want[] =
#include "golden/apply_documents.inc"
        ;
#pragma GCC diagnostic pop
    size_t want_len = sizeof(want) - 1, at = 0;
    while (at < got_len && at < want_len && got[at] == want[at])
        at++;
    cr_assert(at == got_len && at == want_len,
              "the documents differ from golden/apply_documents.inc at byte %zu (of %zu, %zu "
              "expected):\n  got:  %.160s\n  want: %.160s",
              at, got_len, want_len, got + (at > 40 ? at - 40 : 0), want + (at > 40 ? at - 40 : 0));
    free(got);
}

/* A cleared batch's section buffers are kept for the next batch on the thread, up to 4 MB
 * each: a larger one (a batch of huge replies) is freed, not held forever. */
Test(store, section_buffers_over_4_mb_are_not_kept)
{
    struct store_batch b;
    cr_assert_eq(store_batch_init(&b), 0);
    const size_t caps[] = {1024, (size_t)4 << 20, ((size_t)4 << 20) + 1, (size_t)8 << 20};
    const enum store_section secs[] = {STORE_SENT, STORE_INBOX, STORE_OUTBOX, STORE_RESOLVED};
    char *given[4];
    for (int k = 0; k < 4; k++) {
        struct store_text *t = &b.sec[secs[k]];
        free(t->text);
        cr_assert_not_null(t->text = malloc(caps[k]));
        t->text[0] = '\0';
        t->len = 0;
        t->cap = caps[k];
        given[k] = t->text;
    }
    store_batch_clear(&b);
    cr_assert_eq(store_batch_init(&b), 0);
    cr_assert_eq(b.sec[STORE_SENT].text, given[0]);
    cr_assert_eq(b.sec[STORE_SENT].cap, caps[0]);
    cr_assert_eq(b.sec[STORE_INBOX].text, given[1]);
    cr_assert_eq(b.sec[STORE_INBOX].cap, caps[1]);
    cr_assert_null(b.sec[STORE_OUTBOX].text);
    cr_assert_eq(b.sec[STORE_OUTBOX].cap, 0);
    cr_assert_null(b.sec[STORE_RESOLVED].text);
    cr_assert_eq(b.sec[STORE_RESOLVED].cap, 0);
    /* Still a batch that works. */
    char *text = store_batch_finish(&b);
    cr_assert_str_eq(text, "{\"sent\":[],\"inbox\":[],\"outbox\":[],\"ignored\":[],"
                           "\"resolved\":[],\"instances\":[],\"dead_letters\":[]}");
    free(text);
}
