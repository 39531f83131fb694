//! The listening sockets of jitd's network namespace, over sock_diag netlink
//! (NETLINK_SOCK_DIAG, as `ss -l` reads them): TCP sockets in LISTEN, UDP sockets
//! bound and unconnected, IPv4 and IPv6, on a protected port or bound beyond loopback
//! (the kernel filters: [`super::sockfilter`]). Needs no privilege. The requests are
//! built by hand (`struct inet_diag_req_v2`); the replies are parsed by
//! [`parse_socket`] (pure) and kept within caps per owner and in all ([`Kept`]), so
//! that no user's sockets crowd out another's, and what is left out is said.

use std::collections::HashMap;

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket, SocketAddr};

use super::sockfilter;
use crate::domain::{Protocol, Transport};
use crate::firewall::netlink::{messages, parse_attrs};
use crate::health::listeners::{LeftOut, Listener};
pub use crate::health::listeners::{MAX_SOCKETS, PER_OWNER};
/// The most owners counted.
const MAX_OWNERS: usize = 4096;

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const TCP_LISTEN: u32 = 10;
/// UDP sockets that are bound but not connected are in TCP_CLOSE (`ss` calls it UNCONN).
const TCP_CLOSE: u32 = 7;
const INET_DIAG_SKV6ONLY: u16 = 11;
const INET_DIAG_CGROUP_ID: u16 = 21;
/// `struct inet_diag_msg`.
const MSG_LEN: usize = 72;

/// Every listening socket, TCP and UDP, IPv4 and IPv6, on one of the `protected`
/// ports or bound beyond loopback, within the caps ([`Kept`]). A kernel without UDP or
/// IPv6 socket diagnostics (udp_diag not loaded, IPv6 disabled) gives what it has; TCP
/// over IPv4 must answer.
pub fn listening(protected: &[(u16, Protocol)]) -> io::Result<Kept> {
    let mut kept = Kept::default();
    let mut seq = 0;
    for family in [AF_INET, AF_INET6] {
        for (transport, state) in [(Transport::Tcp, TCP_LISTEN), (Transport::Udp, TCP_CLOSE)] {
            seq += 1;
            let ports: Vec<u16> = protected
                .iter()
                .filter(|(_, p)| p.transports().contains(&transport))
                .map(|(port, _)| *port)
                .collect();
            let request = request(family, transport, state, seq, &sockfilter::program(&ports));
            // a fresh socket per dump: an error midway leaves nothing unread behind
            let dumped = Socket::new(NETLINK_SOCK_DIAG).and_then(|mut socket| {
                socket.bind(&SocketAddr::new(0, 0))?;
                socket.send_to(&request, &SocketAddr::new(0, 0), 0)?;
                read_dump(&mut socket, seq, transport, &mut kept)
            });
            match dumped {
                Ok(()) => {}
                Err(e) if family == AF_INET && transport == Transport::Tcp => return Err(e),
                Err(e) => tracing::debug!("sock_diag: no {} sockets of family {family}: {e}", transport.name()),
            }
        }
    }
    Ok(kept)
}

/// The sockets kept, and those left out: at most [`PER_OWNER`] of each owner and
/// [`MAX_SOCKETS`] of all but root's, in the order the kernel sends them.
#[derive(Debug, Default)]
pub struct Kept {
    /// The sockets kept.
    pub found: Vec<Listener>,
    /// What was left out.
    pub left_out: LeftOut,
    per_owner: HashMap<u32, usize>,
}

impl Kept {
    /// Keeps `l` unless its owner's or the overall cap is reached.
    pub fn offer(&mut self, l: Listener) {
        let known = self.per_owner.contains_key(&l.uid);
        let count = self.per_owner.get(&l.uid).copied().unwrap_or(0);
        let full = count >= PER_OWNER
            || (!known && self.per_owner.len() >= MAX_OWNERS)
            || (l.uid != 0 && self.found.len() >= MAX_SOCKETS);
        if full {
            self.left_out.note(l.uid);
            return;
        }
        *self.per_owner.entry(l.uid).or_default() += 1;
        self.found.push(l);
    }
}

/// One dump request: `nlmsghdr` + `inet_diag_req_v2` for `family`, `transport` and
/// the sockets in `state`, then the kernel's filter `bytecode`.
fn request(family: u8, transport: Transport, state: u32, seq: u32, bytecode: &[u8]) -> Vec<u8> {
    let mut req = vec![family, transport_number(transport), 0, 0];
    req.extend_from_slice(&(1u32 << state).to_ne_bytes());
    req.extend_from_slice(&[0u8; 48]); // inet_diag_sockid: any
    crate::firewall::netlink::put_attr(&mut req, sockfilter::REQ_BYTECODE, bytecode);
    let mut packet = Vec::with_capacity(16 + req.len());
    packet.extend_from_slice(&((16 + req.len()) as u32).to_ne_bytes());
    packet.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    packet.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    packet.extend_from_slice(&seq.to_ne_bytes());
    packet.extend_from_slice(&0u32.to_ne_bytes());
    packet.extend_from_slice(&req);
    packet
}

fn transport_number(t: Transport) -> u8 {
    match t {
        Transport::Tcp => 6,
        Transport::Udp => 17,
    }
}

fn read_dump(socket: &mut Socket, seq: u32, transport: Transport, kept: &mut Kept) -> io::Result<()> {
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = socket.recv(&mut &mut buf[..], 0)?;
        for (kind, got, body) in messages(&buf[..n.min(buf.len())]) {
            if got != seq {
                continue;
            }
            match kind {
                NLMSG_DONE => return Ok(()),
                NLMSG_ERROR => {
                    let errno = i32::from_ne_bytes(body.get(0..4).and_then(|b| b.try_into().ok()).unwrap_or([0; 4]));
                    if errno != 0 {
                        return Err(io::Error::from_raw_os_error(-errno));
                    }
                }
                SOCK_DIAG_BY_FAMILY => {
                    if let Some(l) = parse_socket(body, transport) {
                        kept.offer(l);
                    }
                }
                _ => {}
            }
        }
    }
}

/// One `inet_diag_msg` and its attributes; `None` when malformed or not bound to a port.
pub fn parse_socket(body: &[u8], transport: Transport) -> Option<Listener> {
    if body.len() < MSG_LEN {
        return None;
    }
    let port = u16::from_be_bytes([body[4], body[5]]);
    let address = match body[0] {
        AF_INET => IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(&body[8..12]).ok()?)),
        AF_INET6 => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&body[8..24]).ok()?)),
        _ => return None,
    };
    let u32_at = |at: usize| u32::from_ne_bytes(body[at..at + 4].try_into().expect("4 bytes"));
    let attrs = parse_attrs(&body[MSG_LEN..]);
    let attr = |kind| attrs.iter().find(|a| a.kind == kind).map(|a| a.value.as_slice());
    (port != 0).then(|| Listener {
        transport,
        address,
        port,
        v6only: attr(INET_DIAG_SKV6ONLY).is_some_and(|v| v.first() == Some(&1)),
        uid: u32_at(64),
        inode: u32_at(68),
        cgroup: attr(INET_DIAG_CGROUP_ID)
            .and_then(|v| v.try_into().ok())
            .map(u64::from_ne_bytes),
        processes: Vec::new(),
        unit: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firewall::netlink::put_attr;

    fn message(family: u8, port: u16, address: &[u8]) -> Vec<u8> {
        let mut m = vec![family, 10, 0, 0];
        m.extend_from_slice(&port.to_be_bytes());
        m.extend_from_slice(&[0, 0]);
        let mut addr = address.to_vec();
        addr.resize(16, 0);
        m.extend_from_slice(&addr);
        m.extend_from_slice(&[0u8; 16 + 4 + 8]); // dst, if, cookie
        m.extend_from_slice(&[0u8; 12]); // expires, rqueue, wqueue
        m.extend_from_slice(&1000u32.to_ne_bytes());
        m.extend_from_slice(&4242u32.to_ne_bytes());
        m
    }

    #[test]
    fn a_diag_message_becomes_a_listener() {
        let mut m = message(AF_INET6, 2222, &[0; 16]);
        put_attr(&mut m, INET_DIAG_SKV6ONLY, &[1]);
        put_attr(&mut m, INET_DIAG_CGROUP_ID, &77u64.to_ne_bytes());
        let l = parse_socket(&m, Transport::Tcp).unwrap();
        assert_eq!(l.endpoint(), "[::]:2222/tcp");
        assert!(l.v6only);
        assert_eq!((l.uid, l.inode, l.cgroup), (1000, 4242, Some(77)));
        let l = parse_socket(&message(AF_INET, 53, &[127, 0, 0, 53]), Transport::Udp).unwrap();
        assert_eq!(l.endpoint(), "127.0.0.53:53/udp");
        assert!(!l.v6only);
    }

    #[test]
    fn short_unbound_and_unknown_messages_are_skipped() {
        assert!(parse_socket(&message(AF_INET, 22, &[0; 4])[..71], Transport::Tcp).is_none());
        assert!(parse_socket(&message(AF_INET, 0, &[0; 4]), Transport::Udp).is_none());
        assert!(parse_socket(&message(1, 22, &[0; 4]), Transport::Tcp).is_none());
    }

    #[test]
    fn the_kernel_sends_loopback_sockets_only_on_protected_ports() {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = tcp.local_addr().unwrap().port();
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let udp_port = udp.local_addr().unwrap().port();
        let wide = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        let wide_port = wide.local_addr().unwrap().port();
        let found = |protected: &[(u16, Protocol)]| listening(protected).unwrap().found;
        let has = |found: &[Listener], port, transport| {
            found
                .iter()
                .find(|l| l.port == port && l.transport == transport)
                .cloned()
        };
        let unprotected = found(&[]);
        assert!(has(&unprotected, port, Transport::Tcp).is_none());
        assert!(has(&unprotected, udp_port, Transport::Udp).is_none());
        let mine = has(&unprotected, wide_port, Transport::Udp).expect("a socket beyond loopback is read");
        assert_eq!(mine.uid, nix::unistd::getuid().as_raw());
        let protected = found(&[(port, Protocol::Tcp), (udp_port, Protocol::Udp)]);
        let mine = has(&protected, port, Transport::Tcp).expect("a protected port is read on loopback too");
        assert_eq!(mine.address, IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert!(has(&protected, udp_port, Transport::Udp).is_some());
    }

    fn owned_by(uid: u32, port: u16) -> Listener {
        let mut l = parse_socket(&message(AF_INET, port, &[0; 4]), Transport::Udp).unwrap();
        l.uid = uid;
        l
    }

    #[test]
    fn one_owner_crowds_out_only_its_own_sockets_and_what_is_left_out_is_counted() {
        let mut kept = Kept::default();
        for n in 0..PER_OWNER + 100 {
            kept.offer(owned_by(1000, 1024 + n as u16));
        }
        kept.offer(owned_by(0, 2222));
        kept.offer(owned_by(1001, 80));
        assert_eq!(kept.found.len(), PER_OWNER + 2);
        assert!(kept.found.iter().any(|l| l.uid == 0 && l.port == 2222));
        assert_eq!((kept.left_out.sockets, kept.left_out.owners.clone()), (100, vec![1000]));
        // past the overall cap only root's are kept
        let mut kept = Kept::default();
        for uid in 1..=(MAX_SOCKETS / PER_OWNER) as u32 {
            for n in 0..PER_OWNER {
                kept.offer(owned_by(uid, n as u16 + 1));
            }
        }
        kept.offer(owned_by(4242, 1));
        kept.offer(owned_by(0, 22));
        assert_eq!(kept.found.len(), MAX_SOCKETS + 1);
        assert_eq!(kept.left_out.owners, vec![4242]);
    }
}
