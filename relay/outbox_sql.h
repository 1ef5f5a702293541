/* outbox_sql: the statements the relay runs on one outbox table, built once per table. Pure
 * (no I/O), so that tests can prepare and run exactly what the relay runs. */
#ifndef SAGA_OUTBOX_SQL_H
#define SAGA_OUTBOX_SQL_H

struct outbox_sql {
    char lock_key[24];       /* the leader lock, held by the lock session */
    char claim_lock_key[24]; /* the claim lock, held by the claim session (the fence) */
    /* Claim: rows in [$4, $1) (the holes below the low watermark, see holes.h) and above $2
     * (the cursor), at most $3, in seq order; a ninth column, upto (int8), is 0. */
    char *claim;
    /* The same, and only while the stored bytes (payload, headers, key) of the rows before
     * each are under $5 (the first row always comes); upto is the stored bytes up to and
     * including the row. */
    char *claim_capped;
    char *remove;  /* DELETE of acknowledged rows: $1 bigint[] of seq */
    char *dead;    /* move to the dead-letter table: $1 seq, $2 error text */
    char *session; /* SET enable_seqscan = off and plan_cache_mode = force_generic_plan (its
                    * plans are made once, on a small outbox: see outbox_sql.c), LISTEN, and
                    * the lock connection's PREPAREs (relay_delete, relay_dead, relay_writers:
                    * the transactions holding RowExclusiveLock on the table, relay_backlog) */
    /* The claim session's PREPAREs (relay_claim, relay_claim_capped), then
     * pg_try_advisory_lock(claim lock). */
    char *claim_session;
};

/* schema and table must be validated identifiers ([A-Za-z_][A-Za-z0-9_]*, as
 * relay_config_load checks). Fills *out (free with outbox_sql_free). Returns 0, or -1 when
 * out of memory. */
__attribute__((warn_unused_result)) int outbox_sql_build(const char *schema, const char *table,
                                                         struct outbox_sql *out);
void outbox_sql_free(struct outbox_sql *s);

#endif
