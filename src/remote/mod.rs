//! Remote knocks (issue #13), the pure part so far: the signed request's canonical form
//! ([`request`]), OpenSSH's `allowed_signers` ([`signers`]) and the checks a packet
//! goes through, cheapest first ([`packet`]). Nothing here does I/O, and nothing is
//! wired into the daemon yet (no listener): docs/remote.md has the design.

pub mod gate;
pub mod nonces;
pub mod packet;
pub mod request;
pub mod settings;
pub mod signers;

/// The SSHSIG namespace of a knock: a signature made for git or for file signing
/// cannot be replayed as a knock.
pub const NAMESPACE: &str = "knock@jitd";
