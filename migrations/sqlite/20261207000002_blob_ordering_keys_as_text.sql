-- The trigger of 20261207000001 read every 16-byte key bound as bytes as a UUID,
-- and so split a key of 16 printable characters bound as bytes (`b"order-0000000042"`)
-- from the same key bound as text. A blob key is now its text when it is printable
-- ASCII (16 random bytes are that about once in ten million; `length` of the text
-- stops at a NUL), else, at 16 bytes, a UUID's canonical text. Keys stored as blobs since the migration before the last
-- (which converted the blobs then stored, as text) get the same treatment once.

DROP TRIGGER IF EXISTS sync_outbox_canonical_blob_key;

CREATE TRIGGER IF NOT EXISTS sync_outbox_canonical_blob_key
AFTER INSERT ON sync_outbox
FOR EACH ROW WHEN typeof(NEW.ordering_key) = 'blob'
BEGIN
    UPDATE sync_outbox SET ordering_key = (
        SELECT CASE
            WHEN length(v) = 16 AND NOT (length(CAST(v AS TEXT)) = 16
                                     AND CAST(v AS TEXT) NOT GLOB '*[^ -~]*') THEN
                substr(h, 1, 8) || '-' || substr(h, 9, 4) || '-' || substr(h, 13, 4)
                || '-' || substr(h, 17, 4) || '-' || substr(h, 21, 12)
            ELSE CAST(v AS TEXT)
        END
        FROM (SELECT NEW.ordering_key AS v, lower(hex(NEW.ordering_key)) AS h)
    )
    WHERE id = NEW.id;
END;

UPDATE sync_outbox SET ordering_key = (
    SELECT CASE
        WHEN length(v) = 16 AND NOT (length(CAST(v AS TEXT)) = 16
                                     AND CAST(v AS TEXT) NOT GLOB '*[^ -~]*') THEN
            substr(h, 1, 8) || '-' || substr(h, 9, 4) || '-' || substr(h, 13, 4)
            || '-' || substr(h, 17, 4) || '-' || substr(h, 21, 12)
        ELSE CAST(v AS TEXT)
    END
    FROM (SELECT sync_outbox.ordering_key AS v, lower(hex(sync_outbox.ordering_key)) AS h)
)
WHERE typeof(ordering_key) = 'blob';
