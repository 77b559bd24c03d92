use std::io::Write as _;
use std::process::ExitCode;

use clap::Parser;
use serversync::cli::Cli;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help, --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e)
            if matches!(
                e.kind(),
                clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
                    | clap::error::ErrorKind::MissingSubcommand
            ) =>
        {
            early_error("error: a command is required (see --help)");
            return ExitCode::FAILURE;
        }
        Err(e) => {
            early_error(&format!("{} (see --help)", clap_one_line(&e.to_string())));
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = serversync::telemetry::init(cli.log_format, &cli.log_level) {
        early_error(&format!("error: {e:#}"));
        return ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = writeln!(
                std::io::stderr(),
                "error: cannot start the async runtime: {e}"
            );
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(serversync::app::execute(cli));
    // Dropping the runtime would wait for every blocking task, with no limit: one
    // stuck in the kernel (a file open on a mount that stopped answering) would
    // keep a finished process from exiting.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    if let Err(e) = std::io::stdout().flush() {
        serversync::telemetry::output_error(&e);
    }
    let unwritten = result
        .is_ok()
        .then(serversync::telemetry::output_failed)
        .flatten();
    if let Some(why) = unwritten {
        serversync::telemetry::say_err(format_args!("error: writing the output failed: {why}"));
        return ExitCode::FAILURE;
    }
    match result {
        Ok(code) => code,
        Err(e) => {
            let line = one_line(&e);
            serversync::telemetry::say_err(format_args!("error: {line}"));
            ExitCode::FAILURE
        }
    }
}

/// An error before the logs are set up (bad arguments, a bad `--log-level`): one
/// line on stderr, a JSON object like every other line when the command line asks
/// for `--log-format json`.
fn early_error(line: &str) {
    let args: Vec<String> = std::env::args_os()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let json = args.iter().enumerate().any(|(i, arg)| {
        arg == "--log-format=json"
            || (arg == "--log-format" && args.get(i + 1).is_some_and(|next| next == "json"))
    });
    let line = if json {
        serde_json::json!({
            "timestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            "level": "ERROR",
            "message": line.strip_prefix("error: ").unwrap_or(line),
            "target": "serversync",
        })
        .to_string()
    } else {
        line.to_string()
    };
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// clap's message up to its first blank line (which ends what went wrong and
/// starts the usage and tips), on one line: the names of missing arguments are on
/// the lines after the first.
fn clap_one_line(text: &str) -> String {
    let parts: Vec<&str> = text
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect();
    if parts.is_empty() {
        "error: invalid arguments".to_string()
    } else {
        parts.join(" ")
    }
}

/// The error and its causes on one line.
fn one_line(e: &anyhow::Error) -> String {
    serversync::app::causes(e).replace('\n', " ")
}
