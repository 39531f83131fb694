//! One rule judged for a probe: do its matches hold, and what does it do then (pure).

use serde_json::Value;

use super::model::{ChainId, Rule, Ruleset};
use super::{xt, Probe, Tri};

/// What a rule does when its matches hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing that ends the chain (counters, logs, marks, ...).
    Continue,
    /// `accept` (and `queue`: a program decides, jitd does not judge it).
    Accept,
    /// `drop` or `reject`.
    Drop,
    /// `return`.
    Return,
    /// `jump CHAIN`.
    Jump(String),
    /// `goto CHAIN`.
    Goto(String),
    /// `dnat`: the connection is sent elsewhere.
    Forward,
    /// A verdict map: each entry's verdict, with whether its key holds.
    Map(Vec<(Tri, Verdict)>),
}

/// What the rule's matches say about the probe, and its verdict.
pub fn judge_rule(ruleset: &Ruleset, chain: &ChainId, rule: &Rule, probe: &Probe) -> (Tri, Verdict) {
    let xt = ruleset.xt.get(&(chain.clone(), rule.handle));
    let mut xt_seen = 0;
    let mut holds = Tri::Yes;
    for expr in &rule.expr {
        let Some((key, body)) = expr.as_object().and_then(|o| o.iter().next()) else {
            holds = holds.and(Tri::Maybe);
            continue;
        };
        let step = match key.as_str() {
            "match" => Step::Filter(match_expr(ruleset, chain, body, probe)),
            "xt" if body["type"] == "match" => {
                let found = xt.and_then(|list| list.get(xt_seen));
                xt_seen += 1;
                Step::Filter(found.map_or(Tri::Maybe, |m| xt::judge(m, probe)))
            }
            "xt" => Step::Verdict(xt_target(body["name"].as_str().unwrap_or_default())),
            "vmap" => Step::Verdict(vmap(ruleset, chain, body, probe)),
            other => statement(other, body),
        };
        match step {
            Step::Filter(t) => holds = holds.and(t),
            Step::Verdict(Verdict::Continue) => {}
            Step::Verdict(v) => return (holds, v),
        }
        if holds == Tri::No {
            return (Tri::No, Verdict::Continue);
        }
    }
    (holds, Verdict::Continue)
}

enum Step {
    Filter(Tri),
    Verdict(Verdict),
}

/// Statements other than matches and maps.
fn statement(key: &str, body: &Value) -> Step {
    let target = || body["target"].as_str().unwrap_or_default().to_string();
    Step::Verdict(match key {
        "accept" | "queue" | "redirect" | "tproxy" | "synproxy" => Verdict::Accept,
        "drop" | "reject" => Verdict::Drop,
        "return" => Verdict::Return,
        "jump" => Verdict::Jump(target()),
        "goto" => Verdict::Goto(target()),
        "dnat" | "fwd" => Verdict::Forward,
        "continue" | "counter" | "log" | "mangle" | "notrack" | "set" | "map" | "ct helper" | "ct timeout"
        | "ct expectation" | "flow" | "dup" | "secmark" | "last" | "snat" | "masquerade" => Verdict::Continue,
        // rate limits, quotas, connection counts, and what this build does not know:
        // the rule may stop here
        _ => return Step::Filter(Tri::Maybe),
    })
}

fn xt_target(name: &str) -> Verdict {
    match name {
        "REJECT" | "DROP" => Verdict::Drop,
        "ACCEPT" => Verdict::Accept,
        "RETURN" => Verdict::Return,
        "DNAT" | "NETMAP" => Verdict::Forward,
        "REDIRECT" => Verdict::Accept,
        _ => Verdict::Continue, // LOG, NFLOG, MARK, CT, TCPMSS, ...
    }
}

/// A verdict map: `KEY vmap { VALUE : VERDICT, ... }` or `vmap @name`.
fn vmap(ruleset: &Ruleset, chain: &ChainId, body: &Value, probe: &Probe) -> Verdict {
    let field = field(&body["key"], probe);
    let entries: Vec<Value> = match &body["data"] {
        Value::String(name) => match named(ruleset, chain, name) {
            Some(elements) => elements,
            None => return Verdict::Map(vec![(Tri::Maybe, Verdict::Drop), (Tri::Maybe, Verdict::Accept)]),
        },
        data => data["set"].as_array().cloned().unwrap_or_default(),
    };
    let mut out = Vec::new();
    for entry in &entries {
        let (Some(key), Some(verdict)) = (entry.get(0), entry.get(1)) else {
            continue;
        };
        let holds = member_of(&field, key);
        if holds != Tri::No {
            let (_, verdict) = verdict.as_object().and_then(|o| o.iter().next()).map_or(
                (String::new(), Verdict::Continue),
                |(k, v)| match statement(k, v) {
                    Step::Verdict(v) => (k.clone(), v),
                    Step::Filter(_) => (k.clone(), Verdict::Continue),
                },
            );
            out.push((holds, verdict));
        }
    }
    Verdict::Map(out)
}

/// The elements of named set `@name` in the chain's table; `None` when unknown.
fn named(ruleset: &Ruleset, chain: &ChainId, name: &str) -> Option<Vec<Value>> {
    let id = ChainId {
        chain: name.trim_start_matches('@').to_string(),
        ..chain.clone()
    };
    ruleset.sets.get(&id)?.elements.clone()
}

/// What the probe's packet has in the place a match looks at.
#[derive(Debug, Clone, PartialEq)]
enum Field {
    /// The packet has no such header (an IPv6 field of an IPv4 packet, a TCP field of
    /// a UDP packet): the match fails whatever it compares.
    Absent,
    /// Unknown to the probe (addresses, marks, ...).
    Unknown,
    /// A number (a port).
    Num(u64),
    /// A symbolic value (`tcp`, `ipv4`, `local`, ...).
    Name(&'static str),
    /// The input interface: never `lo` nor a container bridge, otherwise unknown.
    Iface,
    /// Flags (`ct state`, `tcp flags`).
    Flags(Vec<&'static str>),
    /// A concatenation.
    Tuple(Vec<Field>),
}

fn match_expr(ruleset: &Ruleset, chain: &ChainId, body: &Value, probe: &Probe) -> Tri {
    let field = field(&body["left"], probe);
    if field == Field::Absent {
        return Tri::No;
    }
    let right = &body["right"];
    let elements = |r: &Value| -> Option<Vec<Value>> {
        match r {
            Value::String(s) if s.starts_with('@') => named(ruleset, chain, s),
            Value::Object(o) if o.contains_key("set") => o["set"].as_array().cloned(),
            other => Some(vec![other.clone()]),
        }
    };
    let member = |r: &Value| match elements(r) {
        None => Tri::Maybe,
        Some(list) => list.iter().fold(Tri::No, |acc, e| acc.or(member_of(&field, e))),
    };
    match (body["op"].as_str().unwrap_or("=="), &field) {
        ("in", Field::Flags(have)) => flags_overlap(have, right),
        ("==" | "in", _) => member(right),
        ("!=", _) => !member(right),
        (op @ ("<" | ">" | "<=" | ">="), Field::Num(n)) => right.as_u64().map_or(Tri::Maybe, |r| {
            Tri::from(match op {
                "<" => *n < r,
                ">" => *n > r,
                "<=" => *n <= r,
                _ => *n >= r,
            })
        }),
        _ => Tri::Maybe,
    }
}

/// Whether `field` equals one element of a set (a value, a range, a map entry's key,
/// a concatenation).
fn member_of(field: &Field, element: &Value) -> Tri {
    let element = element.get("elem").and_then(|e| e.get("val")).unwrap_or(element);
    match field {
        Field::Absent => Tri::No,
        Field::Unknown => Tri::Maybe,
        Field::Num(n) => number_in(*n, element),
        Field::Name(name) => name_is(name, element),
        Field::Iface => match element.as_str() {
            Some(name) if is_not_ingress(name) => Tri::No,
            _ => Tri::Maybe,
        },
        Field::Flags(have) => Tri::from(flag_set(element).is_some_and(|want| same_flags(have, &want))),
        Field::Tuple(parts) => match element["concat"].as_array() {
            Some(items) if items.len() == parts.len() => parts
                .iter()
                .zip(items)
                .fold(Tri::Yes, |acc, (p, e)| acc.and(member_of(p, e))),
            _ => Tri::Maybe,
        },
    }
}

fn number_in(n: u64, element: &Value) -> Tri {
    if let Some(v) = element.as_u64() {
        return Tri::from(v == n);
    }
    if let Some([low, high]) = element["range"].as_array().map(Vec::as_slice) {
        return match (low.as_u64(), high.as_u64()) {
            (Some(l), Some(h)) => Tri::from((l..=h).contains(&n)),
            _ => Tri::Maybe,
        };
    }
    match element.as_str().and_then(service_port) {
        Some(port) => Tri::from(u64::from(port) == n),
        None => Tri::Maybe,
    }
}

/// Well-known service names nft may print instead of a port number.
fn service_port(name: &str) -> Option<u16> {
    Some(match name {
        "ssh" => 22,
        "telnet" => 23,
        "domain" => 53,
        "http" => 80,
        "https" => 443,
        "ms-wbt-server" => 3389,
        "mysql" => 3306,
        "postgresql" => 5432,
        _ => return None,
    })
}

fn name_is(name: &str, element: &Value) -> Tri {
    match element {
        Value::String(s) => Tri::from(s == name),
        Value::Number(n) => match (name, n.as_u64()) {
            ("tcp", Some(6)) | ("udp", Some(17)) => Tri::Yes,
            (_, Some(_)) if name == "tcp" || name == "udp" => Tri::No,
            _ => Tri::Maybe,
        },
        _ => Tri::Maybe,
    }
}

/// Interfaces a grantee's connection never arrives on: loopback and the bridges of
/// containers and virtual machines (docker0, br-*, virbr*, cni*, veth*, ...).
fn is_not_ingress(name: &str) -> bool {
    let virtual_prefixes = [
        "docker", "br-", "virbr", "cni", "veth", "podman", "lxcbr", "lxdbr", "flannel",
    ];
    name == "lo"
        || virtual_prefixes
            .iter()
            .any(|p| name.starts_with(p) && !name.ends_with('*'))
}

fn flag_set(v: &Value) -> Option<Vec<String>> {
    match v {
        Value::String(s) => Some(vec![s.clone()]),
        Value::Array(list) => list.iter().map(|x| x.as_str().map(str::to_string)).collect(),
        _ => None,
    }
}

fn same_flags(have: &[&str], want: &[String]) -> bool {
    have.len() == want.len() && want.iter().all(|w| have.contains(&w.as_str()))
}

fn flags_overlap(have: &[&str], right: &Value) -> Tri {
    match flag_set(right) {
        Some(want) => Tri::from(want.iter().any(|w| have.contains(&w.as_str()))),
        None => Tri::Maybe,
    }
}

/// What the packet holds where `left` looks.
fn field(left: &Value, probe: &Probe) -> Field {
    let Some((key, body)) = left.as_object().and_then(|o| o.iter().next()) else {
        return Field::Unknown;
    };
    match key.as_str() {
        "meta" => meta(body["key"].as_str().unwrap_or_default(), probe),
        "payload" => payload(body, probe),
        "ct" => match body["key"].as_str().unwrap_or_default() {
            "state" => Field::Flags(vec!["new"]),
            "status" => Field::Flags(Vec::new()),
            "direction" => Field::Name("original"),
            "l3proto" => Field::Name(if probe.v6 { "ipv6" } else { "ipv4" }),
            "proto-dst" if body.get("dir").is_none_or(|d| d == "original") => Field::Num(probe.port.into()),
            _ => Field::Unknown,
        },
        "fib" => fib(body),
        "&" => bitwise(body, probe),
        "concat" => concat(body, probe),
        _ => Field::Unknown,
    }
}

fn meta(key: &str, probe: &Probe) -> Field {
    match key {
        "l4proto" => Field::Name(probe.transport.name()),
        "nfproto" => Field::Name(if probe.v6 { "ipv6" } else { "ipv4" }),
        "protocol" => Field::Name(if probe.v6 { "ip6" } else { "ip" }),
        "pkttype" => Field::Name("host"),
        "iif" | "iifname" => Field::Iface,
        "iiftype" => Field::Name("ether"),
        _ => Field::Unknown,
    }
}

fn payload(body: &Value, probe: &Probe) -> Field {
    let (Some(protocol), Some(field)) = (body["protocol"].as_str(), body["field"].as_str()) else {
        return Field::Unknown; // raw payload: @th,16,16 and the like
    };
    let transport = probe.transport.name();
    match (protocol, field) {
        ("ip", _) if probe.v6 => Field::Absent,
        ("ip6", _) if !probe.v6 => Field::Absent,
        ("ip", "protocol") | ("ip6", "nexthdr") => Field::Name(transport),
        ("ip", "version") => Field::Num(4),
        ("ip6", "version") => Field::Num(6),
        ("ip" | "ip6" | "ether" | "vlan", _) => Field::Unknown,
        ("th", "dport") => Field::Num(probe.port.into()),
        ("th", _) => Field::Unknown,
        (p, _) if p != transport => Field::Absent,
        (_, "dport") => Field::Num(probe.port.into()),
        ("tcp", "flags") => Field::Flags(vec!["syn"]),
        _ => Field::Unknown,
    }
}

fn fib(body: &Value) -> Field {
    let flags = body["flags"].as_array().cloned().unwrap_or_default();
    match body["result"].as_str() {
        Some("type") if flags.iter().any(|f| f == "daddr") => Field::Name("local"),
        Some("type") if flags.iter().any(|f| f == "saddr") => Field::Name("unicast"),
        _ => Field::Unknown,
    }
}

/// `FIELD & MASK`: known for TCP flags, unknown otherwise.
fn bitwise(body: &Value, probe: &Probe) -> Field {
    let (Some(inner), Some(mask)) = (body.get(0), body.get(1)) else {
        return Field::Unknown;
    };
    match (field(inner, probe), flag_set(mask)) {
        (Field::Absent, _) => Field::Absent,
        (Field::Flags(have), Some(mask)) => {
            Field::Flags(have.into_iter().filter(|f| mask.iter().any(|m| m == f)).collect())
        }
        _ => Field::Unknown,
    }
}

fn concat(body: &Value, probe: &Probe) -> Field {
    let parts: Vec<Field> = body.as_array().into_iter().flatten().map(|p| field(p, probe)).collect();
    if parts.contains(&Field::Absent) {
        Field::Absent
    } else {
        Field::Tuple(parts)
    }
}
