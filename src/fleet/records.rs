//! The keys under the fleet's prefix and the JSON records jitd and jitctl write there:
//! `hosts/<name>` (a host's registration, bound to its keep-alive lease),
//! `requests/<id>` (a signed request, bound to a lease whose TTL is the grant's
//! duration), `status/<id>/<host>` (one host's answer) and `approvals/<id>/<nonce>` (a
//! signed approval), both bound to the request's lease.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The keys of one fleet, all under its prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// The keys under `prefix` (which starts and ends with `/`).
    pub fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.to_string(),
        }
    }

    /// `hosts/`: every host's registration.
    pub fn hosts(&self) -> String {
        format!("{}hosts/", self.prefix)
    }

    /// `hosts/<name>`.
    pub fn host(&self, name: &str) -> String {
        format!("{}{name}", self.hosts())
    }

    /// `requests/`: every live request.
    pub fn requests(&self) -> String {
        format!("{}requests/", self.prefix)
    }

    /// `requests/<id>`.
    pub fn request(&self, id: &str) -> String {
        format!("{}{id}", self.requests())
    }

    /// `status/`: every host's answers.
    pub fn statuses(&self) -> String {
        format!("{}status/", self.prefix)
    }

    /// `status/<id>/`: the answers to one request.
    pub fn status_of(&self, id: &str) -> String {
        format!("{}{id}/", self.statuses())
    }

    /// `status/<id>/<host>`.
    pub fn status(&self, id: &str, host: &str) -> String {
        format!("{}{host}", self.status_of(id))
    }

    /// `approvals/`: every request's signed approvals.
    pub fn approvals(&self) -> String {
        format!("{}approvals/", self.prefix)
    }

    /// `approvals/<id>/`: the approvals of one request.
    pub fn approvals_of(&self, id: &str) -> String {
        format!("{}{id}/", self.approvals())
    }

    /// `approvals/<id>/<approval>`.
    pub fn approval(&self, id: &str, approval: &str) -> String {
        format!("{}{approval}", self.approvals_of(id))
    }

    /// The request id of a key under `requests/` (`None`: another key, or a bad id).
    pub fn request_id<'a>(&self, key: &'a str) -> Option<&'a str> {
        key.strip_prefix(&self.requests()).filter(|id| is_id(id))
    }

    /// The request id and approval id of a key under `approvals/` (`None`: another key,
    /// or bad ids).
    pub fn approval_ids<'a>(&self, key: &'a str) -> Option<(&'a str, &'a str)> {
        let (id, approval) = key.strip_prefix(&self.approvals())?.split_once('/')?;
        (is_id(id) && is_id(approval)).then_some((id, approval))
    }
}

/// Whether `id` is 32 lowercase hex digits (a request's or an approval's id).
fn is_id(id: &str) -> bool {
    crate::text::is_lower_hex(id, 32)
}

/// A host's registration under `hosts/<name>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    /// jitd's version.
    pub version: String,
    /// The host's groups.
    pub groups: Vec<String>,
    /// Its protected ports (`22/tcp`).
    pub ports: Vec<String>,
    /// The doctor's last verdict (`ok`, `2 problems, 1 warning`, `unknown`).
    pub health: String,
    /// When this jitd registered.
    pub since: DateTime<Utc>,
}

/// What one host did with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Open until `until`.
    Approved,
    /// Refused; `reason` says why.
    Denied,
    /// Waiting for an approver on that host until `until` (`reason` says how to approve).
    Pending,
    /// Closed early: the request was deleted or its lease revoked.
    Revoked,
}

impl Outcome {
    /// As the table shows it.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Approved => "approved",
            Outcome::Denied => "denied",
            Outcome::Pending => "pending",
            Outcome::Revoked => "revoked",
        }
    }
}

/// One host's answer under `status/<id>/<host>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusRecord {
    /// The host that answered.
    pub host: String,
    /// What it did.
    pub outcome: Outcome,
    /// With `approved`: when the port closes (the kernel's timeout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<DateTime<Utc>>,
    /// With `denied`: why (a code and a sentence).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When it answered.
    pub time: DateTime<Utc>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sit_under_the_prefix_and_only_request_ids_are_read_back() {
        let k = Keys::new("/jitd/");
        let id = "5f".repeat(16);
        assert_eq!(k.host("web1"), "/jitd/hosts/web1");
        assert_eq!(k.status(&id, "web1"), format!("/jitd/status/{id}/web1"));
        assert_eq!(k.request_id(&k.request(&id)), Some(id.as_str()));
        assert_eq!(k.request_id("/jitd/requests/../hosts/x"), None);
        assert_eq!(k.request_id(&format!("/other/requests/{id}")), None);
        assert_eq!(k.request_id(&k.request(&id.to_uppercase())), None);
        let a = "a1".repeat(16);
        assert_eq!(k.approval(&id, &a), format!("/jitd/approvals/{id}/{a}"));
        assert_eq!(k.approval_ids(&k.approval(&id, &a)), Some((id.as_str(), a.as_str())));
        assert_eq!(k.approval_ids(&format!("{}/x", k.approval(&id, &a))), None);
        assert_eq!(k.approval_ids(&k.approvals_of(&id)), None);
    }

    #[test]
    fn a_status_record_reads_back() {
        let r = StatusRecord {
            host: "web1".into(),
            outcome: Outcome::Denied,
            until: None,
            reason: Some("source_not_allowed: ...".into()),
            time: "2026-11-26T13:05:00Z".parse().unwrap(),
        };
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains("\"outcome\":\"denied\""), "{json}");
        assert_eq!(serde_json::from_str::<StatusRecord>(&json).unwrap(), r);
    }
}
