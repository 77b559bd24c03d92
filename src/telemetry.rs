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
        LogFormat::Json => builder
            .fmt_fields(format::JsonFields::new())
            .event_format(JournalPriority {
                journal,
                inner: format::format()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false),
            })
            .try_init(),
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
