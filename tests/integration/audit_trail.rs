//! The audit trail can be trusted: a hash chain that `jitctl audit verify` walks, which
//! catches edited, removed and reordered records, and survives rotation and restarts.

use std::path::Path;

use crate::util::*;

const POLICY: &str = "[[ports]]\nport = 22\n";

fn request_many(jitd: &Jitd, n: usize) {
    for i in 0..n {
        jitd.ctl_json(&[
            "request",
            "--port",
            "22",
            "--source",
            &format!("10.55.0.{}", i + 1),
            "--duration",
            "1h",
        ]);
    }
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn verify(jitd: &Jitd) -> (Option<i32>, String) {
    let out = jitd.ctl(&["audit", "verify"]);
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn verify_catches_edited_removed_and_reordered_records() {
    let net = Net::new();
    let setup = Setup::new(POLICY);
    let jitd = setup.start(&net.host);
    request_many(&jitd, 5);
    let (code, text) = verify(&jitd);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("audit trail intact: 6 record(s)"), "{text}");
    let path = setup.audit_file();
    let original = lines(&path);
    let tamper = |edit: &dyn Fn(&mut Vec<String>)| {
        let mut l = original.clone();
        edit(&mut l);
        std::fs::write(&path, l.join("\n") + "\n").unwrap();
        let result = verify(&jitd);
        std::fs::write(&path, original.join("\n") + "\n").unwrap();
        result
    };
    let (code, text) = tamper(&|l| l[3] = l[3].replace("10.55.0.3", "10.55.0.99"));
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("audit.jsonl:4 was changed"),
        "an edit is named at the edited record: {text}"
    );
    let (code, text) = tamper(&|l| {
        l.remove(2);
    });
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("audit.jsonl:3 does not follow the record before it"),
        "{text}"
    );
    let (code, text) = tamper(&|l| l.swap(4, 5));
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("audit.jsonl:5 does not follow"), "{text}");
    assert_eq!(verify(&jitd).0, Some(0), "restored");
}

#[test]
fn rotation_keeps_the_chain_and_the_grants_across_files_and_restarts() {
    let net = Net::new();
    serve_echo(&net.host, 22);
    let setup = Setup::new(&format!("audit_max_bytes = 4096\naudit_keep = 3\n{POLICY}"));
    let jitd = setup.start(&net.host);
    request_many(&jitd, 60);
    let dir = setup.state_dir();
    assert!(
        dir.join("audit.jsonl.1").exists() && dir.join("audit.jsonl.3").exists(),
        "rotated"
    );
    assert!(!dir.join("audit.jsonl.4").exists(), "only 3 rotated files are kept");
    let (code, text) = verify(&jitd);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("older records were rotated away"), "{text}");
    let records = jitd.ctl_json(&["audit"]);
    assert!(
        records.as_array().unwrap().len() > 10,
        "queries read the rotated files too"
    );
    jitd.kill();
    let jitd = setup.start(&net.host);
    let grants = jitd.ctl_json(&["status"])["grants"].as_array().unwrap().len();
    assert_eq!(grants, 60, "every grant is back after a restart, across rotations");
    assert_eq!(verify(&jitd).0, Some(0));
}
