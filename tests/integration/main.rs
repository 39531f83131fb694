//! Integration tests: the real `jitd` and `jitctl` binaries, run inside network
//! namespaces with real TCP/UDP peers. Needs root (namespaces, nftables).

mod approvals;
mod audit_trail;
mod clock;
mod config_checks;
mod core;
mod docs;
mod doctor;
mod fairness;
mod faults;
mod fleet;
mod fleet_attacks;
mod fleet_life;
mod fleet_net;
mod grants;
mod journal;
mod knock;
mod knock_attacks;
mod knock_client;
mod knock_worker;
mod layout;
mod lockdown;
mod network_attacks;
mod output;
mod packaging;
mod protocol;
mod recheck;
mod service;
mod start_trust;
mod usage;
mod util;
