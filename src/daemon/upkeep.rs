//! Keeping the daemon's view and the kernel in line over time: expiry of grants, drift
//! detection and repair, policy reloads, and checkpoints of the grants.

use std::path::Path;
use std::sync::Arc;

use chrono::Utc;
use tokio::time::Instant;

use super::*;
use crate::firewall::monitor;

impl<F: Firewall> Daemon<F> {
    /// Compares the kernel's copy of the table with jitd's view and, when they differ,
    /// restores the lockdown and the live grants in one transaction and audits it.
    /// Returns what was found (empty when nothing had drifted).
    pub async fn reconcile(&self, cause: &str) -> Vec<String> {
        let mut st = self.state.lock().await;
        let table = match self.firewall.read_table(true).await {
            Ok(table) => table,
            Err(e) => {
                tracing::error!("cannot read the kernel's ruleset to check it: {e}");
                return Vec::new();
            }
        };
        let findings = drift_of(&st, table.as_ref());
        if !findings.is_empty() {
            self.repair(&mut st, cause, &findings).await;
        }
        findings
    }

    /// Like [`Daemon::reconcile`], but reads the kernel without holding up requests:
    /// if jitd changed anything meanwhile, this round is skipped (the next one checks).
    async fn reconcile_quietly(&self, cause: &str) {
        let generation = self.state.lock().await.generation;
        let table = match self.firewall.read_table(true).await {
            Ok(table) => table,
            Err(e) => {
                tracing::error!("cannot read the kernel's ruleset to check it: {e}");
                return;
            }
        };
        let mut st = self.state.lock().await;
        if st.generation != generation {
            tracing::debug!("grants changed while checking the kernel; checking again later");
            return;
        }
        let findings = drift_of(&st, table.as_ref());
        if !findings.is_empty() {
            self.repair(&mut st, cause, &findings).await;
        }
    }

    /// Restores the lockdown and the live grants in one transaction and audits it.
    async fn repair(&self, st: &mut State, cause: &str, findings: &[String]) {
        tracing::warn!("drift ({cause}): {}", findings.join("; "));
        let spec = LockdownSpec::from_config(&st.config);
        let mut record = AuditRecord::new(Utc::now(), None, "jitd", Action::Repair, Outcome::Repaired);
        match self
            .firewall
            .apply(&rules::replace_table(&spec, &st.book.elements(Instant::now())))
            .await
        {
            Ok(()) => {
                crate::metrics::metrics().drift_repairs.inc();
                record.reason = Some(format!("drift repaired ({cause}): {}", findings.join("; ")));
                match read_baseline(&self.firewall).await {
                    Ok(b) => st.baseline = b,
                    Err(e) => tracing::error!("cannot read back the repaired table: {e}"),
                }
            }
            Err(e) => {
                tracing::error!("repairing the drift failed: {e}");
                record.outcome = Outcome::Failed;
                record.reason = Some(format!(
                    "drift found ({cause}) but not repaired: {e}: {}",
                    findings.join("; ")
                ));
            }
        }
        st.changed();
        if let Err(e) = st.record(&[record]) {
            tracing::error!("{e}");
        }
    }

    /// Reconciles whenever another process commits an nftables change, and every
    /// [`RECONCILE_EVERY`] in any case.
    pub async fn watch_drift(self: Arc<Self>) {
        let mut events = match monitor::watch() {
            Ok(rx) => Some(rx),
            Err(e) => {
                tracing::warn!("cannot listen to nftables changes ({e}); checking every {RECONCILE_EVERY:?} only");
                None
            }
        };
        let mut tick = tokio::time::interval(RECONCILE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let cause = tokio::select! {
                _ = tick.tick() => PERIODIC.to_string(),
                event = async { events.as_mut().expect("guarded").recv().await }, if events.is_some() => match event {
                    None => { events = None; continue; }
                    Some(g) if g.pid != 0 && self.firewall.made_by_us(g.pid) => continue,
                    Some(g) => format!("nftables changed by {} (pid {})", if g.process.is_empty() { "?" } else { &g.process }, g.pid),
                },
            };
            if cause == PERIODIC {
                self.reconcile_quietly(&cause).await;
            } else {
                self.reconcile(&cause).await;
            }
        }
    }

    /// Ends grants as their time runs out, until the daemon is dropped.
    pub async fn run_expiry(self: Arc<Self>) {
        loop {
            let next = self.state.lock().await.book.next_deadline();
            let notified = self.expiry_changed.notified();
            match next {
                Some(deadline) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(deadline) => {}
                        _ = notified => continue,
                    }
                }
                None => {
                    notified.await;
                    continue;
                }
            }
            self.expire_due().await;
        }
    }

    /// Books and records every grant whose time is up. The kernel drops the elements by
    /// itself at the same moment (their timeout), so nothing is sent to it.
    async fn expire_due(&self) {
        let mut st = self.state.lock().await;
        let ended = st.book.pop_expired(Instant::now());
        if ended.is_empty() {
            return;
        }
        let records: Vec<AuditRecord> = ended
            .iter()
            .map(|g| {
                let mut r = grant_record(g, g.expires_at, None, "jitd", Action::Expire, Outcome::Expired);
                r.reason = Some("time is up".into());
                r
            })
            .collect();
        for g in &ended {
            tracing::info!(grant = g.id, source = %format_prefix(&g.source), port = g.port, "grant expired");
        }
        if let Err(e) = st.record(&records) {
            tracing::error!("{e}; {} expiry record(s) not written", records.len());
        }
        st.changed();
    }

    /// Re-reads the policy at `path`. An invalid policy changes nothing; a valid one is
    /// applied in one transaction, ending the grants it no longer allows.
    pub async fn reload(&self, path: &Path, actor: &Caller) -> Result<ReloadReply, Reply> {
        let new_config = Config::load(path).map_err(|e| {
            Reply::error(
                "invalid_config",
                format!("policy not reloaded, jitd keeps the old one: {e}"),
            )
        })?;
        check_interfaces(&new_config).await.map_err(|e| {
            Reply::error(
                "invalid_config",
                format!("policy not reloaded, jitd keeps the old one: {e}"),
            )
        })?;
        let mut st = self.state.lock().await;
        if new_config.socket != st.config.socket
            || new_config.socket_group != st.config.socket_group
            || new_config.state_dir != st.config.state_dir
        {
            tracing::warn!("socket, socket_group and state_dir changes take effect at the next restart");
        }
        let now = Instant::now();
        let ended: Vec<GrantId> = st
            .book
            .iter()
            .filter(|g| !still_allowed(&new_config, g))
            .map(|g| g.id)
            .collect();
        let kept: Vec<GrantElement> = st
            .book
            .elements(now)
            .into_iter()
            .filter(|e| {
                !ended
                    .iter()
                    .any(|id| st.book.get(*id).is_some_and(|g| g.keys().contains(&e.key)))
            })
            .collect();
        let wall = Utc::now();
        let mut records: Vec<AuditRecord> = ended
            .iter()
            .filter_map(|id| st.book.get(*id))
            .map(|g| {
                let mut r = grant_record(g, wall, Some(actor.uid), &actor.name, Action::Reload, Outcome::Revoked);
                r.reason = Some("policy changed".into());
                r
            })
            .collect();
        let mut done = AuditRecord::new(wall, Some(actor.uid), &actor.name, Action::Reload, Outcome::Done);
        done.ports = new_config.ports.iter().map(|p| p.port).collect();
        done.reason = Some(format!(
            "policy {} now locks {}",
            path.display(),
            describe_ports(&new_config)
        ));
        records.push(done);
        st.audit
            .append(&records)
            .map_err(|e| Reply::error("audit_failed", format!("policy not reloaded: {e}")))?;
        self.firewall
            .apply(&rules::replace_table(&LockdownSpec::from_config(&new_config), &kept))
            .await
            .map_err(|e| {
                Reply::error(
                    "firewall_failed",
                    format!("policy not reloaded, jitd keeps the old one: {e}"),
                )
            })?;
        for id in &ended {
            st.book.remove(*id);
        }
        st.config = new_config;
        match read_baseline(&self.firewall).await {
            Ok(b) => st.baseline = b,
            Err(e) => tracing::error!("cannot read back the reloaded table: {e}"),
        }
        st.changed();
        self.expiry_changed.notify_one();
        tracing::info!(ended = ended.len(), "policy reloaded");
        Ok(ReloadReply { ended })
    }

    /// Writes the grants snapshot once a second when they changed (the audit log is the
    /// journal in between).
    pub async fn checkpoint_grants(self: Arc<Self>) {
        let mut tick = tokio::time::interval(SNAPSHOT_EVERY);
        loop {
            tick.tick().await;
            let (snapshot, dir) = {
                let mut st = self.state.lock().await;
                if !st.dirty {
                    continue;
                }
                st.dirty = false;
                (snapshot_of(&st), st.config.state_dir.clone())
            };
            match tokio::task::spawn_blocking(move || store::save(&dir, &snapshot)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!("{e}"),
                Err(e) => tracing::error!("saving the grants: {e}"),
            }
        }
    }
}
