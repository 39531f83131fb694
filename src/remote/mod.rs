//! Remote knocks (issue #13), the pure part: the signed request's canonical form
//! ([`request`]), OpenSSH's `allowed_signers` ([`signers`]), the checks a packet goes
//! through, cheap ones first ([`packet`]: `screen`, then `verify`), the SSHSIG blob and
//! certificate structure walked strictly ([`sshsig`], [`wire`]) and certificates judged
//! ([`cert`]). Nothing here does I/O: docs/remote.md has the design.

pub mod cert;
pub mod packet;
pub mod request;
pub mod signers;
pub mod sshsig;
pub mod wire;

/// The SSHSIG namespace of a knock: a signature made for git or for file signing
/// cannot be replayed as a knock.
pub const NAMESPACE: &str = "knock@jitd";
