-- Whether an ingest sink is taken as down, shared by every relay process: a relay
-- that starts while the sink is known to be down probes it first instead of charging
-- rows attempts until it has seen the outage threshold itself.
CREATE TABLE IF NOT EXISTS sync_outbox_sink_state (
    sink        TEXT PRIMARY KEY,   -- ingest.base_url
    down_since  TEXT NULL,          -- NULL: up
    updated_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
