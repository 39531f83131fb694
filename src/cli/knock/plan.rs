//! What a knock will do, decided from the command line over the hosts file (flags
//! win), and the request it signs. Pure: the clock, the nonce and the file's contents
//! are given.

use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Timelike, Utc};
use ipnet::IpNet;

use super::hosts::HostSettings;
use super::ports::PortSpec;
use super::target::{self, Host, DEFAULT_KNOCK_PORT};
use crate::cli::jitctl::KnockArgs;
use crate::remote::request::{KnockRequest, Length};

/// Which address families a knock may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Whatever the resolver gives, in its order.
    Any,
    /// IPv4 only (`-4`).
    V4,
    /// IPv6 only (`-6`).
    V6,
}

/// A knock, decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The host to knock on.
    pub host: Host,
    /// The UDP port the knock goes to.
    pub knock_port: u16,
    /// The ports asked for, in the order given (the request sorts them).
    pub ports: Vec<PortSpec>,
    /// How long.
    pub length: Length,
    /// The signed source, if any.
    pub source: Option<IpNet>,
    /// Why.
    pub justification: Option<String>,
    /// The key asked for, and where it was asked (`--key`, or the hosts file); `None`:
    /// the agent's or a default.
    pub key: Option<(PathBuf, String)>,
    /// The TCP port to wait for, and for how long; `None`: do not wait.
    pub wait: Option<(u16, Duration)>,
    /// Address families allowed.
    pub family: Family,
}

/// Decides the knock: `args` over `file` (the host's settings, and the file's path for
/// messages). Errors say which flag or setting is missing or wrong.
pub fn plan(args: &KnockArgs, file: Option<(&Path, HostSettings)>) -> Result<Plan, String> {
    let target = target::parse(&args.host)?;
    let (path, settings) = match file {
        Some((p, s)) => (Some(p), s),
        None => (None, HostSettings::default()),
    };
    let hint = |what: &str| match path {
        Some(p) => format!("{what} for {} in {}", target.host.request_name(), p.display()),
        None => format!("{what} for the host in ~/.config/jitctl/hosts.toml"),
    };
    let ports = match (&args.ports[..], settings.ports) {
        ([], Some(p)) => p,
        ([], None) => return Err(format!("give --port (or {})", hint("`ports`"))),
        (given, _) => given.to_vec(),
    };
    let length = match (args.duration, args.until, settings.duration_secs) {
        (Some(d), _, _) => Length::Duration(d.as_secs() + u64::from(d.subsec_nanos() > 0)),
        (None, Some(t), _) => Length::Until(t.with_nanosecond(0).expect("0 ns is a valid time")),
        (None, None, Some(secs)) => Length::Duration(secs),
        (None, None, None) => return Err(format!("give --duration or --until (or {})", hint("`duration`"))),
    };
    if length == Length::Duration(0) {
        return Err("--duration: must be longer than 0".into());
    }
    let source = match &args.source {
        Some(s) => Some(crate::domain::parse_prefix(s).map_err(|e| format!("--source {s:?}: {e}"))?),
        None => settings.source,
    };
    let wait = match (args.no_wait || args.dry_run, ports.iter().find(|p| !p.udp)) {
        (false, Some(tcp)) => Some((tcp.port, args.wait_timeout)),
        _ => None,
    };
    let family = match (args.ipv4, args.ipv6) {
        (true, _) => Family::V4,
        (_, true) => Family::V6,
        _ => Family::Any,
    };
    Ok(Plan {
        knock_port: target.port.or(settings.knock_port).unwrap_or(DEFAULT_KNOCK_PORT),
        host: target.host,
        ports,
        length,
        source,
        justification: args.justification.clone(),
        key: match (&args.key, settings.key, path) {
            (Some(k), _, _) => Some((k.clone(), "--key".into())),
            (None, Some(k), Some(p)) => Some((k, format!("`key` in {}:", p.display()))),
            _ => None,
        },
        wait,
        family,
    })
}

/// The request `plan` signs at `time` with `nonce`, checked by the very parser jitd
/// reads it with: what jitd would refuse (17 ports, a justification with control
/// characters, ...) is refused here, before anything is signed or sent.
pub fn request(plan: &Plan, time: DateTime<Utc>, nonce: [u8; 16]) -> Result<KnockRequest, String> {
    let mut ports: Vec<u16> = plan.ports.iter().map(|p| p.port).collect();
    ports.sort_unstable();
    ports.dedup();
    let request = KnockRequest {
        host: plan.host.request_name(),
        ports,
        length: plan.length,
        source: plan.source,
        justification: plan.justification.clone(),
        time: time.with_nanosecond(0).expect("0 ns is a valid time"),
        nonce,
    };
    match KnockRequest::parse(&request.encode()) {
        Ok(back) if back == request => Ok(request),
        Ok(_) => Err("the request does not read back as written (a bug in jitctl)".into()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn args(line: &[&str]) -> KnockArgs {
        let cli = crate::cli::jitctl::Cli::try_parse_from([&["jitctl", "knock"], line].concat()).unwrap();
        match cli.command {
            crate::cli::jitctl::Command::Knock(a) => a,
            other => panic!("{other:?}"),
        }
    }

    fn tcp(port: u16) -> PortSpec {
        PortSpec { port, udp: false }
    }

    fn file_settings() -> HostSettings {
        HostSettings {
            knock_port: Some(62223),
            ports: Some(vec![PortSpec { port: 500, udp: true }, tcp(3389)]),
            duration_secs: Some(1800),
            key: Some("/keys/k.pub".into()),
            source: Some(crate::domain::parse_prefix("198.51.100.7").unwrap()),
        }
    }

    #[test]
    fn flags_alone() {
        let p = plan(
            &args(&["WEB1.example.org", "-p", "22", "-d", "1h", "-j", "INC-1"]),
            None,
        )
        .unwrap();
        assert_eq!(p.host, Host::Name("web1.example.org".into()));
        assert_eq!((p.knock_port, p.ports.clone()), (62222, vec![tcp(22)]));
        assert_eq!(p.length, Length::Duration(3600));
        assert_eq!((p.source, p.key.clone()), (None, None));
        assert_eq!(p.wait, Some((22, Duration::from_secs(10))));
        assert_eq!(p.family, Family::Any);
        let p = plan(
            &args(&["[::1]:7", "-p", "22", "-u", "2026-12-01T17:00:00.5Z", "--no-wait", "-6"]),
            None,
        )
        .unwrap();
        assert_eq!(p.knock_port, 7);
        assert_eq!(p.length, Length::Until("2026-12-01T17:00:00Z".parse().unwrap()));
        assert_eq!((p.wait, p.family), (None, Family::V6));
        let p = plan(
            &args(&["web1", "-p", "2", "-d", "1500ms", "--wait-timeout", "1m"]),
            None,
        )
        .unwrap();
        assert_eq!(p.length, Length::Duration(2), "rounded up to whole seconds");
        assert_eq!(p.wait, Some((2, Duration::from_secs(60))));
    }

    #[test]
    fn the_file_fills_what_the_flags_leave_open_and_flags_win() {
        let file = Path::new("/h/hosts.toml");
        let p = plan(&args(&["web1"]), Some((file, file_settings()))).unwrap();
        assert_eq!(p.knock_port, 62223);
        assert_eq!(p.ports, vec![PortSpec { port: 500, udp: true }, tcp(3389)]);
        assert_eq!(p.length, Length::Duration(1800));
        assert_eq!(p.source, Some(crate::domain::parse_prefix("198.51.100.7").unwrap()));
        assert_eq!(p.key, Some(("/keys/k.pub".into(), "`key` in /h/hosts.toml:".into())));
        assert_eq!(p.wait, Some((3389, Duration::from_secs(10))), "the first TCP port");
        let line = [
            "web1:9",
            "-p",
            "22",
            "-u",
            "2026-12-01",
            "-s",
            "2001:db8::/64",
            "-k",
            "my.pub",
        ];
        let p = plan(&args(&line), Some((file, file_settings()))).unwrap();
        assert_eq!((p.knock_port, p.ports.clone()), (9, vec![tcp(22)]));
        assert_eq!(p.length, Length::Until("2026-12-01T00:00:00Z".parse().unwrap()));
        assert_eq!(p.source, Some("2001:db8::/64".parse().unwrap()));
        assert_eq!(p.key, Some(("my.pub".into(), "--key".into())));
    }

    #[test]
    fn what_is_missing_or_wrong_is_named() {
        let e = plan(&args(&["web1", "-d", "1h"]), None).unwrap_err();
        assert!(e.contains("give --port (or `ports` for the host in ~/.config"), "{e}");
        let file = Path::new("/h/hosts.toml");
        let e = plan(&args(&["web1", "-d", "1h"]), Some((file, HostSettings::default()))).unwrap_err();
        assert!(e.contains("`ports` for web1 in /h/hosts.toml"), "{e}");
        let e = plan(&args(&["web1", "-p", "22"]), None).unwrap_err();
        assert!(e.contains("give --duration or --until"), "{e}");
        let e = plan(&args(&["web1", "-p", "22", "-d", "0s"]), None).unwrap_err();
        assert!(e.contains("--duration"), "{e}");
        let e = plan(&args(&["web1", "-p", "22", "-d", "1h", "-s", "10.0.0.1/8"]), None).unwrap_err();
        assert!(e.contains("--source \"10.0.0.1/8\": has host bits"), "{e}");
        let e = plan(&args(&["web1:x", "-p", "22", "-d", "1h"]), None).unwrap_err();
        assert!(e.contains("knock port"), "{e}");
        let p = plan(&args(&["web1", "-p", "500/udp", "-d", "1h"]), None).unwrap();
        assert_eq!(p.wait, None, "nothing to poll");
    }

    #[test]
    fn the_request_is_canonical_and_checked_as_jitd_will() {
        let time: DateTime<Utc> = "2026-11-26T13:05:00.7Z".parse().unwrap();
        let line = [
            "2001:DB8::1",
            "-p",
            "3389",
            "-p",
            "22",
            "-p",
            "22/udp",
            "-d",
            "1h",
            "-j",
            "INC-1234",
        ];
        let p = plan(&args(&line), None).unwrap();
        let r = request(&p, time, [0x5f; 16]).unwrap();
        assert_eq!(
            r.encode(),
            format!(
                "host 2001:db8::1\nports 22,3389\nduration 3600\njustification INC-1234\ntime 2026-11-26T13:05:00Z\nnonce {}\n",
                "5f".repeat(16)
            )
        );
        let p = plan(&args(&["web1", "-p", "22", "-d", "1h", "-s", "198.51.100.7"]), None).unwrap();
        let text = request(&p, time, [0; 16]).unwrap().encode();
        assert!(
            text.starts_with("host web1\nports 22\nduration 3600\nsource 198.51.100.7\ntime "),
            "{text}"
        );
        let hostile = plan(&args(&["web1", "-p", "22", "-d", "1h", "-j", "a\u{1b}[2J"]), None).unwrap();
        assert!(request(&hostile, time, [0; 16]).unwrap_err().contains("justification"));
        let many: Vec<String> = (1..=17).map(|p| p.to_string()).collect();
        let mut line = vec!["web1", "-d", "1h"];
        for p in &many {
            line.extend(["-p", p.as_str()]);
        }
        let p = plan(&args(&line), None).unwrap();
        assert!(request(&p, time, [0; 16]).unwrap_err().contains("at most 16"));
    }
}
