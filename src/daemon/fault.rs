//! Fault injection for tests: `JITD_FAULTS=name[,name…]` makes the named fault happen.
//! Only debug builds read it; a release build never injects anything.

/// Whether the fault `name` was asked for.
pub fn injected(name: &str) -> bool {
    #[cfg(debug_assertions)]
    {
        static FAULTS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
        FAULTS
            .get_or_init(|| {
                std::env::var("JITD_FAULTS")
                    .unwrap_or_default()
                    .split(',')
                    .map(str::to_string)
                    .collect()
            })
            .iter()
            .any(|f| f == name)
    }
    #[cfg(not(debug_assertions))]
    {
        let _ = name;
        false
    }
}
