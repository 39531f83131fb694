//! The knock on the network: resolve the host, send one datagram, then wait for a TCP
//! port to accept a connection. jitd never answers the datagram, so the port opening
//! is the only sign that the knock worked.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::{sleep_until, timeout};

use super::plan::Family;
use super::target::{unspecified_like, Host};

/// The addresses of `host` at `port` that `family` allows, in the resolver's order.
pub async fn resolve(host: &Host, port: u16, family: Family) -> Result<Vec<SocketAddr>, String> {
    let all: Vec<SocketAddr> = match host {
        Host::Ip(ip) => vec![SocketAddr::new(*ip, port)],
        Host::Name(name) => tokio::net::lookup_host((name.as_str(), port))
            .await
            .map_err(|e| format!("cannot resolve {name}: {e}"))?
            .collect(),
    };
    let wanted: Vec<SocketAddr> = all
        .iter()
        .copied()
        .filter(|a| match family {
            Family::Any => true,
            Family::V4 => a.is_ipv4(),
            Family::V6 => a.is_ipv6(),
        })
        .collect();
    if wanted.is_empty() {
        let which = if family == Family::V4 { "IPv4" } else { "IPv6" };
        return Err(format!("{} has no {which} address", host.request_name()));
    }
    Ok(wanted)
}

/// Sends `packet` once, from an unconnected socket of the right family, to the first
/// of `addrs` that takes it (an address of a family this machine has no route for
/// fails at once, and the next is tried). Where it went.
pub fn send(packet: &[u8], addrs: &[SocketAddr]) -> Result<SocketAddr, String> {
    let mut failures = Vec::new();
    for to in addrs {
        let sent = UdpSocket::bind(SocketAddr::new(unspecified_like(to.ip()), 0)).and_then(|s| s.send_to(packet, to));
        match sent {
            Ok(_) => return Ok(*to),
            Err(e) => failures.push(format!("{to}: {e}")),
        }
    }
    Err(format!("cannot send the knock: {}", failures.join("; ")))
}

/// What waiting for the port saw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Waited {
    /// How long after sending the knock a connection was accepted; `None`: not in time.
    pub opened_after: Option<Duration>,
    /// Connection attempts refused (a TCP reset: the packets got through, but nothing
    /// listens on the port or a firewall rejects them).
    pub refused: u32,
    /// The last other error an attempt met (unreachable, ...).
    pub last_error: Option<String>,
}

/// The first gap between connection attempts, and the longest.
const FIRST_GAP: Duration = Duration::from_millis(10);
const LONGEST_GAP: Duration = Duration::from_millis(200);
/// How long one attempt waits for its handshake. A locked port drops the SYN, and the
/// kernel would retry it only after a second: a fresh attempt is quicker.
const ATTEMPT: Duration = Duration::from_millis(900);

/// The gap after `gap`: attempts come quickly at first (the port usually opens within
/// milliseconds), then every 200 ms, so a 10 s wait sends about 60 SYNs, not hundreds.
pub fn next_gap(gap: Duration) -> Duration {
    (gap * 5 / 4).min(LONGEST_GAP)
}

/// Tries TCP connections to `to`, overlapping, until one is accepted or `limit` after
/// `sent` has passed.
pub async fn wait_open(to: SocketAddr, sent: Instant, limit: Duration) -> Waited {
    let deadline = tokio::time::Instant::from_std(sent + limit);
    let mut next = tokio::time::Instant::now();
    let mut gap = FIRST_GAP;
    let mut attempts = JoinSet::new();
    let mut waited = Waited::default();
    loop {
        tokio::select! {
            _ = sleep_until(next), if next < deadline => {
                attempts.spawn(timeout(ATTEMPT, TcpStream::connect(to)));
                next += gap;
                gap = next_gap(gap);
            }
            Some(done) = attempts.join_next() => match done {
                Ok(Ok(Ok(_stream))) => {
                    waited.opened_after = Some(sent.elapsed());
                    return waited;
                }
                Ok(Ok(Err(e))) if e.kind() == std::io::ErrorKind::ConnectionRefused => waited.refused += 1,
                Ok(Ok(Err(e))) => waited.last_error = Some(e.to_string()),
                Ok(Err(_)) | Err(_) => {} // the attempt timed out (dropped), or its task failed
            },
            _ = sleep_until(deadline) => return waited,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempts_come_quickly_then_every_200_ms() {
        let mut gap = FIRST_GAP;
        let mut at = Duration::ZERO;
        let mut count = 0;
        while at < Duration::from_secs(10) {
            at += gap;
            gap = next_gap(gap);
            count += 1;
        }
        assert!((45..=70).contains(&count), "{count} attempts in 10 s");
        assert_eq!(gap, LONGEST_GAP);
        assert_eq!(next_gap(FIRST_GAP), Duration::from_micros(12_500));
    }

    #[tokio::test]
    async fn a_literal_address_needs_no_resolver_and_the_family_filters() {
        let v6 = Host::Ip("2001:db8::1".parse().unwrap());
        assert_eq!(
            resolve(&v6, 7, Family::Any).await.unwrap(),
            vec!["[2001:db8::1]:7".parse().unwrap()]
        );
        let e = resolve(&v6, 7, Family::V4).await.unwrap_err();
        assert_eq!(e, "2001:db8::1 has no IPv4 address");
    }
}
