//! fwknop beside jitd, in the same run and the same topology: fwknopd (Debian's
//! `fwknop-server`) in the host namespace in UDP server mode, Rijndael + HMAC keys
//! from `fwknop --key-gen`, opening port 22 with iptables (iptables-nft) rules in its
//! FWKNOP_INPUT chain ahead of a `tcp dport 22 drop`; SPA packets from the
//! `fwknop-client` in client namespaces. The same measures as for jitd.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::client::{assert_locked, use_source, wait_open};
use super::flood::{between, snapshot, Flood, FloodSpec};
use super::host::{client_addresses, flood_addresses};
use super::{KnockPlan, Samples};
use crate::util::{in_ns, serve_echo, text, Net, HOST_A4, HOST_B4};

/// fwknopd's UDP port (its default).
const SPA_PORT: u16 = 62201;
/// Valid SPA packets a second for the capacity runs; climbing stops at the first rate
/// fwknopd does not keep up with.
const LADDER: [u64; 5] = [25, 50, 100, 200, 500];
/// How long a flood-time knock may take before it counts as lost (quiet, fwknopd
/// opens within 30 ms).
const FLOOD_LIMIT: Duration = Duration::from_secs(1);
/// Knocks timed during the flood.
const FLOOD_KNOCKS: usize = 20;

/// Why fwknop cannot run here, if it cannot.
fn missing() -> Option<String> {
    for (tool, package) in [
        ("fwknopd", "fwknop-server"),
        ("fwknop", "fwknop-client"),
        ("iptables", "iptables"),
    ] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            return Some(format!(
                "{tool} not installed (Debian package {package}; scripts/bench installs it)"
            ));
        }
    }
    None
}

/// A Rijndael key and an HMAC key, base64, as `fwknop --key-gen` prints them.
#[derive(Clone)]
struct Keys {
    rijndael: String,
    hmac: String,
}

fn key_gen(dir: &Path, name: &str) -> Keys {
    let file = dir.join(name);
    let out = Command::new("fwknop")
        .args(["--key-gen", "--use-hmac", "--no-rc-file", "--key-gen-file"])
        .arg(&file)
        .env("HOME", dir)
        .output()
        .expect("run fwknop --key-gen");
    assert!(out.status.success(), "fwknop --key-gen: {}", text(&out));
    let keys = std::fs::read_to_string(&file).unwrap();
    let value = |prefix: &str| {
        keys.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| panic!("{prefix} in {keys}"))
    };
    Keys {
        rijndael: value("KEY_BASE64:"),
        hmac: value("HMAC_KEY_BASE64:"),
    }
}

/// fwknopd running in its own namespaces.
struct Fwknop {
    net: Net,
    dir: tempfile::TempDir,
    daemon: Child,
    keys: Keys,
    /// Keys fwknopd does not know (well-formed SPA that fails at the HMAC).
    wrong: Keys,
    clients: Vec<IpAddr>,
    flooders: Vec<IpAddr>,
    cursor: std::sync::atomic::AtomicUsize,
}

impl Fwknop {
    fn start() -> Fwknop {
        let net = Net::new();
        serve_echo(&net.host, 22);
        let clients = client_addresses(&net);
        let flooders = flood_addresses(&net);
        let dir = tempfile::Builder::new().prefix("jitd-fwknop").tempdir().unwrap();
        let (keys, wrong) = (key_gen(dir.path(), "keys"), key_gen(dir.path(), "wrong"));
        write_config(dir.path(), &keys);
        ipt(&net, &["-A", "INPUT", "-p", "tcp", "--dport", "22", "-j", "DROP"]);
        let d = dir.path();
        let daemon = Command::new("ip")
            .args(["netns", "exec", &net.host, "fwknopd", "-f"])
            .arg("-c")
            .arg(d.join("fwknopd.conf"))
            .arg("-a")
            .arg(d.join("access.conf"))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(d.join("fwknopd.log")).unwrap())
            .stderr(std::fs::File::create(d.join("fwknopd.err")).unwrap())
            .spawn()
            .expect("run fwknopd");
        let f = Fwknop {
            net,
            dir,
            daemon,
            keys,
            wrong,
            clients,
            flooders,
            cursor: Default::default(),
        };
        let listening = crate::util::wait_for(Duration::from_secs(20), || f.listening());
        assert!(listening, "fwknopd did not open UDP {SPA_PORT}: {}", f.log());
        f
    }

    /// Whether fwknopd's UDP server is bound.
    fn listening(&self) -> bool {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.net.host, "cat", "/proc/net/udp"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).contains(&format!(":{SPA_PORT:04X} "))
    }

    /// Bytes waiting in fwknopd's socket (`rx_queue` in /proc/net/udp).
    fn queued(&self) -> u64 {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.net.host, "cat", "/proc/net/udp"])
            .output()
            .unwrap();
        let table = String::from_utf8_lossy(&out.stdout);
        let port = format!(":{SPA_PORT:04X}");
        table
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| f.get(1).is_some_and(|a| a.ends_with(&port)))
            .and_then(|f| f.get(4)?.split(':').nth(1).map(str::to_string))
            .and_then(|rx| u64::from_str_radix(&rx, 16).ok())
            .unwrap_or(0)
    }

    fn log(&self) -> String {
        let read = |n: &str| std::fs::read_to_string(self.dir.path().join(n)).unwrap_or_default();
        format!("{}{}", read("fwknopd.log"), read("fwknopd.err"))
    }

    fn pid(&self) -> i32 {
        self.daemon.id() as i32 // `ip netns exec` execs fwknopd
    }

    fn next_client(&self) -> IpAddr {
        let i = self.cursor.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.clients[i % self.clients.len()]
    }

    /// The rules fwknopd has added (one per opened source).
    fn rules(&self) -> usize {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.net.host, "iptables", "-S", "FWKNOP_INPUT"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains("-j ACCEPT"))
            .count()
    }

    /// Removes every rule fwknopd added (each knock then measures a real opening).
    fn flush(&self) {
        ipt(&self.net, &["-F", "FWKNOP_INPUT"]);
    }

    /// The `fwknop` client's arguments for an SPA opening 22 for `allow`.
    fn client_args(&self, keys: &Keys, allow: IpAddr, to: &str) -> Vec<String> {
        let mut args: Vec<String> = ["--no-rc-file", "--no-save-args", "--use-hmac", "-A", "tcp/22"]
            .map(String::from)
            .to_vec();
        args.extend(["-a".into(), allow.to_string(), "-D".into(), to.into()]);
        args.extend(["-p".into(), SPA_PORT.to_string()]);
        args.extend(["--key-base64-rijndael".into(), keys.rijndael.clone()]);
        args.extend(["--key-base64-hmac".into(), keys.hmac.clone()]);
        args
    }

    /// SPA packets made by the client (`-T -B FILE`: made, written, not sent), one per
    /// address of `allow`, two clients at a time.
    fn make(&self, keys: &Keys, allow: &[IpAddr]) -> Vec<Vec<u8>> {
        let chunks: Vec<Vec<(usize, IpAddr)>> = (0..2)
            .map(|t| allow.iter().copied().enumerate().filter(|(i, _)| i % 2 == t).collect())
            .collect();
        let mut made: Vec<(usize, Vec<u8>)> = std::thread::scope(|s| {
            let handles: Vec<_> = chunks
                .iter()
                .map(|chunk| {
                    s.spawn(move || {
                        chunk
                            .iter()
                            .map(|(i, a)| (*i, self.make_one(keys, *a, *i)))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
        });
        made.sort_by_key(|(i, _)| *i);
        made.into_iter().map(|(_, p)| p).collect()
    }

    fn make_one(&self, keys: &Keys, allow: IpAddr, i: usize) -> Vec<u8> {
        let file = self.dir.path().join(format!("spa-{i}"));
        let out = Command::new("fwknop")
            .args(self.client_args(keys, allow, HOST_A4))
            .args(["-T", "-B"])
            .arg(&file)
            .env("HOME", self.dir.path())
            .output()
            .expect("run fwknop");
        assert!(out.status.success(), "fwknop -T -B: {}", text(&out));
        let packet = std::fs::read_to_string(&file).unwrap();
        let _ = std::fs::remove_file(&file);
        packet.trim().as_bytes().to_vec()
    }
}

impl Drop for Fwknop {
    fn drop(&mut self) {
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
    }
}

/// `iptables ARGS` in the host namespace; it must succeed.
fn ipt(net: &Net, args: &[&str]) {
    let out = Command::new("ip")
        .args(["netns", "exec", &net.host, "iptables"])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "iptables {args:?}: {}", text(&out));
}

/// fwknopd.conf (UDP server, its files in `dir`) and access.conf (any source may
/// open tcp/22 with `keys`, for 60 s).
fn write_config(dir: &Path, keys: &Keys) {
    let d = dir.display();
    let conf = format!(
        "ENABLE_UDP_SERVER Y;\nUDPSERV_PORT {SPA_PORT};\nPCAP_INTF h-a;\nFWKNOP_RUN_DIR {d};\nFWKNOP_PID_FILE {d}/fwknopd.pid;\nDIGEST_FILE {d}/digest.cache;\n"
    );
    let access = format!(
        "SOURCE ANY\nOPEN_PORTS tcp/22\nKEY_BASE64 {}\nHMAC_KEY_BASE64 {}\nFW_ACCESS_TIMEOUT 60\n",
        keys.rijndael, keys.hmac
    );
    for (name, body) in [("fwknopd.conf", conf), ("access.conf", access)] {
        let path: PathBuf = dir.join(name);
        std::fs::write(&path, body).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    }
}

fn port22() -> SocketAddr {
    SocketAddr::new(HOST_A4.parse().unwrap(), 22)
}

/// Everything measured for fwknop.
pub fn bench(plan: &KnockPlan) -> Value {
    if let Some(why) = missing() {
        return json!({"skipped": why});
    }
    let started = Instant::now();
    let f = Fwknop::start();
    let version = Command::new("fwknopd").arg("--version").output();
    let mut v = json!({
        "version": version.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default(),
        "mode": "fwknopd UDP server (ENABLE_UDP_SERVER), Rijndael + HMAC-SHA256, iptables-nft rules",
    });
    let locked = |what: &str| in_ns(&f.net.a, || assert_locked(f.clients[0], port22(), what));
    locked("before any SPA");
    let client = client_knocks(&f, plan.jitctl).json();
    locked("after fwknopd's rules were flushed");
    v["quiet"] = json!({
        "client": client,
        "premade": premade_knocks(&f, plan.presigned, super::OPEN_LIMIT).json(),
    });
    v["flood"] = flood(&f, plan);
    v["capacity"] = capacity(&f);
    v["log_bytes"] = json!(f.log().len());
    v["secs"] = json!(started.elapsed().as_secs_f64());
    v
}

/// `n` SPA knocks by the `fwknop` client, from spawning it to the first accepted
/// connection (as `jitctl knock --no-wait` is timed).
fn client_knocks(f: &Fwknop, n: usize) -> Samples {
    in_ns(&f.net.a, || {
        let mut s = Samples::default();
        for _ in 0..n {
            let src = f.next_client();
            use_source(src, "10.77.1.0/24", "c0");
            let start = Instant::now();
            let child = Command::new("fwknop")
                .args(f.client_args(&f.keys, src, HOST_A4))
                .env("HOME", f.dir.path())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("run fwknop");
            match wait_open(src, port22(), start, super::OPEN_LIMIT) {
                Some(t) => s.open.push(t),
                None => s.failed += 1,
            }
            let out = child.wait_with_output().unwrap();
            assert!(out.status.success(), "fwknop: {}", text(&out));
            f.flush();
        }
        s
    })
}

/// `n` SPA packets made beforehand: from sending to the first accepted connection.
fn premade_knocks(f: &Fwknop, n: usize, limit: Duration) -> Samples {
    let mut all = Samples::default();
    for batch in (0..n).collect::<Vec<_>>().chunks(25) {
        let sources: Vec<IpAddr> = batch.iter().map(|_| f.next_client()).collect();
        let packets = f.make(&f.keys, &sources);
        let s = in_ns(&f.net.a, || {
            let mut s = Samples::default();
            let target = SocketAddr::new(HOST_A4.parse().unwrap(), SPA_PORT);
            for (src, packet) in sources.iter().zip(&packets) {
                let udp = UdpSocket::bind(SocketAddr::new(*src, 0)).unwrap();
                let start = Instant::now();
                udp.send_to(packet, target).unwrap();
                match wait_open(*src, port22(), start, limit) {
                    Some(t) => s.open.push(t),
                    None => s.failed += 1,
                }
                f.flush();
            }
            s
        });
        all.add(s);
    }
    all
}

/// The many-source flood (fwknopd has no per-source limit, so one source or 256 is
/// the same to it): garbage and SPA packets made with keys it does not know, while
/// SPA knocks made beforehand are timed.
fn flood(f: &Fwknop, plan: &KnockPlan) -> Value {
    let stranger = f.make(&f.wrong, &[IpAddr::V4(Ipv4Addr::new(10, 77, 1, 2))]).remove(0);
    let spec = FloodSpec {
        garbage_pps: plan.garbage_pps,
        stranger_pps: plan.stranger_pps,
        stranger,
        threads: 2,
    };
    let target = SocketAddr::new(HOST_B4.parse().unwrap(), SPA_PORT);
    let flood = Flood::start(&f.net.b, &f.flooders, target, &spec);
    std::thread::sleep(plan.settle);
    let before = snapshot(&f.net.host, f.pid());
    let mut knocks = premade_knocks(f, FLOOD_KNOCKS, FLOOD_LIMIT);
    std::thread::sleep(plan.window.saturating_sub(before.at.unwrap().elapsed()));
    let after = snapshot(&f.net.host, f.pid());
    let sent = flood.stop();
    // let whatever fwknopd still has queued drain before the next measures
    crate::util::wait_for(Duration::from_secs(30), || f.queued() == 0);
    f.flush();
    json!({"flood": "many", "premade": knocks.json(), "sent": sent.json(&spec, f.flooders.len()),
        "counters": between(&before, &after)})
}

/// Valid SPA packets (each for its own address) at rising rates, each rate for a
/// second: how many rules fwknopd added within 2 s after the last was sent, and in
/// the end; climbing stops at the first rate where fewer than 95 % were in time.
fn capacity(f: &Fwknop) -> Value {
    let mut rows = Vec::new();
    let mut next = 0u32;
    for rate in LADDER {
        let allow: Vec<IpAddr> = (0..rate)
            .map(|_| {
                next += 1;
                IpAddr::V4(Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 201, 0, 0)) + next))
            })
            .collect();
        let packets = f.make(&f.keys, &allow);
        let sockets: Vec<UdpSocket> = in_ns(&f.net.b, || {
            f.flooders
                .iter()
                .map(|ip| UdpSocket::bind(SocketAddr::new(*ip, 0)).unwrap())
                .collect()
        });
        let target = SocketAddr::new(HOST_B4.parse().unwrap(), SPA_PORT);
        let before = snapshot(&f.net.host, f.pid());
        let start = Instant::now();
        for (i, p) in packets.iter().enumerate() {
            let at = start + Duration::from_secs_f64(i as f64 / rate as f64);
            std::thread::sleep(at.saturating_duration_since(Instant::now()));
            let _ = sockets[i % sockets.len()].send_to(p, target);
        }
        let sent_secs = start.elapsed().as_secs_f64();
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut in_time = 0;
        let mut all_at = None;
        while Instant::now() < deadline && all_at.is_none() {
            std::thread::sleep(Duration::from_millis(100));
            in_time = f.rules();
            all_at = (in_time >= packets.len()).then(|| start.elapsed().as_secs_f64());
        }
        let (eventually, drained_s) = drain(f, start);
        let after = snapshot(&f.net.host, f.pid());
        f.flush();
        rows.push(json!({"rate": rate, "sent": packets.len(), "send_secs": sent_secs, "opened_in_time": in_time,
            "all_opened_after_s": all_at, "all_opened_after_last_sent_s": all_at.map(|t| t - sent_secs), "opened_eventually": eventually, "eventually_after_s": drained_s,
            "counters": between(&before, &after)}));
        if (in_time as f64) < 0.95 * packets.len() as f64 {
            break;
        }
    }
    Value::Array(rows)
}

/// Waits until fwknopd adds no more rules for a second (at most 60 s); the count and
/// when the last one came, in seconds after `start`.
fn drain(f: &Fwknop, start: Instant) -> (usize, f64) {
    let mut last = (f.rules(), start.elapsed().as_secs_f64());
    let give_up = Instant::now() + Duration::from_secs(60);
    let mut quiet_since = Instant::now();
    while quiet_since.elapsed() < Duration::from_secs(1) && Instant::now() < give_up {
        std::thread::sleep(Duration::from_millis(100));
        let n = f.rules();
        if n != last.0 {
            last = (n, start.elapsed().as_secs_f64());
            quiet_since = Instant::now();
        }
    }
    last
}
