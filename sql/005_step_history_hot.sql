-- 005_step_history_hot: room on saga.step_history's pages for the update that records a reply.
--
-- Every attempt is written twice: inserted as 'sent' by the batch that sends the command, then
-- updated (status, replied_at, reply) by the batch that applies its reply, milliseconds later.
-- None of those columns is indexed, so the update can be a HOT update (no new entry in the
-- table's three indexes) when the row's page has room for the new version. At the default
-- fillfactor of 100 the inserts fill each page first: in a 2,000-saga benchmark run 11% of
-- these updates were HOT. Half of each page is left for them; the space of the versions they
-- replace is reclaimed by page pruning, without waiting for VACUUM.
--
-- Only pages written from now on are affected; an existing table is not rewritten.

ALTER TABLE saga.step_history SET (fillfactor = 50);
