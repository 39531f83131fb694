//! Daemon unit tests: a recording firewall, a temporary state_dir, paused time where
//! timers matter. What the kernel and the network do is tested in tests/integration.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::api::protocol::{GrantRequest, RevokeRequest};
use crate::audit;
use crate::domain::ErrorCode;
use crate::firewall::RecordingFirewall;

pub(super) async fn daemon(dir: &Path) -> Arc<Daemon<RecordingFirewall>> {
    daemon_with(dir, "").await
}

pub(super) async fn daemon_with(dir: &Path, extra: &str) -> Arc<Daemon<RecordingFirewall>> {
    let text = format!(
        "state_dir = \"{}\"\n{extra}\n[[ports]]\nport = 22\nmax_duration = \"1h\"\n",
        dir.display()
    );
    std::fs::write(dir.join("jitd.toml"), &text).unwrap();
    let config = Config::parse(&dir.join("jitd.toml"), &text, &|_| None).unwrap();
    let (daemon, _committer) = Daemon::start(config, RecordingFirewall::default()).await.unwrap();
    daemon
}

pub(super) fn root() -> Peer {
    Peer {
        uid: 0,
        gid: 0,
        pid: None,
    }
}

pub(super) fn ask(secs: u64) -> Request {
    ask_for("192.0.2.7", secs)
}

pub(super) fn ask_for(source: &str, secs: u64) -> Request {
    Request::Request(GrantRequest {
        ports: vec![22],
        source: source.into(),
        duration_secs: Some(secs),
        until: None,
        justification: None,
    })
}

pub(super) fn records(dir: &Path) -> Vec<audit::AuditRecord> {
    audit::read_records(&dir.join(audit::AUDIT_FILE)).unwrap().0
}

pub(super) fn outcomes(dir: &Path) -> Vec<Outcome> {
    records(dir).into_iter().map(|r| r.outcome).collect()
}

/// Waits (real time) until the writer has put `n` records on disk.
async fn wait_records(dir: &Path, n: usize) {
    for _ in 0..200 {
        if records(dir).len() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("fewer than {n} audit records: {:?}", outcomes(dir));
}

#[tokio::test]
async fn a_grant_the_firewall_refuses_is_not_granted_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(dir.path()).await;
    *d.firewall.fail_with.lock().unwrap() = Some("Error: Could not process rule: No buffer space available".into());
    let reply = d.handle(root(), ask(60)).await;
    let error = reply.error.unwrap();
    assert_eq!(error.code, ErrorCode::FirewallFailed);
    assert!(error.message.contains("No buffer space available"), "{}", error.message);
    assert!(d.lock().book.is_empty());
    assert_eq!(
        outcomes(dir.path()),
        vec![Outcome::Done, Outcome::Approved, Outcome::Failed]
    );
    d.stop().await;
    let saved = store::load(dir.path()).unwrap();
    assert!(saved.grants.is_empty());
}

#[tokio::test]
async fn a_revocation_the_firewall_refuses_is_undone_in_the_book_and_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(dir.path()).await;
    assert!(d.handle(root(), ask(600)).await.ok);
    *d.firewall.fail_with.lock().unwrap() = Some("Error: boom".into());
    let revoke = Request::Revoke(RevokeRequest {
        id: Some(1),
        ..Default::default()
    });
    let reply = d.handle(root(), revoke).await;
    assert_eq!(reply.error.unwrap().code, ErrorCode::FirewallFailed);
    assert_eq!(d.lock().book.len(), 1, "the grant stays");
    let last: Vec<(Action, Outcome)> = records(dir.path()).iter().map(|r| (r.action, r.outcome)).collect();
    assert_eq!(
        &last[last.len() - 2..],
        &[(Action::Revoke, Outcome::Revoked), (Action::Revoke, Outcome::Failed)]
    );
    // a restart replays the journal to the same state: the grant is live
    *d.firewall.fail_with.lock().unwrap() = None;
    drop(d);
    let again = daemon(dir.path()).await;
    assert_eq!(again.lock().book.len(), 1);
}

#[tokio::test]
async fn a_failed_reload_keeps_the_old_policy_and_its_grants() {
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(dir.path()).await;
    assert!(d.handle(root(), ask(600)).await.ok);
    // the new policy no longer protects 22: the grant would end
    let text = format!("state_dir = \"{}\"\n[[ports]]\nport = 3389\n", dir.path().display());
    std::fs::write(dir.path().join("jitd.toml"), text).unwrap();
    *d.firewall.fail_with.lock().unwrap() = Some("Error: boom".into());
    let reply = d.handle(root(), Request::Reload).await;
    assert_eq!(reply.error.unwrap().code, ErrorCode::FirewallFailed);
    assert_eq!(d.config().ports[0].port, 22, "the old policy stays");
    assert_eq!(d.lock().book.len(), 1, "and its grant");
    *d.firewall.fail_with.lock().unwrap() = None;
    let reply = d.handle(root(), Request::Reload).await;
    assert!(reply.ok, "{reply:?}");
    assert!(d.lock().book.is_empty(), "the grant ended with the policy");
}

#[tokio::test]
async fn a_newer_request_supersedes_only_the_callers_own_grant() {
    let dir = tempfile::tempdir().unwrap();
    let d = daemon_with(dir.path(), "[access]\nrequesters = [\"uid:1001\", \"uid:1002\"]").await;
    let peer = |uid| Peer {
        uid,
        gid: uid,
        pid: None,
    };
    assert!(d.handle(peer(1001), ask(600)).await.ok);
    let reply = d.handle(peer(1002), ask(1)).await;
    assert!(reply.ok, "{reply:?}");
    let result = reply.result.unwrap();
    assert_eq!(result["superseded"], serde_json::json!([]), "{result}");
    assert_eq!(d.lock().book.len(), 2);
    // the kernel element lasts as long as the longer grant
    let batches = d.firewall.applied.lock().unwrap().clone();
    assert!(
        !batches.last().unwrap().to_string().contains("\"delete\""),
        "nothing removed"
    );
}

#[tokio::test]
async fn overlapping_prefixes_of_different_requesters_are_both_granted() {
    let dir = tempfile::tempdir().unwrap();
    let d = daemon_with(dir.path(), "[access]\nrequesters = [\"uid:1001\", \"uid:1002\"]").await;
    let peer = |uid| Peer {
        uid,
        gid: uid,
        pid: None,
    };
    assert!(d.handle(peer(1001), ask_for("198.51.100.0/30", 600)).await.ok);
    let reply = d.handle(peer(1002), ask_for("198.51.0.0/16", 60)).await;
    assert!(reply.ok, "{reply:?}");
    let last = d.firewall.applied.lock().unwrap().last().unwrap().to_string();
    assert!(!last.contains("\"delete\""), "the /30 element stays as it is: {last}");
    assert_eq!(
        last.matches("\"timeout\":60").count(),
        14,
        "the rest of the /16 in pieces: {last}"
    );
    assert!(!last.contains("\"len\":16"), "never the /16 whole: {last}");
}

#[tokio::test(start_paused = true)]
async fn the_expiry_timer_books_the_end_on_time() {
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(dir.path()).await;
    let (_stop, stopping) = tokio::sync::watch::channel(false);
    let expiry = tokio::spawn(upkeep::run_expiry(d.clone(), stopping));
    assert!(d.handle(root(), ask(30)).await.ok);
    assert_eq!(d.lock().book.len(), 1);
    tokio::time::sleep(Duration::from_millis(29_900)).await;
    assert_eq!(d.lock().book.len(), 1, "not before its time");
    tokio::time::sleep(Duration::from_millis(200)).await;
    for _ in 0..100 {
        if d.lock().book.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(d.lock().book.is_empty(), "ended at its deadline");
    wait_records(dir.path(), 3).await;
    assert_eq!(
        outcomes(dir.path()),
        vec![Outcome::Done, Outcome::Approved, Outcome::Expired]
    );
    // the kernel is not asked to remove it: its own timeout does that
    let applied = d.firewall.applied.lock().unwrap().len();
    assert_eq!(applied, 2, "the start and the grant, nothing for the expiry");
    expiry.abort();
}

#[tokio::test]
async fn grants_are_saved_for_a_restart_and_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(dir.path()).await;
    assert!(d.handle(root(), ask(600)).await.ok);
    drop(d);
    let again = daemon(dir.path()).await;
    let st = again.lock();
    assert_eq!(
        st.book.len(),
        1,
        "restored from the journal (no kernel table: wall clock)"
    );
    let left = st.book.remaining(1, tokio::time::Instant::now()).unwrap();
    assert!(
        left > Duration::from_secs(595) && left <= Duration::from_secs(600),
        "{left:?}"
    );
}

#[tokio::test]
async fn a_restart_under_a_stricter_policy_clamps_what_it_allows_for_less() {
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(dir.path()).await;
    assert!(d.handle(root(), ask(3000)).await.ok);
    drop(d);
    let text = format!(
        "state_dir = \"{}\"\n[[ports]]\nport = 22\nmax_duration = \"10m\"\n",
        dir.path().display()
    );
    std::fs::write(dir.path().join("jitd.toml"), &text).unwrap();
    let config = Config::parse(&dir.path().join("jitd.toml"), &text, &|_| None).unwrap();
    let (again, _) = Daemon::start(config, RecordingFirewall::default()).await.unwrap();
    let left = again.lock().book.remaining(1, tokio::time::Instant::now()).unwrap();
    assert!(
        left <= Duration::from_secs(600),
        "a 50 min grant is cut to the new 10 min: {left:?}"
    );
    let last = records(dir.path()).into_iter().rev().nth(1).unwrap();
    assert_eq!((last.action, last.outcome), (Action::Start, Outcome::Done));
    assert!(last.reason.unwrap().starts_with("policy changed"));
}

#[tokio::test]
async fn a_stalled_disk_holds_requests_but_not_the_watchdog_or_status() {
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(dir.path()).await;
    let release = d.writer.stall();
    let asking = tokio::spawn({
        let d = d.clone();
        async move { d.handle(root(), ask(60)).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!asking.is_finished(), "a grant waits for its audit record");
    assert!(
        d.responsive(Duration::from_secs(2)).await,
        "the committer still answers pings"
    );
    let (root_caller, page) = (Caller::resolve(0, 0), Default::default());
    let status = tokio::time::timeout(Duration::from_secs(5), d.status(&root_caller, &page)).await;
    let shown = status.expect("status does not wait for the disk").unwrap().grants.len();
    assert_eq!(shown, 0, "a grant whose record is not written yet is not shown");
    drop(release);
    assert!(asking.await.unwrap().ok);
    let status = d.status(&Caller::resolve(0, 0), &Default::default()).await.unwrap();
    assert_eq!(status.grants.len(), 1, "once recorded, it is shown");
}

#[tokio::test]
async fn a_refused_request_does_not_store_the_callers_raw_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(dir.path()).await;
    let nobody = Peer {
        uid: 65534,
        gid: 65534,
        pid: None,
    };
    let request = Request::Request(GrantRequest {
        ports: vec![22],
        source: "\u{1b}[2J\u{1b}]0;pwned\u{7}".into(),
        duration_secs: Some(60),
        until: None,
        justification: Some("ok\u{202e}txt.exe".into()),
    });
    assert_eq!(
        d.handle(nobody, request).await.error.unwrap().code,
        ErrorCode::NotAuthorized
    );
    let line = std::fs::read_to_string(dir.path().join(audit::AUDIT_FILE)).unwrap();
    assert!(!line.contains("\\u001b"), "no ESC, even JSON-escaped: {line}");
    assert!(!line.contains('\u{202e}') && !line.contains("\\u202e"), "{line}");
    assert!(line.contains("unchecked input, escaped"), "{line}");
}
