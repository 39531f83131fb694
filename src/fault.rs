//! Fault injection for tests: `JITD_FAULTS=name[:trigger][,…]` makes the named fault
//! happen, always or (with `:trigger`, a file path) only while that file exists, so a
//! test decides when. Also test-only timing knobs (`JITD_RECONCILE_MS`). Only debug
//! builds read any of it; a release build never injects anything.
//!
//! The faults jitd knows:
//! - `committer-panic`: the committer panics at its next job;
//! - `writer-stall`: the audit writer holds each append (a stalled disk);
//! - `apply-stall`: a transaction is held after its audit record, before its nftables
//!   batch;
//! - `nft-refuse`: every nftables batch gets a command the kernel refuses, so the batch
//!   fails whole;
//! - `no-monitor`: the drift monitor does not listen to nftables events (only the
//!   periodic backstop checks);
//! - `audit-torn-batch`: the writer writes one record and half of the next of a
//!   multi-record transaction, then aborts jitd (a crash mid-write).

use std::path::PathBuf;
use std::time::Duration;

/// How often a held fault looks at its trigger file again.
const POLL: Duration = Duration::from_millis(20);

/// One entry of `JITD_FAULTS`: a fault's name and, optionally, the file that arms it.
#[cfg_attr(not(debug_assertions), allow(dead_code))]
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fault {
    name: String,
    trigger: Option<PathBuf>,
}

/// Reads `name[:trigger][,…]`; empty entries are ignored.
#[cfg_attr(not(debug_assertions), allow(dead_code))]
fn parse(spec: &str) -> Vec<Fault> {
    spec.split(',')
        .map(str::trim)
        .filter(|f| !f.is_empty())
        .map(|f| match f.split_once(':') {
            Some((name, trigger)) => Fault {
                name: name.to_string(),
                trigger: Some(PathBuf::from(trigger)),
            },
            None => Fault {
                name: f.to_string(),
                trigger: None,
            },
        })
        .collect()
}

#[cfg(debug_assertions)]
fn faults() -> &'static [Fault] {
    static FAULTS: std::sync::OnceLock<Vec<Fault>> = std::sync::OnceLock::new();
    FAULTS.get_or_init(|| parse(&std::env::var("JITD_FAULTS").unwrap_or_default()))
}

/// Whether the fault `name` was asked for and is armed now (its trigger file, if it
/// has one, exists).
pub fn injected(name: &str) -> bool {
    #[cfg(debug_assertions)]
    {
        faults()
            .iter()
            .any(|f| f.name == name && f.trigger.as_ref().is_none_or(|t| t.exists()))
    }
    #[cfg(not(debug_assertions))]
    {
        let _ = name;
        false
    }
}

/// Blocks the calling thread while the fault `name` is armed (for the writer thread).
pub fn hold(name: &str) {
    if !injected(name) {
        return;
    }
    tracing::warn!("injected fault {name}: holding");
    while injected(name) {
        std::thread::sleep(POLL);
    }
    tracing::warn!("injected fault {name}: released");
}

/// Waits while the fault `name` is armed (for async tasks).
pub async fn held(name: &str) {
    if !injected(name) {
        return;
    }
    tracing::warn!("injected fault {name}: holding");
    while injected(name) {
        tokio::time::sleep(POLL).await;
    }
    tracing::warn!("injected fault {name}: released");
}

/// `default`, or in debug builds the milliseconds in the environment variable `var`
/// (so that tests need not wait out production periods).
pub fn period(var: &str, default: Duration) -> Duration {
    #[cfg(debug_assertions)]
    {
        std::env::var(var)
            .ok()
            .and_then(|ms| ms.parse().ok())
            .filter(|ms| *ms > 0)
            .map_or(default, Duration::from_millis)
    }
    #[cfg(not(debug_assertions))]
    {
        let _ = var;
        default
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_with_and_without_trigger_files() {
        assert_eq!(
            parse("committer-panic, writer-stall:/run/t/stall,,"),
            vec![
                Fault {
                    name: "committer-panic".into(),
                    trigger: None
                },
                Fault {
                    name: "writer-stall".into(),
                    trigger: Some(PathBuf::from("/run/t/stall"))
                },
            ]
        );
        assert!(parse("").is_empty());
    }

    #[test]
    fn a_missing_or_bad_period_keeps_the_default() {
        let default = Duration::from_secs(10);
        assert_eq!(period("JITD_TEST_NO_SUCH_VARIABLE", default), default);
    }
}
