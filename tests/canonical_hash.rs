//! The canonical hash of an object moves only when what the object asks for changes.

use std::fs;

use tbot::manifest::{self, Input};
use tbot::resource::{Kind, ObjectRef};

fn hash_of(document: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wi.yaml");
    fs::write(&path, document).unwrap();
    let loaded = manifest::load(&[Input::File(path)]).unwrap();
    assert!(!loaded.has_errors(), "{:?}", loaded.diagnostics);
    loaded.state.objects[&ObjectRef::new(Kind::WorkloadIdentity, "web")]
        .hash
        .clone()
}

const BASE: &str = "kind: workload_identity
version: v1
metadata:
  name: web
spec:
  spiffe:
    id: /svc/web
    jwt:
      extra_claims:
        a: x
        b: y
      maximum_ttl: 1h
";

#[test]
fn comments_whitespace_key_order_and_equivalent_spellings_keep_the_hash() {
    let reordered = "# a comment\nversion: v1\nkind: workload_identity\nspec:\n  spiffe:\n    jwt:\n      maximum_ttl: 60m\n      extra_claims: {b: y,   a: x}\n    id: \"/svc/web\"\nmetadata: {name: web}\n";
    assert_eq!(hash_of(BASE), hash_of(reordered));
}

#[test]
fn a_changed_spec_changes_the_hash() {
    assert_ne!(hash_of(BASE), hash_of(&BASE.replace("/svc/web", "/svc/api")));
    assert_ne!(hash_of(BASE), hash_of(&BASE.replace("b: y", "b: z")));
}
