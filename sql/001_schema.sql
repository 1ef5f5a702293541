-- 001_schema: the saga schema: definitions, instances, history, inbox, dead letters, the
-- orchestrator's outbox, and the SQL API (register_definition, start, retry, abort,
-- create_outbox).
--
-- Applied by the migration runner (lib/migrate.c) inside one transaction; it must not
-- contain BEGIN/COMMIT. Never edit this file once released: add a new numbered file.
--
-- Errors raised by the API carry their own SQLSTATE (class "SG", not used by PostgreSQL),
-- so that callers can tell them apart without parsing messages:
--   SG001  saga.start: unknown saga (no registered definition of that name)
--   SG002  saga.start: input is not a JSON object
--   SG003  saga.start: input is missing required keys (all of them are named)
--   SG004  saga.start: malformed traceparent (W3C "00-<32 hex>-<16 hex>-<2 hex>")
--   SG010  saga.retry / saga.abort: no saga with that id
--   SG011  saga.retry / saga.abort: the saga's status does not allow the request
--   SG012  saga.abort: the saga has sent its pivot step and can no longer be compensated
--   SG020  saga.register_definition: the same (name, version) exists with other content
--   22023  saga.create_outbox / saga.register_definition: invalid argument (empty name...)

CREATE SCHEMA IF NOT EXISTS saga;
COMMENT ON SCHEMA saga IS 'Saga orchestrator state and SQL API (see the project README)';

-- pgcrypto is not needed: gen_random_uuid() and md5() are core since PostgreSQL 13.

------------------------------------------------------------------------------------------
-- Definitions
------------------------------------------------------------------------------------------
CREATE TABLE saga.definitions (
    name      text        NOT NULL CHECK (name <> ''),
    version   int         NOT NULL CHECK (version > 0),
    body      jsonb       NOT NULL,
    checksum  text        NOT NULL,
    loaded_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (name, version)
);
COMMENT ON TABLE saga.definitions IS
    'Saga definitions (sagas/NAME.json) as loaded by the orchestrator; (name, version) is immutable';
COMMENT ON COLUMN saga.definitions.body IS 'The definition document';
COMMENT ON COLUMN saga.definitions.checksum IS 'md5 of body::text (jsonb normalises the text)';
COMMENT ON COLUMN saga.definitions.loaded_at IS 'When this version was first registered';

CREATE FUNCTION saga.register_definition(name text, version int, body jsonb)
RETURNS text
LANGUAGE plpgsql
AS $$
DECLARE
    sum      text := md5(body::text);
    existing text;
BEGIN
    IF name IS NULL OR name = '' THEN
        RAISE EXCEPTION 'saga.register_definition: the saga name must not be empty'
            USING ERRCODE = '22023';
    END IF;
    IF version IS NULL OR version < 1 THEN
        RAISE EXCEPTION 'saga.register_definition: saga "%": version must be a positive integer', name
            USING ERRCODE = '22023';
    END IF;
    IF body IS NULL THEN
        RAISE EXCEPTION 'saga.register_definition: saga "%" version %: body must not be NULL', name, version
            USING ERRCODE = '22023';
    END IF;
    -- Insert first, compare after: two orchestrators registering at once cannot both miss
    -- each other's row (the second waits on the primary key, then sees the first's).
    INSERT INTO saga.definitions AS d (name, version, body, checksum)
    VALUES (register_definition.name, register_definition.version, register_definition.body, sum)
    ON CONFLICT ON CONSTRAINT definitions_pkey DO NOTHING;
    IF FOUND THEN
        RETURN 'registered';
    END IF;
    SELECT d.checksum INTO existing
      FROM saga.definitions d
     WHERE d.name = register_definition.name AND d.version = register_definition.version;
    IF existing = sum THEN
        RETURN 'unchanged';
    END IF;
    RAISE EXCEPTION 'saga definition "%" version % is already registered with different content; register a new version',
        name, version
        USING ERRCODE = 'SG020';
END;
$$;
COMMENT ON FUNCTION saga.register_definition(text, int, jsonb) IS
    'Registers a definition version: returns registered or unchanged; other content under an existing version is an error (SG020)';

------------------------------------------------------------------------------------------
-- Instances
------------------------------------------------------------------------------------------
CREATE TABLE saga.instances (
    id                 uuid        PRIMARY KEY,
    saga_name          text        NOT NULL,
    saga_version       int         NOT NULL,
    status             text        NOT NULL
        CHECK (status IN ('pending', 'running', 'compensating', 'completed', 'compensated', 'failed')),
    current_step       text,
    step_index         int         NOT NULL DEFAULT 0,
    phase              text        NOT NULL DEFAULT 'action'
        CHECK (phase IN ('action', 'compensation')),
    attempt            int         NOT NULL DEFAULT 0,
    budget_base        int         NOT NULL DEFAULT 0,
    wait               text        NOT NULL DEFAULT 'none'
        CHECK (wait IN ('none', 'reply', 'backoff')),
    waiting_message_id uuid,
    deadline           timestamptz,
    pivot_sent         boolean     NOT NULL DEFAULT false,
    input              jsonb       NOT NULL,
    replies            jsonb       NOT NULL DEFAULT '{}',
    correlation_id     text,
    idempotency_key    text,
    trace_id           text        NOT NULL CHECK (trace_id ~ '^[0-9a-f]{32}$'),
    error              text,
    pending_request    text        CHECK (pending_request IN ('retry', 'abort')),
    request_reason     text,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    completed_at       timestamptz,
    FOREIGN KEY (saga_name, saga_version) REFERENCES saga.definitions (name, version),
    CONSTRAINT instances_idempotency_key UNIQUE (saga_name, idempotency_key)
);
COMMENT ON TABLE saga.instances IS 'One row per saga: its status and the engine state the orchestrator persists';
COMMENT ON COLUMN saga.instances.id IS 'Saga id (header saga-id), from saga.start';
COMMENT ON COLUMN saga.instances.saga_name IS 'Definition name (saga.definitions.name)';
COMMENT ON COLUMN saga.instances.saga_version IS 'The definition version the saga started with (kept until it ends)';
COMMENT ON COLUMN saga.instances.status IS 'pending, running, compensating, completed, compensated or failed (waits for saga.retry)';
COMMENT ON COLUMN saga.instances.current_step IS 'Name of the step being run or compensated';
COMMENT ON COLUMN saga.instances.step_index IS 'Engine: index of the current step (action) or compensation cursor';
COMMENT ON COLUMN saga.instances.phase IS 'Engine: action or compensation';
COMMENT ON COLUMN saga.instances.attempt IS 'Engine: sends of (step, phase) so far';
COMMENT ON COLUMN saga.instances.budget_base IS 'Engine: attempt count when the retry budget was last reset (saga.retry)';
COMMENT ON COLUMN saga.instances.wait IS 'Engine: none, reply (waiting_message_id was sent) or backoff (a resend is due at deadline)';
COMMENT ON COLUMN saga.instances.waiting_message_id IS 'message-id of the command whose reply the saga waits for';
COMMENT ON COLUMN saga.instances.deadline IS 'When the reply times out or the backoff ends';
COMMENT ON COLUMN saga.instances.pivot_sent IS 'True once the pivot step''s command was sent: the saga can no longer be aborted';
COMMENT ON COLUMN saga.instances.input IS 'The saga input (a JSON object)';
COMMENT ON COLUMN saga.instances.replies IS 'Step name -> reply data of its succeeded action (for templates)';
COMMENT ON COLUMN saga.instances.correlation_id IS 'Caller''s correlation id (header correlation-id); NULL: the saga id';
COMMENT ON COLUMN saga.instances.idempotency_key IS 'Caller''s key: saga.start with the same (saga_name, key) returns this saga';
COMMENT ON COLUMN saga.instances.trace_id IS 'W3C trace-id (32 lowercase hex) of the traceparent headers';
COMMENT ON COLUMN saga.instances.error IS 'Why the saga compensates or failed';
COMMENT ON COLUMN saga.instances.pending_request IS 'Operator request not yet handled by the orchestrator: retry or abort';
COMMENT ON COLUMN saga.instances.request_reason IS 'The operator''s reason given to saga.abort';
COMMENT ON COLUMN saga.instances.completed_at IS 'When the saga reached completed or compensated';

-- What the orchestrator polls: pending sagas in creation order, due deadlines, operator
-- requests; and what operators list.
CREATE INDEX instances_pending_idx ON saga.instances (created_at) WHERE status = 'pending';
CREATE INDEX instances_deadline_idx ON saga.instances (deadline) WHERE deadline IS NOT NULL;
CREATE INDEX instances_request_idx ON saga.instances (updated_at) WHERE pending_request IS NOT NULL;
CREATE INDEX instances_status_idx ON saga.instances (status, updated_at);

------------------------------------------------------------------------------------------
-- Step history
------------------------------------------------------------------------------------------
CREATE TABLE saga.step_history (
    id         bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    saga_id    uuid        NOT NULL REFERENCES saga.instances (id),
    step       text        NOT NULL,
    phase      text        NOT NULL CHECK (phase IN ('action', 'compensation', 'operator')),
    attempt    int         NOT NULL,
    status     text        NOT NULL
        CHECK (status IN ('sent', 'succeeded', 'failed', 'timed_out', 'late',
                          'retry_requested', 'abort_requested')),
    message_id uuid        UNIQUE,
    sent_at    timestamptz NOT NULL DEFAULT now(),
    replied_at timestamptz,
    reply      jsonb
);
CREATE INDEX step_history_saga_idx ON saga.step_history (saga_id, id);
COMMENT ON TABLE saga.step_history IS 'One row per command attempt, plus one per operator request (phase operator)';
COMMENT ON COLUMN saga.step_history.step IS 'Step name; "-" for an operator request on a saga that has not started a step';
COMMENT ON COLUMN saga.step_history.phase IS 'action, compensation, or operator (saga.retry / saga.abort)';
COMMENT ON COLUMN saga.step_history.attempt IS 'Attempt number of (step, phase), from 1; 0 for operator rows';
COMMENT ON COLUMN saga.step_history.status IS 'sent, succeeded, failed, timed_out, late, retry_requested or abort_requested';
COMMENT ON COLUMN saga.step_history.message_id IS 'message-id of the command (NULL for operator rows)';
COMMENT ON COLUMN saga.step_history.reply IS 'Reply data; for abort_requested {"reason": ...}';

------------------------------------------------------------------------------------------
-- Inbox and dead letters of the replies consumer
------------------------------------------------------------------------------------------
CREATE TABLE saga.inbox (
    message_id  uuid        PRIMARY KEY,
    in_reply_to uuid,
    saga_id     uuid,
    disposition text        NOT NULL CHECK (disposition IN ('applied', 'stale', 'late', 'unknown')),
    topic       text,
    partition   int,
    "offset"    bigint,
    received_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE saga.inbox IS 'Replies already processed (by message-id), so that a redelivered reply changes nothing';
COMMENT ON COLUMN saga.inbox.disposition IS 'applied, stale (not the attempt waited for), late (saga moved on) or unknown (no such saga)';

CREATE TABLE saga.dead_letters (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    received_at timestamptz NOT NULL DEFAULT now(),
    topic       text,
    partition   int,
    "offset"    bigint,
    key         text,
    headers     jsonb,
    payload     text,
    error       text        NOT NULL
);
COMMENT ON TABLE saga.dead_letters IS 'Malformed replies, kept for inspection; the consumer skips them';
COMMENT ON COLUMN saga.dead_letters.error IS 'Why the reply was rejected';

------------------------------------------------------------------------------------------
-- Outbox tables (any schema) and their notification trigger
------------------------------------------------------------------------------------------
CREATE FUNCTION saga.outbox_notify()
RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    -- One notification per statement (and PostgreSQL folds identical ones per transaction):
    -- it only wakes the relay, which then reads the table.
    PERFORM pg_notify('saga_outbox', TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME);
    RETURN NULL;
END;
$$;
COMMENT ON FUNCTION saga.outbox_notify() IS
    'Trigger: NOTIFY saga_outbox with payload <schema>.<table> so that the relay wakes up';

CREATE FUNCTION saga.create_outbox(schema_name text)
RETURNS void
LANGUAGE plpgsql
-- Quiet the "already exists, skipping" notices of a second call.
SET client_min_messages = warning
AS $$
DECLARE
    tbl regclass;
BEGIN
    IF schema_name IS NULL OR btrim(schema_name) = '' THEN
        RAISE EXCEPTION 'saga.create_outbox: the schema name must not be empty'
            USING ERRCODE = '22023';
    END IF;
    IF octet_length(schema_name) > 63 THEN
        RAISE EXCEPTION 'saga.create_outbox: schema name "%" is longer than 63 bytes', schema_name
            USING ERRCODE = '22023';
    END IF;

    EXECUTE format('CREATE SCHEMA IF NOT EXISTS %I', schema_name);
    EXECUTE format($f$
        CREATE TABLE IF NOT EXISTS %I.outbox (
            id          uuid PRIMARY KEY,
            seq         bigint GENERATED ALWAYS AS IDENTITY,
            topic       text  NOT NULL,
            key         text,
            event_type  text  NOT NULL,
            payload     jsonb NOT NULL,
            headers     jsonb NOT NULL DEFAULT '{}',
            created_at  timestamptz NOT NULL DEFAULT now()
        )$f$, schema_name);
    EXECUTE format('CREATE UNIQUE INDEX IF NOT EXISTS outbox_seq_key ON %I.outbox (seq)', schema_name);
    EXECUTE format('COMMENT ON TABLE %I.outbox IS %L', schema_name,
        'Transactional outbox: rows are published to Kafka in seq order by outbox-relay, then deleted');

    EXECUTE format($f$
        CREATE TABLE IF NOT EXISTS %I.outbox_dead_letters (
            id          uuid PRIMARY KEY,
            seq         bigint,
            topic       text  NOT NULL,
            key         text,
            event_type  text  NOT NULL,
            payload     jsonb NOT NULL,
            headers     jsonb NOT NULL DEFAULT '{}',
            created_at  timestamptz NOT NULL DEFAULT now(),
            error       text  NOT NULL,
            failed_at   timestamptz NOT NULL DEFAULT now()
        )$f$, schema_name);
    EXECUTE format('COMMENT ON TABLE %I.outbox_dead_letters IS %L', schema_name,
        'Outbox rows that Kafka rejected for good, with the error');

    tbl := format('%I.outbox', schema_name)::regclass;
    IF NOT EXISTS (SELECT 1 FROM pg_trigger
                    WHERE tgrelid = tbl AND tgname = 'outbox_notify' AND NOT tgisinternal) THEN
        EXECUTE format('CREATE TRIGGER outbox_notify AFTER INSERT ON %I.outbox
                        FOR EACH STATEMENT EXECUTE FUNCTION saga.outbox_notify()', schema_name);
    END IF;
END;
$$;
COMMENT ON FUNCTION saga.create_outbox(text) IS
    'Creates <schema>.outbox (the relay''s input), <schema>.outbox_dead_letters and the NOTIFY trigger; idempotent';

SELECT saga.create_outbox('saga');

------------------------------------------------------------------------------------------
-- Starting sagas and operator requests
------------------------------------------------------------------------------------------
CREATE FUNCTION saga.start(saga_name text, input jsonb, idempotency_key text DEFAULT NULL,
                           correlation_id text DEFAULT NULL, traceparent text DEFAULT NULL)
RETURNS uuid
LANGUAGE plpgsql
AS $$
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
    -- rolls back (then this insert goes through).
    INSERT INTO saga.instances AS i
           (id, saga_name, saga_version, status, input, correlation_id, idempotency_key, trace_id)
    VALUES (gen_random_uuid(), start.saga_name, def_version, 'pending', start.input,
            start.correlation_id, start.idempotency_key, trace)
    ON CONFLICT ON CONSTRAINT instances_idempotency_key DO NOTHING
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
COMMENT ON FUNCTION saga.start(text, jsonb, text, text, text) IS
    'Starts a saga (latest definition version) in the caller''s transaction; the same idempotency key returns the same id. Errors SG001-SG004';

CREATE FUNCTION saga.retry(saga_id uuid)
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    inst saga.instances%ROWTYPE;
BEGIN
    SELECT * INTO inst FROM saga.instances WHERE id = saga_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown saga id %', saga_id USING ERRCODE = 'SG010';
    END IF;
    IF inst.status <> 'failed' THEN
        RAISE EXCEPTION 'saga % is %; only a failed saga can be retried', saga_id, inst.status
            USING ERRCODE = 'SG011';
    END IF;
    UPDATE saga.instances
       SET pending_request = 'retry', request_reason = NULL, updated_at = now()
     WHERE id = retry.saga_id;
    INSERT INTO saga.step_history (saga_id, step, phase, attempt, status)
    VALUES (retry.saga_id, coalesce(inst.current_step, '-'), 'operator', 0, 'retry_requested');
    PERFORM pg_notify('saga_wakeup', '');
END;
$$;
COMMENT ON FUNCTION saga.retry(uuid) IS
    'Asks the orchestrator to resume a failed saga (audited in step_history). Errors SG010, SG011';

CREATE FUNCTION saga.abort(saga_id uuid, reason text)
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    inst saga.instances%ROWTYPE;
BEGIN
    SELECT * INTO inst FROM saga.instances WHERE id = saga_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown saga id %', saga_id USING ERRCODE = 'SG010';
    END IF;
    IF inst.status NOT IN ('pending', 'running') THEN
        RAISE EXCEPTION 'saga % is %; only a pending or running saga can be aborted', saga_id, inst.status
            USING ERRCODE = 'SG011';
    END IF;
    IF inst.pivot_sent THEN
        RAISE EXCEPTION 'saga % has passed its pivot step and can no longer be compensated', saga_id
            USING ERRCODE = 'SG012';
    END IF;
    UPDATE saga.instances
       SET pending_request = 'abort', request_reason = reason, updated_at = now()
     WHERE id = abort.saga_id;
    INSERT INTO saga.step_history (saga_id, step, phase, attempt, status, reply)
    VALUES (abort.saga_id, coalesce(inst.current_step, '-'), 'operator', 0, 'abort_requested',
            jsonb_build_object('reason', reason));
    PERFORM pg_notify('saga_wakeup', '');
END;
$$;
COMMENT ON FUNCTION saga.abort(uuid, text) IS
    'Asks the orchestrator to compensate a pending or running saga before its pivot (audited in step_history). Errors SG010-SG012';
