//! Streaming, paginated audit queries: the files are read line by line (oldest first,
//! as written), the filter applies while reading, and a page stops after `limit`
//! matches or [`MAX_PAGE_BYTES`], so memory stays bounded whatever the log's size. A
//! [`Cursor`] names the last record returned by its hash, with a file and offset hint;
//! it survives rotation between pages (the record is found again by its hash).

use std::fs::File;
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use super::{chain, files, AuditFilter, AuditRecord, AUDIT_FILE};

/// The most records one page holds; larger limits are capped to it.
pub const MAX_LIMIT: usize = 10_000;
/// A page also ends once its records take this many bytes (as written in the log).
pub const MAX_PAGE_BYTES: usize = 16 * 1024 * 1024;
/// The most queries jitd runs at once; more are answered `busy`.
pub const MAX_CONCURRENT: usize = 4;
/// The most warnings (unreadable lines) one page reports.
const MAX_WARNINGS: usize = 50;

/// Where a page ended: the last record returned (by hash) and where it was then.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    /// The last record's hash.
    pub hash: String,
    /// The file it was in (`audit.jsonl` or `audit.jsonl.N`).
    pub file: String,
    /// The byte offset of its line in that file.
    pub offset: u64,
}

impl Cursor {
    /// The cursor as text for the protocol: `v1:HASH:FILE:OFFSET`.
    pub fn encode(&self) -> String {
        format!("v1:{}:{}:{}", self.hash, self.file, self.offset)
    }

    /// Reads a cursor made by [`Cursor::encode`]; anything else is refused with the
    /// reason (a cursor never names a path outside the audit files).
    pub fn parse(text: &str) -> Result<Cursor, String> {
        let bad = |why: &str| format!("cursor: {why}, got {text:?}");
        let mut parts = text.split(':');
        let (Some("v1"), Some(hash), Some(file), Some(offset), None) =
            (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad("not a cursor from jitd (v1:HASH:FILE:OFFSET)"));
        };
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad("the hash must be 64 hex digits"));
        }
        let numbered = file
            .strip_prefix(AUDIT_FILE)
            .and_then(|rest| rest.strip_prefix('.'))
            .is_some_and(|n| n.parse::<u32>().is_ok());
        if file != AUDIT_FILE && !numbered {
            return Err(bad("the file must be audit.jsonl or audit.jsonl.N"));
        }
        let offset = offset.parse().map_err(|_| bad("the offset must be a number"))?;
        Ok(Cursor {
            hash: hash.to_string(),
            file: file.to_string(),
            offset,
        })
    }
}

/// One page of a query.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Page {
    /// Matching records, oldest first.
    pub records: Vec<AuditRecord>,
    /// Where to go on from, when the page ended at its limit (the next page may be
    /// empty); `None` when the log was read to its end.
    pub next: Option<Cursor>,
    /// Unreadable lines skipped, a cursor that was rotated away.
    pub warnings: Vec<String>,
}

/// Reads the audit files of `state_dir` from just after `cursor` (or from the oldest
/// record) and returns up to `limit` (at most [`MAX_LIMIT`]) records that pass `filter`.
pub fn query(state_dir: &Path, filter: &AuditFilter, cursor: Option<&Cursor>, limit: usize) -> std::io::Result<Page> {
    let limit = limit.clamp(1, MAX_LIMIT);
    let files = files(state_dir);
    let mut page = Page::default();
    let (first, mut offset) = match cursor {
        None => (0, 0),
        Some(c) => match locate(&files, c)? {
            Some(at) => at,
            None => {
                page.warnings.push(format!(
                    "the cursor's record {} is no longer in the audit log (rotation removed it); going on from the oldest record kept",
                    c.hash
                ));
                (0, 0)
            }
        },
    };
    let mut bytes = 0;
    for (i, path) in files.iter().enumerate().skip(first) {
        let newest = i + 1 == files.len();
        let mut scan = Scan::open(path, offset)?;
        offset = 0;
        while let Some((at, line)) = scan.next_line(newest, &mut page.warnings)? {
            let record = match serde_json::from_slice::<AuditRecord>(line) {
                Ok(r) => r,
                Err(e) => {
                    warn(
                        &mut page.warnings,
                        format!("{}: skipped unreadable record at byte {at}: {e}", path.display()),
                    );
                    continue;
                }
            };
            if !filter.matches(&record) {
                continue;
            }
            bytes += line.len();
            let hash = record.hash.clone();
            page.records.push(record);
            if page.records.len() >= limit || bytes >= MAX_PAGE_BYTES {
                page.next = hash.map(|hash| Cursor {
                    hash,
                    file: file_name(path),
                    offset: at,
                });
                return Ok(page);
            }
        }
    }
    Ok(page)
}

/// Where to go on after the cursor's record: (file index, offset after its line).
/// Looks at the hinted offset in the hinted file, then at that offset in every file
/// (rotation renames files, it does not change them), then scans for the hash.
fn locate(files: &[PathBuf], c: &Cursor) -> std::io::Result<Option<(usize, u64)>> {
    let hinted = files.iter().position(|f| file_name(f) == c.file);
    let order = hinted
        .into_iter()
        .chain((0..files.len()).rev().filter(|i| Some(*i) != hinted));
    for i in order {
        if let Some(next) = line_at(&files[i], c.offset, &c.hash)? {
            return Ok(Some((i, next)));
        }
    }
    for (i, path) in files.iter().enumerate() {
        let mut scan = Scan::open(path, 0)?;
        let mut ignored = Vec::new();
        while let Some((at, line)) = scan.next_line(true, &mut ignored)? {
            if chain::claimed_hash(line) == Some(c.hash.as_str()) {
                return Ok(Some((i, at + line.len() as u64 + 1)));
            }
        }
    }
    Ok(None)
}

/// If the line at `offset` of `path` is the record `hash`, the offset after it.
fn line_at(path: &Path, offset: u64, hash: &str) -> std::io::Result<Option<u64>> {
    let mut scan = Scan::open(path, offset)?;
    let mut ignored = Vec::new();
    Ok(match scan.next_line(true, &mut ignored)? {
        Some((at, line)) if at == offset && chain::claimed_hash(line) == Some(hash) => Some(at + line.len() as u64 + 1),
        _ => None,
    })
}

/// A file read line by line from an offset, with one reused buffer.
struct Scan {
    reader: Option<BufReader<File>>,
    path: PathBuf,
    pos: u64,
    buf: Vec<u8>,
}

impl Scan {
    /// Opens `path` at `offset`; a file rotated away meanwhile reads as empty.
    fn open(path: &Path, offset: u64) -> std::io::Result<Scan> {
        let reader = match File::open(path) {
            Ok(mut f) => {
                f.seek(SeekFrom::Start(offset))?;
                Some(BufReader::with_capacity(64 * 1024, f))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        Ok(Scan {
            reader,
            path: path.to_path_buf(),
            pos: offset,
            buf: Vec::new(),
        })
    }

    /// The next non-blank line (without its newline) and its offset. A last line
    /// without a newline is being written (in the newest file: the end, silently) or
    /// was torn by a crash (in an older file: a warning).
    fn next_line(&mut self, newest: bool, warnings: &mut Vec<String>) -> std::io::Result<Option<(u64, &[u8])>> {
        let Some(reader) = self.reader.as_mut() else {
            return Ok(None);
        };
        loop {
            self.buf.clear();
            let at = self.pos;
            let n = reader.read_until(b'\n', &mut self.buf)?;
            self.pos += n as u64;
            if n == 0 {
                return Ok(None);
            }
            if self.buf.last() != Some(&b'\n') {
                if !newest {
                    warn(
                        warnings,
                        format!("{}: skipped an incomplete last line at byte {at}", self.path.display()),
                    );
                }
                return Ok(None);
            }
            self.buf.pop();
            if !self.buf.iter().all(u8::is_ascii_whitespace) {
                return Ok(Some((at, &self.buf)));
            }
        }
    }
}

fn warn(warnings: &mut Vec<String>, text: String) {
    if warnings.len() < MAX_WARNINGS {
        warnings.push(text);
    } else if warnings.len() == MAX_WARNINGS {
        warnings.push("further warnings left out".into());
    }
}

fn file_name(path: &Path) -> String {
    path.file_name().unwrap_or_default().to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::super::{Action, AuditLog, Outcome};
    use super::*;
    use crate::config::Rotation;
    use chrono::DateTime;

    fn record(i: u32) -> AuditRecord {
        let time = DateTime::from_timestamp(1_800_000_000 + i64::from(i), 0).unwrap();
        let mut r = AuditRecord::new(time, Some(1000 + i % 3), "bob", Action::Request, Outcome::Denied);
        r.ports = vec![if i % 2 == 0 { 22 } else { 3389 }];
        r.duration_secs = Some(u64::from(i));
        r
    }

    fn log(dir: &Path, n: u32, rotation: Rotation) -> AuditLog {
        let mut log = AuditLog::open(dir, rotation).unwrap();
        for i in 0..n {
            log.append(&[record(i)]).unwrap();
        }
        log
    }

    fn page_all(dir: &Path, filter: &AuditFilter, limit: usize) -> (Vec<u64>, usize) {
        let mut seen = Vec::new();
        let mut cursor = None;
        let mut pages = 0;
        loop {
            let page = query(dir, filter, cursor.as_ref(), limit).unwrap();
            assert!(page.records.len() <= limit);
            assert!(page.warnings.is_empty(), "{:?}", page.warnings);
            pages += 1;
            seen.extend(page.records.iter().filter_map(|r| r.duration_secs));
            match page.next {
                Some(c) => cursor = Some(Cursor::parse(&c.encode()).unwrap()),
                None => return (seen, pages),
            }
        }
    }

    #[test]
    fn pages_cover_every_match_once_in_order_across_rotated_files() {
        let dir = tempfile::tempdir().unwrap();
        log(
            dir.path(),
            100,
            Rotation {
                max_bytes: 2000,
                keep: 50,
            },
        );
        assert!(files(dir.path()).len() > 5);
        let (all, pages) = page_all(dir.path(), &AuditFilter::default(), 7);
        assert_eq!(all, (0..100).collect::<Vec<u64>>());
        assert_eq!(pages, 15, "14 full pages, the last one short");
        let port = AuditFilter {
            port: Some(3389),
            ..Default::default()
        };
        let (odd, _) = page_all(dir.path(), &port, 10);
        assert_eq!(odd, (0..100).filter(|i| i % 2 == 1).collect::<Vec<u64>>());
    }

    #[test]
    fn a_cursor_survives_rotation_between_pages() {
        let dir = tempfile::tempdir().unwrap();
        let rotation = Rotation {
            max_bytes: 2000,
            keep: 50,
        };
        let mut log = log(dir.path(), 20, rotation);
        let first = query(dir.path(), &AuditFilter::default(), None, 5).unwrap();
        let cursor = first.next.unwrap();
        for i in 20..60 {
            log.append(&[record(i)]).unwrap();
        }
        let next = query(dir.path(), &AuditFilter::default(), Some(&cursor), 5).unwrap();
        let got: Vec<u64> = next.records.iter().filter_map(|r| r.duration_secs).collect();
        assert_eq!(got, vec![5, 6, 7, 8, 9]);
        assert!(next.warnings.is_empty());
        // the hint's offset is wrong too (an edited cursor): found by its hash
        let moved = Cursor {
            offset: 3,
            ..cursor.clone()
        };
        let again = query(dir.path(), &AuditFilter::default(), Some(&moved), 1).unwrap();
        assert_eq!(again.records[0].duration_secs, Some(5));
    }

    #[test]
    fn a_cursor_rotated_away_says_so_and_starts_over() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = log(
            dir.path(),
            10,
            Rotation {
                max_bytes: 1500,
                keep: 1,
            },
        );
        let cursor = query(dir.path(), &AuditFilter::default(), None, 1)
            .unwrap()
            .next
            .unwrap();
        for i in 10..40 {
            log.append(&[record(i)]).unwrap();
        }
        let page = query(dir.path(), &AuditFilter::default(), Some(&cursor), 3).unwrap();
        assert!(page.warnings[0].contains("rotation removed it"), "{:?}", page.warnings);
        assert_eq!(page.records.len(), 3);
    }

    #[test]
    fn bad_cursors_are_refused_with_the_reason() {
        let hash = "ab".repeat(32);
        let ok = Cursor::parse(&format!("v1:{hash}:audit.jsonl.3:120")).unwrap();
        assert_eq!((ok.file.as_str(), ok.offset), ("audit.jsonl.3", 120));
        for (text, why) in [
            ("hello".to_string(), "not a cursor from jitd"),
            (format!("v1:{hash}:../../etc/shadow:0"), "the file must be"),
            (format!("v1:{hash}:audit.jsonl.x:0"), "the file must be"),
            ("v1:abc:audit.jsonl:0".into(), "64 hex digits"),
            (format!("v1:{hash}:audit.jsonl:-1"), "offset must be a number"),
        ] {
            let e = Cursor::parse(&text).unwrap_err();
            assert!(e.starts_with("cursor: ") && e.contains(why), "{text}: {e}");
        }
    }

    #[test]
    fn a_record_being_written_is_not_read_and_a_torn_one_is_a_warning() {
        let dir = tempfile::tempdir().unwrap();
        log(dir.path(), 3, Rotation::default());
        let current = dir.path().join(AUDIT_FILE);
        let mut text = std::fs::read(&current).unwrap();
        text.extend_from_slice(b"{\"time\":");
        std::fs::write(&current, &text).unwrap();
        let page = query(dir.path(), &AuditFilter::default(), None, 10).unwrap();
        assert_eq!((page.records.len(), page.warnings.len()), (3, 0));
        std::fs::rename(&current, dir.path().join("audit.jsonl.1")).unwrap();
        std::fs::write(&current, "").unwrap();
        let page = query(dir.path(), &AuditFilter::default(), None, 10).unwrap();
        assert_eq!((page.records.len(), page.warnings.len()), (3, 1));
    }
}
