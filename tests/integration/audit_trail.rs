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

/// Ends the grants of [`request_many`] and writes on until rotation has deleted down to
/// `audit_keep` the files that held their records (nothing protects them any more).
fn end_them_and_rotate_on(jitd: &Jitd, dir: &Path, keep: usize) {
    for i in 1..=60 {
        jitd.ctl_json(&["revoke", "--source", &format!("10.55.0.{i}")]);
    }
    let over = dir.join(format!("audit.jsonl.{}", keep + 1));
    for i in 0..200 {
        if !over.exists() {
            return;
        }
        jitd.ctl_json(&[
            "request",
            "--port",
            "22",
            "--source",
            &format!("10.56.{}.1", i % 250),
            "--duration",
            "1h",
        ]);
    }
    panic!("{} is still there", over.display());
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
    // every file holds approvals of live grants: none is deleted, beyond audit_keep too
    assert!(dir.join("audit.jsonl.4").exists(), "files of live grants are kept");
    let approved = all_records(&dir)
        .iter()
        .filter(|r| r["action"] == "request" && r["outcome"] == "approved")
        .count();
    assert_eq!(approved, 60, "every live grant's approval is on record");
    let (code, text) = verify(&jitd);
    assert_eq!(code, Some(0), "{text}");
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
    // once they end, rotation deletes down to audit_keep, oldest first, and says so
    end_them_and_rotate_on(&jitd, &dir, 3);
    assert!(dir.join("audit.jsonl.3").exists());
    let (code, text) = verify(&jitd);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("older records were rotated away"), "{text}");
}

/// Every record in every audit file of `dir`, oldest first.
fn all_records(dir: &Path) -> Vec<serde_json::Value> {
    let mut files: Vec<(usize, std::path::PathBuf)> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let n = match name.strip_prefix("audit.jsonl") {
                Some("") => 0,
                Some(rest) => rest.strip_prefix('.')?.parse().ok()?,
                None => return None,
            };
            Some((n, e.path()))
        })
        .collect();
    files.sort_by_key(|f| std::cmp::Reverse(f.0));
    files
        .iter()
        .flat_map(|(_, p)| lines(p))
        .filter_map(|l| serde_json::from_str(&l).ok())
        .collect()
}

fn audit_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("audit.jsonl"))
        .map(|e| e.metadata().unwrap().len())
        .sum()
}

#[test]
fn a_user_without_a_role_cannot_flood_the_trail_or_rotate_an_approval_away() {
    const UID: u32 = 54_321;
    const THREADS: usize = 6;
    const EACH: usize = 100;
    let net = Net::new();
    let setup = Setup::new(&format!(
        "socket_group = \"nogroup\"\naudit_max_bytes = 100000\naudit_keep = 1\n{POLICY}"
    ));
    let jitd = setup.start(&net.host);
    request_many(&jitd, 1);
    // 600 refused requests, each carrying 2 kB of junk: 1.2 MB if each were recorded
    let junk = "9".repeat(2000);
    std::thread::scope(|s| {
        for _ in 0..THREADS {
            s.spawn(|| {
                for _ in 0..EACH {
                    let out = jitd.ctl_as(
                        UID,
                        65534,
                        &["request", "--port", "22", "--source", &junk, "--duration", "1h"],
                    );
                    assert_eq!(out.status.code(), Some(1), "refused: {}", text(&out));
                }
            });
        }
    });
    // stopping writes the summaries still open (jitd also writes them once an interval ends)
    assert!(jitd.stop(std::time::Duration::from_secs(20)).success());
    let dir = setup.state_dir();
    let records = all_records(&dir);
    let mine = |r: &&serde_json::Value| r["actor_uid"] == UID;
    let full = records.iter().filter(mine).filter(|r| r["outcome"] == "denied").count();
    assert!((1..=20).contains(&full), "at most 20 refusals in full, got {full}");
    let summaries: Vec<&serde_json::Value> = records
        .iter()
        .filter(mine)
        .filter(|r| r["outcome"] == "suppressed")
        .collect();
    let suppressed: u64 = summaries
        .iter()
        .map(|r| {
            r["reason"]
                .as_str()
                .unwrap()
                .split(' ')
                .next()
                .unwrap()
                .parse::<u64>()
                .unwrap()
        })
        .sum();
    assert_eq!(
        suppressed as usize + full,
        THREADS * EACH,
        "every refusal is counted: {summaries:?}"
    );
    assert!(
        summaries[0]["reason"]
            .as_str()
            .unwrap()
            .contains(&format!("from uid {UID} (")),
        "{summaries:?}"
    );
    assert!(
        audit_bytes(&dir) < 100_000,
        "the log stays small: {} bytes",
        audit_bytes(&dir)
    );
    assert!(
        records
            .iter()
            .any(|r| r["outcome"] == "approved" && r["source"] == "10.55.0.1"),
        "the approval of the live grant is still in the trail"
    );
}

/// Runs `jitctl --json audit ARGS` and returns the page.
fn page(jitd: &Jitd, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["audit"];
    all.extend_from_slice(args);
    jitd.ctl_json(&all)
}

#[test]
fn queries_page_through_every_record_once_in_order_across_rotations() {
    let net = Net::new();
    let setup = Setup::new(&format!("audit_max_bytes = 4096\naudit_keep = 100\n{POLICY}"));
    let jitd = setup.start(&net.host);
    request_many(&jitd, 40);
    let mut ids = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut args = vec!["--port", "22", "--limit", "7"];
        if let Some(c) = &cursor {
            args.extend(["--cursor", c.as_str()]);
        }
        let p = page(&jitd, &args);
        let records = p["records"].as_array().unwrap();
        assert!(records.len() <= 7, "a page holds at most --limit records");
        ids.extend(records.iter().filter_map(|r| r["grant_id"].as_u64()));
        pages += 1;
        if pages == 2 {
            // more records and more rotations between two pages
            for i in 0..20 {
                jitd.ctl_json(&[
                    "request",
                    "--port",
                    "22",
                    "--source",
                    &format!("10.56.0.{i}"),
                    "--duration",
                    "1h",
                ]);
            }
        }
        match p["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
        assert!(pages < 100, "paging ends");
    }
    assert!(
        setup.state_dir().join("audit.jsonl.5").exists(),
        "the records span many files"
    );
    assert_eq!(ids, (1..=60).collect::<Vec<u64>>(), "every approval once, in order");
    assert!(pages >= 9, "{pages} pages");
    // without --limit jitctl fetches every page itself
    let all = jitd.ctl_json(&["audit", "--port", "22"]);
    let approvals = all.as_array().unwrap().iter().filter(|r| r["outcome"] == "approved");
    assert_eq!(approvals.count(), 60);
    let bad = jitd.ctl(&["audit", "--cursor", "v1:../../etc/shadow:0:0"]);
    assert_eq!(bad.status.code(), Some(1), "{}", text(&bad));
    assert!(text(&bad).contains("cursor: "), "{}", text(&bad));
}

#[test]
fn verify_catches_records_cut_from_the_end_or_the_start_across_rotation() {
    let net = Net::new();
    let setup = Setup::new(&format!("audit_max_bytes = 4096\naudit_keep = 3\n{POLICY}"));
    let jitd = setup.start(&net.host);
    request_many(&jitd, 60);
    let dir = setup.state_dir();
    end_them_and_rotate_on(&jitd, &dir, 3);
    assert!(dir.join("audit.jsonl.3").exists(), "rotated");
    let (code, text) = verify(&jitd);
    assert_eq!(code, Some(0), "{text}");
    let newest = ["audit.jsonl", "audit.jsonl.1"]
        .iter()
        .map(|f| dir.join(f))
        .find(|f| !lines(f).is_empty())
        .unwrap();
    let oldest = dir.join("audit.jsonl.3");
    let attack = |path: &Path, edit: &dyn Fn(&mut Vec<String>)| {
        let original = lines(path);
        let mut l = original.clone();
        edit(&mut l);
        if l.is_empty() {
            std::fs::remove_file(path).unwrap();
        } else {
            std::fs::write(path, l.join("\n") + "\n").unwrap();
        }
        let result = verify(&jitd);
        std::fs::write(path, original.join("\n") + "\n").unwrap();
        assert_eq!(verify(&jitd).0, Some(0), "restored");
        result
    };
    let (code, text) = attack(&newest, &|l| {
        l.pop();
    });
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("records were cut from the end"), "{text}");
    let (code, text) = attack(&oldest, &|l| l.clear());
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("records were cut from the start"), "{text}");
    let (code, text) = attack(&oldest, &|l| {
        l.remove(0);
    });
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("records were cut from the start"), "{text}");
    let (code, text) = attack(&oldest, &|l| l[1] = l[1].replace("\"port", "\"p0rt"));
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("audit.jsonl.3:2 was changed"), "{text}");
    assert!(
        all_records(&dir).iter().any(|r| r["action"] == "rotate"
            && r["reason"]
                .as_str()
                .unwrap()
                .starts_with("rotation deleted audit.jsonl.3")),
        "rotation states what it deleted: {:?}",
        all_records(&dir)
            .iter()
            .map(|r| r["reason"].clone())
            .collect::<Vec<_>>()
    );
}
