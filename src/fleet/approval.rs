//! A signed approval of a fleet request that waits for an approver (a port with
//! `approvals = 1`): the two-person rule across the fleet. An approver signs, with
//! their own SSH key in the `fleet-approve@jitd` namespace, the fleet it is for, which
//! request they approve,
//! whose key signed it, the SHA-256 of its text, and what it opens (ports and source),
//! so that an approval never covers another request written under the same id (other
//! hosts, a longer duration); it is stored beside the request under
//! `approvals/<id>/<nonce>`, on the request's lease. Each host that holds the request
//! pending checks the signature against its own `allowed_signers`, the approver's role
//! and that approver and requester are two people, as for `jitctl approve`.

use std::fmt::Write as _;

use chrono::{DateTime, SecondsFormat, Utc};
use ipnet::IpNet;

use crate::domain::format_prefix;
use crate::remote::request::{self as knock, Lines};

/// The SSHSIG namespace of an approval: never a request's or a knock's.
pub const NAMESPACE: &str = "fleet-approve@jitd";

/// An approval, as signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetApproval {
    /// The fleet it is for (as the request it approves).
    pub fleet: String,
    /// The id of the request it approves.
    pub request: String,
    /// The SHA-256 fingerprint of the key that signed that request (`SHA256:...`).
    pub requester: String,
    /// SHA-256 of that request's canonical text, in hex ([`super::request::FleetRequest::digest`]).
    pub digest: String,
    /// The request's ports, ascending.
    pub ports: Vec<u16>,
    /// The request's source.
    pub source: IpNet,
    /// When it was signed (whole seconds).
    pub time: DateTime<Utc>,
    /// 16 random bytes: the approval's own id (its key's last part, in hex).
    pub nonce: [u8; 16],
}

impl FleetApproval {
    /// The canonical text that is signed and stored.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let ports: Vec<String> = self.ports.iter().map(u16::to_string).collect();
        let _ = writeln!(out, "fleet {}", self.fleet);
        let _ = writeln!(out, "approve {}", self.request);
        let _ = writeln!(out, "requester {}", self.requester);
        let _ = writeln!(out, "digest {}", self.digest);
        let _ = writeln!(out, "ports {}", ports.join(","));
        let _ = writeln!(out, "source {}", format_prefix(&self.source));
        let _ = writeln!(out, "time {}", self.time.to_rfc3339_opts(SecondsFormat::Secs, true));
        let _ = writeln!(out, "nonce {}", self.id());
        out
    }

    /// Reads the canonical text; any other spelling is refused, naming the line.
    pub fn parse(text: &str) -> Result<FleetApproval, String> {
        let mut lines = Lines::new(text)?;
        let fleet = super::request::fleet_id(lines.take("fleet")?)?;
        let request = lines.take("approve")?;
        knock::nonce(request).map_err(|e| format!("approve: {e}"))?;
        let requester = fingerprint(lines.take("requester")?)?;
        let digest = lines.take("digest")?;
        if !crate::text::is_lower_hex(digest, 64) {
            return Err(format!("digest: {digest:?} is not 64 lowercase hex digits"));
        }
        let approval = FleetApproval {
            fleet,
            request: request.to_string(),
            requester,
            digest: digest.to_string(),
            ports: knock::ports(lines.take("ports")?)?,
            source: knock::source(lines.take("source")?)?,
            time: knock::time(lines.take("time")?, "time")?,
            nonce: knock::nonce(lines.take("nonce")?)?,
        };
        lines.end()?;
        if approval.encode() != text {
            return Err("approval: not in canonical form".into());
        }
        Ok(approval)
    }

    /// Its own id: the nonce in hex (the key is `approvals/<request>/<id>`).
    pub fn id(&self) -> String {
        crate::remote::nonces::hex(&self.nonce)
    }
}

/// A key fingerprint as `ssh-keygen -l` prints it: `SHA256:` and unpadded base64.
fn fingerprint(v: &str) -> Result<String, String> {
    let digits = v.strip_prefix("SHA256:").unwrap_or("");
    let base64 = |b: u8| b.is_ascii_alphanumeric() || b == b'+' || b == b'/';
    if digits.len() != 43 || !digits.bytes().all(base64) {
        return Err(format!("requester: {v:?} is not a SHA256: key fingerprint"));
    }
    Ok(v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> FleetApproval {
        FleetApproval {
            fleet: "/jitd/".into(),
            request: "5f".repeat(16),
            requester: "SHA256:3zOkzBN10buz7H4b/gXfhjla9i3ifcxDZrcGPhGEkLI".into(),
            digest: "d1".repeat(32),
            ports: vec![22, 3389],
            source: crate::domain::parse_prefix("198.51.100.0/24").unwrap(),
            time: "2026-11-26T13:06:00Z".parse().unwrap(),
            nonce: [0xa1; 16],
        }
    }

    #[test]
    fn it_round_trips_and_names_what_it_approves() {
        let a = sample();
        let text = a.encode();
        let head = format!(
            "fleet /jitd/\napprove {}\nrequester SHA256:3zOkzBN10buz7H4b/gXfhjla9i3ifcxDZrcGPhGEkLI\ndigest {}\nports 22,3389\nsource 198.51.100.0/24\n",
            "5f".repeat(16),
            "d1".repeat(32)
        );
        assert!(text.starts_with(&head), "{text}");
        assert_eq!(FleetApproval::parse(&text).unwrap(), a);
        assert_eq!(a.id(), "a1".repeat(16));
    }

    #[test]
    fn other_spellings_and_requests_are_refused() {
        let text = sample().encode();
        let request = include_str!("../../tests/fixtures/fleet/request").to_string();
        for (bad, why) in [
            (text.replace("approve 5f", "approve 5F"), "approve"),
            (text.replace("fleet /jitd/\n", ""), "fleet"),
            (text.replace("ports 22,3389", "ports 3389,22"), "ports"),
            (text.replace("source 198.51.100.0/24\n", ""), "source"),
            (text.replace("requester SHA256:", "requester MD5:"), "requester"),
            (text.replace("digest d1", "digest D1"), "digest"),
            (
                text.replace("requester SHA256:3zOk", "requester SHA256:3z Ok"),
                "requester",
            ),
            (text.replace("13:06:00Z", "13:06:00+00:00"), "canonical"),
            (format!("{text}x 1\n"), "unexpected"),
            (request, "approve"),
        ] {
            let e = FleetApproval::parse(&bad).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }
}
