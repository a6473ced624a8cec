//! The plan's unit tests: one per row of the hot-reload table (docs/architecture.md).

use super::*;
use crate::manifest::{Input, load};

fn state(files: &[(&str, &str)]) -> DesiredState {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    let loaded = load(&[Input::Dir(dir.path().to_owned())]).unwrap();
    assert!(!loaded.has_errors(), "{:#?}", loaded.diagnostics);
    loaded.state
}

fn quickstart() -> Vec<(String, String)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests/quickstart");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            (
                p.file_name().unwrap().to_str().unwrap().to_owned(),
                std::fs::read_to_string(&p).unwrap(),
            )
        })
        .collect();
    files.sort();
    files
}

fn edited(file: &str, from: &str, to: &str) -> DesiredState {
    edited_many(&[(file, from, to)])
}

fn edited_many(edits: &[(&str, &str, &str)]) -> DesiredState {
    let files: Vec<(String, String)> = quickstart()
        .into_iter()
        .map(|(n, mut t)| {
            for (file, from, to) in edits {
                if n == *file {
                    assert!(t.contains(from), "{n} has no {from:?}");
                    t = t.replace(from, to);
                }
            }
            (n, t)
        })
        .collect();
    let refs: Vec<(&str, &str)> = files.iter().map(|(n, t)| (n.as_str(), t.as_str())).collect();
    state(&refs)
}

fn base() -> DesiredState {
    edited("tbot.yaml", "version: v2", "version: v2")
}

fn actions(p: &Plan) -> Vec<String> {
    p.steps.iter().map(|s| s.action.to_string()).collect()
}

#[test]
fn the_first_start_creates_the_ca_joins_binds_and_issues() {
    let p = plan(&base(), None);
    assert_eq!(
        actions(&p),
        [
            "+ ca quickstart.tbot.local: create (or load) the CA",
            "+ bot: join",
            "+ listener workload-identity-api: bind unix:///tmp/tbot-quickstart/workload.sock",
            "+ SVIDs of workload_identity/quickstart issued",
        ]
    );
    assert_eq!(p.counts(), (6, 0, 0));
}

#[test]
fn a_comment_changes_nothing() {
    let p = plan(
        &edited("role.yaml", "kind: role", "# a comment\nkind: role"),
        Some(&base()),
    );
    assert!(p.is_empty(), "{p:?}");
}

#[test]
fn a_workload_identity_edit_reissues_that_identity() {
    let p = plan(
        &edited("workload-identity.yaml", "hint: quickstart", "hint: other"),
        Some(&base()),
    );
    assert_eq!(actions(&p), ["~ SVIDs of workload_identity/quickstart reissued"]);
    assert_eq!(p.counts(), (0, 1, 0));
    assert_eq!(
        p.steps[0].causes,
        [ObjectRef::new(Kind::WorkloadIdentity, "quickstart")]
    );
}

#[test]
fn a_role_edit_redecides_every_identity() {
    let p = plan(
        &edited("role.yaml", "verbs: [read, list]", "verbs: [read]"),
        Some(&base()),
    );
    assert_eq!(actions(&p), ["~ SVIDs of workload_identity/quickstart reissued"]);
    assert_eq!(p.steps[0].causes, [ObjectRef::new(Kind::Role, "quickstart-issuer")]);
}

#[test]
fn a_listen_edit_rebinds() {
    let p = plan(&edited("tbot.yaml", "workload.sock", "other.sock"), Some(&base()));
    assert_eq!(
        actions(&p),
        [
            "~ listener workload-identity-api: rebind unix:///tmp/tbot-quickstart/workload.sock → unix:///tmp/tbot-quickstart/other.sock"
        ]
    );
}

#[test]
fn a_token_edit_rejoins() {
    let p = plan(
        &edited("bot.yaml", "bot_name: quickstart", "bot_name: quickstart\n  # edited\n"),
        Some(&base()),
    );
    assert!(p.is_empty(), "a comment in the token changes nothing");
    let p = plan(
        &edited(
            "bot.yaml",
            "name: quickstart-token-change-me\n",
            "name: quickstart-token-change-me\n  expires: '2099-01-01T00:00:00Z'\n",
        ),
        Some(&base()),
    );
    assert_eq!(actions(&p), ["~ bot: rejoin with the new terms"]);
}

#[test]
fn a_rotation_schedule_edit_reschedules_without_a_new_ca_and_a_validity_edit_rotates() {
    let p = plan(
        &edited(
            "cluster.yaml",
            "key_algorithm: ecdsa-p256",
            "key_algorithm: ecdsa-p256\n    rotation: {prepare_before: 2000h}\n  jwt:\n    validity: 720h",
        ),
        Some(&base()),
    );
    assert_eq!(
        actions(&p),
        [
            "~ ca rotation: successor prepared 2000h and activated 1460h before the active key's end; \
                 the active key keeps its dates",
            "~ jwt rotation: new keys valid 720h, successor prepared 360h and activated 120h before the \
                 active key's end; the active key keeps its dates",
        ]
    );
    let p = plan(
        &edited(
            "cluster.yaml",
            "key_algorithm: ecdsa-p256",
            "key_algorithm: ecdsa-p256\n    validity: 720h\n    rotation: {prepare_before: 300h}",
        ),
        Some(&base()),
    );
    assert_eq!(
        actions(&p)[0],
        "~ ca quickstart.tbot.local: prepare a CA with the new settings; in every bundle now, signing after 10m (`tbotctl rotate ca --force` activates it now)"
    );
    assert!(
        !actions(&p).iter().any(|a| a.starts_with("~ ca rotation")),
        "{:?}",
        actions(&p)
    );
}

#[test]
fn a_storage_edit_requires_a_restart() {
    let p = plan(
        &edited("tbot.yaml", "/tmp/tbot-quickstart/state", "/tmp/elsewhere"),
        Some(&base()),
    );
    assert_eq!(actions(&p), ["! storage changed: takes effect at the next restart"]);
}

#[test]
fn a_selector_edit_reconfigures_the_service() {
    let p = plan(&edited("tbot.yaml", "enabled: true", "enabled: false"), Some(&base()));
    assert_eq!(actions(&p), ["~ listener workload-identity-api: re-decide its callers"]);
}

#[test]
fn outputs_are_written_rewritten_on_an_edit_or_a_new_agent_lifetime_and_stopped() {
    // An output writes an identity that reads no workload attribute (its own document here).
    const OUTPUT: &str = "    attestors:\n      unix: {}\n      systemd:\n        enabled: true\n  - type: workload-identity-x509\n    name: files\n    selector: {name: files}\n    destination: {type: directory, path: /tmp/out}\n";
    const CLAIM: &str = "team: \"{{ strings.lower(user.bot_name) }}\"";
    let identity = format!(
        "{CLAIM}\n---\nkind: workload_identity\nversion: v1\nmetadata:\n  name: files\nspec:\n  spiffe:\n    id: /svc/files\n"
    );
    let with = |extra: &[(&str, &str, &str)]| {
        let mut edits = vec![
            (
                "tbot.yaml",
                "    attestors:\n      unix: {}\n      systemd:\n        enabled: true\n",
                OUTPUT,
            ),
            ("workload-identity.yaml", CLAIM, identity.as_str()),
        ];
        edits.extend_from_slice(extra);
        edited_many(&edits)
    };
    // The outputs' steps (the identity's own come and go with it).
    let outputs = |p: &Plan| -> Vec<String> { actions(p).into_iter().filter(|a| a.contains(" output ")).collect() };
    assert_eq!(
        outputs(&plan(&with(&[]), Some(&base()))),
        ["+ output files: write /tmp/out"]
    );
    let p = plan(
        &with(&[("tbot.yaml", "path: /tmp/out", "path: /tmp/elsewhere")]),
        Some(&with(&[])),
    );
    assert_eq!(
        outputs(&p),
        ["~ output files: issue again and replace the files in /tmp/elsewhere"]
    );
    // The output takes the agent's lifetime: a new one issues again (and re-decides the listener).
    let p = plan(
        &with(&[("tbot.yaml", "credential_ttl: 1h", "credential_ttl: 2h")]),
        Some(&with(&[])),
    );
    assert!(
        actions(&p).contains(&"~ output files: issue again and replace the files in /tmp/out".to_owned()),
        "{:?}",
        actions(&p)
    );
    assert_eq!(
        outputs(&plan(&base(), Some(&with(&[])))),
        ["- output files: stop renewing; the files in /tmp/out are left in place"]
    );
}

#[test]
fn a_trust_domain_edit_creates_a_ca_and_reissues_everything() {
    let p = plan(
        &edited("cluster.yaml", "name: quickstart.tbot.local", "name: other.tbot.local"),
        Some(&base()),
    );
    assert_eq!(
        actions(&p),
        [
            "+ ca other.tbot.local: create (or load) the CA",
            "~ SVIDs of workload_identity/quickstart reissued"
        ]
    );
}

#[test]
fn a_key_algorithm_edit_rotates_the_ca() {
    let p = plan(&edited("cluster.yaml", "ecdsa-p256", "ed25519"), Some(&base()));
    assert_eq!(
        actions(&p),
        [
            "~ ca quickstart.tbot.local: prepare a CA with the new settings; in every bundle now, signing after 10m (`tbotctl rotate ca --force` activates it now)",
        ]
    );
}

#[test]
fn a_deleted_identity_is_revoked_and_a_new_one_issued() {
    let renamed = edited_many(&[
        ("workload-identity.yaml", "name: quickstart\n", "name: renamed\n"),
        ("tbot.yaml", "name: quickstart\n", "name: renamed\n"),
    ]);
    let p = plan(&renamed, Some(&base()));
    assert_eq!(
        actions(&p),
        [
            "~ listener workload-identity-api: re-decide its callers",
            "+ SVIDs of workload_identity/renamed issued",
            "- SVIDs of workload_identity/quickstart revoked"
        ]
    );
    assert_eq!(p.counts(), (1, 1, 1));
}
