-- The participant contract: what every example service runs around its own business
-- (<service>.execute): the reply outbox, the inbox (deduplication by idempotency-key and
-- tombstones), the test knobs, and handle_commands, the one call per batch of commands.
--
-- One text for every service: __SERVICE__ stands for the service's name (its SQL schema).
-- example-participant applies it (examples/embed-schemas.py puts it in the binary with the
-- name replaced) before the service's examples/<service>/schema.sql, at every start: every
-- statement is idempotent. For a service of your own, apply it with your schema's name, or
-- copy it with the name replaced (examples/README.md, "Copying it for a new service").
CREATE SCHEMA IF NOT EXISTS __SERVICE__;

-- The reply outbox: the relay publishes its rows (topic = the command's reply-to).
SELECT saga.create_outbox('__SERVICE__');

-- One row per idempotency-key handled: a command seen again is answered again with the
-- recorded outcome and data, and changes nothing twice. A tombstone is the row of an action
-- whose compensation arrived first: the late action is then refused without effect.
CREATE TABLE IF NOT EXISTS __SERVICE__.inbox (
    idempotency_key text        PRIMARY KEY,
    message_id      text,                      -- the first command's message-id (NULL: tombstone)
    saga_id         text        NOT NULL,
    step            text,
    phase           text,
    event_type      text        NOT NULL,
    outcome         text        NOT NULL CHECK (outcome IN ('success', 'failure')),
    reply           jsonb       NOT NULL,
    tombstone       boolean     NOT NULL DEFAULT false,
    replies         int         NOT NULL DEFAULT 1, -- how many replies were sent for this key
    received_at     timestamptz NOT NULL DEFAULT now(),
    last_reply_at   timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE __SERVICE__.inbox IS
    'Commands handled, by idempotency-key, with the outcome and reply data sent (dedup)';

-- Test and demo knobs (one row). They apply to the next commands whatever they are (or only
-- to command_type when set), before the inbox is looked at:
--   delay_ms   sleep that long before handling each command (a slow participant);
--   drop_next  handle nothing and send no reply, N times (the orchestrator times out); the
--              command is not recorded, so its retry is handled normally;
--   fail_next  reply failure N times without recording it (a transient failure: the retry
--              with the same idempotency-key is handled normally).
CREATE TABLE IF NOT EXISTS __SERVICE__.behavior (
    id           boolean PRIMARY KEY DEFAULT true CHECK (id),
    delay_ms     int     NOT NULL DEFAULT 0 CHECK (delay_ms >= 0),
    drop_next    int     NOT NULL DEFAULT 0 CHECK (drop_next >= 0),
    fail_next    int     NOT NULL DEFAULT 0 CHECK (fail_next >= 0),
    command_type text    -- NULL: the knobs apply to every command type
);
INSERT INTO __SERVICE__.behavior (id) VALUES (true) ON CONFLICT DO NOTHING;

-- payload->>key as non-empty text, or a data_exception (the command is then answered with
-- a recorded failure "invalid command").
CREATE OR REPLACE FUNCTION __SERVICE__.required_text(payload jsonb, key text)
RETURNS text
LANGUAGE plpgsql IMMUTABLE
AS $$
BEGIN
    IF jsonb_typeof(payload -> key) IS DISTINCT FROM 'string' OR payload ->> key = '' THEN
        RAISE EXCEPTION 'payload.% must be a non-empty string', key USING ERRCODE = '22023';
    END IF;
    RETURN payload ->> key;
END;
$$;

-- A batch's replies as outbox rows, in one INSERT in command order (seq is the publish
-- order): one statement and one NOTIFY per batch rather than per command. Reply i answers the
-- command whose headers are heads[i]: topic = reply-to, key = saga id, a new message-id (the
-- row id), in-reply-to = the command's message-id.
-- The headers object is made by jsonb_object from two text arrays, not jsonb_build_object:
-- a variadic "any" function looks up the type of each of its ten arguments in the catalog
-- cache at every call (handle_commands took 4.7% more instructions a command with it:
-- bench/participant-batch --instructions).
CREATE OR REPLACE FUNCTION __SERVICE__.send_replies(heads jsonb[], outcomes text[], replies jsonb[])
RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    INSERT INTO __SERVICE__.outbox (id, topic, key, event_type, payload, headers)
    SELECT gen_random_uuid(), r.h ->> 'reply-to', r.h ->> 'saga-id',
           (r.h ->> 'event-type') || '.Reply', r.reply,
           jsonb_strip_nulls(jsonb_object(
               '{in-reply-to,saga-id,outcome,correlation-id,traceparent}'::text[],
               ARRAY[r.h ->> 'message-id', r.h ->> 'saga-id', r.outcome,
                     r.h ->> 'correlation-id', r.h ->> 'traceparent']))
      FROM unnest(heads, outcomes, replies) WITH ORDINALITY AS r(h, outcome, reply, n)
     ORDER BY r.n;
END;
$$;

-- New commands' inbox rows, in one INSERT (see handle_batch: when they are written).
CREATE OR REPLACE FUNCTION __SERVICE__.record_commands(keys text[], heads jsonb[], phases text[],
                                                       outcomes text[], replies jsonb[])
RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    INSERT INTO __SERVICE__.inbox (idempotency_key, message_id, saga_id, step, phase,
                                   event_type, outcome, reply)
    SELECT r.k, r.h ->> 'message-id', r.h ->> 'saga-id', r.h ->> 'saga-step', r.phase,
           r.h ->> 'event-type', r.outcome, r.reply
      FROM unnest(keys, heads, phases, outcomes, replies) AS r(k, h, phase, outcome, reply);
END;
$$;

-- Before 2026-11-26 each reply was built by a call of this function: gone with the calls.
DROP FUNCTION IF EXISTS __SERVICE__.reply_row(jsonb, text, jsonb);

-- A new command (not a replay): the change it asks for, or, for a compensation, the undoing
-- of its action (__SERVICE__.execute), or nothing and a tombstone when the action never happened.
-- Raises a data_exception for a command that can never succeed.
CREATE OR REPLACE FUNCTION __SERVICE__.handle_new_command(cmd jsonb, ikey text, phase text,
                                                          OUT outcome text, OUT reply jsonb)
LANGUAGE plpgsql
AS $$
DECLARE
    h          jsonb := cmd -> 'headers';
    action_key text;
    action     __SERVICE__.inbox;
    res        record;
BEGIN
    IF phase = 'compensation' THEN
        -- The action this compensates: "<saga-id>/<step>/action".
        IF ikey LIKE '%/compensation' THEN
            action_key := left(ikey, -length('/compensation')) || '/action';
        ELSE
            action_key := (h ->> 'saga-id') || '/' || coalesce(h ->> 'saga-step', '') || '/action';
        END IF;
        SELECT * INTO action FROM __SERVICE__.inbox WHERE idempotency_key = action_key FOR UPDATE;
        IF NOT FOUND THEN
            -- Never happened (lost, dropped, or still on its way): nothing to undo, and
            -- a tombstone so that the action, should it arrive later, does nothing.
            INSERT INTO __SERVICE__.inbox (idempotency_key, saga_id, step, phase, event_type,
                                           outcome, reply, tombstone, replies)
            VALUES (action_key, h ->> 'saga-id', h ->> 'saga-step', 'action',
                    'tombstone', 'failure',
                    jsonb_build_object('reason', 'compensated before the action arrived'),
                    true, 0);
            outcome := 'success';
            reply := '{"compensated": false, "reason": "the action never happened"}';
        ELSIF action.outcome = 'failure' THEN
            outcome := 'success';
            reply := '{"compensated": false, "reason": "the action had failed"}';
        ELSE
            res := __SERVICE__.execute(cmd, action.reply);
            outcome := res.outcome;
            reply := res.reply;
        END IF;
    ELSE
        res := __SERVICE__.execute(cmd, NULL);
        outcome := res.outcome;
        reply := res.reply;
    END IF;
END;
$$;

-- Handles a batch of commands in the caller's transaction (the participant calls it once per
-- batch, autocommit: everything below commits or rolls back together). cmds is a JSON array
-- of {"message_id": ..., "headers": {...}, "payload": {...}}. Per command: the knobs, the
-- inbox (replay), the business change (__SERVICE__.handle_new_command); the inbox rows and the
-- replies are written per batch (see handle_batch).
-- Returns counts: {"handled", "replayed", "failed", "dropped", "skipped"}.
--
-- A command that can never succeed is answered with a recorded failure, and its partial changes
-- are undone, which takes a subtransaction around it. One per command would cost every batch as
-- many subtransactions as commands: past 64 in one transaction PostgreSQL's snapshots overflow
-- their cache of subtransaction ids, and every session of the server (the orchestrator's too)
-- then reads pg_subtrans to tell whether a row is visible (saga-bench: a quarter more CPU per
-- saga, all databases). So the batch first runs with one subtransaction for the whole of it;
-- only when a command in it raises is it run again with one per command. The knobs' delay is
-- then slept twice.
CREATE OR REPLACE FUNCTION __SERVICE__.handle_commands(cmds jsonb)
RETURNS jsonb
LANGUAGE plpgsql
AS $$
BEGIN
    RETURN __SERVICE__.handle_batch(cmds, false);
EXCEPTION WHEN data_exception OR not_null_violation OR check_violation THEN
    RETURN __SERVICE__.handle_batch(cmds, true);
END;
$$;
COMMENT ON FUNCTION __SERVICE__.handle_commands(jsonb) IS
    'Handles a batch of commands in one transaction: knobs, inbox dedup, business change, reply';

-- handle_commands' loop. isolate: each new command in its own subtransaction, so that one
-- that raises is recorded as a failure without its partial changes; without, the first one
-- that raises aborts the call.
--
-- Per command it runs only what that command needs; what every command needs is done once
-- for the batch (a statement costs PostgreSQL its executor set-up and its table's CHECKs
-- whatever its rows; with a lookup, an inbox insert and a reply_row call per command, payment
-- took 127 µs a command, now 108: bench/participant-batch's new sessions of 2026-11-26):
--   - the inbox lookup: one query finds the batch's keys that need one (already in the
--     inbox, or twice in the batch); the other commands are new, unless the batch writes an
--     inbox row itself (a compensation's tombstone), so from the first new compensation on
--     every command is looked up;
--   - the inbox rows of new commands are written together (record_commands) at the end, and
--     before any lookup of the inbox: before a looked-up command and before a compensation
--     (it reads its action's row), so that every lookup sees the commands before it;
--   - the replies, together at the end (send_replies).
-- A concurrent replica that commits one of the batch's keys after the batch's lookup makes
-- this batch's insert fail (unique violation, or a deadlock): the batch is rolled back and
-- retried whole, and then finds the key. Nothing is applied twice. (With a lookup per command,
-- a key committed by the other replica before this batch reached it was replayed instead; the
-- window is now the whole batch, so overlapping replicas, during a rebalance, abort more.)
CREATE OR REPLACE FUNCTION __SERVICE__.handle_batch(cmds jsonb, isolate boolean)
RETURNS jsonb
LANGUAGE plpgsql
AS $$
DECLARE
    cmd        jsonb;
    h          jsonb;
    ikey       text;
    etype      text;
    phase      text;
    knobs      __SERVICE__.behavior;
    knobs_set  boolean;         -- one of them is set: look at them for each command
    seen       __SERVICE__.inbox;
    res        record;
    outcome    text;
    reply      jsonb;
    lookup     text[];          -- keys that need an inbox lookup (see above)
    careful    boolean := false; -- every command looked up (after a compensation)
    -- New commands' inbox rows not written yet.
    n_keys     text[] := '{}';
    n_heads    jsonb[] := '{}';
    n_phases   text[] := '{}';
    n_outcomes text[] := '{}';
    n_replies  jsonb[] := '{}';
    -- The batch's replies, in command order.
    o_heads    jsonb[] := '{}';
    o_outcomes text[] := '{}';
    o_replies  jsonb[] := '{}';
    handled    int := 0;
    replayed   int := 0;
    failed     int := 0;
    dropped    int := 0;
    skipped    int := 0;
BEGIN
    IF jsonb_typeof(cmds) IS DISTINCT FROM 'array' THEN
        RAISE EXCEPTION '__SERVICE__.handle_commands: expects a JSON array of commands'
            USING ERRCODE = '22023';
    END IF;
    -- The knobs, read once per batch (a change applies from the next batch); the counters are
    -- decremented with a condition below, so that they never go below 0.
    SELECT * INTO knobs FROM __SERVICE__.behavior WHERE id;
    knobs_set := knobs.delay_ms > 0 OR knobs.drop_next > 0 OR knobs.fail_next > 0;
    -- OFFSET 0 keeps the EXISTS a probe of the inbox's key per key: without it, PostgreSQL may
    -- plan it as a hash of the whole inbox, read at every batch (chosen up to ~40,000 rows, as
    -- the batch is estimated at 100 keys, and kept while the session's cached plan lasts).
    SELECT coalesce(array_agg(k), '{}') INTO lookup
      FROM (SELECT c.k FROM (SELECT value -> 'headers' ->> 'idempotency-key' AS k
                               FROM jsonb_array_elements(cmds)) AS c
             WHERE c.k IS NOT NULL
             GROUP BY c.k
            HAVING count(*) > 1 OR EXISTS (SELECT 1 FROM __SERVICE__.inbox i
                                            WHERE i.idempotency_key = c.k OFFSET 0)) AS s;
    FOR cmd IN SELECT value FROM jsonb_array_elements(cmds) LOOP
        h := cmd -> 'headers';
        ikey := h ->> 'idempotency-key';
        etype := h ->> 'event-type';
        -- Without these there is nobody to answer or nothing to dedupe by: skip (the consumer
        -- checks them too, and logs what it skips).
        IF jsonb_typeof(h) IS DISTINCT FROM 'object' OR ikey = '' OR etype = ''
           OR coalesce(h ->> 'message-id', '') = '' OR coalesce(h ->> 'reply-to', '') = ''
           OR coalesce(h ->> 'saga-id', '') = '' OR ikey IS NULL OR etype IS NULL THEN
            skipped := skipped + 1;
            CONTINUE;
        END IF;
        IF jsonb_typeof(cmd -> 'payload') IS DISTINCT FROM 'object' THEN
            cmd := jsonb_set(cmd, '{payload}', '{}');
        END IF;
        phase := coalesce(h ->> 'saga-phase', 'action');

        -- Knobs first, as if the command were slow, lost, or failed on its way in.
        IF knobs_set AND (knobs.command_type IS NULL OR knobs.command_type = etype) THEN
            IF knobs.delay_ms > 0 THEN
                PERFORM pg_sleep(knobs.delay_ms / 1000.0);
            END IF;
            -- Decrement with a condition: two batches running at once never go below 0.
            IF knobs.drop_next > 0 THEN
                UPDATE __SERVICE__.behavior SET drop_next = drop_next - 1
                 WHERE id AND drop_next > 0;
                IF FOUND THEN
                    dropped := dropped + 1;
                    CONTINUE;
                END IF;
            END IF;
            IF knobs.fail_next > 0 THEN
                UPDATE __SERVICE__.behavior SET fail_next = fail_next - 1
                 WHERE id AND fail_next > 0;
                IF FOUND THEN
                    o_heads := o_heads || h;
                    o_outcomes := o_outcomes || 'failure'::text;
                    o_replies := o_replies || '{"reason": "injected failure"}'::jsonb;
                    failed := failed + 1;
                    CONTINUE;
                END IF;
            END IF;
        END IF;

        -- The inbox rows not written yet go in before anything reads the inbox.
        IF (careful OR phase = 'compensation' OR ikey = ANY (lookup))
           AND cardinality(n_keys) > 0 THEN
            PERFORM __SERVICE__.record_commands(n_keys, n_heads, n_phases, n_outcomes, n_replies);
            n_keys := '{}'; n_heads := '{}'; n_phases := '{}'; n_outcomes := '{}'; n_replies := '{}';
        END IF;
        -- Seen before (a redelivery, or the orchestrator's retry): answer again, change nothing.
        -- The reply goes to the latest attempt: in-reply-to is this command's message-id.
        IF careful OR ikey = ANY (lookup) THEN
            SELECT * INTO seen FROM __SERVICE__.inbox WHERE idempotency_key = ikey FOR UPDATE;
            IF FOUND THEN
                UPDATE __SERVICE__.inbox SET replies = replies + 1, last_reply_at = now()
                 WHERE idempotency_key = ikey;
                o_heads := o_heads || h;
                o_outcomes := o_outcomes || seen.outcome;
                o_replies := o_replies || seen.reply;
                replayed := replayed + 1;
                CONTINUE;
            END IF;
        END IF;
        IF phase = 'compensation' THEN
            careful := true; -- it may write its action's tombstone: look up every key from now on
        END IF;

        IF isolate THEN
            BEGIN
                res := __SERVICE__.handle_new_command(cmd, ikey, phase);
                outcome := res.outcome;
                reply := res.reply;
            EXCEPTION WHEN data_exception OR not_null_violation OR check_violation THEN
                -- A command that can never succeed (missing field, wrong type): a recorded
                -- failure, so that its retries get the same answer. Its partial changes are
                -- rolled back with this block.
                outcome := 'failure';
                reply := jsonb_build_object('reason', 'invalid command', 'detail', SQLERRM);
            END;
        ELSIF phase = 'compensation' THEN
            res := __SERVICE__.handle_new_command(cmd, ikey, phase);
            outcome := res.outcome;
            reply := res.reply;
        ELSE
            -- An action: handle_new_command's action path without its call (a PL/pgSQL call
            -- with a composite result is ~5% of a payment command's instructions).
            res := __SERVICE__.execute(cmd, NULL);
            outcome := res.outcome;
            reply := res.reply;
        END IF;

        n_keys := n_keys || ikey;
        n_heads := n_heads || h;
        n_phases := n_phases || phase;
        n_outcomes := n_outcomes || outcome;
        n_replies := n_replies || reply;
        o_heads := o_heads || h;
        o_outcomes := o_outcomes || outcome;
        o_replies := o_replies || reply;
        handled := handled + 1;
        IF outcome = 'failure' THEN
            failed := failed + 1;
        END IF;
    END LOOP;
    IF cardinality(n_keys) > 0 THEN
        PERFORM __SERVICE__.record_commands(n_keys, n_heads, n_phases, n_outcomes, n_replies);
    END IF;
    -- None when there is nothing to send (the NOTIFY trigger fires per statement, even for no
    -- rows).
    IF cardinality(o_heads) > 0 THEN
        PERFORM __SERVICE__.send_replies(o_heads, o_outcomes, o_replies);
    END IF;
    RETURN jsonb_build_object('handled', handled, 'replayed', replayed, 'failed', failed,
                              'dropped', dropped, 'skipped', skipped);
END;
$$;
COMMENT ON FUNCTION __SERVICE__.handle_batch(jsonb, boolean) IS
    'handle_commands'' loop; isolate: each new command in its own subtransaction';
