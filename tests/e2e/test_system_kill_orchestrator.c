/* The whole system under SIGKILL of saga-orchestrator: 1,000 order sagas (SAGA_SYSTEM_SAGAS)
 * of the demo's mix are started while the orchestrator is killed 5 to 10 times at random
 * moments (seed printed; SAGA_SYSTEM_SEED repeats it) and restarted each time. Every saga must
 * end completed or compensated, and the participants' tables must agree (tests/support/system.h
 * lists the invariants).
 *
 * A killed consumer does not leave its group: the broker keeps the group rebalancing until the
 * dead member's session times out (6 s in the demo), and with a kill every 0.5 to 2 s the reply
 * consumer gets its partitions back only some 15 s after the last kill. The orchestrator does
 * not fire reply timeouts while it holds no partition of the replies (it could not hear them);
 * it used to, and then every saga in flight timed out (reserve_inventory: 5 s, 3 attempts) and
 * many of their compensations too (failed sagas, waiting for an operator). Two tests:
 * - the demo's settings and the shipped definition, a kill every 0.5 to 2 s;
 * - 45 s step timeouts and a 3 s consumer session, each kill 0.5 to 2 s after the new
 *   incarnation got its partitions back, so that kills also land while replies are applied
 *   (database committed, Kafka offsets not yet), not only while sagas are claimed.
 * Both end as the demo's mix says (completed, declined, out of stock, rejected).
 */
#include <criterion/criterion.h>

#include "system.h"

static struct sys sys;

static void teardown(void)
{
    sys_teardown(&sys);
}

TestSuite(system, .fini = teardown, .timeout = 600);

static void kill_restart(struct sys *s, void *arg)
{
    (void)arg;
    sys_orchestrator_kill(s, 0);
    sys_orchestrator_start(s, 0);
}

static void kill_restart_assigned(struct sys *s, void *arg)
{
    kill_restart(s, arg);
    sys_orchestrator_wait_assigned(s, 0);
}

Test(system, orchestrator_killed_shipped_timeouts)
{
    sys_setup(&sys, "orchestrator_killed_shipped_timeouts", NULL);
    sys_chaos(&sys, sys_saga_count(), "kill", kill_restart, NULL);
    sys_wait_finished(&sys, 180000);
    sys_check(&sys, true);
}

Test(system, orchestrator_killed)
{
    struct sys_options opts = {.step_timeout = "45s", .session_timeout_ms = 3000};
    sys_setup(&sys, "orchestrator_killed", &opts);
    sys_orchestrator_wait_assigned(&sys, 0);
    sys_chaos(&sys, sys_saga_count(), "kill", kill_restart_assigned, NULL);
    sys_wait_finished(&sys, 180000);
    sys_check(&sys, true);
}
