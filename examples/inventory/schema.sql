-- inventory: the example participant that reserves stock (ReserveStock / ReleaseStock).
--
-- Applied by example-participant at every start (idempotent; it needs the saga schema for
-- saga.create_outbox, which the participant installs first). The first part is the
-- participant contract, the same in every example; the business part is inventory.execute.
CREATE SCHEMA IF NOT EXISTS inventory;

CREATE TABLE IF NOT EXISTS inventory.stock (
    sku       text PRIMARY KEY,
    available int  NOT NULL CHECK (available >= 0)
);

CREATE TABLE IF NOT EXISTS inventory.reservations (
    id          uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    saga_id     text        NOT NULL,
    order_id    text        NOT NULL,
    items       jsonb       NOT NULL, -- [{"sku": ..., "qty": n}], one entry per sku
    status      text        NOT NULL CHECK (status IN ('reserved', 'released')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    released_at timestamptz
);

------------------------------------------------------------------------------------------
-- The participant contract (the same in every example service; copy it as it is)
------------------------------------------------------------------------------------------
-- The reply outbox: the relay publishes its rows (topic = the command's reply-to).
SELECT saga.create_outbox('inventory');

-- One row per idempotency-key handled: a command seen again is answered again with the
-- recorded outcome and data, and changes nothing twice. A tombstone is the row of an action
-- whose compensation arrived first: the late action is then refused without effect.
CREATE TABLE IF NOT EXISTS inventory.inbox (
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
COMMENT ON TABLE inventory.inbox IS
    'Commands handled, by idempotency-key, with the outcome and reply data sent (dedup)';

-- Test and demo knobs (one row). They apply to the next commands whatever they are (or only
-- to command_type when set), before the inbox is looked at:
--   delay_ms   sleep that long before handling each command (a slow participant);
--   drop_next  handle nothing and send no reply, N times (the orchestrator times out); the
--              command is not recorded, so its retry is handled normally;
--   fail_next  reply failure N times without recording it (a transient failure: the retry
--              with the same idempotency-key is handled normally).
CREATE TABLE IF NOT EXISTS inventory.behavior (
    id           boolean PRIMARY KEY DEFAULT true CHECK (id),
    delay_ms     int     NOT NULL DEFAULT 0 CHECK (delay_ms >= 0),
    drop_next    int     NOT NULL DEFAULT 0 CHECK (drop_next >= 0),
    fail_next    int     NOT NULL DEFAULT 0 CHECK (fail_next >= 0),
    command_type text    -- NULL: the knobs apply to every command type
);
INSERT INTO inventory.behavior (id) VALUES (true) ON CONFLICT DO NOTHING;

-- payload->>key as non-empty text, or a data_exception (the command is then answered with
-- a recorded failure "invalid command").
CREATE OR REPLACE FUNCTION inventory.required_text(payload jsonb, key text)
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

-- The reply to cmd as an outbox row (handle_commands inserts a batch's replies together):
-- topic = reply-to, key = saga id, a new message-id (the row id), in-reply-to = the command's
-- message-id. PL/pgSQL rather than SQL: its statement is planned once per session, where a
-- SQL function's would be parsed and planned again at every call.
CREATE OR REPLACE FUNCTION inventory.reply_row(cmd jsonb, outcome text, reply jsonb)
RETURNS inventory.outbox
LANGUAGE plpgsql
AS $$
DECLARE
    r inventory.outbox;
BEGIN
    r.id := gen_random_uuid();
    r.topic := cmd -> 'headers' ->> 'reply-to';
    r.key := cmd -> 'headers' ->> 'saga-id';
    r.event_type := (cmd -> 'headers' ->> 'event-type') || '.Reply';
    r.payload := reply;
    r.headers := jsonb_strip_nulls(jsonb_build_object(
        'in-reply-to',    cmd -> 'headers' ->> 'message-id',
        'saga-id',        cmd -> 'headers' ->> 'saga-id',
        'outcome',        outcome,
        'correlation-id', cmd -> 'headers' ->> 'correlation-id',
        'traceparent',    cmd -> 'headers' ->> 'traceparent'));
    RETURN r;
END;
$$;

-- A new command (not a replay): the change it asks for, or, for a compensation, the undoing
-- of its action (inventory.execute), or nothing and a tombstone when the action never happened.
-- Raises a data_exception for a command that can never succeed.
CREATE OR REPLACE FUNCTION inventory.handle_new_command(cmd jsonb, ikey text, phase text,
                                                  OUT outcome text, OUT reply jsonb)
LANGUAGE plpgsql
AS $$
DECLARE
    h          jsonb := cmd -> 'headers';
    action_key text;
    action     inventory.inbox;
    res        record;
BEGIN
    IF phase = 'compensation' THEN
        -- The action this compensates: "<saga-id>/<step>/action".
        IF ikey LIKE '%/compensation' THEN
            action_key := left(ikey, -length('/compensation')) || '/action';
        ELSE
            action_key := (h ->> 'saga-id') || '/' || coalesce(h ->> 'saga-step', '') || '/action';
        END IF;
        SELECT * INTO action FROM inventory.inbox WHERE idempotency_key = action_key FOR UPDATE;
        IF NOT FOUND THEN
            -- Never happened (lost, dropped, or still on its way): nothing to undo, and
            -- a tombstone so that the action, should it arrive later, does nothing.
            INSERT INTO inventory.inbox (idempotency_key, saga_id, step, phase, event_type,
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
            res := inventory.execute(cmd, action.reply);
            outcome := res.outcome;
            reply := res.reply;
        END IF;
    ELSE
        res := inventory.execute(cmd, NULL);
        outcome := res.outcome;
        reply := res.reply;
    END IF;
END;
$$;

-- Handles a batch of commands in the caller's transaction (the participant calls it once per
-- batch, autocommit: everything below commits or rolls back together). cmds is a JSON array
-- of {"message_id": ..., "headers": {...}, "payload": {...}}. Per command: the knobs, the
-- inbox (replay), the business change (inventory.handle_new_command), the inbox row, the reply.
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
CREATE OR REPLACE FUNCTION inventory.handle_commands(cmds jsonb)
RETURNS jsonb
LANGUAGE plpgsql
AS $$
BEGIN
    RETURN inventory.handle_batch(cmds, false);
EXCEPTION WHEN data_exception OR not_null_violation OR check_violation THEN
    RETURN inventory.handle_batch(cmds, true);
END;
$$;
COMMENT ON FUNCTION inventory.handle_commands(jsonb) IS
    'Handles a batch of commands in one transaction: knobs, inbox dedup, business change, reply';

-- handle_commands' loop. isolate: each new command in its own subtransaction, so that one
-- that raises is recorded as a failure without its partial changes; without, the first one
-- that raises aborts the call.
CREATE OR REPLACE FUNCTION inventory.handle_batch(cmds jsonb, isolate boolean)
RETURNS jsonb
LANGUAGE plpgsql
AS $$
DECLARE
    cmd        jsonb;
    h          jsonb;
    ikey       text;
    etype      text;
    phase      text;
    knobs      inventory.behavior;
    seen       inventory.inbox;
    res        record;
    outcome    text;
    reply      jsonb;
    outgoing   inventory.outbox[] := '{}'; -- the batch's replies, in command order
    handled    int := 0;
    replayed   int := 0;
    failed     int := 0;
    dropped    int := 0;
    skipped    int := 0;
BEGIN
    IF jsonb_typeof(cmds) IS DISTINCT FROM 'array' THEN
        RAISE EXCEPTION 'inventory.handle_commands: expects a JSON array of commands'
            USING ERRCODE = '22023';
    END IF;
    -- The knobs, read once per batch (a change applies from the next batch); the counters are
    -- decremented with a condition below, so that they never go below 0.
    SELECT * INTO knobs FROM inventory.behavior WHERE id;
    FOR cmd IN SELECT value FROM jsonb_array_elements(cmds) LOOP
        h := cmd -> 'headers';
        -- Without these there is nobody to answer or nothing to dedupe by: skip (the consumer
        -- checks them too, and logs what it skips).
        IF jsonb_typeof(h) IS DISTINCT FROM 'object'
           OR coalesce(h ->> 'message-id', '') = '' OR coalesce(h ->> 'idempotency-key', '') = ''
           OR coalesce(h ->> 'reply-to', '') = '' OR coalesce(h ->> 'saga-id', '') = ''
           OR coalesce(h ->> 'event-type', '') = '' THEN
            skipped := skipped + 1;
            CONTINUE;
        END IF;
        IF jsonb_typeof(cmd -> 'payload') IS DISTINCT FROM 'object' THEN
            cmd := jsonb_set(cmd, '{payload}', '{}');
        END IF;
        ikey := h ->> 'idempotency-key';
        etype := h ->> 'event-type';
        phase := coalesce(h ->> 'saga-phase', 'action');

        -- Knobs first, as if the command were slow, lost, or failed on its way in.
        IF knobs.command_type IS NULL OR knobs.command_type = etype THEN
            IF knobs.delay_ms > 0 THEN
                PERFORM pg_sleep(knobs.delay_ms / 1000.0);
            END IF;
            -- Decrement with a condition: two batches running at once never go below 0.
            IF knobs.drop_next > 0 THEN
                UPDATE inventory.behavior SET drop_next = drop_next - 1 WHERE id AND drop_next > 0;
                IF FOUND THEN
                    dropped := dropped + 1;
                    CONTINUE;
                END IF;
            END IF;
            IF knobs.fail_next > 0 THEN
                UPDATE inventory.behavior SET fail_next = fail_next - 1 WHERE id AND fail_next > 0;
                IF FOUND THEN
                    outgoing := outgoing || inventory.reply_row(cmd, 'failure',
                                                                '{"reason": "injected failure"}');
                    failed := failed + 1;
                    CONTINUE;
                END IF;
            END IF;
        END IF;

        -- Seen before (a redelivery, or the orchestrator's retry): answer again, change nothing.
        -- The reply goes to the latest attempt: in-reply-to is this command's message-id.
        SELECT * INTO seen FROM inventory.inbox WHERE idempotency_key = ikey FOR UPDATE;
        IF FOUND THEN
            UPDATE inventory.inbox SET replies = replies + 1, last_reply_at = now()
             WHERE idempotency_key = ikey;
            outgoing := outgoing || inventory.reply_row(cmd, seen.outcome, seen.reply);
            replayed := replayed + 1;
            CONTINUE;
        END IF;

        IF isolate THEN
            BEGIN
                res := inventory.handle_new_command(cmd, ikey, phase);
                outcome := res.outcome;
                reply := res.reply;
            EXCEPTION WHEN data_exception OR not_null_violation OR check_violation THEN
                -- A command that can never succeed (missing field, wrong type): a recorded
                -- failure, so that its retries get the same answer. Its partial changes are
                -- rolled back with this block.
                outcome := 'failure';
                reply := jsonb_build_object('reason', 'invalid command', 'detail', SQLERRM);
            END;
        ELSE
            res := inventory.handle_new_command(cmd, ikey, phase);
            outcome := res.outcome;
            reply := res.reply;
        END IF;

        INSERT INTO inventory.inbox (idempotency_key, message_id, saga_id, step, phase, event_type,
                               outcome, reply)
        VALUES (ikey, h ->> 'message-id', h ->> 'saga-id', h ->> 'saga-step', phase, etype,
                outcome, reply);
        outgoing := outgoing || inventory.reply_row(cmd, outcome, reply);
        handled := handled + 1;
        IF outcome = 'failure' THEN
            failed := failed + 1;
        END IF;
    END LOOP;
    -- Every reply in one INSERT, in command order (seq is the publish order): one statement
    -- and one NOTIFY per batch rather than per command; none when there is nothing to send (the
    -- NOTIFY trigger fires per statement, even for no rows).
    IF cardinality(outgoing) > 0 THEN
        INSERT INTO inventory.outbox (id, topic, key, event_type, payload, headers)
        SELECT r.id, r.topic, r.key, r.event_type, r.payload, r.headers
          FROM unnest(outgoing) WITH ORDINALITY AS r
         ORDER BY r.ordinality;
    END IF;
    RETURN jsonb_build_object('handled', handled, 'replayed', replayed, 'failed', failed,
                              'dropped', dropped, 'skipped', skipped);
END;
$$;
COMMENT ON FUNCTION inventory.handle_batch(jsonb, boolean) IS
    'handle_commands'' loop; isolate: each new command in its own subtransaction';

------------------------------------------------------------------------------------------
-- The business: one call per new command (never for a replay). action_reply is the recorded
-- reply of the action a compensation undoes (NULL for an action). Raising a data_exception
-- answers "invalid command".
------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION inventory.execute(cmd jsonb, action_reply jsonb,
                                             OUT outcome text, OUT reply jsonb)
LANGUAGE plpgsql
AS $$
DECLARE
    payload  jsonb := cmd -> 'payload';
    order_id text;
    wanted   jsonb;
    line     record;
    have     int;
    res_id   uuid;
    released jsonb;
BEGIN
    CASE cmd -> 'headers' ->> 'event-type'
    WHEN 'ReserveStock' THEN
        order_id := inventory.required_text(payload, 'orderId');
        IF jsonb_typeof(payload -> 'items') IS DISTINCT FROM 'array'
           OR jsonb_array_length(payload -> 'items') = 0 THEN
            RAISE EXCEPTION 'payload.items must be a non-empty array' USING ERRCODE = '22023';
        END IF;
        -- One line per sku ({"sku", "qty"} or {"sku", "quantity"}), quantities summed.
        SELECT jsonb_agg(jsonb_build_object('sku', sku, 'qty', qty) ORDER BY sku) INTO wanted
          FROM (SELECT inventory.required_text(i, 'sku') AS sku,
                       sum(coalesce(i ->> 'qty', i ->> 'quantity')::int) AS qty
                  FROM jsonb_array_elements(payload -> 'items') AS i
                 GROUP BY 1) AS lines;
        IF EXISTS (SELECT 1 FROM jsonb_array_elements(wanted) AS w
                    WHERE (w ->> 'qty') IS NULL OR (w ->> 'qty')::int <= 0) THEN
            RAISE EXCEPTION 'payload.items: every item needs a positive qty' USING ERRCODE = '22023';
        END IF;
        -- Lock the rows in sku order, then all or nothing: the first sku short of stock fails
        -- the whole reservation. One primary-key lookup per line: a join of the lines with
        -- inventory.stock is planned as a hash join over the whole table (the planner guesses
        -- 100 lines), measured at ~0.7 ms a command with 1,000 products.
        -- The sku order keeps two commands that lock the same skus from deadlocking each
        -- other, not two batches: a batch holds its earlier commands' locks until it commits,
        -- so two replicas' batches can deadlock (one reserves sku-1 then, in a later command,
        -- sku-2; the other sku-2 then sku-1). PostgreSQL aborts one of them (SQLSTATE 40P01),
        -- nothing of that batch is applied, and the participant retries it whole as after any
        -- database error (tests/e2e/test_participant.c,
        -- a_deadlocked_batch_is_retried_and_applied_once).
        FOR line IN SELECT w.sku, w.qty FROM jsonb_to_recordset(wanted) AS w(sku text, qty int)
                     ORDER BY w.sku LOOP
            SELECT s.available INTO have FROM inventory.stock s WHERE s.sku = line.sku FOR UPDATE;
            IF coalesce(have, 0) < line.qty THEN -- NULL: an unknown sku has no stock
                outcome := 'failure';
                reply := jsonb_build_object('reason', 'out of stock', 'sku', line.sku);
                RETURN;
            END IF;
        END LOOP;
        FOR line IN SELECT w.sku, w.qty FROM jsonb_to_recordset(wanted) AS w(sku text, qty int)
        LOOP
            UPDATE inventory.stock SET available = available - line.qty WHERE sku = line.sku;
        END LOOP;
        INSERT INTO inventory.reservations (saga_id, order_id, items, status)
        VALUES (cmd -> 'headers' ->> 'saga-id', order_id, wanted, 'reserved')
        RETURNING id INTO res_id;
        outcome := 'success';
        reply := jsonb_build_object('reservationId', res_id);
    WHEN 'ReleaseStock' THEN
        -- The reservation comes from the action's recorded reply, not from the payload: the
        -- payload's reservationId is null when the action's reply never reached the saga.
        res_id := coalesce(action_reply ->> 'reservationId', payload ->> 'reservationId')::uuid;
        UPDATE inventory.reservations SET status = 'released', released_at = now()
         WHERE id = res_id AND status = 'reserved'
        RETURNING items INTO released;
        IF FOUND THEN
            FOR line IN SELECT w.sku, w.qty
                          FROM jsonb_to_recordset(released) AS w(sku text, qty int)
                         ORDER BY w.sku LOOP
                UPDATE inventory.stock SET available = available + line.qty WHERE sku = line.sku;
            END LOOP;
        END IF;
        outcome := 'success';
        reply := jsonb_build_object('reservationId', res_id, 'released', released IS NOT NULL);
    ELSE
        outcome := 'failure';
        reply := jsonb_build_object('reason', 'unknown command type',
                                    'type', cmd -> 'headers' ->> 'event-type');
    END CASE;
END;
$$;
