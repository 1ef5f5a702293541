/* The whole system under SIGKILL of outbox-relay (the one relay over the five outboxes): 1,000
 * order sagas (SAGA_SYSTEM_SAGAS) of the demo's mix are started while the relay is killed 5 to
 * 10 times at random moments (seed printed; SAGA_SYSTEM_SEED repeats it) and restarted each
 * time, so that rows are published again and commands and replies arrive twice. Every saga must
 * end completed or compensated, and the participants' tables must agree
 * (tests/support/system.h lists the invariants). */
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
    sys_relay_kill(s);
    sys_relay_start(s);
}

Test(system, relay_killed)
{
    sys_setup(&sys, "relay_killed", NULL);
    sys_chaos(&sys, sys_saga_count(), "kill", kill_restart, NULL);
    sys_wait_finished(&sys, 180000);
    sys_check(&sys, true);
}
