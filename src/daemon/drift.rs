//! Drift: how the kernel's copy of jitd's table differs from what jitd enforces (pure).
//!
//! The lockdown itself (chain, rules, `locked` and `exempt` sets) must match what jitd
//! applied byte for byte; any difference there, a missing table or an element jitd
//! cannot have written means the table is replaced whole. Grant elements are compared
//! one by one and only the wrong ones are fixed. Elements jitd changed itself while the
//! kernel was being read are left out; an element of a grant that just ended may linger
//! for the kernel's rounding and is not drift.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use tokio::time::Instant;

use super::tx::KERNEL_ROUNDING;
use super::State;
use crate::domain::{GrantElement, GrantKey};
use crate::firewall::kernel::{describe, KernelTable};
use crate::firewall::rules::TABLE;
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
    /// Drift that only closes access or changes nothing that matters was found while
    /// repairs back off, and left for the next check (what was found).
    Deferred(String),
}

/// How a check treats what it finds while another process keeps changing the table:
/// whether a repair that only closes access waits, and whether a repair gets an audit
/// record of its own (in a long streak, records coalesce; repairs never wait when the
/// change opens access).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pace {
    /// A repair that opens nothing is deferred.
    pub closing_waits: bool,
    /// The repair is recorded on its own.
    pub record: bool,
}

impl Pace {
    /// No back-off: every repair at once, each with its record.
    pub const AT_ONCE: Pace = Pace {
        closing_waits: false,
        record: true,
    };
}

/// Why the kernel was read and compared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DriftCause {
    /// The check every [`super::upkeep::RECONCILE_EVERY`].
    Periodic,
    /// Another process changed jitd's table (an nftables change event).
    ChangedBy {
        /// Its name as the kernel reported it; empty when unknown.
        process: String,
        /// Its process id.
        pid: u32,
    },
    /// A check while repairs keep being undone (checks back off): the cause, and the
    /// streak so far as people read it.
    Contested {
        /// What triggered this check.
        cause: Box<DriftCause>,
        /// `drift repaired N times in Ts, ...`.
        streak: String,
    },
}

impl fmt::Display for DriftCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DriftCause::Periodic => f.write_str("periodic check"),
            DriftCause::ChangedBy { process, pid } => {
                let process = if process.is_empty() { "?" } else { process };
                write!(f, "nftables changed by {process} (pid {pid})")
            }
            DriftCause::Contested { cause, streak } => write!(f, "{cause}; {streak}"),
        }
    }
}

/// One difference between the kernel's table and what jitd enforces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// jitd's table is not in the kernel.
    TableMissing,
    /// The chain, rules, `locked` or `exempt` sets differ from what jitd applied.
    LockdownDiffers,
    /// A grant set holds an element jitd cannot have written (set and key, as text).
    Unexpected(String),
    /// A grant element with no grant behind it.
    Orphan(GrantKey),
    /// A grant element that outlasts its grant.
    Outlasts {
        /// The element.
        key: GrantKey,
        /// What the kernel has left of it.
        left: Duration,
        /// What its grant has left.
        want: Duration,
    },
    /// A live grant's element is not in the kernel.
    ElementMissing(GrantKey),
}

impl Finding {
    /// Whether this needs the table replaced whole rather than elements fixed.
    pub fn needs_new_table(&self) -> bool {
        matches!(
            self,
            Finding::TableMissing | Finding::LockdownDiffers | Finding::Unexpected(_)
        )
    }

    /// Whether this may let in someone jitd did not grant (or for longer): a missing
    /// table, a changed lockdown (an accept rule, a flushed chain or lock set: jitd
    /// cannot tell a harmless change from one that opens a port, so it assumes the
    /// worst), an element that is not a grant's or outlasts it. Only a missing grant
    /// element closes access rather than opening it.
    pub fn opens_access(&self) -> bool {
        !matches!(self, Finding::ElementMissing(_))
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Finding::TableMissing => write!(f, "table inet {TABLE} is missing"),
            Finding::LockdownDiffers => {
                f.write_str("the lockdown (chain, rules, locked or exempt sets) differs from what jitd applied")
            }
            Finding::Unexpected(element) => write!(f, "unexpected element in {element}"),
            Finding::Orphan(key) => write!(f, "element {} with no grant behind it", describe(key)),
            Finding::Outlasts { key, left, want } => write!(
                f,
                "element {} lasts {}s, its grant only {}s",
                describe(key),
                left.as_secs(),
                want.as_secs()
            ),
            Finding::ElementMissing(key) => write!(f, "grant element {} is missing", describe(key)),
        }
    }
}

/// What differs, and how to set it right.
#[derive(Debug, Default)]
pub struct Findings {
    /// Grant elements to delete.
    pub remove: Vec<GrantKey>,
    /// Grant elements to (re-)add.
    pub add: Vec<GrantElement>,
    /// What was found, ordered by its description.
    pub found: Vec<Finding>,
    /// The grant elements concerned.
    pub touched: Touched,
}

impl Findings {
    /// Whether nothing differs.
    pub fn is_empty(&self) -> bool {
        self.found.is_empty()
    }

    /// Whether the lockdown differs (or the table is gone): replace the table whole.
    pub fn needs_new_table(&self) -> bool {
        self.found.iter().any(Finding::needs_new_table)
    }

    /// Whether anything found may let someone in ([`Finding::opens_access`]).
    pub fn opens_access(&self) -> bool {
        self.found.iter().any(Finding::opens_access)
    }

    /// The findings as one line for the log and the audit record.
    pub fn describe(&self) -> String {
        const SHOWN: usize = 10;
        let shown: Vec<String> = self.found.iter().take(SHOWN).map(Finding::to_string).collect();
        let mut text = shown.join("; ");
        if self.found.len() > SHOWN {
            text.push_str(&format!("; and {} more", self.found.len() - SHOWN));
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
        f.found.push(Finding::TableMissing);
        return f;
    };
    if table.fingerprint() != st.baseline {
        f.found.push(Finding::LockdownDiffers);
    }
    let (held, foreign) = table.grants();
    f.found.extend(foreign.into_iter().map(Finding::Unexpected));
    let expected: HashMap<GrantKey, Instant> = st.book.elements(read_at).into_iter().collect();
    for (key, left) in held.iter().filter(|(k, _)| !skip.covers(k)) {
        match expected.get(key) {
            None if *left <= KERNEL_ROUNDING => {} // a grant that just ended
            None => {
                f.found.push(Finding::Orphan(*key));
                f.remove.push(*key);
                f.touched.add_key(key);
            }
            Some(deadline) if *left > deadline.saturating_duration_since(read_at) + KERNEL_ROUNDING => {
                f.found.push(Finding::Outlasts {
                    key: *key,
                    left: *left,
                    want: deadline.saturating_duration_since(read_at),
                });
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
            f.found.push(Finding::ElementMissing(*key));
            f.add.push(GrantElement {
                key: *key,
                timeout: deadline.saturating_duration_since(now),
            });
            f.touched.add_key(key);
        }
    }
    f.found.sort_by_cached_key(Finding::to_string);
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{parse_prefix, Transport};

    #[test]
    fn causes_and_findings_read_as_before() {
        assert_eq!(DriftCause::Periodic.to_string(), "periodic check");
        let by = |process: &str| DriftCause::ChangedBy {
            process: process.into(),
            pid: 42,
        };
        assert_eq!(by("nft").to_string(), "nftables changed by nft (pid 42)");
        assert_eq!(by("").to_string(), "nftables changed by ? (pid 42)");
        let key = GrantKey {
            source: parse_prefix("192.0.2.7").unwrap(),
            transport: Transport::Tcp,
            port: 22,
        };
        let f = Findings {
            found: vec![
                Finding::ElementMissing(key),
                Finding::Outlasts {
                    key,
                    left: Duration::from_secs(90),
                    want: Duration::from_secs(30),
                },
            ],
            ..Findings::default()
        };
        assert!(!f.needs_new_table());
        assert_eq!(
            f.describe(),
            format!(
                "grant element {0} is missing; element {0} lasts 90s, its grant only 30s",
                describe(&key)
            )
        );
        assert!(Finding::Unexpected("grants4: key 00".into()).needs_new_table());
        assert!(
            !f.found[0].opens_access(),
            "a missing element locks out, an outlasting one..."
        );
        assert!(f.found[1].opens_access() && f.opens_access(), "...lets in for longer");
        assert!(Finding::LockdownDiffers.opens_access() && Finding::TableMissing.opens_access());
        assert_eq!(Finding::TableMissing.to_string(), "table inet jitd is missing");
    }
}
