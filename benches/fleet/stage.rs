//! The stage: the integration tests' fleet harness ([`crate::fleet_net`]: a hub
//! namespace with a bridge and a real etcd requiring TLS client certificates, one
//! namespace per host, one for the client) with `n` real jitd hosts, each with its own
//! config, state directory and socket, in group `bench`, and an echo server on the
//! protected port; alice's key in a real ssh-agent.

use std::net::SocketAddr;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::fleet_net::{host_ip, Etcd, FleetNet, Pki};
use crate::knock::client::{Agent, Key};
use crate::util::{in_ns, output_within, serve_echo, text, wait_for, Jitd, Setup};

/// The port the hosts protect and the requests open (as in [`LOCAL_POLICY`]).
pub const PORT: u16 = 22;
/// The group every host is in.
pub const GROUP: &str = "bench";

/// The fleet, etcd, the agent. Dropped in field order: the jitds first, then etcd,
/// then the namespaces (which kill what is left in them).
pub struct Stage {
    pub jitds: Vec<Jitd>,
    /// Each host's config, state directory and socket (removed on drop).
    _setups: Vec<Setup>,
    pub agent: Agent,
    pub etcd: Etcd,
    pub pki: Pki,
    pub net: FleetNet,
    pub dir: tempfile::TempDir,
    /// etcd's RSS (MB) before any host joined.
    pub etcd_rss_empty_mb: f64,
    /// Seconds from spawning the jitds to all of them registered in etcd.
    pub join_s: f64,
}

impl Stage {
    /// Namespaces, certificates, etcd, the key and agent; then `n` jitds spawned at once
    /// and waited for until all are registered.
    pub fn start(n: usize) -> Stage {
        let net = FleetNet::new(n);
        let dir = tempfile::Builder::new().prefix("jitd-fleetbench").tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let pki = Pki::new(dir.path());
        let etcd = Etcd::start(&net.hub, dir.path(), &pki);
        let alice = Key::new(dir.path(), "alice");
        let agent = Agent::start(dir.path(), &alice);
        let signers = dir.path().join("allowed_signers");
        std::fs::write(&signers, format!("alice {}\n", alice.public)).unwrap();
        std::fs::set_permissions(&signers, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
        // etcd settles after its first start before its memory is read
        std::thread::sleep(Duration::from_millis(500));
        let etcd_rss_empty_mb = crate::rss_mb(etcd.pid().unwrap() as i32);
        let setups: Vec<Setup> = (1..=n)
            .map(|i| {
                let setup = Setup::new("");
                setup.write_policy(&policy(&etcd, &pki, i, &signers));
                serve_echo(&net.hosts[i - 1], PORT);
                setup
            })
            .collect();
        let started = Instant::now();
        let jitds = setups
            .iter()
            .zip(&net.hosts)
            .map(|(s, ns)| s.spawn(ns, &[("JITD_LOG", "info")]))
            .collect();
        let mut stage = Stage {
            jitds,
            _setups: setups,
            agent,
            etcd,
            pki,
            net,
            dir,
            etcd_rss_empty_mb,
            join_s: 0.0,
        };
        let all = wait_for(Duration::from_secs(90), || stage.registered() == n);
        assert!(all, "{} of {n} hosts registered: {}", stage.registered(), stage.logs());
        stage.join_s = started.elapsed().as_secs_f64();
        stage
    }

    /// The hosts' protected port, as the client reaches it.
    pub fn targets(&self) -> Vec<SocketAddr> {
        (1..=self.jitds.len())
            .map(|i| SocketAddr::new(host_ip(i).parse().unwrap(), PORT))
            .collect()
    }

    /// `jitctl --json fleet … ARGS` with etcd's credentials and the agent, started in
    /// the calling thread's namespace and not waited for.
    pub fn spawn_ctl(&self, args: &[&str]) -> Child {
        self.ctl_command(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run jitctl fleet")
    }

    fn ctl_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_jitctl"));
        cmd.args(["--json", "fleet", "--endpoints", &self.etcd.endpoint()])
            .arg("--cacert")
            .arg(&self.pki.ca)
            .arg("--cert")
            .arg(&self.pki.client_cert)
            .arg("--etcd-key")
            .arg(&self.pki.client_key)
            .args(args)
            .env("HOME", self.dir.path())
            .env("SSH_AUTH_SOCK", &self.agent.socket)
            .env_remove("XDG_CONFIG_HOME");
        cmd
    }

    /// `jitctl fleet ARGS` run to completion in the client namespace.
    pub fn ctl(&self, args: &[&str]) -> Output {
        in_ns(&self.net.client, || {
            output_within(self.ctl_command(args), Duration::from_secs(120))
        })
    }

    /// How many hosts are registered.
    pub fn registered(&self) -> usize {
        let out = self.ctl(&["status"]);
        if !out.status.success() {
            return 0;
        }
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        v["hosts"].as_object().map_or(0, |h| h.len())
    }

    /// Every jitd's RSS in MB.
    pub fn jitd_rss_mb(&self) -> Vec<f64> {
        self.jitds.iter().map(|j| crate::rss_mb(j.pid())).collect()
    }

    /// etcd's RSS in MB.
    pub fn etcd_rss_mb(&self) -> f64 {
        crate::rss_mb(self.etcd.pid().unwrap() as i32)
    }

    /// What every jitd logged (for failures).
    pub fn logs(&self) -> String {
        let mut all: Vec<String> = self
            .jitds
            .iter()
            .enumerate()
            .map(|(i, j)| format!("--- h{}:\n{}", i + 1, j.log_text()))
            .collect();
        all.push(format!("--- etcd:\n{}", self.etcd.log_text()));
        all.join("\n")
    }
}

/// The arguments of a request for every host of the group, from `source`.
pub fn request_args(source: &str) -> Vec<&str> {
    vec![
        "request",
        "--hosts",
        "group:bench",
        "--port",
        "22",
        "--source",
        source,
        "--duration",
        "10m",
        "-j",
        "benchmark",
        "--wait",
        "60s",
    ]
}

/// jitctl's JSON once it has exited; panics with its output unless it succeeded.
pub fn report(out: &Output, what: &str) -> Value {
    assert!(out.status.success(), "jitctl fleet {what}: {}", text(out));
    serde_json::from_slice(&out.stdout).expect("jitctl --json prints JSON")
}

/// A host's policy without its `[fleet]` section.
pub const LOCAL_POLICY: &str = r#"
[[ports]]
port = 22
max_duration = "24h"
allowed_sources = ["10.88.0.0/16"]
[access]
requesters = ["principal:alice"]
"#;

/// Host `i`'s policy: port 22 protected for the hub's network, alice may request, the
/// fleet section with etcd's TLS credentials, name h`i`, group bench.
fn policy(etcd: &Etcd, pki: &Pki, i: usize, signers: &std::path::Path) -> String {
    format!(
        r#"{LOCAL_POLICY}
[fleet]
endpoints = ["{}"]
ca = "{}"
cert = "{}"
key = "{}"
name = "h{i}"
groups = ["{GROUP}"]
allowed_signers = "{}"
"#,
        etcd.endpoint(),
        pki.ca.display(),
        pki.client_cert.display(),
        pki.client_key.display(),
        signers.display()
    )
}
