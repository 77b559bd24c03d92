-- A key derived from a payload field (`recording` → `payload.callLogId`) was taken as
-- written, while the call's `call_log` gets `entity_id::text`, always lower case with
-- hyphens: a producer that writes the call's id in upper case (SQL Server's and some
-- .NET serialisers' habit), in braces or without hyphens put the call's rows under two
-- keys, and they lost their order. A field that holds a UUID now gives the key in
-- entity_id's spelling; any other value is still the key as written.
CREATE OR REPLACE FUNCTION sync_outbox_derive_ordering_key() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    src text;
    k text;
BEGIN
    IF NEW.ordering_key IS NULL THEN
        SELECT r.source INTO src FROM sync_outbox_ordering_rules r WHERE r.entity_type = NEW.entity_type;
        IF src = 'entity_id' THEN
            NEW.ordering_key := NEW.entity_id::text;
        ELSIF src LIKE 'payload.%' AND jsonb_typeof(NEW.payload) = 'object' THEN
            k := NEW.payload ->> substr(src, 9);
            IF k ~* '^(urn:uuid:)?([0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}|\{[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}\})$' THEN
                k := regexp_replace(k, '^urn:uuid:', '', 'i')::uuid::text;
            END IF;
            NEW.ordering_key := k;
        END IF;
    END IF;
    RETURN NEW;
END
$$;
