use std::path::Path;
use std::sync::Arc;

use super::super::tests::{daemon_with, records, root};
use super::super::upkeep;
use super::*;
use crate::api::protocol::{ApproveRequest, DenyRequest, PendingQuery, Request};
use crate::api::server::{Handler, Peer};
use crate::firewall::RecordingFirewall;

/// Port 3389 needs an approval within a minute (22, from the harness, does not); uid
/// 4242 and 4244 request, 4243 and 4242 approve.
const POLICY: &str = "[[ports]]\nport = 3389\nmax_duration = \"2h\"\napprovals = 1\napproval_timeout = \"1m\"\n[access]\nrequesters = [\"uid:4242\", \"uid:4244\"]\napprovers = [\"uid:4243\", \"uid:4242\"]\n";

fn peer(uid: u32) -> Peer {
    Peer {
        uid,
        gid: uid,
        pid: None,
    }
}

fn ask(ports: &[u16]) -> Request {
    Request::Request(GrantRequest {
        ports: ports.to_vec(),
        source: "192.0.2.7".into(),
        duration_secs: Some(3600),
        until: None,
        justification: Some("ticket 4711".into()),
    })
}

async fn started(dir: &Path) -> Arc<Daemon<RecordingFirewall>> {
    daemon_with(dir, POLICY).await
}

/// Asks as `uid` and returns the pending request's id.
async fn pending_id(d: &Daemon<RecordingFirewall>, uid: u32, ports: &[u16]) -> GrantId {
    let reply = d.handle(peer(uid), ask(ports)).await;
    assert!(reply.ok, "{reply:?}");
    let result = reply.result.unwrap();
    assert_eq!(result["grants"], serde_json::json!([]), "{result}");
    result["pending"]["id"].as_u64().expect("a pending request")
}

fn approve(id: GrantId) -> Request {
    Request::Approve(ApproveRequest { id })
}

fn kernel_changes(d: &Daemon<RecordingFirewall>) -> usize {
    d.firewall.applied.lock().unwrap().len()
}

fn last_records(dir: &Path, n: usize) -> Vec<(Action, Outcome)> {
    let all = records(dir);
    all[all.len() - n..].iter().map(|r| (r.action, r.outcome)).collect()
}

#[tokio::test]
async fn a_request_waits_until_someone_else_approves_it_and_opens_from_then() {
    let dir = tempfile::tempdir().unwrap();
    let d = started(dir.path()).await;
    let before = kernel_changes(&d);
    // a request naming 22 (no approval) and 3389 (approval) waits whole
    let id = pending_id(&d, 4244, &[22, 3389]).await;
    assert!(d.lock().book.is_empty(), "nothing opens");
    assert_eq!(kernel_changes(&d), before, "the kernel is not touched");
    let pending = records(dir.path()).pop().unwrap();
    assert_eq!((pending.action, pending.outcome), (Action::Request, Outcome::Pending));
    assert_eq!((pending.request_id, pending.ports.clone()), (Some(id), vec![22, 3389]));
    assert!(pending.times_out_at.is_some());
    let status = d.status(&Caller::resolve_uid(4243), &Default::default()).await.unwrap();
    assert_eq!(status.pending.iter().map(|p| p.id).collect::<Vec<_>>(), vec![id]);
    assert!(status.approver);
    let reply = d.handle(peer(4243), approve(id)).await;
    assert!(reply.ok, "{reply:?}");
    let decided: PendingStatus = serde_json::from_value(reply.result.unwrap()).unwrap();
    assert_eq!(decided.state, PendingState::Approved);
    assert_eq!(decided.grants.len(), 2, "one grant per port");
    assert!(decided
        .grants
        .iter()
        .all(|g| g.granted_at >= pending.time && g.remaining_secs > 3590));
    assert_eq!(d.lock().book.len(), 2);
    assert_eq!(kernel_changes(&d), before + 1, "one batch for the approval");
    let all = records(dir.path());
    let approval = &all[all.len() - 3..];
    assert_eq!(
        (approval[0].action, approval[0].outcome),
        (Action::Approve, Outcome::Approved)
    );
    assert_eq!((approval[0].actor_uid, approval[0].request_id), (Some(4243), Some(id)));
    for g in &approval[1..] {
        assert_eq!(
            (g.action, g.outcome, g.actor_uid),
            (Action::Request, Outcome::Approved, Some(4244))
        );
        assert_eq!(g.request_id, Some(id));
        assert_eq!(
            g.reason.as_deref(),
            Some(format!("approved by 4243 (uid 4243), request {id}").as_str())
        );
    }
    // the requester polls the outcome
    let asked = d.handle(peer(4244), Request::Pending(PendingQuery { id })).await;
    assert_eq!(asked.result.unwrap()["state"], "approved");
    assert!(d.lock().pending.is_empty());
}

#[tokio::test]
async fn a_self_approval_is_refused_and_audited_and_the_request_still_waits() {
    let dir = tempfile::tempdir().unwrap();
    let d = started(dir.path()).await;
    let id = pending_id(&d, 4242, &[3389]).await;
    let reply = d.handle(peer(4242), approve(id)).await;
    let error = reply.error.unwrap();
    assert_eq!(error.code, ErrorCode::NotAuthorized);
    assert!(
        error
            .message
            .contains("a requester can never approve their own request"),
        "{}",
        error.message
    );
    let refused = records(dir.path()).pop().unwrap();
    assert_eq!((refused.action, refused.outcome), (Action::Approve, Outcome::Denied));
    assert_eq!((refused.actor_uid, refused.request_id), (Some(4242), Some(id)));
    // a requester who is not an approver may not approve; root may
    let reply = d.handle(peer(4244), approve(id)).await;
    assert_eq!(reply.error.unwrap().code, ErrorCode::NotAuthorized);
    assert_eq!(d.lock().pending.len(), 1, "still waiting");
    assert!(d.lock().book.is_empty());
    let reply = d.handle(root(), approve(id)).await;
    assert!(reply.ok, "root approves, recorded as root: {reply:?}");
    let all = records(dir.path());
    let approval = all
        .iter()
        .find(|r| r.action == Action::Approve && r.outcome == Outcome::Approved)
        .unwrap();
    assert_eq!((approval.actor.as_str(), approval.actor_uid), ("root", Some(0)));
    // root's own request: root cannot approve it
    let own = pending_id(&d, 0, &[3389]).await;
    assert_eq!(
        d.handle(root(), approve(own)).await.error.unwrap().code,
        ErrorCode::NotAuthorized
    );
}

#[tokio::test]
async fn a_denial_closes_the_request_with_its_reason_and_nothing_opens() {
    let dir = tempfile::tempdir().unwrap();
    let d = started(dir.path()).await;
    let id = pending_id(&d, 4244, &[3389]).await;
    let deny = |reason: &str| {
        Request::Deny(DenyRequest {
            id,
            reason: reason.into(),
        })
    };
    let bad = d.handle(peer(4243), deny("no\u{1b}[2J")).await.error.unwrap();
    assert_eq!(bad.code, ErrorCode::InvalidArgument);
    assert!(bad.message.starts_with("reason: "), "{}", bad.message);
    let reply = d.handle(peer(4243), deny("not during the freeze")).await;
    assert!(reply.ok, "{reply:?}");
    assert_eq!(reply.result.unwrap()["state"], "denied");
    let denied = records(dir.path()).pop().unwrap();
    assert_eq!((denied.action, denied.outcome), (Action::Deny, Outcome::Done));
    assert_eq!(denied.reason.as_deref(), Some("not during the freeze"));
    assert!(d.lock().book.is_empty() && d.lock().pending.is_empty());
    let again = d.handle(peer(4243), approve(id)).await.error.unwrap();
    assert_eq!(again.code, ErrorCode::NotFound, "decided once");
    let asked = d.handle(peer(4244), Request::Pending(PendingQuery { id })).await;
    let asked = asked.result.unwrap();
    assert_eq!(
        (asked["state"].as_str(), asked["reason"].as_str()),
        (Some("denied"), Some("not during the freeze"))
    );
    // a requester may withdraw its own request
    let own = pending_id(&d, 4244, &[3389]).await;
    let withdraw = Request::Deny(DenyRequest {
        id: own,
        reason: "done without".into(),
    });
    assert!(d.handle(peer(4244), withdraw).await.ok);
    assert_eq!(
        records(dir.path()).pop().unwrap().reason.as_deref(),
        Some("withdrawn by the requester: done without")
    );
}

#[tokio::test]
async fn without_a_role_no_request_waits_and_each_requester_may_keep_only_a_few_waiting() {
    let dir = tempfile::tempdir().unwrap();
    let d = started(dir.path()).await;
    let reply = d.handle(peer(4245), ask(&[3389])).await;
    assert_eq!(reply.error.unwrap().code, ErrorCode::NotAuthorized);
    for _ in 0..approval::MAX_PENDING_PER_REQUESTER {
        pending_id(&d, 4244, &[3389]).await;
    }
    let reply = d.handle(peer(4244), ask(&[3389])).await;
    assert_eq!(reply.error.unwrap().code, ErrorCode::TooManyPending);
    let refused = records(dir.path()).pop().unwrap();
    assert_eq!((refused.action, refused.outcome), (Action::Request, Outcome::Denied));
    assert!(refused.reason.unwrap().starts_with("too_many_pending: "));
    assert_eq!(d.lock().pending.len(), approval::MAX_PENDING_PER_REQUESTER);
    pending_id(&d, 4242, &[3389]).await;
}

#[tokio::test]
async fn an_approval_the_policy_no_longer_allows_closes_the_request() {
    let dir = tempfile::tempdir().unwrap();
    let d = started(dir.path()).await;
    let id = pending_id(&d, 4244, &[3389]).await;
    let text = format!(
        "state_dir = \"{}\"\n{}\n[[ports]]\nport = 22\n",
        dir.path().display(),
        POLICY.replace("max_duration = \"2h\"", "max_duration = \"30m\"")
    );
    std::fs::write(dir.path().join("jitd.toml"), text).unwrap();
    assert!(d.handle(root(), Request::Reload).await.ok);
    let error = d.handle(peer(4243), approve(id)).await.error.unwrap();
    assert_eq!(error.code, ErrorCode::DurationTooLong);
    assert!(
        error.message.contains("can no longer be approved, so it is closed"),
        "{}",
        error.message
    );
    let closed = records(dir.path()).pop().unwrap();
    assert_eq!((closed.action, closed.outcome), (Action::Approve, Outcome::Revoked));
    assert!(closed
        .reason
        .unwrap()
        .starts_with("policy changed: duration 1h exceeds"));
    assert!(d.lock().book.is_empty() && d.lock().pending.is_empty());
}

#[tokio::test]
async fn an_approval_the_firewall_refuses_leaves_the_request_waiting_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let d = started(dir.path()).await;
    let id = pending_id(&d, 4244, &[3389]).await;
    *d.firewall.fail_with.lock().unwrap() = Some("Error: boom".into());
    let error = d.handle(peer(4243), approve(id)).await.error.unwrap();
    assert_eq!(error.code, ErrorCode::FirewallFailed);
    assert!(
        error.message.contains(&format!("request {id} still waits")),
        "{}",
        error.message
    );
    assert_eq!(
        last_records(dir.path(), 4),
        vec![
            (Action::Approve, Outcome::Approved),
            (Action::Request, Outcome::Approved),
            (Action::Approve, Outcome::Failed),
            (Action::Request, Outcome::Failed)
        ]
    );
    assert_eq!(d.lock().pending.len(), 1);
    let times_out_at = d.lock().pending.get(id).unwrap().0.times_out_at;
    *d.firewall.fail_with.lock().unwrap() = None;
    drop(d);
    // the journal alone (no checkpoint was due) brings it back, on the same clock
    let again = started(dir.path()).await;
    let st = again.lock();
    let (request, _) = st.pending.get(id).expect("still waiting after the restart");
    assert_eq!(request.times_out_at, times_out_at);
    assert!(st.book.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_request_nobody_decides_times_out_on_the_expiry_timer() {
    let dir = tempfile::tempdir().unwrap();
    let d = started(dir.path()).await;
    let (_stop, stopping) = tokio::sync::watch::channel(false);
    let expiry = tokio::spawn(upkeep::run_expiry(d.clone(), stopping));
    let id = pending_id(&d, 4244, &[3389]).await;
    tokio::time::sleep(Duration::from_secs(59)).await;
    assert_eq!(d.lock().pending.len(), 1, "not before its time");
    tokio::time::sleep(Duration::from_secs(2)).await;
    for _ in 0..100 {
        if d.lock().pending.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(d.lock().pending.is_empty(), "timed out");
    for _ in 0..200 {
        if records(dir.path()).last().is_some_and(|r| r.action == Action::Expire) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let expired = records(dir.path()).pop().unwrap();
    assert_eq!((expired.action, expired.outcome), (Action::Expire, Outcome::Expired));
    assert_eq!(expired.request_id, Some(id));
    assert!(expired.reason.unwrap().starts_with("approval timed out"));
    let late = d.handle(peer(4243), approve(id)).await.error.unwrap();
    assert_eq!(late.code, ErrorCode::NotFound);
    expiry.abort();
}

#[test]
fn a_restart_ends_the_requests_whose_time_is_up_and_keeps_the_rest_on_their_clock() {
    let wall = Utc::now();
    let now = Instant::now();
    let asked = |id: GrantId, left: i64| PendingRequest {
        id,
        requester: Caller::resolve_uid(4244),
        requester_login: None,
        ports: vec![3389],
        source: "192.0.2.7/32".parse().unwrap(),
        duration_secs: 60,
        until: None,
        justification: None,
        asked_at: wall - TimeDelta::minutes(10),
        times_out_at: wall + TimeDelta::seconds(left),
    };
    let config = crate::config::Config::parse(Path::new("/t.toml"), POLICY, &|_| None).unwrap();
    let mut st = State {
        config,
        book: Default::default(),
        usage: Default::default(),
        baseline: Vec::new(),
        dirty: false,
        audit_hash: String::new(),
        begun: 0,
        settled: 0,
        recent: Default::default(),
        refusals: Default::default(),
        cuts: Default::default(),
        recorded: 0,
        pending: Default::default(),
        ledger: Default::default(),
        sampled_until: now,
    };
    let ended = restore_pending(&mut st, vec![asked(1, -5), asked(2, 300)], true, now, wall);
    assert_eq!(ended.len(), 1);
    assert_eq!((ended[0].request_id, ended[0].action), (Some(1), Action::Expire));
    assert_eq!(
        ended[0].reason.as_deref(),
        Some("approval timed out while jitd was not running")
    );
    let (_, deadline) = st.pending.get(2).unwrap();
    assert_eq!(deadline, now + Duration::from_secs(300));
    // a wall clock behind the audit log cannot time them: all end
    let mut st2 = State {
        pending: Default::default(),
        ..st
    };
    let ended = restore_pending(&mut st2, vec![asked(3, 300)], false, now, wall);
    assert_eq!(ended.len(), 1);
    assert!(st2.pending.is_empty());
}

#[tokio::test]
async fn a_requester_who_lost_the_role_since_asking_is_not_approved() {
    let dir = tempfile::tempdir().unwrap();
    let d = started(dir.path()).await;
    let id = pending_id(&d, 4244, &[3389]).await;
    let text = format!(
        "state_dir = \"{}\"\n{}\n[[ports]]\nport = 22\n",
        dir.path().display(),
        POLICY.replace("\"uid:4242\", \"uid:4244\"", "\"uid:4242\"")
    );
    std::fs::write(dir.path().join("jitd.toml"), text).unwrap();
    assert!(d.handle(root(), Request::Reload).await.ok);
    let error = d.handle(peer(4243), approve(id)).await.error.unwrap();
    assert_eq!(error.code, ErrorCode::NotAuthorized);
    assert!(error.message.contains("can no longer be approved"), "{}", error.message);
    assert!(d.lock().book.is_empty() && d.lock().pending.is_empty());
}

#[tokio::test]
async fn a_request_asked_until_a_time_ends_then_however_late_it_is_approved_and_waits_no_longer() {
    let dir = tempfile::tempdir().unwrap();
    let d = started(dir.path()).await;
    let until = Utc::now() + TimeDelta::seconds(40);
    let mut asked = ask(&[3389]);
    if let Request::Request(r) = &mut asked {
        (r.duration_secs, r.until) = (None, Some(until));
    }
    let reply = d.handle(peer(4244), asked).await;
    let pending = &reply.result.unwrap()["pending"];
    let id = pending["id"].as_u64().unwrap();
    // it times out at its end (40 s), not after the port's 1 minute
    let times_out: DateTime<Utc> = serde_json::from_value(pending["times_out_at"].clone()).unwrap();
    assert!(times_out <= until + TimeDelta::seconds(1), "{times_out} > {until}");
    assert_eq!(records(dir.path()).pop().unwrap().until, Some(until));
    let reply = d.handle(peer(4243), approve(id)).await;
    let decided: PendingStatus = serde_json::from_value(reply.result.unwrap()).unwrap();
    let grant = &decided.grants[0];
    assert!(
        grant.expires_at <= until + TimeDelta::seconds(1),
        "{} > {until}",
        grant.expires_at
    );
    // once its end has passed, it is past deciding (it waited no longer than its end)
    let mut asked = ask(&[3389]);
    if let Request::Request(r) = &mut asked {
        (r.duration_secs, r.until) = (None, Some(Utc::now() + TimeDelta::milliseconds(1500)));
    }
    let id = d.handle(peer(4244), asked).await.result.unwrap()["pending"]["id"]
        .as_u64()
        .unwrap();
    let pending = d.lock().pending.get(id).map(|(r, _)| r.clone()).unwrap();
    assert_eq!(pending.duration_at(pending.until.unwrap()), None);
    assert!(pending
        .duration_at(Utc::now())
        .is_some_and(|left| left <= Duration::from_secs(2)));
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let before = d.lock().book.len();
    let late = d.handle(peer(4243), approve(id)).await;
    assert_eq!(late.error.map(|e| e.code), Some(ErrorCode::NotFound));
    assert_eq!(d.lock().book.len(), before, "nothing opened");
}
