//! jitd: just-in-time access to a Linux host's management ports.
//!
//! The daemon keeps the protected ports (SSH, RDP, WinRM by default) shut with an
//! nftables table of its own and opens them for one source, for a bounded time, when an
//! authorised local user asks over a Unix socket. Every grant is a set element with a
//! kernel timeout, so the kernel closes it even if jitd dies; every decision is audited.
//!
//! # Layout
//! - [`domain`]: the shared vocabulary: protocol, transport, port, source prefixes,
//!   grant id, grant key and element, caller and principal. Depends on nothing here.
//! - [`duration`]: `90s` / `1h30m` / `PT3H` parsing.
//! - [`text`]: caller-supplied text made safe to show and export (terminal escapes,
//!   CSV formula neutralisation).
//! - [`accept`]: back-off after failed `accept` calls (socket and metrics listeners).
//! - `fault`: fault injection and timing knobs for tests (debug builds only).
//! - [`remote`]: remote knocks, the pure part: the signed request, `allowed_signers`,
//!   SSHSIG and certificates, a packet's checks, the per-prefix gate, the nonce memory,
//!   `[remote]` (docs/remote.md).
//! - [`fleet`]: fleet requests through etcd: `[fleet]`, the signed request naming hosts
//!   and groups and its approval, a host's judgement of one (pure), and the etcd
//!   connection shared by jitd and jitctl ([`fleet::connect`]) (docs/fleet.md).
//! - [`config`]: the TOML policy, validated into ready-to-use values.
//! - [`grants`]: the live grants and their deadlines, and the connections each admitted
//!   ([`grants::usage`]) (no I/O).
//! - [`identity`]: socket peers resolved to users and groups.
//! - [`policy`]: pure decisions: roles, and whether a request fits the policy.
//! - [`approval`]: the two-person rule's pure part: requests waiting for an approver,
//!   who may decide them, the same person behind two identities.
//! - [`audit`]: the append-only, hash-chained audit log: what a record says (`record`),
//!   writing and rotating it (`log`), reading it back (`read`), the journal's batches and
//!   positions, the chain and its anchor, the refusal limiter, queries, CSV export.
//! - [`metrics`]: Prometheus metrics, opt-in.
//! - [`store`]: the live grants on disk (the checkpoint), for restarts.
//! - [`netif`]: the host's interfaces over rtnetlink.
//! - [`firewall`]: the nftables table and its changes as batches ([`firewall::rules`]),
//!   applied through libnftables ([`firewall::libnft`]) or `nft` ([`firewall::nft`]),
//!   read back over nfnetlink, conntrack, the change monitor.
//! - [`knockd`]: the knock worker, `jitd --knock-worker`: knocks read, screened and
//!   verified in an unprivileged, seccomp-confined process (docs/security/knock-worker.md).
//! - [`health`]: `jitctl doctor`: the judgement (the rest of the ruleset walked for a
//!   protected port, listening services worth protecting) and the probes that gather
//!   its facts (nft, sock_diag, /proc, cgroups) (docs/doctor.md).
//! - [`api`]: the socket protocol ([`api::protocol`]), server and client.
//! - [`cli`]: the command lines of jitd and jitctl (clap), and all that jitctl prints.
//! - [`daemon`]: wires it together: start-up, the committer and the changes it commits,
//!   the doors (socket, knocks, fleet), expiry, drift repairs, signals, sd-notify.
//!
//! One request's walk: `jitctl` ([`api::client`]) → [`api::server`] (peer credentials)
//! → [`daemon`] (routing; the caller via [`identity`]) → the committer in
//! `daemon/commit.rs` ([`policy`], [`grants`]) → the audit writer in `daemon/writer.rs`
//! ([`audit`]) → one nftables batch ([`firewall::rules`], applied by
//! [`firewall::libnft`] or [`firewall::nft`]) → the reply. The steps are listed in
//! [`daemon`]'s documentation.
//!
//! # Dependencies
//! Each module uses only the modules named after its arrow, all listed above it, so
//! there is no cycle; the pure core sits at the top of this list and knows nothing of
//! the effects below it. A test (`tests/integration/layout.rs`) holds the code to it,
//! and finds any import cycle between the files of `src/`.
//!
//! ```text
//! domain, duration, text, accept, fault
//! remote   -> domain, duration, text
//! fleet    -> domain, remote, text
//! config   -> domain, duration, fleet, remote
//! grants   -> domain
//! identity -> domain, grants
//! policy   -> config, domain, duration, fleet
//! approval -> config, domain, grants, policy
//! audit    -> config, domain, text
//! metrics  -> accept, audit, domain
//! store    -> approval, audit, domain, fleet, grants, remote
//! netif
//! firewall -> config, domain, fault, metrics, remote
//! health   -> config, domain, duration, firewall
//! api      -> accept, approval, audit, config, domain, health, metrics, policy, text
//! cli      -> api, approval, audit, config, domain, duration, fleet, health, remote, text
//! knockd   -> domain, remote
//! daemon   -> everything above
//! ```

pub mod accept;
pub mod api;
pub mod approval;
pub mod audit;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod domain;
pub mod duration;
pub(crate) mod fault;
pub mod firewall;
pub mod fleet;
pub mod grants;
pub mod health;
pub mod identity;
pub mod knockd;
pub mod metrics;
pub mod netif;
pub mod policy;
pub mod remote;
pub mod store;
pub mod text;
