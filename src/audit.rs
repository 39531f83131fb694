//! The append-only audit log: one JSON object per line in `state_dir/audit.jsonl`,
//! flushed to disk (fsync) before a decision is answered; queries and CSV export.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::config::Protocol;
use crate::grants::GrantId;

/// The audit file's name inside `state_dir`.
pub const AUDIT_FILE: &str = "audit.jsonl";

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
}

impl AuditRecord {
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
        }
    }
}

/// A failed audit write: the decision it was for must not take effect.
#[derive(Debug, thiserror::Error)]
#[error("cannot write the audit log {path}: {source}")]
pub struct AuditError {
    /// The audit file.
    pub path: PathBuf,
    /// Why.
    pub source: std::io::Error,
}

/// The open audit file; appends are whole lines, flushed to disk.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    file: File,
    len: u64,
}

impl AuditLog {
    /// Opens (creating, mode 0600) the audit log in `state_dir`. A torn last line left
    /// by a crash is closed with a newline so that the next record starts on its own line.
    pub fn open(state_dir: &Path) -> Result<AuditLog, AuditError> {
        use std::io::{Read, Seek, SeekFrom};
        use std::os::unix::fs::OpenOptionsExt;
        let path = state_dir.join(AUDIT_FILE);
        let fail = |source| AuditError {
            path: path.clone(),
            source,
        };
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .map_err(fail)?;
        let len = file.metadata().map_err(fail)?.len();
        if len > 0 {
            let mut last = [0u8; 1];
            file.seek(SeekFrom::Start(len - 1))
                .and_then(|_| file.read_exact(&mut last))
                .map_err(fail)?;
            if last[0] != b'\n' {
                tracing::warn!(
                    "{}: the last record is incomplete (torn by a crash?); it is kept and skipped when reading",
                    path.display()
                );
                file.write_all(b"\n").and_then(|_| file.sync_data()).map_err(fail)?;
            }
        }
        let len = file.metadata().map_err(fail)?.len();
        Ok(AuditLog { path, file, len })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes written so far (the offset the next record starts at).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing was ever written.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `records` as one write and waits until they are on disk.
    pub fn append(&mut self, records: &[AuditRecord]) -> Result<(), AuditError> {
        let mut buf = Vec::new();
        for record in records {
            serde_json::to_writer(&mut buf, record).expect("audit records serialize");
            buf.push(b'\n');
        }
        let fail = |source| AuditError {
            path: self.path.clone(),
            source,
        };
        self.file.write_all(&buf).map_err(fail)?;
        self.file.sync_data().map_err(fail)?;
        self.len += buf.len() as u64;
        Ok(())
    }
}

/// The records of an audit file, and a note for each line that could not be read
/// (a torn last line after a crash is reported, never fatal).
pub fn read_records(path: &Path) -> std::io::Result<(Vec<AuditRecord>, Vec<String>)> {
    let (records, problems) = read_records_at(path)?;
    Ok((records.into_iter().map(|(_, r)| r).collect(), problems))
}

/// Records with the byte offset their line starts at, and notes on unreadable lines.
pub type PlacedRecords = (Vec<(u64, AuditRecord)>, Vec<String>);

/// Like [`read_records`], each record with the byte offset its line starts at.
pub fn read_records_at(path: &Path) -> std::io::Result<PlacedRecords> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), Vec::new())),
        Err(e) => return Err(e),
    };
    let mut records = Vec::new();
    let mut problems = Vec::new();
    let mut offset = 0u64;
    for (i, line) in BufReader::new(file).split(b'\n').enumerate() {
        let line = line?;
        let at = offset;
        offset += line.len() as u64 + 1;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match serde_json::from_slice::<AuditRecord>(&line) {
            Ok(r) => records.push((at, r)),
            Err(e) => problems.push(format!("{}:{}: skipped unreadable record: {e}", path.display(), i + 1)),
        }
    }
    Ok((records, problems))
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
    }
}

/// The CSV columns, in order (the header row).
pub const CSV_HEADER: [&str; 12] = [
    "time",
    "actor_uid",
    "actor",
    "action",
    "outcome",
    "reason",
    "ports",
    "protocol",
    "source",
    "duration_secs",
    "justification",
    "grant_id",
];

/// Writes `records` as CSV with a header row; ports are space-separated.
pub fn write_csv(records: &[AuditRecord], out: impl Write) -> csv::Result<()> {
    let mut w = csv::Writer::from_writer(out);
    w.write_record(CSV_HEADER)?;
    let opt = |v: Option<String>| v.unwrap_or_default();
    for r in records {
        let ports: Vec<String> = r.ports.iter().map(u16::to_string).collect();
        w.write_record([
            r.time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            opt(r.actor_uid.map(|u| u.to_string())),
            r.actor.clone(),
            enum_text(&r.action),
            enum_text(&r.outcome),
            opt(r.reason.clone()),
            ports.join(" "),
            opt(r.protocol.map(|p| p.to_string())),
            opt(r.source.clone()),
            opt(r.duration_secs.map(|d| d.to_string())),
            opt(r.justification.clone()),
            opt(r.grant_id.map(|g| g.to_string())),
        ])?;
    }
    w.flush()?;
    Ok(())
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
        r.source = Some("203.0.113.7".into());
        r.justification = Some("ticket, \"4711\"".into());
        r.grant_id = Some(3);
        r
    }

    #[test]
    fn appended_records_read_back_and_a_torn_line_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = AuditLog::open(dir.path()).unwrap();
        log.append(&[record(1, "bob", 22), record(2, "alice", 3389)]).unwrap();
        // a crash in the middle of a write leaves half a line
        std::fs::OpenOptions::new()
            .append(true)
            .open(log.path())
            .unwrap()
            .write_all(b"{\"time\":\"2026-")
            .unwrap();
        let (records, problems) = read_records(log.path()).unwrap();
        assert_eq!(records, vec![record(1, "bob", 22), record(2, "alice", 3389)]);
        assert_eq!(problems.len(), 1);
        assert!(problems[0].contains("audit.jsonl:3: skipped"), "{problems:?}");
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

    #[test]
    fn csv_has_a_header_and_quotes_text() {
        let mut out = Vec::new();
        write_csv(&[record(1, "bob", 22)], &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let mut lines = text.lines();
        assert_eq!(lines.next().unwrap(), CSV_HEADER.join(","));
        assert_eq!(
            lines.next().unwrap(),
            r#"2026-11-25T10:01:00Z,1001,bob,request,approved,,22,,203.0.113.7,,"ticket, ""4711""",3"#
        );
    }
}
