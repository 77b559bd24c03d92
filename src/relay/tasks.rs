//! The relay's side tasks, each running until `stop`: lease renewal, LISTEN wake-ups,
//! the backlog gauges and schema check behind `/readyz`, and retention pruning.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{db_backoff, Relay};

/// How soon a failed lease renewal is tried again.
const RENEW_RETRY: Duration = Duration::from_secs(1);
use crate::store::SchemaState;

impl Relay {
    /// Extend the leases of batches in flight every third of the lease, so a slow
    /// sink never makes a live relay lose its rows (counted from the start of the
    /// renewal before, so a slow renewal does not delay the next). A renewal that fails (the
    /// database restarting) is tried again within a second, not a third of the lease
    /// later: waiting that long, an outage shorter than the lease could outlast it,
    /// and another relay take over rows this one is still delivering.
    pub async fn renew_leases(self: Arc<Self>, stop: CancellationToken) {
        let lease = self.settings.dispatch.lease_duration;
        let every = lease / 3;
        let soon = RENEW_RETRY.min(every);
        let mut wait = every;
        let mut failing = false;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            let held = self.held();
            let sent = std::time::Instant::now();
            if held.ids.is_empty() {
                // nothing renewed: claims whose leases ended are forgotten
                self.leases_renewed(&[], &Default::default(), sent);
                wait = every;
                continue;
            }
            let renewed = self.store.renew(&held, lease).await;
            if let Ok(renewed) = &renewed {
                self.leases_renewed(&held.tokens, renewed, sent);
            }
            self.renewals_failing
                .store(renewed.is_err(), Ordering::SeqCst);
            match renewed {
                Ok(_) => {
                    if failing {
                        tracing::info!("renewing leases works again");
                    }
                    // a third of a lease from this renewal's start, not its end: a
                    // renewal the database takes long over (a lock, a stall) would
                    // otherwise leave a gap after the lease it confirmed, by the
                    // relay's clock (`Relay::lease_holds`), before the next one
                    (wait, failing) = (every.saturating_sub(sent.elapsed()), false);
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(
                            error = %crate::app::causes(&e),
                            "renewing leases failed; trying again every {soon:?}"
                        );
                    }
                    (wait, failing) = (soon, true);
                }
            }
        }
    }

    /// Wake workers on insert notifications; reconnect with backoff when the
    /// listening connection drops. Polling covers whatever is missed.
    pub async fn listen(self: Arc<Self>, stop: CancellationToken) {
        if !self.settings.dispatch.listen {
            return;
        }
        let connections = self.settings.database.max_connections;
        if connections < 2 && self.store.backend() == "postgres" {
            // the listener would hold the pool's only connection for good, and every
            // claim and settle wait for it
            tracing::warn!(
                poll_interval = ?self.settings.dispatch.poll_interval,
                "database.max_connections = {connections} leaves no connection to LISTEN on: \
                 new rows are found by polling every dispatch.poll_interval (allow 2 or more \
                 connections for wake-ups within milliseconds)"
            );
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
                        tracing::debug!(error = %crate::app::causes(&e), "LISTEN failed; polling meanwhile");
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
                            tracing::debug!(error = %crate::app::causes(&e), "LISTEN connection lost");
                            self.wake();
                            break;
                        }
                    },
                }
            }
        }
    }

    /// An exact count of the backlog with no recording file in it ends the upload
    /// endpoint's down state (`UploadHealth::nothing_waiting`).
    fn note_files_waiting(&self, backlog: &crate::store::Backlog) {
        let pending = &backlog.pending_by_entity_type;
        let exact = u64::try_from(pending.values().sum::<i64>())
            .is_ok_and(|n| n < u64::from(self.settings.metrics.backlog_exact_rows));
        let mut files = self.settings.dispatch.file_entity_types.iter();
        if exact && !files.any(|t| pending.get(t).is_some_and(|n| *n > 0)) {
            self.upload_health.nothing_waiting();
        }
    }

    /// Refresh the backlog gauges and the database health on an interval.
    pub async fn refresh_gauges(self: Arc<Self>, stop: CancellationToken) {
        let every = self.settings.metrics.refresh_interval;
        loop {
            let ticket = self.metrics.backlog_ticket();
            match self
                .store
                .backlog(self.settings.metrics.backlog_exact_rows)
                .await
            {
                Ok(backlog) => {
                    self.metrics.set_backlog(ticket, &backlog);
                    self.note_files_waiting(&backlog);
                    self.database_up();
                    self.check_schema().await;
                }
                Err(e) => {
                    self.database_down(&e);
                    // a database that answers without the relay's tables (re-created
                    // empty, restored without them) fails the query as a database
                    // down would: the schema says which it is
                    self.check_schema().await;
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
    }

    /// `/readyz` follows the schema too: a migration rolled back, or a database
    /// restored from an older dump, while the daemon runs.
    pub(super) async fn check_schema(&self) {
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

    /// Delete delivered records past `retention.sent_ttl` every `prune_interval`.
    pub async fn prune(self: Arc<Self>, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(self.settings.retention.prune_interval) => {}
            }
            self.prune_once(&stop).await;
        }
    }

    /// One pruning pass: delivered records past `retention.sent_ttl`, a small batch
    /// (`prune_batch`) at a time with a pause between, so no lock is held for long;
    /// at most 1,000 batches. Returns the records deleted.
    pub async fn prune_once(&self, stop: &CancellationToken) -> u64 {
        let r = &self.settings.retention;
        let mut deleted = 0;
        for _ in 0..1000 {
            match self.store.prune_sent(r.sent_ttl, r.prune_batch).await {
                Ok(n) if n >= u64::from(r.prune_batch) => {
                    deleted += n;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Ok(n) => return deleted + n,
                Err(e) => {
                    tracing::warn!(error = %crate::app::causes(&e), "pruning delivered records failed");
                    return deleted;
                }
            }
            if stop.is_cancelled() {
                break;
            }
        }
        deleted
    }
}
