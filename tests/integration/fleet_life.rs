//! The fleet over a host's life: restarts (kill -9 and a stop), a host leaving and
//! joining a group by a reload, a compaction of etcd's history while a host is cut
//! off, and a port that needs an approver on one host. The same harness as
//! [`crate::fleet`]: real etcd with TLS, real jitd hosts in namespaces, `jitctl fleet`
//! signing with `ssh-keygen`, access proven by connecting from the client namespace.

use std::time::Duration;

use serde_json::Value;

use crate::fleet::*;
use crate::util::*;

#[test]
fn a_host_killed_and_restarted_keeps_its_grant_applies_nothing_twice_and_closes_on_revoke() {
    let mut fleet = Fleet::new();
    let id = fleet.approved("h1,h2");
    assert!(
        fleet.opens_within(1, 10) && fleet.opens_within(2, 10),
        "{}",
        fleet.logs()
    );
    fleet.down(1, true);
    fleet.up(1);
    // the grant came back from the audit log; the live request was not applied again
    assert!(fleet.open(1), "h1 closed by its restart: {}", fleet.logs());
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(fleet.approvals_of(1, &id), 1, "{:?}", fleet.setups[0].audit_lines());
    // and the grant still belongs to the request: revoking it closes h1 too
    fleet.revoke(&id);
    for n in 1..=2 {
        assert!(
            fleet.closes_within(n, 10),
            "h{n} still open after revoke: {}",
            fleet.logs()
        );
    }
    assert!(fleet.revoked_on(1, &id), "{:?}", fleet.setups[0].audit_lines());
}

#[test]
fn a_request_revoked_while_its_host_was_stopped_is_closed_when_it_starts() {
    let mut fleet = Fleet::new();
    let id = fleet.approved("h1");
    assert!(fleet.opens_within(1, 10), "{}", fleet.logs());
    // a stop leaves the lockdown and the grant's element (the kernel times it out)
    fleet.down(1, false);
    assert!(fleet.open(1), "the stop closed h1's grant");
    fleet.revoke(&id);
    fleet.up(1);
    assert!(
        fleet.closes_within(1, 10),
        "h1 still open after it started: {}",
        fleet.logs()
    );
    assert_eq!(fleet.approvals_of(1, &id), 1);
}

#[test]
fn a_host_leaving_a_group_closes_the_groups_grants_and_one_joining_opens_its_live_requests() {
    let fleet = Fleet::new();
    let id = fleet.approved("group:web");
    assert!(
        fleet.opens_within(1, 10) && fleet.opens_within(2, 10),
        "{}",
        fleet.logs()
    );
    assert!(!fleet.open(3));
    // h2 leaves web: the reload ends the grant, audited with the reason, and h2 says so
    fleet.regroup(2, "\"db\"");
    assert!(
        fleet.closes_within(2, 10),
        "h2 still open after leaving web: {}",
        fleet.logs()
    );
    let ended = fleet.setups[1].audit().into_iter().any(|r| {
        r["action"] == "reload"
            && r["outcome"] == "revoked"
            && r["reason"].as_str().unwrap_or("").contains("no longer among the hosts")
    });
    assert!(ended, "{:?}", fleet.setups[1].audit_lines());
    let said = wait_for(Duration::from_secs(15), || fleet.answer(&id, 2)["outcome"] == "revoked");
    assert!(said, "{}", fleet.status());
    assert!(fleet.open(1), "h1 is still in web");
    // h3 joins web: it applies the live request, until the request's end
    fleet.regroup(3, "\"db\", \"web\"");
    assert!(
        fleet.opens_within(3, 15),
        "h3 did not open on joining web: {}",
        fleet.logs()
    );
    assert_eq!(fleet.approvals_of(3, &id), 1);
    fleet.revoke(&id);
    for n in [1, 3] {
        assert!(fleet.closes_within(n, 10), "h{n} still open after revoke");
    }
}

#[test]
fn a_host_cut_off_across_a_compaction_converges_when_it_is_back() {
    let fleet = Fleet::new();
    let before = fleet.approved("h1");
    assert!(fleet.opens_within(1, 10), "{}", fleet.logs());
    fleet.cut_off(1);
    // meanwhile: the request is revoked, another is made, history churns and is compacted
    fleet.revoke(&before);
    let (_, v) = fleet.request("h1,h2", &fleet.alice, "10m");
    let after = v["id"].as_str().expect("a request id").to_string();
    assert!(fleet.opens_within(2, 10), "{}", fleet.logs());
    for n in 0..50 {
        fleet.etcd.put_raw("/jitd/churn", &n.to_string(), None);
    }
    fleet.etcd.delete_raw("/jitd/churn");
    let compacted = fleet.etcd.compact();
    fleet.net.set_link(1, true);
    // h1 reads everything again: the revoked request closes, the new one opens
    let converged = wait_for(Duration::from_secs(30), || {
        fleet.approvals_of(1, &after) == 1 && fleet.open(1)
    });
    assert!(converged, "h1 (etcd compacted to {compacted}): {}", fleet.logs());
    // the revoked request's grant ended, and the open port now belongs to the new
    // request (grants of two requests for one address live side by side)
    // (the re-read judges the live requests first, then closes those gone)
    let ended = wait_for(Duration::from_secs(10), || {
        fleet.setups[0].audit().into_iter().any(|r| {
            r["fleet_request"] == before.as_str() && matches!(r["outcome"].as_str(), Some("revoked" | "superseded"))
        })
    });
    assert!(ended, "{:?}", fleet.setups[0].audit_lines());
    assert_eq!(fleet.approvals_of(1, &before), 1);
    fleet.revoke(&after);
    assert!(
        fleet.closes_within(1, 10),
        "h1 still open after the new request was revoked"
    );
}

#[test]
fn a_port_that_needs_an_approver_waits_on_that_host_and_opens_once_approved() {
    let fleet = Fleet::with_policy(["approvals = 1", "", ""], "");
    let (out, v) = fleet.request("h1,h2", &fleet.alice, "10m");
    // not every host approved: jitctl says so and exits non-zero
    assert!(!out.status.success(), "{}", text(&out));
    assert_eq!(outcomes(&v), pairs(&[("h1", "pending"), ("h2", "approved")]));
    let id = v["id"].as_str().unwrap().to_string();
    let reason = v["hosts"][0]["reason"].as_str().unwrap().to_string();
    assert!(reason.contains("jitctl approve"), "{reason}");
    assert!(fleet.opens_within(2, 10));
    assert!(!fleet.open(1), "h1 opened without an approver");
    // an approver on h1 (root) approves the request waiting there
    let listed = fleet.jitds[0].ctl_json(&["status"]);
    let waiting = listed["pending"][0]["id"]
        .as_u64()
        .unwrap_or_else(|| panic!("{listed}"));
    let out = fleet.jitds[0].ctl(&["approve", &waiting.to_string()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(fleet.opens_within(1, 10), "{}", fleet.logs());
    let said = wait_for(Duration::from_secs(15), || {
        fleet.answer(&id, 1)["outcome"] == "approved"
    });
    assert!(said, "{}", fleet.status());
    // the approved grant still belongs to the request
    fleet.revoke(&id);
    assert!(
        fleet.closes_within(1, 10) && fleet.closes_within(2, 10),
        "{}",
        fleet.logs()
    );
}

#[test]
fn a_signed_approval_beside_the_request_opens_where_it_waits_but_never_ones_own() {
    let fleet = Fleet::with_policy(
        ["approvals = 1", "approvals = 1", ""],
        r#"approvers = ["principal:alice", "principal:bob"]"#,
    );
    let (out, v) = fleet.request("h1,h2,h3", &fleet.alice, "10m");
    assert!(!out.status.success(), "{}", text(&out));
    assert_eq!(
        outcomes(&v),
        pairs(&[("h1", "pending"), ("h2", "pending"), ("h3", "approved")])
    );
    let id = v["id"].as_str().unwrap().to_string();
    let approve = |key: &crate::knock::Key| {
        let path = key.path.display().to_string();
        let out = fleet.ctl(&["approve", &id, "--key", &path, "--wait", "3s"]);
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        (out, v)
    };
    // alice may approve, but not her own request: each host refuses it and audits why
    let (out, v) = approve(&fleet.alice);
    assert!(!out.status.success(), "{}", text(&out));
    assert_eq!(outcomes(&v), pairs(&[("h1", "pending"), ("h2", "pending")]));
    for n in 1..=2 {
        let refused = wait_for(Duration::from_secs(10), || {
            fleet.setups[n - 1]
                .audit()
                .iter()
                .any(|r| r["action"] == "approve" && r["outcome"] == "denied" && r["actor"] == "principal:alice")
        });
        assert!(refused, "h{n}: {:?}", fleet.setups[n - 1].audit_lines());
        assert!(!fleet.open(n), "h{n} opened on a self-approval");
    }
    // mallory's key is in no allowed_signers: refused before the policy sees it
    let (out, _) = approve(&fleet.mallory);
    assert!(!out.status.success());
    let unknown = wait_for(Duration::from_secs(10), || {
        fleet
            .fleet_records(1)
            .iter()
            .any(|r| r["reason"].as_str().unwrap_or("").starts_with("unknown_key:"))
    });
    assert!(unknown, "{:?}", fleet.fleet_records(1));
    // bob's approval opens both hosts where it waited
    let (out, v) = approve(&fleet.bob);
    assert!(out.status.success(), "{}\n{}", text(&out), fleet.logs());
    assert_eq!(outcomes(&v), pairs(&[("h1", "approved"), ("h2", "approved")]));
    for n in 1..=3 {
        assert!(fleet.opens_within(n, 10), "h{n}: {}", fleet.logs());
    }
    let by_bob = fleet.setups[0].audit().into_iter().any(|r| {
        r["action"] == "approve"
            && r["outcome"] == "approved"
            && r["actor"] == "principal:bob"
            && r["fleet_request"] == id.as_str()
            && r["key"].as_str().is_some_and(|k| k.starts_with("SHA256:"))
    });
    assert!(by_bob, "{:?}", fleet.setups[0].audit_lines());
    fleet.revoke(&id);
    for n in 1..=3 {
        assert!(fleet.closes_within(n, 10), "h{n} still open after revoke");
    }
}
