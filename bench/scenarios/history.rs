//! `history` (manual; slow): does a long delivered history slow the queue down?
//! The same pending backlog is drained (a `--max-rows` slice) once next to millions
//! of delivered records in `sync_outbox_sent` and once with none; the claim's plan is
//! printed for both and must not scan `sync_outbox` sequentially.

use super::drain::{self, Figures};
use super::Ctx;
use crate::load;
use crate::report::{thousands, Report};
use serversync::config::DispatchSettings;
use serversync::store::{KeyShare, PgStore};

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

/// The product's claim (`PgStore::explain_claim`, so the plan is the relay's) as the
/// first of the default claim lanes (`dispatch.claim_concurrency`) makes it while a
/// backlog drains: 100 rows from its share of the keys, from the oldest row.
async fn explain(db: &crate::pg::Database) -> anyhow::Result<String> {
    let share = KeyShare {
        index: 0,
        of: DispatchSettings::default().claim_concurrency,
    };
    PgStore::explain_claim(&db.pool, "ANALYZE, BUFFERS", 100, Some(share)).await
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
