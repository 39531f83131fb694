//! The memory of knocks already accepted: a knock's nonce is claimed once, after its
//! signature verified, and remembered as long as any window could accept the packet:
//! until its signing time plus the widest window a policy may set
//! ([`super::settings::MAX_WINDOW`], whatever the window in force: a reload may widen
//! it), by the wall clock *and* for as long again by the monotonic clock, so that
//! neither a wall-clock step forward (which would age it early) nor one back (which
//! would bring the packet back into its window) forgets a nonce whose packet a window
//! could still accept. Pure: the caller passes both clocks in. Bounded: when full of
//! live nonces, further knocks are refused rather than forgotten.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

/// A knock's nonce.
pub type Nonce = [u8; 16];

/// What claiming a nonce found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// Not seen before: now remembered.
    Fresh,
    /// Seen before: a replay.
    Replay,
    /// The memory is full of live nonces: refused, nothing remembered.
    Full,
}

/// Nonces a window could still accept, each with the wall-clock time after which no
/// window can; ordered by when the monotonic clock next looks at them.
#[derive(Debug, Clone)]
pub struct Nonces {
    until: HashMap<Nonce, DateTime<Utc>>,
    by_time: BinaryHeap<Reverse<(Instant, Nonce)>>,
    capacity: usize,
}

impl Nonces {
    /// An empty memory holding at most `capacity` live nonces.
    pub fn new(capacity: usize) -> Nonces {
        Nonces {
            until: HashMap::new(),
            by_time: BinaryHeap::new(),
            capacity,
        }
    }

    /// Whether `nonce` was claimed and is still remembered (a cheap early check; the
    /// answer that counts is [`Nonces::claim`]'s).
    pub fn seen(&self, nonce: &Nonce) -> bool {
        self.until.contains_key(nonce)
    }

    /// Claims `nonce`, to be remembered until the wall clock passes `until` and the
    /// monotonic clock has run as long as that was away from `now` (the wall clock) at
    /// `mono`; forgets what has passed by both clocks.
    pub fn claim(&mut self, nonce: Nonce, until: DateTime<Utc>, now: DateTime<Utc>, mono: Instant) -> Claim {
        self.forget(now, mono);
        if self.until.contains_key(&nonce) {
            return Claim::Replay;
        }
        if self.until.len() >= self.capacity {
            return Claim::Full;
        }
        self.until.insert(nonce, until);
        self.by_time.push(Reverse((mono + ahead(until, now), nonce)));
        Claim::Fresh
    }

    /// Forgets the nonces whose time has passed by the wall clock (`now`) and by the
    /// monotonic clock (`mono`); one whose monotonic time is up but whose wall-clock
    /// time is not (the wall clock stepped back) is looked at again when it could be.
    pub fn forget(&mut self, now: DateTime<Utc>, mono: Instant) {
        while let Some(Reverse((due, nonce))) = self.by_time.peek().copied() {
            if due > mono {
                break;
            }
            self.by_time.pop();
            let Some(until) = self.until.get(&nonce).copied() else {
                continue;
            };
            if until <= now {
                self.until.remove(&nonce);
            } else {
                self.by_time.push(Reverse((mono + ahead(until, now), nonce)));
            }
        }
    }

    /// The live nonces as hex with their times, oldest first (for the checkpoint).
    pub fn live(&self) -> Vec<(String, DateTime<Utc>)> {
        let mut out: Vec<_> = self.until.iter().map(|(n, t)| (hex(n), *t)).collect();
        out.sort_by_key(|(n, t)| (*t, n.clone()));
        out
    }

    /// How many nonces are remembered.
    pub fn len(&self) -> usize {
        self.until.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.until.is_empty()
    }
}

/// How far `until` is ahead of `now`, at least a second (so that a nonce looked at
/// again is not looked at in a busy loop).
fn ahead(until: DateTime<Utc>, now: DateTime<Utc>) -> Duration {
    (until - now).to_std().unwrap_or_default().max(Duration::from_secs(1))
}

/// A nonce as hex (how records and the checkpoint keep it).
pub fn hex(nonce: &Nonce) -> String {
    hex::encode(nonce)
}

/// A nonce from its hex form; `None` unless exactly 32 lower-case hex digits.
pub fn from_hex(text: &str) -> Option<Nonce> {
    if !crate::text::is_lower_hex(text, 32) {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + secs, 0).unwrap()
    }

    /// The monotonic clock `secs` after a fixed start.
    fn m(start: Instant, secs: u64) -> Instant {
        start + Duration::from_secs(secs)
    }

    #[test]
    fn a_nonce_is_claimed_once_while_its_window_lasts() {
        let s = Instant::now();
        let mut n = Nonces::new(10);
        assert_eq!(n.claim([1; 16], t(30), t(0), m(s, 0)), Claim::Fresh);
        assert!(n.seen(&[1; 16]));
        assert_eq!(n.claim([1; 16], t(30), t(29), m(s, 29)), Claim::Replay);
        // once its window has passed the time check refuses the packet; memory may go
        assert_eq!(n.claim([2; 16], t(60), t(31), m(s, 31)), Claim::Fresh);
        assert!(!n.seen(&[1; 16]));
        assert_eq!(n.len(), 1);
    }

    #[test]
    fn a_full_memory_refuses_rather_than_forgets() {
        let s = Instant::now();
        let mut n = Nonces::new(2);
        assert_eq!(n.claim([1; 16], t(30), t(0), m(s, 0)), Claim::Fresh);
        assert_eq!(n.claim([2; 16], t(30), t(0), m(s, 0)), Claim::Fresh);
        assert_eq!(n.claim([3; 16], t(30), t(1), m(s, 1)), Claim::Full);
        assert_eq!(n.claim([1; 16], t(30), t(1), m(s, 1)), Claim::Replay);
        assert_eq!(
            n.claim([3; 16], t(60), t(30), m(s, 30)),
            Claim::Fresh,
            "room again once the others passed"
        );
    }

    #[test]
    fn a_wall_clock_step_either_way_forgets_nothing_early() {
        let s = Instant::now();
        let mut n = Nonces::new(10);
        n.claim([1; 16], t(600), t(0), m(s, 0));
        // the wall clock jumps an hour ahead, then back: the monotonic clock holds it
        n.forget(t(3600), m(s, 5));
        assert!(n.seen(&[1; 16]), "a step forward does not age it");
        // the wall clock steps an hour back: the wall clock holds it past its own time
        n.forget(t(-3600), m(s, 700));
        assert!(n.seen(&[1; 16]), "a step back keeps it while a window could take it");
        n.forget(t(-3000), m(s, 1300));
        assert!(n.seen(&[1; 16]));
        n.forget(t(601), m(s, 4900));
        assert!(!n.seen(&[1; 16]), "gone once both clocks passed");
        assert!(n.is_empty());
    }

    #[test]
    fn hex_round_trips_and_refuses_anything_else() {
        let nonce = [0xab; 16];
        assert_eq!(from_hex(&hex(&nonce)), Some(nonce));
        for bad in ["", "ab", &"AB".repeat(16), &"zz".repeat(16), &"ab".repeat(17)] {
            assert_eq!(from_hex(bad), None, "{bad}");
        }
        let mut n = Nonces::new(4);
        let s = Instant::now();
        n.claim([2; 16], t(9), t(0), s);
        n.claim([1; 16], t(5), t(0), s);
        let live = n.live();
        assert_eq!(live[0], (hex(&[1; 16]), t(5)));
        assert_eq!(live.len(), 2);
    }
}
