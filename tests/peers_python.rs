//! The real daemon talked to by SPIFFE clients nobody here wrote, in Python: py-spiffe 0.3.2 and raw
//! grpcio (grpc C-core, as in Ruby, PHP and C++), with every `:authority` a gRPC client sends on a
//! unix socket; and Python `cryptography` (rust-asn1, strict DER) parsing every kind of certificate
//! the product emits.
//!
//! `scripts/test.sh` installs the peers into `target/test-venv`; with `CI=true` a missing peer fails
//! the test instead of skipping it.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use spiffe::WorkloadApiClient;

use common::{Daemon, QUICKSTART_ON_DISK, copy_manifests};

/// The test venv's python, when py-spiffe, grpcio and cryptography are installed in it.
fn python() -> Option<PathBuf> {
    common::venv_python("spiffe, grpc, cryptography")
}

/// Runs `tests/peers/spiffe_peer.py` with `args` and parses what it prints.
fn peer(python: &Path, args: &[&str]) -> Value {
    let out = Command::new(python)
        .arg(common::root().join("tests/peers/spiffe_peer.py"))
        .args(args)
        .env_remove("SPIFFE_ENDPOINT_SOCKET")
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "spiffe_peer.py {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("the peer prints JSON")
}

fn uid() -> u32 {
    std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").unwrap())
}

fn on_disk() -> Daemon {
    let (dir, socket) = copy_manifests("manifests/quickstart", &QUICKSTART_ON_DISK);
    Daemon::start(dir, socket)
}

#[test]
fn grpcio_is_served_whatever_authority_it_sends_on_the_workload_and_admin_sockets() {
    let Some(python) = python() else { return };
    let daemon = on_disk();
    let admin = daemon.dir.path().join("admin.sock");
    let result = peer(
        &python,
        &["authorities", daemon.socket.to_str().unwrap(), admin.to_str().unwrap()],
    );
    let forms = result.as_object().unwrap();
    assert_eq!(forms.len(), 6, "{result:#}");
    for (form, calls) in forms {
        for call in ["FetchX509SVID", "FetchJWTSVID", "FetchX509Bundles", "admin Status"] {
            assert_eq!(
                calls[call]["ok"], true,
                "{call} with :authority {form}: {:#}",
                calls[call]
            );
        }
        assert_eq!(
            calls["no header"]["code"], "INVALID_ARGUMENT",
            "without the security header, :authority {form}"
        );
    }
}

#[test]
fn py_spiffe_fetches_validates_and_watches_the_quickstart_identity() {
    let Some(python) = python() else { return };
    let daemon = on_disk();
    let expected = format!("spiffe://quickstart.tbot.local/user/{}", uid());
    let r = peer(&python, &["pyspiffe", daemon.socket.to_str().unwrap(), "demo"]);
    assert_eq!(r["x509_spiffe_id"], expected.as_str(), "{r:#}");
    assert_eq!(r["x509_chain_len"], 1);
    assert_eq!(r["context_svids"], serde_json::json!([expected]));
    assert_eq!(r["context_trust_domains"], serde_json::json!(["quickstart.tbot.local"]));
    assert_eq!(
        r["x509_bundle_trust_domains"],
        serde_json::json!(["quickstart.tbot.local"])
    );
    assert_eq!(r["jwt_spiffe_id"], expected.as_str());
    assert_eq!(
        r["jwt_bundle_trust_domains"],
        serde_json::json!(["quickstart.tbot.local"])
    );
    assert_eq!(r["validated_spiffe_id"], expected.as_str());
    assert_eq!(r["offline_validated_spiffe_id"], expected.as_str());
    assert_eq!(r["source_spiffe_id"], expected.as_str());
}

#[test]
fn sequential_one_shot_fetches_from_new_connections_share_one_svid() {
    let Some(python) = python() else { return };
    let daemon = on_disk();
    let r = peer(&python, &["sequential", daemon.socket.to_str().unwrap(), "25"]);
    assert_eq!(r["fetches"], 25);
    assert_eq!(r["distinct_serials"], 1, "one issuance for 25 one-shot callers: {r:#}");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_certificate_the_daemon_emits_is_strict_der() {
    let Some(python) = python() else { return };
    let daemon = on_disk();
    let client = WorkloadApiClient::connect_to(daemon.endpoint()).await.unwrap();
    let svid = client.fetch_x509_svid().await.unwrap();
    let out = daemon.dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let leaf = out.join("svid.der");
    std::fs::write(&leaf, svid.cert_chain()[0].as_ref()).unwrap();
    let state = daemon.dir.path().join("state");
    let bot = state.join("agent/identity.der");
    let ca = std::fs::read_dir(state.join("issuer/quickstart.tbot.local"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "der"))
        .expect("a CA certificate on disk");
    let files = [&leaf, &bot, &ca].map(|p| p.to_str().unwrap().to_owned());
    let mut args = vec!["der"];
    args.extend(files.iter().map(String::as_str));
    let r = peer(&python, &args);
    for (file, ca_expected) in files.iter().zip([false, false, true]) {
        let certs = r[file].as_array().unwrap();
        assert_eq!(certs.len(), 1, "{file}: {r:#}");
        let cert = &certs[0];
        assert_eq!(cert["ok"], true, "{file} is not strict DER: {cert:#}");
        assert_eq!(cert["ca"], ca_expected, "{file}");
        assert_eq!(cert["basic_constraints_critical"], true, "{file}");
    }
}

#[test]
fn bundle_streams_refuse_a_caller_entitled_to_nothing() {
    let Some(python) = python() else { return };
    // The quickstart's identity only for another uid: this caller is entitled to nothing.
    let rule = format!(
        "          - attribute: workload.unix.attested\n            eq:\n              value: \"true\"\n          - attribute: workload.unix.uid\n            eq:\n              value: \"{}\"\n",
        uid() + 1
    );
    let mut edits = QUICKSTART_ON_DISK.to_vec();
    edits.push((
        "workload-identity.yaml",
        "          - attribute: workload.unix.attested\n            eq:\n              value: \"true\"\n",
        &rule,
    ));
    let (dir, socket) = copy_manifests("manifests/quickstart", &edits);
    let daemon = Daemon::start(dir, socket);
    let r = peer(&python, &["bundles", daemon.socket.to_str().unwrap()]);
    for call in ["FetchX509Bundles", "FetchJWTBundles", "FetchX509SVID"] {
        assert_eq!(r[call]["code"], "PERMISSION_DENIED", "{call}: {r:#}");
    }
}
