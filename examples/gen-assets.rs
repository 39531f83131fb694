//! Generates the man pages and shell completions from the binaries' own clap
//! definitions, plus the hand-written jitd.toml(5). Usage:
//! `cargo run --example gen-assets [-- OUT_DIR]` (default target/assets).

use std::path::PathBuf;

use clap::CommandFactory;
use clap_complete::Shell;

fn main() -> std::io::Result<()> {
    let out = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/assets"));
    let man = out.join("man");
    let completions = out.join("completions");
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&completions)?;

    let jitd = jitd::cli::jitd::Args::command().name("jitd");
    let mut page = Vec::new();
    clap_mangen::Man::new(jitd.clone()).section("8").render(&mut page)?;
    std::fs::write(man.join("jitd.8"), page)?;

    let jitctl = jitd::cli::jitctl::Cli::command().name("jitctl");
    clap_mangen::generate_to(jitctl.clone(), &man)?;
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/docs/jitd.toml.5"),
        man.join("jitd.toml.5"),
    )?;

    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut jitctl.clone(), "jitctl", &completions)?;
        clap_complete::generate_to(shell, &mut jitd.clone(), "jitd", &completions)?;
    }
    println!(
        "man pages in {}, completions in {}",
        man.display(),
        completions.display()
    );
    Ok(())
}
