//! How the watcher answers the requests it reads: judge one once ([`Judge::judge_one`]:
//! the pure checks of [`crate::fleet::judge`], the signature, the lease's remaining
//! TTL, then the daemon's one commit path as a signed caller), withdraw what a request
//! opened when it goes ([`Judge::withdraw`]), follow requests waiting for an approver
//! here, and write each answer to `status/<id>/<host>`.

use std::collections::HashSet;
use std::time::Duration;

use chrono::{DateTime, Utc};
use etcd_client::{Client, KeyValue, PutOptions};

use super::{read_all, Answered, Etcd, Memory};
use crate::api::protocol::{GrantedReply, PendingInfo, RevokeRequest};
use crate::audit::limit::{Admit, RefusalLimiter};
use crate::audit::{Action, AuditRecord, Outcome as AuditOutcome};
use crate::daemon::approvals::Decision;
use crate::daemon::Daemon;
use crate::domain::{Caller, FleetOrigin, GrantId, SignedBy};
use crate::firewall::Firewall;
use crate::fleet::judge::{self, Refused};
use crate::fleet::records::{Keys, Outcome, StatusRecord};
use crate::fleet::request::FleetRequest;
use crate::fleet::settings::Fleet;

/// Request ids remembered at most (judged requests within their signed end).
const MAX_JUDGED: usize = 100_000;
/// The longest refusal reason recorded.
const MAX_REASON: usize = 300;

/// What one session needs to answer requests.
pub(super) struct Judge<'a, F: Firewall> {
    pub daemon: &'a Daemon<F>,
    pub fleet: &'a Fleet,
    pub keys: &'a Keys,
    pub client: &'a mut Client,
    pub memory: &'a mut Memory,
}

/// What became of one request on this host.
enum Verdict {
    /// It does not select this host (nothing to do, nothing to remember).
    NotForUs,
    /// Refused before the policy (audited here), with who signed it when known.
    Refused(Refused, Option<DateTime<Utc>>, Option<SignedBy>),
    /// The policy refused it (the commit path audited it).
    Denied(DateTime<Utc>, String),
    /// Open until `until`.
    Applied { end: DateTime<Utc>, until: DateTime<Utc> },
    /// Waiting for an approver on this host.
    Waiting { end: DateTime<Utc>, pending: PendingInfo },
}

/// What a fleet request has on this host now: its grants (with their ends) and the
/// requests waiting for approval.
#[derive(Debug, Default)]
pub(super) struct Here {
    grants: Vec<(GrantId, DateTime<Utc>)>,
    pending: Vec<GrantId>,
}

impl Here {
    fn is_empty(&self) -> bool {
        self.grants.is_empty() && self.pending.is_empty()
    }
}

impl<F: Firewall> Daemon<F> {
    /// What fleet request `id` has on this host, read from the grant and pending books.
    fn fleet_here(&self, id: &str) -> Here {
        let st = self.lock();
        let of = |o: Option<&FleetOrigin>| o.is_some_and(|o| o.request == id);
        Here {
            grants: st
                .book
                .iter()
                .filter(|g| of(g.fleet.as_ref()))
                .map(|g| (g.id, g.expires_at))
                .collect(),
            pending: st
                .pending
                .iter()
                .filter(|(r, _)| of(r.requester.signer.as_ref().and_then(|s| s.fleet.as_ref())))
                .map(|(r, _)| r.id)
                .collect(),
        }
    }

    /// The fleet request `id` as a grant or pending request here names it.
    fn fleet_origin(&self, id: &str) -> Option<FleetOrigin> {
        let st = self.lock();
        let mut pending = st
            .pending
            .iter()
            .filter_map(|(r, _)| r.requester.signer.as_ref()?.fleet.as_ref());
        let mut grants = st.book.iter().filter_map(|g| g.fleet.as_ref());
        let origin = |o: &&FleetOrigin| o.request == id;
        pending.find(origin).or_else(|| grants.find(origin)).cloned()
    }

    /// The requests of fleet request `id` waiting here for an approver: their ids, ports
    /// and source.
    fn fleet_waiting(&self, id: &str) -> Vec<(GrantId, Vec<u16>, ipnet::IpNet)> {
        let st = self.lock();
        st.pending
            .iter()
            .filter(|(r, _)| {
                let origin = r.requester.signer.as_ref().and_then(|s| s.fleet.as_ref());
                origin.is_some_and(|o| o.request == id)
            })
            .map(|(r, _)| (r.id, r.ports.clone(), r.source))
            .collect()
    }

    /// The fleet requests with a grant or a pending request on this host.
    fn fleet_requests_here(&self) -> HashSet<String> {
        let st = self.lock();
        let grants = st.book.iter().filter_map(|g| g.fleet.as_ref());
        let pending = st
            .pending
            .iter()
            .filter_map(|(r, _)| r.requester.signer.as_ref().and_then(|s| s.fleet.as_ref()));
        grants.chain(pending).map(|o| o.request.clone()).collect()
    }
}

/// The caller the watcher acts as when it closes what a request opened.
fn fleet_caller() -> Caller {
    Caller {
        uid: 0,
        name: "fleet".into(),
        groups: Vec::new(),
        signer: None,
    }
}

impl<F: Firewall> Judge<'_, F> {
    /// Reads every live request, judges the new ones and withdraws what this host has
    /// for requests no longer there; returns the revision read at.
    pub async fn reread(&mut self) -> Result<i64, String> {
        let response = read_all(self.client, &self.keys.requests()).await?;
        let revision = response.header().map_or(0, |h| h.revision());
        let mut live = HashSet::new();
        for kv in response.kvs() {
            if let Some(id) = kv.key_str().ok().and_then(|k| self.keys.request_id(k)) {
                live.insert(id.to_string());
            }
            self.judge_one(kv).await;
        }
        let mut gone: Vec<String> = self.daemon.fleet_requests_here().into_iter().collect();
        gone.extend(self.memory.answered.keys().cloned());
        gone.retain(|id| !live.contains(id));
        gone.sort();
        gone.dedup();
        for id in gone {
            self.withdraw(
                &id,
                "the request was deleted or its lease ended while this host was away",
            )
            .await;
        }
        for kv in read_all(self.client, &self.keys.approvals()).await?.kvs() {
            self.approve_one(kv).await;
        }
        Ok(revision)
    }

    /// Judges one request put under `requests/` (once per id) and records the outcome.
    pub async fn judge_one(&mut self, kv: &KeyValue) {
        let key = kv.key_str().unwrap_or("");
        let Some(id) = self.keys.request_id(key).map(str::to_string) else {
            let refused = Refused::malformed("the key is not requests/<32 hex digits>");
            return self.refuse(key, None, None, refused).await;
        };
        if self.memory.judged.contains_key(&id) {
            return self.judged_before(&id, kv).await;
        }
        if self.memory.judged.len() >= MAX_JUDGED {
            let refused = Refused::malformed("too many live requests remembered");
            return self.refuse(key, Some(&id), None, refused).await;
        }
        let (outcome, until, reason) = match self.decide(&id, kv).await {
            Verdict::NotForUs => return,
            Verdict::Refused(refused, end, signer) => {
                let status = !matches!(refused.code, "malformed" | "id_mismatch");
                let end = end.unwrap_or_else(|| Utc::now() + chrono::TimeDelta::hours(24));
                self.memory.judged.insert(id.clone(), end);
                let reason = format!("{}: {}", refused.code, refused.reason);
                self.refuse(key, Some(&id), signer, refused).await;
                if !status {
                    return;
                }
                (Outcome::Denied, None, Some(reason))
            }
            Verdict::Applied { end, until } => {
                self.remember(&id, end, kv.lease(), false);
                (Outcome::Approved, Some(until), None)
            }
            Verdict::Waiting { end, pending } => {
                self.remember(&id, end, kv.lease(), true);
                let why = format!(
                    "waiting for an approver on this host: jitctl approve {} (times out {})",
                    pending.id,
                    pending.times_out_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                );
                self.write_status(&id, kv.lease(), Outcome::Pending, Some(pending.times_out_at), Some(why))
                    .await;
                // an approval may be there already (written while this host was away)
                if let Ok(got) = read_all(self.client, &self.keys.approvals_of(&id)).await {
                    for approval in got.kvs() {
                        self.approve_one(approval).await;
                    }
                }
                return;
            }
            Verdict::Denied(end, reason) => {
                self.memory.judged.insert(id.clone(), end);
                (Outcome::Denied, None, Some(reason))
            }
        };
        self.write_status(&id, kv.lease(), outcome, until, reason).await;
    }

    fn remember(&mut self, id: &str, end: DateTime<Utc>, lease: i64, waiting: bool) {
        self.memory.judged.insert(id.to_string(), end);
        self.memory.answered.insert(id.to_string(), Answered { lease, waiting });
    }

    /// A request judged before (in this run, or before a restart): never applied again.
    /// What it has here is kept while it still selects this host, and withdrawn when a
    /// change of name or groups means it no longer does.
    async fn judged_before(&mut self, id: &str, kv: &KeyValue) {
        let here = self.daemon.fleet_here(id);
        if here.is_empty() && !self.memory.answered.contains_key(id) {
            return;
        }
        let selected = !matches!(judge::screen(id, kv.value(), self.fleet, Utc::now()), Ok(None));
        if !selected {
            return self
                .withdraw(id, "this host is no longer among the hosts it names")
                .await;
        }
        let waiting = here.grants.is_empty();
        self.memory.answered.entry(id.to_string()).or_insert(Answered {
            lease: kv.lease(),
            waiting,
        });
    }

    /// Judges, verifies, reads the lease and submits one request.
    async fn decide(&mut self, id: &str, kv: &KeyValue) -> Verdict {
        let fleet_now = self.daemon.config().fleet.unwrap_or_else(|| self.fleet.clone()); // signers as reloaded
        let screened = match judge::screen(id, kv.value(), &fleet_now, Utc::now()) {
            Ok(Some(s)) => s,
            Ok(None) => return Verdict::NotForUs,
            Err(r) => return Verdict::Refused(r, None, None),
        };
        let end = screened.request.signed_end();
        let verified = tokio::task::spawn_blocking(move || judge::verify(screened, Utc::now())).await;
        let (request, by) = match verified {
            Ok(Ok(v)) => v,
            Ok(Err(r)) => return Verdict::Refused(r, Some(end), None),
            Err(e) => {
                let why = format!("verification failed: {e}");
                return Verdict::Refused(Refused::malformed(&why), Some(end), None);
            }
        };
        let signer = signed_by(by, &request);
        let left = lease_left(self.client, kv.lease()).await;
        let until = match judge::open_until(&request, left, Utc::now()) {
            Ok(until) => until,
            Err(r) => return Verdict::Refused(r, Some(end), Some(signer)),
        };
        let reply = self
            .daemon
            .request(Caller::signed(signer), judge::grant_request(&request, until))
            .await;
        if let Some(e) = reply.error {
            return Verdict::Denied(end, format!("{}: {}", e.code, e.message));
        }
        let granted: Option<GrantedReply> = reply.result.and_then(|r| serde_json::from_value(r).ok());
        match granted.and_then(|g| g.pending) {
            Some(pending) => {
                tracing::info!(request = %id, pending = pending.id, "fleet request waits for an approver here");
                Verdict::Waiting { end, pending }
            }
            None => {
                tracing::info!(request = %id, "fleet request approved until {until}");
                Verdict::Applied { end, until }
            }
        }
    }

    /// A request deleted (or its lease revoked or expired), or no longer selecting this
    /// host: revokes its grants here, turns down its requests waiting here, and says so
    /// in its status (when this host answered it in this run).
    pub async fn withdraw(&mut self, id: &str, why: &str) {
        let here = self.daemon.fleet_here(id);
        let answered = self.memory.answered.remove(id);
        if here.is_empty() && answered.is_none() {
            return;
        }
        for (grant, _) in &here.grants {
            let request = RevokeRequest {
                id: Some(*grant),
                ..Default::default()
            };
            let reply = self.daemon.revoke(fleet_caller(), request).await;
            match reply.error {
                None => tracing::info!(request = %id, grant, "fleet request withdrawn ({why}): grant revoked"),
                // already ended (expired, superseded): nothing left to close
                Some(e) => tracing::debug!(request = %id, grant, "fleet request withdrawn: {}", e.message),
            }
        }
        for pending in &here.pending {
            let reason = format!("fleet request {id} withdrawn: {why}");
            let reply = self
                .daemon
                .decide(fleet_caller(), Decision::deny(*pending, reason, None))
                .await;
            if let Some(e) = reply.error {
                tracing::debug!(request = %id, pending, "fleet request withdrawn: {}", e.message);
            }
        }
        if let Some(a) = answered {
            let reason = Some(why.to_string());
            self.write_status(id, a.lease, Outcome::Revoked, None, reason).await;
        }
    }

    /// The tick's upkeep: forgets requests past their end, writes due refusal summaries,
    /// and answers again for requests that waited for an approver here and were decided.
    pub async fn upkeep(&mut self) {
        self.memory.forget_old(Utc::now());
        let due = self.memory.refusals.due_summaries(Utc::now());
        if !due.is_empty() {
            let _ = self.daemon.jobs.send(crate::daemon::Job::Record(due)).await;
        }
        let waiting: Vec<String> = self
            .memory
            .answered
            .iter()
            .filter(|(_, a)| a.waiting)
            .map(|(id, _)| id.clone())
            .collect();
        for id in waiting {
            self.follow(&id).await;
        }
    }

    /// For a request that waited for an approver here: once decided, answers again
    /// (`approved` until its grants' end, or `denied`).
    async fn follow(&mut self, id: &str) {
        let Some(&Answered { lease, waiting: true }) = self.memory.answered.get(id) else {
            return;
        };
        let here = self.daemon.fleet_here(id);
        if let Some(until) = here.grants.iter().map(|(_, end)| *end).max() {
            self.memory
                .answered
                .insert(id.to_string(), Answered { lease, waiting: false });
            self.write_status(id, lease, Outcome::Approved, Some(until), None).await;
        } else if here.pending.is_empty() {
            self.memory.answered.remove(id);
            let why = "not approved on this host (turned down, timed out, or the policy changed)";
            self.write_status(id, lease, Outcome::Denied, None, Some(why.into()))
                .await;
        }
    }

    /// Judges one approval put under `approvals/<id>/` (once per key) for the requests
    /// of `id` waiting here, and hands it to the daemon's decision path as the approver
    /// (which checks the approver role and that approver and requester are two people,
    /// and audits the decision). An approval for a request nothing here waits for is
    /// none of this host's business.
    pub async fn approve_one(&mut self, kv: &KeyValue) {
        let key = kv.key_str().unwrap_or("");
        let Some((id, approval_id)) = self.keys.approval_ids(key) else {
            let refused = Refused::malformed("the key is not approvals/<request id>/<32 hex digits>");
            return self.refuse(key, None, None, refused).await;
        };
        let waiting = self.daemon.fleet_waiting(id);
        if waiting.is_empty() || self.memory.approvals.contains_key(key) {
            return;
        }
        if self.memory.approvals.len() >= MAX_JUDGED {
            let refused = Refused::malformed("too many approvals remembered");
            return self.refuse(key, Some(id), None, refused).await;
        }
        let forget_at = Utc::now() + crate::store::FLEET_MEMORY;
        self.memory.approvals.insert(key.to_string(), forget_at);
        let fleet_now = self.daemon.config().fleet.unwrap_or_else(|| self.fleet.clone());
        let screened = match judge::screen_approval((id, approval_id), kv.value(), &fleet_now, Utc::now()) {
            Ok(s) => s,
            Err(r) => return self.refuse(key, Some(id), None, r).await,
        };
        let verified = tokio::task::spawn_blocking(move || judge::verify_approval(screened, Utc::now())).await;
        let (approval, by) = match verified {
            Ok(Ok(v)) => v,
            Ok(Err(r)) => return self.refuse(key, Some(id), None, r).await,
            Err(e) => {
                return self
                    .refuse(key, Some(id), None, Refused::malformed(&e.to_string()))
                    .await
            }
        };
        let approver = SignedBy {
            fleet: self.daemon.fleet_origin(id),
            ..signer(by)
        };
        for (pending, ports, source) in waiting {
            if let Err(r) = judge::approval_covers(&approval, &ports, &source) {
                self.refuse(key, Some(id), Some(approver.clone()), r).await;
                continue;
            }
            let caller = Caller::signed(approver.clone());
            let reply = self.daemon.decide(caller, Decision::approve(pending, None)).await;
            match reply.error {
                None => {
                    tracing::info!(request = %id, pending, "fleet request approved by {}", approver.principals.join(","))
                }
                // refused and audited by the decision path (not an approver, one's own request)
                Some(e) => tracing::info!(request = %id, pending, "fleet approval refused: {}", e.message),
            }
        }
        self.follow(id).await;
    }

    /// Writes `status/<id>/<host>` on the request's lease, so that the answer goes with
    /// the request (none for a request without a lease: it would outlive everything);
    /// a failure is only logged (the host's own audit is the record).
    async fn write_status(
        &mut self,
        id: &str,
        lease: i64,
        outcome: Outcome,
        until: Option<DateTime<Utc>>,
        reason: Option<String>,
    ) {
        if lease == 0 {
            return;
        }
        let record = StatusRecord {
            host: self.fleet.name.clone(),
            outcome,
            until,
            reason,
            time: Utc::now(),
        };
        let value = serde_json::to_string(&record).expect("records serialize");
        let key = self.keys.status(id, &self.fleet.name);
        let options = Some(PutOptions::new().with_lease(lease));
        if let Err(e) = self.client.put(key, value, options).await {
            tracing::debug!(request = %id, "fleet: status not written: {e}");
        }
    }

    /// Audits a fleet request or approval (under `key`) refused before the policy: in
    /// full (naming the request, so that it is not judged again after a restart), or
    /// counted into the next summary when many come at once.
    async fn refuse(&mut self, key: &str, id: Option<&str>, signer: Option<SignedBy>, refused: Refused) {
        tracing::info!(key = %key, code = refused.code, "fleet key refused: {}", refused.reason);
        let limiter: &mut RefusalLimiter<Etcd> = &mut self.memory.refusals;
        let mut records = limiter.due_summaries(Utc::now());
        if limiter.admit(Etcd, "etcd", refused.code, Utc::now()) == Admit::Count {
            if !records.is_empty() {
                let _ = self.daemon.jobs.send(crate::daemon::Job::Record(records)).await;
            }
            return;
        }
        let actor = signer
            .as_ref()
            .and_then(|s| s.principals.first())
            .map_or_else(|| "-".to_string(), |p| format!("principal:{p}"));
        let mut r = AuditRecord::new(Utc::now(), None, &actor, Action::Fleet, AuditOutcome::Denied);
        let why = crate::text::escape_capped(&refused.reason, MAX_REASON);
        // the key as etcd has it, less the prefix every key shares
        let short = key.strip_prefix(self.fleet.prefix.as_str()).unwrap_or(key);
        r.reason = Some(format!(
            "{}: {}: {why}",
            refused.code,
            crate::text::escape_capped(short, 100)
        ));
        r.fleet_request = id.map(str::to_string);
        if let Some(s) = signer {
            r.principals = s.principals;
            r.key = Some(s.fingerprint);
        }
        records.push(r);
        let _ = self.daemon.jobs.send(crate::daemon::Job::Record(records)).await;
    }
}

/// The signer of a verified fleet request, as the commit path and the audit log see it.
fn signed_by(by: crate::remote::packet::SignedBy, request: &FleetRequest) -> SignedBy {
    SignedBy {
        fleet: Some(FleetOrigin {
            request: request.id(),
            hosts: request.hosts.clone(),
        }),
        ..signer(by)
    }
}

/// Who signed a request or an approval read from etcd (no peer, no nonce: etcd is not
/// a packet).
fn signer(by: crate::remote::packet::SignedBy) -> SignedBy {
    SignedBy {
        principals: by.principals,
        fingerprint: by.fingerprint,
        peer: None,
        nonce: None,
        certificate: by.certificate.map(|c| c.describe()),
        fleet: None,
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
