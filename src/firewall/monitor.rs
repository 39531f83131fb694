//! Listens to the kernel's nftables change events (netlink group NFNLGRP_NFTABLES, what
//! `nft monitor` uses). Each committed transaction ends with a NEWGEN message naming
//! the process that made it, so jitd can tell its own changes from anyone else's.

use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};
use tokio::sync::mpsc;

use super::netlink::{NFGEN as NFGENMSG, NFNL_SUBSYS_NFTABLES};

const NFNLGRP_NFTABLES: u32 = 7;
const NFT_MSG_NEWGEN: u16 = 15;
const NFTA_GEN_PROC_PID: u16 = 2;
const NFTA_GEN_PROC_NAME: u16 = 3;

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
pub fn parse_generations(data: &[u8]) -> Vec<Generation> {
    super::netlink::messages(data)
        .into_iter()
        .filter(|(kind, _, body)| *kind == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN && body.len() >= NFGENMSG)
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
