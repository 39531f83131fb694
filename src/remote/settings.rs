//! `[remote]` in the policy: where jitd listens for knocks, what the host answers to,
//! whose keys it trusts. Validated in one step like the rest of the policy; the
//! `allowed_signers` file is read here, and refused when someone other than root (or
//! jitd's own user) could change it, as sshd's StrictModes would.

use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::gate::DEFAULT_PREFIX6;
use super::signers::{self, Signer};

/// The UDP port `jitctl knock` uses unless told otherwise.
pub const DEFAULT_KNOCK_PORT: u16 = 62222;
/// How far a knock's signing time may be from jitd's clock, unless configured.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(30);
/// The widest window accepted: nonces are remembered this long.
pub const MAX_WINDOW: Duration = Duration::from_secs(600);

/// `[remote]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRemote {
    listen: Option<String>,
    #[serde(default)]
    names: Vec<String>,
    allowed_signers: Option<PathBuf>,
    window: Option<String>,
    #[serde(default)]
    require_source: bool,
    ipv6_prefix: Option<i64>,
}

/// `[remote]` validated, with its `allowed_signers` read.
#[derive(Debug, Clone)]
pub struct Remote {
    /// UDP address knocks arrive on (`[::]:62222` takes IPv4 and IPv6).
    pub listen: SocketAddr,
    /// What a knock may call this host besides its hostname and its addresses.
    pub names: Vec<String>,
    /// The `allowed_signers` file.
    pub allowed_signers: PathBuf,
    /// Its lines, shared (cheap to clone with the policy).
    pub signers: Arc<Vec<Signer>>,
    /// SHA-256 of the file as read: a reload with another file is a change.
    pub signers_digest: [u8; 32],
    /// How far a knock's signing time may be from jitd's clock.
    pub window: Duration,
    /// A knock must name the source to open for (else: the packet's source address).
    pub require_source: bool,
    /// The IPv6 prefix length knocks are limited by (the kernel meter, the gate, the
    /// audit budget); IPv4 is always limited per address.
    pub prefix6: u8,
}

impl PartialEq for Remote {
    fn eq(&self, other: &Remote) -> bool {
        self.listen == other.listen
            && self.names == other.names
            && self.allowed_signers == other.allowed_signers
            && self.signers_digest == other.signers_digest
            && self.window == other.window
            && self.require_source == other.require_source
            && self.prefix6 == other.prefix6
    }
}

/// Validates `[remote]`, adding one problem per bad field to `problems`.
pub fn validate(raw: RawRemote, problems: &mut Vec<String>) -> Option<Remote> {
    let before = problems.len();
    let listen = match raw.listen.as_deref().map(str::parse::<SocketAddr>) {
        None => {
            problems.push(format!(
                "remote.listen: required to take remote knocks, e.g. \"[::]:{DEFAULT_KNOCK_PORT}\" (remove [remote] to take none)"
            ));
            None
        }
        Some(Ok(a)) if a.port() != 0 => Some(a),
        Some(_) => {
            problems.push(format!(
                "remote.listen: must be ADDRESS:PORT with a port other than 0, e.g. \"[::]:{DEFAULT_KNOCK_PORT}\", got {:?}",
                raw.listen.unwrap_or_default()
            ));
            None
        }
    };
    let names = validate_names(&raw.names, problems);
    let window = validate_window(raw.window.as_deref(), problems);
    let prefix6 = validate_prefix6(raw.ipv6_prefix, problems);
    let signers = match &raw.allowed_signers {
        None => {
            problems.push(
                "remote.allowed_signers: required: the file of keys that may knock (OpenSSH's allowed_signers format)"
                    .into(),
            );
            None
        }
        Some(path) => match read_signers(path) {
            Ok(read) => Some(read),
            Err(e) => {
                problems.push(format!("remote.allowed_signers: {e}"));
                None
            }
        },
    };
    if problems.len() > before {
        return None;
    }
    let (signers, signers_digest) = signers?;
    Some(Remote {
        listen: listen?,
        names,
        allowed_signers: raw.allowed_signers?,
        signers: Arc::new(signers),
        signers_digest,
        window,
        require_source: raw.require_source,
        prefix6,
    })
}

/// `remote.ipv6_prefix`: 32 to 128; shorter would let one flood share a budget with
/// a whole provider's customers.
fn validate_prefix6(raw: Option<i64>, problems: &mut Vec<String>) -> u8 {
    match raw {
        None => DEFAULT_PREFIX6,
        Some(n) if (32..=128).contains(&n) => n as u8,
        Some(n) => {
            problems.push(format!(
                "remote.ipv6_prefix: must be between 32 and 128 (the IPv6 prefix length knocks are limited by), got {n}"
            ));
            DEFAULT_PREFIX6
        }
    }
}

/// Host names and addresses, lower-cased; each a DNS name or an IP address.
fn validate_names(raw: &[String], problems: &mut Vec<String>) -> Vec<String> {
    let mut names = Vec::new();
    for (i, name) in raw.iter().enumerate() {
        let ok = !name.is_empty()
            && name.len() <= 253
            && (name.parse::<std::net::IpAddr>().is_ok()
                || name.split('.').all(|label| {
                    !label.is_empty()
                        && label.len() <= 63
                        && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                }));
        if ok {
            names.push(name.to_ascii_lowercase());
        } else {
            problems.push(format!(
                "remote.names[{i}]: must be a DNS name or an IP address, got {name:?}"
            ));
        }
    }
    names
}

fn validate_window(raw: Option<&str>, problems: &mut Vec<String>) -> Duration {
    let Some(text) = raw else { return DEFAULT_WINDOW };
    match crate::duration::parse(text) {
        Ok(d) if !d.is_zero() && d <= MAX_WINDOW => d,
        Ok(_) => {
            problems.push(format!("remote.window: must be between 1s and 10m, got {text:?}"));
            DEFAULT_WINDOW
        }
        Err(e) => {
            problems.push(format!("remote.window: {e}, got {text:?}"));
            DEFAULT_WINDOW
        }
    }
}

/// Reads and parses `allowed_signers`, refusing a file others could change.
pub(crate) fn read_signers(path: &Path) -> Result<(Vec<Signer>, [u8; 32]), String> {
    let shown = path.display();
    if !path.is_absolute() {
        return Err(format!("must be an absolute path, got {shown:?}"));
    }
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read {shown}: {e}"))?;
    let euid = nix::unistd::geteuid().as_raw();
    if meta.uid() != 0 && meta.uid() != euid {
        return Err(format!(
            "{shown} is owned by uid {}; it must belong to root (anyone who can change it can open ports)",
            meta.uid()
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(format!(
            "{shown} is writable by group or others (mode {:04o}); make it 0644 or stricter",
            meta.mode() & 0o7777
        ));
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {shown}: {e}"))?;
    let signers = signers::parse(&text).map_err(|e| format!("{shown}: {e}"))?;
    if signers.is_empty() {
        return Err(format!("{shown} lists no key: no knock could ever be accepted"));
    }
    Ok((signers, Sha256::digest(text.as_bytes()).into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const SIGNERS: &str = include_str!("../../tests/fixtures/knock/allowed_signers");

    fn raw(toml_text: &str) -> RawRemote {
        toml::from_str(toml_text).unwrap()
    }

    fn signers_file(mode: u32) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), SIGNERS).unwrap();
        std::fs::set_permissions(f.path(), std::fs::Permissions::from_mode(mode)).unwrap();
        f
    }

    #[test]
    fn a_full_section_reads() {
        let f = signers_file(0o644);
        let text = format!(
            "listen = \"[::]:62222\"\nnames = [\"Web1.Example.org\", \"203.0.113.10\"]\nallowed_signers = {:?}\nwindow = \"45s\"\nrequire_source = true\nipv6_prefix = 56\n",
            f.path()
        );
        let mut problems = Vec::new();
        let r = validate(raw(&text), &mut problems).unwrap();
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(r.listen, "[::]:62222".parse().unwrap());
        assert_eq!(r.names, ["web1.example.org", "203.0.113.10"]);
        assert_eq!(r.signers.len(), signers::parse(SIGNERS).unwrap().len());
        assert_eq!(r.window, Duration::from_secs(45));
        assert!(r.require_source);
        assert_eq!(r.prefix6, 56);
    }

    #[test]
    fn each_bad_field_is_named() {
        let f = signers_file(0o644);
        let writable = signers_file(0o666);
        let path = f.path().display().to_string();
        for (text, why) in [
            (format!("allowed_signers = {path:?}"), "remote.listen: required"),
            (
                format!("listen = \"[::]:0\"\nallowed_signers = {path:?}"),
                "remote.listen: must be",
            ),
            (
                format!("listen = \"nowhere\"\nallowed_signers = {path:?}"),
                "got \"nowhere\"",
            ),
            (
                "listen = \"[::]:62222\"".to_string(),
                "remote.allowed_signers: required",
            ),
            (
                "listen = \"[::]:62222\"\nallowed_signers = \"relative\"".to_string(),
                "absolute path",
            ),
            (
                "listen = \"[::]:62222\"\nallowed_signers = \"/nonexistent/x\"".to_string(),
                "cannot read /nonexistent/x",
            ),
            (
                format!("listen = \"[::]:62222\"\nallowed_signers = {:?}", writable.path()),
                "writable by group or others (mode 0666)",
            ),
            (
                format!("listen = \"[::]:62222\"\nallowed_signers = {path:?}\nwindow = \"1h\""),
                "remote.window: must be between 1s and 10m",
            ),
            (
                format!("listen = \"[::]:62222\"\nallowed_signers = {path:?}\nipv6_prefix = 16"),
                "remote.ipv6_prefix: must be between 32 and 128",
            ),
            (
                format!("listen = \"[::]:62222\"\nallowed_signers = {path:?}\nnames = [\"web 1\"]"),
                "remote.names[0]: must be a DNS name",
            ),
        ] {
            let mut problems = Vec::new();
            assert!(validate(raw(&text), &mut problems).is_none(), "{text}");
            assert!(problems.iter().any(|p| p.contains(why)), "{text}: {problems:?}");
        }
    }

    #[test]
    fn a_bad_signers_line_is_named_with_the_file() {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), "alice ssh-ed25519 AAAAnotbase64\n").unwrap();
        let mut problems = Vec::new();
        let text = format!("listen = \"[::]:62222\"\nallowed_signers = {:?}", f.path());
        assert!(validate(raw(&text), &mut problems).is_none());
        assert!(problems[0].contains("line 1: not a public key"), "{problems:?}");
    }
}
