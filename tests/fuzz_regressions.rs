//! Every input the fuzzers ever crashed on (`fuzz/regressions/<target>/`), and the seed corpus
//! (`fuzz/seeds/<target>/`), through the fuzz targets' bodies (`tbot::fuzzing`) on stable Rust, so a
//! crash once found stays fixed. `fuzz/README.md` says how to fuzz and how to add an input here.

use std::path::PathBuf;

fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut out = Vec::new();
    for dir in ["regressions", "seeds"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_file() && path.file_name().is_some_and(|n| n != ".gitkeep") {
                out.push((path.clone(), std::fs::read(&path).unwrap()));
            }
        }
    }
    out.sort();
    out
}

fn run(target: &str, body: fn(&[u8])) {
    let inputs = inputs(target);
    assert!(!inputs.is_empty(), "no seeds for `{target}`");
    for (path, data) in inputs {
        let outcome = std::panic::catch_unwind(|| body(&data));
        assert!(outcome.is_ok(), "`{target}` panics on {}", path.display());
    }
}

#[test]
fn the_loader_survives_every_recorded_input() {
    run("load", tbot::fuzzing::load);
}

#[test]
fn the_template_parser_survives_every_recorded_input() {
    run("template", tbot::fuzzing::template);
}

#[test]
fn the_spiffe_id_parser_survives_every_recorded_input() {
    run("spiffe_id", tbot::fuzzing::spiffe_id);
}
