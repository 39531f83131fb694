//! A client of the socket protocol: one connection, one request, one reply.

use std::path::Path;
use std::time::Duration;

use serde::de::DeserializeOwned;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::protocol::{encode_request, ErrorBody, Reply, Request, MAX_REPLY_BYTES};

/// How long a client waits for jitd's reply.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(120);

/// Why a call did not produce a result.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be reached.
    #[error("cannot connect to jitd at {path}: {source} (is jitd running, and may you use its socket?)")]
    Connect {
        /// Socket path.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The connection broke or the reply was unreadable.
    #[error("talking to jitd: {0}")]
    Io(String),
    /// jitd answered with an error.
    #[error("{}", .0.message)]
    Refused(ErrorBody),
}

/// Sends `request` to the jitd at `socket` and decodes the result as `T`.
pub async fn call<T: DeserializeOwned>(socket: &Path, request: &Request) -> Result<T, ClientError> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|source| ClientError::Connect {
            path: socket.display().to_string(),
            source,
        })?;
    let exchange = async {
        let (read, mut write) = stream.into_split();
        // jitd may answer and close before reading the request (busy, stopping): a
        // failed write still leaves its answer to read.
        let sent = write.write_all(&encode_request(request)).await;
        let mut line = Vec::new();
        BufReader::new(read)
            .take(MAX_REPLY_BYTES as u64)
            .read_until(b'\n', &mut line)
            .await?;
        match sent {
            Err(e) if line.is_empty() => Err(e),
            _ => Ok(line),
        }
    };
    let line = tokio::time::timeout(REPLY_TIMEOUT, exchange)
        .await
        .map_err(|_| ClientError::Io(format!("no reply within {}s", REPLY_TIMEOUT.as_secs())))?
        .map_err(|e| ClientError::Io(e.to_string()))?;
    if line.is_empty() {
        return Err(ClientError::Io("jitd closed the connection without a reply".into()));
    }
    let reply: Reply = serde_json::from_slice(&line).map_err(|e| ClientError::Io(format!("unreadable reply: {e}")))?;
    match (reply.ok, reply.result, reply.error) {
        (true, Some(result), _) => {
            serde_json::from_value(result).map_err(|e| ClientError::Io(format!("unexpected result: {e}")))
        }
        (_, _, Some(error)) => Err(ClientError::Refused(error)),
        _ => Err(ClientError::Io("reply has neither result nor error".into())),
    }
}
