-- payment: the example participant that authorizes payments (AuthorizePayment /
-- RefundPayment).
--
-- Applied by example-participant at every start, after examples/contract.sql (the participant
-- contract: outbox, inbox, knobs, handle_commands, the same for every service, applied with
-- this service's name). Idempotent. Here: the service's tables and payment.execute.
CREATE SCHEMA IF NOT EXISTS payment;

-- Value rules as domains, not table CHECKs (why: examples/README.md, "Copying it", step 2).
DO $$
BEGIN
    IF to_regtype('payment.positive_amount') IS NULL THEN
        CREATE DOMAIN payment.positive_amount AS numeric CHECK (VALUE > 0);
    END IF;
    IF to_regtype('payment.payment_status') IS NULL THEN
        CREATE DOMAIN payment.payment_status AS text CHECK (VALUE IN ('authorized', 'refunded'));
    END IF;
END;
$$;

CREATE TABLE IF NOT EXISTS payment.payments (
    id          uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    saga_id     text        NOT NULL,
    order_id    text        NOT NULL,
    customer_id text        NOT NULL,
    amount      payment.positive_amount NOT NULL,
    status      payment.payment_status NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    refunded_at timestamptz
);

-- One row: amounts above decline_above are declined.
CREATE TABLE IF NOT EXISTS payment.settings (
    id            boolean PRIMARY KEY DEFAULT true CHECK (id),
    decline_above numeric NOT NULL DEFAULT 1000
);
INSERT INTO payment.settings (id) VALUES (true) ON CONFLICT DO NOTHING;

------------------------------------------------------------------------------------------
-- The business: one call per new command (never for a replay). action_reply is the recorded
-- reply of the action a compensation undoes (NULL for an action). Raising a data_exception
-- answers "invalid command".
------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION payment.execute(cmd jsonb, action_reply jsonb,
                                           OUT outcome text, OUT reply jsonb)
LANGUAGE plpgsql
AS $$
DECLARE
    payload jsonb := cmd -> 'payload';
    amount  numeric;
    limit_  numeric;
    auth_id uuid;
BEGIN
    CASE cmd -> 'headers' ->> 'event-type'
    WHEN 'AuthorizePayment' THEN
        IF jsonb_typeof(payload -> 'amount') NOT IN ('number', 'string') THEN
            RAISE EXCEPTION 'payload.amount must be a number' USING ERRCODE = '22023';
        END IF;
        amount := (payload ->> 'amount')::numeric;
        IF amount <= 0 THEN
            RAISE EXCEPTION 'payload.amount must be positive' USING ERRCODE = '22023';
        END IF;
        SELECT decline_above INTO limit_ FROM payment.settings WHERE id;
        IF amount > limit_ THEN
            outcome := 'failure';
            reply := jsonb_build_object('reason', 'declined');
            RETURN;
        END IF;
        INSERT INTO payment.payments (saga_id, order_id, customer_id, amount, status)
        VALUES (cmd -> 'headers' ->> 'saga-id', payment.required_text(payload, 'orderId'),
                payment.required_text(payload, 'customerId'), amount, 'authorized')
        RETURNING id INTO auth_id;
        outcome := 'success';
        reply := jsonb_build_object('authorizationId', auth_id, 'amount', amount);
    WHEN 'RefundPayment' THEN
        -- The authorization comes from the action's recorded reply: the payload's
        -- authorizationId is null when the action's reply never reached the saga.
        auth_id := coalesce(action_reply ->> 'authorizationId', payload ->> 'authorizationId')::uuid;
        UPDATE payment.payments SET status = 'refunded', refunded_at = now()
         WHERE id = auth_id AND status = 'authorized'
        RETURNING payments.amount INTO amount;
        outcome := 'success';
        reply := jsonb_build_object('authorizationId', auth_id, 'refunded', FOUND,
                                    'amount', amount);
    ELSE
        outcome := 'failure';
        reply := jsonb_build_object('reason', 'unknown command type',
                                    'type', cmd -> 'headers' ->> 'event-type');
    END CASE;
END;
$$;
