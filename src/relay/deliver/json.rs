//! JSON rows: one request per batch, and a batch that fails for what may be one of
//! its entries' doing split until that entry is alone; a lone row that fails told
//! from a sink that fails everything by an empty batch.

use std::collections::HashMap;

use super::{Attempt, Sent};
use crate::relay::Relay;
use crate::sink_health::ROWS_FAILING_ARE_AN_OUTAGE;
use crate::store::ClaimedRow;
use crate::taxonomy::{ErrorType, Failure};

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

/// What `Relay::row_or_sink` made of a failure that may be a row's doing.
pub(super) enum Verdict {
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

impl Relay {
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
        // the failure that made the search split this batch (a 5xx, or a timeout)
        let mut searching: Option<Failure> = None;
        while let Some(group) = pending.pop() {
            if let Some(f) = searching.as_ref().filter(|_| self.sink.is_down()) {
                // the sink was taken as down while this batch was searched for a bad
                // entry (every batch out failing so): it is the sink's doing, and the
                // parts not sent yet wait, uncharged, instead of each failing in turn
                let why = "the ingest sink was taken as down while its batch was searched";
                let rest = group.into_iter().chain(pending.drain(..).flatten());
                give_up(rest, &mut untried, f, why);
                break;
            }
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
                        tracing::debug!(
                            rows = chunk.len(),
                            first_outbox_id = chunk[0].id,
                            http_status = f.http_status,
                            "batch rejected: splitting it to isolate the offending entries"
                        );
                        push_halves(&mut pending, chunk);
                    }
                    // a 503: the Frontend says it is unavailable, not that an entry
                    // broke it; splitting would only multiply the requests it refuses
                    Err(f) if may_be_an_entrys_doing(&f) => {
                        // nothing of this batch answered in time, or a server error: a
                        // sink that hangs or fails everything, or an entry that hangs or
                        // breaks it? Halving a hung sink's batch would only wait
                        // `ingest.timeout` per half, and a failing sink's would fail
                        // half after half, each batch out in turn, before any of it
                        // counted towards the outage: asked once with an empty batch
                        let timed_out = f.error_type == ErrorType::Timeout;
                        let ask = chunk.len() > 1 && !answered && !sink_answers;
                        if ask && (self.sink.is_down() || !self.answers_an_empty_batch().await) {
                            let why = "the ingest sink answered neither its batch nor an empty one";
                            if timed_out {
                                let charged = self.account(&f).await;
                                attempts.extend(chunk.iter().map(|row| {
                                    let failure = f.clone();
                                    (row.id, Attempt::Failed { failure, charged })
                                }));
                            } else if let Some((first, others)) = chunk.split_first() {
                                // one row stands for the batch, charged or counted
                                // towards an outage as a lone failing row is (the
                                // verdict below); the others are not charged for it
                                failures += 1;
                                suspects.push((first, f.clone()));
                                give_up([others].into_iter(), &mut untried, &f, why);
                            }
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
                            let why =
                                format!("its batch was given up after {failures} failed requests");
                            if answered && chunk.len() > 1 {
                                // the sink answers other parts, and these rows were never
                                // sent alone: nothing says one of them is at fault (a
                                // Frontend that fails only requests over some size
                                // charged them, and dead-lettered rows it takes alone)
                                give_up(std::iter::once(chunk), &mut untried, &f, &why);
                            } else {
                                suspects.extend(chunk.iter().map(|row| (*row, f.clone())));
                            }
                            give_up(pending.drain(..).flatten(), &mut untried, &f, &why);
                        } else if chunk.len() > 1 {
                            searching = Some(f.clone());
                            if timed_out {
                                let ways = hang_split_ways(chunk.len());
                                tracing::debug!(
                                    rows = chunk.len(),
                                    first_outbox_id = chunk[0].id,
                                    parts = ways,
                                    "batch timed out while the sink answers: splitting it in case one entry hangs it"
                                );
                                pending.push(parts(chunk, ways));
                            } else {
                                tracing::debug!(
                                    rows = chunk.len(),
                                    first_outbox_id = chunk[0].id,
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
    pub(super) async fn row_or_sink<F, Fut>(
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
    pub(in crate::relay) async fn answers_an_empty_batch(&self) -> bool {
        match self.dispatcher.send_json(&[]).await {
            Ok(()) => true,
            Err(f) => f.error_type == ErrorType::Http4xx && !f.retryable,
        }
    }
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
pub(super) fn may_be_an_entrys_doing(failure: &Failure) -> bool {
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
