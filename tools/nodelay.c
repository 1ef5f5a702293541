/* nodelay: accept()/accept4() interposer that sets TCP_NODELAY on accepted TCP sockets.
 * See nodelay.h for why and how. */
#include "nodelay.h"

#include <dlfcn.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

/* glibc declares accept() with __SOCKADDR_ARG (a transparent union under _GNU_SOURCE), so the
 * definitions below must use the same type to match its prototype. */
typedef int (*accept_fn)(int, __SOCKADDR_ARG, socklen_t *__restrict);
typedef int (*accept4_fn)(int, __SOCKADDR_ARG, socklen_t *__restrict, int);

/* -1: not decided yet (read DEV_BROKER_NODELAY on first use), 0: off, 1: on. */
static atomic_int nodelay_state = -1;

void nodelay_set_enabled(int enabled)
{
    atomic_store(&nodelay_state, enabled ? 1 : 0);
}

int nodelay_enabled(void)
{
    int state = atomic_load(&nodelay_state);
    if (state < 0) {
        const char *env = getenv("DEV_BROKER_NODELAY");
        int from_env = !(env && strcmp(env, "0") == 0);
        int expected = -1;
        /* A concurrent nodelay_set_enabled() wins over the environment. */
        atomic_compare_exchange_strong(&nodelay_state, &expected, from_env);
        state = atomic_load(&nodelay_state);
    }
    return state;
}

static _Atomic(nodelay_accept_hook) nodelay_hook;

static void nodelay_apply(int fd);

void nodelay_set_accept_hook(nodelay_accept_hook hook)
{
    atomic_store(&nodelay_hook, hook);
}

/* Applies TCP_NODELAY (when enabled) and the hook to a socket accept() returned. */
static int nodelay_accepted(int fd, int flags)
{
    nodelay_accept_hook hook;
    if (fd < 0)
        return fd;
    if (nodelay_enabled())
        nodelay_apply(fd);
    hook = atomic_load(&nodelay_hook);
    return hook ? hook(fd, flags) : fd;
}

/* dlsym() returns void *; converting it to a function pointer is what POSIX requires to work,
 * but ISO C (and -Wpedantic) objects to the cast, hence the memcpy. */
static void *nodelay_next(const char *name)
{
    void *sym = dlsym(RTLD_NEXT, name);
    if (!sym) {
        /* Without the real accept the process cannot work at all: fail loudly. */
        fprintf(stderr, "nodelay: dlsym(RTLD_NEXT, \"%s\") failed: %s\n", name, dlerror());
        abort();
    }
    return sym;
}

/* Sets TCP_NODELAY on fd if it is a TCP socket. Keeps errno intact: callers of accept() look at
 * errno only on failure, but a failing setsockopt must not disturb anything either way. */
static void nodelay_apply(int fd)
{
    int saved = errno;
    struct sockaddr_storage local;
    socklen_t len = sizeof(local);
    int on = 1;

    if (getsockname(fd, (struct sockaddr *)&local, &len) == 0 &&
        (local.ss_family == AF_INET || local.ss_family == AF_INET6))
        (void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &on, sizeof(on));
    errno = saved;
}

int accept(int sockfd, __SOCKADDR_ARG addr, socklen_t *__restrict addrlen)
{
    static _Atomic(accept_fn) real_accept;
    accept_fn fn = atomic_load(&real_accept);
    if (!fn) {
        void *sym = nodelay_next("accept");
        memcpy(&fn, &sym, sizeof(fn));
        atomic_store(&real_accept, fn);
    }

    return nodelay_accepted(fn(sockfd, addr, addrlen), 0);
}

int accept4(int sockfd, __SOCKADDR_ARG addr, socklen_t *__restrict addrlen, int flags)
{
    static _Atomic(accept4_fn) real_accept4;
    accept4_fn fn = atomic_load(&real_accept4);
    if (!fn) {
        void *sym = nodelay_next("accept4");
        memcpy(&fn, &sym, sizeof(fn));
        atomic_store(&real_accept4, fn);
    }

    return nodelay_accepted(fn(sockfd, addr, addrlen, flags), flags);
}
