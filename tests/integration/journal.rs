//! The audit journal is all-or-nothing: a crash in the middle of a transaction's write,
//! a full disk, and a restart with a long history, proven with real kills, a real
//! tmpfs and real connections.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::util::*;

const POLICY: &str = "[[ports]]\nport = 22\n[[ports]]\nport = 3389\n";

fn request(jitd: &Jitd, args: &[&str]) -> std::process::Output {
    let mut all = vec!["--json", "request"];
    all.extend_from_slice(args);
    jitd.ctl(&all)
}

fn granted_id(out: &std::process::Output) -> u64 {
    assert!(out.status.success(), "{}", text(out));
    serde_json::from_slice::<Value>(&out.stdout).unwrap()["grants"][0]["id"]
        .as_u64()
        .unwrap()
}

/// Every line of the audit file is a whole JSON record, and `audit verify` is clean.
fn assert_whole_and_verified(setup: &Setup, jitd: &Jitd) {
    for line in setup.audit_lines() {
        assert!(
            serde_json::from_str::<Value>(&line).is_ok(),
            "a torn or glued line in the audit file: {line:?}"
        );
    }
    let out = jitd.ctl(&["audit", "verify"]);
    assert!(out.status.success(), "audit verify: {}", text(&out));
}

fn torn_files(state_dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(state_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains("audit.jsonl.torn-"))
        .collect()
}

/// Waits until jitd's process is gone (it aborted), then reaps it.
fn wait_gone(jitd: Jitd) {
    let pid = jitd.pid();
    let gone = wait_for(Duration::from_secs(15), || {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| s.contains(") Z "))
    });
    assert!(gone, "jitd did not die: {}", jitd.log_text());
    jitd.kill();
}

#[test]
fn a_crash_in_the_middle_of_a_transaction_restores_none_of_it_and_all_that_was_answered() {
    let net = Net::new();
    for port in [22, 3389] {
        serve_echo(&net.host, port);
    }
    let setup = Setup::new(POLICY);
    let jitd = setup.spawn(&net.host, &[("JITD_FAULTS", "audit-torn-batch")]);
    assert!(
        wait_for(Duration::from_secs(15), || jitd.ctl(&["status"]).status.success()),
        "{}",
        jitd.log_text()
    );
    // answered: one grant (a transaction of one record)
    let answered = granted_id(&request(&jitd, &["--port", "22", "--source", A4, "--duration", "1h"]));
    assert!(can_connect(&net.a, HOST_A4, 22));
    // never answered: a 4 s grant on two ports that supersedes it; jitd dies after the
    // first record of the transaction and half of the second
    let started = Instant::now();
    let out = request(
        &jitd,
        &["--port", "22", "--port", "3389", "--source", A4, "--duration", "4s"],
    );
    assert!(
        !out.status.success(),
        "the torn request was not answered: {}",
        text(&out)
    );
    wait_gone(jitd);
    // restart past the torn grant's end, while the answered grant's timer still runs
    std::thread::sleep(Duration::from_secs(5).saturating_sub(started.elapsed()));
    let jitd = setup.start(&net.host);
    assert_eq!(jitd.grant_ids(), vec![answered], "{}", jitd.log_text());
    assert!(can_connect(&net.a, HOST_A4, 22), "the answered grant is live again");
    assert!(!can_connect(&net.a, HOST_A4, 3389), "nothing of the torn transaction");
    assert_whole_and_verified(&setup, &jitd);
    let kept = torn_files(&setup.state_dir());
    assert_eq!(kept.len(), 1, "the cut bytes are kept aside");
    assert!(!std::fs::read(&kept[0]).unwrap().is_empty());
    let recover: Vec<Value> = setup.audit().into_iter().filter(|r| r["action"] == "recover").collect();
    assert_eq!(recover.len(), 1, "the cut is on record");
    assert!(recover[0]["reason"].as_str().unwrap().contains("audit.jsonl.torn-"));
}

/// A small tmpfs mounted over a directory; unmounted on drop.
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(path).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs"])
            .arg(path)
            .output()
            .unwrap();
        assert!(out.status.success(), "mount: {}", text(&out));
        Tmpfs {
            path: path.to_path_buf(),
        }
    }

    /// Fills it with `filler` until the disk is full.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let filler = self.path.join("filler");
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![b'x'; 4096];
        while f.write_all(&chunk).is_ok() {}
        while f.write_all(b"x").is_ok() {}
        filler
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

#[test]
fn a_full_disk_refuses_requests_and_leaves_no_partial_record_behind() {
    let net = Net::new();
    serve_echo(&net.host, 22);
    let setup = Setup::new(POLICY);
    let disk = Tmpfs::mount(&setup.state_dir(), "256k");
    let jitd = setup.start(&net.host);
    granted_id(&request(&jitd, &["--port", "22", "--source", A6, "--duration", "1h"]));
    let filler = disk.fill();
    // the audit file's last page may still take a record or two: ask until refused
    let mut refused = None;
    for i in 0..40 {
        let out = request(
            &jitd,
            &[
                "--port",
                "22",
                "--source",
                &format!("192.0.2.{}", i + 1),
                "--duration",
                "1h",
            ],
        );
        if !out.status.success() {
            refused = Some(out);
            break;
        }
    }
    let refused = refused.expect("a request is refused once the disk is full");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("audit"),
        "the refusal says the audit log cannot be written: {}",
        text(&refused)
    );
    assert!(!can_connect(&net.b, HOST_B4, 22));
    // space comes back: the next request is approved, and survives a crash
    std::fs::remove_file(filler).unwrap();
    let approved = granted_id(&request(&jitd, &["--port", "22", "--source", B4, "--duration", "1h"]));
    assert!(can_connect(&net.b, HOST_B4, 22));
    jitd.kill();
    let jitd = setup.start(&net.host);
    assert!(jitd.grant_ids().contains(&approved), "{}", jitd.log_text());
    assert!(
        can_connect(&net.b, HOST_B4, 22),
        "the grant approved after the full disk is live again"
    );
    assert_whole_and_verified(&setup, &jitd);
    drop(jitd);
    drop(disk);
}

#[test]
fn start_up_reads_only_the_journal_after_the_checkpoint() {
    let net = Net::new();
    serve_echo(&net.host, 22);
    // a small audit file size, so that the history spans several rotated files
    let setup = Setup::new(&format!("audit_max_bytes = 4096\naudit_keep = 50\n{POLICY}"));
    let jitd = setup.start(&net.host);
    let mut ids = Vec::new();
    for i in 0..60 {
        let source = format!("198.51.100.{}", i + 1);
        ids.push(granted_id(&request(
            &jitd,
            &["--port", "3389", "--source", &source, "--duration", "1h"],
        )));
    }
    // the checkpoint catches up (once a second), then one more grant is only in the journal
    let checkpoint = setup.state_dir().join("grants.json");
    assert!(wait_for(Duration::from_secs(10), || {
        std::fs::read_to_string(&checkpoint).is_ok_and(|t| t.contains(&format!("\"id\":{}", ids[59])))
    }));
    ids.push(granted_id(&request(
        &jitd,
        &["--port", "22", "--source", A4, "--duration", "1h"],
    )));
    jitd.kill();
    let history: u64 = std::fs::read_dir(setup.state_dir())
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_string_lossy().starts_with("audit.jsonl"))
        .map(|e| e.metadata().unwrap().len())
        .sum();
    let rotated = std::fs::read_dir(setup.state_dir())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("audit.jsonl.")
        })
        .count();
    assert!(rotated >= 3, "the history spans {rotated} rotated file(s)");
    let jitd = setup.start(&net.host);
    let log = jitd.log_text();
    let read: u64 = log
        .lines()
        .find_map(|l| {
            let at = l.find("read ")?;
            let rest = &l[at + 5..];
            rest.contains("byte(s) of the audit journal after the checkpoint")
                .then(|| rest.split_whitespace().next()?.parse().ok())?
        })
        .unwrap_or_else(|| panic!("start-up did not read from the checkpoint on: {log}"));
    assert!(read * 4 < history, "start-up read {read} of {history} bytes of history");
    let mut restored = jitd.grant_ids();
    restored.sort_unstable();
    assert_eq!(restored, ids, "every grant is back");
    assert!(
        can_connect(&net.a, HOST_A4, 22),
        "the grant only in the journal is live again"
    );
    assert_whole_and_verified(&setup, &jitd);
}

/// An approval as its requester saw it.
#[derive(Debug, Clone)]
struct Answered {
    id: u64,
    expires_at: chrono::DateTime<chrono::Utc>,
}

/// Requests from one client until `stop`; returns the approvals it was answered.
fn load(socket: PathBuf, seed: u64, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) -> Vec<Answered> {
    let mut answered = Vec::new();
    let mut n = seed;
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        n = n.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let source = format!("198.51.{}.{}", 100 + (n >> 40) % 2, 1 + (n >> 20) % 60);
        let port = if n % 3 == 0 { "3389" } else { "22" };
        let duration = ["3s", "20s", "1h"][((n >> 8) % 3) as usize];
        let args = [
            "--json",
            "request",
            "--port",
            port,
            "--source",
            &source,
            "--duration",
            duration,
        ];
        let out = jitctl(&socket, &args, None);
        if !out.status.success() {
            continue;
        }
        if let Ok(reply) = serde_json::from_slice::<Value>(&out.stdout) {
            for g in reply["grants"].as_array().into_iter().flatten() {
                answered.push(Answered {
                    id: g["id"].as_u64().unwrap(),
                    expires_at: serde_json::from_value(g["expires_at"].clone()).unwrap(),
                });
            }
        }
    }
    answered
}

/// `(source, port)` of the grant elements in the kernel with more than `min_left` left.
fn kernel_elements(net: &Net, min_left: u64) -> std::collections::BTreeSet<(String, u64)> {
    let mut found = std::collections::BTreeSet::new();
    for set in ["grants4", "grants4_net"] {
        let out = net.nft(&["-j", "list", "set", "inet", "jitd", set]);
        let json: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        for item in json["nftables"].as_array().into_iter().flatten() {
            for e in item["set"]["elem"].as_array().into_iter().flatten() {
                let left = e["elem"]["expires"].as_u64().unwrap_or(u64::MAX);
                let concat = &e["elem"]["val"]["concat"];
                let (Some(source), Some(port)) =
                    (concat[0].as_str(), concat.as_array().and_then(|c| c.last()?.as_u64()))
                else {
                    continue;
                };
                if left > min_left {
                    found.insert((source.to_string(), port));
                }
            }
        }
    }
    found
}

/// The audit files (`audit.jsonl`, `audit.jsonl.N`) by name, with their inodes.
fn audit_files(dir: &Path) -> Vec<(String, u64)> {
    use std::os::unix::fs::MetadataExt;
    let mut files: Vec<(String, u64)> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            let name = e.file_name().to_string_lossy().into_owned();
            let audit = name == "audit.jsonl"
                || name
                    .strip_prefix("audit.jsonl.")
                    .is_some_and(|n| n.parse::<u32>().is_ok());
            if !audit {
                return None;
            }
            Some((name, e.metadata().ok()?.ino()))
        })
        .collect();
    files.sort();
    files
}

/// The grant ids with an `approved` record in the audit files. jitd keeps running (and
/// may rotate, renaming every file) while they are read, so the reading is repeated
/// until the files were the same before and after it.
fn approvals_on_record(dir: &Path) -> Result<std::collections::HashSet<u64>, String> {
    for _ in 0..20 {
        let before = audit_files(dir);
        let mut on_record = std::collections::HashSet::new();
        for (name, _) in &before {
            let Ok(text) = std::fs::read_to_string(dir.join(name)) else {
                continue; // renamed meanwhile: read again
            };
            for line in text.lines() {
                let r: Value = serde_json::from_str(line).map_err(|e| format!("{name}: a torn line {line:?}: {e}"))?;
                if r["outcome"] == "approved" {
                    on_record.insert(r["grant_id"].as_u64().unwrap_or_default());
                }
            }
        }
        if audit_files(dir) == before {
            return Ok(on_record);
        }
    }
    Err("the audit files kept changing while they were read".into())
}

/// Checks the invariants after a restart; the violation, if any.
fn soak_check(setup: &Setup, net: &Net, jitd: &Jitd, answered: &[Answered]) -> Result<(), String> {
    let on_record = approvals_on_record(&setup.state_dir())?;
    if let Some(a) = answered.iter().find(|a| !on_record.contains(&a.id)) {
        return Err(format!("grant {} was answered approved but has no audit record", a.id));
    }
    let out = jitd.ctl(&["audit", "verify"]);
    if !out.status.success() {
        return Err(format!("audit verify failed: {}", text(&out)));
    }
    let now = chrono::Utc::now();
    let status = jitd.ctl_json(&["status"]);
    let mut listed = std::collections::BTreeSet::new();
    for g in status["grants"].as_array().into_iter().flatten() {
        let expires: chrono::DateTime<chrono::Utc> = serde_json::from_value(g["expires_at"].clone()).unwrap();
        if expires + chrono::Duration::seconds(2) < now {
            return Err(format!("grant {} is open past its expires_at {expires}", g["id"]));
        }
        if let Some(a) = answered.iter().find(|a| a.id == g["id"].as_u64().unwrap()) {
            if expires > a.expires_at + chrono::Duration::seconds(1) {
                return Err(format!(
                    "grant {} was restored to {expires}, past the {} it was approved for",
                    a.id, a.expires_at
                ));
            }
        }
        if g["remaining_secs"].as_u64().unwrap_or_default() > 4 {
            listed.insert((g["source"].as_str().unwrap().to_string(), g["port"].as_u64().unwrap()));
        }
    }
    let held = kernel_elements(net, 4);
    let stray: Vec<_> = held.difference(&listed).collect();
    let missing: Vec<_> = listed.difference(&held).collect();
    // an element's timeout is rounded and a grant's remaining time truncated: only
    // those with several seconds left on both sides are compared
    let kernel_soon = kernel_elements(net, 0);
    let missing: Vec<_> = missing.into_iter().filter(|m| !kernel_soon.contains(m)).collect();
    let listed_any: std::collections::BTreeSet<(String, u64)> = status["grants"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|g| (g["source"].as_str().unwrap().to_string(), g["port"].as_u64().unwrap()))
        .collect();
    let stray: Vec<_> = stray.into_iter().filter(|s| !listed_any.contains(s)).collect();
    if !stray.is_empty() || !missing.is_empty() {
        return Err(format!(
            "the kernel's elements do not match jitctl status: in the kernel only {stray:?}, in status only {missing:?}"
        ));
    }
    Ok(())
}

/// The crash soak: jitd under request load from several clients, SIGKILLed at random
/// moments and restarted, the invariants checked after every restart. Run by
/// `scripts/crash-soak [CYCLES]` (`JITD_SOAK_CYCLES`, default 20).
#[test]
#[ignore]
fn crash_soak() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let cycles: u32 = std::env::var("JITD_SOAK_CYCLES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(20);
    let net = Net::new();
    let setup = Setup::new(&format!("audit_max_bytes = 65536\naudit_keep = 1000\n{POLICY}"));
    let mut answered: Vec<Answered> = Vec::new();
    let mut seed = std::process::id() as u64 ^ chrono::Utc::now().timestamp_millis() as u64;
    for cycle in 1..=cycles {
        let jitd = setup.start(&net.host);
        if let Err(violation) = soak_check(&setup, &net, &jitd, &answered) {
            panic!(
                "crash soak: cycle {cycle}: {violation}\njitd's log:\n{}",
                jitd.log_text()
            );
        }
        let stop = Arc::new(AtomicBool::new(false));
        let clients: Vec<_> = (0..4)
            .map(|c| {
                let (socket, stop) = (setup.socket(), stop.clone());
                let seed = seed.wrapping_add(c * 7919);
                std::thread::spawn(move || load(socket, seed, stop))
            })
            .collect();
        seed = seed.wrapping_mul(2862933555777941757).wrapping_add(3037000493);
        std::thread::sleep(Duration::from_millis(200 + (seed >> 33) % 1300));
        jitd.kill();
        stop.store(true, Ordering::SeqCst);
        for c in clients {
            answered.extend(c.join().unwrap());
        }
        eprintln!(
            "crash soak: cycle {cycle}/{cycles}: killed; {} approval(s) answered so far",
            answered.len()
        );
    }
    let jitd = setup.start(&net.host);
    if let Err(violation) = soak_check(&setup, &net, &jitd, &answered) {
        panic!(
            "crash soak: after the last cycle: {violation}\njitd's log:\n{}",
            jitd.log_text()
        );
    }
    eprintln!(
        "crash soak: {cycles} cycle(s), {} approval(s), no violation",
        answered.len()
    );
}

/// After a reboot, a checkpoint whose grant was edited to end in 2099 does not stretch
/// it: the grant is checked against its approval record in the audit log, the
/// checkpoint is refused (moved aside, audited) and the grants rebuilt from the log,
/// so the grant ends when its approval said, in status and in the kernel.
#[test]
fn a_checkpoint_that_stretches_a_grant_is_refused_and_the_grant_ends_as_approved() {
    let net = Net::new();
    serve_echo(&net.host, 22);
    let setup = Setup::new("[[ports]]\nport = 22\nmax_duration = \"1h\"\n");
    let jitd = setup.start(&net.host);
    let out = request(&jitd, &["--port", "22", "--source", A4, "--duration", "20s"]);
    let id = granted_id(&out);
    assert!(jitd.stop(Duration::from_secs(10)).success());
    // a reboot: the table goes with the kernel; the checkpoint is edited meanwhile
    net.nft_ok(&["delete", "table", "inet", "jitd"]);
    let path = setup.state_dir().join("grants.json");
    let mut saved: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(saved["grants"][0]["id"], id, "{saved}");
    saved["grants"][0]["expires_at"] = "2099-01-01T00:00:00Z".into();
    std::fs::write(&path, serde_json::to_vec(&saved).unwrap()).unwrap();

    let jitd = setup.start(&net.host);
    let status = jitd.ctl_json(&["status"]);
    let left = status["grants"][0]["remaining_secs"].as_u64().unwrap();
    assert!(left <= 20, "no more than approved: {status}");
    let refused: Vec<serde_json::Value> = setup.audit().into_iter().filter(|r| r["action"] == "recover").collect();
    assert!(
        refused.iter().any(|r| r["reason"].as_str().is_some_and(|w| w
            .contains("the grants checkpoint grants.json disagrees with the audit log (grant")
            && w.contains("rebuilt the grants from the audit log"))),
        "{refused:?}"
    );
    let aside = std::fs::read_dir(setup.state_dir())
        .unwrap()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with("grants.json.refused-"));
    assert!(aside, "the refused checkpoint is kept aside");
    assert!(can_connect(&net.a, HOST_A4, 22), "the grant itself holds");
    assert!(
        wait_for(Duration::from_secs(30), || !can_connect(&net.a, HOST_A4, 22)),
        "the kernel ends it when its approval said"
    );
    assert!(!can_connect(&net.b, HOST_B4, 22));
    // and a restart after that trusts its own new checkpoint again
    assert!(jitd.stop(Duration::from_secs(10)).success());
    let jitd = setup.start(&net.host);
    assert!(!jitd.log_text().contains("disagrees"), "{}", jitd.log_text());
}

/// The checkpoint's JSON, and a function that writes it back edited.
fn checkpoint(setup: &Setup) -> Value {
    serde_json::from_slice(&std::fs::read(setup.state_dir().join("grants.json")).unwrap()).unwrap()
}

fn write_checkpoint(setup: &Setup, saved: &Value) {
    std::fs::write(
        setup.state_dir().join("grants.json"),
        serde_json::to_vec(saved).unwrap(),
    )
    .unwrap();
}

/// Waits until the checkpoint (written at most once a second) says `check`.
fn checkpoint_says(setup: &Setup, check: impl Fn(&Value) -> bool) -> Value {
    let path = setup.state_dir().join("grants.json");
    let mut last = Value::Null;
    let caught_up = wait_for(Duration::from_secs(15), || {
        last = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null);
        check(&last)
    });
    assert!(caught_up, "the checkpoint never caught up: {last}");
    last
}

fn holds(saved: &Value, id: u64) -> bool {
    saved["grants"]
        .as_array()
        .is_some_and(|g| g.iter().any(|g| g["id"] == id))
}

/// The `recover` records: the checkpoint refused and the grants rebuilt from the log
/// (in any audit file: start-up may rotate the log after writing it).
fn refusals(setup: &Setup) -> Vec<String> {
    std::fs::read_dir(setup.state_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("audit.jsonl"))
        .flat_map(|p| {
            std::fs::read_to_string(p)
                .unwrap()
                .lines()
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .filter_map(|l| serde_json::from_str::<Value>(&l).ok())
        .filter(|r| r["action"] == "recover")
        .filter_map(|r| r["reason"].as_str().map(str::to_string))
        .filter(|w| w.contains("disagrees with the audit log") && w.contains("rebuilt the grants from the audit log"))
        .collect()
}

/// After a reboot, a checkpoint that names its grants' approval records in an audit
/// file that is not there proves nothing: neither the grant it stretched (edited to end
/// in 2099, its approval pointed at a file that does not exist) nor one it made up
/// outlives what the audit log itself proves. The checkpoint is refused, audited, and
/// the grants rebuilt from the log.
#[test]
fn a_checkpoint_naming_an_approval_in_a_missing_audit_file_proves_nothing() {
    let net = Net::new();
    serve_echo(&net.host, 22);
    let setup = Setup::new("[[ports]]\nport = 22\nmax_duration = \"1h\"\n");
    let jitd = setup.start(&net.host);
    let id = granted_id(&request(&jitd, &["--port", "22", "--source", A4, "--duration", "20s"]));
    assert!(jitd.stop(Duration::from_secs(10)).success());
    net.nft_ok(&["delete", "table", "inet", "jitd"]);
    let mut saved = checkpoint(&setup);
    assert!(holds(&saved, id), "{saved}");
    let nowhere = serde_json::json!({"file": "audit.jsonl.9", "offset": 1, "hash": "00".repeat(32)});
    saved["grants"][0]["expires_at"] = "2099-01-01T00:00:00Z".into();
    saved["approvals"][id.to_string()] = nowhere.clone();
    // and a grant nobody ever approved, for a stranger
    let mut made_up = saved["grants"][0].clone();
    made_up["id"] = (id + 50).into();
    made_up["source"] = format!("{B4}/32").into();
    saved["grants"].as_array_mut().unwrap().push(made_up);
    saved["approvals"][(id + 50).to_string()] = nowhere;
    saved["next_id"] = (id + 51).into();
    write_checkpoint(&setup, &saved);

    let jitd = setup.start(&net.host);
    let status = jitd.ctl_json(&["status"]);
    for g in status["grants"].as_array().unwrap() {
        assert_eq!(g["id"], id, "only the approved grant may come back: {status}");
        assert!(
            g["remaining_secs"].as_u64().unwrap() <= 20,
            "no more than approved: {status}"
        );
    }
    assert!(!can_connect(&net.b, HOST_B4, 22), "the made-up grant opens nothing");
    assert!(
        !refusals(&setup).is_empty(),
        "refusing the checkpoint is audited: {status} {}",
        jitd.log_text()
    );
    assert!(
        wait_for(Duration::from_secs(30), || !can_connect(&net.a, HOST_A4, 22)),
        "the grant ends when its approval said"
    );
}

/// An audit file holding a live grant's approval deleted while jitd was down (rotation
/// never deletes it): after a reboot nothing proves the grant, so it does not come
/// back, whatever the checkpoint says; the grants the log still proves do.
#[test]
fn a_grant_whose_approval_record_was_deleted_does_not_come_back_after_a_reboot() {
    let net = Net::new();
    serve_echo(&net.host, 22);
    let setup = Setup::new("audit_max_bytes = 4096\naudit_keep = 50\n[[ports]]\nport = 22\nmax_duration = \"1h\"\n");
    let jitd = setup.start(&net.host);
    let lost = granted_id(&request(&jitd, &["--port", "22", "--source", B4, "--duration", "1h"]));
    for i in 0..30 {
        let source = format!("198.51.100.{}", i + 1);
        granted_id(&request(
            &jitd,
            &["--port", "22", "--source", &source, "--duration", "1h"],
        ));
    }
    let kept = granted_id(&request(&jitd, &["--port", "22", "--source", A4, "--duration", "1h"]));
    assert!(jitd.stop(Duration::from_secs(10)).success());
    net.nft_ok(&["delete", "table", "inet", "jitd"]);
    let approval_of = |path: &Path, id: u64| {
        std::fs::read_to_string(path).unwrap().lines().any(|l| {
            let r: Value = serde_json::from_str(l).unwrap_or(Value::Null);
            r["action"] == "request" && r["outcome"] == "approved" && r["grant_id"] == id
        })
    };
    let holding: Vec<PathBuf> = std::fs::read_dir(setup.state_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("audit.jsonl"))
        .filter(|p| approval_of(p, lost))
        .collect();
    assert_eq!(holding.len(), 1, "{holding:?}");
    assert!(!approval_of(&holding[0], kept), "rotated apart");
    std::fs::remove_file(&holding[0]).unwrap();

    let jitd = setup.start(&net.host);
    let ids = jitd.grant_ids();
    assert!(!ids.contains(&lost), "nothing proves grant {lost} any more: {ids:?}");
    assert!(!can_connect(&net.b, HOST_B4, 22), "its address stays locked");
    assert!(ids.contains(&kept), "{ids:?}");
    assert!(can_connect(&net.a, HOST_A4, 22), "what the log proves is restored");
    assert!(
        !refusals(&setup).is_empty(),
        "refusing the checkpoint is audited: {}",
        jitd.log_text()
    );
}

/// A grant revoked after its approval never comes back from a checkpoint: not when it
/// is written back into grants.json, nor when the checkpoint's place in the journal is
/// moved past the revocation (so that replaying the journal would not see it). The
/// checkpoint is refused and audited, and every grant the log proves live is restored.
#[test]
fn a_revoked_grant_written_back_into_the_checkpoint_does_not_come_back() {
    for how in ["written back", "position moved past the revocation"] {
        let net = Net::new();
        serve_echo(&net.host, 22);
        let setup = Setup::new("[[ports]]\nport = 22\nmax_duration = \"1h\"\n");
        let jitd = setup.start(&net.host);
        let id = granted_id(&request(&jitd, &["--port", "22", "--source", A4, "--duration", "1h"]));
        let before = checkpoint_says(&setup, |s| holds(s, id));
        jitd.ctl_json(&["revoke", &id.to_string()]);
        let other = granted_id(&request(&jitd, &["--port", "22", "--source", B4, "--duration", "1h"]));
        assert!(jitd.stop(Duration::from_secs(10)).success());
        net.nft_ok(&["delete", "table", "inet", "jitd"]);
        let saved = match how {
            "written back" => {
                let mut saved = checkpoint(&setup);
                assert!(!holds(&saved, id) && holds(&saved, other), "{how}: {saved}");
                let grant = before["grants"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|g| g["id"] == id)
                    .unwrap();
                saved["grants"].as_array_mut().unwrap().insert(0, grant.clone());
                saved["approvals"][id.to_string()] = before["approvals"][id.to_string()].clone();
                saved
            }
            _ => {
                // the old checkpoint, naming the journal's end as the place it covers
                let mut saved = before.clone();
                let audit = setup.audit_file();
                let len = std::fs::metadata(&audit).unwrap().len();
                let last = setup.audit().last().unwrap()["hash"].clone();
                saved["position"] = serde_json::json!({"file": "audit.jsonl", "offset": len, "hash": last});
                saved["audit_hash"] = last;
                saved
            }
        };
        write_checkpoint(&setup, &saved);

        let jitd = setup.start(&net.host);
        let ids = jitd.grant_ids();
        assert!(!ids.contains(&id), "{how}: the revoked grant came back: {ids:?}");
        assert!(!can_connect(&net.a, HOST_A4, 22), "{how}: its address stays locked");
        assert!(ids.contains(&other), "{how}: the live grant is restored: {ids:?}");
        assert!(can_connect(&net.b, HOST_B4, 22), "{how}");
        assert!(
            !refusals(&setup).is_empty(),
            "{how}: refusing the checkpoint is audited"
        );
    }
}
