//! Applies batches by running `nft -j -f -` (the nftables JSON API), one transaction
//! each, and reads jitd's table back with `nft -j list table`.

use std::collections::{HashMap, VecDeque};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nftables::schema::Nftables;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use super::kernel::{self, KernelTable, LOCKDOWN_SETS};
use super::netlink;
use super::rules::{grant_set, GRANT_SETS, TABLE};
use super::{Firewall, FirewallError};
use crate::domain::GrantKey;

/// How long one `nft` run may take before jitd gives up on it.
pub const NFT_TIMEOUT: Duration = Duration::from_secs(30);

/// How many of its own `nft` process ids jitd remembers, to tell its own changes from
/// others' in the kernel's change events.
const OWN_PIDS_KEPT: usize = 256;

/// Drives the kernel through the `nft` program.
#[derive(Debug, Clone)]
pub struct NftCli {
    program: String,
    own_pids: Arc<Mutex<VecDeque<u32>>>,
}

impl Default for NftCli {
    fn default() -> Self {
        NftCli::with_program("nft")
    }
}

impl NftCli {
    /// Uses `program` instead of `nft` from `PATH`.
    pub fn with_program(program: impl Into<String>) -> NftCli {
        NftCli {
            program: program.into(),
            own_pids: Arc::default(),
        }
    }

    fn spawn(&self, args: &[&str]) -> Result<tokio::process::Child, FirewallError> {
        let child = Command::new(&self.program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| FirewallError::Spawn {
                program: self.program.clone(),
                source,
            })?;
        if let Some(pid) = child.id() {
            let mut pids = self.own_pids.lock().expect("pid list lock");
            if pids.len() == OWN_PIDS_KEPT {
                pids.pop_front();
            }
            pids.push_back(pid);
        }
        Ok(child)
    }

    async fn run(&self, check_only: bool, batch: &Nftables<'_>) -> Result<(), FirewallError> {
        let payload = super::rules::to_json(batch).map_err(|e| FirewallError::Output(e.to_string()))?;
        let args: &[&str] = if check_only {
            &["--check", "-j", "-f", "-"]
        } else {
            &["-j", "-f", "-"]
        };
        let mut child = self.spawn(args)?;
        let mut stdin = child.stdin.take().expect("stdin is piped");
        let run = async move {
            // nft reads all of stdin before it answers, so write first, then wait. If it
            // exits early (a broken pipe), what it printed says why: keep waiting for it.
            let written = stdin.write_all(&payload).await;
            drop(stdin);
            let output = child.wait_with_output().await?;
            match written {
                Err(e) if output.status.success() => Err(e),
                _ => Ok(output),
            }
        };
        let output = finish(run).await?;
        if output.status.success() {
            Ok(())
        } else {
            Err(FirewallError::refused(stderr_message(&output)))
        }
    }
}

async fn finish(
    run: impl std::future::Future<Output = std::io::Result<std::process::Output>>,
) -> Result<std::process::Output, FirewallError> {
    tokio::time::timeout(NFT_TIMEOUT, run)
        .await
        .map_err(|_| FirewallError::Timeout(NFT_TIMEOUT))?
        .map_err(|e| FirewallError::Output(e.to_string()))
}

fn stderr_message(output: &std::process::Output) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr);
    let message = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    if message.is_empty() {
        format!("nft exited with {}", output.status)
    } else {
        message
    }
}

impl Firewall for NftCli {
    async fn apply(&self, batch: &Nftables<'_>) -> Result<(), FirewallError> {
        self.run(false, batch).await
    }

    async fn check(&self, batch: &Nftables<'_>) -> Result<(), FirewallError> {
        self.run(true, batch).await
    }

    async fn read_table(&self, with_grants: bool) -> Result<Option<KernelTable>, FirewallError> {
        read_table(with_grants).await
    }

    async fn read_counts(&self, keys: Vec<GrantKey>) -> Result<HashMap<GrantKey, u64>, FirewallError> {
        read_counts(keys).await
    }

    fn made_by_us(&self, pid: u32) -> bool {
        self.own_pids.lock().expect("pid list lock").contains(&pid)
    }
}

/// jitd's table read over nfnetlink (see [`super::netlink`]).
pub async fn read_table(with_grants: bool) -> Result<Option<KernelTable>, FirewallError> {
    tokio::task::spawn_blocking(move || read_over_netlink(with_grants))
        .await
        .map_err(|e| FirewallError::Output(e.to_string()))?
        .map_err(|e| FirewallError::Output(format!("reading table inet {TABLE} over netlink: {e}")))
}

/// Above this many elements, [`read_counts`] dumps the sets rather than asking for each
/// element (a request per element costs a round trip; a dump of 100,000, 0.7 s).
const MOST_ELEMENTS_ASKED: usize = 512;

/// The packets the counters of the grant elements `keys` have counted, read over
/// nfnetlink; elements the kernel does not hold (any more) are left out.
pub async fn read_counts(keys: Vec<GrantKey>) -> Result<HashMap<GrantKey, u64>, FirewallError> {
    if keys.is_empty() {
        return Ok(HashMap::new());
    }
    tokio::task::spawn_blocking(move || counts_over_netlink(&keys))
        .await
        .map_err(|e| FirewallError::Output(e.to_string()))?
        .map_err(|e| {
            FirewallError::Output(format!(
                "reading grant counters of table inet {TABLE} over netlink: {e}"
            ))
        })
}

fn counts_over_netlink(keys: &[GrantKey]) -> std::io::Result<HashMap<GrantKey, u64>> {
    let mut reader = netlink::Reader::open()?;
    let mut counts = HashMap::new();
    if keys.len() > MOST_ELEMENTS_ASKED {
        let mut elements = HashMap::new();
        for set in GRANT_SETS
            .iter()
            .filter(|set| keys.iter().any(|k| grant_set(&k.source) == **set))
        {
            if let Some(found) = netlink::dump_elements(&mut reader, TABLE, set)? {
                elements.insert(set.to_string(), found);
            }
        }
        let all = KernelTable {
            objects: Vec::new(),
            elements,
        }
        .counts();
        counts.extend(keys.iter().filter_map(|k| all.get(k).map(|n| (*k, *n))));
        return Ok(counts);
    }
    for set in GRANT_SETS {
        let asked: Vec<&GrantKey> = keys.iter().filter(|k| grant_set(&k.source) == set).collect();
        if asked.is_empty() {
            continue;
        }
        let encoded: Vec<_> = asked.iter().map(|k| kernel::encode_grant(k)).collect();
        let found = netlink::get_elements(&mut reader, TABLE, set, &encoded)?;
        for (key, element) in asked.into_iter().zip(found) {
            if let Some(packets) = element.and_then(|e| e.packets) {
                counts.insert(*key, packets);
            }
        }
    }
    Ok(counts)
}

fn read_over_netlink(with_grants: bool) -> std::io::Result<Option<KernelTable>> {
    let mut reader = netlink::Reader::open()?;
    let Some(objects) = netlink::dump_table(&mut reader, TABLE)? else {
        return Ok(None);
    };
    let mut elements = HashMap::new();
    let grant_sets: &[&str] = if with_grants { &GRANT_SETS } else { &[] };
    for set in grant_sets.iter().chain(LOCKDOWN_SETS.iter()) {
        if let Some(found) = netlink::dump_elements(&mut reader, TABLE, set)? {
            elements.insert(set.to_string(), found);
        }
    }
    Ok(Some(KernelTable { objects, elements }))
}
