//! Is this host healthy? `jitctl doctor`'s judgement (pure) and the probes that gather
//! its facts (effects): the rest of the nftables ruleset ([`ruleset`]), ...

pub mod probe;
pub mod ruleset;
