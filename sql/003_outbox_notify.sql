-- 003_outbox_notify: an outbox table may run without its NOTIFY trigger.
--
-- Why (figures in bench/README.md, section 3): a transaction that NOTIFYs takes a
-- database-wide lock at commit and holds it until its commit record is flushed, so the
-- inserters of a notifying outbox are serialised on the WAL flush and lose group commit
-- (16 clients, durable commits: ~1,800 single-row commits/s with the trigger against ~4,900
-- without, on the benchmark machine). NOTIFY stays the default: it is what gives the relay
-- its ~10 ms latency at rest. A table with a high commit rate can turn it off; the relay then
-- finds its rows by polling, so give it a short RELAY_POLL_INTERVAL (50-100ms).
--
-- Off means DISABLED, not dropped: saga.create_outbox() only creates the trigger when none
-- exists, so running it again (at every deployment, say) keeps the choice.

CREATE FUNCTION saga.set_outbox_notify(outbox regclass, enabled boolean)
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    state "char";
BEGIN
    IF outbox IS NULL OR enabled IS NULL THEN
        RAISE EXCEPTION 'saga.set_outbox_notify: the table and the choice must not be null'
            USING ERRCODE = '22023';
    END IF;
    SELECT tgenabled INTO state FROM pg_trigger
     WHERE tgrelid = outbox AND tgname = 'outbox_notify' AND NOT tgisinternal;
    IF NOT FOUND THEN
        IF NOT enabled THEN
            RETURN; -- no trigger: nothing notifies already
        END IF;
        EXECUTE format('CREATE TRIGGER outbox_notify AFTER INSERT ON %s
                        FOR EACH STATEMENT EXECUTE FUNCTION saga.outbox_notify()', outbox);
    ELSIF enabled AND state = 'D' THEN
        EXECUTE format('ALTER TABLE %s ENABLE TRIGGER outbox_notify', outbox);
    ELSIF NOT enabled AND state <> 'D' THEN
        EXECUTE format('ALTER TABLE %s DISABLE TRIGGER outbox_notify', outbox);
    END IF;
END;
$$;
COMMENT ON FUNCTION saga.set_outbox_notify(regclass, boolean) IS
    'Turns the outbox table''s NOTIFY trigger on or off (off: the relay polls; for high commit rates); idempotent';
