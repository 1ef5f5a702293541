-- inventory: the example participant that reserves stock (ReserveStock / ReleaseStock).
--
-- Applied by example-participant at every start, after examples/contract.sql (the participant
-- contract: outbox, inbox, knobs, handle_commands, the same for every service, applied with
-- this service's name). Idempotent. Here: the service's tables and inventory.execute.
CREATE SCHEMA IF NOT EXISTS inventory;

-- Value rules as domains, not table CHECKs (why: examples/README.md, "Copying it", step 2).
DO $$
BEGIN
    IF to_regtype('inventory.stock_level') IS NULL THEN
        CREATE DOMAIN inventory.stock_level AS int CHECK (VALUE >= 0);
    END IF;
    IF to_regtype('inventory.reservation_status') IS NULL THEN
        CREATE DOMAIN inventory.reservation_status AS text CHECK (VALUE IN ('reserved', 'released'));
    END IF;
END;
$$;

CREATE TABLE IF NOT EXISTS inventory.stock (
    sku       text PRIMARY KEY,
    available inventory.stock_level NOT NULL
);
-- Every reservation and release updates its rows: half of each page is kept free so that the
-- new row version fits beside the old one (a HOT update: no index entry, and the dead version
-- is pruned in place). At 100% most updates of a busy table move the row to another page and
-- add an index entry that every later lookup of the sku steps over until VACUUM. Set once:
-- at every start it would lock the table and make the running replicas' sessions re-plan.
DO $$
BEGIN
    IF NOT coalesce((SELECT reloptions FROM pg_class WHERE oid = 'inventory.stock'::regclass)
                    @> '{fillfactor=50}', false) THEN
        ALTER TABLE inventory.stock SET (fillfactor = 50);
    END IF;
END;
$$;

CREATE TABLE IF NOT EXISTS inventory.reservations (
    id          uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    saga_id     text        NOT NULL,
    order_id    text        NOT NULL,
    items       jsonb       NOT NULL, -- [{"sku": ..., "qty": n}], one entry per sku
    status      inventory.reservation_status NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    released_at timestamptz
);

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
    skus     text[];
    qtys     int[];
    no_sku   boolean;
    bad_qty  boolean;
    line     record;
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
        -- One line per sku ({"sku", "qty"} or {"sku", "quantity"}), quantities summed, in sku
        -- order: as the reservation's items (wanted) and as arrays for the loop below. The
        -- order comes from the subquery (the aggregates read its rows as they come: nothing
        -- at this level joins or groups them), not from an ORDER BY in each aggregate, which
        -- sorts the lines once per aggregate: 6% of handle_commands' instructions a command
        -- (bench/participant-batch --instructions --service inventory).
        SELECT jsonb_agg(jsonb_build_object('sku', sku, 'qty', qty)),
               array_agg(sku), array_agg(qty::int),
               bool_or(sku IS NULL), bool_or(bad)
          INTO wanted, skus, qtys, no_sku, bad_qty
          FROM (SELECT CASE WHEN jsonb_typeof(i -> 'sku') = 'string' THEN nullif(i ->> 'sku', '')
                       END AS sku,
                       sum(coalesce(i ->> 'qty', i ->> 'quantity')::int) AS qty,
                       -- every item, not only their sum: [{a, 5}, {a, -3}] is refused
                       bool_or(coalesce(i ->> 'qty', i ->> 'quantity')::int IS NULL
                               OR coalesce(i ->> 'qty', i ->> 'quantity')::int <= 0) AS bad
                  FROM jsonb_array_elements(payload -> 'items') AS i
                 GROUP BY 1 ORDER BY 1) AS lines;
        IF no_sku THEN
            RAISE EXCEPTION 'payload.items: every item needs a sku (a non-empty string)'
                USING ERRCODE = '22023';
        END IF;
        IF bad_qty THEN
            RAISE EXCEPTION 'payload.items: every item needs a positive qty'
                USING ERRCODE = '22023';
        END IF;
        -- All or nothing, one statement per line: each line takes its stock if there is enough
        -- (an unknown sku has none); the first line short of stock gives back the lines taken
        -- before it and fails the whole reservation. (A lock then a check would be two
        -- statements a line, and a statement costs PostgreSQL its executor set-up whatever
        -- its rows: bench/participant-batch.) A line found short is
        -- locked and tried once more before it fails: the UPDATE tests the stock it sees in its
        -- snapshot and does not wait for a transaction that holds the row, which may be giving
        -- stock back (a release, a restock); the lock waits for it, and the second UPDATE's
        -- snapshot sees what it committed. One primary-key lookup per line: a join of the lines
        -- with inventory.stock is planned as a hash join over the whole table (the planner
        -- guesses 100 lines), measured at ~0.7 ms a command with 1,000 products.
        -- The rows are locked in sku order, which keeps two commands that lock the same skus
        -- from deadlocking each other, not two batches: a batch holds its earlier commands'
        -- locks until it commits, so two replicas' batches can deadlock (one reserves sku-1
        -- then, in a later command, sku-2; the other sku-2 then sku-1). PostgreSQL aborts one of
        -- them (SQLSTATE 40P01), nothing of that batch is applied, and the participant retries
        -- it whole as after any database error (tests/e2e/test_participant.c,
        -- a_deadlocked_batch_is_retried_and_applied_once).
        FOR k IN 1 .. cardinality(skus) LOOP
            UPDATE inventory.stock SET available = available - qtys[k]
             WHERE sku = skus[k] AND available >= qtys[k];
            IF NOT FOUND THEN
                PERFORM 1 FROM inventory.stock WHERE sku = skus[k] FOR UPDATE;
                UPDATE inventory.stock SET available = available - qtys[k]
                 WHERE sku = skus[k] AND available >= qtys[k];
            END IF;
            IF NOT FOUND THEN
                FOR j IN 1 .. k - 1 LOOP
                    UPDATE inventory.stock SET available = available + qtys[j] WHERE sku = skus[j];
                END LOOP;
                outcome := 'failure';
                reply := jsonb_build_object('reason', 'out of stock', 'sku', skus[k]);
                RETURN;
            END IF;
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
