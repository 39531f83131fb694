//! Reads jitd's table back from the kernel (`nft -j list table inet jitd` output) and
//! compares it with what jitd expects: pure functions over JSON, for restart and drift.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use ipnet::IpNet;
use serde_json::Value;

use super::rules::{GrantKey, GRANT_SETS};
use crate::config::{format_prefix, Transport};

/// The table's shape without grant elements, handles or counter values: what must stay
/// exactly as jitd applied it. One normalised JSON text per object, sorted.
pub type Baseline = Vec<String>;

/// The grant elements the kernel holds, with the time each has left.
pub type KernelGrants = HashMap<GrantKey, Duration>;

/// Splits a table listing into its baseline and its grant elements. Elements jitd
/// cannot have written are returned as text in the third value.
pub fn parse_table(listing: &Value) -> (Baseline, KernelGrants, Vec<String>) {
    let mut baseline = Vec::new();
    let mut grants = HashMap::new();
    let mut foreign = Vec::new();
    let objects = listing["nftables"].as_array().cloned().unwrap_or_default();
    for mut object in objects {
        let Some(map) = object.as_object_mut() else { continue };
        if map.contains_key("metainfo") {
            continue;
        }
        for (kind, body) in map.iter_mut() {
            let Some(body) = body.as_object_mut() else { continue };
            body.remove("handle");
            if kind == "set" {
                let name = body.get("name").and_then(Value::as_str).unwrap_or_default().to_string();
                if GRANT_SETS.contains(&name.as_str()) {
                    if let Some(Value::Array(elems)) = body.remove("elem") {
                        for elem in &elems {
                            match parse_grant_elem(elem) {
                                Some((key, left)) => {
                                    grants.insert(key, left);
                                }
                                None => foreign.push(format!("{name}: {elem}")),
                            }
                        }
                    }
                }
            }
            if kind == "rule" {
                if let Some(Value::Array(exprs)) = body.get_mut("expr") {
                    for expr in exprs {
                        if let Some(counter) = expr.get_mut("counter") {
                            *counter = Value::Null;
                        }
                    }
                }
            }
        }
        baseline.push(object.to_string());
    }
    baseline.sort();
    (baseline, grants, foreign)
}

fn parse_grant_elem(elem: &Value) -> Option<(GrantKey, Duration)> {
    let inner = &elem["elem"];
    let parts = inner["val"]["concat"].as_array()?;
    let [addr, proto, port] = parts.as_slice() else {
        return None;
    };
    let source: IpNet = match addr {
        Value::String(a) => IpNet::from(a.parse::<std::net::IpAddr>().ok()?),
        Value::Object(_) => {
            let p = &addr["prefix"];
            format!("{}/{}", p["addr"].as_str()?, p["len"].as_u64()?).parse().ok()?
        }
        _ => return None,
    };
    let transport = match proto.as_str()? {
        "tcp" => Transport::Tcp,
        "udp" => Transport::Udp,
        _ => return None,
    };
    let port = u16::try_from(port.as_u64()?).ok()?;
    // `expires` is absent for an element that has just been added with its full timeout.
    let left = inner
        .get("expires")
        .or_else(|| inner.get("timeout"))
        .and_then(Value::as_u64)
        .unwrap_or(0);
    Some((
        GrantKey {
            source,
            transport,
            port,
        },
        Duration::from_secs(left),
    ))
}

/// What differs between the kernel and jitd's expectation, one sentence per finding.
///
/// `expected` holds the live grants with their remaining time; grants within `slack`
/// of their end may already be gone from the kernel and are not missed.
pub fn find_drift(
    baseline: &Baseline,
    listing: &Value,
    expected: &HashMap<GrantKey, Duration>,
    slack: Duration,
) -> Vec<String> {
    let (kernel_baseline, kernel_grants, foreign) = parse_table(listing);
    let mut findings = Vec::new();
    if &kernel_baseline != baseline {
        let theirs: HashSet<&String> = kernel_baseline.iter().collect();
        let ours: HashSet<&String> = baseline.iter().collect();
        let missing = ours.difference(&theirs).count();
        let extra = theirs.difference(&ours).count();
        findings.push(format!(
            "the lockdown differs from what jitd applied ({missing} object(s) missing or changed, {extra} unexpected)"
        ));
    }
    for text in foreign {
        findings.push(format!("unexpected element {text}"));
    }
    for (key, left) in &kernel_grants {
        match expected.get(key) {
            None => findings.push(format!("element {} with no grant behind it", describe(key))),
            Some(want) if *left > *want + slack => findings.push(format!(
                "element {} lasts {}s, its grant only {}s",
                describe(key),
                left.as_secs(),
                want.as_secs()
            )),
            Some(_) => {}
        }
    }
    for (key, want) in expected {
        if *want > slack && !kernel_grants.contains_key(key) {
            findings.push(format!("grant element {} is missing", describe(key)));
        }
    }
    findings.sort();
    findings
}

fn describe(key: &GrantKey) -> String {
    format!(
        "{} . {} . {}",
        format_prefix(&key.source),
        key.transport.name(),
        key.port
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_prefix;
    use serde_json::json;

    fn listing(elements: Value, counter_packets: u64) -> Value {
        json!({"nftables": [
            {"metainfo": {"version": "1.0.6"}},
            {"table": {"family": "inet", "name": "jitd", "handle": 7}},
            {"set": {"family": "inet", "table": "jitd", "name": "grants4", "handle": 3, "type": ["ipv4_addr", "inet_proto", "inet_service"], "flags": ["timeout"], "elem": elements}},
            {"chain": {"family": "inet", "table": "jitd", "name": "input", "handle": 1}},
            {"rule": {"family": "inet", "table": "jitd", "chain": "input", "handle": 9, "expr": [{"counter": {"packets": counter_packets, "bytes": 60}}, {"drop": null}]}}
        ]})
    }

    fn key(source: &str, port: u16) -> GrantKey {
        GrantKey {
            source: parse_prefix(source).unwrap(),
            transport: Transport::Tcp,
            port,
        }
    }

    fn elem(addr: Value, port: u16, expires: u64) -> Value {
        json!({"elem": {"val": {"concat": [addr, "tcp", port]}, "timeout": 3600, "expires": expires}})
    }

    #[test]
    fn handles_counters_and_grant_elements_do_not_count_as_drift() {
        let (base, _, _) = parse_table(&listing(json!([]), 0));
        let now = listing(json!([elem(json!("192.0.2.1"), 22, 100)]), 5);
        let expected = HashMap::from([(key("192.0.2.1", 22), Duration::from_secs(100))]);
        assert_eq!(
            find_drift(&base, &now, &expected, Duration::from_secs(1)),
            Vec::<String>::new()
        );
    }

    #[test]
    fn grant_elements_parse_with_their_time_left() {
        let (_, grants, foreign) = parse_table(&listing(
            json!([elem(json!("192.0.2.1"), 22, 100), elem(json!({"prefix": {"addr": "10.0.0.0", "len": 8}}), 3389, 5), {"elem": {"val": "junk"}}]),
            0,
        ));
        assert_eq!(grants[&key("192.0.2.1", 22)], Duration::from_secs(100));
        assert_eq!(grants[&key("10.0.0.0/8", 3389)], Duration::from_secs(5));
        assert_eq!(foreign.len(), 1);
    }

    #[test]
    fn each_kind_of_tampering_is_found() {
        let (base, _, _) = parse_table(&listing(json!([]), 0));
        let expected = HashMap::from([
            (key("192.0.2.1", 22), Duration::from_secs(100)),
            (key("192.0.2.9", 22), Duration::from_millis(300)),
        ]);
        let slack = Duration::from_secs(1);
        // a rule changed
        let mut changed = listing(json!([elem(json!("192.0.2.1"), 22, 100)]), 0);
        changed["nftables"][4]["rule"]["expr"][1] = json!({"accept": null});
        assert!(find_drift(&base, &changed, &expected, slack)[0].starts_with("the lockdown differs"));
        // an element someone else added, one missing, one extended
        let tampered = listing(json!([elem(json!("203.0.113.66"), 22, 50)]), 0);
        let findings = find_drift(&base, &tampered, &expected, slack);
        assert_eq!(
            findings,
            vec![
                "element 203.0.113.66 . tcp . 22 with no grant behind it",
                "grant element 192.0.2.1 . tcp . 22 is missing"
            ]
        );
        let extended = listing(json!([elem(json!("192.0.2.1"), 22, 86_000)]), 0);
        assert_eq!(
            find_drift(&base, &extended, &expected, slack),
            vec!["element 192.0.2.1 . tcp . 22 lasts 86000s, its grant only 100s"]
        );
    }
}
