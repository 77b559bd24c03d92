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
    /// Log lines for people (pretty) or one JSON object per line (json).
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
        /// Apply pending migrations first instead of refusing an outdated schema.
        #[arg(long)]
        migrate: bool,
    },
    /// Apply the embedded migrations (idempotent).
    Migrate,
    /// Show the backlog.
    Status {
        /// One JSON object (pending, due, in_flight, oldest_pending_age_seconds, …).
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
        /// The entity type (call_log, recording, recording_file, …).
        #[arg(long, value_name = "T")]
        entity_type: String,
        /// The entity's id.
        #[arg(long, value_name = "UUID")]
        entity_id: String,
        /// The entity as a JSON object, in the Frontend's camelCase keys.
        #[arg(long, value_name = "JSON")]
        payload: String,
        /// Deliver after the queued rows of this key (default: derived per entity type).
        #[arg(long, value_name = "KEY")]
        ordering_key: Option<String>,
    },
    /// Validate config, database reachability, schema version and ingest reachability.
    Check,
    /// Zero-setup tour: temporary SQLite outbox, a stand-in Frontend, a real drain.
    /// Its own database and Frontend: the configured (or given) ones are not touched.
    Demo {
        /// Keep the temporary directory (database, received files) afterwards.
        #[arg(long)]
        keep: bool,
    },
    /// Development stand-in for the Frontend ingest API (never for production).
    DevSink {
        /// Address to listen on.
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
        /// Only this error type (timeout, http_4xx, file_missing, …).
        #[arg(long, value_name = "T", value_parser = parse_error_type)]
        error_type: Option<String>,
        /// Only this entity type.
        #[arg(long, value_name = "T")]
        entity_type: Option<String>,
        /// Only those the sink last answered with this HTTP status (e.g. 401).
        #[arg(long, value_name = "N", value_parser = parse_http_status)]
        http_status: Option<i32>,
        /// Only those that died longer ago than this (e.g. 30d): what `dlq purge`
        /// with the same filters would delete.
        #[arg(long, value_name = "DUR", value_parser = parse_duration)]
        older_than: Option<Duration>,
        /// At most this many, oldest first.
        #[arg(long, default_value_t = 100, value_name = "N", allow_negative_numbers = true,
              value_parser = clap::value_parser!(i64).range(1..))]
        limit: i64,
        /// A JSON array of dead letters, camelCase keys.
        #[arg(long)]
        json: bool,
    },
    /// Show one dead letter with its attempt history.
    Show {
        /// The dead letter's id (first column of `dlq list`).
        id: i64,
        /// One JSON object, attempt history included.
        #[arg(long)]
        json: bool,
    },
    /// Move dead letters back to the outbox as pending, attempts reset.
    #[command(group(
        ArgGroup::new("which")
            .required(true)
            .multiple(true)
            .args(["ids", "all", "error_type", "http_status"])
    ))]
    Requeue {
        /// Dead-letter ids.
        ids: Vec<i64>,
        /// Every dead letter.
        #[arg(long, conflicts_with_all = ["ids", "error_type", "http_status"])]
        all: bool,
        /// Every dead letter of this error type.
        #[arg(long, value_name = "T", value_parser = parse_error_type, conflicts_with = "ids")]
        error_type: Option<String>,
        /// Every dead letter the sink last answered with this HTTP status (with
        /// --error-type: those of both), e.g. 401 once a wrong token is fixed.
        #[arg(long, value_name = "N", value_parser = parse_http_status, conflicts_with = "ids")]
        http_status: Option<i32>,
    },
    /// Delete dead letters.
    #[command(group(
        ArgGroup::new("which")
            .required(true)
            .multiple(true)
            .args(["ids", "all", "older_than", "error_type", "http_status"])
    ))]
    Purge {
        /// Dead-letter ids.
        ids: Vec<i64>,
        /// Every dead letter.
        #[arg(long, conflicts_with_all = ["ids", "older_than", "error_type", "http_status"])]
        all: bool,
        /// Dead letters that died longer ago than this (e.g. 30d); with --error-type
        /// or --http-status, those that match all that is given.
        #[arg(long, value_name = "DUR", value_parser = parse_duration, conflicts_with = "ids")]
        older_than: Option<Duration>,
        /// Every dead letter of this error type.
        #[arg(long, value_name = "T", value_parser = parse_error_type, conflicts_with = "ids")]
        error_type: Option<String>,
        /// Every dead letter the sink last answered with this HTTP status.
        #[arg(long, value_name = "N", value_parser = parse_http_status, conflicts_with = "ids")]
        http_status: Option<i32>,
    },
}

fn parse_http_status(text: &str) -> Result<i32, String> {
    match text.parse::<i32>() {
        Ok(status) if (100..=599).contains(&status) => Ok(status),
        _ => Err("an HTTP status is a number from 100 to 599".to_string()),
    }
}

fn parse_error_type(text: &str) -> Result<String, String> {
    use crate::taxonomy::ErrorType;
    match ErrorType::parse(text) {
        Some(t) => Ok(t.as_str().to_string()),
        None => Err(format!(
            "no such error type; one of: {}",
            ErrorType::ALL.map(ErrorType::as_str).join(", ")
        )),
    }
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    crate::config::duration_str::parse(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// `--help` explains every flag and argument of every command: an operator
    /// should not have to read the source to learn what `--migrate` does.
    #[test]
    fn every_argument_of_every_command_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if id != "help" && id != "version" && arg.get_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.get_about().is_none() {
                    missing.push(format!("{path} {}", sub.get_name()));
                }
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let cmd = Cli::command();
        cmd.clone().debug_assert();
        let mut missing = Vec::new();
        walk(&cmd, "serversync", &mut missing);
        assert!(missing.is_empty(), "no help text: {missing:?}");
    }
}
