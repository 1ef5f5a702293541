#include <criterion/criterion.h>

#include "duration.h"

Test(duration, parses_units)
{
    int64_t ms = -1;
    cr_assert_eq(duration_parse("250ms", &ms), 0);
    cr_assert_eq(ms, 250);
    cr_assert_eq(duration_parse("10s", &ms), 0);
    cr_assert_eq(ms, 10000);
    cr_assert_eq(duration_parse("2m", &ms), 0);
    cr_assert_eq(ms, 120000);
    cr_assert_eq(duration_parse("1h", &ms), 0);
    cr_assert_eq(ms, 3600000);
    cr_assert_eq(duration_parse("1m30s", &ms), 0);
    cr_assert_eq(ms, 90000);
    cr_assert_eq(duration_parse("0s", &ms), 0);
    cr_assert_eq(ms, 0);
}

Test(duration, rejects_bad_text)
{
    int64_t ms = 42;
    const char *bad[] = {"",
                         "10",
                         "s",
                         "-1s",
                         "1.5s",
                         "10 s",
                         "10sec",
                         "5d",
                         "ms",
                         "99999999999999999999s",
                         "9223372036854775807h"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        cr_assert_eq(duration_parse(bad[i], &ms), -1, "accepted \"%s\"", bad[i]);
    cr_assert_eq(duration_parse(NULL, &ms), -1);
    cr_assert_eq(ms, 42, "a failed parse must not write its output");
}
