//! `jitctl`: asks jitd for just-in-time access, shows status and reads the audit log.

use std::process::ExitCode;

use chrono::{DateTime, Local, Utc};
use clap::Parser;
use jitd::api::client::{call, ClientError};
use jitd::api::protocol::{
    AuditQuery, AuditReply, GrantInfo, GrantRequest, GrantedReply, ReloadReply, Request, RevokeRequest, RevokedReply,
    StatusReply, PROTOCOL_ERROR_CODES,
};
use jitd::audit::{enum_text, AuditFilter};
use jitd::cli::jitctl::{AuditCheck, Cli, Command, Format};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Refused(message)) => {
            eprintln!("jitctl: refused: {message}");
            ExitCode::from(1)
        }
        Err(Failure::Usage(message)) => {
            eprintln!("jitctl: {message}");
            ExitCode::from(2)
        }
    }
}

enum Failure {
    Refused(String),
    Usage(String),
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Failure {
        match &e {
            ClientError::Refused(body) if !PROTOCOL_ERROR_CODES.contains(&body.code.as_str()) => {
                Failure::Refused(format!("{} ({})", body.message, body.code))
            }
            _ => Failure::Usage(e.to_string()),
        }
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let socket = cli.socket.as_path();
    match cli.command {
        Command::Status => {
            let status: StatusReply = call(socket, &Request::Status).await?;
            if cli.json {
                print_json(&status);
            } else {
                print_status(&status);
            }
        }
        Command::Request {
            ports,
            source,
            duration,
            until,
            justification,
        } => {
            let source = match source {
                Some(s) => s,
                None => ssh_client_address()?,
            };
            let request = GrantRequest {
                ports,
                source,
                duration_secs: duration.map(|d| d.as_secs() + u64::from(d.subsec_nanos() > 0)),
                until,
                justification,
            };
            let granted: GrantedReply = call(socket, &Request::Request(request)).await?;
            if cli.json {
                print_json(&granted);
            } else {
                for g in &granted.grants {
                    println!(
                        "granted: id {} opens {}/{} for {} until {}",
                        g.id,
                        g.port,
                        g.protocol,
                        g.source,
                        both_times(g.expires_at)
                    );
                }
                for id in &granted.superseded {
                    println!("replaced: grant {id} (superseded by the new grant)");
                }
            }
        }
        Command::Revoke { id, source, port } => {
            let revoked: RevokedReply = call(socket, &Request::Revoke(RevokeRequest { id, source, port })).await?;
            if cli.json {
                print_json(&revoked);
            } else {
                for g in &revoked.revoked {
                    println!("revoked: id {} closed {}/{} for {}", g.id, g.port, g.protocol, g.source);
                }
            }
        }
        Command::Audit {
            check: Some(AuditCheck::Verify),
            ..
        } => {
            let verdict: jitd::audit::chain::Verdict = call(socket, &Request::AuditVerify).await?;
            if cli.json {
                print_json(&verdict);
            }
            for note in &verdict.notes {
                eprintln!("jitctl: note: {note}");
            }
            match &verdict.broken {
                None => {
                    if !cli.json {
                        println!("audit trail intact: {} record(s) chained", verdict.records);
                    }
                }
                Some(b) => {
                    return Err(Failure::Refused(format!(
                        "audit trail broken: the record at {}:{} {} ({} record(s) before it verified)",
                        b.file.display(),
                        b.line,
                        b.problem,
                        verdict.records
                    )))
                }
            }
        }
        Command::Audit {
            check: None,
            since,
            until,
            user,
            port,
            format,
            limit,
            cursor,
        } => {
            let query = AuditQuery {
                filter: AuditFilter {
                    since,
                    until,
                    user,
                    port,
                },
                limit: limit.map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
                cursor,
            };
            let format = if cli.json { Format::Json } else { format };
            audit_pages(socket, query, format).await?;
        }
        Command::Reload => {
            let reply: ReloadReply = call(socket, &Request::Reload).await?;
            if cli.json {
                print_json(&reply);
            } else {
                println!(
                    "policy reloaded; {} grant(s) ended because the new policy no longer allows them",
                    reply.ended.len()
                );
            }
        }
    }
    Ok(())
}

/// The SSH client's address from `SSH_CONNECTION` ("client port server port").
fn ssh_client_address() -> Result<String, Failure> {
    let conn = std::env::var("SSH_CONNECTION").map_err(|_| {
        Failure::Usage("--source is required (not inside an SSH session, so there is no client address to take)".into())
    })?;
    let addr = conn.split_whitespace().next().unwrap_or_default().to_string();
    if addr.parse::<std::net::IpAddr>().is_err() {
        return Err(Failure::Usage(format!(
            "SSH_CONNECTION does not start with an address ({conn:?}); give --source"
        )));
    }
    eprintln!("jitctl: using your SSH client address {addr} as --source (from SSH_CONNECTION)");
    Ok(addr)
}

/// The page size jitctl asks for when it reads every record.
const PAGE: usize = 1000;

/// Prints the audit records a query asks for. With `--limit` or `--cursor`: one page,
/// and the cursor to go on from (JSON: the reply with its `next_cursor`). Without: every
/// record, fetched and printed page by page so that memory stays bounded (JSON: one
/// array; CSV: one header).
async fn audit_pages(socket: &std::path::Path, mut query: AuditQuery, format: Format) -> Result<(), Failure> {
    let one_page = query.limit.is_some() || query.cursor.is_some();
    if !one_page {
        query.limit = Some(PAGE);
    }
    let mut first = true;
    loop {
        let reply: AuditReply = call(socket, &Request::Audit(query.clone())).await?;
        for w in &reply.warnings {
            eprintln!("jitctl: warning: {w}");
        }
        match format {
            Format::Json if one_page => print_json(&reply),
            Format::Json => print_json_items(&reply.records, first, reply.next_cursor.is_none()),
            Format::Csv => print_csv(&reply, first)?,
            Format::Table => print_audit(&reply),
        }
        first = false;
        match reply.next_cursor {
            Some(next) if !one_page => query.cursor = Some(next),
            Some(next) if format != Format::Json => {
                eprintln!("jitctl: more records: go on with --cursor {next}");
                return Ok(());
            }
            _ => return Ok(()),
        }
    }
}

/// Part of one JSON array printed across pages.
fn print_json_items(records: &[jitd::audit::AuditRecord], first: bool, last: bool) {
    let mut out = String::new();
    if first {
        out.push('[');
    }
    for (i, r) in records.iter().enumerate() {
        if !(first && i == 0) {
            out.push(',');
        }
        out.push_str("\n  ");
        out.push_str(&serde_json::to_string(r).expect("records serialize"));
    }
    if last {
        out.push_str("\n]");
    }
    if !out.is_empty() {
        println!("{out}");
    }
}

/// One page as CSV; the header row only on the first.
fn print_csv(reply: &AuditReply, first: bool) -> Result<(), Failure> {
    let mut buf = Vec::new();
    jitd::audit::write_csv(&reply.records, &mut buf).map_err(|e| Failure::Usage(format!("writing CSV: {e}")))?;
    let body = match first {
        true => &buf[..],
        false => buf
            .iter()
            .position(|b| *b == b'\n')
            .map_or(&buf[..], |at| &buf[at + 1..]),
    };
    std::io::Write::write_all(&mut std::io::stdout().lock(), body)
        .map_err(|e| Failure::Usage(format!("writing CSV: {e}")))
}

fn print_json(value: &impl serde::Serialize) {
    println!("{}", serde_json::to_string_pretty(value).expect("results serialize"));
}

fn both_times(t: DateTime<Utc>) -> String {
    format!(
        "{} ({})",
        t.with_timezone(&Local).format("%Y-%m-%d %H:%M:%S %Z"),
        t.format("%Y-%m-%dT%H:%M:%SZ")
    )
}

fn short_time(t: Option<DateTime<Utc>>) -> String {
    t.map_or("-".into(), |t| {
        t.with_timezone(&Local).format("%Y-%m-%d %H:%M").to_string()
    })
}

fn print_status(s: &StatusReply) {
    println!(
        "Protected ports (jitd {}, on stop: {}, your role: {})",
        s.version, s.on_stop, s.your_role
    );
    let rows: Vec<Vec<String>> = s
        .ports
        .iter()
        .map(|p| {
            vec![
                p.port.to_string(),
                p.protocol.to_string(),
                p.allowed_sources.join(", "),
                jitd::duration::format(std::time::Duration::from_secs(p.max_duration_secs)),
                p.approved_last_7d.to_string(),
                short_time(p.last_access),
                p.last_user.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    print_table(
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
    );
    if !s.exempt_sources.is_empty() {
        println!("Exempt from the lockdown: {}", s.exempt_sources.join(", "));
    }
    if !s.interfaces.is_empty() {
        println!("Locked only on: {}", s.interfaces.join(", "));
    }
    let h = &s.health;
    println!(
        "Since start: {} approved, {} denied, {} failed; {} drift repair(s); {} audit write failure(s); {} connection(s) refused by the limit",
        h.requests_approved, h.requests_denied, h.requests_failed, h.drift_repairs, h.audit_write_failures, h.refused_connections
    );
    println!();
    if s.grants.is_empty() {
        println!("No active grants.");
        return;
    }
    println!("Active grants");
    let rows: Vec<Vec<String>> = s.grants.iter().map(grant_row).collect();
    print_table(
        &[
            "ID",
            "SOURCE",
            "PORT",
            "PROTO",
            "REQUESTER",
            "TIME LEFT",
            "JUSTIFICATION",
        ],
        &rows,
    );
}

fn grant_row(g: &GrantInfo) -> Vec<String> {
    vec![
        g.id.to_string(),
        g.source.clone(),
        g.port.to_string(),
        g.protocol.to_string(),
        g.requester.clone(),
        jitd::duration::format(std::time::Duration::from_secs(g.remaining_secs)),
        g.justification.clone().unwrap_or_default(),
    ]
}

fn print_audit(reply: &AuditReply) {
    let rows: Vec<Vec<String>> = reply
        .records
        .iter()
        .map(|r| {
            vec![
                r.time.with_timezone(&Local).format("%Y-%m-%d %H:%M:%S").to_string(),
                r.actor.clone(),
                enum_text(&r.action),
                enum_text(&r.outcome),
                r.ports.iter().map(u16::to_string).collect::<Vec<_>>().join(","),
                r.source.clone().unwrap_or_default(),
                r.grant_id.map(|g| g.to_string()).unwrap_or_default(),
                r.reason.clone().unwrap_or_default(),
            ]
        })
        .collect();
    print_table(
        &[
            "TIME", "ACTOR", "ACTION", "OUTCOME", "PORTS", "SOURCE", "GRANT", "REASON",
        ],
        &rows,
    );
}

fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row.clone());
    }
}
