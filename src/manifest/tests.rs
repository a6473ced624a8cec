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
