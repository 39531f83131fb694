//! The two-person rule: a port with `approvals = 1` opens only once another person with
//! the approver role approves, for the duration asked counted from the approval; a
//! self-approval, an approval without the role and one the policy no longer allows are
//! refused and audited; a denial and a timeout close the request; pending requests
//! survive kill -9 on their own clock. The real binaries in network namespaces, proven
//! by connecting from a client namespace and by reading the audit log.

use std::process::{Command, Output};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::Value;

use crate::util::*;

/// Requests and approves (and is told it may never approve its own).
const BOTH: u32 = 4242;
/// Approves only.
const APPROVER: u32 = 4243;
/// Requests only.
const REQUESTER: u32 = 4244;
/// Holds no role.
const NOBODY: u32 = 4245;
/// `nogroup`, which may use the socket.
const NOGROUP: u32 = 65534;

/// Port 22 waits for an approval up to an hour, 3389 up to 2 seconds, 5985 needs none.
fn policy(allowed: &str) -> String {
    format!(
        r#"socket_group = "nogroup"
[[ports]]
port = 22
allowed_sources = [{allowed}]
max_duration = "4h"
approvals = 1
approval_timeout = "1h"
[[ports]]
port = 3389
approvals = 1
approval_timeout = "2s"
[[ports]]
port = 5985
[access]
requesters = ["uid:{BOTH}", "uid:{REQUESTER}"]
approvers = ["uid:{BOTH}", "uid:{APPROVER}"]
"#
    )
}

const ANYWHERE: &str = r#""10.77.0.0/16""#;

fn started() -> (Net, Setup, Jitd) {
    let net = Net::new();
    for port in [22, 3389, 5985] {
        serve_echo(&net.host, port);
    }
    let setup = Setup::new(&policy(ANYWHERE));
    let jitd = setup.start(&net.host);
    (net, setup, jitd)
}

/// `jitctl ARGS` as `uid`, run in the background (it may wait for a decision).
fn in_background(setup: &Setup, uid: u32, args: &[&str]) -> JoinHandle<Output> {
    let mut cmd = Command::new("setpriv");
    cmd.args([
        format!("--reuid={uid}"),
        format!("--regid={NOGROUP}"),
        "--clear-groups".into(),
    ])
    .arg(env!("CARGO_BIN_EXE_jitctl"))
    .arg("--socket")
    .arg(setup.socket())
    .args(args)
    .env_remove("SSH_CONNECTION");
    std::thread::spawn(move || output_within(cmd, Duration::from_secs(90)))
}

/// Asks for `ports` from A for an hour as `uid` without waiting; the request's id.
fn ask_no_wait(jitd: &Jitd, uid: u32, ports: &[&str]) -> u64 {
    let mut args = vec!["--json", "request", "--source", A4, "--duration", "1h", "--no-wait"];
    for p in ports {
        args.extend(["--port", p]);
    }
    let out = jitd.ctl_as(uid, NOGROUP, &args);
    assert!(out.status.success(), "{}", text(&out));
    let reply: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reply["grants"], serde_json::json!([]), "{reply}");
    reply["pending"]["id"].as_u64().expect("the request waits")
}

fn pending(jitd: &Jitd) -> Vec<Value> {
    jitd.ctl_json(&["status"])["pending"].as_array().unwrap().clone()
}

/// Waits until `jitctl status` lists `n` pending requests; returns them.
fn wait_pending(jitd: &Jitd, n: usize) -> Vec<Value> {
    assert!(
        wait_for(Duration::from_secs(20), || pending(jitd).len() == n),
        "{n} pending request(s) expected: {:?}\n{}",
        pending(jitd),
        jitd.log_text()
    );
    pending(jitd)
}

/// The audit records of request `id`.
fn records_of(setup: &Setup, id: u64) -> Vec<Value> {
    setup.audit().into_iter().filter(|r| r["request_id"] == id).collect()
}

fn kind(r: &Value) -> (&str, &str) {
    (r["action"].as_str().unwrap(), r["outcome"].as_str().unwrap())
}

/// Seconds between two RFC 3339 times.
fn seconds_between(from: &Value, to: &Value) -> i64 {
    let t = |v: &Value| chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap()).unwrap();
    (t(to) - t(from)).num_seconds()
}

#[test]
fn an_approval_opens_the_ports_for_the_duration_asked_counted_from_the_approval() {
    let (net, setup, jitd) = started();
    // 22 needs an approval, 5985 not: the request waits whole
    let waiting = in_background(
        &setup,
        REQUESTER,
        &[
            "request",
            "--port",
            "22",
            "--port",
            "5985",
            "--source",
            A4,
            "--duration",
            "1h",
        ],
    );
    let listed = wait_pending(&jitd, 1);
    let id = listed[0]["id"].as_u64().unwrap();
    assert_eq!(listed[0]["ports"], serde_json::json!([22, 5985]));
    assert_eq!(listed[0]["requester"], REQUESTER.to_string());
    assert!(!can_connect(&net.a, HOST_A4, 22), "nothing opens before the approval");
    assert!(
        !can_connect(&net.a, HOST_A4, 5985),
        "not even the port without approvals"
    );
    std::thread::sleep(Duration::from_secs(2));
    let out = jitd.ctl_as(APPROVER, NOGROUP, &["approve", &id.to_string()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("approved: request {id}")));
    let waited = waiting.join().unwrap();
    assert!(
        waited.status.success(),
        "the waiting request exits 0: {}",
        text(&waited)
    );
    let stderr = String::from_utf8_lossy(&waited.stderr);
    assert!(
        stderr.contains(&format!("waiting for approval (request {id}, times out ")),
        "{stderr}"
    );
    assert!(
        String::from_utf8_lossy(&waited.stdout).contains("granted: id"),
        "{}",
        text(&waited)
    );
    assert!(can_connect(&net.a, HOST_A4, 22) && can_connect(&net.a, HOST_A4, 5985));
    assert!(!can_connect(&net.b, HOST_B4, 22), "only for the source asked");
    let trail = records_of(&setup, id);
    let kinds: Vec<_> = trail.iter().map(kind).collect();
    assert_eq!(
        kinds,
        vec![
            ("request", "pending"),
            ("approve", "approved"),
            ("request", "approved"),
            ("request", "approved")
        ],
        "{trail:?}"
    );
    assert_eq!(trail[1]["actor_uid"], APPROVER);
    assert!(seconds_between(&trail[0]["time"], &trail[1]["time"]) >= 2);
    for grant in &trail[2..] {
        assert_eq!(
            (grant["actor_uid"].as_u64(), grant["duration_secs"].as_u64()),
            (Some(REQUESTER.into()), Some(3600))
        );
        assert_eq!(grant["time"], trail[1]["time"], "the grant counts from the approval");
    }
    for g in jitd.ctl_json(&["status"])["grants"].as_array().unwrap() {
        assert_eq!(seconds_between(&g["granted_at"], &g["expires_at"]), 3600, "{g}");
        assert!(seconds_between(&trail[0]["time"], &g["granted_at"]) >= 2, "{g}");
    }
    assert_eq!(pending(&jitd), Vec::<Value>::new());
}

#[test]
fn a_self_approval_and_an_approval_without_the_role_are_refused_and_audited() {
    let (net, setup, jitd) = started();
    let id = ask_no_wait(&jitd, BOTH, &["22"]);
    let own = jitd.ctl_as(BOTH, NOGROUP, &["approve", &id.to_string()]);
    assert_eq!(own.status.code(), Some(1), "{}", text(&own));
    assert!(
        String::from_utf8_lossy(&own.stderr).contains("a requester can never approve their own request"),
        "{}",
        text(&own)
    );
    // the requester again, through sudo: root, but its login uid is the requester's
    let sudo = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo {BOTH} > /proc/self/loginuid && exec \"$0\" --socket \"$1\" approve {id}"
        ))
        .arg(env!("CARGO_BIN_EXE_jitctl"))
        .arg(setup.socket())
        .output()
        .unwrap();
    assert_eq!(sudo.status.code(), Some(1), "{}", text(&sudo));
    assert!(
        String::from_utf8_lossy(&sudo.stderr).contains(&format!("login uid is the requester's uid {BOTH}")),
        "{}",
        text(&sudo)
    );
    let stranger = jitd.ctl_as(REQUESTER, NOGROUP, &["approve", &id.to_string()]);
    assert_eq!(stranger.status.code(), Some(1), "{}", text(&stranger));
    assert!(String::from_utf8_lossy(&stranger.stderr).contains("needs the approver role"));
    // root is an admin, and may not approve its own request either
    let roots = jitd.ctl_json(&[
        "request",
        "--port",
        "22",
        "--source",
        B4,
        "--duration",
        "1h",
        "--no-wait",
    ]);
    let roots = roots["pending"]["id"].as_u64().unwrap();
    assert_eq!(jitd.ctl(&["approve", &roots.to_string()]).status.code(), Some(1));
    // nobody without a role gets a request to wait
    let out = jitd.ctl_as(
        NOBODY,
        NOGROUP,
        &["request", "--port", "22", "--source", A4, "--duration", "1h"],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_eq!(wait_pending(&jitd, 2).len(), 2, "only the two requests wait");
    assert!(!can_connect(&net.a, HOST_A4, 22) && !can_connect(&net.b, HOST_B4, 22));
    let refusals: Vec<(Value, Value)> = records_of(&setup, id)
        .iter()
        .filter(|r| kind(r) == ("approve", "denied"))
        .map(|r| (r["actor_uid"].clone(), r["reason"].clone()))
        .collect();
    assert_eq!(refusals.len(), 3, "{refusals:?}");
    assert_eq!(refusals[0].0, BOTH);
    assert!(refusals[0].1.as_str().unwrap().starts_with("not_authorized: request"));
    assert_eq!(refusals[1].0, 0, "root, logged in as the requester");
    assert_eq!(refusals[2].0, REQUESTER);
    let root_refused = records_of(&setup, roots);
    assert_eq!(kind(root_refused.last().unwrap()), ("approve", "denied"));
    assert_eq!(root_refused.last().unwrap()["actor"], "root");
    // someone else approves root's request: recorded as that approver
    let out = jitd.ctl_as(BOTH, NOGROUP, &["approve", &roots.to_string()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(can_connect(&net.b, HOST_B4, 22));
}

#[test]
fn a_denial_closes_the_request_with_its_reason_and_the_waiting_requester_is_told() {
    let (net, setup, jitd) = started();
    let waiting = in_background(
        &setup,
        REQUESTER,
        &["request", "--port", "22", "--source", A4, "--duration", "1h"],
    );
    let id = wait_pending(&jitd, 1)[0]["id"].as_u64().unwrap();
    let out = jitd.ctl_as(
        APPROVER,
        NOGROUP,
        &["deny", &id.to_string(), "--reason", "not during the freeze"],
    );
    assert!(out.status.success(), "{}", text(&out));
    let waited = waiting.join().unwrap();
    assert_eq!(waited.status.code(), Some(1), "{}", text(&waited));
    assert!(
        String::from_utf8_lossy(&waited.stderr)
            .contains(&format!("request {id} was denied by {APPROVER}: not during the freeze")),
        "{}",
        text(&waited)
    );
    assert!(!can_connect(&net.a, HOST_A4, 22));
    let last = records_of(&setup, id).pop().unwrap();
    assert_eq!(kind(&last), ("deny", "done"));
    assert_eq!(
        (last["actor_uid"].as_u64(), last["reason"].as_str()),
        (Some(APPROVER.into()), Some("not during the freeze"))
    );
    let again = jitd.ctl_as(APPROVER, NOGROUP, &["approve", &id.to_string()]);
    assert_eq!(again.status.code(), Some(1), "decided once: {}", text(&again));
}

#[test]
fn a_request_nobody_decides_times_out_and_is_audited_as_such() {
    let (net, setup, jitd) = started();
    // 3389 waits 2 seconds for its approval
    let waiting = in_background(
        &setup,
        REQUESTER,
        &["request", "--port", "3389", "--source", A4, "--duration", "1h"],
    );
    let waited = waiting.join().unwrap();
    assert_eq!(waited.status.code(), Some(1), "{}", text(&waited));
    assert!(
        String::from_utf8_lossy(&waited.stderr).contains("was not approved in time: approval timed out"),
        "{}",
        text(&waited)
    );
    let expired: Vec<Value> = setup
        .audit()
        .into_iter()
        .filter(|r| kind(r) == ("expire", "expired") && r["request_id"].is_u64())
        .collect();
    assert_eq!(expired.len(), 1, "{expired:?}");
    assert_eq!(expired[0]["actor"], "jitd");
    assert!(expired[0]["reason"].as_str().unwrap().starts_with("approval timed out"));
    let id = expired[0]["request_id"].as_u64().unwrap();
    let late = jitd.ctl_as(APPROVER, NOGROUP, &["approve", &id.to_string()]);
    assert_eq!(late.status.code(), Some(1), "{}", text(&late));
    assert!(!can_connect(&net.a, HOST_A4, 3389));
    assert_eq!(pending(&jitd), Vec::<Value>::new());
}

#[test]
fn an_approval_after_a_reload_that_removed_the_source_is_refused_and_closes_the_request() {
    let (net, setup, jitd) = started();
    let id = ask_no_wait(&jitd, REQUESTER, &["22"]);
    setup.write_policy(&policy(r#""10.77.2.0/24""#));
    let out = jitd.ctl(&["reload"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = jitd.ctl_as(APPROVER, NOGROUP, &["approve", &id.to_string()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("(source_not_allowed)"),
        "{}",
        text(&out)
    );
    assert!(!can_connect(&net.a, HOST_A4, 22), "nothing opened");
    let closed = records_of(&setup, id).pop().unwrap();
    assert_eq!(kind(&closed), ("approve", "revoked"));
    assert!(
        closed["reason"]
            .as_str()
            .unwrap()
            .starts_with("policy changed: source 10.77.1.2 is not allowed on port 22/tcp"),
        "{closed}"
    );
    assert_eq!(pending(&jitd), Vec::<Value>::new());
}

#[test]
fn pending_requests_survive_kill_9_and_their_clock_keeps_running() {
    let (net, setup, jitd) = started();
    let long = ask_no_wait(&jitd, REQUESTER, &["22"]);
    let short = ask_no_wait(&jitd, REQUESTER, &["3389"]);
    let before = wait_pending(&jitd, 2);
    jitd.kill();
    // the 2 s approval timeout of 3389 runs out while jitd is down
    std::thread::sleep(Duration::from_secs(3));
    let jitd = setup.start(&net.host);
    let after = pending(&jitd);
    assert_eq!(after.len(), 1, "{after:?}\n{}", jitd.log_text());
    assert_eq!(after[0]["id"], long);
    let drift = seconds_between(&before[0]["times_out_at"], &after[0]["times_out_at"]).abs();
    assert!(drift <= 2, "the same time out: {before:?} {after:?}");
    let ended = records_of(&setup, short).pop().unwrap();
    assert_eq!(kind(&ended), ("expire", "expired"));
    assert_eq!(ended["reason"], "approval timed out while jitd was not running");
    let out = jitd.ctl_as(APPROVER, NOGROUP, &["approve", &long.to_string()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(can_connect(&net.a, HOST_A4, 22));
}

/// A knock signed for principal "4243", the name local uid 4243 goes by (it has no
/// passwd entry): the same person, to jitd.
#[test]
fn a_knock_waits_for_approval_and_the_same_persons_local_user_cannot_approve_it() {
    use crate::knock::{packet, send, Ask, Key, HOST_NAME, KNOCK_PORT};
    let net = Net::new();
    serve_echo(&net.host, 22);
    let keydir = tempfile::tempdir().unwrap();
    let key = Key::new(keydir.path(), "k4243", &["-t", "ed25519"]);
    let setup = Setup::new("");
    let signers = setup.dir.path().join("allowed_signers");
    std::fs::write(&signers, format!("{APPROVER} {}\n", key.public)).unwrap();
    std::fs::set_permissions(&signers, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    setup.write_policy(&format!(
        r#"socket_group = "nogroup"
[[ports]]
port = 22
allowed_sources = ["10.77.0.0/16"]
approvals = 1
[access]
requesters = ["principal:{APPROVER}"]
approvers = ["uid:{APPROVER}", "uid:{BOTH}"]
[remote]
listen = "[::]:{KNOCK_PORT}"
names = ["{HOST_NAME}"]
allowed_signers = "{}"
"#,
        signers.display()
    ));
    let jitd = setup.start(&net.host);
    send(&net.a, HOST_A4, &packet(&key, &Ask::port22()));
    let listed = wait_pending(&jitd, 1);
    assert_eq!(listed[0]["requester"], format!("principal:{APPROVER}"));
    assert_eq!(listed[0]["source"], A4);
    let id = listed[0]["id"].as_u64().unwrap();
    assert!(!can_connect(&net.a, HOST_A4, 22), "the knock opens nothing by itself");
    let own = jitd.ctl_as(APPROVER, NOGROUP, &["approve", &id.to_string()]);
    assert_eq!(own.status.code(), Some(1), "{}", text(&own));
    assert!(
        String::from_utf8_lossy(&own.stderr).contains(&format!(
            "the requester's principal {APPROVER} is the local user {APPROVER}"
        )),
        "{}",
        text(&own)
    );
    let out = jitd.ctl_as(BOTH, NOGROUP, &["approve", &id.to_string()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        can_connect(&net.a, HOST_A4, 22),
        "approved: open for the knock's address"
    );
    let trail = records_of(&setup, id);
    assert_eq!(kind(&trail[0]), ("request", "pending"));
    assert_eq!(trail[0]["principals"], serde_json::json!([APPROVER.to_string()]));
    assert!(trail[0]["key"].as_str().unwrap().starts_with("SHA256:"));
    let grant = trail.iter().find(|r| kind(r) == ("request", "approved")).unwrap();
    assert_eq!(grant["actor"], format!("principal:{APPROVER}"));
    assert!(grant.get("actor_uid").is_none_or(Value::is_null), "a knock has no uid");
}

/// A knock signed for principal "4245": the local user of that name (uid 4245, no
/// role) is not the knock's requester and may not withdraw it; the requester is its key.
#[test]
fn a_local_user_named_like_a_knocks_principal_cannot_withdraw_it() {
    use crate::knock::{packet, send, Ask, Key, HOST_NAME, KNOCK_PORT};
    let net = Net::new();
    serve_echo(&net.host, 22);
    let keydir = tempfile::tempdir().unwrap();
    let key = Key::new(keydir.path(), "k4245", &["-t", "ed25519"]);
    let setup = Setup::new("");
    let signers = setup.dir.path().join("allowed_signers");
    std::fs::write(&signers, format!("{NOBODY} {}\n", key.public)).unwrap();
    std::fs::set_permissions(&signers, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    setup.write_policy(&format!(
        r#"socket_group = "nogroup"
[[ports]]
port = 22
allowed_sources = ["10.77.0.0/16"]
approvals = 1
[access]
requesters = ["principal:{NOBODY}"]
approvers = ["uid:{APPROVER}"]
[remote]
listen = "[::]:{KNOCK_PORT}"
names = ["{HOST_NAME}"]
allowed_signers = "{}"
"#,
        signers.display()
    ));
    let jitd = setup.start(&net.host);
    send(&net.a, HOST_A4, &packet(&key, &Ask::port22()));
    let id = wait_pending(&jitd, 1)[0]["id"].as_u64().unwrap();
    let out = jitd.ctl_as(NOBODY, NOGROUP, &["deny", &id.to_string(), "--reason", "mine, really"]);
    assert_eq!(out.status.code(), Some(1), "refused: {}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("needs the approver role"),
        "{}",
        text(&out)
    );
    assert_eq!(pending(&jitd).len(), 1, "the knock still waits");
    assert!(
        records_of(&setup, id).iter().all(|r| kind(r) != ("deny", "done")),
        "nothing withdrew it: {:?}",
        records_of(&setup, id)
    );
    // the approver still decides it
    let out = jitd.ctl_as(APPROVER, NOGROUP, &["approve", &id.to_string()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(can_connect(&net.a, HOST_A4, 22));
}
