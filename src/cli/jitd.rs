//! The command line of `jitd`: its clap definition, shared by the binary and by the
//! generated man page.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

use crate::config::DEFAULT_CONFIG_PATH;

/// Just-in-time access daemon: keeps management ports (SSH, RDP, WinRM) closed to new
/// connections with an nftables table of its own, and opens them for one source, for a
/// bounded time, when an authorised local user asks with `jitctl request`.
///
/// Runs in the foreground (systemd Type=notify). Established connections are never cut.
/// Grants are nftables set elements with kernel timeouts: they close even if jitd dies.
#[derive(Debug, Parser)]
#[command(
    version,
    after_help = "Exit status: 0 stopped cleanly, 1 runtime failure (nothing left half-done; for --check-config: the kernel refuses the ruleset), 2 invalid policy or usage.\n\nSignals: SIGTERM/SIGINT stop (see on_stop), SIGHUP re-reads the policy."
)]
pub struct Args {
    /// The JIT policy (TOML).
    #[arg(short, long, value_name = "PATH", default_value = DEFAULT_CONFIG_PATH, env = "JITD_CONFIG")]
    pub config: PathBuf,
    /// Validate the policy, warn about dangerously wide sources, print the nftables
    /// ruleset it would apply and check it with the kernel (nft --check); change nothing.
    #[arg(long, conflicts_with = "unlock")]
    pub check_config: bool,
    /// Remove jitd's lockdown (its nftables table) and exit: opens the protected ports.
    /// Works without a readable or valid policy (it only deletes table inet jitd).
    #[arg(long)]
    pub unlock: bool,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
}

/// The format of jitd's log on stderr.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    /// One line per event, journald-friendly (no timestamps under systemd).
    Human,
    /// One JSON object per event, for log shippers.
    Json,
}
