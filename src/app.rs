//! Which command runs, and the ones that deliver (`run`, `drain`) or shape the
//! database (`migrate`); the operator's commands are in `admin`. `main` parses,
//! `execute` runs; errors come back as one line each, and `run`/`drain` get their
//! shutdown signal passed in.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin;
use crate::cli::{Cli, Command};
use crate::config::{Overrides, Settings};
use crate::dispatch::Dispatcher;
use crate::files::RecordingsRoot;
use crate::metrics::{Health, Metrics};
use crate::relay::{DrainEnd, Mode, Relay, RelayParts, Summary};
use crate::store::{ConnectOptions, Store};

/// Exit code of a drain that dead-lettered rows or left some for a retry.
pub const EXIT_INCOMPLETE: u8 = 3;
/// A second SIGTERM/SIGINT during the shutdown grace: exit at once (128 + SIGINT, as
/// shells report an interrupted command).
pub const EXIT_FORCED: i32 = 130;

pub fn overrides(cli: &Cli) -> Overrides {
    Overrides {
        database_url: cli.database_url.clone(),
        ingest_url: cli.ingest_url.clone(),
        batch_size: cli.batch_size,
        concurrency: cli.concurrency,
        metrics_listen: cli.metrics_listen,
    }
}

pub async fn execute(cli: Cli) -> anyhow::Result<ExitCode> {
    match &cli.command {
        Command::Demo { keep } => return crate::demo::run(*keep).await,
        Command::DevSink { listen, dir } => {
            crate::devsink::serve_until_signal(*listen, dir.clone()).await?;
            return Ok(ExitCode::SUCCESS);
        }
        _ => {}
    }
    let settings = Arc::new(Settings::load(cli.config.as_deref(), &overrides(&cli))?);
    match cli.command {
        Command::Run { migrate } => run(settings, migrate, shutdown_signal()).await,
        Command::Drain {
            max_rows,
            timeout,
            migrate,
        } => {
            let summary = drain(
                settings,
                DrainOptions {
                    max_rows,
                    timeout,
                    migrate,
                },
                shutdown_signal(),
            )
            .await?;
            Ok(drain_exit_code(&summary))
        }
        Command::Migrate => {
            let store = connect(&settings, true).await?;
            store.migrate().await?;
            apply_ordering_rules(&store, &settings).await?;
            say!("migrations applied: the schema is current");
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { json } => admin::status(&settings, json)
            .await
            .map_err(explain_lock_timeout),
        Command::Dlq { command } => admin::dlq(&settings, command)
            .await
            .map_err(explain_lock_timeout),
        Command::Enqueue {
            entity_type,
            entity_id,
            payload,
            ordering_key,
        } => admin::enqueue(&settings, entity_type, &entity_id, &payload, ordering_key)
            .await
            .map_err(explain_lock_timeout),
        Command::Check => admin::check(&settings).await,
        Command::Demo { .. } | Command::DevSink { .. } => Ok(ExitCode::SUCCESS),
    }
}

/// SIGTERM or SIGINT, once, as a cancellation token. A second one (an impatient
/// Ctrl-C) does not wait for the grace: the process exits at once, and rows in
/// flight keep their leases and return when those expire.
pub fn shutdown_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        let first = next_signal().await;
        tracing::info!("{first}: stopping");
        trigger.cancel();
        next_signal().await;
        tracing::warn!(
            "second signal: exiting now; rows in flight return when their lease expires"
        );
        std::process::exit(EXIT_FORCED);
    });
    token
}

/// The next SIGTERM, SIGINT or SIGHUP, by name. A hangup (the terminal of a
/// foreground relay closed, a stray `kill -HUP`) stops it the same graceful way:
/// left to its default action it ended the process at once, silently, with its rows
/// leased until the lease ran out. (There is nothing to reload: a new configuration
/// takes a restart.)
async fn next_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let on = |kind: SignalKind| async move {
        match signal(kind) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = on(SignalKind::terminate()) => "SIGTERM",
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = on(SignalKind::hangup()) => "SIGHUP",
    }
}

/// `create`: the command migrates what it opens, so a missing SQLite file may be made.
/// For operator commands: their commits keep the server's `synchronous_commit`.
pub async fn connect(settings: &Settings, create: bool) -> anyhow::Result<Store> {
    connect_with(settings, create, true, None).await
}

/// How long an operator's command (`status`, `dlq`, `enqueue`, `check`) waits for a
/// lock another session holds on the tables before it says so.
pub const OPERATOR_LOCK_TIMEOUT: Duration = Duration::from_secs(10);

/// For `status`, `dlq`, `enqueue` and `check`: as `connect`, and a statement waiting
/// on a lock (a migration, an operator's `LOCK TABLE`) fails after
/// `OPERATOR_LOCK_TIMEOUT` instead of hanging (`explain_lock_timeout`).
pub async fn connect_operator(settings: &Settings) -> anyhow::Result<Store> {
    connect_with(settings, false, true, Some(OPERATOR_LOCK_TIMEOUT)).await
}

/// An operator's command that gave up on a lock says what to do. Told by the error's
/// SQLSTATE (55P03, lock_not_available), not its text, which the server may
/// translate (`lc_messages`).
pub fn explain_lock_timeout(e: anyhow::Error) -> anyhow::Error {
    let locked = e
        .chain()
        .filter_map(|cause| cause.downcast_ref::<sqlx::Error>())
        .filter_map(sqlx::Error::as_database_error)
        .any(|db| db.code().as_deref() == Some("55P03"));
    if locked {
        e.context(format!(
            "another session has held a lock on the outbox's tables for over {}s (a \
             migration, a LOCK TABLE, a long transaction): try again once it is done",
            OPERATOR_LOCK_TIMEOUT.as_secs()
        ))
    } else {
        e
    }
}

/// The relay's pool (`run`, `drain`): `database.synchronous_commit` applies.
async fn connect_with(
    settings: &Settings,
    create: bool,
    synchronous_commit: bool,
    lock_timeout: Option<Duration>,
) -> anyhow::Result<Store> {
    let options = ConnectOptions {
        max_connections: settings.database.max_connections,
        acquire_timeout: settings.database.acquire_timeout,
        create,
        synchronous_commit,
        lock_timeout,
    };
    Store::connect(settings.database_url()?, &options).await
}

async fn apply_ordering_rules(store: &Store, settings: &Settings) -> anyhow::Result<()> {
    let rules = if settings.ordering.enabled {
        settings.ordering.keys.clone()
    } else {
        Default::default()
    };
    let before = store
        .set_ordering_rules(&rules)
        .await
        .context("writing the ordering rules")?;
    if before != rules {
        // the rules are the database's, for every producer and relay: a relay (or a
        // drain) started with other `[ordering]` settings changes them for all
        let shown = |r: &std::collections::BTreeMap<String, String>| {
            if r.is_empty() {
                "none".to_string()
            } else {
                r.iter()
                    .map(|(t, s)| format!("{t} = {s}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        };
        tracing::warn!(
            before = %shown(&before),
            now = %shown(&rules),
            "ordering rules changed by this relay's [ordering] settings: rows inserted from \
             now on derive their ordering keys by these, whichever relay delivers them \
             (every relay and drain on this database should have the same [ordering])"
        );
    }
    Ok(())
}

/// Connect, check or apply the schema, and build the relay's parts.
async fn prepare(
    settings: &Arc<Settings>,
    migrate: bool,
) -> anyhow::Result<(RelayParts, Option<crate::store::RelayLock>)> {
    let store = connect_with(
        settings,
        migrate,
        settings.database.synchronous_commit,
        None,
    )
    .await?;
    if migrate {
        store.migrate().await?;
    } else {
        store.require_current_schema().await?;
    }
    let lock = store.lock_for_relay()?;
    apply_ordering_rules(&store, settings).await?;
    let metrics = Metrics::new()?;
    metrics.db_up.set(1);
    let health = Arc::new(Health::default());
    health.db_up.store(true, Ordering::Relaxed);
    health.schema_current.store(true, Ordering::Relaxed);
    let root = RecordingsRoot::new(settings.storage.recordings_root.clone());
    if let Some(problem) = root
        .problem()
        .filter(|_| !settings.dispatch.file_entity_types.is_empty())
    {
        // a mount missing is the deployment's fault: said once here, not only row by row
        tracing::warn!(
            "storage.recordings_root {} {problem}: recording files cannot be read until it is \
             there (their rows fail as file_missing or file_unreadable, retried until dead)",
            root.path().display()
        );
    }
    let dispatcher = Dispatcher::new(&settings.ingest, root, metrics.clone())?;
    Ok((
        RelayParts {
            store,
            dispatcher,
            settings: Arc::clone(settings),
            metrics,
            health,
        },
        lock,
    ))
}

/// The daemon: deliver until `shutdown`.
pub async fn run(
    settings: Arc<Settings>,
    migrate: bool,
    shutdown: CancellationToken,
) -> anyhow::Result<ExitCode> {
    let (parts, _lock) = prepare(&settings, migrate).await?;
    let aux = TaskTracker::new();
    let aux_stop = CancellationToken::new();
    if settings.metrics.enabled {
        let addr = settings.metrics.listen;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on metrics.listen {addr}"))?;
        let bound = listener.local_addr().unwrap_or(addr);
        tracing::info!(%bound, "serving /metrics, /healthz and /readyz");
        let (metrics, health, store, stop) = (
            parts.metrics.clone(),
            Arc::clone(&parts.health),
            parts.store.clone(),
            aux_stop.clone(),
        );
        let backlog = crate::metrics::ScrapeRefresh::new(settings.metrics.backlog_exact_rows);
        aux.spawn(async move {
            if let Err(e) =
                crate::metrics::serve(listener, metrics, health, store, backlog, stop).await
            {
                tracing::error!(error = %causes(&e), "metrics server failed");
            }
        });
    }
    let backend = parts.store.backend();
    let relay = Relay::new(parts, Mode::Run);
    aux.spawn(Arc::clone(&relay).renew_leases(aux_stop.clone()));
    aux.spawn(Arc::clone(&relay).listen(aux_stop.clone()));
    aux.spawn(Arc::clone(&relay).refresh_gauges(aux_stop.clone()));
    aux.spawn(Arc::clone(&relay).prune(aux_stop.clone()));
    if let Some(interval) = crate::systemd::watchdog_interval() {
        aux.spawn(crate::systemd::feed_watchdog(
            Arc::clone(&relay),
            interval,
            aux_stop.clone(),
        ));
    }
    tracing::info!(
        backend,
        ingest = %settings.ingest.base_url_shown(),
        batch_size = settings.dispatch.batch_size,
        batches_per_settle = settings.dispatch.batches_per_settle,
        concurrency = settings.dispatch.concurrency,
        "relay running"
    );
    crate::systemd::ready("delivering");
    let summary = relay.run_workers(shutdown).await;
    crate::systemd::stopping();
    aux_stop.cancel();
    aux.close();
    let _ = tokio::time::timeout(Duration::from_secs(5), aux.wait()).await;
    tracing::info!(
        delivered = summary.delivered,
        retried = summary.retried,
        retried_uncharged = summary.retried_uncharged,
        dead = summary.dead,
        "stopped"
    );
    worker_failure(&summary)?;
    Ok(ExitCode::SUCCESS)
}

/// A worker that panicked is a failure of the whole command (exit 1).
fn worker_failure(summary: &Summary) -> anyhow::Result<()> {
    if summary.worker_panics > 0 {
        bail!(
            "{} delivery worker(s) stopped on an internal error (logged above); the rows \
             they held return when their lease expires",
            summary.worker_panics
        );
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, Default)]
pub struct DrainOptions {
    pub max_rows: Option<u64>,
    pub timeout: Option<Duration>,
    pub migrate: bool,
}

/// Deliver everything due now, then return what happened.
pub async fn drain(
    settings: Arc<Settings>,
    options: DrainOptions,
    shutdown: CancellationToken,
) -> anyhow::Result<Summary> {
    let started = Instant::now();
    let (parts, _lock) = prepare(&settings, options.migrate).await?;
    let relay = Relay::new(
        parts,
        Mode::Drain {
            max_rows: options.max_rows,
        },
    );
    let aux = TaskTracker::new();
    let aux_stop = CancellationToken::new();
    aux.spawn(Arc::clone(&relay).renew_leases(aux_stop.clone()));
    aux.spawn(progress(
        Arc::clone(&relay),
        options.max_rows,
        aux_stop.clone(),
    ));
    let stop = shutdown.child_token();
    if let Some(timeout) = options.timeout {
        let stop = stop.clone();
        let done = aux_stop.clone();
        aux.spawn(async move {
            tokio::select! {
                () = tokio::time::sleep(timeout) => {
                    tracing::warn!(?timeout, "drain --timeout reached: stopping");
                    stop.cancel();
                }
                // the drain ended first: no warning, and nothing left to wait for
                () = done.cancelled() => {}
            }
        });
    }
    let summary = relay.run_workers(stop.clone()).await;
    aux_stop.cancel();
    aux.close();
    let _ = tokio::time::timeout(Duration::from_secs(5), aux.wait()).await;
    worker_failure(&summary)?;
    // retention is kept by drains too, for deployments that only run them from cron
    // (also by one that reached its --timeout, as a cron drain on a steady stream
    // always does; not after SIGTERM, which asks it to stop)
    if !shutdown.is_cancelled() && summary.end != DrainEnd::DatabaseDown {
        let pruned = relay.prune_once(&shutdown).await;
        if pruned > 0 {
            tracing::info!(
                records = pruned,
                "pruned delivered records past retention.sent_ttl"
            );
        }
    }
    let elapsed = started.elapsed();
    let rate = rows_per_second(summary.delivered, elapsed);
    say!(
        "drain: delivered {}, retried {}{}, dead {}, left for retry {}{} in {:.2}s ({} rows/s){}",
        summary.delivered,
        summary.retried,
        match summary.retried_uncharged {
            0 => String::new(),
            n if n == summary.retried => " (none charged an attempt)".to_owned(),
            n => format!(" ({n} not charged an attempt)"),
        },
        summary.dead,
        summary.left_for_retry,
        if summary.unsettled > 0 {
            format!(
                ", left leased {} (the database did not take their outcome or their \
                 release; they return when their lease expires)",
                summary.unsettled
            )
        } else {
            String::new()
        },
        elapsed.as_secs_f64(),
        rate,
        match summary.end {
            DrainEnd::Empty => "",
            DrainEnd::MaxRows => " — stopped at --max-rows",
            DrainEnd::SinkDown => " — stopped: the ingest sink is down",
            DrainEnd::RateLimited =>
                " — stopped: the ingest sink asked to wait (Retry-After on a 429 or 503)",
            DrainEnd::Stopped => " — stopped before the outbox was empty",
            DrainEnd::DatabaseDown => " — stopped: the database stayed unreachable",
        }
    );
    if summary.end == DrainEnd::Empty {
        let (left, behind) = relay
            .rows_left()
            .await
            .map_or((0, 0), |s| (s.pending, s.waiting_behind_key));
        let others = left.saturating_sub(i64::try_from(summary.left_for_retry).unwrap_or(0));
        if others > 0 {
            let rows = if others == 1 { "row is" } else { "rows are" };
            let why = match behind.min(others) {
                0 => "waiting for a retry, behind an older row of their ordering key, or \
                      held by another relay"
                    .to_owned(),
                b if b == others => "behind an older row of their ordering key".to_owned(),
                1 => "1 behind an older row of its ordering key, the rest waiting for a retry \
                      or held by another relay"
                    .to_owned(),
                b => format!(
                    "{b} behind an older row of their ordering key, the rest waiting for a \
                     retry or held by another relay"
                ),
            };
            say!(
                "drain: {others} more {rows} in the outbox, not due during this drain \
                 ({why}): `serversync status` counts them"
            );
        }
    }
    Ok(summary)
}

pub fn drain_exit_code(summary: &Summary) -> ExitCode {
    if summary.end == DrainEnd::DatabaseDown {
        return ExitCode::FAILURE;
    }
    let incomplete = summary.dead > 0
        || summary.left_for_retry > 0
        || summary.unsettled > 0
        || matches!(
            summary.end,
            DrainEnd::SinkDown | DrainEnd::RateLimited | DrainEnd::Stopped
        );
    if incomplete {
        ExitCode::from(EXIT_INCOMPLETE)
    } else {
        ExitCode::SUCCESS
    }
}

/// Progress of a drain: a bar on a TTY, a line every 5 s otherwise. The total is
/// counted here, beside the workers, not before them: counting a large backlog
/// takes a while (a quarter of a second at a million rows) and the rows need not
/// wait for it. Without a TTY it is counted only when the first line is due, so a
/// drain that ends within 5 s (a cron job's usual one) never counts the queue.
async fn progress(relay: Arc<Relay>, max_rows: Option<u64>, stop: CancellationToken) {
    let done = |r: &Relay| {
        r.stats.delivered.load(Ordering::Relaxed) + r.stats.dead.load(Ordering::Relaxed)
    };
    if std::io::stdout().is_terminal() {
        let started = Instant::now();
        let bar = indicatif::ProgressBar::new(drain_total(&relay, max_rows).await);
        // the rate as the summary line says it (indicatif's `{per_sec}` shows four
        // decimals): whole rows per second, since the start
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} rows  {msg} rows/s  ETA {eta}",
        ) {
            bar.set_style(style);
        }
        loop {
            let n = done(&relay);
            if n > bar.length().unwrap_or(0) {
                bar.set_length(n);
            }
            bar.set_position(n);
            bar.set_message(rows_per_second(n, started.elapsed()));
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
        bar.finish_and_clear();
    } else {
        let started = Instant::now();
        let mut counted = None;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
            let total = match counted {
                Some(t) => t,
                None => *counted.insert(drain_total(&relay, max_rows).await),
            };
            let n = done(&relay);
            let rate = rows_per_second(n, started.elapsed());
            let total = total.max(n);
            say_err!("drain: {n}/{total} rows settled ({rate} rows/s)");
        }
    }
}

/// A drain's rate, whole above 10 rows/s, with a decimal below (a trickle of rows
/// to a slow sink is not "0 rows/s").
fn rows_per_second(rows: u64, elapsed: Duration) -> String {
    let rate = rows as f64 / elapsed.as_secs_f64().max(1e-3);
    if rate >= 10.0 || rate == 0.0 {
        format!("{rate:.0}")
    } else {
        format!("{rate:.1}")
    }
}

/// What a drain has settled, has out and finds due now: the rows it is expected to
/// settle (a batch settled while the count runs is missed; the bar grows to fit).
async fn drain_total(relay: &Relay, max_rows: Option<u64>) -> u64 {
    // settled before the count's snapshot, so none of them is counted again in it
    let settled =
        relay.stats.delivered.load(Ordering::Relaxed) + relay.stats.dead.load(Ordering::Relaxed);
    let left = relay.store().count_due_or_held_by(relay.owner()).await;
    let total = left.unwrap_or(0).max(0) as u64 + settled;
    max_rows.map_or(total, |m| total.min(m))
}

/// The error and its causes, skipping causes already quoted by their parent (sqlx
/// and reqwest errors repeat their source in their own message), and a part said
/// twice in a row within one message (sqlx's "error with configuration: error with
/// configuration: …").
pub fn causes(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
    }
    let mut parts: Vec<&str> = Vec::new();
    for part in line.split(": ") {
        if parts.last() != Some(&part) {
            parts.push(part);
        }
    }
    parts.join(": ")
}
