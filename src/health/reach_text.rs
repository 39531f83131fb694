//! What a ruleset verdict means for a protected port, in words, with the fix for the
//! firewall that wrote the rule: ufw, firewalld, Docker, or plain nftables (pure).

use crate::health::report::{Check, Status};
use crate::health::ruleset::{ChainVerdict, Place, Probe};

/// Why another table's drop defeats a grant.
const SEMANTICS: &str = "every base chain on the hook sees the packet, whatever its table; an accept (jitd's for a grant) ends only its own chain, and a drop or reject in any chain ends the packet";

/// The check for the worst verdict found for a port; `tool` is what wrote the table
/// the verdict is from ([`crate::health::ruleset::Ruleset::written_by`]).
pub fn explain(id: String, probe: &Probe, verdict: &ChainVerdict, tool: &str) -> Check {
    let what = probe.describe();
    match verdict {
        ChainVerdict::Blocked { at } => Check::new(
            id,
            Status::Fail,
            format!("a grant for {what} would not let a connection through: {at} drops it"),
        )
        .detail(SEMANTICS)
        .fix(open_in(at, probe, tool)),
        ChainVerdict::Restricted { at, unless } => Check::new(
            id,
            Status::Warn,
            format!("a grant for {what} lets a connection through only as {unless} allows; others are dropped by {at}"),
        )
        .detail(format!("{SEMANTICS}; grants for sources that rule does not cover cannot help"))
        .fix(open_in(at, probe, tool)),
        ChainVerdict::Forwarded { at, always } => Check::new(
            id,
            if *always { Status::Fail } else { Status::Warn },
            format!(
                "new connections to {what} are {}sent elsewhere by {at}, before jitd's input chain sees them",
                if *always { "" } else { "sometimes " }
            ),
        )
        .detail("jitd locks ports of the host itself (the input hook); a DNAT on prerouting forwards the connection to a container or another host, so the lockdown does not apply to it")
        .fix(forward_fix(at, tool)),
        ChainVerdict::Unknown { chain } => Check::new(
            id,
            Status::Warn,
            format!("could not judge {what}: {chain} is too large or too deeply nested to walk"),
        ),
    }
}

/// One verdict in a few words, for the `also:` line.
pub fn one_line(probe: &Probe, verdict: &ChainVerdict) -> String {
    let what = probe.describe();
    match verdict {
        ChainVerdict::Blocked { at } => format!("{what} dropped by {at}"),
        ChainVerdict::Restricted { at, .. } => format!("{what} dropped for most sources by {at}"),
        ChainVerdict::Forwarded { at, .. } => format!("{what} forwarded by {at}"),
        ChainVerdict::Unknown { chain } => format!("{what}: {chain} not judged"),
    }
}

/// How to let the port through the table that drops it (jitd still decides who gets
/// in: its own chain drops every new connection without a grant).
fn open_in(at: &Place, probe: &Probe, tool: &str) -> String {
    let proto = probe.transport.name();
    let port = probe.port;
    let keep = "jitd still decides who gets in: its own chain drops new connections without a grant";
    if tool == "ufw" {
        return format!("allow the port in ufw: `ufw allow {port}/{proto}` ({keep})");
    }
    if tool == "firewalld" {
        return format!(
            "allow the port in firewalld: `firewall-cmd --permanent --add-port={port}/{proto} && firewall-cmd --reload` ({keep})"
        );
    }
    let position = at.handle.map_or(String::new(), |h| format!(" position {h}"));
    format!(
        "accept the port in that chain before it drops it: `nft insert rule {} {} {}{position} {proto} dport {port} accept`, and make it permanent where that table is defined (e.g. /etc/nftables.conf) ({keep})",
        at.family, at.table, at.chain
    )
}

fn forward_fix(at: &Place, tool: &str) -> String {
    if tool == "docker" {
        return "publish the container's port on 127.0.0.1 only (`-p 127.0.0.1:HOST:CONTAINER`), or filter it in Docker's DOCKER-USER chain; jitd cannot lock a published port".into();
    }
    format!(
        "remove the DNAT ({} {} chain {}), or filter the forwarded traffic on the forward hook; jitd cannot lock it",
        at.family, at.table, at.chain
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Transport;

    fn place(table: &str, chain: &str, handle: Option<u64>) -> Place {
        Place {
            family: "inet".into(),
            table: table.into(),
            chain: chain.into(),
            handle,
            rule: if handle.is_some() {
                "tcp dport 22 drop".into()
            } else {
                "policy drop".into()
            },
        }
    }

    #[test]
    fn fixes_name_the_firewall_and_the_exact_place() {
        let probe = Probe {
            v6: false,
            transport: Transport::Tcp,
            port: 22,
        };
        let c = explain(
            "x".into(),
            &probe,
            &ChainVerdict::Blocked {
                at: place("filter", "input", None),
            },
            "nft",
        );
        assert_eq!(c.status, Status::Fail);
        assert_eq!(
            c.summary,
            "a grant for 22/tcp over IPv4 would not let a connection through: table inet filter chain input (policy drop) drops it"
        );
        assert!(c.fix.unwrap().starts_with(
            "accept the port in that chain before it drops it: `nft insert rule inet filter input tcp dport 22 accept`"
        ));
        let c = explain(
            "x".into(),
            &probe,
            &ChainVerdict::Blocked {
                at: place("filter", "input", Some(9)),
            },
            "nft",
        );
        assert!(c
            .fix
            .unwrap()
            .contains("`nft insert rule inet filter input position 9 tcp dport 22 accept`"));
        let c = explain(
            "x".into(),
            &probe,
            &ChainVerdict::Blocked {
                at: place("filter", "INPUT", None),
            },
            "ufw",
        );
        assert!(c.fix.unwrap().starts_with("allow the port in ufw: `ufw allow 22/tcp`"));
        let c = explain(
            "x".into(),
            &probe,
            &ChainVerdict::Forwarded {
                at: place("nat", "DOCKER", Some(3)),
                always: false,
            },
            "docker",
        );
        assert_eq!(c.status, Status::Warn);
        assert!(c.fix.unwrap().contains("DOCKER-USER"));
    }
}
