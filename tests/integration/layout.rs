//! The house's layout held against the code (no root needed): no import cycle between
//! the files of `src/`, no module depending on one `src/lib.rs` does not let it, and
//! `src/lib.rs`'s layout naming every module. The imports are read as text: every
//! `crate::`, `super::` and `self::` path outside test code, `use` trees expanded.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

const SRC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src");

/// A module path, `["daemon", "commit"]`; the crate root is empty.
type Module = Vec<String>;

/// Every file module of the library (not `src/bin/`, not test files) and its code
/// without its `#[cfg(test)]` modules.
fn files() -> BTreeMap<Module, String> {
    let mut found = BTreeMap::new();
    walk(Path::new(SRC), &mut Vec::new(), &mut found);
    found
}

fn walk(dir: &Path, at: &mut Module, found: &mut BTreeMap<Module, String>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    entries.sort();
    for path in entries {
        let name = path.file_stem().unwrap().to_str().unwrap().to_string();
        if path.is_dir() {
            if at.is_empty() && name == "bin" {
                continue; // the binaries use the library as `jitd::`
            }
            at.push(name);
            walk(&path, at, found);
            at.pop();
        } else if path.extension().is_some_and(|e| e == "rs") && name != "tests" {
            let mut module = at.clone();
            if name != "mod" && name != "lib" {
                module.push(name);
            }
            found.insert(module, without_tests(&std::fs::read_to_string(&path).unwrap()));
        }
    }
}

/// The code before the first `#[cfg(test)]` (test modules sit at the end of a file).
fn without_tests(text: &str) -> String {
    match text.find("#[cfg(test)]") {
        Some(i) => text[..i].to_string(),
        None => text.to_string(),
    }
}

/// The absolute module paths `text` (the code of `module`) names.
fn paths(module: &Module, text: &str) -> Vec<Module> {
    let mut out = Vec::new();
    let code: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    for root in ["crate::", "super::", "self::"] {
        let mut rest = code.as_str();
        while let Some(i) = rest.find(root) {
            let before = rest[..i].chars().last();
            rest = &rest[i..];
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                rest = &rest[root.len()..];
                continue; // part of a longer path (`super::super::`, `jitd::crate`)
            }
            let mut base = Vec::new();
            while let Some(r) = rest.strip_prefix("super::") {
                base = if base.is_empty() { module.clone() } else { base };
                base.pop();
                rest = r;
            }
            if let Some(r) = rest.strip_prefix("self::") {
                base = module.clone();
                rest = r;
            } else if let Some(r) = rest.strip_prefix("crate::") {
                base = Vec::new();
                rest = r;
            }
            let (trees, after) = tree(rest);
            rest = after;
            for t in trees {
                out.push(base.iter().cloned().chain(t).collect());
            }
        }
    }
    out
}

/// A path or a `use` tree at the start of `s` (`a::b::{c, d::e}`), expanded; and what
/// follows it.
fn tree(s: &str) -> (Vec<Module>, &str) {
    let mut segments = Vec::new();
    let mut rest = s.trim_start();
    loop {
        if let Some(r) = rest.strip_prefix('{') {
            let mut all = Vec::new();
            let mut r = r;
            loop {
                r = r.trim_start();
                if let Some(after) = r.strip_prefix('}') {
                    r = after;
                    break;
                }
                let (sub, after) = tree(r);
                all.extend(sub.into_iter().map(|t| segments.iter().cloned().chain(t).collect()));
                r = after.trim_start().strip_prefix(',').unwrap_or(after);
                if r.is_empty() {
                    break;
                }
            }
            return (all, r);
        }
        let end = rest
            .find(|c: char| !(c.is_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        if end == 0 {
            break;
        }
        segments.push(rest[..end].to_string());
        rest = &rest[end..];
        match rest.strip_prefix("::") {
            Some(r) => rest = r,
            None => break,
        }
    }
    (vec![segments], rest)
}

/// The file module a path lands in: its longest prefix that is one.
fn file_of<'a>(path: &Module, modules: &'a BTreeMap<Module, String>) -> Option<&'a Module> {
    (1..=path.len())
        .rev()
        .find_map(|n| modules.get_key_value(&path[..n]).map(|(k, _)| k))
}

/// Which file imports which: edges from a module down into its own submodules (a
/// parent naming its children) are left out, as Rust's tree has them anyway.
fn imports() -> BTreeMap<Module, BTreeSet<Module>> {
    let modules = files();
    let mut edges = BTreeMap::new();
    for (module, text) in &modules {
        let to: &mut BTreeSet<Module> = edges.entry(module.clone()).or_default();
        for path in paths(module, text) {
            if let Some(target) = file_of(&path, &modules) {
                if target != module && !target.starts_with(module) {
                    to.insert(target.clone());
                }
            }
        }
    }
    edges
}

fn name(m: &Module) -> String {
    if m.is_empty() {
        "crate".into()
    } else {
        m.join("::")
    }
}

/// The strongly connected components of more than one file (Tarjan's algorithm).
fn cycles(edges: &BTreeMap<Module, BTreeSet<Module>>) -> Vec<Vec<Module>> {
    struct Walk<'a> {
        edges: &'a BTreeMap<Module, BTreeSet<Module>>,
        index: BTreeMap<&'a Module, usize>,
        low: BTreeMap<&'a Module, usize>,
        stack: Vec<&'a Module>,
        on_stack: BTreeSet<&'a Module>,
        found: Vec<Vec<Module>>,
    }
    fn visit<'a>(w: &mut Walk<'a>, v: &'a Module) {
        let i = w.index.len();
        w.index.insert(v, i);
        w.low.insert(v, i);
        w.stack.push(v);
        w.on_stack.insert(v);
        for u in w.edges.get(v).into_iter().flatten() {
            if !w.index.contains_key(u) {
                visit(w, u);
                let l = w.low[u].min(w.low[v]);
                w.low.insert(v, l);
            } else if w.on_stack.contains(u) {
                let l = w.index[u].min(w.low[v]);
                w.low.insert(v, l);
            }
        }
        if w.low[v] == w.index[v] {
            let mut component = Vec::new();
            while let Some(u) = w.stack.pop() {
                w.on_stack.remove(u);
                component.push(u.clone());
                if u == v {
                    break;
                }
            }
            if component.len() > 1 {
                component.sort();
                w.found.push(component);
            }
        }
    }
    let mut w = Walk {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        found: Vec::new(),
    };
    for v in edges.keys() {
        if !w.index.contains_key(v) {
            visit(&mut w, v);
        }
    }
    w.found
}

/// The `# Dependencies` block of src/lib.rs: each top-level module, in order, with the
/// modules it may use (`everything above`: any listed before it).
fn declared() -> Vec<(String, BTreeSet<String>)> {
    let lib = std::fs::read_to_string(Path::new(SRC).join("lib.rs")).unwrap();
    let block = lib
        .split("# Dependencies")
        .nth(1)
        .expect("lib.rs has a # Dependencies block");
    let block = block.split("```text").nth(1).unwrap().split("```").next().unwrap();
    let mut out: Vec<(String, BTreeSet<String>)> = Vec::new();
    for line in block
        .lines()
        .map(|l| l.trim_start_matches("//!").trim())
        .filter(|l| !l.is_empty())
    {
        let line = line.split('(').next().unwrap();
        let (names, deps) = line.split_once("->").unwrap_or((line, ""));
        let deps: BTreeSet<String> = match deps.trim() {
            "everything above" => out.iter().map(|(n, _)| n.clone()).collect(),
            d => d
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect(),
        };
        for n in names.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            out.push((n.to_string(), deps.clone()));
        }
    }
    out
}

fn top_modules() -> Vec<String> {
    let lib = std::fs::read_to_string(Path::new(SRC).join("lib.rs")).unwrap();
    lib.lines()
        .filter(|l| l.ends_with(';') && !l.starts_with("//"))
        .filter_map(|l| l.split_once("mod ").map(|(_, m)| m.trim_end_matches(';').to_string()))
        .collect()
}

#[test]
fn no_file_of_src_imports_itself_through_others() {
    let found: Vec<String> = cycles(&imports())
        .iter()
        .map(|c| c.iter().map(name).collect::<Vec<_>>().join(" ↔ "))
        .collect();
    assert!(found.is_empty(), "import cycles:\n{}", found.join("\n"));
}

#[test]
fn each_module_uses_only_what_lib_rs_lets_it() {
    let declared = declared();
    let position: BTreeMap<&str, usize> = declared.iter().enumerate().map(|(i, (n, _))| (n.as_str(), i)).collect();
    let mut wrong = Vec::new();
    for (from, to) in imports() {
        for target in to {
            let (Some(a), Some(b)) = (from.first(), target.first()) else {
                continue;
            };
            if a == b {
                continue;
            }
            let allowed = declared
                .iter()
                .find(|(n, _)| n == a)
                .is_some_and(|(_, deps)| deps.contains(b));
            if !allowed {
                wrong.push(format!("{} uses {}", name(&from), name(&target)));
            }
        }
    }
    for (n, deps) in &declared {
        for d in deps {
            let below = position.get(d.as_str()).is_some_and(|p| *p < position[n.as_str()]);
            assert!(below, "lib.rs: {n} may use {d}, which is not listed before it");
        }
    }
    wrong.sort();
    wrong.dedup();
    assert!(
        wrong.is_empty(),
        "not in lib.rs's # Dependencies:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn lib_rs_names_every_module_in_its_layout_and_its_dependencies() {
    let lib = std::fs::read_to_string(Path::new(SRC).join("lib.rs")).unwrap();
    let declared: BTreeSet<String> = declared().into_iter().map(|(n, _)| n).collect();
    for m in top_modules() {
        let listed = lib.contains(&format!("//! - [`{m}`]")) || lib.contains(&format!("//! - `{m}`"));
        assert!(listed, "lib.rs's # Layout has no line for {m}");
        assert!(declared.contains(&m), "lib.rs's # Dependencies does not list {m}");
    }
    let modules: BTreeSet<String> = top_modules().into_iter().collect();
    for d in &declared {
        assert!(
            modules.contains(d),
            "lib.rs's # Dependencies lists {d}, which is no module"
        );
    }
}
