/* RELAY_MAX_INFLIGHT_BYTES: large rows go through, in order, and the relay's memory stays
 * bounded by the setting, not by RELAY_BATCH_SIZE x the row size (a claim of 3,000 rows of
 * 1 MB read 3 GB: killed by the OOM killer, restarted, claimed the same rows: a crash loop).
 *
 * The peak is the relay's VmHWM (/proc/PID/status) at the end, against setting x 3 + 40 MB:
 * the rows in the producer (the setting), the claim's result and the copies the producer makes
 * of it while the result is alive (the room left, at most the setting each), and the process'
 * own ~20 MB (librdkafka's threads and buffers, libpq, malloc arenas). Without the bound the
 * first claim reads every row at once: ~2 x the table's bytes.
 *
 * The rows have their own model here (not relay_e2e.h's: those payloads are small): row g has
 * key "k%02d" (g % KEYS), topic "mem.c" (32 partitions: the dev broker keeps only the last
 * ~5 MB of a partition, so the rows are spread and consumed while they are produced), and the
 * payload {"g": g, "pad": PAD} with PAD `size` hex characters (md5 chains: PostgreSQL cannot
 * compress them, so its stored size is the real size). */
#include "relay_e2e.h"

#define KEYS 32
#define TOPIC "mem.c"
#define MB (1024L * 1024L)

/* Inserts rows [from, to) with a pad of size bytes (a multiple of 32), in one statement:
 * md5 chains (incompressible), or one letter repeated (PostgreSQL stores it compressed, a
 * hundredth of its size) when compressible. */
static void insert_pad(struct e2e *e, long from, long to, long size, bool compressible)
{
    char sql[1024], p_from[24], p_to[24], p_chunks[24];
    snprintf(p_from, sizeof(p_from), "%ld", from);
    snprintf(p_to, sizeof(p_to), "%ld", to);
    snprintf(p_chunks, sizeof(p_chunks), "%ld", size / 32);
    snprintf(sql, sizeof(sql),
             "INSERT INTO saga.outbox (id, topic, key, event_type, payload, headers, created_at) "
             "SELECT ('00000000-0000-4000-8000-' || lpad(to_hex(g), 12, '0'))::uuid, '%s', "
             "'k' || lpad((g %% %d)::text, 2, '0'), 'Big', jsonb_build_object('g', g, 'pad', "
             "%s), "
             "'{}', timestamptz '2026-01-01 00:00:00+00' + g * interval '1 millisecond' "
             "FROM generate_series($1::bigint, $2::bigint - 1) g ORDER BY g",
             TOPIC, KEYS,
             compressible ? "repeat('a', $3::int * 32)"
                          : "(SELECT string_agg(md5(g || '.' || i), '') FROM "
                            "generate_series(1, $3::int) i)");
    const char *params[] = {p_from, p_to, p_chunks};
    PQclear(pgtest_query(e->conn, sql, 3, params));
}

static void insert_rows(struct e2e *e, long from, long to, long size)
{
    insert_pad(e, from, to, size, false);
}

/* Every row of [0, total) arrived exactly once, with its payload's size (size_of(g)), and per
 * key in g order. */
static void verify_rows(struct kconsumer *c, long total, long (*size_of)(long g))
{
    size_t n;
    struct kmsg **msgs = kconsumer_snapshot(c, &n);
    unsigned char *seen = calloc((size_t)total, 1);
    long last[KEYS];
    for (int k = 0; k < KEYS; k++)
        last[k] = -1;
    cr_assert(seen, "out of memory");
    for (size_t i = 0; i < n; i++) {
        const struct kmsg *m = msgs[i];
        long g = id_row(kmsg_header(m, "message-id", NULL));
        cr_assert(g >= 0 && g < total, "message %s[%d]@%" PRId64 " is no row's", m->topic,
                  m->partition, m->offset);
        cr_assert(!seen[g], "row %ld arrived twice", g);
        seen[g] = 1;
        char prefix[64], key[8];
        int plen = snprintf(prefix, sizeof(prefix), "{\"g\": %ld, \"pad\": \"", g);
        snprintf(key, sizeof(key), "k%02ld", g % KEYS);
        cr_assert(m->key && !strcmp(m->key, key), "row %ld: key %s", g, m->key ? m->key : "");
        cr_assert(m->value && !strncmp(m->value, prefix, (size_t)plen),
                  "row %ld: payload starts %.40s", g, m->value ? m->value : "(null)");
        cr_assert_eq(m->value_len, (size_t)plen + (size_t)size_of(g) + 2,
                     "row %ld: payload of %zu bytes, expected %ld", g, m->value_len,
                     plen + size_of(g) + 2);
        int k = (int)(g % KEYS);
        cr_assert(g > last[k], "key k%02d: row %ld after row %ld", k, g, last[k]);
        last[k] = g;
    }
    for (long g = 0; g < total; g++)
        cr_assert(seen[g], "row %ld never arrived (%zu messages)", g, n);
    free(seen);
    free(msgs);
}

/* The relay's peak resident memory (VmHWM), in bytes. */
static long peak_rss(const struct proc *p)
{
    char path[64], line[256];
    snprintf(path, sizeof(path), "/proc/%d/status", (int)p->pid);
    FILE *f = fopen(path, "r");
    cr_assert(f, "cannot read %s", path);
    long kb = -1;
    while (fgets(line, sizeof(line), f))
        if (!strncmp(line, "VmHWM:", 6))
            kb = strtol(line + 6, NULL, 10);
    fclose(f);
    cr_assert(kb > 0, "no VmHWM in %s", path);
    return kb * 1024;
}

/* Runs the relay with the byte bound until the table is empty and every row arrived, then
 * checks the rows and the peak. */
static void drain_and_check(struct e2e *e, struct kconsumer *c, long total, long bound,
                            const char *bound_env, long (*size_of)(long g))
{
    struct proc relay;
    const char *env[] = {bound_env, "KAFKA_MESSAGE_MAX_BYTES=10000000", NULL};
    e2e_relay_start(e, &relay, env);
    int port = e2e_admin_port(&relay);
    /* The peak first: the table empties whether or not the consumer kept up. */
    if (!e2e_wait_table_empty(e, "saga.outbox", 90000)) {
        e2e_dump_state(e, port);
        proc_dump(&relay, "relay", 4000);
        cr_assert_fail("rows left in the table after 90 s");
    }
    long peak = peak_rss(&relay), limit = 3 * bound + 40 * MB;
    fprintf(stderr, "relay VmHWM %.1f MB (limit %.1f MB)\n", (double)peak / MB, (double)limit / MB);
    cr_assert(peak < limit, "the relay's peak memory %.1f MB is over %.1f MB", (double)peak / MB,
              (double)limit / MB);
    long distinct = 0;
    if (!e2e_wait_all(c, total, 30000, &distinct)) {
        proc_dump(&relay, "relay", 4000);
        cr_assert_fail("%ld of %ld rows arrived within 30 s of the table's emptying", distinct,
                       total);
    }
    verify_rows(c, total, size_of);
    /* Nothing is in the producer once every row is deleted. */
    cr_assert(e2e_wait_metric(port, e2e_series(e, "relay_inflight_bytes{table=\"saga.outbox\"}"), 0,
                              10000),
              "no relay_inflight_bytes series");
    char *body = NULL;
    cr_assert_eq(e2e_http_get(port, "/metrics", &body), 200);
    cr_assert_eq(e2e_metric(body, e2e_series(e, "relay_inflight_bytes{table=\"saga.outbox\"}")), 0,
                 "relay_inflight_bytes is not 0 with nothing in the producer");
    free(body);
    e2e_relay_stop(&relay);
    proc_cleanup(&relay);
}

/* A test's database and broker (TOPIC with 32 partitions: see the header comment) and a
 * consumer of TOPIC. */
static struct kconsumer *setup(struct e2e *e, const char *name)
{
    const char *broker[] = {"--topic", TOPIC ":32", NULL};
    e2e_setup_broker(e, name, KEYS, broker);
    const char *topics[] = {TOPIC, NULL};
    return kconsumer_start(e->broker.bootstrap, topics);
}

static long size_512k(long g)
{
    return 512 * 1024;
}

Test(relay_memory, large_rows_are_published_in_order_within_the_byte_bound, .timeout = 300)
{
    struct e2e e;
    struct kconsumer *c = setup(&e, "mem");
    /* 60 MB, before the relay starts. 120 rows: the 32 keys land on ~22 of the 32 partitions
     * (the default partitioner), at most ~8 rows (4 MB) on one, under the ~5 MB the dev
     * broker keeps of a partition, so no row can vanish before the consumer reads it. Without
     * the bound the first claim reads all 60 MB (~2 x that in the relay). */
    insert_rows(&e, 0, 120, 512 * 1024);
    drain_and_check(&e, c, 120, 4 * MB, "RELAY_MAX_INFLIGHT_BYTES=4MB", size_512k);
    kconsumer_stop(c);
    e2e_teardown(&e);
}

/* 100 small rows, one of 3 MB (three times the bound), 60 of 512 KB, 20 small: the claims
 * sized for small rows must not read the large ones behind them all at once, and the row
 * larger than the whole bound still goes. */
static long size_mixed(long g)
{
    if (g == 100)
        return 3 * MB;
    if (g > 100 && g <= 160)
        return 512 * 1024;
    return 64;
}

Test(relay_memory, a_row_larger_than_the_bound_goes_and_larger_rows_after_small_ones_stay_bounded,
     .timeout = 300)
{
    struct e2e e;
    struct kconsumer *c = setup(&e, "memmix");
    insert_rows(&e, 0, 100, 64);
    insert_rows(&e, 100, 101, 3 * MB);
    insert_rows(&e, 101, 161, 512 * 1024);
    insert_rows(&e, 161, 181, 64);
    drain_and_check(&e, c, 181, 1 * MB, "RELAY_MAX_INFLIGHT_BYTES=1MB", size_mixed);
    kconsumer_stop(c);
    e2e_teardown(&e);
}

/* Large rows that PostgreSQL compresses (a letter repeated: stored in a hundredth of their
 * size) after small ones: the byte cap counts them in full, as the relay will hold them.
 * Counted by their stored size, the 60 rows of 512 KB (30 MB) fitted in one capped claim of
 * 1 MB. */
static long size_compressible(long g)
{
    return g < 20 ? 64 : 512 * 1024;
}

Test(relay_memory, compressible_large_rows_count_in_full, .timeout = 300)
{
    struct e2e e;
    struct kconsumer *c = setup(&e, "memzip");
    insert_rows(&e, 0, 20, 64);
    insert_pad(&e, 20, 80, 512 * 1024, true);
    long stored =
        pgtest_count(e.conn, "SELECT sum(pg_column_size(payload)) FROM saga.outbox", 0, NULL);
    cr_assert(stored < 4 * MB, "the payloads were not compressed (%ld bytes stored)", stored);
    drain_and_check(&e, c, 80, 1 * MB, "RELAY_MAX_INFLIGHT_BYTES=1MB", size_compressible);
    kconsumer_stop(c);
    e2e_teardown(&e);
}
