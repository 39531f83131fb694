//! Is this host healthy? `jitctl doctor`'s judgement and the probes that gather its
//! facts. The pure part: [`ruleset`] (would another table drop a granted
//! connection?), [`listeners`] and [`catalog`] (what listens, and is it a service
//! worth protecting?), [`judge`] (facts to checks) and [`report`] (the answer). The
//! effects: [`probe`] (nft, sock_diag, /proc, cgroups). jitd gathers the facts itself,
//! on request and every minute (`daemon/doctor.rs`), since reading the ruleset and
//! other users' processes needs its privileges; docs/doctor.md describes the checks.

pub mod catalog;
pub mod facts;
pub mod judge;
mod judge_audit;
pub mod listeners;
pub mod probe;
mod reach_text;
pub(crate) mod recommend;
pub mod report;
pub mod ruleset;

#[cfg(test)]
mod tests;
