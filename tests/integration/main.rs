//! Integration tests: the real `jitd` and `jitctl` binaries, run inside network
//! namespaces with real TCP/UDP peers. Needs root (namespaces, nftables).

mod grants;
mod lockdown;
mod service;
mod util;
