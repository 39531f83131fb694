//! A fleet request as signed and as stored in etcd: the canonical `key value` lines of a
//! knock's request (`src/remote/request.rs`), with `fleet` (the fleet it is signed
//! for: a host obeys only its own fleet's), `hosts` (names and `group:NAME`s) where a
//! knock has `host`, and `source` required. Stored under `requests/<id>`, the id
//! being the nonce in hex, as the request text followed by the armoured SSHSIG.

use std::fmt::Write as _;

use chrono::{DateTime, SecondsFormat, TimeDelta, Utc};
use ipnet::IpNet;

use super::settings::{valid_fleet_id, valid_name};
use crate::domain::format_prefix;
use crate::remote::request::{self as knock, Lines};

/// The most hosts and groups one request may name.
pub const MAX_TARGETS: usize = 64;
/// The largest value jitd reads under `requests/`.
pub const MAX_VALUE: usize = 8192;
/// The longest grant a fleet request may ask for (a day; each host's policy may allow less).
pub const MAX_DURATION: u64 = 86_400;
/// Where the armoured signature begins in a stored value.
const ARMOUR: &str = "-----BEGIN SSH SIGNATURE-----";

/// A fleet request, as signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetRequest {
    /// The fleet it is for (`[fleet] id` of the hosts that obey it).
    pub fleet: String,
    /// The hosts (`NAME`) and groups (`group:NAME`) it is for.
    pub hosts: Vec<String>,
    /// Ports asked for, ascending, no duplicates.
    pub ports: Vec<u16>,
    /// Seconds from the signing time: no host opens anything past `time + duration`.
    pub duration: u64,
    /// The address to open for (always explicit: a host never sees the requester).
    pub source: IpNet,
    /// Why, as for a socket request.
    pub justification: Option<String>,
    /// When it was signed (whole seconds).
    pub time: DateTime<Utc>,
    /// 16 random bytes; in hex, the request's id.
    pub nonce: [u8; 16],
}

impl FleetRequest {
    /// The canonical text that is signed and stored.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let ports: Vec<String> = self.ports.iter().map(u16::to_string).collect();
        let _ = writeln!(out, "fleet {}", self.fleet);
        let _ = writeln!(out, "hosts {}", self.hosts.join(","));
        let _ = writeln!(out, "ports {}", ports.join(","));
        let _ = writeln!(out, "duration {}", self.duration);
        let _ = writeln!(out, "source {}", format_prefix(&self.source));
        if let Some(j) = &self.justification {
            let _ = writeln!(out, "justification {j}");
        }
        let _ = writeln!(out, "time {}", self.time.to_rfc3339_opts(SecondsFormat::Secs, true));
        let _ = writeln!(out, "nonce {}", self.id());
        out
    }

    /// Reads the canonical text; any other spelling is refused, naming the line.
    pub fn parse(text: &str) -> Result<FleetRequest, String> {
        let mut lines = Lines::new(text)?;
        let fleet = fleet_id(lines.take("fleet")?)?;
        let hosts = targets(lines.take("hosts")?)?;
        let ports = knock::ports(lines.take("ports")?)?;
        let duration = knock::duration(lines.take("duration")?)?;
        if duration > MAX_DURATION {
            return Err(format!("duration: at most {MAX_DURATION} seconds"));
        }
        let source = knock::source(lines.take("source")?)?;
        let justification = lines.take_if("justification").map(knock::justification).transpose()?;
        let time = knock::time(lines.take("time")?, "time")?;
        let nonce = knock::nonce(lines.take("nonce")?)?;
        lines.end()?;
        let request = FleetRequest {
            fleet,
            hosts,
            ports,
            duration,
            source,
            justification,
            time,
            nonce,
        };
        if request.encode() != text {
            return Err("request: not in canonical form".into());
        }
        Ok(request)
    }

    /// Its id: the nonce in hex (the key is `requests/<id>`).
    pub fn id(&self) -> String {
        crate::remote::nonces::hex(&self.nonce)
    }

    /// SHA-256 of its canonical text, in hex: what an approval signs, so that it covers
    /// this text and no other written under the same id.
    pub fn digest(&self) -> String {
        use sha2::{Digest, Sha256};
        hex::encode(Sha256::digest(self.encode().as_bytes()))
    }

    /// The latest time it may keep anything open: signing time plus duration.
    pub fn signed_end(&self) -> DateTime<Utc> {
        self.time + TimeDelta::seconds(self.duration as i64)
    }

    /// The value stored in etcd: the text, then the armoured signature.
    pub fn stored(text: &str, armoured_signature: &str) -> String {
        format!("{text}{}", armoured_signature.trim_end())
    }
}

/// Splits a stored value into the request text and the signature blob (`None`: the
/// value carries no signature at all).
pub fn split(value: &[u8]) -> Result<(&str, Option<Vec<u8>>), String> {
    if value.len() > MAX_VALUE {
        return Err(format!("value: larger than {MAX_VALUE} bytes"));
    }
    let value = std::str::from_utf8(value).map_err(|_| "value: not UTF-8".to_string())?;
    let Some(at) = value.find(ARMOUR) else {
        return Ok((value, None));
    };
    let (text, armoured) = value.split_at(at);
    let blob = crate::remote::sshsig::dearmour(armoured).map_err(|e| format!("signature: {e}"))?;
    Ok((text, Some(blob)))
}

/// A fleet's id as signed (see [`valid_fleet_id`]).
pub(crate) fn fleet_id(v: &str) -> Result<String, String> {
    if !valid_fleet_id(v) {
        return Err(format!("fleet: {v:?} is not a fleet id"));
    }
    Ok(v.to_string())
}

fn targets(v: &str) -> Result<Vec<String>, String> {
    let mut out: Vec<String> = Vec::new();
    for t in v.split(',') {
        let name = t.strip_prefix("group:").unwrap_or(t);
        if !valid_name(name) {
            return Err(format!("hosts: {t:?} is not a host name or group:NAME"));
        }
        if out.iter().any(|o| o.eq_ignore_ascii_case(t)) {
            return Err(format!("hosts: {t:?} named twice"));
        }
        out.push(t.to_string());
    }
    if out.len() > MAX_TARGETS {
        return Err(format!("hosts: more than {MAX_TARGETS} hosts and groups"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> FleetRequest {
        FleetRequest {
            fleet: "/jitd/".into(),
            hosts: vec!["web1".into(), "group:web".into()],
            ports: vec![22],
            duration: 3600,
            source: crate::domain::parse_prefix("198.51.100.7").unwrap(),
            justification: Some("INC-1234".into()),
            time: "2026-11-26T13:05:00Z".parse().unwrap(),
            nonce: [0x5f; 16],
        }
    }

    #[test]
    fn it_round_trips_and_its_id_is_the_nonce() {
        let r = sample();
        let text = r.encode();
        assert!(text.starts_with("fleet /jitd/\nhosts web1,group:web\nports 22\nduration 3600\nsource 198.51.100.7\n"));
        assert_eq!(FleetRequest::parse(&text).unwrap(), r);
        assert_eq!(r.id(), "5f".repeat(16));
        assert_eq!(r.signed_end(), "2026-11-26T14:05:00Z".parse::<DateTime<Utc>>().unwrap());
    }

    #[test]
    fn a_knock_is_not_a_fleet_request_and_other_spellings_are_refused() {
        let text = sample().encode();
        let knock = include_str!("../../tests/fixtures/knock/request");
        assert!(FleetRequest::parse(knock).unwrap_err().contains("fleet"));
        for (bad, why) in [
            (text.replace("fleet /jitd/\n", ""), "fleet"),
            (text.replace("fleet /jitd/", "fleet a b"), "fleet"),
            (text.replace("source 198.51.100.7\n", ""), "source"),
            (text.replace("group:web", "group:web,web1"), "twice"),
            (text.replace("group:web", "group:"), "hosts"),
            (text.replace("group:web", "we b"), "hosts"),
            (text.replace("duration 3600", "duration 86401"), "at most"),
            (text.replace("duration 3600", "until 2026-11-26T14:05:00Z"), "duration"),
            (format!("{text}x 1\n"), "unexpected"),
        ] {
            let e = FleetRequest::parse(&bad).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }

    #[test]
    fn a_stored_value_splits_and_unsigned_or_huge_ones_are_refused() {
        assert_eq!(split(b"hosts a\n").unwrap(), ("hosts a\n", None));
        assert!(split(&vec![b'a'; MAX_VALUE + 1]).unwrap_err().contains("larger"));
        let sig = include_str!("../../tests/fixtures/knock/alice.sig");
        let text = sample().encode();
        let stored = FleetRequest::stored(&text, sig);
        let (t, blob) = split(stored.as_bytes()).unwrap();
        assert_eq!(t, text);
        assert!(blob.unwrap().starts_with(b"SSHSIG"));
    }
}
