//! The benchmark: a throwaway PostgreSQL, a fast in-process sink, and the real
//! `serversync` binary as a child process. See docs/BENCHMARKS.md.
//!
//! ```sh
//! cargo build --release --bin serversync --example bench
//! cargo run --release --example bench -- --all       # the figures of docs/BENCHMARKS.md
//! cargo run --example bench -- --smoke               # CI: small, asserts nothing is lost
//! ```

mod load;
mod pg;
mod procs;
mod relay;
mod report;
mod scenarios;
mod sink;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};

use report::Report;
use scenarios::{drain, history, idle, latency, ordering, pgbench, upload, Ctx};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    Drain,
    Latency,
    Idle,
    Upload,
    Pgbench,
    History,
    Ordering,
}

#[derive(Debug, Parser)]
#[command(
    name = "bench",
    about = "Benchmark of the serversync relay (see docs/BENCHMARKS.md)"
)]
struct Args {
    /// Scenarios to run (default: drain).
    #[arg(value_enum)]
    scenarios: Vec<Scenario>,
    /// drain, latency, idle, upload, pgbench and ordering, with a table of figures and
    /// targets.
    #[arg(long, conflicts_with = "smoke")]
    all: bool,
    /// CI size (< 1 min): drain 3,000 rows, 2 s of latency at 200 rows/s, a 1 MiB
    /// upload, ordering's three drains of 3,000 rows; exits non-zero if a row is lost,
    /// duplicated, or delivered out of its ordering key's order.
    #[arg(long)]
    smoke: bool,
    /// The relay binary (default: serversync beside this bench's target directory).
    #[arg(long, value_name = "PATH")]
    relay: Option<PathBuf>,
    /// Use this server instead of a throwaway one; scratch databases
    /// serversync_bench_* are created on it and dropped.
    #[arg(long, value_name = "URL")]
    database_url: Option<String>,
    /// drain and ordering: rows to load and deliver.
    #[arg(long, default_value_t = 100_000)]
    rows: u64,
    /// latency: rows per second.
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// latency and idle: length of the window.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// latency: producer connections, each committing its share of the rate.
    #[arg(long, default_value_t = 4)]
    producers: u32,
    /// upload: file size.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// history: pending rows.
    #[arg(long, default_value_t = 1_000_000)]
    pending: u64,
    /// history: delivered records in sync_outbox_sent.
    #[arg(long, default_value_t = 10_000_000)]
    sent: u64,
    /// history: rows drained from the pending backlog.
    #[arg(long, default_value_t = 100_000)]
    max_rows: u64,
    /// pgbench: rows loaded before each strategy (must outlast the run; the lease-free
    /// one-statement reference gets twice as many).
    #[arg(long, default_value_t = 1_000_000)]
    pgbench_rows: u64,
    /// pgbench: clients (-c and -j).
    #[arg(long, default_value_t = 2)]
    pgbench_clients: u32,
    /// pgbench: seconds per strategy (-T).
    #[arg(long, default_value_t = 10)]
    pgbench_seconds: u64,
    /// pgbench: also measure two protocols without a per-row lease (one-statement
    /// DELETE … RETURNING; locks held from claim to archive), to calibrate this
    /// machine against the issue's figures.
    #[arg(long)]
    pgbench_reference: bool,
    /// drain, pgbench and ordering: run them this many times, alternating, and report
    /// the median of each (this machine's run-to-run noise is ±10–30 %).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=9))]
    rounds: u32,
    /// Where a call's three rows sit in the backlog (drain, pgbench, history; ordering
    /// drains all three).
    #[arg(long, value_enum, default_value = "grouped")]
    layout: load::Layout,
    /// Milliseconds the sink takes to answer each JSON request, as a real Frontend
    /// over a network would (0: at once, the database's limit).
    #[arg(long, default_value_t = 0)]
    sink_delay_ms: u64,
    /// Relay: dispatch.batch_size.
    #[arg(long)]
    batch_size: Option<u32>,
    /// Relay: dispatch.concurrency.
    #[arg(long)]
    concurrency: Option<u32>,
    /// Relay: dispatch.claim_concurrency (claim lanes, default 3; 1: one claim at a
    /// time for the whole relay, shared with the workers queued behind it).
    #[arg(long)]
    claim_concurrency: Option<u32>,
    /// Relay: retention.delete_sent = true.
    #[arg(long)]
    delete_sent: bool,
    /// Relay: database.synchronous_commit = false (settles do not wait for the WAL
    /// flush either; claims never do).
    #[arg(long)]
    relay_async_commit: bool,
    /// pg_stat_statements and wait-event sampling during drains.
    #[arg(long)]
    profile: bool,
    /// Extra settings for the throwaway server (repeatable), e.g. shared_buffers=1GB.
    #[arg(long = "pg-setting", value_name = "NAME=VALUE")]
    pg_settings: Vec<String>,
    /// The throwaway server's locale (`initdb --locale`). C compares text with
    /// `memcmp`; servers are often initialised with a language's locale
    /// (`en_US.UTF-8`, or `C.UTF-8`), where text comparisons go through `strcoll`.
    #[arg(long, value_name = "LOCALE", default_value = "C")]
    pg_locale: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(report) if report.problems.is_empty() => ExitCode::SUCCESS,
        Ok(report) => {
            eprintln!("\nFAILED: {} problem(s):", report.problems.len());
            for p in &report.problems {
                eprintln!("  - {p}");
            }
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(mut args: Args) -> anyhow::Result<Report> {
    let scenarios = plan(&mut args)?;
    let tmp = tempfile::Builder::new()
        .prefix("serversync-bench-")
        .tempdir()
        .context("creating a scratch directory")?;
    pg::give_to_server_user(tmp.path())?;
    let knobs = relay::Knobs {
        batch_size: args.batch_size,
        concurrency: args.concurrency,
        claim_concurrency: args.claim_concurrency,
        delete_sent: args.delete_sent,
        async_commit: args.relay_async_commit,
    };
    let relay = relay::Relay::locate(args.relay.clone(), tmp.path(), knobs)?;
    let server = match &args.database_url {
        Some(url) => pg::Server::external(url).await?,
        None => {
            let mut settings = args.pg_settings.clone();
            if args.profile {
                settings.push("shared_preload_libraries=pg_stat_statements".into());
                settings.push("pg_stat_statements.track_utility=on".into());
            }
            pg::Server::start(&tmp.path().join("pg"), &settings, &args.pg_locale).await?
        }
    };
    let sink = sink::Sink::start(std::time::Duration::from_millis(args.sink_delay_ms))?;
    println!("relay: {}", relay.bin.display());
    print_machine(&server).await;
    let ctx = Ctx {
        server,
        sink,
        relay,
        dir: tmp.path().to_path_buf(),
        profile: args.profile,
        layout: args.layout,
    };
    let outcome = run_scenarios(&ctx, &args, &scenarios).await;
    let Ctx {
        mut server, sink, ..
    } = ctx;
    drop(sink);
    server.stop().await;
    drop(tmp);
    outcome
}

/// Which scenarios, with sizes adjusted for --smoke.
fn plan(args: &mut Args) -> anyhow::Result<Vec<Scenario>> {
    if args.smoke {
        if !args.scenarios.is_empty() {
            bail!("--smoke runs its own scenarios; give no scenario names with it");
        }
        args.rows = 3_000;
        args.rate = 200;
        args.seconds = 2;
        args.size_mib = 1;
        return Ok(vec![
            Scenario::Drain,
            Scenario::Latency,
            Scenario::Upload,
            Scenario::Ordering,
        ]);
    }
    if args.all {
        return Ok(vec![
            Scenario::Drain,
            Scenario::Latency,
            Scenario::Idle,
            Scenario::Upload,
            Scenario::Pgbench,
            Scenario::Ordering,
        ]);
    }
    if args.scenarios.is_empty() {
        return Ok(vec![Scenario::Drain]);
    }
    let mut list = args.scenarios.clone();
    list.dedup();
    Ok(list)
}

async fn run_scenarios(ctx: &Ctx, args: &Args, scenarios: &[Scenario]) -> anyhow::Result<Report> {
    let mut report = Report::default();
    let mut drains = Vec::new();
    let mut pgbenches = Vec::new();
    let mut orderings = Vec::new();
    for round in 1..=args.rounds {
        for scenario in scenarios {
            let repeated = matches!(
                scenario,
                Scenario::Drain | Scenario::Pgbench | Scenario::Ordering
            );
            if round > 1 && !repeated {
                continue;
            }
            if args.rounds > 1 && repeated {
                println!("\n== {scenario:?}, round {round} of {} ==", args.rounds);
            } else {
                println!("\n== {scenario:?} ==");
            }
            let runs = Runs {
                round,
                drains: &mut drains,
                pgbenches: &mut pgbenches,
                orderings: &mut orderings,
            };
            run_scenario(ctx, args, *scenario, &mut report, runs).await?;
        }
    }
    if let Some(f) = median_drain(&drains) {
        drain::add_to_report(&mut report, f);
    }
    let outcomes = pgbench::medians(&pgbenches);
    if !outcomes.is_empty() {
        pgbench::add_to_report(&mut report, &outcomes, args.pgbench_clients);
    }
    if let Some(f) = median_drain(&drains) {
        pgbench::relay_share(&mut report, &outcomes, f.rows_per_s, args.delete_sent);
        if drains.len() > 1 && drains.len() == pgbenches.len() {
            let rounds: Vec<f64> = drains.iter().map(|d| d.rows_per_s).collect();
            pgbench::relay_share_by_round(&mut report, &pgbenches, &rounds, args.delete_sent);
        }
    }
    ordering::add_to_report(&mut report, &orderings);
    // (this one includes the bench's own load)
    print_load("at the end", false);
    if args.smoke {
        println!(
            "note: --smoke checks that nothing is lost or duplicated; its small, often \
             debug-build figures are not comparable with the targets"
        );
    }
    println!("\n{}", report.markdown());
    Ok(report)
}

/// The figures of the scenarios that repeat every round, collected for their medians.
struct Runs<'a> {
    round: u32,
    drains: &'a mut Vec<drain::Figures>,
    pgbenches: &'a mut Vec<Vec<pgbench::Outcome>>,
    orderings: &'a mut Vec<ordering::Round>,
}

async fn run_scenario(
    ctx: &Ctx,
    args: &Args,
    scenario: Scenario,
    report: &mut Report,
    runs: Runs<'_>,
) -> anyhow::Result<()> {
    match scenario {
        Scenario::Drain => runs
            .drains
            .push(drain::run(ctx, args.rows, args.layout, report).await?),
        Scenario::Latency => {
            let f = latency::run(ctx, args.rate, args.seconds, args.producers, report).await?;
            latency::add_to_report(report, &f);
        }
        Scenario::Idle => {
            let f = idle::run(ctx, args.seconds, report).await?;
            idle::add_to_report(report, &f);
        }
        Scenario::Upload => {
            let f = upload::run(ctx, args.size_mib, report).await?;
            upload::add_to_report(report, &f);
        }
        Scenario::Pgbench => runs.pgbenches.push(
            pgbench::run(
                ctx,
                args.pgbench_rows,
                args.pgbench_seconds,
                args.pgbench_clients,
                args.pgbench_reference,
                report,
            )
            .await?,
        ),
        Scenario::History => {
            let o = history::run(ctx, args.pending, args.sent, args.max_rows, report).await?;
            history::add_to_report(report, &o);
        }
        Scenario::Ordering => runs
            .orderings
            .push(ordering::run(ctx, args.rows, runs.round, report).await?),
    }
    Ok(())
}

/// The drain of median throughput (the lower middle one of an even count).
fn median_drain(drains: &[drain::Figures]) -> Option<&drain::Figures> {
    let mut sorted: Vec<&drain::Figures> = drains.iter().collect();
    sorted.sort_by(|a, b| a.rows_per_s.total_cmp(&b.rows_per_s));
    sorted.get(sorted.len().saturating_sub(1) / 2).copied()
}

/// The machine and server the figures belong to.
async fn print_machine(server: &pg::Server) {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .next()
                .map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_string())
        })
        .and_then(|kib| kib.parse::<f64>().ok())
        .map(|kib| format!("{:.1} GiB", kib / 1048576.0))
        .unwrap_or_else(|| "unknown".into());
    println!("machine: {cores} cores, {cpu}, {mem} RAM");
    print_load("at start", true);
    println!(
        "server: {}",
        if server.is_throwaway() {
            "throwaway cluster"
        } else {
            "--database-url"
        }
    );
    match server.describe().await {
        Ok(settings) => {
            for (name, value) in settings {
                println!("  {name} = {value}");
            }
        }
        Err(e) => eprintln!("note: cannot read the server's settings: {e:#}"),
    }
}

/// Other work on the machine disturbs every figure: say so before starting.
fn print_load(when: &str, warn: bool) {
    let Ok(text) = std::fs::read_to_string("/proc/loadavg") else {
        return;
    };
    let one: f64 = text
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    println!("load average {when}: {}", text.trim());
    if warn && one > 0.5 {
        println!("note: the machine is busy with other work; figures will be disturbed");
    }
}
