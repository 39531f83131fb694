//! Connecting to etcd, shared by jitd and `jitctl fleet`: the endpoints, TLS with a
//! client certificate (or plain http:// for a lab), bounded connect and call timeouts.

use std::path::PathBuf;
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};

use super::settings::Tls;

/// How long one connection attempt may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long one call may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects to `endpoints` with `tls` (`None`: plain http://). Errors name the file or
/// the endpoints.
pub async fn connect(endpoints: &[String], tls: Option<&Tls>) -> Result<Client, String> {
    let mut options = ConnectOptions::new()
        .with_connect_timeout(CONNECT_TIMEOUT)
        .with_timeout(CALL_TIMEOUT)
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
    if let Some(tls) = tls {
        let read = |p: &PathBuf| std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()));
        let ca = Certificate::from_pem(read(&tls.ca)?);
        let identity = Identity::from_pem(read(&tls.cert)?, read(&tls.key)?);
        options = options.with_tls(TlsOptions::new().ca_certificate(ca).identity(identity));
    }
    Client::connect(endpoints, Some(options))
        .await
        .map_err(|e| format!("connecting to etcd at {}: {e}", endpoints.join(", ")))
}
