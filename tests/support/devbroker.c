#include "devbroker.h"

#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <criterion/criterion.h>

void devbroker_start(struct devbroker *b, const char *const args[])
{
    memset(b, 0, sizeof(*b));
    const char *bin = getenv("SAGA_DEV_BROKER_BIN");
    if (!bin || !*bin)
        cr_assert_fail("SAGA_DEV_BROKER_BIN is not set (run the test through meson)");
    const char *argv[64] = {bin};
    size_t n = 1;
    while (args && args[n - 1]) {
        if (n + 1 >= sizeof(argv) / sizeof(argv[0]))
            cr_assert_fail("devbroker_start: too many arguments");
        argv[n] = args[n - 1];
        n++;
    }
    argv[n] = NULL;
    struct proc_options opts = {.pipe_stdin = true, .pipe_stdout = true, .name = "broker"};
    proc_start(&b->proc, argv, NULL, &opts);
    char line[256];
    if (!proc_read_line(b->proc.stdout_fd, b->buf, sizeof(b->buf), &b->buflen, line, sizeof(line),
                        15000)) {
        proc_kill(&b->proc);
        proc_dump(&b->proc, "dev-broker", 4000);
        cr_assert_fail("dev-broker printed no bootstrap line within 15 s");
    }
    if (strncmp(line, "bootstrap=", 10))
        cr_assert_fail("dev-broker: unexpected first line \"%s\"", line);
    snprintf(b->bootstrap, sizeof(b->bootstrap), "%s", line + 10);
}

void devbroker_command(struct devbroker *b, const char *fmt, ...)
{
    char cmd[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(cmd, sizeof(cmd) - 1, fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= sizeof(cmd) - 1)
        cr_assert_fail("devbroker_command: command too long");
    cmd[n++] = '\n';
    proc_write_all(b->proc.stdin_fd, cmd, (size_t)n);
    char line[512];
    if (!proc_read_line(b->proc.stdout_fd, b->buf, sizeof(b->buf), &b->buflen, line, sizeof(line),
                        10000))
        cr_assert_fail("dev-broker: no answer to \"%.*s\" within 10 s", n - 1, cmd);
    if (strcmp(line, "ok"))
        cr_assert_fail("dev-broker: \"%.*s\" answered \"%s\"", n - 1, cmd, line);
}

void devbroker_stop(struct devbroker *b)
{
    proc_signal(&b->proc, SIGTERM);
    if (!proc_wait_exit(&b->proc, 5000))
        proc_kill(&b->proc);
    proc_cleanup(&b->proc);
}
