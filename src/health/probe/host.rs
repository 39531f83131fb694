//! Small facts about the host: which address families others can reach it on (over
//! rtnetlink), and whether the legacy iptables is in use (`/proc/self/net`).

use std::net::IpAddr;

use futures::TryStreamExt;
use netlink_packet_route::address::AddressAttribute;

/// Whether the host has an IPv4 and an IPv6 address that is neither loopback nor
/// link-local (so that a grant over that family can be used at all).
pub async fn families() -> std::io::Result<(bool, bool)> {
    let (connection, handle, _) = rtnetlink::new_connection()?;
    let task = tokio::spawn(connection);
    let mut found = (false, false);
    let mut addresses = handle.address().get().execute();
    let result = async {
        while let Some(msg) = addresses.try_next().await? {
            for attr in msg.attributes {
                if let AddressAttribute::Address(ip) = attr {
                    note(&mut found, ip);
                }
            }
        }
        Ok::<_, rtnetlink::Error>(())
    }
    .await;
    task.abort();
    result.map_err(|e| std::io::Error::other(format!("listing addresses over rtnetlink: {e}")))?;
    Ok(found)
}

fn note(found: &mut (bool, bool), ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) if !v4.is_loopback() && !v4.is_link_local() => found.0 = true,
        IpAddr::V6(v6) if !v6.is_loopback() && (v6.segments()[0] & 0xffc0) != 0xfe80 => found.1 = true,
        _ => {}
    }
}

/// The tables of the legacy iptables (x_tables) in this network namespace.
pub fn legacy_iptables() -> Vec<String> {
    let mut found = Vec::new();
    for (file, prefix) in [("ip_tables_names", "ip"), ("ip6_tables_names", "ip6")] {
        let text = std::fs::read_to_string(format!("/proc/self/net/{file}")).unwrap_or_default();
        found.extend(
            text.lines()
                .filter(|l| !l.trim().is_empty())
                .map(|t| format!("{prefix} {}", t.trim())),
        );
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_and_link_local_addresses_do_not_count() {
        let mut found = (false, false);
        for ip in ["127.0.0.1", "169.254.1.1", "::1", "fe80::1"] {
            note(&mut found, ip.parse().unwrap());
        }
        assert_eq!(found, (false, false));
        note(&mut found, "fd00::1".parse().unwrap());
        note(&mut found, "192.0.2.1".parse().unwrap());
        assert_eq!(found, (true, true));
    }
}
