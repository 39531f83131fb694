//! The core under stress, from outside: a panicking committer, a stalled disk, a stop
//! in the middle of a repair, nftables refusing or missing its library, the periodic
//! backstop, tampering with grant elements and the lockdown's sets, and another process
//! that keeps undoing jitd's table. Faults are injected with `JITD_FAULTS` (debug
//! builds), most armed by a trigger file so that the test decides when.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::Value;

use crate::util::*;

const POLICY: &str = "[[ports]]\nport = 22\n[[ports]]\nport = 3389\n";

fn setup_with_servers(net: &Net) -> Setup {
    for port in [22, 3389] {
        serve_echo(&net.host, port);
    }
    Setup::new(POLICY)
}

/// `JITD_FAULTS` for `fault` armed while the file `name` in the test's directory exists;
/// returns the value and the trigger file.
fn armed_by(setup: &Setup, fault: &str, name: &str) -> (String, PathBuf) {
    let trigger = setup.dir.path().join(name);
    (format!("{fault}:{}", trigger.display()), trigger)
}

fn arm(trigger: &Path) {
    std::fs::write(trigger, "").unwrap();
}

fn disarm(trigger: &Path) {
    std::fs::remove_file(trigger).unwrap();
}

fn grant(jitd: &Jitd, port: &str, source: &str) {
    jitd.ctl_json(&["request", "--port", port, "--source", source, "--duration", "1h"]);
}

fn records(setup: &Setup, action: &str) -> Vec<Value> {
    setup.audit().into_iter().filter(|r| r["action"] == action).collect()
}

fn reasons(records: &[Value]) -> Vec<String> {
    records
        .iter()
        .map(|r| r["reason"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// Whether the lockdown is whole: the table is there with its rules, and a client
/// without a grant cannot reach 22.
fn locked_for_b(net: &Net) -> bool {
    net.ruleset().contains("@locked") && !can_connect(&net.b, HOST_B4, 22)
}

#[test]
fn a_panicking_committer_stops_jitd_non_zero_with_the_lockdown_in_place() {
    let net = Net::new();
    let setup = setup_with_servers(&net);
    let (faults, trigger) = armed_by(&setup, "committer-panic", "panic-now");
    let jitd = setup.start_with(&net.host, &[("JITD_FAULTS", &faults)]);
    grant(&jitd, "22", A4);
    arm(&trigger);
    // the committer's next job panics: this request, or the checkpoint tick
    let _ = jitd.ctl(&["request", "--port", "22", "--source", B4, "--duration", "1h"]);
    let log = setup.dir.path().to_path_buf();
    let status = jitd.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(1), "a failed core exits 1, got {status}");
    let text = std::fs::read_dir(&log)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("jitd-"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .collect::<String>();
    assert!(
        text.contains("the committer task failed") && text.contains("injected fault: committer-panic"),
        "the log says why: {text}"
    );
    assert!(text.contains("lockdown left in place"), "{text}");
    assert!(net.ruleset().contains("table inet jitd"), "the table stays");
    assert!(!can_connect(&net.b, HOST_B4, 22), "the ports stay locked");
    assert!(!can_connect(&net.a, HOST_A4, 3389), "the ports stay locked");
    assert!(can_connect(&net.a, HOST_A4, 22), "the live grant stays, kernel-timed");
}

fn watchdog_pets(socket: &UnixDatagram, during: Duration) -> usize {
    let deadline = Instant::now() + during;
    let mut pets = 0;
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        socket.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        if let Ok(n) = socket.recv(&mut buf) {
            pets += String::from_utf8_lossy(&buf[..n]).matches("WATCHDOG=1").count();
        }
    }
    pets
}

#[test]
fn a_stalled_disk_holds_requests_while_status_and_the_watchdog_go_on() {
    let net = Net::new();
    let setup = setup_with_servers(&net);
    let (faults, trigger) = armed_by(&setup, "writer-stall", "stall");
    let notify_path = setup.dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    let jitd = setup.start_with(
        &net.host,
        &[
            ("JITD_FAULTS", &faults),
            ("NOTIFY_SOCKET", notify_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "1000000"),
        ],
    );
    arm(&trigger);
    let socket = setup.socket();
    let asking = std::thread::spawn(move || {
        jitctl(
            &socket,
            &["--json", "request", "--port", "22", "--source", A4, "--duration", "1h"],
            None,
        )
    });
    assert!(
        wait_for(Duration::from_secs(20), || jitd
            .log_text()
            .contains("injected fault writer-stall: holding")),
        "the writer stalls: {}",
        jitd.log_text()
    );
    // stalled longer than the watchdog interval (1 s): the core still answers
    let pets = watchdog_pets(&notify, Duration::from_secs(4));
    assert!(pets >= 2, "the watchdog goes on being petted: {pets} in 4 s");
    let status = jitd.ctl_json(&["status"]);
    assert_eq!(
        status["grants"].as_array().map(Vec::len),
        Some(0),
        "status answers (a new connection is served) and shows no grant whose record is not written: {status}"
    );
    assert!(!asking.is_finished(), "the request waits for its audit record");
    assert!(!can_connect(&net.a, HOST_A4, 22), "and the port stays shut meanwhile");
    disarm(&trigger);
    let out = asking.join().unwrap();
    assert!(
        out.status.success(),
        "the request completes after the stall: {}",
        text(&out)
    );
    assert!(can_connect(&net.a, HOST_A4, 22));
    assert_eq!(records(&setup, "request").len(), 1, "{:?}", setup.audit());
}

#[test]
fn sigterm_during_a_repair_finishes_it_before_stopping() {
    let net = Net::new();
    let setup = setup_with_servers(&net);
    let (faults, trigger) = armed_by(&setup, "apply-stall", "hold");
    let mut jitd = setup.start_with(&net.host, &[("JITD_FAULTS", &faults)]);
    grant(&jitd, "22", A4);
    arm(&trigger);
    net.nft_ok(&["flush", "chain", "inet", "jitd", "input"]);
    // a repair is applied first and recorded after: it is held before its batch
    assert!(
        wait_for(Duration::from_secs(20), || jitd
            .log_text()
            .contains("injected fault apply-stall: holding")),
        "the repair is held before its batch: {}",
        jitd.log_text()
    );
    jitd.signal(Signal::SIGTERM);
    std::thread::sleep(Duration::from_millis(700));
    assert!(jitd.running(), "the stop waits for the repair under way");
    disarm(&trigger);
    let status = jitd.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "a clean stop: {status}");
    assert!(locked_for_b(&net), "the repair was applied whole:\n{}", net.ruleset());
    assert!(can_connect(&net.a, HOST_A4, 22), "with the grant");
    let actions: Vec<String> = setup
        .audit()
        .iter()
        .map(|r| r["action"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(actions[actions.len() - 2..], ["repair", "stop"], "{actions:?}");
    assert!(setup.audit().iter().all(|r| r["outcome"] != "failed"));
    let jitd = setup.start(&net.host);
    let out = jitd.ctl(&["audit", "verify"]);
    assert!(out.status.success(), "the chain verifies: {}", text(&out));
}

#[test]
fn without_libnftables_jitd_applies_changes_with_the_nft_program() {
    let net = Net::new();
    let setup = setup_with_servers(&net);
    let jitd = setup.start_with(&net.host, &[("JITD_LIBNFTABLES", "/nonexistent/libnftables.so.1")]);
    assert!(
        jitd.log_text()
            .contains("applying changes with the nft program instead"),
        "{}",
        jitd.log_text()
    );
    assert!(!can_connect(&net.a, HOST_A4, 22), "locked by the nft program");
    grant(&jitd, "22", A4);
    assert!(can_connect(&net.a, HOST_A4, 22), "granted by the nft program");
    assert!(!can_connect(&net.b, HOST_B4, 22));
    jitd.ctl_json(&["revoke", "--source", A4]);
    assert!(!can_connect(&net.a, HOST_A4, 22), "revoked by the nft program");
    // its own nft processes are not drift; another's change is
    net.nft_ok(&["flush", "chain", "inet", "jitd", "input"]);
    assert!(wait_for(Duration::from_secs(20), || locked_for_b(&net)));
    assert_eq!(
        records(&setup, "repair").len(),
        1,
        "{:?}",
        reasons(&records(&setup, "repair"))
    );
}

#[test]
fn a_batch_libnftables_refuses_answers_firewall_failed_and_changes_nothing() {
    let net = Net::new();
    let setup = setup_with_servers(&net);
    let (faults, trigger) = armed_by(&setup, "nft-refuse", "refuse");
    let jitd = setup.start_with(&net.host, &[("JITD_FAULTS", &faults)]);
    assert!(
        jitd.log_text().contains("in-process"),
        "libnftables is used: {}",
        jitd.log_text()
    );
    grant(&jitd, "22", A4);
    let before = net.table_shape();
    arm(&trigger);
    let out = jitd.ctl(&["request", "--port", "22", "--source", B4, "--duration", "1h"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("firewall_failed"), "{}", text(&out));
    assert!(
        stderr.contains("No such file or directory"),
        "the kernel's reason: {stderr}"
    );
    assert_eq!(net.table_shape(), before, "the ruleset is whole and unchanged");
    assert!(!can_connect(&net.b, HOST_B4, 22), "refused means closed");
    assert!(can_connect(&net.a, HOST_A4, 22), "the earlier grant is untouched");
    let status = jitd.ctl_json(&["status"]);
    assert_eq!(status["grants"].as_array().unwrap().len(), 1, "{status}");
    let failed: Vec<Value> = setup.audit().into_iter().filter(|r| r["outcome"] == "failed").collect();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert!(
        reasons(&failed)[0].contains("not applied, nothing changed"),
        "{failed:?}"
    );
    disarm(&trigger);
    grant(&jitd, "22", B4);
    assert!(can_connect(&net.b, HOST_B4, 22), "works again once the kernel accepts");
}

#[test]
fn the_periodic_check_repairs_what_the_monitor_missed() {
    let net = Net::new();
    let setup = setup_with_servers(&net);
    let jitd = setup.start_with(
        &net.host,
        &[("JITD_FAULTS", "no-monitor"), ("JITD_RECONCILE_MS", "1000")],
    );
    assert!(
        jitd.log_text().contains("injected fault no-monitor"),
        "{}",
        jitd.log_text()
    );
    grant(&jitd, "22", A4);
    net.nft_ok(&["flush", "chain", "inet", "jitd", "input"]);
    assert!(
        wait_for(Duration::from_secs(30), || locked_for_b(&net)),
        "the backstop re-locks: {}",
        jitd.log_text()
    );
    let repairs = reasons(&records(&setup, "repair"));
    assert!(
        !repairs.is_empty() && repairs[0].contains("(periodic check)"),
        "{repairs:?}"
    );
    assert!(can_connect(&net.a, HOST_A4, 22), "the grant is back");
}

#[test]
fn a_deleted_grant_element_is_put_back() {
    let net = Net::new();
    let setup = setup_with_servers(&net);
    let jitd = setup.start(&net.host);
    grant(&jitd, "22", A4);
    assert!(can_connect(&net.a, HOST_A4, 22));
    net.nft_ok(&[
        "delete",
        "element",
        "inet",
        "jitd",
        "grants4",
        "{ 10.77.1.2 . tcp . 22 }",
    ]);
    assert!(
        wait_for(Duration::from_secs(20), || reasons(&records(&setup, "repair"))
            .iter()
            .any(|r| r.contains("grant element 10.77.1.2 . tcp . 22 is missing"))),
        "{:?} {}",
        reasons(&records(&setup, "repair")),
        jitd.log_text()
    );
    assert!(
        wait_for(Duration::from_secs(10), || can_connect(&net.a, HOST_A4, 22)),
        "the client connects again"
    );
    assert!(locked_for_b(&net));
}

#[test]
fn edits_of_the_locked_and_exempt_sets_are_undone() {
    let net = Net::new();
    let setup = setup_with_servers(&net);
    let jitd = setup.start(&net.host);
    let edits: [&[&str]; 3] = [
        &["add", "element", "inet", "jitd", "exempt4", "{ 10.77.2.0/24 }"],
        &["delete", "element", "inet", "jitd", "locked", "{ tcp . 22 }"],
        &["delete", "element", "inet", "jitd", "locked", "{ tcp . 3389 }"],
    ];
    for (i, edit) in edits.iter().enumerate() {
        net.nft_ok(edit);
        assert!(
            wait_for(Duration::from_secs(20), || records(&setup, "repair").len() > i),
            "no repair after nft {edit:?}: {}",
            jitd.log_text()
        );
        let repair = &reasons(&records(&setup, "repair"))[i];
        assert!(repair.contains("locked or exempt sets"), "{repair}");
        assert!(
            wait_for(Duration::from_secs(10), || !can_connect(&net.b, HOST_B4, 22)
                && !can_connect(&net.b, HOST_B4, 3389)),
            "locked again after nft {edit:?}"
        );
    }
    let listing = net.ruleset();
    assert!(!listing.contains("10.77.2.0/24"), "{listing}");
}

#[test]
fn repairs_back_off_while_another_process_keeps_undoing_them() {
    let net = Net::new();
    let setup = setup_with_servers(&net);
    let jitd = setup.start(&net.host);
    // another process undoes jitd's lockdown every 50 ms for 8 s
    let host = net.host.clone();
    let fighter = std::thread::spawn(move || {
        let until = Instant::now() + Duration::from_secs(8);
        while Instant::now() < until {
            let _ = std::process::Command::new("ip")
                .args(["netns", "exec", &host, "nft", "flush", "chain", "inet", "jitd", "input"])
                .output();
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    fighter.join().unwrap();
    // each flush opened the ports, so each was repaired at once; only the records
    // coalesced (5 on their own, then one per back-off delay)
    let fought = records(&setup, "repair").len();
    eprintln!("{fought} repair records in 8 s of fighting");
    assert!(
        (3..20).contains(&fought),
        "the records coalesce instead of flooding the log: {fought} in 8 s: {:?}\n{}",
        reasons(&records(&setup, "repair")),
        jitd.log_text()
    );
    assert!(
        wait_for(Duration::from_secs(10), || locked_for_b(&net)),
        "locked again right after the fight: {}",
        jitd.log_text()
    );
    // the repairs without a record of their own are counted in one, within the
    // longest back-off delay
    assert!(
        wait_for(Duration::from_secs(60), || reasons(&records(&setup, "repair"))
            .iter()
            .any(
                |r| r.contains("more time(s) in") && r.contains("another process kept changing the table")
            )),
        "{:?}",
        reasons(&records(&setup, "repair"))
    );
    assert!(jitd.ctl(&["status"]).status.success(), "jitd is alive and answering");
}
