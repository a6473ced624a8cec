//! Every input the fuzzers ever crashed on (`fuzz/regressions/<target>/`), and the seed corpus
//! (`fuzz/seeds/<target>/`), through the fuzz targets' bodies (`tbot::fuzzing`) on stable Rust, so a
//! crash once found stays fixed. `fuzz/README.md` says how to fuzz and how to add an input here.

use std::path::PathBuf;

fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut out = Vec::new();
    for dir in ["regressions", "seeds"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_file() && path.file_name().is_some_and(|n| n != ".gitkeep") {
                out.push((path.clone(), std::fs::read(&path).unwrap()));
            }
        }
    }
    out.sort();
    out
}

fn run(target: &str, body: fn(&[u8])) {
    let inputs = inputs(target);
    assert!(!inputs.is_empty(), "no seeds for `{target}`");
    for (path, data) in inputs {
        let outcome = std::panic::catch_unwind(|| body(&data));
        assert!(outcome.is_ok(), "`{target}` panics on {}", path.display());
    }
}

#[test]
fn the_loader_survives_every_recorded_input() {
    run("load", tbot::testing::fuzz::load);
}

#[test]
fn the_template_parser_survives_every_recorded_input() {
    run("template", tbot::testing::fuzz::template);
}

#[test]
fn the_spiffe_id_parser_survives_every_recorded_input() {
    run("spiffe_id", tbot::testing::fuzz::spiffe_id);
}

#[test]
fn the_issuer_api_survives_every_recorded_input() {
    run("issuer_request", tbot::testing::fuzz::issuer_request);
}

/// A stable-Rust stand-in for the fuzzer between fuzzing runs: every seed, mutated 3,000 times by a
/// fixed-seed generator (bytes flipped, cut, repeated, spliced), goes through the issuer API's body.
#[test]
fn the_issuer_api_survives_mutated_seeds() {
    let seeds = inputs("issuer_request");
    assert!(!seeds.is_empty());
    let mut state = 0x9e3779b97f4a7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for round in 0..3000 {
        let (_, seed) = &seeds[round % seeds.len()];
        let mut data = seed.clone();
        for _ in 0..1 + next() % 4 {
            if data.len() < 2 {
                data.push(next() as u8);
                continue;
            }
            let at = 1 + (next() as usize) % (data.len() - 1);
            match next() % 4 {
                0 => data[at] ^= 1 << (next() % 8),
                1 => data.truncate(at),
                2 => data.insert(at, next() as u8),
                _ => {
                    let (_, other) = &seeds[(next() as usize) % seeds.len()];
                    data.extend_from_slice(&other[1.min(other.len())..]);
                }
            }
        }
        let outcome = std::panic::catch_unwind(|| tbot::testing::fuzz::issuer_request(&data));
        assert!(outcome.is_ok(), "the issuer API panics on {data:?}");
    }
}

/// Writes the issuer API's seeds (`TBOT_BLESS=1`): one well-formed message of each kind the body
/// handles, behind the byte that picks it.
#[test]
fn issuer_request_seeds_are_well_formed_messages() {
    use prost::Message;
    use tbot::issuer::wire::proto;
    let attr = |name: &str, value: &str| proto::Attribute {
        name: name.into(),
        values: vec![value.into()],
    };
    let key = rcgen::KeyPair::generate().unwrap();
    let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
    let issue_x509 = |identity: &str, workload: &[proto::Attribute], public_key: Vec<u8>| {
        proto::IssueX509Request {
            identity: identity.into(),
            workload: workload.to_vec(),
            public_key,
            ttl_seconds: 3600,
        }
        .encode_to_vec()
    };
    // A P-256 point that is not on the curve.
    let mut off_curve = hex("3059301306072a8648ce3d020106082a8648ce3d030107034200");
    off_curve.push(0x04);
    off_curve.extend([7u8; 64]);
    // An Ed25519 key of 31 bytes.
    let mut short_ed25519 = hex("3029300506032b6570032000");
    short_ed25519.extend([1u8; 31]);
    let rsa = rcgen::PublicKeyData::subject_public_key_info(
        &rcgen::KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048).unwrap(),
    );
    let seeds: Vec<(&str, u8, Vec<u8>)> = vec![
        (
            "resolve-name",
            0,
            proto::ResolveRequest {
                selector: Some(proto::resolve_request::Selector::Name("wi".into())),
                workload: vec![attr("workload.unix.uid", "1000")],
            }
            .encode_to_vec(),
        ),
        (
            "issue-x509",
            1,
            proto::IssueX509Request {
                identity: "wi".into(),
                workload: vec![attr("workload.unix.uid", "1000"), attr("user.name", "forged")],
                public_key: spki.clone(),
                ttl_seconds: 3600,
            }
            .encode_to_vec(),
        ),
        (
            "issue-jwt",
            2,
            proto::IssueJwtRequest {
                identity: "wi".into(),
                workload: vec![attr("workload.unix.uid", "0")],
                audience: vec!["api.example.com".into()],
                ttl_seconds: 300,
            }
            .encode_to_vec(),
        ),
        (
            "renew",
            3,
            proto::RenewRequest {
                public_key: spki.clone(),
                proof: vec![0x30, 0x06, 0x02, 0x01, 0x01, 0x02, 0x01, 0x01],
                ttl_seconds: 3600,
            }
            .encode_to_vec(),
        ),
        (
            "join-init",
            4,
            proto::JoinRequest {
                request: Some(proto::join_request::Request::Init(proto::ClientInit {
                    token_name: "t".into(),
                    join_method: "token".into(),
                    public_key: spki.clone(),
                    ttl_seconds: 3600,
                })),
            }
            .encode_to_vec(),
        ),
        (
            "issue-x509-granted",
            1,
            issue_x509("wi", &[attr("workload.unix.uid", "1000")], spki.clone()),
        ),
        // The shapes of issue 26: attribute values that would add a segment or are not numbers,
        // the denied identity asked for by name and by label, and keys that are not keys.
        (
            "issue-x509-uid-slash",
            1,
            issue_x509("wi", &[attr("workload.unix.uid", "0/db")], spki.clone()),
        ),
        (
            "issue-x509-uid-fullwidth-digits",
            1,
            issue_x509("wi", &[attr("workload.unix.uid", "\u{ff11}\u{ff12}")], spki.clone()),
        ),
        (
            "issue-x509-uid-long",
            1,
            issue_x509("wi", &[attr("workload.unix.uid", &"9".repeat(4096))], spki.clone()),
        ),
        (
            "issue-x509-denied-identity",
            1,
            issue_x509("db", &[attr("workload.unix.uid", "0")], spki.clone()),
        ),
        (
            "issue-x509-off-curve-key",
            1,
            issue_x509("wi", &[attr("workload.unix.uid", "0")], off_curve),
        ),
        (
            "issue-x509-short-ed25519-key",
            1,
            issue_x509("wi", &[attr("workload.unix.uid", "0")], short_ed25519),
        ),
        (
            "issue-x509-rsa-key",
            1,
            issue_x509("wi", &[attr("workload.unix.uid", "0")], rsa),
        ),
        (
            "resolve-denied-labels",
            0,
            proto::ResolveRequest {
                selector: Some(proto::resolve_request::Selector::Labels(proto::Labels {
                    labels: [("tier".to_owned(), "db".to_owned())].into(),
                })),
                workload: vec![attr("workload.unix.uid", "0")],
            }
            .encode_to_vec(),
        ),
        (
            "issue-jwt-uid-word",
            2,
            proto::IssueJwtRequest {
                identity: "wi".into(),
                workload: vec![attr("workload.unix.uid", "root")],
                audience: vec!["api.example.com".into()],
                ttl_seconds: 300,
            }
            .encode_to_vec(),
        ),
        (
            "renew-random-key",
            3,
            proto::RenewRequest {
                public_key: vec![0x5a; 64],
                proof: vec![0x30, 0x06, 0x02, 0x01, 0x01, 0x02, 0x01, 0x01],
                ttl_seconds: 3600,
            }
            .encode_to_vec(),
        ),
        (
            "watch-update",
            6,
            proto::WatchUpdate {
                bundle: Some(proto::Bundle {
                    trust_domain: "fuzz.example".into(),
                    x509_authorities: vec![vec![0x30, 0x00]],
                    jwt_keys: vec!["{\"kty\":\"EC\"}".into()],
                    sequence: 2,
                    ..Default::default()
                }),
                policy_revision: 7,
                identities: vec!["wi".into()],
                all: false,
            }
            .encode_to_vec(),
        ),
    ];
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/issuer_request");
    let mut outcomes = Vec::new();
    for (name, which, body) in seeds {
        let mut data = vec![which];
        data.extend(body);
        let path = dir.join(name);
        if std::env::var_os("TBOT_BLESS").is_some() {
            std::fs::write(&path, &data).unwrap();
        }
        assert!(
            path.exists(),
            "missing seed {}; write it with TBOT_BLESS=1",
            path.display()
        );
        outcomes.push((name, tbot::testing::fuzz::issuer_request_outcome(&data)));
    }
    // What each seed gets: the granted ones are granted (so the body's checks of a grant run), and
    // each of issue 26's shapes is refused for what it is.
    use tonic::Code::*;
    let expected = [
        ("resolve-name", Ok),
        ("issue-x509", Ok),
        ("issue-jwt", Ok),
        ("renew", Unauthenticated),
        ("join-init", PermissionDenied),
        ("issue-x509-granted", Ok),
        ("issue-x509-uid-slash", InvalidArgument),
        ("issue-x509-uid-fullwidth-digits", InvalidArgument),
        ("issue-x509-uid-long", InvalidArgument),
        ("issue-x509-denied-identity", PermissionDenied),
        ("issue-x509-off-curve-key", InvalidArgument),
        ("issue-x509-short-ed25519-key", InvalidArgument),
        ("issue-x509-rsa-key", InvalidArgument),
        ("resolve-denied-labels", Ok),
        ("issue-jwt-uid-word", InvalidArgument),
        ("renew-random-key", InvalidArgument),
    ];
    for (name, code) in expected {
        let got = outcomes.iter().find(|(n, _)| *n == name).and_then(|(_, c)| *c);
        assert_eq!(got, Some(code), "seed {name}");
    }
}

fn hex(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
        .collect()
}
