//! How `jitctl` prints jitd's replies: JSON for scripts (hidden characters escaped),
//! lines for people.

use std::io::{self, Write};

use crate::api::protocol::{GrantedReply, RevokedReply};
use crate::cli::approvals;
use crate::cli::status::both_times;
use crate::text::{escape_for_terminal, escape_json_output};

/// `value` as pretty JSON, with hidden characters (U+202E, C1 controls, ...) that
/// serde_json leaves raw written as `\uXXXX`: the same JSON to a parser, harmless
/// on a terminal.
pub fn write_json(out: &mut dyn Write, value: &impl serde::Serialize) -> io::Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(io::Error::other)?;
    writeln!(out, "{}", escape_json_output(&text))
}

/// The grants a request opened (and those it replaced), for people.
pub fn granted(out: &mut dyn Write, granted: &GrantedReply) -> io::Result<()> {
    approvals::print_grants(out, &granted.grants, &granted.superseded, both_times)
}

/// The grants a revoke closed and the sessions it cut, for people.
pub fn revoked(out: &mut dyn Write, revoked: &RevokedReply) -> io::Result<()> {
    for g in &revoked.revoked {
        writeln!(
            out,
            "revoked: id {} closed {}/{} for {}",
            g.id,
            g.port,
            g.protocol,
            escape_for_terminal(&g.source)
        )?;
    }
    for session in &revoked.terminated {
        writeln!(out, "terminated: {}", escape_for_terminal(session))?;
    }
    Ok(())
}
