/* longpoll: a Fetch that finds no data waits for a Produce instead of for MaxWait. See
 * longpoll.h for why and how. */
#include "longpoll.h"

#include <errno.h>
#include <ev.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define LONGPOLL_API_PRODUCE 0
#define LONGPOLL_API_FETCH 1
/* The versions whose layout is parsed here (non-flexible ones; librdkafka 2.0.2 sends Fetch v11
 * and Produce v7 at most). Other versions pass through. */
#define LONGPOLL_FETCH_MIN 4
#define LONGPOLL_FETCH_MAX 11
#define LONGPOLL_PRODUCE_MIN 3
#define LONGPOLL_PRODUCE_MAX 8
/* Larger frames close the connection (a real broker's socket.request.max.bytes is 100 MB). */
#define LONGPOLL_FRAME_MAX (256 * 1024 * 1024)
#define LONGPOLL_READ_CHUNK 65536

/* A growable byte buffer: data[off..len) is what is still to be read or written. No
 * back-pressure: a side that stops reading lets the other side's answers pile up here (a dev
 * tool with well-behaved clients; a broker would stop reading the connection). */
struct longpoll_buf {
    char *data;
    size_t off;
    size_t len;
    size_t cap;
};

enum longpoll_state {
    LONGPOLL_AT_MOCK, /* sent to the mock, its answer not read yet */
    LONGPOLL_PARKED,  /* an empty Fetch answer held back, waiting for data or the deadline */
    LONGPOLL_DONE     /* the answer to send to the client is in response */
};

/* One request of a client, from its arrival until its answer is queued for the client. */
struct longpoll_request {
    struct longpoll_request *next;      /* the connection's requests, in arrival order */
    struct longpoll_request *mock_next; /* the requests at the mock, in the order sent */
    struct longpoll_conn *conn;         /* borrowed */
    int16_t api_key;                    /* -1: a frame too short to say */
    int32_t correlation_id;
    int long_poll; /* a Fetch whose MaxWait this relay took over */
    int wildcard;  /* a Produce whose topics could not be read: wakes every Fetch */
    enum longpoll_state state;
    int wake;      /* data arrived while it was at the mock: ask again if it comes back empty */
    int expired;   /* its MaxWait has passed: the next answer goes to the client */
    char *request; /* owned: the frame as sent to the mock (long_poll only) */
    size_t request_len;
    char **topics; /* owned: topic names it reads (Fetch) or writes (Produce) */
    size_t topic_count;
    char *response; /* owned: the mock's latest answer (whole frame) */
    size_t response_len;
    ev_timer timer; /* long_poll: fires at MaxWait */
};

struct longpoll_conn {
    struct longpoll_conn *prev, *next; /* all connections */
    int client_fd;
    int mock_fd;
    int closing; /* the client went away: only the mock's last answers are still read */
    ev_io client_read, client_write, mock_read, mock_write;
    struct longpoll_buf client_in, client_out, mock_in, mock_out;
    struct longpoll_request *head, *tail;           /* in arrival order */
    struct longpoll_request *mock_head, *mock_tail; /* at the mock, in the order sent */
};

struct longpoll_pending {
    struct longpoll_pending *next;
    int client_fd;
    int relay_fd;
};

static struct {
    atomic_int running; /* set once the thread runs; read by accept() in the mock thread */
    struct ev_loop *loop;
    ev_async wakeup;   /* connections handed over */
    ev_async wake_all; /* longpoll_wake_all() */
    pthread_mutex_t lock;
    struct longpoll_pending *pending; /* under lock: connections handed over by accept() */
    struct longpoll_conn *conns;      /* relay thread only */
} longpoll = {.lock = PTHREAD_MUTEX_INITIALIZER};

/* ---- buffers and frame parsing ------------------------------------------------------------ */

static void longpoll_oom(void)
{
    fprintf(stderr, "dev-broker: longpoll: out of memory\n");
    abort();
}

static void longpoll_buf_append(struct longpoll_buf *buf, const void *data, size_t len)
{
    if (buf->off > 0 && buf->off == buf->len)
        buf->off = buf->len = 0;
    if (buf->len + len > buf->cap) {
        if (buf->off > 0) {
            memmove(buf->data, buf->data + buf->off, buf->len - buf->off);
            buf->len -= buf->off;
            buf->off = 0;
        }
        if (buf->len + len > buf->cap) {
            size_t cap = buf->cap ? buf->cap : 4096;
            while (cap < buf->len + len)
                cap *= 2;
            char *data_new = realloc(buf->data, cap);
            if (!data_new)
                longpoll_oom();
            buf->data = data_new;
            buf->cap = cap;
        }
    }
    memcpy(buf->data + buf->len, data, len);
    buf->len += len;
}

/* A read cursor over one frame; every read past its end sets bad. */
struct longpoll_cursor {
    const unsigned char *p;
    size_t left;
    int bad;
};

static int64_t longpoll_read_int(struct longpoll_cursor *c, size_t width)
{
    uint64_t v = 0;
    if (c->bad || c->left < width) {
        c->bad = 1;
        return 0;
    }
    for (size_t i = 0; i < width; i++)
        v = (v << 8) | c->p[i];
    c->p += width;
    c->left -= width;
    /* Sign-extend from width bytes. */
    if (width < 8 && (v >> (width * 8 - 1)) & 1)
        v |= ~(uint64_t)0 << (width * 8);
    return (int64_t)v;
}

static void longpoll_skip(struct longpoll_cursor *c, int64_t n)
{
    if (c->bad || n < 0 || (uint64_t)n > c->left) {
        c->bad = 1;
        return;
    }
    c->p += n;
    c->left -= (size_t)n;
}

/* Reads a non-null int16-length string into a new string (NULL when bad). */
static char *longpoll_read_string(struct longpoll_cursor *c)
{
    int64_t len = longpoll_read_int(c, 2);
    const unsigned char *start = c->p;
    char *s;
    longpoll_skip(c, len);
    if (c->bad)
        return NULL;
    s = malloc((size_t)len + 1);
    if (!s)
        longpoll_oom();
    memcpy(s, start, (size_t)len);
    s[len] = '\0';
    return s;
}

/* Reads an int32 array count; counts beyond what the frame can hold are bad. */
static int64_t longpoll_read_count(struct longpoll_cursor *c)
{
    int64_t n = longpoll_read_int(c, 4);
    if (n < 0 || (uint64_t)n > c->left)
        c->bad = 1;
    return c->bad ? 0 : n;
}

static void longpoll_topic_add(struct longpoll_request *r, char *name)
{
    char **topics = realloc(r->topics, (r->topic_count + 1) * sizeof(*topics));
    if (!topics)
        longpoll_oom();
    r->topics = topics;
    r->topics[r->topic_count++] = name;
}

static void longpoll_topics_free(struct longpoll_request *r)
{
    for (size_t i = 0; i < r->topic_count; i++)
        free(r->topics[i]);
    free(r->topics);
    r->topics = NULL;
    r->topic_count = 0;
}

/* Reads a request's topic name into r and the count of its partitions (0 when bad). */
static int64_t longpoll_read_topic(struct longpoll_cursor *c, struct longpoll_request *r)
{
    char *name = longpoll_read_string(c);
    if (!name)
        return 0;
    longpoll_topic_add(r, name);
    return longpoll_read_count(c);
}

/* Positions c after the request header (v1: api key, version, correlation id, client id).
 * frame excludes the size prefix. */
static void longpoll_skip_request_header(struct longpoll_cursor *c)
{
    longpoll_skip(c, 8);
    int64_t client_id_len = longpoll_read_int(c, 2);
    if (client_id_len > 0)
        longpoll_skip(c, client_id_len);
}

/* A Fetch request v4..v11 (frame without its size prefix): reads its topics into r and its
 * MaxWait; rewrites MaxWait to 0 in place when it was positive. Returns the MaxWait in ms, or
 * -1 when the frame does not parse (then nothing was changed). */
static int32_t longpoll_parse_fetch(unsigned char *frame, size_t len, int version,
                                    struct longpoll_request *r)
{
    struct longpoll_cursor c = {frame, len, 0};
    unsigned char *max_wait_at;
    int32_t max_wait;

    longpoll_skip_request_header(&c);
    longpoll_skip(&c, 4); /* ReplicaId */
    max_wait_at = (unsigned char *)c.p;
    max_wait = (int32_t)longpoll_read_int(&c, 4);
    longpoll_skip(&c, 4 + 4 + 1); /* MinBytes, MaxBytes, IsolationLevel */
    if (version >= 7)
        longpoll_skip(&c, 8); /* SessionId, SessionEpoch */
    int64_t topics = longpoll_read_count(&c);
    for (int64_t t = 0; t < topics && !c.bad; t++) {
        int64_t partitions = longpoll_read_topic(&c, r);
        size_t each = 4 + (version >= 9 ? 4 : 0) + 8 + (version >= 5 ? 8 : 0) + 4;
        longpoll_skip(&c, partitions * (int64_t)each);
    }
    if (c.bad) {
        longpoll_topics_free(r);
        return -1;
    }
    if (max_wait > 0)
        memset(max_wait_at, 0, 4);
    return max_wait;
}

/* A Produce request v3..v8: reads its topics into r. Returns 0, or -1 when it does not parse. */
static int longpoll_parse_produce(const unsigned char *frame, size_t len,
                                  struct longpoll_request *r)
{
    struct longpoll_cursor c = {frame, len, 0};

    longpoll_skip_request_header(&c);
    int64_t txn_len = longpoll_read_int(&c, 2); /* TransactionalId, nullable */
    if (txn_len > 0)
        longpoll_skip(&c, txn_len);
    longpoll_skip(&c, 2 + 4); /* Acks, TimeoutMs */
    int64_t topics = longpoll_read_count(&c);
    for (int64_t t = 0; t < topics && !c.bad; t++) {
        int64_t partitions = longpoll_read_topic(&c, r);
        for (int64_t p = 0; p < partitions && !c.bad; p++) {
            longpoll_skip(&c, 4); /* Index */
            int64_t records = longpoll_read_int(&c, 4);
            if (records > 0)
                longpoll_skip(&c, records);
        }
    }
    if (c.bad) {
        longpoll_topics_free(r);
        return -1;
    }
    return 0;
}

/* A Fetch response v4..v11 (frame without its size prefix). Returns 1 when it carries no
 * records and no error (an answer worth holding back), else 0 (also when it does not parse:
 * then it goes to the client as it is). */
static int longpoll_fetch_is_empty(const unsigned char *frame, size_t len, int version)
{
    struct longpoll_cursor c = {frame, len, 0};

    longpoll_skip(&c, 4 + 4); /* CorrelationId, ThrottleTimeMs */
    if (version >= 7) {
        if (longpoll_read_int(&c, 2) != 0) /* ErrorCode */
            return 0;
        longpoll_skip(&c, 4); /* SessionId */
    }
    int64_t topics = longpoll_read_count(&c);
    for (int64_t t = 0; t < topics && !c.bad; t++) {
        longpoll_skip(&c, longpoll_read_int(&c, 2)); /* Topic */
        int64_t partitions = longpoll_read_count(&c);
        for (int64_t p = 0; p < partitions && !c.bad; p++) {
            longpoll_skip(&c, 4); /* PartitionIndex */
            if (longpoll_read_int(&c, 2) != 0)
                return 0;
            longpoll_skip(&c, 8 + 8 + (version >= 5 ? 8 : 0)); /* HW, LSO, LogStartOffset */
            int64_t aborted = longpoll_read_int(&c, 4);        /* nullable array */
            if (aborted > 0)
                longpoll_skip(&c, aborted * 16);
            /* PreferredReadReplica: an answer that sends the client elsewhere goes at once. */
            if (version >= 11 && longpoll_read_int(&c, 4) != -1)
                return 0;
            int64_t records = longpoll_read_int(&c, 4);
            if (records > 0)
                return 0;
        }
    }
    return c.bad ? 0 : 1;
}

/* ---- connections ---------------------------------------------------------------------------- */

static int longpoll_write(int fd, struct longpoll_buf *buf, ev_io *watcher);
static void longpoll_kick(struct longpoll_conn *conn);

static void longpoll_request_free(struct longpoll_request *r)
{
    if (r->long_poll)
        ev_timer_stop(longpoll.loop, &r->timer);
    longpoll_topics_free(r);
    free(r->request);
    free(r->response);
    free(r);
}

static void longpoll_conn_close(struct longpoll_conn *conn)
{
    ev_io_stop(longpoll.loop, &conn->client_read);
    ev_io_stop(longpoll.loop, &conn->client_write);
    ev_io_stop(longpoll.loop, &conn->mock_read);
    ev_io_stop(longpoll.loop, &conn->mock_write);
    close(conn->client_fd);
    close(conn->mock_fd);
    while (conn->head) {
        struct longpoll_request *r = conn->head;
        conn->head = r->next;
        longpoll_request_free(r);
    }
    free(conn->client_in.data);
    free(conn->client_out.data);
    free(conn->mock_in.data);
    free(conn->mock_out.data);
    if (conn->prev)
        conn->prev->next = conn->next;
    else
        longpoll.conns = conn->next;
    if (conn->next)
        conn->next->prev = conn->prev;
    free(conn);
}

static void longpoll_send_to_mock(struct longpoll_conn *conn, struct longpoll_request *r,
                                  const void *frame, size_t len)
{
    r->state = LONGPOLL_AT_MOCK;
    r->mock_next = NULL;
    if (conn->mock_tail)
        conn->mock_tail->mock_next = r;
    else
        conn->mock_head = r;
    conn->mock_tail = r;
    longpoll_buf_append(&conn->mock_out, frame, len);
    ev_io_start(longpoll.loop, &conn->mock_write);
}

/* Queues for the client every answer that is next in request order. */
static void longpoll_queue_answers(struct longpoll_conn *conn)
{
    while (conn->head && conn->head->state == LONGPOLL_DONE) {
        struct longpoll_request *r = conn->head;
        conn->head = r->next;
        if (!conn->head)
            conn->tail = NULL;
        if (!conn->closing)
            longpoll_buf_append(&conn->client_out, r->response, r->response_len);
        longpoll_request_free(r);
    }
    if (!conn->closing && conn->client_out.len > conn->client_out.off)
        ev_io_start(longpoll.loop, &conn->client_write);
}

static int longpoll_topics_meet(const struct longpoll_request *fetch,
                                const struct longpoll_request *produce)
{
    if (produce->wildcard)
        return 1;
    for (size_t i = 0; i < fetch->topic_count; i++)
        for (size_t j = 0; j < produce->topic_count; j++)
            if (strcmp(fetch->topics[i], produce->topics[j]) == 0)
                return 1;
    return 0;
}

/* A Produce was acknowledged: every Fetch waiting for one of its topics asks again (every
 * Fetch when produce is NULL). */
static void longpoll_wake(const struct longpoll_request *produce)
{
    for (struct longpoll_conn *conn = longpoll.conns; conn; conn = conn->next)
        for (struct longpoll_request *r = conn->head; r && !conn->closing; r = r->next) {
            if (!r->long_poll || r->state == LONGPOLL_DONE ||
                (produce && !longpoll_topics_meet(r, produce)))
                continue;
            if (r->state == LONGPOLL_PARKED)
                longpoll_send_to_mock(conn, r, r->request, r->request_len);
            else
                r->wake = 1;
        }
}

static void longpoll_timer_cb(struct ev_loop *loop, ev_timer *timer, int revents)
{
    struct longpoll_request *r = timer->data;
    (void)loop;
    (void)revents;
    r->expired = 1;
    if (r->state == LONGPOLL_PARKED) {
        r->state = LONGPOLL_DONE;
        longpoll_queue_answers(r->conn);
    }
}

/* One whole request frame (with its size prefix) from the client. */
static void longpoll_client_frame(struct longpoll_conn *conn, unsigned char *frame, size_t len)
{
    struct longpoll_request *r = calloc(1, sizeof(*r));
    if (!r)
        longpoll_oom();
    r->conn = conn;
    r->api_key = -1;
    if (len >= 4 + 8) {
        struct longpoll_cursor c = {frame + 4, len - 4, 0};
        r->api_key = (int16_t)longpoll_read_int(&c, 2);
        int version = (int)longpoll_read_int(&c, 2);
        r->correlation_id = (int32_t)longpoll_read_int(&c, 4);
        if (r->api_key == LONGPOLL_API_FETCH && version >= LONGPOLL_FETCH_MIN &&
            version <= LONGPOLL_FETCH_MAX) {
            int32_t max_wait = longpoll_parse_fetch(frame + 4, len - 4, version, r);
            if (max_wait > 0) {
                r->long_poll = 1;
                r->request = malloc(len);
                if (!r->request)
                    longpoll_oom();
                memcpy(r->request, frame, len);
                r->request_len = len;
                ev_timer_init(&r->timer, longpoll_timer_cb, max_wait / 1000.0, 0.);
                r->timer.data = r;
                ev_timer_start(longpoll.loop, &r->timer);
            } else {
                longpoll_topics_free(r);
            }
        } else if (r->api_key == LONGPOLL_API_PRODUCE) {
            if (version < LONGPOLL_PRODUCE_MIN || version > LONGPOLL_PRODUCE_MAX ||
                longpoll_parse_produce(frame + 4, len - 4, r) != 0)
                r->wildcard = 1;
        }
    }
    if (conn->tail)
        conn->tail->next = r;
    else
        conn->head = r;
    conn->tail = r;
    longpoll_send_to_mock(conn, r, frame, len);
}

/* One whole answer frame (with its size prefix) from the mock. Returns 0, or -1 when the mock
 * answered a request it was not asked (the connection is then closed). */
static int longpoll_mock_frame(struct longpoll_conn *conn, const unsigned char *frame, size_t len)
{
    struct longpoll_request *r = conn->mock_head, *prev = NULL;
    int32_t correlation_id;

    if (len < 4 + 4)
        return -1;
    correlation_id = (int32_t)(((uint32_t)frame[4] << 24) | ((uint32_t)frame[5] << 16) |
                               ((uint32_t)frame[6] << 8) | frame[7]);
    /* The mock answers a connection's requests in order, so this is the first one; looked up
     * by correlation id all the same, so that an answer out of order cannot be taken for
     * another request's (a Fetch's, say, and held back). */
    while (r && r->correlation_id != correlation_id) {
        prev = r;
        r = r->mock_next;
    }
    if (!r) {
        fprintf(stderr,
                "dev-broker: longpoll: closing a connection: the mock answered correlation id "
                "%d, which no request of it waits for\n",
                correlation_id);
        return -1;
    }
    if (prev)
        prev->mock_next = r->mock_next;
    else
        conn->mock_head = r->mock_next;
    if (conn->mock_tail == r)
        conn->mock_tail = prev;

    free(r->response);
    r->response = malloc(len);
    if (!r->response)
        longpoll_oom();
    memcpy(r->response, frame, len);
    r->response_len = len;
    r->state = LONGPOLL_DONE;

    if (r->long_poll && !r->expired) {
        const unsigned char *req = (const unsigned char *)r->request;
        int version = (req[6] << 8) | req[7]; /* after the size, the api key */
        if (longpoll_fetch_is_empty(frame + 4, len - 4, version)) {
            if (r->wake) {
                r->wake = 0;
                longpoll_send_to_mock(conn, r, r->request, r->request_len);
            } else {
                r->state = LONGPOLL_PARKED;
            }
        }
    }
    if (r->api_key == LONGPOLL_API_PRODUCE)
        longpoll_wake(r); /* before the flush frees r */
    longpoll_queue_answers(conn);
    return 0;
}

/* Reads what fd has into buf. Returns 1 if something was read, 0 if nothing yet, -1 on end of
 * file or error. */
static int longpoll_read(int fd, struct longpoll_buf *buf)
{
    char chunk[LONGPOLL_READ_CHUNK];
    ssize_t n = read(fd, chunk, sizeof(chunk));
    if (n > 0) {
        longpoll_buf_append(buf, chunk, (size_t)n);
        return 1;
    }
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
        return 0;
    return -1;
}

/* Hands each whole frame of buf to handle (which may add to other buffers, not to buf).
 * Returns 0, or -1 when a frame is malformed or the handler refused it. */
static int longpoll_frames(struct longpoll_conn *conn, struct longpoll_buf *buf,
                           int (*handle)(struct longpoll_conn *, unsigned char *, size_t))
{
    while (buf->len - buf->off >= 4) {
        unsigned char *p = (unsigned char *)buf->data + buf->off;
        uint32_t size =
            ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
        if (size > LONGPOLL_FRAME_MAX) {
            fprintf(stderr,
                    "dev-broker: longpoll: closing a connection: a frame of %u bytes (at most "
                    "%d)\n",
                    (unsigned)size, LONGPOLL_FRAME_MAX);
            return -1;
        }
        if (buf->len - buf->off < 4 + (size_t)size)
            break;
        buf->off += 4 + (size_t)size;
        if (handle(conn, p, 4 + (size_t)size) != 0)
            return -1;
    }
    if (buf->off == buf->len)
        buf->off = buf->len = 0;
    return 0;
}

/* Returns 1 if a Produce of conn is at the mock (its acknowledgement may still wake Fetches). */
static int longpoll_produce_at_mock(const struct longpoll_conn *conn)
{
    for (const struct longpoll_request *r = conn->mock_head; r; r = r->mock_next)
        if (r->api_key == LONGPOLL_API_PRODUCE)
            return 1;
    return 0;
}

static int longpoll_client_frame_cb(struct longpoll_conn *conn, unsigned char *frame, size_t len)
{
    longpoll_client_frame(conn, frame, len);
    return 0;
}

static int longpoll_mock_frame_cb(struct longpoll_conn *conn, unsigned char *frame, size_t len)
{
    return longpoll_mock_frame(conn, frame, len);
}

static void longpoll_client_read_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    struct longpoll_conn *conn = w->data;
    (void)loop;
    (void)revents;
    int rc = longpoll_read(conn->client_fd, &conn->client_in);
    if (rc > 0 && longpoll_frames(conn, &conn->client_in, longpoll_client_frame_cb) != 0)
        rc = -1;
    if (rc >= 0) {
        longpoll_kick(conn);
    } else if (!longpoll_produce_at_mock(conn)) {
        longpoll_conn_close(conn);
    } else {
        /* The client went away with a Produce at the mock: it may still be appended, and its
         * acknowledgement must wake the Fetches waiting for it. Keep reading the mock's
         * answers (and drop them) until no Produce is due. */
        conn->closing = 1;
        ev_io_stop(longpoll.loop, &conn->client_read);
        ev_io_stop(longpoll.loop, &conn->client_write);
        conn->client_out.off = conn->client_out.len = 0;
    }
}

static void longpoll_mock_read_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    struct longpoll_conn *conn = w->data;
    (void)loop;
    (void)revents;
    int rc = longpoll_read(conn->mock_fd, &conn->mock_in);
    if (rc > 0 && longpoll_frames(conn, &conn->mock_in, longpoll_mock_frame_cb) != 0)
        rc = -1;
    if (rc < 0) {
        /* The mock closed (a broker going down): what it answered before still goes out. */
        if (!conn->closing)
            (void)longpoll_write(conn->client_fd, &conn->client_out, &conn->client_write);
        longpoll_conn_close(conn);
    } else if (conn->closing && !longpoll_produce_at_mock(conn)) {
        longpoll_conn_close(conn);
    } else {
        longpoll_kick(conn);
    }
}

/* Writes what it can of buf to fd. Returns 0, or -1 on a write error. */
static int longpoll_write(int fd, struct longpoll_buf *buf, ev_io *watcher)
{
    while (buf->off < buf->len) {
        ssize_t n = send(fd, buf->data + buf->off, buf->len - buf->off, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return 0;
            if (errno == EINTR)
                continue;
            return -1;
        }
        buf->off += (size_t)n;
    }
    buf->off = buf->len = 0;
    ev_io_stop(longpoll.loop, watcher);
    return 0;
}

/* Writes pending output now instead of one loop iteration later; a write error is left to the
 * write watcher (still started), whose callback closes the connection. */
static void longpoll_kick(struct longpoll_conn *conn)
{
    if (conn->mock_out.off < conn->mock_out.len)
        (void)longpoll_write(conn->mock_fd, &conn->mock_out, &conn->mock_write);
    if (!conn->closing && conn->client_out.off < conn->client_out.len)
        (void)longpoll_write(conn->client_fd, &conn->client_out, &conn->client_write);
}

static void longpoll_client_write_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    struct longpoll_conn *conn = w->data;
    (void)loop;
    (void)revents;
    if (longpoll_write(conn->client_fd, &conn->client_out, w) != 0)
        longpoll_conn_close(conn);
}

static void longpoll_mock_write_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    struct longpoll_conn *conn = w->data;
    (void)loop;
    (void)revents;
    if (longpoll_write(conn->mock_fd, &conn->mock_out, w) != 0)
        longpoll_conn_close(conn);
}

static void longpoll_conn_open(int client_fd, int mock_fd)
{
    struct longpoll_conn *conn = calloc(1, sizeof(*conn));
    if (!conn)
        longpoll_oom();
    conn->client_fd = client_fd;
    conn->mock_fd = mock_fd;
    ev_io_init(&conn->client_read, longpoll_client_read_cb, client_fd, EV_READ);
    ev_io_init(&conn->client_write, longpoll_client_write_cb, client_fd, EV_WRITE);
    ev_io_init(&conn->mock_read, longpoll_mock_read_cb, mock_fd, EV_READ);
    ev_io_init(&conn->mock_write, longpoll_mock_write_cb, mock_fd, EV_WRITE);
    conn->client_read.data = conn->client_write.data = conn;
    conn->mock_read.data = conn->mock_write.data = conn;
    conn->next = longpoll.conns;
    if (longpoll.conns)
        longpoll.conns->prev = conn;
    longpoll.conns = conn;
    ev_io_start(longpoll.loop, &conn->client_read);
    ev_io_start(longpoll.loop, &conn->mock_read);
}

/* ---- the thread and the hand-over ---------------------------------------------------------- */

static void longpoll_wakeup_cb(struct ev_loop *loop, ev_async *w, int revents)
{
    struct longpoll_pending *list;
    (void)loop;
    (void)w;
    (void)revents;
    pthread_mutex_lock(&longpoll.lock);
    list = longpoll.pending;
    longpoll.pending = NULL;
    pthread_mutex_unlock(&longpoll.lock);
    while (list) {
        struct longpoll_pending *p = list;
        list = p->next;
        longpoll_conn_open(p->client_fd, p->relay_fd);
        free(p);
    }
}

static void longpoll_wake_all_cb(struct ev_loop *loop, ev_async *w, int revents)
{
    (void)loop;
    (void)w;
    (void)revents;
    longpoll_wake(NULL);
    for (struct longpoll_conn *conn = longpoll.conns; conn; conn = conn->next)
        longpoll_kick(conn);
}

void longpoll_wake_all(void)
{
    if (atomic_load(&longpoll.running))
        ev_async_send(longpoll.loop, &longpoll.wake_all);
}

static void *longpoll_main(void *arg)
{
    (void)arg;
    ev_run(longpoll.loop, 0);
    return NULL;
}

int longpoll_start(void)
{
    pthread_t thread;
    pthread_attr_t attr;

    longpoll.loop = ev_loop_new(EVFLAG_AUTO);
    if (!longpoll.loop) {
        fprintf(stderr, "dev-broker: longpoll: cannot create an event loop\n");
        return -1;
    }
    ev_async_init(&longpoll.wakeup, longpoll_wakeup_cb);
    ev_async_start(longpoll.loop, &longpoll.wakeup);
    ev_async_init(&longpoll.wake_all, longpoll_wake_all_cb);
    ev_async_start(longpoll.loop, &longpoll.wake_all);
    if (pthread_attr_init(&attr) != 0) {
        fprintf(stderr, "dev-broker: longpoll: cannot start the relay thread\n");
        ev_loop_destroy(longpoll.loop);
        return -1;
    }
    if (pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED) != 0 ||
        pthread_create(&thread, &attr, longpoll_main, NULL) != 0) {
        fprintf(stderr, "dev-broker: longpoll: cannot start the relay thread\n");
        pthread_attr_destroy(&attr);
        ev_loop_destroy(longpoll.loop);
        return -1;
    }
    pthread_attr_destroy(&attr);
    atomic_store(&longpoll.running, 1);
    return 0;
}

/* Adds a file status flag to fd. Returns 0 or -1. */
static int longpoll_add_flag(int fd, int flag)
{
    int current = fcntl(fd, F_GETFL);
    return current < 0 ? -1 : fcntl(fd, F_SETFL, current | flag) < 0 ? -1 : 0;
}

int longpoll_wrap(int client_fd, int flags)
{
    int pair[2];
    int saved = errno;
    struct longpoll_pending *p;

    if (!atomic_load(&longpoll.running))
        return client_fd;
    p = malloc(sizeof(*p));
    if (!p) {
        errno = saved;
        return client_fd;
    }
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) != 0) {
        free(p);
        errno = saved;
        return client_fd;
    }
    /* The relay's ends are non-blocking; the mock's end gets what the caller asked for. A
     * descriptor that refuses its flags: the client's connection is left to the mock as it
     * came (unrelayed, still served). */
    if (longpoll_add_flag(client_fd, O_NONBLOCK) != 0 ||
        fcntl(client_fd, F_SETFD, FD_CLOEXEC) != 0 || longpoll_add_flag(pair[1], O_NONBLOCK) != 0 ||
        ((flags & SOCK_NONBLOCK) && longpoll_add_flag(pair[0], O_NONBLOCK) != 0) ||
        (!(flags & SOCK_CLOEXEC) && fcntl(pair[0], F_SETFD, 0) != 0)) {
        close(pair[0]);
        close(pair[1]);
        free(p);
        errno = saved;
        return client_fd;
    }
    p->client_fd = client_fd;
    p->relay_fd = pair[1];
    pthread_mutex_lock(&longpoll.lock);
    p->next = longpoll.pending;
    longpoll.pending = p;
    pthread_mutex_unlock(&longpoll.lock);
    ev_async_send(longpoll.loop, &longpoll.wakeup);
    errno = saved;
    return pair[0];
}
