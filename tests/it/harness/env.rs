//! `TestEnv`: what one test needs to run the relay for real — a fresh database, a fake
//! Frontend, a recordings root, and a configuration with test-sized timings.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

use super::config::ConfigToml;
use super::pg::{test_db, TestDb};
use super::relay::{serversync, Cmd, Output, Running};
use super::sink::Sink;

pub struct TestEnv {
    pub db: TestDb,
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
    /// Fresh database (no schema yet), sink accepting everything, test config.
    pub async fn new() -> TestEnv {
        TestEnv::with_db(test_db().await)
    }

    /// As [`TestEnv::new`], on a database of the caller's (e.g. from a
    /// [`PrivatePg`](super::pg::PrivatePg) the test stops and starts).
    pub fn with_db(db: TestDb) -> TestEnv {
        let sink = Sink::start();
        let work = tempfile::Builder::new()
            .prefix("serversync-test-")
            .tempdir()
            .expect("temp dir");
        let root = work.path().join("recordings");
        std::fs::create_dir_all(&root).expect("create recordings root");
        let config = test_config(&db.url, sink.url(), &root);
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
        let env = TestEnv::new().await;
        env.migrate().await;
        env
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
        sqlx::query_scalar(
            "INSERT INTO sync_outbox (entity_type, entity_id, payload) VALUES ($1, $2, $3) RETURNING id",
        )
        .bind(entity_type)
        .bind(entity_id)
        .bind(payload)
        .fetch_one(&self.db.pool)
        .await
        .expect("insert outbox row")
    }

    /// Rows still to deliver, by id.
    pub async fn outbox(&self) -> Vec<OutboxRow> {
        sqlx::query_as(
            "SELECT id, entity_type, entity_id, payload, ordering_key, status, attempts, \
                    next_attempt_at, last_error_type, last_error, last_http_status, \
                    attempt_errors, first_attempt_at \
             FROM sync_outbox ORDER BY id",
        )
        .fetch_all(&self.db.pool)
        .await
        .expect("select sync_outbox")
    }

    /// Dead letters, by id.
    pub async fn dead_letters(&self) -> Vec<DeadLetter> {
        sqlx::query_as(
            "SELECT id, outbox_id, entity_type, entity_id, payload, ordering_key, created_at, \
                    error_type, http_status, error_message, response_body, attempts, max_attempts, \
                    attempt_errors, first_attempt_at, last_attempt_at, dead_at \
             FROM sync_outbox_dead_letters ORDER BY id",
        )
        .fetch_all(&self.db.pool)
        .await
        .expect("select sync_outbox_dead_letters")
    }

    /// Outbox ids recorded as delivered, ascending.
    pub async fn sent_ids(&self) -> Vec<i64> {
        sqlx::query_scalar("SELECT id FROM sync_outbox_sent ORDER BY id")
            .fetch_all(&self.db.pool)
            .await
            .expect("select sync_outbox_sent")
    }

    pub async fn count(&self, table: &str) -> i64 {
        sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
            .fetch_one(&self.db.pool)
            .await
            .unwrap_or_else(|e| panic!("count {table}: {e}"))
    }

    /// The database clock.
    pub async fn db_now(&self) -> DateTime<Utc> {
        sqlx::query_scalar("SELECT now()")
            .fetch_one(&self.db.pool)
            .await
            .expect("select now()")
    }
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
