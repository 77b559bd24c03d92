-- serversync schema, PostgreSQL.
--
-- sync_outbox holds only rows that still have to be delivered: a delivered row is
-- moved to sync_outbox_sent (or deleted, retention.delete_sent) and a dead row to
-- sync_outbox_dead_letters, each in the transaction that settles it. Keeping the
-- queue table small keeps the claim query on a short index range however much
-- history is retained.

CREATE TABLE IF NOT EXISTS sync_outbox (
    id               bigserial PRIMARY KEY,
    entity_type      text        NOT NULL,
    entity_id        uuid        NOT NULL,
    payload          jsonb       NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    ordering_key     text        NULL,
    status           text        NOT NULL DEFAULT 'pending',
    attempts         int         NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    last_error_type  text        NULL,
    last_error       text        NULL,
    last_http_status int         NULL,
    -- history of every charged attempt: [{"attempt":1,"at":…,"errorType":…,…}]
    attempt_errors   jsonb       NOT NULL DEFAULT '[]'::jsonb,
    first_attempt_at timestamptz NULL,
    -- lease: who holds the row and until when. claim_token changes on every
    -- claim; every settle is fenced on it.
    claim_token      bigint      NULL,
    lease_owner      text        NULL,
    lease_until      timestamptz NULL
) WITH (
    -- claims and retries update only unindexed columns: leave room for HOT updates
    fillfactor = 80,
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_insert_scale_factor = 0.05,
    autovacuum_analyze_scale_factor = 0.05,
    autovacuum_vacuum_cost_delay = 0
);

-- Head-of-key lookups for per-key ordering ("is there an older row of my key?").
CREATE INDEX IF NOT EXISTS sync_outbox_ordering_key_id
    ON sync_outbox (ordering_key, id) WHERE ordering_key IS NOT NULL;

-- Delivered records, kept for retention.sent_ttl.
CREATE TABLE IF NOT EXISTS sync_outbox_sent (
    id          bigint      PRIMARY KEY,
    entity_type text        NOT NULL,
    entity_id   uuid        NOT NULL,
    created_at  timestamptz NOT NULL,
    sent_at     timestamptz NOT NULL DEFAULT now(),
    attempts    int         NOT NULL
) WITH (autovacuum_vacuum_insert_scale_factor = 0.05);
CREATE INDEX IF NOT EXISTS sync_outbox_sent_sent_at ON sync_outbox_sent (sent_at);

CREATE TABLE IF NOT EXISTS sync_outbox_dead_letters (
    id               bigserial   PRIMARY KEY,
    outbox_id        bigint      NOT NULL,
    entity_type      text        NOT NULL,
    entity_id        uuid        NOT NULL,
    payload          jsonb       NOT NULL,
    ordering_key     text        NULL,
    created_at       timestamptz NOT NULL,
    error_type       text        NOT NULL,
    http_status      int         NULL,
    error_message    text        NOT NULL,
    response_body    text        NULL,
    attempts         int         NOT NULL,
    max_attempts     int         NOT NULL,
    attempt_errors   jsonb       NOT NULL DEFAULT '[]'::jsonb,
    first_attempt_at timestamptz NULL,
    last_attempt_at  timestamptz NULL,
    dead_at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS sync_outbox_dead_letters_error_type ON sync_outbox_dead_letters (error_type);
CREATE INDEX IF NOT EXISTS sync_outbox_dead_letters_dead_at ON sync_outbox_dead_letters (dead_at);

-- How an ordering key is derived when a producer leaves ordering_key null.
-- source is 'entity_id' or 'payload.<field>'. serversync writes this table from its
-- [ordering] configuration at start-up; the defaults below put a call's log,
-- recording and file under one key (the call id).
CREATE TABLE IF NOT EXISTS sync_outbox_ordering_rules (
    entity_type text PRIMARY KEY,
    source      text NOT NULL CHECK (source = 'entity_id' OR source LIKE 'payload.%')
);
INSERT INTO sync_outbox_ordering_rules (entity_type, source) VALUES
    ('call_log', 'entity_id'),
    ('recording', 'payload.callLogId'),
    ('recording_file', 'payload.callLogId')
ON CONFLICT (entity_type) DO NOTHING;

CREATE OR REPLACE FUNCTION sync_outbox_derive_ordering_key() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    src text;
BEGIN
    IF NEW.ordering_key IS NULL THEN
        SELECT r.source INTO src FROM sync_outbox_ordering_rules r WHERE r.entity_type = NEW.entity_type;
        IF src = 'entity_id' THEN
            NEW.ordering_key := NEW.entity_id::text;
        ELSIF src LIKE 'payload.%' AND jsonb_typeof(NEW.payload) = 'object' THEN
            NEW.ordering_key := NEW.payload ->> substr(src, 9);
        END IF;
    END IF;
    RETURN NEW;
END
$$;

DROP TRIGGER IF EXISTS sync_outbox_derive_ordering_key ON sync_outbox;
CREATE TRIGGER sync_outbox_derive_ordering_key
    BEFORE INSERT ON sync_outbox
    FOR EACH ROW EXECUTE FUNCTION sync_outbox_derive_ordering_key();

-- Wake relays within milliseconds of a commit. One notification per statement (and
-- PostgreSQL folds identical notifications of one transaction into one), delivered
-- at commit. Turn off with: ALTER TABLE sync_outbox DISABLE TRIGGER sync_outbox_notify;
CREATE OR REPLACE FUNCTION sync_outbox_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('sync_outbox', '');
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS sync_outbox_notify ON sync_outbox;
CREATE TRIGGER sync_outbox_notify
    AFTER INSERT ON sync_outbox
    FOR EACH STATEMENT EXECUTE FUNCTION sync_outbox_notify();
