//! The docs held against the tree (no root needed): every relative link in README.md
//! and docs/ names a file that exists, every `docs/...` path a doc mentions exists,
//! and every test a doc names is still a function in tests/ or src/. A test is named
//! by a code span under a "How the tests attack it" heading (a snake_case name of four
//! words or more, or of three as `module::name`), or anywhere as `file.rs::name`. So the
//! security pages cannot go on citing a test that was renamed or removed.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// README.md and every file under docs/ (Markdown and the man page sources).
fn docs() -> Vec<PathBuf> {
    let mut found = vec![Path::new(ROOT).join("README.md")];
    collect(&Path::new(ROOT).join("docs"), &mut |p| found.push(p.to_path_buf()));
    found.sort();
    found
}

/// Calls `each` for every file under `dir`, recursively.
fn collect(dir: &Path, each: &mut dyn FnMut(&Path)) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            collect(&path, each);
        } else {
            each(&path);
        }
    }
}

/// Every Rust file of tests/ and src/: (file name, text).
fn rust_files() -> Vec<(String, String)> {
    let mut found = Vec::new();
    for dir in ["src", "tests", "benches"] {
        collect(&Path::new(ROOT).join(dir), &mut |p| {
            if p.extension().is_some_and(|e| e == "rs") {
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                found.push((name, std::fs::read_to_string(p).unwrap()));
            }
        });
    }
    found
}

/// Whether `text` defines a function called `name`.
fn defines(text: &str, name: &str) -> bool {
    text.match_indices(&format!("fn {name}")).any(|(i, m)| {
        let after = text[i + m.len()..].chars().next();
        let before = text[..i].chars().next_back();
        matches!(after, Some('(' | '<')) && before.is_none_or(|c| !(c.is_alphanumeric() || c == '_'))
    })
}

/// The targets of the Markdown links `[text](target)` in `text`.
fn link_targets(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("](") {
        rest = &rest[i + 2..];
        if let Some(end) = rest.find(')') {
            let target = rest[..end].split_whitespace().next().unwrap_or("");
            out.push(target.to_string());
        }
    }
    out
}

/// The `docs/...` paths mentioned in `text` (in prose, code spans or links).
fn docs_paths(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (i, _) in text.match_indices("docs/") {
        let before = text[..i].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '/' || c == '.' || c == '_') {
            continue; // part of a longer path or an address
        }
        let path: String = text[i..]
            .chars()
            .take_while(|c| c.is_alphanumeric() || matches!(c, '/' | '.' | '_' | '-'))
            .collect();
        let path = path.trim_end_matches('.').to_string();
        if path.len() > "docs/".len() {
            out.push(path);
        }
    }
    out
}

/// The code spans of `text`, with the heading each sits under.
fn code_spans(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut heading = String::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        if line.starts_with('#') {
            heading = line.trim_start_matches('#').trim().to_string();
            continue;
        }
        let mut parts = line.split('`');
        parts.next();
        while let (Some(span), Some(_)) = (parts.next(), parts.next()) {
            out.push((heading.clone(), span.to_string()));
        }
    }
    out
}

/// What `span` names as a test: `(file, function)` for `file.rs::name`, `(module, name)`
/// for `module::name` or `(None, name)`; `None` when it does not look like a test name.
/// `in_tests` is true under a "How the tests attack it" heading.
fn named_test(span: &str, in_tests: bool) -> Option<(Option<String>, String)> {
    let segments: Vec<&str> = span.split("::").collect();
    let last = *segments.last()?;
    let word = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    let snake = word(last) && last.chars().all(|c| !c.is_ascii_uppercase());
    let first = segments[0];
    if segments.len() > 1 && first.ends_with(".rs") && snake {
        return Some((Some(first.to_string()), last.to_string()));
    }
    // Test names are sentences; field and code names (`times_out_at`) are shorter.
    let words = if segments.len() > 1 { 3 } else { 4 };
    let path_ok = segments[..segments.len() - 1].iter().all(|s| word(s));
    if in_tests && snake && path_ok && last.split('_').count() >= words {
        let module = (segments.len() > 1).then(|| format!("{first}.rs"));
        return Some((module, last.to_string()));
    }
    None
}

/// Every problem found in the docs, one line each.
fn problems() -> Vec<String> {
    let rust = rust_files();
    let integration: BTreeSet<String> = std::fs::read_dir(Path::new(ROOT).join("tests/integration"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let mut problems = Vec::new();
    for doc in docs() {
        let text = std::fs::read_to_string(&doc).unwrap();
        let shown = doc.strip_prefix(ROOT).unwrap().display().to_string();
        let dir = doc.parent().unwrap();
        for target in link_targets(&text) {
            let path = target.split('#').next().unwrap();
            if path.is_empty() || path.contains("://") || path.starts_with("mailto:") {
                continue;
            }
            if !dir.join(path).exists() {
                problems.push(format!("{shown}: link to {target}: no such file"));
            }
        }
        for path in docs_paths(&text) {
            if !Path::new(ROOT).join(&path).exists() {
                problems.push(format!("{shown}: mentions {path}: no such file"));
            }
        }
        for (heading, span) in code_spans(&text) {
            let in_tests = heading.to_lowercase().contains("how the tests attack it");
            if in_tests && span.ends_with("...") {
                problems.push(format!("{shown}: `{span}`: name the test whole"));
                continue;
            }
            let Some((module, name)) = named_test(&span, in_tests) else {
                continue;
            };
            // A module named after an integration test file pins the test to that file;
            // any other module path (a unit test's) is looked for everywhere.
            let file = module.filter(|m| integration.contains(m) || span.contains(".rs::"));
            let found = rust
                .iter()
                .filter(|(f, _)| file.as_ref().is_none_or(|want| f == want))
                .any(|(_, text)| defines(text, &name));
            if !found {
                let place = file.map(|f| format!(" in {f}")).unwrap_or_default();
                problems.push(format!("{shown}: `{span}` (under \"{heading}\"): no fn {name}{place}"));
            }
        }
    }
    problems
}

#[test]
fn every_link_path_and_test_the_docs_name_exists() {
    let problems = problems();
    assert!(
        problems.is_empty(),
        "the docs name what is not there:\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_checks_catch_a_broken_link_a_missing_path_and_a_missing_test() {
    assert_eq!(
        link_targets("see [a](b.md#x) and [c](https://e/f)"),
        ["b.md#x", "https://e/f"]
    );
    assert_eq!(
        docs_paths("read docs/security/README.md. Or docs/x.md"),
        ["docs/security/README.md", "docs/x.md"]
    );
    assert_eq!(
        named_test("knock_worker::a_worker_that_lies_or_babbles_opens_nothing", true),
        Some((
            Some("knock_worker.rs".into()),
            "a_worker_that_lies_or_babbles_opens_nothing".into()
        ))
    );
    assert_eq!(named_test("audit_keep", true), None);
    assert_eq!(named_test("times_out_at", true), None);
    assert_eq!(named_test("crash_soak_now", true), None);
    assert_eq!(named_test("a_b_c_d", true), Some((None, "a_b_c_d".into())));
    assert_eq!(named_test("max_connections", false), None);
    assert_eq!(
        named_test("journal.rs::x", false),
        Some((Some("journal.rs".into()), "x".into()))
    );
    assert!(defines("fn a_b_c() {}", "a_b_c"));
    assert!(!defines("fn a_b_c_d() {}", "a_b_c"));
    assert!(!defines("fn xa_b_c() {}", "a_b_c"));
    let spans = code_spans("# How the tests attack it\n- `a_b_c`: x `y`\n```\n`no`\n```\n## Next\n`z`");
    assert_eq!(
        spans,
        [
            ("How the tests attack it".to_string(), "a_b_c".to_string()),
            ("How the tests attack it".to_string(), "y".to_string()),
            ("Next".to_string(), "z".to_string()),
        ]
    );
}
