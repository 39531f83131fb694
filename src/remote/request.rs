//! The request a knock signs, in its one canonical text form: `key value` lines in a
//! fixed order, so that nothing can be signed in one reading and acted on in another.

use std::fmt::Write as _;

use chrono::{DateTime, SecondsFormat, Utc};
use ipnet::IpNet;

use crate::domain::{format_prefix, parse_prefix};

/// How long the grant is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Length {
    /// Seconds from the approval.
    Duration(u64),
    /// Until this time (jitd's clock judges it).
    Until(DateTime<Utc>),
}

/// A knock's request, as signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnockRequest {
    /// What the knock calls the host it is for.
    pub host: String,
    /// Ports asked for, ascending, no duplicates.
    pub ports: Vec<u16>,
    /// How long.
    pub length: Length,
    /// The address to open for; `None`: the packet's source address.
    pub source: Option<IpNet>,
    /// Why, as for a socket request.
    pub justification: Option<String>,
    /// When it was signed (whole seconds).
    pub time: DateTime<Utc>,
    /// 16 random bytes: a packet is accepted at most once.
    pub nonce: [u8; 16],
}

/// The longest host name a knock may carry (DNS's limit).
const MAX_HOST: usize = 253;
/// The longest justification, as for the socket.
const MAX_JUSTIFICATION: usize = crate::domain::MAX_JUSTIFICATION_CHARS;

impl KnockRequest {
    /// The canonical text that is signed and sent.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let ports: Vec<String> = self.ports.iter().map(u16::to_string).collect();
        let _ = writeln!(out, "host {}", self.host);
        let _ = writeln!(out, "ports {}", ports.join(","));
        let _ = match self.length {
            Length::Duration(secs) => writeln!(out, "duration {secs}"),
            Length::Until(t) => writeln!(out, "until {}", t.to_rfc3339_opts(SecondsFormat::Secs, true)),
        };
        if let Some(source) = &self.source {
            let _ = writeln!(out, "source {}", format_prefix(source));
        }
        if let Some(j) = &self.justification {
            let _ = writeln!(out, "justification {j}");
        }
        let _ = writeln!(out, "time {}", self.time.to_rfc3339_opts(SecondsFormat::Secs, true));
        let nonce: String = hex::encode(self.nonce);
        let _ = writeln!(out, "nonce {nonce}");
        out
    }

    /// Reads the canonical text; anything else (another order, extra spaces or lines,
    /// a value in another spelling) is refused, naming the line.
    pub fn parse(text: &str) -> Result<KnockRequest, String> {
        let mut lines = Lines::new(text)?;
        let host = host(lines.take("host")?)?;
        let ports = ports(lines.take("ports")?)?;
        let length = match lines.peek_key() {
            Some("until") => Length::Until(time(lines.take("until")?, "until")?),
            _ => Length::Duration(duration(lines.take("duration")?)?),
        };
        let source = lines.take_if("source").map(source).transpose()?;
        let justification = lines.take_if("justification").map(justification).transpose()?;
        let time = time(lines.take("time")?, "time")?;
        let nonce = nonce(lines.take("nonce")?)?;
        lines.end()?;
        let request = KnockRequest {
            host,
            ports,
            length,
            source,
            justification,
            time,
            nonce,
        };
        // one spelling only: what was read must be exactly what would be written
        if request.encode() != text {
            return Err("request: not in canonical form".into());
        }
        Ok(request)
    }
}

/// The `key value` lines of a request, read in order.
pub(crate) struct Lines<'a> {
    lines: std::iter::Peekable<std::str::Split<'a, char>>,
}

impl<'a> Lines<'a> {
    pub(crate) fn new(text: &'a str) -> Result<Lines<'a>, String> {
        let body = text.strip_suffix('\n').ok_or("request: must end with a newline")?;
        Ok(Lines {
            lines: body.split('\n').peekable(),
        })
    }

    pub(crate) fn peek_key(&mut self) -> Option<&'a str> {
        self.lines.peek().map(|l| l.split_once(' ').map_or(*l, |(k, _)| k))
    }

    pub(crate) fn take(&mut self, key: &str) -> Result<&'a str, String> {
        match self.lines.next() {
            Some(line) => match line.split_once(' ') {
                Some((k, v)) if k == key && !v.is_empty() => Ok(v),
                _ => Err(format!("request: expected `{key} VALUE`, got {line:?}")),
            },
            None => Err(format!("request: `{key}` is missing")),
        }
    }

    pub(crate) fn take_if(&mut self, key: &str) -> Option<&'a str> {
        (self.peek_key() == Some(key)).then(|| self.take(key).expect("peeked"))
    }

    pub(crate) fn end(&mut self) -> Result<(), String> {
        match self.lines.next() {
            None => Ok(()),
            Some(line) => Err(format!("request: unexpected line {line:?}")),
        }
    }
}

fn host(v: &str) -> Result<String, String> {
    let ok = v.len() <= MAX_HOST
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '_'));
    ok.then(|| v.to_string())
        .ok_or_else(|| format!("host: {v:?} is not a host name or address"))
}

pub(crate) fn ports(v: &str) -> Result<Vec<u16>, String> {
    let ports: Vec<u16> = v
        .split(',')
        .map(|p| p.parse::<u16>().ok().filter(|n| *n != 0 && n.to_string() == p))
        .collect::<Option<_>>()
        .ok_or_else(|| format!("ports: {v:?} is not a list of ports 1-65535"))?;
    if ports.len() > 16 || ports.windows(2).any(|w| w[0] >= w[1]) {
        return Err(format!(
            "ports: {v:?} must be ascending, without duplicates, at most 16"
        ));
    }
    Ok(ports)
}

pub(crate) fn duration(v: &str) -> Result<u64, String> {
    v.parse::<u64>()
        .ok()
        .filter(|s| *s > 0 && s.to_string() == v)
        .ok_or_else(|| format!("duration: {v:?} is not a whole number of seconds"))
}

pub(crate) fn time(v: &str, field: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(v)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("{field}: {v:?} is not a UTC time ({e})"))
}

pub(crate) fn source(v: &str) -> Result<IpNet, String> {
    parse_prefix(v).map_err(|e| format!("source: {e}"))
}

pub(crate) fn justification(v: &str) -> Result<String, String> {
    if v.chars().count() > MAX_JUSTIFICATION {
        return Err(format!("justification: longer than {MAX_JUSTIFICATION} characters"));
    }
    if v.chars().any(char::is_control) || crate::text::has_format_chars(v).is_some() {
        return Err("justification: control or format characters".into());
    }
    Ok(v.to_string())
}

pub(crate) fn nonce(v: &str) -> Result<[u8; 16], String> {
    let bad = || format!("nonce: {v:?} is not 32 lowercase hex digits");
    if !crate::text::is_lower_hex(v, 32) {
        return Err(bad());
    }
    let mut out = [0u8; 16];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&v[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE: &str = include_str!("../../tests/fixtures/knock/request");

    #[test]
    fn the_fixture_reads_and_writes_back_byte_for_byte() {
        let r = KnockRequest::parse(FIXTURE).unwrap();
        assert_eq!(r.host, "web1.example.org");
        assert_eq!(r.ports, vec![22]);
        assert_eq!(r.length, Length::Duration(3600));
        assert_eq!(r.source, None);
        assert_eq!(r.justification.as_deref(), Some("INC-1234"));
        assert_eq!(r.encode(), FIXTURE);
    }

    #[test]
    fn every_field_round_trips() {
        let r = KnockRequest {
            host: "2001:db8::1".into(),
            ports: vec![22, 3389],
            length: Length::Until("2026-11-26T14:05:00Z".parse().unwrap()),
            source: Some(parse_prefix("198.51.100.7").unwrap()),
            justification: None,
            time: "2026-11-26T13:05:00Z".parse().unwrap(),
            nonce: [0xab; 16],
        };
        assert_eq!(KnockRequest::parse(&r.encode()).unwrap(), r);
    }

    #[test]
    fn any_other_spelling_is_refused_naming_the_field() {
        let cases = [
            (FIXTURE.replace("ports 22", "ports 022"), "ports"),
            (FIXTURE.replace("ports 22", "ports 3389,22"), "ports"),
            (FIXTURE.replace("ports 22", "ports 22,22"), "ports"),
            (FIXTURE.replace("duration 3600", "duration 03600"), "duration"),
            (FIXTURE.replace("duration 3600", "duration 0"), "duration"),
            (FIXTURE.replace("13:05:00Z", "13:05:00+00:00"), "canonical"),
            (FIXTURE.replace("13:05:00Z", "13:05:00.5Z"), "canonical"),
            (FIXTURE.replace("INC-1234", "INC\u{1b}[2J"), "justification"),
            (FIXTURE.replace("INC-1234", "a\u{202e}b"), "justification"),
            (FIXTURE.replace("host web1", "host web 1"), "host"),
            (FIXTURE.replace("nonce 5f", "nonce 5F"), "nonce"),
            (
                FIXTURE.replace("\njustification", "\nsource 10.0.0.1/8\njustification"),
                "host bits",
            ),
            (
                FIXTURE.replace("\njustification", "\nsource 10.0.0.1/32\njustification"),
                "canonical",
            ),
            (FIXTURE.replace("\ntime", "\nsource 10.0.0.1\ntime"), "expected `time"),
            (FIXTURE.replace("host web1.example.org\n", ""), "host"),
            (format!("{FIXTURE}extra 1\n"), "unexpected"),
            (FIXTURE.trim_end().to_string(), "newline"),
        ];
        for (text, field) in cases {
            let e = KnockRequest::parse(&text).unwrap_err();
            assert!(e.contains(field), "{text:?}: {e}");
        }
    }
}
