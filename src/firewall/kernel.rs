//! jitd's table as the kernel holds it, and how it compares with what jitd expects:
//! decoding and comparison over netlink dumps ([`super::netlink`]), pure functions.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use ipnet::IpNet;

use super::netlink::{attr, msg, parse_attrs, Attr, Object, RawElement};
use super::rules::GRANT_SETS;
use crate::domain::{format_prefix, GrantKey, Transport};

/// The sets whose elements are part of the lockdown itself (compared byte for byte).
pub const LOCKDOWN_SETS: [&str; 3] = ["exempt4", "exempt6", "locked"];

/// An element jitd never writes into a grant set gets this "time left": it counts as
/// lasting longer than any grant.
const NO_TIMEOUT: Duration = Duration::from_secs(u32::MAX as u64);

/// The table's shape without grant elements, handles, counters or use counts: what must
/// stay exactly as jitd applied it. One line per object, sorted.
pub type Fingerprint = Vec<String>;

/// The grant elements the kernel holds, with the time each has left.
pub type KernelGrants = HashMap<GrantKey, Duration>;

/// jitd's table read back from the kernel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelTable {
    /// Chains, rules and sets as dumped.
    pub objects: Vec<Object>,
    /// Elements per set name.
    pub elements: HashMap<String, Vec<RawElement>>,
}

impl KernelTable {
    /// The lockdown's fingerprint.
    pub fn fingerprint(&self) -> Fingerprint {
        let mut lines: Vec<String> = self.objects.iter().map(object_line).collect();
        for set in LOCKDOWN_SETS {
            for e in self.elements.get(set).into_iter().flatten() {
                lines.push(format!(
                    "elem {set} {} {} {}",
                    hex::encode(&e.key),
                    e.key_end.as_deref().map(hex::encode).unwrap_or_default(),
                    e.flags
                ));
            }
        }
        lines.sort();
        lines
    }

    /// The packets each grant element's counter has counted, for the elements that
    /// counted any (most never do: at 100,000 grants this map stays small).
    pub fn counts(&self) -> HashMap<GrantKey, u64> {
        let mut counts = HashMap::new();
        for set in GRANT_SETS {
            for e in self.elements.get(set).into_iter().flatten() {
                let Some(packets) = e.packets.filter(|n| *n > 0) else {
                    continue;
                };
                if let Some(key) = decode_grant(set, e) {
                    counts.insert(key, packets);
                }
            }
        }
        counts
    }

    /// The grant elements, and the ones jitd cannot have written (as text).
    pub fn grants(&self) -> (KernelGrants, Vec<String>) {
        let mut grants = HashMap::new();
        let mut foreign = Vec::new();
        for set in GRANT_SETS {
            for e in self.elements.get(set).into_iter().flatten() {
                match decode_grant(set, e) {
                    Some(key) => {
                        grants.insert(key, e.expires_ms.map_or(NO_TIMEOUT, Duration::from_millis));
                    }
                    None => foreign.push(format!("{set}: key {}", hex::encode(&e.key))),
                }
            }
        }
        (grants, foreign)
    }
}

/// One object as text, without the attributes that change on their own.
fn object_line(object: &Object) -> String {
    let volatile: &[u16] = match object.kind {
        msg::CHAIN => &[attr::CHAIN_HANDLE, attr::CHAIN_USE, attr::CHAIN_COUNTERS],
        msg::RULE => &[attr::RULE_HANDLE, attr::RULE_POSITION],
        msg::SET => &[attr::SET_HANDLE, attr::SET_COUNT],
        _ => &[],
    };
    let mut line = format!("obj {}", object.kind);
    for a in object.attrs.iter().filter(|a| !volatile.contains(&a.kind)) {
        let value = if object.kind == msg::RULE && a.kind == attr::RULE_EXPRESSIONS {
            without_counters(a)
        } else {
            hex::encode(&a.value)
        };
        line.push_str(&format!(" {}={}", a.kind, value));
    }
    line
}

/// A rule's expressions with the counters' values left out.
fn without_counters(expressions: &Attr) -> String {
    parse_attrs(&expressions.value)
        .iter()
        .map(|elem| {
            let parts = parse_attrs(&elem.value);
            let name = parts
                .iter()
                .find(|p| p.kind == attr::EXPR_NAME)
                .map(|p| p.value.as_slice())
                .unwrap_or_default();
            if name == b"counter\0" {
                "counter".to_string()
            } else {
                hex::encode(&elem.value)
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Decodes a grant element: address (4 or 16 bytes) . protocol (1 byte, padded to 4) .
/// port (2 bytes big-endian, padded to 4); prefixes as a start and end key.
fn decode_grant(set: &str, e: &RawElement) -> Option<GrantKey> {
    let v6 = set.starts_with("grants6");
    let alen = if v6 { 16 } else { 4 };
    let (start, transport, port) = decode_key(&e.key, alen)?;
    let source = if set.ends_with("_net") {
        let (end, t2, p2) = decode_key(e.key_end.as_deref()?, alen)?;
        if (t2, p2) != (transport, port) {
            return None;
        }
        range_to_prefix(start, end)?
    } else {
        if e.key_end.is_some() {
            return None;
        }
        IpNet::from(start)
    };
    Some(GrantKey {
        source,
        transport,
        port,
    })
}

/// A grant element's key as the kernel stores it (the inverse of `decode_grant`): the
/// key, and for a prefix the end of its range.
pub fn encode_grant(key: &GrantKey) -> (Vec<u8>, Option<Vec<u8>>) {
    let field = |addr: IpAddr| {
        let mut bytes = match addr {
            IpAddr::V4(a) => a.octets().to_vec(),
            IpAddr::V6(a) => a.octets().to_vec(),
        };
        let protocol = match key.transport {
            Transport::Tcp => 6,
            Transport::Udp => 17,
        };
        bytes.extend_from_slice(&[protocol, 0, 0, 0]);
        bytes.extend_from_slice(&key.port.to_be_bytes());
        bytes.extend_from_slice(&[0, 0]);
        bytes
    };
    let single = key.source.prefix_len() == key.source.max_prefix_len();
    let start = field(key.source.network());
    let end = (!single).then(|| field(key.source.broadcast()));
    (start, end)
}

fn decode_key(key: &[u8], alen: usize) -> Option<(IpAddr, Transport, u16)> {
    if key.len() != alen + 8 {
        return None;
    }
    let addr = if alen == 4 {
        IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(&key[..4]).ok()?))
    } else {
        IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&key[..16]).ok()?))
    };
    let transport = match key[alen] {
        6 => Transport::Tcp,
        17 => Transport::Udp,
        _ => return None,
    };
    let port = u16::from_be_bytes([key[alen + 4], key[alen + 5]]);
    Some((addr, transport, port))
}

/// The CIDR prefix covering exactly `start..=end`, if there is one.
fn range_to_prefix(start: IpAddr, end: IpAddr) -> Option<IpNet> {
    let (s, e, bits): (u128, u128, u8) = match (start, end) {
        (IpAddr::V4(s), IpAddr::V4(e)) => (u32::from(s).into(), u32::from(e).into(), 32),
        (IpAddr::V6(s), IpAddr::V6(e)) => (u128::from(s), u128::from(e), 128),
        _ => return None,
    };
    let host_bits = (s ^ e).count_ones() as u8;
    let net = IpNet::new(start, bits - host_bits).ok()?;
    (net.network() == start && net.broadcast() == end).then_some(net)
}

/// What differs between the kernel and jitd's expectation, one sentence per finding.
///
/// `expected` holds the live grants with their remaining time; grants within `slack`
/// of their end may already be gone from the kernel and are not missed.
pub fn find_drift(
    fingerprint: &Fingerprint,
    kernel: &KernelTable,
    expected: &HashMap<GrantKey, Duration>,
    slack: Duration,
) -> Vec<String> {
    let mut findings = Vec::new();
    let now = kernel.fingerprint();
    if &now != fingerprint {
        let missing = fingerprint.iter().filter(|l| !now.contains(l)).count();
        let extra = now.iter().filter(|l| !fingerprint.contains(l)).count();
        findings.push(format!(
            "the lockdown differs from what jitd applied ({missing} object(s) missing or changed, {extra} unexpected)"
        ));
    }
    let (grants, foreign) = kernel.grants();
    findings.extend(foreign.into_iter().map(|f| format!("unexpected element in {f}")));
    for (key, left) in &grants {
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
        if *want > slack && !grants.contains_key(key) {
            findings.push(format!("grant element {} is missing", describe(key)));
        }
    }
    findings.sort();
    findings
}

/// A grant element as text: `SOURCE . TRANSPORT . PORT`.
pub fn describe(key: &GrantKey) -> String {
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
    use crate::domain::parse_prefix;

    fn key4(addr: [u8; 4], proto: u8, port: u16) -> Vec<u8> {
        let mut k = addr.to_vec();
        k.extend_from_slice(&[proto, 0, 0, 0]);
        k.extend_from_slice(&port.to_be_bytes());
        k.extend_from_slice(&[0, 0]);
        k
    }

    fn elem(key: Vec<u8>, key_end: Option<Vec<u8>>, expires_ms: Option<u64>) -> RawElement {
        RawElement {
            key,
            key_end,
            flags: 0,
            expires_ms,
            packets: None,
        }
    }

    fn table(grants4: Vec<RawElement>, grants4_net: Vec<RawElement>, counter: u8) -> KernelTable {
        let rule = Object {
            kind: msg::RULE,
            attrs: vec![
                Attr {
                    kind: 1,
                    value: b"jitd\0".to_vec(),
                },
                Attr {
                    kind: attr::RULE_HANDLE,
                    value: vec![0, 0, 0, 9],
                },
                Attr {
                    kind: attr::RULE_EXPRESSIONS,
                    value: expressions(counter),
                },
            ],
        };
        let elements = HashMap::from([
            ("grants4".to_string(), grants4),
            ("grants4_net".to_string(), grants4_net),
        ]);
        KernelTable {
            objects: vec![rule],
            elements,
        }
    }

    fn expressions(counter: u8) -> Vec<u8> {
        let nla = |kind: u16, value: &[u8]| {
            let mut b = Vec::new();
            super::super::netlink::put_attr(&mut b, kind, value);
            b
        };
        let mut counter_expr = nla(attr::EXPR_NAME, b"counter\0");
        counter_expr.extend(nla(2, &[0, 0, 0, counter]));
        nla(1, &counter_expr)
    }

    fn key(source: &str, port: u16) -> GrantKey {
        GrantKey {
            source: parse_prefix(source).unwrap(),
            transport: Transport::Tcp,
            port,
        }
    }

    #[test]
    fn grant_keys_decode_from_kernel_bytes() {
        let t = table(
            vec![elem(key4([192, 0, 2, 1], 6, 22), None, Some(100_000))],
            vec![elem(
                key4([10, 0, 0, 0], 6, 3389),
                Some(key4([10, 0, 255, 255], 6, 3389)),
                Some(5_000),
            )],
            0,
        );
        let (grants, foreign) = t.grants();
        assert!(foreign.is_empty());
        assert_eq!(grants[&key("192.0.2.1", 22)], Duration::from_secs(100));
        assert_eq!(grants[&key("10.0.0.0/16", 3389)], Duration::from_secs(5));
    }

    #[test]
    fn grant_keys_encode_as_the_kernel_stores_them() {
        for (set, source, transport) in [
            ("grants4", "192.0.2.1", Transport::Tcp),
            ("grants4_net", "10.0.0.0/16", Transport::Udp),
            ("grants6", "2001:db8::7", Transport::Udp),
            ("grants6_net", "2001:db8::/64", Transport::Tcp),
        ] {
            let k = GrantKey {
                source: parse_prefix(source).unwrap(),
                transport,
                port: 3389,
            };
            let (start, end) = encode_grant(&k);
            assert_eq!(decode_grant(set, &elem(start, end, None)), Some(k), "{source}");
        }
        assert_eq!(
            encode_grant(&key("192.0.2.1", 22)).0,
            key4([192, 0, 2, 1], 6, 22),
            "as the kernel dumps it"
        );
    }

    #[test]
    fn counts_come_from_the_elements_that_counted() {
        let mut used = elem(key4([192, 0, 2, 1], 6, 22), None, Some(100_000));
        used.packets = Some(3);
        let mut idle = elem(key4([192, 0, 2, 2], 6, 22), None, Some(100_000));
        idle.packets = Some(0);
        let t = table(
            vec![used, idle, elem(key4([192, 0, 2, 3], 6, 22), None, None)],
            vec![],
            0,
        );
        assert_eq!(t.counts(), HashMap::from([(key("192.0.2.1", 22), 3)]));
    }

    #[test]
    fn ranges_that_are_not_prefixes_and_odd_keys_are_foreign() {
        let t = table(
            vec![elem(key4([192, 0, 2, 1], 1, 22), None, None)],
            vec![elem(key4([10, 0, 0, 1], 6, 22), Some(key4([10, 0, 0, 7], 6, 22)), None)],
            0,
        );
        assert_eq!(t.grants().1.len(), 2);
    }

    #[test]
    fn counters_handles_and_grant_elements_do_not_change_the_fingerprint() {
        let before = table(vec![], vec![], 0).fingerprint();
        let mut after = table(vec![elem(key4([192, 0, 2, 1], 6, 22), None, Some(1))], vec![], 42);
        after.objects[0].attrs[1].value = vec![0, 0, 0, 77];
        assert_eq!(after.fingerprint(), before);
    }

    #[test]
    fn each_kind_of_tampering_is_found() {
        let base = table(vec![], vec![], 0).fingerprint();
        let expected = HashMap::from([
            (key("192.0.2.1", 22), Duration::from_secs(100)),
            (key("192.0.2.9", 22), Duration::from_millis(300)),
        ]);
        let slack = Duration::from_secs(1);
        let mut changed = table(vec![elem(key4([192, 0, 2, 1], 6, 22), None, Some(100_000))], vec![], 0);
        changed.objects[0].attrs[0].value = b"other\0".to_vec();
        assert!(find_drift(&base, &changed, &expected, slack)[0].starts_with("the lockdown differs"));
        let tampered = table(
            vec![elem(key4([203, 0, 113, 66], 6, 22), None, Some(50_000))],
            vec![],
            0,
        );
        assert_eq!(
            find_drift(&base, &tampered, &expected, slack),
            vec![
                "element 203.0.113.66 . tcp . 22 with no grant behind it",
                "grant element 192.0.2.1 . tcp . 22 is missing"
            ]
        );
        let extended = table(vec![elem(key4([192, 0, 2, 1], 6, 22), None, None)], vec![], 0);
        assert_eq!(
            find_drift(&base, &extended, &expected, slack),
            vec!["element 192.0.2.1 . tcp . 22 lasts 4294967295s, its grant only 100s"]
        );
        let fine = table(vec![elem(key4([192, 0, 2, 1], 6, 22), None, Some(99_500))], vec![], 9);
        assert!(find_drift(&base, &fine, &expected, slack).is_empty());
    }
}
