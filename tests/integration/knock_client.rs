//! `jitctl knock`, the client, with the real OpenSSH tools: keys made by `ssh-keygen`,
//! held by a real `ssh-agent`, signatures made through it; the datagram jitctl sends is
//! received here and checked with jitd's own packet checks against an
//! `allowed_signers` made from the key. Then the wait: a port behind a real nftables
//! drop rule that the test lifts (standing in for the host's jitd), in namespaces.

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use chrono::{TimeDelta, Utc};
use jitd::remote::packet::{self, Verified};
use jitd::remote::request::Length;
use jitd::remote::signers;

use crate::util::*;

/// A real `ssh-agent` on a socket in a temporary directory; killed when dropped, so a
/// failing test leaves none behind.
pub struct Agent {
    child: Child,
    /// Its socket (`SSH_AUTH_SOCK`).
    pub socket: PathBuf,
}

impl Agent {
    /// Starts an agent with its socket in `dir`.
    pub fn start(dir: &Path) -> Agent {
        let socket = dir.join("agent.sock");
        let child = Command::new("ssh-agent")
            .arg("-D")
            .arg("-a")
            .arg(&socket)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("ssh-agent (openssh-client) is installed");
        let agent = Agent { child, socket };
        assert!(
            wait_for(Duration::from_secs(10), || agent.socket.exists()),
            "ssh-agent made no socket"
        );
        agent
    }

    /// `ssh-add KEY`.
    pub fn add(&self, key: &Path) {
        let out = Command::new("ssh-add")
            .arg(key)
            .env("SSH_AUTH_SOCK", &self.socket)
            .output()
            .unwrap();
        assert!(out.status.success(), "ssh-add: {}", text(&out));
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fresh key pair without a passphrase: `dir/NAME` and `dir/NAME.pub`.
fn keygen(dir: &Path, name: &str, kind: &str) -> PathBuf {
    let key = dir.join(name);
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", kind, "-N", "", "-C", name, "-f"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success(), "ssh-keygen -t {kind}: {}", text(&out));
    key
}

fn public(key: &Path) -> PathBuf {
    PathBuf::from(format!("{}.pub", key.display()))
}

/// `ssh-keygen -l`'s SHA-256 fingerprint of a public key.
fn fingerprint(key: &Path) -> String {
    let out = Command::new("ssh-keygen")
        .arg("-l")
        .arg("-f")
        .arg(public(key))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_string()
}

/// An allowed_signers line: `PRINCIPAL KEY`.
fn signer_line(principal: &str, key: &Path) -> String {
    let line = std::fs::read_to_string(public(key)).unwrap();
    let mut fields = line.split_whitespace();
    format!("{principal} {} {}\n", fields.next().unwrap(), fields.next().unwrap())
}

/// A UDP socket standing in for jitd's knock port.
fn knock_port() -> (UdpSocket, u16) {
    knock_port_at("127.0.0.1")
}

fn knock_port_at(ip: &str) -> (UdpSocket, u16) {
    let socket = UdpSocket::bind((ip, 0)).unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let port = socket.local_addr().unwrap().port();
    (socket, port)
}

fn receive(socket: &UdpSocket) -> Vec<u8> {
    let mut buf = [0u8; 2048];
    let (n, _) = socket.recv_from(&mut buf).expect("a knock arrives");
    buf[..n].to_vec()
}

/// The packet checked by jitd's checks, for a host called 127.0.0.1, against `signers`.
fn verified(packet: &[u8], signers_text: &str) -> Verified {
    verified_for("127.0.0.1", packet, signers_text)
}

fn verified_for(host: &str, packet: &[u8], signers_text: &str) -> Verified {
    let signers = signers::parse(signers_text).unwrap();
    packet::check(packet, &signers, &[host.into()], Utc::now(), TimeDelta::seconds(30))
        .unwrap_or_else(|e| panic!("jitd refuses the knock: {e:?}"))
}

/// Runs jitctl knock with a clean environment: HOME an empty directory (no ~/.ssh keys,
/// no hosts file of the machine running the tests), ssh-agent only when given.
fn knock(home: &Path, agent: Option<&Agent>, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_jitctl"));
    cmd.arg("knock")
        .args(args)
        .env("HOME", home)
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("SSH_AUTH_SOCK")
        .stdin(Stdio::null());
    if let Some(agent) = agent {
        cmd.env("SSH_AUTH_SOCK", &agent.socket);
    }
    output_within(cmd, Duration::from_secs(60))
}

fn json(out: &Output) -> serde_json::Value {
    assert!(out.status.success(), "{}", text(out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(out)))
}

#[test]
fn knocks_signed_through_ssh_agent_verify_for_ed25519_ecdsa_and_rsa() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path());
    let (socket, port) = knock_port();
    for kind in ["ed25519", "ecdsa", "rsa"] {
        let key = keygen(dir.path(), &format!("id_{kind}"), kind);
        agent.add(&key);
        // only the agent can sign now: the private key file is gone
        std::fs::remove_file(&key).unwrap();
        let target = format!("127.0.0.1:{port}");
        let pubkey = public(&key);
        let args = [
            target.as_str(),
            "--key",
            pubkey.to_str().unwrap(),
            "--port",
            "3389",
            "-p",
            "22",
            "--duration",
            "1h",
            "--justification",
            "INC-1234",
            "--no-wait",
            "--json",
        ];
        let report = json(&knock(dir.path(), Some(&agent), &args));
        let v = verified(&receive(&socket), &signer_line(kind, &key));
        assert_eq!(v.principals, [kind]);
        assert_eq!(v.fingerprint, fingerprint(&key), "{kind}");
        assert_eq!(report["key_fingerprint"], v.fingerprint.as_str());
        assert_eq!(v.request.host, "127.0.0.1");
        assert_eq!(v.request.ports, [22, 3389]);
        assert_eq!(v.request.length, Length::Duration(3600));
        assert_eq!(v.request.source, None);
        assert_eq!(v.request.justification.as_deref(), Some("INC-1234"));
        let nonce: String = v.request.nonce.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(report["nonce"], nonce.as_str());
        assert_eq!(report["knock_address"], target.as_str());
        assert!((Utc::now() - v.request.time).abs() < TimeDelta::seconds(30));
    }
}

#[test]
fn jitctl_signs_through_the_agent_itself_for_ed25519_ecdsa_and_rsa() {
    // no --key: the agent's key, signed by talking to the agent; with no ssh-keygen or
    // ssh-add on PATH, so no process is started. RSA comes back as rsa-sha2-512.
    let dir = tempfile::tempdir().unwrap();
    let (socket, port) = knock_port();
    for kind in ["ed25519", "ecdsa", "rsa"] {
        let agent_dir = dir.path().join(kind);
        std::fs::create_dir(&agent_dir).unwrap();
        let agent = Agent::start(&agent_dir);
        let key = keygen(dir.path(), &format!("in_{kind}"), kind);
        agent.add(&key);
        std::fs::remove_file(&key).unwrap();
        let target = format!("127.0.0.1:{port}");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_jitctl"));
        cmd.args(["--json", "knock", &target, "-p", "22", "-d", "1h", "--no-wait"])
            .env("HOME", dir.path())
            .env("PATH", "/nonexistent")
            .env("SSH_AUTH_SOCK", &agent.socket)
            .env_remove("XDG_CONFIG_HOME")
            .stdin(Stdio::null());
        let report = json(&output_within(cmd, Duration::from_secs(60)));
        let v = verified(&receive(&socket), &signer_line(kind, &key));
        assert_eq!(v.fingerprint, fingerprint(&key), "{kind}");
        assert_eq!(report["key_fingerprint"], v.fingerprint.as_str());
    }
}

#[test]
fn without_key_the_agents_first_key_signs_and_each_knock_has_its_own_nonce() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path());
    let key = keygen(dir.path(), "laptop", "ed25519");
    agent.add(&key);
    std::fs::remove_file(&key).unwrap();
    let (socket, port) = knock_port();
    let target = format!("127.0.0.1:{port}");
    let args = [
        target.as_str(),
        "-p",
        "22",
        "-d",
        "30m",
        "-s",
        "198.51.100.7",
        "--no-wait",
    ];
    let mut nonces = Vec::new();
    for _ in 0..2 {
        let out = knock(dir.path(), Some(&agent), &args);
        assert!(out.status.success(), "{}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("ssh-agent: laptop"),
            "{}",
            text(&out)
        );
        let v = verified(&receive(&socket), &signer_line("alice", &key));
        assert_eq!(v.request.source.map(|s| s.to_string()), Some("198.51.100.7/32".into()));
        assert_eq!(v.request.length, Length::Duration(1800));
        nonces.push(v.request.nonce);
    }
    assert_ne!(nonces[0], nonces[1]);
}

#[test]
fn a_key_file_signs_without_an_agent_and_the_default_files_are_found() {
    let home = tempfile::tempdir().unwrap();
    let ssh = home.path().join(".ssh");
    std::fs::create_dir(&ssh).unwrap();
    let (socket, port) = knock_port();
    let target = format!("127.0.0.1:{port}");
    let other = keygen(home.path(), "elsewhere", "ed25519");
    let args = [
        target.as_str(),
        "--key",
        other.to_str().unwrap(),
        "-p",
        "22",
        "-d",
        "1h",
        "--no-wait",
    ];
    let out = knock(home.path(), None, &args);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        verified(&receive(&socket), &signer_line("bob", &other)).principals,
        ["bob"]
    );
    // no --key, no agent: ~/.ssh/id_ecdsa (id_ed25519 does not exist)
    let id_ecdsa = keygen(&ssh, "id_ecdsa", "ecdsa");
    let out = knock(
        home.path(),
        None,
        &[target.as_str(), "-p", "22", "-d", "1h", "--no-wait"],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        verified(&receive(&socket), &signer_line("carol", &id_ecdsa)).principals,
        ["carol"]
    );
}

/// Like ssh, jitctl signs with `KEY-cert.pub` when it lies beside the key file, named
/// with --key or found in ~/.ssh; only the team CA's line vouches for it.
#[test]
fn a_certificate_beside_the_key_file_is_used_as_ssh_uses_it() {
    let home = tempfile::tempdir().unwrap();
    let ssh = home.path().join(".ssh");
    std::fs::create_dir(&ssh).unwrap();
    let ca = keygen(home.path(), "ca", "ed25519");
    let certify = |key: &Path, principal: &str| {
        let out = Command::new("ssh-keygen")
            .args(["-q", "-s"])
            .arg(&ca)
            .args(["-I", "laptop", "-n", principal, "-V", "-5m:+1h"])
            .arg(public(key))
            .output()
            .unwrap();
        assert!(out.status.success(), "ssh-keygen -s: {}", text(&out));
    };
    let ca_line = |principal: &str| {
        let line = std::fs::read_to_string(public(&ca)).unwrap();
        let mut fields = line.split_whitespace();
        format!(
            "{principal} cert-authority {} {}\n",
            fields.next().unwrap(),
            fields.next().unwrap()
        )
    };
    let (socket, port) = knock_port();
    let target = format!("127.0.0.1:{port}");
    let given = keygen(home.path(), "given", "ed25519");
    certify(&given, "alice");
    let args = [
        target.as_str(),
        "--key",
        given.to_str().unwrap(),
        "-p",
        "22",
        "-d",
        "1h",
        "--no-wait",
    ];
    let out = knock(home.path(), None, &args);
    assert!(out.status.success(), "{}", text(&out));
    let checked = verified(&receive(&socket), &ca_line("alice"));
    assert_eq!(checked.principals, ["alice"], "signed as the certificate");
    let default = keygen(&ssh, "id_ed25519", "ed25519");
    certify(&default, "bob");
    let out = knock(
        home.path(),
        None,
        &[target.as_str(), "-p", "22", "-d", "1h", "--no-wait"],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(verified(&receive(&socket), &ca_line("bob")).principals, ["bob"]);
}

#[test]
fn no_key_anywhere_is_exit_2_with_what_to_do_and_nothing_is_sent() {
    let home = tempfile::tempdir().unwrap();
    let (socket, port) = knock_port();
    socket.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let target = format!("127.0.0.1:{port}");
    let out = knock(
        home.path(),
        None,
        &[target.as_str(), "-p", "22", "-d", "1h", "--no-wait"],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no SSH key: ssh-agent has none and ~/.ssh/id_* do not exist; give --key"),
        "{}",
        text(&out)
    );
    // an agent without keys changes nothing
    let agent = Agent::start(home.path());
    let out = knock(home.path(), Some(&agent), &[target.as_str(), "-p", "22", "-d", "1h"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no SSH key"),
        "{}",
        text(&out)
    );
    let out = knock(
        home.path(),
        None,
        &[target.as_str(), "-p", "22", "-d", "1h", "-k", "/nonexistent.pub"],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--key /nonexistent.pub: no such file"));
    let mut buf = [0u8; 16];
    assert!(socket.recv_from(&mut buf).is_err(), "a knock was sent");
}

#[test]
fn the_hosts_file_gives_the_defaults_and_a_bad_one_is_refused_naming_the_line() {
    let home = tempfile::tempdir().unwrap();
    let key = keygen(home.path(), "k", "ed25519");
    let (socket, port) = knock_port();
    let config = home.path().join(".config/jitctl");
    std::fs::create_dir_all(&config).unwrap();
    let file = config.join("hosts.toml");
    let good = format!(
        "[hosts.\"127.0.0.1\"]\nknock_port = {port}\nports = [22, \"500/udp\"]\nduration = \"2h\"\nkey = \"{}\"\n",
        key.display()
    );
    std::fs::write(&file, &good).unwrap();
    let out = knock(home.path(), None, &["127.0.0.1", "--no-wait", "-j", "from the file"]);
    assert!(out.status.success(), "{}", text(&out));
    let v = verified(&receive(&socket), &signer_line("dave", &key));
    assert_eq!(
        (v.request.ports, v.request.length),
        (vec![22, 500], Length::Duration(7200))
    );
    std::fs::write(&file, format!("{good}colour = \"red\"\n")).unwrap();
    let out = knock(home.path(), None, &["127.0.0.1", "--no-wait"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let expected = format!("{}: line 6: unknown field `colour`", file.display());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&expected),
        "{}",
        text(&out)
    );
}

#[test]
fn an_ipv6_knock_goes_over_ipv6_and_names_the_host_in_its_canonical_form() {
    let home = tempfile::tempdir().unwrap();
    let key = keygen(home.path(), "k", "ed25519");
    let (socket, port) = knock_port_at("::1");
    let target = format!("[0:0::0:1]:{port}");
    let args = [
        target.as_str(),
        "-k",
        key.to_str().unwrap(),
        "-p",
        "22",
        "-d",
        "1h",
        "--no-wait",
        "--json",
    ];
    let report = json(&knock(home.path(), None, &args));
    assert_eq!(report["knock_address"], format!("[::1]:{port}").as_str());
    let v = verified_for("::1", &receive(&socket), &signer_line("frank", &key));
    assert_eq!(v.request.host, "::1");
    // -4 refuses a host that has no IPv4 address, before anything is signed
    let out = knock(home.path(), None, &[&args[..8], &["-4"]].concat());
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("::1 has no IPv4 address"),
        "{}",
        text(&out)
    );
}

/// Port the "protected" echo server listens on in [`Net`]'s host namespace.
const PROTECTED: u16 = 2222;

/// Drops new TCP connections to [`PROTECTED`] in the host namespace (a table of the
/// test's own: the host's jitd is not part of this test).
fn lock(net: &Net) {
    net.nft_ok(&["add", "table", "inet", "knocktest"]);
    net.nft_ok(&["add chain inet knocktest input { type filter hook input priority filter; policy accept; }"]);
    net.nft_ok(&["add rule inet knocktest input tcp dport 2222 drop"]);
}

/// Runs jitctl knock in client namespace a, in the background.
fn knock_from_a(net: &Net, home: &Path, key: &Path, wait: &str) -> Child {
    Command::new("ip")
        .args([
            "netns",
            "exec",
            &net.a,
            env!("CARGO_BIN_EXE_jitctl"),
            "knock",
            HOST_A4,
            "--json",
        ])
        .args(["-p", "2222", "-d", "1h", "--wait-timeout", wait, "--key"])
        .arg(key)
        .env("HOME", home)
        .env_remove("SSH_AUTH_SOCK")
        .env_remove("XDG_CONFIG_HOME")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn finish(child: Child) -> Output {
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    rx.recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("jitctl knock did not finish")
        })
        .unwrap()
}

#[test]
fn jitctl_waits_until_the_port_opens_after_the_knock() {
    let net = Net::new();
    let home = tempfile::tempdir().unwrap();
    let key = keygen(home.path(), "k", "ed25519");
    serve_echo(&net.host, PROTECTED);
    lock(&net);
    assert!(!can_connect(&net.a, HOST_A4, PROTECTED), "the lock holds");
    let listener = in_ns(&net.host, || UdpSocket::bind((HOST_A4, 62222)).unwrap());
    listener.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let child = knock_from_a(&net, home.path(), &key, "30s");
    let mut buf = [0u8; 2048];
    let (n, from) = listener.recv_from(&mut buf).expect("the knock arrives");
    assert_eq!(from.ip().to_string(), A4, "from the client's address");
    let signers = signers::parse(&signer_line("erin", &key)).unwrap();
    let v = packet::check(
        &buf[..n],
        &signers,
        &[HOST_A4.into()],
        Utc::now(),
        TimeDelta::seconds(30),
    )
    .unwrap();
    assert_eq!(v.request.ports, [PROTECTED]);
    // what the host's jitd would do with a valid knock: let the client in
    std::thread::sleep(Duration::from_millis(300));
    net.nft_ok(&["delete", "table", "inet", "knocktest"]);
    let report = json(&finish(child));
    assert_eq!(report["opened"], true, "{report}");
    assert_eq!(report["waited_for"], PROTECTED);
    let after = report["after_ms"].as_u64().unwrap();
    assert!(after >= 250, "opened only once the lock was lifted: {after} ms");
}

#[test]
fn a_port_that_stays_shut_is_exit_1_saying_no_answer_is_expected() {
    let net = Net::new();
    let home = tempfile::tempdir().unwrap();
    let key = keygen(home.path(), "k", "ed25519");
    serve_echo(&net.host, PROTECTED);
    lock(&net);
    let out = finish(knock_from_a(&net, home.path(), &key, "2s"));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "knock sent to {HOST_A4}:62222; no answer is expected; port 2222 did not open within 2s: check the audit log on the host (jitctl audit --since 5m) or your key, SHA256:"
        )),
        "{}",
        text(&out)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (report["opened"].clone(), report["refused_connections"].clone()),
        (false.into(), 0.into())
    );
}
