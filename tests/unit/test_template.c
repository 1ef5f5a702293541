#include <criterion/criterion.h>

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "template.h"

static cJSON *ctx;

static void setup(void)
{
    const char *text =
        "{\"input\": {\"orderId\": \"o-1\", \"amount\": 42.5, \"count\": 3, \"flag\": true,"
        "  \"items\": [{\"sku\": \"a\", \"qty\": 1}, {\"sku\": \"b\", \"qty\": 2}],"
        "  \"customer\": {\"id\": \"c-9\", \"tags\": [\"x\"]}, \"nothing\": null},"
        " \"steps\": {\"reserve_inventory\": {\"reply\": {\"reservationId\": \"r-7\","
        "   \"lines\": [1, 2]}}},"
        " \"saga\": {\"id\": \"11111111-2222-3333-4444-555555555555\", \"name\": \"order\","
        "   \"correlation_id\": \"corr-1\"}}";
    ctx = cJSON_Parse(text);
    cr_assert_not_null(ctx);
}

static void teardown(void)
{
    cJSON_Delete(ctx);
}

/* Renders the template given as JSON text and returns the compact JSON of the result. */
static char *render_json(const char *tmpl_text)
{
    cJSON *tmpl = cJSON_Parse(tmpl_text);
    cr_assert_not_null(tmpl, "bad test template %s", tmpl_text);
    cJSON *out = NULL;
    char err[256] = "";
    int rc = template_render(tmpl, ctx, &out, err, sizeof(err));
    cr_assert_eq(rc, 0, "render %s failed: %s", tmpl_text, err);
    char *s = cJSON_PrintUnformatted(out);
    cJSON_Delete(out);
    cJSON_Delete(tmpl);
    return s;
}

static void expect_render(const char *tmpl_text, const char *expected)
{
    char *got = render_json(tmpl_text);
    cr_expect_str_eq(got, expected, "template %s", tmpl_text);
    free(got);
}

static void expect_render_error(const char *tmpl_text, const char *fragment)
{
    cJSON *tmpl = cJSON_Parse(tmpl_text);
    cr_assert_not_null(tmpl);
    cJSON *out = (cJSON *)1;
    char err[256] = "";
    int rc = template_render(tmpl, ctx, &out, err, sizeof(err));
    cr_expect_eq(rc, -1, "template %s should fail", tmpl_text);
    cr_expect_null(out);
    cr_expect_not_null(strstr(err, fragment), "error for %s: \"%s\" lacks \"%s\"", tmpl_text, err,
                       fragment);
    cJSON_Delete(tmpl);
}

TestSuite(template, .init = setup, .fini = teardown);

Test(template, exact_placeholder_keeps_type)
{
    expect_render("\"{{input.orderId}}\"", "\"o-1\"");
    expect_render("\"{{input.amount}}\"", "42.5");
    expect_render("\"{{input.count}}\"", "3");
    expect_render("\"{{input.flag}}\"", "true");
    expect_render("\"{{input.nothing}}\"", "null");
    expect_render("\"{{input.items}}\"", "[{\"sku\":\"a\",\"qty\":1},{\"sku\":\"b\",\"qty\":2}]");
    expect_render("\"{{input.customer}}\"", "{\"id\":\"c-9\",\"tags\":[\"x\"]}");
    expect_render("\"{{steps.reserve_inventory.reply.reservationId}}\"", "\"r-7\"");
    expect_render("\"{{steps.reserve_inventory.reply.lines}}\"", "[1,2]");
    expect_render("\"{{saga.id}}\"", "\"11111111-2222-3333-4444-555555555555\"");
    expect_render("\"{{saga.name}}\"", "\"order\"");
    expect_render("\"{{saga.correlation_id}}\"", "\"corr-1\"");
    expect_render("\"{{input.items.1.sku}}\"", "\"b\"");
}

Test(template, whitespace_inside_braces_is_trimmed)
{
    expect_render("\"{{ input.orderId }}\"", "\"o-1\"");
    expect_render("\"{{\\tinput.count  }}\"", "3");
    expect_render("\"id={{ input.orderId }}\"", "\"id=o-1\"");
}

Test(template, interpolation_in_longer_strings)
{
    expect_render("\"order {{input.orderId}} for {{input.customer.id}}\"", "\"order o-1 for c-9\"");
    expect_render("\"{{input.orderId}}/{{saga.name}}\"", "\"o-1/order\"");
    expect_render("\"n={{input.count}} amt={{input.amount}} f={{input.flag}}\"",
                  "\"n=3 amt=42.5 f=true\"");
    expect_render("\"items: {{input.items}}\"",
                  "\"items: [{\\\"sku\\\":\\\"a\\\",\\\"qty\\\":1},{\\\"sku\\\":\\\"b\\\","
                  "\\\"qty\\\":2}]\"");
    expect_render("\"c: {{input.customer}}\"", "\"c: {\\\"id\\\":\\\"c-9\\\",\\\"tags\\\":"
                                               "[\\\"x\\\"]}\"");
    expect_render("\"[{{input.nothing}}]\"", "\"[]\"");
    expect_render("\"{{input.orderId}}{{input.orderId}}\"", "\"o-1o-1\"");
    expect_render("\" {{input.count}}\"", "\" 3\"");
}

Test(template, plain_values_are_copied)
{
    expect_render("\"no placeholders }} here {\"", "\"no placeholders }} here {\"");
    expect_render("17", "17");
    expect_render("null", "null");
    expect_render("false", "false");
    expect_render("\"\"", "\"\"");
}

Test(template, nested_payloads)
{
    expect_render("{\"orderId\": \"{{input.orderId}}\", \"lines\": \"{{input.items}}\","
                  " \"meta\": {\"who\": \"{{input.customer.id}}\", \"n\": [\"{{input.count}}\","
                  " \"x{{input.count}}\", 5, {\"deep\": \"{{saga.id}}\"}]}, \"k\": true}",
                  "{\"orderId\":\"o-1\",\"lines\":[{\"sku\":\"a\",\"qty\":1},{\"sku\":\"b\","
                  "\"qty\":2}],\"meta\":{\"who\":\"c-9\",\"n\":[3,\"x3\",5,{\"deep\":"
                  "\"11111111-2222-3333-4444-555555555555\"}]},\"k\":true}");
    expect_render("[]", "[]");
    expect_render("{}", "{}");
}

Test(template, missing_paths_render_null_or_empty)
{
    expect_render("\"{{input.missing}}\"", "null");
    expect_render("\"{{steps.unknown.reply.x}}\"", "null");
    expect_render("\"{{steps.reserve_inventory.reply.nope}}\"", "null");
    expect_render("\"{{input.orderId.deeper}}\"", "null");
    expect_render("\"{{input.items.7}}\"", "null");
    expect_render("\"{{input.items.x}}\"", "null");
    expect_render("\"{{nowhere}}\"", "null");
    expect_render("\"a{{input.missing}}b\"", "\"ab\"");
    expect_render("{\"r\": \"{{steps.later.reply.id}}\"}", "{\"r\":null}");
}

Test(template, malformed_placeholders_fail)
{
    expect_render_error("\"{{\"", "unclosed");
    expect_render_error("\"abc {{input.x\"", "unclosed");
    expect_render_error("\"{{}}\"", "empty");
    expect_render_error("\"{{   }}\"", "empty");
    expect_render_error("\"ok {{input.orderId}} then {{\"", "unclosed");
    expect_render_error("\"{{input..x}}\"", "malformed");
    expect_render_error("\"{{.x}}\"", "malformed");
    expect_render_error("\"{{a{{b}}\"", "malformed");
    /* The error names where in the template the bad string is. */
    expect_render_error("{\"a\": [1, {\"b\": \"{{}}\"}]}", ".a[1].b");
}

Test(template, render_text)
{
    struct {
        const char *tmpl, *expected;
    } cases[] = {
        {"\"{{input.orderId}}\"", "o-1"},
        {"\"{{input.count}}\"", "3"},
        {"\"{{input.missing}}\"", ""},
        {"\"{{input.nothing}}\"", ""},
        {"\"{{input.customer}}\"", "{\"id\":\"c-9\",\"tags\":[\"x\"]}"},
        {"\"order-{{input.orderId}}-{{input.count}}\"", "order-o-1-3"},
        {"\"plain\"", "plain"},
        {"12", "12"},
        {"null", ""},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        cJSON *tmpl = cJSON_Parse(cases[i].tmpl);
        cr_assert_not_null(tmpl);
        char *out = NULL;
        char err[128] = "";
        cr_assert_eq(template_render_text(tmpl, ctx, &out, err, sizeof(err)), 0, "%s: %s",
                     cases[i].tmpl, err);
        cr_expect_str_eq(out, cases[i].expected, "template %s", cases[i].tmpl);
        free(out);
        cJSON_Delete(tmpl);
    }
    cJSON *bad = cJSON_CreateString("{{x");
    char *out = (char *)1;
    char err[128] = "";
    cr_expect_eq(template_render_text(bad, ctx, &out, err, sizeof(err)), -1);
    cr_expect_null(out);
    cr_expect_neq(err[0], '\0');
    cJSON_Delete(bad);
}

/* Collects what template_foreach_path reports as "path@json_path" / "!message@json_path". */
struct seen {
    char items[32][512];
    int count;
};

static void on_path(const char *path, const char *json_path, void *arg)
{
    struct seen *seen = arg;
    cr_assert_lt(seen->count, 32);
    snprintf(seen->items[seen->count++], sizeof(seen->items[0]), "%s@%s", path, json_path);
}

static void on_bad(const char *message, const char *json_path, void *arg)
{
    struct seen *seen = arg;
    cr_assert_lt(seen->count, 32);
    snprintf(seen->items[seen->count++], sizeof(seen->items[0]), "!%s@%s", message, json_path);
}

Test(template, foreach_path_reports_every_path)
{
    cJSON *tmpl = cJSON_Parse("{\"orderId\": \"{{input.orderId}}\", \"items\": [1, "
                              "\"{{ input.items }}\", {\"r\": \"x {{steps.a.reply.id}} y "
                              "{{saga.id}}\"}], \"plain\": \"text\", \"n\": 4}");
    cr_assert_not_null(tmpl);
    struct seen seen = {0};
    cr_assert_eq(template_foreach_path(tmpl, on_path, on_bad, &seen), 0);
    cr_assert_eq(seen.count, 4);
    cr_expect_str_eq(seen.items[0], "input.orderId@.orderId");
    cr_expect_str_eq(seen.items[1], "input.items@.items[1]");
    cr_expect_str_eq(seen.items[2], "steps.a.reply.id@.items[2].r");
    cr_expect_str_eq(seen.items[3], "saga.id@.items[2].r");
    cJSON_Delete(tmpl);

    cJSON *top = cJSON_CreateString("{{input.key}}");
    struct seen seen2 = {0};
    cr_assert_eq(template_foreach_path(top, on_path, NULL, &seen2), 0);
    cr_assert_eq(seen2.count, 1);
    cr_expect_str_eq(seen2.items[0], "input.key@");
    cJSON_Delete(top);

    cr_expect_eq(template_foreach_path(NULL, on_path, on_bad, &seen2), 0);
}

Test(template, foreach_path_reports_malformed)
{
    cJSON *tmpl = cJSON_Parse("{\"a\": \"{{}}\", \"b\": [\"ok {{input.x}}\", \"{{input.y\"],"
                              " \"c\": \"{{input..z}} and {{input.w}}\"}");
    cr_assert_not_null(tmpl);
    struct seen seen = {0};
    cr_assert_eq(template_foreach_path(tmpl, on_path, on_bad, &seen), -1);
    cr_assert_eq(seen.count, 5);
    cr_expect(strncmp(seen.items[0], "!empty", 6) == 0, "%s", seen.items[0]);
    cr_expect(strstr(seen.items[0], "@.a") != NULL, "%s", seen.items[0]);
    cr_expect_str_eq(seen.items[1], "input.x@.b[0]");
    cr_expect(strncmp(seen.items[2], "!unclosed", 9) == 0, "%s", seen.items[2]);
    cr_expect(strstr(seen.items[2], "@.b[1]") != NULL, "%s", seen.items[2]);
    cr_expect(strncmp(seen.items[3], "!malformed", 10) == 0, "%s", seen.items[3]);
    cr_expect(strstr(seen.items[3], "@.c") != NULL, "%s", seen.items[3]);
    cr_expect_str_eq(seen.items[4], "input.w@.c");

    /* Without bad_cb the result still says so. */
    cr_expect_eq(template_foreach_path(tmpl, NULL, NULL, NULL), -1);
    cJSON_Delete(tmpl);
}

/* template_render_json and template_render_text make their text without the rendered value:
 * it must be the same bytes as printing that value, and the same errors. */
static const char *const same_bytes_templates[] = {
    "{\"orderId\": \"{{input.orderId}}\", \"items\": \"{{input.items}}\", \"amount\": "
    "\"{{input.amount}}\", \"flag\": \"{{input.flag}}\", \"nothing\": \"{{input.nothing}}\", "
    "\"missing\": \"{{input.nope.deeper}}\", \"customer\": \"{{input.customer}}\"}",
    "\"order {{input.orderId}} of {{ input.count }}: {{input.items}} {{input.customer.tags}} "
    "[{{input.nothing}}|{{input.nope}}] by {{saga.name}}/{{saga.id}}\"",
    "[1, -2.5, 3e-9, 1e300, 12345678901234567890, true, false, null, \"plain\", [], {}, "
    "[[{\"k\": [\"{{input.items.1.sku}}\"]}]]]",
    "{\"esc\\\"aped\\n\\u0001key\": \"q\\\" b\\\\ n\\n r\\r t\\t b\\b f\\f \\u0001\\u001f "
    "del\\u007f "
    "é 😀 {{input.orderId}}\", \"plain\\t\": \"no placeholder \\\" \\u0002\"}",
    "\"{{steps.reserve_inventory.reply}}\"",
    "\"{{steps.reserve_inventory.reply.lines}}\"",
    "\"{{input.nothing}}\"",
    "\"{{input.nope}}\"",
    "\"{{saga.correlation_id}}\"",
    "\"no placeholder at all\"",
    "42",
    "null",
    "{}",
    "{\"a\": \"{{input.orderId}} {{\"}",
    "{\"a\": [1, {\"b\": \"{{}}\"}]}",
    "{\"a\": \"{{input..x}}\"}",
    "\"x {{input.orderId}} {{.bad}}\"",
};

Test(template, render_json_writes_what_printing_the_value_writes)
{
    for (size_t i = 0; i < sizeof(same_bytes_templates) / sizeof(same_bytes_templates[0]); i++) {
        cJSON *tmpl = cJSON_Parse(same_bytes_templates[i]);
        cr_assert_not_null(tmpl, "bad test template %s", same_bytes_templates[i]);
        cJSON *v = NULL;
        char err1[256] = "", err2[256] = "";
        int rc1 = template_render(tmpl, ctx, &v, err1, sizeof(err1));
        char *want = rc1 == 0 ? cJSON_PrintUnformatted(v) : NULL;
        char *got = NULL;
        int rc2 = template_render_json(tmpl, ctx, &got, err2, sizeof(err2));
        cr_assert_eq(rc2, rc1, "%s: %d against %d (%s)", same_bytes_templates[i], rc2, rc1, err2);
        if (rc1 == 0)
            cr_assert_str_eq(got, want, "%s", same_bytes_templates[i]);
        else
            cr_assert_str_eq(err2, err1, "%s", same_bytes_templates[i]);
        free(got);
        free(want);
        cJSON_Delete(v);
        cJSON_Delete(tmpl);
    }
    char *got = (char *)1;
    char err[256] = "";
    cr_assert_eq(template_render_json(NULL, ctx, &got, err, sizeof(err)), -1);
    cr_assert_null(got);
    cr_assert_str_eq(err, "no template");
}

/* render_text of a string template is made directly too: as from the rendered value. */
Test(template, render_text_of_a_string_is_the_rendered_value_as_text)
{
    for (size_t i = 0; i < sizeof(same_bytes_templates) / sizeof(same_bytes_templates[0]); i++) {
        cJSON *tmpl = cJSON_Parse(same_bytes_templates[i]);
        cr_assert_not_null(tmpl);
        cJSON *v = NULL;
        char err1[256] = "", err2[256] = "";
        int rc1 = template_render(tmpl, ctx, &v, err1, sizeof(err1));
        char *want = NULL;
        if (rc1 == 0)
            want = cJSON_IsString(v) ? strdup(v->valuestring)
                   : cJSON_IsNull(v) ? strdup("")
                                     : cJSON_PrintUnformatted(v);
        char *got = NULL;
        int rc2 = template_render_text(tmpl, ctx, &got, err2, sizeof(err2));
        cr_assert_eq(rc2, rc1, "%s", same_bytes_templates[i]);
        if (rc1 == 0)
            cr_assert_str_eq(got, want, "%s", same_bytes_templates[i]);
        else
            cr_assert_str_eq(err2, err1, "%s", same_bytes_templates[i]);
        free(got);
        free(want);
        cJSON_Delete(v);
        cJSON_Delete(tmpl);
    }
}

/* A value larger than the first room the text is printed into (and than cJSON's own first
 * buffer) comes out whole. */
Test(template, render_json_of_a_large_value)
{
    cJSON *big = cJSON_CreateArray();
    for (int i = 0; i < 3000; i++)
        cJSON_AddItemToArray(big, cJSON_CreateNumber(i * 1.25));
    cJSON_AddItemToObject(cJSON_GetObjectItemCaseSensitive(ctx, "input"), "big", big);
    cJSON *tmpl = cJSON_Parse("{\"a\": \"{{input.big}}\", \"b\": \"x {{input.big}}\"}");
    cJSON *v = NULL;
    char err[256] = "";
    cr_assert_eq(template_render(tmpl, ctx, &v, err, sizeof(err)), 0);
    char *want = cJSON_PrintUnformatted(v);
    char *got = NULL;
    cr_assert_eq(template_render_json(tmpl, ctx, &got, err, sizeof(err)), 0);
    cr_assert_gt(strlen(got), 20000);
    cr_assert_str_eq(got, want);
    free(got);
    free(want);
    cJSON_Delete(v);
    cJSON_Delete(tmpl);
}

/* template_print_json writes what cJSON_PrintUnformatted writes, numbers above all (integers
 * by hand, the others as cJSON does: 15 digits unless they do not read back, then 17). */
static void check_print(const cJSON *v)
{
    char *want = cJSON_PrintUnformatted(v);
    char *buf = NULL;
    size_t len = 0, cap = 0;
    int rc = template_print_json(&buf, &len, &cap, v);
    if (!want) {
        cr_assert_eq(rc, -1, "cJSON prints nothing, template_print_json printed %s", buf);
        cr_assert_eq(len, 0);
    } else {
        cr_assert_eq(rc, 0, "cannot print %s", want);
        cr_assert_str_eq(buf, want);
        cr_assert_eq(len, strlen(want));
    }
    free(buf);
    free(want);
}

Test(template, print_json_writes_what_cjson_prints)
{
    const double numbers[] = {
        0.0,
        -0.0,
        1,
        -1,
        42,
        2147483647.0,
        2147483648.0,
        -2147483648.0,
        -2147483649.0,
        1e300,
        -1e-300,
        5e-324,
        1.5,
        0.1,
        1.0 / 3.0,
        2.0 / 3.0,
        99.99,
        123456789012345678.0,
        12345678901234567890.0,
        1.7976931348623157e308,
        3e-7,
        /* the integer fast path's bounds (integral and below 1e15) */
        1e15,
        -1e15,
        999999999999999.0,
        -999999999999999.0,
        999999999999999.5,
        4503599627370496.0, /* 2^52 */
        9007199254740992.0, /* 2^53 */
        9007199254740993.0, /* 2^53 + 1: is 2^53 as a double */
        -9007199254740992.0,
        9223372036854775808.0, /* 2^63 */
        -9223372036854775808.0,
        (double)NAN,
        (double)INFINITY,
        -(double)INFINITY,
    };
    for (size_t i = 0; i < sizeof(numbers) / sizeof(numbers[0]); i++) {
        cJSON *n = cJSON_CreateNumber(numbers[i]);
        check_print(n);
        cJSON_Delete(n);
    }
    /* The fast path's bounds, written out (2^53 in 15 digits: reads back within cJSON's
     * relative DBL_EPSILON). */
    const struct {
        double d;
        const char *text;
    } exact[] = {{-0.0, "-0"},
                 {999999999999999.0, "999999999999999"},
                 {-999999999999999.0, "-999999999999999"},
                 {1e15, "1e+15"},
                 {-1e15, "-1e+15"},
                 {4503599627370496.0, "4503599627370496"},
                 {9007199254740993.0, "9.00719925474099e+15"}};
    for (size_t i = 0; i < sizeof(exact) / sizeof(exact[0]); i++) {
        cJSON *n = cJSON_CreateNumber(exact[i].d);
        char *buf = NULL;
        size_t len = 0, cap = 0;
        cr_assert_eq(template_print_json(&buf, &len, &cap, n), 0);
        cr_assert_str_eq(buf, exact[i].text);
        free(buf);
        cJSON_Delete(n);
    }
    /* Random doubles of every magnitude. */
    uint64_t x = 88172645463325252ULL;
    for (int i = 0; i < 20000; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        double d;
        memcpy(&d, &x, sizeof(d));
        if (i % 3 == 0)
            d = (double)(int64_t)(x % 2000000) / 1000.0;
        cJSON *n = cJSON_CreateNumber(d);
        check_print(n);
        cJSON_Delete(n);
    }
    const char *docs[] = {
        "null",
        "true",
        "false",
        "\"\"",
        "[]",
        "{}",
        "[[], {}, [{}]]",
        "{\"q\\\" b\\\\ n\\n\": \"r\\r t\\t b\\b f\\f \\u0001\\u001f del\\u007f é 😀\"}",
        "{\"a\": [1, 2.5, -3e-7, null, true, {\"b\": {\"c\": []}}], \"d\": \"x\"}"};
    for (size_t i = 0; i < sizeof(docs) / sizeof(docs[0]); i++) {
        cJSON *v = cJSON_Parse(docs[i]);
        cr_assert_not_null(v, "%s", docs[i]);
        check_print(v);
        cJSON *ref = cJSON_IsObject(v)  ? cJSON_CreateObjectReference(v->child)
                     : cJSON_IsArray(v) ? cJSON_CreateArrayReference(v->child)
                                        : NULL;
        if (ref) {
            check_print(ref);
            cJSON_Delete(ref);
        }
        cJSON_Delete(v);
    }
    cJSON *raw = cJSON_CreateRaw("{\"raw\": 1}");
    check_print(raw);
    cJSON_Delete(raw);
    cJSON invalid;
    memset(&invalid, 0, sizeof(invalid));
    check_print(&invalid);
    /* Appended after what the text holds; a failure leaves it as it was. */
    char *buf = strdup("prefix:");
    size_t len = 7, cap = 8;
    cJSON *arr = cJSON_Parse("[1,\"two\"]");
    cr_assert_eq(template_print_json(&buf, &len, &cap, arr), 0);
    cr_assert_str_eq(buf, "prefix:[1,\"two\"]");
    cJSON *bad = cJSON_CreateNull();
    bad->type = cJSON_Invalid; /* cJSON prints nothing for it */
    cJSON_AddItemToArray(arr, bad);
    check_print(arr);
    cr_assert_eq(template_print_json(&buf, &len, &cap, arr), -1);
    cr_assert_eq(len, 16);
    cr_assert_str_eq(buf, "prefix:[1,\"two\"]");
    cJSON_Delete(arr);
    free(buf);
    /* A failure on a full buffer (*len == *cap) writes nothing past its end; with room, the
     * text is cut back to *len. (The buffer is larger than the function is told.) */
    buf = malloc(16);
    cr_assert_not_null(buf);
    memcpy(buf, "12345678XXXXXXX", 16);
    len = 8;
    cap = 8;
    cr_assert_eq(template_print_json(&buf, &len, &cap, &invalid), -1);
    cr_assert_eq(template_print_json(&buf, &len, &cap, NULL), -1);
    cr_assert_eq(len, 8);
    cr_assert_eq(cap, 8);
    cr_assert_eq(buf[8], 'X', "written past the end");
    cap = 12;
    cr_assert_eq(template_print_json(&buf, &len, &cap, &invalid), -1);
    cr_assert_eq(buf[8], '\0');
    cr_assert_eq(buf[9], 'X');
    free(buf);
}

/* template_print_string scans 8 bytes at a time: every byte value, at every place of strings
 * of 1 to 24 bytes (and next to another escape), comes out as cJSON escapes it. */
Test(template, print_string_escapes_every_byte_as_cjson)
{
    char s[32];
    for (size_t len = 1; len <= 24; len++) {
        for (size_t at = 0; at < len; at++) {
            for (int b = 1; b < 256; b++) {
                memset(s, 'a', len);
                s[len] = '\0';
                s[at] = (char)b;
                if (at + 1 < len && b % 7 == 0)
                    s[at + 1] = (char)(b % 3 ? 0x80 + b % 64 : '"'); /* a neighbour too */
                cJSON *v = cJSON_CreateString(s);
                char *want = cJSON_PrintUnformatted(v);
                char *buf = NULL;
                size_t blen = 0, cap = 0;
                cr_assert_eq(template_print_string(&buf, &blen, &cap, s), 0);
                cr_assert_str_eq(buf, want, "byte 0x%02x at %zu of %zu", b, at, len);
                cr_assert_eq(blen, strlen(want));
                free(buf);
                free(want);
                cJSON_Delete(v);
            }
        }
    }
}
