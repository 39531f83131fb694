//! What jitd refuses to trust: requests for too wide a source, policies that exempt
//! everything, a kernel that rejects the ruleset, a state_dir others can write, links
//! planted in it; and the way out (`jitd --unlock`) when the policy itself is broken.
//! Proven from outside: exit codes, messages, connections, the files on disk.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::util::*;

const OPEN_22: &str = "[[ports]]\nport = 22\nallowed_sources = [\"any\"]\n";

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn request(jitd: &Jitd, source: &str) -> std::process::Output {
    jitd.ctl(&["request", "--port", "22", "--source", source, "--duration", "10m"])
}

/// A root-owned 0600 file outside state_dir, the target of the planted links.
fn precious(setup: &Setup) -> PathBuf {
    let path = setup.dir.path().join("precious");
    std::fs::write(&path, "root's secret\n").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

fn assert_untouched(path: &Path) {
    assert_eq!(std::fs::read_to_string(path).unwrap(), "root's secret\n");
    let meta = std::fs::metadata(path).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o7777), (0, 0o600));
}

#[test]
fn the_whole_internet_and_too_wide_sources_are_refused_even_from_any() {
    let net = Net::new();
    serve_echo(&net.host, 22);
    let setup = Setup::new(OPEN_22);
    let jitd = setup.start(&net.host);
    for (source, reason) in [
        ("0.0.0.0/0", "source 0.0.0.0/0 is the whole IPv4 Internet"),
        ("::/0", "source ::/0 is the whole IPv6 Internet"),
        (
            "10.0.0.0/8",
            "source 10.0.0.0/8 is wider than port 22/tcp allows: at most a /16 for IPv4",
        ),
        (
            "fd00::/16",
            "source fd00::/16 is wider than port 22/tcp allows: at most a /32 for IPv6",
        ),
    ] {
        let out = request(&jitd, source);
        assert_eq!(out.status.code(), Some(1), "{source}: {}", text(&out));
        assert!(stderr(&out).contains(reason), "{source}: {}", text(&out));
        assert!(stderr(&out).contains("source_too_wide"), "{source}: {}", text(&out));
    }
    assert!(!can_connect(&net.a, HOST_A4, 22), "nothing was opened");
    assert!(!can_connect(&net.a, HOST_A6, 22), "nothing was opened");
    let out = request(&jitd, "10.77.1.0/24");
    assert!(out.status.success(), "a /24 is fine: {}", text(&out));
    assert!(can_connect(&net.a, HOST_A4, 22), "the /24 is open");
    assert!(!can_connect(&net.b, HOST_B4, 22), "and only the /24");
}

#[test]
fn a_narrower_widest_prefix_is_enforced_per_port() {
    let net = Net::new();
    let setup = Setup::new(&format!("{OPEN_22}widest_prefix = {{ ipv4 = 28, ipv6 = 120 }}\n"));
    let jitd = setup.start(&net.host);
    let out = request(&jitd, "10.77.1.0/24");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(stderr(&out).contains("at most a /28 for IPv4"), "{}", text(&out));
    assert!(request(&jitd, "10.77.1.0/28").status.success());
    let out = request(&jitd, "fd00:77:1::/64");
    assert!(stderr(&out).contains("at most a /120 for IPv6"), "{}", text(&out));
}

#[test]
fn wide_sources_are_warned_about_at_check_config_and_at_start() {
    let net = Net::new();
    let setup = Setup::new(
        "[[ports]]\nport = 22\nallowed_sources = [\"0.0.0.0/4\", \"2001::/16\"]\n[lockdown]\nexempt_sources = [\"10.0.0.0/7\"]\n",
    );
    let out = setup.run_jitd(&net.host, &["--check-config"]);
    assert!(out.status.success(), "{}", text(&out));
    for warning in [
        "WARNING: ",
        "ports[0].allowed_sources: 0.0.0.0/4 covers 1/16 of the IPv4 Internet (shorter than /8)",
        "ports[0].allowed_sources: 2001::/16 covers 1/65536 of the IPv6 Internet (shorter than /32)",
        "lockdown.exempt_sources: 10.0.0.0/7 exempts 1/128 of the IPv4 Internet from the lockdown",
    ] {
        assert!(stderr(&out).contains(warning), "{warning}: {}", text(&out));
    }
    let jitd = setup.start(&net.host);
    let log = jitd.log_text();
    assert!(
        log.contains("WARN") && log.contains("0.0.0.0/4 covers 1/16 of the IPv4 Internet"),
        "{log}"
    );
}

#[test]
fn exempting_everything_is_refused_unless_the_policy_says_so() {
    let net = Net::new();
    serve_echo(&net.host, 22);
    for exempt in ["\"0.0.0.0/0\"", "\"any\"", "\"::/1\", \"8000::/1\""] {
        let setup = Setup::new(&format!("{OPEN_22}[lockdown]\nexempt_sources = [{exempt}]\n"));
        for args in [&["--check-config"][..], &[]] {
            let out = setup.run_jitd(&net.host, args);
            assert_eq!(out.status.code(), Some(2), "{exempt} {args:?}: {}", text(&out));
            assert!(
                stderr(&out).contains("lockdown.exempt_sources: exempts every")
                    && stderr(&out).contains("set lockdown.exempt_everything = true to mean it"),
                "{exempt}: {}",
                text(&out)
            );
        }
    }
    assert!(!net.ruleset().contains("jitd"), "nothing was applied");
    // said explicitly, it is accepted, warned about, and really lets IPv4 through
    let setup = Setup::new(&format!(
        "{OPEN_22}[lockdown]\nexempt_sources = [\"0.0.0.0/0\"]\nexempt_everything = true\n"
    ));
    let jitd = setup.start(&net.host);
    assert!(
        jitd.log_text().contains("the lockdown is OFF for IPv4"),
        "{}",
        jitd.log_text()
    );
    assert!(can_connect(&net.a, HOST_A4, 22), "every IPv4 source is exempt");
    assert!(!can_connect(&net.a, HOST_A6, 22), "IPv6 stays locked");
}

#[test]
fn unlock_works_with_a_broken_or_missing_policy() {
    let net = Net::new();
    serve_echo(&net.host, 22);
    let setup = Setup::new(OPEN_22);
    for broken in ["this is [not toml", ""] {
        setup.write_policy(OPEN_22);
        setup.start(&net.host).kill();
        assert!(!can_connect(&net.a, HOST_A4, 22), "locked after kill -9");
        if broken.is_empty() {
            std::fs::remove_file(setup.policy()).unwrap();
        } else {
            std::fs::write(setup.policy(), broken).unwrap();
        }
        let out = setup.run_jitd(&net.host, &["--unlock"]);
        assert!(out.status.success(), "{broken:?}: {}", text(&out));
        assert!(
            stderr(&out).contains("the policy was not read") && stderr(&out).contains("jitd.toml"),
            "{broken:?}: {}",
            text(&out)
        );
        assert!(!net.ruleset().contains("table inet jitd"), "{}", net.ruleset());
        assert!(can_connect(&net.a, HOST_A4, 22), "{broken:?}: open again");
    }
}

#[test]
fn check_config_fails_when_the_kernel_rejects_the_batch() {
    let net = Net::new();
    let setup = Setup::new(OPEN_22);
    // the real kernel refuses nf_tables to a user without CAP_NET_ADMIN
    let mut cmd = std::process::Command::new("ip");
    cmd.args([
        "netns",
        "exec",
        &net.host,
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
    ])
    .arg(env!("CARGO_BIN_EXE_jitd"))
    .arg("--check-config")
    .arg("--config")
    .arg(setup.policy());
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        stderr(&out).contains("the kernel rejects this batch (nft --check)")
            && stderr(&out).contains("Operation not permitted"),
        "{}",
        text(&out)
    );
    // the nft program, failing like a kernel without nf_tables
    let fake = setup.dir.path().join("fakebin");
    std::fs::create_dir(&fake).unwrap();
    let script = fake.join("nft");
    std::fs::write(
        &script,
        "#!/bin/sh\necho 'Error: Could not process rule: Operation not supported' >&2\nexit 1\n",
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &net.host, "/usr/bin/env"])
        .arg(format!("PATH={}", fake.display()))
        .arg("JITD_LIBNFTABLES=/nonexistent/libnftables.so.1")
        .arg(env!("CARGO_BIN_EXE_jitd"))
        .arg("--check-config")
        .arg("--config")
        .arg(setup.policy())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(stderr(&out).contains("Operation not supported"), "{}", text(&out));
}

/// A grants.json that opens port 22 for client a for an hour.
fn forged_snapshot() -> String {
    let now = chrono::Utc::now();
    serde_json::json!({
        "next_id": 2,
        "grants": [{
            "id": 1, "source": format!("{A4}/32"), "port": 22, "protocol": "tcp",
            "requester": "mallory", "requester_uid": 65534, "justification": null,
            "granted_at": now.to_rfc3339(),
            "expires_at": (now + chrono::Duration::hours(1)).to_rfc3339(),
        }],
    })
    .to_string()
}

/// Runs jitd expecting it to refuse to start; returns its stderr.
fn refused(setup: &Setup, net: &Net, why: &str) -> String {
    let out = setup.run_jitd(&net.host, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(stderr(&out).contains(why), "wanted {why:?}: {}", text(&out));
    stderr(&out)
}

#[test]
fn a_state_dir_owned_by_another_uid_is_refused_with_its_forged_grants() {
    // With no jitd table in the kernel (first start after boot, or after --unlock), a
    // restart restores the snapshot's grants: whoever can write state_dir opens ports.
    let net = Net::new();
    let setup = Setup::new(OPEN_22);
    let state = setup.state_dir();
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::chown(&state, Some(65534), Some(65534)).unwrap();
    let forged = forged_snapshot();
    std::fs::write(state.join("grants.json"), &forged).unwrap();
    let message = refused(
        &setup,
        &net,
        &format!("state_dir {}: is owned by uid 65534", state.display()),
    );
    assert!(
        message.contains("it must be owned by the uid jitd runs as (0)"),
        "{message}"
    );
    assert!(
        !net.ruleset().contains(A4),
        "no grant for the forged source: {}",
        net.ruleset()
    );
    assert_eq!(std::fs::metadata(&state).unwrap().uid(), 65534, "nothing changed");
    assert_eq!(std::fs::read_to_string(state.join("grants.json")).unwrap(), forged);
    assert_eq!(std::fs::read_dir(&state).unwrap().count(), 1, "nothing written in it");
}

#[test]
fn a_state_dir_writable_by_others_is_refused_unchanged() {
    let net = Net::new();
    let setup = Setup::new(OPEN_22);
    let state = setup.state_dir();
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).unwrap();
    let message = refused(&setup, &net, "is writable by its group (owner uid 0, mode 0777)");
    assert!(message.contains("fix with chmod 0700"), "{message}");
    assert_eq!(
        std::fs::metadata(&state).unwrap().mode() & 0o7777,
        0o777,
        "mode unchanged"
    );
    assert_eq!(std::fs::read_dir(&state).unwrap().count(), 0, "nothing written in it");
}

/// Plants `name` in a fresh state_dir as a link to a root-owned 0600 file outside it.
fn planted(name: &str) -> (Setup, PathBuf) {
    let setup = Setup::new(OPEN_22);
    let target = precious(&setup);
    std::fs::create_dir(setup.state_dir()).unwrap();
    std::fs::set_permissions(setup.state_dir(), std::fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::symlink(&target, setup.state_dir().join(name)).unwrap();
    (setup, target)
}

#[test]
fn a_link_planted_as_grants_json_is_not_followed() {
    let net = Net::new();
    let (setup, target) = planted("grants.json");
    let message = refused(&setup, &net, "grants.json: it is a symbolic link");
    assert!(message.contains("jitd follows no links in state_dir"), "{message}");
    assert_untouched(&target);
}

#[test]
fn a_link_planted_as_the_audit_log_is_not_followed() {
    let net = Net::new();
    let (setup, target) = planted("audit.jsonl");
    let message = refused(&setup, &net, "audit.jsonl");
    assert!(message.contains("symbolic link"), "{message}");
    assert_untouched(&target);
}

#[test]
fn a_link_planted_as_the_temporary_grants_file_is_replaced_not_written_through() {
    let net = Net::new();
    let (setup, target) = planted(".grants.json.tmp");
    let jitd = setup.start(&net.host);
    assert!(request(&jitd, A4).status.success());
    assert!(jitd.stop(Duration::from_secs(15)).success());
    assert_untouched(&target);
    let saved = std::fs::read_to_string(setup.state_dir().join("grants.json")).unwrap();
    assert!(saved.contains(A4), "the grant was saved in state_dir: {saved}");
}
