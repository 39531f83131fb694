//! `jitctl`: asks jitd for just-in-time access, shows status and reads the audit log.

use std::path::PathBuf;
use std::process::ExitCode;

use chrono::{DateTime, Local, NaiveDate, Utc};
use clap::{Parser, Subcommand, ValueEnum};
use jitd::api::client::{call, ClientError};
use jitd::api::protocol::{
    AuditReply, GrantInfo, GrantRequest, GrantedReply, ReloadReply, Request, RevokeRequest, RevokedReply, StatusReply,
    PROTOCOL_ERROR_CODES,
};
use jitd::audit::{enum_text, AuditFilter};
use jitd::config::DEFAULT_SOCKET_PATH;

/// Ask jitd for just-in-time access to this host's management ports, see what is open,
/// and read the audit trail.
///
/// jitd knows who you are from the socket (your uid and groups); what you may do comes
/// from the [access] section of its policy.
#[derive(Debug, Parser)]
#[command(
    version,
    after_help = "Exit status: 0 done, 1 refused by jitd (the reason is printed), 2 usage or connection error."
)]
struct Cli {
    /// jitd's control socket.
    #[arg(long, global = true, value_name = "PATH", default_value = DEFAULT_SOCKET_PATH, env = "JITD_SOCKET")]
    socket: PathBuf,
    /// Print the result as JSON (for scripts) instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show the protected ports, the live grants, and recent use of each port.
    Status,
    /// Open ports for a source address or prefix, for a bounded time.
    #[command(
        after_help = "Examples:\n  jitctl request --port 22 --source 203.0.113.7 --duration 2h --justification \"ticket 4711\"\n  jitctl request --source 198.51.100.0/24 --until 2026-12-01T17:00:00Z\n  jitctl request --duration 30m        # inside an SSH session: your SSH client's address, every protected port"
    )]
    Request {
        /// Port to open (repeat for several); default: every protected port.
        #[arg(short, long = "port", value_name = "PORT")]
        ports: Vec<u16>,
        /// Address or CIDR prefix, IPv4 or IPv6; default inside SSH: the client address from SSH_CONNECTION.
        #[arg(short, long)]
        source: Option<String>,
        /// How long: "90s", "2h", "1h30m" or ISO 8601 "PT2H".
        #[arg(short, long, value_parser = parse_duration, conflicts_with = "until", required_unless_present = "until")]
        duration: Option<std::time::Duration>,
        /// Until when: RFC 3339, e.g. 2026-12-01T17:00:00Z.
        #[arg(short, long, value_parser = parse_time)]
        until: Option<DateTime<Utc>>,
        /// Why you need access (recorded in the audit log).
        #[arg(short, long)]
        justification: Option<String>,
    },
    /// End grants early: by id, or every grant of a source (optionally one port).
    Revoke {
        /// The grant id (from `jitctl status`).
        #[arg(required_unless_present = "source", conflicts_with = "source")]
        id: Option<u64>,
        /// Revoke the grants of this address or prefix.
        #[arg(short, long)]
        source: Option<String>,
        /// With --source: only the grant on this port.
        #[arg(short, long, requires = "source")]
        port: Option<u16>,
    },
    /// Read the audit log: every approval, denial (with the reason), expiry and revocation.
    #[command(args_conflicts_with_subcommands = true)]
    Audit {
        #[command(subcommand)]
        check: Option<AuditCheck>,
        /// From: a duration back from now ("7d", "12h") or a time (RFC 3339 or YYYY-MM-DD).
        #[arg(long, value_parser = parse_since)]
        since: Option<DateTime<Utc>>,
        /// Up to: a time (RFC 3339 or YYYY-MM-DD).
        #[arg(long, value_parser = parse_time)]
        until: Option<DateTime<Utc>>,
        /// Only records of this user (name or uid).
        #[arg(long)]
        user: Option<String>,
        /// Only records concerning this port.
        #[arg(long)]
        port: Option<u16>,
        /// Output format; --json is the same as --format json.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Make jitd re-read its policy (admins only); an invalid policy changes nothing.
    Reload,
}

#[derive(Debug, Subcommand)]
enum AuditCheck {
    /// Walk the audit log's hash chain; exit 1 naming the first record that was
    /// changed, removed or reordered.
    Verify,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    /// Aligned columns for people.
    Table,
    /// The records as a JSON array.
    Json,
    /// Comma-separated values with a header row (for spreadsheets).
    Csv,
}

fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    jitd::duration::parse(text)
}

fn parse_time(text: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Ok(t.with_timezone(&Utc));
    }
    if let Ok(d) = NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return Ok(d.and_hms_opt(0, 0, 0).expect("midnight exists").and_utc());
    }
    Err("not a time; write RFC 3339 (2026-12-01T17:00:00Z) or a date (2026-12-01)".into())
}

fn parse_since(text: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(d) = jitd::duration::parse(text) {
        let back = chrono::Duration::from_std(d).map_err(|e| e.to_string())?;
        return Ok(Utc::now() - back);
    }
    parse_time(text).map_err(|_| "not a duration (7d, 12h) or a time (RFC 3339 or YYYY-MM-DD)".into())
}

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
        } => {
            let reply: AuditReply = call(
                socket,
                &Request::Audit(AuditFilter {
                    since,
                    until,
                    user,
                    port,
                }),
            )
            .await?;
            for w in &reply.warnings {
                eprintln!("jitctl: warning: {w}");
            }
            match if cli.json { Format::Json } else { format } {
                Format::Json => print_json(&reply.records),
                Format::Csv => jitd::audit::write_csv(&reply.records, std::io::stdout().lock())
                    .map_err(|e| Failure::Usage(format!("writing CSV: {e}")))?,
                Format::Table => print_audit(&reply),
            }
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
