//! The module map's floors, as data, and a test that every file in `src/` imports only its own floor
//! and the floors below it. An arrow up is a design error to fix, never an exception to list.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The floors, lowest first. `root` is what `src/lib.rs` itself defines (hex, failpoints, the error
/// chain, `VERSION`); a module imports its own floor and those below.
const FLOORS: &[&[&str]] = &[
    &["root", "telemetry", "error", "pem", "spiffe_bundle"],
    &["resource"],
    &["manifest"],
    &["store", "kv", "aws"],
    &["issuer"],
    &["agent"],
    &["workload_api"],
    &["controller"],
    &["admin"],
    &["daemon"],
    &["cli"],
    &["testing"],
];

/// Rooms only some modules may enter, whatever their floor: `(room, who may import it)`.
const PRIVATE_ROOMS: &[(&str, &[&str])] = &[
    // The issuer's network server: the client (`agent::remote`) shares only `issuer::tls` and
    // `issuer::wire` with it.
    ("issuer::server", &["issuer::server", "admin", "daemon", "testing"]),
];

/// What `src/lib.rs` defines itself, reached as `crate::<name>`.
const ROOT_ITEMS: &[&str] = &[
    "hex",
    "sha256_hex",
    "sha256",
    "failpoint",
    "error_chain",
    "rfc3339",
    "VERSION",
];

fn floor(module: &str) -> Option<usize> {
    let module = if ROOT_ITEMS.contains(&module) { "root" } else { module };
    FLOORS.iter().position(|f| f.contains(&module))
}

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

/// The module path of a file under `src/` (`src/issuer/server/tls.rs` → `issuer::server::tls`).
fn module_of(src: &Path, file: &Path) -> String {
    let relative = file.strip_prefix(src).unwrap().with_extension("");
    let parts: Vec<String> = relative
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .filter(|p| p != "mod")
        .collect();
    parts.join("::")
}

/// Every `crate::a::b…` path a file names outside comments, with `use crate::{a, b::c}` groups
/// expanded (nested groups included).
fn crate_paths(text: &str) -> BTreeSet<String> {
    let code: String = text
        .lines()
        .map(|l| match l.find("//") {
            Some(i) if !l[..i].contains('"') => &l[..i],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n");
    let mut out = BTreeSet::new();
    let mut rest = code.as_str();
    while let Some(i) = rest.find("crate::") {
        let preceded = rest[..i].chars().last();
        rest = &rest[i + "crate::".len()..];
        if preceded.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        expand("", rest, &mut out);
    }
    out
}

/// Adds the paths at the start of `text` (after `prefix::`) to `out`.
fn expand(prefix: &str, text: &str, out: &mut BTreeSet<String>) {
    let text = text.trim_start();
    if let Some(group) = text.strip_prefix('{') {
        let mut depth = 0;
        let mut start = 0;
        for (i, c) in group.char_indices() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => {
                    expand(prefix, &group[start..i], out);
                    return;
                }
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    expand(prefix, &group[start..i], out);
                    start = i + 1;
                }
                _ => {}
            }
        }
        return;
    }
    let end = text
        .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
        .unwrap_or(text.len());
    let path = text[..end].trim_end_matches(':');
    let full = if prefix.is_empty() {
        path.to_owned()
    } else if path.is_empty() || path == "self" {
        prefix.to_owned()
    } else {
        format!("{prefix}::{path}")
    };
    if text[end..].starts_with('{') {
        expand(&full, &text[end..], out);
    } else if !full.is_empty() {
        out.insert(full);
    }
}

#[test]
fn no_file_imports_a_module_above_its_floor_or_enters_a_private_room() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut problems = Vec::new();
    let mut checked = 0;
    for file in &files {
        let module = module_of(&src, file);
        // Binaries, and unit tests kept in a file of their own (they may use `crate::testing`).
        if module == "lib" || module.starts_with("bin::") || module.ends_with("::tests") {
            continue;
        }
        let top = module.split("::").next().unwrap();
        let Some(own) = floor(top) else {
            problems.push(format!(
                "{}: module `{top}` is on no floor: add it to FLOORS",
                file.display()
            ));
            continue;
        };
        let text = std::fs::read_to_string(file).unwrap();
        // A file's unit tests (its closing `#[cfg(test)] mod tests`) may use `crate::testing`.
        let text = text.split("#[cfg(test)]\nmod tests").next().unwrap_or_default();
        for path in crate_paths(text) {
            checked += 1;
            let target = path.split("::").next().unwrap();
            match floor(target) {
                None => problems.push(format!(
                    "{}: `crate::{path}`: `{target}` is on no floor",
                    file.display()
                )),
                Some(theirs) if theirs > own => problems.push(format!(
                    "{}: `crate::{path}` goes up from {top} (floor {own}) to {target} (floor {theirs})",
                    file.display()
                )),
                _ => {}
            }
            for (room, allowed) in PRIVATE_ROOMS {
                let enters = path == *room || path.starts_with(&format!("{room}::"));
                let inside = allowed
                    .iter()
                    .any(|a| module == *a || module.starts_with(&format!("{a}::")));
                if enters && !inside {
                    problems.push(format!(
                        "{}: `crate::{path}` enters {room}, which only {allowed:?} may import",
                        file.display()
                    ));
                }
            }
        }
    }
    assert!(checked > 300, "only {checked} imports read: the reader is broken");
    assert!(
        problems.is_empty(),
        "{} layering problem(s):\n{}",
        problems.len(),
        problems.join("\n")
    );
}

#[test]
fn the_import_reader_expands_groups_and_skips_comments() {
    let text = "use crate::{a::b, c::{d, e::f}, g};\n// crate::z::nope\nlet x = crate::h::i(1); // crate::y\n";
    let paths: Vec<String> = crate_paths(text).into_iter().collect();
    assert_eq!(paths, ["a::b", "c::d", "c::e::f", "g", "h::i"]);
}
