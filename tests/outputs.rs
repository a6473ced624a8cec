//! File outputs (`workload-identity-x509`, `workload-identity-jwt`) from the real daemon: the files
//! checked by `openssl` and `jsonwebtoken`, nginx (Debian) terminating mutual TLS with them and
//! reloading through `on_update` on rotation, live edits, `--oneshot`, and a reader that polls the
//! directory through 1,000 replacements.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Daemon, Reaped, copy_manifests, openssl, save, wait_until};

const TD: &str = "quickstart.tbot.local";

/// The quickstart on disk with `services` appended to the agent config (`DIR` is the test's
/// directory) and the two identities above.
fn setup(services: &str) -> (tempfile::TempDir, PathBuf) {
    let (dir, socket) = copy_manifests("manifests/quickstart", &common::QUICKSTART_ON_DISK);
    std::fs::write(dir.path().join("etc/outputs.yaml"), common::OUTPUT_IDENTITIES).unwrap();
    append_services(dir.path(), services);
    (dir, socket)
}

fn append_services(dir: &Path, services: &str) {
    let config = dir.join("etc/tbot.yaml");
    let text = std::fs::read_to_string(&config).unwrap() + &services.replace("DIR", dir.to_str().unwrap());
    save(&config, &text);
}

/// The daemon with a `server` x509 output (with `server_extra` settings, SIGHUP to nginx on update)
/// and a `client` one, once the server's `server_file` and the client's SVID are written: the
/// daemon, its directory, and the two outputs' directories.
fn server_and_client(server_extra: &str, server_file: &str) -> (Daemon, PathBuf, PathBuf, PathBuf) {
    let (dir, socket) = setup(&format!(
        "  - type: workload-identity-x509
    name: server
    selector: {{name: server}}
    destination: {{type: directory, path: DIR/out/server}}
{server_extra}    on_update: {{signal: SIGHUP, pid_file: DIR/nginx/nginx.pid}}
  - type: workload-identity-x509
    name: client
    selector: {{name: client}}
    destination: {{type: directory, path: DIR/out/client}}
"
    ));
    let daemon = Daemon::start(dir, socket);
    let root = daemon.dir.path().to_owned();
    let (server, client) = (root.join("out/server"), root.join("out/client"));
    wait_until("both outputs", Duration::from_secs(15), || {
        (server.join(server_file).exists() && client.join("svid.pem").exists()).then_some(())
    });
    (daemon, root, server, client)
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

/// The SPKI of a certificate and of a key, as openssl prints them.
fn cert_pubkey(cert: &Path) -> String {
    openssl(&["x509", "-in", cert.to_str().unwrap(), "-noout", "-pubkey"])
}

fn key_pubkey(key: &Path) -> String {
    openssl(&["pkey", "-in", key.to_str().unwrap(), "-pubout"])
}

fn serial(cert: &Path) -> String {
    openssl(&["x509", "-in", cert.to_str().unwrap(), "-noout", "-serial"])
}

const BOTH: &str = "  - type: workload-identity-x509
    name: server
    selector: {name: server}
    destination: {type: directory, path: DIR/out/server}
  - type: workload-identity-jwt
    name: token
    selector: {name: client}
    destination: {type: directory, path: DIR/out/jwt}
    audiences: [api.example.com, other]
";

#[test]
fn x509_and_jwt_outputs_hold_what_openssl_and_jsonwebtoken_accept() {
    let (dir, socket) = setup(BOTH);
    let daemon = Daemon::start(dir, socket);
    let out = daemon.dir.path().join("out/server");
    let cert = out.join("svid.pem");
    wait_until("the x509 files", Duration::from_secs(10), || {
        cert.exists().then_some(())
    });
    assert_eq!(mode(&out), 0o700);
    for file in [
        "svid.pem",
        "svid_key.pem",
        "svid_bundle.pem",
        "credential-bundle.private-key.pem",
    ] {
        assert_eq!(mode(&out.join(file)), 0o600, "{file}");
    }
    let (key, bundle, combined) = (
        out.join("svid_key.pem"),
        out.join("svid_bundle.pem"),
        out.join("credential-bundle.private-key.pem"),
    );
    assert_eq!(cert_pubkey(&cert), key_pubkey(&key), "the key is the certificate's");
    let verified = openssl(&["verify", "-CAfile", bundle.to_str().unwrap(), cert.to_str().unwrap()]);
    assert!(verified.contains(": OK"), "{verified}");
    let san = openssl(&[
        "x509",
        "-in",
        cert.to_str().unwrap(),
        "-noout",
        "-ext",
        "subjectAltName",
    ]);
    assert!(san.contains(&format!("URI:spiffe://{TD}/svc/server")), "{san}");
    assert!(
        std::fs::read_to_string(&key)
            .unwrap()
            .starts_with("-----BEGIN PRIVATE KEY-----"),
        "PKCS#8"
    );
    // The combined file: the key, then the chain, in one read (the SPIFFE filesystem-delivery layout).
    let text = std::fs::read_to_string(&combined).unwrap();
    assert!(text.starts_with("-----BEGIN PRIVATE KEY-----"), "{text}");
    assert_eq!(
        text,
        std::fs::read_to_string(&key).unwrap() + &std::fs::read_to_string(&cert).unwrap()
    );
    assert_eq!(key_pubkey(&combined), cert_pubkey(&combined));

    // The JWT-SVID verifies against the JWKS written beside it, for both audiences.
    let jwt_dir = daemon.dir.path().join("out/jwt");
    wait_until("the jwt files", Duration::from_secs(10), || {
        jwt_dir.join("jwt_svid").exists().then_some(())
    });
    let token = std::fs::read_to_string(jwt_dir.join("jwt_svid")).unwrap();
    assert!(!token.ends_with('\n'), "no trailing newline");
    let jwks: jsonwebtoken::jwk::JwkSet =
        serde_json::from_str(&std::fs::read_to_string(jwt_dir.join("jwt_bundle.json")).unwrap()).unwrap();
    let header = jsonwebtoken::decode_header(&token).unwrap();
    let jwk = jwks
        .find(header.kid.as_deref().unwrap())
        .expect("the token's kid is in the bundle");
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    validation.set_audience(&["api.example.com"]);
    let claims = jsonwebtoken::decode::<serde_json::Value>(
        &token,
        &jsonwebtoken::DecodingKey::from_jwk(jwk).unwrap(),
        &validation,
    )
    .unwrap()
    .claims;
    assert_eq!(claims["sub"], format!("spiffe://{TD}/svc/client"));

    let status = daemon.tbotctl(&["status"]);
    let text = common::stdout(&status);
    assert!(
        text.contains("output server: ") && text.contains("output token: ") && !text.contains("FAILING"),
        "{text}"
    );
    assert_eq!(status.status.code(), Some(0), "both outputs written: {text}");

    // An edit of the other identity rewrites the x509 files and leaves the JWT-SVID alone; an edit
    // of its own identity re-issues it.
    let identities = daemon.dir.path().join("etc/outputs.yaml");
    let text = std::fs::read_to_string(&identities).unwrap();
    let before = std::fs::read(&cert).unwrap();
    save(&identities, &text.replace("id: /svc/server", "id: /svc/server-edited"));
    wait_until("the server output rewritten", Duration::from_secs(15), || {
        (std::fs::read(&cert).unwrap() != before).then_some(())
    });
    std::thread::sleep(Duration::from_millis(500));
    let unchanged = std::fs::read_to_string(jwt_dir.join("jwt_svid")).unwrap();
    assert_eq!(
        unchanged, token,
        "an edit of another identity does not re-issue the JWT output"
    );
    let text = std::fs::read_to_string(&identities).unwrap();
    save(&identities, &text.replace("id: /svc/client", "id: /svc/client-edited"));
    wait_until("the JWT output re-issued", Duration::from_secs(15), || {
        (std::fs::read_to_string(jwt_dir.join("jwt_svid")).unwrap() != token).then_some(())
    });
}

#[test]
fn outputs_converge_live_say_why_they_fail_and_leave_their_files_when_removed() {
    let (dir, socket) = setup("");
    let daemon = Daemon::start(dir, socket);
    let root = daemon.dir.path().to_owned();
    // Added live, with a mode and group that let a group read the files.
    append_services(
        &root,
        "  - type: workload-identity-x509
    name: server
    selector: {name: server}
    destination: {type: directory, path: DIR/out/server, mode: \"0640\", group: \"0\"}
",
    );
    let cert = root.join("out/server/svid.pem");
    wait_until("the added output's files", Duration::from_secs(15), || {
        cert.exists().then_some(())
    });
    assert_eq!(mode(&cert), 0o640);
    assert_eq!(mode(&root.join("out/server")), 0o750);

    // An output given an identity that reads workload attributes could never be written: the
    // edit is refused at load, naming every such attribute at once, and the running output goes on.
    append_services(
        &root,
        "  - type: workload-identity-x509
    name: wrong
    selector: {name: quickstart}
    destination: {type: directory, path: DIR/out/wrong}
",
    );
    let validate = daemon.tbotctl(&["validate"]);
    let text = String::from_utf8_lossy(&validate.stderr).into_owned() + &common::stdout(&validate);
    assert!(!validate.status.success(), "{text}");
    assert!(
        text.contains("tbot.yaml:")
            && text.contains("the output `wrong` writes `quickstart`")
            && text.contains("`workload.unix.attested`, `workload.unix.uid`"),
        "{text}"
    );
    let status = wait_until("the refused edit in status", Duration::from_secs(15), || {
        let out = daemon.tbotctl(&["status"]);
        let text = common::stdout(&out);
        text.contains("the output `wrong` writes")
            .then_some((out.status.code(), text))
    });
    assert_eq!(
        status.0,
        Some(1),
        "a file that fails to load makes status exit 1: {}",
        status.1
    );
    assert!(
        !status.1.contains("output wrong:"),
        "nothing of the refused edit runs: {}",
        status.1
    );
    assert!(status.1.contains("output server:"), "{}", status.1);

    // A config error is refused with its place, and the running outputs go on.
    let config = root.join("etc/tbot.yaml");
    let good = std::fs::read_to_string(&config).unwrap();
    save(
        &config,
        &good.replace(
            "    name: wrong\n",
            "    name: wrong\n    listen: unix:///tmp/nope.sock\n",
        ),
    );
    let validate = daemon.tbotctl(&["validate"]);
    let text = String::from_utf8_lossy(&validate.stderr).into_owned() + &common::stdout(&validate);
    assert!(
        text.contains("tbot.yaml:") && text.contains("`listen` is not a field of a `workload-identity-x509` service"),
        "{text}"
    );

    // Removed: renewing stops, the files stay, and the condition says so.
    let without: String = good
        .split("  - type: workload-identity-x509")
        .next()
        .unwrap()
        .to_owned();
    save(&config, &without);
    let get = wait_until("the Removed condition", Duration::from_secs(15), || {
        let text = common::stdout(&daemon.tbotctl(&["get", "agent_config", "-o", "json"]));
        text.contains("Removed").then_some(text)
    });
    assert!(get.contains("left in place"), "{get}");
    assert!(cert.exists(), "a removed output's files are not deleted");
}

#[test]
fn oneshot_without_an_agent_config_fails_and_says_what_to_add() {
    let dir = tempfile::tempdir().unwrap();
    let etc = dir.path().join("etc");
    std::fs::create_dir(&etc).unwrap();
    let issuer = format!(
        "kind: issuer\nversion: v1\nmetadata: {{name: only}}\nspec:\n  listen: 127.0.0.1:0\n  storage: {{type: directory, path: {}}}\n",
        dir.path().join("var").display()
    );
    std::fs::write(etc.join("issuer.yaml"), issuer).unwrap();
    std::fs::write(
        etc.join("cluster.yaml"),
        "kind: cluster\nversion: v1\nmetadata: {name: oneshot.test}\nspec: {}\n",
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tbot"))
        .args(["start", "--oneshot", "--config-dir"])
        .arg(&etc)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // It must end by itself, and fail: an issuer host has no outputs to write.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("tbot start --oneshot without an agent config kept running");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("there is no agent config"), "{stderr}");
}

#[test]
fn oneshot_writes_every_output_once_and_names_what_failed() {
    let (dir, _) = setup(&BOTH.replace(
        "    destination: {type: directory, path: DIR/out/server}\n",
        "    destination: {type: directory, path: DIR/out/server}\n    on_update: {exec: [\"sh\", \"-c\", \"echo ran > DIR/hook\"]}\n",
    ));
    let run = |dir: &Path| {
        Command::new(env!("CARGO_BIN_EXE_tbot"))
            .args(["start", "--oneshot", "--config-dir"])
            .arg(dir.join("etc"))
            .output()
            .unwrap()
    };
    let out = run(dir.path());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(dir.path().join("out/server/svid.pem").exists());
    assert!(dir.path().join("out/jwt/jwt_svid").exists());
    assert_eq!(std::fs::read_to_string(dir.path().join("hook")).unwrap(), "ran\n");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("output server:") && stdout.contains("output token:"),
        "{stdout}"
    );

    // A hook that fails: exit 1, naming the output and the command's error.
    let config = dir.path().join("etc/tbot.yaml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace("echo ran >", "echo cannot reload >&2; exit 3; echo"),
    )
    .unwrap();
    let out = run(dir.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("output server") && stderr.contains("cannot reload"),
        "{stderr}"
    );
}

/// nginx, run by the test in the foreground with its own prefix; killed on drop.
struct Nginx {
    child: Reaped,
    pid_file: PathBuf,
    port: u16,
}

impl Drop for Nginx {
    /// A fast shutdown (SIGTERM): the master stops its workers. SIGKILL (what [`Reaped`] sends
    /// after) would leave them running, holding the port.
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.0.id().to_string()])
            .status();
        let _ = wait_until("nginx to stop", Duration::from_secs(10), || {
            self.child.0.try_wait().ok().flatten()
        });
    }
}

/// The pids of a process's children (nginx's workers).
fn children(pid: &str) -> Vec<String> {
    let out = Command::new("pgrep").args(["-P", pid.trim()]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

fn nginx_binary() -> Option<PathBuf> {
    let found = ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists());
    if found.is_none() {
        common::peer_missing("nginx is not installed; run scripts/test.sh (it installs Debian's nginx)");
    }
    found
}

impl Nginx {
    /// nginx serving the `server` output's SVID over mutual TLS, trusting `client_bundle`, and
    /// refusing what the CRL file `crl` lists when given (`ssl_crl`).
    fn start(binary: &Path, dir: &Path, server: &Path, client_bundle: &Path, crl: Option<&Path>) -> Nginx {
        let port = common::free_port();
        let prefix = dir.join("nginx");
        std::fs::create_dir_all(prefix.join("logs")).unwrap();
        let pid_file = prefix.join("nginx.pid");
        let conf = format!(
            "daemon off;
master_process on;
worker_processes 1;
user root;
pid {pid};
error_log {prefix}/logs/error.log info;
events {{ worker_connections 64; }}
http {{
  access_log off;
  client_body_temp_path {prefix}/body; proxy_temp_path {prefix}/proxy; fastcgi_temp_path {prefix}/fastcgi;
  uwsgi_temp_path {prefix}/uwsgi; scgi_temp_path {prefix}/scgi;
  server {{
    listen 127.0.0.1:{port} ssl;
    ssl_certificate {server}/svid.pem;
    ssl_certificate_key {server}/svid_key.pem;
    ssl_client_certificate {bundle};
    ssl_verify_client on;
    {crl}
    location / {{ return 200 \"hello $ssl_client_verify\\n\"; }}
  }}
}}
",
            pid = pid_file.display(),
            prefix = prefix.display(),
            server = server.display(),
            bundle = client_bundle.display(),
            crl = crl.map(|c| format!("ssl_crl {};", c.display())).unwrap_or_default(),
        );
        let path = prefix.join("nginx.conf");
        std::fs::write(&path, conf).unwrap();
        let child = Command::new(binary)
            .args(["-p", prefix.to_str().unwrap(), "-c", path.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx starts");
        Nginx {
            child: Reaped(child),
            pid_file,
            port,
        }
    }

    fn error_log(&self) -> String {
        std::fs::read_to_string(self.pid_file.parent().unwrap().join("logs/error.log")).unwrap_or_default()
    }
}

/// A request to nginx with the client output's files ([`common::tls_get`]): what came back, and
/// the serial of the certificate nginx served (saved as `served.pem` beside the output).
fn request(port: u16, client: &Path) -> Result<(String, String), String> {
    let certs = client.parent().unwrap().join("served.pem");
    let text = common::tls_get(
        port,
        Some((&client.join("svid.pem"), &client.join("svid_key.pem"))),
        &client.join("svid_bundle.pem"),
    );
    if !text.contains("hello SUCCESS") {
        return Err(text);
    }
    let begin = text.find("-----BEGIN CERTIFICATE-----").ok_or_else(|| text.clone())?;
    let end = text.find("-----END CERTIFICATE-----").ok_or_else(|| text.clone())? + "-----END CERTIFICATE-----".len();
    std::fs::write(&certs, format!("{}\n", &text[begin..end])).unwrap();
    let serial = serial(&certs);
    Ok((text, serial))
}

#[test]
fn nginx_serves_mutual_tls_from_outputs_and_reloads_on_rotation_through_on_update() {
    let Some(binary) = nginx_binary() else { return };
    let (_daemon, root, server, client) =
        server_and_client("    credential_ttl: 30s\n    renewal_interval: 6s\n", "svid.pem");
    let nginx = Nginx::start(&binary, &root, &server, &client.join("svid_bundle.pem"), None);
    let master = wait_until("nginx's pid file", Duration::from_secs(10), || {
        std::fs::read_to_string(&nginx.pid_file)
            .ok()
            .filter(|p| !p.trim().is_empty())
    });
    let (_, first) = wait_until("nginx answering over mTLS", Duration::from_secs(10), || {
        request(nginx.port, &client).ok()
    });
    // The client checked nginx against the bundle; the served certificate is the server SVID.
    let served = client.parent().unwrap().join("served.pem");
    let san = openssl(&[
        "x509",
        "-in",
        served.to_str().unwrap(),
        "-noout",
        "-ext",
        "subjectAltName",
    ]);
    assert!(san.contains(&format!("URI:spiffe://{TD}/svc/server")), "{san}");

    // Renewed every 6 s: the files are replaced, SIGHUP reaches the master, and nginx serves the new
    // certificate from the same master process.
    let second = wait_until("nginx serving a renewed certificate", Duration::from_secs(40), || {
        request(nginx.port, &client)
            .ok()
            .map(|(_, s)| s)
            .filter(|s| *s != first)
    });
    assert_ne!(first, second);
    assert_eq!(
        std::fs::read_to_string(&nginx.pid_file).unwrap(),
        master,
        "the same master"
    );
    assert!(
        nginx.error_log().contains("reconfiguring"),
        "nginx reloaded on the signal:\n{}",
        nginx.error_log()
    );
    assert_eq!(
        serial(&server.join("svid.pem")),
        second,
        "what nginx serves is what is on disk"
    );
    // Stopped, nginx leaves no worker behind.
    let workers = children(&master);
    assert!(!workers.is_empty(), "nginx runs workers");
    drop(nginx);
    let left: Vec<String> = workers
        .into_iter()
        .filter(|w| std::path::Path::new(&format!("/proc/{w}")).exists())
        .collect();
    assert!(left.is_empty(), "nginx workers left running: {left:?}");
}

/// A certificate and its key for `id`, as an output would hold them.
fn material(id: u32) -> tbot::agent::X509Material {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        format!("spiffe://{TD}/svc/{id}").try_into().unwrap(),
    )];
    let cert = params.self_signed(&key).unwrap();
    tbot::agent::X509Material {
        svid: tbot::issuer::X509Svid {
            identity: "w".into(),
            spiffe_id: format!("spiffe://{TD}/svc/{id}"),
            hint: None,
            certificate: cert.der().to_vec(),
            not_after: time::OffsetDateTime::now_utc(),
        },
        key: key.serialize_der(),
        signer: String::new(),
        tainted: false,
    }
}

#[test]
fn a_reader_polling_through_1000_replacements_never_sees_an_empty_or_torn_file() {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let dir = tempfile::tempdir().unwrap();
    let destination = tbot::resource::agent::Destination {
        kind: tbot::resource::agent::DestinationType::Directory,
        path: dir.path().join("out"),
        owner: None,
        group: None,
        mode: None,
    };
    let bundles = tbot::issuer::Bundles {
        trust_domain: TD.into(),
        x509_authorities: vec![material(0).svid.certificate],
        jwt_keys: vec![],
        sequence: 1,
        ..Default::default()
    };
    let materials: Vec<_> = (1..=1000).map(material).collect();
    tbot::agent::outputs::write_x509(&destination, &materials[0], &bundles, false).unwrap();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (out, done) = (destination.path.clone(), done.clone());
        std::thread::spawn(move || {
            let (mut reads, mut pairs_mismatched) = (0u64, 0u64);
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                // The combined file, in one read: always a key and the certificate it belongs to.
                let combined = std::fs::read(out.join("credential-bundle.private-key.pem")).unwrap();
                let key = PrivateKeyDer::from_pem_slice(&combined).expect("a whole key");
                let cert = CertificateDer::from_pem_slice(&combined).expect("a whole certificate");
                let pair = rcgen::KeyPair::try_from(&key).unwrap();
                let (_, parsed) = x509_parser::parse_x509_certificate(&cert).unwrap();
                assert_eq!(
                    parsed.public_key().subject_public_key.data.as_ref(),
                    rcgen::PublicKeyData::der_bytes(&pair),
                    "the combined file's key is its certificate's"
                );
                // The separate files: never empty, never half written.
                let key = std::fs::read(out.join("svid_key.pem")).unwrap();
                let cert = std::fs::read(out.join("svid.pem")).unwrap();
                PrivateKeyDer::from_pem_slice(&key).expect("svid_key.pem is whole");
                let cert = CertificateDer::from_pem_slice(&cert).expect("svid.pem is whole");
                let pair = rcgen::KeyPair::try_from(&PrivateKeyDer::from_pem_slice(&key).unwrap()).unwrap();
                let (_, parsed) = x509_parser::parse_x509_certificate(&cert).unwrap();
                if parsed.public_key().subject_public_key.data.as_ref() != rcgen::PublicKeyData::der_bytes(&pair) {
                    pairs_mismatched += 1;
                }
                reads += 1;
            }
            (reads, pairs_mismatched)
        })
    };
    for m in &materials[1..] {
        tbot::agent::outputs::write_x509(&destination, m, &bundles, false).unwrap();
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let (reads, mismatched) = reader.join().expect("the reader saw only whole, matching files");
    assert!(reads > 0);
    // Reading the key and then the certificate may straddle one replacement: rare, and the reason
    // the combined file exists.
    eprintln!("{reads} reads; key then certificate straddled a replacement {mismatched} times");
    let left: Vec<_> = std::fs::read_dir(&destination.path)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 4, "no temp file left behind: {left:?}");
}

#[test]
fn parents_created_for_an_owner_let_that_owner_read_its_files() {
    let dir = tempfile::tempdir().unwrap();
    // A tempdir is 0700 root: open it up as an operator's /var/lib would be.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let destination = tbot::resource::agent::Destination {
        kind: tbot::resource::agent::DestinationType::Directory,
        path: dir.path().join("missing/parents/out"),
        owner: Some("nobody".into()),
        group: None,
        mode: None,
    };
    let bundles = tbot::issuer::Bundles {
        trust_domain: TD.into(),
        x509_authorities: vec![material(0).svid.certificate],
        ..Default::default()
    };
    tbot::agent::outputs::write_x509(&destination, &material(1), &bundles, false).unwrap();
    let nobody = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(destination.path.join("svid.pem")).unwrap());
    for parent in ["missing", "missing/parents", "missing/parents/out"] {
        let meta = std::fs::metadata(dir.path().join(parent)).unwrap();
        assert_eq!(
            std::os::unix::fs::MetadataExt::uid(&meta),
            nobody,
            "{parent} is the owner's"
        );
        assert_eq!(mode(&dir.path().join(parent)), 0o700, "{parent}");
    }
    // And the owner reads its file, as itself.
    let read = std::process::Command::new("setpriv")
        .args([
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "head",
            "-c",
            "27",
        ])
        .arg(destination.path.join("svid.pem"))
        .output();
    if let Ok(read) = read {
        assert!(read.status.success(), "{}", String::from_utf8_lossy(&read.stderr));
        assert_eq!(String::from_utf8_lossy(&read.stdout), "-----BEGIN CERTIFICATE-----");
    }
}

#[test]
fn nginx_refuses_a_revoked_client_svid_with_the_crl_of_an_output_and_takes_the_fresh_one() {
    let Some(binary) = nginx_binary() else { return };
    // The output holds a CRL from the start (listing nothing), so nginx can be pointed at it.
    let (_daemon, root, server, client) = server_and_client("", "svid_crl.pem");
    let nginx = Nginx::start(
        &binary,
        &root,
        &server,
        &client.join("svid_bundle.pem"),
        Some(&server.join("svid_crl.pem")),
    );
    wait_until("nginx answering over mTLS", Duration::from_secs(10), || {
        request(nginx.port, &client).ok()
    });

    // The client's key leaks: a copy of its files is what the thief holds.
    let stolen = root.join("out/stolen");
    std::fs::create_dir_all(&stolen).unwrap();
    for f in ["svid.pem", "svid_key.pem", "svid_bundle.pem"] {
        std::fs::copy(client.join(f), stolen.join(f)).unwrap();
    }
    let leaked = serial(&client.join("svid.pem"));
    let hex = leaked.trim().trim_start_matches("serial=").to_owned();
    std::fs::write(
        root.join("etc/revocation.yaml"),
        format!("kind: revocation\nversion: v1\nmetadata: {{name: leaked}}\nspec:\n  reason: client key leaked\n  serials: [\"{hex}\"]\n"),
    )
    .unwrap();
    // The server output's CRL file lists it, nginx reloads (on_update), the thief is refused, and
    // the client output, issued again at once, is let in.
    let refused = wait_until(
        "nginx refusing the revoked certificate",
        Duration::from_secs(20),
        || request(nginx.port, &stolen).err(),
    );
    assert!(!refused.contains("hello SUCCESS"), "{refused}");
    let crl_text = openssl(&[
        "crl",
        "-in",
        server.join("svid_crl.pem").to_str().unwrap(),
        "-noout",
        "-text",
    ]);
    assert!(crl_text.to_uppercase().contains(&hex.to_uppercase()), "{crl_text}");
    assert_ne!(
        serial(&client.join("svid.pem")),
        leaked,
        "the client output was issued again"
    );
    let (text, _) = wait_until("nginx taking the fresh client SVID", Duration::from_secs(10), || {
        request(nginx.port, &client).ok()
    });
    assert!(text.contains("hello SUCCESS"), "{text}");
    assert!(nginx.error_log().contains("revoked"), "{}", nginx.error_log());
}

/// The `kid` in the header of the token in `file`.
fn token_kid(file: &Path) -> String {
    use base64::Engine;
    let token = std::fs::read_to_string(file).unwrap();
    let header = token.split('.').next().unwrap();
    let header: serde_json::Value =
        serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(header).unwrap()).unwrap();
    header["kid"].as_str().unwrap().to_owned()
}

#[test]
fn a_jwt_output_is_issued_again_when_its_key_is_tainted_and_the_x509_output_when_its_ca_is() {
    let (dir, socket) = setup(BOTH);
    let daemon = Daemon::start(dir, socket);
    let (jwt, cert) = (
        daemon.dir.path().join("out/jwt/jwt_svid"),
        daemon.dir.path().join("out/server/svid.pem"),
    );
    wait_until("both outputs", Duration::from_secs(10), || {
        (jwt.exists() && cert.exists()).then_some(())
    });
    let (kid, issuer) = (
        token_kid(&jwt),
        openssl(&["x509", "-in", cert.to_str().unwrap(), "-noout", "-issuer"]),
    );
    assert!(issuer.contains("CA 1"), "{issuer}");
    // A successor activated: the token stays until its renewal (it still verifies); taint makes
    // it go now.
    for args in [&["rotate", "jwt", "--grace", "1h"][..], &["rotate", "jwt", "--force"]] {
        assert!(daemon.tbotctl(args).status.success());
    }
    assert_eq!(
        token_kid(&jwt),
        kid,
        "the token is kept at activation (its key stays published)"
    );
    let tainted = daemon.tbotctl(&["rotate", "jwt", "--taint-old"]);
    assert!(tainted.status.success(), "{}", String::from_utf8_lossy(&tainted.stderr));
    wait_until("a token of the new key", Duration::from_secs(10), || {
        (token_kid(&jwt) != kid).then_some(())
    });
    // The CA: taint activates the prepared one and the x509 output moves at once.
    assert!(daemon.tbotctl(&["rotate", "ca", "--grace", "1h"]).status.success());
    assert!(daemon.tbotctl(&["rotate", "ca", "--taint-old"]).status.success());
    wait_until("an SVID of CA 2 in the output", Duration::from_secs(10), || {
        openssl(&["x509", "-in", cert.to_str().unwrap(), "-noout", "-issuer"])
            .contains("CA 2")
            .then_some(())
    });
}
