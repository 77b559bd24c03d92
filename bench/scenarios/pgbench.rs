//! `pgbench`: the database's own limit for claiming 100 rows and settling them, with
//! no relay and no HTTP — the ceiling a relay can approach. Three ways to settle:
//!
//! - `mark_sent`: update the row in place (`status = 'sent'`); the claim then has to
//!   skip delivered rows, so it gets partial indexes on `status = 'pending'`;
//! - `delete`: delete the row (`retention.delete_sent = true`);
//! - `archive`: move it to `sync_outbox_sent` in one statement (the product's default).
//!
//! Each pgbench transaction is the relay's pair: the claim (the product's CLAIM_SQL,
//! committed on its own, without waiting for the WAL flush) then the settle. The
//! claim's ids go to the settle through `\gset`; the payloads are rendered as text as
//! the relay's claim does, but not sent to the client.
//!
//! With `--pgbench-reference`, two protocols without a per-row lease are measured too,
//! to calibrate this machine against the issue's figures (which job queues and
//! hand-written relays reach): one `DELETE … RETURNING` that claims and settles at
//! once (nothing survives a crash mid-delivery), and a transaction held open from
//! the claim (`FOR UPDATE SKIP LOCKED`, rows locked, not leased) to the archive.
//! Neither is what the product does; both run on the same loaded table.

use std::time::Duration;

use anyhow::{bail, Context};

use super::Ctx;
use crate::load;
use crate::report::{thousands, Report};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    MarkSent,
    Delete,
    Archive,
    /// reference, not the product: claim and delete in one statement, no lease
    OneStatementDelete,
    /// reference, not the product: claim by row locks in a transaction held open
    /// until the archive, no lease
    HeldArchive,
}

impl Strategy {
    pub const ALL: [Strategy; 3] = [Strategy::MarkSent, Strategy::Delete, Strategy::Archive];
    pub const REFERENCE: [Strategy; 2] = [Strategy::OneStatementDelete, Strategy::HeldArchive];

    pub fn name(self) -> &'static str {
        match self {
            Strategy::MarkSent => "claim + mark sent",
            Strategy::Delete => "claim + delete",
            Strategy::Archive => "claim + archive",
            Strategy::OneStatementDelete => "reference: DELETE … RETURNING, no lease",
            Strategy::HeldArchive => "reference: locks held across the batch + archive, no lease",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Outcome {
    pub strategy: Strategy,
    pub tps: f64,
    pub rows_per_s: f64,
    pub rows_per_txn: f64,
    /// PostgreSQL CPU per 10,000 rows moved, when the server is visible.
    pub pg_cpu_per_10k: Option<f64>,
}

/// For mark_sent: what an in-place design needs so the claim skips delivered rows.
const MARK_SENT_SCHEMA: &str = r#"
ALTER TABLE sync_outbox ADD COLUMN sent_at timestamptz;
DROP INDEX sync_outbox_ordering_key_hash_id;
CREATE INDEX sync_outbox_pending_ordering_key_hash_id ON sync_outbox (ordering_key_hash, id)
    WHERE ordering_key_hash IS NOT NULL AND status = 'pending';
CREATE INDEX sync_outbox_pending_id ON sync_outbox (id) WHERE status = 'pending';
"#;

fn claim(pending_only: bool) -> String {
    let (outer, inner) = if pending_only {
        ("o.status = 'pending' AND ", "p.status = 'pending' AND ")
    } else {
        ("", "")
    };
    format!(
        r#"\set tok random(1, 1000000000)
WITH cand AS (
    SELECT o.ctid FROM sync_outbox o
    WHERE {outer}o.next_attempt_at <= now()
      AND (o.lease_until IS NULL OR o.lease_until < now())
      AND (o.ordering_key_hash IS NULL OR NOT EXISTS (
            SELECT 1 FROM sync_outbox p
            WHERE {inner}p.ordering_key_hash = o.ordering_key_hash AND p.id < o.id))
    ORDER BY o.id
    LIMIT 100
    FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE sync_outbox o
    SET claim_token = :tok, lease_owner = 'pgbench', lease_until = now() + 60000 * interval '1 millisecond'
    WHERE o.ctid = ANY(ARRAY(SELECT ctid FROM cand))
      AND (SELECT set_config('synchronous_commit', 'off', true)) IS NOT NULL
    RETURNING o.id, o.entity_type, o.entity_id, o.payload::text AS payload, o.created_at, o.attempts, o.ordering_key
)
SELECT COALESCE(array_agg(id), '{{}}') AS ids, COALESCE(sum(length(payload)), 0) AS bytes FROM claimed
\gset
"#
    )
}

/// The product's head-of-key rule, without its lease: rows are locked by the held
/// transaction instead.
const HELD_CLAIM: &str = r#"BEGIN;
SELECT COALESCE(array_agg(id), '{}') AS ids, COALESCE(sum(length(payload)), 0) AS bytes FROM (
    SELECT o.id, o.payload::text AS payload FROM sync_outbox o
    WHERE o.next_attempt_at <= now()
      AND (o.ordering_key_hash IS NULL OR NOT EXISTS (
            SELECT 1 FROM sync_outbox p
            WHERE p.ordering_key_hash = o.ordering_key_hash AND p.id < o.id))
    ORDER BY o.id
    LIMIT 100
    FOR UPDATE SKIP LOCKED
) c
\gset
"#;

const ARCHIVE_SETTLE: &str = "WITH d AS (\n    DELETE FROM sync_outbox WHERE id = ANY(CAST(:ids AS bigint[])) AND claim_token = :tok\n    \
     RETURNING id, entity_type, entity_id, created_at, attempts\n)\n\
     INSERT INTO sync_outbox_sent (id, entity_type, entity_id, created_at, attempts)\n\
     SELECT id, entity_type, entity_id, created_at, attempts + 1 FROM d;\n";

fn script(strategy: Strategy) -> String {
    let settle = match strategy {
        Strategy::MarkSent => {
            "UPDATE sync_outbox SET status = 'sent', sent_at = now(), attempts = attempts + 1, \
             claim_token = NULL, lease_owner = NULL, lease_until = NULL \
             WHERE id = ANY(CAST(:ids AS bigint[])) AND claim_token = :tok;\n"
        }
        Strategy::Delete => "DELETE FROM sync_outbox WHERE id = ANY(CAST(:ids AS bigint[])) AND claim_token = :tok;\n",
        Strategy::Archive => ARCHIVE_SETTLE,
        Strategy::OneStatementDelete => {
            // what a queue without leases does: nothing is held while delivering
            return "WITH c AS (SELECT id FROM sync_outbox ORDER BY id LIMIT 100 FOR UPDATE SKIP LOCKED)\n\
                    DELETE FROM sync_outbox o USING c WHERE o.id = c.id\n\
                    RETURNING o.id, o.entity_type, o.entity_id, o.payload::text, o.created_at;\n"
                .to_string();
        }
        Strategy::HeldArchive => {
            let settle = ARCHIVE_SETTLE.replace(" AND claim_token = :tok", "");
            return format!("{HELD_CLAIM}{settle}COMMIT;\n");
        }
    };
    format!("{}{settle}", claim(strategy == Strategy::MarkSent))
}

pub async fn run(
    ctx: &Ctx,
    rows: u64,
    seconds: u64,
    clients: u32,
    reference: bool,
    report: &mut Report,
) -> anyhow::Result<Vec<Outcome>> {
    let pgbench = crate::pg::pg_bin("pgbench");
    let mut outcomes = Vec::new();
    let extra: &[Strategy] = if reference { &Strategy::REFERENCE } else { &[] };
    for &strategy in Strategy::ALL.iter().chain(extra) {
        // a fresh database per strategy: the table is reloaded, no dead tuples carried over
        let db = ctx.migrated_db("pgbench").await?;
        if strategy == Strategy::MarkSent {
            db.exec(MARK_SENT_SCHEMA).await?;
        }
        // the lease-free one-statement delete moves about twice what the leased
        // strategies do (100,000 rows/s here): give it twice the rows, or a 10 s run
        // empties a 1,000,000-row queue before its end
        let rows = if strategy == Strategy::OneStatementDelete {
            rows.saturating_mul(2)
        } else {
            rows
        };
        load::outbox(&db, rows, ctx.layout).await?;
        let pending_sql = "SELECT count(*) FROM sync_outbox WHERE status = 'pending'";
        let before = db.count(pending_sql).await?;
        let path = ctx.dir.join(format!("pgbench-{strategy:?}.sql"));
        std::fs::write(&path, script(strategy))
            .with_context(|| format!("writing {}", path.display()))?;
        let url = ctx.server.libpq_url(&db.name)?;
        let pg_before = ctx.server.cpu();
        let mut cmd = tokio::process::Command::new(&pgbench);
        cmd.args(["-n", "-M", "prepared", "-f"])
            .arg(&path)
            .args([
                "-c",
                &clients.to_string(),
                "-j",
                &clients.to_string(),
                "-T",
                &seconds.to_string(),
            ])
            .arg(&url)
            // as the relay's sessions run (store/postgres.rs `no_jit`)
            .env("PGOPTIONS", "-c jit=off")
            .kill_on_drop(true);
        let out = tokio::time::timeout(Duration::from_secs(seconds + 120), cmd.output())
            .await
            .context("pgbench did not finish in time")?
            .with_context(|| format!("cannot run {}", pgbench.display()))?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        if !out.status.success() {
            bail!(
                "pgbench failed ({}):\n{text}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // pgbench's backends have exited: let the postmaster reap them
        tokio::time::sleep(Duration::from_millis(300)).await;
        let pg_cpu = ctx
            .server
            .cpu()
            .zip(pg_before)
            .map(|(a, b)| a.saturating_sub(b));
        let after = db.count(pending_sql).await?;
        let tps = field(&text, "tps = ").context("no tps in pgbench's output")?;
        let txns = field(&text, "number of transactions actually processed: ")
            .context("no transaction count")?;
        let moved = (before - after) as f64;
        if after < i64::from(clients) * 100 {
            report.problems([format!(
                "pgbench {}: the queue ran dry ({after} rows left); raise --pgbench-rows",
                strategy.name()
            )]);
        }
        let rows_per_txn = moved / txns.max(1.0);
        let outcome = Outcome {
            strategy,
            tps,
            rows_per_s: tps * rows_per_txn,
            rows_per_txn,
            pg_cpu_per_10k: pg_cpu.map(|c| c.as_secs_f64() * 10_000.0 / moved.max(1.0)),
        };
        println!(
            "pgbench {}: {:.0} tps × {:.1} rows = {} rows/s, PostgreSQL CPU {} \
             (-c {clients} -j {clients} -T {seconds}, {} rows loaded)",
            strategy.name(),
            tps,
            rows_per_txn,
            thousands(outcome.rows_per_s),
            outcome
                .pg_cpu_per_10k
                .map(|c| format!("{c:.3} s/10k rows"))
                .unwrap_or_else(|| "n/a".into()),
            thousands(rows as f64)
        );
        outcomes.push(outcome);
        ctx.server.drop_database(db).await?;
    }
    Ok(outcomes)
}

/// The number after `label` in pgbench's report.
fn field(text: &str, label: &str) -> Option<f64> {
    let rest = &text[text.find(label)? + label.len()..];
    rest.split_whitespace().next()?.parse().ok()
}

pub fn add_to_report(report: &mut Report, outcomes: &[Outcome], clients: u32) {
    for o in outcomes {
        let cpu = o
            .pg_cpu_per_10k
            .map(|c| format!(", PostgreSQL CPU {c:.3} s / 10k rows"))
            .unwrap_or_default();
        report.info(
            "pgbench",
            &format!("{} (-c {clients})", o.strategy.name()),
            format!(
                "{} rows/s ({:.0} tps × {:.0} rows{cpu})",
                thousands(o.rows_per_s),
                o.tps,
                o.rows_per_txn
            ),
        );
    }
}

/// Per strategy, the outcome of median throughput over rounds.
pub fn medians(rounds: &[Vec<Outcome>]) -> Vec<Outcome> {
    Strategy::ALL
        .iter()
        .chain(&Strategy::REFERENCE)
        .filter_map(|&strategy| {
            let mut runs: Vec<&Outcome> = rounds
                .iter()
                .flatten()
                .filter(|o| o.strategy == strategy)
                .collect();
            runs.sort_by(|a, b| a.rows_per_s.total_cmp(&b.rows_per_s));
            runs.get(runs.len().saturating_sub(1) / 2)
                .map(|o| (*o).clone())
        })
        .collect()
}

fn settle_strategy(delete_sent: bool) -> Strategy {
    if delete_sent {
        Strategy::Delete
    } else {
        Strategy::Archive
    }
}

/// The relay's drain as a share of the database's limit for its settle strategy.
pub fn relay_share(
    report: &mut Report,
    outcomes: &[Outcome],
    drain_rows_per_s: f64,
    delete_sent: bool,
) {
    let wanted = settle_strategy(delete_sent);
    if let Some(o) = outcomes.iter().find(|o| o.strategy == wanted) {
        let share = 100.0 * drain_rows_per_s / o.rows_per_s.max(1.0);
        report.target(
            "drain",
            &format!("share of the pgbench limit ({})", o.strategy.name()),
            format!("{share:.0} %"),
            "≥ 80 %",
            share >= 80.0,
        );
    }
}

/// The same share for each round (drain and pgbench run one after the other).
pub fn relay_share_by_round(
    report: &mut Report,
    rounds: &[Vec<Outcome>],
    drain_rows_per_s: &[f64],
    delete_sent: bool,
) {
    let wanted = settle_strategy(delete_sent);
    let shares: Vec<String> = rounds
        .iter()
        .zip(drain_rows_per_s)
        .filter_map(|(outcomes, drain)| {
            let o = outcomes.iter().find(|o| o.strategy == wanted)?;
            Some(format!("{:.0} %", 100.0 * drain / o.rows_per_s.max(1.0)))
        })
        .collect();
    report.info(
        "drain",
        "share of the pgbench limit, round by round",
        shares.join(", "),
    );
}
