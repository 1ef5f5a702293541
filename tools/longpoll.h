/* longpoll: makes librdkafka 2.0.2's mock cluster answer a Fetch when data arrives, as a real
 * Kafka broker does, instead of after the whole fetch.wait.max.ms.
 *
 * Why: the mock answers a Fetch that finds no data only when the request's MaxWait has passed,
 * even if a producer appends to the partition a moment later (rdkafka_mock_handlers.c says so
 * itself). A consumer then either waits up to MaxWait per hop (latency) or polls with a tiny
 * MaxWait (the dev setup used 1 ms: the broker and every consumer spun at rest, ~350 ms of CPU a
 * second on the saga benchmark's system).
 *
 * How: every connection the mock accepts goes through a relay thread in this process. The
 * accept() interposer (nodelay.c) calls longpoll_wrap() with the client's TCP socket; the mock
 * gets one end of a socketpair instead, and the thread copies Kafka frames between the two:
 *   - a Fetch request (v4..v11) is forwarded with MaxWait 0, so the mock answers at once;
 *   - an answer with no records and no error is held back ("parked") until a Produce to one of
 *     the Fetch's topics is acknowledged (on any connection of the cluster) — then the Fetch is
 *     asked again — or until the client's MaxWait has passed, when the held answer is sent;
 *   - everything else passes through untouched; answers go back in the order of the requests
 *     (a Kafka broker answers a connection's requests in order).
 * Versions it does not parse pass through unchanged (and a Produce it cannot read wakes every
 * parked Fetch). MinBytes is not looked at (a Fetch goes back with the first records, as with
 * librdkafka's fetch.min.bytes=1). Each connection takes three descriptors instead of one. The mock
 * keeps its own behaviour for everything else (errors, rtt, down/up: when the mock closes its end
 * the client's connection is closed).
 *
 * Ownership: the relay thread owns both sockets of each wrapped connection and closes them when
 * either side closes. Nothing is freed at exit: the process ends with _exit(). */
#ifndef SAGA_LONGPOLL_H
#define SAGA_LONGPOLL_H

/* Starts the relay thread. Call once, before the mock cluster accepts connections. Returns 0,
 * or -1 with a message on stderr. */
__attribute__((warn_unused_result)) int longpoll_start(void);

/* Makes every held Fetch ask the mock again now (thread-safe; a no-op when not running).
 * dev-broker calls it after a control command that changes what a Fetch would be answered:
 * a leader moved, a broker down or up, errors injected. */
void longpoll_wake_all(void);

/* Called with a freshly accepted client socket and the accept4() flags the caller asked for
 * (SOCK_NONBLOCK, SOCK_CLOEXEC; 0 for accept()). Returns the socket the caller should use
 * instead — the mock's end of a new socketpair, with those flags — or client_fd itself when the
 * relay is not running or cannot take the connection (then nothing changes). Takes ownership of
 * client_fd when it returns another socket; the caller owns the socket returned. Thread-safe. */
__attribute__((warn_unused_result)) int longpoll_wrap(int client_fd, int flags);

#endif
