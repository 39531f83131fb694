//! Start-up, in the order that fails closed: claim the table (one jitd per network
//! namespace) and the state directory (one jitd per state_dir), put the lockdown in the
//! kernel when it is not there (a reboot), and only then read what was saved; restore
//! the grants that can be trusted, re-checked against the current policy, through the
//! same transaction path as every other change.

use std::collections::HashMap;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

use super::changes::{self, Verdict};
use super::commit::{self};
use super::tx::{KernelChange, Tx};
use super::writer::{Approvals, Writer};
use super::{describe_ports, grant_record, read_baseline, Daemon, PortUsage, State, USAGE_WINDOW};
use crate::audit::{self, Action, AuditLog, AuditRecord, Outcome};
use crate::config::Config;
use crate::domain::{GrantElement, GrantId, GrantKey};
use crate::firewall::kernel::{KernelGrants, KernelTable};
use crate::firewall::rules::{self, LockdownSpec};
use crate::firewall::{Firewall, FirewallError};
use crate::grants::{self, Grant, GrantBook};
use crate::store;

/// Why jitd could not start; it exits non-zero. Once the lockdown is in, it stays.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Another jitd already runs in this network namespace or on this state_dir.
    #[error("{0}")]
    AlreadyRunning(String),
    /// The lock file in the state directory could not be created or locked (a
    /// read-only file system, say).
    #[error("cannot lock {path}: {source}")]
    Lock {
        /// The lock file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Start-up failed after the lockdown was made sure of; `done` says what is in the
    /// kernel now.
    #[error("{error}; {done}")]
    AfterLock {
        /// What failed.
        error: Box<StartError>,
        /// What was done before: the lockdown put in, or the table left as it was.
        done: String,
    },
    /// The state directory cannot be trusted or the grants checkpoint not be used.
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// The audit log could not be opened or written.
    #[error(transparent)]
    Audit(#[from] audit::AuditError),
    /// The audit log could not be read back.
    #[error("cannot read the audit log: {0}")]
    AuditRead(std::io::Error),
    /// The lockdown could not be put in the kernel.
    #[error("cannot lock the ports: {0}")]
    Firewall(#[from] FirewallError),
    /// The audit writer's thread could not be started.
    #[error("cannot start the audit writer: {0}")]
    Writer(std::io::Error),
    /// The socket could not be created.
    #[error("cannot create the socket {path}: {source}")]
    Socket {
        /// The socket path.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A part of the running daemon failed; the lockdown stays in the kernel.
    #[error("{0}")]
    TaskFailed(String),
}

impl StartError {
    /// This error, saying what start-up did before it: put the lockdown in (`installed`:
    /// there was no table, a reboot) or left the table in the kernel as it was.
    fn after_lock(self, installed: bool, config: &Config) -> StartError {
        let done = if installed {
            format!(
                "the lockdown was put in the kernel before (table inet {}: {} locked) and stays",
                rules::TABLE,
                describe_ports(config)
            )
        } else {
            format!("table inet {} in the kernel was left as it was", rules::TABLE)
        };
        StartError::AfterLock {
            error: Box::new(self),
            done,
        }
    }
}

/// Held for as long as the daemon lives: the claim on the state directory.
pub(super) struct Claims {
    _state_dir: nix::fcntl::Flock<std::fs::File>,
}

impl<F: Firewall> Daemon<F> {
    /// Locks the ports, restores what can be trusted and starts the committer. Nothing
    /// is served yet. Returns the daemon and the committer's task.
    pub(super) async fn start(
        config: Config,
        firewall: F,
    ) -> Result<(Arc<Daemon<F>>, tokio::task::JoinHandle<()>), StartError> {
        let spec = LockdownSpec::from_config(&config);
        let kernel_table = lock_first(&firewall, &spec, &config).await?;
        let after_lock = |e: StartError| e.after_lock(kernel_table.is_none(), &config);
        store::prepare_state_dir(&config.state_dir).map_err(|e| after_lock(e.into()))?;
        let dir_claim = claim_state_dir(&config.state_dir).map_err(after_lock)?;
        let log = AuditLog::open(&config.state_dir, config.audit_rotation).map_err(|e| after_lock(e.into()))?;
        let audit_hash = log.last_hash().to_string();
        let Saved {
            snapshot: saved,
            history,
            approvals,
            refused,
        } = read_saved(&config.state_dir).map_err(after_lock)?;
        let first_id = (history.max_grant_id + 1).max(saved.next_id);
        let clock_sane = wall_clock_sane(history.newest);
        let clock_stepped = history.clock_stepped;
        let usage = usage_from(&history);
        let knocks = super::knock::Knocks::new(&history.nonces, refusal_interval());
        let fleet_seen = history.fleet.clone();
        let writer = Writer::start(log, config.state_dir.clone(), history, approvals).map_err(StartError::Writer)?;
        let intact = kernel_table
            .as_ref()
            .is_some_and(|t| saved.lockdown == format!("{spec:?}") && t.fingerprint() == saved.fingerprint);
        let live: std::collections::HashSet<_> = saved.grants.iter().map(|g| g.id).collect();
        let ledger = crate::grants::usage::Ledger::restored(&saved.admitted, |id| live.contains(&id));
        let (jobs, inbox) = mpsc::channel(4 * commit::MAX_BATCH);
        let (pings, ping_inbox) = mpsc::channel(4);
        let state = State {
            config,
            book: GrantBook::new(first_id),
            usage,
            baseline: Vec::new(),
            dirty: true,
            audit_hash,
            begun: 0,
            settled: 0,
            recent: Default::default(),
            refusals: refusal_limiter(),
            cuts: Default::default(),
            recorded: first_id.saturating_sub(1),
            pending: Default::default(),
            ledger,
            sampled_until: Instant::now(),
        };
        let daemon = Arc::new(Daemon {
            firewall,
            state: std::sync::Mutex::new(state),
            jobs,
            pings,
            writer,
            expiry_changed: Notify::new(),
            clock: super::clock::WallClock::new(!clock_sane),
            knocks,
            health: Default::default(),
            fleet_seen,
            claims: Claims { _state_dir: dir_claim },
        });
        let restore = Restore {
            refused,
            saved: saved.grants,
            pending: saved.pending,
            kernel: kernel_table,
            intact,
            clock_sane,
            clock_stepped,
        };
        let mut ping_inbox = ping_inbox;
        daemon.restore(restore, &mut ping_inbox).await?;
        let committer = commit::spawn(&daemon, inbox, ping_inbox);
        Ok((daemon, committer))
    }

    /// Books the saved grants that can be trusted and puts the kernel in line, as one
    /// transaction (records first, then one batch).
    async fn restore(
        &self,
        restore: Restore,
        pings: &mut mpsc::Receiver<tokio::sync::oneshot::Sender<()>>,
    ) -> Result<(), StartError> {
        let (records, kernel, restored) = self.plan_restore(restore);
        if !matches!(kernel, KernelChange::Replace(..)) {
            let baseline = read_baseline(&self.firewall).await?;
            self.lock().baseline = baseline;
        }
        let mut failed = AuditRecord::new(Utc::now(), None, "jitd", Action::Start, Outcome::Failed);
        failed.reason = Some("restoring the grants: ".into());
        let tx = Tx::kernel_only(records, kernel, failed);
        self.execute(tx, pings).await.map_err(|e| match e {
            super::tx::TxError::Audit(e) => StartError::Audit(e),
            super::tx::TxError::Firewall(e) => StartError::Firewall(e),
        })?;
        tracing::info!("{restored} grant(s) restored");
        Ok(())
    }

    /// Books the saved grants that can be trusted; returns the records, the kernel
    /// change and how many grants were restored.
    fn plan_restore(&self, restore: Restore) -> (Vec<AuditRecord>, KernelChange, usize) {
        let now = Instant::now();
        let wall = Utc::now();
        let kernel_grants = restore.kernel.as_ref().map(|t| t.grants().0);
        let mut records: Vec<AuditRecord> = restore.refused.into_iter().collect();
        let mut st = self.lock();
        credit_kernel(&mut st.ledger, restore.kernel.as_ref(), &restore.saved, wall);
        let config = st.config.clone();
        let mut callers = HashMap::new();
        for mut grant in restore.saved {
            let wall_trusted = wall_decides(&grant, restore.clock_sane, restore.clock_stepped);
            let Some(left) = time_left(&grant, kernel_grants.as_ref(), wall, wall_trusted) else {
                let (at, why) = match wall_trusted {
                    true => (
                        grant.expires_at.min(wall),
                        "ended while jitd was not running".to_string(),
                    ),
                    // its own end is in another frame than the clock now: date it now
                    false => (
                        wall,
                        format!(
                            "ended while jitd was not running ({})",
                            untrusted_why(restore.clock_sane)
                        ),
                    ),
                };
                let mut r = grant_record(&grant, at, None, "jitd", Action::Expire, Outcome::Expired);
                r.reason = Some(why);
                records.push(r);
                st.ledger.unwatched(grant.id);
                continue;
            };
            let caller = crate::domain::Caller::requester_of(&grant, &mut callers);
            match changes::recheck(&config, &grant, &caller, left) {
                Verdict::Keep(left) => st.book.restore(grant, now + left),
                Verdict::Clamp(allowed, why) => {
                    grant.expires_at = grants::shortened(&grant, left, allowed);
                    let left = allowed;
                    let mut r = grant_record(&grant, wall, None, "jitd", Action::Start, Outcome::Done);
                    r.reason = Some(why);
                    records.push(r);
                    st.book.restore(grant, now + left);
                }
                Verdict::End(why) => {
                    let mut r = grant_record(&grant, wall, None, "jitd", Action::Revoke, Outcome::Revoked);
                    r.reason = Some(why);
                    records.push(r);
                }
            }
        }
        records.extend(super::approvals::restore_pending(
            &mut st,
            restore.pending,
            restore.clock_sane,
            now,
            wall,
        ));
        let elements = grants::timed(&st.book.elements(now), now);
        let kernel = restore_change(restore.kernel.as_ref(), restore.intact, elements, &config);
        let mut start = start_record(&config, st.book.len(), restore.clock_sane, wall);
        if !st.pending.is_empty() {
            let waiting = format!("; {} request(s) still wait for approval", st.pending.len());
            start.reason = start.reason.map(|r| r + &waiting);
        }
        records.push(start);
        (records, kernel, st.book.len())
    }
}

/// Credits what the counters of a table that outlived jitd counted since the
/// checkpoint's ledger to the saved grants covering each element; after a reboot (no
/// table) the elements are added afresh and count from zero.
fn credit_kernel(
    ledger: &mut crate::grants::usage::Ledger,
    kernel: Option<&KernelTable>,
    saved: &[Grant],
    wall: DateTime<Utc>,
) {
    match kernel {
        Some(table) => {
            let credited = ledger.observe_all(&table.counts(), saved);
            ledger.counted(wall);
            if credited > 0 {
                tracing::info!(
                    "{credited} connection(s) the kernel counted since the last checkpoint credited to the grants"
                );
            }
        }
        None => ledger.all_fresh(),
    }
}

/// The kernel change that brings the restored grants in: only the grant elements when
/// the lockdown in the kernel is intact (a crash or restart under the same policy), a
/// whole new table when it differs, only the elements after a fresh lockdown.
fn restore_change(
    kernel: Option<&KernelTable>,
    intact: bool,
    elements: Vec<GrantElement>,
    config: &Config,
) -> KernelChange {
    match (kernel, intact) {
        // locked a moment ago, empty: only the grants go in
        (None, _) if elements.is_empty() => KernelChange::None,
        (None, _) => KernelChange::Grants {
            remove: Vec::new(),
            add: elements,
            read: Vec::new(),
        },
        (Some(table), true) => {
            tracing::info!("the lockdown in the kernel is intact; kept it and brought only the grant elements in line");
            // The kernel still enforces this very lockdown with its own timers (a
            // crash or restart, same policy): bring only the grant elements in line.
            let held = table.grants().0;
            let wanted: HashMap<GrantKey, Duration> = elements.iter().map(|e| (e.key, e.timeout)).collect();
            // an element that lasts longer than its grants now may is set again
            let stale = |k: &GrantKey| {
                wanted
                    .get(k)
                    .is_none_or(|want| held.get(k).is_some_and(|h| *h > *want + super::tx::KERNEL_ROUNDING))
            };
            let remove: Vec<GrantKey> = held.keys().filter(|k| stale(k)).copied().collect();
            let add = elements
                .iter()
                .filter(|e| !held.contains_key(&e.key) || stale(&e.key))
                .copied()
                .collect();
            KernelChange::Grants {
                remove,
                add,
                read: Vec::new(),
            }
        }
        _ => KernelChange::Replace(LockdownSpec::from_config(config), elements),
    }
}

/// The `start` record: what is locked, how many grants came back, and whether the wall
/// clock could be trusted.
fn start_record(config: &Config, restored: usize, clock_sane: bool, wall: DateTime<Utc>) -> AuditRecord {
    let mut start = AuditRecord::new(wall, None, "jitd", Action::Start, Outcome::Done);
    start.ports = config.ports.iter().map(|p| p.port).collect();
    start.reason = Some(format!(
        "locked {}; {} grant(s) restored{}",
        describe_ports(config),
        restored,
        if clock_sane {
            ""
        } else {
            "; the wall clock is behind the audit log, nothing restored without the kernel's timers"
        }
    ));
    start
}

/// Reads jitd's table from the kernel; when there is none (a reboot, a first start),
/// locks the ports before anything on disk is trusted.
async fn lock_first<F: Firewall>(
    firewall: &F,
    spec: &LockdownSpec,
    config: &Config,
) -> Result<Option<KernelTable>, StartError> {
    let kernel_table = firewall.read_table(true).await?;
    if kernel_table.is_none() {
        firewall.apply(&rules::replace_table(spec, &[])).await?;
        tracing::info!(
            "no lockdown in the kernel: locked {} before reading any state",
            describe_ports(config)
        );
    }
    Ok(kernel_table)
}

/// What start-up restores from.
struct Saved {
    /// The checkpoint, brought up to date with the journal after it.
    snapshot: store::Snapshot,
    /// The sum of the whole history.
    history: store::History,
    /// Where the live grants' approval records are.
    approvals: Approvals,
    /// The record saying the checkpoint disagreed with the audit log and was refused.
    refused: Option<AuditRecord>,
}

/// The saved grants: the checkpoint with the journal since it replayed onto it (whole
/// transactions only), and the history summary. Every grant of the checkpoint is
/// checked against its approval record in the audit log; when one is not allowed by
/// it (or cannot be checked), the checkpoint is refused, moved aside, and the grants
/// are rebuilt from the audit log alone.
fn read_saved(state_dir: &Path) -> Result<Saved, StartError> {
    let mut saved = load_checkpoint(state_dir)?;
    let (journal, history, checked) = read_journal(state_dir, &saved)?;
    let approvals = match checked {
        Ok(approvals) => approvals,
        Err(why) => return rebuild(state_dir, &why),
    };
    let left_out = store::replay(&mut saved, &journal.records);
    if left_out > 0 {
        tracing::warn!(
            "{left_out} audit record(s) of transaction(s) that did not finish were not replayed (never answered)"
        );
    }
    let mut approvals = approvals;
    note_approvals(&mut approvals, &journal);
    approvals.retain(|id, _| saved.grants.iter().any(|g| g.id == *id));
    Ok(Saved {
        snapshot: saved,
        history,
        approvals,
        refused: None,
    })
}

/// Records read from the journal, each with where it ends.
#[derive(Default)]
struct Read {
    records: Vec<AuditRecord>,
    at: Vec<audit::Position>,
}

/// Adds where the approvals among `read` are.
fn note_approvals(approvals: &mut Approvals, read: &Read) {
    for (r, at) in read.records.iter().zip(&read.at) {
        if let (Action::Request, Outcome::Approved, Some(id)) = (r.action, r.outcome, r.grant_id) {
            approvals.insert(id, at.clone());
        }
    }
}

/// Refuses the checkpoint (`why`): moves it aside and rebuilds the grants from the
/// whole audit log, with a record that says so.
fn rebuild(state_dir: &Path, why: &str) -> Result<Saved, StartError> {
    let path = state_dir.join(store::GRANTS_FILE);
    let aside = state_dir.join(format!(
        "{}.refused-{}",
        store::GRANTS_FILE,
        Utc::now().format("%Y%m%dT%H%M%SZ")
    ));
    let moved = match std::fs::rename(&path, &aside) {
        Ok(()) => format!(
            "moved it to {}",
            aside.file_name().unwrap_or_default().to_string_lossy()
        ),
        Err(e) => format!("could not move it aside ({e})"),
    };
    let text = format!(
        "the grants checkpoint {} disagrees with the audit log ({why}); {moved} and rebuilt the grants from the audit log",
        store::GRANTS_FILE
    );
    tracing::error!("{text}");
    let all = read_whole(state_dir)?;
    let mut snapshot = store::Snapshot::default();
    store::replay(&mut snapshot, &all.records);
    let mut history = store::History::default();
    history.note(&all.records, Utc::now() - USAGE_WINDOW);
    let mut approvals = Approvals::new();
    note_approvals(&mut approvals, &all);
    approvals.retain(|id, _| snapshot.grants.iter().any(|g| g.id == *id));
    let mut record = AuditRecord::new(Utc::now(), None, "jitd", Action::Recover, Outcome::Done);
    record.reason = Some(text);
    Ok(Saved {
        snapshot,
        history,
        approvals,
        refused: Some(record),
    })
}

/// Every record of every audit file, with where each ends.
fn read_whole(dir: &Path) -> Result<Read, StartError> {
    let mut read = Read::default();
    for file in audit::files(dir) {
        let (records, problems, _) = audit::read_positioned(&file, 0).map_err(StartError::AuditRead)?;
        for p in problems {
            tracing::warn!("{p}");
        }
        for (r, at) in records {
            read.records.push(r);
            read.at.push(at);
        }
    }
    Ok(read)
}

/// What start-up found of a checkpoint grant's approval record.
enum Approval {
    /// The record, and where it ends.
    Found(Box<AuditRecord>, audit::Position),
    /// Not where the checkpoint says nor in any other audit file, or the checkpoint
    /// names no place for it; the words say which.
    Missing(String),
}

/// Why `id`'s approval record was not found where the checkpoint says. Rotation never
/// deletes a live grant's approval, so a file that is not there was deleted by someone
/// else (or the checkpoint edited): either way nothing proves the grant any more.
fn missing_approval(dir: &Path, saved: &store::Snapshot, id: GrantId) -> Approval {
    Approval::Missing(match saved.approvals.get(&id) {
        Some(at) if !dir.join(&at.file).exists() => format!(" (the checkpoint names {}, which is not there)", at.file),
        Some(at) => format!(" (the checkpoint names byte {} of {})", at.offset, at.file),
        None => " (the checkpoint names no place for it)".into(),
    })
}

/// Checks each grant of the checkpoint against its approval record (`approval` finds
/// it): where the live grants' approvals are now, or why the checkpoint cannot be
/// trusted. A grant whose approval record is not found is never taken on the
/// checkpoint's word.
fn check_checkpoint(
    saved: &store::Snapshot,
    mut approval: impl FnMut(GrantId) -> std::io::Result<Approval>,
) -> Result<Approvals, String> {
    let mut approvals = Approvals::new();
    for grant in &saved.grants {
        let found =
            approval(grant.id).map_err(|e| format!("grant {}: cannot read its approval record: {e}", grant.id))?;
        match found {
            Approval::Found(record, at) => {
                store::vouches(&record, grant)?;
                approvals.insert(grant.id, at);
            }
            Approval::Missing(why) => return Err(format!("grant {}: its approval record is not found{why}", grant.id)),
        }
    }
    Ok(approvals)
}

/// The records after the oldest of the checkpoint's approvals (`approvals`, where they
/// are now) up to and including the checkpoint's own place `to`: what [`store::ended_in`]
/// checks the checkpoint's grants against (a grant revoked before the checkpoint was
/// taken, written back into it or hidden by moving its place past the revocation).
fn covered_since_approvals(
    dir: &Path,
    approvals: &Approvals,
    to: &audit::Position,
) -> Result<Vec<AuditRecord>, String> {
    let files: HashMap<String, usize> = audit::files(dir)
        .iter()
        .enumerate()
        .map(|(i, p)| (p.file_name().unwrap_or_default().to_string_lossy().into_owned(), i))
        .collect();
    let oldest = approvals
        .values()
        .min_by_key(|at| (files.get(&at.file).copied().unwrap_or(usize::MAX), at.offset));
    let Some(from) = oldest.filter(|from| from.hash != to.hash) else {
        return Ok(Vec::new());
    };
    let since = audit::journal::read_since(dir, from)
        .map_err(|e| format!("cannot read the audit journal from the oldest approval on: {e}"))?
        .ok_or_else(|| {
            format!(
                "the approval record ending at byte {} of {} is gone",
                from.offset, from.file
            )
        })?;
    let end = since
        .at
        .iter()
        .position(|at| at.hash == to.hash && at.offset == to.offset)
        .ok_or("the checkpoint's place in the audit log comes before one of its grants' approvals")?;
    let mut records = since.records;
    records.truncate(end + 1);
    Ok(records)
}

/// The refusal limiter: 20 refusals per uid (or signing key) per [`refusal_interval`] in full.
fn refusal_limiter() -> crate::audit::limit::RefusalLimiter<crate::audit::limit::Refuser> {
    crate::audit::limit::RefusalLimiter::new(crate::audit::limit::Limits {
        interval: refusal_interval(),
        ..Default::default()
    })
}

/// A minute; debug builds take it from `JITD_REFUSAL_INTERVAL_MS`, so tests need not
/// wait a minute.
fn refusal_interval() -> chrono::TimeDelta {
    let default = crate::audit::limit::Limits::default().interval;
    let interval = crate::fault::period(
        "JITD_REFUSAL_INTERVAL_MS",
        default.to_std().unwrap_or(Duration::from_secs(60)),
    );
    chrono::TimeDelta::from_std(interval).unwrap_or(default)
}

/// What start-up found to restore from.
struct Restore {
    /// The record saying the checkpoint was refused, when it was.
    refused: Option<AuditRecord>,
    saved: Vec<Grant>,
    /// Requests that waited for approval.
    pending: Vec<crate::approval::PendingRequest>,
    kernel: Option<KernelTable>,
    /// The kernel's table is exactly the lockdown the grants were saved under.
    intact: bool,
    /// The wall clock is not behind the newest audit record.
    clock_sane: bool,
    /// When the wall clock last stepped, by the audit log.
    clock_stepped: Option<DateTime<Utc>>,
}

/// Whether the wall clock may say how long `grant` has left: only when it is not behind
/// the audit log and has not stepped (either way: ahead is as suspect as behind) since
/// the grant was approved.
fn wall_decides(grant: &Grant, clock_sane: bool, clock_stepped: Option<DateTime<Utc>>) -> bool {
    clock_sane && clock_stepped.is_none_or(|at| at < grant.granted_at)
}

/// Why the wall clock could not say how long a grant had left.
fn untrusted_why(clock_sane: bool) -> &'static str {
    if clock_sane {
        "the wall clock stepped since it was approved and the kernel held no timer for it"
    } else {
        "the wall clock is behind the audit log and the kernel held no timer for it"
    }
}

/// How long a saved grant still has. With jitd's table in the kernel (a crash or a
/// restart), the kernel's own timers say; after a reboot, the wall clock does, and only
/// when it may ([`wall_decides`]: `wall_trusted`). Never past the grant's own
/// `expires_at` when the wall clock may say so (another grant's element may cover its
/// address for longer), and never more than it was approved for (the policy's limits
/// are [`changes::recheck`]'s business). `None`: it has ended.
fn time_left(
    grant: &Grant,
    kernel: Option<&KernelGrants>,
    wall: DateTime<Utc>,
    wall_trusted: bool,
) -> Option<Duration> {
    let by_kernel = kernel.map(|held| {
        grant
            .keys()
            .iter()
            .map(|k| {
                if grant.source.prefix_len() == grant.source.max_prefix_len() {
                    return held.get(k).copied();
                }
                // a prefix may be carried by several pieces (overlapping grants)
                held.iter()
                    .filter(|(h, _)| h.transport == k.transport && h.port == k.port && grant.source.contains(&h.source))
                    .map(|(_, left)| *left)
                    .min()
            })
            .min()
            .flatten()
    });
    // A grant past its own end has ended, whatever timer the kernel holds for its
    // address (another grant's element may cover it for longer).
    let by_wall = match wall_trusted {
        true => Some((grant.expires_at - wall).to_std().ok()?),
        false => None,
    };
    let left = match by_kernel {
        Some(kernel_left) => kernel_left?.min(by_wall.unwrap_or(Duration::MAX)),
        None => by_wall?,
    };
    let left = left.min(grant.approved_duration());
    (!left.is_zero()).then_some(left)
}

/// Whether the wall clock is at or after the newest audit record (a clock that went
/// backwards cannot be trusted to say how long a grant has left).
fn wall_clock_sane(newest: Option<DateTime<Utc>>) -> bool {
    let Some(newest) = newest else {
        return true;
    };
    let now = Utc::now();
    if now < newest {
        tracing::error!(
            "the wall clock ({now}) is behind the newest audit record ({newest}): grants are restored only where the kernel still times them"
        );
        return false;
    }
    true
}

/// The grants checkpoint, or an empty one when it cannot be read: a damaged file is
/// moved aside and the grants are rebuilt from the audit journal alone. A symbolic link
/// in its place was planted by someone: jitd refuses to go on.
fn load_checkpoint(dir: &Path) -> Result<store::Snapshot, StartError> {
    let path = dir.join(store::GRANTS_FILE);
    match store::load(dir) {
        Ok(s) => Ok(s),
        Err(e) if std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink()) => Err(e.into()),
        Err(e) => {
            let aside = dir.join(format!(
                "{}.damaged-{}",
                store::GRANTS_FILE,
                Utc::now().format("%Y%m%dT%H%M%SZ")
            ));
            let moved = std::fs::rename(dir.join(store::GRANTS_FILE), &aside);
            tracing::error!(
                "{e}; {}rebuilding the grants from the audit log",
                match moved {
                    Ok(()) => format!("moved it to {}; ", aside.display()),
                    Err(m) => format!("could not move it aside ({m}); "),
                }
            );
            Ok(store::Snapshot::default())
        }
    }
}

/// One jitd per network namespace: an abstract Unix socket is per namespace and goes
/// away with the process that holds it.
pub(super) fn claim_table() -> Result<UnixListener, StartError> {
    use std::os::linux::net::SocketAddrExt;
    let name = format!("jitd/table/inet/{}", rules::TABLE);
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
        .map_err(|e| StartError::AlreadyRunning(format!("cannot claim table inet {}: {e}", rules::TABLE)))?;
    UnixListener::bind_addr(&addr).map_err(|e| {
        StartError::AlreadyRunning(if e.kind() == std::io::ErrorKind::AddrInUse {
            format!(
                "another jitd already owns table inet {} in this network namespace; refusing to start a second one",
                rules::TABLE
            )
        } else {
            format!("cannot claim table inet {}: {e}", rules::TABLE)
        })
    })
}

/// One jitd per state_dir: an exclusive lock on `state_dir/jitd.lock`.
fn claim_state_dir(dir: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, StartError> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join("jitd.lock");
    let fail = |source| StartError::Lock {
        path: path.display().to_string(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(&path)
        .map_err(fail)?;
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        // held (the lock lives as long as the returned value) until jitd exits
        Ok(locked) => Ok(locked),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Err(StartError::AlreadyRunning(format!(
            "another jitd already uses state_dir {} (it holds {}); refusing to start a second one",
            dir.display(),
            path.display()
        ))),
        Err((_, e)) => Err(fail(e.into())),
    }
}

/// Recent use of each port, for `status`, from the history's per-minute counts.
fn usage_from(history: &store::History) -> HashMap<u16, PortUsage> {
    history
        .usage
        .iter()
        .map(|(port, u)| {
            let approvals = u
                .approvals
                .iter()
                .flat_map(|(minute, n)| {
                    let at = DateTime::from_timestamp(minute * 60, 0).unwrap_or_default();
                    std::iter::repeat_n(at, *n as usize)
                })
                .collect();
            let usage = PortUsage {
                approvals,
                last_access: u.last_access,
                last_user: u.last_user.clone(),
            };
            (*port, usage)
        })
        .collect()
}

/// The journal after the checkpoint `saved`, the sum of the whole history, and the
/// checkpoint's grants checked against their approval records. Reads only from the
/// checkpoint's position when it is found in the journal (and each approval record
/// where the checkpoint says it is); otherwise (an older checkpoint, none, or a
/// position rotated away or changed) the whole history.
fn read_journal(
    dir: &Path,
    saved: &store::Snapshot,
) -> Result<(Read, store::History, Result<Approvals, String>), StartError> {
    let window = Utc::now() - USAGE_WINDOW;
    if let Some(pos) = &saved.position {
        match audit::journal::read_since(dir, pos) {
            Ok(Some(since)) => {
                for p in &since.problems {
                    tracing::warn!("{p}");
                }
                tracing::info!(
                    "read {} byte(s) of the audit journal after the checkpoint ({} record(s) since {} at byte {})",
                    since.bytes,
                    since.records.len(),
                    pos.file,
                    pos.offset
                );
                let mut history = saved.history.clone();
                history.note(&since.records, window);
                let records = audit::journal::Records::open(dir).map_err(StartError::AuditRead)?;
                let checked = check_checkpoint(saved, |id| {
                    let Some(at) = saved.approvals.get(&id) else {
                        return Ok(missing_approval(dir, saved, id));
                    };
                    Ok(match records.at(at)? {
                        Some((r, here)) => Approval::Found(Box::new(r), here),
                        None => missing_approval(dir, saved, id),
                    })
                })
                .and_then(|approvals| {
                    let covered = covered_since_approvals(dir, &approvals, pos)?;
                    store::ended_in(&saved.grants, &covered).map_or(Ok(approvals), Err)
                });
                let read = Read {
                    records: since.records,
                    at: since.at,
                };
                return Ok((read, history, checked));
            }
            Ok(None) => tracing::warn!(
                "the checkpoint's place in the audit journal (record {} ending at byte {} of {}) is not there (rotated away or changed): reading the whole history",
                pos.hash,
                pos.offset,
                pos.file
            ),
            Err(e) => tracing::warn!("cannot read the audit journal after the checkpoint: {e}; reading the whole history"),
        }
    }
    let all = read_whole(dir)?;
    tracing::info!("read the whole audit history: {} record(s)", all.records.len());
    let mut history = store::History::default();
    history.note(&all.records, window);
    let approved: HashMap<GrantId, usize> = all
        .records
        .iter()
        .enumerate()
        .filter(|(_, r)| (r.action, r.outcome) == (Action::Request, Outcome::Approved))
        .filter_map(|(i, r)| Some((r.grant_id?, i)))
        .collect();
    let skip = all.records.len() - store::journal(saved, &all.records).len();
    let checked = check_checkpoint(saved, |id| {
        Ok(match approved.get(&id) {
            Some(i) => Approval::Found(Box::new(all.records[*i].clone()), all.at[*i].clone()),
            None => missing_approval(dir, saved, id),
        })
    })
    .and_then(|approvals| {
        // the records the checkpoint covers, after the oldest of its grants' approvals
        let oldest = saved.grants.iter().filter_map(|g| approved.get(&g.id)).min();
        let covered = oldest.map_or(&[][..], |i| all.records.get(i + 1..skip).unwrap_or_default());
        store::ended_in(&saved.grants, covered).map_or(Ok(approvals), Err)
    });
    let read = Read {
        records: all.records[skip..].to_vec(),
        at: all.at[skip..].to_vec(),
    };
    Ok((read, history, checked))
}

/// Checks `lockdown.interfaces` against the host's interfaces over rtnetlink.
pub async fn check_interfaces(config: &Config) -> anyhow::Result<()> {
    if config.lockdown.interfaces.is_empty() {
        return Ok(());
    }
    let existing = crate::netif::interface_names().await?;
    let problems = crate::netif::unknown_interfaces(&config.lockdown.interfaces, &existing);
    if problems.is_empty() {
        Ok(())
    } else {
        Err(crate::config::ConfigError {
            path: config.path.clone(),
            problems,
        }
        .into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(granted: DateTime<Utc>, secs: i64) -> Grant {
        Grant {
            id: 2,
            source: crate::domain::parse_prefix("192.0.2.7").unwrap(),
            port: 22,
            protocol: crate::domain::Protocol::Tcp,
            requester: "bob".into(),
            requester_uid: 1001,
            principals: Vec::new(),
            fleet: None,
            justification: None,
            granted_at: granted,
            expires_at: granted + chrono::Duration::seconds(secs),
        }
    }

    #[test]
    fn a_grant_never_outlives_its_own_end_whatever_timer_the_kernel_holds() {
        let wall = Utc::now();
        // a 4 s grant approved 5 s ago; the kernel holds 55 s for the same address (the
        // element of a longer grant it was to replace)
        let short = grant(wall - chrono::Duration::seconds(5), 4);
        let held: KernelGrants = short.keys().into_iter().map(|k| (k, Duration::from_secs(55))).collect();
        assert_eq!(time_left(&short, Some(&held), wall, true), None);
        // still running: the smaller of the kernel's timer and its own end
        let running = grant(wall - chrono::Duration::seconds(1), 4);
        let left = time_left(&running, Some(&held), wall, true).unwrap();
        assert!(left <= Duration::from_secs(3), "{left:?}");
        // after a reboot (no kernel timers), the wall clock alone
        let left = time_left(&running, None, wall, true).unwrap();
        assert!(left <= Duration::from_secs(3), "{left:?}");
    }

    #[test]
    fn a_wall_clock_that_stepped_neither_ends_nor_stretches_what_the_kernel_times() {
        let wall = Utc::now();
        // a 120 s grant approved 3 s ago by a clock that then stepped an hour ahead
        let before = wall - chrono::Duration::hours(1) - chrono::Duration::seconds(3);
        let g = grant(before, 120);
        assert!(!wall_decides(&g, true, Some(wall - chrono::Duration::seconds(60))));
        assert!(wall_decides(&g, true, Some(before - chrono::Duration::seconds(1))));
        assert!(!wall_decides(&g, false, None), "a clock behind the log never decides");
        let held: KernelGrants = g.keys().into_iter().map(|k| (k, Duration::from_secs(117))).collect();
        assert_eq!(time_left(&g, Some(&held), wall, false), Some(Duration::from_secs(117)));
        // nor more than approved, whatever the kernel holds
        let long: KernelGrants = g.keys().into_iter().map(|k| (k, Duration::from_secs(900))).collect();
        assert_eq!(time_left(&g, Some(&long), wall, false), Some(Duration::from_secs(120)));
        // the table is there but holds nothing for it: it has ended
        assert_eq!(time_left(&g, Some(&KernelGrants::default()), wall, false), None);
        // no kernel and a clock that cannot decide: nothing is restored
        assert_eq!(time_left(&g, None, wall, false), None);
    }

    #[test]
    fn usage_comes_back_from_the_history_sum() {
        let mut history = store::History::default();
        let mut r = AuditRecord::new(Utc::now(), Some(1001), "bob", Action::Request, Outcome::Approved);
        r.ports = vec![22];
        history.note(&[r.clone(), r], Utc::now() - USAGE_WINDOW);
        let usage = usage_from(&history);
        assert_eq!(usage[&22].approvals.len(), 2);
        assert_eq!(usage[&22].last_user.as_deref(), Some("bob"));
    }
}
