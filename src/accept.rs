//! Back-off after failed `accept` calls, shared by the control socket's server and the
//! metrics endpoint so that neither spins when the process runs out of descriptors.

use std::time::Duration;

/// Backoff after failed `accept` calls (EMFILE, ENFILE, ENOMEM...): instead of
/// retrying at once and spinning, wait 50 ms, doubling up to 1 s, and log once per
/// burst of failures rather than once per failure.
#[derive(Debug)]
pub struct AcceptBackoff {
    what: &'static str,
    delay: Option<Duration>,
    failures: u64,
}

impl AcceptBackoff {
    const FIRST: Duration = Duration::from_millis(50);
    const MOST: Duration = Duration::from_secs(1);

    /// A backoff for the listener described by `what` ("socket", "metrics").
    pub fn new(what: &'static str) -> AcceptBackoff {
        AcceptBackoff {
            what,
            delay: None,
            failures: 0,
        }
    }

    /// Notes a failed accept; returns how long to wait before the next one.
    pub fn failed(&mut self, error: &std::io::Error) -> Duration {
        self.failures += 1;
        let delay = match self.delay {
            None => {
                tracing::warn!(
                    "accepting a {} connection failed: {error}; backing off (not logged again until accepting works)",
                    self.what
                );
                Self::FIRST
            }
            Some(d) => (d * 2).min(Self::MOST),
        };
        self.delay = Some(delay);
        delay
    }

    /// Takes the result of an `accept`: the connection, or (after waiting as long as
    /// the back-off says) `None`, so that the caller tries again.
    pub async fn take<T>(&mut self, accepted: std::io::Result<T>) -> Option<T> {
        match accepted {
            Ok(connection) => {
                self.succeeded();
                Some(connection)
            }
            Err(e) => {
                tokio::time::sleep(self.failed(&e)).await;
                None
            }
        }
    }

    /// Notes a successful accept, ending a burst of failures.
    pub fn succeeded(&mut self) {
        if self.delay.take().is_some() {
            tracing::info!(
                "accepting {} connections again after {} failed attempt(s)",
                self.what,
                self.failures
            );
            self.failures = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_backoff_doubles_up_to_a_second_and_resets() {
        let mut backoff = AcceptBackoff::new("test");
        let e = std::io::Error::from_raw_os_error(24);
        let delays: Vec<u128> = (0..7).map(|_| backoff.failed(&e).as_millis()).collect();
        assert_eq!(delays, [50, 100, 200, 400, 800, 1000, 1000]);
        backoff.succeeded();
        assert_eq!(backoff.failed(&e), Duration::from_millis(50));
    }
}
