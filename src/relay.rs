//! The relay: workers that claim a batch, deliver it, and settle it, in a loop.
//!
//! `step` does one claim → deliver → settle and returns what happened; the worker
//! loop owns sleeping, backoff and shutdown. No transaction or row lock is held
//! while HTTP is in flight: the claim commits a lease, the settle is fenced on it.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder, Retryable};
use futures_util::StreamExt;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Settings;
use crate::dispatch::{Dispatcher, FileJob};
use crate::metrics::{Health, Metrics};
use crate::retry::next_delay;
use crate::sink_health::{Gate, SinkHealth};
use crate::store::{
    Claim, ClaimedRow, DeadRow, ErrorRecord, Held, KeyShare, RetryRow, SchemaState, Settlement,
    Store,
};
use crate::taxonomy::{ErrorType, Failure};

/// How long an idle drain worker waits for another worker's settle before it looks
/// again (a safety net: settles wake it).
const DRAIN_SETTLE_WAIT: Duration = Duration::from_millis(250);

/// How long before the next probe rows released during an outage fall due again.
const PROBE_LEAD: Duration = Duration::from_millis(100);

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
    pub dead: AtomicU64,
    pub lease_lost: AtomicU64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainEnd {
    /// Nothing due is left.
    Empty,
    /// `--max-rows` rows were claimed.
    MaxRows,
    /// The sink is down; what is left waits for it.
    SinkDown,
    /// The sink answered 429; what is left waits for its Retry-After.
    RateLimited,
    /// Stopped by a signal or `--timeout`.
    Stopped,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub delivered: u64,
    pub retried: u64,
    pub dead: u64,
    /// Rows this run scheduled for a retry that are still waiting for it.
    pub left_for_retry: u64,
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
    owner: String,
    wake: watch::Sender<u64>,
    /// Batches claimed and not yet settled, by batch number: (claim token, ids), for
    /// renewal and release. A shared claim's batches have the same token.
    in_flight: Mutex<HashMap<u64, (i64, Vec<i64>)>>,
    next_batch: AtomicU64,
    heartbeat: AtomicU64,
    started: Instant,
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
}

/// One claim at a time, for every worker queued at the lane's gate: the worker that
/// gets through claims for the ones behind it too and leaves their batches here, so
/// the database scans the front of the queue once instead of once per worker. With
/// several lanes, each claims from its own share of the ordering keys, so that their
/// claims can run at once without skipping each other's rows.
struct Lane {
    gate: tokio::sync::Semaphore,
    /// Workers queued at the gate.
    waiting: AtomicUsize,
    /// Batches claimed for queued workers; each takes one when its turn comes.
    batches: Mutex<Vec<(u64, Claim)>>,
    /// Claims started in this lane, and the number of the last one that found fewer
    /// rows than it asked for: a worker queued before that claim started has nothing
    /// to claim (a commit or a settle since wakes it), so a wake-up does not turn
    /// into one empty claim per worker.
    claims: AtomicU64,
    last_short: AtomicU64,
    /// `None` with a single lane: every key.
    share: Option<KeyShare>,
}

impl Lane {
    fn new(share: Option<KeyShare>) -> Lane {
        Lane {
            gate: tokio::sync::Semaphore::new(1),
            waiting: AtomicUsize::new(0),
            batches: Mutex::new(Vec::new()),
            claims: AtomicU64::new(0),
            last_short: AtomicU64::new(0),
            share,
        }
    }

    fn lock_batches(&self) -> std::sync::MutexGuard<'_, Vec<(u64, Claim)>> {
        self.batches.lock().unwrap_or_else(|e| e.into_inner())
    }
}

enum Attempt {
    Sent,
    Failed { failure: Failure, charged: bool },
}

enum Route {
    Json,
    File(FileJob),
}

impl Relay {
    pub fn new(parts: RelayParts, mode: Mode) -> Arc<Relay> {
        let d = &parts.settings.dispatch;
        let sink = SinkHealth::new(
            d.outage_threshold,
            d.probe_interval,
            d.max_probe_interval,
            parts.metrics.clone(),
        );
        let lanes = parts
            .store
            .claim_lanes(d.claim_concurrency)
            .clamp(1, d.concurrency.max(1));
        let lanes = (0..lanes)
            .map(|index| Lane::new((lanes > 1).then_some(KeyShare { index, of: lanes })))
            .collect();
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
            owner: owner_name(),
            wake: watch::channel(0).0,
            in_flight: Mutex::new(HashMap::new()),
            next_batch: AtomicU64::new(0),
            heartbeat: AtomicU64::new(0),
            started: Instant::now(),
            stats: Stats::default(),
            drain,
            lanes,
            backlog: AtomicBool::new(false),
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Wake idle workers (a row was committed, or notifications may have been lost).
    pub fn wake(&self) {
        self.wake.send_modify(|v| *v = v.wrapping_add(1));
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

    /// Run `concurrency` workers until `stop` (or, draining, until nothing is due),
    /// then wait for in-flight batches up to `shutdown.grace` and release the rest.
    pub async fn run_workers(self: &Arc<Self>, stop: CancellationToken) -> Summary {
        let sink = self.sink_name();
        let started_down = self.restore_sink_state(&sink).await;
        let recorded = CancellationToken::new();
        let recorder = self.record_sink_state(sink, started_down, recorded.clone());
        let tracker = TaskTracker::new();
        let finished = stop.child_token();
        for i in 0..self.settings.dispatch.concurrency as usize {
            let relay = Arc::clone(self);
            let finished = finished.clone();
            let lane = i % self.lanes.len();
            tracker.spawn(async move { relay.worker(lane, finished).await });
        }
        tracker.close();
        // Workers stop claiming on `finished`; a batch in flight is finished and settled.
        tokio::select! {
            _ = tracker.wait() => {}
            _ = finished.cancelled() => {
                let grace = self.settings.shutdown.grace;
                if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
                    self.release_in_flight(grace).await;
                }
            }
        }
        self.release_unclaimed_shares().await;
        if self.drain.is_some() {
            self.sink.down_if_last_failed();
        }
        recorded.cancel();
        let _ = recorder.await;
        self.summary(stop.is_cancelled())
    }

    /// The sink's state as it is recorded for everyone (`ingest.base_url` without
    /// its query, which may hold a token).
    fn sink_name(&self) -> String {
        match reqwest::Url::parse(&self.settings.ingest.base_url) {
            Ok(mut url) => {
                url.set_query(None);
                url.set_fragment(None);
                url.to_string()
            }
            Err(_) => self.settings.ingest.base_url.clone(),
        }
    }

    /// Start as down if a relay (another instance, or an earlier run) took the sink
    /// as down and none has seen it answer since: probe first, charge nothing.
    /// Returns whether it did.
    async fn restore_sink_state(&self, sink: &str) -> bool {
        match self.store.sink_down_since(sink).await {
            Ok(Some(since)) => {
                self.sink.start_down();
                tracing::warn!(
                    since = %since,
                    "ingest sink was taken as down by a relay and has not been seen answering \
                     since: probing it before delivering; rows are not charged attempts meanwhile"
                );
                true
            }
            Ok(None) => false,
            Err(e) => {
                tracing::debug!(error = %format!("{e:#}"), "cannot read the recorded sink state");
                false
            }
        }
    }

    /// Record every transition of the sink's state in the database, for relays that
    /// start later (cron drains, restarts, other instances); the last one is written
    /// before `done` lets this task end.
    fn record_sink_state(
        self: &Arc<Self>,
        sink: String,
        started_down: bool,
        done: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let relay = Arc::clone(self);
        let mut up = self.sink.subscribe();
        tokio::spawn(async move {
            // what the table says, as far as this relay knows
            let mut recorded_up = !started_down;
            loop {
                let last = tokio::select! {
                    changed = up.changed() => changed.is_err(),
                    _ = done.cancelled() => true,
                };
                let now_up = *up.borrow_and_update();
                if recorded_up != now_up {
                    match relay.store.set_sink_down(&sink, !now_up).await {
                        Ok(()) => recorded_up = now_up,
                        Err(e) => tracing::debug!(
                            error = %format!("{e:#}"),
                            "cannot record the sink state"
                        ),
                    }
                }
                if last {
                    break;
                }
            }
        })
    }

    /// Batches claimed for workers that never came for them (none should be left:
    /// every worker counted at the gate takes one). Released, not left to expire.
    async fn release_unclaimed_shares(&self) {
        let left: Vec<(u64, Claim)> = self
            .lanes
            .iter()
            .flat_map(|lane| std::mem::take(&mut *lane.lock_batches()))
            .collect();
        if left.is_empty() {
            return;
        }
        let held = {
            let mut in_flight = self.lock_in_flight();
            let removed: Vec<(i64, Vec<i64>)> = left
                .iter()
                .filter_map(|(batch, _)| in_flight.remove(batch))
                .collect();
            held_of(removed.iter())
        };
        match self.store.release(&held).await {
            Ok(n) => tracing::debug!(
                rows = n,
                "released batches claimed for workers that stopped"
            ),
            Err(e) => tracing::warn!(
                error = %format!("{e:#}"),
                "releasing undelivered batches failed: rows return when their lease expires"
            ),
        }
    }

    async fn release_in_flight(&self, grace: Duration) {
        let held = self.held();
        match self.store.release(&held).await {
            Ok(n) => tracing::warn!(
                rows = n,
                ?grace,
                "shutdown grace elapsed: released in-flight rows for redelivery"
            ),
            Err(e) => tracing::warn!(
                error = %format!("{e:#}"),
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
            dead: self.stats.dead.load(Ordering::Relaxed),
            left_for_retry,
            end: if stopped && end == DrainEnd::Empty {
                DrainEnd::Stopped
            } else {
                end
            },
        }
    }

    fn finish_drain(&self, end: DrainEnd, finished: &CancellationToken) {
        if let Some(d) = &self.drain {
            if let Ok(mut slot) = d.end.lock() {
                slot.get_or_insert(end);
            }
        }
        finished.cancel();
    }

    async fn worker(self: Arc<Self>, lane: usize, finished: CancellationToken) {
        let mut wake = self.wake.subscribe();
        let mut backoff = db_backoff();
        let poll = self.settings.dispatch.poll_interval;
        while !finished.is_cancelled() {
            self.beat();
            wake.borrow_and_update();
            let settles_before = self
                .drain
                .as_ref()
                .map_or(0, |d| d.settles.load(Ordering::SeqCst));
            match self.step(lane, &finished).await {
                Step::Delivered(_) => backoff = db_backoff(),
                Step::Idle => {
                    if let Some(d) = &self.drain {
                        let settled_meanwhile = d.settles.load(Ordering::SeqCst) != settles_before;
                        if settled_meanwhile {
                            // a settle may have unblocked rows of its keys: look again
                            continue;
                        }
                        if d.busy.load(Ordering::SeqCst) == 0 {
                            let end = if d
                                .max_rows
                                .is_some_and(|m| d.claimed.load(Ordering::SeqCst) >= m)
                            {
                                DrainEnd::MaxRows
                            } else {
                                DrainEnd::Empty
                            };
                            self.finish_drain(end, &finished);
                            break;
                        }
                        // Another worker is claiming or delivering: wait for its settle
                        // (which may unblock rows of its keys, and wakes this worker), or
                        // for the last worker to find nothing and end the drain. Not a
                        // short poll: at the end of a drain every worker would claim
                        // again and again, each keeping the others from seeing the
                        // relay idle.
                        wait(&finished, DRAIN_SETTLE_WAIT, &mut wake).await;
                        continue;
                    }
                    wait(&finished, poll, &mut wake).await;
                }
                Step::Paused(until) => {
                    if self.drain.is_some() && self.sink.is_probing() {
                        // a probe is out: its answer decides whether this drain goes on
                        wait(&finished, Duration::from_millis(10), &mut wake).await;
                        continue;
                    }
                    if self.drain.is_some() {
                        // drain delivers what is due now; it does not sit out an outage
                        // or a rate limit: what is left waits for the next run
                        let end = if self.sink.is_down() {
                            tracing::error!("ingest sink is down: drain stops");
                            DrainEnd::SinkDown
                        } else {
                            tracing::warn!("ingest sink asked to slow down (429): drain stops");
                            DrainEnd::RateLimited
                        };
                        self.finish_drain(end, &finished);
                        break;
                    }
                    let nap = until.saturating_duration_since(Instant::now()).min(poll);
                    tokio::select! {
                        _ = finished.cancelled() => {}
                        _ = tokio::time::sleep(nap) => {}
                    }
                }
                Step::DatabaseUnavailable => {
                    let nap = backoff.next().unwrap_or(Duration::from_secs(5));
                    tokio::select! {
                        _ = finished.cancelled() => {}
                        _ = tokio::time::sleep(nap) => {}
                    }
                }
            }
        }
    }

    /// One claim (in `lane`) → deliver → settle. Once `finished`, no new claim is made.
    async fn step(&self, lane: usize, finished: &CancellationToken) -> Step {
        let probing = match self.sink.gate() {
            Gate::Open => false,
            Gate::Probe => true,
            Gate::WaitUntil(until) => return Step::Paused(until),
        };
        let d = &self.settings.dispatch;
        let mut reserved = 0u64;
        let mut limit = if probing {
            d.batch_size.min(10)
        } else {
            d.batch_size
        };
        if let Some(drain) = &self.drain {
            if let Some(max) = drain.max_rows {
                // reserve this claim's share of --max-rows up front, so concurrent
                // workers cannot together claim more than asked
                let want = u64::from(limit);
                let before = drain
                    .claimed
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |c| {
                        Some(c + want.min(max.saturating_sub(c)))
                    })
                    .unwrap_or(max);
                reserved = want.min(max.saturating_sub(before));
                limit = u32::try_from(reserved).unwrap_or(u32::MAX);
            }
            drain.busy.fetch_add(1, Ordering::SeqCst);
        }
        let step = if limit == 0 {
            Step::Idle
        } else {
            self.claim_and_deliver(lane, limit, probing, finished).await
        };
        if let Some(drain) = &self.drain {
            if drain.max_rows.is_some() {
                let used = match step {
                    Step::Delivered(n) => n as u64,
                    _ => 0,
                };
                drain
                    .claimed
                    .fetch_sub(reserved.saturating_sub(used), Ordering::SeqCst);
            }
            drain.busy.fetch_sub(1, Ordering::SeqCst);
        }
        if probing && !matches!(step, Step::Delivered(_)) {
            if matches!(step, Step::Idle) && self.drain.is_none() {
                self.probe_empty_handed().await;
            } else {
                self.sink.probe_abandoned();
            }
        }
        step
    }

    /// The sink is down, a probe is due and the outbox is empty: ask with an empty
    /// batch. Without it an idle daemon would report the sink down (and keep it
    /// recorded as down for other relays) until the next row arrives, however long
    /// ago the sink came back. Only when no row waits at all: a Frontend whose storage
    /// is down may still answer an empty batch, and rows waiting for their retry would
    /// then be charged for the outage; they probe it themselves when due. `drain`
    /// does not: it has nothing to deliver either way.
    async fn probe_empty_handed(&self) {
        if !matches!(self.store.has_pending().await, Ok(false)) {
            self.sink.probe_abandoned();
            return;
        }
        tracing::debug!("probing the ingest sink with an empty batch: the outbox is empty");
        match self.dispatcher.send_json(&[]).await {
            Ok(()) => self.sink.on_answer(),
            Err(f) => {
                // as for any request: a 4xx is an answer, a sink-level failure counts;
                // whatever it was, this probe is over
                self.account(&f);
                self.sink.probe_abandoned();
            }
        }
    }

    async fn claim_and_deliver(
        &self,
        lane: usize,
        limit: u32,
        probing: bool,
        finished: &CancellationToken,
    ) -> Step {
        // a probe is one small batch, and a drain with --max-rows claims its quota
        let share = !probing && self.drain.as_ref().is_none_or(|d| d.max_rows.is_none());
        let (batch, claim) = match self.take_batch(lane, limit, share, finished).await {
            Ok(Some(taken)) => taken,
            Ok(None) => return Step::Idle,
            Err(e) => {
                self.database_down(&e);
                return Step::DatabaseUnavailable;
            }
        };
        self.database_up();
        let n = claim.rows.len();
        if let Some(drain) = self.drain.as_ref().filter(|d| d.max_rows.is_none()) {
            drain.claimed.fetch_add(n as u64, Ordering::SeqCst);
        }
        self.metrics.batch_size.observe(n as f64);
        let attempts = self.with_heartbeat(self.deliver(&claim, probing)).await;
        let settlement = self.settlement(&claim, attempts);
        self.settle(&claim, settlement).await;
        if let Some(drain) = &self.drain {
            drain.settles.fetch_add(1, Ordering::SeqCst);
        }
        self.lock_in_flight().remove(&batch);
        // rows of the same ordering keys may be due now
        self.wake();
        Step::Delivered(n)
    }

    /// A batch of up to `limit` rows, registered in flight: one left by a worker that
    /// claimed for this one, or a claim of its own. When `share`, a claim also takes a
    /// batch for every worker queued behind it at the gate (one statement instead of
    /// several that would scan and skip each other's rows). The split is safe for
    /// ordering: a claim holds at most one row per ordering key. While a backlog is
    /// being drained each worker claims in its own `lane`, from the lane's share of
    /// the keys, and a lane whose share has nothing due claims from all of them (a
    /// backlog of one share is not left to some of the workers, and a drain ends only
    /// when nothing at all is due); otherwise every worker claims in the first lane,
    /// from every key. Once `finished`, a worker that was queued at the gate takes a
    /// batch already claimed for it, but claims nothing new.
    async fn take_batch(
        &self,
        lane: usize,
        limit: u32,
        share: bool,
        finished: &CancellationToken,
    ) -> anyhow::Result<Option<(u64, Claim)>> {
        let split = self.lanes.len() > 1 && self.backlog.load(Ordering::SeqCst);
        let lane = if split {
            &self.lanes[lane]
        } else {
            &self.lanes[0]
        };
        let queued_at = lane.claims.load(Ordering::SeqCst);
        lane.waiting.fetch_add(1, Ordering::SeqCst);
        // the semaphore is never closed; were it, claiming unbounded is harmless
        let _permit = lane.gate.acquire().await.ok();
        let queued = lane.waiting.fetch_sub(1, Ordering::SeqCst) - 1;
        if let Some(left) = lane.lock_batches().pop() {
            return Ok(Some(left));
        }
        if finished.is_cancelled() || lane.last_short.load(Ordering::SeqCst) > queued_at {
            return Ok(None);
        }
        let number = lane.claims.fetch_add(1, Ordering::SeqCst) + 1;
        let others = if share {
            queued.min(self.settings.dispatch.concurrency as usize)
        } else {
            0
        };
        let want = u32::try_from(others + 1).unwrap_or(1).saturating_mul(limit);
        let lease = self.settings.dispatch.lease_duration;
        let keys = lane.share.filter(|_| self.backlog.load(Ordering::SeqCst));
        let mut claim = self.store.claim(want, lease, &self.owner, keys).await?;
        if claim.rows.is_empty() && keys.is_some() {
            claim = self.store.claim(want, lease, &self.owner, None).await?;
        }
        let full = claim.rows.len() >= want as usize;
        if !full {
            lane.last_short.fetch_max(number, Ordering::SeqCst);
        }
        self.backlog.store(full, Ordering::SeqCst);
        if claim.rows.is_empty() {
            return Ok(None);
        }
        let token = claim.token;
        let mut batches: Vec<(u64, Claim)> = Vec::new();
        let mut rows = claim.rows;
        while !rows.is_empty() {
            let rest = rows.split_off(rows.len().min(limit as usize));
            let batch = self.next_batch.fetch_add(1, Ordering::Relaxed);
            batches.push((batch, Claim { token, rows }));
            rows = rest;
        }
        {
            let mut in_flight = self.lock_in_flight();
            for (batch, claim) in &batches {
                in_flight.insert(*batch, (token, claim.rows.iter().map(|r| r.id).collect()));
            }
        }
        // this worker takes the first (oldest) batch; the others wait for their workers
        let mine = batches.remove(0);
        if !batches.is_empty() {
            // popped from the end: oldest first
            lane.lock_batches().extend(batches.into_iter().rev());
        }
        Ok(Some(mine))
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

    fn lock_in_flight(&self) -> std::sync::MutexGuard<'_, HashMap<u64, (i64, Vec<i64>)>> {
        self.in_flight.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Everything in flight, for renewal or release.
    fn held(&self) -> Held {
        held_of(self.lock_in_flight().values())
    }

    fn database_down(&self, e: &anyhow::Error) {
        if self.health.db_up.swap(false, Ordering::Relaxed) {
            tracing::error!(error = %format!("{e:#}"), "database unavailable: retrying with backoff");
        }
        self.metrics.db_up.set(0);
    }

    fn database_up(&self) {
        if !self.health.db_up.swap(true, Ordering::Relaxed) {
            tracing::info!("database available");
        }
        self.metrics.db_up.set(1);
    }

    /// Deliver every row of a claim: JSON rows in one request (split on rejection),
    /// file rows as concurrent uploads. Returns one attempt per row id.
    async fn deliver(&self, claim: &Claim, probing: bool) -> HashMap<i64, Attempt> {
        let mut attempts = HashMap::with_capacity(claim.rows.len());
        let mut json = Vec::new();
        let mut files = Vec::new();
        for row in &claim.rows {
            match self.route(row) {
                Ok(Route::Json) => json.push(row),
                Ok(Route::File(job)) => files.push((row, job)),
                Err(failure) => {
                    attempts.insert(
                        row.id,
                        Attempt::Failed {
                            failure,
                            charged: true,
                        },
                    );
                }
            }
        }
        if probing {
            tracing::info!(
                rows = claim.rows.len(),
                "probing the ingest sink with a batch"
            );
        }
        self.deliver_json(&json, &mut attempts).await;
        let mut futures = Vec::with_capacity(files.len());
        for (row, job) in &files {
            futures.push(upload(&self.dispatcher, row, job));
        }
        let uploads = futures_util::stream::iter(futures)
            .buffer_unordered(self.settings.dispatch.file_concurrency as usize)
            .collect::<Vec<_>>()
            .await;
        for (id, result) in uploads {
            let attempt = match result {
                Ok(()) => {
                    self.sink.on_answer();
                    Attempt::Sent
                }
                Err(failure) => {
                    let charged = self.account(&failure);
                    Attempt::Failed { failure, charged }
                }
            };
            attempts.insert(id, attempt);
        }
        attempts
    }

    /// Send JSON rows. A batch rejected with a non-retryable 4xx is split in halves
    /// until the offending entries are alone. So is a batch answered with a 5xx: a
    /// Frontend that fails on one bad entity answers 500 to every batch holding it,
    /// and without the split that one row would hold its batch back for ever (and
    /// make the sink look down). Whether a lone 5xx row is the row's fault or the
    /// sink's is decided at the end: if any part of the batch went through, the sink
    /// works and the row is charged; if nothing did, it is one sink-level failure of
    /// the whole delivery, counted towards the outage threshold like any other.
    async fn deliver_json(&self, rows: &[&ClaimedRow], attempts: &mut HashMap<i64, Attempt>) {
        if rows.is_empty() {
            return;
        }
        let mut pending: Vec<&[&ClaimedRow]> = vec![rows];
        // while nothing has answered, a descent of log2(n) halvings finds a lone bad
        // row, and one more failure says it is more likely the sink; with answers,
        // room for a few bad rows
        let depth = usize::BITS - (rows.len().saturating_sub(1)).leading_zeros();
        let blind_budget = depth as usize + 1;
        let budget = 2 * blind_budget;
        let mut failures = 0usize;
        let mut answered = false;
        // rows whose requests failed with a 5xx, awaiting the verdict
        let mut suspects: Vec<(&ClaimedRow, Failure)> = Vec::new();
        while let Some(chunk) = pending.pop() {
            match self.dispatcher.send_json(chunk).await {
                Ok(()) => {
                    answered = true;
                    self.sink.on_answer();
                    for row in chunk {
                        attempts.insert(row.id, Attempt::Sent);
                    }
                }
                Err(f) if f.error_type == ErrorType::Http4xx && !f.retryable && chunk.len() > 1 => {
                    answered = true;
                    self.sink.on_answer();
                    let (left, right) = chunk.split_at(chunk.len() / 2);
                    tracing::info!(
                        rows = chunk.len(),
                        http_status = f.http_status,
                        "batch rejected: splitting it to isolate the offending entries"
                    );
                    pending.push(right);
                    pending.push(left);
                }
                Err(f) if f.error_type == ErrorType::Http5xx => {
                    failures += 1;
                    let room = if answered { budget } else { blind_budget };
                    if failures >= room {
                        // give up isolating: this chunk and what is left fail together
                        suspects.extend(chunk.iter().map(|row| (*row, f.clone())));
                        for rest in pending.drain(..) {
                            suspects.extend(rest.iter().map(|row| (*row, f.clone())));
                        }
                    } else if chunk.len() > 1 {
                        tracing::info!(
                            rows = chunk.len(),
                            http_status = f.http_status,
                            "batch failed with a server error: splitting it in case one entry causes it"
                        );
                        let (left, right) = chunk.split_at(chunk.len() / 2);
                        pending.push(right);
                        pending.push(left);
                    } else {
                        suspects.push((chunk[0], f));
                    }
                }
                Err(failure) => {
                    let charged = self.account(&failure);
                    for row in chunk {
                        attempts.insert(
                            row.id,
                            Attempt::Failed {
                                failure: failure.clone(),
                                charged,
                            },
                        );
                    }
                }
            }
        }
        if suspects.is_empty() {
            return;
        }
        // The verdict. Something went through: the sink works, these rows fail it.
        // Nothing did: one sink-level failure (charged only below the threshold).
        let charged = if answered {
            true
        } else {
            self.account(&suspects[0].1)
        };
        for (row, failure) in suspects {
            attempts.insert(row.id, Attempt::Failed { failure, charged });
        }
    }

    /// Tell the sink-health tracker about a failure; returns whether it is charged.
    fn account(&self, failure: &Failure) -> bool {
        match failure.error_type {
            t if t.is_sink_level() => self.sink.on_sink_failure(t.as_str(), failure.retry_after),
            ErrorType::Http4xx => {
                self.sink.on_answer();
                true
            }
            // the request never left: says nothing about the sink
            _ => true,
        }
    }

    fn route(&self, row: &ClaimedRow) -> Result<Route, Failure> {
        if let Some(defect) = &row.defect {
            return Err(Failure::payload_invalid(defect.clone()));
        }
        let d = &self.settings.dispatch;
        let t = row.entity_type.as_str();
        // any name a JSON entity type may have (SPEC §1.2), but not an empty one, a
        // novel, or one with control characters (it goes into logs and metric labels)
        let well_formed =
            !t.trim().is_empty() && t.len() <= 100 && !t.chars().any(char::is_control);
        if !well_formed {
            return Err(Failure::unknown_entity_type(format!(
                "entity type {t:?} is not routable"
            )));
        }
        if d.file_entity_types.iter().any(|f| f == t) {
            return FileJob::from_row(row).map(Route::File);
        }
        if !d.json_entity_types.is_empty() && !d.json_entity_types.iter().any(|j| j == t) {
            return Err(Failure::unknown_entity_type(format!(
                "entity type {t:?} is not in dispatch.json_entity_types or dispatch.file_entity_types"
            )));
        }
        if !row.payload.get().trim_start().starts_with('{') {
            return Err(Failure::payload_invalid("payload is not a JSON object"));
        }
        Ok(Route::Json)
    }

    /// Decide each row's outcome: sent, retry later (charged or not), or dead.
    fn settlement(&self, claim: &Claim, mut attempts: HashMap<i64, Attempt>) -> Settlement {
        let mut s = Settlement {
            token: claim.token,
            ..Default::default()
        };
        let now = chrono::Utc::now();
        for row in &claim.rows {
            let Some(attempt) = attempts.remove(&row.id) else {
                continue;
            };
            let (failure, charged) = match attempt {
                Attempt::Sent => {
                    s.sent.push(row.id);
                    continue;
                }
                Attempt::Failed { failure, charged } => (failure, charged),
            };
            let params = self.settings.retry.for_entity(&row.entity_type);
            let number = row.attempts.saturating_add(1);
            let error = ErrorRecord {
                error_type: failure.error_type.as_str().to_string(),
                http_status: failure.http_status.map(i32::from),
                message: failure.message.clone(),
                response_body: failure.response_body.clone(),
                history_entry: serde_json::json!({
                    "attempt": number,
                    "at": now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                    "errorType": failure.error_type.as_str(),
                    "httpStatus": failure.http_status,
                    "message": failure.message,
                }),
            };
            let out_of_attempts =
                charged && number >= i32::try_from(params.max_attempts).unwrap_or(i32::MAX);
            if !failure.retryable || out_of_attempts {
                tracing::warn!(
                    outbox_id = row.id,
                    entity_type = %row.entity_type,
                    attempt = number,
                    error_type = %failure.error_type,
                    http_status = failure.http_status,
                    "dead-lettered: {}",
                    failure.log_message()
                );
                s.dead.push(DeadRow {
                    id: row.id,
                    error,
                    max_attempts: i32::try_from(params.max_attempts).unwrap_or(i32::MAX),
                });
                continue;
            }
            let delay = if charged {
                next_delay(&params, number as u32, failure.retry_after)
            } else {
                // due a little before the next probe, so that the probe finds them
                // (the database's clock and this process's need not agree to the
                // millisecond) rather than an empty outbox
                self.sink
                    .until_next_probe()
                    .saturating_sub(PROBE_LEAD)
                    .max(failure.retry_after.unwrap_or_default())
            };
            if charged {
                tracing::warn!(
                    outbox_id = row.id,
                    entity_type = %row.entity_type,
                    attempt = number,
                    error_type = %failure.error_type,
                    http_status = failure.http_status,
                    retry_in = ?delay,
                    "delivery failed: {}",
                    failure.log_message()
                );
            } else {
                tracing::debug!(
                    outbox_id = row.id,
                    entity_type = %row.entity_type,
                    error_type = %failure.error_type,
                    "delivery failed while the sink is down (not charged)"
                );
            }
            s.retries.push(RetryRow {
                id: row.id,
                delay,
                error,
                charged,
            });
        }
        s
    }

    /// Write the outcome; database errors are retried with backoff (they never cost
    /// a row an attempt), and a lost lease is reported, not overwritten.
    async fn settle(&self, claim: &Claim, s: Settlement) {
        let keep_sent = !self.settings.retention.delete_sent;
        let write = || async { self.store.settle(&s, keep_sent).await };
        let report = write
            .retry(db_backoff_builder())
            .when(crate::store::is_transient)
            .notify(|e: &anyhow::Error, wait: Duration| {
                self.beat();
                self.database_down(e);
                tracing::warn!(?wait, "settling a batch failed; retrying");
            })
            .await;
        let report = match report {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "settling a batch failed; its rows return when the lease expires");
                return;
            }
        };
        self.database_up();
        if report.lost > 0 {
            self.metrics.lease_lost.inc_by(report.lost);
            self.stats
                .lease_lost
                .fetch_add(report.lost, Ordering::Relaxed);
            tracing::warn!(
                rows = report.lost,
                claim_token = claim.token,
                "lease lost: another relay took these rows over; left its outcome alone"
            );
        }
        self.record(claim, &s);
    }

    fn record(&self, claim: &Claim, s: &Settlement) {
        // claimed rows are in id order; metrics are added up per batch, not per row
        let row_of = |id: i64| {
            claim
                .rows
                .binary_search_by_key(&id, |r| r.id)
                .ok()
                .map(|i| &claim.rows[i])
        };
        let now = chrono::Utc::now();
        let mut deliveries: Vec<([&str; 2], u64)> = Vec::new();
        for row in s.sent.iter().filter_map(|id| row_of(*id)) {
            tally(&mut deliveries, [row.entity_type.as_str(), "sent"]);
            let lag = (now - row.created_at)
                .num_microseconds()
                .unwrap_or(0)
                .max(0) as f64
                / 1e6;
            self.metrics.delivery_lag.observe(lag);
        }
        let mut errors: Vec<([&str; 1], u64)> = Vec::new();
        let failures = s.retries.iter().map(|r| (r.id, &r.error, "retry"));
        let dead = s.dead.iter().map(|d| (d.id, &d.error, "dead"));
        for (id, error, outcome) in failures.chain(dead) {
            if let Some(row) = row_of(id) {
                tally(&mut deliveries, [row.entity_type.as_str(), outcome]);
            }
            tally(&mut errors, [error.error_type.as_str()]);
        }
        for (labels, n) in &deliveries {
            self.metrics.deliveries.with_label_values(labels).inc_by(*n);
        }
        for (labels, n) in &errors {
            self.metrics
                .delivery_errors
                .with_label_values(labels)
                .inc_by(*n);
        }
        self.stats
            .delivered
            .fetch_add(s.sent.len() as u64, Ordering::Relaxed);
        self.stats
            .retried
            .fetch_add(s.retries.len() as u64, Ordering::Relaxed);
        self.stats
            .dead
            .fetch_add(s.dead.len() as u64, Ordering::Relaxed);
        if let Some(drain) = &self.drain {
            if let Ok(mut left) = drain.left_for_retry.lock() {
                if !left.is_empty() {
                    for id in s.sent.iter().chain(s.dead.iter().map(|d| &d.id)) {
                        left.remove(id);
                    }
                }
                left.extend(s.retries.iter().map(|r| r.id));
            }
        }
    }

    /// Extend the leases of batches in flight every third of the lease, so a slow
    /// sink never makes a live relay lose its rows.
    pub async fn renew_leases(self: Arc<Self>, stop: CancellationToken) {
        let lease = self.settings.dispatch.lease_duration;
        let every = lease / 3;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            let held = self.held();
            if held.ids.is_empty() {
                continue;
            }
            if let Err(e) = self.store.renew(&held, lease).await {
                tracing::warn!(error = %format!("{e:#}"), "renewing leases failed; will retry");
            }
        }
    }

    /// Wake workers on insert notifications; reconnect with backoff when the
    /// listening connection drops. Polling covers whatever is missed.
    pub async fn listen(self: Arc<Self>, stop: CancellationToken) {
        if !self.settings.dispatch.listen {
            return;
        }
        let mut backoff = db_backoff();
        loop {
            let mut notifications = tokio::select! {
                _ = stop.cancelled() => return,
                n = self.store.notifications() => match n {
                    Ok(Some(n)) => n,
                    Ok(None) => return, // this backend has no notifications
                    Err(e) => {
                        tracing::debug!(error = %format!("{e:#}"), "LISTEN failed; polling meanwhile");
                        let nap = backoff.next().unwrap_or(Duration::from_secs(5));
                        tokio::select! { _ = stop.cancelled() => return, _ = tokio::time::sleep(nap) => {} }
                        continue;
                    }
                },
            };
            backoff = db_backoff();
            self.wake();
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    n = notifications.next() => match n {
                        Ok(_) => self.wake(),
                        Err(e) => {
                            tracing::debug!(error = %format!("{e:#}"), "LISTEN connection lost");
                            self.wake();
                            break;
                        }
                    },
                }
            }
        }
    }

    /// Refresh the backlog gauges and the database health on an interval.
    pub async fn refresh_gauges(self: Arc<Self>, stop: CancellationToken) {
        let every = self.settings.metrics.refresh_interval;
        loop {
            match self
                .store
                .backlog(self.settings.metrics.backlog_exact_rows)
                .await
            {
                Ok(backlog) => {
                    self.metrics.set_backlog(&backlog);
                    self.database_up();
                    self.check_schema().await;
                }
                Err(e) => self.database_down(&e),
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
    }

    /// `/readyz` follows the schema too: a migration rolled back, or a database
    /// restored from an older dump, while the daemon runs.
    async fn check_schema(&self) {
        let Ok(state) = self.store.schema_state().await else {
            return;
        };
        let current = matches!(state, SchemaState::Current);
        if self.health.schema_current.swap(current, Ordering::Relaxed) != current {
            if current {
                tracing::info!("the database schema is current again: ready");
            } else {
                tracing::error!(
                    "the database schema is no longer what this binary expects: not ready \
                     (run `serversync migrate`, or upgrade serversync)"
                );
            }
        }
    }

    /// Delete delivered records past `retention.sent_ttl`, a small batch at a time.
    pub async fn prune(self: Arc<Self>, stop: CancellationToken) {
        let r = &self.settings.retention;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(r.prune_interval) => {}
            }
            for _ in 0..1000 {
                match self.store.prune_sent(r.sent_ttl, r.prune_batch).await {
                    Ok(n) if n >= u64::from(r.prune_batch) => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!(error = %format!("{e:#}"), "pruning delivered records failed");
                        break;
                    }
                }
                if stop.is_cancelled() {
                    return;
                }
            }
        }
    }
}

/// Add one to the count of `labels`, kept in a short list (a batch has a handful of
/// distinct label sets).
fn tally<'a, const N: usize>(counts: &mut Vec<([&'a str; N], u64)>, labels: [&'a str; N]) {
    match counts.iter_mut().find(|(l, _)| *l == labels) {
        Some((_, n)) => *n += 1,
        None => counts.push((labels, 1)),
    }
}

async fn upload(
    dispatcher: &Dispatcher,
    row: &ClaimedRow,
    job: &FileJob,
) -> (i64, Result<(), Failure>) {
    (row.id, dispatcher.send_file(row, job).await)
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

/// The rows and tokens of some in-flight batches, as renewal and release take them
/// (a shared claim's batches have the same token: it is listed once).
fn held_of<'a>(batches: impl Iterator<Item = &'a (i64, Vec<i64>)>) -> Held {
    let mut held = Held::default();
    for (token, ids) in batches {
        held.tokens.push(*token);
        held.ids.extend_from_slice(ids);
    }
    held.tokens.sort_unstable();
    held.tokens.dedup();
    held
}

/// `host:pid`, shown as the lease owner.
fn owner_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into());
    format!("{host}:{}", std::process::id())
}
