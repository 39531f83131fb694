//! A knock on the wire, and the checks it goes through in two steps, so that a flood
//! costs little: [`screen`] (cheap, on the receive path: framing and size, the
//! request's grammar, its time window and host, the SSHSIG blob's structure, the
//! signing key or its certificate's CA among the allowed signers, byte for byte, and
//! that line's options) and [`verify`] (signatures, on a worker pool: the knock's, and
//! for a certificate the CA's, its validity and principals). [`check`] is both.
//!
//! ```text
//! byte[8]  "JITDKNK1"      magic and version
//! uint16   n               length of REQUEST, big endian
//! byte[n]  REQUEST         the canonical request (UTF-8)
//! byte[m]  SIGNATURE       the SSHSIG blob, binary, the rest of the datagram
//! ```

use std::fmt;

use chrono::{DateTime, SecondsFormat, TimeDelta, Utc};
use ssh_encoding::Decode;
use ssh_key::public::KeyData;
use ssh_key::{Certificate, Fingerprint, HashAlg, PublicKey, Signature, SshSig};

use super::cert::{self, CertInfo};
use super::request::KnockRequest;
use super::signers::Signer;
use super::sshsig::{self, Presented};
use super::wire::Wire;
use super::NAMESPACE;

/// The magic and version a knock starts with.
pub const MAGIC: &[u8; 8] = b"JITDKNK1";
/// The largest knock: one datagram without fragmentation on usual paths. An RSA key
/// with a certificate does not fit (docs/remote.md).
pub const MAX_PACKET: usize = 1400;

/// Why a knock was refused (never told to the sender; audited).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Not a knock: size, magic, framing, the request's grammar, the signature's
    /// structure.
    Malformed(String),
    /// Signed too long ago or too far ahead of jitd's clock.
    OutsideWindow {
        /// When the request says it was signed.
        signed: DateTime<Utc>,
    },
    /// For another host (the name the request gives).
    OtherHost(String),
    /// A key (its fingerprint) that no `allowed_signers` line allows here and now, nor
    /// a certificate from a CA that a `cert-authority` line allows.
    UnknownKey(String),
    /// The signature does not verify, is for another namespace or of a refused kind.
    BadSignature(String),
    /// A certificate from an allowed CA that does not allow this knock: not the CA's
    /// signature, a host certificate, outside its validity, no allowed principal.
    BadCertificate(String),
}

impl Refusal {
    /// A stable snake_case name for the audit and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::Malformed(_) => "malformed",
            Refusal::OutsideWindow { .. } => "outside_window",
            Refusal::OtherHost(_) => "other_host",
            Refusal::UnknownKey(_) => "unknown_key",
            Refusal::BadSignature(_) => "bad_signature",
            Refusal::BadCertificate(_) => "bad_certificate",
        }
    }
}

/// A sentence for the audit log. It holds no packet bytes but those that passed the
/// grammar (the host); escaping for the log is the audit's business.
impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Malformed(why) => write!(f, "not a knock: {why}"),
            Refusal::OutsideWindow { signed } => write!(
                f,
                "signed at {}, outside the time window",
                signed.to_rfc3339_opts(SecondsFormat::Secs, true)
            ),
            Refusal::OtherHost(host) => write!(f, "for another host: {host}"),
            Refusal::UnknownKey(fp) => {
                write!(f, "key {fp}: no allowed_signers line accepts it here now")
            }
            Refusal::BadSignature(why) => write!(f, "bad signature: {why}"),
            Refusal::BadCertificate(why) => write!(f, "certificate refused: {why}"),
        }
    }
}

impl std::error::Error for Refusal {}

/// A knock that passed [`screen`]: owned, to be sent to a worker for [`verify`]. Its
/// signatures are not checked yet: nothing in it is to be trusted but the request's
/// grammar, time and host.
#[derive(Debug, Clone)]
pub struct Screened {
    /// The request as it claims to be signed (the caller checks the nonce before
    /// spending a verification on it).
    pub request: KnockRequest,
    /// The signing key's SHA-256 fingerprint (for a certificate, of its key).
    pub fingerprint: String,
    signed: Signed,
}

/// A signature that passed [`screen_signature`]: its signer is known, nothing is
/// verified yet. Any signed text (a knock, a fleet request) in its own namespace.
#[derive(Debug, Clone)]
pub struct Signed {
    /// The signing key's SHA-256 fingerprint (for a certificate, of its key).
    pub fingerprint: String,
    message: String,
    namespace: &'static str,
    hash_alg: HashAlg,
    signature: Signature,
    signing: Signing,
}

/// Who signed, once [`verify_signature`] checked it.
#[derive(Debug, Clone)]
pub struct SignedBy {
    /// The principals the signer's lines (or its certificate) vouch for.
    pub principals: Vec<String>,
    /// The signing key's SHA-256 fingerprint.
    pub fingerprint: String,
    /// The certificate that signed, if one did.
    pub certificate: Option<CertInfo>,
}

#[derive(Debug, Clone)]
enum Signing {
    /// A key of `allowed_signers`, with the principals of its lines.
    Key { key: KeyData, principals: Vec<String> },
    /// A certificate from a CA of `allowed_signers`, with the CA's fingerprint and the
    /// principal patterns of the `cert-authority` lines that allow it now.
    Certificate {
        cert: Box<Certificate>,
        ca: Fingerprint,
        lines: Vec<Vec<String>>,
    },
}

impl Screened {
    /// Whether a certificate signed it.
    pub fn is_certificate(&self) -> bool {
        matches!(self.signed.signing, Signing::Certificate { .. })
    }
}

/// A knock that passed every check here: the request, who signed it.
#[derive(Debug, Clone)]
pub struct Verified {
    /// The request as signed.
    pub request: KnockRequest,
    /// Who signed: for a key, the principals of its `allowed_signers` lines; for a
    /// certificate, its principals that the `cert-authority` line's patterns allow.
    pub principals: Vec<String>,
    /// The signing key's SHA-256 fingerprint, as `ssh-keygen -l` shows it.
    pub fingerprint: String,
    /// The certificate that signed, if one did.
    pub certificate: Option<CertInfo>,
}

/// Frames a signed request: `armoured_signature` is the SSHSIG as `ssh-keygen -Y sign`
/// writes it; the packet carries it binary. Refuses a knock that would not fit one
/// datagram, saying why.
pub fn frame(request: &str, armoured_signature: &str) -> Result<Vec<u8>, String> {
    let blob = sshsig::dearmour(armoured_signature)?;
    let envelope = sshsig::envelope(&blob)?;
    let n = u16::try_from(request.len()).map_err(|_| "request: too long".to_string())?;
    let size = MAGIC.len() + 2 + request.len() + blob.len();
    if size > MAX_PACKET {
        return Err(too_big(size, request.len(), blob.len(), envelope.public_key));
    }
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&n.to_be_bytes());
    out.extend_from_slice(request.as_bytes());
    out.extend_from_slice(&blob);
    Ok(out)
}

fn too_big(size: usize, request: usize, signature: usize, public_key: &[u8]) -> String {
    let key_type = Wire::new(public_key).string("key type").unwrap_or_default();
    let rsa = key_type.starts_with(b"ssh-rsa");
    let advice = match sshsig::presented(public_key) {
        Ok(Presented::Certificate(_)) if rsa => {
            "an RSA key with a certificate does not fit one knock: use an ed25519 or \
             ECDSA key (certified or not), or the RSA key without its certificate"
        }
        _ if rsa => "use a shorter justification, or an ed25519 or ECDSA key",
        _ => "use a shorter justification",
    };
    format!(
        "the knock would be {size} bytes, more than {MAX_PACKET} (one datagram): the \
         request takes {request}, the signature {signature}; {advice}"
    )
}

/// The cheap checks of a datagram, for a host called any of `names`, at `now`,
/// accepting requests signed within `window` of it: framing, grammar, time, host, the
/// signature's structure and namespace, the key (or the certificate's CA) among
/// `signers` with options that allow it now. No signature is verified, and no key
/// that is not in `signers` is decoded. Replay (the nonce) is the caller's business.
pub fn screen(
    packet: &[u8],
    signers: &[Signer],
    names: &[String],
    now: DateTime<Utc>,
    window: TimeDelta,
) -> Result<Screened, Refusal> {
    let (text, blob) = split(packet)?;
    let request = KnockRequest::parse(text).map_err(|e| Refusal::Malformed(without_values(&e)))?;
    if (request.time - now).abs() > window {
        return Err(Refusal::OutsideWindow { signed: request.time });
    }
    if !names.iter().any(|n| n.eq_ignore_ascii_case(&request.host)) {
        return Err(Refusal::OtherHost(request.host));
    }
    let signed = screen_signature(text, blob, NAMESPACE, signers, now)?;
    Ok(Screened {
        request,
        fingerprint: signed.fingerprint.clone(),
        signed,
    })
}

/// The cheap checks of an SSHSIG blob over `message`: its grammar, `namespace`, a hash
/// and signature algorithm jitd accepts, and a signer among `signers` whose line allows
/// `namespace` at `now` (a key byte for byte, or a certificate's CA). Nothing is
/// verified yet ([`verify_signature`]).
pub fn screen_signature(
    message: &str,
    blob: &[u8],
    namespace: &'static str,
    signers: &[Signer],
    now: DateTime<Utc>,
) -> Result<Signed, Refusal> {
    let envelope = sshsig::envelope(blob).map_err(Refusal::Malformed)?;
    if envelope.namespace != namespace.as_bytes() {
        return Err(Refusal::BadSignature(format!(
            "signed for another namespace than {namespace}"
        )));
    }
    let hash_alg = match envelope.hash_alg {
        b"sha256" => HashAlg::Sha256,
        b"sha512" => HashAlg::Sha512,
        _ => {
            return Err(Refusal::Malformed(
                "signature: hash algorithm not sha256 or sha512".into(),
            ))
        }
    };
    let signature = signature(envelope.signature)?;
    let presented = sshsig::presented(envelope.public_key).map_err(Refusal::Malformed)?;
    let fingerprint = presented.fingerprint();
    let signing = match presented {
        Presented::Key(key) => key_signer(key, signers, namespace, now),
        Presented::Certificate(layout) => cert_signer(&layout, signers, namespace, now),
    };
    let signing = signing.ok_or_else(|| Refusal::UnknownKey(fingerprint.clone()))?;
    let signing = match signing {
        Found::Key(key, principals) => Signing::Key { key, principals },
        Found::Ca(blob, ca, lines) => Signing::Certificate {
            cert: Box::new(cert::decode(blob).map_err(Refusal::BadCertificate)?),
            ca,
            lines,
        },
    };
    Ok(Signed {
        fingerprint,
        message: message.to_string(),
        namespace,
        hash_alg,
        signature,
        signing,
    })
}

/// Magic, length, the request as UTF-8, and the signature blob after it.
fn split(packet: &[u8]) -> Result<(&str, &[u8]), Refusal> {
    let malformed = |why: &str| Refusal::Malformed(why.to_string());
    if packet.len() > MAX_PACKET {
        return Err(malformed("larger than a knock"));
    }
    let rest = packet
        .strip_prefix(MAGIC.as_slice())
        .ok_or_else(|| malformed("no knock magic"))?;
    let (len, rest) = rest.split_first_chunk::<2>().ok_or_else(|| malformed("truncated"))?;
    let (text, blob) = rest
        .split_at_checked(usize::from(u16::from_be_bytes(*len)))
        .ok_or_else(|| malformed("truncated request"))?;
    let text = std::str::from_utf8(text).map_err(|_| malformed("request not UTF-8"))?;
    Ok((text, blob))
}

/// The request parser's message without the values it quotes: they are packet bytes
/// that failed the grammar (Rust's `{:?}` quoting, so `\"` inside is escaped).
fn without_values(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut chars = message.chars();
    while let Some(c) = chars.next() {
        if c != '"' {
            out.push(c);
            continue;
        }
        out.push_str("\"...\"");
        while let Some(c) = chars.next() {
            match c {
                '\\' => {
                    chars.next();
                }
                '"' => break,
                _ => {}
            }
        }
    }
    out
}

/// The signature field, decoded (its lengths were proven by `sshsig::envelope`).
fn signature(bytes: &[u8]) -> Result<Signature, Refusal> {
    if Wire::new(bytes).string("signature algorithm").ok() == Some(b"ssh-rsa") {
        return Err(Refusal::BadSignature(
            "an RSA signature with SHA-1 (ssh-rsa): OpenSSH signs with rsa-sha2-512".into(),
        ));
    }
    let mut reader = bytes;
    Signature::decode(&mut reader)
        .ok()
        .filter(|_| reader.is_empty())
        .ok_or_else(|| Refusal::Malformed("signature: does not decode".into()))
}

/// What the allowed signers say of the key that signed.
enum Found<'a> {
    /// A key line's key and the principals of every line that allows it now.
    Key(KeyData, Vec<String>),
    /// A certificate (its bytes) from a CA whose lines allow it now: the CA's
    /// fingerprint, and each such line's principal patterns.
    Ca(&'a [u8], Fingerprint, Vec<Vec<String>>),
}

/// A plain key: the key lines (not `cert-authority`) with these very bytes.
fn key_signer<'a>(key: &[u8], signers: &[Signer], namespace: &str, now: DateTime<Utc>) -> Option<Found<'a>> {
    let lines: Vec<&Signer> = signers
        .iter()
        .filter(|s| !s.cert_authority && s.wire() == key && s.allows(namespace, now))
        .collect();
    let first = lines.first()?;
    let mut principals: Vec<String> = Vec::new();
    for p in lines.iter().flat_map(|s| &s.principals) {
        if !principals.contains(p) {
            principals.push(p.clone());
        }
    }
    Some(Found::Key(first.key.key_data().clone(), principals))
}

/// A certificate: the `cert-authority` lines whose key is the certificate's CA.
fn cert_signer<'a>(
    layout: &sshsig::CertLayout<'a>,
    signers: &[Signer],
    namespace: &str,
    now: DateTime<Utc>,
) -> Option<Found<'a>> {
    let lines: Vec<&Signer> = signers
        .iter()
        .filter(|s| s.cert_authority && s.wire() == layout.ca_key && s.allows(namespace, now))
        .collect();
    let ca = lines.first()?.key.fingerprint(HashAlg::Sha256);
    let patterns = lines.iter().map(|s| s.principals.clone()).collect();
    Some(Found::Ca(layout.blob, ca, patterns))
}

/// The expensive checks, for a worker: the knock's signature, and for a certificate the
/// CA's signature, then (about a certificate its CA issued and its holder used) that it
/// is a user certificate valid at `now` with principals the `cert-authority` line allows.
pub fn verify(screened: Screened, now: DateTime<Utc>) -> Result<Verified, Refusal> {
    let Screened { request, signed, .. } = screened;
    let SignedBy {
        principals,
        fingerprint,
        certificate,
    } = verify_signature(signed, now)?;
    Ok(Verified {
        request,
        principals,
        fingerprint,
        certificate,
    })
}

/// The expensive part of a signature's checks: for a certificate the CA's signature,
/// then the signature over the message in its namespace, then the certificate's type,
/// validity, critical options and principals.
pub fn verify_signature(signed: Signed, now: DateTime<Utc>) -> Result<SignedBy, Refusal> {
    let Signed {
        fingerprint,
        message,
        namespace,
        hash_alg,
        signature,
        signing,
    } = signed;
    let (principals, certificate) = match signing {
        Signing::Key { key, principals } => {
            signed_by(key, &message, namespace, hash_alg, signature, &fingerprint)?;
            (principals, None)
        }
        Signing::Certificate { cert, ca, lines } => {
            cert::issued_by(&cert, &ca).map_err(Refusal::BadCertificate)?;
            let key = cert.public_key().clone();
            signed_by(key, &message, namespace, hash_alg, signature, &fingerprint)?;
            let principals = cert::authorise(&cert, &lines, now).map_err(Refusal::BadCertificate)?;
            (principals, Some(cert::info(&cert, &ca)))
        }
    };
    Ok(SignedBy {
        principals,
        fingerprint,
        certificate,
    })
}

/// The SSHSIG signature over `message` by `key`, checked by ssh-key.
fn signed_by(
    key: KeyData,
    message: &str,
    namespace: &str,
    hash_alg: HashAlg,
    signature: Signature,
    fingerprint: &str,
) -> Result<(), Refusal> {
    let bad = |why: &str| Refusal::BadSignature(format!("{fingerprint}: {why}"));
    let sig = SshSig::new(key.clone(), namespace, hash_alg, signature).map_err(|_| bad("not a signature"))?;
    PublicKey::new(key, "")
        .verify(namespace, message.as_bytes(), &sig)
        .map_err(|_| bad("does not verify"))
}

/// Checks a datagram all the way: [`screen`], then [`verify`] at the same `now`.
pub fn check(
    packet: &[u8],
    signers: &[Signer],
    names: &[String],
    now: DateTime<Utc>,
    window: TimeDelta,
) -> Result<Verified, Refusal> {
    verify(screen(packet, signers, names, now, window)?, now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote::signers;

    use crate::remote::knock_fixture as fixture;
    const REQUEST: &str = fixture!("request");
    const SIGNERS: &str = fixture!("allowed_signers");
    const ALICE: &str = fixture!("alice.sig");
    const BOB: &str = fixture!("bob.sig");
    const ERIN: &str = fixture!("erin.sig");
    const RITA: &str = fixture!("rita.sig");
    const RON: &str = fixture!("ron.sig");
    const MALLORY: &str = fixture!("mallory.sig");
    const ALICE_GIT: &str = fixture!("alice-git.sig");
    const CAROL: &str = fixture!("carol-valid.sig");
    const CA_PUB: &str = fixture!("ca.pub");
    const ALICE_PUB: &str = fixture!("alice.pub");
    const CAROL_PUB: &str = fixture!("carol.pub");

    fn now() -> DateTime<Utc> {
        "2026-11-26T13:05:10Z".parse().unwrap()
    }

    fn names() -> Vec<String> {
        vec!["web1.example.org".into()]
    }

    fn checked_with(packet: &[u8], signers: &str, now: DateTime<Utc>) -> Result<Verified, Refusal> {
        let signers = signers::parse(signers).unwrap();
        check(packet, &signers, &names(), now, TimeDelta::seconds(30))
    }

    fn checked(packet: &[u8], now: DateTime<Utc>) -> Result<Verified, Refusal> {
        checked_with(packet, SIGNERS, now)
    }

    fn knock(sig: &str) -> Vec<u8> {
        frame(REQUEST, sig).unwrap()
    }

    fn refusal(packet: &[u8]) -> Refusal {
        checked(packet, now()).unwrap_err()
    }

    fn fingerprint(openssh: &str) -> String {
        let key = PublicKey::from_openssh(openssh).unwrap();
        key.fingerprint(HashAlg::Sha256).to_string()
    }

    /// An `allowed_signers` line: principals and options, then a fixture's key.
    fn line(head: &str, public: &str) -> String {
        let mut words = public.split(' ');
        format!("{head} {} {}\n", words.next().unwrap(), words.next().unwrap())
    }

    /// The SSHSIG fields of an armoured fixture signature.
    struct Parts {
        version: u32,
        public_key: Vec<u8>,
        namespace: Vec<u8>,
        reserved: Vec<u8>,
        hash_alg: Vec<u8>,
        signature: Vec<u8>,
    }

    fn string(out: &mut Vec<u8>, s: &[u8]) {
        out.extend_from_slice(&(s.len() as u32).to_be_bytes());
        out.extend_from_slice(s);
    }

    impl Parts {
        fn of(sig: &str) -> Parts {
            let blob = sshsig::dearmour(sig).unwrap();
            let e = sshsig::envelope(&blob).unwrap();
            Parts {
                version: 1,
                public_key: e.public_key.to_vec(),
                namespace: e.namespace.to_vec(),
                reserved: Vec::new(),
                hash_alg: e.hash_alg.to_vec(),
                signature: e.signature.to_vec(),
            }
        }

        fn packet(&self) -> Vec<u8> {
            let mut blob = b"SSHSIG".to_vec();
            blob.extend_from_slice(&self.version.to_be_bytes());
            for field in [
                &self.public_key,
                &self.namespace,
                &self.reserved,
                &self.hash_alg,
                &self.signature,
            ] {
                string(&mut blob, field);
            }
            let mut out = MAGIC.to_vec();
            out.extend_from_slice(&(REQUEST.len() as u16).to_be_bytes());
            out.extend_from_slice(REQUEST.as_bytes());
            out.extend_from_slice(&blob);
            out
        }
    }

    #[test]
    fn signatures_made_by_ssh_keygen_verify_for_ed25519_ecdsa_and_rsa() {
        for (sig, who, public) in [
            (ALICE, "alice", ALICE_PUB),
            (BOB, "bob", fixture!("bob.pub")),
            (ERIN, "erin", fixture!("erin.pub")),
            (RITA, "rita", fixture!("rita.pub")),
            (RON, "ron", fixture!("ron.pub")),
        ] {
            let packet = knock(sig);
            assert!(packet.len() <= MAX_PACKET, "{who}: {} bytes", packet.len());
            let v = checked(&packet, now()).unwrap();
            assert_eq!(v.principals, [who]);
            assert_eq!(v.fingerprint, fingerprint(public));
            assert_eq!(v.certificate, None);
            assert_eq!(v.request.ports, vec![22]);
        }
    }

    #[test]
    fn a_changed_request_an_unknown_key_or_another_namespace_is_refused() {
        for sig in [ALICE, BOB, RITA] {
            let mut packet = knock(sig);
            let at = 10 + REQUEST.find("3600").unwrap();
            packet[at] = b'9'; // "duration 9600": still canonical, no longer what was signed
            assert!(
                matches!(refusal(&packet), Refusal::BadSignature(ref why) if why.ends_with("does not verify")),
                "{sig}"
            );
        }
        assert_eq!(
            refusal(&knock(MALLORY)),
            Refusal::UnknownKey(fingerprint(fixture!("mallory.pub")))
        );
        let e = refusal(&knock(ALICE_GIT));
        assert_eq!(
            e,
            Refusal::BadSignature("signed for another namespace than knock@jitd".into())
        );
    }

    #[test]
    fn time_host_and_framing_are_checked_before_the_signature() {
        let packet = knock(ALICE);
        let late = now() + TimeDelta::seconds(60);
        assert!(matches!(checked(&packet, late), Err(Refusal::OutsideWindow { .. })));
        let signers = signers::parse(SIGNERS).unwrap();
        let other = check(&packet, &signers, &["web2".into()], now(), TimeDelta::seconds(30));
        assert_eq!(other.unwrap_err(), Refusal::OtherHost("web1.example.org".into()));
        for bad in [&packet[..5], &packet[..12], &[0u8; 1500][..], b"JITDKNK1\xff\xff"] {
            assert!(matches!(checked(bad, now()), Err(Refusal::Malformed(_))), "{bad:?}");
        }
        let mut truncated = packet.clone();
        truncated.truncate(packet.len() - 10);
        assert!(matches!(refusal(&truncated), Refusal::Malformed(_)));
        let mut trailing = packet.clone();
        trailing.push(0);
        assert_eq!(
            refusal(&trailing),
            Refusal::Malformed("bytes after the signature".into())
        );
    }

    #[test]
    fn a_certificate_from_an_allowed_ca_verifies_with_its_principals() {
        let packet = knock(CAROL);
        assert!(packet.len() < 800, "{} bytes", packet.len());
        let v = checked(&packet, now()).unwrap();
        assert_eq!(v.principals, ["alice"]);
        assert_eq!(v.fingerprint, fingerprint(CAROL_PUB));
        let info = v.certificate.unwrap();
        assert_eq!(info.key_id, "carol-valid@example.org");
        assert_eq!(info.serial, 1);
        assert_eq!(info.ca_fingerprint, fingerprint(CA_PUB));
        // the cert-authority line allows `alice,ops-*`: of ops-db, bob, ops-web, two match
        let v = checked(&knock(fixture!("carol-ops.sig")), now()).unwrap();
        assert_eq!(v.principals, ["ops-db", "ops-web"]);
        // an RSA-3072 key with a certificate fits when it carries no extensions
        let packet = knock(fixture!("rita-bare.sig"));
        assert!(packet.len() <= MAX_PACKET, "{} bytes", packet.len());
        let v = checked(&packet, now()).unwrap();
        assert_eq!(
            (v.principals, v.fingerprint),
            (vec!["alice".to_string()], fingerprint(fixture!("rita.pub")))
        );
    }

    #[test]
    fn certificates_that_do_not_allow_the_knock_are_refused_saying_why() {
        for (sig, why) in [
            (
                fixture!("carol-expired.sig"),
                "serial 3: expired at 2026-01-01T00:00:00Z",
            ),
            (
                fixture!("carol-future.sig"),
                "serial 4: not valid before 2027-01-01T00:00:00Z",
            ),
            (
                fixture!("carol-wrong.sig"),
                "serial 5: none of its 1 principals is allowed",
            ),
            (fixture!("carol-host.sig"), "serial 6: a host certificate"),
            (fixture!("carol-forever.sig"), "it never expires"),
            (
                fixture!("carol-command.sig"),
                "serial 9: it carries critical options (force-command)",
            ),
            (fixture!("carol-anyone.sig"), "serial 10: it names no principal"),
        ] {
            match refusal(&knock(sig)) {
                Refusal::BadCertificate(e) => assert!(e.starts_with(why), "{why}: {e}"),
                other => panic!("{why}: {other:?}"),
            }
        }
        // from a CA that is in no cert-authority line: an unknown key, by the key's name
        let e = refusal(&knock(fixture!("carol-rogue.sig")));
        assert_eq!(e, Refusal::UnknownKey(fingerprint(CAROL_PUB)));
    }

    #[test]
    fn a_certificate_is_judged_at_the_time_given_not_the_machine_clock() {
        let signers = signers::parse(SIGNERS).unwrap();
        let screened = screen(&knock(CAROL), &signers, &names(), now(), TimeDelta::seconds(30)).unwrap();
        let later = "2028-06-01T00:00:00Z".parse().unwrap();
        let e = verify(screened.clone(), later).unwrap_err();
        assert_eq!(
            e,
            Refusal::BadCertificate("serial 1: expired at 2027-12-31T00:00:00Z".into())
        );
        assert!(verify(screened, now()).is_ok());
    }

    #[test]
    fn the_allowed_signers_lines_options_bind_certificates_too() {
        let cases = [
            // the CA's line allows another namespace only
            line(r#"alice cert-authority,namespaces="git""#, CA_PUB),
            // the CA's line has expired
            line(r#"alice cert-authority,valid-before="20261101""#, CA_PUB),
            // the CA's key on a key line is not a CA
            line("alice", CA_PUB),
        ];
        for signers in cases {
            let e = checked_with(&knock(CAROL), &signers, now()).unwrap_err();
            assert_eq!(e, Refusal::UnknownKey(fingerprint(CAROL_PUB)), "{signers}");
        }
        // a key on a cert-authority line does not sign knocks itself
        let e = checked_with(&knock(ALICE), &line("alice cert-authority", ALICE_PUB), now()).unwrap_err();
        assert_eq!(e, Refusal::UnknownKey(fingerprint(ALICE_PUB)));
        // a negated pattern wins; two lines for one CA each allow their principals
        let signers = line("*,!ops-db cert-authority", CA_PUB) + &line("bob cert-authority", CA_PUB);
        let v = checked_with(&knock(fixture!("carol-ops.sig")), &signers, now()).unwrap();
        assert_eq!(v.principals, ["bob", "ops-web"]);
    }

    #[test]
    fn a_certificate_or_signature_that_was_tampered_with_is_refused() {
        // the key id changed: the CA did not sign that
        let mut parts = Parts::of(CAROL);
        let at = parts.public_key.windows(5).position(|w| w == b"carol").unwrap();
        parts.public_key[at] = b'k';
        assert!(matches!(
            refusal(&parts.packet()),
            Refusal::BadCertificate(ref e) if e == "serial 1: the CA's signature on it does not verify"
        ));
        // an extension's empty data spelled as an empty string inside it: ssh-key reads
        // both the same, so the bytes are not what would be verified
        let mut parts = Parts::of(CAROL);
        let cert = &mut parts.public_key;
        let ext = cert.windows(21).position(|w| w == b"permit-X11-forwarding").unwrap() - 8;
        let len = u32::from_be_bytes(cert[ext..ext + 4].try_into().unwrap());
        cert[ext..ext + 4].copy_from_slice(&(len + 4).to_be_bytes());
        let data = cert.windows(10).position(|w| w == b"permit-pty").unwrap() + 10;
        cert.splice(data..data + 4, [0, 0, 0, 4, 0, 0, 0, 0]);
        assert_eq!(
            refusal(&parts.packet()),
            Refusal::BadCertificate("the certificate is not in canonical form".into())
        );
        // carol's certificate presented with alice's signature
        let mut parts = Parts::of(CAROL);
        parts.signature = Parts::of(ALICE).signature;
        assert!(matches!(refusal(&parts.packet()), Refusal::BadSignature(_)));
        // an RSA signature made with SHA-1
        let mut parts = Parts::of(RITA);
        let rsa = Parts::of(RITA).signature;
        let value = Wire::new(&rsa[4 + 12..]).string("v").unwrap().to_vec(); // after "rsa-sha2-512"
        parts.signature.clear();
        string(&mut parts.signature, b"ssh-rsa");
        string(&mut parts.signature, &value);
        assert!(matches!(refusal(&parts.packet()), Refusal::BadSignature(ref e) if e.contains("SHA-1")));
    }

    #[test]
    fn garbage_in_the_signature_blob_is_refused_before_any_key_is_decoded() {
        let mut cases: Vec<(Parts, &str)> = Vec::new();
        let mut p = Parts::of(ALICE);
        p.version = 2;
        cases.push((p, "not a knock: signature: SSHSIG version 2, not 1"));
        let mut p = Parts::of(ALICE);
        p.public_key = b"garbage".to_vec();
        cases.push((p, "not a knock: key type: truncated"));
        let mut p = Parts::of(ALICE);
        p.public_key.clear();
        string(&mut p.public_key, b"ssh-ed25519-cert-v01@openssh.com");
        p.public_key.extend_from_slice(&[0xff; 40]);
        cases.push((p, "not a knock: certificate nonce: truncated"));
        let mut p = Parts::of(ALICE);
        p.reserved = b"x".to_vec();
        cases.push((p, "not a knock: signature: the reserved field is not empty"));
        let mut p = Parts::of(ALICE);
        p.hash_alg = b"md5".to_vec();
        cases.push((p, "not a knock: signature: hash algorithm not sha256 or sha512"));
        let mut p = Parts::of(ALICE);
        p.signature.push(0);
        cases.push((p, "not a knock: bytes after the signature value"));
        for (parts, why) in cases {
            assert_eq!(refusal(&parts.packet()).to_string(), why);
        }
        // a key nobody allows, of a type nobody knows, is only compared, never decoded
        let mut p = Parts::of(ALICE);
        p.public_key.clear();
        string(&mut p.public_key, b"ssh-frobnicate");
        p.public_key.extend_from_slice(&[0xff; 40]);
        assert!(matches!(refusal(&p.packet()), Refusal::UnknownKey(_)));
    }

    #[test]
    fn screen_checks_no_signature_and_verify_does() {
        let signers = signers::parse(SIGNERS).unwrap();
        let mut packet = knock(CAROL);
        let last = packet.len() - 1;
        packet[last] ^= 1; // the knock's signature, the last bytes
        let screened = screen(&packet, &signers, &names(), now(), TimeDelta::seconds(30)).unwrap();
        assert!(screened.is_certificate());
        assert_eq!(screened.fingerprint, fingerprint(CAROL_PUB));
        assert_eq!(screened.request.nonce[0], 0x5f);
        assert!(matches!(verify(screened, now()), Err(Refusal::BadSignature(_))));
        fn owned_and_sendable<T: Send + 'static>(_: &T) {}
        owned_and_sendable(&screen(&knock(ALICE), &signers, &names(), now(), TimeDelta::seconds(30)).unwrap());
    }

    #[test]
    fn refusals_have_codes_and_sentences_without_unchecked_packet_bytes() {
        let bad_host = REQUEST.replace("web1.example.org", "web1\u{202e}\u{1b}[2J\\\"x");
        let sig = ALICE; // any: the request fails its grammar first
        let e = refusal(&frame(&bad_host, sig).unwrap());
        assert_eq!(e.code(), "malformed");
        let text = e.to_string();
        assert_eq!(text, "not a knock: host: \"...\" is not a host name or address");
        let extra = format!("{REQUEST}evil \u{202e}\"line\n");
        let text = refusal(&frame(&extra, sig).unwrap()).to_string();
        assert_eq!(text, "not a knock: request: unexpected line \"...\"");
        let cases = [
            (refusal(&knock(ALICE_GIT)), "bad_signature"),
            (refusal(&knock(MALLORY)), "unknown_key"),
            (refusal(&knock(fixture!("carol-host.sig"))), "bad_certificate"),
            (
                checked(&knock(ALICE), now() + TimeDelta::hours(1)).unwrap_err(),
                "outside_window",
            ),
            (Refusal::OtherHost("web2".into()), "other_host"),
        ];
        for (e, code) in cases {
            assert_eq!(e.code(), code);
            assert!(!e.to_string().is_empty());
        }
        let e = checked(&knock(ALICE), now() + TimeDelta::hours(1)).unwrap_err();
        assert_eq!(e.to_string(), "signed at 2026-11-26T13:05:00Z, outside the time window");
    }

    #[test]
    fn a_knock_too_big_for_a_datagram_is_refused_when_framed_saying_why() {
        for sig in [fixture!("ron-ca.sig"), fixture!("rita-ca.sig")] {
            let e = frame(REQUEST, sig).unwrap_err();
            assert!(
                e.contains("an RSA key with a certificate does not fit one knock"),
                "{e}"
            );
        }
        let long = REQUEST.replace("INC-1234", &"x".repeat(200));
        let e = frame(&long, RON).unwrap_err();
        assert!(e.contains("use a shorter justification, or an ed25519"), "{e}");
        assert!(frame(REQUEST, "not a signature").is_err());
    }

    /// Timings, not a check: `cargo test --release --lib -- --ignored knock_timings
    /// --nocapture`.
    #[test]
    #[ignore]
    fn knock_timings() {
        let signers = signers::parse(SIGNERS).unwrap();
        let window = TimeDelta::seconds(30);
        let mut garbage = Parts::of(ALICE);
        garbage.public_key.clear();
        string(&mut garbage.public_key, b"ssh-ed25519");
        string(&mut garbage.public_key, &[7; 32]);
        let mut forged = Parts::of(CAROL);
        let at = forged.public_key.windows(5).position(|w| w == b"carol").unwrap();
        forged.public_key[at] = b'k';
        let cases = [
            ("ed25519", knock(ALICE)),
            ("ecdsa-p256", knock(BOB)),
            ("ecdsa-p384", knock(ERIN)),
            ("rsa-3072", knock(RITA)),
            ("rsa-4096", knock(RON)),
            ("ed25519 cert", knock(CAROL)),
            ("rsa-3072 cert", knock(fixture!("rita-bare.sig"))),
            ("unknown key", garbage.packet()),
            ("forged cert", forged.packet()),
        ];
        for (what, packet) in cases {
            let n = 200;
            let t = std::time::Instant::now();
            for _ in 0..n {
                let _ = std::hint::black_box(screen(&packet, &signers, &names(), now(), window));
            }
            let screen_us = t.elapsed().as_secs_f64() * 1e6 / f64::from(n);
            let Ok(screened) = screen(&packet, &signers, &names(), now(), window) else {
                println!("{what:>14}: screen {screen_us:7.1} us (refused)");
                continue;
            };
            let t = std::time::Instant::now();
            for _ in 0..n {
                let _ = std::hint::black_box(verify(screened.clone(), now()));
            }
            let verify_us = t.elapsed().as_secs_f64() * 1e6 / f64::from(n);
            let ok = verify(screened, now()).is_ok();
            println!(
                "{what:>14}: screen {screen_us:7.1} us, verify {verify_us:8.1} us ({} bytes, {ok})",
                packet.len()
            );
        }
    }
}
