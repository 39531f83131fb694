//! The audit trail's anchor, `state_dir/audit.anchor`: the chain's head and tail kept
//! outside the rotated files, so that records cut from the start (a deleted or truncated
//! oldest file) or from the end are found by `jitctl audit verify`, not only edits.
//!
//! The head (the oldest record kept) moves only when rotation deletes a file, and is
//! then written with fsync before the file goes. The tail (the newest record and how
//! many records the chain has had) is rewritten after every append without fsync: a
//! crash can leave it older than the log, which verify accepts; a tail that is not in
//! the log at all means records were cut from the end.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The anchor file's name inside `state_dir`.
pub const ANCHOR_FILE: &str = "audit.anchor";
/// The most damage notes an anchor keeps.
const MAX_DAMAGE: usize = 16;

/// A record of the chain, named by its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mark {
    /// The record's hash.
    pub hash: String,
    /// Its position in the chain since the first record ever written (1-based).
    pub seq: u64,
}

/// What jitd knows about its chain's ends, kept outside the audit files.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Anchor {
    /// The oldest record kept (the first of the oldest file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<Mark>,
    /// The newest record when the anchor was last written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tail: Option<Mark>,
    /// Files deleted by rotation so far.
    #[serde(default)]
    pub removed_files: u64,
    /// Records in them.
    #[serde(default)]
    pub removed_records: u64,
    /// Bytes in them.
    #[serde(default)]
    pub removed_bytes: u64,
    /// Damage jitd found when it opened the log (records cut from the end while it was
    /// not running); verify reports the trail broken while any is listed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub damage: Vec<String>,
}

impl Anchor {
    /// Notes damage found at start-up (bounded: the oldest notes are kept).
    pub fn note_damage(&mut self, note: String) {
        if self.damage.len() < MAX_DAMAGE {
            self.damage.push(note);
        }
    }
}

/// The anchor's path in `state_dir`.
pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(ANCHOR_FILE)
}

/// Reads the anchor of `state_dir`; `None` when there is none. An unreadable anchor is
/// an error naming the file.
pub fn load(state_dir: &Path) -> std::io::Result<Option<Anchor>> {
    let path = path(state_dir);
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    serde_json::from_slice(&text).map(Some).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{}: not a valid anchor: {e}", path.display()),
        )
    })
}

/// Replaces the anchor atomically: a new temporary file (O_EXCL, O_NOFOLLOW, 0600)
/// renamed over the old one; with `durable`, the file and the directory are synced.
pub fn save(state_dir: &Path, anchor: &Anchor, durable: bool) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = state_dir.join(format!("{ANCHOR_FILE}.tmp"));
    // a leftover from a crash (or a planted link: unlinking it never follows it)
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(&tmp)?;
    let mut text = serde_json::to_vec(anchor).expect("anchors serialize");
    text.push(b'\n');
    file.write_all(&text)?;
    if durable {
        file.sync_all()?;
    }
    std::fs::rename(&tmp, path(state_dir))?;
    if durable {
        std::fs::File::open(state_dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_and_loads_and_refuses_garbage() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()).unwrap(), None);
        let mut a = Anchor {
            head: Some(Mark {
                hash: "ab".into(),
                seq: 1,
            }),
            ..Default::default()
        };
        a.note_damage("cut".into());
        save(dir.path(), &a, true).unwrap();
        save(dir.path(), &a, false).unwrap();
        assert_eq!(load(dir.path()).unwrap(), Some(a));
        std::fs::write(path(dir.path()), "{").unwrap();
        let e = load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("audit.anchor: not a valid anchor"), "{e}");
    }

    #[test]
    fn a_planted_temporary_link_is_replaced_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "keep").unwrap();
        std::os::unix::fs::symlink(&victim, dir.path().join("audit.anchor.tmp")).unwrap();
        save(dir.path(), &Anchor::default(), false).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
        assert!(load(dir.path()).unwrap().is_some());
    }
}
