//! When a key leaks (issue 29): the issuance log that finds what to revoke.

mod common;

use spiffe::WorkloadApiClient;

/// `tbotctl get svids -o json` (with `more` flags) as JSON records.
fn svids(daemon: &common::Daemon, more: &[&str]) -> Vec<serde_json::Value> {
    let mut args = vec!["get", "svids", "-o", "json"];
    args.extend_from_slice(more);
    let out = daemon.tbotctl(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The serial number of a certificate (DER) in lower-case hex, as `openssl` reads it.
fn serial_of(der: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("svid.pem");
    std::fs::write(&path, common::pem("CERTIFICATE", der)).unwrap();
    let out = common::openssl(&["x509", "-in", path.to_str().unwrap(), "-noout", "-serial"]);
    out.trim().trim_start_matches("serial=").to_lowercase()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_issuance_log_lists_what_was_issued_to_which_instance_and_survives_a_restart() {
    let (dir, socket) = common::copy_manifests("manifests/quickstart", &common::QUICKSTART_ON_DISK);
    let daemon = common::Daemon::start(dir, socket);
    let client = WorkloadApiClient::connect_to(daemon.endpoint()).await.unwrap();
    let svid = client.fetch_x509_svid().await.unwrap();
    let jwt = client.fetch_jwt_svid(&["db"], None).await.unwrap();
    let serial = serial_of(svid.leaf().as_ref());
    let id = svid.spiffe_id().to_string();

    let records = svids(&daemon, &[]);
    let x509: Vec<_> = records.iter().filter(|r| r["kind"] == "x509-svid").collect();
    let record = x509
        .iter()
        .find(|r| r["serial"] == serial.as_str())
        .unwrap_or_else(|| panic!("serial {serial} in {records:#?}"));
    assert_eq!(record["spiffe_id"], id.as_str());
    assert_eq!(record["bot"], "quickstart");
    assert_eq!(record["identity"], "quickstart");
    // The attributes the identity reads, as attested.
    let uid = std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
        .unwrap();
    assert_eq!(record["attributes"]["workload.unix.uid"][0], uid.to_string().as_str());
    // The instance is the bot's, as `tbotctl get bot/quickstart` has it; its bot certificate is
    // in the log too.
    let instance = record["instance"].as_str().unwrap().to_owned();
    assert!(!instance.is_empty());
    let bots = common::stdout(&daemon.tbotctl(&["get", "bot/quickstart"]));
    assert!(bots.contains(&instance), "{bots}");
    assert!(
        records
            .iter()
            .any(|r| r["kind"] == "bot-certificate" && r["instance"] == instance.as_str()),
        "{records:#?}"
    );
    let claims: serde_json::Value = {
        use base64::Engine;
        let payload = jwt.token().split('.').nth(1).unwrap();
        serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(payload)
                .unwrap(),
        )
        .unwrap()
    };
    assert!(
        records
            .iter()
            .any(|r| r["kind"] == "jwt-svid" && r["serial"] == claims["jti"] && r["audience"][0] == "db"),
        "{records:#?}"
    );

    // Filters.
    assert!(svids(&daemon, &["--bot", "nobody"]).is_empty());
    let by_id = svids(&daemon, &["--spiffe-id", &id]);
    assert!(!by_id.is_empty() && by_id.iter().all(|r| r["spiffe_id"] == id.as_str()));
    assert!(svids(&daemon, &["--since", "2099-01-01T00:00:00Z"]).is_empty());
    assert_eq!(svids(&daemon, &["--since", "1h"]).len(), records.len());
    let table = common::stdout(&daemon.tbotctl(&["get", "svids"]));
    assert!(table.contains(&serial) && table.contains("SERIAL"), "{table}");

    // More records than one message of the answer carries (1,000): every one arrives.
    for i in 0..1100 {
        client
            .fetch_jwt_svid(&[format!("aud-{i}").as_str()], None)
            .await
            .unwrap();
    }
    let many = svids(&daemon, &["--spiffe-id", &id]);
    let jwts = many.iter().filter(|r| r["kind"] == "jwt-svid").count();
    assert!(jwts >= 1101, "{jwts} JWT-SVID records");

    // A restart keeps it (and the records it had not written yet are written as it stops).
    let daemon = daemon.restart();
    let after = svids(&daemon, &[]);
    assert!(after.iter().any(|r| r["serial"] == serial.as_str()), "{after:#?}");
}

/// An issuer host (`manifests/fleet/issuer`, SPIFFE IDs by uid) and an agent of it joined with the
/// fleet token, its workload socket up.
fn issuer_and_agent() -> (common::fleet::Issuer, common::Daemon) {
    let issuer = common::fleet::Issuer::start("/uid/{{workload.unix.uid}}", &[]);
    let agent = agent_of(issuer.port, &issuer.pin);
    (issuer, agent)
}

/// An agent of the issuer at `port` (trusting `pin`) joined with the fleet token, its workload
/// socket up.
fn agent_of(port: u16, pin: &str) -> common::Daemon {
    use common::fleet::{agent_config, start_agent, token_onboarding, wait_for_socket};
    let agent = start_agent(
        |dir| {
            agent_config(
                dir,
                port,
                &token_onboarding("fleet-token-change-me", pin),
                "example-workload-identity",
            )
        },
        &[],
    );
    wait_for_socket(&agent);
    agent
}

/// A `FetchX509SVID` stream on `daemon`'s socket (our own client, which shows the `crl` field), and
/// its first message.
async fn x509_stream(
    daemon: &common::Daemon,
) -> (
    tonic::Streaming<tbot::workload_api::proto::X509svidResponse>,
    tbot::workload_api::proto::X509svidResponse,
) {
    use tbot::workload_api::client;
    use tbot::workload_api::proto::X509svidRequest;
    use tbot::workload_api::proto::spiffe_workload_api_client::SpiffeWorkloadApiClient;
    use tokio_stream::StreamExt;
    let channel = client::connect(&daemon.endpoint().replace("unix:", "unix://"))
        .await
        .unwrap();
    let mut stream = SpiffeWorkloadApiClient::new(channel)
        .fetch_x509svid(client::request(X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    let first = stream.next().await.unwrap().unwrap();
    (stream, first)
}

/// The next message of `stream` whose CRLs list `serial` and whose SVID is not `old`, within
/// `seconds`.
async fn revoked_and_fresh(
    stream: &mut tonic::Streaming<tbot::workload_api::proto::X509svidResponse>,
    serial: &str,
    old: &[u8],
    seconds: u64,
) -> Result<tbot::workload_api::proto::X509svidResponse, tokio::time::error::Elapsed> {
    use tokio_stream::StreamExt;
    tokio::time::timeout(std::time::Duration::from_secs(seconds), async {
        loop {
            let m = stream.next().await.unwrap().unwrap();
            if m.crl.iter().any(|c| crl_lists(c, serial)) && m.svids[0].x509_svid != old {
                return m;
            }
        }
    })
    .await
}

/// The revocation document of `serials`.
fn revocation(name: &str, serials: &[&str]) -> String {
    let list: Vec<String> = serials.iter().map(|s| format!("\"{s}\"")).collect();
    format!(
        "kind: revocation\nversion: v1\nmetadata:\n  name: {name}\nspec:\n  reason: the key was in a public repository\n  serials: [{}]\n",
        list.join(", ")
    )
}

/// `openssl verify` of `leaf` (DER) against `cas` (DER) with the CRL `crl` (DER); its output.
fn verify_with_crl(leaf: &[u8], cas: &[u8], crl: &[u8]) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, label: &str, ders: Vec<Vec<u8>>| {
        let path = dir.path().join(name);
        let text: String = ders.iter().map(|d| common::pem(label, d)).collect();
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let ca_file = write("cas.pem", "CERTIFICATE", split_der(cas));
    let crl_file = write("crl.pem", "X509 CRL", vec![crl.to_vec()]);
    let leaf_file = write("leaf.pem", "CERTIFICATE", vec![leaf.to_vec()]);
    let out = std::process::Command::new("openssl")
        .args([
            "verify",
            "-crl_check",
            "-CAfile",
            &ca_file,
            "-CRLfile",
            &crl_file,
            &leaf_file,
        ])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Whether the CRL (DER) lists `serial` (lower-case hex).
fn crl_lists(crl: &[u8], serial: &str) -> bool {
    let (_, crl) = x509_parser::parse_x509_crl(crl).unwrap();
    crl.iter_revoked_certificates()
        .any(|r| tbot::issuer::keys::crl::serial_of_raw(r.raw_serial()) == serial)
}

/// Concatenated DER certificates, one by one.
fn split_der(mut der: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while !der.is_empty() {
        let (rest, _) = x509_parser::parse_x509_certificate(der).unwrap();
        out.push(der[..der.len() - rest.len()].to_vec());
        der = rest;
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_svid_is_in_the_crl_every_peer_reads_and_its_workload_gets_a_fresh_one_at_once() {
    use tokio_stream::StreamExt;

    let (dir, socket) = common::copy_manifests("manifests/quickstart", &common::QUICKSTART_ON_DISK);
    let daemon = common::Daemon::start(dir, socket.clone());
    let (mut stream, first) = x509_stream(&daemon).await;
    let old = first.svids[0].x509_svid.clone();
    let cas = first.svids[0].bundle.clone();
    let serial = serial_of(&old);
    // There is always a CRL (a relying party configured with one always has a current one); it
    // lists nothing yet.
    assert!(!first.crl.is_empty());
    assert!(!first.crl.iter().any(|c| crl_lists(c, &serial)));
    let (ok, text) = verify_with_crl(&old, &cas, &first.crl[0]);
    assert!(ok, "{text}");

    // `tbotctl diff` shows the revocation before it is applied; the serial as openssl prints it
    // (upper case, `:` between bytes) is the same serial.
    let spelled: Vec<String> = serial
        .to_uppercase()
        .as_bytes()
        .chunks(2)
        .map(|c| String::from_utf8(c.to_vec()).unwrap())
        .collect();
    let spelled = spelled.join(":");
    let etc = daemon.dir.path().join("etc");
    let staged = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&etc).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, staged.path().join(path.file_name().unwrap())).unwrap();
    }
    std::fs::write(staged.path().join("revocation.yaml"), revocation("leaked", &[&spelled])).unwrap();
    let diff = common::tbotctl(&["diff", "--dir", staged.path().to_str().unwrap()]);
    let diff_text = common::stdout(&diff);
    assert!(diff_text.contains("+ revocation/leaked"), "{diff_text}");

    // Applied: the stream's next messages carry a CRL that lists it, and a new SVID.
    common::save(&etc.join("revocation.yaml"), &revocation("leaked", &[&spelled]));
    let fresh = revoked_and_fresh(&mut stream, &serial, &old, 10)
        .await
        .expect("a CRL and a fresh SVID within 10 s");
    let crl = fresh.crl[fresh.crl.len() - 1].clone();

    // openssl: the revoked SVID is refused, the fresh one accepted, with the same CRL.
    let (ok, text) = verify_with_crl(&old, &cas, &crl);
    assert!(!ok && text.contains("certificate revoked"), "{text}");
    let (ok, text) = verify_with_crl(&fresh.svids[0].x509_svid, &fresh.svids[0].bundle, &crl);
    assert!(ok, "{text}");

    // py-spiffe's own protos and `cryptography`: the same CRL in both messages' `crl` fields,
    // signed by a bundle CA, listing the serial; the SVID served now is another.
    if let Some(python) = common::venv_python("spiffe, cryptography") {
        let out = std::process::Command::new(python)
            .arg(common::root().join("tests/peers/spiffe_peer.py"))
            .args(["crl", socket.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let seen: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        for field in ["svid_crls", "bundle_crls"] {
            let crls = seen[field].as_array().unwrap();
            assert!(!crls.is_empty(), "{seen:#}");
            for c in crls {
                assert_eq!(c["signed_by_bundle_ca"], true, "{seen:#}");
                assert_eq!(c["next_update_after_last_update"], true, "{seen:#}");
                assert!(
                    c["revoked"].as_array().unwrap().iter().any(|s| s == serial.as_str()),
                    "{seen:#}"
                );
            }
        }
        assert!(
            seen["svid_serials"]
                .as_array()
                .unwrap()
                .iter()
                .all(|s| s != serial.as_str()),
            "{seen:#}"
        );
    }

    // The revocation is lifted: the next CRL lists nothing.
    std::fs::remove_file(etc.join("revocation.yaml")).unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(10), async {
        while stream
            .next()
            .await
            .unwrap()
            .unwrap()
            .crl
            .iter()
            .any(|c| crl_lists(c, &serial))
        {}
    })
    .await
    .expect("a CRL without the serial once the revocation is removed");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revocation_on_the_issuer_reaches_a_remote_agents_open_stream_and_its_log_names_the_agent() {
    let (issuer, agent) = issuer_and_agent();
    let (mut stream, first) = x509_stream(&agent).await;
    let old = first.svids[0].x509_svid.clone();
    let serial = serial_of(&old);

    // The issuer's log has the remote agent's SVID, with the bot instance the agent joined as.
    let records = svids(&issuer.daemon, &["--spiffe-id", &first.svids[0].spiffe_id]);
    let record = records
        .iter()
        .find(|r| r["serial"] == serial.as_str())
        .unwrap_or_else(|| panic!("{records:#?}"));
    let instance = record["instance"].as_str().unwrap();
    let instances = common::stdout(&issuer.daemon.tbotctl(&["get", "bot/example-bot"]));
    assert!(
        !instance.is_empty() && instances.contains(instance),
        "{instance} in {instances}"
    );

    // Revoked on the issuer host: the remote agent's open stream gets the CRL and a fresh SVID.
    let started = std::time::Instant::now();
    common::save(&issuer.etc().join("revocation.yaml"), &revocation("leaked", &[&serial]));
    let fresh = revoked_and_fresh(&mut stream, &serial, &old, 15)
        .await
        .unwrap_or_else(|_| panic!("the CRL on the remote agent within 15 s\n{}", agent.log()));
    eprintln!(
        "revocation saved → CRL and fresh SVID on the remote agent: {:?}",
        started.elapsed()
    );
    let crl = fresh.crl.iter().find(|c| crl_lists(c, &serial)).unwrap();
    let (ok, text) = verify_with_crl(&old, &fresh.svids[0].bundle, crl);
    assert!(!ok && text.contains("certificate revoked"), "{text}");
    let (ok, text) = verify_with_crl(&fresh.svids[0].x509_svid, &fresh.svids[0].bundle, crl);
    assert!(ok, "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn tbotctl_revoke_finds_the_certificates_of_a_spiffe_id_or_a_bot_instance_in_the_log() {
    let (dir, socket) = common::copy_manifests("manifests/quickstart", &common::QUICKSTART_ON_DISK);
    let daemon = common::Daemon::start(dir, socket);
    let client = WorkloadApiClient::connect_to(daemon.endpoint()).await.unwrap();
    let svid = client.fetch_x509_svid().await.unwrap();
    let serial = serial_of(svid.leaf().as_ref());
    let id = svid.spiffe_id().to_string();
    let etc = daemon.dir.path().join("etc");

    // A bot instance: its SVIDs and its bot certificate, shown without writing anything.
    let instance = svids(&daemon, &["--spiffe-id", &id])[0]["instance"]
        .as_str()
        .unwrap()
        .to_owned();
    let dry = daemon.tbotctl(&[
        "revoke",
        "--bot-instance",
        &format!("quickstart/{instance}"),
        "--reason",
        "host reimaged",
        "--dry-run",
    ]);
    let text = common::stdout(&dry);
    assert!(dry.status.success(), "{text}{}", String::from_utf8_lossy(&dry.stderr));
    assert!(
        text.contains(&serial) && text.contains("bot certificate of quickstart/"),
        "{text}"
    );
    assert!(
        !etc.read_dir()
            .unwrap()
            .any(|e| e.unwrap().file_name().to_string_lossy().starts_with("revocation-"))
    );

    // By SPIFFE ID: written, applied, and the workload is served another SVID.
    let out = daemon.tbotctl(&[
        "revoke",
        "--spiffe-id",
        &id,
        "--reason",
        "key in a public repository",
        "--name",
        "leak",
    ]);
    let said = common::stdout(&out);
    assert!(out.status.success(), "{said}{}", String::from_utf8_lossy(&out.stderr));
    assert!(said.contains("revocation/leak applied"), "{said}");
    let written = std::fs::read_to_string(etc.join("revocation-leak.yaml")).unwrap();
    assert!(
        written.contains(&serial) && written.contains("reason: \"key in a public repository\""),
        "{written}"
    );
    assert!(common::stdout(&daemon.tbotctl(&["validate"])).contains("ok:"));
    let again = common::wait_until("another SVID", std::time::Duration::from_secs(10), || {
        let client = block_on(client_fetch(&daemon));
        (client != serial).then_some(client)
    });
    assert_ne!(again, serial);

    // A name YAML would read as syntax, longer than a file name takes: written quoted, in a file
    // with a shorter name, and shared through the store under its hash.
    let odd = format!("#[odd]&{}", "x".repeat(240));
    let out = daemon.tbotctl(&[
        "revoke",
        "--serial",
        &serial,
        "--reason",
        "the same key",
        "--name",
        &odd,
    ]);
    let said = common::stdout(&out);
    assert!(out.status.success(), "{said}{}", String::from_utf8_lossy(&out.stderr));
    assert!(said.contains(&format!("revocation/{odd} applied")), "{said}");
    assert!(common::stdout(&daemon.tbotctl(&["validate"])).contains("ok:"));
    assert!(!daemon.log().contains("cannot share a revocation"), "{}", daemon.log());

    // Nothing to revoke is an error that says where to look.
    let none = daemon.tbotctl(&[
        "revoke",
        "--spiffe-id",
        "spiffe://quickstart.tbot.local/nobody",
        "--reason",
        "x",
    ]);
    assert_eq!(none.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&none.stderr).contains("nothing to revoke"));
}

/// The serial of the X509-SVID a new connection is served now.
async fn client_fetch(daemon: &common::Daemon) -> String {
    let client = WorkloadApiClient::connect_to(daemon.endpoint()).await.unwrap();
    serial_of(client.fetch_x509_svid().await.unwrap().leaf().as_ref())
}

/// Runs a future to completion from synchronous code inside the test's runtime.
fn block_on<T: Send + 'static>(f: impl std::future::Future<Output = T> + Send) -> T {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bot_instance_locked_by_hand_loses_its_watch_and_its_issuance_until_unlocked() {
    use common::fleet::wait_for_status;

    let (issuer, agent) = issuer_and_agent();
    wait_for_status(&issuer.daemon, "the agent connected", |s| {
        s.contains("(1 agent connected)")
    });
    let records = svids(&issuer.daemon, &["--bot", "example-bot"]);
    let instance = records
        .iter()
        .find(|r| r["kind"] == "bot-certificate")
        .and_then(|r| r["instance"].as_str())
        .unwrap_or_else(|| panic!("{records:#?}"))
        .to_owned();
    let which = format!("example-bot/{instance}");

    // A lock needs a reason, and an instance that exists.
    let no_reason = issuer.daemon.tbotctl(&["lock", &which]);
    assert_eq!(no_reason.status.code(), Some(2));
    let unknown = issuer.daemon.tbotctl(&["lock", "example-bot/nope", "--reason", "x"]);
    assert!(
        String::from_utf8_lossy(&unknown.stderr).contains("has no instance `nope`"),
        "{}",
        String::from_utf8_lossy(&unknown.stderr)
    );

    let locked = issuer
        .daemon
        .tbotctl(&["lock", &which, "--reason", "its disk was imaged by someone else"]);
    assert!(locked.status.success(), "{}", String::from_utf8_lossy(&locked.stderr));
    assert!(common::stdout(&locked).contains("locked"));
    // Its Watch ends and is refused from then on: the issuer counts no agent, and the agent's
    // status is not healthy and says it is locked.
    wait_for_status(&issuer.daemon, "the agent's stream ended", |s| {
        !s.contains("(1 agent connected)")
    });
    let said = wait_for_status(&agent, "the agent says it is locked", |s| s.contains("locked"));
    let status = agent.tbotctl(&["status"]);
    assert_ne!(status.status.code(), Some(0), "{said}");
    // `tbotctl get bot/…` on the issuer shows the lock.
    let bots = common::stdout(&issuer.daemon.tbotctl(&["get", "bot/example-bot", "-o", "json"]));
    assert!(bots.contains("its disk was imaged by someone else"), "{bots}");

    // Unlocked: the same agent comes back by itself, with the certificate it holds.
    let unlocked = issuer.daemon.tbotctl(&["unlock", &which]);
    assert!(
        unlocked.status.success(),
        "{}",
        String::from_utf8_lossy(&unlocked.stderr)
    );
    wait_for_status(&issuer.daemon, "the agent reconnected", |s| {
        s.contains("(1 agent connected)")
    });
    wait_for_status(&agent, "the agent is healthy again", |s| s.contains("(connected)"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_bot_certificate_ends_its_agents_watch_and_is_refused() {
    use common::fleet::wait_for_status;

    let (issuer, agent) = issuer_and_agent();
    wait_for_status(&issuer.daemon, "the agent connected", |s| {
        s.contains("(1 agent connected)")
    });
    let records = svids(&issuer.daemon, &["--bot", "example-bot"]);
    let bot_certificate = records
        .iter()
        .rev()
        .find(|r| r["kind"] == "bot-certificate")
        .and_then(|r| r["serial"].as_str())
        .unwrap_or_else(|| panic!("{records:#?}"))
        .to_owned();
    let out = issuer.daemon.tbotctl(&[
        "revoke",
        "--serial",
        &bot_certificate,
        "--reason",
        "the agent's key was copied",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Its open Watch ends (the issuer counts no agent), and the agent is refused from then on: not
    // healthy, naming the revocation.
    wait_for_status(&issuer.daemon, "the agent's stream ended", |s| {
        !s.contains("(1 agent connected)")
    });
    wait_for_status(&agent, "the agent says its certificate is revoked", |s| {
        s.contains("revoked")
    });
    assert_ne!(agent.tbotctl(&["status"]).status.code(), Some(0));
}

/// A key's row in `tbotctl status` (`ca 1`, `jwt 2`): its phase and its dependents
/// (`AGENTS/SVIDS`), empty when the key is not listed.
fn key_row(daemon: &common::Daemon, key: &str) -> (String, String) {
    let status = common::stdout(&daemon.tbotctl(&["status"]));
    let row = status
        .lines()
        .find(|l| l.trim_start().starts_with(&format!("{key} ")))
        .map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
        .unwrap_or_default();
    (
        row.get(2).cloned().unwrap_or_default(),
        row.get(3).cloned().unwrap_or_default(),
    )
}

/// `tbotctl ARGS` on `daemon`, which must succeed; its standard output.
fn tbotctl_ok(daemon: &common::Daemon, args: &[&str]) -> String {
    let out = daemon.tbotctl(args);
    assert!(
        out.status.success(),
        "tbotctl {args:?}: {}{}",
        common::stdout(&out),
        String::from_utf8_lossy(&out.stderr)
    );
    common::stdout(&out)
}

/// PyJWT's verdict on `token` with the JWT bundle `daemon` serves now.
fn pyjwt_accepts(python: &std::path::Path, daemon: &common::Daemon, token: &str, audience: &str) -> serde_json::Value {
    let out = std::process::Command::new(python)
        .arg(common::root().join("tests/peers/spiffe_peer.py"))
        .args(["jwt_check", daemon.socket.to_str().unwrap(), token, audience])
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stderr)))
}

/// The `kid` in a JWT's header.
fn kid(token: &str) -> String {
    use base64::Engine;
    let header = token.split('.').next().unwrap();
    let header: serde_json::Value =
        serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(header).unwrap()).unwrap();
    header["kid"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_ca_and_a_jwt_key_tainted_then_revoked_on_one_host_while_workloads_verify_everything() {
    use common::scenario::{Workloads, until};
    let Some(python) = common::venv_python("spiffe") else {
        return;
    };
    let (dir, socket) = common::copy_manifests("manifests/quickstart", &common::QUICKSTART_ON_DISK);
    let daemon = common::Daemon::start(dir, socket);
    let (stream, first) = common::open_stream(&daemon).await;
    let w = Workloads::start("one host", &daemon, &python, stream).await;
    w.wait_for_id(&common::id(&first));
    let client = WorkloadApiClient::connect_to(daemon.endpoint()).await.unwrap();
    let old_jwt = client.fetch_jwt_svid(&["db"], None).await.unwrap();
    let old_kid = kid(old_jwt.token());

    // Nothing to taint or revoke while one key signs: each says what to do instead.
    let refused = daemon.tbotctl(&["rotate", "ca", "--taint-old"]);
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && said.contains("nothing to taint") && said.contains("--grace"),
        "{said}"
    );
    let refused = daemon.tbotctl(&["rotate", "jwt", "--revoke-old"]);
    assert!(String::from_utf8_lossy(&refused.stderr).contains("nothing to revoke"));

    // The agent reports what it holds: its SVIDs and bot certificate of CA 1, its JWT-SVIDs of key 1.
    until("the agent depends on CA 1", || {
        key_row(&daemon, "ca 1").1.starts_with("1/")
    });
    until("the agent depends on JWT key 1", || {
        key_row(&daemon, "jwt 1").1 != "0/0"
    });

    // The CA: a successor prepared; taint activates it and taints CA 1, which stays published.
    tbotctl_ok(&daemon, &["rotate", "ca", "--grace", "1h"]);
    let said = tbotctl_ok(&daemon, &["rotate", "ca", "--taint-old"]);
    assert!(
        said.contains("CA 2 signs from now on") && said.contains("tainted"),
        "{said}"
    );
    assert_eq!(key_row(&daemon, "ca 1").0, "tainted");
    assert_eq!(key_row(&daemon, "ca 2").0, "active");
    // Every SVID and the bot certificate move off CA 1: the agent reports it holds nothing of it.
    until("nothing depends on CA 1", || key_row(&daemon, "ca 1").1 == "0/0");
    let (active, dependents) = key_row(&daemon, "ca 2");
    assert!(active == "active" && dependents.starts_with("1/"), "{dependents}");
    let ctx = client.fetch_x509_context().await.unwrap();
    let (_, leaf) = x509_parser::parse_x509_certificate(ctx.svids()[0].leaf().as_ref()).unwrap();
    assert!(leaf.issuer().to_string().contains("CA 2"), "{}", leaf.issuer());
    // Revoked: gone from the bundle, listed as revoked.
    let said = tbotctl_ok(&daemon, &["rotate", "ca", "--revoke-old"]);
    assert!(said.contains("withdrawn from every bundle"), "{said}");
    assert_eq!(key_row(&daemon, "ca 1").0, "revoked");
    until("one CA in the bundle", || {
        block_on({
            let endpoint = daemon.endpoint();
            async move {
                let client = WorkloadApiClient::connect_to(endpoint).await.unwrap();
                let ctx = client.fetch_x509_context().await.unwrap();
                let td = ctx.svids()[0].spiffe_id().trust_domain().clone();
                ctx.bundle_set().get(&td).unwrap().authorities().len() == 1
            }
        })
    });

    // The JWT key: tokens of the tainted kid are issued again, then the kid is withdrawn.
    tbotctl_ok(&daemon, &["rotate", "jwt", "--grace", "1h"]);
    tbotctl_ok(&daemon, &["rotate", "jwt", "--taint-old"]);
    assert_eq!(key_row(&daemon, "jwt 1").0, "tainted");
    let fresh = client.fetch_jwt_svid(&["db"], None).await.unwrap();
    assert_ne!(
        kid(fresh.token()),
        old_kid,
        "a token of the tainted key was served from the cache"
    );
    until("nothing depends on JWT key 1", || key_row(&daemon, "jwt 1").1 == "0/0");
    // Still published while tainted: the old token still verifies (nothing fails mid-flight).
    assert_eq!(pyjwt_accepts(&python, &daemon, old_jwt.token(), "db")["valid"], true);
    tbotctl_ok(&daemon, &["rotate", "jwt", "--revoke-old"]);
    assert_eq!(key_row(&daemon, "jwt 1").0, "revoked");
    let verdict = pyjwt_accepts(&python, &daemon, old_jwt.token(), "db");
    assert_eq!(verdict["valid"], false, "PyJWT with the JWKS served now: {verdict}");
    assert!(
        client.validate_jwt_token("db", old_jwt.token()).await.is_err(),
        "ValidateJWTSVID refuses a token of the revoked key"
    );
    assert_eq!(pyjwt_accepts(&python, &daemon, fresh.token(), "db")["valid"], true);
    assert!(client.validate_jwt_token("db", fresh.token()).await.is_ok());

    // Throughout: every SVID verified against the bundle it came with, nothing was denied, and
    // the status was never healthy while a fetch failed.
    let summary = w.finish();
    assert_eq!(summary.failed, 0, "{summary:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn revoking_a_tainted_ca_waits_for_the_remote_agent_and_names_it_while_it_does_not_move() {
    use common::fleet::wait_for_status;
    use std::process::Command;

    let (issuer, agent) = issuer_and_agent();
    wait_for_status(&issuer.daemon, "the agent connected", |s| {
        s.contains("(1 agent connected)")
    });
    let client = WorkloadApiClient::connect_to(agent.endpoint()).await.unwrap();
    client.fetch_x509_svid().await.unwrap();
    // The issuer knows what the remote agent holds: its bot certificate and an SVID of CA 1.
    common::scenario::until("the remote agent depends on CA 1", || {
        key_row(&issuer.daemon, "ca 1").1 == "1/1"
    });
    tbotctl_ok(&issuer.daemon, &["rotate", "ca", "--grace", "1h"]);
    wait_for_status(&agent, "the prepared CA reaches the agent", |s| {
        s.matches("CA pin: ").count() == 2
    });

    // The agent stopped: it cannot move off CA 1, so the revoke waits, then names it.
    let pid = agent.pid().to_string();
    assert!(Command::new("kill").args(["-STOP", &pid]).status().unwrap().success());
    tbotctl_ok(&issuer.daemon, &["rotate", "ca", "--taint-old"]);
    let refused = issuer.daemon.tbotctl(&["rotate", "ca", "--revoke-old"]);
    let said = String::from_utf8_lossy(&refused.stderr).to_string();
    assert!(Command::new("kill").args(["-CONT", &pid]).status().unwrap().success());
    assert!(!refused.status.success(), "{said}");
    assert!(
        said.contains("example-bot/") && said.contains("1 SVIDs and its bot certificate"),
        "{said}"
    );
    assert!(said.contains("--force"), "{said}");
    assert_eq!(key_row(&issuer.daemon, "ca 1").0, "tainted", "nothing changed");

    // Running again, it re-signs its SVID and renews its bot certificate onto CA 2 at once.
    common::scenario::until("nothing depends on CA 1", || key_row(&issuer.daemon, "ca 1").1 == "0/0");
    tbotctl_ok(&issuer.daemon, &["rotate", "ca", "--revoke-old"]);
    wait_for_status(&agent, "CA 1 leaves the agent's bundle", |s| {
        s.matches("CA pin: ").count() == 1
    });
    let status = agent.tbotctl(&["status"]);
    assert_eq!(status.status.code(), Some(0), "{}", common::stdout(&status));
    let svid = client.fetch_x509_svid().await.unwrap();
    let (_, leaf) = x509_parser::parse_x509_certificate(svid.leaf().as_ref()).unwrap();
    assert!(leaf.issuer().to_string().contains("CA 2"), "{}", leaf.issuer());
}

/// The revocation time a CRL gives `serial`.
fn revoked_at(crl: &[u8], serial: &str) -> Option<i64> {
    let (_, crl) = x509_parser::parse_x509_crl(crl).unwrap();
    crl.iter_revoked_certificates()
        .find(|r| tbot::issuer::keys::crl::serial_of_raw(r.raw_serial()) == serial)
        .map(|r| r.revocation_date.timestamp())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revocation_on_one_replica_reaches_the_agents_of_another_with_one_revocation_time() {
    use tokio_stream::StreamExt;

    let Some(set) = common::ha::Replicas::start(2) else {
        return;
    };
    let pin = set
        .status(0)
        .lines()
        .find_map(|l| l.strip_prefix("CA pin: ").map(str::to_owned))
        .unwrap();
    // The agent joins replica 1; the revocation is written on replica 0 only.
    let agent = agent_of(set.get(1).port, &pin);
    let (mut stream, first) = x509_stream(&agent).await;
    let old = first.svids[0].x509_svid.clone();
    let serial = serial_of(&old);
    common::scenario::until("the SVID is in the issuance log replica 0 reads", || {
        svids(&set.get(0).daemon, &[])
            .iter()
            .any(|r| r["serial"] == serial.as_str())
    });
    tbotctl_ok(
        &set.get(0).daemon,
        &[
            "revoke",
            "--serial",
            &serial,
            "--reason",
            "copied from a backup",
            "--name",
            "backup",
        ],
    );
    let fresh = revoked_and_fresh(&mut stream, &serial, &old, 15)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "the CRL of replica 1's agent lists the serial within 15 s\n{}",
                agent.log()
            )
        });
    // One revocation time, kept in the store: replica 1 restarted signs new CRLs with the same.
    let on_agent = fresh.crl.iter().find_map(|c| revoked_at(c, &serial)).unwrap();
    let signed: Vec<Vec<u8>> = fresh.crl.clone();
    let mut set = set;
    let (dir, admin) = set.kill(1);
    set.restart(1, dir, admin);
    let again = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        loop {
            let m = stream.next().await.unwrap().unwrap();
            if m.crl != signed && m.crl.iter().any(|c| crl_lists(c, &serial)) {
                return m;
            }
        }
    })
    .await
    .expect("new CRLs from the restarted replica");
    assert_eq!(again.crl.iter().find_map(|c| revoked_at(c, &serial)), Some(on_agent));
    // Removed on replica 0: the shared record goes, and replica 1's agent gets a CRL without it.
    std::fs::remove_file(set.get(0).daemon.dir.path().join("etc/revocation-backup.yaml")).unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(15), async {
        loop {
            let m = stream.next().await.unwrap().unwrap();
            if !m.crl.is_empty() && !m.crl.iter().any(|c| crl_lists(c, &serial)) {
                return;
            }
        }
    })
    .await
    .expect("a CRL without the serial on replica 1's agent once the revocation is removed");
}
