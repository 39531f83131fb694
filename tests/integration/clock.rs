//! Clocks and the status reply: a skewed or jumping wall clock (libfaketime) never
//! stretches a grant, times are shown in jitd's frame, and `status` comes in pages.
//! Proven over the network, through jitctl, and on the raw socket.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::util::*;

const POLICY: &str = "[[ports]]\nport = 22\nmax_duration = \"1h\"\n[[ports]]\nport = 3389\n";

/// libfaketime, as the Debian/Ubuntu package installs it.
const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// The path of libfaketime, which must be there (else the clock would silently be true).
fn libfaketime() -> String {
    assert!(
        Path::new(LIBFAKETIME).exists(),
        "{LIBFAKETIME} is missing: install the packages faketime and libfaketime (scripts/install-deps)"
    );
    LIBFAKETIME.into()
}

/// The environment that skews only the wall clock of a process: the offset is read from
/// `file` on every call, so writing the file makes the clock jump.
fn skewed(file: &Path) -> Vec<(&'static str, String)> {
    vec![
        ("LD_PRELOAD", libfaketime()),
        ("FAKETIME_TIMESTAMP_FILE", file.display().to_string()),
        ("FAKETIME_NO_CACHE", "1".into()),
        // the monotonic clock (and with it jitd's deadlines) stays true
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1".into()),
    ]
}

fn clock_file(setup: &Setup, offset: &str) -> PathBuf {
    let file = setup.dir.path().join("faketime");
    std::fs::write(&file, format!("{offset}\n")).unwrap();
    file
}

/// Starts jitd in `ns` with `envs` and waits until it answers.
fn start_with(setup: &Setup, ns: &str, envs: &[(&str, String)]) -> Jitd {
    let envs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let jitd = setup.spawn(ns, &envs);
    let ready = wait_for(Duration::from_secs(20), || jitd.ctl(&["status"]).status.success());
    assert!(ready, "jitd did not answer within 20s: {}", jitd.log_text());
    jitd
}

/// Runs jitctl as root with `envs` (a skewed clock).
fn ctl_with(setup: &Setup, envs: &[(&str, String)], args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_jitctl"));
    cmd.arg("--socket").arg(setup.socket()).args(args);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    output_within(cmd, Duration::from_secs(30))
}

fn json_of(out: &std::process::Output) -> Value {
    assert!(out.status.success(), "{}", text(out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", text(out)))
}

fn time_of(v: &Value) -> DateTime<Utc> {
    v.as_str().unwrap_or_else(|| panic!("not a time: {v}")).parse().unwrap()
}

fn records(setup: &Setup, action: &str) -> Vec<Value> {
    setup.audit().into_iter().filter(|r| r["action"] == action).collect()
}

#[test]
fn after_a_reboot_under_a_slow_wall_clock_nothing_is_restored_and_it_is_said_loudly() {
    let net = Net::new();
    serve_echo(&net.host, 22);
    let setup = Setup::new(POLICY);
    let jitd = setup.start(&net.host);
    let reply = jitd.ctl_json(&["request", "--port", "22", "--source", A4, "--duration", "120s"]);
    let id = reply["grants"][0]["id"].as_u64().unwrap();
    assert!(can_connect(&net.a, HOST_A4, 22));
    // a reboot: jitd gone, its table gone with the kernel's timers
    jitd.kill();
    let out = net.nft(&["delete", "table", "inet", "jitd"]);
    assert!(out.status.success(), "{}", text(&out));
    // ... and the wall clock comes back an hour slow
    let slow = vec![
        ("LD_PRELOAD", libfaketime()),
        ("FAKETIME", "-1h".to_string()),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1".to_string()),
    ];
    let jitd = start_with(&setup, &net.host, &slow);
    let log = jitd.log_text();
    assert!(log.contains("is behind the newest audit record"), "{log}");
    assert!(!can_connect(&net.a, HOST_A4, 22), "the grant is not back");
    let status = json_of(&ctl_with(&setup, &slow, &["--json", "status"]));
    assert_eq!(status["grants"], serde_json::json!([]), "{status}");
    assert_eq!(status["clock"]["behind_audit_at_start"], true, "{status}");
    let human = ctl_with(&setup, &slow, &["status"]);
    let human = String::from_utf8_lossy(&human.stdout).into_owned();
    assert!(human.contains("wall clock was behind the audit log"), "{human}");
    let ended = records(&setup, "expire");
    assert!(
        ended.iter().any(|r| r["grant_id"] == id
            && r["reason"]
                .as_str()
                .is_some_and(|why| why.starts_with("ended while jitd was not running"))),
        "{ended:?}"
    );
    let start = records(&setup, "start").pop().unwrap();
    assert!(
        start["reason"]
            .as_str()
            .unwrap()
            .contains("the wall clock is behind the audit log"),
        "{start}"
    );
    // still locked well after the grant's own end would have been
    assert!(!can_connect(&net.a, HOST_A4, 22));
}

/// jitd's clock jumps an hour forward while a 120 s grant runs: the grant still ends
/// by the monotonic clock, status shows it ending in the future by jitd's (new) clock,
/// says that the clock jumped, and `--until` is judged by jitd's clock.
#[test]
fn a_wall_clock_jump_neither_stretches_nor_misreports_a_grant() {
    let net = Net::new();
    serve_echo(&net.host, 22);
    let setup = Setup::new(POLICY);
    let file = clock_file(&setup, "+0");
    let env = skewed(&file);
    let jitd = start_with(&setup, &net.host, &env);
    jitd.ctl_json(&["request", "--port", "22", "--source", A4, "--duration", "120s"]);
    std::fs::write(&file, "+1h\n").unwrap();
    assert!(
        wait_for(Duration::from_secs(10), || jitd
            .log_text()
            .contains("wall clock jumped")),
        "{}",
        jitd.log_text()
    );
    let status = json_of(&ctl_with(&setup, &env, &["--json", "status"]));
    let g = &status["grants"][0];
    let now = time_of(&status["clock"]["now"]);
    let expires = time_of(&g["expires_at"]);
    let left = g["remaining_secs"].as_i64().unwrap();
    assert!((100..=120).contains(&left), "the monotonic clock still rules: {status}");
    assert!(expires > now, "expires_at in the future while time is left: {status}");
    assert!(
        ((expires - now).num_seconds() - left).abs() <= 2,
        "expires_at = now + remaining: {status}"
    );
    let client_now = Utc::now() + chrono::Duration::hours(1);
    assert!(
        (now - client_now).num_seconds().abs() <= 5,
        "jitd's frame is the skewed clock: {status}"
    );
    assert!(status["clock"]["jumps"].as_u64().unwrap() >= 1, "{status}");
    let by = status["clock"]["last_jump"]["by_secs"].as_i64().unwrap();
    assert!((3590..=3610).contains(&by), "{status}");
    let human = String::from_utf8_lossy(&ctl_with(&setup, &env, &["status"]).stdout).into_owned();
    assert!(human.contains("the wall clock jumped"), "{human}");
    let jumps = records(&setup, "clock");
    assert_eq!(jumps.len(), 1, "{jumps:?}");
    assert!(jumps[0]["reason"].as_str().unwrap().contains("jumped"), "{jumps:?}");
    assert!(can_connect(&net.a, HOST_A4, 22), "the grant still holds");

    // --until by jitd's clock (jitctl on the same host shares it) is approved for 5 min
    let until = (client_now + chrono::Duration::minutes(5)).to_rfc3339();
    let out = ctl_with(
        &setup,
        &env,
        &["--json", "request", "--port", "22", "--source", B4, "--until", &until],
    );
    let granted = json_of(&out);
    let left = granted["grants"][0]["remaining_secs"].as_i64().unwrap();
    assert!((290..=301).contains(&left), "{granted}");
    assert!(can_connect(&net.b, HOST_B4, 22));
    // a time that is in the past by jitd's clock is refused, naming jitd's clock
    let behind = (Utc::now() + chrono::Duration::minutes(5)).to_rfc3339();
    let out = jitd.ctl(&["request", "--port", "22", "--source", B4, "--until", &behind]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("by jitd's wall clock"), "{said}");
}

fn raw_status(setup: &Setup, request: &str) -> Value {
    let mut stream = UnixStream::connect(setup.socket()).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    stream.write_all(format!("{request}\n").as_bytes()).unwrap();
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).unwrap();
    let reply: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(reply["ok"], true, "{reply}");
    reply["result"].clone()
}

#[test]
fn status_comes_in_pages_that_a_cursor_walks_once_each() {
    let net = Net::new();
    let setup = Setup::new(POLICY);
    let jitd = setup.start(&net.host);
    for i in 1..=5 {
        let source = format!("10.9.0.{i}");
        jitd.ctl_json(&["request", "--port", "22", "--source", &source, "--duration", "1h"]);
    }
    let mut seen = Vec::new();
    let mut request = r#"{"v":1,"op":"status","limit":2}"#.to_string();
    for _ in 0..10 {
        let page = raw_status(&setup, &request);
        let grants = page["grants"].as_array().unwrap();
        assert!(grants.len() <= 2, "{page}");
        assert_eq!(page["ports"][0]["port"], 22, "every page carries the header");
        seen.extend(grants.iter().map(|g| g["id"].as_u64().unwrap()));
        match page["next_cursor"].as_str() {
            Some(c) => request = format!(r#"{{"v":1,"op":"status","limit":2,"cursor":"{c}"}}"#),
            None => break,
        }
    }
    assert_eq!(seen, vec![1, 2, 3, 4, 5]);
    // jitctl walks the pages itself and prints one JSON object, and one table
    let all = jitd.ctl_json(&["status"]);
    assert_eq!(all["grants"].as_array().unwrap().len(), 5, "{all}");
    assert!(all.get("next_cursor").is_none(), "{all}");
    let human = String::from_utf8_lossy(&jitd.ctl(&["status"]).stdout).into_owned();
    assert_eq!(human.matches("10.9.0.").count(), 5, "{human}");
    // a cursor that is not one is refused, naming the field
    let mut stream = UnixStream::connect(setup.socket()).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    stream
        .write_all(b"{\"v\":1,\"op\":\"status\",\"cursor\":\"nonsense\"}\n")
        .unwrap();
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).unwrap();
    let reply: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(reply["error"]["code"], "invalid_argument", "{reply}");
    assert!(
        reply["error"]["message"].as_str().unwrap().starts_with("cursor:"),
        "{reply}"
    );
}

/// A 120 s grant; the wall clock steps an hour ahead (audited); jitd is killed and
/// restarted with its table still in the kernel: the kernel's timer is the truth, so
/// the grant comes back with what the kernel has left, neither ended by the clock that
/// makes it look two minutes old nor longer than approved.
#[test]
fn a_wall_clock_step_before_a_crash_neither_ends_nor_stretches_a_grant() {
    let net = Net::new();
    serve_echo(&net.host, 22);
    let setup = Setup::new(POLICY);
    let file = clock_file(&setup, "+0");
    let env = skewed(&file);
    let jitd = start_with(&setup, &net.host, &env);
    let reply = jitd.ctl_json(&["request", "--port", "22", "--source", A4, "--duration", "120s"]);
    let id = reply["grants"][0]["id"].as_u64().unwrap();
    std::fs::write(&file, "+1h\n").unwrap();
    assert!(
        wait_for(Duration::from_secs(10), || !records(&setup, "clock").is_empty()),
        "the step is on record: {}",
        jitd.log_text()
    );
    jitd.kill();
    let jitd = start_with(&setup, &net.host, &env);
    let status = json_of(&ctl_with(&setup, &env, &["--json", "status"]));
    let grants = status["grants"].as_array().unwrap();
    assert_eq!(
        grants.len(),
        1,
        "the grant is back: {status}\n{}\n{:?}",
        jitd.log_text(),
        setup.audit()
    );
    assert_eq!(grants[0]["id"], id);
    let left = grants[0]["remaining_secs"].as_u64().unwrap();
    assert!(
        (60..=120).contains(&left),
        "the kernel's time left, at most the approved 120 s: {status}"
    );
    assert!(can_connect(&net.a, HOST_A4, 22), "the client still gets in");
    assert!(!can_connect(&net.b, HOST_B4, 22), "a stranger does not");
    assert!(
        net.ruleset().contains(&format!("{A4} . tcp . 22")),
        "the kernel still holds the element: {}",
        net.ruleset()
    );
    assert!(
        !records(&setup, "expire").iter().any(|r| r["grant_id"] == id),
        "not recorded as ended: {:?}",
        records(&setup, "expire")
    );
}
