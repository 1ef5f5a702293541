/* proc: child processes for end-to-end tests (the relay, the dev broker).
 *
 * A child gets the test's environment plus extra NAME=value pairs, its stdout and stderr go to
 * files (so a test can read a daemon's log after the fact and print it when it fails) or to
 * pipes, and it dies with the test process (PR_SET_PDEATHSIG), so a failed or timed-out test
 * never leaves a daemon behind. Every wait here has a bound given by the caller; helpers that
 * cannot continue fail the current test (cr_fatal) so tests read as straight-line code. */
#ifndef SAGA_TEST_PROC_H
#define SAGA_TEST_PROC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

struct proc {
    pid_t pid;
    int stdin_fd;       /* write end of the child's stdin pipe, or -1 */
    int stdout_fd;      /* read end of the child's stdout pipe, or -1 */
    char out_path[256]; /* stdout file (empty when piped) */
    char err_path[256]; /* stderr file */
    bool exited;
    int status; /* waitpid status once exited */
};

/* What to do with the child's standard streams. */
struct proc_options {
    bool pipe_stdin;  /* give the child a pipe on stdin (else /dev/null) */
    bool pipe_stdout; /* read stdout through a pipe (else a file) */
    const char *name; /* for the log files' names: /tmp/saga-e2e-<pid>-<name>-<n>.{out,err} */
};

/* Starts argv[0] (a path) with argv and the environment plus extra_env ("NAME=value" entries,
 * NULL-terminated, may be NULL; an entry "NAME=" with nothing after it is set to the empty
 * string, an entry "NAME" without '=' removes NAME, and the last entry of a name wins).
 * Fails the test if it cannot start. */
void proc_start(struct proc *p, const char *const argv[], const char *const extra_env[],
                const struct proc_options *opts);

/* Sends sig (ignored once the child was reaped). */
void proc_signal(struct proc *p, int sig);

/* Waits at most timeout_ms for the child to exit; returns true when it did (p->status). */
bool proc_wait_exit(struct proc *p, int timeout_ms);

/* Exit code when the child exited normally, 128 + signal when killed, -1 while running. */
int proc_exit_code(const struct proc *p);

/* SIGKILL and reap (no-op when already reaped). */
void proc_kill(struct proc *p);

/* Reads the whole stdout (or stderr) file into a new string (caller frees); "" if none. */
char *proc_read_stdout(const struct proc *p);
char *proc_read_stderr(const struct proc *p);

/* Waits at most timeout_ms until the stdout file has a line containing needle, at or after
 * byte *from (may be NULL: from the start). On success copies that line (without '\n') into
 * line (size len, may be NULL), advances *from past it and returns true. Returns false on
 * timeout or when the child exits without writing it. */
bool proc_wait_log(struct proc *p, const char *needle, size_t *from, int timeout_ms, char *line,
                   size_t len);

/* Counts the stdout lines containing needle. */
size_t proc_count_log(const struct proc *p, const char *needle);

/* Prints the child's stdout and stderr files (the tail of each, at most max bytes) to
 * stderr, for a failing test's output. */
void proc_dump(const struct proc *p, const char *title, size_t max);

/* Removes the log files. */
void proc_cleanup(struct proc *p);

/* Monotonic milliseconds. */
int64_t proc_now_ms(void);

/* Writes all of buf to fd (a pipe); fails the test on error. */
void proc_write_all(int fd, const char *buf, size_t len);

/* Reads one line from fd (a pipe) into line (without '\n'), at most timeout_ms. buf/buflen
 * keep what was read past the line between calls (buf is caller storage of size bufsize).
 * Returns true with the line, false on timeout or end of file. */
bool proc_read_line(int fd, char *buf, size_t bufsize, size_t *buflen, char *line, size_t len,
                    int timeout_ms);

#endif
