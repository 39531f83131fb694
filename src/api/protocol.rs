//! The socket protocol (pure types and framing): one JSON object per line each way,
//! versioned, with a size limit. See docs/protocol.md.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::audit::{AuditFilter, AuditRecord};
use crate::config::OnStop;
use crate::domain::{ErrorCode, GrantId, Protocol};
use crate::policy::Role;

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;
/// The largest request line jitd reads.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// The largest reply line jitctl reads.
pub const MAX_REPLY_BYTES: usize = 256 * 1024 * 1024;
/// How long jitd waits for a complete request line.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);
pub use crate::domain::MAX_JUSTIFICATION_CHARS;

/// A request line: `{"v":1,"op":"status"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// Protocol version of the sender.
    pub v: u32,
    /// The operation and its arguments.
    #[serde(flatten)]
    pub request: Request,
}

/// The operations, tagged by `op`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Ports, policy, recent use, and one page of the live grants.
    Status(StatusQuery),
    /// Ask for access.
    Request(GrantRequest),
    /// End grants early.
    Revoke(RevokeRequest),
    /// Read the audit log, one page at a time.
    Audit(AuditQuery),
    /// Walk the audit log's hash chain.
    AuditVerify,
    /// Is this host healthy, and why not ([`crate::health::report::DoctorReport`]).
    Doctor,
    /// Re-read the policy file.
    Reload,
    /// Approve a request that waits for approval (approvers).
    Approve(ApproveRequest),
    /// Turn down a request that waits for approval (approvers, or its requester).
    Deny(DenyRequest),
    /// Where a request that waited for approval stands (what `jitctl request` polls).
    Pending(PendingQuery),
}

/// Arguments of `approve`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApproveRequest {
    /// The pending request's id.
    pub id: GrantId,
}

/// Arguments of `deny`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DenyRequest {
    /// The pending request's id.
    pub id: GrantId,
    /// Why (recorded; at most [`MAX_JUSTIFICATION_CHARS`] characters, no control
    /// characters).
    pub reason: String,
}

/// Arguments of `pending`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PendingQuery {
    /// The request's id, as the `request` reply's `pending.id` gave it.
    pub id: GrantId,
}

/// Arguments of `request`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantRequest {
    /// Ports wanted; empty or absent: every protected port.
    #[serde(default)]
    pub ports: Vec<u16>,
    /// Address or CIDR prefix to open for.
    pub source: String,
    /// Duration in seconds (exactly one of this and `until`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_secs: Option<u64>,
    /// End time (exactly one of this and `duration_secs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<DateTime<Utc>>,
    /// Why (free text, recorded in the audit log).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub justification: Option<String>,
}

/// Arguments of `audit`: a filter, and which page.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditQuery {
    /// Which records.
    #[serde(flatten)]
    pub filter: AuditFilter,
    /// The most records in the reply (default and cap: 10,000, see
    /// [`crate::audit::query::MAX_LIMIT`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    /// Go on after the page that returned this `next_cursor`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
}

/// Arguments of `status`: which page of the live grants. An older client's bare
/// `{"v":1,"op":"status"}` asks for the first page of the default size.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusQuery {
    /// The most grants in the reply (default and cap: [`MAX_STATUS_LIMIT`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    /// Go on after the page that returned this `next_cursor`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
}

/// The most grants one `status` reply carries (and the page size when none is asked).
pub const MAX_STATUS_LIMIT: usize = 10_000;

/// Where a `status` page ends: grants are listed in id order, and the next page starts
/// after the last id shown. Grants that begin meanwhile have higher ids (they appear on
/// a later page); grants that end meanwhile are simply not shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusCursor(pub GrantId);

impl StatusCursor {
    const PREFIX: &'static str = "s1:";

    /// The cursor as sent in `next_cursor`.
    pub fn encode(self) -> String {
        format!("{}{}", Self::PREFIX, self.0)
    }

    /// Reads a `cursor` field; the error names the field and the value.
    pub fn parse(text: &str) -> Result<StatusCursor, String> {
        text.strip_prefix(Self::PREFIX)
            .and_then(|id| id.parse().ok())
            .map(StatusCursor)
            .ok_or_else(|| {
                format!(
                    "cursor: not a status cursor from jitd (s1:<grant id>), got {}",
                    crate::text::escape_capped(text, 80)
                )
            })
    }
}

/// Arguments of `revoke`: a grant id, or a source (and optionally a port).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeRequest {
    /// The grant to end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<GrantId>,
    /// End every grant for this source (as written in the grant).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// With `source`: only grants on this port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Also cut the sessions these grants admitted (their conntrack entries), for
    /// incident response; by default established sessions outlive their grant.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub terminate: bool,
}

/// A reply line: `{"v":1,"ok":true,"result":{..}}` or `{"v":1,"ok":false,"error":{..}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    /// Protocol version of jitd.
    pub v: u32,
    /// Whether the operation was done.
    pub ok: bool,
    /// The operation's result when `ok`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    /// Why not, when not `ok`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

impl Reply {
    /// A successful reply carrying `result`.
    pub fn ok(result: impl Serialize) -> Reply {
        Reply {
            v: PROTOCOL_VERSION,
            ok: true,
            result: Some(serde_json::to_value(result).expect("results serialize")),
            error: None,
        }
    }

    /// A refusal or error with a machine-readable `code` and a human `message`.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Reply {
        Reply {
            v: PROTOCOL_VERSION,
            ok: false,
            result: None,
            error: Some(ErrorBody {
                code,
                message: message.into(),
            }),
        }
    }

    /// The reply as one line, newline included.
    pub fn to_line(&self) -> Vec<u8> {
        let mut line = serde_json::to_vec(self).expect("replies serialize");
        line.push(b'\n');
        line
    }
}

/// What went wrong: `code` for scripts, `message` for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Stable code: a denial reason (`source_not_allowed`, ...) or a protocol error
    /// (`malformed`, ..., see [`ErrorCode::is_protocol_error`]).
    pub code: ErrorCode,
    /// A sentence naming the value at fault.
    pub message: String,
}

/// Decodes one request line (without its newline).
pub fn decode_request(line: &[u8]) -> Result<Request, Reply> {
    if line.len() > MAX_REQUEST_BYTES {
        return Err(Reply::error(
            ErrorCode::TooLarge,
            format!("request is larger than {MAX_REQUEST_BYTES} bytes"),
        ));
    }
    let text = std::str::from_utf8(line)
        .map_err(|e| Reply::error(ErrorCode::Malformed, format!("request is not UTF-8: {e}")))?;
    let value: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| Reply::error(ErrorCode::Malformed, format!("request is not JSON: {e}")))?;
    match value.get("v").and_then(serde_json::Value::as_u64) {
        Some(v) if v == u64::from(PROTOCOL_VERSION) => {}
        Some(v) => {
            return Err(Reply::error(
                ErrorCode::UnsupportedVersion,
                format!("protocol version {v} is not supported; this jitd speaks {PROTOCOL_VERSION}"),
            ))
        }
        None => {
            return Err(Reply::error(
                ErrorCode::Malformed,
                "request has no protocol version \"v\"",
            ))
        }
    }
    serde_json::from_value::<Envelope>(value)
        .map(|e| e.request)
        .map_err(|e| Reply::error(ErrorCode::Malformed, format!("invalid request: {e}")))
}

/// Encodes a request as one line, newline included.
pub fn encode_request(request: &Request) -> Vec<u8> {
    let mut line = serde_json::to_vec(&Envelope {
        v: PROTOCOL_VERSION,
        request: request.clone(),
    })
    .expect("requests serialize");
    line.push(b'\n');
    line
}

/// Result of `status`: the whole header and one page of the live grants.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReply {
    /// jitd's version.
    pub version: String,
    /// The protected ports and their recent use.
    pub ports: Vec<PortStatus>,
    /// The live grants of this page, in id order.
    pub grants: Vec<GrantInfo>,
    /// Present when the page ended at its limit: ask again with this `cursor` for the
    /// next page (which may be empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
    /// When the counters of this page's grants were read (`status` reads them for every
    /// page; when it cannot, the last reading of every element, made every 10 s): the
    /// grants' `connections` count up to then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections_counted_at: Option<DateTime<Utc>>,
    /// jitd's wall clock as it answered, and what it noticed about it.
    #[serde(default)]
    pub clock: ClockStatus,
    /// Sources the lockdown never applies to.
    pub exempt_sources: Vec<String>,
    /// Interfaces the lockdown applies to (empty: all).
    pub interfaces: Vec<String>,
    /// What stopping jitd does (`keep-locked` or `unlock`).
    pub on_stop: OnStop,
    /// The role the caller holds (`viewer`, `requester` or `admin`).
    pub your_role: Role,
    /// Counters since jitd started (the same as its metrics).
    #[serde(default)]
    pub health: Health,
    /// The doctor's last verdict (it runs every minute); absent before its first run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub doctor: Option<crate::health::report::HealthSummary>,
    /// The requests waiting for approval, in id order (at most
    /// [`crate::approval::MAX_PENDING`]; on every page).
    #[serde(default)]
    pub pending: Vec<PendingInfo>,
    /// Whether the caller may approve others' requests (`[access] approvers`, or root).
    #[serde(default)]
    pub approver: bool,
}

/// A request waiting for approval, as clients see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingInfo {
    /// Its id (for `approve`, `deny`, `pending`).
    pub id: GrantId,
    /// Who asked.
    pub requester: String,
    /// The ports asked for.
    pub ports: Vec<u16>,
    /// Address or prefix to open for.
    pub source: String,
    /// How long the grants last, counted from the approval.
    pub duration_secs: u64,
    /// Why.
    pub justification: Option<String>,
    /// When it was asked.
    pub asked_at: DateTime<Utc>,
    /// When it times out: jitd's wall clock as it answered plus `remaining_secs`.
    pub times_out_at: DateTime<Utc>,
    /// Seconds until it times out, by the monotonic clock (0 once it ended).
    pub remaining_secs: u64,
}

/// Result of `approve`, `deny` and `pending`: where a request that waited for approval
/// stands now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingStatus {
    /// The request.
    pub request: PendingInfo,
    /// `pending`, `approved`, `denied`, `expired` or `closed`.
    pub state: crate::approval::PendingState,
    /// Who decided (`jitd` when it timed out or was closed); absent while pending.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<String>,
    /// Why it was denied, timed out or closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When it was approved: the grants it opened that are still live.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub grants: Vec<GrantInfo>,
    /// When it was approved: the grants those replaced.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub superseded: Vec<GrantId>,
}

/// jitd's wall clock as `status` saw it. Grants end by the monotonic clock (jitd's
/// deadlines, the kernel's element timeouts); wall-clock times in a reply are derived
/// from it: a grant's `expires_at` is `now` + its `remaining_secs`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClockStatus {
    /// jitd's wall clock when it built the reply.
    pub now: DateTime<Utc>,
    /// Steps of the wall clock against the monotonic clock seen since jitd started.
    pub jumps: u64,
    /// The latest of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_jump: Option<ClockJump>,
    /// At start the wall clock was behind the newest audit record, so no grant was
    /// restored without the kernel's timers.
    pub behind_audit_at_start: bool,
}

/// A step of the wall clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClockJump {
    /// When it was noticed, by the wall clock after the step.
    pub at: DateTime<Utc>,
    /// How far it stepped, in seconds: positive forward, negative back.
    pub by_secs: i64,
}

/// Counters since jitd started, as `jitctl status` shows them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// Requests approved.
    pub requests_approved: u64,
    /// Requests refused by the policy.
    pub requests_denied: u64,
    /// Requests approved but not carried out (audit or nftables failure).
    pub requests_failed: u64,
    /// Tampering found and repaired.
    pub drift_repairs: u64,
    /// Audit records that could not be written.
    pub audit_write_failures: u64,
    /// Socket connections refused by the connection limit.
    pub refused_connections: u64,
}

/// One protected port, like a row of Azure's "Configured" tab.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PortStatus {
    /// Port number.
    pub port: u16,
    /// tcp, udp or any.
    pub protocol: Protocol,
    /// "any" or the allowed prefixes.
    pub allowed_sources: Vec<String>,
    /// Longest grant, in seconds.
    pub max_duration_secs: u64,
    /// Requests approved in the last 7 days.
    pub approved_last_7d: u64,
    /// When access was last granted.
    pub last_access: Option<DateTime<Utc>>,
    /// Who was last granted access.
    pub last_user: Option<String>,
}

/// A live grant as clients see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantInfo {
    /// Grant id.
    pub id: GrantId,
    /// Address or prefix.
    pub source: String,
    /// Port.
    pub port: u16,
    /// Protocol.
    pub protocol: Protocol,
    /// Who asked.
    pub requester: String,
    /// Why.
    pub justification: Option<String>,
    /// When it was approved.
    pub granted_at: DateTime<Utc>,
    /// When it ends, by jitd's wall clock as it answered: that clock's `now` plus
    /// `remaining_secs` (so never in the past while time is left, whatever the wall
    /// clock did since the grant began).
    pub expires_at: DateTime<Utc>,
    /// Seconds left, by the monotonic clock that enforces the grant.
    pub remaining_secs: u64,
    /// In `status`: the new connections the grant admitted so far (TCP SYNs and UDP
    /// packets of flows not yet answered that its set element let in), as counted up to
    /// the reply's `connections_counted_at`; absent when unknown (it shares a wider
    /// grant's set element that counted connections). See docs/usage.md.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections: Option<u64>,
}

/// Result of `request`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantedReply {
    /// The new grants, one per port entry.
    pub grants: Vec<GrantInfo>,
    /// Ids of the grants these replaced.
    pub superseded: Vec<GrantId>,
    /// When a port asked for needs an approval: the request, waiting (no grant was
    /// opened; `grants` is empty). Poll it with `pending`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<PendingInfo>,
}

/// Result of `revoke`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokedReply {
    /// The grants that were ended.
    pub revoked: Vec<GrantInfo>,
    /// With `terminate`: the sessions cut, as `tcp 192.0.2.7:40022 -> 198.51.100.1:22`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub terminated: Vec<String>,
}

/// Result of `audit`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditReply {
    /// Matching records, oldest first.
    pub records: Vec<AuditRecord>,
    /// Lines that could not be read, a cursor rotated away.
    pub warnings: Vec<String>,
    /// Present when the page ended at its limit: ask again with this `cursor` for the
    /// next page (which may be empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// Result of `reload`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadReply {
    /// Grants ended because the new policy no longer protects or allows them.
    pub ended: Vec<GrantId>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(line: &[u8]) -> ErrorCode {
        decode_request(line).unwrap_err().error.unwrap().code
    }

    #[test]
    fn requests_round_trip() {
        let requests = [
            Request::Status(StatusQuery::default()),
            Request::Status(StatusQuery {
                limit: Some(2),
                cursor: Some(StatusCursor(7).encode()),
            }),
            Request::Reload,
            Request::Doctor,
            Request::Request(GrantRequest {
                ports: vec![22],
                source: "203.0.113.7".into(),
                duration_secs: Some(60),
                until: None,
                justification: Some("ticket 4711".into()),
            }),
            Request::Revoke(RevokeRequest {
                id: Some(4),
                ..Default::default()
            }),
            Request::Audit(AuditQuery {
                filter: AuditFilter {
                    port: Some(22),
                    ..Default::default()
                },
                limit: Some(50),
                cursor: Some(format!("v1:{}:audit.jsonl:0", "0".repeat(64))),
            }),
            Request::Audit(AuditQuery::default()),
            Request::Approve(ApproveRequest { id: 7 }),
            Request::Deny(DenyRequest {
                id: 7,
                reason: "not during the freeze".into(),
            }),
            Request::Pending(PendingQuery { id: 7 }),
        ];
        for r in requests {
            let line = encode_request(&r);
            assert_eq!(line.last(), Some(&b'\n'));
            assert_eq!(decode_request(&line[..line.len() - 1]).unwrap(), r);
        }
        // an older client's status request, without paging fields
        assert_eq!(
            decode_request(br#"{"v":1,"op":"status"}"#).unwrap(),
            Request::Status(StatusQuery::default())
        );
        // an older client's audit request, without paging fields
        assert_eq!(
            decode_request(br#"{"v":1,"op":"audit","user":"bob"}"#).unwrap(),
            Request::Audit(AuditQuery {
                filter: AuditFilter {
                    user: Some("bob".into()),
                    ..Default::default()
                },
                ..Default::default()
            })
        );
    }

    #[test]
    fn bad_lines_get_a_code() {
        assert_eq!(code(b"\xff\xfe"), ErrorCode::Malformed);
        assert_eq!(code(b"hello"), ErrorCode::Malformed);
        assert_eq!(code(br#"{"op":"status"}"#), ErrorCode::Malformed);
        assert_eq!(code(br#"{"v":2,"op":"status"}"#), ErrorCode::UnsupportedVersion);
        assert_eq!(code(br#"{"v":1,"op":"format_disk"}"#), ErrorCode::Malformed);
        assert_eq!(
            code(br#"{"v":1,"op":"request","source":"x","bogus":1}"#),
            ErrorCode::Malformed
        );
        assert_eq!(code(&vec![b' '; MAX_REQUEST_BYTES + 1]), ErrorCode::TooLarge);
        assert_eq!(code(br#"{"v":1,"op":"status","limt":2}"#), ErrorCode::Malformed);
        assert_eq!(
            code(br#"{"v":1,"op":"approve","id":7,"as":"root"}"#),
            ErrorCode::Malformed
        );
        assert_eq!(
            code(br#"{"v":1,"op":"deny","id":7}"#),
            ErrorCode::Malformed,
            "a denial needs its reason"
        );
    }

    #[test]
    fn status_cursors_round_trip_and_others_are_refused_by_name() {
        assert_eq!(StatusCursor::parse(&StatusCursor(42).encode()), Ok(StatusCursor(42)));
        for bad in ["", "42", "s1:", "s1:-1", "s1:x", "v1:0:audit.jsonl:0"] {
            let e = StatusCursor::parse(bad).unwrap_err();
            assert!(e.starts_with("cursor: "), "{e}");
        }
    }

    #[test]
    fn status_names_on_stop_and_role_as_before() {
        let line = r#"{"version":"0.1.0","ports":[],"grants":[],"exempt_sources":[],"interfaces":[],"on_stop":"keep-locked","your_role":"requester"}"#;
        let status: StatusReply = serde_json::from_str(line).unwrap();
        assert_eq!(
            (status.on_stop, status.your_role),
            (OnStop::KeepLocked, Role::Requester)
        );
        let text = serde_json::to_string(&StatusReply {
            on_stop: OnStop::Unlock,
            your_role: Role::Admin,
            ..status
        })
        .unwrap();
        assert!(text.contains(r#""on_stop":"unlock","your_role":"admin""#), "{text}");
    }
}
