//! systemd integration: readiness, status, stopping, and the watchdog. Every call is
//! a no-op when not started by systemd (no NOTIFY_SOCKET).

use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

use crate::relay::Relay;

pub fn ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn stopping() {
    notify(&[NotifyState::Stopping, NotifyState::Status("shutting down")]);
}

fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

/// The watchdog interval systemd asked for, if any.
///
/// As libsystemd's `sd_watchdog_enabled`: `WATCHDOG_USEC` enables it, and
/// `WATCHDOG_PID`, when set, must name this process (sd-notify's own helper insists
/// on `WATCHDOG_PID` being present, which systemd does not promise).
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.trim().parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// Ping the watchdog at half its interval, but only while the worker loop shows
/// life: a stuck loop stops the pings and systemd restarts the service.
pub async fn feed_watchdog(relay: Arc<Relay>, interval: Duration, stop: CancellationToken) {
    let every = interval / 2;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let age = relay.heartbeat_age();
        if age < interval {
            notify(&[NotifyState::Watchdog]);
        } else {
            tracing::error!(
                ?age,
                "worker loop shows no progress: withholding the watchdog ping"
            );
        }
    }
}
