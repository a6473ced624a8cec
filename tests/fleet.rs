//! The guide's topology on loopback: an issuer host (`issuer` document + cluster documents) and
//! agents on "other hosts" (only a `tbot.yaml` each) joining it over the issuer API, observed with
//! the Rust `spiffe` crate, py-spiffe and `tbotctl`.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::fleet::{
    self, Issuer, agent_cas, agent_config, start_agent, token_onboarding, wait_for_socket, wait_for_status,
};
use common::{Contexts, Daemon, id, open_stream, save, service_cgroup, stdout};
use spiffe::{WorkloadApiClient, X509Context};
use tokio_stream::StreamExt;

const TOKEN: &str = "fleet-token-change-me";
const UID_TEMPLATE: &str = "/uid/{{workload.unix.uid}}";

fn uid() -> u32 {
    std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").unwrap())
}

/// An agent of `issuer` joined by the fleet token, serving the issuer's `example-workload-identity`.
fn agent(issuer: &Issuer) -> Daemon {
    let (port, pin) = (issuer.port, issuer.pin.clone());
    let daemon = start_agent(
        |dir| agent_config(dir, port, &token_onboarding(TOKEN, &pin), "example-workload-identity"),
        &[],
    );
    wait_for_socket(&daemon);
    daemon
}

fn edit(dir: &Path, file: &str, from: &str, to: &str) {
    let path = dir.join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains(from), "{file} has no {from:?}");
    save(&path, &text.replace(from, to));
}

/// The next message on `stream` whose SPIFFE ID is not `old` (15 s).
async fn next_other_id(stream: &mut Contexts, old: &str) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let ctx = tokio::time::timeout_at(deadline, stream.next())
            .await
            .expect("a new SVID on the open stream within 15 s")
            .expect("the stream stays open")
            .expect("a message, not an error");
        if id(&ctx) != old {
            return id(&ctx);
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_edit_on_the_issuer_reaches_an_open_stream_on_a_remote_agent() {
    let issuer = Issuer::start(UID_TEMPLATE, &[]);
    let agent = agent(&issuer);
    let (mut stream, first) = open_stream(&agent).await;
    assert_eq!(id(&first), format!("spiffe://example.teleport.sh/uid/{}", uid()));
    // The agent trusts the issuer's CA: the bundle it serves holds it.
    let bundle = first
        .bundle_set()
        .get(&spiffe::TrustDomain::new("example.teleport.sh").unwrap())
        .expect("the issuer's bundle");
    assert_eq!(bundle.authorities().len(), 1);

    edit(
        &issuer.etc(),
        "workload-identity.yaml",
        UID_TEMPLATE,
        "/edited/{{workload.unix.uid}}",
    );
    let new = next_other_id(&mut stream, &id(&first)).await;
    assert_eq!(
        new,
        format!("spiffe://example.teleport.sh/edited/{}", uid()),
        "{}",
        agent.log()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_issuer_killed_and_restarted_under_an_open_stream_changes_nothing_for_the_workload() {
    let issuer = Issuer::start(UID_TEMPLATE, &[]);
    let agent = agent(&issuer);
    let (mut stream, first) = open_stream(&agent).await;
    wait_for_status(&issuer.daemon, "the agent shows as connected", |s| {
        s.contains("(1 agent connected)")
    });

    let etc = issuer.etc();
    let (dir, admin) = issuer.daemon.crash();
    let stalled = wait_for_status(&agent, "the agent shows the issuer as unreachable", |s| {
        s.contains("NOT connected")
    });
    assert!(stalled.contains("issuer: 127.0.0.1:"), "{stalled}");
    // While the issuer is down the workload is served what the agent holds: on a new connection,
    // and from new processes (py-spiffe one-shot fetches, each its own pid).
    let client = WorkloadApiClient::connect_to(agent.endpoint()).await.unwrap();
    let held = client.fetch_x509_svid().await.expect("served from the agent's cache");
    assert_eq!(held.spiffe_id().to_string(), id(&first));
    if let Some(python) = common::venv_python("spiffe") {
        for _ in 0..3 {
            let out = Command::new(&python)
                .arg(common::root().join("tests/peers/spiffe_peer.py"))
                .args(["once", agent.socket.to_str().unwrap()])
                .output()
                .unwrap();
            let said = String::from_utf8_lossy(&out.stdout);
            assert!(said.contains(&id(&first)), "a new process during the outage: {said}");
        }
    }
    let out = agent.tbotctl(&["get", "agent_config"]);
    assert!(
        stdout(&out).contains("IssuerUnreachable") || stdout(&out).contains("Stalled"),
        "{}",
        stdout(&out)
    );

    let _ = std::fs::remove_file(&admin);
    let issuer = Issuer {
        daemon: Daemon::start(dir, admin),
        port: issuer.port,
        pin: issuer.pin,
    };
    assert_eq!(fleet::pin_of(&issuer.daemon), issuer.pin, "the same CA after a restart");
    wait_for_status(&agent, "the agent reconnects by itself", |s| s.contains("(connected)"));
    // And the restarted issuer still reaches the open stream.
    edit(
        &etc,
        "workload-identity.yaml",
        UID_TEMPLATE,
        "/after-restart/{{workload.unix.uid}}",
    );
    let new = next_other_id(&mut stream, &id(&first)).await;
    assert!(new.contains("/after-restart/"), "{new}");
}

#[test]
fn a_wrong_pin_is_refused_naming_the_pin_the_server_presented_and_the_agent_keeps_trying() {
    let issuer = Issuer::start(UID_TEMPLATE, &[]);
    let wrong = format!("sha256:{}", "0".repeat(64));
    let port = issuer.port;
    let agent = start_agent(
        |dir| agent_config(dir, port, &token_onboarding(TOKEN, &wrong), "example-workload-identity"),
        &[],
    );
    let out = wait_for_status(&agent, "the refusal is shown", |s| s.contains("presented CA pin"));
    let get = stdout(&agent.tbotctl(&["get", "agent_config"]));
    assert!(
        get.contains(&format!("presented CA pin {}", issuer.pin)),
        "{get}\n{out}"
    );
    assert!(get.contains("not in `onboarding.ca_pins`"), "{get}");
    let status = agent.tbotctl(&["status"]);
    assert_eq!(status.status.code(), Some(1), "not ready: {}", stdout(&status));
    assert!(
        stdout(&status).contains("bot: not joined yet: ") && stdout(&status).contains("presented CA pin"),
        "{}",
        stdout(&status)
    );
    assert!(
        !agent.log().contains("documents changed; converging add=0"),
        "{}",
        agent.log()
    );
    assert!(!agent.log().contains("interrupted"), "{}", agent.log());
    assert!(!agent.socket.exists(), "no workload socket without an identity");
    // The token was never sent anywhere: the right pin joins with it.
    let dir = agent.dir.path().join("etc");
    edit(&dir, "tbot.yaml", &wrong, &issuer.pin);
    wait_for_socket(&agent);
    wait_for_status(&agent, "the agent joins once the pin is fixed", |s| {
        s.contains("(connected)")
    });
}

#[test]
fn a_second_agent_with_a_used_token_is_refused_and_waits_for_an_edit() {
    let issuer = Issuer::start(UID_TEMPLATE, &[]);
    let _first = agent(&issuer);
    let (port, pin) = (issuer.port, issuer.pin.clone());
    let second = start_agent(
        |dir| agent_config(dir, port, &token_onboarding(TOKEN, &pin), "example-workload-identity"),
        &[],
    );
    let get = || stdout(&second.tbotctl(&["get", "agent_config"]));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !get().contains("already used") {
        assert!(Instant::now() < deadline, "{}\n{}", get(), second.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(get().contains("(waiting for an edit)"), "{}", get());
    // One instance joined; the issuer lists it with where it came from.
    let bots = stdout(&issuer.daemon.tbotctl(&["get", "bot/example-bot"]));
    assert!(bots.contains("Instances of bot/example-bot (1):"), "{bots}");
    assert!(bots.contains("token") && bots.contains("127.0.0.1:"), "{bots}");
}

#[test]
fn an_agent_without_a_pin_refuses_to_start_and_says_how_to_get_one() {
    let dir = tempfile::tempdir().unwrap();
    let etc = dir.path().join("etc");
    std::fs::create_dir(&etc).unwrap();
    let onboarding = format!("  join_method: token\n  token: {TOKEN}\n");
    std::fs::write(
        etc.join("tbot.yaml"),
        agent_config(dir.path(), 1, &onboarding, "example-workload-identity"),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tbot"))
        .args(["start", "--config-dir"])
        .arg(&etc)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("nothing says which issuer to trust"), "{err}");
    assert!(err.contains("tbotctl status"), "{err}");
}

#[test]
fn the_issuer_and_the_agent_report_each_other() {
    let issuer = Issuer::start(UID_TEMPLATE, &[]);
    let agent = agent(&issuer);
    let on_agent = wait_for_status(&agent, "connected", |s| s.contains("(connected)"));
    assert!(
        on_agent.contains(&format!("issuer: 127.0.0.1:{} (connected)", issuer.port)),
        "{on_agent}"
    );
    assert!(on_agent.contains(&format!("CA pin: {}", issuer.pin)), "{on_agent}");
    let on_issuer = wait_for_status(&issuer.daemon, "one agent", |s| s.contains("(1 agent connected)"));
    assert!(on_issuer.contains("example-bot/"), "{on_issuer}");
    assert!(on_issuer.contains("bot: none on this host"), "{on_issuer}");
    // One TLS handshake: the agent's `Watch` stream is on the connection its join came on (the
    // issuer bound it to the new bot certificate), so the join's address, port included, is the
    // stream's.
    let log = issuer.daemon.log();
    let joined_from = log
        .lines()
        .find(|l| l.contains("bot joined"))
        .and_then(|l| l.split_whitespace().find_map(|w| w.strip_prefix("address=")))
        .unwrap_or_else(|| panic!("no join address in the issuer's log: {log}"));
    assert!(joined_from.starts_with("127.0.0.1:"), "{joined_from}");
    assert!(
        on_issuer.contains(joined_from),
        "joined from {joined_from}: {on_issuer}"
    );
    // An issuer directory without an agent config: `tbotctl` found its admin socket from the
    // `issuer` document.
    assert!(
        issuer.daemon.log().contains("issuer API listening"),
        "{}",
        issuer.daemon.log()
    );
}

// ---- a workload in a systemd service, on the agent host: Rust `spiffe` and py-spiffe ----

const CHILD_ENV: &str = "TBOT_TEST_FLEET_CHILD_ENDPOINT";

/// Runs only as the child of the systemd test (see [`common::child_fetch`]).
#[tokio::test]
async fn child_fetches_when_told() {
    common::child_fetch(CHILD_ENV).await;
}

/// Starts `command` stopped on stdin, moves it into `cgroup`, lets it go, and returns its output.
fn run_in_cgroup(mut command: Command, cgroup: &Path) -> String {
    let mut child: Child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::fs::write(cgroup.join("cgroup.procs"), child.id().to_string()).expect("move into the service");
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let mut out = String::new();
    for line in BufReader::new(child.stdout.take().unwrap())
        .lines()
        .map_while(Result::ok)
    {
        out.push_str(&line);
        out.push('\n');
    }
    let _ = child.wait();
    out
}

#[test]
fn a_systemd_service_on_an_agent_host_gets_the_issuers_identity_through_rust_spiffe_and_py_spiffe() {
    let Some(cgroup) = service_cgroup("my-app.service").filter(|c| std::fs::create_dir_all(c).is_ok()) else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI must be able to create a systemd cgroup (run as root)"
        );
        eprintln!("skipping: cannot create a systemd cgroup here (not root?)");
        return;
    };
    // The guide's identity, unchanged: /svc/{{workload.systemd.service}}.
    let issuer = Issuer::start("/svc/{{workload.systemd.service}}", &[]);
    let agent = agent(&issuer);
    let want = "spiffe://example.teleport.sh/svc/my-app";

    let mut rust = Command::new(std::env::current_exe().unwrap());
    rust.args(["child_fetches_when_told", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, agent.endpoint());
    let answer = run_in_cgroup(rust, &cgroup);
    assert!(
        answer.contains(&format!("SPIFFE_ID={want}")),
        "{answer}\n{}",
        agent.log()
    );

    if let Some(python) = common::venv_python("spiffe") {
        let script = common::root().join("tests/peers/spiffe_peer.py");
        let mut py = Command::new("sh");
        py.args([
            "-c",
            &format!(
                "read go; exec {} {} pyspiffe {} api.example.com",
                python.display(),
                script.display(),
                agent.socket.display()
            ),
        ]);
        let out = run_in_cgroup(py, &cgroup);
        let value: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|_| panic!("{out}"));
        assert_eq!(value["x509_spiffe_id"], want, "{out}");
        assert_eq!(
            value["jwt_spiffe_id"], want,
            "a JWT-SVID signed by the remote issuer: {out}"
        );
        assert_eq!(value["validated_spiffe_id"], want, "validated on the agent: {out}");
        assert_eq!(
            value["offline_validated_spiffe_id"], want,
            "validated with the JWKS: {out}"
        );
        assert_eq!(value["x509_bundle_trust_domains"][0], "example.teleport.sh", "{out}");
    }
    let _ = std::fs::remove_dir(&cgroup);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_issuer_host_given_an_agent_config_serves_its_own_workloads_beside_remote_agents() {
    let issuer = Issuer::start(UID_TEMPLATE, &[]);
    let remote = agent(&issuer);
    // The agent config arrives while the issuer runs: its agent joins the issuer in process.
    let etc = issuer.etc();
    std::fs::write(
        etc.join("local-token.yaml"),
        "kind: token\nversion: v2\nmetadata: {name: local-token}\nspec: {roles: [Bot], join_method: token, bot_name: example-bot}\n",
    )
    .unwrap();
    let socket = issuer.daemon.dir.path().join("local.sock");
    let state = issuer.daemon.dir.path().join("agent-state");
    std::fs::write(
        etc.join("tbot.yaml"),
        format!(
            "version: v2\nonboarding: {{join_method: token, token: local-token}}\n\
             storage: {{type: directory, path: {}}}\n\
             services:\n  - type: workload-identity-api\n    listen: unix://{}\n    selector: {{name: example-workload-identity}}\n",
            state.display(),
            socket.display()
        ),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(Instant::now() < deadline, "no local socket:\n{}", issuer.daemon.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let local = WorkloadApiClient::connect_to(format!("unix:{}", socket.display()))
        .await
        .unwrap()
        .fetch_x509_context()
        .await
        .unwrap();
    let far = WorkloadApiClient::connect_to(remote.endpoint())
        .await
        .unwrap()
        .fetch_x509_context()
        .await
        .unwrap();
    assert_eq!(id(&local), id(&far), "one trust domain, one identity for one uid");
    assert!(
        state.join("agent/identity.der").exists(),
        "the agent config's own storage is used, though it arrived after the start"
    );
    let td = spiffe::TrustDomain::new("example.teleport.sh").unwrap();
    assert_eq!(
        local.bundle_set().get(&td).unwrap().authorities(),
        far.bundle_set().get(&td).unwrap().authorities(),
        "one CA on both hosts"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_ca_rotation_on_the_issuer_puts_both_cas_in_a_remote_agents_bundle_before_new_svids() {
    let issuer = Issuer::start(UID_TEMPLATE, &[]);
    let agent = agent(&issuer);
    let (mut stream, first) = open_stream(&agent).await;
    let td = spiffe::TrustDomain::new("example.teleport.sh").unwrap();
    let cas = |ctx: &X509Context| ctx.bundle_set().get(&td).unwrap().authorities().len();
    assert_eq!(cas(&first), 1);
    edit(
        &issuer.etc(),
        "cluster.yaml",
        "  name: example.teleport.sh\n",
        "  name: example.teleport.sh\nspec:\n  ca: {key_algorithm: ed25519}\n",
    );
    // The edit prepares the new CA; activate it now rather than after the grace.
    wait_for_status(&issuer.daemon, "the new CA is prepared", |s| {
        s.matches("CA pin: ").count() == 2
    });
    let forced = issuer.daemon.tbotctl(&["rotate", "ca", "--force"]);
    assert!(forced.status.success(), "{}", String::from_utf8_lossy(&forced.stderr));
    // Every message from now on holds an SVID whose CA is in the bundle it comes with (the two CAs
    // differ in algorithm, so the leaf's signature algorithm names its CA); the last holds both CAs
    // and an SVID of the new one.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let ctx = tokio::time::timeout_at(deadline, stream.next())
            .await
            .expect("the rotation reaches the open stream")
            .unwrap()
            .unwrap();
        let leaf = ctx.svids()[0].leaf().as_ref().to_vec();
        let (_, cert) = x509_parser::parse_x509_certificate(&leaf).unwrap();
        let authorities = ctx.bundle_set().get(&td).unwrap().authorities().to_vec();
        let signed_with = cert.signature_algorithm.algorithm.to_id_string();
        let ca_algorithms: Vec<String> = authorities
            .iter()
            .map(|ca| {
                let (_, ca) = x509_parser::parse_x509_certificate(ca.as_ref()).unwrap();
                ca.public_key().algorithm.algorithm.to_id_string()
            })
            .collect();
        // Ed25519 signs as 1.3.101.112 with an Ed25519 key; P-256 as ecdsa-with-SHA256 with an EC key.
        let wanted_key = if signed_with == "1.3.101.112" {
            "1.3.101.112"
        } else {
            "1.2.840.10045.2.1"
        };
        assert!(
            ca_algorithms.iter().any(|a| a == wanted_key),
            "an SVID signed with {signed_with} came with the CAs {ca_algorithms:?}"
        );
        if cas(&ctx) == 2 && signed_with == "1.3.101.112" {
            break;
        }
    }
    // And the agent still reaches the issuer, now serving a certificate of the new CA.
    wait_for_status(&agent, "both CAs' pins on the agent", |s| {
        s.matches("CA pin: ").count() == 2
    });
}

/// The issuer API's TLS, checked by a client nobody here wrote: `openssl s_client` completes TLS 1.3
/// with ALPN `h2`, verifies the serving certificate against the trust domain's CA (the one the pin
/// names) for the address in `public_addrs`, and is refused TLS 1.2.
#[test]
fn openssl_verifies_the_issuer_api_against_the_pinned_ca_over_tls_1_3_only() {
    let issuer = Issuer::start(UID_TEMPLATE, &[]);
    let ca_der = issuer.ca_der();
    assert_eq!(
        tbot::issuer::keys::ca::spki_pin(&ca_der).unwrap(),
        issuer.pin,
        "the pin names this CA"
    );
    let ca = issuer.daemon.dir.path().join("ca.pem");
    std::fs::write(&ca, common::pem("CERTIFICATE", &ca_der)).unwrap();
    let connect = format!("127.0.0.1:{}", issuer.port);
    let s_client = |extra: &[&str]| {
        let mut args = vec![
            "s_client",
            "-connect",
            &connect,
            "-CAfile",
            ca.to_str().unwrap(),
            "-verify_return_error",
            "-verify_ip",
            "127.0.0.1",
            "-alpn",
            "h2",
        ];
        args.extend_from_slice(extra);
        Command::new("openssl")
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .expect("openssl runs")
    };
    let ok = s_client(&["-tls1_3"]);
    let text = String::from_utf8_lossy(&ok.stdout);
    assert!(text.contains("Verify return code: 0 (ok)"), "{text}");
    assert!(text.contains("ALPN protocol: h2"), "{text}");
    assert!(text.contains("TLSv1.3"), "{text}");
    let old = s_client(&["-tls1_2"]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&old.stdout),
        String::from_utf8_lossy(&old.stderr)
    );
    assert!(
        !old.status.success() || !text.contains("Verify return code: 0 (ok)"),
        "TLS 1.2 was served:\n{text}"
    );
}

/// `onboarding.ca_path` instead of a pin: the issuer's CA certificate as a PEM file that openssl
/// wrote from the DER in the issuer's storage.
#[test]
fn an_agent_trusting_the_issuers_ca_file_joins_and_one_for_another_ca_is_refused() {
    let issuer = Issuer::start(UID_TEMPLATE, &[]);
    let der = issuer.ca_path();
    let pem = issuer.daemon.dir.path().join("issuer-ca.pem");
    common::openssl(&[
        "x509",
        "-inform",
        "der",
        "-in",
        der.to_str().unwrap(),
        "-out",
        pem.to_str().unwrap(),
    ]);
    let port = issuer.port;
    let with_file = |file: std::path::PathBuf| {
        move |dir: &Path| {
            let onboarding = format!(
                "  join_method: token\n  token: {TOKEN}\n  ca_path: {}\n",
                file.display()
            );
            agent_config(dir, port, &onboarding, "example-workload-identity")
        }
    };
    // Another CA's file first: refused, the token untouched.
    let other = issuer.daemon.dir.path().join("other-ca.pem");
    let key = issuer.daemon.dir.path().join("other-ca.key");
    common::self_signed(&other, &key, "/CN=someone else", None);
    let refused = start_agent(with_file(other), &[]);
    wait_for_status(&refused, "the other CA is refused", |s| s.contains("NOT connected"));
    let get = stdout(&refused.tbotctl(&["get", "agent_config"]));
    assert!(
        get.contains("which is not in `onboarding.ca_pins` nor the CA file `onboarding.ca_path`"),
        "{get}"
    );
    assert!(get.contains(&format!("presented CA pin {}", issuer.pin)), "{get}");
    drop(refused);
    let agent = start_agent(with_file(pem), &[]);
    wait_for_socket(&agent);
    wait_for_status(&agent, "connected", |s| s.contains("(connected)"));
}

/// The issuer name of the first SVID's leaf: which CA signed it.
fn leaf_issuer(ctx: &X509Context) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(ctx.svids()[0].leaf().as_ref()).unwrap();
    cert.issuer().to_string()
}

fn rotate(issuer: &Issuer, args: &[&str]) -> std::process::Output {
    let mut all = vec!["rotate", "ca"];
    all.extend_from_slice(args);
    issuer.daemon.tbotctl(&all)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_forced_ca_rotation_moves_a_remote_agent_at_each_step_and_one_it_would_strand_is_named_on_both_hosts() {
    let issuer = Issuer::start(UID_TEMPLATE, &[]);
    let agent = agent(&issuer);
    let (stream, first) = open_stream(&agent).await;
    let (failures, _) = common::verify_stream(stream);
    let (mut stream, _) = open_stream(&agent).await;
    wait_for_status(&issuer.daemon, "the agent holds a certificate of CA 1", |s| {
        agent_cas(s) == ["1"]
    });

    // Tokens for the new agents that join along the way.
    let tokens: String = (1..=3)
        .map(|n| format!("kind: token\nversion: v2\nmetadata: {{name: later-{n}}}\nspec: {{roles: [Bot], join_method: token, bot_name: example-bot}}\n---\n"))
        .collect();
    save(&issuer.etc().join("later-tokens.yaml"), &tokens);
    let joins = |token: &str, pin: &str| {
        let (port, onboarding) = (issuer.port, token_onboarding(token, pin));
        let daemon = start_agent(
            |dir| agent_config(dir, port, &onboarding, "example-workload-identity"),
            &[],
        );
        // An agent that cannot join has no workload socket.
        wait_for_socket(&daemon);
    };

    // Prepare, then activate at once: the agent signs its SVIDs again and renews onto CA 2.
    assert!(rotate(&issuer, &["--grace", "1h"]).status.success());
    wait_for_status(&agent, "both CAs reach the agent", |s| {
        s.matches("CA pin: ").count() == 2
    });
    // Every pin status prints joins a new agent now, the prepared CA's too.
    let (old_pin, new_pin) = {
        let status = wait_for_status(&issuer.daemon, "two pins on the issuer", |s| {
            s.matches("CA pin: ").count() == 2
        });
        let pins: Vec<String> = status
            .lines()
            .filter_map(|l| l.strip_prefix("CA pin: ").map(str::to_owned))
            .collect();
        assert_eq!(pins.len(), 2, "{pins:?}");
        assert_eq!(pins[0], issuer.pin);
        (pins[0].clone(), pins[1].clone())
    };
    joins("later-1", &new_pin);
    let out = rotate(&issuer, &["--force"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let ctx = tokio::time::timeout_at(deadline, stream.next())
            .await
            .expect("an SVID of the new CA on the open stream at activation")
            .unwrap()
            .unwrap();
        if leaf_issuer(&ctx) != leaf_issuer(&first) {
            break;
        }
    }
    wait_for_status(&issuer.daemon, "the agent renewed onto CA 2", |s| {
        agent_cas(s)[0] == "2"
    });
    // The pin from before the rotation keeps joining new agents while its CA is published.
    joins("later-2", &old_pin);

    // Retire now: nobody is stranded, so it goes ahead, and the workload notices nothing.
    let out = rotate(&issuer, &["--force"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_for_status(&agent, "one CA left on the agent", |s| {
        s.matches("CA pin: ").count() == 1
    });
    joins("later-3", &new_pin);
    let status = agent.tbotctl(&["status"]);
    assert!(status.status.success(), "{}", stdout(&status));
    assert!(stdout(&status).contains("(connected)"), "{}", stdout(&status));
    let client = WorkloadApiClient::connect_to(agent.endpoint()).await.unwrap();
    let ctx = client.fetch_x509_context().await.expect("a new fetch after the retire");
    assert_eq!(id(&ctx), id(&first));

    // An agent that cannot renew (stopped) across the next activation would be stranded: the
    // forced retire names it and refuses, unless told to strand it.
    assert!(rotate(&issuer, &["--grace", "1h"]).status.success());
    wait_for_status(&agent, "CA 3 reaches the agent", |s| s.matches("CA pin: ").count() == 2);
    let pid = agent.pid().to_string();
    assert!(Command::new("kill").args(["-STOP", &pid]).status().unwrap().success());
    assert!(rotate(&issuer, &["--force"]).status.success(), "activates CA 3");
    let refused = rotate(&issuer, &["--force"]);
    let said = String::from_utf8_lossy(&refused.stderr).to_string();
    assert!(!refused.status.success(), "{said}");
    assert!(said.contains("1 connected agent still holds"), "{said}");
    assert!(said.contains("example-bot/"), "names it: {said}");
    assert!(said.contains("--strand"), "{said}");
    let out = rotate(&issuer, &["--force", "--strand"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(Command::new("kill").args(["-CONT", &pid]).status().unwrap().success());

    let stalled = wait_for_status(&agent, "the agent says it is refused", |s| s.contains("REFUSES"));
    assert!(stalled.contains("bot certificate"), "{stalled}");
    let status = agent.tbotctl(&["status"]);
    assert_eq!(status.status.code(), Some(1), "{}", stdout(&status));
    let get = stdout(&agent.tbotctl(&["get", "agent_config"]));
    assert!(get.contains("refuses this agent's bot certificate"), "{get}");
    assert!(agent.log().contains("ERROR"), "{}", agent.log());
    let listed = wait_for_status(&issuer.daemon, "the issuer lists it as refused", |s| {
        s.contains("REFUSED")
    });
    assert!(listed.contains("(0 agents connected)"), "{listed}");
    assert!(failures.lock().unwrap().is_empty(), "{:?}", failures.lock().unwrap());
}

#[test]
fn a_second_daemon_on_a_socket_in_use_stops_before_it_spends_its_token() {
    let second_token = "kind: token\nversion: v2\nmetadata:\n  name: second-token\nspec:\n  roles: [Bot]\n  \
                        join_method: token\n  bot_name: example-bot\n";
    let extra = format!("bot_name: example-bot\n---\n{second_token}");
    let issuer = Issuer::start(UID_TEMPLATE, &[("bot-token.yaml", "bot_name: example-bot\n", &extra)]);
    let first = agent(&issuer);
    let (port, pin) = (issuer.port, issuer.pin.clone());
    // Its own storage and admin socket, but the first agent's workload socket.
    let dir = tempfile::tempdir().unwrap();
    let etc = dir.path().join("etc");
    std::fs::create_dir(&etc).unwrap();
    let config = agent_config(
        dir.path(),
        port,
        &token_onboarding("second-token", &pin),
        "example-workload-identity",
    )
    .replace(
        &format!("unix://{}/workload.sock", dir.path().display()),
        &format!("unix://{}", first.socket.display()),
    );
    std::fs::write(etc.join("tbot.yaml"), config).unwrap();
    let mut second = Daemon::spawn(dir, first.socket.clone(), &[]);
    let status = second.wait();
    assert!(!status.success(), "{}", second.log());
    assert!(
        second.log().contains("is in use by another running process"),
        "{}",
        second.log()
    );
    assert!(!second.dir.path().join("state/agent").exists(), "nothing was created");
    // The first agent goes on, and the token was not spent: a third agent joins with it.
    let client = std::os::unix::net::UnixStream::connect(&first.socket);
    assert!(client.is_ok(), "the first agent still serves");
    let third = start_agent(
        |dir| {
            agent_config(
                dir,
                port,
                &token_onboarding("second-token", &pin),
                "example-workload-identity",
            )
        },
        &[],
    );
    wait_for_socket(&third);
}

#[test]
fn an_onboarding_edit_made_while_the_agent_was_stopped_is_acted_on_at_the_next_start() {
    let second_token = "kind: token\nversion: v2\nmetadata:\n  name: second-token\nspec:\n  roles: [Bot]\n  \
                        join_method: token\n  bot_name: example-bot\n";
    let extra = format!("bot_name: example-bot\n---\n{second_token}");
    let issuer = Issuer::start(UID_TEMPLATE, &[("bot-token.yaml", "bot_name: example-bot\n", &extra)]);
    let agent = agent(&issuer);
    let (dir, socket) = agent.crash();
    let etc = dir.path().join("etc");
    edit(&etc, "tbot.yaml", &format!("token: {TOKEN}"), "token: second-token");
    let agent = Daemon::start(dir, socket);
    assert!(
        common::wait_for_log(&agent, "joined again on the new terms"),
        "{}",
        agent.log()
    );
    // The instances of the bot: the first join's and the second's.
    let bots = stdout(&issuer.daemon.tbotctl(&["get", "bot/example-bot"]));
    assert!(bots.contains("Instances of bot/example-bot (2):"), "{bots}");
}

/// `tests/peers/issuer_peer.py hostile`: a grpcio client of the issuer API (stubs generated from
/// `proto/issuer.proto` by grpcio-tools) sending what a real agent never would.
#[test]
fn a_hostile_client_of_another_stack_changes_nothing_and_gets_clear_refusals() {
    let Some(python) = common::venv_python("grpc, grpc_tools, cryptography") else {
        return;
    };
    let extra = "bot_name: example-bot\n---\nkind: token\nversion: v2\nmetadata:\n  name: hostile-token\nspec:\n  \
                 roles: [Bot]\n  join_method: token\n  bot_name: example-bot\n---\nkind: token\nversion: v2\nmetadata:\n  \
                 name: hostile-token-2\nspec:\n  roles: [Bot]\n  join_method: token\n  bot_name: example-bot\n---\nkind: \
                 token\nversion: v2\nmetadata:\n  name: hostile-iam-token\nspec:\n  roles: [Bot]\n  join_method: iam\n  \
                 bot_name: example-bot\n  allow: [{aws_account: \"123456789012\"}]\n---\nkind: workload_identity\nversion: \
                 v1\nmetadata:\n  name: svc-wi\n  labels: {example: getting-started}\nspec:\n  spiffe:\n    id: \
                 \"/svc/{{workload.systemd.service}}\"\n    x509: {dns_sans: [\"{{workload.systemd.service}}.internal\"]}\n";
    let issuer = Issuer::start(UID_TEMPLATE, &[("bot-token.yaml", "bot_name: example-bot\n", extra)]);
    let ca = issuer.ca_der();
    let ca_pem = issuer.daemon.dir.path().join("ca.pem");
    std::fs::write(&ca_pem, common::pem("CERTIFICATE", &ca)).unwrap();
    let out = Command::new(&python)
        .arg(common::root().join("tests/peers/issuer_peer.py"))
        .args([
            "hostile",
            &format!("127.0.0.1:{}", issuer.port),
            ca_pem.to_str().unwrap(),
            "hostile-token",
            "example-workload-identity",
            "hostile-iam-token",
            "svc-wi",
            "hostile-token-2",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let code = |k: &str| report[k]["code"].as_str().unwrap_or_default().to_owned();
    // A refused join spends nothing; the next one with a real key goes through.
    assert_eq!(code("forged_log_line"), "INVALID_ARGUMENT", "{report:#}");
    assert_eq!(code("malformed_key_join"), "INVALID_ARGUMENT", "{report:#}");
    assert_eq!(code("join_after_malformed_key"), "OK", "{report:#}");
    assert!(
        report["join_claims"].get("join.meta.join_token_name").is_none(),
        "no token name in the certificate: {report:#}"
    );
    // Hostile attribute values are refused naming the attribute; a number is not.
    for k in ["uid_slash", "uid_word", "uid_signed", "uid_escape"] {
        assert_eq!(code(k), "INVALID_ARGUMENT", "{k}: {report:#}");
        let details = report[k]["details"].as_str().unwrap_or_default();
        assert!(details.contains("workload.unix.uid"), "{k}: {details}");
    }
    assert_eq!(code("uid_number"), "OK", "{report:#}");
    assert!(
        report["uid_number"]["spiffe_id"]
            .as_str()
            .unwrap_or_default()
            .ends_with("/uid/1000"),
        "{report:#}"
    );
    // A string value fills one segment of the ID and one label of a DNS SAN.
    assert_eq!(code("service_wildcard"), "PERMISSION_DENIED", "{report:#}");
    for k in ["service_slash", "service_dot"] {
        assert_eq!(code(k), "PERMISSION_DENIED", "{k}: {report:#}");
        assert!(
            report[k]["details"]
                .as_str()
                .unwrap_or_default()
                .contains("workload.systemd.service"),
            "{k}: {report:#}"
        );
    }
    // An Ed25519 bot renews.
    assert_eq!(code("ed25519_bot_renewal"), "OK", "{report:#}");
    assert_eq!(code("off_curve_svid_key"), "INVALID_ARGUMENT", "{report:#}");
    // A renewal with a malformed key moves nothing: the next good one is not taken for a copy.
    assert_eq!(code("malformed_key_renewal"), "INVALID_ARGUMENT", "{report:#}");
    assert_eq!(code("renewal_after_malformed_key"), "OK", "{report:#}");
    assert_eq!(report["renewal_after_malformed_key"]["generation"], 2, "{report:#}");
    // Keys that are not keys are refused as keys, each saying what is wrong with it.
    for k in [
        "short_p256_key",
        "short_ed25519_key",
        "rsa_1024_key",
        "ca_own_key",
        "ca_key_compressed",
        "ca_key_nested",
    ] {
        assert_eq!(code(k), "INVALID_ARGUMENT", "{k}: {report:#}");
    }
    // Holdings reports refused whole when oversize, and only with a bot certificate.
    for k in ["report_many_keys", "report_long_name"] {
        assert_eq!(code(k), "INVALID_ARGUMENT", "{k}: {report:#}");
        assert!(
            report[k]["details"].as_str().unwrap_or_default().contains("limit")
                || report[k]["details"].as_str().unwrap_or_default().contains("at most"),
            "{k}: {report:#}"
        );
    }
    assert_eq!(code("report_plain"), "OK", "{report:#}");
    assert_eq!(code("report_anonymous"), "UNAUTHENTICATED", "{report:#}");
    // The connection a join came on, without a client certificate, is bound to the bot certificate
    // of its first join, and only to that one; a connection that never joined is not.
    assert_eq!(report["join_bound"], true, "{report:#}");
    assert_eq!(code("report_on_joined_connection"), "OK", "{report:#}");
    assert_eq!(code("issue_on_joined_connection"), "OK", "{report:#}");
    assert_eq!(report["second_join_bound"], false, "{report:#}");
    // A join repeated by someone holding the used token and the bot's public key (taken for a retry)
    // binds nothing: the connection cannot act as the instance.
    assert_eq!(report["replayed_join_bound"], false, "{report:#}");
    assert_eq!(code("report_after_replayed_join"), "UNAUTHENTICATED", "{report:#}");
    // Bytes that are not a message are the client's fault, not the server's.
    assert_eq!(code("undecodable_request"), "INVALID_ARGUMENT", "{report:#}");
    // What held before this round still holds: token refusals, authentication, TLS 1.3 only and
    // the join rate limit.
    assert_eq!(code("used_token"), "PERMISSION_DENIED", "{report:#}");
    assert_eq!(code("wrong_token"), "PERMISSION_DENIED", "{report:#}");
    assert_eq!(code("iam_escapes"), "PERMISSION_DENIED", "{report:#}");
    let iam_refusal = report["iam_escapes"]["details"].as_str().unwrap_or_default();
    assert!(
        !iam_refusal.contains("hostile-iam"),
        "the iam refusal echoes the token name: {iam_refusal}"
    );
    assert_eq!(code("no_client_certificate"), "UNAUTHENTICATED", "{report:#}");
    assert_ne!(code("self_signed_certificate"), "OK", "{report:#}");
    assert_ne!(code("self_signed_certificate"), "", "{report:#}");
    assert!(
        report["tls_1_2"].as_str().unwrap_or_default().starts_with("refused"),
        "{report:#}"
    );
    assert_eq!(code("join_rate_limit"), "RESOURCE_EXHAUSTED", "{report:#}");
    assert!(
        report["join_rate_limit"]["details"]
            .as_str()
            .unwrap_or_default()
            .contains("rate limit"),
        "{report:#}"
    );
    // The forged line never became a line of the issuer's log, and no escape reached it raw.
    let log = issuer.daemon.log();
    assert!(
        !log.lines().any(|l| l.starts_with("2026-12-04T00:00:00.000000Z")),
        "a forged log line:\n{log}"
    );
    assert!(!log.contains('\x1b'), "a raw terminal escape in the log");
    // The first refusal from the address is logged, its client-chosen method escaped on one line.
    assert_eq!(code("iam_forged_method"), "PERMISSION_DENIED", "{report:#}");
    assert!(
        log.lines()
            .any(|l| l.contains("join refused") && l.contains("GET\\u{1b}[31m\\n2026-12-04T00:00:00")),
        "the refused method is not shown escaped:\n{log}"
    );
    assert!(!log.contains("hostile-token"), "the token's name is logged");
    assert!(!log.contains("hostile-iam"), "the iam token's name is logged");
    // A malformed request of an authenticated bot is a warning naming the bot instance, once per
    // source per interval however many were sent.
    let warned: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("a bot sent a request no tbot agent of this version sends"))
        .collect();
    assert_eq!(warned.len(), 1, "{log}");
    assert!(
        warned[0].contains("WARN") && warned[0].contains("bot=example-bot/"),
        "{}",
        warned[0]
    );
}
