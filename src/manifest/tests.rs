//! The loader: what a reload reuses, and what it must see.

use super::*;

fn role(name: &str, label: &str) -> String {
    format!(
        "kind: role\nversion: v7\nmetadata:\n  name: {name}\nspec:\n  allow:\n    workload_identity_labels:\n      app: {label}\n"
    )
}

fn object<'a>(loaded: &'a Loaded, name: &str) -> &'a Arc<Object> {
    &loaded.state.objects[&ObjectRef::new(Kind::Role, name.to_owned())]
}

#[test]
fn a_reload_reuses_the_parse_of_every_file_that_did_not_change() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["a", "b", "c"] {
        std::fs::write(dir.path().join(format!("{name}.yaml")), role(name, "one")).unwrap();
    }
    let inputs = ["a", "b", "c"].map(|n| Input::File(dir.path().join(format!("{n}.yaml"))));
    let mut cache = LoadCache::default();
    let first = load_with(&inputs, &mut cache).unwrap();
    std::fs::write(dir.path().join("b.yaml"), role("b", "two")).unwrap();
    let second = load_with(&inputs, &mut cache).unwrap();
    assert!(Arc::ptr_eq(object(&first, "a"), object(&second, "a")));
    assert!(Arc::ptr_eq(object(&first, "c"), object(&second, "c")));
    assert!(object(&second, "b").source.contains("app: two"));
    assert_ne!(object(&first, "b").hash, object(&second, "b").hash);
}

#[test]
fn an_edit_that_keeps_the_size_and_the_mtime_is_still_seen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.yaml");
    std::fs::write(&path, role("r", "one")).unwrap();
    let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
    let inputs = [Input::File(path.clone())];
    let mut cache = LoadCache::default();
    load_with(&inputs, &mut cache).unwrap();
    // In place (same inode), same length, and the modification time put back.
    std::fs::write(&path, role("r", "two")).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    let loaded = load_with(&inputs, &mut cache).unwrap();
    assert!(object(&loaded, "r").source.contains("app: two"));
}

#[test]
fn files_that_appear_or_go_are_seen_and_the_cache_forgets_the_gone() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.yaml"), role("a", "one")).unwrap();
    let inputs = [Input::Dir(dir.path().to_owned())];
    let mut cache = LoadCache::default();
    load_with(&inputs, &mut cache).unwrap();
    std::fs::remove_file(dir.path().join("a.yaml")).unwrap();
    std::fs::write(dir.path().join("b.yaml"), role("b", "one")).unwrap();
    let loaded = load_with(&inputs, &mut cache).unwrap();
    let names: Vec<&str> = loaded.state.objects.keys().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["b"]);
    assert_eq!(cache.files.len(), 1);
    // A file that stopped being readable is an error again, not its cached parse.
    std::fs::write(dir.path().join("b.yaml"), "kind: [").unwrap();
    let loaded = load_with(&inputs, &mut cache).unwrap();
    assert!(loaded.has_errors());
    assert!(loaded.state.objects.is_empty());
}

fn identity(name: &str, label: &str, id: &str) -> String {
    format!(
        "kind: workload_identity\nversion: v1\nmetadata:\n  name: {name}\n  labels:\n    app: {label}\nspec:\n  rules:\n    allow:\n      - conditions:\n          - attribute: workload.unix.uid\n            eq:\n              value: \"0\"\n  spiffe:\n    id: \"{id}\"\n"
    )
}

/// Each edit, reloaded as a file event does it, against a full load of the same directory: an edit
/// that keeps what the cross-document checks read is patched in, and every other falls back; both
/// give exactly what a full load gives.
#[test]
fn an_edit_patched_into_the_last_load_gives_what_a_full_load_gives() {
    let dir = tempfile::tempdir().unwrap();
    let quickstart = Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests/quickstart");
    for entry in std::fs::read_dir(&quickstart).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    let file = |name: &str| dir.path().join(format!("{name}.yaml"));
    // A second service, by labels and without a docker attestor: an identity of its labels that
    // reads `workload.docker.*` is a warning on the agent config.
    let mut agent = std::fs::read_to_string(file("tbot")).unwrap();
    agent.push_str("  - type: workload-identity-api\n    name: many\n    listen: unix:///tmp/many.sock\n    selector:\n      labels:\n        app: many\n");
    std::fs::write(file("tbot"), agent).unwrap();
    std::fs::write(file("w1"), identity("w1", "many", "/w1")).unwrap();
    let two = |ttl: &str| {
        format!(
            "{}    x509:\n      maximum_ttl: {ttl}\n---\n{}",
            identity("w2a", "many", "/w2a"),
            identity("w2b", "many", "/w2b")
        )
    };
    std::fs::write(file("w2"), two("1h")).unwrap();
    std::fs::write(file("w3"), identity("w3", "few", "/w3")).unwrap();
    let inputs = [Input::Dir(dir.path().to_owned())];
    let mut cache = LoadCache::default();
    let first = load_with(&inputs, &mut cache).unwrap();
    assert!(!first.has_errors(), "{:?}", first.diagnostics);

    // (file, its new text, patched?)
    let edits: Vec<(&str, String, bool)> = vec![
        ("w1", identity("w1", "many", "/w1-edited"), true),
        (
            "w1",
            format!("# one\n# two\n\n{}", identity("w1", "many", "/w1-moved")),
            true,
        ),
        ("w2", two("2h"), true),
        ("w1", identity("w1", "other", "/w1"), false),
        ("w1", identity("w1-renamed", "many", "/w1"), false),
        ("w3", "kind: [".to_owned(), false),
        ("w3", identity("w3", "few", "/w3-fixed"), false),
        ("w3", identity("w3", "few", "/w3-again"), true),
        // A duplicate: the new file, then either of the two, points at the other.
        ("w4", identity("w3", "few", "/w4"), false),
        ("w4", identity("w3", "few", "/w4-edited"), false),
        ("w3", identity("w3", "few", "/w3-edited"), false),
        ("w4", identity("w4", "few", "/w4"), false),
        ("w4", identity("w4", "few", "/w4-edited"), true),
        ("w1", identity("w1", "many", "/w1-back"), false),
        (
            "w1",
            identity("w1", "many", "/{{workload.docker.container.name}}"),
            false,
        ),
        (
            "w1",
            identity("w1", "many", "/{{workload.docker.container.name}}/x"),
            true,
        ),
        ("quickstart", identity("quickstart", "quickstart", "/user/x"), false),
    ];
    for (i, (name, text, patched)) in edits.into_iter().enumerate() {
        std::fs::write(file(name), &text).unwrap();
        let changes = Changes::Paths([file(name)].into());
        let reloaded = load_changed(&inputs, &mut cache, &changes).unwrap();
        let full = load(&inputs).unwrap();
        assert_eq!(reloaded.patched, patched, "edit {i} of {name} patched: {patched}");
        assert!(!full.patched);
        assert_eq!(reloaded.state, full.state, "edit {i} of {name}");
        assert_eq!(reloaded.diagnostics, full.diagnostics, "edit {i} of {name}");
        assert_eq!(reloaded.files, full.files, "edit {i} of {name}");
    }
    assert!(
        load(&inputs)
            .unwrap()
            .diagnostics
            .iter()
            .any(|d| d.message.contains("`w1` reads `workload.docker.*`")),
        "the edits reached a cross-document warning"
    );
    // A file removed: listed no more, and its objects gone.
    std::fs::remove_file(file("w2")).unwrap();
    let reloaded = load_changed(&inputs, &mut cache, &Changes::Paths([file("w2")].into())).unwrap();
    assert_eq!(reloaded.state, load(&inputs).unwrap().state);
    assert!(!reloaded.state.objects.keys().any(|r| r.name.starts_with("w2")));
}
