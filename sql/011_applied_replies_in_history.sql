-- 011_applied_replies_in_history: a reply that is applied is recorded on the attempt it
-- answers (saga.step_history.reply_message_id), not in saga.inbox.
--
-- Every applied reply (four a saga of four steps) was an inbox row: an insert into a table
-- keyed by a random uuid, 20-24 µs a row in batches of 250, kept forever. The attempt's row
-- is updated by the same batch anyway (status, replied_at, reply); the reply's message-id
-- goes with it, in a column no index covers, so that update stays HOT. The deduplication
-- looks in both places. The inbox keeps the replies that were not applied (late, stale,
-- unknown), and the applied ones recorded before this migration.

ALTER TABLE saga.step_history ADD COLUMN reply_message_id uuid;
COMMENT ON TABLE saga.inbox IS
    'Replies received and not applied (late, stale, unknown; applied ones before 011): an applied reply is on its attempt, step_history.reply_message_id';
COMMENT ON COLUMN saga.step_history.reply_message_id IS
    'message-id of the reply applied to this attempt (NULL: none yet, or timed out); how a redelivered reply is known';

CREATE OR REPLACE FUNCTION saga.apply_batch(batch jsonb) RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    IF jsonb_array_length(COALESCE(batch->'instances', '[]')) > 0 THEN
        UPDATE saga.instances i
           SET status = u.status,
               current_step = u.current_step,
               step_index = u.step_index,
               phase = u.phase,
               attempt = u.attempt,
               budget_base = u.budget_base,
               wait = u.wait,
               waiting_message_id = u.waiting_message_id,
               deadline = CASE WHEN u.deadline_ms IS NULL THEN NULL
                               ELSE to_timestamp(u.deadline_ms / 1000.0) END,
               pivot_sent = u.pivot_sent,
               replies = COALESCE(u.replies, '{}'),
               error = u.error,
               pending_request = CASE WHEN u.clear_request THEN NULL ELSE i.pending_request END,
               request_reason = CASE WHEN u.clear_request THEN NULL ELSE i.request_reason END,
               updated_at = now(),
               completed_at = CASE WHEN u.status IN ('completed', 'compensated')
                                   THEN COALESCE(i.completed_at, now()) ELSE NULL END
          FROM jsonb_to_recordset(COALESCE(batch->'instances', '[]')) AS u(
                   id uuid, status text, current_step text, step_index int, phase text,
                   attempt int, budget_base int, wait text, waiting_message_id uuid,
                   deadline_ms bigint, pivot_sent boolean, replies jsonb, error text,
                   clear_request boolean)
         WHERE i.id = u.id;
    END IF;

    IF jsonb_array_length(COALESCE(batch->'sent', '[]')) > 0 THEN
        INSERT INTO saga.step_history (saga_id, step, phase, attempt, status, message_id)
        SELECT s.saga_id, s.step, s.phase, s.attempt, 'sent', s.message_id
          FROM jsonb_to_recordset(COALESCE(batch->'sent', '[]')) AS s(
                   saga_id uuid, step text, phase text, attempt int, message_id uuid);
    END IF;

    -- A timed-out attempt got no reply: its replied_at stays NULL (a late reply sets it).
    IF jsonb_array_length(COALESCE(batch->'resolved', '[]')) > 0 THEN
        UPDATE saga.step_history h
           SET status = r.status,
               replied_at = CASE WHEN r.status = 'timed_out' THEN NULL ELSE now() END,
               reply = r.reply,
               reply_message_id = r.reply_message_id
          FROM jsonb_to_recordset(COALESCE(batch->'resolved', '[]')) AS r(
                   message_id uuid, status text, reply jsonb, reply_message_id uuid)
         WHERE h.message_id = r.message_id;
    END IF;

    -- Commands, in the order the engine produced them (seq is publish order).
    IF jsonb_array_length(COALESCE(batch->'outbox', '[]')) > 0 THEN
        INSERT INTO saga.outbox (id, topic, key, event_type, payload, headers)
        SELECT (e.doc->>'id')::uuid, e.doc->>'topic', e.doc->>'key', e.doc->>'event_type',
               e.doc->'payload', e.doc->'headers'
          FROM jsonb_array_elements(COALESCE(batch->'outbox', '[]')) WITH ORDINALITY AS e(doc, n)
         ORDER BY e.n;
    END IF;

    -- A reply the saga was not waiting for: late when it answers an attempt we sent (that
    -- row is marked), stale otherwise.
    IF jsonb_array_length(COALESCE(batch->'ignored', '[]')) > 0 THEN
        UPDATE saga.step_history h
           SET status = 'late', replied_at = now(), reply = g.reply
          FROM jsonb_to_recordset(COALESCE(batch->'ignored', '[]')) AS g(
                   in_reply_to uuid, saga_id uuid, reply jsonb)
         WHERE h.message_id = g.in_reply_to AND h.saga_id = g.saga_id
           AND h.status IN ('sent', 'timed_out');
    END IF;

    IF jsonb_array_length(COALESCE(batch->'inbox', '[]')) > 0 THEN
        INSERT INTO saga.inbox (message_id, in_reply_to, saga_id, disposition, topic, partition,
                                "offset")
        SELECT b.message_id, b.in_reply_to, b.saga_id,
               CASE WHEN b.disposition <> 'ignored' THEN b.disposition
                    WHEN EXISTS (SELECT 1 FROM saga.step_history h
                                  WHERE h.message_id = b.in_reply_to AND h.saga_id = b.saga_id)
                    THEN 'late' ELSE 'stale' END,
               b.topic, b.partition, b."offset"
          FROM jsonb_to_recordset(COALESCE(batch->'inbox', '[]')) AS b(
                   message_id uuid, in_reply_to uuid, saga_id uuid, disposition text,
                   topic text, partition int, "offset" bigint)
         -- Applied already (an orchestrator binary older than 011 looks for duplicates in
         -- the inbox only, and takes a redelivered applied reply for a late one): recorded
         -- on its attempt, not again here.
         WHERE NOT EXISTS (SELECT 1 FROM saga.step_history h
                            WHERE h.message_id = b.in_reply_to
                              AND h.reply_message_id = b.message_id)
        ON CONFLICT (message_id) DO NOTHING;
    END IF;

    IF jsonb_array_length(COALESCE(batch->'dead_letters', '[]')) > 0 THEN
        INSERT INTO saga.dead_letters (topic, partition, "offset", key, headers, payload, error)
        SELECT d.topic, d.partition, d."offset", d.key, d.headers, d.payload, d.error
          FROM jsonb_to_recordset(COALESCE(batch->'dead_letters', '[]')) AS d(
                   topic text, partition int, "offset" bigint, key text, headers jsonb,
                   payload text, error text)
        ON CONFLICT DO NOTHING;
    END IF;
END;
$$;

-- Every reply received, as the inbox listed them before: the applied ones from the attempts
-- they answered (no topic, partition or offset: the Kafka position is what the offset commit
-- is for), the others from the inbox.
CREATE VIEW saga.replies_received AS
    SELECT message_id, in_reply_to, saga_id, disposition, topic, partition, "offset",
           received_at
      FROM saga.inbox
    UNION ALL
    SELECT reply_message_id, message_id, saga_id, 'applied', NULL, NULL, NULL, replied_at
      FROM saga.step_history
     WHERE reply_message_id IS NOT NULL;
COMMENT ON VIEW saga.replies_received IS
    'Every reply received: applied (from step_history.reply_message_id), late, stale or unknown (from saga.inbox)';

SELECT saga.grant_roles();
