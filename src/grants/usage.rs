//! What each grant admitted (pure bookkeeping, no I/O).
//!
//! The kernel counts per grant *element*: every element of the grant sets has a counter
//! of the packets its lookup let in, that is of the new connections it admitted (a TCP
//! SYN, a UDP packet of a flow the host has not answered yet; see
//! [`crate::firewall::rules::to_json`]). Elements are not grants: several grants may
//! share one (two requesters, one address), a prefix grant may be carried by several
//! pieces ([`super::cover`]), and jitd deletes and re-adds an element whenever its end
//! moves, which starts its counter again. So jitd keeps a [`Ledger`]: the count it last
//! read from each element, and the connections credited to each grant. Reading an
//! element credits what it counted since the last reading to every grant that covered
//! it meanwhile; the caller reads before it changes who covers an element or deletes
//! it, so that the credit goes to the grants of that time.
//!
//! One case cannot be told apart: a prefix grant nested in a wider one that ends later
//! is carried by the wider grant's element ([`super::cover`] keeps it whole), whose
//! counter mixes both. A connection through such an element may or may not have come
//! from the nested grant's prefix; that grant's count is then unknown ([`hidden_in`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::Grant;
use crate::domain::{GrantId, GrantKey, Transport};

/// Connections per grant, and the count last read from each kernel element.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Ledger {
    /// The count last read from each element jitd placed (absent: zero, which is what
    /// a freshly added element counts from).
    seen: HashMap<GrantKey, u64>,
    /// Connections credited to each live grant (absent: none).
    counts: HashMap<GrantId, u64>,
    /// Grants that may have admitted connections through a wider grant's element:
    /// their count is unknown.
    unknown: BTreeSet<GrantId>,
    /// Grants that ended while jitd was not running: their elements, and the counters
    /// with them, went at their timeout unread; their count is unknown too.
    unwatched: BTreeSet<GrantId>,
    /// When the last reading of every element began.
    counted_at: Option<DateTime<Utc>>,
    /// A grant was used for the first time (or its count became unknown) since
    /// [`Ledger::take_news`] was last asked.
    news: bool,
}

impl Ledger {
    /// What element `key` counted since it was last read, given that it counts `now`
    /// (a count below the last one means the element was added afresh since: all of it
    /// is new).
    pub fn delta(&self, key: &GrantKey, now: u64) -> u64 {
        let before = self.seen.get(key).copied().unwrap_or(0);
        if now >= before {
            now - before
        } else {
            now
        }
    }

    /// Notes that element `key` counts `now`, and credits what it counted since the last
    /// reading to each of `grants` (those that covered it meanwhile); the count of each
    /// of `hidden` (nested in it, [`hidden_in`]) becomes unknown if it counted any.
    /// Returns that delta.
    pub fn observe(&mut self, key: GrantKey, now: u64, grants: &[GrantId], hidden: &[GrantId]) -> u64 {
        let delta = self.delta(&key, now);
        if delta > 0 {
            for id in grants {
                let count = self.counts.entry(*id).or_default();
                self.news |= *count == 0;
                *count += delta;
            }
            for id in hidden {
                self.news |= self.unknown.insert(*id);
            }
        }
        if now == 0 {
            self.seen.remove(&key);
        } else {
            self.seen.insert(key, now);
        }
        delta
    }

    /// The connections credited to grant `id` so far; `None` when its count is unknown
    /// (connections went through a wider grant's element it shares).
    pub fn count(&self, id: GrantId) -> Option<u64> {
        if self.unknown.contains(&id) || self.unwatched.contains(&id) {
            return None;
        }
        Some(self.credited(id))
    }

    /// What was credited to grant `id`, known or not to be all it admitted.
    pub fn credited(&self, id: GrantId) -> u64 {
        self.counts.get(&id).copied().unwrap_or(0)
    }

    /// Grant `id` ended while jitd was not running: what it admitted after jitd's last
    /// reading went unread with its element.
    pub fn unwatched(&mut self, id: GrantId) {
        self.unwatched.insert(id);
    }

    /// Whether grant `id` ended while jitd was not running ([`Ledger::unwatched`]).
    pub fn is_unwatched(&self, id: GrantId) -> bool {
        self.unwatched.contains(&id)
    }

    /// Element `key` was added (again): its counter starts from zero.
    pub fn fresh(&mut self, key: &GrantKey) {
        self.seen.remove(key);
    }

    /// Every element was added afresh (the table was replaced) or is gone.
    pub fn all_fresh(&mut self) {
        self.seen.clear();
    }

    /// Keeps the last counts of only the elements `keep` says are still there.
    pub fn retain_elements(&mut self, mut keep: impl FnMut(&GrantKey) -> bool) {
        self.seen.retain(|k, _| keep(k));
    }

    /// Grant `id` has ended and its count is on record.
    pub fn forget(&mut self, id: GrantId) {
        self.counts.remove(&id);
        self.unknown.remove(&id);
        self.unwatched.remove(&id);
    }

    /// Whether a grant was used for the first time, or its count became unknown, since
    /// this was last asked: worth a checkpoint, so that after a reboot (which takes
    /// the kernel's counters with it) a used grant is never recorded as unused.
    pub fn take_news(&mut self) -> bool {
        std::mem::take(&mut self.news)
    }

    /// Notes when a reading of every element began.
    pub fn counted(&mut self, at: DateTime<Utc>) {
        self.counted_at = Some(at);
    }

    /// When the last reading of every element began, if there was one.
    pub fn counted_at(&self) -> Option<DateTime<Utc>> {
        self.counted_at
    }

    /// The ledger as the grants checkpoint keeps it (only what is not zero).
    pub fn saved(&self) -> SavedLedger {
        let mut elements: Vec<SavedElement> = self
            .seen
            .iter()
            .map(|(k, n)| SavedElement {
                source: k.source,
                transport: k.transport,
                port: k.port,
                packets: *n,
            })
            .collect();
        elements.sort_by_key(|e| (e.source, e.transport, e.port));
        SavedLedger {
            connections: self.counts.iter().map(|(id, n)| (*id, *n)).collect(),
            elements,
            unknown: self.unknown.clone(),
        }
    }

    /// The ledger a checkpoint kept, for the grants `live` among its grants.
    pub fn restored(saved: &SavedLedger, live: impl Fn(GrantId) -> bool) -> Ledger {
        Ledger {
            seen: saved
                .elements
                .iter()
                .filter(|e| e.packets > 0)
                .map(|e| {
                    let key = GrantKey {
                        source: e.source,
                        transport: e.transport,
                        port: e.port,
                    };
                    (key, e.packets)
                })
                .collect(),
            counts: saved
                .connections
                .iter()
                .filter(|(id, n)| **n > 0 && live(**id))
                .map(|(id, n)| (*id, *n))
                .collect(),
            unknown: saved.unknown.iter().copied().filter(|id| live(*id)).collect(),
            unwatched: BTreeSet::new(),
            counted_at: None,
            news: false,
        }
    }

    /// Credits every element's count in `counts` (a reading of the whole table: the
    /// elements that counted anything) to the grants among `grants` that cover it
    /// (start-up: the grants are not booked yet). Returns how many new connections the
    /// elements counted (each once, however many grants share it).
    pub fn observe_all(&mut self, counts: &HashMap<GrantKey, u64>, grants: &[Grant]) -> u64 {
        let changed: Vec<(GrantKey, u64)> = counts
            .iter()
            .filter(|(k, n)| self.delta(k, **n) > 0)
            .map(|(k, n)| (*k, *n))
            .collect();
        let mut credited = 0;
        if !changed.is_empty() {
            let index = CoverIndex::new(grants);
            for (key, now) in changed {
                let (grants, hidden) = index.covering(&key);
                credited += self.observe(key, now, &grants, &hidden);
            }
        }
        // elements that counted nothing (or are gone) count from zero from here on
        self.seen.retain(|k, _| counts.contains_key(k));
        credited
    }
}

/// Whether `grant` is one of the grants whose element is `key`: a single address's
/// grant only for its own element, a prefix grant for the pieces inside its prefix,
/// each for the transports of its protocol on its port. (A connection from an address
/// that both a single-address grant and a prefix grant open is looked up in the
/// single addresses' set first, and counts for those grants.)
pub fn covers(grant: &Grant, key: &GrantKey) -> bool {
    grant.port == key.port
        && grant.protocol.transports().contains(&key.transport)
        && if is_single(&key.source) {
            grant.source == key.source
        } else {
            !is_single(&grant.source) && grant.source.contains(&key.source)
        }
}

/// Whether `grant` is a prefix grant carried, at least in part, by element `key`, a
/// piece wider than its prefix (a wider grant's element that absorbed it): the piece's
/// counter counts its connections together with others'.
pub fn hidden_in(grant: &Grant, key: &GrantKey) -> bool {
    grant.port == key.port
        && grant.protocol.transports().contains(&key.transport)
        && !is_single(&grant.source)
        && key.source != grant.source
        && key.source.contains(&grant.source)
}

fn is_single(net: &IpNet) -> bool {
    net.prefix_len() == net.max_prefix_len()
}

/// The grants of a list, looked up by the element they would be in.
struct CoverIndex<'g> {
    singles: HashMap<(IpNet, u16), Vec<&'g Grant>>,
    prefixes: Vec<&'g Grant>,
}

impl<'g> CoverIndex<'g> {
    fn new(grants: &'g [Grant]) -> CoverIndex<'g> {
        let mut index = CoverIndex {
            singles: HashMap::new(),
            prefixes: Vec::new(),
        };
        for g in grants {
            if is_single(&g.source) {
                index.singles.entry((g.source, g.port)).or_default().push(g);
            } else {
                index.prefixes.push(g);
            }
        }
        index
    }

    /// The grants `key` carries, and those hidden in it ([`hidden_in`]).
    fn covering(&self, key: &GrantKey) -> (Vec<GrantId>, Vec<GrantId>) {
        if is_single(&key.source) {
            let candidates = self.singles.get(&(key.source, key.port)).map_or(&[][..], Vec::as_slice);
            let grants = candidates.iter().filter(|g| covers(g, key)).map(|g| g.id).collect();
            return (grants, Vec::new());
        }
        let of = |test: fn(&Grant, &GrantKey) -> bool| {
            self.prefixes
                .iter()
                .filter(|g| test(g, key))
                .map(|g| g.id)
                .collect::<Vec<_>>()
        };
        (of(covers), of(hidden_in))
    }
}

/// The ledger in the grants checkpoint: connections per live grant, and the count last
/// read from each element (both only when not zero).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedLedger {
    /// Connections credited per grant.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub connections: BTreeMap<GrantId, u64>,
    /// The count last read from each element.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub elements: Vec<SavedElement>,
    /// Grants whose count is unknown.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub unknown: BTreeSet<GrantId>,
}

impl SavedLedger {
    /// Whether there is nothing in it.
    pub fn is_empty(&self) -> bool {
        self.connections.is_empty() && self.elements.is_empty() && self.unknown.is_empty()
    }
}

/// One element's last count, as saved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedElement {
    /// Its source address or prefix.
    pub source: IpNet,
    /// TCP or UDP.
    pub transport: Transport,
    /// The port.
    pub port: u16,
    /// What its counter showed.
    pub packets: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{parse_prefix, Protocol};

    fn key(source: &str, transport: Transport) -> GrantKey {
        GrantKey {
            source: parse_prefix(source).unwrap(),
            transport,
            port: 22,
        }
    }

    fn grant(id: GrantId, source: &str, protocol: Protocol) -> Grant {
        let now = Utc::now();
        Grant {
            id,
            source: parse_prefix(source).unwrap(),
            port: 22,
            protocol,
            requester: "bob".into(),
            requester_uid: 1001,
            principals: Vec::new(),
            fleet: None,
            justification: None,
            granted_at: now,
            expires_at: now + chrono::Duration::hours(1),
        }
    }

    #[test]
    fn each_reading_credits_what_was_counted_since_the_last_one() {
        let mut l = Ledger::default();
        let k = key("192.0.2.7", Transport::Tcp);
        assert!(!l.take_news());
        assert_eq!(l.observe(k, 3, &[1], &[]), 3);
        assert!(l.take_news(), "grant 1 used for the first time");
        assert_eq!(l.observe(k, 3, &[1], &[9]), 0, "nothing new");
        assert_eq!(l.count(9), Some(0), "nothing went through, so nothing is unknown");
        assert_eq!(l.observe(k, 5, &[1, 2], &[]), 2, "two more, for both grants sharing it");
        assert_eq!((l.count(1), l.count(2), l.count(3)), (Some(5), Some(2), Some(0)));
        assert!(l.take_news(), "grant 2's first use");
        l.observe(k, 6, &[1, 2], &[]);
        assert!(!l.take_news(), "more use of used grants is no news");
        l.fresh(&k);
        assert_eq!(l.observe(k, 1, &[2], &[]), 1, "re-added: counts from zero");
        assert_eq!((l.count(1), l.count(2)), (Some(6), Some(4)));
        // a count below the last one: the element was added afresh behind jitd's back
        assert_eq!(l.observe(k, 0, &[2], &[]), 0);
        l.observe(k, 4, &[2], &[]);
        assert_eq!(l.observe(k, 2, &[2], &[]), 2);
        l.forget(2);
        assert_eq!(l.count(2), Some(0));
    }

    #[test]
    fn a_grant_hidden_in_a_wider_element_that_counted_has_no_count() {
        let mut l = Ledger::default();
        let wide = key("198.51.0.0/16", Transport::Tcp);
        l.observe(wide, 2, &[1], &[2]);
        assert_eq!((l.count(1), l.count(2)), (Some(2), None));
        let again = Ledger::restored(&l.saved(), |_| true);
        assert_eq!(again.count(2), None, "kept across a restart");
        l.forget(2);
        assert_eq!(l.count(2), Some(0));
        l.unwatched(1);
        assert_eq!((l.count(1), l.credited(1), l.is_unwatched(1)), (None, 2, true));
        let nested = grant(2, "198.51.100.0/24", Protocol::Tcp);
        assert!(hidden_in(&nested, &wide) && !covers(&nested, &wide));
        assert!(
            !hidden_in(&nested, &key("198.51.100.0/24", Transport::Tcp)),
            "its own piece"
        );
        assert!(
            !hidden_in(&grant(3, "198.51.100.7", Protocol::Tcp), &wide),
            "single addresses have their own set"
        );
    }

    #[test]
    fn a_grant_covers_its_own_elements_only() {
        let single = grant(1, "192.0.2.7", Protocol::Tcp);
        let any = grant(2, "192.0.2.7", Protocol::Any);
        let wide = grant(3, "192.0.2.0/24", Protocol::Tcp);
        let tcp = key("192.0.2.7", Transport::Tcp);
        let udp = key("192.0.2.7", Transport::Udp);
        let piece = key("192.0.2.0/25", Transport::Tcp);
        assert!(covers(&single, &tcp) && covers(&any, &tcp) && covers(&any, &udp));
        assert!(!covers(&single, &udp), "another transport");
        assert!(!covers(&wide, &tcp), "the single address's element is not the prefix's");
        assert!(covers(&wide, &piece) && !covers(&single, &piece));
        assert!(
            !covers(&grant(4, "192.0.2.0/26", Protocol::Tcp), &piece),
            "a piece wider than it"
        );
        let mut other_port = single.clone();
        other_port.port = 2222;
        assert!(!covers(&other_port, &tcp));
    }

    #[test]
    fn start_up_credits_the_saved_grants_that_cover_each_element() {
        let grants = [
            grant(1, "192.0.2.7", Protocol::Tcp),
            grant(2, "192.0.2.7", Protocol::Any),
            grant(3, "198.51.100.0/24", Protocol::Tcp),
            grant(4, "192.0.2.8", Protocol::Tcp),
        ];
        let saved = SavedLedger {
            connections: BTreeMap::from([(1, 4), (9, 7)]),
            elements: vec![SavedElement {
                source: parse_prefix("192.0.2.7").unwrap(),
                transport: Transport::Tcp,
                port: 22,
                packets: 4,
            }],
            unknown: BTreeSet::new(),
        };
        let mut l = Ledger::restored(&saved, |id| id != 9);
        assert_eq!(
            (l.count(1), l.count(9)),
            (Some(4), Some(0)),
            "ended grants are not brought back"
        );
        let counts = HashMap::from([
            (key("192.0.2.7", Transport::Tcp), 6),
            (key("198.51.100.0/24", Transport::Tcp), 1),
            (key("192.0.2.8", Transport::Tcp), 0),
        ]);
        assert_eq!(l.observe_all(&counts, &grants), 2 + 1, "connections, each once");
        assert_eq!(
            (l.count(1), l.count(2), l.count(3), l.count(4)),
            (Some(6), Some(2), Some(1), Some(0))
        );
        assert_eq!(
            l.observe_all(&counts, &grants),
            0,
            "the same reading twice credits nothing"
        );
        let again = Ledger::restored(&l.saved(), |_| true);
        assert_eq!(again.count(1), Some(6));
        assert_eq!(again.delta(&key("192.0.2.7", Transport::Tcp), 6), 0, "last counts kept");
    }
}
