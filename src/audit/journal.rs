//! What makes the audit log a journal that restarts can trust: records written together
//! are marked as one batch ([`Batch`]) so a reader applies them whole or not at all;
//! the end of the last whole batch is found after a crash ([`cut_point`]) so a torn
//! write is cut off rather than sealed; and a checkpoint names the place it covers
//! ([`Position`]) so start-up reads only the records after it ([`read_since`]).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::chain;
use super::record::{AuditRecord, Batch};

/// How much of a file's end is read at first when looking for its last whole record;
/// doubled until enough.
const WINDOW: u64 = 64 * 1024;

/// A place in the journal: the end of the record whose hash is `hash`, `offset` bytes
/// into the audit file `file` (a name inside `state_dir`). Rotation renames files, so
/// the file is a hint: every audit file is tried.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    /// The file name the record was in when the position was taken.
    pub file: String,
    /// Where the record's line ends (just after its newline).
    pub offset: u64,
    /// The record's hash ([`chain::GENESIS`] before the first record).
    pub hash: String,
}

/// What [`cut_point`] decided about the end of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// The file ends with a whole record of a whole batch.
    Keep,
    /// The whole part ends here (an offset into the bytes given); the rest is torn.
    At(usize),
    /// The bytes given start mid-line before enough was seen: read more.
    NeedMore,
}

/// Whether `line` is whole (valid JSON: a torn write never is); its batch if so. A
/// whole line jitd did not write is left for `audit verify` to report, never cut.
fn whole_record(line: &[u8]) -> Option<Option<Batch>> {
    let value: serde_json::Value = serde_json::from_slice(line).ok()?;
    Some(value.get("batch").and_then(|b| serde_json::from_value(b.clone()).ok()))
}

/// Finds where the whole records end in `tail`, the last bytes of an audit file
/// (`from_start`: the whole file). Cut are: a last line without its newline, lines at
/// the end that are not JSON (torn, or sealed with a newline by an older jitd), and the
/// records of a batch that did not finish.
pub fn cut_point(tail: &[u8], from_start: bool) -> Cut {
    let line_start = |end: usize| tail[..end].iter().rposition(|b| *b == b'\n').map(|i| i + 1);
    // the end of the last complete line
    let mut end = match tail.last() {
        None => return Cut::Keep,
        Some(b'\n') => tail.len(),
        Some(_) => match line_start(tail.len()) {
            Some(s) => s,
            None if from_start => return Cut::At(0),
            None => return Cut::NeedMore,
        },
    };
    loop {
        if end == 0 {
            return Cut::At(0);
        }
        let start = match line_start(end - 1) {
            Some(s) => s,
            None if from_start => 0,
            None => return Cut::NeedMore,
        };
        let line = &tail[start..end - 1];
        match whole_record(line) {
            _ if line.iter().all(u8::is_ascii_whitespace) => end = start,
            None => end = start,
            Some(Some(b)) if b.n < b.of => {
                // an unfinished batch: its records before this one go too
                end = start;
                for _ in 1..b.n {
                    if end == 0 {
                        break;
                    }
                    end = match line_start(end - 1) {
                        Some(s) => s,
                        None if from_start => 0,
                        None => return Cut::NeedMore,
                    };
                }
                return Cut::At(end);
            }
            Some(_) => return if end == tail.len() { Cut::Keep } else { Cut::At(end) },
        }
    }
}

/// Where the whole records of `file` (of length `len`) end, reading only its end.
pub fn whole_end(file: &File, len: u64) -> std::io::Result<u64> {
    let mut window = WINDOW;
    loop {
        let from = len.saturating_sub(window);
        let mut buf = vec![0u8; (len - from) as usize];
        file.read_exact_at(&mut buf, from)?;
        match cut_point(&buf, from == 0) {
            Cut::Keep => return Ok(len),
            Cut::At(at) => return Ok(from + at as u64),
            Cut::NeedMore => window *= 2,
        }
    }
}

/// The line ending just before `offset` in `file` (without its newline), if the byte
/// before `offset` is a newline.
fn line_before(file: &File, offset: u64) -> std::io::Result<Option<Vec<u8>>> {
    line_before_from(file, offset, WINDOW)
}

/// Like [`line_before`], reading `window` bytes at first (doubled until enough).
fn line_before_from(file: &File, offset: u64, mut window: u64) -> std::io::Result<Option<Vec<u8>>> {
    let len = file.metadata()?.len();
    if offset == 0 || offset > len {
        return Ok(None);
    }
    loop {
        let from = offset.saturating_sub(window);
        let mut buf = vec![0u8; (offset - from) as usize];
        file.read_exact_at(&mut buf, from)?;
        if buf.last() != Some(&b'\n') {
            return Ok(None);
        }
        buf.pop();
        match buf.iter().rposition(|b| *b == b'\n') {
            Some(i) => return Ok(Some(buf[i + 1..].to_vec())),
            None if from == 0 => return Ok(Some(buf)),
            None => window *= 2,
        }
    }
}

/// Whether the record ending at `pos.offset` in `file` is the one `pos` names.
fn is_at(file: &Path, pos: &Position) -> std::io::Result<bool> {
    let f = match File::open(file) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    Ok(line_before(&f, pos.offset)?.is_some_and(|l| chain::claimed_hash(&l) == Some(pos.hash.as_str())))
}

/// The audit files of a `state_dir` opened once, to read single records at positions
/// ([`Records::at`]): the named file first, then every other one (rotation renames).
pub struct Records {
    files: Vec<(String, File)>,
}

impl Records {
    /// Opens every audit file of `state_dir`.
    pub fn open(state_dir: &Path) -> std::io::Result<Records> {
        let mut files = Vec::new();
        for path in super::files(state_dir).iter().rev() {
            let name = path.file_name().unwrap_or_default().to_string_lossy().into_owned();
            files.push((name, File::open(path)?));
        }
        Ok(Records { files })
    }

    /// The record `pos` names, if it is there whole: its line ends at `pos.offset`,
    /// claims `pos.hash` and its content still matches that hash; with where it is now
    /// (the file it was found in).
    pub fn at(&self, pos: &Position) -> std::io::Result<Option<(AuditRecord, Position)>> {
        let named = self.files.iter().filter(|(n, _)| *n == pos.file);
        let others = self.files.iter().filter(|(n, _)| *n != pos.file);
        for (name, file) in named.chain(others) {
            let Some(line) = line_before_from(file, pos.offset, 1024)? else {
                continue;
            };
            if chain::claimed_hash(&line) == Some(pos.hash.as_str()) && chain::intact(&line) {
                let here = Position {
                    file: name.clone(),
                    ..pos.clone()
                };
                return Ok(serde_json::from_slice(&line).ok().map(|r| (r, here)));
            }
        }
        Ok(None)
    }
}

/// What [`read_since`] read.
#[derive(Debug, Default)]
pub struct Since {
    /// The records after the position, oldest first.
    pub records: Vec<AuditRecord>,
    /// Where each of them ends.
    pub at: Vec<Position>,
    /// Notes on lines that could not be read.
    pub problems: Vec<String>,
    /// Bytes read.
    pub bytes: u64,
}

/// The records of `state_dir`'s journal after `pos`, reading only from there on; `None`
/// when `pos` is not in the journal (a file rotated away, a hash that differs): the
/// caller then reads the whole history.
pub fn read_since(state_dir: &Path, pos: &Position) -> std::io::Result<Option<Since>> {
    let files = super::files(state_dir);
    if pos.hash == chain::GENESIS && pos.offset == 0 {
        // nothing was covered: the whole journal is the tail
        return read_from(&files, 0, 0).map(Some);
    }
    let named = state_dir.join(&pos.file);
    let mut candidates: Vec<usize> = files.iter().position(|f| *f == named).into_iter().collect();
    candidates.extend((0..files.len()).rev().filter(|i| files[*i] != named));
    for i in candidates {
        if is_at(&files[i], pos)? {
            return read_from(&files, i, pos.offset).map(Some);
        }
    }
    Ok(None)
}

/// Reads `files[first]` from `offset` on, and every file after it.
fn read_from(files: &[PathBuf], first: usize, offset: u64) -> std::io::Result<Since> {
    let mut since = Since::default();
    for (i, file) in files.iter().enumerate().skip(first) {
        let skip = if i == first { offset } else { 0 };
        let (records, problems, bytes) = super::read_positioned(file, skip)?;
        for (r, at) in records {
            since.records.push(r);
            since.at.push(at);
        }
        since.problems.extend(problems);
        since.bytes += bytes;
    }
    Ok(since)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(n: u32, batch: Option<(u32, u32)>) -> String {
        let mut r = AuditRecord::new(
            chrono::Utc::now(),
            None,
            "jitd",
            super::super::Action::Start,
            super::super::Outcome::Done,
        );
        r.batch = batch.map(|(n, of)| Batch { id: 7, n, of });
        r.reason = Some(format!("record {n}"));
        r.prev = Some(chain::GENESIS.into());
        let (l, _) = chain::seal(&serde_json::to_vec(&r).unwrap());
        String::from_utf8(l).unwrap() + "\n"
    }

    #[test]
    fn a_whole_end_is_kept() {
        let text = line(1, None) + &line(1, Some((1, 2))) + &line(2, Some((2, 2)));
        assert_eq!(cut_point(text.as_bytes(), true), Cut::Keep);
        assert_eq!(cut_point(b"", true), Cut::Keep);
    }

    #[test]
    fn a_torn_line_and_an_unfinished_batch_are_cut() {
        let good = line(1, None);
        // half a record without its newline
        let torn = good.clone() + &line(2, None)[..30];
        assert_eq!(cut_point(torn.as_bytes(), true), Cut::At(good.len()));
        // a torn record sealed with a newline by an older jitd
        let sealed = good.clone() + "{\"time\":\"20\n";
        assert_eq!(cut_point(sealed.as_bytes(), true), Cut::At(good.len()));
        // the first record of a batch of three whole, the second torn
        let batch = good.clone() + &line(1, Some((1, 3))) + &line(2, Some((2, 3)))[..40];
        assert_eq!(cut_point(batch.as_bytes(), true), Cut::At(good.len()));
        // two whole of three, nothing torn
        let batch = good.clone() + &line(1, Some((1, 3))) + &line(2, Some((2, 3)));
        assert_eq!(cut_point(batch.as_bytes(), true), Cut::At(good.len()));
        // nothing whole at all
        assert_eq!(cut_point(b"{\"ti", true), Cut::At(0));
    }

    #[test]
    fn a_window_starting_mid_line_asks_for_more_when_it_must() {
        let text = line(1, Some((1, 2))) + &line(2, Some((2, 2)));
        assert_eq!(cut_point(&text.as_bytes()[5..], false), Cut::Keep);
        let unfinished = line(1, Some((1, 2)));
        assert_eq!(cut_point(&unfinished.as_bytes()[5..], false), Cut::NeedMore);
        let torn = &line(1, None)[..50];
        assert_eq!(cut_point(&torn.as_bytes()[5..], false), Cut::NeedMore);
    }

    fn record(i: u32) -> AuditRecord {
        let mut r = AuditRecord::new(
            chrono::Utc::now(),
            Some(1001),
            "bob",
            super::super::Action::Request,
            super::super::Outcome::Approved,
        );
        r.grant_id = Some(u64::from(i));
        r
    }

    #[test]
    fn reading_since_a_position_finds_it_across_rotation_and_refuses_one_that_differs() {
        let dir = tempfile::tempdir().unwrap();
        let rotation = crate::config::Rotation {
            max_bytes: 900,
            keep: 50,
        };
        let mut log = super::super::AuditLog::open(dir.path(), rotation).unwrap();
        log.append(&[record(1), record(2)]).unwrap();
        let pos = log.position();
        for i in 3..12 {
            log.append(&[record(i)]).unwrap();
        }
        assert!(super::super::files(dir.path()).len() > 2, "rotated since the position");
        let since = read_since(dir.path(), &pos).unwrap().expect("found in a rotated file");
        let ids: Vec<u64> = since.records.iter().filter_map(|r| r.grant_id).collect();
        assert_eq!(ids, (3..12).collect::<Vec<u64>>());
        assert!(since.bytes > 0);
        // a hash that is not where the position says: the caller reads everything
        let wrong = Position {
            hash: "ab".repeat(32),
            ..pos.clone()
        };
        assert!(read_since(dir.path(), &wrong).unwrap().is_none());
        let off = Position {
            offset: pos.offset - 1,
            ..pos
        };
        assert!(read_since(dir.path(), &off).unwrap().is_none());
    }
}
