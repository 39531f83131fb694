//! The live grants on disk (`state_dir/grants.json`), so a restarted jitd can put them
//! back. Written atomically: temporary file, fsync, rename, fsync of the directory.
//!
//! The snapshot is a checkpoint, written at most once a second and at stop; the audit
//! log, fsync'ed before every answer, is the journal. The snapshot names the place in the
//! journal it covers (`position`) and sums up the history before it ([`History`]), so a
//! restart loads the snapshot and reads only the records after that place; when the place
//! is not found it reads the whole history and replays the records written after the one
//! whose hash is `audit_hash`. Either way [`replay`] applies a transaction's records only
//! when all of them are there.
//!
//! It also owns the trust in `state_dir` itself ([`prepare_state_dir`]): jitd uses it only
//! when it is a real directory owned by jitd's own uid and writable by nobody else, and
//! opens the files in it without following symbolic links, so nobody but jitd (and root)
//! can plant a snapshot that opens ports or a link that makes jitd overwrite another file.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::approval::PendingRequest;
use crate::audit::{AuditRecord, Position};
use crate::domain::GrantId;
use crate::grants::Grant;

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
    /// Where in the journal the last record the snapshot includes ends; `None` in an
    /// older snapshot, or when it was taken without one (start-up then reads it all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<Position>,
    /// What start-up needs from the history up to `position`.
    #[serde(default)]
    pub history: History,
    /// The requests waiting for approval at the time of writing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending: Vec<PendingRequest>,
    /// The connections the live grants admitted so far, and the count last read from
    /// each kernel element (start-up credits what the counters added since).
    #[serde(default, skip_serializing_if = "crate::grants::usage::SavedLedger::is_empty")]
    pub admitted: crate::grants::usage::SavedLedger,
    /// Where each live grant's approval record ends in the journal: start-up checks
    /// every grant of the checkpoint against it (the checkpoint is a shortcut, the
    /// hash-chained log the authority).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub approvals: BTreeMap<GrantId, Position>,
}

/// Whether `record` is the approval of `grant` and allows it: same id, address, port
/// and protocol, granted when it was approved, ending no later than the approved
/// duration after that (a clamp may only have shortened it). The message says how
/// they differ.
pub fn vouches(record: &AuditRecord, grant: &Grant) -> Result<(), String> {
    use crate::audit::{Action, Outcome};
    let id = grant.id;
    if (record.action, record.outcome) != (Action::Request, Outcome::Approved) || record.grant_id != Some(id) {
        return Err(format!("grant {id}: the record named as its approval is not one"));
    }
    let same = record
        .source
        .as_deref()
        .and_then(|s| crate::domain::parse_prefix(s).ok())
        == Some(grant.source)
        && record.ports.first() == Some(&grant.port)
        && record.protocol == Some(grant.protocol)
        && record.time == grant.granted_at;
    if !same {
        return Err(format!(
            "grant {id}: the checkpoint's address, port, protocol or start differ from its approval record"
        ));
    }
    let approved = record.duration_secs.and_then(|d| i64::try_from(d).ok()).unwrap_or(0);
    let end = record.time + chrono::Duration::try_seconds(approved).unwrap_or_default();
    if grant.expires_at > end {
        return Err(format!(
            "grant {id}: the checkpoint says it ends at {}, its approval record allows {approved} s from {} (until {end})",
            grant.expires_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            record.time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        ));
    }
    Ok(())
}

/// The first of `grants` (a checkpoint's) that `records` ended: the journal after the
/// oldest of their approvals, up to the checkpoint's place. The checkpoint must not
/// hold a grant the journal had already revoked, expired or replaced (or whose
/// approval was withdrawn) when it was taken; `None` when it holds none. Whole batches
/// only, and a `failed` record takes back the end before it, as [`replay`] does.
pub fn ended_in(grants: &[Grant], records: &[AuditRecord]) -> Option<String> {
    use crate::audit::{Action, Outcome};
    let ids: std::collections::HashSet<GrantId> = grants.iter().map(|g| g.id).collect();
    let (records, _) = whole_batches(records);
    let mut ended: BTreeMap<GrantId, &AuditRecord> = BTreeMap::new();
    for r in records {
        let Some(id) = r.grant_id.filter(|id| ids.contains(id)) else {
            continue;
        };
        match (r.action, r.outcome) {
            (Action::Request, Outcome::Failed) | (_, Outcome::Expired | Outcome::Superseded | Outcome::Revoked) => {
                ended.insert(id, r);
            }
            (_, Outcome::Failed) => {
                ended.remove(&id);
            }
            _ => {}
        }
    }
    let (id, r) = ended.into_iter().next()?;
    let how = serde_json::to_value((r.action, r.outcome)).unwrap_or_default();
    Some(format!(
        "grant {id}: the audit log ended it ({} {} at {}) before the checkpoint's place in it",
        how[0].as_str().unwrap_or("?"),
        how[1].as_str().unwrap_or("?"),
        r.time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    ))
}

/// The sum of the journal up to a checkpoint that start-up needs besides the grants:
/// recent use of each port (for `status`), the newest record's time (to tell a wall
/// clock that went backwards) and the highest grant id ever handed out.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    /// Per port: approvals counted by minute (unix minute → count), the last access
    /// and who it was.
    #[serde(default)]
    pub usage: BTreeMap<u16, PortUse>,
    /// The newest record's time.
    #[serde(default)]
    pub newest: Option<DateTime<Utc>>,
    /// The highest grant id in the journal.
    #[serde(default)]
    pub max_grant_id: GrantId,
    /// Nonces of remote knocks recorded within [`NONCE_MEMORY`] of the newest record,
    /// with their record's time: start-up remembers them, so that a knock accepted
    /// before a crash is still refused as a replay after it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub nonces: BTreeMap<String, DateTime<Utc>>,
    /// Fleet requests recorded within [`FLEET_MEMORY`] of the newest record, with their
    /// latest record's time: start-up remembers them as judged, so that nothing is
    /// applied twice across a restart.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub fleet: BTreeMap<String, DateTime<Utc>>,
    /// The newest `clock` record's time (a step of the wall clock): the wall clock
    /// cannot say how long a grant approved before it has left.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock_stepped: Option<DateTime<Utc>>,
}

/// How long after its last record a fleet request is remembered: the longest a fleet
/// request may last, plus the clock skew its signing time may have.
pub const FLEET_MEMORY: chrono::TimeDelta =
    chrono::TimeDelta::seconds(crate::fleet::request::MAX_DURATION as i64 + crate::fleet::judge::SKEW.num_seconds());

/// How long after its record a knock's nonce is kept: twice the widest time window (a
/// knock is accepted at most one window after it was signed, and refused one window
/// after that).
pub const NONCE_MEMORY: chrono::TimeDelta =
    chrono::TimeDelta::seconds(2 * crate::remote::settings::MAX_WINDOW.as_secs() as i64);

/// Recent use of one port, as [`History`] keeps it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortUse {
    /// Approvals per unix minute, within the window [`History::note`] was given.
    #[serde(default)]
    pub approvals: BTreeMap<i64, u32>,
    /// The last approval's time.
    #[serde(default)]
    pub last_access: Option<DateTime<Utc>>,
    /// The last approval's requester.
    #[serde(default)]
    pub last_user: Option<String>,
}

impl History {
    /// Adds `records` (oldest first); approvals before `since` are not counted and
    /// counts older than it are dropped.
    pub fn note(&mut self, records: &[AuditRecord], since: DateTime<Utc>) {
        use crate::audit::{Action, Outcome};
        for r in records {
            self.newest = self.newest.max(Some(r.time));
            // requests waiting for approval take their ids from the same counter
            let ids = r.grant_id.into_iter().chain(r.request_id);
            self.max_grant_id = ids.fold(self.max_grant_id, GrantId::max);
            if let Some(nonce) = &r.nonce {
                self.nonces.insert(nonce.clone(), r.time);
            }
            if let Some(id) = &r.fleet_request {
                let t = self.fleet.entry(id.clone()).or_insert(r.time);
                *t = r.time.max(*t);
            }
            if r.action == Action::Clock {
                self.clock_stepped = self.clock_stepped.max(Some(r.time));
            }
            if (r.action, r.outcome) != (Action::Request, Outcome::Approved) {
                continue;
            }
            for port in &r.ports {
                let u = self.usage.entry(*port).or_default();
                if r.time >= since {
                    *u.approvals.entry(r.time.timestamp().div_euclid(60)).or_default() += 1;
                }
                u.last_access = Some(r.time);
                u.last_user = Some(r.actor.clone());
            }
        }
        if let Some(newest) = self.newest {
            self.nonces.retain(|_, t| *t + NONCE_MEMORY >= newest);
            self.fleet.retain(|_, t| *t + FLEET_MEMORY >= newest);
        }
        let first_minute = since.timestamp().div_euclid(60);
        for u in self.usage.values_mut() {
            u.approvals = u.approvals.split_off(&first_minute);
        }
    }
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

/// The records of whole transactions: a run of records of one batch counts only when
/// all its records are there, in order (a record without a batch is a batch of one).
/// Returns them and how many records of unfinished batches were left out.
pub fn whole_batches(records: &[AuditRecord]) -> (Vec<&AuditRecord>, usize) {
    let mut whole = Vec::with_capacity(records.len());
    let mut left_out = 0;
    let mut i = 0;
    while i < records.len() {
        let Some(b) = records[i].batch else {
            whole.push(&records[i]);
            i += 1;
            continue;
        };
        let run = records[i..]
            .iter()
            .take(b.of as usize)
            .enumerate()
            .take_while(|(k, r)| {
                r.batch
                    .is_some_and(|rb| rb.id == b.id && rb.of == b.of && rb.n as usize == k + 1)
            })
            .count();
        if b.n == 1 && run == b.of as usize {
            whole.extend(&records[i..i + run]);
        } else {
            left_out += run.max(1);
        }
        i += run.max(1);
    }
    (whole, left_out)
}

/// Brings a snapshot up to date with audit records written after it: approvals add
/// grants; expiries, replacements and revocations end them; a `failed` record undoes
/// the record of the same grant and action before it (its transaction did not take
/// effect: an approval is withdrawn, an end is taken back). The records of a batch
/// count only when the whole batch is there; returns how many were left out.
pub fn replay(snapshot: &mut Snapshot, records: &[AuditRecord]) -> usize {
    use crate::audit::{Action, Outcome};
    let (records, left_out) = whole_batches(records);
    replay_pending(snapshot, &records);
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
    left_out
}

/// Brings the requests waiting for approval up to date: a `request`/`pending` record
/// adds one; an `approve`/`approved`, `approve`/`revoked`, `deny`/`done` or
/// `expire`/`expired` record of it ends it; an `approve`/`failed` record (the approval
/// did not take effect) puts it back; a `request`/`failed` one (the transaction that
/// made it failed; one without a grant id) withdraws it. Refused attempts (`approve`/`denied`, `deny`/`denied`)
/// change nothing.
fn replay_pending(snapshot: &mut Snapshot, records: &[&AuditRecord]) {
    use crate::audit::{Action, Outcome};
    let mut ended: std::collections::HashMap<GrantId, PendingRequest> = std::collections::HashMap::new();
    for r in records {
        let Some(id) = r.request_id else { continue };
        snapshot.next_id = snapshot.next_id.max(id + 1);
        let closing = matches!(
            (r.action, r.outcome),
            (Action::Approve, Outcome::Approved | Outcome::Revoked)
                | (Action::Deny, Outcome::Done)
                | (Action::Expire, Outcome::Expired)
        );
        match (r.action, r.outcome) {
            (Action::Request, Outcome::Pending) => {
                if let Some(p) = pending_request(r, id) {
                    snapshot.pending.retain(|q| q.id != id);
                    snapshot.pending.push(p);
                }
            }
            // (the failed grants of an approval name their request too, and a grant)
            (Action::Request, Outcome::Failed) if r.grant_id.is_none() => snapshot.pending.retain(|q| q.id != id),
            (Action::Approve, Outcome::Failed) => {
                if let Some(p) = ended.remove(&id) {
                    snapshot.pending.push(p);
                }
            }
            _ if closing => {
                if let Some(at) = snapshot.pending.iter().position(|q| q.id == id) {
                    ended.insert(id, snapshot.pending.remove(at));
                }
            }
            _ => {}
        }
    }
    snapshot.pending.sort_by_key(|q| q.id);
}

/// The request a `request`/`pending` record describes, if it is complete: its
/// requester is the record's actor (a local uid, or the principals and key of a signed
/// knock).
fn pending_request(r: &AuditRecord, id: GrantId) -> Option<PendingRequest> {
    let source = r.source.as_deref().and_then(|s| crate::domain::parse_prefix(s).ok())?;
    let requester = match r.actor_uid {
        Some(uid) => crate::domain::Caller {
            uid,
            name: r.actor.clone(),
            groups: Vec::new(),
            signer: None,
        },
        None => {
            let mut caller = crate::domain::Caller::signed(crate::domain::SignedBy {
                principals: r.principals.clone(),
                fingerprint: r.key.clone().unwrap_or_default(),
                peer: r.peer.as_deref().and_then(|p| p.parse().ok()),
                nonce: r.nonce.clone(),
                certificate: r.certificate.clone(),
                fleet: r.fleet_origin(),
            });
            caller.name = r.actor.clone();
            caller
        }
    };
    Some(PendingRequest {
        id,
        requester,
        requester_login: r.login_uid,
        ports: r.ports.clone(),
        source,
        duration_secs: r.duration_secs?,
        until: r.until,
        justification: r.justification.clone(),
        asked_at: r.time,
        times_out_at: r.times_out_at?,
    })
}

/// The grant an approval record describes, if it is complete.
fn approved_grant(r: &crate::audit::AuditRecord, id: GrantId) -> Option<Grant> {
    let source = r.source.as_deref().and_then(|s| crate::domain::parse_prefix(s).ok())?;
    let secs = i64::try_from(r.duration_secs?).ok()?;
    Some(Grant {
        id,
        source,
        port: *r.ports.first()?,
        protocol: r.protocol?,
        requester: r.actor.clone(),
        requester_uid: r.actor_uid.unwrap_or(crate::domain::REMOTE_UID),
        principals: r.principals.clone(),
        fleet: r.fleet_origin(),
        justification: r.justification.clone(),
        granted_at: r.time,
        expires_at: r.time + chrono::Duration::try_seconds(secs)?,
    })
}

/// A failed read or write of the snapshot, or a `state_dir` jitd does not trust.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Reading or writing a file in `state_dir` failed.
    #[error("{action} {path}: {reason}")]
    Io {
        /// What jitd was doing ("cannot read").
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// Why (not a `source`: it is in the message already, once is enough).
        reason: std::io::Error,
    },
    /// `state_dir` is not a directory only jitd can write; nothing in it was changed.
    #[error("state_dir {path}: {problem}; jitd refuses to use it and changed nothing in it")]
    Untrusted {
        /// The directory.
        path: PathBuf,
        /// What was found and what is required.
        problem: String,
    },
}

fn io_error(action: &'static str, path: &Path) -> impl Fn(std::io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |reason| StoreError::Io {
        action,
        path: path.clone(),
        reason: explain_link(reason),
    }
}

/// ELOOP from `O_NOFOLLOW` means "this is a symbolic link": say so in those words.
fn explain_link(e: std::io::Error) -> std::io::Error {
    if e.raw_os_error() == Some(nix::libc::ELOOP) {
        std::io::Error::other("it is a symbolic link, and jitd follows no links in state_dir")
    } else {
        e
    }
}

/// What [`check_state_dir`] looks at: the `lstat` of the directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirFacts {
    /// A directory (not a symbolic link to one).
    pub is_dir: bool,
    /// A symbolic link.
    pub is_symlink: bool,
    /// Owner uid.
    pub uid: u32,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
}

impl DirFacts {
    fn of(meta: &fs::Metadata) -> DirFacts {
        DirFacts {
            is_dir: meta.file_type().is_dir(),
            is_symlink: meta.file_type().is_symlink(),
            uid: meta.uid(),
            mode: meta.mode() & 0o7777,
        }
    }
}

/// Whether a `state_dir` with these facts may be trusted by a jitd running as `euid`:
/// a real directory, owned by `euid`, not writable by group or others. The message
/// names what was found and what is required.
pub fn check_state_dir(facts: DirFacts, euid: u32) -> Result<(), String> {
    let found = format!("owner uid {}, mode {:04o}", facts.uid, facts.mode);
    if facts.is_symlink {
        return Err("is a symbolic link; it must be a directory itself".into());
    }
    if !facts.is_dir {
        return Err("is not a directory".into());
    }
    if facts.uid != euid {
        return Err(format!(
            "is owned by uid {} ({found}); it must be owned by the uid jitd runs as ({euid}): fix with chown {euid} and chmod 0700",
            facts.uid
        ));
    }
    if facts.mode & 0o022 != 0 {
        return Err(format!(
            "is writable by {} ({found}); it must be writable by its owner only: fix with chmod 0700",
            if facts.mode & 0o020 != 0 { "its group" } else { "others" }
        ));
    }
    Ok(())
}

/// Makes `state_dir` ready: creates it 0700 if missing; refuses (changing nothing) one
/// that is a symbolic link, not a directory, not owned by jitd's effective uid, or
/// writable by group or others.
pub fn prepare_state_dir(dir: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::DirBuilderExt;
    // Missing (or unreachable): create it, and let that say what is in the way.
    if fs::symlink_metadata(dir).is_err() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_error("cannot create state_dir", dir))?;
    }
    let meta = fs::symlink_metadata(dir).map_err(io_error("cannot inspect state_dir", dir))?;
    check_state_dir(DirFacts::of(&meta), nix::unistd::geteuid().as_raw()).map_err(|problem| StoreError::Untrusted {
        path: dir.to_path_buf(),
        problem,
    })
}

/// Reads the snapshot in `state_dir` (never through a symbolic link); a missing file is
/// an empty snapshot.
pub fn load(state_dir: &Path) -> Result<Snapshot, StoreError> {
    let path = state_dir.join(GRANTS_FILE);
    let fail = io_error("cannot read", &path);
    let mut bytes = Vec::new();
    let opened = OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(&path);
    match opened {
        Ok(mut file) => file.read_to_end(&mut bytes).map_err(&fail)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Snapshot::default()),
        Err(e) => return Err(fail(e)),
    };
    serde_json::from_slice(&bytes).map_err(|e| fail(std::io::Error::other(e)))
}

/// Replaces the snapshot in `state_dir` atomically: readers see the old or the new file
/// whole. The temporary file is created afresh (`O_EXCL`, after unlinking a stale one),
/// so a link planted in its place is removed, never followed.
pub fn save(state_dir: &Path, snapshot: &Snapshot) -> Result<(), StoreError> {
    let path = state_dir.join(GRANTS_FILE);
    let tmp = state_dir.join(format!(".{GRANTS_FILE}.tmp"));
    let fail = io_error("cannot write", &path);
    let bytes = serde_json::to_vec(snapshot).expect("snapshots serialize");
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(fail(e)),
        _ => {}
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .mode(0o600)
        .open(&tmp)
        .map_err(&fail)?;
    file.write_all(&bytes).map_err(&fail)?;
    file.sync_all().map_err(&fail)?;
    drop(file);
    // rename replaces a link named grants.json itself, not what it points to
    fs::rename(&tmp, &path).map_err(&fail)?;
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
            position: Some(Position {
                file: "audit.jsonl".into(),
                offset: 1234,
                hash: "cd".repeat(32),
            }),
            history: History::default(),
            pending: Vec::new(),
            admitted: crate::grants::usage::SavedLedger {
                connections: [(3, 2)].into(),
                elements: Vec::new(),
                unknown: [3].into(),
            },
            approvals: BTreeMap::new(),
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
            r.protocol = Some(crate::domain::Protocol::Tcp);
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
    fn a_checkpoint_grant_the_journal_ended_before_its_place_is_named() {
        use crate::audit::{Action, AuditRecord, Outcome};
        let at = chrono::DateTime::parse_from_rfc3339("2026-11-25T10:00:00Z")
            .unwrap()
            .to_utc();
        let record = |id: u64, action, outcome| {
            let mut r = AuditRecord::new(at, None, "jitd", action, outcome);
            r.grant_id = Some(id);
            r
        };
        let mut approved = record(1, Action::Request, Outcome::Approved);
        approved.source = Some("192.0.2.1".into());
        approved.ports = vec![22];
        approved.protocol = Some(crate::domain::Protocol::Tcp);
        approved.duration_secs = Some(3600);
        let grants: Vec<Grant> = [1, 2, 3].map(|id| approved_grant(&approved, id).unwrap()).to_vec();
        let clean = [
            record(1, Action::Start, Outcome::Done),
            record(9, Action::Revoke, Outcome::Revoked),
        ];
        assert_eq!(ended_in(&grants, &clean), None, "another grant's end, a clamp");
        let taken_back = [
            record(2, Action::Revoke, Outcome::Revoked),
            record(2, Action::Revoke, Outcome::Failed),
        ];
        assert_eq!(ended_in(&grants, &taken_back), None, "a revocation that did not happen");
        for (action, outcome) in [
            (Action::Revoke, Outcome::Revoked),
            (Action::Expire, Outcome::Expired),
            (Action::Supersede, Outcome::Superseded),
            (Action::Request, Outcome::Failed),
        ] {
            let why = ended_in(&grants, &[record(3, action, outcome)]).expect("ended");
            assert!(why.starts_with("grant 3: the audit log ended it ("), "{why}");
        }
    }

    #[test]
    fn replaying_the_audit_brings_the_requests_waiting_for_approval_up_to_date() {
        use crate::audit::{Action, AuditRecord, Outcome};
        let t = chrono::DateTime::parse_from_rfc3339("2026-11-25T10:00:00Z")
            .unwrap()
            .to_utc();
        let pending = |id: u64| {
            let mut r = AuditRecord::new(t, Some(1001), "bob", Action::Request, Outcome::Pending);
            r.request_id = Some(id);
            r.source = Some("192.0.2.7".into());
            r.ports = vec![22, 3389];
            r.duration_secs = Some(3600);
            r.times_out_at = Some(t + chrono::Duration::minutes(15));
            r
        };
        let about = |id: u64, action, outcome, grant: Option<u64>| {
            let mut r = AuditRecord::new(t, Some(1002), "carol", action, outcome);
            r.request_id = Some(id);
            r.grant_id = grant;
            r
        };
        let mut snapshot = Snapshot::default();
        replay(
            &mut snapshot,
            &[
                pending(1),
                pending(2),
                pending(3),
                pending(4),
                pending(5),
                about(1, Action::Approve, Outcome::Denied, None), // a refused attempt
                about(2, Action::Approve, Outcome::Approved, None),
                about(3, Action::Deny, Outcome::Done, None),
                about(4, Action::Approve, Outcome::Approved, None),
                about(4, Action::Request, Outcome::Failed, Some(6)), // its grant failed...
                about(4, Action::Approve, Outcome::Failed, None),    // ...and so did it
                about(5, Action::Request, Outcome::Failed, None),    // never pending
            ],
        );
        let waiting: Vec<u64> = snapshot.pending.iter().map(|p| p.id).collect();
        assert_eq!(waiting, vec![1, 4]);
        assert_eq!(snapshot.next_id, 7, "past request 5 and grant 6");
        let p = &snapshot.pending[0];
        assert_eq!((p.requester.uid, p.requester.name.as_str()), (1001, "bob"));
        assert_eq!((p.ports.clone(), p.duration_secs), (vec![22, 3389], 3600));
        assert_eq!(p.times_out_at, t + chrono::Duration::minutes(15));
        let mut history = History::default();
        history.note(&[pending(9)], t);
        assert_eq!(history.max_grant_id, 9, "request ids come from the grant counter");
    }

    #[test]
    fn a_batch_counts_whole_or_not_at_all_and_old_records_are_batches_of_one() {
        use crate::audit::{Action, AuditRecord, Batch, Outcome};
        let t = chrono::DateTime::parse_from_rfc3339("2026-11-25T10:00:00Z")
            .unwrap()
            .to_utc();
        let approved = |id: u64, batch: Option<(u64, u32, u32)>| {
            let mut r = AuditRecord::new(t, Some(1001), "bob", Action::Request, Outcome::Approved);
            r.grant_id = Some(id);
            r.source = Some(format!("192.0.2.{id}"));
            r.ports = vec![22];
            r.protocol = Some(crate::domain::Protocol::Tcp);
            r.duration_secs = Some(60);
            r.batch = batch.map(|(id, n, of)| Batch { id, n, of });
            r
        };
        let mut superseded = AuditRecord::new(t, None, "jitd", Action::Supersede, Outcome::Superseded);
        superseded.grant_id = Some(1);
        superseded.batch = Some(Batch { id: 2, n: 1, of: 2 });
        let mut snapshot = Snapshot::default();
        let left_out = replay(
            &mut snapshot,
            &[
                approved(1, None),
                superseded,
                approved(2, Some((2, 2, 2))),
                approved(3, Some((4, 1, 3))),
                approved(4, Some((4, 2, 3))),
                // the third record of batch 4 never made it; batch 7 lost its first
                approved(6, Some((7, 2, 2))),
                approved(8, None),
            ],
        );
        let ids: Vec<u64> = snapshot.grants.iter().map(|g| g.id).collect();
        assert_eq!(ids, vec![2, 8]);
        assert_eq!(left_out, 3);
    }

    #[test]
    fn history_counts_recent_approvals_per_minute_and_keeps_the_last_use() {
        use crate::audit::{Action, AuditRecord, Outcome};
        let t = |m: i64| {
            chrono::DateTime::parse_from_rfc3339("2026-11-25T10:00:00Z")
                .unwrap()
                .to_utc()
                + chrono::Duration::minutes(m)
        };
        let approved = |m: i64, user: &str, id: u64| {
            let mut r = AuditRecord::new(t(m), Some(1001), user, Action::Request, Outcome::Approved);
            r.ports = vec![22];
            r.grant_id = Some(id);
            r
        };
        let mut h = History::default();
        h.note(&[approved(0, "bob", 3), approved(5, "bob", 4)], t(0));
        h.note(
            &[
                approved(5, "alice", 9),
                AuditRecord::new(t(6), None, "jitd", Action::Stop, Outcome::Done),
            ],
            t(1),
        );
        let u = &h.usage[&22];
        assert_eq!(
            u.approvals.values().sum::<u32>(),
            2,
            "the one before the window is dropped"
        );
        assert_eq!((u.last_access, u.last_user.as_deref()), (Some(t(5)), Some("alice")));
        assert_eq!((h.newest, h.max_grant_id), (Some(t(6)), 9));
    }

    #[test]
    fn history_remembers_fleet_requests_for_a_day_after_their_last_record_and_replay_keeps_their_origin() {
        use crate::audit::{Action, AuditRecord, Outcome};
        let t0 = chrono::DateTime::parse_from_rfc3339("2026-11-25T10:00:00Z")
            .unwrap()
            .to_utc();
        let fleet = |id: &str, at: chrono::DateTime<Utc>| {
            let mut r = AuditRecord::new(at, None, "principal:alice", Action::Request, Outcome::Approved);
            r.grant_id = Some(1);
            r.source = Some("198.51.100.7".into());
            r.ports = vec![22];
            r.protocol = Some(crate::domain::Protocol::Tcp);
            r.duration_secs = Some(600);
            r.fleet_request = Some(id.into());
            r.fleet_hosts = vec!["group:web".into()];
            r
        };
        let (a, b) = ("aa".repeat(16), "bb".repeat(16));
        let mut h = History::default();
        h.note(&[fleet(&a, t0), fleet(&b, t0 + chrono::TimeDelta::hours(2))], t0);
        assert_eq!(h.fleet.len(), 2);
        // a day after b's record, a is forgotten (past any request's end) and b is kept
        let later = AuditRecord::new(
            t0 + FLEET_MEMORY + chrono::TimeDelta::minutes(1),
            None,
            "jitd",
            Action::Stop,
            Outcome::Done,
        );
        h.note(&[later], t0);
        assert_eq!(h.fleet.keys().collect::<Vec<_>>(), [&b]);
        // the grant a replayed record restores still names its request and hosts
        let grant = approved_grant(&fleet(&a, t0), 1).unwrap();
        let origin = grant.fleet.unwrap();
        assert_eq!((origin.request, origin.hosts), (a, vec!["group:web".to_string()]));
    }

    fn facts(is_dir: bool, is_symlink: bool, uid: u32, mode: u32) -> DirFacts {
        DirFacts {
            is_dir,
            is_symlink,
            uid,
            mode,
        }
    }

    #[test]
    fn only_a_directory_of_jitds_own_uid_writable_by_it_alone_is_trusted() {
        assert_eq!(check_state_dir(facts(true, false, 990, 0o700), 990), Ok(()));
        assert_eq!(check_state_dir(facts(true, false, 990, 0o755), 990), Ok(()));
        assert_eq!(check_state_dir(facts(true, false, 990, 0o1700), 990), Ok(()));
        let refused = |f: DirFacts| check_state_dir(f, 990).unwrap_err();
        assert_eq!(
            refused(facts(true, false, 65534, 0o700)),
            "is owned by uid 65534 (owner uid 65534, mode 0700); it must be owned by the uid jitd runs as (990): fix with chown 990 and chmod 0700"
        );
        assert_eq!(
            refused(facts(true, false, 990, 0o777)),
            "is writable by its group (owner uid 990, mode 0777); it must be writable by its owner only: fix with chmod 0700"
        );
        assert!(refused(facts(true, false, 990, 0o702)).contains("writable by others"));
        assert!(refused(facts(false, true, 990, 0o777)).contains("symbolic link"));
        assert!(refused(facts(false, false, 990, 0o600)).contains("not a directory"));
    }

    #[test]
    fn a_missing_state_dir_is_created_0700_and_a_loose_one_is_refused_unchanged() {
        use std::os::unix::fs::PermissionsExt;
        let top = tempfile::tempdir().unwrap();
        let dir = top.path().join("a/state");
        prepare_state_dir(&dir).unwrap();
        assert_eq!(fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
        let err = prepare_state_dir(&dir).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("state_dir {}: is writable by its group", dir.display())),
            "{err}"
        );
        assert!(
            err.ends_with("jitd refuses to use it and changed nothing in it"),
            "{err}"
        );
        assert_eq!(
            fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o777,
            "unchanged"
        );
        let link = top.path().join("link");
        std::os::unix::fs::symlink(top.path(), &link).unwrap();
        let err = prepare_state_dir(&link).unwrap_err().to_string();
        assert!(err.contains("is a symbolic link"), "{err}");
    }

    #[test]
    fn links_in_state_dir_are_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::NamedTempFile::new().unwrap();
        fs::write(outside.path(), b"precious").unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join(GRANTS_FILE)).unwrap();
        let err = load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("grants.json: it is a symbolic link"), "{err}");
        // a link planted as the temporary file is removed, not written through
        fs::remove_file(dir.path().join(GRANTS_FILE)).unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join(".grants.json.tmp")).unwrap();
        save(dir.path(), &Snapshot::default()).unwrap();
        assert_eq!(fs::read(outside.path()).unwrap(), b"precious");
        assert_eq!(load(dir.path()).unwrap(), Snapshot::default());
        // and a link as grants.json is replaced by the new file, its target untouched
        fs::remove_file(dir.path().join(GRANTS_FILE)).unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join(GRANTS_FILE)).unwrap();
        save(dir.path(), &Snapshot::default()).unwrap();
        assert!(!fs::symlink_metadata(dir.path().join(GRANTS_FILE)).unwrap().is_symlink());
        assert_eq!(fs::read(outside.path()).unwrap(), b"precious");
    }

    #[test]
    fn a_corrupt_snapshot_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(GRANTS_FILE), b"{\"next_id\":").unwrap();
        let err = load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("grants.json"), "{err}");
    }
}
