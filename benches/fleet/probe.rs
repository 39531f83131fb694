//! Watching many hosts' port at once from one thread: when does each accept a new TCP
//! connection (open), when does each stop accepting them (closed). Every attempt is a
//! fresh connection, closed with a reset as soon as it is accepted; attempts overlap
//! (a locked port drops the SYN, and the kernel would retry it only after a second).

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout};
use socket2::{Domain, Protocol, Socket, Type};

/// A new attempt to each host this often: the figures' resolution.
pub const EVERY: Duration = Duration::from_millis(5);
/// An attempt not accepted within this long was dropped.
const DROPPED_AFTER: Duration = Duration::from_millis(200);
/// While waiting for an opening, attempts older than this are given up (their SYN was
/// dropped; only a retransmission after a second could still get through).
const GIVE_UP_AFTER: Duration = Duration::from_millis(100);
/// After the first attempt that was not accepted, the host is watched this much longer:
/// an attempt sent later and accepted means it was not closed yet.
const HOLD: Duration = Duration::from_millis(50);

/// What to wait for.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// The first accepted connection: its time is when the bench saw it accepted.
    Open,
    /// The first attempt not accepted (refused or dropped) with none accepted after
    /// it: its time is when it was sent.
    Closed,
}

/// One attempt in flight.
struct Attempt {
    socket: Socket,
    sent: Instant,
}

/// One host being watched.
struct Target {
    to: SocketAddr,
    pending: Vec<Attempt>,
    next: Instant,
    /// Open: when it was seen open. Closed: the first attempt not accepted (since the
    /// last accepted one).
    found: Option<Instant>,
    last_accepted: Option<Instant>,
}

impl Target {
    fn done(&self, want: Want, now: Instant) -> bool {
        match (want, self.found) {
            (_, None) => false,
            (Want::Open, Some(_)) => true,
            (Want::Closed, Some(f)) => now >= f + DROPPED_AFTER + HOLD && self.pending.is_empty(),
        }
    }

    fn sending(&self, want: Want, now: Instant) -> bool {
        match (want, self.found) {
            (_, None) => true,
            (Want::Open, Some(_)) => false,
            (Want::Closed, Some(f)) => now < f + HOLD,
        }
    }

    /// An attempt sent at `sent` ended: accepted or not.
    fn ended(&mut self, want: Want, sent: Instant, accepted: bool, now: Instant) {
        match (want, accepted) {
            (Want::Open, true) => self.found = self.found.or(Some(now)),
            (Want::Open, false) => {}
            (Want::Closed, true) => {
                self.last_accepted = self.last_accepted.max(Some(sent));
                if self.found.is_some_and(|f| f < sent) {
                    self.found = None; // a later attempt got through: not closed yet
                }
            }
            (Want::Closed, false) => {
                if self.last_accepted.is_none_or(|a| sent > a) {
                    self.found = Some(self.found.map_or(sent, |f| f.min(sent)));
                }
            }
        }
    }
}

/// One TCP connection attempt to `to`, not waited for.
fn attempt(to: SocketAddr) -> std::io::Result<Socket> {
    let s = Socket::new(Domain::for_address(to), Type::STREAM, Some(Protocol::TCP))?;
    s.set_nonblocking(true)?;
    s.set_linger(Some(Duration::ZERO))?; // close with a reset: no TIME_WAIT pile-up
    match s.connect(&to.into()) {
        Ok(()) => Ok(s),
        Err(e) if e.raw_os_error() == Some(nix::libc::EINPROGRESS) => Ok(s),
        Err(e) => Err(e),
    }
}

/// For each of `targets`, the time from `start` until it was open or closed as `want`
/// says, or `None` if it was not by `start + limit`. Call it on a thread in the
/// client's namespace.
pub fn watch(targets: &[SocketAddr], start: Instant, want: Want, limit: Duration) -> Vec<Option<Duration>> {
    let mut all: Vec<Target> = targets
        .iter()
        .map(|&to| Target {
            to,
            pending: Vec::new(),
            next: start,
            found: None,
            last_accepted: None,
        })
        .collect();
    loop {
        let now = Instant::now();
        if now >= start + limit || all.iter().all(|t| t.done(want, now)) {
            break;
        }
        for t in all.iter_mut().filter(|t| t.sending(want, now) && now >= t.next) {
            match attempt(t.to) {
                Ok(socket) => t.pending.push(Attempt { socket, sent: now }),
                Err(_) => t.ended(want, now, false, now),
            }
            t.next = now + EVERY;
        }
        poll_once(&mut all, want);
    }
    let now = Instant::now();
    all.iter()
        .map(|t| {
            t.done(want, now)
                .then(|| t.found.map(|f| f.saturating_duration_since(start)))
                .flatten()
        })
        .collect()
}

/// Waits for any attempt to finish (at most until the next one is due), then settles
/// what finished or is too old.
fn poll_once(all: &mut [Target], want: Want) {
    let wait = all
        .iter()
        .filter(|t| t.sending(want, Instant::now()))
        .map(|t| t.next.saturating_duration_since(Instant::now()))
        .min()
        .unwrap_or(Duration::from_millis(5))
        .clamp(Duration::from_micros(100), Duration::from_millis(5));
    let ready: Vec<Vec<bool>> = {
        let mut fds: Vec<PollFd> = all
            .iter()
            .flat_map(|t| {
                t.pending
                    .iter()
                    .map(|a| PollFd::new(a.socket.as_fd(), PollFlags::POLLOUT))
            })
            .collect();
        let ms = u16::try_from(wait.as_millis().max(1)).unwrap_or(5);
        let _ = nix::poll::poll(&mut fds, PollTimeout::from(ms));
        let mut flags = fds.iter().map(|f| f.revents().is_some_and(|r| !r.is_empty()));
        all.iter()
            .map(|t| t.pending.iter().map(|_| flags.next().unwrap_or(false)).collect())
            .collect()
    };
    let now = Instant::now();
    for (t, ready) in all.iter_mut().zip(ready) {
        let mut still = Vec::with_capacity(t.pending.len());
        for (a, ready) in std::mem::take(&mut t.pending).into_iter().zip(ready) {
            let age = now.saturating_duration_since(a.sent);
            match (ready, a.socket.take_error()) {
                (true, Ok(None)) => t.ended(want, a.sent, true, now),
                (true, _) => t.ended(want, a.sent, false, now), // refused or unreachable
                (false, _) if want == Want::Open && age >= GIVE_UP_AFTER => {}
                (false, _) if want == Want::Closed && age >= DROPPED_AFTER => t.ended(want, a.sent, false, now),
                (false, _) => still.push(a),
            }
        }
        t.pending = still;
    }
}
