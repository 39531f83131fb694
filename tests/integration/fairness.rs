//! One user cannot take jitd away from the others: a user with no role floods the
//! socket and still leaves room for root, admins and other users; a busy connection is
//! closed at its request cap; idle connections to the metrics endpoint neither exhaust
//! jitd's file descriptors nor make it spin.
//!
//! The flooding user is this test binary run again as another uid (std's
//! `CommandExt::uid`), entering [`hold_connections_child`]: no extra tool needed in CI.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::util::*;

/// The socket [`hold_connections_child`] connects to; unset: it does nothing.
const HOLD_SOCKET: &str = "JITD_TEST_HOLD_SOCKET";
/// How many connections it opens.
const HOLD_COUNT: &str = "JITD_TEST_HOLD_COUNT";
/// Its report line on stdout starts with this.
const REPORT: &str = "HOLD-REPORT ";

const STATUS: &[u8] = b"{\"v\":1,\"op\":\"status\"}\n";

const POLICY: &str = r#"
socket_group = "nogroup"
[access]
admins = ["uid:4242"]
"#;

/// Run by the tests as another user: opens `HOLD_COUNT` connections to `HOLD_SOCKET`,
/// asks `status` on each (so each is known to be served or refused), prints a report,
/// then keeps the served ones busy (a request every 2 s) until killed.
#[test]
#[ignore = "entry point of the connection holder run by the fairness tests"]
fn hold_connections_child() {
    let Ok(socket) = std::env::var(HOLD_SOCKET) else {
        return;
    };
    let count: usize = std::env::var(HOLD_COUNT).unwrap().parse().unwrap();
    let mut streams = Vec::new();
    for _ in 0..count {
        let Ok(stream) = UnixStream::connect(&socket) else {
            break;
        };
        stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        streams.push(stream);
    }
    for stream in &mut streams {
        let _ = stream.write_all(STATUS);
    }
    let (mut held, mut busy, mut messages) = (Vec::new(), 0, Vec::<String>::new());
    for stream in streams {
        let reply = read_reply(&stream);
        if reply["error"]["code"] == "busy" {
            busy += 1;
            let message = reply["error"]["message"].as_str().unwrap_or_default().to_string();
            if !messages.contains(&message) {
                messages.push(message);
            }
        } else if !reply.is_null() {
            held.push(stream);
        }
    }
    let report = json!({"held": held.len(), "busy": busy, "busy_messages": messages});
    println!("{REPORT}{report}");
    std::io::stdout().flush().unwrap();
    loop {
        std::thread::sleep(Duration::from_secs(2));
        for stream in &mut held {
            let _ = stream.write_all(STATUS);
            let _ = read_reply(stream);
        }
    }
}

/// One reply line from `stream`, as JSON; `null` if none came.
fn read_reply(mut stream: &UnixStream) -> Value {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while let Ok(1) = stream.read(&mut byte) {
        if byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
    }
    serde_json::from_slice(&line).unwrap_or(Value::Null)
}

/// A running [`hold_connections_child`]; killed on drop.
struct Holder {
    child: Child,
    report: Value,
}

impl Holder {
    /// Opens `count` connections to `socket` as `uid` (group 65534, no other groups)
    /// and waits for the report of how many were served.
    fn start(socket: &Path, uid: u32, count: usize) -> Holder {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "fairness::hold_connections_child",
                "--ignored",
                "--nocapture",
            ])
            .args(["--test-threads", "1"])
            .env(HOLD_SOCKET, socket)
            .env(HOLD_COUNT, count.to_string())
            .uid(uid)
            .gid(65534)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn the connection holder");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                // libtest prints "test NAME ... " on the same line first.
                if let Some((_, report)) = line.split_once(REPORT) {
                    let _ = tx.send(serde_json::from_str::<Value>(report).unwrap());
                }
            }
        });
        let report = rx.recv_timeout(Duration::from_secs(60));
        let mut holder = Holder {
            child,
            report: Value::Null,
        };
        holder.report = report.expect("the connection holder reports within 60s");
        holder
    }

    fn held(&self) -> u64 {
        self.report["held"].as_u64().unwrap()
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_flooding_user_is_capped_and_leaves_room_for_everyone_else() {
    let net = Net::new();
    let setup = Setup::new(&metrics_policy());
    let jitd = setup.start(&net.host);
    // uid 65534 has no role; it tries to take every slot and more.
    let flood = Holder::start(&setup.socket(), 65534, 600);
    assert_eq!(flood.held(), 32, "{}", flood.report);
    assert_eq!(flood.report["busy"], 600 - 32, "{}", flood.report);
    let messages = flood.report["busy_messages"].to_string();
    assert!(
        messages.contains("uid 65534 already has 32 connections open to jitd (limits.max_connections_per_user)"),
        "{messages}"
    );
    // While it holds them: root, an admin and another user with no role are served.
    let out = jitd.ctl(&["status"]);
    assert!(out.status.success(), "root: {}", text(&out));
    let out = jitd.ctl_as(4242, 65534, &["status"]);
    assert!(out.status.success(), "admin: {}", text(&out));
    let other = Holder::start(&setup.socket(), 4343, 1);
    assert_eq!(other.held(), 1, "{}", other.report);
    // ... and the flood was still holding its connections all along.
    let again = Holder::start(&setup.socket(), 65534, 1);
    assert_eq!(again.held(), 0, "{}", again.report);
    let refused = metric(&net.host, "jitd_refused_connections_total");
    assert!(refused >= 600 - 32, "refused_connections {refused}");
}

#[test]
fn root_takes_the_reserve_when_users_fill_the_general_pool() {
    let net = Net::new();
    let setup = Setup::new(POLICY);
    let jitd = setup.start(&net.host);
    // 16 users with no role, 32 connections each: 512, every slot if nothing were kept.
    let users: Vec<Holder> = (0..16).map(|i| Holder::start(&setup.socket(), 5000 + i, 32)).collect();
    let held: u64 = users.iter().map(Holder::held).sum();
    assert_eq!(held, 448, "{:?}", users.iter().map(|u| &u.report).collect::<Vec<_>>());
    let last = &users[15].report;
    assert_eq!(last["held"], 0, "{last}");
    assert!(
        last["busy_messages"]
            .to_string()
            .contains("jitd is serving 448 connections, all it serves for users without privileges"),
        "{last}"
    );
    // Root takes a reserved slot.
    let out = jitd.ctl(&["status"]);
    assert!(out.status.success(), "root: {}", text(&out));
}

#[test]
fn a_connection_is_closed_after_its_request_cap() {
    let net = Net::new();
    let setup = Setup::new(POLICY);
    let _jitd = setup.start(&net.host);
    let mut stream = UnixStream::connect(setup.socket()).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    // 1,001 requests on one connection: the first 1,000 are answered, then it closes.
    stream.write_all(&STATUS.repeat(1001)).unwrap();
    let mut reader = BufReader::new(&stream);
    let mut answered = 0;
    let end = loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) => break "closed".to_string(),
            Ok(_) => {
                let reply: Value = serde_json::from_str(&line).unwrap();
                assert_eq!(reply["ok"], true, "reply {answered}: {line}");
                answered += 1;
            }
            // Linux resets a Unix socket closed with unread data in it (our 1,001st line).
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break "closed".to_string(),
            Err(e) => break format!("{e} after {answered} replies"),
        }
    };
    assert_eq!((answered, end.as_str()), (1000, "closed"));
}

/// The value of the metric `name` scraped from jitd in `ns`.
fn metric(ns: &str, name: &str) -> u64 {
    let body = scrape(ns).expect("metrics answer");
    let line = body.lines().find(|l| l.starts_with(&format!("{name} "))).unwrap();
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

/// CPU time (user + system) the process `pid` has used.
fn cpu_time(pid: i32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit(") ").next().unwrap().split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).unwrap().unwrap() as u64;
    Duration::from_millis(ticks * 1000 / per_second)
}

fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
}

/// Sets jitd's file descriptor limit (soft and hard) to `n`.
fn limit_fds(pid: i32, n: usize) {
    let status = Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &format!("--nofile={n}:{n}")])
        .status()
        .unwrap();
    assert!(status.success());
}

const METRICS_PORT: u16 = 9839;

fn scrape(ns: &str) -> Option<String> {
    let mut stream = in_ns(ns, || {
        TcpStream::connect_timeout(&([127, 0, 0, 1], METRICS_PORT).into(), Duration::from_secs(2))
    })
    .ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").ok()?;
    let mut body = String::new();
    stream.read_to_string(&mut body).ok()?;
    body.contains("jitd_refused_connections_total").then_some(body)
}

fn idle_metrics_connections(ns: &str, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|_| in_ns(ns, || TcpStream::connect(("127.0.0.1", METRICS_PORT)).unwrap()))
        .collect()
}

/// Starts jitd with metrics on, and returns it with its fd count at rest.
fn with_metrics(net: &Net, setup: &Setup) -> (Jitd, usize) {
    let jitd = setup.start(&net.host);
    assert!(wait_for(Duration::from_secs(10), || scrape(&net.host).is_some()));
    std::thread::sleep(Duration::from_millis(500));
    let base = open_fds(jitd.pid());
    (jitd, base)
}

fn metrics_policy() -> String {
    format!("metrics_listen = \"127.0.0.1:{METRICS_PORT}\"\n{POLICY}")
}

#[test]
fn idle_metrics_connections_are_capped_and_time_out() {
    let net = Net::new();
    let setup = Setup::new(&metrics_policy());
    let (jitd, base) = with_metrics(&net, &setup);
    // Room for the 16 metrics connections and a few more, not for 40.
    limit_fds(jitd.pid(), base + 24);
    let idle = idle_metrics_connections(&net.host, 40);
    let started = Instant::now();
    let cpu_before = cpu_time(jitd.pid());
    std::thread::sleep(Duration::from_secs(2));
    let fds = open_fds(jitd.pid());
    assert!(fds <= base + 16 + 4, "jitd holds {fds} fds, {base} at rest");
    let out = jitd.ctl(&["status"]);
    assert!(out.status.success(), "status during the flood: {}", text(&out));
    let cpu = cpu_time(jitd.pid()) - cpu_before;
    let wall = started.elapsed();
    assert!(cpu < wall / 4, "jitd used {cpu:?} of CPU in {wall:?}: spinning");
    // The idle ones are closed after the metrics timeout; then scrapes work again.
    assert!(
        wait_for(Duration::from_secs(90), || scrape(&net.host).is_some()),
        "no scrape answered after the idle connections timed out: {}",
        jitd.log_text()
    );
    drop(idle);
}

#[test]
fn out_of_file_descriptors_jitd_backs_off_instead_of_spinning() {
    let net = Net::new();
    let setup = Setup::new(&metrics_policy());
    let (jitd, base) = with_metrics(&net, &setup);
    // Fewer descriptors than the metrics cap: accept itself fails with EMFILE.
    limit_fds(jitd.pid(), base + 4);
    let idle = idle_metrics_connections(&net.host, 24);
    let started = Instant::now();
    let cpu_before = cpu_time(jitd.pid());
    std::thread::sleep(Duration::from_secs(3));
    let cpu = cpu_time(jitd.pid()) - cpu_before;
    let wall = started.elapsed();
    assert!(cpu < wall / 4, "jitd used {cpu:?} of CPU in {wall:?}: spinning");
    let failures = jitd
        .log_text()
        .lines()
        .filter(|l| l.contains("accepting a metrics connection failed"))
        .count();
    assert!(
        (1..=3).contains(&failures),
        "want one message per burst of accept failures, got {failures}: {}",
        jitd.log_text()
    );
    // Once the idle ones time out, jitd serves again.
    assert!(
        wait_for(Duration::from_secs(90), || scrape(&net.host).is_some()),
        "{}",
        jitd.log_text()
    );
    drop(idle);
    let out = jitd.ctl(&["status"]);
    assert!(out.status.success(), "{}", text(&out));
}
