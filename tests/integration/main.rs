//! Integration tests: the real `jitd` and `jitctl` binaries, run inside network
//! namespaces with real TCP/UDP peers. Needs root (namespaces, nftables).

mod audit_trail;
mod faults;
mod grants;
mod lockdown;
mod network_attacks;
mod protocol;
mod service;
mod util;
