//! What the doctor gathered, as plain values for [`super::judge`]: the daemon's own
//! state (its table, the drift monitor, the audit log) and the host's (the rest of the
//! ruleset, the listening sockets, its addresses).

use std::path::PathBuf;
use std::time::Duration;

use crate::domain::Protocol;
use crate::health::listeners::{LeftOut, Listener};
use crate::health::ruleset::Ruleset;

/// Everything one doctor run looked at.
#[derive(Debug, Clone)]
pub struct Facts {
    /// jitd's version.
    pub version: String,
    /// The policy file.
    pub policy: PathBuf,
    /// The protected ports.
    pub ports: Vec<(u16, Protocol)>,
    /// Whether the policy file lists `[[ports]]` itself (else jitd protects its
    /// defaults, and the first entry added replaces them).
    pub policy_lists_ports: bool,
    /// jitd's table in the kernel.
    pub table: TableState,
    /// The drift monitor.
    pub drift: DriftState,
    /// The audit log.
    pub audit: AuditState,
    /// The rest of the ruleset, or why it could not be read.
    pub ruleset: Result<Ruleset, String>,
    /// The listening sockets, or why they could not be read.
    pub listeners: Result<Vec<Listener>, String>,
    /// The listening sockets left out (over the caps of one read).
    pub listeners_left_out: LeftOut,
    /// Whether the host has an IPv4, an IPv6 address others can reach (not loopback,
    /// not link-local); both when unknown.
    pub families: (bool, bool),
    /// Tables of the legacy iptables (x_tables), whose rules nftables cannot show.
    pub legacy_iptables: Vec<String>,
}

/// jitd's table as the doctor found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TableState {
    /// In the kernel, its lockdown exactly as jitd applied it.
    Matches,
    /// Not in the kernel.
    Missing,
    /// In the kernel, its chain, rules or lockdown sets changed.
    Differs,
    /// jitd was changing it while the doctor read it.
    Changing,
    /// It could not be read.
    Unreadable(String),
}

/// How the last drift check came out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DriftOutcome {
    /// The kernel matched.
    Clean,
    /// Drift was found and repaired (what).
    Repaired(String),
    /// Drift was found (or the kernel could not be read) and not repaired.
    Failed(String),
}

/// The drift monitor as the daemon saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriftState {
    /// The last finished check: how long ago, and its outcome.
    pub last_check: Option<(Duration, DriftOutcome)>,
    /// The last repair: how long ago, and what it found.
    pub last_repair: Option<(Duration, String)>,
    /// Repairs (or failed repairs) since the last clean check.
    pub repairs_in_a_row: u32,
    /// How long without a check is still normal (checks every few seconds, slower
    /// while repairs are being undone).
    pub max_quiet: Duration,
    /// How long jitd has been running.
    pub uptime: Duration,
}

/// The audit log as the daemon saw it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AuditState {
    /// The state directory.
    pub dir: PathBuf,
    /// Why the last write failed, if it did.
    pub write_error: Option<String>,
    /// Bytes free for jitd on the state directory's file system.
    pub free_bytes: Option<u64>,
    /// The state directory's file system is mounted read-only.
    pub read_only: bool,
    /// The last verification of the chain.
    pub verified: Option<Verified>,
    /// Why the chain could not be verified.
    pub verify_error: Option<String>,
}

/// One walk of the audit chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// How long ago it ran.
    pub ago: Duration,
    /// Records that verified.
    pub records: usize,
    /// Where it broke, as people read it.
    pub broken: Option<String>,
    /// How long it took.
    pub took: Duration,
}
