//! The filter the kernel runs over each socket of a sock_diag dump (inet_diag
//! bytecode, `INET_DIAG_REQ_BYTECODE`, as `ss` compiles its filters), so that the doctor
//! is sent only the sockets that matter: any socket on a protected port, and sockets
//! on other ports unless bound to loopback (127.0.0.0/8, ::1, ::ffff:127.0.0.0/104).
//! A user with no role can bind as many loopback sockets as they like; they are never
//! read, so they cannot crowd a listener out of the doctor's view. Pure.
//!
//! The kernel walks the program from its start: each operation's condition, when true,
//! moves on by `yes` bytes, else by `no`; running exactly off the end accepts the
//! socket, jumping 4 bytes past it rejects it. It checks the program before the dump:
//! every `yes` must step to the next operation, every `no` land on an operation, the
//! end, or 4 bytes past it.

/// `INET_DIAG_REQ_BYTECODE`: the request's attribute that holds the program.
pub const REQ_BYTECODE: u16 = 1;

const BC_JMP: u8 = 1;
const BC_S_COND: u8 = 7;
const BC_S_EQ: u8 = 11;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// One operation: `struct inet_diag_bc_op` (code, yes, no).
fn op(code: u8, yes: usize, no: usize) -> [u8; 4] {
    let no = u16::try_from(no).expect("a short program").to_ne_bytes();
    [code, u8::try_from(yes).expect("a short operation"), no[0], no[1]]
}

/// The program: accept a socket on one of `ports`; else reject one bound to loopback;
/// else accept. `ports` are the protected ports of the dump's transport (at most a few
/// hundred: each takes 12 bytes of a program limited to 64 KiB).
pub fn program(ports: &[u16]) -> Vec<u8> {
    let loopback: [(u8, u8, &[u8]); 2] = [
        (AF_INET, 8, &[127, 0, 0, 0]),
        (AF_INET6, 128, &std::net::Ipv6Addr::LOCALHOST.octets()),
    ];
    let length = 12 * ports.len() + loopback.iter().map(|(_, _, a)| 12 + a.len() + 4).sum::<usize>();
    let mut bc = Vec::with_capacity(length);
    for port in ports {
        // sport == port: on to the jump to the end (accept); else past it
        bc.extend(op(BC_S_EQ, 8, 12));
        bc.extend([0, 0]);
        bc.extend(port.to_ne_bytes());
        let left = length - bc.len();
        bc.extend(op(BC_JMP, 4, left));
    }
    for (family, prefix_len, addr) in loopback {
        // source address in the loopback prefix (any port): on to the jump past the
        // end (reject); else past it
        let size = 4 + 8 + addr.len();
        bc.extend(op(BC_S_COND, size, size + 4));
        bc.extend([family, prefix_len, 0, 0]);
        bc.extend((-1i32).to_ne_bytes());
        bc.extend(addr);
        let left = length - bc.len();
        bc.extend(op(BC_JMP, 4, left + 4));
    }
    debug_assert_eq!(bc.len(), length);
    bc
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use super::*;

    /// What the kernel's `inet_diag_bc_run` does with the program, for the
    /// operations it uses: whether a socket bound to `ip`:`port` is sent.
    fn run(bc: &[u8], ip: IpAddr, port: u16) -> bool {
        let mut at = 0usize;
        let mut len = bc.len() as isize;
        while len > 0 {
            let (code, yes, no) = (
                bc[at],
                bc[at + 1] as usize,
                u16::from_ne_bytes([bc[at + 2], bc[at + 3]]) as usize,
            );
            let hit = match code {
                BC_JMP => false,
                BC_S_EQ => u16::from_ne_bytes([bc[at + 6], bc[at + 7]]) == port,
                BC_S_COND => {
                    let (family, prefix) = (bc[at + 4], bc[at + 5] as u32);
                    match (family, ip) {
                        (AF_INET, IpAddr::V4(v4)) => mask4(v4, prefix) == mask4(addr4(&bc[at + 12..]), prefix),
                        (AF_INET, IpAddr::V6(v6)) => v6
                            .to_ipv4_mapped()
                            .is_some_and(|v4| mask4(v4, prefix) == mask4(addr4(&bc[at + 12..]), prefix)),
                        (AF_INET6, IpAddr::V6(v6)) => prefix == 128 && v6.octets().as_slice() == &bc[at + 12..at + 28],
                        _ => false,
                    }
                }
                other => panic!("unexpected operation {other}"),
            };
            let step = if hit { yes } else { no };
            at += step;
            len -= step as isize;
        }
        len == 0
    }

    fn addr4(b: &[u8]) -> Ipv4Addr {
        Ipv4Addr::new(b[0], b[1], b[2], b[3])
    }

    fn mask4(ip: Ipv4Addr, prefix: u32) -> u32 {
        u32::from(ip).checked_shr(32 - prefix).unwrap_or(0)
    }

    #[test]
    fn protected_ports_pass_everywhere_and_loopback_elsewhere_does_not() {
        let bc = program(&[22, 3389]);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        for (address, port, sent) in [
            ("127.0.0.1", 22, true),
            ("::1", 3389, true),
            ("0.0.0.0", 22, true),
            ("127.0.0.1", 5432, false),
            ("127.9.8.7", 40000, false),
            ("::1", 2222, false),
            ("::ffff:127.0.0.1", 2222, false),
            ("::", 2222, true),
            ("0.0.0.0", 40000, true),
            ("10.0.0.1", 5432, true),
            ("::ffff:10.0.0.1", 5432, true),
            ("::2", 80, true),
        ] {
            assert_eq!(run(&bc, ip(address), port), sent, "{address}:{port}");
        }
        let none = program(&[]);
        assert!(!run(&none, IpAddr::V6(Ipv6Addr::LOCALHOST), 22));
        assert!(run(&none, ip("192.0.2.1"), 22));
    }

    #[test]
    fn every_yes_steps_to_the_next_operation_and_every_no_lands_where_the_kernel_allows() {
        let bc = program(&[22, 80, 443]);
        // the kernel's inet_diag_bc_audit: walk by `yes`; each `no` lands on an
        // operation's start, the end, or 4 bytes past it
        let mut starts = Vec::new();
        let mut at = 0;
        while at < bc.len() {
            starts.push(at);
            at += bc[at + 1] as usize;
        }
        assert_eq!(at, bc.len());
        for &s in &starts {
            let target = s + u16::from_ne_bytes([bc[s + 2], bc[s + 3]]) as usize;
            assert!(
                starts.contains(&target) || target == bc.len() || target == bc.len() + 4,
                "op at {s} jumps to {target} of {}",
                bc.len()
            );
        }
    }
}
