-- The head-of-key probe ("is an older row of my key still in the outbox?") runs for
-- every keyed row a claim looks at, and was a fifth of PostgreSQL's CPU in a drain,
-- nearly all of it the descent of the (ordering_key, id) index: text comparisons
-- under the database's collation (strcoll for anything but C) on 36-byte keys. The
-- probe now compares a 64-bit hash of the key instead, in an index a third of the
-- size. Two keys with the same hash (for a million keys in the outbox at once, the
-- chance that any two share one is about 3 in 10^8) are only ordered behind each
-- other; no row is ever delivered out of its own key's order.
--
-- A stored generated column: always equal to the key's hash, for rows the
-- producers insert, rows `dlq requeue` puts back, and rows already queued (adding
-- it rewrites sync_outbox once, under an exclusive lock: a moment for a normal
-- outbox, a few seconds for a backlog of a million rows).
ALTER TABLE sync_outbox
    ADD COLUMN IF NOT EXISTS ordering_key_hash bigint
        GENERATED ALWAYS AS (hashtextextended(ordering_key, 0)) STORED;

CREATE INDEX IF NOT EXISTS sync_outbox_ordering_key_hash_id
    ON sync_outbox (ordering_key_hash, id) WHERE ordering_key_hash IS NOT NULL;

-- Relays older than this migration probe by the text key, and find no index for it
-- once this one is gone: restart them after `serversync migrate`, as every upgrade says.
DROP INDEX IF EXISTS sync_outbox_ordering_key_id;
