//! `idle`: `serversync run` with nothing to deliver. What it costs to keep waiting:
//! its CPU share over the window, and the server's.

use std::time::{Duration, Instant};

use anyhow::Context;

use super::Ctx;
use crate::report::Report;

#[derive(Debug, Clone)]
pub struct Figures {
    pub seconds: f64,
    pub relay_cpu_percent: f64,
    pub pg_cpu_percent: Option<f64>,
    pub relay_rss_mib: f64,
}

pub async fn run(ctx: &Ctx, seconds: u64, report: &mut Report) -> anyhow::Result<Figures> {
    let db = ctx.migrated_db("idle").await?;
    let started = ctx.start_daemon(&db).await?;
    // let start-up work (first gauge refresh, pool warm-up) pass
    tokio::time::sleep(Duration::from_secs(1)).await;
    let relay_before = started
        .child
        .cpu_now()
        .context("reading the relay's /proc/<pid>/stat")?;
    let pg_before = ctx.server.cpu();
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds.max(1))).await;
    let relay_after = started
        .child
        .cpu_now()
        .context("reading the relay's /proc/<pid>/stat")?;
    let pg_after = ctx.server.cpu();
    let wall = t0.elapsed().as_secs_f64();
    let rss_kib = std::fs::read_to_string(format!("/proc/{}/status", started.child.pid))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
            })
        })
        .unwrap_or(f64::NAN);
    if let Err(e) = ctx.stop_daemon(started).await {
        report.problems([format!("idle: {e:#}")]);
    }
    let figures = Figures {
        seconds: wall,
        relay_cpu_percent: 100.0 * relay_after.saturating_sub(relay_before).as_secs_f64() / wall,
        pg_cpu_percent: pg_after
            .zip(pg_before)
            .map(|(a, b)| 100.0 * a.saturating_sub(b).as_secs_f64() / wall),
        relay_rss_mib: rss_kib / 1024.0,
    };
    println!(
        "idle: over {:.1}s the relay used {:.2} % of a core (RSS {:.1} MiB); PostgreSQL {}",
        figures.seconds,
        figures.relay_cpu_percent,
        figures.relay_rss_mib,
        figures
            .pg_cpu_percent
            .map(|p| format!("{p:.2} %"))
            .unwrap_or_else(|| "n/a".into())
    );
    ctx.server.drop_database(db).await?;
    Ok(figures)
}

pub fn add_to_report(report: &mut Report, f: &Figures) {
    let s = "idle";
    report.target(
        s,
        "relay CPU while idle",
        format!("{:.2} %", f.relay_cpu_percent),
        "< 1 %",
        f.relay_cpu_percent < 1.0,
    );
    if let Some(p) = f.pg_cpu_percent {
        report.info(s, "PostgreSQL CPU while idle", format!("{p:.2} %"));
    }
    report.info(
        s,
        "relay RSS while idle",
        format!("{:.1} MiB", f.relay_rss_mib),
    );
}
