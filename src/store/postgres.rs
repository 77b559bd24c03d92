//! PostgreSQL backend: claims with `FOR UPDATE SKIP LOCKED` in one short statement,
//! settles a whole batch in one transaction of at most three array statements.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde_json::value::RawValue;
use sqlx::migrate::Migrator;
use sqlx::postgres::PgPool;
use sqlx::ConnectOptions as _;
use sqlx::Connection;
use sqlx::Row;
use uuid::Uuid;

use super::{
    millis, Backlog, Claim, ClaimedRow, DeadLetter, DlqFilter, DlqSelection, Held, KeyShare,
    NewRow, SchemaState, Status, Want,
};
use connect::connect_one;

mod admin;
mod connect;
mod listen;
mod settle;

pub use listen::{Notifications, Wake};

static MIGRATOR: Migrator = sqlx::migrate!("migrations/postgres");

/// The channel the insert trigger notifies.
const CHANNEL: &str = "sync_outbox";

#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
}

/// Candidates are the oldest due, unleased rows that are the head of their ordering
/// key (no older row of the same key is still in the outbox, in flight or not).
/// The head-of-key probe looks up `ordering_key_hash`, the key's 64-bit hash (a
/// generated column), in an index-only scan: 8-byte comparisons in an index a third
/// the size of one on the text key, whatever the database's collation (the probe is
/// most of what ordering costs: docs/BENCHMARKS.md). Two keys with one hash are only
/// ordered behind each other. Planned with statistics that say the outbox is empty
/// (a vacuum in a quiet moment), the probe can be served from the primary key
/// instead, walking every older row: a burst of 20,000 rows then made claims take
/// 10 s and more. A claim that slow makes the relay `ANALYZE` the outbox
/// (`Relay::refresh_statistics_after`). A generic plan cached while the outbox had
/// no pages was worse still (a scan of the table per probe); the relay's sessions
/// cache none (`connect::session_settings`). (Writing the probe as a row comparison on
/// `(ordering_key_hash, id)`, which only that index serves, cost 2–9 % more
/// PostgreSQL CPU per row in `bench ordering`; docs/BENCHMARKS.md.)
/// The lease runs from the claim's end (`clock_timestamp()`, not the transaction's
/// start): a claim slowed down by the database still gets a whole lease.
/// SKIP LOCKED lets concurrent relays take disjoint batches without waiting.
/// The update finds the locked rows by `ctid` (a TID scan) instead of a primary-key
/// descent per row: 14 % fewer buffers per claim. That is safe because the CTE's row
/// lock pins the newest version, whose `ctid` it returns, until the statement's
/// transaction ends; a stale `ctid` would only match nothing (a shorter claim).
/// `$5`/`$6` bound the claim to a share of the ordering keys (`KeyShare`), or are null.
/// `$7` is where the scan starts (a claim lane's cursor, `relay/lanes.rs`; 0 for the
/// whole queue), an index condition on the primary key, not a filter; the head-of-key
/// check is not bounded by it.
/// The claim's own commit does not wait for the WAL flush (`set_config(…, true)` lasts
/// until the statement's transaction ends, and is read at its commit): losing a claim
/// in a server crash only unleases its rows, and any later commit of the relay that
/// waits for the flush (a settle) flushes the claim first, the WAL being written in
/// order. +14 % rows/s (median of six interleaved 300,000-row drains, docs/BENCHMARKS.md).
/// `$8` bounds the claim's payload bytes as stored (`pg_column_size`: compressed when
/// large), oldest rows first and at least one row; the candidates left out stay
/// unleased (their row locks end with the statement). `candidates` says whether
/// `$1` rows were claimable, whatever the bound left out: a backlog. Free in
/// pgbench (the window sorts at most `$1` rows), where measuring the payloads' text
/// cost 10–20 % of the rows/s.
const CLAIM_SQL: &str = r#"
WITH cand AS (
    SELECT o.ctid, o.id, pg_column_size(o.payload) AS size FROM sync_outbox o
    WHERE o.next_attempt_at <= now()
      AND (o.lease_until IS NULL OR o.lease_until < now())
      AND ($5::bigint IS NULL OR hashtext(COALESCE(o.ordering_key, o.id::text)) >= $5)
      AND ($6::bigint IS NULL OR hashtext(COALESCE(o.ordering_key, o.id::text)) < $6)
      AND (o.ordering_key_hash IS NULL OR NOT EXISTS (
            SELECT 1 FROM sync_outbox p
            WHERE p.ordering_key_hash = o.ordering_key_hash AND p.id < o.id))
      AND o.id >= $7
      AND ($9::text[] IS NULL OR o.entity_type <> ALL($9))
    ORDER BY o.id
    LIMIT $1
    FOR UPDATE SKIP LOCKED
), within AS (
    SELECT ctid FROM (
        SELECT ctid, size, sum(size) OVER (ORDER BY id ROWS UNBOUNDED PRECEDING) AS running
        FROM cand
    ) c
    WHERE running <= $8 OR running = size
)
UPDATE sync_outbox o
SET claim_token = $2, lease_owner = $3,
    lease_until = clock_timestamp() + $4 * interval '1 millisecond'
WHERE o.ctid = ANY(ARRAY(SELECT ctid FROM within))
  AND (SELECT set_config('synchronous_commit', 'off', true)) IS NOT NULL
RETURNING o.id, o.entity_type, o.entity_id, o.payload::text AS payload,
          CASE WHEN o.created_at > '-infinity' AND o.created_at < '262000-01-01+00'
               THEN o.created_at END AS created_at,
          o.attempts, o.ordering_key, (SELECT count(*) FROM cand) AS candidates
"#;

/// A sink's `down_since` as the relays and `status` show it: UTC, RFC 3339, seconds.
macro_rules! down_since_utc {
    () => {
        "to_char(down_since AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')"
    };
}

impl PgStore {
    /// `EXPLAIN (options)` of the very claim statement the relay runs, as a claim
    /// lane makes it while a backlog drains: `limit` rows from `share` of the keys,
    /// from the oldest row (for the benchmark and the plan test). `options` is
    /// EXPLAIN's option list, e.g. `ANALYZE, BUFFERS`, written by the caller, never
    /// taken from input. The statement runs in a transaction that is rolled back, so
    /// `ANALYZE` leases nothing.
    pub async fn explain_claim(
        pool: &PgPool,
        options: &str,
        limit: u32,
        share: Option<KeyShare>,
    ) -> anyhow::Result<String> {
        let (lo, hi) = share.map_or((None, None), KeyShare::bounds);
        let sql = format!("EXPLAIN ({options}) {CLAIM_SQL}");
        // bound like the relay's claim of `limit` rows in batches of 100, 512 KiB each
        let max_bytes = i64::from(limit.div_ceil(100)) * 512 * 1024;
        let mut tx = pool.begin().await?;
        let lines: Vec<String> = sqlx::query_scalar(&sql)
            .bind(i64::from(limit))
            .bind(0_i64)
            .bind("explain")
            .bind(60_000_i64)
            .bind(lo)
            .bind(hi)
            .bind(0_i64)
            .bind(max_bytes)
            .bind(None::<Vec<String>>)
            .fetch_all(&mut *tx)
            .await
            .context("EXPLAIN of the claim")?;
        tx.rollback().await?;
        Ok(lines.join("\n"))
    }

    /// `ANALYZE sync_outbox`, giving up after a second's wait for a lock (another
    /// analyze or a vacuum running, a migration) rather than holding its caller.
    pub async fn analyze_outbox(&self) -> anyhow::Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET LOCAL lock_timeout = '1s'")
            .execute(&mut *tx)
            .await?;
        sqlx::query("SET LOCAL statement_timeout = '60s'")
            .execute(&mut *tx)
            .await?;
        sqlx::query("ANALYZE sync_outbox").execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn ping(&self) -> anyhow::Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// On a connection of its own whose commits wait for the flush whatever the pool's
    /// sessions do: a relay started with `--migrate` must not go on against a schema
    /// that a server crash could take back. The connection is closed afterwards.
    /// Without sqlx's statement logs: a slow statement would be logged with the
    /// whole migration's SQL (`Store::migrate` says how long it took instead).
    pub async fn migrate(&self) -> anyhow::Result<()> {
        let options = (*self.pool.connect_options())
            .clone()
            .disable_statement_logging();
        let wait = self.pool.options().get_acquire_timeout();
        let mut conn = connect_one(&options, wait)
            .await
            .context("connecting to migrate")?;
        sqlx::query("SET synchronous_commit = on")
            .execute(&mut conn)
            .await?;
        MIGRATOR
            .run(&mut conn)
            .await
            .context("applying migrations")?;
        let _ = conn.close().await;
        Ok(())
    }

    /// A setting as the pool's sessions see it (`SHOW`), for diagnostics and tests.
    pub async fn session_setting(&self, name: &str) -> anyhow::Result<String> {
        let value: String = sqlx::query_scalar("SELECT current_setting($1)")
            .bind(name)
            .fetch_one(&self.pool)
            .await?;
        Ok(value)
    }

    pub async fn schema_state(&self) -> anyhow::Result<SchemaState> {
        let exists: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
            .fetch_one(&self.pool)
            .await?;
        let applied: Vec<i64> = if exists {
            sqlx::query_scalar(
                "SELECT version FROM _sqlx_migrations WHERE success ORDER BY version",
            )
            .fetch_all(&self.pool)
            .await?
        } else {
            Vec::new()
        };
        Ok(super::compare_schema(
            MIGRATOR.iter().map(|m| m.version),
            &applied,
        ))
    }

    pub async fn set_ordering_rules(
        &self,
        rules: &BTreeMap<String, String>,
    ) -> anyhow::Result<BTreeMap<String, String>> {
        let mut tx = self.pool.begin().await?;
        // rules written at start-up stay written: a relay does not rewrite them after
        // a server crash, so this commit waits for the flush whatever the pool does
        sqlx::query("SET LOCAL synchronous_commit = on")
            .execute(&mut *tx)
            .await?;
        let before: Vec<(String, String)> =
            sqlx::query_as("SELECT entity_type, source FROM sync_outbox_ordering_rules")
                .fetch_all(&mut *tx)
                .await?;
        let (types, sources): (Vec<String>, Vec<String>) =
            rules.iter().map(|(k, v)| (k.clone(), v.clone())).unzip();
        sqlx::query("DELETE FROM sync_outbox_ordering_rules WHERE NOT (entity_type = ANY($1))")
            .bind(&types)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO sync_outbox_ordering_rules (entity_type, source) \
             SELECT * FROM unnest($1::text[], $2::text[]) \
             ON CONFLICT (entity_type) DO UPDATE SET source = excluded.source \
             WHERE sync_outbox_ordering_rules.source IS DISTINCT FROM excluded.source",
        )
        .bind(&types)
        .bind(&sources)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(before.into_iter().collect())
    }

    pub async fn claim(
        &self,
        token: i64,
        want: Want<'_>,
        lease: Duration,
        owner: &str,
        share: Option<KeyShare>,
        from_id: i64,
    ) -> anyhow::Result<Claim> {
        let (lo, hi) = share.map_or((None, None), KeyShare::bounds);
        let rows = sqlx::query(CLAIM_SQL)
            .bind(i64::from(want.rows))
            .bind(token)
            .bind(owner)
            .bind(millis(lease))
            .bind(lo)
            .bind(hi)
            .bind(from_id)
            .bind(i64::try_from(want.bytes).unwrap_or(i64::MAX))
            .bind((!want.skip_types.is_empty()).then_some(want.skip_types))
            .fetch_all(&self.pool)
            .await?;
        let candidates: i64 = match rows.first() {
            Some(row) => row.try_get(7)?,
            None => 0,
        };
        let mut claimed = Vec::with_capacity(rows.len());
        // by position, in CLAIM_SQL's RETURNING order (no column lookup by name per row)
        for row in rows {
            let payload: String = row.try_get(3)?;
            // null: `infinity`, or a year past what the wire's time type holds (a
            // decode would panic); the row is dead-lettered, not claimed for ever
            let created_at: Option<DateTime<Utc>> = row.try_get(4)?;
            // a count a producer set below zero counts from 0 (the settles write it
            // so), not from 2^31 attempts below the limit
            let attempts: i32 = row.try_get(5)?;
            claimed.push(ClaimedRow {
                id: row.try_get(0)?,
                entity_type: row.try_get(1)?,
                entity_id: row.try_get(2)?,
                payload: RawValue::from_string(payload)?,
                created_at: created_at.unwrap_or(DateTime::UNIX_EPOCH),
                attempts: attempts.max(0),
                ordering_key: row.try_get(6)?,
                defect: created_at.is_none().then(|| {
                    "created_at is not a time that can be sent (infinity, or past the \
                     year 262000)"
                        .to_string()
                }),
            });
        }
        claimed.sort_unstable_by_key(|r| r.id);
        Ok(Claim {
            token,
            rows: claimed,
            full: candidates >= i64::from(want.rows),
        })
    }

    pub async fn renew(
        &self,
        held: &Held,
        lease: Duration,
    ) -> anyhow::Result<std::collections::HashSet<i64>> {
        let renewed: Vec<i64> = sqlx::query_scalar(
            "UPDATE sync_outbox SET lease_until = clock_timestamp() + $3 * interval '1 millisecond' \
             WHERE id = ANY($1) AND claim_token = ANY($2) RETURNING id",
        )
        .bind(&held.ids)
        .bind(&held.tokens)
        .bind(millis(lease))
        .fetch_all(&self.pool)
        .await?;
        Ok(renewed.into_iter().collect())
    }

    pub async fn release(&self, held: &Held) -> anyhow::Result<u64> {
        let done = sqlx::query(
            "UPDATE sync_outbox SET claim_token = NULL, lease_owner = NULL, lease_until = NULL \
             WHERE id = ANY($1) AND claim_token = ANY($2)",
        )
        .bind(&held.ids)
        .bind(&held.tokens)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }
}

impl PgStore {
    async fn dead_by_type(&self) -> anyhow::Result<BTreeMap<String, i64>> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT error_type, count(*) FROM sync_outbox_dead_letters GROUP BY error_type",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().collect())
    }

    /// The backlog gauges, refreshed on an interval. Counts are exact up to `cap`
    /// pending rows (`metrics.backlog_exact_rows`); past that only `cap` rows are counted
    /// (by entity type) and scaled to the table's live-row count from the statistics
    /// collector, so a refresh never scans a backlog of millions.
    pub async fn backlog(&self, cap: i64) -> anyhow::Result<Backlog> {
        let mut pending: Vec<(String, i64)> = sqlx::query_as(
            "SELECT entity_type, count(*) FROM (SELECT entity_type FROM sync_outbox LIMIT $1) AS s \
             GROUP BY entity_type",
        )
        .bind(cap)
        .fetch_all(&self.pool)
        .await?;
        let counted: i64 = pending.iter().map(|(_, n)| n).sum();
        if counted >= cap {
            let live: Option<i64> = sqlx::query_scalar(
                "SELECT n_live_tup FROM pg_stat_user_tables WHERE relid = 'sync_outbox'::regclass",
            )
            .fetch_optional(&self.pool)
            .await?;
            if let Some(live) = live.filter(|l| *l > counted) {
                pending = scale_counts(pending, counted, live);
            }
        }
        // the oldest row by id is the oldest pending row; an index probe, not a scan
        let oldest: Option<f64> = sqlx::query_scalar::<_, Option<f64>>(
            "SELECT CASE WHEN isfinite(created_at) \
                    THEN EXTRACT(EPOCH FROM now() - created_at)::float8 END \
             FROM sync_outbox ORDER BY id LIMIT 1",
        )
        .fetch_optional(&self.pool)
        .await?
        .flatten();
        Ok(Backlog {
            pending_by_entity_type: pending.into_iter().collect(),
            oldest_pending_age_seconds: oldest.unwrap_or(0.0).max(0.0),
            dead_letters_by_error_type: self.dead_by_type().await?,
        })
    }

    /// Rows due now plus the rows `owner` holds, in one snapshot (`Store`'s).
    pub async fn count_due_or_held_by(&self, owner: &str) -> anyhow::Result<i64> {
        Ok(sqlx::query_scalar(
            "SELECT count(*) FROM sync_outbox WHERE lease_owner = $1 \
             OR (next_attempt_at <= now() AND (lease_until IS NULL OR lease_until < now()))",
        )
        .bind(owner)
        .fetch_one(&self.pool)
        .await?)
    }

    /// Whether any row is in the outbox at all (due, waiting or in flight).
    pub async fn has_pending(&self) -> anyhow::Result<bool> {
        Ok(
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM sync_outbox)")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    pub async fn prune_sent(&self, ttl: Duration, batch: u32) -> anyhow::Result<u64> {
        let done = sqlx::query(
            "DELETE FROM sync_outbox_sent WHERE id IN ( \
                SELECT id FROM sync_outbox_sent \
                WHERE sent_at < now() - $1 * interval '1 millisecond' \
                ORDER BY sent_at LIMIT $2)",
        )
        .bind(millis(ttl))
        .bind(i64::from(batch))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    /// When `sink` was taken as down, if it is (and, with `within`, was taken so
    /// within that long).
    pub async fn sink_down_since(
        &self,
        sink: &str,
        within: Option<Duration>,
    ) -> anyhow::Result<Option<String>> {
        let since: Option<Option<String>> = sqlx::query_scalar(concat!(
            "SELECT ",
            down_since_utc!(),
            " FROM sync_outbox_sink_state WHERE sink = $1 \
             AND ($2::bigint IS NULL OR down_since > now() - $2 * interval '1 millisecond')"
        ))
        .bind(sink)
        .bind(within.map(millis))
        .fetch_optional(&self.pool)
        .await?;
        Ok(since.flatten())
    }

    pub async fn sinks_down(&self) -> anyhow::Result<Vec<(String, String)>> {
        Ok(sqlx::query_as(concat!(
            "SELECT sink, ",
            down_since_utc!(),
            " FROM sync_outbox_sink_state WHERE down_since IS NOT NULL ORDER BY sink"
        ))
        .fetch_all(&self.pool)
        .await?)
    }

    pub async fn set_sink_down(&self, sink: &str, down: bool) -> anyhow::Result<()> {
        sqlx::query(
            "INSERT INTO sync_outbox_sink_state (sink, down_since, updated_at) \
             VALUES ($1, CASE WHEN $2 THEN now() END, now()) \
             ON CONFLICT (sink) DO UPDATE SET updated_at = now(), down_since = \
                 CASE WHEN $2 THEN COALESCE(sync_outbox_sink_state.down_since, now()) END",
        )
        .bind(sink)
        .bind(down)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

/// Spread `total` over entity types in the proportions of a count of `counted` rows.
fn scale_counts(counts: Vec<(String, i64)>, counted: i64, total: i64) -> Vec<(String, i64)> {
    counts
        .into_iter()
        .map(|(t, n)| {
            let scaled = (n as f64 / counted.max(1) as f64 * total as f64).round() as i64;
            (t, scaled)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::scale_counts;

    #[test]
    fn backlog_estimates_keep_the_proportions_of_the_counted_rows() {
        let counted = vec![
            ("call_log".to_string(), 750),
            ("recording".to_string(), 250),
        ];
        assert_eq!(
            scale_counts(counted, 1_000, 4_000_000),
            vec![
                ("call_log".to_string(), 3_000_000),
                ("recording".to_string(), 1_000_000)
            ]
        );
    }
}
