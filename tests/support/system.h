/* system: the whole system for crash tests, as scripts/demo-run starts it.
 *
 * A dev broker, saga-orchestrator (one or two) over its own database, the four example
 * participants (inventory, payment, orders, shipping), each with its own database, and one
 * outbox-relay over the five outboxes (RELAY_CONFIG), all real binaries (SAGA_ORCHESTRATOR_BIN,
 * SAGA_RELAY_BIN, SAGA_PARTICIPANT_BIN, SAGA_DEV_BROKER_BIN; the sagas from
 * SAGA_SOURCE_ROOT/sagas; SAGA_SYSTEM_ORCHESTRATOR_BIN, when set, wins over the
 * SAGA_ORCHESTRATOR_BIN that meson sets, to run a test against another build's orchestrator).
 * The business is the demo's: stock, a payment limit, a blocked customer, a shipping service
 * that fails a few times, an inventory service that loses two commands; the sagas are the
 * demo's mix (declined, out of stock, rejected, completed).
 *
 * A test kills daemons with SIGKILL and restarts them (sys_chaos), then checks that every saga
 * ended and that the participants' tables agree with the outcomes (sys_check). Each daemon's
 * incarnations keep their logs until teardown, so a failure prints the last ones. Every wait is
 * bounded; helpers fail the test (with the logs) when a bound is reached. */
#ifndef SAGA_TEST_SYSTEM_H
#define SAGA_TEST_SYSTEM_H

#include <stdbool.h>
#include <stdint.h>

#include <libpq-fe.h>

#include "devbroker.h"
#include "pgtest.h"
#include "proc.h"

enum sys_service { SYS_INVENTORY, SYS_PAYMENT, SYS_ORDERS, SYS_SHIPPING, SYS_SERVICES };

#define SYS_MAX_ORCHESTRATORS 2
#define SYS_MAX_RUNS 32 /* incarnations of one daemon in a test */

/* One daemon, started again after each kill. */
struct sys_daemon {
    const char *name;
    struct proc runs[SYS_MAX_RUNS];
    int count; /* incarnations started; runs[count - 1] is the current one */
    bool running;
    int admin_port; /* orchestrators: the current incarnation's admin endpoint */
};

struct sys {
    struct devbroker broker;
    struct pgtest_db orch_db;
    struct pgtest_db svc_db[SYS_SERVICES];
    PGconn *orch; /* the test's connections */
    PGconn *svc[SYS_SERVICES];
    int orchestrators;
    struct sys_daemon orchestrator[SYS_MAX_ORCHESTRATORS];
    struct sys_daemon participant[SYS_SERVICES];
    struct sys_daemon relay;
    char relay_config[128]; /* RELAY_CONFIG file */
    char sagas_dir[1024];
    bool own_sagas_dir;     /* a copy written by sys_setup (removed at teardown) */
    const char *test;       /* the test's name, for the lines it prints */
    unsigned seed;          /* of the chaos schedule */
    int session_timeout_ms; /* the consumers' KAFKA_SESSION_TIMEOUT_MS */
    int sagas;              /* started so far */
    int stock;              /* the initial units of each of sku-1..sku-4 */
};

extern const char *const sys_service_names[SYS_SERVICES];

struct sys_options {
    int orchestrators; /* 1 (0 means 1) or 2 */
    /* NULL: the sagas of SAGA_SOURCE_ROOT/sagas; else (a duration such as "45s") a copy of
     * sagas/order_fulfillment.json whose every step waits that long for a reply. */
    const char *step_timeout;
    /* The consumer session of the orchestrators and the participants (0: 6000 ms, as in the
     * demo). A SIGKILLed consumer stays in its group until its session times out, and the group
     * rebalances meanwhile. */
    int session_timeout_ms;
    /* The initial units of each of sku-1..sku-4 (0: 1000, as in the demo); sys_check's stock
     * conservation counts from it. */
    int stock;
};

/* Prints the test's seed (sys_seed) and starts everything as opts says (NULL: defaults), then
 * seeds the business. */
void sys_setup(struct sys *s, const char *test, const struct sys_options *opts);

/* SIGKILLs everything, removes the files, drops the databases. */
void sys_teardown(struct sys *s);

/* Starts (again) one daemon and waits until it is ready: an orchestrator's "started" line, a
 * participant's "starting" line (its schema applied), the relay's five "leading" lines. */
void sys_orchestrator_start(struct sys *s, int i);
void sys_participant_start(struct sys *s, enum sys_service svc);
void sys_relay_start(struct sys *s);

/* SIGKILL and reap the current incarnation. */
void sys_orchestrator_kill(struct sys *s, int i);
void sys_participant_kill(struct sys *s, enum sys_service svc);
void sys_relay_kill(struct sys *s);

/* The number of sagas a test runs: SAGA_SYSTEM_SAGAS, default 1000. */
int sys_saga_count(void);

/* The seed of the test's randomness: SAGA_SYSTEM_SEED, else from the clock; printed. */
unsigned sys_seed(const char *test);

/* Waits (bounded) until orchestrator i's current incarnation logged that its reply consumer
 * was assigned partitions. */
void sys_orchestrator_wait_assigned(struct sys *s, int i);

/* Starts sagas number from..to (inclusive) of the demo's mix with saga.start(). */
void sys_start_sagas(struct sys *s, int from, int to);

/* Starts sagas number from..to (inclusive) with saga.start(), in one statement, of orders that
 * all complete: one unit of sku-1..sku-4 each (round robin: the stock must hold (to + 3) / 4
 * units of each), within the payment limit, no blocked customer. */
void sys_start_completing_sagas(struct sys *s, int from, int to);

/* Starts n sagas in chunks while it kills one daemon 5 to 10 times (the count and the
 * moments, 0.5 to 2 s apart, drawn from s->seed) with kill_restart(s, arg), which kills it
 * with SIGKILL and starts it again; `what` names that action in the lines it prints. */
void sys_chaos(struct sys *s, int n, const char *what,
               void (*kill_restart)(struct sys *s, void *arg), void *arg);

/* Waits (at most timeout_ms) until all s->sagas sagas are completed, compensated or failed,
 * then until the five outboxes are empty; prints the time it took and the outcomes. */
void sys_wait_finished(struct sys *s, int timeout_ms);

/* The sagas not yet completed, compensated or failed. */
long sys_unfinished(struct sys *s);

/* Every invariant (with expect_mix, also that no step ran out of attempts and that both
 * completed and compensated sagas exist):
 * no saga failed or left running; each saga has at most one reservation,
 * payment, order and shipment; stock conserved; a compensated saga holds no reserved stock,
 * authorized payment or approved order; a completed saga has all four; sagas that must fail
 * did not complete; at most one succeeded action and compensation row per saga and step, four
 * per completed saga; at most one applied reply per command message. */
void sys_check(struct sys *s, bool expect_mix);

/* A metric of orchestrator i's current incarnation ("name{labels}" as printed), or -1. */
double sys_orchestrator_metric(struct sys *s, int i, const char *series);

/* Prints the last incarnations' logs of every daemon to stderr. */
void sys_dump(struct sys *s);

/* The chaos schedule's pause (not a synchronisation: the moment of the next kill). */
void sys_pause_ms(int ms);

/* A number in [lo, hi] from *state (a xorshift generator seeded with sys_seed). */
int sys_rand(unsigned *state, int lo, int hi);

#endif
