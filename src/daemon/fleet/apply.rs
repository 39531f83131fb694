//! How the watcher answers the requests it reads: judge one once ([`Judge::judge_one`]:
//! the pure checks of [`crate::fleet::judge`], the signature, the lease's remaining
//! TTL, then the daemon's one commit path as a signed caller), withdraw what a request
//! has here when it goes ([`Judge::withdraw`]), and keep each answer under
//! `status/<id>/<host>` true.

use chrono::{DateTime, Utc};
use etcd_client::{Client, KeyValue};

use super::{Answered, Memory};
use crate::api::protocol::{GrantedReply, PendingInfo, RevokeRequest};
use crate::daemon::job::Decision;
use crate::daemon::Daemon;
use crate::domain::{Caller, ErrorCode, FleetOrigin, SignedBy};
use crate::firewall::Firewall;
use crate::fleet::connect::{lease_left, Entry, Oversized, Pages, MAX_ENTRY};
use crate::fleet::judge::{self, Refused};
use crate::fleet::records::{Keys, Outcome};
use crate::fleet::request::FleetRequest;
use crate::fleet::settings::Fleet;

/// Requests remembered at most (within their signed end). Only requests a known key
/// signed and whose signer holds a role here are remembered (refusals before that, and
/// denials for want of a role, are judged again when read again): filling this takes
/// keys trusted to ask for access.
pub(super) const MAX_JUDGED: usize = 100_000;

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
    /// Refused before the policy (audited here), with who signed it when a known key
    /// did (and the request's signed end).
    Refused(Refused, Option<(SignedBy, DateTime<Utc>)>),
    /// The policy refused it (the commit path audited it); remembered unless its
    /// signer holds no role here.
    Denied {
        end: DateTime<Utc>,
        reason: String,
        remember: bool,
    },
    /// Open until `until`.
    Applied { end: DateTime<Utc>, until: DateTime<Utc> },
    /// Waiting for an approver on this host.
    Waiting { end: DateTime<Utc>, pending: PendingInfo },
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
    /// Reads every live request and approval, page by page, judges the new ones and
    /// withdraws what this host has for requests no longer there; returns the revision
    /// read at. What it holds is one page and the ids this host has something for,
    /// however much is stored under the prefix.
    pub async fn reread(&mut self) -> Result<i64, String> {
        let mut gone: std::collections::HashSet<String> = self.daemon.fleet_requests_here();
        gone.extend(self.memory.answered.keys().cloned());
        let mut seen_too_large = std::collections::HashSet::new();
        let mut pages = Pages::new(self.client, &self.keys.requests());
        while let Some(page) = pages.next().await? {
            for entry in page {
                match entry {
                    Entry::Kv(kv) => {
                        if let Some(id) = kv.key_str().ok().and_then(|k| self.keys.request_id(k)) {
                            gone.remove(id);
                        }
                        self.judge_one(&kv).await?;
                    }
                    Entry::TooLarge(o) => {
                        seen_too_large.insert(mark(&o));
                        self.too_large(&o).await;
                    }
                }
            }
        }
        self.memory.too_large.retain(|m| seen_too_large.contains(m));
        let mut gone: Vec<String> = gone.into_iter().collect();
        gone.sort();
        for id in gone {
            let why = "the request was deleted or its lease ended while this host was away";
            self.withdraw(&id, why).await?;
        }
        self.approvals_under(&self.keys.approvals()).await?;
        Ok(pages.revision())
    }

    /// Reads the approvals under `prefix` page by page and judges each.
    async fn approvals_under(&mut self, prefix: &str) -> Result<(), String> {
        let mut pages = Pages::new(self.client, prefix);
        while let Some(page) = pages.next().await? {
            for entry in page {
                match entry {
                    Entry::Kv(kv) => self.approve_one(&kv).await,
                    Entry::TooLarge(o) => {
                        // audited only where it could matter: beside a request waiting here
                        let key = String::from_utf8_lossy(&o.key);
                        let waiting = self.keys.approval_ids(&key).map(|(id, _)| id.to_string());
                        if waiting.is_some_and(|id| !self.daemon.fleet_here(&id).pending.is_empty()) {
                            self.too_large(&o).await;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// An entry too large to be a request or an approval (never decoded whole):
    /// audited once per write (within the refusal budget), and a request this host
    /// has something for under that key is withdrawn (its value is no request now).
    async fn too_large(&mut self, o: &Oversized) {
        let key = String::from_utf8_lossy(&o.key).into_owned();
        if let Some(id) = self.keys.request_id(&key).map(str::to_string) {
            if !self.daemon.fleet_here(&id).is_empty() || self.memory.answered.contains_key(&id) {
                let why = "its value was replaced by one too large to be a request";
                if let Err(e) = self.withdraw(&id, why).await {
                    tracing::warn!("fleet: {e}");
                }
            }
        }
        let mark = mark(o);
        if self.memory.too_large.contains(&mark) {
            return;
        }
        if self.memory.too_large.len() < MAX_JUDGED {
            self.memory.too_large.insert(mark);
        }
        let size = o.size.map_or_else(|| "not read".to_string(), |n| format!("{n} bytes"));
        let why = format!("larger than {MAX_ENTRY} bytes ({size}): skipped unread");
        self.refuse(&key, None, None, Refused::new("too_large", why)).await;
    }

    /// Judges one request put under `requests/` (once per id) and records the outcome;
    /// an error when etcd could not be asked what it needed (the request is then judged
    /// when read again).
    pub async fn judge_one(&mut self, kv: &KeyValue) -> Result<(), String> {
        let key = kv.key_str().unwrap_or("");
        let Some(id) = self.keys.request_id(key).map(str::to_string) else {
            let refused = Refused::malformed("the key is not requests/<32 hex digits>");
            self.refuse(key, None, None, refused).await;
            return Ok(());
        };
        if kv.key().len() + kv.value().len() > MAX_ENTRY {
            // (from a watch: a page would not have passed it on)
            let oversized = Oversized {
                key: kv.key().to_vec(),
                mod_revision: kv.mod_revision(),
                size: Some(kv.key().len() + kv.value().len()),
            };
            self.too_large(&oversized).await;
            return Ok(());
        }
        if self.memory.judged.contains_key(&id) {
            return self.judged_before(&id, kv).await;
        }
        if self.memory.judged.len() >= MAX_JUDGED {
            let refused = Refused::new("too_many", "too many live requests remembered");
            self.refuse(key, None, None, refused).await;
            return Ok(());
        }
        let lease = kv.lease();
        match self.decide(&id, kv).await? {
            Verdict::NotForUs => {}
            // unsigned, unknown key, bad signature: audited, neither remembered nor
            // answered (a writer's junk costs every host nothing beyond its audit budget)
            Verdict::Refused(refused, None) => self.refuse(key, None, None, refused).await,
            Verdict::Refused(refused, Some((signer, end))) => {
                self.memory.judged.insert(id.clone(), end);
                let reason = format!("{}: {}", refused.code, refused.reason);
                self.refuse(key, Some(&id), Some(signer), refused).await;
                self.write_status(&id, lease, Outcome::Denied, None, Some(reason)).await;
            }
            Verdict::Denied { end, reason, remember } => {
                if remember {
                    self.memory.judged.insert(id.clone(), end);
                }
                self.write_status(&id, lease, Outcome::Denied, None, Some(reason)).await;
            }
            Verdict::Applied { end, until } => {
                self.memory.judged.insert(id.clone(), end);
                self.answer(&id, lease, Some(until), false).await;
            }
            Verdict::Waiting { end, pending } => {
                self.memory.judged.insert(id.clone(), end);
                self.answer_waiting(&id, lease, &pending).await;
                // an approval may be there already (written while this host was away);
                // should etcd not answer, the next session reads everything
                let read = self.approvals_under(&self.keys.approvals_of(&id)).await;
                read.inspect_err(|_| self.memory.resume = None)?;
            }
        }
        Ok(())
    }

    /// Answers `approved` until `until` (or `pending`, when `waiting`), and remembers it.
    pub(super) async fn answer(&mut self, id: &str, lease: i64, until: Option<DateTime<Utc>>, waiting: bool) {
        let answered = Answered { lease, waiting, until };
        self.memory.answered.insert(id.to_string(), answered);
        if !waiting {
            self.write_status(id, lease, Outcome::Approved, until, None).await;
        }
    }

    async fn answer_waiting(&mut self, id: &str, lease: i64, pending: &PendingInfo) {
        self.answer(id, lease, None, true).await;
        let at = pending.times_out_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let why = format!(
            "waiting for an approver on this host: jitctl fleet approve {id} (or jitctl approve {} there); times out {at}",
            pending.id
        );
        self.write_status(id, lease, Outcome::Pending, Some(pending.times_out_at), Some(why))
            .await;
    }

    /// A request judged before (in this run, or before a restart): never applied again.
    /// What it has here is kept while its key is the one judged and it still selects
    /// this host; withdrawn when the key was deleted and written again (someone undoing
    /// a revoke with a kept value) or a change of name or groups means it no longer
    /// selects this host. The first time in this run, its answer is written again.
    async fn judged_before(&mut self, id: &str, kv: &KeyValue) -> Result<(), String> {
        let here = self.daemon.fleet_here(id);
        if here.is_empty() && !self.memory.answered.contains_key(id) {
            return Ok(());
        }
        if here.revision != 0 && here.revision != kv.create_revision() {
            let why = "the request was deleted and written again; what the first one opened is closed";
            return self.withdraw(id, why).await;
        }
        let screened = self
            .daemon
            .config()
            .fleet
            .map(|now| judge::screen(id, kv.value(), &now, Utc::now()));
        match screened {
            None | Some(Ok(None)) => {
                return self
                    .withdraw(id, "this host is no longer among the hosts it names")
                    .await;
            }
            Some(Err(r)) if r.code == "other_fleet" => {
                return self
                    .withdraw(id, "this host is no longer in the fleet it was signed for")
                    .await;
            }
            Some(_) => {}
        }
        if self.memory.answered.contains_key(id) || here.is_empty() {
            return Ok(());
        }
        // restored after a restart: say again what this host has for it
        match here.until() {
            Some(until) => self.answer(id, kv.lease(), Some(until), false).await,
            None => self.answer(id, kv.lease(), None, true).await,
        }
        Ok(())
    }

    /// Judges, verifies, reads the lease and submits one request, judged under the
    /// fleet settings in force now (a fleet turned off by a reload selects nothing).
    async fn decide(&mut self, id: &str, kv: &KeyValue) -> Result<Verdict, String> {
        let Some(fleet_now) = self.daemon.config().fleet else {
            return Ok(Verdict::NotForUs);
        };
        let screened = match judge::screen(id, kv.value(), &fleet_now, Utc::now()) {
            Ok(Some(s)) => s,
            Ok(None) => return Ok(Verdict::NotForUs),
            Err(r) => return Ok(Verdict::Refused(r, None)),
        };
        let end = screened.request.signed_end();
        let verified = tokio::task::spawn_blocking(move || judge::verify(screened, Utc::now())).await;
        let (request, by) = match verified {
            Ok(Ok(v)) => v,
            Ok(Err(r)) => return Ok(Verdict::Refused(r, None)),
            Err(e) => {
                let why = format!("verification failed: {e}");
                return Ok(Verdict::Refused(Refused::malformed(&why), None));
            }
        };
        let signer = signed_by(by, &request, kv.create_revision());
        // etcd not answering is no answer: the session ends and the request is judged
        // again (a lease really gone is `no_lease`)
        let left = lease_left(self.client, kv.lease()).await?;
        let until = match judge::open_until(&request, left, Utc::now()) {
            Ok(until) => until,
            Err(r) => return Ok(Verdict::Refused(r, Some((signer, end)))),
        };
        let reply = self
            .daemon
            .request(Caller::signed(signer), socket_request(&request, until))
            .await;
        if let Some(e) = reply.error {
            let remember = e.code != ErrorCode::NotAuthorized;
            let reason = format!("{}: {}", e.code, e.message);
            return Ok(Verdict::Denied { end, reason, remember });
        }
        let granted: Option<GrantedReply> = reply.result.and_then(|r| serde_json::from_value(r).ok());
        match granted.and_then(|g| g.pending) {
            Some(pending) => {
                tracing::info!(request = %id, pending = pending.id, "fleet request waits for an approver here");
                Ok(Verdict::Waiting { end, pending })
            }
            None => {
                tracing::info!(request = %id, "fleet request approved until {until}");
                Ok(Verdict::Applied { end, until })
            }
        }
    }

    /// A request deleted (or its lease revoked or expired), or no longer for this host:
    /// revokes its grants here, turns down its requests waiting here (again, should a
    /// local approval have opened one meanwhile), and says so in its status. An error
    /// when something would not close (nftables refused): the session ends and the
    /// next one withdraws again.
    pub async fn withdraw(&mut self, id: &str, why: &str) -> Result<(), String> {
        for _ in 0..3 {
            let here = self.daemon.fleet_here(id);
            if here.is_empty() {
                if let Some(a) = self.memory.answered.remove(id) {
                    let reason = Some(why.to_string());
                    self.write_status(id, a.lease, Outcome::Revoked, None, reason).await;
                }
                return Ok(());
            }
            self.close(id, &here, why).await;
        }
        Err(format!(
            "fleet request {id} withdrawn ({why}), but what it has here would not close; trying again"
        ))
    }

    async fn close(&mut self, id: &str, here: &super::here::Here, why: &str) {
        for (grant, _) in &here.grants {
            let request = RevokeRequest {
                id: Some(*grant),
                ..Default::default()
            };
            match self.daemon.revoke(fleet_caller(), request).await.error {
                None => tracing::info!(request = %id, grant, "fleet request withdrawn ({why}): grant revoked"),
                // already ended (expired, superseded): nothing left to close
                Some(e) => tracing::debug!(request = %id, grant, "fleet request withdrawn: {}", e.message),
            }
        }
        for waiting in &here.pending {
            let (pending, reason) = (waiting.id, format!("fleet request {id} withdrawn: {why}"));
            let decision = Decision::deny(pending, reason, None);
            if let Some(e) = self.daemon.decide(fleet_caller(), decision).await.error {
                tracing::debug!(request = %id, pending, "fleet request withdrawn: {}", e.message);
            }
        }
    }

    /// The tick's upkeep: forgets requests past their end, writes due refusal summaries,
    /// answers again for requests decided here since (an approver, a local revoke).
    pub async fn upkeep(&mut self) {
        self.memory.forget_old(Utc::now());
        let due = self.memory.refusals.due_summaries(Utc::now());
        if !due.is_empty() {
            let _ = self.daemon.jobs.send(crate::daemon::Job::Record(due)).await;
        }
        let here = self.daemon.fleet_requests_here();
        let now = Utc::now();
        // an answer past its grant's end needs nothing more from this host
        self.memory
            .answered
            .retain(|_, a| a.waiting || a.until.is_some_and(|u| u > now));
        let changed: Vec<(String, Answered)> = self
            .memory
            .answered
            .iter()
            .filter(|(id, a)| a.waiting || (!here.contains(*id) && a.until.is_some_and(|u| u > now)))
            .map(|(id, a)| (id.clone(), *a))
            .collect();
        for (id, a) in changed {
            if a.waiting {
                self.follow(&id).await;
            } else {
                // closed here before its end: revoked locally, replaced, or the policy
                self.memory.answered.remove(&id);
                let why = "closed on this host before its end (revoked there, replaced, or the policy changed)";
                self.write_status(&id, a.lease, Outcome::Revoked, None, Some(why.into()))
                    .await;
            }
        }
    }

    /// For a request that waited for an approver here: once decided, answers again
    /// (`approved` until its grants' end, or `denied`).
    pub(super) async fn follow(&mut self, id: &str) {
        let Some(&Answered {
            lease, waiting: true, ..
        }) = self.memory.answered.get(id)
        else {
            return;
        };
        let here = self.daemon.fleet_here(id);
        if let Some(until) = here.until() {
            self.answer(id, lease, Some(until), false).await;
        } else if here.pending.is_empty() {
            self.memory.answered.remove(id);
            let why = "not approved on this host (turned down, timed out, or the policy changed)";
            self.write_status(id, lease, Outcome::Denied, None, Some(why.into()))
                .await;
        }
    }
}

/// What tells one write of an entry too large to read from another (its key and the
/// revision that wrote it), kept to audit it once.
pub(super) fn mark(o: &Oversized) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (o.key.as_slice(), o.mod_revision).hash(&mut h);
    h.finish()
}

/// The signer of a verified fleet request, as the commit path and the audit log see it.
fn signed_by(by: crate::remote::packet::SignedBy, request: &FleetRequest, revision: i64) -> SignedBy {
    SignedBy {
        fleet: Some(FleetOrigin {
            request: request.id(),
            hosts: request.hosts.clone(),
            revision,
            digest: request.digest(),
        }),
        ..signer(by)
    }
}

/// Who signed a request or an approval read from etcd (no peer, no nonce: etcd is not
/// a packet).
pub(super) fn signer(by: crate::remote::packet::SignedBy) -> SignedBy {
    SignedBy {
        principals: by.principals,
        fingerprint: by.fingerprint,
        peer: None,
        nonce: None,
        certificate: by.certificate.map(|c| c.describe()),
        fleet: None,
    }
}

/// The socket request a fleet request becomes on this host: its ports, source and
/// justification, open until `until`.
fn socket_request(
    request: &crate::fleet::request::FleetRequest,
    until: chrono::DateTime<chrono::Utc>,
) -> crate::api::protocol::GrantRequest {
    crate::api::protocol::GrantRequest {
        ports: request.ports.clone(),
        source: crate::domain::format_prefix(&request.source),
        duration_secs: None,
        until: Some(until),
        justification: request.justification.clone(),
    }
}
