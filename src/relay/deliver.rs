//! Delivering a claim: JSON rows in requests of up to `dispatch.batch_size` entries
//! (a row charged before never in one with rows that were not), sent at once (each
//! split until a rejected or failing entry is alone), file rows as
//! concurrent streamed uploads; each outcome told to the sink-health tracker, which
//! decides whether a failure is charged to its rows.

use std::borrow::Borrow;
use std::collections::HashMap;

use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use super::{Relay, StandIn};
use crate::dispatch::FileJob;
use crate::sink_health::ROWS_FAILING_ARE_AN_OUTAGE;
use crate::store::{Claim, ClaimedRow};
use crate::taxonomy::{ErrorType, Failure};

/// How long a claim's answered rows wait for the rest of it before they are settled
/// on their own (a slow or hanging request, a long upload): at most one extra settle
/// per worker and second, none while requests are answered sooner.
const SETTLE_ANSWERED_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// A batch of at most this many rows that timed out while the sink answers an empty
/// batch is cut into single rows, sent at once (`hang_split_ways`).
const HANG_SPLIT_SINGLES: usize = 32;

/// How many parts a batch of `rows` that timed out while the sink answers an empty
/// batch is cut into, sent at once: a Frontend that hangs on one entry costs one
/// `ingest.timeout` per level of the search, so the parts are single rows up to
/// `HANG_SPLIT_SINGLES`, and above that about √rows parts of about √rows rows. A
/// batch of up to 1,024 rows takes three levels (the batch, its part, the row;
/// about √rows × 2 requests), where halving took log2(rows) + 1: eight for the
/// default 100, about four minutes at the default 30 s. A server error is answered
/// at once and is halved as before.
fn hang_split_ways(rows: usize) -> usize {
    if rows <= HANG_SPLIT_SINGLES {
        rows
    } else {
        (rows as f64).sqrt().ceil() as usize
    }
}

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

/// The file rows of a claim whose upload has begun (`Relay::upload`).
#[derive(Default)]
pub(super) struct Started(std::sync::Mutex<std::collections::HashSet<i64>>);

impl Started {
    /// Whether the upload of `id` may begin (not once `finished`); noted if so.
    /// Under one lock with `never`, so that no upload begins after `never` said
    /// it would not.
    fn begin(&self, id: i64, finished: &CancellationToken) -> bool {
        let mut started = self.lock();
        if finished.is_cancelled() {
            return false;
        }
        started.insert(id);
        true
    }

    /// Of `ids`, those whose upload has not begun, and (once `finished`) never will.
    fn never(&self, ids: impl Iterator<Item = i64>) -> Vec<i64> {
        let started = self.lock();
        ids.filter(|id| !started.contains(id)).collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<i64>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
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

/// What `Relay::row_or_sink` made of a failure that may be a row's doing.
enum Verdict {
    /// Failed: charged to its rows, or not.
    Charge(bool),
    /// Failed, not charged, and not due again for this long: the sink fails row
    /// after row while it answers an empty batch, and the next probe is to take
    /// another row.
    Postpone(std::time::Duration),
    /// The sink answered an empty batch, and then the row itself.
    SentAgain,
    /// The sink answered an empty batch, and the row was not sent again: the lease
    /// of its claim had ended (`Relay::lease_holds`), or the relay is stopping.
    NotSentAgain,
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

    /// Each upload's outcome as it comes (`deliver`), and the claim's attempts
    /// settled meanwhile as `next_settling` does.
    #[allow(clippy::too_many_arguments)]
    async fn settle_uploads<S>(
        &self,
        claim: &Claim,
        files: &[(&ClaimedRow, FileJob)],
        uploads: &mut S,
        sent: &Sent,
        attempts: &mut HashMap<i64, Attempt>,
        settle_at: &mut tokio::time::Instant,
        stand_in: Option<&StandIn>,
        finished: &CancellationToken,
        started: &Started,
    ) where
        S: futures_util::Stream<Item = (i64, Option<Result<(), Failure>>)> + Unpin,
    {
        while let Some((id, result)) = self
            .next_settling(claim, uploads, sent, attempts, settle_at, stand_in)
            .await
        {
            let attempt = match result {
                None => Attempt::NotSent,
                Some(Ok(())) => {
                    self.sink.on_answer();
                    self.upload_health.on_upload();
                    Attempt::Sent
                }
                Some(Err(failure))
                    if may_be_an_entrys_doing(&failure)
                        && self.upload_health.on_upload_failure(id) =>
                {
                    // the endpoint fails every upload: not this file's doing
                    Attempt::put_off(failure, self.upload_health.rotation_delay())
                }
                Some(Err(failure)) => {
                    let again = || async {
                        match files.iter().find(|(row, _)| row.id == id) {
                            Some((row, job)) => {
                                self.upload(claim.token, row, job, finished, started)
                                    .await
                                    .1
                            }
                            None => Some(Err(failure.clone())),
                        }
                    };
                    match self.row_or_sink(&failure, &[id], true, again).await {
                        Verdict::Charge(charged) => Attempt::Failed { failure, charged },
                        Verdict::Postpone(delay) => Attempt::put_off(failure, delay),
                        Verdict::SentAgain => Attempt::Sent,
                        Verdict::NotSentAgain => Attempt::NotSent,
                    }
                }
            };
            attempts.insert(id, attempt);
        }
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

    /// Send one batch of JSON rows. A batch rejected with a non-retryable 4xx is split in halves
    /// until the offending entries are alone. So is a batch answered with a 5xx
    /// (but a 503, `says_unavailable`): a
    /// Frontend that fails on one bad entity answers 500 to every batch holding it,
    /// and without the split that one row would hold its batch back for ever (and
    /// make the sink look down). So is a batch that times out while the sink answers
    /// an empty batch in time (a Frontend that hangs on one entity; one that hangs on
    /// the empty batch too is down, and its batch one sink-level failure), into
    /// parts sent at once (`hang_split_ways`): when all of three or more parts time
    /// out too, it is not one entry's doing and the search stops there. Whether a
    /// lone failing row is the row's fault or the sink's is decided at the end: if
    /// any part of the batch went through, the sink works and the row is charged; if
    /// nothing did, it is one sink-level failure of the whole delivery, counted
    /// towards the outage threshold like any other.
    /// At most as many requests are out at once as `requests` has permits. Rows
    /// answered with a 2xx are told to `sent` as they are; the other attempts are
    /// returned at the end. A request whose turn comes after the lease of its claim
    /// (`token`) ended is not sent (`Relay::lease_holds`): its rows are
    /// `Attempt::NotSent`.
    pub(super) async fn deliver_json(
        &self,
        token: i64,
        rows: &[&ClaimedRow],
        requests: &tokio::sync::Semaphore,
        sent: &Sent,
    ) -> HashMap<i64, Attempt> {
        let mut attempts = HashMap::with_capacity(rows.len());
        if rows.is_empty() {
            return attempts;
        }
        // groups of chunks; a group's chunks go out at once
        let mut pending: Vec<Vec<&[&ClaimedRow]>> = vec![vec![rows]];
        // while nothing has answered, a descent of log2(n) halvings (and the first
        // request) finds a lone bad row; its sibling's request then tells a bad row
        // (it goes through) from the sink (it fails too); with answers, room for a
        // few bad rows
        let depth = usize::BITS - (rows.len().saturating_sub(1)).leading_zeros();
        let blind_budget = depth as usize + 2;
        let budget = 2 * blind_budget;
        let mut failures = 0usize;
        let mut answered = false;
        // an empty batch was answered while this one's requests time out
        let mut sink_answers = false;
        // rows whose requests failed with a 5xx or timed out, awaiting the verdict
        let mut suspects: Vec<(&ClaimedRow, Failure)> = Vec::new();
        // rows not sent when the isolating gave up, with the failure that stopped it
        let mut untried: Vec<(&ClaimedRow, Failure)> = Vec::new();
        // rows not sent: their lease ended before their request's turn
        let mut not_sent: Vec<i64> = Vec::new();
        while let Some(group) = pending.pop() {
            let results = futures_util::future::join_all(group.iter().map(|chunk| async {
                // the semaphore is never closed; were it, sending unbounded is harmless
                let _permit = requests.acquire().await.ok();
                if !self.lease_holds(token, chunk.len()) {
                    return None;
                }
                let result = self.dispatcher.send_json(chunk).await;
                if result.is_ok() {
                    // told now, not when the group's slowest part is in
                    sent.push(chunk);
                }
                Some(result)
            }))
            .await;
            let (group, results): (Vec<_>, Vec<_>) = group
                .into_iter()
                .zip(results)
                .filter_map(|(chunk, result)| match result {
                    Some(result) => Some((chunk, result)),
                    None => {
                        not_sent.extend(chunk.iter().map(|row| row.id));
                        None
                    }
                })
                .unzip();
            if group.is_empty() {
                continue;
            }
            let hung = |r: &Result<(), Failure>| match r {
                Err(f) => f.error_type == ErrorType::Timeout && may_be_an_entrys_doing(f),
                Ok(()) => false,
            };
            // two rows can both hang the Frontend; three parts and more, all hanging,
            // are no one entry's doing
            if group.len() >= 3 && results.iter().all(hung) {
                // every part of a timed-out batch hung too: not one entry's doing (a
                // Frontend that hangs on every entity, and answers only empty
                // batches). One row stands for them, charged or counted towards an
                // outage as a lone failing row is; the others are not charged for it
                let failure = results.into_iter().find_map(Result::err);
                if let (Some(f), Some((first, others))) = (failure, group[0].split_first()) {
                    failures += 1;
                    suspects.push((first, f.clone()));
                    let why = format!("all {} parts of its batch hung", group.len());
                    let rest = pending.drain(..).flatten();
                    give_up(
                        rest.chain([others]).chain(group[1..].iter().copied()),
                        &mut untried,
                        &f,
                        &why,
                    );
                }
                continue;
            }
            for (chunk, result) in group.into_iter().zip(results) {
                match result {
                    Ok(()) => {
                        answered = true;
                        self.sink.on_answer();
                    }
                    Err(f)
                        if f.error_type == ErrorType::Http4xx
                            && !f.retryable
                            && chunk.len() > 1 =>
                    {
                        answered = true;
                        self.sink.on_answer();
                        tracing::info!(
                            rows = chunk.len(),
                            http_status = f.http_status,
                            "batch rejected: splitting it to isolate the offending entries"
                        );
                        push_halves(&mut pending, chunk);
                    }
                    // a 503: the Frontend says it is unavailable, not that an entry
                    // broke it; splitting would only multiply the requests it refuses
                    Err(f) if may_be_an_entrys_doing(&f) => {
                        // nothing of this batch answered in time: a sink that hangs, or
                        // an entry that hangs it? Halving a hung sink's batch would only
                        // wait `ingest.timeout` per half
                        let timed_out = f.error_type == ErrorType::Timeout;
                        let ask = timed_out && chunk.len() > 1 && !answered && !sink_answers;
                        if ask && (self.sink.is_down() || !self.answers_an_empty_batch().await) {
                            let charged = self.account(&f).await;
                            attempts.extend(chunk.iter().map(|row| {
                                let failure = f.clone();
                                (row.id, Attempt::Failed { failure, charged })
                            }));
                            let why = "the ingest sink answered neither its batch nor an empty one";
                            give_up(pending.drain(..).flatten(), &mut untried, &f, why);
                            continue;
                        }
                        sink_answers |= ask;
                        failures += 1;
                        let room = if answered { budget } else { blind_budget };
                        if failures >= room {
                            // give up isolating: this chunk failed; what is left was never
                            // sent and is not charged for it (next time it goes without
                            // this chunk's rows, which back off)
                            suspects.extend(chunk.iter().map(|row| (*row, f.clone())));
                            let why =
                                format!("its batch was given up after {failures} failed requests");
                            give_up(pending.drain(..).flatten(), &mut untried, &f, &why);
                        } else if chunk.len() > 1 {
                            if timed_out {
                                let ways = hang_split_ways(chunk.len());
                                tracing::info!(
                                    rows = chunk.len(),
                                    parts = ways,
                                    "batch timed out while the sink answers: splitting it in case one entry hangs it"
                                );
                                pending.push(parts(chunk, ways));
                            } else {
                                tracing::info!(
                                    rows = chunk.len(),
                                    http_status = f.http_status,
                                    "batch failed with a server error: splitting it in case one entry causes it"
                                );
                                push_halves(&mut pending, chunk);
                            }
                        } else {
                            suspects.push((chunk[0], f));
                        }
                    }
                    Err(failure) => {
                        let charged = self.account(&failure).await;
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
        }
        for (row, failure) in untried {
            attempts.insert(
                row.id,
                Attempt::Failed {
                    failure,
                    charged: false,
                },
            );
        }
        attempts.extend(not_sent.into_iter().map(|id| (id, Attempt::NotSent)));
        if suspects.is_empty() {
            return attempts;
        }
        // The verdict. Something went through: the sink works, these rows fail it.
        // Nothing did: the sink is asked whether it works at all.
        let mut postpone = None;
        let charged = if answered {
            true
        } else {
            let failing: Vec<i64> = suspects.iter().map(|(row, _)| row.id).collect();
            let again_rows: Vec<&ClaimedRow> = suspects.iter().map(|(row, _)| *row).collect();
            let again = || async {
                if !self.lease_holds(token, again_rows.len()) {
                    return None;
                }
                Some(self.dispatcher.send_json(&again_rows).await)
            };
            match self
                .row_or_sink(&suspects[0].1, &failing, rows.len() == 1, again)
                .await
            {
                Verdict::Charge(charged) => charged,
                Verdict::Postpone(delay) => {
                    postpone = Some(delay);
                    false
                }
                Verdict::SentAgain => {
                    attempts.extend(again_rows.iter().map(|row| (row.id, Attempt::Sent)));
                    return attempts;
                }
                Verdict::NotSentAgain => {
                    attempts.extend(again_rows.iter().map(|row| (row.id, Attempt::NotSent)));
                    return attempts;
                }
            }
        };
        for (row, failure) in suspects {
            let attempt = match postpone {
                Some(delay) => Attempt::put_off(failure, delay),
                None => Attempt::Failed { failure, charged },
            };
            attempts.insert(row.id, attempt);
        }
        attempts
    }

    /// A delivery of which nothing got through, failed with a server error or timed
    /// out (`may_be_an_entrys_doing`): the rows' doing, or the sink's? (`rows` are
    /// those that failed; `alone`, whether the delivery held one row only.) Below the
    /// outage threshold it does not matter: charged either way. Where it does, one row failing again and again is told
    /// from a sink failing every row by asking it with an empty batch (as `check`
    /// and an idle relay's probe do), and only then:
    /// - about to take the sink as down, when the failures of the streak were those
    ///   of fewer than `ROWS_FAILING_ARE_AN_OUTAGE` different rows: a 2xx says the
    ///   sink works, so the row is charged and the sink stays up (a row the Frontend
    ///   always fails on, with nothing else to send, used to take it as down and stay
    ///   the probe, uncharged, for ever; two such rows took it as down for a moment,
    ///   saying rows were not charged while its probes charged them);
    /// - down, when the probe (one row) failed: after a 2xx the row is sent `again`,
    ///   once, as the sink may have come back while the probe's request was out (a
    ///   hung sink's probe waits `ingest.timeout`): if it goes through the sink is up
    ///   (`Verdict::SentAgain`); if it fails as before, the row is charged and the
    ///   sink stays down for the others, which were not tried; the next probe takes
    ///   the next row due. Once `ROWS_FAILING_ARE_AN_OUTAGE` different rows have
    ///   failed so in this streak, with nothing going through, it is the sink that
    ///   fails whatever it is sent (a Frontend whose storage is down while its
    ///   request handler answers empty batches, or whose upload endpoint fails):
    ///   the probe's row is not charged, but put off (`Verdict::Postpone`,
    ///   `SinkHealth::rotation_delay`), so that the next probe takes another row
    ///   and a few rows that always fail cannot hold back the rest. Fewer rows
    ///   than that, failing alone, are charged, one probe at a time, until dead.
    ///   An outage that ends during a probe costs its row nothing.
    ///
    /// Failures of three or more different rows are the sink's. A 503 says the Frontend is
    /// unavailable, and a connection that failed or a 429 no row causes: those count
    /// towards the outage without asking.
    async fn row_or_sink<F, Fut>(
        &self,
        failure: &Failure,
        rows: &[i64],
        alone: bool,
        again: F,
    ) -> Verdict
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Option<Result<(), Failure>>>,
    {
        let down = self.sink.is_down();
        let ask = may_be_an_entrys_doing(failure)
            && if down {
                alone
            } else {
                self.sink.at_threshold() && self.sink.few_rows_failing(rows)
            };
        self.sink.note_failing_rows(rows);
        if ask && self.answers_an_empty_batch().await {
            if !down {
                self.sink.on_answer();
                return Verdict::Charge(true);
            }
            return match again().await {
                None => Verdict::NotSentAgain,
                Some(Ok(())) => {
                    self.sink.on_answer();
                    Verdict::SentAgain
                }
                Some(Err(f)) if may_be_an_entrys_doing(&f) => {
                    self.sink
                        .on_sink_failure(f.error_type.as_str(), f.retry_after);
                    if self.sink.rows_failing() >= ROWS_FAILING_ARE_AN_OUTAGE {
                        Verdict::Postpone(self.sink.rotation_delay())
                    } else {
                        // the sink answers, and this row fails it: the next probe,
                        // another row, goes at once (a drain would stop here, the
                        // sink taken as down, run after run until the row was dead)
                        self.sink.probe_again_now();
                        Verdict::Charge(true)
                    }
                }
                Some(Err(f)) => Verdict::Charge(self.account(&f).await),
            };
        }
        Verdict::Charge(self.account(failure).await)
    }

    /// Whether the sink answers an empty batch (in `ingest.timeout`): a 2xx, or a
    /// 4xx that rejects it (a Frontend may refuse a batch without entries, or this
    /// relay's credentials), which is an answer all the same, as for an idle relay's
    /// probe. Not a 408 or a redirect (retried as failures).
    pub(super) async fn answers_an_empty_batch(&self) -> bool {
        match self.dispatcher.send_json(&[]).await {
            Ok(()) => true,
            Err(f) => f.error_type == ErrorType::Http4xx && !f.retryable,
        }
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

impl Relay {
    /// One upload, once the relay has room for it (the wait is not part of the
    /// request's timeout; the lease is renewed meanwhile); none (`None`) if the relay
    /// is `finished` by then: stopping, it starts no upload, which could outlast the
    /// shutdown grace and be cut off at its end. None either once the lease of its
    /// claim (`token`) has ended (`Relay::lease_holds`).
    async fn upload(
        &self,
        token: i64,
        row: &ClaimedRow,
        job: &FileJob,
        finished: &CancellationToken,
        started: &Started,
    ) -> (i64, Option<Result<(), Failure>>) {
        // the semaphore is never closed; were it, uploading unbounded is harmless
        let _permit = self.uploads.acquire().await.ok();
        if !self.lease_holds(token, 1) {
            return (row.id, None);
        }
        if !started.begin(row.id, finished) {
            return (row.id, None);
        }
        (row.id, Some(self.dispatcher.send_file(row, job).await))
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

/// Give up the chunks still pending: not sent (or not answered for their own sake),
/// so not charged, with `failure`'s type and a message saying why.
fn give_up<'r, 'a: 'r>(
    pending: impl Iterator<Item = &'r [&'a ClaimedRow]>,
    untried: &mut Vec<(&'a ClaimedRow, Failure)>,
    failure: &Failure,
    why: &str,
) {
    let mut not_sent = failure.clone();
    not_sent.message = format!("not sent: {why} ({})", failure.message);
    for rest in pending {
        untried.extend(rest.iter().map(|row| (*row, not_sent.clone())));
    }
}

/// `chunk`'s halves, each a group of its own: the left one is sent first, then the
/// right one (halving after an answer, whose sibling tells a bad row from the sink).
fn push_halves<'r, 'a>(pending: &mut Vec<Vec<&'r [&'a ClaimedRow]>>, chunk: &'r [&'a ClaimedRow]) {
    let (left, right) = chunk.split_at(chunk.len() / 2);
    pending.push(vec![right]);
    pending.push(vec![left]);
}

/// `chunk` cut, in order, into `ways` parts as near equal in size as can be (fewer
/// when it has fewer rows).
fn parts<T>(chunk: &[T], ways: usize) -> Vec<&[T]> {
    let ways = ways.clamp(1, chunk.len().max(1));
    let (size, longer) = (chunk.len() / ways, chunk.len() % ways);
    let mut rest = chunk;
    (0..ways)
        .map(|i| {
            let (part, tail) = rest.split_at(size + usize::from(i < longer));
            rest = tail;
            part
        })
        .collect()
}

/// A failure that one entry of the request may cause as well as the sink: a server
/// error (not a 503), or an answer that did not come in time once the request was
/// sent (a Frontend that hangs on one entity). Such a batch is split to find the
/// entry, and a lone row's failure is told from the sink's by an empty batch.
fn may_be_an_entrys_doing(failure: &Failure) -> bool {
    match failure.error_type {
        ErrorType::Http5xx => !says_unavailable(failure),
        ErrorType::Timeout => !failure.unsent,
        _ => false,
    }
}

/// A server error that names the server as the cause: `503 Service Unavailable`
/// (the one 5xx whose `Retry-After` is honoured, `Failure::from_status`).
fn says_unavailable(failure: &Failure) -> bool {
    failure.http_status == Some(503)
}

#[cfg(test)]
mod tests {
    use super::{hang_split_ways, parts};

    #[test]
    fn a_timed_out_batch_is_searched_in_three_levels_up_to_1024_rows() {
        // the levels of the search for one row that hangs, the worst case
        let levels = |rows: usize| {
            let (mut n, mut levels) = (rows, 1);
            while n > 1 {
                n = n.div_ceil(hang_split_ways(n));
                levels += 1;
            }
            levels
        };
        assert_eq!(levels(1), 1);
        assert_eq!(levels(2), 2);
        assert_eq!(levels(32), 2);
        for rows in [33, 64, 100, 500, 1000, 1024] {
            assert_eq!(levels(rows), 3, "{rows} rows");
        }
        assert_eq!(hang_split_ways(100), 10);
    }

    #[test]
    fn parts_cut_a_chunk_in_order_into_near_equal_parts() {
        let rows: Vec<u32> = (0..100).collect();
        let cut = parts(&rows, 8);
        let sizes: Vec<usize> = cut.iter().map(|p| p.len()).collect();
        assert_eq!(sizes, [13, 13, 13, 13, 12, 12, 12, 12]);
        assert_eq!(cut.concat(), rows, "every row once, in order");
        assert_eq!(parts(&rows[..3], 8), [&[0][..], &[1], &[2]]);
        assert_eq!(parts(&rows[..1], 8), [&[0][..]]);
        assert!(parts::<u32>(&[], 8).iter().all(|p| p.is_empty()));
    }
}
