//! The fleet: one signed request in etcd opens a port on several jitd hosts, each its
//! own judge. A real etcd with TLS client certificates and real jitd processes in
//! their own namespaces ([`crate::fleet_net`]).

use std::time::Duration;

use crate::fleet_net::*;
use crate::util::*;

#[test]
fn the_harness_runs_etcd_with_client_certificates() {
    let net = FleetNet::new(3);
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let mut etcd = Etcd::start(&net.hub, dir.path(), &pki);
    assert!(etcd.healthy());
    // without a client certificate etcd refuses the connection
    assert!(!etcd.curl(&[]).status.success());
    etcd.kill();
    assert!(!etcd.healthy());
    etcd.restart();
    assert!(wait_for(Duration::from_secs(10), || etcd.healthy()));
}
