//! The one transaction path. Every change — requests, revocations, reloads, drift
//! repairs, restored grants at start, expiry bookkeeping, the stop — is a [`Job`] for
//! the committer task, which runs them one at a time:
//!
//! 1. decide: under the state lock (a std mutex, never held across `.await`), check the
//!    change and book it tentatively, producing a [`Tx`]: audit records, one nftables
//!    change, and how to undo the booking;
//! 2. audit: hand the records to the writer thread ([`super::writer`]) and wait for
//!    its fsync;
//! 3. apply: one nftables batch;
//! 4. on failure: undo the booking, and audit the failure (mirror records, so that a
//!    replay of the journal after a crash reaches the same state).
//!
//! Requests waiting together are decided in order and committed as one transaction.

use std::sync::{Arc, Weak};

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::job::Job;
use super::tx::{KernelChange, Tx, TxError};
use super::{Daemon, State};
use crate::firewall::rules::{self};
use crate::firewall::{Firewall, FirewallError};

/// The most requests one transaction carries.
pub const MAX_BATCH: usize = 256;

/// Starts the committer; it ends after a [`Job::Stop`], or when the daemon is dropped.
pub(super) fn spawn<F: Firewall>(
    daemon: &Arc<Daemon<F>>,
    jobs: mpsc::Receiver<Job>,
    pings: mpsc::Receiver<oneshot::Sender<()>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(run(Arc::downgrade(daemon), jobs, pings))
}

async fn run<F: Firewall>(
    daemon: Weak<Daemon<F>>,
    mut jobs: mpsc::Receiver<Job>,
    mut pings: mpsc::Receiver<oneshot::Sender<()>>,
) {
    let mut held: Option<Job> = None;
    loop {
        let job = match held.take() {
            Some(job) => job,
            None => tokio::select! {
                job = jobs.recv() => match job { Some(job) => job, None => return },
                Some(ping) = pings.recv() => { let _ = ping.send(()); continue; }
            },
        };
        let Some(daemon) = daemon.upgrade() else { return };
        if crate::fault::injected("committer-panic") {
            panic!("injected fault: committer-panic");
        }
        match job {
            Job::Request(first) => {
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH {
                    match jobs.try_recv() {
                        Ok(Job::Request(more)) => batch.push(more),
                        Ok(other) => {
                            held = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                daemon.commit_requests(batch, &mut pings).await;
            }
            Job::Revoke(caller, request, reply) => {
                let _ = reply.send(daemon.commit_revoke(&caller, request, &mut pings).await);
            }
            Job::Reload(config, caller, reply) => {
                let _ = reply.send(daemon.commit_reload(*config, &caller, &mut pings).await);
            }
            Job::Repair(cause, observed, pace, reply) => {
                let _ = reply.send(daemon.commit_repair(&cause, observed, pace, &mut pings).await);
            }
            Job::Expire => {
                daemon.commit_expiry(&mut pings).await;
                daemon.commit_pending_expiry(&mut pings).await;
            }
            Job::Decide(caller, decision, reply) => {
                let _ = reply.send(daemon.commit_decision(&caller, decision, &mut pings).await);
            }
            Job::Checkpoint => daemon.checkpoint_if_dirty(false),
            Job::Record(records) => {
                let _ = daemon.execute(Tx::records(records), &mut pings).await;
            }
            Job::Stop(ack) => {
                daemon.commit_stop(&mut pings).await;
                let _ = ack.send(());
                return;
            }
        }
    }
}

/// Awaits `work` while still answering the watchdog's pings: a slow disk or nft makes
/// the committer wait, it does not make it look dead.
pub(super) async fn answering<T>(
    pings: &mut mpsc::Receiver<oneshot::Sender<()>>,
    work: impl std::future::Future<Output = T>,
) -> T {
    tokio::pin!(work);
    loop {
        tokio::select! {
            out = &mut work => return out,
            Some(ping) = pings.recv() => { let _ = ping.send(()); }
        }
    }
}

impl<F: Firewall> Daemon<F> {
    /// Audits, applies and, on failure, undoes and audits the failure: the one path
    /// every change takes. The booking in `tx` is already in the state.
    pub(super) async fn execute(&self, tx: Tx, pings: &mut mpsc::Receiver<oneshot::Sender<()>>) -> Result<(), TxError> {
        let Tx {
            mut records,
            kernel,
            undo,
            failed,
            touched,
            uncounted,
            record_after,
        } = tx;
        let ended = answering(pings, self.count_ends(&kernel, &undo, uncounted, &mut records)).await;
        let later = if record_after {
            std::mem::take(&mut records)
        } else {
            Vec::new()
        };
        if !records.is_empty() {
            // the booking is in the state: the grants these records open are protected
            let keep_since = self.lock().audit_keep_since(chrono::Utc::now());
            self.writer.keep_since(keep_since);
            match answering(pings, self.writer.append(records)).await {
                Ok(appended) => {
                    self.appended(appended);
                    if let Some(newest) = undo.inserted.iter().chain(&undo.pending_added).max() {
                        let mut st = self.lock();
                        st.recorded = st.recorded.max(*newest);
                    }
                }
                Err(e) => {
                    tracing::error!("{e}; the change is refused");
                    undo.apply(&mut self.lock());
                    return Err(e.into());
                }
            }
        }
        answering(pings, crate::fault::held("apply-stall")).await;
        let whole = matches!(kernel, KernelChange::Replace(..) | KernelChange::Remove);
        self.lock().begin(touched, whole);
        let applied = answering(pings, self.apply(&kernel)).await;
        if let Err(e) = applied {
            tracing::error!("applying the change failed, nothing changed: {e}");
            {
                let mut st = self.lock();
                undo.apply(&mut st);
                st.settle();
            }
            if !failed.is_empty() {
                let failed = failed
                    .into_iter()
                    .map(|mut r| {
                        let why = r.reason.take().unwrap_or_default();
                        r.reason = Some(format!("{why}not applied, nothing changed: {e}"));
                        r
                    })
                    .collect();
                match answering(pings, self.writer.append(failed)).await {
                    Ok(appended) => self.appended(appended),
                    Err(e) => tracing::error!("{e}; the failure is not on record"),
                }
            }
            return Err(e.into());
        }
        if matches!(kernel, KernelChange::Replace(..)) {
            match answering(pings, super::read_baseline(&self.firewall)).await {
                Ok(b) => self.adopt_baseline(b, undo.config.is_none()),
                Err(e) => tracing::error!("cannot read back the table just applied: {e}"),
            }
        }
        {
            let mut st = self.lock();
            st.settle();
            st.changed();
            st.ledger_applied(&kernel, &ended);
        }
        self.expiry_changed.notify_one();
        if !later.is_empty() {
            // the change stands whether or not its record can be written
            match answering(pings, self.writer.append(later)).await {
                Ok(appended) => self.appended(appended),
                Err(e) => tracing::error!("{e}; the repair is made but not on record"),
            }
        }
        Ok(())
    }

    /// Takes the table read back right after a replacement as the baseline. When the
    /// lockdown itself did not change (`same_lockdown`: a repair) the reading must match
    /// the baseline it replaced; if it does not, another process changed the table
    /// between the batch and the reading, and adopting it would make that change look
    /// like jitd's own: the old baseline stays, so the next check repairs it.
    fn adopt_baseline(&self, read: super::Fingerprint, same_lockdown: bool) {
        let mut st = self.lock();
        if same_lockdown && !st.baseline.is_empty() && read != st.baseline {
            tracing::warn!("jitd's table changed again right after jitd replaced it; it is checked again");
            return;
        }
        st.baseline = read;
    }

    fn appended(&self, appended: super::writer::Appended) {
        let mut st = self.lock();
        st.audit_hash = appended.last_hash;
        drop(st);
        if appended.rotated {
            // a restart must need no record from the rotated file
            self.checkpoint_if_dirty(true);
        }
    }

    /// Applies one kernel change. Should the kernel already have dropped an element
    /// being removed (its timeout fired a moment early), that batch fails as a whole;
    /// then the removals are done one by one, tolerating the missing ones, and the
    /// additions follow in a batch of their own.
    async fn apply(&self, change: &KernelChange) -> Result<(), FirewallError> {
        match change {
            KernelChange::None => Ok(()),
            KernelChange::Remove => self.firewall.apply(&rules::remove_table()).await,
            KernelChange::Replace(spec, elements) => {
                let cuts = self.lock().cuts.live(Instant::now());
                let batch = rules::replace_table_with_cuts(spec, elements, &cuts);
                self.firewall.apply(&batch).await
            }
            KernelChange::Grants { remove, add, .. } => {
                let Some(batch) = rules::change_grants(remove, add) else {
                    return Ok(());
                };
                match self.firewall.apply(&batch).await {
                    Err(FirewallError::Missing(_)) if !remove.is_empty() => {
                        for key in remove {
                            if let Some(one) = rules::change_grants(std::slice::from_ref(key), &[]) {
                                let _ = self.firewall.apply(&one).await;
                            }
                        }
                        match rules::change_grants(&[], add) {
                            Some(batch) => self.firewall.apply(&batch).await,
                            None => Ok(()),
                        }
                    }
                    other => other,
                }
            }
        }
    }

    /// Sends the grants checkpoint to the writer when they changed since the last one
    /// (or always, with `force`). Runs between transactions, so it never holds a grant
    /// that is booked but not yet audited.
    pub(super) fn checkpoint_if_dirty(&self, force: bool) {
        let mut st = self.lock();
        if !st.dirty && !force {
            return;
        }
        st.dirty = false;
        let snapshot = super::snapshot_of(&st);
        drop(st);
        self.writer.checkpoint(snapshot);
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while the lock was held leaves the state suspect: stop rather than limp.
        self.state.lock().unwrap_or_else(|_| {
            tracing::error!("the state lock is poisoned (a task panicked while holding it); stopping");
            std::process::exit(1)
        })
    }
}
