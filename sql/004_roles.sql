-- 004_roles: least-privilege group roles (NOLOGIN). Deployments create login users that are
-- members of them, for example
--   CREATE ROLE orchestrator LOGIN PASSWORD '...' IN ROLE saga_orchestrator;
--   CREATE ROLE relay        LOGIN PASSWORD '...' IN ROLE saga_relay;
--
--   saga_orchestrator  runs saga-orchestrator: reads and writes the saga tables, writes
--                      saga.outbox; cannot change the schema (migrate with the owner first)
--   saga_relay         runs outbox-relay: reads and deletes outbox rows, writes their dead
--                      letters; nothing else (no saga state, no business tables)
--   saga_client        services that call saga.start / saga.retry / saga.abort
--   saga_operator      read-only: every saga table (psql, dashboards, sagactl status/list)
--
-- Roles are cluster-wide and creating them needs CREATEROLE: when the migrating user lacks
-- it, the roles are skipped with a notice (create them by hand with the same names, then
-- run the GRANTs below again with SELECT saga.grant_roles()).

DO $$
DECLARE
    r text;
BEGIN
    IF NOT (SELECT rolsuper OR rolcreaterole FROM pg_roles WHERE rolname = current_user) THEN
        RAISE NOTICE 'saga roles not created: % has no CREATEROLE', current_user;
        RETURN;
    END IF;
    FOREACH r IN ARRAY ARRAY['saga_orchestrator', 'saga_relay', 'saga_client', 'saga_operator'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN', r);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL; -- another database of the cluster migrating at the same moment
            END;
        END IF;
    END LOOP;
END;
$$;

-- The relay's rights on one outbox schema (created by saga.create_outbox).
CREATE FUNCTION saga.grant_relay(schema_name text) RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'saga_relay') THEN
        RETURN;
    END IF;
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO saga_relay', schema_name);
    EXECUTE format('GRANT SELECT, DELETE ON %I.outbox TO saga_relay', schema_name);
    EXECUTE format('GRANT SELECT, INSERT ON %I.outbox_dead_letters TO saga_relay', schema_name);
END;
$$;

-- create_outbox now also grants the relay what it needs on the new tables.
ALTER FUNCTION saga.create_outbox(text) RENAME TO create_outbox_tables;
CREATE FUNCTION saga.create_outbox(schema_name text) RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM saga.create_outbox_tables(schema_name);
    PERFORM saga.grant_relay(schema_name);
END;
$$;
COMMENT ON FUNCTION saga.create_outbox(text) IS
    'Creates <schema>.outbox (the relay''s input), <schema>.outbox_dead_letters and the NOTIFY trigger, and grants saga_relay its rights; idempotent';

CREATE FUNCTION saga.grant_roles() RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    s text;
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'saga_orchestrator') THEN
        GRANT USAGE ON SCHEMA saga TO saga_orchestrator;
        GRANT SELECT ON saga.schema_migrations TO saga_orchestrator;
        GRANT SELECT, INSERT ON saga.definitions TO saga_orchestrator;
        GRANT SELECT, UPDATE ON saga.instances TO saga_orchestrator;
        GRANT SELECT, INSERT, UPDATE ON saga.step_history, saga.inbox TO saga_orchestrator;
        GRANT SELECT, INSERT ON saga.dead_letters, saga.outbox TO saga_orchestrator;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'saga_client') THEN
        GRANT USAGE ON SCHEMA saga TO saga_client;
        GRANT SELECT ON saga.definitions TO saga_client;
        GRANT SELECT, INSERT, UPDATE ON saga.instances TO saga_client;
        GRANT INSERT ON saga.step_history TO saga_client;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'saga_operator') THEN
        GRANT USAGE ON SCHEMA saga TO saga_operator;
        GRANT SELECT ON ALL TABLES IN SCHEMA saga TO saga_operator;
    END IF;
    -- Every outbox made by create_outbox so far (saga.outbox included).
    FOR s IN SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE c.relname = 'outbox_dead_letters' AND c.relkind = 'r' LOOP
        PERFORM saga.grant_relay(s);
    END LOOP;
END;
$$;
COMMENT ON FUNCTION saga.grant_roles() IS
    'Grants the saga_* group roles their rights (run again after creating the roles by hand)';

SELECT saga.grant_roles();
