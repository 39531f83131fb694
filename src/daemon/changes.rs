//! The changes other than requests, each planned here and run through the committer's
//! one path ([`super::commit`]): revocations, policy reloads, drift repairs, expiry
//! bookkeeping and the stop.

use std::collections::HashMap;
use std::path::Path;

use chrono::Utc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::commit::answering;
use super::drift::{self, Checked, DriftCause};
use super::job::{Job, Observed};
use super::tx::{Footprint, KernelChange, Tx};
use super::{describe_ports, failure_of, grant_info, grant_record, Daemon};
use crate::api::protocol::{ReloadReply, Reply, RevokeRequest, RevokedReply};
use crate::audit::{Action, AuditRecord, Outcome};
use crate::config::{Config, OnStop};
use crate::domain::{format_prefix, parse_prefix, Caller, ErrorCode, GrantId};
use crate::firewall::rules::LockdownSpec;
use crate::firewall::Firewall;
use crate::grants::{self, Grant};
use crate::policy::{self, Denial, Role};

type Pings = mpsc::Receiver<oneshot::Sender<()>>;

/// What the current policy makes of a live grant ([`recheck`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Still allowed as it is, for the time it has left.
    Keep(Duration),
    /// Allowed, but only for this much longer (the port's `max_duration` shrank);
    /// the reason starts with "policy changed".
    Clamp(Duration, String),
    /// No longer allowed; the reason starts with "policy changed".
    End(String),
}

/// Re-checks a live grant with `left` to run against `config`, as a reload and a
/// restart do: its port still protected with its protocol, its source still allowed,
/// its requester still holding the requester role, and its whole length (from
/// `granted_at`, by the wall clock `wall`) within the port's `max_duration`. A grant
/// that ran longer than that already ends; one that would run longer is clamped.
pub(super) fn recheck(config: &Config, grant: &Grant, requester: &Caller, left: Duration) -> Verdict {
    if let Some(origin) = &grant.fleet {
        if let Err(why) = crate::fleet::settings::still_selected(config.fleet.as_ref(), origin) {
            return Verdict::End(format!("policy changed: {why}"));
        }
    }
    let port = format!("port {}/{}", grant.port, grant.protocol);
    let policies: Vec<_> = config
        .port_policies(grant.port)
        .filter(|p| p.protocol == grant.protocol)
        .collect();
    if policies.is_empty() {
        return Verdict::End(format!("policy changed: {port} is no longer protected"));
    }
    let Some(max) = policies
        .iter()
        .filter(|p| p.allowed_sources.contains(&grant.source))
        .map(|p| p.max_duration)
        .max()
    else {
        return Verdict::End(format!(
            "policy changed: source {} is no longer in allowed_sources of {port}",
            format_prefix(&grant.source)
        ));
    };
    if !matches!(policy::role_of(&config.access, requester), Some(r) if r >= Role::Requester) {
        let who = match &requester.signer {
            Some(s) => format!("the knock's signer (principals {})", s.principals.join(",")),
            None => format!("{} (uid {})", requester.name, requester.uid),
        };
        return Verdict::End(format!("policy changed: {who} no longer holds the requester role"));
    }
    // how long it ran, by what it was approved for and what is left (both clock-free:
    // the wall clock may have stepped since it was granted)
    let ran = grant.approved_duration().saturating_sub(left);
    let allowed = max.saturating_sub(ran);
    let shown = crate::duration::format(max);
    if allowed.is_zero() {
        return Verdict::End(format!(
            "policy changed: max_duration of {port} is now {shown}, and the grant has run that long already"
        ));
    }
    if left > allowed {
        return Verdict::Clamp(
            allowed,
            format!("policy changed: max_duration of {port} is now {shown}; the grant now ends {shown} after it began"),
        );
    }
    Verdict::Keep(left)
}

impl<F: Firewall> Daemon<F> {
    /// Queues a revocation and waits for its answer.
    pub(super) async fn revoke(&self, caller: Caller, request: RevokeRequest) -> Reply {
        let (reply, answer) = oneshot::channel();
        if !self.submit(Job::Revoke(caller, request, reply)).await {
            return Reply::error(ErrorCode::ShuttingDown, "jitd is stopping; try again when it is back");
        }
        answer
            .await
            .unwrap_or_else(|_| Reply::error(ErrorCode::Internal, "the revocation was dropped; nothing changed"))
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
                    Ok(()) => Reply::error(denial.code, denial.message),
                    Err(e) => Reply::error(ErrorCode::AuditFailed, format!("revoke refused: {e}")),
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
            Err(super::tx::TxError::Audit(e)) => Reply::error(ErrorCode::AuditFailed, format!("revoke refused: {e}")),
            Err(e) => Reply::error(
                ErrorCode::FirewallFailed,
                format!("revoke failed, the grants stay: {e}"),
            ),
        }
    }

    /// Cuts the sessions the revoked `grants` admitted (but not those a live grant
    /// still allows) and records what was cut, one record per grant (the cut is done
    /// first: the records say what it found).
    async fn terminate(&self, caller: &Caller, grants: &[Grant], pings: &mut Pings) -> Result<Vec<String>, Reply> {
        use crate::firewall::conntrack;
        let keys: Vec<_> = grants.iter().flat_map(Grant::keys).collect();
        let live: Vec<_> = self.lock().book.iter().flat_map(Grant::keys).collect();
        let result = answering(pings, conntrack::terminate(&self.firewall, &keys, &live)).await;
        if let Ok(done) = &result {
            self.lock()
                .cuts
                .note(done.cut.iter().map(conntrack::Session::cut_key), Instant::now());
        }
        let outcome = if result.is_ok() { Outcome::Done } else { Outcome::Failed };
        let wall = Utc::now();
        let records = grants
            .iter()
            .map(|g| {
                let mut r = grant_record(g, wall, Some(caller.uid), &caller.name, Action::Terminate, outcome);
                r.reason = Some(match &result {
                    Ok(done) => conntrack::summary(done, &g.keys()),
                    Err(e) => format!("cutting its sessions failed: {e}"),
                });
                r
            })
            .collect();
        let logged = self.execute(Tx::records(records), pings).await;
        let done = result.map_err(|e| {
            Reply::error(
                ErrorCode::TerminateFailed,
                format!("grants revoked, sessions not cut: {e}"),
            )
        })?;
        logged.map_err(|e| Reply::error(ErrorCode::AuditFailed, format!("sessions cut, but not recorded: {e}")))?;
        Ok(done.cut.iter().map(ToString::to_string).collect())
    }

    /// Re-reads the policy file as `caller` (admins only). An invalid policy changes
    /// nothing; a valid one is applied in one transaction.
    pub(super) async fn reload_as(&self, caller: &Caller) -> Result<ReloadReply, Reply> {
        let (access, path) = {
            let st = self.lock();
            (st.config.access.clone(), st.config.path.clone())
        };
        policy::require_role(&access, caller, Role::Admin, "reload the policy")
            .map_err(|d| Reply::error(d.code, d.message))?;
        self.reload(&path, caller).await
    }

    /// Re-reads the policy at `path`. An invalid policy changes nothing; a valid one is
    /// applied in one transaction, ending the grants it no longer allows.
    pub async fn reload(&self, path: &Path, actor: &Caller) -> Result<ReloadReply, Reply> {
        let invalid = |e: String| {
            Reply::error(
                ErrorCode::InvalidConfig,
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
                ErrorCode::ShuttingDown,
                "jitd is stopping; try again when it is back",
            ));
        }
        answer.await.unwrap_or_else(|_| {
            Err(Reply::error(
                ErrorCode::Internal,
                "the reload was dropped; nothing changed",
            ))
        })
    }

    pub(super) async fn commit_reload(
        &self,
        new_config: Config,
        actor: &Caller,
        pings: &mut Pings,
    ) -> Result<ReloadReply, Reply> {
        // the table is replaced whole: what its counters counted is read first
        let counted = answering(pings, self.credit_all()).await;
        let (tx, ended) = {
            let mut st = self.lock();
            if new_config.socket != st.config.socket
                || new_config.socket_group != st.config.socket_group
                || new_config.state_dir != st.config.state_dir
            {
                tracing::warn!("socket, socket_group and state_dir changes take effect at the next restart");
            }
            let listen = |c: &Config| c.remote.as_ref().map(|r| r.listen);
            if listen(&new_config) != listen(&st.config) {
                tracing::warn!(
                    "remote.listen changes (and adding [remote]) take effect at the next restart; the rest of [remote] applies now"
                );
            }
            plan_reload(&mut st, new_config, actor)
        };
        let tx = Tx {
            uncounted: !counted,
            ..tx
        };
        match self.execute(tx, pings).await {
            Ok(()) => {
                tracing::info!(ended = ended.len(), "policy reloaded");
                Ok(ReloadReply { ended })
            }
            Err(super::tx::TxError::Audit(e)) => Err(Reply::error(
                ErrorCode::AuditFailed,
                format!("policy not reloaded: {e}"),
            )),
            Err(e) => Err(Reply::error(
                ErrorCode::FirewallFailed,
                format!("policy not reloaded, jitd keeps the old one: {e}"),
            )),
        }
    }

    /// Compares what the kernel showed with jitd's view and repairs only what differs,
    /// as one transaction, applied first and recorded after (on its own when `pace`
    /// says so; else the drift monitor records the streak). Elements jitd changed itself
    /// since the reading began are left out of the comparison; a reading from before a
    /// whole-table change is stale. A change that opens nothing is deferred when `pace`
    /// says closing repairs wait.
    pub(super) async fn commit_repair(
        &self,
        cause: &DriftCause,
        observed: Observed,
        pace: drift::Pace,
        pings: &mut Pings,
    ) -> Checked {
        let now = Instant::now();
        let plan = {
            let mut st = self.lock();
            let Some(skip) = st.touched_since(observed.settled) else {
                return Checked::Stale;
            };
            if let Some(table) = observed.table.as_ref() {
                st.credit_reading(&table.counts(), &skip);
                let age = chrono::Duration::from_std(now.saturating_duration_since(observed.read_at));
                st.ledger.counted(Utc::now() - age.unwrap_or_default());
            }
            let findings = drift::compare(&st, observed.table.as_ref(), &skip, observed.read_at, now);
            if findings.is_empty() {
                return Checked::Clean;
            }
            if pace.closing_waits && !findings.opens_access() {
                return Checked::Deferred(findings.describe());
            }
            let kernel = if findings.needs_new_table() {
                KernelChange::Replace(
                    LockdownSpec::from_config(&st.config),
                    grants::timed(&st.book.elements(now), now),
                )
            } else {
                KernelChange::Grants {
                    remove: findings.remove.clone(),
                    add: findings.add.clone(),
                    read: Vec::new(),
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
        let records = if pace.record { vec![record] } else { Vec::new() };
        let tx = Tx {
            touched: findings.touched,
            record_after: true,
            ..Tx::kernel_only(records, kernel, failed)
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

    /// When the expiry timer must next wake: the next grant deadline, the end of the
    /// next refusal-counting interval or the next approval timeout, whichever is first.
    pub(super) fn next_wake(&self) -> Option<Instant> {
        let st = self.lock();
        let summary = st.refusals.next_due().map(|due| {
            // a few milliseconds late, so that the interval has surely ended
            let wait = (due - Utc::now()).to_std().unwrap_or_default();
            Instant::now() + wait + Duration::from_millis(10)
        });
        [
            st.book.next_deadline(),
            summary,
            st.pending.next_deadline(),
            Self::next_sample(&st),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Books and records every grant whose time is up, and writes the summaries of
    /// refusal intervals that have ended (so they are on record on time even if nobody
    /// asks again). The kernel drops the grants' elements by itself at the same moment
    /// (their timeouts), so nothing is sent to it.
    pub(super) async fn commit_expiry(&self, pings: &mut Pings) {
        let counted = answering(pings, self.sample_expiring(Instant::now())).await;
        let (ended, summaries) = {
            let mut st = self.lock();
            (
                st.book.pop_expired(Instant::now()),
                st.refusals.due_summaries(Utc::now()),
            )
        };
        if ended.is_empty() && summaries.is_empty() {
            // only a sample ahead of an end: the timer waits for the next one
            self.expiry_changed.notify_one();
            return;
        }
        // A grant can end before its `expires_at`: restored after a crash that came
        // between its audit record and its kernel change, it keeps the shorter timer the
        // kernel held for its address. Its record is dated when it ended, never ahead of
        // the clock (a record from the future would make the next start distrust it).
        let wall = Utc::now();
        let mut records: Vec<AuditRecord> = ended
            .iter()
            .map(|g| {
                let end = g.expires_at.min(wall);
                let mut r = grant_record(g, end, None, "jitd", Action::Expire, Outcome::Expired);
                r.reason = Some("time is up".into());
                r
            })
            .collect();
        records.extend(summaries);
        for g in &ended {
            tracing::info!(grant = g.id, port = g.port, "grant expired");
        }
        // An expiry cannot be undone: the kernel has dropped the element already.
        let tx = Tx {
            uncounted: !counted,
            ..Tx::records(records)
        };
        if let Err(e) = self.execute(tx, pings).await {
            tracing::error!("{e}; {} expiry record(s) not written", ended.len());
        }
        let mut st = self.lock();
        for g in &ended {
            // on record, or lost with its record: either way it is gone
            st.ledger.forget(g.id);
        }
        st.changed();
    }

    /// Records the stop and, with `on_stop = "unlock"`, removes the lockdown.
    pub(super) async fn commit_stop(&self, pings: &mut Pings) {
        let (unlock, live) = {
            let st = self.lock();
            (st.config.on_stop == OnStop::Unlock, st.book.len())
        };
        let mut record = AuditRecord::new(Utc::now(), None, "jitd", Action::Stop, Outcome::Done);
        let kernel = if unlock {
            // the counters go with the table: the restarted jitd counts on from here
            answering(pings, self.credit_all()).await;
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
        records.extend(self.knocks.flush(Utc::now()));
        records.push(record);
        let tx = Tx::kernel_only(records, kernel, failed);
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
    let refuse = |d: Denial| revoke_refusal(caller, request, d);
    let role = policy::require_role(&st.config.access, caller, Role::Requester, "revoke grants").map_err(refuse)?;
    let targets = revoke_targets(st, request, refuse)?;
    if role < Role::Admin {
        if let Some(g) = targets.iter().find(|g| g.requester_uid != caller.uid) {
            return Err(refuse(Denial::new(
                ErrorCode::NotAuthorized,
                format!(
                    "grant {} belongs to {}; only admins may revoke others' grants",
                    g.id, g.requester
                ),
            )));
        }
    }
    let (tx, revoked) = book_revoke(st, caller, &targets, now);
    Ok((tx, revoked, targets))
}

/// A refused revocation, with the record that audits it.
fn revoke_refusal(caller: &Caller, request: &RevokeRequest, d: Denial) -> Refusal {
    let mut r = AuditRecord::new(
        Utc::now(),
        Some(caller.uid),
        &caller.name,
        Action::Revoke,
        Outcome::Denied,
    );
    r.grant_id = request.id;
    r.source = request.source.as_deref().map(super::book::recorded_source);
    r.ports = request.port.into_iter().collect();
    r.reason = Some(format!("{}: {}", d.code, d.message));
    Box::new((d, Some(r)))
}

/// The live grants a revocation names; a bad source is refused with `refuse` (audited),
/// nothing named or nothing found without a record.
fn revoke_targets(
    st: &super::State,
    request: &RevokeRequest,
    refuse: impl Fn(Denial) -> Refusal,
) -> Result<Vec<Grant>, Refusal> {
    let source = request
        .source
        .as_deref()
        .map(parse_prefix)
        .transpose()
        .map_err(|e| refuse(Denial::new(ErrorCode::InvalidArgument, format!("source: {e}"))))?;
    if request.id.is_none() && source.is_none() {
        return Err(Box::new((
            Denial::new(ErrorCode::InvalidArgument, "revoke needs a grant id or a source"),
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
        return Err(Box::new((
            Denial::new(ErrorCode::NotFound, "no live grant matches"),
            None,
        )));
    }
    Ok(targets)
}

/// Books the end of `targets`: the transaction and the grants as the reply shows them.
fn book_revoke(
    st: &mut super::State,
    caller: &Caller,
    targets: &[Grant],
    now: Instant,
) -> (Tx, Vec<crate::api::protocol::GrantInfo>) {
    let wall = Utc::now();
    let mut tx = Tx::records(Vec::new());
    let mut footprint = Footprint::default();
    let mut revoked = Vec::new();
    for g in targets {
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
    (tx, revoked)
}

/// Books a new policy: the grants it no longer allows end, those it allows for less
/// time are clamped, the table is replaced.
fn plan_reload(st: &mut super::State, new_config: Config, actor: &Caller) -> (Tx, Vec<GrantId>) {
    let now = Instant::now();
    let wall = Utc::now();
    let verdicts = recheck_book(&st.book, &new_config, now);
    let mut tx = Tx::records(Vec::new());
    let mut ended = Vec::new();
    for (id, verdict) in verdicts {
        let Some((grant, deadline)) = st.book.remove(id) else {
            continue;
        };
        let (outcome, why) = match verdict {
            Verdict::Keep(_) => {
                // not listed by recheck_book; put back as it was, should it ever be
                st.book.restore(grant, deadline);
                continue;
            }
            Verdict::End(why) => {
                ended.push(id);
                (Outcome::Revoked, why)
            }
            Verdict::Clamp(left, why) => {
                let mut clamped = grant.clone();
                clamped.expires_at = grants::shortened(&grant, deadline.saturating_duration_since(now), left);
                st.book.restore(clamped, now + left);
                (Outcome::Done, why)
            }
        };
        let booked = st.book.get(id).unwrap_or(&grant);
        let mut r = grant_record(booked, wall, Some(actor.uid), &actor.name, Action::Reload, outcome);
        r.reason = Some(why);
        tx.failed.push(failure_of(&r));
        tx.records.push(r);
        tx.undo.removed.push((grant, deadline));
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
    (tx, ended)
}

/// The live grants `config` no longer allows as they are, with what becomes of them.
fn recheck_book(book: &grants::GrantBook, config: &Config, now: Instant) -> Vec<(GrantId, Verdict)> {
    let mut callers: HashMap<u32, Caller> = HashMap::new();
    book.iter()
        .filter_map(|g| {
            let requester = Caller::requester_of(g, &mut callers);
            let left = book.remaining(g.id, now).unwrap_or_default();
            match recheck(config, g, &requester, left) {
                Verdict::Keep(_) => None,
                changed => Some((g.id, changed)),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(body: &str) -> Config {
        let text = format!("state_dir = \"/nonexistent\"\n{body}");
        Config::parse(Path::new("/etc/jitd/jitd.toml"), &text, &|_| None).unwrap()
    }

    const PORT22: &str = "[[ports]]\nport = 22\nallowed_sources = [\"10.0.0.0/8\"]\nmax_duration = \"3h\"\n";

    fn grant(ran: Duration, approved: Duration, wall: chrono::DateTime<Utc>) -> Grant {
        let granted_at = wall - chrono::Duration::from_std(ran).unwrap();
        Grant {
            id: 7,
            source: "10.1.2.3/32".parse().unwrap(),
            port: 22,
            protocol: crate::domain::Protocol::Tcp,
            requester: "4242".into(),
            requester_uid: 4242,
            principals: Vec::new(),
            fleet: None,
            justification: None,
            granted_at,
            expires_at: granted_at + chrono::Duration::from_std(approved).unwrap(),
        }
    }

    fn who(uid: u32) -> Caller {
        Caller {
            uid,
            name: uid.to_string(),
            groups: Vec::new(),
            signer: None,
        }
    }

    const MIN: Duration = Duration::from_secs(60);

    #[test]
    fn a_grant_the_policy_still_allows_is_kept_as_it_is() {
        let wall = Utc::now();
        let c = config(&format!("{PORT22}[access]\nrequesters = [\"uid:4242\"]\n"));
        let g = grant(MIN, 180 * MIN, wall);
        assert_eq!(recheck(&c, &g, &who(4242), 179 * MIN), Verdict::Keep(179 * MIN));
    }

    #[test]
    fn each_tightening_ends_the_grant_with_its_reason() {
        let wall = Utc::now();
        let g = grant(MIN, 180 * MIN, wall);
        let ends = |body: &str, uid: u32| match recheck(&config(body), &g, &who(uid), 179 * MIN) {
            Verdict::End(why) => why,
            other => panic!("{body}: {other:?}"),
        };
        let roles = "[access]\nrequesters = [\"uid:4242\"]\n";
        let why = ends(&format!("[[ports]]\nport = 3389\n{roles}"), 4242);
        assert_eq!(why, "policy changed: port 22/tcp is no longer protected");
        let why = ends(
            &format!("[[ports]]\nport = 22\nallowed_sources = [\"192.168.0.0/16\"]\n{roles}"),
            4242,
        );
        assert_eq!(
            why,
            "policy changed: source 10.1.2.3 is no longer in allowed_sources of port 22/tcp"
        );
        let why = ends(&format!("{PORT22}[access]\nrequesters = [\"uid:4243\"]\n"), 4242);
        assert_eq!(
            why,
            "policy changed: 4242 (uid 4242) no longer holds the requester role"
        );
        let why = ends(&PORT22.replace("3h", "1m"), 0);
        assert!(
            why.starts_with("policy changed: max_duration of port 22/tcp is now"),
            "{why}"
        );
    }

    #[test]
    fn a_shorter_maximum_clamps_the_grant_to_its_whole_length() {
        let wall = Utc::now();
        let c = config(&PORT22.replace("3h", "10m"));
        // ran 4 minutes of 3 hours: 6 minutes are left under a 10 minute maximum
        let g = grant(4 * MIN, 180 * MIN, wall);
        match recheck(&c, &g, &who(0), 176 * MIN) {
            Verdict::Clamp(left, why) => {
                assert_eq!(left, 6 * MIN);
                assert!(
                    why.starts_with("policy changed: max_duration of port 22/tcp is now 10m"),
                    "{why}"
                );
            }
            other => panic!("{other:?}"),
        }
        // less time left than the maximum allows: kept as it is
        let g = grant(5 * MIN, 10 * MIN, wall);
        assert_eq!(recheck(&c, &g, &who(0), 5 * MIN), Verdict::Keep(5 * MIN));
    }
}
