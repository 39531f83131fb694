//! The domain's vocabulary, shared by the policy file, the decisions, the grant book,
//! the audit log and the nftables rules: protocols and transports, ports, source
//! prefixes as people write them, grant ids, the kernel's view of a grant (key and
//! element), and who is asking (a caller, the principals that name them).
//!
//! Plain values with no I/O, depending on nothing else in the crate: every other module
//! may use them, so none of them has to import another's types.

use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// The longest justification jitd accepts, whichever way a request comes.
pub const MAX_JUSTIFICATION_CHARS: usize = 500;

/// A destination port, 1..=65535 once validated.
pub type Port = u16;

/// A grant's identifier, unique across restarts (never reused).
pub type GrantId = u64;

/// Transport protocol of a protected port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP only.
    Tcp,
    /// UDP only.
    Udp,
    /// Both TCP and UDP.
    Any,
}

impl Protocol {
    /// The concrete transport protocols this covers.
    pub fn transports(self) -> &'static [Transport] {
        match self {
            Protocol::Tcp => &[Transport::Tcp],
            Protocol::Udp => &[Transport::Udp],
            Protocol::Any => &[Transport::Tcp, Transport::Udp],
        }
    }

    /// Whether two entries for the same port would protect the same traffic.
    pub fn overlaps(self, other: Protocol) -> bool {
        self == other || self == Protocol::Any || other == Protocol::Any
    }

    /// Parses the policy's spelling: `tcp`, `udp` or `any`.
    pub fn parse(text: &str) -> Option<Protocol> {
        match text {
            "tcp" => Some(Protocol::Tcp),
            "udp" => Some(Protocol::Udp),
            "any" => Some(Protocol::Any),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Any => "any",
        })
    }
}

/// A concrete transport protocol, as nftables matches it (`meta l4proto`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Transport {
    /// The nftables name of the protocol.
    pub fn name(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Udp => "udp",
        }
    }
}

/// What the kernel matches for one grant: a source, a transport and a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GrantKey {
    /// Address (/32, /128) or prefix.
    pub source: IpNet,
    /// TCP or UDP.
    pub transport: Transport,
    /// Destination port.
    pub port: Port,
}

/// A grant as a set element: its key and the time the kernel keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrantElement {
    /// What it matches.
    pub key: GrantKey,
    /// How long the kernel keeps it; rounded up to whole seconds, at least one.
    pub timeout: Duration,
}

/// A user, group or uid named in `[access]`, or the principal of an SSH key that
/// signs remote knocks.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Principal {
    /// `user:NAME`.
    User(String),
    /// `group:NAME`.
    Group(String),
    /// `uid:N`.
    Uid(u32),
    /// `principal:NAME`: a principal of an `allowed_signers` line (or of an SSH
    /// certificate its CA signed); matches only signed remote callers.
    Ssh(String),
}

impl Principal {
    /// Parses `user:NAME`, `group:NAME`, `uid:N` or `principal:NAME`.
    pub fn parse(text: &str) -> Result<Principal, String> {
        let (kind, value) = text
            .split_once(':')
            .ok_or_else(|| "must be \"user:NAME\", \"group:NAME\", \"uid:N\" or \"principal:NAME\"".to_string())?;
        if value.is_empty() {
            return Err("the name after the colon is empty".into());
        }
        match kind {
            "user" => Ok(Principal::User(value.to_string())),
            "group" => Ok(Principal::Group(value.to_string())),
            "uid" => value
                .parse()
                .map(Principal::Uid)
                .map_err(|_| "uid must be a number".to_string()),
            "principal" => Ok(Principal::Ssh(value.to_string())),
            _ => Err("must start with \"user:\", \"group:\", \"uid:\" or \"principal:\"".into()),
        }
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Principal::User(n) => write!(f, "user:{n}"),
            Principal::Group(n) => write!(f, "group:{n}"),
            Principal::Uid(n) => write!(f, "uid:{n}"),
            Principal::Ssh(n) => write!(f, "principal:{n}"),
        }
    }
}

/// The uid of a caller that is not a local user (a signed remote knock): `(uid_t)-1`,
/// which no process can have, so SO_PEERCRED never reports it.
pub const REMOTE_UID: u32 = u32::MAX;

/// A caller as the policy sees it: a local user (from the socket's peer credentials) or
/// the signer of a remote knock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Caller {
    /// Numeric user id from the kernel; [`REMOTE_UID`] for a signed remote caller.
    pub uid: u32,
    /// User name, or the uid as text when the user database has no entry; for a signed
    /// caller `principal:` and its first principal (as `[access]` would name it).
    pub name: String,
    /// Names of the user's primary and supplementary groups (none for a signed caller).
    pub groups: Vec<String>,
    /// For a signed remote caller: who signed, with what key, from where.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signer: Option<SignedBy>,
}

/// Who signed a remote knock, as its checks established it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedBy {
    /// The principals the `allowed_signers` line (or the certificate) vouches for.
    pub principals: Vec<String>,
    /// The signing key's SHA-256 fingerprint (`ssh-keygen -l`); empty when rebuilt
    /// from a stored grant.
    pub fingerprint: String,
    /// The address and port the knock came from (`None` when rebuilt).
    pub peer: Option<std::net::SocketAddr>,
    /// The knock's nonce, hex (`None` when rebuilt).
    pub nonce: Option<String>,
    /// The SSH certificate that signed, described (key id, serial, CA), if one did.
    pub certificate: Option<String>,
    /// A fleet request read from etcd (not a knock): its id and the hosts it named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<FleetOrigin>,
}

/// The fleet request a grant (or a pending request) came from: its id under
/// `requests/` in etcd and the hosts and groups it named, so that a deletion of the
/// request closes what it opened, also after a restart, and a host that leaves a group
/// closes that group's grants.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FleetOrigin {
    /// The request's id (its nonce in hex).
    pub request: String,
    /// The hosts (`NAME`) and groups (`group:NAME`) it named.
    pub hosts: Vec<String>,
    /// The etcd revision that created its key as this host judged it (0: unknown): a
    /// key deleted and written again (a revoke undone by someone who kept the value)
    /// has another, and what the first one opened is closed.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub revision: i64,
    /// SHA-256 of the request's text as judged here, in hex (what an approval must name).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub digest: String,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

impl Caller {
    /// A signed remote caller: no uid, no groups, known by its principals only.
    pub fn signed(signer: SignedBy) -> Caller {
        Caller {
            uid: REMOTE_UID,
            name: format!("principal:{}", signer.principals.first().map_or("-", String::as_str)),
            groups: Vec::new(),
            signer: Some(signer),
        }
    }
}

/// Declares [`ErrorCode`] with each variant's wire spelling, once.
macro_rules! error_codes {
    ($( $(#[$doc:meta])* $variant:ident = $wire:literal, )*) => {
        /// Why an operation was refused or failed, as the protocol's `error.code` spells
        /// it (snake_case). A code this build does not know (from a newer jitd) decodes
        /// as [`ErrorCode::Other`] with its text kept.
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        pub enum ErrorCode {
            $( $(#[$doc])* $variant, )*
            /// A code this build does not know, as received.
            Other(String),
        }

        impl ErrorCode {
            /// The wire spelling, e.g. `source_not_allowed`.
            pub fn as_str(&self) -> &str {
                match self {
                    $( ErrorCode::$variant => $wire, )*
                    ErrorCode::Other(text) => text,
                }
            }

            /// The code spelled `text` on the wire; unknown ones are kept as [`ErrorCode::Other`].
            pub fn from_wire(text: &str) -> ErrorCode {
                match text {
                    $( $wire => ErrorCode::$variant, )*
                    other => ErrorCode::Other(other.to_string()),
                }
            }
        }
    };
}

error_codes! {
    /// The caller's role does not allow the operation.
    NotAuthorized = "not_authorized",
    /// A requested port is not in the policy.
    PortNotProtected = "port_not_protected",
    /// The source is `/0` or wider than the port's `widest_prefix`.
    SourceTooWide = "source_too_wide",
    /// The source is not inside the port's `allowed_sources`.
    SourceNotAllowed = "source_not_allowed",
    /// Zero duration, or `until` in the past.
    DurationInvalid = "duration_invalid",
    /// Longer than the port's `max_duration`.
    DurationTooLong = "duration_too_long",
    /// A field is malformed.
    InvalidArgument = "invalid_argument",
    /// A fleet request that does not (or no longer) select this host, or `[fleet]` is
    /// off here.
    NotSelected = "not_selected",
    /// `revoke` matched no live grant; `approve`, `deny` or `pending` no request.
    NotFound = "not_found",
    /// The requester already has as many requests waiting for approval as jitd keeps,
    /// or jitd keeps as many as it will.
    TooManyPending = "too_many_pending",
    /// `reload`: the new policy is invalid; the old one stays.
    InvalidConfig = "invalid_config",
    /// The audit record could not be written, so nothing was done.
    AuditFailed = "audit_failed",
    /// nftables refused the change; nothing was changed.
    FirewallFailed = "firewall_failed",
    /// `revoke --terminate`: the grants are revoked, their sessions not cut.
    TerminateFailed = "terminate_failed",
    /// Anything else.
    Internal = "internal",
    /// Protocol error: not UTF-8, not JSON, no `v`, unknown `op` or field.
    Malformed = "malformed",
    /// Protocol error: a protocol version this jitd does not speak.
    UnsupportedVersion = "unsupported_version",
    /// Protocol error: the request line is too long.
    TooLarge = "too_large",
    /// Protocol error: the request line did not arrive in time.
    Timeout = "timeout",
    /// Protocol error: jitd serves as many connections as it will.
    Busy = "busy",
    /// Protocol error: jitd is stopping.
    ShuttingDown = "shutting_down",
}

impl ErrorCode {
    /// Whether this is a problem with the message or with jitd rather than a refusal of a
    /// valid request (jitctl exits 2 for these, 1 for refusals).
    pub fn is_protocol_error(&self) -> bool {
        matches!(
            self,
            ErrorCode::Malformed
                | ErrorCode::TooLarge
                | ErrorCode::UnsupportedVersion
                | ErrorCode::Timeout
                | ErrorCode::Busy
                | ErrorCode::ShuttingDown
        )
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ErrorCode {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<ErrorCode, D::Error> {
        let text = std::borrow::Cow::<'de, str>::deserialize(deserializer)?;
        Ok(ErrorCode::from_wire(&text))
    }
}

/// Parses an IPv4/IPv6 address (a /32 or /128) or a CIDR prefix without host bits.
pub fn parse_prefix(text: &str) -> Result<IpNet, String> {
    if let Ok(addr) = text.parse::<IpAddr>() {
        return Ok(IpNet::from(addr));
    }
    let net: IpNet = text.parse().map_err(|_| {
        "not an IP address or CIDR prefix (e.g. 203.0.113.7, 198.51.100.0/24, 2001:db8::/32)".to_string()
    })?;
    if net.trunc() != net {
        return Err(format!("has host bits set; did you mean {}?", net.trunc()));
    }
    Ok(net)
}

/// Formats a prefix the way people write it: a single address without `/32` or `/128`.
pub fn format_prefix(net: &IpNet) -> String {
    if net.prefix_len() == net.max_prefix_len() {
        net.addr().to_string()
    } else {
        net.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_parse_as_people_write_them_and_format_back() {
        for text in ["203.0.113.7", "198.51.100.0/24", "2001:db8::1", "2001:db8::/32"] {
            assert_eq!(format_prefix(&parse_prefix(text).unwrap()), text);
        }
        assert_eq!(format_prefix(&parse_prefix("203.0.113.7/32").unwrap()), "203.0.113.7");
        assert!(parse_prefix("10.0.0.1/8")
            .unwrap_err()
            .contains("did you mean 10.0.0.0/8?"));
        assert!(parse_prefix("bastion").unwrap_err().starts_with("not an IP address"));
    }

    #[test]
    fn protocols_cover_their_transports() {
        assert_eq!(
            Protocol::parse("any").unwrap().transports(),
            &[Transport::Tcp, Transport::Udp]
        );
        assert_eq!(Protocol::parse("sctp"), None);
        assert!(Protocol::Tcp.overlaps(Protocol::Any));
        assert!(!Protocol::Tcp.overlaps(Protocol::Udp));
        assert_eq!(Principal::parse("group:ops").unwrap().to_string(), "group:ops");
    }

    #[test]
    fn error_codes_keep_their_wire_spelling_and_unknown_ones_survive() {
        let json = serde_json::to_string(&ErrorCode::SourceNotAllowed).unwrap();
        assert_eq!(json, "\"source_not_allowed\"");
        assert_eq!(
            serde_json::from_str::<ErrorCode>(&json).unwrap(),
            ErrorCode::SourceNotAllowed
        );
        let newer: ErrorCode = serde_json::from_str("\"quota_exceeded\"").unwrap();
        assert_eq!(newer, ErrorCode::Other("quota_exceeded".into()));
        assert_eq!(newer.to_string(), "quota_exceeded");
        assert!(!newer.is_protocol_error());
        assert!(ErrorCode::Busy.is_protocol_error());
        assert!(!ErrorCode::FirewallFailed.is_protocol_error());
    }
}
