/* devbroker: tools/dev-broker (librdkafka's mock cluster behind a command line) for tests.
 *
 * The executable's path comes from SAGA_DEV_BROKER_BIN (tests/meson.build sets it). Each test
 * starts its own broker; it dies with the test process. Helpers fail the test on error. */
#ifndef SAGA_TEST_DEVBROKER_H
#define SAGA_TEST_DEVBROKER_H

#include <stddef.h>

#include "proc.h"

struct devbroker {
    struct proc proc;
    char bootstrap[256]; /* 127.0.0.1:PORT */
    char buf[4096];      /* stdout read past the last answer */
    size_t buflen;
};

/* Starts dev-broker with args (NULL-terminated, may be NULL; e.g. "--topic", "t:4") and waits
 * (bounded) for its bootstrap line. */
void devbroker_start(struct devbroker *b, const char *const args[]);

/* Sends one control command (printf format, no newline) and fails the test unless the answer
 * is "ok" within a few seconds. */
void devbroker_command(struct devbroker *b, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* Stops the broker (SIGTERM, then SIGKILL after a bound) and removes its log file. */
void devbroker_stop(struct devbroker *b);

#endif
