/* uuid: time-ordered ids (UUID version 7). See uuid.h. */
#include "uuid.h"

#include <errno.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include <uuid/uuid.h>

/* n random bytes (n <= 16) from a per-thread pool refilled 4 KiB at a time by getrandom (one
 * call per ~400 ids rather than one per id: libuuid's uuid_generate_random made a getrandom
 * call and stirred random(3) for every id, ~8% of the orchestrator's CPU under load, perf
 * 2026-11-26); bytes handed out are wiped from the pool. A process that forks would share the
 * pool's rest with its child (none of ours forks). If getrandom fails, libuuid's random
 * generator fills them. */
static void random_bytes(unsigned char *out, size_t n)
{
    static _Thread_local unsigned char pool[4096];
    static _Thread_local size_t used = sizeof(pool);
    if (used + n > sizeof(pool)) {
        size_t got = 0;
        while (got < sizeof(pool)) {
            ssize_t r = getrandom(pool + got, sizeof(pool) - got, 0);
            if (r < 0 && errno == EINTR)
                continue;
            if (r <= 0)
                break;
            got += (size_t)r;
        }
        if (got < sizeof(pool)) {
            uuid_t uu;
            uuid_generate_random(uu);
            memcpy(out, uu, n);
            return;
        }
        used = 0;
    }
    memcpy(out, pool + used, n);
    memset(pool + used, 0, n);
    used += n;
}

void saga_uuid_v7_at(char out[SAGA_UUID_LEN + 1], int64_t now_ms)
{
    /* RFC 9562 6.2, method 1: a counter in rand_a, seeded at random in each new millisecond
     * with its top bit clear (room for at least 2,048 more ids in that millisecond). */
    static _Thread_local int64_t last_ms = -1;
    static _Thread_local unsigned counter;
    unsigned char r[10];
    random_bytes(r, sizeof(r));
    if (now_ms > last_ms) {
        last_ms = now_ms;
        counter = ((unsigned)r[8] << 8 | r[9]) & 0x7ff;
    } else if (++counter > 0xfff) {
        /* The clock stepped back, or 4,096 ids in one millisecond: the next millisecond. */
        last_ms++;
        counter = ((unsigned)r[8] << 8 | r[9]) & 0x7ff;
    }
    uuid_t uu;
    uint64_t ms = (uint64_t)last_ms & UINT64_C(0xffffffffffff);
    for (int i = 0; i < 6; i++)
        uu[i] = (unsigned char)(ms >> (40 - 8 * i));
    uu[6] = (unsigned char)(0x70 | (counter >> 8));
    uu[7] = (unsigned char)(counter & 0xff);
    memcpy(uu + 8, r, 8);
    uu[8] = (unsigned char)((uu[8] & 0x3f) | 0x80); /* RFC 9562 variant */
    uuid_unparse_lower(uu, out);
}

void saga_uuid_v7(char out[SAGA_UUID_LEN + 1], void *arg)
{
    (void)arg;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    saga_uuid_v7_at(out, (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000);
}

void saga_uuid_random(char out[SAGA_UUID_LEN + 1], void *arg)
{
    (void)arg;
    uuid_t uu;
    random_bytes(uu, sizeof(uu));
    uu[6] = (unsigned char)((uu[6] & 0x0f) | 0x40); /* version 4 */
    uu[8] = (unsigned char)((uu[8] & 0x3f) | 0x80); /* RFC 4122 variant */
    uuid_unparse_lower(uu, out);
}
