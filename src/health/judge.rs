//! The doctor's judgement: facts in, checks out (pure). Each check says what was
//! found, why it matters and what to do; a FAIL makes the host unhealthy. docs/doctor.md
//! describes every check.

use std::time::Duration;

use crate::domain::{Protocol, Transport};
use crate::firewall::rules::TABLE;
use crate::health::facts::{DriftOutcome, Facts, TableState};
use crate::health::listeners::{Exposure, Listener};
use crate::health::report::{Check, Status};
use crate::health::ruleset::{self, ChainVerdict, Probe};

/// A repair this recent is worth a warning.
const RECENT_REPAIR: Duration = Duration::from_secs(3600);
/// Repairs in a row from which another process is taken to be fighting jitd.
const CONTESTED: u32 = 5;
/// The most listeners a report lists.
const MAX_LISTED: usize = 1000;

/// Every check, in order: jitd, its table, the drift monitor, the audit log, each
/// protected port, then recommendations and notes; the exposed listeners; and every
/// recommended `[[ports]]` entry together.
pub fn judge(f: &Facts) -> (Vec<Check>, Vec<Listener>, Option<String>) {
    let mut checks = vec![
        Check::new(
            "jitd",
            Status::Ok,
            format!("jitd {} is running (policy {})", f.version, f.policy.display()),
        ),
        table(f),
        drift(f),
    ];
    checks.extend(super::judge_audit::audit(&f.audit));
    for (port, protocol) in &f.ports {
        checks.extend(port_checks(f, *port, *protocol));
    }
    let (recommended, toml) = super::recommend::recommend(f);
    checks.extend(recommended);
    checks.extend(notes(f));
    let exposed = f
        .listeners
        .as_ref()
        .map(|all| {
            all.iter()
                .filter(|l| l.exposure() != Exposure::Loopback)
                .take(MAX_LISTED)
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    (checks, exposed, toml)
}

fn table(f: &Facts) -> Check {
    let ports: Vec<String> = f.ports.iter().map(|(p, proto)| format!("{p}/{proto}")).collect();
    match &f.table {
        TableState::Matches => Check::new(
            "table",
            Status::Ok,
            format!("table inet {TABLE} is in the kernel and locks {}", ports.join(", ")),
        ),
        TableState::Changing => Check::new("table", Status::Ok, format!("table inet {TABLE} is being changed by jitd right now")),
        TableState::Missing => Check::new("table", Status::Fail, format!("table inet {TABLE} is not in the kernel"))
            .detail("the protected ports are open to everyone until jitd puts it back")
            .fix("jitd's drift monitor restores it within seconds; if it keeps disappearing, find what flushes the ruleset (nft monitor, `nftables.service` restarts)"),
        TableState::Differs => Check::new(
            "table",
            Status::Fail,
            format!("table inet {TABLE} differs from what jitd applied (its chain, rules, locked or exempt sets were changed)"),
        )
        .fix("jitd's drift monitor repairs it within seconds; if this persists, another process keeps changing it (see the drift check)"),
        TableState::Unreadable(e) => Check::new("table", Status::Warn, format!("table inet {TABLE} could not be read: {e}")),
    }
}

fn drift(f: &Facts) -> Check {
    let d = &f.drift;
    let ago = |t: Duration| crate::duration::format(Duration::from_secs(t.as_secs()));
    if d.repairs_in_a_row >= CONTESTED {
        return Check::new(
            "drift",
            Status::Fail,
            format!(
                "another process keeps changing table inet {TABLE}: {} repairs in a row",
                d.repairs_in_a_row
            ),
        )
        .detail(
            d.last_repair
                .as_ref()
                .map_or(String::new(), |(_, what)| format!("last found: {what}")),
        )
        .fix("find it with `nft monitor` (each change names its process) and stop it from touching table inet jitd");
    }
    let check = liveness(d);
    match (&d.last_repair, check.status) {
        (Some((since, what)), Status::Ok) if *since < RECENT_REPAIR => Check::new(
            "drift",
            Status::Warn,
            format!("jitd repaired its table {} ago: {what}", ago(*since)),
        )
        .detail("someone or something changed table inet jitd; jitd put it back (audited as `repair`)")
        .fix("see who in the audit log (jitctl audit --since 1h) and the process named there"),
        _ => check,
    }
}

/// Whether the drift monitor keeps checking, and its last check's outcome.
fn liveness(d: &crate::health::facts::DriftState) -> Check {
    let ago = |t: Duration| crate::duration::format(Duration::from_secs(t.as_secs()));
    match &d.last_check {
        None if d.uptime <= d.max_quiet => Check::new("drift", Status::Ok, "the drift monitor is starting"),
        None => Check::new(
            "drift",
            Status::Fail,
            format!(
                "the drift monitor has not checked the table in the {} since jitd started",
                ago(d.uptime)
            ),
        ),
        Some((since, _)) if *since > d.max_quiet => Check::new(
            "drift",
            Status::Fail,
            format!(
                "the drift monitor has not checked the table for {} (it checks every few seconds)",
                ago(*since)
            ),
        )
        .fix("restart jitd (systemctl restart jitd) and report the bug with jitd's log"),
        Some((_, DriftOutcome::Failed(what))) => Check::new(
            "drift",
            Status::Fail,
            format!("the last drift check could not repair the table: {what}"),
        )
        .fix("see jitd's log (journalctl -u jitd) for nftables' error"),
        Some((since, _)) => Check::new(
            "drift",
            Status::Ok,
            format!("the drift monitor is alive (last check {} ago)", ago(*since)),
        ),
    }
}

/// The checks of one protected port: does anything listen on it, and would a grant let
/// a connection through.
fn port_checks(f: &Facts, port: u16, protocol: Protocol) -> Vec<Check> {
    let name = format!("{port}/{protocol}");
    let Ok(listeners) = &f.listeners else {
        return Vec::new(); // said once, in the notes
    };
    let on_port: Vec<&Listener> = listeners
        .iter()
        .filter(|l| l.port == port && protocol.transports().contains(&l.transport))
        .collect();
    let mut checks = vec![listening(&name, &on_port)];
    let transports: Vec<Transport> = match on_port.iter().map(|l| l.transport).collect::<Vec<_>>() {
        found if found.is_empty() => protocol.transports().to_vec(),
        mut found => {
            found.sort();
            found.dedup();
            found
        }
    };
    let (mut v4, mut v6) = f.families;
    let exposed: Vec<&&Listener> = on_port.iter().filter(|l| l.exposure() != Exposure::Loopback).collect();
    if !exposed.is_empty() {
        v4 &= exposed.iter().any(|l| l.families().0);
        v6 &= exposed.iter().any(|l| l.families().1);
    }
    if let Ok(rs) = &f.ruleset {
        for transport in transports {
            let probes: Vec<Probe> = [(v4, false), (v6, true)]
                .into_iter()
                .filter(|(on, _)| *on)
                .map(|(_, is_v6)| Probe {
                    v6: is_v6,
                    transport,
                    port,
                })
                .collect();
            checks.push(reachable(rs, port, transport, &probes));
        }
    }
    checks
}

fn listening(name: &str, on_port: &[&Listener]) -> Check {
    let id = format!("port.{name}.listening");
    let exposed: Vec<&&Listener> = on_port.iter().filter(|l| l.exposure() != Exposure::Loopback).collect();
    if let Some(l) = exposed.first() {
        return Check::new(
            id,
            Status::Ok,
            format!("{name}: {} listens on {}", l.owner(), l.endpoint()),
        );
    }
    match on_port.first() {
        Some(l) => Check::new(
            id,
            Status::Warn,
            format!("{name}: listens on loopback only ({})", l.endpoint()),
        )
        .detail("a grant opens the port to a remote source, but nothing answers there but on the host itself"),
        None => Check::new(
            id,
            Status::Warn,
            format!("{name}: nothing listens on this protected port"),
        )
        .detail("a grant would open a port no service answers on")
        .fix("start the service, or remove the port from jitd.toml if it is not used"),
    }
}

/// Would a grant let a new connection through, for each family?
fn reachable(rs: &ruleset::Ruleset, port: u16, transport: Transport, probes: &[Probe]) -> Check {
    let id = format!("port.{port}/{}.reachable", transport.name());
    let Some(first) = probes.first() else {
        return Check::new(
            id,
            Status::Ok,
            "no address others can reach this host on (only loopback or link-local): nothing to judge",
        );
    };
    let mut found: Vec<(Probe, ChainVerdict)> = Vec::new();
    for probe in probes {
        found.extend(ruleset::judge(rs, probe).into_iter().map(|v| (*probe, v)));
    }
    let Some((probe, worst)) = found.iter().min_by_key(|(_, v)| std::cmp::Reverse(severity(v))) else {
        let families: Vec<&str> = probes.iter().map(|p| if p.v6 { "IPv6" } else { "IPv4" }).collect();
        return Check::new(
            id,
            Status::Ok,
            format!(
                "{}/{}: nothing else in the ruleset stops a granted connection ({})",
                first.port,
                first.transport.name(),
                families.join(", ")
            ),
        );
    };
    let at = match worst {
        ChainVerdict::Blocked { at } | ChainVerdict::Restricted { at, .. } | ChainVerdict::Forwarded { at, .. } => {
            rs.written_by(&at.family, &at.table)
        }
        ChainVerdict::Unknown { .. } => "nft",
    };
    let mut check = super::reach_text::explain(id, probe, worst, at);
    if found.len() > 1 {
        let others: Vec<String> = found
            .iter()
            .filter(|(p, v)| !(p == probe && v == worst))
            .map(|(p, v)| super::reach_text::one_line(p, v))
            .collect();
        let detail = check.detail.take().unwrap_or_default();
        check.detail = Some(format!("{detail}\nalso: {}", others.join("; ")));
    }
    check
}

fn severity(v: &ChainVerdict) -> u8 {
    match v {
        ChainVerdict::Blocked { .. } | ChainVerdict::Forwarded { always: true, .. } => 3,
        ChainVerdict::Restricted { .. } | ChainVerdict::Forwarded { .. } => 2,
        ChainVerdict::Unknown { .. } => 1,
    }
}

fn notes(f: &Facts) -> Vec<Check> {
    let mut notes = Vec::new();
    if let Err(e) = &f.ruleset {
        notes.push(
            Check::new(
                "ruleset",
                Status::Warn,
                format!("the nftables ruleset could not be read: {e}"),
            )
            .detail("so the doctor cannot tell whether another table drops the protected ports"),
        );
    }
    if let Err(e) = &f.listeners {
        notes.push(Check::new(
            "listeners",
            Status::Warn,
            format!("the listening sockets could not be read: {e}"),
        ));
    }
    let left = &f.listeners_left_out;
    if left.sockets > 0 {
        let owners: Vec<String> = left.owners.iter().map(|u| format!("uid {u}")).collect();
        notes.push(
            Check::new(
                "listeners.left_out",
                Status::Fail,
                format!(
                    "{} listening sockets were left unread, owned by {}: the doctor cannot vouch for them",
                    left.sockets,
                    owners.join(", ")
                ),
            )
            .detail(format!(
                "the doctor reads at most {} sockets per owner and {} in all (loopback sockets on unprotected ports are not read at all), so that no one's sockets hide another's; a service among those left out would go unseen",
                crate::health::listeners::PER_OWNER,
                crate::health::listeners::MAX_SOCKETS
            ))
            .fix("see whose they are and why with `ss -lnptu` (as root); close them, or stop their owner"),
        );
    }
    if !f.legacy_iptables.is_empty() {
        notes.push(
            Check::new(
                "iptables-legacy",
                Status::Warn,
                format!("legacy iptables tables are in use ({})", f.legacy_iptables.join(", ")),
            )
            .detail("their rules run beside nftables and may drop the protected ports; the doctor cannot see them")
            .fix("list them with `iptables-legacy -S` and `ip6tables-legacy -S`"),
        );
    }
    notes
}
