//! A knock on the wire, and the checks it goes through, cheapest first: framing and
//! size, the request's grammar, its time window and host, the signing key among the
//! allowed signers, and only then the signature.
//!
//! ```text
//! byte[8]  "JITDKNK1"      magic and version
//! uint16   n               length of REQUEST, big endian
//! byte[n]  REQUEST         the canonical request (UTF-8)
//! byte[m]  SIGNATURE       the SSHSIG blob, binary, the rest of the datagram
//! ```

use chrono::{DateTime, TimeDelta, Utc};
use ssh_encoding::{Decode, Encode, Reader};
use ssh_key::{HashAlg, PublicKey, SshSig};

use super::request::KnockRequest;
use super::signers::Signer;
use super::NAMESPACE;

/// The magic and version a knock starts with.
pub const MAGIC: &[u8; 8] = b"JITDKNK1";
/// The largest knock: one datagram without fragmentation on usual paths.
pub const MAX_PACKET: usize = 1400;

/// Why a knock was refused (never told to the sender; audited).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Not a knock: size, magic, framing or the request's grammar.
    Malformed(String),
    /// Signed too long ago or too far ahead of jitd's clock.
    OutsideWindow { signed: DateTime<Utc> },
    /// For another host.
    OtherHost(String),
    /// A key that no `allowed_signers` line allows here and now.
    UnknownKey(String),
    /// The signature does not verify (or is for another namespace).
    BadSignature(String),
}

/// A knock that passed every check here: the request, who signed it.
#[derive(Debug, Clone)]
pub struct Verified {
    /// The request as signed.
    pub request: KnockRequest,
    /// The principals of the `allowed_signers` line that holds the key.
    pub principals: Vec<String>,
    /// The key's SHA-256 fingerprint, as `ssh-keygen -l` shows it.
    pub fingerprint: String,
}

/// Frames a signed request: `signature` is the SSHSIG as `ssh-keygen -Y sign` writes
/// it (armoured); the packet carries it binary.
pub fn frame(request: &str, armoured_signature: &str) -> Result<Vec<u8>, String> {
    let sig = SshSig::from_pem(armoured_signature).map_err(|e| format!("signature: {e}"))?;
    let mut blob = Vec::new();
    sig.encode(&mut blob).map_err(|e| format!("signature: {e}"))?;
    let n = u16::try_from(request.len()).map_err(|_| "request: too long".to_string())?;
    let mut out = Vec::with_capacity(10 + request.len() + blob.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&n.to_be_bytes());
    out.extend_from_slice(request.as_bytes());
    out.extend_from_slice(&blob);
    if out.len() > MAX_PACKET {
        return Err(format!(
            "the knock is {} bytes, more than {MAX_PACKET}: use a smaller key",
            out.len()
        ));
    }
    Ok(out)
}

/// A knock that passed every cheap check: what remains is the signature.
#[derive(Debug, Clone)]
pub struct Screened {
    /// The request as signed (its nonce is checked before the signature).
    pub request: KnockRequest,
    /// The signing key's fingerprint.
    pub fingerprint: String,
    text: String,
    sig: SshSig,
    signer: Signer,
}

/// The cheap checks of a datagram, against `signers`, for a host called any of
/// `names`, at `now`, accepting signatures made within `window` of it: size, framing,
/// grammar, time, host, a known key. No signature is verified here.
pub fn screen(
    packet: &[u8],
    signers: &[Signer],
    names: &[String],
    now: DateTime<Utc>,
    window: TimeDelta,
) -> Result<Screened, Refusal> {
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
    let request = KnockRequest::parse(text).map_err(Refusal::Malformed)?;
    if (request.time - now).abs() > window {
        return Err(Refusal::OutsideWindow { signed: request.time });
    }
    if !names.iter().any(|n| n.eq_ignore_ascii_case(&request.host)) {
        return Err(Refusal::OtherHost(request.host));
    }
    let mut reader = blob;
    let sig = SshSig::decode(&mut reader).map_err(|e| Refusal::Malformed(format!("signature: {e}")))?;
    if !reader.is_finished() {
        return Err(malformed("bytes after the signature"));
    }
    let key = PublicKey::from(sig.public_key().clone());
    let fingerprint = key.fingerprint(HashAlg::Sha256).to_string();
    let signer = signers
        .iter()
        .find(|s| !s.cert_authority && s.key.key_data() == key.key_data() && s.allows(NAMESPACE, now))
        .ok_or_else(|| Refusal::UnknownKey(fingerprint.clone()))?
        .clone();
    Ok(Screened {
        request,
        fingerprint,
        text: text.to_string(),
        sig,
        signer,
    })
}

/// Verifies the signature of a screened knock (the costly part).
pub fn verify(screened: Screened, _now: DateTime<Utc>) -> Result<Verified, Refusal> {
    let Screened {
        request,
        fingerprint,
        text,
        sig,
        signer,
    } = screened;
    signer
        .key
        .verify(NAMESPACE, text.as_bytes(), &sig)
        .map_err(|e| Refusal::BadSignature(format!("{fingerprint}: {e}")))?;
    Ok(Verified {
        request,
        principals: signer.principals,
        fingerprint,
    })
}

/// Checks a datagram: [`screen`], then [`verify`]. Replay (the nonce) is the caller's
/// business: it holds the memory of nonces seen.
pub fn check(
    packet: &[u8],
    signers: &[Signer],
    names: &[String],
    now: DateTime<Utc>,
    window: TimeDelta,
) -> Result<Verified, Refusal> {
    verify(screen(packet, signers, names, now, window)?, now)
}

impl Refusal {
    /// The refusal's code in audit records and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::Malformed(_) => "malformed",
            Refusal::OutsideWindow { .. } => "outside_window",
            Refusal::OtherHost(_) => "other_host",
            Refusal::UnknownKey(_) => "unknown_key",
            Refusal::BadSignature(_) => "bad_signature",
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Malformed(why) => write!(f, "not a well-formed knock: {why}"),
            Refusal::OutsideWindow { signed } => write!(f, "signed at {signed}, outside the time window"),
            Refusal::OtherHost(host) => write!(f, "for another host: {host}"),
            Refusal::UnknownKey(fp) => write!(f, "key {fp} is not in allowed_signers (for knocks, now)"),
            Refusal::BadSignature(why) => write!(f, "the signature does not verify: {why}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote::signers;

    const REQUEST: &str = include_str!("../../tests/fixtures/knock/request");
    const ALICE: &str = include_str!("../../tests/fixtures/knock/alice.sig");
    const BOB: &str = include_str!("../../tests/fixtures/knock/bob.sig");
    const MALLORY: &str = include_str!("../../tests/fixtures/knock/mallory.sig");
    const ALICE_GIT: &str = include_str!("../../tests/fixtures/knock/alice-git.sig");
    const SIGNERS: &str = include_str!("../../tests/fixtures/knock/allowed_signers");

    fn now() -> DateTime<Utc> {
        "2026-11-26T13:05:10Z".parse().unwrap()
    }

    fn checked(packet: &[u8], now: DateTime<Utc>) -> Result<Verified, Refusal> {
        let signers = signers::parse(SIGNERS).unwrap();
        check(
            packet,
            &signers,
            &["web1.example.org".into()],
            now,
            TimeDelta::seconds(30),
        )
    }

    #[test]
    fn signatures_made_by_ssh_keygen_verify_for_ed25519_and_ecdsa() {
        for (sig, who) in [(ALICE, "alice"), (BOB, "bob")] {
            let packet = frame(REQUEST, sig).unwrap();
            assert!(packet.len() < 600, "{} bytes", packet.len());
            let v = checked(&packet, now()).unwrap();
            assert_eq!(v.principals, [who]);
            assert!(v.fingerprint.starts_with("SHA256:"), "{}", v.fingerprint);
            assert_eq!(v.request.ports, vec![22]);
        }
    }

    #[test]
    fn a_changed_request_an_unknown_key_or_another_namespace_is_refused() {
        let mut packet = frame(REQUEST, ALICE).unwrap();
        let at = 10 + REQUEST.find("3600").unwrap();
        packet[at] = b'9'; // "duration 9600": still canonical, no longer what was signed
        assert!(matches!(checked(&packet, now()), Err(Refusal::BadSignature(_))));
        let packet = frame(REQUEST, MALLORY).unwrap();
        assert!(matches!(checked(&packet, now()), Err(Refusal::UnknownKey(_))));
        let packet = frame(REQUEST, ALICE_GIT).unwrap();
        assert!(matches!(checked(&packet, now()), Err(Refusal::BadSignature(_))));
    }

    #[test]
    fn time_host_and_framing_are_checked_before_the_signature() {
        let packet = frame(REQUEST, ALICE).unwrap();
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
        assert!(matches!(checked(&truncated, now()), Err(Refusal::Malformed(_))));
        let mut trailing = packet.clone();
        trailing.push(0);
        assert_eq!(
            checked(&trailing, now()).unwrap_err(),
            Refusal::Malformed("bytes after the signature".into())
        );
    }
}
