//! Overlapping prefix grants as non-overlapping kernel elements (pure).
//!
//! The kernel's interval sets cannot hold overlapping elements, but two requesters may
//! well hold 198.51.100.0/30 and 198.51.0.0/16 on the same port. The union of such
//! grants is split into disjoint prefixes, each carrying the latest deadline among the
//! grants that cover it. The kernel then expires every piece on its own at the right
//! time: a piece's covering grants only ever shrink by expiry, in deadline order, and
//! the piece outlives none of them. Only an early end (revoke, supersede, policy change)
//! needs the pieces computed again.

use ipnet::IpNet;
use tokio::time::Instant;

/// Splits the union of `grants` (prefix and deadline, one address family) into
/// disjoint prefixes, each with the latest deadline of the grants that cover it.
/// A region covered by one grant whose deadline no nested grant exceeds stays whole.
pub fn decompose(grants: &[(IpNet, Instant)]) -> Vec<(IpNet, Instant)> {
    let mut nets: Vec<IpNet> = grants.iter().map(|g| g.0).collect();
    nets.sort_by_key(|n| (n.prefix_len(), *n));
    nets.dedup();
    let mut roots: Vec<IpNet> = Vec::new();
    for net in nets {
        if !roots.iter().any(|r| r.contains(&net)) {
            roots.push(net);
        }
    }
    let mut out = Vec::new();
    for root in roots {
        let inside: Vec<(IpNet, Instant)> = grants.iter().filter(|g| root.contains(&g.0)).copied().collect();
        region(root, &inside, &mut out);
    }
    out.sort_by_key(|(net, _)| *net);
    out
}

/// Covers `net` given the grants that cover it or lie inside it.
fn region(net: IpNet, grants: &[(IpNet, Instant)], out: &mut Vec<(IpNet, Instant)>) {
    let cover = grants.iter().filter(|g| g.0.contains(&net)).map(|g| g.1).max();
    let mut nested = grants.iter().filter(|g| g.0.prefix_len() > net.prefix_len());
    match cover {
        Some(deadline) if nested.all(|g| g.1 <= deadline) => out.push((net, deadline)),
        None if nested.next().is_none() => {}
        _ => {
            let halves = net.subnets(net.prefix_len() + 1).expect("a nested grant is longer");
            for half in halves {
                let relevant: Vec<(IpNet, Instant)> = grants
                    .iter()
                    .filter(|g| g.0.contains(&half) || half.contains(&g.0))
                    .copied()
                    .collect();
                if !relevant.is_empty() {
                    region(half, &relevant, out);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn covering(pieces: &[(IpNet, Instant)], addr: &str) -> Option<Instant> {
        let ip: std::net::IpAddr = addr.parse().unwrap();
        let hits: Vec<_> = pieces.iter().filter(|p| p.0.contains(&ip)).collect();
        assert!(hits.len() <= 1, "pieces overlap at {addr}: {hits:?}");
        hits.first().map(|p| p.1)
    }

    #[test]
    fn a_nested_grant_that_ends_later_splits_the_outer_one() {
        let t = Instant::now();
        let h = |n: u64| t + Duration::from_secs(3600 * n);
        let pieces = decompose(&[(net("198.51.0.0/16"), h(1)), (net("198.51.100.0/30"), h(3))]);
        assert_eq!(covering(&pieces, "198.51.100.2"), Some(h(3)));
        assert_eq!(covering(&pieces, "198.51.100.4"), Some(h(1)));
        assert_eq!(covering(&pieces, "198.51.7.1"), Some(h(1)));
        assert_eq!(covering(&pieces, "198.52.0.1"), None);
        assert_eq!(pieces.len(), 15, "the /30 and the 14 siblings on its path: {pieces:?}");
    }

    #[test]
    fn a_nested_grant_that_ends_sooner_is_absorbed() {
        let t = Instant::now();
        let pieces = decompose(&[
            (net("198.51.0.0/16"), t + Duration::from_secs(600)),
            (net("198.51.100.0/24"), t + Duration::from_secs(60)),
            (net("198.51.0.0/16"), t + Duration::from_secs(300)),
        ]);
        assert_eq!(pieces, vec![(net("198.51.0.0/16"), t + Duration::from_secs(600))]);
    }

    #[test]
    fn disjoint_grants_stay_as_they_are() {
        let t = Instant::now();
        let grants = [
            (net("2001:db8::/64"), t + Duration::from_secs(5)),
            (net("2001:db8:1::/64"), t + Duration::from_secs(9)),
        ];
        assert_eq!(decompose(&grants), grants.to_vec());
    }

    /// Grants end in deadline order; the pieces the kernel still holds at any time
    /// (those with a later deadline) must be exactly the pieces of the grants still live,
    /// so no recompute is needed when a grant simply runs out.
    #[test]
    fn pieces_left_after_expiry_are_the_pieces_of_the_live_grants() {
        let t = Instant::now();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..300 {
            let n = 1 + next() % 6;
            let grants: Vec<(IpNet, Instant)> = (0..n)
                .map(|_| {
                    let len = 20 + (next() % 9) as u8;
                    let addr = std::net::Ipv4Addr::from(0x0a00_0000 | (next() as u32 & 0x0000_ff00));
                    let net = IpNet::V4(ipnet::Ipv4Net::new(addr, len).unwrap().trunc());
                    (net, t + Duration::from_secs(1 + next() % 5))
                })
                .collect();
            let all = decompose(&grants);
            for secs in 1..6 {
                let at = t + Duration::from_secs(secs);
                let kept: Vec<_> = all.iter().filter(|p| p.1 > at).copied().collect();
                let live: Vec<_> = grants.iter().filter(|g| g.1 > at).copied().collect();
                assert_eq!(kept, decompose(&live), "grants {grants:?} at +{secs}s");
            }
        }
    }
}
