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

/// The local port of a client's connection, as the host sees it.
fn client_port(stream: &TcpStream) -> u16 {
    stream.local_addr().unwrap().port()
}

#[test]
fn terminate_cuts_exactly_the_sessions_the_revoked_grant_admitted() {
    // A fresh namespace: this session is open before jitd first starts.
    let net = Net::new();
    serve_echo(&net.host, 22);
    let mut before = connect(&net.a, HOST_A4, 22).expect("connect before jitd");
    assert!(exchange(&mut before, b"early"));
    let setup = Setup::new(POLICY);
    let jitd = setup.start(&net.host);
    for source in [A4, B4] {
        jitd.ctl_json(&["request", "--port", "22", "--source", source, "--duration", "1h"]);
    }
    let mut a1 = connect(&net.a, HOST_A4, 22).expect("a's first session");
    let mut a2 = connect(&net.a, HOST_A4, 22).expect("a's second session");
    let mut b1 = connect(&net.b, HOST_B4, 22).expect("b's session");
    for s in [&mut a1, &mut a2, &mut b1, &mut before] {
        assert!(exchange(s, b"granted"));
    }
    // revoke without --terminate leaves b's session alone (the default)
    let plain = jitd.ctl_json(&["revoke", "--source", B4]);
    assert_eq!(plain["terminated"], serde_json::Value::Null, "{plain}");
    assert!(exchange(&mut b1, b"outlives its grant"));
    let reply = jitd.ctl_json(&["revoke", "--terminate", "--source", A4]);
    let cut: Vec<String> = serde_json::from_value(reply["terminated"].clone()).unwrap();
    assert_eq!(cut.len(), 2, "a's two sessions are cut: {reply}");
    for s in [&a1, &a2] {
        let entry = format!("tcp {A4}:{} -> {HOST_A4}:22", client_port(s));
        assert!(cut.contains(&entry), "{entry} in {cut:?}");
    }
    for (name, s) in [("a1", &mut a1), ("a2", &mut a2)] {
        assert!(
            wait_for(Duration::from_secs(10), || !exchange(s, b"after terminate")),
            "{name} stops exchanging data"
        );
    }
    assert!(exchange(&mut b1, b"b is not a"), "b's session is not cut");
    assert!(
        exchange(&mut before, b"pre-jitd"),
        "the session older than jitd is not cut"
    );
    assert!(!can_connect(&net.a, HOST_A4, 22), "a's grant is gone");
    let terminated: Vec<_> = setup
        .audit()
        .into_iter()
        .filter(|r| r["action"] == "terminate")
        .collect();
    assert_eq!(terminated.len(), 1, "{terminated:?}");
    assert_eq!(terminated[0]["outcome"], "done");
    assert_eq!(terminated[0]["source"], A4);
    let reason = terminated[0]["reason"].as_str().unwrap();
    assert!(reason.starts_with("terminated 2 session(s): "), "{reason}");
    assert!(reason.contains(&format!("{A4}:{}", client_port(&a1))), "{reason}");
}

#[test]
fn a_tampered_syn_check_chain_is_repaired() {
    let net = Net::new();
    serve_echo(&net.host, 22);
    let setup = Setup::new(POLICY);
    let jitd = setup.start(&net.host);
    let out = net.nft(&["flush", "chain", "inet", "jitd", "syn_check"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        wait_for(Duration::from_secs(20), || net.ruleset().contains("counter packets")
            && net.ruleset().contains("@grants6_net ct mark set")
            && !can_connect(&net.a, HOST_A4, 22)),
        "jitd restores syn_check: {}\n{}",
        net.ruleset(),
        jitd.log_text()
    );
    assert!(setup.audit().iter().any(|r| r["action"] == "repair"));
}
