//! Recommendations: services listening beyond loopback that jitd does not protect,
//! each with the `[[ports]]` lines that would (pure). Management services (SSH on
//! any port, RDP, WinRM, VNC, Cockpit, Webmin, ...) make the host unhealthy, like
//! Azure Security Center's "management ports should be protected"; databases open to
//! the network are a warning (often on purpose).

use std::collections::BTreeMap;

use crate::domain::{Protocol, Transport};
use crate::health::catalog::{self, By, Kind, Service};
use crate::health::facts::Facts;
use crate::health::listeners::{Exposure, Listener};
use crate::health::report::{Check, Status};

/// The most recommendations one report makes (a bound on its size: any local user can
/// open listeners).
pub const MAX_RECOMMENDATIONS: usize = 100;

/// The recommendations, and every recommended entry together as one snippet.
pub fn recommend(f: &Facts) -> (Vec<Check>, Option<String>) {
    let Ok(listeners) = &f.listeners else {
        return (Vec::new(), None);
    };
    // one recommendation per port and service, whatever its addresses and transports
    let mut found: BTreeMap<u16, (&'static Service, By, Vec<&Listener>)> = BTreeMap::new();
    for l in listeners
        .iter()
        .filter(|l| l.exposure() != Exposure::Loopback && !protected(f, l))
    {
        if let Some((service, by)) = catalog::recognise(l) {
            found.entry(l.port).or_insert((service, by, Vec::new())).2.push(l);
        }
    }
    let mut checks = Vec::new();
    let mut entries = Vec::new();
    let more = found.len().saturating_sub(MAX_RECOMMENDATIONS);
    for (port, (service, by, ls)) in found.into_iter().take(MAX_RECOMMENDATIONS) {
        let protocol = protocol_of(&ls);
        let entry = catalog::port_entry(port, protocol, &label(service, &ls));
        checks.push(check(f, port, protocol, service, by, &ls, &entry));
        entries.push(entry);
    }
    if more > 0 {
        checks.push(Check::new(
            "recommend.more",
            Status::Fail,
            format!("and {more} more unprotected services (only the first {MAX_RECOMMENDATIONS} are listed)"),
        ));
    }
    if entries.is_empty() {
        return (checks, None);
    }
    if !f.policy_lists_ports {
        entries.insert(0, catalog::default_entries());
    }
    (checks, Some(entries.join("\n")))
}

fn protected(f: &Facts, l: &Listener) -> bool {
    f.ports
        .iter()
        .any(|(port, protocol)| *port == l.port && protocol.transports().contains(&l.transport))
}

fn protocol_of(ls: &[&Listener]) -> Protocol {
    let tcp = ls.iter().any(|l| l.transport == Transport::Tcp);
    let udp = ls.iter().any(|l| l.transport == Transport::Udp);
    match (tcp, udp) {
        (true, true) => Protocol::Any,
        (false, true) => Protocol::Udp,
        _ => Protocol::Tcp,
    }
}

/// `SSH (sshd)`, for the entry's comment.
fn label(service: &Service, ls: &[&Listener]) -> String {
    match ls.iter().flat_map(|l| l.processes.first()).next() {
        Some(p) => format!("{} ({})", service.name, p.name),
        None => service.name.to_string(),
    }
}

fn check(f: &Facts, port: u16, protocol: Protocol, service: &Service, by: By, ls: &[&Listener], entry: &str) -> Check {
    let endpoints: Vec<String> = ls.iter().map(|l| l.endpoint()).collect();
    let owner = ls.first().map(|l| l.owner()).unwrap_or_default();
    let id = format!("recommend.{port}/{protocol}");
    let mut detail = match service.kind {
        Kind::Management => {
            "a management service open to the network: management ports should be protected (opened just in time, for one source)".to_string()
        }
        Kind::Database => "a database reachable from the network; if only programs on this host use it, bind it to 127.0.0.1 instead; if remote clients need it, keep it open to them alone, or protect it with jitd".to_string(),
    };
    if by == By::Port {
        detail.push_str(&format!(
            " (recognised by its port: jitd cannot see which process listens, {owner})"
        ));
    }
    let mut fix = format!(
        "add these lines to {} and reload (systemctl reload jitd, or jitctl reload)",
        f.policy.display()
    );
    if !f.policy_lists_ports {
        fix.push_str("; the policy lists no [[ports]] yet, so jitd protects its defaults (22, 3389, 5985, 5986), and the first entry replaces them: the full snippet below (jitctl doctor's last lines) keeps them");
    }
    let status = match service.kind {
        Kind::Management => Status::Fail,
        Kind::Database => Status::Warn,
    };
    let mut c = Check::new(
        id,
        status,
        format!(
            "{} ({owner}) listens on {} and jitd does not protect it",
            service.name,
            endpoints.join(", ")
        ),
    )
    .detail(detail)
    .fix(fix);
    c.toml = Some(entry.to_string());
    c
}
