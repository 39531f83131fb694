//! Cuts the sessions grants admitted (`jitctl revoke --terminate`). It owns the
//! ctnetlink side: the conntrack entries that carry [`GRANT_CT_MARK`] (set by a grant's
//! accept rule, see [`super::rules`]) are dumped, those from a grant's source to its
//! port and transport are chosen (pure: [`admitted_by`]), less those a grant still live
//! allows ([`to_cut`]: with overlapping grants, the kernel cannot tell which of them
//! admitted a session, and the live one would admit it again), their 4-tuples go into
//! the cut sets in one nftables batch, and then their entries are deleted. jitd
//! remembers the cuts ([`CutMemory`]) so that a table it rebuilds holds them again.
//!
//! The order matters: once an entry is deleted, the session's next packet is picked up
//! by conntrack as a new flow, and only the cut sets stop it; so they are filled first.
//! Sessions of exempt sources, sessions open before jitd started and sessions of other
//! grants carry no mark or do not match, and are left alone.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::netlink::{parse_attrs, put_attr, Object, Reader};
use super::rules::{self, CutKey, GRANT_CT_MARK};
use super::{Firewall, FirewallError};
use crate::domain::{GrantKey, Transport};

/// The nfnetlink subsystem of conntrack (ctnetlink).
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const NLA_F_NESTED: u16 = 0x8000;

/// Attribute numbers of linux/netfilter/nfnetlink_conntrack.h.
mod cta {
    pub const TUPLE_ORIG: u16 = 1;
    pub const MARK: u16 = 8;
    pub const MARK_MASK: u16 = 21;
    pub const TUPLE_IP: u16 = 1;
    pub const TUPLE_PROTO: u16 = 2;
    pub const IP_V4_SRC: u16 = 1;
    pub const IP_V4_DST: u16 = 2;
    pub const IP_V6_SRC: u16 = 3;
    pub const IP_V6_DST: u16 = 4;
    pub const PROTO_NUM: u16 = 1;
    pub const PROTO_SRC_PORT: u16 = 2;
    pub const PROTO_DST_PORT: u16 = 3;
}

/// One tracked session, in its original direction (client to this host).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Session {
    /// TCP or UDP.
    pub transport: Transport,
    /// The client's address.
    pub source: IpAddr,
    /// The client's port.
    pub source_port: u16,
    /// This host's address.
    pub destination: IpAddr,
    /// This host's port.
    pub port: u16,
    /// The entry's ct mark.
    pub mark: u32,
}

impl Session {
    /// What the cut sets hold for it.
    pub fn cut_key(&self) -> CutKey {
        CutKey {
            source: self.source,
            transport: self.transport,
            source_port: self.source_port,
            port: self.port,
        }
    }
}

impl std::fmt::Display for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (src, dst) = (
            std::net::SocketAddr::new(self.source, self.source_port),
            std::net::SocketAddr::new(self.destination, self.port),
        );
        write!(f, "{} {src} -> {dst}", self.transport.name())
    }
}

/// The sessions among `sessions` that one of `keys` admitted: marked by a grant rule,
/// from inside the grant's source, to its port, over its transport.
pub fn admitted_by(sessions: &[Session], keys: &[GrantKey]) -> Vec<Session> {
    let mut chosen: Vec<Session> = sessions
        .iter()
        .filter(|s| s.mark & GRANT_CT_MARK != 0)
        .filter(|s| {
            keys.iter()
                .any(|k| k.source.contains(&s.source) && k.port == s.port && k.transport == s.transport)
        })
        .copied()
        .collect();
    chosen.sort();
    chosen.dedup();
    chosen
}

/// What `revoke --terminate` did: the sessions it cut, and those it left open because
/// a grant still live allows them (overlapping grants: a session from an address two
/// grants cover was admitted by both, and the one still live admits it again).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Terminated {
    /// Cut: in the cut sets, their conntrack entries deleted.
    pub cut: Vec<Session>,
    /// Left open: a live grant still allows them.
    pub kept: Vec<Session>,
}

/// Splits the sessions the revoked grants' `keys` admitted into those to cut and those
/// a `live` grant still allows (pure).
pub fn to_cut(sessions: &[Session], keys: &[GrantKey], live: &[GrantKey]) -> Terminated {
    let (kept, cut) = admitted_by(sessions, keys)
        .into_iter()
        .partition(|s| !admitted_by(std::slice::from_ref(s), live).is_empty());
    Terminated { cut, kept }
}

/// The audit reason for the sessions of `keys` among those cut and kept.
pub fn summary(done: &Terminated, keys: &[GrantKey]) -> String {
    let list = |sessions: &[Session]| {
        let mine = admitted_by(sessions, keys);
        let text: Vec<String> = mine.iter().map(Session::to_string).collect();
        (mine.len(), text.join(", "))
    };
    let (cut, cut_list) = list(&done.cut);
    let (kept, kept_list) = list(&done.kept);
    let mut text = if cut == 0 {
        "terminated no session: none open".to_string()
    } else {
        format!("terminated {cut} session(s): {cut_list}")
    };
    if kept > 0 {
        text.push_str(&format!(
            "; kept {kept} session(s) another live grant still allows: {kept_list}"
        ));
    }
    text
}

/// Cuts every session `keys` admitted that no `live` grant still allows: cut-set
/// elements first (one batch through `firewall`), then the conntrack entries.
pub async fn terminate<F: Firewall>(
    firewall: &F,
    keys: &[GrantKey],
    live: &[GrantKey],
) -> Result<Terminated, FirewallError> {
    let sessions = blocking(dump_marked).await?;
    let done = to_cut(&sessions, keys, live);
    let cut: Vec<CutKey> = done.cut.iter().map(Session::cut_key).collect();
    if let Some(batch) = rules::cut_sessions(&cut) {
        firewall.apply(&batch).await?;
    }
    let doomed = done.cut.clone();
    blocking(move || delete_entries(&doomed)).await?;
    Ok(done)
}

/// The sessions jitd cut and until when their 4-tuples stay in the cut sets, so that
/// a table jitd rebuilds (a drift repair, a reload) holds them again.
#[derive(Debug, Clone, Default)]
pub struct CutMemory {
    until: Vec<(CutKey, tokio::time::Instant)>,
}

impl CutMemory {
    /// Notes `keys` as cut at `now`, for [`rules::CUT_TIMEOUT`].
    pub fn note(&mut self, keys: impl IntoIterator<Item = CutKey>, now: tokio::time::Instant) {
        self.until.retain(|(_, end)| *end > now);
        for key in keys {
            self.until.retain(|(k, _)| *k != key);
            self.until.push((key, now + rules::CUT_TIMEOUT));
        }
    }

    /// The cuts still in force at `now`, with the time each has left.
    pub fn live(&self, now: tokio::time::Instant) -> Vec<(CutKey, std::time::Duration)> {
        self.until
            .iter()
            .filter(|(_, end)| *end > now)
            .map(|(k, end)| (*k, *end - now))
            .collect()
    }
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> Result<T, FirewallError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| FirewallError::Output(e.to_string()))?
        .map_err(|e| FirewallError::Output(format!("conntrack over netlink: {e}")))
}

/// Every conntrack entry (IPv4 and IPv6) whose mark has [`GRANT_CT_MARK`]; the kernel
/// filters on the mark.
fn dump_marked() -> io::Result<Vec<Session>> {
    let mut reader = Reader::open()?;
    let filter = [
        (cta::MARK, GRANT_CT_MARK.to_be_bytes().to_vec()),
        (cta::MARK_MASK, GRANT_CT_MARK.to_be_bytes().to_vec()),
    ];
    let mut sessions = Vec::new();
    for family in [AF_INET, AF_INET6] {
        let objects = reader
            .request_to(NFNL_SUBSYS_CTNETLINK, IPCTNL_MSG_CT_GET, family, true, &filter)?
            .unwrap_or_default();
        sessions.extend(objects.iter().filter_map(parse_session));
    }
    Ok(sessions)
}

fn delete_entries(sessions: &[Session]) -> io::Result<()> {
    let mut reader = Reader::open()?;
    for s in sessions {
        let family = if s.source.is_ipv4() { AF_INET } else { AF_INET6 };
        // Ok(None): the entry was gone already (it timed out or was closed)
        reader.request_to(
            NFNL_SUBSYS_CTNETLINK,
            IPCTNL_MSG_CT_DELETE,
            family,
            false,
            &[(cta::TUPLE_ORIG | NLA_F_NESTED, tuple(s))],
        )?;
    }
    Ok(())
}

/// A session's original tuple as the nested CTA_TUPLE_ORIG payload.
fn tuple(s: &Session) -> Vec<u8> {
    let mut ip = Vec::new();
    match (s.source, s.destination) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            put_attr(&mut ip, cta::IP_V4_SRC, &src.octets());
            put_attr(&mut ip, cta::IP_V4_DST, &dst.octets());
        }
        (src, dst) => {
            put_attr(&mut ip, cta::IP_V6_SRC, &v6(src).octets());
            put_attr(&mut ip, cta::IP_V6_DST, &v6(dst).octets());
        }
    }
    let mut proto = Vec::new();
    put_attr(&mut proto, cta::PROTO_NUM, &[protocol_number(s.transport)]);
    put_attr(&mut proto, cta::PROTO_SRC_PORT, &s.source_port.to_be_bytes());
    put_attr(&mut proto, cta::PROTO_DST_PORT, &s.port.to_be_bytes());
    let mut tuple = Vec::new();
    put_attr(&mut tuple, cta::TUPLE_IP | NLA_F_NESTED, &ip);
    put_attr(&mut tuple, cta::TUPLE_PROTO | NLA_F_NESTED, &proto);
    tuple
}

fn v6(addr: IpAddr) -> Ipv6Addr {
    match addr {
        IpAddr::V6(a) => a,
        IpAddr::V4(a) => a.to_ipv6_mapped(),
    }
}

fn protocol_number(transport: Transport) -> u8 {
    match transport {
        Transport::Tcp => 6,
        Transport::Udp => 17,
    }
}

/// A conntrack entry of a dump as a [`Session`]; `None` for other protocols or
/// malformed entries.
pub fn parse_session(object: &Object) -> Option<Session> {
    let orig = parse_attrs(object.get(cta::TUPLE_ORIG)?);
    let nested = |kind| orig.iter().find(|a| a.kind == kind).map(|a| parse_attrs(&a.value));
    let ip = nested(cta::TUPLE_IP)?;
    let proto = nested(cta::TUPLE_PROTO)?;
    let field = |attrs: &[super::netlink::Attr], kind| attrs.iter().find(|a| a.kind == kind).map(|a| a.value.clone());
    let addr = |v4, v6| -> Option<IpAddr> {
        if let Some(b) = field(&ip, v4) {
            return Some(IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(b.as_slice()).ok()?)));
        }
        let b = field(&ip, v6)?;
        Some(IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(b.as_slice()).ok()?)))
    };
    let port = |kind| -> Option<u16> { Some(u16::from_be_bytes(field(&proto, kind)?.try_into().ok()?)) };
    let transport = match field(&proto, cta::PROTO_NUM)?.first()? {
        6 => Transport::Tcp,
        17 => Transport::Udp,
        _ => return None,
    };
    let mark = object
        .get(cta::MARK)
        .and_then(|m| <[u8; 4]>::try_from(m).ok())
        .map_or(0, u32::from_be_bytes);
    Some(Session {
        transport,
        source: addr(cta::IP_V4_SRC, cta::IP_V6_SRC)?,
        source_port: port(cta::PROTO_SRC_PORT)?,
        destination: addr(cta::IP_V4_DST, cta::IP_V6_DST)?,
        port: port(cta::PROTO_DST_PORT)?,
        mark,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::parse_prefix;
    use crate::firewall::netlink::Attr;

    fn session(source: &str, sport: u16, port: u16, mark: u32) -> Session {
        Session {
            transport: Transport::Tcp,
            source: source.parse().unwrap(),
            source_port: sport,
            destination: "10.77.1.1".parse().unwrap(),
            port,
            mark,
        }
    }

    fn key(source: &str, port: u16) -> GrantKey {
        GrantKey {
            source: parse_prefix(source).unwrap(),
            transport: Transport::Tcp,
            port,
        }
    }

    #[test]
    fn only_marked_sessions_from_the_grant_to_its_port_are_chosen() {
        let marked = GRANT_CT_MARK | 0x7;
        let sessions = [
            session("10.77.1.2", 40001, 22, marked),
            session("10.77.1.2", 40002, 22, GRANT_CT_MARK),
            session("10.77.1.2", 40003, 22, 0x7),      // not admitted by a grant
            session("10.77.1.2", 40004, 3389, marked), // another port
            session("10.77.2.2", 40005, 22, marked),   // another source
        ];
        let chosen = admitted_by(&sessions, &[key("10.77.1.2", 22)]);
        assert_eq!(chosen, sessions[..2].to_vec());
        let prefix = admitted_by(&sessions, &[key("10.77.0.0/16", 22)]);
        assert_eq!(prefix.len(), 3);
        let mut udp = key("10.77.1.2", 22);
        udp.transport = Transport::Udp;
        assert!(admitted_by(&sessions, &[udp]).is_empty());
    }

    #[test]
    fn the_summary_lists_the_sessions_of_a_grant() {
        let cut = Terminated {
            cut: vec![session("10.77.1.2", 40001, 22, GRANT_CT_MARK)],
            kept: Vec::new(),
        };
        assert_eq!(
            summary(&cut, &[key("10.77.1.2", 22)]),
            "terminated 1 session(s): tcp 10.77.1.2:40001 -> 10.77.1.1:22"
        );
        assert_eq!(
            summary(&cut, &[key("10.77.1.9", 22)]),
            "terminated no session: none open"
        );
    }

    #[test]
    fn sessions_a_live_grant_still_allows_are_kept() {
        let sessions = [
            session("10.77.1.2", 40001, 22, GRANT_CT_MARK),
            session("10.77.1.3", 40002, 22, GRANT_CT_MARK),
            session("10.77.1.2", 40003, 3389, GRANT_CT_MARK),
        ];
        // the /24 is revoked; the /32 of .2 on port 22 is still live
        let revoked = [key("10.77.1.0/24", 22), key("10.77.1.0/24", 3389)];
        let done = to_cut(&sessions, &revoked, &[key("10.77.1.2", 22)]);
        assert_eq!(done.cut, vec![sessions[2], sessions[1]], "sorted");
        assert_eq!(done.kept, vec![sessions[0]]);
        assert_eq!(
            summary(&done, &revoked[..1]),
            "terminated 1 session(s): tcp 10.77.1.3:40002 -> 10.77.1.1:22; \
             kept 1 session(s) another live grant still allows: tcp 10.77.1.2:40001 -> 10.77.1.1:22"
        );
        let all = to_cut(&sessions, &revoked, &[]);
        assert_eq!((all.cut.len(), all.kept.len()), (3, 0));
    }

    #[test]
    fn cuts_are_remembered_for_their_timeout() {
        let now = tokio::time::Instant::now();
        let mut memory = CutMemory::default();
        let k = session("10.77.1.2", 40001, 22, 0).cut_key();
        memory.note([k], now);
        memory.note([k], now + std::time::Duration::from_secs(5));
        assert_eq!(
            memory.live(now + std::time::Duration::from_secs(5)),
            vec![(k, rules::CUT_TIMEOUT)]
        );
        assert!(memory
            .live(now + rules::CUT_TIMEOUT + std::time::Duration::from_secs(5))
            .is_empty());
    }

    #[test]
    fn a_tuple_round_trips_through_the_dump_format() {
        for s in [
            session("10.77.1.2", 40001, 22, GRANT_CT_MARK),
            Session {
                transport: Transport::Udp,
                source: "fd00:77:1::2".parse().unwrap(),
                destination: "fd00:77:1::1".parse().unwrap(),
                ..session("10.77.1.2", 5353, 3389, 0)
            },
        ] {
            let object = Object {
                kind: 0,
                attrs: vec![
                    Attr {
                        kind: cta::TUPLE_ORIG,
                        value: tuple(&s),
                    },
                    Attr {
                        kind: cta::MARK,
                        value: s.mark.to_be_bytes().to_vec(),
                    },
                ],
            };
            assert_eq!(parse_session(&object), Some(s));
        }
        let icmp = Object { kind: 0, attrs: vec![] };
        assert_eq!(parse_session(&icmp), None);
    }
}
