//! Signed approvals read from `approvals/<id>/`: the two-person rule across the fleet.
//! A host judges an approval only for a request of its own that waits for an approver
//! (anything else is none of its business): its grammar and ids, its signature against
//! this host's own `allowed_signers` in the approvals' namespace, that it names what
//! waits here (the request's text by its digest, its signer, ports, source); then the
//! daemon's one decision path decides as that approver (the approver role, never one's
//! own request, audited). Only an approval that approved something is remembered (and
//! not judged again): refused ones cannot fill the memory.

use chrono::Utc;
use etcd_client::KeyValue;

use super::apply::{signer, Judge, MAX_JUDGED};
use crate::daemon::job::Decision;
use crate::domain::{Caller, SignedBy};
use crate::firewall::Firewall;
use crate::fleet::judge::{self, Refused};

impl<F: Firewall> Judge<'_, F> {
    /// Judges one approval put under `approvals/<id>/` and hands it to the decision path
    /// for each request of `id` waiting here.
    pub async fn approve_one(&mut self, kv: &KeyValue) {
        let key = kv.key_str().unwrap_or("");
        let Some((id, approval_id)) = self.keys.approval_ids(key) else {
            let refused = Refused::malformed("the key is not approvals/<request id>/<32 hex digits>");
            return self.refuse(key, None, None, refused).await;
        };
        let here = self.daemon.fleet_here(id);
        if here.pending.is_empty() || self.memory.approvals.contains_key(key) {
            return;
        }
        if self.memory.approvals.len() >= MAX_JUDGED {
            let refused = Refused::new("too_many", "too many approvals remembered");
            return self.refuse(key, None, None, refused).await;
        }
        let Some(fleet_now) = self.daemon.config().fleet else {
            return;
        };
        let screened = match judge::screen_approval((id, approval_id), kv.value(), &fleet_now, Utc::now()) {
            Ok(s) => s,
            Err(r) => return self.refuse(key, None, None, r).await,
        };
        let verified = tokio::task::spawn_blocking(move || judge::verify_approval(screened, Utc::now())).await;
        let (approval, by) = match verified {
            Ok(Ok(v)) => v,
            Ok(Err(r)) => return self.refuse(key, None, None, r).await,
            Err(e) => return self.refuse(key, None, None, Refused::malformed(&e.to_string())).await,
        };
        let approver = SignedBy {
            fleet: here.origin.clone(),
            ..signer(by)
        };
        for waiting in &here.pending {
            let covered = judge::approval_covers(
                &approval,
                &waiting.requester,
                &waiting.digest,
                &waiting.ports,
                &waiting.source,
            );
            if let Err(r) = covered {
                self.refuse(key, Some(id), Some(approver.clone()), r).await;
                continue;
            }
            let (caller, pending) = (Caller::signed(approver.clone()), waiting.id);
            match self.daemon.decide(caller, Decision::approve(pending, None)).await.error {
                None => {
                    // approved: not judged again (forgotten a day on, past any request's end)
                    let forget_at = Utc::now() + crate::store::FLEET_MEMORY;
                    self.memory.approvals.insert(key.to_string(), forget_at);
                    tracing::info!(request = %id, pending, "fleet request approved by {}", approver.principals.join(","))
                }
                // refused and audited by the decision path (not an approver, one's own request)
                Some(e) => tracing::info!(request = %id, pending, "fleet approval refused: {}", e.message),
            }
        }
        self.follow(id).await;
    }
}
