//! Access requests, committed in groups: every request waiting when the committer is
//! free is decided in order, their audit records are written with one fsync, their
//! grants applied in one nftables transaction, and only then is each answered.
//! A grant that cannot be audited or applied is rolled back and refused.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Weak};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::{grant_info, grant_record, Daemon, State};
use crate::api::protocol::{GrantRequest, GrantedReply, Reply, MAX_JUSTIFICATION_CHARS};
use crate::audit::limit::Admit;
use crate::audit::{Action, AuditRecord, Outcome};
use crate::config::{format_prefix, parse_prefix, Protocol};
use crate::firewall::rules::{GrantElement, GrantKey};
use crate::firewall::Firewall;
use crate::grants::{Grant, GrantId, NewGrant};
use crate::identity::Caller;
use crate::policy::{self, AccessRequest, Denial, Role};

/// The most requests one transaction carries.
pub const MAX_BATCH: usize = 256;

/// A request waiting for the committer.
pub(super) struct Pending {
    caller: Caller,
    request: GrantRequest,
    reply: oneshot::Sender<Reply>,
}

/// The committer's inbox.
pub(super) type Queue = mpsc::Sender<Pending>;

/// Creates the inbox and starts the committer; it stops when the daemon is dropped.
pub(super) fn start_committer<F: Firewall>(daemon: &Arc<Daemon<F>>, rx: mpsc::Receiver<Pending>) {
    tokio::spawn(run_committer(Arc::downgrade(daemon), rx));
}

async fn run_committer<F: Firewall>(daemon: Weak<Daemon<F>>, mut rx: mpsc::Receiver<Pending>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(more) => batch.push(more),
                Err(_) => break,
            }
        }
        let Some(daemon) = daemon.upgrade() else { return };
        daemon.commit(batch).await;
    }
}

/// What became of one request while its batch was decided.
enum Decided {
    Denied(Denial),
    Approved {
        grants: Vec<Grant>,
        superseded: Vec<GrantId>,
        duration: Duration,
    },
}

/// What a batch changed in the book, to apply to the kernel or to undo.
#[derive(Default)]
struct Changes {
    inserted: Vec<GrantId>,
    replaced: Vec<(Grant, Instant)>,
    touched: HashSet<GrantKey>,
    in_kernel_before: HashSet<GrantKey>,
}

impl<F: Firewall> Daemon<F> {
    /// Queues a request for the committer and waits for its answer.
    pub(super) async fn request(&self, caller: Caller, request: GrantRequest) -> Reply {
        let (reply, answer) = oneshot::channel();
        if self.requests.send(Pending { caller, request, reply }).await.is_err() {
            return Reply::error("shutting_down", "jitd is stopping; try again when it is back");
        }
        answer
            .await
            .unwrap_or_else(|_| Reply::error("internal", "the request was dropped; nothing was granted"))
    }

    async fn commit(&self, batch: Vec<Pending>) {
        let wall = Utc::now();
        let now = Instant::now();
        let mut st = self.state.lock().await;
        let locked = Instant::now();
        let mut changes = Changes::default();
        let mut records = st.refusals.due_summaries(wall);
        let decided: Vec<Decided> = batch
            .iter()
            .map(|p| decide_one(&mut st, &mut changes, &mut records, p, now, wall))
            .collect();
        let decided_at = Instant::now();
        if let Err(e) = st.record(&records) {
            tracing::error!("{e}; {} request(s) refused", batch.len());
            for _ in &batch {
                crate::metrics::metrics().request("failed", "audit_failed");
            }
            changes.undo(&mut st);
            for p in batch {
                let _ = p
                    .reply
                    .send(Reply::error("audit_failed", format!("request refused: {e}")));
            }
            return;
        }
        let audited_at = Instant::now();
        let (remove, add) = changes.kernel_change(&st, now);
        let applied = self.change_grants(&remove, &add).await;
        tracing::debug!(
            batch = batch.len(),
            wait_us = (locked - now).as_micros() as u64,
            decide_us = (decided_at - locked).as_micros() as u64,
            audit_us = (audited_at - decided_at).as_micros() as u64,
            nft_us = audited_at.elapsed().as_micros() as u64,
            "batch committed"
        );
        if let Err(e) = applied {
            tracing::error!("applying grants failed: {e}");
            let failed = failed_records(&decided, &batch, &e.to_string());
            changes.undo(&mut st);
            if let Err(e) = st.record(&failed) {
                tracing::error!("{e}");
            }
            // The journal says the replaced grants ended; they did not. A checkpoint now
            // puts them on record as live, and replay starts after it.
            super::save_grants(&st);
            for (p, d) in batch.into_iter().zip(decided) {
                let reply = match d {
                    Decided::Denied(denial) => {
                        crate::metrics::metrics().request("denied", &denial.code);
                        Reply::error(&denial.code, denial.message)
                    }
                    Decided::Approved { .. } => {
                        crate::metrics::metrics().request("failed", "firewall_failed");
                        Reply::error(
                            "firewall_failed",
                            format!("request approved but not applied, nothing changed: {e}"),
                        )
                    }
                };
                let _ = p.reply.send(reply);
            }
            return;
        }
        for d in &decided {
            if let Decided::Approved { grants, .. } = d {
                for g in grants {
                    st.note_use(g.port, &g.requester, wall);
                }
            }
        }
        st.changed();
        self.expiry_changed.notify_one();
        drop(st);
        for (p, d) in batch.into_iter().zip(decided) {
            let m = crate::metrics::metrics();
            let reply = match d {
                Decided::Denied(denial) => {
                    m.request("denied", &denial.code);
                    Reply::error(&denial.code, denial.message)
                }
                Decided::Approved {
                    grants,
                    superseded,
                    duration,
                } => {
                    m.request("approved", "");
                    m.grant_duration.observe(duration.as_secs_f64());
                    for g in &grants {
                        tracing::info!(grant = g.id, user = %g.requester, source = %format_prefix(&g.source), port = g.port, until = %g.expires_at, "access granted");
                    }
                    let grants = grants.iter().map(|g| grant_info(g, duration)).collect();
                    Reply::ok(GrantedReply { grants, superseded })
                }
            };
            let _ = p.reply.send(reply);
        }
    }
}

/// Decides one request against the book as the batch has left it so far, books an
/// approval tentatively and adds its audit records.
fn decide_one(
    st: &mut State,
    changes: &mut Changes,
    records: &mut Vec<AuditRecord>,
    pending: &Pending,
    now: Instant,
    wall: DateTime<Utc>,
) -> Decided {
    let Pending { caller, request, .. } = pending;
    let news = match check(st, caller, request, wall) {
        Ok(news) => news,
        Err(denial) => {
            if st.refusals.admit(caller.uid, &caller.name, &denial.code, wall) == Admit::Record {
                let mut r = request_record(request, wall, caller);
                r.reason = Some(format!("{}: {}", denial.code, denial.message));
                records.push(r);
            }
            return Decided::Denied(denial);
        }
    };
    let duration = news[0].duration;
    let mut grants = Vec::new();
    let mut superseded = Vec::new();
    for n in news {
        let id = st.book.allocate_id();
        let old = st.book.superseded_by(&n).cloned();
        let mut r = request_record(request, wall, caller);
        r.outcome = Outcome::Approved;
        r.ports = vec![n.port];
        r.protocol = Some(n.protocol);
        r.source = Some(format_prefix(&n.source));
        r.duration_secs = Some(n.duration.as_secs());
        r.grant_id = Some(id);
        records.push(r);
        if let Some(old) = &old {
            let mut r = grant_record(
                old,
                wall,
                Some(caller.uid),
                &caller.name,
                Action::Supersede,
                Outcome::Superseded,
            );
            r.reason = Some(format!("superseded by grant {id}"));
            records.push(r);
            changes.touch(st, old);
            let deadline = now + st.book.remaining(old.id, now).unwrap_or_default();
            changes.replaced.push((old.clone(), deadline));
        }
        let (grant, replaced) = st.book.insert(id, n, now, wall);
        changes.inserted.push(grant.id);
        changes.touch(st, &grant);
        superseded.extend(replaced.map(|g| g.id));
        grants.push(grant);
    }
    Decided::Approved {
        grants,
        superseded,
        duration,
    }
}

/// Who, what and overlap: the grants a request asks for, or the first reason it fails.
fn check(st: &State, caller: &Caller, request: &GrantRequest, wall: DateTime<Utc>) -> Result<Vec<NewGrant>, Denial> {
    policy::require_role(&st.config.access, caller, Role::Requester, "request access")?;
    let source = parse_prefix(&request.source)
        .map_err(|e| Denial::new("invalid_argument", format!("source: {e}, got {:?}", request.source)))?;
    let duration = match (request.duration_secs, request.until) {
        (Some(secs), None) => Duration::from_secs(secs),
        (None, Some(until)) => {
            let left = (until - wall)
                .to_std()
                .map_err(|_| Denial::new("duration_invalid", format!("until {until} is in the past")))?;
            // whole seconds, rounded up: the grant ends at or just after `until`
            Duration::from_secs(left.as_secs() + u64::from(left.subsec_nanos() > 0))
        }
        _ => {
            return Err(Denial::new(
                "invalid_argument",
                "give exactly one of duration_secs and until",
            ))
        }
    };
    if let Some(j) = &request.justification {
        if j.chars().count() > MAX_JUSTIFICATION_CHARS || j.chars().any(char::is_control) {
            return Err(Denial::new(
                "invalid_argument",
                format!("justification: at most {MAX_JUSTIFICATION_CHARS} characters, no control characters"),
            ));
        }
    }
    let access = AccessRequest {
        ports: request.ports.clone(),
        source,
        duration,
    };
    let entries: Vec<(u16, Protocol)> = policy::check_request(&st.config, caller, &access)?
        .into_iter()
        .map(|p| (p.port, p.protocol))
        .collect();
    let news: Vec<NewGrant> = entries
        .into_iter()
        .map(|(port, protocol)| NewGrant {
            source,
            port,
            protocol,
            requester: caller.name.clone(),
            requester_uid: caller.uid,
            justification: request.justification.clone(),
            duration,
        })
        .collect();
    for n in &news {
        st.book.check_overlap(n)?;
    }
    Ok(news)
}

impl Changes {
    /// Notes the kernel keys of `grant` as changed by this batch, remembering whether
    /// they were in the kernel before it.
    fn touch(&mut self, st: &State, grant: &Grant) {
        for key in grant.keys() {
            if self.touched.insert(key) && !self.inserted.contains(&grant.id) && st.book.get(grant.id).is_some() {
                self.in_kernel_before.insert(key);
            }
        }
    }

    /// The net kernel change: remove what the batch replaced, add what is live now.
    fn kernel_change(&self, st: &State, now: Instant) -> (Vec<GrantKey>, Vec<GrantElement>) {
        let remove = self.in_kernel_before.iter().copied().collect();
        let live: HashMap<GrantKey, Duration> = self
            .inserted
            .iter()
            .filter_map(|id| {
                st.book
                    .get(*id)
                    .map(|g| (g, st.book.remaining(*id, now).unwrap_or_default()))
            })
            .flat_map(|(g, left)| g.keys().into_iter().map(move |k| (k, left)))
            .collect();
        let add = live
            .into_iter()
            .map(|(key, timeout)| GrantElement { key, timeout })
            .collect();
        (remove, add)
    }

    /// Takes the batch's grants out of the book and puts back what they replaced.
    fn undo(self, st: &mut State) {
        for id in self.inserted.iter().rev() {
            st.book.remove(*id);
        }
        for (grant, deadline) in self.replaced.into_iter().rev() {
            if !self.inserted.contains(&grant.id) {
                st.book.restore(grant, deadline);
            }
        }
    }
}

fn failed_records(decided: &[Decided], batch: &[Pending], error: &str) -> Vec<AuditRecord> {
    let mut records = Vec::new();
    for (d, p) in decided.iter().zip(batch) {
        if let Decided::Approved { grants, .. } = d {
            for g in grants {
                let mut r = request_record(&p.request, Utc::now(), &p.caller);
                r.outcome = Outcome::Failed;
                r.ports = vec![g.port];
                r.grant_id = Some(g.id);
                r.reason = Some(format!("not applied, nothing changed: {error}"));
                records.push(r);
            }
        }
    }
    records
}

/// The audit record of a request, before its outcome is known (denied by default).
fn request_record(request: &GrantRequest, time: DateTime<Utc>, caller: &Caller) -> AuditRecord {
    let mut r = AuditRecord::new(time, Some(caller.uid), &caller.name, Action::Request, Outcome::Denied);
    r.ports = request.ports.clone();
    r.source = Some(request.source.clone());
    r.duration_secs = request
        .duration_secs
        .or_else(|| request.until.map(|u| (u - time).num_seconds().max(0) as u64));
    r.justification = request.justification.clone();
    r
}

#[cfg(test)]
mod tests {
    use super::super::tests::{daemon, outcomes, root};
    use super::*;
    use crate::api::server::Handler;

    fn pending(secs: u64) -> (Pending, oneshot::Receiver<Reply>) {
        let (reply, answer) = oneshot::channel();
        let request = GrantRequest {
            ports: vec![22],
            source: "192.0.2.7".into(),
            duration_secs: Some(secs),
            until: None,
            justification: None,
        };
        (
            Pending {
                caller: Caller {
                    uid: 0,
                    name: "root".into(),
                    groups: vec![],
                },
                request,
                reply,
            },
            answer,
        )
    }

    #[tokio::test]
    async fn requests_that_arrive_together_share_one_transaction_and_net_out() {
        let dir = tempfile::tempdir().unwrap();
        let d = daemon(dir.path()).await;
        assert!(
            d.handle(root(), super::super::tests::ask(600)).await.ok,
            "a grant already in the kernel"
        );
        // three requests for the same source and port, committed together
        let (batch, answers): (Vec<_>, Vec<_>) = [60, 70, 80].into_iter().map(pending).unzip();
        d.commit(batch).await;
        for answer in answers {
            assert!(answer.await.unwrap().ok);
        }
        assert_eq!(d.state.lock().await.book.len(), 1, "the last one stands");
        let batches = d.firewall.applied.lock().unwrap().clone();
        let last = batches.last().unwrap().to_string();
        assert_eq!(batches.len(), 3, "start, first grant, one transaction for the three");
        assert_eq!(
            last.matches("\"delete\"").count(),
            1,
            "the old element is removed once: {last}"
        );
        assert_eq!(
            last.matches("\"add\"").count(),
            1,
            "the surviving grant is added once: {last}"
        );
        assert!(last.contains("\"timeout\":80"), "{last}");
        let superseded = outcomes(dir.path())
            .iter()
            .filter(|o| **o == Outcome::Superseded)
            .count();
        assert_eq!(superseded, 3);
    }

    #[tokio::test]
    async fn a_failed_batch_is_undone_whole() {
        let dir = tempfile::tempdir().unwrap();
        let d = daemon(dir.path()).await;
        assert!(d.handle(root(), super::super::tests::ask(600)).await.ok);
        let before: Vec<Grant> = d.state.lock().await.book.iter().cloned().collect();
        *d.firewall.fail_with.lock().unwrap() = Some("Error: boom".into());
        let (batch, answers): (Vec<_>, Vec<_>) = [60, 70].into_iter().map(pending).unzip();
        d.commit(batch).await;
        for answer in answers {
            assert_eq!(answer.await.unwrap().error.unwrap().code, "firewall_failed");
        }
        let after: Vec<Grant> = d.state.lock().await.book.iter().cloned().collect();
        assert_eq!(after, before, "the replaced grant is back, the new ones are gone");
        let failed = outcomes(dir.path()).iter().filter(|o| **o == Outcome::Failed).count();
        assert_eq!(failed, 2);
        // and a restart sees the same: the replaced grant is still live
        drop(d);
        let again = daemon(dir.path()).await;
        let restored: Vec<Grant> = again.state.lock().await.book.iter().cloned().collect();
        assert_eq!(
            restored.iter().map(|g| g.id).collect::<Vec<_>>(),
            before.iter().map(|g| g.id).collect::<Vec<_>>()
        );
    }
}
