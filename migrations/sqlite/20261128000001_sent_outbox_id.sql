-- The archive's id is the outbox id; name it as the dead letters do (outbox_id), so a
-- query written against either table finds it. Virtual: computed when read.
ALTER TABLE sync_outbox_sent
    ADD COLUMN outbox_id INTEGER GENERATED ALWAYS AS (id) VIRTUAL;
