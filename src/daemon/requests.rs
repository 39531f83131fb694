//! Access requests: decided in order against the book as the batch leaves it, booked
//! tentatively, then audited and applied as one transaction by the committer. Only
//! then is each answered; a grant that cannot be audited or applied is refused.

use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::book::{
    actor_uid, book_grants, check_justification, new_grants, recorded_source, stamp_signer, unchecked, Decided,
};
use super::job::Job;
use super::queries::pending_info;
use super::tx::{Footprint, Pending, Tx, TxError};
use super::{grant_info, Daemon, State};
use crate::api::protocol::{GrantRequest, GrantedReply, Reply};
use crate::audit::limit::{Admit, Refuser};
use crate::audit::{Action, AuditRecord, Outcome};
use crate::domain::{format_prefix, parse_prefix, Caller, ErrorCode};
use crate::firewall::Firewall;
use crate::grants::NewGrant;
use crate::policy::{self, AccessRequest, Denial, Role};

impl<F: Firewall> Daemon<F> {
    /// Queues a request for the committer and waits for its answer.
    pub(super) async fn request(&self, caller: Caller, request: GrantRequest) -> Reply {
        self.request_as(caller, None, request).await
    }

    /// Like [`Daemon::request`], from a process whose login uid is `login`.
    pub(super) async fn request_as(&self, caller: Caller, login: Option<u32>, request: GrantRequest) -> Reply {
        let (reply, answer) = oneshot::channel();
        let pending = Pending {
            caller,
            login,
            request,
            reply,
        };
        if !self.submit(Job::Request(pending)).await {
            return Reply::error(ErrorCode::ShuttingDown, "jitd is stopping; try again when it is back");
        }
        answer
            .await
            .unwrap_or_else(|_| Reply::error(ErrorCode::Internal, "the request was dropped; nothing was granted"))
    }

    /// Decides, audits and applies a batch of requests as one transaction.
    pub(super) async fn commit_requests(&self, batch: Vec<Pending>, pings: &mut mpsc::Receiver<oneshot::Sender<()>>) {
        let wall = Utc::now();
        let now = Instant::now();
        let (tx, decided) = {
            let mut st = self.lock();
            plan(&mut st, &batch, now, wall)
        };
        let result = self.execute(tx, pings).await;
        if result.is_ok() {
            let mut st = self.lock();
            for d in &decided {
                if let Decided::Approved { grants, .. } = d {
                    for g in grants {
                        st.note_use(g.port, &g.requester, wall);
                    }
                }
            }
        }
        for (p, d) in batch.into_iter().zip(decided) {
            let _ = p.reply.send(answer(d, result.as_ref().err()));
        }
    }
}

/// The reply to one request of a batch, given how the batch ended.
fn answer(decided: Decided, failure: Option<&TxError>) -> Reply {
    let m = crate::metrics::metrics();
    match (decided, failure) {
        (_, Some(TxError::Audit(e))) => {
            m.request(Outcome::Failed, Some(&ErrorCode::AuditFailed));
            Reply::error(ErrorCode::AuditFailed, format!("request refused: {e}"))
        }
        (Decided::Denied(denial), _) => {
            m.request(Outcome::Denied, Some(&denial.code));
            Reply::error(denial.code, denial.message)
        }
        (Decided::Pending(..), Some(e)) => {
            m.request(Outcome::Failed, Some(&ErrorCode::FirewallFailed));
            Reply::error(
                ErrorCode::FirewallFailed,
                format!("request not taken, nothing changed (a request decided with it could not be applied): {e}"),
            )
        }
        (Decided::Pending(request, left), None) => {
            m.request(Outcome::Pending, None);
            tracing::info!(request = request.id, user = %request.requester.name, source = %format_prefix(&request.source), ports = %request.ports_text(), "request waits for approval");
            Reply::ok(GrantedReply {
                grants: Vec::new(),
                superseded: Vec::new(),
                pending: Some(pending_info(&request, left, Utc::now())),
            })
        }
        (Decided::Approved { .. }, Some(e)) => {
            m.request(Outcome::Failed, Some(&ErrorCode::FirewallFailed));
            Reply::error(
                ErrorCode::FirewallFailed,
                format!("request approved but not applied, nothing changed: {e}"),
            )
        }
        (
            Decided::Approved {
                grants,
                superseded,
                duration,
            },
            None,
        ) => {
            m.request(Outcome::Approved, None);
            m.grant_duration.observe(duration.as_secs_f64());
            for g in &grants {
                tracing::info!(grant = g.id, user = %g.requester, source = %format_prefix(&g.source), port = g.port, until = %g.expires_at, "access granted");
            }
            let grants = grants.iter().map(|g| grant_info(g, duration)).collect();
            Reply::ok(GrantedReply {
                grants,
                superseded,
                pending: None,
            })
        }
    }
}

/// Decides every request of the batch in order and books the approvals.
fn plan(st: &mut State, batch: &[Pending], now: Instant, wall: DateTime<Utc>) -> (Tx, Vec<Decided>) {
    let mut tx = Tx::records(st.refusals.due_summaries(wall));
    let mut footprint = Footprint::default();
    let decided = batch
        .iter()
        .map(|p| decide_one(st, &mut tx, &mut footprint, p, now, wall))
        .collect();
    tx.kernel = footprint.change(&st.book, now);
    tx.touched = footprint.into_touched();
    (tx, decided)
}

/// Decides one request against the book as the batch has left it so far, books an
/// approval tentatively and adds its audit records (and their failure mirrors).
fn decide_one(
    st: &mut State,
    tx: &mut Tx,
    footprint: &mut Footprint,
    pending: &Pending,
    now: Instant,
    wall: DateTime<Utc>,
) -> Decided {
    let Pending {
        caller, request, login, ..
    } = pending;
    let (news, role, approval) = match check(st, caller, request, wall) {
        Ok(ok) => ok,
        Err(denial) => return refuse(st, tx, caller, request, denial, wall),
    };
    if let Some(timeout) = approval {
        // every check passed: only now may the request take a place among the pending
        return match st.pending.room_for(caller) {
            Ok(()) => {
                let asked = super::approvals::Asked {
                    caller,
                    login: *login,
                    request,
                    news: &news,
                    timeout,
                };
                super::approvals::book_pending(st, tx, asked, now, wall)
            }
            Err(denial) => refuse(st, tx, caller, request, denial, wall),
        };
    }
    let duration = news[0].duration;
    let (grants, superseded) = book_grants(st, tx, footprint, news, role, caller, request, now, wall);
    Decided::Approved {
        grants,
        superseded,
        duration,
    }
}

/// Audits a refused request (a flood of refusals is counted, not recorded one by one).
fn refuse(
    st: &mut State,
    tx: &mut Tx,
    caller: &Caller,
    request: &GrantRequest,
    denial: Denial,
    wall: DateTime<Utc>,
) -> Decided {
    if st
        .refusals
        .admit(Refuser::of(caller), &caller.name, denial.code.as_str(), wall)
        == Admit::Record
    {
        let mut r = refusal_record(request, wall, caller);
        r.reason = Some(format!("{}: {}", denial.code, denial.message));
        tx.records.push(r);
    }
    Decided::Denied(denial)
}

/// Who, then what: the grants a request asks for, the caller's role and, when a port
/// it names needs an approval, how long it may wait for one; or the first reason it
/// fails.
fn check(
    st: &State,
    caller: &Caller,
    request: &GrantRequest,
    wall: DateTime<Utc>,
) -> Result<(Vec<NewGrant>, Role, Option<Duration>), Denial> {
    let role = policy::require_role(&st.config.access, caller, Role::Requester, "request access")?;
    let source = parse_prefix(&request.source).map_err(|e| {
        Denial::new(
            ErrorCode::InvalidArgument,
            format!("source: {e}, got {}", unchecked(&request.source)),
        )
    })?;
    let duration = match (request.duration_secs, request.until) {
        (Some(secs), None) => Duration::from_secs(secs),
        (None, Some(until)) => {
            // jitd's own wall clock judges `until` (the caller's may differ); from here
            // on the grant lasts a duration, enforced by the monotonic clock
            let left = (until - wall).to_std().map_err(|_| until_past(until, wall))?;
            // whole seconds, rounded up: the grant ends at or just after `until`
            Duration::from_secs(left.as_secs() + u64::from(left.subsec_nanos() > 0))
        }
        _ => {
            return Err(Denial::new(
                ErrorCode::InvalidArgument,
                "give exactly one of duration_secs and until",
            ))
        }
    };
    if let Some(j) = &request.justification {
        check_justification(j)?;
    }
    let access = AccessRequest {
        ports: request.ports.clone(),
        source,
        duration,
    };
    let entries = policy::check_request(&st.config, caller, &access)?;
    let approval = crate::approval::approval_timeout(&entries);
    let news = new_grants(&entries, caller, source, duration, request.justification.as_ref());
    Ok((news, role, approval))
}

/// The refusal of an `until` that has passed by jitd's wall clock, naming both times
/// (a client whose clock disagrees with jitd's sees why).
fn until_past(until: DateTime<Utc>, wall: DateTime<Utc>) -> Denial {
    let secs = chrono::SecondsFormat::Secs;
    Denial::new(
        ErrorCode::DurationInvalid,
        format!(
            "until: {} is in the past by jitd's wall clock (now {}); jitd judges --until by its own clock, --duration needs no clock",
            until.to_rfc3339_opts(secs, true),
            wall.to_rfc3339_opts(secs, true)
        ),
    )
}

/// The record of a refused request: only values that passed their checks are stored
/// as such; anything else is an escaped, length-capped copy marked as unchecked.
fn refusal_record(request: &GrantRequest, time: DateTime<Utc>, caller: &Caller) -> AuditRecord {
    let mut r = AuditRecord::new(time, actor_uid(caller), &caller.name, Action::Request, Outcome::Denied);
    r.ports = request.ports.iter().copied().take(16).collect();
    r.source = Some(recorded_source(&request.source));
    r.duration_secs = request
        .duration_secs
        .or_else(|| request.until.map(|u| (u - time).num_seconds().max(0) as u64));
    r.justification = request.justification.as_ref().map(|j| match check_justification(j) {
        Ok(()) => j.clone(),
        Err(_) => unchecked(j),
    });
    stamp_signer(&mut r, caller);
    r
}

#[cfg(test)]
mod tests;
