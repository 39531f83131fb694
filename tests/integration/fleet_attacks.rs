//! The fleet against someone who can write to etcd but holds no signing key, and
//! against two requests for one address: a revoke undone by writing the kept value
//! again, values too large to read in one response, and one request closing another's
//! access. Real etcd, real jitd hosts, access proven by connecting.

use std::time::Duration;

use crate::fleet::*;
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
    let out = fleet.ctl(&["revoke", &id]);
    assert!(out.status.success(), "{}", text(&out));
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
    let closed = fleet.setups[0]
        .audit()
        .into_iter()
        .any(|r| r["action"] == "revoke" && r["actor"] == "fleet" && r["fleet_request"] == id.as_str());
    assert!(closed, "{:?}", fleet.setups[0].audit_lines());
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
    fleet.net.set_link(1, false);
    let dropped = wait_for(Duration::from_secs(20), || {
        fleet.jitds[0].log_text().contains("reconnecting")
    });
    assert!(dropped, "{}", fleet.jitds[0].log_text());
    let out = fleet.ctl(&["revoke", &id]);
    assert!(out.status.success(), "{}", text(&out));
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
    let out = fleet.ctl(&["revoke", &second]);
    assert!(out.status.success(), "{}", text(&out));
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
    let out = fleet.ctl(&["revoke", &first]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(fleet.closes_within(1, 10), "h1 still open after both revokes");
}
