//! The narrow channel between jitd and its knock worker (`jitd --knock-worker`, see
//! `src/knockd/`): one message per `SOCK_SEQPACKET` datagram, JSON with unknown fields
//! refused, at most [`MAX_MESSAGE`] bytes. Pure: the types, their encoding, and the
//! parent's re-check of what the worker says ([`accept`]), which trusts the worker for
//! one thing only, that the signature verified.
//!
//! jitd → worker: [`ToWorker::Settings`], then its signers one per
//! [`ToWorker::Signer`] (an `allowed_signers` file can be larger than one datagram).
//! worker → jitd: [`FromWorker::Ready`] once sandboxed, then a [`FromWorker::Verified`]
//! or [`FromWorker::Refused`] per knock that got that far.

use std::net::SocketAddr;

use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};
use ssh_key::PublicKey;

use super::cert::CertInfo;
use super::packet::{Refusal, Verified};
use super::request::KnockRequest;
use super::signers::Signer;
use super::NAMESPACE;

/// The largest message either side sends or accepts.
pub const MAX_MESSAGE: usize = 64 * 1024;
/// The most principals a verified knock may name.
const MAX_PRINCIPALS: usize = 64;
/// The longest principal, fingerprint or certificate key id accepted.
const MAX_NAME: usize = 256;
/// The longest refusal reason accepted (the audit caps it again).
const MAX_REASON: usize = 1024;

/// What jitd tells the worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum ToWorker {
    /// The knock settings in force; the next `signers` messages are its signers.
    /// `enabled: false` (`[remote]` removed by a reload): drop every knock unread.
    Settings {
        /// Knocks are taken.
        enabled: bool,
        /// The names a knock may give this host.
        names: Vec<String>,
        /// `remote.window`, in seconds.
        window_secs: u64,
        /// `remote.ipv6_prefix`.
        prefix6: u8,
        /// How many [`ToWorker::Signer`] messages follow.
        signers: usize,
    },
    /// One `allowed_signers` line, as jitd read it.
    Signer(SignerLine),
}

/// One `allowed_signers` line as data: the worker cannot read the file (nor the local
/// time zone its times were read in).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignerLine {
    /// [`Signer::principals`].
    pub principals: Vec<String>,
    /// [`Signer::cert_authority`].
    pub cert_authority: bool,
    /// [`Signer::namespaces`].
    pub namespaces: Option<Vec<String>>,
    /// [`Signer::valid_after`].
    pub valid_after: Option<DateTime<Utc>>,
    /// [`Signer::valid_before`].
    pub valid_before: Option<DateTime<Utc>>,
    /// The key, OpenSSH's one-line form.
    pub key: String,
}

impl SignerLine {
    /// A line as jitd read it.
    pub fn of(s: &Signer) -> SignerLine {
        SignerLine {
            principals: s.principals.clone(),
            cert_authority: s.cert_authority,
            namespaces: s.namespaces.clone(),
            valid_after: s.valid_after,
            valid_before: s.valid_before,
            key: s.key.to_openssh().unwrap_or_default(),
        }
    }

    /// The line again, in the worker.
    pub fn signer(self) -> Result<Signer, String> {
        let key = PublicKey::from_openssh(&self.key).map_err(|e| format!("signer key: {e}"))?;
        Signer::from_parts(
            self.principals,
            self.cert_authority,
            self.namespaces,
            (self.valid_after, self.valid_before),
            key,
        )
    }
}

/// What the worker tells jitd.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum FromWorker {
    /// The worker holds no privileges and its system call filter is in force.
    Ready,
    /// A knock whose signature verified.
    Verified(VerifiedKnock),
    /// A knock refused before or at its signature check.
    Refused {
        /// Where it came from.
        peer: SocketAddr,
        /// [`Refusal::code`], or `rate_limited`, `busy`, `replay`.
        code: String,
        /// A sentence for the audit log.
        reason: String,
    },
}

/// A verified knock on the wire: the request in its signed canonical text, who signed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifiedKnock {
    /// Where it came from.
    pub peer: SocketAddr,
    /// The request, exactly as signed.
    pub request: String,
    /// [`Verified::principals`].
    pub principals: Vec<String>,
    /// [`Verified::fingerprint`].
    pub fingerprint: String,
    /// The certificate that signed: key id, serial, CA fingerprint.
    pub certificate: Option<(String, u64, String)>,
}

impl VerifiedKnock {
    /// A knock [`super::packet::verify`] passed, from `peer`.
    pub fn of(v: &Verified, peer: SocketAddr) -> VerifiedKnock {
        VerifiedKnock {
            peer,
            request: v.request.encode(),
            principals: v.principals.clone(),
            fingerprint: v.fingerprint.clone(),
            certificate: v
                .certificate
                .as_ref()
                .map(|c| (c.key_id.clone(), c.serial, c.ca_fingerprint.clone())),
        }
    }
}

/// The refusal codes a worker may report (anything else is a broken worker).
pub const REFUSAL_CODES: &[&str] = &[
    "malformed",
    "outside_window",
    "other_host",
    "unknown_key",
    "bad_signature",
    "bad_certificate",
    "rate_limited",
    "busy",
    "replay",
];

/// A message as sent.
pub fn encode<T: Serialize>(message: &T) -> Vec<u8> {
    serde_json::to_vec(message).expect("channel messages always serialise")
}

/// A message as received: at most [`MAX_MESSAGE`] bytes, exactly one of `T`.
pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, String> {
    if bytes.len() > MAX_MESSAGE {
        return Err(format!("a message of more than {MAX_MESSAGE} bytes"));
    }
    serde_json::from_slice(bytes).map_err(|e| format!("not a message: {e}"))
}

/// A refusal the worker reported, re-checked: a known code and a bounded reason.
pub fn refusal_code(code: &str, reason: &str) -> Result<&'static str, String> {
    if reason.len() > MAX_REASON {
        return Err(format!("a refusal reason of {} bytes", reason.len()));
    }
    REFUSAL_CODES
        .iter()
        .find(|c| **c == code)
        .copied()
        .ok_or_else(|| "an unknown refusal code".to_string())
}

/// Why jitd did not take a verified knock the worker reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// What no honest worker sends: a request not in canonical form, values out of
    /// bounds. The worker is to be killed.
    Broken(String),
    /// What an honest worker may send when jitd's settings changed meanwhile (a signer
    /// removed, the window passed): the knock is refused.
    Refused(Refusal),
}

/// A verified knock the worker reported, re-checked by jitd with its own settings
/// (`signers`, `names`, `window`) at `now`: the request's canonical grammar, its host
/// and time, and that its signer is one `signers` allows here and now with the
/// principals it claims (for a key, the principals of its lines, recomputed; for a
/// certificate, principals its CA's lines allow). Only the signature itself is taken
/// on the worker's word.
pub fn accept(
    knock: VerifiedKnock,
    signers: &[Signer],
    names: &[String],
    now: DateTime<Utc>,
    window: TimeDelta,
) -> Result<Verified, Rejection> {
    let broken = |why: &str| Rejection::Broken(why.to_string());
    let request = KnockRequest::parse(&knock.request).map_err(Rejection::Broken)?;
    if (request.time - now).abs() > window {
        return Err(Rejection::Refused(Refusal::OutsideWindow { signed: request.time }));
    }
    if !names.iter().any(|n| n.eq_ignore_ascii_case(&request.host)) {
        return Err(Rejection::Refused(Refusal::OtherHost(request.host)));
    }
    let too_long = |s: &String| s.is_empty() || s.len() > MAX_NAME;
    if knock.principals.is_empty()
        || knock.principals.len() > MAX_PRINCIPALS
        || knock.principals.iter().any(too_long)
        || too_long(&knock.fingerprint)
    {
        return Err(broken("principals or fingerprint out of bounds"));
    }
    let (principals, certificate) = match knock.certificate {
        None => (key_principals(&knock.fingerprint, signers, now)?, None),
        Some((key_id, serial, ca_fingerprint)) => {
            if key_id.len() > MAX_NAME {
                return Err(broken("certificate key id out of bounds"));
            }
            let lines: Vec<&Signer> = signers
                .iter()
                .filter(|s| s.cert_authority && fingerprint(s) == ca_fingerprint && s.allows(NAMESPACE, now))
                .collect();
            if lines.is_empty() {
                let why = format!("CA {ca_fingerprint}: no cert-authority line allows it here now");
                return Err(Rejection::Refused(Refusal::BadCertificate(why)));
            }
            if !knock
                .principals
                .iter()
                .all(|p| lines.iter().any(|l| l.allows_principal(p)))
            {
                let why = "a principal its CA's lines do not allow".to_string();
                return Err(Rejection::Refused(Refusal::BadCertificate(why)));
            }
            let info = CertInfo {
                key_id,
                serial,
                ca_fingerprint,
            };
            (knock.principals, Some(info))
        }
    };
    Ok(Verified {
        request,
        principals,
        fingerprint: knock.fingerprint,
        certificate,
    })
}

/// The principals of the key lines (not `cert-authority`) with this fingerprint that
/// allow a knock at `now`, as [`super::packet::screen`] would gather them.
fn key_principals(fp: &str, signers: &[Signer], now: DateTime<Utc>) -> Result<Vec<String>, Rejection> {
    let mut principals: Vec<String> = Vec::new();
    let mut found = false;
    for s in signers
        .iter()
        .filter(|s| !s.cert_authority && fingerprint(s) == fp && s.allows(NAMESPACE, now))
    {
        found = true;
        for p in &s.principals {
            if !principals.contains(p) {
                principals.push(p.clone());
            }
        }
    }
    if !found {
        return Err(Rejection::Refused(Refusal::UnknownKey(fp.to_string())));
    }
    Ok(principals)
}

fn fingerprint(s: &Signer) -> String {
    s.key.fingerprint(ssh_key::HashAlg::Sha256).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote::{packet, signers};

    use crate::remote::knock_fixture as fixture;
    const REQUEST: &str = fixture!("request");
    const SIGNERS: &str = fixture!("allowed_signers");

    fn now() -> DateTime<Utc> {
        "2026-11-26T13:05:10Z".parse().unwrap()
    }

    fn names() -> Vec<String> {
        vec!["web1.example.org".into()]
    }

    fn peer() -> SocketAddr {
        "10.0.0.9:4000".parse().unwrap()
    }

    /// alice's real knock, verified as the worker verifies it, then on the wire.
    fn alice() -> (VerifiedKnock, Vec<Signer>) {
        let signers = signers::parse(SIGNERS).unwrap();
        let packet = packet::frame(REQUEST, fixture!("alice.sig")).unwrap();
        let v = packet::check(&packet, &signers, &names(), now(), TimeDelta::seconds(30)).unwrap();
        (VerifiedKnock::of(&v, peer()), signers)
    }

    fn accepted(knock: VerifiedKnock, signers: &[Signer]) -> Result<Verified, Rejection> {
        accept(knock, signers, &names(), now(), TimeDelta::seconds(30))
    }

    #[test]
    fn a_verified_knock_crosses_the_channel_and_is_accepted() {
        let (knock, signers) = alice();
        let bytes = encode(&FromWorker::Verified(knock.clone()));
        assert_eq!(
            decode::<FromWorker>(&bytes).unwrap(),
            FromWorker::Verified(knock.clone())
        );
        let v = accepted(knock, &signers).unwrap();
        assert_eq!(v.principals, ["alice"]);
        assert_eq!(v.request.encode(), REQUEST);
    }

    #[test]
    fn signers_cross_the_channel_whole() {
        for s in signers::parse(SIGNERS).unwrap() {
            let line = SignerLine::of(&s);
            let back = decode::<ToWorker>(&encode(&ToWorker::Signer(line.clone()))).unwrap();
            let ToWorker::Signer(back) = back else { panic!() };
            let again = back.signer().unwrap();
            assert_eq!(again.wire(), s.wire());
            assert_eq!(
                (again.principals, again.cert_authority, again.namespaces),
                (s.principals, s.cert_authority, s.namespaces)
            );
            assert_eq!((again.valid_after, again.valid_before), (s.valid_after, s.valid_before));
        }
    }

    #[test]
    fn the_worker_is_believed_only_about_the_signature() {
        let (knock, signers) = alice();
        // principals it invents are replaced by those of the key's lines
        let mut k = knock.clone();
        k.principals = vec!["root".into()];
        assert_eq!(accepted(k, &signers).unwrap().principals, ["alice"]);
        // a key no line allows
        let mut k = knock.clone();
        k.fingerprint = "SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA".into();
        assert!(matches!(
            accepted(k, &signers),
            Err(Rejection::Refused(Refusal::UnknownKey(_)))
        ));
        // a certificate from a CA no line allows
        let mut k = knock.clone();
        k.certificate = Some(("id".into(), 1, knock.fingerprint.clone()));
        assert!(matches!(
            accepted(k, &signers),
            Err(Rejection::Refused(Refusal::BadCertificate(_)))
        ));
        // another host, outside the window
        let other = accept(knock.clone(), &signers, &["web2".into()], now(), TimeDelta::seconds(30));
        assert!(matches!(other, Err(Rejection::Refused(Refusal::OtherHost(_)))));
        let later = now() + TimeDelta::hours(1);
        let stale = accept(knock.clone(), &signers, &names(), later, TimeDelta::seconds(30));
        assert!(matches!(stale, Err(Rejection::Refused(Refusal::OutsideWindow { .. }))));
        // what no honest worker sends
        let mut k = knock.clone();
        k.request = k.request.replacen("host ", "host  ", 1);
        assert!(matches!(accepted(k, &signers), Err(Rejection::Broken(_))));
        let mut k = knock;
        k.principals = vec!["x".repeat(MAX_NAME + 1)];
        assert!(matches!(accepted(k, &signers), Err(Rejection::Broken(_))));
    }

    #[test]
    fn messages_out_of_bounds_are_refused() {
        assert!(decode::<FromWorker>(&vec![b' '; MAX_MESSAGE + 1]).is_err());
        assert!(decode::<FromWorker>(br#"{"ready":null,"x":1}"#).is_err());
        assert!(decode::<FromWorker>(br#""ready""#).is_ok());
        assert_eq!(refusal_code("busy", "queue full"), Ok("busy"));
        assert!(refusal_code("approved", "").is_err());
        assert!(refusal_code("busy", &"x".repeat(MAX_REASON + 1)).is_err());
    }
}
