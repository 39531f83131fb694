//! Active grants and their expiry: bookkeeping only, no I/O. Time comes in as
//! arguments (a monotonic `Instant` for deadlines, wall-clock `DateTime` for records),
//! so tests drive it without waiting.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use chrono::{DateTime, Utc};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::config::{format_prefix, Protocol};
use crate::firewall::rules::{grant_set, GrantElement, GrantKey};
use crate::policy::Denial;

/// A grant's identifier, unique across restarts (never reused).
pub type GrantId = u64;

/// An open port for one source until a deadline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// Unique id.
    pub id: GrantId,
    /// Address or prefix the port is open for.
    pub source: IpNet,
    /// The protected port.
    pub port: u16,
    /// The protocol of the port's policy entry.
    pub protocol: Protocol,
    /// Who asked, by name.
    pub requester: String,
    /// Who asked, by uid.
    pub requester_uid: u32,
    /// Why, as the requester said.
    pub justification: Option<String>,
    /// When it was approved.
    pub granted_at: DateTime<Utc>,
    /// When it ends.
    pub expires_at: DateTime<Utc>,
}

impl Grant {
    /// The set elements that carry this grant in the kernel (one per transport).
    pub fn keys(&self) -> Vec<GrantKey> {
        self.protocol
            .transports()
            .iter()
            .map(|&transport| GrantKey {
                source: self.source,
                transport,
                port: self.port,
            })
            .collect()
    }

    fn slot(&self) -> Slot {
        Slot {
            source: self.source,
            port: self.port,
            protocol: self.protocol,
        }
    }
}

/// What a new grant is made of, before it has an id and times.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewGrant {
    /// Address or prefix.
    pub source: IpNet,
    /// The protected port.
    pub port: u16,
    /// The protocol of the port's policy entry.
    pub protocol: Protocol,
    /// Who asked, by name.
    pub requester: String,
    /// Who asked, by uid.
    pub requester_uid: u32,
    /// Why.
    pub justification: Option<String>,
    /// How long.
    pub duration: Duration,
}

/// A source and port can hold one grant at a time; a newer one replaces it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Slot {
    source: IpNet,
    port: u16,
    protocol: Protocol,
}

#[derive(Debug, Clone)]
struct Entry {
    grant: Grant,
    deadline: Instant,
}

/// The live grants, indexed by id, by source and port, and by deadline.
#[derive(Debug, Default)]
pub struct GrantBook {
    entries: BTreeMap<GrantId, Entry>,
    by_slot: HashMap<Slot, GrantId>,
    deadlines: BTreeSet<(Instant, GrantId)>,
    next_id: GrantId,
}

impl GrantBook {
    /// An empty book whose first grant gets id `first_id` (at least 1).
    pub fn new(first_id: GrantId) -> GrantBook {
        GrantBook {
            next_id: first_id.max(1),
            ..GrantBook::default()
        }
    }

    /// Number of live grants.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no grant is live.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The live grants in id order.
    pub fn iter(&self) -> impl Iterator<Item = &Grant> {
        self.entries.values().map(|e| &e.grant)
    }

    /// The grant with this id.
    pub fn get(&self, id: GrantId) -> Option<&Grant> {
        self.entries.get(&id).map(|e| &e.grant)
    }

    /// The grant a new one for the same source, port and protocol would replace.
    pub fn superseded_by(&self, new: &NewGrant) -> Option<&Grant> {
        let slot = Slot {
            source: new.source,
            port: new.port,
            protocol: new.protocol,
        };
        self.by_slot.get(&slot).and_then(|id| self.get(*id))
    }

    /// Refuses a new prefix grant that overlaps another live prefix grant on the same
    /// port: the kernel's interval sets cannot hold both.
    pub fn check_overlap(&self, new: &NewGrant) -> Result<(), Denial> {
        let set = grant_set(&new.source);
        if !set.ends_with("_net") {
            return Ok(());
        }
        let clash = self.iter().find(|g| {
            g.port == new.port
                && g.source != new.source
                && grant_set(&g.source) == set
                && g.protocol.overlaps(new.protocol)
                && (g.source.contains(&new.source) || new.source.contains(&g.source))
        });
        match clash {
            None => Ok(()),
            Some(g) => Err(Denial::new(
                "overlapping_grant",
                format!(
                    "source {} overlaps grant {} for {} on port {}/{}; revoke it first or request the same prefix",
                    format_prefix(&new.source),
                    g.id,
                    format_prefix(&g.source),
                    g.port,
                    g.protocol
                ),
            )),
        }
    }

    /// Takes the next grant id (ids are never handed out twice, even if unused).
    pub fn allocate_id(&mut self) -> GrantId {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Books a new grant with an id from [`GrantBook::allocate_id`], starting now;
    /// returns it and the grant it replaced, if any.
    pub fn insert(
        &mut self,
        id: GrantId,
        new: NewGrant,
        now: Instant,
        wall_now: DateTime<Utc>,
    ) -> (Grant, Option<Grant>) {
        let superseded = self.superseded_by(&new).map(|g| g.id).and_then(|id| self.remove(id));
        self.next_id = self.next_id.max(id + 1);
        let expires_at = wall_now + chrono::Duration::from_std(new.duration).unwrap_or(chrono::TimeDelta::MAX);
        let grant = Grant {
            id,
            source: new.source,
            port: new.port,
            protocol: new.protocol,
            requester: new.requester,
            requester_uid: new.requester_uid,
            justification: new.justification,
            granted_at: wall_now,
            expires_at,
        };
        self.put(grant.clone(), now + new.duration);
        (grant, superseded)
    }

    /// Books an existing grant (restored after a restart) with its own deadline.
    pub fn restore(&mut self, grant: Grant, deadline: Instant) {
        self.next_id = self.next_id.max(grant.id + 1);
        self.put(grant, deadline);
    }

    fn put(&mut self, grant: Grant, deadline: Instant) {
        self.by_slot.insert(grant.slot(), grant.id);
        self.deadlines.insert((deadline, grant.id));
        self.entries.insert(grant.id, Entry { grant, deadline });
    }

    /// Removes a grant (revoke, supersede, policy change).
    pub fn remove(&mut self, id: GrantId) -> Option<Grant> {
        let entry = self.entries.remove(&id)?;
        self.by_slot.remove(&entry.grant.slot());
        self.deadlines.remove(&(entry.deadline, id));
        Some(entry.grant)
    }

    /// Removes and returns every grant whose deadline is at or before `now`.
    pub fn pop_expired(&mut self, now: Instant) -> Vec<Grant> {
        let due: Vec<GrantId> = self
            .deadlines
            .iter()
            .take_while(|(d, _)| *d <= now)
            .map(|(_, id)| *id)
            .collect();
        due.into_iter().filter_map(|id| self.remove(id)).collect()
    }

    /// The earliest deadline, for the expiry timer.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.first().map(|(d, _)| *d)
    }

    /// Time left on a grant at `now`.
    pub fn remaining(&self, id: GrantId, now: Instant) -> Option<Duration> {
        self.entries.get(&id).map(|e| e.deadline.saturating_duration_since(now))
    }

    /// Every live grant as kernel set elements with its remaining time at `now`.
    pub fn elements(&self, now: Instant) -> Vec<GrantElement> {
        self.entries
            .values()
            .filter(|e| e.deadline > now)
            .flat_map(|e| {
                let timeout = e.deadline - now;
                e.grant.keys().into_iter().map(move |key| GrantElement { key, timeout })
            })
            .collect()
    }

    /// The id the next grant will get.
    pub fn next_id(&self) -> GrantId {
        self.next_id
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{parse_prefix, Transport};

    fn add(book: &mut GrantBook, new: NewGrant, now: Instant, wall: DateTime<Utc>) -> (Grant, Option<Grant>) {
        let id = book.allocate_id();
        book.insert(id, new, now, wall)
    }

    fn new(source: &str, port: u16, secs: u64) -> NewGrant {
        NewGrant {
            source: parse_prefix(source).unwrap(),
            port,
            protocol: Protocol::Tcp,
            requester: "bob".into(),
            requester_uid: 1001,
            justification: None,
            duration: Duration::from_secs(secs),
        }
    }

    #[test]
    fn grants_expire_in_deadline_order() {
        let t0 = Instant::now();
        let wall = Utc::now();
        let mut book = GrantBook::new(1);
        let (a, _) = add(&mut book, new("192.0.2.1", 22, 30), t0, wall);
        let (b, _) = add(&mut book, new("192.0.2.2", 22, 10), t0, wall);
        assert_eq!((a.id, b.id), (1, 2));
        assert_eq!(a.expires_at - wall, chrono::Duration::seconds(30));
        assert_eq!(book.next_deadline(), Some(t0 + Duration::from_secs(10)));
        assert!(book.pop_expired(t0 + Duration::from_secs(9)).is_empty());
        assert_eq!(book.pop_expired(t0 + Duration::from_secs(10)), vec![b]);
        assert_eq!(
            book.remaining(a.id, t0 + Duration::from_secs(10)),
            Some(Duration::from_secs(20))
        );
        assert_eq!(book.pop_expired(t0 + Duration::from_secs(60)), vec![a]);
        assert!(book.is_empty());
        assert_eq!(book.next_deadline(), None);
    }

    #[test]
    fn a_newer_grant_for_the_same_source_and_port_replaces_the_older() {
        let t0 = Instant::now();
        let mut book = GrantBook::new(7);
        let (old, _) = add(&mut book, new("192.0.2.1", 22, 3600), t0, Utc::now());
        let (other, none) = add(&mut book, new("192.0.2.1", 3389, 3600), t0, Utc::now());
        assert!(none.is_none());
        let (newer, replaced) = add(&mut book, new("192.0.2.1", 22, 60), t0, Utc::now());
        assert_eq!(replaced, Some(old));
        assert_eq!(book.iter().map(|g| g.id).collect::<Vec<_>>(), vec![other.id, newer.id]);
        // the old deadline is gone: nothing expires at the old time but the others
        assert_eq!(book.pop_expired(t0 + Duration::from_secs(60)), vec![newer]);
    }

    #[test]
    fn overlapping_prefixes_on_one_port_are_refused() {
        let mut book = GrantBook::new(1);
        add(&mut book, new("198.51.100.0/24", 22, 60), Instant::now(), Utc::now());
        let denial = book.check_overlap(&new("198.51.0.0/16", 22, 60)).unwrap_err();
        assert_eq!(denial.code, "overlapping_grant");
        assert!(
            book.check_overlap(&new("198.51.100.0/24", 22, 60)).is_ok(),
            "same prefix replaces"
        );
        assert!(
            book.check_overlap(&new("198.51.0.0/16", 3389, 60)).is_ok(),
            "other port"
        );
        assert!(
            book.check_overlap(&new("198.51.100.7", 22, 60)).is_ok(),
            "single addresses live in another set"
        );
        assert!(book.check_overlap(&new("198.51.101.0/24", 22, 60)).is_ok(), "disjoint");
    }

    #[test]
    fn elements_carry_the_remaining_time_per_transport() {
        let t0 = Instant::now();
        let mut book = GrantBook::new(1);
        let mut any = new("2001:db8::/64", 3389, 100);
        any.protocol = Protocol::Any;
        book.insert(1, any, t0, Utc::now());
        let elements = book.elements(t0 + Duration::from_secs(40));
        assert_eq!(elements.len(), 2);
        assert_eq!(elements[0].key.transport, Transport::Tcp);
        assert_eq!(elements[1].key.transport, Transport::Udp);
        assert!(elements.iter().all(|e| e.timeout == Duration::from_secs(60)));
    }

    #[test]
    fn restored_grants_keep_their_ids_and_ids_are_not_reused() {
        let t0 = Instant::now();
        let mut first = GrantBook::new(1);
        let (g, _) = add(&mut first, new("192.0.2.1", 22, 60), t0, Utc::now());
        let mut second = GrantBook::new(1);
        second.restore(g.clone(), t0 + Duration::from_secs(30));
        assert_eq!(second.next_id(), g.id + 1);
        assert_eq!(second.get(g.id), Some(&g));
    }
}
