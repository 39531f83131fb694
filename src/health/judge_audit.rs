//! The audit log's checks: can jitd write it, and does its chain verify (pure).

use std::time::Duration;

use crate::health::facts::AuditState;
use crate::health::report::{Check, Status};

/// Free space on the audit log's file system below which the doctor warns.
pub const LOW_SPACE: u64 = 64 * 1024 * 1024;

/// Whether the audit log can be written, and whether its chain verifies.
pub fn audit(a: &AuditState) -> Vec<Check> {
    vec![writable(a), chain(a)]
}

fn writable(a: &AuditState) -> Check {
    let dir = a.dir.display();
    let refused = "while it cannot write, jitd refuses every request (audit_failed): no record, no grant";
    if let Some(e) = &a.write_error {
        return Check::new("audit.write", Status::Fail, format!("the last audit write failed: {e}"))
            .detail(refused)
            .fix(format!(
                "free space on (or repair) the file system of {dir}; jitd writes again by itself"
            ));
    }
    if a.read_only {
        return Check::new(
            "audit.write",
            Status::Fail,
            format!("{dir} is on a read-only file system"),
        )
        .detail(refused)
        .fix("remount it read-write");
    }
    match a.free_bytes {
        Some(free) if free < LOW_SPACE => Check::new(
            "audit.write",
            Status::Warn,
            format!("the audit log's file system has only {} free", mib(free)),
        )
        .detail(refused)
        .fix(format!(
            "free space on the file system of {dir}, or lower audit_max_bytes / audit_keep"
        )),
        Some(free) => Check::new(
            "audit.write",
            Status::Ok,
            format!("the audit log is writable ({} free)", mib(free)),
        ),
        None => Check::new(
            "audit.write",
            Status::Ok,
            "the audit log is writable (the last write succeeded)",
        ),
    }
}

fn mib(bytes: u64) -> String {
    format!("{} MiB", bytes / (1024 * 1024))
}

fn chain(a: &AuditState) -> Check {
    let ago = |d: Duration| crate::duration::format(Duration::from_secs(d.as_secs().max(1)));
    if let Some(e) = &a.verify_error {
        return Check::new(
            "audit.chain",
            Status::Fail,
            format!("the audit log could not be read to verify it: {e}"),
        );
    }
    let Some(v) = &a.verified else {
        return Check::new("audit.chain", Status::Warn, "the audit chain has not been verified yet");
    };
    let when = format!("verified {} ago in {} ms", ago(v.ago), v.took.as_millis());
    match &v.broken {
        None => Check::new(
            "audit.chain",
            Status::Ok,
            format!("the audit chain verifies: {} record(s) ({when})", v.records),
        ),
        Some(problem) => Check::new("audit.chain", Status::Fail, format!("the audit trail is broken: {problem}"))
            .detail(format!("{} record(s) before it verified ({when})", v.records))
            .fix("the trail was changed, cut or reordered outside jitd: treat it as an incident; `jitctl audit verify` shows the same"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::facts::Verified;

    #[test]
    fn write_failures_read_only_and_low_space() {
        let ok = AuditState {
            free_bytes: Some(10 * LOW_SPACE),
            ..Default::default()
        };
        assert_eq!(writable(&ok).status, Status::Ok);
        let low = AuditState {
            free_bytes: Some(LOW_SPACE - 1),
            ..Default::default()
        };
        assert_eq!(writable(&low).status, Status::Warn);
        let failed = AuditState {
            write_error: Some("No space left on device".into()),
            ..ok.clone()
        };
        assert_eq!(writable(&failed).status, Status::Fail);
        let ro = AuditState { read_only: true, ..ok };
        assert_eq!(writable(&ro).status, Status::Fail);
    }

    #[test]
    fn a_broken_chain_fails() {
        let mut a = AuditState::default();
        assert_eq!(chain(&a).status, Status::Warn, "not verified yet");
        a.verified = Some(Verified {
            ago: Duration::from_secs(30),
            records: 12,
            broken: None,
            took: Duration::from_millis(4),
        });
        let c = chain(&a);
        assert_eq!(
            (c.status, c.summary.as_str()),
            (
                Status::Ok,
                "the audit chain verifies: 12 record(s) (verified 30s ago in 4 ms)"
            )
        );
        a.verified.as_mut().unwrap().broken = Some("audit.jsonl:3 was changed".into());
        assert_eq!(chain(&a).status, Status::Fail);
    }
}
