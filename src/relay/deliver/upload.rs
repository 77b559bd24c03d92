//! File rows: each upload streamed once the relay has a slot for it, and its outcome
//! told to the upload endpoint's health.

use std::collections::HashMap;

use tokio_util::sync::CancellationToken;

use super::json::{may_be_an_entrys_doing, Verdict};
use super::{Attempt, Sent};
use crate::dispatch::FileJob;
use crate::relay::{Relay, StandIn};
use crate::store::{Claim, ClaimedRow};
use crate::taxonomy::Failure;

/// The file rows of a claim whose upload has begun (`Relay::upload`).
#[derive(Default)]
pub(super) struct Started(std::sync::Mutex<std::collections::HashSet<i64>>);

impl Started {
    /// Whether the upload of `id` may begin (not once `finished`); noted if so.
    /// Under one lock with `never`, so that no upload begins after `never` said
    /// it would not.
    pub(super) fn begin(&self, id: i64, finished: &CancellationToken) -> bool {
        let mut started = self.lock();
        if finished.is_cancelled() {
            return false;
        }
        started.insert(id);
        true
    }

    /// Of `ids`, those whose upload has not begun, and (once `finished`) never will.
    pub(super) fn never(&self, ids: impl Iterator<Item = i64>) -> Vec<i64> {
        let started = self.lock();
        ids.filter(|id| !started.contains(id)).collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<i64>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Relay {
    /// Each upload's outcome as it comes (`deliver`), and the claim's attempts
    /// settled meanwhile as `next_settling` does.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn settle_uploads<S>(
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

    /// One upload, once the relay has room for it (the wait is not part of the
    /// request's timeout; the lease is renewed meanwhile); none (`None`) if the relay
    /// is `finished` by then: stopping, it starts no upload, which could outlast the
    /// shutdown grace and be cut off at its end. None either once the lease of its
    /// claim (`token`) has ended (`Relay::lease_holds`).
    pub(super) async fn upload(
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
