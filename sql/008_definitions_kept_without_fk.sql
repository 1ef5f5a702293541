-- 008_definitions_kept_without_fk: a registered definition version cannot be deleted or
-- renamed (a trigger), instead of the foreign key from saga.instances to saga.definitions.
--
-- The foreign key made every saga.start check its definition's row with a KEY SHARE lock on
-- it: every start of a saga shares that one row, so concurrent callers turned its lock into a
-- MultiXact, extended at each start (bench/start-bench, 8 sessions on 2 cores: ~170 MultiXact
-- pages written in 8 s with the key, none without; the starts per second within a few percent
-- here, but MultiXact member space is finite and its consumption forces anti-wraparound
-- vacuums, and contention on it grows with cores). saga.start reads the definition before it
-- inserts (SG001 otherwise),
-- and the orchestrator never deletes one, so the key only guarded against an owner's DELETE or
-- UPDATE of a definition that sagas use: the trigger refuses those for every definition
-- (versions are immutable: register_definition already refuses changed content).

ALTER TABLE saga.instances DROP CONSTRAINT IF EXISTS instances_saga_name_saga_version_fkey;

CREATE FUNCTION saga.definitions_are_kept() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    RAISE EXCEPTION 'saga.definitions: a registered definition version is never deleted or '
                    'renamed (% of %)',
        TG_OP, CASE WHEN TG_LEVEL = 'ROW' THEN OLD.name || ' v' || OLD.version ELSE 'the table' END
        USING ERRCODE = 'SG021',
              HINT = 'Sagas keep the version they started with; register a new version instead.';
END;
$$;
COMMENT ON FUNCTION saga.definitions_are_kept() IS
    'Trigger: refuses DELETE, TRUNCATE and a change of (name, version) on saga.definitions';

CREATE TRIGGER definitions_kept
    BEFORE DELETE OR UPDATE OF name, version ON saga.definitions
    FOR EACH ROW EXECUTE FUNCTION saga.definitions_are_kept();
CREATE TRIGGER definitions_kept_truncate
    BEFORE TRUNCATE ON saga.definitions
    FOR EACH STATEMENT EXECUTE FUNCTION saga.definitions_are_kept();
