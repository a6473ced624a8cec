//! `tbot start` on real directories and sockets, talked to by independent clients: the `spiffe`
//! crate from crates.io (and `openssl` for the chain), `tbot spiffe-inspect`, and a process placed in
//! a systemd service's cgroup.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::service_cgroup;
use spiffe::{BundleSource, JwtSvid, TrustDomain, WorkloadApiClient, X509Source};
use tokio_stream::StreamExt;

fn verify_chain(chain: &[&[u8]], authorities: &[&[u8]]) {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    let leaf = dir.path().join("leaf.pem");
    std::fs::write(
        &ca,
        authorities
            .iter()
            .map(|d| common::pem("CERTIFICATE", d))
            .collect::<String>(),
    )
    .unwrap();
    std::fs::write(&leaf, common::pem("CERTIFICATE", chain[0])).unwrap();
    let out = common::openssl(&["verify", "-CAfile", ca.to_str().unwrap(), leaf.to_str().unwrap()]);
    assert!(out.contains(": OK"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_spiffe_crate_gets_an_svid_whose_chain_verifies_and_jwts_that_validate() {
    let daemon = common::quickstart("");
    let uid = std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
        .unwrap();
    let expected = format!("spiffe://quickstart.tbot.local/user/{uid}");

    let source = X509Source::builder()
        .endpoint(daemon.endpoint())
        .build()
        .await
        .expect("an X509Source");
    let svid = source.svid().unwrap();
    assert_eq!(svid.spiffe_id().to_string(), expected);
    assert_eq!(svid.hint(), Some("quickstart"));
    let td = TrustDomain::new("quickstart.tbot.local").unwrap();
    let bundle = source
        .bundle_set()
        .unwrap()
        .get(&td)
        .expect("a bundle for the trust domain");
    let chain: Vec<&[u8]> = svid.cert_chain().iter().map(|c| c.as_ref()).collect();
    let authorities: Vec<&[u8]> = bundle.authorities().iter().map(|c| c.as_ref()).collect();
    verify_chain(&chain, &authorities);
    source.shutdown().await;

    let client = WorkloadApiClient::connect_to(daemon.endpoint()).await.unwrap();
    let jwt = client.fetch_jwt_svid(["payments"], None).await.expect("a JWT-SVID");
    assert_eq!(jwt.spiffe_id().to_string(), expected);
    let validated = client
        .validate_jwt_token("payments", jwt.token())
        .await
        .expect("ValidateJWTSVID accepts it");
    assert_eq!(validated.spiffe_id().to_string(), expected);
    assert!(client.validate_jwt_token("someone-else", jwt.token()).await.is_err());
    let jwt_bundles = client.fetch_jwt_bundles().await.unwrap();
    let checked =
        JwtSvid::parse_and_validate(jwt.token(), &jwt_bundles, &["payments"]).expect("the crate's own validation");
    assert_eq!(checked.spiffe_id().to_string(), expected);
    assert!(jwt_bundles.bundle_for_trust_domain(&td).unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_raw_call_without_the_security_header_gets_invalid_argument() {
    use tbot::workload_api::proto::X509svidRequest;
    use tbot::workload_api::proto::spiffe_workload_api_client::SpiffeWorkloadApiClient;
    let daemon = common::quickstart("");
    let channel = tbot::workload_api::client::connect(&daemon.endpoint()).await.unwrap();
    let mut raw = SpiffeWorkloadApiClient::new(channel);
    let status = raw
        .fetch_x509svid(tonic::Request::new(X509svidRequest {}))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    let mut twice = tbot::workload_api::client::request(X509svidRequest {});
    twice
        .metadata_mut()
        .append("workload.spiffe.io", "true".parse().unwrap());
    let status = raw.fetch_x509svid(twice).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_jwt_request_for_a_malformed_spiffe_id_is_invalid_and_says_why() {
    use tbot::workload_api::proto::JwtsvidRequest;
    use tbot::workload_api::proto::spiffe_workload_api_client::SpiffeWorkloadApiClient;
    let daemon = common::quickstart("");
    let channel = tbot::workload_api::client::connect(&daemon.endpoint()).await.unwrap();
    let mut raw = SpiffeWorkloadApiClient::new(channel);
    for bad in [
        "spiffe://quickstart.tbot.local:443/user/0",
        "spiffe://quickstart.tbot.local/a/../b",
        "user/0",
    ] {
        let request = JwtsvidRequest {
            audience: vec!["demo".into()],
            spiffe_id: bad.into(),
        };
        let status = raw
            .fetch_jwtsvid(tbot::workload_api::client::request(request))
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{bad}: {status:?}");
        assert!(status.message().contains("is not a SPIFFE ID"), "{status:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_short_lived_svid_rotates_on_open_streams_and_two_streams_share_one_issuance() {
    let daemon = common::quickstart("credential_ttl: 6s\nrenewal_interval: 3s\n");
    let client = WorkloadApiClient::connect_to(daemon.endpoint()).await.unwrap();
    let mut first = client.stream_x509_contexts().await.unwrap();
    let mut second = client.stream_x509_contexts().await.unwrap();
    let leaf = |ctx: &spiffe::X509Context| ctx.svids()[0].leaf().as_ref().to_vec();
    let key = |ctx: &spiffe::X509Context| ctx.svids()[0].private_key().as_ref().to_vec();
    let a1 = first.next().await.unwrap().unwrap();
    let b1 = second.next().await.unwrap().unwrap();
    // (Seen failing once in a full run, in under a second: the daemon's log says what it did.)
    assert_eq!(
        leaf(&a1),
        leaf(&b1),
        "both streams got the same SVID: one issuance\n{}",
        daemon.log()
    );
    let a2 = tokio::time::timeout(Duration::from_secs(30), first.next())
        .await
        .expect("a rotation within 30s");
    let a2 = a2.unwrap().unwrap();
    let received = time::OffsetDateTime::now_utc();
    assert_ne!(leaf(&a1), leaf(&a2), "a new certificate");
    assert_ne!(key(&a1), key(&a2), "with a new key");
    let old_der = leaf(&a1);
    let (_, old) = x509_parser::parse_x509_certificate(&old_der).unwrap();
    assert!(
        old.validity().not_after.to_datetime() > received,
        "the new SVID came before the old one expired"
    );
    let b2 = tokio::time::timeout(Duration::from_secs(10), second.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(leaf(&a2), leaf(&b2), "the rotation reached both streams");
}

#[test]
fn spiffe_inspect_prints_the_svid_and_the_trust_bundle() {
    let daemon = common::quickstart("");
    let out = Command::new(env!("CARGO_BIN_EXE_tbot"))
        .args([
            "spiffe-inspect",
            "--path",
            &format!("unix://{}", daemon.socket.display()),
            "--audience",
            "demo",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("- spiffe://quickstart.tbot.local/user/"), "{text}");
    assert!(text.contains("DNS SANs: quickstart.local"), "{text}");
    assert!(
        text.contains("- spiffe://quickstart.tbot.local: 1 CA certificate(s)"),
        "{text}"
    );
    assert!(text.contains("JWT-SVIDs for audience demo:"), "{text}");
    assert!(text.contains("- spiffe://quickstart.tbot.local: 1 key(s)"), "{text}");
    drop(daemon);
    let out = Command::new(env!("CARGO_BIN_EXE_tbot"))
        .args(["spiffe-inspect", "--path", "unix:///nonexistent/workload.sock"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("= hint:"));
}

#[test]
fn a_live_socket_is_never_stolen_and_stops_cleanly() {
    let daemon = common::quickstart("");
    // A second daemon on the same socket (its own memory storage) must refuse.
    let etc = daemon.dir.path().join("etc");
    let out = Command::new(env!("CARGO_BIN_EXE_tbot"))
        .args(["start", "--config-dir"])
        .arg(&etc)
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{log}");
    // Found before anything is created: the admin socket is checked first.
    assert!(log.contains("is in use by another running process"), "{log}");
    let socket = daemon.socket.clone();
    drop(daemon);
    assert!(!socket.exists(), "the socket is removed on SIGTERM");
}

// ---- systemd attestation: a child process moved into a service's cgroup ----

const CHILD_ENV: &str = "TBOT_TEST_CHILD_ENDPOINT";

/// Runs only as the child of `a_process_in_a_systemd_service_gets_its_svid_and_others_are_denied`
/// (see [`common::child_fetch`]).
#[tokio::test]
async fn child_fetches_when_told() {
    common::child_fetch(CHILD_ENV).await;
}

fn spawn_child(endpoint: &str) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["child_fetches_when_told", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, endpoint)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn child_answer(mut child: Child) -> String {
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let reader = BufReader::new(child.stdout.take().unwrap());
    let answer = reader
        .lines()
        .map_while(Result::ok)
        .find_map(|l| {
            // libtest may print `test NAME ... ` before the child's own output on the same line.
            let at = l.find("SPIFFE_ID=").or_else(|| l.find("ERROR="))?;
            Some(l[at..].trim().to_owned())
        })
        .unwrap_or_default();
    let _ = child.wait();
    answer
}

#[test]
fn a_process_in_a_systemd_service_gets_its_svid_and_others_are_denied() {
    let Some(cgroup) = service_cgroup("my-app.service")
        .filter(|_| std::fs::create_dir_all(service_cgroup("my-app.service").unwrap()).is_ok())
    else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI must be able to create a systemd cgroup (run as root)"
        );
        eprintln!("skipping: cannot create a systemd cgroup here (not root?)");
        return;
    };
    let (dir, socket) = common::copy_manifests(
        "manifests/guide",
        &[
            ("tbot.yaml", "join_method: iam", "join_method: token"),
            ("tbot.yaml", "unix:///opt/machine-id/workload.sock", "unix://SOCKET"),
            ("bot-token.yaml", "join_method: iam", "join_method: token"),
            (
                "bot-token.yaml",
                "  allow:\n    - aws_account: \"111111111111\"\n      aws_arn: \"arn:aws:sts::111111111111:assumed-role/teleport-bot-role/i-*\"\n",
                "",
            ),
        ],
    );
    let daemon = common::Daemon::start(dir, socket);
    let endpoint = daemon.endpoint();

    let inside = spawn_child(&endpoint);
    std::fs::write(cgroup.join("cgroup.procs"), inside.id().to_string()).expect("move the child into the service");
    let answer = child_answer(inside);
    let _ = std::fs::remove_dir(&cgroup);
    assert_eq!(
        answer,
        "SPIFFE_ID=spiffe://example.teleport.sh/svc/my-app",
        "{}",
        daemon.log()
    );

    let outside = spawn_child(&endpoint);
    let answer = child_answer(outside);
    assert!(
        answer.starts_with("ERROR=") && answer.contains("PermissionDenied"),
        "{answer}"
    );
    // The denial says what each attestor found.
    assert!(
        answer.contains("the caller was attested as: unix: uid") && answer.contains("systemd: none found"),
        "{answer}"
    );
}

// ---- mutual TLS between two processes, each with an SVID from the socket ----

const TLS_SERVER_ENV: &str = "TBOT_TEST_TLS_SERVER_ENDPOINT";

/// Runs only as the child of `two_processes_complete_a_mutual_tls_handshake_with_their_svids`: a TLS
/// server that requires a client SVID, answers one connection with the client's SPIFFE ID.
#[tokio::test(flavor = "multi_thread")]
async fn child_serves_mutual_tls() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(endpoint) = std::env::var(TLS_SERVER_ENV) else {
        return;
    };
    let source = X509Source::builder().endpoint(endpoint).build().await.unwrap();
    let config = spiffe_rustls::mtls_server(source)
        .authorize(spiffe_rustls::authorizer::trust_domains(["quickstart.tbot.local"]).unwrap())
        .build()
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    println!("PORT={}", listener.local_addr().unwrap().port());
    let (tcp, _) = listener.accept().await.unwrap();
    let mut tls = acceptor.accept(tcp).await.expect("the server side of the handshake");
    let peer = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    let (_, cert) = x509_parser::parse_x509_certificate(&peer).unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap();
    let id = format!("{:?}", san.value.general_names[0]);
    let mut buf = [0u8; 5];
    tls.read_exact(&mut buf).await.unwrap();
    tls.write_all(format!("{id}\n").as_bytes()).await.unwrap();
    tls.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn two_processes_complete_a_mutual_tls_handshake_with_their_svids() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let daemon = common::quickstart("");
    let mut server = Command::new(std::env::current_exe().unwrap())
        .args(["child_serves_mutual_tls", "--exact", "--nocapture", "--test-threads=1"])
        .env(TLS_SERVER_ENV, daemon.endpoint())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = server.stdout.take().unwrap();
    let port: u16 = tokio::task::spawn_blocking(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find_map(|l| l.split_once("PORT=").and_then(|(_, p)| p.trim().parse().ok()))
    })
    .await
    .unwrap()
    .expect("the server child prints its port");
    let source = X509Source::builder().endpoint(daemon.endpoint()).build().await.unwrap();
    let me = source.svid().unwrap().spiffe_id().to_string();
    let config = spiffe_rustls::mtls_client(source)
        .authorize(spiffe_rustls::authorizer::exact([me.as_str()]).unwrap())
        .build()
        .unwrap();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector
        .connect(name, tcp)
        .await
        .expect("the client side of the handshake");
    tls.write_all(b"hello").await.unwrap();
    let mut answer = String::new();
    tls.read_to_string(&mut answer).await.unwrap();
    assert!(answer.contains(&me), "the server saw the client's SPIFFE ID: {answer}");
    let _ = server.wait();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_socket_answers_grpc_health_checks() {
    let daemon = common::quickstart("");
    let channel = tbot::workload_api::client::connect(&daemon.endpoint()).await.unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let reply = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "SpiffeWorkloadAPI".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        reply.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
}

#[test]
fn a_restart_on_the_same_storage_renews_the_saved_identity_and_serves_the_same_bundle() {
    let (dir, socket) = common::copy_manifests("manifests/quickstart", &common::QUICKSTART_ON_DISK);
    let daemon = common::Daemon::start(dir, socket);
    let ca =
        |d: &common::Daemon| std::fs::read(d.dir.path().join("state/issuer/quickstart.tbot.local/ca-1.der")).unwrap();
    let before = ca(&daemon);
    let daemon = daemon.restart();
    assert!(daemon.log().contains("saved bot identity renewed"), "{}", daemon.log());
    assert_eq!(ca(&daemon), before, "the same CA after a restart");
    assert!(
        !daemon
            .dir
            .path()
            .join("state/issuer/quickstart.tbot.local/ca-2.der")
            .exists()
    );
    let out = Command::new(env!("CARGO_BIN_EXE_tbot"))
        .args([
            "spiffe-inspect",
            "--path",
            &format!("unix://{}", daemon.socket.display()),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn private_keys_never_appear_in_debug_logs_or_tbotctl_output() {
    use base64::Engine;
    let (dir, socket) = common::copy_manifests("manifests/quickstart", &common::QUICKSTART_ON_DISK);
    // Trace level, everything: the daemon's own and its libraries'.
    let daemon = common::Daemon::start_with_env(dir, socket, &[("RUST_LOG", "trace")]);
    let out = Command::new(env!("CARGO_BIN_EXE_tbot"))
        .args([
            "spiffe-inspect",
            "--path",
            &format!("unix://{}", daemon.socket.display()),
            "--audience",
            "a",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let yaml = common::stdout(&daemon.tbotctl(&["get", "-o", "yaml", "--show-secrets"]));
    let state = daemon.dir.path().join("state");
    let keys: Vec<PathBuf> = [
        "issuer/quickstart.tbot.local/ca-1.key",
        "issuer/quickstart.tbot.local/jwt-1.key",
        "agent/identity.key",
    ]
    .iter()
    .map(|k| state.join(k))
    .collect();
    // The issuer's files follow its log within about a second.
    for key in &keys {
        common::wait_until(&format!("{} on disk", key.display()), Duration::from_secs(10), || {
            key.exists().then_some(())
        });
    }
    let log = daemon.log();
    assert!(log.len() > 1000, "a debug log was written");
    for key in keys {
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key).unwrap().permissions()) & 0o777;
        assert_eq!(mode, 0o600, "{}", key.display());
        let der = std::fs::read(&key).unwrap();
        // The private scalar sits inside the PKCS#8 DER; any 24-byte window of it in any common
        // encoding would show a leak.
        for window in der.chunks(24).filter(|c| c.len() == 24) {
            let b64 = base64::engine::general_purpose::STANDARD.encode(window);
            let hex: String = window.iter().map(|b| format!("{b:02x}")).collect();
            let debug = format!("{:?}", window);
            for text in [&log, &yaml] {
                assert!(
                    !text.contains(&b64[4..28]) && !text.contains(&hex) && !text.contains(&debug[1..60]),
                    "key bytes of {} leaked",
                    key.display()
                );
            }
        }
    }
}
