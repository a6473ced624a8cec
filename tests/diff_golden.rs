//! Golden tests of `tbotctl diff`: the exact output and exit code for no change, each kind of
//! change, invalid input, and nothing applied yet. `TBOT_BLESS=1` rewrites the expected files after
//! an intended change of wording; review the diff.

mod common;

use std::path::Path;

use tbot::manifest::{Input, load};
use tbot::store::Store;

/// A copy of the quickstart in `<tmp>/etc` whose storage is `<tmp>/state`, applied there (as the
/// daemon records it) unless `applied` is false.
fn setup(applied: bool) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let etc = dir.path().join("etc");
    std::fs::create_dir(&etc).unwrap();
    for entry in std::fs::read_dir(common::root().join("manifests/quickstart")).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace(
                "/tmp/tbot-quickstart/state",
                &dir.path().join("state").display().to_string(),
            )
            .replace(
                "/tmp/tbot-quickstart/admin.sock",
                &dir.path().join("admin.sock").display().to_string(),
            );
        std::fs::write(etc.join(path.file_name().unwrap()), text).unwrap();
    }
    if applied {
        let loaded = load(&[Input::Dir(etc)]).unwrap();
        assert!(!loaded.has_errors());
        let store = Store::open(&dir.path().join("state")).unwrap();
        tbot::controller::inventory::save(&store, &loaded.state).unwrap();
    }
    dir
}

fn edit(dir: &Path, file: &str, from: &str, to: &str) {
    let path = dir.join("etc").join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains(from), "{file} has no {from:?}");
    std::fs::write(&path, text.replace(from, to)).unwrap();
}

fn check(name: &str, dir: &Path, extra: &[&str], code: i32) {
    let etc = dir.join("etc");
    let mut args = vec!["diff", "--dir", etc.to_str().unwrap()];
    args.extend(extra);
    let out = common::tbotctl(&args);
    let text = format!("{}{}", common::stdout(&out), String::from_utf8_lossy(&out.stderr))
        .replace(dir.to_str().unwrap(), "$DIR");
    let text = format!("exit {}\n{text}", out.status.code().unwrap());
    let expected_path = common::root()
        .join("tests/fixtures/diff")
        .join(format!("{name}.expected"));
    if std::env::var_os("TBOT_BLESS").is_some() {
        std::fs::write(&expected_path, &text).unwrap();
    }
    let expected = std::fs::read_to_string(&expected_path).unwrap_or_default();
    assert_eq!(text, expected, "{name}: run with TBOT_BLESS=1 to accept");
    assert_eq!(out.status.code(), Some(code), "{name}");
}

#[test]
fn no_change_exits_0() {
    let dir = setup(true);
    edit(
        dir.path(),
        "role.yaml",
        "kind: role",
        "# a reviewed comment\nkind: role",
    );
    check("no_change", dir.path(), &[], 0);
}

#[test]
fn a_workload_identity_edit_shows_its_diff_and_the_reissue() {
    let dir = setup(true);
    edit(dir.path(), "workload-identity.yaml", "/user/", "/people/");
    check("workload_identity_edit", dir.path(), &[], 1);
}

#[test]
fn a_role_edit_redecides_the_identities() {
    let dir = setup(true);
    edit(dir.path(), "role.yaml", "verbs: [read, list]", "verbs: [read]");
    check("role_edit", dir.path(), &[], 1);
}

#[test]
fn a_token_edit_rejoins_and_masks_the_secret_unless_asked() {
    let dir = setup(true);
    edit(
        dir.path(),
        "bot.yaml",
        "  join_method: token\n  bot_name",
        "  join_method: token\n  bot_name",
    );
    edit(
        dir.path(),
        "bot.yaml",
        "name: quickstart-token-change-me\n",
        "name: quickstart-token-change-me\n  expires: '2099-01-01T00:00:00Z'\n",
    );
    check("token_edit", dir.path(), &[], 1);
    check("token_edit_show_secrets", dir.path(), &["--show-secrets"], 1);
}

#[test]
fn an_issuance_log_edit_says_what_is_kept() {
    let dir = setup(true);
    edit(
        dir.path(),
        "cluster.yaml",
        "    key_algorithm: ecdsa-p256",
        "    key_algorithm: ecdsa-p256\n  issuance_log: {history: 72h, max_mib: 256}",
    );
    check("issuance_log_edit", dir.path(), &[], 1);
}

#[test]
fn a_listen_edit_rebinds() {
    let dir = setup(true);
    edit(dir.path(), "tbot.yaml", "workload.sock", "moved.sock");
    check("listen_edit", dir.path(), &[], 1);
}

#[test]
fn a_storage_edit_requires_a_restart() {
    let dir = setup(true);
    edit(
        dir.path(),
        "tbot.yaml",
        "renewal_interval: 20m",
        "renewal_interval: 20m\n",
    );
    edit(dir.path(), "tbot.yaml", "admin.sock", "other.sock");
    check("restart_required", dir.path(), &[], 1);
}

#[test]
fn an_added_and_a_deleted_identity() {
    let dir = setup(true);
    edit(
        dir.path(),
        "tbot.yaml",
        "    selector:\n      name: quickstart\n",
        "    selector:\n      labels:\n        app: quickstart\n",
    );
    std::fs::remove_file(dir.path().join("etc/workload-identity.yaml")).unwrap();
    std::fs::write(
        dir.path().join("etc/new.yaml"),
        "kind: workload_identity\nversion: v1\nmetadata:\n  name: new\n  labels:\n    app: quickstart\nspec:\n  spiffe:\n    id: /new\n",
    )
    .unwrap();
    check("add_and_delete", dir.path(), &[], 1);
}

#[test]
fn invalid_input_exits_2_with_the_report() {
    let dir = setup(true);
    edit(dir.path(), "role.yaml", "  allow:", "  alow:");
    check("invalid_input", dir.path(), &[], 2);
}

#[test]
fn nothing_applied_yet_shows_everything_as_new() {
    let dir = setup(false);
    check("nothing_applied", dir.path(), &[], 1);
}
