//! The daemon's timers and watchers. Each only observes and then asks the committer:
//! the expiry timer, the drift monitor (nftables events on jitd's own table, debounced,
//! plus a periodic backstop), the checkpoint tick and SIGHUP. Each ends when `stopping`
//! turns true; ending otherwise is a failure that stops jitd.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{oneshot, watch};

use super::commit::{Job, Observed};
use super::drift::Checked;
use super::Daemon;
use crate::firewall::{monitor, Firewall};
use crate::identity::Caller;

/// How often jitd compares the kernel with its view even without a change event.
pub const RECONCILE_EVERY: Duration = Duration::from_secs(10);
/// How long a burst of change events is gathered before the kernel is read once.
const DEBOUNCE: Duration = Duration::from_millis(20);
/// How often changed grants are checkpointed to `grants.json`.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
/// How many times a check is retried when jitd's own whole-table change overtook it.
const STALE_RETRIES: usize = 3;

type Stopping = watch::Receiver<bool>;

async fn stopped(stopping: &mut Stopping) {
    let _ = stopping.wait_for(|s| *s).await;
}

/// Asks the committer to expire grants at their deadlines.
pub async fn run_expiry<F: Firewall>(daemon: Arc<Daemon<F>>, mut stopping: Stopping) -> Result<(), String> {
    loop {
        let notified = daemon.expiry_changed.notified();
        let next = daemon.lock().book.next_deadline();
        tokio::select! {
            _ = stopped(&mut stopping) => return Ok(()),
            _ = notified => continue,
            _ = async {
                match next {
                    Some(deadline) => tokio::time::sleep_until(deadline).await,
                    None => std::future::pending().await,
                }
            } => {}
        }
        let booked = daemon.expiry_changed.notified();
        if !daemon.submit(Job::Expire).await {
            return committer_gone(&stopping);
        }
        // the committer notifies `expiry_changed` once it has booked the expiry
        tokio::select! {
            _ = stopped(&mut stopping) => return Ok(()),
            _ = booked => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Checks the kernel whenever a transaction touches jitd's table (not jitd's own),
/// and every [`RECONCILE_EVERY`] in any case.
pub async fn watch_drift<F: Firewall>(daemon: Arc<Daemon<F>>, mut stopping: Stopping) -> Result<(), String> {
    let mut events = match monitor::watch() {
        Ok(rx) => Some(rx),
        Err(e) => {
            tracing::warn!("cannot listen to nftables changes ({e}); checking every {RECONCILE_EVERY:?} only");
            None
        }
    };
    let mut tick = tokio::time::interval(RECONCILE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let cause = tokio::select! {
            _ = stopped(&mut stopping) => return Ok(()),
            _ = tick.tick() => "periodic check".to_string(),
            event = async { events.as_mut().expect("guarded").recv().await }, if events.is_some() => match event {
                None => return Err("the nftables monitor stopped".into()),
                Some(g) if g.pid != 0 && daemon.firewall.made_by_us(g.pid) => continue,
                Some(g) => format!("nftables changed by {} (pid {})", if g.process.is_empty() { "?" } else { &g.process }, g.pid),
            },
        };
        if let Some(rx) = events.as_mut() {
            // gather the rest of a burst, then read once
            tokio::time::sleep(DEBOUNCE).await;
            while rx.try_recv().is_ok() {}
        }
        tracing::debug!("reading the kernel to check for drift: {cause}");
        if !daemon.check_drift(&cause).await {
            return committer_gone(&stopping);
        }
    }
}

impl<F: Firewall> Daemon<F> {
    /// Reads the kernel (holding nothing) and has the committer compare and repair.
    /// Returns `false` when the committer has stopped.
    pub async fn check_drift(&self, cause: &str) -> bool {
        for _ in 0..STALE_RETRIES {
            let settled = self.lock().settled;
            let read_at = tokio::time::Instant::now();
            let table = match self.firewall.read_table(true).await {
                Ok(table) => table,
                Err(e) => {
                    tracing::error!("cannot read the kernel's ruleset to check it: {e}");
                    return true;
                }
            };
            let (reply, answer) = oneshot::channel();
            if !self
                .submit(Job::Repair(
                    cause.to_string(),
                    Observed {
                        table,
                        settled,
                        read_at,
                    },
                    reply,
                ))
                .await
            {
                return false;
            }
            match answer.await {
                Ok(Checked::Stale) => continue,
                Ok(_) => return true,
                Err(_) => return false,
            }
        }
        true
    }
}

/// Asks the committer for a checkpoint every [`CHECKPOINT_EVERY`] (it writes one only
/// when the grants changed).
pub async fn checkpoints<F: Firewall>(daemon: Arc<Daemon<F>>, mut stopping: Stopping) -> Result<(), String> {
    let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
    loop {
        tokio::select! {
            _ = stopped(&mut stopping) => return Ok(()),
            _ = tick.tick() => {}
        }
        if !daemon.submit(Job::Checkpoint).await {
            return committer_gone(&stopping);
        }
    }
}

/// Reloads the policy on SIGHUP; an invalid policy is logged and the old one kept.
pub async fn reload_on_sighup<F: Firewall>(daemon: Arc<Daemon<F>>, mut stopping: Stopping) -> Result<(), String> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup()).map_err(|e| format!("cannot listen for SIGHUP: {e}"))?;
    loop {
        tokio::select! {
            _ = stopped(&mut stopping) => return Ok(()),
            got = hup.recv() => if got.is_none() { return Err("the SIGHUP stream ended".into()) },
        }
        let path = daemon.config().path;
        tracing::info!("SIGHUP: reloading {}", path.display());
        let root = Caller {
            uid: 0,
            name: "root (SIGHUP)".into(),
            groups: Vec::new(),
        };
        if let Err(reply) = daemon.reload(&path, &root).await {
            tracing::error!("{}", reply.error.map(|e| e.message).unwrap_or_default());
        }
    }
}

fn committer_gone(stopping: &Stopping) -> Result<(), String> {
    if *stopping.borrow() {
        Ok(())
    } else {
        Err("the committer is gone".into())
    }
}

#[cfg(test)]
mod tests {
    use tokio::time::Instant;

    use super::super::tests::{ask, daemon, root};
    use super::*;
    use crate::api::server::Handler as _;
    use crate::firewall::kernel::KernelTable;
    use crate::firewall::netlink::RawElement;

    /// At 100,000 elements on a busy host a reading reaches the committer seconds after
    /// it began; the kernel's times left are as of the reading, so they must not look
    /// longer than the grants' (which made jitd "repair" every element).
    #[tokio::test]
    async fn a_slow_reading_is_compared_as_of_when_it_began() {
        let dir = tempfile::tempdir().unwrap();
        let d = daemon(dir.path()).await;
        assert!(d.handle(root(), ask(600)).await.ok);
        let read_at = Instant::now() - Duration::from_secs(5);
        let (_, deadline) = d.lock().book.elements(Instant::now())[0];
        // 192.0.2.7 . tcp . 22, each field padded to 4 bytes, as the kernel showed it
        let element = RawElement {
            key: vec![192, 0, 2, 7, 6, 0, 0, 0, 0, 22, 0, 0],
            key_end: None,
            flags: 0,
            expires_ms: Some((deadline - read_at).as_millis() as u64),
        };
        let table = KernelTable {
            objects: Vec::new(),
            elements: [("grants4".to_string(), vec![element])].into(),
        };
        let settled = d.lock().settled;
        let (reply, answer) = oneshot::channel();
        let observed = Observed {
            table: Some(table),
            settled,
            read_at,
        };
        assert!(d.submit(Job::Repair("test".into(), observed, reply)).await);
        let checked = answer.await.unwrap();
        assert!(matches!(checked, Checked::Clean), "{checked:?}");
    }

    /// An element put back gets the time its grant has left now, not as of the reading
    /// (else it outlasts the grant by the reading's delay, and is "repaired" again at
    /// every check).
    #[tokio::test]
    async fn an_element_put_back_lasts_no_longer_than_its_grant() {
        let dir = tempfile::tempdir().unwrap();
        let d = daemon(dir.path()).await;
        assert!(d.handle(root(), ask(600)).await.ok);
        let table = KernelTable {
            objects: Vec::new(),
            elements: Default::default(),
        };
        let (reply, answer) = oneshot::channel();
        let observed = Observed {
            table: Some(table),
            settled: d.lock().settled,
            read_at: Instant::now() - Duration::from_secs(5),
        };
        assert!(d.submit(Job::Repair("test".into(), observed, reply)).await);
        let checked = answer.await.unwrap();
        assert!(matches!(checked, Checked::Repaired(_)), "{checked:?}");
        let batch = d.firewall.applied.lock().unwrap().last().cloned().unwrap().to_string();
        let timeout: u64 = batch
            .split("\"timeout\":")
            .nth(1)
            .and_then(|t| t.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
            .unwrap_or_else(|| panic!("a timed element in {batch}"));
        assert!(
            timeout <= 600,
            "put back for {timeout}s, the grant has at most 600s left"
        );
    }
}
