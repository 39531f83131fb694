//! jitd as a service: the systemd notification protocol, and self-explaining binaries.

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use crate::util::*;

fn next_message(socket: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = socket.recv(&mut buf).expect("a notification within the timeout");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn ready_is_sent_only_once_the_lockdown_is_in_the_kernel_and_the_watchdog_is_petted() {
    let net = Net::new();
    serve_echo(&net.host, 22);
    let setup = Setup::new("[[ports]]\nport = 22\n");
    let path = setup.dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&path).unwrap();
    notify.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let jitd = setup.spawn(
        &net.host,
        &[("NOTIFY_SOCKET", path.to_str().unwrap()), ("WATCHDOG_USEC", "400000")],
    );
    let ready = next_message(&notify);
    assert!(ready.contains("READY=1"), "{ready}");
    assert!(ready.contains("STATUS=locked 22/tcp"), "{ready}");
    // READY means the lockdown is already enforced
    assert!(net.ruleset().contains("table inet jitd"));
    assert!(!can_connect(&net.a, HOST_A4, 22));
    let start = Instant::now();
    let mut pets = 0;
    while pets < 2 {
        let msg = next_message(&notify);
        if msg.contains("WATCHDOG=1") {
            pets += 1;
        }
    }
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "watchdog petted at half the interval"
    );
    let status = jitd.stop(Duration::from_secs(5));
    assert!(status.success());
    let mut seen_stopping = false;
    notify.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let mut buf = [0u8; 4096];
    while let Ok(n) = notify.recv(&mut buf) {
        seen_stopping |= String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1");
    }
    assert!(seen_stopping, "STOPPING=1 sent on SIGTERM");
}

#[test]
fn the_binaries_explain_themselves() {
    let run = |bin: &str, args: &[&str]| {
        let out = std::process::Command::new(bin).args(args).output().unwrap();
        assert!(out.status.success(), "{bin} {args:?}: {}", text(&out));
        String::from_utf8(out.stdout).unwrap()
    };
    let jitd = env!("CARGO_BIN_EXE_jitd");
    let jitctl = env!("CARGO_BIN_EXE_jitctl");
    assert!(run(jitd, &["--version"]).starts_with(&format!("jitd {}", env!("CARGO_PKG_VERSION"))));
    let help = run(jitd, &["--help"]);
    for needle in [
        "--config",
        "/etc/jitd/jitd.toml",
        "--check-config",
        "--unlock",
        "Exit status",
        "SIGHUP",
    ] {
        assert!(help.contains(needle), "jitd --help lacks {needle}:\n{help}");
    }
    let help = run(jitctl, &["--help"]);
    for needle in [
        "request",
        "revoke",
        "status",
        "audit",
        "reload",
        "--json",
        "Exit status",
    ] {
        assert!(help.contains(needle), "jitctl --help lacks {needle}:\n{help}");
    }
    for sub in ["request", "revoke", "status", "audit", "reload"] {
        let help = run(jitctl, &[sub, "--help"]);
        assert!(help.contains("Usage: jitctl"), "{sub}: {help}");
    }
    assert!(run(jitctl, &["request", "--help"]).contains("SSH_CONNECTION"));
}

#[test]
fn the_unit_file_is_valid_and_hardened() {
    // No silent skip: CI installs systemd-analyze (scripts/install-deps, .ci/run).
    let out = std::process::Command::new("systemd-analyze")
        .args(["security", "--offline=true", "systemd/jitd.service"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run systemd-analyze ({e}): install the systemd package (scripts/install-deps does)")
        });
    let report = String::from_utf8_lossy(&out.stdout);
    let level: f64 = report
        .lines()
        .find_map(|l| l.split("Overall exposure level for jitd.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{report}"));
    assert!(level <= 2.0, "exposure {level}:\n{report}");
    // and `systemd-analyze verify` is clean (with ExecStart pointing at the built binary)
    let dir = tempfile::tempdir().unwrap();
    let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/jitd.service")).unwrap();
    let path = dir.path().join("jitd.service");
    std::fs::write(&path, unit.replace("/usr/sbin/jitd", env!("CARGO_BIN_EXE_jitd"))).unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}",
        text(&out)
    );
}

#[test]
fn jitd_runs_as_an_unprivileged_user_with_only_cap_net_admin() {
    use std::os::unix::fs::chown;
    let net = Net::new();
    serve_echo(&net.host, 22);
    let setup = Setup::new("");
    // a socket directory and state_dir the unprivileged user owns, as systemd's
    // RuntimeDirectory= and StateDirectory= give it
    let run = setup.dir.path().join("run");
    std::fs::create_dir(&run).unwrap();
    std::fs::create_dir(setup.state_dir()).unwrap();
    for dir in [&run, &setup.state_dir()] {
        chown(dir, Some(65534), Some(65534)).unwrap();
    }
    let socket = run.join("jitd.sock");
    std::fs::write(
        setup.policy(),
        format!(
            "socket = \"{}\"\nstate_dir = \"{}\"\n[[ports]]\nport = 22\n",
            socket.display(),
            setup.state_dir().display()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(setup.dir.path().join("unprivileged.log")).unwrap();
    let mut child = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &net.host,
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
        ])
        .args([
            "--inh-caps=-all,+net_admin",
            "--ambient-caps=-all,+net_admin",
            "--bounding-set=-all,+net_admin",
        ])
        .arg(env!("CARGO_BIN_EXE_jitd"))
        .arg("--config")
        .arg(setup.policy())
        .stderr(log)
        .spawn()
        .unwrap();
    let ready = wait_for(Duration::from_secs(15), || {
        jitctl(&socket, &["status"], None).status.success()
    });
    let log_text = || std::fs::read_to_string(setup.dir.path().join("unprivileged.log")).unwrap_or_default();
    assert!(ready, "jitd did not come up as nobody: {}", log_text());
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    assert!(
        status.lines().any(|l| l.starts_with("Uid:") && l.contains("65534")),
        "{status}"
    );
    // CAP_NET_ADMIN is bit 12: the effective set holds it and nothing else
    assert!(status.lines().any(|l| l == "CapEff:\t0000000000001000"), "{status}");
    assert!(!can_connect(&net.a, HOST_A4, 22), "locked by the unprivileged jitd");
    let out = jitctl(
        &socket,
        &["request", "--port", "22", "--source", A4, "--duration", "1m"],
        None,
    );
    assert!(out.status.success(), "{}\n{}", text(&out), log_text());
    assert!(can_connect(&net.a, HOST_A4, 22), "granted");
    let out = net.nft(&["flush", "ruleset"]);
    assert!(out.status.success());
    assert!(
        wait_for(Duration::from_secs(20), || !can_connect(&net.b, HOST_B4, 22)),
        "drift repaired without root: {}",
        log_text()
    );
    let _ = child.kill();
    let _ = child.wait();
}

fn scrape(ns: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = in_ns(ns, || std::net::TcpStream::connect("127.0.0.1:9839")).expect("metrics endpoint");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
    response
}

fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn metrics_are_opt_in_and_move_with_requests() {
    let net = Net::new();
    let setup = Setup::new("metrics_listen = \"127.0.0.1:9839\"\n[[ports]]\nport = 22\nmax_duration = \"1h\"\n");
    let jitd = setup.start(&net.host);
    let before = scrape(&net.host);
    assert!(before.contains("# TYPE jitd_requests counter"), "{before}");
    jitd.ctl_json(&["request", "--port", "22", "--source", A4, "--duration", "10m"]);
    let _ = jitd.ctl(&["request", "--port", "22", "--source", A4, "--duration", "2h"]);
    let after = scrape(&net.host);
    assert_eq!(
        sample(&after, "jitd_requests_total{outcome=\"approved\",reason=\"\"}"),
        1.0,
        "{after}"
    );
    assert_eq!(
        sample(
            &after,
            "jitd_requests_total{outcome=\"denied\",reason=\"duration_too_long\"}"
        ),
        1.0,
        "{after}"
    );
    assert_eq!(sample(&after, "jitd_active_grants"), 1.0, "{after}");
    assert_eq!(sample(&after, "jitd_grant_duration_seconds_count"), 1.0, "{after}");
    assert!(
        sample(&after, "jitd_nft_transaction_seconds_count") >= 2.0,
        "start and the grant: {after}"
    );
    let out = jitd.ctl(&["status"]);
    let human = String::from_utf8_lossy(&out.stdout);
    assert!(human.contains("Since start: 1 approved, 1 denied, 0 failed"), "{human}");
    // without metrics_listen nothing listens
    let plain = Setup::new("");
    let net2 = Net::new();
    let _quiet = plain.start(&net2.host);
    assert!(
        in_ns(&net2.host, || std::net::TcpStream::connect("127.0.0.1:9839")).is_err(),
        "off by default"
    );
}
