/* migrate: applies the numbered SQL migrations of sql/ (compiled into the binary) once each,
 * in order, each in its own transaction, recorded in saga.schema_migrations, under a
 * session advisory lock so that several processes starting together are safe. */
#ifndef SAGA_MIGRATE_H
#define SAGA_MIGRATE_H

#include <stddef.h>
#include <stdint.h>

#include <libpq-fe.h>

/* The key of the session advisory lock (pg_advisory_lock(bigint)) held while migrating:
 * the ASCII bytes "sagaMIGR". Other tools that change the saga schema can take it too. */
#define MIGRATE_LOCK_KEY INT64_C(0x736167614d494752)

struct migration {
    int version;
    const char *name;
    const char *sql;
};

/* The migrations of sql/, in version order (generated at build time). */
extern const struct migration migrations_builtin[];
extern const size_t migrations_builtin_count;

/* How a migration waits for its locks. Each lock it waits for is bounded by lock_timeout_ms
 * (SET LOCAL lock_timeout): a migration queued for a table's lock behind a long transaction
 * would otherwise hold up every writer of that table, which queues behind the migration. A
 * migration that fails on a lock (lock timeout, deadlock with the running services,
 * serialization failure) is rolled back and tried again, max_attempts times in all, waiting
 * backoff_ms, doubled up to backoff_max_ms, between tries. on_retry (may be NULL) is told of
 * each retry, before its wait. */
struct migrate_options {
    int lock_timeout_ms; /* 0: the session's own lock_timeout (none by default) */
    int max_attempts;
    int backoff_ms;
    int backoff_max_ms;
    void (*on_retry)(void *arg, const char *message);
    void *on_retry_arg;
};

/* lock_timeout 3 s, 10 attempts, 200 ms doubled up to 5 s (at most ~1 min in all), no
 * on_retry. */
extern const struct migrate_options migrate_default_options;

/* Applies every migration of list not yet recorded, in order, on conn (a connected, blocking
 * libpq connection; borrowed). A recorded migration whose text changed since is an error.
 * On success returns the number applied (0 when up to date); on failure returns -1 and
 * writes a message into err (never a password), such as "migration 001_schema: <server
 * message>"; the failed migration is rolled back. Versions recorded in the database that list
 * lacks (a newer binary migrated) are fine. The advisory lock MIGRATE_LOCK_KEY is held
 * throughout (blocking until another migrating process is done) and always released.
 * Migration texts must not contain BEGIN/COMMIT. Used before any event loop runs. */
__attribute__((warn_unused_result)) int migrate_apply(PGconn *conn, const struct migration *list,
                                                      size_t count, char *err, size_t errlen);

/* An on_retry that logs the message as a warning (log.h). */
void migrate_log_retry(void *arg, const char *message);

/* migrate_apply with options (NULL: migrate_default_options, which migrate_apply uses). */
__attribute__((warn_unused_result)) int
migrate_apply_with(PGconn *conn, const struct migration *list, size_t count,
                   const struct migrate_options *options, char *err, size_t errlen);

/* Sets *version to the highest version recorded in saga.schema_migrations (0 when the table
 * is missing or empty). Returns 0, or -1 with a message in err. conn is borrowed. */
__attribute__((warn_unused_result)) int migrate_current_version(PGconn *conn, int *version,
                                                                char *err, size_t errlen);

/* The checksum recorded for a migration's text: FNV-1a 64 as 16 lowercase hex digits. */
void migrate_checksum(const char *sql, char out[17]);

#endif
