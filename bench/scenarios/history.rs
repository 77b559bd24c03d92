//! `history` (manual; slow): does a long delivered history slow the queue down?
//! The same pending backlog is drained (a `--max-rows` slice) once next to millions
//! of delivered records in `sync_outbox_sent` and once with none; the claim's plan is
//! printed for both and must not scan `sync_outbox` sequentially.

use anyhow::Context;
use sqlx::Row;

use super::drain::{self, Figures};
use super::Ctx;
use crate::load;
use crate::report::{thousands, Report};

/// The product's claim with literal parameters, for EXPLAIN: the first of two claim
/// lanes (the default), whose share of the keys hashes below 0.
const CLAIM_EXPLAIN_SQL: &str = r#"
EXPLAIN (ANALYZE, BUFFERS)
WITH cand AS (
    SELECT o.ctid FROM sync_outbox o
    WHERE o.next_attempt_at <= now()
      AND (o.lease_until IS NULL OR o.lease_until < now())
      AND hashtext(COALESCE(o.ordering_key, o.id::text)) < 0
      AND (o.ordering_key IS NULL OR NOT EXISTS (
            SELECT 1 FROM sync_outbox p
            WHERE p.ordering_key = o.ordering_key AND p.id < o.id))
    ORDER BY o.id
    LIMIT 100
    FOR UPDATE SKIP LOCKED
)
UPDATE sync_outbox o
SET claim_token = 42, lease_owner = 'explain', lease_until = now() + 60000 * interval '1 millisecond'
WHERE o.ctid = ANY(ARRAY(SELECT ctid FROM cand))
RETURNING o.id, o.entity_type, o.entity_id, o.payload::text AS payload, o.created_at, o.attempts, o.ordering_key
"#;

pub struct Outcome {
    pub sent: u64,
    pub figures: Figures,
}

pub async fn run(
    ctx: &Ctx,
    pending: u64,
    sent: u64,
    max_rows: u64,
    report: &mut Report,
) -> anyhow::Result<Vec<Outcome>> {
    let mut outcomes = Vec::new();
    for (name, history) in [("history", sent), ("history_empty", 0)] {
        let db = ctx.migrated_db(name).await?;
        let started = std::time::Instant::now();
        if history > 0 {
            load::history(&db, history).await?;
        }
        let loaded = load::outbox(&db, pending, ctx.layout).await?;
        println!(
            "history: {} delivered + {} pending rows loaded in {:.0}s",
            thousands(history as f64),
            thousands(loaded.ids.len() as f64),
            started.elapsed().as_secs_f64()
        );
        let plan = explain(&db).await?;
        println!(
            "history: claim plan with {} delivered records:\n{plan}",
            thousands(history as f64)
        );
        if plan.lines().any(|l| l.contains("Seq Scan on sync_outbox ")) {
            report.problems([format!(
                "history: the claim scans sync_outbox sequentially ({name})"
            )]);
        }
        let figures = drain::measure(ctx, &db, &loaded, Some(max_rows), report).await?;
        drain::print_figures(name, &figures);
        outcomes.push(Outcome {
            sent: history,
            figures,
        });
        ctx.server.drop_database(db).await?;
    }
    Ok(outcomes)
}

/// EXPLAIN ANALYZE runs the UPDATE: do it in a transaction that is rolled back.
async fn explain(db: &crate::pg::Database) -> anyhow::Result<String> {
    let mut tx = db.pool.begin().await?;
    let rows = sqlx::query(CLAIM_EXPLAIN_SQL)
        .fetch_all(&mut *tx)
        .await
        .context("EXPLAIN of the claim")?;
    tx.rollback().await?;
    let mut lines = Vec::with_capacity(rows.len());
    for row in rows {
        lines.push(row.try_get::<String, _>(0)?);
    }
    Ok(lines.join("\n"))
}

pub fn add_to_report(report: &mut Report, outcomes: &[Outcome]) {
    for o in outcomes {
        report.info(
            "history",
            &format!(
                "drain slice next to {} delivered records",
                thousands(o.sent as f64)
            ),
            format!("{} rows/s", thousands(o.figures.rows_per_s)),
        );
    }
    if let [with, without] = outcomes {
        let ratio = 100.0 * with.figures.rows_per_s / without.figures.rows_per_s.max(1.0);
        report.target(
            "history",
            "with history vs without",
            format!("{ratio:.0} %"),
            "≈ 100 % (no slow-down)",
            ratio >= 90.0,
        );
    }
}
