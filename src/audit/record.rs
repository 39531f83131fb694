//! The audit log's vocabulary: what a record says ([`AuditRecord`], its [`Action`] and
//! [`Outcome`]) and which records a query wants ([`AuditFilter`]).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::domain::{GrantId, Protocol};

/// What was asked for or what happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// A request for access.
    Request,
    /// A request to end grants early.
    Revoke,
    /// A grant reached its end.
    Expire,
    /// A grant was replaced by a newer one.
    Supersede,
    /// jitd started and locked the ports.
    Start,
    /// jitd stopped.
    Stop,
    /// The policy was re-read.
    Reload,
    /// jitd found its table changed by someone else and restored it.
    Repair,
    /// The sessions a revoked grant admitted were cut (`revoke --terminate`).
    Terminate,
    /// Rotation deleted the oldest audit file; `reason` says what it held.
    Rotate,
    /// At start, jitd cut an incomplete write (a torn line, an unfinished batch) from
    /// the end of the log; `reason` says how much and where the cut bytes were kept.
    Recover,
    /// The wall clock stepped against the monotonic clock; `reason` says by how much.
    Clock,
    /// A remote knock was dropped before it reached the policy (malformed, outside the
    /// time window, for another host, an unknown key, a bad signature, a replay);
    /// `reason` says which. Knocks that reach the policy are `request` records.
    Knock,
    /// An approver approved a request that waited for approval (or tried to).
    Approve,
    /// An approver (or the requester) turned down a request that waited for approval
    /// (or tried to); `reason` says why.
    Deny,
    /// A fleet request read from etcd was dropped before it reached the policy
    /// (malformed, unsigned, an unknown key, a bad signature, expired); `reason` says
    /// which and names the request id. Those that reach the policy are `request` records.
    Fleet,
}

/// How it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Access granted.
    Approved,
    /// Refused; `reason` says why.
    Denied,
    /// The grant ran out.
    Expired,
    /// A newer grant replaced it.
    Superseded,
    /// Ended early on request.
    Revoked,
    /// Approved but could not be applied; nothing changed.
    Failed,
    /// A lifecycle event (start, stop, reload).
    Done,
    /// Drift found and the table restored.
    Repaired,
    /// Refusals counted but not recorded one by one (see [`limit`]); `reason` says
    /// how many, between when, with which codes.
    Suppressed,
    /// The request passed every check and waits for an approver (`request_id`,
    /// `times_out_at`); nothing was opened.
    Pending,
}

/// One decision or event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// When (UTC).
    pub time: DateTime<Utc>,
    /// Who acted, by uid (none for jitd's own events).
    pub actor_uid: Option<u32>,
    /// Who acted, by name (`jitd` for its own events).
    pub actor: String,
    /// What was asked for or happened.
    pub action: Action,
    /// How it ended.
    pub outcome: Outcome,
    /// Why (denial reason, revoking user, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Ports concerned.
    #[serde(default)]
    pub ports: Vec<u16>,
    /// Protocol of the grant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
    /// Source address or prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Requested or granted duration in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_secs: Option<u64>,
    /// The requester's justification.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub justification: Option<String>,
    /// The grant concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant_id: Option<GrantId>,
    /// In the record of a grant's end: the new connections it admitted, as the
    /// kernel's counters of its set elements counted them (absent when they could not
    /// be read). See docs/usage.md.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections: Option<u64>,
    /// A signed remote knock: the principals its key vouched for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<String>,
    /// A signed remote knock: the signing key's SHA-256 fingerprint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// A remote knock signed with an SSH certificate: its key id, serial and CA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<String>,
    /// A remote knock: the address and port the packet came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// A remote knock: its nonce (hex), so that after a restart it is still refused
    /// as a replay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonce: Option<String>,
    /// A fleet request (read from etcd): its id, in every record of what it did here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet_request: Option<String>,
    /// A fleet request: the hosts and groups it named (a host that leaves a group
    /// closes that group's grants, also after a restart).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fleet_hosts: Vec<String>,
    /// A fleet request: the etcd revision that created its key as this host judged it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet_revision: Option<i64>,
    /// A fleet request: SHA-256 of its text as judged here (what an approval names).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet_digest: Option<String>,
    /// A request that waited (or waits) for approval: its id, shared by every record
    /// of its life (pending, approve, deny, expire, and the grants it opened).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<GrantId>,
    /// A pending request asked until a time: its grant ends then at the latest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<DateTime<Utc>>,
    /// A pending request: when it times out unless an approver decides first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub times_out_at: Option<DateTime<Utc>>,
    /// The login uid of the process that asked or decided, when the kernel knows one
    /// (`/proc/PID/loginuid`: who logged in, kept across sudo and su).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub login_uid: Option<u32>,
    /// The transaction this record was written with, when it had several records: a
    /// reader applies a batch only when all its records are there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<Batch>,
    /// SHA-256 of the record before this one ([`chain::GENESIS`] for the first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev: Option<String>,
    /// SHA-256 of this record up to this field; always the last field of the line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
}

impl AuditRecord {
    /// The fleet request this record's grant or request came from, if any.
    pub fn fleet_origin(&self) -> Option<crate::domain::FleetOrigin> {
        self.fleet_request.clone().map(|request| crate::domain::FleetOrigin {
            request,
            hosts: self.fleet_hosts.clone(),
            revision: self.fleet_revision.unwrap_or(0),
            digest: self.fleet_digest.clone().unwrap_or_default(),
        })
    }

    /// Whether this record ends a grant (it expired, was superseded or revoked).
    pub fn ends_grant(&self) -> bool {
        self.grant_id.is_some() && matches!(self.outcome, Outcome::Expired | Outcome::Superseded | Outcome::Revoked)
    }

    /// A record of `action`/`outcome` by `actor` at `time`, other fields empty.
    pub fn new(
        time: DateTime<Utc>,
        actor_uid: Option<u32>,
        actor: &str,
        action: Action,
        outcome: Outcome,
    ) -> AuditRecord {
        AuditRecord {
            time,
            actor_uid,
            actor: actor.to_string(),
            action,
            outcome,
            reason: None,
            ports: Vec::new(),
            protocol: None,
            source: None,
            duration_secs: None,
            justification: None,
            grant_id: None,
            connections: None,
            principals: Vec::new(),
            key: None,
            certificate: None,
            peer: None,
            nonce: None,
            fleet_request: None,
            fleet_hosts: Vec::new(),
            fleet_revision: None,
            fleet_digest: None,
            request_id: None,
            until: None,
            times_out_at: None,
            login_uid: None,
            batch: None,
            prev: None,
            hash: None,
        }
    }
}

/// The records of one append (one transaction) carry where each stands in it, inside
/// the hashed record; a record without it is a batch of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    /// The batch's id: the chain position of its first record.
    pub id: u64,
    /// This record's place in the batch (1-based).
    pub n: u32,
    /// How many records the batch has.
    pub of: u32,
}

/// Which records a query wants; every set field must match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditFilter {
    /// At or after this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<DateTime<Utc>>,
    /// At or before this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<DateTime<Utc>>,
    /// Acting user name (or uid as text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Concerning this port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Only the ends of grants that admitted no connection ("granted, never used").
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unused: bool,
}

impl AuditFilter {
    /// Whether `record` passes the filter.
    pub fn matches(&self, record: &AuditRecord) -> bool {
        self.since.is_none_or(|t| record.time >= t)
            && self.until.is_none_or(|t| record.time <= t)
            && self.user.as_ref().is_none_or(|u| {
                *u == record.actor || Some(u.as_str()) == record.actor_uid.map(|n| n.to_string()).as_deref()
            })
            && self.port.is_none_or(|p| record.ports.contains(&p))
            && (!self.unused || (record.ends_grant() && record.connections == Some(0)))
    }
}

/// The serde name of a unit enum value (`approved`, `request`, ...).
pub fn enum_text<T: Serialize>(value: &T) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(minute: u32, actor: &str, port: u16) -> AuditRecord {
        let time = DateTime::parse_from_rfc3339(&format!("2026-11-25T10:{minute:02}:00Z"))
            .unwrap()
            .with_timezone(&Utc);
        let mut r = AuditRecord::new(time, Some(1001), actor, Action::Request, Outcome::Approved);
        r.ports = vec![port];
        r
    }

    #[test]
    fn filters_combine() {
        let r = record(30, "bob", 22);
        let at = |m: u32| Some(record(m, "x", 1).time);
        assert!(AuditFilter::default().matches(&r));
        assert!(AuditFilter {
            since: at(30),
            until: at(30),
            ..Default::default()
        }
        .matches(&r));
        assert!(!AuditFilter {
            since: at(31),
            ..Default::default()
        }
        .matches(&r));
        assert!(!AuditFilter {
            until: at(29),
            ..Default::default()
        }
        .matches(&r));
        assert!(AuditFilter {
            user: Some("bob".into()),
            port: Some(22),
            ..Default::default()
        }
        .matches(&r));
        assert!(AuditFilter {
            user: Some("1001".into()),
            ..Default::default()
        }
        .matches(&r));
        assert!(!AuditFilter {
            user: Some("alice".into()),
            ..Default::default()
        }
        .matches(&r));
        assert!(!AuditFilter {
            port: Some(3389),
            ..Default::default()
        }
        .matches(&r));
    }
}
