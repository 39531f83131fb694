//! Wires jitd together. Every change goes through the committer ([`commit`]): requests
//! ([`requests`]), revocations, reloads, repairs and expiry ([`changes`]); the audit
//! log and checkpoints are written by their own thread ([`writer`]). Start-up
//! ([`start`]), read-only questions ([`queries`]), upkeep timers ([`upkeep`]), drift
//! checks ([`drift`]), the grants' connection counts ([`usage`]) and systemd glue
//! ([`systemd`]) have their own modules.
//!
//! One request, end to end, file by file:
//! 1. `src/bin/jitctl.rs` sends it with [`crate::api::client::call`], one JSON line
//!    ([`crate::api::protocol`]);
//! 2. `src/api/server.rs` reads the line, takes the peer's uid and gid (SO_PEERCRED)
//!    and calls [`Daemon::handle`] (this file), which resolves the caller
//!    (`src/identity.rs`) and routes the request;
//! 3. `requests.rs` queues it for the committer ([`commit`], `commit.rs`), which
//!    decides it under the state lock ([`crate::policy::check_request`],
//!    [`crate::grants::GrantBook`]) and builds one transaction;
//! 4. `writer.rs` appends and fsyncs its audit records ([`crate::audit::AuditLog`]);
//! 5. `commit.rs` applies one nftables batch ([`crate::firewall::rules`] builds it,
//!    `src/firewall/libnft.rs` or `nft.rs` applies it); on failure it undoes the booking
//!    and audits that;
//! 6. the reply goes back the same way, as one JSON line.

mod approvals;
mod book;
mod changes;
mod clock;
mod commit;
mod doctor;
mod drift;
mod fleet;
mod job;
mod knock;
mod queries;
mod requests;
mod start;
mod systemd;
mod tx;
mod upkeep;
mod usage;
mod writer;

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, oneshot, Notify};

use crate::api::protocol::{GrantInfo, Reply, Request};
use crate::api::server::{self, Handler, Peer};
use crate::audit::{Action, AuditRecord, Outcome};
use crate::config::Config;
use crate::domain::{format_prefix, Caller};
use crate::firewall::kernel::Fingerprint;
use crate::firewall::rules::LockdownSpec;
use crate::firewall::{Firewall, FirewallError};
use crate::grants::{Grant, GrantBook, Touched};
use crate::store;

pub use start::{check_interfaces, StartError};

/// How far back `status` counts approved requests per port.
const USAGE_WINDOW: chrono::TimeDelta = chrono::TimeDelta::days(7);
/// How many of jitd's own recent changes a drift check can allow for.
const RECENT_CHANGES: usize = 4096;

/// Recent use of one port, for `status` (Azure's "Configured" tab).
#[derive(Debug, Default, Clone)]
struct PortUsage {
    approvals: VecDeque<DateTime<Utc>>,
    last_access: Option<DateTime<Utc>>,
    last_user: Option<String>,
}

/// Everything the committer books; read by queries under a short lock.
struct State {
    config: Config,
    book: GrantBook,
    usage: HashMap<u16, PortUsage>,
    /// The table's shape as the kernel showed it right after jitd last replaced it.
    baseline: Fingerprint,
    /// Grants changed since the last checkpoint.
    dirty: bool,
    /// Hash of the newest audit record (what a checkpoint taken now includes).
    audit_hash: String,
    /// Transactions begun (their kernel change may be under way) and finished.
    begun: u64,
    settled: u64,
    /// What each recent transaction touched (`None`: the whole table).
    recent: VecDeque<(u64, Option<Touched>)>,
    /// Which refusals are audited in full and which only counted.
    refusals: crate::audit::limit::RefusalLimiter<crate::audit::limit::Refuser>,
    /// Sessions `revoke --terminate` cut, put back whenever the table is rebuilt.
    cuts: crate::firewall::conntrack::CutMemory,
    /// The highest grant id whose approval is on disk: `status` shows no grant above it
    /// (booked, but its record not yet written, it may still be refused).
    recorded: crate::domain::GrantId,
    /// Requests waiting for approval ([`approvals`]).
    pending: crate::approval::PendingBook,
    /// The connections each grant admitted, from the kernel's counters ([`usage`]).
    ledger: crate::grants::usage::Ledger,
    /// Grants ending up to here have had their counters read ahead of their end.
    sampled_until: tokio::time::Instant,
}

impl State {
    /// Since when the audit log must keep every record at `now`: the oldest record a
    /// live grant may have (its approval, or, on a port that needs an approval, the
    /// request that waited up to the port's `approval_timeout` before it), a waiting
    /// request's, and the start of `audit_retain`. Rotation deletes no file holding a
    /// record from then on.
    fn audit_keep_since(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let waited = |port: u16| {
            let wait = self
                .config
                .ports
                .iter()
                .filter(|p| p.port == port && p.approvals > 0)
                .map(|p| p.approval_timeout)
                .max()
                .unwrap_or_default();
            chrono::TimeDelta::from_std(wait).unwrap_or(chrono::TimeDelta::zero())
        };
        let grants = self.book.iter().map(|g| g.granted_at - waited(g.port));
        let pending = self.pending.iter().map(|(r, _)| r.asked_at);
        let retain = self
            .config
            .audit_retain
            .and_then(|d| chrono::TimeDelta::from_std(d).ok())
            .map(|d| now - d);
        grants.chain(pending).chain(retain).min()
    }

    /// Notes that a transaction's kernel change is about to be applied.
    fn begin(&mut self, touched: Touched, whole_table: bool) {
        self.begun += 1;
        self.recent.push_back((self.begun, (!whole_table).then_some(touched)));
        while self.recent.len() > RECENT_CHANGES {
            self.recent.pop_front();
        }
    }

    /// Notes that jitd read the kernel's elements `touched` (their counters): a reading
    /// begun before leaves them out, as if jitd had changed them. Unlike a transaction
    /// it is over at once; one in flight stays in flight.
    fn note_read(&mut self, touched: Touched) {
        let idle = self.settled == self.begun;
        self.begin(touched, false);
        if idle {
            self.settle();
        }
    }

    /// Notes that the transaction begun last is over (applied or undone).
    fn settle(&mut self) {
        self.settled = self.begun;
    }

    /// What jitd itself changed in the kernel after transaction `settled` was over:
    /// `None` when that is unknown or included the whole table.
    fn touched_since(&self, settled: u64) -> Option<Touched> {
        if self.recent.front().is_some_and(|(n, _)| *n > settled + 1) {
            return None;
        }
        let mut all = Touched::default();
        for (_, touched) in self.recent.iter().filter(|(n, _)| *n > settled) {
            all.merge(touched.as_ref()?);
        }
        Some(all)
    }

    /// Marks the grants as changed (checkpoint due).
    fn changed(&mut self) {
        self.dirty = true;
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

/// The running daemon: the state behind a short lock, the committer's inbox, the audit
/// writer and a firewall driver.
pub struct Daemon<F: Firewall> {
    firewall: F,
    state: std::sync::Mutex<State>,
    jobs: mpsc::Sender<Job>,
    pings: mpsc::Sender<oneshot::Sender<()>>,
    writer: writer::Writer,
    expiry_changed: Notify,
    /// The wall clock, watched for jumps.
    clock: clock::WallClock,
    /// Remote knocks' nonce memory and refusal log.
    knocks: knock::Knocks,
    /// The doctor's last verdict and what it keeps between runs.
    health: doctor::HealthState,
    /// The fleet requests the audit log named at start (the fleet watcher's memory of
    /// what it judged before the restart), with their last record's time.
    fleet_seen: std::collections::BTreeMap<String, chrono::DateTime<Utc>>,
    #[allow(dead_code)]
    claims: start::Claims,
}

use job::Job;

impl<F: Firewall> Daemon<F> {
    /// The policy the daemon runs with now.
    pub fn config(&self) -> Config {
        self.lock().config.clone()
    }

    /// Sends a job to the committer; `false` when it has stopped.
    async fn submit(&self, job: Job) -> bool {
        self.jobs.send(job).await.is_ok()
    }

    /// Whether the committer answers within `timeout` (for the watchdog).
    pub async fn responsive(&self, timeout: Duration) -> bool {
        let (ack, answer) = oneshot::channel();
        if self.pings.send(ack).await.is_err() {
            return false;
        }
        matches!(tokio::time::timeout(timeout, answer).await, Ok(Ok(())))
    }

    /// Records the stop and, with `on_stop = "unlock"`, removes the lockdown; returns
    /// once the committer has finished every job queued before it.
    pub async fn stop(&self) {
        let (ack, done) = oneshot::channel();
        if self.submit(Job::Stop(ack)).await {
            let _ = done.await;
        }
    }
}

impl<F: Firewall> Handler for Daemon<F> {
    /// Root and admins may use the connections reserved for them.
    async fn privileged(&self, peer: Peer) -> bool {
        if peer.uid == 0 {
            return true;
        }
        let access = self.lock().config.access.clone();
        tokio::task::spawn_blocking(move || {
            let caller = Caller::resolve(peer.uid, peer.gid);
            crate::policy::role_of(&access, &caller) == Some(crate::policy::Role::Admin)
        })
        .await
        .unwrap_or(false)
    }

    async fn handle(&self, peer: Peer, request: Request) -> Reply {
        let caller = tokio::task::spawn_blocking(move || Caller::resolve(peer.uid, peer.gid))
            .await
            .unwrap_or_else(|_| Caller {
                uid: peer.uid,
                name: peer.uid.to_string(),
                groups: Vec::new(),
                signer: None,
            });
        match request {
            Request::Status(q) => self.status(&caller, &q).await.map_or_else(|r| r, Reply::ok),
            Request::Request(r) => self.request_as(caller, login_of(peer), r).await,
            Request::Revoke(r) => self.revoke(caller, r).await,
            Request::Audit(q) => self.audit_query(&caller, q).await.map_or_else(|r| r, Reply::ok),
            Request::AuditVerify => self.audit_verify(&caller).await.map_or_else(|r| r, Reply::ok),
            Request::Doctor => self.doctor(&caller).await.map_or_else(|r| r, Reply::ok),
            Request::Reload => match self.reload_as(&caller).await {
                Ok(r) => Reply::ok(r),
                Err(reply) => reply,
            },
            Request::Approve(a) => {
                let decision = job::Decision::approve(a.id, login_of(peer));
                self.decide(caller, decision).await
            }
            Request::Deny(d) => {
                let decision = job::Decision::deny(d.id, d.reason, login_of(peer));
                self.decide(caller, decision).await
            }
            Request::Pending(q) => self.pending_status(&caller, q.id).map_or_else(|r| r, Reply::ok),
        }
    }
}

/// The login uid behind a socket peer, when the kernel knows it.
fn login_of(peer: Peer) -> Option<u32> {
    peer.pid.and_then(crate::identity::login_uid)
}

async fn read_baseline<F: Firewall>(firewall: &F) -> Result<Fingerprint, FirewallError> {
    Ok(firewall
        .read_table(false)
        .await?
        .map(|t| t.fingerprint())
        .unwrap_or_default())
}

fn snapshot_of(st: &State) -> store::Snapshot {
    // the writer adds the journal position and history it covers (store::Snapshot docs)
    store::Snapshot {
        next_id: st.book.next_id(),
        grants: st.book.iter().cloned().collect(),
        audit_hash: st.audit_hash.clone(),
        lockdown: format!("{:?}", LockdownSpec::from_config(&st.config)),
        fingerprint: st.baseline.clone(),
        pending: st.pending.iter().map(|(r, _)| r.clone()).collect(),
        admitted: st.ledger.saved(),
        ..Default::default()
    }
}

fn describe_ports(config: &Config) -> String {
    config
        .ports
        .iter()
        .map(|p| format!("{}/{}", p.port, p.protocol))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A grant as a reply shows it, its end derived from the wall clock now (see
/// [`queries::grant_info_at`]).
fn grant_info(g: &Grant, remaining: Duration) -> GrantInfo {
    queries::grant_info_at(g, remaining, Utc::now())
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
    r.duration_secs = Some(g.approved_duration().as_secs());
    r.justification = g.justification.clone();
    r.grant_id = Some(g.id);
    stamp_fleet(&mut r, g.fleet.as_ref());
    r
}

/// Names the fleet request a record's grant or request came from.
fn stamp_fleet(r: &mut AuditRecord, fleet: Option<&crate::domain::FleetOrigin>) {
    if let Some(f) = fleet {
        r.fleet_request = Some(f.request.clone());
        r.fleet_hosts = f.hosts.clone();
        r.fleet_revision = Some(f.revision).filter(|r| *r != 0);
        r.fleet_digest = Some(f.digest.clone()).filter(|d| !d.is_empty());
    }
}

/// The record that undoes `record` on replay when its transaction fails: same grant,
/// same action, outcome `failed`.
fn failure_of(record: &AuditRecord) -> AuditRecord {
    let mut r = record.clone();
    r.outcome = Outcome::Failed;
    r.reason = None;
    r.time = Utc::now();
    r
}

/// Runs jitd until `shutdown` completes: locks the ports, serves the socket, expires
/// grants, reloads on SIGHUP, reports to systemd. Returns once stopped cleanly, or an
/// error when a part of it failed (the lockdown then stays in the kernel).
pub async fn run<F: Firewall>(
    config: Config,
    firewall: F,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    let socket = config.socket.clone();
    let metrics_listen = config.metrics_listen;
    let limits = config.limits;
    let gid = config.socket_group.as_ref().map(|g| g.gid);
    let exempt: Vec<String> = config.lockdown.exempt_sources.iter().map(format_prefix).collect();
    let ports = describe_ports(&config);
    let knock_listen = config.remote.as_ref().map(|r| r.listen);
    let _table = start::claim_table()?;
    let (daemon, committer) = Daemon::start(config, firewall).await?;
    let knock_socket = match knock_listen {
        Some(addr) => Some(knock::bind(addr).map_err(|source| StartError::Socket {
            path: format!(
                "remote.listen {addr} (under systemd the unit needs AF_INET/AF_INET6 and IPAddressAllow: see the comments in jitd.service)"
            ),
            source,
        })?),
        None => None,
    };
    let listener = server::bind(&socket, gid).map_err(|source| StartError::Socket {
        path: socket.display().to_string(),
        source,
    })?;
    if !exempt.is_empty() {
        tracing::info!("exempt from the lockdown (break-glass): {}", exempt.join(", "));
    }
    tracing::info!("ports locked: {ports}; listening on {}", socket.display());
    let (stopping_tx, stopping) = tokio::sync::watch::channel(false);
    let mut tasks = spawn_tasks(&daemon, committer, &stopping);
    if let Some(socket) = knock_socket {
        tracing::info!("taking remote knocks on udp {}", knock_listen.expect("bound"));
        tasks.spawn(named(
            "knock listener",
            knock::serve(daemon.clone(), socket, stopping.clone()),
        ));
    }
    // idle while [fleet] is off, so that a reload may turn it on
    tasks.spawn(named("fleet watcher", fleet::run(daemon.clone(), stopping.clone())));
    if let Some(addr) = metrics_listen {
        tasks.spawn(named("metrics server", serve_metrics(addr, stopping.clone()).await?));
    }
    systemd::ready(&ports);
    // petted only from READY=1 on: its first pet is at once, and must not come first
    tasks.spawn(named(
        "watchdog",
        systemd::pet_watchdog(daemon.clone(), stopping.clone()),
    ));
    let failed = tokio::select! {
        _ = server::serve(listener, daemon.clone(), limits, shutdown) => None,
        Some(ended) = tasks.join_next() => Some(task_failure(ended, &stopping_tx)),
    };
    systemd::stopping();
    let _ = std::fs::remove_file(&socket);
    if let Some(why) = failed {
        tracing::error!("{why}; stopping with the lockdown left in place (systemd restarts jitd)");
        return Err(StartError::TaskFailed(why));
    }
    tracing::info!("stopping");
    daemon.stop().await;
    let _ = stopping_tx.send(true);
    while let Some(ended) = tasks.join_next().await {
        if let Ok((name, Err(e))) = ended {
            tracing::warn!("{name} ended with an error while stopping: {e}");
        }
    }
    Ok(())
}

type TaskResult = Result<(), String>;

type Tasks = tokio::task::JoinSet<(&'static str, TaskResult)>;

/// Starts the committer and the upkeep tasks; any of them ending before the stop is fatal.
fn spawn_tasks<F: Firewall>(
    daemon: &std::sync::Arc<Daemon<F>>,
    committer: tokio::task::JoinHandle<()>,
    stopping: &upkeep::Stopping,
) -> Tasks {
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(named(
        "committer",
        async move { committer.await.map_err(|e| e.to_string()) },
    ));
    tasks.spawn(named("expiry", upkeep::run_expiry(daemon.clone(), stopping.clone())));
    tasks.spawn(named(
        "drift monitor",
        upkeep::watch_drift(daemon.clone(), stopping.clone()),
    ));
    tasks.spawn(named("clock watch", clock::watch(daemon.clone(), stopping.clone())));
    tasks.spawn(named(
        "checkpoints",
        upkeep::checkpoints(daemon.clone(), stopping.clone()),
    ));
    tasks.spawn(named(
        "SIGHUP handler",
        upkeep::reload_on_sighup(daemon.clone(), stopping.clone()),
    ));
    tasks.spawn(named("doctor", doctor::watch_health(daemon.clone(), stopping.clone())));
    tasks
}

/// Binds `metrics_listen` (an error stops the start) and returns the task serving it.
async fn serve_metrics(
    addr: std::net::SocketAddr,
    mut stop: upkeep::Stopping,
) -> Result<impl Future<Output = TaskResult>, StartError> {
    let listener = crate::metrics::bind(addr).await.map_err(|source| StartError::Socket {
        path: format!("metrics_listen {addr}"),
        source,
    })?;
    tracing::info!("serving metrics on http://{addr}/metrics");
    Ok(async move {
        tokio::select! {
            _ = crate::metrics::serve(listener) => {}
            _ = stop.wait_for(|s| *s) => {}
        }
        Ok(())
    })
}

async fn named(name: &'static str, task: impl Future<Output = TaskResult>) -> (&'static str, TaskResult) {
    (name, task.await)
}

/// Why a task ending before the stop is fatal.
fn task_failure(
    ended: Result<(&'static str, TaskResult), tokio::task::JoinError>,
    stopping: &tokio::sync::watch::Sender<bool>,
) -> String {
    let _ = stopping.send(true);
    match ended {
        Ok((name, Ok(()))) => format!("the {name} task ended unexpectedly"),
        Ok((name, Err(e))) => format!("the {name} task failed: {e}"),
        Err(e) if e.is_panic() => format!("a task panicked: {}", panic_text(e)),
        Err(e) => format!("a task was cancelled: {e}"),
    }
}

fn panic_text(e: tokio::task::JoinError) -> String {
    let payload = e.into_panic();
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

#[cfg(test)]
pub(super) mod tests;
