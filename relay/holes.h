/* holes: the seq values below the relay's cursor that no claim has returned yet, and when
 * it is safe to stop looking for them.
 *
 * A claim reads rows above the cursor in seq order; a gap between two rows it returned (or
 * between the cursor and its first row) is a hole: a transaction still running (its row
 * will commit late) or one that rolled back (never). The claim's lower branch reads only
 * [lowest hole, low watermark), instead of every deleted, not yet vacuumed index entry
 * below the watermark.
 *
 * Forgetting a hole: a row can fill hole h only if its transaction called nextval before the
 * row above h did, so it held RowExclusiveLock on the outbox table (taken by the INSERT
 * before its defaults are evaluated, kept until the transaction ends) when the claim that
 * saw h ran, and still holds it unless it has ended. A "sweep" reads the virtual transaction
 * ids holding that lock (pg_locks; prepared transactions included). A hole takes the set of
 * the first sweep sent after it was seen; when later sweeps show none of those transactions
 * any more, each has committed or rolled back, so the first claim sent after that sweep's
 * result sees the row if it exists. After such a claim has read below the hole (its low
 * watermark above it), the hole is forgotten. Until then it is searched by every claim.
 *
 * This needs every seq value to come from nextval inside the INSERT, one at a time: the
 * identity column of saga.create_outbox (CACHE 1, GENERATED ALWAYS). With a sequence CACHE
 * above 1, or seq values taken beforehand and given with OVERRIDING SYSTEM VALUE, a hole can
 * be filled by a transaction that held no lock when it was seen; the relay checks the CACHE
 * on every sweep and then never forgets a hole (outbox_table.c).
 *
 * Pure bookkeeping, no I/O: the caller runs the sweeps and claims. */
#ifndef SAGA_HOLES_H
#define SAGA_HOLES_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct holes;

/* Returns NULL on allocation failure. */
struct holes *holes_new(void);
void holes_free(struct holes *h);
/* Forgets everything (a new generation: the table is read again from its head). */
void holes_clear(struct holes *h);

/* Seq values lo..hi (inclusive) were skipped by the claim just read. */
void holes_open(struct holes *h, int64_t lo, int64_t hi);
/* A claim returned seq: it is no longer missing. */
void holes_fill(struct holes *h, int64_t seq);
/* The lowest missing seq, if any. */
bool holes_floor(const struct holes *h, int64_t *floor);
size_t holes_count(const struct holes *h);

/* True when a sweep would teach something (holes waiting for one, or sets still open). */
bool holes_want_sweep(const struct holes *h);
/* Call when a sweep is sent; returns its number for holes_sweep_done. */
uint64_t holes_sweep_sent(struct holes *h);
/* A sweep's result: the virtual transaction ids (borrowed) holding the lock when it ran.
 * next_claim is the number the next claim sent will have (see holes_claim_done). */
void holes_sweep_done(struct holes *h, uint64_t sweep, const char *const *vxids, size_t n,
                      uint64_t next_claim);
/* Claim number `claim` (numbered by the caller from 1, in the order sent), sent with low
 * watermark `low`, has been read: holes whose transactions were all seen gone before it was
 * sent, and that it searched (below low), are forgotten. */
void holes_claim_done(struct holes *h, uint64_t claim, int64_t low);

#endif
