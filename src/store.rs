//! The live grants on disk (`state_dir/grants.json`), so a restarted jitd can put them
//! back. Written atomically: temporary file, fsync, rename, fsync of the directory.
//!
//! The snapshot is a checkpoint, written at most once a second and at stop; the audit
//! log, fsync'ed before every answer, is the journal. A restart loads the snapshot and
//! replays the audit records written after the one whose hash is `audit_hash` ([`replay`]).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::grants::{Grant, GrantId};

/// The snapshot file's name inside `state_dir`.
pub const GRANTS_FILE: &str = "grants.json";

/// What is saved: the live grants and the next id to hand out.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The id the next grant gets.
    pub next_id: GrantId,
    /// The grants live at the time of writing.
    pub grants: Vec<Grant>,
    /// Hash of the last audit record the snapshot includes: later records are not in it
    /// yet. Empty before the first record.
    #[serde(default)]
    pub audit_hash: String,
    /// The lockdown the grants were enforced under (its description).
    #[serde(default)]
    pub lockdown: String,
    /// The kernel's fingerprint of that lockdown, to tell after a restart whether the
    /// table in the kernel is still exactly jitd's.
    #[serde(default)]
    pub fingerprint: Vec<String>,
}

/// The records written after the snapshot: those after the one whose hash it names
/// (all of them when it names none, or one rotated away).
pub fn journal<'r>(snapshot: &Snapshot, records: &'r [crate::audit::AuditRecord]) -> &'r [crate::audit::AuditRecord] {
    match records
        .iter()
        .rposition(|r| r.hash.as_deref() == Some(snapshot.audit_hash.as_str()))
    {
        Some(i) => &records[i + 1..],
        None => records,
    }
}

/// Brings a snapshot up to date with audit records written after it: approvals add
/// grants; expiries, replacements and revocations end them; a `failed` record undoes
/// the record of the same grant and action before it (its transaction did not take
/// effect: an approval is withdrawn, an end is taken back).
pub fn replay(snapshot: &mut Snapshot, records: &[crate::audit::AuditRecord]) {
    use crate::audit::{Action, Outcome};
    let mut ended: std::collections::HashMap<GrantId, Grant> = std::collections::HashMap::new();
    for r in records {
        let Some(id) = r.grant_id else { continue };
        snapshot.next_id = snapshot.next_id.max(id + 1);
        match (r.action, r.outcome) {
            (Action::Request, Outcome::Approved) => {
                if let Some(grant) = approved_grant(r, id) {
                    snapshot.grants.retain(|g| g.id != id);
                    snapshot.grants.push(grant);
                }
            }
            (Action::Request, Outcome::Failed) => {
                // the approval is withdrawn, and with it any end recorded for it since
                snapshot.grants.retain(|g| g.id != id);
                ended.remove(&id);
            }
            (_, Outcome::Expired | Outcome::Superseded | Outcome::Revoked) => {
                if let Some(at) = snapshot.grants.iter().position(|g| g.id == id) {
                    ended.insert(id, snapshot.grants.remove(at));
                }
            }
            (_, Outcome::Failed) => {
                if let Some(grant) = ended.remove(&id) {
                    snapshot.grants.push(grant);
                }
            }
            _ => {}
        }
    }
    snapshot.grants.sort_by_key(|g| g.id);
}

/// The grant an approval record describes, if it is complete.
fn approved_grant(r: &crate::audit::AuditRecord, id: GrantId) -> Option<Grant> {
    let source = r.source.as_deref().and_then(|s| crate::config::parse_prefix(s).ok())?;
    let secs = i64::try_from(r.duration_secs?).ok()?;
    Some(Grant {
        id,
        source,
        port: *r.ports.first()?,
        protocol: r.protocol?,
        requester: r.actor.clone(),
        requester_uid: r.actor_uid.unwrap_or(u32::MAX),
        justification: r.justification.clone(),
        granted_at: r.time,
        expires_at: r.time + chrono::Duration::try_seconds(secs)?,
    })
}

/// A failed read or write of the snapshot.
#[derive(Debug, thiserror::Error)]
#[error("{action} {path}: {source}")]
pub struct StoreError {
    action: &'static str,
    path: PathBuf,
    source: std::io::Error,
}

/// Reads the snapshot in `state_dir`; a missing file is an empty snapshot.
pub fn load(state_dir: &Path) -> Result<Snapshot, StoreError> {
    let path = state_dir.join(GRANTS_FILE);
    let fail = |source| StoreError {
        action: "cannot read",
        path: path.clone(),
        source,
    };
    match fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| fail(std::io::Error::other(e))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Snapshot::default()),
        Err(e) => Err(fail(e)),
    }
}

/// Replaces the snapshot in `state_dir` atomically: readers see the old or the new file whole.
pub fn save(state_dir: &Path, snapshot: &Snapshot) -> Result<(), StoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = state_dir.join(GRANTS_FILE);
    let tmp = state_dir.join(format!(".{GRANTS_FILE}.tmp"));
    let fail = |source| StoreError {
        action: "cannot write",
        path: path.clone(),
        source,
    };
    let bytes = serde_json::to_vec(snapshot).expect("snapshots serialize");
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(fail)?;
    file.write_all(&bytes).map_err(fail)?;
    file.sync_all().map_err(fail)?;
    drop(file);
    fs::rename(&tmp, &path).map_err(fail)?;
    File::open(state_dir).and_then(|d| d.sync_all()).map_err(fail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saved_snapshot_loads_back_and_a_missing_one_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()).unwrap(), Snapshot::default());
        let grant: Grant = serde_json::from_str(
            r#"{"id":3,"source":"192.0.2.0/24","port":22,"protocol":"tcp","requester":"bob","requester_uid":1001,
                "justification":null,"granted_at":"2026-11-25T10:00:00Z","expires_at":"2026-11-25T11:00:00Z"}"#,
        )
        .unwrap();
        let snapshot = Snapshot {
            next_id: 4,
            grants: vec![grant],
            audit_hash: "ab".repeat(32),
            lockdown: "spec".into(),
            fingerprint: vec!["obj 3".into()],
        };
        save(dir.path(), &snapshot).unwrap();
        assert_eq!(load(dir.path()).unwrap(), snapshot);
        assert!(!dir.path().join(".grants.json.tmp").exists());
    }

    #[test]
    fn replaying_the_audit_brings_a_snapshot_up_to_date() {
        use crate::audit::{Action, AuditRecord, Outcome};
        let t = |m: i64| {
            chrono::DateTime::parse_from_rfc3339("2026-11-25T10:00:00Z")
                .unwrap()
                .to_utc()
                + chrono::Duration::minutes(m)
        };
        let approved = |id: u64, source: &str, minute: i64| {
            let mut r = AuditRecord::new(t(minute), Some(1001), "bob", Action::Request, Outcome::Approved);
            r.grant_id = Some(id);
            r.source = Some(source.into());
            r.ports = vec![22];
            r.protocol = Some(crate::config::Protocol::Tcp);
            r.duration_secs = Some(3600);
            r
        };
        let ended = |id: u64, action, outcome| {
            let mut r = AuditRecord::new(t(5), None, "jitd", action, outcome);
            r.grant_id = Some(id);
            r
        };
        let mut snapshot = Snapshot::default();
        let denied = AuditRecord::new(t(0), Some(1001), "bob", Action::Request, Outcome::Denied);
        replay(
            &mut snapshot,
            &[
                approved(1, "192.0.2.1", 0),
                approved(2, "192.0.2.2", 1),
                approved(3, "192.0.2.3", 2),
                denied,
                ended(1, Action::Expire, Outcome::Expired),
                ended(2, Action::Supersede, Outcome::Superseded),
                approved(4, "192.0.2.2", 3),
                ended(3, Action::Request, Outcome::Failed),
                approved(5, "192.0.2.5", 3),
                ended(5, Action::Revoke, Outcome::Revoked),
                ended(5, Action::Revoke, Outcome::Failed), // the revocation did not happen
            ],
        );
        let ids: Vec<u64> = snapshot.grants.iter().map(|g| g.id).collect();
        assert_eq!(ids, vec![4, 5]);
        assert_eq!(snapshot.next_id, 6);
        assert_eq!(snapshot.grants[0].expires_at, t(3) + chrono::Duration::hours(1));
        assert_eq!(snapshot.grants[0].requester, "bob");
    }

    #[test]
    fn a_corrupt_snapshot_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(GRANTS_FILE), b"{\"next_id\":").unwrap();
        let err = load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("grants.json"), "{err}");
    }
}
