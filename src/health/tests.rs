//! The judgement as a whole: facts of made-up hosts in, checks out.

use std::time::Duration;

use super::facts::*;
use super::judge::judge;
use super::listeners::{Listener, Process};
use super::report::{Check, Status};
use super::ruleset::Ruleset;
use crate::domain::{Protocol, Transport};

fn listener(address: &str, port: u16, transport: Transport, process: Option<&str>) -> Listener {
    Listener {
        transport,
        address: address.parse().unwrap(),
        port,
        v6only: false,
        uid: 0,
        inode: 1,
        cgroup: None,
        processes: process
            .map(|n| Process {
                pid: 4711,
                name: n.into(),
            })
            .into_iter()
            .collect(),
        unit: None,
    }
}

/// A healthy host: jitd protects 22, sshd listens there, nothing else is in the way.
fn healthy() -> Facts {
    Facts {
        version: "0.1.0".into(),
        policy: "/etc/jitd/jitd.toml".into(),
        ports: vec![(22, Protocol::Tcp)],
        policy_lists_ports: true,
        table: TableState::Matches,
        drift: DriftState {
            last_check: Some((Duration::from_secs(3), DriftOutcome::Clean)),
            last_repair: None,
            repairs_in_a_row: 0,
            max_quiet: Duration::from_secs(60),
            uptime: Duration::from_secs(600),
        },
        audit: AuditState {
            dir: "/var/lib/jitd".into(),
            free_bytes: Some(1 << 34),
            verified: Some(Verified {
                ago: Duration::from_secs(20),
                records: 100,
                broken: None,
                took: Duration::from_millis(3),
            }),
            ..Default::default()
        },
        ruleset: Ok(Ruleset::default()),
        listeners_left_out: Default::default(),
        listeners: Ok(vec![
            listener("::", 22, Transport::Tcp, Some("sshd")),
            listener("127.0.0.1", 5432, Transport::Tcp, Some("postgres")),
        ]),
        families: (true, true),
        legacy_iptables: Vec::new(),
    }
}

fn checks(f: &Facts) -> Vec<Check> {
    judge(f).0
}

fn by_id<'a>(checks: &'a [Check], id: &str) -> &'a Check {
    checks
        .iter()
        .find(|c| c.id == id)
        .unwrap_or_else(|| panic!("no check {id} in {checks:#?}"))
}

fn failing(checks: &[Check]) -> Vec<&str> {
    checks
        .iter()
        .filter(|c| c.status == Status::Fail)
        .map(|c| c.id.as_str())
        .collect()
}

#[test]
fn a_healthy_host_has_no_problem_and_a_loopback_database_is_not_a_recommendation() {
    let (checks, exposed, toml) = judge(&healthy());
    assert!(failing(&checks).is_empty(), "{checks:#?}");
    assert!(checks.iter().all(|c| c.status == Status::Ok), "{checks:#?}");
    assert_eq!(
        by_id(&checks, "port.22/tcp.listening").summary,
        "22/tcp: sshd (pid 4711) listens on [::]:22/tcp"
    );
    assert!(toml.is_none());
    assert_eq!(exposed.len(), 1, "the loopback listener is not listed");
}

#[test]
fn an_unprotected_sshd_on_another_port_is_a_problem_with_the_lines_to_add() {
    let mut f = healthy();
    f.listeners
        .as_mut()
        .unwrap()
        .push(listener("0.0.0.0", 2222, Transport::Tcp, Some("sshd")));
    let (checks, _, toml) = judge(&f);
    assert_eq!(failing(&checks), ["recommend.2222/tcp"]);
    let c = by_id(&checks, "recommend.2222/tcp");
    assert_eq!(
        c.summary,
        "SSH (sshd (pid 4711)) listens on 0.0.0.0:2222/tcp and jitd does not protect it"
    );
    let entry = c.toml.as_deref().unwrap();
    assert_eq!(
        entry,
        "[[ports]]   # SSH (sshd)\nport = 2222\nprotocol = \"tcp\"\nallowed_sources = [\"any\"]\nmax_duration = \"3h\"\n"
    );
    assert_eq!(toml.as_deref(), Some(entry));
    // protected: no recommendation
    f.ports.push((2222, Protocol::Tcp));
    assert!(failing(&checks_of(&f)).is_empty());
}

fn checks_of(f: &Facts) -> Vec<Check> {
    checks(f)
}

#[test]
fn with_the_default_ports_the_snippet_keeps_them() {
    let mut f = healthy();
    f.policy_lists_ports = false;
    f.listeners
        .as_mut()
        .unwrap()
        .push(listener("0.0.0.0", 10000, Transport::Tcp, None));
    let (checks, _, toml) = judge(&f);
    let c = by_id(&checks, "recommend.10000/tcp");
    assert!(c.detail.as_deref().unwrap().contains("recognised by its port"), "{c:?}");
    assert!(
        c.fix.as_deref().unwrap().contains("the first entry replaces them"),
        "{c:?}"
    );
    let toml = toml.unwrap();
    let config = crate::config::Config::parse(std::path::Path::new("/x"), &toml, &|_| None).unwrap();
    let ports: Vec<u16> = config.ports.iter().map(|p| p.port).collect();
    assert_eq!(ports, [22, 3389, 5985, 5986, 10000]);
}

#[test]
fn xrdp_on_tcp_and_udp_gets_one_entry_for_both_and_databases_only_warn() {
    let mut f = healthy();
    let ls = f.listeners.as_mut().unwrap();
    ls.push(listener("0.0.0.0", 3389, Transport::Tcp, Some("xrdp")));
    ls.push(listener("::", 3389, Transport::Udp, Some("xrdp")));
    ls.push(listener("0.0.0.0", 5432, Transport::Tcp, Some("postgres")));
    ls.push(listener("10.0.0.5", 8080, Transport::Tcp, Some("nginx")));
    let checks = checks(&f);
    assert_eq!(failing(&checks), ["recommend.3389/any"]);
    assert!(by_id(&checks, "recommend.3389/any")
        .toml
        .as_deref()
        .unwrap()
        .contains("protocol = \"any\""));
    assert_eq!(by_id(&checks, "recommend.5432/tcp").status, Status::Warn);
    assert!(
        !checks.iter().any(|c| c.id.contains("8080")),
        "nginx is not a management service"
    );
}

#[test]
fn another_table_that_drops_the_port_fails_naming_it() {
    let mut f = healthy();
    let mut rs = Ruleset::default();
    rs.add_listing(
        br#"{"nftables":[{"chain":{"family":"inet","table":"filter","name":"input","handle":1,"type":"filter","hook":"input","prio":0,"policy":"drop"}},
            {"rule":{"family":"inet","table":"filter","chain":"input","handle":4,"expr":[{"match":{"op":"==","left":{"payload":{"protocol":"tcp","field":"dport"}},"right":80}},{"accept":null}]}}]}"#,
    )
    .unwrap();
    f.ruleset = Ok(rs);
    let checks = checks(&f);
    assert_eq!(failing(&checks), ["port.22/tcp.reachable"]);
    let c = by_id(&checks, "port.22/tcp.reachable");
    assert_eq!(
        c.summary,
        "a grant for 22/tcp over IPv4 would not let a connection through: table inet filter chain input (policy drop) drops it"
    );
    assert!(
        c.detail
            .as_deref()
            .unwrap()
            .contains("also: 22/tcp over IPv6 dropped by"),
        "{c:?}"
    );
    // a host without IPv6 addresses is judged for IPv4 only
    f.families = (true, false);
    let c = checks_of(&f)
        .into_iter()
        .find(|c| c.id == "port.22/tcp.reachable")
        .unwrap();
    assert!(!c.detail.unwrap().contains("also:"));
}

#[test]
fn the_daemon_side_checks() {
    let mut f = healthy();
    f.table = TableState::Missing;
    f.drift.repairs_in_a_row = 7;
    f.audit.write_error = Some("No space left on device".into());
    f.audit.verified.as_mut().unwrap().broken = Some("audit.jsonl:4 was changed".into());
    assert_eq!(failing(&checks(&f)), ["table", "drift", "audit.write", "audit.chain"]);
    let mut f = healthy();
    f.drift.last_check = Some((Duration::from_secs(600), DriftOutcome::Clean));
    assert_eq!(failing(&checks(&f)), ["drift"], "a monitor that stopped checking");
    let mut f = healthy();
    f.drift.last_repair = Some((Duration::from_secs(60), "table inet jitd is missing".into()));
    assert_eq!(by_id(&checks(&f), "drift").status, Status::Warn);
    let mut f = healthy();
    f.drift.last_check = None;
    f.drift.uptime = Duration::from_secs(5);
    assert_eq!(by_id(&checks(&f), "drift").status, Status::Ok, "starting");
}

#[test]
fn a_protected_port_nothing_listens_on_and_unreadable_probes_warn() {
    let mut f = healthy();
    f.listeners = Ok(vec![listener("127.0.0.1", 22, Transport::Tcp, Some("sshd"))]);
    assert_eq!(by_id(&checks(&f), "port.22/tcp.listening").status, Status::Warn);
    f.listeners = Ok(Vec::new());
    let c = checks(&f);
    assert_eq!(
        by_id(&c, "port.22/tcp.listening").summary,
        "22/tcp: nothing listens on this protected port"
    );
    f.listeners = Err("EPERM".into());
    f.ruleset = Err("cannot run nft".into());
    f.legacy_iptables = vec!["filter".into()];
    let c = checks(&f);
    assert!(failing(&c).is_empty());
    for id in ["ruleset", "listeners", "iptables-legacy"] {
        assert_eq!(by_id(&c, id).status, Status::Warn);
    }
}

#[test]
fn recommendations_are_capped_however_many_listeners_a_user_opens() {
    let mut f = healthy();
    let ls = f.listeners.as_mut().unwrap();
    for port in 3000..3150 {
        ls.push(listener("0.0.0.0", port, Transport::Tcp, Some("sshd")));
    }
    let checks = checks(&f);
    let recs = checks.iter().filter(|c| c.id.starts_with("recommend.")).count();
    assert_eq!(recs, super::recommend::MAX_RECOMMENDATIONS + 1);
    assert_eq!(
        by_id(&checks, "recommend.more").summary,
        "and 50 more unprotected services (only the first 100 are listed)"
    );
}

#[test]
fn sockets_left_out_over_the_caps_make_the_host_unhealthy_naming_their_owners() {
    let mut f = healthy();
    assert!(failing(&checks(&f)).is_empty());
    for _ in 0..3 {
        f.listeners_left_out.note(4242);
    }
    let c = checks(&f);
    assert_eq!(failing(&c), ["listeners.left_out"]);
    let left = by_id(&c, "listeners.left_out");
    assert!(
        left.summary
            .starts_with("3 listening sockets were left unread, owned by uid 4242:"),
        "{}",
        left.summary
    );
}
