//! Wires jitd together: locks the ports at start, answers socket requests, and tells
//! systemd how it is doing. Access requests are committed in groups by [`requests`];
//! expiry, drift repair, reloads and checkpoints live in [`upkeep`].

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{Mutex, Notify};
use tokio::time::Instant;

use crate::api::protocol::{
    AuditQuery, AuditReply, GrantInfo, PortStatus, ReloadReply, Reply, Request, RevokeRequest, RevokedReply,
    StatusReply,
};
use crate::api::server::{self, Handler, Peer};
use crate::audit::{self, Action, AuditLog, AuditRecord, Outcome};
use crate::config::{format_prefix, parse_prefix, AllowedSources, Config, OnStop};
use crate::firewall::kernel::{self, Fingerprint, KernelGrants};
use crate::firewall::rules::{self, GrantElement, GrantKey, LockdownSpec};
use crate::firewall::{Firewall, FirewallError};
use crate::grants::{Grant, GrantBook, GrantId};
use crate::identity::Caller;
use crate::policy::{self, Denial, Role};
use crate::store;

mod requests;
mod upkeep;

/// How far back `status` counts approved requests per port.
const USAGE_WINDOW: chrono::TimeDelta = chrono::TimeDelta::days(7);

/// Why jitd could not start; it exits non-zero and the ports are as they were.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The state directory could not be created.
    #[error("cannot create state_dir {path}: {source}")]
    StateDir {
        /// The directory.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The audit log could not be opened or written.
    #[error(transparent)]
    Audit(#[from] audit::AuditError),
    /// The audit log could not be read back.
    #[error("cannot read the audit log: {0}")]
    AuditRead(std::io::Error),
    /// The lockdown could not be put in the kernel.
    #[error("cannot lock the ports: {0}")]
    Firewall(#[from] FirewallError),
    /// The saved grants could not be read.
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// The socket could not be created.
    #[error("cannot create the socket {path}: {source}")]
    Socket {
        /// The socket path.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

/// Recent use of one port, for `status` (Azure's "Configured" tab).
#[derive(Debug, Default, Clone)]
struct PortUsage {
    approvals: VecDeque<DateTime<Utc>>,
    last_access: Option<DateTime<Utc>>,
    last_user: Option<String>,
}

struct State {
    config: Config,
    book: GrantBook,
    audit: AuditLog,
    usage: HashMap<u16, PortUsage>,
    /// The table as the kernel showed it right after jitd last replaced it.
    baseline: Fingerprint,
    /// Grants changed since the last snapshot.
    dirty: bool,
    /// Counts jitd's own changes to grants or the kernel, so that a check that read the
    /// kernel without the lock can tell whether its reading is still comparable.
    generation: u64,
    /// Which refusals are audited in full and which only counted (H3).
    refusals: audit::limit::RefusalLimiter,
}

impl State {
    /// Appends audit records; when that rotated the log, checkpoints the grants so that
    /// a restart needs no record from the rotated file.
    fn record(&mut self, records: &[AuditRecord]) -> Result<(), audit::AuditError> {
        match self.audit.append(records) {
            Ok(rotated) => {
                if rotated {
                    save_grants(self);
                }
                Ok(())
            }
            Err(e) => {
                crate::metrics::metrics().audit_write_failures.inc();
                Err(e)
            }
        }
    }

    /// Marks the grants as changed (snapshot due, kernel readings outdated).
    fn changed(&mut self) {
        self.dirty = true;
        self.generation += 1;
        crate::metrics::metrics().active_grants.set(self.book.len() as i64);
    }

    /// Counts an approval on `port` for `status`.
    fn note_use(&mut self, port: u16, user: &str, when: DateTime<Utc>) {
        let usage = self.usage.entry(port).or_default();
        usage.approvals.push_back(when);
        usage.last_access = Some(when);
        usage.last_user = Some(user.to_string());
    }
}

/// Grants this close to their end may already be gone from the kernel; their absence
/// is not drift.
const DRIFT_SLACK: Duration = Duration::from_millis(1500);
/// How often jitd compares the kernel with its view even without a change event.
pub const RECONCILE_EVERY: Duration = Duration::from_secs(10);
const PERIODIC: &str = "periodic check";
/// How often changed grants are checkpointed to `grants.json`.
const SNAPSHOT_EVERY: Duration = Duration::from_secs(1);

/// The running daemon: policy, grants and audit behind one lock, and a firewall driver.
pub struct Daemon<F: Firewall> {
    firewall: F,
    state: Mutex<State>,
    expiry_changed: Notify,
    requests: requests::Queue,
}

impl<F: Firewall> Daemon<F> {
    /// Prepares state_dir and the audit log, then locks the ports (replacing any table
    /// jitd left behind, in one transaction). Nothing is served yet.
    pub async fn start(config: Config, firewall: F) -> Result<Arc<Daemon<F>>, StartError> {
        create_state_dir(&config.state_dir)?;
        let mut audit = AuditLog::open(&config.state_dir, config.audit_rotation)?;
        let (history, problems) = audit::read_all(&config.state_dir).map_err(StartError::AuditRead)?;
        for p in problems {
            tracing::warn!("{p}");
        }
        let mut saved = store::load(&config.state_dir)?;
        let journal = store::journal(&saved, &history);
        store::replay(&mut saved, journal);
        let first_id = history
            .iter()
            .filter_map(|r| r.grant_id)
            .max()
            .map_or(1, |m| m + 1)
            .max(saved.next_id);
        let usage = usage_from_history(&history);
        // What the kernel still enforces is the truth about grants made before a restart.
        let kernel_table = firewall.read_table(true).await?;
        let kernel = kernel_table.as_ref().map(|table| table.grants().0);
        let now = Instant::now();
        let wall = Utc::now();
        let mut book = GrantBook::new(first_id);
        let mut records = Vec::new();
        for grant in saved.grants {
            match remaining_after_restart(&grant, kernel.as_ref(), wall) {
                Some(left) => {
                    let mut grant = grant;
                    grant.expires_at = wall + chrono::Duration::from_std(left).unwrap_or_default();
                    book.restore(grant, now + left);
                }
                None => {
                    let end = grant.expires_at.min(wall);
                    let mut r = grant_record(&grant, end, None, "jitd", Action::Expire, Outcome::Expired);
                    r.reason = Some("ended while jitd was not running".into());
                    records.push(r);
                }
            }
        }
        let spec = LockdownSpec::from_config(&config);
        let unchanged = kernel_table
            .as_ref()
            .is_some_and(|t| saved.lockdown == format!("{spec:?}") && t.fingerprint() == saved.fingerprint);
        if unchanged {
            // The kernel still enforces this very lockdown with its own timers (a crash
            // or restart, same policy): bring only the grant elements in line.
            let (held, _) = kernel_table.as_ref().map(|t| t.grants()).unwrap_or_default();
            let live: Vec<GrantElement> = book.elements(now);
            let live_keys: std::collections::HashSet<GrantKey> = live.iter().map(|e| e.key).collect();
            let stale: Vec<GrantKey> = held.keys().filter(|k| !live_keys.contains(k)).copied().collect();
            let missing: Vec<GrantElement> = live.into_iter().filter(|e| !held.contains_key(&e.key)).collect();
            if let Some(batch) = rules::change_grants(&stale, &missing) {
                firewall.apply(&batch).await?;
            }
            tracing::info!(
                "the lockdown in the kernel is intact; kept it ({} stale, {} missing element(s) fixed)",
                stale.len(),
                missing.len()
            );
        } else {
            firewall
                .apply(&rules::replace_table(&spec, &book.elements(now)))
                .await?;
        }
        let baseline = read_baseline(&firewall).await?;
        let mut record = AuditRecord::new(Utc::now(), None, "jitd", Action::Start, Outcome::Done);
        record.ports = config.ports.iter().map(|p| p.port).collect();
        record.reason = Some(format!(
            "locked {}; {} grant(s) restored",
            describe_ports(&config),
            book.len()
        ));
        records.push(record);
        audit.append(&records)?;
        let state = State {
            config,
            book,
            audit,
            usage,
            baseline,
            dirty: false,
            generation: 0,
            refusals: Default::default(),
        };
        save_grants(&state);
        let (queue, inbox) = tokio::sync::mpsc::channel(4 * requests::MAX_BATCH);
        let daemon = Arc::new(Daemon {
            firewall,
            state: Mutex::new(state),
            expiry_changed: Notify::new(),
            requests: queue,
        });
        requests::start_committer(&daemon, inbox);
        Ok(daemon)
    }

    /// Records the stop and, with `on_stop = "unlock"`, removes the lockdown.
    pub async fn stop(&self) {
        let mut st = self.state.lock().await;
        let unlock = st.config.on_stop == OnStop::Unlock;
        let mut record = AuditRecord::new(Utc::now(), None, "jitd", Action::Stop, Outcome::Done);
        if unlock {
            match self.firewall.apply(&rules::remove_table()).await {
                Ok(()) => record.reason = Some("on_stop = unlock: lockdown removed".into()),
                Err(e) => {
                    tracing::error!("on_stop = unlock, but removing the lockdown failed: {e}");
                    record.reason = Some(format!("on_stop = unlock, but removing the lockdown failed: {e}"));
                }
            }
        } else {
            record.reason = Some(format!(
                "on_stop = keep-locked: ports stay locked, {} grant(s) expire in the kernel on their own",
                st.book.len()
            ));
        }
        save_grants(&st);
        let mut records = st.refusals.flush(Utc::now());
        records.push(record);
        if let Err(e) = st.record(&records) {
            tracing::error!("{e}");
        }
    }

    /// The policy file path, socket path and socket group the daemon was started with.
    pub async fn config(&self) -> Config {
        self.state.lock().await.config.clone()
    }

    async fn status(&self, caller: &Caller) -> Result<StatusReply, Denial> {
        let mut st = self.state.lock().await;
        let role = policy::require_role(&st.config.access, caller, Role::Viewer, "read the status")?;
        let now = Instant::now();
        let wall = Utc::now();
        let State {
            config, book, usage, ..
        } = &mut *st;
        let ports = config
            .ports
            .iter()
            .map(|p| {
                let u = usage.entry(p.port).or_default();
                while u.approvals.front().is_some_and(|t| *t < wall - USAGE_WINDOW) {
                    u.approvals.pop_front();
                }
                PortStatus {
                    port: p.port,
                    protocol: p.protocol,
                    allowed_sources: match &p.allowed_sources {
                        AllowedSources::Any => vec!["any".into()],
                        AllowedSources::Prefixes(list) => list.iter().map(format_prefix).collect(),
                    },
                    max_duration_secs: p.max_duration.as_secs(),
                    approved_last_7d: u.approvals.len() as u64,
                    last_access: u.last_access,
                    last_user: u.last_user.clone(),
                }
            })
            .collect();
        let grants = book
            .iter()
            .map(|g| grant_info(g, book.remaining(g.id, now).unwrap_or_default()))
            .collect();
        Ok(StatusReply {
            version: env!("CARGO_PKG_VERSION").into(),
            ports,
            grants,
            exempt_sources: config.lockdown.exempt_sources.iter().map(format_prefix).collect(),
            interfaces: config.lockdown.interfaces.clone(),
            on_stop: audit::enum_text(&config.on_stop),
            your_role: audit::enum_text(&role),
            health: health(),
        })
    }

    async fn revoke(&self, caller: &Caller, request: RevokeRequest) -> Reply {
        let mut st = self.state.lock().await;
        let role = match policy::require_role(&st.config.access, caller, Role::Requester, "revoke grants") {
            Ok(r) => r,
            Err(d) => return self.refuse_revoke(&mut st, caller, &request, d),
        };
        let source = match request.source.as_deref().map(parse_prefix).transpose() {
            Ok(s) => s,
            Err(e) => {
                return self.refuse_revoke(
                    &mut st,
                    caller,
                    &request,
                    Denial::new("invalid_argument", format!("source: {e}")),
                )
            }
        };
        let targets: Vec<Grant> = st
            .book
            .iter()
            .filter(|g| match (request.id, source) {
                (Some(id), _) => g.id == id,
                (None, Some(s)) => g.source == s && request.port.is_none_or(|p| p == g.port),
                (None, None) => false,
            })
            .cloned()
            .collect();
        if request.id.is_none() && source.is_none() {
            return Reply::error("invalid_argument", "revoke needs a grant id or a source");
        }
        if targets.is_empty() {
            return Reply::error("not_found", "no live grant matches");
        }
        if role < Role::Admin {
            if let Some(g) = targets.iter().find(|g| g.requester_uid != caller.uid) {
                let d = Denial::new(
                    "not_authorized",
                    format!(
                        "grant {} belongs to {}; only admins may revoke others' grants",
                        g.id, g.requester
                    ),
                );
                return self.refuse_revoke(&mut st, caller, &request, d);
            }
        }
        let wall = Utc::now();
        let records: Vec<AuditRecord> = targets
            .iter()
            .map(|g| {
                let mut r = grant_record(
                    g,
                    wall,
                    Some(caller.uid),
                    &caller.name,
                    Action::Revoke,
                    Outcome::Revoked,
                );
                r.reason = Some(format!("revoked by {}", caller.name));
                r
            })
            .collect();
        if let Err(e) = st.record(&records) {
            return Reply::error("audit_failed", format!("revoke refused: {e}"));
        }
        let keys: Vec<GrantKey> = targets.iter().flat_map(Grant::keys).collect();
        if let Err(e) = self.change_grants(&keys, &[]).await {
            return Reply::error("firewall_failed", format!("revoke failed, the grants stay: {e}"));
        }
        let now = Instant::now();
        let revoked = targets
            .iter()
            .map(|g| {
                let left = st.book.remaining(g.id, now).unwrap_or_default();
                st.book.remove(g.id);
                tracing::info!(grant = g.id, user = %caller.name, "grant revoked");
                grant_info(g, left)
            })
            .collect();
        st.changed();
        self.expiry_changed.notify_one();
        Reply::ok(RevokedReply { revoked })
    }

    fn refuse_revoke(&self, st: &mut State, caller: &Caller, request: &RevokeRequest, denial: Denial) -> Reply {
        let mut r = AuditRecord::new(
            Utc::now(),
            Some(caller.uid),
            &caller.name,
            Action::Revoke,
            Outcome::Denied,
        );
        r.grant_id = request.id;
        r.source = request.source.clone();
        r.ports = request.port.into_iter().collect();
        r.reason = Some(format!("{}: {}", denial.code, denial.message));
        match st.record(&[r]) {
            Ok(()) => Reply::error(&denial.code, denial.message),
            Err(e) => Reply::error("audit_failed", format!("revoke refused: {e}")),
        }
    }

    /// Removes and adds grant elements in one transaction. Should the kernel already
    /// have dropped an element being removed (its timeout fired a moment early), that
    /// batch fails as a whole; then the removals are done one by one, tolerating the
    /// missing ones, and the additions follow in a batch of their own.
    async fn change_grants(&self, remove: &[GrantKey], add: &[GrantElement]) -> Result<(), FirewallError> {
        let Some(batch) = rules::change_grants(remove, add) else {
            return Ok(());
        };
        match self.firewall.apply(&batch).await {
            Ok(()) => Ok(()),
            Err(FirewallError::Rejected(msg)) if !remove.is_empty() && msg.contains("No such file or directory") => {
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
            Err(e) => Err(e),
        }
    }

    async fn audit_verify(&self, caller: &Caller) -> Result<audit::chain::Verdict, Reply> {
        let dir = {
            let st = self.state.lock().await;
            policy::require_role(&st.config.access, caller, Role::Viewer, "verify the audit log")
                .map_err(|d| Reply::error(&d.code, d.message))?;
            st.config.state_dir.clone()
        };
        tokio::task::spawn_blocking(move || audit::chain::verify_dir(&dir))
            .await
            .map_err(|e| Reply::error("internal", e.to_string()))?
            .map_err(|e| Reply::error("internal", format!("cannot read the audit log: {e}")))
    }

    async fn audit_query(&self, caller: &Caller, q: AuditQuery) -> Result<AuditReply, Reply> {
        use audit::query::{self as aq, Cursor};
        static RUNNING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(aq::MAX_CONCURRENT);
        let path = {
            let st = self.state.lock().await;
            policy::require_role(&st.config.access, caller, Role::Viewer, "read the audit log")
                .map_err(|d| Reply::error(&d.code, d.message))?;
            st.config.state_dir.clone()
        };
        let cursor = q.cursor.as_deref().map(Cursor::parse).transpose();
        let cursor = cursor.map_err(|e| Reply::error("invalid_argument", e))?;
        if q.limit == Some(0) {
            return Err(Reply::error("invalid_argument", "limit: must be at least 1, got 0"));
        }
        let permit = RUNNING.try_acquire().map_err(|_| {
            Reply::error(
                "busy",
                format!("{} audit queries are running; try again shortly", aq::MAX_CONCURRENT),
            )
        })?;
        let limit = q.limit.unwrap_or(aq::MAX_LIMIT);
        let page = tokio::task::spawn_blocking(move || {
            let _permit = permit; // held until the reading ends, even if the client left
            aq::query(&path, &q.filter, cursor.as_ref(), limit)
        })
        .await
        .map_err(|e| Reply::error("internal", e.to_string()))?
        .map_err(|e| Reply::error("internal", format!("cannot read the audit log: {e}")))?;
        Ok(AuditReply {
            records: page.records,
            warnings: page.warnings,
            next_cursor: page.next.map(|c| c.encode()),
        })
    }
}

impl<F: Firewall> Handler for Daemon<F> {
    async fn handle(&self, peer: Peer, request: Request) -> Reply {
        let caller = tokio::task::spawn_blocking(move || Caller::resolve(peer.uid, peer.gid))
            .await
            .unwrap_or_else(|_| Caller {
                uid: peer.uid,
                name: peer.uid.to_string(),
                groups: Vec::new(),
            });
        match request {
            Request::Status => match self.status(&caller).await {
                Ok(s) => Reply::ok(s),
                Err(d) => Reply::error(&d.code, d.message),
            },
            Request::Request(r) => self.request(caller, r).await,
            Request::Revoke(r) => self.revoke(&caller, r).await,
            Request::Audit(q) => self.audit_query(&caller, q).await.map_or_else(|r| r, Reply::ok),
            Request::AuditVerify => self.audit_verify(&caller).await.map_or_else(|r| r, Reply::ok),
            Request::Reload => {
                let path = {
                    let st = self.state.lock().await;
                    if let Err(d) = policy::require_role(&st.config.access, &caller, Role::Admin, "reload the policy") {
                        return Reply::error(&d.code, d.message);
                    }
                    st.config.path.clone()
                };
                match self.reload(&path, &caller).await {
                    Ok(r) => Reply::ok(r),
                    Err(reply) => reply,
                }
            }
        }
    }
}

/// How long a grant saved before a restart still has: the kernel's own timer when the
/// table survived (it is what enforces), else the wall clock. `None`: it has ended.
/// The counters `status` shows, from the metrics.
fn health() -> crate::api::protocol::Health {
    let m = crate::metrics::metrics();
    crate::api::protocol::Health {
        requests_approved: m.requests_with("approved"),
        requests_denied: m.requests_with("denied"),
        requests_failed: m.requests_with("failed"),
        drift_repairs: m.drift_repairs.get(),
        audit_write_failures: m.audit_write_failures.get(),
        refused_connections: m.refused_connections.get(),
    }
}

/// What differs between the kernel's table and jitd's view (empty: nothing).
fn drift_of(st: &State, table: Option<&kernel::KernelTable>) -> Vec<String> {
    let expected = st
        .book
        .elements(Instant::now())
        .into_iter()
        .map(|e| (e.key, e.timeout))
        .collect();
    match table {
        None => vec![format!("table inet {} is missing", rules::TABLE)],
        Some(table) => kernel::find_drift(&st.baseline, table, &expected, DRIFT_SLACK),
    }
}

fn remaining_after_restart(grant: &Grant, kernel: Option<&KernelGrants>, wall: DateTime<Utc>) -> Option<Duration> {
    let left = match kernel {
        Some(elements) => grant.keys().iter().map(|k| elements.get(k).copied()).min().flatten()?,
        None => (grant.expires_at - wall).to_std().ok()?,
    };
    (!left.is_zero()).then_some(left)
}

async fn read_baseline<F: Firewall>(firewall: &F) -> Result<Fingerprint, FirewallError> {
    Ok(firewall
        .read_table(false)
        .await?
        .map(|t| t.fingerprint())
        .unwrap_or_default())
}

/// Saves the live grants; a failure is logged (the audit log still holds every
/// change since the last snapshot, so a restart loses nothing).
fn save_grants(st: &State) {
    if let Err(e) = store::save(&st.config.state_dir, &snapshot_of(st)) {
        tracing::error!("{e}");
    }
}

fn snapshot_of(st: &State) -> store::Snapshot {
    let lockdown = format!("{:?}", LockdownSpec::from_config(&st.config));
    store::Snapshot {
        next_id: st.book.next_id(),
        grants: st.book.iter().cloned().collect(),
        audit_hash: st.audit.last_hash().to_string(),
        lockdown,
        fingerprint: st.baseline.clone(),
    }
}

fn create_state_dir(dir: &Path) -> Result<(), StartError> {
    use std::os::unix::fs::DirBuilderExt;
    let fail = |source| StartError::StateDir {
        path: dir.display().to_string(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(fail)
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

fn still_allowed(config: &Config, grant: &Grant) -> bool {
    config
        .ports
        .iter()
        .any(|p| p.port == grant.port && p.protocol == grant.protocol && p.allowed_sources.contains(&grant.source))
}

fn describe_ports(config: &Config) -> String {
    config
        .ports
        .iter()
        .map(|p| format!("{}/{}", p.port, p.protocol))
        .collect::<Vec<_>>()
        .join(", ")
}

fn grant_info(g: &Grant, remaining: Duration) -> GrantInfo {
    GrantInfo {
        id: g.id,
        source: format_prefix(&g.source),
        port: g.port,
        protocol: g.protocol,
        requester: g.requester.clone(),
        justification: g.justification.clone(),
        granted_at: g.granted_at,
        expires_at: g.expires_at,
        remaining_secs: remaining.as_secs() + u64::from(remaining.subsec_nanos() > 0),
    }
}

fn grant_record(
    g: &Grant,
    time: DateTime<Utc>,
    uid: Option<u32>,
    actor: &str,
    action: Action,
    outcome: Outcome,
) -> AuditRecord {
    let mut r = AuditRecord::new(time, uid, actor, action, outcome);
    r.ports = vec![g.port];
    r.protocol = Some(g.protocol);
    r.source = Some(format_prefix(&g.source));
    r.duration_secs = Some((g.expires_at - g.granted_at).num_seconds().max(0) as u64);
    r.justification = g.justification.clone();
    r.grant_id = Some(g.id);
    r
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

/// Runs jitd until `shutdown` completes: locks the ports, serves the socket, expires
/// grants, reloads on SIGHUP, reports to systemd. Returns once stopped cleanly.
pub async fn run<F: Firewall>(
    config: Config,
    firewall: F,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    let socket = config.socket.clone();
    let metrics_listen = config.metrics_listen;
    let gid = config.socket_group.as_ref().map(|g| g.gid);
    let exempt: Vec<String> = config.lockdown.exempt_sources.iter().map(format_prefix).collect();
    let ports = describe_ports(&config);
    let daemon = Daemon::start(config, firewall).await?;
    let listener = server::bind(&socket, gid).map_err(|source| StartError::Socket {
        path: socket.display().to_string(),
        source,
    })?;
    if !exempt.is_empty() {
        tracing::info!("exempt from the lockdown (break-glass): {}", exempt.join(", "));
    }
    tracing::info!("ports locked: {ports}; listening on {}", socket.display());
    let expiry = tokio::spawn(daemon.clone().run_expiry());
    let drift = tokio::spawn(daemon.clone().watch_drift());
    let checkpoint = tokio::spawn(daemon.clone().checkpoint_grants());
    let hup = tokio::spawn(reload_on_sighup(daemon.clone()));
    let watchdog = tokio::spawn(pet_watchdog());
    let metrics = match metrics_listen {
        None => None,
        Some(addr) => {
            let listener = crate::metrics::bind(addr).await.map_err(|source| StartError::Socket {
                path: format!("metrics_listen {addr}"),
                source,
            })?;
            tracing::info!("serving metrics on http://{addr}/metrics");
            Some(tokio::spawn(crate::metrics::serve(listener)))
        }
    };
    let _ = sd_notify::notify(
        false,
        &[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(&format!("locked {ports}")),
        ],
    );
    server::serve(listener, daemon.clone(), shutdown).await;
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    tracing::info!("stopping");
    hup.abort();
    expiry.abort();
    drift.abort();
    checkpoint.abort();
    watchdog.abort();
    if let Some(m) = metrics {
        m.abort();
    }
    daemon.stop().await;
    let _ = std::fs::remove_file(&socket);
    Ok(())
}

async fn reload_on_sighup<F: Firewall>(daemon: Arc<Daemon<F>>) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        return;
    };
    while hup.recv().await.is_some() {
        let path = daemon.config().await.path;
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

async fn pet_watchdog() {
    let Some(interval) = watchdog_interval() else { return };
    let mut tick = tokio::time::interval(interval / 2);
    loop {
        tick.tick().await;
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
    }
}

/// The watchdog interval systemd asks for (`WATCHDOG_USEC`), if it is meant for this
/// process: like sd_watchdog_enabled(3), a missing `WATCHDOG_PID` means "yours".
fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    let for_us = std::env::var("WATCHDOG_PID").map_or(true, |pid| pid.parse() == Ok(std::process::id()));
    (usec > 0 && for_us).then(|| Duration::from_micros(usec))
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::api::protocol::GrantRequest;
    use crate::firewall::RecordingFirewall;

    pub(super) async fn daemon(dir: &Path) -> Arc<Daemon<RecordingFirewall>> {
        let text = format!(
            "state_dir = \"{}\"\n[[ports]]\nport = 22\nmax_duration = \"1h\"\n",
            dir.display()
        );
        let config = Config::parse(&dir.join("jitd.toml"), &text, &|_| None).unwrap();
        Daemon::start(config, RecordingFirewall::default()).await.unwrap()
    }

    pub(super) fn root() -> Peer {
        Peer {
            uid: 0,
            gid: 0,
            pid: None,
        }
    }

    pub(super) fn ask(secs: u64) -> Request {
        Request::Request(GrantRequest {
            ports: vec![22],
            source: "192.0.2.7".into(),
            duration_secs: Some(secs),
            until: None,
            justification: None,
        })
    }

    pub(super) fn outcomes(dir: &Path) -> Vec<Outcome> {
        audit::read_records(&dir.join(audit::AUDIT_FILE))
            .unwrap()
            .0
            .into_iter()
            .map(|r| r.outcome)
            .collect()
    }

    #[tokio::test]
    async fn a_grant_the_firewall_refuses_is_not_granted_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let d = daemon(dir.path()).await;
        *d.firewall.fail_with.lock().unwrap() = Some("Error: Could not process rule: No buffer space available".into());
        let reply = d.handle(root(), ask(60)).await;
        let error = reply.error.unwrap();
        assert_eq!(error.code, "firewall_failed");
        assert!(error.message.contains("No buffer space available"), "{}", error.message);
        assert!(d.state.lock().await.book.is_empty());
        assert_eq!(
            outcomes(dir.path()),
            vec![Outcome::Done, Outcome::Approved, Outcome::Failed]
        );
        let saved = store::load(dir.path()).unwrap();
        assert!(saved.grants.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn the_expiry_timer_books_the_end_on_time() {
        let dir = tempfile::tempdir().unwrap();
        let d = daemon(dir.path()).await;
        let expiry = tokio::spawn(d.clone().run_expiry());
        assert!(d.handle(root(), ask(30)).await.ok);
        assert_eq!(d.state.lock().await.book.len(), 1);
        tokio::time::sleep(Duration::from_millis(29_900)).await;
        assert_eq!(d.state.lock().await.book.len(), 1, "not before its time");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(d.state.lock().await.book.is_empty(), "ended at its deadline");
        assert_eq!(
            outcomes(dir.path()),
            vec![Outcome::Done, Outcome::Approved, Outcome::Expired]
        );
        // the kernel is not asked to remove it: its own timeout does that
        let applied = d.firewall.applied.lock().unwrap().len();
        assert_eq!(applied, 2, "the start and the grant, nothing for the expiry");
        expiry.abort();
    }

    #[tokio::test]
    async fn grants_are_saved_for_a_restart_and_come_back() {
        let dir = tempfile::tempdir().unwrap();
        let d = daemon(dir.path()).await;
        assert!(d.handle(root(), ask(600)).await.ok);
        drop(d);
        let again = daemon(dir.path()).await;
        let st = again.state.lock().await;
        assert_eq!(
            st.book.len(),
            1,
            "restored from grants.json (no kernel table: wall clock)"
        );
        let left = st.book.remaining(1, Instant::now()).unwrap();
        assert!(
            left > Duration::from_secs(595) && left <= Duration::from_secs(600),
            "{left:?}"
        );
    }
}
