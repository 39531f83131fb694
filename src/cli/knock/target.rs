//! `HOST[:PORT]` as a user writes it: a name or an address (IPv6 bare, or in brackets
//! when a port follows), and the knock port. Pure: nothing is resolved here.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The UDP port a knock goes to unless `HOST:PORT` or the host's config names another.
pub const DEFAULT_KNOCK_PORT: u16 = 62222;

/// The longest host name (DNS's limit, and what a request may carry).
const MAX_NAME: usize = 253;

/// A host as the user named it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    /// A DNS name, lowercased, without a trailing dot.
    Name(String),
    /// An address.
    Ip(IpAddr),
}

impl Host {
    /// What the request's `host` line says: the name, or the address in its canonical
    /// form (`2001:db8::1`, never `2001:DB8:0::1`).
    pub fn request_name(&self) -> String {
        match self {
            Host::Name(name) => name.clone(),
            Host::Ip(ip) => ip.to_string(),
        }
    }
}

/// `HOST[:PORT]` read: the host and, when written, the knock port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The host.
    pub host: Host,
    /// The knock port, when the user wrote one.
    pub port: Option<u16>,
}

/// Reads `HOST[:PORT]`: `web1.example.org`, `web1:62223`, `192.0.2.7:62223`,
/// `2001:db8::1`, `[2001:db8::1]:62223`.
pub fn parse(text: &str) -> Result<Target, String> {
    if let Some(rest) = text.strip_prefix('[') {
        let (inside, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("{text:?}: a `[` without its `]`"))?;
        let ip: Ipv6Addr = inside
            .parse()
            .map_err(|_| format!("{text:?}: {inside:?} in brackets is not an IPv6 address"))?;
        let port = match after {
            "" => None,
            _ => Some(port_after(text, after.strip_prefix(':'))?),
        };
        return Ok(Target {
            host: Host::Ip(IpAddr::V6(ip)),
            port,
        });
    }
    if text.matches(':').count() > 1 {
        let ip: Ipv6Addr = text
            .parse()
            .map_err(|_| format!("{text:?}: not an IPv6 address (with a port, write it as [ADDRESS]:PORT)"))?;
        return Ok(Target {
            host: Host::Ip(IpAddr::V6(ip)),
            port: None,
        });
    }
    let (host, port) = match text.split_once(':') {
        Some((host, port)) => (host, Some(port_after(text, Some(port))?)),
        None => (text, None),
    };
    Ok(Target {
        host: host_only(host)?,
        port,
    })
}

/// A host without a port: a name or an address (as a key of the hosts file).
pub fn host_only(text: &str) -> Result<Host, String> {
    if let Some(inside) = text.strip_prefix('[').and_then(|t| t.strip_suffix(']')) {
        return inside
            .parse::<Ipv6Addr>()
            .map(|ip| Host::Ip(IpAddr::V6(ip)))
            .map_err(|_| format!("{text:?}: not an IPv6 address in brackets"));
    }
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Ok(Host::Ip(ip));
    }
    name(text).map(Host::Name)
}

fn port_after(text: &str, port: Option<&str>) -> Result<u16, String> {
    port.and_then(|p| p.parse::<u16>().ok().filter(|n| *n != 0 && n.to_string() == p))
        .ok_or_else(|| format!("{text:?}: the knock port after `:` must be a number 1-65535"))
}

/// A DNS name: letters, digits, `-`, `_` and dots; lowercased; one trailing dot
/// dropped. A name whose last label is all digits is refused: it would be a
/// misspelt IPv4 address (`010.0.0.1`), which the resolver might read as octal.
fn name(text: &str) -> Result<String, String> {
    let name = text.strip_suffix('.').unwrap_or(text).to_ascii_lowercase();
    if name.is_empty() {
        return Err("the host is empty: write a name or an address".into());
    }
    if name.len() > MAX_NAME {
        return Err(format!("{text:?}: longer than {MAX_NAME} characters"));
    }
    let labels_ok = name.split('.').all(|label| {
        !label.is_empty()
            && !label.starts_with('-')
            && label
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
    });
    if !labels_ok {
        return Err(format!(
            "{text:?}: not a host name (letters, digits, `-`, `_` and dots; IDN names in their xn-- form) or an address"
        ));
    }
    let last = name.rsplit('.').next().unwrap_or_default();
    if last.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "{text:?}: not an IPv4 address, and a host name cannot end in digits"
        ));
    }
    Ok(name)
}

/// The unspecified address of `ip`'s family (what an unconnected socket binds to).
pub fn unspecified_like(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(text: &str) -> (String, Option<u16>) {
        let t = parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        (t.host.request_name(), t.port)
    }

    #[test]
    fn names_and_addresses_with_and_without_a_port() {
        let cases = [
            ("web1.example.org", "web1.example.org", None),
            ("Web1.Example.ORG", "web1.example.org", None),
            ("web1.example.org.", "web1.example.org", None),
            ("web1:62223", "web1", Some(62223)),
            ("192.0.2.7", "192.0.2.7", None),
            ("192.0.2.7:1", "192.0.2.7", Some(1)),
            ("2001:DB8:0::1", "2001:db8::1", None),
            ("::1", "::1", None),
            ("[2001:db8::1]", "2001:db8::1", None),
            ("[2001:db8:0:0::1]:62223", "2001:db8::1", Some(62223)),
            ("[::ffff:192.0.2.7]:5", "::ffff:192.0.2.7", Some(5)),
            ("my_host-1", "my_host-1", None),
        ];
        for (text, host, port) in cases {
            assert_eq!(ok(text), (host.to_string(), port), "{text}");
        }
        assert_eq!(parse("192.0.2.7").unwrap().host, Host::Ip("192.0.2.7".parse().unwrap()));
        assert_eq!(parse("web1").unwrap().host, Host::Name("web1".into()));
    }

    #[test]
    fn anything_else_is_refused_saying_why() {
        let cases = [
            ("", "empty"),
            (":22", "empty"),
            ("web1:", "knock port"),
            ("web1:0", "knock port"),
            ("web1:65536", "knock port"),
            ("web1:022", "knock port"),
            ("web1:+22", "knock port"),
            ("2001:db8::1:62223:x", "IPv6"),
            ("2001:db8::g", "IPv6"),
            ("[2001:db8::1", "`]`"),
            ("[2001:db8::1]62223", "knock port"),
            ("[2001:db8::1]:", "knock port"),
            ("[192.0.2.7]:22", "IPv6"),
            ("[web1]", "IPv6"),
            ("web 1", "not a host name"),
            ("web1..org", "not a host name"),
            ("-web1", "not a host name"),
            ("wéb1", "xn--"),
            ("web1\u{1b}[2J", "not a host name"),
            ("010.0.0.1", "end in digits"),
            ("192.0.2.256", "end in digits"),
            ("1.2.3", "end in digits"),
        ];
        for (text, why) in cases {
            let e = parse(text).unwrap_err();
            assert!(e.contains(why), "{text:?}: {e}");
        }
        let long = format!("{}.org", "a.".repeat(130));
        assert!(parse(&long).unwrap_err().contains("longer"));
    }
}
