#include "template.h"

#include <ctype.h>
#include <stdarg.h>
#include <stdbool.h>
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

/* Appends a value as interpolated text: strings raw, null or missing as nothing, others as
 * compact JSON. */
static int text_append_value(struct text *t, const cJSON *v)
{
    if (!v || cJSON_IsNull(v))
        return text_append(t, "", 0);
    if (cJSON_IsString(v))
        return text_append(t, v->valuestring, strlen(v->valuestring));
    char *json = cJSON_PrintUnformatted(v);
    if (!json)
        return -1;
    int rc = text_append(t, json, strlen(json));
    free(json);
    return rc;
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
    size_t copied = 0;
    cJSON *out = NULL;
    for (;;) {
        if (text_append(&t, s + copied, ph.start - copied) < 0 ||
            text_append_value(&t, lookup(ctx, ph.path, ph.path_len)) < 0)
            goto oom;
        copied = ph.end;
        r = scan_next(s, &pos, &ph, msg, sizeof(msg));
        if (r == SCAN_DONE)
            break;
        if (r == SCAN_BAD) {
            set_err(err, errlen, json_path, msg);
            goto cleanup;
        }
    }
    if (text_append(&t, s + copied, strlen(s + copied)) < 0)
        goto oom;
    out = cJSON_CreateString(t.buf);
    if (!out)
        goto oom;
    goto cleanup;
oom:
    set_err(err, errlen, json_path, "out of memory");
cleanup:
    free(t.buf);
    return out;
}

/* json_path is a buffer of PATH_MAX-ish size that the recursion extends and restores. */
#define JSON_PATH_MAX 1024

static void path_push(char *json_path, size_t *saved, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void path_push(char *json_path, size_t *saved, const char *fmt, ...)
{
    *saved = strlen(json_path);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(json_path + *saved, JSON_PATH_MAX - *saved, fmt, ap);
    va_end(ap);
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
        if (is_array)
            path_push(json_path, &saved, "[%d]", i);
        else
            path_push(json_path, &saved, ".%s", item->string);
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

int template_render_text(const cJSON *tmpl, const cJSON *ctx, char **out, char *err, size_t errlen)
{
    cJSON *v = NULL;

    *out = NULL;
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
        if (is_array)
            path_push(json_path, &saved, "[%d]", i);
        else
            path_push(json_path, &saved, ".%s", item->string);
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
