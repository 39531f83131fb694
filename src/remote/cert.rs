//! OpenSSH certificates in a knock: decoded once their CA is known, then judged as
//! `ssh-keygen -Y verify` judges them against a `cert-authority` line (the CA's
//! signature, a user certificate, valid at the time given, principals matched against
//! the line's patterns), and stricter where jitd cannot honour what a certificate asks
//! (critical options). Messages never quote the certificate's own text.

use chrono::{DateTime, SecondsFormat, Utc};
use ssh_encoding::Decode;
use ssh_key::{Certificate, Fingerprint};

use super::signers::matches_list;

/// What the audit names of a certificate that signed a knock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// The key id the CA gave it (`ssh-keygen -s ... -I`); the CA's text, escape it.
    pub key_id: String,
    /// Its serial number (`-z`).
    pub serial: u64,
    /// The CA key's SHA-256 fingerprint.
    pub ca_fingerprint: String,
}

impl CertInfo {
    /// As the audit log records it: `key id "..." serial N from CA SHA256:...` (the key
    /// id escaped and capped).
    pub fn describe(&self) -> String {
        format!(
            "key id \"{}\" serial {} from CA {}",
            crate::text::escape_capped(&self.key_id, 100),
            self.serial,
            self.ca_fingerprint
        )
    }
}

/// Decodes a certificate whose structure `sshsig` has walked, and refuses one that
/// ssh-key would read differently from its bytes (its encoding must come back the same).
pub fn decode(blob: &[u8]) -> Result<Certificate, String> {
    let mut reader = blob;
    let cert = Certificate::decode(&mut reader).map_err(|e| match e {
        // ssh-key 0.6 reads no validity beyond i64::MAX, so not OpenSSH's "forever"
        ssh_key::Error::Time => "it never expires (signed without -V): jitd accepts \
                                 certificates with an end"
            .to_string(),
        _ => "the certificate does not decode".to_string(),
    })?;
    if !reader.is_empty() || cert.to_bytes().ok().as_deref() != Some(blob) {
        return Err("the certificate is not in canonical form".into());
    }
    Ok(cert)
}

/// Checks the CA's signature on the certificate (the CA being the one `ca` names). It
/// is judged at a time inside the certificate's own validity, so that its time is
/// judged later, and every later refusal is about a certificate the CA issued.
pub fn issued_by(cert: &Certificate, ca: &Fingerprint) -> Result<(), String> {
    let serial = cert.serial();
    if cert.valid_after() >= cert.valid_before() {
        return Err(format!("serial {serial}: its validity interval is empty"));
    }
    cert.validate_at(cert.valid_after(), [ca])
        .map_err(|_| format!("serial {serial}: the CA's signature on it does not verify"))
}

/// Whether the certificate lets its holder knock at `now`: a user certificate, valid
/// then, without critical options, with principals that one of `lines` (each a
/// `cert-authority` line's principal patterns) allows. Returns those principals.
pub fn authorise(cert: &Certificate, lines: &[Vec<String>], now: DateTime<Utc>) -> Result<Vec<String>, String> {
    let serial = cert.serial();
    if !cert.cert_type().is_user() {
        return Err(format!("serial {serial}: a host certificate, not a user certificate"));
    }
    let at = u64::try_from(now.timestamp()).unwrap_or(0);
    if at < cert.valid_after() {
        return Err(format!(
            "serial {serial}: not valid before {}",
            time(cert.valid_after())
        ));
    }
    if at >= cert.valid_before() {
        return Err(format!("serial {serial}: expired at {}", time(cert.valid_before())));
    }
    if !cert.critical_options().is_empty() {
        return Err(format!(
            "serial {serial}: it carries critical options ({}), which a knock cannot honour",
            critical_names(cert)
        ));
    }
    let all = cert.valid_principals();
    if all.is_empty() {
        return Err(format!("serial {serial}: it names no principal"));
    }
    let mut allowed: Vec<String> = Vec::new();
    for p in all {
        if lines.iter().any(|l| matches_list(p, l)) && !allowed.contains(p) {
            allowed.push(p.clone());
        }
    }
    if allowed.is_empty() {
        return Err(format!(
            "serial {serial}: none of its {} principals is allowed by the cert-authority line",
            all.len()
        ));
    }
    Ok(allowed)
}

/// What the audit names of `cert`, signed by the CA `ca`.
pub fn info(cert: &Certificate, ca: &Fingerprint) -> CertInfo {
    CertInfo {
        key_id: cert.key_id().to_string(),
        serial: cert.serial(),
        ca_fingerprint: ca.to_string(),
    }
}

/// The critical options' names OpenSSH defines; any other is "another".
fn critical_names(cert: &Certificate) -> String {
    let known = ["force-command", "source-address", "verify-required"];
    let names: Vec<&str> = cert
        .critical_options()
        .keys()
        .map(|k| known.iter().find(|n| *n == k).copied().unwrap_or("another"))
        .collect();
    names.join(", ")
}

fn time(secs: u64) -> String {
    i64::try_from(secs)
        .ok()
        .and_then(|s| DateTime::from_timestamp(s, 0))
        .map_or_else(|| secs.to_string(), |t| t.to_rfc3339_opts(SecondsFormat::Secs, true))
}
