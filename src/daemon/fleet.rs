//! The fleet watcher: registers this host under `hosts/<name>` on a lease it keeps
//! alive, reads every live request under `requests/`, then watches the prefix from that
//! revision. Each request for this host is judged ([`crate::fleet::judge`]: grammar,
//! selection, times, the signature against this host's own `allowed_signers`), its
//! lease's remaining TTL read, and handed to the one commit path as a request from a
//! signed caller; the outcome goes to `status/<id>/<host>`. A deleted request (or a
//! revoked lease) revokes what it opened. On any error (etcd unreachable, the watch
//! cancelled or compacted, the lease lost) the watcher reconnects and re-reads
//! everything, closing what is no longer there: the kernel timeouts keep every grant
//! bounded meanwhile, and the socket and knocks never wait on this path.

use crate::audit::limit::{Admit, RefusalLimiter, Subject};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use etcd_client::{Client, EventType, GetOptions, KeyValue, PutOptions, WatchOptions};

use super::upkeep::Stopping;
use super::{Daemon, TaskResult};
use crate::api::protocol::{GrantedReply, RevokeRequest};
use crate::audit::{Action, AuditRecord, Outcome as AuditOutcome};
use crate::domain::{Caller, GrantId, SignedBy};
use crate::firewall::Firewall;
use crate::fleet::judge::{self, Refused};
use crate::fleet::records::{HostRecord, Keys, Outcome, StatusRecord};
use crate::fleet::request::FleetRequest;
use crate::fleet::settings::Fleet;

/// The TTL of this host's registration lease (it drops out this long after dying).
const HOST_TTL: i64 = 10;
/// How often the registration lease is renewed and the connection checked.
const KEEP_ALIVE: Duration = Duration::from_secs(3);
/// Reconnection back-off: first and longest wait.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(250), Duration::from_secs(4));
/// Request ids remembered at most (judged requests within their signed end).
const MAX_JUDGED: usize = 100_000;
/// The longest refusal reason recorded.
const MAX_REASON: usize = 300;

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
/// applied twice), what it opened (so a deletion closes it), and which refusals it
/// audits in full (the first 20 a minute; the rest in a summary).
#[derive(Default)]
struct Memory {
    refusals: RefusalLimiter<Etcd>,
    /// Request id → its signed end (forgotten after it).
    judged: HashMap<String, DateTime<Utc>>,
    /// Request id → what it opened here.
    applied: HashMap<String, Applied>,
}

/// What one request opened on this host.
struct Applied {
    grants: Vec<GrantId>,
    lease: i64,
}

impl Memory {
    fn forget_old(&mut self, now: DateTime<Utc>) {
        self.judged.retain(|_, end| *end > now);
    }
}

/// Why a session with etcd ended.
enum Ended {
    Stop,
}

/// Runs the fleet watcher until the stop, reconnecting after every failure.
pub(super) async fn run<F: Firewall>(daemon: Arc<Daemon<F>>, fleet: Fleet, mut stop: Stopping) -> TaskResult {
    if fleet.plaintext() {
        tracing::warn!("fleet: etcd endpoints are plain http://: anyone on the path can read and write the fleet's keys (signatures still decide what opens)");
    }
    tracing::info!(name = %fleet.name, groups = ?fleet.groups, "joining the fleet at {}", fleet.endpoints.join(", "));
    let mut memory = Memory::default();
    let mut backoff = BACKOFF.0;
    loop {
        let started = std::time::Instant::now();
        match session(&daemon, &fleet, &mut memory, &mut stop).await {
            Ok(Ended::Stop) => return Ok(()),
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

/// One connection: register, re-read, watch, until an error or the stop.
async fn session<F: Firewall>(
    daemon: &Daemon<F>,
    fleet: &Fleet,
    memory: &mut Memory,
    stop: &mut Stopping,
) -> Result<Ended, String> {
    let keys = Keys::new(&fleet.prefix);
    let mut client = crate::fleet::connect::connect(&fleet.endpoints, fleet.tls.as_ref()).await?;
    let lease = register(daemon, fleet, &keys, &mut client).await?;
    let (mut keeper, mut kept) = client
        .lease_keep_alive(lease)
        .await
        .map_err(|e| format!("keeping hosts/{} alive: {e}", fleet.name))?;
    let revision = reread(daemon, fleet, &keys, &mut client, memory).await?;
    let options = WatchOptions::new().with_prefix().with_start_revision(revision + 1);
    let mut watch = client
        .watch(keys.requests(), Some(options))
        .await
        .map_err(|e| format!("watching {}: {e}", keys.requests()))?;
    tracing::info!(revision, "fleet: registered as {} and watching requests", fleet.name);
    let mut tick = tokio::time::interval(KEEP_ALIVE);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                keeper.keep_alive().await.map_err(|e| format!("renewing the host lease: {e}"))?;
                match tokio::time::timeout(KEEP_ALIVE, kept.message()).await {
                    Ok(Ok(Some(r))) if r.ttl() > 0 => {}
                    Ok(Err(e)) => return Err(format!("renewing the host lease: {e}")),
                    Ok(_) => return Err("the host lease is gone".into()),
                    Err(_) => return Err("etcd did not answer the lease renewal in time".into()),
                }
                memory.forget_old(Utc::now());
                let due = memory.refusals.due_summaries(Utc::now());
                if !due.is_empty() {
                    let _ = daemon.jobs.send(super::Job::Record(due)).await;
                }
            }
            message = watch.message() => {
                let response = message
                    .map_err(|e| format!("the watch failed: {e}"))?
                    .ok_or("the watch ended")?;
                if response.canceled() {
                    return Err(format!(
                        "the watch was cancelled (compacted to {}: {}); re-reading everything",
                        response.compact_revision(),
                        response.cancel_reason()
                    ));
                }
                for event in response.events() {
                    let Some(kv) = event.kv() else { continue };
                    match event.event_type() {
                        EventType::Put => judge_one(daemon, fleet, &keys, &mut client, memory, kv).await,
                        EventType::Delete => withdraw(daemon, fleet, &keys, &mut client, memory, kv.key_str().unwrap_or("")).await,
                    }
                }
            }
            _ = stopped(stop) => {
                // leave the fleet at once rather than by the lease's expiry
                let _ = client.lease_revoke(lease).await;
                return Ok(Ended::Stop);
            }
        }
    }
}

/// Completes once the daemon is stopping (holding no borrow of the flag).
async fn stopped(stop: &mut Stopping) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Writes `hosts/<name>` on a new lease; returns the lease.
async fn register<F: Firewall>(
    daemon: &Daemon<F>,
    fleet: &Fleet,
    keys: &Keys,
    client: &mut Client,
) -> Result<i64, String> {
    let lease = client
        .lease_grant(HOST_TTL, None)
        .await
        .map_err(|e| format!("granting the host lease: {e}"))?
        .id();
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
        since: Utc::now(),
    };
    let value = serde_json::to_string(&record).expect("records serialize");
    client
        .put(keys.host(&fleet.name), value, Some(PutOptions::new().with_lease(lease)))
        .await
        .map_err(|e| format!("registering {}: {e}", keys.host(&fleet.name)))?;
    Ok(lease)
}

/// Reads every live request, judges the new ones and withdraws what this host opened
/// for requests no longer there; returns the revision read at.
async fn reread<F: Firewall>(
    daemon: &Daemon<F>,
    fleet: &Fleet,
    keys: &Keys,
    client: &mut Client,
    memory: &mut Memory,
) -> Result<i64, String> {
    let response = client
        .get(keys.requests(), Some(GetOptions::new().with_prefix()))
        .await
        .map_err(|e| format!("reading {}: {e}", keys.requests()))?;
    let revision = response.header().map_or(0, |h| h.revision());
    let mut live = HashSet::new();
    for kv in response.kvs() {
        if let Some(id) = kv.key_str().ok().and_then(|k| keys.request_id(k)) {
            live.insert(id.to_string());
        }
        judge_one(daemon, fleet, keys, client, memory, kv).await;
    }
    let gone: Vec<String> = memory
        .applied
        .keys()
        .filter(|id| !live.contains(*id))
        .cloned()
        .collect();
    for id in gone {
        withdraw(daemon, fleet, keys, client, memory, &keys.request(&id)).await;
    }
    Ok(revision)
}

/// Judges one request put under `requests/` (once per id) and records the outcome.
async fn judge_one<F: Firewall>(
    daemon: &Daemon<F>,
    fleet: &Fleet,
    keys: &Keys,
    client: &mut Client,
    memory: &mut Memory,
    kv: &KeyValue,
) {
    let key = kv.key_str().unwrap_or("");
    let Some(id) = keys.request_id(key).map(str::to_string) else {
        return refuse(
            daemon,
            &mut memory.refusals,
            key,
            None,
            Refused::malformed("the key is not requests/<32 hex digits>"),
        )
        .await;
    };
    if memory.judged.contains_key(&id) {
        return; // nothing is applied twice: a re-put of a judged id changes nothing
    }
    if memory.judged.len() >= MAX_JUDGED {
        return refuse(
            daemon,
            &mut memory.refusals,
            &id,
            None,
            Refused::malformed("too many live requests remembered"),
        )
        .await;
    }
    let verdict = decide(daemon, fleet, client, &id, kv).await;
    let (outcome, until, reason) = match verdict {
        Verdict::NotForUs(end) => {
            memory.judged.insert(id, end);
            return;
        }
        Verdict::Refused(refused, end, signer) => {
            let status = !matches!(refused.code, "malformed" | "id_mismatch");
            memory.judged.insert(
                id.clone(),
                end.unwrap_or_else(|| Utc::now() + chrono::TimeDelta::hours(24)),
            );
            let reason = format!("{}: {}", refused.code, refused.reason);
            refuse(daemon, &mut memory.refusals, &id, signer, refused).await;
            if !status {
                return;
            }
            (Outcome::Denied, None, Some(reason))
        }
        Verdict::Applied { end, grants, until } => {
            memory.judged.insert(id.clone(), end);
            memory.applied.insert(
                id.clone(),
                Applied {
                    grants,
                    lease: kv.lease(),
                },
            );
            (Outcome::Approved, Some(until), None)
        }
        Verdict::Denied(end, reason) => {
            memory.judged.insert(id.clone(), end);
            (Outcome::Denied, None, Some(reason))
        }
    };
    write_status(fleet, keys, client, &id, kv.lease(), outcome, until, reason).await;
}

/// What became of one request on this host.
enum Verdict {
    /// It does not select this host (remembered until its signed end).
    NotForUs(DateTime<Utc>),
    /// Refused before the policy (audited here), with who signed it when known.
    Refused(Refused, Option<DateTime<Utc>>, Option<SignedBy>),
    /// The policy refused it (the commit path audited it).
    Denied(DateTime<Utc>, String),
    /// Open until `until`.
    Applied {
        end: DateTime<Utc>,
        grants: Vec<GrantId>,
        until: DateTime<Utc>,
    },
}

/// Judges, verifies, reads the lease and submits one request.
async fn decide<F: Firewall>(
    daemon: &Daemon<F>,
    fleet: &Fleet,
    client: &mut Client,
    id: &str,
    kv: &KeyValue,
) -> Verdict {
    let fleet_now = daemon.config().fleet.unwrap_or_else(|| fleet.clone()); // signers as reloaded
    let screened = match judge::screen(id, kv.value(), &fleet_now, Utc::now()) {
        Ok(Some(s)) => s,
        Ok(None) => {
            let end = FleetRequest::parse(crate::fleet::request::split(kv.value()).map_or("", |(t, _)| t))
                .map_or_else(|_| Utc::now(), |r| r.signed_end());
            return Verdict::NotForUs(end);
        }
        Err(r) => return Verdict::Refused(r, None, None),
    };
    let end = screened.request.signed_end();
    let verified = tokio::task::spawn_blocking(move || judge::verify(screened, Utc::now())).await;
    let (request, by) = match verified {
        Ok(Ok(v)) => v,
        Ok(Err(r)) => return Verdict::Refused(r, Some(end), None),
        Err(e) => {
            return Verdict::Refused(
                Refused::malformed(&format!("verification failed: {e}")),
                Some(end),
                None,
            )
        }
    };
    let signer = SignedBy {
        principals: by.principals,
        fingerprint: by.fingerprint,
        peer: None,
        nonce: Some(id.to_string()),
        certificate: by.certificate.map(|c| {
            format!(
                "key id \"{}\" serial {} from CA {}",
                crate::text::escape_capped(&c.key_id, 100),
                c.serial,
                c.ca_fingerprint
            )
        }),
    };
    let left = lease_left(client, kv.lease()).await;
    let until = match judge::open_until(&request, left, Utc::now()) {
        Ok(until) => until,
        Err(r) => return Verdict::Refused(r, Some(end), Some(signer)),
    };
    let reply = daemon
        .request(Caller::signed(signer), judge::grant_request(&request, until))
        .await;
    match (reply.error, reply.result) {
        (Some(e), _) => Verdict::Denied(end, format!("{}: {}", e.code, e.message)),
        (None, result) => {
            let granted: Option<GrantedReply> = result.and_then(|r| serde_json::from_value(r).ok());
            let grants: Vec<GrantId> = granted
                .map(|g| g.grants.iter().map(|g| g.id).collect())
                .unwrap_or_default();
            tracing::info!(request = %id, ?grants, "fleet request approved until {until}");
            Verdict::Applied { end, grants, until }
        }
    }
}

/// The remaining TTL of `lease`, read from etcd; `None` when there is none or it is gone.
async fn lease_left(client: &mut Client, lease: i64) -> Option<Duration> {
    if lease == 0 {
        return None;
    }
    let ttl = client.lease_time_to_live(lease, None).await.ok()?.ttl();
    (ttl > 0).then(|| Duration::from_secs(ttl as u64))
}

/// A request deleted (or its lease revoked or expired): revokes what it opened here.
async fn withdraw<F: Firewall>(
    daemon: &Daemon<F>,
    fleet: &Fleet,
    keys: &Keys,
    client: &mut Client,
    memory: &mut Memory,
    key: &str,
) {
    let Some(id) = keys.request_id(key) else { return };
    let Some(applied) = memory.applied.remove(id) else {
        return;
    };
    let caller = Caller {
        uid: 0,
        name: "fleet".into(),
        groups: Vec::new(),
        signer: None,
    };
    for grant in &applied.grants {
        let request = RevokeRequest {
            id: Some(*grant),
            ..Default::default()
        };
        let reply = daemon.revoke(caller.clone(), request).await;
        match reply.error {
            None => tracing::info!(request = %id, grant, "fleet request withdrawn: grant revoked"),
            // already ended (expired, superseded): nothing left to close
            Some(e) => tracing::debug!(request = %id, grant, "fleet request withdrawn: {}", e.message),
        }
    }
    write_status(fleet, keys, client, id, applied.lease, Outcome::Revoked, None, None).await;
}

/// Writes `status/<id>/<host>`, on the request's lease when it has one (so the answer
/// goes with the request); a failure is only logged (the host's own audit is the record).
#[allow(clippy::too_many_arguments)]
async fn write_status(
    fleet: &Fleet,
    keys: &Keys,
    client: &mut Client,
    id: &str,
    lease: i64,
    outcome: Outcome,
    until: Option<DateTime<Utc>>,
    reason: Option<String>,
) {
    let record = StatusRecord {
        host: fleet.name.clone(),
        outcome,
        until,
        reason,
        time: Utc::now(),
    };
    let value = serde_json::to_string(&record).expect("records serialize");
    let options = (lease != 0).then(|| PutOptions::new().with_lease(lease));
    if let Err(e) = client.put(keys.status(id, &fleet.name), value, options).await {
        tracing::debug!(request = %id, "fleet: status not written: {e}");
    }
}

/// Audits a fleet request refused before the policy: in full, or counted into the next
/// summary when many come at once.
async fn refuse<F: Firewall>(
    daemon: &Daemon<F>,
    limiter: &mut RefusalLimiter<Etcd>,
    id: &str,
    signer: Option<SignedBy>,
    refused: Refused,
) {
    tracing::info!(request = %id, code = refused.code, "fleet request refused: {}", refused.reason);
    let mut records = limiter.due_summaries(Utc::now());
    if limiter.admit(Etcd, "etcd", refused.code, Utc::now()) == Admit::Count {
        if !records.is_empty() {
            let _ = daemon.jobs.send(super::Job::Record(records)).await;
        }
        return;
    }
    let actor = signer
        .as_ref()
        .and_then(|s| s.principals.first())
        .map_or_else(|| "-".to_string(), |p| format!("principal:{p}"));
    let mut r = AuditRecord::new(Utc::now(), None, &actor, Action::Fleet, AuditOutcome::Denied);
    let why = crate::text::escape_capped(&refused.reason, MAX_REASON);
    r.reason = Some(format!(
        "{}: request {}: {why}",
        refused.code,
        crate::text::escape_capped(id, 80)
    ));
    if let Some(s) = signer {
        r.principals = s.principals;
        r.key = Some(s.fingerprint);
    }
    records.push(r);
    let _ = daemon.jobs.send(super::Job::Record(records)).await;
}
