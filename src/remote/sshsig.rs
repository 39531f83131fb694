//! The SSHSIG blob a knock carries (OpenSSH's PROTOCOL.sshsig), walked by hand with
//! [`Wire`]: ssh-key 0.6's `SshSig` holds only a plain key in its publickey field, and
//! `ssh-keygen -Y sign -f id-cert.pub` puts a certificate there. Nothing here verifies
//! anything: it finds the fields, proves their lengths, and says what kind of key
//! signed, as bytes of the packet still untrusted.
//!
//! ```text
//! byte[6]  "SSHSIG"
//! uint32   version, 1
//! string   publickey        a key, or a certificate (PROTOCOL.certkeys)
//! string   namespace
//! string   reserved         empty
//! string   hash_algorithm   "sha256" or "sha512"
//! string   signature
//! ```

use sha2::{Digest, Sha256};
use ssh_encoding::base64::{Base64, Base64Unpadded, Encoding};

use super::wire::{Wire, WireError};

/// The SSHSIG version understood here (verifiers must refuse later ones).
pub const VERSION: u32 = 1;
const MAGIC: &[u8] = b"SSHSIG";
const ARMOUR_BEGIN: &str = "-----BEGIN SSH SIGNATURE-----";
const ARMOUR_END: &str = "-----END SSH SIGNATURE-----";

/// The fields of an SSHSIG blob, lengths proven, contents unchecked.
#[derive(Debug, Clone, Copy)]
pub struct Envelope<'a> {
    /// The publickey field: a key's or a certificate's wire form.
    pub public_key: &'a [u8],
    /// The namespace the signer chose.
    pub namespace: &'a [u8],
    /// `sha256` or `sha512` (not yet checked).
    pub hash_alg: &'a [u8],
    /// The signature field, its structure proven by [`signature`].
    pub signature: &'a [u8],
}

/// Reads an SSHSIG blob: magic, version 1, the five strings, nothing after them.
pub fn envelope(blob: &[u8]) -> Result<Envelope<'_>, WireError> {
    let mut w = Wire::new(blob);
    if w.take(MAGIC.len(), "signature magic")? != MAGIC {
        return Err("signature: not an SSHSIG blob".into());
    }
    let version = w.u32("signature version")?;
    if version != VERSION {
        return Err(format!("signature: SSHSIG version {version}, not {VERSION}"));
    }
    let public_key = w.string("signature public key")?;
    let namespace = w.string("signature namespace")?;
    if !w.string("signature reserved field")?.is_empty() {
        // it is signed too; ssh-keygen always leaves it empty
        return Err("signature: the reserved field is not empty".into());
    }
    let hash_alg = w.string("signature hash algorithm")?;
    let signature = w.string("signature")?;
    signature_structure(Wire::new(signature))?;
    w.end("signature")?;
    Ok(Envelope {
        public_key,
        namespace,
        hash_alg,
        signature,
    })
}

/// A signature's structure: algorithm, blob, and for FIDO keys flags and counter.
fn signature_structure(mut w: Wire<'_>) -> Result<(), WireError> {
    let alg = w.string("signature algorithm")?;
    w.string("signature value")?;
    if alg.starts_with(b"sk-") {
        w.u8("signature flags")?;
        w.u32("signature counter")?;
    }
    w.end("signature value")
}

/// What signed, as its bytes in the packet.
#[derive(Debug, Clone, Copy)]
pub enum Presented<'a> {
    /// A plain key, in its wire form (compared byte for byte with allowed keys).
    Key(&'a [u8]),
    /// An OpenSSH certificate, its structure proven.
    Certificate(CertLayout<'a>),
}

impl Presented<'_> {
    /// The signing key's SHA-256 fingerprint (a certificate's: of its key).
    pub fn fingerprint(&self) -> String {
        match self {
            Presented::Key(key) => fingerprint(key),
            Presented::Certificate(layout) => layout.key_fingerprint(),
        }
    }
}

/// The fingerprint of the key that made an SSHSIG blob (its structure checked, not the
/// signature).
pub fn signer_fingerprint(blob: &[u8]) -> Result<String, WireError> {
    let envelope = envelope(blob)?;
    Ok(presented(envelope.public_key)?.fingerprint())
}

/// Where a certificate's parts are, every length proven (PROTOCOL.certkeys).
#[derive(Debug, Clone, Copy)]
pub struct CertLayout<'a> {
    /// The whole certificate, for ssh-key's decoder.
    pub blob: &'a [u8],
    /// The certified key's plain type, e.g. `ssh-ed25519`.
    pub key_type: &'static str,
    /// The certified key's fields, as in its plain wire form after the type.
    pub key_fields: &'a [u8],
    /// The CA's key (signature key), in its wire form.
    pub ca_key: &'a [u8],
}

impl CertLayout<'_> {
    /// The certified key's SHA-256 fingerprint, as `ssh-keygen -l` shows it for the
    /// certificate (OpenSSH fingerprints a certificate by its plain key).
    pub fn key_fingerprint(&self) -> String {
        let mut plain = Vec::with_capacity(4 + self.key_type.len() + self.key_fields.len());
        plain.extend_from_slice(&(self.key_type.len() as u32).to_be_bytes());
        plain.extend_from_slice(self.key_type.as_bytes());
        plain.extend_from_slice(self.key_fields);
        fingerprint(&plain)
    }
}

/// The key types a certificate may certify or be signed by: the certificate type, the
/// plain type, and the key's fields (a fixed size where ssh-key reads a fixed size).
const KEY_TYPES: &[(&str, &str, &[Option<usize>])] = &[
    ("ssh-ed25519-cert-v01@openssh.com", "ssh-ed25519", &[Some(32)]),
    (
        "ecdsa-sha2-nistp256-cert-v01@openssh.com",
        "ecdsa-sha2-nistp256",
        &[None, None],
    ),
    (
        "ecdsa-sha2-nistp384-cert-v01@openssh.com",
        "ecdsa-sha2-nistp384",
        &[None, None],
    ),
    (
        "ecdsa-sha2-nistp521-cert-v01@openssh.com",
        "ecdsa-sha2-nistp521",
        &[None, None],
    ),
    ("ssh-rsa-cert-v01@openssh.com", "ssh-rsa", &[None, None]),
    (
        "sk-ssh-ed25519-cert-v01@openssh.com",
        "sk-ssh-ed25519@openssh.com",
        &[Some(32), None],
    ),
    (
        "sk-ecdsa-sha2-nistp256-cert-v01@openssh.com",
        "sk-ecdsa-sha2-nistp256@openssh.com",
        &[None, None, None],
    ),
];

/// Says what kind of key the publickey field holds; a certificate's whole structure is
/// walked (a plain key need not be: it is only ever compared with allowed keys).
pub fn presented(public_key: &[u8]) -> Result<Presented<'_>, WireError> {
    let key_type = Wire::new(public_key).string("key type")?;
    if !key_type.ends_with(b"-cert-v01@openssh.com") {
        return Ok(Presented::Key(public_key));
    }
    certificate(public_key).map(Presented::Certificate)
}

fn certificate(blob: &[u8]) -> Result<CertLayout<'_>, WireError> {
    let mut w = Wire::new(blob);
    let cert_type = w.string("certificate type")?;
    let &(_, key_type, fields) = KEY_TYPES
        .iter()
        .find(|(c, _, _)| c.as_bytes() == cert_type)
        .ok_or("certificate: an unsupported key type")?;
    w.string("certificate nonce")?;
    let before = w.rest();
    key_fields(&mut w, fields, "certificate key")?;
    let key_fields = &before[..before.len() - w.rest().len()];
    w.u64("certificate serial")?;
    w.u32("certificate type")?;
    w.string("certificate key id")?;
    strings(w.nested("certificate principals")?, "certificate principal")?;
    w.u64("certificate valid after")?;
    w.u64("certificate valid before")?;
    options(w.nested("certificate critical options")?)?;
    options(w.nested("certificate extensions")?)?;
    w.string("certificate reserved field")?;
    let ca_key = w.string("certificate signature key")?;
    plain_key(ca_key)?;
    signature_structure(w.nested("certificate signature")?)?;
    w.end("certificate")?;
    Ok(CertLayout {
        blob,
        key_type,
        key_fields,
        ca_key,
    })
}

/// A plain key's structure (a CA's key inside a certificate).
fn plain_key(blob: &[u8]) -> Result<(), WireError> {
    let mut w = Wire::new(blob);
    let key_type = w.string("certificate signature key type")?;
    let &(_, _, fields) = KEY_TYPES
        .iter()
        .find(|(_, p, _)| p.as_bytes() == key_type)
        .ok_or("certificate: a CA key of an unsupported type")?;
    key_fields(&mut w, fields, "certificate signature key")?;
    w.end("certificate signature key")
}

fn key_fields(w: &mut Wire<'_>, fields: &[Option<usize>], what: &str) -> Result<(), WireError> {
    for size in fields {
        match size {
            Some(n) => w.string_of(*n, what)?,
            None => w.string(what)?,
        };
    }
    Ok(())
}

fn strings(mut w: Wire<'_>, what: &str) -> Result<(), WireError> {
    while !w.rest().is_empty() {
        w.string(what)?;
    }
    Ok(())
}

/// Critical options and extensions: names, each with empty data or exactly one string.
fn options(mut w: Wire<'_>) -> Result<(), WireError> {
    while !w.rest().is_empty() {
        w.string("certificate option name")?;
        let mut data = w.nested("certificate option data")?;
        if !data.rest().is_empty() {
            data.string("certificate option value")?;
            data.end("certificate option value")?;
        }
    }
    Ok(())
}

/// A key's SHA-256 fingerprint from its wire form, as `ssh-keygen -l` writes it.
pub fn fingerprint(key_blob: &[u8]) -> String {
    format!("SHA256:{}", Base64Unpadded::encode_string(&Sha256::digest(key_blob)))
}

/// The binary blob of an armoured signature, as `ssh-keygen -Y sign` writes it.
pub fn dearmour(text: &str) -> Result<Vec<u8>, String> {
    let body = text
        .trim()
        .strip_prefix(ARMOUR_BEGIN)
        .and_then(|t| t.strip_suffix(ARMOUR_END))
        .ok_or("signature: not an armoured SSH signature (-----BEGIN SSH SIGNATURE-----)")?;
    let body: String = body.split_whitespace().collect();
    Base64::decode_vec(&body).map_err(|_| "signature: not base64".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAROL: &str = include_str!("../../tests/fixtures/knock/carol-valid.sig");
    const CAROL_PUB: &str = include_str!("../../tests/fixtures/knock/carol.pub");
    const CA_PUB: &str = include_str!("../../tests/fixtures/knock/ca.pub");

    fn wire_form(openssh: &str) -> Vec<u8> {
        ssh_key::PublicKey::from_openssh(openssh).unwrap().to_bytes().unwrap()
    }

    #[test]
    fn a_certificate_made_by_ssh_keygen_is_found_with_its_parts() {
        let blob = dearmour(CAROL).unwrap();
        let env = envelope(&blob).unwrap();
        assert_eq!(env.namespace, b"knock@jitd");
        assert_eq!(env.hash_alg, b"sha512");
        let Presented::Certificate(cert) = presented(env.public_key).unwrap() else {
            panic!("not a certificate")
        };
        assert_eq!(cert.key_type, "ssh-ed25519");
        assert_eq!(cert.ca_key, wire_form(CA_PUB));
        let carol = ssh_key::PublicKey::from_openssh(CAROL_PUB).unwrap();
        assert_eq!(
            cert.key_fingerprint(),
            carol.fingerprint(ssh_key::HashAlg::Sha256).to_string()
        );
        assert_eq!(fingerprint(&wire_form(CAROL_PUB)), cert.key_fingerprint());
    }

    #[test]
    fn every_length_in_a_certificate_is_proven() {
        let blob = dearmour(CAROL).unwrap();
        let env = envelope(&blob).unwrap();
        let cert = env.public_key;
        // cutting the certificate anywhere, or growing it, is refused
        for n in [0, 5, 40, 100, cert.len() - 1] {
            assert!(presented(&cert[..n]).is_err(), "cut at {n}");
        }
        let mut longer = cert.to_vec();
        longer.push(0);
        assert_eq!(presented(&longer).unwrap_err(), "bytes after the certificate");
        // the nonce (right after the 36-byte type) claiming 1 MiB
        let mut huge = cert.to_vec();
        huge[36..40].copy_from_slice(&0x000f_ffffu32.to_be_bytes());
        assert_eq!(presented(&huge).unwrap_err(), "certificate nonce: truncated");
        // an ed25519 key of 33 bytes (ssh-key would read 32 and go on from the wrong place)
        let mut odd = cert.to_vec();
        let at = 36 + 4 + 32; // type, nonce
        odd[at..at + 4].copy_from_slice(&33u32.to_be_bytes());
        assert!(presented(&odd).unwrap_err().contains("not 32"));
    }

    #[test]
    fn the_envelope_is_refused_when_anything_is_off() {
        let blob = dearmour(CAROL).unwrap();
        let mut v2 = blob.clone();
        v2[6..10].copy_from_slice(&2u32.to_be_bytes());
        assert_eq!(envelope(&v2).unwrap_err(), "signature: SSHSIG version 2, not 1");
        let mut trailing = blob.clone();
        trailing.push(0);
        assert_eq!(envelope(&trailing).unwrap_err(), "bytes after the signature");
        assert!(envelope(b"SSHSIH\0\0\0\x01").unwrap_err().contains("not an SSHSIG"));
        assert!(dearmour("hello").is_err());
        assert!(dearmour(&CAROL.replace("U1NI", "U1N!")).is_err());
    }
}
