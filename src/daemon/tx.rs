//! A transaction, what every change becomes before the committer runs it: its audit
//! records, its one nftables change, its footprint in the kernel, and how to undo the
//! booking should it fail. A leaf: the change handlers build these, the committer
//! ([`super::commit`]) runs them.

use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::State;
use crate::api::protocol::Reply;
use crate::audit::{AuditError, AuditRecord};
use crate::config::Config;
use crate::domain::{Caller, GrantElement, GrantId, GrantKey, Protocol};
use crate::firewall::rules::LockdownSpec;
use crate::firewall::FirewallError;
use crate::grants::{self, Grant, GrantBook, Placed, Touched};
use ipnet::IpNet;

/// A request waiting for the committer.
pub(super) struct Pending {
    pub caller: Caller,
    /// The login uid of the process that asked, when known.
    pub login: Option<u32>,
    pub request: crate::api::protocol::GrantRequest,
    pub reply: oneshot::Sender<Reply>,
}

/// The kernel side of a transaction.
pub(super) enum KernelChange {
    None,
    Grants {
        remove: Vec<GrantKey>,
        add: Vec<GrantElement>,
        /// Elements whose counters are read before the change: those it deletes or
        /// whose grants it changes ([`super::usage`]).
        read: Vec<GrantKey>,
    },
    Replace(LockdownSpec, Vec<GrantElement>),
    Remove,
}

/// How to put the book (and policy) back when a transaction fails.
#[derive(Default)]
pub(super) struct Undo {
    pub inserted: Vec<GrantId>,
    pub removed: Vec<(Grant, Instant)>,
    pub config: Option<Box<Config>>,
    /// Requests booked as waiting for approval, and those taken out (decided).
    pub pending_added: Vec<GrantId>,
    pub pending_removed: Vec<(crate::approval::PendingRequest, Instant)>,
}

impl Undo {
    /// Takes the booking back out of the state (the transaction failed).
    pub(super) fn apply(self, st: &mut State) {
        for id in self.inserted.iter().rev() {
            st.book.remove(*id);
        }
        for (grant, deadline) in self.removed.into_iter().rev() {
            if !self.inserted.contains(&grant.id) {
                // a grant changed in place (clamped) is put back as it was
                st.book.remove(grant.id);
                st.book.restore(grant, deadline);
            }
        }
        if let Some(config) = self.config {
            st.config = *config;
        }
        for id in self.pending_added {
            st.pending.remove(id);
        }
        for (request, deadline) in self.pending_removed {
            st.pending.insert(request, deadline);
        }
    }
}

/// The kernel elements a transaction touches, as they were before it.
#[derive(Default)]
pub(super) struct Footprint {
    touched: Touched,
    before: Vec<Placed>,
    /// The elements of every grant touched (begun, ended or replaced), as keys.
    slots: Vec<GrantKey>,
}

impl Footprint {
    /// Notes `grant`'s elements, remembering their state before the first change.
    pub fn touch(&mut self, book: &GrantBook, grant: &Grant, now: Instant) {
        self.touch_slot(book, grant.source, grant.port, grant.protocol, now);
    }

    /// Like [`Footprint::touch`], for a grant about to be booked.
    pub fn touch_slot(&mut self, book: &GrantBook, source: IpNet, port: u16, protocol: Protocol, now: Instant) {
        let mut mine = Touched::default();
        mine.add_slot(source, port, protocol);
        self.slots
            .extend(protocol.transports().iter().map(|&transport| GrantKey {
                source,
                transport,
                port,
            }));
        let fresh = mine.minus(&self.touched);
        if fresh.is_empty() {
            return;
        }
        self.before.extend(book.elements_of(&fresh, now));
        self.touched.merge(&fresh);
    }

    /// The kernel change from before the transaction to the book as it is now.
    pub fn change(&self, book: &GrantBook, now: Instant) -> KernelChange {
        let after = book.elements_of(&self.touched, now);
        let (remove, add) = grants::element_change(&self.before, &after, now);
        let read = self.to_read();
        if remove.is_empty() && add.is_empty() && read.is_empty() {
            KernelChange::None
        } else {
            KernelChange::Grants { remove, add, read }
        }
    }

    /// The elements that were there before whose grants the transaction may change:
    /// those of the touched grants' own keys, or pieces overlapping their prefixes.
    fn to_read(&self) -> Vec<GrantKey> {
        let mut read: Vec<GrantKey> = self
            .before
            .iter()
            .map(|(key, _)| *key)
            .filter(|key| {
                self.slots.iter().any(|s| {
                    (s.port, s.transport) == (key.port, key.transport)
                        && (s.source.contains(&key.source) || key.source.contains(&s.source))
                })
            })
            .collect();
        read.sort();
        read.dedup();
        read
    }

    /// What was touched.
    pub fn into_touched(self) -> Touched {
        self.touched
    }
}

/// One transaction, decided and booked, not yet audited or applied.
pub(super) struct Tx {
    pub records: Vec<AuditRecord>,
    pub kernel: KernelChange,
    pub undo: Undo,
    /// Written (with the error appended to each reason) when the kernel refuses.
    pub failed: Vec<AuditRecord>,
    pub touched: Touched,
    /// The counters of the grants it ends could not be read: their records leave the
    /// connections out.
    pub uncounted: bool,
    /// Applied first, recorded after: a repair, which puts the kernel back to what the
    /// log already says, must not wait for the disk (nor for a checkpoint being written
    /// ahead of its record) while a port may stand open.
    pub record_after: bool,
}

impl Tx {
    /// A transaction that only records.
    pub fn records(records: Vec<AuditRecord>) -> Tx {
        Tx {
            records,
            kernel: KernelChange::None,
            undo: Undo::default(),
            failed: Vec::new(),
            touched: Touched::default(),
            uncounted: false,
            record_after: false,
        }
    }

    /// A transaction that changes the kernel but not the book: its records, the
    /// change, and what to record (`failed`) when nftables refuses it.
    pub fn kernel_only(records: Vec<AuditRecord>, kernel: KernelChange, failed: AuditRecord) -> Tx {
        Tx {
            records,
            kernel,
            undo: Undo::default(),
            failed: vec![failed],
            touched: Touched::default(),
            uncounted: false,
            record_after: false,
        }
    }
}

/// Why a transaction did not take effect; nothing of it did.
#[derive(Debug, thiserror::Error)]
pub(super) enum TxError {
    #[error("{0}")]
    Audit(#[from] AuditError),
    #[error("{0}")]
    Firewall(#[from] FirewallError),
}

/// How long elements of grants that just ended may linger in the kernel (its timeouts
/// are whole seconds, rounded up).
pub const KERNEL_ROUNDING: Duration = Duration::from_millis(1500);
