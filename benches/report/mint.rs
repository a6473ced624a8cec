//! Minting speed: X509-SVIDs per second (a fresh P-256 key for the workload, then the issuer's whole
//! path through the `Issuer` trait: bot certificate check, RBAC, rules, templates, certificate
//! building and the CA signature) against a floor measured in the same run with the same crypto
//! provider: generating the key plus one CA signature. Likewise JWT-SVIDs against one ES256 signature.

use std::time::{Duration, Instant};

use rcgen::{KeyPair, PublicKeyData, SigningKey};
use tbot::issuer::{Attributes, Issuer, JoinProof, JoinRequest, JwtRequest, X509Request};
use tbot::store::Store;

use crate::{Row, Scale, common};

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

pub fn run(scale: Scale) -> Vec<Row> {
    let n = scale.pick(2_000, 20);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let issuer = rt.block_on(common::issuer(IDENTITY, Store::memory()));
    let bot_key = KeyPair::generate().unwrap();
    let bot = rt
        .block_on(issuer.join(JoinRequest {
            token: "bench-token".into(),
            public_key: bot_key.subject_public_key_info(),
            proof: JoinProof::Token,
            ttl: HOUR,
            current: None,
            address: String::new(),
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

    let per_round = format!("{n} per round, best of {ROUNDS}");
    vec![
        Row::rate(
            "mint",
            format!("X509-SVIDs minted (new P-256 key + `issue_x509`; {per_round})"),
            x509,
            "P-256 key generation + one ECDSA signature",
            x509_floor,
        ),
        Row::rate(
            "mint",
            format!("JWT-SVIDs minted (`issue_jwt`; {per_round})"),
            jwt,
            "one ECDSA P-256 signature",
            jwt_floor,
        ),
    ]
}
