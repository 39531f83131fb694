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
//! - [`config`]: the TOML policy, validated into ready-to-use values.
//! - [`duration`]: `90s` / `1h30m` / `PT3H` parsing.
//! - [`policy`]: pure decisions: roles, and whether a request fits the policy.
//! - [`grants`]: the live grants and their deadlines, and the connections each admitted
//!   ([`grants::usage`]) (no I/O).
//! - [`approval`]: the two-person rule's pure part: requests waiting for an approver,
//!   who may decide them, the same person behind two identities.
//! - [`firewall`]: the nftables table and its changes as batches ([`firewall::rules`]),
//!   applied by [`firewall::nft`].
//! - [`audit`]: the append-only audit log, queries, CSV export.
//! - [`api`]: the socket protocol ([`api::protocol`]), server and client.
//! - [`identity`]: socket peers resolved to users and groups.
//! - [`metrics`]: Prometheus metrics, opt-in.
//! - [`accept`]: back-off after failed `accept` calls (socket and metrics listeners).
//! - [`netif`]: the host's interfaces over rtnetlink.
//! - [`remote`]: remote knocks, the pure part so far: the signed request, `allowed_signers`,
//!   a packet's checks (docs/remote.md).
//! - [`knockd`]: the knock worker, `jitd --knock-worker`: knocks read, screened and
//!   verified in an unprivileged, seccomp-confined process (docs/security.md).
//! - [`fleet`]: fleet requests through etcd, the pure part: `[fleet]`, the signed
//!   request naming hosts and groups, a host's judgement of one (docs/fleet.md).
//! - [`health`]: `jitctl doctor`: the judgement (the rest of the ruleset walked for a
//!   protected port, listening services worth protecting) and the probes that gather
//!   its facts (nft, sock_diag, /proc, cgroups) (docs/doctor.md).
//! - [`store`]: the live grants on disk, for restarts.
//! - [`text`]: caller-supplied text made safe to show and export (terminal escapes,
//!   CSV formula neutralisation).
//! - [`cli`]: the command lines of jitd and jitctl (clap).
//! - [`daemon`]: wires it together: start-up, requests, expiry, signals, sd-notify.
//!
//! One request's walk: `jitctl` ([`api::client`]) → [`api::server`] (peer credentials)
//! → [`daemon`] (routing; the caller via [`identity`]) → the committer in
//! `daemon/commit.rs` ([`policy`], [`grants`]) → the audit writer in `daemon/writer.rs`
//! ([`audit`]) → one nftables batch ([`firewall::rules`], applied by
//! [`firewall::libnft`] or [`firewall::nft`]) → the reply. The steps are listed in
//! [`daemon`]'s documentation.
//!
//! # Dependencies
//! The pure core sits at the bottom and knows nothing of the effects above it:
//!
//! ```text
//! domain                                   (nothing)
//! duration, text, accept                   (nothing)
//! config   -> domain, duration             (settings types: Rotation, Limits live here)
//! policy   -> config, domain, duration     (pure decisions)
//! grants   -> domain                       (pure bookkeeping)
//! approval -> config, domain, policy     (pending requests, pure)
//! identity -> domain                       (user and group look-ups)
//! audit    -> config, domain, text         (the log on disk)
//! store    -> approval, audit, domain, grants (grants.json, replay)
//! firewall -> config, domain, metrics      (nftables, conntrack, netlink)
//! fleet    -> domain, remote                (pure; config holds its settings)
//! knockd   -> remote                        (the knock worker process and its sandbox)
//! health   -> config, domain, duration, firewall (judgement pure; probe/ has the effects)
//! api      -> approval, audit, config, domain, health, metrics
//! daemon   -> everything above
//! ```
//!

pub mod accept;
pub mod api;
pub mod approval;
pub mod audit;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod domain;
pub mod duration;
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
