//! What `doctor` answers: checks, each OK, WARN or FAIL with the why and the fix, and
//! the verdict (healthy when nothing FAILs). The same types travel over the socket
//! (`{"op":"doctor"}`) and are printed by `jitctl doctor`.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::health::listeners::Listener;

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// As it should be.
    Ok,
    /// Worth a look; the host is still healthy.
    Warn,
    /// A problem: the host is unhealthy.
    Fail,
}

impl Status {
    /// `OK`, `WARN`, `FAIL`.
    pub fn label(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        }
    }
}

/// One check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    /// Stable name for scripts: `jitd`, `table`, `drift`, `audit.write`, `audit.chain`,
    /// `port.22/tcp.listening`, `port.22/tcp.reachable`, `recommend.2222/tcp`, ...
    pub id: String,
    /// OK, WARN or FAIL.
    pub status: Status,
    /// One line saying what was found.
    pub summary: String,
    /// Why it matters, or the evidence (which table, chain and rule).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// What to do about it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
    /// Lines to add to jitd.toml.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub toml: Option<String>,
}

impl Check {
    /// A check with only a summary.
    pub fn new(id: impl Into<String>, status: Status, summary: impl Into<String>) -> Check {
        Check {
            id: id.into(),
            status,
            summary: summary.into(),
            detail: None,
            fix: None,
            toml: None,
        }
    }

    /// With the why.
    pub fn detail(mut self, detail: impl Into<String>) -> Check {
        self.detail = Some(detail.into());
        self
    }

    /// With the fix.
    pub fn fix(mut self, fix: impl Into<String>) -> Check {
        self.fix = Some(fix.into());
        self
    }
}

/// The doctor's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DoctorReport {
    /// No check failed.
    pub healthy: bool,
    /// Checks that failed.
    pub problems: usize,
    /// Checks that warn.
    pub warnings: usize,
    /// When jitd ran the checks.
    pub checked_at: DateTime<Utc>,
    /// How long the run took, in milliseconds.
    pub took_ms: u64,
    /// Set when this caller got the result of a run another caller started while it
    /// waited (runs never overlap): how old the result was when handed over, in ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_age_ms: Option<u64>,
    /// Every check, in a stable order.
    pub checks: Vec<Check>,
    /// The listening sockets reachable from outside the host (loopback ones left out).
    pub listeners: Vec<Listener>,
    /// Every recommended `[[ports]]` entry together, ready to paste into jitd.toml.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub toml: Option<String>,
}

impl DoctorReport {
    /// The report of `checks`, counting problems and warnings.
    pub fn new(
        checks: Vec<Check>,
        listeners: Vec<Listener>,
        toml: Option<String>,
        checked_at: DateTime<Utc>,
        took_ms: u64,
    ) -> DoctorReport {
        let problems = checks.iter().filter(|c| c.status == Status::Fail).count();
        let warnings = checks.iter().filter(|c| c.status == Status::Warn).count();
        DoctorReport {
            healthy: problems == 0,
            problems,
            warnings,
            checked_at,
            took_ms,
            shared_age_ms: None,
            checks,
            listeners,
            toml,
        }
    }
}

/// The verdict in short, as `jitctl status` and the metrics show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthSummary {
    /// No check failed.
    pub healthy: bool,
    /// Checks that failed.
    pub problems: usize,
    /// Checks that warn.
    pub warnings: usize,
    /// When the checks ran.
    pub checked_at: DateTime<Utc>,
}

impl From<&DoctorReport> for HealthSummary {
    fn from(r: &DoctorReport) -> HealthSummary {
        HealthSummary {
            healthy: r.healthy,
            problems: r.problems,
            warnings: r.warnings,
            checked_at: r.checked_at,
        }
    }
}

impl HealthSummary {
    /// `healthy`, `healthy (1 warning)`, `unhealthy: 2 problems (jitctl doctor)`.
    pub fn line(&self) -> String {
        let plural = |n: usize, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
        if self.healthy && self.warnings == 0 {
            "healthy".into()
        } else if self.healthy {
            format!("healthy ({}; jitctl doctor)", plural(self.warnings, "warning"))
        } else {
            format!("unhealthy: {} (jitctl doctor)", plural(self.problems, "problem"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_verdict_counts_failures_only() {
        let at = Utc::now();
        let warn = DoctorReport::new(
            vec![Check::new("a", Status::Ok, "x"), Check::new("b", Status::Warn, "y")],
            vec![],
            None,
            at,
            1,
        );
        assert!(warn.healthy);
        assert_eq!(HealthSummary::from(&warn).line(), "healthy (1 warning; jitctl doctor)");
        let fail = DoctorReport::new(
            vec![Check::new("a", Status::Fail, "x"), Check::new("b", Status::Fail, "y")],
            vec![],
            None,
            at,
            1,
        );
        assert!(!fail.healthy);
        assert_eq!(
            HealthSummary::from(&fail).line(),
            "unhealthy: 2 problems (jitctl doctor)"
        );
        let ok = DoctorReport::new(vec![Check::new("a", Status::Ok, "x")], vec![], None, at, 1);
        assert_eq!(HealthSummary::from(&ok).line(), "healthy");
        let text = serde_json::to_string(&fail.checks[0]).unwrap();
        assert_eq!(text, r#"{"id":"a","status":"fail","summary":"x"}"#);
    }
}
