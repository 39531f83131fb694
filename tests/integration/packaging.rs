//! The one list of system packages (`scripts/packages`) against what uses it: the .deb's
//! Depends, and the scripts that install packages (only `scripts/install-deps` may).

use std::path::Path;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// `(package, need)` of every line of scripts/packages.
fn listed() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(Path::new(ROOT).join("scripts/packages")).unwrap();
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| {
            let mut words = l.split_whitespace();
            let package = words.next().unwrap().to_string();
            let need = words.next().unwrap_or_else(|| panic!("no need in {l:?}")).to_string();
            assert!(["build", "run", "test", "bench"].contains(&need.as_str()), "{l:?}");
            (package, need)
        })
        .collect()
}

#[test]
fn the_deb_depends_on_every_package_jitd_needs_to_run() {
    let manifest: toml::Table =
        toml::from_str(&std::fs::read_to_string(Path::new(ROOT).join("Cargo.toml")).unwrap()).unwrap();
    let depends = manifest["package"]["metadata"]["deb"]["depends"].as_str().unwrap();
    let named: Vec<&str> = depends
        .split(',')
        .map(|d| d.split_whitespace().next().unwrap_or(""))
        .collect();
    let run: Vec<String> = listed()
        .into_iter()
        .filter(|(_, n)| n == "run")
        .map(|(p, _)| p)
        .collect();
    assert!(!run.is_empty());
    for p in &run {
        assert!(
            named.contains(&p.as_str()),
            "Cargo.toml's deb depends ({depends}) lacks {p}, a `run` package of scripts/packages"
        );
    }
}

#[test]
fn the_build_needs_protoc_and_the_files_it_imports() {
    // etcd-client's build script runs protoc on protos that import google/protobuf/*.proto:
    // protobuf-compiler without libprotobuf-dev fails on a fresh machine
    let build: Vec<String> = listed()
        .into_iter()
        .filter(|(_, n)| n == "build")
        .map(|(p, _)| p)
        .collect();
    for p in ["protobuf-compiler", "libprotobuf-dev", "gcc"] {
        assert!(
            build.iter().any(|b| b == p),
            "{p} is not a build need in scripts/packages"
        );
    }
}

#[test]
fn only_install_deps_installs_packages() {
    let mut scripts: Vec<_> = std::fs::read_dir(Path::new(ROOT).join("scripts"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    scripts.push(Path::new(ROOT).join(".ci/run"));
    for path in scripts {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        if path.ends_with("install-deps") {
            continue;
        }
        assert!(
            !text.contains("apt-get install") && !text.contains("apt install"),
            "{} installs packages itself: add them to scripts/packages instead",
            path.display()
        );
    }
}
