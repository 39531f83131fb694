//! `jitctl doctor` against the real kernel: an unprotected SSH server found by its
//! process, another firewall's table that drops a protected port (shown to defeat a
//! real grant), both fixed the way the doctor says, and a host that turns healthy; a
//! user with no role binding more sockets than the doctor reads; a viewer who is not
//! root; a stopped jitd.

use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use crate::util::*;

/// A policy a viewer (uid 4242, group nogroup) may use the socket under.
const POLICY: &str = "socket_group = \"nogroup\"\nmetrics_listen = \"127.0.0.1:9839\"\n[[ports]]\nport = 22\n[access]\nviewers = [\"uid:4242\"]\n";

/// Another firewall's hand-written input chain: policy drop, and port 2222 allowed
/// (port 22, which jitd protects, is not).
const OTHER_FIREWALL: &str = "table inet filter {
  chain input {
    type filter hook input priority filter; policy drop;
    ct state established,related accept
    iif lo accept
    tcp dport 2222 accept
  }
}
";

/// A process that holds a listening socket and does nothing else, named as its file:
/// a copy of /bin/sleep called `name`, given the socket as an open file, so that
/// `/proc/PID/comm` says `name` and the socket is the process's alone.
struct FakeService {
    child: Child,
}

impl FakeService {
    fn start(ns: &str, dir: &Path, name: &str, address: &str) -> FakeService {
        let listener = in_ns(ns, || std::net::TcpListener::bind(address)).expect("bind");
        let program = dir.join(name);
        std::fs::copy("/bin/sleep", &program).expect("copy /bin/sleep");
        let fd = listener.as_raw_fd();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns])
            .arg(&program)
            .arg("300")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: dup2 is async-signal-safe; the copy (fd 100) is not close-on-exec.
        unsafe {
            cmd.pre_exec(move || nix::unistd::dup2(fd, 100).map(|_| ()).map_err(std::io::Error::from));
        }
        let child = cmd.spawn().expect("spawn the fake service");
        drop(listener); // from here on only the fake service holds it
        FakeService { child }
    }
}

impl Drop for FakeService {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Processes of a user with no role (uid 4242, `sleep`) holding `count` UDP sockets
/// they bound in `ns`: on loopback (127.0.0.1, then 127.0.0.2, ...) or on every address
/// (0.0.0.0), from port 1024 on, each with SO_REUSEADDR (so that ports may repeat); as
/// many processes as the open-file limit needs.
struct Hoard {
    children: Vec<Child>,
}

impl Hoard {
    fn start(ns: &str, count: usize, loopback: bool) -> Hoard {
        use nix::sys::resource::{getrlimit, Resource};
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        let each = (hard as usize).saturating_sub(64).clamp(1, 16_000);
        let mut hoard = Hoard { children: Vec::new() };
        for first in (0..count).step_by(each) {
            let child = Hoard::spawn(ns, first..count.min(first + each), loopback);
            hoard.children.push(child);
        }
        hoard
    }

    fn spawn(ns: &str, range: std::ops::Range<usize>, loopback: bool) -> Child {
        use nix::sys::socket::{bind, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn};
        let netns = std::fs::File::open(format!("/var/run/netns/{ns}")).expect("namespace exists");
        let netns_fd = netns.as_raw_fd();
        let mut cmd = Command::new("/bin/sleep");
        cmd.arg("300")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: only system calls between fork and exec (no allocation, no locks); the
        // sockets are not close-on-exec, so that sleep holds them
        unsafe {
            cmd.pre_exec(move || {
                use nix::sys::resource::{getrlimit, setrlimit, Resource};
                use std::os::fd::{BorrowedFd, IntoRawFd};
                let fail = |e: nix::Error| std::io::Error::from(e);
                let netns = BorrowedFd::borrow_raw(netns_fd);
                nix::sched::setns(netns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(fail)?;
                let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(fail)?;
                setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(fail)?;
                nix::unistd::setgroups(&[]).map_err(fail)?;
                nix::unistd::setgid(nix::unistd::Gid::from_raw(65534)).map_err(fail)?;
                nix::unistd::setuid(nix::unistd::Uid::from_raw(4242)).map_err(fail)?;
                for n in range.clone() {
                    let port = 1024 + (n % 60_000) as u16;
                    let address = match loopback {
                        true => SockaddrIn::new(127, 0, 0, 1 + (n / 60_000) as u8, port),
                        false => SockaddrIn::new(0, 0, 0, 0, port),
                    };
                    let fd = socket(AddressFamily::Inet, SockType::Datagram, SockFlag::empty(), None).map_err(fail)?;
                    setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(fail)?;
                    bind(fd.as_raw_fd(), &address).map_err(fail)?;
                    let _ = fd.into_raw_fd();
                }
                Ok(())
            });
        }
        cmd.spawn().expect("bind the sockets as uid 4242 and sleep")
    }
}

impl Drop for Hoard {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn doctor(jitd: &Jitd, uid: Option<u32>) -> (Output, serde_json::Value) {
    let args = ["--json", "doctor"];
    let out = match uid {
        Some(uid) => jitd.ctl_as(uid, 65534, &args),
        None => jitd.ctl(&args),
    };
    let report = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (out, report)
}

fn check<'a>(report: &'a serde_json::Value, id: &str) -> Option<&'a serde_json::Value> {
    report["checks"].as_array()?.iter().find(|c| c["id"] == id)
}

fn failing(report: &serde_json::Value) -> Vec<String> {
    report["checks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["status"] == "fail")
        .map(|c| c["id"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn doctor_finds_an_unprotected_sshd_and_a_table_that_drops_a_protected_port_and_turns_healthy_once_fixed() {
    let net = Net::new();
    let setup = Setup::new(POLICY);
    serve_echo(&net.host, 22);
    let _sshd = FakeService::start(&net.host, setup.dir.path(), "sshd", "[::]:2222");
    let _postgres = FakeService::start(&net.host, setup.dir.path(), "postgres", "127.0.0.1:5432");
    let fw = setup.dir.path().join("other-firewall.nft");
    std::fs::write(&fw, OTHER_FIREWALL).unwrap();
    net.nft_ok(&["-f", fw.to_str().unwrap()]);
    let jitd = setup.start(&net.host);

    // found, by a viewer who is not root (jitd reads the ruleset and the processes)
    let (out, report) = doctor(&jitd, Some(4242));
    assert_eq!(out.status.code(), Some(1), "unhealthy: {}", text(&out));
    assert_eq!(
        failing(&report),
        ["port.22/tcp.reachable", "recommend.2222/tcp"],
        "{report:#}"
    );
    let sshd = check(&report, "recommend.2222/tcp").unwrap();
    assert!(
        sshd["summary"].as_str().unwrap().starts_with("SSH (sshd (pid "),
        "{sshd}"
    );
    assert!(
        sshd["toml"]
            .as_str()
            .unwrap()
            .contains("port = 2222\nprotocol = \"tcp\""),
        "{sshd}"
    );
    let blocked = check(&report, "port.22/tcp.reachable").unwrap();
    assert!(
        blocked["summary"]
            .as_str()
            .unwrap()
            .contains("table inet filter chain input (policy drop) drops it"),
        "{blocked}"
    );
    assert!(
        check(&report, "recommend.5432/tcp").is_none(),
        "a loopback listener is not exposed: {report:#}"
    );
    let status = String::from_utf8_lossy(&jitd.ctl(&["status"]).stdout).to_string();
    assert!(
        status.contains("\nHealth: unhealthy: 2 problems (jitctl doctor)\n"),
        "{status}"
    );
    let metrics = scrape(&net.host);
    assert!(
        metrics.contains("\njitd_healthy 0\n") && metrics.contains("\njitd_health_problems 2\n"),
        "{metrics}"
    );

    // the doctor is right: a grant does not get through the other table
    jitd.ctl_json(&["request", "--port", "22", "--source", A4, "--duration", "10m"]);
    assert!(
        !can_connect(&net.a, HOST_A4, 22),
        "the other table drops it despite the grant"
    );

    // fix both as the doctor says: its nft command, and its lines in the policy
    let fix = blocked["fix"].as_str().unwrap();
    let command = fix.split('`').nth(1).expect("a command in backticks");
    let args: Vec<&str> = command
        .strip_prefix("nft ")
        .expect("an nft command")
        .split(' ')
        .collect();
    net.nft_ok(&args);
    let policy = std::fs::read_to_string(setup.policy()).unwrap();
    let with_2222 = policy.replace("[access]", &format!("{}\n[access]", sshd["toml"].as_str().unwrap()));
    std::fs::write(setup.policy(), with_2222).unwrap();
    let reload = jitd.ctl(&["reload"]);
    assert!(reload.status.success(), "{}", text(&reload));

    // the very next doctor checks afresh and sees the fix (no result from before it)
    let (out, report) = doctor(&jitd, Some(4242));
    assert_eq!(out.status.code(), Some(0), "healthy at once: {report:#}");
    assert!(report.get("shared_age_ms").is_none(), "{report:#}");
    assert!(can_connect(&net.a, HOST_A4, 22), "the grant gets through now");
    let status = String::from_utf8_lossy(&jitd.ctl(&["status"]).stdout).to_string();
    assert!(status.contains("Health: healthy"), "{status}");
    let metrics = scrape(&net.host);
    assert!(
        metrics.contains("\njitd_healthy 1\n") && metrics.contains("\njitd_health_problems 0\n"),
        "{metrics}"
    );
}

/// More UDP sockets than the doctor once kept in all (65,536, IPv4 read first).
const MANY: usize = 66_000;

#[test]
fn a_user_binding_many_loopback_sockets_hides_no_listener_from_the_doctor() {
    let net = Net::new();
    let setup = Setup::new(POLICY);
    serve_echo(&net.host, 22);
    let _sshd = FakeService::start(&net.host, setup.dir.path(), "sshd", "[::]:2222");
    let _hoard = Hoard::start(&net.host, MANY, true);
    let jitd = setup.start(&net.host);
    // the kernel sends none of the loopback sockets: the unprotected sshd is seen
    let (out, report) = doctor(&jitd, Some(4242));
    assert_eq!(out.status.code(), Some(1), "unhealthy: {}", text(&out));
    assert_eq!(failing(&report), ["recommend.2222/tcp"], "{report:#}");
    assert!(
        check(&report, "port.22/tcp.listening").is_some_and(|c| c["status"] == "ok"),
        "{report:#}"
    );
}

#[test]
fn a_user_binding_more_sockets_than_the_doctor_reads_crowds_out_only_their_own_and_the_doctor_says_so() {
    let net = Net::new();
    let setup = Setup::new(POLICY);
    serve_echo(&net.host, 22);
    let _sshd = FakeService::start(&net.host, setup.dir.path(), "sshd", "[::]:2222");
    let _hoard = Hoard::start(&net.host, MANY, false);
    let jitd = setup.start(&net.host);
    let (out, report) = doctor(&jitd, Some(4242));
    assert_eq!(out.status.code(), Some(1), "unhealthy: {}", text(&out));
    assert_eq!(
        failing(&report),
        ["recommend.2222/tcp", "listeners.left_out"],
        "{report:#}"
    );
    let left = check(&report, "listeners.left_out").unwrap();
    assert!(left["summary"].as_str().unwrap().contains("uid 4242"), "{left}");
}

#[test]
fn doctor_needs_the_viewer_role_and_cannot_tell_without_it() {
    let net = Net::new();
    let setup = Setup::new(POLICY);
    let jitd = setup.start(&net.host);
    let (out, report) = doctor(&jitd, Some(4243));
    assert_eq!(out.status.code(), Some(2), "could not tell: {}", text(&out));
    assert!(report["healthy"].is_null(), "{report}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not_authorized"),
        "{}",
        text(&out)
    );
}

#[test]
fn doctor_says_jitd_is_not_running_when_it_is_stopped() {
    let net = Net::new();
    let setup = Setup::new(POLICY);
    let jitd = setup.start(&net.host);
    assert!(jitd.stop(Duration::from_secs(15)).success());
    let out = jitctl(&setup.socket(), &["doctor"], Some((4242, 65534)));
    assert_eq!(
        out.status.code(),
        Some(1),
        "a stopped jitd is unhealthy: {}",
        text(&out)
    );
    let human = String::from_utf8_lossy(&out.stdout);
    assert!(human.starts_with("FAIL  jitd is not running (no socket at "), "{human}");
    assert!(human.contains("unhealthy: 1 problem"), "{human}");
}

fn scrape(ns: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = in_ns(ns, || std::net::TcpStream::connect("127.0.0.1:9839")).expect("metrics endpoint");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}
