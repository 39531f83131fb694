//! systemd glue: readiness, status and the watchdog (sd_notify). The watchdog is petted
//! only while the committer answers, so a jitd whose core is stuck is restarted.

use std::sync::Arc;
use std::time::Duration;

use super::Daemon;
use crate::firewall::Firewall;

/// Tells systemd the lockdown is in and requests are served.
pub fn ready(ports: &str) {
    let _ = sd_notify::notify(
        false,
        &[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(&format!("locked {ports}")),
        ],
    );
}

/// Tells systemd jitd is stopping.
pub fn stopping() {
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
}

/// Pets the watchdog every half interval, each time after a round trip through the
/// committer; never returns an error (it ends when jitd stops).
pub async fn pet_watchdog<F: Firewall>(
    daemon: Arc<Daemon<F>>,
    mut stopping: tokio::sync::watch::Receiver<bool>,
) -> Result<(), String> {
    let Some(interval) = watchdog_interval() else {
        let _ = stopping.wait_for(|s| *s).await;
        return Ok(());
    };
    let mut tick = tokio::time::interval(interval / 2);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stopping.wait_for(|s| *s) => return Ok(()),
        }
        if daemon.responsive(interval / 2).await {
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
        } else {
            tracing::warn!(
                "the committer did not answer within {:?}; not petting the watchdog",
                interval / 2
            );
        }
    }
}

/// The watchdog interval systemd asks for (`WATCHDOG_USEC`), if it is meant for this
/// process: like sd_watchdog_enabled(3), a missing `WATCHDOG_PID` means "yours".
fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    let for_us = std::env::var("WATCHDOG_PID").map_or(true, |pid| pid.parse() == Ok(std::process::id()));
    (usec > 0 && for_us).then(|| Duration::from_micros(usec))
}
