//! The command lines of the two binaries, as clap definitions: the binaries parse them,
//! and `cargo run --example gen-assets` turns them into man pages and completions; and
//! [`table`], how `jitctl` draws its tables; [`doctor`], how it shows the doctor's report;
//! [`approvals`], how it waits for and shows approvals; [`status`], [`audit`] and
//! [`replies`], how it prints what jitd answers.

pub mod approvals;
pub mod audit;
pub mod doctor;
pub mod fleet;
pub mod jitctl;
pub mod jitd;
pub mod knock;
pub mod replies;
pub mod status;
pub mod table;
