/* nodelay: sets TCP_NODELAY on every TCP socket the process accepts, by interposing accept()
 * and accept4(). Exists for the librdkafka 2.0.2 mock cluster, which never sets it on the
 * sockets it accepts: with more than one request in flight its replies then wait for the
 * client's delayed ACK (Nagle), about 40 ms each.
 *
 * How: linking nodelay.c into an executable defines accept/accept4 there; the executable's
 * definitions come first in the dynamic symbol lookup, so librdkafka's PLT calls land here and
 * are forwarded to the C library's through dlsym(RTLD_NEXT). Only executables that link
 * nodelay.c are affected; nothing is patched.
 *
 * The interposer is on by default; DEV_BROKER_NODELAY=0 in the environment (read once, at the
 * first accept) or nodelay_set_enabled(0) turns it into a plain pass-through, which the
 * benchmark and the tests use as the "before" case. */
#ifndef SAGA_NODELAY_H
#define SAGA_NODELAY_H

/* Turns the interposer on (nonzero) or off (0) for sockets accepted from now on. Overrides
 * DEV_BROKER_NODELAY. Thread-safe. */
void nodelay_set_enabled(int enabled);

/* Returns 1 if sockets accepted now get TCP_NODELAY, else 0. */
int nodelay_enabled(void);

/* A function every accepted socket then goes through (after TCP_NODELAY): it gets the socket
 * and the accept4() flags (0 for accept()) and returns the socket to give the caller (dev-broker
 * installs longpoll_wrap). NULL: none (the default). Set it before sockets are accepted. */
typedef int (*nodelay_accept_hook)(int fd, int flags);
void nodelay_set_accept_hook(nodelay_accept_hook hook);

#endif
