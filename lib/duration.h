/* duration: "250ms", "10s", "2m", "1h", "1m30s" -> milliseconds. */
#ifndef SAGA_DURATION_H
#define SAGA_DURATION_H

#include <stdint.h>

/* Parses text into *ms. Accepts one or more <integer><unit> groups with units ms, s, m, h;
 * rejects empty text, bare numbers, negative values and overflow. Returns 0 or -1. */
__attribute__((warn_unused_result)) int duration_parse(const char *text, int64_t *ms);

#endif
