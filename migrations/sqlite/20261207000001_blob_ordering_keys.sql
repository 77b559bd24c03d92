-- An ordering key a producer sets itself is taken as written, as PostgreSQL's text
-- column takes it; but SQLite also keeps a key bound as bytes, which PostgreSQL
-- refuses: a UUID bound as 16 bytes (sqlx's encoding of uuid::Uuid) was stored as
-- those bytes, so the call's rows whose key was derived from the same UUID in text
-- were keyed apart and could be in flight together. Such a key is now given the
-- canonical UUID text right after the insert, as `entity_id` is; any other blob key
-- its bytes as text, as the migration before this one did for stored rows.

CREATE TRIGGER IF NOT EXISTS sync_outbox_canonical_blob_key
AFTER INSERT ON sync_outbox
FOR EACH ROW WHEN typeof(NEW.ordering_key) = 'blob'
BEGIN
    UPDATE sync_outbox SET ordering_key = (
        SELECT CASE
            WHEN length(v) = 16 THEN
                substr(h, 1, 8) || '-' || substr(h, 9, 4) || '-' || substr(h, 13, 4)
                || '-' || substr(h, 17, 4) || '-' || substr(h, 21, 12)
            ELSE CAST(v AS TEXT)
        END
        FROM (SELECT NEW.ordering_key AS v, lower(hex(NEW.ordering_key)) AS h)
    )
    WHERE id = NEW.id;
END;
