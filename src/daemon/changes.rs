//! The changes other than requests, each planned here and run through the committer's
//! one path ([`super::commit`]): revocations, policy reloads, drift repairs, expiry
//! bookkeeping and the stop.

use std::collections::HashMap;
use std::path::Path;

use chrono::Utc;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::commit::{answering, Footprint, Job, KernelChange, Observed, Tx};
use super::drift::{self, Checked};
use super::{describe_ports, failure_of, grant_info, grant_record, Daemon};
use crate::api::protocol::{ReloadReply, Reply, RevokeRequest, RevokedReply};
use crate::audit::{Action, AuditRecord, Outcome};
use crate::config::{parse_prefix, Config, OnStop};
use crate::firewall::rules::LockdownSpec;
use crate::firewall::Firewall;
use crate::grants::{self, Grant, GrantId};
use crate::identity::Caller;
use crate::policy::{self, Denial, Role};

type Pings = mpsc::Receiver<oneshot::Sender<()>>;

/// Whether a live grant is still allowed by `config`: its port protected with its
/// protocol, its source allowed, its approved duration within the port's maximum, and
/// its requester still holding the requester role. `Err` says why not.
pub(super) fn still_allowed(config: &Config, grant: &Grant, requester: &Caller) -> Result<(), String> {
    let fits = config.ports.iter().any(|p| {
        p.port == grant.port
            && p.protocol == grant.protocol
            && p.allowed_sources.contains(&grant.source)
            && grant.approved_duration() <= p.max_duration
    });
    if !fits {
        return Err("policy changed: the port's policy no longer allows this grant".into());
    }
    match policy::role_of(&config.access, requester) {
        Some(role) if role >= Role::Requester => Ok(()),
        _ => Err(format!(
            "policy changed: {} (uid {}) no longer holds the requester role",
            requester.name, requester.uid
        )),
    }
}

impl<F: Firewall> Daemon<F> {
    /// Queues a revocation and waits for its answer.
    pub(super) async fn revoke(&self, caller: Caller, request: RevokeRequest) -> Reply {
        let (reply, answer) = oneshot::channel();
        if !self.submit(Job::Revoke(caller, request, reply)).await {
            return Reply::error("shutting_down", "jitd is stopping; try again when it is back");
        }
        answer
            .await
            .unwrap_or_else(|_| Reply::error("internal", "the revocation was dropped; nothing changed"))
    }

    pub(super) async fn commit_revoke(&self, caller: &Caller, request: RevokeRequest, pings: &mut Pings) -> Reply {
        let now = Instant::now();
        let planned = {
            let mut st = self.lock();
            plan_revoke(&mut st, caller, &request, now)
        };
        let (tx, revoked, targets) = match planned {
            Ok(planned) => planned,
            Err(refusal) => {
                let (denial, record) = *refusal;
                return match self.execute(Tx::records(record.into_iter().collect()), pings).await {
                    Ok(()) => Reply::error(&denial.code, denial.message),
                    Err(e) => Reply::error("audit_failed", format!("revoke refused: {e}")),
                };
            }
        };
        match self.execute(tx, pings).await {
            Ok(()) => {
                for g in &revoked {
                    tracing::info!(grant = g.id, user = %caller.name, "grant revoked");
                }
                let terminated = if request.terminate {
                    match self.terminate(caller, &targets, pings).await {
                        Ok(cut) => cut,
                        Err(reply) => return reply,
                    }
                } else {
                    Vec::new()
                };
                Reply::ok(RevokedReply { revoked, terminated })
            }
            Err(super::commit::TxError::Audit(e)) => Reply::error("audit_failed", format!("revoke refused: {e}")),
            Err(e) => Reply::error("firewall_failed", format!("revoke failed, the grants stay: {e}")),
        }
    }

    /// Cuts the sessions the revoked `grants` admitted and records what was cut, one
    /// record per grant (the cut is done first: the records say what it found).
    async fn terminate(&self, caller: &Caller, grants: &[Grant], pings: &mut Pings) -> Result<Vec<String>, Reply> {
        let keys: Vec<_> = grants.iter().flat_map(Grant::keys).collect();
        let result = answering(pings, crate::firewall::conntrack::terminate(&self.firewall, &keys)).await;
        let outcome = if result.is_ok() { Outcome::Done } else { Outcome::Failed };
        let wall = Utc::now();
        let records = grants
            .iter()
            .map(|g| {
                let mut r = grant_record(g, wall, Some(caller.uid), &caller.name, Action::Terminate, outcome);
                r.reason = Some(match &result {
                    Ok(cut) => crate::firewall::conntrack::summary(cut, &g.keys()),
                    Err(e) => format!("cutting its sessions failed: {e}"),
                });
                r
            })
            .collect();
        let logged = self.execute(Tx::records(records), pings).await;
        let cut =
            result.map_err(|e| Reply::error("terminate_failed", format!("grants revoked, sessions not cut: {e}")))?;
        logged.map_err(|e| Reply::error("audit_failed", format!("sessions cut, but not recorded: {e}")))?;
        Ok(cut.iter().map(ToString::to_string).collect())
    }

    /// Re-reads the policy file as `caller` (admins only). An invalid policy changes
    /// nothing; a valid one is applied in one transaction.
    pub(super) async fn reload_as(&self, caller: &Caller) -> Result<ReloadReply, Reply> {
        let (access, path) = {
            let st = self.lock();
            (st.config.access.clone(), st.config.path.clone())
        };
        policy::require_role(&access, caller, Role::Admin, "reload the policy")
            .map_err(|d| Reply::error(&d.code, d.message))?;
        self.reload(&path, caller).await
    }

    /// Re-reads the policy at `path`. An invalid policy changes nothing; a valid one is
    /// applied in one transaction, ending the grants it no longer allows.
    pub async fn reload(&self, path: &Path, actor: &Caller) -> Result<ReloadReply, Reply> {
        let invalid = |e: String| {
            Reply::error(
                "invalid_config",
                format!("policy not reloaded, jitd keeps the old one: {e}"),
            )
        };
        let path = path.to_path_buf();
        let new_config = tokio::task::spawn_blocking(move || Config::load(&path))
            .await
            .map_err(|e| invalid(e.to_string()))?
            .map_err(|e| invalid(e.to_string()))?;
        super::check_interfaces(&new_config)
            .await
            .map_err(|e| invalid(format!("{e:#}")))?;
        let (reply, answer) = oneshot::channel();
        if !self
            .submit(Job::Reload(Box::new(new_config), actor.clone(), reply))
            .await
        {
            return Err(Reply::error(
                "shutting_down",
                "jitd is stopping; try again when it is back",
            ));
        }
        answer
            .await
            .unwrap_or_else(|_| Err(Reply::error("internal", "the reload was dropped; nothing changed")))
    }

    pub(super) async fn commit_reload(
        &self,
        new_config: Config,
        actor: &Caller,
        pings: &mut Pings,
    ) -> Result<ReloadReply, Reply> {
        let (tx, ended) = {
            let mut st = self.lock();
            if new_config.socket != st.config.socket
                || new_config.socket_group != st.config.socket_group
                || new_config.state_dir != st.config.state_dir
            {
                tracing::warn!("socket, socket_group and state_dir changes take effect at the next restart");
            }
            plan_reload(&mut st, new_config, actor)
        };
        match self.execute(tx, pings).await {
            Ok(()) => {
                tracing::info!(ended = ended.len(), "policy reloaded");
                Ok(ReloadReply { ended })
            }
            Err(super::commit::TxError::Audit(e)) => {
                Err(Reply::error("audit_failed", format!("policy not reloaded: {e}")))
            }
            Err(e) => Err(Reply::error(
                "firewall_failed",
                format!("policy not reloaded, jitd keeps the old one: {e}"),
            )),
        }
    }

    /// Compares what the kernel showed with jitd's view and repairs only what differs,
    /// as one transaction. Elements jitd changed itself since the reading began are
    /// left out of the comparison; a reading from before a whole-table change is stale.
    pub(super) async fn commit_repair(&self, cause: &str, observed: Observed, pings: &mut Pings) -> Checked {
        let now = Instant::now();
        let plan = {
            let st = self.lock();
            let Some(skip) = st.touched_since(observed.settled) else {
                return Checked::Stale;
            };
            let findings = drift::compare(&st, observed.table.as_ref(), &skip, observed.read_at, now);
            if findings.is_empty() {
                return Checked::Clean;
            }
            let kernel = if findings.structure {
                KernelChange::Replace(
                    LockdownSpec::from_config(&st.config),
                    grants::timed(&st.book.elements(now), now),
                )
            } else {
                KernelChange::Grants {
                    remove: findings.remove.clone(),
                    add: findings.add.clone(),
                }
            };
            (findings, kernel)
        };
        let (findings, kernel) = plan;
        let text = findings.describe();
        tracing::warn!("drift ({cause}): {text}");
        let mut record = AuditRecord::new(Utc::now(), None, "jitd", Action::Repair, Outcome::Repaired);
        record.reason = Some(format!("drift repaired ({cause}): {text}"));
        let mut failed = failure_of(&record);
        failed.reason = Some(format!("drift found ({cause}): {text}; "));
        let tx = Tx {
            records: vec![record],
            kernel,
            undo: Default::default(),
            failed: vec![failed],
            touched: findings.touched,
        };
        match self.execute(tx, pings).await {
            Ok(()) => {
                crate::metrics::metrics().drift_repairs.inc();
                Checked::Repaired(text)
            }
            Err(e) => {
                tracing::error!("repairing the drift failed: {e}");
                Checked::Failed(text)
            }
        }
    }

    /// Books and records every grant whose time is up. The kernel drops their elements
    /// by itself at the same moment (their timeouts), so nothing is sent to it.
    pub(super) async fn commit_expiry(&self, pings: &mut Pings) {
        let ended = self.lock().book.pop_expired(Instant::now());
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
            tracing::info!(grant = g.id, port = g.port, "grant expired");
        }
        // An expiry cannot be undone: the kernel has dropped the element already.
        if let Err(e) = self.execute(Tx::records(records), pings).await {
            tracing::error!("{e}; {} expiry record(s) not written", ended.len());
        }
        self.lock().changed();
    }

    /// Records the stop and, with `on_stop = "unlock"`, removes the lockdown.
    pub(super) async fn commit_stop(&self, pings: &mut Pings) {
        let (unlock, live) = {
            let st = self.lock();
            (st.config.on_stop == OnStop::Unlock, st.book.len())
        };
        let mut record = AuditRecord::new(Utc::now(), None, "jitd", Action::Stop, Outcome::Done);
        let kernel = if unlock {
            record.reason = Some("on_stop = unlock: lockdown removed".into());
            KernelChange::Remove
        } else {
            record.reason = Some(format!(
                "on_stop = keep-locked: ports stay locked, {live} grant(s) expire in the kernel on their own"
            ));
            KernelChange::None
        };
        let mut failed = failure_of(&record);
        failed.reason = Some("on_stop = unlock, but removing the lockdown failed: ".into());
        let mut records = self.lock().refusals.flush(Utc::now());
        records.push(record);
        let tx = Tx {
            records,
            kernel,
            undo: Default::default(),
            failed: vec![failed],
            touched: Default::default(),
        };
        if let Err(e) = self.execute(tx, pings).await {
            tracing::error!("stopping: {e}");
        }
        self.checkpoint_if_dirty(true);
        answering(pings, self.writer.flush()).await;
    }
}

type Refusal = Box<(Denial, Option<AuditRecord>)>;

/// Checks a revocation and books it: the transaction and what it ends.
fn plan_revoke(
    st: &mut super::State,
    caller: &Caller,
    request: &RevokeRequest,
    now: Instant,
) -> Result<(Tx, Vec<crate::api::protocol::GrantInfo>, Vec<Grant>), Refusal> {
    let refuse = |d: Denial| {
        let mut r = AuditRecord::new(
            Utc::now(),
            Some(caller.uid),
            &caller.name,
            Action::Revoke,
            Outcome::Denied,
        );
        r.grant_id = request.id;
        r.source = request.source.as_deref().map(|s| match parse_prefix(s) {
            Ok(net) => crate::config::format_prefix(&net),
            Err(_) => format!("(unchecked input, escaped) {}", crate::text::escape_capped(s, 80)),
        });
        r.ports = request.port.into_iter().collect();
        r.reason = Some(format!("{}: {}", d.code, d.message));
        Box::new((d, Some(r)))
    };
    let role = policy::require_role(&st.config.access, caller, Role::Requester, "revoke grants").map_err(refuse)?;
    let source = request
        .source
        .as_deref()
        .map(parse_prefix)
        .transpose()
        .map_err(|e| refuse(Denial::new("invalid_argument", format!("source: {e}"))))?;
    if request.id.is_none() && source.is_none() {
        return Err(Box::new((
            Denial::new("invalid_argument", "revoke needs a grant id or a source"),
            None,
        )));
    }
    let targets: Vec<Grant> = st
        .book
        .iter()
        .filter(|g| match (request.id, source) {
            (Some(id), _) => g.id == id,
            (None, Some(s)) => g.source == s && request.port.is_none_or(|p| p == g.port),
            (None, None) => false,
        })
        .cloned()
        .collect();
    if targets.is_empty() {
        return Err(Box::new((Denial::new("not_found", "no live grant matches"), None)));
    }
    if role < Role::Admin {
        if let Some(g) = targets.iter().find(|g| g.requester_uid != caller.uid) {
            return Err(refuse(Denial::new(
                "not_authorized",
                format!(
                    "grant {} belongs to {}; only admins may revoke others' grants",
                    g.id, g.requester
                ),
            )));
        }
    }
    let wall = Utc::now();
    let mut tx = Tx::records(Vec::new());
    let mut footprint = Footprint::default();
    let mut revoked = Vec::new();
    for g in &targets {
        let mut r = grant_record(
            g,
            wall,
            Some(caller.uid),
            &caller.name,
            Action::Revoke,
            Outcome::Revoked,
        );
        r.reason = Some(format!("revoked by {}", caller.name));
        tx.failed.push(failure_of(&r));
        tx.records.push(r);
        footprint.touch(&st.book, g, now);
        if let Some((grant, deadline)) = st.book.remove(g.id) {
            revoked.push(grant_info(&grant, deadline.saturating_duration_since(now)));
            tx.undo.removed.push((grant, deadline));
        }
    }
    tx.kernel = footprint.change(&st.book, now);
    tx.touched = footprint.into_touched();
    Ok((tx, revoked, targets))
}

/// Books a new policy: the grants it no longer allows end, the table is replaced.
fn plan_reload(st: &mut super::State, new_config: Config, actor: &Caller) -> (Tx, Vec<GrantId>) {
    let now = Instant::now();
    let wall = Utc::now();
    let mut callers: HashMap<u32, Caller> = HashMap::new();
    let ending: Vec<(GrantId, String)> = st
        .book
        .iter()
        .filter_map(|g| {
            let requester = callers
                .entry(g.requester_uid)
                .or_insert_with(|| Caller::resolve_uid(g.requester_uid));
            still_allowed(&new_config, g, requester).err().map(|why| (g.id, why))
        })
        .collect();
    let mut tx = Tx::records(Vec::new());
    for (id, why) in &ending {
        if let Some((grant, deadline)) = st.book.remove(*id) {
            let mut r = grant_record(
                &grant,
                wall,
                Some(actor.uid),
                &actor.name,
                Action::Reload,
                Outcome::Revoked,
            );
            r.reason = Some(why.clone());
            tx.failed.push(failure_of(&r));
            tx.records.push(r);
            tx.undo.removed.push((grant, deadline));
        }
    }
    let mut done = AuditRecord::new(wall, Some(actor.uid), &actor.name, Action::Reload, Outcome::Done);
    done.ports = new_config.ports.iter().map(|p| p.port).collect();
    done.reason = Some(format!(
        "policy {} now locks {}",
        new_config.path.display(),
        describe_ports(&new_config)
    ));
    let mut failed = failure_of(&done);
    failed.reason = Some(format!("policy {} not reloaded: ", new_config.path.display()));
    tx.records.push(done);
    tx.failed.push(failed);
    tx.kernel = KernelChange::Replace(
        LockdownSpec::from_config(&new_config),
        grants::timed(&st.book.elements(now), now),
    );
    tx.undo.config = Some(Box::new(std::mem::replace(&mut st.config, new_config)));
    (tx, ending.into_iter().map(|(id, _)| id).collect())
}
