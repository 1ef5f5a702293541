-- orders: the example participant that approves orders (ApproveOrder, the saga's pivot: it
-- has no compensation).
--
-- Applied by example-participant at every start, after examples/contract.sql (the participant
-- contract: outbox, inbox, knobs, handle_commands, the same for every service, applied with
-- this service's name). Idempotent. Here: the service's tables and orders.execute.
CREATE SCHEMA IF NOT EXISTS orders;

-- Value rules as domains, not table CHECKs (why: examples/README.md, "Copying it", step 2).
DO $$
BEGIN
    IF to_regtype('orders.order_status') IS NULL THEN
        CREATE DOMAIN orders.order_status AS text CHECK (VALUE IN ('approved', 'rejected'));
    END IF;
END;
$$;

CREATE TABLE IF NOT EXISTS orders.orders (
    order_id    text        PRIMARY KEY,
    saga_id     text        NOT NULL,
    customer_id text,
    status      orders.order_status NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- One row: orders of these customers are rejected.
CREATE TABLE IF NOT EXISTS orders.settings (
    id               boolean PRIMARY KEY DEFAULT true CHECK (id),
    reject_customers text[]  NOT NULL DEFAULT '{}'
);
INSERT INTO orders.settings (id) VALUES (true) ON CONFLICT DO NOTHING;

------------------------------------------------------------------------------------------
-- The business: one call per new command (never for a replay). Raising a data_exception
-- answers "invalid command".
------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION orders.execute(cmd jsonb, action_reply jsonb,
                                          OUT outcome text, OUT reply jsonb)
LANGUAGE plpgsql
AS $$
DECLARE
    payload  jsonb := cmd -> 'payload';
    order_id text;
    customer text;
    verdict  text;
BEGIN
    CASE cmd -> 'headers' ->> 'event-type'
    WHEN 'ApproveOrder' THEN
        order_id := orders.required_text(payload, 'orderId');
        customer := payload ->> 'customerId';
        SELECT CASE WHEN customer = ANY (reject_customers) THEN 'rejected' ELSE 'approved' END
          INTO verdict FROM orders.settings WHERE id;
        INSERT INTO orders.orders AS o (order_id, saga_id, customer_id, status)
        VALUES (order_id, cmd -> 'headers' ->> 'saga-id', customer, verdict)
        ON CONFLICT ON CONSTRAINT orders_pkey DO UPDATE
           SET saga_id = excluded.saga_id, customer_id = excluded.customer_id,
               status = excluded.status, updated_at = now();
        IF verdict = 'rejected' THEN
            outcome := 'failure';
            reply := jsonb_build_object('reason', 'rejected', 'customerId', customer);
        ELSE
            outcome := 'success';
            reply := jsonb_build_object('orderId', order_id, 'status', verdict);
        END IF;
    ELSE
        outcome := 'failure';
        reply := jsonb_build_object('reason', 'unknown command type',
                                    'type', cmd -> 'headers' ->> 'event-type');
    END CASE;
END;
$$;
