//! The flood: garbage datagrams and well-formed knocks signed by an unknown key, sent
//! at a set rate from one or many source addresses by threads of this process; and
//! the counters that show where it went (the kernel meter, the host's UDP counters,
//! a daemon's own counters, its CPU time).

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::util::in_ns;

/// What a flood sends: its packets and rates.
#[derive(Clone)]
pub struct FloodSpec {
    /// Garbage datagrams a second.
    pub garbage_pps: u64,
    /// Datagrams a second of `stranger`.
    pub stranger_pps: u64,
    /// A well-formed packet that fails only at the key (re-sent as it is).
    pub stranger: Vec<u8>,
    /// Sending threads (each takes its share of the rates and of the sources).
    pub threads: usize,
}

/// A flood running until [`Flood::stop`].
pub struct Flood {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<(u64, u64, u64)>>,
    start: Instant,
}

/// What a flood sent.
pub struct Sent {
    pub garbage: u64,
    pub stranger: u64,
    /// Sends the kernel refused (buffer full).
    pub errors: u64,
    pub secs: f64,
}

impl Sent {
    /// As JSON, with the achieved rates.
    pub fn json(&self, spec: &FloodSpec, sources: usize) -> Value {
        json!({"sources": sources, "garbage_sent": self.garbage, "stranger_sent": self.stranger, "send_errors": self.errors,
            "secs": self.secs, "garbage_pps": self.garbage as f64 / self.secs, "stranger_pps": self.stranger as f64 / self.secs,
            "garbage_pps_target": spec.garbage_pps, "stranger_pps_target": spec.stranger_pps})
    }
}

/// Datagrams that are not knocks: random bytes of many sizes, a quarter of them
/// starting with the knock magic (so they fail one step later).
fn garbage_pool() -> Vec<Vec<u8>> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (0..64)
        .map(|i| {
            let len = 16 + (next() % 1300) as usize;
            let mut p: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if i % 4 == 0 {
                p[..8].copy_from_slice(jitd::remote::packet::MAGIC);
            }
            p
        })
        .collect()
}

impl Flood {
    /// Starts flooding `target` from `sources` (addresses of namespace `ns`).
    pub fn start(ns: &str, sources: &[IpAddr], target: SocketAddr, spec: &FloodSpec) -> Flood {
        let sockets: Vec<UdpSocket> = in_ns(ns, || {
            sources
                .iter()
                .map(|ip| UdpSocket::bind(SocketAddr::new(*ip, 0)).expect("bind a flood source"))
                .collect()
        });
        let stop = Arc::new(AtomicBool::new(false));
        let threads = spec.threads.max(1);
        let mut shares: Vec<Vec<UdpSocket>> = (0..threads).map(|_| Vec::new()).collect();
        for (i, s) in sockets.iter().enumerate() {
            shares[i % threads].push(s.try_clone().unwrap());
        }
        // fewer sources than threads: the threads share them
        for share in shares.iter_mut().skip(sockets.len()) {
            *share = sockets.iter().map(|s| s.try_clone().unwrap()).collect();
        }
        let start = Instant::now();
        let handles = shares
            .into_iter()
            .filter(|share| !share.is_empty())
            .map(|share| {
                let (stop, spec) = (stop.clone(), spec.clone());
                let rates = (spec.garbage_pps / threads as u64, spec.stranger_pps / threads as u64);
                std::thread::spawn(move || send_loop(&share, target, rates, &spec.stranger, &stop))
            })
            .collect();
        Flood {
            stop,
            threads: handles,
            start,
        }
    }

    /// Stops it; what it sent.
    pub fn stop(self) -> Sent {
        self.stop.store(true, Ordering::SeqCst);
        let secs = self.start.elapsed().as_secs_f64();
        let mut sent = Sent {
            garbage: 0,
            stranger: 0,
            errors: 0,
            secs,
        };
        for h in self.threads {
            let (g, s, e) = h.join().unwrap();
            sent.garbage += g;
            sent.stranger += s;
            sent.errors += e;
        }
        sent
    }
}

/// Sends at `rates` (garbage, stranger per second) round the sockets until `stop`.
/// Pacing by the clock: what is due is sent at once; a sender that falls more than
/// 10 ms behind drops the backlog (the achieved rate is reported, not the target).
fn send_loop(
    sockets: &[UdpSocket],
    to: SocketAddr,
    rates: (u64, u64),
    stranger: &[u8],
    stop: &AtomicBool,
) -> (u64, u64, u64) {
    let pool = garbage_pool();
    let start = Instant::now();
    let (mut due_g, mut due_s) = (0f64, 0f64);
    let (mut g, mut s, mut errors) = (0u64, 0u64, 0u64);
    let mut last = start;
    let mut i = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        let dt = now.duration_since(last).as_secs_f64().min(0.010);
        last = now;
        due_g += dt * rates.0 as f64;
        due_s += dt * rates.1 as f64;
        while due_g >= 1.0 || due_s >= 1.0 {
            let (packet, stranger_turn) = if due_s >= 1.0 && (due_g < 1.0 || i % 11 == 0) {
                (stranger, true)
            } else {
                (pool[i % pool.len()].as_slice(), false)
            };
            let ok = sockets[i % sockets.len()].send_to(packet, to).is_ok();
            i += 1;
            errors += u64::from(!ok);
            if stranger_turn {
                due_s -= 1.0;
                s += u64::from(ok);
            } else {
                due_g -= 1.0;
                g += u64::from(ok);
            }
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    (g, s, errors)
}

/// Counters read at one moment, to be subtracted.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Packets the kernel meter dropped (jitd's `meter knock4` rule), if there is one.
    pub meter_drops: u64,
    /// The host namespace's UDP `InDatagrams` and `RcvbufErrors`.
    pub udp_in: u64,
    pub udp_rcvbuf_errors: u64,
    /// The daemon's CPU time (user + system), in clock ticks.
    pub cpu_ticks: u64,
    /// This process's CPU time (the flood threads and the client), in clock ticks.
    pub own_cpu_ticks: u64,
    pub at: Option<Instant>,
}

/// The host namespace's UDP counters: `InDatagrams`, `RcvbufErrors`.
pub fn udp_counters(ns: &str) -> (u64, u64) {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", ns, "cat", "/proc/net/snmp"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let udp: Vec<Vec<&str>> = text
        .lines()
        .filter(|l| l.starts_with("Udp:"))
        .map(|l| l.split_whitespace().collect())
        .collect();
    let field = |name: &str| {
        let i = udp[0].iter().position(|h| *h == name).unwrap();
        udp[1][i].parse::<u64>().unwrap()
    };
    (field("InDatagrams"), field("RcvbufErrors"))
}

/// The unit of CPU times in `/proc/PID/stat` (`USER_HZ`, 100 on Linux).
const USER_HZ: f64 = 100.0;

/// user + system CPU ticks of `pid` (all its threads) and of the children it has
/// waited for (fwknopd runs iptables for every rule).
pub fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // the fields after the command name (which is in parentheses)
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime, stime, cutime, cstime are fields 14 to 17; `rest` starts at field 3
    let n = |i: usize| f.get(i - 3).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    n(14) + n(15) + n(16) + n(17)
}

/// The drop counter of jitd's IPv4 knock meter rule in namespace `ns` (0 without it).
pub fn meter_drops(ns: &str) -> u64 {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", ns, "nft", "list", "chain", "inet", "jitd", "input"])
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&out.stdout);
    listing
        .lines()
        .find(|l| l.contains("meter knock4"))
        .and_then(|l| l.split("counter packets ").nth(1))
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Reads every counter for the daemon `pid` in namespace `ns`.
pub fn snapshot(ns: &str, pid: i32) -> Snapshot {
    let (udp_in, udp_rcvbuf_errors) = udp_counters(ns);
    Snapshot {
        meter_drops: meter_drops(ns),
        udp_in,
        udp_rcvbuf_errors,
        cpu_ticks: cpu_ticks(pid),
        own_cpu_ticks: cpu_ticks(std::process::id() as i32),
        at: Some(Instant::now()),
    }
}

/// What happened between two snapshots: counts, and CPU as percent of one core.
pub fn between(a: &Snapshot, b: &Snapshot) -> Value {
    let secs = b.at.unwrap().duration_since(a.at.unwrap()).as_secs_f64();
    let cpu = (b.cpu_ticks - a.cpu_ticks) as f64 / USER_HZ;
    let own = (b.own_cpu_ticks - a.own_cpu_ticks) as f64 / USER_HZ;
    json!({"secs": secs, "kernel_meter_dropped": b.meter_drops - a.meter_drops,
        "udp_delivered": b.udp_in - a.udp_in, "udp_rcvbuf_errors": b.udp_rcvbuf_errors - a.udp_rcvbuf_errors,
        "daemon_cpu_s": cpu, "daemon_cpu_pct": 100.0 * cpu / secs,
        "bench_cpu_pct": 100.0 * own / secs})
}
