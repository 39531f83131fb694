//! Access requests: what a grant opens and for whom, when it closes, and what is refused.
//! Proven by connecting from client namespaces, and by reading the audit log.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::util::*;

const POLICY: &str = r#"
[[ports]]
port = 22
allowed_sources = ["10.77.0.0/16", "fd00:77::/32"]
max_duration = "2h"
[[ports]]
port = 3389
protocol = "any"
max_duration = "1h"
[access]
viewers = ["uid:65534"]
"#;

fn started(net: &Net) -> (Setup, Jitd) {
    for port in [22, 3389, 8080] {
        serve_echo(&net.host, port);
    }
    let setup = Setup::new(POLICY);
    let jitd = setup.start(&net.host);
    (setup, jitd)
}

fn request(jitd: &Jitd, args: &[&str]) -> Value {
    let mut all = vec!["request"];
    all.extend_from_slice(args);
    jitd.ctl_json(&all)
}

fn records_of(setup: &Setup, outcome: &str) -> Vec<Value> {
    setup.audit().into_iter().filter(|r| r["outcome"] == outcome).collect()
}

#[test]
fn a_grant_opens_the_port_for_its_source_only() {
    let net = Net::new();
    let (setup, jitd) = started(&net);
    let reply = request(
        &jitd,
        &[
            "--port",
            "22",
            "--source",
            A4,
            "--duration",
            "10m",
            "--justification",
            "ticket 4711",
        ],
    );
    let grant = &reply["grants"][0];
    assert_eq!(grant["port"], 22);
    assert_eq!(grant["source"], A4);
    assert!(can_connect(&net.a, HOST_A4, 22), "the granted source connects");
    assert!(
        !can_connect(&net.a, HOST_A6, 22),
        "its other address family stays locked"
    );
    assert!(!can_connect(&net.b, HOST_B4, 22), "another client stays locked");
    assert!(!can_connect(&net.a, HOST_A4, 3389), "a port not asked for stays locked");
    let status = jitd.ctl_json(&["status"]);
    let g = &status["grants"][0];
    assert_eq!(
        (g["id"].clone(), g["source"].clone(), g["port"].clone()),
        (grant["id"].clone(), A4.into(), 22.into())
    );
    assert_eq!(g["protocol"], "tcp");
    assert_eq!(g["requester"], "root");
    assert_eq!(g["justification"], "ticket 4711");
    assert!(g["expires_at"].is_string());
    assert_eq!(status["ports"][0]["approved_last_7d"], 1);
    assert_eq!(status["ports"][0]["last_user"], "root");
    let approved = records_of(&setup, "approved");
    assert_eq!(approved.len(), 1);
    assert_eq!(approved[0]["actor"], "root");
    assert_eq!(approved[0]["actor_uid"], 0);
    assert_eq!(approved[0]["source"], A4);
    assert_eq!(approved[0]["duration_secs"], 600);
    assert_eq!(approved[0]["justification"], "ticket 4711");
    assert_eq!(approved[0]["grant_id"], grant["id"]);
}

#[test]
fn a_grant_closes_on_time_and_its_connections_outlive_it() {
    let net = Net::new();
    let (setup, jitd) = started(&net);
    let started_at = Instant::now();
    let reply = request(&jitd, &["--port", "22", "--source", A4, "--duration", "3s"]);
    let id = reply["grants"][0]["id"].as_u64().unwrap();
    let mut during = connect(&net.a, HOST_A4, 22).expect("connect during the grant");
    assert!(exchange(&mut during, b"in"));
    // closes within a second of its end
    assert!(
        wait_for(Duration::from_secs(15), || !can_connect(&net.a, HOST_A4, 22)),
        "closed after expiry"
    );
    assert!(
        started_at.elapsed() < Duration::from_secs(3 + 6),
        "closed on time ({:?})",
        started_at.elapsed()
    );
    assert!(
        exchange(&mut during, b"after the grant ended"),
        "the established connection survives"
    );
    assert!(
        wait_for(Duration::from_secs(10), || jitd.ctl_json(&["status"])["grants"]
            == serde_json::json!([])),
        "status drops it"
    );
    let expired = records_of(&setup, "expired");
    assert_eq!(expired.len(), 1, "{:?}", setup.audit());
    assert_eq!(expired[0]["grant_id"], id);
    assert!(
        !net.ruleset().contains(A4),
        "the kernel dropped the element:\n{}",
        net.ruleset()
    );
}

#[test]
fn revoke_closes_at_once() {
    let net = Net::new();
    let (setup, jitd) = started(&net);
    let reply = request(&jitd, &["--port", "22", "--source", A4, "--duration", "1h"]);
    let id = reply["grants"][0]["id"].to_string();
    assert!(can_connect(&net.a, HOST_A4, 22));
    let revoked = jitd.ctl_json(&["revoke", &id]);
    assert_eq!(revoked["revoked"][0]["id"].to_string(), id);
    assert!(!can_connect(&net.a, HOST_A4, 22), "closed right after revoke");
    // by source: every port of that source
    request(&jitd, &["--source", A4, "--duration", "30m"]);
    assert!(can_connect(&net.a, HOST_A4, 22) && can_connect(&net.a, HOST_A4, 3389));
    let revoked = jitd.ctl_json(&["revoke", "--source", A4]);
    assert_eq!(revoked["revoked"].as_array().unwrap().len(), 2);
    assert!(!can_connect(&net.a, HOST_A4, 22) && !can_connect(&net.a, HOST_A4, 3389));
    let records = records_of(&setup, "revoked");
    assert_eq!(records.len(), 3);
    assert!(records.iter().all(|r| r["reason"] == "revoked by root"));
    let missing = jitd.ctl(&["revoke", "9999"]);
    assert_eq!(missing.status.code(), Some(1), "{}", text(&missing));
}

#[test]
fn a_newer_request_replaces_the_older() {
    let net = Net::new();
    let (setup, jitd) = started(&net);
    let first = request(&jitd, &["--port", "22", "--source", A4, "--duration", "1h"]);
    let second = request(&jitd, &["--port", "22", "--source", A4, "--duration", "2s"]);
    let first_id = first["grants"][0]["id"].clone();
    assert_eq!(second["superseded"], serde_json::json!([first_id]));
    let grants = jitd.ctl_json(&["status"])["grants"].clone();
    assert_eq!(grants.as_array().unwrap().len(), 1);
    assert_eq!(grants[0]["id"], second["grants"][0]["id"]);
    assert!(can_connect(&net.a, HOST_A4, 22), "no gap: the newer grant is in place");
    assert!(
        wait_for(Duration::from_secs(15), || !can_connect(&net.a, HOST_A4, 22)),
        "the shorter grant ends, the hour-long one is gone"
    );
    let superseded = records_of(&setup, "superseded");
    assert_eq!(superseded.len(), 1);
    assert_eq!(superseded[0]["grant_id"], first_id);
    // a longer one replaces a shorter one too
    request(&jitd, &["--port", "22", "--source", A4, "--duration", "1s"]);
    request(&jitd, &["--port", "22", "--source", A4, "--duration", "1h"]);
    std::thread::sleep(Duration::from_millis(2500));
    assert!(
        can_connect(&net.a, HOST_A4, 22),
        "the longer replacement holds past the first one's end"
    );
}

#[test]
fn prefix_and_ipv6_grants_work() {
    let net = Net::new();
    let (_setup, jitd) = started(&net);
    request(
        &jitd,
        &["--port", "22", "--source", "10.77.1.0/24", "--duration", "10m"],
    );
    assert!(can_connect(&net.a, HOST_A4, 22), "inside the granted prefix");
    assert!(!can_connect(&net.b, HOST_B4, 22), "outside it");
    request(&jitd, &["--port", "22", "--source", A6, "--duration", "10m"]);
    assert!(can_connect(&net.a, HOST_A6, 22), "IPv6 address grant");
    request(
        &jitd,
        &["--port", "3389", "--source", "fd00:77:2::/64", "--duration", "10m"],
    );
    assert!(can_connect(&net.b, "fd00:77:2::1", 3389), "IPv6 prefix grant");
    assert!(
        udp_answered(&net.b, "fd00:77:2::1", 3389),
        "protocol any: UDP opens too"
    );
    assert!(
        !can_connect(&net.b, "fd00:77:2::1", 22),
        "other port of the prefix stays locked"
    );
    // an overlapping, wider and shorter prefix on the same port works too
    request(
        &jitd,
        &["--port", "22", "--source", "10.77.0.0/16", "--duration", "10m"],
    );
    assert!(can_connect(&net.b, HOST_B4, 22), "inside the wider prefix only");
    assert!(can_connect(&net.a, HOST_A4, 22), "inside both");
    let out = jitd.ctl(&["revoke", "--source", "10.77.0.0/16"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!can_connect(&net.b, HOST_B4, 22), "the wider one revoked");
    assert!(can_connect(&net.a, HOST_A4, 22), "the /24 still holds");
}

/// Two requesters, the same source and port: neither can end the other's grant by
/// asking again, and prefixes that overlap both hold, each for its own time.
#[test]
fn grants_belong_to_their_requester() {
    let net = Net::new();
    for port in [22, 3389] {
        serve_echo(&net.host, port);
    }
    let setup = Setup::new(&format!(
        "socket_group = \"nogroup\"\n{POLICY}requesters = [\"uid:4001\", \"uid:4002\"]\n"
    ));
    let jitd = setup.start(&net.host);
    let ask = |uid: u32, source: &str, duration: &str| jitd.request_as(uid, "22", source, duration);
    ask(4001, A4, "10m");
    // 4002 asks for the same source and port for one second: 4001's grant stays
    let reply = ask(4002, A4, "1s");
    assert_eq!(reply["superseded"], serde_json::json!([]), "{reply}");
    std::thread::sleep(Duration::from_millis(2500));
    assert!(can_connect(&net.a, HOST_A4, 22), "4001's ten minutes still hold");
    assert_eq!(jitd.ctl_json(&["status"])["grants"].as_array().unwrap().len(), 1);
    // a /30 held by 4001 does not stop 4002's /16, and the /16 ending early
    // leaves the /30 open
    ask(4001, "10.77.2.0/30", "10m");
    ask(4002, "10.77.0.0/16", "3s");
    assert!(can_connect(&net.b, HOST_B4, 22));
    std::thread::sleep(Duration::from_millis(4000));
    assert!(can_connect(&net.b, HOST_B4, 22), "the /30 outlives the /16");
    let out = jitd.ctl_as(4002, 65534, &["revoke", "--source", "10.77.2.0/30"]);
    assert_eq!(out.status.code(), Some(1), "not 4002's to revoke: {}", text(&out));
    assert!(can_connect(&net.b, HOST_B4, 22));
}

#[test]
fn each_policy_violation_is_refused_with_its_reason_and_the_port_stays_shut() {
    let net = Net::new();
    let (setup, jitd) = started(&net);
    let cases: [(&[&str], &str); 5] = [
        (
            &["--port", "8080", "--source", A4, "--duration", "1m"],
            "port 8080 is not protected",
        ),
        (
            &["--port", "22", "--source", "192.0.2.1", "--duration", "1m"],
            "source 192.0.2.1 is not allowed on port 22/tcp",
        ),
        (
            &["--port", "22", "--source", A4, "--duration", "3h"],
            "duration 3h exceeds the maximum of 2h for port 22/tcp",
        ),
        (
            &["--port", "22", "--source", "10.77.1.300", "--duration", "1m"],
            "source: not an IP address",
        ),
        (
            &["--port", "22", "--source", A4, "--until", "2001-01-01T00:00:00Z"],
            "is in the past",
        ),
    ];
    for (args, reason) in cases {
        let mut all = vec!["request"];
        all.extend_from_slice(args);
        let out = jitd.ctl(&all);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(reason),
            "{args:?}: {}",
            text(&out)
        );
    }
    assert!(!can_connect(&net.a, HOST_A4, 22), "nothing opened");
    assert_eq!(jitd.ctl_json(&["status"])["grants"], serde_json::json!([]));
    let denied = records_of(&setup, "denied");
    assert_eq!(denied.len(), 5, "every refusal is audited");
    assert!(
        denied[0]["reason"]
            .as_str()
            .unwrap()
            .starts_with("port_not_protected: "),
        "{:?}",
        denied[0]
    );
    assert!(
        denied[2]["reason"].as_str().unwrap().starts_with("duration_too_long: "),
        "{:?}",
        denied[2]
    );
    // usage errors exit 2
    let out = jitd.ctl(&["request", "--port", "22"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
}

#[test]
fn a_viewer_reads_status_but_may_not_request() {
    let net = Net::new();
    serve_echo(&net.host, 22);
    let setup = Setup::new(&format!("socket_group = \"nogroup\"\n{POLICY}"));
    let jitd = setup.start(&net.host);
    let meta = std::fs::metadata(setup.socket()).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
        0o660
    );
    let out = jitd.ctl_as(65534, 65534, &["status"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("your role: viewer"),
        "{}",
        text(&out)
    );
    let out = jitd.ctl_as(
        65534,
        65534,
        &["request", "--port", "22", "--source", A4, "--duration", "1m"],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("may not request access"),
        "{}",
        text(&out)
    );
    assert!(!can_connect(&net.a, HOST_A4, 22));
    let denied = records_of(&setup, "denied");
    assert_eq!(denied[0]["actor"], "nobody");
    assert_eq!(denied[0]["actor_uid"], 65534);
    // someone with no role at all cannot even read status
    let out = jitd.ctl_as(4242, 65534, &["status"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    // and a caller outside the socket's group cannot connect
    let out = jitd.ctl_as(4242, 4242, &["status"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
}

#[test]
fn the_audit_log_answers_queries_and_exports_csv() {
    let net = Net::new();
    let (_setup, jitd) = started(&net);
    request(
        &jitd,
        &[
            "--port",
            "22",
            "--source",
            A4,
            "--duration",
            "1m",
            "--justification",
            "a, \"quoted\" reason",
        ],
    );
    request(&jitd, &["--port", "3389", "--source", B4, "--duration", "1m"]);
    let _ = jitd.ctl(&["request", "--port", "22", "--source", "192.0.2.9", "--duration", "1m"]);
    let all = jitd.ctl_json(&["audit"]);
    let outcomes: Vec<&str> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, vec!["done", "approved", "approved", "denied"]);
    let port22 = jitd.ctl_json(&["audit", "--port", "22"]);
    assert_eq!(
        port22.as_array().unwrap().len(),
        3,
        "start record names every port, plus two for 22"
    );
    let none = jitd.ctl_json(&["audit", "--user", "alice"]);
    assert_eq!(none, serde_json::json!([]));
    let future = jitd.ctl_json(&["audit", "--since", "2099-01-01"]);
    assert_eq!(future, serde_json::json!([]));
    let recent = jitd.ctl_json(&["audit", "--since", "1h", "--user", "root"]);
    assert_eq!(recent.as_array().unwrap().len(), 3);
    let csv = jitd.ctl(&["audit", "--format", "csv"]);
    assert!(csv.status.success());
    let csv = String::from_utf8(csv.stdout).unwrap();
    let mut lines = csv.lines();
    assert_eq!(
        lines.next().unwrap(),
        "time,actor_uid,actor,action,outcome,reason,ports,protocol,source,duration_secs,justification,grant_id,principals,key,peer,connections"
    );
    assert!(csv.contains("\"a, \"\"quoted\"\" reason\""), "{csv}");
    assert_eq!(csv.lines().count(), 5);
    let table = jitd.ctl(&["audit"]);
    assert!(String::from_utf8_lossy(&table.stdout).contains("source_not_allowed"));
}

#[test]
fn until_and_all_ports_by_default() {
    let net = Net::new();
    let (_setup, jitd) = started(&net);
    let until = (chrono::Utc::now() + chrono::Duration::minutes(30)).to_rfc3339();
    let reply = request(&jitd, &["--source", A4, "--until", &until]);
    let ports: Vec<u64> = reply["grants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["port"].as_u64().unwrap())
        .collect();
    assert_eq!(ports, vec![22, 3389], "every protected port");
    assert!(can_connect(&net.a, HOST_A4, 22) && can_connect(&net.a, HOST_A4, 3389));
    assert!(udp_answered(&net.a, HOST_A4, 3389));
    assert!(!can_connect(&net.b, HOST_B4, 22));
}

#[test]
fn inside_ssh_the_source_defaults_to_the_client_address() {
    let net = Net::new();
    let (_setup, jitd) = started(&net);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_jitctl"))
        .arg("--socket")
        .arg(_setup.socket())
        .args(["request", "--port", "22", "--duration", "1m"])
        .env("SSH_CONNECTION", format!("{A4} 51000 {HOST_A4} 22"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("using your SSH client address {A4}")));
    assert!(can_connect(&net.a, HOST_A4, 22));
    drop(jitd);
}
