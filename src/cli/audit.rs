//! How `jitctl audit` shows audit records: a table for people, CSV or JSON, written
//! page by page so that neither jitd nor jitctl holds the whole log.

use std::io::{self, Write};

use chrono::Local;

use crate::audit::{enum_text, write_csv, AuditRecord};
use crate::text::escape_json_output;

/// Part of one JSON array printed across pages (hidden characters written as
/// `\uXXXX`, as for every JSON jitctl prints).
pub fn json_items(records: &[AuditRecord], first: bool, last: bool) -> String {
    let mut text = String::new();
    if first {
        text.push('[');
    }
    for (i, r) in records.iter().enumerate() {
        if !(first && i == 0) {
            text.push(',');
        }
        text.push_str("\n  ");
        text.push_str(&serde_json::to_string(r).expect("records serialize"));
    }
    if last {
        text.push_str("\n]");
    }
    if text.is_empty() {
        return text;
    }
    format!("{}\n", escape_json_output(&text))
}

/// One later page as CSV rows, without the header row.
pub fn csv_rows(out: &mut dyn Write, records: &[AuditRecord]) -> io::Result<()> {
    let mut buf = Vec::new();
    csv(&mut buf, records)?;
    let body = buf
        .iter()
        .position(|b| *b == b'\n')
        .map_or(&buf[..], |at| &buf[at + 1..]);
    out.write_all(body)
}

/// Records as CSV with its header row (formulas neutralised, see [`write_csv`]).
pub fn csv(out: &mut dyn Write, records: &[AuditRecord]) -> io::Result<()> {
    write_csv(records, out).map_err(|e| match e.into_kind() {
        ::csv::ErrorKind::Io(e) => e,
        other => io::Error::other(format!("writing CSV: {other:?}")),
    })
}

/// Records as a table for people, times in local time.
pub fn table(out: &mut dyn Write, records: &[AuditRecord]) -> io::Result<()> {
    let rows: Vec<Vec<String>> = records
        .iter()
        .map(|r| {
            vec![
                r.time.with_timezone(&Local).format("%Y-%m-%d %H:%M:%S").to_string(),
                r.actor.clone(),
                enum_text(&r.action),
                enum_text(&r.outcome),
                r.ports.iter().map(u16::to_string).collect::<Vec<_>>().join(","),
                r.source.clone().unwrap_or_default(),
                r.grant_id
                    .map(|g| g.to_string())
                    .or_else(|| r.request_id.map(|q| format!("request {q}")))
                    .unwrap_or_default(),
                r.connections.map(|n| n.to_string()).unwrap_or_default(),
                r.reason.clone().unwrap_or_default(),
            ]
        })
        .collect();
    let headers = [
        "TIME", "ACTOR", "ACTION", "OUTCOME", "PORTS", "SOURCE", "GRANT", "CONNS", "REASON",
    ];
    out.write_all(crate::cli::table::render(&headers, &rows).as_bytes())
}
