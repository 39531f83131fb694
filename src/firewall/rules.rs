//! Builds jitd's nftables table and its changes as batches (pure: values in, values out).
//!
//! ```text
//! table inet jitd
//!   set exempt4 / exempt6            ipv4|ipv6 prefixes           (interval)
//!   set locked                       inet_proto . inet_service
//!   set grants4 / grants6            addr . inet_proto . inet_service   (timeout)
//!   set grants4_net / grants6_net    prefix . inet_proto . inet_service (interval, timeout)
//!   set cut4 / cut6                  addr . inet_proto . sport . dport  (timeout): terminated sessions
//!   chain input  (filter hook input priority -10; policy accept)
//!     iif "lo" accept
//!     tcp flags & (fin|syn|rst|ack) == syn [iifname {..}] meta l4proto . th dport @locked jump syn_check
//!     ct direction reply jump cut
//!     ct state established,related accept
//!     jump cut
//!     ip saddr @exempt4 accept ; ip6 saddr @exempt6 accept
//!     meta l4proto udp ip saddr . meta l4proto . th dport @grants4 ct mark set ct mark | 0x01000000 accept   (x4)
//!     [iifname {..}] meta l4proto udp ct state new  meta l4proto . th dport @locked counter drop
//!   chain syn_check                  a new TCP connection to a locked port
//!     ip saddr @exempt4 accept ; ip6 saddr @exempt6 accept
//!     ip saddr . meta l4proto . th dport @grants4 ct mark set ct mark | 0x01000000 accept   (x4)
//!     counter drop
//!   chain cut                        sessions `jitctl revoke --terminate` cut
//!     meta l4proto tcp ip saddr . meta l4proto . th sport . th dport @cut4 reject with tcp reset
//!     ip saddr . meta l4proto . th sport . th dport @cut4 drop             (and the same for ip6)
//! ```
//!
//! A TCP SYN to a locked port is judged before conntrack is asked: whatever state
//! conntrack gives it (a stray ACK on an old 4-tuple can make a fresh SYN look
//! "established"), it needs an exempt source or a live grant. The flags mask ignores
//! ECE and CWR, so an ECN setup SYN (SYN|ECE|CWR) counts as a new connection too.
//! Every other TCP packet is let through: a session that was open before the lockdown,
//! on a host where conntrack was not tracking it yet, shows up as an unknown flow whose
//! next packet is an ACK; conntrack picks it up as "new", so a `ct state new drop`
//! would cut it. The fast path of an established session costs two failed compares
//! (the SYN test, the direction test) before `ct state established` accepts it.
//!
//! A grant's accept rule sets bit [`GRANT_CT_MARK`] of the connection's ct mark, so
//! that `revoke --terminate` cuts exactly the sessions grants admitted
//! ([`super::conntrack`]). A terminated session's 4-tuple goes into `cut4`/`cut6`:
//! once its conntrack entry is deleted, its next packet is picked up as a new flow
//! (client to host: not established, reaches the second `jump cut`) or, when the host
//! spoke first, as the reply direction of a new flow (caught by the first one).
//!
//! Grants are set elements with a timeout, so the kernel removes them on its own: a
//! dead daemon never leaves a port open.

use std::borrow::Cow;
use std::collections::HashSet;
use std::time::Duration;

use ipnet::IpNet;
use nftables::batch::Batch;
use nftables::expr::{
    BinaryOperation, Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField, Prefix, SetItem, CT,
};
use nftables::schema::{
    Chain, Element, NfCmd, NfListObject, NfObject, Nftables, Rule, Set, SetFlag, SetType, SetTypeValue, Table,
};
use nftables::stmt::{Counter, JumpTarget, Mangle, Match, Operator, Reject, RejectType, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};

use crate::config::Config;
use crate::domain::{GrantElement, GrantKey, Transport};

/// The name of the one table jitd owns (family `inet`).
pub const TABLE: &str = "jitd";
/// The base chain that filters inbound traffic.
pub const CHAIN: &str = "input";
/// Priority of the input chain: just before the usual `filter` (0) chains.
pub const CHAIN_PRIORITY: i32 = -10;
/// The regular chain that judges a new TCP connection to a locked port.
pub const SYN_CHAIN: &str = "syn_check";
/// The regular chain that stops the sessions `revoke --terminate` cut.
pub const CUT_CHAIN: &str = "cut";
/// The ct mark bit a grant's accept rule sets on the connection it admits (the other
/// bits are left as they are). `revoke --terminate` cuts only connections with it.
pub const GRANT_CT_MARK: u32 = 0x0100_0000;
/// How long a terminated session's 4-tuple stays in `cut4`/`cut6`.
pub const CUT_TIMEOUT: Duration = Duration::from_secs(600);
const FAMILY: NfFamily = NfFamily::INet;
/// Knock packets a second one source may send before the kernel drops them.
pub const KNOCK_RATE: u32 = 10;
/// Knock packets one source may send at once.
pub const KNOCK_BURST: u32 = 20;

/// What the lockdown consists of, independent of any grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockdownSpec {
    /// Protected (transport, port) pairs.
    pub locked: Vec<(Transport, u16)>,
    /// Sources that pass before the lockdown.
    pub exempt: Vec<IpNet>,
    /// Interfaces the lockdown applies to; empty: all.
    pub interfaces: Vec<String>,
    /// The UDP port remote knocks arrive on, rate-limited per source prefix by the
    /// kernel.
    pub knock_port: Option<u16>,
    /// The IPv6 prefix length the kernel counts knocks by (IPv4: per address).
    pub knock_prefix6: u8,
}

impl LockdownSpec {
    /// The lockdown a validated policy asks for.
    pub fn from_config(config: &Config) -> LockdownSpec {
        let mut locked = Vec::new();
        for p in &config.ports {
            for &t in p.protocol.transports() {
                locked.push((t, p.port));
            }
        }
        LockdownSpec {
            locked,
            // overlapping prefixes cannot share an interval set: merge them first
            exempt: IpNet::aggregate(&config.lockdown.exempt_sources),
            interfaces: config.lockdown.interfaces.clone(),
            knock_port: config.remote.as_ref().map(|r| r.listen.port()),
            knock_prefix6: config
                .remote
                .as_ref()
                .map_or(crate::remote::gate::DEFAULT_PREFIX6, |r| r.prefix6),
        }
    }
}

/// The grant set an element belongs in: single addresses go to hash sets (fast,
/// no overlap rules), prefixes to interval sets.
pub fn grant_set(source: &IpNet) -> &'static str {
    let single = source.prefix_len() == source.max_prefix_len();
    match (source, single) {
        (IpNet::V4(_), true) => "grants4",
        (IpNet::V4(_), false) => "grants4_net",
        (IpNet::V6(_), true) => "grants6",
        (IpNet::V6(_), false) => "grants6_net",
    }
}

/// All four grant sets, in rule order.
pub const GRANT_SETS: [&str; 4] = ["grants4", "grants4_net", "grants6", "grants6_net"];

/// The two sets of terminated sessions.
pub const CUT_SETS: [&str; 2] = ["cut4", "cut6"];

/// One session `revoke --terminate` cuts: the client's address and port, the
/// transport and the (locked) port it reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CutKey {
    /// The client's address.
    pub source: std::net::IpAddr,
    /// TCP or UDP.
    pub transport: Transport,
    /// The client's port.
    pub source_port: u16,
    /// The port on this host.
    pub port: u16,
}

/// A batch that puts `sessions` into the cut sets for [`CUT_TIMEOUT`]; `None` when
/// there are none.
pub fn cut_sessions(sessions: &[CutKey]) -> Option<Nftables<'static>> {
    if sessions.is_empty() {
        return None;
    }
    let mut batch = Batch::new();
    let timed: Vec<(CutKey, Duration)> = sessions.iter().map(|k| (*k, CUT_TIMEOUT)).collect();
    add_cut_elements(&mut batch, &timed);
    Some(batch.to_nftables())
}

/// Adds `cuts` to the cut sets of `batch`, each for the time it has left.
fn add_cut_elements(batch: &mut Batch<'static>, cuts: &[(CutKey, Duration)]) {
    for set in CUT_SETS {
        let elems: Vec<_> = cuts
            .iter()
            .filter(|(k, _)| (set == "cut4") == k.source.is_ipv4())
            .map(|(k, left)| {
                let key = concat(vec![
                    Expression::String(k.source.to_string().into()),
                    s(k.transport.name()),
                    Expression::Number(u32::from(k.source_port)),
                    Expression::Number(u32::from(k.port)),
                ]);
                timed(key, *left)
            })
            .collect();
        if !elems.is_empty() {
            batch.add(element(set, elems));
        }
    }
}

fn timed(key: Expression<'static>, timeout: Duration) -> Expression<'static> {
    Expression::Named(NamedExpression::Elem(nftables::expr::Elem {
        val: Box::new(key),
        timeout: Some(timeout_secs(timeout)),
        ..Default::default()
    }))
}

/// A batch as the JSON nftables reads. Each grant set gets a `counter` statement
/// (`"stmt": [{"counter": null}]`, which the nftables crate 0.6 has no field for), so
/// every element carries a counter of its own: of the packets its lookup let in, that
/// is the new connections it admitted (a TCP SYN in `syn_check`, a UDP packet of a flow
/// not yet answered in `input`). The kernel reads them back over netlink
/// ([`super::kernel::KernelTable::counts`]).
pub fn to_json(batch: &Nftables<'_>) -> serde_json::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(br#"{"nftables":["#);
    for (i, object) in batch.objects.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        match counted_set(object)? {
            Some(value) => serde_json::to_writer(&mut out, &value)?,
            None => serde_json::to_writer(&mut out, object)?,
        }
    }
    out.extend_from_slice(b"]}");
    Ok(out)
}

/// The `add set` command of a grant set, with its counter statement.
fn counted_set(object: &NfObject<'_>) -> serde_json::Result<Option<serde_json::Value>> {
    let NfObject::CmdObject(NfCmd::Add(NfListObject::Set(set))) = object else {
        return Ok(None);
    };
    if set.table != TABLE || !GRANT_SETS.contains(&set.name.as_ref()) {
        return Ok(None);
    }
    let mut value = serde_json::to_value(object)?;
    value["add"]["set"]["stmt"] = serde_json::json!([{ "counter": null }]);
    Ok(Some(value))
}

/// A batch that replaces jitd's table whole (or creates it): the lockdown plus the
/// given live grants, in one transaction, so the ports are never open in between.
pub fn replace_table(spec: &LockdownSpec, grants: &[GrantElement]) -> Nftables<'static> {
    replace_table_with_cuts(spec, grants, &[])
}

/// [`replace_table`], with the sessions still cut (each with the time it has left) put
/// back into the cut sets in the same transaction: a rebuilt table never lets a cut
/// session resume.
pub fn replace_table_with_cuts(
    spec: &LockdownSpec,
    grants: &[GrantElement],
    cuts: &[(CutKey, Duration)],
) -> Nftables<'static> {
    let mut batch = Batch::new();
    // `add` is a no-op when the table exists, so the `delete` never fails.
    batch.add(NfListObject::Table(table()));
    batch.delete(NfListObject::Table(table()));
    batch.add(NfListObject::Table(table()));
    for set in sets() {
        batch.add(NfListObject::Set(Box::new(set)));
    }
    for chain in [CHAIN, SYN_CHAIN, CUT_CHAIN] {
        batch.add(NfListObject::Chain(chain_named(chain)));
    }
    for (chain, expr) in chain_rules(spec) {
        batch.add(NfListObject::Rule(Rule {
            family: FAMILY,
            table: TABLE.into(),
            chain: chain.into(),
            expr: expr.into(),
            ..Default::default()
        }));
    }
    add_prefix_elements(
        &mut batch,
        "exempt4",
        spec.exempt.iter().filter(|p| matches!(p, IpNet::V4(_))),
    );
    add_prefix_elements(
        &mut batch,
        "exempt6",
        spec.exempt.iter().filter(|p| matches!(p, IpNet::V6(_))),
    );
    let locked: Vec<Expression<'static>> = spec
        .locked
        .iter()
        .map(|(t, port)| concat(vec![s(t.name()), Expression::Number(u32::from(*port))]))
        .collect();
    if !locked.is_empty() {
        batch.add(element("locked", locked));
    }
    add_grant_elements(&mut batch, grants);
    add_cut_elements(&mut batch, cuts);
    batch.to_nftables()
}

/// A batch that removes jitd's table if it exists (and succeeds if it does not).
pub fn remove_table() -> Nftables<'static> {
    let mut batch = Batch::new();
    batch.add(NfListObject::Table(table()));
    batch.delete(NfListObject::Table(table()));
    batch.to_nftables()
}

/// A batch that removes the `remove` grants and adds the `add` grants in one
/// transaction (a replacement never leaves a gap). `None` when there is nothing to do.
pub fn change_grants(remove: &[GrantKey], add: &[GrantElement]) -> Option<Nftables<'static>> {
    if remove.is_empty() && add.is_empty() {
        return None;
    }
    let mut batch = Batch::new();
    for set in GRANT_SETS {
        let elems: Vec<_> = remove
            .iter()
            .filter(|k| grant_set(&k.source) == set)
            .map(grant_key_expr)
            .collect();
        if !elems.is_empty() {
            batch.delete(element(set, elems));
        }
    }
    add_grant_elements(&mut batch, add);
    Some(batch.to_nftables())
}

fn add_grant_elements(batch: &mut Batch<'static>, grants: &[GrantElement]) {
    for set in GRANT_SETS {
        let elems: Vec<_> = grants
            .iter()
            .filter(|g| grant_set(&g.key.source) == set)
            .map(|g| timed(grant_key_expr(&g.key), g.timeout))
            .collect();
        if !elems.is_empty() {
            batch.add(element(set, elems));
        }
    }
}

/// Whole seconds the kernel keeps an element: rounded up, at least 1.
pub fn timeout_secs(timeout: Duration) -> u32 {
    let secs = timeout.as_secs() + u64::from(timeout.subsec_nanos() > 0);
    u32::try_from(secs.max(1)).unwrap_or(u32::MAX)
}

fn add_prefix_elements<'a>(batch: &mut Batch<'static>, set: &str, prefixes: impl Iterator<Item = &'a IpNet>) {
    let elems: Vec<_> = prefixes.map(prefix_expr).collect();
    if !elems.is_empty() {
        batch.add(element(set, elems));
    }
}

fn grant_key_expr(key: &GrantKey) -> Expression<'static> {
    concat(vec![
        prefix_expr(&key.source),
        s(key.transport.name()),
        Expression::Number(u32::from(key.port)),
    ])
}

fn prefix_expr(net: &IpNet) -> Expression<'static> {
    if net.prefix_len() == net.max_prefix_len() {
        Expression::String(net.addr().to_string().into())
    } else {
        Expression::Named(NamedExpression::Prefix(Prefix {
            addr: Box::new(Expression::String(net.network().to_string().into())),
            len: u32::from(net.prefix_len()),
        }))
    }
}

fn table() -> Table<'static> {
    Table {
        family: FAMILY,
        name: TABLE.into(),
        ..Default::default()
    }
}

/// The base chain `input`, or one of the regular chains it jumps to.
fn chain_named(name: &'static str) -> Chain<'static> {
    let base = name == CHAIN;
    Chain {
        family: FAMILY,
        table: TABLE.into(),
        name: name.into(),
        _type: base.then_some(NfChainType::Filter),
        hook: base.then_some(NfHook::Input),
        prio: base.then_some(CHAIN_PRIORITY),
        policy: base.then_some(NfChainPolicy::Accept),
        ..Default::default()
    }
}

fn sets() -> Vec<Set<'static>> {
    let addr4 = SetType::Ipv4Addr;
    let addr6 = SetType::Ipv6Addr;
    let key = |addr| SetTypeValue::Concatenated(Cow::Owned(vec![addr, SetType::InetProto, SetType::InetService]));
    let cut = |addr| {
        SetTypeValue::Concatenated(Cow::Owned(vec![
            addr,
            SetType::InetProto,
            SetType::InetService,
            SetType::InetService,
        ]))
    };
    vec![
        set("exempt4", SetTypeValue::Single(addr4), &[SetFlag::Interval]),
        set("exempt6", SetTypeValue::Single(addr6), &[SetFlag::Interval]),
        set(
            "locked",
            SetTypeValue::Concatenated(Cow::Owned(vec![SetType::InetProto, SetType::InetService])),
            &[],
        ),
        set("grants4", key(addr4), &[SetFlag::Timeout]),
        set("grants4_net", key(addr4), &[SetFlag::Interval, SetFlag::Timeout]),
        set("grants6", key(addr6), &[SetFlag::Timeout]),
        set("grants6_net", key(addr6), &[SetFlag::Interval, SetFlag::Timeout]),
        set("cut4", cut(addr4), &[SetFlag::Timeout]),
        set("cut6", cut(addr6), &[SetFlag::Timeout]),
    ]
}

fn set(name: &'static str, set_type: SetTypeValue<'static>, flags: &[SetFlag]) -> Set<'static> {
    Set {
        family: FAMILY,
        table: TABLE.into(),
        name: name.into(),
        set_type,
        flags: (!flags.is_empty()).then(|| flags.iter().copied().collect::<HashSet<_>>()),
        ..Default::default()
    }
}

fn element(set: &str, elems: Vec<Expression<'static>>) -> NfListObject<'static> {
    NfListObject::Element(Element {
        family: FAMILY,
        table: TABLE.into(),
        name: set.to_string().into(),
        elem: elems.into(),
    })
}

type RuleBody = Vec<Statement<'static>>;

/// Every rule of the table: its chain and its statements, in order.
fn chain_rules(spec: &LockdownSpec) -> Vec<(&'static str, RuleBody)> {
    let mut rules: Vec<(&'static str, RuleBody)> = input_rules(spec).into_iter().map(|r| (CHAIN, r)).collect();
    rules.extend(syn_check_rules().into_iter().map(|r| (SYN_CHAIN, r)));
    rules.extend(cut_rules().into_iter().map(|r| (CUT_CHAIN, r)));
    rules
}

/// The base chain: lo, new TCP connections to locked ports, cut sessions, conntrack,
/// then UDP.
fn input_rules(spec: &LockdownSpec) -> Vec<RuleBody> {
    let interfaces = || -> RuleBody {
        if spec.interfaces.is_empty() {
            return Vec::new();
        }
        let names = spec.interfaces.iter().map(|n| SetItem::Element(s(n))).collect();
        vec![eq(
            meta(MetaKey::Iifname),
            Expression::Named(NamedExpression::Set(names)),
        )]
    };
    // A new TCP connection: SYN set, FIN, RST and ACK clear (ECE and CWR ignored).
    let mut syn = vec![eq(
        Expression::BinaryOperation(Box::new(BinaryOperation::AND(
            payload("tcp", "flags"),
            Expression::List(vec![s("fin"), s("syn"), s("rst"), s("ack")]),
        ))),
        s("syn"),
    )];
    syn.extend(interfaces());
    syn.push(eq(locked_key(), s("@locked")));
    syn.push(jump(SYN_CHAIN));
    let mut rules = vec![
        vec![eq(meta(MetaKey::Iif), s("lo")), Statement::Accept(None)],
        syn,
        vec![eq(ct("direction"), s("reply")), jump(CUT_CHAIN)],
        vec![
            Statement::Match(Match {
                left: ct("state"),
                right: Expression::List(vec![s("established"), s("related")]),
                op: Operator::IN,
            }),
            Statement::Accept(None),
        ],
        vec![jump(CUT_CHAIN)],
    ];
    rules.splice(1..1, knock_meter_rules(spec.knock_port, spec.knock_prefix6));
    rules.extend(exempt_rules());
    // UDP has no handshake: a grant admits what conntrack has not seen before...
    for mut grant in grant_rules() {
        grant.insert(0, eq(meta(MetaKey::L4proto), s("udp")));
        rules.push(grant);
    }
    // ... and the rest of it is dropped.
    let mut udp = interfaces();
    udp.push(eq(meta(MetaKey::L4proto), s("udp")));
    udp.push(Statement::Match(Match {
        left: ct("state"),
        right: s("new"),
        op: Operator::IN,
    }));
    udp.push(eq(locked_key(), s("@locked")));
    udp.extend(counter_drop());
    rules.push(udp);
    rules
}

/// Knocks beyond [`KNOCK_RATE`] a second (burst [`KNOCK_BURST`]) from one source are
/// dropped in the kernel (meters `knock4`/`knock6`, dynamic sets of bounded size), so a
/// flood from one address never reaches jitd's socket. IPv6 sources are counted by
/// their `/prefix6` (the meter's key is the masked address): the addresses of one
/// subscriber's /64 are one source.
fn knock_meter_rules(port: Option<u16>, prefix6: u8) -> Vec<RuleBody> {
    let Some(port) = port else { return Vec::new() };
    let key6 = match prefix6 {
        128.. => payload("ip6", "saddr"),
        len => Expression::BinaryOperation(Box::new(BinaryOperation::AND(
            payload("ip6", "saddr"),
            Expression::String(ipv6_mask(len).to_string().into()),
        ))),
    };
    [("knock4", "ipv4", payload("ip", "saddr")), ("knock6", "ipv6", key6)]
        .into_iter()
        .map(|(name, nfproto, key)| {
            let mut rule = vec![
                eq(meta(MetaKey::Nfproto), s(nfproto)),
                eq(meta(MetaKey::L4proto), s("udp")),
                eq(payload("th", "dport"), Expression::Number(u32::from(port))),
                Statement::Meter(nftables::stmt::Meter {
                    name: name.into(),
                    key,
                    stmt: Box::new(Statement::Limit(nftables::stmt::Limit {
                        rate: KNOCK_RATE,
                        rate_unit: None,
                        per: Some("second".into()),
                        burst: Some(KNOCK_BURST),
                        burst_unit: None,
                        inv: Some(true),
                    })),
                }),
            ];
            rule.extend(counter_drop());
            rule
        })
        .collect()
}

/// The IPv6 netmask of a `/len` prefix.
fn ipv6_mask(len: u8) -> std::net::Ipv6Addr {
    let bits = u128::MAX.checked_shl(128 - u32::from(len.min(128))).unwrap_or(0);
    std::net::Ipv6Addr::from(bits)
}

/// A new TCP connection to a locked port: exempt sources and grants pass, the rest is
/// dropped, whatever conntrack thinks of it.
fn syn_check_rules() -> Vec<RuleBody> {
    let mut rules = exempt_rules();
    rules.extend(grant_rules());
    rules.push(counter_drop());
    rules
}

/// Sessions in the cut sets: TCP gets a reset (the client learns at once), the rest
/// is dropped.
fn cut_rules() -> Vec<RuleBody> {
    let mut rules = Vec::new();
    for (set, family) in [("@cut4", "ip"), ("@cut6", "ip6")] {
        let key = || {
            concat(vec![
                payload(family, "saddr"),
                meta(MetaKey::L4proto),
                payload("th", "sport"),
                payload("th", "dport"),
            ])
        };
        rules.push(vec![
            eq(meta(MetaKey::L4proto), s("tcp")),
            eq(key(), s(set)),
            Statement::Reject(Some(Reject::new(Some(RejectType::TCPReset), None))),
        ]);
        rules.push(vec![eq(key(), s(set)), Statement::Drop(None)]);
    }
    rules
}

fn exempt_rules() -> Vec<RuleBody> {
    vec![
        vec![eq(payload("ip", "saddr"), s("@exempt4")), Statement::Accept(None)],
        vec![eq(payload("ip6", "saddr"), s("@exempt6")), Statement::Accept(None)],
    ]
}

/// One rule per grant set: a match marks the connection as admitted by a grant.
fn grant_rules() -> Vec<RuleBody> {
    GRANT_SETS
        .iter()
        .map(|set| {
            let family = if set.starts_with("grants4") { "ip" } else { "ip6" };
            let key = concat(vec![
                payload(family, "saddr"),
                meta(MetaKey::L4proto),
                payload("th", "dport"),
            ]);
            vec![
                eq(key, s(&format!("@{set}"))),
                Statement::Mangle(Mangle {
                    key: ct("mark"),
                    value: Expression::BinaryOperation(Box::new(BinaryOperation::OR(vec![
                        ct("mark"),
                        Expression::Number(GRANT_CT_MARK),
                    ]))),
                }),
                Statement::Accept(None),
            ]
        })
        .collect()
}

fn locked_key() -> Expression<'static> {
    concat(vec![meta(MetaKey::L4proto), payload("th", "dport")])
}

fn counter_drop() -> RuleBody {
    vec![Statement::Counter(Counter::Anonymous(None)), Statement::Drop(None)]
}

fn jump(chain: &'static str) -> Statement<'static> {
    Statement::Jump(JumpTarget { target: chain.into() })
}

fn s(text: &str) -> Expression<'static> {
    Expression::String(text.to_string().into())
}

fn concat(parts: Vec<Expression<'static>>) -> Expression<'static> {
    Expression::Named(NamedExpression::Concat(parts))
}

fn payload(protocol: &'static str, field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(PayloadField {
        protocol: protocol.into(),
        field: field.into(),
    })))
}

fn meta(key: MetaKey) -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta { key }))
}

fn ct(key: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::CT(CT {
        key: key.into(),
        ..Default::default()
    }))
}

fn eq(left: Expression<'static>, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(Match {
        left,
        right,
        op: Operator::EQ,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::parse_prefix;
    use serde_json::Value;

    fn spec() -> LockdownSpec {
        LockdownSpec {
            locked: vec![(Transport::Tcp, 22), (Transport::Udp, 3389)],
            exempt: vec![parse_prefix("10.9.0.0/16").unwrap(), parse_prefix("fd00::/8").unwrap()],
            interfaces: vec![],
            knock_port: None,
            knock_prefix6: 64,
        }
    }

    fn json(batch: &Nftables) -> Value {
        serde_json::to_value(batch).unwrap()
    }

    fn commands(batch: &Nftables) -> Vec<Value> {
        json(batch)["nftables"].as_array().unwrap().clone()
    }

    #[test]
    fn replace_table_deletes_and_recreates_in_one_batch() {
        let cmds = commands(&replace_table(&spec(), &[]));
        assert!(cmds[0]["add"]["table"]["name"] == "jitd");
        assert!(cmds[1]["delete"]["table"]["name"] == "jitd");
        assert!(cmds[2]["add"]["table"]["name"] == "jitd");
        let chain = cmds.iter().find(|c| c["add"]["chain"].is_object()).unwrap();
        assert_eq!(chain["add"]["chain"]["hook"], "input");
        assert_eq!(chain["add"]["chain"]["policy"], "accept");
        let rules = cmds.iter().filter(|c| c["add"]["rule"].is_object()).count();
        assert_eq!(rules, 23);
    }

    fn rules_of(batch: &Nftables, chain: &str) -> Vec<String> {
        commands(batch)
            .iter()
            .filter(|c| c["add"]["rule"]["chain"] == chain)
            .map(|c| c["add"]["rule"]["expr"].to_string())
            .collect()
    }

    #[test]
    fn a_syn_to_a_locked_port_is_judged_before_conntrack() {
        let input = rules_of(&replace_table(&spec(), &[]), CHAIN);
        let syn = input
            .iter()
            .position(|r| r.contains(r#"{"jump":{"target":"syn_check"}}"#));
        let established = input.iter().position(|r| r.contains("established"));
        assert_eq!(syn, Some(1), "{input:?}");
        assert!(established > syn, "{input:?}");
        assert!(
            input[1].contains(r#"["fin","syn","rst","ack"]"#),
            "ECE and CWR are masked off"
        );
        assert!(input[1].contains("@locked"));
        let check = rules_of(&replace_table(&spec(), &[]), SYN_CHAIN);
        assert_eq!(check.len(), 7, "{check:?}");
        assert!(check[0].contains("@exempt4") && check[1].contains("@exempt6"));
        assert!(check[6].contains("counter") && check[6].contains("drop"), "{check:?}");
    }

    #[test]
    fn grant_rules_mark_the_connections_they_admit() {
        let batch = replace_table(&spec(), &[]);
        let mark = format!(r#"{{"|":[{{"ct":{{"key":"mark"}}}},{GRANT_CT_MARK}]}}"#);
        let check = rules_of(&batch, SYN_CHAIN);
        assert_eq!(check.iter().filter(|r| r.contains(&mark)).count(), 4, "{check:?}");
        let input = rules_of(&batch, CHAIN);
        let udp_grants: Vec<_> = input.iter().filter(|r| r.contains("@grants")).collect();
        assert_eq!(udp_grants.len(), 4);
        assert!(udp_grants
            .iter()
            .all(|r| r.contains(&mark) && r.contains(r#""right":"udp""#)));
    }

    #[test]
    fn cut_sessions_are_checked_in_both_directions_and_reset() {
        let batch = replace_table(&spec(), &[]);
        let input = rules_of(&batch, CHAIN);
        assert!(input[2].contains(r#""direction""#) && input[2].contains(r#"{"jump":{"target":"cut"}}"#));
        assert_eq!(input[4], r#"[{"jump":{"target":"cut"}}]"#);
        let cut = rules_of(&batch, CUT_CHAIN);
        assert_eq!(cut.len(), 4);
        assert!(cut[0].contains("tcp reset") && cut[0].contains("@cut4"), "{cut:?}");
        assert!(cut[3].contains("@cut6") && cut[3].contains("drop"), "{cut:?}");
        let key = |source: &str, transport| CutKey {
            source: source.parse().unwrap(),
            transport,
            source_port: 40001,
            port: 22,
        };
        let add = cut_sessions(&[key("10.0.0.1", Transport::Tcp), key("fd00::1", Transport::Udp)]).unwrap();
        let text = serde_json::to_string(&add).unwrap();
        assert!(
            text.contains(
                r#""name":"cut4","elem":[{"elem":{"val":{"concat":["10.0.0.1","tcp",40001,22]},"timeout":600"#
            ),
            "{text}"
        );
        assert!(text.contains(r#"{"concat":["fd00::1","udp",40001,22]}"#), "{text}");
        assert!(cut_sessions(&[]).is_none());
        // a rebuilt table holds the cuts still in force, for the time they have left
        let cuts = [(key("10.0.0.1", Transport::Tcp), Duration::from_millis(41_500))];
        let rebuilt = serde_json::to_string(&replace_table_with_cuts(&spec(), &[], &cuts)).unwrap();
        assert!(
            rebuilt.contains(
                r#""name":"cut4","elem":[{"elem":{"val":{"concat":["10.0.0.1","tcp",40001,22]},"timeout":42"#
            ),
            "{rebuilt}"
        );
    }

    #[test]
    fn locked_and_exempt_elements_follow_the_spec() {
        let text = serde_json::to_string(&replace_table(&spec(), &[])).unwrap();
        assert!(text.contains(r#"{"concat":["tcp",22]}"#), "{text}");
        assert!(text.contains(r#"{"concat":["udp",3389]}"#), "{text}");
        assert!(
            text.contains(r#""name":"exempt4","elem":[{"prefix":{"addr":"10.9.0.0","len":16}}]"#),
            "{text}"
        );
        assert!(
            text.contains(r#""name":"exempt6","elem":[{"prefix":{"addr":"fd00::","len":8}}]"#),
            "{text}"
        );
    }

    #[test]
    fn the_grant_sets_count_per_element_and_nothing_else_changes() {
        let batch = replace_table(&spec(), &[]);
        let rendered: Value = serde_json::from_slice(&to_json(&batch).unwrap()).unwrap();
        let mut typed = json(&batch);
        let mut counted = Vec::new();
        for (cmd, typed) in rendered["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .zip(typed["nftables"].as_array_mut().unwrap())
        {
            if let Some(stmt) = cmd["add"]["set"].get("stmt") {
                assert_eq!(stmt, &serde_json::json!([{ "counter": null }]));
                counted.push(cmd["add"]["set"]["name"].as_str().unwrap().to_string());
                typed["add"]["set"]["stmt"] = stmt.clone();
            }
            assert_eq!(cmd, typed);
        }
        assert_eq!(counted, GRANT_SETS, "the grant sets, and only they");
    }

    #[test]
    fn only_a_bare_syn_is_dropped_for_tcp() {
        let text = serde_json::to_string(&replace_table(&spec(), &[])).unwrap();
        assert!(text.contains(r#"{"&":[{"payload":{"protocol":"tcp","field":"flags"}},["fin","syn","rst","ack"]]}"#));
        assert!(!text.contains("iifname"), "no interface filter when none configured");
    }

    #[test]
    fn interfaces_restrict_the_drop_rules() {
        let mut spec = spec();
        spec.interfaces = vec!["eth0".into(), "ens3".into()];
        let text = serde_json::to_string(&replace_table(&spec, &[])).unwrap();
        assert_eq!(text.matches(r#"{"set":["eth0","ens3"]}"#).count(), 2, "{text}");
    }

    #[test]
    fn grants_go_to_the_set_of_their_kind() {
        let g = |src: &str| GrantElement {
            key: GrantKey {
                source: parse_prefix(src).unwrap(),
                transport: Transport::Tcp,
                port: 22,
            },
            timeout: Duration::from_millis(1500),
        };
        let batch = change_grants(
            &[],
            &[
                g("203.0.113.7"),
                g("198.51.100.0/24"),
                g("2001:db8::1"),
                g("2001:db8::/64"),
            ],
        )
        .unwrap();
        let cmds = commands(&batch);
        let sets: Vec<_> = cmds
            .iter()
            .map(|c| c["add"]["element"]["name"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(sets, GRANT_SETS);
        let text = serde_json::to_string(&batch).unwrap();
        assert!(
            text.contains(r#"{"elem":{"val":{"concat":["203.0.113.7","tcp",22]},"timeout":2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"{"prefix":{"addr":"198.51.100.0","len":24}}"#),
            "{text}"
        );
    }

    #[test]
    fn removal_and_addition_share_one_batch() {
        let key = GrantKey {
            source: parse_prefix("203.0.113.7").unwrap(),
            transport: Transport::Udp,
            port: 53,
        };
        let batch = change_grants(
            &[key],
            &[GrantElement {
                key,
                timeout: Duration::from_secs(60),
            }],
        )
        .unwrap();
        let cmds = commands(&batch);
        assert_eq!(cmds.len(), 2);
        assert!(cmds[0]["delete"]["element"].is_object());
        assert!(cmds[1]["add"]["element"].is_object());
        assert!(change_grants(&[], &[]).is_none());
    }

    #[test]
    fn timeouts_round_up_to_whole_seconds() {
        assert_eq!(timeout_secs(Duration::from_millis(1)), 1);
        assert_eq!(timeout_secs(Duration::ZERO), 1);
        assert_eq!(timeout_secs(Duration::from_millis(2000)), 2);
        assert_eq!(timeout_secs(Duration::from_millis(2001)), 3);
    }
}
