//! SQLite backend: the embedded store, one relay per database file. Same tables and
//! semantics as the PostgreSQL backend. SQLite has a single writer, so a claim needs no
//! SKIP LOCKED (its `BEGIN IMMEDIATE` transaction is the lock) and a settlement may run
//! per-row statements, which cost nothing in-process. A file lock keeps a second relay out.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions, TryLockError};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{bail, Context};
use backon::{ExponentialBuilder, Retryable};
use chrono::{DateTime, NaiveDateTime, Utc};
use serde_json::value::RawValue;
use sqlx::migrate::Migrator;
use sqlx::sqlite::{
    SqliteArguments, SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteRow, SqliteSynchronous,
};
use sqlx::ConnectOptions as _;
use sqlx::{Connection as _, Row, Sqlite, Transaction};
use uuid::Uuid;

use super::{
    millis, tally, Backlog, Claim, ClaimedRow, ConnectOptions, DeadLetter, DlqFilter, DlqSelection,
    Held, NewRow, SchemaState, SettleReport, Settlement, Status, Want,
};

static MIGRATOR: Migrator = sqlx::migrate!("migrations/sqlite");

/// SQLite's clock plus the milliseconds bound to parameter `$ms`, in the schema's one
/// timestamp format. Every timestamp we compare is written through this fragment (or
/// the identical column default), so comparing the text compares the times.
macro_rules! now_plus_ms {
    ($ms:literal) => {
        concat!(
            "strftime('%Y-%m-%dT%H:%M:%fZ', 'now', printf('%+.3f seconds', ",
            $ms,
            " / 1000.0))"
        )
    };
}

/// SQLite's clock, through the same fragment so the format cannot drift.
macro_rules! now {
    () => {
        now_plus_ms!("0")
    };
}

/// strftime gives NULL past the year 9999, which would break NOT NULL columns; no
/// lease, delay or age we are given is meaningfully longer than a century.
const MAX_OFFSET_MS: i64 = 100 * 366 * 24 * 3600 * 1000;

/// Candidates are the oldest due, unleased rows that are the head of their ordering
/// key (no older row of the same key is still in the outbox, in flight or not).
/// `?5` bounds the claim's payload bytes (at least one row); `candidates` says
/// whether `?1` rows were claimable, whatever the bound left out.
const CLAIM_SQL: &str = concat!(
    "WITH cand AS (SELECT o.id, COALESCE(length(CAST(o.payload AS BLOB)), 0) AS size \
     FROM sync_outbox o WHERE o.next_attempt_at <= ",
    now!(),
    " AND (o.lease_until IS NULL OR o.lease_until < ",
    now!(),
    ") AND (o.ordering_key IS NULL OR NOT EXISTS (SELECT 1 FROM sync_outbox p \
       WHERE p.ordering_key = o.ordering_key AND p.id < o.id)) \
       AND (?6 IS NULL OR o.entity_type NOT IN (SELECT value FROM json_each(?6))) \
     ORDER BY o.id LIMIT ?1) \
     UPDATE sync_outbox SET claim_token = ?2, lease_owner = ?3, lease_until = ",
    now_plus_ms!("?4"),
    " WHERE id IN (SELECT id FROM (SELECT id, size, \
       SUM(size) OVER (ORDER BY id ROWS UNBOUNDED PRECEDING) AS running FROM cand) \
       WHERE running <= ?5 OR running = size) \
     RETURNING id, entity_type, entity_id, payload, created_at, attempts, ordering_key, \
       (SELECT count(*) FROM cand) AS candidates"
);

/// `?1` is a JSON array of ids: SQLite has no array parameters, `json_each` stands in.
const SENT_ARCHIVE_SQL: &str =
    "INSERT INTO sync_outbox_sent (id, entity_type, entity_id, created_at, attempts) \
    SELECT id, entity_type, entity_id, created_at, MAX(MIN(attempts, 2147483646), 0) + 1 FROM sync_outbox \
    WHERE id IN (SELECT value FROM json_each(?1)) AND claim_token = ?2 \
    ON CONFLICT (id) DO UPDATE SET entity_type = excluded.entity_type, \
        entity_id = excluded.entity_id, created_at = excluded.created_at, \
        sent_at = excluded.sent_at, attempts = excluded.attempts";

const SENT_DELETE_SQL: &str =
    "DELETE FROM sync_outbox WHERE id IN (SELECT value FROM json_each(?1)) AND claim_token = ?2 \
    RETURNING id";

/// One retry: ?1 id, ?2 token, ?3 delay ms, ?4 error type, ?5 message, ?6 HTTP status,
/// ?7 charged, ?8 history entry (JSON text).
const RETRY_SQL: &str = concat!(
    "UPDATE sync_outbox SET attempts = MAX(MIN(attempts, 2147483646), 0) + CASE WHEN ?7 THEN 1 ELSE 0 END, \
     next_attempt_at = ",
    now_plus_ms!("?3"),
    ", last_error_type = ?4, last_error = ?5, last_http_status = ?6, \
     attempt_errors = CASE WHEN ?7 THEN json_insert(attempt_errors, '$[#]', json(?8)) ELSE attempt_errors END, \
     first_attempt_at = CASE WHEN ?7 THEN COALESCE(first_attempt_at, ",
    now!(),
    ") ELSE first_attempt_at END, claim_token = NULL, lease_owner = NULL, lease_until = NULL \
     WHERE id = ?1 AND claim_token = ?2"
);

/// One dead row: ?1 id, ?2 token, ?3 error type, ?4 HTTP status, ?5 message,
/// ?6 response body, ?7 history entry (JSON text), ?8 max attempts.
const DEAD_SQL: &str = concat!(
    "INSERT INTO sync_outbox_dead_letters (outbox_id, entity_type, entity_id, payload, ordering_key, \
       created_at, error_type, http_status, error_message, response_body, attempts, max_attempts, \
       attempt_errors, first_attempt_at, last_attempt_at) \
     SELECT id, entity_type, entity_id, payload, ordering_key, created_at, ?3, ?4, ?5, ?6, MAX(MIN(attempts, 2147483646), 0) + 1, ?8, \
       json_insert(attempt_errors, '$[#]', json(?7)), COALESCE(first_attempt_at, ",
    now!(),
    "), ",
    now!(),
    " FROM sync_outbox WHERE id = ?1 AND claim_token = ?2"
);

const DELETE_CLAIMED_SQL: &str = "DELETE FROM sync_outbox WHERE id = ?1 AND claim_token = ?2";

#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    /// The database file, for the relay lock; `None` for an in-memory database.
    path: Option<PathBuf>,
}

/// Held while a relay runs against a SQLite file: an exclusive OS lock on
/// `<dbfile>.relay.lock`, released when dropped (or when the process dies).
#[derive(Debug)]
pub struct RelayLock {
    _file: Option<File>,
}

impl SqliteStore {
    pub async fn connect(url: &str, options: &ConnectOptions) -> anyhow::Result<SqliteStore> {
        let memory = url.contains(":memory:") || url.contains("mode=memory");
        let mut connect = SqliteConnectOptions::from_str(url)
            .context("invalid SQLite URL")?
            .create_if_missing(options.create)
            .busy_timeout(Duration::from_secs(5))
            .synchronous(SqliteSynchronous::Normal);
        let file = connect.get_filename();
        let dir = file
            .parent()
            .filter(|d| !memory && !d.as_os_str().is_empty());
        if let Some(dir) = dir.filter(|d| !d.is_dir()) {
            // `migrate` creates the file, not the directories above it
            bail!("its directory {} does not exist", dir.display());
        }
        if !memory && !options.create && !file.exists() {
            bail!("the file does not exist; `serversync migrate` creates it");
        }
        let mut pool = SqlitePoolOptions::new().acquire_timeout(options.acquire_timeout);
        if memory {
            // An in-memory database lives as long as one connection to it does, and a
            // shared cache between connections fails with SQLITE_LOCKED instead of
            // waiting: keep exactly one connection, forever.
            pool = pool
                .max_connections(1)
                .min_connections(1)
                .idle_timeout(None)
                .max_lifetime(None);
        } else {
            // WAL lets readers (status, metrics) run while the relay writes.
            connect = connect.journal_mode(SqliteJournalMode::Wal);
            pool = pool.max_connections(options.max_connections.max(1));
        }
        let path = (!memory).then(|| connect.get_filename().to_path_buf());
        // A file being created, or switched to WAL, by another process at this moment
        // (every instance running `migrate` at start) answers SQLITE_BUSY at once,
        // without waiting out the busy timeout: open again in a moment.
        let pool = (|| pool.clone().connect_with(connect.clone()))
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(20))
                    .with_max_delay(Duration::from_millis(500))
                    .with_max_times(12),
            )
            .when(is_busy)
            .await?;
        // the file exists now; an absolute path keeps the lock file in place if the
        // working directory changes
        let path = path.map(|p| std::fs::canonicalize(&p).unwrap_or(p));
        Ok(SqliteStore { pool, path })
    }

    /// SQLite has no notion of claims shared between processes that we could rely on
    /// for a second relay, so one relay per file is enforced with a non-blocking lock.
    pub fn lock_for_relay(&self) -> anyhow::Result<RelayLock> {
        let Some(db) = &self.path else {
            return Ok(RelayLock { _file: None });
        };
        let (file, lock_path) = lock_file(db, "relay")?;
        match file.try_lock() {
            Ok(()) => Ok(RelayLock { _file: Some(file) }),
            Err(TryLockError::WouldBlock) => bail!(
                "another serversync relay is already running against {} (SQLite allows one relay \
                 per database file; use PostgreSQL for several)",
                db.display()
            ),
            Err(TryLockError::Error(e)) => Err(e).with_context(|| {
                format!("cannot lock the relay lock file {}", lock_path.display())
            }),
        }
    }

    pub async fn ping(&self) -> anyhow::Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Apply the migrations. On a file, on a connection of their own without sqlx's
    /// statement logs (as on PostgreSQL): a migration slowed down by a lock or a
    /// large outbox would otherwise be logged with its whole SQL, where `migrate`
    /// says in one line how long it took. An in-memory database has its one
    /// connection only, which keeps the logs.
    pub async fn migrate(&self) -> anyhow::Result<()> {
        let Some(db) = &self.path else {
            return MIGRATOR
                .run(&self.pool)
                .await
                .context("applying migrations");
        };
        // Migrations run one process at a time, as PostgreSQL's advisory lock makes
        // them there: two `migrate`s of a new file would both apply the first
        // migration, and the second would fail on its record. The lock is waited
        // for; the one that waited then finds every migration applied.
        let (lock, lock_path) = lock_file(db, "migrate")?;
        let lock = tokio::task::spawn_blocking(move || lock.lock().map(|()| lock))
            .await
            .context("waiting for the migration lock")?
            .with_context(|| {
                format!(
                    "cannot lock the migration lock file {}",
                    lock_path.display()
                )
            })?;
        let options = (*self.pool.connect_options())
            .clone()
            .disable_statement_logging();
        let mut conn = options.connect().await.context("connecting to migrate")?;
        let applied = MIGRATOR.run(&mut conn).await;
        let _ = conn.close().await;
        drop(lock);
        applied.context("applying migrations")
    }

    pub async fn schema_state(&self) -> anyhow::Result<SchemaState> {
        let exists: bool = sqlx::query_scalar(
            "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'",
        )
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

    /// Every write starts IMMEDIATE: it takes the write lock up front and waits for it
    /// (busy_timeout), instead of failing with SQLITE_BUSY when a read upgrades.
    async fn write_tx(&self) -> anyhow::Result<Transaction<'static, Sqlite>> {
        self.pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .context("starting a write transaction")
    }

    pub async fn set_ordering_rules(
        &self,
        rules: &BTreeMap<String, String>,
    ) -> anyhow::Result<BTreeMap<String, String>> {
        let mut tx = self.write_tx().await?;
        let before: Vec<(String, String)> =
            sqlx::query_as("SELECT entity_type, source FROM sync_outbox_ordering_rules")
                .fetch_all(&mut *tx)
                .await?;
        sqlx::query("DELETE FROM sync_outbox_ordering_rules")
            .execute(&mut *tx)
            .await?;
        for (entity_type, source) in rules {
            sqlx::query(
                "INSERT INTO sync_outbox_ordering_rules (entity_type, source) VALUES (?1, ?2)",
            )
            .bind(entity_type)
            .bind(source)
            .execute(&mut *tx)
            .await
            .with_context(|| format!("ordering rule {entity_type} = {source}"))?;
        }
        tx.commit().await?;
        Ok(before.into_iter().collect())
    }

    pub async fn claim(
        &self,
        token: i64,
        want: Want<'_>,
        lease: Duration,
        owner: &str,
    ) -> anyhow::Result<Claim> {
        let mut tx = self.write_tx().await?;
        let rows = sqlx::query(CLAIM_SQL)
            .bind(i64::from(want.rows))
            .bind(token)
            .bind(owner)
            .bind(offset_ms(lease))
            .bind(i64::try_from(want.bytes).unwrap_or(i64::MAX))
            .bind(if want.skip_types.is_empty() {
                None
            } else {
                Some(serde_json::to_string(want.skip_types)?)
            })
            .fetch_all(&mut *tx)
            .await
            .context("claiming rows")?;
        let candidates: i64 = match rows.first() {
            Some(row) => row.try_get("candidates")?,
            None => 0,
        };
        // decode before committing: a row we cannot read is not left leased
        let mut claimed = rows
            .iter()
            .map(claimed_from_row)
            .collect::<anyhow::Result<Vec<_>>>()?;
        tx.commit().await?;
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
        let sql = concat!(
            "UPDATE sync_outbox SET lease_until = ",
            now_plus_ms!("?3"),
            " WHERE id IN (SELECT value FROM json_each(?1))",
            " AND claim_token IN (SELECT value FROM json_each(?2))",
            " RETURNING id"
        );
        let mut tx = self.write_tx().await?;
        let renewed: Vec<i64> = sqlx::query_scalar(sql)
            .bind(serde_json::to_string(&held.ids)?)
            .bind(serde_json::to_string(&held.tokens)?)
            .bind(offset_ms(lease))
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(renewed.into_iter().collect())
    }

    pub async fn release(&self, held: &Held) -> anyhow::Result<u64> {
        let mut tx = self.write_tx().await?;
        let done = sqlx::query(
            "UPDATE sync_outbox SET claim_token = NULL, lease_owner = NULL, lease_until = NULL \
             WHERE id IN (SELECT value FROM json_each(?1)) \
               AND claim_token IN (SELECT value FROM json_each(?2))",
        )
        .bind(serde_json::to_string(&held.ids)?)
        .bind(serde_json::to_string(&held.tokens)?)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(done.rows_affected())
    }

    pub async fn settle(&self, s: &Settlement, keep_sent: bool) -> anyhow::Result<SettleReport> {
        let mut report = SettleReport::default();
        let mut tx = self.write_tx().await?;
        if !s.sent.is_empty() {
            let ids = serde_json::to_string(&s.sent)?;
            if keep_sent {
                sqlx::query(SENT_ARCHIVE_SQL)
                    .bind(&ids)
                    .bind(s.token)
                    .execute(&mut *tx)
                    .await?;
            }
            let written: Vec<i64> = sqlx::query_scalar(SENT_DELETE_SQL)
                .bind(&ids)
                .bind(s.token)
                .fetch_all(&mut *tx)
                .await?;
            report.sent = tally(&mut report.lost, s.sent.iter().copied(), &written);
        }
        for r in &s.retries {
            let written = sqlx::query(RETRY_SQL)
                .bind(r.id)
                .bind(s.token)
                .bind(offset_ms(r.delay))
                .bind(&r.error.error_type)
                .bind(&r.error.message)
                .bind(r.error.http_status)
                .bind(r.charged)
                .bind(r.error.history_entry.to_string())
                .execute(&mut *tx)
                .await?
                .rows_affected();
            report.retried += written;
            if written == 0 {
                report.lost.push(r.id);
            }
        }
        for d in &s.dead {
            sqlx::query(DEAD_SQL)
                .bind(d.id)
                .bind(s.token)
                .bind(&d.error.error_type)
                .bind(d.error.http_status)
                .bind(&d.error.message)
                .bind(&d.error.response_body)
                .bind(d.error.history_entry.to_string())
                .bind(d.max_attempts)
                .execute(&mut *tx)
                .await?;
            let written = sqlx::query(DELETE_CLAIMED_SQL)
                .bind(d.id)
                .bind(s.token)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            report.dead += written;
            if written == 0 {
                report.lost.push(d.id);
            }
        }
        tx.commit().await?;
        Ok(report)
    }

    async fn dead_by_type(&self) -> anyhow::Result<BTreeMap<String, i64>> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT error_type, count(*) FROM sync_outbox_dead_letters GROUP BY error_type",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().collect())
    }

    pub async fn backlog(&self) -> anyhow::Result<Backlog> {
        let pending: Vec<(String, i64)> =
            sqlx::query_as("SELECT entity_type, count(*) FROM sync_outbox GROUP BY entity_type")
                .fetch_all(&self.pool)
                .await?;
        // the oldest row by id is the oldest pending row; a primary-key probe, not a scan
        let oldest: Option<f64> = sqlx::query_scalar(
            "SELECT (julianday('now') - julianday(created_at)) * 86400.0 FROM sync_outbox ORDER BY id LIMIT 1",
        )
        .fetch_optional(&self.pool)
        .await?;
        Ok(Backlog {
            pending_by_entity_type: pending.into_iter().collect(),
            oldest_pending_age_seconds: oldest.unwrap_or(0.0).max(0.0),
            dead_letters_by_error_type: self.dead_by_type().await?,
        })
    }

    /// Rows due now plus the rows `owner` holds, in one snapshot (`Store`'s).
    pub async fn count_due_or_held_by(&self, owner: &str) -> anyhow::Result<i64> {
        let sql = concat!(
            "SELECT count(*) FROM sync_outbox WHERE lease_owner = ?1 OR (next_attempt_at <= ",
            now!(),
            " AND (lease_until IS NULL OR lease_until < ",
            now!(),
            "))"
        );
        Ok(sqlx::query_scalar(sql)
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

    /// When `sink` was taken as down, if it is (and, with `within`, was taken so
    /// within that long).
    pub async fn sink_down_since(
        &self,
        sink: &str,
        within: Option<Duration>,
    ) -> anyhow::Result<Option<String>> {
        let since: Option<Option<String>> = sqlx::query_scalar(concat!(
            "SELECT down_since FROM sync_outbox_sink_state WHERE sink = ?1 \
             AND (?2 IS NULL OR down_since > ",
            now_plus_ms!("?2"),
            ")"
        ))
        .bind(sink)
        .bind(within.map(|w| -millis(w)))
        .fetch_optional(&self.pool)
        .await?;
        Ok(since.flatten())
    }

    pub async fn sinks_down(&self) -> anyhow::Result<Vec<(String, String)>> {
        Ok(sqlx::query_as(
            "SELECT sink, down_since FROM sync_outbox_sink_state \
             WHERE down_since IS NOT NULL ORDER BY sink",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    pub async fn set_sink_down(&self, sink: &str, down: bool) -> anyhow::Result<()> {
        let sql = concat!(
            "INSERT INTO sync_outbox_sink_state (sink, down_since, updated_at) VALUES (?1, CASE WHEN ?2 THEN ",
            now!(),
            " END, ",
            now!(),
            ") ON CONFLICT (sink) DO UPDATE SET updated_at = excluded.updated_at, down_since = \
             CASE WHEN ?2 THEN COALESCE(sync_outbox_sink_state.down_since, excluded.down_since) END"
        );
        let mut tx = self.write_tx().await?;
        sqlx::query(sql)
            .bind(sink)
            .bind(down)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn prune_sent(&self, ttl: Duration, batch: u32) -> anyhow::Result<u64> {
        let sql = concat!(
            "DELETE FROM sync_outbox_sent WHERE id IN (SELECT id FROM sync_outbox_sent WHERE sent_at < ",
            now_plus_ms!("?1"),
            " ORDER BY sent_at LIMIT ?2)"
        );
        let mut tx = self.write_tx().await?;
        let done = sqlx::query(sql)
            .bind(-offset_ms(ttl))
            .bind(i64::from(batch))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(done.rows_affected())
    }
}

fn offset_ms(d: Duration) -> i64 {
    millis(d).min(MAX_OFFSET_MS)
}

fn claimed_from_row(row: &SqliteRow) -> anyhow::Result<ClaimedRow> {
    let id: i64 = row.try_get("id")?;
    // SQLite does not type-check: a row a producer wrote badly is claimed anyway and
    // carries its defect, so the relay dead-letters it instead of stalling on it.
    let mut defect = None;
    let mut note = |e: anyhow::Error| {
        defect.get_or_insert_with(|| format!("{e:#}"));
    };
    let entity_type = get_text(row, "entity_type").unwrap_or_else(|e| {
        note(e);
        String::new()
    });
    let entity_id = get_text(row, "entity_id")
        .and_then(|text| {
            Uuid::parse_str(&text).with_context(|| format!("entity_id {text:?} is not a UUID"))
        })
        .unwrap_or_else(|e| {
            note(e);
            Uuid::nil()
        });
    let payload = get_text(row, "payload")
        .and_then(|text| RawValue::from_string(text).context("payload is not valid JSON"))
        .unwrap_or_else(|e| {
            note(e);
            RawValue::from_string("null".into()).unwrap_or_default()
        });
    let ordering_key = get_opt_text_lossy(row, "ordering_key")?;
    let created_at = get_time(row, "created_at").unwrap_or_else(|e| {
        note(e.context("created_at is not a time"));
        DateTime::UNIX_EPOCH
    });
    // a number SQLite holds in any form (text, real, beyond 32 bits): the count only
    // says how many attempts were made, so a value it cannot be is taken as 0 (a
    // defect); one below zero counts from 0, as the settles write it
    let attempts = row
        .try_get::<i64, _>("attempts")
        .ok()
        .and_then(|n| i32::try_from(n.max(0)).ok())
        .unwrap_or_else(|| {
            note(anyhow::anyhow!("attempts is not a count of attempts"));
            0
        });
    Ok(ClaimedRow {
        id,
        entity_type,
        entity_id,
        payload,
        created_at,
        attempts,
        ordering_key,
        defect,
    })
}

/// A text column as stored: SQLite keeps a value a producer bound as bytes as a
/// blob, which a read as text refuses outright (one such row failed every claim).
/// The migrations turn such values into text; this reads any left, or not UTF-8.
fn get_text(row: &SqliteRow, col: &str) -> anyhow::Result<String> {
    let bytes: Vec<u8> = row.try_get(col)?;
    String::from_utf8(bytes).map_err(|_| anyhow::anyhow!("{col} is not UTF-8 text"))
}

/// `get_text`, for showing: bytes that are no UTF-8 are replaced, not refused.
fn get_text_lossy(row: &SqliteRow, col: &str) -> anyhow::Result<String> {
    let bytes: Vec<u8> = row.try_get(col)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// `get_text_lossy` for a nullable column.
fn get_opt_text_lossy(row: &SqliteRow, col: &str) -> anyhow::Result<Option<String>> {
    let bytes: Option<Vec<u8>> = row.try_get(col)?;
    Ok(bytes.map(|b| String::from_utf8_lossy(&b).into_owned()))
}

fn get_time(row: &SqliteRow, col: &str) -> anyhow::Result<DateTime<Utc>> {
    let text: String = row.try_get(col)?;
    parse_time(&text).with_context(|| format!("column {col}"))
}

fn get_opt_time(row: &SqliteRow, col: &str) -> anyhow::Result<Option<DateTime<Utc>>> {
    let text: Option<String> = row.try_get(col)?;
    text.map(|t| parse_time(&t).with_context(|| format!("column {col}")))
        .transpose()
}

/// The schema writes RFC 3339 UTC text; a producer that wrote SQLite's own
/// `datetime('now')` form ("YYYY-MM-DD HH:MM:SS") is read as UTC too.
fn parse_time(text: &str) -> anyhow::Result<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Ok(t.with_timezone(&Utc));
    }
    NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f")
        .map(|t| t.and_utc())
        .with_context(|| format!("invalid timestamp {text:?} in the database"))
}

mod admin;

/// `database is locked`: another connection holds the lock for a moment.
fn is_busy(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|db| db.code())
        .is_some_and(|code| super::is_sqlite_busy(&code))
}

/// The `what` lock file beside the database file `db` (`<db>.<what>.lock`), opened
/// (created if need be) for locking, with its path.
fn lock_file(db: &std::path::Path, what: &str) -> anyhow::Result<(File, PathBuf)> {
    let mut path = db.as_os_str().to_owned();
    path.push(format!(".{what}.lock"));
    let path = PathBuf::from(path);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open the {what} lock file {}", path.display()))?;
    Ok((file, path))
}

#[cfg(test)]
mod tests;
