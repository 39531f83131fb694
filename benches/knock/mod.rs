//! Section `knock` (issue #13): remote knocks to an open port, quiet and under a
//! flood, next to fwknop in the same run.
//!
//! 1. Quiet: `jitctl knock` signing through a real ssh-agent, from spawning jitctl to
//!    the first accepted TCP connection; a knock signed beforehand, from sending the
//!    packet to the first accepted connection (jitd's share); `jitctl knock` waiting
//!    for the port itself, its wall time as a user sees it. Every knock has a fresh
//!    nonce, comes from the next of client a's addresses, and its grant is revoked
//!    after it, so each one measures a real opening.
//! 2. Flood: quiet, single-source and 256-source phases, alternating; in each, knocks
//!    as above, socket requests, and where the flood went (kernel meter, jitd's
//!    socket, jitd's counters, jitd's CPU).
//! 3. Capacity: valid knocks at rising rates, how many are granted.
//! 4. fwknop (`fwknop.rs`): the same measures for fwknopd.

pub mod client;
mod flood;
mod fwknop;
mod host;
mod report;

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::util::{in_ns, HOST_A4};
use client::{assert_locked, frame, request, revoke, sign_here, spawn_jitctl, use_source, wait_open};
use flood::{between, snapshot, Flood, FloodSpec};
use host::KnockHost;

pub use report::{print, SHAPE};

/// How much of everything: the full run and the smoke run.
pub struct KnockPlan {
    /// Quiet knocks: jitctl (--no-wait, the bench watches the port), jitctl waiting
    /// itself, signed beforehand.
    pub jitctl: usize,
    pub jitctl_waiting: usize,
    pub presigned: usize,
    /// Rounds of (quiet, single-source, many-source) phases.
    pub rounds: usize,
    /// In each phase: knocks signed beforehand, jitctl knocks, socket requests.
    pub phase_presigned: usize,
    pub phase_jitctl: usize,
    pub phase_requests: usize,
    pub garbage_pps: u64,
    pub stranger_pps: u64,
    /// How long a flood runs before a phase measures: past the kernel meter's burst
    /// (20 packets a source), so every source is held to its steady rate.
    pub settle: Duration,
    /// The shortest window the counters of a phase are read over.
    pub window: Duration,
    /// Valid knocks a second for the capacity runs, each for `ladder_secs`.
    pub ladder: Vec<u64>,
    pub ladder_secs: f64,
    /// A pause before the capacity runs: the flood's sources have spent their
    /// per-source budgets (the kernel meter's and jitd's gate's bursts refill in 2 s).
    pub refill: Duration,
    /// Whether to run fwknop beside (the full run only: CI does not install it).
    pub fwknop: bool,
}

impl KnockPlan {
    /// `scripts/bench`.
    pub fn full() -> KnockPlan {
        KnockPlan {
            jitctl: 200,
            jitctl_waiting: 50,
            presigned: 200,
            rounds: 2,
            phase_presigned: 50,
            phase_jitctl: 20,
            phase_requests: 500,
            garbage_pps: 50_000,
            stranger_pps: 5_000,
            settle: Duration::from_secs(1),
            window: Duration::from_secs(4),
            ladder: vec![100, 500, 2000],
            ladder_secs: 1.0,
            refill: Duration::from_millis(2500),
            fwknop: true,
        }
    }

    /// `cargo test`: a few of each, a light flood, no fwknop.
    pub fn smoke() -> KnockPlan {
        KnockPlan {
            jitctl: 3,
            jitctl_waiting: 1,
            presigned: 6,
            rounds: 1,
            phase_presigned: 3,
            phase_jitctl: 1,
            phase_requests: 20,
            garbage_pps: 5_000,
            stranger_pps: 500,
            settle: Duration::from_millis(200),
            window: Duration::from_millis(500),
            ladder: vec![100],
            ladder_secs: 0.5,
            refill: Duration::from_millis(500),
            fwknop: false,
        }
    }
}

/// Longest wait for one knock to open the port.
const OPEN_LIMIT: Duration = Duration::from_secs(5);

/// Times to open (or failures), and signing times where known.
#[derive(Default, Clone)]
pub struct Samples {
    pub open: Vec<Duration>,
    pub failed: usize,
    pub sign: Vec<Duration>,
    /// jitctl's own figure when it waited: send to open.
    pub after: Vec<Duration>,
}

impl Samples {
    pub fn add(&mut self, other: Samples) {
        self.open.extend(other.open);
        self.failed += other.failed;
        self.sign.extend(other.sign);
        self.after.extend(other.after);
    }

    pub fn json(&mut self) -> Value {
        let mut v = json!({"knocks": self.open.len() + self.failed, "failed": self.failed});
        for (key, times) in [
            ("", &mut self.open),
            ("sign_", &mut self.sign),
            ("after_", &mut self.after),
        ] {
            if times.is_empty() {
                continue;
            }
            times.sort();
            v[format!("{key}p50_ms")] = json!(crate::percentile(times, 0.5));
            v[format!("{key}p99_ms")] = json!(crate::percentile(times, 0.99));
            v[format!("{key}max_ms")] = json!(crate::percentile(times, 1.0));
        }
        v
    }
}

pub fn bench_knock(plan: &KnockPlan) -> Value {
    let started = Instant::now();
    let h = KnockHost::start();
    let mut v = json!({"client_sources": h.clients.len(), "flood_sources": h.flooders.len(),
        "loadavg_start": loadavg()});
    let locked = |what: &str| in_ns(&h.net.a, || assert_locked(h.clients[0], port22(), what));
    locked("before any knock");
    let jitctl = jitctl_knocks(&h, plan.jitctl, false).json();
    locked("after its grant was revoked");
    v["quiet"] = json!({
        "jitctl": jitctl,
        "jitctl_waiting": jitctl_knocks(&h, plan.jitctl_waiting, true).json(),
        "presigned": presigned_knocks(&h, plan.presigned).json(),
    });
    (v["phases"], v["flood"]) = flood_phases(&h, plan);
    v["capacity"] = capacity(&h, plan);
    v["jitd_secs"] = json!(started.elapsed().as_secs_f64());
    drop(h);
    v["fwknop"] = if plan.fwknop {
        fwknop::bench(plan)
    } else {
        json!({"skipped": "smoke run (CI does not install fwknop)"})
    };
    v["ratios"] = report::ratios(&v);
    v["secs"] = json!(started.elapsed().as_secs_f64());
    v["loadavg_end"] = loadavg();
    v
}

/// The machine's load average over 1 minute (other work on the shared cores shows in
/// the tails).
pub fn loadavg() -> Value {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    json!(text.split_whitespace().next().and_then(|l| l.parse::<f64>().ok()))
}

/// The TCP port the knocks open, on the host's address facing client a.
fn port22() -> SocketAddr {
    SocketAddr::new(HOST_A4.parse().unwrap(), 22)
}

/// `n` knocks by `jitctl knock` through the agent: from spawning jitctl to the first
/// accepted connection (`--no-wait`, the bench watches), or jitctl's own wall time
/// when it waits itself (`wait`).
fn jitctl_knocks(h: &KnockHost, n: usize, wait: bool) -> Samples {
    let socket = h.setup.socket();
    in_ns(&h.net.a, || {
        let mut s = Samples::default();
        for _ in 0..n {
            let src = h.next_client();
            use_source(src, "10.77.1.0/24", "c0");
            let start = Instant::now();
            let child = spawn_jitctl(HOST_A4, &h.agent, h.keys.path(), wait);
            let opened = if wait {
                None
            } else {
                wait_open(src, port22(), start, OPEN_LIMIT)
            };
            let report = client::jitctl_report(child);
            let ms = |key: &str| report[key].as_u64().map(Duration::from_millis);
            s.sign.extend(ms("sign_ms"));
            match (wait, opened) {
                (true, _) if report["opened"] == true => {
                    s.open.push(start.elapsed());
                    s.after.extend(ms("after_ms"));
                }
                (false, Some(t)) => s.open.push(t),
                _ => s.failed += 1,
            }
            revoke(&socket, src);
        }
        s
    })
}

/// `n` knocks signed through the agent beforehand (in batches, well inside the time
/// window): from sending the packet to the first accepted connection.
fn presigned_knocks(h: &KnockHost, n: usize) -> Samples {
    let socket = h.setup.socket();
    let mut all = Samples::default();
    for batch in (0..n).collect::<Vec<_>>().chunks(25) {
        let mut sign = Vec::new();
        let packets: Vec<(IpAddr, Vec<u8>)> = batch
            .iter()
            .map(|_| {
                let text = request(None);
                let (armoured, took) = h.agent.sign(&h.alice, &text);
                sign.push(took);
                (h.next_client(), frame(&text, &armoured))
            })
            .collect();
        let mut s = in_ns(&h.net.a, || {
            let mut s = Samples::default();
            for (src, packet) in &packets {
                let udp = UdpSocket::bind(SocketAddr::new(*src, 0)).unwrap();
                let start = Instant::now();
                udp.send_to(packet, h.knock_target()).unwrap();
                match wait_open(*src, port22(), start, OPEN_LIMIT) {
                    Some(t) => s.open.push(t),
                    None => s.failed += 1,
                }
                revoke(&socket, *src);
            }
            s
        });
        s.sign = sign;
        all.add(s);
    }
    all
}

/// Which flood a phase runs.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Quiet,
    Single,
    Many,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Quiet => "quiet",
            Kind::Single => "single",
            Kind::Many => "many",
        }
    }
}

/// One phase's figures, its samples kept to pool the rounds.
struct PhaseRun {
    kind: Kind,
    presigned: Samples,
    jitctl: Samples,
    requests: Vec<Duration>,
    json: Value,
}

/// Rounds of quiet, single-source and many-source phases: each phase, and the rounds
/// pooled by flood.
fn flood_phases(h: &KnockHost, plan: &KnockPlan) -> (Value, Value) {
    let mut runs = Vec::new();
    for round in 0..plan.rounds {
        for kind in [Kind::Quiet, Kind::Single, Kind::Many] {
            let mut run = phase(h, plan, kind, runs.len());
            run.json["round"] = json!(round);
            runs.push(run);
        }
    }
    let mut by = json!({});
    for kind in [Kind::Quiet, Kind::Single, Kind::Many] {
        by[kind.name()] = pool(&runs, kind);
    }
    (Value::Array(runs.into_iter().map(|r| r.json).collect()), by)
}

/// The phases of one kind pooled: latencies over all their samples, counters averaged.
fn pool(runs: &[PhaseRun], kind: Kind) -> Value {
    let mine: Vec<&PhaseRun> = runs.iter().filter(|r| r.kind == kind).collect();
    let (mut presigned, mut jitctl, mut requests) = (Samples::default(), Samples::default(), Vec::new());
    for r in &mine {
        presigned.add(r.presigned.clone());
        jitctl.add(r.jitctl.clone());
        requests.extend(&r.requests);
    }
    let mean = |ptr: &str| {
        let v: Vec<f64> = mine.iter().filter_map(|r| r.json.pointer(ptr)?.as_f64()).collect();
        if v.is_empty() {
            0.0
        } else {
            v.iter().sum::<f64>() / v.len() as f64
        }
    };
    json!({"phases": mine.len(), "presigned": presigned.json(), "jitctl": jitctl.json(),
        "requests": crate::summary(&mut requests),
        "garbage_pps": mean("/sent/garbage_pps"), "stranger_pps": mean("/sent/stranger_pps"),
        "kernel_dropped_per_s": mean("/per_s/kernel_meter_dropped"), "udp_delivered_per_s": mean("/per_s/udp_delivered"),
        "jitd_received_per_s": mean("/per_s/jitd_received"), "unknown_key_per_s": mean("/per_s/unknown_key"),
        "rcvbuf_errors": mean("/counters/udp_rcvbuf_errors"),
        "jitd_cpu_pct": mean("/counters/daemon_cpu_pct"), "bench_cpu_pct": mean("/counters/bench_cpu_pct")})
}

/// One phase: the flood (if any) starts, settles, knocks and socket requests are
/// timed, the flood stops; the counters are read around it.
fn phase(h: &KnockHost, plan: &KnockPlan, kind: Kind, index: usize) -> PhaseRun {
    // well-formed, for this host, in the time window: it fails only at the key
    let stranger = request(None);
    let spec = FloodSpec {
        garbage_pps: plan.garbage_pps,
        stranger_pps: plan.stranger_pps,
        stranger: frame(&stranger, &sign_here(&h.mallory.private(), &stranger)),
        threads: 2,
    };
    let sources: Vec<IpAddr> = match kind {
        Kind::Quiet => Vec::new(),
        Kind::Single => vec![crate::util::B4.parse().unwrap()],
        Kind::Many => h.flooders.clone(),
    };
    let flood = (!sources.is_empty()).then(|| Flood::start(&h.net.b, &sources, h.flood_target(), &spec));
    // past the kernel meter's burst: each source is at its steady rate
    std::thread::sleep(plan.settle);
    let before = snapshot(&h.net.host, h.jitd.pid());
    let (knocks_before, _) = h.metrics();
    let mut presigned = presigned_knocks(h, plan.phase_presigned);
    let mut jitctl = jitctl_knocks(h, plan.phase_jitctl, false);
    let first = 1_000_000 + index * plan.phase_requests;
    let (requests, _) = crate::load(&h.setup.socket(), first, plan.phase_requests, 1, 3600);
    // counters over a window long enough to read CPU time in ticks of 10 ms
    std::thread::sleep(plan.window.saturating_sub(before.at.unwrap().elapsed()));
    let after = snapshot(&h.net.host, h.jitd.pid());
    let (knocks_after, _) = h.metrics();
    let sent = flood.map(Flood::stop);
    let counted: serde_json::Map<String, Value> = knocks_after
        .iter()
        .map(|(k, n)| (k.clone(), json!(n - knocks_before.get(k).copied().unwrap_or(0))))
        .filter(|(_, n)| n != &json!(0))
        .collect();
    let received: u64 = counted.values().filter_map(Value::as_u64).sum();
    let counters = between(&before, &after);
    let secs = counters["secs"].as_f64().unwrap();
    let per_s = |n: u64| n as f64 / secs;
    let mut json = json!({"flood": kind.name(), "presigned": presigned.json(), "jitctl": jitctl.json(),
        "requests": crate::summary(&mut requests.clone()), "jitd_counted": counted, "jitd_received": received,
        "per_s": {"kernel_meter_dropped": per_s(counters["kernel_meter_dropped"].as_u64().unwrap()),
            "udp_delivered": per_s(counters["udp_delivered"].as_u64().unwrap()), "jitd_received": per_s(received),
            "unknown_key": per_s(counted.get("unknown_key").and_then(Value::as_u64).unwrap_or(0))},
        "counters": counters});
    if let Some(sent) = sent {
        json["sent"] = sent.json(&spec, sources.len());
    }
    PhaseRun {
        kind,
        presigned,
        jitctl,
        requests,
        json,
    }
}

/// Valid knocks (another key of alice's, each naming its own source) at each rate of
/// the ladder for `ladder_secs`, from the 256 flood addresses: how many jitd granted,
/// and how long after the first one it had granted them all.
fn capacity(h: &KnockHost, plan: &KnockPlan) -> Value {
    std::thread::sleep(plan.refill);
    let key = h.bulk.private();
    let mut next = 0u32;
    let rows = plan.ladder.iter().map(|&rate| {
        let n = (rate as f64 * plan.ladder_secs) as usize;
        let packets: Vec<Vec<u8>> = (0..n)
            .map(|_| {
                next += 1;
                let src = std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(10, 200, 0, 0)) + next);
                let text = request(Some(IpAddr::V4(src)));
                frame(&text, &sign_here(&key, &text))
            })
            .collect();
        let (knocks_before, approved_before) = h.metrics();
        let start = Instant::now();
        let sent_secs = send_paced(h, &packets, rate);
        let deadline = start + Duration::from_secs_f64(plan.ladder_secs) + Duration::from_secs(3);
        let (mut granted, mut all_at) = (0, None);
        while Instant::now() < deadline && all_at.is_none() {
            std::thread::sleep(Duration::from_millis(20));
            granted = h.metrics().1 - approved_before;
            all_at = (granted >= n as u64).then(|| start.elapsed().as_secs_f64());
        }
        let (knocks_after, _) = h.metrics();
        let busy = knocks_after.get("busy").copied().unwrap_or(0) - knocks_before.get("busy").copied().unwrap_or(0);
        let limited = knocks_after.get("rate_limited").copied().unwrap_or(0)
            - knocks_before.get("rate_limited").copied().unwrap_or(0);
        let lag = all_at.map(|t| t - sent_secs);
        json!({"rate": rate, "sent": n, "send_secs": sent_secs, "granted": granted, "all_granted_after_s": all_at,
            "all_granted_after_last_sent_s": lag,
            "busy": busy, "rate_limited": limited})
    });
    Value::Array(rows.collect())
}

/// Sends `packets` at `rate` a second, round the flood addresses; seconds it took.
fn send_paced(h: &KnockHost, packets: &[Vec<u8>], rate: u64) -> f64 {
    let sockets: Vec<UdpSocket> = in_ns(&h.net.b, || {
        h.flooders
            .iter()
            .map(|ip| UdpSocket::bind(SocketAddr::new(*ip, 0)).unwrap())
            .collect()
    });
    let start = Instant::now();
    for (i, p) in packets.iter().enumerate() {
        let at = start + Duration::from_secs_f64(i as f64 / rate as f64);
        std::thread::sleep(at.saturating_duration_since(Instant::now()));
        let _ = sockets[i % sockets.len()].send_to(p, h.flood_target());
    }
    start.elapsed().as_secs_f64()
}

impl KnockHost {
    /// The next of client a's addresses, round robin.
    fn next_client(&self) -> IpAddr {
        self.clients[self.cursor.fetch_add(1, Ordering::Relaxed) % self.clients.len()]
    }
}
