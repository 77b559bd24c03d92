//! Whether the sink is up, as a whole. After `outage_threshold` consecutive
//! sink-level failures (connect, timeout, 5xx, 429) the relay stops claiming, lets one
//! worker probe with a real batch on a doubling interval, and stops charging rows for
//! failures that are the sink's fault. A 429 with `Retry-After` pauses the relay until
//! then even before the threshold.

use std::sync::Mutex;
use std::time::Duration;

use prometheus::IntGauge;
use tokio::time::Instant;

use crate::metrics::Metrics;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Claim and deliver as usual.
    Open,
    /// The sink is down and a probe is due: this caller probes.
    Probe,
    /// Do not claim before this instant.
    WaitUntil(Instant),
}

/// The different rows whose failures make up a streak (a few: the first
/// `FailingRows::MOST`), for the sink (`SinkHealth`) and its upload endpoint
/// (`UploadHealth`) alike.
#[derive(Debug, Default, Clone)]
struct FailingRows(Vec<i64>);

impl FailingRows {
    const MOST: usize = 8;

    fn note(&mut self, row: i64) {
        if !self.0.contains(&row) && self.0.len() < Self::MOST {
            self.0.push(row);
        }
    }

    /// `rows` are dead-lettered: they fail nothing any more (two rows failing, and
    /// a third dead, are not three).
    fn forget(&mut self, rows: &[i64]) {
        self.0.retain(|r| !rows.contains(r));
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn clear(&mut self) {
        self.0.clear();
    }
}

/// How long a row that failed by the sink's doing, not its own, is put off: past the
/// next probe at the longest interval (`probe_max`), which so takes another row.
fn rotation_delay(probe_max: Duration) -> Duration {
    probe_max * 2
}

#[derive(Debug)]
struct State {
    consecutive_failures: u32,
    /// The rows whose 5xx or timeout failures make up the streak (`Relay::row_or_sink`).
    failing_rows: FailingRows,
    /// The latest failure was the sink not answering at all (connect, timeout),
    /// which no row can cause, unlike a 5xx; but for a timeout: an entry can hang a
    /// Frontend that answers everything else (`last_timed_out`).
    last_unreachable: bool,
    last_timed_out: bool,
    down: bool,
    probing: bool,
    probe_delay: Duration,
    /// While down: next probe. While up: end of a Retry-After pause.
    not_before: Instant,
    /// When the sink last answered (`on_answer`), or when this relay started.
    last_answer: Instant,
}

pub struct SinkHealth {
    state: Mutex<State>,
    /// `true` while up; changes on every transition (for whoever records them).
    up: tokio::sync::watch::Sender<bool>,
    threshold: u32,
    probe_base: Duration,
    probe_max: Duration,
    metrics: Metrics,
}

impl SinkHealth {
    pub fn new(
        threshold: u32,
        probe_base: Duration,
        probe_max: Duration,
        metrics: Metrics,
    ) -> SinkHealth {
        metrics.sink_up.set(1);
        SinkHealth {
            state: Mutex::new(State {
                consecutive_failures: 0,
                failing_rows: FailingRows::default(),
                last_unreachable: false,
                last_timed_out: false,
                down: false,
                probing: false,
                probe_delay: probe_base,
                not_before: Instant::now(),
                last_answer: Instant::now(),
            }),
            up: tokio::sync::watch::channel(true).0,
            threshold: threshold.max(1),
            probe_base,
            probe_max: probe_max.max(probe_base),
            metrics,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // a panic while holding this lock cannot leave the state inconsistent
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_down(&self) -> bool {
        self.lock().down
    }

    /// Whether one more sink-level failure would take the sink as down, or it is
    /// down already: the moment to make sure a failure is the sink's, not a row's.
    pub fn at_threshold(&self) -> bool {
        let s = self.lock();
        s.down || s.consecutive_failures.saturating_add(1) >= self.threshold
    }

    /// Down, with a probe out whose answer will say whether it still is.
    pub fn is_probing(&self) -> bool {
        let s = self.lock();
        s.down && s.probing
    }

    /// Transitions between up (`true`) and down.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<bool> {
        self.up.subscribe()
    }

    /// Start as down (another relay, or an earlier run, took the sink as down and
    /// nobody has seen it answer since): probe at once, charge nothing meanwhile.
    pub fn start_down(&self) {
        self.go_down_probing_from(Instant::now());
    }

    /// Down, charging nothing, the first probe at `first_probe`.
    fn go_down_probing_from(&self, first_probe: Instant) {
        let mut s = self.lock();
        s.down = true;
        s.probing = false;
        s.consecutive_failures = self.threshold;
        s.probe_delay = self.probe_base;
        s.not_before = first_probe;
        self.metrics.sink_up.set(0);
        self.up.send_replace(false);
    }

    /// How long ago the sink last answered this relay (or the relay started).
    pub fn since_last_answer(&self) -> Duration {
        self.lock().last_answer.elapsed()
    }

    /// Take the sink as down, as another relay found it after this one last saw it
    /// answer: charge nothing, probe, but not before a `Retry-After` pause ends.
    pub fn adopt_down(&self) {
        let pause_until = self.lock().not_before;
        self.go_down_probing_from(pause_until.max(Instant::now()));
    }

    pub fn gate(&self) -> Gate {
        let now = Instant::now();
        let mut s = self.lock();
        if !s.down {
            return if now < s.not_before {
                Gate::WaitUntil(s.not_before)
            } else {
                Gate::Open
            };
        }
        if s.probing || now < s.not_before {
            let until = if s.not_before > now {
                s.not_before
            } else {
                now + Duration::from_millis(50)
            };
            return Gate::WaitUntil(until);
        }
        s.probing = true;
        Gate::Probe
    }

    /// The probe found nothing to send; another caller may probe later.
    pub fn probe_abandoned(&self) {
        self.lock().probing = false;
    }

    /// Remember that `rows` failed with a server error in this streak of failures.
    pub fn note_failing_rows(&self, rows: &[i64]) {
        let mut s = self.lock();
        for row in rows {
            s.failing_rows.note(*row);
        }
    }

    /// Down, and a probe's row failed where the sink answers an empty batch: the
    /// row's doing, so the next probe (another row) is due at once, not after the
    /// probe interval.
    pub fn probe_again_now(&self) {
        let mut s = self.lock();
        if s.down {
            s.probing = false;
            s.not_before = Instant::now();
        }
    }

    /// `rows` are dead-lettered: no longer among the streak's rows.
    pub fn forget_rows(&self, rows: &[i64]) {
        self.lock().failing_rows.forget(rows);
    }

    /// How many different rows failed in this streak (as noted; a few at most).
    pub fn rows_failing(&self) -> usize {
        self.lock().failing_rows.len()
    }

    /// How long a probe's row the sink failed (not the row's doing) is put off.
    pub fn rotation_delay(&self) -> Duration {
        rotation_delay(self.probe_max)
    }

    /// Whether the failures of this streak noted so far, and `rows`, are those of
    /// fewer different rows than make an outage (`ROWS_FAILING_ARE_AN_OUTAGE`): they
    /// may be the rows' doing.
    pub fn few_rows_failing(&self, rows: &[i64]) -> bool {
        let s = self.lock();
        let mut seen = s.failing_rows.clone();
        for row in rows {
            seen.note(*row);
        }
        seen.len() < ROWS_FAILING_ARE_AN_OUTAGE
    }

    /// The sink answered (2xx, or a 4xx about the request itself).
    pub fn on_answer(&self) {
        let mut s = self.lock();
        s.last_answer = Instant::now();
        s.consecutive_failures = 0;
        s.failing_rows.clear();
        s.probing = false;
        if s.down {
            s.down = false;
            s.probe_delay = self.probe_base;
            // while down it held the next probe's time: up, nothing waits for that
            s.not_before = Instant::now();
            self.metrics.sink_up.set(1);
            self.up.send_replace(true);
            tracing::warn!("ingest sink is answering again: resuming delivery");
        }
    }

    /// A sink-level failure. Returns whether the rows involved are charged an
    /// attempt: only while the sink is still taken as up after it. The failure that
    /// trips the sink is not charged either, so an outage costs a row at most
    /// `threshold - 1` attempts, and never exhausts them when `retry.max_attempts` is
    /// at least the threshold (the relay warns at start when it is not).
    pub fn on_sink_failure(&self, error_type: &str, retry_after: Option<Duration>) -> bool {
        let now = Instant::now();
        let mut s = self.lock();
        let was_down = s.down;
        s.consecutive_failures = s.consecutive_failures.saturating_add(1);
        s.last_unreachable = matches!(error_type, "connect" | "timeout");
        s.last_timed_out = error_type == "timeout";
        if was_down && s.probing {
            s.probing = false;
            s.probe_delay = (s.probe_delay * 2).min(self.probe_max);
            s.not_before = now + s.probe_delay.max(retry_after.unwrap_or_default());
            tracing::debug!(error_type, next_probe_in = ?s.probe_delay, "probe failed: ingest sink still down");
        } else if was_down {
            // a request sent before the sink was taken as down, answered since: it
            // says nothing new, and must not put the first probe off (it used to
            // double the delay once per request still out, to `max_probe_interval`)
            if let Some(ra) = retry_after {
                s.not_before = s.not_before.max(now + ra);
            }
        } else if s.consecutive_failures >= self.threshold {
            s.down = true;
            s.probe_delay = self.probe_base;
            s.not_before = now + s.probe_delay.max(retry_after.unwrap_or_default());
            self.metrics.sink_up.set(0);
            self.up.send_replace(false);
            tracing::error!(
                error_type,
                consecutive_failures = s.consecutive_failures,
                "ingest sink is DOWN: pausing all delivery, probing until it answers; \
                 rows are not charged attempts while it is down"
            );
        } else if let Some(ra) = retry_after {
            // rate limited: the whole relay waits, not only these rows
            s.not_before = s.not_before.max(now + ra);
        }
        !s.down
    }

    /// Whether the latest failure, since the sink last answered and while it is taken
    /// as up, was a request that timed out: the sink's doing, or one entry's. A
    /// stopping drain asks the sink with an empty batch before `down_if_last_failed`
    /// takes it as down.
    pub fn last_failure_timed_out(&self) -> bool {
        let s = self.lock();
        !s.down && s.consecutive_failures > 0 && s.last_timed_out
    }

    /// A relay that stops (a `drain` run) while the sink did not answer its latest
    /// request at all (refused, reset, timed out) takes the sink as down, below the
    /// threshold too, so that the state it records makes the next relay probe before
    /// it charges rows. Without it a cron `drain` that sends one batch per run charges
    /// every row once per run of an outage until they are dead. Not after a 5xx or
    /// 429: one row can cause those, and it must still reach the dead letters; nor
    /// after a timeout when an empty batch asked since was answered (the stopping
    /// drain asks, `last_failure_timed_out`: one entry can hang the Frontend).
    /// Returns whether it did.
    pub fn down_if_last_failed(&self) -> bool {
        let mut s = self.lock();
        if s.down || s.consecutive_failures == 0 || !s.last_unreachable {
            return false;
        }
        s.down = true;
        s.probing = false;
        self.metrics.sink_up.set(0);
        self.up.send_replace(false);
        tracing::warn!(
            consecutive_failures = s.consecutive_failures,
            "the ingest sink failed this relay's last request: recorded as down, so \
             the next relay probes before it charges rows"
        );
        true
    }

    /// How long until the next probe (or the end of a Retry-After pause).
    #[cfg(test)]
    fn until_next_probe(&self) -> Duration {
        let s = self.lock();
        s.not_before.saturating_duration_since(Instant::now())
    }
}

/// Whether the recording-file endpoint works, apart from the sink as a whole: a
/// Frontend whose file storage is down fails every upload while it takes JSON
/// batches (and answers empty ones), so the sink as a whole stays up, and each file
/// row would be charged for the outage until dead. Once `ROWS_FAILING_ARE_AN_OUTAGE`
/// different file rows have failed with a server error or a timeout since the last
/// upload that went through, the endpoint is taken as down: failed uploads are not
/// charged (their rows are put off, `rotation_delay`), and claims leave file rows in
/// the outbox but for a probe now and then (`hold_files`), until an upload goes
/// through.
pub struct UploadHealth {
    state: Mutex<UploadState>,
    /// `serversync_upload_up`
    up: IntGauge,
    probe_base: Duration,
    probe_max: Duration,
}

#[derive(Debug)]
struct UploadState {
    /// Different file rows whose uploads failed since the last that went through.
    failing: FailingRows,
    down: bool,
    probe_delay: Duration,
    next_probe: Instant,
}

/// Once this many different rows have failed with nothing going through, the
/// failures are the endpoint's, not the rows' (`UploadHealth`, `Relay::row_or_sink`).
pub const ROWS_FAILING_ARE_AN_OUTAGE: usize = 3;

impl UploadHealth {
    pub fn new(probe_base: Duration, probe_max: Duration, up: IntGauge) -> UploadHealth {
        up.set(1);
        UploadHealth {
            up,
            state: Mutex::new(UploadState {
                failing: FailingRows::default(),
                down: false,
                probe_delay: probe_base,
                next_probe: Instant::now(),
            }),
            probe_base,
            probe_max: probe_max.max(probe_base),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, UploadState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An upload went through.
    pub fn on_upload(&self) {
        if self.end_outage() {
            tracing::warn!("the recording-file endpoint takes uploads again: recordings go on");
        }
    }

    /// A new streak, and the endpoint no longer taken as down; whether it was.
    fn end_outage(&self) -> bool {
        let mut s = self.lock();
        s.failing.clear();
        let was_down = std::mem::replace(&mut s.down, false);
        if was_down {
            self.up.set(1);
        }
        was_down
    }

    /// The upload of `row` failed as one file could make it fail (a server error, a
    /// timeout). Whether the endpoint is taken as down, the failure not the row's.
    pub fn on_upload_failure(&self, row: i64) -> bool {
        let mut s = self.lock();
        s.failing.note(row);
        if s.failing.len() < ROWS_FAILING_ARE_AN_OUTAGE {
            return false;
        }
        if !s.down {
            s.down = true;
            self.up.set(0);
            s.probe_delay = self.probe_base;
            s.next_probe = Instant::now() + self.probe_base;
            tracing::error!(
                failing_rows = s.failing.len(),
                "the recording-file endpoint fails every upload (its file storage is down?): \
                 recording files wait in the outbox, tried now and then, and are not charged \
                 attempts until an upload goes through; JSON rows go on"
            );
        }
        true
    }

    /// No recording file waits in the outbox (the failing ones were delivered by
    /// another relay, dead-lettered or deleted): the endpoint is no longer taken as
    /// down, for there is nothing its state holds back, and `serversync_upload_up`
    /// would say files wait when none do. The next files are tried as usual.
    pub fn nothing_waiting(&self) {
        if self.end_outage() {
            tracing::info!(
                "no recording files wait in the outbox any more: the recording-file endpoint \
                 is no longer taken as down"
            );
        }
    }

    /// `rows` are dead-lettered: they no longer count among the failing files.
    pub fn forget(&self, rows: &[i64]) {
        self.lock().failing.forget(rows);
    }

    /// Whether a claim made now is to leave file rows in the outbox: the endpoint is
    /// down, and no probe is due. The first claim once one is due takes file rows
    /// (the probe), and puts the next off, doubling up to the longest interval.
    pub fn hold_files(&self) -> bool {
        let mut s = self.lock();
        if !s.down {
            return false;
        }
        let now = Instant::now();
        if now < s.next_probe {
            return true;
        }
        s.probe_delay = (s.probe_delay * 2).min(self.probe_max);
        s.next_probe = now + s.probe_delay;
        false
    }

    /// How long a file row whose upload failed while the endpoint is down is put off.
    pub fn rotation_delay(&self) -> Duration {
        rotation_delay(self.probe_max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health(threshold: u32) -> SinkHealth {
        SinkHealth::new(
            threshold,
            Duration::from_secs(1),
            Duration::from_secs(8),
            Metrics::new().unwrap(),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn trips_after_the_threshold_and_stops_charging() {
        let h = health(3);
        assert!(h.on_sink_failure("http_5xx", None));
        assert!(h.on_sink_failure("timeout", None));
        assert_eq!(h.gate(), Gate::Open);
        assert!(
            !h.on_sink_failure("http_5xx", None),
            "the tripping failure is not charged"
        );
        assert!(h.is_down());
        assert_eq!(h.metrics.sink_up.get(), 0);
        assert!(
            !h.on_sink_failure("http_5xx", None),
            "failures while down are not charged"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn probes_one_at_a_time_with_doubling_delay() {
        let h = health(1);
        h.on_sink_failure("http_5xx", None);
        assert!(matches!(h.gate(), Gate::WaitUntil(_)));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(h.gate(), Gate::Probe);
        assert!(matches!(h.gate(), Gate::WaitUntil(_)), "only one prober");
        h.on_sink_failure("http_5xx", None);
        assert_eq!(h.until_next_probe(), Duration::from_secs(2));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(h.gate(), Gate::Probe);
        h.on_answer();
        assert!(!h.is_down());
        assert_eq!(h.gate(), Gate::Open);
        assert_eq!(h.metrics.sink_up.get(), 1);
    }

    /// Failures of one or two files are theirs; of three different files, with no
    /// upload through in between, the endpoint's: file rows are held back but for a
    /// probe, on a doubling interval, until an upload goes through.
    #[tokio::test(start_paused = true)]
    async fn three_files_failing_take_the_upload_endpoint_as_down_until_one_goes() {
        let up = Metrics::new().unwrap().upload_up;
        let u = UploadHealth::new(Duration::from_secs(1), Duration::from_secs(4), up.clone());
        assert_eq!(up.get(), 1);
        assert!(!u.on_upload_failure(1));
        assert!(!u.on_upload_failure(1), "the same file again");
        assert!(!u.on_upload_failure(2));
        u.on_upload();
        assert!(!u.on_upload_failure(3), "an upload went through in between");
        assert!(!u.on_upload_failure(4));
        assert!(!u.hold_files());
        assert_eq!(up.get(), 1);
        assert!(u.on_upload_failure(5));
        assert_eq!(up.get(), 0, "serversync_upload_up says so");
        assert!(u.hold_files(), "no probe due yet");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(!u.hold_files(), "the probe's claim takes files");
        assert!(u.hold_files(), "one probe at a time");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(u.hold_files(), "the next probe comes later: 2 s");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(!u.hold_files());
        assert_eq!(u.rotation_delay(), Duration::from_secs(8));
        u.on_upload();
        assert_eq!(up.get(), 1);
        assert!(!u.hold_files());
        for row in [10, 11, 12] {
            u.on_upload_failure(row);
        }
        assert_eq!(up.get(), 0);
        u.nothing_waiting();
        assert_eq!(up.get(), 1, "no file waits: nothing is held back");
        assert!(!u.hold_files());
        assert!(!u.on_upload_failure(5), "a new streak");
        assert!(!u.on_upload_failure(6));
        u.forget(&[5]);
        assert!(
            !u.on_upload_failure(7),
            "a dead-lettered file is not one of the three"
        );
        assert!(u.on_upload_failure(8));
    }

    #[tokio::test(start_paused = true)]
    async fn dead_rows_leave_the_streak() {
        let h = health(3);
        h.note_failing_rows(&[1, 2, 3]);
        assert_eq!(h.rows_failing(), 3);
        h.forget_rows(&[2]);
        assert_eq!(h.rows_failing(), 2);
    }

    /// Requests that were out when the sink was taken as down fail afterwards, one
    /// by one: the first probe still comes after `probe_interval`, not after a delay
    /// doubled once per request (which reached `max_probe_interval` with 18 out).
    #[tokio::test(start_paused = true)]
    async fn failures_of_requests_out_before_the_outage_do_not_delay_the_first_probe() {
        let h = health(3);
        for _ in 0..20 {
            h.on_sink_failure("http_5xx", None);
        }
        assert!(h.is_down());
        assert_eq!(h.until_next_probe(), Duration::from_secs(1));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(h.gate(), Gate::Probe);
        h.on_sink_failure("http_5xx", Some(Duration::from_secs(5)));
        assert_eq!(
            h.until_next_probe(),
            Duration::from_secs(5),
            "the probe's failure doubles the delay (2 s), its Retry-After is longer"
        );
    }

    /// An answer that is not the probe's (a request sent before the outage, a
    /// split batch's half) ends the outage, and nothing waits for the probe's time.
    #[tokio::test(start_paused = true)]
    async fn an_answer_while_down_opens_the_gate_at_once() {
        let h = health(1);
        h.on_sink_failure("http_5xx", None);
        assert!(matches!(h.gate(), Gate::WaitUntil(_)));
        h.on_answer();
        assert_eq!(h.gate(), Gate::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn starting_down_probes_at_once_and_charges_nothing() {
        let h = health(3);
        let mut up = h.subscribe();
        h.start_down();
        assert!(h.is_down());
        assert!(!*up.borrow_and_update());
        assert_eq!(h.gate(), Gate::Probe, "the first caller probes at once");
        assert!(h.is_probing());
        assert!(
            !h.on_sink_failure("connect", None),
            "not charged while down"
        );
        assert!(!h.is_probing());
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(h.gate(), Gate::Probe);
        h.on_answer();
        assert!(up.has_changed().unwrap_or(false));
        assert!(*up.borrow_and_update());
        assert_eq!(h.gate(), Gate::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn a_last_failure_below_the_threshold_is_taken_as_down_only_when_asked() {
        let h = health(3);
        assert!(!h.down_if_last_failed(), "nothing seen: nothing to say");
        h.on_sink_failure("connect", None);
        assert!(!h.is_down());
        let mut up = h.subscribe();
        assert!(h.down_if_last_failed());
        assert!(h.is_down());
        assert!(!*up.borrow_and_update(), "the transition is published");
        let h = health(3);
        h.on_sink_failure("connect", None);
        h.on_answer();
        assert!(
            !h.down_if_last_failed(),
            "the sink answered after the failure"
        );
        let h = health(3);
        h.on_sink_failure("http_5xx", None);
        assert!(!h.down_if_last_failed(), "a 5xx may be one row's doing");
    }

    #[tokio::test(start_paused = true)]
    async fn only_a_timeout_since_the_last_answer_is_asked_about() {
        let h = health(3);
        assert!(!h.last_failure_timed_out(), "nothing seen");
        h.on_sink_failure("timeout", None);
        assert!(h.last_failure_timed_out());
        h.on_answer();
        assert!(!h.last_failure_timed_out(), "answered since");
        h.on_sink_failure("timeout", None);
        h.on_sink_failure("connect", None);
        assert!(!h.last_failure_timed_out(), "refused last: unreachable");
        h.on_sink_failure("timeout", None);
        assert!(h.is_down());
        assert!(!h.last_failure_timed_out(), "down: nothing to ask");
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_resets_the_count() {
        let h = health(2);
        h.on_sink_failure("timeout", None);
        h.on_answer();
        h.on_sink_failure("timeout", None);
        assert!(!h.is_down());
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_pauses_everyone() {
        let h = health(5);
        h.on_sink_failure("http_429", Some(Duration::from_secs(3)));
        assert!(matches!(h.gate(), Gate::WaitUntil(_)));
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(h.gate(), Gate::Open);
    }

    /// Taking the sink as down because another relay found it so keeps a
    /// `Retry-After` pause the sink asked for: the first probe waits for its end.
    #[tokio::test(start_paused = true)]
    async fn an_outage_found_elsewhere_keeps_the_retry_after_pause() {
        let h = health(5);
        h.on_sink_failure("http_429", Some(Duration::from_secs(20)));
        h.adopt_down();
        assert!(h.is_down());
        assert_eq!(h.metrics.sink_up.get(), 0);
        tokio::time::advance(Duration::from_secs(19)).await;
        assert!(matches!(h.gate(), Gate::WaitUntil(_)), "still paused");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(h.gate(), Gate::Probe);
    }
}
