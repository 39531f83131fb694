//! `~/.config/jitctl/hosts.toml`: defaults per host for `jitctl knock`, read whole
//! and checked whole (an unknown key or a bad value anywhere refuses the file, naming
//! the file, the line or the field). Pure but for [`load`].
//!
//! ```toml
//! [defaults]                      # for every host (optional)
//! key = "~/.ssh/id_ed25519_sk.pub"
//!
//! [hosts."web1.example.org"]
//! knock_port = 62222
//! ports = [22, "500/udp"]
//! duration = "1h"
//! source = "198.51.100.7"         # optional: sign this source instead of the packet's
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::Deserialize;

use super::ports::PortSpec;
use super::target::{host_only, Host};

/// What the file may say about a host (or about every host, under `[defaults]`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostSettings {
    /// The UDP port knocks go to.
    pub knock_port: Option<u16>,
    /// The ports to ask for when `--port` is not given.
    pub ports: Option<Vec<PortSpec>>,
    /// How long to ask for when neither `--duration` nor `--until` is given (seconds).
    pub duration_secs: Option<u64>,
    /// The key to sign with when `--key` is not given (`~/` expanded).
    pub key: Option<PathBuf>,
    /// The source to sign when `--source` is not given.
    pub source: Option<IpNet>,
}

impl HostSettings {
    /// These settings, with what they leave open taken from `under`.
    fn over(self, under: &HostSettings) -> HostSettings {
        HostSettings {
            knock_port: self.knock_port.or(under.knock_port),
            ports: self.ports.or_else(|| under.ports.clone()),
            duration_secs: self.duration_secs.or(under.duration_secs),
            key: self.key.or_else(|| under.key.clone()),
            source: self.source.or(under.source),
        }
    }
}

/// The hosts file, checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostsFile {
    /// Where it was read from (for messages).
    pub path: PathBuf,
    defaults: HostSettings,
    hosts: Vec<(Host, HostSettings)>,
}

impl HostsFile {
    /// The settings for `host`: its own entry over `[defaults]`.
    pub fn settings_for(&self, host: &Host) -> HostSettings {
        self.hosts
            .iter()
            .find(|(h, _)| h == host)
            .map(|(_, s)| s.clone())
            .unwrap_or_default()
            .over(&self.defaults)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    defaults: Option<RawHost>,
    #[serde(default)]
    hosts: BTreeMap<String, RawHost>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHost {
    knock_port: Option<u16>,
    ports: Option<Vec<PortSpec>>,
    duration: Option<String>,
    key: Option<String>,
    source: Option<String>,
}

/// Where the file is: `$XDG_CONFIG_HOME/jitctl/hosts.toml` (when set and absolute, as
/// the XDG spec says), else `$HOME/.config/jitctl/hosts.toml`.
pub fn default_path(xdg_config_home: Option<&Path>, home: Option<&Path>) -> Option<PathBuf> {
    let base = match xdg_config_home.filter(|p| p.is_absolute()) {
        Some(xdg) => xdg.to_path_buf(),
        None => home?.join(".config"),
    };
    Some(base.join("jitctl").join("hosts.toml"))
}

/// Reads the file at `path`; `Ok(None)` when there is none.
pub fn load(path: &Path, home: Option<&Path>) -> Result<Option<HostsFile>, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse(path, &text, home).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: cannot read it: {e}", path.display())),
    }
}

/// Checks the file's text; every problem is reported, each naming the file and the
/// line or the field.
pub fn parse(path: &Path, text: &str, home: Option<&Path>) -> Result<HostsFile, String> {
    let at = path.display();
    let raw: RawFile = toml::from_str(text).map_err(|e| format!("{at}: {}", toml_error(text, &e)))?;
    let mut problems = Vec::new();
    let defaults = raw
        .defaults
        .map(|d| settings(d, "defaults", home, &mut problems))
        .unwrap_or_default();
    let mut hosts: Vec<(Host, HostSettings)> = Vec::new();
    for (key, entry) in raw.hosts {
        let field = format!("hosts.{key:?}");
        let s = settings(entry, &field, home, &mut problems);
        match host_only(&key) {
            Ok(host) if hosts.iter().any(|(h, _)| *h == host) => problems.push(format!(
                "{field}: the same host as another entry ({})",
                host.request_name()
            )),
            Ok(host) => hosts.push((host, s)),
            Err(e) => problems.push(format!("{field}: {e}")),
        }
    }
    if !problems.is_empty() {
        return Err(problems
            .iter()
            .map(|p| format!("{at}: {p}"))
            .collect::<Vec<_>>()
            .join("\n"));
    }
    Ok(HostsFile {
        path: path.to_path_buf(),
        defaults,
        hosts,
    })
}

fn settings(raw: RawHost, field: &str, home: Option<&Path>, problems: &mut Vec<String>) -> HostSettings {
    let mut keep = Problems { field, problems };
    let knock_port = raw.knock_port.and_then(|p| match p {
        0 => keep.refuse("knock_port", "must be a port 1-65535, got 0".into()),
        p => Some(p),
    });
    let ports = raw.ports.and_then(|p| match p.is_empty() {
        true => keep.refuse("ports", "must list at least one port".into()),
        false => Some(p),
    });
    let duration_secs = raw.duration.and_then(|d| match crate::duration::parse(&d) {
        Ok(t) if t.is_zero() => keep.refuse("duration", format!("must be longer than 0, got {d:?}")),
        Ok(t) => Some(t.as_secs() + u64::from(t.subsec_nanos() > 0)),
        Err(e) => keep.refuse("duration", e),
    });
    let key = raw.key.and_then(|k| match expand_home(&k, home) {
        Ok(path) => Some(path),
        Err(e) => keep.refuse("key", e),
    });
    let source = raw.source.and_then(|s| match crate::domain::parse_prefix(&s) {
        Ok(net) => Some(net),
        Err(e) => keep.refuse("source", format!("{s:?}: {e}")),
    });
    HostSettings {
        knock_port,
        ports,
        duration_secs,
        key,
        source,
    }
}

/// Collects the problems of one entry, each naming its field.
struct Problems<'a> {
    field: &'a str,
    problems: &'a mut Vec<String>,
}

impl Problems<'_> {
    fn refuse<T>(&mut self, what: &str, why: String) -> Option<T> {
        self.problems.push(format!("{}.{what}: {why}", self.field));
        None
    }
}

/// `~/x` under `home`; an absolute path as it is; anything else is refused (relative to
/// what? the directory jitctl happens to run in is no answer for a config file).
fn expand_home(path: &str, home: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(rest) = path.strip_prefix("~/") {
        return home
            .map(|h| h.join(rest))
            .ok_or_else(|| format!("{path:?}: HOME is not set, so ~ means nothing"));
    }
    let p = PathBuf::from(path);
    if p.is_absolute() {
        Ok(p)
    } else {
        Err(format!("{path:?}: must be an absolute path or start with ~/"))
    }
}

fn toml_error(text: &str, error: &toml::de::Error) -> String {
    let line = error
        .span()
        .map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1);
    match line {
        Some(n) => format!("line {n}: {}", error.message()),
        None => error.message().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
[defaults]
key = "~/.ssh/id_ed25519_sk.pub"
duration = "30m"

[hosts."web1.example.org"]
knock_port = 62223
ports = [22, "500/udp"]
duration = "1h"
source = "198.51.100.7"

[hosts."[2001:DB8::1]"]
key = "/etc/keys/k.pub"
"#;

    fn parsed(text: &str) -> Result<HostsFile, String> {
        parse(
            Path::new("/home/a/.config/jitctl/hosts.toml"),
            text,
            Some(Path::new("/home/a")),
        )
    }

    fn host(text: &str) -> Host {
        host_only(text).unwrap()
    }

    #[test]
    fn a_host_entry_over_the_defaults() {
        let file = parsed(FILE).unwrap();
        let web1 = file.settings_for(&host("WEB1.example.org"));
        assert_eq!(web1.knock_port, Some(62223));
        assert_eq!(
            web1.ports,
            Some(vec![
                PortSpec { port: 22, udp: false },
                PortSpec { port: 500, udp: true }
            ])
        );
        assert_eq!(web1.duration_secs, Some(3600));
        assert_eq!(web1.source, Some(crate::domain::parse_prefix("198.51.100.7").unwrap()));
        assert_eq!(web1.key, Some(PathBuf::from("/home/a/.ssh/id_ed25519_sk.pub")));
        let v6 = file.settings_for(&host("2001:db8:0::1"));
        assert_eq!(v6.key, Some(PathBuf::from("/etc/keys/k.pub")));
        assert_eq!(v6.duration_secs, Some(1800));
        assert_eq!(v6.ports, None);
        let other = file.settings_for(&host("web2"));
        assert_eq!(other.duration_secs, Some(1800));
        assert_eq!(other.knock_port, None);
        assert_eq!(parsed("").unwrap().settings_for(&host("web1")), HostSettings::default());
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused_naming_the_file_and_where() {
        let cases = [
            ("[hosts.web1]\nport = 22\n", "hosts.toml: line 2: unknown field `port`"),
            ("[host.web1]\nports = [22]\n", "line 1: unknown field `host`"),
            ("[hosts.web1]\nports = [0]\n", "line 2: 0 is not a port"),
            ("[hosts.web1]\nports = [\"22/sctp\"]\n", "line 2:"),
            ("[hosts.web1]\nknock_port = 70000\n", "line 2:"),
            (
                "[hosts.web1]\nknock_port = 0\n",
                "hosts.\"web1\".knock_port: must be a port",
            ),
            (
                "[hosts.web1]\nports = []\n",
                "hosts.\"web1\".ports: must list at least one",
            ),
            ("[hosts.web1]\nduration = \"soon\"\n", "hosts.\"web1\".duration:"),
            (
                "[hosts.web1]\nsource = \"10.0.0.1/8\"\n",
                "hosts.\"web1\".source: \"10.0.0.1/8\": has host bits",
            ),
            (
                "[hosts.web1]\nkey = \"id_rsa\"\n",
                "hosts.\"web1\".key: \"id_rsa\": must be an absolute path",
            ),
            ("[defaults]\nkey = \"k\"\n", "defaults.key:"),
            ("[hosts.\"web 1\"]\n", "hosts.\"web 1\": \"web 1\": not a host name"),
            ("[hosts.\"web1:22\"]\n", "hosts.\"web1:22\":"),
            ("[hosts.web1]\n[hosts.WEB1]\n", "the same host as another entry (web1)"),
        ];
        for (text, expected) in cases {
            let e = parsed(text).unwrap_err();
            assert!(e.starts_with("/home/a/.config/jitctl/hosts.toml: "), "{text:?}: {e}");
            assert!(e.contains(expected), "{text:?}: {e}");
        }
        let both = parsed("[hosts.a]\nknock_port = 0\n[hosts.b]\nduration = \"x\"\n").unwrap_err();
        assert_eq!(both.lines().count(), 2, "{both}");
    }

    #[test]
    fn the_file_is_found_where_xdg_says() {
        let (xdg, home) = (Path::new("/x/conf"), Path::new("/home/a"));
        assert_eq!(
            default_path(Some(xdg), Some(home)),
            Some("/x/conf/jitctl/hosts.toml".into())
        );
        assert_eq!(
            default_path(Some(Path::new("rel")), Some(home)),
            Some("/home/a/.config/jitctl/hosts.toml".into())
        );
        assert_eq!(
            default_path(None, Some(home)),
            Some("/home/a/.config/jitctl/hosts.toml".into())
        );
        assert_eq!(default_path(None, None), None);
    }
}
