//! Services worth protecting, known by their process names and their usual ports, and
//! the `[[ports]]` lines that protect them (pure).

use crate::domain::{Protocol, Transport};
use crate::health::listeners::Listener;

/// How much an unprotected service matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A way to manage the host: unprotected, it makes the host unhealthy.
    Management,
    /// A database listening beyond loopback: worth a look, often on purpose.
    Database,
}

/// A service the doctor recognises.
#[derive(Debug, Clone, Copy)]
pub struct Service {
    /// What people call it.
    pub name: &'static str,
    /// Management or database.
    pub kind: Kind,
    /// Its usual ports (inclusive ranges) and transports.
    pub ports: &'static [(u16, u16)],
    /// The transports it listens on.
    pub transports: &'static [Transport],
    /// Process names (`/proc/PID/comm`) and systemd unit names it goes by.
    pub names: &'static [&'static str],
}

const TCP: &[Transport] = &[Transport::Tcp];

/// Every service the doctor knows.
pub const SERVICES: &[Service] = &[
    Service {
        name: "SSH",
        kind: Kind::Management,
        ports: &[(22, 22)],
        transports: TCP,
        names: &["sshd", "ssh", "dropbear"],
    },
    Service {
        name: "Telnet",
        kind: Kind::Management,
        ports: &[(23, 23)],
        transports: TCP,
        names: &["telnetd", "in.telnetd"],
    },
    Service {
        name: "RDP (xrdp)",
        kind: Kind::Management,
        ports: &[(3389, 3389)],
        transports: &[Transport::Tcp, Transport::Udp],
        names: &["xrdp"],
    },
    Service {
        name: "WinRM/OMI",
        kind: Kind::Management,
        ports: &[(5985, 5986)],
        transports: TCP,
        names: &["omiserver", "omiengine", "omi"],
    },
    Service {
        name: "VNC",
        kind: Kind::Management,
        ports: &[(5900, 5999)],
        transports: TCP,
        names: &[
            "Xvnc",
            "x11vnc",
            "Xtigervnc",
            "vncserver",
            "wayvnc",
            "krfb",
            "vino-server",
        ],
    },
    Service {
        name: "Cockpit",
        kind: Kind::Management,
        ports: &[(9090, 9090)],
        transports: TCP,
        names: &["cockpit-ws", "cockpit"],
    },
    Service {
        name: "Webmin",
        kind: Kind::Management,
        ports: &[(10000, 10000)],
        transports: TCP,
        names: &["miniserv.pl", "webmin"],
    },
    Service {
        name: "Docker API",
        kind: Kind::Management,
        ports: &[(2375, 2376)],
        transports: TCP,
        names: &["dockerd"],
    },
    Service {
        name: "PostgreSQL",
        kind: Kind::Database,
        ports: &[(5432, 5432)],
        transports: TCP,
        names: &["postgres", "postmaster", "postgresql"],
    },
    Service {
        name: "MySQL/MariaDB",
        kind: Kind::Database,
        ports: &[(3306, 3306)],
        transports: TCP,
        names: &["mysqld", "mariadbd", "mysql", "mariadb"],
    },
    Service {
        name: "MongoDB",
        kind: Kind::Database,
        ports: &[(27017, 27017)],
        transports: TCP,
        names: &["mongod", "mongos"],
    },
    Service {
        name: "Redis",
        kind: Kind::Database,
        ports: &[(6379, 6379)],
        transports: TCP,
        names: &["redis-server", "redis"],
    },
    Service {
        name: "Memcached",
        kind: Kind::Database,
        ports: &[(11211, 11211)],
        transports: TCP,
        names: &["memcached"],
    },
    Service {
        name: "Elasticsearch/OpenSearch",
        kind: Kind::Database,
        ports: &[(9200, 9200)],
        transports: TCP,
        names: &["elasticsearch", "opensearch"],
    },
    Service {
        name: "Microsoft SQL Server",
        kind: Kind::Database,
        ports: &[(1433, 1433)],
        transports: TCP,
        names: &["sqlservr"],
    },
    Service {
        name: "Oracle listener",
        kind: Kind::Database,
        ports: &[(1521, 1521)],
        transports: TCP,
        names: &["tnslsnr"],
    },
    Service {
        name: "CouchDB",
        kind: Kind::Database,
        ports: &[(5984, 5984)],
        transports: TCP,
        names: &["beam.smp", "couchdb"],
    },
    Service {
        name: "Cassandra",
        kind: Kind::Database,
        ports: &[(9042, 9042)],
        transports: TCP,
        names: &["cassandra"],
    },
    Service {
        name: "etcd",
        kind: Kind::Database,
        ports: &[(2379, 2379)],
        transports: TCP,
        names: &["etcd"],
    },
];

/// How a listener was recognised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum By {
    /// Its process (or unit) has the service's name.
    Name,
    /// Its port is the service's usual one, and jitd cannot see its process.
    Port,
}

/// The service a listener is, if the doctor knows it: by its process's (or unit's)
/// name on any port; by its port only when its process is not visible (a process
/// with another name on a known port is something else).
pub fn recognise(l: &Listener) -> Option<(&'static Service, By)> {
    let names = l.names();
    if let Some(s) = SERVICES.iter().find(|s| names.iter().any(|n| s.names.contains(n))) {
        return Some((s, By::Name));
    }
    if !l.processes.is_empty() {
        return None;
    }
    SERVICES
        .iter()
        .find(|s| s.transports.contains(&l.transport) && s.ports.iter().any(|(lo, hi)| (*lo..=*hi).contains(&l.port)))
        .map(|s| (s, By::Port))
}

/// One `[[ports]]` entry protecting `port` with jitd's defaults.
pub fn port_entry(port: u16, protocol: Protocol, comment: &str) -> String {
    format!(
        "[[ports]]   # {comment}\nport = {port}\nprotocol = \"{protocol}\"\nallowed_sources = [\"any\"]\nmax_duration = \"3h\"\n"
    )
}

/// The `[[ports]]` entries of jitd's default ports: needed alongside a new entry when
/// the policy has none (the first entry replaces the defaults).
pub fn default_entries() -> String {
    crate::config::DEFAULT_PORTS
        .iter()
        .map(|p| port_entry(*p, Protocol::Tcp, "one of jitd's defaults, kept"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::listeners::Process;

    fn listener(port: u16, name: Option<&str>) -> Listener {
        Listener {
            transport: Transport::Tcp,
            address: "0.0.0.0".parse().unwrap(),
            port,
            v6only: false,
            uid: 0,
            inode: 1,
            cgroup: None,
            processes: name.map(|n| Process { pid: 7, name: n.into() }).into_iter().collect(),
            unit: None,
        }
    }

    #[test]
    fn services_are_recognised_by_name_first_and_by_port_only_when_unseen() {
        let (s, by) = recognise(&listener(2222, Some("sshd"))).unwrap();
        assert_eq!((s.name, by), ("SSH", By::Name));
        let (s, by) = recognise(&listener(5901, None)).unwrap();
        assert_eq!((s.name, by), ("VNC", By::Port));
        assert!(
            recognise(&listener(9090, Some("nginx"))).is_none(),
            "nginx on 9090 is not Cockpit"
        );
        assert!(recognise(&listener(8080, None)).is_none());
        let mut unit = listener(2200, None);
        unit.unit = Some("/system.slice/ssh.service".into());
        assert_eq!(recognise(&unit).unwrap().0.name, "SSH");
    }

    #[test]
    fn the_toml_lines_parse_as_a_policy() {
        let text = format!(
            "{}\n{}",
            default_entries(),
            port_entry(2222, Protocol::Tcp, "SSH (sshd)")
        );
        let config = crate::config::Config::parse(std::path::Path::new("/x.toml"), &text, &|_| None).unwrap();
        let ports: Vec<u16> = config.ports.iter().map(|p| p.port).collect();
        assert_eq!(ports, [22, 3389, 5985, 5986, 2222]);
    }
}
