//! Minting speed: X509-SVIDs per second (a fresh P-256 key for the workload, then the issuer's whole
//! path through the `Issuer` trait: bot certificate check, RBAC, rules, templates, certificate
//! building and the CA signature) against a floor measured in the same run with the same crypto
//! provider: generating the key plus one CA signature. Likewise JWT-SVIDs against one ES256 signature.
//!
//! Run with `cargo bench --bench mint` (release build). Prints one table.

mod common;

use std::time::{Duration, Instant};

use rcgen::{KeyPair, PublicKeyData, SigningKey};
use tbot::issuer::{Attributes, Issuer, JoinProof, JoinRequest, JwtRequest, X509Request};
use tbot::store::Store;

const ROUNDS: usize = 5;
const HOUR: Duration = Duration::from_secs(3600);

const IDENTITY: &str = "
kind: workload_identity
version: v1
metadata: {name: svc, labels: {app: bench}}
spec:
  rules:
    allow:
      - conditions: [{attribute: workload.unix.uid, eq: {value: '1000'}}]
  spiffe:
    id: '/svc/{{workload.systemd.service}}'
    hint: bench
    x509: {dns_sans: ['{{workload.systemd.service}}.local']}
    jwt: {extra_claims: {team: '{{user.bot_name}}'}}
";

/// Operations per second over the best of several rounds of `n`.
fn rate(n: usize, mut op: impl FnMut()) -> f64 {
    let best = (0..ROUNDS)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..n {
                op();
            }
            start.elapsed()
        })
        .min()
        .unwrap();
    n as f64 / best.as_secs_f64()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        // A test runner asking for tests: this target has none of its own.
        return;
    }
    // `cargo bench` passes `--bench`; under `cargo test` the table is a quick smoke run.
    let n = if args.iter().any(|a| a == "--bench") { 2_000 } else { 20 };

    let issuer = common::issuer(IDENTITY, Store::memory());
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let bot_key = KeyPair::generate().unwrap();
    let bot = rt
        .block_on(issuer.join(JoinRequest {
            token: "bench-token".into(),
            public_key: bot_key.subject_public_key_info(),
            proof: JoinProof::Token,
            ttl: HOUR,
        }))
        .unwrap();
    let mut workload = Attributes::new();
    workload
        .set("workload.unix.uid", 1000)
        .set("workload.systemd.service", "bench");

    let ca_key = KeyPair::generate().unwrap();
    let tbs = vec![0x5au8; 600];
    let x509_floor = rate(n, || {
        let key = KeyPair::generate().unwrap();
        std::hint::black_box(key.subject_public_key_info());
        std::hint::black_box(ca_key.sign(&tbs).unwrap());
    });
    let x509 = rate(n, || {
        let key = KeyPair::generate().unwrap();
        let svid = rt
            .block_on(issuer.issue_x509(X509Request {
                bot_certificate: bot.der.clone(),
                identity: "svc".into(),
                workload: workload.clone(),
                public_key: key.subject_public_key_info(),
                ttl: HOUR,
            }))
            .unwrap();
        std::hint::black_box(svid);
    });
    let claims = vec![0x5au8; 300];
    let jwt_floor = rate(n, || {
        std::hint::black_box(ca_key.sign(&claims).unwrap());
    });
    let jwt = rate(n, || {
        let svid = rt
            .block_on(issuer.issue_jwt(JwtRequest {
                bot_certificate: bot.der.clone(),
                identity: "svc".into(),
                workload: workload.clone(),
                audience: vec!["bench".into()],
                ttl: HOUR,
            }))
            .unwrap();
        std::hint::black_box(svid);
    });

    println!("| minted ({n} per round, best of {ROUNDS}) | per second | µs each | floor | floor per second | ratio |");
    println!("|---|---:|---:|---|---:|---:|");
    for (what, ops, floor_name, floor) in [
        (
            "X509-SVID (P-256 key + issue_x509)",
            x509,
            "P-256 key generation + one ECDSA signature",
            x509_floor,
        ),
        ("JWT-SVID (issue_jwt)", jwt, "one ECDSA P-256 signature", jwt_floor),
    ] {
        println!(
            "| {what} | {ops:.0} | {:.1} | {floor_name} | {floor:.0} | {:.2}x |",
            1e6 / ops,
            floor / ops
        );
    }
}
