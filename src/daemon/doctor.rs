//! The doctor inside jitd: gathers the facts only jitd can see (its table and drift
//! monitor, the audit log, the whole ruleset, other users' listening processes), has
//! [`crate::health::judge`] judge them, and keeps the verdict for `status` and the
//! metrics. One run at a time. A caller gets a check made after it asked: callers who
//! ask during a run wait for it and share the next one, so many at once cost two runs;
//! only jitd's own run every [`RUN_EVERY`] takes a result up to [`REUSE_FOR`] old. The
//! audit chain is walked at most every [`VERIFY_EVERY`].

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::drift::Checked;
use super::upkeep::Stopping;
use super::Daemon;
use crate::api::protocol::Reply;
use crate::domain::Caller;
use crate::firewall::Firewall;
use crate::health::facts::{AuditState, DriftOutcome, DriftState, Facts, TableState, Verified};
use crate::health::probe;
use crate::health::report::{DoctorReport, HealthSummary};
use crate::policy::{self, Role};

/// How old a result jitd's own periodic run takes instead of running again.
pub const REUSE_FOR: Duration = Duration::from_secs(5);
/// How often jitd runs the doctor by itself (for `status` and the metrics).
pub const RUN_EVERY: Duration = Duration::from_secs(60);
/// How often the audit chain is walked again.
pub const VERIFY_EVERY: Duration = Duration::from_secs(600);
/// The longest the ruleset and the sockets may take to read.
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);

/// The doctor's state in the daemon.
pub struct HealthState {
    /// The last run (when it started and ended) and its result; held while a run is
    /// under way, so runs never overlap.
    last: tokio::sync::Mutex<Option<(Instant, Instant, Arc<DoctorReport>)>>,
    /// The verdict in short, for `status`.
    summary: Mutex<Option<HealthSummary>>,
    /// What the drift monitor did last.
    drift: Mutex<DriftWatch>,
    /// The last walk of the audit chain.
    verified: Mutex<Option<(Instant, Result<Verified, String>)>>,
    started: Instant,
}

impl Default for HealthState {
    fn default() -> HealthState {
        HealthState {
            last: tokio::sync::Mutex::new(None),
            summary: Mutex::new(None),
            drift: Mutex::new(DriftWatch::default()),
            verified: Mutex::new(None),
            started: Instant::now(),
        }
    }
}

/// The drift monitor's recent checks.
#[derive(Debug, Default)]
struct DriftWatch {
    last_check: Option<(Instant, DriftOutcome)>,
    last_repair: Option<(Instant, String)>,
    in_a_row: u32,
}

impl HealthState {
    /// Notes a finished drift check (called by the drift monitor).
    pub fn drift_checked(&self, checked: &Checked) {
        let Ok(mut d) = self.drift.lock() else { return };
        let now = Instant::now();
        let outcome = match checked {
            Checked::Stale | Checked::Deferred(_) => return,
            Checked::Clean => {
                d.in_a_row = 0;
                DriftOutcome::Clean
            }
            Checked::Repaired(what) => {
                d.in_a_row += 1;
                d.last_repair = Some((now, what.clone()));
                DriftOutcome::Repaired(what.clone())
            }
            Checked::Failed(what) => {
                d.in_a_row += 1;
                DriftOutcome::Failed(what.clone())
            }
        };
        d.last_check = Some((now, outcome));
    }

    /// The last verdict in short, if the doctor has run.
    pub fn summary(&self) -> Option<HealthSummary> {
        self.summary.lock().ok().and_then(|s| s.clone())
    }

    fn drift_state(&self) -> DriftState {
        let now = Instant::now();
        let every = crate::fault::period("JITD_RECONCILE_MS", super::upkeep::RECONCILE_EVERY);
        let d = self.drift.lock().expect("drift watch lock");
        DriftState {
            last_check: d.last_check.as_ref().map(|(t, o)| (now - *t, o.clone())),
            last_repair: d.last_repair.as_ref().map(|(t, w)| (now - *t, w.clone())),
            repairs_in_a_row: d.in_a_row,
            max_quiet: every * 3 + super::upkeep::MAX_DELAY,
            uptime: now - self.started,
        }
    }
}

impl<F: Firewall> Daemon<F> {
    /// `doctor` for a caller with the viewer role (or more).
    pub(super) async fn doctor(&self, caller: &Caller) -> Result<DoctorReport, Reply> {
        {
            let st = self.lock();
            policy::require_role(&st.config.access, caller, Role::Viewer, "run the doctor")
                .map_err(|d| Reply::error(d.code, d.message))?;
        }
        let asked = Instant::now();
        let (report, shared) = self.run_doctor(asked).await;
        let mut report = (*report).clone();
        if shared {
            let age = chrono::Utc::now() - report.checked_at;
            report.shared_age_ms = Some(u64::try_from(age.num_milliseconds()).unwrap_or(0));
        }
        Ok(report)
    }

    /// The result of a run that started at `not_before` or later: the last one when it
    /// did (with `true`: shared), else a new run. Runs never overlap: a caller asking
    /// during a run waits for it, then takes the run the first of the waiters starts.
    /// A run starts no sooner after the last one ended than that one took, so callers
    /// asking one after the other keep the doctor busy at most half the time.
    pub(super) async fn run_doctor(&self, not_before: Instant) -> (Arc<DoctorReport>, bool) {
        let mut last = self.health.last.lock().await;
        if let Some((started, ended, report)) = last.as_ref() {
            if *started >= not_before {
                return (report.clone(), true);
            }
            tokio::time::sleep_until(*ended + (*ended - *started)).await;
        }
        let started = Instant::now();
        let facts = self.gather().await;
        let (checks, listeners, toml) = crate::health::judge::judge(&facts);
        let took = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let report = Arc::new(DoctorReport::new(checks, listeners, toml, chrono::Utc::now(), took));
        let summary = HealthSummary::from(&*report);
        crate::metrics::metrics().health(summary.healthy, summary.problems, summary.warnings);
        if let Ok(mut s) = self.health.summary.lock() {
            *s = Some(summary);
        }
        *last = Some((started, Instant::now(), report.clone()));
        (report, false)
    }

    async fn gather(&self) -> Facts {
        let config = self.config();
        let protected: Vec<_> = config.ports.iter().map(|p| (p.port, p.protocol)).collect();
        let (ruleset, listeners, families) = tokio::join!(
            tokio::time::timeout(PROBE_TIMEOUT, probe::nft::read_ruleset("nft")),
            tokio::time::timeout(
                PROBE_TIMEOUT,
                tokio::task::spawn_blocking(move || listening(&protected))
            ),
            tokio::time::timeout(PROBE_TIMEOUT, probe::host::families()),
        );
        let ports_listed = policy_lists_ports(&config.path);
        Facts {
            version: env!("CARGO_PKG_VERSION").into(),
            policy: config.path.clone(),
            ports: config.ports.iter().map(|p| (p.port, p.protocol)).collect(),
            policy_lists_ports: ports_listed.unwrap_or(true),
            table: self.table_state().await,
            drift: self.health.drift_state(),
            audit: self.audit_state(&config.state_dir).await,
            ruleset: ruleset.unwrap_or_else(|_| Err("reading it took too long".into())),
            listeners_left_out: match &listeners {
                Ok(Ok(Ok(kept))) => kept.left_out.clone(),
                _ => Default::default(),
            },
            listeners: match listeners {
                Ok(Ok(found)) => found.map(|kept| kept.found).map_err(|e| e.to_string()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("reading them took too long".into()),
            },
            families: families.ok().and_then(Result::ok).unwrap_or((true, true)),
            legacy_iptables: probe::host::legacy_iptables(),
        }
    }

    /// jitd's table against the lockdown it applied last (its baseline).
    async fn table_state(&self) -> TableState {
        for _ in 0..2 {
            let begun = self.lock().begun;
            let table = match self.firewall.read_table(false).await {
                Ok(table) => table,
                Err(e) => return TableState::Unreadable(e.to_string()),
            };
            let st = self.lock();
            if st.begun != begun || st.settled != st.begun {
                continue; // jitd changed it meanwhile: read again
            }
            return match table {
                None => TableState::Missing,
                Some(t) if t.fingerprint() == st.baseline => TableState::Matches,
                Some(_) => TableState::Differs,
            };
        }
        TableState::Changing
    }

    async fn audit_state(&self, dir: &std::path::Path) -> AuditState {
        let (free_bytes, read_only) = match nix::sys::statvfs::statvfs(dir) {
            Ok(s) => (
                Some(s.blocks_available().saturating_mul(s.fragment_size())),
                s.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY),
            ),
            Err(_) => (None, false),
        };
        let (verified, verify_error) = match self.verified(dir).await {
            Ok(v) => (Some(v), None),
            Err(e) => (None, Some(e)),
        };
        AuditState {
            dir: dir.to_path_buf(),
            write_error: self.writer.last_failure(),
            free_bytes,
            read_only,
            verified,
            verify_error,
        }
    }

    /// The last walk of the audit chain, walking it again when it is [`VERIFY_EVERY`] old.
    async fn verified(&self, dir: &std::path::Path) -> Result<Verified, String> {
        let cached = self.health.verified.lock().expect("verified lock").clone();
        let (at, result) = match cached {
            Some((at, result)) if at.elapsed() < VERIFY_EVERY => (at, result),
            _ => {
                let dir = dir.to_path_buf();
                let started = Instant::now();
                let walked = tokio::task::spawn_blocking(move || crate::audit::chain::verify_dir(&dir)).await;
                let result = match walked {
                    Ok(Ok(v)) => Ok(Verified {
                        ago: Duration::ZERO,
                        records: v.records,
                        broken: v
                            .broken
                            .map(|b| format!("{}:{} {}", b.file.display(), b.line, b.problem)),
                        took: started.elapsed(),
                    }),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                *self.health.verified.lock().expect("verified lock") = Some((started, result.clone()));
                (started, result)
            }
        };
        result.map(|v| Verified { ago: at.elapsed(), ..v })
    }
}

/// The listening sockets and who holds them (blocking: netlink, /proc, cgroups).
fn listening(protected: &[(u16, crate::domain::Protocol)]) -> std::io::Result<probe::sockets::Kept> {
    let mut kept = probe::sockets::listening(protected)?;
    probe::owners::identify(&mut kept.found);
    Ok(kept)
}

/// Whether the policy file lists `[[ports]]` itself; `None` when it cannot be read.
fn policy_lists_ports(path: &std::path::Path) -> Option<bool> {
    let text = std::fs::read_to_string(path).ok()?;
    let table: toml::Table = toml::from_str(&text).ok()?;
    Some(table.contains_key("ports"))
}

/// Runs the doctor every [`RUN_EVERY`], from start on, so that `status` and the
/// metrics always have a recent verdict.
pub async fn watch_health<F: Firewall>(daemon: Arc<Daemon<F>>, mut stopping: Stopping) -> Result<(), String> {
    let mut tick = tokio::time::interval(RUN_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut said = String::new();
    loop {
        tokio::select! {
            _ = stopping.wait_for(|s| *s) => return Ok(()),
            _ = tick.tick() => {}
        }
        tokio::select! {
            _ = stopping.wait_for(|s| *s) => return Ok(()),
            (report, _) = daemon.run_doctor(Instant::now().checked_sub(REUSE_FOR).unwrap_or_else(Instant::now)) => {
                // logged when the verdict changes, not every minute
                let line = HealthSummary::from(&*report).line();
                if line != said {
                    if report.healthy {
                        tracing::info!("health: {line}");
                    } else {
                        tracing::warn!("health: {line}");
                    }
                    said = line;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::server::{Handler, Peer};
    use crate::daemon::tests::{daemon, root};

    #[tokio::test]
    async fn a_caller_without_a_role_is_refused_before_anything_is_probed() {
        let dir = tempfile::tempdir().unwrap();
        let d = daemon(dir.path()).await;
        let nobody = Peer {
            uid: 65534,
            gid: 65534,
            pid: None,
        };
        let reply = d.handle(nobody, crate::api::protocol::Request::Doctor).await;
        assert_eq!(reply.error.unwrap().code, crate::domain::ErrorCode::NotAuthorized);
        assert!(d.health.last.lock().await.is_none(), "no run was made for it");
        assert!(d.health.summary().is_none());
    }

    /// A caller gets a check made after it asked; callers asking together share one.
    #[tokio::test]
    async fn each_caller_gets_a_check_made_after_it_asked_and_concurrent_callers_share_one() {
        let dir = tempfile::tempdir().unwrap();
        let d = daemon(dir.path()).await;
        let ask = || d.handle(root(), crate::api::protocol::Request::Doctor);
        let first = ask().await;
        let second = ask().await;
        let checked = |r: &crate::api::protocol::Reply| -> (String, Option<u64>) {
            let report: DoctorReport = serde_json::from_value(r.result.clone().unwrap()).unwrap();
            (report.checked_at.to_rfc3339(), report.shared_age_ms)
        };
        let (one, two) = (checked(&first), checked(&second));
        assert!(one.1.is_none() && two.1.is_none(), "not shared");
        assert_ne!(
            one.0, two.0,
            "the second caller got a check of its own, not the first's"
        );
        let together = futures::future::join_all((0..8).map(|_| ask())).await;
        let runs: std::collections::BTreeSet<String> = together.iter().map(|r| checked(r).0).collect();
        assert!(runs.len() <= 2, "8 callers at once: {} runs", runs.len());
        assert!(
            together.iter().any(|r| checked(r).1.is_some()),
            "some were shared, and say so"
        );
    }

    #[test]
    fn repairs_in_a_row_count_until_a_clean_check() {
        let h = HealthState::default();
        for _ in 0..5 {
            h.drift_checked(&Checked::Repaired("table inet jitd is missing".into()));
        }
        h.drift_checked(&Checked::Stale);
        let s = h.drift_state();
        assert_eq!(s.repairs_in_a_row, 5);
        assert_eq!(s.last_repair.unwrap().1, "table inet jitd is missing");
        h.drift_checked(&Checked::Clean);
        let s = h.drift_state();
        assert_eq!((s.repairs_in_a_row, s.last_check.unwrap().1), (0, DriftOutcome::Clean));
        assert!(s.last_repair.is_some(), "the last repair is still reported");
    }

    #[test]
    fn the_policy_file_says_whether_it_lists_ports() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jitd.toml");
        std::fs::write(&path, "socket = \"/run/x\"\n").unwrap();
        assert_eq!(policy_lists_ports(&path), Some(false));
        std::fs::write(&path, "[[ports]]\nport = 22\n").unwrap();
        assert_eq!(policy_lists_ports(&path), Some(true));
        assert_eq!(policy_lists_ports(&dir.path().join("missing")), None);
    }
}
