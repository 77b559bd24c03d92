//! Command-line interface (SPEC §5): argument parsing only; `app` does the work.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgGroup, Parser, Subcommand};

use crate::telemetry::LogFormat;

#[derive(Debug, Parser)]
#[command(
    name = "serversync",
    version,
    about = "Outbox relay: delivers sync_outbox rows to the ingest API"
)]
pub struct Cli {
    /// Configuration file (default: config/serversync.toml if it exists).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[arg(long, global = true, value_enum, default_value = "pretty")]
    pub log_format: LogFormat,
    /// trace, debug, info, warn or error (RUST_LOG overrides).
    #[arg(long, global = true, default_value = "info", value_name = "LEVEL")]
    pub log_level: String,
    /// Overrides database.url (and DATABASE_URL).
    #[arg(long, global = true, value_name = "URL")]
    pub database_url: Option<String>,
    /// Overrides ingest.base_url.
    #[arg(long, global = true, value_name = "URL")]
    pub ingest_url: Option<String>,
    /// Overrides dispatch.batch_size.
    #[arg(long, global = true, value_name = "N", allow_negative_numbers = true)]
    pub batch_size: Option<u32>,
    /// Overrides dispatch.concurrency.
    #[arg(long, global = true, value_name = "N", allow_negative_numbers = true)]
    pub concurrency: Option<u32>,
    /// Overrides metrics.listen.
    #[arg(long, global = true, value_name = "ADDR", value_parser = crate::config::listen_addr::parse)]
    pub metrics_listen: Option<SocketAddr>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Deliver until SIGTERM/SIGINT (the daemon).
    Run {
        /// Apply pending migrations first instead of refusing an outdated schema.
        #[arg(long)]
        migrate: bool,
    },
    /// Deliver everything due now, then exit (0 all delivered, 3 some dead or left, 1 fatal).
    Drain {
        /// Stop after claiming this many rows.
        #[arg(long, value_name = "N", allow_negative_numbers = true,
              value_parser = clap::value_parser!(u64).range(1..))]
        max_rows: Option<u64>,
        /// Stop after this long (e.g. 30s, 5m).
        #[arg(long, value_name = "DUR", value_parser = parse_duration)]
        timeout: Option<Duration>,
        #[arg(long)]
        migrate: bool,
    },
    /// Apply the embedded migrations (idempotent).
    Migrate,
    /// Show the backlog.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Inspect, requeue and purge dead letters.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Insert one outbox row (operator tool).
    Enqueue {
        #[arg(long, value_name = "T")]
        entity_type: String,
        #[arg(long, value_name = "UUID")]
        entity_id: String,
        #[arg(long, value_name = "JSON")]
        payload: String,
        #[arg(long, value_name = "KEY")]
        ordering_key: Option<String>,
    },
    /// Validate config, database reachability, schema version and ingest reachability.
    Check,
    /// Zero-setup tour: temporary SQLite outbox, a stand-in Frontend, a real drain.
    Demo {
        /// Keep the temporary directory (database, received files) afterwards.
        #[arg(long)]
        keep: bool,
    },
    /// Development stand-in for the Frontend ingest API (never for production).
    DevSink {
        #[arg(long, default_value = "127.0.0.1:3000", value_name = "ADDR")]
        listen: SocketAddr,
        /// Where received entries and files are stored.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List dead letters.
    List {
        #[arg(long, value_name = "T")]
        error_type: Option<String>,
        #[arg(long, value_name = "T")]
        entity_type: Option<String>,
        #[arg(long, default_value_t = 100, value_name = "N", allow_negative_numbers = true,
              value_parser = clap::value_parser!(i64).range(1..))]
        limit: i64,
        #[arg(long)]
        json: bool,
    },
    /// Show one dead letter with its attempt history.
    Show {
        id: i64,
        #[arg(long)]
        json: bool,
    },
    /// Move dead letters back to the outbox as pending, attempts reset.
    #[command(group(ArgGroup::new("which").required(true).args(["ids", "all", "error_type"])))]
    Requeue {
        ids: Vec<i64>,
        #[arg(long)]
        all: bool,
        #[arg(long, value_name = "T")]
        error_type: Option<String>,
    },
    /// Delete dead letters.
    #[command(group(ArgGroup::new("which").required(true).args(["ids", "all", "older_than"])))]
    Purge {
        ids: Vec<i64>,
        #[arg(long)]
        all: bool,
        #[arg(long, value_name = "DUR", value_parser = parse_duration)]
        older_than: Option<Duration>,
    },
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    crate::config::duration_str::parse(text)
}
