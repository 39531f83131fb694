//! Reading the audit files: which there are, oldest first, and their records, each
//! with where it ends (a torn or unreadable line is noted, never fatal).

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use super::journal::Position;
use super::record::AuditRecord;

/// The audit file's name inside `state_dir`.
pub const AUDIT_FILE: &str = "audit.jsonl";

/// The audit files in `state_dir`, oldest first (rotated ones, then the current one).
pub fn files(state_dir: &Path) -> Vec<PathBuf> {
    let mut rotated: Vec<(usize, PathBuf)> = std::fs::read_dir(state_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let n = name.strip_prefix(&format!("{AUDIT_FILE}."))?.parse().ok()?;
            Some((n, e.path()))
        })
        .collect();
    rotated.sort_by_key(|r| std::cmp::Reverse(r.0));
    let mut all: Vec<PathBuf> = rotated.into_iter().map(|(_, p)| p).collect();
    let current = state_dir.join(AUDIT_FILE);
    if current.exists() {
        all.push(current);
    }
    all
}

/// The numbers of the rotated audit files in `state_dir` (`audit.jsonl.N`).
pub(super) fn rotated_numbers(state_dir: &Path) -> Vec<usize> {
    std::fs::read_dir(state_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            name.strip_prefix(&format!("{AUDIT_FILE}."))?.parse().ok()
        })
        .collect()
}

/// Every record of every audit file, oldest first, and notes on unreadable lines.
pub fn read_all(state_dir: &Path) -> std::io::Result<(Vec<AuditRecord>, Vec<String>)> {
    let mut records = Vec::new();
    let mut problems = Vec::new();
    for file in files(state_dir) {
        let (r, p) = read_records(&file)?;
        records.extend(r);
        problems.extend(p);
    }
    Ok((records, problems))
}

/// The records of an audit file, and a note for each line that could not be read
/// (a torn last line after a crash is reported, never fatal).
pub fn read_records(path: &Path) -> std::io::Result<(Vec<AuditRecord>, Vec<String>)> {
    read_records_from(path, 0).map(|(records, problems, _)| (records, problems))
}

/// Like [`read_records`], from byte `offset` on (the start of a line); also returns how
/// many bytes were read.
pub fn read_records_from(path: &Path, offset: u64) -> std::io::Result<(Vec<AuditRecord>, Vec<String>, u64)> {
    let (records, problems, bytes) = read_positioned(path, offset)?;
    Ok((records.into_iter().map(|(r, _)| r).collect(), problems, bytes))
}

/// What [`read_positioned`] read: each record with where it ends, notes on lines that
/// could not be read, and how many bytes were read.
pub type Positioned = (Vec<(AuditRecord, Position)>, Vec<String>, u64);

/// Like [`read_records_from`], each record with where it ends (the file named by its
/// name in `state_dir`).
pub fn read_positioned(path: &Path, offset: u64) -> std::io::Result<Positioned> {
    use std::io::{Seek, SeekFrom};
    let name = path.file_name().unwrap_or_default().to_string_lossy().into_owned();
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), Vec::new(), 0)),
        Err(e) => return Err(e),
    };
    file.seek(SeekFrom::Start(offset))?;
    let mut records = Vec::new();
    let mut problems = Vec::new();
    let mut bytes = 0u64;
    for (i, line) in BufReader::new(file).split(b'\n').enumerate() {
        let line = line?;
        bytes += line.len() as u64 + 1;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match serde_json::from_slice::<AuditRecord>(&line) {
            Ok(r) => {
                let at = Position {
                    file: name.clone(),
                    offset: offset + bytes,
                    hash: r.hash.clone().unwrap_or_default(),
                };
                records.push((r, at))
            }
            Err(e) if offset == 0 => {
                problems.push(format!("{}:{}: skipped unreadable record: {e}", path.display(), i + 1))
            }
            Err(e) => problems.push(format!(
                "{}: line {} after byte {offset}: skipped unreadable record: {e}",
                path.display(),
                i + 1
            )),
        }
    }
    Ok((records, problems, bytes))
}
