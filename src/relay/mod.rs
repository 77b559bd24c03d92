//! The relay: workers that claim a batch, deliver it, and settle it, in a loop.
//!
//! `step` does one claim → deliver → settle and returns what happened; the worker
//! loop owns sleeping, backoff and shutdown. No transaction or row lock is held
//! while HTTP is in flight: the claim commits a lease, the settle is fenced on it.
//!
//! This file holds the relay's state and `run_workers`; beside it live `worker` (the
//! loop and the step), the step's three parts, and the side tasks: `lanes`
//! (claiming, and what is in flight), `deliver` (requests and uploads), `settle` (outcomes, persisted backoff, metrics), `sink_state` (the
//! sink's up/down state shared through the database) and `tasks` (lease renewal,
//! LISTEN, gauges, pruning).

mod deliver;
mod lanes;
mod settle;
mod sink_state;
mod tasks;
mod worker;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use futures_util::FutureExt;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Settings;
use crate::dispatch::Dispatcher;
use crate::metrics::{Health, Metrics};
use crate::sink_health::{Gate, SinkHealth, UploadHealth};
use crate::store::{Held, KeyShare, Store};
use lanes::Lane;

/// How long an idle drain worker waits for another worker's settle before it looks
/// again (a safety net: settles wake it).
const DRAIN_SETTLE_WAIT: Duration = Duration::from_millis(250);

/// The longest rate-limit pause (`Retry-After` of a 429 or 503) a `drain` sits out
/// before going on; a longer one ends it, what is left waiting for the next run.
const DRAIN_SHORT_PAUSE: Duration = Duration::from_secs(5);

/// The least a `drain` waits for an unreachable database before it gives up (exit
/// 1); it waits a lease (`dispatch.lease_duration`, 60 s by default) if that is
/// longer: a restart is ridden out, and a cron drain without `--timeout` does not
/// run for ever.
const DRAIN_DB_PATIENCE: Duration = Duration::from_secs(10);

/// Longest the bookkeeping after the workers (releasing leases, recording the sink's
/// state) may take once they are done or the shutdown grace is over.
const CLEANUP_LIMIT: Duration = Duration::from_secs(5);

/// How long a worker's requests may be out before it claims its next rows meanwhile.
/// A sink that answers within it (the database is then the bottleneck) sees the same
/// claim → deliver → settle cycle as ever; a slower one (a Frontend that stores what
/// it receives) no longer waits for the claim after each settle. Once a worker's
/// requests took longer than this, the next worker claims ahead as soon as its own
/// are out (`Relay::slow_sink`): waiting first would leave the claim running past
/// the answer of a sink only a little slower than the claim.
const PREFETCH_AFTER: Duration = Duration::from_millis(10);

/// A worker's next batch, claimed while its requests were out.
type Prefetched = Option<(u64, crate::store::Claim)>;

/// How long a worker's claim may have nothing but uploads out before another worker
/// stands in for it (`StandIns`).
const STAND_IN_AFTER: Duration = Duration::from_secs(1);

/// Workers that stand in for workers held by long uploads. A worker waits for its
/// whole claim before it claims again, and a recording can take minutes to upload
/// (or hang until `ingest.upload_timeout`): with a few such uploads every worker
/// would be waiting on one, and no JSON row of any key would go out meanwhile. Once a
/// claim has had only uploads out for `STAND_IN_AFTER`, a new worker is started in
/// the same lane, and the held one ends after its settle, so that as many workers
/// claim as ever. At most `dispatch.file_concurrency` stand in at once (the uploads
/// in flight are bounded by that too); JSON requests in flight stay within
/// `dispatch.concurrency`, since a worker held by its uploads has none out.
struct StandIns {
    /// Lanes to start a stand-in in; read by `run_workers`, which owns the workers.
    requests: tokio::sync::mpsc::UnboundedSender<usize>,
    receiver: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<usize>>>,
    /// Workers stood in for that have not ended yet.
    active: AtomicUsize,
    max: usize,
}

/// A step's claim as far as standing in goes: its lane, when its uploads began to be
/// all it has out, and whether a stand-in was started for it (the worker then ends
/// after this step).
pub(super) struct StandIn {
    lane: usize,
    since: Mutex<Option<Instant>>,
    granted: AtomicBool,
    /// Told once `granted` is set.
    granted_now: tokio::sync::Notify,
}

impl StandIn {
    fn new(lane: usize) -> StandIn {
        StandIn {
            lane,
            since: Mutex::new(None),
            granted: AtomicBool::new(false),
            granted_now: tokio::sync::Notify::new(),
        }
    }

    /// Once a stand-in was started for this step's worker (at once if it was).
    pub(super) async fn stood_in_for(&self) {
        if !self.granted.load(Ordering::Relaxed) {
            self.granted_now.notified().await;
        }
    }

    /// Only uploads are out from now on.
    pub(super) fn uploads_only(&self) {
        if let Ok(mut since) = self.since.lock() {
            since.get_or_insert_with(Instant::now);
        }
    }

    /// No stand-in could be started (`file_concurrency` stand in already): ask again
    /// `STAND_IN_AFTER` from now.
    pub(super) fn later(&self) {
        if let Ok(mut since) = self.since.lock() {
            *since = Some(Instant::now());
        }
    }

    /// When to ask for a stand-in, while none was started.
    pub(super) fn due(&self) -> Option<Instant> {
        if self.granted.load(Ordering::Relaxed) {
            return None;
        }
        let since = self.since.lock().ok().and_then(|s| *s)?;
        Some(since + STAND_IN_AFTER)
    }
}

/// What one step did; the loop decides how to wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// A batch was delivered and settled (whatever the rows' outcomes).
    Delivered(usize),
    /// Nothing is due.
    Idle,
    /// The sink is down or rate-limiting: do not claim before this instant.
    Paused(Instant),
    /// The database did not answer; nothing was claimed.
    DatabaseUnavailable,
}

/// How the relay runs: as a daemon, or until nothing is due (`drain`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Run,
    Drain { max_rows: Option<u64> },
}

/// Counters of settled rows, for drain's progress and summary.
#[derive(Debug, Default)]
pub struct Stats {
    pub delivered: AtomicU64,
    pub retried: AtomicU64,
    /// Of `retried`, those not charged an attempt (the sink was down, or another
    /// row of their batch was to blame).
    pub retried_uncharged: AtomicU64,
    pub dead: AtomicU64,
    pub lease_lost: AtomicU64,
    /// Rows this relay claimed and left leased: the database refused to record
    /// their outcome, or to release them (after retrying what is transient). They
    /// return when their lease expires. By id, not counted: a batch whose settle
    /// was still being retried when the relay tried to release it fails both.
    pub unsettled: Mutex<HashSet<i64>>,
    /// Workers stopped by a panic (a bug): the relay stops, and exits non-zero.
    pub worker_panics: AtomicU64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainEnd {
    /// Nothing due is left.
    Empty,
    /// `--max-rows` rows were claimed.
    MaxRows,
    /// The sink is down; what is left waits for it.
    SinkDown,
    /// The sink asked to wait longer than a drain sits out (a 429, or a 503, with
    /// `Retry-After`); what is left waits for it.
    RateLimited,
    /// Stopped by a signal or `--timeout`.
    Stopped,
    /// The database stayed unreachable longer than the drain waits for it.
    DatabaseDown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub delivered: u64,
    /// Failed attempts settled for a retry (a row may be retried more than once).
    pub retried: u64,
    /// Of `retried`, those not charged an attempt.
    pub retried_uncharged: u64,
    pub dead: u64,
    /// Rows this run scheduled for a retry that are still waiting for it.
    pub left_for_retry: u64,
    /// Rows left leased: their outcome could not be written, or they could not be
    /// released (`Stats::unsettled`).
    pub unsettled: u64,
    /// Workers stopped by a panic (`Stats::worker_panics`).
    pub worker_panics: u64,
    pub end: DrainEnd,
}

/// Everything the relay needs, built once at start-up.
pub struct RelayParts {
    pub store: Store,
    pub dispatcher: Dispatcher,
    pub settings: Arc<Settings>,
    pub metrics: Metrics,
    pub health: Arc<Health>,
}

#[derive(Default)]
struct DrainState {
    busy: AtomicUsize,
    /// Settles so far: a claim that found nothing proves the drain is over only if
    /// no settle (which may have unblocked rows of its keys) landed meanwhile.
    settles: AtomicU64,
    claimed: AtomicU64,
    max_rows: Option<u64>,
    left_for_retry: Mutex<HashSet<i64>>,
    end: Mutex<Option<DrainEnd>>,
}

pub struct Relay {
    store: Store,
    dispatcher: Dispatcher,
    settings: Arc<Settings>,
    metrics: Metrics,
    health: Arc<Health>,
    sink: SinkHealth,
    /// The recording-file endpoint's own health (`UploadHealth`).
    upload_health: UploadHealth,
    owner: String,
    wake: watch::Sender<u64>,
    /// Batches claimed and not yet settled, by batch number: (claim token, ids), for
    /// renewal and release. A shared claim's batches have the same token.
    in_flight: Mutex<HashMap<u64, (i64, Vec<i64>)>>,
    /// The ordering keys of the rows this relay is delivering (by a 64-bit hash of
    /// the key): the row out for each (`Relay::take_keys`).
    keys_out: Mutex<HashMap<u64, i64>>,
    /// When each claim's lease ends by this relay's clock (by claim token): from
    /// before the claim or the renewal that set it, so never later than the
    /// database's end (`Relay::lease_holds`).
    lease_ends: Mutex<HashMap<i64, lanes::LeaseEnd>>,
    /// When the rows this relay put back for a retry are due again, in milliseconds
    /// since `started` (rounded up to `RETRY_DUE_GRAIN`, at most `RETRY_DUE_KEPT`
    /// of them): an idle worker looks then, not only at its next
    /// `dispatch.poll_interval` (`Relay::until_retry_due`).
    retry_due: Mutex<BTreeSet<u64>>,
    /// Settles retrying on the database (`Relay::write_settlement`): while lease
    /// renewals fail too, no claim is made (`Relay::wait_for_settles`).
    settles_retrying: AtomicUsize,
    /// The latest lease renewal failed (`Relay::renew_leases`).
    renewals_failing: AtomicBool,
    next_batch: AtomicU64,
    heartbeat: AtomicU64,
    started: Instant,
    /// Since when the database has been unreachable (claims or settles failing).
    db_down_since: Mutex<Option<Instant>>,
    pub stats: Stats,
    drain: Option<DrainState>,
    /// The claim lanes (`dispatch.claim_concurrency`); worker `i` claims in lane
    /// `i % lanes.len()` while `backlog`, else every worker in the first lane.
    lanes: Vec<Lane>,
    /// The last claim found as many rows as it asked for: a backlog is being drained,
    /// and the lanes claim from their own shares of the keys. Otherwise one claim at a
    /// time for the whole relay, from every key, so that a handful of rows goes out
    /// as one batch (and a wake-up is one claim), as with a single lane.
    backlog: AtomicBool,
    /// The latest delivery of a full claim took longer than `PREFETCH_AFTER`: claim
    /// ahead at once.
    slow_sink: AtomicBool,
    /// Uploads in flight across the relay (`dispatch.file_concurrency`): every worker
    /// may hold a batch of recording files, and each upload keeps up to a few MiB of
    /// its file in flight, so memory is bounded by this, not by the worker count.
    uploads: tokio::sync::Semaphore,
    stand_ins: StandIns,
    /// When a slow claim last refreshed the outbox's statistics (`lanes.rs`).
    last_analyze: Mutex<Option<std::time::Instant>>,
    /// Batches each worker claims and settles together: `dispatch.batches_per_settle`,
    /// at most `dispatch.concurrency`.
    batches_per_worker: u32,
    /// `dispatch.concurrency ÷ batches_per_worker` (rounded down): the batches in
    /// flight, and so the requests and the rows a crash can deliver twice, stay
    /// within `concurrency` batches however they are grouped.
    workers: usize,
}

/// The retries an idle relay wakes for are kept to this many milliseconds
/// (`Relay::note_retries_due`): rows due within one grain are looked for together.
const RETRY_DUE_GRAIN: u64 = 10;

/// At most this many distinct retry times are kept; later ones wait for a poll.
const RETRY_DUE_KEPT: usize = 4096;

impl Relay {
    pub fn new(parts: RelayParts, mode: Mode) -> Arc<Relay> {
        let d = &parts.settings.dispatch;
        warn_if_an_outage_can_dead_letter(&parts.settings);
        if let Some(warning) = parts.settings.ingest.unverified_tls_warning() {
            tracing::warn!("{warning}");
        }
        let upload_health = UploadHealth::new(
            d.probe_interval,
            d.max_probe_interval,
            parts.metrics.upload_up.clone(),
        );
        let sink = SinkHealth::new(
            d.outage_threshold,
            d.probe_interval,
            d.max_probe_interval,
            parts.metrics.clone(),
        );
        let batches_per_worker = d.batches_per_settle.clamp(1, d.concurrency.max(1));
        let workers = (d.concurrency.max(1) / batches_per_worker) as usize;
        let lanes = parts
            .store
            .claim_lanes(d.claim_concurrency)
            .clamp(1, workers as u32);
        let lanes = (0..lanes)
            .map(|index| Lane::new((lanes > 1).then_some(KeyShare { index, of: lanes })))
            .collect();
        let file_slots = d.file_concurrency.max(1) as usize;
        let uploads = tokio::sync::Semaphore::new(file_slots);
        let (requests, receiver) = tokio::sync::mpsc::unbounded_channel();
        let stand_ins = StandIns {
            requests,
            receiver: Mutex::new(Some(receiver)),
            active: AtomicUsize::new(0),
            max: file_slots,
        };
        let drain = match mode {
            Mode::Run => None,
            Mode::Drain { max_rows } => Some(DrainState {
                max_rows,
                ..Default::default()
            }),
        };
        Arc::new(Relay {
            store: parts.store,
            dispatcher: parts.dispatcher,
            settings: parts.settings,
            metrics: parts.metrics,
            health: parts.health,
            sink,
            upload_health,
            owner: owner_name(),
            wake: watch::channel(0).0,
            in_flight: Mutex::new(HashMap::new()),
            keys_out: Mutex::new(HashMap::new()),
            lease_ends: Mutex::new(HashMap::new()),
            retry_due: Mutex::new(BTreeSet::new()),
            settles_retrying: AtomicUsize::new(0),
            renewals_failing: AtomicBool::new(false),
            next_batch: AtomicU64::new(0),
            heartbeat: AtomicU64::new(0),
            started: Instant::now(),
            db_down_since: Mutex::new(None),
            stats: Stats::default(),
            drain,
            lanes,
            backlog: AtomicBool::new(false),
            slow_sink: AtomicBool::new(false),
            uploads,
            stand_ins,
            last_analyze: Mutex::new(None),
            batches_per_worker,
            workers,
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Rows settled for a retry are due again after `delays` (from their settle's
    /// commit, which their `next_attempt_at` is not later than).
    fn note_retries_due(&self, delays: impl Iterator<Item = Duration>) {
        let now = self.started.elapsed();
        let mut due = self.retry_due.lock().unwrap_or_else(|e| e.into_inner());
        for delay in delays {
            let at = u64::try_from((now + delay).as_millis()).unwrap_or(u64::MAX);
            due.insert(at.div_ceil(RETRY_DUE_GRAIN) * RETRY_DUE_GRAIN);
            if due.len() > RETRY_DUE_KEPT {
                // the latest go: an idle worker's poll finds them
                due.pop_last();
            }
        }
    }

    /// How long until the next retry noted is due (`note_retries_due`); `None` when
    /// none is ahead. Those whose time has come are forgotten: the workers woken
    /// for them have looked.
    fn until_retry_due(&self) -> Option<Duration> {
        let now = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let mut due = self.retry_due.lock().unwrap_or_else(|e| e.into_inner());
        while due.first().is_some_and(|at| *at <= now) {
            due.pop_first();
        }
        due.first().map(|at| Duration::from_millis(at - now))
    }

    /// Wake idle workers (a row was committed, or notifications may have been lost).
    pub fn wake(&self) {
        self.wake.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// The name this relay leases rows under (`host:pid`).
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// Milliseconds since the worker loop last showed life (for the systemd watchdog).
    pub fn heartbeat_age(&self) -> Duration {
        let now = self.started.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.heartbeat.load(Ordering::Relaxed)))
    }

    fn beat(&self) {
        self.heartbeat
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// The outbox's figures, when it holds any row (a drain that found nothing more
    /// due tells of those it left: not due yet, behind an older row of their key, or
    /// held by another relay). `None` when it is empty or cannot be counted.
    pub async fn rows_left(&self) -> Option<crate::store::Status> {
        self.outbox_left().await.flatten()
    }

    /// Whether no row is due (unleased), as far as the database says; `false` when
    /// it cannot tell.
    async fn nothing_due(&self) -> bool {
        match self.outbox_left().await {
            Some(None) => true,
            Some(Some(s)) => s.due == 0,
            None => false,
        }
    }

    /// What the outbox holds: `Some(None)` when it is empty, `None` when it cannot be
    /// counted. Bounded by `CLEANUP_LIMIT`: a lock held on the outbox (an
    /// operator's, a long migration) would hold the count, and a drain's exit with
    /// it, for as long as it lasts.
    async fn outbox_left(&self) -> Option<Option<crate::store::Status>> {
        let count = async {
            match self.store.has_pending().await {
                Ok(false) => Some(None),
                Ok(true) => self.store.status().await.ok().map(Some),
                Err(_) => None,
            }
        };
        tokio::time::timeout(CLEANUP_LIMIT, count)
            .await
            .ok()
            .flatten()
    }

    /// Run the workers (`concurrency ÷ batches_per_settle`) until `stop` (or, draining,
    /// until nothing is due), then wait for in-flight batches up to `shutdown.grace`
    /// and release the rest.
    pub async fn run_workers(self: &Arc<Self>, stop: CancellationToken) -> Summary {
        let sink = self.sink_name();
        let started_down = self.restore_sink_state(&sink).await;
        let recorded = CancellationToken::new();
        let recorder = self.record_sink_state(sink, started_down, recorded.clone());
        let tracker = TaskTracker::new();
        let finished = stop.child_token();
        for i in 0..self.workers {
            self.spawn_worker(&tracker, i % self.lanes.len(), &finished);
        }
        tracker.close();
        let mut stand_in_requests = self
            .stand_ins
            .receiver
            .lock()
            .ok()
            .and_then(|mut r| r.take());
        // Workers stop claiming on `finished`; a batch in flight is finished and settled.
        let mut grace_elapsed = false;
        loop {
            tokio::select! {
                _ = tracker.wait() => break,
                _ = finished.cancelled() => {
                    let grace = self.settings.shutdown.grace;
                    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
                        grace_elapsed = true;
                    }
                    break;
                }
                Some(lane) = async {
                    match stand_in_requests.as_mut() {
                        Some(requests) => requests.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    // the worker asking is alive, so the tracker is not done yet
                    self.spawn_worker(&tracker, lane, &finished);
                }
            }
        }
        // A drain whose last request timed out would record the sink as down for the
        // next run (`down_if_last_failed`), but one entry can hang a Frontend that
        // answers everything else: an empty batch tells (at most `ingest.timeout`,
        // cut short by a signal or `--timeout`).
        if self.drain.is_some() && !stop.is_cancelled() && self.sink.last_failure_timed_out() {
            let answered = tokio::select! {
                answered = self.answers_an_empty_batch() => answered,
                () = stop.cancelled() => false,
            };
            if answered {
                self.sink.on_answer();
            }
        }
        // What is left is bookkeeping: releasing leases, recording the sink's state.
        // A lock held on the outbox (an operator's, a long migration) would hold each
        // of those statements, and the shutdown with them, for as long as it lasts.
        let cleanup = async {
            if grace_elapsed {
                self.release_in_flight().await;
            }
            self.release_unclaimed_shares().await;
            if self.drain.is_some() {
                self.sink.down_if_last_failed();
            }
            recorded.cancel();
            let _ = recorder.await;
        };
        if tokio::time::timeout(CLEANUP_LIMIT, cleanup).await.is_err() {
            tracing::warn!(
                limit = ?CLEANUP_LIMIT,
                "the database did not answer in time to release leases: stopping anyway; \
                 rows in flight return when their lease expires"
            );
        }
        let mut summary = self.summary(stop.is_cancelled());
        if self.drain.is_some() && summary.end == DrainEnd::Stopped && self.nothing_due().await {
            // stopped (`--timeout`, a signal) with its last requests out, which were
            // answered and settled within the grace, or before it claimed anything
            // from an outbox with nothing due: it did deliver everything due, and
            // "stopped before the outbox was empty" would be untrue
            summary.end = DrainEnd::Empty;
        }
        if started_down && summary.end == DrainEnd::Empty && self.sink.is_down() {
            // Started on a sink recorded as down, and no row went out to probe it
            // (every row left waits for its retry): the rows are there, undelivered,
            // so this is not "all delivered" (exit 0), or a script looping until a
            // drain succeeds would stop here.
            let waiting = self.rows_left().await.map_or(0, |s| s.pending);
            if waiting > 0 {
                tracing::error!(
                    rows = waiting,
                    "ingest sink is down (as recorded by a relay) and no row went out to \
                     probe it: drain stops; the rows wait for the sink"
                );
                summary.end = DrainEnd::SinkDown;
            }
        }
        summary
    }

    /// Start a worker in `lane`, until `finished`. One that panics (a bug, not bad
    /// data: that is dead-lettered) stops the relay, which exits non-zero so that a
    /// service manager restarts it, instead of running on with fewer workers, or
    /// none, and saying all is well.
    fn spawn_worker(
        self: &Arc<Self>,
        tracker: &TaskTracker,
        lane: usize,
        finished: &CancellationToken,
    ) {
        let relay = Arc::clone(self);
        let finished = finished.clone();
        tracker.spawn(async move {
            let work = Arc::clone(&relay).worker(lane, finished.clone());
            if let Err(panic) = std::panic::AssertUnwindSafe(work).catch_unwind().await {
                relay.stats.worker_panics.fetch_add(1, Ordering::Relaxed);
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                tracing::error!(
                    lane,
                    "a delivery worker stopped on an internal error ({what}): stopping; \
                     its rows return when their lease expires"
                );
                finished.cancel();
            }
        });
    }

    /// Start a worker in the lane of `stand_in`'s claim, whose uploads hold its
    /// worker (`StandIns`), unless `file_concurrency` workers already stand in.
    pub(super) fn ask_stand_in(&self, stand_in: &StandIn) -> bool {
        let stand_ins = &self.stand_ins;
        let taken = stand_ins
            .active
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < stand_ins.max).then_some(n + 1)
            })
            .is_ok();
        if !taken {
            return false;
        }
        if stand_ins.requests.send(stand_in.lane).is_err() {
            stand_ins.active.fetch_sub(1, Ordering::SeqCst);
            return false;
        }
        tracing::debug!(
            lane = stand_in.lane,
            "a worker's uploads are taking a while: another worker claims meanwhile"
        );
        stand_in.granted.store(true, Ordering::Relaxed);
        // a permit is kept if nothing waits yet
        stand_in.granted_now.notify_one();
        true
    }

    /// Rows this relay leaves leased (`Stats::unsettled`).
    pub(super) fn lock_unsettled(&self) -> std::sync::MutexGuard<'_, HashSet<i64>> {
        self.stats
            .unsettled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Release `held` (rows claimed and not settled), or note them as left leased.
    pub(super) async fn release_held(&self, held: &Held) -> anyhow::Result<u64> {
        let released = self.store.release(held).await;
        if released.is_err() {
            self.lock_unsettled().extend(held.ids.iter().copied());
        }
        released
    }

    async fn release_in_flight(&self) {
        let held = self.held();
        let grace = self.settings.shutdown.grace;
        match self.release_held(&held).await {
            Ok(n) => tracing::warn!(
                rows = n,
                ?grace,
                "shutdown grace elapsed: released in-flight rows for redelivery"
            ),
            Err(e) => tracing::warn!(
                error = %crate::app::causes(&e),
                "shutdown grace elapsed and releasing leases failed: rows return when their lease expires"
            ),
        }
    }

    fn summary(&self, stopped: bool) -> Summary {
        let (left_for_retry, end) = match &self.drain {
            Some(d) => {
                let left = d.left_for_retry.lock().map(|s| s.len()).unwrap_or(0) as u64;
                let end = d.end.lock().ok().and_then(|e| *e);
                (
                    left,
                    end.unwrap_or(if stopped {
                        DrainEnd::Stopped
                    } else {
                        DrainEnd::Empty
                    }),
                )
            }
            None => (0, DrainEnd::Stopped),
        };
        Summary {
            delivered: self.stats.delivered.load(Ordering::Relaxed),
            retried: self.stats.retried.load(Ordering::Relaxed),
            retried_uncharged: self.stats.retried_uncharged.load(Ordering::Relaxed),
            dead: self.stats.dead.load(Ordering::Relaxed),
            left_for_retry,
            unsettled: self.lock_unsettled().len() as u64,
            worker_panics: self.stats.worker_panics.load(Ordering::Relaxed),
            end: if stopped && end == DrainEnd::Empty {
                DrainEnd::Stopped
            } else {
                end
            },
        }
    }

    /// End the drain (the first end reported is the one it says); whether this call
    /// ended it, so that the reason is logged once, not once per worker.
    fn finish_drain(&self, end: DrainEnd, finished: &CancellationToken) -> bool {
        let mut first = false;
        if let Some(d) = &self.drain {
            if let Ok(mut slot) = d.end.lock() {
                first = slot.is_none();
                slot.get_or_insert(end);
            }
        }
        finished.cancel();
        first
    }

    /// Look at `until` every `every`, the watchdog fed meanwhile, until it holds.
    async fn poll_until(&self, mut until: impl FnMut() -> bool, every: Duration) {
        while !until() {
            self.with_heartbeat(tokio::time::sleep(every)).await;
        }
    }

    async fn with_heartbeat<T>(&self, fut: impl std::future::Future<Output = T>) -> T {
        tokio::pin!(fut);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                out = &mut fut => return out,
                _ = tick.tick() => self.beat(),
            }
        }
    }

    fn database_down(&self, e: &anyhow::Error) {
        if let Ok(mut since) = self.db_down_since.lock() {
            since.get_or_insert_with(Instant::now);
        }
        if self.health.db_up.swap(false, Ordering::Relaxed) {
            tracing::error!(error = %crate::app::causes(e), "database unavailable: retrying with backoff");
        }
        self.metrics.db_up.set(0);
    }

    /// Whether the database failed the latest claim or settle, and nothing since.
    fn database_is_down(&self) -> bool {
        self.db_down_since
            .lock()
            .map(|since| since.is_some())
            .unwrap_or(false)
    }

    /// How long a drain waits for an unreachable database.
    fn drain_db_patience(&self) -> Duration {
        self.settings.dispatch.lease_duration.max(DRAIN_DB_PATIENCE)
    }

    /// A drain whose database has been unreachable for its patience.
    fn drain_gives_up_on_the_database(&self) -> bool {
        self.drain.is_some()
            && self
                .db_down_since
                .lock()
                .ok()
                .and_then(|since| *since)
                .is_some_and(|since| since.elapsed() >= self.drain_db_patience())
    }

    fn database_up(&self) {
        if let Ok(mut since) = self.db_down_since.lock() {
            *since = None;
        }
        if !self.health.db_up.swap(true, Ordering::Relaxed) {
            tracing::info!("database available");
        }
        self.metrics.db_up.set(1);
    }
}

/// Before an outage is recognised (`dispatch.outage_threshold` sink-level failures
/// in a row) its failures are charged like any other, since one row can cause a 5xx
/// too: `outage_threshold - 1` attempts at most. A row allowed fewer attempts than
/// the threshold can therefore be dead-lettered by an outage alone; say so at start,
/// naming the keys.
fn warn_if_an_outage_can_dead_letter(settings: &Settings) {
    let threshold = settings.dispatch.outage_threshold;
    let retry = &settings.retry;
    let mut low = Vec::new();
    if retry.max_attempts < threshold {
        low.push(format!("retry.max_attempts = {}", retry.max_attempts));
    }
    for (entity_type, o) in &retry.overrides {
        if let Some(max) = o.max_attempts.filter(|m| *m < threshold) {
            low.push(format!(
                "retry.overrides.{entity_type}.max_attempts = {max}"
            ));
        }
    }
    if !low.is_empty() {
        tracing::warn!(
            "{} below dispatch.outage_threshold = {threshold}: a sink outage can dead-letter \
             rows before it is recognised as one (keep max_attempts at least the threshold)",
            low.join(", ")
        );
    }
}

async fn wait(stop: &CancellationToken, max: Duration, wake: &mut watch::Receiver<u64>) {
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = tokio::time::sleep(max) => {}
        _ = wake.changed() => {}
    }
}

fn db_backoff_builder() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
}

fn db_backoff() -> backon::ExponentialBackoff {
    db_backoff_builder().build()
}

/// `host:pid`, shown as the lease owner.
fn owner_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into());
    format!("{host}:{}", std::process::id())
}
