/* relay/holes.c: the missing seq values below the relay's cursor, and when they may be
 * forgotten (see holes.h for the rule these tests pin down). */
#include <criterion/criterion.h>

#include "holes.h"

static struct holes *h;

static void setup(void)
{
    h = holes_new();
    cr_assert(h);
}

static void teardown(void)
{
    holes_free(h);
}

TestSuite(holes, .init = setup, .fini = teardown);

static int64_t floor_of(void)
{
    int64_t f = -1;
    cr_assert(holes_floor(h, &f), "expected an open hole");
    return f;
}

Test(holes, ranges_open_fill_and_split)
{
    int64_t f;
    cr_assert_not(holes_floor(h, &f));
    holes_open(h, 10, 12);
    holes_open(h, 20, 20);
    cr_assert_eq(holes_count(h), 2);
    cr_assert_eq(floor_of(), 10);
    holes_fill(h, 11); /* splits 10..12 */
    cr_assert_eq(holes_count(h), 3);
    holes_fill(h, 10);
    cr_assert_eq(floor_of(), 12);
    holes_fill(h, 12);
    holes_fill(h, 15); /* not a hole: nothing happens */
    cr_assert_eq(floor_of(), 20);
    holes_fill(h, 20);
    cr_assert_eq(holes_count(h), 0);
    cr_assert_not(holes_want_sweep(h));
}

/* Seen, then a sweep names transaction A; A still there at the next sweep; gone at the
 * third: the hole may be forgotten once claim 5 (the first sent after that sweep) has read
 * below it, not by claim 4, and not by claim 5 if its low watermark was not above it. */
Test(holes, forgotten_after_its_writers_end_and_a_later_claim_searched_it)
{
    holes_open(h, 7, 8);
    cr_assert(holes_want_sweep(h));
    const char *a[] = {"3/42"};
    holes_sweep_done(h, holes_sweep_sent(h), a, 1, 2);
    holes_claim_done(h, 2, 100);
    cr_assert_eq(holes_count(h), 1, "A may still commit the row");
    holes_sweep_done(h, holes_sweep_sent(h), a, 1, 3);
    holes_claim_done(h, 3, 100);
    cr_assert_eq(holes_count(h), 1);
    const char *other[] = {"4/7"}; /* a newer writer cannot fill an older hole */
    holes_sweep_done(h, holes_sweep_sent(h), other, 1, 5);
    cr_assert_not(holes_want_sweep(h), "nothing left to learn from sweeps");
    holes_claim_done(h, 4, 100);
    cr_assert_eq(holes_count(h), 1, "claim 4 was sent before A was seen gone");
    holes_claim_done(h, 5, 8);
    cr_assert_eq(floor_of(), 8, "claim 5 read below 8 only: 7 forgotten, 8 kept");
    holes_claim_done(h, 6, 9);
    cr_assert_eq(holes_count(h), 0);
}

/* A sweep sent before the hole was seen says nothing about it. */
Test(holes, a_sweep_sent_before_the_hole_does_not_count)
{
    uint64_t early = holes_sweep_sent(h);
    holes_open(h, 5, 5);
    holes_sweep_done(h, early, NULL, 0, 2);
    holes_claim_done(h, 2, 100);
    cr_assert_eq(holes_count(h), 1);
    holes_sweep_done(h, holes_sweep_sent(h), NULL, 0, 3); /* no writer at all */
    holes_claim_done(h, 3, 100);
    cr_assert_eq(holes_count(h), 0);
}

/* A row that arrives late fills its hole whatever the sweeps say. */
Test(holes, filled_by_a_late_row)
{
    holes_open(h, 5, 6);
    const char *a[] = {"3/42"};
    holes_sweep_done(h, holes_sweep_sent(h), a, 1, 2);
    holes_fill(h, 5);
    holes_fill(h, 6);
    cr_assert_eq(holes_count(h), 0);
    holes_sweep_done(h, holes_sweep_sent(h), NULL, 0, 3); /* the set empties: no crash */
    cr_assert_not(holes_want_sweep(h));
}

/* Very many ranges are merged into one that covers them all (searching more is safe). */
Test(holes, many_ranges_merge)
{
    for (int64_t i = 0; i < 5000; i++)
        holes_open(h, 10 + 2 * i, 10 + 2 * i);
    cr_assert_lt(holes_count(h), 4097);
    cr_assert_eq(floor_of(), 10);
    holes_clear(h);
    cr_assert_eq(holes_count(h), 0);
}
