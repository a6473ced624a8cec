//! `tbotctl validate` and `tbotctl schema` as a user runs them: the real binary, real files.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use common::{pinned_lines, root, stdout, tbotctl};
use tbot::manifest::schema;
use tbot::resource::Kind;

#[test]
fn the_guide_and_the_quickstart_validate_ok() {
    let guide = tbotctl(&["validate", "--dir", "manifests/guide"]);
    assert_eq!(guide.status.code(), Some(0), "{}", stdout(&guide));
    assert_eq!(
        stdout(&guide),
        "ok: 5 documents (1 agent config, 1 bot, 1 token, 1 role, 1 workload_identity)\n"
    );
    let quickstart = tbotctl(&["validate", "--dir", "manifests/quickstart"]);
    assert_eq!(quickstart.status.code(), Some(0), "{}", stdout(&quickstart));
    assert!(stdout(&quickstart).starts_with("ok: 6 documents (1 agent config, 1 cluster, "));
}

#[test]
fn directories_and_files_combine_into_one_set() {
    // The guide without its agent config, plus the agent config given as a file.
    let dir = tempfile::tempdir().unwrap();
    for name in ["bot.yaml", "bot-token.yaml", "role.yaml", "workload-identity.yaml"] {
        fs::copy(root().join("manifests/guide").join(name), dir.path().join(name)).unwrap();
    }
    let agent = root().join("manifests/guide/tbot.yaml");
    let out = tbotctl(&[
        "validate",
        "--dir",
        dir.path().to_str().unwrap(),
        "-f",
        agent.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
}

/// Writes the guide into a fresh directory and returns it, for tests that add one bad file.
fn guide_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in fs::read_dir(root().join("manifests/guide")).unwrap() {
        let path = entry.unwrap().path();
        fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
    }
    dir
}

#[test]
fn a_file_over_one_mebibyte_is_one_diagnostic_and_the_rest_loads() {
    let dir = guide_copy();
    let big = dir.path().join("big.yaml");
    fs::write(&big, format!("# {}\n", "x".repeat(1024 * 1024))).unwrap();
    let out = tbotctl(&["validate", "--dir", dir.path().to_str().unwrap()]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert_eq!(
        pinned_lines(&text),
        [
            format!(
                "{}: error: file is 1048579 bytes; the limit is 1048576 (1 MiB)",
                big.display()
            ),
            "invalid: 1 error, 0 warnings in 1 file; nothing was changed".to_owned(),
        ]
    );
}

#[test]
fn a_fifo_named_like_a_document_is_refused_without_blocking() {
    let dir = guide_copy();
    let fifo = dir.path().join("pipe.yaml");
    let made = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo runs");
    assert!(made.success());
    let out = tbotctl(&["validate", "--dir", dir.path().to_str().unwrap()]);
    assert_eq!(
        pinned_lines(&stdout(&out))[0],
        format!(
            "{}: error: not a regular file (a pipe, socket or device)",
            fifo.display()
        )
    );
}

#[test]
fn an_unreadable_file_is_one_diagnostic_and_the_rest_loads() {
    let dir = guide_copy();
    let secret = dir.path().join("zz-private.yaml");
    fs::copy(root().join("manifests/guide/bot.yaml"), &secret).unwrap();
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o000)).unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    // Root reads any file, so run the check as `nobody` when the tests run as root.
    let tbotctl = env!("CARGO_BIN_EXE_tbotctl");
    let mut command = if is_root() {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", tbotctl]);
        c
    } else {
        Command::new(tbotctl)
    };
    let out = command
        .args(["validate", "--dir", dir.path().to_str().unwrap()])
        .output()
        .expect("tbotctl runs");
    let text = stdout(&out);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        pinned_lines(&text),
        [
            format!("{}: error: cannot read: permission denied", secret.display()),
            "invalid: 1 error, 0 warnings in 1 file; nothing was changed".to_owned(),
        ]
    );
}

fn is_root() -> bool {
    let out = Command::new("id").arg("-u").output().expect("id runs");
    String::from_utf8_lossy(&out.stdout).trim() == "0"
}

#[test]
fn json_output_gives_every_diagnostic_with_its_position() {
    let out = tbotctl(&[
        "validate",
        "-o",
        "json",
        "-f",
        "tests/fixtures/invalid/bot-typo-in-spec.yaml",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON output");
    assert_eq!(report["valid"], false);
    let d = &report["diagnostics"][0];
    assert_eq!(d["severity"], "error");
    assert_eq!(d["location"]["path"], "tests/fixtures/invalid/bot-typo-in-spec.yaml");
    assert_eq!(d["location"]["line"], 6);
    assert_eq!(d["location"]["column"], 3);
    assert_eq!(d["message"], "unknown field `rols`");
    assert!(d["hint"].as_str().unwrap().starts_with("did you mean `roles`?"));
}

/// A field under another name: named at the unknown field, root cause first, with the field it
/// stands for; the missing field it leaves is not a second error.
#[test]
fn a_field_far_from_its_name_gets_a_did_you_mean() {
    for (fixture, line, wanted) in [
        (
            "federation-field-under-another-name",
            9,
            "did you mean `bundle_endpoint_url`? It is required here and missing",
        ),
        (
            "federation-url-for-bundle-endpoint-url",
            9,
            "did you mean `bundle_endpoint_url`?",
        ),
        ("cluster-rotation-field-half-named", 8, "did you mean `prepare_before`?"),
    ] {
        let path = format!("tests/fixtures/invalid/{fixture}.yaml");
        let out = tbotctl(&["validate", "-o", "json", "-f", &path]);
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON output");
        let diagnostics = report["diagnostics"].as_array().unwrap();
        assert_eq!(diagnostics.len(), 1, "{fixture}: {report:#}");
        assert_eq!(diagnostics[0]["location"]["line"], line, "{fixture}");
        let hint = diagnostics[0]["hint"].as_str().unwrap();
        assert!(hint.starts_with(wanted), "{fixture}: {hint}");
    }
}

#[test]
fn a_missing_directory_is_an_io_error_with_exit_2() {
    let out = tbotctl(&["validate", "--dir", "no/such/dir"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("no/such/dir: error: cannot read directory: no such file or directory"),
        "{err}"
    );
    assert!(err.contains("hint:"), "{err}");
}

#[test]
fn usage_errors_exit_2() {
    assert_eq!(tbotctl(&["validate", "--frobnicate"]).status.code(), Some(2));
    assert_eq!(tbotctl(&["schema", "bots"]).status.code(), Some(2));
}

#[test]
fn an_admin_command_without_a_directory_says_how_to_find_the_daemon() {
    // Only where the default directory does not exist (a development machine, CI).
    if std::path::Path::new("/etc/tbot.d").exists() {
        return;
    }
    for args in [&["rotate", "ca"][..], &["status"], &["get"]] {
        let out = tbotctl(args);
        let said = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{said}");
        assert!(
            said.contains("no daemon to talk to") && said.contains("--dir") && said.contains("--admin-socket"),
            "{args:?}: {said}"
        );
        assert!(!said.contains("create it"), "{args:?}: {said}");
    }
}

#[test]
fn one_file_of_1700_small_documents_loads() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("roles.yaml");
    let docs: Vec<String> = (0..1700)
        .map(|i| format!("kind: role\nversion: v7\nmetadata: {{name: r{i}}}\nspec: {{allow: {{workload_identity_labels: {{a: b}}}}}}\n"))
        .collect();
    std::fs::write(&file, docs.join("---\n")).unwrap();
    let out = tbotctl(&["validate", "-f", file.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}{}",
        stdout(&out),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout(&out).contains("1700 documents"), "{}", stdout(&out));
}

#[test]
fn snippets_underline_the_offending_key() {
    let out = tbotctl(&["validate", "-f", "tests/fixtures/invalid/bot-typo-in-spec.yaml"]);
    assert!(
        stdout(&out).contains("6 |   rols: [issuer]\n  |   ^^^^\n"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn token_secrets_are_not_quoted_in_diagnostics() {
    let out = tbotctl(&["validate", "--dir", "tests/fixtures/invalid/onboarding-token-unknown"]);
    assert!(!stdout(&out).contains("another-secret"), "{}", stdout(&out));
    let out = tbotctl(&["validate", "--dir", "tests/fixtures/invalid/duplicate-token-names"]);
    assert!(!stdout(&out).contains("secret-token"), "{}", stdout(&out));
}

#[test]
fn committed_schemas_match_the_types() {
    let mut stale = Vec::new();
    for kind in Kind::ALL {
        let path = root().join(format!("schemas/{kind}.schema.json"));
        let committed = fs::read_to_string(&path).unwrap_or_default();
        let generated = serde_json::to_string_pretty(&schema::schema(kind)).unwrap() + "\n";
        if committed != generated {
            stale.push(path.display().to_string());
        }
    }
    assert!(
        stale.is_empty(),
        "stale schemas: {}\nregenerate them with: cargo run --bin tbotctl -- schema --all --out schemas",
        stale.join(", ")
    );
}

#[test]
fn tbotctl_schema_prints_the_committed_schema() {
    let out = tbotctl(&["schema", "workload_identity"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        stdout(&out),
        fs::read_to_string(root().join("schemas/workload_identity.schema.json")).unwrap()
    );
}

#[test]
fn every_guide_document_passes_its_committed_schema_alone() {
    // An editor checks files against schemas/ with no tbot in the loop: the guide must pass there too.
    for (file, kind) in [
        ("bot.yaml", "bot"),
        ("bot-token.yaml", "token"),
        ("role.yaml", "role"),
        ("workload-identity.yaml", "workload_identity"),
        ("tbot.yaml", "agent_config"),
    ] {
        let schema: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(root().join(format!("schemas/{kind}.schema.json"))).unwrap())
                .unwrap();
        let text = fs::read_to_string(root().join("manifests/guide").join(file)).unwrap();
        let doc: serde_json::Value = serde_saphyr::from_str(&text).unwrap();
        let validator = jsonschema::validator_for(&schema).unwrap();
        let errors: Vec<String> = validator.iter_errors(&doc).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "{file}: {errors:?}");
    }
}

#[test]
fn a_closed_pipe_ends_a_command_quietly_instead_of_a_panic() {
    let quickstart = root().join("manifests/quickstart");
    let dir = quickstart.to_str().unwrap();
    for args in [
        &["schema", "workload_identity"][..],
        &["validate", "--dir", dir][..],
        &["diff", "--dir", dir][..],
    ] {
        // The reader is gone before tbotctl writes a byte: every write fails with EPIPE.
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = Command::new(env!("CARGO_BIN_EXE_tbotctl"))
            .args(args)
            .stdout(writer)
            .stderr(std::process::Stdio::piped())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(141), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}
