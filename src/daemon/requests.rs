//! Access requests: decided in order against the book as the batch leaves it, booked
//! tentatively, then audited and applied as one transaction by the committer. Only
//! then is each answered; a grant that cannot be audited or applied is refused.

use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::commit::{Footprint, Job, Pending, Tx, TxError};
use super::{failure_of, grant_info, grant_record, Daemon, State};
use crate::api::protocol::{GrantRequest, GrantedReply, Reply, MAX_JUSTIFICATION_CHARS};
use crate::audit::limit::{Admit, Refuser};
use crate::audit::{Action, AuditRecord, Outcome};
use crate::domain::{format_prefix, parse_prefix, Caller, ErrorCode, GrantId};
use crate::firewall::Firewall;
use crate::grants::{Grant, NewGrant};
use crate::policy::{self, AccessRequest, Denial, Role};

/// What became of one request while its batch was decided.
pub(super) enum Decided {
    Denied(Denial),
    /// It waits for an approver, for this long.
    Pending(Box<crate::approval::PendingRequest>, Duration),
    Approved {
        grants: Vec<Grant>,
        superseded: Vec<GrantId>,
        duration: Duration,
    },
}

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
                pending: Some(super::approvals::pending_info(&request, left, Utc::now())),
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

/// Books the grants of an approved request (a new one, or one an approver approved):
/// their records (and failure mirrors), the grants they supersede, the kernel
/// footprint. Returns the grants and the ids of those they replaced.
#[allow(clippy::too_many_arguments)]
pub(super) fn book_grants(
    st: &mut State,
    tx: &mut Tx,
    footprint: &mut Footprint,
    news: Vec<NewGrant>,
    role: Role,
    caller: &Caller,
    request: &GrantRequest,
    now: Instant,
    wall: DateTime<Utc>,
) -> (Vec<Grant>, Vec<GrantId>) {
    let mut grants = Vec::new();
    let mut superseded = Vec::new();
    for n in news {
        let id = st.book.allocate_id();
        let old: Vec<Grant> = st
            .book
            .superseded_by(&n, role >= Role::Admin)
            .into_iter()
            .cloned()
            .collect();
        let mut r = grant_request_record(request, &n, id, caller, wall);
        r.outcome = Outcome::Approved;
        tx.failed.push(failure_of(&r));
        tx.records.push(r);
        for old in old {
            supersede(st, tx, footprint, &old, id, caller, now, wall);
            superseded.push(old.id);
        }
        footprint.touch_slot(&st.book, n.source, n.port, n.protocol, now);
        let grant = st.book.insert(id, n, now, wall);
        tx.undo.inserted.push(grant.id);
        grants.push(grant);
    }
    (grants, superseded)
}

/// Ends `old`, superseded by the new grant `by`: its records (and their failure
/// mirrors), the kernel footprint, the book (undoable).
#[allow(clippy::too_many_arguments)]
fn supersede(
    st: &mut State,
    tx: &mut Tx,
    footprint: &mut Footprint,
    old: &Grant,
    by: GrantId,
    caller: &Caller,
    now: Instant,
    wall: DateTime<Utc>,
) {
    let mut r = grant_record(
        old,
        wall,
        actor_uid(caller),
        &caller.name,
        Action::Supersede,
        Outcome::Superseded,
    );
    r.reason = Some(format!("superseded by grant {by}"));
    tx.failed.push(failure_of(&r));
    tx.records.push(r);
    footprint.touch(&st.book, old, now);
    if let Some(removed) = st.book.remove(old.id) {
        tx.undo.removed.push(removed);
    }
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

/// The grants `caller` gets for `entries`.
pub(super) fn new_grants(
    entries: &[&crate::config::PortPolicy],
    caller: &Caller,
    source: ipnet::IpNet,
    duration: Duration,
    justification: Option<&String>,
) -> Vec<NewGrant> {
    entries
        .iter()
        .map(|p| NewGrant {
            source,
            port: p.port,
            protocol: p.protocol,
            requester: caller.name.clone(),
            requester_uid: caller.uid,
            principals: caller.signer.as_ref().map(|s| s.principals.clone()).unwrap_or_default(),
            fleet: caller.signer.as_ref().and_then(|s| s.fleet.clone()),
            justification: justification.cloned(),
            duration,
        })
        .collect()
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

/// Refuses justifications that are too long or carry control or Unicode format
/// characters (bidi overrides, zero-width characters), which could disguise what an
/// admin reads.
pub(super) fn check_justification(j: &str) -> Result<(), Denial> {
    let bad = j.chars().find(|c| c.is_control() || is_format_char(*c));
    if j.chars().count() > MAX_JUSTIFICATION_CHARS || bad.is_some() {
        return Err(Denial::new(
            ErrorCode::InvalidArgument,
            format!(
                "justification: at most {MAX_JUSTIFICATION_CHARS} characters, no control or format characters{}",
                bad.map(|c| format!(", got U+{:04X}", c as u32)).unwrap_or_default()
            ),
        ));
    }
    Ok(())
}

fn is_format_char(c: char) -> bool {
    crate::text::has_format_chars(c.encode_utf8(&mut [0; 4])).is_some()
}

/// The uid a record names: none for a signed remote caller (it has none).
pub(super) fn actor_uid(caller: &Caller) -> Option<u32> {
    caller.signer.is_none().then_some(caller.uid)
}

/// A caller's input that did not pass the checks, as it may be recorded.
fn unchecked(text: &str) -> String {
    crate::text::unchecked(text)
}

/// A source as an audit record holds it: the prefix when `text` is one, else an
/// escaped, capped copy marked as unchecked ([`crate::text::unchecked`]).
pub(super) fn recorded_source(text: &str) -> String {
    match parse_prefix(text) {
        Ok(net) => format_prefix(&net),
        Err(_) => unchecked(text),
    }
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

/// Adds who signed a remote knock or fleet request to its record: principals, key,
/// peer, nonce (the nonce on disk keeps a replay refused after a restart) and the fleet
/// request.
pub(super) fn stamp_signer(r: &mut AuditRecord, caller: &Caller) {
    if let Some(s) = &caller.signer {
        r.principals = s.principals.clone();
        r.key = Some(s.fingerprint.clone()).filter(|k| !k.is_empty());
        r.certificate = s.certificate.clone();
        r.peer = s.peer.map(|p| p.to_string());
        r.nonce = s.nonce.clone();
        super::stamp_fleet(r, s.fleet.as_ref());
    }
}

/// The record of one grant of an approved request.
fn grant_request_record(
    request: &GrantRequest,
    grant: &NewGrant,
    id: GrantId,
    caller: &Caller,
    time: DateTime<Utc>,
) -> AuditRecord {
    let mut r = AuditRecord::new(
        time,
        actor_uid(caller),
        &caller.name,
        Action::Request,
        Outcome::Approved,
    );
    r.ports = vec![grant.port];
    r.protocol = Some(grant.protocol);
    r.source = Some(format_prefix(&grant.source));
    r.duration_secs = Some(grant.duration.as_secs());
    r.justification = request.justification.clone();
    r.grant_id = Some(id);
    stamp_signer(&mut r, caller);
    r
}

#[cfg(test)]
mod tests;
