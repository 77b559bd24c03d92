//! Delivering a claim: JSON rows in requests of up to `dispatch.batch_size` entries
//! (a row charged before never in one with rows that were not), sent at once (each
//! split until a rejected or failing entry is alone), file rows as
//! concurrent streamed uploads; each outcome told to the sink-health tracker, which
//! decides whether a failure is charged to its rows.
//!
//! `json.rs` sends JSON batches and searches a failing one for its bad entries;
//! `upload.rs` streams the file rows.

mod json;
mod upload;

use std::borrow::Borrow;
use std::collections::HashMap;

use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use super::{Relay, StandIn};
use crate::dispatch::FileJob;
use crate::store::{Claim, ClaimedRow};
use crate::taxonomy::{ErrorType, Failure};

use upload::Started;

/// How long a claim's answered rows wait for the rest of it before they are settled
/// on their own (a slow or hanging request, a long upload): at most one extra settle
/// per worker and second, none while requests are answered sooner.
const SETTLE_ANSWERED_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// What became of one row's delivery.
pub(super) enum Attempt {
    Sent,
    Failed {
        failure: Failure,
        charged: bool,
    },
    /// Never sent: the relay was stopping (`finished`) when the row's upload was to
    /// start. Released at the settle, unchanged and uncharged, for a relay to claim
    /// at once.
    NotSent,
}

impl Attempt {
    /// Failed by the sink's doing, not the row's: not charged, and not due again
    /// for `delay` (`Verdict::Postpone`, `UploadHealth::rotation_delay`).
    fn put_off(mut failure: Failure, delay: std::time::Duration) -> Attempt {
        failure.retry_after = Some(delay);
        Attempt::Failed {
            failure,
            charged: false,
        }
    }
}

/// The rows of a claim answered with a 2xx and not gathered into its attempts yet.
#[derive(Default)]
pub(super) struct Sent(std::sync::Mutex<Vec<i64>>);

impl Sent {
    fn push(&self, rows: &[&ClaimedRow]) {
        self.lock().extend(rows.iter().map(|row| row.id));
    }

    /// Move the rows told so far into `attempts`, as sent.
    fn gather(&self, attempts: &mut HashMap<i64, Attempt>) {
        attempts.extend(self.lock().drain(..).map(|id| (id, Attempt::Sent)));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<i64>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub(super) enum Route {
    Json,
    File(FileJob),
}

impl Relay {
    /// Deliver every row of a claim: JSON rows in batches of `dispatch.batch_size`
    /// (rows that failed before in batches apart from those that did not), one
    /// request each (split on rejection), all at once (a worker holds at most
    /// `batches_per_settle` batches, and the workers are `concurrency` divided by
    /// that, so no more requests are in flight than `concurrency`); then file rows as
    /// concurrent uploads. The rows whose attempts are in are settled while others
    /// are still out, when that lasts `SETTLE_ANSWERED_EVERY` (again after as long),
    /// and before the uploads start; returns the attempts not settled yet.
    /// A claim holds at most one row per ordering key, so its batches need no order
    /// among themselves.
    /// Once only uploads are out, for a while, another worker stands in for this one
    /// (`stand_in`, `StandIns`).
    /// Once `finished` (a signal, a drain's `--timeout` or its end on an outage),
    /// uploads not started yet are not: they are `Attempt::NotSent`.
    pub(super) async fn deliver(
        &self,
        claim: &Claim,
        probing: bool,
        stand_in: Option<&StandIn>,
        finished: &CancellationToken,
    ) -> HashMap<i64, Attempt> {
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
        // rows charged before go in requests of their own: one an entry of which
        // hangs the Frontend (or fails it with a 500) would otherwise be split anew
        // on every retry, each half waiting `ingest.timeout`, and hold back the rows
        // that never failed; among themselves they are split as any batch is
        let (fresh, failed_before): (Vec<_>, Vec<_>) =
            json.into_iter().partition(|row| row.attempts == 0);
        let d = &self.settings.dispatch;
        let (max_rows, max_bytes) = (d.batch_size as usize, u64::from(d.max_batch_bytes));
        // at most `batches_per_settle` requests out at once, the parts of a timed-out
        // batch's search included (`hang_split_ways`): rows cut by bytes can make
        // more requests than that (three rows of 0.6 × max_batch_bytes fit a worker's
        // two requests' bytes, but go one per request), and a claim bounded by the
        // payloads' stored, compressed, size more still
        let requests = tokio::sync::Semaphore::new(self.batches_per_worker as usize);
        // rows answered with a 2xx, told as soon as they are (a batch's search for a
        // hanging entry can last minutes), and settled with the rest of `attempts`
        let sent = Sent::default();
        let batches: Vec<_> = runs(&fresh, max_rows, max_bytes)
            .chain(runs(&failed_before, max_rows, max_bytes))
            .map(|batch| self.deliver_json(claim.token, batch, &requests, &sent))
            .collect();
        // as many batches under way as they may have requests out
        let mut outcomes =
            futures_util::stream::iter(batches).buffer_unordered(self.batches_per_worker as usize);
        let mut settle_at = tokio::time::Instant::now() + SETTLE_ANSWERED_EVERY;
        while let Some(outcome) = self
            .next_settling(
                claim,
                &mut outcomes,
                &sent,
                &mut attempts,
                &mut settle_at,
                None,
            )
            .await
        {
            attempts.extend(outcome);
        }
        sent.gather(&mut attempts);
        if !files.is_empty() && !attempts.is_empty() {
            // uploads can take minutes (a large file, a slow link)
            self.settle_answered(claim, &mut attempts, &mut settle_at)
                .await;
        }
        let started = Started::default();
        let mut futures = Vec::with_capacity(files.len());
        for (row, job) in &files {
            futures.push(self.upload(claim.token, row, job, finished, &started));
        }
        let mut uploads = futures_util::stream::iter(futures)
            .buffer_unordered(self.settings.dispatch.file_concurrency as usize);
        let stand_in = stand_in.filter(|_| !files.is_empty());
        if let Some(stand_in) = stand_in {
            stand_in.uploads_only();
        }
        // Stopping, the uploads not started yet never will be: their rows are given
        // back at once, for another relay (or the next start), not when the uploads
        // out end (their settle gives them back again, a no-op by then).
        let uploads_over = CancellationToken::new();
        let give_back_unstarted = async {
            if files.is_empty() {
                return;
            }
            tokio::select! {
                () = finished.cancelled() => {}
                () = uploads_over.cancelled() => return,
            }
            let unstarted = started.never(files.iter().map(|(row, _)| row.id));
            if !unstarted.is_empty() {
                self.give_back_keys(unstarted.iter().filter_map(|id| claim.row(*id)));
                self.release_not_sent(claim, unstarted).await;
            }
        };
        let upload_all = async {
            self.settle_uploads(
                claim,
                &files,
                &mut uploads,
                &sent,
                &mut attempts,
                &mut settle_at,
                stand_in,
                finished,
                &started,
            )
            .await;
            uploads_over.cancel();
        };
        tokio::join!(upload_all, give_back_unstarted);
        attempts
    }

    /// The next outcome of `stream`; whenever `settle_at` comes first, the `attempts`
    /// in so far (and the rows `sent` so far) are settled meanwhile
    /// (`settle_answered`); when `stand_in`'s time comes, another worker is asked to
    /// stand in for this one.
    async fn next_settling<S: futures_util::Stream + Unpin>(
        &self,
        claim: &Claim,
        stream: &mut S,
        sent: &Sent,
        attempts: &mut HashMap<i64, Attempt>,
        settle_at: &mut tokio::time::Instant,
        stand_in: Option<&StandIn>,
    ) -> Option<S::Item> {
        loop {
            let stand_in_at = stand_in.and_then(StandIn::due);
            tokio::select! {
                item = stream.next() => return item,
                () = async {
                    match stand_in_at {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => {
                    if let Some(stand_in) = stand_in {
                        if !self.ask_stand_in(stand_in) {
                            stand_in.later();
                        }
                    }
                }
                () = tokio::time::sleep_until(*settle_at) => {
                    sent.gather(attempts);
                    if attempts.is_empty() {
                        *settle_at = tokio::time::Instant::now() + SETTLE_ANSWERED_EVERY;
                    } else {
                        self.settle_answered(claim, attempts, settle_at).await;
                    }
                }
            }
        }
    }

    /// Settle the rows whose attempts are in, while others of their claim are still
    /// out: they leave the outbox (or wait for their retry) now, and their keys' later
    /// rows become due. A claim holds one row per key, so no order is at stake. The
    /// next such settle is `SETTLE_ANSWERED_EVERY` later.
    async fn settle_answered(
        &self,
        claim: &Claim,
        attempts: &mut HashMap<i64, Attempt>,
        settle_at: &mut tokio::time::Instant,
    ) {
        let answered = std::mem::take(attempts);
        // answered, they are out no more (and stay in the outbox until the settle
        // commits, so no claim takes their keys' later rows before)
        self.give_back_keys(answered.keys().filter_map(|id| claim.row(*id)));
        let ids: Vec<i64> = answered.keys().copied().collect();
        let settlement = self.settlement(claim, answered);
        self.settle(claim, settlement).await;
        // settled, they are no longer this relay's: one due again at once (a failure
        // not charged) may be claimed by another batch, which must not wait for this
        // claim's end as for a row given out twice (`wait_for_earlier_deliveries`)
        self.forget_in_flight(claim.token, &ids);
        *settle_at = tokio::time::Instant::now() + SETTLE_ANSWERED_EVERY;
    }

    /// Tell the sink-health tracker about a failure; returns whether it is charged.
    /// A sink-level failure this relay would charge (below its own outage threshold)
    /// is not charged when another relay has recorded the sink as down meanwhile
    /// (`Relay::taken_as_down_elsewhere`): the failure is the outage's, and this relay
    /// takes the sink as down too.
    pub(super) async fn account(&self, failure: &Failure) -> bool {
        match failure.error_type {
            // counted towards the outage either way; never charged when the request
            // did not get through (SPEC 3.6: a refused connection burns no attempt)
            t if t.is_sink_level() => {
                self.sink.on_sink_failure(t.as_str(), failure.retry_after)
                    && !failure.unsent
                    && !self.taken_as_down_elsewhere().await
            }
            ErrorType::Http4xx => {
                self.sink.on_answer();
                true
            }
            // the request never left: says nothing about the sink
            _ => true,
        }
    }

    pub(super) fn route(&self, row: &ClaimedRow) -> Result<Route, Failure> {
        if let Some(defect) = &row.defect {
            return Err(Failure::payload_invalid(defect.clone()));
        }
        let d = &self.settings.dispatch;
        let t = row.entity_type.as_str();
        // any name a JSON entity type may have (SPEC §1.2), but not an empty one, a
        // novel, or one with control characters (it goes into logs and metric labels)
        if !crate::taxonomy::well_formed_entity_type(t) {
            let shown = super::settle::brief(t);
            let cut = if shown.len() < t.len() {
                format!("… ({} bytes)", t.len())
            } else {
                String::new()
            };
            return Err(Failure::unknown_entity_type(format!(
                "entity type {shown:?}{cut} is not routable"
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
}

/// `rows` cut, in order, into runs of at most `max_rows` rows (at least one) and
/// `max_bytes` payload bytes; a row larger than `max_bytes` is a run of its own.
pub(super) fn runs<R: Borrow<ClaimedRow>>(
    rows: &[R],
    max_rows: usize,
    max_bytes: u64,
) -> impl Iterator<Item = &[R]> {
    let max_rows = max_rows.max(1);
    let mut rest = rows;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut bytes = 0u64;
        let mut n = 0;
        while n < rest.len().min(max_rows) {
            let size = rest[n].borrow().payload.get().len() as u64;
            if n > 0 && bytes + size > max_bytes {
                break;
            }
            bytes += size;
            n += 1;
        }
        let (run, tail) = rest.split_at(n);
        rest = tail;
        Some(run)
    })
}
