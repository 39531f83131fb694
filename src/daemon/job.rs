//! The committer's queue: every change is a [`Job`], run one at a time
//! ([`super::commit`]); the payloads of the changes that are not transactions yet (an
//! approver's [`Decision`], a drift reading to compare).

use tokio::sync::oneshot;

use super::tx::Pending;
use crate::api::protocol::{ReloadReply, Reply, RevokeRequest};
use crate::approval::Verb;
use crate::audit::{Action, AuditRecord};
use crate::config::Config;
use crate::domain::{Caller, GrantId};
use crate::firewall::kernel::KernelTable;

/// What the kernel saw at a drift check, and how settled jitd's own changes were when
/// the reading began.
pub(super) struct Observed {
    pub table: Option<KernelTable>,
    pub settled: u64,
    /// When the reading began: the kernel's time left on each element is compared with
    /// the grants' time left at this moment, not when the committer gets to it (at
    /// 100,000 elements on a busy host that can be seconds later).
    pub read_at: tokio::time::Instant,
}

/// A change (or a question) for the committer.
pub(super) enum Job {
    Request(Pending),
    Revoke(Caller, RevokeRequest, oneshot::Sender<Reply>),
    Reload(Box<Config>, Caller, oneshot::Sender<Result<ReloadReply, Reply>>),
    Repair(
        super::drift::DriftCause,
        Observed,
        super::drift::Pace,
        oneshot::Sender<super::drift::Checked>,
    ),
    Expire,
    /// An approver's decision on a request waiting for approval.
    Decide(Caller, super::job::Decision, oneshot::Sender<Reply>),
    Checkpoint,
    /// Records that change nothing else (a wall-clock jump).
    Record(Vec<AuditRecord>),
    Stop(oneshot::Sender<()>),
}

/// What an approver decided about a pending request, from a process with login uid
/// `login`.
#[derive(Debug, Clone)]
pub(super) struct Decision {
    /// The waiting request's id.
    pub id: GrantId,
    /// Approve or deny.
    pub verb: Verb,
    /// A denial's reason.
    pub reason: String,
    /// The login uid of the process that decided.
    pub login: Option<u32>,
}

impl Decision {
    /// Approve request `id`.
    pub fn approve(id: GrantId, login: Option<u32>) -> Decision {
        Decision {
            id,
            verb: Verb::Approve,
            reason: String::new(),
            login,
        }
    }

    /// Turn request `id` down for `reason`.
    pub fn deny(id: GrantId, reason: String, login: Option<u32>) -> Decision {
        Decision {
            id,
            verb: Verb::Deny,
            reason,
            login,
        }
    }

    /// The audit action of this decision.
    pub fn action(&self) -> Action {
        match self.verb {
            Verb::Approve => Action::Approve,
            Verb::Deny => Action::Deny,
        }
    }
}
