//! Listens to the kernel's nftables change events (netlink group NFNLGRP_NFTABLES, what
//! `nft monitor` uses). Each committed transaction ends with a NEWGEN message naming
//! the process that made it, so jitd can tell its own changes from anyone else's; the
//! messages before it name the table each change touched, so transactions that leave
//! jitd's table alone (Docker, fail2ban, firewalld committing in their own tables) are
//! not reported at all.

use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};
use tokio::sync::mpsc;

use super::netlink::{NFGEN as NFGENMSG, NFNL_SUBSYS_NFTABLES};

const NFNLGRP_NFTABLES: u32 = 7;
const NFT_MSG_NEWGEN: u16 = 15;
const NFTA_GEN_PROC_PID: u16 = 2;
const NFTA_GEN_PROC_NAME: u16 = 3;
/// The table's name is attribute 1 of every object message (table, chain, rule, set,
/// element list, object, flowtable).
const NFTA_ANY_TABLE: u16 = 1;
const NFPROTO_INET: u8 = 1;

/// A committed nftables transaction in this network namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generation {
    /// The process that made it (0 if the kernel did not say).
    pub pid: u32,
    /// That process's name.
    pub process: String,
}

/// Starts a thread that sends every committed transaction that touched `inet TABLE`
/// (and a notice when events were lost) to the returned channel. Fails when the kernel
/// offers no nftables netlink (no nf_tables).
pub fn watch() -> std::io::Result<mpsc::UnboundedReceiver<Generation>> {
    let mut socket = Socket::new(NETLINK_NETFILTER)?;
    socket.bind(&SocketAddr::new(0, 0))?;
    socket.add_membership(NFNLGRP_NFTABLES)?;
    // Events must not be lost silently: a full buffer raises ENOBUFS, which we treat as
    // "something changed".
    let _ = socket.set_rx_buf_sz(4 * 1024 * 1024);
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::Builder::new().name("nft-monitor".into()).spawn(move || {
        let mut buf = vec![0u8; 1 << 16];
        let mut ours = false;
        loop {
            match socket.recv(&mut &mut buf[..], 0) {
                Ok(n) => {
                    for generation in parse_generations(&buf[..n], &mut ours) {
                        if tx.send(generation).is_err() {
                            return;
                        }
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc_enobufs()) => {
                    if tx
                        .send(Generation {
                            pid: 0,
                            process: "unknown (events lost)".into(),
                        })
                        .is_err()
                    {
                        return;
                    }
                }
                Err(e) => {
                    tracing::error!("nftables monitor stopped: {e}");
                    return;
                }
            }
        }
    })?;
    Ok(rx)
}

/// Whether an object message is about `inet jitd`.
fn names_our_table(body: &[u8]) -> bool {
    body[0] == NFPROTO_INET
        && super::netlink::parse_attrs(&body[NFGENMSG..]).iter().any(|a| {
            a.kind == NFTA_ANY_TABLE
                && a.value.strip_suffix(b"\0").unwrap_or(&a.value) == super::rules::TABLE.as_bytes()
        })
}

fn libc_enobufs() -> i32 {
    nix::errno::Errno::ENOBUFS as i32
}

/// The transactions in a datagram of netlink messages that touched jitd's table.
/// `ours` carries "the current transaction touched it" across datagrams.
pub fn parse_generations(data: &[u8], ours: &mut bool) -> Vec<Generation> {
    super::netlink::messages(data)
        .into_iter()
        .filter(|(kind, _, body)| {
            if *kind >> 8 != NFNL_SUBSYS_NFTABLES || body.len() < NFGENMSG {
                return false;
            }
            if *kind != (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN {
                *ours |= names_our_table(body);
                return false;
            }
            std::mem::take(ours)
        })
        .map(|(_, _, body)| {
            let mut generation = Generation {
                pid: 0,
                process: String::new(),
            };
            for a in super::netlink::parse_attrs(&body[NFGENMSG..]) {
                match a.kind {
                    NFTA_GEN_PROC_PID if a.value.len() == 4 => {
                        generation.pid = u32::from_be_bytes(a.value[..].try_into().expect("4 bytes"));
                    }
                    NFTA_GEN_PROC_NAME => {
                        generation.process = String::from_utf8_lossy(&a.value).trim_end_matches('\0').to_string();
                    }
                    _ => {}
                }
            }
            generation
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(kind: u16, value: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        crate::firewall::netlink::put_attr(&mut a, kind, value);
        a
    }

    fn message(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&((16 + payload.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&[0u8; 10]);
        m.extend_from_slice(payload);
        m
    }

    fn object(family: u8, table: &[u8]) -> Vec<u8> {
        let mut body = vec![family, 0, 0, 0];
        body.extend(attr(NFTA_ANY_TABLE, table));
        message((NFNL_SUBSYS_NFTABLES << 8) | 12, &body) // NEWSETELEM
    }

    fn newgen(pid: u32) -> Vec<u8> {
        let mut payload = vec![0u8; NFGENMSG];
        payload.extend(attr(1, &7u32.to_be_bytes()));
        payload.extend(attr(NFTA_GEN_PROC_PID, &pid.to_be_bytes()));
        payload.extend(attr(NFTA_GEN_PROC_NAME, b"nft\0"));
        message((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN, &payload)
    }

    #[test]
    fn only_transactions_that_touch_our_table_are_reported() {
        let mut ours = false;
        let mut datagram = object(NFPROTO_INET, b"docker\0");
        datagram.extend(newgen(1));
        datagram.extend(object(2, b"jitd\0")); // ip jitd: another family's table
        datagram.extend(newgen(2));
        datagram.extend(object(NFPROTO_INET, b"jitd\0"));
        datagram.extend(newgen(4242));
        assert_eq!(
            parse_generations(&datagram, &mut ours),
            vec![Generation {
                pid: 4242,
                process: "nft".into()
            }]
        );
        // a transaction split over two datagrams
        assert!(parse_generations(&object(NFPROTO_INET, b"jitd\0"), &mut ours).is_empty());
        assert_eq!(parse_generations(&newgen(7), &mut ours).len(), 1);
        assert!(
            parse_generations(&newgen(8), &mut ours).is_empty(),
            "reset after each transaction"
        );
    }

    #[test]
    fn truncated_input_is_ignored() {
        let mut ours = false;
        assert!(parse_generations(&[1, 2, 3], &mut ours).is_empty());
        assert!(parse_generations(&message(0, &[])[..10], &mut ours).is_empty());
    }
}
