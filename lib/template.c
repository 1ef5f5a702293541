#include "template.h"

#include <ctype.h>
#include <float.h>
#include <locale.h>
#include <math.h>
#include <limits.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* One "{{...}}" found while scanning a string. */
struct placeholder {
    size_t start;     /* offset of the first '{' */
    size_t end;       /* offset just after the closing "}}" */
    const char *path; /* into the scanned string, not NUL-terminated */
    size_t path_len;  /* surrounding whitespace trimmed */
};

enum scan_result { SCAN_DONE, SCAN_FOUND, SCAN_BAD };

/* Finds the next placeholder at or after *pos. On SCAN_FOUND fills ph and moves *pos past it.
 * On SCAN_BAD writes a message and moves *pos past the malformed text, so that a caller
 * that lists every problem can go on scanning. */
static enum scan_result scan_next(const char *s, size_t *pos, struct placeholder *ph, char *msg,
                                  size_t msglen)
{
    const char *open = strstr(s + *pos, "{{");
    if (!open)
        return SCAN_DONE;
    const char *body = open + 2;
    const char *close = strstr(body, "}}");
    if (!close) {
        snprintf(msg, msglen, "unclosed \"{{\" in \"%s\"", s);
        *pos = strlen(s);
        return SCAN_BAD;
    }
    ph->start = (size_t)(open - s);
    ph->end = (size_t)(close - s) + 2;
    *pos = ph->end;

    const char *b = body, *e = close;
    while (b < e && isspace((unsigned char)*b))
        b++;
    while (e > b && isspace((unsigned char)e[-1]))
        e--;
    ph->path = b;
    ph->path_len = (size_t)(e - b);
    if (ph->path_len == 0) {
        snprintf(msg, msglen, "empty placeholder \"{{}}\" in \"%s\"", s);
        return SCAN_BAD;
    }
    /* "{{a{{b}}" or an empty segment ("input..x", ".x", "x.") cannot name a value. */
    bool bad = ph->path[0] == '.' || ph->path[ph->path_len - 1] == '.';
    for (size_t i = 0; i < ph->path_len && !bad; i++) {
        char c = ph->path[i];
        if (c == '{' || c == '}' || (c == '.' && ph->path[i + 1] == '.'))
            bad = true;
    }
    if (bad) {
        snprintf(msg, msglen, "malformed placeholder \"{{%.*s}}\" in \"%s\"", (int)ph->path_len,
                 ph->path, s);
        return SCAN_BAD;
    }
    return SCAN_FOUND;
}

/* The value at a dot-separated path, or NULL. Digits index arrays ("input.items.0"). */
static const cJSON *lookup(const cJSON *ctx, const char *path, size_t len)
{
    const cJSON *cur = ctx;
    size_t i = 0;
    char seg[256];

    while (cur && i < len) {
        size_t j = i;
        while (j < len && path[j] != '.')
            j++;
        size_t n = j - i;
        if (n >= sizeof(seg))
            return NULL; /* no key that long in any sane payload: treat as missing */
        memcpy(seg, path + i, n);
        seg[n] = '\0';
        if (cJSON_IsObject(cur)) {
            cur = cJSON_GetObjectItemCaseSensitive(cur, seg);
        } else if (cJSON_IsArray(cur)) {
            char *endp = NULL;
            long idx = strtol(seg, &endp, 10);
            if (n == 0 || *endp != '\0' || !isdigit((unsigned char)seg[0]))
                return NULL;
            cur = cJSON_GetArrayItem(cur, (int)idx);
        } else {
            return NULL;
        }
        i = j + 1;
    }
    return cur;
}

/* A growable text buffer for interpolation. */
struct text {
    char *buf;
    size_t len, cap;
};

static int text_append(struct text *t, const char *s, size_t n)
{
    if (t->len + n + 1 > t->cap) {
        size_t cap = t->cap ? t->cap : 64;
        while (cap < t->len + n + 1)
            cap *= 2;
        char *buf = realloc(t->buf, cap);
        if (!buf)
            return -1;
        t->buf = buf;
        t->cap = cap;
    }
    memcpy(t->buf + t->len, s, n);
    t->len += n;
    t->buf[t->len] = '\0';
    return 0;
}

/* Whether any of the 8 bytes of x is below 0x20, '"' or '\\' (the bytes a JSON string must
 * escape): the usual word-at-a-time tests, which never miss one (a byte of 0x80 or more may
 * give a false alarm: the word is then looked at byte by byte). */
static bool word_needs_escape(uint64_t x)
{
    const uint64_t ones = 0x0101010101010101ULL, highs = 0x8080808080808080ULL;
    uint64_t quote = x ^ (ones * '"'), backslash = x ^ (ones * '\\');
    uint64_t below = (x - ones * 0x20) & ~x & highs;
    return (below | ((quote - ones) & ~quote & highs) |
            ((backslash - ones) & ~backslash & highs)) != 0;
}

static bool byte_needs_escape(unsigned char c)
{
    return c < 0x20 || c == '"' || c == '\\';
}

/* Appends s as a JSON string, escaped as cJSON prints one: '"', '\\' and the control
 * characters (\b \f \n \r \t by name, the others as \u00xx), every other byte as it is.
 * Scanned 8 bytes at a time (this scan, over every string of every command and document, was
 * the largest single part of writing them). */
static int text_append_json_string(struct text *t, const char *s)
{
    static const char hex[] = "0123456789abcdef";
    size_t n = strlen(s), i = 0, run = 0;
    if (text_append(t, "\"", 1) < 0)
        return -1;
    while (i < n) {
        uint64_t x;
        while (i + 8 <= n && (memcpy(&x, s + i, 8), !word_needs_escape(x)))
            i += 8;
        size_t stop = i + 8 < n ? i + 8 : n;
        while (i < stop && !byte_needs_escape((unsigned char)s[i]))
            i++;
        if (i == stop)
            continue;
        unsigned char c = (unsigned char)s[i];
        char esc[6] = {'\\', 0, '0', '0', hex[c >> 4], hex[c & 15]};
        size_t len = 2;
        switch (c) {
        case '"':
            esc[1] = '"';
            break;
        case '\\':
            esc[1] = '\\';
            break;
        case '\b':
            esc[1] = 'b';
            break;
        case '\f':
            esc[1] = 'f';
            break;
        case '\n':
            esc[1] = 'n';
            break;
        case '\r':
            esc[1] = 'r';
            break;
        case '\t':
            esc[1] = 't';
            break;
        default:
            esc[1] = 'u';
            len = 6;
        }
        if (text_append(t, s + run, i - run) < 0 || text_append(t, esc, len) < 0)
            return -1;
        run = ++i;
    }
    if (text_append(t, s + run, n - run) < 0)
        return -1;
    return text_append(t, "\"", 1);
}

int template_print_string(char **buf, size_t *len, size_t *cap, const char *s)
{
    struct text t = {*buf, *len, *cap};
    int rc = text_append_json_string(&t, s);
    *buf = t.buf;
    *cap = t.cap;
    if (rc == 0)
        *len = t.len;
    else if (t.buf && *len < t.cap)
        t.buf[*len] = '\0'; /* the text cut back; not past the end of a full buffer */
    return rc;
}

/* A number as cJSON 1.7.15's print_number writes it: null for NaN and infinities, else with 15
 * significant digits ("%1.15g") when that reads back the same (within DBL_EPSILON), else 17;
 * the locale's decimal point written as '.'. An integral value below 1e15 comes out of
 * "%1.15g" as its digits (-0 included) and reads back exactly: those (most numbers in the
 * orchestrator's documents) are written without printf. */
static int text_append_number(struct text *t, const cJSON *v)
{
    double d = v->valuedouble;
    char num[32];
    int n;
    if (isnan(d) || isinf(d))
        return text_append(t, "null", 4);
    if (fabs(d) < 1e15 && d == trunc(d)) {
        size_t k = sizeof(num);
        int64_t i = (int64_t)d;
        uint64_t u = i < 0 ? 0ULL - (uint64_t)i : (uint64_t)i;
        do {
            num[--k] = (char)('0' + u % 10);
            u /= 10;
        } while (u);
        if (signbit(d))
            num[--k] = '-';
        return text_append(t, num + k, sizeof(num) - k);
    }
    n = snprintf(num, sizeof(num), "%1.15g", d);
    double back = strtod(num, NULL);
    double max = fabs(back) > fabs(d) ? fabs(back) : fabs(d);
    if (!(fabs(back - d) <= max * DBL_EPSILON))
        n = snprintf(num, sizeof(num), "%1.17g", d);
    if (n < 0 || n > 25) /* cJSON's buffer holds 25 characters */
        return -1;
    char point = localeconv()->decimal_point[0];
    for (int i = 0; i < n; i++)
        if (num[i] == point)
            num[i] = '.';
    return text_append(t, num, (size_t)n);
}

/* Appends v as cJSON_PrintUnformatted writes it (-1 where that returns NULL: out of memory, an
 * invalid item or a raw one without text). (cJSON's print allocates, grows and frees a buffer
 * per call, and prints every number through sprintf and sscanf: a visible share of the
 * orchestrator's CPU.) */
static int text_append_json(struct text *t, const cJSON *v)
{
    switch (v->type & 0xFF) {
    case cJSON_NULL:
        return text_append(t, "null", 4);
    case cJSON_False:
        return text_append(t, "false", 5);
    case cJSON_True:
        return text_append(t, "true", 4);
    case cJSON_Number:
        return text_append_number(t, v);
    case cJSON_Raw:
        if (!v->valuestring)
            return -1;
        return text_append(t, v->valuestring, strlen(v->valuestring));
    case cJSON_String:
        return text_append_json_string(t, v->valuestring ? v->valuestring : "");
    case cJSON_Array:
    case cJSON_Object: {
        bool is_array = (v->type & 0xFF) == cJSON_Array;
        if (text_append(t, is_array ? "[" : "{", 1) < 0)
            return -1;
        for (const cJSON *c = v->child; c; c = c->next) {
            if (c != v->child && text_append(t, ",", 1) < 0)
                return -1;
            if (!is_array && (text_append_json_string(t, c->string ? c->string : "") < 0 ||
                              text_append(t, ":", 1) < 0))
                return -1;
            if (text_append_json(t, c) < 0)
                return -1;
        }
        return text_append(t, is_array ? "]" : "}", 1);
    }
    default:
        return -1;
    }
}

int template_print_json(char **buf, size_t *len, size_t *cap, const cJSON *v)
{
    struct text t = {*buf, *len, *cap};
    int rc = v ? text_append_json(&t, v) : -1;
    if (rc == 0 && !t.buf)
        rc = text_append(&t, "", 0);
    *buf = t.buf;
    *cap = t.cap;
    if (rc == 0)
        *len = t.len;
    else if (t.buf && *len < t.cap)
        t.buf[*len] = '\0'; /* the text cut back; not past the end of a full buffer */
    return rc;
}

/* Appends a value as interpolated text: strings raw, null or missing as nothing, others as
 * compact JSON. */
static int text_append_value(struct text *t, const cJSON *v)
{
    if (!v || cJSON_IsNull(v))
        return text_append(t, "", 0);
    if (cJSON_IsString(v))
        return text_append(t, v->valuestring, strlen(v->valuestring));
    return text_append_json(t, v);
}

static void set_err(char *err, size_t errlen, const char *json_path, const char *msg)
{
    if (!err || errlen == 0)
        return;
    if (json_path[0])
        snprintf(err, errlen, "%s: %s", json_path, msg);
    else
        snprintf(err, errlen, "%s", msg);
}

/* Interpolates string s, whose first placeholder ph was found with scan_next(s, pos, ...),
 * into t (NUL-terminated). Returns 0, or -1 with err set (a malformed placeholder further on,
 * or out of memory). */
static int interpolate(const char *s, size_t pos, struct placeholder ph, const cJSON *ctx,
                       struct text *t, const char *json_path, char *err, size_t errlen)
{
    char msg[512];
    size_t copied = 0;
    for (;;) {
        if (text_append(t, s + copied, ph.start - copied) < 0 ||
            text_append_value(t, lookup(ctx, ph.path, ph.path_len)) < 0)
            goto oom;
        copied = ph.end;
        enum scan_result r = scan_next(s, &pos, &ph, msg, sizeof(msg));
        if (r == SCAN_DONE)
            break;
        if (r == SCAN_BAD) {
            set_err(err, errlen, json_path, msg);
            return -1;
        }
    }
    if (text_append(t, s + copied, strlen(s + copied)) < 0)
        goto oom;
    return 0;
oom:
    set_err(err, errlen, json_path, "out of memory");
    return -1;
}

/* Renders one string. */
static cJSON *render_string(const char *s, const cJSON *ctx, const char *json_path, char *err,
                            size_t errlen)
{
    char msg[512];
    struct placeholder ph;
    size_t pos = 0;

    enum scan_result r = scan_next(s, &pos, &ph, msg, sizeof(msg));
    if (r == SCAN_DONE)
        return cJSON_CreateString(s);
    if (r == SCAN_BAD) {
        set_err(err, errlen, json_path, msg);
        return NULL;
    }
    if (ph.start == 0 && s[ph.end] == '\0') {
        /* Exact placeholder: the value itself, type kept. */
        const cJSON *v = lookup(ctx, ph.path, ph.path_len);
        cJSON *out = v ? cJSON_Duplicate(v, 1) : cJSON_CreateNull();
        if (!out)
            set_err(err, errlen, json_path, "out of memory");
        return out;
    }

    struct text t = {0};
    cJSON *out = NULL;
    if (interpolate(s, pos, ph, ctx, &t, json_path, err, errlen) == 0) {
        out = cJSON_CreateString(t.buf);
        if (!out)
            set_err(err, errlen, json_path, "out of memory");
    }
    free(t.buf);
    return out;
}

/* json_path is a buffer of PATH_MAX-ish size that the recursion extends and restores. */
#define JSON_PATH_MAX 1024

/* Appends ".<key>" (is_array false) or "[<index>]" to json_path, cut to fit as snprintf
 * would; *saved gets the length to restore. (Called for every value rendered: without
 * vsnprintf it costs a copy.) */
static void path_push(char *json_path, size_t *saved, bool is_array, const char *key, int index)
{
    size_t len = strlen(json_path);
    *saved = len;
    char num[16];
    const char *parts[3];
    size_t lens[3];
    if (is_array) {
        size_t n = sizeof(num);
        unsigned u = index < 0 ? 0U - (unsigned)index : (unsigned)index;
        do {
            num[--n] = (char)('0' + u % 10);
            u /= 10;
        } while (u);
        if (index < 0)
            num[--n] = '-';
        parts[0] = "[";
        lens[0] = 1;
        parts[1] = num + n;
        lens[1] = sizeof(num) - n;
        parts[2] = "]";
        lens[2] = 1;
    } else {
        parts[0] = ".";
        lens[0] = 1;
        parts[1] = key ? key : "(null)";
        lens[1] = strlen(parts[1]);
        parts[2] = "";
        lens[2] = 0;
    }
    for (int i = 0; i < 3; i++) {
        size_t n = lens[i] < JSON_PATH_MAX - 1 - len ? lens[i] : JSON_PATH_MAX - 1 - len;
        memcpy(json_path + len, parts[i], n);
        len += n;
    }
    json_path[len] = '\0';
}

static cJSON *render_value(const cJSON *tmpl, const cJSON *ctx, char *json_path, char *err,
                           size_t errlen)
{
    if (cJSON_IsString(tmpl))
        return render_string(tmpl->valuestring, ctx, json_path, err, errlen);
    if (!cJSON_IsArray(tmpl) && !cJSON_IsObject(tmpl)) {
        cJSON *out = cJSON_Duplicate(tmpl, 0);
        if (!out)
            set_err(err, errlen, json_path, "out of memory");
        return out;
    }

    bool is_array = cJSON_IsArray(tmpl);
    cJSON *out = is_array ? cJSON_CreateArray() : cJSON_CreateObject();
    if (!out) {
        set_err(err, errlen, json_path, "out of memory");
        return NULL;
    }
    int i = 0;
    for (const cJSON *item = tmpl->child; item; item = item->next, i++) {
        size_t saved;
        path_push(json_path, &saved, is_array, item->string, i);
        cJSON *v = render_value(item, ctx, json_path, err, errlen);
        json_path[saved] = '\0';
        if (!v)
            goto fail;
        if (is_array) {
            if (!cJSON_AddItemToArray(out, v)) {
                cJSON_Delete(v);
                set_err(err, errlen, json_path, "out of memory");
                goto fail;
            }
        } else if (!cJSON_AddItemToObject(out, item->string, v)) {
            cJSON_Delete(v);
            set_err(err, errlen, json_path, "out of memory");
            goto fail;
        }
    }
    return out;
fail:
    cJSON_Delete(out);
    return NULL;
}

int template_render(const cJSON *tmpl, const cJSON *ctx, cJSON **out, char *err, size_t errlen)
{
    char json_path[JSON_PATH_MAX] = "";

    *out = NULL;
    if (!tmpl) {
        set_err(err, errlen, json_path, "no template");
        return -1;
    }
    *out = render_value(tmpl, ctx, json_path, err, errlen);
    return *out ? 0 : -1;
}

/* Renders tmpl as JSON text into t: what cJSON_PrintUnformatted writes for the value
 * render_value makes, without making it. */
static int render_json(const cJSON *tmpl, const cJSON *ctx, struct text *t, char *json_path,
                       char *err, size_t errlen)
{
    if (cJSON_IsString(tmpl)) {
        const char *s = tmpl->valuestring;
        char msg[512];
        struct placeholder ph;
        size_t pos = 0;
        enum scan_result r = scan_next(s, &pos, &ph, msg, sizeof(msg));
        if (r == SCAN_BAD) {
            set_err(err, errlen, json_path, msg);
            return -1;
        }
        int rc;
        if (r == SCAN_DONE) {
            rc = text_append_json_string(t, s);
        } else if (ph.start == 0 && s[ph.end] == '\0') {
            /* Exact placeholder: the value itself, type kept. */
            const cJSON *v = lookup(ctx, ph.path, ph.path_len);
            rc = v ? text_append_json(t, v) : text_append(t, "null", 4);
        } else {
            struct text it = {0};
            if (interpolate(s, pos, ph, ctx, &it, json_path, err, errlen) < 0) {
                free(it.buf);
                return -1;
            }
            rc = text_append_json_string(t, it.buf);
            free(it.buf);
        }
        if (rc < 0)
            set_err(err, errlen, json_path, "out of memory");
        return rc;
    }
    if (!cJSON_IsArray(tmpl) && !cJSON_IsObject(tmpl)) {
        if (text_append_json(t, tmpl) < 0) {
            set_err(err, errlen, json_path, "out of memory");
            return -1;
        }
        return 0;
    }
    bool is_array = cJSON_IsArray(tmpl);
    if (text_append(t, is_array ? "[" : "{", 1) < 0)
        goto oom;
    int i = 0;
    for (const cJSON *item = tmpl->child; item; item = item->next, i++) {
        if (i > 0 && text_append(t, ",", 1) < 0)
            goto oom;
        if (!is_array && (text_append_json_string(t, item->string ? item->string : "") < 0 ||
                          text_append(t, ":", 1) < 0))
            goto oom;
        size_t saved;
        path_push(json_path, &saved, is_array, item->string, i);
        int rc = render_json(item, ctx, t, json_path, err, errlen);
        json_path[saved] = '\0';
        if (rc < 0)
            return -1;
    }
    if (text_append(t, is_array ? "]" : "}", 1) < 0)
        goto oom;
    return 0;
oom:
    set_err(err, errlen, json_path, "out of memory");
    return -1;
}

int template_render_json(const cJSON *tmpl, const cJSON *ctx, char **out, char *err, size_t errlen)
{
    char json_path[JSON_PATH_MAX] = "";
    struct text t = {0};

    *out = NULL;
    if (!tmpl) {
        set_err(err, errlen, json_path, "no template");
        return -1;
    }
    if (render_json(tmpl, ctx, &t, json_path, err, errlen) < 0) {
        free(t.buf);
        return -1;
    }
    *out = t.buf;
    return 0;
}

int template_render_text(const cJSON *tmpl, const cJSON *ctx, char **out, char *err, size_t errlen)
{
    cJSON *v = NULL;

    *out = NULL;
    /* A string (every key template): its text made directly, as below it comes out of the
     * rendered value. */
    if (cJSON_IsString(tmpl)) {
        const char *s = tmpl->valuestring;
        char msg[512];
        struct placeholder ph;
        size_t pos = 0;
        enum scan_result r = scan_next(s, &pos, &ph, msg, sizeof(msg));
        if (r == SCAN_BAD) {
            set_err(err, errlen, "", msg);
            return -1;
        }
        if (r == SCAN_DONE) {
            *out = strdup(s);
        } else if (ph.start == 0 && s[ph.end] == '\0') {
            const cJSON *val = lookup(ctx, ph.path, ph.path_len);
            if (!val || cJSON_IsNull(val))
                *out = strdup("");
            else if (cJSON_IsString(val))
                *out = strdup(val->valuestring);
            else
                *out = cJSON_PrintUnformatted(val);
        } else {
            struct text it = {0};
            if (interpolate(s, pos, ph, ctx, &it, "", err, errlen) < 0) {
                free(it.buf);
                return -1;
            }
            *out = it.buf;
        }
        if (!*out) {
            set_err(err, errlen, "", "out of memory");
            return -1;
        }
        return 0;
    }
    if (template_render(tmpl, ctx, &v, err, errlen) < 0)
        return -1;
    if (cJSON_IsString(v))
        *out = strdup(v->valuestring);
    else if (cJSON_IsNull(v))
        *out = strdup("");
    else
        *out = cJSON_PrintUnformatted(v);
    cJSON_Delete(v);
    if (!*out) {
        set_err(err, errlen, "", "out of memory");
        return -1;
    }
    return 0;
}

static int foreach_value(const cJSON *tmpl, char *json_path, template_path_cb path_cb,
                         template_error_cb bad_cb, void *arg)
{
    int rc = 0;

    if (cJSON_IsString(tmpl)) {
        const char *s = tmpl->valuestring;
        char msg[512];
        char path[512];
        struct placeholder ph;
        size_t pos = 0;
        enum scan_result r;
        while ((r = scan_next(s, &pos, &ph, msg, sizeof(msg))) != SCAN_DONE) {
            if (r == SCAN_BAD) {
                rc = -1;
                if (bad_cb)
                    bad_cb(msg, json_path, arg);
                continue;
            }
            if (!path_cb)
                continue;
            snprintf(path, sizeof(path), "%.*s", (int)ph.path_len, ph.path);
            path_cb(path, json_path, arg);
        }
        return rc;
    }
    bool is_array = cJSON_IsArray(tmpl);
    if (!is_array && !cJSON_IsObject(tmpl))
        return 0;
    int i = 0;
    for (const cJSON *item = tmpl->child; item; item = item->next, i++) {
        size_t saved;
        path_push(json_path, &saved, is_array, item->string, i);
        if (foreach_value(item, json_path, path_cb, bad_cb, arg) < 0)
            rc = -1;
        json_path[saved] = '\0';
    }
    return rc;
}

int template_foreach_path(const cJSON *tmpl, template_path_cb path_cb, template_error_cb bad_cb,
                          void *arg)
{
    char json_path[JSON_PATH_MAX] = "";

    if (!tmpl)
        return 0;
    return foreach_value(tmpl, json_path, path_cb, bad_cb, arg);
}
