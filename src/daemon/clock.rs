//! The wall clock, watched against the monotonic clock. Grants are enforced by the
//! monotonic clock (jitd's deadlines are `Instant`s, the kernel's element timeouts
//! count down on their own); the wall clock only dates records and is shown to people.
//! When the wall clock steps (an administrator, a bad NTP source, a suspended VM), the
//! difference between the two clocks changes: jitd notices within [`CHECK_EVERY`], logs
//! a warning, audits the step, and `status` says so.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Utc};
use tokio::sync::watch;

use super::job::Job;
use super::Daemon;
use crate::api::protocol::{ClockJump, ClockStatus};
use crate::audit::{Action, AuditRecord, Outcome};
use crate::firewall::Firewall;

/// How often the two clocks are compared.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);
/// A change of the wall-minus-monotonic offset larger than this is a jump; smaller
/// ones are NTP slewing (at most 0.5 ms per second) or scheduling noise.
pub const JUMP_THRESHOLD: TimeDelta = TimeDelta::seconds(2);

/// The wall clock minus the monotonic time since `base`: constant while neither clock
/// is stepped.
pub fn offset(wall: DateTime<Utc>, since_base: Duration) -> DateTime<Utc> {
    wall - TimeDelta::from_std(since_base).unwrap_or(TimeDelta::MAX)
}

/// How far the wall clock stepped between two offsets, if that is a jump.
pub fn jump(before: DateTime<Utc>, after: DateTime<Utc>) -> Option<TimeDelta> {
    let by = after - before;
    (by.abs() > JUMP_THRESHOLD).then_some(by)
}

/// The wall clock's record since start: the offset last seen and the jumps.
pub(super) struct WallClock {
    base: Instant,
    seen: Mutex<Seen>,
}

struct Seen {
    offset: DateTime<Utc>,
    jumps: u64,
    last: Option<ClockJump>,
    behind_audit_at_start: bool,
}

impl WallClock {
    /// Starts watching; `behind_audit_at_start`: the start-up check found the wall clock
    /// behind the newest audit record.
    pub fn new(behind_audit_at_start: bool) -> WallClock {
        let base = Instant::now();
        WallClock {
            base,
            seen: Mutex::new(Seen {
                offset: offset(Utc::now(), Duration::ZERO),
                jumps: 0,
                last: None,
                behind_audit_at_start,
            }),
        }
    }

    /// Reads both clocks; returns the step when the wall clock jumped since last time.
    pub fn check(&self) -> Option<ClockJump> {
        self.check_at(Utc::now(), Instant::now())
    }

    fn check_at(&self, wall: DateTime<Utc>, mono: Instant) -> Option<ClockJump> {
        let now = offset(wall, mono.saturating_duration_since(self.base));
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let by = jump(seen.offset, now);
        seen.offset = now;
        let ms = by?.num_milliseconds();
        let step = ClockJump {
            at: wall,
            // to the nearest second: a step of -1h read a moment late is still -1h
            by_secs: (ms + 500 * ms.signum()) / 1000,
        };
        seen.jumps += 1;
        seen.last = Some(step);
        Some(step)
    }

    /// What `status` shows, with `now` the wall clock its times are derived from.
    pub fn status(&self, now: DateTime<Utc>) -> ClockStatus {
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        ClockStatus {
            now,
            jumps: seen.jumps,
            last_jump: seen.last,
            behind_audit_at_start: seen.behind_audit_at_start,
        }
    }
}

/// A step as people read it: `+1h (forward)`, `-1h 1m (back)`.
pub fn describe(step: &ClockJump) -> String {
    let size = crate::duration::format(Duration::from_secs(step.by_secs.unsigned_abs()));
    if step.by_secs >= 0 {
        format!("+{size} (forward)")
    } else {
        format!("-{size} (back)")
    }
}

/// The audit record of a step.
fn record(step: &ClockJump) -> AuditRecord {
    let mut r = AuditRecord::new(step.at, None, "jitd", Action::Clock, Outcome::Done);
    r.reason = Some(format!(
        "the wall clock jumped by {} against the monotonic clock; grants still end on the kernel's timers, and times shown are now + time left",
        describe(step)
    ));
    r
}

/// Compares the clocks every [`CHECK_EVERY`] until `stopping`; a jump is logged and
/// audited (through the committer, like every record).
pub(super) async fn watch<F: Firewall>(
    daemon: Arc<Daemon<F>>,
    mut stopping: watch::Receiver<bool>,
) -> Result<(), String> {
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stopping.wait_for(|s| *s) => return Ok(()),
            _ = tick.tick() => {}
        }
        let Some(step) = daemon.clock.check() else { continue };
        tracing::warn!(
            "the wall clock jumped by {}; grants still end on the kernel's timers (time left is the truth), end times shown are now + time left",
            describe(&step)
        );
        if !daemon.submit(Job::Record(vec![record(&step)])).await {
            return if *stopping.borrow() {
                Ok(())
            } else {
                Err("the committer is gone".into())
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + secs, 0).unwrap()
    }

    #[test]
    fn steady_clocks_keep_their_offset() {
        assert_eq!(offset(at(10), Duration::from_secs(10)), at(0));
        assert_eq!(jump(at(0), at(0)), None);
        assert_eq!(jump(at(0), at(2)), None, "2 s is noise, not a jump");
        assert_eq!(jump(at(0), at(-2)), None);
    }

    #[test]
    fn steps_either_way_are_jumps() {
        assert_eq!(jump(at(0), at(3600)), Some(TimeDelta::seconds(3600)));
        assert_eq!(jump(at(0), at(-3)), Some(TimeDelta::seconds(-3)));
    }

    #[test]
    fn a_step_is_reported_once_and_remembered() {
        let clock = WallClock::new(false);
        let base = clock.base;
        let start = offset(Utc::now(), Duration::ZERO);
        let wall = |mono: u64, skew: i64| start + TimeDelta::seconds(mono as i64 + skew);
        let mono = |secs: u64| base + Duration::from_secs(secs);
        assert_eq!(clock.check_at(wall(1, 0), mono(1)), None);
        let step = clock.check_at(wall(2, 3600), mono(2)).expect("a jump");
        assert_eq!(step.by_secs, 3600);
        assert_eq!(describe(&step), "+1h (forward)");
        assert_eq!(
            clock.check_at(wall(3, 3600), mono(3)),
            None,
            "the new offset is the norm"
        );
        let back = clock.check_at(wall(4, -60), mono(4)).expect("a jump back");
        assert_eq!(back.by_secs, -3660);
        let status = clock.status(wall(4, -60));
        assert_eq!((status.jumps, status.last_jump), (2, Some(back)));
        assert!(!status.behind_audit_at_start);
        assert!(record(&back).reason.unwrap().contains("jumped by -1h 1m (back)"));
    }
}
