//! Would a grant let a connection through? The rest of the host's nftables ruleset,
//! judged for a new connection to a protected port (pure: the listing is read by
//! [`crate::health::probe`]).
//!
//! nftables' semantics, as the kernel applies them: every base chain on a hook sees
//! the packet, whatever table it is in, in priority order. `accept` ends only the
//! chain it is in (the packet goes on to the next base chain, jitd's among them);
//! `drop` or `reject` anywhere ends the packet. A chain that falls off its end applies
//! its policy. So a port is reachable only if *every* base chain on the prerouting,
//! input and ingress hooks lets the packet pass.
//!
//! The packet judged (a [`Probe`]): a new connection (a TCP SYN, or the first UDP
//! datagram) from a remote unicast address, on a physical interface, to a local
//! unicast address of the host, IPv4 or IPv6. Whatever a match asks beyond that (the
//! source address, the interface's name, a mark, a rate limit) is unknown: the rule
//! may or may not apply ([`Tri::Maybe`]). A chain is then walked twice: once assuming
//! every unknown match fails (the *typical* source, in no list), and once to see
//! whether any path accepts at all. [`judge`] combines both for each base chain.

mod matches;
pub mod model;
pub mod text;
mod walk;
pub mod xt;

use serde::{Deserialize, Serialize};

pub use model::{ChainId, Ruleset};

use crate::domain::Transport;

/// The table jitd owns, left out of the analysis.
const OWN_TABLE: (&str, &str) = ("inet", crate::firewall::rules::TABLE);

/// A new connection to a protected port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Probe {
    /// IPv6 rather than IPv4.
    pub v6: bool,
    /// TCP or UDP.
    pub transport: Transport,
    /// The destination port.
    pub port: u16,
}

impl Probe {
    /// The IP protocol number of the transport.
    pub fn transport_number(&self) -> u16 {
        match self.transport {
            Transport::Tcp => 6,
            Transport::Udp => 17,
        }
    }

    /// `22/tcp over IPv4`.
    pub fn describe(&self) -> String {
        format!(
            "{}/{} over {}",
            self.port,
            self.transport.name(),
            if self.v6 { "IPv6" } else { "IPv4" }
        )
    }
}

/// Whether a match holds for the probe: surely, surely not, or it depends on what the
/// probe leaves unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tri {
    /// It holds.
    Yes,
    /// It does not.
    No,
    /// It depends (source address, interface, rate, ...).
    Maybe,
}

impl From<bool> for Tri {
    fn from(b: bool) -> Tri {
        if b {
            Tri::Yes
        } else {
            Tri::No
        }
    }
}

impl Tri {
    /// Both hold.
    pub fn and(self, other: Tri) -> Tri {
        match (self, other) {
            (Tri::No, _) | (_, Tri::No) => Tri::No,
            (Tri::Yes, Tri::Yes) => Tri::Yes,
            _ => Tri::Maybe,
        }
    }

    /// Either holds.
    pub fn or(self, other: Tri) -> Tri {
        !(!self).and(!other)
    }
}

impl std::ops::Not for Tri {
    type Output = Tri;

    fn not(self) -> Tri {
        match self {
            Tri::Yes => Tri::No,
            Tri::No => Tri::Yes,
            Tri::Maybe => Tri::Maybe,
        }
    }
}

/// Where a verdict was reached: a rule (with its handle and its text) or a chain's policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Place {
    /// The chain.
    pub family: String,
    /// Its table.
    pub table: String,
    /// Its name.
    pub chain: String,
    /// The rule's handle; `None` for the chain's policy.
    pub handle: Option<u64>,
    /// The rule as nft would print it (approximately), or `policy drop`.
    pub rule: String,
}

impl std::fmt::Display for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "table {} {} chain {}", self.family, self.table, self.chain)?;
        match self.handle {
            Some(h) => write!(f, " rule handle {h} ({})", self.rule),
            None => write!(f, " ({})", self.rule),
        }
    }
}

/// What one base chain does to the probe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ChainVerdict {
    /// Every path drops it: a grant cannot help.
    Blocked {
        /// Where the typical packet is dropped.
        at: Place,
    },
    /// The typical packet is dropped, but some sources (or interfaces, ...) are let through.
    Restricted {
        /// Where the typical packet is dropped.
        at: Place,
        /// The first rule that accepts it on some condition.
        unless: Place,
    },
    /// A DNAT rule sends the connection elsewhere (a container, another host): it
    /// never reaches the input hook, so jitd's lockdown does not apply to it.
    Forwarded {
        /// The rule.
        at: Place,
        /// Whether every such connection is forwarded (else only some).
        always: bool,
    },
    /// The chain was too large or deep to judge within the budget.
    Unknown {
        /// The chain.
        chain: String,
    },
}

/// Every base chain that stands in the probe's way, in a stable order. An empty list:
/// nothing outside jitd's own table stops a granted connection.
pub fn judge(ruleset: &Ruleset, probe: &Probe) -> Vec<ChainVerdict> {
    let mut found = Vec::new();
    for (id, chain, base) in ruleset.base_chains() {
        if (id.family.as_str(), id.table.as_str()) == OWN_TABLE || !sees(&id.family, probe) {
            continue;
        }
        let verdict = match (base.kind.as_str(), base.hook.as_str()) {
            ("filter", "input" | "prerouting" | "ingress") => walk::filter_chain(ruleset, id, chain, base, probe),
            ("nat", "prerouting") => walk::nat_chain(ruleset, id, chain, probe),
            _ => None,
        };
        found.extend(verdict);
    }
    found
}

/// Whether chains of `family` see the probe's packets.
fn sees(family: &str, probe: &Probe) -> bool {
    match family {
        "ip" => !probe.v6,
        "ip6" => probe.v6,
        "inet" | "netdev" => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests;
