//! `jitctl doctor`'s output and exit status: the report as OK / WARN / FAIL lines with
//! the why and the fix, and what to say when jitd cannot be asked.
//!
//! Exit status: 0 healthy, 1 unhealthy, 2 could not tell. A jitd that is not running
//! (no socket, or a socket nobody listens on: ENOENT, ECONNREFUSED) counts as
//! **unhealthy**: on a host where jitctl is pointed at jitd's socket, jitd is meant to
//! run, and without it nobody can be granted access. "Could not tell" is for when the
//! check itself cannot be made: the socket may not be used (EACCES), jitd refused the
//! caller (no viewer role), did not answer in time, or answered nonsense.

use std::fmt::Write as _;

use crate::api::client::ClientError;
use crate::health::report::{Check, DoctorReport, HealthSummary, Status};
use crate::text::escape_for_terminal;

/// How `jitctl doctor` ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Exit 0.
    Healthy,
    /// Exit 1.
    Unhealthy,
    /// Exit 2.
    CouldNotTell,
}

impl Verdict {
    /// The exit status.
    pub fn code(self) -> u8 {
        match self {
            Verdict::Healthy => 0,
            Verdict::Unhealthy => 1,
            Verdict::CouldNotTell => 2,
        }
    }

    /// The verdict of a report.
    pub fn of(report: &DoctorReport) -> Verdict {
        if report.healthy {
            Verdict::Healthy
        } else {
            Verdict::Unhealthy
        }
    }
}

/// When jitd could not be asked: a report saying so if that means jitd is not running
/// (unhealthy), else `None` (could not tell).
pub fn not_running(error: &ClientError, socket: &std::path::Path) -> Option<DoctorReport> {
    let ClientError::Connect { source, .. } = error else {
        return None;
    };
    let why = match source.kind() {
        std::io::ErrorKind::NotFound => format!("jitd is not running (no socket at {})", socket.display()),
        std::io::ErrorKind::ConnectionRefused => {
            format!(
                "jitd is not running (nothing listens on {}: it stopped or crashed)",
                socket.display()
            )
        }
        _ => return None,
    };
    let check = Check::new("jitd", Status::Fail, why)
        .detail("the ports stay locked (its table stays in the kernel unless on_stop = \"unlock\"), but nobody can be granted access")
        .fix("start it: systemctl start jitd; see why it stopped: journalctl -u jitd");
    Some(DoctorReport::new(vec![check], Vec::new(), None, chrono::Utc::now(), 0))
}

/// The report for people: one line per check, the why, the fix and the lines to add
/// under each that is not OK; the verdict last. Every text is escaped for the terminal.
pub fn render(report: &DoctorReport) -> String {
    let mut out = String::new();
    for check in &report.checks {
        render_check(&mut out, check);
    }
    let recommended = report.checks.iter().filter(|c| c.toml.is_some()).count();
    if let Some(toml) = report
        .toml
        .as_deref()
        .filter(|_| recommended > 1 || !toml_shown(report))
    {
        out.push_str("\nEvery recommended entry together (add to jitd.toml, then `systemctl reload jitd`):\n");
        push_lines(&mut out, "  ", toml);
    }
    let verdict = HealthSummary::from(report).line();
    let shared = match report.shared_age_ms {
        Some(age) => format!("; shared with a concurrent caller, {age} ms old"),
        None => String::new(),
    };
    let _ = writeln!(
        out,
        "\n{}: {} check(s), checked {} ({} ms{shared})",
        escape_for_terminal(&verdict),
        report.checks.len(),
        report
            .checked_at
            .with_timezone(&chrono::Local)
            .format("%Y-%m-%d %H:%M:%S %Z"),
        report.took_ms
    );
    out
}

/// Whether the one recommended entry is the whole snippet (nothing to repeat).
fn toml_shown(report: &DoctorReport) -> bool {
    report
        .checks
        .iter()
        .any(|c| c.toml.as_deref() == report.toml.as_deref())
}

fn render_check(out: &mut String, c: &Check) {
    let _ = writeln!(out, "{:<5} {}", c.status.label(), escape_for_terminal(&c.summary));
    if c.status == Status::Ok {
        return;
    }
    for (label, text) in [("why", &c.detail), ("fix", &c.fix)] {
        if let Some(text) = text {
            push_lines(out, &format!("      {label}: "), text);
        }
    }
    if let Some(toml) = &c.toml {
        push_lines(out, "        ", toml);
    }
}

/// `text` line by line, each escaped: the first after `prefix`, the others indented
/// as far.
fn push_lines(out: &mut String, prefix: &str, text: &str) {
    let indent = " ".repeat(prefix.chars().count());
    for (i, line) in text.lines().enumerate() {
        let lead = if i == 0 { prefix } else { indent.as_str() };
        let _ = writeln!(out, "{lead}{}", escape_for_terminal(line));
    }
}

/// The `Health:` line of `jitctl status`.
pub fn status_line(summary: Option<&HealthSummary>) -> String {
    match summary {
        Some(s) => format!("Health: {}", s.line()),
        None => "Health: not checked yet (jitctl doctor)".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(checks: Vec<Check>, toml: Option<&str>) -> DoctorReport {
        DoctorReport::new(checks, Vec::new(), toml.map(str::to_string), chrono::Utc::now(), 12)
    }

    #[test]
    fn problems_show_why_fix_and_lines_and_text_is_escaped() {
        let mut rec = Check::new(
            "recommend.2222/tcp",
            Status::Fail,
            "SSH (sshd\u{1b}[31m) listens on 0.0.0.0:2222/tcp",
        )
        .detail("a management service\nalso: more")
        .fix("add these lines");
        rec.toml = Some("[[ports]]\nport = 2222\n".into());
        let r = report(
            vec![Check::new("jitd", Status::Ok, "jitd is running"), rec],
            Some("[[ports]]\nport = 2222\n"),
        );
        let text = render(&r);
        assert!(
            text.starts_with("OK    jitd is running\nFAIL  SSH (sshd\\u{1b}[31m) listens"),
            "{text}"
        );
        assert!(
            text.contains("      why: a management service\n           also: more\n"),
            "{text}"
        );
        assert!(
            text.contains("      fix: add these lines\n        [[ports]]\n        port = 2222\n"),
            "{text}"
        );
        assert!(
            !text.contains("Every recommended entry"),
            "one entry is not repeated: {text}"
        );
        assert!(
            text.contains("\nunhealthy: 1 problem (jitctl doctor): 2 check(s), checked "),
            "{text}"
        );
        assert_eq!(Verdict::of(&r), Verdict::Unhealthy);
    }

    #[test]
    fn a_dead_jitd_is_unhealthy_and_a_refused_socket_cannot_tell() {
        let socket = std::path::Path::new("/run/jitd/jitd.sock");
        let gone = ClientError::Connect {
            path: socket.display().to_string(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        let r = not_running(&gone, socket).unwrap();
        assert_eq!((Verdict::of(&r), r.problems), (Verdict::Unhealthy, 1));
        assert_eq!(
            r.checks[0].summary,
            "jitd is not running (no socket at /run/jitd/jitd.sock)"
        );
        let denied = ClientError::Connect {
            path: socket.display().to_string(),
            source: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        };
        assert!(not_running(&denied, socket).is_none());
        assert!(not_running(&ClientError::Io("no reply".into()), socket).is_none());
        assert_eq!(Verdict::CouldNotTell.code(), 2);
    }
}
