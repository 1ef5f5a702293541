/* Two saga-orchestrators at once over 1,000 order sagas (SAGA_SYSTEM_SAGAS) of the demo's mix:
 * both run the whole time over the same database (claims with FOR UPDATE SKIP LOCKED) and in
 * the same consumer group (the reply topic's four partitions split between them). The sagas
 * are started in chunks (timing drawn from the printed seed). Every saga must end completed or
 * compensated, the participants' tables must agree, no reply may be applied twice (one
 * succeeded action row per completed step), and both orchestrators must have done work. */
#include <criterion/criterion.h>

#include "system.h"

static struct sys sys;

static void teardown(void)
{
    sys_teardown(&sys);
}

TestSuite(system, .fini = teardown, .timeout = 600);

/* Nothing is killed: the chaos schedule only spaces the chunks of sagas. */
static void nothing(struct sys *s, void *arg)
{
    (void)s;
    (void)arg;
}

Test(system, two_orchestrators)
{
    struct sys_options opts = {.orchestrators = 2};
    sys_setup(&sys, "two_orchestrators", &opts);
    sys_chaos(&sys, sys_saga_count(), "chunk", nothing, NULL);
    sys_wait_finished(&sys, 180000);
    sys_check(&sys, true);

    double started[2], applied[2];
    for (int i = 0; i < 2; i++) {
        started[i] = sys_orchestrator_metric(&sys, i, "saga_sagas_started_total");
        applied[i] = sys_orchestrator_metric(&sys, i, "saga_replies_total{result=\"applied\"}");
        fprintf(stderr, "  orchestrator %c: %.0f sagas claimed at start, %.0f replies applied\n",
                'a' + i, started[i], applied[i]);
    }
    cr_expect_eq(started[0] + started[1], sys.sagas, "every saga was started once");
    for (int i = 0; i < 2; i++) {
        cr_expect_gt(started[i], 0, "orchestrator %c claimed no saga", 'a' + i);
        cr_expect_gt(applied[i], 0, "orchestrator %c applied no reply", 'a' + i);
    }
}
