/* settings: size values (SETTING_SIZE, settings_parse_size) and their errors. */
#include <stdint.h>
#include <string.h>

#include <criterion/criterion.h>

#include "settings.h"

Test(settings, sizes_with_units_are_powers_of_1024)
{
    int64_t v = -1;
    cr_assert_eq(settings_parse_size("0", &v), 0);
    cr_assert_eq(v, 0);
    cr_assert_eq(settings_parse_size("4096", &v), 0);
    cr_assert_eq(v, 4096);
    cr_assert_eq(settings_parse_size("10B", &v), 0);
    cr_assert_eq(v, 10);
    cr_assert_eq(settings_parse_size("512KB", &v), 0);
    cr_assert_eq(v, 512 * 1024);
    cr_assert_eq(settings_parse_size("16MB", &v), 0);
    cr_assert_eq(v, 16 * 1024 * 1024);
    cr_assert_eq(settings_parse_size("16mib", &v), 0);
    cr_assert_eq(v, 16 * 1024 * 1024);
    cr_assert_eq(settings_parse_size("2G", &v), 0);
    cr_assert_eq(v, INT64_C(2) << 30);
}

Test(settings, sizes_that_are_not_sizes_are_refused)
{
    const char *bad[] = {"",
                         "MB",
                         "-1MB",
                         "1.5MB",
                         "16 MB",
                         "16TB",
                         "16MBs",
                         " 16MB",
                         "99999999999999999999",
                         "9000000000000GB"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        int64_t v = 7;
        cr_assert_eq(settings_parse_size(bad[i], &v), -1, "\"%s\" accepted", bad[i]);
        cr_assert_eq(v, 7, "\"%s\" changed the value", bad[i]);
    }
}

/* A SETTING_SIZE entry: parsed from the environment, its bounds enforced, and the error names
 * the flag and the variable. */
Test(settings, size_setting_from_the_environment_and_its_bounds)
{
    int64_t bytes = 0;
    struct setting table[] = {
        {"max-bytes", "TEST_SETTINGS_MAX_BYTES", SETTING_SIZE, &bytes, "16MB", "a size", false, 1,
         INT64_C(1) << 30},
    };
    char err[512] = "";
    char *argv[] = {NULL};
    unsetenv("TEST_SETTINGS_MAX_BYTES");
    cr_assert_eq(settings_load(table, 1, 0, argv, "prog", err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(bytes, 16 * 1024 * 1024);
    setenv("TEST_SETTINGS_MAX_BYTES", "4MB", 1);
    cr_assert_eq(settings_load(table, 1, 0, argv, "prog", err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(bytes, 4 * 1024 * 1024);
    setenv("TEST_SETTINGS_MAX_BYTES", "0", 1);
    cr_assert_eq(settings_load(table, 1, 0, argv, "prog", err, sizeof(err)), -1);
    cr_assert(strstr(err, "--max-bytes") && strstr(err, "TEST_SETTINGS_MAX_BYTES"), "%s", err);
    setenv("TEST_SETTINGS_MAX_BYTES", "2GB", 1);
    cr_assert_eq(settings_load(table, 1, 0, argv, "prog", err, sizeof(err)), -1);
    unsetenv("TEST_SETTINGS_MAX_BYTES");
}
