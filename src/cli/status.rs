//! How `jitctl status` shows jitd's status: the head (protected ports, policy, health,
//! clock notes, requests waiting for approval) and the grants, page by page, as a
//! table for people or as one JSON object for scripts.

use std::io::{self, Write};

use chrono::{DateTime, Local, Utc};

use crate::api::protocol::{ClockStatus, GrantInfo, PortStatus, StatusReply};
use crate::audit::enum_text;
use crate::cli::{approvals, doctor, table};
use crate::text::{escape_for_terminal, escape_json_output};

/// One page of `status` as JSON: with the first, the object's other fields and the
/// opening of `grants`; then the page's grants, one per line; with the last, the close.
/// Hidden characters are written as `\uXXXX`; empty when there is nothing to print.
pub fn json_page(page: &StatusReply, first: bool, listed: usize, last: bool) -> String {
    let mut text = String::new();
    if first {
        let mut head = serde_json::to_value(page).expect("replies serialize");
        let fields = head.as_object_mut().expect("an object");
        fields.remove("grants");
        fields.remove("next_cursor");
        let head = serde_json::to_string_pretty(&head).expect("values serialize");
        // `{ ... }` without its closing brace, then the array the pages fill
        text.push_str(head.trim_end().trim_end_matches('}').trim_end());
        text.push_str(",\n  \"grants\": [");
    }
    for (i, g) in page.grants.iter().enumerate() {
        if listed + i > 0 {
            text.push(',');
        }
        text.push_str("\n    ");
        text.push_str(&serde_json::to_string(g).expect("grants serialize"));
    }
    if last {
        text.push_str(if listed + page.grants.len() > 0 {
            "\n  ]\n}"
        } else {
            "]\n}"
        });
    }
    if text.is_empty() {
        return text;
    }
    format!("{}\n", escape_json_output(&text))
}

/// One page of `status` for people: with the first, the head ([`head`]); the grants
/// in columns fitted to the first page that has any (`columns` keeps them).
pub fn page(
    out: &mut dyn Write,
    page: &StatusReply,
    first: bool,
    columns: &mut Option<table::Columns>,
) -> io::Result<()> {
    if first {
        head(out, page)?;
    }
    if page.grants.is_empty() {
        return Ok(());
    }
    let rows: Vec<Vec<String>> = page.grants.iter().map(grant_row).collect();
    let headers = [
        "ID",
        "SOURCE",
        "PORT",
        "PROTO",
        "REQUESTER",
        "TIME LEFT",
        "CONNS",
        "JUSTIFICATION",
    ];
    let columns = match columns {
        Some(c) => c,
        None => {
            writeln!(out, "Active grants")?;
            let fitted = columns.insert(table::Columns::fit(&headers, &rows));
            out.write_all(fitted.header(&headers).as_bytes())?;
            fitted
        }
    };
    out.write_all(columns.rows(&rows).as_bytes())
}

/// The ports, policy, health and clock notes `status` shows above the grants.
pub fn head(out: &mut dyn Write, s: &StatusReply) -> io::Result<()> {
    let esc = |t: &str| escape_for_terminal(t).into_owned();
    writeln!(
        out,
        "Protected ports (jitd {}, on stop: {}, your role: {}{})",
        esc(&s.version),
        esc(&enum_text(&s.on_stop)),
        esc(&enum_text(&s.your_role)),
        if s.approver { ", approver" } else { "" }
    )?;
    let rows: Vec<Vec<String>> = s.ports.iter().map(port_row).collect();
    out.write_all(
        table::render(
            &[
                "PORT",
                "PROTO",
                "ALLOWED SOURCES",
                "MAX",
                "APPROVED 7D",
                "LAST ACCESS",
                "LAST USER",
            ],
            &rows,
        )
        .as_bytes(),
    )?;
    if !s.exempt_sources.is_empty() {
        writeln!(out, "Exempt from the lockdown: {}", esc(&s.exempt_sources.join(", ")))?;
    }
    if !s.interfaces.is_empty() {
        writeln!(out, "Locked only on: {}", esc(&s.interfaces.join(", ")))?;
    }
    let h = &s.health;
    writeln!(
        out,
        "Since start: {} approved, {} denied, {} failed; {} drift repair(s); {} audit write failure(s); {} connection(s) refused by the limit",
        h.requests_approved, h.requests_denied, h.requests_failed, h.drift_repairs, h.audit_write_failures, h.refused_connections
    )?;
    writeln!(out, "{}", escape_for_terminal(&doctor::status_line(s.doctor.as_ref())))?;
    clock_notes(out, &s.clock)?;
    if !s.pending.is_empty() {
        writeln!(
            out,
            "\nWaiting for approval (jitctl approve ID, jitctl deny ID --reason ...)"
        )?;
        let rows: Vec<Vec<String>> = s.pending.iter().map(approvals::row).collect();
        out.write_all(table::render(&approvals::HEADERS, &rows).as_bytes())?;
    }
    if let Some(at) = s.connections_counted_at {
        writeln!(
            out,
            "CONNS: new connections each grant admitted, counted up to {} (the kernel's counters)",
            at.with_timezone(&Local).format("%H:%M:%S")
        )?;
    }
    writeln!(out)
}

/// What jitd noticed about its wall clock, when anything.
fn clock_notes(out: &mut dyn Write, c: &ClockStatus) -> io::Result<()> {
    if let Some(jump) = &c.last_jump {
        let size = crate::duration::format(std::time::Duration::from_secs(jump.by_secs.unsigned_abs()));
        writeln!(
            out,
            "Note: the wall clock jumped {} {size} at {} ({} jump(s) since jitd started); grants end on the kernel's timers: TIME LEFT is the truth, end times are jitd's clock now + time left",
            if jump.by_secs < 0 { "back" } else { "forward" },
            both_times(jump.at),
            c.jumps,
        )?;
    }
    if c.behind_audit_at_start {
        writeln!(
            out,
            "Note: at start the wall clock was behind the audit log; no grant was restored without the kernel's timers"
        )?;
    }
    Ok(())
}

/// A protected port as a row of the ports table.
fn port_row(p: &PortStatus) -> Vec<String> {
    vec![
        p.port.to_string(),
        p.protocol.to_string(),
        p.allowed_sources.join(", "),
        crate::duration::format(std::time::Duration::from_secs(p.max_duration_secs)),
        p.approved_last_7d.to_string(),
        short_time(p.last_access),
        p.last_user.clone().unwrap_or_else(|| "-".into()),
    ]
}

/// A grant as a row of the grants table.
fn grant_row(g: &GrantInfo) -> Vec<String> {
    vec![
        g.id.to_string(),
        g.source.clone(),
        g.port.to_string(),
        g.protocol.to_string(),
        g.requester.clone(),
        crate::duration::format(std::time::Duration::from_secs(g.remaining_secs)),
        g.connections.map_or("-".into(), |n| n.to_string()),
        g.justification.clone().unwrap_or_default(),
    ]
}

/// A time in local time and in UTC: `2026-12-06 13:00:00 CET (2026-12-06T12:00:00Z)`.
pub fn both_times(t: DateTime<Utc>) -> String {
    format!(
        "{} ({})",
        t.with_timezone(&Local).format("%Y-%m-%d %H:%M:%S %Z"),
        t.format("%Y-%m-%dT%H:%M:%SZ")
    )
}

/// A time in local time to the minute, `-` when there is none.
fn short_time(t: Option<DateTime<Utc>>) -> String {
    t.map_or("-".into(), |t| {
        t.with_timezone(&Local).format("%Y-%m-%d %H:%M").to_string()
    })
}
