//! Talking to ssh-agent directly (its protocol, draft-miller-ssh-agent: list the keys,
//! ask for a signature), so that a knock signed by the agent's key costs no process
//! start: the agent signs, jitctl still never sees a private key. Keys the agent signs
//! for in ways jitctl does not build itself (certificates, security keys) are left to
//! `ssh-keygen -Y sign -U` ([`super::sign`]).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use ssh_key::{public::KeyData, Algorithm, HashAlg, LineEnding, Signature, SshSig};

/// SSH_AGENTC_REQUEST_IDENTITIES.
const REQUEST_IDENTITIES: u8 = 11;
/// SSH_AGENT_IDENTITIES_ANSWER.
const IDENTITIES_ANSWER: u8 = 12;
/// SSH_AGENTC_SIGN_REQUEST.
const SIGN_REQUEST: u8 = 13;
/// SSH_AGENT_SIGN_RESPONSE.
const SIGN_RESPONSE: u8 = 14;
/// SSH_AGENT_RSA_SHA2_512: an RSA key signs with rsa-sha2-512, never SHA-1.
const RSA_SHA2_512: u32 = 4;
/// The longest answer read from the agent.
const MAX_ANSWER: usize = 256 * 1024;
/// How long the agent may take (a security key would need a touch: not handled here).
const TIMEOUT: Duration = Duration::from_secs(10);

/// One key the agent holds: its public key blob and comment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The key in SSH wire form.
    pub blob: Vec<u8>,
    /// The agent's comment for it.
    pub comment: String,
}

impl Identity {
    /// The key as `ssh-add -L` prints it.
    pub fn line(&self) -> Option<String> {
        let key = ssh_key::PublicKey::from_bytes(&self.blob).ok()?;
        let mut line = key.to_openssh().ok()?;
        if !self.comment.is_empty() && key.comment().is_empty() {
            line = format!("{line} {}", self.comment);
        }
        Some(line)
    }

    /// Whether jitctl builds this key's signature itself: plain ed25519, ECDSA and RSA
    /// keys (not certificates, not security keys).
    pub fn signs_here(&self) -> bool {
        key_data(&self.blob).is_ok_and(|k| {
            matches!(
                k.algorithm(),
                Algorithm::Ed25519 | Algorithm::Ecdsa { .. } | Algorithm::Rsa { .. }
            )
        })
    }
}

/// The keys the agent at `socket` holds, in its order.
pub fn identities(socket: &Path) -> std::io::Result<Vec<Identity>> {
    let answer = ask(socket, &[REQUEST_IDENTITIES])?;
    let mut r = Reader(&answer);
    if r.byte()? != IDENTITIES_ANSWER {
        return Err(bad("the agent did not list its keys"));
    }
    let n = r.u32()?;
    let mut out = Vec::new();
    for _ in 0..n.min(1024) {
        let blob = r.string()?.to_vec();
        let comment = String::from_utf8_lossy(r.string()?).into_owned();
        out.push(Identity { blob, comment });
    }
    Ok(out)
}

/// Signs `message` under `namespace` with the agent's `identity`: the armoured SSHSIG,
/// as `ssh-keygen -Y sign` writes it.
pub fn sign(socket: &Path, identity: &Identity, namespace: &str, message: &[u8]) -> std::io::Result<String> {
    let key = key_data(&identity.blob).map_err(|e| bad(&format!("the agent's key: {e}")))?;
    let hash = HashAlg::Sha512;
    let data = SshSig::signed_data(namespace, hash, message).map_err(|e| bad(&e.to_string()))?;
    let flags = if matches!(key.algorithm(), Algorithm::Rsa { .. }) {
        RSA_SHA2_512
    } else {
        0
    };
    let mut request = vec![SIGN_REQUEST];
    put_string(&mut request, &identity.blob);
    put_string(&mut request, &data);
    request.extend_from_slice(&flags.to_be_bytes());
    let answer = ask(socket, &request)?;
    let mut r = Reader(&answer);
    if r.byte()? != SIGN_RESPONSE {
        return Err(bad("the agent refused to sign"));
    }
    let signature = Signature::try_from(r.string()?).map_err(|e| bad(&format!("the agent's signature: {e}")))?;
    let sig = SshSig::new(key, namespace, hash, signature).map_err(|e| bad(&e.to_string()))?;
    sig.to_pem(LineEnding::LF).map_err(|e| bad(&e.to_string()))
}

/// A plain public key from its wire form (a certificate is not one).
fn key_data(blob: &[u8]) -> ssh_key::Result<KeyData> {
    ssh_key::PublicKey::from_bytes(blob).map(|k| k.key_data().clone())
}

/// Sends one message to the agent and reads its one answer.
fn ask(socket: &Path, body: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    let mut framed = (body.len() as u32).to_be_bytes().to_vec();
    framed.extend_from_slice(body);
    stream.write_all(&framed)?;
    let mut len = [0u8; 4];
    stream.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len) as usize;
    if len == 0 || len > MAX_ANSWER {
        return Err(bad("the agent's answer has an impossible length"));
    }
    let mut answer = vec![0u8; len];
    stream.read_exact(&mut answer)?;
    Ok(answer)
}

fn put_string(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
}

fn bad(why: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, format!("ssh-agent: {why}"))
}

/// Reads the agent's answer, every length checked against what is there.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> std::io::Result<&'a [u8]> {
        if n > self.0.len() {
            return Err(bad("the answer is cut short"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn byte(&mut self) -> std::io::Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> std::io::Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn string(&mut self) -> std::io::Result<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_read_with_every_length_checked() {
        let mut answer = vec![IDENTITIES_ANSWER];
        answer.extend_from_slice(&1u32.to_be_bytes());
        put_string(&mut answer, b"blob");
        put_string(&mut answer, b"alice@laptop");
        let mut r = Reader(&answer);
        assert_eq!(r.byte().unwrap(), IDENTITIES_ANSWER);
        assert_eq!(r.u32().unwrap(), 1);
        assert_eq!(r.string().unwrap(), b"blob");
        assert_eq!(r.string().unwrap(), b"alice@laptop");
        let mut short = Reader(&[0, 0, 0, 9, 1, 2]);
        assert!(short.string().is_err(), "a length past the end");
    }
}
