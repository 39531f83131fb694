//! Per-source limits for knocks, before any other work, counted by source *prefix*
//! (IPv4 /32, IPv6 /64 unless configured): one holder of an IPv6 /64 can send from
//! 2^64 addresses, so limiting each address would let one subscriber stand for
//! thousands of sources. Two pure pieces, the clock passed in:
//!
//! - [`SourceGate`]: a token bucket per prefix, in bounded memory (when too many
//!   prefixes are tracked, the ones that have been quiet longest are forgotten; when all
//!   are busy, further prefixes share one bucket);
//! - [`QueueShares`]: how many of a prefix's knocks wait for (or are in) a signature
//!   check, so that no prefix takes more than its share of the verification queue,
//!   even with junk that passes the cheap checks (a known key, garbage signature).

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// Knocks per second one prefix may send, on average.
pub const RATE: f64 = 5.0;
/// Knocks one prefix may send at once.
pub const BURST: f64 = 10.0;
/// The bucket all further prefixes share holds this many prefixes' worth.
const SHARED: f64 = 4.0;
/// Prefixes tracked one by one.
pub const MAX_SOURCES: usize = 4096;
/// The IPv6 prefix length knocks are counted by, unless configured.
pub const DEFAULT_PREFIX6: u8 = 64;
/// Knocks of one prefix waiting for or in a signature check at once.
pub const QUEUE_SHARE: usize = 4;

/// The prefix `ip` is counted in: itself for IPv4 (a /32), its `/prefix6` for IPv6
/// (an IPv4-mapped IPv6 address counts as the IPv4 address).
pub fn prefix_of(ip: IpAddr, prefix6: u8) -> IpNet {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpNet::V4(Ipv4Net::new(v4, 32).expect("32 is a valid length")),
        IpAddr::V6(v6) => {
            let len = prefix6.min(128);
            IpNet::V6(Ipv6Net::new(v6, len).expect("clamped to 128").trunc())
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn take(&mut self, now: Instant, rate: f64, burst: f64) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Per-prefix token buckets; see the module documentation.
#[derive(Debug)]
pub struct SourceGate {
    buckets: HashMap<IpNet, Bucket>,
    others: Bucket,
    max_sources: usize,
}

impl SourceGate {
    /// A gate tracking at most `max_sources` prefixes one by one.
    pub fn new(max_sources: usize, now: Instant) -> SourceGate {
        SourceGate {
            buckets: HashMap::new(),
            others: Bucket {
                tokens: SHARED * BURST,
                at: now,
            },
            max_sources,
        }
    }

    /// Whether a knock from prefix `source` ([`prefix_of`]) at `now` may go on.
    pub fn allow(&mut self, source: IpNet, now: Instant) -> bool {
        if let Some(b) = self.buckets.get_mut(&source) {
            return b.take(now, RATE, BURST);
        }
        if self.buckets.len() >= self.max_sources {
            // a prefix refilled to a full burst has been quiet: forgetting it loses nothing
            let full = Duration::from_secs_f64(BURST / RATE);
            self.buckets.retain(|_, b| now.saturating_duration_since(b.at) < full);
        }
        if self.buckets.len() >= self.max_sources {
            // a flood from many (spoofed) prefixes: they share one bucket
            return self.others.take(now, SHARED * RATE, SHARED * BURST);
        }
        let mut b = Bucket { tokens: BURST, at: now };
        let ok = b.take(now, RATE, BURST);
        self.buckets.insert(source, b);
        ok
    }

    /// How many prefixes are tracked one by one.
    pub fn tracked(&self) -> usize {
        self.buckets.len()
    }
}

/// Each prefix's knocks waiting for or in a signature check; see the module
/// documentation. Memory is bounded by the queue: only prefixes with work are kept.
#[derive(Debug, Default)]
pub struct QueueShares {
    held: HashMap<IpNet, usize>,
}

impl QueueShares {
    /// Takes a place for a knock of `source`; `false` when it holds its whole share.
    pub fn take(&mut self, source: IpNet) -> bool {
        let held = self.held.entry(source).or_default();
        if *held >= QUEUE_SHARE {
            return false;
        }
        *held += 1;
        true
    }

    /// Gives back a place [`QueueShares::take`] gave.
    pub fn give_back(&mut self, source: IpNet) {
        if let Some(held) = self.held.get_mut(&source) {
            *held -= 1;
            if *held == 0 {
                self.held.remove(&source);
            }
        }
    }

    /// How many prefixes hold places.
    pub fn prefixes(&self) -> usize {
        self.held.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u32) -> IpNet {
        prefix_of(IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + n)), 64)
    }

    #[test]
    fn a_prefix_gets_its_burst_then_its_rate() {
        let t0 = Instant::now();
        let mut g = SourceGate::new(16, t0);
        let passed = (0..50).filter(|_| g.allow(ip(1), t0)).count();
        assert_eq!(passed, BURST as usize);
        assert!(g.allow(ip(2), t0), "another source has its own bucket");
        assert!(!g.allow(ip(1), t0 + Duration::from_millis(100)));
        assert!(
            g.allow(ip(1), t0 + Duration::from_millis(250)),
            "one token after 1/RATE s"
        );
    }

    #[test]
    fn many_prefixes_stay_bounded_and_share_a_bucket() {
        let t0 = Instant::now();
        let mut g = SourceGate::new(8, t0);
        let passed = (0..1000).filter(|n| g.allow(ip(*n), t0)).count();
        assert_eq!(g.tracked(), 8);
        assert_eq!(passed, 8 + 4 * BURST as usize, "8 own buckets, then the shared one");
        // quiet prefixes are forgotten to make room
        assert!(g.allow(ip(5000), t0 + Duration::from_secs(10)));
        assert_eq!(g.tracked(), 1);
    }

    #[test]
    fn the_addresses_of_one_ipv6_prefix_share_its_bucket() {
        let t0 = Instant::now();
        let mut g = SourceGate::new(16, t0);
        let in_64 = |n: u16| IpAddr::from([0xfd00, 0x77, 1, 0, 0, 0, n, 1]);
        let passed = (0..5000)
            .filter(|n| g.allow(prefix_of(in_64(*n as u16), 64), t0))
            .count();
        assert_eq!(passed, BURST as usize, "5000 addresses, one /64, one burst");
        assert_eq!(g.tracked(), 1);
        let elsewhere = IpAddr::from([0xfd00, 0x77, 2, 0, 0, 0, 0, 2]);
        assert!(g.allow(prefix_of(elsewhere, 64), t0), "another /64 is not held back");
        // a configured /128 counts each address, and IPv4 always counts /32
        assert_ne!(prefix_of(in_64(1), 128), prefix_of(in_64(2), 128));
        assert_eq!(prefix_of(in_64(1), 48), prefix_of(in_64(9), 48));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(prefix_of(mapped, 64), "10.0.0.1/32".parse::<IpNet>().unwrap());
    }

    #[test]
    fn a_prefix_holds_at_most_its_share_of_the_queue() {
        let mut q = QueueShares::default();
        let (a, b) = (ip(1), ip(2));
        assert_eq!((0..10).filter(|_| q.take(a)).count(), QUEUE_SHARE);
        assert!(q.take(b), "another prefix still gets a place");
        q.give_back(a);
        assert!(q.take(a), "a place given back is free again");
        for _ in 0..QUEUE_SHARE {
            q.give_back(a);
        }
        q.give_back(b);
        assert_eq!(q.prefixes(), 0, "nothing kept for prefixes without work");
    }
}
