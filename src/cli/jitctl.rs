//! The command line of `jitctl`: its clap definition, shared by the binary and by the
//! generated man pages and shell completions.

use std::path::PathBuf;

use chrono::{DateTime, NaiveDate, Utc};
use clap::{Parser, Subcommand, ValueEnum};

use crate::config::DEFAULT_SOCKET_PATH;

/// Ask jitd for just-in-time access to this host's management ports, see what is open,
/// and read the audit trail.
///
/// jitd knows who you are from the socket (your uid and groups); what you may do comes
/// from the [access] section of its policy. From another machine, `jitctl knock` asks a
/// host's jitd with one UDP packet signed by your SSH key.
#[derive(Debug, Parser)]
#[command(
    version,
    after_help = "Exit status: 0 done, 1 refused by jitd (the reason is printed; for knock: the port did not open in time), 2 usage or connection error. Request: 1 also when denied or not approved in time."
)]
pub struct Cli {
    /// jitd's control socket.
    #[arg(long, global = true, value_name = "PATH", default_value = DEFAULT_SOCKET_PATH, env = "JITD_SOCKET")]
    pub socket: PathBuf,
    /// Print the result as JSON (for scripts) instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// jitctl's commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show the protected ports, the live grants (with the connections each admitted),
    /// and recent use of each port.
    Status,
    /// Open ports for a source address or prefix, for a bounded time.
    #[command(
        after_help = "Examples:\n  jitctl request --port 22 --source 203.0.113.7 --duration 2h --justification \"ticket 4711\"\n  jitctl request --source 198.51.100.0/24 --until 2026-12-01T17:00:00Z\n  jitctl request --duration 30m        # inside an SSH session: your SSH client's address, every protected port\n\nA port whose policy says approvals = 1 opens only once someone else with the approver role runs `jitctl approve ID`: jitctl waits for the decision, printing a progress line, and exits 0 when approved, 1 when denied or not approved in time (with --no-wait it prints the request id and exits 0)."
    )]
    Request {
        /// Port to open (repeat for several); default: every protected port.
        #[arg(short, long = "port", value_name = "PORT")]
        ports: Vec<u16>,
        /// Address or CIDR prefix, IPv4 or IPv6; default inside SSH: the client address from SSH_CONNECTION.
        #[arg(short, long)]
        source: Option<String>,
        /// How long: "90s", "2h", "1h30m" or ISO 8601 "PT2H".
        #[arg(short, long, value_parser = parse_duration, conflicts_with = "until", required_unless_present = "until")]
        duration: Option<std::time::Duration>,
        /// Until when: RFC 3339, e.g. 2026-12-01T17:00:00Z.
        #[arg(short, long, value_parser = parse_time)]
        until: Option<DateTime<Utc>>,
        /// Why you need access (recorded in the audit log).
        #[arg(short, long)]
        justification: Option<String>,
        /// When a port needs an approval: print the pending request's id and exit (0)
        /// instead of waiting for the decision.
        #[arg(long)]
        no_wait: bool,
    },
    /// Approve someone else's request that waits for approval (the approver role); it
    /// opens for the duration asked, counted from now.
    Approve {
        /// The request id (from `jitctl status`).
        id: u64,
    },
    /// Turn down a request that waits for approval (the approver role, or its own
    /// requester withdrawing it).
    Deny {
        /// The request id (from `jitctl status`).
        id: u64,
        /// Why (recorded in the audit log and shown to the requester).
        #[arg(short, long)]
        reason: String,
    },
    /// End grants early: by id, or every grant of a source (optionally one port).
    Revoke {
        /// The grant id (from `jitctl status`).
        #[arg(required_unless_present = "source", conflicts_with = "source")]
        id: Option<u64>,
        /// Revoke the grants of this address or prefix.
        #[arg(short, long)]
        source: Option<String>,
        /// With --source: only the grant on this port.
        #[arg(short, long, requires = "source")]
        port: Option<u16>,
        /// Also cut the sessions the grants admitted (their conntrack entries); by
        /// default established sessions outlive the grant.
        #[arg(long)]
        terminate: bool,
    },
    /// Read the audit log: every approval, denial (with the reason), expiry and revocation.
    #[command(args_conflicts_with_subcommands = true)]
    Audit {
        /// `verify` instead of reading the records.
        #[command(subcommand)]
        check: Option<AuditCheck>,
        /// From: a duration back from now ("7d", "12h") or a time (RFC 3339 or YYYY-MM-DD).
        #[arg(long, value_parser = parse_since)]
        since: Option<DateTime<Utc>>,
        /// Up to: a time (RFC 3339 or YYYY-MM-DD).
        #[arg(long, value_parser = parse_time)]
        until: Option<DateTime<Utc>>,
        /// Only records of this user (name or uid).
        #[arg(long)]
        user: Option<String>,
        /// Only records concerning this port.
        #[arg(long)]
        port: Option<u16>,
        /// Only grants that ended without admitting a connection ("granted, never
        /// used"): the records of their end (expiry, revocation, replacement).
        #[arg(long)]
        unused: bool,
        /// Output format; --json is the same as --format json.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
        /// Show one page of at most N records (jitd caps a page at 10000) and the
        /// cursor to go on from; default: every record, fetched page by page.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        limit: Option<u64>,
        /// Go on after the page that printed this cursor.
        #[arg(long, value_name = "CURSOR")]
        cursor: Option<String>,
    },
    /// Make jitd re-read its policy (admins only); an invalid policy changes nothing.
    Reload,
    /// Is this host healthy? Checks jitd, its table, the drift monitor, the audit log,
    /// each protected port (does anything listen; would another table drop a granted
    /// connection), and recommends management services to protect, with the lines to
    /// add to jitd.toml (viewer role).
    #[command(
        after_help = "Exit status: 0 healthy, 1 unhealthy (a FAIL line; also when jitd is not running), 2 could not tell (no access to the socket, no viewer role, no answer).\nWith --json, the report for monitoring systems (docs/doctor.md)."
    )]
    Doctor,
    /// Ask a host from anywhere: send one UDP packet, signed with your SSH key, that
    /// asks the host's jitd to open ports for the address it comes from.
    #[command(
        after_help = "The packet is signed by `ssh-keygen -Y sign -n knock@jitd`: whatever ssh itself would use works (ssh-agent, a key file, a FIDO2 security key, an OpenSSH certificate). Key: --key, else the host's `key` in hosts.toml, else ssh-agent's first key, else ~/.ssh/id_ed25519, id_ecdsa, id_ecdsa_sk, id_ed25519_sk, id_rsa.\n\nThe host never answers a knock (refused or accepted): jitctl waits for the first TCP port to accept a connection.\n\nDefaults per host: $XDG_CONFIG_HOME/jitctl/hosts.toml (~/.config/jitctl/hosts.toml); flags override it.\n\nExit status: 0 the port opened (or the knock was sent, with --no-wait), 1 it did not open in time, 2 usage or local error.\n\nExamples:\n  jitctl knock web1.example.org --port 22 --duration 1h --justification \"INC-1234\"\n  jitctl knock [2001:db8::7]:62223 --port 3389 --until 2026-12-01T17:00:00Z --key ~/.ssh/id_ed25519_sk.pub\n  jitctl knock 192.0.2.7 --port 22 --duration 30m --source 198.51.100.7 --no-wait"
    )]
    Knock(KnockArgs),
    /// Ask many hosts at once through etcd: a request signed with your SSH key opens the
    /// hosts and groups it names, each host judging it by its own policy.
    #[command(
        after_help = "etcd's address and credentials: the flags, else ETCDCTL_ENDPOINTS, ETCDCTL_CACERT, ETCDCTL_CERT, ETCDCTL_KEY, else $XDG_CONFIG_HOME/jitctl/fleet.toml (~/.config/jitctl/fleet.toml: endpoints, ca, cert, key, prefix).\n\nExit status: 0 every selected host approved, 1 a host denied or did not answer in time, 2 usage or connection error.\n\nExamples:\n  jitctl fleet request --hosts group:web --port 22 --source 198.51.100.7 --duration 1h -j INC-1234\n  jitctl fleet status\n  jitctl fleet revoke 5f2b0c9e5f2b0c9e5f2b0c9e5f2b0c9e"
    )]
    Fleet(FleetArgs),
}

/// `jitctl fleet`'s arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct FleetArgs {
    /// etcd's client URLs, comma-separated.
    #[arg(long, value_name = "URLS")]
    pub endpoints: Option<String>,
    /// The CA of etcd's server certificate (PEM).
    #[arg(long, value_name = "FILE")]
    pub cacert: Option<PathBuf>,
    /// Your etcd client certificate (PEM).
    #[arg(long, value_name = "FILE")]
    pub cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, value_name = "FILE")]
    pub etcd_key: Option<PathBuf>,
    /// The fleet's key prefix (default /jitd/).
    #[arg(long, value_name = "PREFIX")]
    pub prefix: Option<String>,
    /// The fleet's id, signed into requests and approvals: the hosts' `[fleet] id`
    /// (default: `id` in ~/.config/jitctl/fleet.toml, else the prefix).
    #[arg(long, value_name = "ID")]
    pub fleet_id: Option<String>,
    /// What to do with the fleet.
    #[command(subcommand)]
    pub command: FleetCommand,
}

/// What `jitctl fleet` does.
#[derive(Debug, Clone, Subcommand)]
pub enum FleetCommand {
    /// Sign and write a request, wait for each selected host's answer, print a table.
    Request {
        /// Hosts and groups: NAME or group:NAME (repeat, or comma-separated).
        #[arg(long, required = true, value_name = "HOSTS")]
        hosts: Vec<String>,
        /// Port to open (repeat for several).
        #[arg(short, long = "port", required = true, value_name = "PORT")]
        ports: Vec<u16>,
        /// The address or prefix to open for (required: hosts never see where you are).
        #[arg(short, long)]
        source: String,
        /// How long: "90s", "2h", "1h30m" or ISO 8601 "PT2H" (the etcd lease's TTL).
        #[arg(short, long, value_parser = parse_duration)]
        duration: std::time::Duration,
        /// Why you need access (recorded in each host's audit log).
        #[arg(short, long)]
        justification: Option<String>,
        /// The SSH key to sign with (as for `jitctl knock --key`).
        #[arg(short, long, value_name = "FILE")]
        key: Option<PathBuf>,
        /// How long to wait for the hosts' answers.
        #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "10s")]
        wait: std::time::Duration,
    },
    /// Hosts (alive, version, health), live requests and where they are open.
    Status,
    /// Approve a request that waits for an approver on some hosts (ports with
    /// `approvals`): signs an approval naming its ports and source, writes it beside
    /// the request, and waits for those hosts' answers. Each host checks your key, your
    /// approver role and that you are not the requester.
    Approve {
        /// The request id.
        id: String,
        /// The SSH key to sign with (as for `jitctl knock --key`).
        #[arg(short, long, value_name = "FILE")]
        key: Option<PathBuf>,
        /// How long to wait for the hosts' answers.
        #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "10s")]
        wait: std::time::Duration,
    },
    /// Revoke a request: its lease is revoked and every host closes what it opened.
    Revoke {
        /// The request id.
        id: String,
    },
}

/// `jitctl knock`'s arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct KnockArgs {
    /// The host: a name or an address; HOST:PORT (or [IPv6]:PORT) knocks on another UDP port than 62222.
    #[arg(value_name = "HOST[:PORT]")]
    pub host: String,
    /// Port to open (repeat for several): 22, or 500/udp for a UDP port (asked for the same way, not waited for). Default: the host's `ports` in hosts.toml.
    #[arg(short, long = "port", value_name = "PORT", value_parser = crate::cli::knock::ports::PortSpec::parse)]
    pub ports: Vec<crate::cli::knock::ports::PortSpec>,
    /// How long: "90s", "2h", "1h30m" or ISO 8601 "PT2H". Default: the host's `duration` in hosts.toml.
    #[arg(short, long, value_parser = parse_duration, conflicts_with = "until")]
    pub duration: Option<std::time::Duration>,
    /// Until when: RFC 3339, e.g. 2026-12-01T17:00:00Z.
    #[arg(short, long, value_parser = parse_time)]
    pub until: Option<DateTime<Utc>>,
    /// Why you need access (recorded in the host's audit log; sent in clear text).
    #[arg(short, long)]
    pub justification: Option<String>,
    /// Sign this source address or prefix instead of "the address the packet comes from".
    #[arg(short, long, value_name = "ADDR")]
    pub source: Option<String>,
    /// The key to sign with: a private key file (its certificate KEY-cert.pub beside it is used, as ssh does), or a public key (or certificate) whose private half is in ssh-agent.
    #[arg(short, long, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// Send the knock and exit without waiting for the port to open.
    #[arg(long)]
    pub no_wait: bool,
    /// How long to wait for the port to open.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "10s")]
    pub wait_timeout: std::time::Duration,
    /// Sign the request and show it and the packet's size, but send nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Knock over IPv4 only.
    #[arg(short = '4', long = "ipv4", conflicts_with = "ipv6")]
    pub ipv4: bool,
    /// Knock over IPv6 only.
    #[arg(short = '6', long = "ipv6")]
    pub ipv6: bool,
}

/// Checks of the audit log itself.
#[derive(Debug, Subcommand)]
pub enum AuditCheck {
    /// Walk the audit log's hash chain; exit 1 naming the first record that was
    /// changed, removed or reordered.
    Verify,
}

/// How `jitctl audit` prints the records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Aligned columns for people.
    Table,
    /// The records as a JSON array.
    Json,
    /// Comma-separated values with a header row (for spreadsheets).
    Csv,
}

/// Reads a duration argument ("30m", "2h", "90s").
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    crate::duration::parse(text)
}

/// Reads a time argument: RFC 3339 or a date (midnight UTC).
pub fn parse_time(text: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Ok(t.with_timezone(&Utc));
    }
    if let Ok(d) = NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return Ok(d.and_hms_opt(0, 0, 0).expect("midnight exists").and_utc());
    }
    Err("not a time; write RFC 3339 (2026-12-01T17:00:00Z) or a date (2026-12-01)".into())
}

/// Reads `--since`/`--until`: a duration back from now, or a time as [`parse_time`] does.
pub fn parse_since(text: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(d) = crate::duration::parse(text) {
        let back = chrono::Duration::from_std(d).map_err(|e| e.to_string())?;
        return Ok(Utc::now() - back);
    }
    parse_time(text).map_err(|_| "not a duration (7d, 12h) or a time (RFC 3339 or YYYY-MM-DD)".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn each_subcommand_keeps_its_own_help() {
        let cli = Cli::command();
        let help = |name: &str| {
            let sub = cli.find_subcommand(name).unwrap_or_else(|| panic!("no {name}"));
            sub.get_after_help().map(|h| h.to_string()).unwrap_or_default()
        };
        assert!(help("knock").contains("knock@jitd"), "{}", help("knock"));
        assert!(help("doctor").contains("0 healthy"), "{}", help("doctor"));
        assert!(help("fleet").contains("ETCDCTL_ENDPOINTS"), "{}", help("fleet"));
        assert!(help("request").contains("Examples"), "{}", help("request"));
    }
}
