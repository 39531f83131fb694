//! `[fleet]` in the policy: which etcd to join, as what host, in which groups, and whose
//! signatures to trust. Off unless the section is there. Validated in one step with the
//! rest of the policy; `allowed_signers` is `[fleet]`'s own or, when absent,
//! `[remote]`'s (read with the same ownership and mode checks).

use std::path::PathBuf;
use std::sync::Arc;

use serde::Deserialize;

use crate::domain::FleetOrigin;
use crate::remote::settings::Remote;
use crate::remote::signers::Signer;

/// The key prefix unless configured.
pub const DEFAULT_PREFIX: &str = "/jitd/";
/// The longest host or group name.
const MAX_NAME: usize = 63;

/// `[fleet]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFleet {
    #[serde(default)]
    endpoints: Vec<String>,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    name: Option<String>,
    #[serde(default)]
    groups: Vec<String>,
    prefix: Option<String>,
    id: Option<String>,
    allowed_signers: Option<PathBuf>,
}

/// etcd's TLS client credentials (PEM files, read at each connection).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tls {
    /// The CA that signed etcd's server certificate.
    pub ca: PathBuf,
    /// This host's client certificate.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
}

/// `[fleet]` validated, with its `allowed_signers` read.
#[derive(Debug, Clone)]
pub struct Fleet {
    /// etcd's client URLs.
    pub endpoints: Vec<String>,
    /// TLS credentials; `None` only with plain `http://` endpoints (a lab).
    pub tls: Option<Tls>,
    /// This host's name in the fleet (`hosts/<name>`, `status/<id>/<name>`).
    pub name: String,
    /// The groups this host is in (`group:NAME` in a request selects it).
    pub groups: Vec<String>,
    /// Every key jitd reads or writes starts with this (`/jitd/`).
    pub prefix: String,
    /// The fleet's own name, signed into every request and approval: a host obeys only
    /// those signed for its fleet (default: the prefix).
    pub id: String,
    /// The `allowed_signers` file the fleet's signatures are checked against.
    pub allowed_signers: PathBuf,
    /// Its lines.
    pub signers: Arc<Vec<Signer>>,
    /// SHA-256 of the file as read.
    pub signers_digest: [u8; 32],
}

impl PartialEq for Fleet {
    fn eq(&self, other: &Fleet) -> bool {
        self.endpoints == other.endpoints
            && self.tls == other.tls
            && self.name == other.name
            && self.groups == other.groups
            && self.prefix == other.prefix
            && self.id == other.id
            && self.allowed_signers == other.allowed_signers
            && self.signers_digest == other.signers_digest
    }
}

impl Fleet {
    /// Whether `other` is the same membership: the same etcd, credentials, prefix,
    /// fleet id, name and groups (a change of any of them means joining again; a change
    /// of the signers does not).
    pub fn same_membership(&self, other: &Fleet) -> bool {
        self.endpoints == other.endpoints
            && self.tls == other.tls
            && self.name == other.name
            && self.groups == other.groups
            && self.prefix == other.prefix
            && self.id == other.id
    }

    /// Whether the endpoints are plain `http://` (no TLS: anyone on the path can read
    /// and write the fleet's keys; signatures still guard what opens).
    pub fn plaintext(&self) -> bool {
        self.tls.is_none()
    }

    /// Whether a request naming `target` (`NAME` or `group:NAME`) selects this host.
    pub fn selects(&self, target: &str) -> bool {
        match target.strip_prefix("group:") {
            Some(group) => self.groups.iter().any(|g| g == group),
            None => target.eq_ignore_ascii_case(&self.name),
        }
    }
}

/// Whether `name` may name a host or a group: letters, digits, `.`, `-`, `_`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
}

/// Whether `id` may name a fleet: 1-128 letters, digits, `.`, `-`, `_`, `/` (a prefix
/// such as `/jitd/` is one).
pub fn valid_fleet_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '/'))
}

/// Validates `[fleet]` (with `[remote]` for its `allowed_signers`), adding one problem
/// per bad field to `problems`.
pub fn validate(raw: RawFleet, remote: Option<&Remote>, problems: &mut Vec<String>) -> Option<Fleet> {
    let before = problems.len();
    let endpoints = validate_endpoints(&raw.endpoints, problems);
    let tls = validate_tls(&raw, &endpoints, problems);
    let name = validate_host_name(raw.name.as_deref(), problems);
    let groups = validate_groups(&raw.groups, problems);
    let prefix = validate_prefix(raw.prefix.as_deref(), problems);
    let id = raw.id.unwrap_or_else(|| prefix.clone());
    if !valid_fleet_id(&id) {
        problems.push(format!(
            "fleet.id: must be 1-128 letters, digits, '.', '-', '_', '/' (default: the prefix), got {id:?}"
        ));
    }
    let signers = validate_signers(raw.allowed_signers, remote, problems);
    if problems.len() > before {
        return None;
    }
    let (allowed_signers, signers, signers_digest) = signers?;
    Some(Fleet {
        endpoints,
        tls,
        name: name?,
        groups,
        prefix,
        id,
        allowed_signers,
        signers: Arc::new(signers),
        signers_digest,
    })
}

fn validate_endpoints(raw: &[String], problems: &mut Vec<String>) -> Vec<String> {
    if raw.is_empty() {
        problems.push("fleet.endpoints: required: etcd's client URLs, e.g. [\"https://etcd1.example.org:2379\"] (remove [fleet] to stay out of a fleet)".into());
    }
    for (i, url) in raw.iter().enumerate() {
        let rest = url.strip_prefix("https://").or_else(|| url.strip_prefix("http://"));
        let ok = rest.is_some_and(|r| !r.is_empty() && !r.contains(['/', ' ', '@', '?', '#']));
        if !ok {
            problems.push(format!(
                "fleet.endpoints[{i}]: must be https://HOST:PORT (or http:// for a lab), got {url:?}"
            ));
        }
    }
    let plain = raw.iter().filter(|u| u.starts_with("http://")).count();
    if plain != 0 && plain != raw.len() {
        problems.push("fleet.endpoints: mixes http:// and https://; use one scheme".into());
    }
    raw.to_vec()
}

fn validate_tls(raw: &RawFleet, endpoints: &[String], problems: &mut Vec<String>) -> Option<Tls> {
    let plain = endpoints.iter().all(|u| u.starts_with("http://"));
    let files = [("ca", &raw.ca), ("cert", &raw.cert), ("key", &raw.key)];
    if plain && !endpoints.is_empty() {
        if files.iter().any(|(_, f)| f.is_some()) {
            problems.push("fleet.ca/cert/key: given, but the endpoints are plain http://; use https://".into());
        }
        return None;
    }
    for (field, file) in files {
        match file {
            None => problems.push(format!(
                "fleet.{field}: required with https:// endpoints (etcd's CA, this host's client certificate and key, PEM)"
            )),
            Some(p) if !p.is_absolute() => {
                problems.push(format!("fleet.{field}: must be an absolute path, got {:?}", p.display().to_string()))
            }
            Some(p) if std::fs::metadata(p).is_err() => {
                problems.push(format!("fleet.{field}: cannot read {}", p.display()))
            }
            Some(_) => {}
        }
    }
    Some(Tls {
        ca: raw.ca.clone()?,
        cert: raw.cert.clone()?,
        key: raw.key.clone()?,
    })
}

fn validate_host_name(raw: Option<&str>, problems: &mut Vec<String>) -> Option<String> {
    let name = match raw {
        Some(n) => n.to_string(),
        None => {
            let host = nix::unistd::gethostname().ok();
            let host = host.as_ref().and_then(|h| h.to_str()).unwrap_or("");
            // the short name: `web1` of `web1.example.org`
            host.split('.').next().unwrap_or("").to_ascii_lowercase()
        }
    };
    if valid_name(&name) {
        Some(name)
    } else {
        problems.push(format!(
            "fleet.name: must be 1-{MAX_NAME} letters, digits, '.', '-', '_' (default: the hostname), got {name:?}"
        ));
        None
    }
}

fn validate_groups(raw: &[String], problems: &mut Vec<String>) -> Vec<String> {
    let mut groups = Vec::new();
    for (i, g) in raw.iter().enumerate() {
        if !valid_name(g) {
            problems.push(format!(
                "fleet.groups[{i}]: must be 1-{MAX_NAME} letters, digits, '.', '-', '_', got {g:?}"
            ));
        } else if !groups.contains(g) {
            groups.push(g.clone());
        }
    }
    groups
}

fn validate_prefix(raw: Option<&str>, problems: &mut Vec<String>) -> String {
    let Some(p) = raw else { return DEFAULT_PREFIX.into() };
    let ok = p.len() >= 2
        && p.len() <= 128
        && p.starts_with('/')
        && p.ends_with('/')
        && p.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '.' | '-' | '_'));
    if !ok {
        problems.push(format!(
            "fleet.prefix: must start and end with '/' (letters, digits, '.', '-', '_' between), e.g. {DEFAULT_PREFIX:?}, got {p:?}"
        ));
    }
    p.to_string()
}

type ReadSigners = (PathBuf, Vec<Signer>, [u8; 32]);

fn validate_signers(raw: Option<PathBuf>, remote: Option<&Remote>, problems: &mut Vec<String>) -> Option<ReadSigners> {
    match (raw, remote) {
        (Some(path), _) => match crate::remote::settings::read_signers(&path) {
            Ok((signers, digest)) => Some((path, signers, digest)),
            Err(e) => {
                problems.push(format!("fleet.allowed_signers: {e}"));
                None
            }
        },
        (None, Some(r)) => Some((r.allowed_signers.clone(), r.signers.to_vec(), r.signers_digest)),
        (None, None) => {
            problems.push(
                "fleet.allowed_signers: required unless [remote] has one: the keys whose fleet requests this host obeys (OpenSSH's allowed_signers format)".into(),
            );
            None
        }
    }
}

/// Whether a grant from the fleet request `origin` still belongs on this host under
/// `fleet` (the settings now): `Err` says why not (the fleet is off here, or this host
/// is no longer one of the hosts or in one of the groups the request named).
pub fn still_selected(fleet: Option<&Fleet>, origin: &FleetOrigin) -> Result<(), String> {
    let request = &origin.request;
    let Some(fleet) = fleet else {
        return Err(format!(
            "[fleet] is off on this host, so fleet request {request} no longer applies"
        ));
    };
    if origin.hosts.iter().any(|t| fleet.selects(t)) {
        return Ok(());
    }
    Err(format!(
        "this host ({}, groups [{}]) is no longer among the hosts fleet request {request} named ({})",
        fleet.name,
        fleet.groups.join(", "),
        origin.hosts.join(",")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const SIGNERS: &str = include_str!("../../tests/fixtures/knock/allowed_signers");

    fn signers_file() -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), SIGNERS).unwrap();
        std::fs::set_permissions(f.path(), std::fs::Permissions::from_mode(0o644)).unwrap();
        f
    }

    fn check(text: &str) -> (Option<Fleet>, Vec<String>) {
        let mut problems = Vec::new();
        let raw: RawFleet = toml::from_str(text).unwrap();
        (validate(raw, None, &mut problems), problems)
    }

    #[test]
    fn a_full_section_reads_and_selects_by_name_and_group() {
        let f = signers_file();
        let p = f.path().display();
        let text = format!(
            "endpoints = [\"https://10.0.0.1:2379\"]\nca = \"{p}\"\ncert = \"{p}\"\nkey = \"{p}\"\nname = \"web1\"\ngroups = [\"web\", \"prod\"]\nallowed_signers = \"{p}\"\n"
        );
        let (fleet, problems) = check(&text);
        assert!(problems.is_empty(), "{problems:?}");
        let fleet = fleet.unwrap();
        assert_eq!(fleet.prefix, "/jitd/");
        assert_eq!(
            fleet.id, "/jitd/",
            "the fleet is named by its prefix unless given an id"
        );
        assert!(!fleet.plaintext());
        assert!(fleet.selects("web1") && fleet.selects("WEB1") && fleet.selects("group:web"));
        assert!(!fleet.selects("web2") && !fleet.selects("group:db") && !fleet.selects("group:web1"));
    }

    #[test]
    fn plain_http_needs_no_credentials_and_the_name_defaults_to_the_hostname() {
        let f = signers_file();
        let text = format!(
            "endpoints = [\"http://127.0.0.1:2379\"]\nallowed_signers = \"{}\"\n",
            f.path().display()
        );
        let (fleet, problems) = check(&text);
        assert!(problems.is_empty(), "{problems:?}");
        let fleet = fleet.unwrap();
        assert!(fleet.plaintext());
        assert!(!fleet.name.is_empty() && !fleet.name.contains('.'));
    }

    #[test]
    fn each_bad_field_is_named() {
        let f = signers_file();
        let s = format!("allowed_signers = \"{}\"\n", f.path().display());
        for (text, why) in [
            (s.clone(), "fleet.endpoints: required"),
            (
                format!("endpoints = [\"etcd:2379\"]\n{s}"),
                "fleet.endpoints[0]: must be",
            ),
            (format!("endpoints = [\"http://a:1\", \"https://b:1\"]\n{s}"), "mixes"),
            (format!("endpoints = [\"https://a:1\"]\n{s}"), "fleet.ca: required"),
            (
                format!("endpoints = [\"https://a:1\"]\nca = \"rel\"\ncert = \"/nonexistent\"\n{s}"),
                "fleet.ca: must be an absolute path",
            ),
            (
                format!("endpoints = [\"https://a:1\"]\nca = \"rel\"\ncert = \"/nonexistent\"\n{s}"),
                "fleet.cert: cannot read /nonexistent",
            ),
            (
                format!("endpoints = [\"http://a:1\"]\nname = \"web 1\"\n{s}"),
                "fleet.name",
            ),
            (
                format!("endpoints = [\"http://a:1\"]\ngroups = [\"group:x\"]\n{s}"),
                "fleet.groups[0]",
            ),
            (
                format!("endpoints = [\"http://a:1\"]\nprefix = \"jitd\"\n{s}"),
                "fleet.prefix",
            ),
            (
                format!("endpoints = [\"http://a:1\"]\nid = \"prod eu\"\n{s}"),
                "fleet.id: must be",
            ),
            (
                "endpoints = [\"http://a:1\"]\n".to_string(),
                "fleet.allowed_signers: required unless [remote]",
            ),
        ] {
            let (fleet, problems) = check(&text);
            assert!(fleet.is_none(), "{text}");
            assert!(problems.iter().any(|p| p.contains(why)), "{text}: {problems:?}");
        }
    }
}
