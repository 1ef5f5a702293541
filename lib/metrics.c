#include "metrics.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_BUCKETS 24

enum kind { KIND_COUNTER, KIND_GAUGE, KIND_HISTOGRAM };

struct metrics_series {
    char *name;
    char *labels;
    enum kind kind;
    double value; /* counter or gauge */
    uint64_t buckets[MAX_BUCKETS + 1];
    double sum;
    uint64_t count;
    size_t family; /* index into families (the array may move) */
    struct metrics_series *next_in_slot;
};

struct family {
    char *name;
    char *type;
    char *help;
    double bounds[MAX_BUCKETS];
    size_t nbounds;
};

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static struct metrics_series *slots[1024];
static struct metrics_series **order; /* creation order, for stable output */
static size_t order_count, order_cap;
static struct family *families;
static size_t family_count;

static const double default_bounds[] = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                        0.25,  0.5,    1,     2.5,  5,     10};

static void oom(void)
{
    fputs("metrics: out of memory\n", stderr);
    abort();
}

static uint64_t hash2(const char *a, const char *b)
{
    uint64_t h = 1469598103934665603ULL;
    for (; *a; a++)
        h = (h ^ (unsigned char)*a) * 1099511628211ULL;
    h = (h ^ 0xff) * 1099511628211ULL;
    for (; b && *b; b++)
        h = (h ^ (unsigned char)*b) * 1099511628211ULL;
    return h;
}

static struct family *family_find(const char *name)
{
    for (size_t i = 0; i < family_count; i++)
        if (!strcmp(families[i].name, name))
            return &families[i];
    return NULL;
}

static struct family *family_get(const char *name)
{
    struct family *f = family_find(name);
    if (f)
        return f;
    struct family *grown = realloc(families, (family_count + 1) * sizeof(*families));
    if (!grown)
        oom();
    families = grown;
    f = &families[family_count++];
    memset(f, 0, sizeof(*f));
    f->name = strdup(name);
    if (!f->name)
        oom();
    memcpy(f->bounds, default_bounds, sizeof(default_bounds));
    f->nbounds = sizeof(default_bounds) / sizeof(default_bounds[0]);
    return f;
}

/* Called with mu held. */
static struct metrics_series *series_get(const char *name, const char *labels, enum kind kind)
{
    const char *l = labels ? labels : "";
    size_t slot = hash2(name, l) % (sizeof(slots) / sizeof(slots[0]));
    for (struct metrics_series *s = slots[slot]; s; s = s->next_in_slot)
        if (!strcmp(s->name, name) && !strcmp(s->labels, l))
            return s;
    struct metrics_series *s = calloc(1, sizeof(*s));
    if (!s)
        oom();
    s->name = strdup(name);
    s->labels = strdup(l);
    if (!s->name || !s->labels)
        oom();
    s->kind = kind;
    s->next_in_slot = slots[slot];
    slots[slot] = s;
    if (order_count == order_cap) {
        order_cap = order_cap ? order_cap * 2 : 64;
        struct metrics_series **grown = realloc(order, order_cap * sizeof(*order));
        if (!grown)
            oom();
        order = grown;
    }
    order[order_count++] = s;
    s->family = (size_t)(family_get(name) - families);
    return s;
}

void metrics_describe(const char *name, const char *type, const char *help)
{
    pthread_mutex_lock(&mu);
    struct family *f = family_get(name);
    free(f->type);
    free(f->help);
    f->type = strdup(type);
    f->help = strdup(help);
    if (!f->type || !f->help)
        oom();
    pthread_mutex_unlock(&mu);
}

void metrics_histogram_buckets(const char *name, const double *bounds, size_t count)
{
    if (count > MAX_BUCKETS)
        count = MAX_BUCKETS;
    pthread_mutex_lock(&mu);
    struct family *f = family_get(name);
    memcpy(f->bounds, bounds, count * sizeof(*bounds));
    f->nbounds = count;
    pthread_mutex_unlock(&mu);
}

void metrics_counter_add(const char *name, const char *labels, uint64_t value)
{
    pthread_mutex_lock(&mu);
    series_get(name, labels, KIND_COUNTER)->value += (double)value;
    pthread_mutex_unlock(&mu);
}

void metrics_gauge_set(const char *name, const char *labels, double value)
{
    pthread_mutex_lock(&mu);
    series_get(name, labels, KIND_GAUGE)->value = value;
    pthread_mutex_unlock(&mu);
}

void metrics_gauge_add(const char *name, const char *labels, double value)
{
    pthread_mutex_lock(&mu);
    series_get(name, labels, KIND_GAUGE)->value += value;
    pthread_mutex_unlock(&mu);
}

/* Called with mu held. */
static void observe(struct metrics_series *s, double value)
{
    const struct family *f = &families[s->family];
    size_t i = 0;
    while (i < f->nbounds && value > f->bounds[i])
        i++;
    s->buckets[i]++;
    s->sum += value;
    s->count++;
}

void metrics_histogram_observe(const char *name, const char *labels, double value)
{
    pthread_mutex_lock(&mu);
    observe(series_get(name, labels, KIND_HISTOGRAM), value);
    pthread_mutex_unlock(&mu);
}

struct metrics_series *metrics_series(const char *name, const char *labels, const char *type)
{
    enum kind kind = !strcmp(type, "histogram") ? KIND_HISTOGRAM
                     : !strcmp(type, "gauge")   ? KIND_GAUGE
                                                : KIND_COUNTER;
    pthread_mutex_lock(&mu);
    struct metrics_series *s = series_get(name, labels, kind);
    pthread_mutex_unlock(&mu);
    return s;
}

void metrics_series_add(struct metrics_series *s, double value)
{
    pthread_mutex_lock(&mu);
    s->value += value;
    pthread_mutex_unlock(&mu);
}

void metrics_series_observe(struct metrics_series *s, double value)
{
    pthread_mutex_lock(&mu);
    observe(s, value);
    pthread_mutex_unlock(&mu);
}

double metrics_value(const char *name, const char *labels)
{
    double v = 0;
    const char *l = labels ? labels : "";
    pthread_mutex_lock(&mu);
    size_t slot = hash2(name, l) % (sizeof(slots) / sizeof(slots[0]));
    for (struct metrics_series *s = slots[slot]; s; s = s->next_in_slot)
        if (!strcmp(s->name, name) && !strcmp(s->labels, l))
            v = s->kind == KIND_HISTOGRAM ? (double)s->count : s->value;
    pthread_mutex_unlock(&mu);
    return v;
}

struct buf {
    char *data;
    size_t len, cap;
    int failed;
};

static void bprintf(struct buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void bprintf(struct buf *b, const char *fmt, ...)
{
    if (b->failed)
        return;
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(b->data + b->len, b->cap - b->len, fmt, ap);
        va_end(ap);
        if (n < 0) {
            b->failed = 1;
            return;
        }
        if ((size_t)n < b->cap - b->len) {
            b->len += (size_t)n;
            return;
        }
        size_t cap = b->cap * 2 + (size_t)n;
        char *grown = realloc(b->data, cap);
        if (!grown) {
            b->failed = 1;
            return;
        }
        b->data = grown;
        b->cap = cap;
    }
}

char *metrics_render(void)
{
    struct buf b = {malloc(4096), 0, 4096, 0};
    if (!b.data)
        return NULL;
    b.data[0] = '\0';
    pthread_mutex_lock(&mu);
    for (size_t fi = 0; fi < family_count; fi++) {
        struct family *f = &families[fi];
        if (f->help)
            bprintf(&b, "# HELP %s %s\n", f->name, f->help);
        if (f->type)
            bprintf(&b, "# TYPE %s %s\n", f->name, f->type);
        for (size_t i = 0; i < order_count; i++) {
            struct metrics_series *s = order[i];
            if (strcmp(s->name, f->name))
                continue;
            const char *sep = *s->labels ? "," : "";
            if (s->kind != KIND_HISTOGRAM) {
                if (*s->labels)
                    bprintf(&b, "%s{%s} %.17g\n", s->name, s->labels, s->value);
                else
                    bprintf(&b, "%s %.17g\n", s->name, s->value);
                continue;
            }
            uint64_t cum = 0;
            for (size_t k = 0; k < f->nbounds; k++) {
                cum += s->buckets[k];
                bprintf(&b, "%s_bucket{%s%sle=\"%g\"} %llu\n", s->name, s->labels, sep,
                        f->bounds[k], (unsigned long long)cum);
            }
            cum += s->buckets[f->nbounds];
            bprintf(&b, "%s_bucket{%s%sle=\"+Inf\"} %llu\n", s->name, s->labels, sep,
                    (unsigned long long)cum);
            bprintf(&b, "%s_sum%s%s%s %.17g\n", s->name, *s->labels ? "{" : "", s->labels,
                    *s->labels ? "}" : "", s->sum);
            bprintf(&b, "%s_count%s%s%s %llu\n", s->name, *s->labels ? "{" : "", s->labels,
                    *s->labels ? "}" : "", (unsigned long long)s->count);
        }
    }
    pthread_mutex_unlock(&mu);
    if (b.failed) {
        free(b.data);
        return NULL;
    }
    return b.data;
}

void metrics_label(char *out, size_t outlen, const char *key, const char *value)
{
    size_t len = (size_t)snprintf(out, outlen, "%s=\"", key);
    for (const char *p = value; *p && len + 3 < outlen; p++) {
        if (*p == '"' || *p == '\\') {
            out[len++] = '\\';
            out[len++] = *p;
        } else if (*p == '\n') {
            out[len++] = '\\';
            out[len++] = 'n';
        } else {
            out[len++] = *p;
        }
    }
    if (len + 2 <= outlen) {
        out[len++] = '"';
        out[len] = '\0';
    } else {
        out[outlen - 1] = '\0';
    }
}
