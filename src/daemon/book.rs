//! What a granted request writes: its grants booked (superseding older ones for the
//! same slot), their audit records, and the caller's marks on them. Shared by the
//! request path ([`super::requests`]) and the approval of a waiting request
//! ([`super::approvals`]), so that a grant is booked the same way whichever way it came.

use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::time::Instant;

use super::tx::{Footprint, Tx};
use super::{failure_of, grant_record, State};
use crate::api::protocol::GrantRequest;
use crate::audit::{Action, AuditRecord, Outcome};
use crate::domain::{format_prefix, parse_prefix, Caller, ErrorCode, GrantId, MAX_JUSTIFICATION_CHARS};
use crate::grants::{Grant, NewGrant};
use crate::policy::{Denial, Role};

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
pub(super) fn unchecked(text: &str) -> String {
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
