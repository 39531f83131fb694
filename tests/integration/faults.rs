//! jitd's bad days: crashes, restarts, tampering, reloads, missing pieces. Proven from
//! outside: connecting or failing to connect, exit codes, audit content.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::Value;

use crate::util::*;

const POLICY: &str = "[[ports]]\nport = 22\n[[ports]]\nport = 3389\n";

fn setup_with_servers(net: &Net, policy: &str) -> Setup {
    for port in [22, 3389] {
        serve_echo(&net.host, port);
    }
    Setup::new(policy)
}

fn grant(jitd: &Jitd, port: &str, source: &str, duration: &str) -> u64 {
    let reply = jitd.ctl_json(&["request", "--port", port, "--source", source, "--duration", duration]);
    reply["grants"][0]["id"].as_u64().unwrap()
}

fn records(setup: &Setup, action: &str) -> Vec<Value> {
    setup.audit().into_iter().filter(|r| r["action"] == action).collect()
}

#[test]
fn after_kill_9_the_lockdown_stays_and_grants_close_by_themselves() {
    let net = Net::new();
    let setup = setup_with_servers(&net, POLICY);
    let jitd = setup.start(&net.host);
    grant(&jitd, "22", A4, "3s");
    let granted_at = Instant::now();
    jitd.kill();
    assert!(
        can_connect(&net.a, HOST_A4, 22),
        "the live grant keeps working after the crash"
    );
    assert!(!can_connect(&net.b, HOST_B4, 22), "nothing else opens");
    assert!(!can_connect(&net.a, HOST_A4, 3389), "nothing else opens");
    assert!(
        wait_for(Duration::from_secs(15), || !can_connect(&net.a, HOST_A4, 22)),
        "the kernel closes the grant on its own"
    );
    assert!(
        granted_at.elapsed() < Duration::from_secs(3 + 6),
        "on time: {:?}",
        granted_at.elapsed()
    );
    assert!(!can_connect(&net.a, HOST_A4, 3389));
}

#[test]
fn a_restart_puts_live_grants_back_records_ended_ones_and_never_opens_the_ports() {
    let net = Net::new();
    let setup = setup_with_servers(&net, POLICY);
    let jitd = setup.start(&net.host);
    let long = grant(&jitd, "22", A4, "1h");
    let short = grant(&jitd, "3389", A4, "2s");
    let status = jitd.stop(Duration::from_secs(5));
    assert!(status.success());
    std::thread::sleep(Duration::from_millis(2500));
    let prober = Prober::start(&net.b, HOST_B4, 22);
    let jitd = setup.start(&net.host);
    assert!(
        !prober.ever_opened(),
        "the port never opened to others during the restart"
    );
    assert_eq!(jitd.grant_ids(), vec![long], "only the live grant is back");
    assert!(can_connect(&net.a, HOST_A4, 22), "the restored grant works");
    assert!(!can_connect(&net.a, HOST_A4, 3389), "the ended one stays closed");
    let expired = records(&setup, "expire");
    assert_eq!(expired.len(), 1, "{expired:?}");
    assert_eq!(expired[0]["grant_id"], short);
    let why = expired[0]["reason"].as_str().unwrap();
    assert!(why.starts_with("ended while jitd was not running"), "{why}");
    assert!(expired[0].get("connections").is_none(), "unknown: it ended unwatched");
    let approved = setup
        .audit()
        .into_iter()
        .find(|r| r["grant_id"] == short && r["outcome"] == "approved")
        .unwrap();
    let end: chrono::DateTime<chrono::Utc> = expired[0]["time"].as_str().unwrap().parse().unwrap();
    let start: chrono::DateTime<chrono::Utc> = approved["time"].as_str().unwrap().parse().unwrap();
    assert_eq!((end - start).num_seconds(), 2, "recorded with the real end time");
    // the restored grant still ends on its own schedule and ids are not reused
    let next = grant(&jitd, "3389", A4, "1m");
    assert!(next > short);
    let remaining = jitd.ctl_json(&["status"])["grants"][0]["remaining_secs"]
        .as_u64()
        .unwrap();
    assert!((3590..=3600).contains(&remaining), "{remaining}");
}

#[test]
fn a_restart_after_kill_9_takes_the_kernels_remaining_time() {
    let net = Net::new();
    let setup = setup_with_servers(&net, POLICY);
    let jitd = setup.start(&net.host);
    grant(&jitd, "22", A4, "4s");
    jitd.kill();
    std::thread::sleep(Duration::from_millis(1500));
    let jitd = setup.start(&net.host);
    assert!(
        jitd.log_text()
            .contains("the lockdown in the kernel is intact; kept it"),
        "{}",
        jitd.log_text()
    );
    let status = jitd.ctl_json(&["status"]);
    let left = status["grants"][0]["remaining_secs"].as_u64().unwrap();
    assert!(left <= 3, "the kernel's clock, not a fresh 4s: {left}");
    assert!(can_connect(&net.a, HOST_A4, 22));
    assert!(wait_for(Duration::from_secs(15), || !can_connect(&net.a, HOST_A4, 22)));
    assert!(
        wait_for(Duration::from_secs(10), || jitd.grant_ids().is_empty()),
        "status agrees with the kernel"
    );
}

#[test]
fn a_table_changed_while_jitd_was_down_is_replaced_at_restart() {
    let net = Net::new();
    let setup = setup_with_servers(&net, POLICY);
    let jitd = setup.start(&net.host);
    grant(&jitd, "22", A4, "1h");
    jitd.kill();
    let out = net.nft(&["flush", "chain", "inet", "jitd", "input"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        can_connect(&net.b, HOST_B4, 22),
        "open while jitd is down and its chain flushed"
    );
    let jitd = setup.start(&net.host);
    assert!(!jitd.log_text().contains("kept it"), "{}", jitd.log_text());
    assert!(!can_connect(&net.b, HOST_B4, 22), "locked again");
    assert!(can_connect(&net.a, HOST_A4, 22), "the grant is back");
}

#[test]
fn tampering_is_noticed_at_once_repaired_and_audited() {
    let net = Net::new();
    let setup = setup_with_servers(&net, POLICY);
    // the periodic backstop only runs at start: every repair below is the monitor's
    // (a deadline measured in wall time would flake on a loaded machine)
    let jitd = setup.start_with(&net.host, &[("JITD_RECONCILE_MS", "3600000")]);
    grant(&jitd, "22", A4, "1h");
    let tamperings: [&[&str]; 4] = [
        &["flush", "ruleset"],
        &["delete", "table", "inet", "jitd"],
        &["flush", "chain", "inet", "jitd", "input"],
        &[
            "add",
            "element",
            "inet",
            "jitd",
            "grants4",
            "{ 10.77.2.2 . tcp . 22 timeout 1h }",
        ],
    ];
    for (i, args) in tamperings.iter().enumerate() {
        let out = net.nft(args);
        assert!(out.status.success(), "nft {args:?}: {}", text(&out));
        assert!(
            wait_for(Duration::from_secs(10), || records(&setup, "repair").len() > i),
            "no repair after nft {args:?}: {}",
            jitd.log_text()
        );
        assert!(
            wait_for(Duration::from_secs(10), || !can_connect(&net.b, HOST_B4, 22)),
            "locked again after nft {args:?}: {:?}",
            records(&setup, "repair")
                .iter()
                .map(|r| r["reason"].clone())
                .collect::<Vec<_>>()
        );
        assert!(
            can_connect(&net.a, HOST_A4, 22),
            "the live grant is back after nft {args:?}"
        );
    }
    let repairs = records(&setup, "repair");
    assert!(repairs.iter().all(|r| r["outcome"] == "repaired"));
    assert!(
        repairs
            .iter()
            .all(|r| r["reason"].as_str().unwrap().contains("(nftables changed by nft (pid ")),
        "each noticed from the change event, not a periodic check: {repairs:?}"
    );
    assert!(
        repairs[3]["reason"]
            .as_str()
            .unwrap()
            .contains("element 10.77.2.2 . tcp . 22 with no grant behind it"),
        "{:?}",
        repairs[3]
    );
    assert_eq!(net.ruleset().matches("table inet jitd").count(), 1);
}

#[test]
fn tampering_under_request_load_is_repaired_from_the_change_event() {
    let net = Net::new();
    let setup = setup_with_servers(&net, POLICY);
    // no periodic backstop: each repair below must come from the change event, which
    // under request load once waited for the 10 s check (repairs after 6-17 s)
    let jitd = setup.start_with(&net.host, &[("JITD_RECONCILE_MS", "3600000")]);
    grant(&jitd, "22", A4, "1h");
    let clients = hammer(&setup.socket(), 120, 3, 600);
    std::thread::sleep(Duration::from_millis(300));
    let loaded = || clients.iter().any(|c| !c.is_finished());
    let repaired = |n: usize| wait_for(Duration::from_secs(10), || records(&setup, "repair").len() >= n);

    let out = net.nft(&[
        "insert", "rule", "inet", "jitd", "input", "tcp", "dport", "22", "accept",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(repaired(1), "no repair of the inserted rule: {}", jitd.log_text());
    assert!(
        wait_for(Duration::from_secs(10), || !can_connect(&net.b, HOST_B4, 22)),
        "the inserted accept rule is gone"
    );
    assert!(loaded(), "the requests were still coming during the repair");

    net.nft_ok(&[
        "delete",
        "element",
        "inet",
        "jitd",
        "grants4",
        "{ 10.77.1.2 . tcp . 22 }",
    ]);
    assert!(repaired(2), "no repair of the deleted element: {}", jitd.log_text());
    assert!(
        wait_for(Duration::from_secs(10), || can_connect(&net.a, HOST_A4, 22)),
        "the live grant's element is back"
    );

    for out in clients.into_iter().flat_map(|c| c.join().unwrap()) {
        assert!(out.status.success(), "every request was served: {}", text(&out));
    }
    let repairs = records(&setup, "repair");
    assert!(
        repairs
            .iter()
            .all(|r| r["reason"].as_str().unwrap().contains("(nftables changed by nft (pid ")),
        "each repair came from the change event: {repairs:?}"
    );
}

#[test]
fn jitds_own_changes_are_not_drift() {
    let net = Net::new();
    let setup = setup_with_servers(&net, POLICY);
    let jitd = setup.start(&net.host);
    for i in 0..5 {
        grant(&jitd, "22", A4, &format!("{}m", i + 1));
    }
    let id = grant(&jitd, "3389", A4, "1m");
    jitd.ctl_json(&["revoke", &id.to_string()]);
    std::thread::sleep(Duration::from_millis(500));
    assert!(records(&setup, "repair").is_empty(), "{:?}", records(&setup, "repair"));
}

#[test]
fn reload_applies_a_valid_policy_and_keeps_the_old_one_on_error() {
    let net = Net::new();
    let setup = setup_with_servers(&net, POLICY);
    let jitd = setup.start(&net.host);
    let on22 = grant(&jitd, "22", A4, "1h");
    let on3389 = grant(&jitd, "3389", A4, "1h");
    // an invalid policy over SIGHUP and over jitctl changes nothing
    setup.write_policy("[[ports]]\nport = 22\nmax_duration = \"99h\"\n");
    jitd.signal(Signal::SIGHUP);
    assert!(wait_for(Duration::from_secs(20), || jitd
        .log_text()
        .contains("max_duration: must be at most 24h")));
    let out = jitd.ctl(&["reload"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("ports[0].max_duration: must be at most 24h"),
        "{}",
        text(&out)
    );
    assert!(!can_connect(&net.b, HOST_B4, 3389), "old policy still locks 3389");
    assert_eq!(jitd.grant_ids(), vec![on22, on3389]);
    // a valid one that no longer protects 3389: its grant ends, 22's stays
    setup.write_policy("[[ports]]\nport = 22\n");
    let reply = jitd.ctl_json(&["reload"]);
    assert_eq!(reply["ended"], serde_json::json!([on3389]));
    assert_eq!(jitd.grant_ids(), vec![on22]);
    assert!(can_connect(&net.b, HOST_B4, 3389), "3389 is no longer protected");
    assert!(!can_connect(&net.b, HOST_B4, 22));
    assert!(
        can_connect(&net.a, HOST_A4, 22),
        "the grant the new policy still allows stays"
    );
    let ended: Vec<Value> = setup
        .audit()
        .into_iter()
        .filter(|r| r["grant_id"] == on3389 && r["outcome"] == "revoked")
        .collect();
    assert!(
        ended[0]["reason"].as_str().unwrap().starts_with("policy changed"),
        "{ended:?}"
    );
    // SIGHUP with a valid policy protecting 3389 again
    setup.write_policy(POLICY);
    jitd.signal(Signal::SIGHUP);
    assert!(wait_for(Duration::from_secs(20), || !can_connect(
        &net.b, HOST_B4, 3389
    )));
    std::thread::sleep(Duration::from_millis(300));
    assert!(records(&setup, "repair").is_empty(), "a reload is not drift");
    // only admins may reload
    let out = jitd.ctl_as(65534, 65534, &["reload"]);
    assert_ne!(out.status.code(), Some(0));
}

#[test]
fn without_nft_or_nftables_jitd_refuses_to_start() {
    let net = Net::new();
    let setup = Setup::new(POLICY);
    // no nft binary at all
    let out = run_jitd_with_path(&net, &setup, "/nonexistent");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is the nftables package installed?"),
        "{}",
        text(&out)
    );
    // an nft that fails the way a kernel without nf_tables makes it fail
    let fake = setup.dir.path().join("fakebin");
    std::fs::create_dir(&fake).unwrap();
    let script = fake.join("nft");
    std::fs::write(
        &script,
        "#!/bin/sh\necho 'Error: Could not process rule: Operation not supported' >&2\nexit 1\n",
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let out = run_jitd_with_path(&net, &setup, fake.to_str().unwrap());
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Operation not supported"),
        "{}",
        text(&out)
    );
}

/// Starts `clients` threads that each send up to `per_client` requests for distinct
/// sources (10.FIRST+c.x.y) until one is not approved; each thread returns its outputs.
fn hammer(
    socket: &std::path::Path,
    first: u32,
    clients: u32,
    per_client: u32,
) -> Vec<std::thread::JoinHandle<Vec<std::process::Output>>> {
    (0..clients)
        .map(|c| {
            let socket = socket.to_path_buf();
            std::thread::spawn(move || {
                let mut outputs = Vec::new();
                for i in 0..per_client {
                    let source = format!("10.{}.{}.{}", first + c, i / 250, i % 250 + 1);
                    let out = jitctl(
                        &socket,
                        &[
                            "--json",
                            "request",
                            "--port",
                            "22",
                            "--source",
                            &source,
                            "--duration",
                            "1h",
                        ],
                        None,
                    );
                    let done = !out.status.success();
                    outputs.push(out);
                    if done {
                        break;
                    }
                }
                outputs
            })
        })
        .collect()
}

fn run_jitd_with_path(net: &Net, setup: &Setup, path: &str) -> std::process::Output {
    std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &net.host,
            "/usr/bin/env",
            &format!("PATH={path}"),
            // without libnftables too: jitd would otherwise not need the nft program
            "JITD_LIBNFTABLES=/nonexistent/libnftables.so.1",
            env!("CARGO_BIN_EXE_jitd"),
            "--config",
        ])
        .arg(setup.policy())
        .output()
        .unwrap()
}

#[test]
fn an_unusable_state_dir_stops_jitd_with_the_ports_locked() {
    let net = Net::new();
    serve_echo(&net.host, 22);
    let setup = Setup::new("");
    let blocker = setup.dir.path().join("a-file");
    std::fs::write(&blocker, "").unwrap();
    std::fs::write(
        setup.policy(),
        format!(
            "socket = \"{}\"\nstate_dir = \"{}/state\"\n",
            setup.socket().display(),
            blocker.display()
        ),
    )
    .unwrap();
    let out = setup.run_jitd(&net.host, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot create state_dir"),
        "{}",
        text(&out)
    );
    // a reboot with a broken state_dir: the lockdown went in before any state was read
    assert!(net.ruleset().contains("table inet jitd"), "{}", net.ruleset());
    assert!(!can_connect(&net.a, HOST_A4, 22), "fail closed: the port stays shut");
}

/// A small tmpfs mounted for one test, unmounted on drop.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(path: std::path::PathBuf) -> SmallDisk {
        std::fs::create_dir_all(&path).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(out.status.success(), "mount: {}", text(&out));
        SmallDisk(path)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_grant_that_cannot_be_audited_is_refused() {
    let net = Net::new();
    let setup = setup_with_servers(&net, POLICY);
    let _disk = SmallDisk::mount(setup.state_dir());
    let jitd = setup.start(&net.host);
    // fill the disk; tmpfs allocates whole pages, so first pad the audit log to a page
    // boundary with blank lines (readers skip them) so that the next record needs a new page
    let len = std::fs::metadata(setup.audit_file()).unwrap().len() as usize;
    let pad = vec![b'\n'; 4096 - len % 4096];
    std::fs::OpenOptions::new()
        .append(true)
        .open(setup.audit_file())
        .and_then(|mut f| std::io::Write::write_all(&mut f, &pad))
        .unwrap();
    let filler = setup.state_dir().join("filler");
    let _ = std::process::Command::new("dd")
        .args(["if=/dev/zero", "bs=4k", "count=1000"])
        .arg(format!("of={}", filler.display()))
        .output();
    let out = jitd.ctl(&["request", "--port", "22", "--source", A4, "--duration", "1h"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot write the audit log"),
        "{}",
        text(&out)
    );
    assert!(!can_connect(&net.a, HOST_A4, 22), "refused means closed");
    assert_eq!(jitd.grant_ids(), Vec::<u64>::new());
    // space again: requests work again
    std::fs::remove_file(&filler).unwrap();
    grant(&jitd, "22", A4, "1h");
    assert!(can_connect(&net.a, HOST_A4, 22));
}

#[test]
fn every_reported_approval_is_on_disk_after_kill_9_and_a_torn_line_is_cut() {
    let net = Net::new();
    let setup = setup_with_servers(&net, POLICY);
    let jitd = setup.start(&net.host);
    let socket = setup.socket();
    // clients hammer jitd while it is killed
    let clients = hammer(&socket, 100, 4, 2000);
    std::thread::sleep(Duration::from_millis(700));
    jitd.kill();
    let approved: Vec<u64> = clients
        .into_iter()
        .flat_map(|c| c.join().unwrap())
        .filter(|out| out.status.success())
        .map(|out| {
            serde_json::from_slice::<Value>(&out.stdout).unwrap()["grants"][0]["id"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert!(!approved.is_empty(), "some requests were approved before the kill");
    let on_disk: Vec<u64> = setup
        .audit_lines()
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|r| r["outcome"] == "approved")
        .map(|r| r["grant_id"].as_u64().unwrap())
        .collect();
    for id in &approved {
        assert!(
            on_disk.contains(id),
            "grant {id} was reported approved but has no record"
        );
    }
    // a torn last line (as a crash mid-write leaves it) is reported, never fatal
    std::fs::OpenOptions::new()
        .append(true)
        .open(setup.audit_file())
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"{\"time\":\"20"))
        .unwrap();
    let jitd = setup.start(&net.host);
    assert!(jitd.log_text().contains("incomplete"), "{}", jitd.log_text());
    // it is cut off at start (kept aside in audit.jsonl.torn-<time>), not read around
    let out = jitd.ctl(&["audit", "--format", "json"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("skipped unreadable record"),
        "{}",
        text(&out)
    );
    let restored = jitd.grant_ids();
    for id in &approved {
        assert!(
            restored.contains(id),
            "approved grant {id} is live again after the restart"
        );
    }
}

#[test]
fn sigterm_during_requests_answers_each_and_exits_cleanly() {
    let net = Net::new();
    let setup = setup_with_servers(&net, POLICY);
    let jitd = setup.start(&net.host);
    let socket = setup.socket();
    let clients = hammer(&socket, 200, 6, 1000);
    std::thread::sleep(Duration::from_millis(500));
    let status = jitd.stop(Duration::from_secs(15));
    assert!(status.success(), "{status}");
    for out in clients.into_iter().flat_map(|c| c.join().unwrap()) {
        match (out.status.code(), String::from_utf8_lossy(&out.stderr).to_string()) {
            (Some(0), _) => {}
            (Some(2), stderr) => assert!(
                stderr.contains("jitd is stopping") || stderr.contains("cannot connect"),
                "a refused request says why: {stderr}"
            ),
            other => panic!("unexpected outcome {other:?}"),
        }
    }
    let approved = setup.audit().into_iter().filter(|r| r["outcome"] == "approved").count();
    let saved: Value = serde_json::from_slice(&std::fs::read(setup.state_dir().join("grants.json")).unwrap()).unwrap();
    assert_eq!(
        saved["grants"].as_array().unwrap().len(),
        approved,
        "every approved grant was persisted"
    );
}

/// Whether the kernel's copy of jitd's input chain holds an accept rule for port 22
/// that jitd did not write.
fn planted_accept(net: &Net) -> bool {
    let out = net.nft(&["list", "chain", "inet", "jitd", "input"]);
    String::from_utf8_lossy(&out.stdout).contains("tcp dport 22 accept")
}

#[test]
fn an_accept_rule_planted_again_and_again_is_removed_at_once_every_time() {
    let net = Net::new();
    let setup = setup_with_servers(&net, POLICY);
    // no periodic backstop: every repair is the change event's
    let jitd = setup.start_with(&net.host, &[("JITD_RECONCILE_MS", "3600000")]);
    grant(&jitd, "22", A4, "1h");
    let clients = hammer(&setup.socket(), 130, 2, 300);
    // Twice as many as the repairs made before a back-off (5): a back-off that
    // delayed these would wait 0.25, 0.5, 1, 2, 4, 8, 16, 30 s before each check.
    const PLANTED: usize = 14;
    for i in 0..PLANTED {
        net.nft_ok(&[
            "insert", "rule", "inet", "jitd", "input", "tcp", "dport", "22", "accept",
        ]);
        assert!(
            wait_for(Duration::from_secs(8), || !planted_accept(&net)),
            "accept rule {} still stands after 8 s: {:?}",
            i + 1,
            records(&setup, "repair")
                .iter()
                .map(|r| r["reason"].clone())
                .collect::<Vec<_>>()
        );
        assert!(
            !can_connect(&net.b, HOST_B4, 22),
            "a stranger is refused after insert {}",
            i + 1
        );
    }
    assert!(can_connect(&net.a, HOST_A4, 22), "the grant still works");
    for out in clients.into_iter().flat_map(|c| c.join().unwrap()) {
        assert!(out.status.success(), "every request was served: {}", text(&out));
    }
    // the records coalesce: one per repair at first, then one for the rest of the
    // streak once the back-off delay has passed, and every repair is counted
    let counted = |setup: &Setup| -> usize {
        records(setup, "repair")
            .iter()
            .map(|r| {
                let why = r["reason"].as_str().unwrap_or_default();
                match why.strip_prefix("drift repaired ") {
                    Some(rest) if rest.contains(" more time(s) in ") => {
                        rest.split(' ').next().unwrap().parse::<usize>().unwrap()
                    }
                    _ => 1,
                }
            })
            .sum()
    };
    assert!(
        wait_for(Duration::from_secs(45), || counted(&setup) >= PLANTED),
        "every repair is on record: {:?}",
        records(&setup, "repair")
    );
    let repairs = records(&setup, "repair");
    assert!(repairs.len() < PLANTED, "the records coalesced: {repairs:?}");
    assert!(
        repairs.iter().any(|r| r["reason"]
            .as_str()
            .is_some_and(|w| w.contains("repaired at once, recorded here together"))),
        "{repairs:?}"
    );
}

/// A read-only file system mounted for one test, unmounted on drop.
struct ReadOnly(std::path::PathBuf);

impl ReadOnly {
    fn mount(path: std::path::PathBuf) -> ReadOnly {
        std::fs::create_dir_all(&path).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "ro,size=64k,mode=0700", "tmpfs"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(out.status.success(), "mount: {}", text(&out));
        ReadOnly(path)
    }
}

impl Drop for ReadOnly {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A bad state_dir after a reboot: the message names what failed (the lock file on a
/// read-only state_dir, the owner and mode of an untrusted one) and says what was done:
/// the lockdown went in first and stays.
#[test]
fn a_bad_state_dir_is_named_exactly_and_the_message_says_the_lockdown_stays() {
    let net = Net::new();
    serve_echo(&net.host, 22);
    let setup = Setup::new("[[ports]]\nport = 22\n");
    let _ro = ReadOnly::mount(setup.state_dir());
    let out = setup.run_jitd(&net.host, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    let lock = setup.state_dir().join("jitd.lock");
    assert!(said.contains(&format!("cannot lock {}: ", lock.display())), "{said}");
    assert!(!said.contains("cannot create state_dir"), "{said}");
    assert!(
        said.contains("the lockdown was put in the kernel before (table inet jitd: 22/tcp locked) and stays"),
        "{said}"
    );
    assert!(!can_connect(&net.a, HOST_A4, 22), "fail closed: the port stays shut");
    drop(_ro);

    // untrusted: writable by others; after another reboot
    net.nft_ok(&["delete", "table", "inet", "jitd"]);
    std::fs::set_permissions(setup.state_dir(), std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let out = setup.run_jitd(&net.host, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(said.contains("is writable by its group"), "{said}");
    assert!(
        said.contains("jitd refuses to use it and changed nothing in it; the lockdown was put in the kernel before"),
        "{said}"
    );
    assert!(net.ruleset().contains("table inet jitd"), "{}", net.ruleset());
    assert!(!can_connect(&net.a, HOST_A4, 22));
}
