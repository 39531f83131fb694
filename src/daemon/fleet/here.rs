//! What a fleet request has on this host, read from the grant and pending books (each
//! grant and pending request names its fleet request): the one source of truth for
//! what a deletion closes, also after a restart.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use ipnet::IpNet;

use crate::daemon::Daemon;
use crate::domain::{FleetOrigin, GrantId};
use crate::firewall::Firewall;

/// What one fleet request has here now.
#[derive(Debug, Default)]
pub(super) struct Here {
    /// Its grants, with their ends.
    pub grants: Vec<(GrantId, DateTime<Utc>)>,
    /// Its requests waiting for an approver.
    pub pending: Vec<Waiting>,
    /// The etcd revision that created its key as judged here (0: none known).
    pub revision: i64,
    /// The request as judged here.
    pub origin: Option<FleetOrigin>,
}

/// A request of a fleet request waiting here for an approver.
#[derive(Debug)]
pub(super) struct Waiting {
    /// Its id in the pending book.
    pub id: GrantId,
    /// The fingerprint of the key that signed the fleet request.
    pub requester: String,
    /// SHA-256 of the fleet request's text as judged here.
    pub digest: String,
    /// Its ports.
    pub ports: Vec<u16>,
    /// Its source.
    pub source: IpNet,
}

impl Here {
    /// Nothing open and nothing waiting.
    pub fn is_empty(&self) -> bool {
        self.grants.is_empty() && self.pending.is_empty()
    }

    /// When its last grant here ends.
    pub fn until(&self) -> Option<DateTime<Utc>> {
        self.grants.iter().map(|(_, end)| *end).max()
    }
}

impl<F: Firewall> Daemon<F> {
    /// What fleet request `id` has on this host.
    pub(super) fn fleet_here(&self, id: &str) -> Here {
        let st = self.lock();
        let mut here = Here::default();
        let mut note = |origin: &FleetOrigin| {
            here.revision = here.revision.max(origin.revision);
            here.origin.get_or_insert_with(|| origin.clone());
        };
        for g in st.book.iter() {
            if let Some(o) = g.fleet.as_ref().filter(|o| o.request == id) {
                note(o);
                here.grants.push((g.id, g.expires_at));
            }
        }
        for (r, _) in st.pending.iter() {
            let Some(signer) = r.requester.signer.as_ref() else {
                continue;
            };
            if let Some(o) = signer.fleet.as_ref().filter(|o| o.request == id) {
                note(o);
                here.pending.push(Waiting {
                    id: r.id,
                    requester: signer.fingerprint.clone(),
                    digest: o.digest.clone(),
                    ports: r.ports.clone(),
                    source: r.source,
                });
            }
        }
        here
    }

    /// The fleet requests with a grant or a pending request on this host.
    pub(super) fn fleet_requests_here(&self) -> HashSet<String> {
        let st = self.lock();
        let grants = st.book.iter().filter_map(|g| g.fleet.as_ref());
        let pending = st
            .pending
            .iter()
            .filter_map(|(r, _)| r.requester.signer.as_ref().and_then(|s| s.fleet.as_ref()));
        grants.chain(pending).map(|o| o.request.clone()).collect()
    }
}
