//! The JIT policy file: raw TOML (unknown keys refused) validated in one step into a
//! ready-to-use [`Config`], with errors of the form `path: field: what is wrong, got VALUE`.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::domain::{format_prefix, parse_prefix, Principal, Protocol};

/// Where jitd looks for its policy unless told otherwise.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/jitd/jitd.toml";
/// Where jitd listens and jitctl connects unless told otherwise.
pub const DEFAULT_SOCKET_PATH: &str = "/run/jitd/jitd.sock";
/// Where grants and the audit log live unless told otherwise.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/jitd";
/// The longest grant any port may allow.
pub const MAX_DURATION_LIMIT: Duration = Duration::from_secs(24 * 3600);
/// The maximum duration of a port whose entry does not set one (Azure's default).
pub const DEFAULT_MAX_DURATION: Duration = Duration::from_secs(3 * 3600);
/// How long a request for a port with `approvals = 1` waits for its approval unless the
/// port's entry says otherwise.
pub const DEFAULT_APPROVAL_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// The smallest `audit_max_bytes` accepted.
pub const MIN_AUDIT_BYTES: i64 = 4096;
/// The ports protected when the policy lists none: SSH, RDP, WinRM (HTTP and HTTPS).
pub const DEFAULT_PORTS: [u16; 4] = [22, 3389, 5985, 5986];
/// IPv4 prefixes shorter than this in `allowed_sources` or `exempt_sources` are warned about.
pub const WIDE_IPV4_PREFIX: u8 = 8;
/// IPv6 prefixes shorter than this in `allowed_sources` or `exempt_sources` are warned about.
pub const WIDE_IPV6_PREFIX: u8 = 32;

/// The most connections served at once; more are told `busy` and closed.
pub const MAX_CONNECTIONS: usize = 512;
/// Slots of [`MAX_CONNECTIONS`] only privileged peers may take.
pub const RESERVED_CONNECTIONS: usize = 64;
/// Slots open to every peer: the rest.
pub const GENERAL_CONNECTIONS: usize = MAX_CONNECTIONS - RESERVED_CONNECTIONS;

/// When the audit log is rotated and how many rotated files are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rotation {
    /// Rotate once the current file is larger than this.
    pub max_bytes: u64,
    /// Rotated files kept (`audit.jsonl.1` .. `audit.jsonl.N`); older ones are deleted.
    pub keep: usize,
}

impl Default for Rotation {
    fn default() -> Self {
        Rotation {
            max_bytes: 64 * 1024 * 1024,
            keep: 10,
        }
    }
}

/// Per-connection limits of the socket (`[limits]` in the policy).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections one unprivileged uid may hold at once (1..=[`GENERAL_CONNECTIONS`]).
    pub per_user: usize,
    /// Replies after which a connection is closed.
    pub max_requests: u32,
    /// Age after which a connection is closed (once its current request is answered).
    pub lifetime: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            per_user: 32,
            max_requests: 1000,
            lifetime: Duration::from_secs(600),
        }
    }
}

/// A validated policy: every value checked, every name resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file it was read from (for messages).
    pub path: PathBuf,
    /// Unix socket jitctl connects to.
    pub socket: PathBuf,
    /// Group allowed to connect to the socket (mode 0660); `None`: root only (0600).
    pub socket_group: Option<SocketGroup>,
    /// Directory for grants and the audit log.
    pub state_dir: PathBuf,
    /// What stopping jitd does to the lockdown.
    pub on_stop: OnStop,
    /// The protected ports, in file order.
    pub ports: Vec<PortPolicy>,
    /// Who and what the lockdown leaves alone.
    pub lockdown: Lockdown,
    /// Who may do what.
    pub access: Access,
    /// When the audit log is rotated.
    pub audit_rotation: Rotation,
    /// Rotation never deletes a record younger than this (`audit_retain`); `None`:
    /// only the records of live grants and waiting requests are held.
    pub audit_retain: Option<Duration>,
    /// Where to serve Prometheus metrics; `None`: not at all.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// How the socket's connections are shared (`[limits]`); read at start only.
    pub limits: Limits,
    /// Remote knocks (`[remote]`); `None`: off.
    pub remote: Option<crate::remote::settings::Remote>,
    /// Fleet membership through etcd (`[fleet]`); `None`: off.
    pub fleet: Option<crate::fleet::settings::Fleet>,
}

/// The group that owns the socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketGroup {
    /// Group name as written in the policy.
    pub name: String,
    /// Its numeric id, resolved at load time.
    pub gid: u32,
}

/// What stopping jitd does to the lockdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnStop {
    /// Leave the table in the kernel: the ports stay shut (fail closed).
    KeepLocked,
    /// Remove jitd's table: the ports open again.
    Unlock,
}

/// Which sources a port may be opened for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum AllowedSources {
    /// Any address (`"any"`).
    Any,
    /// Only addresses inside these prefixes.
    Prefixes(Vec<IpNet>),
}

impl AllowedSources {
    /// Whether `source` (an address or a prefix) lies wholly inside the allowed set.
    pub fn contains(&self, source: &IpNet) -> bool {
        match self {
            AllowedSources::Any => true,
            AllowedSources::Prefixes(list) => list.iter().any(|p| p.contains(source)),
        }
    }
}

impl fmt::Display for AllowedSources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AllowedSources::Any => f.write_str("any"),
            AllowedSources::Prefixes(list) => {
                let text: Vec<String> = list.iter().map(format_prefix).collect();
                f.write_str(&text.join(", "))
            }
        }
    }
}

/// One protected port and the limits on opening it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortPolicy {
    /// Destination port, 1..=65535.
    pub port: u16,
    /// Which transport(s).
    pub protocol: Protocol,
    /// Which sources may be granted access.
    pub allowed_sources: AllowedSources,
    /// Longest grant allowed.
    pub max_duration: Duration,
    /// The widest source prefix one request may open this port for.
    pub widest_prefix: WidestPrefix,
    /// How many people other than the requester must approve a request (0 or 1): with
    /// 1, a request waits as pending until an approver decides (docs/protocol.md).
    pub approvals: u8,
    /// How long such a request waits for its approval before it times out.
    pub approval_timeout: Duration,
}

/// The shortest prefix length a request's source may have, per address family: a
/// request for a wider source (or for the whole Internet) is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct WidestPrefix {
    /// For IPv4 sources, 1..=32 (default 16).
    pub ipv4: u8,
    /// For IPv6 sources, 1..=128 (default 32).
    pub ipv6: u8,
}

impl Default for WidestPrefix {
    fn default() -> Self {
        WidestPrefix { ipv4: 16, ipv6: 32 }
    }
}

impl WidestPrefix {
    /// The shortest prefix length allowed for `source`'s address family.
    pub fn for_source(&self, source: &IpNet) -> u8 {
        match source {
            IpNet::V4(_) => self.ipv4,
            IpNet::V6(_) => self.ipv6,
        }
    }
}

/// Who and what the lockdown leaves alone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lockdown {
    /// Sources never locked out (bastion, VPN range).
    pub exempt_sources: Vec<IpNet>,
    /// Lock only traffic arriving on these interfaces; empty: every interface.
    pub interfaces: Vec<String>,
}

/// The three roles of `[access]`; root is always an admin.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Access {
    /// May do everything: request, revoke anyone's grant, reload.
    pub admins: Vec<Principal>,
    /// May request access and revoke their own grants.
    pub requesters: Vec<Principal>,
    /// May read status and the audit log.
    pub viewers: Vec<Principal>,
    /// May approve or deny others' requests for ports with `approvals = 1` (and read
    /// status and the audit log). Not implied by admin; root always may.
    pub approvers: Vec<Principal>,
}

/// Everything wrong with a policy file, each problem on its own line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .problems.iter().map(|p| format!("{}: {p}", .path.display())).collect::<Vec<_>>().join("\n"))]
pub struct ConfigError {
    /// The policy file.
    pub path: PathBuf,
    /// One message per problem, `field: what is wrong, got VALUE`.
    pub problems: Vec<String>,
}

impl ConfigError {
    fn one(path: &Path, problem: String) -> ConfigError {
        ConfigError {
            path: path.to_path_buf(),
            problems: vec![problem],
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    socket: Option<PathBuf>,
    socket_group: Option<String>,
    state_dir: Option<PathBuf>,
    on_stop: Option<String>,
    audit_max_bytes: Option<i64>,
    audit_keep: Option<i64>,
    audit_retain: Option<String>,
    metrics_listen: Option<String>,
    #[serde(default)]
    metrics_allow_remote: bool,
    #[serde(default)]
    ports: Option<Vec<RawPort>>,
    #[serde(default)]
    lockdown: RawLockdown,
    #[serde(default)]
    access: RawAccess,
    #[serde(default)]
    limits: RawLimits,
    remote: Option<crate::remote::settings::RawRemote>,
    fleet: Option<crate::fleet::settings::RawFleet>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPort {
    port: i64,
    protocol: Option<String>,
    allowed_sources: Option<Vec<String>>,
    max_duration: Option<String>,
    widest_prefix: Option<RawWidestPrefix>,
    approvals: Option<i64>,
    approval_timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWidestPrefix {
    ipv4: Option<i64>,
    ipv6: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLockdown {
    #[serde(default)]
    exempt_sources: Vec<String>,
    #[serde(default)]
    interfaces: Vec<String>,
    #[serde(default)]
    exempt_everything: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAccess {
    #[serde(default)]
    admins: Vec<String>,
    #[serde(default)]
    requesters: Vec<String>,
    #[serde(default)]
    viewers: Vec<String>,
    #[serde(default)]
    approvers: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_connections_per_user: Option<i64>,
    max_requests_per_connection: Option<i64>,
    connection_lifetime: Option<String>,
}

/// `[limits]`: each key checked against its range; a missing key keeps the default.
fn validate_limits(raw: RawLimits, problems: &mut Vec<String>) -> Limits {
    let defaults = Limits::default();
    let mut number = |field: &str, value: Option<i64>, most: i64, default: u64| match value {
        None => default,
        Some(n) if (1..=most).contains(&n) => n as u64,
        Some(n) => {
            problems.push(format!("limits.{field}: must be between 1 and {most}, got {n}"));
            default
        }
    };
    let per_user = number(
        "max_connections_per_user",
        raw.max_connections_per_user,
        GENERAL_CONNECTIONS as i64,
        defaults.per_user as u64,
    ) as usize;
    let max_requests = number(
        "max_requests_per_connection",
        raw.max_requests_per_connection,
        u32::MAX as i64,
        defaults.max_requests.into(),
    ) as u32;
    let lifetime = match raw.connection_lifetime {
        None => defaults.lifetime,
        Some(text) => match crate::duration::parse(&text) {
            Ok(d) if (Duration::from_secs(1)..=MAX_DURATION_LIMIT).contains(&d) => d,
            Ok(_) => {
                problems.push(format!(
                    "limits.connection_lifetime: must be between 1s and 24h, got {text:?}"
                ));
                defaults.lifetime
            }
            Err(e) => {
                problems.push(format!("limits.connection_lifetime: {e}, got {text:?}"));
                defaults.lifetime
            }
        },
    };
    Limits {
        per_user,
        max_requests,
        lifetime,
    }
}

/// Looks up a group id by name; injected so validation can be tested without `/etc/group`.
pub type GroupLookup<'a> = &'a dyn Fn(&str) -> Option<u32>;

/// Resolves a group name with the system's group database.
pub fn system_group_lookup(name: &str) -> Option<u32> {
    nix::unistd::Group::from_name(name)
        .ok()
        .flatten()
        .map(|g| g.gid.as_raw())
}

impl Config {
    /// Reads and validates the policy at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::one(path, format!("cannot read the policy file: {e}")))?;
        Config::parse(path, &text, &system_group_lookup)
    }

    /// Validates policy text; `path` is only used in messages.
    pub fn parse(path: &Path, text: &str, groups: GroupLookup) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| toml_error(path, text, &e))?;
        let mut problems = Vec::new();
        let config = validate(path, raw, groups, &mut problems);
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError {
                path: path.to_path_buf(),
                problems,
            })
        }
    }

    /// What is valid but dangerous in this policy, one sentence each: `allowed_sources`
    /// or `exempt_sources` prefixes that cover most of the Internet (shorter than /8 for
    /// IPv4, /32 for IPv6), and exemptions that switch the lockdown off for a family.
    /// (`allowed_sources = ["any"]` is not among them: `widest_prefix` bounds each request.)
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        for (i, port) in self.ports.iter().enumerate() {
            if let AllowedSources::Prefixes(list) = &port.allowed_sources {
                for p in list.iter().filter(|p| is_wide(p)) {
                    warnings.push(format!(
                        "ports[{i}].allowed_sources: {p} covers {} (shorter than /{}); each request is still limited to /{} (widest_prefix)",
                        share(p),
                        wide_limit(p),
                        port.widest_prefix.for_source(p)
                    ));
                }
            }
        }
        let exempt = &self.lockdown.exempt_sources;
        for family in families_covered(exempt) {
            warnings.push(format!(
                "lockdown.exempt_sources: exempts every {family} source, so the lockdown is OFF for {family} (lockdown.exempt_everything = true)"
            ));
        }
        for p in exempt.iter().filter(|p| is_wide(p) && p.prefix_len() > 0) {
            warnings.push(format!(
                "lockdown.exempt_sources: {p} exempts {} from the lockdown (shorter than /{})",
                share(p),
                wide_limit(p)
            ));
        }
        warnings
    }

    /// The policy entries for `port`, in file order (one per protocol entry).
    pub fn port_policies(&self, port: u16) -> impl Iterator<Item = &PortPolicy> {
        self.ports.iter().filter(move |p| p.port == port)
    }
}

fn toml_error(path: &Path, text: &str, error: &toml::de::Error) -> ConfigError {
    let message = error.message().to_string();
    let location = error
        .span()
        .map(|span| {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            format!("line {line}: ")
        })
        .unwrap_or_default();
    ConfigError::one(path, format!("{location}{message}"))
}

fn validate(path: &Path, raw: RawConfig, groups: GroupLookup, problems: &mut Vec<String>) -> Config {
    let socket_group = raw.socket_group.and_then(|name| match groups(&name) {
        Some(gid) => Some(SocketGroup { name, gid }),
        None => {
            problems.push(format!("socket_group: no such group on this host, got {name:?}"));
            None
        }
    });
    let on_stop = validate_on_stop(raw.on_stop.as_deref(), problems);
    let socket = raw.socket.unwrap_or_else(|| DEFAULT_SOCKET_PATH.into());
    if !socket.is_absolute() {
        problems.push(format!(
            "socket: must be an absolute path, got {:?}",
            socket.display().to_string()
        ));
    }
    let state_dir = raw.state_dir.unwrap_or_else(|| DEFAULT_STATE_DIR.into());
    if !state_dir.is_absolute() {
        problems.push(format!(
            "state_dir: must be an absolute path, got {:?}",
            state_dir.display().to_string()
        ));
    }
    let ports = match raw.ports {
        None => default_ports(),
        Some(list) if list.is_empty() => {
            problems.push(
                "ports: lists no port; remove the key for the defaults (22, 3389, 5985, 5986) or add [[ports]] entries"
                    .into(),
            );
            Vec::new()
        }
        Some(list) => validate_ports(list, problems),
    };
    let lockdown = Lockdown {
        exempt_sources: validate_exempt(&raw.lockdown, problems),
        interfaces: validate_interfaces(raw.lockdown.interfaces, problems),
    };
    let access = Access {
        admins: parse_principals("access.admins", &raw.access.admins, problems),
        requesters: parse_principals("access.requesters", &raw.access.requesters, problems),
        viewers: parse_principals("access.viewers", &raw.access.viewers, problems),
        approvers: parse_principals("access.approvers", &raw.access.approvers, problems),
    };
    let audit_rotation = validate_rotation(raw.audit_max_bytes, raw.audit_keep, problems);
    let audit_retain = validate_retain(raw.audit_retain.as_deref(), problems);
    let metrics_listen = validate_metrics(raw.metrics_listen, raw.metrics_allow_remote, problems);
    Config {
        path: path.to_path_buf(),
        socket,
        socket_group,
        state_dir,
        on_stop,
        ports,
        lockdown,
        access,
        audit_rotation,
        audit_retain,
        metrics_listen,
        limits: validate_limits(raw.limits, problems),
        fleet: None,
        remote: raw.remote.and_then(|r| crate::remote::settings::validate(r, problems)),
    }
    .with_fleet(raw.fleet, problems)
}

impl Config {
    /// Adds `[fleet]`, validated against the `[remote]` already read (its signers).
    fn with_fleet(mut self, raw: Option<crate::fleet::settings::RawFleet>, problems: &mut Vec<String>) -> Config {
        self.fleet = raw.and_then(|f| crate::fleet::settings::validate(f, self.remote.as_ref(), problems));
        self
    }
}

fn validate_on_stop(raw: Option<&str>, problems: &mut Vec<String>) -> OnStop {
    match raw {
        None | Some("keep-locked") => OnStop::KeepLocked,
        Some("unlock") => OnStop::Unlock,
        Some(other) => {
            problems.push(format!("on_stop: must be \"keep-locked\" or \"unlock\", got {other:?}"));
            OnStop::KeepLocked
        }
    }
}

fn validate_rotation(max_bytes: Option<i64>, keep: Option<i64>, problems: &mut Vec<String>) -> Rotation {
    let defaults = Rotation::default();
    Rotation {
        max_bytes: match max_bytes {
            None => defaults.max_bytes,
            Some(n) if (MIN_AUDIT_BYTES..=i64::MAX).contains(&n) => n as u64,
            Some(n) => {
                problems.push(format!(
                    "audit_max_bytes: must be at least {MIN_AUDIT_BYTES} (bytes), got {n}"
                ));
                defaults.max_bytes
            }
        },
        keep: match keep {
            None => defaults.keep,
            Some(n) if (1..=1000).contains(&n) => n as usize,
            Some(n) => {
                problems.push(format!(
                    "audit_keep: must be between 1 and 1000 (rotated files kept), got {n}"
                ));
                defaults.keep
            }
        },
    }
}

/// The longest `audit_retain`: a year.
const MAX_AUDIT_RETAIN: Duration = Duration::from_secs(366 * 24 * 3600);

fn validate_retain(raw: Option<&str>, problems: &mut Vec<String>) -> Option<Duration> {
    let text = raw?;
    match crate::duration::parse(text) {
        Ok(d) if !d.is_zero() && d <= MAX_AUDIT_RETAIN => Some(d),
        Ok(_) => {
            problems.push(format!(
                "audit_retain: must be between 1s and 366 days (how long rotation keeps every record), got {text:?}"
            ));
            None
        }
        Err(e) => {
            problems.push(format!("audit_retain: {e}, got {text:?}"));
            None
        }
    }
}

fn validate_metrics(
    listen: Option<String>,
    allow_remote: bool,
    problems: &mut Vec<String>,
) -> Option<std::net::SocketAddr> {
    listen.and_then(|text| match text.parse::<std::net::SocketAddr>() {
        Ok(addr) if addr.ip().is_loopback() || allow_remote => Some(addr),
        Ok(_) => {
            problems.push(format!("metrics_listen: a non-loopback address shows jitd's metrics to the network; set metrics_allow_remote = true to mean it, got {text:?}"));
            None
        }
        Err(_) => {
            problems.push(format!("metrics_listen: must be an address and port such as \"127.0.0.1:9839\", got {text:?}"));
            None
        }
    })
}

fn default_ports() -> Vec<PortPolicy> {
    DEFAULT_PORTS
        .iter()
        .map(|&port| PortPolicy {
            port,
            protocol: Protocol::Tcp,
            allowed_sources: AllowedSources::Any,
            max_duration: DEFAULT_MAX_DURATION,
            widest_prefix: WidestPrefix::default(),
            approvals: 0,
            approval_timeout: DEFAULT_APPROVAL_TIMEOUT,
        })
        .collect()
}

fn validate_ports(list: Vec<RawPort>, problems: &mut Vec<String>) -> Vec<PortPolicy> {
    let mut ports: Vec<PortPolicy> = Vec::new();
    for (i, raw) in list.into_iter().enumerate() {
        let field = |name: &str| format!("ports[{i}].{name}");
        let before = problems.len();
        let port = match u16::try_from(raw.port) {
            Ok(p) if p != 0 => p,
            _ => {
                problems.push(format!(
                    "{}: must be between 1 and 65535, got {}",
                    field("port"),
                    raw.port
                ));
                0
            }
        };
        let protocol = match raw.protocol.as_deref() {
            None => Protocol::Tcp,
            Some(text) => Protocol::parse(text).unwrap_or_else(|| {
                problems.push(format!(
                    "{}: must be \"tcp\", \"udp\" or \"any\", got {text:?}",
                    field("protocol")
                ));
                Protocol::Tcp
            }),
        };
        let allowed_sources = validate_allowed_sources(&field("allowed_sources"), raw.allowed_sources, problems);
        let max_duration = validate_max_duration(&field("max_duration"), raw.max_duration.as_deref(), problems);
        let widest_prefix = validate_widest_prefix(&field("widest_prefix"), raw.widest_prefix, problems);
        let (approvals, approval_timeout) =
            validate_approvals(&field(""), raw.approvals, raw.approval_timeout.as_deref(), problems);
        if problems.len() > before {
            continue;
        }
        if let Some(j) = ports
            .iter()
            .position(|p| p.port == port && p.protocol.overlaps(protocol))
        {
            problems.push(format!(
                "{}: port {port}/{protocol} is already protected by an earlier entry ({}/{}); each port and protocol may appear once",
                field("port"),
                ports[j].port,
                ports[j].protocol
            ));
            continue;
        }
        ports.push(PortPolicy {
            port,
            protocol,
            allowed_sources,
            max_duration,
            widest_prefix,
            approvals,
            approval_timeout,
        });
    }
    ports
}

/// `ports[i].approvals` (0 or 1) and `ports[i].approval_timeout` (1s to 24h, only with
/// `approvals = 1`); `prefix` is `ports[i].`.
fn validate_approvals(
    prefix: &str,
    approvals: Option<i64>,
    timeout: Option<&str>,
    problems: &mut Vec<String>,
) -> (u8, Duration) {
    let approvals = match approvals {
        None | Some(0) => 0,
        Some(1) => 1,
        Some(n) => {
            problems.push(format!(
                "{prefix}approvals: must be 0 (no approval) or 1 (one approver besides the requester); more approvers are not supported, got {n}"
            ));
            0
        }
    };
    let field = format!("{prefix}approval_timeout");
    let timeout = match timeout {
        None => DEFAULT_APPROVAL_TIMEOUT,
        Some(text) => match crate::duration::parse(text) {
            Ok(_) if approvals == 0 => {
                problems.push(format!(
                    "{field}: set, but approvals is 0, so no request for this port waits for an approval; set approvals = 1 or remove it, got {text:?}"
                ));
                DEFAULT_APPROVAL_TIMEOUT
            }
            Ok(d) if (Duration::from_secs(1)..=MAX_DURATION_LIMIT).contains(&d) => d,
            Ok(_) => {
                problems.push(format!("{field}: must be between 1s and 24h, got {text:?}"));
                DEFAULT_APPROVAL_TIMEOUT
            }
            Err(e) => {
                problems.push(format!("{field}: {e}, got {text:?}"));
                DEFAULT_APPROVAL_TIMEOUT
            }
        },
    };
    (approvals, timeout)
}

/// `ports[i].allowed_sources`: `["any"]` alone, or a non-empty list of prefixes.
fn validate_allowed_sources(field: &str, raw: Option<Vec<String>>, problems: &mut Vec<String>) -> AllowedSources {
    match raw {
        None => AllowedSources::Any,
        Some(list) if list.iter().any(|s| s == "any") => {
            if list.len() > 1 {
                problems.push(format!(
                    "{}: \"any\" already allows every source; list it alone, got {list:?}",
                    field
                ));
            }
            AllowedSources::Any
        }
        Some(list) if list.is_empty() => {
            problems.push(format!(
                "{}: is empty, so nobody could ever be granted this port; write [\"any\"] or list prefixes",
                field
            ));
            AllowedSources::Prefixes(Vec::new())
        }
        Some(list) => AllowedSources::Prefixes(parse_prefixes(field, &list, problems)),
    }
}

/// `ports[i].max_duration`: between 1s and 24h; absent: the default.
fn validate_max_duration(field: &str, raw: Option<&str>, problems: &mut Vec<String>) -> Duration {
    match raw {
        None => DEFAULT_MAX_DURATION,
        Some(text) => match crate::duration::parse(text) {
            Ok(d) if d.as_secs() == 0 => {
                problems.push(format!("{field}: must be at least 1s, got {text:?}"));
                d
            }
            Ok(d) if d > MAX_DURATION_LIMIT => {
                problems.push(format!("{field}: must be at most 24h, got {text:?}"));
                d
            }
            Ok(d) => d,
            Err(e) => {
                problems.push(format!("{field}: {e}, got {text:?}"));
                DEFAULT_MAX_DURATION
            }
        },
    }
}

fn validate_widest_prefix(field: &str, raw: Option<RawWidestPrefix>, problems: &mut Vec<String>) -> WidestPrefix {
    let defaults = WidestPrefix::default();
    let Some(raw) = raw else { return defaults };
    let mut length = |family: &str, value: Option<i64>, default: u8, max: u8| match value {
        None => default,
        Some(n) if (1..=i64::from(max)).contains(&n) => n as u8,
        Some(n) => {
            problems.push(format!(
                "{field}.{family}: must be a prefix length between 1 and {max} (0 would allow the whole Internet), got {n}"
            ));
            default
        }
    };
    WidestPrefix {
        ipv4: length("ipv4", raw.ipv4, defaults.ipv4, 32),
        ipv6: length("ipv6", raw.ipv6, defaults.ipv6, 128),
    }
}

/// `exempt_sources`, with `"any"` meaning both whole address families; covering a whole
/// family switches the lockdown off for it, so that needs `exempt_everything = true`.
fn validate_exempt(raw: &RawLockdown, problems: &mut Vec<String>) -> Vec<IpNet> {
    const FIELD: &str = "lockdown.exempt_sources";
    let mut exempt = Vec::new();
    for (i, text) in raw.exempt_sources.iter().enumerate() {
        if text == "any" {
            exempt.extend(["0.0.0.0/0", "::/0"].map(|p| p.parse::<IpNet>().expect("valid prefix")));
            continue;
        }
        match parse_prefix(text) {
            Ok(p) => exempt.push(p),
            Err(e) => problems.push(format!("{FIELD}[{i}]: {e}, got {text:?}")),
        }
    }
    let everything = families_covered(&exempt);
    if !everything.is_empty() && !raw.exempt_everything {
        problems.push(format!(
            "{FIELD}: exempts every {} source, which switches the lockdown off for {}; set lockdown.exempt_everything = true to mean it, got {:?}",
            everything.join(" and "),
            if everything.len() == 1 { "it" } else { "both" },
            raw.exempt_sources
        ));
    } else if everything.is_empty() && raw.exempt_everything {
        problems.push(
            "lockdown.exempt_everything: is true but exempt_sources does not cover a whole address family; remove it"
                .into(),
        );
    }
    exempt
}

/// The address families ("IPv4", "IPv6") that `prefixes` cover whole, together.
pub fn families_covered(prefixes: &[IpNet]) -> Vec<&'static str> {
    let merged = IpNet::aggregate(&prefixes.to_vec());
    let mut families = Vec::new();
    if merged.iter().any(|p| matches!(p, IpNet::V4(n) if n.prefix_len() == 0)) {
        families.push("IPv4");
    }
    if merged.iter().any(|p| matches!(p, IpNet::V6(n) if n.prefix_len() == 0)) {
        families.push("IPv6");
    }
    families
}

fn validate_interfaces(names: Vec<String>, problems: &mut Vec<String>) -> Vec<String> {
    let mut seen = HashSet::new();
    for (i, name) in names.iter().enumerate() {
        // IFNAMSIZ is 16 including the terminating NUL.
        let valid = !name.is_empty()
            && name.len() < 16
            && !name.contains(['/', ' ', '"', '\\', '*'])
            && name != "."
            && name != "..";
        if !valid {
            problems.push(format!(
                "lockdown.interfaces[{i}]: not a valid interface name, got {name:?}"
            ));
        } else if !seen.insert(name.as_str()) {
            problems.push(format!("lockdown.interfaces[{i}]: listed twice, got {name:?}"));
        }
    }
    names
}

fn parse_principals(field: &str, list: &[String], problems: &mut Vec<String>) -> Vec<Principal> {
    list.iter()
        .enumerate()
        .filter_map(|(i, text)| match Principal::parse(text) {
            Ok(p) => Some(p),
            Err(e) => {
                problems.push(format!("{field}[{i}]: {e}, got {text:?}"));
                None
            }
        })
        .collect()
}

fn parse_prefixes(field: &str, list: &[String], problems: &mut Vec<String>) -> Vec<IpNet> {
    list.iter()
        .enumerate()
        .filter_map(|(i, text)| match parse_prefix(text) {
            Ok(p) => Some(p),
            Err(e) => {
                problems.push(format!("{field}[{i}]: {e}, got {text:?}"));
                None
            }
        })
        .collect()
}

fn wide_limit(prefix: &IpNet) -> u8 {
    match prefix {
        IpNet::V4(_) => WIDE_IPV4_PREFIX,
        IpNet::V6(_) => WIDE_IPV6_PREFIX,
    }
}

/// Whether `prefix` is shorter than /8 (IPv4) or /32 (IPv6): most of the Internet.
pub fn is_wide(prefix: &IpNet) -> bool {
    prefix.prefix_len() < wide_limit(prefix)
}

/// How much of its address family `prefix` covers, in words ("all of the IPv4 Internet").
fn share(prefix: &IpNet) -> String {
    let family = match prefix {
        IpNet::V4(_) => "IPv4",
        IpNet::V6(_) => "IPv6",
    };
    match prefix.prefix_len() {
        0 => format!("all of the {family} Internet"),
        n if n < 64 => format!("1/{} of the {family} Internet", 1u64 << n),
        n => format!("1/2^{n} of the {family} Internet"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn groups(name: &str) -> Option<u32> {
        (name == "jit").then_some(990)
    }

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/jitd/jitd.toml"), text, &groups)
    }

    fn first_problem(text: &str) -> String {
        parse(text).unwrap_err().to_string().lines().next().unwrap().to_string()
    }

    #[test]
    fn empty_policy_protects_the_default_ports() {
        let c = parse("").unwrap();
        let ports: Vec<u16> = c.ports.iter().map(|p| p.port).collect();
        assert_eq!(ports, vec![22, 3389, 5985, 5986]);
        assert!(c.ports.iter().all(|p| p.protocol == Protocol::Tcp
            && p.allowed_sources == AllowedSources::Any
            && p.max_duration == Duration::from_secs(3 * 3600)));
        assert_eq!(c.socket, PathBuf::from("/run/jitd/jitd.sock"));
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/jitd"));
        assert_eq!(c.on_stop, OnStop::KeepLocked);
        assert_eq!(c.socket_group, None);
    }

    #[test]
    fn full_policy_parses() {
        let c = parse(
            r#"
            socket = "/run/x.sock"
            socket_group = "jit"
            state_dir = "/tmp/j"
            on_stop = "unlock"
            [[ports]]
            port = 22
            allowed_sources = ["203.0.113.0/24", "2001:db8::/32", "198.51.100.7"]
            max_duration = "PT1H30M"
            [[ports]]
            port = 3389
            protocol = "any"
            [lockdown]
            exempt_sources = ["10.0.0.0/8"]
            interfaces = ["eth0"]
            [access]
            admins = ["user:alice"]
            requesters = ["group:ops", "uid:1001"]
            "#,
        )
        .unwrap();
        assert_eq!(
            c.socket_group,
            Some(SocketGroup {
                name: "jit".into(),
                gid: 990
            })
        );
        assert_eq!(c.on_stop, OnStop::Unlock);
        assert_eq!(c.ports[0].max_duration, Duration::from_secs(5400));
        assert_eq!(c.ports[1].protocol, Protocol::Any);
        assert_eq!(c.access.requesters[1], Principal::Uid(1001));
        let AllowedSources::Prefixes(list) = &c.ports[0].allowed_sources else {
            panic!()
        };
        assert_eq!(format_prefix(&list[2]), "198.51.100.7");
    }

    #[test]
    fn each_bad_value_is_named_with_field_and_value() {
        let cases = [
            ("bogus = 1", "unknown field `bogus`"),
            (
                "[[ports]]\nport = 70000",
                "ports[0].port: must be between 1 and 65535, got 70000",
            ),
            (
                "[[ports]]\nport = 0",
                "ports[0].port: must be between 1 and 65535, got 0",
            ),
            (
                "[[ports]]\nport = 22\n[[ports]]\nport = 22",
                "ports[1].port: port 22/tcp is already protected",
            ),
            (
                "[[ports]]\nport = 22\nprotocol = \"any\"\n[[ports]]\nport = 22\nprotocol = \"udp\"",
                "ports[1].port: port 22/udp is already protected",
            ),
            (
                "[[ports]]\nport = 22\nprotocol = \"sctp\"",
                "ports[0].protocol: must be \"tcp\", \"udp\" or \"any\", got \"sctp\"",
            ),
            (
                "[[ports]]\nport = 22\nallowed_sources = [\"10.0.0.300/8\"]",
                "ports[0].allowed_sources[0]: not an IP address",
            ),
            (
                "[[ports]]\nport = 22\nallowed_sources = [\"10.0.0.1/8\"]",
                "has host bits set; did you mean 10.0.0.0/8?",
            ),
            (
                "[[ports]]\nport = 22\nmax_duration = \"0s\"",
                "ports[0].max_duration: must be at least 1s, got \"0s\"",
            ),
            (
                "[[ports]]\nport = 22\nmax_duration = \"48h\"",
                "ports[0].max_duration: must be at most 24h, got \"48h\"",
            ),
            (
                "[[ports]]\nport = 22\nmax_duration = \"soon\"",
                "ports[0].max_duration: not a duration",
            ),
            (
                "socket_group = \"nosuchgroup\"",
                "socket_group: no such group on this host, got \"nosuchgroup\"",
            ),
            (
                "on_stop = \"open\"",
                "on_stop: must be \"keep-locked\" or \"unlock\", got \"open\"",
            ),
            (
                "[lockdown]\nexempt_sources = [\"bastion\"]",
                "lockdown.exempt_sources[0]: not an IP address",
            ),
            (
                "[lockdown]\ninterfaces = [\"a/b\"]",
                "lockdown.interfaces[0]: not a valid interface name",
            ),
            (
                "[access]\nadmins = [\"alice\"]",
                "access.admins[0]: must be \"user:NAME\"",
            ),
            (
                "[access]\nviewers = [\"uid:x\"]",
                "access.viewers[0]: uid must be a number, got \"uid:x\"",
            ),
            ("ports = []", "ports: lists no port"),
            (
                "audit_max_bytes = 10",
                "audit_max_bytes: must be at least 4096 (bytes), got 10",
            ),
            (
                "audit_keep = 0",
                "audit_keep: must be between 1 and 1000 (rotated files kept), got 0",
            ),
            (
                "audit_retain = \"400d\"",
                "audit_retain: must be between 1s and 366 days",
            ),
            (
                "metrics_listen = \"0.0.0.0:9839\"",
                "metrics_listen: a non-loopback address shows jitd's metrics to the network",
            ),
            (
                "metrics_listen = \"localhost\"",
                "metrics_listen: must be an address and port",
            ),
            (
                "[[ports]]\nport = 22\nwidest_prefix = { ipv4 = 0 }",
                "ports[0].widest_prefix.ipv4: must be a prefix length between 1 and 32 (0 would allow the whole Internet), got 0",
            ),
            (
                "[[ports]]\nport = 22\nwidest_prefix = { ipv6 = 129 }",
                "ports[0].widest_prefix.ipv6: must be a prefix length between 1 and 128",
            ),
            (
                "[[ports]]\nport = 22\nwidest_prefix = { ipv5 = 8 }",
                "unknown field `ipv5`",
            ),
            (
                "[lockdown]\nexempt_sources = [\"0.0.0.0/0\"]",
                "lockdown.exempt_sources: exempts every IPv4 source, which switches the lockdown off for it; set lockdown.exempt_everything = true to mean it",
            ),
            (
                "[lockdown]\nexempt_sources = [\"any\"]",
                "lockdown.exempt_sources: exempts every IPv4 and IPv6 source, which switches the lockdown off for both",
            ),
            (
                "[lockdown]\nexempt_sources = [\"0.0.0.0/1\", \"128.0.0.0/1\"]",
                "lockdown.exempt_sources: exempts every IPv4 source",
            ),
            (
                "[[ports]]\nport = 22\napprovals = 2",
                "ports[0].approvals: must be 0 (no approval) or 1 (one approver besides the requester); more approvers are not supported, got 2",
            ),
            (
                "[[ports]]\nport = 22\napprovals = -1",
                "ports[0].approvals: must be 0 (no approval) or 1",
            ),
            (
                "[[ports]]\nport = 22\napproval_timeout = \"5m\"",
                "ports[0].approval_timeout: set, but approvals is 0",
            ),
            (
                "[[ports]]\nport = 22\napprovals = 1\napproval_timeout = \"0s\"",
                "ports[0].approval_timeout: must be between 1s and 24h, got \"0s\"",
            ),
            (
                "[[ports]]\nport = 22\napprovals = 1\napproval_timeout = \"later\"",
                "ports[0].approval_timeout: not a duration",
            ),
            (
                "[access]\napprovers = [\"bob\"]",
                "access.approvers[0]: must be \"user:NAME\"",
            ),
            (
                "[lockdown]\nexempt_sources = [\"10.0.0.0/8\"]\nexempt_everything = true",
                "lockdown.exempt_everything: is true but exempt_sources does not cover a whole address family",
            ),
        ];
        for (text, expected) in cases {
            let message = first_problem(text);
            assert!(message.starts_with("/etc/jitd/jitd.toml: "), "{message}");
            assert!(
                message.contains(expected),
                "{text:?}\n  gave {message}\n  wanted {expected}"
            );
        }
    }

    #[test]
    fn limits_parse_and_bad_ones_are_named() {
        let c = parse(
            "[limits]\nmax_connections_per_user = 8\nmax_requests_per_connection = 50\nconnection_lifetime = \"2m\"",
        )
        .unwrap();
        assert_eq!(
            c.limits,
            Limits {
                per_user: 8,
                max_requests: 50,
                lifetime: Duration::from_secs(120)
            }
        );
        assert_eq!(parse("").unwrap().limits, Limits::default());
        let cases = [
            (
                "max_connections_per_user = 0",
                "limits.max_connections_per_user: must be between 1 and 448, got 0",
            ),
            (
                "max_connections_per_user = 449",
                "limits.max_connections_per_user: must be between 1 and 448, got 449",
            ),
            (
                "max_requests_per_connection = -1",
                "limits.max_requests_per_connection: must be between 1 and 4294967295, got -1",
            ),
            (
                "connection_lifetime = \"0s\"",
                "limits.connection_lifetime: must be between 1s and 24h, got \"0s\"",
            ),
            (
                "connection_lifetime = \"soon\"",
                "limits.connection_lifetime: not a duration",
            ),
            ("max_connections = 10", "unknown field `max_connections`"),
        ];
        for (text, expected) in cases {
            let message = first_problem(&format!("[limits]\n{text}"));
            assert!(
                message.contains(expected),
                "{text:?}\n  gave {message}\n  wanted {expected}"
            );
        }
    }

    #[test]
    fn the_shipped_example_parses() {
        let c = parse(include_str!("../config/jitd.toml")).unwrap();
        assert_eq!(c.ports.len(), 2);
        assert_eq!(c.ports[1].protocol, Protocol::Any);
        assert_eq!(c.ports[1].max_duration, Duration::from_secs(3600));
    }

    #[test]
    fn widest_prefix_defaults_to_16_and_32_and_reads_per_family() {
        let c = parse("[[ports]]\nport = 22\n[[ports]]\nport = 23\nwidest_prefix = { ipv4 = 24 }\n").unwrap();
        assert_eq!(c.ports[0].widest_prefix, WidestPrefix { ipv4: 16, ipv6: 32 });
        assert_eq!(c.ports[1].widest_prefix, WidestPrefix { ipv4: 24, ipv6: 32 });
        assert!(parse("")
            .unwrap()
            .ports
            .iter()
            .all(|p| p.widest_prefix == WidestPrefix::default()));
    }

    #[test]
    fn exempting_everything_needs_the_explicit_opt_in_and_is_warned_about() {
        let c = parse("[lockdown]\nexempt_sources = [\"any\"]\nexempt_everything = true\n").unwrap();
        assert_eq!(c.lockdown.exempt_sources.len(), 2);
        let warnings = c.warnings();
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings[0].contains("lockdown is OFF for IPv4"), "{warnings:?}");
        assert!(warnings[1].contains("lockdown is OFF for IPv6"), "{warnings:?}");
    }

    #[test]
    fn wide_allowed_and_exempt_sources_are_warned_about() {
        let c = parse(
            r#"
            [[ports]]
            port = 22
            allowed_sources = ["0.0.0.0/0", "2001::/16", "10.0.0.0/8", "2001:db8::/32"]
            [[ports]]
            port = 23
            [lockdown]
            exempt_sources = ["10.0.0.0/7", "192.0.2.0/24", "fc00::/7"]
            "#,
        )
        .unwrap();
        assert_eq!(
            c.warnings(),
            vec![
                "ports[0].allowed_sources: 0.0.0.0/0 covers all of the IPv4 Internet (shorter than /8); each request is still limited to /16 (widest_prefix)",
                "ports[0].allowed_sources: 2001::/16 covers 1/65536 of the IPv6 Internet (shorter than /32); each request is still limited to /32 (widest_prefix)",
                "lockdown.exempt_sources: 10.0.0.0/7 exempts 1/128 of the IPv4 Internet from the lockdown (shorter than /8)",
                "lockdown.exempt_sources: fc00::/7 exempts 1/128 of the IPv6 Internet from the lockdown (shorter than /32)",
            ]
        );
        assert!(
            parse("").unwrap().warnings().is_empty(),
            "\"any\" is bounded by widest_prefix"
        );
        assert!(parse(include_str!("../config/jitd.toml"))
            .unwrap()
            .warnings()
            .is_empty());
    }

    #[test]
    fn approvals_default_to_none_and_their_timeout_to_15_minutes() {
        let c = parse(
            "[[ports]]\nport = 22\napprovals = 1\n[[ports]]\nport = 23\napprovals = 1\napproval_timeout = \"2m\"\n[[ports]]\nport = 24\n[access]\napprovers = [\"group:jit\", \"principal:alice\"]\n",
        )
        .unwrap();
        let got: Vec<(u8, Duration)> = c.ports.iter().map(|p| (p.approvals, p.approval_timeout)).collect();
        assert_eq!(
            got,
            vec![
                (1, DEFAULT_APPROVAL_TIMEOUT),
                (1, Duration::from_secs(120)),
                (0, DEFAULT_APPROVAL_TIMEOUT)
            ]
        );
        assert_eq!(
            c.access.approvers,
            vec![Principal::Group("jit".into()), Principal::Ssh("alice".into())]
        );
        assert!(parse("").unwrap().ports.iter().all(|p| p.approvals == 0));
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let message = first_problem("socket = \"/a\"\n[[ports]\n");
        assert!(message.contains("line 2"), "{message}");
    }

    #[test]
    fn all_problems_are_reported_at_once() {
        let err = parse("on_stop = \"x\"\n[[ports]]\nport = 0\n").unwrap_err();
        assert_eq!(err.problems.len(), 2, "{err}");
    }

    #[test]
    fn allowed_sources_contain_addresses_and_sub_prefixes() {
        let allowed = AllowedSources::Prefixes(vec![parse_prefix("10.0.0.0/8").unwrap()]);
        assert!(allowed.contains(&parse_prefix("10.1.2.3").unwrap()));
        assert!(allowed.contains(&parse_prefix("10.1.0.0/16").unwrap()));
        assert!(!allowed.contains(&parse_prefix("0.0.0.0/0").unwrap()));
        assert!(!allowed.contains(&parse_prefix("2001:db8::1").unwrap()));
        assert!(AllowedSources::Any.contains(&parse_prefix("2001:db8::1").unwrap()));
    }
}
