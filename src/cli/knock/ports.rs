//! A port as `jitctl knock` takes it: `22`, `22/tcp` or `500/udp`. The request carries
//! only the number (the host's policy knows the protocol); `/udp` tells jitctl that
//! there is no TCP handshake to wait for on that port.

use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// One port asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortSpec {
    /// The port number.
    pub port: u16,
    /// Written `PORT/udp`: asked for the same way, but not polled.
    pub udp: bool,
}

impl PortSpec {
    /// Reads `PORT`, `PORT/tcp` or `PORT/udp`.
    pub fn parse(text: &str) -> Result<PortSpec, String> {
        let (number, udp) = match text.split_once('/') {
            None => (text, false),
            Some((n, "tcp")) => (n, false),
            Some((n, "udp")) => (n, true),
            Some(_) => return Err(format!("{text:?}: the protocol after `/` is tcp or udp")),
        };
        number_ok(number)
            .map(|port| PortSpec { port, udp })
            .ok_or_else(|| format!("{text:?}: not a port 1-65535 (optionally /tcp or /udp)"))
    }
}

fn number_ok(text: &str) -> Option<u16> {
    text.parse::<u16>().ok().filter(|n| *n != 0 && n.to_string() == text)
}

impl fmt::Display for PortSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.port, if self.udp { "udp" } else { "tcp" })
    }
}

/// In the hosts file a port is a number (`22`) or a string (`"500/udp"`).
impl<'de> Deserialize<'de> for PortSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<PortSpec, D::Error> {
        struct Spec;
        impl Visitor<'_> for Spec {
            type Value = PortSpec;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port number, or a string like \"500/udp\"")
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<PortSpec, E> {
                u16::try_from(n)
                    .ok()
                    .filter(|p| *p != 0)
                    .map(|port| PortSpec { port, udp: false })
                    .ok_or_else(|| E::custom(format!("{n} is not a port 1-65535")))
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<PortSpec, E> {
                self.visit_i64(i64::try_from(n).unwrap_or(-1))
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<PortSpec, E> {
                PortSpec::parse(text).map_err(E::custom)
            }
        }
        deserializer.deserialize_any(Spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_with_and_without_a_protocol() {
        let tcp = |port| PortSpec { port, udp: false };
        assert_eq!(PortSpec::parse("22"), Ok(tcp(22)));
        assert_eq!(PortSpec::parse("22/tcp"), Ok(tcp(22)));
        assert_eq!(PortSpec::parse("500/udp"), Ok(PortSpec { port: 500, udp: true }));
        for bad in ["0", "65536", "022", "+22", "22/sctp", "22/", "/udp", "", "ssh"] {
            assert!(PortSpec::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(PortSpec::parse("500/udp").unwrap().to_string(), "500/udp");
    }
}
