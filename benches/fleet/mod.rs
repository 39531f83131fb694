//! Section `fleet` (issue #15): one request in etcd opens a port on many real jitd
//! hosts, and a revoke closes it, on one machine.
//!
//! Each fleet size is its own stage ([`stage`]: a real etcd with TLS client
//! certificates, that many jitd hosts each in its own namespace, a client namespace);
//! all stages live at once and their rounds alternate, so load from elsewhere on the
//! machine falls on every size alike and the sizes' ratio comes from one run.
//!
//! 1. Request → open: from spawning `jitctl fleet request --hosts group:bench` (signing
//!    through a real ssh-agent) to each host's port accepting a new TCP connection from
//!    the client ([`probe`]); per host, and until the last host. jitctl itself waits
//!    for every host's answer: its wall time too.
//! 2. Revoke → closed: from spawning `jitctl fleet revoke ID` to each host's port no
//!    longer accepting new connections.
//! 3. Memory: every jitd's and etcd's RSS with the fleet joined and idle, and with
//!    `live` requests open on every host; etcd's before any host joined; etcd's db size.

mod probe;
mod report;
mod stage;

use std::net::SocketAddr;
use std::process::Output;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::fleet_net::CLIENT_IP;
use crate::util::{in_ns, text};
use probe::Want;
use stage::Stage;

pub use report::{check, print};

/// How much of everything: the full run and the smoke run.
pub struct FleetPlan {
    /// Fleet sizes (hosts), each its own etcd; the largest last.
    pub sizes: Vec<usize>,
    /// Timed request-and-revoke rounds per size.
    pub requests: usize,
    /// Requests left open at once on every host for the memory figures.
    pub live: usize,
    /// Longest wait for a fleet to open or close.
    pub limit: Duration,
    /// How long the joined fleets idle before their memory is read.
    pub settle: Duration,
}

impl FleetPlan {
    /// `scripts/bench`: 10 and 50 hosts, 60 rounds each.
    pub fn full() -> FleetPlan {
        FleetPlan {
            sizes: vec![10, 50],
            requests: 60,
            live: 20,
            limit: Duration::from_secs(30),
            settle: Duration::from_secs(4),
        }
    }

    /// With `JITD_BENCH_FLEET_SIZES=10,50,100` and `JITD_BENCH_FLEET_REQUESTS=30` from
    /// the environment, when given.
    pub fn with_env(mut self) -> FleetPlan {
        let numbers = |name: &str| {
            std::env::var(name).ok().map(|v| {
                v.split(',')
                    .map(|n| {
                        n.trim()
                            .parse()
                            .unwrap_or_else(|_| panic!("{name}: comma-separated numbers"))
                    })
                    .collect::<Vec<usize>>()
            })
        };
        if let Some(sizes) = numbers("JITD_BENCH_FLEET_SIZES") {
            assert!(
                sizes.iter().all(|&n| (1..=80).contains(&n)),
                "JITD_BENCH_FLEET_SIZES: 1 to 80 hosts (10.88.0.11-90)"
            );
            self.sizes = sizes;
        }
        if let Some(&[n]) = numbers("JITD_BENCH_FLEET_REQUESTS").as_deref() {
            self.requests = n.max(1);
        }
        self
    }

    /// `cargo test`: 3 hosts, 2 rounds.
    pub fn smoke() -> FleetPlan {
        FleetPlan {
            sizes: vec![3],
            requests: 2,
            live: 2,
            limit: Duration::from_secs(30),
            settle: Duration::from_millis(500),
        }
    }
}

/// One timed request and its revoke on one fleet.
struct Round {
    /// Per host: spawn to open.
    open: Vec<Duration>,
    /// jitctl request: spawn to exit (every host's answer read).
    answered: Duration,
    /// Per host: revoke spawned to closed.
    closed: Vec<Duration>,
    /// jitctl revoke: spawn to exit.
    revoked: Duration,
}

pub fn bench_fleet(plan: &FleetPlan) -> Value {
    let started = Instant::now();
    raise_open_files();
    let loadavg_start = crate::knock::loadavg();
    let stages: Vec<Stage> = plan.sizes.iter().map(|&n| Stage::start(n)).collect();
    // the joined fleets idle a moment (a lease renewal or two) before memory is read
    let quiet = Cpu::now(&stages);
    std::thread::sleep(plan.settle);
    let idle_cpu = Cpu::now(&stages).idle(&quiet);
    let idle: Vec<Value> = stages.iter().map(memory).collect();
    for s in &stages {
        assert_locked(s);
    }
    let mut rounds: Vec<Vec<Round>> = stages.iter().map(|_| Vec::new()).collect();
    let before = Cpu::now(&stages);
    for _ in 0..plan.requests {
        for (s, r) in stages.iter().zip(&mut rounds) {
            r.push(round(s, plan.limit));
        }
    }
    let cpu = Cpu::now(&stages).since(&before, plan.requests);
    let rows: Vec<Value> = stages
        .iter()
        .zip(&rounds)
        .zip(idle)
        .zip(cpu.per_stage.iter().zip(idle_cpu))
        .map(|(((s, r), idle), (cpu, idle_cpu))| {
            let mut row = row(s, r, idle, plan.live);
            row["cpu"] = cpu.clone();
            row["cpu"]["idle"] = idle_cpu;
            row["warnings"] = warnings(s);
            row
        })
        .collect();
    drop(stages);
    let mut v = json!({"sizes": rows, "probe_every_ms": probe::EVERY.as_secs_f64() * 1000.0,
        "rounds_cpu": cpu.bench,
        "etcd_version": etcd_version(), "loadavg_start": loadavg_start,
        "jitd_mb_without_fleet": jitd_without_fleet()});
    v["ratios"] = report::ratios(&v);
    v["secs"] = json!(started.elapsed().as_secs_f64());
    v["loadavg_end"] = crate::knock::loadavg();
    v
}

/// One size's figures: latencies over its rounds, join time, memory idle and live.
fn row(s: &Stage, rounds: &[Round], idle: Value, live: usize) -> Value {
    let all = |f: fn(&Round) -> &Vec<Duration>| rounds.iter().flat_map(f).copied().collect::<Vec<_>>();
    let last = |f: fn(&Round) -> &Vec<Duration>| rounds.iter().filter_map(|r| f(r).iter().max().copied()).collect();
    let n = s.jitds.len();
    let mut v = json!({
        "hosts": n, "requests": rounds.len(), "join_s": s.join_s,
        "open": stats(all(|r| &r.open)), "all_open": stats(last(|r| &r.open)),
        "first_open": stats(rounds.iter().filter_map(|r| r.open.iter().min().copied()).collect()),
        "answered": stats(rounds.iter().map(|r| r.answered).collect()),
        "closed": stats(all(|r| &r.closed)), "all_closed": stats(last(|r| &r.closed)),
        "revoked": stats(rounds.iter().map(|r| r.revoked).collect()),
    });
    let after_rounds = memory(s);
    let live_mem = live_memory(s, live);
    let mb = |m: &Value, k: &str| m[k].as_f64().unwrap_or(f64::NAN);
    let empty = s.etcd_rss_empty_mb;
    v["memory"] = json!({
        "etcd_empty_mb": empty,
        "idle": idle,
        "after_rounds": after_rounds,
        "live": live_mem,
        "etcd_mb_per_host_joined": (mb(&idle, "etcd_mb") - empty) / n as f64,
        "etcd_mb_per_host_live": (mb(&live_mem, "etcd_mb") - empty) / n as f64,
    });
    v
}

/// CPU time used so far (ticks of 10 ms): each stage's jitds and etcd, the bench
/// process itself (the probes) and the children it waited for (jitctl, ssh-keygen,
/// curl, ip).
struct Cpu {
    at: Instant,
    hosts: Vec<usize>,
    stages: Vec<(u64, u64)>,
    bench: u64,
    children: u64,
}

/// The figures of a run between two [`Cpu`] readings.
struct CpuFigures {
    per_stage: Vec<Value>,
    bench: Value,
}

impl Cpu {
    fn now(stages: &[Stage]) -> Cpu {
        let stages_hosts = stages.iter().map(|s| s.jitds.len()).collect();
        let stages = stages
            .iter()
            .map(|s| {
                let jitd = s.jitds.iter().map(|j| cpu_ticks(j.pid()).0).sum();
                (jitd, cpu_ticks(s.etcd.pid().unwrap() as i32).0)
            })
            .collect();
        let (bench, children) = cpu_ticks(std::process::id() as i32);
        Cpu {
            at: Instant::now(),
            hosts: stages_hosts,
            stages,
            bench,
            children,
        }
    }

    /// Per stage: jitd's CPU ms per host and etcd's per round; the bench's share.
    fn since(&self, before: &Cpu, rounds: usize) -> CpuFigures {
        let ms = |ticks: u64| ticks as f64 * 10.0;
        let per_stage = self
            .stages
            .iter()
            .zip(&before.stages)
            .map(|(&(j, e), &(j0, e0))| json!({"jitd_ms_total_per_round": ms(j - j0) / rounds as f64, "etcd_ms_per_round": ms(e - e0) / rounds as f64}))
            .collect();
        let secs = self.at.duration_since(before.at).as_secs_f64();
        let pct = |ticks: u64| ms(ticks) / 10.0 / secs;
        let bench = json!({"secs": secs, "probes_pct": pct(self.bench - before.bench),
            "jitctl_and_helpers_pct": pct(self.children - before.children)});
        CpuFigures { per_stage, bench }
    }
}

impl Cpu {
    /// Per stage, CPU while idle: % of a core for each jitd (mean) and for etcd.
    fn idle(&self, before: &Cpu) -> Vec<Value> {
        let secs = self.at.duration_since(before.at).as_secs_f64();
        self.stages
            .iter()
            .zip(&before.stages)
            .zip(&self.hosts)
            .map(|((&(j, e), &(j0, e0)), &n)| {
                json!({"jitd_pct_per_host": (j - j0) as f64 / secs / n as f64, "etcd_pct": (e - e0) as f64 / secs})
            })
            .collect()
    }
}

/// user + system ticks of `pid`, and of the children it has waited for.
fn cpu_ticks(pid: i32) -> (u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime, stime, cutime, cstime are fields 14 to 17; `rest` starts at field 3
    let n = |i: usize| f.get(i - 3).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    (n(14) + n(15), n(16) + n(17))
}

/// How many warnings and errors the stage's jitds logged, and the first few kinds.
fn warnings(s: &Stage) -> Value {
    let mut count = 0;
    let mut kinds: Vec<String> = Vec::new();
    for j in &s.jitds {
        for line in j
            .log_text()
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        {
            count += 1;
            // without the timestamp, so that the same warning on many hosts is one kind
            let kind = line
                .split_once("WARN")
                .or(line.split_once("ERROR"))
                .map_or(line, |(_, k)| k);
            let kind: String = kind.trim().chars().take(200).collect();
            if kinds.len() < 5 && !kinds.contains(&kind) {
                kinds.push(kind);
            }
        }
    }
    json!({"count": count, "kinds": kinds})
}

/// Count, p50, p90, p99, max in ms.
fn stats(mut times: Vec<Duration>) -> Value {
    times.sort();
    json!({"samples": times.len(), "p50_ms": crate::percentile(&times, 0.5),
        "p90_ms": crate::percentile(&times, 0.9), "p99_ms": crate::percentile(&times, 0.99), "max_ms": crate::percentile(&times, 1.0)})
}

/// Many hosts at once need a socket each for several overlapping attempts.
fn raise_open_files() {
    let mut limit = nix::libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct given
    unsafe {
        if nix::libc::getrlimit(nix::libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max.min(65536);
            nix::libc::setrlimit(nix::libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// Panics unless every host's port refuses the client before any request.
fn assert_locked(s: &Stage) {
    let targets = s.targets();
    let closed = in_ns(&s.net.client, || {
        probe::watch(&targets, Instant::now(), Want::Closed, Duration::from_secs(5))
    });
    for (i, c) in closed.iter().enumerate() {
        assert!(c.is_some(), "h{} is open before any request", i + 1);
    }
}

/// Spawns jitctl with `args` and watches every host for `want` from that instant;
/// what the watch saw, jitctl's output and its wall time.
fn timed(
    s: &Stage,
    args: &[&str],
    targets: &[SocketAddr],
    want: Want,
    limit: Duration,
) -> (Vec<Option<Duration>>, Output, Duration) {
    in_ns(&s.net.client, || {
        let start = Instant::now();
        let child = s.spawn_ctl(args);
        let waiter = std::thread::spawn(move || {
            let out = child.wait_with_output();
            (out, Instant::now())
        });
        let seen = probe::watch(targets, start, want, limit);
        let (out, exited) = waiter.join().unwrap();
        (seen, out.expect("wait for jitctl"), exited - start)
    })
}

/// One request for the whole fleet from the client's address, timed to open on every
/// host, then its revoke, timed to closed on every host.
fn round(s: &Stage, limit: Duration) -> Round {
    let targets = s.targets();
    let (open, out, answered) = timed(s, &stage::request_args(CLIENT_IP), &targets, Want::Open, limit);
    let reply = stage::report(&out, "request");
    assert_all_approved(&reply, s.jitds.len(), &out);
    let open = every(open, "opened", s);
    let id = reply["id"].as_str().expect("the request's id").to_string();
    let (closed, out, revoked) = timed(s, &["revoke", &id], &targets, Want::Closed, limit);
    stage::report(&out, "revoke");
    let closed = every(closed, "closed", s);
    Round {
        open,
        answered,
        closed,
        revoked,
    }
}

/// Every host's time, or a panic naming the hosts that did not.
fn every(seen: Vec<Option<Duration>>, what: &str, s: &Stage) -> Vec<Duration> {
    let missing: Vec<String> = seen
        .iter()
        .enumerate()
        .filter(|(_, t)| t.is_none())
        .map(|(i, _)| format!("h{}", i + 1))
        .collect();
    assert!(missing.is_empty(), "not {what}: {missing:?}\n{}", s.logs());
    seen.into_iter().flatten().collect()
}

fn assert_all_approved(reply: &Value, n: usize, out: &Output) {
    let hosts = reply["hosts"].as_array().map_or(&[][..], Vec::as_slice);
    let approved = hosts.iter().filter(|h| h["outcome"] == "approved").count();
    assert_eq!(approved, n, "every host approves: {}", text(out));
}

/// RSS of every jitd (mean, max) and etcd's RSS, heap and db size, now.
fn memory(s: &Stage) -> Value {
    let jitd = s.jitd_rss_mb();
    let mean = jitd.iter().sum::<f64>() / jitd.len() as f64;
    let max = jitd.iter().copied().fold(0.0, f64::max);
    let body = s.etcd.metrics();
    let m = metrics(&body);
    json!({"jitd_mb_mean": mean, "jitd_mb_max": max, "etcd_mb": s.etcd_rss_mb(),
        "etcd_heap_inuse_mb": m("go_memstats_heap_inuse_bytes") / 1e6,
        "etcd_db_bytes": m("etcd_mvcc_db_total_size_in_bytes"),
        "etcd_db_in_use_bytes": m("etcd_mvcc_db_total_size_in_use_in_bytes"),
        "etcd_keys": m("etcd_debugging_mvcc_keys_total")})
}

/// `live` requests for every host (distinct sources 10.88.1.x), all left open; then
/// memory as [`memory`] reads it.
fn live_memory(s: &Stage, live: usize) -> Value {
    for k in 0..live {
        let source = format!("10.88.1.{}", k + 1);
        let out = s.ctl(&stage::request_args(&source));
        let reply = stage::report(&out, "request");
        assert_all_approved(&reply, s.jitds.len(), &out);
    }
    std::thread::sleep(Duration::from_secs(1));
    let mut v = memory(s);
    v["requests"] = json!(live);
    v
}

/// A reader of Prometheus text: the value of an unlabelled metric (NaN if absent).
fn metrics(body: &str) -> impl Fn(&str) -> f64 + '_ {
    move |name: &str| {
        body.lines()
            .filter_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .find_map(|v| v.trim().parse().ok())
            .unwrap_or(f64::NAN)
    }
}

/// The RSS (MB) of an idle jitd with the same ports and access but no `[fleet]`: what
/// joining a fleet adds to a jitd.
fn jitd_without_fleet() -> f64 {
    let net = crate::util::Net::new();
    let setup = crate::util::Setup::new(stage::LOCAL_POLICY);
    let jitd = setup.start_with(&net.host, &[("JITD_LOG", "info")]);
    std::thread::sleep(Duration::from_millis(500));
    crate::rss_mb(jitd.pid())
}

fn etcd_version() -> String {
    std::process::Command::new("etcd")
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}
