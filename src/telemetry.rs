//! Logging through tracing-subscriber: `pretty` for people, `json` for machines.
//! `RUST_LOG` wins over `--log-level` when set. Under systemd each line carries its
//! syslog priority for the journal (`JournalPriority`).

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::{self, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Pretty,
    Json,
}

/// Whether logs are JSON (`--log-format json`): then every line on stderr is one JSON
/// object, the messages meant for people (`say_err!`, the closing error) included.
static JSON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

pub fn json() -> bool {
    JSON.load(std::sync::atomic::Ordering::Relaxed)
}

/// Why writing a command's output failed, if it did (but for a closed pipe: `status
/// | head -1` wants only the start), for `main` to report instead of exit 0 over an
/// empty file (`status --json > out.json` on a full disk).
static OUTPUT_FAILED: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// A command's output line on stdout (`say!`); a failure is noted, never a panic.
pub fn say(line: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    if let Err(e) = writeln!(std::io::stdout().lock(), "{line}") {
        output_error(&e);
    }
}

/// Note a failure to write the output (`say`, the final flush).
pub fn output_error(e: &std::io::Error) {
    if e.kind() != std::io::ErrorKind::BrokenPipe {
        let _ = OUTPUT_FAILED.set(e.to_string());
    }
}

pub fn output_failed() -> Option<&'static str> {
    OUTPUT_FAILED.get().map(String::as_str)
}

/// A line for people on stderr, as a log event under `--log-format json` (at ERROR
/// when it says `error: …`, which is then left out), else as it is.
pub fn say_err(line: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    if !json() {
        let _ = writeln!(std::io::stderr().lock(), "{line}");
        return;
    }
    let line = line.to_string();
    match line.strip_prefix("error: ") {
        Some(error) => tracing::error!(target: "serversync", "{error}"),
        None => tracing::info!(target: "serversync", "{line}"),
    }
}

pub fn init(format: LogFormat, level: &str) -> anyhow::Result<()> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.is_empty() => EnvFilter::try_new(&spec)
            .map_err(|e| anyhow::anyhow!("invalid RUST_LOG {spec:?}: {e}"))?,
        _ => EnvFilter::try_new(format!("warn,serversync={level}"))
            .map_err(|e| anyhow::anyhow!("invalid --log-level {level:?}: {e}"))?,
    };
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let journal = stderr_is_the_journal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // a closed stderr (`serversync drain 2>&1 | head`) must not turn every log
        // line into a panic (the subscriber reports its write errors with eprintln!),
        // which would kill workers mid-batch and the signal handler with them
        .log_internal_errors(false)
        .with_ansi(ansi);
    let result = match format {
        LogFormat::Pretty => builder
            .event_format(JournalPriority {
                journal,
                inner: format::format().compact(),
            })
            .try_init(),
        LogFormat::Json => {
            JSON.store(true, std::sync::atomic::Ordering::Relaxed);
            builder
                .fmt_fields(format::JsonFields::new())
                .event_format(JournalPriority {
                    journal,
                    inner: format::format()
                        .json()
                        .flatten_event(true)
                        .with_current_span(false),
                })
                .try_init()
        }
    };
    result.map_err(|e| anyhow::anyhow!("cannot install the logger: {e}"))
}

/// Under systemd, stderr is a stream to the journal, which `JOURNAL_STREAM` names
/// (`device:inode`): there a line may start with its syslog priority (`<4>`), which
/// the journal keeps as the line's priority (`journalctl -p warning`) and strips
/// from the text. Anywhere else (a terminal, a file, a container's log) lines are
/// left as they are, also when the variable was inherited by a redirected process.
fn stderr_is_the_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(stream) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = stream.split_once(':') else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.trim().parse::<u64>(), ino.trim().parse::<u64>()) else {
        return false;
    };
    std::fs::metadata("/proc/self/fd/2").is_ok_and(|m| m.dev() == dev && m.ino() == ino)
}

/// An event format that puts the syslog priority of the event's level before the
/// line when `journal`.
struct JournalPriority<F> {
    journal: bool,
    inner: F,
}

impl<S, N, F> FormatEvent<S, N> for JournalPriority<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        if self.journal {
            let priority = match *event.metadata().level() {
                Level::ERROR => 3,
                Level::WARN => 4,
                Level::INFO => 6,
                _ => 7,
            };
            write!(writer, "<{priority}>")?;
        }
        self.inner.format_event(ctx, writer, event)
    }
}
