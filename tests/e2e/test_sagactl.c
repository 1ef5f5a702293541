/* sagactl's operator commands (start, status, list, retry, abort, stuck) against a real
 * PostgreSQL, through the real binary (SAGA_SAGACTL_BIN). */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pgtest.h"
#include "proc.h"

struct run {
    int code;
    char *out;
    char *err;
};

/* Runs sagactl with args against db (NULL-terminated args); bounded to 30 s. */
static struct run sagactl(const struct pgtest_db *db, const char *const args[])
{
    const char *argv[24];
    size_t n = 0;
    argv[n++] = getenv("SAGA_SAGACTL_BIN");
    cr_assert_not_null(argv[0], "SAGA_SAGACTL_BIN is not set");
    for (size_t i = 0; args[i] && n < 20; i++)
        argv[n++] = args[i];
    argv[n] = NULL;
    char env_url[1100];
    snprintf(env_url, sizeof(env_url), "SAGA_DATABASE_URL=%s", db->url);
    const char *env[] = {env_url, NULL};
    struct proc p;
    struct proc_options opts = {.name = "sagactl"};
    proc_start(&p, argv, env, &opts);
    cr_assert(proc_wait_exit(&p, 30000), "sagactl %s did not exit", args[0]);
    struct run r = {proc_exit_code(&p), proc_read_stdout(&p), proc_read_stderr(&p)};
    proc_cleanup(&p);
    return r;
}

static void run_free(struct run *r)
{
    free(r->out);
    free(r->err);
}

static PGconn *setup(struct pgtest_db *db)
{
    PGconn *conn = pgtest_fresh(db, true);
    char path[1024];
    snprintf(path, sizeof(path), "%s/sagas/order_fulfillment.json", getenv("SAGA_SOURCE_ROOT"));
    FILE *f = fopen(path, "r");
    cr_assert_not_null(f, "cannot read %s", path);
    static char body[65536];
    size_t len = fread(body, 1, sizeof(body) - 1, f);
    fclose(f);
    body[len] = '\0';
    const char *params[1] = {body};
    PQclear(pgtest_query(conn, "SELECT saga.register_definition('order_fulfillment', 1, $1::jsonb)",
                         1, params));
    return conn;
}

static const char *input = "{\"orderId\":\"o1\",\"customerId\":\"c1\",\"items\":[],\"amount\":5}";

Test(sagactl, start_is_idempotent_and_status_shows_the_saga)
{
    struct pgtest_db db;
    PGconn *conn = setup(&db);
    struct run a = sagactl(&db, (const char *[]){"start", "order_fulfillment", "--input", input,
                                                 "--idempotency-key", "k1", NULL});
    cr_assert_eq(a.code, 0, "stderr: %s", a.err);
    struct run b = sagactl(&db, (const char *[]){"start", "order_fulfillment", "--input", input,
                                                 "--idempotency-key", "k1", NULL});
    cr_assert_eq(b.code, 0);
    cr_assert_str_eq(a.out, b.out, "the same idempotency key must return the same id");
    cr_assert_eq(pgtest_count(conn, "SELECT count(*) FROM saga.instances", 0, NULL), 1);

    char id[64];
    snprintf(id, sizeof(id), "%.36s", a.out);
    struct run s = sagactl(&db, (const char *[]){"status", id, NULL});
    cr_assert_eq(s.code, 0, "stderr: %s", s.err);
    cr_assert(strstr(s.out, "pending") && strstr(s.out, "order_fulfillment"), "%s", s.out);
    struct run j = sagactl(&db, (const char *[]){"status", id, "--json", NULL});
    cr_assert_eq(j.code, 0);
    cr_assert(strstr(j.out, "\"history\""), "%s", j.out);
    run_free(&a);
    run_free(&b);
    run_free(&s);
    run_free(&j);
    PQfinish(conn);
    pgtest_db_drop(&db);
}

Test(sagactl, errors_have_their_exit_codes)
{
    struct pgtest_db db;
    PGconn *conn = setup(&db);
    struct run missing = sagactl(
        &db, (const char *[]){"start", "order_fulfillment", "--input", "{\"orderId\":1}", NULL});
    cr_assert_eq(missing.code, 1);
    cr_assert(strstr(missing.err, "customerId"), "%s", missing.err);
    struct run unknown = sagactl(&db, (const char *[]){"start", "nope", "--input", "{}", NULL});
    cr_assert_eq(unknown.code, 1);
    cr_assert(strstr(unknown.err, "unknown saga"), "%s", unknown.err);
    struct run noinput = sagactl(&db, (const char *[]){"start", "order_fulfillment", NULL});
    cr_assert_eq(noinput.code, 2);
    cr_assert(strstr(noinput.err, "usage"), "%s", noinput.err);
    struct run badflag = sagactl(&db, (const char *[]){"list", "--colour", "red", NULL});
    cr_assert_eq(badflag.code, 2);
    struct run badstatus = sagactl(&db, (const char *[]){"list", "--status", "nope", NULL});
    cr_assert_eq(badstatus.code, 2);
    struct run nosaga =
        sagactl(&db, (const char *[]){"status", "00000000-0000-0000-0000-000000000000", NULL});
    cr_assert_eq(nosaga.code, 4);
    struct run noretry =
        sagactl(&db, (const char *[]){"retry", "00000000-0000-0000-0000-000000000000", NULL});
    cr_assert_eq(noretry.code, 4);
    struct run noreason =
        sagactl(&db, (const char *[]){"abort", "00000000-0000-0000-0000-000000000000", NULL});
    cr_assert_eq(noreason.code, 2);
    struct run *all[] = {&missing,   &unknown, &noinput, &badflag,
                         &badstatus, &nosaga,  &noretry, &noreason};
    for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++)
        run_free(all[i]);
    cr_assert_eq(pgtest_count(conn, "SELECT count(*) FROM saga.instances", 0, NULL), 0);
    PQfinish(conn);
    pgtest_db_drop(&db);
}

Test(sagactl, list_abort_retry_and_stuck)
{
    struct pgtest_db db;
    PGconn *conn = setup(&db);
    struct run a = sagactl(&db, (const char *[]){"start", "order_fulfillment", "--input", input,
                                                 "--correlation-id", "corr-7", NULL});
    cr_assert_eq(a.code, 0);
    char id[64];
    snprintf(id, sizeof(id), "%.36s", a.out);

    struct run l =
        sagactl(&db, (const char *[]){"list", "--status", "pending", "--since", "1h", NULL});
    cr_assert_eq(l.code, 0);
    cr_assert(strstr(l.out, id) && strstr(l.out, "corr-7") && strstr(l.out, "(1 row)"), "%s",
              l.out);
    struct run none = sagactl(&db, (const char *[]){"list", "--status", "failed", NULL});
    cr_assert(strstr(none.out, "(0 rows)"), "%s", none.out);

    struct run r = sagactl(&db, (const char *[]){"retry", id, NULL});
    cr_assert_eq(r.code, 1, "retry of a pending saga must be refused");
    cr_assert(strstr(r.err, "only a failed saga"), "%s", r.err);
    struct run ab = sagactl(&db, (const char *[]){"abort", id, "--reason", "customer left", NULL});
    cr_assert_eq(ab.code, 0, "%s", ab.err);
    const char *params[1] = {id};
    char *req = pgtest_value(conn, "SELECT pending_request FROM saga.instances WHERE id = $1::uuid",
                             1, params);
    cr_assert_str_eq(req, "abort");
    free(req);

    /* A failed saga and one whose deadline nobody fired show up in stuck. */
    pgtest_exec(conn, "UPDATE saga.instances SET status = 'failed', pending_request = NULL");
    struct run st = sagactl(&db, (const char *[]){"stuck", "--json", NULL});
    cr_assert_eq(st.code, 0);
    cr_assert(strstr(st.out, id) && strstr(st.out, "waits for saga.retry"), "%s", st.out);
    struct run rr = sagactl(&db, (const char *[]){"retry", id, NULL});
    cr_assert_eq(rr.code, 0, "%s", rr.err);
    struct run *all[] = {&a, &l, &none, &r, &ab, &st, &rr};
    for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++)
        run_free(all[i]);
    PQfinish(conn);
    pgtest_db_drop(&db);
}
