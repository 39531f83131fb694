//! Active grants and their expiry: bookkeeping only, no I/O. Time comes in as
//! arguments (a monotonic `Instant` for deadlines, wall-clock `DateTime` for records),
//! so tests drive it without waiting.
//!
//! A grant belongs to its requester: a newer request replaces only the same
//! requester's grant for the same source, port and protocol (an admin's replaces
//! anyone's). Several grants may therefore cover the same address; the kernel holds one
//! element per address (or per disjoint piece of overlapping prefixes, see [`cover`])
//! lasting as long as the longest of them.

pub mod cover;
pub mod usage;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::domain::{GrantElement, GrantId, GrantKey, Protocol, Transport};

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
    /// Who asked, by uid ([`crate::domain::REMOTE_UID`] for a signed remote knock).
    pub requester_uid: u32,
    /// For a signed remote knock: the principals its key vouched for (the policy
    /// re-checks their role at reload and restart); empty for a local requester.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<String>,
    /// For a grant a fleet request opened: that request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<crate::domain::FleetOrigin>,
    /// Why, as the requester said.
    pub justification: Option<String>,
    /// When it was approved.
    pub granted_at: DateTime<Utc>,
    /// When it ends.
    pub expires_at: DateTime<Utc>,
}

impl Grant {
    /// The set elements that carry this grant in the kernel (one per transport) when
    /// no other grant overlaps it.
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

    /// How long it was approved for.
    pub fn approved_duration(&self) -> Duration {
        (self.expires_at - self.granted_at).to_std().unwrap_or_default()
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
    /// The principals of a signed remote requester.
    pub principals: Vec<String>,
    /// The fleet request it comes from, if any.
    pub fleet: Option<crate::domain::FleetOrigin>,
    /// Why.
    pub justification: Option<String>,
    /// How long.
    pub duration: Duration,
}

/// Whether `new` is asked by the requester of `g`, as [`GrantBook::superseded_by`] sees it.
fn same_requester(g: &Grant, new: &NewGrant) -> bool {
    let request = |f: &Option<crate::domain::FleetOrigin>| f.as_ref().map(|o| o.request.clone());
    g.requester_uid == new.requester_uid
        && (g.requester_uid != crate::domain::REMOTE_UID
            || (g.principals == new.principals && request(&g.fleet) == request(&new.fleet)))
}

/// The ids in `deadlines` (ordered by deadline) whose deadline is at or before `now`.
pub fn due(deadlines: &std::collections::BTreeSet<(Instant, GrantId)>, now: Instant) -> Vec<GrantId> {
    deadlines
        .iter()
        .take_while(|(d, _)| *d <= now)
        .map(|(_, id)| *id)
        .collect()
}

/// Grants for the same source, port and protocol share a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Slot {
    source: IpNet,
    port: u16,
    protocol: Protocol,
}

/// The kernel elements of prefix grants are computed per port, transport and family.
type NetGroup = (u16, Transport, bool);

#[derive(Debug, Clone)]
struct Entry {
    grant: Grant,
    deadline: Instant,
}

/// Which kernel elements a change may have altered: single-address keys, and groups of
/// prefix grants (whose pieces are recomputed whole).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Touched {
    singles: HashSet<GrantKey>,
    groups: HashSet<NetGroup>,
}

impl Touched {
    /// Notes the elements `grant` lives in.
    pub fn add(&mut self, grant: &Grant) {
        self.add_slot(grant.source, grant.port, grant.protocol);
    }

    /// Notes the elements a grant for `source`, `port` and `protocol` lives in.
    pub fn add_slot(&mut self, source: IpNet, port: u16, protocol: Protocol) {
        for &transport in protocol.transports() {
            self.add_key(&GrantKey {
                source,
                transport,
                port,
            });
        }
    }

    /// Notes one kernel element.
    pub fn add_key(&mut self, key: &GrantKey) {
        if is_single(&key.source) {
            self.singles.insert(*key);
        } else {
            self.groups.insert(group_of(key));
        }
    }

    /// Adds everything `other` touched.
    pub fn merge(&mut self, other: &Touched) {
        self.singles.extend(other.singles.iter().copied());
        self.groups.extend(other.groups.iter().copied());
    }

    /// What `self` touched that `other` did not.
    pub fn minus(&self, other: &Touched) -> Touched {
        Touched {
            singles: self.singles.difference(&other.singles).copied().collect(),
            groups: self.groups.difference(&other.groups).copied().collect(),
        }
    }

    /// Whether the kernel element `key` is among the touched ones.
    pub fn covers(&self, key: &GrantKey) -> bool {
        if is_single(&key.source) {
            self.singles.contains(key)
        } else {
            self.groups.contains(&group_of(key))
        }
    }

    /// Whether nothing was touched.
    pub fn is_empty(&self) -> bool {
        self.singles.is_empty() && self.groups.is_empty()
    }
}

/// A kernel element as the book wants it: what it matches and until when.
pub type Placed = (GrantKey, Instant);

/// The live grants, indexed by id, by source and port, and by deadline.
#[derive(Debug, Default)]
pub struct GrantBook {
    entries: BTreeMap<GrantId, Entry>,
    by_slot: HashMap<Slot, Vec<GrantId>>,
    nets: HashMap<NetGroup, Vec<GrantId>>,
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

    /// The live grants with ids above `after` (all of them without), in id order: a
    /// page of `status` starts here without walking the grants before it.
    pub fn iter_after(&self, after: Option<GrantId>) -> impl Iterator<Item = &Grant> {
        use std::ops::Bound::{Excluded, Unbounded};
        let from = after.map_or(Unbounded, Excluded);
        self.entries.range((from, Unbounded)).map(|(_, e)| &e.grant)
    }

    /// The grant with this id.
    pub fn get(&self, id: GrantId) -> Option<&Grant> {
        self.entries.get(&id).map(|e| &e.grant)
    }

    /// The grants a new one replaces: the same requester's for the same source, port
    /// and protocol, or, when `any_owner` (an admin asking), everyone's. Signed remote
    /// requesters share one uid, so for them the same requester is the same principals
    /// and the same fleet request (a knock renews the same principals' knock; grants of
    /// two fleet requests live side by side, each closed by its own request).
    pub fn superseded_by(&self, new: &NewGrant, any_owner: bool) -> Vec<&Grant> {
        let slot = Slot {
            source: new.source,
            port: new.port,
            protocol: new.protocol,
        };
        self.by_slot
            .get(&slot)
            .into_iter()
            .flatten()
            .filter_map(|id| self.get(*id))
            .filter(|g| any_owner || same_requester(g, new))
            .collect()
    }

    /// Takes the next grant id (ids are never handed out twice, even if unused).
    pub fn allocate_id(&mut self) -> GrantId {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Books a new grant with an id from [`GrantBook::allocate_id`], starting now.
    /// Replacing older grants is the caller's business ([`GrantBook::superseded_by`]).
    pub fn insert(&mut self, id: GrantId, new: NewGrant, now: Instant, wall_now: DateTime<Utc>) -> Grant {
        self.next_id = self.next_id.max(id + 1);
        let expires_at = wall_now + chrono::Duration::from_std(new.duration).unwrap_or(chrono::TimeDelta::MAX);
        let grant = Grant {
            id,
            source: new.source,
            port: new.port,
            protocol: new.protocol,
            requester: new.requester,
            requester_uid: new.requester_uid,
            principals: new.principals,
            fleet: new.fleet,
            justification: new.justification,
            granted_at: wall_now,
            expires_at,
        };
        self.put(grant.clone(), now + new.duration);
        grant
    }

    /// Books an existing grant (restored after a restart, or put back by an undo) with
    /// its own deadline.
    pub fn restore(&mut self, grant: Grant, deadline: Instant) {
        self.next_id = self.next_id.max(grant.id + 1);
        self.put(grant, deadline);
    }

    fn put(&mut self, grant: Grant, deadline: Instant) {
        self.by_slot.entry(grant.slot()).or_default().push(grant.id);
        if !is_single(&grant.source) {
            for key in grant.keys() {
                self.nets.entry(group_of(&key)).or_default().push(grant.id);
            }
        }
        self.deadlines.insert((deadline, grant.id));
        self.entries.insert(grant.id, Entry { grant, deadline });
    }

    /// Removes a grant (revoke, supersede, policy change, expiry) and returns it with
    /// its deadline.
    pub fn remove(&mut self, id: GrantId) -> Option<(Grant, Instant)> {
        let entry = self.entries.remove(&id)?;
        let slot = entry.grant.slot();
        if let Some(ids) = self.by_slot.get_mut(&slot) {
            ids.retain(|i| *i != id);
            if ids.is_empty() {
                self.by_slot.remove(&slot);
            }
        }
        if !is_single(&entry.grant.source) {
            for key in entry.grant.keys() {
                let group = group_of(&key);
                if let Some(ids) = self.nets.get_mut(&group) {
                    ids.retain(|i| *i != id);
                    if ids.is_empty() {
                        self.nets.remove(&group);
                    }
                }
            }
        }
        self.deadlines.remove(&(entry.deadline, id));
        Some((entry.grant, entry.deadline))
    }

    /// Removes and returns every grant whose deadline is at or before `now`.
    pub fn pop_expired(&mut self, now: Instant) -> Vec<Grant> {
        due(&self.deadlines, now)
            .into_iter()
            .filter_map(|id| self.remove(id))
            .map(|(g, _)| g)
            .collect()
    }

    /// The earliest deadline, for the expiry timer.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.first().map(|(d, _)| *d)
    }

    /// A grant's deadline.
    pub fn deadline(&self, id: GrantId) -> Option<Instant> {
        self.entries.get(&id).map(|e| e.deadline)
    }

    /// Time left on a grant at `now`.
    pub fn remaining(&self, id: GrantId, now: Instant) -> Option<Duration> {
        self.deadline(id).map(|d| d.saturating_duration_since(now))
    }

    /// Every kernel element the live grants need, with its deadline; elements whose
    /// deadline has passed by `now` are left out (the kernel dropped them).
    pub fn elements(&self, now: Instant) -> Vec<Placed> {
        let mut touched = Touched::default();
        for e in self.entries.values() {
            touched.add(&e.grant);
        }
        self.elements_of(&touched, now)
    }

    /// The kernel elements of the touched keys and groups, as the book now wants them.
    pub fn elements_of(&self, touched: &Touched, now: Instant) -> Vec<Placed> {
        let mut out: Vec<Placed> = touched
            .singles
            .iter()
            .filter_map(|key| self.single_deadline(key).map(|d| (*key, d)))
            .collect();
        for group in &touched.groups {
            out.extend(self.group_elements(group));
        }
        out.retain(|(_, deadline)| *deadline > now);
        out.sort_by_key(|(k, _)| *k);
        out
    }

    /// The latest deadline of the grants for one address, transport and port.
    fn single_deadline(&self, key: &GrantKey) -> Option<Instant> {
        self.single_ids(key).filter_map(|id| self.deadline(*id)).max()
    }

    /// The grants of one address, transport and port: those whose protocol is the
    /// key's transport or `any`.
    fn single_ids<'a>(&'a self, key: &GrantKey) -> impl Iterator<Item = &'a GrantId> + 'a {
        let protocols = match key.transport {
            Transport::Tcp => [Protocol::Tcp, Protocol::Any],
            Transport::Udp => [Protocol::Udp, Protocol::Any],
        };
        let (source, port) = (key.source, key.port);
        protocols
            .into_iter()
            .filter_map(move |protocol| self.by_slot.get(&Slot { source, port, protocol }))
            .flatten()
    }

    fn group_elements(&self, group: &NetGroup) -> Vec<Placed> {
        let (port, transport, _) = *group;
        let grants: Vec<(IpNet, Instant)> = self
            .nets
            .get(group)
            .into_iter()
            .flatten()
            .filter_map(|id| self.entries.get(id))
            .map(|e| (e.grant.source, e.deadline))
            .collect();
        cover::decompose(&grants)
            .into_iter()
            .map(|(source, deadline)| {
                (
                    GrantKey {
                        source,
                        transport,
                        port,
                    },
                    deadline,
                )
            })
            .collect()
    }

    /// The live grants `key` carries ([`usage::covers`]), to which the connections it
    /// counts are credited, and the prefix grants hidden in it ([`usage::hidden_in`]).
    pub fn covering(&self, key: &GrantKey) -> (Vec<GrantId>, Vec<GrantId>) {
        let ids: Vec<GrantId> = if is_single(&key.source) {
            self.single_ids(key).copied().collect()
        } else {
            self.nets.get(&group_of(key)).cloned().unwrap_or_default()
        };
        let of = |test: fn(&Grant, &GrantKey) -> bool| {
            ids.iter()
                .copied()
                .filter(|id| self.get(*id).is_some_and(|g| test(g, key)))
                .collect::<Vec<_>>()
        };
        (of(usage::covers), of(usage::hidden_in))
    }

    /// The kernel elements that carry `grants` (with the book as it is, whatever their
    /// deadlines): their own keys, or for a prefix the pieces inside it and the wider
    /// piece that may have absorbed it. Sorted, each once.
    pub fn element_keys_of(&self, grants: &[&Grant]) -> Vec<GrantKey> {
        let mut keys = Vec::new();
        let mut groups: HashMap<NetGroup, Vec<IpNet>> = HashMap::new();
        for g in grants {
            if is_single(&g.source) {
                keys.extend(g.keys());
            } else {
                for k in g.keys() {
                    groups.entry(group_of(&k)).or_default().push(g.source);
                }
            }
        }
        for (group, sources) in groups {
            keys.extend(
                self.group_elements(&group)
                    .into_iter()
                    .map(|(key, _)| key)
                    .filter(|key| {
                        sources
                            .iter()
                            .any(|s| s.contains(&key.source) || key.source.contains(s))
                    }),
            );
        }
        keys.sort();
        keys.dedup();
        keys
    }

    /// The live grants whose deadline is at or before `by`, earliest first.
    pub fn due_by(&self, by: Instant) -> Vec<&Grant> {
        self.deadlines
            .iter()
            .take_while(|(d, _)| *d <= by)
            .filter_map(|(_, id)| self.get(*id))
            .collect()
    }

    /// The earliest deadline after `after`.
    pub fn next_deadline_after(&self, after: Instant) -> Option<Instant> {
        use std::ops::Bound::{Excluded, Unbounded};
        self.deadlines
            .range((Excluded((after, GrantId::MAX)), Unbounded))
            .next()
            .map(|(d, _)| *d)
    }

    /// The id the next grant will get.
    pub fn next_id(&self) -> GrantId {
        self.next_id
    }
}

/// The kernel change from `before` to `after` (both from [`GrantBook::elements_of`] on
/// the same touched set): elements to delete, and elements to add with their timeout
/// counted from `now`. An element whose deadline moved is deleted and added again.
pub fn element_change(before: &[Placed], after: &[Placed], now: Instant) -> (Vec<GrantKey>, Vec<GrantElement>) {
    let old: HashMap<GrantKey, Instant> = before.iter().copied().collect();
    let new: HashMap<GrantKey, Instant> = after.iter().copied().collect();
    let mut remove: Vec<GrantKey> = old
        .iter()
        .filter(|(k, d)| new.get(k) != Some(d))
        .map(|(k, _)| *k)
        .collect();
    let mut add: Vec<GrantElement> = new
        .iter()
        .filter(|(k, d)| old.get(k) != Some(d))
        .map(|(key, deadline)| GrantElement {
            key: *key,
            timeout: deadline.saturating_duration_since(now),
        })
        .collect();
    remove.sort();
    add.sort_by_key(|e| e.key);
    (remove, add)
}

/// Converts placed elements to kernel elements with timeouts counted from `now`.
pub fn timed(placed: &[Placed], now: Instant) -> Vec<GrantElement> {
    placed
        .iter()
        .map(|(key, deadline)| GrantElement {
            key: *key,
            timeout: deadline.saturating_duration_since(now),
        })
        .collect()
}

fn is_single(source: &IpNet) -> bool {
    source.prefix_len() == source.max_prefix_len()
}

fn group_of(key: &GrantKey) -> NetGroup {
    (key.port, key.transport, matches!(key.source, IpNet::V6(_)))
}

/// The end of `grant` cut from `left` to `allowed` time left: its own end moved back by
/// the difference, not the wall clock now plus `allowed` (the wall clock may have stepped
/// since it was granted; the length on record must only ever shrink).
pub fn shortened(grant: &Grant, left: Duration, allowed: Duration) -> DateTime<Utc> {
    let cut = chrono::Duration::from_std(left.saturating_sub(allowed)).unwrap_or_default();
    grant.expires_at - cut
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::parse_prefix;

    fn add(book: &mut GrantBook, new: NewGrant, now: Instant, wall: DateTime<Utc>) -> Grant {
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
            principals: Vec::new(),
            fleet: None,
            justification: None,
            duration: Duration::from_secs(secs),
        }
    }

    fn by(uid: u32, mut n: NewGrant) -> NewGrant {
        n.requester_uid = uid;
        n.requester = format!("user{uid}");
        n
    }

    #[test]
    fn grants_expire_in_deadline_order() {
        let t0 = Instant::now();
        let wall = Utc::now();
        let mut book = GrantBook::new(1);
        let a = add(&mut book, new("192.0.2.1", 22, 30), t0, wall);
        let b = add(&mut book, new("192.0.2.2", 22, 10), t0, wall);
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
    fn a_grant_is_superseded_only_by_its_owner_or_an_admin() {
        let t0 = Instant::now();
        let mut book = GrantBook::new(7);
        let mine = add(&mut book, by(1001, new("192.0.2.1", 22, 3600)), t0, Utc::now());
        let theirs = add(&mut book, by(1002, new("192.0.2.1", 22, 3600)), t0, Utc::now());
        let ask = by(1002, new("192.0.2.1", 22, 1));
        let ids = |v: Vec<&Grant>| v.iter().map(|g| g.id).collect::<Vec<_>>();
        assert_eq!(ids(book.superseded_by(&ask, false)), vec![theirs.id]);
        assert_eq!(ids(book.superseded_by(&ask, true)), vec![mine.id, theirs.id]);
        assert!(book
            .superseded_by(&by(1001, new("192.0.2.1", 3389, 1)), false)
            .is_empty());
    }

    #[test]
    fn signed_requesters_replace_only_their_own_knock_and_fleet_requests_live_side_by_side() {
        let t0 = Instant::now();
        let mut book = GrantBook::new(1);
        let signed = |principal: &str, fleet: Option<&str>| NewGrant {
            principals: vec![principal.to_string()],
            fleet: fleet.map(|id| crate::domain::FleetOrigin {
                request: id.into(),
                hosts: vec!["group:web".into()],
                revision: 7,
                digest: String::new(),
            }),
            ..by(crate::domain::REMOTE_UID, new("192.0.2.1", 22, 3600))
        };
        let knock = add(&mut book, signed("alice", None), t0, Utc::now());
        let fleet_a = add(&mut book, signed("alice", Some("aa")), t0, Utc::now());
        let ids = |v: Vec<&Grant>| v.iter().map(|g| g.id).collect::<Vec<_>>();
        assert_eq!(ids(book.superseded_by(&signed("alice", None), false)), vec![knock.id]);
        assert!(book.superseded_by(&signed("mallory", None), false).is_empty());
        assert!(book.superseded_by(&signed("alice", Some("bb")), false).is_empty());
        assert!(book.superseded_by(&signed("mallory", Some("aa")), false).is_empty());
        assert_eq!(
            ids(book.superseded_by(&signed("alice", Some("aa")), false)),
            vec![fleet_a.id]
        );
    }

    #[test]
    fn a_shared_address_lasts_as_long_as_its_longest_grant() {
        let t0 = Instant::now();
        let mut book = GrantBook::new(1);
        let short = add(&mut book, by(1, new("192.0.2.1", 22, 60)), t0, Utc::now());
        let long = add(&mut book, by(2, new("192.0.2.1", 22, 600)), t0, Utc::now());
        let mut touched = Touched::default();
        touched.add(&long);
        let before = book.elements_of(&touched, t0);
        assert_eq!(before.len(), 1);
        assert_eq!(before[0].1, t0 + Duration::from_secs(600));
        // revoking the long one leaves the element to the short one
        book.remove(long.id);
        let after = book.elements_of(&touched, t0);
        let (remove, add) = element_change(&before, &after, t0);
        assert_eq!(remove, vec![short.keys()[0]]);
        assert_eq!(add.len(), 1);
        assert_eq!(add[0].timeout, Duration::from_secs(60));
    }

    #[test]
    fn overlapping_prefixes_of_different_requesters_both_hold() {
        let t0 = Instant::now();
        let mut book = GrantBook::new(1);
        add(&mut book, by(1, new("198.51.100.0/30", 22, 600)), t0, Utc::now());
        let wide = add(&mut book, by(2, new("198.51.0.0/16", 22, 60)), t0, Utc::now());
        let elements = book.elements(t0);
        let at = |ip: &str| {
            let ip: std::net::IpAddr = ip.parse().unwrap();
            let hits: Vec<_> = elements.iter().filter(|(k, _)| k.source.contains(&ip)).collect();
            assert_eq!(hits.len(), 1, "{ip}: {elements:?}");
            hits[0].1 - t0
        };
        assert_eq!(at("198.51.100.1"), Duration::from_secs(600));
        assert_eq!(at("198.51.9.9"), Duration::from_secs(60));
        // the wide one revoked: only the /30 stays, whole
        book.remove(wide.id);
        let left = book.elements(t0);
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].0.source, parse_prefix("198.51.100.0/30").unwrap());
    }

    #[test]
    fn elements_carry_each_transport() {
        let t0 = Instant::now();
        let mut book = GrantBook::new(1);
        let mut any = new("2001:db8::/64", 3389, 100);
        any.protocol = Protocol::Any;
        book.insert(1, any, t0, Utc::now());
        let elements = timed(&book.elements(t0), t0 + Duration::from_secs(40));
        assert_eq!(elements.len(), 2);
        assert_eq!(elements[0].key.transport, Transport::Tcp);
        assert_eq!(elements[1].key.transport, Transport::Udp);
        assert!(elements.iter().all(|e| e.timeout == Duration::from_secs(60)));
        assert!(
            book.elements(t0 + Duration::from_secs(100)).is_empty(),
            "gone at the deadline"
        );
    }

    #[test]
    fn restored_grants_keep_their_ids_and_ids_are_not_reused() {
        let t0 = Instant::now();
        let mut first = GrantBook::new(1);
        let g = add(&mut first, new("192.0.2.1", 22, 60), t0, Utc::now());
        let mut second = GrantBook::new(1);
        second.restore(g.clone(), t0 + Duration::from_secs(30));
        assert_eq!(second.next_id(), g.id + 1);
        assert_eq!(second.get(g.id), Some(&g));
    }
}
