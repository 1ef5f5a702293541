#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>

#include "kafka_conf.h"

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
