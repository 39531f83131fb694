//! Writing the audit log: sealed, hash-chained batches appended and flushed to disk
//! (fsync) before a decision is answered, a torn tail cut at open, rotation by size
//! that never deletes a file a live grant still needs, and the anchor beside it.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};

use super::journal::{self, Position};
use super::read::{files, rotated_numbers, AUDIT_FILE};
use super::record::{Action, AuditRecord, Batch, Outcome};
use super::{anchor, chain};
use crate::config::Rotation;

/// A failed audit write: the decision it was for must not take effect.
#[derive(Debug, thiserror::Error)]
#[error("cannot write the audit log {path}: {source}")]
pub struct AuditError {
    /// The audit file.
    pub path: PathBuf,
    /// Why.
    pub source: std::io::Error,
}

/// The open audit file; appends are whole sealed lines, flushed to disk.
#[derive(Debug)]
pub struct AuditLog {
    dir: PathBuf,
    path: PathBuf,
    file: File,
    len: u64,
    last_hash: String,
    /// Where the newest record ends: the file's name and the offset after its line.
    last_at: (String, u64),
    /// A failed append may have left bytes after `len` that are not yet removed.
    unclean: bool,
    rotation: Rotation,
    /// The chain's ends as last written to `audit.anchor`.
    anchor: anchor::Anchor,
    /// The newest record's position in the chain since its first record (1-based).
    seq: u64,
    /// Rotation deletes no file holding a record at or after this time (the oldest
    /// record of a live grant or waiting request, or the retention window's start).
    keep_since: Option<DateTime<Utc>>,
}

/// Opens (creating, mode 0600, never through a link) an audit file for appending.
fn open_append(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
}

/// What [`AuditLog::open`] cut from the end of the log.
struct Cut {
    bytes: u64,
    lines: usize,
    kept_in: PathBuf,
}

/// Cuts an incomplete write (a torn last line, an unfinished batch) from the end of
/// `file`, keeping the cut bytes in `audit.jsonl.torn-<time>` (synced first).
fn cut_torn_tail(state_dir: &Path, file: &File) -> std::io::Result<Option<Cut>> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let len = file.metadata()?.len();
    let end = journal::whole_end(file, len)?;
    if end == len {
        return Ok(None);
    }
    let mut torn = vec![0u8; (len - end) as usize];
    file.read_exact_at(&mut torn, end)?;
    let kept_in = state_dir.join(format!("{AUDIT_FILE}.torn-{}", Utc::now().format("%Y%m%dT%H%M%S%.6fZ")));
    let mut side = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(&kept_in)?;
    side.write_all(&torn)?;
    side.sync_all()?;
    file.set_len(end)?;
    file.sync_all()?;
    File::open(state_dir)?.sync_all()?;
    let lines = torn.split(|b| *b == b'\n').filter(|l| !l.is_empty()).count();
    Ok(Some(Cut {
        bytes: len - end,
        lines,
        kept_in,
    }))
}

/// Seals `records` after `last` as one batch starting at chain position `first_seq`:
/// the bytes to write, where each line ends in them, and the first and last hash.
fn seal_batch(records: &[AuditRecord], last: &str, first_seq: u64) -> (Vec<u8>, Vec<(usize, String)>, String, String) {
    let mut buf = Vec::new();
    let mut ends = Vec::new();
    let mut last = last.to_string();
    let mut first = None;
    let of = u32::try_from(records.len()).unwrap_or(u32::MAX);
    for (i, record) in records.iter().enumerate() {
        let mut record = record.clone();
        record.batch = (of > 1).then_some(Batch {
            id: first_seq,
            n: i as u32 + 1,
            of,
        });
        record.prev = Some(last);
        record.hash = None;
        let unsealed = serde_json::to_vec(&record).expect("audit records serialize");
        let (line, hash) = chain::seal(&unsealed);
        buf.extend_from_slice(&line);
        buf.push(b'\n');
        ends.push((buf.len(), hash.clone()));
        first.get_or_insert_with(|| hash.clone());
        last = hash;
    }
    (buf, ends, first.unwrap_or_else(|| last.clone()), last)
}

impl AuditLog {
    /// Opens (creating, mode 0600) the audit log in `state_dir`. An incomplete write left
    /// by a crash at the end (a torn last line, the records of an unfinished batch) is
    /// cut off, the cut bytes kept in `audit.jsonl.torn-<time>`, and a `recover` record
    /// says so. The anchor is read (or, for a log without one, created from the files);
    /// a log that ends before the anchored tail is noted as damage in the anchor.
    pub fn open(state_dir: &Path, rotation: Rotation) -> Result<AuditLog, AuditError> {
        let path = state_dir.join(AUDIT_FILE);
        let fail = |source| AuditError {
            path: path.clone(),
            source,
        };
        let file = open_append(&path).map_err(fail)?;
        let cut = cut_torn_tail(state_dir, &file).map_err(fail)?;
        let len = file.metadata().map_err(fail)?.len();
        // The chain goes on from the newest sealed record, in this file or a rotated one.
        let mut last = None;
        for f in files(state_dir).iter().rev() {
            if let Some((hash, end)) = chain::last_record(f).map_err(fail)? {
                let name = f.file_name().unwrap_or_default().to_string_lossy().into_owned();
                last = Some((hash, (name, end)));
                break;
            }
        }
        let (anchor, seq) = open_anchor(state_dir, last.as_ref().map(|l| l.0.as_str())).map_err(fail)?;
        let (last_hash, last_at) = last.unwrap_or_else(|| (chain::GENESIS.to_string(), (AUDIT_FILE.to_string(), 0)));
        let mut log = AuditLog {
            dir: state_dir.to_path_buf(),
            path,
            file,
            len,
            last_hash,
            last_at,
            unclean: false,
            rotation,
            anchor,
            seq,
            keep_since: None,
        };
        if let Some(cut) = cut {
            log.record_cut(&cut)?;
        }
        Ok(log)
    }

    /// Says in the log what [`cut_torn_tail`] cut.
    fn record_cut(&mut self, cut: &Cut) -> Result<(), AuditError> {
        tracing::warn!(
            "{}: the last write was incomplete (torn by a crash?): cut {} byte(s), {} line(s), kept in {}",
            self.path.display(),
            cut.bytes,
            cut.lines,
            cut.kept_in.display()
        );
        let mut r = AuditRecord::new(Utc::now(), None, "jitd", Action::Recover, Outcome::Done);
        r.reason = Some(format!(
            "cut an incomplete write from the end of {} at start ({} byte(s), {} line(s): a torn record or the records of a transaction that did not finish, never answered); the cut bytes are kept in {}",
            AUDIT_FILE,
            cut.bytes,
            cut.lines,
            cut.kept_in.file_name().unwrap_or_default().to_string_lossy()
        ));
        self.append(&[r]).map(|_| ())
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The hash of the newest record ([`chain::GENESIS`] before the first).
    pub fn last_hash(&self) -> &str {
        &self.last_hash
    }

    /// Where the newest record ends, for a checkpoint that covers everything written.
    pub fn position(&self) -> Position {
        Position {
            file: self.last_at.0.clone(),
            offset: self.last_at.1,
            hash: self.last_hash.clone(),
        }
    }

    /// Appends `records` as one write, each sealed into the hash chain and marked as one
    /// batch, and waits until they are on disk. Returns whether the file was rotated
    /// afterwards (the next record starts a new `audit.jsonl`). A failed write is cut
    /// back off the file: the log ends with the last good record, and the next append
    /// starts clean.
    pub fn append(&mut self, records: &[AuditRecord]) -> Result<bool, AuditError> {
        self.append_at(records).map(|(rotated, _)| rotated)
    }

    /// Like [`AuditLog::append`]; also returns where each record ends (in the file it is
    /// in after a rotation).
    pub fn append_at(&mut self, records: &[AuditRecord]) -> Result<(bool, Vec<Position>), AuditError> {
        let mut at = self.write_sealed(records)?;
        if self.len <= self.rotation.max_bytes {
            return Ok((false, at));
        }
        // The records are on disk and stand: a failed rotation must not undo them.
        match self.rotate() {
            Ok(()) => {
                let rotated = format!("{AUDIT_FILE}.1");
                at.iter_mut().for_each(|p| p.file = rotated.clone());
                Ok((true, at))
            }
            Err(e) => {
                tracing::error!("cannot rotate {}: {e}; writing on to it", self.path.display());
                Ok((false, at))
            }
        }
    }

    /// Truncates the file back to its last good length when a failed append may have
    /// left part of its bytes behind.
    fn clean_tail(&mut self) -> Result<(), AuditError> {
        if !self.unclean {
            return Ok(());
        }
        self.file
            .set_len(self.len)
            .and_then(|_| self.file.sync_data())
            .map_err(|source| AuditError {
                path: self.path.clone(),
                source,
            })?;
        self.unclean = false;
        Ok(())
    }

    /// Test hook (debug builds): writes the first record of `records` whole and half of
    /// the second, synced, as a crash in the middle of a batch leaves them.
    #[cfg(debug_assertions)]
    pub fn write_torn(&mut self, records: &[AuditRecord]) -> std::io::Result<()> {
        let (buf, ends, _, _) = seal_batch(records, &self.last_hash, self.seq + 1);
        let cut = match ends.as_slice() {
            [(first, _), (second, _), ..] => first + (second - first) / 2,
            _ => buf.len() / 2,
        };
        self.file.write_all(&buf[..cut])?;
        self.file.sync_data()
    }

    /// Seals `records` into the chain, writes and syncs them, then moves the anchor's
    /// tail (without fsync: a tail older than the log is fine, see [`anchor`]).
    fn write_sealed(&mut self, records: &[AuditRecord]) -> Result<Vec<Position>, AuditError> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        self.clean_tail()?;
        let (buf, ends, first, last) = seal_batch(records, &self.last_hash, self.seq + 1);
        let at: Vec<Position> = ends
            .into_iter()
            .map(|(end, hash)| Position {
                file: AUDIT_FILE.to_string(),
                offset: self.len + end as u64,
                hash,
            })
            .collect();
        let written = self.file.write_all(&buf).and_then(|_| self.file.sync_data());
        if let Err(source) = written {
            self.unclean = true;
            if let Err(e) = self.clean_tail() {
                tracing::error!("{e}; the partial write is cut before the next one");
            }
            return Err(AuditError {
                path: self.path.clone(),
                source,
            });
        }
        self.len += buf.len() as u64;
        self.last_hash = last;
        self.last_at = (AUDIT_FILE.to_string(), self.len);
        let new_head = self.anchor.head.is_none();
        if new_head {
            self.anchor.head = Some(anchor::Mark {
                hash: first,
                seq: self.seq + 1,
            });
        }
        self.seq += records.len() as u64;
        self.anchor.tail = Some(anchor::Mark {
            hash: self.last_hash.clone(),
            seq: self.seq,
        });
        // The records are on disk and stand; an anchor that lags behind is accepted
        // by verify, so a failure here is reported, not fatal.
        if let Err(e) = anchor::save(&self.dir, &self.anchor, new_head) {
            tracing::error!("cannot update {}: {e}", anchor::path(&self.dir).display());
        }
        Ok(at)
    }

    /// From the next rotation on, no file holding a record at or after `since` is
    /// deleted (`None`: rotation keeps `keep` files).
    pub fn keep_since(&mut self, since: Option<DateTime<Utc>>) {
        self.keep_since = since;
    }

    /// `audit.jsonl` becomes `audit.jsonl.1` (older ones move up, the oldest beyond
    /// `keep` are deleted, unless they hold a record [`AuditLog::keep_since`] protects:
    /// then they stay, beyond `keep`, until it no longer does) and a new `audit.jsonl`
    /// continues the chain. Before a file is deleted, the anchor's head moves past it
    /// (synced), and the new file starts with a `rotate` record stating what was
    /// removed.
    fn rotate(&mut self) -> std::io::Result<()> {
        let dir = self.dir.clone();
        let numbered = |n: usize| dir.join(format!("{AUDIT_FILE}.{n}"));
        let mut highest = rotated_numbers(&self.dir).into_iter().max().unwrap_or(0);
        let mut removed = Vec::new();
        while highest >= self.rotation.keep {
            let oldest = numbered(highest);
            let summary = chain::summarize(&oldest)?;
            if self.protects(&summary) {
                tracing::info!(
                    "audit rotation keeps {} beyond audit_keep: it holds records of a live grant or within audit_retain",
                    oldest.display()
                );
                break;
            }
            self.move_head_past(&oldest, &summary)?;
            let _ = std::fs::remove_file(&oldest);
            removed.push((oldest, summary));
            highest -= 1;
        }
        for n in (1..=highest).rev() {
            if numbered(n).exists() {
                std::fs::rename(numbered(n), numbered(n + 1))?;
            }
        }
        std::fs::rename(&self.path, numbered(1))?;
        self.last_at.0 = format!("{AUDIT_FILE}.1");
        self.file = open_append(&self.path)?;
        File::open(&self.dir)?.sync_all()?;
        self.len = 0;
        tracing::info!(
            "audit log rotated: {} is now {}",
            self.path.display(),
            numbered(1).display()
        );
        let records: Vec<AuditRecord> = removed
            .iter()
            .map(|(oldest, summary)| self.rotate_record(oldest, summary))
            .collect();
        if !records.is_empty() {
            self.write_sealed(&records).map_err(|e| e.source)?;
        }
        Ok(())
    }

    /// Whether a file summed up as `s` holds a record [`AuditLog::keep_since`] protects
    /// (a file whose newest record's time cannot be read is judged by nothing else).
    fn protects(&self, s: &chain::FileSummary) -> bool {
        let newest = s
            .last_time
            .as_deref()
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok());
        matches!((self.keep_since, newest), (Some(since), Some(t)) if t >= since)
    }

    /// Before `oldest` (summed up as `summary`) is deleted: the anchor's head moves to
    /// the first record after it and counts what goes, synced.
    fn move_head_past(&mut self, oldest: &Path, summary: &chain::FileSummary) -> std::io::Result<()> {
        let next = files(&self.dir)
            .into_iter()
            .skip_while(|f| f != oldest)
            .skip(1)
            .find_map(|f| chain::first_hash(&f).transpose())
            .transpose()?;
        let head_seq = self.anchor.head.as_ref().map_or(1, |h| h.seq);
        self.anchor.head = next.map(|hash| anchor::Mark {
            hash,
            seq: head_seq + summary.records,
        });
        self.anchor.removed_files += 1;
        self.anchor.removed_records += summary.records;
        self.anchor.removed_bytes += summary.bytes;
        anchor::save(&self.dir, &self.anchor, true)?;
        Ok(())
    }

    fn rotate_record(&self, oldest: &Path, s: &chain::FileSummary) -> AuditRecord {
        let mut r = AuditRecord::new(Utc::now(), None, "jitd", Action::Rotate, Outcome::Done);
        let text = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
        r.reason = Some(format!(
            "rotation deleted {}: {} record(s), {} bytes, from {} to {}, first hash {}, last hash {}; {} file(s), {} record(s) removed by rotation so far",
            oldest.file_name().unwrap_or_default().to_string_lossy(),
            s.records,
            s.bytes,
            text(&s.first_time),
            text(&s.last_time),
            text(&s.first_hash),
            text(&s.last_hash),
            self.anchor.removed_files,
            self.anchor.removed_records
        ));
        r
    }
}

/// Reads the anchor of `state_dir` and the newest record's position, given the log's
/// newest hash. A missing or unreadable anchor is rebuilt from the files (an unreadable
/// one is noted as damage); a log that ends before the anchored tail is noted as damage.
fn open_anchor(state_dir: &Path, last_hash: Option<&str>) -> std::io::Result<(anchor::Anchor, u64)> {
    let loaded = anchor::load(state_dir);
    let mut a = match &loaded {
        Ok(Some(a)) => a.clone(),
        _ => anchor::Anchor::default(),
    };
    if let Some(t) = a.tail.as_ref().filter(|t| Some(t.hash.as_str()) == last_hash) {
        return Ok((a.clone(), t.seq));
    }
    // The tail lags (a crash before the anchor was rewritten), is gone (records cut
    // from the end), or there is no anchor: count.
    let head = a.head.as_ref().map(|h| h.hash.clone());
    let tail = a.tail.as_ref().map(|t| t.hash.clone());
    let (total, found) = chain::positions(&files(state_dir), &[head.as_deref(), tail.as_deref()])?;
    let seq = match (&a.head, found[0]) {
        (Some(h), Some(at)) => h.seq - 1 + (total - at + 1),
        _ => a.removed_records + total,
    };
    if let (Some(t), None) = (&a.tail, found[1]) {
        a.note_damage(format!(
            "at {} the log ended at record #{seq} but the anchor's newest record was {} (#{}): records were cut from the end while jitd was not running",
            Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            t.hash,
            t.seq
        ));
        tracing::error!(
            "{}: {}",
            anchor::path(state_dir).display(),
            a.damage.last().expect("noted")
        );
    }
    match loaded {
        Err(e) => {
            tracing::error!("{e}; a new anchor is made from the audit files");
            a.note_damage(format!("the anchor could not be read and was rebuilt: {e}"));
        }
        Ok(None) if total > 0 => {
            tracing::warn!("the audit log has no anchor yet; one is made from the audit files");
        }
        _ => {}
    }
    if a.head.is_none() {
        a.head = chain::first_hash_of(&files(state_dir))?.map(|hash| anchor::Mark {
            hash,
            seq: a.removed_records + 1,
        });
    }
    a.tail = last_hash.map(|h| anchor::Mark {
        hash: h.to_string(),
        seq,
    });
    anchor::save(state_dir, &a, true)?;
    Ok((a, seq))
}

#[cfg(test)]
mod tests {
    use super::super::read::{read_all, read_records};
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
    fn appended_records_read_back_as_one_batch_and_a_torn_line_is_cut_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = AuditLog::open(dir.path(), Rotation::default()).unwrap();
        log.append(&[record(1, "bob", 22), record(2, "alice", 3389)]).unwrap();
        let whole = std::fs::read(log.path()).unwrap();
        // a crash in the middle of a write leaves half a line
        std::fs::OpenOptions::new()
            .append(true)
            .open(log.path())
            .unwrap()
            .write_all(b"{\"time\":\"2026-")
            .unwrap();
        let (records, problems) = read_records(log.path()).unwrap();
        assert_eq!(records[1].prev, records[0].hash, "chained");
        assert_eq!(
            records.iter().map(|r| r.batch).collect::<Vec<_>>(),
            vec![Some(Batch { id: 1, n: 1, of: 2 }), Some(Batch { id: 1, n: 2, of: 2 })]
        );
        let unsealed: Vec<AuditRecord> = records
            .into_iter()
            .map(|r| AuditRecord {
                prev: None,
                hash: None,
                batch: None,
                ..r
            })
            .collect();
        assert_eq!(unsealed, vec![record(1, "bob", 22), record(2, "alice", 3389)]);
        assert_eq!(problems.len(), 1);
        assert!(problems[0].contains("audit.jsonl:3: skipped"), "{problems:?}");
        // reopened after the crash: the torn bytes are cut (kept aside), a record says
        // so, and the chain goes on
        let mut log = AuditLog::open(dir.path(), Rotation::default()).unwrap();
        assert!(std::fs::read(log.path()).unwrap().starts_with(&whole));
        let kept: Vec<PathBuf> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().contains("audit.jsonl.torn-"))
            .collect();
        assert_eq!(kept.len(), 1);
        assert_eq!(std::fs::read(&kept[0]).unwrap(), b"{\"time\":\"2026-");
        log.append(&[record(3, "carol", 22)]).unwrap();
        let (records, problems) = read_records(log.path()).unwrap();
        assert_eq!(problems, Vec::<String>::new());
        assert_eq!(records.len(), 4);
        assert_eq!(records[2].action, Action::Recover);
        assert!(
            records[2].reason.as_deref().unwrap().contains("14 byte(s)"),
            "{:?}",
            records[2]
        );
        assert_eq!(records[3].prev, records[2].hash);
        assert_eq!(chain::verify_dir(dir.path()).unwrap().broken, None);
    }

    #[test]
    fn an_unfinished_batch_is_cut_whole_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = AuditLog::open(dir.path(), Rotation::default()).unwrap();
        log.append(&[record(1, "bob", 22)]).unwrap();
        let whole = std::fs::read(log.path()).unwrap();
        log.write_torn(&[record(2, "bob", 22), record(3, "alice", 22), record(4, "carol", 22)])
            .unwrap();
        drop(log);
        let log = AuditLog::open(dir.path(), Rotation::default()).unwrap();
        let (records, problems) = read_records(log.path()).unwrap();
        assert!(problems.is_empty(), "{problems:?}");
        assert!(std::fs::read(log.path()).unwrap().starts_with(&whole));
        let actions: Vec<Action> = records.iter().map(|r| r.action).collect();
        assert_eq!(actions, vec![Action::Request, Action::Recover]);
        assert!(records[1].reason.as_deref().unwrap().contains("2 line(s)"));
        assert_eq!(chain::verify_dir(dir.path()).unwrap().broken, None);
    }

    #[test]
    fn a_failed_append_is_cut_back_and_the_next_one_is_clean() {
        // /dev/full fails every write with ENOSPC, as a full disk does
        let dir = tempfile::tempdir().unwrap();
        let mut log = AuditLog::open(dir.path(), Rotation::default()).unwrap();
        log.append(&[record(1, "bob", 22)]).unwrap();
        let good = log.last_hash().to_string();
        let len = log.len;
        // a write that got half its bytes out, then failed (and so did cutting them
        // back: /dev/full cannot be truncated); the next append cuts them first
        log.file.write_all(b"{\"time\":\"half").unwrap();
        let real = std::mem::replace(&mut log.file, File::options().write(true).open("/dev/full").unwrap());
        let err = log.append(&[record(2, "bob", 22)]).unwrap_err();
        assert_eq!(err.source.raw_os_error(), Some(nix::libc::ENOSPC), "{err}");
        assert_eq!(log.last_hash(), good, "the chain head stays at the last good record");
        log.file = real;
        log.append(&[record(3, "bob", 22)]).unwrap();
        let (records, problems) = read_records(log.path()).unwrap();
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(records.len(), 2);
        assert_eq!(records[1].prev.as_deref(), Some(good.as_str()));
        assert!(log.len > len);
        assert_eq!(chain::verify_dir(dir.path()).unwrap().broken, None);
    }

    #[test]
    fn rotation_moves_files_up_keeps_n_and_continues_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = AuditLog::open(
            dir.path(),
            Rotation {
                max_bytes: 600,
                keep: 2,
            },
        )
        .unwrap();
        let mut rotations = 0;
        for i in 0..12 {
            rotations += usize::from(log.append(&[record(i, "bob", 22)]).unwrap());
        }
        assert!(rotations >= 3, "{rotations}");
        let names: Vec<String> = files(dir.path())
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["audit.jsonl.2", "audit.jsonl.1", "audit.jsonl"]);
        let verdict = chain::verify(&files(dir.path())).unwrap();
        assert_eq!(verdict.broken, None);
        assert_eq!(
            verdict.notes.len(),
            1,
            "the start was rotated away: {:?}",
            verdict.notes
        );
    }

    #[test]
    fn rotation_keeps_files_holding_protected_records_beyond_keep() {
        let dir = tempfile::tempdir().unwrap();
        let rotation = Rotation {
            max_bytes: 600,
            keep: 2,
        };
        let mut log = AuditLog::open(dir.path(), rotation).unwrap();
        // everything from minute 0 on is protected (a live grant approved then)
        log.keep_since(Some(record(0, "bob", 22).time));
        for i in 0..12 {
            log.append(&[record(i, "bob", 22)]).unwrap();
        }
        let (all, _) = read_all(dir.path()).unwrap();
        assert_eq!(all.iter().filter(|r| r.action == Action::Request).count(), 12);
        assert!(all.iter().all(|r| r.action != Action::Rotate), "nothing was deleted");
        assert!(files(dir.path()).len() > 3, "files beyond keep");
        // once nothing is protected, the next rotation deletes down to keep, oldest first
        log.keep_since(None);
        for i in 12..16 {
            log.append(&[record(i, "bob", 22)]).unwrap();
        }
        assert_eq!(files(dir.path()).len(), 3);
        let verdict = chain::verify(&files(dir.path())).unwrap();
        assert_eq!(verdict.broken, None, "{:?}", verdict.notes);
        let (all, _) = read_all(dir.path()).unwrap();
        assert!(all.iter().any(|r| r.action == Action::Rotate));
    }

    fn rotated_log(dir: &Path) -> AuditLog {
        let mut log = AuditLog::open(
            dir,
            Rotation {
                max_bytes: 600,
                keep: 2,
            },
        )
        .unwrap();
        for i in 0..12 {
            log.append(&[record(i, "bob", 22)]).unwrap();
        }
        log
    }

    fn problem(dir: &Path) -> String {
        chain::verify_dir(dir)
            .unwrap()
            .broken
            .map(|b| b.problem)
            .unwrap_or_default()
    }

    #[test]
    fn rotation_states_what_it_deleted_and_the_anchor_verifies() {
        let dir = tempfile::tempdir().unwrap();
        rotated_log(dir.path());
        let (records, _) = read_all(dir.path()).unwrap();
        let rotations: Vec<&AuditRecord> = records.iter().filter(|r| r.action == Action::Rotate).collect();
        assert!(!rotations.is_empty());
        let reason = rotations[0].reason.as_deref().unwrap();
        assert!(
            reason.starts_with("rotation deleted audit.jsonl.2: ") && reason.contains("first hash "),
            "{reason}"
        );
        let v = chain::verify_dir(dir.path()).unwrap();
        assert_eq!(v.broken, None, "{v:?}");
        assert!(
            v.notes.iter().any(|n| n.starts_with("rotation removed ")),
            "{:?}",
            v.notes
        );
        let a = anchor::load(dir.path()).unwrap().unwrap();
        assert_eq!(a.tail.unwrap().seq, a.removed_records + records.len() as u64);
    }

    #[test]
    fn verify_finds_records_cut_from_the_start() {
        let dir = tempfile::tempdir().unwrap();
        rotated_log(dir.path());
        std::fs::remove_file(dir.path().join("audit.jsonl.2")).unwrap();
        assert!(
            problem(dir.path()).contains("cut from the start"),
            "{}",
            problem(dir.path())
        );
        // the first line of the oldest file removed
        let dir = tempfile::tempdir().unwrap();
        rotated_log(dir.path());
        let oldest = dir.path().join("audit.jsonl.2");
        let text = std::fs::read_to_string(&oldest).unwrap();
        std::fs::write(&oldest, text.split_once('\n').unwrap().1).unwrap();
        assert!(
            problem(dir.path()).contains("cut from the start"),
            "{}",
            problem(dir.path())
        );
    }

    #[test]
    fn verify_finds_records_cut_from_the_end_even_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let log = rotated_log(dir.path());
        drop(log);
        let text = std::fs::read_to_string(dir.path().join(AUDIT_FILE)).unwrap();
        let mut lines: Vec<&str> = text.lines().collect();
        lines.pop();
        std::fs::write(dir.path().join(AUDIT_FILE), lines.join("\n") + "\n").unwrap();
        assert!(
            problem(dir.path()).contains("cut from the end"),
            "{}",
            problem(dir.path())
        );
        // jitd restarts on the cut log and writes on: the damage stays on record
        let mut log = AuditLog::open(dir.path(), Rotation::default()).unwrap();
        log.append(&[record(30, "bob", 22)]).unwrap();
        assert!(
            problem(dir.path()).contains("cut from the end while jitd was not running"),
            "{}",
            problem(dir.path())
        );
    }

    #[test]
    fn a_tail_older_than_the_log_is_fine_and_a_missing_anchor_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = AuditLog::open(dir.path(), Rotation::default()).unwrap();
        log.append(&[record(1, "bob", 22)]).unwrap();
        let lagging = std::fs::read(anchor::path(dir.path())).unwrap();
        log.append(&[record(2, "bob", 22), record(3, "bob", 22)]).unwrap();
        std::fs::write(anchor::path(dir.path()), &lagging).unwrap();
        assert_eq!(chain::verify_dir(dir.path()).unwrap().broken, None);
        // reopened after such a crash, the count is right again
        drop(log);
        let mut log = AuditLog::open(dir.path(), Rotation::default()).unwrap();
        log.append(&[record(4, "bob", 22)]).unwrap();
        assert_eq!(anchor::load(dir.path()).unwrap().unwrap().tail.unwrap().seq, 4);
        assert_eq!(chain::verify_dir(dir.path()).unwrap().broken, None);
        std::fs::remove_file(anchor::path(dir.path())).unwrap();
        assert!(problem(dir.path()).contains("is missing"), "{}", problem(dir.path()));
        // an old log without an anchor gets one when jitd opens it
        drop(log);
        AuditLog::open(dir.path(), Rotation::default()).unwrap();
        assert_eq!(chain::verify_dir(dir.path()).unwrap().broken, None);
    }

    /// What the anchor costs per append: `cargo test --release --lib anchor_cost -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn anchor_cost() {
        let dir = tempfile::tempdir_in(std::env::current_dir().unwrap()).unwrap();
        let mut log = AuditLog::open(dir.path(), Rotation::default()).unwrap();
        let n = 2000;
        let start = std::time::Instant::now();
        for i in 0..n {
            log.append(&[record(i % 60, "bob", 22)]).unwrap();
        }
        let append = start.elapsed() / n;
        let start = std::time::Instant::now();
        for _ in 0..n {
            anchor::save(dir.path(), &log.anchor, false).unwrap();
        }
        let save = start.elapsed() / n;
        let start = std::time::Instant::now();
        for _ in 0..200 {
            anchor::save(dir.path(), &log.anchor, true).unwrap();
        }
        let durable = start.elapsed() / 200;
        println!("append with anchor {append:?}; of it anchor save {save:?}; a synced anchor save {durable:?}");
    }
}
