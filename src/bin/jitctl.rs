//! `jitctl`: asks jitd for just-in-time access, shows status and reads the audit log;
//! `jitctl knock` asks a host's jitd from another machine.

use std::io::{self, BufWriter, Write};
use std::process::ExitCode;

use clap::Parser;
use jitd::api::client::{call, ClientError};
use jitd::api::protocol::{
    ApproveRequest, AuditQuery, AuditReply, DenyRequest, GrantRequest, GrantedReply, PendingStatus, ReloadReply,
    Request, RevokeRequest, RevokedReply, StatusQuery, StatusReply,
};
use jitd::audit::chain::Verdict;
use jitd::audit::AuditFilter;
use jitd::cli::doctor;
use jitd::cli::jitctl::{AuditCheck, Cli, Command, Format};
use jitd::cli::{approvals, audit, replies, status};
use jitd::health::report::DoctorReport;
use jitd::text::{escape_for_terminal, show_stored};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    if matches!(cli.command, Command::Doctor) {
        return ExitCode::from(runtime.block_on(doctor(&cli.socket, cli.json)).code());
    }
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Refused(message)) => {
            say(&format!("jitctl: refused: {message}"));
            ExitCode::from(1)
        }
        Err(Failure::Usage(message)) => {
            say(&format!("jitctl: {message}"));
            ExitCode::from(2)
        }
        Err(Failure::NotOpened(message)) => {
            say(&format!("jitctl: {message}"));
            ExitCode::from(1)
        }
        // The reader went away (`jitctl audit | head -1`): what it wanted was printed.
        // Like ripgrep and the classic Unix filters (which die of SIGPIPE), stop quietly;
        // unlike them, exit 0, as ripgrep does, since nothing went wrong for the user.
        // SIGPIPE stays ignored (Rust's default) so that a daemon closing the socket is
        // an error jitctl reports, not a silent death.
        Err(Failure::Output(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(Failure::Output(e)) => {
            say(&format!("jitctl: cannot write the output: {e}"));
            ExitCode::from(2)
        }
    }
}

enum Failure {
    Refused(String),
    Usage(String),
    /// A knock was sent but the port did not open in time.
    NotOpened(String),
    /// Writing to stdout failed.
    Output(std::io::Error),
}

impl Failure {
    /// What went wrong, as one line.
    fn message(&self) -> String {
        match self {
            Failure::Refused(m) => format!("refused: {m}"),
            Failure::Usage(m) | Failure::NotOpened(m) => m.clone(),
            Failure::Output(e) => e.to_string(),
        }
    }
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Failure {
        match &e {
            ClientError::Refused(body) if !body.code.is_protocol_error() => {
                Failure::Refused(format!("{} ({})", body.message, body.code))
            }
            _ => Failure::Usage(e.to_string()),
        }
    }
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Failure {
        Failure::Output(e)
    }
}

/// One line on stderr, escaped once (messages from jitd can quote what a caller sent,
/// escaped already); a closed stderr is ignored rather than a panic.
fn say(line: &str) {
    let _ = writeln!(std::io::stderr(), "{}", show_stored(line));
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let socket = cli.socket.as_path();
    let json = cli.json;
    match cli.command {
        Command::Status => status_pages(socket, json).await,
        Command::Request {
            ports,
            source,
            duration,
            until,
            justification,
            no_wait,
        } => {
            let request = GrantRequest {
                ports,
                source: source.map_or_else(ssh_client_address, Ok)?,
                duration_secs: duration.map(|d| d.as_secs() + u64::from(d.subsec_nanos() > 0)),
                until,
                justification,
            };
            let granted: GrantedReply = call(socket, &Request::Request(request)).await?;
            granted_or_waiting(socket, json, &granted, no_wait).await
        }
        Command::Approve { id } => decide(socket, json, Request::Approve(ApproveRequest { id })).await,
        Command::Deny { id, reason } => decide(socket, json, Request::Deny(DenyRequest { id, reason })).await,
        Command::Revoke {
            id,
            source,
            port,
            terminate,
        } => {
            let request = RevokeRequest {
                id,
                source,
                port,
                terminate,
            };
            let revoked: RevokedReply = call(socket, &Request::Revoke(request)).await?;
            emit(json, &revoked, replies::revoked)
        }
        Command::Audit {
            check: Some(AuditCheck::Verify),
            ..
        } => verify(socket, json).await,
        Command::Audit {
            check: None,
            since,
            until,
            user,
            port,
            unused,
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
                    unused,
                },
                limit: limit.map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
                cursor,
            };
            let format = if json { Format::Json } else { format };
            audit_pages(socket, query, format).await
        }
        Command::Knock(args) => knock(&args, json).await,
        Command::Fleet(args) => fleet(&args, json).await,
        Command::Doctor => unreachable!("handled in main"),
        Command::Reload => {
            let reply: ReloadReply = call(socket, &Request::Reload).await?;
            emit(json, &reply, |out, r| {
                writeln!(
                    out,
                    "policy reloaded; {} grant(s) ended because the new policy no longer allows them",
                    r.ended.len()
                )
            })
        }
    }
}

/// Prints the grants of a request, or, when it waits for approval, waits for the
/// decision (unless `no_wait`).
async fn granted_or_waiting(
    socket: &std::path::Path,
    json: bool,
    granted: &GrantedReply,
    no_wait: bool,
) -> Result<(), Failure> {
    match &granted.pending {
        Some(pending) if !no_wait => await_decision(socket, pending, json).await,
        Some(pending) => emit(json, granted, |out, _| {
            writeln!(out, "{}", approvals::queued_line(pending))
        }),
        None => emit(json, granted, replies::granted),
    }
}

/// `jitctl approve` and `jitctl deny`: the decision as jitd took it.
async fn decide(socket: &std::path::Path, json: bool, request: Request) -> Result<(), Failure> {
    let decided: PendingStatus = call(socket, &request).await?;
    emit(json, &decided, approvals::print_decision)
}

/// Waits for the decision on a request that waits for approval, with a progress line on
/// stderr; exit 0 when approved, 1 when denied, timed out or closed.
async fn await_decision(
    socket: &std::path::Path,
    pending: &jitd::api::protocol::PendingInfo,
    json: bool,
) -> Result<(), Failure> {
    say(&format!("jitctl: {}", approvals::waiting_line(pending)));
    let decided = match approvals::wait(socket, pending).await {
        Ok(decided) => decided,
        Err(approvals::NoDecision::Refused(e)) => return Err(e.into()),
        Err(approvals::NoDecision::GaveUp(why)) => return Err(Failure::NotOpened(why)),
    };
    emit(json, &decided, approvals::print_decision)?;
    match approvals::refusal(&decided) {
        None => Ok(()),
        Some(why) => Err(Failure::Refused(why)),
    }
}

/// `jitctl knock`: the report on stdout (JSON or a line), exit 1 with the reason on
/// stderr when the port did not open in time.
async fn knock(args: &jitd::cli::jitctl::KnockArgs, json: bool) -> Result<(), Failure> {
    let report = jitd::cli::knock::run(args).await.map_err(Failure::Usage)?;
    emit(json, &report, |out, r| out.write_all(r.human().as_bytes()))?;
    match report.not_opened(args.wait_timeout) {
        Some(why) => Err(Failure::NotOpened(why)),
        None => Ok(()),
    }
}

/// `jitctl fleet`: the table (or JSON) on stdout; exit 1 when a host denied or did
/// not answer in time.
async fn fleet(args: &jitd::cli::jitctl::FleetArgs, json: bool) -> Result<(), Failure> {
    let (text, ok) = jitd::cli::fleet::run(args, json).await.map_err(Failure::Usage)?;
    to_stdout(|out| out.write_all(text.as_bytes()))?;
    match ok {
        true => Ok(()),
        false => Err(Failure::NotOpened(
            "not every selected host approved (see the table)".into(),
        )),
    }
}

/// `jitctl doctor`: asks jitd for its report and prints it; exit 0 healthy, 1
/// unhealthy (also when jitd is not running), 2 could not tell (see
/// [`jitd::cli::doctor`]).
async fn doctor(socket: &std::path::Path, json: bool) -> doctor::Verdict {
    let report: DoctorReport = match call(socket, &Request::Doctor).await {
        Ok(report) => report,
        Err(e) => match doctor::not_running(&e, socket) {
            Some(report) => report,
            None => {
                let why = Failure::from(e).message();
                say(&format!("jitctl: cannot tell whether this host is healthy: {why}"));
                if json {
                    let _ =
                        to_stdout(|out| replies::write_json(out, &serde_json::json!({"healthy": null, "error": why})));
                }
                return doctor::Verdict::CouldNotTell;
            }
        },
    };
    let printed = if json {
        to_stdout(|out| replies::write_json(out, &report))
    } else {
        to_stdout(|out| out.write_all(doctor::render(&report).as_bytes()))
    };
    match printed {
        Err(Failure::Output(e)) if e.kind() != io::ErrorKind::BrokenPipe => {
            say(&format!("jitctl: cannot write the output: {e}"));
            doctor::Verdict::CouldNotTell
        }
        _ => doctor::Verdict::of(&report),
    }
}

/// Prints `value` on stdout: as JSON for scripts, or with `human` for people.
fn emit<T: serde::Serialize>(
    json: bool,
    value: &T,
    human: impl Fn(&mut dyn Write, &T) -> io::Result<()>,
) -> Result<(), Failure> {
    if json {
        to_stdout(|out| replies::write_json(out, value))
    } else {
        to_stdout(|out| human(out, value))
    }
}

/// Runs `write` on a buffered stdout and flushes it; a failed write (a closed pipe)
/// becomes [`Failure::Output`].
fn to_stdout(write: impl FnOnce(&mut dyn Write) -> io::Result<()>) -> Result<(), Failure> {
    let mut out = BufWriter::new(io::stdout().lock());
    write(&mut out)?;
    out.flush()?;
    Ok(())
}

/// `text` on stdout as it is; nothing when it is empty.
fn print_text(text: &str) -> Result<(), Failure> {
    match text.is_empty() {
        true => Ok(()),
        false => to_stdout(|out| out.write_all(text.as_bytes())),
    }
}

/// `jitctl audit verify`: walks the chain; a break is exit status 1.
async fn verify(socket: &std::path::Path, json: bool) -> Result<(), Failure> {
    let verdict: Verdict = call(socket, &Request::AuditVerify).await?;
    if json {
        to_stdout(|out| replies::write_json(out, &verdict))?;
    }
    for note in &verdict.notes {
        say(&format!("jitctl: note: {note}"));
    }
    match &verdict.broken {
        None if json => Ok(()),
        None => to_stdout(|out| writeln!(out, "audit trail intact: {} record(s) chained", verdict.records)),
        Some(b) => Err(Failure::Refused(format!(
            "audit trail broken: the record at {}:{} {} ({} record(s) before it verified)",
            b.file.display(),
            b.line,
            b.problem,
            verdict.records
        ))),
    }
}

/// The audit records in the chosen format on stdout.
fn audit_page(reply: &AuditReply, format: Format) -> Result<(), Failure> {
    for w in &reply.warnings {
        say(&format!("jitctl: warning: {w}"));
    }
    match format {
        Format::Json => to_stdout(|out| replies::write_json(out, &reply.records)),
        Format::Table => to_stdout(|out| audit::table(out, &reply.records)),
        Format::Csv => to_stdout(|out| audit::csv(out, &reply.records)),
    }
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
    say(&format!(
        "jitctl: using your SSH client address {addr} as --source (from SSH_CONNECTION)"
    ));
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
        match format {
            Format::Json if one_page => {
                for w in &reply.warnings {
                    say(&format!("jitctl: warning: {w}"));
                }
                to_stdout(|out| replies::write_json(out, &reply))?
            }
            Format::Json => {
                for w in &reply.warnings {
                    say(&format!("jitctl: warning: {w}"));
                }
                print_text(&audit::json_items(&reply.records, first, reply.next_cursor.is_none()))?
            }
            Format::Csv if !first => {
                for w in &reply.warnings {
                    say(&format!("jitctl: warning: {w}"));
                }
                to_stdout(|out| audit::csv_rows(out, &reply.records))?
            }
            _ => audit_page(&reply, format)?,
        }
        first = false;
        match reply.next_cursor {
            Some(next) if !one_page => query.cursor = Some(next),
            Some(next) if format != Format::Json => {
                say(&format!(
                    "jitctl: more records: go on with --cursor {}",
                    escape_for_terminal(&next)
                ));
                return Ok(());
            }
            _ => return Ok(()),
        }
    }
}

/// How many grants jitctl asks for per `status` page.
const STATUS_PAGE: usize = 1000;

/// `jitctl status`: fetches the grants page by page and prints each page as it comes
/// (the header with the first), so neither jitd nor jitctl holds every grant at once.
/// JSON: one object, its `grants` array written across pages.
async fn status_pages(socket: &std::path::Path, json: bool) -> Result<(), Failure> {
    let mut query = StatusQuery {
        limit: Some(STATUS_PAGE),
        cursor: None,
    };
    let mut listed = 0;
    let mut columns = None;
    loop {
        let page: StatusReply = call(socket, &Request::Status(query.clone())).await?;
        let (first, last) = (query.cursor.is_none(), page.next_cursor.is_none());
        if json {
            print_text(&status::json_page(&page, first, listed, last))?;
        } else {
            to_stdout(|out| status::page(out, &page, first, &mut columns))?;
            if last && listed + page.grants.len() == 0 {
                to_stdout(|out| writeln!(out, "No active grants."))?;
            }
        }
        listed += page.grants.len();
        match page.next_cursor {
            Some(next) => query.cursor = Some(next),
            None => return Ok(()),
        }
    }
}
