//! Logging through tracing-subscriber: `pretty` for people, `json` for machines.
//! `RUST_LOG` wins over `--log-level` when set.

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
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // a closed stderr (`serversync drain 2>&1 | head`) must not turn every log
        // line into a panic (the subscriber reports its write errors with eprintln!),
        // which would kill workers mid-batch and the signal handler with them
        .log_internal_errors(false)
        .with_ansi(ansi);
    let result = match format {
        LogFormat::Pretty => builder.compact().try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
    };
    result.map_err(|e| anyhow::anyhow!("cannot install the logger: {e}"))
}
