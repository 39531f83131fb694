//! Remote knocks: the UDP listener, the verification pool and the nonce memory. A knock
//! that passes becomes a request like one from the socket, from a signed caller, and
//! takes the same policy checks, audit and nftables path ([`super::requests`]).
//!
//! The listener does the cheap work for each datagram, in order: the per-prefix gate
//! ([`SourceGate`], by [`prefix_of`] the source), [`packet::screen`] (size, framing,
//! grammar, time window, host, a known key) and the nonce memory. What passes goes into
//! a bounded queue, of which one prefix holds at most
//! [`QUEUE_SHARE`](crate::remote::gate::QUEUE_SHARE) places
//! ([`QueueShares`]); a full queue or share drops the knock (counted and audited like
//! any refusal), so a flood can neither grow memory nor delay the socket or expiry,
//! which never wait on this path, nor crowd out other prefixes' knocks. A small pool
//! verifies signatures on blocking threads, claims the nonce and hands the request to
//! the committer. Nothing is ever sent back. The checks ([`crate::remote`]) are pure,
//! apart from these effects, so they could run in another process.
//!
//! Refusals are audited as `knock` records within a budget a flood cannot outgrow:
//! those of unauthenticated senders per source prefix (the first few per minute in
//! full, and at most [`UNSIGNED_FULL`] in full a minute from all prefixes together; the
//! rest counted in one summary per prefix, for at most [`UNSIGNED_PREFIXES`] prefixes
//! and one for the others), those of a verified key per key; written at most once a
//! second.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Utc};
use ipnet::IpNet;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, Semaphore};

use super::upkeep::Stopping;
use super::{Daemon, TaskResult};
use crate::api::protocol::GrantRequest;
use crate::audit::limit::{Admit, Limits, RefusalLimiter, Refuser, Subject};
use crate::audit::{Action, AuditRecord, Outcome};
use crate::domain::{format_prefix, Caller, SignedBy};
use crate::firewall::Firewall;
use crate::remote::gate::{prefix_of, QueueShares, SourceGate, DEFAULT_PREFIX6, MAX_SOURCES};
use crate::remote::nonces::{self, Claim, Nonces};
use crate::remote::packet::{self, Screened, MAX_PACKET};
use crate::remote::request::Length;
use crate::remote::settings::{Remote, MAX_WINDOW};

/// Knocks screened and waiting for their signature check.
const QUEUE: usize = 64;
/// Signature checks running at once.
const VERIFIERS: usize = 2;
/// Verified knocks waiting for the committer at once.
const IN_FLIGHT: usize = 64;
/// Live nonces remembered at most (verified knocks within their window).
const MAX_NONCES: usize = 100_000;
/// How often the listener re-reads the policy and the host's addresses, and writes the
/// refusals it audited.
const TICK: Duration = Duration::from_secs(1);
/// Datagrams read in one go before yielding.
const DRAIN: usize = 256;
/// The longest reason a knock refusal records (it may quote the packet, escaped).
const MAX_REASON: usize = 200;
/// Refusals of unauthenticated senders recorded in full per interval, all prefixes
/// together.
pub(super) const UNSIGNED_FULL: u32 = 20;
/// Prefixes whose unauthenticated refusals are summarised one by one per interval.
pub(super) const UNSIGNED_PREFIXES: usize = 32;
/// Refusals of one unauthenticated prefix, or one key, recorded in full per interval.
const FULL_PER_SENDER: u32 = 5;
/// Keys whose refusals are counted one by one.
const MAX_KEYS: usize = 256;

/// What the knock path shares with the rest of the daemon.
pub(super) struct Knocks {
    nonces: Mutex<Nonces>,
    log: Mutex<RefusalLog>,
    /// Each prefix's places in the verification queue.
    shares: Mutex<QueueShares>,
    /// The IPv6 prefix length in force (`remote.ipv6_prefix`).
    prefix6: AtomicU8,
}

/// Knock refusals waiting to be written, and the limiters deciding which are written
/// in full: unauthenticated senders by prefix, verified keys by key.
struct RefusalLog {
    unsigned: RefusalLimiter<IpNet>,
    signed: RefusalLimiter<KnockKey>,
    pending: Vec<AuditRecord>,
}

/// The key a refused knock was verified with, as a refusal budget.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct KnockKey(Refuser);

impl Subject for KnockKey {
    const ACTION: Action = Action::Knock;
    fn uid(&self) -> Option<u32> {
        None
    }
    fn describe(&self, name: &str) -> String {
        format!("knocks {}", self.0.describe(name))
    }
    fn others() -> &'static str {
        "knocks of further keys (too many to track one by one)"
    }
}

impl Knocks {
    /// The knock path's memory, with the nonces of knocks recorded before the start
    /// (`(nonce, time of its record)`, from the checkpoint and the journal).
    pub fn new(recorded: &std::collections::BTreeMap<String, DateTime<Utc>>, refusal_interval: TimeDelta) -> Knocks {
        let mut memory = Nonces::new(MAX_NONCES);
        let (now, mono) = (Utc::now(), Instant::now());
        for (hex, at) in recorded {
            if let Some(nonce) = nonces::from_hex(hex) {
                memory.claim(nonce, *at + crate::store::NONCE_MEMORY, now, mono);
            }
        }
        let unsigned = Limits {
            interval: refusal_interval,
            full_per_interval: FULL_PER_SENDER,
            max_uids: UNSIGNED_PREFIXES,
            max_full_total: UNSIGNED_FULL,
        };
        let signed = Limits {
            interval: refusal_interval,
            full_per_interval: FULL_PER_SENDER,
            max_uids: MAX_KEYS,
            max_full_total: u32::MAX,
        };
        Knocks {
            nonces: Mutex::new(memory),
            log: Mutex::new(RefusalLog {
                unsigned: RefusalLimiter::new(unsigned),
                signed: RefusalLimiter::new(signed),
                pending: Vec::new(),
            }),
            shares: Mutex::new(QueueShares::default()),
            prefix6: AtomicU8::new(DEFAULT_PREFIX6),
        }
    }

    /// Takes the settings of the `[remote]` policy in force.
    fn adopt(&self, view: Option<&View>) {
        let prefix6 = view.map_or(DEFAULT_PREFIX6, |v| v.remote.prefix6);
        self.prefix6.store(prefix6, Ordering::Relaxed);
    }

    /// The prefix knocks from `ip` are counted in.
    fn prefix(&self, ip: IpAddr) -> IpNet {
        prefix_of(ip, self.prefix6.load(Ordering::Relaxed))
    }

    /// Audits a refused knock (in full or only counted) and counts it in the metrics.
    fn refuse(&self, peer: SocketAddr, code: &str, reason: &str, signer: Option<(&[String], &str)>) {
        crate::metrics::metrics().knock(code);
        let now = Utc::now();
        let prefix = self.prefix(peer.ip());
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        let admit = match signer {
            None => log.unsigned.admit(prefix, "knock", code, now),
            Some((principals, key)) => {
                let name = format!("principal:{}", principals.first().map_or("-", String::as_str));
                log.signed
                    .admit(KnockKey(Refuser::Key(key.to_string())), &name, code, now)
            }
        };
        if admit == Admit::Count {
            return;
        }
        tracing::debug!(%peer, code, "knock refused: {reason}");
        let actor = signer
            .and_then(|(p, _)| p.first())
            .map_or_else(|| "-".to_string(), |p| format!("principal:{p}"));
        let mut r = AuditRecord::new(now, None, &actor, Action::Knock, Outcome::Denied);
        r.reason = Some(format!("{code}: {}", crate::text::escape_capped(reason, MAX_REASON)));
        r.source = Some(peer.ip().to_string());
        r.peer = Some(peer.to_string());
        if let Some((principals, key)) = signer {
            r.principals = principals.to_vec();
            r.key = Some(key.to_string());
        }
        log.pending.push(r);
    }

    /// The refusal records to write now: those waiting and the summaries due at `now`.
    fn due(&self, now: DateTime<Utc>) -> Vec<AuditRecord> {
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        let mut records = std::mem::take(&mut log.pending);
        records.extend(log.unsigned.due_summaries(now));
        records.extend(log.signed.due_summaries(now));
        records
    }

    /// Records [`Knocks::due`] gave that could not be handed on yet, first in line again.
    fn put_back(&self, mut records: Vec<AuditRecord>) {
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        records.append(&mut log.pending);
        log.pending = records;
    }

    /// Every refusal record still waiting, summaries included (at the stop).
    pub fn flush(&self, now: DateTime<Utc>) -> Vec<AuditRecord> {
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        let mut records = std::mem::take(&mut log.pending);
        records.extend(log.unsigned.flush(now));
        records.extend(log.signed.flush(now));
        records
    }

    /// Gives back the queue place of a knock from `prefix` whose check is over.
    fn checked(&self, prefix: IpNet) {
        self.shares.lock().unwrap_or_else(|e| e.into_inner()).give_back(prefix);
    }
}

/// Binds the knock socket (an error stops the start) with a receive buffer for bursts.
pub(super) fn bind(listen: SocketAddr) -> std::io::Result<UdpSocket> {
    let socket = std::net::UdpSocket::bind(listen)?;
    let _ = nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::RcvBuf, &(4 << 20));
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket)
}

/// One screened knock waiting for its signature check.
struct Work {
    screened: Screened,
    peer: SocketAddr,
    /// Its source prefix, holding a place in [`QueueShares`] until the check is over.
    prefix: IpNet,
    remote: Arc<Remote>,
}

/// What the listener knows between ticks: the `[remote]` policy and this host's names.
struct View {
    remote: Arc<Remote>,
    names: Vec<String>,
}

/// Serves the knock socket until the stop: screens each datagram and queues the good
/// ones for the verification pool.
pub(super) async fn serve<F: Firewall>(daemon: Arc<Daemon<F>>, socket: UdpSocket, mut stop: Stopping) -> TaskResult {
    let (queue, inbox) = mpsc::channel::<Work>(QUEUE);
    let pool = tokio::spawn(verify_pool(daemon.clone(), inbox));
    let mut gate = SourceGate::new(MAX_SOURCES, std::time::Instant::now());
    let mut view = view_of(&daemon).await;
    daemon.knocks.adopt(view.as_ref());
    let mut tick = tokio::time::interval(TICK);
    let mut buf = vec![0u8; MAX_PACKET + 1];
    loop {
        let ticked = tokio::select! {
            received = socket.recv_from(&mut buf) => {
                let (n, peer) = received.map_err(|e| format!("receiving knocks: {e}"))?;
                receive(&daemon, &mut gate, view.as_ref(), &queue, &buf[..n], peer);
                // drain what else is waiting before going back to the scheduler
                for _ in 0..DRAIN {
                    let Ok((n, peer)) = socket.try_recv_from(&mut buf) else { break };
                    receive(&daemon, &mut gate, view.as_ref(), &queue, &buf[..n], peer);
                }
                false
            }
            _ = tick.tick() => true,
            _ = stop.changed() => break,
        };
        if *stop.borrow() {
            break;
        }
        if ticked {
            view = view_of(&daemon).await;
            daemon.knocks.adopt(view.as_ref());
            let records = daemon.knocks.due(Utc::now());
            if !records.is_empty() {
                // never wait on a busy committer here: the records wait for the next tick
                match daemon.jobs.try_send(super::Job::Record(records)) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(super::Job::Record(records))) => {
                        daemon.knocks.put_back(records)
                    }
                    Err(_) => break, // the committer has stopped
                }
            }
        }
    }
    pool.abort();
    Ok(())
}

/// One datagram: the per-source gate, the cheap checks, then the queue.
fn receive<F: Firewall>(
    daemon: &Daemon<F>,
    gate: &mut SourceGate,
    view: Option<&View>,
    queue: &mpsc::Sender<Work>,
    packet: &[u8],
    peer: SocketAddr,
) {
    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
    let prefix = daemon.knocks.prefix(peer.ip());
    if !gate.allow(prefix, Instant::now()) {
        let why = format!("more knocks from {prefix} than the per-source limit");
        return daemon.knocks.refuse(peer, "rate_limited", &why, None);
    }
    let Some(work) = screen(daemon, view, packet, peer, prefix) else {
        return;
    };
    if !daemon
        .knocks
        .shares
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take(prefix)
    {
        let why = format!("{prefix} holds its share of the verification queue");
        return daemon.knocks.refuse(peer, "busy", &why, None);
    }
    if queue.try_send(work).is_err() {
        daemon.knocks.checked(prefix);
        daemon
            .knocks
            .refuse(peer, "busy", "the verification queue is full", None);
    }
}

/// The cheap checks of one datagram; `Some` when it deserves a signature check.
fn screen<F: Firewall>(
    daemon: &Daemon<F>,
    view: Option<&View>,
    packet: &[u8],
    peer: SocketAddr,
    prefix: IpNet,
) -> Option<Work> {
    let view = view?; // `[remote]` was removed by a reload: knocks are ignored
    let remote = &view.remote;
    let window = TimeDelta::from_std(remote.window).unwrap_or(TimeDelta::seconds(30));
    match packet::screen(packet, &remote.signers, &view.names, Utc::now(), window) {
        Err(refusal) => {
            daemon.knocks.refuse(peer, refusal.code(), &refusal.to_string(), None);
            None
        }
        Ok(s)
            if daemon
                .knocks
                .nonces
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .seen(&s.request.nonce) =>
        {
            daemon
                .knocks
                .refuse(peer, "replay", "a knock accepted before (same nonce)", None);
            None
        }
        Ok(screened) => Some(Work {
            screened,
            peer,
            prefix,
            remote: remote.clone(),
        }),
    }
}

/// The `[remote]` policy now and the names a knock may give this host: the configured
/// ones, its hostname and its addresses.
async fn view_of<F: Firewall>(daemon: &Daemon<F>) -> Option<View> {
    let remote = daemon.lock().config.remote.clone()?;
    let mut names = remote.names.clone();
    if let Ok(host) = nix::unistd::gethostname() {
        names.extend(host.to_str().map(str::to_ascii_lowercase));
    }
    match crate::netif::local_addresses().await {
        Ok(addrs) => names.extend(addrs.iter().map(IpAddr::to_string)),
        Err(e) => tracing::warn!("knocks: cannot list this host's addresses: {e}"),
    }
    Some(View {
        remote: Arc::new(remote),
        names,
    })
}

/// Verifies queued knocks, at most [`VERIFIERS`] at once, and submits the good ones.
async fn verify_pool<F: Firewall>(daemon: Arc<Daemon<F>>, mut inbox: mpsc::Receiver<Work>) {
    let verifiers = Arc::new(Semaphore::new(VERIFIERS));
    let in_flight = Arc::new(Semaphore::new(IN_FLIGHT));
    while let Some(work) = inbox.recv().await {
        let Ok(permit) = verifiers.clone().acquire_owned().await else {
            return;
        };
        let daemon = daemon.clone();
        let in_flight = in_flight.clone();
        tokio::spawn(async move {
            let Work {
                screened,
                peer,
                prefix,
                remote,
            } = work;
            let verified = tokio::task::spawn_blocking(move || packet::verify(screened, Utc::now())).await;
            drop(permit);
            daemon.knocks.checked(prefix);
            let verified = match verified {
                Ok(Ok(v)) => v,
                Ok(Err(refusal)) => return daemon.knocks.refuse(peer, refusal.code(), &refusal.to_string(), None),
                Err(e) => return tracing::error!("knocks: a signature check failed: {e}"),
            };
            // a knock that cannot be served now is dropped rather than queued without end
            let Ok(_slot) = in_flight.try_acquire() else {
                return daemon
                    .knocks
                    .refuse(peer, "busy", "too many knocks waiting for the committer", None);
            };
            submit(&daemon, verified, peer, &remote).await;
        });
    }
}

/// Claims a verified knock's nonce and hands its request to the committer.
async fn submit<F: Firewall>(daemon: &Daemon<F>, v: packet::Verified, peer: SocketAddr, remote: &Remote) {
    let signer = (v.principals.as_slice(), v.fingerprint.as_str());
    if remote.require_source && v.request.source.is_none() {
        let why = "this host requires the knock to name its source (remote.require_source)";
        return daemon.knocks.refuse(peer, "source_required", why, Some(signer));
    }
    // kept for the widest window any policy could set, not the one in force: a reload
    // that widens it must not make the packet acceptable again
    let widest = TimeDelta::from_std(MAX_WINDOW).unwrap_or(TimeDelta::seconds(600));
    let claim = daemon.knocks.nonces.lock().unwrap_or_else(|e| e.into_inner()).claim(
        v.request.nonce,
        v.request.time + widest,
        Utc::now(),
        Instant::now(),
    );
    match claim {
        Claim::Fresh => {}
        Claim::Replay => {
            return daemon
                .knocks
                .refuse(peer, "replay", "a knock accepted before (same nonce)", Some(signer))
        }
        Claim::Full => {
            return daemon
                .knocks
                .refuse(peer, "busy", "too many knocks within the time window", Some(signer))
        }
    }
    let source = v.request.source.unwrap_or_else(|| IpNet::from(peer.ip()));
    let (duration_secs, until) = match v.request.length {
        Length::Duration(secs) => (Some(secs), None),
        Length::Until(t) => (None, Some(t)),
    };
    let request = GrantRequest {
        ports: v.request.ports.clone(),
        source: format_prefix(&source),
        duration_secs,
        until,
        justification: v.request.justification.clone(),
    };
    let caller = Caller::signed(SignedBy {
        principals: v.principals,
        fingerprint: v.fingerprint,
        peer: Some(peer),
        nonce: Some(nonces::hex(&v.request.nonce)),
        certificate: v.certificate.map(|c| c.describe()),
        fleet: None,
    });
    crate::metrics::metrics().knock("accepted");
    let name = caller.name.clone();
    let reply = daemon.request(caller, request).await;
    let waits = reply
        .result
        .as_ref()
        .and_then(|r| r.get("pending"))
        .and_then(|p| p.get("id"));
    match &reply.error {
        None if waits.is_some() => {
            tracing::info!(%peer, principal = %name, request = %waits.expect("checked"), "knock waits for approval")
        }
        None => tracing::info!(%peer, principal = %name, "knock approved"),
        Some(e) => tracing::info!(%peer, principal = %name, code = %e.code, "knock refused: {}", e.message),
    }
}
