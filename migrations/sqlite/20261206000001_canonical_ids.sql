-- SQLite stores a value as the producer bound it. PostgreSQL's uuid and jsonb types
-- turn every spelling of a UUID into one text and refuse what is neither; SQLite
-- keeps, say, a UUID bound as 16 bytes (sqlx's encoding of uuid::Uuid), JSON bound
-- as bytes, or a UUID in upper case, without hyphens or in braces. The relay read
-- such a blob as a database error (every claim failed: nothing was delivered), and a
-- key derived from an upper-case id did not match the same call's lower-case
-- `callLogId` (the call's rows lost their order).
--
-- So, as PostgreSQL does, the row is given the canonical text right after the
-- insert: `entity_id` as lower-case hyphenated UUID text when it is a UUID (anything
-- else is left as written, a blob as hex, and dead-lettered by the relay as
-- payload_invalid), the payload and entity type as text, and a key derived from a
-- UUID-valued field in the same canonical form. Keys producers set themselves are
-- theirs, taken as written.

DROP TRIGGER IF EXISTS sync_outbox_derive_ordering_key;

CREATE TRIGGER IF NOT EXISTS sync_outbox_canonical_row
AFTER INSERT ON sync_outbox
FOR EACH ROW
BEGIN
    UPDATE sync_outbox SET
        entity_id = (
            SELECT CASE
                WHEN typeof(v) = 'blob' AND length(v) = 16 THEN
                    substr(h, 1, 8) || '-' || substr(h, 9, 4) || '-' || substr(h, 13, 4)
                    || '-' || substr(h, 17, 4) || '-' || substr(h, 21, 12)
                WHEN length(u) = 32 AND u NOT GLOB '*[^0-9a-f]*' THEN
                    substr(u, 1, 8) || '-' || substr(u, 9, 4) || '-' || substr(u, 13, 4)
                    || '-' || substr(u, 17, 4) || '-' || substr(u, 21, 12)
                WHEN typeof(v) = 'blob' THEN hex(v)
                ELSE v
            END
            FROM (SELECT NEW.entity_id AS v, lower(hex(NEW.entity_id)) AS h,
                         replace(replace(replace(replace(lower(CAST(NEW.entity_id AS TEXT)),
                             'urn:uuid:', ''), '{', ''), '}', ''), '-', '') AS u)
        ),
        payload = CASE WHEN typeof(NEW.payload) = 'blob'
                       THEN CAST(NEW.payload AS TEXT) ELSE NEW.payload END,
        entity_type = CASE WHEN typeof(NEW.entity_type) = 'blob'
                           THEN CAST(NEW.entity_type AS TEXT) ELSE NEW.entity_type END
    WHERE id = NEW.id;

    UPDATE sync_outbox SET ordering_key = (
        SELECT CASE
            WHEN length(u) = 32 AND u NOT GLOB '*[^0-9a-f]*' THEN
                substr(u, 1, 8) || '-' || substr(u, 9, 4) || '-' || substr(u, 13, 4)
                || '-' || substr(u, 17, 4) || '-' || substr(u, 21, 12)
            ELSE k
        END
        FROM (SELECT k, replace(replace(replace(replace(lower(k),
                     'urn:uuid:', ''), '{', ''), '}', ''), '-', '') AS u
              FROM (SELECT CASE
                        WHEN r.source = 'entity_id' THEN o.entity_id
                        WHEN json_type(o.payload) = 'object'
                            THEN CAST(json_extract(o.payload, '$.' || substr(r.source, 9)) AS TEXT)
                    END AS k
                    FROM sync_outbox o JOIN sync_outbox_ordering_rules r
                        ON r.entity_type = o.entity_type
                    WHERE o.id = NEW.id))
    )
    WHERE id = NEW.id AND NEW.ordering_key IS NULL;
END;

-- Rows and dead letters already stored as blobs get their text once.
UPDATE sync_outbox SET
    entity_id = CASE WHEN length(entity_id) = 16 THEN
        substr(lower(hex(entity_id)), 1, 8) || '-' || substr(lower(hex(entity_id)), 9, 4) || '-'
        || substr(lower(hex(entity_id)), 13, 4) || '-' || substr(lower(hex(entity_id)), 17, 4)
        || '-' || substr(lower(hex(entity_id)), 21, 12)
        ELSE entity_id END
WHERE typeof(entity_id) = 'blob';
UPDATE sync_outbox SET payload = CAST(payload AS TEXT) WHERE typeof(payload) = 'blob';
UPDATE sync_outbox SET entity_type = CAST(entity_type AS TEXT) WHERE typeof(entity_type) = 'blob';
UPDATE sync_outbox SET ordering_key = CAST(ordering_key AS TEXT) WHERE typeof(ordering_key) = 'blob';
UPDATE sync_outbox_dead_letters SET
    entity_id = CASE WHEN length(entity_id) = 16 THEN
        substr(lower(hex(entity_id)), 1, 8) || '-' || substr(lower(hex(entity_id)), 9, 4) || '-'
        || substr(lower(hex(entity_id)), 13, 4) || '-' || substr(lower(hex(entity_id)), 17, 4)
        || '-' || substr(lower(hex(entity_id)), 21, 12)
        ELSE hex(entity_id) END
WHERE typeof(entity_id) = 'blob';
UPDATE sync_outbox_dead_letters SET payload = CAST(payload AS TEXT) WHERE typeof(payload) = 'blob';
UPDATE sync_outbox_dead_letters SET ordering_key = CAST(ordering_key AS TEXT) WHERE typeof(ordering_key) = 'blob';
