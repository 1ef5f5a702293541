-- shipping: the example participant that schedules shipments (ScheduleShipment, after the
-- saga's pivot: the orchestrator retries it until it succeeds, so it has no compensation).
--
-- Applied by example-participant at every start, after examples/contract.sql (the participant
-- contract: outbox, inbox, knobs, handle_commands, the same for every service, applied with
-- this service's name). Idempotent. Here: the service's tables and shipping.execute.
CREATE SCHEMA IF NOT EXISTS shipping;

-- Value rules as domains, not table CHECKs (why: examples/README.md, "Copying it", step 2).
DO $$
BEGIN
    IF to_regtype('shipping.shipment_status') IS NULL THEN
        CREATE DOMAIN shipping.shipment_status AS text CHECK (VALUE IN ('scheduled', 'shipped'));
    END IF;
END;
$$;

CREATE TABLE IF NOT EXISTS shipping.shipments (
    id          uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    saga_id     text        NOT NULL,
    order_id    text        NOT NULL,
    items       jsonb,
    status      shipping.shipment_status NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

------------------------------------------------------------------------------------------
-- The business: one call per new command (never for a replay). Raising a data_exception
-- answers "invalid command".
------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION shipping.execute(cmd jsonb, action_reply jsonb,
                                            OUT outcome text, OUT reply jsonb)
LANGUAGE plpgsql
AS $$
DECLARE
    payload jsonb := cmd -> 'payload';
    ship_id uuid;
BEGIN
    CASE cmd -> 'headers' ->> 'event-type'
    WHEN 'ScheduleShipment' THEN
        INSERT INTO shipping.shipments (saga_id, order_id, items, status)
        VALUES (cmd -> 'headers' ->> 'saga-id', shipping.required_text(payload, 'orderId'),
                payload -> 'items', 'scheduled')
        RETURNING id INTO ship_id;
        outcome := 'success';
        reply := jsonb_build_object('shipmentId', ship_id);
    ELSE
        outcome := 'failure';
        reply := jsonb_build_object('reason', 'unknown command type',
                                    'type', cmd -> 'headers' ->> 'event-type');
    END CASE;
END;
$$;
