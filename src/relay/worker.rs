//! The worker loop and its step: `work` owns sleeping, backoff and shutdown;
//! `step` does one claim → deliver → settle and says what happened (`Step`).

use super::deliver::runs;
use super::*;

impl Relay {
    pub(super) async fn worker(self: Arc<Self>, lane: usize, finished: CancellationToken) {
        let mut next: Prefetched = None;
        self.work(lane, &finished, &mut next).await;
        self.release_prefetched(&mut next).await;
    }

    async fn work(&self, lane: usize, finished: &CancellationToken, next: &mut Prefetched) {
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
            let stand_in = StandIn::new(lane);
            let step = self.step(&stand_in, finished, next).await;
            if stand_in.granted.load(Ordering::Relaxed) {
                // another worker took this one's place while its uploads ran
                self.stand_ins.active.fetch_sub(1, Ordering::SeqCst);
                break;
            }
            match step {
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
                            self.finish_drain(end, finished);
                            break;
                        }
                        // Another worker is claiming or delivering: wait for its settle
                        // (which may unblock rows of its keys, and wakes this worker), or
                        // for the last worker to find nothing and end the drain. Not a
                        // short poll: at the end of a drain every worker would claim
                        // again and again, each keeping the others from seeing the
                        // relay idle.
                        wait(finished, DRAIN_SETTLE_WAIT, &mut wake).await;
                        continue;
                    }
                    // waiting for work is the loop alive, not stuck: the watchdog is
                    // fed through a `poll_interval` longer than its own. A retry this
                    // relay set goes out when due, not at the next poll after it
                    let nap = self.until_retry_due().map_or(poll, |d| d.min(poll));
                    self.with_heartbeat(wait(finished, nap, &mut wake)).await;
                }
                Step::Paused(until) => {
                    if self.drain.is_some() && self.sink.is_probing() {
                        // a probe is out: its answer decides whether this drain goes on
                        wait(finished, Duration::from_millis(10), &mut wake).await;
                        continue;
                    }
                    let pause = until.saturating_duration_since(Instant::now());
                    if self.drain.is_some() && !self.sink.is_down() && pause <= DRAIN_SHORT_PAUSE {
                        // a short rate-limit pause: sat out, then the drain goes on;
                        // a little longer than asked, so that the rows held back (due
                        // from their settle, a moment after the answer) are due again
                        self.with_heartbeat(async {
                            tokio::select! {
                                _ = finished.cancelled() => {}
                                _ = tokio::time::sleep(pause + DRAIN_SETTLE_WAIT) => {}
                            }
                        })
                        .await;
                        continue;
                    }
                    if self.drain.is_some() {
                        // drain delivers what is due now; it does not sit out an outage
                        // or a long rate limit: what is left waits for the next run
                        let end = if self.sink.is_down() {
                            DrainEnd::SinkDown
                        } else {
                            DrainEnd::RateLimited
                        };
                        if self.finish_drain(end, finished) {
                            match end {
                                DrainEnd::SinkDown => {
                                    tracing::error!("ingest sink is down: drain stops");
                                }
                                _ => tracing::warn!(
                                    "ingest sink asked to wait (Retry-After on a 429 or 503): drain stops"
                                ),
                            }
                        }
                        break;
                    }
                    let nap = until.saturating_duration_since(Instant::now()).min(poll);
                    self.with_heartbeat(async {
                        tokio::select! {
                            _ = finished.cancelled() => {}
                            _ = tokio::time::sleep(nap) => {}
                        }
                    })
                    .await;
                }
                Step::DatabaseUnavailable => {
                    if self.drain_gives_up_on_the_database() {
                        if self.finish_drain(DrainEnd::DatabaseDown, finished) {
                            tracing::error!(
                                waited = ?self.drain_db_patience(),
                                "the database stayed unreachable: drain stops"
                            );
                        }
                        break;
                    }
                    let nap = backoff.next().unwrap_or(Duration::from_secs(5));
                    tokio::select! {
                        _ = finished.cancelled() => {}
                        _ = tokio::time::sleep(nap) => {}
                    }
                }
            }
        }
    }

    /// One claim (in `stand_in`'s lane) → deliver → settle. Once `finished`, no new claim is made.
    /// `next` is the batch claimed while the last step's requests were out, delivered
    /// now if the sink's gate is open, else released.
    async fn step(
        &self,
        stand_in: &StandIn,
        finished: &CancellationToken,
        next: &mut Prefetched,
    ) -> Step {
        let probing = match self.sink.gate() {
            Gate::Open => false,
            Gate::Probe => {
                self.release_prefetched(next).await;
                true
            }
            Gate::WaitUntil(until) => {
                self.release_prefetched(next).await;
                return Step::Paused(until);
            }
        };
        let d = &self.settings.dispatch;
        let mut reserved = 0u64;
        // a worker's claim: `batches_per_settle` requests' worth, settled together
        // a probe is one row: if it fails where the sink answers an empty batch, that
        // row is at fault, not the sink (`Relay::row_or_sink`)
        let mut limit = if probing {
            1
        } else {
            d.batch_size.saturating_mul(self.batches_per_worker)
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
            self.claim_and_deliver(stand_in, limit, probing, finished, next)
                .await
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
        } else if probing && self.sink.is_probing() {
            // delivered, but no request reached the sink (every row failed before
            // one was sent: a missing file, a bad payload): the probe learnt nothing,
            // and another may go. Left set, no worker would ever probe again.
            self.sink.probe_abandoned();
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
                self.account(&f).await;
                self.sink.probe_abandoned();
            }
        }
    }

    async fn claim_and_deliver(
        &self,
        stand_in: &StandIn,
        limit: u32,
        probing: bool,
        finished: &CancellationToken,
        next: &mut Prefetched,
    ) -> Step {
        let lane = stand_in.lane;
        // a probe is one small batch, and a drain with --max-rows claims its quota
        let share = !probing && self.drain.as_ref().is_none_or(|d| d.max_rows.is_none());
        let prefetched = self.unhold(next);
        if let (Some((batch, _)), true) = (&prefetched, self.database_is_down()) {
            // claimed ahead before the database went away: its lease cannot be
            // renewed meanwhile, so another relay may hold its rows by the time it
            // could be settled. Not sent: given back, or left to expire.
            let _ = self.release_unsent(&[*batch]).await;
            return Step::DatabaseUnavailable;
        }
        let taken = match prefetched {
            Some(prefetched) => Ok(Some(prefetched)),
            None => self.take_batch(lane, limit, share, None, finished).await,
        };
        let (batch, claim) = match taken {
            Ok(Some(taken)) => taken,
            Ok(None) => return Step::Idle,
            Err(e) => {
                self.database_down(&e);
                return Step::DatabaseUnavailable;
            }
        };
        if finished.is_cancelled() {
            // the relay began to stop while this claim was out (a database stall can
            // hold one for seconds), or the batch was claimed ahead for it: nothing new
            // is started (SPEC 3.7: stop claiming); its rows go back, uncharged
            let _ = self.release_unsent(&[batch]).await;
            return Step::Idle;
        }
        self.wait_for_earlier_deliveries(batch, &claim).await;
        if !self.lease_holds(claim.token, claim.rows.len()) {
            // claimed ahead, or left for this worker, before the relay stopped for
            // longer than a lease: its rows may be another relay's by now
            self.give_back_keys(claim.rows.iter());
            let _ = self.release_unsent(&[batch]).await;
            return Step::Delivered(0);
        }
        let n = claim.rows.len();
        if let Some(drain) = self.drain.as_ref().filter(|d| d.max_rows.is_none()) {
            drain.claimed.fetch_add(n as u64, Ordering::SeqCst);
        }
        let d = &self.settings.dispatch;
        for batch in runs(
            &claim.rows,
            d.batch_size as usize,
            u64::from(d.max_batch_bytes),
        ) {
            self.metrics.batch_size.observe(batch.len() as f64);
        }
        // a probe's upload is the sink's test: the workers wait for its outcome
        let stand_in = (!probing).then_some(stand_in);
        let deliver = self.with_heartbeat(self.deliver(&claim, probing, stand_in, finished));
        // claim ahead only from a backlog (a full claim, or one that the byte bound
        // cut short): a trickle is picked up by the next step, woken by its commit,
        // with no empty claim per cycle
        let attempts = if share && (n >= limit as usize || claim.full) {
            // the rows in flight stay in the outbox meanwhile: the claim starts past
            // them, and their keys' later rows stay blocked behind them, so ordering
            // is unchanged
            let last = claim.rows.iter().map(|r| r.id).max();
            let sent = Instant::now();
            let deliver = async { (deliver.await, sent.elapsed()) };
            tokio::pin!(deliver);
            let ahead_after = if self.slow_sink.load(Ordering::Relaxed) {
                Duration::ZERO
            } else {
                PREFETCH_AFTER
            };
            let (attempts, took) = tokio::select! {
                biased;
                delivered = &mut deliver => delivered,
                _ = tokio::time::sleep(ahead_after) => {
                    let ahead = self.take_batch(lane, limit, share, last, finished);
                    tokio::pin!(ahead);
                    let mut delivered = None;
                    let prefetched = loop {
                        tokio::select! {
                            d = &mut deliver, if delivered.is_none() => delivered = Some(d),
                            p = &mut ahead => break p,
                        }
                    };
                    // a failed claim is the next step's to notice (and report)
                    if let Ok(Some(prefetched)) = prefetched {
                        self.hold(next, prefetched);
                    }
                    match delivered {
                        Some(delivered) => delivered,
                        None => self.give_back_if_it_outlasts_a_request(&mut deliver, sent, next, stand_in).await,
                    }
                }
            };
            self.slow_sink
                .store(took > PREFETCH_AFTER, Ordering::Relaxed);
            attempts
        } else {
            deliver.await
        };
        let settlement = self.settlement(&claim, attempts);
        // before the settle: the rows stay in the outbox until it commits, so no
        // claim takes their keys' later rows meanwhile, and none that comes after
        // waits for this give-back
        self.give_back_keys(claim.rows.iter());
        self.settle(&claim, settlement).await;
        self.lock_in_flight().remove(&batch);
        Step::Delivered(n)
    }

    /// Wait for `deliver`, sent at `sent`. Past `ingest.timeout` a request of it has
    /// timed out, so it is searching its batch for an entry that hangs the Frontend
    /// (a timeout per level) or sending a long upload; once a worker stands in for
    /// this one (`stand_in`), only uploads are out, for a while. The batch claimed
    /// ahead in `next` is given back then, for the stand-in and the other workers and
    /// relays to take, rather than held until the delivery ends.
    async fn give_back_if_it_outlasts_a_request<T>(
        &self,
        deliver: &mut std::pin::Pin<&mut impl std::future::Future<Output = T>>,
        sent: Instant,
        next: &mut Prefetched,
        stand_in: Option<&StandIn>,
    ) -> T {
        let give_back_at = sent + self.settings.ingest.timeout;
        if next.is_some() {
            tokio::select! {
                biased;
                delivered = deliver.as_mut() => return delivered,
                _ = tokio::time::sleep_until(give_back_at) => {
                    tracing::debug!("a delivery outlasted ingest.timeout: the batch claimed ahead is given back");
                }
                () = async {
                    match stand_in {
                        Some(stand_in) => stand_in.stood_in_for().await,
                        None => std::future::pending().await,
                    }
                } => {
                    tracing::debug!("uploads hold the worker: the batch claimed ahead is given back");
                }
            }
            self.release_prefetched(next).await;
            // an idle worker takes them now, not at its next poll
            self.wake();
        }
        deliver.as_mut().await
    }

    /// Keep a prefetched batch for the worker's next step. A drain counts it as work
    /// in progress, so that no other worker ends the drain while it is held.
    fn hold(&self, next: &mut Prefetched, prefetched: (u64, crate::store::Claim)) {
        if let Some(drain) = &self.drain {
            drain.busy.fetch_add(1, Ordering::SeqCst);
        }
        *next = Some(prefetched);
    }

    fn unhold(&self, next: &mut Prefetched) -> Prefetched {
        let taken = next.take();
        if let (Some(_), Some(drain)) = (&taken, &self.drain) {
            drain.busy.fetch_sub(1, Ordering::SeqCst);
        }
        taken
    }

    /// Give a prefetched batch back (the sink's gate closed, or the worker stops):
    /// its rows are released at once for any relay to claim, not left to expire.
    async fn release_prefetched(&self, next: &mut Prefetched) {
        let Some((batch, _)) = self.unhold(next) else {
            return;
        };
        if let Err(e) = self.release_unsent(&[batch]).await {
            tracing::warn!(
                error = %crate::app::causes(&e),
                "releasing a prefetched batch failed: its rows return when their lease expires"
            );
        }
    }
}
