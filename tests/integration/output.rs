//! What jitctl prints and exports is safe: text a caller planted in the audit log
//! (escape sequences, bidi overrides, zero-width characters, spreadsheet formulas)
//! reaches neither an admin's terminal nor a spreadsheet raw, and a reader that goes
//! away (`jitctl audit | head -1`) ends jitctl quietly instead of with a panic.

use std::os::fd::OwnedFd;
use std::process::{Command, Output, Stdio};

use crate::util::*;

/// Erase the screen, set the window title (OSC 0, ended by BEL), reverse the text that
/// follows (RLO), hide a character (ZWSP), and a C1 CSI.
const HOSTILE: &str = "10.9.9.9\x1b[2J\x1b]0;pwned\x07\u{202e}gnp.exe\u{200b}\u{9b}31m";

/// The visible forms of [`HOSTILE`]'s hidden characters, as jitctl must show them.
const SHOWN: [&str; 5] = [
    r"\u{1b}[2J",
    r"\u{1b}]0;pwned\u{7}",
    r"\u{202e}",
    r"\u{200b}",
    r"\u{9b}31m",
];

const POLICY: &str = "socket_group = \"nogroup\"\n[[ports]]\nport = 22\n";

/// Fails naming `what` if `bytes` hold any raw character an attacker could use on a
/// terminal: ESC, BEL, a C1 control, RLO or ZWSP.
fn assert_nothing_raw(what: &str, bytes: &[u8]) {
    let text = String::from_utf8_lossy(bytes);
    for bad in ['\x1b', '\x07', '\u{9b}', '\u{202e}', '\u{200b}'] {
        assert!(
            !text.contains(bad),
            "{what} carries a raw U+{:04X}:\n{text}",
            u32::from(bad)
        );
    }
}

fn stdout_of(jitd: &Jitd, args: &[&str]) -> String {
    let out = jitd.ctl(args);
    assert!(out.status.success(), "jitctl {args:?}: {}", text(&out));
    assert_nothing_raw(&format!("jitctl {args:?} (stderr)"), &out.stderr);
    String::from_utf8(out.stdout).unwrap()
}

/// `jitctl audit` as a table, as CSV and as JSON: nothing raw, the escapes visible,
/// the JSON still meaning the original text. Returns the CSV rows.
fn audit_is_safe_everywhere(jitd: &Jitd) -> Vec<csv::StringRecord> {
    let table = stdout_of(jitd, &["audit"]);
    assert_nothing_raw("jitctl audit", table.as_bytes());
    for shown in SHOWN {
        // jitd stores a refused caller's input escaped already; shown, it is escaped
        // once more (its backslashes doubled): either way nothing is raw
        assert!(
            table.contains(shown) || table.contains(&shown.replace('\\', "\\\\")),
            "the table shows {shown}:\n{table}"
        );
    }
    let csv_text = stdout_of(jitd, &["audit", "--format", "csv"]);
    assert_nothing_raw("jitctl audit --format csv", csv_text.as_bytes());
    for shown in SHOWN {
        assert!(
            csv_text.contains(shown) || csv_text.contains(&shown.replace('\\', "\\\\")),
            "the CSV shows {shown}:\n{csv_text}"
        );
    }
    let json = stdout_of(jitd, &["--json", "audit"]);
    assert_nothing_raw("jitctl --json audit", json.as_bytes());
    let records: serde_json::Value = serde_json::from_str(&json).expect("valid JSON");
    assert!(
        records.as_array().unwrap().iter().any(|r| r["source"] == HOSTILE
            || r["source"]
                .as_str()
                .is_some_and(|s| s.starts_with("(unchecked input, escaped)"))),
        "the JSON still carries the text itself, escaped the JSON way:\n{json}"
    );
    csv::Reader::from_reader(csv_text.as_bytes())
        .records()
        .map(Result::unwrap)
        .collect()
}

#[test]
fn a_refused_callers_escape_sequences_are_shown_escaped() {
    let net = Net::new();
    let setup = Setup::new(POLICY);
    let jitd = setup.start(&net.host);
    // uid 65534 has no role: refused, but the refusal is audited with what it sent
    let out = jitd.ctl_as(
        65534,
        65534,
        &[
            "request",
            "--port",
            "22",
            "--source",
            HOSTILE,
            "--duration",
            "1m",
            "--justification",
            HOSTILE,
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_nothing_raw("the refusal on stderr", &out.stderr);
    audit_is_safe_everywhere(&jitd);
}

/// An audit line written by hand, not by jitd: jitctl's escaping must not rely on
/// what jitd lets into the log.
fn crafted_record(actor: &str, text: &str) -> String {
    serde_json::json!({
        "time": chrono::Utc::now().to_rfc3339(),
        "actor_uid": 4711,
        "actor": actor,
        "action": "request",
        "outcome": "approved",
        "reason": text,
        "ports": [22],
        "source": text,
        "justification": format!("=HYPERLINK(\"http://x\"){text}"),
        "grant_id": 99,
    })
    .to_string()
}

#[test]
fn a_crafted_audit_record_is_shown_escaped_in_audit_and_status() {
    let net = Net::new();
    let setup = Setup::new(POLICY);
    std::fs::create_dir_all(setup.state_dir()).unwrap();
    let actor = "eve\x1b]0;root\x07\u{202e}";
    std::fs::write(setup.audit_file(), crafted_record(actor, HOSTILE) + "\n").unwrap();
    let jitd = setup.start(&net.host);
    let rows = audit_is_safe_everywhere(&jitd);
    let crafted = rows.iter().find(|r| &r[11] == "99").expect("the crafted record");
    assert!(crafted[10].starts_with("'=HYPERLINK"), "{crafted:?}");
    assert_eq!(&crafted[2], r"eve\u{1b}]0;root\u{7}\u{202e}");
    // jitd read the record back at start: `status` shows its actor as the last user
    let status = stdout_of(&jitd, &["status"]);
    assert_nothing_raw("jitctl status", status.as_bytes());
    assert!(status.contains(r"eve\u{1b}]0;root\u{7}\u{202e}"), "{status}");
}

#[test]
fn exported_cells_never_start_a_formula() {
    let net = Net::new();
    let setup = Setup::new(POLICY);
    let jitd = setup.start(&net.host);
    let formulas = ["=cmd|' /C calc'!A0", "@SUM(1)", "+1", "-1"];
    for (i, j) in formulas.iter().enumerate() {
        let source = format!("10.8.0.{}", i + 1);
        let justification = format!("--justification={j}");
        jitd.ctl_json(&[
            "request",
            "--port",
            "22",
            "--source",
            &source,
            "--duration",
            "1h",
            &justification,
        ]);
    }
    let csv_text = stdout_of(&jitd, &["audit", "--format", "csv"]);
    let rows: Vec<csv::StringRecord> = csv::Reader::from_reader(csv_text.as_bytes())
        .records()
        .map(Result::unwrap)
        .collect();
    for j in formulas {
        let row = rows
            .iter()
            .find(|r| r[10].ends_with(j))
            .unwrap_or_else(|| panic!("{j}: {csv_text}"));
        assert_eq!(row[10], format!("'{j}"), "{csv_text}");
    }
    // the table and JSON show them as they are: only spreadsheets run formulas
    let json = jitd.ctl_json(&["audit"]);
    assert!(json.as_array().unwrap().iter().any(|r| r["justification"] == "-1"));
}

/// Runs jitctl as root with stdout a pipe whose read end is already closed, as when
/// `head -1` has read its line and gone.
fn ctl_into_closed_pipe(setup: &Setup, args: &[&str]) -> Output {
    let (read, write): (OwnedFd, OwnedFd) = nix::unistd::pipe().unwrap();
    drop(read);
    let child = Command::new(env!("CARGO_BIN_EXE_jitctl"))
        .arg("--socket")
        .arg(setup.socket())
        .args(args)
        .stdout(Stdio::from(write))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn a_reader_that_went_away_ends_jitctl_quietly() {
    let net = Net::new();
    let setup = Setup::new(POLICY);
    let jitd = setup.start(&net.host);
    jitd.ctl_json(&["request", "--port", "22", "--source", A4, "--duration", "1h"]);
    for args in [
        &["status"][..],
        &["audit"],
        &["audit", "--format", "csv"],
        &["--json", "audit"],
        &["--json", "status"],
    ] {
        let out = ctl_into_closed_pipe(&setup, args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "jitctl {args:?}: {}", text(&out));
        assert_eq!(out.status.code(), Some(0), "jitctl {args:?}: {}", text(&out));
        assert!(stderr.is_empty(), "jitctl {args:?} says nothing: {}", text(&out));
    }
}

#[test]
fn jitd_check_config_into_a_closed_pipe_ends_quietly() {
    let net = Net::new();
    let setup = Setup::new(POLICY);
    let (read, write): (OwnedFd, OwnedFd) = nix::unistd::pipe().unwrap();
    drop(read);
    let out = Command::new("ip")
        .args(["netns", "exec", &net.host, env!("CARGO_BIN_EXE_jitd"), "--config"])
        .arg(setup.policy())
        .arg("--check-config")
        .stdout(Stdio::from(write))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
        .wait_with_output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("panicked"),
        "{}",
        text(&out)
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}
