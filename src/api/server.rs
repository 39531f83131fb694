//! Serves the protocol on a Unix socket: identifies every peer by SO_PEERCRED, reads
//! line-framed requests with a size limit and a timeout, caps concurrent connections.

use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;

use super::protocol::{decode_request, Reply, Request, MAX_REQUEST_BYTES, READ_TIMEOUT};

/// The most connections served at once; more are told `busy` and closed.
pub const MAX_CONNECTIONS: usize = 128;

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
pub async fn serve<H: Handler>(listener: UnixListener, handler: Arc<H>, shutdown: impl Future<Output = ()>) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            _ = &mut shutdown => return,
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
            tokio::spawn(refuse_busy(stream));
            continue;
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            serve_connection(stream, handler).await;
            drop(permit);
        });
    }
}

async fn refuse_busy(mut stream: UnixStream) {
    let reply = Reply::error(
        "busy",
        format!("jitd is serving {MAX_CONNECTIONS} connections; try again"),
    );
    let _ = tokio::time::timeout(READ_TIMEOUT, stream.write_all(&reply.to_line())).await;
}

async fn serve_connection<H: Handler>(stream: UnixStream, handler: Arc<H>) {
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
        let reply = match tokio::time::timeout(READ_TIMEOUT, limited.read_until(b'\n', &mut line)).await {
            Err(_) => {
                let reply = Reply::error(
                    "timeout",
                    format!("no complete request within {}s", READ_TIMEOUT.as_secs()),
                );
                let _ = write.write_all(&reply.to_line()).await;
                return;
            }
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
                    let reply = Reply::error("too_large", format!("request is larger than {MAX_REQUEST_BYTES} bytes"));
                    let _ = write.write_all(&reply.to_line()).await;
                    return;
                }
                match decode_request(&line) {
                    Ok(request) => handler.handle(peer, request).await,
                    Err(reply) => reply,
                }
            }
        };
        if write.write_all(&reply.to_line()).await.is_err() {
            return;
        }
    }
}
