//! The knocking side: keys made by `ssh-keygen`, a real ssh-agent holding the
//! requester's private key, signatures (through the agent as a user makes them, or
//! in-process for bulk packets), knock packets, and the wait for the port to open.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use jitd::remote::packet;
use jitd::remote::request::{KnockRequest, Length};
use nix::poll::{PollFd, PollFlags, PollTimeout};
use socket2::{Domain, Protocol, Socket, Type};

use crate::util::text;

/// What the knocks call the host (one of `[remote] names`).
pub const HOST_NAME: &str = "web1.test";

/// A key pair made by `ssh-keygen -t ed25519` (no passphrase).
pub struct Key {
    /// The private key file (removed once the key is in the agent).
    pub path: PathBuf,
    /// The public key file.
    pub public_path: PathBuf,
    /// The public key line.
    pub public: String,
}

impl Key {
    /// Makes `dir/name` and `dir/name.pub`.
    pub fn new(dir: &Path, name: &str) -> Key {
        let path = dir.join(name);
        let out = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
            .arg(&path)
            .output()
            .expect("run ssh-keygen");
        assert!(out.status.success(), "ssh-keygen: {}", text(&out));
        let public_path = dir.join(format!("{name}.pub"));
        let public = std::fs::read_to_string(&public_path).unwrap().trim().to_string();
        Key {
            path,
            public_path,
            public,
        }
    }

    /// The private key, for signing in-process: the thousands of packets of the
    /// flood and the capacity runs, where a process per signature would take longer
    /// than the run (the `ssh-key` crate makes the same SSHSIG as `ssh-keygen -Y sign`).
    pub fn private(&self) -> ssh_key::PrivateKey {
        ssh_key::PrivateKey::read_openssh_file(&self.path).expect("read the private key")
    }
}

/// Signs `message` for knocks with `key`, in-process; the armoured SSHSIG.
pub fn sign_here(key: &ssh_key::PrivateKey, message: &str) -> String {
    let sig = key
        .sign(jitd::remote::NAMESPACE, ssh_key::HashAlg::Sha512, message.as_bytes())
        .expect("sign");
    sig.to_pem(ssh_key::LineEnding::LF).unwrap()
}

/// A real `ssh-agent` holding one private key, whose file is then deleted: every
/// signature of this key goes through the agent. Stopped on drop.
pub struct Agent {
    child: Child,
    /// `SSH_AUTH_SOCK`.
    pub socket: PathBuf,
}

impl Agent {
    /// Starts `ssh-agent -D -a DIR/agent.sock`, adds `key` and removes its file.
    pub fn start(dir: &Path, key: &Key) -> Agent {
        let socket = dir.join("agent.sock");
        let child = Command::new("ssh-agent")
            .arg("-D")
            .arg("-a")
            .arg(&socket)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run ssh-agent");
        let agent = Agent { child, socket };
        assert!(
            crate::util::wait_for(Duration::from_secs(10), || agent.socket.exists()),
            "ssh-agent made no socket"
        );
        let out = Command::new("ssh-add")
            .arg(&key.path)
            .env("SSH_AUTH_SOCK", &agent.socket)
            .output()
            .expect("run ssh-add");
        assert!(out.status.success(), "ssh-add: {}", text(&out));
        std::fs::remove_file(&key.path).unwrap();
        agent
    }

    /// Signs `message` as a user's `ssh-keygen -Y sign -f KEY.pub` does, through the
    /// agent; the armoured signature and how long ssh-keygen took.
    pub fn sign(&self, key: &Key, message: &str) -> (String, Duration) {
        let start = Instant::now();
        let mut child = Command::new("ssh-keygen")
            .args(["-Y", "sign", "-n", jitd::remote::NAMESPACE, "-f"])
            .arg(&key.public_path)
            .env("SSH_AUTH_SOCK", &self.socket)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run ssh-keygen -Y sign");
        child.stdin.take().unwrap().write_all(message.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "ssh-keygen -Y sign: {}", text(&out));
        (String::from_utf8(out.stdout).unwrap(), start.elapsed())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// 16 random bytes.
pub fn nonce() -> [u8; 16] {
    let mut n = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut n))
        .expect("read /dev/urandom");
    n
}

/// The canonical request for port 22, 10 minutes, signed now, with a fresh nonce;
/// `source`: a signed source (else the packet's source address is opened).
pub fn request(source: Option<IpAddr>) -> String {
    let now = Utc::now();
    KnockRequest {
        host: HOST_NAME.into(),
        ports: vec![22],
        length: Length::Duration(600),
        source: source.map(ipnet::IpNet::from),
        justification: Some("benchmark".into()),
        time: DateTime::from_timestamp(now.timestamp(), 0).unwrap(),
        nonce: nonce(),
    }
    .encode()
}

/// The knock datagram for `request` and its armoured signature.
pub fn frame(request: &str, armoured: &str) -> Vec<u8> {
    packet::frame(request, armoured).expect("a knock fits a datagram")
}

/// One TCP connection attempt from `src`, not waited for.
fn attempt(src: IpAddr, to: SocketAddr) -> std::io::Result<Socket> {
    let s = Socket::new(Domain::for_address(to), Type::STREAM, Some(Protocol::TCP))?;
    s.set_nonblocking(true)?;
    s.set_linger(Some(Duration::ZERO))?; // close with a reset: no TIME_WAIT pile-up
    s.bind(&SocketAddr::new(src, 0).into())?;
    match s.connect(&to.into()) {
        Ok(()) => Ok(s),
        Err(e) if e.raw_os_error() == Some(nix::libc::EINPROGRESS) => Ok(s),
        Err(e) => Err(e),
    }
}

/// Time from `start` to the first TCP connection from `src` to `to` that is accepted,
/// or `None` after `limit`. The attempts overlap (a locked port drops the SYN, and
/// the kernel would retry it only after a second): a new one every millisecond for
/// the first 200 ms, then every 10 ms. Call it on a thread in the client's namespace.
pub fn wait_open(src: IpAddr, to: SocketAddr, start: Instant, limit: Duration) -> Option<Duration> {
    let mut pending: Vec<Socket> = Vec::new();
    let mut next = Instant::now();
    loop {
        let now = Instant::now();
        if now >= start + limit {
            return None;
        }
        if now >= next {
            pending.extend(attempt(src, to).ok());
            let fast = now.duration_since(start) < Duration::from_millis(200);
            next = now + Duration::from_millis(if fast { 1 } else { 10 });
        }
        let ready: Vec<bool> = {
            let mut fds: Vec<PollFd> = pending
                .iter()
                .map(|s| PollFd::new(s.as_fd(), PollFlags::POLLOUT))
                .collect();
            let _ = nix::poll::poll(&mut fds, PollTimeout::from(1u8));
            fds.iter().map(|f| f.revents().is_some_and(|r| !r.is_empty())).collect()
        };
        let mut still = Vec::with_capacity(pending.len());
        for (s, ready) in pending.into_iter().zip(ready) {
            match (ready, s.take_error()) {
                (false, _) => still.push(s),
                (true, Ok(None)) => return Some(start.elapsed()),
                (true, _) => {} // refused or unreachable: that attempt is over
            }
        }
        pending = still;
    }
}

/// Panics unless a connection from `src` to `to` is dropped: the port is locked, so
/// a knock's opening is a real one. Call it on a thread in the client's namespace.
pub fn assert_locked(src: IpAddr, to: SocketAddr, what: &str) {
    let opened = wait_open(src, to, Instant::now(), Duration::from_millis(300));
    assert!(opened.is_none(), "port 22 is open for {src} {what}");
}

/// Ends every grant for `source` over jitd's socket.
pub fn revoke(socket: &Path, source: IpAddr) {
    let mut stream = UnixStream::connect(socket).expect("connect to jitd");
    let line = format!("{{\"v\":1,\"op\":\"revoke\",\"source\":\"{source}\"}}\n");
    stream.write_all(line.as_bytes()).unwrap();
    let mut reply = String::new();
    BufReader::new(&stream).read_line(&mut reply).unwrap();
    assert!(reply.contains("\"ok\":true"), "revoke {source}: {reply}");
}

/// Makes `src` the source address the client's kernel picks towards the host (the
/// connected route's preferred source), so that `jitctl knock` and its connection
/// attempts come from it. Call it on a thread in the client's namespace.
pub fn use_source(src: IpAddr, prefix: &str, dev: &str) {
    let out = Command::new("ip")
        .args([
            "route", "replace", prefix, "dev", dev, "proto", "kernel", "scope", "link", "src",
        ])
        .arg(src.to_string())
        .output()
        .unwrap();
    assert!(out.status.success(), "ip route replace: {}", text(&out));
}

/// `jitctl --json knock HOST --port 22` through the agent (its first key), started
/// and not waited for; `wait`: let jitctl wait for the port itself. Call it on a
/// thread in the client's namespace (the child inherits it).
pub fn spawn_jitctl(host: &str, agent: &Agent, home: &Path, wait: bool) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_jitctl"));
    cmd.args(["--json", "knock", host, "--port", "22", "--duration", "10m"])
        .args(["--justification", "benchmark"])
        .env("HOME", home)
        .env("SSH_AUTH_SOCK", &agent.socket)
        .env_remove("XDG_CONFIG_HOME")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if !wait {
        cmd.arg("--no-wait");
    }
    cmd.spawn().expect("run jitctl knock")
}

/// jitctl's JSON report, once it has exited successfully.
pub fn jitctl_report(child: Child) -> serde_json::Value {
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "jitctl knock: {}", text(&out));
    serde_json::from_slice(&out.stdout).expect("jitctl --json prints JSON")
}
