//! Serves the protocol on a Unix socket: identifies every peer by SO_PEERCRED, reads
//! line-framed requests with a size limit and a timeout, caps concurrent connections.

use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use super::protocol::{decode_request, Reply, Request, MAX_REQUEST_BYTES, READ_TIMEOUT};

/// The most connections served at once; more are told `busy` and closed. Idle ones are
/// closed after the read timeout, so a flood of them only delays others briefly.
pub const MAX_CONNECTIONS: usize = 512;

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

/// Accepts connections until `shutdown` completes; each is served on its own task.
///
/// On shutdown it stops accepting, lets every request already being handled finish and
/// answer, tells connections waiting for their next request that jitd is stopping, and
/// returns once they are all closed (or after [`DRAIN_TIMEOUT`]).
pub async fn serve<H: Handler>(listener: UnixListener, handler: Arc<H>, shutdown: impl Future<Output = ()>) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let (stopping_tx, stopping) = watch::channel(false);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            _ = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!("accepting a connection failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            tracing::warn!("refusing a connection: {MAX_CONNECTIONS} connections already open");
            crate::metrics::metrics().refused_connections.inc();
            connections.spawn(refuse(
                stream,
                Reply::error(
                    "busy",
                    format!("jitd is serving {MAX_CONNECTIONS} connections; try again"),
                ),
            ));
            continue;
        };
        let handler = handler.clone();
        let stopping = stopping.clone();
        connections.spawn(async move {
            serve_connection(stream, handler, stopping).await;
            drop(permit);
        });
    }
    // New clients now find no socket; those already queued in the backlog are told why
    // instead of being reset.
    if let Some(path) = listener
        .local_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(Path::to_path_buf))
    {
        let _ = std::fs::remove_file(path);
    }
    while let Some(Ok((stream, _))) = listener.accept().now_or_never() {
        connections.spawn(refuse(stream, shutting_down()));
    }
    drop(listener);
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
    Reply::error("shutting_down", "jitd is stopping; try again when it is back")
}

async fn stopped(stopping: &mut watch::Receiver<bool>) {
    // An error means the sender is gone, which only happens when serving is over.
    let _ = stopping.wait_for(|stop| *stop).await.map(|_| ());
}

async fn refuse(mut stream: UnixStream, reply: Reply) {
    let _ = tokio::time::timeout(READ_TIMEOUT, stream.write_all(&reply.to_line())).await;
}

async fn serve_connection<H: Handler>(stream: UnixStream, handler: Arc<H>, mut stopping: watch::Receiver<bool>) {
    let peer = match stream.peer_cred() {
        Ok(c) => Peer {
            uid: c.uid(),
            gid: c.gid(),
            pid: c.pid(),
        },
        Err(e) => {
            tracing::warn!("cannot read peer credentials, closing: {e}");
            return;
        }
    };
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    loop {
        let mut line = Vec::new();
        let mut limited = (&mut reader).take(MAX_REQUEST_BYTES as u64 + 1);
        let read = tokio::time::timeout(READ_TIMEOUT, limited.read_until(b'\n', &mut line));
        let (reply, keep_open) = tokio::select! {
            _ = stopped(&mut stopping) => (shutting_down(), false),
            read = read => match read {
                Err(_) => (Reply::error("timeout", format!("no complete request within {}s", READ_TIMEOUT.as_secs())), false),
                Ok(Err(e)) => {
                    tracing::debug!(uid = peer.uid, "connection read failed: {e}");
                    return;
                }
                Ok(Ok(0)) => return,
                Ok(Ok(_)) => {
                    let complete = line.last() == Some(&b'\n');
                    if complete {
                        line.pop();
                    }
                    if !complete && line.len() > MAX_REQUEST_BYTES {
                        (Reply::error("too_large", format!("request is larger than {MAX_REQUEST_BYTES} bytes")), false)
                    } else {
                        // A request being handled is always finished and answered, even when stopping.
                        let reply = match decode_request(&line) {
                            Ok(request) => handler.handle(peer, request).await,
                            Err(reply) => reply,
                        };
                        (reply, complete)
                    }
                }
            },
        };
        // A client that does not read its reply is dropped after the timeout.
        let sent = tokio::time::timeout(READ_TIMEOUT, write.write_all(&reply.to_line())).await;
        if !keep_open || !matches!(sent, Ok(Ok(()))) {
            return;
        }
    }
}
