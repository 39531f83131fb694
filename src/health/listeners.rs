//! Listening sockets as the doctor sees them: where they listen, who owns them, and
//! whether they can be reached from outside the host (pure).

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::domain::Transport;

/// A listening TCP socket or a bound, unconnected UDP socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listener {
    /// TCP or UDP.
    pub transport: Transport,
    /// The local address it is bound to (`0.0.0.0`, `::`: every address).
    pub address: IpAddr,
    /// The local port.
    pub port: u16,
    /// An IPv6 socket that does not also take IPv4 connections.
    #[serde(default)]
    pub v6only: bool,
    /// The socket's owner uid.
    pub uid: u32,
    /// The socket's inode (to find its process).
    #[serde(skip)]
    pub inode: u32,
    /// The cgroup the socket was created in (to find its service when its process is
    /// not visible), when the kernel says.
    #[serde(skip)]
    pub cgroup: Option<u64>,
    /// The processes holding it, when jitd may see them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub processes: Vec<Process>,
    /// The systemd unit (or other cgroup) it was created in, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
}

/// The most sockets the doctor keeps of one owner (uid): a user who binds more pushes
/// out only their own.
pub const PER_OWNER: usize = 4096;
/// The most sockets the doctor keeps of all owners but root (a bound on one run).
pub const MAX_SOCKETS: usize = 65_536;

/// Listening sockets the doctor left out (over its caps: a user with no role can bind
/// any number of sockets).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeftOut {
    /// How many.
    pub sockets: usize,
    /// Their owners (uids), the first [`LeftOut::MAX_OWNERS`].
    pub owners: Vec<u32>,
}

impl LeftOut {
    /// The most owners named.
    pub const MAX_OWNERS: usize = 8;

    /// Counts a socket of `uid` left out.
    pub fn note(&mut self, uid: u32) {
        self.sockets += 1;
        if self.owners.len() < LeftOut::MAX_OWNERS && !self.owners.contains(&uid) {
            self.owners.push(uid);
        }
    }
}

/// A process holding a socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Process {
    /// Its pid.
    pub pid: u32,
    /// Its name as the kernel keeps it (`/proc/PID/comm`, at most 15 bytes); never its
    /// command line, which may hold secrets.
    pub name: String,
}

/// Where a listener can be reached from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Exposure {
    /// Only from the host itself (127.0.0.0/8, ::1).
    Loopback,
    /// On one address of the host.
    Address,
    /// On every address of the host (0.0.0.0, ::).
    Everywhere,
}

impl Listener {
    /// Where it can be reached from.
    pub fn exposure(&self) -> Exposure {
        let ip = match self.address {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        if ip.is_loopback() {
            Exposure::Loopback
        } else if ip.is_unspecified() {
            Exposure::Everywhere
        } else {
            Exposure::Address
        }
    }

    /// Whether it takes IPv4 connections, IPv6 connections.
    pub fn families(&self) -> (bool, bool) {
        match self.address {
            IpAddr::V4(_) => (true, false),
            IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => (true, false),
            IpAddr::V6(v6) => (v6.is_unspecified() && !self.v6only, true),
        }
    }

    /// `0.0.0.0:22/tcp`, `[::]:22/tcp`.
    pub fn endpoint(&self) -> String {
        let address = match self.address {
            IpAddr::V6(v6) => format!("[{v6}]"),
            v4 => v4.to_string(),
        };
        format!("{address}:{}/{}", self.port, self.transport.name())
    }

    /// Who holds it, for people: `sshd (pid 812)`, `unit ssh.service`, or
    /// `uid 0, process not visible to jitd`.
    pub fn owner(&self) -> String {
        if !self.processes.is_empty() {
            let names: Vec<String> = self
                .processes
                .iter()
                .take(3)
                .map(|p| format!("{} (pid {})", p.name, p.pid))
                .collect();
            return names.join(", ");
        }
        match &self.unit {
            Some(unit) => format!("{unit} (uid {})", self.uid),
            None => format!("uid {}, process not visible to jitd", self.uid),
        }
    }

    /// The names it goes by: its processes' names and its unit's name.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.processes.iter().map(|p| p.name.as_str()).collect();
        if let Some(unit) = &self.unit {
            let last = unit.rsplit('/').next().unwrap_or(unit);
            names.push(last.split(['.', '@']).next().unwrap_or(last));
        }
        names
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(address: &str, v6only: bool) -> Listener {
        Listener {
            transport: Transport::Tcp,
            address: address.parse().unwrap(),
            port: 22,
            v6only,
            uid: 0,
            inode: 1,
            cgroup: None,
            processes: Vec::new(),
            unit: None,
        }
    }

    #[test]
    fn exposure_and_families() {
        assert_eq!(at("127.0.0.1", false).exposure(), Exposure::Loopback);
        assert_eq!(at("127.0.0.53", false).exposure(), Exposure::Loopback);
        assert_eq!(at("::1", true).exposure(), Exposure::Loopback);
        assert_eq!(at("::ffff:127.0.0.1", false).exposure(), Exposure::Loopback);
        assert_eq!(at("0.0.0.0", false).exposure(), Exposure::Everywhere);
        assert_eq!(at("::", false).exposure(), Exposure::Everywhere);
        assert_eq!(at("192.0.2.1", false).exposure(), Exposure::Address);
        assert_eq!(at("::", false).families(), (true, true));
        assert_eq!(at("::", true).families(), (false, true));
        assert_eq!(at("0.0.0.0", false).families(), (true, false));
        assert_eq!(at("::", false).endpoint(), "[::]:22/tcp");
    }

    #[test]
    fn owners_and_names() {
        let mut l = at("0.0.0.0", false);
        assert_eq!(l.owner(), "uid 0, process not visible to jitd");
        l.unit = Some("/system.slice/ssh.service".into());
        assert_eq!(l.names(), ["ssh"]);
        l.processes.push(Process {
            pid: 812,
            name: "sshd".into(),
        });
        assert_eq!(l.owner(), "sshd (pid 812)");
        assert_eq!(l.names(), ["sshd", "ssh"]);
    }
}
