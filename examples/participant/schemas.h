/* schemas: the participant contract (examples/contract.sql) and the example services'
 * schema.sql files, compiled into example-participant by examples/embed-schemas.py, so that a
 * container needs no examples/ folder. */
#ifndef SAGA_PARTICIPANT_SCHEMAS_H
#define SAGA_PARTICIPANT_SCHEMAS_H

#include <stddef.h>

struct participant_schema {
    const char *service;  /* "inventory": the folder name, also the SQL schema name */
    const char *contract; /* examples/contract.sql for this service (name filled in) */
    const char *sql;      /* examples/<service>/schema.sql, applied after the contract */
};

/* Static data: never freed. */
extern const struct participant_schema participant_schemas[];
extern const size_t participant_schema_count;

#endif
