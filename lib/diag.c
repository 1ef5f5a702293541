#include "diag.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

void diag_addf(struct diag_list *list, const char *fmt, ...)
{
    va_list ap;
    char *msg = NULL;

    va_start(ap, fmt);
    int n = vasprintf(&msg, fmt, ap);
    va_end(ap);
    if (n < 0) {
        fputs("diag_addf: out of memory\n", stderr);
        abort();
    }
    if (list->count == list->cap) {
        size_t cap = list->cap ? list->cap * 2 : 8;
        char **items = realloc(list->items, cap * sizeof(*items));
        if (!items) {
            fputs("diag_addf: out of memory\n", stderr);
            abort();
        }
        list->items = items;
        list->cap = cap;
    }
    list->items[list->count++] = msg;
}

void diag_clear(struct diag_list *list)
{
    if (!list)
        return;
    for (size_t i = 0; i < list->count; i++)
        free(list->items[i]);
    free(list->items);
    list->items = NULL;
    list->count = list->cap = 0;
}
