//! Applies batches by running `nft -j -f -` (the nftables JSON API), one transaction each.

use std::process::Stdio;
use std::time::Duration;

use nftables::schema::Nftables;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use super::{Firewall, FirewallError};

/// How long one `nft` run may take before jitd gives up on it.
pub const NFT_TIMEOUT: Duration = Duration::from_secs(30);

/// Drives the kernel through the `nft` program.
#[derive(Debug, Clone)]
pub struct NftCli {
    program: String,
}

impl Default for NftCli {
    fn default() -> Self {
        NftCli { program: "nft".into() }
    }
}

impl NftCli {
    /// Uses `program` instead of `nft` from `PATH`.
    pub fn with_program(program: impl Into<String>) -> NftCli {
        NftCli {
            program: program.into(),
        }
    }

    async fn run(&self, args: &[&str], batch: &Nftables<'_>) -> Result<(), FirewallError> {
        let payload = serde_json::to_vec(batch).map_err(|e| FirewallError::Output(e.to_string()))?;
        let mut child = Command::new(&self.program)
            .args(args)
            .args(["-j", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| FirewallError::Spawn {
                program: self.program.clone(),
                source,
            })?;
        let mut stdin = child.stdin.take().expect("stdin is piped");
        let run = async move {
            // nft reads all of stdin before it answers, so write first, then wait.
            stdin.write_all(&payload).await?;
            drop(stdin);
            child.wait_with_output().await
        };
        let output = tokio::time::timeout(NFT_TIMEOUT, run)
            .await
            .map_err(|_| FirewallError::Timeout(NFT_TIMEOUT))?
            .map_err(|e| FirewallError::Output(e.to_string()))?;
        if output.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&output.stderr);
        let message = stderr
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join("; ");
        Err(FirewallError::Rejected(if message.is_empty() {
            format!("nft exited with {}", output.status)
        } else {
            message
        }))
    }
}

impl Firewall for NftCli {
    async fn apply(&self, batch: &Nftables<'_>) -> Result<(), FirewallError> {
        self.run(&[], batch).await
    }

    async fn check(&self, batch: &Nftables<'_>) -> Result<(), FirewallError> {
        self.run(&["--check"], batch).await
    }
}
