//! Captures the current network namespace's nftables ruleset (every table but jitd's,
//! with the options of iptables-nft matches) as a fixture for the doctor's unit tests:
//!   ip netns exec NS cargo run --example doctor-fixture > tests/fixtures/doctor/NAME.json

fn main() -> std::process::ExitCode {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    match runtime.block_on(jitd::health::probe::nft::read_listings("nft")) {
        Ok(listings) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&listings).expect("listings serialize")
            );
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("doctor-fixture: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
