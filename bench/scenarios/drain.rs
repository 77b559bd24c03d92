//! `drain`: a pre-loaded backlog delivered by `serversync drain`, measured from the
//! process's start to the last delivery at the sink.

use std::time::Duration;

use anyhow::bail;

use super::{Ctx, Profiler};
use crate::load::{self, Layout, Loaded};
use crate::pg::Database;
use crate::relay::{self, Run};
use crate::report::{thousands, Report};
use crate::sink::{out_of_order, tally, Tally};

/// The figures of one drain.
#[derive(Debug, Clone)]
pub struct Figures {
    pub rows: u64,
    /// Process start → last delivery.
    pub seconds: f64,
    pub rows_per_s: f64,
    /// First → last delivery (without start-up).
    pub steady_rows_per_s: f64,
    pub relay_cpu_per_10k: f64,
    pub relay_rss_mib: f64,
    pub pg_cpu_per_10k: Option<f64>,
    /// The sink's and the bench's own CPU (it shares the machine).
    pub bench_cpu_per_10k: f64,
    pub xact_per_row: f64,
    /// JSON requests the sink answered.
    pub requests: u64,
    /// Rows the sink got while an earlier row of their key was unanswered, or
    /// before it (`sink::out_of_order`); 0 unless ordering broke.
    pub out_of_order: usize,
    pub profile: Option<String>,
}

/// The default scenario: load `rows` in `layout`, drain them all, verify.
pub async fn run(
    ctx: &Ctx,
    rows: u64,
    layout: Layout,
    report: &mut Report,
) -> anyhow::Result<Figures> {
    let db = ctx.migrated_db("drain").await?;
    let loaded = load::outbox(&db, rows, layout).await?;
    println!(
        "drain: loaded {} rows ({:.0} B payloads, {} ordering keys) in {:.1}s",
        thousands(loaded.ids.len() as f64),
        loaded.avg_payload_bytes,
        thousands(loaded.ordering_keys as f64),
        loaded.seconds
    );
    let figures = measure(ctx, &db, &loaded, None, report).await?;
    let left = db.count("SELECT count(*) FROM sync_outbox").await?;
    let sent = db.count("SELECT count(*) FROM sync_outbox_sent").await?;
    let dead = db
        .count("SELECT count(*) FROM sync_outbox_dead_letters")
        .await?;
    if left != 0 {
        report.problems([format!("drain: {left} rows are still in sync_outbox")]);
    }
    if dead != 0 {
        report.problems([format!("drain: {dead} rows were dead-lettered")]);
    }
    let expect_sent = if ctx.relay_deletes_sent() {
        0
    } else {
        loaded.ids.len() as i64
    };
    if sent != expect_sent {
        report.problems([format!(
            "drain: sync_outbox_sent holds {sent} rows, expected {expect_sent}"
        )]);
    }
    print_figures("drain", &figures);
    ctx.server.drop_database(db).await?;
    Ok(figures)
}

/// Run `serversync drain` (of `max_rows` when given) against a loaded database.
pub async fn measure(
    ctx: &Ctx,
    db: &Database,
    loaded: &Loaded,
    max_rows: Option<u64>,
    report: &mut Report,
) -> anyhow::Result<Figures> {
    ctx.sink.clear();
    let max_arg = max_rows.map(|m| m.to_string());
    let mut command = vec!["drain"];
    if let Some(m) = &max_arg {
        command.extend(["--max-rows", m.as_str()]);
    }
    let rows = max_rows
        .unwrap_or(loaded.ids.len() as u64)
        .min(loaded.ids.len() as u64);
    let limit = Duration::from_secs(120 + rows / 1000);

    let xact_before = db.xact_commit().await?;
    let profiler = if ctx.profile {
        Some(Profiler::start(db).await?)
    } else {
        None
    };
    let pg_before = ctx.server.cpu();
    let bench_before = crate::procs::self_cpu();
    let mut started = ctx.relay.spawn(&Run {
        command: &command,
        database_url: &db.url,
        ingest_url: &ctx.sink.url,
        metrics: false,
        env: Vec::new(),
    })?;
    let exit = started.child.wait(limit).await?;
    let bench_cpu = crate::procs::self_cpu().saturating_sub(bench_before);
    let profile = match profiler {
        Some(p) => Some(p.finish(db).await?),
        None => None,
    };
    // exited backends are reaped by the postmaster and their statistics flushed
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pg_cpu = ctx
        .server
        .cpu()
        .zip(pg_before)
        .map(|(after, before)| after.saturating_sub(before));
    let xact = db.xact_commit().await? - xact_before;

    let output = relay::log_tail(&started.log, 5);
    if exit.code != Some(0) {
        bail!(
            "serversync drain exited with {}:\n{output}",
            exit.describe()
        );
    }
    let arrivals = ctx.sink.arrivals();
    let (requests, rejected) = ctx.sink.requests();
    if rejected > 0 {
        report.problems([format!(
            "drain: the sink refused {rejected} malformed requests"
        )]);
    }
    let t = tally(&arrivals, &loaded.ids);
    let out_of_order = out_of_order(&arrivals, &ctx.sink.answered(), &loaded.keyed);
    if out_of_order > 0 {
        report.problems([format!(
            "drain: {out_of_order} rows reached the sink while an earlier row of their \
             ordering key was unanswered, or before it"
        )]);
    }
    match max_rows {
        None => report.problems(t.problems("drain")),
        Some(m) => {
            // a slice: rows left behind are expected, not lost
            let slice = Tally {
                lost: 0,
                ..t.clone()
            };
            report.problems(slice.problems("drain"));
            let want = m.min(loaded.ids.len() as u64);
            if t.distinct as u64 != want {
                report.problems([format!(
                    "serversync drain --max-rows {m} delivered {} rows; expected exactly {want}",
                    t.distinct
                )]);
            }
        }
    }
    let start_us = started
        .started_wall
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)?;
    let seconds = (t.last_us - start_us).max(1) as f64 / 1e6;
    let per_10k = |d: Duration| d.as_secs_f64() * 10_000.0 / rows.max(1) as f64;
    let figures = Figures {
        rows,
        seconds,
        rows_per_s: t.distinct as f64 / seconds,
        steady_rows_per_s: t.distinct as f64 / ((t.last_us - t.first_us).max(1) as f64 / 1e6),
        relay_cpu_per_10k: per_10k(exit.cpu),
        relay_rss_mib: exit.max_rss_mib(),
        pg_cpu_per_10k: pg_cpu.map(per_10k),
        bench_cpu_per_10k: per_10k(bench_cpu),
        xact_per_row: xact as f64 / rows.max(1) as f64,
        requests,
        out_of_order,
        profile,
    };
    println!("relay said: {}", output.lines().last().unwrap_or("").trim());
    Ok(figures)
}

pub fn print_figures(label: &str, f: &Figures) {
    println!(
        "{label}: {} rows in {:.2}s = {} rows/s ({} rows/s first→last delivery); {} out of their key's order",
        thousands(f.rows as f64),
        f.seconds,
        thousands(f.rows_per_s),
        thousands(f.steady_rows_per_s),
        f.out_of_order
    );
    println!(
        "{label}: relay CPU {:.3} s/10k rows, peak RSS {:.1} MiB; PostgreSQL CPU {}; sink+bench CPU {:.3} s/10k; {:.3} transactions/row; {:.1} rows/request",
        f.relay_cpu_per_10k,
        f.relay_rss_mib,
        f.pg_cpu_per_10k.map(|c| format!("{c:.3} s/10k rows")).unwrap_or_else(|| "n/a".into()),
        f.bench_cpu_per_10k,
        f.xact_per_row,
        f.rows as f64 / f.requests.max(1) as f64
    );
    if let Some(p) = &f.profile {
        println!("\n{label}: top statements (pg_stat_statements) during the drain:\n\n{p}");
    }
}

/// Figures with targets (SPEC of the "Performance" issue).
pub fn add_to_report(report: &mut Report, f: &Figures) {
    let s = "drain";
    report.info(s, "rows", thousands(f.rows as f64));
    report.target(
        s,
        "throughput (start → last delivery)",
        format!("{} rows/s", thousands(f.rows_per_s)),
        "≥ 60,000 rows/s",
        f.rows_per_s >= 60_000.0,
    );
    report.info(
        s,
        "throughput (first → last delivery)",
        format!("{} rows/s", thousands(f.steady_rows_per_s)),
    );
    report.target(
        s,
        "relay CPU",
        format!("{:.3} s / 10k rows", f.relay_cpu_per_10k),
        "≤ 0.1 s / 10k rows",
        f.relay_cpu_per_10k <= 0.1,
    );
    report.target(
        s,
        "relay peak RSS",
        format!("{:.1} MiB", f.relay_rss_mib),
        "≤ 40 MiB",
        f.relay_rss_mib <= 40.0,
    );
    if let Some(c) = f.pg_cpu_per_10k {
        report.info(s, "PostgreSQL CPU", format!("{c:.3} s / 10k rows"));
    }
    report.info(
        s,
        "sink + bench CPU",
        format!("{:.3} s / 10k rows", f.bench_cpu_per_10k),
    );
    report.info(
        s,
        "database transactions",
        format!("{:.3} / row", f.xact_per_row),
    );
    report.info(
        s,
        "rows per HTTP request",
        format!("{:.1}", f.rows as f64 / f.requests.max(1) as f64),
    );
}
