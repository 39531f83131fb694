//! The host's network interfaces, read over rtnetlink, to check `lockdown.interfaces`.

use futures::TryStreamExt;
use netlink_packet_route::link::LinkAttribute;

/// Runs `f` with a fresh rtnetlink connection, closed afterwards; `what` names the
/// query in an error.
async fn over_rtnetlink<T, F, Fut>(what: &str, f: F) -> std::io::Result<T>
where
    F: FnOnce(rtnetlink::Handle) -> Fut,
    Fut: std::future::Future<Output = Result<T, rtnetlink::Error>>,
{
    let (connection, handle, _) = rtnetlink::new_connection()?;
    let task = tokio::spawn(connection);
    let result = f(handle).await;
    task.abort();
    result.map_err(|e| std::io::Error::other(format!("{what} over rtnetlink: {e}")))
}

/// Names of the interfaces that exist now.
pub async fn interface_names() -> std::io::Result<Vec<String>> {
    over_rtnetlink("listing interfaces", |handle| async move {
        let mut names = Vec::new();
        let mut links = handle.link().get().execute();
        while let Some(msg) = links.try_next().await? {
            for attr in msg.attributes {
                if let LinkAttribute::IfName(name) = attr {
                    names.push(name);
                }
            }
        }
        Ok(names)
    })
    .await
}

/// The addresses of every interface now (a knock may name the host by one).
pub async fn local_addresses() -> std::io::Result<Vec<std::net::IpAddr>> {
    use netlink_packet_route::address::AddressAttribute;
    over_rtnetlink("listing addresses", |handle| async move {
        let mut addrs = Vec::new();
        let mut list = handle.address().get().execute();
        while let Some(msg) = list.try_next().await? {
            for attr in msg.attributes {
                if let AddressAttribute::Address(a) | AddressAttribute::Local(a) = attr {
                    if !addrs.contains(&a) {
                        addrs.push(a);
                    }
                }
            }
        }
        Ok(addrs)
    })
    .await
}

/// The configured interface names that the host does not have, as config problems.
pub fn unknown_interfaces(configured: &[String], existing: &[String]) -> Vec<String> {
    configured
        .iter()
        .enumerate()
        .filter(|(_, name)| !existing.contains(name))
        .map(|(i, name)| {
            format!(
                "lockdown.interfaces[{i}]: no such interface on this host (have: {}), got {name:?}",
                existing.join(", ")
            )
        })
        .collect()
}
