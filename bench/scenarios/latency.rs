//! `latency`: rows committed at a steady rate while `serversync run` delivers them.
//! Latency is sink arrival minus the moment the producer's commit returned, both on
//! this machine's wall clock.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::Ctx;
use crate::pg;
use crate::report::{percentile, thousands, Report};
use crate::sink::{now_us, tally};

#[derive(Debug, Clone)]
pub struct Figures {
    pub rows: usize,
    pub achieved_rate: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub min_ms: f64,
    /// How late the producers got behind their schedule at worst.
    pub max_schedule_lag_ms: f64,
    /// The same percentiles from the server's clock at the end of the INSERT (just
    /// before its commit): immune to the producer task being scheduled late.
    pub server_p50_ms: f64,
    pub server_p99_ms: f64,
}

/// `clock_timestamp()` is read as the row is inserted, just before the commit.
/// One producer's row: when its commit returned here, and the server's clock when it
/// was inserted.
struct Committed {
    id: i64,
    committed_us: i64,
    inserted_us: i64,
}

const INSERT_SQL: &str = "INSERT INTO sync_outbox (entity_type, entity_id, payload) \
     VALUES ('call_log', $1, $2::jsonb) \
     RETURNING id, (extract(epoch FROM clock_timestamp()) * 1000000)::bigint";

/// A call_log of about 300 bytes, like the drain's.
fn payload(producer: u32) -> String {
    serde_json::json!({
        "id": uuid::Uuid::new_v4(),
        "direction": "inbound",
        "fromNumber": "+493012345678",
        "toNumber": "+494098765432",
        "startedAt": "2026-02-07T10:05:30Z",
        "endedAt": "2026-02-07T10:09:12Z",
        "durationSeconds": 222,
        "agentId": uuid::Uuid::new_v4(),
        "status": "completed",
        "producer": producer,
        "tags": ["bench", "inbound", "sales"],
    })
    .to_string()
}

pub async fn run(
    ctx: &Ctx,
    rate: u32,
    seconds: u64,
    producers: u32,
    report: &mut Report,
) -> anyhow::Result<Figures> {
    let db = ctx.migrated_db("latency").await?;
    let started = ctx.start_daemon(&db).await?;
    ctx.sink.clear();
    let total = u64::from(rate.max(1)) * seconds;
    let producers = producers.clamp(1, 64);
    let interval_ns = 1e9 / f64::from(rate.max(1));
    let t0 = Instant::now() + Duration::from_millis(200);
    let mut tasks = JoinSet::new();
    for k in 0..producers {
        let mut conn = pg::connect(&db.url).await?;
        let body = payload(k);
        tasks.spawn(async move {
            let mut committed = Vec::with_capacity((total / u64::from(producers) + 1) as usize);
            let mut max_lag = Duration::ZERO;
            let mut i = u64::from(k);
            while i < total {
                let due = t0 + Duration::from_nanos((i as f64 * interval_ns) as u64);
                tokio::time::sleep_until(due).await;
                max_lag = max_lag.max(Instant::now().saturating_duration_since(due));
                let (id, inserted_us): (i64, i64) = sqlx::query_as(INSERT_SQL)
                    .bind(uuid::Uuid::new_v4())
                    .bind(&body)
                    .fetch_one(&mut conn)
                    .await
                    .context("a producer's insert failed")?;
                committed.push(Committed {
                    id,
                    committed_us: now_us(),
                    inserted_us,
                });
                i += u64::from(producers);
            }
            anyhow::Ok((committed, max_lag))
        });
    }
    let mut committed = Vec::with_capacity(total as usize);
    let mut max_lag = Duration::ZERO;
    while let Some(joined) = tasks.join_next().await {
        let (rows, lag) = joined.context("a producer panicked")??;
        committed.extend(rows);
        max_lag = max_lag.max(lag);
    }
    let produced_s = (Instant::now() - t0).as_secs_f64();
    let want = committed.len();
    ctx.sink
        .wait_until(Duration::from_secs(30), |s| s.arrival_count() >= want)
        .await;
    // a little longer, so a duplicate would be seen
    tokio::time::sleep(Duration::from_millis(200)).await;
    let exit = ctx.stop_daemon(started).await;

    let arrivals = ctx.sink.arrivals();
    let mut ids: Vec<i64> = committed.iter().map(|c| c.id).collect();
    ids.sort_unstable();
    let t = tally(&arrivals, &ids);
    report.problems(t.problems("latency"));
    if let Err(e) = exit {
        report.problems([format!("latency: {e:#}")]);
    }
    let mut first: HashMap<i64, i64> = HashMap::with_capacity(arrivals.len());
    for a in &arrivals {
        first
            .entry(a.id)
            .and_modify(|t| *t = (*t).min(a.at_us))
            .or_insert(a.at_us);
    }
    let latencies = |since: fn(&Committed) -> i64| {
        let mut ms: Vec<f64> = committed
            .iter()
            .filter_map(|c| {
                first
                    .get(&c.id)
                    .map(|arrived| (arrived - since(c)) as f64 / 1000.0)
            })
            .collect();
        ms.sort_by(f64::total_cmp);
        ms
    };
    let ms = latencies(|c| c.committed_us);
    let server_ms = latencies(|c| c.inserted_us);
    let figures = Figures {
        rows: want,
        achieved_rate: want as f64 / produced_s.max(1e-3),
        p50_ms: percentile(&ms, 50.0),
        p95_ms: percentile(&ms, 95.0),
        p99_ms: percentile(&ms, 99.0),
        max_ms: ms.last().copied().unwrap_or(f64::NAN),
        min_ms: ms.first().copied().unwrap_or(f64::NAN),
        max_schedule_lag_ms: max_lag.as_secs_f64() * 1000.0,
        server_p50_ms: percentile(&server_ms, 50.0),
        server_p99_ms: percentile(&server_ms, 99.0),
    };
    println!(
        "latency: {} rows at {:.0} rows/s ({producers} producers, worst schedule lag {:.1} ms): \
         p50 {:.2} ms, p95 {:.2} ms, p99 {:.2} ms, max {:.2} ms, min {:.2} ms; \
         from the server's insert time: p50 {:.2} ms, p99 {:.2} ms",
        thousands(want as f64),
        figures.achieved_rate,
        figures.max_schedule_lag_ms,
        figures.p50_ms,
        figures.p95_ms,
        figures.p99_ms,
        figures.max_ms,
        figures.min_ms,
        figures.server_p50_ms,
        figures.server_p99_ms
    );
    ctx.server.drop_database(db).await?;
    Ok(figures)
}

pub fn add_to_report(report: &mut Report, f: &Figures) {
    let s = "latency";
    report.info(
        s,
        "rate",
        format!(
            "{:.0} rows/s, {} rows",
            f.achieved_rate,
            thousands(f.rows as f64)
        ),
    );
    report.target(
        s,
        "commit → delivery p50",
        format!("{:.2} ms", f.p50_ms),
        "≤ 2 ms",
        f.p50_ms <= 2.0,
    );
    report.info(s, "commit → delivery p95", format!("{:.2} ms", f.p95_ms));
    report.target(
        s,
        "commit → delivery p99",
        format!("{:.2} ms", f.p99_ms),
        "≤ 8 ms",
        f.p99_ms <= 8.0,
    );
    report.info(s, "commit → delivery max", format!("{:.2} ms", f.max_ms));
    report.info(
        s,
        "insert (server clock) → delivery p50 / p99",
        format!("{:.2} / {:.2} ms", f.server_p50_ms, f.server_p99_ms),
    );
    report.info(
        s,
        "producers' worst lag behind schedule",
        format!("{:.1} ms", f.max_schedule_lag_ms),
    );
}
