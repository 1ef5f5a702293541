-- 009_step_history_without_fk: saga.step_history's rows belong to their saga without a foreign
-- key; deleting a saga (or truncating saga.instances) deletes its history (triggers).
--
-- The key made every history insert look its saga up (a trigger per row running a query): 4
-- inserts a saga, each 11-18 µs dearer with the key than without (bench/step-history-insert:
-- 10,000 inserts in batches of 250, 35.7-43.0 µs a row against 24.5-28.3). The project's
-- writers of the table write rows of a saga they hold locked: saga.apply_batch (the
-- orchestrator locks its batch's sagas first), saga.retry and saga.abort (SELECT ... FOR
-- UPDATE, SG010 when there is none). A DELETE of the saga waits for that lock, and its trigger
-- then deletes the history written meanwhile. What the key also refused and nothing does now:
-- a role with INSERT on the table (saga_orchestrator, saga_client) inserting a row for a saga
-- that does not exist.
--
-- Before, deleting a saga with history was refused (the key); now its history goes with it,
-- operator rows included, as a retention job expects. The trigger runs with the rights of the
-- one who deletes: deleting sagas takes DELETE (TRUNCATE: TRUNCATE) on saga.step_history too.
--
-- Locks: both tables in ACCESS EXCLUSIVE mode, taken first and in the writers' order
-- (saga.instances, then saga.step_history). Dropping the constraint alone would lock
-- step_history, then instances, against an orchestrator holding a saga's row and inserting its
-- history: a deadlock, and the migration (run at the orchestrator's start) failing.

LOCK TABLE saga.instances, saga.step_history IN ACCESS EXCLUSIVE MODE;

-- The key's name is 001's default: should it ever differ, the migration fails instead of
-- keeping it.
ALTER TABLE saga.step_history DROP CONSTRAINT step_history_saga_id_fkey;

CREATE FUNCTION saga.instances_history_deleted() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        DELETE FROM saga.step_history h USING gone g WHERE h.saga_id = g.id;
    ELSE
        BEGIN
            TRUNCATE saga.step_history;
        EXCEPTION WHEN object_in_use THEN
            -- The same TRUNCATE names step_history too (TRUNCATE saga.instances,
            -- saga.step_history), or this transaction has it open: delete instead.
            DELETE FROM saga.step_history;
        END;
    END IF;
    RETURN NULL;
END;
$$;
COMMENT ON FUNCTION saga.instances_history_deleted() IS
    'Trigger: sagas deleted from saga.instances (or all of them, TRUNCATE) take their saga.step_history rows with them';

-- One statement per DELETE, over the deleted sagas at once (a retention job deletes many).
CREATE TRIGGER instances_history_deleted
    AFTER DELETE ON saga.instances
    REFERENCING OLD TABLE AS gone
    FOR EACH STATEMENT EXECUTE FUNCTION saga.instances_history_deleted();
CREATE TRIGGER instances_history_truncated
    AFTER TRUNCATE ON saga.instances
    FOR EACH STATEMENT EXECUTE FUNCTION saga.instances_history_deleted();
