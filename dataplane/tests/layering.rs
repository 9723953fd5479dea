//! The crate's modules form layers: a module uses only those below it, so the source tree
//! reads as the path a request takes and there are no import circles. This test reads every
//! source file and fails on any `crate::…` path that points up or sideways.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

/// Top to bottom, as `lib.rs` lists them.
const LAYERS: &[&str] = &[
    "node", "gateway", "server", "config", "upstream", "adapters", "errors", "runtime", "body",
    "h1", "metrics", "pii",
];

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src readable") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The names `crate::` is followed by in `text`.
fn crate_paths(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("crate::") {
        let after = &rest[at + "crate::".len()..];
        let name: String = after
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        // `$crate::` in macros and the like are not this crate's modules.
        let preceded = rest[..at].chars().last();
        if !name.is_empty() && preceded != Some('$') {
            found.push(name);
        }
        rest = after;
    }
    found
}

#[test]
fn modules_use_only_the_layers_below_them() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut violations = Vec::new();
    let mut layered = 0;
    for file in &files {
        let rel = file.strip_prefix(&src).expect("under src");
        let first = rel
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .unwrap_or_default();
        let module = first.trim_end_matches(".rs");
        if module == "lib" || module == "main" {
            continue;
        }
        let Some(level) = LAYERS.iter().position(|l| *l == module) else {
            violations.push(format!(
                "{}: module {module} is not in LAYERS",
                rel.display()
            ));
            continue;
        };
        layered += 1;
        let text = std::fs::read_to_string(file).expect("readable");
        for used in crate_paths(&text) {
            if used == "seal" {
                continue; // the sealing crate, re-exported
            }
            match LAYERS.iter().position(|l| *l == used) {
                Some(u) if u >= level => {}
                Some(_) => violations.push(format!(
                    "{}: {module} uses crate::{used}, a layer above it",
                    rel.display()
                )),
                None => violations.push(format!("{}: crate::{used} is not a layer", rel.display())),
            }
        }
    }
    assert!(
        layered > 20,
        "only {layered} files found under {}",
        src.display()
    );
    assert!(violations.is_empty(), "{}", violations.join("\n"));
}

#[test]
fn the_scanner_sees_paths() {
    assert_eq!(
        crate_paths("use crate::h1::x; $crate::y; f(crate::body::z)"),
        ["h1", "body"]
    );
}
