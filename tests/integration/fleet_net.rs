//! The fleet harness: a real etcd with TLS client certificates in a hub namespace, and
//! host namespaces (each to run one jitd) and a client namespace on one bridge.
//!
//! ```text
//!   hub (bridge br0, etcd on https://10.88.0.1:2379, client certificates required)
//!    ├── host 1   10.88.0.11   (veth "eth0"; `cut` takes it down)
//!    ├── host 2   10.88.0.12
//!    ├── host 3   10.88.0.13
//!    └── client   10.88.0.100
//! ```
//! Everything is removed on drop (processes in the namespaces killed first), also when
//! a test fails.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::util::{text, wait_for};

/// etcd's address in the hub.
pub const ETCD_IP: &str = "10.88.0.1";
/// The client namespace's address.
pub const CLIENT_IP: &str = "10.88.0.100";

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().expect("run command");
    assert!(out.status.success(), "{args:?} failed: {}", text(&out));
}

/// The address of host `n` (1-based).
pub fn host_ip(n: usize) -> String {
    format!("10.88.0.{}", 10 + n)
}

/// The hub, `hosts` host namespaces and one client namespace; removed on drop.
pub struct FleetNet {
    /// The hub namespace (bridge and etcd).
    pub hub: String,
    /// The host namespaces, host 1 first.
    pub hosts: Vec<String>,
    /// The client namespace.
    pub client: String,
}

impl FleetNet {
    /// Creates the namespaces with unique names and wires them to the hub's bridge.
    pub fn new(hosts: usize) -> FleetNet {
        let id = format!(
            "{}x{}",
            std::process::id() % 100_000,
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let net = FleetNet {
            hub: format!("jf-{id}-e"),
            hosts: (1..=hosts).map(|n| format!("jf-{id}-{n}")).collect(),
            client: format!("jf-{id}-c"),
        };
        // made one by one so that a failure half-way still removes what was made
        sh(&["ip", "netns", "add", &net.hub]);
        sh(&["ip", "-n", &net.hub, "link", "set", "lo", "up"]);
        sh(&["ip", "-n", &net.hub, "link", "add", "br0", "type", "bridge"]);
        sh(&[
            "ip",
            "-n",
            &net.hub,
            "addr",
            "add",
            &format!("{ETCD_IP}/24"),
            "dev",
            "br0",
        ]);
        sh(&["ip", "-n", &net.hub, "link", "set", "br0", "up"]);
        let mut members: Vec<(String, String)> = net
            .hosts
            .iter()
            .enumerate()
            .map(|(i, ns)| (ns.clone(), host_ip(i + 1)))
            .collect();
        members.push((net.client.clone(), CLIENT_IP.to_string()));
        for (i, (ns, ip)) in members.iter().enumerate() {
            let port = format!("p{i}");
            sh(&["ip", "netns", "add", ns]);
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
            sh(&[
                "ip", "-n", &net.hub, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", ns,
            ]);
            sh(&["ip", "-n", &net.hub, "link", "set", &port, "master", "br0"]);
            sh(&["ip", "-n", &net.hub, "link", "set", &port, "up"]);
            sh(&["ip", "-n", ns, "addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
            sh(&["ip", "-n", ns, "link", "set", "eth0", "up"]);
        }
        net
    }

    /// Takes host `n`'s link down (it loses etcd and the client) or brings it back.
    pub fn set_link(&self, n: usize, up: bool) {
        let state = if up { "up" } else { "down" };
        sh(&["ip", "-n", &self.hosts[n - 1], "link", "set", "eth0", state]);
    }

    fn all(&self) -> Vec<&String> {
        let mut all: Vec<&String> = self.hosts.iter().collect();
        all.push(&self.client);
        all.push(&self.hub);
        all
    }
}

impl Drop for FleetNet {
    fn drop(&mut self) {
        for ns in self.all() {
            if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            }
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// A CA, etcd's server certificate (for [`ETCD_IP`]) and a client certificate, made
/// with openssl in `dir`.
pub struct Pki {
    /// The CA certificate (PEM).
    pub ca: PathBuf,
    /// etcd's certificate and key.
    pub server_cert: PathBuf,
    /// etcd's key.
    pub server_key: PathBuf,
    /// A client certificate the CA signed (for jitd and jitctl).
    pub client_cert: PathBuf,
    /// Its key.
    pub client_key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(out.status.success(), "openssl {args:?}: {}", text(&out));
}

impl Pki {
    /// Makes the CA and both certificates (EC P-256, valid one day).
    pub fn new(dir: &Path) -> Pki {
        let key = |name: &str| {
            openssl(
                dir,
                &[
                    "genpkey",
                    "-algorithm",
                    "EC",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                    "-out",
                    name,
                ],
            )
        };
        key("ca.key");
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-new",
                "-key",
                "ca.key",
                "-subj",
                "/CN=jitd test CA",
                "-days",
                "1",
                "-out",
                "ca.pem",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        );
        for (name, cn, ext) in [
            (
                "server",
                "etcd",
                format!("subjectAltName=IP:{ETCD_IP},IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature"),
            ),
            (
                "client",
                "jitd",
                "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature".to_string(),
            ),
        ] {
            key(&format!("{name}.key"));
            std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
            openssl(
                dir,
                &["req", "-new", "-key", &format!("{name}.key"), "-subj", &format!("/CN={cn}"), "-out", &format!("{name}.csr")],
            );
            openssl(
                dir,
                &[
                    "x509", "-req", "-in", &format!("{name}.csr"), "-CA", "ca.pem", "-CAkey", "ca.key",
                    "-CAcreateserial", "-days", "1", "-extfile", &format!("{name}.ext"), "-out",
                    &format!("{name}.pem"),
                ],
            );
        }
        Pki {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
        }
    }
}

/// A real etcd in the hub, TLS with client certificates required; killed on drop.
pub struct Etcd {
    child: Option<Child>,
    ns: String,
    data: PathBuf,
    log: PathBuf,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

impl Etcd {
    /// Starts etcd in `ns` with its data in `dir/etcd` and waits until it answers.
    pub fn start(ns: &str, dir: &Path, pki: &Pki) -> Etcd {
        let mut etcd = Etcd {
            child: None,
            ns: ns.to_string(),
            data: dir.join("etcd"),
            log: dir.join("etcd.log"),
            ca: pki.ca.clone(),
            cert: pki.server_cert.clone(),
            key: pki.server_key.clone(),
        };
        etcd.run();
        etcd
    }

    /// The client URL.
    pub fn endpoint(&self) -> String {
        format!("https://{ETCD_IP}:2379")
    }

    fn run(&mut self) {
        let url = self.endpoint();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns, "etcd", "--name", "t", "--data-dir"])
            .arg(&self.data)
            .args(["--listen-client-urls", &url, "--advertise-client-urls", &url])
            .args(["--listen-peer-urls", "http://127.0.0.1:2380"])
            .args(["--initial-advertise-peer-urls", "http://127.0.0.1:2380"])
            .args(["--initial-cluster", "t=http://127.0.0.1:2380"])
            .args(["--client-cert-auth", "--trusted-ca-file"])
            .arg(&self.ca)
            .arg("--cert-file")
            .arg(&self.cert)
            .arg("--key-file")
            .arg(&self.key)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn etcd (Debian package etcd-server)");
        self.child = Some(child);
        let up = wait_for(Duration::from_secs(30), || self.healthy());
        assert!(up, "etcd did not come up within 30s: {}", self.log_text());
    }

    /// Whether etcd answers its health check over TLS with the client certificate.
    pub fn healthy(&self) -> bool {
        let out = self.curl(&[
            "--cert",
            &self.cert.display().to_string(),
            "--key",
            &self.key.display().to_string(),
        ]);
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("\"health\":\"true\"")
    }

    /// `curl` on etcd's `/health` from the hub with `extra` arguments.
    pub fn curl(&self, extra: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.ns, "curl", "-s", "--max-time", "3", "--cacert"])
            .arg(&self.ca)
            .args(extra)
            .arg(format!("{}/health", self.endpoint()))
            .output()
            .unwrap()
    }

    /// Kills etcd (SIGKILL), keeping its data.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts etcd again on the same data.
    pub fn restart(&mut self) {
        self.kill();
        self.run();
    }

    /// What etcd logged.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// etcd's process id while it runs (`ip netns exec` execs etcd in place).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// etcd's Prometheus metrics (`/metrics` on the client URL, with the client
    /// certificate), as text.
    pub fn metrics(&self) -> String {
        let out = self
            .with_certificate()
            .arg(format!("{}/metrics", self.endpoint()))
            .output()
            .unwrap();
        assert!(out.status.success(), "etcd /metrics: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Etcd {
    /// Puts `value` under `key` through etcd's JSON gateway (as any etcd client
    /// could, bypassing jitctl), with a lease of `ttl` seconds when given.
    pub fn put_raw(&self, key: &str, value: &str, ttl: Option<i64>) {
        use base64_lite as b64;
        let lease = match ttl {
            None => 0,
            Some(ttl) => {
                let out = self.post("/v3/lease/grant", &format!("{{\"TTL\":{ttl}}}"));
                let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                v["ID"].as_str().unwrap().parse::<i64>().unwrap()
            }
        };
        let body = format!(
            "{{\"key\":\"{}\",\"value\":\"{}\",\"lease\":{lease}}}",
            b64(key),
            b64(value)
        );
        let out = self.post("/v3/kv/put", &body);
        assert!(out.status.success(), "{}", text(&out));
    }

    fn post(&self, path: &str, body: &str) -> Output {
        self.with_certificate()
            .args(["-X", "POST", "-d", body])
            .arg(format!("{}{path}", self.endpoint()))
            .output()
            .unwrap()
    }

    /// `curl` in the hub, trusting etcd's CA and presenting the client certificate.
    fn with_certificate(&self) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns, "curl", "-s", "--max-time", "5", "--cacert"])
            .arg(&self.ca)
            .arg("--cert")
            .arg(&self.cert)
            .arg("--key")
            .arg(&self.key);
        cmd
    }
}

/// Standard base64 (the gateway's encoding of keys and values).
fn base64_lite(s: &str) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let b = s.as_bytes();
    let mut out = String::new();
    for chunk in b.chunks(3) {
        let n =
            (chunk[0] as u32) << 16 | (*chunk.get(1).unwrap_or(&0) as u32) << 8 | *chunk.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

impl Etcd {
    /// Compacts etcd's history up to its current revision (physically), as a periodic
    /// compaction would; returns that revision.
    pub fn compact(&self) -> i64 {
        let out = self.post("/v3/kv/range", &format!("{{\"key\":\"{}\"}}", base64_lite("/")));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let revision: i64 = v["header"]["revision"].as_str().unwrap().parse().unwrap();
        let out = self.post(
            "/v3/kv/compaction",
            &format!("{{\"revision\":{revision},\"physical\":true}}"),
        );
        assert!(out.status.success(), "{}", text(&out));
        revision
    }

    /// Deletes `key` through the JSON gateway.
    pub fn delete_raw(&self, key: &str) {
        let out = self.post("/v3/kv/deleterange", &format!("{{\"key\":\"{}\"}}", base64_lite(key)));
        assert!(out.status.success(), "{}", text(&out));
    }
}

impl Etcd {
    /// The value under `key`, read through the JSON gateway (`None`: no such key).
    pub fn get_raw(&self, key: &str) -> Option<String> {
        let out = self.post("/v3/kv/range", &format!("{{\"key\":\"{}\"}}", base64_lite(key)));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let value = v["kvs"][0]["value"].as_str()?;
        Some(String::from_utf8(unbase64(value)).unwrap())
    }

    /// Puts a value of `size` bytes under `key` with a lease of `ttl` seconds (the body
    /// goes through a file: it is larger than one command-line argument may be).
    pub fn put_big(&self, key: &str, size: usize, ttl: i64) {
        let out = self.post("/v3/lease/grant", &format!("{{\"TTL\":{ttl}}}"));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let lease = v["ID"].as_str().unwrap();
        let body = format!(
            "{{\"key\":\"{}\",\"value\":\"{}\",\"lease\":{lease}}}",
            base64_lite(key),
            base64_lite(&"x".repeat(size))
        );
        let file = self.data.with_extension("put.json");
        std::fs::write(&file, body).unwrap();
        let out = self.post("/v3/kv/put", &format!("@{}", file.display()));
        assert!(out.status.success() && !text(&out).contains("error"), "{}", text(&out));
    }
}

/// Decodes standard base64.
fn unbase64(s: &str) -> Vec<u8> {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let digits: Vec<u32> = s
        .bytes()
        .filter(|b| *b != b'=')
        .map(|b| T.iter().position(|t| *t == b).unwrap() as u32)
        .collect();
    let mut out = Vec::new();
    for chunk in digits.chunks(4) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, d)| n | d << (18 - 6 * i));
        out.extend_from_slice(&n.to_be_bytes()[1..chunk.len()]);
    }
    out
}

impl Etcd {
    /// Revokes the lease `key` is attached to (deleting every key on it), as anyone
    /// with write access to etcd could; false when `key` has no lease.
    pub fn revoke_lease_of(&self, key: &str) -> bool {
        let out = self.post("/v3/kv/range", &format!("{{\"key\":\"{}\"}}", base64_lite(key)));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let Some(lease) = v["kvs"][0]["lease"].as_str() else {
            return false;
        };
        let out = self.post("/v3/lease/revoke", &format!("{{\"ID\":{lease}}}"));
        assert!(out.status.success(), "{}", text(&out));
        true
    }
}
