//! The two-person rule in the daemon: a request for a port with `approvals = 1` that
//! passes every check is booked as pending ([`book_pending`], from the request path);
//! an approver's decision ([`Decision`]) is a job for the committer like any change:
//! checked, re-checked against the policy as it is now, audited, then applied. Requests
//! nobody decides time out with the expiry timer; a restart restores those still
//! within their time ([`restore_pending`]). The pure part is [`crate::approval`].

use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::book::{self, Decided};
use super::job::{Decision, Job};
use super::queries::{grant_info_at, pending_info};
use super::tx::{Footprint, Tx, TxError};
use super::{failure_of, Daemon, State};
use crate::api::protocol::{GrantRequest, PendingStatus, Reply};
use crate::approval::{self, Ended, PendingRequest, PendingState, Verb};
use crate::audit::limit::Admit;
use crate::audit::{Action, AuditRecord, Outcome};
use crate::domain::{format_prefix, Caller, ErrorCode, GrantId};
use crate::firewall::Firewall;
use crate::grants::NewGrant;
use crate::policy::{self, AccessRequest, Denial, Role};

type Pings = mpsc::Receiver<oneshot::Sender<()>>;

/// A request that passed every check, as the request path hands it over.
pub(super) struct Asked<'a> {
    pub caller: &'a Caller,
    /// The login uid of the process that asked.
    pub login: Option<u32>,
    pub request: &'a GrantRequest,
    /// Its grants, one per policy entry.
    pub news: &'a [NewGrant],
    /// How long it may wait for its approval.
    pub timeout: Duration,
}

/// A decision, planned under the state lock.
enum Planned {
    /// Refused before anything changed; the records audit the attempt.
    Refused(Denial, Vec<AuditRecord>),
    /// The request ends: the transaction, how it ended (noted once on record), the
    /// grants an approval replaced, and the reply (an error when the policy no longer
    /// allowed it and it was closed).
    Ends {
        tx: Box<Tx>,
        ended: Box<Ended>,
        superseded: Vec<GrantId>,
        outcome: Result<(), Denial>,
    },
}

impl<F: Firewall> Daemon<F> {
    /// Queues a decision for the committer and waits for its answer.
    pub(super) async fn decide(&self, caller: Caller, decision: Decision) -> Reply {
        let (reply, answer) = oneshot::channel();
        if !self.submit(Job::Decide(caller, decision, reply)).await {
            return Reply::error(ErrorCode::ShuttingDown, "jitd is stopping; try again when it is back");
        }
        answer
            .await
            .unwrap_or_else(|_| Reply::error(ErrorCode::Internal, "the decision was dropped; nothing changed"))
    }

    /// Where request `id` stands: waiting, or how it ended (while jitd remembers).
    pub(super) fn pending_status(&self, caller: &Caller, id: GrantId) -> Result<PendingStatus, Reply> {
        let st = self.lock();
        policy::require_role(
            &st.config.access,
            caller,
            Role::Viewer,
            "see requests waiting for approval",
        )
        .map_err(|d| Reply::error(d.code, d.message))?;
        let (now, wall) = (Instant::now(), Utc::now());
        if let Some((request, deadline)) = st.pending.get(id) {
            return Ok(PendingStatus {
                request: pending_info(request, deadline.saturating_duration_since(now), wall),
                state: PendingState::Pending,
                decided_by: None,
                reason: None,
                grants: Vec::new(),
                superseded: Vec::new(),
            });
        }
        match st.pending.ended(id) {
            Some(ended) => Ok(ended_status(&st, ended, Vec::new(), now, wall)),
            None => Err(Reply::error(
                ErrorCode::NotFound,
                format!("jitd knows no request {id} that waits or waited for approval (after a restart it remembers none that ended: see jitctl audit)"),
            )),
        }
    }

    /// Checks, audits and carries out a decision as one transaction.
    pub(super) async fn commit_decision(&self, caller: &Caller, decision: Decision, pings: &mut Pings) -> Reply {
        let (now, wall) = (Instant::now(), Utc::now());
        let planned = plan_decision(&mut self.lock(), caller, &decision, now, wall);
        let (tx, ended, superseded, outcome) = match planned {
            Planned::Refused(denial, records) => {
                return match self.execute(Tx::records(records), pings).await {
                    Err(TxError::Audit(e)) => {
                        Reply::error(ErrorCode::AuditFailed, format!("refused, and not recorded: {e}"))
                    }
                    _ => Reply::error(denial.code, denial.message),
                };
            }
            Planned::Ends {
                tx,
                ended,
                superseded,
                outcome,
            } => (tx, ended, superseded, outcome),
        };
        let id = ended.request.id;
        if let Err(e) = self.execute(*tx, pings).await {
            let code = match e {
                TxError::Audit(_) => ErrorCode::AuditFailed,
                TxError::Firewall(_) => ErrorCode::FirewallFailed,
            };
            return Reply::error(code, format!("nothing changed, request {id} still waits: {e}"));
        }
        let mut st = self.lock();
        let status = ended_status(&st, &ended, superseded, Instant::now(), Utc::now());
        for g in &status.grants {
            st.note_use(g.port, &g.requester, wall);
        }
        tracing::info!(request = id, by = %caller.name, state = ?ended.state, "request decided");
        if ended.state == PendingState::Approved {
            let m = crate::metrics::metrics();
            m.request(Outcome::Approved, None);
            m.grant_duration.observe(ended.request.duration().as_secs_f64());
        }
        st.pending.note_ended(*ended);
        match outcome {
            Ok(()) => Reply::ok(status),
            Err(denial) => Reply::error(denial.code, denial.message),
        }
    }

    /// Ends, and audits, every pending request whose approval timed out. Its end is
    /// noted in the same step that takes it out of the waiting ones, so that a requester
    /// polling meanwhile (while the record is written) reads "expired", never "no such
    /// request".
    pub(super) async fn commit_pending_expiry(&self, pings: &mut Pings) {
        let wall = Utc::now();
        let why = "approval timed out: nobody approved or denied it in time";
        let timed_out = {
            let mut st = self.lock();
            let timed_out = st.pending.pop_timed_out(Instant::now());
            for request in &timed_out {
                tracing::info!(request = request.id, "request timed out waiting for approval");
                let note = ended(request.clone(), PendingState::Expired, "jitd", why, wall);
                st.pending.note_ended(note);
            }
            timed_out
        };
        if timed_out.is_empty() {
            return;
        }
        let records = timed_out
            .iter()
            .map(|r| ended_record(r, wall, None, "jitd", Action::Expire, Outcome::Expired, why))
            .collect();
        if let Err(e) = self.execute(Tx::records(records), pings).await {
            tracing::error!("{e}; {} approval timeout(s) not recorded", timed_out.len());
        }
        self.lock().changed();
    }
}

/// Books a request that passed every check as waiting for approval for its timeout:
/// its record (`request`/`pending`, and the mirror undoing it should its transaction
/// fail).
pub(super) fn book_pending(
    st: &mut State,
    tx: &mut Tx,
    asked: Asked<'_>,
    now: Instant,
    wall: DateTime<Utc>,
) -> Decided {
    let Asked {
        caller,
        login,
        request,
        news,
        timeout,
    } = asked;
    let mut ports: Vec<u16> = news.iter().map(|n| n.port).collect();
    ports.dedup();
    // a request asked until a time waits no longer than that
    let timeout = match request.until.and_then(|u| (u - wall).to_std().ok()) {
        Some(left) => timeout.min(left),
        None => timeout,
    };
    let pending = PendingRequest {
        id: st.book.allocate_id(),
        requester: caller.clone(),
        requester_login: login,
        ports,
        source: news[0].source,
        duration_secs: news[0].duration.as_secs(),
        until: request.until,
        justification: request.justification.clone(),
        asked_at: wall,
        times_out_at: wall + TimeDelta::from_std(timeout).unwrap_or(TimeDelta::MAX),
    };
    let mut r = ended_record(
        &pending,
        wall,
        book::actor_uid(caller),
        &caller.name,
        Action::Request,
        Outcome::Pending,
        &format!(
            "waits for approval by [access] approvers for {}",
            crate::duration::format(timeout)
        ),
    );
    r.times_out_at = Some(pending.times_out_at);
    r.until = pending.until;
    r.login_uid = login;
    book::stamp_signer(&mut r, caller);
    tx.failed.push(failure_of(&r));
    tx.records.push(r);
    tx.undo.pending_added.push(pending.id);
    st.pending.insert(pending.clone(), now + timeout);
    Decided::Pending(Box::new(pending), timeout)
}

/// The record of `decision` by `decider` about `request`.
fn decision_record(
    decision: &Decision,
    decider: &Caller,
    request: &PendingRequest,
    time: DateTime<Utc>,
    outcome: Outcome,
    why: &str,
) -> AuditRecord {
    let uid = book::actor_uid(decider);
    let mut r = ended_record(request, time, uid, &decider.name, decision.action(), outcome, why);
    r.login_uid = decision.login;
    book::stamp_signer(&mut r, decider);
    r
}

/// Checks a decision and plans what it changes: who (the approver role, never one's
/// own request), what (the request waits; a denial's reason), then, for an approval,
/// the policy as it is now.
fn plan_decision(st: &mut State, decider: &Caller, decision: &Decision, now: Instant, wall: DateTime<Utc>) -> Planned {
    let id = decision.id;
    // one whose time is up but not yet on record is past deciding
    let waiting = st
        .pending
        .get(id)
        .filter(|(_, deadline)| *deadline > now)
        .map(|(r, _)| r.clone());
    let access = &st.config.access;
    let checked = approval::check_decider(access, decider, decision.login, id, waiting.as_ref(), decision.verb);
    let request = match checked {
        Ok(request) => request.clone(),
        Err(denial) => return refused(st, decider, decision, waiting.as_ref(), denial, wall),
    };
    match decision.verb {
        Verb::Deny => match check_reason(&decision.reason) {
            Ok(()) => plan_deny(st, decider, decision, request, wall),
            Err(denial) => refused(st, decider, decision, Some(&request), denial, wall),
        },
        Verb::Approve => plan_approve(st, decider, decision, request, now, wall),
    }
}

/// A refused decision: the record of the attempt (rate-limited per uid like every
/// refusal), nothing else.
fn refused(
    st: &mut State,
    decider: &Caller,
    decision: &Decision,
    request: Option<&PendingRequest>,
    denial: Denial,
    wall: DateTime<Utc>,
) -> Planned {
    let mut records = Vec::new();
    if st.refusals.admit(
        crate::audit::limit::Refuser::of(decider),
        &decider.name,
        denial.code.as_str(),
        wall,
    ) == Admit::Record
    {
        let mut r = AuditRecord::new(
            wall,
            book::actor_uid(decider),
            &decider.name,
            decision.action(),
            Outcome::Denied,
        );
        if let Some(q) = request {
            describe_request(&mut r, q);
        }
        r.request_id = Some(decision.id);
        r.login_uid = decision.login;
        book::stamp_signer(&mut r, decider);
        r.reason = Some(format!("{}: {}", denial.code, denial.message));
        records.push(r);
    }
    Planned::Refused(denial, records)
}

/// A denial (or the requester withdrawing its own request): the request ends, nothing
/// opens.
fn plan_deny(
    st: &mut State,
    decider: &Caller,
    decision: &Decision,
    request: PendingRequest,
    wall: DateTime<Utc>,
) -> Planned {
    let reason = &decision.reason;
    let why = match approval::own_identity(&request.requester, decider) {
        true => format!("withdrawn by the requester: {reason}"),
        false => reason.to_string(),
    };
    let r = decision_record(decision, decider, &request, wall, Outcome::Done, &why);
    let mut tx = Tx::records(vec![r]);
    if let Some(removed) = st.pending.remove(request.id) {
        tx.undo.pending_removed.push(removed);
    }
    Planned::Ends {
        tx: Box::new(tx),
        ended: Box::new(ended(request, PendingState::Denied, &decider.name, &why, wall)),
        superseded: Vec::new(),
        outcome: Ok(()),
    }
}

/// An approval: the request is checked again against the policy as it is now (a
/// reload may have changed it) for its requester as it is now; if it still passes, its
/// grants open for the duration asked, counted from now; if not, it is closed.
fn plan_approve(
    st: &mut State,
    decider: &Caller,
    decision: &Decision,
    request: PendingRequest,
    now: Instant,
    wall: DateTime<Utc>,
) -> Planned {
    let Some(open_for) = request.duration_at(wall) else {
        let ended = Denial::new(
            ErrorCode::DurationInvalid,
            format!(
                "{} asked to be open until {}, which has passed",
                request.describe(),
                request
                    .until
                    .map_or_else(String::new, |u| u.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
            ),
        );
        return close_changed(st, decider, decision, request, ended, wall);
    };
    let (news, role) = match recheck(st, &request, open_for) {
        Ok(ok) => ok,
        Err(denial) => return close_changed(st, decider, decision, request, denial, wall),
    };
    let why = format!(
        "approved {}; open for {} from now",
        request.describe(),
        crate::duration::format(open_for)
    );
    let r = decision_record(decision, decider, &request, wall, Outcome::Approved, &why);
    let mut tx = Tx::records(Vec::new());
    tx.failed.push(failure_of(&r));
    tx.records.push(r);
    if let Some(removed) = st.pending.remove(request.id) {
        tx.undo.pending_removed.push(removed);
    }
    let mut footprint = Footprint::default();
    let (grants, superseded) = book::book_grants(
        st,
        &mut tx,
        &mut footprint,
        news,
        role,
        &request.requester,
        &grant_request(&request, open_for),
        now,
        wall,
    );
    let ids: Vec<GrantId> = grants.iter().map(|g| g.id).collect();
    link_grants(&mut tx, &ids, request.id, decider);
    tx.kernel = footprint.change(&st.book, now);
    tx.touched = footprint.into_touched();
    let mut ended = ended(request, PendingState::Approved, &decider.name, &why, wall);
    ended.grants = ids;
    Planned::Ends {
        tx: Box::new(tx),
        ended: Box::new(ended),
        superseded,
        outcome: Ok(()),
    }
}

/// Checks `request` again against the policy as it is now, for its requester as it is
/// now: the grants it opens and the requester's role, or why it no longer may.
fn recheck(st: &State, request: &PendingRequest, open_for: Duration) -> Result<(Vec<NewGrant>, Role), Denial> {
    let requester = current_requester(&request.requester);
    let asked = AccessRequest {
        ports: request.ports.clone(),
        source: request.source,
        duration: open_for,
    };
    let entries = policy::check_request(&st.config, &requester, &asked)?;
    let news = book::new_grants(
        &entries,
        &request.requester,
        request.source,
        open_for,
        request.justification.as_ref(),
    );
    let admin = policy::role_of(&st.config.access, &requester) >= Some(Role::Admin);
    Ok((news, if admin { Role::Admin } else { Role::Requester }))
}

/// Closes a request the policy no longer allows (audited `approve`/`revoked`, reason
/// `policy changed: ...`, as a reload ends such grants); the approver is told why.
fn close_changed(
    st: &mut State,
    decider: &Caller,
    decision: &Decision,
    request: PendingRequest,
    denial: Denial,
    wall: DateTime<Utc>,
) -> Planned {
    let why = format!(
        "policy changed: {}; the request is closed, nothing was opened",
        denial.message
    );
    let r = decision_record(decision, decider, &request, wall, Outcome::Revoked, &why);
    let mut tx = Tx::records(vec![r]);
    if let Some(removed) = st.pending.remove(request.id) {
        tx.undo.pending_removed.push(removed);
    }
    let message = format!(
        "{} can no longer be approved, so it is closed: the policy changed: {}",
        request.describe(),
        denial.message
    );
    Planned::Ends {
        tx: Box::new(tx),
        ended: Box::new(ended(request, PendingState::Closed, &decider.name, &why, wall)),
        superseded: Vec::new(),
        outcome: Err(Denial::new(denial.code, message)),
    }
}

/// The requester as the policy sees it now: a local user looked up again by uid (its
/// name and groups may have changed, as a reload re-checks grants), a signed caller by
/// the principals its key vouched for.
fn current_requester(asked: &Caller) -> Caller {
    match &asked.signer {
        Some(_) => asked.clone(),
        None => Caller::resolve_uid(asked.uid),
    }
}

/// The request as the grant records show it (only its justification is read).
fn grant_request(request: &PendingRequest, open_for: Duration) -> GrantRequest {
    GrantRequest {
        ports: request.ports.clone(),
        source: format_prefix(&request.source),
        duration_secs: Some(open_for.as_secs()),
        until: None,
        justification: request.justification.clone(),
    }
}

/// Links the grant records (and their failure mirrors) of an approval to its request
/// and names who approved.
fn link_grants(tx: &mut Tx, ids: &[GrantId], request: GrantId, decider: &Caller) {
    let by = match book::actor_uid(decider) {
        Some(uid) => format!("approved by {} (uid {uid}), request {request}", decider.name),
        None => format!("approved by {}, request {request}", decider.name),
    };
    for r in tx.records.iter_mut().chain(tx.failed.iter_mut()) {
        if r.action == Action::Request && r.grant_id.is_some_and(|g| ids.contains(&g)) {
            r.request_id = Some(request);
            if r.outcome == Outcome::Approved {
                r.reason = Some(by.clone());
            }
        }
    }
}

/// Refuses a denial's reason that is too long or carries control or format characters.
fn check_reason(reason: &str) -> Result<(), Denial> {
    book::check_justification(reason)
        .map_err(|d| Denial::new(d.code, d.message.replacen("justification:", "reason:", 1)))
}

/// Fills in what a record says about `request`.
fn describe_request(r: &mut AuditRecord, request: &PendingRequest) {
    r.ports = request.ports.clone();
    r.source = Some(format_prefix(&request.source));
    r.duration_secs = Some(request.duration_secs);
    r.justification = request.justification.clone();
    r.request_id = Some(request.id);
}

/// A record of `request` by `actor`, with `reason`.
fn ended_record(
    request: &PendingRequest,
    time: DateTime<Utc>,
    uid: Option<u32>,
    actor: &str,
    action: Action,
    outcome: Outcome,
    reason: &str,
) -> AuditRecord {
    let mut r = AuditRecord::new(time, uid, actor, action, outcome);
    describe_request(&mut r, request);
    r.reason = Some(reason.to_string());
    r
}

/// How `request` ended, to remember.
fn ended(request: PendingRequest, state: PendingState, by: &str, why: &str, at: DateTime<Utc>) -> Ended {
    Ended {
        request,
        state,
        by: by.to_string(),
        reason: Some(why.to_string()),
        grants: Vec::new(),
        at,
    }
}

/// How an ended request stands, with the grants it opened that are still live.
fn ended_status(
    st: &State,
    ended: &Ended,
    superseded: Vec<GrantId>,
    now: Instant,
    wall: DateTime<Utc>,
) -> PendingStatus {
    let grants = ended
        .grants
        .iter()
        .filter_map(|id| st.book.get(*id))
        .map(|g| grant_info_at(g, st.book.remaining(g.id, now).unwrap_or_default(), wall))
        .collect();
    let mut request = pending_info(&ended.request, Duration::ZERO, wall);
    request.times_out_at = ended.request.times_out_at;
    PendingStatus {
        request,
        state: ended.state,
        decided_by: Some(ended.by.clone()),
        reason: ended.reason.clone(),
        grants,
        superseded,
    }
}

/// Books the pending requests saved before a restart whose time is not up; those whose
/// time is up (or all of them, when the wall clock cannot be trusted to tell) end, and
/// the records saying so are returned. The approval clock runs on across the restart:
/// each keeps its `times_out_at`.
pub(super) fn restore_pending(
    st: &mut State,
    saved: Vec<PendingRequest>,
    clock_sane: bool,
    now: Instant,
    wall: DateTime<Utc>,
) -> Vec<AuditRecord> {
    let mut records = Vec::new();
    for request in saved {
        let left = (request.times_out_at - wall).to_std().ok().filter(|d| !d.is_zero());
        let why = match (clock_sane, left) {
            (true, Some(left)) => {
                st.pending.insert(request, now + left);
                continue;
            }
            (true, None) => "approval timed out while jitd was not running",
            (false, _) => "the wall clock is behind the audit log, so jitd cannot tell how long the request had left to wait: ended without a decision",
        };
        let at = request.times_out_at.min(wall);
        records.push(ended_record(
            &request,
            at,
            None,
            "jitd",
            Action::Expire,
            Outcome::Expired,
            why,
        ));
        st.pending
            .note_ended(ended(request, PendingState::Expired, "jitd", why, at));
    }
    records
}

#[cfg(test)]
mod tests;
