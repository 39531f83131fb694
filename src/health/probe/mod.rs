//! The doctor's probes (effects): the nftables ruleset ([`nft`]), ...

pub mod host;
pub mod nft;
pub mod owners;
pub mod sockets;
pub mod sockfilter;
