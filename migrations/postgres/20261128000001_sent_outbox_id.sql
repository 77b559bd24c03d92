-- The archive's id is the outbox id; name it as the dead letters do (outbox_id), so a
-- query written against either table finds it. A generated column: nothing to keep
-- in step, 8 bytes per delivered record.
ALTER TABLE sync_outbox_sent
    ADD COLUMN IF NOT EXISTS outbox_id bigint GENERATED ALWAYS AS (id) STORED;
