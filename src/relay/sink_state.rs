//! The sink's up/down state shared through the database, so that a relay that starts
//! during an outage (a cron `drain`, a restart, another instance) probes before it
//! charges rows attempts.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::Relay;

impl Relay {
    /// The sink's state as it is recorded for everyone (`ingest.base_url` without
    /// its query, which may hold a token).
    pub(super) fn sink_name(&self) -> String {
        self.settings.ingest.base_url_shown()
    }

    /// Start as down if a relay (another instance, or an earlier run) took the sink
    /// as down and none has seen it answer since: probe first, charge nothing.
    /// Returns whether it did.
    pub(super) async fn restore_sink_state(&self, sink: &str) -> bool {
        match self.store.sink_down_since(sink, None).await {
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
                tracing::debug!(error = %crate::app::causes(&e), "cannot read the recorded sink state");
                false
            }
        }
    }

    /// Whether another relay has recorded the sink as down since this one last saw
    /// it answer (and none has seen it answer since) while this one still takes it
    /// as up; if so, this relay takes it as down too, and probes. Asked before a
    /// sink-level failure is charged: each relay otherwise charged up to
    /// `outage_threshold - 1` failures of its own, and with several relays a row
    /// could use up its attempts in one outage. A record older than this relay's
    /// last answer is stale (a relay that stopped while the sink was down leaves
    /// one): one bad row's 500 then must not pause the relay. A database that does
    /// not answer says no.
    pub(super) async fn taken_as_down_elsewhere(&self) -> bool {
        if self.sink.is_down() {
            return false;
        }
        let age = self.sink.since_last_answer();
        match self
            .store
            .sink_down_since(&self.sink_name(), Some(age))
            .await
        {
            Ok(Some(since)) => {
                if !self.sink.is_down() {
                    self.sink.adopt_down();
                    tracing::error!(
                        since = %since,
                        "ingest sink is DOWN, as another relay found: pausing all delivery, \
                         probing until it answers; rows are not charged attempts while it is down"
                    );
                }
                true
            }
            Ok(None) => false,
            Err(e) => {
                tracing::debug!(error = %crate::app::causes(&e), "cannot read the recorded sink state");
                false
            }
        }
    }

    /// Record every transition of the sink's state in the database, for relays that
    /// start later (cron drains, restarts, other instances); the last one is written
    /// before `done` lets this task end.
    pub(super) fn record_sink_state(
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
                            error = %crate::app::causes(&e),
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
}
