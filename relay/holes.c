/* holes: see holes.h. */
#include "holes.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* More open ranges than this are merged into one (searching a superset is always safe). */
#define HOLES_MAX 4096

struct hole {
    int64_t lo, hi;
    uint64_t seen;   /* sweeps sent when the hole was seen */
    uint64_t set;    /* its set of transactions (0: no sweep after it yet) */
    uint64_t expire; /* the first claim that may forget it (0: not yet) */
};

struct vxset {
    uint64_t id;
    char **vx;
    size_t n;
};

struct holes {
    struct hole *v;
    size_t n, cap;
    struct vxset *sets;
    size_t nsets;
    uint64_t sweeps, next_set;
};

static void oom(void)
{
    fputs("holes: out of memory\n", stderr);
    abort();
}

struct holes *holes_new(void)
{
    struct holes *h = calloc(1, sizeof(*h));
    if (h)
        h->next_set = 1;
    return h;
}

static void set_free(struct vxset *s)
{
    for (size_t i = 0; i < s->n; i++)
        free(s->vx[i]);
    free(s->vx);
}

void holes_clear(struct holes *h)
{
    for (size_t i = 0; i < h->nsets; i++)
        set_free(&h->sets[i]);
    free(h->sets);
    h->sets = NULL;
    h->nsets = 0;
    h->n = 0;
}

void holes_free(struct holes *h)
{
    if (!h)
        return;
    holes_clear(h);
    free(h->v);
    free(h);
}

static void insert_at(struct holes *h, size_t at, struct hole x)
{
    if (h->n == h->cap) {
        size_t cap = h->cap ? h->cap * 2 : 64;
        struct hole *v = realloc(h->v, cap * sizeof(*v));
        if (!v)
            oom();
        h->v = v;
        h->cap = cap;
    }
    memmove(&h->v[at + 1], &h->v[at], (h->n - at) * sizeof(*h->v));
    h->v[at] = x;
    h->n++;
}

/* The first range with hi >= seq. */
static size_t find(const struct holes *h, int64_t seq)
{
    size_t lo = 0, hi = h->n;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (h->v[mid].hi < seq)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/* Too many ranges: one range over all. Its set is taken again from the next sweep, which
 * is later than every hole's own and so still names whoever could fill any of them. */
static void merge_if_too_many(struct holes *h)
{
    if (h->n <= HOLES_MAX)
        return;
    struct hole all = {.lo = h->v[0].lo, .hi = h->v[h->n - 1].hi, .seen = h->sweeps};
    h->n = 0;
    insert_at(h, 0, all);
}

void holes_open(struct holes *h, int64_t lo, int64_t hi)
{
    if (lo > hi)
        return;
    struct hole x = {.lo = lo, .hi = hi, .seen = h->sweeps};
    insert_at(h, find(h, lo), x);
    merge_if_too_many(h);
}

void holes_fill(struct holes *h, int64_t seq)
{
    size_t i = find(h, seq);
    if (i == h->n || h->v[i].lo > seq)
        return;
    struct hole *x = &h->v[i];
    if (x->lo == seq && x->hi == seq) {
        memmove(x, x + 1, (h->n - i - 1) * sizeof(*x));
        h->n--;
    } else if (x->lo == seq) {
        x->lo++;
    } else if (x->hi == seq) {
        x->hi--;
    } else {
        struct hole right = *x;
        right.lo = seq + 1;
        x->hi = seq - 1;
        insert_at(h, i + 1, right);
        merge_if_too_many(h);
    }
}

bool holes_floor(const struct holes *h, int64_t *floor)
{
    if (!h->n)
        return false;
    *floor = h->v[0].lo;
    return true;
}

size_t holes_count(const struct holes *h)
{
    return h->n;
}

bool holes_want_sweep(const struct holes *h)
{
    if (h->nsets)
        return true;
    for (size_t i = 0; i < h->n; i++)
        if (!h->v[i].set && !h->v[i].expire)
            return true;
    return false;
}

uint64_t holes_sweep_sent(struct holes *h)
{
    return ++h->sweeps;
}

static bool contains(const char *const *vxids, size_t n, const char *vx)
{
    for (size_t i = 0; i < n; i++)
        if (!strcmp(vxids[i], vx))
            return true;
    return false;
}

void holes_sweep_done(struct holes *h, uint64_t sweep, const char *const *vxids, size_t n,
                      uint64_t next_claim)
{
    /* Holes seen before this sweep was sent take its set. */
    uint64_t id = 0;
    for (size_t i = 0; i < h->n; i++) {
        struct hole *x = &h->v[i];
        if (x->set || x->expire || x->seen >= sweep)
            continue;
        if (!id) {
            struct vxset *sets = realloc(h->sets, (h->nsets + 1) * sizeof(*sets));
            if (!sets)
                oom();
            h->sets = sets;
            struct vxset *s = &h->sets[h->nsets++];
            s->id = id = h->next_set++;
            s->n = 0;
            s->vx = n ? calloc(n, sizeof(*s->vx)) : NULL;
            if (n && !s->vx)
                oom();
            for (size_t k = 0; k < n; k++) {
                s->vx[k] = strdup(vxids[k]);
                if (!s->vx[k])
                    oom();
                s->n++;
            }
        }
        x->set = id;
    }
    /* Every set keeps only the transactions still holding the lock; an empty set's holes may
     * be forgotten after the next claim (whose snapshot comes after this sweep). */
    size_t keep = 0;
    for (size_t i = 0; i < h->nsets; i++) {
        struct vxset *s = &h->sets[i];
        size_t m = 0;
        for (size_t k = 0; k < s->n; k++) {
            if (contains(vxids, n, s->vx[k]))
                s->vx[m++] = s->vx[k];
            else
                free(s->vx[k]);
        }
        s->n = m;
        if (m) {
            h->sets[keep++] = *s;
            continue;
        }
        for (size_t k = 0; k < h->n; k++)
            if (h->v[k].set == s->id && !h->v[k].expire)
                h->v[k].expire = next_claim;
        free(s->vx);
    }
    h->nsets = keep;
}

void holes_claim_done(struct holes *h, uint64_t claim, int64_t low)
{
    size_t keep = 0;
    for (size_t i = 0; i < h->n; i++) {
        struct hole x = h->v[i];
        if (x.expire && x.expire <= claim && x.lo < low) {
            if (x.hi < low)
                continue; /* searched by a claim after its transactions ended: gone */
            x.lo = low;   /* the part above low is still searched by later claims */
        }
        h->v[keep++] = x;
    }
    h->n = keep;
}
