//! PostgreSQL backend: claims with `FOR UPDATE SKIP LOCKED` in one short statement,
//! settles a whole batch in one transaction of at most three array statements.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde_json::value::RawValue;
use sqlx::migrate::Migrator;
use std::str::FromStr;

use sqlx::postgres::{PgConnectOptions, PgConnection, PgListener, PgPool, PgPoolOptions};
use sqlx::ConnectOptions as _;
use sqlx::Connection;
use sqlx::Row;
use uuid::Uuid;

use super::{
    millis, tally, Backlog, Claim, ClaimedRow, ConnectOptions, DeadLetter, DlqFilter, DlqSelection,
    Held, KeyShare, NewRow, SchemaState, SettleReport, Settlement, Status, Want,
};

mod admin;

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
/// (`Relay::refresh_statistics_after`). (Writing the probe as a row comparison on
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

/// The connection parameters sqlx reads from a URL's query (and `options[…]`); it
/// ignores any other, with a warning that quotes its value (a misspelt `passwd=`
/// would be logged).
const KNOWN_PARAMETERS: [&str; 18] = [
    "sslmode",
    "ssl-mode",
    "sslrootcert",
    "ssl-root-cert",
    "ssl-ca",
    "sslcert",
    "ssl-cert",
    "sslkey",
    "ssl-key",
    "statement-cache-capacity",
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "application_name",
    "options",
];

/// `url` without the query parameters sqlx would ignore (all but
/// `KNOWN_PARAMETERS`), each named in a warning without its value.
fn without_unknown_parameters(url: &str) -> String {
    let Ok(mut parsed) = reqwest::Url::parse(url) else {
        return url.to_string();
    };
    if parsed.query().is_none() {
        return url.to_string();
    }
    let known = |key: &str| KNOWN_PARAMETERS.contains(&key) || key.starts_with("options[");
    let pairs: Vec<(String, String)> = parsed
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    if pairs.iter().all(|(key, _)| known(key)) {
        return url.to_string();
    }
    for (key, _) in pairs.iter().filter(|(key, _)| !known(key)) {
        tracing::warn!(
            parameter = %key,
            "ignoring an unrecognized connection parameter of database.url (its value is not shown)"
        );
    }
    parsed
        .query_pairs_mut()
        .clear()
        .extend_pairs(pairs.iter().filter(|(key, _)| known(key)));
    if parsed.query() == Some("") {
        parsed.set_query(None);
    }
    parsed.to_string()
}

/// The archive statement: sent rows leave the outbox (fenced on the claim token) and
/// their records go to `sync_outbox_sent`, followed by `$tail`; it returns the ids it
/// archived (as every settle statement does: the rest had lost their lease). One
/// text for both forms below, so that they cannot drift apart.
macro_rules! sent_archive_sql {
    ($tail:literal) => {
        concat!(
            r#"
WITH d AS (
    DELETE FROM sync_outbox WHERE id = ANY($1) AND claim_token = $2
    RETURNING id, entity_type, entity_id, created_at, attempts
), a AS (
INSERT INTO sync_outbox_sent (id, entity_type, entity_id, created_at, attempts)
SELECT id, entity_type, entity_id, created_at, GREATEST(LEAST(attempts, 2147483646), 0) + 1 FROM d
"#,
            $tail,
            "RETURNING id) SELECT array_agg(id) FROM a"
        )
    };
}

/// Sent rows move to the archive with a plain `INSERT`: an id is normally archived
/// once, and `ON CONFLICT` (a speculative insertion per row) cost the database 5–12 %
/// more CPU per row in pgbench (docs/BENCHMARKS.md). An id can be archived already
/// only when the outbox's sequence went back (`TRUNCATE … RESTART IDENTITY`, a
/// restore) while its records were kept: the unique violation that follows rolls the
/// settle back, and `settle` runs it again with `SENT_ARCHIVE_UPSERT_SQL`.
const SENT_ARCHIVE_SQL: &str = sent_archive_sql!("");

/// The archive for ids whose records are there already: the newer delivery's record
/// replaces the older.
const SENT_ARCHIVE_UPSERT_SQL: &str = sent_archive_sql!(
    "ON CONFLICT (id) DO UPDATE SET entity_type = excluded.entity_type,
    entity_id = excluded.entity_id, created_at = excluded.created_at,
    sent_at = excluded.sent_at, attempts = excluded.attempts
"
);

const SENT_DELETE_SQL: &str =
    "WITH d AS (DELETE FROM sync_outbox WHERE id = ANY($1) AND claim_token = $2 \
    RETURNING id) SELECT array_agg(id) FROM d";

const RETRY_SQL: &str = r#"
WITH r AS (
UPDATE sync_outbox o SET
    attempts = GREATEST(LEAST(o.attempts, 2147483646), 0) + CASE WHEN u.charged THEN 1 ELSE 0 END,
    next_attempt_at = now() + u.delay_ms * interval '1 millisecond',
    last_error_type = u.error_type,
    last_error = u.message,
    last_http_status = u.http_status,
    attempt_errors = CASE WHEN u.charged THEN o.attempt_errors || jsonb_build_array(u.entry) ELSE o.attempt_errors END,
    first_attempt_at = CASE WHEN u.charged THEN COALESCE(o.first_attempt_at, now()) ELSE o.first_attempt_at END,
    claim_token = NULL, lease_owner = NULL, lease_until = NULL
FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[], $5::int[], $6::bool[], $7::jsonb[])
    AS u(id, delay_ms, error_type, message, http_status, charged, entry)
WHERE o.id = u.id AND o.claim_token = $8
RETURNING o.id
) SELECT array_agg(id) FROM r
"#;

const DEAD_SQL: &str = r#"
WITH u AS (
    SELECT * FROM unnest($1::bigint[], $2::text[], $3::int[], $4::text[], $5::text[], $6::jsonb[], $7::int[])
        AS u(id, error_type, http_status, message, response_body, entry, max_attempts)
), d AS (
    DELETE FROM sync_outbox o USING u
    WHERE o.id = u.id AND o.claim_token = $8
    RETURNING o.id, o.entity_type, o.entity_id, o.payload, o.ordering_key, o.created_at, o.attempts,
              o.attempt_errors, o.first_attempt_at,
              u.error_type, u.http_status, u.message, u.response_body, u.entry, u.max_attempts
), a AS (
INSERT INTO sync_outbox_dead_letters
    (outbox_id, entity_type, entity_id, payload, ordering_key, created_at, error_type, http_status,
     error_message, response_body, attempts, max_attempts, attempt_errors, first_attempt_at, last_attempt_at)
SELECT id, entity_type, entity_id, payload, ordering_key, created_at, error_type, http_status,
       message, response_body, GREATEST(LEAST(attempts, 2147483646), 0) + 1, max_attempts, attempt_errors || jsonb_build_array(entry),
       COALESCE(first_attempt_at, now()), now()
FROM d
RETURNING outbox_id
) SELECT array_agg(outbox_id) FROM a
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

    pub async fn connect(url: &str, options: &ConnectOptions) -> anyhow::Result<PgStore> {
        let synchronous_commit = options.synchronous_commit;
        let lock_timeout = options.lock_timeout;
        let url = without_unknown_parameters(url);
        let mut connect_options = PgConnectOptions::from_str(&url)?.application_name("serversync");
        if lock_timeout.is_some() {
            // an operator's command: a statement held up by a lock ends in one line
            // saying so, which sqlx's slow-statement warning, with the statement's
            // whole SQL, would come before
            connect_options = connect_options.disable_statement_logging();
        }
        // One direct connection first: a pool would retry until its timeout and
        // report only "timed out", hiding the cause (refused, auth, unknown db).
        let probe = connect_one(&connect_options, options.acquire_timeout).await?;
        let _ = probe.close().await;
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections)
            .acquire_timeout(options.acquire_timeout)
            .after_connect(move |conn, _| {
                Box::pin(
                    async move { session_settings(conn, synchronous_commit, lock_timeout).await },
                )
            })
            .connect_lazy_with(connect_options);
        Ok(PgStore { pool })
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

    /// One transaction; when only one statement is needed (the common case: every
    /// row sent) it runs alone, a statement being atomic by itself, which saves the
    /// BEGIN and COMMIT round trips.
    pub async fn settle(&self, s: &Settlement, keep_sent: bool) -> anyhow::Result<SettleReport> {
        let archive = if keep_sent {
            Archive::Insert
        } else {
            Archive::None
        };
        match self.settle_with(s, archive).await {
            Err(e) if keep_sent && is_archived_already(&e) => {
                tracing::warn!(
                    "delivered rows' ids are in sync_outbox_sent already (the outbox's id \
                     sequence went back?): their records are replaced"
                );
                self.settle_with(s, Archive::Upsert).await
            }
            other => other,
        }
    }

    async fn settle_with(&self, s: &Settlement, archive: Archive) -> anyhow::Result<SettleReport> {
        let parts = [
            !s.sent.is_empty(),
            !s.retries.is_empty(),
            !s.dead.is_empty(),
        ]
        .iter()
        .filter(|p| **p)
        .count();
        if parts > 1 {
            let mut tx = self.pool.begin().await?;
            let report = write_settlement(&mut tx, s, archive).await?;
            tx.commit().await?;
            Ok(report)
        } else {
            let mut conn = self.pool.acquire().await?;
            write_settlement(&mut conn, s, archive).await
        }
    }
}

/// How a settle removes its sent rows from the outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Archive {
    /// `retention.delete_sent`: no record kept.
    None,
    /// Into `sync_outbox_sent`, ids new there (the common case).
    Insert,
    /// Into `sync_outbox_sent`, replacing records of the same ids.
    Upsert,
}

/// Whether a settle failed on a unique violation: a sent row's id in
/// `sync_outbox_sent` already (`sync_outbox_sent_pkey`), the only unique key an
/// archiving settle can collide on. Not matched by the constraint's name, which a
/// pooler or a renamed constraint may not report: were the violation another one, the
/// settle with the upsert fails again and its error is the one reported.
fn is_archived_already(e: &anyhow::Error) -> bool {
    super::is_unique_violation(e)
}

async fn write_settlement(
    conn: &mut sqlx::PgConnection,
    s: &Settlement,
    archive: Archive,
) -> anyhow::Result<SettleReport> {
    let mut report = SettleReport::default();
    if !s.sent.is_empty() {
        let sql = match archive {
            Archive::None => SENT_DELETE_SQL,
            Archive::Insert => SENT_ARCHIVE_SQL,
            Archive::Upsert => SENT_ARCHIVE_UPSERT_SQL,
        };
        let written: Option<Vec<i64>> = sqlx::query_scalar(sql)
            .bind(&s.sent)
            .bind(s.token)
            .fetch_one(&mut *conn)
            .await?;
        report.sent = tally(
            &mut report.lost,
            s.sent.iter().copied(),
            &written.unwrap_or_default(),
        );
    }
    if !s.retries.is_empty() {
        let r = &s.retries;
        let written: Option<Vec<i64>> = sqlx::query_scalar(RETRY_SQL)
            .bind(r.iter().map(|x| x.id).collect::<Vec<_>>())
            .bind(r.iter().map(|x| millis(x.delay)).collect::<Vec<_>>())
            .bind(
                r.iter()
                    .map(|x| x.error.error_type.clone())
                    .collect::<Vec<_>>(),
            )
            .bind(
                r.iter()
                    .map(|x| x.error.message.clone())
                    .collect::<Vec<_>>(),
            )
            .bind(r.iter().map(|x| x.error.http_status).collect::<Vec<_>>())
            .bind(r.iter().map(|x| x.charged).collect::<Vec<_>>())
            .bind(
                r.iter()
                    .map(|x| x.error.history_entry.clone())
                    .collect::<Vec<_>>(),
            )
            .bind(s.token)
            .fetch_one(&mut *conn)
            .await?;
        report.retried = tally(
            &mut report.lost,
            r.iter().map(|x| x.id),
            &written.unwrap_or_default(),
        );
    }
    if !s.dead.is_empty() {
        let d = &s.dead;
        let written: Option<Vec<i64>> = sqlx::query_scalar(DEAD_SQL)
            .bind(d.iter().map(|x| x.id).collect::<Vec<_>>())
            .bind(
                d.iter()
                    .map(|x| x.error.error_type.clone())
                    .collect::<Vec<_>>(),
            )
            .bind(d.iter().map(|x| x.error.http_status).collect::<Vec<_>>())
            .bind(
                d.iter()
                    .map(|x| x.error.message.clone())
                    .collect::<Vec<_>>(),
            )
            .bind(
                d.iter()
                    .map(|x| x.error.response_body.clone())
                    .collect::<Vec<_>>(),
            )
            .bind(
                d.iter()
                    .map(|x| x.error.history_entry.clone())
                    .collect::<Vec<_>>(),
            )
            .bind(d.iter().map(|x| x.max_attempts).collect::<Vec<_>>())
            .bind(s.token)
            .fetch_one(&mut *conn)
            .await?;
        report.dead = tally(
            &mut report.lost,
            d.iter().map(|x| x.id),
            &written.unwrap_or_default(),
        );
    }
    Ok(report)
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

    pub async fn notifications(&self) -> anyhow::Result<Notifications> {
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen(CHANNEL).await?;
        Ok(Notifications { listener })
    }
}

/// Insert notifications. sqlx reconnects the listener by itself after a dropped
/// connection; notifications sent meanwhile are lost, which `next` reports.
pub struct Notifications {
    listener: PgListener,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// A row was committed.
    Inserted,
    /// The connection was re-established; notifications may have been missed.
    Reconnected,
}

impl Notifications {
    pub async fn next(&mut self) -> anyhow::Result<Wake> {
        match self.listener.try_recv().await? {
            Some(_) => Ok(Wake::Inserted),
            None => Ok(Wake::Reconnected),
        }
    }
}

/// Turn JIT compilation off for the relay's sessions. Its statements are short, but
/// the claim's estimated cost grows with the backlog and with how few rows look due
/// (a backlog mostly waiting for retries): past `jit_above_cost` every claim was
/// compiled, and a 600-row claim took 196 ms instead of 82 (docs/BENCHMARKS.md).
/// Unless `synchronous_commit`, also stop the session's commits waiting for the WAL
/// flush (`ConnectOptions::synchronous_commit`). `SET`s rather than startup options,
/// which poolers such as PgBouncer refuse; a server that refuses them too only keeps
/// its defaults.
async fn session_settings(
    conn: &mut PgConnection,
    synchronous_commit: bool,
    lock_timeout: Option<Duration>,
) -> Result<(), sqlx::Error> {
    if let Some(wait) = lock_timeout {
        let set = format!("SET lock_timeout = '{}ms'", wait.as_millis());
        if let Err(e) = sqlx::query(&set).execute(&mut *conn).await {
            tracing::debug!(error = %e, "cannot set lock_timeout for this session");
        }
    }
    if let Err(e) = sqlx::query("SET jit = off").execute(&mut *conn).await {
        tracing::debug!(error = %e, "cannot turn JIT off for this session");
    }
    if !synchronous_commit {
        if let Err(e) = sqlx::query("SET synchronous_commit = off")
            .execute(&mut *conn)
            .await
        {
            tracing::debug!(error = %e, "cannot turn synchronous_commit off for this session");
        }
    }
    Ok(())
}

/// sqlx's "error communicating with database: Connection refused (os error 111)" is
/// clear enough; only name the common cases more plainly.
/// One direct connection, waited for at most `wait`, its error described.
async fn connect_one(options: &PgConnectOptions, wait: Duration) -> anyhow::Result<PgConnection> {
    tokio::time::timeout(wait, PgConnection::connect_with(options))
        .await
        .map_err(|_| anyhow::anyhow!("timed out after {wait:?}"))?
        .map_err(describe_connect_error)
}

fn describe_connect_error(err: sqlx::Error) -> anyhow::Error {
    match &err {
        sqlx::Error::PoolTimedOut => anyhow::anyhow!("timed out waiting for a database connection"),
        _ => anyhow::Error::new(err),
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
