-- serversync schema, SQLite (embedded store, one relay instance).
-- Same tables and meaning as migrations/postgres; timestamps are RFC 3339 text in
-- UTC with milliseconds (strftime('%Y-%m-%dT%H:%M:%fZ')), which sorts as time.

CREATE TABLE IF NOT EXISTS sync_outbox (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    entity_type      TEXT    NOT NULL,
    entity_id        TEXT    NOT NULL,
    payload          TEXT    NOT NULL CHECK (json_valid(payload)),
    created_at       TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    ordering_key     TEXT    NULL,
    status           TEXT    NOT NULL DEFAULT 'pending',
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    last_error_type  TEXT    NULL,
    last_error       TEXT    NULL,
    last_http_status INTEGER NULL,
    attempt_errors   TEXT    NOT NULL DEFAULT '[]',
    first_attempt_at TEXT    NULL,
    claim_token      INTEGER NULL,
    lease_owner      TEXT    NULL,
    lease_until      TEXT    NULL
);
CREATE INDEX IF NOT EXISTS sync_outbox_ordering_key_id
    ON sync_outbox (ordering_key, id) WHERE ordering_key IS NOT NULL;

CREATE TABLE IF NOT EXISTS sync_outbox_sent (
    id          INTEGER PRIMARY KEY,
    entity_type TEXT    NOT NULL,
    entity_id   TEXT    NOT NULL,
    created_at  TEXT    NOT NULL,
    sent_at     TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    attempts    INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS sync_outbox_sent_sent_at ON sync_outbox_sent (sent_at);

CREATE TABLE IF NOT EXISTS sync_outbox_dead_letters (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    outbox_id        INTEGER NOT NULL,
    entity_type      TEXT    NOT NULL,
    entity_id        TEXT    NOT NULL,
    payload          TEXT    NOT NULL,
    ordering_key     TEXT    NULL,
    created_at       TEXT    NOT NULL,
    error_type       TEXT    NOT NULL,
    http_status      INTEGER NULL,
    error_message    TEXT    NOT NULL,
    response_body    TEXT    NULL,
    attempts         INTEGER NOT NULL,
    max_attempts     INTEGER NOT NULL,
    attempt_errors   TEXT    NOT NULL DEFAULT '[]',
    first_attempt_at TEXT    NULL,
    last_attempt_at  TEXT    NULL,
    dead_at          TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE INDEX IF NOT EXISTS sync_outbox_dead_letters_error_type ON sync_outbox_dead_letters (error_type);

CREATE TABLE IF NOT EXISTS sync_outbox_ordering_rules (
    entity_type TEXT PRIMARY KEY,
    source      TEXT NOT NULL CHECK (source = 'entity_id' OR source LIKE 'payload.%')
);
INSERT OR IGNORE INTO sync_outbox_ordering_rules (entity_type, source) VALUES
    ('call_log', 'entity_id'),
    ('recording', 'payload.callLogId'),
    ('recording_file', 'payload.callLogId');

CREATE TRIGGER IF NOT EXISTS sync_outbox_derive_ordering_key
AFTER INSERT ON sync_outbox
FOR EACH ROW WHEN NEW.ordering_key IS NULL
BEGIN
    UPDATE sync_outbox SET ordering_key = (
        SELECT CASE
            WHEN r.source = 'entity_id' THEN NEW.entity_id
            WHEN json_type(NEW.payload) = 'object'
                THEN json_extract(NEW.payload, '$.' || substr(r.source, 9))
        END
        FROM sync_outbox_ordering_rules r WHERE r.entity_type = NEW.entity_type
    ) WHERE id = NEW.id;
END;
