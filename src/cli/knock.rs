//! `jitctl knock`: ask a host's jitd from anywhere, with one UDP packet signed by the
//! user's SSH key (docs/remote.md). The steps, each in its own module:
//!
//! 1. [`target`]: `HOST[:PORT]`; [`hosts`]: the per-host defaults file;
//!    [`plan`]: the command line over those defaults, and the canonical request
//!    (checked by the same parser jitd uses).
//! 2. [`sign`]: the key (`--key`, the hosts file, ssh-agent's first key, `~/.ssh/id_*`)
//!    and the signature, made by `ssh-keygen -Y sign`.
//! 3. [`net`]: resolve, send one datagram, wait for a TCP port to open (jitd never
//!    answers a knock).
//! 4. [`report`]: what the user is told.

pub mod agent;
pub mod hosts;
pub mod net;
pub mod plan;
pub mod ports;
pub mod report;
pub mod sign;
pub mod target;

use std::path::{Path, PathBuf};
use std::time::Instant;

use chrono::Utc;

use report::Report;

use crate::cli::jitctl::KnockArgs;
use crate::remote::packet;

/// Knocks as `args` say. `Err`: a usage or local error (nothing was sent, or sending
/// failed), for exit status 2. A port that did not open is in the report
/// ([`Report::not_opened`]).
pub async fn run(args: &KnockArgs) -> Result<Report, String> {
    let home = std::env::var_os("HOME").filter(|h| !h.is_empty()).map(PathBuf::from);
    let target = target::parse(&args.host)?;
    let file = hosts_file(home.as_deref())?;
    let settings = file.as_ref().map(|f| (f.path.as_path(), f.settings_for(&target.host)));
    let plan = plan::plan(args, settings)?;
    let agent_keys = match plan.key {
        Some(_) => Vec::new(),
        None => sign::agent_keys(std::env::var_os("SSH_AUTH_SOCK").as_deref()),
    };
    let listing = sign::listing(&agent_keys);
    let key = sign::choose(plan.key.clone(), listing.as_deref(), home.as_deref(), Path::exists)?;
    let addrs = match args.dry_run {
        true => Vec::new(),
        false => net::resolve(&plan.host, plan.knock_port, plan.family).await?,
    };
    let dir = sign::PrivateDir::new(sign::random16()?)?;
    let request = plan::request(&plan, Utc::now(), sign::random16()?)?;
    let text = request.encode();
    let signing = Instant::now();
    let armoured = sign::sign_with(&text, &key, &agent_keys, &dir, crate::remote::NAMESPACE)?;
    let sign_ms = u64::try_from(signing.elapsed().as_millis()).unwrap_or(u64::MAX);
    let bytes = packet::frame(&text, &armoured)?;
    let mut report = Report::new(&plan, &request, key.describe(), sign::fingerprint(&armoured));
    report.sign_ms = sign_ms;
    report.packet_bytes = bytes.len();
    if args.dry_run {
        return Ok(report);
    }
    let sent = Instant::now();
    let to = net::send(&bytes, &addrs)?;
    report.sent(to, Utc::now());
    if let Some((port, limit)) = plan.wait {
        let waited = net::wait_open(std::net::SocketAddr::new(to.ip(), port), sent, limit).await;
        report.waited(port, &waited);
    }
    Ok(report)
}

/// The hosts file, if there is one where XDG says.
fn hosts_file(home: Option<&Path>) -> Result<Option<hosts::HostsFile>, String> {
    let xdg = std::env::var_os("XDG_CONFIG_HOME").map(PathBuf::from);
    match hosts::default_path(xdg.as_deref(), home) {
        Some(path) => hosts::load(&path, home),
        None => Ok(None),
    }
}
