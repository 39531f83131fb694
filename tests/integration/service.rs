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
    let Ok(out) = std::process::Command::new("systemd-analyze")
        .args(["security", "--offline=true", "systemd/jitd.service"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
    else {
        eprintln!("systemd-analyze not installed; skipping");
        return;
    };
    let report = String::from_utf8_lossy(&out.stdout);
    let level: f64 = report
        .lines()
        .find_map(|l| l.split("Overall exposure level for jitd.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{report}"));
    assert!(level <= 2.0, "exposure {level}:\n{report}");
}
