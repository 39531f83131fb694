//! The fleet watcher: registers this host under `hosts/<name>` on a lease it keeps
//! alive, reads every live request and approval, then watches `requests/` and
//! `approvals/` from that revision. Each request for this host is judged ([`apply`]),
//! its outcome written to `status/<id>/<host>` ([`report`]); an approval of a request
//! waiting here goes to the decision path ([`approve`]); a deleted request (or a
//! revoked lease) closes what it has here ([`here`]).
//!
//! On any error (etcd unreachable, the watch failed, the lease lost) the watcher
//! reconnects and resumes both watches from the last revision it saw, so that it sees
//! every deletion it missed; when etcd has compacted that history it re-reads
//! everything instead, closing what is no longer there (and what was deleted and
//! written again, by its key's creation revision). The kernel timeouts keep every grant
//! bounded meanwhile, and the socket and knocks never wait on this path.
//!
//! What a request opened is read from the grant book (each grant names its fleet
//! request), so it survives a restart; which requests were judged is remembered here
//! and, across a restart, restored from the audit log (nothing is applied twice). A
//! reload that changes the host's name, groups or etcd settings is noticed at the next
//! tick (3 s) and starts a new session that reads everything; meanwhile the commit path
//! refuses a fleet request that the settings in force no longer select, and the reload
//! itself ends the grants of requests that no longer select this host.

mod apply;
mod approve;
mod here;
mod report;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use etcd_client::{Client, EventType, KeyValue, LeaseKeepAliveStream, LeaseKeeper, PutOptions, WatchResponse};

use super::upkeep::Stopping;
use super::{Daemon, TaskResult};
use crate::audit::limit::{RefusalLimiter, Subject};
use crate::audit::Action;
use crate::firewall::Firewall;
use crate::fleet::connect;
use crate::fleet::records::{HostRecord, Keys};
use crate::fleet::settings::Fleet;

/// The TTL of this host's registration lease (it drops out this long after dying).
const HOST_TTL: i64 = 10;
/// How often the registration lease is renewed, the settings and pending approvals
/// looked at, and the connection checked.
const KEEP_ALIVE: Duration = Duration::from_secs(3);
/// Reconnection back-off: first and longest wait.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(250), Duration::from_secs(4));

/// Whom fleet refusals are counted against: anyone who can write to etcd (one bucket,
/// so that a writer flooding `requests/` cannot flood every host's audit log).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Etcd;

impl Subject for Etcd {
    const ACTION: Action = Action::Fleet;
    fn uid(&self) -> Option<u32> {
        None
    }
    fn describe(&self, _name: &str) -> String {
        "fleet requests read from etcd".into()
    }
    fn others() -> &'static str {
        "fleet requests read from etcd"
    }
}

/// What the watcher remembers across reconnections: what it judged (so nothing is
/// applied twice), the requests it answered with something here, where to resume, and
/// which refusals it audits in full (the first 20 a minute; the rest in a summary).
#[derive(Default)]
struct Memory {
    refusals: RefusalLimiter<Etcd>,
    /// Verified request id → until when it is remembered (its signed end; for one
    /// restored from the audit log, [`crate::store::FLEET_MEMORY`] after its last record).
    judged: HashMap<String, DateTime<Utc>>,
    /// Requests this host answered `approved` or `pending`.
    answered: HashMap<String, Answered>,
    /// Verified approval keys judged (each once), until when they are remembered.
    approvals: HashMap<String, DateTime<Utc>>,
    /// Writes of entries too large to read, audited once each ([`apply::mark`]);
    /// rebuilt at each full read, at most [`apply::MAX_JUDGED`].
    too_large: std::collections::HashSet<u64>,
    /// The last revision seen on `requests/` and on `approvals/` (`None`: read
    /// everything, as after a start, a compaction or a change of settings).
    resume: Option<Resume>,
}

/// Where the two watches resume, and under which settings they were read (another
/// etcd, prefix, name or groups means reading everything again).
#[derive(Debug, Clone)]
struct Resume {
    requests: i64,
    approvals: i64,
    settings: Fleet,
}

/// A request this host answered with something here: its lease (for the status
/// record), whether it waits for an approver, and until when it is open.
#[derive(Debug, Clone, Copy)]
struct Answered {
    lease: i64,
    waiting: bool,
    until: Option<DateTime<Utc>>,
}

impl Memory {
    /// The memory after a restart: the requests the audit log names, judged.
    fn restored(seen: &BTreeMap<String, DateTime<Utc>>) -> Memory {
        let judged = seen
            .iter()
            .map(|(id, t)| (id.clone(), *t + crate::store::FLEET_MEMORY))
            .collect();
        Memory {
            judged,
            ..Memory::default()
        }
    }

    fn forget_old(&mut self, now: DateTime<Utc>) {
        self.judged.retain(|_, end| *end > now);
        self.approvals.retain(|_, end| *end > now);
    }
}

/// Why a session with etcd ended without an error.
enum Ended {
    Stop,
    /// A reload changed the host's name, groups or etcd settings, or turned `[fleet]` off.
    Changed,
}

/// Runs the fleet watcher until the stop: idle while `[fleet]` is off, otherwise in
/// sessions with etcd, reconnecting after every failure and at once after a change of
/// the fleet settings.
pub(super) async fn run<F: Firewall>(daemon: Arc<Daemon<F>>, mut stop: Stopping) -> TaskResult {
    let mut memory = Memory::restored(&daemon.fleet_seen);
    let mut backoff = BACKOFF.0;
    loop {
        let Some(fleet) = daemon.config().fleet else {
            memory.resume = None;
            tokio::select! {
                _ = tokio::time::sleep(KEEP_ALIVE) => continue,
                _ = stopped(&mut stop) => return Ok(()),
            }
        };
        if memory
            .resume
            .as_ref()
            .is_some_and(|r| !r.settings.same_membership(&fleet))
        {
            memory.resume = None;
        }
        if fleet.plaintext() {
            tracing::warn!("fleet: etcd endpoints are plain http://: anyone on the path can read and write the fleet's keys (signatures still decide what opens)");
        }
        tracing::info!(name = %fleet.name, groups = ?fleet.groups, "joining the fleet at {}", fleet.endpoints.join(", "));
        let started = std::time::Instant::now();
        match session(&daemon, &fleet, &mut memory, &mut stop).await {
            Ok(Ended::Stop) => return Ok(()),
            Ok(Ended::Changed) => {
                tracing::info!("fleet: the settings changed; joining again");
                backoff = BACKOFF.0;
                continue;
            }
            Err(e) => tracing::warn!("fleet: {e}; reconnecting"),
        }
        if started.elapsed() > Duration::from_secs(30) {
            backoff = BACKOFF.0;
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stopped(&mut stop) => return Ok(()),
        }
        backoff = (backoff * 2).min(BACKOFF.1);
    }
}

/// One connection: register, catch up (resume or re-read), watch, until an error, a
/// settings change or the stop.
async fn session<F: Firewall>(
    daemon: &Daemon<F>,
    fleet: &Fleet,
    memory: &mut Memory,
    stop: &mut Stopping,
) -> Result<Ended, String> {
    let keys = Keys::new(&fleet.prefix);
    let mut client = connect::connect(&fleet.endpoints, fleet.tls.as_ref()).await?;
    let (lease, mut registered, mut keeper) = join(daemon, fleet, &keys, &mut client).await?;
    let mut judge = apply::Judge {
        daemon,
        fleet,
        keys: &keys,
        client: &mut client,
        memory,
    };
    let resume = catch_up(&mut judge).await?;
    let mut requests = connect::watch(judge.client, &keys.requests(), resume.requests + 1).await?;
    let mut approvals = connect::watch(judge.client, &keys.approvals(), resume.approvals + 1).await?;
    tracing::info!(
        revision = resume.requests,
        "fleet: registered as {} and watching requests",
        fleet.name
    );
    let mut tick = tokio::time::interval(KEEP_ALIVE);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                keeper.renew().await?;
                if !daemon.config().fleet.is_some_and(|now| now.same_membership(fleet)) {
                    let _ = judge.client.lease_revoke(lease).await;
                    return Ok(Ended::Changed);
                }
                registered = register(daemon, fleet, &keys, judge.client, lease, Some(registered)).await?;
                judge.upkeep().await;
            }
            message = requests.message() => {
                for event in events(message, &mut judge.memory.resume)? {
                    on_request(&mut judge, &event).await?;
                }
            }
            message = approvals.message() => {
                for event in events(message, &mut judge.memory.resume)? {
                    if let (EventType::Put, Some(kv)) = (event.event_type(), event.kv()) {
                        judge.approve_one(kv).await;
                    }
                    note_seen(&mut judge.memory.resume, event.kv(), |r| &mut r.approvals);
                }
            }
            _ = stopped(stop) => {
                // leave the fleet at once rather than by the lease's expiry
                let _ = judge.client.lease_revoke(lease).await;
                return Ok(Ended::Stop);
            }
        }
    }
}

/// Where the watches start: the last revision seen, or, when there is none to resume
/// from, everything read again.
async fn catch_up<F: Firewall>(judge: &mut apply::Judge<'_, F>) -> Result<Resume, String> {
    if let Some(r) = judge.memory.resume.clone() {
        return Ok(r);
    }
    let revision = judge.reread().await?;
    let r = Resume {
        requests: revision,
        approvals: revision,
        settings: judge.fleet.clone(),
    };
    judge.memory.resume = Some(r.clone());
    Ok(r)
}

/// One event under `requests/`: a put is judged, a deletion withdraws. Only once that
/// is done is the event seen: an error (etcd unreachable while judging, a grant that
/// would not close) ends the session, and the next one handles the event again.
async fn on_request<F: Firewall>(judge: &mut apply::Judge<'_, F>, event: &etcd_client::Event) -> Result<(), String> {
    let Some(kv) = event.kv() else { return Ok(()) };
    match event.event_type() {
        EventType::Put => judge.judge_one(kv).await?,
        EventType::Delete => {
            if let Some(id) = judge.keys.request_id(kv.key_str().unwrap_or("")) {
                judge.withdraw(id, "the request was deleted or its lease ended").await?;
            }
        }
    }
    note_seen(&mut judge.memory.resume, Some(kv), |r| &mut r.requests);
    Ok(())
}

/// Moves a watch's resume point past `kv`'s revision.
fn note_seen(resume: &mut Option<Resume>, kv: Option<&KeyValue>, which: fn(&mut Resume) -> &mut i64) {
    if let (Some(r), Some(kv)) = (resume.as_mut(), kv) {
        let seen = which(r);
        *seen = (*seen).max(kv.mod_revision());
    }
}

/// This host's registration lease, renewed while the session lasts.
struct Keeper {
    keeper: LeaseKeeper,
    kept: LeaseKeepAliveStream,
}

impl Keeper {
    /// Renews the lease; an error when etcd does not answer in time or the lease is gone.
    async fn renew(&mut self) -> Result<(), String> {
        self.keeper
            .keep_alive()
            .await
            .map_err(|e| format!("renewing the host lease: {e}"))?;
        match tokio::time::timeout(KEEP_ALIVE, self.kept.message()).await {
            Ok(Ok(Some(r))) if r.ttl() > 0 => Ok(()),
            Ok(Err(e)) => Err(format!("renewing the host lease: {e}")),
            Ok(_) => Err("the host lease is gone".into()),
            Err(_) => Err("etcd did not answer the lease renewal in time".into()),
        }
    }
}

/// Grants the host lease, registers under it and starts renewing it.
async fn join<F: Firewall>(
    daemon: &Daemon<F>,
    fleet: &Fleet,
    keys: &Keys,
    client: &mut Client,
) -> Result<(i64, HostRecord, Keeper), String> {
    let lease = client
        .lease_grant(HOST_TTL, None)
        .await
        .map_err(|e| format!("granting the host lease: {e}"))?
        .id();
    let registered = register(daemon, fleet, keys, client, lease, None).await?;
    let (keeper, kept) = client
        .lease_keep_alive(lease)
        .await
        .map_err(|e| format!("keeping hosts/{} alive: {e}", fleet.name))?;
    Ok((lease, registered, Keeper { keeper, kept }))
}

/// Completes once the daemon is stopping (holding no borrow of the flag).
async fn stopped(stop: &mut Stopping) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Writes `hosts/<name>` on `lease` unless it would say what `before` says (version,
/// groups, protected ports and health, which a reload or the doctor may change); returns
/// what is registered now.
async fn register<F: Firewall>(
    daemon: &Daemon<F>,
    fleet: &Fleet,
    keys: &Keys,
    client: &mut Client,
    lease: i64,
    before: Option<HostRecord>,
) -> Result<HostRecord, String> {
    let config = daemon.config();
    let health = match daemon.health.summary() {
        None => "unknown".to_string(),
        Some(h) if h.healthy && h.warnings == 0 => "ok".to_string(),
        Some(h) => format!("{} problems, {} warnings", h.problems, h.warnings),
    };
    let record = HostRecord {
        version: env!("CARGO_PKG_VERSION").to_string(),
        groups: fleet.groups.clone(),
        ports: config
            .ports
            .iter()
            .map(|p| format!("{}/{}", p.port, p.protocol))
            .collect(),
        health,
        since: before.as_ref().map_or_else(Utc::now, |b| b.since),
    };
    if before.as_ref() == Some(&record) {
        return Ok(record);
    }
    let value = serde_json::to_string(&record).expect("records serialize");
    client
        .put(keys.host(&fleet.name), value, Some(PutOptions::new().with_lease(lease)))
        .await
        .map_err(|e| format!("registering {}: {e}", keys.host(&fleet.name)))?;
    Ok(record)
}

/// The events of one watch message; an error when the watch failed or ended. When etcd
/// cancelled it for a compacted history, or a response was too large to decode (many
/// large values written while this host was away), the next session reads everything,
/// page by page, instead of resuming.
fn events(
    message: Result<Option<WatchResponse>, etcd_client::Error>,
    resume: &mut Option<Resume>,
) -> Result<Vec<etcd_client::Event>, String> {
    let response = match message {
        Ok(Some(response)) => response,
        Ok(None) => return Err("the watch ended".into()),
        Err(e) => {
            if connect::too_large(&e) {
                *resume = None;
            }
            return Err(format!("the watch failed: {e}"));
        }
    };
    if response.canceled() {
        *resume = None;
        return Err(format!(
            "the watch was cancelled (compacted to {}: {}); reading everything again",
            response.compact_revision(),
            response.cancel_reason()
        ));
    }
    Ok(response.events().to_vec())
}
