-- 012_instances_checked_by_domains: saga.instances' value rules (status, phase, wait,
-- trace_id, pending_request) are checked by domains instead of table CHECK constraints.
--
-- PostgreSQL reads a table's CHECK constraints from the catalog and plans them again at every
-- execution of a statement that writes the table, and evaluates all of them on every row it
-- writes, changed or not. saga.start inserts one row per call, so it planned the five CHECKs
-- once per saga, and each of a saga's ~5 updates by saga.apply_batch ran the trace_id regular
-- expression again on a value it never changes. A domain's rule is planned once per session
-- (the type cache) and runs only when a value is assigned to a column of the domain: an UPDATE
-- that leaves trace_id alone does not check it. Measured in one session, alternating two
-- databases (10 rounds of 5,000 calls): saga.start 119 -> 96 µs a call. The rules themselves
-- are unchanged; a violation now reads 'value for domain saga.saga_status violates check
-- constraint "saga_status_check"' (SQLSTATE 23514 as before). Clients still see text columns
-- (PostgreSQL describes a domain column by its base type).
--
-- Locks and time: one transaction under the table's ACCESS EXCLUSIVE lock (the orchestrators
-- apply migrations under their advisory lock; saga.start and the claims wait meanwhile). The
-- CHECKs are dropped before the columns change type (a CHECK that depends on a column is
-- otherwise re-created and re-validated by reading the whole table), the domains get their
-- rules after it and NOT VALID (the rows there passed the same rules as CHECKs: nothing to
-- read again; every new value is checked). The type change is a catalog change (no rewrite,
-- the primary key and the status index are kept); the two partial indexes whose predicates
-- name status and pending_request are rebuilt, a read of the table each: ~1 s per million
-- sagas in all (0.18 s for 200,000 here).
--
-- Before upgrading: views (and policies, functions with SQL-standard bodies) that read those
-- columns must be dropped and created again after (checked below: the migration stops and
-- names them). A client's server-side prepared statement that returns one of the columns
-- fails once with "cached plan must not change result type" and must be prepared again (the
-- orchestrator does so by itself).

-- A view, rule, policy or SQL-standard function body that reads one of the five columns
-- would make the type change fail with PostgreSQL's "cannot alter type of a column used by a
-- view or rule" (and the orchestrator would not start): named here first, with what to do.
DO $$
DECLARE
    blockers text;
BEGIN
    SELECT string_agg(DISTINCT what, ', ' ORDER BY what) INTO blockers
      FROM (SELECT CASE d.classid
                       WHEN 'pg_rewrite'::regclass THEN
                           'view ' || (SELECT r.ev_class::regclass::text FROM pg_rewrite r
                                        WHERE r.oid = d.objid)
                       WHEN 'pg_policy'::regclass THEN
                           'policy ' || (SELECT p.polname || ' on ' || p.polrelid::regclass::text
                                           FROM pg_policy p WHERE p.oid = d.objid)
                       WHEN 'pg_proc'::regclass THEN 'function ' || d.objid::regprocedure::text
                       ELSE pg_describe_object(d.classid, d.objid, d.objsubid)
                   END AS what
              FROM pg_depend d
              JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
             WHERE d.refclassid = 'pg_class'::regclass
               AND d.refobjid = 'saga.instances'::regclass
               AND a.attname IN ('status', 'phase', 'wait', 'trace_id', 'pending_request')
               AND d.classid IN ('pg_rewrite'::regclass, 'pg_policy'::regclass,
                                 'pg_proc'::regclass)) s;
    IF blockers IS NOT NULL THEN
        RAISE EXCEPTION '012_instances_checked_by_domains changes the type of saga.instances''s '
                        'status, phase, wait, trace_id and pending_request (text to domains '
                        'over text), which % read: drop them, let the migration run, then '
                        'create them again', blockers
            USING ERRCODE = 'SG030';
    END IF;
END
$$;

CREATE DOMAIN saga.saga_status AS text;
CREATE DOMAIN saga.saga_phase AS text;
CREATE DOMAIN saga.saga_wait AS text;
CREATE DOMAIN saga.trace_id AS text;
CREATE DOMAIN saga.operator_request AS text;

ALTER TABLE saga.instances
    DROP CONSTRAINT instances_status_check,
    DROP CONSTRAINT instances_phase_check,
    DROP CONSTRAINT instances_wait_check,
    DROP CONSTRAINT instances_trace_id_check,
    DROP CONSTRAINT instances_pending_request_check;
ALTER TABLE saga.instances
    ALTER COLUMN status TYPE saga.saga_status,
    ALTER COLUMN phase TYPE saga.saga_phase,
    ALTER COLUMN wait TYPE saga.saga_wait,
    ALTER COLUMN trace_id TYPE saga.trace_id,
    ALTER COLUMN pending_request TYPE saga.operator_request;

ALTER DOMAIN saga.saga_status ADD CONSTRAINT saga_status_check
    CHECK (VALUE IN ('pending', 'running', 'compensating', 'completed', 'compensated', 'failed'))
    NOT VALID;
ALTER DOMAIN saga.saga_phase ADD CONSTRAINT saga_phase_check
    CHECK (VALUE IN ('action', 'compensation')) NOT VALID;
ALTER DOMAIN saga.saga_wait ADD CONSTRAINT saga_wait_check
    CHECK (VALUE IN ('none', 'reply', 'backoff')) NOT VALID;
ALTER DOMAIN saga.trace_id ADD CONSTRAINT trace_id_check
    CHECK (VALUE ~ '^[0-9a-f]{32}$') NOT VALID;
ALTER DOMAIN saga.operator_request ADD CONSTRAINT operator_request_check
    CHECK (VALUE IN ('retry', 'abort')) NOT VALID;

COMMENT ON DOMAIN saga.saga_status IS
    'saga.instances.status: pending, running, compensating, completed, compensated or failed';
COMMENT ON DOMAIN saga.saga_phase IS 'saga.instances.phase: action or compensation';
COMMENT ON DOMAIN saga.saga_wait IS 'saga.instances.wait: none, reply or backoff';
COMMENT ON DOMAIN saga.trace_id IS 'A W3C trace-id: 32 lowercase hex digits';
COMMENT ON DOMAIN saga.operator_request IS 'saga.instances.pending_request: retry or abort';

-- A type change drops the columns' planner statistics; autovacuum would gather them again only
-- after enough of the table changed. A sample of the table, under the lock already held.
ANALYZE saga.instances (status, phase, wait, trace_id, pending_request);
