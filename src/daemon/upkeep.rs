//! The daemon's timers and watchers. Each only observes and then asks the committer:
//! the expiry timer, the drift monitor (nftables events on jitd's own table, debounced,
//! plus a periodic backstop), the checkpoint tick and SIGHUP. Each ends when `stopping`
//! turns true; ending otherwise is a failure that stops jitd.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use super::drift::{Checked, DriftCause, Pace};
use super::job::{Job, Observed};
use super::Daemon;
use crate::audit::{Action, AuditRecord, Outcome};
use crate::domain::Caller;
use crate::fault;
use crate::firewall::{monitor, Firewall};

/// How often jitd compares the kernel with its view even without a change event.
pub const RECONCILE_EVERY: Duration = Duration::from_secs(10);
/// How long a burst of change events is gathered before the kernel is read once.
const DEBOUNCE: Duration = Duration::from_millis(20);
/// How often changed grants are checkpointed to `grants.json`.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
/// How many times a check is retried when jitd's own whole-table change overtook it.
const STALE_RETRIES: usize = 3;

pub(super) type Stopping = watch::Receiver<bool>;

async fn stopped(stopping: &mut Stopping) {
    let _ = stopping.wait_for(|s| *s).await;
}

/// Asks the committer to expire grants at their deadlines.
pub async fn run_expiry<F: Firewall>(daemon: Arc<Daemon<F>>, mut stopping: Stopping) -> Result<(), String> {
    loop {
        let notified = daemon.expiry_changed.notified();
        let next = daemon.next_wake();
        tokio::select! {
            _ = stopped(&mut stopping) => return Ok(()),
            _ = notified => continue,
            _ = async {
                match next {
                    Some(deadline) => tokio::time::sleep_until(deadline).await,
                    None => std::future::pending().await,
                }
            } => {}
        }
        let booked = daemon.expiry_changed.notified();
        if !daemon.submit(Job::Expire).await {
            return committer_gone(&stopping);
        }
        // the committer notifies `expiry_changed` once it has booked the expiry
        tokio::select! {
            _ = stopped(&mut stopping) => return Ok(()),
            _ = booked => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Checks the kernel whenever a transaction touches jitd's table (not jitd's own),
/// and every [`RECONCILE_EVERY`] in any case. A change that opens access is repaired at
/// once, always. When repairs keep being undone ([`Backoff`]), only the repairs of
/// changes that close access (or change nothing that matters) wait, and the audit
/// records coalesce: one for the streak at most every back-off delay.
pub async fn watch_drift<F: Firewall>(daemon: Arc<Daemon<F>>, mut stopping: Stopping) -> Result<(), String> {
    let every = fault::period("JITD_RECONCILE_MS", RECONCILE_EVERY);
    let mut events = listen(every);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut backoff = Backoff::default();
    // a deferred repair: when to check again, and what caused it
    let mut retry: Option<(Instant, DriftCause)> = None;
    loop {
        let retry_at = retry.as_ref().map(|(at, _)| *at);
        let summary_at = backoff.summary_at();
        let cause = tokio::select! {
            _ = stopped(&mut stopping) => return Ok(()),
            _ = tick.tick() => DriftCause::Periodic,
            _ = async { tokio::time::sleep_until(summary_at.expect("guarded")).await }, if summary_at.is_some() => {
                if let Some(record) = backoff.summary_due(Instant::now()) {
                    if !daemon.submit(Job::Record(vec![record])).await {
                        return committer_gone(&stopping);
                    }
                }
                continue;
            }
            _ = async { tokio::time::sleep_until(retry_at.expect("guarded")).await }, if retry_at.is_some() => {
                retry.take().expect("guarded").1
            }
            event = async { events.as_mut().expect("guarded").recv().await }, if events.is_some() => match event {
                None => return Err("the nftables monitor stopped".into()),
                Some(g) if g.pid != 0 && daemon.firewall.made_by_us(g.pid) => continue,
                Some(g) => DriftCause::ChangedBy { process: g.process, pid: g.pid },
            },
        };
        if let Some(rx) = events.as_mut() {
            gather(rx, DEBOUNCE).await;
        }
        let now = Instant::now();
        let pace = backoff.pace(now);
        let cause = match backoff.describe(now) {
            Some(streak) => DriftCause::Contested {
                cause: Box::new(cause),
                streak,
            },
            None => cause,
        };
        tracing::debug!("reading the kernel to check for drift: {cause}");
        let Some(checked) = daemon.check_drift(&cause, pace).await else {
            return committer_gone(&stopping);
        };
        daemon.health.drift_checked(&checked);
        let now = Instant::now();
        if let Checked::Deferred(found) = &checked {
            tracing::info!("drift that opens nothing ({found}) is repaired after the back-off");
            retry = Some((backoff.closing_due(), cause.clone()));
        }
        backoff.note(&checked, pace, now);
        if let Some(record) = backoff.summary_due(now) {
            if !daemon.submit(Job::Record(vec![record])).await {
                return committer_gone(&stopping);
            }
        }
    }
}

/// Subscribes to nftables change events, unless that fails (or the `no-monitor` fault
/// is injected): then only the periodic check remains.
fn listen(every: Duration) -> Option<mpsc::UnboundedReceiver<monitor::Generation>> {
    if fault::injected("no-monitor") {
        tracing::warn!("injected fault no-monitor: checking every {every:?} only");
        return None;
    }
    match monitor::watch() {
        Ok(rx) => Some(rx),
        Err(e) => {
            tracing::warn!("cannot listen to nftables changes ({e}); checking every {every:?} only");
            None
        }
    }
}

/// Gathers the rest of a burst of change events: waits `wait`, then takes every event
/// that came meanwhile, so that the kernel is read once per burst. Returns how many.
async fn gather<T>(rx: &mut mpsc::UnboundedReceiver<T>, wait: Duration) -> usize {
    tokio::time::sleep(wait).await;
    let mut more = 0;
    while rx.try_recv().is_ok() {
        more += 1;
    }
    more
}

/// Repairs in a row that are made at once, each with its record; after them the
/// streak is contested.
const FREE_REPAIRS: u32 = 5;
/// The first delay once repairs keep being undone; it doubles with each repair.
const FIRST_DELAY: Duration = Duration::from_millis(250);
/// The longest delay: how long another process's change that opens nothing may last,
/// and how long repairs may go without a record of their own.
pub const MAX_DELAY: Duration = Duration::from_secs(30);
/// A repair this long after the previous one starts afresh.
const STREAK_GAP: Duration = Duration::from_secs(60);

/// Back-off while another process keeps undoing jitd's table: after [`FREE_REPAIRS`]
/// repairs in a row the delay doubles with each repair (from [`FIRST_DELAY`] up to
/// [`MAX_DELAY`]). It never delays a repair of a change that opens access; it delays
/// the repairs of changes that only close access until the delay has passed since the
/// last repair, and the audit records of the streak coalesce into one at most every
/// delay. A clean check, or no repair for [`STREAK_GAP`], ends it. Pure: the caller
/// passes the time.
#[derive(Debug, Default, Clone)]
pub struct Backoff {
    /// Repairs (or failed repairs) in the current streak.
    repairs: u32,
    /// When the first and the latest of them were made.
    first: Option<Instant>,
    last: Option<Instant>,
    /// Repairs made without a record of their own, since the last record.
    unrecorded: u32,
    /// What the latest of those found.
    unrecorded_found: String,
    /// When the streak was last recorded.
    recorded: Option<Instant>,
}

impl Backoff {
    /// The current delay.
    pub fn delay(&self) -> Duration {
        let Some(over) = self.repairs.checked_sub(FREE_REPAIRS) else {
            return Duration::ZERO;
        };
        FIRST_DELAY
            .checked_mul(1u32.checked_shl(over).unwrap_or(u32::MAX))
            .map_or(MAX_DELAY, |d| d.min(MAX_DELAY))
    }

    fn contested(&self) -> bool {
        self.repairs >= FREE_REPAIRS
    }

    /// How a check made at `now` treats what it finds.
    pub fn pace(&self, now: Instant) -> Pace {
        if !self.contested() || self.last.is_some_and(|l| now.saturating_duration_since(l) > STREAK_GAP) {
            return Pace::AT_ONCE;
        }
        Pace {
            closing_waits: now < self.closing_due(),
            record: self
                .recorded
                .is_none_or(|r| now.saturating_duration_since(r) >= self.delay()),
        }
    }

    /// When a deferred repair is made: the delay after the last repair.
    pub fn closing_due(&self) -> Instant {
        self.last.map_or_else(Instant::now, |l| l + self.delay())
    }

    /// Notes the outcome of a check made at `now` with `pace`.
    pub fn note(&mut self, checked: &Checked, pace: Pace, now: Instant) {
        match checked {
            Checked::Clean => {
                // what was not yet recorded stays for [`Backoff::summary_due`]
                *self = Backoff {
                    unrecorded: self.unrecorded,
                    unrecorded_found: std::mem::take(&mut self.unrecorded_found),
                    first: self.first.filter(|_| self.unrecorded > 0),
                    ..Backoff::default()
                }
            }
            Checked::Stale | Checked::Deferred(_) => {}
            Checked::Repaired(found) | Checked::Failed(found) => {
                if self
                    .last
                    .is_some_and(|last| now.saturating_duration_since(last) > STREAK_GAP)
                {
                    *self = Backoff {
                        unrecorded: self.unrecorded,
                        unrecorded_found: std::mem::take(&mut self.unrecorded_found),
                        ..Backoff::default()
                    };
                }
                self.repairs += 1;
                self.first.get_or_insert(now);
                self.last = Some(now);
                if pace.record || matches!(checked, Checked::Failed(_)) {
                    // a failed repair is on record through its `failed` record
                    self.recorded = Some(now);
                } else {
                    self.unrecorded += 1;
                    self.unrecorded_found = found.clone();
                }
            }
        }
    }

    /// When the repairs made without a record of their own are to be recorded.
    pub fn summary_at(&self) -> Option<Instant> {
        if self.unrecorded == 0 {
            return None;
        }
        Some(self.recorded.map_or_else(Instant::now, |r| r + self.delay()))
    }

    /// The record of the repairs made without one of their own, once it is due: the
    /// delay has passed since the last record, or the streak has ended.
    pub fn summary_due(&mut self, now: Instant) -> Option<AuditRecord> {
        if self.unrecorded == 0 {
            return None;
        }
        let ended = !self.contested();
        if !ended
            && self
                .recorded
                .is_some_and(|r| now.saturating_duration_since(r) < self.delay())
        {
            return None;
        }
        let mut r = AuditRecord::new(chrono::Utc::now(), None, "jitd", Action::Repair, Outcome::Repaired);
        r.reason = Some(format!(
            "drift repaired {} more time(s) in {}s while another process kept changing the table; each change that opened access was repaired at once, recorded here together; the last found: {}",
            self.unrecorded,
            self.first.map_or(0, |f| now.saturating_duration_since(f).as_secs()),
            self.unrecorded_found
        ));
        self.unrecorded = 0;
        self.unrecorded_found.clear();
        self.recorded = Some(now);
        if ended {
            self.first = None;
        }
        Some(r)
    }

    /// While the streak is contested: what the next repair's record adds to its cause.
    pub fn describe(&self, now: Instant) -> Option<String> {
        let first = self.first.filter(|_| self.contested())?;
        Some(format!(
            "drift repaired {} times in {}s, another process keeps changing the table; changes that open access are repaired at once, others after {}",
            self.repairs,
            now.saturating_duration_since(first).as_secs(),
            humantime::format_duration(self.delay())
        ))
    }
}

impl<F: Firewall> Daemon<F> {
    /// Reads the kernel (holding nothing) and has the committer compare and repair.
    /// Returns `None` when the committer has stopped.
    pub async fn check_drift(&self, cause: &DriftCause, pace: Pace) -> Option<Checked> {
        for _ in 0..STALE_RETRIES {
            let settled = self.lock().settled;
            let read_at = tokio::time::Instant::now();
            let table = match self.firewall.read_table(true).await {
                Ok(table) => table,
                Err(e) => {
                    tracing::error!("cannot read the kernel's ruleset to check it: {e}");
                    return Some(Checked::Failed(e.to_string()));
                }
            };
            let (reply, answer) = oneshot::channel();
            if !self
                .submit(Job::Repair(
                    cause.clone(),
                    Observed {
                        table,
                        settled,
                        read_at,
                    },
                    pace,
                    reply,
                ))
                .await
            {
                return None;
            }
            match answer.await {
                Ok(Checked::Stale) => continue,
                Ok(checked) => return Some(checked),
                Err(_) => return None,
            }
        }
        Some(Checked::Stale)
    }
}

/// Asks the committer for a checkpoint every [`CHECKPOINT_EVERY`] (it writes one only
/// when the grants changed).
pub async fn checkpoints<F: Firewall>(daemon: Arc<Daemon<F>>, mut stopping: Stopping) -> Result<(), String> {
    let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
    loop {
        tokio::select! {
            _ = stopped(&mut stopping) => return Ok(()),
            _ = tick.tick() => {}
        }
        if !daemon.submit(Job::Checkpoint).await {
            return committer_gone(&stopping);
        }
    }
}

/// Reloads the policy on SIGHUP; an invalid policy is logged and the old one kept.
pub async fn reload_on_sighup<F: Firewall>(daemon: Arc<Daemon<F>>, mut stopping: Stopping) -> Result<(), String> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup()).map_err(|e| format!("cannot listen for SIGHUP: {e}"))?;
    loop {
        tokio::select! {
            _ = stopped(&mut stopping) => return Ok(()),
            got = hup.recv() => if got.is_none() { return Err("the SIGHUP stream ended".into()) },
        }
        let path = daemon.config().path;
        tracing::info!("SIGHUP: reloading {}", path.display());
        let root = Caller {
            uid: 0,
            name: "root (SIGHUP)".into(),
            groups: Vec::new(),
            signer: None,
        };
        if let Err(reply) = daemon.reload(&path, &root).await {
            tracing::error!("{}", reply.error.map(|e| e.message).unwrap_or_default());
        }
    }
}

fn committer_gone(stopping: &Stopping) -> Result<(), String> {
    if *stopping.borrow() {
        Ok(())
    } else {
        Err("the committer is gone".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::tests::{ask, ask_for, daemon, root};
    use crate::daemon::Handler;
    use crate::firewall::kernel::KernelTable;
    use crate::firewall::netlink::RawElement;

    #[tokio::test(start_paused = true)]
    async fn a_shorter_grant_made_later_expires_at_its_own_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let d = daemon(dir.path()).await;
        let (_stop, stopping) = watch::channel(false);
        let expiry = tokio::spawn(run_expiry(d.clone(), stopping));
        assert!(unpaused(d.handle(root(), ask(600))).await.ok);
        tokio::time::sleep(Duration::from_secs(1)).await;
        // the timer sleeps until 600 s; this grant must wake it earlier
        assert!(unpaused(d.handle(root(), ask_for("192.0.2.8", 10))).await.ok);
        tokio::time::sleep(Duration::from_millis(9_900)).await;
        assert_eq!(d.lock().book.len(), 2, "not before its deadline");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            wait(|| d.lock().book.len() == 1).await,
            "the 10 s grant ended at its deadline"
        );
        tokio::time::sleep(Duration::from_secs(585)).await;
        assert_eq!(d.lock().book.len(), 1, "the 600 s one lives on");
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(wait(|| d.lock().book.is_empty()).await, "and then ends too");
        expiry.abort();
    }

    /// Runs `work` with the clock running: while a request waits for the writer thread
    /// (real time), a paused clock would jump to the next timer, the expiry's.
    async fn unpaused<T>(work: impl std::future::Future<Output = T>) -> T {
        tokio::time::resume();
        let out = work.await;
        tokio::time::pause();
        out
    }

    /// Polls `check` for up to 2 s of real time (the writer is a real thread).
    async fn wait(mut check: impl FnMut() -> bool) -> bool {
        for _ in 0..400 {
            if check() {
                return true;
            }
            unpaused(tokio::time::sleep(Duration::from_millis(5))).await;
        }
        check()
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_change_events_is_read_once() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let sender = tokio::spawn(async move {
            for i in 0..10u32 {
                tx.send(i).unwrap();
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            // one more, well after the window: it starts the next round
            tokio::time::sleep(DEBOUNCE * 5).await;
            tx.send(99).unwrap();
        });
        assert_eq!(rx.recv().await, Some(0), "the first event starts the window");
        let started = Instant::now();
        assert_eq!(gather(&mut rx, DEBOUNCE).await, 9, "the rest of the burst");
        assert_eq!(started.elapsed(), DEBOUNCE, "gathered for the debounce window");
        assert_eq!(rx.recv().await, Some(99), "a later event is a new round");
        sender.await.unwrap();
    }

    fn repaired() -> Checked {
        Checked::Repaired("element … is missing".into())
    }

    #[test]
    fn the_back_off_grows_to_its_cap_and_says_why() {
        let start = Instant::now();
        let mut b = Backoff::default();
        let mut delays = Vec::new();
        for i in 0..16u64 {
            delays.push(b.delay());
            b.note(&repaired(), Pace::AT_ONCE, start + Duration::from_secs(i));
        }
        let ms = |ms| Duration::from_millis(ms);
        assert_eq!(
            delays[..12],
            [0, 0, 0, 0, 0, 250, 500, 1000, 2000, 4000, 8000, 16_000].map(ms),
            "five repairs at once, then doubling"
        );
        assert_eq!(delays[12..], [MAX_DELAY; 4], "capped");
        let note = b.describe(start + Duration::from_secs(20)).unwrap();
        assert_eq!(
            note,
            "drift repaired 16 times in 20s, another process keeps changing the table; changes that open access are repaired at once, others after 30s"
        );
        assert_eq!(b.delay(), MAX_DELAY, "no overflow however long the fight");
        for _ in 0..100 {
            b.note(
                &Checked::Failed("nft refused".into()),
                Pace::AT_ONCE,
                start + Duration::from_secs(21),
            );
        }
        assert_eq!(b.delay(), MAX_DELAY, "failed repairs count too, still capped");
    }

    #[test]
    fn the_back_off_resets_on_a_clean_check_or_after_a_quiet_spell() {
        let start = Instant::now();
        let mut b = Backoff::default();
        assert_eq!(b.describe(start), None, "nothing to say at first");
        for i in 0..8 {
            b.note(&repaired(), Pace::AT_ONCE, start + Duration::from_millis(i * 100));
        }
        assert!(!b.delay().is_zero());
        b.note(&Checked::Stale, Pace::AT_ONCE, start + Duration::from_secs(1));
        assert!(!b.delay().is_zero(), "a stale reading says nothing");
        b.note(&Checked::Clean, Pace::AT_ONCE, start + Duration::from_secs(1));
        assert!(b.delay().is_zero(), "clean: back to repairing at once");
        assert_eq!(b.describe(start + Duration::from_secs(1)), None);
        for i in 0..8 {
            b.note(&repaired(), Pace::AT_ONCE, start + Duration::from_secs(2 + i));
        }
        assert!(!b.delay().is_zero());
        b.note(
            &repaired(),
            Pace::AT_ONCE,
            start + Duration::from_secs(9) + STREAK_GAP + Duration::from_secs(1),
        );
        assert!(b.delay().is_zero(), "a repair long after the last one starts afresh");
    }

    #[test]
    fn in_a_streak_only_closing_repairs_wait_and_records_coalesce_until_the_delay() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut b = Backoff::default();
        for i in 0..FREE_REPAIRS as u64 {
            assert_eq!(b.pace(at(i)), Pace::AT_ONCE, "the first repairs are free");
            b.note(&repaired(), Pace::AT_ONCE, at(i));
            assert!(b.summary_due(at(i)).is_none(), "each had its own record");
        }
        // contested: the delay is 250 ms after the last repair
        let pace = b.pace(at(100));
        assert!(pace.closing_waits, "a closing repair waits");
        assert!(
            !pace.record,
            "recorded 96 ms ago: the next repair waits for the summary"
        );
        assert_eq!(b.closing_due(), at(4) + FIRST_DELAY);
        // an opening repair is made at once (commit_repair ignores `closing_waits`
        // for it) and counted for the summary
        b.note(&repaired(), pace, at(100));
        assert!(b.summary_due(at(150)).is_none(), "not before the delay");
        let summary = b
            .summary_due(at(4) + Duration::from_secs(1))
            .expect("due after the delay");
        let why = summary.reason.unwrap();
        assert!(why.starts_with("drift repaired 1 more time(s) in "), "{why}");
        assert!(why.contains("repaired at once"), "{why}");
        // an unrecorded repair is never lost when the streak ends on a clean check
        let pace = b.pace(at(1200));
        b.note(&repaired(), Pace { record: false, ..pace }, at(1200));
        b.note(&Checked::Clean, Pace::AT_ONCE, at(1300));
        assert_eq!(b.pace(at(1300)), Pace::AT_ONCE);
        assert!(b.summary_due(at(1300)).is_some(), "the streak's last repairs on record");
        assert!(b.summary_due(at(1400)).is_none(), "once");
    }

    /// At 100,000 elements on a busy host a reading reaches the committer seconds after
    /// it began; the kernel's times left are as of the reading, so they must not look
    /// longer than the grants' (which made jitd "repair" every element).
    #[tokio::test]
    async fn a_slow_reading_is_compared_as_of_when_it_began() {
        let dir = tempfile::tempdir().unwrap();
        let d = daemon(dir.path()).await;
        assert!(d.handle(root(), ask(600)).await.ok);
        let read_at = Instant::now() - Duration::from_secs(5);
        let (_, deadline) = d.lock().book.elements(Instant::now())[0];
        // 192.0.2.7 . tcp . 22, each field padded to 4 bytes, as the kernel showed it
        let element = RawElement {
            key: vec![192, 0, 2, 7, 6, 0, 0, 0, 0, 22, 0, 0],
            key_end: None,
            flags: 0,
            expires_ms: Some((deadline - read_at).as_millis() as u64),
            packets: None,
        };
        let table = KernelTable {
            objects: Vec::new(),
            elements: [("grants4".to_string(), vec![element])].into(),
        };
        let settled = d.lock().settled;
        let (reply, answer) = oneshot::channel();
        let observed = Observed {
            table: Some(table),
            settled,
            read_at,
        };
        assert!(
            d.submit(Job::Repair(DriftCause::Periodic, observed, Pace::AT_ONCE, reply))
                .await
        );
        let checked = answer.await.unwrap();
        assert!(matches!(checked, Checked::Clean), "{checked:?}");
    }

    /// An element put back gets the time its grant has left now, not as of the reading
    /// (else it outlasts the grant by the reading's delay, and is "repaired" again at
    /// every check).
    #[tokio::test]
    async fn an_element_put_back_lasts_no_longer_than_its_grant() {
        let dir = tempfile::tempdir().unwrap();
        let d = daemon(dir.path()).await;
        assert!(d.handle(root(), ask(600)).await.ok);
        let table = KernelTable {
            objects: Vec::new(),
            elements: Default::default(),
        };
        let (reply, answer) = oneshot::channel();
        let observed = Observed {
            table: Some(table),
            settled: d.lock().settled,
            read_at: Instant::now() - Duration::from_secs(5),
        };
        assert!(
            d.submit(Job::Repair(DriftCause::Periodic, observed, Pace::AT_ONCE, reply))
                .await
        );
        let checked = answer.await.unwrap();
        assert!(matches!(checked, Checked::Repaired(_)), "{checked:?}");
        let batch = d.firewall.applied.lock().unwrap().last().cloned().unwrap().to_string();
        let timeout: u64 = batch
            .split("\"timeout\":")
            .nth(1)
            .and_then(|t| t.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
            .unwrap_or_else(|| panic!("a timed element in {batch}"));
        assert!(
            timeout <= 600,
            "put back for {timeout}s, the grant has at most 600s left"
        );
    }
}
