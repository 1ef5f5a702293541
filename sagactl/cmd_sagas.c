/* sagactl start|status|list|retry|abort|stuck: operator commands against a database.
 *
 * Exit codes: 0 done; 1 the database refused (connection, SQL error such as an abort past
 * the pivot); 2 bad arguments (usage printed); 4 no saga with that id. Tables are aligned
 * for people; --json prints one JSON document for scripts. */
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>
#include <libpq-fe.h>

#include "commands.h"
#include "duration.h"

#define EXIT_DB 1
#define EXIT_USAGE 2
#define EXIT_NOT_FOUND 4

struct opts {
    const char *url;
    const char *input;
    const char *idempotency_key;
    const char *correlation_id;
    const char *status;
    const char *saga;
    const char *since;
    const char *reason;
    const char *limit;
    bool json;
    const char *positional[2];
    int npositional;
};

static const char *const usage_text =
    "usage:\n"
    "  sagactl start NAME --input JSON [--idempotency-key K] [--correlation-id C]\n"
    "  sagactl status ID\n"
    "  sagactl list [--status S] [--saga NAME] [--since DURATION] [--limit N]\n"
    "  sagactl retry ID\n"
    "  sagactl abort ID --reason TEXT\n"
    "  sagactl stuck\n"
    "common flags: --database-url URL (else SAGA_DATABASE_URL, else libpq's PG* variables),\n"
    "              --json (machine-readable output)\n"
    "exit codes: 0 done, 1 database error or refused, 2 bad arguments, 4 no such saga\n";

static int usage(const char *cmd, const char *problem)
{
    if (problem)
        fprintf(stderr, "sagactl %s: %s\n", cmd, problem);
    fputs(usage_text, stderr);
    return EXIT_USAGE;
}

static int parse(const char *cmd, int argc, char **argv, struct opts *o, int want_positional)
{
    memset(o, 0, sizeof(*o));
    o->limit = "50";
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        const char **slot = NULL;
        if (!strcmp(a, "--json")) {
            o->json = true;
            continue;
        }
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            fputs(usage_text, stdout);
            return 1;
        }
        if (!strcmp(a, "--database-url"))
            slot = &o->url;
        else if (!strcmp(a, "--input"))
            slot = &o->input;
        else if (!strcmp(a, "--idempotency-key"))
            slot = &o->idempotency_key;
        else if (!strcmp(a, "--correlation-id"))
            slot = &o->correlation_id;
        else if (!strcmp(a, "--status"))
            slot = &o->status;
        else if (!strcmp(a, "--saga"))
            slot = &o->saga;
        else if (!strcmp(a, "--since"))
            slot = &o->since;
        else if (!strcmp(a, "--reason"))
            slot = &o->reason;
        else if (!strcmp(a, "--limit"))
            slot = &o->limit;
        if (slot) {
            if (i + 1 >= argc) {
                char msg[128];
                snprintf(msg, sizeof(msg), "%s needs a value", a);
                return -usage(cmd, msg);
            }
            *slot = argv[++i];
            continue;
        }
        if (!strncmp(a, "--", 2)) {
            char msg[160];
            snprintf(msg, sizeof(msg), "unknown flag %.100s", a);
            return -usage(cmd, msg);
        }
        if (o->npositional >= want_positional || o->npositional >= 2)
            return -usage(cmd, "too many arguments");
        o->positional[o->npositional++] = a;
    }
    if (o->npositional < want_positional)
        return -usage(cmd, "missing argument");
    return 0;
}

static PGconn *connect_db(const char *cmd, const struct opts *o)
{
    const char *url = o->url && *o->url ? o->url : getenv("SAGA_DATABASE_URL");
    const char *const keys[] = {"dbname", "fallback_application_name", NULL};
    const char *const values[] = {url && *url ? url : NULL, "sagactl", NULL};
    PGconn *conn = PQconnectdbParams(keys, values, 1);
    if (!conn || PQstatus(conn) != CONNECTION_OK) {
        fprintf(stderr, "sagactl %s: cannot connect to the database: %s", cmd,
                conn ? PQerrorMessage(conn) : "out of memory\n");
        PQfinish(conn);
        return NULL;
    }
    return conn;
}

static bool is_uuid(const char *s)
{
    if (strlen(s) != 36)
        return false;
    for (int i = 0; i < 36; i++) {
        if (i == 8 || i == 13 || i == 18 || i == 23) {
            if (s[i] != '-')
                return false;
        } else if (!strchr("0123456789abcdefABCDEF", s[i])) {
            return false;
        }
    }
    return true;
}

/* Runs a query; on an SQL error prints the server's primary message and returns NULL. */
static PGresult *run(const char *cmd, PGconn *conn, const char *sql, int n,
                     const char *const *params)
{
    PGresult *res = PQexecParams(conn, sql, n, NULL, params, NULL, NULL, 0);
    ExecStatusType st = PQresultStatus(res);
    if (st != PGRES_TUPLES_OK && st != PGRES_COMMAND_OK) {
        const char *msg = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);
        fprintf(stderr, "sagactl %s: %s\n", cmd, msg ? msg : PQerrorMessage(conn));
        PQclear(res);
        return NULL;
    }
    return res;
}

/* Prints a result as an aligned table (people) or a JSON array of objects (--json). Columns
 * whose name ends in "_json" are embedded as JSON values. */
static void print_result(PGresult *res, bool json)
{
    int rows = PQntuples(res), cols = PQnfields(res);
    if (json) {
        cJSON *arr = cJSON_CreateArray();
        for (int r = 0; r < rows; r++) {
            cJSON *o = cJSON_CreateObject();
            cJSON_AddItemToArray(arr, o);
            for (int c = 0; c < cols; c++) {
                const char *name = PQfname(res, c);
                size_t n = strlen(name);
                if (PQgetisnull(res, r, c)) {
                    cJSON_AddNullToObject(o, name);
                } else if (n > 5 && !strcmp(name + n - 5, "_json")) {
                    char key[64];
                    snprintf(key, sizeof(key), "%.*s", (int)(n - 5), name);
                    cJSON *v = cJSON_Parse(PQgetvalue(res, r, c));
                    cJSON_AddItemToObject(o, key, v ? v : cJSON_CreateNull());
                } else {
                    cJSON_AddStringToObject(o, name, PQgetvalue(res, r, c));
                }
            }
        }
        char *text = cJSON_Print(arr);
        puts(text ? text : "[]");
        free(text);
        cJSON_Delete(arr);
        return;
    }
    size_t *width = calloc((size_t)cols, sizeof(*width));
    if (!width)
        return;
    for (int c = 0; c < cols; c++) {
        const char *name = PQfname(res, c);
        size_t n = strlen(name);
        width[c] = n > 5 && !strcmp(name + n - 5, "_json") ? n - 5 : n;
        for (int r = 0; r < rows; r++) {
            size_t l = strlen(PQgetvalue(res, r, c));
            if (l > 60)
                l = 60;
            if (l > width[c])
                width[c] = l;
        }
    }
    for (int c = 0; c < cols; c++) {
        const char *name = PQfname(res, c);
        size_t n = strlen(name);
        if (n > 5 && !strcmp(name + n - 5, "_json"))
            n -= 5;
        printf("%s%-*.*s", c ? "  " : "", (int)width[c], (int)n, name);
    }
    putchar('\n');
    for (int c = 0; c < cols; c++) {
        printf("%s", c ? "  " : "");
        for (size_t k = 0; k < width[c]; k++)
            putchar('-');
    }
    putchar('\n');
    for (int r = 0; r < rows; r++) {
        for (int c = 0; c < cols; c++) {
            const char *v = PQgetisnull(res, r, c) ? "" : PQgetvalue(res, r, c);
            if (strlen(v) > 60)
                printf("%s%.57s...", c ? "  " : "", v);
            else
                printf("%s%-*s", c ? "  " : "", (int)width[c], v);
        }
        putchar('\n');
    }
    printf("(%d row%s)\n", rows, rows == 1 ? "" : "s");
    free(width);
}

int cmd_start(int argc, char **argv)
{
    struct opts o;
    int rc = parse("start", argc, argv, &o, 1);
    if (rc)
        return rc > 0 ? 0 : -rc;
    if (!o.input)
        return usage("start", "--input JSON is required");
    cJSON *input = cJSON_Parse(o.input);
    bool object = cJSON_IsObject(input);
    cJSON_Delete(input);
    if (!object)
        return usage("start", "--input must be a JSON object");
    PGconn *conn = connect_db("start", &o);
    if (!conn)
        return EXIT_DB;
    const char *params[4] = {o.positional[0], o.input, o.idempotency_key, o.correlation_id};
    PGresult *res = run("start", conn, "SELECT saga.start($1, $2::jsonb, $3, $4) AS id", 4, params);
    rc = EXIT_DB;
    if (res) {
        if (o.json)
            printf("{\"id\": \"%s\"}\n", PQgetvalue(res, 0, 0));
        else
            printf("%s\n", PQgetvalue(res, 0, 0));
        PQclear(res);
        rc = 0;
    }
    PQfinish(conn);
    return rc;
}

int cmd_status(int argc, char **argv)
{
    struct opts o;
    int rc = parse("status", argc, argv, &o, 1);
    if (rc)
        return rc > 0 ? 0 : -rc;
    if (!is_uuid(o.positional[0]))
        return usage("status", "ID must be a saga id (uuid)");
    PGconn *conn = connect_db("status", &o);
    if (!conn)
        return EXIT_DB;
    const char *params[1] = {o.positional[0]};
    PGresult *inst = run("status", conn,
                         "SELECT id, saga_name AS saga, saga_version AS version, status, "
                         "current_step, phase, attempt, correlation_id, error, "
                         "to_char(deadline, 'YYYY-MM-DD HH24:MI:SS.MS') AS deadline, "
                         "to_char(created_at, 'YYYY-MM-DD HH24:MI:SS.MS') AS created_at, "
                         "to_char(completed_at, 'YYYY-MM-DD HH24:MI:SS.MS') AS completed_at, "
                         "input::text AS input_json FROM saga.instances WHERE id = $1::uuid",
                         1, params);
    PGresult *hist = inst ? run("status", conn,
                                "SELECT step, phase, attempt, status, "
                                "to_char(sent_at, 'HH24:MI:SS.MS') AS sent_at, "
                                "to_char(replied_at, 'HH24:MI:SS.MS') AS replied_at, "
                                "round(extract(epoch FROM replied_at - sent_at) * 1000) AS ms, "
                                "reply::text AS reply_json FROM saga.step_history "
                                "WHERE saga_id = $1::uuid ORDER BY id",
                                1, params)
                          : NULL;
    rc = EXIT_DB;
    if (inst && hist) {
        if (PQntuples(inst) == 0) {
            fprintf(stderr, "sagactl status: no saga %s\n", o.positional[0]);
            rc = EXIT_NOT_FOUND;
        } else if (o.json) {
            printf("{\"saga\": ");
            fflush(stdout);
            print_result(inst, true);
            printf(", \"history\": ");
            print_result(hist, true);
            printf("}\n");
            rc = 0;
        } else {
            int cols = PQnfields(inst);
            for (int c = 0; c < cols; c++) {
                const char *name = PQfname(inst, c);
                printf("%-15s %s\n", strcmp(name, "input_json") ? name : "input",
                       PQgetisnull(inst, 0, c) ? "" : PQgetvalue(inst, 0, c));
            }
            printf("\n");
            print_result(hist, false);
            rc = 0;
        }
    }
    PQclear(inst);
    PQclear(hist);
    PQfinish(conn);
    return rc;
}

int cmd_list(int argc, char **argv)
{
    struct opts o;
    int rc = parse("list", argc, argv, &o, 0);
    if (rc)
        return rc > 0 ? 0 : -rc;
    static const char *const statuses[] = {"pending",   "running",     "compensating",
                                           "completed", "compensated", "failed"};
    if (o.status) {
        bool known = false;
        for (size_t i = 0; i < 6; i++)
            known |= !strcmp(o.status, statuses[i]);
        if (!known)
            return usage("list", "--status is one of pending, running, compensating, completed, "
                                 "compensated, failed");
    }
    char since_ms[32] = "";
    if (o.since) {
        int64_t ms;
        if (duration_parse(o.since, &ms))
            return usage("list", "--since is a duration like 30s, 15m, 2h");
        snprintf(since_ms, sizeof(since_ms), "%lld", (long long)ms);
    }
    char *end;
    long limit = strtol(o.limit, &end, 10);
    if (*end || limit < 1 || limit > 100000)
        return usage("list", "--limit is a whole number from 1 to 100000");
    PGconn *conn = connect_db("list", &o);
    if (!conn)
        return EXIT_DB;
    const char *params[4] = {o.status, o.saga, o.since ? since_ms : NULL, o.limit};
    PGresult *res = run("list", conn,
                        "SELECT id, saga_name AS saga, saga_version AS version, status, "
                        "current_step, correlation_id, "
                        "to_char(updated_at, 'YYYY-MM-DD HH24:MI:SS') AS updated_at, error "
                        "FROM saga.instances WHERE ($1::text IS NULL OR status = $1) "
                        "AND ($2::text IS NULL OR saga_name = $2) "
                        "AND ($3::bigint IS NULL OR created_at >= now() - $3::bigint * "
                        "interval '1 millisecond') ORDER BY created_at DESC LIMIT $4::int",
                        4, params);
    rc = EXIT_DB;
    if (res) {
        print_result(res, o.json);
        PQclear(res);
        rc = 0;
    }
    PQfinish(conn);
    return rc;
}

static int operator_request(const char *cmd, int argc, char **argv, bool abort_it)
{
    struct opts o;
    int rc = parse(cmd, argc, argv, &o, 1);
    if (rc)
        return rc > 0 ? 0 : -rc;
    if (!is_uuid(o.positional[0]))
        return usage(cmd, "ID must be a saga id (uuid)");
    if (abort_it && (!o.reason || !*o.reason))
        return usage(cmd, "--reason TEXT is required");
    PGconn *conn = connect_db(cmd, &o);
    if (!conn)
        return EXIT_DB;
    const char *params[2] = {o.positional[0], o.reason};
    PGresult *res = PQexecParams(
        conn, abort_it ? "SELECT saga.abort($1::uuid, $2)" : "SELECT saga.retry($1::uuid)",
        abort_it ? 2 : 1, NULL, params, NULL, NULL, 0);
    if (PQresultStatus(res) == PGRES_TUPLES_OK) {
        if (o.json)
            printf("{\"id\": \"%s\", \"requested\": \"%s\"}\n", o.positional[0], cmd);
        else
            printf("%s requested for saga %s\n", cmd, o.positional[0]);
        rc = 0;
    } else {
        const char *state = PQresultErrorField(res, PG_DIAG_SQLSTATE);
        const char *msg = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);
        fprintf(stderr, "sagactl %s: %s\n", cmd, msg ? msg : PQerrorMessage(conn));
        rc = state && !strcmp(state, "SG010") ? EXIT_NOT_FOUND : EXIT_DB;
    }
    PQclear(res);
    PQfinish(conn);
    return rc;
}

int cmd_retry(int argc, char **argv)
{
    return operator_request("retry", argc, argv, false);
}

int cmd_abort(int argc, char **argv)
{
    return operator_request("abort", argc, argv, true);
}

int cmd_stuck(int argc, char **argv)
{
    struct opts o;
    int rc = parse("stuck", argc, argv, &o, 0);
    if (rc)
        return rc > 0 ? 0 : -rc;
    PGconn *conn = connect_db("stuck", &o);
    if (!conn)
        return EXIT_DB;
    /* Failed sagas wait for an operator; a deadline more than 10 s in the past means no
     * orchestrator is firing it (none running, or all of them behind). */
    PGresult *res = run("stuck", conn,
                        "SELECT id, saga_name AS saga, status, current_step, attempt, "
                        "CASE WHEN status = 'failed' THEN 'failed: waits for saga.retry' "
                        "ELSE 'deadline passed ' || to_char(now() - deadline, 'HH24:MI:SS') || "
                        "' ago' END AS why, error FROM saga.instances "
                        "WHERE status = 'failed' OR (deadline < now() - interval '10 seconds' "
                        "AND status IN ('running', 'compensating')) "
                        "ORDER BY updated_at LIMIT 1000",
                        0, NULL);
    rc = EXIT_DB;
    if (res) {
        print_result(res, o.json);
        PQclear(res);
        rc = 0;
    }
    PQfinish(conn);
    return rc;
}
