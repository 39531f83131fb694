//! Remote knocks, the pure part: the signed request's canonical form
//! ([`request`]), OpenSSH's `allowed_signers` ([`signers`]), the checks a packet goes
//! through, cheap ones first ([`packet`]: `screen`, then `verify`), the SSHSIG blob and
//! certificate structure walked strictly ([`sshsig`], [`wire`]) and certificates judged
//! ([`cert`]); the per-source gate ([`gate`]), the nonce memory ([`nonces`]) and the
//! `[remote]` policy section ([`settings`]); the messages between jitd and its
//! unprivileged knock worker ([`channel`]). Nothing here does I/O but reading
//! `allowed_signers`; the worker process is `src/knockd/`, the daemon's side is `src/daemon/knock.rs`, the client's
//! `src/cli/knock.rs`, and docs/remote.md has the design.

pub mod cert;
pub mod channel;
pub mod gate;
pub mod nonces;
pub mod packet;
pub mod request;
pub mod settings;
pub mod signers;
pub mod sshsig;
pub mod wire;

/// The SSHSIG namespace of a knock: a signature made for git or for file signing
/// cannot be replayed as a knock.
pub const NAMESPACE: &str = "knock@jitd";

/// A knock test fixture (`tests/fixtures/knock/NAME`) as text, for the unit tests of
/// this module's files.
#[cfg(test)]
macro_rules! knock_fixture {
    ($name:literal) => {
        include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/knock/", $name))
    };
}
#[cfg(test)]
pub(crate) use knock_fixture;
