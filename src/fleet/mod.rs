//! The fleet: `[fleet]` ([`settings`]), the signed fleet request naming hosts and groups
//! ([`request`]), its signed approval ([`approval`]), how a host judges one it reads
//! from etcd ([`judge`]) and the records it writes back ([`records`]), all pure; and
//! the etcd connection jitd and `jitctl fleet` share ([`connect`], the only I/O here).
//! The host's watcher is `src/daemon/fleet/`, the client `src/cli/fleet.rs`;
//! docs/fleet.md has the design.
pub mod approval;
pub mod connect;
pub mod judge;
pub mod records;
pub mod request;
pub mod settings;

/// The SSHSIG namespace of a fleet request: a knock's signature is never a fleet
/// request's and a fleet request's never a knock's.
pub const NAMESPACE: &str = "fleet@jitd";
