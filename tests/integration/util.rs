//! Test hosts in network namespaces, a real jitd inside them, and real TCP/UDP peers.
//!
//! Topology of a [`Net`] (every test gets its own, so fixed addresses never clash):
//!
//! ```text
//!   client "a"  10.77.1.2  fd00:77:1::2  ── veth ──  10.77.1.1  fd00:77:1::1  (h-a)
//!                                                    host (runs jitd)
//!   client "b"  10.77.2.2  fd00:77:2::2  ── veth ──  10.77.2.1  fd00:77:2::1  (h-b)
//! ```
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Host address facing client a (IPv4).
pub const HOST_A4: &str = "10.77.1.1";
/// Host address facing client a (IPv6).
pub const HOST_A6: &str = "fd00:77:1::1";
/// Host address facing client b (IPv4).
pub const HOST_B4: &str = "10.77.2.1";
/// Client a's IPv4 address.
pub const A4: &str = "10.77.1.2";
/// Client a's IPv6 address.
pub const A6: &str = "fd00:77:1::2";
/// Client b's IPv4 address.
pub const B4: &str = "10.77.2.2";
/// Client b's IPv6 address.
pub const B6: &str = "fd00:77:2::2";

/// How long a connection attempt may take before it counts as dropped.
pub const BLOCKED_AFTER: Duration = Duration::from_millis(1200);

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().expect("run command");
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Three namespaces (host, client a, client b) joined by veth pairs; removed on drop.
pub struct Net {
    /// Host namespace name.
    pub host: String,
    /// Client a namespace name.
    pub a: String,
    /// Client b namespace name.
    pub b: String,
    /// Name of the host's interface towards client a.
    pub host_if_a: String,
}

impl Net {
    /// Creates the namespaces with unique names and configures addresses and links.
    pub fn new() -> Net {
        let id = format!(
            "{}x{}",
            std::process::id() % 100_000,
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let net = Net {
            host: format!("jt-{id}-h"),
            a: format!("jt-{id}-a"),
            b: format!("jt-{id}-b"),
            host_if_a: "h-a".into(),
        };
        for ns in [&net.host, &net.a, &net.b] {
            sh(&["ip", "netns", "add", ns]);
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        for (client, n) in [(&net.a, 1), (&net.b, 2)] {
            let host_if = if n == 1 { "h-a" } else { "h-b" };
            sh(&[
                "ip", "-n", &net.host, "link", "add", host_if, "type", "veth", "peer", "name", "c0", "netns", client,
            ]);
            sh(&[
                "ip",
                "-n",
                &net.host,
                "addr",
                "add",
                &format!("10.77.{n}.1/24"),
                "dev",
                host_if,
            ]);
            sh(&[
                "ip",
                "-n",
                &net.host,
                "addr",
                "add",
                &format!("fd00:77:{n}::1/64"),
                "dev",
                host_if,
                "nodad",
            ]);
            sh(&[
                "ip",
                "-n",
                client,
                "addr",
                "add",
                &format!("10.77.{n}.2/24"),
                "dev",
                "c0",
            ]);
            sh(&[
                "ip",
                "-n",
                client,
                "addr",
                "add",
                &format!("fd00:77:{n}::2/64"),
                "dev",
                "c0",
                "nodad",
            ]);
            sh(&["ip", "-n", &net.host, "link", "set", host_if, "up"]);
            sh(&["ip", "-n", client, "link", "set", "c0", "up"]);
        }
        net
    }

    /// The host's nftables ruleset as `nft list ruleset` prints it.
    pub fn ruleset(&self) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.host, "nft", "list", "ruleset"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "nft list ruleset: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs `nft ARGS` in the host namespace.
    pub fn nft(&self, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.host, "nft"])
            .args(args)
            .output()
            .unwrap()
    }

    /// Runs `nft ARGS` in the host namespace; it must succeed.
    pub fn nft_ok(&self, args: &[&str]) {
        let out = self.nft(args);
        assert!(out.status.success(), "nft {args:?}: {}", text(&out));
    }

    /// jitd's table as `nft list table` prints it, without the grants' running clocks.
    pub fn table_shape(&self) -> String {
        let out = self.nft(&["list", "table", "inet", "jitd"]);
        assert!(out.status.success(), "{}", text(&out));
        without_clocks(&String::from_utf8(out.stdout).unwrap())
    }
}

/// An nft listing without the elements' running `expires` countdowns, so that two
/// listings of an unchanged ruleset compare equal.
pub fn without_clocks(listing: &str) -> String {
    let mut words = Vec::new();
    let mut skip = false;
    for word in listing.split_whitespace() {
        if std::mem::take(&mut skip) {
            continue;
        }
        skip = word == "expires";
        if !skip {
            words.push(word);
        }
    }
    words.join(" ")
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in [&self.host, &self.a, &self.b] {
            if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            }
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Runs `f` on a thread that has entered network namespace `ns`; sockets it creates
/// stay in that namespace wherever they are used afterwards.
pub fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    let file = std::fs::File::open(format!("/var/run/netns/{ns}")).expect("namespace exists");
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .expect("namespace thread")
    })
}

fn addr(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse::<IpAddr>().unwrap(), port)
}

/// A TCP echo server on `[::]:port` (IPv4 and IPv6) in namespace `ns`, plus a UDP echo
/// server on the same port; they live until the namespace is removed.
pub fn serve_echo(ns: &str, port: u16) {
    let (tcp, udp) = in_ns(ns, || {
        (
            TcpListener::bind(addr("::", port)).expect("bind tcp"),
            UdpSocket::bind(addr("::", port)).expect("bind udp"),
        )
    });
    std::thread::spawn(move || {
        for stream in tcp.incoming().flatten() {
            std::thread::spawn(move || echo(stream));
        }
    });
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(&buf[..n], from);
        }
    });
}

fn echo(mut stream: TcpStream) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 || stream.write_all(&buf[..n]).is_err() {
            break;
        }
    }
}

/// Opens a TCP connection from namespace `ns` to `ip:port`, giving up after `BLOCKED_AFTER`.
pub fn connect(ns: &str, ip: &str, port: u16) -> std::io::Result<TcpStream> {
    let target = addr(ip, port);
    let stream = in_ns(ns, || TcpStream::connect_timeout(&target, BLOCKED_AFTER))?;
    stream.set_read_timeout(Some(Duration::from_secs(3)))?;
    stream.set_write_timeout(Some(Duration::from_secs(3)))?;
    Ok(stream)
}

/// Whether a new TCP connection from `ns` to `ip:port` gets through and echoes data.
pub fn can_connect(ns: &str, ip: &str, port: u16) -> bool {
    match connect(ns, ip, port) {
        Ok(mut s) => exchange(&mut s, b"ping"),
        Err(_) => false,
    }
}

/// Sends `data` on an open connection and checks it comes back.
pub fn exchange(stream: &mut TcpStream, data: &[u8]) -> bool {
    if stream.write_all(data).is_err() {
        return false;
    }
    let mut back = vec![0u8; data.len()];
    stream.read_exact(&mut back).is_ok() && back == data
}

/// Closes a connection cleanly.
pub fn close(stream: TcpStream) {
    let _ = stream.shutdown(Shutdown::Both);
}

/// Whether a UDP datagram from `ns` to `ip:port` is answered.
pub fn udp_answered(ns: &str, ip: &str, port: u16) -> bool {
    let target = addr(ip, port);
    let socket = in_ns(ns, || {
        UdpSocket::bind(addr(if ip.contains(':') { "::" } else { "0.0.0.0" }, 0)).unwrap()
    });
    socket.set_read_timeout(Some(BLOCKED_AFTER)).unwrap();
    let mut buf = [0u8; 16];
    socket.send_to(b"ping", target).is_ok() && matches!(socket.recv_from(&mut buf), Ok((4, _)))
}

/// Polls `check` every 50 ms until it holds or `timeout` passes.
pub fn wait_for(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A jitd policy and the directory holding it, its socket and its state.
pub struct Setup {
    /// Temporary directory (socket, state, policy).
    pub dir: tempfile::TempDir,
}

impl Setup {
    /// Writes a policy: `socket` and `state_dir` inside a fresh directory, then `body`.
    pub fn new(body: &str) -> Setup {
        let dir = tempfile::Builder::new().prefix("jitd-test").tempdir().unwrap();
        // jitctl may run as an unprivileged user in some tests: let it reach the socket.
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let setup = Setup { dir };
        setup.write_policy(body);
        setup
    }

    /// Replaces the policy body (socket and state_dir stay).
    pub fn write_policy(&self, body: &str) {
        let text = format!(
            "socket = \"{}\"\nstate_dir = \"{}\"\n{body}\n",
            self.socket().display(),
            self.state_dir().display()
        );
        std::fs::write(self.policy(), text).unwrap();
    }

    /// The policy file.
    pub fn policy(&self) -> PathBuf {
        self.dir.path().join("jitd.toml")
    }

    /// The socket path.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("jitd.sock")
    }

    /// The state directory.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The audit log.
    pub fn audit_file(&self) -> PathBuf {
        self.state_dir().join("audit.jsonl")
    }

    /// The audit log's lines as they are on disk.
    pub fn audit_lines(&self) -> Vec<String> {
        std::fs::read_to_string(self.audit_file())
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Every audit record as JSON.
    pub fn audit(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.audit_file())
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("audit line is JSON"))
            .collect()
    }

    /// Runs `jitd ARGS --config POLICY` in `ns` to completion (for --check-config, --unlock, bad policies).
    pub fn run_jitd(&self, ns: &str, args: &[&str]) -> Output {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_jitd"), "--config"])
            .arg(self.policy())
            .args(args);
        output_within(cmd, Duration::from_secs(20))
    }

    /// Starts jitd in `ns` with extra environment variables, without waiting for it.
    pub fn spawn(&self, ns: &str, envs: &[(&str, &str)]) -> Jitd {
        let log = self
            .dir
            .path()
            .join(format!("jitd-{}.log", COUNTER.fetch_add(1, Ordering::SeqCst)));
        let child = Command::new("ip")
            .args(["netns", "exec", ns, env!("CARGO_BIN_EXE_jitd"), "--config"])
            .arg(self.policy())
            .env("JITD_LOG", "debug")
            .envs(envs.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn jitd");
        Jitd {
            child: Some(child),
            log,
            socket: self.socket(),
        }
    }

    /// Starts jitd in `ns` and waits until it answers on its socket.
    pub fn start(&self, ns: &str) -> Jitd {
        self.start_with(ns, &[])
    }

    /// Like [`Setup::start`], with extra environment variables (faults, test knobs).
    pub fn start_with(&self, ns: &str, envs: &[(&str, &str)]) -> Jitd {
        let mut jitd = self.spawn(ns, envs);
        let ready = wait_for(Duration::from_secs(15), || {
            if let Some(status) = jitd.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("jitd exited early with {status}: {}", jitd.log_text());
            }
            jitd.ctl(&["status"]).status.success()
        });
        assert!(ready, "jitd did not answer within 15s: {}", jitd.log_text());
        jitd
    }
}

/// A running jitd; killed on drop if still running.
pub struct Jitd {
    child: Option<Child>,
    log: PathBuf,
    socket: PathBuf,
}

impl Jitd {
    /// Runs `jitctl --socket SOCKET ARGS` as root.
    pub fn ctl(&self, args: &[&str]) -> Output {
        jitctl(&self.socket, args, None)
    }

    /// Runs jitctl as `uid`/`gid` (no supplementary groups).
    pub fn ctl_as(&self, uid: u32, gid: u32, args: &[&str]) -> Output {
        jitctl(&self.socket, args, Some((uid, gid)))
    }

    /// Runs jitctl with `--json` and parses its output, asserting success.
    pub fn ctl_json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.ctl(&all);
        assert!(
            out.status.success(),
            "jitctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("jitctl --json prints JSON")
    }

    /// The ids of the live grants, as `jitctl status` lists them.
    pub fn grant_ids(&self) -> Vec<u64> {
        let status = self.ctl_json(&["status"]);
        status["grants"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["id"].as_u64().unwrap())
            .collect()
    }

    /// Requests `port` for `source` for `duration` as `uid` (group 65534); the reply,
    /// which must be a success.
    pub fn request_as(&self, uid: u32, port: &str, source: &str, duration: &str) -> serde_json::Value {
        let args = [
            "--json",
            "request",
            "--port",
            port,
            "--source",
            source,
            "--duration",
            duration,
        ];
        let out = self.ctl_as(uid, 65534, &args);
        assert!(out.status.success(), "{}", text(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// jitd's pid.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// Sends `signal` to jitd.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), signal).unwrap();
    }

    /// Sends SIGTERM and waits up to `timeout` for jitd to exit.
    pub fn stop(mut self, timeout: Duration) -> ExitStatus {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                panic!(
                    "jitd did not exit within {timeout:?} of SIGTERM: {}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits up to `timeout` for jitd to exit by itself (no signal), panicking with its
    /// log if it does not.
    pub fn wait_exit(mut self, timeout: Duration) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        let exited = wait_for(timeout, || child.try_wait().unwrap().is_some());
        if !exited {
            let _ = child.kill();
            let _ = child.wait();
            panic!("jitd still running after {timeout:?}: {}", self.log_text());
        }
        child.wait().unwrap()
    }

    /// Whether jitd is still running.
    pub fn running(&mut self) -> bool {
        self.child.as_mut().unwrap().try_wait().unwrap().is_none()
    }

    /// Kills jitd with SIGKILL and reaps it.
    pub fn kill(mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// What jitd logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Jitd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs jitctl against `socket`, optionally as another user.
pub fn jitctl(socket: &Path, args: &[&str], user: Option<(u32, u32)>) -> Output {
    let mut cmd = match user {
        None => Command::new(env!("CARGO_BIN_EXE_jitctl")),
        Some((uid, gid)) => {
            let mut c = Command::new("setpriv");
            c.args([
                format!("--reuid={uid}"),
                format!("--regid={gid}"),
                "--clear-groups".into(),
            ])
            .arg(env!("CARGO_BIN_EXE_jitctl"));
            c
        }
    };
    cmd.arg("--socket").arg(socket).args(args).env_remove("SSH_CONNECTION");
    output_within(cmd, Duration::from_secs(30))
}

/// Runs `cmd` to completion, killing it and failing the test after `timeout`.
pub fn output_within(mut cmd: Command, timeout: Duration) -> Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(out) => out.expect("wait"),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("{cmd:?} did not finish within {timeout:?}");
        }
    }
}

/// stdout and stderr of a finished command, for assertion messages.
pub fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Probes `ns -> ip:port` in a loop until stopped; records whether it ever got through.
pub struct Prober {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: std::thread::JoinHandle<bool>,
}

impl Prober {
    /// Starts probing.
    pub fn start(ns: &str, ip: &'static str, port: u16) -> Prober {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (ns, flag) = (ns.to_string(), stop.clone());
        let handle = std::thread::spawn(move || {
            let mut opened = false;
            while !flag.load(std::sync::atomic::Ordering::SeqCst) {
                opened |= can_connect(&ns, ip, port);
            }
            opened
        });
        Prober { stop, handle }
    }

    /// Stops probing; whether any probe got through.
    pub fn ever_opened(self) -> bool {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.handle.join().unwrap()
    }
}
