-- Whether an ingest sink is taken as down, shared by every relay process and
-- instance: a relay that starts (a `drain` from cron, a restart, a new instance)
-- while the sink is known to be down probes it first instead of charging rows
-- attempts until it has seen the outage threshold itself.
CREATE TABLE IF NOT EXISTS sync_outbox_sink_state (
    sink        text        PRIMARY KEY,   -- ingest.base_url
    down_since  timestamptz NULL,          -- NULL: up
    updated_at  timestamptz NOT NULL DEFAULT now()
);
