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
    let hash = hex(&Sha256::digest(unsealed));
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
fn intact(line: &[u8]) -> bool {
    let (Some(at), Some(claimed)) = (rfind(line, HASH_FIELD), claimed_hash(line)) else {
        return false;
    };
    let mut unsealed = line[..at].to_vec();
    unsealed.push(b'}');
    hex(&Sha256::digest(&unsealed)) == claimed
}

fn rfind(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).rposition(|w| w == needle)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
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
/// record before it.
pub fn verify(files: &[PathBuf]) -> std::io::Result<Verdict> {
    let mut verdict = Verdict {
        records: 0,
        broken: None,
        notes: Vec::new(),
    };
    let mut prev: Option<String> = None;
    for file in files {
        let lines: Vec<Vec<u8>> = BufReader::new(std::fs::File::open(file)?)
            .split(b'\n')
            .collect::<Result<_, _>>()?;
        for (i, line) in lines.iter().enumerate() {
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let at = |problem: String| {
                Some(Break {
                    file: file.clone(),
                    line: i + 1,
                    problem,
                })
            };
            // A line torn by a crash never got a hash, so the chain goes around it; a
            // record replaced by garbage still breaks the link of the record after it.
            let record: serde_json::Value = match serde_json::from_slice(line) {
                Ok(v) => v,
                Err(_) => {
                    verdict.notes.push(format!(
                        "{}:{}: incomplete record (a crash while writing?); not part of the chain",
                        file.display(),
                        i + 1
                    ));
                    continue;
                }
            };
            let Some(hash) = claimed_hash(line) else {
                verdict.broken = at("has no hash: it was not written by jitd or was changed".into());
                return Ok(verdict);
            };
            if !intact(line) {
                verdict.broken = at("was changed after it was written (its content does not match its hash)".into());
                return Ok(verdict);
            }
            let claimed_prev = record["prev"].as_str().unwrap_or_default();
            match &prev {
                Some(p) if p != claimed_prev => {
                    verdict.broken =
                        at("does not follow the record before it: a record was removed or reordered here".into());
                    return Ok(verdict);
                }
                None if claimed_prev != GENESIS => verdict.notes.push(format!(
                    "the chain starts at {}:{} (older records were rotated away)",
                    file.display(),
                    i + 1
                )),
                _ => {}
            }
            prev = Some(hash.to_string());
            verdict.records += 1;
        }
    }
    Ok(verdict)
}

/// The hash of the last sealed record in `file`, to continue the chain after a restart.
pub fn last_hash(file: &Path) -> std::io::Result<Option<String>> {
    let text = match std::fs::read(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    Ok(text
        .split(|b| *b == b'\n')
        .rev()
        .find_map(|l| claimed_hash(l).map(str::to_string)))
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
