//! How a host judges a fleet request it reads from etcd, cheapest check first, before
//! the request goes to the daemon's one commit path (which checks the policy):
//! the value's size and grammar, the key's id against the signed nonce, whether this
//! host is selected, the signed fleet against this host's own (`[fleet] id`), the
//! signing time, the signed end, then the signature against this host's own
//! `allowed_signers` in the `fleet@jitd` namespace. No I/O.

use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};

use super::approval::{FleetApproval, NAMESPACE as APPROVAL_NAMESPACE};
use super::request::{self, FleetRequest};
use super::settings::Fleet;
use super::NAMESPACE;
use crate::domain::format_prefix;
use crate::remote::packet::{self, Refusal, Signed, SignedBy};

/// How far in the future a request's signing time may be (clock skew).
pub const SKEW: TimeDelta = TimeDelta::seconds(30);

/// Why a host refused a fleet request before its policy saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// Stable code: `malformed`, `too_large`, `id_mismatch`, `other_fleet`, `unsigned`,
    /// `future`, `expired`, `no_lease`, or a signature refusal's code (`unknown_key`, `bad_signature`, ...).
    pub code: &'static str,
    /// What was wrong, for the audit log and the status record.
    pub reason: String,
}

impl Refused {
    /// A value that is not a fleet request.
    pub fn malformed(why: &str) -> Refused {
        Refused::new("malformed", why)
    }

    /// A refusal with `code` for `reason`.
    pub fn new(code: &'static str, reason: impl Into<String>) -> Refused {
        Refused {
            code,
            reason: reason.into(),
        }
    }
}

impl From<Refusal> for Refused {
    fn from(r: Refusal) -> Refused {
        Refused::new(r.code(), r.to_string())
    }
}

/// A request for this host whose signer is known, its signature not yet verified.
#[derive(Debug, Clone)]
pub struct Screened {
    /// The request as it claims to be signed.
    pub request: FleetRequest,
    signed: Signed,
}

/// The cheap checks of the value stored under `requests/<id>`: `Ok(None)` when it does
/// not select this host (nothing to do, nothing to audit).
pub fn screen(id: &str, value: &[u8], fleet: &Fleet, now: DateTime<Utc>) -> Result<Option<Screened>, Refused> {
    let (text, blob) = request::split(value).map_err(|e| Refused::new("malformed", e))?;
    let request = FleetRequest::parse(text).map_err(|e| Refused::new("malformed", e))?;
    if request.id() != id {
        return Err(Refused::new(
            "id_mismatch",
            format!("stored under requests/{id} but signed with nonce {}", request.id()),
        ));
    }
    if !request.hosts.iter().any(|t| fleet.selects(t)) {
        return Ok(None);
    }
    same_fleet(&request.fleet, fleet)?;
    let blob = blob.ok_or_else(|| Refused::new("unsigned", "the request carries no signature"))?;
    if request.time > now + SKEW {
        return Err(Refused::new("future", "signed in the future (clocks apart?)"));
    }
    if request.signed_end() <= now {
        return Err(Refused::new("expired", "its signed duration is over"));
    }
    let signed = packet::screen_signature(text, &blob, NAMESPACE, &fleet.signers, now)?;
    Ok(Some(Screened { request, signed }))
}

/// Whether a request or an approval signed for fleet `signed_for` belongs to this
/// host's fleet: a signature made for one fleet never opens another's hosts, whatever
/// their names (a value copied into another prefix or another etcd).
fn same_fleet(signed_for: &str, fleet: &Fleet) -> Result<(), Refused> {
    if signed_for == fleet.id {
        return Ok(());
    }
    Err(Refused::new(
        "other_fleet",
        format!("signed for fleet {signed_for}, this host is in fleet {}", fleet.id),
    ))
}

/// The signature's expensive checks (see [`packet::verify_signature`]).
pub fn verify(screened: Screened, now: DateTime<Utc>) -> Result<(FleetRequest, SignedBy), Refused> {
    let by = packet::verify_signature(screened.signed, now)?;
    Ok((screened.request, by))
}

/// An approval whose signer is known, its signature not yet verified.
#[derive(Debug, Clone)]
pub struct ScreenedApproval {
    /// The approval as it claims to be signed.
    pub approval: FleetApproval,
    signed: Signed,
}

/// The cheap checks of the value stored under `approvals/<request>/<approval>`: its
/// grammar, both ids against the signed text, the signing time, and a signer known to
/// this host in the approvals' namespace.
pub fn screen_approval(
    (request, approval_id): (&str, &str),
    value: &[u8],
    fleet: &Fleet,
    now: DateTime<Utc>,
) -> Result<ScreenedApproval, Refused> {
    let (text, blob) = request::split(value).map_err(|e| Refused::new("malformed", e))?;
    let approval = FleetApproval::parse(text).map_err(|e| Refused::new("malformed", e))?;
    if approval.request != request || approval.id() != approval_id {
        return Err(Refused::new(
            "id_mismatch",
            format!(
                "stored under approvals/{request}/{approval_id} but signed for request {} with nonce {}",
                approval.request,
                approval.id()
            ),
        ));
    }
    same_fleet(&approval.fleet, fleet)?;
    let blob = blob.ok_or_else(|| Refused::new("unsigned", "the approval carries no signature"))?;
    if approval.time > now + SKEW {
        return Err(Refused::new("future", "signed in the future (clocks apart?)"));
    }
    let signed = packet::screen_signature(text, &blob, APPROVAL_NAMESPACE, &fleet.signers, now)?;
    Ok(ScreenedApproval { approval, signed })
}

/// The approval signature's expensive checks (see [`packet::verify_signature`]).
pub fn verify_approval(screened: ScreenedApproval, now: DateTime<Utc>) -> Result<(FleetApproval, SignedBy), Refused> {
    let by = packet::verify_signature(screened.signed, now)?;
    Ok((screened.approval, by))
}

/// Whether `approval` covers a request waiting here: signed by the key `requester`,
/// whose text has SHA-256 `digest`, for `ports` from `source`. An approval names whose
/// request it approves, its text and what it opens, so that it never covers another
/// text written under its id (other hosts, a longer duration, another time).
pub fn approval_covers(
    approval: &FleetApproval,
    requester: &str,
    digest: &str,
    ports: &[u16],
    source: &ipnet::IpNet,
) -> Result<(), Refused> {
    if approval.digest != digest {
        return Err(Refused::new(
            "approval_mismatch",
            "the approval is for another text of this request (another request written under its id)",
        ));
    }
    if approval.requester != requester {
        return Err(Refused::new(
            "approval_mismatch",
            format!(
                "the approval is for a request signed by {}, the request waiting here was signed by {requester}",
                approval.requester
            ),
        ));
    }
    let mut waiting = ports.to_vec();
    waiting.sort_unstable();
    if approval.ports != waiting || approval.source != *source {
        return Err(Refused::new(
            "approval_mismatch",
            format!(
                "the approval is for ports {:?} from {}, the request waiting here is for ports {waiting:?} from {}",
                approval.ports,
                format_prefix(&approval.source),
                format_prefix(source)
            ),
        ));
    }
    Ok(())
}

/// Until when a host opens for a request first seen at `now` with `lease_left` of its
/// lease remaining (`None`: not attached to a live lease): the sooner of the lease's
/// end and the signed end.
pub fn open_until(
    request: &FleetRequest,
    lease_left: Option<Duration>,
    now: DateTime<Utc>,
) -> Result<DateTime<Utc>, Refused> {
    let left = lease_left.ok_or_else(|| Refused::new("no_lease", "not attached to a live etcd lease"))?;
    let lease_end = now + TimeDelta::from_std(left).unwrap_or(TimeDelta::MAX);
    let until = lease_end.min(request.signed_end());
    if until <= now + TimeDelta::seconds(1) {
        return Err(Refused::new("expired", "its lease or signed duration is over"));
    }
    Ok(until)
}

#[cfg(test)]
mod tests;
