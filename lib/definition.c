/* definition: loads sagas/NAME.json into struct saga_definition and validates it.
 *
 * The validator never stops at the first problem: every check appends to the caller's diag
 * list and carries on with what it could read, so that a user fixes a file in one round.
 * The parsed document stays in def->body; the templates in the step structs are copies. */
#include "definition.h"
#include "diag.h"
#include "duration.h"
#include "template.h"

#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

/* Built-in defaults, used when the document has no "defaults" (or only part of it). */
#define DEFAULT_TIMEOUT_MS 10000
#define DEFAULT_MAX_ATTEMPTS 3
#define DEFAULT_BACKOFF_MS 200
#define DEFAULT_MAX_BACKOFF_MS 5000
#define MAX_ATTEMPTS_LIMIT 1000
#define TOPIC_MAX_LEN 249
#define SAGA_NAME_MAX_LEN 63

struct checker {
    const char *label;
    struct diag_list *errs;
    /* input.required was unreadable: input.* paths are not checked, to avoid a cascade of
     * messages that all come from that one error. */
    bool inputs_unknown;
};

static void oom(void)
{
    fputs("saga definition: out of memory\n", stderr);
    abort();
}

static char *xstrdup(const char *s)
{
    char *copy = strdup(s);
    if (!copy)
        oom();
    return copy;
}

static void *xcalloc(size_t n, size_t size)
{
    void *p = calloc(n ? n : 1, size);
    if (!p)
        oom();
    return p;
}

static char *xasprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static char *xasprintf(const char *fmt, ...)
{
    va_list ap;
    char *s = NULL;

    va_start(ap, fmt);
    int n = vasprintf(&s, fmt, ap);
    va_end(ap);
    if (n < 0)
        oom();
    return s;
}

static cJSON *xduplicate(const cJSON *item)
{
    cJSON *copy = cJSON_Duplicate(item, true);
    if (!copy)
        oom();
    return copy;
}

/* Appends "LABEL: PATH: message". */
static void check_errf(struct checker *ck, const char *path, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void check_errf(struct checker *ck, const char *path, const char *fmt, ...)
{
    va_list ap;
    char *msg = NULL;

    va_start(ap, fmt);
    int n = vasprintf(&msg, fmt, ap);
    va_end(ap);
    if (n < 0)
        oom();
    diag_addf(ck->errs, "%s: %s: %s", ck->label, path, msg);
    free(msg);
}

/* A user-supplied string made safe for a one-line message: quoted, escaped, and cut short
 * (a fuzzer or a pasted blob must not produce a megabyte error line). Caller frees. */
static char *quote(const char *s)
{
    enum { MAX_SHOWN = 80 };
    size_t len = strlen(s);
    size_t shown = len > MAX_SHOWN ? MAX_SHOWN : len;
    char *out = xcalloc(shown * 4 + 8, 1);
    char *p = out;

    *p++ = '"';
    for (size_t i = 0; i < shown; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '"' || c == '\\') {
            *p++ = '\\';
            *p++ = (char)c;
        } else if (c < 0x20 || c == 0x7f) {
            p += sprintf(p, "\\x%02x", c);
        } else {
            *p++ = (char)c;
        }
    }
    *p++ = '"';
    if (shown < len) {
        memcpy(p, "...", 3);
        p += 3;
    }
    *p = '\0';
    return out;
}

static const char *json_type_name(const cJSON *item)
{
    if (cJSON_IsNull(item))
        return "null";
    if (cJSON_IsBool(item))
        return "a boolean";
    if (cJSON_IsNumber(item))
        return "a number";
    if (cJSON_IsString(item))
        return "a string";
    if (cJSON_IsArray(item))
        return "an array";
    if (cJSON_IsObject(item))
        return "an object";
    return "an invalid value";
}

static bool is_ident_key(const char *s)
{
    if (!*s || !((*s >= 'A' && *s <= 'Z') || (*s >= 'a' && *s <= 'z') || *s == '_'))
        return false;
    for (; *s; s++) {
        if (!((*s >= 'A' && *s <= 'Z') || (*s >= 'a' && *s <= 'z') || (*s >= '0' && *s <= '9') ||
              *s == '_'))
            return false;
    }
    return true;
}

/* JSON path of member key below path: $.a.b, or $.a["odd key"]. Caller frees. */
static char *path_member(const char *path, const char *key)
{
    if (is_ident_key(key))
        return xasprintf("%s.%s", path, key);
    char *q = quote(key);
    char *p = xasprintf("%s[%s]", path, q);
    free(q);
    return p;
}

static char *path_index(const char *path, size_t index)
{
    return xasprintf("%s[%zu]", path, index);
}

/* Levenshtein distance, case-insensitive, for "did you mean" suggestions. */
static size_t edit_distance(const char *a, const char *b)
{
    size_t la = strlen(a), lb = strlen(b);
    size_t *row = xcalloc(lb + 1, sizeof(*row));

    for (size_t j = 0; j <= lb; j++)
        row[j] = j;
    for (size_t i = 1; i <= la; i++) {
        size_t diag = row[0];
        row[0] = i;
        for (size_t j = 1; j <= lb; j++) {
            size_t up = row[j];
            int ca = a[i - 1], cb = b[j - 1];
            if (ca >= 'A' && ca <= 'Z')
                ca += 'a' - 'A';
            if (cb >= 'A' && cb <= 'Z')
                cb += 'a' - 'A';
            size_t best = diag + (ca != cb);
            if (up + 1 < best)
                best = up + 1;
            if (row[j - 1] + 1 < best)
                best = row[j - 1] + 1;
            row[j] = best;
            diag = up;
        }
    }
    size_t d = row[lb];
    free(row);
    return d;
}

/* The known key closest to key, or NULL when none is close enough to be a likely typo. */
static const char *closest_key(const char *key, const char *const *known)
{
    const char *best = NULL;
    size_t best_d = SIZE_MAX;

    if (strlen(key) > 64)
        return NULL;
    for (size_t i = 0; known[i]; i++) {
        size_t d = edit_distance(key, known[i]);
        size_t allowed = strlen(known[i]) <= 4 ? 1 : 2;
        if (d <= allowed && d < best_d) {
            best = known[i];
            best_d = d;
        }
    }
    return best;
}

struct key_ref {
    const char *name;
    size_t pos;
};

static int key_ref_cmp(const void *a, const void *b)
{
    const struct key_ref *x = a, *y = b;
    int c = strcmp(x->name, y->name);
    if (c)
        return c;
    return x->pos < y->pos ? -1 : x->pos > y->pos;
}

/* Marks dup[i] for every member of obj whose name appeared earlier. Sorting keeps this
 * O(n log n): payloads are user data and may be large. Returns a new array, caller frees. */
static bool *find_duplicate_keys(const cJSON *obj, size_t *count)
{
    size_t n = 0;
    for (const cJSON *m = obj->child; m; m = m->next)
        n++;
    bool *dup = xcalloc(n, sizeof(*dup));
    struct key_ref *refs = xcalloc(n, sizeof(*refs));
    size_t i = 0;
    for (const cJSON *m = obj->child; m; m = m->next, i++) {
        refs[i].name = m->string ? m->string : "";
        refs[i].pos = i;
    }
    qsort(refs, n, sizeof(*refs), key_ref_cmp);
    for (i = 1; i < n; i++) {
        if (!strcmp(refs[i].name, refs[i - 1].name))
            dup[refs[i].pos] = true;
    }
    free(refs);
    *count = n;
    return dup;
}

/* Reports duplicate keys of obj and, when known is not NULL, keys that are not in known. */
static void check_keys(struct checker *ck, const cJSON *obj, const char *path,
                       const char *const *known)
{
    size_t n;
    bool *dup = find_duplicate_keys(obj, &n);
    size_t i = 0;

    for (const cJSON *m = obj->child; m; m = m->next, i++) {
        const char *name = m->string ? m->string : "";
        char *q = quote(name);
        if (dup[i]) {
            check_errf(ck, path, "duplicate key %s", q);
        } else if (known) {
            bool found = false;
            for (size_t k = 0; known[k] && !found; k++)
                found = !strcmp(name, known[k]);
            if (!found) {
                const char *hint = closest_key(name, known);
                if (hint)
                    check_errf(ck, path, "unknown key %s (did you mean \"%s\"?)", q, hint);
                else
                    check_errf(ck, path, "unknown key %s", q);
            }
        }
        free(q);
    }
    free(dup);
}

/* Duplicate keys anywhere inside a free-form value (payloads): a renderer would silently
 * pick one of them. */
static void check_duplicates_deep(struct checker *ck, const cJSON *item, const char *path)
{
    if (cJSON_IsObject(item)) {
        check_keys(ck, item, path, NULL);
        for (const cJSON *m = item->child; m; m = m->next) {
            if (!cJSON_IsObject(m) && !cJSON_IsArray(m))
                continue;
            char *sub = path_member(path, m->string ? m->string : "");
            check_duplicates_deep(ck, m, sub);
            free(sub);
        }
    } else if (cJSON_IsArray(item)) {
        size_t i = 0;
        for (const cJSON *m = item->child; m; m = m->next, i++) {
            if (!cJSON_IsObject(m) && !cJSON_IsArray(m))
                continue;
            char *sub = path_index(path, i);
            check_duplicates_deep(ck, m, sub);
            free(sub);
        }
    }
}

/* The member key of obj, reporting a missing required one at the object's path. */
static const cJSON *member(struct checker *ck, const cJSON *obj, const char *path, const char *key,
                           bool required)
{
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!item && required)
        check_errf(ck, path, "missing required key \"%s\"", key);
    return item;
}

static void type_error(struct checker *ck, const char *path, const char *expected,
                       const cJSON *item)
{
    check_errf(ck, path, "expected %s, got %s", expected, json_type_name(item));
}

/* The string member key of obj, or NULL after reporting a missing, mistyped or (when
 * nonempty) empty value. */
static const char *member_string(struct checker *ck, const cJSON *obj, const char *path,
                                 const char *key, bool required, bool nonempty)
{
    const cJSON *item = member(ck, obj, path, key, required);
    if (!item)
        return NULL;
    char *sub = path_member(path, key);
    const char *value = NULL;
    if (!cJSON_IsString(item) || !item->valuestring)
        type_error(ck, sub, "a string", item);
    else if (nonempty && !*item->valuestring)
        check_errf(ck, sub, "must not be empty");
    else
        value = item->valuestring;
    free(sub);
    return value;
}

/* An integer in [min, max] from item; reports at path. */
static int read_int(struct checker *ck, const cJSON *item, const char *path, int min, int max,
                    int *out)
{
    if (!cJSON_IsNumber(item)) {
        type_error(ck, path, "an integer", item);
        return -1;
    }
    double d = item->valuedouble;
    if (!(d >= min && d <= max) || d != floor(d)) {
        char buf[64];
        snprintf(buf, sizeof(buf), "%.17g", d);
        if (max == INT_MAX)
            check_errf(ck, path, "must be an integer >= %d, got %s", min, buf);
        else
            check_errf(ck, path, "must be an integer from %d to %d, got %s", min, max, buf);
        return -1;
    }
    *out = (int)d;
    return 0;
}

/* A duration string from item; reports at path. */
static int read_duration(struct checker *ck, const cJSON *item, const char *path, bool positive,
                         int64_t *out)
{
    if (!cJSON_IsString(item) || !item->valuestring) {
        type_error(ck, path, "a duration string such as \"5s\"", item);
        return -1;
    }
    int64_t ms;
    if (duration_parse(item->valuestring, &ms) < 0) {
        char *q = quote(item->valuestring);
        check_errf(ck, path,
                   "invalid duration %s (expected <integer><unit> groups with units ms, s, m, h, "
                   "e.g. \"250ms\", \"10s\", \"1m30s\")",
                   q);
        free(q);
        return -1;
    }
    if (positive && ms <= 0) {
        check_errf(ck, path, "must be greater than 0");
        return -1;
    }
    *out = ms;
    return 0;
}

static bool topic_valid(const char *s)
{
    size_t len = strlen(s);
    if (len < 1 || len > TOPIC_MAX_LEN || !strcmp(s, ".") || !strcmp(s, ".."))
        return false;
    for (; *s; s++) {
        char c = *s;
        if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
              c == '.' || c == '_' || c == '-'))
            return false;
    }
    return true;
}

/* A Kafka topic member; returns NULL after reporting. */
static const char *member_topic(struct checker *ck, const cJSON *obj, const char *path,
                                const char *key)
{
    const char *topic = member_string(ck, obj, path, key, true, false);
    if (!topic)
        return NULL;
    if (!topic_valid(topic)) {
        char *sub = path_member(path, key);
        char *q = quote(topic);
        check_errf(ck, sub,
                   "invalid topic name %s (1 to %d characters of A-Z a-z 0-9 . _ -, "
                   "not \".\" or \"..\")",
                   q, TOPIC_MAX_LEN);
        free(q);
        free(sub);
        return NULL;
    }
    return topic;
}

static bool saga_name_valid(const char *s)
{
    size_t len = strlen(s);
    if (len < 1 || len > SAGA_NAME_MAX_LEN)
        return false;
    if (!((s[0] >= 'A' && s[0] <= 'Z') || (s[0] >= 'a' && s[0] <= 'z')))
        return false;
    for (size_t i = 1; i < len; i++) {
        char c = s[i];
        if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
              c == '_' || c == '.' || c == '-'))
            return false;
    }
    return true;
}

static bool step_name_valid(const char *s)
{
    if (!((s[0] >= 'A' && s[0] <= 'Z') || (s[0] >= 'a' && s[0] <= 'z')))
        return false;
    for (s++; *s; s++) {
        char c = *s;
        if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
              c == '_'))
            return false;
    }
    return true;
}

/* Formats ms as the shortest duration text ("1m30s", "200ms") for messages. */
static void format_duration(int64_t ms, char *buf, size_t len)
{
    static const struct {
        const char *unit;
        int64_t ms;
    } units[] = {{"h", 3600000}, {"m", 60000}, {"s", 1000}, {"ms", 1}};
    size_t used = 0;

    buf[0] = '\0';
    if (ms == 0) {
        snprintf(buf, len, "0ms");
        return;
    }
    for (size_t i = 0; i < sizeof(units) / sizeof(units[0]) && used < len; i++) {
        if (ms >= units[i].ms) {
            int n = snprintf(buf + used, len - used, "%lld%s", (long long)(ms / units[i].ms),
                             units[i].unit);
            if (n < 0)
                break;
            used += (size_t)n;
            ms %= units[i].ms;
        }
    }
}

static const char *const retry_keys[] = {"max_attempts", "backoff", "max_backoff", NULL};

/* Reads a retry object over base, key by key, into *out (base itself when item is NULL). */
static void parse_retry(struct checker *ck, const cJSON *item, const char *path,
                        const struct saga_retry_policy *base, struct saga_retry_policy *out)
{
    *out = *base;
    if (!item)
        return;
    if (!cJSON_IsObject(item)) {
        type_error(ck, path, "an object", item);
        return;
    }
    check_keys(ck, item, path, retry_keys);

    bool ok = true;
    const cJSON *m;
    if ((m = cJSON_GetObjectItemCaseSensitive(item, "max_attempts"))) {
        char *sub = path_member(path, "max_attempts");
        if (read_int(ck, m, sub, 1, MAX_ATTEMPTS_LIMIT, &out->max_attempts) < 0)
            out->max_attempts = base->max_attempts;
        free(sub);
    }
    const cJSON *backoff = cJSON_GetObjectItemCaseSensitive(item, "backoff");
    if (backoff) {
        char *sub = path_member(path, "backoff");
        if (read_duration(ck, backoff, sub, false, &out->backoff_ms) < 0)
            ok = false;
        free(sub);
    }
    const cJSON *max_backoff = cJSON_GetObjectItemCaseSensitive(item, "max_backoff");
    if (max_backoff) {
        char *sub = path_member(path, "max_backoff");
        if (read_duration(ck, max_backoff, sub, false, &out->max_backoff_ms) < 0)
            ok = false;
        free(sub);
    }
    /* Checked on the merged policy: a step may raise backoff above the saga's max_backoff. */
    if (ok && (backoff || max_backoff) && out->max_backoff_ms < out->backoff_ms) {
        char *sub = path_member(path, max_backoff ? "max_backoff" : "backoff");
        char b[64], mb[64];
        format_duration(out->backoff_ms, b, sizeof(b));
        format_duration(out->max_backoff_ms, mb, sizeof(mb));
        check_errf(ck, sub, "max_backoff (%s) must not be less than backoff (%s)", mb, b);
        free(sub);
    }
}

/* What template paths may refer to from one command or compensation. */
struct template_scope {
    struct checker *ck;
    const struct saga_definition *def;
    const char *const *step_names; /* NULL where a step has no valid name */
    size_t step_count;
    size_t step_idx;
    bool compensation;
    const char *base_path; /* JSON path of the template */
    size_t bad_count;
};

static void check_path_cb(const char *path, const char *json_path, void *arg)
{
    struct template_scope *sc = arg;
    char *where = xasprintf("%s%s", sc->base_path, json_path);
    char *q = quote(path);

    if (!strncmp(path, "input.", 6)) {
        const char *k = path + 6;
        size_t klen = strcspn(k, ".");
        bool found = false;
        for (size_t i = 0; i < sc->def->required_count && !found; i++) {
            found = strlen(sc->def->required_inputs[i]) == klen &&
                    !strncmp(sc->def->required_inputs[i], k, klen);
        }
        if (klen == 0) {
            check_errf(sc->ck, where, "template path %s: expected input.<key>", q);
        } else if (!found && !sc->ck->inputs_unknown) {
            char *key = xasprintf("%.*s", (int)klen, k);
            char *qk = quote(key);
            check_errf(sc->ck, where, "template path %s: input %s is not in input.required", q, qk);
            free(qk);
            free(key);
        }
    } else if (!strncmp(path, "steps.", 6)) {
        const char *s = path + 6;
        size_t slen = strcspn(s, ".");
        const char *rest = s + slen;
        char *step = xasprintf("%.*s", (int)slen, s);
        char *qs = quote(step);
        int idx = -1;
        for (size_t i = 0; i < sc->step_count && idx < 0; i++) {
            if (sc->step_names[i] && !strcmp(sc->step_names[i], step))
                idx = (int)i;
        }
        if (slen == 0) {
            check_errf(sc->ck, where, "template path %s: expected steps.<step>.reply", q);
        } else if (idx < 0) {
            check_errf(sc->ck, where, "template path %s: unknown step %s", q, qs);
        } else if (strcmp(rest, ".reply") != 0 && strncmp(rest, ".reply.", 7) != 0) {
            check_errf(sc->ck, where, "template path %s: expected steps.%s.reply[.<key>...]", q,
                       step);
        } else if ((size_t)idx > sc->step_idx) {
            check_errf(sc->ck, where,
                       "template path %s: step %s runs after this step, its reply is not known "
                       "yet",
                       q, qs);
        } else if ((size_t)idx == sc->step_idx && !sc->compensation) {
            check_errf(sc->ck, where,
                       "template path %s: a command cannot use the reply of its own step", q);
        }
        free(qs);
        free(step);
    } else if (strcmp(path, "saga.id") != 0 && strcmp(path, "saga.name") != 0 &&
               strcmp(path, "saga.correlation_id") != 0) {
        check_errf(sc->ck, where,
                   "unknown template path %s (expected input.<key>, steps.<step>.reply, "
                   "saga.id, saga.name or saga.correlation_id)",
                   q);
    }
    free(q);
    free(where);
}

static void check_bad_cb(const char *message, const char *json_path, void *arg)
{
    struct template_scope *sc = arg;
    char *where = xasprintf("%s%s", sc->base_path, json_path);
    check_errf(sc->ck, where, "%s", message);
    sc->bad_count++;
    free(where);
}

static void check_template(struct template_scope *sc, const cJSON *tmpl, const char *path)
{
    sc->base_path = path;
    sc->bad_count = 0;
    if (template_foreach_path(tmpl, check_path_cb, check_bad_cb, sc) < 0 && sc->bad_count == 0)
        check_errf(sc->ck, path, "invalid template");
}

static const char *const message_keys[] = {"topic", "type", "key", "payload", NULL};

/* Reads a command or compensation object into *msg (fields stay NULL where invalid). */
static void parse_message(struct checker *ck, const cJSON *item, const char *path,
                          struct saga_message_def *msg, struct template_scope *sc)
{
    check_keys(ck, item, path, message_keys);

    const char *topic = member_topic(ck, item, path, "topic");
    if (topic)
        msg->topic = xstrdup(topic);
    const char *type = member_string(ck, item, path, "type", true, true);
    if (type)
        msg->type = xstrdup(type);

    const cJSON *key = member(ck, item, path, "key", false);
    if (key) {
        char *sub = path_member(path, "key");
        if (!cJSON_IsString(key)) {
            type_error(ck, sub, "a string", key);
        } else {
            check_template(sc, key, sub);
            msg->key = xduplicate(key);
        }
        free(sub);
    }

    const cJSON *payload = member(ck, item, path, "payload", true);
    if (payload) {
        char *sub = path_member(path, "payload");
        check_duplicates_deep(ck, payload, sub);
        check_template(sc, payload, sub);
        msg->payload = xduplicate(payload);
        free(sub);
    }
}

/* Pivot and compensation rules; the pivot is known from the first pass. */
static void check_compensation(struct checker *ck, struct saga_definition *def, const cJSON *item,
                               const char *path, size_t idx, bool pivot_unknown,
                               struct template_scope *sc)
{
    struct saga_step_def *step = &def->steps[idx];
    bool compensatable = def->pivot_index < 0 || idx < (size_t)def->pivot_index;
    const cJSON *comp = cJSON_GetObjectItemCaseSensitive(item, "compensation");
    char *sub = path_member(path, "compensation");

    if (!comp) {
        /* With a mistyped "pivot" we cannot tell which steps need one: that error
         * is enough. */
        bool needed = compensatable && !pivot_unknown;
        if (needed && def->pivot_index >= 0)
            check_errf(ck, path,
                       "missing required key \"compensation\" (steps before the pivot "
                       "need one; write \"compensation\": null if there is nothing to "
                       "undo)");
        else if (needed)
            check_errf(ck, path,
                       "missing required key \"compensation\" (a saga without a pivot "
                       "compensates every step; write \"compensation\": null if there is "
                       "nothing to undo)");
    } else if (cJSON_IsNull(comp)) {
        /* Nothing to undo: allowed anywhere. */
    } else if (!cJSON_IsObject(comp)) {
        type_error(ck, sub, "an object or null", comp);
    } else if (!compensatable) {
        if ((int)idx == def->pivot_index)
            check_errf(ck, sub, "the pivot step is never compensated; remove this key");
        else
            check_errf(ck, sub,
                       "a step after the pivot is never compensated (it is retried until "
                       "it succeeds); remove this key");
    } else {
        sc->step_idx = idx;
        sc->compensation = true;
        parse_message(ck, comp, sub, &step->compensation, sc);
        /* The compensation goes to the same entity by default. */
        if (!cJSON_GetObjectItemCaseSensitive(comp, "key") && step->command.key)
            step->compensation.key = xduplicate(step->command.key);
        step->has_compensation = true;
    }
    free(sub);
}

static const char *const step_keys[] = {"name",         "participant", "pivot", "command",
                                        "compensation", "timeout",     "retry", NULL};

static void parse_step(struct checker *ck, struct saga_definition *def, const cJSON *item,
                       const char *path, size_t idx, bool pivot_unknown, struct template_scope *sc)
{
    struct saga_step_def *step = &def->steps[idx];

    step->timeout_ms = def->default_timeout_ms;
    step->retry = def->default_retry;
    check_keys(ck, item, path, step_keys);

    const char *name = member_string(ck, item, path, "name", true, false);
    if (name) {
        char *sub = path_member(path, "name");
        char *q = quote(name);
        int first = -1;
        for (size_t i = 0; i < idx && first < 0; i++) {
            if (sc->step_names[i] && !strcmp(sc->step_names[i], name))
                first = (int)i;
        }
        if (!step_name_valid(name))
            check_errf(ck, sub, "invalid step name %s (must match ^[A-Za-z][A-Za-z0-9_]*$)", q);
        else if (first >= 0)
            check_errf(ck, sub, "duplicate step name %s (also $.steps[%d])", q, first);
        step->name = xstrdup(name);
        free(q);
        free(sub);
    }

    const char *participant = member_string(ck, item, path, "participant", true, true);
    if (participant)
        step->participant = xstrdup(participant);

    const cJSON *pivot = member(ck, item, path, "pivot", false);
    if (pivot) {
        char *sub = path_member(path, "pivot");
        if (!cJSON_IsBool(pivot))
            type_error(ck, sub, "a boolean", pivot);
        else
            step->pivot = cJSON_IsTrue(pivot);
        if (step->pivot && (int)idx != def->pivot_index)
            check_errf(ck, sub, "only one step can be the pivot (already $.steps[%d])",
                       def->pivot_index);
        free(sub);
    }

    const cJSON *timeout = member(ck, item, path, "timeout", false);
    if (timeout) {
        char *sub = path_member(path, "timeout");
        if (read_duration(ck, timeout, sub, true, &step->timeout_ms) < 0)
            step->timeout_ms = def->default_timeout_ms;
        free(sub);
    }

    const cJSON *retry = member(ck, item, path, "retry", false);
    if (retry) {
        char *sub = path_member(path, "retry");
        parse_retry(ck, retry, sub, &def->default_retry, &step->retry);
        free(sub);
    }

    sc->step_idx = idx;
    const cJSON *command = member(ck, item, path, "command", true);
    if (command) {
        char *sub = path_member(path, "command");
        sc->compensation = false;
        if (!cJSON_IsObject(command))
            type_error(ck, sub, "an object", command);
        else
            parse_message(ck, command, sub, &step->command, sc);
        free(sub);
    }

    check_compensation(ck, def, item, path, idx, pivot_unknown, sc);
}

static void parse_steps(struct checker *ck, struct saga_definition *def, const cJSON *steps)
{
    if (!cJSON_IsArray(steps)) {
        type_error(ck, "$.steps", "an array", steps);
        return;
    }
    size_t n = 0;
    for (const cJSON *item = steps->child; item; item = item->next)
        n++;
    if (n == 0) {
        check_errf(ck, "$.steps", "must contain at least one step");
        return;
    }
    def->steps = xcalloc(n, sizeof(*def->steps));
    def->step_count = n;

    /* First pass, silent: the names and the pivot, which templates and compensation rules
     * of earlier steps depend on. The second pass reports, in document order. */
    const char **names = xcalloc(n, sizeof(*names));
    bool pivot_unknown = false;
    size_t idx = 0;
    for (const cJSON *item = steps->child; item; item = item->next, idx++) {
        if (!cJSON_IsObject(item))
            continue;
        const cJSON *name = cJSON_GetObjectItemCaseSensitive(item, "name");
        if (cJSON_IsString(name) && name->valuestring && step_name_valid(name->valuestring)) {
            bool seen = false;
            for (size_t i = 0; i < idx && !seen; i++)
                seen = names[i] && !strcmp(names[i], name->valuestring);
            if (!seen)
                names[idx] = name->valuestring;
        }
        const cJSON *pivot = cJSON_GetObjectItemCaseSensitive(item, "pivot");
        if (pivot && !cJSON_IsBool(pivot))
            pivot_unknown = true;
        if (cJSON_IsTrue(pivot) && def->pivot_index < 0)
            def->pivot_index = (int)idx;
    }

    struct template_scope sc = {
        .ck = ck, .def = def, .step_names = names, .step_count = n, .step_idx = 0};
    idx = 0;
    for (const cJSON *item = steps->child; item; item = item->next, idx++) {
        char *path = path_index("$.steps", idx);
        if (cJSON_IsObject(item))
            parse_step(ck, def, item, path, idx, pivot_unknown, &sc);
        else
            type_error(ck, path, "an object", item);
        free(path);
    }
    free(names);
}

static void parse_input(struct checker *ck, struct saga_definition *def, const cJSON *input)
{
    static const char *const input_keys[] = {"required", NULL};

    if (!cJSON_IsObject(input)) {
        type_error(ck, "$.input", "an object", input);
        ck->inputs_unknown = true;
        return;
    }
    check_keys(ck, input, "$.input", input_keys);
    const cJSON *required = cJSON_GetObjectItemCaseSensitive(input, "required");
    if (!required)
        return;
    if (!cJSON_IsArray(required)) {
        type_error(ck, "$.input.required", "an array of strings", required);
        ck->inputs_unknown = true;
        return;
    }
    size_t n = 0;
    for (const cJSON *item = required->child; item; item = item->next)
        n++;
    def->required_inputs = xcalloc(n, sizeof(*def->required_inputs));
    size_t idx = 0;
    for (const cJSON *item = required->child; item; item = item->next, idx++) {
        char *path = path_index("$.input.required", idx);
        if (!cJSON_IsString(item) || !item->valuestring) {
            type_error(ck, path, "a string", item);
            ck->inputs_unknown = true;
        } else if (!*item->valuestring) {
            check_errf(ck, path, "must not be empty");
        } else {
            bool dup = false;
            for (size_t i = 0; i < def->required_count && !dup; i++)
                dup = !strcmp(def->required_inputs[i], item->valuestring);
            if (dup) {
                char *q = quote(item->valuestring);
                check_errf(ck, path, "duplicate input %s", q);
                free(q);
            } else {
                def->required_inputs[def->required_count++] = xstrdup(item->valuestring);
            }
        }
        free(path);
    }
}

static void parse_defaults(struct checker *ck, struct saga_definition *def, const cJSON *defaults)
{
    static const char *const defaults_keys[] = {"timeout", "retry", NULL};

    if (!cJSON_IsObject(defaults)) {
        type_error(ck, "$.defaults", "an object", defaults);
        return;
    }
    check_keys(ck, defaults, "$.defaults", defaults_keys);
    const cJSON *timeout = cJSON_GetObjectItemCaseSensitive(defaults, "timeout");
    if (timeout) {
        int64_t ms;
        if (read_duration(ck, timeout, "$.defaults.timeout", true, &ms) == 0)
            def->default_timeout_ms = ms;
    }
    const cJSON *retry = cJSON_GetObjectItemCaseSensitive(defaults, "retry");
    if (retry) {
        struct saga_retry_policy base = def->default_retry;
        parse_retry(ck, retry, "$.defaults.retry", &base, &def->default_retry);
    }
}

static const char *const root_keys[] = {"saga",        "version",  "description", "input",
                                        "reply_topic", "defaults", "steps",       NULL};

static void parse_root(struct checker *ck, struct saga_definition *def, const cJSON *root)
{
    if (!cJSON_IsObject(root)) {
        type_error(ck, "$", "an object", root);
        return;
    }
    check_keys(ck, root, "$", root_keys);

    const char *name = member_string(ck, root, "$", "saga", true, false);
    if (name) {
        if (saga_name_valid(name)) {
            def->name = xstrdup(name);
        } else {
            char *q = quote(name);
            check_errf(ck, "$.saga",
                       "invalid saga name %s (must match ^[A-Za-z][A-Za-z0-9_.-]{0,62}$)", q);
            free(q);
        }
    }

    const cJSON *version = member(ck, root, "$", "version", true);
    if (version)
        (void)read_int(ck, version, "$.version", 1, INT_MAX, &def->version);

    const char *description = member_string(ck, root, "$", "description", false, false);
    if (description)
        def->description = xstrdup(description);

    const cJSON *input = member(ck, root, "$", "input", false);
    if (input)
        parse_input(ck, def, input);

    const char *reply_topic = member_topic(ck, root, "$", "reply_topic");
    if (reply_topic)
        def->reply_topic = xstrdup(reply_topic);

    const cJSON *defaults = member(ck, root, "$", "defaults", false);
    if (defaults)
        parse_defaults(ck, def, defaults);

    const cJSON *steps = member(ck, root, "$", "steps", true);
    if (steps)
        parse_steps(ck, def, steps);
}

/* Line and column (both from 1, column in bytes) of offset pos in text. */
static void text_position(const char *text, size_t len, size_t pos, size_t *line, size_t *col)
{
    *line = 1;
    *col = 1;
    for (size_t i = 0; i < pos && i < len; i++) {
        if (text[i] == '\n') {
            (*line)++;
            *col = 1;
        } else {
            (*col)++;
        }
    }
}

int saga_definition_parse(const char *label, const char *text, size_t len,
                          struct saga_definition **out, struct diag_list *errs)
{
    struct checker ck = {.label = label, .errs = errs};
    size_t errs_before = errs->count;
    struct saga_definition *def = NULL;
    char *buf = NULL;

    *out = NULL;
    /* cJSON stops at a NUL byte: anything after one would be ignored silently. */
    const char *nul = memchr(text, '\0', len);
    if (nul) {
        size_t line, col;
        text_position(text, len, (size_t)(nul - text), &line, &col);
        diag_addf(errs, "%s:%zu:%zu: invalid JSON: NUL byte", label, line, col);
        return -1;
    }
    /* cJSON wants the terminating NUL inside the length to accept "nothing after the value". */
    buf = xcalloc(len + 1, 1);
    memcpy(buf, text, len);
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(buf, len + 1, &end, true);
    if (!root) {
        size_t pos = end && end >= buf ? (size_t)(end - buf) : 0;
        size_t line, col;
        text_position(buf, len, pos, &line, &col);
        if (pos >= len)
            diag_addf(errs, "%s:%zu:%zu: invalid JSON (at the end of the input)", label, line, col);
        else
            diag_addf(errs, "%s:%zu:%zu: invalid JSON", label, line, col);
        goto fail;
    }

    def = xcalloc(1, sizeof(*def));
    def->body = root;
    def->source_label = xstrdup(label);
    def->pivot_index = -1;
    def->default_timeout_ms = DEFAULT_TIMEOUT_MS;
    def->default_retry.max_attempts = DEFAULT_MAX_ATTEMPTS;
    def->default_retry.backoff_ms = DEFAULT_BACKOFF_MS;
    def->default_retry.max_backoff_ms = DEFAULT_MAX_BACKOFF_MS;
    parse_root(&ck, def, root);
    if (errs->count != errs_before)
        goto fail;

    free(buf);
    *out = def;
    return 0;

fail:
    saga_definition_destroy(def);
    free(buf);
    return -1;
}

int saga_definition_load_file(const char *path, struct saga_definition **out,
                              struct diag_list *errs)
{
    FILE *f = NULL;
    char *text = NULL;
    size_t len = 0, cap = 0;
    int ret = -1;

    *out = NULL;
    f = fopen(path, "rb");
    if (!f) {
        diag_addf(errs, "%s: cannot open: %s", path, strerror(errno));
        goto out;
    }
    for (;;) {
        if (len == cap) {
            cap = cap ? cap * 2 : 8192;
            char *grown = realloc(text, cap);
            if (!grown)
                oom();
            text = grown;
        }
        size_t n = fread(text + len, 1, cap - len, f);
        len += n;
        if (n == 0)
            break;
    }
    if (ferror(f)) {
        diag_addf(errs, "%s: cannot read: %s", path, strerror(errno));
        goto out;
    }
    ret = saga_definition_parse(path, text, len, out, errs);
out:
    if (f)
        fclose(f);
    free(text);
    return ret;
}

static int name_cmp(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static bool is_definition_file(const char *name)
{
    size_t len = strlen(name);
    /* Like the shell's *.json: hidden files (editor droppings) are not definitions. */
    return name[0] != '.' && len > 5 && !strcmp(name + len - 5, ".json");
}

int saga_definition_load_dir(const char *dir, struct saga_definition ***defs, size_t *count,
                             struct diag_list *errs)
{
    DIR *d = NULL;
    char **names = NULL;
    size_t name_count = 0, name_cap = 0;
    struct saga_definition **loaded = NULL;
    size_t loaded_count = 0;
    char *base = NULL;
    int ret = 0;

    *defs = NULL;
    *count = 0;
    d = opendir(dir);
    if (!d) {
        diag_addf(errs, "%s: cannot open directory: %s", dir, strerror(errno));
        return -1;
    }
    errno = 0;
    for (struct dirent *ent; (ent = readdir(d));) {
        if (!is_definition_file(ent->d_name))
            continue;
        if (name_count == name_cap) {
            name_cap = name_cap ? name_cap * 2 : 16;
            char **grown = realloc(names, name_cap * sizeof(*names));
            if (!grown)
                oom();
            names = grown;
        }
        names[name_count++] = xstrdup(ent->d_name);
    }
    if (errno) {
        diag_addf(errs, "%s: cannot read directory: %s", dir, strerror(errno));
        ret = -1;
    }
    closedir(d);
    qsort(names, name_count, sizeof(*names), name_cmp);

    /* "sagas/" and "sagas" give the same labels. */
    base = xstrdup(dir);
    for (size_t blen = strlen(base); blen > 1 && base[blen - 1] == '/'; blen--)
        base[blen - 1] = '\0';

    loaded = xcalloc(name_count, sizeof(*loaded));
    for (size_t i = 0; i < name_count; i++) {
        char *path =
            !strcmp(base, "/") ? xasprintf("/%s", names[i]) : xasprintf("%s/%s", base, names[i]);
        struct saga_definition *def = NULL;
        if (saga_definition_load_file(path, &def, errs) < 0) {
            ret = -1;
            free(path);
            continue;
        }
        free(path);
        const struct saga_definition *first = NULL;
        for (size_t j = 0; j < loaded_count && !first; j++) {
            if (!strcmp(loaded[j]->name, def->name) && loaded[j]->version == def->version)
                first = loaded[j];
        }
        if (first) {
            diag_addf(errs, "%s: $.version: saga \"%s\" version %d is already defined in %s",
                      def->source_label, def->name, def->version, first->source_label);
            saga_definition_destroy(def);
            ret = -1;
            continue;
        }
        loaded[loaded_count++] = def;
    }

    for (size_t i = 0; i < name_count; i++)
        free(names[i]);
    free(names);
    free(base);
    *defs = loaded;
    *count = loaded_count;
    return ret;
}

int saga_definition_step_index(const struct saga_definition *def, const char *name)
{
    for (size_t i = 0; i < def->step_count; i++) {
        if (def->steps[i].name && !strcmp(def->steps[i].name, name))
            return (int)i;
    }
    return -1;
}

static void message_def_free(struct saga_message_def *msg)
{
    free(msg->topic);
    free(msg->type);
    cJSON_Delete(msg->key);
    cJSON_Delete(msg->payload);
}

void saga_definition_destroy(struct saga_definition *def)
{
    if (!def)
        return;
    for (size_t i = 0; i < def->step_count; i++) {
        struct saga_step_def *step = &def->steps[i];
        free(step->name);
        free(step->participant);
        message_def_free(&step->command);
        /* Freed whether or not has_compensation: a rejected document may leave it half
         * filled. */
        message_def_free(&step->compensation);
    }
    free(def->steps);
    for (size_t i = 0; i < def->required_count; i++)
        free(def->required_inputs[i]);
    free(def->required_inputs);
    free(def->name);
    free(def->description);
    free(def->reply_topic);
    free(def->source_label);
    cJSON_Delete(def->body);
    free(def);
}
