//! Settling a batch: each row's outcome decided (sent, retried with its persisted
//! backoff, charged or not, or dead-lettered), written in one fenced transaction, and
//! counted in the metrics and the drain's summary.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use backon::Retryable;
use tokio_util::sync::CancellationToken;

use super::deliver::Attempt;
use super::{db_backoff_builder, Relay};
use crate::retry::next_delay;
use crate::store::{Claim, DeadRow, ErrorRecord, Held, RetryRow, Settlement};
use crate::taxonomy::{storable, ErrorType};

impl Relay {
    /// Decide each row's outcome: sent, retry later (charged or not), or dead; with
    /// the log lines of the failed rows, said once the outcome is written.
    pub(super) fn settlement(&self, claim: &Claim, mut attempts: HashMap<i64, Attempt>) -> Decided {
        let mut s = Settlement {
            token: claim.token,
            ..Default::default()
        };
        let mut lines = Vec::new();
        let mut unsent = Vec::new();
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
                Attempt::NotSent => {
                    unsent.push(row.id);
                    continue;
                }
                Attempt::Failed { failure, charged } => (failure, charged),
            };
            let params = self.settings.retry.for_entity(&row.entity_type);
            let number = row.attempts.saturating_add(1);
            let message = storable(&failure.message);
            let error = ErrorRecord {
                error_type: failure.error_type.as_str().to_string(),
                http_status: failure.http_status.map(i32::from),
                response_body: failure.response_body.as_deref().map(storable),
                history_entry: serde_json::json!({
                    "attempt": number,
                    "at": now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                    "errorType": failure.error_type.as_str(),
                    "httpStatus": failure.http_status,
                    "message": &message,
                }),
                message,
            };
            let out_of_attempts =
                charged && number >= i32::try_from(params.max_attempts).unwrap_or(i32::MAX);
            let line = |outcome| FailureLine {
                id: row.id,
                attempt: number,
                error_type: failure.error_type,
                http_status: failure.http_status,
                message: failure.log_message().to_owned(),
                outcome,
            };
            if !failure.retryable || out_of_attempts {
                lines.push(line(LineOutcome::Dead));
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
                // due again at once (but for a Retry-After the sink asked for): the
                // outage is the sink's state, not the row's, and this relay's gate
                // holds its claims until the next probe. Postponed to that probe, the
                // rows would be out of reach of a `drain` run as soon as the sink is
                // back (it would deliver the rest and leave them, or, with nothing
                // else due, not even probe)
                failure.retry_after.unwrap_or_default()
            };
            lines.push(line(if charged {
                LineOutcome::Retry(delay)
            } else {
                LineOutcome::Uncharged
            }));
            s.retries.push(RetryRow {
                id: row.id,
                delay,
                error,
                charged,
            });
        }
        Decided { s, lines, unsent }
    }

    /// Write the outcome (`write_settlement`), then count the settle for a drain's
    /// end and wake the workers: rows of the same ordering keys may be due now.
    pub(super) async fn settle(&self, claim: &Claim, mut decided: Decided) {
        let unsent = std::mem::take(&mut decided.unsent);
        self.write_settlement(claim, decided).await;
        if !unsent.is_empty() {
            self.release_not_sent(claim, unsent).await;
        }
        if let Some(drain) = &self.drain {
            drain.settles.fetch_add(1, Ordering::SeqCst);
        }
        self.wake();
    }

    /// Write the outcome; database errors are retried with backoff (they never cost
    /// a row an attempt), and a lost lease is reported, not overwritten. The failed
    /// rows are logged once their outcome is written, but for those whose lease was
    /// lost (what was decided for them did not happen).
    async fn write_settlement(&self, claim: &Claim, decided: Decided) {
        let Decided { s, lines, .. } = decided;
        if s.sent.is_empty() && s.retries.is_empty() && s.dead.is_empty() {
            // everything was settled as it was answered (`Relay::settle_answered`)
            return;
        }
        let keep_sent = !self.settings.retention.delete_sent;
        let write = || async { self.store.settle(&s, keep_sent).await };
        let retrying = SettleRetrying::new(&self.settles_retrying);
        let report = write
            .retry(db_backoff_builder())
            // a drain gives up on a database gone for good: the rows return when
            // their lease expires, and the drain says so (`unsettled`)
            .when(|e| crate::store::is_transient(e) && !self.drain_gives_up_on_the_database())
            .notify(|e: &anyhow::Error, wait: Duration| {
                self.beat();
                self.database_down(e);
                retrying.note();
                tracing::warn!(?wait, "settling a batch failed; retrying");
            })
            .await;
        drop(retrying);
        let report = match report {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %crate::app::causes(&e), "settling a batch failed; its rows return when the lease expires");
                // the rows of this settlement: a claim with uploads is settled in two
                self.lock_unsettled().extend(s.ids());
                return;
            }
        };
        self.database_up();
        self.note_retries_due(s.retries.iter().map(|r| r.delay));
        {
            // written after all (a release of the same rows may have failed before)
            let mut unsettled = self.lock_unsettled();
            if !unsettled.is_empty() {
                for id in s.ids() {
                    unsettled.remove(&id);
                }
            }
        }
        let lost = &report.lost;
        if !lost.is_empty() {
            self.metrics.lease_lost.inc_by(lost.len() as u64);
            self.stats
                .lease_lost
                .fetch_add(lost.len() as u64, Ordering::Relaxed);
            tracing::warn!(
                rows = lost.len(),
                outbox_ids = %ids_in_brief(lost),
                claim_token = claim.token,
                "lease lost: these rows are no longer this relay's (their lease expired and \
                 a relay took them over, or they were removed or released by hand); their \
                 outcome is not written"
            );
        }
        for line in lines.iter().filter(|l| !lost.contains(&l.id)) {
            line.say(claim);
        }
        // what was decided for the lost rows did not happen: not counted as done
        self.record(claim, &s.without(lost));
    }

    /// Give back the rows of `claim` the relay did not send (`Attempt::NotSent`):
    /// it was stopping, or their claim's lease had ended (`Relay::lease_holds`).
    /// Unleased at once, fenced on the claim's token, so that another relay (or this
    /// one restarted) takes them now rather than when their lease expires (a no-op
    /// for rows another relay holds). Nothing else of them changes: no attempt is
    /// charged.
    pub(super) async fn release_not_sent(&self, claim: &Claim, ids: Vec<i64>) {
        let held = Held {
            tokens: vec![claim.token],
            ids,
        };
        let why = if self.lease_holds_quietly(claim.token) {
            "stopping: recording uploads not started yet are released for redelivery"
        } else {
            "rows whose claim's lease ended before they were sent are released for redelivery"
        };
        match self.release_held(&held).await {
            // none: given back already, as the relay began to stop (`Relay::deliver`),
            // or another relay holds them
            Ok(0) => {}
            Ok(n) => tracing::info!(rows = n, outbox_ids = %ids_in_brief(&held.ids), "{why}"),
            Err(e) => tracing::warn!(
                rows = held.ids.len(),
                error = %crate::app::causes(&e),
                "releasing rows not sent failed; they return when their lease expires"
            ),
        }
    }

    pub(super) fn record(&self, claim: &Claim, s: &Settlement) {
        if !s.dead.is_empty() {
            // failing no more: not among the rows that say the sink is failing
            let dead: Vec<i64> = s.dead.iter().map(|d| d.id).collect();
            self.sink.forget_rows(&dead);
            self.upload_health.forget(&dead);
        }
        // metrics are added up per batch, not per row
        let now = chrono::Utc::now();
        let mut deliveries: Vec<([&str; 2], u64)> = Vec::new();
        for row in s.sent.iter().filter_map(|id| claim.row(*id)) {
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
            if let Some(row) = claim.row(id) {
                tally(&mut deliveries, [row.entity_type.as_str(), outcome]);
            }
            tally(&mut errors, [error.error_type.as_str()]);
        }
        for ([entity_type, outcome], n) in &deliveries {
            let label = self.metrics.entity_label(entity_type);
            self.metrics
                .deliveries
                .with_label_values(&[label, outcome])
                .inc_by(*n);
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
        let uncharged = s.retries.iter().filter(|r| !r.charged).count();
        self.stats
            .retried_uncharged
            .fetch_add(uncharged as u64, Ordering::Relaxed);
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
}

/// Counts a settle among those retrying on the database (`Relay::settles_retrying`)
/// from its first failure until it ends, however it ends (dropped at shutdown too).
struct SettleRetrying<'a> {
    count: &'a AtomicUsize,
    noted: std::sync::atomic::AtomicBool,
}

impl<'a> SettleRetrying<'a> {
    fn new(count: &'a AtomicUsize) -> SettleRetrying<'a> {
        SettleRetrying {
            count,
            noted: false.into(),
        }
    }

    fn note(&self) {
        if !self.noted.swap(true, Ordering::SeqCst) {
            self.count.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Drop for SettleRetrying<'_> {
    fn drop(&mut self) {
        if *self.noted.get_mut() {
            self.count.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Relay {
    /// Wait while settles retry on the database and lease renewals fail too (until
    /// `finished`). The settles' rows are still this relay's, in flight, but their
    /// leases may have run out (an outage longer than a lease): a claim made first,
    /// as the database comes back, would take the relay's own answered rows again and
    /// send them a second time (every row of a 2xx delivered twice, its settle then
    /// finding the lease lost). The first renewal that goes through gives them fresh
    /// leases (it is tried again within a second), and then no claim can take them;
    /// so a settle that keeps failing while the database answers (a row it cannot
    /// archive) holds no claim for longer than a renewal.
    pub(super) async fn wait_for_settles(&self, finished: &CancellationToken) {
        let waiting = || {
            self.settles_retrying.load(Ordering::SeqCst) > 0
                && self.renewals_failing.load(Ordering::SeqCst)
        };
        if !waiting() {
            return;
        }
        tracing::info!(
            "claims wait for the settles retrying on the database, until a lease renewal goes through"
        );
        self.poll_until(
            || !waiting() || finished.is_cancelled(),
            SETTLES_RETRYING_POLL,
        )
        .await;
    }
}

/// How often a claim waiting for settles retrying on the database looks again.
const SETTLES_RETRYING_POLL: Duration = Duration::from_millis(20);

/// A claim's outcome as decided: the settlement to write, and the log lines of its
/// failed rows.
pub(super) struct Decided {
    s: Settlement,
    lines: Vec<FailureLine>,
    /// Rows never sent (`Attempt::NotSent`): released, not settled.
    unsent: Vec<i64>,
}

/// A failed row's log line.
struct FailureLine {
    id: i64,
    attempt: i32,
    error_type: ErrorType,
    http_status: Option<u16>,
    /// `Failure::log_message`: no payload contents.
    message: String,
    outcome: LineOutcome,
}

enum LineOutcome {
    Dead,
    /// Charged an attempt, retried after this delay.
    Retry(Duration),
    /// Not charged: the sink is down.
    Uncharged,
}

impl FailureLine {
    fn say(&self, claim: &Claim) {
        let entity_type = claim
            .row(self.id)
            .map_or("", |r| brief(&r.entity_type))
            .escape_debug();
        match self.outcome {
            LineOutcome::Dead => tracing::warn!(
                outbox_id = self.id,
                entity_type = %entity_type,
                attempt = self.attempt,
                error_type = %self.error_type,
                http_status = self.http_status,
                "dead-lettered: {}",
                self.message
            ),
            LineOutcome::Retry(delay) => tracing::warn!(
                outbox_id = self.id,
                entity_type = %entity_type,
                attempt = self.attempt,
                error_type = %self.error_type,
                http_status = self.http_status,
                retry_in = ?delay,
                "delivery failed: {}",
                self.message
            ),
            LineOutcome::Uncharged => tracing::debug!(
                outbox_id = self.id,
                entity_type = %entity_type,
                error_type = %self.error_type,
                "delivery failed while the sink is down (not charged)"
            ),
        }
    }
}

/// A name a producer wrote, for a log line: its first 100 bytes (a type name longer
/// than that is refused as not routable; it must not make a 10 KB log line).
pub(super) fn brief(name: &str) -> &str {
    const SHOWN: usize = 100;
    if name.len() <= SHOWN {
        return name;
    }
    let mut end = SHOWN;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    &name[..end]
}

/// `ids` for a log line: all of them up to 10, else the first 10 and how many more.
fn ids_in_brief(ids: &[i64]) -> String {
    const SHOWN: usize = 10;
    let shown: Vec<String> = ids.iter().take(SHOWN).map(i64::to_string).collect();
    match ids.len().checked_sub(SHOWN) {
        Some(more) if more > 0 => format!("{} and {more} more", shown.join(",")),
        _ => shown.join(","),
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
