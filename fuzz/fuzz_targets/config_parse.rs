//! Feeds arbitrary text to the policy parser: it must accept it or name the problems,
//! never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let path = std::path::Path::new("/etc/jitd/jitd.toml");
        if let Err(e) = jitd::config::Config::parse(path, text, &|name| (name == "jit").then_some(990)) {
            assert!(!e.problems.is_empty());
        }
    }
});
