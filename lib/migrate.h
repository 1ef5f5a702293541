/* migrate: applies the numbered SQL migrations of sql/ (compiled into the binary) once each,
 * in order, each in its own transaction, recorded in saga.schema_migrations, under a
 * session advisory lock so that several processes starting together are safe. */
#ifndef SAGA_MIGRATE_H
#define SAGA_MIGRATE_H

#include <stddef.h>

#include <libpq-fe.h>

struct migration {
    int version;
    const char *name;
    const char *sql;
};

/* The migrations of sql/, in version order (generated at build time). */
extern const struct migration migrations_builtin[];
extern const size_t migrations_builtin_count;

/* Applies every migration of list not yet recorded, in order, on conn (a connected, blocking
 * libpq connection; borrowed). A recorded migration whose text changed since is an error.
 * On success returns the number applied (0 when up to date); on failure returns -1 and
 * writes a message into err (never a password). Used before any event loop runs. */
__attribute__((warn_unused_result)) int migrate_apply(PGconn *conn, const struct migration *list,
                                                      size_t count, char *err, size_t errlen);

#endif
