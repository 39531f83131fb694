//! The stage: the host namespace running the real jitd with `[remote]` and its
//! metrics on, client a with extra addresses for the legitimate knocks, client b with
//! 256 addresses for the floods, the keys and the agent.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::util::{in_ns, serve_echo, text, Jitd, Net, Setup};

use super::client::{Agent, Key};

/// jitd's knock port here.
pub const KNOCK_PORT: u16 = 62222;
/// Where jitd serves its metrics, inside the host namespace.
const METRICS: &str = "127.0.0.1:9464";
/// Client a's addresses for legitimate knocks, one after another (the per-source
/// limits allow 5 knocks a second from one address).
pub const CLIENT_SOURCES: u8 = 40;
/// Flood sources on client b: more than the kernel meter's per-source budget can
/// hold back (256 × 10 packets a second reach jitd's socket).
pub const FLOOD_SOURCES: usize = 256;

/// The host, its clients, jitd, the keys.
pub struct KnockHost {
    pub net: Net,
    pub setup: Setup,
    pub jitd: Jitd,
    pub keys: tempfile::TempDir,
    /// alice: her private key only in the agent.
    pub alice: Key,
    pub agent: Agent,
    /// Another key of alice's, signing in-process (capacity runs).
    pub bulk: Key,
    /// A key in no allowed_signers line.
    pub mallory: Key,
    /// Client a's knock sources.
    pub clients: Vec<IpAddr>,
    /// Client b's flood sources.
    pub flooders: Vec<IpAddr>,
    /// Which of `clients` knocks next.
    pub cursor: std::sync::atomic::AtomicUsize,
}

impl KnockHost {
    /// Namespaces, addresses, keys, the agent, and a jitd taking knocks.
    pub fn start() -> KnockHost {
        let net = Net::new();
        serve_echo(&net.host, 22);
        let clients = client_addresses(&net);
        let flooders = flood_addresses(&net);
        let keys = tempfile::Builder::new().prefix("jitd-knockbench").tempdir().unwrap();
        let alice = Key::new(keys.path(), "alice");
        let bulk = Key::new(keys.path(), "bulk");
        let mallory = Key::new(keys.path(), "mallory");
        let agent = Agent::start(keys.path(), &alice);
        let setup = Setup::new("");
        let signers = setup.dir.path().join("allowed_signers");
        std::fs::write(&signers, format!("alice {}\nalice {}\n", alice.public, bulk.public)).unwrap();
        setup.write_policy(&policy(&signers));
        let jitd = setup.start(&net.host);
        KnockHost {
            net,
            setup,
            jitd,
            keys,
            alice,
            agent,
            bulk,
            mallory,
            clients,
            flooders,
            cursor: Default::default(),
        }
    }

    /// jitd's knock port on the address facing client a.
    pub fn knock_target(&self) -> SocketAddr {
        SocketAddr::new(crate::util::HOST_A4.parse().unwrap(), KNOCK_PORT)
    }

    /// jitd's knock port on the address facing client b (the flood's way in).
    pub fn flood_target(&self) -> SocketAddr {
        SocketAddr::new(crate::util::HOST_B4.parse().unwrap(), KNOCK_PORT)
    }

    /// jitd's counters: `jitd_knocks_total` by result, and approved requests.
    pub fn metrics(&self) -> (BTreeMap<String, u64>, u64) {
        let body = in_ns(&self.net.host, || {
            let mut s = TcpStream::connect(METRICS).expect("jitd's metrics");
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
            let mut body = String::new();
            s.read_to_string(&mut body).unwrap();
            body
        });
        let mut knocks = BTreeMap::new();
        let mut approved = 0;
        for line in body.lines().filter(|l| !l.starts_with('#')) {
            let value = line
                .rsplit(' ')
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0) as u64;
            if line.starts_with("jitd_knocks_total{") {
                let label = line.split("result=\"").nth(1).and_then(|r| r.split('"').next());
                knocks.insert(label.unwrap_or("?").to_string(), value);
            } else if line.starts_with("jitd_requests_total{") && line.contains("outcome=\"approved\"") {
                approved += value;
            }
        }
        (knocks, approved)
    }
}

fn policy(signers: &std::path::Path) -> String {
    format!(
        r#"metrics_listen = "{METRICS}"
[[ports]]
port = 22
max_duration = "24h"
allowed_sources = ["10.0.0.0/8", "fd00::/8"]
[access]
requesters = ["principal:alice"]
[remote]
listen = "0.0.0.0:{KNOCK_PORT}"
names = ["{}"]
allowed_signers = "{}"
"#,
        super::client::HOST_NAME,
        signers.display()
    )
}

/// Runs `ip -n NS -batch -` with `lines`.
fn ip_batch(ns: &str, lines: &str) {
    let mut child = Command::new("ip")
        .args(["-n", ns, "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(lines.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "ip -batch: {}", text(&out));
}

/// 10.77.1.10 ... on client a's link (the host reaches them on its connected route).
pub fn client_addresses(net: &Net) -> Vec<IpAddr> {
    let addrs: Vec<IpAddr> = (0..CLIENT_SOURCES)
        .map(|i| IpAddr::V4(Ipv4Addr::new(10, 77, 1, 10 + i)))
        .collect();
    let lines: String = addrs.iter().map(|a| format!("addr add {a}/24 dev c0\n")).collect();
    ip_batch(&net.a, &lines);
    addrs
}

/// 10.79.0.1 ... on client b, routed to by the host through b.
pub fn flood_addresses(net: &Net) -> Vec<IpAddr> {
    let addrs: Vec<IpAddr> = (1..=FLOOD_SOURCES as u32)
        .map(|i| IpAddr::V4(Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 79, 0, 0)) + i)))
        .collect();
    let lines: String = addrs.iter().map(|a| format!("addr add {a}/32 dev c0\n")).collect();
    ip_batch(&net.b, &lines);
    ip_batch(&net.host, "route add 10.79.0.0/16 via 10.77.2.2\n");
    addrs
}
