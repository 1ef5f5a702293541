/* sagactl migrate: applies the SQL migrations compiled into this binary. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <libpq-fe.h>

#include "commands.h"
#include "migrate.h"

static void migrate_usage(FILE *out)
{
    fputs("usage: sagactl migrate [--database-url URL]\n"
          "\n"
          "Applies the SQL migrations of schema saga that are not applied yet.\n"
          "URL is a libpq connection URI or conninfo string; without the flag,\n"
          "SAGA_DATABASE_URL is used, else libpq's PG* environment variables.\n",
          out);
}

static void say_retry(void *arg, const char *message)
{
    (void)arg;
    fprintf(stderr, "sagactl migrate: %s\n", message);
}

int cmd_migrate(int argc, char **argv)
{
    const char *url = NULL;
    for (int i = 0; i < argc; i++) {
        const char *arg = argv[i];
        if (!strcmp(arg, "-h") || !strcmp(arg, "--help")) {
            migrate_usage(stdout);
            return 0;
        } else if (!strcmp(arg, "--database-url")) {
            if (i + 1 >= argc) {
                fputs("sagactl migrate: --database-url needs a value\n", stderr);
                migrate_usage(stderr);
                return 2;
            }
            url = argv[++i];
        } else if (!strncmp(arg, "--database-url=", 15)) {
            url = arg + 15;
        } else {
            /* Do not echo arg: it could be a URL with a password given without the flag. */
            fputs("sagactl migrate: unexpected argument\n", stderr);
            migrate_usage(stderr);
            return 2;
        }
    }
    if (!url || !*url)
        url = getenv("SAGA_DATABASE_URL");

    /* An empty or NULL dbname leaves everything to libpq's defaults (PG* variables). */
    const char *const keys[] = {"dbname", "fallback_application_name", NULL};
    const char *const values[] = {url && *url ? url : NULL, "sagactl", NULL};
    PGconn *conn = PQconnectdbParams(keys, values, 1);
    if (!conn) {
        fputs("sagactl migrate: out of memory\n", stderr);
        return 1;
    }
    if (PQstatus(conn) != CONNECTION_OK) {
        /* libpq's message names host and port, never the password. */
        fprintf(stderr, "sagactl migrate: cannot connect to the database: %s",
                PQerrorMessage(conn));
        PQfinish(conn);
        return 1;
    }

    char err[1024];
    int rc = 1;
    int version = 0;
    struct migrate_options o = migrate_default_options;
    o.on_retry = say_retry;
    int applied = migrate_apply_with(conn, migrations_builtin, migrations_builtin_count, &o, err,
                                     sizeof(err));
    if (applied < 0) {
        fprintf(stderr, "sagactl migrate: %s\n", err);
        goto cleanup;
    }
    if (migrate_current_version(conn, &version, err, sizeof(err))) {
        fprintf(stderr, "sagactl migrate: %s\n", err);
        goto cleanup;
    }
    if (applied > 0)
        printf("applied %d migrations (now at version %d)\n", applied, version);
    else
        printf("database is up to date (version %d)\n", version);
    rc = 0;

cleanup:
    PQfinish(conn);
    return rc;
}
