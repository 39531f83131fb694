//! Hostile and broken clients on the real socket: each gets an error reply or is
//! dropped after a timeout, and jitd keeps serving everyone else.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::util::*;

fn open(setup: &Setup) -> UnixStream {
    let stream = UnixStream::connect(setup.socket()).expect("connect to jitd");
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    stream
}

fn reply_to(stream: &mut UnixStream, bytes: &[u8]) -> Value {
    stream.write_all(bytes).unwrap();
    read_reply(stream)
}

fn read_reply(stream: &mut UnixStream) -> Value {
    let mut line = String::new();
    BufReader::new(stream.try_clone().unwrap())
        .read_line(&mut line)
        .unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("reply {line:?} is not JSON: {e}"))
}

fn code(reply: &Value) -> &str {
    reply["error"]["code"].as_str().unwrap_or("")
}

fn still_serving(jitd: &Jitd) {
    assert!(jitd.ctl(&["status"]).status.success(), "jitd still answers others");
}

#[test]
fn malformed_requests_get_a_coded_error_and_the_connection_stays_usable() {
    let net = Net::new();
    let setup = Setup::new("");
    let jitd = setup.start(&net.host);
    let mut s = open(&setup);
    assert_eq!(code(&reply_to(&mut s, b"\x00\x01garbage\n")), "malformed");
    assert_eq!(
        code(&reply_to(&mut s, b"{\"v\":1,\"op\":\"st\xffatus\"}\n")),
        "malformed"
    );
    assert_eq!(
        code(&reply_to(&mut s, b"{\"v\":99,\"op\":\"status\"}\n")),
        "unsupported_version"
    );
    assert_eq!(
        code(&reply_to(
            &mut s,
            b"{\"v\":1,\"op\":\"request\",\"source\":\"1.2.3.4\",\"duration_secs\":5,\"ports\":[22],\"admin\":true}\n"
        )),
        "malformed"
    );
    assert_eq!(code(&reply_to(&mut s, b"[1,2,3]\n")), "malformed");
    let ok = reply_to(&mut s, b"{\"v\":1,\"op\":\"status\"}\n");
    assert_eq!(ok["ok"], true, "the same connection still works: {ok}");
    still_serving(&jitd);
}

#[test]
fn an_oversized_request_is_refused_and_the_connection_closed() {
    let net = Net::new();
    let setup = Setup::new("");
    let jitd = setup.start(&net.host);
    let mut s = open(&setup);
    let big = vec![b'x'; 70 * 1024];
    let _ = s.write_all(&big);
    assert_eq!(code(&read_reply(&mut s)), "too_large");
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(rest.is_empty(), "closed after the error");
    still_serving(&jitd);
}

#[test]
fn idle_and_unfinished_clients_are_dropped_after_the_timeout_while_others_are_served() {
    let net = Net::new();
    let setup = Setup::new("");
    let jitd = setup.start(&net.host);
    let mut unfinished = open(&setup);
    unfinished.write_all(b"{\"v\":1,\"op\":").unwrap();
    let idle: Vec<UnixStream> = (0..300).map(|_| open(&setup)).collect();
    let started = Instant::now();
    for _ in 0..3 {
        still_serving(&jitd);
    }
    let reply = read_reply(&mut unfinished);
    assert_eq!(code(&reply), "timeout");
    let waited = started.elapsed();
    assert!(
        waited > Duration::from_secs(8) && waited < Duration::from_secs(15),
        "{waited:?}"
    );
    for mut s in idle {
        assert_eq!(code(&read_reply(&mut s)), "timeout");
    }
    still_serving(&jitd);
}

#[test]
fn beyond_the_connection_limit_clients_are_told_busy() {
    let net = Net::new();
    let setup = Setup::new("");
    let jitd = setup.start(&net.host);
    let held: Vec<UnixStream> = (0..512).map(|_| open(&setup)).collect();
    // let jitd accept them all
    std::thread::sleep(Duration::from_millis(500));
    let mut extra = open(&setup);
    assert_eq!(code(&read_reply(&mut extra)), "busy");
    let out = jitd.ctl(&["status"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a refused connection is a connection error: {}",
        text(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("connections"),
        "{}",
        text(&out)
    );
    drop(held);
    assert!(
        wait_for(Duration::from_secs(20), || jitd.ctl(&["status"]).status.success()),
        "served again once they close"
    );
}

#[test]
fn a_client_that_leaves_mid_reply_does_not_disturb_jitd() {
    let net = Net::new();
    let setup = Setup::new("");
    let jitd = setup.start(&net.host);
    for _ in 0..50 {
        let mut s = open(&setup);
        s.write_all(b"{\"v\":1,\"op\":\"status\"}\n{\"v\":1,\"op\":\"audit\"}\n")
            .unwrap();
        drop(s);
    }
    for _ in 0..20 {
        let mut s = open(&setup);
        s.write_all(b"{\"v\":1,\"op\":\"audit\"}\n").unwrap();
        let mut first = [0u8; 10];
        s.read_exact(&mut first).unwrap();
        drop(s);
    }
    still_serving(&jitd);
}
