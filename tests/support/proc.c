#include "proc.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <criterion/criterion.h>

extern char **environ;

int64_t proc_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* A short pause between two looks at a condition that has no file descriptor to wait on
 * (a log file, a child's exit). Every caller bounds the total wait. */
static void pause_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static bool same_name(const char *entry, const char *name, size_t name_len)
{
    return !strncmp(entry, name, name_len) && entry[name_len] == '=';
}

/* environ without the names extra_env sets or removes, then extra_env's assignments. Built in
 * the parent: between fork and exec the child of a threaded process must not allocate. */
static char **build_env(const char *const extra_env[])
{
    size_t n = 0, extra = 0;
    while (environ[n])
        n++;
    while (extra_env && extra_env[extra])
        extra++;
    char **env = calloc(n + extra + 1, sizeof(*env));
    if (!env)
        cr_assert_fail("out of memory");
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        bool overridden = false;
        for (size_t j = 0; j < extra && !overridden; j++) {
            const char *eq = strchr(extra_env[j], '=');
            size_t name_len = eq ? (size_t)(eq - extra_env[j]) : strlen(extra_env[j]);
            overridden = same_name(environ[i], extra_env[j], name_len);
        }
        if (!overridden)
            env[k++] = environ[i];
    }
    for (size_t j = 0; j < extra; j++) {
        const char *eq = strchr(extra_env[j], '=');
        size_t name_len = eq ? (size_t)(eq - extra_env[j]) : strlen(extra_env[j]);
        bool later = false; /* the last assignment of a name wins */
        for (size_t l = j + 1; l < extra && !later; l++)
            later = !strncmp(extra_env[l], extra_env[j], name_len) &&
                    (extra_env[l][name_len] == '=' || !extra_env[l][name_len]);
        if (eq && !later)
            env[k++] = (char *)extra_env[j];
    }
    env[k] = NULL;
    return env;
}

void proc_start(struct proc *p, const char *const argv[], const char *const extra_env[],
                const struct proc_options *opts)
{
    static unsigned counter;
    memset(p, 0, sizeof(*p));
    p->stdin_fd = p->stdout_fd = -1;
    const char *name = opts && opts->name ? opts->name : "proc";
    unsigned n = ++counter;
    snprintf(p->err_path, sizeof(p->err_path), "/tmp/saga-e2e-%d-%s-%u.err", (int)getpid(), name,
             n);
    bool pipe_out = opts && opts->pipe_stdout;
    bool pipe_in = opts && opts->pipe_stdin;
    if (!pipe_out)
        snprintf(p->out_path, sizeof(p->out_path), "/tmp/saga-e2e-%d-%s-%u.out", (int)getpid(),
                 name, n);

    int in_pipe[2] = {-1, -1}, out_pipe[2] = {-1, -1};
    if (pipe_in && pipe2(in_pipe, O_CLOEXEC))
        cr_assert_fail("pipe: %s", strerror(errno));
    if (pipe_out && pipe2(out_pipe, O_CLOEXEC))
        cr_assert_fail("pipe: %s", strerror(errno));
    int out_fd = -1;
    if (!pipe_out) {
        out_fd = open(p->out_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        if (out_fd < 0)
            cr_assert_fail("cannot create %s: %s", p->out_path, strerror(errno));
    }
    int err_fd = open(p->err_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (err_fd < 0)
        cr_assert_fail("cannot create %s: %s", p->err_path, strerror(errno));
    int null_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    char **env = build_env(extra_env);
    pid_t parent = getpid();

    fflush(NULL);
    pid_t pid = fork();
    if (pid < 0)
        cr_assert_fail("fork: %s", strerror(errno));
    if (pid == 0) {
        /* Die with the test: a failed assertion or Criterion's timeout ends the test process,
         * and its daemons must not outlive it. */
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent)
            _exit(127);
        dup2(pipe_in ? in_pipe[0] : null_fd, 0);
        dup2(pipe_out ? out_pipe[1] : out_fd, 1);
        dup2(err_fd, 2);
        /* Criterion may block signals in its workers; a daemon must see SIGTERM. */
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        signal(SIGPIPE, SIG_DFL);
        execve(argv[0], (char *const *)argv, env);
        const char msg[] = "proc_start: exec failed\n";
        if (write(2, msg, sizeof(msg) - 1) < 0)
            _exit(127);
        _exit(127);
    }
    free(env);
    if (null_fd >= 0)
        close(null_fd);
    close(err_fd);
    if (out_fd >= 0)
        close(out_fd);
    if (pipe_in) {
        close(in_pipe[0]);
        p->stdin_fd = in_pipe[1];
    }
    if (pipe_out) {
        close(out_pipe[1]);
        p->stdout_fd = out_pipe[0];
    }
    p->pid = pid;
}

void proc_signal(struct proc *p, int sig)
{
    if (p->pid > 0 && !p->exited)
        kill(p->pid, sig);
}

static bool reap(struct proc *p, bool block)
{
    if (p->pid <= 0 || p->exited)
        return true;
    int status;
    pid_t r;
    do {
        r = waitpid(p->pid, &status, block ? 0 : WNOHANG);
    } while (r < 0 && errno == EINTR);
    if (r == p->pid) {
        p->exited = true;
        p->status = status;
        return true;
    }
    return false;
}

bool proc_wait_exit(struct proc *p, int timeout_ms)
{
    int64_t deadline = proc_now_ms() + timeout_ms;
    for (;;) {
        if (reap(p, false))
            return true;
        if (proc_now_ms() >= deadline)
            return false;
        pause_ms(5);
    }
}

int proc_exit_code(const struct proc *p)
{
    if (!p->exited)
        return -1;
    if (WIFEXITED(p->status))
        return WEXITSTATUS(p->status);
    if (WIFSIGNALED(p->status))
        return 128 + WTERMSIG(p->status);
    return -1;
}

void proc_kill(struct proc *p)
{
    if (p->pid <= 0 || p->exited)
        return;
    kill(p->pid, SIGKILL);
    reap(p, true);
}

static char *read_file(const char *path, size_t *len_out)
{
    size_t len = 0, cap = 4096;
    char *buf = malloc(cap);
    if (!buf)
        cr_assert_fail("out of memory");
    FILE *f = *path ? fopen(path, "r") : NULL;
    if (f) {
        for (;;) {
            if (cap - len < 4096) {
                cap *= 2;
                char *grown = realloc(buf, cap);
                if (!grown)
                    cr_assert_fail("out of memory");
                buf = grown;
            }
            size_t n = fread(buf + len, 1, cap - len - 1, f);
            if (n == 0)
                break;
            len += n;
        }
        fclose(f);
    }
    buf[len] = '\0';
    if (len_out)
        *len_out = len;
    return buf;
}

char *proc_read_stdout(const struct proc *p)
{
    return read_file(p->out_path, NULL);
}

char *proc_read_stderr(const struct proc *p)
{
    return read_file(p->err_path, NULL);
}

/* Looks for a complete line containing needle at or after *from. */
static bool find_line(const struct proc *p, const char *needle, size_t *from, char *line,
                      size_t len)
{
    size_t size;
    char *text = read_file(p->out_path, &size);
    size_t start = from ? *from : 0;
    bool found = false;
    while (start < size) {
        char *nl = memchr(text + start, '\n', size - start);
        if (!nl)
            break; /* a line still being written */
        *nl = '\0';
        if (strstr(text + start, needle)) {
            if (line)
                snprintf(line, len, "%s", text + start);
            start = (size_t)(nl - text) + 1;
            found = true;
            break;
        }
        start = (size_t)(nl - text) + 1;
    }
    if (found && from)
        *from = start;
    free(text);
    return found;
}

bool proc_wait_log(struct proc *p, const char *needle, size_t *from, int timeout_ms, char *line,
                   size_t len)
{
    int64_t deadline = proc_now_ms() + timeout_ms;
    for (;;) {
        bool gone = reap(p, false);
        if (find_line(p, needle, from, line, len))
            return true;
        if (gone || proc_now_ms() >= deadline)
            return false;
        pause_ms(10);
    }
}

size_t proc_count_log(const struct proc *p, const char *needle)
{
    char *text = read_file(p->out_path, NULL);
    size_t count = 0;
    for (char *s = text; (s = strstr(s, needle)); s += strlen(needle))
        count++;
    free(text);
    return count;
}

static void dump_file(const char *path, const char *what, size_t max)
{
    size_t size;
    char *text = read_file(path, &size);
    const char *start = size > max ? text + size - max : text;
    fprintf(stderr, "---- %s (%s)%s ----\n%s\n", what, path, size > max ? ", tail" : "", start);
    free(text);
}

void proc_dump(const struct proc *p, const char *title, size_t max)
{
    char what[128];
    if (*p->out_path) {
        snprintf(what, sizeof(what), "%s stdout", title);
        dump_file(p->out_path, what, max);
    }
    snprintf(what, sizeof(what), "%s stderr", title);
    dump_file(p->err_path, what, max);
}

void proc_cleanup(struct proc *p)
{
    proc_kill(p);
    if (*p->out_path)
        unlink(p->out_path);
    if (*p->err_path)
        unlink(p->err_path);
    if (p->stdin_fd >= 0)
        close(p->stdin_fd);
    if (p->stdout_fd >= 0)
        close(p->stdout_fd);
    p->stdin_fd = p->stdout_fd = -1;
}

void proc_write_all(int fd, const char *buf, size_t len)
{
    while (len) {
        ssize_t n = write(fd, buf, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            cr_assert_fail("write to a child's pipe: %s", strerror(errno));
        buf += n;
        len -= (size_t)n;
    }
}

bool proc_read_line(int fd, char *buf, size_t bufsize, size_t *buflen, char *line, size_t len,
                    int timeout_ms)
{
    int64_t deadline = proc_now_ms() + timeout_ms;
    for (;;) {
        char *nl = memchr(buf, '\n', *buflen);
        if (nl) {
            size_t n = (size_t)(nl - buf);
            snprintf(line, len, "%.*s", (int)n, buf);
            memmove(buf, nl + 1, *buflen - n - 1);
            *buflen -= n + 1;
            return true;
        }
        if (*buflen == bufsize)
            cr_assert_fail("proc_read_line: line longer than %zu bytes", bufsize);
        int64_t left = deadline - proc_now_ms();
        if (left <= 0)
            return false;
        struct pollfd pfd = {fd, POLLIN, 0};
        int r = poll(&pfd, 1, (int)left);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return false;
        ssize_t got = read(fd, buf + *buflen, bufsize - *buflen);
        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0)
            return false;
        *buflen += (size_t)got;
    }
}
