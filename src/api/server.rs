//! Serves the protocol on a Unix socket: identifies every peer by SO_PEERCRED, reads
//! line-framed requests with a size limit and a timeout, and shares the connection
//! slots fairly between users.
//!
//! # Connection slots
//! jitd serves at most [`MAX_CONNECTIONS`] (512) connections at once. The last
//! [`RESERVED_CONNECTIONS`](crate::config::RESERVED_CONNECTIONS) (64) of them are a reserve that only privileged peers
//! ([`Handler::privileged`]: root, and whoever the daemon adds) may take, so a flood
//! of unprivileged connections never locks out the administrators. Of the general
//! pool (the other 448), one uid may hold at most [`Limits::per_user`] (32 by
//! default, `[limits] max_connections_per_user`); privileged peers have no per-user
//! cap. A connection refused by these rules is answered `busy` with the reason (the
//! per-user cap or jitd being full), closed, and counted in `refused_connections`.
//!
//! The slot is taken right after `accept`, before anything is allocated for the
//! connection, and a [`Slot`] guard gives it back however the connection ends.
//!
//! # Connection lifetime
//! Besides the 10 s wait for each request line, a connection is closed after its
//! [`Limits::max_requests`]-th reply (1,000 by default) or once it is older than
//! [`Limits::lifetime`] (10 minutes by default): the request being handled is always
//! answered first. So no connection holds its slot for ever, however busy it keeps.

use std::collections::HashMap;
use std::future::Future;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::protocol::{decode_request, Reply, Request, MAX_REQUEST_BYTES, READ_TIMEOUT};
use crate::config::{Limits, GENERAL_CONNECTIONS, MAX_CONNECTIONS};
use crate::domain::ErrorCode;

/// How long the accept loop waits for [`Handler::privileged`] before treating the
/// peer as unprivileged.
pub const PRIVILEGE_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// A connected peer as the kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Process id, when known.
    pub pid: Option<i32>,
}

/// Answers requests; implemented by the daemon.
pub trait Handler: Send + Sync + 'static {
    /// Answers one request from `peer`.
    fn handle(&self, peer: Peer, request: Request) -> impl Future<Output = Reply> + Send;

    /// Whether `peer` may use the reserved slots and is exempt from the per-user cap.
    /// Asked on the accept path, and only when the general rules would refuse the
    /// connection; an answer slower than [`PRIVILEGE_CHECK_TIMEOUT`] counts as no.
    /// The default admits root only.
    fn privileged(&self, peer: Peer) -> impl Future<Output = bool> + Send {
        std::future::ready(peer.uid == 0)
    }
}

/// Why a connection gets no slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The uid already holds its share of the general pool.
    PerUser {
        /// The peer's uid.
        uid: u32,
        /// Its cap.
        limit: usize,
    },
    /// The general pool is full; only the reserve is left.
    GeneralFull,
    /// Every slot is taken.
    Full,
}

impl Refusal {
    /// The `busy` reply telling the peer why.
    pub fn reply(self) -> Reply {
        let message = match self {
            Refusal::PerUser { uid, limit } => format!(
                "uid {uid} already has {limit} connections open to jitd (limits.max_connections_per_user); close some and try again"
            ),
            Refusal::GeneralFull => format!(
                "jitd is serving {GENERAL_CONNECTIONS} connections, all it serves for users without privileges; try again"
            ),
            Refusal::Full => format!("jitd is serving {MAX_CONNECTIONS} connections; try again"),
        };
        Reply::error(ErrorCode::Busy, message)
    }
}

/// Open connections: how many in all, and per uid.
#[derive(Debug, Default)]
struct Open {
    total: usize,
    by_uid: HashMap<u32, usize>,
}

impl Open {
    /// Whether one more connection of `uid` fits (pure; see the module doc).
    fn admit(&self, uid: u32, privileged: bool, per_user: usize) -> Result<(), Refusal> {
        if self.total >= MAX_CONNECTIONS {
            return Err(Refusal::Full);
        }
        if privileged {
            return Ok(());
        }
        if self.by_uid.get(&uid).copied().unwrap_or(0) >= per_user {
            return Err(Refusal::PerUser { uid, limit: per_user });
        }
        if self.total >= GENERAL_CONNECTIONS {
            return Err(Refusal::GeneralFull);
        }
        Ok(())
    }
}

/// The connection slots of one server.
#[derive(Debug)]
struct Slots {
    open: Mutex<Open>,
    per_user: usize,
}

impl Slots {
    fn new(per_user: usize) -> Arc<Slots> {
        Arc::new(Slots {
            open: Mutex::new(Open::default()),
            per_user,
        })
    }

    /// Takes a slot for `uid`, or says why not.
    fn take(self: &Arc<Self>, uid: u32, privileged: bool) -> Result<Slot, Refusal> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.admit(uid, privileged, self.per_user)?;
        open.total += 1;
        *open.by_uid.entry(uid).or_insert(0) += 1;
        Ok(Slot {
            slots: self.clone(),
            uid,
        })
    }
}

/// One taken connection slot, given back when dropped.
#[derive(Debug)]
struct Slot {
    slots: Arc<Slots>,
    uid: u32,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.slots.open.lock().unwrap_or_else(|e| e.into_inner());
        open.total -= 1;
        if let Some(n) = open.by_uid.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                open.by_uid.remove(&self.uid);
            }
        }
    }
}

/// Logs refused connections at most once per interval, with a count of the rest.
#[derive(Debug, Default)]
struct RefusalLog {
    last: Option<Instant>,
    quiet: u64,
}

impl RefusalLog {
    const INTERVAL: Duration = Duration::from_secs(10);

    fn note(&mut self, refusal: Refusal) {
        crate::metrics::metrics().refused_connections.inc();
        if self.last.is_some_and(|t| t.elapsed() < Self::INTERVAL) {
            self.quiet += 1;
            return;
        }
        let message = refusal.reply().error.map(|e| e.message).unwrap_or_default();
        match self.quiet {
            0 => tracing::warn!("refusing a connection: {message}"),
            n => tracing::warn!("refusing a connection: {message} ({n} more refused since the last message)"),
        }
        self.last = Some(Instant::now());
        self.quiet = 0;
    }
}

/// Binds the socket at `path` (replacing a stale one), mode 0600, or 0660 with group
/// `gid` when given. The parent directory is created if missing.
pub fn bind(path: &Path, gid: Option<u32>) -> std::io::Result<UnixListener> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(path)?;
    let mode = if let Some(gid) = gid {
        nix::unistd::chown(path, None, Some(nix::unistd::Gid::from_raw(gid))).map_err(std::io::Error::from)?;
        0o660
    } else {
        0o600
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(listener)
}

/// Accepts connections until `shutdown` completes; each is served on its own task,
/// within `limits` (see the module doc).
///
/// On shutdown it stops accepting, lets every request already being handled finish and
/// answer, tells connections waiting for their next request that jitd is stopping, and
/// returns once they are all closed (or after [`DRAIN_TIMEOUT`]).
pub async fn serve<H: Handler>(
    listener: UnixListener,
    handler: Arc<H>,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) {
    let slots = Slots::new(limits.per_user);
    let mut backoff = crate::accept::AcceptBackoff::new("socket");
    let mut refusals = RefusalLog::default();
    let (stopping_tx, stopping) = watch::channel(false);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            _ = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => match backoff.take(accepted).await {
                Some((stream, _)) => stream,
                None => continue,
            },
        };
        let Some(peer) = peer_of(&stream) else { continue };
        let slot = match admit(&slots, handler.as_ref(), peer).await {
            Ok(slot) => slot,
            Err(refusal) => {
                refusals.note(refusal);
                refuse_now(stream, &refusal.reply());
                continue;
            }
        };
        let handler = handler.clone();
        let stopping = stopping.clone();
        connections.spawn(async move {
            let _slot = slot;
            serve_connection(stream, peer, handler, stopping, limits).await;
        });
    }
    drain(listener, connections, stopping_tx).await;
}

/// Takes a slot for `peer`, asking the handler about privilege only when the general
/// rules refuse (so an ordinary connection costs no user lookup).
async fn admit<H: Handler>(slots: &Arc<Slots>, handler: &H, peer: Peer) -> Result<Slot, Refusal> {
    match slots.take(peer.uid, false) {
        Err(Refusal::Full) => Err(Refusal::Full),
        Err(refusal) => {
            let privileged = tokio::time::timeout(PRIVILEGE_CHECK_TIMEOUT, handler.privileged(peer))
                .await
                .unwrap_or(false);
            if privileged {
                slots.take(peer.uid, true)
            } else {
                Err(refusal)
            }
        }
        ok => ok,
    }
}

fn peer_of(stream: &UnixStream) -> Option<Peer> {
    match stream.peer_cred() {
        Ok(c) => Some(Peer {
            uid: c.uid(),
            gid: c.gid(),
            pid: c.pid(),
        }),
        Err(e) => {
            tracing::warn!("cannot read peer credentials, closing: {e}");
            None
        }
    }
}

/// Answers a refused connection without spending a task on it: the reply is one short
/// line into an empty socket buffer, so a non-blocking write takes it whole (if not,
/// the peer only misses the reason).
fn refuse_now(stream: UnixStream, reply: &Reply) {
    if let Ok(mut stream) = stream.into_std() {
        let _ = stream.write_all(&reply.to_line());
    }
}

/// Stops serving: removes the socket, refuses what is queued, tells idle connections
/// jitd is stopping and waits (at most [`DRAIN_TIMEOUT`]) for them all to close.
async fn drain(listener: UnixListener, mut connections: JoinSet<()>, stopping_tx: watch::Sender<bool>) {
    // New clients now find no socket; those already queued in the backlog are told why
    // instead of being reset.
    if let Some(path) = listener
        .local_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(Path::to_path_buf))
    {
        let _ = std::fs::remove_file(path);
    }
    // accepted with the system call itself until the backlog is empty: tokio's own
    // accept is tried only once the reactor has seen the socket readable, and would
    // leave (and so reset) a connection queued just before
    if let Ok(listener) = listener.into_std() {
        while let Ok((stream, _)) = listener.accept() {
            match stream.set_nonblocking(true).and_then(|()| UnixStream::from_std(stream)) {
                Ok(stream) => drop(connections.spawn(refuse(stream, shutting_down()))),
                Err(e) => tracing::debug!("a connection queued at the stop could not be answered: {e}"),
            }
        }
    }
    let _ = stopping_tx.send(true);
    if tokio::time::timeout(DRAIN_TIMEOUT, async {
        while connections.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        tracing::warn!(
            "{} connection(s) still open after {DRAIN_TIMEOUT:?}; closing them",
            connections.len()
        );
    }
}

/// How long a stopping jitd waits for requests in flight to be answered.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

fn shutting_down() -> Reply {
    Reply::error(ErrorCode::ShuttingDown, "jitd is stopping; try again when it is back")
}

async fn stopped(stopping: &mut watch::Receiver<bool>) {
    // An error means the sender is gone, which only happens when serving is over.
    let _ = stopping.wait_for(|stop| *stop).await.map(|_| ());
}

async fn refuse(mut stream: UnixStream, reply: Reply) {
    let _ = tokio::time::timeout(READ_TIMEOUT, stream.write_all(&reply.to_line())).await;
}

/// What reading the next request line gave.
enum Next {
    /// A request line (without its newline); `true` if it was complete.
    Line(Vec<u8>, bool),
    /// Answer with this reply, then close.
    Refuse(Reply),
    /// Close without a word (the peer left or the read failed).
    Close,
}

async fn serve_connection<H: Handler>(
    stream: UnixStream,
    peer: Peer,
    handler: Arc<H>,
    mut stopping: watch::Receiver<bool>,
    limits: Limits,
) {
    let opened = Instant::now();
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut replies = 0u32;
    loop {
        let left = limits.lifetime.saturating_sub(opened.elapsed());
        let next = tokio::select! {
            _ = stopped(&mut stopping) => Next::Refuse(shutting_down()),
            next = next_line(&mut reader, peer, left, limits.lifetime) => next,
        };
        let (reply, keep_open) = match next {
            // A request being handled is always finished and answered, even when stopping.
            Next::Line(line, complete) => match decode_request(&line) {
                Ok(request) => (handler.handle(peer, request).await, complete),
                Err(reply) => (reply, complete),
            },
            Next::Refuse(reply) => (reply, false),
            Next::Close => return,
        };
        // A client that does not read its reply is dropped after the timeout.
        let sent = tokio::time::timeout(READ_TIMEOUT, write.write_all(&reply.to_line())).await;
        replies += 1;
        let spent = replies >= limits.max_requests || opened.elapsed() >= limits.lifetime;
        if spent {
            tracing::debug!(
                uid = peer.uid,
                replies,
                "closing a connection at its request or lifetime cap"
            );
        }
        if !keep_open || spent || !matches!(sent, Ok(Ok(()))) {
            return;
        }
    }
}

/// Reads one request line, waiting at most the read timeout and no longer than the
/// connection's `left` lifetime.
async fn next_line(
    reader: &mut BufReader<tokio::net::unix::OwnedReadHalf>,
    peer: Peer,
    left: Duration,
    lifetime: Duration,
) -> Next {
    let mut line = Vec::new();
    let mut limited = reader.take(MAX_REQUEST_BYTES as u64 + 1);
    let read = tokio::time::timeout(READ_TIMEOUT.min(left), limited.read_until(b'\n', &mut line)).await;
    match read {
        Err(_) if left < READ_TIMEOUT => Next::Refuse(Reply::error(
            ErrorCode::Timeout,
            format!(
                "the connection is {}s old, the most jitd allows; reconnect",
                lifetime.as_secs()
            ),
        )),
        Err(_) => Next::Refuse(Reply::error(
            ErrorCode::Timeout,
            format!("no complete request within {}s", READ_TIMEOUT.as_secs()),
        )),
        Ok(Err(e)) => {
            tracing::debug!(uid = peer.uid, "connection read failed: {e}");
            Next::Close
        }
        Ok(Ok(0)) => Next::Close,
        Ok(Ok(_)) => {
            let complete = line.last() == Some(&b'\n');
            if complete {
                line.pop();
            }
            if !complete && line.len() > MAX_REQUEST_BYTES {
                let message = format!("request is larger than {MAX_REQUEST_BYTES} bytes");
                return Next::Refuse(Reply::error(ErrorCode::TooLarge, message));
            }
            Next::Line(line, complete)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(total: usize, by_uid: &[(u32, usize)]) -> Open {
        Open {
            total,
            by_uid: by_uid.iter().copied().collect(),
        }
    }

    #[test]
    fn a_user_gets_its_share_of_the_general_pool_and_no_more() {
        assert_eq!(open(0, &[]).admit(1000, false, 32), Ok(()));
        assert_eq!(open(31, &[(1000, 31)]).admit(1000, false, 32), Ok(()));
        assert_eq!(
            open(32, &[(1000, 32)]).admit(1000, false, 32),
            Err(Refusal::PerUser { uid: 1000, limit: 32 })
        );
        assert_eq!(open(32, &[(1000, 32)]).admit(1001, false, 32), Ok(()));
    }

    #[test]
    fn the_reserve_is_for_privileged_peers_only() {
        let general_full = open(GENERAL_CONNECTIONS, &[(1000, 1)]);
        assert_eq!(general_full.admit(1001, false, 32), Err(Refusal::GeneralFull));
        assert_eq!(general_full.admit(0, true, 32), Ok(()));
        let full = open(MAX_CONNECTIONS, &[]);
        assert_eq!(full.admit(0, true, 32), Err(Refusal::Full));
        // privileged peers have no per-user cap
        assert_eq!(open(100, &[(0, 100)]).admit(0, true, 32), Ok(()));
    }

    #[test]
    fn slots_are_given_back_when_dropped() {
        let slots = Slots::new(2);
        let a = slots.take(7, false).unwrap();
        let b = slots.take(7, false).unwrap();
        assert!(matches!(slots.take(7, false), Err(Refusal::PerUser { .. })));
        drop(a);
        let c = slots.take(7, false).unwrap();
        drop((b, c));
        let open = slots.open.lock().unwrap();
        assert_eq!((open.total, open.by_uid.len()), (0, 0));
    }

    #[test]
    fn refusals_name_their_reason() {
        let text = |r: Refusal| serde_json::to_string(&r.reply()).unwrap();
        assert!(text(Refusal::PerUser { uid: 65534, limit: 32 }).contains("uid 65534 already has 32 connections"));
        assert!(text(Refusal::GeneralFull).contains("without privileges"));
        assert!(text(Refusal::Full).contains("\"busy\""));
    }

    struct Echo;

    impl Handler for Echo {
        async fn handle(&self, _peer: Peer, _request: Request) -> Reply {
            Reply::ok("pong")
        }
    }

    /// Serves `Echo` with `limits` on a fresh socket; returns a connected client.
    async fn client(limits: Limits) -> (tempfile::TempDir, UnixStream) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = bind(&path, None).unwrap();
        tokio::spawn(serve(listener, Arc::new(Echo), limits, std::future::pending()));
        (dir, UnixStream::connect(&path).await.unwrap())
    }

    /// Replies read until the server closes the connection.
    async fn replies(stream: UnixStream, requests: usize, every: Duration) -> usize {
        let (read, mut write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        let mut count = 0;
        for _ in 0..requests {
            let _ = write.write_all(b"{\"v\":1,\"op\":\"status\"}\n").await;
            match tokio::time::timeout(Duration::from_secs(5), lines.next_line()).await {
                Ok(Ok(Some(_))) => count += 1,
                _ => break,
            }
            tokio::time::sleep(every).await;
        }
        count
    }

    #[tokio::test]
    async fn a_connection_closes_after_its_request_cap() {
        let limits = Limits {
            max_requests: 3,
            ..Limits::default()
        };
        let (_dir, stream) = client(limits).await;
        assert_eq!(replies(stream, 10, Duration::ZERO).await, 3);
    }

    #[tokio::test]
    async fn a_connection_closes_at_the_end_of_its_lifetime() {
        let limits = Limits {
            lifetime: Duration::from_millis(600),
            ..Limits::default()
        };
        let (_dir, stream) = client(limits).await;
        // One request every 200 ms: a few are answered, then the connection is closed.
        let answered = replies(stream, 50, Duration::from_millis(200)).await;
        assert!((1..50).contains(&answered), "{answered}");
    }
}
