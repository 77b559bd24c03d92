//! The relay under test: the real `serversync` binary, run as a child process with
//! its configuration in the environment, so the figures are those of what ships.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};

use crate::procs;

/// Settings applied to every relay run (the tuning knobs under test).
#[derive(Debug, Clone, Default)]
pub struct Knobs {
    pub batch_size: Option<u32>,
    pub concurrency: Option<u32>,
    pub claim_concurrency: Option<u32>,
    pub delete_sent: bool,
    /// `database.synchronous_commit = false` (see docs/BENCHMARKS.md).
    pub async_commit: bool,
}

pub struct Relay {
    pub bin: PathBuf,
    workdir: PathBuf,
    knobs: Knobs,
    runs: std::sync::atomic::AtomicUsize,
}

/// One relay process to start.
pub struct Run<'a> {
    /// `["drain"]`, `["drain", "--max-rows", "100"]`, `["run"]`.
    pub command: &'a [&'a str],
    pub database_url: &'a str,
    pub ingest_url: &'a str,
    /// `run` serves metrics on 127.0.0.1:0 like a daemon would; `drain` does not.
    pub metrics: bool,
    pub env: Vec<(&'a str, String)>,
}

/// A started relay and where its output goes.
pub struct Started {
    pub child: procs::Child,
    pub log: PathBuf,
    pub started_wall: SystemTime,
}

impl Relay {
    /// `explicit`, or `serversync` next to the bench's own directory
    /// (`target/<profile>/examples/bench` → `target/<profile>/serversync`).
    pub fn locate(
        explicit: Option<PathBuf>,
        workdir: &Path,
        knobs: Knobs,
    ) -> anyhow::Result<Relay> {
        let bin = match explicit {
            Some(p) => p,
            None => {
                let exe = std::env::current_exe().context("cannot find the bench's own path")?;
                exe.parent()
                    .and_then(Path::parent)
                    .map(|dir| dir.join("serversync"))
                    .context("cannot derive the relay's path from the bench's")?
            }
        };
        if !bin.is_file() {
            bail!(
                "the relay binary {} does not exist: build it first with \
                 `cargo build --release --bin serversync` (or `cargo build` for a debug run), \
                 or pass --relay PATH",
                bin.display()
            );
        }
        warn_if_stale(&bin);
        Ok(Relay {
            bin,
            workdir: workdir.to_path_buf(),
            knobs,
            runs: Default::default(),
        })
    }

    pub fn knobs(&self) -> &Knobs {
        &self.knobs
    }

    /// `serversync migrate`, which must exit 0.
    pub async fn migrate(&self, database_url: &str, ingest_url: &str) -> anyhow::Result<()> {
        let mut started = self.spawn(&Run {
            command: &["migrate"],
            database_url,
            ingest_url,
            metrics: false,
            env: Vec::new(),
        })?;
        let exit = started.child.wait(Duration::from_secs(120)).await?;
        if exit.code != Some(0) {
            bail!(
                "serversync migrate failed ({}):\n{}",
                exit.describe(),
                log_tail(&started.log, 20)
            );
        }
        Ok(())
    }

    pub fn spawn(&self, run: &Run<'_>) -> anyhow::Result<Started> {
        let n = self.runs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log = self
            .workdir
            .join(format!("relay-{n}-{}.log", run.command[0]));
        let out =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = Command::new(&self.bin);
        // metrics (when enabled) on a free loopback port, never the default 9464
        cmd.args([
            "--log-level",
            "warn",
            "--log-format",
            "pretty",
            "--metrics-listen",
            "127.0.0.1:0",
        ]);
        if let Some(n) = self.knobs.batch_size {
            cmd.args(["--batch-size", &n.to_string()]);
        }
        if let Some(n) = self.knobs.concurrency {
            cmd.args(["--concurrency", &n.to_string()]);
        }
        cmd.args(run.command);
        // only what the bench sets: no config file (cwd has none), no inherited overrides
        for (key, _) in std::env::vars_os() {
            if key.to_str().is_some_and(|k| {
                k.starts_with("SERVERSYNC") || k == "RUST_LOG" || k == "DATABASE_URL"
            }) {
                cmd.env_remove(key);
            }
        }
        if let Some(n) = self.knobs.claim_concurrency {
            cmd.env("SERVERSYNC__DISPATCH__CLAIM_CONCURRENCY", n.to_string());
        }
        if self.knobs.async_commit {
            cmd.env("SERVERSYNC__DATABASE__SYNCHRONOUS_COMMIT", "false");
        }
        cmd.env("DATABASE_URL", run.database_url)
            .env("SERVERSYNC__INGEST__BASE_URL", run.ingest_url)
            .env(
                "SERVERSYNC__METRICS__ENABLED",
                if run.metrics { "true" } else { "false" },
            );
        if self.knobs.delete_sent {
            cmd.env("SERVERSYNC__RETENTION__DELETE_SENT", "true");
        }
        for (key, value) in &run.env {
            cmd.env(key, value);
        }
        cmd.current_dir(&self.workdir)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let started_wall = SystemTime::now();
        let child = procs::spawn(cmd, &format!("serversync {}", run.command.join(" ")))?;
        Ok(Started {
            child,
            log,
            started_wall,
        })
    }
}

/// The last `n` lines of a relay's output.
pub fn log_tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Warn when sources changed after the relay was built: the figures would be of an
/// older binary. (Other people edit `src/` while benchmarks run.)
fn warn_if_stale(bin: &Path) {
    let Ok(built) = std::fs::metadata(bin).and_then(|m| m.modified()) else {
        return;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut newest: Option<(SystemTime, PathBuf)> = None;
    let mut stack = vec![root.join("src"), root.join("migrations")];
    let mut visited = 0;
    while let Some(dir) = stack.pop() {
        visited += 1;
        if visited > 1000 {
            break;
        }
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(modified) = entry.metadata().and_then(|m| m.modified()) {
                if newest.as_ref().is_none_or(|(t, _)| modified > *t) {
                    newest = Some((modified, path));
                }
            }
        }
    }
    if let Some((modified, path)) = newest {
        if modified > built {
            eprintln!(
                "warning: {} is older than {}; rebuild it (cargo build --release --bin serversync) to measure the current code",
                bin.display(),
                path.display()
            );
        }
    }
}
