//! What the benchmarks share: an issuer for `bench.example.org` whose bot `b` joins with
//! `bench-token` and may issue every identity labelled `app: bench`.
#![allow(dead_code)]

use tbot::issuer::{LocalIssuer, Policy};
use tbot::manifest::{Input, load};
use tbot::store::Store;

const CLUSTER_SIDE: &str = "
kind: cluster
version: v1
metadata: {name: bench.example.org}
spec: {}
---
kind: role
version: v7
metadata: {name: r}
spec:
  allow:
    workload_identity_labels: {app: bench}
    rules: [{resources: [workload_identity], verbs: [read, list]}]
---
kind: bot
version: v1
metadata: {name: b}
spec: {roles: [r]}
---
kind: token
version: v2
metadata: {name: bench-token}
spec: {roles: [Bot], join_method: token, bot_name: b}
";

/// The issuer, over `store`, with one more `workload_identity` document (named `svc`).
pub fn issuer(workload_identity: &str, store: Store) -> LocalIssuer {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("docs.yaml");
    std::fs::write(&file, format!("{CLUSTER_SIDE}---\n{workload_identity}")).unwrap();
    let loaded = load(&[Input::File(file)]).unwrap();
    assert!(!loaded.has_errors(), "{:#?}", loaded.diagnostics);
    LocalIssuer::open(store, Policy::from_state(&loaded.state).unwrap()).unwrap()
}
