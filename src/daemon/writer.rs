//! The audit writer: one thread owns the audit log and the grants checkpoint, so that
//! fsync never runs on the async runtime's workers and no lock is held across it. The
//! committer hands it records and waits for the acknowledgement; checkpoints are
//! written in the same order as the records they follow.
//!
//! Because it sees every record written, the writer also keeps the sum of the history
//! ([`store::History`]) and stamps each checkpoint with the journal position it covers,
//! so a restart reads only the journal after it.

use std::path::PathBuf;
use std::sync::mpsc;

use tokio::sync::oneshot;

use crate::audit::{AuditError, AuditLog, AuditRecord};
use crate::store::{self, History, Snapshot};

/// What a successful append reports back.
#[derive(Debug, Clone)]
pub struct Appended {
    /// The hash of the newest record, which a checkpoint taken now includes.
    pub last_hash: String,
    /// Whether the log was rotated after this append (a checkpoint is due).
    pub rotated: bool,
}

enum Task {
    Append(Vec<AuditRecord>, oneshot::Sender<Result<Appended, AuditError>>),
    KeepSince(Option<chrono::DateTime<chrono::Utc>>),
    Checkpoint(Box<Snapshot>),
    Flush(oneshot::Sender<()>),
    #[cfg(test)]
    Stall(std::sync::mpsc::Receiver<()>),
}

/// The handle the committer writes through; the thread ends when it is dropped.
#[derive(Debug, Clone)]
pub struct Writer {
    tasks: mpsc::Sender<Task>,
    /// Why the last append failed; `None` once one succeeds (for the doctor).
    failure: std::sync::Arc<std::sync::Mutex<Option<String>>>,
}

impl std::fmt::Debug for Task {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Task")
    }
}

impl Writer {
    /// Starts the writer thread with the opened audit log, the state directory and the
    /// sum of the history written so far.
    pub fn start(
        mut log: AuditLog,
        state_dir: PathBuf,
        mut history: History,
        mut approvals: Approvals,
    ) -> std::io::Result<Writer> {
        let (tasks, inbox) = mpsc::channel::<Task>();
        let failure = std::sync::Arc::<std::sync::Mutex<Option<String>>>::default();
        let failed = failure.clone();
        std::thread::Builder::new().name("audit-writer".into()).spawn(move || {
            for task in inbox {
                match task {
                    Task::Append(records, ack) => {
                        crate::fault::hold("writer-stall");
                        let result = append(&mut log, &mut history, &mut approvals, &records);
                        if let Ok(mut last) = failed.lock() {
                            *last = result.as_ref().err().map(ToString::to_string);
                        }
                        let _ = ack.send(result);
                    }
                    Task::Checkpoint(mut snapshot) => {
                        // The committer takes a checkpoint between transactions: it covers
                        // the journal up to here exactly when its hash is the newest.
                        if snapshot.audit_hash == log.last_hash() {
                            snapshot.position = Some(log.position());
                            snapshot.history = history.clone();
                            // every live grant is in it: the approvals of ended ones go
                            approvals.retain(|id, _| snapshot.grants.iter().any(|g| g.id == *id));
                            snapshot.approvals = approvals.clone();
                        }
                        if let Err(e) = store::save(&state_dir, &snapshot) {
                            tracing::error!("{e}");
                        }
                    }
                    Task::KeepSince(since) => log.keep_since(since),
                    Task::Flush(ack) => {
                        let _ = ack.send(());
                    }
                    #[cfg(test)]
                    Task::Stall(until) => {
                        let _ = until.recv();
                    }
                }
            }
        })?;
        Ok(Writer { tasks, failure })
    }

    /// Why the last append failed, while no later one has succeeded.
    pub fn last_failure(&self) -> Option<String> {
        self.failure.lock().ok().and_then(|f| f.clone())
    }

    /// Appends `records` (one write, one fsync, one batch) and waits until they are on disk.
    pub async fn append(&self, records: Vec<AuditRecord>) -> Result<Appended, AuditError> {
        let (ack, done) = oneshot::channel();
        let gone = || AuditError {
            path: PathBuf::from(crate::audit::AUDIT_FILE),
            source: std::io::Error::other("the audit writer has stopped"),
        };
        self.tasks.send(Task::Append(records, ack)).map_err(|_| gone())?;
        done.await.map_err(|_| gone())?
    }

    /// From the next append on, rotation deletes no audit file holding a record at or
    /// after `since` ([`AuditLog::keep_since`]).
    pub fn keep_since(&self, since: Option<chrono::DateTime<chrono::Utc>>) {
        let _ = self.tasks.send(Task::KeepSince(since));
    }

    /// Queues a checkpoint of the grants; it is written after every record queued
    /// before it. A failure is logged (the audit log still holds every change).
    pub fn checkpoint(&self, snapshot: Snapshot) {
        let _ = self.tasks.send(Task::Checkpoint(Box::new(snapshot)));
    }

    /// Waits until everything queued before has been written.
    pub async fn flush(&self) {
        let (ack, done) = oneshot::channel();
        if self.tasks.send(Task::Flush(ack)).is_ok() {
            let _ = done.await;
        }
    }

    /// Test hook: blocks the writer until the returned sender is dropped or sent to,
    /// as a stalled disk would.
    #[cfg(test)]
    pub fn stall(&self) -> std::sync::mpsc::Sender<()> {
        let (release, until) = std::sync::mpsc::channel();
        let _ = self.tasks.send(Task::Stall(until));
        release
    }
}

/// Where each live grant's approval record ends in the journal.
pub type Approvals = std::collections::BTreeMap<crate::domain::GrantId, crate::audit::Position>;

/// Notes where the approvals among `records` ended up (`at`, one per record); after a
/// rotation, the files named before move up by one.
fn note_approvals(approvals: &mut Approvals, records: &[AuditRecord], at: &[crate::audit::Position], rotated: bool) {
    use crate::audit::{Action, Outcome, AUDIT_FILE};
    if rotated {
        for pos in approvals.values_mut() {
            pos.file = match pos.file.strip_prefix(&format!("{AUDIT_FILE}.")) {
                Some(n) => format!("{AUDIT_FILE}.{}", n.parse::<usize>().unwrap_or(0) + 1),
                None => format!("{AUDIT_FILE}.1"),
            };
        }
    }
    for (r, pos) in records.iter().zip(at) {
        if let (Action::Request, Outcome::Approved, Some(id)) = (r.action, r.outcome, r.grant_id) {
            approvals.insert(id, pos.clone());
        }
    }
}

/// Appends one batch and adds it to the history sum.
fn append(
    log: &mut AuditLog,
    history: &mut History,
    approvals: &mut Approvals,
    records: &[AuditRecord],
) -> Result<Appended, AuditError> {
    #[cfg(debug_assertions)]
    if records.len() > 1 && crate::fault::injected("audit-torn-batch") {
        // a crash in the middle of a batch: one record whole, the next torn
        tracing::error!("injected fault: audit-torn-batch");
        if let Err(e) = log.write_torn(records) {
            tracing::error!("{e}");
        }
        std::process::abort();
    }
    let result = log.append_at(records).map(|(rotated, at)| {
        note_approvals(approvals, records, &at, rotated);
        Appended {
            last_hash: log.last_hash().to_string(),
            rotated,
        }
    });
    match &result {
        Ok(_) => history.note(records, chrono::Utc::now() - super::USAGE_WINDOW),
        Err(_) => {
            crate::metrics::metrics().audit_write_failures.inc();
        }
    }
    result
}
