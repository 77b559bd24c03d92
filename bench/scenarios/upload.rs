//! `upload`: one large recording file streamed by `serversync drain`, compared with
//! curl sending the same file to the same sink. Throughput is the sink's view (first
//! header to last body byte) for both; RSS is the relay's peak against a drain that
//! sends one JSON row and no file.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};

use super::Ctx;
use crate::pg::Database;
use crate::procs;
use crate::relay::{self, Run};
use crate::report::Report;

#[derive(Debug, Clone)]
pub struct Figures {
    pub size_mib: u64,
    pub relay_mib_per_s: f64,
    pub relay_rss_mib: f64,
    pub baseline_rss_mib: f64,
    pub curl_mib_per_s: Option<f64>,
}

pub async fn run(ctx: &Ctx, size_mib: u64, report: &mut Report) -> anyhow::Result<Figures> {
    let db = ctx.migrated_db("upload").await?;
    let root = ctx.dir.join("recordings");
    let file = root.join("c/big.wav");
    write_file(&file, size_mib).await?;

    // baseline: the same command with one small JSON row
    sqlx::query("INSERT INTO sync_outbox (entity_type, entity_id, payload) VALUES ('call_log', gen_random_uuid(), '{\"id\":1}')")
        .execute(&db.pool)
        .await?;
    let baseline = drain(ctx, &db, &root, size_mib).await?;

    sqlx::query(
        "INSERT INTO sync_outbox (entity_type, entity_id, payload) \
         VALUES ('recording_file', gen_random_uuid(), '{\"callLogId\":\"c\",\"filePath\":\"c/big.wav\"}')",
    )
    .execute(&db.pool)
    .await?;
    ctx.sink.clear();
    let exit = drain(ctx, &db, &root, size_mib).await?;
    let bytes = size_mib * 1024 * 1024;
    let relay_upload = ctx
        .sink
        .uploads()
        .into_iter()
        .next()
        .context("the relay's upload never reached the sink")?;
    if !relay_upload.complete || relay_upload.part("audio") != Some(bytes) {
        report.problems([format!(
            "upload: the sink received {:?} audio bytes, expected {bytes}",
            relay_upload.part("audio")
        )]);
    }
    let left = db.count("SELECT count(*) FROM sync_outbox").await?;
    if left != 0 {
        report.problems([format!("upload: {left} rows left in sync_outbox")]);
    }
    let relay_mib_per_s = size_mib as f64 / relay_upload.duration.as_secs_f64().max(1e-6);

    let curl_mib_per_s = match procs::which("curl") {
        None => {
            println!("upload: curl is not installed; no comparison");
            None
        }
        Some(curl) => {
            ctx.sink.clear();
            curl_upload(&curl, &file, &ctx.sink.url, size_mib).await?;
            let upload = ctx
                .sink
                .uploads()
                .into_iter()
                .next()
                .context("curl's upload never reached the sink")?;
            if !upload.complete || upload.part("audio") != Some(bytes) {
                report.problems([format!(
                    "upload: curl's audio part had {:?} bytes",
                    upload.part("audio")
                )]);
            }
            Some(size_mib as f64 / upload.duration.as_secs_f64().max(1e-6))
        }
    };
    let figures = Figures {
        size_mib,
        relay_mib_per_s,
        relay_rss_mib: exit.max_rss_mib(),
        baseline_rss_mib: baseline.max_rss_mib(),
        curl_mib_per_s,
    };
    println!(
        "upload: {size_mib} MiB at {:.0} MiB/s (curl {}); relay peak RSS {:.1} MiB vs {:.1} MiB without a file",
        figures.relay_mib_per_s,
        figures.curl_mib_per_s.map(|c| format!("{c:.0} MiB/s")).unwrap_or_else(|| "n/a".into()),
        figures.relay_rss_mib,
        figures.baseline_rss_mib
    );
    let _ = std::fs::remove_file(&file);
    ctx.server.drop_database(db).await?;
    Ok(figures)
}

async fn drain(
    ctx: &Ctx,
    db: &Database,
    root: &Path,
    size_mib: u64,
) -> anyhow::Result<procs::Exit> {
    let mut started = ctx.relay.spawn(&Run {
        command: &["drain"],
        database_url: &db.url,
        ingest_url: &ctx.sink.url,
        metrics: false,
        env: vec![(
            "SERVERSYNC__STORAGE__RECORDINGS_ROOT",
            root.display().to_string(),
        )],
    })?;
    let exit = started
        .child
        .wait(Duration::from_secs(120 + size_mib / 10))
        .await?;
    if exit.code != Some(0) {
        bail!(
            "serversync drain exited with {}:\n{}",
            exit.describe(),
            relay::log_tail(&started.log, 10)
        );
    }
    Ok(exit)
}

/// A file of `size_mib` MiB of non-zero bytes (not sparse; it stays in the page
/// cache, so both senders read it from memory).
async fn write_file(path: &Path, size_mib: u64) -> anyhow::Result<()> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut out = std::io::BufWriter::new(
            std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?,
        );
        let chunk: Vec<u8> = (0..1024 * 1024).map(|i| (i % 251) as u8 + 1).collect();
        for _ in 0..size_mib {
            out.write_all(&chunk)?;
        }
        out.flush()?;
        Ok(())
    })
    .await
    .context("the file writer panicked")?
}

async fn curl_upload(curl: &Path, file: &Path, sink: &str, size_mib: u64) -> anyhow::Result<()> {
    let mut cmd = tokio::process::Command::new(curl);
    cmd.args(["-s", "-S", "-o", "/dev/null", "-w", "%{http_code}", "-F"])
        .arg(format!("audio=@{}", file.display()))
        .args(["-F", "callLogId=c", "-F", "recordingId=r"])
        .arg(format!("{sink}/api/ingest/recording-file"))
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(120 + size_mib / 10), cmd.output())
        .await
        .context("curl did not finish in time")?
        .context("cannot run curl")?;
    let code = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || code.trim() != "200" {
        bail!(
            "curl failed ({}, HTTP {code}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

pub fn add_to_report(report: &mut Report, f: &Figures) {
    let s = "upload";
    let growth = f.relay_rss_mib - f.baseline_rss_mib;
    report.info(s, "file", format!("{} MiB", f.size_mib));
    report.info(
        s,
        "relay throughput",
        format!("{:.0} MiB/s", f.relay_mib_per_s),
    );
    report.target(
        s,
        "relay RSS growth with the file",
        format!(
            "{growth:.1} MiB ({:.1} → {:.1})",
            f.baseline_rss_mib, f.relay_rss_mib
        ),
        "< 16 MiB",
        growth < 16.0,
    );
    if let Some(curl) = f.curl_mib_per_s {
        let share = 100.0 * f.relay_mib_per_s / curl;
        report.target(
            s,
            "throughput vs curl",
            format!("{share:.0} % (curl {curl:.0} MiB/s)"),
            "≥ 80 %",
            share >= 80.0,
        );
    }
}
