/* outbox_sql: the statements the relay runs on one outbox table. See outbox_sql.h. */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "outbox_sql.h"

int outbox_sql_build(const char *schema, const char *table, struct outbox_sql *out)
{
    memset(out, 0, sizeof(*out));
    char label[256];
    snprintf(label, sizeof(label), "%s.%s", schema, table);
    /* The leader lock's key: a 64-bit FNV-1a hash of "saga-relay:schema.table". */
    uint64_t h = 1469598103934665603ULL;
    const char *prefix = "saga-relay:";
    for (const char *p = prefix; *p; p++)
        h = (h ^ (unsigned char)*p) * 1099511628211ULL;
    for (const char *p = label; *p; p++)
        h = (h ^ (unsigned char)*p) * 1099511628211ULL;
    snprintf(out->lock_key, sizeof(out->lock_key), "%" PRId64, (int64_t)h);
    /* The claim lock: the same hash over "saga-relay-claim:schema.table". */
    uint64_t c = 1469598103934665603ULL;
    for (const char *p = "saga-relay-claim:"; *p; p++)
        c = (c ^ (unsigned char)*p) * 1099511628211ULL;
    for (const char *p = label; *p; p++)
        c = (c ^ (unsigned char)*p) * 1099511628211ULL;
    snprintf(out->claim_lock_key, sizeof(out->claim_lock_key), "%" PRId64, (int64_t)c);
    /* Validated identifiers (see the header); quoting keeps them exact. */
    char q[600];
    snprintf(q, sizeof(q), "\"%s\".\"%s\"", schema, table);
    /* The claim: rows in [$4, $1) and above $2, in seq order, at most $3. Its ninth column,
     * upto, is 0 here; relay_claim_capped's gives it meaning. */
    if (asprintf(&out->claim,
                 "SELECT seq, id, topic, key, event_type, payload::text, headers::text, "
                 "created_at, 0::bigint AS upto FROM ("
                 "(SELECT * FROM %s WHERE seq >= $4::bigint AND seq < $1::bigint ORDER BY seq "
                 "LIMIT $3::int) UNION ALL "
                 "(SELECT * FROM %s WHERE seq > $2::bigint ORDER BY seq LIMIT $3::int)) o "
                 "ORDER BY seq LIMIT $3::int",
                 q, q) < 0 ||
        /* The same with a byte cap ($5): a row is returned only while the sizes of the rows
         * before it in the claim are under $5, so the first row always is. upto is the bytes
         * up to and including the row. A row's size is what the relay will hold of it, as
         * row_bytes (outbox_table.c) counts it: the text of payload and headers, the key, the
         * event type, and 56 for the message-id and event-type headers' names and the id's
         * text (NULLs count 0, so that both statements return the same rows, only cut). Not
         * pg_column_size, which is the stored size: compressed, it undercounts ordinary JSON 5-10
         * times and repetitive payloads up to ~100 (measured), which let a capped claim read far
         * past the bound. The price: the server detoasts and renders the claim's candidates, the
         * rows cut off included, so only while sizes are unknown or large (see send_claim), when
         * the adaptive LIMIT is small. The window costs PostgreSQL ~1 us a row (3,000 rows of 300
         * bytes: 3.9 ms of execution against 1.4, measured with pg_column_size), hence two
         * statements. Both return payload and headers as text (the relay sends their text).
         * Rendered once for the size and once for the result: rendered once only (the text
         * computed below the window and returned), 100-row claims took 0.69-0.76 ms against
         * 0.90-1.29, but the window then holds every candidate's text until the claim ends:
         * a claim sized for small rows that meets large ones (the case this statement is for)
         * wrote LIMIT x their size of temporary files (~14 MB for 40 rows of 360 KB with
         * work_mem 64kB; none this way), and with temp_file_limit set it failed at every retry.
         */
        asprintf(&out->claim_capped,
                 "SELECT seq, id, topic, key, event_type, payload::text, headers::text, "
                 "created_at, upto FROM (SELECT c.*, sum(c.sz) OVER (ORDER BY c.seq ROWS UNBOUNDED "
                 "PRECEDING) "
                 "AS upto FROM (SELECT o.seq, o.id, o.topic, o.key, o.event_type, o.payload, "
                 "o.headers, o.created_at, coalesce(octet_length(o.payload::text), 0) + "
                 "coalesce(octet_length(o.headers::text), 0) + coalesce(octet_length(o.key), 0) + "
                 "coalesce(octet_length(o.event_type), 0) + 56 AS sz FROM ("
                 "(SELECT * FROM %s WHERE seq >= $4::bigint AND seq < $1::bigint ORDER BY seq "
                 "LIMIT $3::int) UNION ALL "
                 "(SELECT * FROM %s WHERE seq > $2::bigint ORDER BY seq LIMIT $3::int)) o "
                 "ORDER BY o.seq LIMIT $3::int) c) w WHERE upto - sz < $5::bigint ORDER BY seq",
                 q, q) < 0 ||
        asprintf(&out->remove, "DELETE FROM %s WHERE seq = ANY($1::bigint[])", q) < 0 ||
        asprintf(&out->dead,
                 "WITH moved AS (DELETE FROM %s WHERE seq = $1::bigint RETURNING *) "
                 "INSERT INTO \"%s\".\"%s_dead_letters\" "
                 "(id, seq, topic, key, event_type, payload, headers, created_at, error) "
                 "SELECT id, seq, topic, key, event_type, payload, headers, created_at, $2 "
                 "FROM moved",
                 q, schema, table) < 0 ||
        /* The deletes' generic plan is made on the first calls, typically while the outbox
         * is small or empty, and kept: for "seq = ANY($1)" on a small table that plan is a
         * sequential scan, which then read the whole table, dead rows included, at every
         * delete until the next ANALYZE replanned it (saga-bench, 2026-11-26: a participant's
         * delete of ~25 rows went from 0.35 to 8.6 ms, 218 to 3,347 pages, in 60 s of steady
         * load; the participants' databases took ~40% more CPU a saga before autovacuum came).
         * The outbox statements of this session read it by seq (the others read catalogs,
         * by their indexes): no sequential scan, and one generic plan, made once. A table
         * without an index on seq (not made by saga.create_outbox) is still read, by a
         * sequential scan, as before. */
        asprintf(&out->session,
                 "SET enable_seqscan = off; SET plan_cache_mode = force_generic_plan; "
                 "LISTEN saga_outbox; "
                 "PREPARE relay_delete(bigint[]) AS %s; "
                 "PREPARE relay_dead(bigint, text) AS %s; "
                 /* one row at least: the seq sequence's CACHE (holes.h holds only with 1),
                  * then each transaction holding RowExclusiveLock on the table */
                 "PREPARE relay_writers AS SELECT c.seqcache, l.virtualtransaction FROM "
                 "(SELECT (SELECT s.seqcache FROM pg_sequence s WHERE s.seqrelid = "
                 "pg_get_serial_sequence('%s', 'seq')::regclass) AS seqcache) c LEFT JOIN "
                 "(SELECT virtualtransaction FROM pg_locks WHERE locktype = 'relation' AND "
                 "database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
                 "AND relation = '%s'::regclass AND mode = 'RowExclusiveLock' AND pid IS "
                 "DISTINCT FROM pg_backend_pid()) l ON true; "
                 "PREPARE relay_backlog AS SELECT (SELECT max(seq) FROM %s) - "
                 "(SELECT min(seq) FROM %s) + 1, extract(epoch FROM now() - "
                 "(SELECT created_at FROM %s ORDER BY seq LIMIT 1))",
                 out->remove, out->dead, q, q, q, q, q) < 0 ||
        asprintf(&out->claim_session,
                 "PREPARE relay_claim(bigint, bigint, int, bigint) AS %s; "
                 "PREPARE relay_claim_capped(bigint, bigint, int, bigint, bigint) AS %s; "
                 "SELECT pg_try_advisory_lock(%s)",
                 out->claim, out->claim_capped, out->claim_lock_key) < 0) {
        outbox_sql_free(out);
        return -1;
    }
    return 0;
}

void outbox_sql_free(struct outbox_sql *s)
{
    free(s->claim);
    free(s->claim_capped);
    free(s->remove);
    free(s->dead);
    free(s->session);
    free(s->claim_session);
    memset(s, 0, sizeof(*s));
}
