//! The knock worker: `jitd --knock-worker`, started by jitd when `[remote]` is on, with
//! the knock socket as fd [`UDP_FD`] and its end of the channel
//! ([`crate::remote::channel`]) as fd [`CHANNEL_FD`]. It enters its cell ([`sandbox`])
//! before reading anything, then does all the work on untrusted bytes that jitd used to
//! do itself: the per-prefix gate, the cheap checks ([`packet::screen`]), a bounded
//! verification queue shared fairly between prefixes, and the signature checks
//! ([`packet::verify`]) on [`VERIFIERS`] threads. jitd gets only typed verdicts, which it
//! checks again, and keeps the nonce claim, the policy, the audit and nftables.
//!
//! Threads: the receiver (this one: gate, screen, queue), the verifiers, and the
//! listener on the channel (new settings; jitd gone: exit).

pub mod sandbox;

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixDatagram;
use std::process::ExitCode;
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use chrono::{TimeDelta, Utc};
use ipnet::IpNet;

use crate::remote::channel::{self, FromWorker, SignerLine, ToWorker, VerifiedKnock, MAX_MESSAGE};
use crate::remote::gate::{prefix_of, QueueShares, SourceGate, MAX_SOURCES};
use crate::remote::nonces::{Claim, Nonces};
use crate::remote::packet::{self, Screened, MAX_PACKET};
use crate::remote::settings::MAX_WINDOW;
use crate::remote::signers::Signer;

/// The argument that starts `jitd` as the worker (its only one).
pub const ARGUMENT: &str = "--knock-worker";
/// The knock socket, as jitd hands it over.
pub const UDP_FD: i32 = 3;
/// The worker's end of the channel.
pub const CHANNEL_FD: i32 = 4;
/// Knocks screened and waiting for their signature check.
const QUEUE: usize = 64;
/// Signature checks running at once.
const VERIFIERS: usize = 2;
/// Nonces of knocks this worker verified, remembered to skip replays cheaply (jitd's
/// claim is the one that counts).
const MAX_NONCES: usize = 100_000;

/// The settings in force, as jitd last sent them.
struct Settings {
    enabled: bool,
    names: Vec<String>,
    window: TimeDelta,
    prefix6: u8,
    signers: Vec<Signer>,
}

/// What the threads share.
struct Shared {
    settings: RwLock<Arc<Settings>>,
    shares: Mutex<QueueShares>,
    nonces: Mutex<Nonces>,
    channel: UnixDatagram,
}

impl Shared {
    /// Sends a verdict; jitd gone (or not reading a well-formed message) ends the worker.
    fn tell(&self, message: &FromWorker) {
        if self.channel.send(&channel::encode(message)).is_err() {
            std::process::exit(0);
        }
    }

    fn refuse(&self, peer: SocketAddr, code: &str, reason: String) {
        self.tell(&FromWorker::Refused {
            peer,
            code: code.to_string(),
            reason,
        });
    }
}

/// One screened knock waiting for its signature check.
struct Work {
    screened: Screened,
    peer: SocketAddr,
    prefix: IpNet,
}

/// Runs the worker until jitd closes the channel. Exit status 3: the cell could not be
/// entered; 4: the channel broke before the first settings.
pub fn run() -> ExitCode {
    // a panic anywhere ends the whole worker at once (jitd restarts it)
    std::panic::set_hook(Box::new(|_| std::process::exit(101)));
    // SAFETY: jitd passes exactly these two descriptors, open and owned by nobody else
    // here; `sandbox::enter` closes every other one.
    let (udp, channel) = unsafe { (UdpSocket::from_raw_fd(UDP_FD), UnixDatagram::from_raw_fd(CHANNEL_FD)) };
    if udp.set_nonblocking(false).is_err() || sandbox::enter(CHANNEL_FD as u32).is_err() {
        return ExitCode::from(3);
    }
    let Some(first) = read_settings(&channel) else {
        return ExitCode::from(4);
    };
    let shared = Arc::new(Shared {
        settings: RwLock::new(Arc::new(first)),
        shares: Mutex::new(QueueShares::default()),
        nonces: Mutex::new(Nonces::new(MAX_NONCES)),
        channel,
    });
    shared.tell(&FromWorker::Ready);
    let (queue, inbox) = mpsc::sync_channel::<Work>(QUEUE);
    let inbox = Arc::new(Mutex::new(inbox));
    for _ in 0..VERIFIERS {
        let (shared, inbox) = (shared.clone(), inbox.clone());
        std::thread::spawn(move || verifier(&shared, &inbox));
    }
    let listener = shared.clone();
    std::thread::spawn(move || loop {
        match read_settings(&listener.channel) {
            Some(s) => *listener.settings.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(s),
            None => std::process::exit(0),
        }
    });
    receiver(&shared, &udp, &queue);
    ExitCode::SUCCESS
}

/// Reads one [`ToWorker::Settings`] and its signers; `None` when the channel closed or
/// jitd sent something else (never: it is jitd's own code).
fn read_settings(channel: &UnixDatagram) -> Option<Settings> {
    let mut buf = vec![0u8; MAX_MESSAGE + 1];
    let mut next = || -> Option<ToWorker> {
        let n = channel.recv(&mut buf).ok().filter(|n| *n > 0)?;
        channel::decode(&buf[..n]).ok()
    };
    let ToWorker::Settings {
        enabled,
        names,
        window_secs,
        prefix6,
        signers: count,
    } = next()?
    else {
        return None;
    };
    let mut signers = Vec::with_capacity(count.min(4096));
    for _ in 0..count {
        let ToWorker::Signer(line) = next()? else { return None };
        // a line jitd read but this worker cannot use is left out: it verifies nothing
        signers.extend(SignerLine::signer(line).ok());
    }
    let window = TimeDelta::seconds(i64::try_from(window_secs).unwrap_or(30));
    Some(Settings {
        enabled,
        names,
        window,
        prefix6,
        signers,
    })
}

/// Reads datagrams until the end: the gate, the cheap checks, the queue.
fn receiver(shared: &Shared, udp: &UdpSocket, queue: &SyncSender<Work>) {
    let mut gate = SourceGate::new(MAX_SOURCES, Instant::now());
    let mut buf = vec![0u8; MAX_PACKET + 1];
    loop {
        let (n, peer) = match udp.recv_from(&mut buf) {
            Ok(received) => received,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => std::process::exit(5),
        };
        let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
        let settings = shared.settings.read().unwrap_or_else(|e| e.into_inner()).clone();
        let prefix = prefix_of(peer.ip(), settings.prefix6);
        if !gate.allow(prefix, Instant::now()) {
            let why = format!("more knocks from {prefix} than the per-source limit");
            shared.refuse(peer, "rate_limited", why);
            continue;
        }
        if !settings.enabled {
            continue; // `[remote]` was removed by a reload: knocks are ignored
        }
        match packet::screen(
            &buf[..n],
            &settings.signers,
            &settings.names,
            Utc::now(),
            settings.window,
        ) {
            Err(refusal) => shared.refuse(peer, refusal.code(), refusal.to_string()),
            Ok(s)
                if shared
                    .nonces
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .seen(&s.request.nonce) =>
            {
                shared.refuse(peer, "replay", "a knock accepted before (same nonce)".into())
            }
            Ok(screened) => enqueue(shared, queue, screened, peer, prefix),
        }
    }
}

/// Queues a screened knock within its prefix's share of the queue.
fn enqueue(shared: &Shared, queue: &SyncSender<Work>, screened: Screened, peer: SocketAddr, prefix: IpNet) {
    if !shared.shares.lock().unwrap_or_else(|e| e.into_inner()).take(prefix) {
        let why = format!("{prefix} holds its share of the verification queue");
        return shared.refuse(peer, "busy", why);
    }
    let work = Work { screened, peer, prefix };
    if queue.try_send(work).is_err() {
        shared
            .shares
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .give_back(prefix);
        shared.refuse(peer, "busy", "the verification queue is full".into());
    }
}

/// Verifies queued knocks and reports each.
fn verifier(shared: &Shared, inbox: &Mutex<Receiver<Work>>) {
    loop {
        let next = inbox.lock().unwrap_or_else(|e| e.into_inner()).recv();
        let Ok(Work { screened, peer, prefix }) = next else {
            return;
        };
        let verified = packet::verify(screened, Utc::now());
        shared
            .shares
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .give_back(prefix);
        let v = match verified {
            Ok(v) => v,
            Err(refusal) => {
                shared.refuse(peer, refusal.code(), refusal.to_string());
                continue;
            }
        };
        let widest = TimeDelta::from_std(MAX_WINDOW).unwrap_or(TimeDelta::seconds(600));
        let claim = shared.nonces.lock().unwrap_or_else(|e| e.into_inner()).claim(
            v.request.nonce,
            v.request.time + widest,
            Utc::now(),
            Instant::now(),
        );
        if claim == Claim::Replay {
            shared.refuse(peer, "replay", "a knock accepted before (same nonce)".into());
            continue;
        }
        shared.tell(&FromWorker::Verified(VerifiedKnock::of(&v, peer)));
    }
}
