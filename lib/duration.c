#include "duration.h"

#include <ctype.h>
#include <stddef.h>
#include <string.h>

int duration_parse(const char *text, int64_t *ms)
{
    int64_t total = 0;
    const char *p = text;

    if (!text || !*text)
        return -1;
    while (*p) {
        int64_t n = 0;
        if (!isdigit((unsigned char)*p))
            return -1;
        while (isdigit((unsigned char)*p)) {
            if (n > (INT64_MAX - 9) / 10)
                return -1;
            n = n * 10 + (*p++ - '0');
        }
        int64_t unit;
        if (!strncmp(p, "ms", 2)) {
            unit = 1;
            p += 2;
        } else if (*p == 's') {
            unit = 1000;
            p++;
        } else if (*p == 'm') {
            unit = 60 * 1000;
            p++;
        } else if (*p == 'h') {
            unit = 3600 * 1000;
            p++;
        } else {
            return -1; /* a bare number or an unknown unit */
        }
        if (n > (INT64_MAX - total) / unit)
            return -1;
        total += n * unit;
    }
    *ms = total;
    return 0;
}
