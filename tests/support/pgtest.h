/* pgtest: helpers for Criterion tests that need a real PostgreSQL (see tests/with-postgres). */
#ifndef SAGA_PGTEST_H
#define SAGA_PGTEST_H

#endif
