//! jitd's benchmark: what a grant costs, how far jitd scales, what the lockdown costs
//! the packet path compared with no firewall and with a one-rule-per-grant chain, how
//! soon an expired grant refuses new connections, what a busy nftables neighbour costs
//! requests, and how long repair, status and restart take with many live grants.
//!
//! `scripts/bench` (cargo bench) runs it in full; under `cargo test` it runs a small
//! smoke version (N = 1,000, a few hundred requests) and checks its own JSON.
//! Needs root: it builds network namespaces and runs the real jitd, like the tests.

#[path = "../tests/integration/util.rs"]
mod util;

#[path = "../tests/integration/fleet_net.rs"]
mod fleet_net;

mod fleet;
mod knock;

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use util::*;

struct Plan {
    smoke: bool,
    sequential: usize,
    clients: usize,
    per_client: usize,
    scale: Vec<usize>,
    packet_grants: Vec<usize>,
    connections: usize,
    expiry_secs: Vec<u64>,
    /// Live grants for the quiet-vs-neighbour runs; the largest also gets the
    /// repair, status and restart figures.
    neighbour_n: Vec<usize>,
    /// Quiet and neighbour blocks alternate this many times each.
    blocks: usize,
    /// Sequential requests per block.
    per_block: usize,
    /// Remote knocks (section 7).
    knock: knock::KnockPlan,
    /// The fleet through etcd (section 8).
    fleet: fleet::FleetPlan,
    out: PathBuf,
}

fn plan() -> Plan {
    let full = std::env::args().any(|a| a == "--bench");
    // JITD_BENCH_NEIGHBOUR_N=20000 runs the neighbour section at other sizes
    let neighbour_n = std::env::var("JITD_BENCH_NEIGHBOUR_N").ok().map(|v| {
        v.split(',')
            .map(|n| {
                n.trim()
                    .parse()
                    .expect("JITD_BENCH_NEIGHBOUR_N: comma-separated numbers")
            })
            .collect::<Vec<usize>>()
    });
    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    if full {
        Plan {
            smoke: false,
            sequential: 1000,
            clients: 16,
            per_client: 250,
            scale: vec![1_000, 10_000, 100_000],
            packet_grants: vec![0, 1_000, 100_000],
            connections: 3000,
            expiry_secs: vec![1, 2, 3, 4, 5],
            neighbour_n: neighbour_n.unwrap_or(vec![20_000, 100_000]),
            blocks: 5,
            per_block: 400,
            knock: knock::KnockPlan::full(),
            fleet: fleet::FleetPlan::full().with_env(),
            out: target.join("results.json"),
        }
    } else {
        Plan {
            smoke: true,
            sequential: 200,
            clients: 16,
            per_client: 10,
            scale: vec![1_000],
            packet_grants: vec![0, 1_000],
            connections: 200,
            expiry_secs: vec![1],
            neighbour_n: neighbour_n.unwrap_or(vec![1_000]),
            blocks: 2,
            per_block: 40,
            knock: knock::KnockPlan::smoke(),
            fleet: fleet::FleetPlan::smoke().with_env(),
            out: target.join("smoke.json"),
        }
    }
}

fn main() {
    let plan = plan();
    // JITD_BENCH_ONLY=scale,expiry runs some sections only (while working on one figure).
    let only = std::env::var("JITD_BENCH_ONLY").ok();
    let wanted = |section: &str| only.as_deref().is_none_or(|o| o.split(',').any(|s| s == section));
    if only.is_some() {
        let mut results = json!({ "smoke": plan.smoke, "machine": machine() });
        for (name, run) in [
            ("request", bench_requests as fn(&Plan) -> Value),
            ("scale", bench_scale),
            ("packet_path", bench_packet_path),
            ("expiry", bench_expiry),
            ("neighbour", bench_neighbour),
            ("knock", |plan| knock::bench_knock(&plan.knock)),
            ("fleet", |plan| fleet::bench_fleet(&plan.fleet)),
        ] {
            if wanted(name) {
                results[name] = run(&plan);
            }
        }
        println!("{}", serde_json::to_string_pretty(&results).unwrap());
        if wanted("neighbour") {
            print_neighbour(&results["neighbour"]);
            check_neighbour(&results["neighbour"]);
        }
        if wanted("knock") {
            knock::print(&results["knock"]);
            check_knock(&results["knock"]);
        }
        if wanted("fleet") {
            fleet::print(&results["fleet"]);
        }
        merge_into(&plan.out, &results);
        if wanted("fleet") {
            fleet::check(&results["fleet"]);
        }
        return;
    }
    let mut results = json!({ "smoke": plan.smoke, "machine": machine() });
    results["request"] = bench_requests(&plan);
    results["scale"] = bench_scale(&plan);
    results["packet_path"] = bench_packet_path(&plan);
    results["expiry"] = bench_expiry(&plan);
    results["neighbour"] = bench_neighbour(&plan);
    results["knock"] = knock::bench_knock(&plan.knock);
    results["fleet"] = fleet::bench_fleet(&plan.fleet);
    print_table(&results);
    std::fs::create_dir_all(plan.out.parent().unwrap()).unwrap();
    std::fs::write(&plan.out, serde_json::to_vec_pretty(&results).unwrap()).unwrap();
    check_shape(&std::fs::read(&plan.out).unwrap());
    println!("\nwritten to {}", plan.out.display());
    check_neighbour(&results["neighbour"]);
}

/// Writes the sections of a partial run (JITD_BENCH_ONLY) into the results file,
/// keeping the other sections of an earlier run that are there.
fn merge_into(out: &Path, partial: &Value) {
    let mut all = std::fs::read(out)
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .filter(Value::is_object)
        .unwrap_or_else(|| json!({}));
    for (name, section) in partial.as_object().into_iter().flatten() {
        all[name] = section.clone();
    }
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    std::fs::write(out, serde_json::to_vec_pretty(&all).unwrap()).unwrap();
    println!(
        "\nwritten to {} (the sections run; the others as they were)",
        out.display()
    );
}

/// The JSON must parse back and hold every figure (what the smoke run asserts).
fn check_shape(bytes: &[u8]) {
    let v: Value = serde_json::from_slice(bytes).expect("results are JSON");
    for path in [
        "/request/sequential/p50_ms",
        "/request/sequential/p99_ms",
        "/request/sequential/max_ms",
        "/request/concurrent/grants_per_s",
        "/request/concurrent/p99_ms",
        "/scale/0/install_s",
        "/scale/0/rss_mb",
        "/scale/0/status_json_s",
        "/scale/0/restart_s",
        "/packet_path/0/p50_us",
        "/packet_path/0/ratio_p50",
        "/expiry/mean_ms",
        "/expiry/max_ms",
        "/neighbour/0/n",
        "/neighbour/0/quiet/p50_ms",
        "/neighbour/0/quiet/p99_ms",
        "/neighbour/0/neighbour/p50_ms",
        "/neighbour/0/neighbour/p99_ms",
        "/neighbour/0/neighbour/commits_per_s",
        "/neighbour/0/ratio_p50",
        "/neighbour/0/ratio_p99",
        "/neighbour/0/repairs_during_run",
        "/neighbour/0/kernel_reads_for_neighbour",
    ] {
        assert!(
            v.pointer(path).is_some_and(Value::is_number),
            "results lack the number {path}"
        );
    }
    // the largest N (the last row) has the repair, status and restart figures
    let last = v["neighbour"].as_array().map_or(0, Vec::len).saturating_sub(1);
    for key in [
        "repair_element_s",
        "request_max_ms_during_repair",
        "repair_rule_s",
        "status_json_s",
        "status_rss_mb_peak",
        "stop_s",
        "restart_ready_s",
        "restart_answers_s",
    ] {
        let path = format!("/neighbour/{last}/large/{key}");
        assert!(
            v.pointer(&path).is_some_and(Value::is_number),
            "results lack the number {path}"
        );
    }
    assert!(
        v.pointer("/neighbour/0/neighbour_table_untouched")
            .is_some_and(Value::is_boolean),
        "results lack neighbour_table_untouched"
    );
    check_knock(&v["knock"]);
    fleet::check(&v["fleet"]);
}

/// The knock section holds every figure (its timings are printed, never asserted).
fn check_knock(v: &Value) {
    for path in knock::SHAPE {
        assert!(
            v.pointer(path).is_some_and(Value::is_number),
            "results lack the number /knock{path}"
        );
    }
}

/// What the neighbour runs must show whatever the timings: the neighbour's table is
/// as it was, jitd filed no repair and read the kernel for none of its commits.
/// Checked after the results are written, so a failing run still leaves its figures.
fn check_neighbour(rows: &Value) {
    for row in rows.as_array().expect("neighbour rows") {
        let n = &row["n"];
        assert_eq!(
            row["neighbour_table_untouched"], true,
            "N = {n}: the neighbour's table changed"
        );
        assert_eq!(
            row["repairs_during_run"], 0,
            "N = {n}: jitd filed a repair during the neighbour run"
        );
        assert_eq!(
            row["kernel_reads_for_neighbour"], 0,
            "N = {n}: jitd read the kernel for the neighbour's commits"
        );
    }
}

fn machine() -> Value {
    let text = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    let mem_kb: u64 = text("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let nft = Command::new("nft")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    json!({
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "memory_gib": (mem_kb as f64 / 1024.0 / 1024.0 * 10.0).round() / 10.0,
        "kernel": text("/proc/sys/kernel/osrelease").trim(),
        "nft": nft.unwrap_or_default(),
    })
}

const POLICY: &str = "[[ports]]\nport = 22\nmax_duration = \"24h\"\n";

/// The `i`-th distinct source: IPv4 for even, IPv6 for odd numbers.
fn source(i: usize) -> String {
    if i % 2 == 0 {
        let n = i / 2;
        format!("10.{}.{}.{}", 100 + n / 65536, (n / 256) % 256, n % 256)
    } else {
        format!("fd00:be::{:x}:{:x}", i / 65536, i % 65536)
    }
}

/// One request over a fresh connection; returns the time from writing it to the reply.
fn timed_request(socket: &Path, source: &str, secs: u64) -> Duration {
    let mut stream = UnixStream::connect(socket).expect("connect to jitd");
    let line =
        format!("{{\"v\":1,\"op\":\"request\",\"ports\":[22],\"source\":\"{source}\",\"duration_secs\":{secs}}}\n");
    let start = Instant::now();
    stream.write_all(line.as_bytes()).unwrap();
    let mut reply = String::new();
    BufReader::new(&stream).read_line(&mut reply).unwrap();
    let elapsed = start.elapsed();
    assert!(reply.contains("\"ok\":true"), "request for {source} refused: {reply}");
    elapsed
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

/// Issues `count` requests from `clients` threads (sources from `first` on); returns
/// every latency and the wall time.
fn load(socket: &Path, first: usize, count: usize, clients: usize, secs: u64) -> (Vec<Duration>, Duration) {
    let start = Instant::now();
    let per = count.div_ceil(clients);
    let handles: Vec<_> = (0..clients)
        .map(|c| {
            let socket = socket.to_path_buf();
            std::thread::spawn(move || {
                let range = (first + c * per)..(first + ((c + 1) * per).min(count));
                range
                    .map(|i| timed_request(&socket, &source(i), secs))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut all: Vec<Duration> = handles.into_iter().flat_map(|h| h.join().unwrap()).collect();
    all.sort();
    (all, start.elapsed())
}

fn bench_requests(plan: &Plan) -> Value {
    let net = Net::new();
    let setup = Setup::new(POLICY);
    let _jitd = setup.start(&net.host);
    let (seq, _) = load(&setup.socket(), 0, plan.sequential, 1, 3600);
    let total = plan.clients * plan.per_client;
    let (conc, wall) = load(&setup.socket(), plan.sequential, total, plan.clients, 3600);
    json!({
        "sequential": {"requests": seq.len(), "p50_ms": percentile(&seq, 0.5), "p99_ms": percentile(&seq, 0.99), "max_ms": percentile(&seq, 1.0)},
        "concurrent": {"clients": plan.clients, "requests": conc.len(), "grants_per_s": conc.len() as f64 / wall.as_secs_f64(), "p99_ms": percentile(&conc, 0.99)},
    })
}

fn rss_mb(pid: i32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    kb / 1024.0
}

fn bench_scale(plan: &Plan) -> Value {
    let net = Net::new();
    let setup = Setup::new(POLICY);
    let mut jitd = setup.start(&net.host);
    let mut installed = 0;
    let mut rows = Vec::new();
    for &n in &plan.scale {
        let (_, wall) = load(&setup.socket(), installed, n - installed, 16, 24 * 3600);
        installed = n;
        let rss = rss_mb(jitd.pid());
        let start = Instant::now();
        let status = jitd.ctl_json(&["status"]);
        let status_s = start.elapsed().as_secs_f64();
        assert_eq!(status["grants"].as_array().unwrap().len(), n);
        // restart after kill -9: from a fresh process to READY=1, which jitd sends once
        // the lockdown and every grant are in the kernel
        jitd.kill();
        let notify_path = setup.dir.path().join(format!("notify-{n}.sock"));
        let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
        notify.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        let start = Instant::now();
        jitd = setup.spawn(&net.host, &[("NOTIFY_SOCKET", notify_path.to_str().unwrap())]);
        let mut buf = [0u8; 512];
        loop {
            let n = notify.recv(&mut buf).expect("READY=1 from the restarted jitd");
            if String::from_utf8_lossy(&buf[..n]).contains("READY=1") {
                break;
            }
        }
        let restart_s = start.elapsed().as_secs_f64();
        assert!(wait_for(Duration::from_secs(60), || jitd
            .ctl(&["status"])
            .status
            .success()));
        let back = jitd.ctl_json(&["status"])["grants"].as_array().unwrap().len();
        assert_eq!(back, n, "every grant is back after the restart");
        rows.push(
            json!({"n": n, "install_s": wall.as_secs_f64(), "grants_per_s": (n as f64) / wall.as_secs_f64().max(1e-9),
            "rss_mb": rss, "status_json_s": status_s, "restart_s": restart_s}),
        );
    }
    Value::Array(rows)
}

/// TCP connect latency and rate from client a to the host's port 22, `count` times.
fn connect_stats(net: &Net, count: usize) -> (Vec<Duration>, f64) {
    let target = SocketAddr::new(HOST_A4.parse::<IpAddr>().unwrap(), 22);
    in_ns(&net.a, || {
        let start = Instant::now();
        let mut times = Vec::with_capacity(count);
        for _ in 0..count {
            let t = Instant::now();
            let s = TcpStream::connect_timeout(&target, Duration::from_secs(2)).expect("granted connection");
            times.push(t.elapsed());
            drop(s);
        }
        let rate = count as f64 / start.elapsed().as_secs_f64();
        times.sort();
        (times, rate)
    })
}

/// Close with RST instead of FIN (SO_LINGER 0): no TIME_WAIT pile-up on either side.
fn reset_on_close(stream: &TcpStream) {
    let linger = nix::libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    let _ = nix::sys::socket::setsockopt(stream, nix::sys::socket::sockopt::Linger, &linger);
}

fn packet_row(case: &str, n: usize, times: &[Duration], rate: f64, baseline_p50: f64) -> Value {
    let p50 = percentile(times, 0.5) * 1000.0;
    json!({"case": case, "n": n, "p50_us": p50, "p99_us": percentile(times, 0.99) * 1000.0, "conns_per_s": rate,
        "ratio_p50": if baseline_p50 > 0.0 { p50 / baseline_p50 } else { 1.0 }})
}

/// A chain with one accept rule per grant, the way other tools build it; the measured
/// client's rule comes last.
fn naive_chain(net: &Net, n: usize) {
    let mut script = String::from(
        "table inet naive {\n chain input {\n  type filter hook input priority -10; policy accept;\n  iif \"lo\" accept\n  ct state established,related accept\n",
    );
    for i in 0..n {
        let n = i + 1;
        script.push_str(&format!(
            "  ip saddr 10.{}.{}.{} tcp dport 22 accept\n",
            200 + n / 65536,
            (n / 256) % 256,
            n % 256
        ));
    }
    script.push_str(&format!(
        "  ip saddr {A4} tcp dport 22 accept\n  tcp dport 22 drop\n }}\n}}\n"
    ));
    let path = std::env::temp_dir().join(format!("jitd-naive-{}.nft", std::process::id()));
    std::fs::write(&path, script).unwrap();
    let out = Command::new("ip")
        .args(["netns", "exec", &net.host, "nft", "-f"])
        .arg(&path)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&path);
    assert!(
        out.status.success(),
        "loading the naive chain: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn bench_packet_path(plan: &Plan) -> Value {
    let mut rows = Vec::new();
    // (a) no firewall at all
    let net = Net::new();
    serve_echo(&net.host, 22);
    let (times, rate) = connect_stats(&net, plan.connections);
    let base = percentile(&times, 0.5) * 1000.0;
    rows.push(packet_row("no firewall", 0, &times, rate, base));
    drop(net);
    // jitd with N other live grants
    for &n in &plan.packet_grants {
        let net = Net::new();
        serve_echo(&net.host, 22);
        let setup = Setup::new(POLICY);
        let jitd = setup.start(&net.host);
        if n > 0 {
            load(&setup.socket(), 0, n, 16, 3600);
        }
        jitd.ctl_json(&["request", "--port", "22", "--source", A4, "--duration", "1h"]);
        let (times, rate) = connect_stats(&net, plan.connections);
        rows.push(packet_row("jitd (set lookup)", n, &times, rate, base));
    }
    // (b) one accept rule per grant
    for &n in plan.packet_grants.iter().filter(|n| **n > 0) {
        let net = Net::new();
        serve_echo(&net.host, 22);
        naive_chain(&net, n);
        let (times, rate) = connect_stats(&net, plan.connections);
        rows.push(packet_row("one rule per grant", n, &times, rate, base));
    }
    Value::Array(rows)
}

fn bench_expiry(plan: &Plan) -> Value {
    let net = Net::new();
    serve_echo(&net.host, 22);
    let setup = Setup::new(POLICY);
    let jitd = setup.start(&net.host);
    let target = SocketAddr::new(HOST_A4.parse::<IpAddr>().unwrap(), 22);
    let mut delays = Vec::new();
    for &secs in &plan.expiry_secs {
        let reply = jitd.ctl_json(&[
            "request",
            "--port",
            "22",
            "--source",
            A4,
            "--duration",
            &format!("{secs}s"),
        ]);
        let expires: chrono::DateTime<chrono::Utc> =
            reply["grants"][0]["expires_at"].as_str().unwrap().parse().unwrap();
        // probe with short connects until one is dropped
        let refused_at = in_ns(&net.a, || loop {
            let tried = chrono::Utc::now();
            match TcpStream::connect_timeout(&target, Duration::from_millis(50)) {
                Ok(s) => {
                    reset_on_close(&s);
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(_) => return tried,
            }
        });
        delays.push((refused_at - expires).num_milliseconds() as f64);
    }
    let mean = delays.iter().sum::<f64>() / delays.len() as f64;
    let max = delays.iter().cloned().fold(f64::MIN, f64::max);
    json!({"grants_s": plan.expiry_secs, "delays_ms": delays, "mean_ms": mean, "max_ms": max})
}

/// How often the neighbour commits to its own table.
const NEIGHBOUR_HZ: u32 = 50;

/// The neighbour's table: a set, and a rule that uses it, so a listing shows both.
const NEIGHBOUR_TABLE: &str = "table inet neighbour {\n set blocked { type ipv4_addr; }\n chain input {\n  type filter hook input priority 10; policy accept;\n  ip saddr @blocked counter drop\n }\n}\n";

/// Another firewall manager on the same host (Docker, fail2ban): a separate `nft -i`
/// process in the host namespace that, while active, commits [`NEIGHBOUR_HZ`] times a
/// second to `inet neighbour`, each commit adding and deleting one element.
struct Neighbour {
    child: std::process::Child,
    active: Arc<AtomicBool>,
    done: Arc<AtomicBool>,
    commits: Arc<AtomicU64>,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl Neighbour {
    fn start(net: &Net) -> Neighbour {
        nft_script(net, NEIGHBOUR_TABLE);
        let mut child = Command::new("ip")
            .args(["netns", "exec", &net.host, "nft", "-i"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn nft -i");
        let mut stdin = child.stdin.take().unwrap();
        let (active, done, commits) = Default::default();
        let (a, d, c): (Arc<AtomicBool>, Arc<AtomicBool>, Arc<AtomicU64>) =
            (Arc::clone(&active), Arc::clone(&done), Arc::clone(&commits));
        let writer = std::thread::spawn(move || {
            let period = Duration::from_secs(1) / NEIGHBOUR_HZ;
            let mut next = Instant::now();
            while !d.load(Ordering::SeqCst) {
                if a.load(Ordering::SeqCst) {
                    let i = c.fetch_add(1, Ordering::SeqCst) % 250 + 1;
                    let line = format!(
                        "add element inet neighbour blocked {{ 192.0.2.{i} }}; delete element inet neighbour blocked {{ 192.0.2.{i} }}\n"
                    );
                    stdin.write_all(line.as_bytes()).expect("the neighbour's nft -i runs");
                }
                next += period;
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
        });
        Neighbour {
            child,
            active,
            done,
            commits,
            writer: Some(writer),
        }
    }

    fn set_active(&self, on: bool) {
        self.active.store(on, Ordering::SeqCst);
    }

    /// The neighbour's pid as the kernel reports it (`ip netns exec` execs nft).
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops it; returns how many commits it made. Fails if any of them failed.
    fn finish(self) -> u64 {
        let Neighbour {
            child,
            done,
            commits,
            writer,
            ..
        } = self;
        done.store(true, Ordering::SeqCst);
        // the writer owns nft's stdin: when it ends, nft reads EOF and exits
        writer.expect("running").join().unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.stderr.is_empty(),
            "the neighbour's commits failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        commits.load(Ordering::SeqCst)
    }
}

/// Loads an nft script in the host namespace.
fn nft_script(net: &Net, script: &str) {
    let mut child = Command::new("ip")
        .args(["netns", "exec", &net.host, "nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn nft -f -");
    child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "nft -f -: {}", text(&out));
}

/// The neighbour's table as `nft list table` prints it.
fn neighbour_listing(net: &Net) -> String {
    let out = net.nft(&["list", "table", "inet", "neighbour"]);
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8(out.stdout).unwrap()
}

/// The `repair` records jitd's audit files hold, as JSON lines.
fn repair_records(setup: &Setup) -> Vec<String> {
    let mut files: Vec<_> = std::fs::read_dir(setup.state_dir())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("audit")))
        .collect();
    files.sort();
    files
        .iter()
        .flat_map(|p| {
            let text = std::fs::read_to_string(p).unwrap_or_default();
            let lines: Vec<String> = text
                .lines()
                .filter(|l| l.contains("\"action\":\"repair\""))
                .map(str::to_string)
                .collect();
            lines
        })
        .collect()
}

fn summary(times: &mut [Duration]) -> Value {
    times.sort();
    json!({"requests": times.len(), "p50_ms": percentile(times, 0.5), "p99_ms": percentile(times, 0.99), "max_ms": percentile(times, 1.0)})
}

/// For each N: N live grants, then sequential requests in alternating quiet and
/// neighbour blocks (so load from elsewhere on the machine falls on both alike); the
/// largest N also gets the repair, status and restart figures.
fn bench_neighbour(plan: &Plan) -> Value {
    let largest = plan.neighbour_n.iter().copied().max().unwrap_or(0);
    let rows = plan.neighbour_n.iter().map(|&n| neighbour_row(plan, n, n == largest));
    Value::Array(rows.collect())
}

fn neighbour_row(plan: &Plan, n: usize, large: bool) -> Value {
    let net = Net::new();
    let setup = Setup::new(POLICY);
    let jitd = setup.start(&net.host);
    let socket = setup.socket();
    let neighbour = Neighbour::start(&net);
    if large {
        serve_echo(&net.host, 22);
    }
    load(&socket, 0, n, 16, 24 * 3600);
    let before = neighbour_listing(&net);
    let repairs_before = repair_records(&setup);
    let (mut quiet, mut busy) = (Vec::new(), Vec::new());
    let mut next = n;
    let mut busy_time = Duration::ZERO;
    for _ in 0..plan.blocks {
        quiet.extend(load(&socket, next, plan.per_block, 1, 3600).0);
        next += plan.per_block;
        neighbour.set_active(true);
        // let it run a moment first, so the block sees a neighbour in full swing
        std::thread::sleep(Duration::from_millis(200));
        let (times, wall) = load(&socket, next, plan.per_block, 1, 3600);
        neighbour.set_active(false);
        busy.extend(times);
        busy_time += wall + Duration::from_millis(200);
        next += plan.per_block;
    }
    let rss_installed = rss_mb(jitd.pid());
    let pid = neighbour.pid();
    let commits = neighbour.finish();
    // a reaction would come within the debounce; give it ample time
    std::thread::sleep(Duration::from_millis(500));
    let untouched = neighbour_listing(&net) == before;
    let repairs: Vec<String> = repair_records(&setup)
        .into_iter()
        .filter(|r| !repairs_before.contains(r))
        .collect();
    let reads = jitd
        .log_text()
        .lines()
        .filter(|l| l.contains("reading the kernel") && l.contains(&format!("(pid {pid})")))
        .count();
    let (quiet, busy) = (summary(&mut quiet), summary(&mut busy));
    let ratio = |key: &str| busy[key].as_f64().unwrap() / quiet[key].as_f64().unwrap();
    let mut row = json!({"n": n, "quiet": quiet, "ratio_p50": ratio("p50_ms"), "ratio_p99": ratio("p99_ms"),
        "neighbour_table_untouched": untouched, "repairs_during_run": repairs.len(), "kernel_reads_for_neighbour": reads});
    row["neighbour"] = busy;
    row["neighbour"]["commits"] = json!(commits);
    row["neighbour"]["commits_per_s"] = json!(commits as f64 / busy_time.as_secs_f64());
    row["rss_mb"] = json!(rss_installed);
    // what jitd said it found, if it repaired anything (the check below then fails)
    row["repair_reasons"] = repairs
        .iter()
        .take(5)
        .map(|r| serde_json::from_str::<Value>(r).map_or(Value::Null, |v| v["reason"].clone()))
        .collect();
    if large {
        row["large"] = large_figures(&net, &setup, jitd, next);
    }
    row
}

/// Repair, status and restart with `live` grants in place (sources 0..live).
fn large_figures(net: &Net, setup: &Setup, jitd: Jitd, live: usize) -> Value {
    timed_request(&setup.socket(), A4, 3600);
    assert!(
        until_connects(net, "client a's grant") < 1.0,
        "client a connects with its grant"
    );
    let (repair_element_s, slowest_ms, made) = repair_element(net, &setup.socket(), live);
    let live = live + 1 + made;
    let repair_rule_s = repair_rule(net);
    let rss_before = rss_mb(jitd.pid());
    let (status_json_s, rss_peak, listed) = status_with_rss(&jitd);
    assert_eq!(listed, Some(live), "status lists every live grant");
    let (stop_s, restart_ready_s, restart_answers_s) = restart(net, setup, jitd, live);
    json!({"grants": live, "repair_element_s": repair_element_s, "requests_during_repair": made,
        "request_max_ms_during_repair": slowest_ms, "repair_rule_s": repair_rule_s,
        "status_json_s": status_json_s, "status_rss_mb_before": rss_before, "status_rss_mb_peak": rss_peak,
        "stop_s": stop_s, "restart_ready_s": restart_ready_s, "restart_answers_s": restart_answers_s})
}

/// Seconds until client a can open a new connection to the host's port 22 again
/// (a fresh attempt every 10 ms, each given 100 ms), up to 120 s.
fn until_connects(net: &Net, what: &str) -> f64 {
    let target = SocketAddr::new(HOST_A4.parse::<IpAddr>().unwrap(), 22);
    in_ns(&net.a, || {
        let start = Instant::now();
        loop {
            if let Ok(s) = TcpStream::connect_timeout(&target, Duration::from_millis(100)) {
                reset_on_close(&s);
                return start.elapsed().as_secs_f64();
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "jitd did not repair {what} within 120 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    })
}

/// Deletes client a's grant element behind jitd's back; seconds until a connects
/// again, and the slowest of the requests made meanwhile (sources from `first` on, one
/// at a time) with how many there were: whether the repair held the request path.
/// (Polling with `nft get element` would not do: nft 1.0.6 fetches the whole set.)
fn repair_element(net: &Net, socket: &Path, first: usize) -> (f64, f64, usize) {
    let element = format!("{{ {A4} . tcp . 22 }}");
    let out = net.nft(&["delete", "element", "inet", "jitd", "grants4", &element]);
    assert!(out.status.success(), "{}", text(&out));
    let repaired = Arc::new(AtomicBool::new(false));
    let (flag, socket) = (Arc::clone(&repaired), socket.to_path_buf());
    let requests = std::thread::spawn(move || {
        let mut times = Vec::new();
        while !flag.load(Ordering::SeqCst) {
            times.push(timed_request(&socket, &source(first + times.len()), 3600));
        }
        times
    });
    let took = until_connects(net, "a deleted element");
    repaired.store(true, Ordering::SeqCst);
    let times = requests.join().unwrap();
    let slowest = times.iter().max().map_or(0.0, |t| t.as_secs_f64() * 1000.0);
    (took, slowest, times.len())
}

/// Deletes the syn_check rule that admits IPv4 grants; seconds until client a
/// connects again (jitd replaces the whole table when its structure changed).
fn repair_rule(net: &Net) -> f64 {
    let out = net.nft(&["-t", "-a", "list", "chain", "inet", "jitd", "syn_check"]);
    let listing = String::from_utf8_lossy(&out.stdout);
    let handle = listing
        .lines()
        .find(|l| l.contains("ip saddr . meta l4proto . th dport @grants4 "))
        .and_then(|l| l.split("# handle ").nth(1))
        .unwrap_or_else(|| panic!("no grants4 rule in syn_check: {listing}"))
        .to_string();
    let out = net.nft(&["delete", "rule", "inet", "jitd", "syn_check", "handle", &handle]);
    assert!(out.status.success(), "{}", text(&out));
    until_connects(net, "a deleted rule")
}

/// `jitctl --json status`: wall time, jitd's peak RSS while it ran (sampled every
/// 5 ms), and how many grants it listed (if the reply has a `grants` array).
fn status_with_rss(jitd: &Jitd) -> (f64, f64, Option<usize>) {
    let pid = jitd.pid();
    let running = Arc::new(AtomicBool::new(true));
    let flag = Arc::clone(&running);
    let sampler = std::thread::spawn(move || {
        let mut peak = rss_mb(pid);
        while flag.load(Ordering::SeqCst) {
            peak = peak.max(rss_mb(pid));
            std::thread::sleep(Duration::from_millis(5));
        }
        peak
    });
    let start = Instant::now();
    let out = jitd.ctl(&["--json", "status"]);
    let took = start.elapsed().as_secs_f64();
    running.store(false, Ordering::SeqCst);
    let peak = sampler.join().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let listed = serde_json::from_slice::<Value>(&out.stdout)
        .ok()
        .and_then(|v| v["grants"].as_array().map(Vec::len));
    (took, peak, listed)
}

/// SIGTERM, then a new jitd: seconds to exit, to READY=1 and to granting a new
/// request; then checks all `live` grants came back.
fn restart(net: &Net, setup: &Setup, jitd: Jitd, live: usize) -> (f64, f64, f64) {
    let start = Instant::now();
    let status = jitd.stop(Duration::from_secs(60));
    let stop_s = start.elapsed().as_secs_f64();
    assert!(status.success(), "jitd exits cleanly on SIGTERM: {status}");
    let notify_path = setup.dir.path().join("notify-restart.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let start = Instant::now();
    let jitd = setup.spawn(&net.host, &[("NOTIFY_SOCKET", notify_path.to_str().unwrap())]);
    let mut buf = [0u8; 512];
    loop {
        let got = notify.recv(&mut buf).expect("READY=1 from the restarted jitd");
        if String::from_utf8_lossy(&buf[..got]).contains("READY=1") {
            break;
        }
    }
    let ready_s = start.elapsed().as_secs_f64();
    // answering: a new request granted (`status` would time the listing of every grant)
    let socket = setup.socket();
    assert!(wait_for(Duration::from_secs(60), || UnixStream::connect(&socket).is_ok()));
    timed_request(&socket, &source(live), 3600);
    let answers_s = start.elapsed().as_secs_f64();
    let back = jitd.ctl_json(&["status"])["grants"].as_array().map(Vec::len);
    assert_eq!(back, Some(live + 1), "every grant is back after the restart");
    (stop_s, ready_s, answers_s)
}

fn print_table(r: &Value) {
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    let m = &r["machine"];
    println!(
        "\njitd benchmark{} on {} cores, {} GiB, kernel {}, {}",
        if r["smoke"] == true { " (smoke run)" } else { "" },
        m["cores"],
        m["memory_gib"],
        m["kernel"].as_str().unwrap_or(""),
        m["nft"].as_str().unwrap_or("")
    );
    let s = &r["request"]["sequential"];
    println!(
        "\n1. Request to open ({} sequential): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        s["requests"],
        f(&s["p50_ms"]),
        f(&s["p99_ms"]),
        f(&s["max_ms"])
    );
    let c = &r["request"]["concurrent"];
    println!(
        "   {} concurrent clients, {} requests: {:.0} grants/s, p99 {:.2} ms",
        c["clients"],
        c["requests"],
        f(&c["grants_per_s"]),
        f(&c["p99_ms"])
    );
    println!(
        "\n2. Scale\n   {:>8}  {:>10}  {:>9}  {:>8}  {:>14}  {:>10}",
        "N", "install s", "grants/s", "RSS MB", "status --json s", "restart s"
    );
    for row in r["scale"].as_array().unwrap() {
        println!(
            "   {:>8}  {:>10.2}  {:>9.0}  {:>8.1}  {:>14.3}  {:>10.2}",
            row["n"].as_u64().unwrap_or(0),
            f(&row["install_s"]),
            f(&row["grants_per_s"]),
            f(&row["rss_mb"]),
            f(&row["status_json_s"]),
            f(&row["restart_s"])
        );
    }
    println!("\n3. Packet path (new TCP connection to a protected port from a granted client)\n   {:<20} {:>8}  {:>8}  {:>8}  {:>10}  {:>9}", "case", "N", "p50 us", "p99 us", "conns/s", "p50 ratio");
    for row in r["packet_path"].as_array().unwrap() {
        println!(
            "   {:<20} {:>8}  {:>8.1}  {:>8.1}  {:>10.0}  {:>9.2}",
            row["case"].as_str().unwrap(),
            row["n"].as_u64().unwrap_or(0),
            f(&row["p50_us"]),
            f(&row["p99_us"]),
            f(&row["conns_per_s"]),
            f(&row["ratio_p50"])
        );
    }
    let e = &r["expiry"];
    println!(
        "\n4. Expiry: first refused connection after the grant's end: mean {:.0} ms, max {:.0} ms (grants of {} s)",
        f(&e["mean_ms"]),
        f(&e["max_ms"]),
        e["grants_s"]
    );
    print_neighbour(&r["neighbour"]);
    knock::print(&r["knock"]);
    fleet::print(&r["fleet"]);
}

fn print_neighbour(rows: &Value) {
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    println!(
        "\n5. Requests with a neighbour committing to its own table (sequential, alternating blocks)\n   {:>7}  {:>15}  {:>15}  {:>15}  {:>9}  {:>9}  {:>10}  {:>7}  {:>12}",
        "N", "quiet p50/p99", "neigh. p50/p99", "neigh. commits/s", "p50 ratio", "p99 ratio", "untouched", "repairs", "kernel reads"
    );
    for row in rows.as_array().unwrap() {
        let (q, b) = (&row["quiet"], &row["neighbour"]);
        println!(
            "   {:>7}  {:>7.2}/{:<7.2}  {:>7.2}/{:<7.2}  {:>16.1}  {:>9.2}  {:>9.2}  {:>10}  {:>7}  {:>12}",
            row["n"].as_u64().unwrap_or(0),
            f(&q["p50_ms"]),
            f(&q["p99_ms"]),
            f(&b["p50_ms"]),
            f(&b["p99_ms"]),
            f(&b["commits_per_s"]),
            f(&row["ratio_p50"]),
            f(&row["ratio_p99"]),
            row["neighbour_table_untouched"],
            row["repairs_during_run"],
            row["kernel_reads_for_neighbour"]
        );
    }
    for row in rows.as_array().unwrap() {
        for reason in row["repair_reasons"].as_array().into_iter().flatten() {
            println!("   N = {}: jitd repaired: {}", row["n"], reason.as_str().unwrap_or("?"));
        }
    }
    for row in rows.as_array().unwrap() {
        let l = &row["large"];
        if l.is_null() {
            continue;
        }
        println!(
            "\n6. With {} live grants\n   repair of a deleted element {:.3} s ({} requests meanwhile, slowest {:.1} ms), of a deleted rule {:.3} s\n   status --json {:.3} s, jitd RSS {:.1} MB before, {:.1} MB peak during it\n   restart: SIGTERM to exit {:.2} s, new jitd to READY=1 {:.2} s, to answering {:.2} s",
            l["grants"],
            f(&l["repair_element_s"]),
            l["requests_during_repair"],
            f(&l["request_max_ms_during_repair"]),
            f(&l["repair_rule_s"]),
            f(&l["status_json_s"]),
            f(&l["status_rss_mb_before"]),
            f(&l["status_rss_mb_peak"]),
            f(&l["stop_s"]),
            f(&l["restart_ready_s"]),
            f(&l["restart_answers_s"])
        );
    }
}
