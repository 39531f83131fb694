//! Read-only questions: status, audit queries, audit verification. They take the state
//! lock only to copy what they show, and read the audit files on blocking threads.

use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use tokio::time::Instant;

use super::Daemon;
use crate::api::protocol::{
    AuditQuery, AuditReply, GrantInfo, PendingInfo, PortStatus, Reply, StatusCursor, StatusQuery, StatusReply,
    MAX_STATUS_LIMIT,
};
use crate::approval::PendingRequest;
use crate::audit::{self, Outcome};
use crate::config::AllowedSources;
use crate::domain::{format_prefix, Caller, ErrorCode};
use crate::firewall::Firewall;
use crate::grants::Grant;
use crate::policy::{self, Role};

impl<F: Firewall> Daemon<F> {
    /// The header (ports, policy, health, the clock) and one page of the live grants,
    /// in id order after `q.cursor`, their connections counted up to now: the kernel's
    /// counters of the page's elements are read first ([`Daemon::count_page`]). A page
    /// is built under the state lock in time proportional to its size (the book is
    /// ordered by id), so a reply's size and the time the lock is held are bounded by
    /// [`MAX_STATUS_LIMIT`], however many grants there are.
    pub(super) async fn status(&self, caller: &Caller, q: &StatusQuery) -> Result<StatusReply, Reply> {
        let counted = self.count_page(caller, q).await?;
        let mut reply = self.status_page(caller, q)?;
        if counted.is_some() {
            reply.connections_counted_at = counted;
        }
        Ok(reply)
    }

    /// Reads the counters of the elements of the grants on the page `q` asks for, and
    /// credits them ([`super::State::credit_elements`]): a grant used a moment ago shows
    /// it. `Ok(Some(when))` when read; `Ok(None)` when there was nothing to read, or the
    /// kernel could not be read (the page then shows the last periodic reading).
    async fn count_page(&self, caller: &Caller, q: &StatusQuery) -> Result<Option<DateTime<Utc>>, Reply> {
        let (keys, settled) = {
            let st = self.lock();
            policy::require_role(&st.config.access, caller, Role::Viewer, "read the status")
                .map_err(|d| Reply::error(d.code, d.message))?;
            let (after, limit) = page_bounds(q)?;
            let page: Vec<&Grant> = st
                .book
                .iter_after(after)
                .take_while(|g| g.id <= st.recorded)
                .take(limit)
                .collect();
            (st.book.element_keys_of(&page), st.settled)
        };
        if keys.is_empty() {
            return Ok(None);
        }
        let read_at = Utc::now();
        match self.firewall.read_counts(keys.clone()).await {
            Ok(counts) => {
                self.lock().credit_elements(&keys, counts, settled);
                Ok(Some(read_at))
            }
            Err(e) => {
                tracing::warn!("status: cannot read the counters of the grants shown ({e})");
                Ok(None)
            }
        }
    }

    /// The reply of [`Daemon::status`], from the ledger as it stands.
    fn status_page(&self, caller: &Caller, q: &StatusQuery) -> Result<StatusReply, Reply> {
        let mut st = self.lock();
        let role = policy::require_role(&st.config.access, caller, Role::Viewer, "read the status")
            .map_err(|d| Reply::error(d.code, d.message))?;
        let (after, limit) = page_bounds(q)?;
        // one instant and one wall-clock reading for the whole page: every expires_at
        // is that `now` plus the time left by the monotonic clock
        let now = Instant::now();
        let wall = Utc::now();
        let ports = port_statuses(&mut st, wall);
        let book = &st.book;
        let mut grants: Vec<GrantInfo> = book
            .iter_after(after)
            .take_while(|g| g.id <= st.recorded)
            .take(limit)
            .map(|g| {
                let mut info = grant_info_at(g, book.remaining(g.id, now).unwrap_or_default(), wall);
                info.connections = st.ledger.count(g.id);
                info
            })
            .collect();
        grants.shrink_to_fit();
        let pending = st
            .pending
            .iter()
            .filter(|(r, _)| r.id <= st.recorded)
            .map(|(r, deadline)| pending_info(r, deadline.saturating_duration_since(now), wall))
            .collect();
        let next_cursor = (grants.len() == limit).then(|| StatusCursor(grants[limit - 1].id).encode());
        let config = &st.config;
        Ok(StatusReply {
            version: env!("CARGO_PKG_VERSION").into(),
            ports,
            grants,
            next_cursor,
            connections_counted_at: st.ledger.counted_at(),
            clock: self.clock.status(wall),
            exempt_sources: config.lockdown.exempt_sources.iter().map(format_prefix).collect(),
            interfaces: config.lockdown.interfaces.clone(),
            on_stop: config.on_stop,
            your_role: role,
            health: health(),
            doctor: self.health.summary(),
            pending,
            approver: crate::approval::may_approve(&config.access, caller),
        })
    }

    fn viewer_dir(&self, caller: &Caller, what: &str) -> Result<std::path::PathBuf, Reply> {
        let st = self.lock();
        policy::require_role(&st.config.access, caller, Role::Viewer, what)
            .map_err(|d| Reply::error(d.code, d.message))?;
        Ok(st.config.state_dir.clone())
    }

    pub(super) async fn audit_verify(&self, caller: &Caller) -> Result<audit::chain::Verdict, Reply> {
        let dir = self.viewer_dir(caller, "verify the audit log")?;
        tokio::task::spawn_blocking(move || audit::chain::verify_dir(&dir))
            .await
            .map_err(|e| Reply::error(ErrorCode::Internal, e.to_string()))?
            .map_err(|e| Reply::error(ErrorCode::Internal, format!("cannot read the audit log: {e}")))
    }

    pub(super) async fn audit_query(&self, caller: &Caller, q: AuditQuery) -> Result<AuditReply, Reply> {
        use audit::query::{self as aq, Cursor};
        static RUNNING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(aq::MAX_CONCURRENT);
        let path = self.viewer_dir(caller, "read the audit log")?;
        let cursor = q.cursor.as_deref().map(Cursor::parse).transpose();
        let cursor = cursor.map_err(|e| Reply::error(ErrorCode::InvalidArgument, e))?;
        if q.limit == Some(0) {
            return Err(Reply::error(
                ErrorCode::InvalidArgument,
                "limit: must be at least 1, got 0",
            ));
        }
        let permit = RUNNING.try_acquire().map_err(|_| {
            Reply::error(
                ErrorCode::Busy,
                format!("{} audit queries are running; try again shortly", aq::MAX_CONCURRENT),
            )
        })?;
        let limit = q.limit.unwrap_or(aq::MAX_LIMIT);
        let page = tokio::task::spawn_blocking(move || {
            let _permit = permit; // held until the reading ends, even if the client left
            aq::query(&path, &q.filter, cursor.as_ref(), limit)
        })
        .await
        .map_err(|e| Reply::error(ErrorCode::Internal, e.to_string()))?
        .map_err(|e| Reply::error(ErrorCode::Internal, format!("cannot read the audit log: {e}")))?;
        Ok(AuditReply {
            records: page.records,
            warnings: page.warnings,
            next_cursor: page.next.map(|c| c.encode()),
        })
    }
}

/// Where the page `q` starts (after which grant id) and how many grants it holds.
fn page_bounds(q: &StatusQuery) -> Result<(Option<crate::domain::GrantId>, usize), Reply> {
    let after = q.cursor.as_deref().map(StatusCursor::parse).transpose();
    let after = after.map_err(|e| Reply::error(ErrorCode::InvalidArgument, e))?;
    let limit = match q.limit {
        Some(0) => {
            return Err(Reply::error(
                ErrorCode::InvalidArgument,
                "limit: must be at least 1, got 0",
            ))
        }
        Some(n) => n.min(MAX_STATUS_LIMIT),
        None => MAX_STATUS_LIMIT,
    };
    Ok((after.map(|c| c.0), limit))
}

/// The protected ports and their use in the last [`super::USAGE_WINDOW`] (older
/// approvals are forgotten on the way).
fn port_statuses(st: &mut super::State, wall: DateTime<Utc>) -> Vec<PortStatus> {
    let super::State { config, usage, .. } = st;
    config
        .ports
        .iter()
        .map(|p| {
            let u = usage.entry(p.port).or_default();
            while u.approvals.front().is_some_and(|t| *t < wall - super::USAGE_WINDOW) {
                u.approvals.pop_front();
            }
            PortStatus {
                port: p.port,
                protocol: p.protocol,
                allowed_sources: match &p.allowed_sources {
                    AllowedSources::Any => vec!["any".into()],
                    AllowedSources::Prefixes(list) => list.iter().map(format_prefix).collect(),
                },
                max_duration_secs: p.max_duration.as_secs(),
                approved_last_7d: u.approvals.len() as u64,
                last_access: u.last_access,
                last_user: u.last_user.clone(),
            }
        })
        .collect()
}

/// A grant as replies show it, at wall-clock time `wall`: its end is `wall` plus the
/// time it has left by the monotonic clock (whole seconds, rounded up), so it is in
/// jitd's current frame whatever the wall clock did since the grant began.
pub(super) fn grant_info_at(g: &Grant, remaining: Duration, wall: DateTime<Utc>) -> GrantInfo {
    let remaining_secs = remaining.as_secs() + u64::from(remaining.subsec_nanos() > 0);
    let left = TimeDelta::try_seconds(i64::try_from(remaining_secs).unwrap_or(i64::MAX));
    GrantInfo {
        id: g.id,
        source: format_prefix(&g.source),
        port: g.port,
        protocol: g.protocol,
        requester: g.requester.clone(),
        justification: g.justification.clone(),
        granted_at: g.granted_at,
        expires_at: left.and_then(|l| wall.checked_add_signed(l)).unwrap_or(g.expires_at),
        remaining_secs,
        connections: None,
    }
}

/// The counters `status` shows, from the metrics.
fn health() -> crate::api::protocol::Health {
    let m = crate::metrics::metrics();
    crate::api::protocol::Health {
        requests_approved: m.requests_with(Outcome::Approved),
        requests_denied: m.requests_with(Outcome::Denied),
        requests_failed: m.requests_with(Outcome::Failed),
        drift_repairs: m.drift_repairs.get(),
        audit_write_failures: m.audit_write_failures.get(),
        refused_connections: m.refused_connections.get(),
    }
}

/// A pending request as replies show it, at wall-clock time `wall` with `left` to wait.
pub(super) fn pending_info(r: &PendingRequest, left: Duration, wall: DateTime<Utc>) -> PendingInfo {
    let remaining_secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
    let ahead = TimeDelta::try_seconds(i64::try_from(remaining_secs).unwrap_or(i64::MAX));
    PendingInfo {
        id: r.id,
        requester: r.requester.name.clone(),
        ports: r.ports.clone(),
        source: format_prefix(&r.source),
        duration_secs: r.duration_secs,
        justification: r.justification.clone(),
        asked_at: r.asked_at,
        times_out_at: ahead.and_then(|a| wall.checked_add_signed(a)).unwrap_or(r.times_out_at),
        remaining_secs,
    }
}
