//! Pure access decisions: which role a caller holds, and whether a request for access
//! fits the policy. No I/O; the first failing check is the answer.

use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::config::{Access, Config, PortPolicy};
use crate::domain::{format_prefix, Caller, ErrorCode, Principal};

/// What a caller may do; each role includes the ones below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read status and the audit log.
    Viewer,
    /// Also request access and revoke own grants.
    Requester,
    /// Everything, including revoking others' grants and reloading.
    Admin,
}

/// The highest role `caller` holds under `access`; root is always admin. A local caller
/// is matched by `user:`, `group:` and `uid:` entries, a signed remote caller only by
/// `principal:` entries (so a key whose principal is "root" is not root).
/// An approver (`[access] approvers`) holds at least the viewer role, so that it can see
/// what it approves.
pub fn role_of(access: &Access, caller: &Caller) -> Option<Role> {
    let named = |list: &[Principal]| named(list, caller);
    if caller.uid == 0 && caller.signer.is_none() {
        return Some(Role::Admin);
    }
    if named(&access.admins) {
        Some(Role::Admin)
    } else if named(&access.requesters) {
        Some(Role::Requester)
    } else if named(&access.viewers) || named(&access.approvers) {
        Some(Role::Viewer)
    } else {
        None
    }
}

/// Whether `list` names `caller`: a local caller by `user:`, `group:` and `uid:`
/// entries, a signed remote caller only by `principal:` entries.
pub fn named(list: &[Principal], caller: &Caller) -> bool {
    list.iter().any(|p| match (p, &caller.signer) {
        (Principal::Ssh(n), Some(signer)) => signer.principals.iter().any(|s| s == n),
        (_, Some(_)) | (Principal::Ssh(_), None) => false,
        (Principal::User(n), None) => *n == caller.name,
        (Principal::Group(n), None) => caller.groups.iter().any(|g| g == n),
        (Principal::Uid(u), None) => *u == caller.uid,
    })
}

/// Why a request was refused: a stable code for scripts and a sentence for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct Denial {
    /// Machine-readable reason, e.g. `source_not_allowed`.
    pub code: ErrorCode,
    /// What was wrong, naming the value.
    pub message: String,
}

impl Denial {
    /// A denial with `code` and `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Denial {
        Denial {
            code,
            message: message.into(),
        }
    }
}

/// Refuses a caller whose role is below `needed`.
pub fn require_role(access: &Access, caller: &Caller, needed: Role, what: &str) -> Result<Role, Denial> {
    match role_of(access, caller) {
        Some(role) if role >= needed => Ok(role),
        held => Err(Denial::new(
            ErrorCode::NotAuthorized,
            format!(
                "user {} (uid {}) may not {what}: it needs the {} role, and the policy gives {}",
                caller.name,
                caller.uid,
                role_name(needed),
                held.map_or("none".to_string(), |r| format!("only the {} role", role_name(r)))
            ),
        )),
    }
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Viewer => "viewer",
        Role::Requester => "requester",
        Role::Admin => "admin",
    }
}

/// A request for access, already parsed from the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessRequest {
    /// Ports asked for; empty means every protected port.
    pub ports: Vec<u16>,
    /// Address or prefix to open for.
    pub source: IpNet,
    /// How long.
    pub duration: Duration,
}

/// Checks who (role) and what (ports, source, duration) in that order and returns the
/// policy entries to grant, or the first reason that fails.
pub fn check_request<'c>(
    config: &'c Config,
    caller: &Caller,
    request: &AccessRequest,
) -> Result<Vec<&'c PortPolicy>, Denial> {
    require_role(&config.access, caller, Role::Requester, "request access")?;
    // a fleet request is judged under the membership in force now (a reload may have
    // taken this host out of its groups since the watcher read it)
    if let Some(origin) = caller.signer.as_ref().and_then(|s| s.fleet.as_ref()) {
        crate::fleet::settings::still_selected(config.fleet.as_ref(), origin)
            .map_err(|why| Denial::new(ErrorCode::NotSelected, why))?;
    }
    let entries = port_entries(config, &request.ports)?;
    for entry in &entries {
        check_source_width(entry, &request.source)?;
        if !entry.allowed_sources.contains(&request.source) {
            return Err(Denial::new(
                ErrorCode::SourceNotAllowed,
                format!(
                    "source {} is not allowed on port {}/{} (allowed: {})",
                    format_prefix(&request.source),
                    entry.port,
                    entry.protocol,
                    entry.allowed_sources
                ),
            ));
        }
    }
    if request.duration.is_zero() {
        return Err(Denial::new(ErrorCode::DurationInvalid, "duration must be at least 1s"));
    }
    for entry in &entries {
        if request.duration > entry.max_duration {
            return Err(Denial::new(
                ErrorCode::DurationTooLong,
                format!(
                    "duration {} exceeds the maximum of {} for port {}/{}",
                    crate::duration::format(request.duration),
                    crate::duration::format(entry.max_duration),
                    entry.port,
                    entry.protocol
                ),
            ));
        }
    }
    Ok(entries)
}

/// The policy entries for the ports asked for (every entry when none is named), each
/// once; a port the policy does not protect is refused, naming the protected ones.
fn port_entries<'c>(config: &'c Config, ports: &[u16]) -> Result<Vec<&'c PortPolicy>, Denial> {
    if ports.is_empty() {
        return Ok(config.ports.iter().collect());
    }
    let mut entries = Vec::new();
    for &port in ports {
        let found: Vec<&PortPolicy> = config.port_policies(port).collect();
        if found.is_empty() {
            let protected: Vec<String> = config
                .ports
                .iter()
                .map(|p| format!("{}/{}", p.port, p.protocol))
                .collect();
            return Err(Denial::new(
                ErrorCode::PortNotProtected,
                format!(
                    "port {port} is not protected by the policy (protected: {})",
                    protected.join(", ")
                ),
            ));
        }
        for entry in found {
            if !entries.contains(&entry) {
                entries.push(entry);
            }
        }
    }
    Ok(entries)
}

/// Refuses a source wider than `entry`'s `widest_prefix` for its address family, and
/// always the whole Internet (a /0), whatever `allowed_sources` says.
pub fn check_source_width(entry: &PortPolicy, source: &IpNet) -> Result<(), Denial> {
    let widest = entry.widest_prefix.for_source(source);
    let family = match source {
        IpNet::V4(_) => "IPv4",
        IpNet::V6(_) => "IPv6",
    };
    if source.prefix_len() == 0 {
        return Err(Denial::new(
            ErrorCode::SourceTooWide,
            format!(
                "source {source} is the whole {family} Internet; port {}/{} opens for at most a /{widest}",
                entry.port, entry.protocol
            ),
        ));
    }
    if source.prefix_len() < widest {
        return Err(Denial::new(
            ErrorCode::SourceTooWide,
            format!(
                "source {source} is wider than port {}/{} allows: at most a /{widest} for {family} (widest_prefix)",
                entry.port, entry.protocol
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::parse_prefix;
    use std::path::Path;

    fn config() -> Config {
        Config::parse(
            Path::new("/t.toml"),
            r#"
            [[ports]]
            port = 22
            allowed_sources = ["203.0.113.0/24", "2001:db8::/32"]
            max_duration = "2h"
            [[ports]]
            port = 3389
            protocol = "any"
            max_duration = "1h"
            [access]
            admins = ["user:alice"]
            requesters = ["group:ops", "uid:1500"]
            viewers = ["user:victor"]
            "#,
            &|_| None,
        )
        .unwrap()
    }

    fn caller(uid: u32, name: &str, groups: &[&str]) -> Caller {
        Caller {
            uid,
            name: name.into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            signer: None,
        }
    }

    fn request(ports: &[u16], source: &str, secs: u64) -> AccessRequest {
        AccessRequest {
            ports: ports.to_vec(),
            source: parse_prefix(source).unwrap(),
            duration: Duration::from_secs(secs),
        }
    }

    #[test]
    fn roles_come_from_users_groups_and_uids() {
        let access = config().access;
        assert_eq!(role_of(&access, &caller(0, "root", &[])), Some(Role::Admin));
        assert_eq!(role_of(&access, &caller(1000, "alice", &[])), Some(Role::Admin));
        assert_eq!(
            role_of(&access, &caller(1001, "bob", &["users", "ops"])),
            Some(Role::Requester)
        );
        assert_eq!(role_of(&access, &caller(1500, "carol", &[])), Some(Role::Requester));
        assert_eq!(role_of(&access, &caller(1002, "victor", &[])), Some(Role::Viewer));
        assert_eq!(role_of(&access, &caller(1003, "mallory", &["users"])), None);
    }

    #[test]
    fn an_approved_request_names_its_policy_entries() {
        let c = config();
        let ops = caller(1001, "bob", &["ops"]);
        let entries = check_request(&c, &ops, &request(&[22], "203.0.113.7", 3600)).unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].port, 22);
        let all = check_request(&c, &ops, &request(&[], "203.0.113.0/28", 3600)).unwrap();
        assert_eq!(all.iter().map(|e| e.port).collect::<Vec<_>>(), vec![22, 3389]);
    }

    #[test]
    fn a_fleet_request_passes_only_while_the_fleet_settings_in_force_select_this_host() {
        let mut c = config();
        c.access.requesters.push(Principal::Ssh("alice".into()));
        let alice = |hosts: &[&str]| {
            Caller::signed(crate::domain::SignedBy {
                principals: vec!["alice".into()],
                fingerprint: "SHA256:x".into(),
                peer: None,
                nonce: None,
                certificate: None,
                fleet: Some(crate::domain::FleetOrigin {
                    request: "ab".repeat(16),
                    hosts: hosts.iter().map(|h| h.to_string()).collect(),
                    revision: 3,
                    digest: String::new(),
                }),
            })
        };
        let ask = request(&[22], "203.0.113.7", 600);
        // [fleet] off: no fleet request passes, however signed
        let off = check_request(&c, &alice(&["group:web"]), &ask).unwrap_err();
        assert_eq!(off.code, ErrorCode::NotSelected);
        c.fleet = Some(crate::fleet::settings::Fleet {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            tls: None,
            name: "web1".into(),
            groups: vec!["web".into()],
            prefix: "/jitd/".into(),
            id: "/jitd/".into(),
            allowed_signers: "/dev/null".into(),
            signers: std::sync::Arc::new(Vec::new()),
            signers_digest: [0; 32],
        });
        assert!(check_request(&c, &alice(&["group:web"]), &ask).is_ok());
        assert!(check_request(&c, &alice(&["WEB1"]), &ask).is_ok());
        let left = check_request(&c, &alice(&["group:db", "web2"]), &ask).unwrap_err();
        assert_eq!(left.code, ErrorCode::NotSelected);
        assert!(left.message.contains("no longer among"), "{}", left.message);
    }

    #[test]
    fn checks_run_in_order_and_name_the_first_failure() {
        let c = config();
        let ops = caller(1001, "bob", &["ops"]);
        let code = |who: &Caller, r: AccessRequest| check_request(&c, who, &r).unwrap_err().code;
        // who comes before what
        assert_eq!(
            code(&caller(1002, "victor", &[]), request(&[9999], "192.0.2.1", 0)),
            ErrorCode::NotAuthorized
        );
        assert_eq!(
            code(&ops, request(&[9999], "192.0.2.1", 0)),
            ErrorCode::PortNotProtected
        );
        assert_eq!(code(&ops, request(&[22], "0.0.0.0/0", 0)), ErrorCode::SourceTooWide);
        assert_eq!(code(&ops, request(&[22], "192.0.2.1", 0)), ErrorCode::SourceNotAllowed);
        assert_eq!(
            code(&ops, request(&[22], "203.0.0.0/16", 60)),
            ErrorCode::SourceNotAllowed
        );
        assert_eq!(code(&ops, request(&[22], "203.0.113.7", 0)), ErrorCode::DurationInvalid);
        assert_eq!(
            code(&ops, request(&[22], "203.0.113.7", 2 * 3600 + 1)),
            ErrorCode::DurationTooLong
        );
        assert_eq!(
            code(&ops, request(&[22, 3389], "203.0.113.7", 2 * 3600)),
            ErrorCode::DurationTooLong
        );
    }

    fn open_config(port_extra: &str) -> Config {
        let text = format!(
            "[[ports]]\nport = 22\nallowed_sources = [\"any\"]\n{port_extra}\n[access]\nrequesters = [\"uid:1500\"]\n"
        );
        Config::parse(Path::new("/t.toml"), &text, &|_| None).unwrap()
    }

    #[test]
    fn sources_wider_than_widest_prefix_are_refused_even_from_any() {
        let c = open_config("");
        let who = caller(1500, "carol", &[]);
        let verdict = |source: &str| check_request(&c, &who, &request(&[22], source, 60)).map(|_| ());
        for wide in [
            "0.0.0.0/0",
            "::/0",
            "10.0.0.0/8",
            "10.0.0.0/15",
            "2001:db8::/31",
            "8000::/1",
        ] {
            assert_eq!(verdict(wide).unwrap_err().code, ErrorCode::SourceTooWide, "{wide}");
        }
        for fine in [
            "10.1.0.0/16",
            "10.1.2.0/24",
            "192.0.2.7",
            "2001:db8::/32",
            "2001:db8::1",
        ] {
            assert_eq!(verdict(fine), Ok(()), "{fine}");
        }
        // every port asked for is checked, the default (all ports) too
        assert_eq!(
            check_request(&c, &who, &request(&[], "::/0", 60)).unwrap_err().code,
            ErrorCode::SourceTooWide
        );
    }

    #[test]
    fn widest_prefix_is_per_port_and_per_family() {
        let c = open_config("widest_prefix = { ipv4 = 24, ipv6 = 1 }");
        let who = caller(1500, "carol", &[]);
        let verdict = |source: &str| check_request(&c, &who, &request(&[22], source, 60)).map(|_| ());
        assert_eq!(verdict("10.1.0.0/16").unwrap_err().code, ErrorCode::SourceTooWide);
        assert_eq!(verdict("10.1.2.0/24"), Ok(()));
        assert_eq!(verdict("8000::/1"), Ok(()));
        assert_eq!(
            verdict("::/0").unwrap_err().code,
            ErrorCode::SourceTooWide,
            "never the whole Internet"
        );
    }

    #[test]
    fn too_wide_messages_name_the_source_port_and_limit() {
        let c = open_config("");
        let who = caller(1500, "carol", &[]);
        let message = |source: &str| {
            check_request(&c, &who, &request(&[22], source, 60))
                .unwrap_err()
                .message
        };
        assert_eq!(
            message("0.0.0.0/0"),
            "source 0.0.0.0/0 is the whole IPv4 Internet; port 22/tcp opens for at most a /16"
        );
        assert_eq!(
            message("2001:d00::/24"),
            "source 2001:d00::/24 is wider than port 22/tcp allows: at most a /32 for IPv6 (widest_prefix)"
        );
    }

    #[test]
    fn messages_name_the_values() {
        let c = config();
        let ops = caller(1001, "bob", &["ops"]);
        let m = check_request(&c, &ops, &request(&[22], "192.0.2.1", 60))
            .unwrap_err()
            .message;
        assert_eq!(
            m,
            "source 192.0.2.1 is not allowed on port 22/tcp (allowed: 203.0.113.0/24, 2001:db8::/32)"
        );
        let m = check_request(&c, &caller(7, "victor", &[]), &request(&[22], "192.0.2.1", 60))
            .unwrap_err()
            .message;
        assert_eq!(m, "user victor (uid 7) may not request access: it needs the requester role, and the policy gives only the viewer role");
    }
}
