//! Drift: how the kernel's copy of jitd's table differs from what jitd enforces (pure).
//!
//! The lockdown itself (chain, rules, `locked` and `exempt` sets) must match what jitd
//! applied byte for byte; any difference there, a missing table or an element jitd
//! cannot have written means the table is replaced whole. Grant elements are compared
//! one by one and only the wrong ones are fixed. Elements jitd changed itself while the
//! kernel was being read are left out; an element of a grant that just ended may linger
//! for the kernel's rounding and is not drift.

use std::collections::HashMap;

use tokio::time::Instant;

use super::commit::KERNEL_ROUNDING;
use super::State;
use crate::firewall::kernel::{describe, KernelTable};
use crate::firewall::rules::{GrantElement, GrantKey, TABLE};
use crate::grants::Touched;

/// The outcome of one drift check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checked {
    /// The kernel matched.
    Clean,
    /// The reading predates a change of jitd's own to the whole table: read again.
    Stale,
    /// Drift was found and repaired (what was found).
    Repaired(String),
    /// Drift was found and the repair failed.
    Failed(String),
}

/// What differs, and how to set it right.
#[derive(Debug, Default)]
pub struct Findings {
    /// The lockdown differs (or the table is gone): replace the table whole.
    pub structure: bool,
    /// Grant elements to delete.
    pub remove: Vec<GrantKey>,
    /// Grant elements to (re-)add.
    pub add: Vec<GrantElement>,
    /// One sentence per finding.
    pub notes: Vec<String>,
    /// The grant elements concerned.
    pub touched: Touched,
}

impl Findings {
    /// Whether nothing differs.
    pub fn is_empty(&self) -> bool {
        self.notes.is_empty()
    }

    /// The findings as one line for the log and the audit record.
    pub fn describe(&self) -> String {
        const SHOWN: usize = 10;
        let mut text = self.notes.iter().take(SHOWN).cloned().collect::<Vec<_>>().join("; ");
        if self.notes.len() > SHOWN {
            text.push_str(&format!("; and {} more", self.notes.len() - SHOWN));
        }
        text
    }
}

/// Compares the kernel's table, as read from `read_at` on, with the state, skipping the
/// elements in `skip`. Times left are compared as of `read_at` (the kernel's are from
/// its reading); elements put back get the time left as of `now`.
pub(super) fn compare(
    st: &State,
    table: Option<&KernelTable>,
    skip: &Touched,
    read_at: Instant,
    now: Instant,
) -> Findings {
    let mut f = Findings::default();
    let Some(table) = table else {
        f.structure = true;
        f.notes.push(format!("table inet {TABLE} is missing"));
        return f;
    };
    if table.fingerprint() != st.baseline {
        f.structure = true;
        f.notes
            .push("the lockdown (chain, rules, locked or exempt sets) differs from what jitd applied".into());
    }
    let (held, foreign) = table.grants();
    if !foreign.is_empty() {
        f.structure = true;
        f.notes
            .extend(foreign.into_iter().map(|x| format!("unexpected element in {x}")));
    }
    let expected: HashMap<GrantKey, Instant> = st.book.elements(read_at).into_iter().collect();
    for (key, left) in held.iter().filter(|(k, _)| !skip.covers(k)) {
        match expected.get(key) {
            None if *left <= KERNEL_ROUNDING => {} // a grant that just ended
            None => {
                f.notes
                    .push(format!("element {} with no grant behind it", describe(key)));
                f.remove.push(*key);
                f.touched.add_key(key);
            }
            Some(deadline) if *left > deadline.saturating_duration_since(read_at) + KERNEL_ROUNDING => {
                f.notes.push(format!(
                    "element {} lasts {}s, its grant only {}s",
                    describe(key),
                    left.as_secs(),
                    deadline.saturating_duration_since(read_at).as_secs()
                ));
                f.remove.push(*key);
                f.add.push(GrantElement {
                    key: *key,
                    timeout: deadline.saturating_duration_since(now),
                });
                f.touched.add_key(key);
            }
            Some(_) => {}
        }
    }
    for (key, deadline) in expected.iter().filter(|(k, _)| !skip.covers(k)) {
        let want = deadline.saturating_duration_since(read_at);
        if want > KERNEL_ROUNDING && !held.contains_key(key) {
            f.notes.push(format!("grant element {} is missing", describe(key)));
            f.add.push(GrantElement {
                key: *key,
                timeout: deadline.saturating_duration_since(now),
            });
            f.touched.add_key(key);
        }
    }
    f.notes.sort();
    f
}
