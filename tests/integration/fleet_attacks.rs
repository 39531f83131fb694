//! The fleet against someone who can write to etcd but holds no signing key, and
//! against two requests for one address: a revoke undone by writing the kept value
//! again, values too large to read in one response, a full read of much junk (jitd's
//! memory), a request signed for another fleet, and one request closing another's
//! access. Real etcd, real jitd hosts, access proven by connecting.

use std::time::Duration;

use crate::fleet::*;
use crate::fleet_net::CLIENT_IP;
use crate::util::*;

#[test]
fn a_revoke_undone_by_writing_the_kept_request_again_does_not_reopen_or_keep_anything() {
    let mut fleet = Fleet::new();
    let id = fleet.approved("h1,h2");
    assert!(
        fleet.opens_within(1, 10) && fleet.opens_within(2, 10),
        "{}",
        fleet.logs()
    );
    let key = format!("/jitd/requests/{id}");
    let kept = fleet.etcd.get_raw(&key).expect("the request is in etcd");
    // h1 is down while its owner revokes; the attacker writes the same signed value again
    fleet.down(1, false);
    fleet.revoke(&id);
    assert!(fleet.closes_within(2, 10), "h2 still open after the revoke");
    fleet.etcd.put_raw(&key, &kept, Some(600));
    // h2 saw the deletion: the value written again opens nothing
    std::thread::sleep(Duration::from_secs(2));
    assert!(!fleet.open(2), "h2 reopened for a request written again");
    // h1 starts, reads everything, and closes the grant of the first key
    fleet.up(1);
    assert!(
        fleet.closes_within(1, 15),
        "h1 kept the grant of a revoked request: {}",
        fleet.logs()
    );
    assert!(fleet.revoked_on(1, &id), "{:?}", fleet.setups[0].audit_lines());
}

#[test]
fn values_too_large_to_read_at_once_do_not_cut_a_host_off_the_fleet() {
    let fleet = Fleet::new();
    for n in 0..5 {
        fleet.etcd.put_big(&format!("/jitd/requests/{n:032x}"), 1_000_000, 600);
    }
    let id = fleet.approved("h1,h2");
    assert!(fleet.opens_within(1, 10), "{}", fleet.logs());
    // h1 is cut off while the request is revoked and etcd compacts its history: on its
    // return it must read everything again, the 5 MB of junk included
    fleet.cut_off(1);
    fleet.revoke(&id);
    fleet.etcd.compact();
    fleet.net.set_link(1, true);
    assert!(
        fleet.closes_within(1, 30),
        "h1 still open after its return: {}",
        fleet.logs()
    );
    // and it still takes new requests
    fleet.approved("h1");
    assert!(fleet.opens_within(1, 10), "{}", fleet.logs());
}

#[test]
fn two_requests_for_one_address_live_side_by_side_and_each_revoke_closes_only_its_own() {
    let fleet = Fleet::new();
    let first = fleet.approved("h1");
    let second = fleet.approved("h1");
    assert!(fleet.opens_within(1, 10), "{}", fleet.logs());
    fleet.revoke(&second);
    let revoked = wait_for(Duration::from_secs(10), || {
        fleet.setups[0]
            .audit()
            .iter()
            .any(|r| r["action"] == "revoke" && r["fleet_request"] == second.as_str())
    });
    assert!(revoked, "{:?}", fleet.setups[0].audit_lines());
    assert!(
        fleet.open(1),
        "revoking the second request closed the first one's access"
    );
    fleet.revoke(&first);
    assert!(fleet.closes_within(1, 10), "h1 still open after both revokes");
}

#[test]
fn an_approval_never_covers_another_text_written_under_the_same_id() {
    let fleet = Fleet::with_policy(
        ["approvals = 1", "approvals = 1", ""],
        r#"approvers = ["principal:bob"]"#,
    );
    let (out, v) = fleet.request("h1", &fleet.alice, "10m");
    assert!(!out.status.success(), "{}", text(&out));
    let id = v["id"].as_str().unwrap().to_string();
    let bob = fleet.bob.path.display().to_string();
    let out = fleet.ctl(&["approve", &id, "--key", &bob]);
    assert!(out.status.success(), "{}\n{}", text(&out), fleet.logs());
    assert!(fleet.opens_within(1, 10), "{}", fleet.logs());
    // alice writes another request under the same id (her nonce) for h2: bob's
    // approval, still beside it, must not open h2
    let key = format!("/jitd/requests/{id}");
    let first = fleet.etcd.get_raw(&key).unwrap();
    let first = &first[..first.find("-----BEGIN").unwrap()];
    let second = first.replace("hosts h1\n", "hosts h2\n");
    let signed = format!("{second}{}", fleet.alice.sign(&second, "fleet@jitd").trim_end());
    fleet.etcd.put_raw(&key, &signed, Some(600));
    let refused = wait_for(Duration::from_secs(15), || {
        fleet
            .fleet_records(2)
            .iter()
            .any(|r| r["reason"].as_str().unwrap_or("").starts_with("approval_mismatch:"))
    });
    assert!(refused, "h2: {:?}\n{}", fleet.fleet_records(2), fleet.logs());
    assert!(!fleet.open(2), "h2 opened on an approval of another text");
    let pending = fleet.jitds[1].ctl_json(&["status"]);
    assert_eq!(pending["pending"].as_array().map(Vec::len), Some(1), "{pending}");
}

#[test]
fn many_large_values_written_while_a_host_was_away_do_not_keep_it_deaf() {
    let fleet = Fleet::new();
    let id = fleet.approved("h1");
    assert!(fleet.opens_within(1, 10), "{}", fleet.logs());
    fleet.cut_off(1);
    // more than one watch response can carry (70 MB), no compaction: resuming fails,
    // and the host must read everything again, page by page
    for n in 0..50 {
        fleet.etcd.put_big(&format!("/jitd/requests/{n:032x}"), 1_400_000, 600);
    }
    fleet.revoke(&id);
    fleet.net.set_link(1, true);
    assert!(
        fleet.closes_within(1, 60),
        "h1 still open after its return: {}",
        fleet.logs()
    );
}

#[test]
fn a_group_joined_while_etcd_was_unreachable_is_read_on_return() {
    let fleet = Fleet::new();
    let id = fleet.approved("group:web");
    assert!(fleet.opens_within(1, 10), "{}", fleet.logs());
    fleet.cut_off(3);
    fleet.regroup(3, "\"db\", \"web\"");
    fleet.net.set_link(3, true);
    assert!(
        fleet.opens_within(3, 30),
        "h3 did not apply its new group's request: {}",
        fleet.logs()
    );
    assert_eq!(fleet.approvals_of(3, &id), 1);
}

#[test]
fn a_request_signed_for_another_fleet_opens_nothing_here_even_copied_into_this_ones_prefix() {
    let fleet = Fleet::new();
    let alice = fleet.alice.path.display().to_string();
    let sign_in = |flags: &[&str], host: &str| {
        let mut args = flags.to_vec();
        let request = [
            "request",
            "--hosts",
            host,
            "--port",
            "22",
            "--source",
            CLIENT_IP,
            "--duration",
            "10m",
            "--key",
            &alice,
            "--wait",
            "2s",
        ];
        args.extend(request);
        let out = fleet.ctl(&args);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let id = v["id"].as_str().unwrap_or_else(|| panic!("{}", text(&out))).to_string();
        id
    };
    // alice signs for h1 in the fleet under /staging/ (no host of this fleet reads it
    // there); someone who can write to etcd copies it into this fleet's prefix
    let id = sign_in(&["--prefix", "/staging/"], "h1");
    let signed = fleet.etcd.get_raw(&format!("/staging/requests/{id}")).expect("written");
    assert!(signed.starts_with("fleet /staging/\n"), "{signed}");
    fleet.etcd.put_raw(&format!("/jitd/requests/{id}"), &signed, Some(600));
    // and a request for h2 signed for fleet "staging" written straight into this prefix
    let named = sign_in(&["--fleet-id", "staging"], "h2");
    for (n, id) in [(1, &id), (2, &named)] {
        let refused = wait_for(Duration::from_secs(15), || {
            fleet.fleet_records(n).iter().any(|r| {
                r["reason"]
                    .as_str()
                    .is_some_and(|why| why.starts_with("other_fleet:") && why.contains(id.as_str()))
            })
        });
        assert!(refused, "h{n}: {:?}\n{}", fleet.fleet_records(n), fleet.logs());
        assert!(!fleet.open(n), "h{n} opened for a request signed for another fleet");
        assert_eq!(fleet.approvals_of(n, id), 0);
    }
    // requests signed for this fleet still open
    fleet.approved("h1,h2");
    assert!(
        fleet.opens_within(1, 10) && fleet.opens_within(2, 10),
        "{}",
        fleet.logs()
    );
}

/// The peak resident memory of process `pid` (VmHWM), in bytes.
fn peak_memory(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

#[test]
fn a_full_read_of_much_junk_holds_a_page_at_a_time_and_a_request_written_after_it_opens() {
    let fleet = Fleet::new();
    let pid = fleet.jitds[0].pid();
    let before = peak_memory(pid);
    // 98 MB of junk values just under etcd's request limit: most under requests/, some
    // where approvals go
    let (values, size) = (70, 1_400_000);
    for n in 0..values {
        let key = match n % 7 {
            0 => format!("/jitd/approvals/{n:032x}/{n:032x}"),
            _ => format!("/jitd/requests/{n:032x}"),
        };
        fleet.etcd.put_big(&key, size, 600);
    }
    // force h1 to read everything again: history moves on and is compacted, then h1's
    // lease is revoked (its watch cannot resume from a compacted revision)
    fleet.etcd.put_raw("/jitd/churn", "1", None);
    fleet.etcd.delete_raw("/jitd/churn");
    fleet.etcd.compact();
    assert!(
        fleet.etcd.revoke_lease_of("/jitd/hosts/h1"),
        "h1 is registered on a lease"
    );
    let reread = wait_for(Duration::from_secs(30), || {
        fleet.jitds[0].log_text().contains("reading everything again")
    });
    assert!(reread, "{}", fleet.jitds[0].log_text());
    // a genuine request written after the junk opens once h1 is back
    let (out, _) = fleet.request_waiting("h1", &fleet.alice, "10m", "60s");
    assert!(out.status.success(), "{}\n{}", text(&out), fleet.logs());
    assert!(fleet.opens_within(1, 10), "{}", fleet.logs());
    let junk = (values * size) as u64;
    let grown = peak_memory(pid).saturating_sub(before);
    eprintln!(
        "h1 peak memory grew by {} KiB over {} KiB of junk (peak before: {} KiB)",
        grown / 1024,
        junk / 1024,
        before / 1024
    );
    assert!(
        grown < junk / 4,
        "h1's peak memory grew by {grown} bytes reading {junk} bytes of junk: more than a page at a time"
    );
    // the junk was audited, never judged as requests
    let too_large = fleet
        .fleet_records(1)
        .iter()
        .any(|r| r["reason"].as_str().is_some_and(|w| w.starts_with("too_large:")));
    assert!(too_large, "{:?}", fleet.fleet_records(1));
}
