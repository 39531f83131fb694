//! The audit log's hash chain: every record carries the SHA-256 of the record before it
//! (`prev`) and its own (`hash`, the last field, over everything before it), so editing,
//! removing or reordering a record breaks the chain where it happened.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// The `prev` of the very first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
const HASH_FIELD: &[u8] = b",\"hash\":\"";

/// Seals a record serialized without its hash (a JSON object ending in `}`): returns
/// the line to write (no newline) and the record's hash.
pub fn seal(unsealed: &[u8]) -> (Vec<u8>, String) {
    let hash = hex::encode(Sha256::digest(unsealed));
    let mut line = unsealed[..unsealed.len() - 1].to_vec();
    line.extend_from_slice(HASH_FIELD);
    line.extend_from_slice(hash.as_bytes());
    line.extend_from_slice(b"\"}");
    (line, hash)
}

/// The hash a sealed line claims, if it has one.
pub fn claimed_hash(line: &[u8]) -> Option<&str> {
    let at = rfind(line, HASH_FIELD)?;
    let rest = &line[at + HASH_FIELD.len()..];
    let hash = rest.strip_suffix(b"\"}")?;
    std::str::from_utf8(hash).ok().filter(|h| h.len() == 64)
}

/// Whether a sealed line's content still matches its hash.
pub fn intact(line: &[u8]) -> bool {
    let (Some(at), Some(claimed)) = (rfind(line, HASH_FIELD), claimed_hash(line)) else {
        return false;
    };
    let mut unsealed = line[..at].to_vec();
    unsealed.push(b'}');
    hex::encode(Sha256::digest(&unsealed)) == claimed
}

fn rfind(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).rposition(|w| w == needle)
}

/// Where and how the chain is broken.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Break {
    /// The file holding the first bad record.
    pub file: PathBuf,
    /// Its line number (1-based).
    pub line: usize,
    /// What is wrong with it.
    pub problem: String,
}

/// The outcome of walking the chain.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Verdict {
    /// Records that verified.
    pub records: usize,
    /// The first break, if any.
    pub broken: Option<Break>,
    /// Things worth knowing that are not tampering (a torn last line after a crash, a
    /// chain whose start was rotated away).
    pub notes: Vec<String>,
}

/// Walks `files` (oldest first) and checks every record's own hash and its link to the
/// record before it. Records cut from the start or the end go unnoticed here; see
/// [`verify_dir`], which also checks the anchor.
pub fn verify(files: &[PathBuf]) -> std::io::Result<Verdict> {
    let mut verdict = Verdict {
        records: 0,
        broken: None,
        notes: Vec::new(),
    };
    walk(files, &mut verdict, |_, _, _| {})?;
    Ok(verdict)
}

/// Walks the audit files of `state_dir` like [`verify`] and checks them against the
/// anchor ([`super::anchor`]): the anchored head (the oldest record kept) and tail (the
/// newest record when the anchor was written) must both be in the chain, in the right
/// distance from each other.
///
/// jitd keeps writing (and rotating, which renames every file and rewrites the anchor)
/// while this reads; a break found while the files changed under the reading is read
/// again, so a rotation is never reported as tampering.
pub fn verify_dir(state_dir: &Path) -> std::io::Result<Verdict> {
    let mut attempts = 0;
    loop {
        let before = identities(state_dir);
        let verdict = verify_dir_once(state_dir)?;
        attempts += 1;
        if verdict.broken.is_none() || attempts == 10 || identities(state_dir) == before {
            return Ok(verdict);
        }
    }
}

/// Which file each audit file name (and the anchor) is, and how long: changes when
/// jitd rotates or appends.
fn identities(state_dir: &Path) -> Vec<(PathBuf, u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let mut paths = super::files(state_dir);
    paths.push(super::anchor::path(state_dir));
    paths
        .into_iter()
        .map(|p| {
            let (ino, len) = std::fs::metadata(&p).map_or((0, 0), |m| (m.ino(), m.len()));
            (p, ino, len)
        })
        .collect()
}

fn verify_dir_once(state_dir: &Path) -> std::io::Result<Verdict> {
    let files = super::files(state_dir);
    let anchor_path = super::anchor::path(state_dir);
    let mut verdict = Verdict {
        records: 0,
        broken: None,
        notes: Vec::new(),
    };
    let anchor = match super::anchor::load(state_dir) {
        Ok(a) => a,
        Err(e) => {
            verdict.broken = Some(anchor_break(&anchor_path, format!("cannot be read: {e}")));
            return Ok(verdict);
        }
    };
    let mut head_at: Option<u64> = None;
    let mut tail_at: Option<u64> = None;
    let mut last: Option<(PathBuf, usize)> = None;
    let mut n = 0u64;
    walk(&files, &mut verdict, |hash, file, line| {
        n += 1;
        if anchor
            .as_ref()
            .and_then(|a| a.head.as_ref())
            .is_some_and(|h| h.hash == hash)
        {
            head_at = Some(n);
        }
        if anchor
            .as_ref()
            .and_then(|a| a.tail.as_ref())
            .is_some_and(|t| t.hash == hash)
        {
            tail_at = Some(n);
        }
        last = Some((file.to_path_buf(), line));
    })?;
    if verdict.broken.is_some() {
        return Ok(verdict);
    }
    let Some(anchor) = anchor else {
        if verdict.records > 0 {
            verdict.broken = Some(anchor_break(
                &anchor_path,
                "is missing: records cut from the start or the end cannot be ruled out".into(),
            ));
        }
        return Ok(verdict);
    };
    verdict.broken = check_anchor(&anchor, head_at, tail_at, &files, last).map(|p| anchor_break(&anchor_path, p));
    if anchor.removed_files > 0 {
        verdict.notes.push(format!(
            "rotation removed {} file(s) with {} record(s) ({} bytes) so far; each removal is stated in a `rotate` record",
            anchor.removed_files, anchor.removed_records, anchor.removed_bytes
        ));
    }
    Ok(verdict)
}

/// What is wrong with the chain's ends given where (1-based, counted from the first
/// record found) the anchored head and tail were seen.
fn check_anchor(
    anchor: &super::anchor::Anchor,
    head_at: Option<u64>,
    tail_at: Option<u64>,
    files: &[PathBuf],
    last: Option<(PathBuf, usize)>,
) -> Option<String> {
    if let Some(d) = anchor.damage.first() {
        return Some(format!("records damage found by jitd when it opened the log: {d}"));
    }
    let start = files
        .first()
        .map_or("no audit file".to_string(), |f| format!("{}:1", f.display()));
    let end = last.map_or("no record".to_string(), |(f, l)| format!("{}:{l}", f.display()));
    if let (Some(h), None) = (&anchor.head, head_at) {
        return Some(format!(
            "says the oldest record kept is {} (record #{}), which is not in the log: records were cut from the start (the log now starts at {start})",
            h.hash, h.seq
        ));
    }
    match (&anchor.tail, tail_at) {
        (Some(t), None) => Some(format!(
            "says the newest record is {} (record #{}), which is not in the log: records were cut from the end (the log now ends at {end})",
            t.hash, t.seq
        )),
        (Some(t), Some(at)) => {
            let head_seq = anchor.head.as_ref().map_or(1, |h| h.seq);
            let head_at = head_at.unwrap_or(1);
            (at >= head_at && t.seq - head_seq != at - head_at).then(|| {
                format!(
                    "counts {} record(s) from the oldest kept to the newest anchored one, the log has {}: records were removed",
                    t.seq - head_seq + 1,
                    at - head_at + 1
                )
            })
        }
        (None, _) => None,
    }
}

fn anchor_break(anchor: &Path, problem: String) -> Break {
    Break {
        file: anchor.to_path_buf(),
        line: 0,
        problem,
    }
}

/// Walks the records of `files`, filling `verdict` (stopping at the first break) and
/// calling `seen(hash, file, line)` for every record that verified.
fn walk(files: &[PathBuf], verdict: &mut Verdict, mut seen: impl FnMut(&str, &Path, usize)) -> std::io::Result<()> {
    let mut prev: Option<String> = None;
    for file in files {
        let reader = match std::fs::File::open(file) {
            Ok(f) => BufReader::new(f),
            // rotated away between listing and reading
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for (i, line) in reader.split(b'\n').enumerate() {
            let line = line?;
            match check_line(&line, prev.as_deref()) {
                Line::Blank => {}
                Line::Torn => verdict.notes.push(format!(
                    "{}:{}: incomplete record (a crash while writing?); not part of the chain",
                    file.display(),
                    i + 1
                )),
                Line::Bad(problem) => {
                    verdict.broken = Some(Break {
                        file: file.clone(),
                        line: i + 1,
                        problem: problem.into(),
                    });
                    return Ok(());
                }
                Line::Good { hash, starts_late } => {
                    if starts_late {
                        verdict.notes.push(format!(
                            "the chain starts at {}:{} (older records were rotated away)",
                            file.display(),
                            i + 1
                        ));
                    }
                    seen(&hash, file, i + 1);
                    prev = Some(hash);
                    verdict.records += 1;
                }
            }
        }
    }
    Ok(())
}

/// One line of an audit file, judged against the hash of the record before it.
enum Line {
    Blank,
    /// Not JSON: torn by a crash; the chain goes around it (a record replaced by
    /// garbage still breaks the link of the record after it).
    Torn,
    Bad(&'static str),
    Good {
        hash: String,
        starts_late: bool,
    },
}

fn check_line(line: &[u8], prev: Option<&str>) -> Line {
    if line.iter().all(u8::is_ascii_whitespace) {
        return Line::Blank;
    }
    let record: serde_json::Value = match serde_json::from_slice(line) {
        Ok(v) => v,
        Err(_) => return Line::Torn,
    };
    let Some(hash) = claimed_hash(line) else {
        return Line::Bad("has no hash: it was not written by jitd or was changed");
    };
    if !intact(line) {
        return Line::Bad("was changed after it was written (its content does not match its hash)");
    }
    let claimed_prev = record["prev"].as_str().unwrap_or_default();
    match prev {
        Some(p) if p != claimed_prev => {
            Line::Bad("does not follow the record before it: a record was removed or reordered here")
        }
        None => Line::Good {
            hash: hash.to_string(),
            starts_late: claimed_prev != GENESIS,
        },
        _ => Line::Good {
            hash: hash.to_string(),
            starts_late: false,
        },
    }
}

/// The hash of the first sealed record in `file` (reading only up to it).
pub fn first_hash(file: &Path) -> std::io::Result<Option<String>> {
    let reader = match std::fs::File::open(file) {
        Ok(f) => BufReader::new(f),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    for line in reader.split(b'\n') {
        if let Some(h) = claimed_hash(&line?) {
            return Ok(Some(h.to_string()));
        }
    }
    Ok(None)
}

/// The hash of the first sealed record in `files` (oldest first).
pub fn first_hash_of(files: &[PathBuf]) -> std::io::Result<Option<String>> {
    for f in files {
        if let Some(h) = first_hash(f)? {
            return Ok(Some(h));
        }
    }
    Ok(None)
}

/// Counts the sealed records of `files` and finds where (1-based) each of `wanted`
/// is, reading line by line.
pub fn positions(files: &[PathBuf], wanted: &[Option<&str>]) -> std::io::Result<(u64, Vec<Option<u64>>)> {
    let mut found = vec![None; wanted.len()];
    let mut n = 0u64;
    for file in files {
        let reader = match std::fs::File::open(file) {
            Ok(f) => BufReader::new(f),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for line in reader.split(b'\n') {
            let line = line?;
            let Some(hash) = claimed_hash(&line) else { continue };
            n += 1;
            for (w, f) in wanted.iter().zip(found.iter_mut()) {
                if *w == Some(hash) {
                    *f = Some(n);
                }
            }
        }
    }
    Ok((n, found))
}

/// What one audit file holds: the figures the `rotate` record states when rotation
/// deletes it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileSummary {
    /// Sealed records.
    pub records: u64,
    /// Size in bytes.
    pub bytes: u64,
    /// The first sealed record's hash.
    pub first_hash: Option<String>,
    /// The last sealed record's hash.
    pub last_hash: Option<String>,
    /// The first sealed record's time, as written.
    pub first_time: Option<String>,
    /// The last sealed record's time, as written.
    pub last_time: Option<String>,
}

/// Reads `file` line by line and sums it up (a missing file is empty).
pub fn summarize(file: &Path) -> std::io::Result<FileSummary> {
    let mut s = FileSummary::default();
    let reader = match std::fs::File::open(file) {
        Ok(f) => BufReader::new(f),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(s),
        Err(e) => return Err(e),
    };
    let mut last_line = Vec::new();
    for line in reader.split(b'\n') {
        let line = line?;
        s.bytes += line.len() as u64 + 1;
        let Some(hash) = claimed_hash(&line) else { continue };
        s.records += 1;
        if s.first_hash.is_none() {
            s.first_hash = Some(hash.to_string());
            s.first_time = time_of(&line);
        }
        s.last_hash = Some(hash.to_string());
        last_line = line;
    }
    s.last_time = time_of(&last_line);
    Ok(s)
}

fn time_of(line: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Time {
        time: String,
    }
    serde_json::from_slice::<Time>(line).ok().map(|t| t.time)
}

/// The hash of the last sealed record in `file`, to continue the chain after a restart.
pub fn last_hash(file: &Path) -> std::io::Result<Option<String>> {
    Ok(last_record(file)?.map(|(hash, _)| hash))
}

/// The hash of the last sealed record in `file` and the offset just after its line,
/// reading only as much of the file's end as it takes.
pub fn last_record(file: &Path) -> std::io::Result<Option<(String, u64)>> {
    use std::os::unix::fs::FileExt;
    let f = match std::fs::File::open(file) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    let mut window = 64 * 1024u64;
    loop {
        let from = len.saturating_sub(window);
        let mut buf = vec![0u8; (len - from) as usize];
        f.read_exact_at(&mut buf, from)?;
        // lines wholly inside the window (the first is partial unless it starts the file)
        let mut end = buf.len();
        let mut lines = buf.split(|b| *b == b'\n').rev();
        if buf.last() == Some(&b'\n') {
            lines.next();
        } else if let Some(torn) = lines.next() {
            end -= torn.len();
        }
        let mut count = lines.clone().count();
        for line in lines {
            count -= 1;
            if count == 0 && from > 0 {
                break;
            }
            if let Some(h) = claimed_hash(line) {
                return Ok(Some((h.to_string(), from + end as u64)));
            }
            end -= line.len() + 1;
        }
        if from == 0 {
            return Ok(None);
        }
        window *= 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_chain(dir: &Path, n: usize) -> PathBuf {
        let mut prev = GENESIS.to_string();
        let mut text = Vec::new();
        for i in 0..n {
            let unsealed = format!("{{\"n\":{i},\"prev\":\"{prev}\"}}");
            let (line, hash) = seal(unsealed.as_bytes());
            text.extend_from_slice(&line);
            text.push(b'\n');
            prev = hash;
        }
        let path = dir.join("audit.jsonl");
        std::fs::write(&path, text).unwrap();
        path
    }

    fn lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn an_untouched_chain_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_chain(dir.path(), 5);
        let v = verify(std::slice::from_ref(&path)).unwrap();
        assert_eq!((v.records, v.broken, v.notes.len()), (5, None, 0));
        assert_eq!(
            last_hash(&path).unwrap(),
            claimed_hash(lines(&path)[4].as_bytes()).map(str::to_string)
        );
    }

    #[test]
    fn an_edit_is_named_at_the_edited_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_chain(dir.path(), 5);
        let mut l = lines(&path);
        l[2] = l[2].replace("\"n\":2", "\"n\":7");
        std::fs::write(&path, l.join("\n") + "\n").unwrap();
        let b = verify(&[path]).unwrap().broken.unwrap();
        assert_eq!(b.line, 3);
        assert!(b.problem.contains("changed"), "{b:?}");
    }

    #[test]
    fn a_removal_or_a_reordering_is_named_where_the_chain_breaks() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_chain(dir.path(), 5);
        let mut l = lines(&path);
        l.remove(1);
        std::fs::write(&path, l.join("\n") + "\n").unwrap();
        let b = verify(std::slice::from_ref(&path)).unwrap().broken.unwrap();
        assert_eq!(b.line, 2);
        assert!(b.problem.contains("removed or reordered"), "{b:?}");
        let path = write_chain(dir.path(), 5);
        let mut l = lines(&path);
        l.swap(2, 3);
        std::fs::write(&path, l.join("\n") + "\n").unwrap();
        assert_eq!(verify(&[path]).unwrap().broken.unwrap().line, 3);
    }

    #[test]
    fn a_torn_last_line_is_a_note_not_a_break() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_chain(dir.path(), 3);
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, b"{\"n\":"))
            .unwrap();
        let v = verify(&[path]).unwrap();
        assert_eq!((v.records, v.broken), (3, None));
        assert_eq!(v.notes.len(), 1);
    }
}
