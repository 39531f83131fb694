//! The lockdown: which connections jitd drops, which it leaves alone, and what stopping
//! it or giving it a bad policy does. Proven by connecting from client namespaces.

use std::time::Duration;

use crate::util::*;

const PORTS: &str = "[[ports]]\nport = 22\n[[ports]]\nport = 3389\nprotocol = \"any\"\n";

#[test]
fn protected_ports_drop_new_connections_on_ipv4_and_ipv6_and_other_ports_pass() {
    let net = Net::new();
    for port in [22, 3389, 8080] {
        serve_echo(&net.host, port);
    }
    assert!(can_connect(&net.a, HOST_A4, 22), "before jitd the port is open");
    let setup = Setup::new(PORTS);
    let _jitd = setup.start(&net.host);
    for host in [HOST_A4, HOST_A6] {
        assert!(!can_connect(&net.a, host, 22), "22 is locked on {host}");
        assert!(!can_connect(&net.a, host, 3389), "3389 is locked on {host}");
        assert!(can_connect(&net.a, host, 8080), "8080 is not protected on {host}");
    }
    assert!(!udp_answered(&net.a, HOST_A4, 3389), "protocol any locks UDP too");
    assert!(udp_answered(&net.a, HOST_A4, 8080), "UDP to other ports passes");
    assert!(udp_answered(&net.a, HOST_A4, 22), "22 is tcp only: UDP passes");
    // the host's own traffic over loopback is never locked
    assert!(can_connect(&net.host, "127.0.0.1", 22));
    assert!(can_connect(&net.host, "::1", 22));
    assert!(
        can_connect(&net.host, HOST_A4, 22),
        "host to its own address goes over lo"
    );
    let ruleset = net.ruleset();
    assert_eq!(
        ruleset.matches("table ").count(),
        1,
        "jitd owns exactly one table:\n{ruleset}"
    );
}

#[test]
fn default_policy_locks_ssh_rdp_and_winrm() {
    let net = Net::new();
    for port in [22, 3389, 5985, 5986, 2222] {
        serve_echo(&net.host, port);
    }
    let setup = Setup::new("");
    let _jitd = setup.start(&net.host);
    for port in [22, 3389, 5985, 5986] {
        assert!(!can_connect(&net.a, HOST_A4, port), "default port {port} is locked");
    }
    assert!(can_connect(&net.a, HOST_A4, 2222));
}

#[test]
fn a_session_open_before_jitd_first_starts_survives_the_lockdown() {
    // A fresh namespace: no firewall, so conntrack has never seen this connection.
    let net = Net::new();
    serve_echo(&net.host, 22);
    let mut before = connect(&net.a, HOST_A4, 22).expect("connect before lockdown");
    let mut before6 = connect(&net.a, HOST_A6, 22).expect("connect before lockdown (IPv6)");
    assert!(exchange(&mut before, b"hello"));
    let setup = Setup::new(PORTS);
    let _jitd = setup.start(&net.host);
    assert!(!can_connect(&net.a, HOST_A4, 22), "new connections are dropped");
    for round in 0..3 {
        assert!(
            exchange(&mut before, format!("still here {round}").as_bytes()),
            "the old IPv4 session carries data"
        );
        assert!(exchange(&mut before6, b"v6"), "the old IPv6 session carries data");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn stopping_keeps_the_ports_locked_by_default() {
    let net = Net::new();
    serve_echo(&net.host, 22);
    let setup = Setup::new(PORTS);
    let jitd = setup.start(&net.host);
    let status = jitd.stop(Duration::from_secs(5));
    assert!(status.success(), "SIGTERM exits 0, got {status}");
    assert!(
        !can_connect(&net.a, HOST_A4, 22),
        "keep-locked: still locked after jitd exits"
    );
    assert!(!setup.socket().exists(), "the socket is removed");
    // and `jitd --unlock` removes the lockdown on purpose
    let out = setup.run_jitd(&net.host, &["--unlock"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(can_connect(&net.a, HOST_A4, 22), "unlocked");
    assert!(!net.ruleset().contains("jitd"));
}

#[test]
fn on_stop_unlock_removes_the_table() {
    let net = Net::new();
    serve_echo(&net.host, 22);
    let setup = Setup::new(&format!("on_stop = \"unlock\"\n{PORTS}"));
    let jitd = setup.start(&net.host);
    assert!(!can_connect(&net.a, HOST_A4, 22));
    let status = jitd.stop(Duration::from_secs(5));
    assert!(status.success(), "{status}");
    assert!(can_connect(&net.a, HOST_A4, 22), "unlock: open again after jitd exits");
    assert!(!net.ruleset().contains("jitd"));
    let actions: Vec<String> = setup
        .audit()
        .iter()
        .map(|r| r["action"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(actions, vec!["start", "stop"]);
}

#[test]
fn a_bad_policy_changes_nothing() {
    let net = Net::new();
    serve_echo(&net.host, 22);
    serve_echo(&net.host, 8080);
    // No table yet: a bad policy must not create one.
    let setup = Setup::new("[[ports]]\nport = 70000\n");
    let out = setup.run_jitd(&net.host, &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("jitd.toml: ports[0].port: must be between 1 and 65535, got 70000"),
        "{stderr}"
    );
    assert!(!net.ruleset().contains("jitd"));
    assert!(can_connect(&net.a, HOST_A4, 22));
    // A table from an earlier run stays exactly as it was.
    setup.write_policy(PORTS);
    setup.start(&net.host).stop(Duration::from_secs(5));
    let before = net.ruleset();
    for bad in [
        "bogus = 1",
        "[[ports]]\nport = 22\nmax_duration = \"48h\"",
        "socket_group = \"no-such-group-jitd\"",
        "[lockdown]\ninterfaces = [\"nosuch0\"]",
    ] {
        setup.write_policy(bad);
        let out = setup.run_jitd(&net.host, &[]);
        assert_eq!(out.status.code(), Some(2), "{bad}: {}", text(&out));
        assert_eq!(net.ruleset(), before, "{bad}: ruleset unchanged");
    }
    assert!(!can_connect(&net.a, HOST_A4, 22), "still locked");
    assert!(can_connect(&net.a, HOST_A4, 8080));
}

#[test]
fn exempt_sources_pass_before_the_lockdown() {
    let net = Net::new();
    serve_echo(&net.host, 22);
    let setup = Setup::new(&format!(
        "{PORTS}[lockdown]\nexempt_sources = [\"10.77.2.0/24\", \"fd00:77:2::/64\"]\n"
    ));
    let jitd = setup.start(&net.host);
    assert!(can_connect(&net.b, HOST_B4, 22), "b's IPv4 prefix is exempt");
    assert!(can_connect(&net.b, "fd00:77:2::1", 22), "b's IPv6 prefix is exempt");
    assert!(!can_connect(&net.a, HOST_A4, 22), "a is locked");
    assert!(
        jitd.log_text()
            .contains("exempt from the lockdown (break-glass): 10.77.2.0/24, fd00:77:2::/64"),
        "{}",
        jitd.log_text()
    );
}

#[test]
fn interfaces_limit_the_lockdown() {
    let net = Net::new();
    serve_echo(&net.host, 22);
    let setup = Setup::new(&format!("{PORTS}[lockdown]\ninterfaces = [\"{}\"]\n", net.host_if_a));
    let _jitd = setup.start(&net.host);
    assert!(!can_connect(&net.a, HOST_A4, 22), "traffic arriving on h-a is locked");
    assert!(can_connect(&net.b, HOST_B4, 22), "traffic arriving on h-b is not");
}

#[test]
fn check_config_prints_the_ruleset_and_changes_nothing() {
    let net = Net::new();
    let setup = Setup::new(PORTS);
    let out = setup.run_jitd(&net.host, &["--check-config"]);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("valid"), "{stdout}");
    assert!(stdout.contains("\"hook\": \"input\""), "{stdout}");
    assert!(stdout.contains("the kernel accepts it"), "{stdout}");
    assert!(!net.ruleset().contains("jitd"), "nothing applied");
}

#[test]
fn a_restart_replaces_the_table_and_keeps_the_ports_locked() {
    let net = Net::new();
    serve_echo(&net.host, 22);
    serve_echo(&net.host, 3389);
    let setup = Setup::new(PORTS);
    setup.start(&net.host).kill();
    assert!(!can_connect(&net.a, HOST_A4, 22), "locked after kill -9");
    setup.write_policy("[[ports]]\nport = 3389\n");
    let _jitd = setup.start(&net.host);
    let ruleset = net.ruleset();
    assert_eq!(ruleset.matches("table inet jitd").count(), 1, "{ruleset}");
    assert!(!can_connect(&net.a, HOST_A4, 3389), "the new policy's port is locked");
    assert!(can_connect(&net.a, HOST_A4, 22), "the old policy's port is released");
}

#[test]
fn status_over_the_socket_lists_the_policy() {
    let net = Net::new();
    let setup = Setup::new(
        "[[ports]]\nport = 22\nallowed_sources = [\"10.77.0.0/16\", \"fd00:77::/32\"]\nmax_duration = \"PT1H30M\"\n",
    );
    let jitd = setup.start(&net.host);
    let status = jitd.ctl_json(&["status"]);
    assert_eq!(status["ports"][0]["port"], 22);
    assert_eq!(status["ports"][0]["protocol"], "tcp");
    assert_eq!(
        status["ports"][0]["allowed_sources"],
        serde_json::json!(["10.77.0.0/16", "fd00:77::/32"])
    );
    assert_eq!(status["ports"][0]["max_duration_secs"], 5400);
    assert_eq!(status["grants"], serde_json::json!([]));
    let human = jitd.ctl(&["status"]);
    let out = String::from_utf8_lossy(&human.stdout);
    assert!(
        out.contains("PORT") && out.contains("10.77.0.0/16, fd00:77::/32") && out.contains("1h 30m"),
        "{out}"
    );
}
