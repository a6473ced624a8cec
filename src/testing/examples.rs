//! Example documents and the policy of documents given as text, for unit tests, fuzzing and
//! benches.

/// A trust domain (`example.org`), a bot `b` with the token `t` and a role that may issue
/// everything but what is labelled `tier: db`, the identity `wi` (`/u/<uid>`) and the denied `db`
/// (`/u/<uid>/db`, whose ID a value of `wi` holding a `/` would be): what unit tests and the
/// `issuer_request` fuzz target run against.
pub const EXAMPLE_DOCUMENTS: &str = "
kind: cluster
version: v1
metadata: {name: example.org}
spec: {}
---
kind: role
version: v7
metadata: {name: r}
spec:
  allow:
    workload_identity_labels: {'*': '*'}
    rules: [{resources: [workload_identity], verbs: [read, list]}]
  deny:
    workload_identity_labels: {tier: db}
---
kind: bot
version: v1
metadata: {name: b}
spec: {roles: [r]}
---
kind: token
version: v2
metadata: {name: t}
spec: {roles: [Bot], join_method: token, bot_name: b}
---
kind: workload_identity
version: v1
metadata: {name: wi}
spec: {spiffe: {id: '/u/{{workload.unix.uid}}'}}
---
kind: workload_identity
version: v1
metadata: {name: db, labels: {tier: db}}
spec: {spiffe: {id: '/u/{{workload.unix.uid}}/db'}}
";

/// The policy of documents given as text (a set of loose files: references need not resolve).
/// Panics on a document error: for tests and fuzzing, whose documents are fixed.
pub fn policy_from_text(text: &str) -> crate::issuer::Policy {
    let loaded = crate::manifest::load_bytes(std::path::Path::new("documents.yaml"), text.as_bytes().to_vec());
    assert!(!loaded.has_errors(), "{:#?}", loaded.diagnostics);
    crate::issuer::Policy::from_state(&loaded.state).expect("a policy")
}
