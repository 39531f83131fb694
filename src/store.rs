//! The live grants on disk (`state_dir/grants.json`), so a restarted jitd can put them
//! back. Written atomically: temporary file, fsync, rename, fsync of the directory.

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
        };
        save(dir.path(), &snapshot).unwrap();
        assert_eq!(load(dir.path()).unwrap(), snapshot);
        assert!(!dir.path().join(".grants.json.tmp").exists());
    }

    #[test]
    fn a_corrupt_snapshot_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(GRANTS_FILE), b"{\"next_id\":").unwrap();
        let err = load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("grants.json"), "{err}");
    }
}
