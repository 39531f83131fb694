//! Talking to etcd, shared by jitd and `jitctl fleet`: connecting (the endpoints, TLS
//! with a client certificate or plain http:// for a lab, bounded timeouts), reads page
//! by page ([`Pages`]: whatever an etcd writer stored, one page at a time is all that
//! is held, and an entry over [`MAX_ENTRY`] is passed on as its key alone, never
//! decoded whole), watches and lease TTLs with a decoding limit no etcd writer can
//! exceed.

use std::path::PathBuf;
use std::time::Duration;

use etcd_client::{
    Certificate, Client, ConnectOptions, GetOptions, GetResponse, Identity, KeyValue, KvClient, TlsOptions,
    WatchOptions, WatchStream,
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

/// The largest entry (key and value) a read passes on whole: far above any value jitd
/// or jitctl writes (a request or an approval is at most 8 KiB, a status or a host's
/// record a few hundred bytes), far below what etcd lets a writer store (1.5 MiB by
/// default, more if so configured).
pub const MAX_ENTRY: usize = 64 << 10;
/// Entries per page at most: with [`MAX_ENTRY`], a page takes about 1 MiB to decode.
const PAGE: i64 = 16;
/// What one entry may take beyond its key and value in a response (revisions, lease,
/// framing), and one response beyond its entries (the header).
const ENTRY_FRAMING: usize = 256;
const PAGE_FRAMING: usize = 4096;
/// The largest message jitd and jitctl decode from etcd: a watch response (more means
/// reading everything again, page by page), or the key alone of an entry too large to
/// read (etcd's own limit on a request, 1.5 MiB by default, bounds a key).
pub const MAX_MESSAGE: usize = 4 << 20;

/// One entry of a paged read.
#[derive(Debug, Clone)]
pub enum Entry {
    /// A key and its value, together at most [`MAX_ENTRY`] bytes.
    Kv(KeyValue),
    /// An entry larger than [`MAX_ENTRY`], without its value (never decoded whole, or
    /// dropped at once).
    TooLarge(Oversized),
}

/// What is read of an entry larger than [`MAX_ENTRY`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Oversized {
    /// Its key.
    pub key: Vec<u8>,
    /// The revision of its last write.
    pub mod_revision: i64,
    /// Its size (key and value) when its value was decoded (a page small enough to
    /// read held it); `None`: over the page's limit, never decoded.
    pub size: Option<usize>,
}

impl Oversized {
    fn of(kv: KeyValue, decoded: bool) -> Oversized {
        let mod_revision = kv.mod_revision();
        let (key, value) = kv.into_key_value();
        Oversized {
            size: decoded.then_some(key.len() + value.len()),
            key,
            mod_revision,
        }
    }
}

/// Every key under a prefix at one revision, read a page at a time: each page is
/// decoded with a limit of [`PAGE`] entries of [`MAX_ENTRY`]; a page over it is read
/// again one entry at a time, and an entry that alone is over it is read as its key
/// alone ([`Entry::TooLarge`]). Whoever reads judges a page and drops it before the
/// next: what a full read holds is one page, however much an etcd writer stored.
pub struct Pages {
    kv: KvClient,
    keys: KvClient,
    prefix: String,
    end: Vec<u8>,
    /// Where the next page starts (`None`: all read).
    from: Option<Vec<u8>>,
    revision: i64,
    limit: i64,
}

impl Pages {
    /// A paged read of the keys under `prefix` (nothing is read until [`Pages::next`]).
    pub fn new(client: &Client, prefix: &str) -> Pages {
        let keys = client.kv_client().max_decoding_message_size(MAX_MESSAGE);
        Pages {
            kv: client.kv_client(),
            keys,
            prefix: prefix.to_string(),
            end: prefix_end(prefix),
            from: Some(prefix.as_bytes().to_vec()),
            revision: 0,
            limit: PAGE,
        }
    }

    /// The revision every page is read at (0 until the first page is read).
    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// The next page (`None`: every key was read); an error when etcd could not be
    /// asked (the revision read at was compacted meanwhile, etcd unreachable).
    pub async fn next(&mut self) -> Result<Option<Vec<Entry>>, String> {
        let Some(from) = self.from.clone() else {
            return Ok(None);
        };
        let limit = self.limit;
        let bound = limit as usize * (MAX_ENTRY + ENTRY_FRAMING) + PAGE_FRAMING;
        let mut kv = self.kv.clone().max_decoding_message_size(bound);
        match kv.get(from.clone(), Some(self.options(limit))).await {
            Ok(mut page) => {
                self.limit = (limit * 2).min(PAGE);
                let kvs = self.turn(&mut page);
                Ok(Some(kvs.into_iter().map(entry).collect()))
            }
            Err(e) if message_too_large(&e) && limit > 1 => {
                // one entry or more in this page is large: read it one by one
                self.limit = 1;
                Ok(Some(Vec::new()))
            }
            Err(e) if message_too_large(&e) => {
                let options = self.options(1).with_keys_only();
                let mut page = self
                    .keys
                    .get(from, Some(options))
                    .await
                    .map_err(|e| format!("reading {}: {e}", self.prefix))?;
                let kvs = self.turn(&mut page);
                Ok(Some(
                    kvs.into_iter()
                        .map(|kv| Entry::TooLarge(Oversized::of(kv, false)))
                        .collect(),
                ))
            }
            Err(e) => Err(format!("reading {}: {e}", self.prefix)),
        }
    }

    fn options(&self, limit: i64) -> GetOptions {
        GetOptions::new()
            .with_range(self.end.clone())
            .with_limit(limit)
            .with_revision(self.revision)
    }

    /// Takes a page's entries, fixing the revision at the first page's and moving
    /// past the last entry.
    fn turn(&mut self, page: &mut GetResponse) -> Vec<KeyValue> {
        if self.revision == 0 {
            self.revision = page.header().map_or(0, |h| h.revision());
        }
        let more = page.more();
        let kvs = page.take_kvs();
        self.from = match kvs.last() {
            Some(last) if more => {
                let mut from = last.key().to_vec();
                from.push(0);
                Some(from)
            }
            _ => None,
        };
        kvs
    }
}

/// An entry as read: whole, or its key alone when over [`MAX_ENTRY`].
fn entry(kv: KeyValue) -> Entry {
    if kv.key().len() + kv.value().len() <= MAX_ENTRY {
        return Entry::Kv(kv);
    }
    Entry::TooLarge(Oversized::of(kv, true))
}

/// Reads every key under `prefix` at one revision (for small prefixes jitctl reads:
/// the answers to one request, the hosts), leaving out entries over [`MAX_ENTRY`];
/// returns the revision and the keys.
pub async fn read_all(client: &Client, prefix: &str) -> Result<(i64, Vec<KeyValue>), String> {
    let mut pages = Pages::new(client, prefix);
    let mut all = Vec::new();
    while let Some(page) = pages.next().await? {
        all.extend(page.into_iter().filter_map(|e| match e {
            Entry::Kv(kv) => Some(kv),
            Entry::TooLarge(_) => None,
        }));
    }
    Ok((pages.revision(), all))
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

/// Whether a call failed because its response was larger than the decoding limit
/// (tonic refuses it from the message's length, before reading it).
fn message_too_large(e: &etcd_client::Error) -> bool {
    e.to_string().contains("message length too large")
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
