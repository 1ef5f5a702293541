#include <criterion/criterion.h>

#include "diag.h"

Test(diag, keeps_every_message_in_order)
{
    struct diag_list list = {0};
    for (int i = 0; i < 100; i++)
        diag_addf(&list, "error %d at %s", i, "x");
    cr_assert_eq(list.count, 100);
    cr_assert_str_eq(list.items[0], "error 0 at x");
    cr_assert_str_eq(list.items[99], "error 99 at x");
    diag_clear(&list);
    cr_assert_eq(list.count, 0);
    cr_assert_null(list.items);
    diag_clear(NULL);
}
