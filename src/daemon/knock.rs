//! Remote knocks, jitd's side: the knock door. jitd binds the UDP socket but never
//! reads it: a knock worker ([`crate::knockd`], `jitd --knock-worker`, started and
//! supervised by [`worker`]), with no privileges and a seccomp filter, reads every
//! datagram, applies the per-prefix gate, screens and verifies it, and sends back only
//! typed verdicts over a `SOCK_SEQPACKET` channel ([`crate::remote::channel`]). This
//! door checks each verdict again ([`channel::accept`]: the request's grammar, host,
//! time, and that the signer and its principals are ones `allowed_signers` allows; only
//! the signature is taken on the worker's word), claims the nonce, and hands the
//! request to the committer like one from the socket, from a signed caller: the same
//! policy checks, audit and nftables path ([`super::requests`]). A worker that dies is
//! restarted with back-off; one that sends what no honest worker sends is killed and
//! restarted; both are audited. Meanwhile knocks wait in the socket's buffer: nothing
//! opens without a verified signature. Nothing is ever sent back.
//!
//! Refusals are audited as `knock` records within a budget a flood cannot outgrow:
//! those of unauthenticated senders per source prefix (the first few per minute in
//! full, and at most [`UNSIGNED_FULL`] in full a minute from all prefixes together; the
//! rest counted in one summary per prefix, for at most [`UNSIGNED_PREFIXES`] prefixes
//! and one for the others), those of a verified key per key; written at most once a
//! second.

mod worker;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Utc};
use ipnet::IpNet;
use tokio::sync::{mpsc, Semaphore};

use self::worker::{Heard, Worker};

use super::upkeep::Stopping;
use super::{Daemon, TaskResult};
use crate::api::protocol::GrantRequest;
use crate::audit::limit::{Admit, Limits, RefusalLimiter, Refuser, Subject};
use crate::audit::{Action, AuditRecord, Outcome};
use crate::domain::{format_prefix, Caller, SignedBy};
use crate::firewall::Firewall;
use crate::remote::channel::{self, FromWorker, Rejection};
use crate::remote::gate::{prefix_of, DEFAULT_PREFIX6};
use crate::remote::nonces::{self, Claim, Nonces};
use crate::remote::packet;
use crate::remote::request::Length;
use crate::remote::settings::{Remote, MAX_WINDOW};

/// Verified knocks waiting for the committer at once.
const IN_FLIGHT: usize = 64;
/// Live nonces remembered at most (verified knocks within their window).
const MAX_NONCES: usize = 100_000;
/// How often the door re-reads the policy and the host's addresses, and writes the
/// refusals it audited.
const TICK: Duration = Duration::from_secs(1);
/// The first wait before restarting a lost worker; it doubles up to [`RESTART_MAX`].
const RESTART_MIN: Duration = Duration::from_millis(100);
/// The longest wait before restarting a lost worker.
const RESTART_MAX: Duration = Duration::from_secs(5);
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

    /// Audits a lost knock worker (its restarts are spaced by back-off, so these
    /// records are few).
    fn note_worker(&self, why: &str) {
        let mut r = AuditRecord::new(Utc::now(), None, "-", Action::Knock, Outcome::Failed);
        r.reason = Some(crate::text::escape_capped(why, MAX_REASON));
        self.log.lock().unwrap_or_else(|e| e.into_inner()).pending.push(r);
    }
}

/// Binds the knock socket (an error stops the start) with a receive buffer for bursts.
/// jitd never reads it: its knock worker does.
pub(super) fn bind(listen: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let socket = std::net::UdpSocket::bind(listen)?;
    let _ = nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::RcvBuf, &(4 << 20));
    Ok(socket)
}

/// What the door knows between ticks: the `[remote]` policy and this host's names.
#[derive(Clone)]
struct View {
    remote: Arc<Remote>,
    names: Vec<String>,
}

impl View {
    /// Whether the worker needs `other`'s settings (the signers by their digest).
    fn differs(this: Option<&View>, other: Option<&View>) -> bool {
        match (this, other) {
            (Some(a), Some(b)) => {
                a.names != b.names
                    || a.remote.signers_digest != b.remote.signers_digest
                    || a.remote.window != b.remote.window
                    || a.remote.prefix6 != b.remote.prefix6
            }
            (a, b) => a.is_some() != b.is_some(),
        }
    }
}

/// How a worker's run ended.
enum Ended {
    /// jitd stops.
    Stop,
    /// The worker died or broke the protocol; why.
    Lost(String),
}

/// Serves the knock door until the stop: keeps a knock worker running on `socket`
/// (restarted with back-off when it dies or misbehaves), sends it the settings in
/// force, and takes its verdicts: refusals into the audit budget, verified knocks, once
/// checked again here, to the committer.
pub(super) async fn serve<F: Firewall>(
    daemon: Arc<Daemon<F>>,
    socket: std::net::UdpSocket,
    mut stop: Stopping,
) -> TaskResult {
    let in_flight = Arc::new(Semaphore::new(IN_FLIGHT));
    let mut backoff = RESTART_MIN;
    loop {
        let started = Instant::now();
        let ended = match Worker::spawn(&socket) {
            Ok(worker) => run_worker(&daemon, worker, &in_flight, &mut stop).await,
            Err(e) => Ended::Lost(format!("knock worker: cannot start it: {e}")),
        };
        let Ended::Lost(why) = ended else { break };
        if started.elapsed() > RESTART_MAX * 4 {
            backoff = RESTART_MIN; // it had been running well: not a crash loop
        }
        tracing::error!("{why}; knocks wait until it is restarted in {backoff:?}");
        daemon
            .knocks
            .note_worker(&format!("{why}; restarted in {}s", backoff.as_secs_f32()));
        flush_records(&daemon);
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => {}
        }
        if *stop.borrow() {
            break;
        }
        backoff = (backoff * 2).min(RESTART_MAX);
    }
    Ok(())
}

/// Runs one worker until it ends or jitd stops.
async fn run_worker<F: Firewall>(
    daemon: &Arc<Daemon<F>>,
    mut worker: Worker,
    in_flight: &Arc<Semaphore>,
    stop: &mut Stopping,
) -> Ended {
    let pid = worker.pid().unwrap_or(0);
    let mut view = view_of(daemon).await;
    daemon.knocks.adopt(view.as_ref());
    if let Err(e) = worker
        .send_settings(view.as_ref().map(|v| &*v.remote), names(view.as_ref()))
        .await
    {
        return Ended::Lost(format!("knock worker {pid}: {e} (ended: {})", worker.end().await));
    }
    let mut ready = false;
    let mut tick = tokio::time::interval(TICK);
    loop {
        let heard = tokio::select! {
            heard = worker.hear() => heard,
            _ = tick.tick() => {
                let now = view_of(daemon).await;
                if View::differs(view.as_ref(), now.as_ref()) {
                    let sent = worker.send_settings(now.as_ref().map(|v| &*v.remote), names(now.as_ref())).await;
                    if let Err(e) = sent {
                        return Ended::Lost(format!("knock worker {pid}: {e} (ended: {})", worker.end().await));
                    }
                }
                view = now;
                daemon.knocks.adopt(view.as_ref());
                flush_records(daemon);
                continue;
            }
            _ = stop.changed() => {
                if *stop.borrow() {
                    worker.end().await;
                    return Ended::Stop;
                }
                continue;
            }
        };
        let message = match heard {
            Heard::Message(m) => m,
            Heard::Gone => return Ended::Lost(format!("knock worker {pid} ended: {}", worker.ended().await)),
            Heard::Garbage(why) => {
                let how = worker.end().await;
                return Ended::Lost(format!("knock worker {pid} sent garbage ({why}), killed: {how}"));
            }
        };
        match (message, ready) {
            (FromWorker::Ready, false) => {
                ready = true;
                tracing::info!("knock worker {pid} runs unprivileged and confined; taking knocks");
            }
            (FromWorker::Refused { peer, code, reason }, true) => match channel::refusal_code(&code, &reason) {
                Ok(code) => daemon.knocks.refuse(canonical(peer), code, &reason, None),
                Err(why) => {
                    let how = worker.end().await;
                    return Ended::Lost(format!("knock worker {pid} broke the protocol ({why}), killed: {how}"));
                }
            },
            (FromWorker::Verified(knock), true) => {
                let Some(v) = view.as_ref() else { continue };
                let peer = canonical(knock.peer);
                let window = TimeDelta::from_std(v.remote.window).unwrap_or(TimeDelta::seconds(30));
                match channel::accept(knock, &v.remote.signers, &v.names, Utc::now(), window) {
                    Ok(verified) => admit(daemon, verified, peer, &v.remote, in_flight),
                    Err(Rejection::Refused(r)) => daemon.knocks.refuse(peer, r.code(), &r.to_string(), None),
                    Err(Rejection::Broken(why)) => {
                        let how = worker.end().await;
                        return Ended::Lost(format!("knock worker {pid} broke the protocol ({why}), killed: {how}"));
                    }
                }
            }
            (_, _) => {
                let how = worker.end().await;
                return Ended::Lost(format!(
                    "knock worker {pid} broke the protocol (out of order), killed: {how}"
                ));
            }
        }
    }
}

fn canonical(peer: SocketAddr) -> SocketAddr {
    SocketAddr::new(peer.ip().to_canonical(), peer.port())
}

fn names(view: Option<&View>) -> &[String] {
    view.map_or(&[][..], |v| v.names.as_slice())
}

/// Hands the refusal records due to the committer, never waiting on it (what it cannot
/// take now waits for the next tick).
fn flush_records<F: Firewall>(daemon: &Daemon<F>) {
    let records = daemon.knocks.due(Utc::now());
    if records.is_empty() {
        return;
    }
    if let Err(mpsc::error::TrySendError::Full(super::Job::Record(records))) =
        daemon.jobs.try_send(super::Job::Record(records))
    {
        daemon.knocks.put_back(records)
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

/// Submits a verified knock, unless [`IN_FLIGHT`] already wait for the committer.
fn admit<F: Firewall>(
    daemon: &Arc<Daemon<F>>,
    verified: packet::Verified,
    peer: SocketAddr,
    remote: &Arc<Remote>,
    in_flight: &Arc<Semaphore>,
) {
    // a knock that cannot be served now is dropped rather than queued without end
    let Ok(slot) = in_flight.clone().try_acquire_owned() else {
        return daemon
            .knocks
            .refuse(peer, "busy", "too many knocks waiting for the committer", None);
    };
    let (daemon, remote) = (daemon.clone(), remote.clone());
    tokio::spawn(async move {
        submit(&daemon, verified, peer, &remote).await;
        drop(slot);
    });
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
