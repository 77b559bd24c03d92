//! The scenarios, and what they share: the server, the sink, the relay binary, a
//! scratch database per scenario, and the optional database-side profile.

pub mod drain;
pub mod history;
pub mod idle;
pub mod latency;
pub mod ordering;
pub mod pgbench;
pub mod upload;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::sync::watch;

use crate::pg::{Database, Server};
use crate::relay::{self, Relay, Started};
use crate::sink::Sink;

pub struct Ctx {
    pub server: Server,
    pub sink: Sink,
    pub relay: Relay,
    /// Scratch space: relay logs, recordings, pgbench scripts.
    pub dir: PathBuf,
    /// pg_stat_statements and wait-event sampling around drains.
    pub profile: bool,
    /// Where a call's rows sit in the loaded backlog.
    pub layout: crate::load::Layout,
}

impl Ctx {
    pub fn relay_deletes_sent(&self) -> bool {
        self.relay.knobs().delete_sent
    }

    /// A fresh scratch database with the current schema (`serversync migrate`).
    pub async fn migrated_db(&self, name: &str) -> anyhow::Result<Database> {
        let db = self.server.create_database(name).await?;
        self.relay.migrate(&db.url, &self.sink.url).await?;
        if self.profile {
            db.exec("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
                .await
                .context("--profile needs pg_stat_statements in shared_preload_libraries")?;
        }
        Ok(db)
    }

    /// Start `serversync run` and wait until it delivers: one warm-up row must reach
    /// the sink. Returns the started relay.
    pub async fn start_daemon(&self, db: &Database) -> anyhow::Result<Started> {
        let mut started = self.relay.spawn(&relay::Run {
            command: &["run"],
            database_url: &db.url,
            ingest_url: &self.sink.url,
            metrics: true,
            env: Vec::new(),
        })?;
        // ids restart in every scratch database: forget the previous scenario's
        self.sink.clear();
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO sync_outbox (entity_type, entity_id, payload) \
             VALUES ('call_log', gen_random_uuid(), '{\"warmUp\":true}') RETURNING id",
        )
        .fetch_one(&db.pool)
        .await
        .context("inserting the warm-up row")?;
        let arrived = self
            .sink
            .wait_until(Duration::from_secs(30), |s| s.has_arrived(id))
            .await;
        if let Some(exit) = started.child.try_exit() {
            let how = exit
                .map(|e| e.describe())
                .unwrap_or_else(|e| format!("{e:#}"));
            bail!(
                "serversync run exited during start-up ({how}):\n{}",
                relay::log_tail(&started.log, 20)
            );
        }
        if !arrived {
            bail!(
                "serversync run did not deliver a warm-up row within 30 s:\n{}",
                relay::log_tail(&started.log, 20)
            );
        }
        Ok(started)
    }

    /// SIGTERM a daemon and check it exits 0 within its shutdown grace.
    pub async fn stop_daemon(&self, mut started: Started) -> anyhow::Result<crate::procs::Exit> {
        started.child.signal(libc::SIGTERM);
        let exit = started.child.wait(Duration::from_secs(45)).await?;
        if exit.code != Some(0) {
            bail!(
                "serversync run exited with {} after SIGTERM:\n{}",
                exit.describe(),
                relay::log_tail(&started.log, 20)
            );
        }
        Ok(exit)
    }
}

/// Database-side evidence of where a drain's time goes.
pub struct Profiler {
    stop: watch::Sender<bool>,
    sampler: tokio::task::JoinHandle<BTreeMap<String, u64>>,
}

impl Profiler {
    /// Reset pg_stat_statements and sample the wait events of the relay's backends
    /// every 10 ms until `finish`. The sampler connects to the `postgres` database
    /// when it can, so its own queries stay out of the scenario database's counts.
    pub async fn start(db: &Database) -> anyhow::Result<Profiler> {
        db.exec("SELECT pg_stat_statements_reset()").await?;
        let (stop, mut stopped) = watch::channel(false);
        let pool = match crate::pg::with_database(&db.url, "postgres") {
            Ok(url) => sqlx::PgPool::connect(&url)
                .await
                .unwrap_or_else(|_| db.pool.clone()),
            Err(_) => db.pool.clone(),
        };
        let name = db.name.clone();
        let sampler = tokio::spawn(async move {
            let mut counts = BTreeMap::new();
            // bounded: one sample per 10 ms for at most an hour
            for _ in 0..360_000 {
                if *stopped.borrow() {
                    break;
                }
                let rows: Result<Vec<(String, i64)>, _> = sqlx::query_as(
                    "SELECT CASE WHEN state = 'active' \
                                 THEN COALESCE(wait_event_type || ':' || wait_event, 'CPU') \
                                 ELSE COALESCE(state, '?') END, count(*) \
                     FROM pg_stat_activity \
                     WHERE application_name = 'serversync' AND datname = $1 GROUP BY 1",
                )
                .bind(&name)
                .fetch_all(&pool)
                .await;
                for (state, n) in rows.into_iter().flatten() {
                    *counts.entry(state).or_insert(0) += n as u64;
                }
                tokio::select! {
                    _ = stopped.changed() => {}
                    _ = tokio::time::sleep(Duration::from_millis(10)) => {}
                }
            }
            counts
        });
        Ok(Profiler { stop, sampler })
    }

    /// Print the top statements and the wait-event breakdown (markdown).
    pub async fn finish(self, db: &Database) -> anyhow::Result<String> {
        let _ = self.stop.send(true);
        let waits = self.sampler.await.unwrap_or_default();
        let mut out = String::new();
        let rows: Vec<(i64, f64, f64, i64, i64, i64, String)> = sqlx::query_as(
            "SELECT calls, total_exec_time, mean_exec_time, rows, shared_blks_hit + shared_blks_read, \
                    wal_bytes::bigint, \
                    left(regexp_replace(query, '\\s+', ' ', 'g'), 100) \
             FROM pg_stat_statements \
             WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
               AND query NOT LIKE '%pg_stat_activity%' AND query NOT LIKE '%pg_stat_statements%' \
             ORDER BY total_exec_time DESC LIMIT 10",
        )
        .fetch_all(&db.pool)
        .await
        .context("reading pg_stat_statements")?;
        out.push_str(
            "| calls | total ms | mean ms | rows | buffers/call | WAL MiB | statement |\n\
             |---:|---:|---:|---:|---:|---:|---|\n",
        );
        for (calls, total, mean, n, buffers, wal, query) in rows {
            out.push_str(&format!(
                "| {calls} | {total:.0} | {mean:.3} | {n} | {:.0} | {:.1} | `{}` |\n",
                buffers as f64 / calls.max(1) as f64,
                wal as f64 / 1048576.0,
                query.replace('|', "\\|")
            ));
        }
        let total: u64 = waits.values().sum();
        if total > 0 {
            let mut sorted: Vec<_> = waits.into_iter().collect();
            sorted.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
            out.push_str("\nrelay backends, sampled every 10 ms:\n\n| state / wait event | share |\n|---|---:|\n");
            for (state, n) in sorted {
                out.push_str(&format!(
                    "| {state} | {:.1} % |\n",
                    100.0 * n as f64 / total as f64
                ));
            }
        }
        Ok(out)
    }
}
