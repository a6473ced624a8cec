//! Helpers shared by the integration tests: run the real binaries and read their output.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository root; the tests run the binaries from here so that printed paths are relative.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `tbotctl` with `args` from the repository root.
pub fn tbotctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tbotctl"))
        .args(args)
        .current_dir(root())
        .output()
        .expect("tbotctl runs")
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The lines of `tbotctl validate` output that a fixture pins: every `path[:line:col]: severity:`
/// line (errors, warnings, notes) and the closing `ok:`/`invalid:` line.
pub fn pinned_lines(text: &str) -> Vec<String> {
    text.lines()
        .filter(|line| {
            line.starts_with("ok: ")
                || line.starts_with("invalid: ")
                || [": error: ", ": warning: ", ": note: "].iter().any(|tag| {
                    line.split_once(tag)
                        .is_some_and(|(location, _)| !location.starts_with(' ') && !location.contains(" | "))
                })
        })
        .map(str::to_owned)
        .collect()
}

/// The path as the tests pass it to tbotctl: relative to the repository root.
pub fn relative(path: &Path) -> String {
    path.strip_prefix(root()).unwrap_or(path).display().to_string()
}

/// The issuer's policy from YAML documents (checked to load without errors).
pub fn policy(text: &str) -> tbot::issuer::Policy {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("docs.yaml");
    std::fs::write(&file, text).unwrap();
    let loaded = tbot::manifest::load(&[tbot::manifest::Input::File(file)]).unwrap();
    assert!(!loaded.has_errors(), "{:#?}", loaded.diagnostics);
    tbot::issuer::Policy::from_state(&loaded.state).unwrap()
}

/// DER as PEM with `label`.
pub fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!("-----BEGIN {label}-----\n{}\n-----END {label}-----\n", lines.join("\n"))
}

/// Runs `openssl` with `args`; panics with its output when it fails.
pub fn openssl(args: &[&str]) -> String {
    let out = Command::new("openssl").args(args).output().expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
