//! What the watcher says: a host's answer to a request under `status/<id>/<host>`, and
//! the audit record of a request or approval refused before the policy saw it.

use chrono::{DateTime, Utc};
use etcd_client::PutOptions;

use super::apply::Judge;
use super::Etcd;
use crate::audit::limit::Admit;
use crate::audit::{Action, AuditRecord, Outcome as AuditOutcome};
use crate::domain::SignedBy;
use crate::firewall::Firewall;
use crate::fleet::judge::Refused;
use crate::fleet::records::{Outcome, StatusRecord};

/// The longest refusal reason recorded.
const MAX_REASON: usize = 300;

impl<F: Firewall> Judge<'_, F> {
    /// Writes `status/<id>/<host>` on the request's lease, so that the answer goes with
    /// the request (none for a request without a lease: it would outlive everything);
    /// a failure is only logged (the host's own audit is the record).
    pub(super) async fn write_status(
        &mut self,
        id: &str,
        lease: i64,
        outcome: Outcome,
        until: Option<DateTime<Utc>>,
        reason: Option<String>,
    ) {
        if lease == 0 {
            return;
        }
        let record = StatusRecord {
            host: self.fleet.name.clone(),
            outcome,
            until,
            reason,
            time: Utc::now(),
        };
        let value = serde_json::to_string(&record).expect("records serialize");
        let key = self.keys.status(id, &self.fleet.name);
        let options = Some(PutOptions::new().with_lease(lease));
        if let Err(e) = self.client.put(key, value, options).await {
            tracing::debug!(request = %id, "fleet: status not written: {e}");
        }
    }

    /// Audits a fleet request or approval (under `key`) refused before the policy: in
    /// full, or counted into the next summary when many come at once (anyone who can
    /// write to etcd shares one budget). `id` names the request only when a known key
    /// signed it (a restarted host then remembers it as judged); `signer` says who.
    pub(super) async fn refuse(&mut self, key: &str, id: Option<&str>, signer: Option<SignedBy>, refused: Refused) {
        // the key as etcd has it, less the prefix every key shares; anyone's text
        let short = key.strip_prefix(self.fleet.prefix.as_str()).unwrap_or(key);
        let short = crate::text::escape_capped(short, 100);
        let mut records = self.memory.refusals.due_summaries(Utc::now());
        if self.memory.refusals.admit(Etcd, "etcd", refused.code, Utc::now()) == Admit::Count {
            if !records.is_empty() {
                let _ = self.daemon.jobs.send(crate::daemon::Job::Record(records)).await;
            }
            return;
        }
        tracing::info!(key = %short, code = refused.code, "fleet key refused: {}", crate::text::escape_capped(&refused.reason, MAX_REASON));
        let actor = signer
            .as_ref()
            .and_then(|s| s.principals.first())
            .map_or_else(|| "-".to_string(), |p| format!("principal:{p}"));
        let mut r = AuditRecord::new(Utc::now(), None, &actor, Action::Fleet, AuditOutcome::Denied);
        let why = crate::text::escape_capped(&refused.reason, MAX_REASON);
        r.reason = Some(format!("{}: {short}: {why}", refused.code));
        r.fleet_request = id.map(str::to_string);
        if let Some(s) = signer {
            r.principals = s.principals;
            r.key = Some(s.fingerprint);
        }
        records.push(r);
        let _ = self.daemon.jobs.send(crate::daemon::Job::Record(records)).await;
    }
}
