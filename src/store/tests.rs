use super::*;
use crate::error::Explain;

#[test]
fn writes_replace_files_atomically_with_the_right_modes() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store.write("issuer/x/ca-1.key", b"secret", Secrecy::Secret).unwrap();
    store.write("issuer/x/ca-1.der", b"public", Secrecy::Public).unwrap();
    store.write("issuer/x/ca-1.der", b"public 2", Secrecy::Public).unwrap();
    let mode = |name: &str| fs::metadata(dir.path().join(name)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode("issuer/x/ca-1.key"), 0o600);
    assert_eq!(mode("issuer/x/ca-1.der"), 0o644);
    assert_eq!(mode("issuer/x"), 0o700);
    assert_eq!(store.read("issuer/x/ca-1.der").unwrap().unwrap(), b"public 2");
    assert_eq!(store.read("issuer/x/missing").unwrap(), None);
    let leftovers: Vec<_> = fs::read_dir(dir.path().join("issuer/x"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.contains(".tmp."))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn a_second_store_on_the_same_directory_is_refused_naming_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    let first = Store::open(dir.path()).unwrap();
    let err = Store::open(dir.path()).unwrap_err();
    let message = err.to_string();
    assert!(message.contains("in use by another tbot"), "{message}");
    assert!(message.contains(&format!("pid {}", std::process::id())), "{message}");
    assert!(!err.is_transient());
    drop(first);
    Store::open(dir.path()).expect("the lock is released with the store");
}

#[test]
fn a_damaged_json_file_is_reported_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store.write("bots.json", b"{not json", Secrecy::Public).unwrap();
    let err = store.read_json::<serde_json::Value>("bots.json").unwrap_err();
    assert!(err.to_string().contains("bots.json is damaged"), "{err}");
}

#[test]
fn a_name_that_would_leave_the_store_is_refused_on_either_backend_and_nothing_is_written() {
    let outer = tempfile::tempdir().unwrap();
    let inside = outer.path().join("store");
    for store in [Store::open(&inside).unwrap(), Store::memory()] {
        for name in ["../escaped", "/tmp/absolute", "a//b", "a/./b", "a/..", "", "a/b\0c"] {
            let err = store.write(name, b"x", Secrecy::Public).unwrap_err();
            assert!(matches!(err, StoreError::Refused { .. }), "{name:?}: {err}");
            assert!(
                err.to_string().contains("would not stay inside the store") || name.contains('\0'),
                "{err}"
            );
            assert!(!err.is_transient() && err.hint().contains("bug in tbot"), "{err}");
            for refused in [
                store.read(name).map(|_| ()),
                store.remove(name),
                store.list(name).map(|_| ()),
                store.list_dirs(name).map(|_| ()),
            ] {
                assert!(
                    matches!(refused, Err(StoreError::Refused { .. })),
                    "{name:?}: {refused:?}"
                );
            }
        }
        // Plain names, and a directory listed with its trailing `/`, still work.
        store.write("a/b.json", b"1", Secrecy::Public).unwrap();
        assert_eq!(store.list("a/").unwrap(), ["a/b.json"]);
    }
    assert!(!outer.path().join("escaped").exists());
    let left: Vec<_> = fs::read_dir(outer.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["store"], "nothing was written beside the store");
}

#[test]
fn memory_stores_keep_files_without_touching_the_disk() {
    let store = Store::memory();
    store.write("a/b", b"x", Secrecy::Secret).unwrap();
    assert_eq!(store.read("a/b").unwrap().unwrap(), b"x");
    assert_eq!(store.describe(), "memory");
}
