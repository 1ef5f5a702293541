/* diag: a growable list of error messages, so that parsers and validators can report every
 * problem at once instead of stopping at the first. */
#ifndef SAGA_DIAG_H
#define SAGA_DIAG_H

#include <stddef.h>

struct diag_list {
    char **items; /* owned; each item owned */
    size_t count;
    size_t cap;
};

/* Appends one formatted message. Aborts on allocation failure (an error list that silently
 * drops errors would let bad input pass). */
void diag_addf(struct diag_list *list, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Frees every message and leaves the list empty and reusable. Accepts NULL. */
void diag_clear(struct diag_list *list);

#endif
