//! Prometheus metrics (opt-in, `metrics_listen`): requests by outcome and reason, live
//! grants, grant durations, drift repairs, nftables transaction latency, audit write
//! failures, connections refused by the limit, and the doctor's verdict, served in the text exposition format
//! by a small HTTP server with its own connection cap and timeouts.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::audit::{enum_text, Outcome};
use crate::domain::ErrorCode;

/// Labels of `jitd_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// approved, denied or failed.
    pub outcome: String,
    /// The refusal's code (empty when approved).
    pub reason: String,
}

/// Labels of `jitd_knocks_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KnockLabels {
    /// `accepted` (passed on to the policy) or why it was dropped before.
    pub result: String,
}

/// Every metric jitd keeps.
pub struct Metrics {
    registry: Registry,
    /// Access requests by outcome and reason.
    pub requests: Family<RequestLabels, Counter>,
    /// Grants live now.
    pub active_grants: Gauge,
    /// Durations of approved grants, in seconds.
    pub grant_duration: Histogram,
    /// Times jitd found its table changed by someone else and restored it.
    pub drift_repairs: Counter,
    /// Time an nftables transaction takes, in seconds.
    pub nft_transaction: Histogram,
    /// Audit records that could not be written.
    pub audit_write_failures: Counter,
    /// Socket connections refused because of the connection limit.
    pub refused_connections: Counter,
    /// Remote knocks by what became of them before the policy.
    pub knocks: Family<KnockLabels, Counter>,
    /// 1 when the doctor's last run found no problem, 0 when it did.
    pub healthy: Gauge,
    /// Problems (FAIL checks) the doctor's last run found.
    pub health_problems: Gauge,
    /// Warnings the doctor's last run found.
    pub health_warnings: Gauge,
}

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("jitd");
        let m = Metrics {
            requests: Family::default(),
            active_grants: Gauge::default(),
            grant_duration: Histogram::new(
                [
                    60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 10800.0, 21600.0, 43200.0, 86400.0,
                ]
                .into_iter(),
            ),
            drift_repairs: Counter::default(),
            nft_transaction: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            audit_write_failures: Counter::default(),
            refused_connections: Counter::default(),
            knocks: Family::default(),
            healthy: Gauge::default(),
            health_problems: Gauge::default(),
            health_warnings: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "requests",
            "Access requests by outcome and refusal reason",
            m.requests.clone(),
        );
        registry.register("active_grants", "Grants live now", m.active_grants.clone());
        registry.register(
            "grant_duration_seconds",
            "Durations of approved grants",
            m.grant_duration.clone(),
        );
        registry.register(
            "drift_repairs",
            "Changes by others to jitd's table that jitd repaired",
            m.drift_repairs.clone(),
        );
        registry.register(
            "nft_transaction_seconds",
            "Time an nftables transaction takes",
            m.nft_transaction.clone(),
        );
        registry.register(
            "audit_write_failures",
            "Audit records that could not be written",
            m.audit_write_failures.clone(),
        );
        registry.register(
            "refused_connections",
            "Socket connections refused by the connection limit",
            m.refused_connections.clone(),
        );
        registry.register(
            "knocks",
            "Remote knocks: accepted (passed on to the policy) or why they were dropped",
            m.knocks.clone(),
        );
        registry.register(
            "healthy",
            "1 when the doctor found no problem at its last run (every minute), else 0",
            m.healthy.clone(),
        );
        registry.register(
            "health_problems",
            "Problems (FAIL checks) the doctor found at its last run",
            m.health_problems.clone(),
        );
        registry.register(
            "health_warnings",
            "Warnings the doctor found at its last run",
            m.health_warnings.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Sets the health gauges from the doctor's verdict.
    pub fn health(&self, healthy: bool, problems: usize, warnings: usize) {
        self.healthy.set(i64::from(healthy));
        self.health_problems.set(i64::try_from(problems).unwrap_or(i64::MAX));
        self.health_warnings.set(i64::try_from(warnings).unwrap_or(i64::MAX));
    }

    /// Counts one request's outcome (approved, denied or failed) and why (no code when approved).
    pub fn request(&self, outcome: Outcome, reason: Option<&ErrorCode>) {
        self.requests
            .get_or_create(&RequestLabels {
                outcome: enum_text(&outcome),
                reason: reason.map_or_else(String::new, |code| code.to_string()),
            })
            .inc();
    }

    /// Counts one knock: `accepted` or the code it was dropped with.
    pub fn knock(&self, result: &str) {
        self.knocks
            .get_or_create(&KnockLabels {
                result: result.to_string(),
            })
            .inc();
    }

    /// Observes one nftables transaction.
    pub fn nft(&self, took: Duration) {
        self.nft_transaction.observe(took.as_secs_f64());
    }

    /// Requests counted with `outcome`, whatever the reason.
    pub fn requests_with(&self, outcome: Outcome) -> u64 {
        // Family has no iteration API; the text form is the source of truth.
        let needle = format!("jitd_requests_total{{outcome=\"{}\"", enum_text(&outcome));
        self.render()
            .lines()
            .filter(|l| l.starts_with(&needle))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// The most metrics connections served at once; further ones wait in the kernel's
/// backlog (jitd does not accept them) until a slot frees.
pub const MAX_METRICS_CONNECTIONS: usize = 16;
/// How long a metrics client has to send its request, and then to take the reply.
pub const METRICS_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves `GET /metrics` on `listener` until the task is dropped.
///
/// At most [`MAX_METRICS_CONNECTIONS`] at once, each closed if its request does not
/// arrive within [`METRICS_TIMEOUT`]; after a failed accept (out of file descriptors:
/// EMFILE, ENFILE) it backs off instead of retrying at once, logging once per burst.
pub async fn serve(listener: TcpListener) {
    let slots = Arc::new(Semaphore::new(MAX_METRICS_CONNECTIONS));
    let mut backoff = crate::accept::AcceptBackoff::new("metrics");
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let Some((stream, _)) = backoff.take(listener.accept().await).await else {
            continue;
        };
        tokio::spawn(async move {
            let _slot = slot;
            let _ = answer(stream).await;
        });
    }
}

/// Reads the request head (up to 8 KiB, within [`METRICS_TIMEOUT`]) and answers it.
async fn answer(mut stream: TcpStream) -> std::io::Result<()> {
    let request = tokio::time::timeout(METRICS_TIMEOUT, read_head(&mut stream))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    let response = if request.starts_with(b"GET /metrics ") {
        let body = metrics().render();
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    } else {
        let body = "jitd serves GET /metrics only\n";
        format!(
            "HTTP/1.1 404 Not Found\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    };
    let reply = async {
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await
    };
    tokio::time::timeout(METRICS_TIMEOUT, reply)
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
}

async fn read_head(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 8192 {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        request.extend_from_slice(&buf[..n]);
    }
    Ok(request)
}

/// Binds the metrics listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
