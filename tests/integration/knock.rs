//! Remote knocks: one UDP packet, signed by the requester's SSH key with the real
//! `ssh-keygen -Y sign`, opens a port for the address it came from. Proven by
//! connecting from client namespaces; replays, strangers, other hosts, stale times and
//! floods open nothing, and nothing ever answers.

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use jitd::remote::packet;
use jitd::remote::request::{KnockRequest, Length};
use serde_json::Value;

use crate::util::*;

/// The knock port of these tests.
pub const KNOCK_PORT: u16 = 62222;
/// What the knocks call the host.
pub const HOST_NAME: &str = "web1.test";

/// An SSH key made by `ssh-keygen` for one test.
pub struct Key {
    /// The private key file (no passphrase).
    pub path: PathBuf,
    /// The public key line.
    pub public: String,
}

impl Key {
    /// Makes a key of `kind` (`ssh-keygen -t`) named `name` in `dir`.
    pub fn new(dir: &Path, name: &str, kind: &[&str]) -> Key {
        let path = dir.join(name);
        let out = Command::new("ssh-keygen")
            .args(kind)
            .args(["-q", "-N", "", "-C", name, "-f"])
            .arg(&path)
            .output()
            .expect("run ssh-keygen");
        assert!(out.status.success(), "ssh-keygen: {}", text(&out));
        let public = std::fs::read_to_string(path.with_extension("pub"))
            .or_else(|_| std::fs::read_to_string(format!("{}.pub", path.display())))
            .unwrap();
        Key {
            path,
            public: public.trim().to_string(),
        }
    }

    /// Signs `message` as `ssh-keygen -Y sign -n NAMESPACE` does; the armoured SSHSIG.
    pub fn sign(&self, message: &str, namespace: &str) -> String {
        let mut child = Command::new("ssh-keygen")
            .args(["-Y", "sign", "-n", namespace, "-f"])
            .arg(&self.path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run ssh-keygen -Y sign");
        use std::io::Write;
        child.stdin.take().unwrap().write_all(message.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "ssh-keygen -Y sign: {}", text(&out));
        String::from_utf8(out.stdout).unwrap()
    }
}

/// What a knock asks, before it is signed.
#[derive(Clone)]
pub struct Ask {
    /// The `host` line.
    pub host: String,
    /// Ports.
    pub ports: Vec<u16>,
    /// Seconds.
    pub secs: u64,
    /// A signed source.
    pub source: Option<&'static str>,
    /// The signing time.
    pub time: DateTime<Utc>,
}

impl Ask {
    /// Port 22 for 10 minutes, for [`HOST_NAME`], signed now.
    pub fn port22() -> Ask {
        Ask {
            host: HOST_NAME.into(),
            ports: vec![22],
            secs: 600,
            source: None,
            time: Utc::now(),
        }
    }
}

static NONCES: AtomicU64 = AtomicU64::new(0);

/// A fresh nonce (unique within the test run).
fn nonce() -> [u8; 16] {
    let mut n = [0u8; 16];
    let t = Utc::now().timestamp_nanos_opt().unwrap_or(0) as u64;
    n[..8].copy_from_slice(&t.to_be_bytes());
    n[8..12].copy_from_slice(&std::process::id().to_be_bytes());
    n[12..].copy_from_slice(&(NONCES.fetch_add(1, Ordering::SeqCst) as u32).to_be_bytes());
    n
}

/// A knock packet for `ask`, signed by `key` in `namespace`.
pub fn packet_in(key: &Key, ask: &Ask, namespace: &str) -> Vec<u8> {
    let request = KnockRequest {
        host: ask.host.clone(),
        ports: ask.ports.clone(),
        length: Length::Duration(ask.secs),
        source: ask.source.map(|s| jitd::domain::parse_prefix(s).unwrap()),
        justification: Some("INC-1234".into()),
        time: DateTime::from_timestamp(ask.time.timestamp(), 0).unwrap(),
        nonce: nonce(),
    }
    .encode();
    packet::frame(&request, &key.sign(&request, namespace)).unwrap()
}

/// A knock packet for `ask` signed by `key` for knocks.
pub fn packet(key: &Key, ask: &Ask) -> Vec<u8> {
    packet_in(key, ask, jitd::remote::NAMESPACE)
}

/// Sends `packet` from namespace `ns` to `ip`'s knock port; whether anything came back
/// within a moment (data, or an ICMP error surfacing as a refused connection).
pub fn send(ns: &str, ip: &str, packet: &[u8]) -> bool {
    let target = SocketAddr::new(ip.parse().unwrap(), KNOCK_PORT);
    let socket = in_ns(ns, || {
        let any = if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
        UdpSocket::bind(any).unwrap()
    });
    socket.connect(target).unwrap();
    socket.send(packet).unwrap();
    socket.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let mut buf = [0u8; 64];
    !matches!(socket.recv(&mut buf), Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut))
}

/// A policy taking knocks with `signers` (allowed_signers lines), plus `extra` TOML.
pub fn knock_setup(signers: &str, extra: &str) -> Setup {
    let setup = Setup::new("");
    let file = setup.dir.path().join("allowed_signers");
    std::fs::write(&file, signers).unwrap();
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    setup.write_policy(&format!(
        r#"
[[ports]]
port = 22
allowed_sources = ["10.77.0.0/16", "fd00:77::/32"]
[access]
requesters = ["principal:alice", "principal:bob"]
viewers = ["uid:65534"]
[remote]
listen = "[::]:{KNOCK_PORT}"
names = ["{HOST_NAME}"]
allowed_signers = "{}"
{extra}
"#,
        file.display()
    ));
    setup
}

/// Keys for alice (ed25519), bob (ECDSA) and carol (ed25519, no role), and the
/// allowed_signers lines for all three.
pub fn keys(dir: &Path) -> (Key, Key, Key, String) {
    let alice = Key::new(dir, "alice", &["-t", "ed25519"]);
    let bob = Key::new(dir, "bob", &["-t", "ecdsa", "-b", "256"]);
    let carol = Key::new(dir, "carol", &["-t", "ed25519"]);
    let signers = format!(
        "alice {}\nbob namespaces=\"knock@jitd\" {}\ncarol {}\n",
        alice.public, bob.public, carol.public
    );
    (alice, bob, carol, signers)
}

/// The `knock` records of the current audit file.
pub fn knock_records(setup: &Setup) -> Vec<Value> {
    setup.audit().into_iter().filter(|r| r["action"] == "knock").collect()
}

/// Whether port 22 opens for `ns` within a generous deadline.
pub fn opens(ns: &str, ip: &str) -> bool {
    wait_for(Duration::from_secs(10), || can_connect(ns, ip, 22))
}

/// Whether, within a generous deadline, a knock was refused with `code` and the
/// record also satisfies `and`.
pub fn refused_with(setup: &Setup, code: &str, and: impl Fn(&Value) -> bool) -> bool {
    wait_for(Duration::from_secs(10), || {
        knock_records(setup)
            .iter()
            .any(|r| r["reason"].as_str().unwrap_or("").starts_with(&format!("{code}:")) && and(r))
    })
}

/// The namespaces, an echo server on the host's port 22, the keys of [`keys`] and a
/// policy taking knocks signed by them (`more_signers` added), with `extra` in `[remote]`.
/// Fields drop in order: the policy's directory, the keys, then the namespaces.
pub struct Scene {
    pub setup: Setup,
    pub alice: Key,
    pub bob: Key,
    pub carol: Key,
    pub signers: String,
    pub keydir: tempfile::TempDir,
    pub net: Net,
}

impl Scene {
    /// See the type's documentation.
    pub fn new(more_signers: &str, extra: &str) -> Scene {
        let net = Net::new();
        serve_echo(&net.host, 22);
        let keydir = tempfile::tempdir().unwrap();
        let (alice, bob, carol, signers) = keys(keydir.path());
        let setup = knock_setup(&format!("{signers}{more_signers}"), extra);
        Scene {
            setup,
            alice,
            bob,
            carol,
            signers,
            keydir,
            net,
        }
    }

    /// Starts jitd in the host namespace.
    pub fn start(&self) -> Jitd {
        self.setup.start(&self.net.host)
    }
}

#[test]
fn a_signed_knock_opens_the_port_for_the_address_it_came_from() {
    let rsa_dir = tempfile::tempdir().unwrap();
    let rsa = Key::new(rsa_dir.path(), "bob-rsa", &["-t", "rsa", "-b", "3072"]);
    let s = Scene::new(&format!("bob {}\n", rsa.public), "");
    let jitd = s.start();
    assert!(!can_connect(&s.net.a, HOST_A4, 22), "locked before the knock");

    assert!(
        !send(&s.net.a, HOST_A4, &packet(&s.alice, &Ask::port22())),
        "a knock is never answered"
    );
    assert!(
        opens(&s.net.a, HOST_A4),
        "alice's knock opens 22 for a: {}",
        jitd.log_text()
    );
    assert!(!can_connect(&s.net.b, HOST_B4, 22), "not for b");

    // s.bob's ECDSA key, over IPv6, from b
    let host_b6 = "fd00:77:2::1";
    assert!(!can_connect(&s.net.b, host_b6, 22));
    send(&s.net.b, host_b6, &packet(&s.bob, &Ask::port22()));
    assert!(opens(&s.net.b, host_b6), "bob's knock opens 22 for b over IPv6");
    // s.bob's RSA key, over IPv4, from b
    assert!(!can_connect(&s.net.b, HOST_B4, 22));
    send(&s.net.b, HOST_B4, &packet(&rsa, &Ask::port22()));
    assert!(opens(&s.net.b, HOST_B4), "bob's RSA knock opens 22 for b over IPv4");

    let approved: Vec<Value> = s
        .setup
        .audit()
        .into_iter()
        .filter(|r| r["action"] == "request" && r["outcome"] == "approved")
        .collect();
    assert_eq!(approved.len(), 3, "{approved:?}");
    assert_eq!(approved[0]["actor"], "principal:alice");
    assert_eq!(approved[0]["principals"], serde_json::json!(["alice"]));
    assert_eq!(approved[0]["source"], A4);
    assert!(approved[0]["key"].as_str().unwrap().starts_with("SHA256:"));
    assert!(approved[0]["peer"].as_str().unwrap().starts_with("10.77.1.2:"));
    assert_eq!(approved[0]["nonce"].as_str().unwrap().len(), 32);
    assert!(
        approved[0].get("actor_uid").is_none_or(Value::is_null),
        "a knock has no uid"
    );
    assert_eq!(approved[1]["source"], B6);
    let status = jitd.ctl_json(&["status"]);
    assert_eq!(status["grants"].as_array().unwrap().len(), 3);
}

#[test]
fn replays_strangers_other_hosts_and_stale_knocks_open_nothing() {
    let s = Scene::new("", "");
    let mallory = Key::new(s.keydir.path(), "mallory", &["-t", "ed25519"]);
    // refusals beyond the first few per source are summarised after this interval
    let jitd = s.setup.start_with(&s.net.host, &[("JITD_REFUSAL_INTERVAL_MS", "2000")]);
    let host_b4 = HOST_B4;

    let first = packet(&s.alice, &Ask::port22());
    send(&s.net.a, HOST_A4, &first);
    assert!(opens(&s.net.a, HOST_A4));
    // the same packet again, from b (captured and re-sent) and from a after a revoke
    assert!(!send(&s.net.b, host_b4, &first));
    let id = jitd.grant_ids()[0].to_string();
    assert!(jitd.ctl(&["revoke", &id]).status.success());
    assert!(!send(&s.net.a, HOST_A4, &first));
    let mut refused = vec![
        // for another host
        packet(
            &s.alice,
            &Ask {
                host: "web2.test".into(),
                ..Ask::port22()
            },
        ),
        // signed two minutes ago, and two minutes ahead
        packet(
            &s.alice,
            &Ask {
                time: Utc::now() - chrono::TimeDelta::seconds(120),
                ..Ask::port22()
            },
        ),
        packet(
            &s.alice,
            &Ask {
                time: Utc::now() + chrono::TimeDelta::seconds(120),
                ..Ask::port22()
            },
        ),
        // a key not in allowed_signers
        packet(&mallory, &Ask::port22()),
        // s.alice's key, signing for git
        packet_in(&s.alice, &Ask::port22(), "git"),
        // s.carol's key is allowed to sign, but s.carol holds no role
        packet(&s.carol, &Ask::port22()),
    ];
    // a changed byte in the signed request (the duration)
    let mut changed = packet(&s.alice, &Ask::port22());
    let at = changed.windows(4).position(|w| w == b"600\n").unwrap();
    changed[at] = b'9';
    refused.push(changed);
    refused.push(b"garbage".to_vec());
    for p in &refused {
        assert!(!send(&s.net.a, HOST_A4, p), "never answered");
        assert!(!send(&s.net.b, host_b4, p), "never answered");
    }
    std::thread::sleep(Duration::from_secs(1));
    assert!(!can_connect(&s.net.a, HOST_A4, 22), "nothing reopened a");
    assert!(!can_connect(&s.net.b, host_b4, 22), "nothing opened b");

    // each refusal is on record: in full, or counted in its source's summary
    let ok = wait_for(Duration::from_secs(15), || {
        let records = knock_records(&s.setup);
        let text: Vec<&str> = records.iter().map(|r| r["reason"].as_str().unwrap()).collect();
        [
            "replay",
            "other_host",
            "outside_window",
            "unknown_key",
            "bad_signature",
            "malformed",
        ]
        .iter()
        .all(|c| {
            text.iter()
                .any(|x| x.starts_with(&format!("{c}:")) || x.contains(&format!("{c} x")))
        })
    });
    assert!(ok, "each refusal audited: {:#?}", knock_records(&s.setup));
    let carol_denied = s
        .setup
        .audit()
        .into_iter()
        .any(|r| r["action"] == "request" && r["outcome"] == "denied" && r["actor"] == "principal:carol");
    assert!(carol_denied, "carol's knock reached the policy and was denied");
    let from_b = |r: &Value| r["source"] == B4 && r["peer"].as_str().unwrap().starts_with("10.77.2.2:");
    assert!(
        refused_with(&s.setup, "replay", from_b),
        "the replay from b is audited with b's address"
    );
    assert_eq!(jitd.grant_ids().len(), 0);
}

#[test]
fn a_knock_accepted_before_a_crash_is_still_a_replay_after_it() {
    let s = Scene::new("", "");
    let jitd = s.start();
    let knock = packet(&s.alice, &Ask::port22());
    send(&s.net.a, HOST_A4, &knock);
    assert!(opens(&s.net.a, HOST_A4));
    jitd.kill();
    let jitd = s.start();
    assert!(can_connect(&s.net.a, HOST_A4, 22), "the knock's grant was restored");
    assert_eq!(jitd.grant_ids().len(), 1, "{}", jitd.log_text());
    let host_b4 = HOST_B4;
    send(&s.net.b, host_b4, &knock);
    let audited = refused_with(&s.setup, "replay", |r| r["source"] == B4);
    assert!(
        audited,
        "the replay after the restart is refused: {:#?}",
        knock_records(&s.setup)
    );
    assert!(!can_connect(&s.net.b, host_b4, 22));
}

#[test]
fn a_host_that_requires_a_signed_source_opens_only_for_it() {
    let s = Scene::new("", "require_source = true");
    let jitd = s.start();
    let host_b4 = HOST_B4;
    send(&s.net.a, HOST_A4, &packet(&s.alice, &Ask::port22()));
    let refused = refused_with(&s.setup, "source_required", |r| r["actor"] == "principal:alice");
    assert!(refused, "{}", jitd.log_text());
    assert!(!can_connect(&s.net.a, HOST_A4, 22));
    // sent from a, signed for b: opens for b only
    let ask = Ask {
        source: Some(B4),
        ..Ask::port22()
    };
    send(&s.net.a, HOST_A4, &packet(&s.alice, &ask));
    assert!(opens(&s.net.b, host_b4));
    assert!(!can_connect(&s.net.a, HOST_A4, 22));
}

#[test]
fn a_flood_of_garbage_and_strangers_does_not_stop_a_real_knock() {
    let s = Scene::new("", "");
    let mallory = Key::new(s.keydir.path(), "mallory", &["-t", "ed25519"]);
    let jitd = s.start();
    let stranger = packet(&mallory, &Ask::port22());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flooder = {
        let (ns, stop) = (s.net.b.clone(), stop.clone());
        std::thread::spawn(move || {
            let socket = in_ns(&ns, || UdpSocket::bind("0.0.0.0:0").unwrap());
            let target: SocketAddr = format!("10.77.2.1:{KNOCK_PORT}").parse().unwrap();
            let mut sent = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let _ = socket.send_to(b"JITDKNK1garbage", target);
                let _ = socket.send_to(&stranger, target);
                sent += 2;
            }
            sent
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    send(&s.net.a, HOST_A4, &packet(&s.alice, &Ask::port22()));
    let opened = opens(&s.net.a, HOST_A4);
    stop.store(true, Ordering::SeqCst);
    let sent = flooder.join().unwrap();
    assert!(
        opened,
        "the real knock opened during a flood of {sent} packets: {}",
        jitd.log_text()
    );
    // the socket path kept working and the audit log stayed small
    assert!(jitd.ctl(&["status"]).status.success());
    let records = knock_records(&s.setup).len();
    assert!(records < 200, "{records} knock records for {sent} flood packets");
    assert!(sent > 1000, "the flood was a flood: {sent}");
    // most of it was dropped by the kernel's per-source meter, before jitd's socket
    let ruleset = s.net.ruleset();
    let meter = ruleset
        .lines()
        .find(|l| l.contains("meter knock4"))
        .expect("the knock meter rule");
    let dropped: u64 = meter
        .split("counter packets ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(dropped > sent / 2, "the kernel dropped {dropped} of {sent}: {meter}");
    // the meter's entries are the kernel's business, not drift of jitd's table
    let repairs = s.setup.audit().into_iter().filter(|r| r["action"] == "repair").count();
    assert_eq!(repairs, 0, "{}", jitd.log_text());
}

#[test]
fn an_allowed_signers_file_others_can_write_is_refused() {
    let net = Net::new();
    let keydir = tempfile::tempdir().unwrap();
    let (_, _, _, signers) = keys(keydir.path());
    let setup = knock_setup(&signers, "");
    let file = setup.dir.path().join("allowed_signers");
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o664)).unwrap();
    let out = setup.run_jitd(&net.host, &["--check-config"]);
    assert!(!out.status.success());
    let err = text(&out);
    assert!(
        err.contains("remote.allowed_signers") && err.contains("writable by group or others"),
        "{err}"
    );
}

/// A client namespace behind client `a`, which routes and masquerades for it: the host
/// sees its packets come from a's address. Removed on drop.
struct BehindNat {
    ns: String,
}

impl BehindNat {
    /// `ns` behind `router` (a namespace of `net` whose host-facing interface is `c0`).
    fn new(router: &str) -> BehindNat {
        let ns = format!("{router}-nat");
        let run = |args: &[&str]| {
            let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
            assert!(out.status.success(), "{args:?}: {}", text(&out));
        };
        run(&["ip", "netns", "add", &ns]);
        let nat = BehindNat { ns: ns.clone() };
        run(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        run(&[
            "ip", "-n", router, "link", "add", "r-c", "type", "veth", "peer", "name", "n0", "netns", &ns,
        ]);
        run(&["ip", "-n", router, "addr", "add", "10.88.0.1/24", "dev", "r-c"]);
        run(&["ip", "-n", router, "link", "set", "r-c", "up"]);
        run(&["ip", "-n", &ns, "addr", "add", "10.88.0.2/24", "dev", "n0"]);
        run(&["ip", "-n", &ns, "link", "set", "n0", "up"]);
        run(&["ip", "-n", &ns, "route", "add", "default", "via", "10.88.0.1"]);
        run(&["ip", "netns", "exec", router, "sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        for rule in [
            "add table ip nat",
            "add chain ip nat post { type nat hook postrouting priority 100 ; }",
            "add rule ip nat post oifname c0 masquerade",
        ] {
            run(&["ip", "netns", "exec", router, "nft", rule]);
        }
        nat
    }
}

impl Drop for BehindNat {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

#[test]
fn jitctl_knock_from_behind_nat_opens_the_port_for_the_routers_address() {
    let s = Scene::new("", "");
    let jitd = s.start();
    let nat = BehindNat::new(&s.net.a);
    assert!(!can_connect(&nat.ns, HOST_A4, 22), "locked before the knock");

    let mut cmd = Command::new("ip");
    cmd.args([
        "netns",
        "exec",
        &nat.ns,
        env!("CARGO_BIN_EXE_jitctl"),
        "--json",
        "knock",
        HOST_A4,
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
    .arg(&s.alice.path)
    .env("HOME", s.keydir.path())
    .env_remove("XDG_CONFIG_HOME")
    .env_remove("SSH_AUTH_SOCK")
    .stdin(Stdio::null());
    let out = output_within(cmd, Duration::from_secs(60));
    assert!(
        out.status.success(),
        "jitctl knock: {}\n{}",
        text(&out),
        jitd.log_text()
    );
    let reply: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reply["opened"], true, "{reply}");

    // the grant is for the router's address: the client connects through it
    assert!(can_connect(&nat.ns, HOST_A4, 22));
    let approved = s
        .setup
        .audit()
        .into_iter()
        .find(|r| r["action"] == "request" && r["outcome"] == "approved")
        .expect("an approval");
    assert_eq!(approved["source"], A4, "the router's address");
    assert_eq!(approved["justification"], "INC-1234");
    assert_eq!(
        approved["key"], reply["key_fingerprint"],
        "jitctl names the key the host audits"
    );
    assert!(!can_connect(&s.net.b, HOST_B4, 22), "and for nobody else");
}

#[test]
fn a_reload_applies_new_signers_and_ends_grants_of_principals_that_lost_their_role() {
    let s = Scene::new("", "");
    let jitd = s.start();
    send(&s.net.a, HOST_A4, &packet(&s.alice, &Ask::port22()));
    assert!(opens(&s.net.a, HOST_A4));

    // s.bob's key leaves allowed_signers; s.alice's principal leaves [access]
    let file = s.setup.dir.path().join("allowed_signers");
    let without_bob: String = s
        .signers
        .lines()
        .filter(|l| !l.starts_with("bob "))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&file, without_bob).unwrap();
    let policy = std::fs::read_to_string(s.setup.policy()).unwrap();
    std::fs::write(s.setup.policy(), policy.replace("\"principal:alice\", ", "")).unwrap();
    let reload = jitd.ctl_json(&["reload"]);
    assert_eq!(reload["ended"].as_array().unwrap().len(), 1, "{reload}");
    assert!(!can_connect(&s.net.a, HOST_A4, 22), "alice's grant ended with her role");
    let ended = s
        .setup
        .audit()
        .into_iter()
        .find(|r| r["action"] == "reload" && r["outcome"] == "revoked")
        .expect("the ended grant is audited");
    assert!(
        ended["reason"].as_str().unwrap().contains("principals alice"),
        "{ended}"
    );

    // within a moment s.bob's knocks are from an unknown key
    let refused = wait_for(Duration::from_secs(10), || {
        send(&s.net.b, HOST_B4, &packet(&s.bob, &Ask::port22()));
        let records = knock_records(&s.setup);
        records
            .iter()
            .any(|r| r["reason"].as_str().unwrap().starts_with("unknown_key:"))
    });
    assert!(refused, "{:#?}", knock_records(&s.setup));
    assert!(!can_connect(&s.net.b, HOST_B4, 22));
}

/// Runs the real `jitctl knock` in `ns` with `args`, signing through `agent`.
fn jitctl_knock(ns: &str, home: &Path, agent: &crate::knock_client::Agent, args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_jitctl"), "--json", "knock"])
        .args(args)
        .env("HOME", home)
        .env("SSH_AUTH_SOCK", &agent.socket)
        .env_remove("XDG_CONFIG_HOME")
        .stdin(Stdio::null());
    output_within(cmd, Duration::from_secs(60))
}

#[test]
fn a_certificate_from_the_teams_ca_opens_for_its_principal_and_not_when_expired() {
    let net = Net::new();
    serve_echo(&net.host, 22);
    let dir = tempfile::tempdir().unwrap();
    let ca = Key::new(dir.path(), "ca", &["-t", "ed25519"]);
    let dave = Key::new(dir.path(), "dave", &["-t", "ed25519"]);
    let certify = |name: &str, principal: &str, validity: &str| -> PathBuf {
        // ssh-keygen -s writes KEY-cert.pub beside the key's public half
        let public = dir.path().join(format!("{name}.pub"));
        std::fs::copy(format!("{}.pub", dave.path.display()), &public).unwrap();
        let out = Command::new("ssh-keygen")
            .args(["-q", "-s"])
            .arg(&ca.path)
            .args(["-I", &format!("{name}@laptop"), "-n", principal, "-V", validity])
            .arg(&public)
            .output()
            .unwrap();
        assert!(out.status.success(), "ssh-keygen -s: {}", text(&out));
        dir.path().join(format!("{name}-cert.pub"))
    };
    let valid = certify("valid", "alice", "-5m:+1h");
    let expired = certify("expired", "alice", "-2h:-1h");
    let stranger = certify("stranger", "mallory", "-5m:+1h");
    // the team CA vouches for alice and bob; dave's own key is in no line
    let setup = knock_setup(&format!("alice,bob cert-authority {}\n", ca.public), "");
    let jitd = setup.start(&net.host);
    let agent = crate::knock_client::Agent::start(dir.path());
    for cert in [&valid, &expired, &stranger] {
        // ssh-add loads KEY-cert.pub beside KEY: the agent signs as the certificate
        std::fs::copy(cert, format!("{}-cert.pub", dave.path.display())).unwrap();
        agent.add(&dave.path);
    }

    for (cert, what) in [
        (&expired, "an expired certificate"),
        (&stranger, "a principal the CA line does not allow"),
    ] {
        let args = [
            "10.77.1.1",
            "--port",
            "22",
            "--duration",
            "10m",
            "--wait-timeout",
            "2s",
            "--key",
        ];
        let mut all = args.to_vec();
        all.push(cert.to_str().unwrap());
        let out = jitctl_knock(&net.a, dir.path(), &agent, &all);
        assert_eq!(out.status.code(), Some(1), "{what}: {}", text(&out));
    }
    assert!(!can_connect(&net.a, HOST_A4, 22));
    let codes: Vec<String> = knock_records(&setup)
        .iter()
        .map(|r| r["reason"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(codes.len(), 2, "{codes:?}");
    assert!(codes.iter().all(|c| c.starts_with("bad_certificate")), "{codes:?}");

    let out = jitctl_knock(
        &net.a,
        dir.path(),
        &agent,
        &[
            "10.77.1.1",
            "--port",
            "22",
            "--duration",
            "10m",
            "--key",
            valid.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}\n{}", text(&out), jitd.log_text());
    assert!(can_connect(&net.a, HOST_A4, 22));
    let approved = setup
        .audit()
        .into_iter()
        .find(|r| r["action"] == "request" && r["outcome"] == "approved")
        .unwrap();
    assert_eq!(approved["actor"], "principal:alice");
    let cert = approved["certificate"].as_str().unwrap();
    assert!(
        cert.starts_with("key id \"valid@laptop\" serial 0 from CA SHA256:"),
        "{cert}"
    );
}
