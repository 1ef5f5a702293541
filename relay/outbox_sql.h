/* outbox_sql: the statements the relay runs on one outbox table, built once per table. Pure
 * (no I/O), so that tests can prepare and run exactly what the relay runs. */
#ifndef SAGA_OUTBOX_SQL_H
#define SAGA_OUTBOX_SQL_H

struct outbox_sql {
    char lock_key[24];                 /* the leader lock: pg_try_advisory_lock(lock_key::bigint) */
    unsigned lock_classid, lock_objid; /* the same key as pg_locks shows it */
    /* Claim: $1 low watermark, $2 cursor, $3 limit, $4 the lock holder's pid, $5 its
     * backend_start. Returns rows only while that backend holds the lock (the fence). */
    char *claim;
    char *remove;        /* DELETE of acknowledged rows: $1 bigint[] of seq */
    char *dead;          /* move to the dead-letter table: $1 seq, $2 error text */
    char *session;       /* LISTEN and the lock connection's PREPAREs */
    char *claim_session; /* the claim connection's PREPARE relay_claim */
};

/* schema and table must be validated identifiers ([A-Za-z_][A-Za-z0-9_]*, as
 * relay_config_load checks). Fills *out (free with outbox_sql_free). Returns 0, or -1 when
 * out of memory. */
__attribute__((warn_unused_result)) int outbox_sql_build(const char *schema, const char *table,
                                                         struct outbox_sql *out);
void outbox_sql_free(struct outbox_sql *s);

#endif
