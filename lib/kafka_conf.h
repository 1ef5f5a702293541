/* kafka_conf: librdkafka configuration from the environment, as in Confluent's images. */
#ifndef SAGA_KAFKA_CONF_H
#define SAGA_KAFKA_CONF_H

#include <stddef.h>

#include <librdkafka/rdkafka.h>

/* Applies every KAFKA_<NAME>=value environment variable to conf as the property <name>,
 * lower-cased with '_' turned into '.' (KAFKA_SECURITY_PROTOCOL -> security.protocol).
 * KAFKA_<NAME>_FILE reads the value from a file (for secrets). Returns 0, or -1 with a
 * message in err naming the variable (never its value). conf is borrowed. */
__attribute__((warn_unused_result)) int kafka_conf_apply_env(rd_kafka_conf_t *conf, char *err,
                                                             size_t errlen);

/* Sets one property; on failure writes "what: librdkafka's reason" into err. */
__attribute__((warn_unused_result)) int kafka_conf_set(rd_kafka_conf_t *conf, const char *name,
                                                       const char *value, const char *what,
                                                       char *err, size_t errlen);

#endif
