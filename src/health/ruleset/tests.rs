//! The analysis fed with rulesets captured from a real kernel (`tests/fixtures/doctor`,
//! made with `examples/doctor-fixture.rs`; see the README there).

use super::*;
use crate::health::probe::nft::{add, Listing};

fn fixture(name: &str) -> Ruleset {
    let path = format!("{}/tests/fixtures/doctor/{name}.json", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let listings: Vec<Listing> = serde_json::from_str(&text).unwrap();
    let mut ruleset = Ruleset::default();
    for l in listings {
        add(&mut ruleset, l).unwrap();
    }
    ruleset
}

fn tcp(port: u16, v6: bool) -> Probe {
    Probe {
        v6,
        transport: Transport::Tcp,
        port,
    }
}

/// The verdicts in short: `blocked ip filter INPUT policy drop`,
/// `restricted ... #112 unless ...`, `forwarded ip nat DOCKER #9`.
fn short(r: &Ruleset, p: Probe) -> Vec<String> {
    let at = |p: &Place| match p.handle {
        Some(h) => format!("{} {} {} #{h}", p.family, p.table, p.chain),
        None => format!("{} {} {} {}", p.family, p.table, p.chain, p.rule),
    };
    judge(r, &p)
        .iter()
        .map(|v| match v {
            ChainVerdict::Blocked { at: a } => format!("blocked {}", at(a)),
            ChainVerdict::Restricted { at: a, unless } => format!("restricted {} unless {}", at(a), at(unless)),
            ChainVerdict::Forwarded { at: a, always } => {
                format!("forwarded {}{}", at(a), if *always { "" } else { " sometimes" })
            }
            ChainVerdict::Unknown { chain } => format!("unknown {chain}"),
        })
        .collect()
}

fn udp(port: u16, v6: bool) -> Probe {
    Probe {
        v6,
        transport: Transport::Udp,
        port,
    }
}

#[test]
fn ufw_drops_what_it_does_not_allow_and_says_which_rule() {
    let r = fixture("ufw");
    // allowed for everyone (80), rate-limited (2222: `ufw limit`), a multiport range
    for port in [80, 2222, 6003] {
        assert!(
            short(&r, tcp(port, false)).is_empty(),
            "{port}: {:?}",
            short(&r, tcp(port, false))
        );
    }
    assert_eq!(
        short(&r, tcp(22, false)),
        ["restricted ip filter INPUT policy drop unless ip filter ufw-user-input #112"],
        "only 10.0.0.0/8 may connect to 22"
    );
    assert_eq!(
        short(&r, tcp(5900, false)),
        ["blocked ip filter ufw-user-input #116"],
        "ufw deny 5900"
    );
    assert_eq!(short(&r, tcp(3389, false)), ["blocked ip filter INPUT policy drop"]);
    assert_eq!(
        short(&r, tcp(6008, false)),
        ["blocked ip filter INPUT policy drop"],
        "past the range"
    );
    // the 10.0.0.0/8 rule has no IPv6 twin
    assert_eq!(short(&r, tcp(22, true)), ["blocked ip6 filter INPUT policy drop"]);
    assert!(short(&r, tcp(80, true)).is_empty());
    let text = judge(&r, &tcp(22, false));
    let ChainVerdict::Restricted { unless, .. } = &text[0] else {
        panic!()
    };
    assert_eq!(unless.rule, "ip saddr 10.0.0.0/8 tcp dport 22 accept");
}

#[test]
fn ufw_conntrack_and_addrtype_matches_are_read_not_guessed() {
    // Without the xt options, `ct state related,established accept` (an xt conntrack
    // match in iptables-nft) would look like it might accept a new connection, and
    // ufw-not-local's `addrtype LOCAL return` like it might not return: the verdicts
    // would be wrong both ways.
    let mut r = fixture("ufw");
    r.xt.clear();
    assert_eq!(
        short(&r, tcp(3389, false)),
        ["restricted ip filter ufw-not-local #72 unless ip filter ufw-before-input #53"]
    );
}

#[test]
fn a_hand_written_ruleset_with_sets_maps_and_a_prerouting_table() {
    let r = fixture("hand-written");
    for p in [
        tcp(80, false),
        tcp(443, true),
        tcp(8080, false),
        tcp(8443, false),
        udp(51820, true),
        udp(3389, false),
    ] {
        assert!(short(&r, p).is_empty(), "{}: {:?}", p.describe(), short(&r, p));
    }
    assert_eq!(
        short(&r, tcp(22, false)),
        ["restricted inet filter input policy drop unless inet filter input #12"]
    );
    assert_eq!(
        short(&r, tcp(22, true)),
        ["blocked inet filter input policy drop"],
        "@mgmt is IPv4 only"
    );
    assert_eq!(
        short(&r, tcp(5901, false)),
        ["blocked inet filter input #13"],
        "reject with tcp reset"
    );
    assert_eq!(
        short(&r, tcp(8081, false)),
        ["blocked inet filter input #17"],
        "vmap @by_port"
    );
    assert_eq!(
        short(&r, tcp(9090, false)),
        ["restricted inet filter input policy drop unless inet filter input #18"]
    );
    assert_eq!(
        short(&r, udp(8443, false)),
        ["blocked inet filter input policy drop"],
        "tcp . 8443 only"
    );
    // every base chain on the hooks sees the packet: the prerouting table's reject and
    // the input chain's policy both stand in the way
    assert_eq!(
        short(&r, tcp(5985, false)),
        ["blocked inet filter input #13", "blocked ip blocklist pre #4"],
        "5985 is also in input's 5900-5999"
    );
    assert_eq!(
        short(&r, tcp(5985, true)),
        ["blocked inet filter input #13"],
        "an ip table sees IPv4 only"
    );
}

#[test]
fn a_firewalld_like_table_rejects_what_its_zone_does_not_allow() {
    let r = fixture("firewalld-like");
    for p in [tcp(22, false), tcp(22, true), tcp(9090, false)] {
        assert!(short(&r, p).is_empty(), "{}: {:?}", p.describe(), short(&r, p));
    }
    assert_eq!(short(&r, tcp(3389, false)), ["blocked inet firewalld filter_INPUT #24"]);
    assert_eq!(short(&r, udp(3389, true)), ["blocked inet firewalld filter_INPUT #24"]);
}

#[test]
fn docker_published_ports_are_forwarded_past_the_input_hook() {
    let r = fixture("docker-like");
    assert_eq!(short(&r, tcp(2222, false)), ["forwarded ip nat DOCKER #10"]);
    assert_eq!(short(&r, tcp(8080, false)), ["forwarded ip nat DOCKER #9"]);
    // Docker's filter rules are on the forward hook: they drop nothing on input
    for p in [tcp(22, false), tcp(3389, false), tcp(2222, true)] {
        assert!(short(&r, p).is_empty(), "{}: {:?}", p.describe(), short(&r, p));
    }
}

/// A ruleset of one inet table `t` from chain and rule objects written in short:
/// `("input", Some(("input", "drop")))` for a base chain, rules as expression JSON.
fn table(chains: &[(&str, Option<&str>, &[&str])]) -> Ruleset {
    let mut objects = Vec::new();
    for (name, policy, rules) in chains {
        let mut chain = serde_json::json!({"family": "inet", "table": "t", "name": name, "handle": 1});
        if let Some(policy) = policy {
            chain["type"] = "filter".into();
            chain["hook"] = "input".into();
            chain["prio"] = 0.into();
            chain["policy"] = (*policy).into();
        }
        objects.push(serde_json::json!({ "chain": chain }));
        for (i, expr) in rules.iter().enumerate() {
            let expr: serde_json::Value = serde_json::from_str(expr).unwrap();
            objects.push(serde_json::json!({"rule": {"family": "inet", "table": "t", "chain": name, "handle": 10 + i, "expr": expr}}));
        }
    }
    let mut r = Ruleset::default();
    r.add_listing(&serde_json::to_vec(&serde_json::json!({ "nftables": objects })).unwrap())
        .unwrap();
    r
}

const DPORT_22: &str = r#"{"match":{"op":"==","left":{"payload":{"protocol":"tcp","field":"dport"}},"right":22}}"#;
const SADDR: &str = r#"{"match":{"op":"==","left":{"payload":{"protocol":"ip","field":"saddr"}},"right":"192.0.2.1"}}"#;

#[test]
fn goto_returns_to_the_callers_caller_and_jump_comes_back() {
    let accept22 = format!("[{DPORT_22},{{\"accept\":null}}]");
    // jump: the sub chain falls off its end, the base chain goes on to its policy
    let r = table(&[
        ("input", Some("drop"), &[r#"[{"jump":{"target":"sub"}}]"#]),
        ("sub", None, &[]),
    ]);
    assert_eq!(short(&r, tcp(22, false)), ["blocked inet t input policy drop"]);
    // goto: the sub chain's end is the base chain's end
    let r = table(&[
        (
            "input",
            Some("drop"),
            &[r#"[{"goto":{"target":"sub"}}]"#, accept22.as_str()],
        ),
        ("sub", None, &[]),
    ]);
    assert_eq!(
        short(&r, tcp(22, false)),
        ["blocked inet t input policy drop"],
        "the accept after a goto is never reached"
    );
    let r = table(&[
        (
            "input",
            Some("drop"),
            &[r#"[{"jump":{"target":"sub"}}]"#, accept22.as_str()],
        ),
        ("sub", None, &[r#"[{"return":null}]"#]),
    ]);
    assert!(
        short(&r, tcp(22, false)).is_empty(),
        "return comes back to the rule after the jump"
    );
}

#[test]
fn a_source_dependent_drop_is_no_finding_and_a_source_dependent_accept_restricts() {
    let drop_some = format!("[{SADDR},{{\"drop\":null}}]");
    let r = table(&[("input", Some("accept"), &[drop_some.as_str()])]);
    assert!(short(&r, tcp(22, false)).is_empty(), "a blocklist is normal");
    let accept_some = format!("[{SADDR},{{\"accept\":null}}]");
    let r = table(&[("input", Some("drop"), &[accept_some.as_str()])]);
    assert_eq!(
        short(&r, tcp(22, false)),
        ["restricted inet t input policy drop unless inet t input #10"]
    );
    assert_eq!(
        short(&r, tcp(22, true)),
        ["blocked inet t input policy drop"],
        "ip saddr never matches IPv6"
    );
}

#[test]
fn chains_too_deep_to_walk_are_unknown_not_guessed() {
    let names: Vec<String> = (0..20).map(|i| format!("c{i}")).collect();
    let jumps: Vec<String> = (0..20)
        .map(|i| format!("[{{\"jump\":{{\"target\":\"c{}\"}}}}]", i + 1))
        .collect();
    let mut chains: Vec<(&str, Option<&str>, &[&str])> = Vec::new();
    let rules: Vec<[&str; 1]> = jumps.iter().map(|j| [j.as_str()]).collect();
    chains.push(("input", Some("drop"), &rules[0]));
    for i in 1..20 {
        chains.push((names[i].as_str(), None, &rules[i]));
    }
    let r = table(&chains);
    assert_eq!(short(&r, tcp(22, false)), ["unknown table inet t chain input"]);
}
