//! Attacks on the packet path: conntrack confusion (a stray ACK that makes a fresh SYN
//! look "established"), ECN SYNs, and cutting sessions with `revoke --terminate`.
//! Proven with real TCP from client namespaces and hand-made segments on raw sockets.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::process::Command;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

use crate::util::*;

const POLICY: &str = "[[ports]]\nport = 22\nallowed_sources = [\"10.77.0.0/16\", \"fd00:77::/32\"]\n";

/// Connects from `ns` to `HOST:port` from the fixed local address `from:from_port`
/// (SO_REUSEADDR, as an attacker reusing its old 4-tuple would).
fn connect_from(ns: &str, from: &str, from_port: u16, host: &str, port: u16) -> std::io::Result<TcpStream> {
    let local: SocketAddr = format!("{from}:{from_port}").parse().unwrap();
    let target: SocketAddr = format!("{host}:{port}").parse().unwrap();
    let socket = in_ns(ns, || {
        Socket::new(Domain::for_address(local), Type::STREAM, Some(Protocol::TCP))
    })?;
    socket.set_reuse_address(true)?;
    socket.bind(&local.into())?;
    socket.connect_timeout(&target.into(), BLOCKED_AFTER)?;
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(Duration::from_secs(3)))?;
    stream.set_write_timeout(Some(Duration::from_secs(3)))?;
    Ok(stream)
}

/// Ends a connection with a RST (SO_LINGER 0): no TIME_WAIT, the port is free at once.
fn reset(stream: TcpStream) {
    Socket::from(stream).set_linger(Some(Duration::ZERO)).unwrap();
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum >> 16) + (sum & 0xffff);
    }
    !(sum as u16)
}

/// Sends one bare ACK segment (arbitrary sequence numbers) from `src:sport` to
/// `dst:dport` over a raw socket in `ns`: a packet of no connection either side knows.
fn stray_ack(ns: &str, src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) {
    let mut tcp = Vec::with_capacity(20);
    tcp.extend_from_slice(&sport.to_be_bytes());
    tcp.extend_from_slice(&dport.to_be_bytes());
    tcp.extend_from_slice(&0x1234_5678u32.to_be_bytes()); // seq
    tcp.extend_from_slice(&0x0abc_def0u32.to_be_bytes()); // ack
    tcp.extend_from_slice(&[5 << 4, 0x10]); // header length 20, flags ACK
    tcp.extend_from_slice(&65535u16.to_be_bytes()); // window
    tcp.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, 6, 0, tcp.len() as u8]);
    pseudo.extend_from_slice(&tcp);
    let sum = checksum(&pseudo);
    tcp[16..18].copy_from_slice(&sum.to_be_bytes());
    let raw = in_ns(ns, || Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::TCP))).expect("raw socket");
    raw.send_to(&tcp, &SocketAddr::V4(SocketAddrV4::new(dst, 0)).into())
        .expect("send the stray ACK");
}

fn conntrack_list(net: &Net) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", &net.host, "conntrack", "-L"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sysctl(ns: &str, setting: &str) {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "sysctl", "-qw", setting])
        .output()
        .unwrap();
    assert!(out.status.success(), "sysctl {setting}: {}", text(&out));
}

enum GrantEnd {
    Revoked,
    Expired,
}

/// The attack of issue 10: a client whose grant ended resets its old connection, sends
/// one stray ACK on the old 4-tuple and a fresh SYN from the same port. Before the fix,
/// conntrack classified that SYN "established" and the chain accepted it.
fn reconnect_after_stray_ack(end: GrantEnd, ecn: bool) {
    let net = Net::new();
    serve_echo(&net.host, 22);
    if ecn {
        // the client's SYNs carry ECE|CWR (an ECN setup SYN)
        sysctl(&net.a, "net.ipv4.tcp_ecn=1");
    }
    let setup = Setup::new(POLICY);
    let jitd = setup.start(&net.host);
    let duration = match end {
        GrantEnd::Revoked => "1h",
        GrantEnd::Expired => "3s",
    };
    jitd.ctl_json(&["request", "--port", "22", "--source", A4, "--duration", duration]);
    let mut kept = connect(&net.a, HOST_A4, 22).expect("a session opened during the grant");
    let port = 40_000 + (std::process::id() % 10_000) as u16;
    let mut old = connect_from(&net.a, A4, port, HOST_A4, 22).expect("connect during the grant");
    assert!(exchange(&mut old, b"before"));
    reset(old);
    match end {
        GrantEnd::Revoked => {
            jitd.ctl_json(&["revoke", "--source", A4]);
        }
        GrantEnd::Expired => assert!(
            wait_for(Duration::from_secs(10), || jitd.ctl_json(&["status"])["grants"]
                == serde_json::json!([])),
            "the grant expires"
        ),
    }
    let (a4, host4) = (A4.parse().unwrap(), HOST_A4.parse().unwrap());
    stray_ack(&net.a, a4, port, host4, 22);
    let tracked = conntrack_list(&net);
    let again = connect_from(&net.a, A4, port, HOST_A4, 22);
    assert!(
        again.is_err(),
        "a new connection from the old 4-tuple is refused without a grant; conntrack had:\n{tracked}"
    );
    assert!(!can_connect(&net.a, HOST_A4, 22), "and from any other port");
    assert!(
        exchange(&mut kept, b"still established"),
        "the session established during the grant keeps working"
    );
}

#[test]
fn a_revoked_client_cannot_reconnect_from_its_old_4_tuple_after_a_stray_ack() {
    reconnect_after_stray_ack(GrantEnd::Revoked, false);
}

#[test]
fn an_expired_client_cannot_reconnect_with_an_ecn_syn_after_a_stray_ack() {
    reconnect_after_stray_ack(GrantEnd::Expired, true);
}
