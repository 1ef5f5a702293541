-- 006_instances_idempotency_partial: the idempotency key's unique index only over the sagas
-- started with a key.
--
-- The unique constraint on (saga_name, idempotency_key) indexed every saga, keyless ones
-- included (NULL keys never conflict). That cost an index entry at every update of
-- saga.instances (each step's update is a non-HOT update: its deadline and updated_at are
-- indexed), and it misled the orchestrator's claim: on a table without statistics yet (a new
-- database, or one that grew since autovacuum last analyzed it) the planner estimates
-- "saga_name = <name>" as 0.5% of the rows against a third for "deadline <= now()", so the
-- claim's due-deadline and operator-request branches scanned this index over every saga of
-- the name (finished ones included) and filtered: measured 3-11 ms per claim with 3,000
-- sagas, growing with the table. A partial index is of no use to those branches (they do not
-- say idempotency_key IS NOT NULL), so they take their own partial indexes, which stop at the
-- first row not yet due.
--
-- saga.start is replaced only for its ON CONFLICT clause (ON CONSTRAINT named the
-- constraint; a partial unique index is inferred from its columns and predicate instead,
-- which are also the names of two parameters: #variable_conflict use_column reads them as
-- the columns; everywhere else the function qualifies its parameters as start.<name>).
--
-- Every statement on saga.instances, reads included, waits until this migration commits
-- (DROP CONSTRAINT takes the table's ACCESS EXCLUSIVE lock, then the index is built under
-- it: seconds for millions of sagas), and the migration itself waits for any transaction
-- that already uses the table. The orchestrators apply migrations at start-up, under their
-- lock. (Building the index first and dropping the constraint after would upgrade a SHARE
-- lock to ACCESS EXCLUSIVE, which can deadlock with a claim.)

ALTER TABLE saga.instances DROP CONSTRAINT instances_idempotency_key;
CREATE UNIQUE INDEX instances_idempotency_key ON saga.instances (saga_name, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

CREATE OR REPLACE FUNCTION saga.start(saga_name text, input jsonb, idempotency_key text DEFAULT NULL,
                           correlation_id text DEFAULT NULL, traceparent text DEFAULT NULL)
RETURNS uuid
LANGUAGE plpgsql
AS $$
#variable_conflict use_column
DECLARE
    def_version int;
    def_body    jsonb;
    missing     text[];
    trace       text;
    new_id      uuid;
BEGIN
    SELECT d.version, d.body INTO def_version, def_body
      FROM saga.definitions d
     WHERE d.name = start.saga_name
     ORDER BY d.version DESC
     LIMIT 1;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown saga "%"', saga_name
            USING ERRCODE = 'SG001',
                  HINT = 'The orchestrator registers the definitions of its sagas/ folder when it starts.';
    END IF;

    IF input IS NULL OR jsonb_typeof(input) <> 'object' THEN
        RAISE EXCEPTION 'saga "%": input must be a JSON object, not %', saga_name,
            coalesce(jsonb_typeof(input), 'NULL')
            USING ERRCODE = 'SG002';
    END IF;

    IF jsonb_typeof(def_body #> '{input,required}') = 'array' THEN
        SELECT array_agg(k ORDER BY ord) INTO missing
          FROM jsonb_array_elements_text(def_body #> '{input,required}') WITH ORDINALITY AS r(k, ord)
         WHERE NOT (start.input ? k);
        IF missing IS NOT NULL THEN
            IF cardinality(missing) = 1 THEN
                RAISE EXCEPTION 'saga "%": input is missing required key "%"', saga_name, missing[1]
                    USING ERRCODE = 'SG003';
            END IF;
            RAISE EXCEPTION 'saga "%": input is missing required keys %', saga_name,
                '"' || array_to_string(missing, '", "') || '"'
                USING ERRCODE = 'SG003';
        END IF;
    END IF;

    IF traceparent IS NOT NULL THEN
        -- W3C trace-context version 00; all-zero trace and parent ids are invalid.
        IF traceparent !~ '^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$'
           OR substr(traceparent, 4, 32) = repeat('0', 32)
           OR substr(traceparent, 37, 16) = repeat('0', 16) THEN
            RAISE EXCEPTION 'saga "%": malformed traceparent "%"', saga_name, traceparent
                USING ERRCODE = 'SG004',
                      HINT = 'Expected the W3C form 00-<32 hex trace-id>-<16 hex parent-id>-<2 hex flags>, lowercase.';
        END IF;
        trace := substr(traceparent, 4, 32);
    ELSE
        trace := replace(gen_random_uuid()::text, '-', '');
    END IF;

    -- Same (saga_name, idempotency_key): the first caller's saga. A concurrent caller waits on
    -- the unique index until the first commits (then DO NOTHING and the SELECT sees it) or
    -- rolls back (then this insert goes through). Without a key there is nothing to match (the
    -- index holds only the sagas started with one).
    INSERT INTO saga.instances AS i
           (id, saga_name, saga_version, status, input, correlation_id, idempotency_key, trace_id)
    VALUES (gen_random_uuid(), start.saga_name, def_version, 'pending', start.input,
            start.correlation_id, start.idempotency_key, trace)
    ON CONFLICT (saga_name, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING i.id INTO new_id;
    IF new_id IS NULL THEN
        SELECT i.id INTO STRICT new_id
          FROM saga.instances i
         WHERE i.saga_name = start.saga_name AND i.idempotency_key = start.idempotency_key;
        RETURN new_id;
    END IF;

    PERFORM pg_notify('saga_wakeup', '');
    RETURN new_id;
END;
$$;
