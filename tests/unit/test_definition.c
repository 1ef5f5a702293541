/* definition: the loader and the validator. The broken-file corpus (tests/definitions/broken,
 * run by tests/validate-broken) pins the exact messages; here each rule is checked through
 * the API, with its path, plus the fields of the shipped example. */
#include <criterion/criterion.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "definition.h"
#include "diag.h"

static char *source_path(const char *rel)
{
    const char *root = getenv("SAGA_SOURCE_ROOT");
    char *path = NULL;
    cr_assert(root, "SAGA_SOURCE_ROOT is not set");
    cr_assert(asprintf(&path, "%s/%s", root, rel) > 0);
    return path;
}

static struct saga_definition *load_example(void)
{
    struct diag_list errs = {0};
    struct saga_definition *def = NULL;
    char *path = source_path("sagas/order_fulfillment.json");
    int rc = saga_definition_load_file(path, &def, &errs);
    cr_assert_eq(rc, 0, "example: %s", errs.count ? errs.items[0] : "(no message)");
    cr_assert_eq(errs.count, 0);
    free(path);
    return def;
}

/* A valid document the rule tests start from. */
static const char base_doc[] =
    "{\n"
    "  \"saga\": \"t\", \"version\": 1,\n"
    "  \"input\": {\"required\": [\"orderId\"]},\n"
    "  \"reply_topic\": \"saga.replies\",\n"
    "  \"steps\": [\n"
    "    {\"name\": \"a\", \"participant\": \"pa\",\n"
    "     \"command\": {\"topic\": \"a.cmd\", \"type\": \"DoA\", \"key\": \"{{input.orderId}}\",\n"
    "                 \"payload\": {\"o\": \"{{input.orderId}}\"}},\n"
    "     \"compensation\": {\"topic\": \"a.cmd\", \"type\": \"UndoA\",\n"
    "                      \"payload\": {\"r\": \"{{steps.a.reply.id}}\"}}},\n"
    "    {\"name\": \"b\", \"participant\": \"pb\", \"pivot\": true,\n"
    "     \"command\": {\"topic\": \"b.cmd\", \"type\": \"DoB\", \"payload\": {}}},\n"
    "    {\"name\": \"c\", \"participant\": \"pc\",\n"
    "     \"command\": {\"topic\": \"c.cmd\", \"type\": \"DoC\", \"payload\": \"{{saga.id}}\"}}\n"
    "  ]\n"
    "}\n";

/* Replaces the first occurrence of from in base_doc by to; caller frees. */
static char *doc_with(const char *from, const char *to)
{
    const char *at = strstr(base_doc, from);
    cr_assert(at, "test bug: \"%s\" not in the base document", from);
    char *out = NULL;
    cr_assert(asprintf(&out, "%.*s%s%s", (int)(at - base_doc), base_doc, to, at + strlen(from)) >
              0);
    return out;
}

/* Parses text, which must be rejected; returns the messages (caller clears). */
static struct diag_list parse_bad(const char *text)
{
    struct diag_list errs = {0};
    struct saga_definition *def = (struct saga_definition *)1;
    int rc = saga_definition_parse("t.json", text, strlen(text), &def, &errs);
    cr_assert_eq(rc, -1, "accepted: %s", text);
    cr_assert_null(def);
    cr_assert_gt(errs.count, 0);
    return errs;
}

static bool has_error(const struct diag_list *errs, const char *want)
{
    for (size_t i = 0; i < errs->count; i++) {
        if (!strcmp(errs->items[i], want))
            return true;
    }
    return false;
}

static void dump(const struct diag_list *errs)
{
    for (size_t i = 0; i < errs->count; i++)
        fprintf(stderr, "  got: %s\n", errs->items[i]);
}

/* from -> to in the base document must give exactly the one message want. */
static void expect_one(const char *from, const char *to, const char *want)
{
    char *text = doc_with(from, to);
    struct diag_list errs = parse_bad(text);
    if (errs.count != 1 || strcmp(errs.items[0], want) != 0)
        dump(&errs);
    cr_expect_eq(errs.count, 1, "for %s", to);
    cr_expect(has_error(&errs, want), "missing: %s", want);
    diag_clear(&errs);
    free(text);
}

Test(definition, base_document_is_valid)
{
    struct diag_list errs = {0};
    struct saga_definition *def = NULL;
    int rc = saga_definition_parse("t.json", base_doc, strlen(base_doc), &def, &errs);
    if (rc)
        dump(&errs);
    cr_assert_eq(rc, 0);
    cr_assert_eq(def->step_count, 3);
    cr_assert_eq(def->pivot_index, 1);
    /* Built-in defaults when "defaults" is absent. */
    cr_assert_eq(def->default_timeout_ms, 10000);
    cr_assert_eq(def->default_retry.max_attempts, 3);
    cr_assert_eq(def->default_retry.backoff_ms, 200);
    cr_assert_eq(def->default_retry.max_backoff_ms, 5000);
    cr_assert_eq(def->steps[2].timeout_ms, 10000);
    /* The compensation key defaults to the command's key template. */
    cr_assert(def->steps[0].has_compensation);
    cr_assert(cJSON_IsString(def->steps[0].compensation.key));
    cr_assert_str_eq(def->steps[0].compensation.key->valuestring, "{{input.orderId}}");
    /* No key: the saga id. */
    cr_assert_null(def->steps[1].command.key);
    cr_assert_not(def->steps[1].has_compensation);
    cr_assert_not(def->steps[2].has_compensation);
    cr_assert_str_eq(def->source_label, "t.json");
    cr_assert(cJSON_IsObject(def->body));
    cr_assert_eq(saga_definition_step_index(def, "c"), 2);
    cr_assert_eq(saga_definition_step_index(def, "zz"), -1);
    saga_definition_destroy(def);
}

Test(definition, example_loads_with_expected_fields)
{
    struct saga_definition *def = load_example();
    char *label = source_path("sagas/order_fulfillment.json");

    cr_assert_str_eq(def->name, "order_fulfillment");
    cr_assert_eq(def->version, 1);
    cr_assert_not_null(def->description);
    cr_assert_str_eq(def->reply_topic, "saga.replies");
    cr_assert_str_eq(def->source_label, label);
    cr_assert_eq(def->required_count, 4);
    const char *inputs[] = {"orderId", "customerId", "items", "amount"};
    for (size_t i = 0; i < 4; i++)
        cr_assert_str_eq(def->required_inputs[i], inputs[i]);

    cr_assert_eq(def->step_count, 4);
    const char *names[] = {"reserve_inventory", "authorize_payment", "approve_order",
                           "schedule_shipping"};
    const char *participants[] = {"inventory", "payment", "orders", "shipping"};
    const char *topics[] = {"inventory.commands", "payment.commands", "orders.commands",
                            "shipping.commands"};
    const char *types[] = {"ReserveStock", "AuthorizePayment", "ApproveOrder", "ScheduleShipment"};
    for (size_t i = 0; i < 4; i++) {
        const struct saga_step_def *step = &def->steps[i];
        cr_assert_str_eq(step->name, names[i]);
        cr_assert_str_eq(step->participant, participants[i]);
        cr_assert_str_eq(step->command.topic, topics[i]);
        cr_assert_str_eq(step->command.type, types[i]);
        cr_assert(cJSON_IsString(step->command.key));
        cr_assert_str_eq(step->command.key->valuestring, "{{input.orderId}}");
        cr_assert(cJSON_IsObject(step->command.payload));
        cr_assert_gt(step->timeout_ms, 0);
        cr_assert_eq(step->pivot, i == 2);
    }
    cr_assert_eq(def->pivot_index, 2);

    /* Compensations: before the pivot only, keyed like the command. */
    cr_assert(def->steps[0].has_compensation);
    cr_assert_str_eq(def->steps[0].compensation.type, "ReleaseStock");
    cr_assert_str_eq(def->steps[0].compensation.topic, "inventory.commands");
    cr_assert_str_eq(def->steps[0].compensation.key->valuestring, "{{input.orderId}}");
    cr_assert(def->steps[1].has_compensation);
    cr_assert_str_eq(def->steps[1].compensation.type, "RefundPayment");
    const cJSON *auth =
        cJSON_GetObjectItemCaseSensitive(def->steps[1].compensation.payload, "authorizationId");
    cr_assert(cJSON_IsString(auth));
    cr_assert_str_eq(auth->valuestring, "{{steps.authorize_payment.reply.authorizationId}}");
    cr_assert_not(def->steps[2].has_compensation);
    cr_assert_not(def->steps[3].has_compensation);

    /* Defaults, and step overrides merged over them key by key. */
    cr_assert_eq(def->default_timeout_ms, 10000);
    cr_assert_eq(def->default_retry.max_attempts, 3);
    cr_assert_eq(def->default_retry.backoff_ms, 200);
    cr_assert_eq(def->default_retry.max_backoff_ms, 5000);
    cr_assert_eq(def->steps[0].timeout_ms, 5000);
    cr_assert_eq(def->steps[0].retry.max_attempts, 3);
    cr_assert_eq(def->steps[1].timeout_ms, 15000);
    cr_assert_eq(def->steps[1].retry.max_attempts, 5);
    cr_assert_eq(def->steps[1].retry.backoff_ms, 200);
    cr_assert_eq(def->steps[1].retry.max_backoff_ms, 5000);
    cr_assert_eq(def->steps[3].timeout_ms, 30000);
    cr_assert_eq(def->steps[3].retry.max_attempts, 10);
    cr_assert_eq(def->steps[3].retry.backoff_ms, 1000);
    cr_assert_eq(def->steps[3].retry.max_backoff_ms, 60000);

    /* The body is the whole document, for saga.definitions. */
    cr_assert_str_eq(cJSON_GetObjectItemCaseSensitive(def->body, "saga")->valuestring,
                     "order_fulfillment");
    free(label);
    saga_definition_destroy(def);
}

Test(definition, partial_defaults_merge_over_builtins)
{
    char *text = doc_with("\"reply_topic\"", "\"defaults\": {\"timeout\": \"3s\", \"retry\": "
                                             "{\"backoff\": \"1s\"}},\n  \"reply_topic\"");
    char *text2 = NULL;
    cr_assert(asprintf(&text2, "%s", text) > 0);
    free(text);
    /* Step c overrides max_attempts only. */
    text = NULL;
    const char *at = strstr(text2, "\"name\": \"c\",");
    cr_assert(at);
    cr_assert(asprintf(&text, "%.*s\"retry\": {\"max_attempts\": 7}, %s", (int)(at - text2), text2,
                       at) > 0);

    struct diag_list errs = {0};
    struct saga_definition *def = NULL;
    int rc = saga_definition_parse("t.json", text, strlen(text), &def, &errs);
    if (rc)
        dump(&errs);
    cr_assert_eq(rc, 0);
    cr_assert_eq(def->default_timeout_ms, 3000);
    cr_assert_eq(def->default_retry.max_attempts, 3);
    cr_assert_eq(def->default_retry.backoff_ms, 1000);
    cr_assert_eq(def->default_retry.max_backoff_ms, 5000);
    cr_assert_eq(def->steps[0].timeout_ms, 3000);
    cr_assert_eq(def->steps[2].retry.max_attempts, 7);
    cr_assert_eq(def->steps[2].retry.backoff_ms, 1000);
    cr_assert_eq(def->steps[2].retry.max_backoff_ms, 5000);
    saga_definition_destroy(def);
    free(text);
    free(text2);
}

Test(definition, wrong_types)
{
    expect_one("\"participant\": \"pb\"", "\"participant\": 3",
               "t.json: $.steps[1].participant: expected a string, got a number");
    expect_one("\"version\": 1", "\"version\": \"1\"",
               "t.json: $.version: expected an integer, got a string");
    expect_one("\"version\": 1", "\"version\": 1.5",
               "t.json: $.version: must be an integer >= 1, got 1.5");
    expect_one("\"pivot\": true", "\"pivot\": 1",
               "t.json: $.steps[1].pivot: expected a boolean, got a number");
    expect_one("\"payload\": {}", "\"payload\": {}, \"key\": []",
               "t.json: $.steps[1].command.key: expected a string, got an array");
    expect_one("\"input\": {\"required\": [\"orderId\"]}", "\"input\": {\"required\": \"orderId\"}",
               "t.json: $.input.required: expected an array of strings, got a string");
}

Test(definition, root_must_be_an_object)
{
    struct diag_list errs = parse_bad("[1, 2]");
    cr_assert_eq(errs.count, 1);
    cr_assert_str_eq(errs.items[0], "t.json: $: expected an object, got an array");
    diag_clear(&errs);
}

Test(definition, missing_fields)
{
    expect_one("\"reply_topic\": \"saga.replies\",", "",
               "t.json: $: missing required key \"reply_topic\"");
    expect_one("\"participant\": \"pc\",", "",
               "t.json: $.steps[2]: missing required key \"participant\"");
    expect_one("\"type\": \"DoB\",", "",
               "t.json: $.steps[1].command: missing required key \"type\"");
}

Test(definition, unknown_keys_with_suggestions)
{
    expect_one("\"participant\": \"pc\",", "\"participant\": \"pc\", \"timout\": \"1s\",",
               "t.json: $.steps[2]: unknown key \"timout\" (did you mean \"timeout\"?)");
    expect_one("\"type\": \"DoB\",", "\"type\": \"DoB\", \"Topic\": \"x\",",
               "t.json: $.steps[1].command: unknown key \"Topic\" (did you mean \"topic\"?)");
    expect_one("\"saga\": \"t\",", "\"saga\": \"t\", \"owner\": \"me\",",
               "t.json: $: unknown key \"owner\"");
    expect_one("\"required\": [\"orderId\"]", "\"required\": [\"orderId\"], \"optional\": []",
               "t.json: $.input: unknown key \"optional\"");
}

Test(definition, duplicate_keys)
{
    expect_one("\"saga\": \"t\",", "\"saga\": \"t\", \"saga\": \"u\",",
               "t.json: $: duplicate key \"saga\"");
    expect_one("\"payload\": {}", "\"payload\": {\"x\": [{\"y\": 1, \"y\": 2}]}",
               "t.json: $.steps[1].command.payload.x[0]: duplicate key \"y\"");
}

Test(definition, step_names)
{
    expect_one("\"name\": \"c\"", "\"name\": \"a\"",
               "t.json: $.steps[2].name: duplicate step name \"a\" (also $.steps[0])");
    expect_one("\"name\": \"c\"", "\"name\": \"9c\"",
               "t.json: $.steps[2].name: invalid step name \"9c\" (must match "
               "^[A-Za-z][A-Za-z0-9_]*$)");
    expect_one("\"saga\": \"t\"", "\"saga\": \"has space\"",
               "t.json: $.saga: invalid saga name \"has space\" (must match "
               "^[A-Za-z][A-Za-z0-9_.-]{0,62}$)");
}

Test(definition, saga_name_length_limit)
{
    char name[80];
    memset(name, 'n', 63);
    name[63] = '\0';
    char *to = NULL;
    cr_assert(asprintf(&to, "\"saga\": \"%s\"", name) > 0);
    char *text = doc_with("\"saga\": \"t\"", to);
    struct diag_list errs = {0};
    struct saga_definition *def = NULL;
    cr_assert_eq(saga_definition_parse("t.json", text, strlen(text), &def, &errs), 0);
    saga_definition_destroy(def);
    free(text);
    free(to);

    memset(name, 'n', 64);
    name[64] = '\0';
    cr_assert(asprintf(&to, "\"saga\": \"%s\"", name) > 0);
    text = doc_with("\"saga\": \"t\"", to);
    errs = parse_bad(text);
    cr_assert_eq(errs.count, 1);
    cr_assert(strstr(errs.items[0], "$.saga: invalid saga name"));
    diag_clear(&errs);
    free(text);
    free(to);
}

Test(definition, pivot_rules)
{
    expect_one("\"name\": \"c\",", "\"name\": \"c\", \"pivot\": true,",
               "t.json: $.steps[2].pivot: only one step can be the pivot (already $.steps[1])");
    expect_one(",\n     \"compensation\": {\"topic\": \"a.cmd\", \"type\": \"UndoA\",\n"
               "                      \"payload\": {\"r\": \"{{steps.a.reply.id}}\"}}},",
               "},",
               "t.json: $.steps[0]: missing required key \"compensation\" (steps before the "
               "pivot need one; write \"compensation\": null if there is nothing to undo)");
    expect_one("\"type\": \"DoB\", \"payload\": {}}",
               "\"type\": \"DoB\", \"payload\": {}}, "
               "\"compensation\": {\"topic\": \"b.cmd\", \"type\": \"UndoB\", \"payload\": {}}",
               "t.json: $.steps[1].compensation: the pivot step is never compensated; remove "
               "this key");
    expect_one("\"payload\": \"{{saga.id}}\"}",
               "\"payload\": \"{{saga.id}}\"}, \"compensation\": {\"topic\": \"c.cmd\", "
               "\"type\": \"UndoC\", \"payload\": {}}",
               "t.json: $.steps[2].compensation: a step after the pivot is never compensated "
               "(it is retried until it succeeds); remove this key");
    expect_one("\"payload\": \"{{saga.id}}\"}",
               "\"payload\": \"{{saga.id}}\"}, \"compensation\": []",
               "t.json: $.steps[2].compensation: expected an object or null, got an array");
}

Test(definition, no_pivot_means_every_step_needs_a_compensation)
{
    char *text = doc_with("\"pivot\": true,", "");
    struct diag_list errs = parse_bad(text);
    cr_assert_eq(errs.count, 2);
    cr_assert(strstr(errs.items[0], "t.json: $.steps[1]: missing required key \"compensation\""));
    cr_assert(strstr(errs.items[1], "t.json: $.steps[2]: missing required key \"compensation\""));
    diag_clear(&errs);
    free(text);
}

Test(definition, explicit_null_compensation)
{
    char *text = doc_with("\"pivot\": true,", "\"compensation\": null,");
    struct diag_list errs = {0};
    struct saga_definition *def = NULL;
    char *text2 = NULL;
    /* Steps b and c both say "nothing to undo": valid without a pivot. */
    const char *at = strstr(text, "\"name\": \"c\",");
    cr_assert(asprintf(&text2, "%.*s\"compensation\": null, %s", (int)(at - text), text, at) > 0);
    int rc = saga_definition_parse("t.json", text2, strlen(text2), &def, &errs);
    if (rc)
        dump(&errs);
    cr_assert_eq(rc, 0);
    cr_assert_eq(def->pivot_index, -1);
    cr_assert(def->steps[0].has_compensation);
    cr_assert_not(def->steps[1].has_compensation);
    cr_assert_not(def->steps[2].has_compensation);
    saga_definition_destroy(def);
    free(text);
    free(text2);
}

Test(definition, durations)
{
    expect_one("\"participant\": \"pc\",", "\"participant\": \"pc\", \"timeout\": \"5 s\",",
               "t.json: $.steps[2].timeout: invalid duration \"5 s\" (expected <integer><unit> "
               "groups with units ms, s, m, h, e.g. \"250ms\", \"10s\", \"1m30s\")");
    expect_one("\"participant\": \"pc\",", "\"participant\": \"pc\", \"timeout\": \"0ms\",",
               "t.json: $.steps[2].timeout: must be greater than 0");
    expect_one("\"participant\": \"pc\",", "\"participant\": \"pc\", \"timeout\": 5,",
               "t.json: $.steps[2].timeout: expected a duration string such as \"5s\", got a "
               "number");
}

Test(definition, retry_bounds)
{
    expect_one("\"reply_topic\"",
               "\"defaults\": {\"retry\": {\"max_attempts\": 0}},\n"
               "  \"reply_topic\"",
               "t.json: $.defaults.retry.max_attempts: must be an integer from 1 to 1000, got 0");
    expect_one("\"reply_topic\"",
               "\"defaults\": {\"retry\": {\"max_attempts\": 1001}},\n"
               "  \"reply_topic\"",
               "t.json: $.defaults.retry.max_attempts: must be an integer from 1 to 1000, got "
               "1001");
    expect_one("\"reply_topic\"",
               "\"defaults\": {\"retry\": {\"backoff\": \"2s\", \"max_backoff\": \"1s\"}},\n"
               "  \"reply_topic\"",
               "t.json: $.defaults.retry.max_backoff: max_backoff (1s) must not be less than "
               "backoff (2s)");
    /* A step's backoff above the saga's default max_backoff (5s). */
    expect_one("\"participant\": \"pc\",",
               "\"participant\": \"pc\", \"retry\": {\"backoff\": \"1m30s\"},",
               "t.json: $.steps[2].retry.backoff: max_backoff (5s) must not be less than "
               "backoff (1m30s)");
    expect_one("\"participant\": \"pc\",", "\"participant\": \"pc\", \"retry\": {\"tries\": 3},",
               "t.json: $.steps[2].retry: unknown key \"tries\"");
}

Test(definition, topics)
{
    expect_one("\"topic\": \"b.cmd\"", "\"topic\": \"b cmd\"",
               "t.json: $.steps[1].command.topic: invalid topic name \"b cmd\" (1 to 249 "
               "characters of A-Z a-z 0-9 . _ -, not \".\" or \"..\")");
    expect_one("\"reply_topic\": \"saga.replies\"", "\"reply_topic\": \".\"",
               "t.json: $.reply_topic: invalid topic name \".\" (1 to 249 characters of A-Z "
               "a-z 0-9 . _ -, not \".\" or \"..\")");

    char long_topic[260];
    memset(long_topic, 't', 250);
    long_topic[250] = '\0';
    char *to = NULL;
    cr_assert(asprintf(&to, "\"topic\": \"%s\"", long_topic) > 0);
    char *text = doc_with("\"topic\": \"b.cmd\"", to);
    struct diag_list errs = parse_bad(text);
    cr_assert_eq(errs.count, 1);
    cr_assert(strstr(errs.items[0], "t.json: $.steps[1].command.topic: invalid topic name"));
    /* Long values are cut short in messages. */
    cr_assert(strstr(errs.items[0], "...") != NULL);
    diag_clear(&errs);
    free(text);
    free(to);
}

Test(definition, template_paths)
{
    expect_one("\"payload\": {}", "\"payload\": {\"x\": \"{{steps.zz.reply.id}}\"}",
               "t.json: $.steps[1].command.payload.x: template path \"steps.zz.reply.id\": "
               "unknown step \"zz\"");
    expect_one("\"payload\": {}", "\"payload\": {\"x\": \"{{steps.c.reply.id}}\"}",
               "t.json: $.steps[1].command.payload.x: template path \"steps.c.reply.id\": step "
               "\"c\" runs after this step, its reply is not known yet");
    expect_one("\"payload\": {}", "\"payload\": {\"x\": \"{{steps.b.reply.id}}\"}",
               "t.json: $.steps[1].command.payload.x: template path \"steps.b.reply.id\": a "
               "command cannot use the reply of its own step");
    expect_one("\"payload\": {}", "\"payload\": [\"id {{input.customerId}}\"]",
               "t.json: $.steps[1].command.payload[0]: template path \"input.customerId\": "
               "input \"customerId\" is not in input.required");
    expect_one("\"payload\": {}", "\"payload\": {\"x\": \"{{steps.a.result}}\"}",
               "t.json: $.steps[1].command.payload.x: template path \"steps.a.result\": "
               "expected steps.a.reply[.<key>...]");
    expect_one("\"payload\": {}", "\"payload\": {\"x\": \"{{saga.version}}\"}",
               "t.json: $.steps[1].command.payload.x: unknown template path \"saga.version\" "
               "(expected input.<key>, steps.<step>.reply, saga.id, saga.name or "
               "saga.correlation_id)");
    expect_one("\"key\": \"{{input.orderId}}\"", "\"key\": \"{{env.HOME}}\"",
               "t.json: $.steps[0].command.key: unknown template path \"env.HOME\" (expected "
               "input.<key>, steps.<step>.reply, saga.id, saga.name or saga.correlation_id)");
}

Test(definition, template_paths_allowed)
{
    /* A compensation may use its own step's reply (the base does), a command an earlier
     * step's, and every saga.* field is known. */
    char *text = doc_with("\"payload\": {}", "\"payload\": {\"r\": \"{{steps.a.reply}}\", "
                                             "\"s\": \"{{ saga.name }}/{{saga.correlation_id}}\","
                                             " \"n\": [\"{{input.orderId.sub}}\"]}");
    struct diag_list errs = {0};
    struct saga_definition *def = NULL;
    int rc = saga_definition_parse("t.json", text, strlen(text), &def, &errs);
    if (rc)
        dump(&errs);
    cr_assert_eq(rc, 0);
    saga_definition_destroy(def);
    free(text);
}

Test(definition, malformed_placeholders)
{
    char *text = doc_with("\"payload\": {}", "\"payload\": {\"x\": \"a {{input.orderId\", "
                                             "\"y\": \"{{}}\"}");
    struct diag_list errs = parse_bad(text);
    if (errs.count != 2)
        dump(&errs);
    cr_assert_eq(errs.count, 2);
    cr_assert(!strncmp(errs.items[0], "t.json: $.steps[1].command.payload.x: ", 38), "%s",
              errs.items[0]);
    cr_assert(!strncmp(errs.items[1], "t.json: $.steps[1].command.payload.y: ", 38), "%s",
              errs.items[1]);
    diag_clear(&errs);
    free(text);
}

Test(definition, every_error_is_reported)
{
    char *t1 = doc_with("\"version\": 1", "\"version\": 0");
    char *t2 = NULL, *t3 = NULL, *t4 = NULL;
    const char *at = strstr(t1, "\"topic\": \"b.cmd\"");
    cr_assert(asprintf(&t2, "%.*s\"topic\": \"b/cmd\"%s", (int)(at - t1), t1,
                       at + strlen("\"topic\": \"b.cmd\"")) > 0);
    at = strstr(t2, "\"name\": \"c\",");
    cr_assert(asprintf(&t3, "%.*s\"name\": \"c\", \"pivot\": true, \"timeout\": \"x\",%s",
                       (int)(at - t2), t2, at + strlen("\"name\": \"c\",")) > 0);
    at = strstr(t3, "\"type\": \"DoA\"");
    cr_assert(asprintf(&t4, "%.*s\"typ\": \"DoA\"%s", (int)(at - t3), t3,
                       at + strlen("\"type\": \"DoA\"")) > 0);

    struct diag_list errs = parse_bad(t4);
    const char *want[] = {
        "t.json: $.version: must be an integer >= 1, got 0",
        "t.json: $.steps[1].command.topic: invalid topic name \"b/cmd\" (1 to 249 characters "
        "of A-Z a-z 0-9 . _ -, not \".\" or \"..\")",
        "t.json: $.steps[2].pivot: only one step can be the pivot (already $.steps[1])",
        "t.json: $.steps[2].timeout: invalid duration \"x\" (expected <integer><unit> groups "
        "with units ms, s, m, h, e.g. \"250ms\", \"10s\", \"1m30s\")",
        "t.json: $.steps[0].command: unknown key \"typ\" (did you mean \"type\"?)",
        "t.json: $.steps[0].command: missing required key \"type\"",
    };
    if (errs.count != sizeof(want) / sizeof(want[0]))
        dump(&errs);
    cr_expect_eq(errs.count, sizeof(want) / sizeof(want[0]));
    for (size_t i = 0; i < sizeof(want) / sizeof(want[0]); i++)
        cr_expect(has_error(&errs, want[i]), "missing: %s", want[i]);
    diag_clear(&errs);
    free(t1);
    free(t2);
    free(t3);
    free(t4);
}

Test(definition, errors_append_to_existing_list)
{
    struct diag_list errs = {0};
    struct saga_definition *def = NULL;
    diag_addf(&errs, "earlier");
    int rc = saga_definition_parse("t.json", base_doc, strlen(base_doc), &def, &errs);
    /* Earlier messages from another file do not make this one invalid. */
    cr_assert_eq(rc, 0);
    cr_assert_eq(errs.count, 1);
    saga_definition_destroy(def);
    diag_clear(&errs);
}

Test(definition, syntax_error_line_and_column)
{
    struct diag_list errs = parse_bad("{\n  \"saga\": \"t\",\n  \"version\" 1\n}\n");
    cr_assert_eq(errs.count, 1);
    cr_assert_str_eq(errs.items[0], "t.json:3:13: invalid JSON");
    diag_clear(&errs);

    errs = parse_bad("{\"saga\": \"t\"");
    cr_assert_eq(errs.count, 1);
    cr_assert_str_eq(errs.items[0], "t.json:1:13: invalid JSON (at the end of the input)");
    diag_clear(&errs);

    errs = parse_bad("");
    cr_assert_str_eq(errs.items[0], "t.json:1:1: invalid JSON (at the end of the input)");
    diag_clear(&errs);

    errs = parse_bad("{} {}");
    cr_assert_str_eq(errs.items[0], "t.json:1:4: invalid JSON");
    diag_clear(&errs);
}

Test(definition, nul_byte_is_a_syntax_error)
{
    struct diag_list errs = {0};
    struct saga_definition *def = NULL;
    const char text[] = "{}\n\0 garbage";
    cr_assert_eq(saga_definition_parse("t.json", text, sizeof(text) - 1, &def, &errs), -1);
    cr_assert_null(def);
    cr_assert_eq(errs.count, 1);
    cr_assert_str_eq(errs.items[0], "t.json:2:1: invalid JSON: NUL byte");
    diag_clear(&errs);
}

Test(definition, parse_does_not_need_a_terminated_buffer)
{
    size_t len = strlen(base_doc);
    char *text = malloc(len);
    cr_assert(text);
    memcpy(text, base_doc, len); /* no NUL: ASan catches a read past the end */
    struct diag_list errs = {0};
    struct saga_definition *def = NULL;
    cr_assert_eq(saga_definition_parse("t.json", text, len, &def, &errs), 0);
    saga_definition_destroy(def);
    free(text);
}

Test(definition, load_dir_repository_sagas)
{
    char *dir = source_path("sagas");
    struct diag_list errs = {0};
    struct saga_definition **defs = NULL;
    size_t count = 0;
    int rc = saga_definition_load_dir(dir, &defs, &count, &errs);
    if (rc)
        dump(&errs);
    cr_assert_eq(rc, 0);
    cr_assert_geq(count, 1);
    bool found = false;
    for (size_t i = 0; i < count; i++) {
        if (!strcmp(defs[i]->name, "order_fulfillment")) {
            found = true;
            char *label = NULL;
            cr_assert(asprintf(&label, "%s/order_fulfillment.json", dir) > 0);
            cr_assert_str_eq(defs[i]->source_label, label);
            free(label);
        }
        saga_definition_destroy(defs[i]);
    }
    free(defs);
    cr_assert(found);
    free(dir);
}

static void write_file(const char *dir, const char *name, const char *text)
{
    char *path = NULL;
    cr_assert(asprintf(&path, "%s/%s", dir, name) > 0);
    FILE *f = fopen(path, "w");
    cr_assert(f, "%s", path);
    fputs(text, f);
    fclose(f);
    free(path);
}

Test(definition, load_dir_order_duplicates_and_bad_files)
{
    char tmpl[] = "/tmp/test_definition.XXXXXX";
    char *dir = mkdtemp(tmpl);
    cr_assert(dir);
    char *other = doc_with("\"saga\": \"t\"", "\"saga\": \"u\"");
    write_file(dir, "b.json", base_doc);
    write_file(dir, "a.json", other);
    write_file(dir, "c.json", base_doc);  /* same (t, 1) as b.json */
    write_file(dir, "d.json", "{");       /* syntax error */
    write_file(dir, "notes.txt", "{");    /* not a definition */
    write_file(dir, ".hidden.json", "{"); /* not a definition either */

    char *slashed = NULL;
    cr_assert(asprintf(&slashed, "%s/", dir) > 0);
    struct diag_list errs = {0};
    struct saga_definition **defs = NULL;
    size_t count = 0;
    cr_assert_eq(saga_definition_load_dir(slashed, &defs, &count, &errs), -1);
    cr_assert_eq(count, 2);
    cr_assert_str_eq(defs[0]->name, "u"); /* a.json first: name order */
    cr_assert_str_eq(defs[1]->name, "t");
    char *label = NULL;
    cr_assert(asprintf(&label, "%s/b.json", dir) > 0);
    cr_assert_str_eq(defs[1]->source_label, label); /* no double slash */
    free(label);
    cr_assert_eq(errs.count, 2, "%zu errors", errs.count);
    char *want = NULL;
    cr_assert(asprintf(&want,
                       "%s/c.json: $.version: saga \"t\" version 1 is already defined in "
                       "%s/b.json",
                       dir, dir) > 0);
    cr_assert_str_eq(errs.items[0], want);
    free(want);
    cr_assert(asprintf(&want, "%s/d.json:1:", dir) > 0);
    cr_assert(!strncmp(errs.items[1], want, strlen(want)), "%s", errs.items[1]);
    free(want);

    for (size_t i = 0; i < count; i++)
        saga_definition_destroy(defs[i]);
    free(defs);
    diag_clear(&errs);

    const char *names[] = {"a.json", "b.json", "c.json", "d.json", "notes.txt", ".hidden.json"};
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        char *path = NULL;
        cr_assert(asprintf(&path, "%s/%s", dir, names[i]) > 0);
        unlink(path);
        free(path);
    }
    rmdir(dir);
    free(slashed);
    free(other);
}

Test(definition, missing_paths_are_named)
{
    struct diag_list errs = {0};
    struct saga_definition **defs = NULL;
    size_t count = 7;
    cr_assert_eq(saga_definition_load_dir("/nonexistent/sagas", &defs, &count, &errs), -1);
    cr_assert_eq(count, 0);
    cr_assert_eq(errs.count, 1);
    cr_assert_str_eq(errs.items[0],
                     "/nonexistent/sagas: cannot open directory: No such file or directory");
    free(defs);
    diag_clear(&errs);

    struct saga_definition *def = (struct saga_definition *)1;
    cr_assert_eq(saga_definition_load_file("/nonexistent/x.json", &def, &errs), -1);
    cr_assert_null(def);
    cr_assert_str_eq(errs.items[0], "/nonexistent/x.json: cannot open: No such file or directory");
    diag_clear(&errs);
}

Test(definition, destroy_accepts_null)
{
    saga_definition_destroy(NULL);
}
