//! The module layout (issue 16 item 4): no circles between the crate's modules, and the write
//! path (`tracker`, `providers`) never imports the read side (`usage`, `http`).
//!
//! The graph is read from the sources: every `crate::a::b` and `super::b` path outside a
//! `#[cfg(test)]` module is an edge from the file's module to `a::b` (two levels for the
//! modules that have submodules, one for the rest). A parent and its children are one place.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The module path of a source file (`src/usage/stats.rs` → `["usage", "stats"]`).
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts
}

/// The node a path names: `a::b` when `src/a/b.rs` or `src/a/b/mod.rs` exists, else `a`.
fn node(src: &Path, parts: &[String]) -> Option<String> {
    let first = parts.first()?;
    if let Some(second) = parts.get(1) {
        let dir = src.join(first);
        if dir.join(format!("{second}.rs")).exists() || dir.join(second).join("mod.rs").exists() {
            return Some(format!("{first}::{second}"));
        }
    }
    Some(first.clone())
}

/// Identifiers after `prefix` (e.g. `crate::`), a `{a, b::c}` group expanded one level.
fn paths_after(code: &str, prefix: &str) -> Vec<Vec<String>> {
    let ident = |s: &str| -> Vec<String> {
        s.split("::")
            .map(|p| {
                p.trim()
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect::<String>()
            })
            .take_while(|p| !p.is_empty())
            .collect()
    };
    let mut out = Vec::new();
    for (i, _) in code.match_indices(prefix) {
        let before = code[..i].chars().last();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        let rest = &code[i + prefix.len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find(['}', ';']).unwrap_or(group.len());
            for part in group[..end].split(',') {
                let p = ident(part.trim_start_matches('{'));
                if !p.is_empty() {
                    out.push(p);
                }
            }
        } else {
            let p = ident(rest);
            if !p.is_empty() {
                out.push(p);
            }
        }
    }
    out
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let module = module_of(&src, &file);
        if module == ["lib"] || module == ["main"] {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        let code: String = text
            .split("#[cfg(test)]")
            .next()
            .unwrap()
            .lines()
            .map(|l| l.split("//").next().unwrap())
            .collect::<Vec<_>>()
            .join("\n");
        let me = node(&src, &module).unwrap();
        let mut targets = paths_after(&code, "crate::");
        let parent = &module[..module.len() - 1];
        for p in paths_after(&code, "super::") {
            targets.push(parent.iter().cloned().chain(p).collect());
        }
        for t in targets {
            let Some(to) = node(&src, &t) else { continue };
            let related = to == me
                || me.starts_with(&format!("{to}::"))
                || to.starts_with(&format!("{me}::"));
            if !related {
                edges.entry(me.clone()).or_default().insert(to);
            }
        }
    }
    edges
}

/// Every cycle's members (Tarjan's strongly connected components of more than one node).
fn cycles(edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct Walk<'a> {
        edges: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<String, usize>,
        low: BTreeMap<String, usize>,
        stack: Vec<String>,
        found: Vec<Vec<String>>,
    }
    fn visit(w: &mut Walk, v: &str) {
        let i = w.index.len();
        w.index.insert(v.to_owned(), i);
        w.low.insert(v.to_owned(), i);
        w.stack.push(v.to_owned());
        for to in w.edges.get(v).into_iter().flatten() {
            if !w.index.contains_key(to) {
                visit(w, to);
                let l = w.low[v].min(w.low[to]);
                w.low.insert(v.to_owned(), l);
            } else if w.stack.contains(to) {
                let l = w.low[v].min(w.index[to]);
                w.low.insert(v.to_owned(), l);
            }
        }
        if w.low[v] == w.index[v] {
            let at = w.stack.iter().position(|s| s == v).unwrap();
            let members: Vec<String> = w.stack.drain(at..).collect();
            if members.len() > 1 {
                w.found.push(members);
            }
        }
    }
    let mut w = Walk {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        found: Vec::new(),
    };
    for v in edges.keys() {
        if !w.index.contains_key(v) {
            visit(&mut w, v);
        }
    }
    w.found
}

#[test]
fn the_modules_import_each_other_without_circles() {
    let edges = graph();
    // The reader sees the code: these edges exist today, so an empty graph would fail here.
    assert!(edges["http::routes"].contains("usage::stats"), "{edges:#?}");
    assert!(
        edges["usage::stats"].contains("usage::rollup"),
        "{edges:#?}"
    );
    let found = cycles(&edges);
    assert!(
        found.is_empty(),
        "modules in circles: {found:?}\n{edges:#?}"
    );
}

#[test]
fn the_write_path_does_not_import_the_read_side() {
    let edges = graph();
    for (from, to) in &edges {
        if from.starts_with("tracker") || from.starts_with("providers") {
            let read = to
                .iter()
                .filter(|t| t.starts_with("usage") || t.starts_with("http"))
                .collect::<Vec<_>>();
            assert!(read.is_empty(), "{from} imports {read:?}");
        }
    }
}

#[test]
fn a_circle_is_found_when_there_is_one() {
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    edges.entry("a".into()).or_default().insert("b".into());
    edges.entry("b".into()).or_default().insert("c".into());
    edges.entry("c".into()).or_default().insert("a".into());
    edges.entry("c".into()).or_default().insert("d".into());
    let found = cycles(&edges);
    assert_eq!(found.len(), 1);
    assert_eq!(
        found[0].iter().cloned().collect::<BTreeSet<_>>(),
        ["a", "b", "c"].map(String::from).into()
    );
}
