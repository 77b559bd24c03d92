-- A key derived from a payload field that holds a UUID is given entity_id's spelling
-- (20261206000002). That migration recognised the usual spellings only: hyphens at
-- the usual places or none, braces, `urn:uuid:`. PostgreSQL's own `uuid` input (and
-- the SQLite store's trigger) also takes hyphens after any four digits
-- (`a0eebc99-9c0b4ef8-bb6d6bb9-bd380a11`), and such a spelling of a call's id put its
-- recording under a key apart from its log. Now, as in the SQLite store: without its
-- `urn:uuid:`, braces and hyphens, a value of 32 hex digits (any case) is a UUID.
CREATE OR REPLACE FUNCTION sync_outbox_derive_ordering_key() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    src text;
    k text;
    u text;
BEGIN
    IF NEW.ordering_key IS NULL THEN
        SELECT r.source INTO src FROM sync_outbox_ordering_rules r WHERE r.entity_type = NEW.entity_type;
        IF src = 'entity_id' THEN
            NEW.ordering_key := NEW.entity_id::text;
        ELSIF src LIKE 'payload.%' AND jsonb_typeof(NEW.payload) = 'object' THEN
            k := NEW.payload ->> substr(src, 9);
            u := replace(replace(replace(replace(lower(k), 'urn:uuid:', ''), '{', ''), '}', ''), '-', '');
            IF length(u) = 32 AND u !~ '[^0-9a-f]' THEN
                k := u::uuid::text;
            END IF;
            NEW.ordering_key := k;
        END IF;
    END IF;
    RETURN NEW;
END
$$;
