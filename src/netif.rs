//! The host's network interfaces, read over rtnetlink, to check `lockdown.interfaces`.

use futures::TryStreamExt;
use netlink_packet_route::link::LinkAttribute;

/// Names of the interfaces that exist now.
pub async fn interface_names() -> std::io::Result<Vec<String>> {
    let (connection, handle, _) = rtnetlink::new_connection()?;
    let task = tokio::spawn(connection);
    let mut names = Vec::new();
    let mut links = handle.link().get().execute();
    let result = async {
        while let Some(msg) = links.try_next().await? {
            for attr in msg.attributes {
                if let LinkAttribute::IfName(name) = attr {
                    names.push(name);
                }
            }
        }
        Ok::<_, rtnetlink::Error>(())
    }
    .await;
    task.abort();
    result.map_err(|e| std::io::Error::other(format!("listing interfaces over rtnetlink: {e}")))?;
    Ok(names)
}

/// The addresses of every interface now (a knock may name the host by one).
pub async fn local_addresses() -> std::io::Result<Vec<std::net::IpAddr>> {
    use netlink_packet_route::address::AddressAttribute;
    let (connection, handle, _) = rtnetlink::new_connection()?;
    let task = tokio::spawn(connection);
    let mut addrs = Vec::new();
    let mut list = handle.address().get().execute();
    let result = async {
        while let Some(msg) = list.try_next().await? {
            for attr in msg.attributes {
                if let AddressAttribute::Address(a) | AddressAttribute::Local(a) = attr {
                    if !addrs.contains(&a) {
                        addrs.push(a);
                    }
                }
            }
        }
        Ok::<_, rtnetlink::Error>(())
    }
    .await;
    task.abort();
    result.map_err(|e| std::io::Error::other(format!("listing addresses over rtnetlink: {e}")))?;
    Ok(addrs)
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
