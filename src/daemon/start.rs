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

use super::commit::{self, KernelChange, Tx};
use super::writer::Writer;
use super::{changes, describe_ports, grant_record, read_baseline, Daemon, PortUsage, State, USAGE_WINDOW};
use crate::audit::{self, Action, AuditLog, AuditRecord, Outcome};
use crate::config::Config;
use crate::domain::GrantKey;
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
    /// The state directory could not be created or used.
    #[error("cannot create state_dir {path}: {source}")]
    StateDir {
        /// The directory.
        path: String,
        /// Why.
        source: std::io::Error,
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

/// Held for as long as the daemon lives: the claim on the state directory.
pub(super) struct Claims {
    _state_dir: std::fs::File,
}

impl<F: Firewall> Daemon<F> {
    /// Locks the ports, restores what can be trusted and starts the committer. Nothing
    /// is served yet. Returns the daemon and the committer's task.
    pub(super) async fn start(
        config: Config,
        firewall: F,
    ) -> Result<(Arc<Daemon<F>>, tokio::task::JoinHandle<()>), StartError> {
        let spec = LockdownSpec::from_config(&config);
        let kernel_table = firewall.read_table(true).await?;
        if kernel_table.is_none() {
            // A reboot (or a first start): lock before trusting anything on disk.
            firewall.apply(&rules::replace_table(&spec, &[])).await?;
            tracing::info!(
                "no lockdown in the kernel: locked {} before reading any state",
                describe_ports(&config)
            );
        }
        store::prepare_state_dir(&config.state_dir)?;
        let dir_claim = claim_state_dir(&config.state_dir)?;
        let log = AuditLog::open(&config.state_dir, config.audit_rotation)?;
        let audit_hash = log.last_hash().to_string();
        let (history, problems) = audit::read_all(&config.state_dir).map_err(StartError::AuditRead)?;
        for p in problems {
            tracing::warn!("{p}");
        }
        let mut saved = load_checkpoint(&config.state_dir)?;
        let journal = store::journal(&saved, &history);
        store::replay(&mut saved, journal);
        let first_id = history
            .iter()
            .filter_map(|r| r.grant_id)
            .max()
            .map_or(1, |m| m + 1)
            .max(saved.next_id);
        let clock_sane = wall_clock_sane(&history);
        let usage = usage_from_history(&history);
        drop(history);
        let writer = Writer::start(log, config.state_dir.clone()).map_err(|source| StartError::StateDir {
            path: config.state_dir.display().to_string(),
            source,
        })?;
        let intact = kernel_table
            .as_ref()
            .is_some_and(|t| saved.lockdown == format!("{spec:?}") && t.fingerprint() == saved.fingerprint);
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
            refusals: Default::default(),
        };
        let daemon = Arc::new(Daemon {
            firewall,
            state: std::sync::Mutex::new(state),
            jobs,
            pings,
            writer,
            expiry_changed: Notify::new(),
            claims: Claims { _state_dir: dir_claim },
        });
        let restore = Restore {
            saved: saved.grants,
            kernel: kernel_table,
            intact,
            clock_sane,
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
        let tx = Tx {
            records,
            kernel,
            undo: Default::default(),
            failed: vec![failed],
            touched: Default::default(),
        };
        self.execute(tx, pings).await.map_err(|e| match e {
            commit::TxError::Audit(e) => StartError::Audit(e),
            commit::TxError::Firewall(e) => StartError::Firewall(e),
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
        let mut records = Vec::new();
        let mut st = self.lock();
        let config = st.config.clone();
        let mut callers = HashMap::new();
        for grant in restore.saved {
            let left = time_left(&grant, kernel_grants.as_ref(), &config, wall, restore.clock_sane);
            let verdict = left
                .ok_or("ended while jitd was not running".to_string())
                .and_then(|left| {
                    let caller = callers
                        .entry(grant.requester_uid)
                        .or_insert_with(|| crate::domain::Caller::resolve_uid(grant.requester_uid));
                    changes::still_allowed(&config, &grant, caller).map(|()| left)
                });
            match verdict {
                Ok(left) => {
                    st.book.restore(grant, now + left);
                }
                Err(why) => {
                    let (action, outcome) = if why.starts_with("ended") {
                        (Action::Expire, Outcome::Expired)
                    } else {
                        (Action::Revoke, Outcome::Revoked)
                    };
                    let end = if why.starts_with("ended") {
                        grant.expires_at.min(wall)
                    } else {
                        wall
                    };
                    let mut r = grant_record(&grant, end, None, "jitd", action, outcome);
                    r.reason = Some(why);
                    records.push(r);
                }
            }
        }
        let elements = grants::timed(&st.book.elements(now), now);
        let kernel = match (&restore.kernel, restore.intact) {
            // locked a moment ago, empty: only the grants go in
            (None, _) if elements.is_empty() => KernelChange::None,
            (None, _) => KernelChange::Grants {
                remove: Vec::new(),
                add: elements,
            },
            (Some(table), true) => {
                tracing::info!(
                    "the lockdown in the kernel is intact; kept it and brought only the grant elements in line"
                );
                // The kernel still enforces this very lockdown with its own timers (a
                // crash or restart, same policy): bring only the grant elements in line.
                let held = table.grants().0;
                let wanted: HashMap<GrantKey, Duration> = elements.iter().map(|e| (e.key, e.timeout)).collect();
                // an element that lasts longer than its grants now may is set again
                let stale = |k: &GrantKey| {
                    wanted
                        .get(k)
                        .is_none_or(|want| held.get(k).is_some_and(|h| *h > *want + commit::KERNEL_ROUNDING))
                };
                let remove: Vec<GrantKey> = held.keys().filter(|k| stale(k)).copied().collect();
                let add = elements
                    .iter()
                    .filter(|e| !held.contains_key(&e.key) || stale(&e.key))
                    .copied()
                    .collect();
                KernelChange::Grants { remove, add }
            }
            _ => KernelChange::Replace(LockdownSpec::from_config(&config), elements),
        };
        let mut start = AuditRecord::new(wall, None, "jitd", Action::Start, Outcome::Done);
        start.ports = config.ports.iter().map(|p| p.port).collect();
        start.reason = Some(format!(
            "locked {}; {} grant(s) restored{}",
            describe_ports(&config),
            st.book.len(),
            if restore.clock_sane {
                ""
            } else {
                "; the wall clock is behind the audit log, nothing restored without the kernel's timers"
            }
        ));
        records.push(start);
        (records, kernel, st.book.len())
    }
}

/// What start-up found to restore from.
struct Restore {
    saved: Vec<Grant>,
    kernel: Option<KernelTable>,
    /// The kernel's table is exactly the lockdown the grants were saved under.
    intact: bool,
    /// The wall clock is not behind the newest audit record.
    clock_sane: bool,
}

/// How long a saved grant still has. With jitd's table in the kernel (a crash or a
/// restart), the kernel's own timers say; after a reboot, the wall clock does, and only
/// when it is not behind the audit log. Never more than the grant was approved for, nor
/// than its port now allows. `None`: it has ended.
fn time_left(
    grant: &Grant,
    kernel: Option<&KernelGrants>,
    config: &Config,
    wall: DateTime<Utc>,
    clock_sane: bool,
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
    let by_wall = clock_sane.then(|| (grant.expires_at - wall).to_std().ok()).flatten();
    let left = match by_kernel {
        Some(kernel_left) => kernel_left?.min(by_wall.unwrap_or(Duration::MAX)),
        None => by_wall?,
    };
    let max = config
        .port_policies(grant.port)
        .map(|p| p.max_duration)
        .max()
        .unwrap_or_default();
    let left = left.min(grant.approved_duration()).min(max);
    (!left.is_zero()).then_some(left)
}

/// Whether the wall clock is at or after the newest audit record (a clock that went
/// backwards cannot be trusted to say how long a grant has left).
fn wall_clock_sane(history: &[AuditRecord]) -> bool {
    let Some(newest) = history.iter().map(|r| r.time).max() else {
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
fn claim_state_dir(dir: &Path) -> Result<std::fs::File, StartError> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join("jitd.lock");
    let fail = |source| StartError::StateDir {
        path: dir.display().to_string(),
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
        Ok(locked) => Ok(locked.unlock().map_err(|(_, e)| fail(e.into()))?),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Err(StartError::AlreadyRunning(format!(
            "another jitd already uses state_dir {} (it holds {}); refusing to start a second one",
            dir.display(),
            path.display()
        ))),
        Err((_, e)) => Err(fail(e.into())),
    }
}

fn usage_from_history(history: &[AuditRecord]) -> HashMap<u16, PortUsage> {
    let since = Utc::now() - USAGE_WINDOW;
    let mut usage: HashMap<u16, PortUsage> = HashMap::new();
    for r in history
        .iter()
        .filter(|r| r.action == Action::Request && r.outcome == Outcome::Approved)
    {
        for port in &r.ports {
            let u = usage.entry(*port).or_default();
            if r.time >= since {
                u.approvals.push_back(r.time);
            }
            u.last_access = Some(r.time);
            u.last_user = Some(r.actor.clone());
        }
    }
    usage
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
