use super::super::tests::{daemon, outcomes, root};
use super::*;
use crate::api::server::Handler;
use crate::grants::Grant;

fn pending(secs: u64) -> (Pending, oneshot::Receiver<Reply>) {
    let (reply, answer) = oneshot::channel();
    let request = GrantRequest {
        ports: vec![22],
        source: "192.0.2.7".into(),
        duration_secs: Some(secs),
        until: None,
        justification: None,
    };
    (
        Pending {
            caller: Caller {
                uid: 0,
                name: "root".into(),
                groups: vec![],
                signer: None,
            },
            login: None,
            request,
            reply,
        },
        answer,
    )
}

#[tokio::test]
async fn requests_that_arrive_together_share_one_transaction_and_net_out() {
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(dir.path()).await;
    assert!(
        d.handle(root(), super::super::tests::ask(600)).await.ok,
        "a grant already in the kernel"
    );
    // three requests for the same source and port, committed together
    let (batch, answers): (Vec<_>, Vec<_>) = [60, 70, 80].into_iter().map(pending).unzip();
    let (_ping_tx, mut pings) = mpsc::channel(1);
    d.commit_requests(batch, &mut pings).await;
    for answer in answers {
        assert!(answer.await.unwrap().ok);
    }
    assert_eq!(d.lock().book.len(), 1, "the last one stands");
    let batches = d.firewall.applied.lock().unwrap().clone();
    let last = batches.last().unwrap().to_string();
    assert_eq!(batches.len(), 3, "start, first grant, one transaction for the three");
    assert_eq!(
        last.matches("\"delete\"").count(),
        1,
        "the old element is removed once: {last}"
    );
    assert_eq!(
        last.matches("\"add\"").count(),
        1,
        "the surviving grant is added once: {last}"
    );
    assert!(last.contains("\"timeout\":80"), "{last}");
    let superseded = outcomes(dir.path())
        .iter()
        .filter(|o| **o == Outcome::Superseded)
        .count();
    assert_eq!(superseded, 3);
}

#[tokio::test]
async fn a_failed_batch_is_undone_whole() {
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(dir.path()).await;
    assert!(d.handle(root(), super::super::tests::ask(600)).await.ok);
    let before: Vec<Grant> = d.lock().book.iter().cloned().collect();
    *d.firewall.fail_with.lock().unwrap() = Some("Error: boom".into());
    let (batch, answers): (Vec<_>, Vec<_>) = [60, 70].into_iter().map(pending).unzip();
    let (_ping_tx, mut pings) = mpsc::channel(1);
    d.commit_requests(batch, &mut pings).await;
    for answer in answers {
        assert_eq!(answer.await.unwrap().error.unwrap().code, ErrorCode::FirewallFailed);
    }
    let after: Vec<Grant> = d.lock().book.iter().cloned().collect();
    assert_eq!(after, before, "the replaced grant is back, the new ones are gone");
    let failed = outcomes(dir.path()).iter().filter(|o| **o == Outcome::Failed).count();
    assert_eq!(failed, 4, "two approvals and two replacements withdrawn");
    // and a restart sees the same: the replaced grant is still live
    *d.firewall.fail_with.lock().unwrap() = None;
    drop(d);
    let again = daemon(dir.path()).await;
    let restored: Vec<u64> = again.lock().book.iter().map(|g| g.id).collect();
    assert_eq!(restored, before.iter().map(|g| g.id).collect::<Vec<_>>());
}
