//! Restarts and reloads trust only what the current policy allows; refusal summaries
//! are written on time; stored input is shown escaped once; `revoke --terminate` cuts
//! only what it should, and its cuts survive a rebuilt table. Proven with the real
//! binaries in network namespaces, by connecting from client namespaces and by reading
//! the audit log.

use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::Value;

use crate::util::*;

/// A requester by uid only (no passwd entry): its role comes from `[access]` alone.
const REQUESTER: u32 = 4242;
/// `nogroup`, which may use the socket (`socket_group`).
const NOGROUP: u32 = 65534;

/// The policy before it is tightened: port 22 for 10.77.0.0/16 up to 4h, uid 4242 a
/// requester.
fn policy(port22: &str, access: &str) -> String {
    format!("socket_group = \"nogroup\"\n{port22}[[ports]]\nport = 3389\n[access]\n{access}\n")
}

const PORT22: &str =
    "[[ports]]\nport = 22\nallowed_sources = [\"10.77.0.0/16\", \"fd00:77::/32\"]\nmax_duration = \"4h\"\n";
const ROLE: &str = "requesters = [\"uid:4242\"]";

/// Requests port 22 for `source` as uid 4242 for `duration`; returns the grant id.
fn grant_as_requester(jitd: &Jitd, source: &str, duration: &str) -> u64 {
    jitd.request_as(REQUESTER, "22", source, duration)["grants"][0]["id"]
        .as_u64()
        .unwrap()
}

fn grants(jitd: &Jitd) -> Vec<Value> {
    jitd.ctl_json(&["status"])["grants"].as_array().unwrap().clone()
}

/// The audit records of grant `id` whose reason says the policy changed.
fn policy_changes(setup: &Setup, id: u64) -> Vec<Value> {
    setup
        .audit()
        .into_iter()
        .filter(|r| r["grant_id"] == id && r["reason"].as_str().is_some_and(|s| s.starts_with("policy changed")))
        .collect()
}

#[derive(Clone, Copy)]
enum Stop {
    Term,
    Kill,
}

/// A 3h grant for A on port 22 by uid 4242; jitd stopped (`how`), the policy
/// replaced with `tighter`, jitd started again.
fn restarted_under(tighter: &str, how: Stop) -> (Net, Setup, Jitd, u64) {
    let net = Net::new();
    for port in [22, 3389] {
        serve_echo(&net.host, port);
    }
    let setup = Setup::new(&policy(PORT22, ROLE));
    let jitd = setup.start(&net.host);
    let id = grant_as_requester(&jitd, A4, "3h");
    assert!(can_connect(&net.a, HOST_A4, 22), "the grant works before the restart");
    match how {
        Stop::Term => assert!(jitd.stop(Duration::from_secs(20)).success()),
        Stop::Kill => jitd.kill(),
    }
    setup.write_policy(tighter);
    let jitd = setup.start(&net.host);
    (net, setup, jitd, id)
}

/// After the restart the grant is gone: not in status, not in the kernel, A cannot
/// connect (when port 22 is still locked), and its end is audited with `reason`.
fn assert_ended(tighter: &str, how: Stop, reason: &str, still_locked: bool) {
    let (net, setup, jitd, id) = restarted_under(tighter, how);
    assert_eq!(grants(&jitd), Vec::<Value>::new(), "{}", jitd.log_text());
    assert!(!net.ruleset().contains(A4), "no element for A left: {}", net.ruleset());
    if still_locked {
        assert!(!can_connect(&net.a, HOST_A4, 22), "A cannot connect");
    }
    let ends = policy_changes(&setup, id);
    assert_eq!(ends.len(), 1, "{ends:?}");
    assert_eq!(
        (ends[0]["action"].as_str(), ends[0]["outcome"].as_str()),
        (Some("revoke"), Some("revoked"))
    );
    assert_eq!(ends[0]["reason"], reason);
}

fn outside_allowed_sources(how: Stop) {
    let port22 = PORT22.replace("\"10.77.0.0/16\", \"fd00:77::/32\"", "\"10.77.2.0/24\"");
    let reason = "policy changed: source 10.77.1.2 is no longer in allowed_sources of port 22/tcp";
    assert_ended(&policy(&port22, ROLE), how, reason, true);
}

fn port_no_longer_protected(how: Stop) {
    let reason = "policy changed: port 22/tcp is no longer protected";
    assert_ended(&policy("", ROLE), how, reason, false);
}

fn requester_lost_the_role(how: Stop) {
    let reason = "policy changed: 4242 (uid 4242) no longer holds the requester role";
    assert_ended(&policy(PORT22, "requesters = [\"uid:4243\"]"), how, reason, true);
}

/// The grant is clamped to the new 10m maximum: status, the kernel's element and the
/// audit log say so, and A still connects.
fn clamped_to_max_duration(how: Stop) {
    let (net, setup, jitd, id) = restarted_under(&policy(&PORT22.replace("4h", "10m"), ROLE), how);
    let live = grants(&jitd);
    assert_eq!(live.len(), 1, "{live:?}\n{}", jitd.log_text());
    let left = live[0]["remaining_secs"].as_u64().unwrap();
    assert!((500..=600).contains(&left), "at most 10m left: {left}");
    let ruleset = net.ruleset();
    // `A . tcp . 22 counter packets N bytes M timeout T expires E`
    let element = ruleset
        .split(&format!("{A4} . tcp . 22 "))
        .nth(1)
        .unwrap_or_else(|| panic!("A's element is not in the kernel: {ruleset}\n{}", jitd.log_text()));
    let timeout = element
        .split("timeout ")
        .nth(1)
        .expect("its timeout")
        .split([' ', ','])
        .next()
        .unwrap();
    assert!(!timeout.contains('h'), "the kernel's timeout is clamped too: {timeout}");
    assert!(can_connect(&net.a, HOST_A4, 22), "A still connects, for less time");
    let clamps = policy_changes(&setup, id);
    assert_eq!(clamps.len(), 1, "{clamps:?}");
    assert_eq!(
        (clamps[0]["action"].as_str(), clamps[0]["outcome"].as_str()),
        (Some("start"), Some("done"))
    );
    assert!(clamps[0]["reason"]
        .as_str()
        .unwrap()
        .contains("max_duration of port 22/tcp is now 10m"));
}

#[test]
fn a_restart_ends_a_grant_whose_source_is_no_longer_allowed() {
    outside_allowed_sources(Stop::Term);
}

#[test]
fn a_restart_after_kill_9_ends_a_grant_whose_source_is_no_longer_allowed() {
    outside_allowed_sources(Stop::Kill);
}

#[test]
fn a_restart_clamps_a_grant_to_a_shorter_max_duration() {
    clamped_to_max_duration(Stop::Term);
}

#[test]
fn a_restart_after_kill_9_clamps_a_grant_to_a_shorter_max_duration() {
    clamped_to_max_duration(Stop::Kill);
}

#[test]
fn a_restart_ends_a_grant_for_a_port_no_longer_protected() {
    port_no_longer_protected(Stop::Term);
}

#[test]
fn a_restart_after_kill_9_ends_a_grant_for_a_port_no_longer_protected() {
    port_no_longer_protected(Stop::Kill);
}

#[test]
fn a_restart_ends_the_grant_of_a_requester_who_lost_the_role() {
    requester_lost_the_role(Stop::Term);
}

#[test]
fn a_restart_after_kill_9_ends_the_grant_of_a_requester_who_lost_the_role() {
    requester_lost_the_role(Stop::Kill);
}

#[test]
fn sighup_ends_the_grant_of_a_requester_who_lost_the_role_and_clamps_the_rest() {
    let net = Net::new();
    serve_echo(&net.host, 22);
    let setup = Setup::new(&policy(PORT22, "requesters = [\"uid:4242\"]\nadmins = [\"uid:4243\"]"));
    let jitd = setup.start(&net.host);
    let lost = grant_as_requester(&jitd, A4, "3h");
    let kept = jitd.ctl_json(&["request", "--port", "22", "--source", B4, "--duration", "3h"])["grants"][0]["id"]
        .as_u64()
        .unwrap();
    assert!(can_connect(&net.a, HOST_A4, 22) && can_connect(&net.b, HOST_B4, 22));
    setup.write_policy(&policy(&PORT22.replace("4h", "10m"), "admins = [\"uid:4243\"]"));
    jitd.signal(Signal::SIGHUP);
    assert!(
        wait_for(Duration::from_secs(15), || grants(&jitd).len() == 1),
        "the requester's grant ends: {}",
        jitd.log_text()
    );
    assert!(
        wait_for(Duration::from_secs(10), || !can_connect(&net.a, HOST_A4, 22)),
        "A cannot connect: {}",
        net.ruleset()
    );
    let ends = policy_changes(&setup, lost);
    assert_eq!(ends.len(), 1, "{ends:?}");
    assert_eq!(
        (ends[0]["action"].as_str(), ends[0]["outcome"].as_str()),
        (Some("reload"), Some("revoked"))
    );
    assert_eq!(
        ends[0]["reason"],
        "policy changed: 4242 (uid 4242) no longer holds the requester role"
    );
    // root's grant stays, cut to the new maximum
    let left = grants(&jitd)[0]["remaining_secs"].as_u64().unwrap();
    assert!((500..=600).contains(&left), "{left}");
    assert!(can_connect(&net.b, HOST_B4, 22), "B still connects");
    let clamps = policy_changes(&setup, kept);
    assert_eq!(clamps.len(), 1, "{clamps:?}");
    assert_eq!(
        (clamps[0]["action"].as_str(), clamps[0]["outcome"].as_str()),
        (Some("reload"), Some("done"))
    );
}

#[test]
fn refusal_summaries_are_written_when_their_interval_ends_without_another_request() {
    const FLOODER: u32 = 54_322;
    const THREADS: usize = 4;
    const EACH: usize = 50;
    let net = Net::new();
    let setup = Setup::new(&policy(PORT22, ROLE));
    // a 20 s interval (debug builds), long enough for the flood to fit in one
    let jitd = setup.start_with(&net.host, &[("JITD_REFUSAL_INTERVAL_MS", "20000")]);
    std::thread::scope(|s| {
        for _ in 0..THREADS {
            s.spawn(|| {
                for _ in 0..EACH {
                    let out = jitd.ctl_as(
                        FLOODER,
                        NOGROUP,
                        &["request", "--port", "22", "--source", A4, "--duration", "1h"],
                    );
                    assert_eq!(out.status.code(), Some(1), "refused: {}", text(&out));
                }
            });
        }
    });
    let mine = |outcome: &str| -> Vec<Value> {
        setup
            .audit()
            .into_iter()
            .filter(|r| r["actor_uid"] == FLOODER && r["outcome"] == outcome)
            .collect()
    };
    // the interval is 20 s from the first refusal; nobody asks anything after the flood
    assert!(
        wait_for(Duration::from_secs(60), || !mine("suppressed").is_empty()),
        "a summary is written once the interval ends: {:?}",
        setup.audit().last()
    );
    let full = mine("denied").len();
    let summaries = mine("suppressed");
    assert_eq!((full, summaries.len()), (20, 1), "{summaries:?}");
    let reason = summaries[0]["reason"].as_str().unwrap();
    assert!(
        reason.starts_with(&format!("{} refusal(s) from uid {FLOODER}", THREADS * EACH - 20)),
        "{reason}"
    );
}

#[test]
fn a_refused_callers_input_is_shown_escaped_once() {
    let net = Net::new();
    let setup = Setup::new(&policy(PORT22, ROLE));
    let jitd = setup.start(&net.host);
    let out = jitd.ctl_as(
        REQUESTER,
        NOGROUP,
        &[
            "request",
            "--port",
            "22",
            "--source",
            "10.9.9.9\x1b[2J\\x",
            "--duration",
            "1h",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let once = r"(unchecked input, escaped) 10.9.9.9\u{1b}[2J\\x";
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(once),
        "jitctl shows jitd's message escaped once: {stderr}"
    );
    let stored = setup.audit().into_iter().find(|r| r["outcome"] == "denied").unwrap();
    assert_eq!(stored["source"], once, "the log holds the escaped text, no raw byte");
    for args in [&["audit"][..], &["audit", "--format", "csv"][..]] {
        let out = jitd.ctl(args);
        let shown = String::from_utf8_lossy(&out.stdout);
        assert!(shown.contains(once), "{args:?} shows it escaped once: {shown}");
        assert!(
            !shown.contains(r"\\u{1b}") && !shown.contains('\x1b'),
            "{args:?}: {shown}"
        );
    }
}

/// Opens a TCP connection from `ns`, from address `from`, to `host:port`.
fn connect_from(ns: &str, from: &str, host: &str, port: u16) -> TcpStream {
    use socket2::{Domain, Protocol, Socket, Type};
    let local: SocketAddr = format!("{from}:0").parse().unwrap();
    let target: SocketAddr = format!("{host}:{port}").parse().unwrap();
    let socket = in_ns(ns, || Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))).unwrap();
    socket.bind(&local.into()).unwrap();
    socket.connect_timeout(&target.into(), BLOCKED_AFTER).expect("connect");
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    stream.set_write_timeout(Some(Duration::from_secs(3))).unwrap();
    stream
}

fn entry(stream: &TcpStream) -> String {
    let local = stream.local_addr().unwrap();
    format!("tcp {}:{} -> {HOST_A4}:22", local.ip(), local.port())
}

#[test]
fn terminating_a_wide_grant_spares_sessions_a_narrower_live_grant_allows() {
    let net = Net::new();
    serve_echo(&net.host, 22);
    let ip = Command::new("ip")
        .args(["-n", &net.a, "addr", "add", "10.77.1.3/24", "dev", "c0"])
        .output()
        .unwrap();
    assert!(ip.status.success(), "{}", text(&ip));
    let setup = Setup::new(&policy(PORT22, ROLE));
    let jitd = setup.start(&net.host);
    grant_as_requester(&jitd, A4, "1h");
    jitd.ctl_json(&[
        "request",
        "--port",
        "22",
        "--source",
        "10.77.1.0/24",
        "--duration",
        "1h",
    ]);
    let mut narrow = connect_from(&net.a, A4, HOST_A4, 22);
    let mut wide_only = connect_from(&net.a, "10.77.1.3", HOST_A4, 22);
    assert!(exchange(&mut narrow, b"a") && exchange(&mut wide_only, b"b"));
    let reply = jitd.ctl_json(&["revoke", "--terminate", "--source", "10.77.1.0/24"]);
    let cut: Vec<String> = serde_json::from_value(reply["terminated"].clone()).unwrap();
    assert_eq!(cut, vec![entry(&wide_only)], "{reply}");
    assert!(
        wait_for(Duration::from_secs(10), || !exchange(&mut wide_only, b"after")),
        "the session only the revoked grant allowed is cut"
    );
    assert!(
        exchange(&mut narrow, b"still allowed"),
        "the session uid 4242's grant allows is not cut"
    );
    assert!(can_connect(&net.a, HOST_A4, 22), "uid 4242's grant still works");
    let terminated = setup.audit().into_iter().find(|r| r["action"] == "terminate").unwrap();
    let reason = terminated["reason"].as_str().unwrap();
    assert!(
        reason.contains(&format!(
            "kept 1 session(s) another live grant still allows: {}",
            entry(&narrow)
        )),
        "{reason}"
    );
}

#[test]
fn cut_sessions_stay_cut_when_a_repair_rebuilds_the_table() {
    let net = Net::new();
    serve_echo(&net.host, 22);
    let setup = Setup::new(&policy(PORT22, ROLE));
    let jitd = setup.start(&net.host);
    jitd.ctl_json(&["request", "--port", "22", "--source", A4, "--duration", "1h"]);
    let mut session = connect(&net.a, HOST_A4, 22).expect("connect during the grant");
    assert!(exchange(&mut session, b"granted"));
    let reply = jitd.ctl_json(&["revoke", "--terminate", "--source", A4]);
    assert_eq!(reply["terminated"].as_array().map(Vec::len), Some(1), "{reply}");
    // the session sends nothing yet; the table is tampered with and rebuilt
    let out = net.nft(&["flush", "chain", "inet", "jitd", "syn_check"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        wait_for(Duration::from_secs(20), || setup
            .audit()
            .iter()
            .any(|r| r["action"] == "repair")),
        "jitd rebuilds the table: {}",
        jitd.log_text()
    );
    let ruleset = net.ruleset();
    let cut4 = ruleset
        .split("set cut4")
        .nth(1)
        .unwrap()
        .split('}')
        .take(2)
        .collect::<String>();
    assert!(cut4.contains(A4), "the rebuilt cut set holds the session: {ruleset}");
    assert!(
        !exchange(&mut session, b"resumed after the rebuild"),
        "the cut session does not come back"
    );
}
