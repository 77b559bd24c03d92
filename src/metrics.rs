//! Prometheus metrics (SPEC §7) in a registry owned by the process, not a global,
//! and the `/metrics`, `/healthz`, `/readyz` endpoints on their own listener.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, Opts, Registry, TextEncoder,
};
use tokio_util::sync::CancellationToken;

use crate::store::{Backlog, Store};

/// The entity types of the spec: their series exist from the start.
const KNOWN_ENTITY_TYPES: [&str; 3] = ["call_log", "recording", "recording_file"];

/// The most entity types that get series of their own; any further one is counted
/// as `other`. Entity types come from the producers' rows: a producer that writes an
/// id into the type must not make a series per row, in memory and in Prometheus.
const MAX_ENTITY_LABELS: usize = 64;

/// The longest entity type that is its own label; a longer one is `other` (a
/// producer's 100 KB type would otherwise be a 100 KB label on every scrape).
const MAX_ENTITY_LABEL_BYTES: usize = 100;

/// The label of entity types past [`MAX_ENTITY_LABELS`] or [`MAX_ENTITY_LABEL_BYTES`].
const OTHER_ENTITY_TYPE: &str = "other";

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub outbox_pending: GaugeVec,
    pub oldest_pending_age: Gauge,
    pub dead_letters: GaugeVec,
    pub deliveries: IntCounterVec,
    pub delivery_errors: IntCounterVec,
    pub http_duration: HistogramVec,
    pub delivery_lag: Histogram,
    pub batch_size: Histogram,
    pub sink_up: IntGauge,
    /// 0 while the recording-file endpoint is taken as down on its own
    /// (`UploadHealth`): JSON goes on, recording files wait.
    pub upload_up: IntGauge,
    pub db_up: IntGauge,
    pub lease_lost: IntCounter,
    known_entity_types: Arc<std::sync::Mutex<std::collections::BTreeSet<String>>>,
    /// Backlog readings, numbered as they start (`backlog_ticket`).
    backlog_tickets: Arc<std::sync::atomic::AtomicU64>,
    backlog_shown: Arc<std::sync::Mutex<BacklogShown>>,
}

/// The backlog reading the gauges show.
#[derive(Default)]
struct BacklogShown {
    /// Its ticket: a reading that started before it is older, and not shown.
    ticket: u64,
    /// The error types it showed dead letters of that are none of the relay's own
    /// (rows written by hand or by an older version): their series go when the
    /// next reading has none of them.
    foreign_error_types: std::collections::BTreeSet<String>,
}

/// What the relay last saw of the database: whether it answered (for logging and
/// the `serversync_db_up` transitions) and whether the schema is current (for
/// `/readyz`, which pings the database itself).
#[derive(Debug, Default)]
pub struct Health {
    pub db_up: AtomicBool,
    pub schema_current: AtomicBool,
}

impl Metrics {
    pub fn new() -> anyhow::Result<Metrics> {
        let registry = Registry::new();
        let outbox_pending = GaugeVec::new(
            Opts::new(
                "serversync_outbox_pending",
                "Rows in sync_outbox not yet delivered",
            ),
            &["entity_type"],
        )?;
        let oldest_pending_age = Gauge::new(
            "serversync_outbox_oldest_pending_age_seconds",
            "Age of the oldest undelivered row (0 when the outbox is empty)",
        )?;
        let dead_letters = GaugeVec::new(
            Opts::new(
                "serversync_dead_letters",
                "Rows in sync_outbox_dead_letters",
            ),
            &["error_type"],
        )?;
        let deliveries = IntCounterVec::new(
            Opts::new(
                "serversync_deliveries_total",
                "Settled delivery attempts by outcome (sent / retry / dead)",
            ),
            &["entity_type", "outcome"],
        )?;
        let delivery_errors = IntCounterVec::new(
            Opts::new(
                "serversync_delivery_errors_total",
                "Failed row deliveries by error type",
            ),
            &["error_type"],
        )?;
        let http_duration = HistogramVec::new(
            HistogramOpts::new(
                "serversync_http_request_duration_seconds",
                "Ingest request duration",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                60.0, 300.0,
            ]),
            &["endpoint"],
        )?;
        let delivery_lag = Histogram::with_opts(
            HistogramOpts::new("serversync_delivery_lag_seconds", "created_at to delivered")
                .buckets(vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                    30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
                ]),
        )?;
        let batch_size = Histogram::with_opts(
            HistogramOpts::new(
                "serversync_batch_size",
                "Rows per batch (up to dispatch.batch_size)",
            )
            .buckets(vec![
                1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 5000.0,
            ]),
        )?;
        let sink_up = IntGauge::new(
            "serversync_sink_up",
            "1 while the ingest sink is taken as healthy",
        )?;
        let upload_up = IntGauge::new(
            "serversync_upload_up",
            "1 while the recording-file endpoint is taken as healthy (0: uploads fail while \
             the sink takes JSON; recording files wait)",
        )?;
        let db_up = IntGauge::new("serversync_db_up", "1 while the database answers")?;
        let lease_lost = IntCounter::new(
            "serversync_lease_lost_total",
            "Rows whose settle found their lease taken over by another relay",
        )?;
        registry.register(Box::new(outbox_pending.clone()))?;
        registry.register(Box::new(oldest_pending_age.clone()))?;
        registry.register(Box::new(dead_letters.clone()))?;
        registry.register(Box::new(deliveries.clone()))?;
        registry.register(Box::new(delivery_errors.clone()))?;
        registry.register(Box::new(http_duration.clone()))?;
        registry.register(Box::new(delivery_lag.clone()))?;
        registry.register(Box::new(batch_size.clone()))?;
        registry.register(Box::new(sink_up.clone()))?;
        registry.register(Box::new(upload_up.clone()))?;
        registry.register(Box::new(db_up.clone()))?;
        registry.register(Box::new(lease_lost.clone()))?;
        registry.register(Box::new(ProcessMetrics::new()))?;
        sink_up.set(1);
        upload_up.set(1);
        // Every series of the spec is in the first scrape, at 0, instead of appearing
        // with its first event: an absent series looks like a broken exporter, and
        // `rate()` over a counter that springs into being at 1 misses that first event.
        for entity_type in KNOWN_ENTITY_TYPES {
            for outcome in ["sent", "retry", "dead"] {
                deliveries.with_label_values(&[entity_type, outcome]);
            }
        }
        for error_type in crate::taxonomy::ErrorType::ALL {
            delivery_errors.with_label_values(&[error_type.as_str()]);
        }
        for endpoint in ["sync", "recording_file"] {
            http_duration.with_label_values(&[endpoint]);
        }
        Ok(Metrics {
            registry,
            outbox_pending,
            oldest_pending_age,
            dead_letters,
            deliveries,
            delivery_errors,
            http_duration,
            delivery_lag,
            batch_size,
            sink_up,
            upload_up,
            db_up,
            lease_lost,
            known_entity_types: Arc::new(std::sync::Mutex::new(
                KNOWN_ENTITY_TYPES.iter().map(|t| t.to_string()).collect(),
            )),
            backlog_tickets: Default::default(),
            backlog_shown: Default::default(),
        })
    }

    /// The `entity_type` label for `entity_type`: itself while fewer than
    /// [`MAX_ENTITY_LABELS`] are known (it becomes known), else `other`.
    pub fn entity_label<'a>(&self, entity_type: &'a str) -> &'a str {
        let mut known = self
            .known_entity_types
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if known.contains(entity_type) {
            return entity_type;
        }
        if known.len() < MAX_ENTITY_LABELS && entity_type.len() <= MAX_ENTITY_LABEL_BYTES {
            known.insert(entity_type.to_string());
            return entity_type;
        }
        OTHER_ENTITY_TYPE
    }

    /// The number of a backlog reading about to start, for `set_backlog`.
    pub fn backlog_ticket(&self) -> u64 {
        self.backlog_tickets
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            + 1
    }

    /// Replace the backlog gauges with a reading that started with `ticket` (label
    /// sets that vanished go), unless one that started later is shown already: the
    /// relay's periodic refresh and a scrape's can overlap, and an older reading
    /// finishing last would show rows delivered since as pending until the next.
    /// Every series is set in place (none is reset first), so a scrape at the same
    /// moment sees each one, old value or new.
    pub fn set_backlog(&self, ticket: u64, backlog: &Backlog) {
        let mut shown = self.backlog_shown.lock().unwrap_or_else(|e| e.into_inner());
        if ticket <= shown.ticket {
            return;
        }
        shown.ticket = ticket;
        let mut by_label: std::collections::BTreeMap<String, u64> = Default::default();
        for (entity_type, n) in &backlog.pending_by_entity_type {
            let label = self.entity_label(entity_type).to_string();
            *by_label.entry(label).or_default() += u64::try_from(*n).unwrap_or(0);
        }
        // Entity types seen before, and the usual three, read 0 when none are
        // pending instead of vanishing (an absent series looks like a broken scrape).
        let known = self
            .known_entity_types
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        // once types were folded into `other`, it stays (0 when none are pending)
        let other = (known.len() >= MAX_ENTITY_LABELS || by_label.contains_key(OTHER_ENTITY_TYPE))
            .then_some(OTHER_ENTITY_TYPE);
        for entity_type in known.iter().map(String::as_str).chain(other) {
            let n = by_label.get(entity_type).copied().unwrap_or(0);
            self.outbox_pending
                .with_label_values(&[entity_type])
                .set(n as f64);
        }
        self.oldest_pending_age
            .set(backlog.oldest_pending_age_seconds);
        let ours = crate::taxonomy::ErrorType::ALL.map(|t| t.as_str());
        for error_type in ours {
            let n = backlog
                .dead_letters_by_error_type
                .get(error_type)
                .copied()
                .unwrap_or(0);
            self.dead_letters
                .with_label_values(&[error_type])
                .set(n as f64);
        }
        let foreign: std::collections::BTreeSet<String> = backlog
            .dead_letters_by_error_type
            .keys()
            .filter(|t| !ours.contains(&t.as_str()))
            .cloned()
            .collect();
        for error_type in &foreign {
            let n = backlog.dead_letters_by_error_type[error_type];
            self.dead_letters
                .with_label_values(&[error_type.as_str()])
                .set(n as f64);
        }
        for gone in shown.foreign_error_types.difference(&foreign) {
            // absent already is as good as removed
            let _ = self.dead_letters.remove_label_values(&[gone.as_str()]);
        }
        shown.foreign_error_types = foreign;
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let encoder = TextEncoder::new();
        if let Err(e) = encoder.encode(&self.registry.gather(), &mut buf) {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        String::from_utf8_lossy(&buf).into_owned()
    }
}

#[derive(Clone)]
struct AppState {
    metrics: Metrics,
    health: Arc<Health>,
    store: Store,
    backlog: Arc<ScrapeRefresh>,
}

/// The backlog gauges, refreshed when scraped (at most once per `MIN_AGE`) as well
/// as every `metrics.refresh_interval`: a scrape shows the outbox as it is, not as
/// it was up to an interval ago.
pub struct ScrapeRefresh {
    exact_rows: u32,
    last: tokio::sync::Mutex<Option<std::time::Instant>>,
}

impl ScrapeRefresh {
    /// Gauges refreshed this recently are served as they are.
    const MIN_AGE: std::time::Duration = std::time::Duration::from_secs(1);
    /// A scrape waits this long for the database at most, then serves the last values.
    const WAIT: std::time::Duration = std::time::Duration::from_secs(2);

    pub fn new(exact_rows: u32) -> ScrapeRefresh {
        ScrapeRefresh {
            exact_rows,
            last: tokio::sync::Mutex::new(None),
        }
    }

    async fn refresh(&self, store: &Store, metrics: &Metrics) {
        // one scrape refreshes; scrapes arriving meanwhile wait for it and reuse it
        let mut last = self.last.lock().await;
        if last.is_some_and(|at| at.elapsed() < Self::MIN_AGE) {
            return;
        }
        let ticket = metrics.backlog_ticket();
        if let Ok(Ok(backlog)) =
            tokio::time::timeout(Self::WAIT, store.backlog(self.exact_rows)).await
        {
            metrics.set_backlog(ticket, &backlog);
        }
        *last = Some(std::time::Instant::now());
    }
}

/// How long `/readyz` waits for the database to answer its ping.
const READY_PING: std::time::Duration = std::time::Duration::from_secs(1);

/// Serve the endpoints on `listener` until `cancel`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Metrics,
    health: Arc<Health>,
    store: Store,
    backlog: ScrapeRefresh,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let app = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(AppState {
            metrics,
            health,
            store,
            backlog: Arc::new(backlog),
        });
    axum::serve(listener, app)
        .with_graceful_shutdown(cancel.cancelled_owned())
        .await?;
    Ok(())
}

async fn render_metrics(State(state): State<AppState>) -> impl IntoResponse {
    state.backlog.refresh(&state.store, &state.metrics).await;
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

/// Asks the database now (a ping of at most a second), not what the relay last saw:
/// an idle daemon notices an outage or a recovery only on its next claim or gauge
/// refresh, and a probe should not wait for that. The schema is the last checked.
async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let answers = matches!(
        tokio::time::timeout(READY_PING, state.store.ping()).await,
        Ok(Ok(()))
    );
    if !answers {
        (StatusCode::SERVICE_UNAVAILABLE, "database unavailable\n")
    } else if state.health.schema_current.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "schema not current\n")
    }
}

/// The `process_*` metrics of `prometheus`'s `ProcessCollector`, but for
/// `process_cpu_seconds_total` in fractions of a second: the crate counts it in whole
/// seconds, so a relay that is idle or lightly loaded showed 0 and a `rate()` of it
/// jumped in steps of a second.
struct ProcessMetrics {
    inner: prometheus::process_collector::ProcessCollector,
}

impl ProcessMetrics {
    const CPU: &'static str = "process_cpu_seconds_total";

    fn new() -> ProcessMetrics {
        ProcessMetrics {
            inner: prometheus::process_collector::ProcessCollector::for_self(),
        }
    }
}

/// User and system CPU time of this process, in seconds (to the kernel's tick).
#[cfg(target_os = "linux")]
fn cpu_seconds() -> Option<f64> {
    let stat = procfs::process::Process::myself().ok()?.stat().ok()?;
    Some((stat.utime + stat.stime) as f64 / procfs::ticks_per_second() as f64)
}

#[cfg(not(target_os = "linux"))]
fn cpu_seconds() -> Option<f64> {
    None
}

impl prometheus::core::Collector for ProcessMetrics {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        self.inner.desc()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let mut families = self.inner.collect();
        if let Some(seconds) = cpu_seconds() {
            for family in families.iter_mut().filter(|f| f.name() == Self::CPU) {
                for metric in family.mut_metric() {
                    let mut counter = prometheus::proto::Counter::new();
                    counter.set_value(seconds);
                    metric.set_counter(counter);
                }
            }
        }
        families
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::taxonomy::ErrorType;
    use std::collections::BTreeMap;

    fn series(metrics: &Metrics, name: &str) -> Vec<(String, f64)> {
        metrics
            .registry
            .gather()
            .iter()
            .filter(|f| f.name() == name)
            .flat_map(|f| f.get_metric().to_vec())
            .map(|m| (m.get_label()[0].value().to_string(), m.get_gauge().value()))
            .collect()
    }

    fn backlog(call_logs: i64, dead: &[(&str, i64)]) -> Backlog {
        Backlog {
            pending_by_entity_type: BTreeMap::from([("call_log".to_string(), call_logs)]),
            oldest_pending_age_seconds: 0.0,
            dead_letters_by_error_type: dead.iter().map(|(t, n)| (t.to_string(), *n)).collect(),
        }
    }

    /// The periodic refresh and a scrape's can overlap: a reading that started
    /// before the one shown does not replace it when it finishes last.
    #[test]
    fn an_older_backlog_reading_finishing_last_is_not_shown() {
        let metrics = Metrics::new().unwrap();
        let older = metrics.backlog_ticket();
        let newer = metrics.backlog_ticket();
        metrics.set_backlog(newer, &backlog(0, &[("timeout", 2)]));
        metrics.set_backlog(older, &backlog(3, &[("timeout", 1)]));
        let pending = series(&metrics, "serversync_outbox_pending");
        assert!(
            pending.contains(&("call_log".to_string(), 0.0)),
            "{pending:?}"
        );
        let dead = series(&metrics, "serversync_dead_letters");
        assert!(dead.contains(&("timeout".to_string(), 2.0)), "{dead:?}");
        metrics.set_backlog(metrics.backlog_ticket(), &backlog(5, &[]));
        let pending = series(&metrics, "serversync_outbox_pending");
        assert!(
            pending.contains(&("call_log".to_string(), 5.0)),
            "{pending:?}"
        );
    }

    /// `process_cpu_seconds_total` counts fractions of a second: the prometheus
    /// crate's whole seconds showed 0 for a relay that had used 0.15 s.
    #[cfg(target_os = "linux")]
    #[test]
    fn process_cpu_seconds_count_fractions_of_a_second() {
        let metrics = Metrics::new().unwrap();
        let started = std::time::Instant::now();
        let mut spin = 0_u64;
        while cpu_seconds().unwrap_or(0.0) < 0.05
            && started.elapsed() < std::time::Duration::from_secs(3)
        {
            spin = std::hint::black_box(spin.wrapping_add(1));
        }
        let before = cpu_seconds().expect("the process's CPU time");
        assert!(before >= 0.05, "{before}");
        let cpu = metrics
            .registry
            .gather()
            .into_iter()
            .find(|f| f.name() == "process_cpu_seconds_total")
            .map(|f| f.get_metric()[0].get_counter().value())
            .expect("process_cpu_seconds_total");
        assert!(cpu >= before, "{cpu} < {before}");
    }

    /// Every error type of the relay's reads 0 when it has no dead letters; one
    /// written by something else is shown while it has some, and then goes.
    #[test]
    fn a_foreign_error_types_dead_letters_series_goes_when_they_do() {
        let metrics = Metrics::new().unwrap();
        metrics.set_backlog(metrics.backlog_ticket(), &backlog(0, &[("legacy", 4)]));
        let dead = series(&metrics, "serversync_dead_letters");
        assert_eq!(dead.len(), ErrorType::ALL.len() + 1, "{dead:?}");
        assert!(dead.contains(&("legacy".to_string(), 4.0)));
        assert!(dead.contains(&("path_denied".to_string(), 0.0)));
        metrics.set_backlog(metrics.backlog_ticket(), &backlog(0, &[("path_denied", 1)]));
        let dead = series(&metrics, "serversync_dead_letters");
        assert_eq!(dead.len(), ErrorType::ALL.len(), "{dead:?}");
        assert!(dead.contains(&("path_denied".to_string(), 1.0)));
    }

    /// Entity types are the producers' to choose: past a bound they share `other`,
    /// so that a type with an id in it cannot make a series per row.
    #[test]
    fn entity_types_past_the_bound_are_counted_as_other() {
        let metrics = Metrics::new().unwrap();
        let pending: BTreeMap<String, i64> =
            (0..100).map(|n| (format!("type_{n:03}"), 2)).collect();
        metrics.set_backlog(
            metrics.backlog_ticket(),
            &Backlog {
                pending_by_entity_type: pending,
                oldest_pending_age_seconds: 0.0,
                dead_letters_by_error_type: BTreeMap::new(),
            },
        );
        let series = series(&metrics, "serversync_outbox_pending");
        assert_eq!(series.len(), MAX_ENTITY_LABELS + 1, "{series:?}");
        let total: f64 = series.iter().map(|(_, v)| v).sum();
        assert_eq!(total, 200.0, "every pending row is counted once");
        let other = series.iter().find(|(l, _)| l == OTHER_ENTITY_TYPE);
        // the usual three are known from the start: 61 of the 100 get their own
        assert_eq!(other.map(|(_, v)| *v), Some(2.0 * 39.0));
        assert_eq!(metrics.entity_label("type_099"), OTHER_ENTITY_TYPE);
        assert_eq!(metrics.entity_label("call_log"), "call_log");
    }

    #[test]
    fn an_entity_type_too_long_for_a_label_is_other() {
        let metrics = Metrics::new().expect("metrics");
        let long = "t".repeat(MAX_ENTITY_LABEL_BYTES + 1);
        assert_eq!(metrics.entity_label(&long), OTHER_ENTITY_TYPE);
        let longest = "t".repeat(MAX_ENTITY_LABEL_BYTES);
        assert_eq!(metrics.entity_label(&longest), longest);
    }
}
