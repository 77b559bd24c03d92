//! Claim lanes: how workers get their batches. One claim at a time per lane, shared
//! with the workers queued behind it, from the lane's share of the ordering keys while
//! a backlog is drained, starting where the lane's last claim started; and the
//! bookkeeping of what is in flight, for renewal and release.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::Relay;
use crate::store::{Claim, ClaimedRow, Held, KeyShare, Want};

/// Where a claim's lease ends by this relay's clock (`Relay::lease_holds`), and
/// whether a request found it ended already (said once).
#[derive(Debug, Clone, Copy)]
pub(super) struct LeaseEnd {
    at: Instant,
    told: bool,
}

impl LeaseEnd {
    fn holds(&self) -> bool {
        Instant::now() < self.at
    }
}

/// A claim this slow refreshes the outbox's statistics (`refresh_statistics_after`),
/// at most once per `ANALYZE_AT_MOST_EVERY`.
const SLOW_CLAIM: Duration = Duration::from_secs(1);
const ANALYZE_AT_MOST_EVERY: Duration = Duration::from_secs(60);

/// How often a claim holding rows an earlier batch still has out looks again
/// (`Relay::wait_for_earlier_deliveries`).
const EARLIER_DELIVERY_POLL: Duration = Duration::from_millis(10);

/// One claim at a time, for every worker queued at the lane's gate: the worker that
/// gets through claims for the ones behind it too and leaves their batches here, so
/// the database scans the front of the queue once instead of once per worker. With
/// several lanes, each claims from its own share of the ordering keys, so that their
/// claims can run at once without skipping each other's rows, and from its cursor
/// (`claim_from`), so that they do not step over each other's rows either.
pub(super) struct Lane {
    pub(super) gate: tokio::sync::Semaphore,
    /// Workers queued at the gate.
    pub(super) waiting: AtomicUsize,
    /// Batches claimed for queued workers; each takes one when its turn comes.
    pub(super) batches: Mutex<Vec<(u64, Claim)>>,
    /// Claims started in this lane, and the number of the last one that found fewer
    /// rows than it asked for: a worker queued before that claim started has nothing
    /// to claim (a commit or a settle since wakes it), so a wake-up does not turn
    /// into one empty claim per worker.
    pub(super) claims: AtomicU64,
    pub(super) last_short: AtomicU64,
    /// `None` with a single lane: every key.
    pub(super) share: Option<KeyShare>,
    /// Where the lane's next claim from its share starts (see `claim_from`).
    cursor: Mutex<Cursor>,
}

/// How long a lane's claims may start past the oldest row before one looks at the
/// whole queue again: the longest a row behind the cursor waits for it (a retry
/// falling due, a lease expiring, a successor of a key another relay delivered).
pub(super) const RESCAN_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy)]
struct Cursor {
    /// 0: from the oldest row.
    from_id: i64,
    /// When a claim last started from the oldest row.
    rescanned: Instant,
}

impl Lane {
    pub(super) fn new(share: Option<KeyShare>) -> Lane {
        Lane {
            gate: tokio::sync::Semaphore::new(1),
            waiting: AtomicUsize::new(0),
            batches: Mutex::new(Vec::new()),
            claims: AtomicU64::new(0),
            last_short: AtomicU64::new(0),
            share,
            cursor: Mutex::new(Cursor {
                from_id: 0,
                rescanned: Instant::now(),
            }),
        }
    }

    /// The id the lane's next claim from its share starts at. Draining a backlog, a
    /// lane's claims would otherwise all start from the oldest row and step over
    /// everything before their own: the other lanes' rows (three in four with four
    /// lanes), and the rows of a slower lane the others have long passed. Rows before
    /// the lane's last full claim are not its to take: they were in flight, waiting
    /// for a retry, behind an older row of their key, or another lane's; the rows
    /// behind its own claim's rows (their keys' successors) come after that claim's
    /// first row. Whatever falls due behind the cursor is found by the claim that
    /// starts from the oldest row again, at least every `RESCAN_EVERY`, or at once
    /// after a claim that came back short. Only where the scan starts changes: the
    /// head-of-key check still looks at the whole queue, so ordering never depends on
    /// the cursor.
    pub(super) fn claim_from(&self) -> i64 {
        let cursor = *self.lock_cursor();
        if cursor.rescanned.elapsed() < RESCAN_EVERY {
            cursor.from_id
        } else {
            0
        }
    }

    /// Move the cursor after a claim that started at `from_id`: to the claim's first
    /// row when it was a full claim from the lane's share, else back to the oldest row.
    pub(super) fn claimed(&self, from_id: i64, first_of_full_claim: Option<i64>) {
        let mut cursor = self.lock_cursor();
        if from_id == 0 {
            cursor.rescanned = Instant::now();
        }
        cursor.from_id = first_of_full_claim.unwrap_or(0);
    }

    fn lock_cursor(&self) -> std::sync::MutexGuard<'_, Cursor> {
        self.cursor.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn lock_batches(&self) -> std::sync::MutexGuard<'_, Vec<(u64, Claim)>> {
        self.batches.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Relay {
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
    /// `after` is the last row of the worker's claim still out, for a claim made ahead:
    /// the lane's claim then starts past it. From the cursor it would walk the rows
    /// out and probe every later row of their keys, only to find each blocked behind
    /// its head; those rows are found by the claim from the oldest row, as whatever
    /// falls behind the cursor is (`RESCAN_EVERY`, or after a short claim).
    pub(super) async fn take_batch(
        &self,
        lane: usize,
        limit: u32,
        share: bool,
        after: Option<i64>,
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
        self.wait_for_settles(finished).await;
        if finished.is_cancelled() {
            return Ok(None);
        }
        let number = lane.claims.fetch_add(1, Ordering::SeqCst) + 1;
        let others = if share { queued.min(self.workers) } else { 0 };
        let want = u32::try_from(others + 1).unwrap_or(1).saturating_mul(limit);
        // every upload slot taken (uploads that hang, or a backlog of recordings):
        // recording files claimed now would hold their workers until a slot frees,
        // and with enough of them no worker would claim anything else; they wait in
        // the outbox instead (their keys' later rows behind them), and other rows go
        // so too while the upload endpoint is down (`UploadHealth`), but for a probe
        let skip_types: &[String] =
            if self.uploads.available_permits() == 0 || self.upload_health.hold_files() {
                &self.settings.dispatch.file_entity_types
            } else {
                &[]
            };
        let want = Want {
            rows: want,
            bytes: self.claim_bytes(want),
            skip_types,
        };
        let lease = self.settings.dispatch.lease_duration;
        let keys = lane.share.filter(|_| self.backlog.load(Ordering::SeqCst));
        let from_id = match (keys.is_some(), lane.claim_from()) {
            (false, _) | (true, 0) => 0,
            (true, from) => after.map_or(from, |a| from.max(a.saturating_add(1))),
        };
        let started = Instant::now();
        let mut claim = self
            .store
            .claim(want, lease, &self.owner, keys, from_id)
            .await?;
        // a claim made now, empty or not, says the database answers (an idle relay's
        // `serversync_db_up` used to wait for the next gauge refresh)
        self.database_up();
        self.refresh_statistics_after(started.elapsed()).await;
        let mut from_share = keys.is_some();
        if claim.rows.is_empty() && from_share {
            claim = self.store.claim(want, lease, &self.owner, None, 0).await?;
            from_share = false;
        }
        let full = claim.full;
        if keys.is_some() {
            let first = claim.rows.first().map(|r| r.id);
            lane.claimed(from_id, first.filter(|_| full && from_share));
        }
        if !full {
            lane.last_short.fetch_max(number, Ordering::SeqCst);
        }
        self.backlog.store(full, Ordering::SeqCst);
        if claim.rows.is_empty() {
            return Ok(None);
        }
        let token = claim.token;
        self.note_lease(token, &claim.rows, started).await;
        let mut batches: Vec<(u64, Claim)> = Vec::new();
        let mut rows = claim.rows;
        // a worker's share: `limit` rows (their bytes are bounded by the claim's, and
        // the worker keeps to its requests in flight however many they make)
        while !rows.is_empty() {
            let rest = rows.split_off(rows.len().min(limit as usize));
            let batch = self.next_batch.fetch_add(1, Ordering::Relaxed);
            batches.push((batch, Claim { token, rows, full }));
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

    /// A claim that took `SLOW_CLAIM` or longer refreshes the planner's statistics
    /// of the outbox, at most once per `ANALYZE_AT_MOST_EVERY`: stale ones (a vacuum
    /// in a quiet moment leaves them saying the outbox is empty) can give a burst of
    /// rows a plan that probes every older row for each one, and claims then take
    /// seconds, until autovacuum's next analyze, up to a minute or more later.
    async fn refresh_statistics_after(&self, took: Duration) {
        if took < SLOW_CLAIM {
            return;
        }
        {
            let mut last = self.last_analyze.lock().unwrap_or_else(|e| e.into_inner());
            if last.is_some_and(|at| at.elapsed() < ANALYZE_AT_MOST_EVERY) {
                return;
            }
            *last = Some(Instant::now());
        }
        tracing::info!(
            took = ?took,
            "a claim was slow: refreshing the outbox's planner statistics (ANALYZE sync_outbox)"
        );
        if let Err(e) = self.store.analyze_outbox().await {
            tracing::debug!(error = %crate::app::causes(&e), "ANALYZE sync_outbox failed");
        }
    }

    /// The payload bytes a claim of `rows` rows may hold: `dispatch.max_batch_bytes`
    /// for each request they make.
    fn claim_bytes(&self, rows: u32) -> u64 {
        let d = &self.settings.dispatch;
        u64::from(rows.div_ceil(d.batch_size.max(1))) * u64::from(d.max_batch_bytes)
    }

    pub(super) fn lock_in_flight(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<u64, (i64, Vec<i64>)>> {
        self.in_flight.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `ids` of the claim `token` are settled while the rest of its batches are out:
    /// no longer renewed, released or waited for as this relay's.
    pub(super) fn forget_in_flight(&self, token: i64, ids: &[i64]) {
        let ids: HashSet<i64> = ids.iter().copied().collect();
        let mut in_flight = self.lock_in_flight();
        for (held, rows) in in_flight.values_mut() {
            if *held == token {
                rows.retain(|id| !ids.contains(id));
            }
        }
    }

    fn lock_lease_ends(&self) -> std::sync::MutexGuard<'_, HashMap<i64, LeaseEnd>> {
        self.lease_ends.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Note where claim `token`'s lease ends by this relay's clock: a whole lease
    /// from `started`, the moment before the claim statement was sent, so never after
    /// the database's end. A claim that took most of a lease would leave little or
    /// none of it that way, though the database gave it a whole one from the claim's
    /// end (a claim slowed down by a lock, a stall): its lease is confirmed at once by
    /// a renewal of its rows (`lease_confirmed`).
    pub(super) async fn note_lease(&self, token: i64, rows: &[ClaimedRow], started: Instant) {
        let lease = self.settings.dispatch.lease_duration;
        let mut at = started + lease;
        if at.saturating_duration_since(Instant::now()) < lease / 3 {
            let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
            at = self
                .lease_confirmed(token, &ids)
                .await
                .unwrap_or(at)
                .max(at);
        }
        self.lock_lease_ends()
            .insert(token, LeaseEnd { at, told: false });
    }

    /// A renewal of claim `token`'s rows `ids`, when it extends every one of them:
    /// then the database's lease ends a lease after the renewal, and its end by this
    /// relay's clock is a lease from the moment before it was sent.
    async fn lease_confirmed(&self, token: i64, ids: &[i64]) -> Option<Instant> {
        let held = Held {
            tokens: vec![token],
            ids: ids.to_vec(),
        };
        let sent = Instant::now();
        let renewed = self
            .store
            .renew(&held, self.settings.dispatch.lease_duration)
            .await
            .ok()?;
        ids.iter()
            .all(|id| renewed.contains(id))
            .then(|| sent + self.settings.dispatch.lease_duration)
    }

    /// Whether the lease of claim `token` still holds by this relay's clock, for a
    /// request about to carry its rows (`note_lease`, `leases_renewed`). A relay
    /// paused longer than a lease (SIGSTOP, a frozen cgroup, a starved host) wakes
    /// with batches claimed and not yet sent: claimed ahead, left for its workers,
    /// parts of a batch not yet out, uploads waiting for a slot. Another relay may
    /// have taken their rows over meanwhile and delivered them, and their keys' later
    /// rows after them; sent now, they would arrive twice, after those later rows.
    /// When it has ended, the first caller for the claim says so in the log (`rows`
    /// not sent). Claims unknown here (none should be) hold.
    pub(super) fn lease_holds(&self, token: i64, rows: usize) -> bool {
        let mut ends = self.lock_lease_ends();
        let Some(end) = ends.get_mut(&token) else {
            return true;
        };
        if end.holds() {
            return true;
        }
        if !std::mem::replace(&mut end.told, true) {
            tracing::warn!(
                rows,
                lease = ?self.settings.dispatch.lease_duration,
                "rows claimed by this relay are not sent: the lease of their claim ended \
                 before their requests could start (the relay was paused or starved, or \
                 its database stalled, for longer than dispatch.lease_duration); another \
                 relay may hold them now, else they are claimed again"
            );
        }
        false
    }

    /// `lease_holds`, saying nothing.
    pub(super) fn lease_holds_quietly(&self, token: i64) -> bool {
        self.lock_lease_ends()
            .get(&token)
            .is_none_or(LeaseEnd::holds)
    }

    /// A renewal of the claims `tokens`, sent at `sent`, went through, extending the
    /// leases of the rows `renewed`. A claim's lease is extended from `sent` when the
    /// renewal extended every row of it still in flight now (none was another
    /// relay's by then; those settled meanwhile are out of flight, or about to be),
    /// or when it still held as the renewal ended (none could have been taken before
    /// the renewal reached it). Otherwise it is left ended: another relay may have
    /// claimed its rows first. Claims neither renewed nor holding are forgotten.
    pub(super) fn leases_renewed(&self, tokens: &[i64], renewed: &HashSet<i64>, sent: Instant) {
        let lease = self.settings.dispatch.lease_duration;
        let now = Instant::now();
        let mut all: HashMap<i64, bool> = tokens.iter().map(|token| (*token, true)).collect();
        for (token, ids) in self.lock_in_flight().values() {
            if let Some(all) = all.get_mut(token) {
                *all = *all && ids.iter().all(|id| renewed.contains(id));
            }
        }
        let mut ends = self.lock_lease_ends();
        tracing::debug!(?all, renewed = renewed.len(), took = ?sent.elapsed(), "leases renewed");
        for (token, all) in &all {
            if let Some(end) = ends.get_mut(token).filter(|end| *all || now < end.at) {
                end.at = end.at.max(sent + lease);
            }
        }
        ends.retain(|token, end| now < end.at || all.contains_key(token));
    }

    fn lock_keys_out(&self) -> std::sync::MutexGuard<'_, HashMap<u64, i64>> {
        self.keys_out.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wait until no batch this relay claimed before `batch` and still has out holds
    /// a row of `claim`. Such a row was given out again by the database, so the
    /// earlier claim of it is gone: its lease ran out before this relay could renew
    /// it (the database stalled, or was unreachable, for longer than a lease), or a
    /// server crash lost the claim before its commit reached the disk (claims do not
    /// wait for the WAL flush). Sent now, the row
    /// would be out twice at once, and its key's later rows could follow it before
    /// the earlier request ends. Waited for, it goes again after it (the earlier
    /// settle then finds the lease gone), as after a relay crash. Only earlier
    /// batches are waited for, so no two batches wait for each other; each delivery
    /// ends within its timeouts.
    ///
    /// Then, until no other row of their ordering keys is out from this relay, and
    /// the keys are taken (`take_keys`): a claim holds a key's oldest row, but one
    /// that a producer committed after a later row of its key, or a dead letter
    /// requeued while its key's later rows go, comes after that later row was
    /// claimed, and the two would be out at once.
    pub(super) async fn wait_for_earlier_deliveries(&self, batch: u64, claim: &Claim) {
        let rows: HashSet<i64> = claim.rows.iter().map(|r| r.id).collect();
        let earlier = || {
            self.lock_in_flight().iter().any(|(other, (token, ids))| {
                *other < batch && *token != claim.token && ids.iter().any(|id| rows.contains(id))
            })
        };
        if earlier() {
            tracing::warn!(
                rows = rows.len(),
                "rows this relay is still delivering were claimed again: their earlier claim is \
                 gone (its lease ran out while the database stalled or was unreachable, or a \
                 database crash lost it); they go out again once the earlier requests end"
            );
            self.poll_until(|| !earlier(), EARLIER_DELIVERY_POLL).await;
        }
        if self.take_keys(claim) {
            return;
        }
        tracing::warn!(
            rows = rows.len(),
            "a claim holds a row of an ordering key whose later row this relay is still \
             delivering (rows of the key committed out of id order, or a dead letter \
             requeued): it goes once that row is answered, never two of a key at once"
        );
        self.poll_until(|| self.take_keys(claim), EARLIER_DELIVERY_POLL)
            .await;
    }

    /// Note the ordering keys of `claim`'s rows as out, all or none: none when another
    /// row of one of them is out (returns `false`). A claim waiting so holds no key,
    /// so no two claims wait for each other.
    fn take_keys(&self, claim: &Claim) -> bool {
        let mut out = self.lock_keys_out();
        let keyed = || {
            claim
                .rows
                .iter()
                .filter_map(|r| r.ordering_key.as_deref().map(|k| (key_hash(k), r.id)))
        };
        if keyed().any(|(key, id)| out.get(&key).is_some_and(|holder| *holder != id)) {
            return false;
        }
        out.extend(keyed());
        true
    }

    /// The keys of `rows` are no longer out (the rows are settled, or given back).
    pub(super) fn give_back_keys<'r>(&self, rows: impl Iterator<Item = &'r ClaimedRow>) {
        let mut out = self.lock_keys_out();
        if out.is_empty() {
            return;
        }
        for row in rows {
            if let Some(key) = row.ordering_key.as_deref() {
                let key = key_hash(key);
                if out.get(&key) == Some(&row.id) {
                    out.remove(&key);
                }
            }
        }
    }

    /// Everything in flight, for renewal or release.
    pub(super) fn held(&self) -> Held {
        held_of(self.lock_in_flight().values())
    }

    /// Batches claimed for workers that never came for them (none should be left:
    /// every worker counted at the gate takes one). Released, not left to expire.
    pub(super) async fn release_unclaimed_shares(&self) {
        let left: Vec<u64> = self
            .lanes
            .iter()
            .flat_map(|lane| std::mem::take(&mut *lane.lock_batches()))
            .map(|(batch, _)| batch)
            .collect();
        if left.is_empty() {
            return;
        }
        match self.release_unsent(&left).await {
            Ok(n) => tracing::debug!(
                rows = n,
                "released batches claimed for workers that stopped"
            ),
            Err(e) => tracing::warn!(
                error = %crate::app::causes(&e),
                "releasing undelivered batches failed: rows return when their lease expires"
            ),
        }
    }
}

impl Relay {
    /// Batches claimed and never sent (left for workers that stopped, or claimed
    /// ahead): out of what is in flight, and their leases released at once, so their
    /// rows are claimable again without waiting for the leases to expire.
    pub(super) async fn release_unsent(&self, batches: &[u64]) -> anyhow::Result<u64> {
        let held = {
            let mut in_flight = self.lock_in_flight();
            let removed: Vec<(i64, Vec<i64>)> = batches
                .iter()
                .filter_map(|batch| in_flight.remove(batch))
                .collect();
            held_of(removed.iter())
        };
        self.release_held(&held).await
    }
}

/// An ordering key's 64-bit hash, for `Relay::keys_out` (two keys sharing one
/// would only make a row wait for the other's delivery).
fn key_hash(key: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut hasher);
    hasher.finish()
}

/// The rows and tokens of some in-flight batches, as renewal and release take them
/// (a shared claim's batches have the same token: it is listed once).
pub(super) fn held_of<'a>(batches: impl Iterator<Item = &'a (i64, Vec<i64>)>) -> Held {
    let mut held = Held::default();
    for (token, ids) in batches {
        held.tokens.push(*token);
        held.ids.extend_from_slice(ids);
    }
    held.tokens.sort_unstable();
    held.tokens.dedup();
    held
}

#[cfg(test)]
mod tests {
    use super::Lane;
    use crate::store::KeyShare;

    #[test]
    fn a_lane_claims_from_its_last_full_claim_and_from_the_oldest_row_after_a_short_one() {
        let lane = Lane::new(Some(KeyShare { index: 0, of: 2 }));
        assert_eq!(lane.claim_from(), 0, "a new lane looks at the whole queue");
        lane.claimed(0, Some(500));
        assert_eq!(lane.claim_from(), 500);
        lane.claimed(500, Some(800));
        assert_eq!(lane.claim_from(), 800);
        lane.claimed(800, None);
        assert_eq!(
            lane.claim_from(),
            0,
            "after a short claim, from the oldest row"
        );
    }
}
