-- 010_client_through_functions: saga_client acts on sagas only through saga.start, saga.retry
-- and saga.abort.
--
-- The three functions ran with their caller's rights, so saga_client needed INSERT and UPDATE
-- on saga.instances and INSERT on saga.step_history: a service could set a saga's status
-- itself, or (since 009 dropped the foreign key) write history for a saga that does not exist.
-- They now run with their owner's rights (SECURITY DEFINER, with a search_path that only
-- pg_catalog can satisfy: every object of theirs is named with its schema), and saga_client
-- keeps only SELECT on saga.definitions and saga.instances, and EXECUTE on the three.
--
-- EXECUTE is no longer granted to PUBLIC: a definer function would otherwise let any role
-- that can see schema saga (saga_operator, saga_relay) start, retry or abort sagas. A
-- deployment that calls them under roles of its own grants those roles EXECUTE (or makes them
-- members of saga_client); the owner keeps it. saga_orchestrator keeps what its table rights
-- gave it before: saga.retry and saga.abort (sagactl retry/abort run with its URL).
--
-- A later migration that re-creates one of the three (CREATE OR REPLACE FUNCTION) makes it
-- SECURITY INVOKER again without a search_path: it must repeat the ALTER FUNCTION below.

ALTER FUNCTION saga.start(text, jsonb, text, text, text)
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION saga.retry(uuid) SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION saga.abort(uuid, text) SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
REVOKE EXECUTE ON FUNCTION saga.start(text, jsonb, text, text, text), saga.retry(uuid),
    saga.abort(uuid, text) FROM PUBLIC;

CREATE OR REPLACE FUNCTION saga.grant_roles() RETURNS void
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
        GRANT EXECUTE ON FUNCTION saga.retry(uuid), saga.abort(uuid, text) TO saga_orchestrator;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'saga_client') THEN
        GRANT USAGE ON SCHEMA saga TO saga_client;
        GRANT SELECT ON saga.definitions, saga.instances TO saga_client;
        REVOKE INSERT, UPDATE ON saga.instances FROM saga_client;
        REVOKE INSERT ON saga.step_history FROM saga_client;
        GRANT EXECUTE ON FUNCTION saga.start(text, jsonb, text, text, text), saga.retry(uuid),
            saga.abort(uuid, text) TO saga_client;
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
