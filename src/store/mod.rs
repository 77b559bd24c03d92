//! The store: the only place that speaks SQL. Two real backends, PostgreSQL (the
//! production store, many relays) and SQLite (embedded, one relay), behind one enum;
//! the relay and the commands never know which one they talk to.

mod postgres;
mod sqlite;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use anyhow::{bail, Context};
use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use serde_json::value::RawValue;
use uuid::Uuid;

pub use postgres::{Notifications, PgStore, Wake};
pub use sqlite::{RelayLock, SqliteStore};

/// Which backend a database URL names, or a clear error.
pub fn check_url(url: &str) -> anyhow::Result<()> {
    if let Some(rest) = url.strip_prefix("sqlite:") {
        let rest = rest.strip_prefix("//").unwrap_or(rest);
        let path = rest.split('?').next().unwrap_or("");
        if path.is_empty() {
            bail!(
                "a SQLite URL names a file (sqlite:///path/to/outbox.db, or sqlite://outbox.db \
                 relative to the working directory) or sqlite::memory:"
            );
        }
        return Ok(());
    }
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(())
    } else {
        bail!(
            "unsupported database URL {}: expected postgres://… or sqlite://…",
            redact_url(url)
        )
    }
}

/// A URL safe to print: scheme, host, port and database, never the password.
pub fn redact_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("****"));
            }
            u.set_query(None);
            u.to_string()
        }
        Err(_) => "<unparseable URL>".to_string(),
    }
}

/// How long applying the migrations may take before the command says how long.
const SLOW_MIGRATION: std::time::Duration = std::time::Duration::from_secs(1);

/// One row claimed for delivery under a lease.
#[derive(Debug, Clone)]
pub struct ClaimedRow {
    pub id: i64,
    pub entity_type: String,
    pub entity_id: Uuid,
    /// The payload exactly as stored, serialized straight into the request.
    pub payload: Box<RawValue>,
    pub created_at: DateTime<Utc>,
    /// Attempts already made (charged) before this one.
    pub attempts: i32,
    pub ordering_key: Option<String>,
    /// Why the stored row cannot be delivered as it is (a backend that does not
    /// type-check columns); the relay dead-letters it as `payload_invalid`.
    pub defect: Option<String>,
}

/// How much a claim may take: rows, and their payload bytes together (at least one
/// row whatever its size); and entity types it leaves alone (`skip_types`: the
/// recording files, while every upload slot is taken).
#[derive(Debug, Clone, Copy)]
pub struct Want<'a> {
    pub rows: u32,
    pub bytes: u64,
    pub skip_types: &'a [String],
}

impl Want<'static> {
    /// `rows` rows, whatever their size and type.
    pub fn rows(rows: u32) -> Want<'static> {
        Want {
            rows,
            bytes: u64::MAX,
            skip_types: &[],
        }
    }
}

/// A batch claimed in one statement. `token` fences every settle of these rows.
#[derive(Debug)]
pub struct Claim {
    pub token: i64,
    pub rows: Vec<ClaimedRow>,
    /// As many rows as asked for were claimable (some may have been left out by the
    /// byte bound): a backlog, not the end of the queue.
    pub full: bool,
}

impl Claim {
    /// The claimed row `id` (claimed rows are in id order).
    pub fn row(&self, id: i64) -> Option<&ClaimedRow> {
        self.rows
            .binary_search_by_key(&id, |r| r.id)
            .ok()
            .map(|i| &self.rows[i])
    }
}

/// What went wrong in one attempt, as it is written to the row.
#[derive(Debug, Clone)]
pub struct ErrorRecord {
    pub error_type: String,
    pub http_status: Option<i32>,
    pub message: String,
    pub response_body: Option<String>,
    /// The attempt-history entry: `{"attempt","at","errorType","httpStatus","message"}`.
    pub history_entry: serde_json::Value,
}

#[derive(Debug, Clone)]
pub struct RetryRow {
    pub id: i64,
    pub delay: Duration,
    pub error: ErrorRecord,
    /// False while the sink is down as a whole: the attempt is not counted.
    pub charged: bool,
}

#[derive(Debug, Clone)]
pub struct DeadRow {
    pub id: i64,
    pub error: ErrorRecord,
    pub max_attempts: i32,
}

/// The outcome of one claimed batch, written in one transaction.
#[derive(Debug, Default)]
pub struct Settlement {
    pub token: i64,
    pub sent: Vec<i64>,
    pub retries: Vec<RetryRow>,
    pub dead: Vec<DeadRow>,
}

impl Settlement {
    /// The ids of its rows, whatever their outcome.
    pub fn ids(&self) -> impl Iterator<Item = i64> + '_ {
        self.sent
            .iter()
            .copied()
            .chain(self.retries.iter().map(|r| r.id))
            .chain(self.dead.iter().map(|d| d.id))
    }

    /// The settlement without the rows of `ids` (those whose lease was lost: what
    /// was decided for them did not happen, so it is not counted).
    pub fn without(mut self, ids: &[i64]) -> Settlement {
        if !ids.is_empty() {
            let gone: HashSet<i64> = ids.iter().copied().collect();
            self.sent.retain(|id| !gone.contains(id));
            self.retries.retain(|r| !gone.contains(&r.id));
            self.dead.retain(|d| !gone.contains(&d.id));
        }
        self
    }
}

/// How many rows each part of a settlement touched. Rows not touched had lost their
/// lease (another relay holds them now) and were left alone: `lost`, by id.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SettleReport {
    pub sent: u64,
    pub retried: u64,
    pub dead: u64,
    pub lost: Vec<i64>,
}

/// How many rows of `wanted` a settle statement wrote (`written`: the ids it
/// returned); the others go to `lost`, in `wanted`'s order (found by a set only when
/// some are missing).
fn tally(lost: &mut Vec<i64>, wanted: impl ExactSizeIterator<Item = i64>, written: &[i64]) -> u64 {
    if written.len() < wanted.len() {
        let written: HashSet<i64> = written.iter().copied().collect();
        lost.extend(wanted.filter(|id| !written.contains(id)));
    }
    written.len() as u64
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Status {
    pub pending: i64,
    pub due: i64,
    pub in_flight: i64,
    /// Rows behind an older row of their ordering key still in the outbox (in
    /// flight, or waiting for a retry): they go once it is delivered or
    /// dead-lettered. Counted in `pending`, and in `due` when due.
    pub waiting_behind_key: i64,
    pub oldest_pending_age_seconds: Option<f64>,
    pub dead_letters: i64,
    pub dead_letters_by_error_type: BTreeMap<String, i64>,
    pub sent_last_5m: i64,
}

/// Backlog figures for the gauges, read on an interval.
#[derive(Debug, Clone, Default)]
pub struct Backlog {
    pub pending_by_entity_type: BTreeMap<String, i64>,
    pub oldest_pending_age_seconds: f64,
    pub dead_letters_by_error_type: BTreeMap<String, i64>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetter {
    pub id: i64,
    pub outbox_id: i64,
    pub entity_type: String,
    /// As stored: a row dead-lettered because its id is no UUID (SQLite does not
    /// enforce the type) must still be listed.
    pub entity_id: String,
    pub payload: serde_json::Value,
    pub ordering_key: Option<String>,
    /// `None` (`null`) when the stored value is no time this program can show:
    /// PostgreSQL's ±infinity, or SQLite text that is no time.
    pub created_at: Option<DateTime<Utc>>,
    pub error_type: String,
    pub http_status: Option<i32>,
    pub error_message: String,
    pub response_body: Option<String>,
    pub attempts: i32,
    pub max_attempts: i32,
    pub attempt_errors: serde_json::Value,
    pub first_attempt_at: Option<DateTime<Utc>>,
    pub last_attempt_at: Option<DateTime<Utc>>,
    pub dead_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Default)]
pub struct DlqFilter {
    pub error_type: Option<String>,
    pub entity_type: Option<String>,
    /// The last HTTP status the sink answered.
    pub http_status: Option<i32>,
    /// Dead longer ago than this.
    pub older_than: Option<Duration>,
    pub limit: i64,
}

impl DlqFilter {
    /// The selection of the filters `requeue` and `purge` take too (all but the
    /// entity type), so that `dlq list` shows what they would move or delete.
    pub(crate) fn matching(&self) -> DlqSelection {
        DlqSelection::Matching {
            error_type: self.error_type.clone(),
            http_status: self.http_status,
            older_than: self.older_than,
        }
    }
}

/// Which dead letters a `requeue` or `purge` applies to.
#[derive(Debug, Clone)]
pub enum DlqSelection {
    Ids(Vec<i64>),
    All,
    /// Of this error type, with this last HTTP status, dead longer ago than this:
    /// every one given must match (at least one is given).
    Matching {
        error_type: Option<String>,
        http_status: Option<i32>,
        older_than: Option<Duration>,
    },
}

/// A row for `enqueue`.
#[derive(Debug, Clone)]
pub struct NewRow {
    pub entity_type: String,
    pub entity_id: Uuid,
    pub payload: serde_json::Value,
    pub ordering_key: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SchemaState {
    Current,
    /// Migrations of this binary not yet applied.
    Outdated {
        missing: Vec<i64>,
    },
    /// The database has migrations this binary does not know (a newer binary ran).
    Newer {
        unknown: Vec<i64>,
    },
}

#[derive(Debug, Clone)]
pub struct ConnectOptions {
    pub max_connections: u32,
    pub acquire_timeout: Duration,
    /// Create a missing SQLite file (commands that will migrate it); the others
    /// refuse a path with nothing there instead of leaving an empty database behind.
    pub create: bool,
    /// PostgreSQL: whether the sessions' commits wait for the WAL flush (the server's
    /// `synchronous_commit`). `false` for the relay's own pool when
    /// `database.synchronous_commit = false`: its settles, retries, dead-letter
    /// moves and lease renewals then commit without waiting, as its claims always
    /// do (`CLAIM_SQL`); a server
    /// crash can undo the last fraction of a second of them, which means rows are
    /// delivered again, never lost. Operator commands always keep the server's setting.
    pub synchronous_commit: bool,
    /// PostgreSQL: how long a statement waits for a lock before it fails
    /// (`lock_timeout`). `None` for the relay, whose claims wait out a lock held on the
    /// outbox (a migration, an operator's `LOCK TABLE`) and go on; an operator's
    /// command says what holds it up instead of hanging.
    pub lock_timeout: Option<Duration>,
}

/// The two backends. Each method is a thin match; the SQL lives in the backend files.
#[derive(Debug, Clone)]
pub enum Store {
    Postgres(PgStore),
    Sqlite(SqliteStore),
}

macro_rules! delegate {
    ($self:ident, $s:ident => $call:expr) => {
        match $self {
            Store::Postgres($s) => $call,
            Store::Sqlite($s) => $call,
        }
    };
}

/// One of `of` equal shares of the ordering keys, by the hash of the key (of the id for
/// rows without a key), so that claims running at once in one relay look at disjoint
/// rows: they neither skip each other's locked rows nor probe each other's blocked
/// successors. Every row of a key is in the same share, so the head-of-key rule is
/// unaffected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyShare {
    pub index: u32,
    pub of: u32,
}

impl KeyShare {
    /// The share's range of PostgreSQL's `hashtext` (an `int4`): `lo <= h < hi`, an open
    /// end as `None`. Shares are contiguous ranges, not `h % of = index`: the planner
    /// estimates a one-sided comparison on an expression at a third of the rows, an
    /// equality at half a percent, which would make the claim's `LIMIT` look costly.
    pub fn bounds(self) -> (Option<i64>, Option<i64>) {
        let of = i64::from(self.of.max(1));
        let index = i64::from(self.index.min(self.of.saturating_sub(1)));
        let span = (1i64 << 32) / of;
        let lo = (index > 0).then(|| i64::from(i32::MIN) + index * span);
        let hi = (index + 1 < of).then(|| i64::from(i32::MIN) + (index + 1) * span);
        (lo, hi)
    }
}

/// Whether a statement failed on a unique key (either store).
pub(crate) fn is_unique_violation(e: &anyhow::Error) -> bool {
    e.downcast_ref::<sqlx::Error>()
        .and_then(sqlx::Error::as_database_error)
        .is_some_and(|d| d.is_unique_violation())
}

/// Rows a relay holds under its claims: every claimed id and every claim token.
/// A row counts only if its current token is one of `tokens` (the fence).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Held {
    pub tokens: Vec<i64>,
    pub ids: Vec<i64>,
}

impl Store {
    pub async fn connect(url: &SecretString, options: &ConnectOptions) -> anyhow::Result<Store> {
        let raw = url.expose_secret();
        check_url(raw)?;
        let shown = redact_url(raw);
        let store = if raw.starts_with("sqlite:") {
            Store::Sqlite(
                SqliteStore::connect(raw, options)
                    .await
                    .with_context(|| format!("cannot open the database {shown}"))?,
            )
        } else {
            Store::Postgres(
                PgStore::connect(raw, options)
                    .await
                    .with_context(|| format!("cannot connect to the database {shown}"))?,
            )
        };
        Ok(store)
    }

    pub fn backend(&self) -> &'static str {
        match self {
            Store::Postgres(_) => "postgres",
            Store::Sqlite(_) => "sqlite",
        }
    }

    pub async fn ping(&self) -> anyhow::Result<()> {
        delegate!(self, s => s.ping().await)
    }

    /// Refresh the planner's statistics of the outbox (PostgreSQL: `ANALYZE`; SQLite
    /// plans without them). After a quiet spell a vacuum can leave them saying the
    /// outbox is empty, and a burst of rows is then claimed with a plan for an
    /// empty table until autovacuum's next analyze.
    pub async fn analyze_outbox(&self) -> anyhow::Result<()> {
        match self {
            Store::Postgres(s) => s.analyze_outbox().await,
            Store::Sqlite(_) => Ok(()),
        }
    }

    /// Apply the embedded migrations. One that takes a while (a large outbox to
    /// rewrite, a lock another session holds) is said in one line, with its time;
    /// on PostgreSQL, where a migration can wait on the outbox's users, sqlx's own
    /// slow-statement warning (the whole migration's SQL) is off for them.
    pub async fn migrate(&self) -> anyhow::Result<()> {
        let started = std::time::Instant::now();
        let applied = delegate!(self, s => s.migrate().await);
        if let Err(e) = &applied {
            // a newer binary's migrations: said as `status` says it, not as the
            // migrator does ("previously applied but is missing in the resolved
            // migrations"). Asked only now: before, the question would wait on a
            // lock as the migrations do, and be logged as a slow statement
            if let Some(sqlx::migrate::MigrateError::VersionMissing(_)) = e.downcast_ref() {
                if let Ok(SchemaState::Newer { unknown }) = self.schema_state().await {
                    bail!(
                        "the database schema is newer than this binary (unknown migration(s) \
                         {unknown:?}, applied by a newer serversync): nothing to apply; \
                         upgrade serversync"
                    );
                }
            }
        }
        applied?;
        let took = started.elapsed();
        if took >= SLOW_MIGRATION {
            tracing::info!(
                "the migrations took {took:.1?} (a large outbox to rewrite, or a lock \
                 another session held)"
            );
        }
        Ok(())
    }

    /// A PostgreSQL setting as the pool's sessions see it; `None` for SQLite.
    pub async fn session_setting(&self, name: &str) -> anyhow::Result<Option<String>> {
        match self {
            Store::Postgres(s) => s.session_setting(name).await.map(Some),
            Store::Sqlite(_) => Ok(None),
        }
    }

    pub async fn schema_state(&self) -> anyhow::Result<SchemaState> {
        delegate!(self, s => s.schema_state().await)
    }

    /// Refuse an outdated schema with a message that says what to do.
    pub async fn require_current_schema(&self) -> anyhow::Result<()> {
        match self.schema_state().await? {
            SchemaState::Current => Ok(()),
            SchemaState::Outdated { missing } => bail!(
                "the database schema is outdated ({} migration(s) not applied): run `serversync migrate` \
                 (`run` and `drain` also take --migrate)",
                missing.len()
            ),
            SchemaState::Newer { unknown } => bail!(
                "the database schema is newer than this binary (unknown migration(s) {unknown:?}): \
                 upgrade serversync"
            ),
        }
    }

    /// Take the exclusive relay lock where the backend needs one (SQLite: one relay per
    /// file). PostgreSQL coordinates any number of relays and needs none.
    pub fn lock_for_relay(&self) -> anyhow::Result<Option<RelayLock>> {
        match self {
            Store::Postgres(_) => Ok(None),
            Store::Sqlite(s) => s.lock_for_relay().map(Some),
        }
    }

    /// Write the rules producers' inserts derive ordering keys by; returns those
    /// they replace.
    pub async fn set_ordering_rules(
        &self,
        rules: &BTreeMap<String, String>,
    ) -> anyhow::Result<BTreeMap<String, String>> {
        delegate!(self, s => s.set_ordering_rules(rules).await)
    }

    /// How many claim lanes are worth running, of `wanted`: SQLite has one writer at a
    /// time (claims would only queue for its lock) and ignores key shares, so one.
    pub fn claim_lanes(&self, wanted: u32) -> u32 {
        match self {
            Store::Postgres(_) => wanted,
            Store::Sqlite(_) => 1,
        }
    }

    /// Claim up to `want` due rows, oldest first (rows and their payload bytes; at
    /// least one row), only of ordering keys in `share` when one is given,
    /// looking only at ids from `from_id` on (PostgreSQL; SQLite has one relay and
    /// ignores both). Ordering does not depend on either: a row is taken only if no
    /// older row of its key is left anywhere in the outbox.
    pub async fn claim(
        &self,
        want: Want<'_>,
        lease: Duration,
        owner: &str,
        share: Option<KeyShare>,
        from_id: i64,
    ) -> anyhow::Result<Claim> {
        let token = new_token();
        match self {
            Store::Postgres(s) => s.claim(token, want, lease, owner, share, from_id).await,
            Store::Sqlite(s) => s.claim(token, want, lease, owner).await,
        }
    }

    /// Extend the leases of claims still in flight; returns the ids it extended (one
    /// missing was settled, or taken over by another relay). Rows are found by id
    /// (the primary key) and fenced on their claim's token, so a renewal costs the
    /// claim's size, never a scan of the queue.
    pub async fn renew(
        &self,
        held: &Held,
        lease: Duration,
    ) -> anyhow::Result<std::collections::HashSet<i64>> {
        if held.ids.is_empty() {
            return Ok(std::collections::HashSet::new());
        }
        delegate!(self, s => s.renew(held, lease).await)
    }

    /// Give claimed rows back without an outcome (shutdown past the grace).
    pub async fn release(&self, held: &Held) -> anyhow::Result<u64> {
        if held.ids.is_empty() {
            return Ok(0);
        }
        delegate!(self, s => s.release(held).await)
    }

    /// Write a batch's outcome in one transaction, fenced on the claim token.
    pub async fn settle(
        &self,
        settlement: &Settlement,
        keep_sent: bool,
    ) -> anyhow::Result<SettleReport> {
        delegate!(self, s => s.settle(settlement, keep_sent).await)
    }

    pub async fn status(&self) -> anyhow::Result<Status> {
        delegate!(self, s => s.status().await)
    }

    /// The backlog gauges; pending counts are exact up to `exact_rows` pending rows
    /// (beyond that, PostgreSQL estimates them).
    pub async fn backlog(&self, exact_rows: u32) -> anyhow::Result<Backlog> {
        match self {
            Store::Postgres(s) => s.backlog(i64::from(exact_rows)).await,
            // an embedded outbox is small: always counted
            Store::Sqlite(s) => s.backlog().await,
        }
    }

    /// Rows due now plus the rows `owner` holds: what is left of a drain's work
    /// (with what it has settled already), counted in one snapshot, so that a claim
    /// landing meanwhile is not counted twice.
    pub async fn count_due_or_held_by(&self, owner: &str) -> anyhow::Result<i64> {
        delegate!(self, s => s.count_due_or_held_by(owner).await)
    }

    /// Whether any row is in the outbox at all (due, waiting or in flight).
    pub async fn has_pending(&self) -> anyhow::Result<bool> {
        delegate!(self, s => s.has_pending().await)
    }

    pub async fn enqueue(&self, row: &NewRow) -> anyhow::Result<i64> {
        delegate!(self, s => s.enqueue(row).await)
    }

    pub async fn dlq_list(&self, filter: &DlqFilter) -> anyhow::Result<Vec<DeadLetter>> {
        delegate!(self, s => s.dlq_list(filter).await)
    }

    pub async fn dlq_get(&self, id: i64) -> anyhow::Result<Option<DeadLetter>> {
        delegate!(self, s => s.dlq_get(id).await)
    }

    /// Move dead letters back to the outbox (same outbox id, attempts reset), in one
    /// statement: all or none. One whose id is in the outbox already (a row inserted
    /// with that id, or the id sequence set back) makes it fail with that said, not
    /// only the database's duplicate key error.
    pub async fn dlq_requeue(&self, selection: &DlqSelection) -> anyhow::Result<u64> {
        let requeued: anyhow::Result<u64> = delegate!(self, s => s.dlq_requeue(selection).await);
        requeued.map_err(|e| {
            if is_unique_violation(&e) {
                e.context(
                    "nothing was requeued: a row with the id of a selected dead letter is in \
                     sync_outbox already (inserted with that id, or the id sequence was set back)",
                )
            } else {
                e
            }
        })
    }

    pub async fn dlq_purge(&self, selection: &DlqSelection) -> anyhow::Result<u64> {
        delegate!(self, s => s.dlq_purge(selection).await)
    }

    /// Delete one small batch of delivered records older than `ttl`.
    pub async fn prune_sent(&self, ttl: Duration, batch: u32) -> anyhow::Result<u64> {
        delegate!(self, s => s.prune_sent(ttl, batch).await)
    }

    /// When the ingest sink `sink` was taken as down by some relay, if it still is
    /// (UTC, RFC 3339), for a relay starting up; with `within`, only if it was taken
    /// so within that long (for a running relay, since it last saw the sink answer).
    pub async fn sink_down_since(
        &self,
        sink: &str,
        within: Option<Duration>,
    ) -> anyhow::Result<Option<String>> {
        delegate!(self, s => s.sink_down_since(sink, within).await)
    }

    /// Every ingest sink some relay recorded as down and no relay has seen answering
    /// since, with when (UTC, RFC 3339), for `status`.
    pub async fn sinks_down(&self) -> anyhow::Result<Vec<(String, String)>> {
        delegate!(self, s => s.sinks_down().await)
    }

    /// Record that the ingest sink `sink` is down (keeping the first `down_since`) or up.
    pub async fn set_sink_down(&self, sink: &str, down: bool) -> anyhow::Result<()> {
        delegate!(self, s => s.set_sink_down(sink, down).await)
    }

    /// A stream of insert notifications, where the backend has them.
    pub async fn notifications(&self) -> anyhow::Result<Option<Notifications>> {
        match self {
            Store::Postgres(s) => s.notifications().await.map(Some),
            Store::Sqlite(_) => Ok(None),
        }
    }
}

fn new_token() -> i64 {
    use rand::Rng;
    // never 0 and never negative, so a token is easy to read in psql
    rand::rng().random_range(1..i64::MAX)
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Compare the binary's migrations with those applied in the database.
fn compare_schema(known: impl Iterator<Item = i64>, applied: &[i64]) -> SchemaState {
    let known: Vec<i64> = known.collect();
    let unknown: Vec<i64> = applied
        .iter()
        .copied()
        .filter(|v| !known.contains(v))
        .collect();
    if !unknown.is_empty() {
        return SchemaState::Newer { unknown };
    }
    let missing: Vec<i64> = known.into_iter().filter(|v| !applied.contains(v)).collect();
    if missing.is_empty() {
        SchemaState::Current
    } else {
        SchemaState::Outdated { missing }
    }
}

/// SQLite's result codes for a lock another connection holds for a moment:
/// SQLITE_BUSY (5) with BUSY_RECOVERY (261) and BUSY_SNAPSHOT (517), and
/// SQLITE_LOCKED (6). No PostgreSQL SQLSTATE is that short.
pub(crate) fn is_sqlite_busy(code: &str) -> bool {
    matches!(code, "5" | "6" | "517" | "261")
}

/// Whether a store error is worth retrying as is: the connection or the server is
/// unavailable, or a transaction lost a race. Anything else (a constraint violated,
/// a type mismatch) would fail the same way again.
pub fn is_transient(err: &anyhow::Error) -> bool {
    let Some(e) = err.chain().find_map(|c| c.downcast_ref::<sqlx::Error>()) else {
        return false;
    };
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            // 08: connection exception; 57P0x: shutdown / cannot connect now;
            // 40001/40P01: serialization failure / deadlock; 53300: too many
            // connections; SQLite busy / locked
            code.starts_with("08")
                || code.starts_with("57P0")
                || matches!(&*code, "40001" | "40P01" | "53300")
                || is_sqlite_busy(&code)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::{check_url, KeyShare};

    #[test]
    fn database_urls_name_a_server_or_a_file() {
        for good in [
            "postgres://u@h/db",
            "postgresql://h/db",
            "sqlite:///abs/outbox.db",
            "sqlite://rel.db?mode=rwc",
            "sqlite:rel.db",
            "sqlite::memory:",
        ] {
            assert!(check_url(good).is_ok(), "{good}");
        }
        for bad in [
            "sqlite:",
            "sqlite://",
            "sqlite://?mode=rwc",
            "mysql://h/db",
            "h/db",
        ] {
            assert!(check_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn key_shares_split_hashtexts_range_without_gaps_or_overlap() {
        assert_eq!(KeyShare { index: 0, of: 1 }.bounds(), (None, None));
        assert_eq!(KeyShare { index: 0, of: 2 }.bounds(), (None, Some(0)));
        assert_eq!(KeyShare { index: 1, of: 2 }.bounds(), (Some(0), None));
        for of in 2..=7u32 {
            let shares: Vec<_> = (0..of)
                .map(|index| KeyShare { index, of }.bounds())
                .collect();
            assert_eq!(shares[0].0, None, "the first share is open below");
            assert_eq!(
                shares[of as usize - 1].1,
                None,
                "the last share is open above"
            );
            for pair in shares.windows(2) {
                assert_eq!(pair[0].1, pair[1].0, "{of} shares: contiguous");
                let edge = pair[1].0.unwrap_or(i64::MIN);
                assert!(edge > i64::from(i32::MIN) && edge <= i64::from(i32::MAX));
            }
        }
    }
}
