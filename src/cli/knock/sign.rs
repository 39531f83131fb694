//! Signing a knock (or a fleet request) with the user's SSH key: the agent's plain keys
//! through the agent directly ([`super::agent`]), anything else by running
//! `ssh-keygen -Y sign`. jitctl holds no private key material. Whatever ssh itself would
//! use works: ssh-agent, a key file (a passphrase is asked on the terminal), a FIDO2
//! security key (touch it when asked), an OpenSSH certificate.

use std::io::{BufRead, BufReader, IsTerminal, Read, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use ssh_key::{HashAlg, PublicKey, SshSig};

/// The private keys tried, in this order, in `~/.ssh` when neither `--key`, the hosts
/// file nor ssh-agent names one (as ssh does, FIDO2 keys included).
pub const DEFAULT_KEYS: [&str; 5] = ["id_ed25519", "id_ecdsa", "id_ecdsa_sk", "id_ed25519_sk", "id_rsa"];

/// The key a knock is signed with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    /// A file the user named: a private key (or its certificate `KEY-cert.pub` beside
    /// it), or a public key (or certificate) whose private half is in ssh-agent.
    Given(PathBuf),
    /// ssh-agent's first key: its line as `ssh-add -L` prints it.
    Agent(String),
    /// The first of `~/.ssh/id_*` that exists (or its certificate beside it).
    Default(PathBuf),
}

impl Key {
    /// The key as the report names it: a path, or `ssh-agent: COMMENT`.
    pub fn describe(&self) -> String {
        match self {
            Key::Given(p) | Key::Default(p) => p.display().to_string(),
            Key::Agent(line) => {
                let comment = line.split_whitespace().nth(2).unwrap_or("its first key");
                format!("ssh-agent: {comment}")
            }
        }
    }
}

/// Chooses the key: `given` (must exist), else the first line of the agent's listing
/// (`ssh-add -L`'s output, when it succeeded), else the first default key in
/// `home/.ssh` that `exists`.
pub fn choose(
    given: Option<(PathBuf, String)>,
    agent_listing: Option<&str>,
    home: Option<&Path>,
    exists: impl Fn(&Path) -> bool,
) -> Result<Key, String> {
    if let Some((path, from)) = given {
        return match exists(&path) {
            true => Ok(Key::Given(with_certificate(path, &exists))),
            false => Err(format!("{from} {}: no such file", path.display())),
        };
    }
    let first = agent_listing.and_then(|l| l.lines().find(|line| line.split_whitespace().count() >= 2));
    if let Some(line) = first {
        return Ok(Key::Agent(line.trim().to_string()));
    }
    let ssh = home.map(|h| h.join(".ssh"));
    ssh.iter()
        .flat_map(|dir| DEFAULT_KEYS.iter().map(move |k| dir.join(k)))
        .find(|p| exists(p))
        .map(|p| Key::Default(with_certificate(p, &exists)))
        .ok_or_else(|| "no SSH key: ssh-agent has none and ~/.ssh/id_* do not exist; give --key".to_string())
}

/// The file to sign with for the private key `path`: its certificate `PATH-cert.pub`
/// when one lies beside it (ssh does the same: ssh-keygen then signs with the private
/// key and puts the certificate in the signature), else the key itself. A public key or
/// a certificate named outright is taken as it is.
fn with_certificate(path: PathBuf, exists: impl Fn(&Path) -> bool) -> PathBuf {
    if path.extension().is_some_and(|e| e == "pub") {
        return path;
    }
    let mut cert = path.clone().into_os_string();
    cert.push("-cert.pub");
    let cert = PathBuf::from(cert);
    match exists(&cert) {
        true => cert,
        false => path,
    }
}

/// The keys ssh-agent holds, when `SSH_AUTH_SOCK` is set and it answers (asked
/// directly, [`super::agent`]: no `ssh-add -L` to start).
pub fn agent_keys(auth_sock: Option<&std::ffi::OsStr>) -> Vec<super::agent::Identity> {
    match auth_sock.filter(|s| !s.is_empty()) {
        Some(sock) => super::agent::identities(Path::new(sock)).unwrap_or_default(),
        None => Vec::new(),
    }
}

/// The agent's keys as `ssh-add -L` lists them (what [`choose`] reads).
pub fn listing(keys: &[super::agent::Identity]) -> Option<String> {
    let lines: Vec<String> = keys.iter().filter_map(super::agent::Identity::line).collect();
    (!lines.is_empty()).then(|| lines.join("\n"))
}

/// Signs `request` with `key`: in-process through the agent when the key is the
/// agent's and a plain key ([`super::agent::sign`]), else with `ssh-keygen`
/// ([`sign_in`]).
pub fn sign_with(
    request: &str,
    key: &Key,
    agent_keys: &[super::agent::Identity],
    dir: &PrivateDir,
    namespace: &str,
) -> Result<String, String> {
    if let Key::Agent(line) = key {
        let socket = std::env::var_os("SSH_AUTH_SOCK").unwrap_or_default();
        let held = agent_keys.iter().find(|k| k.line().as_deref() == Some(line.as_str()));
        if let Some(identity) = held.filter(|k| k.signs_here()) {
            return super::agent::sign(Path::new(&socket), identity, namespace, request.as_bytes())
                .map_err(|e| format!("{e} (key {})", key.describe()));
        }
    }
    sign_in(request, key, dir, namespace)
}

/// A directory only this user can read, removed when dropped: the request and the
/// agent's public key are handed to ssh-keygen as files in it.
pub struct PrivateDir {
    path: PathBuf,
}

impl PrivateDir {
    /// Creates `$TMPDIR/jitctl-knock-RANDOM` (mode 0700; refused if it exists).
    pub fn new(random: [u8; 16]) -> Result<PrivateDir, String> {
        let name: String = hex::encode(random);
        let path = std::env::temp_dir().join(format!("jitctl-knock-{name}"));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|e| format!("cannot create the directory {}: {e}", path.display()))?;
        Ok(PrivateDir { path })
    }

    fn write(&self, name: &str, text: &str) -> Result<PathBuf, String> {
        let path = self.path.join(name);
        std::fs::write(&path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        Ok(path)
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Signs `request` with `key` under `namespace` (`knock@jitd`, `fleet@jitd`) by
/// running `ssh-keygen -Y sign`; the armoured SSHSIG. ssh-keygen's own messages (a
/// passphrase prompt, "touch your security key", an error) reach the user's terminal
/// as they come.
fn sign_in(request: &str, key: &Key, dir: &PrivateDir, namespace: &str) -> Result<String, String> {
    let message = dir.write("request", request)?;
    let (key_file, agent_only) = match key {
        Key::Given(path) | Key::Default(path) => (path.clone(), false),
        Key::Agent(line) => (dir.write("agent-key.pub", &format!("{line}\n"))?, true),
    };
    // the message is a file, so stdin stays free for a passphrase prompt; without a
    // terminal there is nobody to ask, and ssh-keygen must not read one from a pipe
    let terminal = std::io::stdin().is_terminal();
    let mut cmd = Command::new("ssh-keygen");
    cmd.args(["-Y", "sign", "-n", namespace, "-f"]).arg(key_file);
    if agent_only {
        cmd.arg("-U"); // the key is in the agent, and only there
    }
    let mut child = cmd
        .arg(&message)
        .stdin(if terminal { Stdio::inherit() } else { Stdio::null() })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                "ssh-keygen not found: install OpenSSH's client tools (Debian: openssh-client)".to_string()
            }
            _ => format!("cannot run ssh-keygen: {e}"),
        })?;
    pass_on(child.stderr.take().expect("piped"));
    let status = child.wait().map_err(|e| format!("ssh-keygen: {e}"))?;
    if !status.success() {
        let hint = match terminal {
            true => "",
            false => "; without a terminal no passphrase can be asked: add the key to ssh-agent (ssh-add) first",
        };
        return Err(format!(
            "ssh-keygen could not sign with {} ({status}; its messages are above){hint}",
            key.describe()
        ));
    }
    let sig = dir.path.join("request.sig");
    std::fs::read_to_string(&sig).map_err(|e| format!("ssh-keygen wrote no signature ({}: {e})", sig.display()))
}

/// Copies ssh-keygen's stderr to ours, line by line as it comes, but for its notes
/// about the temporary files ("Signing file ...", "Write signature to ...").
fn pass_on(stderr: impl Read) {
    let mut err = std::io::stderr();
    for line in BufReader::new(stderr).split(b'\n').map_while(Result::ok) {
        if line.starts_with(b"Signing file ") || line.starts_with(b"Write signature to ") {
            continue;
        }
        let _ = err.write_all(&line);
        let _ = err.write_all(b"\n");
    }
}

/// The signing key's SHA-256 fingerprint (as `ssh-keygen -l` and jitd's audit show it),
/// read from the signature itself.
pub fn fingerprint(armoured: &str) -> Option<String> {
    let sig = SshSig::from_pem(armoured).ok()?;
    Some(
        PublicKey::from(sig.public_key().clone())
            .fingerprint(HashAlg::Sha256)
            .to_string(),
    )
}

/// 16 bytes from the kernel's random source.
pub fn random16() -> Result<[u8; 16], String> {
    let mut out = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut out))
        .map_err(|e| format!("cannot read /dev/urandom: {e}"))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const AGENT: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOnp alice@laptop\nssh-rsa AAAAB3 bob\n";

    fn with(files: &'static [&'static str]) -> impl Fn(&Path) -> bool {
        move |p| files.iter().any(|f| p == Path::new(f))
    }

    #[test]
    fn a_given_key_then_the_agent_then_the_default_files() {
        let home = Some(Path::new("/home/a"));
        let given = Some((PathBuf::from("/k.pub"), "--key".to_string()));
        let all = with(&["/k.pub", "/home/a/.ssh/id_rsa", "/home/a/.ssh/id_ecdsa"]);
        assert_eq!(
            choose(given.clone(), Some(AGENT), home, &all),
            Ok(Key::Given("/k.pub".into()))
        );
        let agent = choose(None, Some(AGENT), home, &all).unwrap();
        assert_eq!(
            agent,
            Key::Agent("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOnp alice@laptop".into())
        );
        assert_eq!(agent.describe(), "ssh-agent: alice@laptop");
        let first = Key::Default("/home/a/.ssh/id_ecdsa".into());
        assert_eq!(choose(None, None, home, &all), Ok(first.clone()));
        assert_eq!(choose(None, Some("\n"), home, &all), Ok(first), "an empty listing");
        let sk = with(&["/home/a/.ssh/id_ed25519_sk", "/home/a/.ssh/id_rsa"]);
        assert_eq!(
            choose(None, None, home, sk),
            Ok(Key::Default("/home/a/.ssh/id_ed25519_sk".into()))
        );
    }

    #[test]
    fn a_certificate_beside_a_key_file_is_used_as_ssh_does() {
        let home = Some(Path::new("/home/a"));
        let files = with(&[
            "/k",
            "/k-cert.pub",
            "/k.pub",
            "/home/a/.ssh/id_ed25519",
            "/home/a/.ssh/id_ed25519-cert.pub",
        ]);
        let given = |p: &str| Some((PathBuf::from(p), "--key".to_string()));
        assert_eq!(
            choose(given("/k"), None, home, &files),
            Ok(Key::Given("/k-cert.pub".into()))
        );
        assert_eq!(
            choose(given("/k.pub"), None, home, &files),
            Ok(Key::Given("/k.pub".into())),
            "a public key named outright"
        );
        assert_eq!(
            choose(None, None, home, &files),
            Ok(Key::Default("/home/a/.ssh/id_ed25519-cert.pub".into()))
        );
        let plain = with(&["/k", "/home/a/.ssh/id_rsa"]);
        assert_eq!(choose(given("/k"), None, home, &plain), Ok(Key::Given("/k".into())));
    }

    #[test]
    fn no_key_anywhere_says_what_to_do() {
        let e = choose(None, None, Some(Path::new("/home/a")), with(&[])).unwrap_err();
        assert_eq!(
            e,
            "no SSH key: ssh-agent has none and ~/.ssh/id_* do not exist; give --key"
        );
        assert_eq!(choose(None, None, None, with(&[])).unwrap_err(), e);
        let given = Some((PathBuf::from("/gone.pub"), "`key` in /h/hosts.toml:".to_string()));
        let e = choose(given, Some(AGENT), None, with(&[])).unwrap_err();
        assert_eq!(e, "`key` in /h/hosts.toml: /gone.pub: no such file");
    }

    #[test]
    fn the_fingerprint_comes_from_the_signature() {
        let sig = include_str!("../../../tests/fixtures/knock/alice.sig");
        // as `ssh-keygen -l -f tests/fixtures/knock/alice.pub` prints it
        assert_eq!(
            fingerprint(sig).unwrap(),
            "SHA256:kNqVq2y1xhVHW74I3iI1HQ/YkkUdYsWDIMeYd90z+k0"
        );
        assert_eq!(fingerprint("not a signature"), None);
    }
}
