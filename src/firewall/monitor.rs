//! Listens to the kernel's nftables change events (netlink group NFNLGRP_NFTABLES, what
//! `nft monitor` uses). Each committed transaction ends with a NEWGEN message naming
//! the process that made it, so jitd can tell its own changes from anyone else's.

use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};
use tokio::sync::mpsc;

const NFNLGRP_NFTABLES: u32 = 7;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWGEN: u16 = 15;
const NFTA_GEN_PROC_PID: u16 = 2;
const NFTA_GEN_PROC_NAME: u16 = 3;
const NLMSG_HDR: usize = 16;
const NFGENMSG: usize = 4;

/// A committed nftables transaction in this network namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generation {
    /// The process that made it (0 if the kernel did not say).
    pub pid: u32,
    /// That process's name.
    pub process: String,
}

/// Starts a thread that sends every committed transaction to the returned channel.
/// Fails when the kernel offers no nftables netlink (no nf_tables).
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
        loop {
            match socket.recv(&mut &mut buf[..], 0) {
                Ok(n) => {
                    for generation in parse_generations(&buf[..n]) {
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

fn libc_enobufs() -> i32 {
    nix::errno::Errno::ENOBUFS as i32
}

/// Extracts the NEWGEN messages from a datagram of netlink messages.
pub fn parse_generations(mut data: &[u8]) -> Vec<Generation> {
    let mut found = Vec::new();
    while data.len() >= NLMSG_HDR {
        let len = u32::from_ne_bytes(data[0..4].try_into().expect("4 bytes")) as usize;
        let kind = u16::from_ne_bytes(data[4..6].try_into().expect("2 bytes"));
        if len < NLMSG_HDR || len > data.len() {
            break;
        }
        if kind == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN && len >= NLMSG_HDR + NFGENMSG {
            found.push(parse_newgen(&data[NLMSG_HDR + NFGENMSG..len]));
        }
        data = &data[align4(len).min(data.len())..];
    }
    found
}

fn parse_newgen(mut attrs: &[u8]) -> Generation {
    let mut generation = Generation {
        pid: 0,
        process: String::new(),
    };
    while attrs.len() >= 4 {
        let len = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
        let kind = u16::from_ne_bytes([attrs[2], attrs[3]]) & 0x3fff;
        if len < 4 || len > attrs.len() {
            break;
        }
        let value = &attrs[4..len];
        match kind {
            NFTA_GEN_PROC_PID if value.len() == 4 => {
                generation.pid = u32::from_be_bytes(value.try_into().expect("4 bytes"));
            }
            NFTA_GEN_PROC_NAME => {
                generation.process = String::from_utf8_lossy(value).trim_end_matches('\0').to_string();
            }
            _ => {}
        }
        attrs = &attrs[align4(len).min(attrs.len())..];
    }
    generation
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(kind: u16, value: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
        a.extend_from_slice(&kind.to_ne_bytes());
        a.extend_from_slice(value);
        while a.len() % 4 != 0 {
            a.push(0);
        }
        a
    }

    fn message(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&((NLMSG_HDR + payload.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&[0u8; 10]);
        m.extend_from_slice(payload);
        m
    }

    #[test]
    fn newgen_messages_name_the_process() {
        let mut payload = vec![0u8; NFGENMSG];
        payload.extend(attr(1, &7u32.to_be_bytes()));
        payload.extend(attr(NFTA_GEN_PROC_PID, &4242u32.to_be_bytes()));
        payload.extend(attr(NFTA_GEN_PROC_NAME, b"nft\0"));
        let mut datagram = message((NFNL_SUBSYS_NFTABLES << 8) | 2, &[0u8; 8]); // NEWCHAIN: ignored
        datagram.extend(message((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN, &payload));
        assert_eq!(
            parse_generations(&datagram),
            vec![Generation {
                pid: 4242,
                process: "nft".into()
            }]
        );
    }

    #[test]
    fn truncated_input_is_ignored() {
        assert!(parse_generations(&[1, 2, 3]).is_empty());
        assert!(parse_generations(&message(0, &[])[..10]).is_empty());
    }
}
