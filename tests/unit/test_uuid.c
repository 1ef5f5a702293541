/* uuid: version 7 ids (lib/uuid.c): their layout, order and uniqueness. */
#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "uuid.h"

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* The 48-bit millisecond timestamp of a text uuid (its first 12 hex digits). */
static int64_t stamp(const char *u)
{
    char hex[13];
    memcpy(hex, u, 8);
    memcpy(hex + 8, u + 9, 4);
    hex[12] = '\0';
    return strtoll(hex, NULL, 16);
}

Test(uuid, layout_is_version_7_with_the_rfc_variant_and_the_current_time)
{
    int64_t before = now_ms();
    char u[SAGA_UUID_LEN + 1];
    saga_uuid_v7(u, NULL);
    int64_t after = now_ms();
    cr_assert_eq(strlen(u), 36);
    cr_assert(u[8] == '-' && u[13] == '-' && u[18] == '-' && u[23] == '-', "%s", u);
    cr_assert_eq(u[14], '7', "version nibble of %s", u);
    cr_assert(strchr("89ab", u[19]), "variant of %s", u);
    for (const char *p = u; *p; p++)
        cr_assert(*p == '-' || strchr("0123456789abcdef", *p), "%s is lowercase hex", u);
    cr_assert(stamp(u) >= before && stamp(u) <= after, "timestamp %lld not in [%lld, %lld]",
              (long long)stamp(u), (long long)before, (long long)after);
}

/* Strictly increasing in text order (which is byte order: lowercase hex, dashes at the same
 * places), many ids per millisecond included, and all different. */
Test(uuid, ids_of_a_thread_strictly_increase)
{
    enum { N = 200000 };
    char prev[SAGA_UUID_LEN + 1] = "";
    for (int i = 0; i < N; i++) {
        char u[SAGA_UUID_LEN + 1];
        saga_uuid_v7(u, NULL);
        cr_assert(strcmp(u, prev) > 0, "id %d %s not after %s", i, u, prev);
        memcpy(prev, u, sizeof(u));
    }
}

/* The clock stepping back does not step the ids back: they keep the last timestamp (and
 * count on) until the clock passes it again. */
Test(uuid, a_clock_stepping_back_keeps_the_order)
{
    char a[SAGA_UUID_LEN + 1], b[SAGA_UUID_LEN + 1], c[SAGA_UUID_LEN + 1];
    int64_t t = now_ms() + 100000; /* ahead of anything this thread made */
    saga_uuid_v7_at(a, t);
    saga_uuid_v7_at(b, t - 5000);
    cr_assert(strcmp(b, a) > 0, "%s after %s", b, a);
    cr_assert_eq(stamp(b), t, "keeps the last timestamp");
    saga_uuid_v7_at(c, t + 1);
    cr_assert(strcmp(c, b) > 0);
    cr_assert_eq(stamp(c), t + 1, "follows the clock again once it moves on");
}

/* More than the counter holds in one millisecond: the timestamp runs ahead, order kept. */
Test(uuid, counter_overflow_moves_to_the_next_millisecond)
{
    int64_t t = now_ms() + 200000;
    char prev[SAGA_UUID_LEN + 1] = "", u[SAGA_UUID_LEN + 1];
    for (int i = 0; i < 5000; i++) {
        saga_uuid_v7_at(u, t);
        cr_assert(strcmp(u, prev) > 0, "id %d %s not after %s", i, u, prev);
        memcpy(prev, u, sizeof(u));
    }
    cr_assert(stamp(u) > t, "5,000 ids in one millisecond borrowed the next ones");
    cr_assert(stamp(u) <= t + 3, "at most 2 more milliseconds (>= 2,048 ids each)");
}
