//! The doctor inside jitd: gathers the facts only jitd can see (its table and drift
//! monitor, the audit log, the whole ruleset, other users' listening processes), has
//! [`crate::health::judge`] judge them, and keeps the verdict for `status` and the
//! metrics. One run at a time; a result is reused for [`REUSE_FOR`], so callers
//! cannot make jitd work harder than one run every few seconds; the audit chain is
//! walked at most every [`VERIFY_EVERY`]. A run every [`RUN_EVERY`] keeps the verdict fresh.

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

/// How long a result is reused.
pub const REUSE_FOR: Duration = Duration::from_secs(5);
/// How often jitd runs the doctor by itself (for `status` and the metrics).
pub const RUN_EVERY: Duration = Duration::from_secs(60);
/// How often the audit chain is walked again.
pub const VERIFY_EVERY: Duration = Duration::from_secs(600);
/// The longest the ruleset and the sockets may take to read.
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);

/// The doctor's state in the daemon.
pub struct HealthState {
    /// The last result; held while a run is under way, so runs never overlap.
    last: tokio::sync::Mutex<Option<(Instant, Arc<DoctorReport>)>>,
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
        let every = super::fault::period("JITD_RECONCILE_MS", super::upkeep::RECONCILE_EVERY);
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
        Ok((*self.run_doctor().await).clone())
    }

    /// The doctor's result, fresh or at most [`REUSE_FOR`] old. Runs never overlap:
    /// callers during a run wait for it and share its result.
    pub(super) async fn run_doctor(&self) -> Arc<DoctorReport> {
        let mut last = self.health.last.lock().await;
        if let Some((at, report)) = last.as_ref() {
            if at.elapsed() < REUSE_FOR {
                return report.clone();
            }
        }
        let started = Instant::now();
        let facts = self.gather().await;
        let (checks, listeners, toml) = crate::health::judge::judge(&facts);
        let took = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let report = Arc::new(DoctorReport::new(checks, listeners, toml, chrono::Utc::now(), took));
        let summary = HealthSummary::from(&*report);
        crate::metrics::metrics().health(&summary);
        if let Ok(mut s) = self.health.summary.lock() {
            *s = Some(summary);
        }
        *last = Some((Instant::now(), report.clone()));
        report
    }

    async fn gather(&self) -> Facts {
        let config = self.config();
        let (ruleset, listeners, families) = tokio::join!(
            tokio::time::timeout(PROBE_TIMEOUT, probe::nft::read_ruleset("nft")),
            tokio::time::timeout(PROBE_TIMEOUT, tokio::task::spawn_blocking(listening)),
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
            listeners: match listeners {
                Ok(Ok(found)) => found.map_err(|e| e.to_string()),
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
fn listening() -> std::io::Result<Vec<crate::health::listeners::Listener>> {
    let mut found = probe::sockets::listening()?;
    probe::owners::identify(&mut found);
    Ok(found)
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
            report = daemon.run_doctor() => {
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
    use crate::daemon::tests::daemon;

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
