//! Talking to etcd, shared by jitd and `jitctl fleet`: connecting (the endpoints, TLS
//! with a client certificate or plain http:// for a lab, bounded timeouts), paged
//! reads, watches and lease TTLs with a decoding limit no etcd writer can exceed.

use std::path::PathBuf;
use std::time::Duration;

use etcd_client::{
    Certificate, Client, ConnectOptions, GetOptions, Identity, KeyValue, TlsOptions, WatchOptions, WatchStream,
};

use super::settings::Tls;

/// How long one connection attempt may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long one call may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects to `endpoints` with `tls` (`None`: plain http://). Errors name the file or
/// the endpoints.
pub async fn connect(endpoints: &[String], tls: Option<&Tls>) -> Result<Client, String> {
    let mut options = ConnectOptions::new()
        .with_connect_timeout(CONNECT_TIMEOUT)
        .with_timeout(CALL_TIMEOUT)
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
    if let Some(tls) = tls {
        let read = |p: &PathBuf| std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()));
        let ca = Certificate::from_pem(read(&tls.ca)?);
        let identity = Identity::from_pem(read(&tls.cert)?, read(&tls.key)?);
        options = options.with_tls(TlsOptions::new().ca_certificate(ca).identity(identity));
    }
    Client::connect(endpoints, Some(options))
        .await
        .map_err(|e| format!("connecting to etcd at {}: {e}", endpoints.join(", ")))
}

/// Keys per page of a full read: with [`MAX_MESSAGE`], values of up to 16 MiB each
/// (etcd's default limit is 1.5 MiB) never make a page too large to decode.
const PAGE: i64 = 4;
/// The largest message jitd and jitctl decode from etcd (a page, a watch response).
pub const MAX_MESSAGE: usize = 64 << 20;

/// Reads every key under `prefix` at one revision, a few keys per call (so that no
/// value an etcd writer chose makes a response too large to decode); returns the
/// revision and the keys.
pub async fn read_all(client: &Client, prefix: &str) -> Result<(i64, Vec<KeyValue>), String> {
    let mut kv = client.kv_client().max_decoding_message_size(MAX_MESSAGE);
    let end = prefix_end(prefix);
    let mut from = prefix.as_bytes().to_vec();
    let mut revision = 0;
    let mut all = Vec::new();
    loop {
        let options = GetOptions::new()
            .with_range(end.clone())
            .with_limit(PAGE)
            .with_revision(revision);
        let page = kv
            .get(from.clone(), Some(options))
            .await
            .map_err(|e| format!("reading {prefix}: {e}"))?;
        if revision == 0 {
            revision = page.header().map_or(0, |h| h.revision());
        }
        all.extend(page.kvs().iter().cloned());
        match page.kvs().last() {
            Some(last) if page.more() => {
                from = last.key().to_vec();
                from.push(0);
            }
            _ => return Ok((revision, all)),
        }
    }
}

/// Watches the keys under `prefix` from revision `start` (0: from now), decoding
/// responses up to [`MAX_MESSAGE`].
pub async fn watch(client: &Client, prefix: &str, start: i64) -> Result<WatchStream, String> {
    let mut options = WatchOptions::new().with_prefix();
    if start > 0 {
        options = options.with_start_revision(start);
    }
    client
        .watch_client()
        .max_decoding_message_size(MAX_MESSAGE)
        .watch(prefix, Some(options))
        .await
        .map_err(|e| format!("watching {prefix}: {e}"))
}

/// The remaining TTL of `lease`: `Ok(None)` when the key has no lease or it is gone,
/// an error when etcd could not be asked (that is not an answer).
pub async fn lease_left(client: &mut Client, lease: i64) -> Result<Option<Duration>, String> {
    if lease == 0 {
        return Ok(None);
    }
    let ttl = client
        .lease_time_to_live(lease, None)
        .await
        .map_err(|e| format!("reading lease {lease:x}: {e}"))?
        .ttl();
    Ok((ttl > 0).then(|| Duration::from_secs(ttl as u64)))
}

/// Whether a watch failed because a response was too large to decode (reading
/// everything again, page by page, is then the way on).
pub fn too_large(e: &etcd_client::Error) -> bool {
    let text = e.to_string();
    text.contains("too large") || text.contains("OutOfRange") || text.contains("ResourceExhausted")
}

/// The end of the key range under `prefix` (its last byte plus one).
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    end
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_range_under_a_prefix_ends_just_past_it() {
        assert_eq!(super::prefix_end("/jitd/requests/"), b"/jitd/requests0".to_vec());
    }
}
