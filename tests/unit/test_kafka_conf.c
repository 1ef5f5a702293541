#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>

#include "kafka_conf.h" /* librdkafka/rdkafka.h, which rdkafka_mock.h wants first */

#include <librdkafka/rdkafka_mock.h>

Test(kafka_conf, stats_report_a_broker_up)
{
    const char *up = "{\"brokers\": {\"boot\": {\"state\": \"UP\", \"nodeid\": -1},"
                     " \"b1\": {\"state\": \"UP\", \"nodeid\": 1}}}";
    const char *bootstrap_only = "{\"brokers\": {\"boot\": {\"state\": \"UP\", \"nodeid\": -1}}}";
    const char *down = "{\"brokers\": {\"b1\": {\"state\": \"DOWN\", \"nodeid\": 1}}}";
    cr_assert(kafka_stats_any_broker_up(up, strlen(up)));
    cr_assert_not(kafka_stats_any_broker_up(bootstrap_only, strlen(bootstrap_only)),
                  "the bootstrap pseudo-broker is not a broker");
    cr_assert_not(kafka_stats_any_broker_up(down, strlen(down)));
    cr_assert_not(kafka_stats_any_broker_up("not json", 8));
}

Test(kafka_conf, env_maps_to_properties_and_names_bad_ones)
{
    char err[512], val[64];
    size_t len = sizeof(val);
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    setenv("KAFKA_SOCKET_KEEPALIVE_ENABLE", "true", 1);
    cr_assert_eq(kafka_conf_apply_env(conf, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(rd_kafka_conf_get(conf, "socket.keepalive.enable", val, &len), RD_KAFKA_CONF_OK);
    cr_assert_str_eq(val, "true");
    setenv("KAFKA_NO_SUCH_PROPERTY", "1", 1);
    cr_assert_eq(kafka_conf_apply_env(conf, err, sizeof(err)), -1);
    cr_assert(strstr(err, "KAFKA_NO_SUCH_PROPERTY"), "%s", err);
    unsetenv("KAFKA_NO_SUCH_PROPERTY");
    unsetenv("KAFKA_SOCKET_KEEPALIVE_ENABLE");
    rd_kafka_conf_destroy(conf);
}

/* One suite-wide timeout: two tests with different timeouts of their own made Criterion 2.4.1's
 * runner leak 48 bytes (LeakSanitizer, the ASan build). */
TestSuite(kafka_close, .timeout = 60);

/* kafka_consumer_close against librdkafka's in-process mock cluster (rdkafka_mock.h): a
 * consumer of one partition of topic "t" holding n messages, that has polled the first (its
 * fetch brought the rest into its queue). The producer owns the cluster. */
struct closing {
    rd_kafka_t *producer, *consumer;
    rd_kafka_mock_cluster_t *cluster;
    rd_kafka_message_t *first;
};

static int revoked;

static void closing_rebalance_cb(rd_kafka_t *rk, rd_kafka_resp_err_t err,
                                 rd_kafka_topic_partition_list_t *parts, void *opaque)
{
    if (err == RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS) {
        rd_kafka_assign(rk, parts);
    } else {
        rd_kafka_assign(rk, NULL);
        revoked++;
    }
}

static void closing_setup(struct closing *c, int n)
{
    char err[512];
    rd_kafka_conf_t *pc = rd_kafka_conf_new();
    cr_assert_eq(rd_kafka_conf_set(pc, "test.mock.num.brokers", "1", err, sizeof(err)),
                 RD_KAFKA_CONF_OK, "%s", err);
    c->producer = rd_kafka_new(RD_KAFKA_PRODUCER, pc, err, sizeof(err));
    cr_assert(c->producer, "%s", err);
    c->cluster = rd_kafka_handle_mock_cluster(c->producer);
    cr_assert_eq(rd_kafka_mock_topic_create(c->cluster, "t", 1, 1), RD_KAFKA_RESP_ERR_NO_ERROR);
    for (int i = 0; i < n; i++)
        cr_assert_eq(rd_kafka_producev(c->producer, RD_KAFKA_V_TOPIC("t"), RD_KAFKA_V_VALUE("x", 1),
                                       RD_KAFKA_V_END),
                     RD_KAFKA_RESP_ERR_NO_ERROR);
    cr_assert_eq(rd_kafka_flush(c->producer, 10000), RD_KAFKA_RESP_ERR_NO_ERROR);

    rd_kafka_conf_t *cc = rd_kafka_conf_new();
    const char *props[][2] = {{"bootstrap.servers", rd_kafka_mock_cluster_bootstraps(c->cluster)},
                              {"group.id", "g"},
                              {"enable.auto.commit", "false"},
                              {"auto.offset.reset", "earliest"}};
    for (size_t i = 0; i < sizeof(props) / sizeof(props[0]); i++)
        cr_assert_eq(rd_kafka_conf_set(cc, props[i][0], props[i][1], err, sizeof(err)),
                     RD_KAFKA_CONF_OK, "%s", err);
    rd_kafka_conf_set_rebalance_cb(cc, closing_rebalance_cb);
    c->consumer = rd_kafka_new(RD_KAFKA_CONSUMER, cc, err, sizeof(err));
    cr_assert(c->consumer, "%s", err);
    rd_kafka_poll_set_consumer(c->consumer);
    rd_kafka_topic_partition_list_t *topics = rd_kafka_topic_partition_list_new(1);
    rd_kafka_topic_partition_list_add(topics, "t", RD_KAFKA_PARTITION_UA);
    cr_assert_eq(rd_kafka_subscribe(c->consumer, topics), RD_KAFKA_RESP_ERR_NO_ERROR);
    rd_kafka_topic_partition_list_destroy(topics);
    c->first = NULL;
    for (int tries = 0; !c->first && tries < 150; tries++) { /* 30 s at most */
        c->first = rd_kafka_consumer_poll(c->consumer, 200);
        if (c->first && c->first->err) {
            rd_kafka_message_destroy(c->first);
            c->first = NULL;
        }
    }
    cr_assert(c->first, "no message within 30 s");
}

/* Closing with messages fetched and not polled: they are dropped, the revocation is served,
 * the consumer closes. (Served as a callback queue, a queued message failed librdkafka's
 * assertion and aborted the process: the test process then dies.) */
Test(kafka_close, drops_fetched_messages_and_serves_the_revocation)
{
    struct closing c;
    closing_setup(&c, 200);
    rd_kafka_message_destroy(c.first);
    revoked = 0;
    cr_assert(kafka_consumer_close(c.consumer, 10000), "closed");
    cr_assert_eq(revoked, 1);
    rd_kafka_destroy(c.producer);
}

/* Closing with the broker down and an offset commit in flight: rd_kafka_consumer_close did not
 * return within 100 s (librdkafka 2.0.2); the bounded close gives up after its bound and
 * leaves the handle to the process's exit. The suite's timeout (60 s) is the failure without it. */
Test(kafka_close, gives_up_after_its_bound_with_the_broker_down)
{
    struct closing c;
    closing_setup(&c, 1);
    cr_assert_eq(rd_kafka_mock_broker_set_down(c.cluster, 1), RD_KAFKA_RESP_ERR_NO_ERROR);
    cr_assert_eq(rd_kafka_commit_message(c.consumer, c.first, 1 /* async */),
                 RD_KAFKA_RESP_ERR_NO_ERROR);
    rd_kafka_message_destroy(c.first);
    cr_assert_not(kafka_consumer_close(c.consumer, 2000), "not closed: the broker is down");
}

/* An offset committed asynchronously just before the close (the participant's last batch at
 * SIGTERM) is committed when the close returns true, even with the broker answering slowly
 * (300 ms a request): another consumer of the group reads it. */
Test(kafka_close, waits_for_an_asynchronous_commit_in_flight)
{
    struct closing c;
    closing_setup(&c, 3);
    rd_kafka_message_destroy(c.first);
    cr_assert_eq(rd_kafka_mock_broker_set_rtt(c.cluster, 1, 300), RD_KAFKA_RESP_ERR_NO_ERROR);
    rd_kafka_topic_partition_list_t *offsets = rd_kafka_topic_partition_list_new(1);
    rd_kafka_topic_partition_list_add(offsets, "t", 0)->offset = 2;
    cr_assert_eq(rd_kafka_commit(c.consumer, offsets, 1 /* async */), RD_KAFKA_RESP_ERR_NO_ERROR);
    rd_kafka_topic_partition_list_destroy(offsets);
    cr_assert(kafka_consumer_close(c.consumer, 10000), "closed");
    cr_assert_eq(rd_kafka_mock_broker_set_rtt(c.cluster, 1, 0), RD_KAFKA_RESP_ERR_NO_ERROR);

    char err[512];
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    cr_assert_eq(rd_kafka_conf_set(conf, "bootstrap.servers",
                                   rd_kafka_mock_cluster_bootstraps(c.cluster), err, sizeof(err)),
                 RD_KAFKA_CONF_OK, "%s", err);
    cr_assert_eq(rd_kafka_conf_set(conf, "group.id", "g", err, sizeof(err)), RD_KAFKA_CONF_OK, "%s",
                 err);
    rd_kafka_t *other = rd_kafka_new(RD_KAFKA_CONSUMER, conf, err, sizeof(err));
    cr_assert(other, "%s", err);
    rd_kafka_topic_partition_list_t *committed = rd_kafka_topic_partition_list_new(1);
    rd_kafka_topic_partition_list_add(committed, "t", 0);
    cr_assert_eq(rd_kafka_committed(other, committed, 10000), RD_KAFKA_RESP_ERR_NO_ERROR);
    cr_assert_eq(committed->elems[0].offset, 2);
    rd_kafka_topic_partition_list_destroy(committed);
    rd_kafka_destroy(other);
    rd_kafka_destroy(c.producer);
}
