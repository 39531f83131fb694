//! `jitctl`'s side of the two-person rule: waiting for the decision on a request that
//! waits for approval (polling the `pending` operation), and how requests waiting for
//! approval and decisions are shown.

use std::io::{self, Write};
use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, Local, Utc};

use crate::api::client::{call, ClientError};
use crate::api::protocol::{PendingInfo, PendingQuery, PendingStatus, Request};
use crate::approval::PendingState;
use crate::text::escape_for_terminal;

/// How often `jitctl request` asks whether its request was decided.
pub const POLL: Duration = Duration::from_secs(1);
/// How long after the request's time out `jitctl` goes on asking (jitd may be
/// restarting, or its timer a moment late) before it gives up.
pub const GRACE: Duration = Duration::from_secs(60);

/// Why waiting ended without a decision.
#[derive(Debug)]
pub enum NoDecision {
    /// jitd refused the question (the request is unknown, the caller may not ask).
    Refused(ClientError),
    /// No decision was seen by the time the request should have timed out, plus [`GRACE`].
    GaveUp(String),
}

/// The progress line `jitctl request` prints while it waits.
pub fn waiting_line(p: &PendingInfo) -> String {
    format!(
        "waiting for approval (request {}, times out {})...",
        p.id,
        p.times_out_at.with_timezone(&Local).format("%H:%M:%S")
    )
}

/// The line `jitctl request --no-wait` prints.
pub fn queued_line(p: &PendingInfo) -> String {
    format!(
        "pending: request {} for {} from {} waits for approval until {}; it opens for {} from the approval (jitctl status lists it)",
        p.id,
        ports_text(&p.ports),
        escape_for_terminal(&p.source),
        clock_time(p.times_out_at),
        crate::duration::format(Duration::from_secs(p.duration_secs)),
    )
}

/// Asks jitd every [`POLL`] where request `p` stands until it was decided (or timed
/// out); connection errors are retried (jitd restarting keeps the request), refusals
/// are not.
pub async fn wait(socket: &Path, p: &PendingInfo) -> Result<PendingStatus, NoDecision> {
    let give_up = tokio::time::Instant::now() + Duration::from_secs(p.remaining_secs) + GRACE;
    let query = Request::Pending(PendingQuery { id: p.id });
    loop {
        tokio::time::sleep(POLL).await;
        match call::<PendingStatus>(socket, &query).await {
            Ok(s) if s.state != PendingState::Pending => return Ok(s),
            Ok(_) => {}
            Err(e @ ClientError::Refused(_)) => return Err(NoDecision::Refused(e)),
            Err(e) if tokio::time::Instant::now() >= give_up => {
                return Err(NoDecision::GaveUp(format!(
                    "request {}: no decision seen, and jitd cannot be asked: {e}",
                    p.id
                )))
            }
            Err(_) => {}
        }
        if tokio::time::Instant::now() >= give_up {
            return Err(NoDecision::GaveUp(format!(
                "request {} is still pending after its time out ({}); see jitctl status",
                p.id,
                clock_time(p.times_out_at)
            )));
        }
    }
}

/// Why a decided request did not open anything, or `None` when it was approved.
pub fn refusal(s: &PendingStatus) -> Option<String> {
    let id = s.request.id;
    let by = s.decided_by.as_deref().unwrap_or("jitd");
    let why = s.reason.as_deref().unwrap_or("no reason given");
    match s.state {
        PendingState::Approved => None,
        PendingState::Pending => Some(format!("request {id} still waits for approval")),
        PendingState::Denied => Some(format!("request {id} was denied by {by}: {why}")),
        PendingState::Expired => Some(format!("request {id} was not approved in time: {why}")),
        PendingState::Closed => Some(format!("request {id} was closed by {by}'s approval: {why}")),
    }
}

/// A decision as `jitctl approve`, `deny` and a waiting `request` print it.
pub fn print_decision(out: &mut dyn Write, s: &PendingStatus) -> io::Result<()> {
    let r = &s.request;
    let by = s.decided_by.as_deref().unwrap_or("-");
    let head = match s.state {
        PendingState::Approved => "approved",
        PendingState::Denied => "denied",
        PendingState::Expired => "expired",
        PendingState::Closed => "closed",
        PendingState::Pending => "pending",
    };
    writeln!(
        out,
        "{head}: request {} of {} for {} from {} (by {})",
        r.id,
        escape_for_terminal(&r.requester),
        ports_text(&r.ports),
        escape_for_terminal(&r.source),
        escape_for_terminal(by)
    )?;
    print_grants(out, &s.grants, &s.superseded, clock_time)
}

/// The grants a request opened and those they replaced, one line each; `until` shows
/// a grant's end.
pub fn print_grants(
    out: &mut dyn Write,
    grants: &[crate::api::protocol::GrantInfo],
    superseded: &[crate::domain::GrantId],
    until: impl Fn(DateTime<Utc>) -> String,
) -> io::Result<()> {
    for g in grants {
        writeln!(
            out,
            "granted: id {} opens {}/{} for {} until {}",
            g.id,
            g.port,
            g.protocol,
            escape_for_terminal(&g.source),
            until(g.expires_at)
        )?;
    }
    for id in superseded {
        writeln!(out, "replaced: grant {id} (superseded by the new grant)")?;
    }
    Ok(())
}

/// The columns of the pending requests in `jitctl status`.
pub const HEADERS: [&str; 8] = [
    "REQUEST",
    "REQUESTER",
    "PORTS",
    "SOURCE",
    "DURATION",
    "ASKED AT",
    "TIMES OUT AT",
    "JUSTIFICATION",
];

/// One row of the pending requests in `jitctl status`.
pub fn row(p: &PendingInfo) -> Vec<String> {
    vec![
        p.id.to_string(),
        p.requester.clone(),
        p.ports.iter().map(u16::to_string).collect::<Vec<_>>().join(","),
        p.source.clone(),
        crate::duration::format(Duration::from_secs(p.duration_secs)),
        clock_time(p.asked_at),
        clock_time(p.times_out_at),
        p.justification.clone().unwrap_or_default(),
    ]
}

/// `port 22` or `ports 22,3389`.
fn ports_text(ports: &[u16]) -> String {
    let list = ports.iter().map(u16::to_string).collect::<Vec<_>>().join(",");
    match ports.len() {
        1 => format!("port {list}"),
        _ => format!("ports {list}"),
    }
}

/// A time as people read it on this host: `2026-11-25 14:20:05`.
fn clock_time(t: DateTime<Utc>) -> String {
    t.with_timezone(&Local).format("%Y-%m-%d %H:%M:%S").to_string()
}
