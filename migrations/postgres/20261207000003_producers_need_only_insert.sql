-- A producer needs INSERT on sync_outbox, and USAGE on sync_outbox_id_seq for the id,
-- and nothing else (SPEC 1.1). The insert trigger that derives ordering keys reads
-- sync_outbox_ordering_rules, and ran as the inserting role: a role without SELECT on
-- that table got "permission denied for table sync_outbox_ordering_rules", and one
-- whose search_path leaves out the outbox's schema got "relation does not exist",
-- for every insert, whatever its entity type. The function now runs as its owner (the
-- role that ran `serversync migrate`), with its search_path pinned to pg_catalog and
-- the outbox's schema, so that no object of the inserting role's can stand in for
-- one it uses. A later migration that replaces the function must say SECURITY
-- DEFINER and SET search_path again.
DO $$
DECLARE
    outbox_schema text := (
        SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.oid = 'sync_outbox'::regclass
    );
BEGIN
    EXECUTE format(
        'ALTER FUNCTION %I.sync_outbox_derive_ordering_key() SECURITY DEFINER SET search_path = pg_catalog, %I',
        outbox_schema, outbox_schema
    );
END
$$;
