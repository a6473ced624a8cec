//! Every document under tests/fixtures is validated by the real `tbotctl` binary and its
//! diagnostics are compared, line for line, with the fixture's `.expected` file.
//!
//! A fixture is `NAME.yaml` (validated with `-f`) or a directory `NAME/` (validated with `--dir`),
//! next to `NAME.expected`. To write the expected files after an intended change of wording, run
//! `TBOT_BLESS=1 cargo test --test fixtures_validate` and review the diff.

mod common;

use std::fs;
use std::path::PathBuf;

use common::{pinned_lines, relative, root, stdout, tbotctl};

fn fixtures(group: &str) -> Vec<(PathBuf, PathBuf)> {
    let dir = root().join("tests/fixtures").join(group);
    let mut cases: Vec<(PathBuf, PathBuf)> = fs::read_dir(&dir)
        .expect("fixture directory exists")
        .map(|e| e.expect("readable entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "expected"))
        .map(|expected| {
            let stem = expected.with_extension("");
            let target = if stem.is_dir() {
                stem
            } else {
                stem.with_extension("yaml")
            };
            (target, expected)
        })
        .collect();
    cases.sort();
    cases
}

fn check_group(group: &str, want_exit: i32) -> usize {
    let bless = std::env::var_os("TBOT_BLESS").is_some();
    let mut failures = Vec::new();
    let cases = fixtures(group);
    for (target, expected_path) in &cases {
        let flag = if target.is_dir() { "--dir" } else { "-f" };
        let output = tbotctl(&["validate", flag, &relative(target)]);
        let got = pinned_lines(&stdout(&output));
        if bless {
            fs::write(expected_path, got.join("\n") + "\n").expect("expected file is writable");
            continue;
        }
        let expected: Vec<String> = fs::read_to_string(expected_path)
            .expect("expected file is readable")
            .lines()
            .map(str::to_owned)
            .collect();
        let text = stdout(&output);
        let mut lines = text.lines().peekable();
        while let Some(line) = lines.next() {
            let is_diagnostic = line.contains(": error: ") || line.contains(": warning: ");
            if is_diagnostic && !line.starts_with(' ') {
                // The snippet (if any) comes first, then the hint, before the next diagnostic.
                let hinted = lines
                    .clone()
                    .take_while(|l| l.starts_with(' ') || l.chars().next().is_some_and(|c| c.is_ascii_digit()))
                    .any(|l| l.starts_with("  = hint: "));
                if !hinted {
                    failures.push(format!("{}: no hint (what to do next) for: {line}", relative(target)));
                }
            }
        }
        let exit = output.status.code();
        let has_errors = expected.iter().any(|l| l.starts_with("invalid: "));
        let right_exit = if has_errors {
            exit == Some(1)
        } else {
            exit == Some(want_exit)
        };
        if got != expected || !right_exit {
            failures.push(format!(
                "{}: exit {exit:?}\n--- expected\n{}\n--- got\n{}\n--- full output\n{}",
                relative(target),
                expected.join("\n"),
                got.join("\n"),
                stdout(&output)
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} fixture(s) differ:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
    cases.len()
}

#[test]
fn every_invalid_fixture_reports_exactly_its_expected_diagnostics() {
    let count = check_group("invalid", 1);
    assert!(count >= 40, "only {count} invalid fixtures");
}

#[test]
fn valid_fixtures_load_with_exactly_their_expected_warnings() {
    let count = check_group("valid", 0);
    assert!(count >= 3, "only {count} valid fixtures");
}

#[test]
fn every_fixture_has_an_expected_file() {
    for group in ["invalid", "valid"] {
        let dir = root().join("tests/fixtures").join(group);
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if name.ends_with(".expected") {
                continue;
            }
            let stem = name.strip_suffix(".yaml").unwrap_or(&name);
            assert!(
                dir.join(format!("{stem}.expected")).exists(),
                "{} has no .expected file",
                relative(&path)
            );
        }
    }
}
