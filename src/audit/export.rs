//! The audit records as CSV for spreadsheets: a header row, then one row per record,
//! every cell made safe with [`crate::text::csv_cell`] (hidden characters escaped,
//! cells that would start a formula prefixed with `'`).

use std::io::Write;

use super::{enum_text, AuditRecord};
use crate::text::csv_cell;

/// The CSV columns, in order (the header row).
pub const CSV_HEADER: [&str; 16] = [
    "time",
    "actor_uid",
    "actor",
    "action",
    "outcome",
    "reason",
    "ports",
    "protocol",
    "source",
    "duration_secs",
    "justification",
    "grant_id",
    "principals",
    "key",
    "peer",
    "connections",
];

/// The cells of `record` in [`CSV_HEADER`] order, before neutralisation; ports are
/// space-separated, missing values empty.
fn raw_cells(r: &AuditRecord) -> [String; 16] {
    let opt = |v: Option<String>| v.unwrap_or_default();
    let ports: Vec<String> = r.ports.iter().map(u16::to_string).collect();
    [
        r.time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        opt(r.actor_uid.map(|u| u.to_string())),
        r.actor.clone(),
        enum_text(&r.action),
        enum_text(&r.outcome),
        opt(r.reason.clone()),
        ports.join(" "),
        opt(r.protocol.map(|p| p.to_string())),
        opt(r.source.clone()),
        opt(r.duration_secs.map(|d| d.to_string())),
        opt(r.justification.clone()),
        opt(r.grant_id.map(|g| g.to_string())),
        r.principals.join(" "),
        opt(r.key.clone()),
        opt(r.peer.clone()),
        opt(r.connections.map(|n| n.to_string())),
    ]
}

/// Writes `records` as CSV with a header row; every cell goes through
/// [`csv_cell`], so no cell carries a control or format character or starts a formula.
pub fn write_csv(records: &[AuditRecord], out: impl Write) -> csv::Result<()> {
    let mut w = csv::Writer::from_writer(out);
    w.write_record(CSV_HEADER)?;
    for r in records {
        let cells = raw_cells(r);
        w.write_record(cells.iter().map(|c| csv_cell(c).into_owned()))?;
    }
    w.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use chrono::{DateTime, Utc};

    use super::*;
    use crate::audit::{Action, Outcome};

    fn record(justification: &str, source: &str) -> AuditRecord {
        let time = DateTime::parse_from_rfc3339("2026-11-25T10:01:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let mut r = AuditRecord::new(time, Some(1001), "bob", Action::Request, Outcome::Approved);
        r.ports = vec![22];
        r.source = Some(source.into());
        r.justification = Some(justification.into());
        r.grant_id = Some(3);
        r
    }

    fn csv_of(records: &[AuditRecord]) -> String {
        let mut out = Vec::new();
        write_csv(records, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn csv_has_a_header_and_quotes_text() {
        let text = csv_of(&[record("ticket, \"4711\"", "203.0.113.7")]);
        let mut lines = text.lines();
        assert_eq!(lines.next().unwrap(), CSV_HEADER.join(","));
        assert_eq!(
            lines.next().unwrap(),
            r#"2026-11-25T10:01:00Z,1001,bob,request,approved,,22,,203.0.113.7,,"ticket, ""4711""",3,,,,"#
        );
    }

    #[test]
    fn formulas_and_hidden_characters_are_neutralised() {
        let text = csv_of(&[record("=cmd|' /C calc'!A0", "-"), record("@SUM(1)", "\x1b[2J\u{202e}")]);
        let mut rows = csv::Reader::from_reader(text.as_bytes());
        let rows: Vec<csv::StringRecord> = rows.records().map(Result::unwrap).collect();
        assert_eq!(&rows[0][10], "'=cmd|' /C calc'!A0");
        assert_eq!(&rows[0][8], "'-");
        assert_eq!(&rows[1][10], "'@SUM(1)");
        assert_eq!(&rows[1][8], r"\u{1b}[2J\u{202e}");
        assert!(!text.contains('\x1b') && !text.contains('\u{202e}'), "{text}");
    }
}
