//! Start-up after a reboot trusts nothing it reads and shares nothing: a damaged
//! checkpoint is moved aside and the grants rebuilt from the journal, a state_dir jitd
//! cannot write stops it with the ports locked, and a second jitd (same table, or same
//! state_dir) is refused. Proven from outside: connections, exit codes, files, audit.

use std::path::Path;
use std::time::Duration;

use crate::util::*;

const POLICY: &str = "[[ports]]\nport = 22\n";

/// What a reboot leaves: no jitd table in the kernel.
fn reboot(net: &Net) {
    net.nft_ok(&["delete", "table", "inet", "jitd"]);
}

/// A live one-hour grant for client a, then a clean stop (the checkpoint is written).
fn granted_then_stopped(net: &Net, setup: &Setup) {
    let jitd = setup.start(&net.host);
    let reply = jitd.ctl_json(&["request", "--port", "22", "--source", A4, "--duration", "1h"]);
    assert!(reply["grants"][0]["id"].is_u64(), "{reply}");
    assert!(jitd.stop(Duration::from_secs(10)).success());
}

/// The ways the checkpoint was found damaged in the crash campaign.
fn damage(path: &Path, how: &str) {
    let good = std::fs::read(path).unwrap();
    std::fs::remove_file(path).unwrap();
    match how {
        "truncated" => std::fs::write(path, &good[..good.len() / 2]).unwrap(),
        "garbage" => std::fs::write(path, b"\x00\xff{not json at all\n").unwrap(),
        "empty" => std::fs::write(path, b"").unwrap(),
        "a directory" => std::fs::create_dir(path).unwrap(),
        _ => unreachable!("{how}"),
    }
}

#[test]
fn after_a_reboot_a_damaged_checkpoint_is_moved_aside_and_the_grants_rebuilt_from_the_journal() {
    for how in ["truncated", "garbage", "empty", "a directory"] {
        let net = Net::new();
        serve_echo(&net.host, 22);
        let setup = Setup::new(POLICY);
        granted_then_stopped(&net, &setup);
        reboot(&net);
        assert!(can_connect(&net.b, HOST_B4, 22), "{how}: rebooted, nothing locked yet");
        let checkpoint = setup.state_dir().join("grants.json");
        damage(&checkpoint, how);
        let jitd = setup.start(&net.host);
        assert!(
            can_connect(&net.a, HOST_A4, 22),
            "{how}: the grant is rebuilt from the journal: {}",
            jitd.log_text()
        );
        assert!(!can_connect(&net.b, HOST_B4, 22), "{how}: and nothing else is open");
        let aside: Vec<String> = std::fs::read_dir(setup.state_dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.starts_with("grants.json.damaged-"))
            .collect();
        assert_eq!(aside.len(), 1, "{how}: moved aside, kept: {aside:?}");
        assert!(
            jitd.log_text().contains("rebuilding the grants from the audit log"),
            "{how}: {}",
            jitd.log_text()
        );
    }
}

/// A read-only tmpfs mounted over a directory for one test, unmounted on drop.
struct ReadOnly(std::path::PathBuf);

impl ReadOnly {
    fn mount(path: &Path) -> ReadOnly {
        std::fs::create_dir_all(path).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "ro,mode=0700", "tmpfs"])
            .arg(path)
            .output()
            .unwrap();
        assert!(out.status.success(), "mount: {}", text(&out));
        ReadOnly(path.to_path_buf())
    }
}

impl Drop for ReadOnly {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn after_a_reboot_a_read_only_state_dir_stops_jitd_with_the_ports_locked() {
    let net = Net::new();
    serve_echo(&net.host, 22);
    let setup = Setup::new(POLICY);
    let _ro = ReadOnly::mount(&setup.state_dir());
    let out = setup.run_jitd(&net.host, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&setup.state_dir().display().to_string()),
        "the message names the state_dir: {stderr}"
    );
    assert!(net.ruleset().contains("table inet jitd"), "{}", net.ruleset());
    assert!(!can_connect(&net.a, HOST_A4, 22), "fail closed: the port stays shut");
}

#[test]
fn a_second_jitd_on_the_same_table_or_the_same_state_dir_is_refused() {
    let net = Net::new();
    serve_echo(&net.host, 22);
    let setup = Setup::new(POLICY);
    let first = setup.start(&net.host);
    first.ctl_json(&["request", "--port", "22", "--source", A4, "--duration", "1h"]);
    let before = without_clocks(&net.ruleset());

    // same network namespace, a state_dir and socket of its own
    let other = Setup::new(POLICY);
    let out = other.run_jitd(&net.host, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("another jitd already owns table inet jitd"),
        "{}",
        text(&out)
    );

    // another network namespace, the same state_dir
    let elsewhere = Net::new();
    let out = setup.run_jitd(&elsewhere.host, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("another jitd already uses state_dir"),
        "{}",
        text(&out)
    );

    // the first one never noticed: same table, grant working, no repair, chain intact
    assert_eq!(
        without_clocks(&net.ruleset()),
        before,
        "the second jitd changed nothing"
    );
    assert!(can_connect(&net.a, HOST_A4, 22));
    assert!(!can_connect(&net.b, HOST_B4, 22));
    let repairs = setup.audit().into_iter().filter(|r| r["action"] == "repair").count();
    assert_eq!(repairs, 0, "{:?}", setup.audit());
    let out = first.ctl(&["audit", "verify"]);
    assert!(out.status.success(), "{}", text(&out));
}
