//! Was the access used: the kernel's per-element counters read into the ledger
//! ([`crate::grants::usage::Ledger`]) at the moments that keep its credit right.
//!
//! - every drift check (every 10 s) reads every element ([`State::credit_reading`]);
//! - a transaction that deletes elements or changes who covers them reads those first,
//!   and credits the grants that covered them before it ([`Daemon::credit_before`]);
//! - expiry reads the elements of the grants that end within [`EXPIRY_READ_AHEAD`]
//!   ahead of time, and again when they end ([`Daemon::sample_expiring`]): the kernel
//!   drops an element at its timeout, about when jitd's expiry runs, and its counter
//!   with it;
//! - a reload, and a stop that removes the table, read every element first
//!   ([`Daemon::credit_all`]);
//! - start-up credits the counters of a table that survived from the checkpoint's
//!   ledger on (`start.rs`).
//!
//! The record of a grant's end carries what it was credited (`connections`), and says
//! "granted, never used" when that is none ([`State::ledger_note`]).

use std::time::Duration;

use chrono::Utc;
use tokio::time::Instant;

use super::tx::{KernelChange, Undo};
use super::{Daemon, State};
use crate::audit::AuditRecord;
use crate::domain::{GrantId, GrantKey};
use crate::firewall::Firewall;
use crate::grants::{usage, Touched};

/// How long before a grant's end jitd reads its elements' counters: the kernel drops
/// an element (and its counter) at its timeout, which may come a moment before jitd's
/// expiry runs. Connections in this last stretch are counted only when the element
/// is still there at the expiry.
pub const EXPIRY_READ_AHEAD: Duration = Duration::from_secs(1);

/// What a grant's end record appends to its reason when it admitted nothing.
pub const NEVER_USED: &str = "granted, never used";
/// ... when the counters could not be read (the count is left out).
const UNREAD: &str = "connections not counted: the kernel's counters could not be read";
/// ... when it shared a wider grant's element that counted connections.
const SHARED: &str = "connections not counted: a wider grant's set element carried it, and counted connections of both";

impl State {
    /// Writes into the records that end a grant how many connections it admitted and
    /// returns their grant ids. When the counters could not be read (`counted` false)
    /// the count is left out rather than shown too low.
    pub(super) fn ledger_note(&self, records: &mut [AuditRecord], counted: bool) -> Vec<GrantId> {
        note_records(&self.ledger, records, counted)
    }

    /// After a transaction took effect: the elements it added count from zero, and the
    /// grants it ended are on record.
    pub(super) fn ledger_applied(&mut self, kernel: &KernelChange, ended: &[GrantId]) {
        match kernel {
            KernelChange::None => {}
            KernelChange::Grants { remove, add, .. } => {
                for key in remove.iter().chain(add.iter().map(|e| &e.key)) {
                    self.ledger.fresh(key);
                }
            }
            KernelChange::Replace(..) | KernelChange::Remove => self.ledger.all_fresh(),
        }
        for id in ended {
            self.ledger.forget(*id);
        }
    }

    /// Credits a reading of `counts` (the elements that counted anything, as the kernel
    /// held them) to the live grants covering each, leaving out the elements in `skip`
    /// (jitd changed or read them since the reading began); forgets the last counts of
    /// the other elements (gone, or added afresh behind jitd's back).
    pub(super) fn credit_reading(&mut self, counts: &std::collections::HashMap<GrantKey, u64>, skip: &Touched) {
        for (key, n) in counts.iter().filter(|(k, _)| !skip.covers(k)) {
            if self.ledger.delta(key, *n) == 0 {
                continue; // as last read: nothing to credit
            }
            let (grants, hidden) = self.book.covering(key);
            self.ledger.observe(*key, *n, &grants, &hidden);
        }
        self.ledger
            .retain_elements(|k| counts.contains_key(k) || skip.covers(k));
        self.checkpoint_news();
    }

    /// Credits a reading of the elements `keys` (`counts`: those that counted
    /// anything), begun when transaction `settled` was the last one over, to the grants
    /// covering each; the elements jitd changed since are left out (all of them when
    /// that is not known). A wider reading begun before this one then leaves them out.
    pub(super) fn credit_elements(
        &mut self,
        keys: &[GrantKey],
        counts: std::collections::HashMap<GrantKey, u64>,
        settled: u64,
    ) {
        let skip = self.touched_since(settled);
        for (key, n) in counts {
            if skip.as_ref().is_none_or(|s| s.covers(&key)) {
                continue;
            }
            let (grants, hidden) = self.book.covering(&key);
            self.ledger.observe(key, n, &grants, &hidden);
        }
        let mut read = Touched::default();
        keys.iter().for_each(|k| read.add_key(k));
        self.note_read(read);
        self.checkpoint_news();
    }

    /// Asks for a checkpoint when a grant was used for the first time (see
    /// [`crate::grants::usage::Ledger::take_news`]).
    pub(super) fn checkpoint_news(&mut self) {
        if self.ledger.take_news() {
            self.dirty = true;
        }
    }
}

/// [`State::ledger_note`] on a ledger.
fn note_records(ledger: &crate::grants::usage::Ledger, records: &mut [AuditRecord], counted: bool) -> Vec<GrantId> {
    let mut ended = Vec::new();
    for r in records.iter_mut().filter(|r| r.ends_grant()) {
        let Some(id) = r.grant_id else { continue };
        ended.push(id);
        let note = match (counted, ledger.count(id)) {
            _ if ledger.is_unwatched(id) => Some(format!(
                "connections not counted: it ended while jitd was not running ({} counted before)",
                ledger.credited(id)
            )),
            (false, _) => Some(UNREAD.to_string()),
            (true, None) => Some(SHARED.to_string()),
            (true, Some(n)) => {
                r.connections = Some(n);
                (n == 0).then(|| NEVER_USED.to_string())
            }
        };
        if let Some(note) = note {
            r.reason = Some(match r.reason.take() {
                Some(why) if !why.is_empty() => format!("{why}; {note}"),
                _ => note.to_string(),
            });
        }
    }
    ended
}

impl<F: Firewall> Daemon<F> {
    /// Before a transaction is recorded: reads the elements its kernel change touches
    /// ([`Daemon::credit_before`]) and writes into the records that end grants what
    /// each admitted ([`State::ledger_note`]). Returns the ids of the grants it ends.
    pub(super) async fn count_ends(
        &self,
        kernel: &KernelChange,
        undo: &Undo,
        uncounted: bool,
        records: &mut [AuditRecord],
    ) -> Vec<GrantId> {
        let read = match kernel {
            KernelChange::Grants { read, .. } if !read.is_empty() => self.credit_before(read, undo).await,
            _ => true,
        };
        self.lock().ledger_note(records, read && !uncounted)
    }

    /// Reads the elements `read` before a transaction changes them, and credits each
    /// to the grants that covered it before the transaction: the live ones it did not
    /// add, and the ones it removed. Returns whether the counters could be read.
    pub(super) async fn credit_before(&self, read: &[GrantKey], undo: &Undo) -> bool {
        let counts = match self.firewall.read_counts(read.to_vec()).await {
            Ok(counts) => counts,
            Err(e) => {
                tracing::warn!("cannot read the grant counters before a change ({e}); the end records of this change leave their connections out");
                return false;
            }
        };
        let mut st = self.lock();
        for (key, n) in counts {
            let (mut grants, mut hidden) = st.book.covering(&key);
            grants.retain(|id| !undo.inserted.contains(id));
            hidden.retain(|id| !undo.inserted.contains(id));
            for (g, _) in &undo.removed {
                if usage::covers(g, &key) && !grants.contains(&g.id) {
                    grants.push(g.id);
                }
                if usage::hidden_in(g, &key) && !hidden.contains(&g.id) {
                    hidden.push(g.id);
                }
            }
            st.ledger.observe(key, n, &grants, &hidden);
        }
        st.checkpoint_news();
        true
    }

    /// Reads every live element and credits it (before a reload replaces the table, or
    /// a stop removes it). Returns whether the counters could be read.
    pub(super) async fn credit_all(&self) -> bool {
        let keys: Vec<GrantKey> = self
            .lock()
            .book
            .elements(Instant::now())
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        if keys.is_empty() {
            return true;
        }
        match self.firewall.read_counts(keys).await {
            Ok(counts) => {
                let mut st = self.lock();
                st.credit_reading(&counts, &Touched::default());
                st.ledger.counted(Utc::now());
                true
            }
            Err(e) => {
                tracing::warn!(
                    "cannot read the grant counters ({e}); connections since the last reading are not counted"
                );
                false
            }
        }
    }

    /// Reads the elements of the grants that end by `now` + [`EXPIRY_READ_AHEAD`], and
    /// credits them; then the next sample is due [`EXPIRY_READ_AHEAD`] before the next
    /// end after those. Returns whether the counters could be read.
    pub(super) async fn sample_expiring(&self, now: Instant) -> bool {
        let horizon = now + EXPIRY_READ_AHEAD;
        let (keys, settled) = {
            let mut st = self.lock();
            st.sampled_until = st.sampled_until.max(horizon);
            let due = st.book.due_by(horizon);
            (st.book.element_keys_of(&due), st.settled)
        };
        if keys.is_empty() {
            return true;
        }
        match self.firewall.read_counts(keys.clone()).await {
            Ok(counts) => {
                self.lock().credit_elements(&keys, counts, settled);
                true
            }
            Err(e) => {
                tracing::warn!("cannot read the counters of grants about to end ({e})");
                false
            }
        }
    }

    /// When the next expiry sample is due: [`EXPIRY_READ_AHEAD`] before the first end
    /// not sampled yet.
    pub(super) fn next_sample(st: &State) -> Option<Instant> {
        st.book
            .next_deadline_after(st.sampled_until)
            .map(|d| d.checked_sub(EXPIRY_READ_AHEAD).unwrap_or(d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::protocol::{Request, RevokeRequest};
    use crate::api::server::Handler;
    use crate::audit::Outcome;
    use crate::daemon::tests::{ask, daemon, records, root};
    use crate::firewall::kernel::KernelTable;
    use crate::firewall::netlink::RawElement;

    /// The kernel as the recording firewall shows it: 192.0.2.7 . tcp . 22 counting `n`.
    fn kernel_counts(d: &Daemon<crate::firewall::RecordingFirewall>, n: u64) {
        let element = RawElement {
            key: vec![192, 0, 2, 7, 6, 0, 0, 0, 0, 22, 0, 0],
            key_end: None,
            flags: 0,
            expires_ms: Some(600_000),
            packets: Some(n),
        };
        *d.firewall.table.lock().unwrap() = Some(KernelTable {
            objects: Vec::new(),
            elements: [("grants4".to_string(), vec![element])].into(),
        });
    }

    fn end_of(dir: &std::path::Path, id: GrantId) -> AuditRecord {
        records(dir)
            .into_iter()
            .find(|r| r.grant_id == Some(id) && r.ends_grant())
            .unwrap_or_else(|| panic!("no end record for grant {id}"))
    }

    /// A grant replaced by another for the same address gets what the shared element
    /// counted while it held it; the new one starts from nothing, and is credited from
    /// the re-added element on.
    #[tokio::test]
    async fn an_element_is_read_before_it_changes_hands() {
        let dir = tempfile::tempdir().unwrap();
        let d = daemon(dir.path()).await;
        assert!(d.handle(root(), ask(600)).await.ok);
        kernel_counts(&d, 2);
        assert!(d.handle(root(), ask(300)).await.ok, "supersedes grant 1");
        let first = end_of(dir.path(), 1);
        assert_eq!((first.outcome, first.connections), (Outcome::Superseded, Some(2)));
        assert_eq!(
            d.lock().ledger.count(2),
            Some(0),
            "not credited with grant 1's connections"
        );
        kernel_counts(&d, 1); // the element was re-added (its end moved) and counted one
        let revoke = Request::Revoke(RevokeRequest {
            id: Some(2),
            ..Default::default()
        });
        assert!(d.handle(root(), revoke).await.ok);
        let second = end_of(dir.path(), 2);
        assert_eq!(second.connections, Some(1));
        assert_eq!(second.reason.as_deref(), Some("revoked by root"));
        assert_eq!(d.lock().ledger.count(2), Some(0), "forgotten once on record");
    }

    #[test]
    fn end_records_say_never_used_or_leave_out_what_is_not_known() {
        let mut st_records = vec![
            AuditRecord::new(Utc::now(), None, "jitd", crate::audit::Action::Expire, Outcome::Expired),
            AuditRecord::new(
                Utc::now(),
                None,
                "jitd",
                crate::audit::Action::Request,
                Outcome::Approved,
            ),
        ];
        st_records[0].grant_id = Some(4);
        st_records[0].reason = Some("time is up".into());
        st_records[1].grant_id = Some(5);
        let mut ledger = crate::grants::usage::Ledger::default();
        let note = |ledger: &crate::grants::usage::Ledger, counted: bool| {
            let mut records = st_records.clone();
            let ended = note_records(ledger, &mut records, counted);
            (ended, records)
        };
        let (ended, r) = note(&ledger, true);
        assert_eq!(ended, vec![4], "only the end");
        assert_eq!(r[0].connections, Some(0));
        assert_eq!(r[0].reason.as_deref(), Some("time is up; granted, never used"));
        assert_eq!(r[1].connections, None, "an approval carries no count");
        let (_, r) = note(&ledger, false);
        assert_eq!(
            r[0].connections, None,
            "counters not read: no count rather than a wrong one"
        );
        assert!(r[0].reason.as_deref().unwrap().contains("could not be read"));
        let piece = GrantKey {
            source: "198.51.0.0/16".parse().unwrap(),
            transport: crate::domain::Transport::Tcp,
            port: 22,
        };
        ledger.observe(piece, 1, &[3], &[4]);
        let (_, r) = note(&ledger, true);
        assert_eq!(r[0].connections, None);
        assert!(
            r[0].reason.as_deref().unwrap().contains("wider grant"),
            "{:?}",
            r[0].reason
        );
        let mut ledger = crate::grants::usage::Ledger::default();
        ledger.unwatched(4);
        let (_, r) = note(&ledger, true);
        assert_eq!(
            r[0].connections, None,
            "not 0: what came while jitd was down is unknown"
        );
        assert_eq!(
            r[0].reason.as_deref(),
            Some("time is up; connections not counted: it ended while jitd was not running (0 counted before)")
        );
    }
}
