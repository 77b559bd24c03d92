//! `TestEnv`: what one test needs to run the relay for real — a fresh database, a fake
//! Frontend, a recordings root, and a configuration with test-sized timings.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

use super::config::ConfigToml;
use super::db::{Backend, Db, NewRow};
use super::pg::TestDb;
use super::relay::{serversync, Cmd, Output, Running};
use super::sink::Sink;

pub struct TestEnv {
    pub db: Db,
    pub sink: Sink,
    /// `storage.recordings_root`, empty at first.
    pub root: PathBuf,
    /// Written to a fresh file for every command; change it between commands.
    pub config: ConfigToml,
    /// Working directory of every command (so no `config/serversync.toml` of the
    /// checkout is picked up), holding the config files and `root`.
    work: tempfile::TempDir,
    configs_written: AtomicUsize,
}

impl TestEnv {
    /// Fresh PostgreSQL database (no schema yet), sink accepting everything, test config.
    pub async fn new() -> TestEnv {
        TestEnv::new_on(Backend::Postgres).await
    }

    /// As [`TestEnv::new`], on `backend`: SQLite is a new `outbox.db` in the work
    /// directory.
    pub async fn new_on(backend: Backend) -> TestEnv {
        let work = work_dir();
        let db = Db::new(backend, work.path()).await;
        TestEnv::assemble(db, work)
    }

    /// As [`TestEnv::new`], on a PostgreSQL database of the caller's (e.g. from a
    /// [`PrivatePg`](super::pg::PrivatePg) the test stops and starts).
    pub fn with_db(db: TestDb) -> TestEnv {
        TestEnv::assemble(Db::Postgres(db), work_dir())
    }

    fn assemble(db: Db, work: tempfile::TempDir) -> TestEnv {
        let sink = Sink::start();
        let root = work.path().join("recordings");
        std::fs::create_dir_all(&root).expect("create recordings root");
        let config = test_config(db.url(), sink.url(), &root);
        TestEnv {
            db,
            sink,
            root,
            config,
            work,
            configs_written: AtomicUsize::new(0),
        }
    }

    /// As [`TestEnv::new`], with the schema applied by `serversync migrate`.
    pub async fn migrated() -> TestEnv {
        TestEnv::migrated_on(Backend::Postgres).await
    }

    /// As [`TestEnv::new_on`], with the schema applied by `serversync migrate`.
    pub async fn migrated_on(backend: Backend) -> TestEnv {
        let env = TestEnv::new_on(backend).await;
        env.migrate().await;
        env
    }

    pub fn backend(&self) -> Backend {
        self.db.backend()
    }

    /// The directory commands run in.
    pub fn work_dir(&self) -> &Path {
        self.work.path()
    }

    /// Write the current configuration to a new file and return its path.
    pub fn write_config(&self) -> PathBuf {
        let n = self.configs_written.fetch_add(1, Ordering::Relaxed);
        let path = self.work.path().join(format!("serversync-{n}.toml"));
        std::fs::write(&path, self.config.render()).expect("write config");
        path
    }

    /// `serversync --config <current config> <args…>`, run in the work directory.
    pub fn cmd<I, S>(&self, args: I) -> Cmd
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        serversync()
            .arg("--config")
            .arg(self.write_config())
            .args(args)
            .current_dir(self.work.path())
    }

    /// `serversync run <args…>` in the background; killed when the guard drops.
    pub fn spawn_run(&self, args: &[&str]) -> Running {
        self.cmd(["run"].iter().chain(args)).spawn()
    }

    pub async fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().await
    }

    /// `serversync migrate`, which must succeed.
    pub async fn migrate(&self) {
        self.run(&["migrate"])
            .await
            .assert_success()
            .assert_no_panic();
    }

    /// `serversync drain`.
    pub async fn drain(&self) -> Output {
        let out = self.run(&["drain"]).await;
        out.assert_no_panic();
        out
    }

    /// Insert an outbox row the way a producer does; returns its id.
    pub async fn insert(&self, entity_type: &str, entity_id: Uuid, payload: Value) -> i64 {
        self.db
            .insert(&[NewRow::new(entity_type, entity_id, payload)])
            .await[0]
    }

    /// Insert many rows in few statements; returns their ids, ascending.
    pub async fn insert_rows(&self, rows: &[NewRow]) -> Vec<i64> {
        self.db.insert(rows).await
    }

    /// Rows still to deliver, by id.
    pub async fn outbox(&self) -> Vec<OutboxRow> {
        let sql = format!(
            "SELECT id, entity_type, {}, payload, ordering_key, created_at, status, attempts, \
                    next_attempt_at, last_error_type, last_error, last_http_status, \
                    attempt_errors, first_attempt_at \
             FROM sync_outbox ORDER BY id",
            self.db.uuid_column("entity_id")
        );
        self.db.rows(&sql).await
    }

    /// Dead letters, by id.
    pub async fn dead_letters(&self) -> Vec<DeadLetter> {
        let sql = format!(
            "SELECT id, outbox_id, entity_type, {}, payload, ordering_key, created_at, \
                    error_type, http_status, error_message, response_body, attempts, max_attempts, \
                    attempt_errors, first_attempt_at, last_attempt_at, dead_at \
             FROM sync_outbox_dead_letters ORDER BY id",
            self.db.uuid_column("entity_id")
        );
        self.db.rows(&sql).await
    }

    /// The id of the dead letter made of outbox row `outbox_id`.
    pub async fn dead_letter_id(&self, outbox_id: i64) -> i64 {
        let dead = self.dead_letters().await;
        dead.iter()
            .find(|d| d.outbox_id == outbox_id)
            .unwrap_or_else(|| panic!("no dead letter for outbox row {outbox_id}: {dead:#?}"))
            .id
    }

    /// Records of delivered rows, by id.
    pub async fn sent(&self) -> Vec<SentRow> {
        let sql = format!(
            "SELECT id, entity_type, {}, created_at, sent_at, attempts \
             FROM sync_outbox_sent ORDER BY id",
            self.db.uuid_column("entity_id")
        );
        self.db.rows(&sql).await
    }

    /// Outbox ids recorded as delivered, ascending (read from `outbox_id`, the
    /// name the dead letters use too; it always equals the record's `id`).
    pub async fn sent_ids(&self) -> Vec<i64> {
        let ids: Vec<i64> = self.sent().await.iter().map(|s| s.id).collect();
        let mismatched = self
            .db
            .scalar(
                "SELECT count(*) FROM sync_outbox_sent WHERE outbox_id IS NULL OR outbox_id <> id",
            )
            .await;
        assert_eq!(mismatched, 0, "sync_outbox_sent.outbox_id is its id");
        ids
    }

    pub async fn count(&self, table: &str) -> i64 {
        self.db
            .scalar(&format!("SELECT count(*) FROM {table}"))
            .await
    }

    /// Outbox rows whose next attempt is still in the future.
    pub async fn count_waiting(&self) -> i64 {
        let sql = format!(
            "SELECT count(*) FROM sync_outbox WHERE next_attempt_at > {}",
            self.db.now_plus(0)
        );
        self.db.scalar(&sql).await
    }

    /// The database clock.
    pub async fn db_now(&self) -> DateTime<Utc> {
        #[derive(sqlx::FromRow)]
        struct Now {
            now: DateTime<Utc>,
        }
        let sql = format!("SELECT {} AS now", self.db.now_plus(0));
        self.db.rows::<Now>(&sql).await[0].now
    }
}

fn work_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("serversync-test-")
        .tempdir()
        .expect("temp dir")
}

/// Timings sized for tests: retries within tens of milliseconds, a sink timeout of
/// seconds, no metrics listener (parallel relays would fight over its port).
pub fn test_config(database_url: &str, ingest_url: &str, recordings_root: &Path) -> ConfigToml {
    let mut c = ConfigToml::default();
    c.set("database.url", database_url)
        .set("database.max_connections", 5)
        .set("ingest.base_url", ingest_url)
        .set("ingest.timeout", "2s")
        .set("ingest.connect_timeout", "1s")
        .set("ingest.upload_timeout", "5s")
        .set("dispatch.poll_interval", "50ms")
        .set("dispatch.probe_interval", "50ms")
        .set("dispatch.max_probe_interval", "200ms")
        .set("retry.base_delay", "10ms")
        .set("retry.max_delay", "50ms")
        .set("storage.recordings_root", recordings_root)
        .set("metrics.enabled", false)
        .set("shutdown.grace", "5s");
    c
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OutboxRow {
    pub id: i64,
    pub entity_type: String,
    pub entity_id: Uuid,
    pub payload: Value,
    pub ordering_key: Option<String>,
    pub created_at: DateTime<Utc>,
    pub status: String,
    pub attempts: i32,
    pub next_attempt_at: DateTime<Utc>,
    pub last_error_type: Option<String>,
    pub last_error: Option<String>,
    pub last_http_status: Option<i32>,
    pub attempt_errors: Value,
    pub first_attempt_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SentRow {
    pub id: i64,
    pub entity_type: String,
    pub entity_id: Uuid,
    pub created_at: DateTime<Utc>,
    pub sent_at: DateTime<Utc>,
    pub attempts: i32,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DeadLetter {
    pub id: i64,
    pub outbox_id: i64,
    pub entity_type: String,
    pub entity_id: Uuid,
    pub payload: Value,
    pub ordering_key: Option<String>,
    pub created_at: DateTime<Utc>,
    pub error_type: String,
    pub http_status: Option<i32>,
    pub error_message: String,
    pub response_body: Option<String>,
    pub attempts: i32,
    pub max_attempts: i32,
    pub attempt_errors: Value,
    pub first_attempt_at: Option<DateTime<Utc>>,
    pub last_attempt_at: Option<DateTime<Utc>>,
    pub dead_at: DateTime<Utc>,
}
