//! The fleet: one signed request in etcd opens a port on several jitd hosts, each its
//! own judge. A real etcd with TLS client certificates and real jitd processes in
//! their own namespaces ([`crate::fleet_net`]); requests made by the real `jitctl
//! fleet`, signed by the real `ssh-keygen`; access proven by connecting from the client
//! namespace.

use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;

use crate::fleet_net::*;
use crate::knock::Key;
use crate::util::*;

/// Three hosts (h1, h2 in group web; h3 in group db), etcd, alice's key.
pub struct Fleet {
    pub net: FleetNet,
    pub etcd: Etcd,
    pub pki: Pki,
    pub dir: tempfile::TempDir,
    pub alice: Key,
    pub bob: Key,
    pub mallory: Key,
    pub setups: Vec<Setup>,
    pub jitds: Vec<Jitd>,
}

/// Each host's groups as the policy writes them.
pub const GROUPS: [&str; 3] = ["\"web\"", "\"web\"", "\"db\""];

impl Fleet {
    pub fn new() -> Fleet {
        Fleet::with_policy([""; 3], "")
    }

    /// Three hosts whose `[[ports]]` entry for 22 also has `port_lines[n - 1]` and
    /// whose `[access]` also has `access_lines`.
    pub fn with_policy(port_lines: [&str; 3], access_lines: &str) -> Fleet {
        let net = FleetNet::new(3);
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let pki = Pki::new(dir.path());
        let etcd = Etcd::start(&net.hub, dir.path(), &pki);
        let alice = Key::new(dir.path(), "alice", &["-t", "ed25519"]);
        let bob = Key::new(dir.path(), "bob", &["-t", "ed25519"]);
        let mallory = Key::new(dir.path(), "mallory", &["-t", "ed25519"]);
        let mut fleet = Fleet {
            net,
            etcd,
            pki,
            dir,
            alice,
            bob,
            mallory,
            setups: Vec::new(),
            jitds: Vec::new(),
        };
        for n in 1..=3 {
            let setup = Setup::new("");
            let signers = setup.dir.path().join("allowed_signers");
            let lines = format!("alice {}\nbob {}\n", fleet.alice.public, fleet.bob.public);
            std::fs::write(&signers, lines).unwrap();
            std::fs::set_permissions(&signers, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
            let policy = fleet.policy(n, GROUPS[n - 1], port_lines[n - 1], &signers);
            setup.write_policy(&policy.replace("[access]\n", &format!("[access]\n{access_lines}\n")));
            serve_echo(&fleet.net.hosts[n - 1], 22);
            fleet.jitds.push(setup.start(&fleet.net.hosts[n - 1]));
            fleet.setups.push(setup);
        }
        let all = wait_for(Duration::from_secs(20), || fleet.registered() == 3);
        assert!(all, "hosts did not register: {}", fleet.logs());
        fleet
    }

    /// Host `n`'s policy: port 22 (with `port_lines`), alice a requester, `[fleet]` as
    /// host `hN` in `groups` (TOML strings, comma-separated).
    pub fn policy(&self, n: usize, groups: &str, port_lines: &str, signers: &std::path::Path) -> String {
        format!(
            r#"
[[ports]]
port = 22
allowed_sources = ["10.88.0.0/16"]
{port_lines}
[access]
requesters = ["principal:alice"]
[fleet]
endpoints = ["{}"]
ca = "{}"
cert = "{}"
key = "{}"
name = "h{n}"
groups = [{groups}]
allowed_signers = "{}"
"#,
            self.etcd.endpoint(),
            self.pki.ca.display(),
            self.pki.client_cert.display(),
            self.pki.client_key.display(),
            signers.display()
        )
    }

    /// Rewrites host `n`'s policy with `groups` and reloads it.
    pub fn regroup(&self, n: usize, groups: &str) {
        let setup = &self.setups[n - 1];
        let signers = setup.dir.path().join("allowed_signers");
        setup.write_policy(&self.policy(n, groups, "", &signers));
        let out = self.jitds[n - 1].ctl(&["reload"]);
        assert!(out.status.success(), "reload of h{n}: {}", text(&out));
    }

    /// Runs `jitctl --json fleet ARGS` in the client namespace with etcd's credentials.
    pub fn ctl(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            &self.net.client,
            env!("CARGO_BIN_EXE_jitctl"),
            "--json",
            "fleet",
        ])
        .args(["--endpoints", &self.etcd.endpoint()])
        .arg("--cacert")
        .arg(&self.pki.ca)
        .arg("--cert")
        .arg(&self.pki.client_cert)
        .arg("--etcd-key")
        .arg(&self.pki.client_key)
        .args(args)
        .env("HOME", self.dir.path())
        .env_remove("SSH_AUTH_SOCK");
        output_within(cmd, Duration::from_secs(60))
    }

    pub fn status(&self) -> Value {
        let out = self.ctl(&["status"]);
        assert!(out.status.success(), "{}", text(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    pub fn registered(&self) -> usize {
        let out = self.ctl(&["status"]);
        if !out.status.success() {
            return 0;
        }
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v["hosts"].as_object().map_or(0, |h| h.len())
    }

    /// `jitctl fleet request` for `hosts`, port 22, from the client, signed by `key`.
    pub fn request(&self, hosts: &str, key: &Key, duration: &str) -> (Output, Value) {
        self.request_waiting(hosts, key, duration, "10s")
    }

    /// [`Fleet::request`], waiting at most `wait` for the answers.
    pub fn request_waiting(&self, hosts: &str, key: &Key, duration: &str, wait: &str) -> (Output, Value) {
        let key_path = key.path.display().to_string();
        let out = self.ctl(&[
            "request",
            "--hosts",
            hosts,
            "--port",
            "22",
            "--source",
            CLIENT_IP,
            "--duration",
            duration,
            "-j",
            "INC-1234",
            "--key",
            &key_path,
            "--wait",
            wait,
        ]);
        let v = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        (out, v)
    }

    pub fn open(&self, n: usize) -> bool {
        can_connect(&self.net.client, &host_ip(n), 22)
    }

    pub fn opens_within(&self, n: usize, secs: u64) -> bool {
        wait_for(Duration::from_secs(secs), || self.open(n))
    }

    pub fn closes_within(&self, n: usize, secs: u64) -> bool {
        wait_for(Duration::from_secs(secs), || !self.open(n))
    }

    pub fn logs(&self) -> String {
        self.jitds
            .iter()
            .map(Jitd::log_text)
            .collect::<Vec<_>>()
            .join("\n----\n")
    }

    pub fn fleet_records(&self, n: usize) -> Vec<Value> {
        self.setups[n - 1]
            .audit()
            .into_iter()
            .filter(|r| r["action"] == "fleet")
            .collect()
    }
}

/// A host's life, and requests every host approves.
impl Fleet {
    /// Kills host `n`'s jitd with SIGKILL (or stops it with SIGTERM), leaving the
    /// kernel's table as it is.
    pub fn down(&mut self, n: usize, kill: bool) {
        let jitd = self.jitds.remove(n - 1);
        if kill {
            jitd.kill();
        } else {
            assert!(jitd.stop(Duration::from_secs(20)).success());
        }
    }

    /// Starts host `n`'s jitd again and waits until it watches etcd.
    pub fn up(&mut self, n: usize) {
        let jitd = self.setups[n - 1].start(&self.net.hosts[n - 1]);
        let watching = wait_for(Duration::from_secs(20), || {
            jitd.log_text().contains("watching requests")
        });
        assert!(watching, "h{n} did not rejoin: {}", jitd.log_text());
        self.jitds.insert(n - 1, jitd);
    }

    /// Host `n`'s audit records of approved requests for fleet request `id`.
    pub fn approvals_of(&self, n: usize, id: &str) -> usize {
        self.setups[n - 1]
            .audit()
            .iter()
            .filter(|r| r["action"] == "request" && r["outcome"] == "approved" && r["fleet_request"] == id)
            .count()
    }

    /// Host `n`'s answer to request `id`, as `jitctl fleet status` shows it.
    pub fn answer(&self, id: &str, n: usize) -> Value {
        self.status()["requests"][id]["answers"][format!("h{n}")].clone()
    }

    /// `jitctl fleet revoke ID`, which must succeed.
    pub fn revoke(&self, id: &str) {
        let out = self.ctl(&["revoke", id]);
        assert!(out.status.success(), "{}", text(&out));
    }

    /// Takes host `n`'s link down and waits until its jitd has given up the session.
    pub fn cut_off(&self, n: usize) {
        self.net.set_link(n, false);
        let dropped = wait_for(Duration::from_secs(20), || {
            self.jitds[n - 1].log_text().contains("reconnecting")
        });
        assert!(dropped, "{}", self.jitds[n - 1].log_text());
    }

    /// Whether host `n` audited the fleet revoking the grants of request `id`.
    pub fn revoked_on(&self, n: usize, id: &str) -> bool {
        self.setups[n - 1]
            .audit()
            .into_iter()
            .any(|r| r["action"] == "revoke" && r["actor"] == "fleet" && r["fleet_request"] == id)
    }

    /// `jitctl fleet request` for `hosts` (alice, 10 minutes) that every selected host
    /// approved; its id.
    pub fn approved(&self, hosts: &str) -> String {
        let (out, v) = self.request(hosts, &self.alice, "10m");
        assert!(out.status.success(), "{}\n{}", text(&out), self.logs());
        v["id"].as_str().unwrap().to_string()
    }
}

pub fn outcomes(v: &Value) -> Vec<(String, String)> {
    let mut all: Vec<(String, String)> = v["hosts"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|h| {
                    (
                        h["host"].as_str().unwrap().to_string(),
                        h["outcome"].as_str().unwrap().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    all.sort();
    all
}

pub fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
}

#[test]
fn the_harness_runs_etcd_with_client_certificates() {
    let net = FleetNet::new(1);
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let mut etcd = Etcd::start(&net.hub, dir.path(), &pki);
    assert!(etcd.healthy());
    // without a client certificate etcd refuses the connection
    assert!(!etcd.curl(&[]).status.success());
    etcd.kill();
    assert!(!etcd.healthy());
    etcd.restart();
    assert!(wait_for(Duration::from_secs(10), || etcd.healthy()));
}

#[test]
fn one_request_opens_three_hosts_and_revoke_closes_them() {
    let fleet = Fleet::new();
    for n in 1..=3 {
        assert!(!fleet.open(n), "host {n} open before any request");
    }
    let (out, v) = fleet.request("h1,h2,h3", &fleet.alice, "10m");
    assert!(out.status.success(), "{}\n{}", text(&out), fleet.logs());
    assert_eq!(
        outcomes(&v),
        pairs(&[("h1", "approved"), ("h2", "approved"), ("h3", "approved")])
    );
    for n in 1..=3 {
        assert!(fleet.opens_within(n, 10), "host {n} did not open: {}", fleet.logs());
    }
    // each host audited a signed request, naming the fleet request
    let id = v["id"].as_str().unwrap();
    for setup in &fleet.setups {
        let approved = setup.audit().into_iter().any(|r| {
            r["action"] == "request"
                && r["outcome"] == "approved"
                && r["fleet_request"] == id
                && r["actor"] == "principal:alice"
        });
        assert!(approved, "{:?}", setup.audit_lines());
    }
    let status = fleet.status();
    assert_eq!(
        status["requests"][id]["answers"].as_object().unwrap().len(),
        3,
        "{status}"
    );
    fleet.revoke(id);
    for n in 1..=3 {
        assert!(
            fleet.closes_within(n, 10),
            "host {n} still open after revoke: {}",
            fleet.logs()
        );
    }
    for setup in &fleet.setups {
        let revoked = wait_for(Duration::from_secs(10), || {
            setup
                .audit()
                .iter()
                .any(|r| r["action"] == "revoke" && r["actor"] == "fleet")
        });
        assert!(revoked, "{:?}", setup.audit_lines());
    }
}

#[test]
fn a_group_request_opens_only_its_hosts() {
    let fleet = Fleet::new();
    let (out, v) = fleet.request("group:web", &fleet.alice, "10m");
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(outcomes(&v), pairs(&[("h1", "approved"), ("h2", "approved")]));
    assert!(
        fleet.opens_within(1, 10) && fleet.opens_within(2, 10),
        "{}",
        fleet.logs()
    );
    assert!(!fleet.open(3), "h3 is not in group web");
    assert!(fleet.setups[2].audit().iter().all(|r| r["action"] != "request"));
}

#[test]
fn unsigned_or_wrongly_signed_requests_open_nothing_and_are_audited() {
    let fleet = Fleet::new();
    // mallory's key is in no allowed_signers: every host refuses it in its audit log,
    // writes no answer (a key it does not know gets nothing from it), jitctl exits non-zero
    let (out, v) = fleet.request_waiting("h1,h2,h3", &fleet.mallory, "10m", "3s");
    assert!(!out.status.success(), "{}", text(&out));
    assert_eq!(
        outcomes(&v),
        pairs(&[("h1", "no_answer"), ("h2", "no_answer"), ("h3", "no_answer")])
    );
    // an unsigned request written straight into etcd, with a lease
    let id = "0123456789abcdef0123456789abcdef";
    let unsigned = format!(
        "fleet /jitd/\nhosts h1,h2,h3\nports 22\nduration 600\nsource {CLIENT_IP}\ntime {}\nnonce {id}\n",
        chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ")
    );
    fleet
        .etcd
        .put_raw(&format!("/jitd/requests/{id}"), &unsigned, Some(600));
    for n in 1..=3 {
        let audited = wait_for(Duration::from_secs(10), || {
            let records = fleet.fleet_records(n);
            let has = |code: &str| {
                records
                    .iter()
                    .any(|r| r["reason"].as_str().unwrap_or("").starts_with(code))
            };
            has("unknown_key:") && has("unsigned:")
        });
        assert!(audited, "host {n}: {:?}", fleet.fleet_records(n));
        assert!(!fleet.open(n), "host {n} opened for a bad request");
    }
}

#[test]
fn etcd_killed_mid_grant_opens_nothing_new_and_the_grant_closes_by_its_timeout() {
    let mut fleet = Fleet::new();
    let (out, _) = fleet.request("h1", &fleet.alice, "8s");
    assert!(out.status.success(), "{}", text(&out));
    assert!(fleet.opens_within(1, 10), "{}", fleet.logs());
    fleet.etcd.kill();
    let prober = Prober::start(&fleet.net.client, "10.88.0.12", 22);
    // the grant closes by the kernel's timeout with etcd gone
    assert!(
        fleet.closes_within(1, 20),
        "h1 still open with etcd down: {}",
        fleet.logs()
    );
    fleet.etcd.restart();
    // the hosts re-register and re-read: nothing re-opens, nothing is applied twice
    assert!(
        wait_for(Duration::from_secs(30), || fleet.registered() == 3),
        "{}",
        fleet.logs()
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(!fleet.open(1), "h1 re-opened after etcd came back");
    assert!(!prober.ever_opened(), "h2 opened while etcd was down");
    let approvals = fleet.setups[0]
        .audit()
        .iter()
        .filter(|r| r["action"] == "request" && r["outcome"] == "approved")
        .count();
    assert_eq!(approvals, 1, "{:?}", fleet.setups[0].audit_lines());
    // and the fleet works again
    let (out, _) = fleet.request("h2", &fleet.alice, "10m");
    assert!(out.status.success(), "{}\n{}", text(&out), fleet.logs());
    assert!(fleet.opens_within(2, 10));
}

#[test]
fn a_host_cut_off_while_its_request_is_revoked_closes_it_on_reconnect() {
    let fleet = Fleet::new();
    let (out, v) = fleet.request("h1,h2", &fleet.alice, "10m");
    assert!(out.status.success(), "{}", text(&out));
    let id = v["id"].as_str().unwrap().to_string();
    assert!(
        fleet.opens_within(1, 10) && fleet.opens_within(2, 10),
        "{}",
        fleet.logs()
    );
    fleet.net.set_link(1, false);
    fleet.revoke(&id);
    assert!(fleet.closes_within(2, 10), "h2 still open after revoke");
    // long enough for h1's lease renewal to time out: it drops its session and, on
    // reconnect, re-reads everything (the delete event itself is never seen)
    let dropped = wait_for(Duration::from_secs(20), || {
        fleet.jitds[0].log_text().contains("reconnecting")
    });
    assert!(dropped, "{}", fleet.jitds[0].log_text());
    fleet.net.set_link(1, true);
    assert!(
        fleet.closes_within(1, 30),
        "h1 still open after reconnecting: {}",
        fleet.logs()
    );
    let revoked = wait_for(Duration::from_secs(10), || {
        fleet.setups[0]
            .audit()
            .iter()
            .any(|r| r["action"] == "revoke" && r["actor"] == "fleet")
    });
    assert!(revoked, "{:?}", fleet.setups[0].audit_lines());
}

#[test]
fn a_flood_of_garbage_requests_in_etcd_is_summarised_not_recorded_one_by_one() {
    let fleet = Fleet::new();
    for n in 0..60 {
        let id = format!("{n:032x}");
        fleet
            .etcd
            .put_raw(&format!("/jitd/requests/{id}"), "not a request", Some(600));
    }
    // the first 20 are on record one by one, the other 40 only counted
    let full = |n: usize| {
        fleet
            .fleet_records(n)
            .iter()
            .filter(|r| r["outcome"] == "denied")
            .count()
    };
    for n in 1..=3 {
        assert!(
            wait_for(Duration::from_secs(20), || full(n) >= 20),
            "host {n}: {}",
            full(n)
        );
    }
    std::thread::sleep(Duration::from_secs(2));
    for n in 1..=3 {
        assert_eq!(full(n), 20, "host {n}: {:?}", fleet.fleet_records(n));
        assert!(!fleet.open(n));
    }
}
