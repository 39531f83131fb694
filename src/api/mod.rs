//! The local control API: [`protocol`] (types and framing), [`server`] (the socket,
//! peer credentials, limits) and [`client`] (what jitctl uses).

pub mod client;
pub mod protocol;
pub mod server;
