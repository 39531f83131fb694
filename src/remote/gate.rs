//! A per-source rate limit for knocks, before any other work: a token bucket per
//! source address, in bounded memory (when too many sources are tracked, the ones that
//! have been quiet longest are forgotten; when all are busy, further sources share one
//! bucket). Pure: the caller passes the clock in.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Knocks per second one source may send, on average.
pub const RATE: f64 = 5.0;
/// Knocks one source may send at once.
pub const BURST: f64 = 10.0;
/// The bucket all further sources share holds this many sources' worth.
const SHARED: f64 = 4.0;
/// Sources tracked one by one.
pub const MAX_SOURCES: usize = 4096;

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

/// Per-source token buckets; see the module documentation.
#[derive(Debug)]
pub struct SourceGate {
    buckets: HashMap<IpAddr, Bucket>,
    others: Bucket,
    max_sources: usize,
}

impl SourceGate {
    /// A gate tracking at most `max_sources` sources one by one.
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

    /// Whether a knock from `source` at `now` may go on.
    pub fn allow(&mut self, source: IpAddr, now: Instant) -> bool {
        if let Some(b) = self.buckets.get_mut(&source) {
            return b.take(now, RATE, BURST);
        }
        if self.buckets.len() >= self.max_sources {
            // a source refilled to a full burst has been quiet: forgetting it loses nothing
            let full = Duration::from_secs_f64(BURST / RATE);
            self.buckets.retain(|_, b| now.saturating_duration_since(b.at) < full);
        }
        if self.buckets.len() >= self.max_sources {
            // a flood from many (spoofed) sources: they share one bucket
            return self.others.take(now, SHARED * RATE, SHARED * BURST);
        }
        let mut b = Bucket { tokens: BURST, at: now };
        let ok = b.take(now, RATE, BURST);
        self.buckets.insert(source, b);
        ok
    }

    /// How many sources are tracked one by one.
    pub fn tracked(&self) -> usize {
        self.buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u32) -> IpAddr {
        IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + n))
    }

    #[test]
    fn a_source_gets_its_burst_then_its_rate() {
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
    fn many_sources_stay_bounded_and_share_a_bucket() {
        let t0 = Instant::now();
        let mut g = SourceGate::new(8, t0);
        let passed = (0..1000).filter(|n| g.allow(ip(*n), t0)).count();
        assert_eq!(g.tracked(), 8);
        assert_eq!(passed, 8 + 4 * BURST as usize, "8 own buckets, then the shared one");
        // quiet sources are forgotten to make room
        assert!(g.allow(ip(5000), t0 + Duration::from_secs(10)));
        assert_eq!(g.tracked(), 1);
    }
}
