//! Was the access used: each grant counts the new connections its set element
//! admitted (the kernel's per-element counters), `status` shows them, the record of a
//! grant's end carries them ("granted, never used" when none), `audit --unused` lists
//! the unused ones, and the counts survive a kill -9 and a table repair. Proven with
//! real TCP connections and UDP flows from client namespaces.

use std::time::Duration;

use serde_json::Value;

use crate::util::*;

const POLICY: &str = r#"
[[ports]]
port = 22
[[ports]]
port = 5353
protocol = "udp"
"#;

/// jitd with the echo servers behind its ports; `reconcile_ms` is the period of its
/// full readings (the drift check), in debug builds.
fn started(net: &Net, reconcile_ms: &str) -> (Setup, Jitd) {
    for port in [22, 5353] {
        serve_echo(&net.host, port);
    }
    let setup = Setup::new(POLICY);
    let jitd = setup.start_with(&net.host, &[("JITD_RECONCILE_MS", reconcile_ms)]);
    (setup, jitd)
}

fn grant(jitd: &Jitd, source: &str, port: &str, duration: &str) -> u64 {
    let reply = jitd.ctl_json(&["request", "--port", port, "--source", source, "--duration", duration]);
    reply["grants"][0]["id"].as_u64().unwrap()
}

/// The connections `status --json` shows for grant `id` (`None`: not listed, or no count).
fn connections(jitd: &Jitd, id: u64) -> Option<u64> {
    let status = jitd.ctl_json(&["status"]);
    status["grants"]
        .as_array()?
        .iter()
        .find(|g| g["id"] == id)?
        .get("connections")?
        .as_u64()
}

fn shows(jitd: &Jitd, id: u64, want: u64) -> bool {
    wait_for(Duration::from_secs(20), || connections(jitd, id) == Some(want))
}

/// The record that ended grant `id`.
fn end_record(setup: &Setup, id: u64) -> Option<Value> {
    setup.audit().into_iter().find(|r| {
        r["grant_id"] == id && ["expired", "revoked", "superseded"].contains(&r["outcome"].as_str().unwrap_or(""))
    })
}

fn connect_times(ns: &str, ip: &str, n: usize) {
    for i in 0..n {
        assert!(can_connect(ns, ip, 22), "connection {i} gets through");
    }
}

/// `status` reads the counters of the grants it shows: a connection made a moment ago
/// is there at once, with no drift check (the full reading) in between.
#[test]
fn status_shows_a_connection_made_a_moment_ago() {
    let net = Net::new();
    let (_setup, jitd) = started(&net, "3600000");
    let used = grant(&jitd, A4, "22", "10m");
    let other = grant(&jitd, B4, "22", "10m");
    connect_times(&net.a, HOST_A4, 2);
    assert_eq!(
        connections(&jitd, used),
        Some(2),
        "counted for the page, not 10 s later"
    );
    assert_eq!(connections(&jitd, other), Some(0));
    connect_times(&net.b, HOST_B4, 1);
    assert_eq!(connections(&jitd, other), Some(1));
    let status = jitd.ctl_json(&["status"]);
    assert!(status["connections_counted_at"].is_string(), "says when: {status}");
    let table = text(&jitd.ctl(&["status"]));
    assert!(table.contains("counted up to"), "{table}");
}

#[test]
fn counters_move_with_real_connections_and_an_unused_grant_stays_at_zero() {
    let net = Net::new();
    let (setup, jitd) = started(&net, "300");
    let used = grant(&jitd, A4, "22", "10m");
    let udp = grant(&jitd, A4, "5353", "10m");
    let unused = grant(&jitd, B4, "22", "10m");
    connect_times(&net.a, HOST_A4, 3);
    assert!(udp_answered(&net.a, HOST_A4, 5353), "the UDP flow gets through");
    assert!(shows(&jitd, used, 3), "3 connections: {:?}", connections(&jitd, used));
    assert!(shows(&jitd, udp, 1), "one UDP flow: {:?}", connections(&jitd, udp));
    assert_eq!(connections(&jitd, unused), Some(0), "nothing came from b");
    // refused connections count for nobody: a's IPv6 address has no grant
    assert!(!can_connect(&net.a, HOST_A6, 22));
    assert!(!udp_answered(&net.b, HOST_B4, 5353));
    // the table shows a column, and when the counts were taken
    let table = text(&jitd.ctl(&["status"]));
    assert!(table.contains("CONNS") && table.contains("counted up to"), "{table}");
    // an established session's further packets are not new connections
    let mut session = connect(&net.a, HOST_A4, 22).unwrap();
    for _ in 0..20 {
        assert!(exchange(&mut session, b"more data on the same session"));
    }
    close(session);
    assert!(shows(&jitd, used, 4), "one more connection, however much it sent");

    for id in [unused, used] {
        let out = jitd.ctl(&["revoke", &id.to_string()]);
        assert!(out.status.success(), "{}", text(&out));
    }
    let record = end_record(&setup, unused).expect("the unused grant's end is recorded");
    assert_eq!(record["connections"], 0, "{record}");
    assert!(
        record["reason"].as_str().unwrap().ends_with("granted, never used"),
        "{record}"
    );
    let record = end_record(&setup, used).expect("the used grant's end is recorded");
    assert_eq!(record["connections"], 4, "{record}");
    assert!(!record["reason"].as_str().unwrap().contains("never used"), "{record}");

    let listed = jitd.ctl_json(&["audit", "--unused"]);
    let ids: Vec<u64> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["grant_id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, vec![unused], "only the unused grant's end: {listed}");
    let csv = text(&jitd.ctl(&["audit", "--unused", "--format", "csv"]));
    assert!(csv.contains(",connections") && csv.contains(B4), "{csv}");
}

/// The kernel drops an element at its timeout, about when jitd's expiry runs: the
/// counts are read ahead of the end, so a grant used just before it ends is not
/// recorded as unused. No periodic reading comes in between (once an hour).
#[test]
fn an_expiring_grant_is_counted_before_its_element_goes() {
    let net = Net::new();
    let (setup, jitd) = started(&net, "3600000");
    let used = grant(&jitd, A4, "22", "4s");
    let unused = grant(&jitd, B4, "22", "4s");
    connect_times(&net.a, HOST_A4, 2);
    assert!(
        wait_for(Duration::from_secs(20), || end_record(&setup, used).is_some()
            && end_record(&setup, unused).is_some()),
        "both expire"
    );
    let record = end_record(&setup, used).unwrap();
    assert_eq!(record["outcome"], "expired");
    assert_eq!(record["connections"], 2, "{record}");
    let record = end_record(&setup, unused).unwrap();
    assert_eq!(record["connections"], 0, "{record}");
    assert_eq!(record["reason"], "time is up; granted, never used");
    let listed = jitd.ctl_json(&["audit", "--unused"]);
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed[0]["grant_id"], unused);
}

/// After kill -9 the kernel keeps the table and its counters: the restarted jitd takes
/// the counts on from its checkpoint, crediting what the counters added since (here:
/// connections no reading of the dead jitd saw), even when it replaces the table at
/// start (the policy changed meanwhile). A grant that ends while jitd is down takes its
/// element's counter with it: its count is recorded as unknown, never as "never used".
/// A repair that replaces the table keeps the grants' counts too.
#[test]
fn counts_survive_kill_and_restart_and_a_table_repair() {
    let net = Net::new();
    serve_echo(&net.host, 22);
    let setup = Setup::new(POLICY);
    // no periodic reading: only the kernel's counters know of the connections
    let slow = [("JITD_RECONCILE_MS", "3600000")];
    let jitd = setup.start_with(&net.host, &slow);
    let id = grant(&jitd, A4, "22", "10m");
    let short = grant(&jitd, B4, "22", "3s");
    let short_ends = std::time::Instant::now() + Duration::from_secs(3);
    assert!(can_connect(&net.b, HOST_B4, 22));
    // the checkpoint (at most a second after the grant) has it, with no connection
    assert!(wait_for(Duration::from_secs(10), || {
        std::fs::read_to_string(setup.state_dir().join("grants.json")).is_ok_and(|t| t.contains(A4))
    }));
    // not read by jitd (no status asked: it reads the counters of what it shows)
    connect_times(&net.a, HOST_A4, 3);
    jitd.kill();
    assert!(
        can_connect(&net.a, HOST_A4, 22),
        "the kernel still admits (and counts) while jitd is dead"
    );
    // one more protected port: the lockdown differs, the restart replaces the table
    setup.write_policy(&format!("{POLICY}[[ports]]\nport = 3389\n"));
    std::thread::sleep(short_ends.saturating_duration_since(std::time::Instant::now()));
    let jitd = setup.start_with(&net.host, &[("JITD_RECONCILE_MS", "300")]);
    assert!(
        !jitd.log_text().contains("lockdown in the kernel is intact"),
        "the table was replaced: {}",
        jitd.log_text()
    );
    assert_eq!(connections(&jitd, id), Some(4), "counted by the kernel meanwhile");
    let ended = end_record(&setup, short).expect("the short grant ended while jitd was down");
    assert!(ended.get("connections").is_none(), "{ended}");
    assert!(
        ended["reason"]
            .as_str()
            .unwrap()
            .ends_with("connections not counted: it ended while jitd was not running (0 counted before)"),
        "{ended}"
    );

    // another process breaks the lockdown: jitd replaces the table whole
    let repairs = || setup.audit().iter().filter(|r| r["action"] == "repair").count();
    let before = repairs();
    net.nft_ok(&["flush", "chain", "inet", "jitd", "syn_check"]);
    assert!(wait_for(Duration::from_secs(20), || repairs() > before), "repaired");
    assert!(wait_for(Duration::from_secs(10), || can_connect(&net.a, HOST_A4, 22)));
    assert!(shows(&jitd, id, 5), "the count went on: {:?}", connections(&jitd, id));
    let out = jitd.ctl(&["revoke", &id.to_string()]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(end_record(&setup, id).unwrap()["connections"], 5);
}

/// A reboot takes the kernel's table, and its counters, with it: the grants come back
/// from the checkpoint with the counts it holds. A grant's first use asks for a
/// checkpoint, so a used grant is never brought back as unused.
#[test]
fn after_a_reboot_the_checkpoint_keeps_which_grants_were_used() {
    let net = Net::new();
    serve_echo(&net.host, 22);
    let setup = Setup::new(POLICY);
    let fast = [("JITD_RECONCILE_MS", "300")];
    let jitd = setup.start_with(&net.host, &fast);
    let used = grant(&jitd, A4, "22", "10m");
    let unused = grant(&jitd, B4, "22", "10m");
    let checkpoint = || std::fs::read_to_string(setup.state_dir().join("grants.json")).unwrap_or_default();
    assert!(wait_for(Duration::from_secs(10), || checkpoint().contains(B4)));
    // no grant changes from here on: only the first use asks for a checkpoint
    connect_times(&net.a, HOST_A4, 2);
    assert!(shows(&jitd, used, 2));
    assert!(
        wait_for(Duration::from_secs(10), || checkpoint().contains("admitted")),
        "the first use was checkpointed"
    );
    jitd.kill();
    // what a reboot leaves: no table in the kernel
    net.nft_ok(&["delete", "table", "inet", "jitd"]);
    let jitd = setup.start_with(&net.host, &fast);
    assert_eq!(connections(&jitd, used), Some(2));
    assert_eq!(connections(&jitd, unused), Some(0));
    assert!(can_connect(&net.a, HOST_A4, 22), "the grant is back");
    assert!(shows(&jitd, used, 3), "and counts on");
    for id in [used, unused] {
        assert!(jitd.ctl(&["revoke", &id.to_string()]).status.success());
    }
    assert_eq!(end_record(&setup, used).unwrap()["connections"], 3);
    assert_eq!(end_record(&setup, unused).unwrap()["connections"], 0);
}
