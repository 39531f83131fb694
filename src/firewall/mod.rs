//! The firewall seam: jitd's table is built as batches by [`rules`] (pure) and applied
//! by a [`Firewall`] driver: [`SystemFirewall`] in production (libnftables in-process,
//! or the `nft` program where the library cannot be loaded), [`RecordingFirewall`] in
//! unit tests. Reading back goes over nfnetlink ([`netlink`], [`kernel`]).

pub mod conntrack;
pub mod kernel;
pub mod libnft;
pub mod monitor;
pub mod netlink;
pub mod nft;
pub mod rules;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;

use crate::domain::GrantKey;

use nftables::schema::Nftables;

/// A failed firewall operation; the kernel's ruleset is unchanged (batches are atomic).
#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    /// The `nft` program could not be started.
    #[error("cannot run {program:?}: {source} (is the nftables package installed?)")]
    Spawn {
        /// The program jitd tried to run.
        program: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// `nft` ran and refused the batch.
    #[error("nft refused the change: {0}")]
    Rejected(String),
    /// `nft` refused the batch because something it names does not exist (ENOENT): a
    /// set element being deleted that the kernel already dropped, a missing table.
    #[error("nft refused the change: {0}")]
    Missing(String),
    /// `nft` did not answer in time.
    #[error("nft did not answer within {0:?}")]
    Timeout(std::time::Duration),
    /// `nft` printed something jitd could not read.
    #[error("cannot read nft's output: {0}")]
    Output(String),
}

impl FirewallError {
    /// nftables' refusal of a batch, `message` as it printed it: [`FirewallError::Missing`]
    /// when it reports ENOENT, else [`FirewallError::Rejected`]. The one place jitd reads
    /// nftables' text (its library and program report errno only as `strerror` text).
    pub fn refused(message: String) -> FirewallError {
        if message.contains(nix::errno::Errno::ENOENT.desc()) {
            FirewallError::Missing(message)
        } else {
            FirewallError::Rejected(message)
        }
    }
}

/// Applies nftables batches, each as one atomic transaction.
pub trait Firewall: Send + Sync + 'static {
    /// Applies `batch`; on error nothing of it is in the kernel.
    fn apply(&self, batch: &Nftables<'_>) -> impl Future<Output = Result<(), FirewallError>> + Send;
    /// Checks `batch` against the kernel without applying it.
    fn check(&self, batch: &Nftables<'_>) -> impl Future<Output = Result<(), FirewallError>> + Send;
    /// jitd's table as the kernel holds it, with or without the grant sets' elements
    /// (the expensive part at scale); `None` when there is no such table.
    fn read_table(
        &self,
        with_grants: bool,
    ) -> impl Future<Output = Result<Option<kernel::KernelTable>, FirewallError>> + Send;
    /// The packets the counters of the grant elements `keys` have counted (the new
    /// connections each admitted); elements the kernel does not hold are left out.
    fn read_counts(
        &self,
        keys: Vec<GrantKey>,
    ) -> impl Future<Output = Result<HashMap<GrantKey, u64>, FirewallError>> + Send;
    /// Whether a change the kernel reports as made by process `pid` was one of ours.
    fn made_by_us(&self, pid: u32) -> bool;
}

/// A firewall that only remembers what it was asked to apply, optionally failing;
/// for unit tests that need no root.
#[derive(Debug, Default)]
pub struct RecordingFirewall {
    /// Every applied batch, as JSON.
    pub applied: Mutex<Vec<serde_json::Value>>,
    /// When set, every call fails with this message.
    pub fail_with: Mutex<Option<String>>,
    /// What `read_table` returns.
    pub table: Mutex<Option<kernel::KernelTable>>,
}

impl Firewall for RecordingFirewall {
    async fn apply(&self, batch: &Nftables<'_>) -> Result<(), FirewallError> {
        if let Some(message) = self.fail_with.lock().unwrap().clone() {
            return Err(FirewallError::refused(message));
        }
        let json = rules::to_json(batch).map_err(|e| FirewallError::Output(e.to_string()))?;
        let value = serde_json::from_slice(&json).map_err(|e| FirewallError::Output(e.to_string()))?;
        self.applied.lock().unwrap().push(value);
        Ok(())
    }

    async fn check(&self, _batch: &Nftables<'_>) -> Result<(), FirewallError> {
        match self.fail_with.lock().unwrap().clone() {
            Some(message) => Err(FirewallError::refused(message)),
            None => Ok(()),
        }
    }

    async fn read_table(&self, _with_grants: bool) -> Result<Option<kernel::KernelTable>, FirewallError> {
        Ok(self.table.lock().unwrap().clone())
    }

    async fn read_counts(&self, keys: Vec<GrantKey>) -> Result<HashMap<GrantKey, u64>, FirewallError> {
        let counts = self
            .table
            .lock()
            .unwrap()
            .as_ref()
            .map(|t| t.counts())
            .unwrap_or_default();
        Ok(keys.iter().filter_map(|k| counts.get(k).map(|n| (*k, *n))).collect())
    }

    fn made_by_us(&self, _pid: u32) -> bool {
        true
    }
}

/// The driver jitd runs with: libnftables in-process when it loads, else `nft`.
#[derive(Debug, Clone)]
pub enum SystemFirewall {
    /// libnftables, loaded at run time.
    Library(libnft::LibNft),
    /// The `nft` program, one process per change.
    Program(nft::NftCli),
}

impl SystemFirewall {
    /// Loads libnftables (`JITD_LIBNFTABLES`, default `libnftables.so.1`); falls back to
    /// the `nft` program, saying why.
    pub fn detect() -> SystemFirewall {
        let path = std::env::var("JITD_LIBNFTABLES").unwrap_or_else(|_| libnft::DEFAULT_LIBRARY.to_string());
        match libnft::LibNft::load(&path) {
            Ok(lib) => {
                tracing::debug!("applying changes with {path} in-process");
                SystemFirewall::Library(lib)
            }
            Err(e) => {
                tracing::info!("{e}; applying changes with the nft program instead");
                SystemFirewall::Program(nft::NftCli::default())
            }
        }
    }
}

impl Firewall for SystemFirewall {
    async fn apply(&self, batch: &Nftables<'_>) -> Result<(), FirewallError> {
        let started = std::time::Instant::now();
        let poisoned = crate::fault::injected("nft-refuse").then(|| refused(batch));
        let batch = poisoned.as_ref().unwrap_or(batch);
        let result = match self {
            SystemFirewall::Library(f) => f.apply(batch).await,
            SystemFirewall::Program(f) => f.apply(batch).await,
        };
        crate::metrics::metrics().nft(started.elapsed());
        result
    }

    async fn check(&self, batch: &Nftables<'_>) -> Result<(), FirewallError> {
        match self {
            SystemFirewall::Library(f) => f.check(batch).await,
            SystemFirewall::Program(f) => f.check(batch).await,
        }
    }

    async fn read_table(&self, with_grants: bool) -> Result<Option<kernel::KernelTable>, FirewallError> {
        nft::read_table(with_grants).await
    }

    async fn read_counts(&self, keys: Vec<GrantKey>) -> Result<HashMap<GrantKey, u64>, FirewallError> {
        nft::read_counts(keys).await
    }

    fn made_by_us(&self, pid: u32) -> bool {
        match self {
            SystemFirewall::Library(f) => f.made_by_us(pid),
            SystemFirewall::Program(f) => f.made_by_us(pid),
        }
    }
}

/// Test hook (`JITD_FAULTS=nft-refuse`): `batch` plus a command the kernel refuses (the
/// deletion of a table that does not exist), so that the whole batch fails.
fn refused<'a>(batch: &Nftables<'a>) -> Nftables<'a> {
    use nftables::schema::{NfCmd, NfListObject, NfObject, Table};
    let mut objects = batch.objects.to_vec();
    objects.push(NfObject::CmdObject(NfCmd::Delete(NfListObject::Table(Table {
        family: nftables::types::NfFamily::INet,
        name: "jitd-injected-fault-no-such-table".into(),
        ..Default::default()
    }))));
    Nftables {
        objects: objects.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_naming_enoent_is_missing_and_others_are_rejected() {
        let gone = "Error: Could not process rule: No such file or directory; delete element inet jitd grants4 { 192.0.2.7 . tcp . 22 }";
        assert!(matches!(FirewallError::refused(gone.into()), FirewallError::Missing(m) if m == gone));
        let full = "Error: Could not process rule: No buffer space available";
        assert!(matches!(
            FirewallError::refused(full.into()),
            FirewallError::Rejected(_)
        ));
        assert_eq!(
            FirewallError::refused(gone.into()).to_string(),
            format!("nft refused the change: {gone}")
        );
    }
}
