//! What `jitctl knock` tells its user: a JSON object for scripts, or a line for people,
//! and the sentence when the port did not open. Pure.

use std::net::SocketAddr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::net::Waited;
use super::plan::Plan;
use crate::domain::format_prefix;
use crate::remote::request::{KnockRequest, Length};

/// One knock, as it went.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// What the request calls the host.
    pub host: String,
    /// Where the knock went (`None`: not sent, `--dry-run`).
    pub knock_address: Option<String>,
    /// The ports asked for, as given (`22/tcp`, `500/udp`).
    pub ports: Vec<String>,
    /// How long was asked for, in seconds (or `until`).
    pub duration_secs: Option<u64>,
    /// Until when was asked for.
    pub until: Option<DateTime<Utc>>,
    /// The signed source; `None`: the address the packet comes from.
    pub source: Option<String>,
    /// The justification sent.
    pub justification: Option<String>,
    /// The key used: a path, or `ssh-agent: COMMENT`.
    pub key: String,
    /// The key's SHA-256 fingerprint, as the host's audit log shows it.
    pub key_fingerprint: Option<String>,
    /// The request's nonce (hex): the host's audit record of this knock carries it.
    pub nonce: String,
    /// The request's time.
    pub signed_at: DateTime<Utc>,
    /// When the packet was sent.
    pub sent_at: Option<DateTime<Utc>>,
    /// How long signing took (ssh-keygen, the agent, a security key's touch).
    pub sign_ms: u64,
    /// The packet's size.
    pub packet_bytes: usize,
    /// The signed request.
    pub request: String,
    /// The TCP port waited for (`None`: no wait).
    pub waited_for: Option<u16>,
    /// Whether it opened (`None`: not waited for).
    pub opened: Option<bool>,
    /// Milliseconds from sending to the first accepted connection.
    pub after_ms: Option<u64>,
    /// Connection attempts refused with a reset while waiting.
    pub refused_connections: u32,
}

impl Report {
    /// The report of a signed knock, before it is sent.
    pub fn new(plan: &Plan, request: &KnockRequest, key: String, fingerprint: Option<String>) -> Report {
        let (duration_secs, until) = match request.length {
            Length::Duration(s) => (Some(s), None),
            Length::Until(t) => (None, Some(t)),
        };
        Report {
            host: request.host.clone(),
            knock_address: None,
            ports: plan.ports.iter().map(ToString::to_string).collect(),
            duration_secs,
            until,
            source: request.source.as_ref().map(format_prefix),
            justification: request.justification.clone(),
            key,
            key_fingerprint: fingerprint,
            nonce: hex::encode(request.nonce),
            signed_at: request.time,
            sent_at: None,
            sign_ms: 0,
            packet_bytes: 0,
            request: request.encode(),
            waited_for: None,
            opened: None,
            after_ms: None,
            refused_connections: 0,
        }
    }

    /// Notes where and when the knock was sent.
    pub fn sent(&mut self, to: SocketAddr, at: DateTime<Utc>) {
        self.knock_address = Some(to.to_string());
        self.sent_at = Some(at);
    }

    /// Notes what waiting for `port` saw.
    pub fn waited(&mut self, port: u16, w: &Waited) {
        self.waited_for = Some(port);
        self.opened = Some(w.opened_after.is_some());
        self.after_ms = w.opened_after.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        self.refused_connections = w.refused;
    }

    fn asked(&self) -> String {
        let whom = self.source.as_deref().unwrap_or("this address");
        match (self.duration_secs, self.until) {
            (Some(s), _) => format!(
                "for {whom}, asked for {}",
                crate::duration::format(Duration::from_secs(s))
            ),
            (None, Some(t)) => format!("for {whom}, asked until {}", t.format("%Y-%m-%dT%H:%M:%SZ")),
            (None, None) => format!("for {whom}"),
        }
    }

    /// The key as people read it: its path or the agent's comment for it can hold
    /// anything (a forwarded agent's comments are someone else's text), so escaped.
    fn signed_by(&self) -> String {
        let key = crate::text::escape_for_terminal(&self.key);
        match &self.key_fingerprint {
            Some(fp) => format!("{fp} ({key})"),
            None => key.into_owned(),
        }
    }

    /// The lines for people (on stdout).
    pub fn human(&self) -> String {
        let Some(to) = &self.knock_address else {
            return format!(
                "{}packet: {} bytes, signed with {}; not sent (--dry-run)\n",
                self.request,
                self.packet_bytes,
                self.signed_by()
            );
        };
        let asked = self.asked();
        let others = |polled: &str| -> String {
            let rest: Vec<&str> = self.ports.iter().map(String::as_str).filter(|p| *p != polled).collect();
            match rest.is_empty() {
                true => String::new(),
                false => format!("; also asked: {} (not checked)", rest.join(", ")),
            }
        };
        match (self.waited_for, self.after_ms) {
            (Some(port), Some(ms)) => {
                let polled = format!("{port}/tcp");
                format!("{polled} open {asked} (after {ms} ms){}\n", others(&polled))
            }
            (Some(_), None) => String::new(), // said on stderr: see not_opened
            (None, _) if self.ports.iter().all(|p| p.ends_with("/udp")) => format!(
                "knock sent to {to}: {} {asked}; nothing to wait for (a UDP port cannot be checked from here)\n",
                self.ports.join(", ")
            ),
            (None, _) => format!(
                "knock sent to {to}: {} {asked}, signed with {}; not waiting (--no-wait)\n",
                self.ports.join(", "),
                self.signed_by()
            ),
        }
    }

    /// Why the port did not open, when it did not (`None` when it did or when jitctl
    /// did not wait): the sentence jitctl exits 1 with.
    pub fn not_opened(&self, limit: Duration) -> Option<String> {
        let port = self.waited_for?;
        if self.opened != Some(false) {
            return None;
        }
        let to = self.knock_address.as_deref().unwrap_or("?");
        let refused = match self.refused_connections {
            0 => String::new(),
            n => format!(
                " ({n} connection attempt(s) were refused: the host is reachable, but nothing listens on port {port} or something rejects)"
            ),
        };
        Some(format!(
            "knock sent to {to}; no answer is expected; port {port} did not open within {}{refused}: check the audit log on the host (jitctl audit --since 5m) or your key, {}",
            crate::duration::format(limit),
            self.signed_by()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::knock::plan::Family;
    use crate::cli::knock::ports::PortSpec;
    use crate::cli::knock::target::Host;

    fn report(ports: &[(u16, bool)], source: Option<&str>) -> Report {
        let plan = Plan {
            host: Host::Name("web1".into()),
            knock_port: 62222,
            ports: ports.iter().map(|&(port, udp)| PortSpec { port, udp }).collect(),
            length: Length::Duration(3600),
            source: source.map(|s| crate::domain::parse_prefix(s).unwrap()),
            justification: None,
            key: None,
            wait: None,
            family: Family::Any,
        };
        let request = super::super::plan::request(&plan, "2026-11-26T13:05:00Z".parse().unwrap(), [1; 16]).unwrap();
        let mut r = Report::new(&plan, &request, "/k.pub".into(), Some("SHA256:abc".into()));
        r.packet_bytes = 300;
        r
    }

    #[test]
    fn opened_says_the_port_the_source_and_the_duration_asked() {
        let mut r = report(&[(22, false), (500, true)], Some("198.51.100.7"));
        r.sent("192.0.2.7:62222".parse().unwrap(), Utc::now());
        let w = Waited {
            opened_after: Some(Duration::from_millis(41)),
            ..Waited::default()
        };
        r.waited(22, &w);
        assert_eq!(
            r.human(),
            "22/tcp open for 198.51.100.7, asked for 1h (after 41 ms); also asked: 500/udp (not checked)\n"
        );
        assert_eq!(r.not_opened(Duration::from_secs(10)), None);
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["opened"], true);
        assert_eq!(json["after_ms"], 41);
        assert_eq!(json["nonce"], "01".repeat(16));
        assert_eq!(json["knock_address"], "192.0.2.7:62222");
    }

    #[test]
    fn not_opened_says_no_answer_is_expected_and_where_to_look() {
        let mut r = report(&[(22, false)], None);
        r.sent("[2001:db8::1]:62222".parse().unwrap(), Utc::now());
        r.waited(22, &Waited::default());
        assert_eq!(r.human(), "");
        let why = r.not_opened(Duration::from_secs(10)).unwrap();
        assert_eq!(
            why,
            "knock sent to [2001:db8::1]:62222; no answer is expected; port 22 did not open within 10s: check the audit log on the host (jitctl audit --since 5m) or your key, SHA256:abc (/k.pub)"
        );
        r.refused_connections = 3;
        assert!(r
            .not_opened(Duration::from_secs(10))
            .unwrap()
            .contains("3 connection attempt(s) were refused"));
    }

    #[test]
    fn no_wait_udp_only_and_dry_run() {
        let mut r = report(&[(22, false)], None);
        assert!(r
            .human()
            .ends_with("packet: 300 bytes, signed with SHA256:abc (/k.pub); not sent (--dry-run)\n"));
        assert!(r.human().starts_with("host web1\nports 22\n"));
        r.sent("192.0.2.7:62222".parse().unwrap(), Utc::now());
        assert_eq!(
            r.human(),
            "knock sent to 192.0.2.7:62222: 22/tcp for this address, asked for 1h, signed with SHA256:abc (/k.pub); not waiting (--no-wait)\n"
        );
        let mut r = report(&[(500, true)], None);
        r.sent("192.0.2.7:62222".parse().unwrap(), Utc::now());
        assert!(r.human().contains("nothing to wait for (a UDP port"), "{}", r.human());
    }

    #[test]
    fn a_key_comment_reaches_the_terminal_escaped() {
        let mut r = report(&[(22, false)], None);
        r.key = "ssh-agent: a\u{1b}[2J\u{202e}b".into();
        r.sent("192.0.2.7:62222".parse().unwrap(), Utc::now());
        let shown = r.human();
        assert!(!shown.contains('\u{1b}') && !shown.contains('\u{202e}'), "{shown:?}");
        assert!(shown.contains(r"ssh-agent: a\u{1b}[2J\u{202e}b"), "{shown}");
        r.waited(22, &Waited::default());
        let why = r.not_opened(Duration::from_secs(1)).unwrap();
        assert!(!why.contains('\u{1b}'), "{why:?}");
    }
}
