/* registry: the definitions the orchestrator runs. Files are validated and registered at
 * start; every version in saga.definitions is then loaded, because in-flight sagas keep the
 * version they started with. A version this binary cannot read (registered by a newer
 * orchestrator) is skipped with a warning: its sagas are not claimed here. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <libpq-fe.h>

#include "log.h"
#include "orchestrator.h"

static int registry_add(struct registry *reg, struct saga_definition *def)
{
    struct saga_definition **grown = realloc(reg->defs, (reg->count + 1) * sizeof(*grown));
    if (!grown)
        return -1;
    reg->defs = grown;
    reg->defs[reg->count++] = def;
    return 0;
}

static void append(char *err, size_t errlen, const char *line)
{
    size_t len = strlen(err);
    snprintf(err + len, errlen - len, "%s%s", len ? "\n" : "", line);
}

int registry_load(struct registry *reg, const char *conninfo, const char *dir, char *err,
                  size_t errlen)
{
    struct diag_list errs = {0};
    struct saga_definition **files = NULL;
    size_t file_count = 0;
    PGconn *conn = NULL;
    int rc = -1;
    err[0] = '\0';

    if (saga_definition_load_dir(dir, &files, &file_count, &errs)) {
        for (size_t i = 0; i < errs.count; i++)
            append(err, errlen, errs.items[i]);
        goto out;
    }
    conn = PQconnectdb(conninfo);
    if (PQstatus(conn) != CONNECTION_OK) {
        snprintf(err, errlen, "cannot connect to the database: %s", PQerrorMessage(conn));
        goto out;
    }
    for (size_t i = 0; i < file_count; i++) {
        char version[16];
        char *body = cJSON_PrintUnformatted(files[i]->body);
        snprintf(version, sizeof(version), "%d", files[i]->version);
        const char *params[3] = {files[i]->name, version, body};
        PGresult *res =
            PQexecParams(conn, "SELECT saga.register_definition($1, $2::int, $3::jsonb)", 3, NULL,
                         params, NULL, NULL, 0);
        free(body);
        if (PQresultStatus(res) != PGRES_TUPLES_OK) {
            char line[1024];
            snprintf(line, sizeof(line), "%s: %s", files[i]->source_label,
                     PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY)
                         ? PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY)
                         : PQresultErrorMessage(res));
            append(err, errlen, line);
        }
        PQclear(res);
    }
    if (err[0])
        goto out;
    PGresult *res = PQexec(conn, "SELECT name, version, body::text FROM saga.definitions "
                                 "ORDER BY name, version");
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        snprintf(err, errlen, "cannot read saga.definitions: %s", PQresultErrorMessage(res));
        PQclear(res);
        goto out;
    }
    for (int i = 0; i < PQntuples(res); i++) {
        char label[256];
        struct saga_definition *def = NULL;
        snprintf(label, sizeof(label), "saga.definitions(%s v%s)", PQgetvalue(res, i, 0),
                 PQgetvalue(res, i, 1));
        if (saga_definition_parse(label, PQgetvalue(res, i, 2), (size_t)PQgetlength(res, i, 2),
                                  &def, &errs)) {
            /* Registered by another orchestrator that this one cannot read (a newer release
             * in a rolling upgrade): not ours to run. Its sagas are left out of our claims
             * and left to the orchestrators that can (see worker.c). Our own files were
             * validated above, so this is never one of them. */
            log_at(LOG_WARN,
                   LOG_FIELDS("saga_name", PQgetvalue(res, i, 0), "saga_version",
                              PQgetvalue(res, i, 1), "error", errs.count ? errs.items[0] : NULL),
                   "a registered definition version cannot be read by this orchestrator; its "
                   "sagas are left to others");
            diag_clear(&errs);
            continue;
        }
        if (registry_add(reg, def)) {
            saga_definition_destroy(def);
            snprintf(err, errlen, "out of memory");
            break;
        }
    }
    PQclear(res);
    if (!err[0])
        rc = 0;
out:
    PQfinish(conn);
    for (size_t i = 0; i < file_count; i++)
        saga_definition_destroy(files[i]);
    free(files);
    diag_clear(&errs);
    return rc;
}

const struct saga_definition *registry_find(const struct registry *reg, const char *name,
                                            int version)
{
    for (size_t i = 0; i < reg->count; i++)
        if (reg->defs[i]->version == version && !strcmp(reg->defs[i]->name, name))
            return reg->defs[i];
    return NULL;
}

void registry_clear(struct registry *reg)
{
    for (size_t i = 0; i < reg->count; i++)
        saga_definition_destroy(reg->defs[i]);
    free(reg->defs);
    reg->defs = NULL;
    reg->count = 0;
}
