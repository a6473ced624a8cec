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

    // A restart keeps it (and the records it had not written yet are written as it stops).
    let daemon = daemon.restart();
    let after = svids(&daemon, &[]);
    assert!(after.iter().any(|r| r["serial"] == serial.as_str()), "{after:#?}");
}
