//! The trust lifecycle against clients nobody here wrote: CA and JWT key rotations watched by
//! py-spiffe (with Python `cryptography` and PyJWT) and the Rust `spiffe` crate, and SPIFFE
//! federation between real daemons of different trust domains over `https_spiffe`, `https_web`
//! (checked by `curl`) and `static`.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{Daemon, copy_manifests, free_port, stdout, venv_python, verify_stream, wait_until};
use tokio_stream::StreamExt;

const AUDIENCE: &str = "trust-test";

fn peer(python: &Path, args: &[&str]) -> serde_json::Value {
    let out = Command::new(python)
        .arg(common::root().join("tests/peers/trust_peer.py"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "trust_peer.py {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A copy of the quickstart in memory for trust domain `td`, with `cluster` CA settings and, when
/// `issuer` is given, an `issuer` document (its text with `DIR` for the copy's directory).
fn domain(td: &str, ca: &str, issuer: Option<&str>) -> Daemon {
    let mut edits: Vec<(&str, &str, &str)> = common::QUICKSTART_IN_MEMORY.to_vec();
    let name = format!("name: {td}");
    let proxy = format!("proxy_server: {td}:443");
    let ca = format!("key_algorithm: ecdsa-p256\n{ca}");
    edits.extend([
        ("cluster.yaml", "name: quickstart.tbot.local", name.as_str()),
        ("tbot.yaml", "proxy_server: quickstart.tbot.local:443", proxy.as_str()),
        ("cluster.yaml", "key_algorithm: ecdsa-p256", ca.as_str()),
    ]);
    let (dir, socket) = copy_manifests("manifests/quickstart", &edits);
    if let Some(issuer) = issuer {
        let text = issuer.replace("DIR", dir.path().to_str().unwrap());
        std::fs::write(dir.path().join("etc/issuer.yaml"), text).unwrap();
    }
    Daemon::start(dir, socket)
}

#[tokio::test(flavor = "multi_thread")]
async fn two_ca_and_two_jwt_rotations_never_hand_a_workload_an_svid_its_bundle_does_not_verify() {
    let Some(python) = venv_python("spiffe, jwt, cryptography") else {
        return;
    };
    // Keys live 30 s: successors prepared 15 s and activated 5 s before the end, so in 50 s the CA
    // and the JWT key each rotate twice (activations at about 25 s and 40 s).
    let schedule = "validity: 30s\n    rotation: {prepare_before: 15s, activate_before: 5s}";
    let ca = format!("    {schedule}\n  jwt:\n    {schedule}");
    let daemon = domain("rotation.test", &ca, None);
    let (stream, _) = common::open_stream(&daemon).await;
    let (failures, seen) = verify_stream(stream);
    let socket = daemon.socket.to_str().unwrap().to_owned();
    let py = python.clone();
    let report = tokio::task::spawn_blocking(move || peer(&py, &["rotation", &socket, "50", AUDIENCE]))
        .await
        .unwrap();
    assert_eq!(
        report["failures"],
        serde_json::json!([]),
        "{report:#}\n{}",
        daemon.log()
    );
    assert_eq!(
        report["jwt_failures"],
        serde_json::json!([]),
        "{report:#}\n{}",
        daemon.log()
    );
    let subjects = report["ca_subjects"].as_array().unwrap();
    assert!(subjects.len() >= 3, "three CAs over two rotations: {report:#}");
    assert!(report["kids"].as_array().unwrap().len() >= 3, "{report:#}");
    assert!(report["jwt_checks"].as_u64().unwrap() > 60, "{report:#}");
    assert!(failures.lock().unwrap().is_empty(), "{:?}", failures.lock().unwrap());
    assert!(seen.lock().unwrap().len() >= 3, "the Rust client saw every CA too");
    let log = daemon.log();
    assert!(log.matches("rotation step taken").count() >= 8, "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn rotating_by_hand_prepares_then_refuses_a_second_rotation_unless_forced() {
    let daemon = domain("by-hand.test", "", None);
    let ca = daemon.tbotctl(&["rotate", "ca"]);
    assert!(ca.status.success(), "{}", String::from_utf8_lossy(&ca.stderr));
    // `tbotctl status` shows the CA pins of the bundle presented now (the prepared CA is in it), the
    // same ones as its key table, without waiting for a resync.
    wait_until("status to show the prepared CA's pin", Duration::from_secs(5), || {
        let status = stdout(&daemon.tbotctl(&["status"]));
        let (shown, keys) = ca_pins(&status);
        (shown.len() == 2 && shown == keys).then_some(())
    });
    // By hand: a JWT rotation now, a second one refused while the first is in progress, forced on.
    let started = daemon.tbotctl(&["rotate", "jwt", "--grace", "1h"]);
    assert!(started.status.success(), "{}", String::from_utf8_lossy(&started.stderr));
    assert!(
        stdout(&started).contains("a new JWT key is prepared"),
        "{}",
        stdout(&started)
    );
    let refused = daemon.tbotctl(&["rotate", "jwt"]);
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        said.contains("a rotation is in progress") && said.contains("--force"),
        "{said}"
    );
    let forced = daemon.tbotctl(&["rotate", "jwt", "--force"]);
    assert!(stdout(&forced).contains("signs from now on"), "{}", stdout(&forced));
    let status = stdout(&daemon.tbotctl(&["status"]));
    for phase in ["ca ", "jwt ", "active", "retiring"] {
        assert!(status.contains(phase), "{status}");
    }
    // Forced again while the old key retires: it is withdrawn now instead of waiting for its end.
    let withdrawn = daemon.tbotctl(&["rotate", "jwt", "--force"]);
    assert!(stdout(&withdrawn).contains("withdrawn"), "{}", stdout(&withdrawn));
    let status = stdout(&daemon.tbotctl(&["status"]));
    let jwt_rows: Vec<&str> = status.lines().filter(|l| l.trim_start().starts_with("jwt ")).collect();
    assert!(
        jwt_rows.iter().all(|l| !l.contains("retiring")) && jwt_rows.iter().any(|l| l.contains("active")),
        "{status}"
    );
    // One host, no replicas: nothing is attributed to one.
    assert!(!daemon.log().contains("replica"), "{}", daemon.log());
}

/// The `CA pin:` lines of `tbotctl status`, and the pins of its key table's `ca` rows.
fn ca_pins(status: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let shown = status
        .lines()
        .filter_map(|l| l.strip_prefix("CA pin: "))
        .map(str::to_owned)
        .collect();
    let keys = status
        .lines()
        .filter(|l| l.trim_start().starts_with("ca "))
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with("sha256:")))
        .map(str::to_owned)
        .collect();
    (shown, keys)
}

/// An `issuer` document with a bundle endpoint on `port`.
fn issuer_doc(port: u16, endpoint: &str) -> String {
    format!(
        "kind: issuer\nversion: v1\nmetadata:\n  name: issuer\nspec:\n  listen: 127.0.0.1:{}\n  \
         admin_socket: DIR/issuer-admin.sock\n  storage:\n    type: memory\n  bundle_endpoint:\n    listen: 127.0.0.1:{port}\n    {endpoint}\n    \
         refresh_hint: 1s\n",
        free_port()
    )
}

fn curl(args: &[&str]) -> Vec<u8> {
    let out = Command::new("curl")
        .args(["-sS", "--fail"])
        .args(args)
        .output()
        .expect("curl runs");
    assert!(
        out.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn federation(td: &str, source: &str) -> String {
    format!("kind: spiffe_federation\nversion: v1\nmetadata:\n  name: {td}\nspec:\n  bundle_source:\n{source}")
}

/// A federation with `a.test` over `https_spiffe` at `port`, bootstrapped with `bundle`.
fn a_over_https_spiffe(port: u16, bundle: &str) -> String {
    federation(
        "a.test",
        &format!(
            "    https_spiffe:\n      bundle_endpoint_url: https://127.0.0.1:{port}\n      \
             endpoint_spiffe_id: spiffe://a.test/tbot/bundle-endpoint\n      bootstrap_bundle: |\n{}",
            indented(bundle, 8)
        ),
    )
}

fn indented(text: &str, by: usize) -> String {
    text.lines().map(|l| format!("{}{l}\n", " ".repeat(by))).collect()
}

fn trust_domains(ctx: &spiffe::X509Context) -> BTreeSet<String> {
    ["a.test", "b.test", "c.test", "d.test"]
        .into_iter()
        .filter(|td| ctx.bundle_set().get(&spiffe::TrustDomain::new(td).unwrap()).is_some())
        .map(str::to_owned)
        .collect()
}

/// A test CA (`web-ca.pem`) and a certificate for 127.0.0.1 it signed (`web.pem`, `web.key`) in
/// `dir`: what an `https_web` endpoint serves and its clients trust with `ca_file`.
fn web_certificate(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let (cert, key, ca_file) = (dir.join("web.pem"), dir.join("web.key"), dir.join("web-ca.pem"));
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "test web CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    std::fs::write(&ca_file, ca.pem()).unwrap();
    std::fs::write(&cert, leaf.pem()).unwrap();
    std::fs::write(&key, leaf_key.serialize_pem()).unwrap();
    (cert, key, ca_file)
}

/// A SPIFFE bundle document with `cas` new CAs, refreshed every second.
fn bundle_of_new_cas(cas: usize, sequence: u64) -> (Vec<Vec<u8>>, Vec<u8>) {
    let ders: Vec<Vec<u8>> = (0..cas)
        .map(|_| {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::default();
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params.self_signed(&key).unwrap().der().to_vec()
        })
        .collect();
    let doc = tbot::spiffe_bundle::encode(&ders, &[], sequence, Duration::from_secs(1));
    (ders, doc)
}

/// A foreign endpoint (Python's `http.server` over TLS) serving a good bundle, then a malformed one,
/// then one too large, then a good one again: the two bad ones are refused with their reason and
/// the last good bundle stays on the Workload API until the next good one replaces it.
#[tokio::test(flavor = "multi_thread")]
async fn a_malformed_or_oversized_foreign_bundle_never_replaces_the_last_good_one() {
    let Some(python) = venv_python("ssl, http.server") else {
        return;
    };
    let served = tempfile::tempdir().unwrap();
    let (cert, key, ca_file) = web_certificate(served.path());
    let docs = served.path().join("docs");
    std::fs::create_dir(&docs).unwrap();
    let bundle = docs.join("bundle.json");
    let (first_cas, first) = bundle_of_new_cas(1, 1);
    std::fs::write(&bundle, &first).unwrap();
    let port = free_port();
    let mut server = Command::new(&python)
        .arg(common::root().join("tests/peers/https_files.py"))
        .args([docs.to_str().unwrap(), &port.to_string()])
        .args([&cert, &key])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut said = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(server.stdout.take().unwrap()), &mut said).unwrap();
    assert_eq!(said.trim(), "serving");

    let daemon = domain("home.test", "", None);
    std::fs::write(
        daemon.dir.path().join("etc/federation-web.yaml"),
        federation(
            "web.test",
            &format!(
                "    https_web:\n      bundle_endpoint_url: https://127.0.0.1:{port}/bundle.json\n      ca_file: {}\n",
                ca_file.display()
            ),
        ),
    )
    .unwrap();
    let web = spiffe::TrustDomain::new("web.test").unwrap();
    let client = spiffe::WorkloadApiClient::connect_to(daemon.endpoint()).await.unwrap();
    let web_cas = || async {
        let ctx = client.fetch_x509_context().await.unwrap();
        ctx.bundle_set()
            .get(&web)
            .map(|b| b.authorities().iter().map(|c| c.as_ref().to_vec()).collect::<Vec<_>>())
    };
    let status = || stdout(&daemon.tbotctl(&["status"]));
    wait_until("the first bundle", Duration::from_secs(20), || {
        status().contains("federation web.test: https_web").then_some(())
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while web_cas().await.as_ref() != Some(&first_cas) {
        assert!(tokio::time::Instant::now() < deadline, "{}\n{}", status(), daemon.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let bad: [(&[u8], &str); 2] = [
        (
            br#"{"keys": [{"use": "x509-svid", "kty": "EC", "x5c": ["not base64!"]}]}"#,
            "keys[0]",
        ),
        (&vec![b' '; 300 * 1024], "larger than"),
    ];
    for (doc, reason) in bad {
        std::fs::write(&bundle, doc).unwrap();
        let said = wait_until(reason, Duration::from_secs(30), || {
            let s = status();
            (s.contains("FAILING") && s.contains(reason)).then_some(s)
        });
        assert!(said.contains("the last good bundle stays in force"), "{said}");
        assert_eq!(web_cas().await, Some(first_cas.clone()), "{said}");
    }

    let (second_cas, second) = bundle_of_new_cas(2, 2);
    std::fs::write(&bundle, &second).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    while web_cas().await.as_ref() != Some(&second_cas) {
        assert!(tokio::time::Instant::now() < deadline, "{}\n{}", status(), daemon.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(!status().contains("FAILING"), "{}", status());
    server.kill().unwrap();
    server.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn trust_domains_federate_over_https_spiffe_https_web_and_static_and_keep_the_last_bundle() {
    let Some(python) = venv_python("spiffe, jwt, cryptography") else {
        return;
    };
    let (pa, pb, pc) = (free_port(), free_port(), free_port());
    let a = domain("a.test", "", Some(&issuer_doc(pa, "profile: https_spiffe")));
    let b = domain("b.test", "", Some(&issuer_doc(pb, "profile: https_spiffe")));
    // C serves over https_web with a certificate for 127.0.0.1 from a test CA.
    let certs = tempfile::tempdir().unwrap();
    let (cert, key, web_ca) = web_certificate(certs.path());
    let web = format!(
        "profile: https_web\n    cert_file: {}\n    key_file: {}",
        cert.display(),
        key.display()
    );
    let c = domain("c.test", "", Some(&issuer_doc(pc, &web)));

    // curl checks C's endpoint with the CA; the document is a SPIFFE bundle.
    let c_bundle = curl(&[
        "--cacert",
        web_ca.to_str().unwrap(),
        &format!("https://127.0.0.1:{pc}/bundle.json"),
    ]);
    let checked = certs.path().join("c.json");
    std::fs::write(&checked, &c_bundle).unwrap();
    let report = peer(&python, &["bundle", checked.to_str().unwrap()]);
    assert_eq!(report["problems"], serde_json::json!([]), "{report:#}");
    assert_eq!(
        report["uses"],
        serde_json::json!(["x509-svid", "jwt-svid"]),
        "{report:#}"
    );
    assert_eq!(report["refresh_hint"], 1);
    // The CRLs beside it: `/crl` the active CA's (DER), `/crl.pem` every CA's; openssl checks each
    // against the bundle's CA.
    let bundle: serde_json::Value = serde_json::from_slice(&c_bundle).unwrap();
    let ca_pem: String = bundle["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["use"] == "x509-svid")
        .map(|k| {
            use base64::Engine;
            let der = base64::engine::general_purpose::STANDARD
                .decode(k["x5c"][0].as_str().unwrap())
                .unwrap();
            common::pem("CERTIFICATE", &der)
        })
        .collect();
    let ca_file = certs.path().join("c-ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();
    let url = |path: &str| format!("https://127.0.0.1:{pc}{path}");
    let der = certs.path().join("c.crl");
    std::fs::write(&der, curl(&["--cacert", web_ca.to_str().unwrap(), &url("/crl")])).unwrap();
    let pem = certs.path().join("c.crl.pem");
    std::fs::write(&pem, curl(&["--cacert", web_ca.to_str().unwrap(), &url("/crl.pem")])).unwrap();
    for (file, form) in [(&der, "DER"), (&pem, "PEM")] {
        let out = Command::new("openssl")
            .args([
                "crl",
                "-inform",
                form,
                "-in",
                file.to_str().unwrap(),
                "-noout",
                "-issuer",
                "-CAfile",
            ])
            .arg(&ca_file)
            .output()
            .unwrap();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && said.contains("verify OK") && said.contains("c.test"),
            "{form}: {said}"
        );
    }
    // Every path answers; the https_spiffe endpoints are fetched once, out of band, to bootstrap.
    let bundle_of = |port: u16| String::from_utf8(curl(&["-k", &format!("https://127.0.0.1:{port}/")])).unwrap();
    let (a_bundle, b_bundle) = (bundle_of(pa), bundle_of(pb));
    // D is known only by a static bundle: one CA made here.
    let d_key = rcgen::KeyPair::generate().unwrap();
    let mut d_params = rcgen::CertificateParams::default();
    d_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let d_ca = d_params.self_signed(&d_key).unwrap();
    let d_bundle = String::from_utf8(tbot::spiffe_bundle::encode(
        &[d_ca.der().to_vec()],
        &[],
        1,
        Duration::from_secs(300),
    ))
    .unwrap();

    let (stream, first) = common::open_stream(&a).await;
    assert_eq!(trust_domains(&first), BTreeSet::from(["a.test".to_owned()]));
    let (failures, _) = verify_stream(stream);
    let (mut stream, _) = common::open_stream(&a).await;
    let etc_a = a.dir.path().join("etc");
    // B is first known by a static copy of its bundle; later A switches to B's endpoint.
    std::fs::write(
        etc_a.join("federation-b.yaml"),
        federation(
            "b.test",
            &format!("    static:\n      bundle: |\n{}", indented(&b_bundle, 8)),
        ),
    )
    .unwrap();
    std::fs::write(
        etc_a.join("federation-c.yaml"),
        federation(
            "c.test",
            &format!(
                "    https_web:\n      bundle_endpoint_url: https://127.0.0.1:{pc}/\n      ca_file: {}\n",
                web_ca.display()
            ),
        ),
    )
    .unwrap();
    std::fs::write(
        etc_a.join("federation-d.yaml"),
        federation(
            "d.test",
            &format!("    static:\n      bundle: |\n{}", indented(&d_bundle, 8)),
        ),
    )
    .unwrap();
    std::fs::write(
        b.dir.path().join("etc/federation-a.yaml"),
        a_over_https_spiffe(pa, &a_bundle),
    )
    .unwrap();
    let every = BTreeSet::from(["a.test", "b.test", "c.test", "d.test"].map(str::to_owned));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let ctx = tokio::time::timeout_at(deadline, stream.next())
            .await
            .unwrap_or_else(|_| panic!("A's stream never had every domain:\n{}", a.log()))
            .unwrap()
            .unwrap();
        if trust_domains(&ctx) == every {
            break;
        }
    }
    // In both directions, with A's bundles only: B's X509-SVID and JWT-SVID; and the other way.
    let (sa, sb) = (a.socket.to_str().unwrap(), b.socket.to_str().unwrap());
    let b_has_a = || stdout(&b.tbotctl(&["status"])).contains("federation a.test: https_spiffe");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !b_has_a() {
        assert!(
            std::time::Instant::now() < deadline,
            "B never had A's bundle:\n{}\n{}",
            stdout(&b.tbotctl(&["status"])),
            b.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    for (from, to, foreign) in [(sa, sb, "b.test"), (sb, sa, "a.test")] {
        let report = wait_until("a verified federation", Duration::from_secs(20), || {
            let r = peer(&python, &["federation", from, to, AUDIENCE]);
            r["a_trust_domains"]
                .as_array()
                .unwrap()
                .iter()
                .any(|t| t == foreign)
                .then_some(r)
        });
        assert_eq!(report["b_x509_verifies_with_a_bundles"], true, "{report:#}");
        assert_eq!(report["b_jwt_offline"], "ok", "{report:#}");
        assert!(
            report["b_jwt_validated_by_a"]
                .as_str()
                .unwrap()
                .starts_with(&format!("spiffe://{foreign}/")),
            "{report:#}"
        );
    }
    let status = stdout(&a.tbotctl(&["status"]));
    for line in [
        "federation b.test: static",
        "federation c.test: https_web",
        "federation d.test: static",
    ] {
        assert!(status.contains(line), "{status}");
    }
    assert!(
        !status.contains("FAILING") && status.contains("s ago), next"),
        "{status}"
    );

    // A switches B's source from the static copy to B's endpoint, without a bootstrap bundle: the
    // bundle A holds checks the endpoint's SVID, and nothing is lost meanwhile.
    std::fs::write(
        etc_a.join("federation-b.yaml"),
        federation(
            "b.test",
            &format!(
                "    https_spiffe:\n      bundle_endpoint_url: https://127.0.0.1:{pb}/bundle.json\n      \
                 endpoint_spiffe_id: spiffe://b.test/tbot/bundle-endpoint\n"
            ),
        ),
    )
    .unwrap();
    let status = wait_until("A fetches B's endpoint", Duration::from_secs(20), || {
        let s = stdout(&a.tbotctl(&["status"]));
        let line = s
            .lines()
            .find(|l| l.starts_with("federation b.test: https_spiffe"))?
            .to_owned();
        line.contains("s ago), next").then_some(line)
    });
    assert!(!status.contains("FAILING") && status.contains("1 CAs"), "{status}");

    // B rotates its CA: A's open stream gets B's bundle with both CAs within a few refresh hints.
    let rotated = b.tbotctl(&["rotate", "ca", "--grace", "1h"]);
    assert!(rotated.status.success(), "{}", String::from_utf8_lossy(&rotated.stderr));
    let b_td = spiffe::TrustDomain::new("b.test").unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let ctx = tokio::time::timeout_at(deadline, stream.next())
            .await
            .expect("B's new CA reaches A's stream")
            .unwrap()
            .unwrap();
        if ctx.bundle_set().get(&b_td).is_some_and(|b| b.authorities().len() == 2) {
            break;
        }
    }

    // B's endpoint goes away: A keeps its last bundle, and says so.
    drop(b);
    let status = wait_until("A to notice B is gone", Duration::from_secs(20), || {
        let s = stdout(&a.tbotctl(&["status"]));
        s.contains("FAILING").then_some(s)
    });
    assert!(status.contains("the last good bundle stays in force"), "{status}");
    let client = spiffe::WorkloadApiClient::connect_to(a.endpoint()).await.unwrap();
    let ctx = client.fetch_x509_context().await.unwrap();
    assert_eq!(ctx.bundle_set().get(&b_td).map(|b| b.authorities().len()), Some(2));

    // Removing a federation withdraws its bundle from open streams.
    std::fs::remove_file(etc_a.join("federation-d.yaml")).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let ctx = tokio::time::timeout_at(deadline, stream.next())
            .await
            .expect("d.test is withdrawn")
            .unwrap()
            .unwrap();
        if !trust_domains(&ctx).contains("d.test") {
            break;
        }
    }
    drop(c);
    assert!(failures.lock().unwrap().is_empty(), "{:?}", failures.lock().unwrap());
}

/// Runs a future to completion from synchronous code inside the test's runtime.
fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}

/// The CA certificates (DER) a workload of `daemon` holds for trust domain `td` now.
async fn federated_cas(daemon: &Daemon, td: &str) -> Vec<Vec<u8>> {
    let client = spiffe::WorkloadApiClient::connect_to(daemon.endpoint()).await.unwrap();
    let ctx = client.fetch_x509_context().await.unwrap();
    ctx.bundle_set()
        .get(&spiffe::TrustDomain::new(td).unwrap())
        .map(|b| b.authorities().iter().map(|a| a.as_ref().to_vec()).collect())
        .unwrap_or_default()
}

/// A CA tainted and revoked in one trust domain leaves the bundle a federated domain holds for it
/// at its next refresh, and that domain keeps fetching the bundle endpoint (whose own SVID moved to
/// the new CA at the taint).
#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_ca_leaves_a_federated_domains_bundle_at_its_next_refresh() {
    let pa = free_port();
    let a = domain("a.test", "", Some(&issuer_doc(pa, "profile: https_spiffe")));
    let b = domain("b.test", "", None);
    let a_bundle = String::from_utf8(curl(&["-k", &format!("https://127.0.0.1:{pa}/")])).unwrap();
    std::fs::write(
        b.dir.path().join("etc/federation-a.yaml"),
        a_over_https_spiffe(pa, &a_bundle),
    )
    .unwrap();
    let old = federated_cas(&a, "a.test").await;
    assert_eq!(old.len(), 1);
    let held_by_b = || block_on(federated_cas(&b, "a.test"));
    wait_until("B holds A's bundle", Duration::from_secs(20), || {
        (held_by_b() == old).then_some(())
    });

    let run = |args: &[&str]| {
        let out = a.tbotctl(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&["rotate", "ca", "--grace", "1h"]);
    wait_until("B holds both of A's CAs", Duration::from_secs(20), || {
        (held_by_b().len() == 2).then_some(())
    });
    run(&["rotate", "ca", "--taint-old"]);
    wait_until("nothing on A depends on CA 1", Duration::from_secs(20), || {
        stdout(&a.tbotctl(&["status"]))
            .lines()
            .any(|l| l.trim_start().starts_with("ca 1 ") && l.contains(" tainted ") && l.contains(" 0/0 "))
            .then_some(())
    });
    run(&["rotate", "ca", "--revoke-old"]);
    let new = federated_cas(&a, "a.test").await;
    assert!(new.len() == 1 && new != old, "A's own bundle holds only its new CA");
    wait_until("B drops A's revoked CA", Duration::from_secs(20), || {
        (held_by_b() == new).then_some(())
    });
}
