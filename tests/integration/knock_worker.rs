//! The knock worker (`jitd --knock-worker`, docs/security/knock-worker.md): the
//! process that reads knocks holds no privilege, is confined by seccomp and talks to
//! jitd only over its channel; killing it opens nothing and jitd restarts it; what it
//! says is checked again, so a worker that lies or babbles opens nothing. Proven on the
//! real processes: their /proc entries, and the worker's own end of the channel taken
//! with pidfd_getfd, as an exploit inside it would hold it.

use std::collections::BTreeMap;
use std::os::fd::{FromRawFd, OwnedFd};
use std::time::Duration;

use chrono::{DateTime, Utc};
use jitd::remote::request::{KnockRequest, Length};
use serde_json::{json, Value};

use crate::knock::*;
use crate::util::*;

/// The pid of jitd's knock worker, once there is one (and not `not`).
fn worker_of(jitd: &Jitd, not: Option<i32>) -> i32 {
    let mut found = None;
    let seen = wait_for(Duration::from_secs(15), || {
        found = workers_of(jitd.pid()).into_iter().find(|p| Some(*p) != not);
        found.is_some()
    });
    assert!(seen, "no knock worker under jitd {}: {}", jitd.pid(), jitd.log_text());
    found.unwrap()
}

/// The children of `parent` running `--knock-worker`.
fn workers_of(parent: i32) -> Vec<i32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let is_worker = cmdline.split(|b| *b == 0).any(|a| a == b"--knock-worker");
        if is_worker && field(&status, "PPid") == parent.to_string() {
            pids.push(pid);
        }
    }
    pids
}

/// The `/proc/PID/status` fields of a process.
fn status_of(pid: i32) -> BTreeMap<String, String> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect()
}

fn field(status: &str, name: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or("")
        .trim()
        .to_string()
}

/// Whether the worker has sent jitd its first message (it is confined by then).
fn ready(jitd: &Jitd, pid: i32) -> bool {
    wait_for(Duration::from_secs(15), || {
        jitd.log_text()
            .contains(&format!("knock worker {pid} runs unprivileged and confined"))
    })
}

#[test]
fn the_worker_holds_no_privilege_and_is_confined() {
    let s = Scene::new("", "");
    let jitd = s.start();
    let pid = worker_of(&jitd, None);
    assert!(ready(&jitd, pid), "{}", jitd.log_text());
    let worker = status_of(pid);
    let parent = status_of(jitd.pid());
    assert_eq!(worker["Uid"], "65534\t65534\t65534\t65534", "runs as nobody");
    assert_eq!(worker["Gid"], "65534\t65534\t65534\t65534");
    assert_eq!(worker["Groups"], "", "no supplementary groups");
    for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(worker[set], "0000000000000000", "{set}: no capability at all");
    }
    assert_eq!(worker["NoNewPrivs"], "1");
    assert_eq!(worker["Seccomp"], "2", "a seccomp filter is in force");
    assert_eq!(worker["Seccomp_filters"], "2");
    // CAP_NET_ADMIN is bit 12: jitd has it (it owns the table), the worker never can
    let net_admin = 1u64 << 12;
    let caps = |s: &BTreeMap<String, String>, k: &str| u64::from_str_radix(&s[k], 16).unwrap();
    assert_ne!(
        caps(&parent, "CapEff") & net_admin,
        0,
        "jitd itself holds CAP_NET_ADMIN"
    );
    assert_eq!(caps(&worker, "CapBnd") & net_admin, 0);

    // nothing open but /dev/null, the knock socket and its end of the channel
    let mut fds: Vec<(i32, String)> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .map(|e| {
            let n = e.file_name().to_string_lossy().parse().unwrap();
            (n, std::fs::read_link(e.path()).unwrap().display().to_string())
        })
        .collect();
    fds.sort();
    let numbers: Vec<i32> = fds.iter().map(|(n, _)| *n).collect();
    assert_eq!(numbers, [0, 1, 2, 3, 4], "{fds:?}");
    // (seen from outside a chroot, /proc names the file with the chroot's own path)
    assert!(fds[..3].iter().all(|(_, t)| t.ends_with("/dev/null")), "{fds:?}");
    assert!(fds[3..].iter().all(|(_, t)| t.starts_with("socket:")), "{fds:?}");
    let udp_inode = fds[3]
        .1
        .trim_start_matches("socket:[")
        .trim_end_matches(']')
        .to_string();
    let udp6 = std::fs::read_to_string(format!("/proc/{pid}/net/udp6")).unwrap();
    assert!(
        udp6.lines()
            .any(|l| l.split_whitespace().nth(9) == Some(udp_inode.as_str())
                && l.contains(&format!(":{:04X} ", KNOCK_PORT))),
        "fd 3 is the knock socket: {udp6}"
    );

    // and a knock opens, through it
    send(&s.net.a, HOST_A4, &packet(&s.alice, &Ask::port22()));
    assert!(opens(&s.net.a, HOST_A4), "{}", jitd.log_text());
}

#[test]
fn killing_the_worker_opens_nothing_and_jitd_restarts_it() {
    let s = Scene::new("", "");
    let mallory = Key::new(s.keydir.path(), "mallory", &["-t", "ed25519"]);
    let jitd = s.start();
    let first = worker_of(&jitd, None);
    assert!(ready(&jitd, first));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(first), nix::sys::signal::Signal::SIGKILL).unwrap();
    // knocks while it is down, and right after: a stranger's, and garbage
    for _ in 0..5 {
        send(&s.net.a, HOST_A4, &packet(&mallory, &Ask::port22()));
        send(&s.net.a, HOST_A4, b"JITDKNK1\x00\x05hello");
    }
    let second = worker_of(&jitd, Some(first));
    assert!(ready(&jitd, second), "{}", jitd.log_text());
    assert_eq!(status_of(second)["Seccomp"], "2", "the new worker is confined too");
    assert!(
        refused_with(&s.setup, "unknown_key", |_| true),
        "the stranger's knocks, read by the new worker, are refused: {}",
        jitd.log_text()
    );
    assert!(!can_connect(&s.net.a, HOST_A4, 22), "nothing opened");
    let lost = knock_records(&s.setup).into_iter().find(|r| r["outcome"] == "failed");
    let lost = lost.expect("the lost worker is audited");
    assert!(
        lost["reason"]
            .as_str()
            .unwrap()
            .contains(&format!("knock worker {first} ended")),
        "{lost}"
    );
    send(&s.net.b, HOST_B4, &packet(&s.bob, &Ask::port22()));
    assert!(opens(&s.net.b, HOST_B4), "knocks work again: {}", jitd.log_text());
    assert!(!can_connect(&s.net.a, HOST_A4, 22));
}

/// The worker's end of its channel, taken from it as an exploit inside it would hold it.
fn channel_of(worker: i32) -> OwnedFd {
    // SAFETY: plain system calls; the returned descriptors are new and ours.
    unsafe {
        let pidfd = nix::libc::syscall(nix::libc::SYS_pidfd_open, worker, 0);
        assert!(pidfd >= 0, "pidfd_open: {}", std::io::Error::last_os_error());
        let pidfd = OwnedFd::from_raw_fd(pidfd as i32);
        let fd = nix::libc::syscall(
            nix::libc::SYS_pidfd_getfd,
            std::os::fd::AsRawFd::as_raw_fd(&pidfd),
            4,
            0,
        );
        assert!(fd >= 0, "pidfd_getfd: {}", std::io::Error::last_os_error());
        OwnedFd::from_raw_fd(fd as i32)
    }
}

fn say(channel: &OwnedFd, message: &[u8]) {
    let fd = std::os::fd::AsRawFd::as_raw_fd(channel);
    // SAFETY: a valid buffer and descriptor.
    let n = unsafe { nix::libc::send(fd, message.as_ptr().cast(), message.len(), 0) };
    assert_eq!(n, message.len() as isize, "send: {}", std::io::Error::last_os_error());
}

/// A request text for this host, signed now (as far as the text goes: no signature).
fn request_text(time: DateTime<Utc>) -> String {
    KnockRequest {
        host: HOST_NAME.into(),
        ports: vec![22],
        length: Length::Duration(600),
        source: None,
        justification: None,
        time: DateTime::from_timestamp(time.timestamp(), 0).unwrap(),
        nonce: [7; 16],
    }
    .encode()
}

fn verified(request: &str, principals: &[&str], fingerprint: &str, certificate: Value) -> Vec<u8> {
    let message = json!({"verified": {
        "peer": format!("{A4}:40000"),
        "request": request,
        "principals": principals,
        "fingerprint": fingerprint,
        "certificate": certificate,
    }});
    serde_json::to_vec(&message).unwrap()
}

fn fingerprint(key: &Key) -> String {
    let public = ssh_key::PublicKey::from_openssh(&key.public).unwrap();
    public.fingerprint(ssh_key::HashAlg::Sha256).to_string()
}

#[test]
fn a_worker_that_lies_or_babbles_opens_nothing() {
    let s = Scene::new("", "");
    let mallory = Key::new(s.keydir.path(), "mallory", &["-t", "ed25519"]);
    let jitd = s.start();
    let first = worker_of(&jitd, None);
    assert!(ready(&jitd, first));
    let channel = channel_of(first);
    let now = Utc::now();

    // "verified" by a key no line allows, as alice: refused, the worker kept
    say(
        &channel,
        &verified(&request_text(now), &["alice"], &fingerprint(&mallory), Value::Null),
    );
    assert!(refused_with(&s.setup, "unknown_key", |_| true), "{}", jitd.log_text());
    // a certificate from a CA no line allows
    let cert = json!(["forged", 1, fingerprint(&mallory)]);
    say(
        &channel,
        &verified(&request_text(now), &["alice"], &fingerprint(&s.alice), cert),
    );
    assert!(
        refused_with(&s.setup, "bad_certificate", |_| true),
        "{}",
        jitd.log_text()
    );
    // outside the window, and for another host
    let stale = request_text(now - chrono::TimeDelta::hours(1));
    say(
        &channel,
        &verified(&stale, &["alice"], &fingerprint(&s.alice), Value::Null),
    );
    assert!(
        refused_with(&s.setup, "outside_window", |_| true),
        "{}",
        jitd.log_text()
    );
    assert!(!can_connect(&s.net.a, HOST_A4, 22), "nothing opened");
    assert_eq!(workers_of(jitd.pid()), [first], "a worker that may be honest is kept");

    // a request not in canonical form: no honest worker sends it; killed, restarted
    let sloppy = request_text(now).replace("ports 22", "ports  22");
    say(
        &channel,
        &verified(&sloppy, &["alice"], &fingerprint(&s.alice), Value::Null),
    );
    let second = worker_of(&jitd, Some(first));
    assert!(
        wait_for(Duration::from_secs(10), || !workers_of(jitd.pid()).contains(&first)),
        "the lying worker is gone"
    );
    assert!(ready(&jitd, second), "{}", jitd.log_text());
    // garbage from the new one's end: killed too
    let channel = channel_of(second);
    say(&channel, b"{\"verified\": 17}");
    let third = worker_of(&jitd, Some(second));
    assert!(ready(&jitd, third), "{}", jitd.log_text());
    assert!(!can_connect(&s.net.a, HOST_A4, 22), "nothing opened");
    let lost: Vec<String> = knock_records(&s.setup)
        .into_iter()
        .filter(|r| r["outcome"] == "failed")
        .map(|r| r["reason"].as_str().unwrap().to_string())
        .collect();
    assert!(
        lost.iter()
            .any(|r| r.contains(&format!("knock worker {first} broke the protocol"))),
        "{lost:?}"
    );
    assert!(
        lost.iter()
            .any(|r| r.contains(&format!("knock worker {second} sent garbage"))),
        "{lost:?}"
    );
    // and a real knock still opens
    send(&s.net.a, HOST_A4, &packet(&s.alice, &Ask::port22()));
    assert!(opens(&s.net.a, HOST_A4), "{}", jitd.log_text());
}
