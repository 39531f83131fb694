//! iptables-nft rules: matches the kernel runs through the xtables compatibility layer
//! (`xt` in nft's JSON, which names them only). Their options are read over netlink
//! (NFTA_MATCH_INFO, the `struct xt_*_info` of each match, in the host's byte order)
//! and judged here for a probe (pure). ufw, Docker and firewalld's iptables backend
//! write `conntrack`, `addrtype` and `multiport` matches this way.

use serde::{Deserialize, Serialize};

use super::{Probe, Tri};

/// One xtables match of a rule, as the kernel holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct XtMatch {
    /// The match's name (`conntrack`, `addrtype`, ...).
    pub name: String,
    /// Its revision (the layout of `info`).
    pub rev: u32,
    /// Its options, the kernel's `struct xt_..._info`, as hex.
    pub info: String,
}

impl XtMatch {
    fn bytes(&self) -> Vec<u8> {
        (0..self.info.len() / 2)
            .filter_map(|i| u8::from_str_radix(self.info.get(2 * i..2 * i + 2)?, 16).ok())
            .collect()
    }
}

/// The conntrack state bit of a new connection (`XT_CONNTRACK_STATE_BIT(IP_CT_NEW)`,
/// the same in `xt_state`).
const STATE_NEW: u32 = 1 << 3;
/// `XT_CONNTRACK_STATE`, `XT_CONNTRACK_STATE_ALIAS` in `match_flags`.
const CONNTRACK_STATE: u16 = 1 << 0;
const CONNTRACK_STATE_ALIAS: u16 = 1 << 13;
/// `XT_CONNTRACK_PROTO`: the match also names the transport.
const CONNTRACK_PROTO: u16 = 1 << 1;
/// Address types (`XT_ADDRTYPE_*`): the probe comes from a unicast address to a local one.
const ADDRTYPE_UNICAST: u16 = 1 << 1;
const ADDRTYPE_LOCAL: u16 = 1 << 2;

/// Whether the match holds for the probe's packet (a new connection from a remote
/// unicast address to a local address).
pub fn judge(m: &XtMatch, probe: &Probe) -> Tri {
    let info = m.bytes();
    let judged = match (m.name.as_str(), m.rev) {
        ("comment", _) => Some(Tri::Yes),
        ("conntrack", 1..=3) => conntrack(&info, m.rev, probe),
        ("state", 0) => u32_at(&info, 0).map(|mask| Tri::from(mask & STATE_NEW != 0)),
        ("addrtype", 0) => addrtype(&info, false),
        ("addrtype", 1) => addrtype(&info, true),
        ("multiport", 1) => multiport(&info, probe),
        ("pkttype", 0) => pkttype(&info),
        ("icmp" | "icmp6", _) => Some(Tri::No),
        _ => None,
    };
    judged.unwrap_or(Tri::Maybe)
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// `struct xt_conntrack_mtinfo1..3`: eight `nf_inet_addr` (128 bytes), two u32 expiry
/// bounds, l4proto (u16), four be16 ports, `match_flags`, `invert_flags`, then the
/// state mask (u8 in revision 1, u16 later).
fn conntrack(info: &[u8], rev: u32, probe: &Probe) -> Option<Tri> {
    let l4proto = u16_at(info, 136)?;
    let flags = u16_at(info, 146)?;
    let invert = u16_at(info, 148)?;
    let state = if rev == 1 {
        u32::from(*info.get(150)?)
    } else {
        u32::from(u16_at(info, 150)?)
    };
    let mut verdict = Tri::Yes;
    if flags & CONNTRACK_STATE != 0 {
        let holds = (state & STATE_NEW != 0) != (invert & CONNTRACK_STATE != 0);
        verdict = verdict.and(Tri::from(holds));
    }
    if flags & CONNTRACK_PROTO != 0 {
        let holds = (l4proto == probe.transport_number()) != (invert & CONNTRACK_PROTO != 0);
        verdict = verdict.and(Tri::from(holds));
    }
    if flags & !(CONNTRACK_STATE | CONNTRACK_STATE_ALIAS | CONNTRACK_PROTO) != 0 {
        verdict = verdict.and(Tri::Maybe);
    }
    Some(verdict)
}

/// `struct xt_addrtype_info_v1 { u16 source, dest; u32 flags; }` (revision 0: u16
/// source, dest; u32 invert_source, invert_dest).
fn addrtype(info: &[u8], v1: bool) -> Option<Tri> {
    let (source, dest) = (u16_at(info, 0)?, u16_at(info, 2)?);
    let (invert_source, invert_dest, limit_iface) = if v1 {
        let flags = u32_at(info, 4)?;
        (flags & 1 != 0, flags & 2 != 0, flags & 12 != 0)
    } else {
        (u32_at(info, 4)? != 0, u32_at(info, 8)? != 0, false)
    };
    let mut verdict = Tri::Yes;
    if source != 0 {
        verdict = verdict.and(Tri::from((source & ADDRTYPE_UNICAST != 0) != invert_source));
    }
    if dest != 0 {
        verdict = verdict.and(Tri::from((dest & ADDRTYPE_LOCAL != 0) != invert_dest));
    }
    // --limit-iface-in: the type is looked up on the incoming interface only
    Some(if limit_iface { verdict.and(Tri::Maybe) } else { verdict })
}

/// `struct xt_multiport_v1 { u8 flags, count; u16 ports[15]; u8 pflags[15]; u8 invert; }`.
fn multiport(info: &[u8], probe: &Probe) -> Option<Tri> {
    let (flags, count) = (*info.first()?, usize::from(*info.get(1)?).min(15));
    let invert = *info.get(47)? != 0;
    let mut hit = false;
    let mut i = 0;
    while i < count {
        let low = u16_at(info, 2 + 2 * i)?;
        let range = *info.get(32 + i)? != 0 && i + 1 < count;
        let high = if range { u16_at(info, 4 + 2 * i)? } else { low };
        hit |= (low..=high).contains(&probe.port);
        i += if range { 2 } else { 1 };
    }
    Some(match flags {
        1 => Tri::from(hit != invert),   // destination ports
        2 if hit && !invert => Tri::Yes, // either: the destination matched
        _ => Tri::Maybe,                 // source ports
    })
}

/// `struct xt_pkttype_info { int pkttype, invert; }`: PACKET_HOST is 0.
fn pkttype(info: &[u8]) -> Option<Tri> {
    let (kind, invert) = (u32_at(info, 0)?, u32_at(info, 4)? != 0);
    Some(Tri::from((kind == 0) != invert))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Transport;

    fn m(name: &str, rev: u32, info: &[u8]) -> XtMatch {
        XtMatch {
            name: name.into(),
            rev,
            info: hex::encode(info),
        }
    }

    fn tcp22() -> Probe {
        Probe {
            v6: false,
            transport: Transport::Tcp,
            port: 22,
        }
    }

    fn conntrack_info(state: u16, invert: bool) -> Vec<u8> {
        let mut info = vec![0u8; 160];
        info[146..148].copy_from_slice(&CONNTRACK_STATE.to_ne_bytes());
        if invert {
            info[148..150].copy_from_slice(&CONNTRACK_STATE.to_ne_bytes());
        }
        info[150..152].copy_from_slice(&state.to_ne_bytes());
        info
    }

    #[test]
    fn conntrack_states_are_judged_for_a_new_connection() {
        let established_related = 2 | 4;
        assert_eq!(
            judge(
                &m("conntrack", 3, &conntrack_info(established_related, false)),
                &tcp22()
            ),
            Tri::No
        );
        assert_eq!(
            judge(&m("conntrack", 3, &conntrack_info(1, false)), &tcp22()),
            Tri::No,
            "invalid"
        );
        assert_eq!(
            judge(&m("conntrack", 3, &conntrack_info(8, false)), &tcp22()),
            Tri::Yes,
            "new"
        );
        assert_eq!(
            judge(&m("conntrack", 3, &conntrack_info(8, true)), &tcp22()),
            Tri::No,
            "! new"
        );
        assert_eq!(judge(&m("conntrack", 3, &[0u8; 10]), &tcp22()), Tri::Maybe, "too short");
        assert_eq!(judge(&m("state", 0, &8u32.to_ne_bytes()), &tcp22()), Tri::Yes);
        assert_eq!(judge(&m("state", 0, &6u32.to_ne_bytes()), &tcp22()), Tri::No);
    }

    #[test]
    fn addrtype_multiport_and_unknown_matches() {
        let mut local = ADDRTYPE_LOCAL.to_ne_bytes().to_vec();
        local.splice(0..0, 0u16.to_ne_bytes());
        local.extend_from_slice(&0u32.to_ne_bytes());
        assert_eq!(judge(&m("addrtype", 1, &local), &tcp22()), Tri::Yes, "--dst-type LOCAL");
        let mut broadcast = local.clone();
        broadcast[2..4].copy_from_slice(&(1u16 << 3).to_ne_bytes());
        assert_eq!(judge(&m("addrtype", 1, &broadcast), &tcp22()), Tri::No);
        let mut ports = vec![1u8, 3];
        for p in [80u16, 20, 30] {
            ports.extend_from_slice(&p.to_ne_bytes());
        }
        ports.resize(32, 0);
        ports.extend_from_slice(&[0, 1, 0]);
        ports.resize(48, 0);
        assert_eq!(judge(&m("multiport", 1, &ports), &tcp22()), Tri::Yes, "20:30 holds 22");
        ports[47] = 1;
        assert_eq!(judge(&m("multiport", 1, &ports), &tcp22()), Tri::No, "inverted");
        assert_eq!(judge(&m("recent", 0, &[]), &tcp22()), Tri::Maybe);
        assert_eq!(judge(&m("comment", 0, &[]), &tcp22()), Tri::Yes);
    }
}
