//! Rate limiting of refusals in the audit log, so that one caller cannot flood it: per
//! subject (a local uid or a signing key, [`Refuser`]; for unauthenticated knocks, a
//! source prefix), the first [`Limits::full_per_interval`] refusals of an interval are
//! recorded in full, the rest are only counted, and when the interval ends one summary
//! record per subject says how many were suppressed and with which codes. Pure: the
//! caller passes the clock in, and both memory and records are bounded
//! ([`Limits::max_uids`]: beyond it every further subject shares one "others" bucket;
//! [`Limits::max_full_total`]: full records of all subjects together per interval), so
//! at most `max_full_total + max_uids + 1` records an interval come from one limiter.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;

use chrono::{DateTime, TimeDelta, Utc};
use ipnet::IpNet;

use super::{Action, AuditRecord, Outcome};

/// How many refusals are recorded in full, over what interval, for how many uids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Length of one counting interval.
    pub interval: TimeDelta,
    /// Refusals per uid per interval recorded one by one.
    pub full_per_interval: u32,
    /// Subjects tracked one by one; further ones are counted together.
    pub max_uids: usize,
    /// Refusals recorded in full per interval, all subjects together; the rest of
    /// each subject's are counted in its summary.
    pub max_full_total: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            interval: TimeDelta::seconds(60),
            full_per_interval: 20,
            max_uids: 1024,
            max_full_total: u32::MAX,
        }
    }
}

/// What to do with one refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Write its audit record as usual.
    Record,
    /// Only count it; a summary record covers it later.
    Count,
}

/// The distinct denial codes kept per bucket (more are counted as "other").
const MAX_CODES: usize = 16;

/// One uid's (or the "others" bucket's) refusals in the current interval.
#[derive(Debug, Clone)]
struct Bucket {
    name: String,
    started: DateTime<Utc>,
    seen: u32,
    suppressed: u64,
    first_suppressed: Option<DateTime<Utc>>,
    last_suppressed: Option<DateTime<Utc>>,
    codes: BTreeMap<String, u64>,
}

/// Whom a limiter counts refusals of: a uid or a key ([`Refuser`]), a source prefix
/// (unauthenticated knocks).
pub trait Subject: Clone + Eq + Hash + Ord {
    /// The audit action of the summary records.
    const ACTION: Action;
    /// The uid a summary names, if any.
    fn uid(&self) -> Option<u32>;
    /// Who, in a summary's sentence.
    fn describe(&self, name: &str) -> String;
    /// The others bucket, in a summary's sentence.
    fn others() -> &'static str;
}

impl Subject for u32 {
    const ACTION: Action = Action::Request;
    fn uid(&self) -> Option<u32> {
        Some(*self)
    }
    fn describe(&self, name: &str) -> String {
        format!("uid {self} ({name})")
    }
    fn others() -> &'static str {
        "further uids (too many to track one by one)"
    }
}

impl Subject for IpNet {
    const ACTION: Action = Action::Knock;
    fn uid(&self) -> Option<u32> {
        None
    }
    fn describe(&self, _name: &str) -> String {
        format!("knocks from {self}")
    }
    fn others() -> &'static str {
        "knocks from further sources (too many to track one by one)"
    }
}

/// Whose refusals share one budget: a local caller by uid, a signed caller (a knock,
/// a fleet request) by its key, so that one key's refusals neither hide another
/// signer's nor are blamed on them.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Refuser {
    /// A local caller.
    Uid(u32),
    /// A signed caller, by its key's fingerprint.
    Key(String),
}

impl Refuser {
    /// The budget `caller` spends.
    pub fn of(caller: &crate::domain::Caller) -> Refuser {
        match &caller.signer {
            Some(s) => Refuser::Key(s.fingerprint.clone()),
            None => Refuser::Uid(caller.uid),
        }
    }
}

impl Subject for Refuser {
    const ACTION: Action = Action::Request;
    fn uid(&self) -> Option<u32> {
        match self {
            Refuser::Uid(uid) => Some(*uid),
            Refuser::Key(_) => None,
        }
    }
    fn describe(&self, name: &str) -> String {
        match self {
            Refuser::Uid(uid) => format!("uid {uid} ({name})"),
            Refuser::Key(key) => format!("{name} (key {key})"),
        }
    }
    fn others() -> &'static str {
        "further callers (too many to track one by one)"
    }
}

/// Per-uid (or per-source) refusal counters; see the module documentation.
#[derive(Debug, Clone)]
pub struct RefusalLimiter<K = u32> {
    limits: Limits,
    buckets: HashMap<K, Bucket>,
    others: Option<Bucket>,
    /// The interval of [`Limits::max_full_total`]: when it began, how many so far.
    full: Option<(DateTime<Utc>, u32)>,
}

impl<K> Default for RefusalLimiter<K> {
    fn default() -> Self {
        RefusalLimiter {
            limits: Limits::default(),
            buckets: HashMap::new(),
            others: None,
            full: None,
        }
    }
}

impl<K: Subject> RefusalLimiter<K> {
    /// A limiter with `limits`.
    pub fn new(limits: Limits) -> RefusalLimiter<K> {
        RefusalLimiter {
            limits,
            buckets: HashMap::new(),
            others: None,
            full: None,
        }
    }

    /// Whether one more refusal may be recorded in full at `now`, all subjects
    /// together (and counts it when so).
    fn full_left(&mut self, now: DateTime<Utc>) -> bool {
        let interval = self.limits.interval;
        let (began, count) = self.full.get_or_insert((now, 0));
        if *began + interval <= now || now < *began {
            (*began, *count) = (now, 0);
        }
        if *count >= self.limits.max_full_total {
            return false;
        }
        *count += 1;
        true
    }

    /// Decides whether the refusal of `uid` (`name`) with denial `code` at `now` is
    /// recorded in full or only counted. Call [`RefusalLimiter::due_summaries`] first so
    /// that an ended interval is closed before a new one starts.
    pub fn admit(&mut self, uid: K, name: &str, code: &str, now: DateTime<Utc>) -> Admit {
        let limits = self.limits;
        let tracked = self.buckets.len() < limits.max_uids || self.buckets.contains_key(&uid);
        let own_left = tracked && self.buckets.get(&uid).map_or(0, |b| b.seen) < limits.full_per_interval;
        // the "others" bucket never records in full: it exists only under a flood
        let full = own_left && self.full_left(now);
        let bucket = if tracked {
            self.buckets.entry(uid).or_insert_with(|| Bucket::new(name, now))
        } else {
            self.others.get_or_insert_with(|| Bucket::new("others", now))
        };
        if full {
            bucket.seen += 1;
            return Admit::Record;
        }
        bucket.seen = bucket.seen.saturating_add(1);
        bucket.suppressed += 1;
        bucket.first_suppressed.get_or_insert(now);
        bucket.last_suppressed = Some(now);
        let key = if bucket.codes.len() < MAX_CODES || bucket.codes.contains_key(code) {
            code
        } else {
            "other"
        };
        *bucket.codes.entry(key.to_string()).or_default() += 1;
        Admit::Count
    }

    /// Closes every interval that has ended by `now`: one summary record per bucket that
    /// suppressed something; buckets that did not are simply dropped.
    pub fn due_summaries(&mut self, now: DateTime<Utc>) -> Vec<AuditRecord> {
        let interval = self.limits.interval;
        let mut due: Vec<(Option<K>, Bucket)> = Vec::new();
        let ended: Vec<K> = self
            .buckets
            .iter()
            .filter(|(_, b)| b.started + interval <= now)
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in ended {
            let bucket = self.buckets.remove(&uid).expect("listed above");
            due.push((Some(uid), bucket));
        }
        if self.others.as_ref().is_some_and(|b| b.started + interval <= now) {
            due.push((None, self.others.take().expect("checked")));
        }
        // in time order, each time's subjects in order, "others" last
        due.sort_by(|(u1, b1), (u2, b2)| (b1.started, u1.is_none(), u1).cmp(&(b2.started, u2.is_none(), u2)));
        due.into_iter()
            .filter(|(_, b)| b.suppressed > 0)
            .map(|(uid, b)| summary(uid, &b, now))
            .collect()
    }

    /// Summaries of every bucket, due or not (at shutdown).
    pub fn flush(&mut self, now: DateTime<Utc>) -> Vec<AuditRecord> {
        let far = now + self.limits.interval;
        let mut records = self.due_summaries(far);
        for r in &mut records {
            r.time = now;
        }
        records
    }

    /// When the next interval ends (a summary may be due then), if any is open.
    pub fn next_due(&self) -> Option<DateTime<Utc>> {
        self.buckets
            .values()
            .chain(self.others.as_ref())
            .map(|b| b.started + self.limits.interval)
            .min()
    }

    /// How many uids are tracked one by one.
    pub fn tracked(&self) -> usize {
        self.buckets.len()
    }
}

impl Bucket {
    fn new(name: &str, now: DateTime<Utc>) -> Bucket {
        Bucket {
            name: name.to_string(),
            started: now,
            seen: 0,
            suppressed: 0,
            first_suppressed: None,
            last_suppressed: None,
            codes: BTreeMap::new(),
        }
    }
}

/// The summary record of one bucket: action `request` (or `knock`), outcome
/// `suppressed`.
fn summary<K: Subject>(subject: Option<K>, b: &Bucket, now: DateTime<Utc>) -> AuditRecord {
    let subject = subject.as_ref();
    let who = match subject {
        Some(s) => s.describe(&b.name),
        None => K::others().to_string(),
    };
    let codes: Vec<String> = b.codes.iter().map(|(c, n)| format!("{c} x{n}")).collect();
    let at = |t: Option<DateTime<Utc>>| t.unwrap_or(now).to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let actor = if subject.is_some() { b.name.as_str() } else { "others" };
    let mut r = AuditRecord::new(
        now,
        subject.and_then(|s| s.uid()),
        actor,
        K::ACTION,
        Outcome::Suppressed,
    );
    r.reason = Some(format!(
        "{} refusal(s) from {who} suppressed between {} and {}, codes: {}",
        b.suppressed,
        at(b.first_suppressed),
        at(b.last_suppressed),
        codes.join(", ")
    ));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + secs, 0).unwrap()
    }

    fn limiter(full: u32, max_uids: usize) -> RefusalLimiter {
        RefusalLimiter::new(Limits {
            interval: TimeDelta::seconds(60),
            full_per_interval: full,
            max_uids,
            max_full_total: u32::MAX,
        })
    }

    #[test]
    fn the_first_refusals_are_recorded_the_rest_counted_and_summarised() {
        let mut l = limiter(3, 10);
        let admits: Vec<Admit> = (0..10).map(|i| l.admit(1001, "mallory", "forbidden", t(i))).collect();
        assert_eq!(admits.iter().filter(|a| **a == Admit::Record).count(), 3);
        assert_eq!(admits[3..], [Admit::Count; 7]);
        assert_eq!(l.next_due(), Some(t(60)));
        assert!(l.due_summaries(t(59)).is_empty(), "the interval has not ended");
        let s = l.due_summaries(t(60));
        assert_eq!(s.len(), 1);
        assert_eq!((s[0].actor_uid, s[0].outcome), (Some(1001), Outcome::Suppressed));
        let reason = s[0].reason.as_deref().unwrap();
        assert!(
            reason.starts_with("7 refusal(s) from uid 1001 (mallory) suppressed between 2027-01-15T08:00:03.000Z and 2027-01-15T08:00:09.000Z"),
            "{reason}"
        );
        assert!(reason.ends_with("codes: forbidden x7"), "{reason}");
        assert_eq!(l.next_due(), None, "closed");
        assert_eq!(
            l.admit(1001, "mallory", "forbidden", t(61)),
            Admit::Record,
            "a new interval"
        );
    }

    #[test]
    fn an_interval_without_suppression_leaves_no_summary() {
        let mut l = limiter(3, 10);
        l.admit(1001, "bob", "duration_too_long", t(0));
        l.admit(1001, "bob", "source_not_allowed", t(1));
        assert!(l.due_summaries(t(120)).is_empty());
        assert_eq!(l.tracked(), 0);
    }

    #[test]
    fn uids_are_limited_apart_and_codes_counted_each() {
        let mut l = limiter(1, 10);
        for i in 0..4 {
            l.admit(
                1001,
                "mallory",
                if i % 2 == 0 { "forbidden" } else { "invalid_argument" },
                t(i),
            );
        }
        assert_eq!(
            l.admit(1002, "bob", "forbidden", t(5)),
            Admit::Record,
            "bob has his own budget"
        );
        let s = l.due_summaries(t(100));
        assert_eq!(s.len(), 1);
        assert!(
            s[0].reason
                .as_deref()
                .unwrap()
                .ends_with("codes: forbidden x1, invalid_argument x2"),
            "{:?}",
            s[0].reason
        );
    }

    #[test]
    fn memory_is_bounded_by_an_others_bucket() {
        let mut l = limiter(2, 3);
        for uid in 0..1000 {
            for _ in 0..5 {
                l.admit(uid, &format!("u{uid}"), "forbidden", t(1));
            }
        }
        assert_eq!(l.tracked(), 3);
        let s = l.due_summaries(t(61));
        assert_eq!(s.len(), 4, "three uids and the others");
        let others = s.iter().find(|r| r.actor_uid.is_none()).unwrap();
        assert!(
            others
                .reason
                .as_deref()
                .unwrap()
                .starts_with("4985 refusal(s) from further uids"),
            "997 uids x 5, none in full: {:?}",
            others.reason
        );
    }

    #[test]
    fn full_records_of_all_subjects_together_are_bounded_per_interval() {
        let mut l = RefusalLimiter::<IpNet>::new(Limits {
            interval: TimeDelta::seconds(60),
            full_per_interval: 5,
            max_uids: 4,
            max_full_total: 7,
        });
        let net = |n: u8| IpNet::from(std::net::IpAddr::from([10, 0, 0, n]));
        let full = (0..200)
            .filter(|i| l.admit(net((i % 50) as u8), "knock", "malformed", t(1)) == Admit::Record)
            .count();
        assert_eq!(full, 7, "7 in full of 200 from 50 sources");
        let s = l.due_summaries(t(61));
        assert_eq!(s.len(), 5, "four prefixes and the others: {s:?}");
        assert!(s.iter().all(|r| r.action == Action::Knock));
        assert!(
            s[0].reason.as_deref().unwrap().contains("from knocks from 10.0.0.0/32"),
            "{:?}",
            s[0].reason
        );
        // a new interval has a new budget
        assert_eq!(l.admit(net(1), "knock", "malformed", t(62)), Admit::Record);
    }

    #[test]
    fn signed_callers_have_a_budget_per_key() {
        let mut l = RefusalLimiter::<Refuser>::new(Limits {
            interval: TimeDelta::seconds(60),
            full_per_interval: 2,
            max_uids: 10,
            max_full_total: u32::MAX,
        });
        let (k1, k2) = (Refuser::Key("SHA256:one".into()), Refuser::Key("SHA256:two".into()));
        for _ in 0..5 {
            l.admit(k1.clone(), "principal:alice", "forbidden", t(0));
        }
        assert_eq!(l.admit(k2, "principal:bob", "forbidden", t(1)), Admit::Record);
        let s = l.due_summaries(t(61));
        assert_eq!(s.len(), 1);
        assert_eq!((s[0].actor.as_str(), s[0].actor_uid), ("principal:alice", None));
        let reason = s[0].reason.as_deref().unwrap();
        assert!(reason.contains("from principal:alice (key SHA256:one)"), "{reason}");
    }

    #[test]
    fn codes_per_bucket_are_bounded() {
        let mut l = limiter(0, 10);
        for i in 0..100 {
            l.admit(7, "x", &format!("code{i:03}"), t(0));
        }
        let s = l.flush(t(1));
        assert_eq!(s[0].time, t(1));
        let reason = s[0].reason.as_deref().unwrap();
        assert!(reason.contains("other x84"), "{reason}");
    }
}
