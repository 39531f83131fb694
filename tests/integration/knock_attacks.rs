//! Attacks on remote knocks from the network and from signers: a flood from thousands
//! of addresses of one IPv6 /64 (garbage, and junk signed over a known key), a flood of
//! refusals meant to rotate an approval out of the audit log, one key's refusals meant
//! to hide another's, a captured knock replayed after a reload widens the window, and
//! `valid-before` / `valid-after` read in the host's time zone as ssh-keygen reads them.
//! The real jitd, `jitctl knock` and `ssh-keygen` in network namespaces; spoofed
//! sources are sent as hand-made IPv6 packets on a raw socket.

use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{TimeDelta, Utc};
use serde_json::Value;
use socket2::{Domain, Protocol, Socket, Type};

use crate::knock::{knock_records, opens, packet, refused_with, send, Ask, Key, Scene, KNOCK_PORT};
use crate::util::*;

/// The host's address on b's side, over IPv6.
const HOST_B6: &str = "fd00:77:2::1";

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum >> 16) + (sum & 0xffff);
    }
    !(sum as u16)
}

/// An IPv6 packet carrying one UDP datagram from `src` (any address: spoofed) to
/// `dst`'s knock port.
fn udp6(src: Ipv6Addr, dst: Ipv6Addr, payload: &[u8]) -> Vec<u8> {
    let len = (8 + payload.len()) as u16;
    let mut udp = Vec::with_capacity(len as usize);
    udp.extend_from_slice(&40000u16.to_be_bytes());
    udp.extend_from_slice(&KNOCK_PORT.to_be_bytes());
    udp.extend_from_slice(&len.to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    let mut pseudo = Vec::with_capacity(40 + udp.len());
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&u32::from(len).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 17]);
    pseudo.extend_from_slice(&udp);
    let sum = match checksum(&pseudo) {
        0 => 0xffff,
        n => n,
    };
    udp[6..8].copy_from_slice(&sum.to_be_bytes());
    let mut ip = vec![0x60, 0, 0, 0];
    ip.extend_from_slice(&len.to_be_bytes());
    ip.extend_from_slice(&[17, 64]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    ip.extend_from_slice(&udp);
    ip
}

/// A flood running in a thread until dropped: packets from the sources `source(n)`
/// for n = 0, 1, 2, ..., in turn, each carrying `payload(n)`, at about `rate` a second.
struct Flood {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Flood {
    fn start(
        ns: &str,
        dst: &str,
        rate: u64,
        source: impl Fn(u64) -> Ipv6Addr + Send + 'static,
        payload: impl Fn(u64) -> Vec<u8> + Send + 'static,
    ) -> Flood {
        let raw = in_ns(ns, || Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::from(255))))
            .expect("a raw IPv6 socket (IPPROTO_RAW)");
        let dst: Ipv6Addr = dst.parse().unwrap();
        let to = SocketAddr::V6(SocketAddrV6::new(dst, 0, 0, 0)).into();
        let (stop, sent) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
        let (stopping, count) = (stop.clone(), sent.clone());
        let thread = std::thread::spawn(move || {
            let started = Instant::now();
            let mut n = 0u64;
            while !stopping.load(Ordering::SeqCst) {
                // paced in bursts: at most `rate` a second on average
                let due = started.elapsed().as_secs_f64() * rate as f64;
                if (n as f64) >= due {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                match raw.send_to(&udp6(source(n), dst, &payload(n)), &to) {
                    Ok(_) => {
                        n += 1;
                        count.store(n, Ordering::SeqCst);
                    }
                    // the interface's queue is full: a moment, then on
                    Err(_) => std::thread::sleep(Duration::from_millis(1)),
                }
            }
        });
        Flood {
            stop,
            sent,
            thread: Some(thread),
        }
    }

    fn sent(&self) -> u64 {
        self.sent.load(Ordering::SeqCst)
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Pins a's neighbour entry for the host's address on its side: a flood of spoofed
/// sources would otherwise starve neighbour discovery, and the kernel would drop the
/// flood in a, before the host ever sees it.
fn pin_host_neighbour(net: &Net) {
    let out = Command::new("ip")
        .args(["-n", &net.host, "-j", "link", "show", "h-a"])
        .output()
        .unwrap();
    let links: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mac = links[0]["address"].as_str().unwrap().to_string();
    let out = Command::new("ip")
        .args(["-n", &net.a, "neigh", "replace", HOST_A6, "lladdr", &mac])
        .args(["dev", "c0", "nud", "permanent"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
}

/// The `n`th of 4,700 addresses of a's /64.
fn in_a_64(n: u64) -> Ipv6Addr {
    let i = (n % 4700) as u16;
    Ipv6Addr::new(0xfd00, 0x77, 1, 0, 0xdead, 0, i, 0x100)
}

/// `jitctl knock` from `ns` to `host`, signing with `key`'s file.
fn jitctl_knock(ns: &str, host: &str, key: &Key, home: &Path) -> std::process::Output {
    let mut cmd = Command::new("ip");
    cmd.args([
        "netns",
        "exec",
        ns,
        env!("CARGO_BIN_EXE_jitctl"),
        "--json",
        "knock",
        host,
    ])
    .args([
        "--port",
        "22",
        "--duration",
        "10m",
        "--justification",
        "INC-1234",
        "--key",
    ])
    .arg(&key.path)
    .env("HOME", home)
    .env_remove("XDG_CONFIG_HOME")
    .env_remove("SSH_AUTH_SOCK")
    .stdin(Stdio::null());
    output_within(cmd, Duration::from_secs(90))
}

/// The issue-22 flood: 4,700 addresses of one /64 at 4,000 packets a second, half of
/// it garbage, half junk that passes every cheap check (alice's known key, the right
/// host and time) and fails only the signature check. A real `jitctl knock` from
/// another address still opens.
#[test]
fn a_flood_from_thousands_of_addresses_of_one_64_does_not_stop_a_real_knock() {
    let s = Scene::new("", "window = \"5m\"");
    let jitd = s.start();
    pin_host_neighbour(&s.net);
    // junk over alice's key: her real packet with its justification changed
    let real = packet(&s.alice, &Ask::port22());
    let at = real.windows(8).position(|w| w == b"INC-1234").unwrap();
    let flood = Flood::start(&s.net.a, HOST_A6, 4000, in_a_64, move |n| {
        if n % 2 == 0 {
            return b"JITDKNK1garbage".to_vec();
        }
        let mut junk = real.clone();
        junk[at + 4..at + 8].copy_from_slice(format!("{:04}", n % 10_000).as_bytes());
        junk
    });
    // the flood fills whatever it can before the real knock comes
    assert!(
        wait_for(Duration::from_secs(20), || flood.sent() > 8000),
        "the flood runs"
    );
    let out = jitctl_knock(&s.net.b, HOST_B6, &s.alice, s.keydir.path());
    let sent = flood.sent();
    drop(flood);
    assert!(
        out.status.success(),
        "a real knock during a flood of {sent} packets from one /64: {}\n{}",
        text(&out),
        jitd.log_text()
    );
    assert!(can_connect(&s.net.b, HOST_B6, 22), "open for b");
    assert!(!can_connect(&s.net.a, HOST_A6, 22), "not for the flood's /64");
    // the kernel counted the /64 as one source and dropped most of it
    let ruleset = s.net.ruleset();
    let meter = ruleset
        .lines()
        .find(|l| l.contains("meter knock6"))
        .expect("the knock6 meter");
    assert!(meter.contains("ip6 saddr & ffff:ffff:ffff:ffff::"), "{meter}");
    let dropped: u64 = meter
        .split("counter packets ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    let repairs: Vec<Value> = all_records(&s.setup)
        .into_iter()
        .filter(|r| r["action"] == "repair")
        .collect();
    assert_eq!(
        repairs,
        Vec::<Value>::new(),
        "the meter is no drift: {}",
        jitd.log_text()
    );
    assert!(dropped > sent / 2, "the kernel dropped {dropped} of {sent}: {meter}");
    assert!(jitd.ctl(&["status"]).status.success());
}

/// Every audit record in every file, oldest file first.
fn all_records(setup: &Setup) -> Vec<Value> {
    let mut files: Vec<(usize, std::path::PathBuf)> = std::fs::read_dir(setup.state_dir())
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let n = match name.as_str() {
                "audit.jsonl" => 0,
                _ => name.strip_prefix("audit.jsonl.")?.parse().ok()?,
            };
            Some((n, e.path()))
        })
        .collect();
    files.sort_by_key(|f| std::cmp::Reverse(f.0));
    files
        .iter()
        .flat_map(|(_, f)| {
            std::fs::read_to_string(f)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str::<Value>(l).unwrap())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Refusals from 3,000 prefixes (spoofed, unauthenticated) cannot rotate a live
/// grant's approval out of a small audit log, their records stay within the budget,
/// and `audit verify` still vouches for the chain.
#[test]
fn a_flood_of_refusals_cannot_rotate_an_approval_away() {
    let s = Scene::new("", "");
    let policy = std::fs::read_to_string(s.setup.policy()).unwrap();
    std::fs::write(
        s.setup.policy(),
        format!("audit_max_bytes = 4096\naudit_keep = 1\n{policy}"),
    )
    .unwrap();
    let jitd = s.setup.start_with(&s.net.host, &[("JITD_REFUSAL_INTERVAL_MS", "2000")]);
    send(&s.net.a, HOST_A4, &packet(&s.alice, &Ask::port22()));
    assert!(opens(&s.net.a, HOST_A4), "{}", jitd.log_text());
    let approved = |records: &[Value]| {
        records
            .iter()
            .any(|r| r["action"] == "request" && r["outcome"] == "approved" && r["actor"] == "principal:alice")
    };
    assert!(approved(&s.setup.audit()));

    pin_host_neighbour(&s.net);
    let started = Instant::now();
    let prefix = |n: u64| Ipv6Addr::new(0xfd00, 0x77, 0x1000 + (n % 3000) as u16, 0, 0, 0, 0, 2);
    let flood = Flood::start(&s.net.a, HOST_A6, 1500, prefix, |_| b"JITDKNK1garbage".to_vec());
    assert!(
        wait_for(Duration::from_secs(30), || flood.sent() > 9000),
        "the flood runs"
    );
    drop(flood);
    // the refusals of the flood's last interval are written
    std::thread::sleep(Duration::from_secs(5));
    let elapsed = started.elapsed().as_secs_f64();

    let records = all_records(&s.setup);
    let rotations = records.iter().filter(|r| r["action"] == "rotate").count();
    let files = std::fs::read_dir(s.setup.state_dir())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("audit.jsonl"))
        .count();
    assert!(
        approved(&records),
        "the live grant's approval is still on record ({rotations} rotate records, {files} files): {}",
        jitd.log_text()
    );
    assert!(
        files > 2,
        "the log rotated, keeping files beyond audit_keep = 1: {files}"
    );
    // unauthenticated refusals: at most 20 in full and 33 summaries an interval
    let knocks = records.iter().filter(|r| r["action"] == "knock").count();
    let intervals = (elapsed / 2.0).ceil() as usize + 2;
    assert!(
        knocks <= intervals * (20 + 33),
        "{knocks} knock records in {intervals} intervals"
    );
    let out = jitd.ctl(&["audit", "verify"]);
    assert!(out.status.success(), "audit verify: {}", text(&out));
    assert!(can_connect(&s.net.a, HOST_A4, 22), "the grant itself is untouched");
}

/// Signs and sends a knock by `key` asking for port 23 (not protected: the policy
/// refuses it) from `ns`.
fn refused_knock(ns: &str, ip: &str, key: &Key) {
    let ask = Ask {
        ports: vec![23],
        ..Ask::port22()
    };
    send(ns, ip, &packet(key, &ask));
}

/// Alice's key spends its refusal budget; bob's refusal is still recorded in full, and
/// the summary names alice's key, not anyone else's.
#[test]
fn one_keys_refusals_do_not_hide_another_keys() {
    let s = Scene::new("", "");
    let jitd = s
        .setup
        .start_with(&s.net.host, &[("JITD_REFUSAL_INTERVAL_MS", "20000")]);
    let denied = |actor: &str| {
        s.setup
            .audit()
            .into_iter()
            .filter(|r| r["action"] == "request" && r["outcome"] == "denied" && r["actor"] == actor)
            .count()
    };
    for i in 0..24 {
        // a paced drip, well within the per-source limits
        let (ns, ip) = if i % 2 == 0 {
            (&s.net.a, HOST_A4)
        } else {
            (&s.net.a, HOST_A6)
        };
        refused_knock(ns, ip, &s.alice);
        std::thread::sleep(Duration::from_millis(150));
    }
    assert!(
        wait_for(Duration::from_secs(10), || denied("principal:alice") >= 20),
        "alice's refusals: {}",
        jitd.log_text()
    );
    refused_knock(&s.net.b, HOST_B4, &s.bob);
    assert!(
        wait_for(Duration::from_secs(10), || denied("principal:bob") == 1),
        "bob's refusal is recorded in full: {:#?}",
        s.setup.audit()
    );
    let summary = wait_for(Duration::from_secs(40), || {
        s.setup.audit().iter().any(|r| r["outcome"] == "suppressed")
    });
    assert!(summary, "alice's summary is written");
    let summaries: Vec<Value> = s
        .setup
        .audit()
        .into_iter()
        .filter(|r| r["outcome"] == "suppressed")
        .collect();
    assert_eq!(summaries.len(), 1, "{summaries:#?}");
    assert_eq!(summaries[0]["actor"], "principal:alice");
    let reason = summaries[0]["reason"].as_str().unwrap();
    assert!(reason.contains("principal:alice (key SHA256:"), "{reason}");
    assert_eq!(denied("principal:alice"), 20, "20 in full, the rest counted");
}

/// A knock accepted under a 5-second window is a replay for as long as any window
/// could take it: a reload that widens the window to 10 minutes does not bring it back.
#[test]
fn a_captured_knock_is_a_replay_after_a_reload_widens_the_window() {
    let s = Scene::new("", "window = \"5s\"");
    let jitd = s.start();
    let captured = packet(&s.alice, &Ask::port22());
    send(&s.net.a, HOST_A4, &captured);
    assert!(opens(&s.net.a, HOST_A4), "{}", jitd.log_text());
    let id = jitd.grant_ids()[0].to_string();
    assert!(jitd.ctl(&["revoke", &id]).status.success());
    // past the old window, then widen it
    std::thread::sleep(Duration::from_secs(7));
    let policy = std::fs::read_to_string(s.setup.policy()).unwrap();
    std::fs::write(s.setup.policy(), policy.replace("window = \"5s\"", "window = \"10m\"")).unwrap();
    jitd.ctl_json(&["reload"]);
    // the listener takes the new policy within its tick; another knock is accepted
    // meanwhile (the nonce memory tidies up whenever it takes one)
    std::thread::sleep(Duration::from_secs(2));
    send(&s.net.a, HOST_A4, &packet(&s.bob, &Ask::port22()));
    assert!(opens(&s.net.a, HOST_A4), "bob's knock opens for a");
    send(&s.net.b, HOST_B4, &captured);
    assert!(
        refused_with(&s.setup, "replay", |r| r["source"] == B4),
        "the captured knock is a replay: {:#?}\n{}",
        knock_records(&s.setup),
        jitd.log_text()
    );
    assert!(!can_connect(&s.net.b, HOST_B4, 22), "nothing opened for b");
    assert_eq!(jitd.grant_ids().len(), 1, "bob's grant only");
}

/// `YYYYMMDDHHMM` of `t` as the wall clock of a zone `east` hours east of UTC shows it.
fn local_digits(t: chrono::DateTime<Utc>, east: i64) -> String {
    (t + TimeDelta::hours(east)).format("%Y%m%d%H%M").to_string()
}

/// Whether `ssh-keygen -Y verify`, in time zone `tz`, accepts `key`'s signature of
/// `message` for `principal` under `signers`.
fn ssh_keygen_accepts(dir: &Path, signers: &Path, tz: &str, key: &Key, principal: &str) -> bool {
    let message = "a message";
    let sig = dir.join(format!("{principal}.sig"));
    std::fs::write(&sig, key.sign(message, jitd::remote::NAMESPACE)).unwrap();
    let mut child = Command::new("ssh-keygen")
        .args(["-Y", "verify", "-n", jitd::remote::NAMESPACE, "-I", principal, "-f"])
        .arg(signers)
        .arg("-s")
        .arg(&sig)
        .env("TZ", tz)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(message.as_bytes()).unwrap();
    child.wait_with_output().unwrap().status.success()
}

/// In a zone nine hours east of UTC, `valid-before` an hour ago (local time, no `Z`)
/// has expired and `valid-after` an hour ago has begun, for ssh-keygen and for jitd.
#[test]
fn validity_without_z_is_local_time_as_ssh_keygen_reads_it() {
    let tz = "JST-9";
    let now = Utc::now();
    let net = Net::new();
    serve_echo(&net.host, 22);
    let dir = tempfile::tempdir().unwrap();
    let alice = Key::new(dir.path(), "alice", &["-t", "ed25519"]);
    let bob = Key::new(dir.path(), "bob", &["-t", "ed25519"]);
    let hour_ago = local_digits(now - TimeDelta::hours(1), 9);
    let signers = format!(
        "alice valid-before=\"{hour_ago}\" {}\nbob valid-after=\"{hour_ago}\" {}\n",
        alice.public, bob.public
    );
    let file = dir.path().join("allowed_signers");
    std::fs::write(&file, &signers).unwrap();
    assert!(
        !ssh_keygen_accepts(dir.path(), &file, tz, &alice, "alice"),
        "expired for ssh-keygen"
    );
    assert!(
        ssh_keygen_accepts(dir.path(), &file, tz, &bob, "bob"),
        "valid for ssh-keygen"
    );

    let setup = crate::knock::knock_setup(&signers, "");
    let jitd = setup.start_with(&net.host, &[("TZ", tz)]);
    send(&net.a, HOST_A4, &packet(&alice, &Ask::port22()));
    assert!(
        refused_with(&setup, "unknown_key", |_| true),
        "alice's expired key is refused: {:#?}\n{}",
        knock_records(&setup),
        jitd.log_text()
    );
    assert!(!can_connect(&net.a, HOST_A4, 22), "nothing opened for alice");
    send(&net.b, HOST_B4, &packet(&bob, &Ask::port22()));
    assert!(
        opens(&net.b, HOST_B4),
        "bob's key is valid: {:#?}",
        knock_records(&setup)
    );
}
