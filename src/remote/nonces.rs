//! The memory of knocks already accepted: a knock's nonce is claimed once, after its
//! signature verified, and remembered until its time window has passed (after that the
//! window refuses the packet anyway). Pure: the caller passes the clock in. Bounded:
//! when full of live nonces, further knocks are refused rather than forgotten.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

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

/// Nonces still inside their window, each with the time it may be forgotten.
#[derive(Debug, Clone)]
pub struct Nonces {
    until: HashMap<Nonce, DateTime<Utc>>,
    by_time: BinaryHeap<Reverse<(DateTime<Utc>, Nonce)>>,
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

    /// Claims `nonce`, to be remembered until `until`; forgets what has passed by `now`.
    pub fn claim(&mut self, nonce: Nonce, until: DateTime<Utc>, now: DateTime<Utc>) -> Claim {
        self.forget(now);
        if self.until.contains_key(&nonce) {
            return Claim::Replay;
        }
        if self.until.len() >= self.capacity {
            return Claim::Full;
        }
        self.until.insert(nonce, until);
        self.by_time.push(Reverse((until, nonce)));
        Claim::Fresh
    }

    /// Forgets the nonces whose time has passed by `now`.
    pub fn forget(&mut self, now: DateTime<Utc>) {
        while let Some(Reverse((until, nonce))) = self.by_time.peek().copied() {
            if until > now {
                break;
            }
            self.by_time.pop();
            if self.until.get(&nonce) == Some(&until) {
                self.until.remove(&nonce);
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

/// A nonce as hex (how records and the checkpoint keep it).
pub fn hex(nonce: &Nonce) -> String {
    nonce.iter().map(|b| format!("{b:02x}")).collect()
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

    #[test]
    fn a_nonce_is_claimed_once_while_its_window_lasts() {
        let mut n = Nonces::new(10);
        assert_eq!(n.claim([1; 16], t(30), t(0)), Claim::Fresh);
        assert!(n.seen(&[1; 16]));
        assert_eq!(n.claim([1; 16], t(30), t(29)), Claim::Replay);
        // once its window has passed the time check refuses the packet; memory may go
        assert_eq!(n.claim([2; 16], t(60), t(31)), Claim::Fresh);
        assert!(!n.seen(&[1; 16]));
        assert_eq!(n.len(), 1);
    }

    #[test]
    fn a_full_memory_refuses_rather_than_forgets() {
        let mut n = Nonces::new(2);
        assert_eq!(n.claim([1; 16], t(30), t(0)), Claim::Fresh);
        assert_eq!(n.claim([2; 16], t(30), t(0)), Claim::Fresh);
        assert_eq!(n.claim([3; 16], t(30), t(1)), Claim::Full);
        assert_eq!(n.claim([1; 16], t(30), t(1)), Claim::Replay);
        assert_eq!(
            n.claim([3; 16], t(60), t(30)),
            Claim::Fresh,
            "room again once the others passed"
        );
    }

    #[test]
    fn hex_round_trips_and_refuses_anything_else() {
        let nonce = [0xab; 16];
        assert_eq!(from_hex(&hex(&nonce)), Some(nonce));
        for bad in ["", "ab", &"AB".repeat(16), &"zz".repeat(16), &"ab".repeat(17)] {
            assert_eq!(from_hex(bad), None, "{bad}");
        }
        let mut n = Nonces::new(4);
        n.claim([2; 16], t(9), t(0));
        n.claim([1; 16], t(5), t(0));
        let live = n.live();
        assert_eq!(live[0], (hex(&[1; 16]), t(5)));
        assert_eq!(live.len(), 2);
    }
}
