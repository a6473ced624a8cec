//! Live convergence, one test per row of the hot-reload table in docs/architecture.md: a running `tbot start` is driven by editing its
//! directory the way editors do, and observed from outside with the `spiffe` crate.

mod common;

use std::time::{Duration, Instant};

use common::{Contexts, Daemon, id, open_stream, quickstart, save, wait_for_log};
use spiffe::{WorkloadApiClient, X509Context};
use tokio_stream::StreamExt;

fn edit(daemon: &Daemon, file: &str, from: &str, to: &str) {
    let path = daemon.dir.path().join("etc").join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains(from), "{file} has no {from:?}");
    save(&path, &text.replace(from, to));
}

async fn next_within(stream: &mut Contexts, secs: u64) -> Option<Result<X509Context, spiffe::WorkloadApiError>> {
    tokio::time::timeout(Duration::from_secs(secs), stream.next())
        .await
        .ok()
        .flatten()
}

/// No message on the open stream, and a new caller still gets the same SPIFFE ID.
async fn assert_undisturbed(daemon: &Daemon, stream: &mut Contexts, first: &X509Context) {
    assert!(
        next_within(stream, 1).await.is_none(),
        "the stream carries on undisturbed"
    );
    let client = WorkloadApiClient::connect_to(daemon.endpoint()).await.unwrap();
    assert_eq!(
        client.fetch_x509_svid().await.unwrap().spiffe_id().to_string(),
        id(first)
    );
}

/// The quickstart with a label selector, so identities can come and go without breaking a reference.
fn by_labels() -> Daemon {
    let daemon = quickstart("");
    edit(
        &daemon,
        "tbot.yaml",
        "    selector:\n      name: quickstart\n",
        "    selector:\n      labels:\n        app: quickstart\n",
    );
    assert!(wait_for_log(&daemon, "re-decide its callers"), "{}", daemon.log());
    daemon
}

#[tokio::test(flavor = "multi_thread")]
async fn a_workload_identity_edit_pushes_the_new_spiffe_id_on_the_open_stream() {
    let daemon = quickstart("");
    let (mut stream, first) = open_stream(&daemon).await;
    assert!(id(&first).starts_with("spiffe://quickstart.tbot.local/user/"));
    edit(&daemon, "workload-identity.yaml", "id: \"/user/", "id: \"/people/");
    let next = next_within(&mut stream, 15).await.expect("a new message").unwrap();
    assert!(
        id(&next).starts_with("spiffe://quickstart.tbot.local/people/"),
        "{}",
        id(&next)
    );
    assert!(
        daemon.log().contains("SVIDs of workload_identity/quickstart reissued"),
        "{}",
        daemon.log()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_identity_ends_the_stream_with_permission_denied() {
    let daemon = by_labels();
    let (mut stream, _) = open_stream(&daemon).await;
    std::fs::remove_file(daemon.dir.path().join("etc/workload-identity.yaml")).unwrap();
    let end = next_within(&mut stream, 15)
        .await
        .expect("the stream ends with a status");
    let err = end.expect_err("an error, not an SVID");
    assert!(format!("{err:?}").contains("PermissionDenied"), "{err:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_role_edit_revokes_and_then_grants_again() {
    let daemon = quickstart("");
    let (mut stream, _) = open_stream(&daemon).await;
    edit(&daemon, "role.yaml", "app: quickstart", "app: something-else");
    let end = next_within(&mut stream, 15).await.expect("the stream ends");
    assert!(format!("{:?}", end.expect_err("revoked")).contains("PermissionDenied"));
    edit(&daemon, "role.yaml", "app: something-else", "app: quickstart");
    assert!(
        wait_for_log(&daemon, "causes=role/quickstart-issuer"),
        "{}",
        daemon.log()
    );
    let client = WorkloadApiClient::connect_to(daemon.endpoint()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match client.fetch_x509_svid().await {
            Ok(svid) => {
                assert!(svid.spiffe_id().to_string().contains("/user/"));
                break;
            }
            Err(e) => assert!(
                Instant::now() < deadline,
                "never granted again: {e:?}\n{}",
                daemon.log()
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_and_onboarding_edit_rejoins_without_disturbing_streams() {
    let daemon = quickstart("");
    let (mut stream, first) = open_stream(&daemon).await;
    let token = "---\nkind: token\nversion: v2\nmetadata:\n  name: second-token\nspec:\n  roles: [Bot]\n  join_method: token\n  bot_name: quickstart\n";
    let path = daemon.dir.path().join("etc/bot.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    save(&path, &format!("{text}{token}"));
    edit(
        &daemon,
        "tbot.yaml",
        "token: quickstart-token-change-me",
        "token: second-token",
    );
    assert!(
        wait_for_log(&daemon, "bot joined again with the new terms"),
        "{}",
        daemon.log()
    );
    // The workload notices nothing: no message, the same SVID.
    assert_undisturbed(&daemon, &mut stream, &first).await;
    let bot = common::stdout(&daemon.tbotctl(&["get", "bot", "-o", "json"]));
    assert!(
        bot.contains("\"reason\": \"Rejoined\"") && bot.contains("joined by `token`"),
        "{bot}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_listen_edit_serves_the_new_path_with_no_gap_for_a_hammering_client() {
    let daemon = quickstart("");
    let old = daemon.socket.clone();
    let new = old.with_file_name("moved.sock");
    let (old_s, new_s) = (old.display().to_string(), new.display().to_string());
    let hammer = tokio::spawn(async move {
        let (mut ok, mut gaps) = (0, 0);
        let deadline = Instant::now() + Duration::from_secs(4);
        while Instant::now() < deadline {
            let mut served = false;
            // Old first: if the old socket no longer answers, the new one was bound before it closed.
            for path in [&old_s, &new_s] {
                if let Ok(c) = WorkloadApiClient::connect_to(format!("unix:{path}")).await
                    && c.fetch_x509_svid().await.is_ok()
                {
                    served = true;
                    break;
                }
            }
            if served { ok += 1 } else { gaps += 1 }
        }
        (ok, gaps)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    edit(
        &daemon,
        "tbot.yaml",
        &format!("unix://{}", old.display()),
        &format!("unix://{}", new.display()),
    );
    let (ok, gaps) = hammer.await.unwrap();
    assert!(ok > 10, "{ok} fetches");
    assert_eq!(gaps, 0, "moments when neither socket served: {}", daemon.log());
    assert!(
        new.exists() && !old.exists(),
        "the old socket is gone, the new one serves"
    );
    assert!(daemon.log().contains("rebind"), "{}", daemon.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broken_document_keeps_the_old_svids_flowing_and_names_its_line() {
    let daemon = quickstart("");
    let (mut stream, first) = open_stream(&daemon).await;
    edit(&daemon, "workload-identity.yaml", "  spiffe:\n", "  spife:\n");
    assert!(
        wait_for_log(&daemon, "the last good version of this file's objects stays in force"),
        "{}",
        daemon.log()
    );
    assert!(
        daemon.log().contains("workload-identity.yaml:"),
        "the error names the file and line: {}",
        daemon.log()
    );
    assert_undisturbed(&daemon, &mut stream, &first).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_comment_only_edit_changes_nothing_and_issues_nothing() {
    let daemon = quickstart("");
    let (mut stream, _) = open_stream(&daemon).await;
    let path = daemon.dir.path().join("etc/workload-identity.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    save(&path, &format!("# reviewed in git, nothing else\n{text}"));
    std::fs::File::open(&path)
        .unwrap()
        .set_modified(std::time::SystemTime::now())
        .ok();
    assert!(next_within(&mut stream, 2).await.is_none(), "no new SVID");
    assert!(!daemon.log().contains("converging"), "{}", daemon.log());
    let get = common::stdout(&daemon.tbotctl(&["get", "workload_identity/quickstart"]));
    assert!(
        get.contains("workload_identity/quickstart  1           1         True"),
        "generation stays 1: {get}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_identity_under_a_label_selector_is_pushed_to_the_open_stream() {
    let daemon = by_labels();
    let (mut stream, first) = open_stream(&daemon).await;
    assert_eq!(first.svids().len(), 1);
    let extra = "kind: workload_identity\nversion: v1\nmetadata:\n  name: second\n  labels:\n    app: quickstart\nspec:\n  spiffe:\n    id: /second\n    hint: second\n";
    save(&daemon.dir.path().join("etc/second.yaml"), extra);
    let next = next_within(&mut stream, 15).await.expect("a new message").unwrap();
    let mut ids: Vec<String> = next.svids().iter().map(|s| s.spiffe_id().to_string()).collect();
    ids.sort();
    assert_eq!(ids.len(), 2, "{ids:?}");
    assert_eq!(ids[0], "spiffe://quickstart.tbot.local/second");
}

fn out(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn tbotctl_apply_configures_the_identity_and_the_stream_gets_the_new_svid() {
    let daemon = quickstart("");
    let (mut stream, _) = open_stream(&daemon).await;
    let edited = daemon.dir.path().join("edited.yaml");
    let text = std::fs::read_to_string(daemon.dir.path().join("etc/workload-identity.yaml")).unwrap();
    std::fs::write(&edited, text.replace("id: \"/user/", "id: \"/applied/")).unwrap();
    let run = daemon.tbotctl(&["apply", "-f", edited.to_str().unwrap()]);
    assert_eq!(
        common::stdout(&run),
        "workload_identity/quickstart configured\n",
        "{}",
        out(&run)
    );
    assert_eq!(run.status.code(), Some(0), "{}", out(&run));
    let next = next_within(&mut stream, 5).await.expect("the new SVID").unwrap();
    assert!(id(&next).contains("/applied/"), "{}", id(&next));
    let again = daemon.tbotctl(&["apply", "-f", edited.to_str().unwrap()]);
    assert_eq!(
        common::stdout(&again),
        "workload_identity/quickstart unchanged\n",
        "{}",
        out(&again)
    );
    let get = daemon.tbotctl(&["get", "workload_identity/quickstart"]);
    let table = common::stdout(&get);
    assert!(
        table.contains("workload_identity/quickstart  2           2         True"),
        "{table}"
    );
}

#[test]
fn tbotctl_apply_refuses_an_invalid_file_and_writes_nothing() {
    let daemon = quickstart("");
    let bad = daemon.dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "kind: role\nversion: v7\nmetadata:\n  name: x\nspec:\n  alow: {}\n",
    )
    .unwrap();
    let run = daemon.tbotctl(&["apply", "-f", bad.to_str().unwrap()]);
    assert_eq!(run.status.code(), Some(2), "{}", out(&run));
    assert!(out(&run).contains("unknown field `alow`"), "{}", out(&run));
    assert!(!daemon.dir.path().join("etc/bad.yaml").exists());
}

#[test]
fn a_storage_edit_needs_a_restart_and_tbotctl_get_shows_it_and_invalid_files_with_their_line() {
    let daemon = quickstart("");
    edit(&daemon, "role.yaml", "  allow:", "  alow:");
    assert!(wait_for_log(&daemon, "stays in force"), "{}", daemon.log());
    let get = common::stdout(&daemon.tbotctl(&["get", "role"]));
    assert!(
        get.contains("Invalid:") && get.contains("role.yaml:7:3: unknown field `alow`"),
        "{get}"
    );
    edit(&daemon, "role.yaml", "  alow:", "  allow:");
    edit(
        &daemon,
        "tbot.yaml",
        "type: memory",
        "type: directory\n  path: /tmp/tbot-never-used",
    );
    assert!(
        wait_for_log(&daemon, "takes effect at the next restart"),
        "{}",
        daemon.log()
    );
    assert!(
        !std::path::Path::new("/tmp/tbot-never-used").exists(),
        "nothing acted on the new storage"
    );
    let json = common::stdout(&daemon.tbotctl(&["get", "agent_config", "-o", "json"]));
    assert!(json.contains("\"type\": \"RestartRequired\""), "{json}");
    let role = common::stdout(&daemon.tbotctl(&["get", "role"]));
    assert!(!role.contains("Invalid"), "the role loads again: {role}");
}

#[test]
fn the_admin_api_refuses_another_uid() {
    let daemon = quickstart("");
    let ok = daemon.tbotctl(&["status"]);
    assert_eq!(ok.status.code(), Some(0), "{}", out(&ok));
    assert!(common::stdout(&ok).contains("objects: 6 (0 not ready)"), "{}", out(&ok));
    if std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
        .unwrap()
        != 0
    {
        return; // switching users needs root
    }
    let etc = daemon.dir.path().join("etc");
    let as_nobody = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            env!("CARGO_BIN_EXE_tbotctl"),
            "status",
            "--admin-socket",
        ])
        .arg(daemon.dir.path().join("admin.sock"))
        .arg("--dir")
        .arg(etc)
        .output()
        .unwrap();
    assert_ne!(as_nobody.status.code(), Some(0), "{}", out(&as_nobody));
    assert!(out(&as_nobody).contains("error:"), "{}", out(&as_nobody));
}

fn http_get(port: u16, path: &str) -> String {
    http_get_with(port, path, "")
}

/// A GET with extra header lines (each ending in `\r\n`).
fn http_get_with(port: u16, path: &str, headers: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{headers}\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn diagnostics_report_liveness_readiness_and_metrics() {
    let port = common::free_port();
    let daemon = quickstart(&format!("diag_addr: 127.0.0.1:{port}\n"));
    let (_stream, _) = open_stream(&daemon).await;
    assert!(wait_for_log(&daemon, "diagnostics listening"), "{}", daemon.log());
    assert!(http_get(port, "/livez").starts_with("HTTP/1.1 200"));
    let ready = http_get(port, "/readyz");
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    assert!(
        ready.contains("\"workload-identity-api\":{\"status\":\"ready\"}"),
        "{ready}"
    );
    assert!(http_get(port, "/readyz/workload-identity-api").starts_with("HTTP/1.1 200"));
    assert!(http_get(port, "/readyz/nope").starts_with("HTTP/1.1 404"));
    let metrics = http_get(port, "/metrics");
    for line in [
        "tbot_x509_svids_issued_total 1",
        "tbot_workload_api_streams 1",
        "tbot_joins_total{method=\"token\",outcome=\"joined\"} 1",
        "# TYPE tbot_reconciles_total counter",
        // The issuer's own: what it signed, and its (empty) revocation list.
        "tbot_issuer_x509_svids_signed_total 1",
        "tbot_issuer_bot_certificates_signed_total 1",
        "tbot_issuer_revoked_certificates 0",
        "# TYPE tbot_issuer_crl_signed_timestamp_seconds gauge",
    ] {
        assert!(metrics.contains(line), "missing {line:?} in\n{metrics}");
    }
    assert!(metrics.contains("content-type: text/plain; version=0.0.4"), "{metrics}");
    let open = http_get_with(
        port,
        "/metrics",
        "Accept: application/openmetrics-text; version=1.0.0\r\n",
    );
    assert!(
        open.contains("content-type: application/openmetrics-text; version=1.0.0"),
        "{open}"
    );
    assert!(open.trim_end().ends_with("# EOF"), "{open}");
    // The Prometheus project's own parser reads both expositions, and finds the same samples.
    let Some(python) = common::venv_python("prometheus_client") else {
        return;
    };
    let parse = |format: &str, response: &str| {
        let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        let mut child = std::process::Command::new(&python)
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/peers/metrics_peer.py"))
            .arg(format)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{format}: {}\n{body}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let (text, openmetrics) = (parse("prometheus", &metrics), parse("openmetrics", &open));
    assert!(text.lines().count() > 5, "{text}");
    for sample in [
        "counter tbot_x509_svids_issued_total 1",
        "gauge tbot_workload_api_streams 1",
    ] {
        assert!(text.lines().any(|l| l == sample), "{sample:?} not in\n{text}");
        assert!(
            openmetrics.lines().any(|l| l == sample),
            "{sample:?} not in\n{openmetrics}"
        );
    }
}

#[test]
fn tbotctl_diff_compares_with_the_running_daemon() {
    let daemon = quickstart("");
    let same = daemon.tbotctl(&["diff"]);
    assert_eq!(same.status.code(), Some(0), "{}", out(&same));
    assert!(
        common::stdout(&same).contains("Compared with the running daemon (pid"),
        "{}",
        out(&same)
    );
    // A reviewed change in another checkout of the same configuration.
    let next = daemon.dir.path().join("next");
    std::fs::create_dir(&next).unwrap();
    for entry in std::fs::read_dir(daemon.dir.path().join("etc")).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("hint: quickstart", "hint: reviewed");
        std::fs::write(next.join(path.file_name().unwrap()), text).unwrap();
    }
    let changed = common::tbotctl(&["diff", "--dir", next.to_str().unwrap()]);
    assert_eq!(changed.status.code(), Some(1), "{}", out(&changed));
    let text = common::stdout(&changed);
    assert!(
        text.contains("-    hint: quickstart\n") && text.contains("+    hint: reviewed\n"),
        "{text}"
    );
    assert!(text.contains("Plan: 0 to add, 1 to change, 0 to destroy."), "{text}");
}

#[test]
fn tbotctl_apply_of_the_guides_identity_with_a_new_id_reports_configured() {
    let (dir, socket) = common::copy_manifests(
        "manifests/guide",
        &[
            ("tbot.yaml", "join_method: iam", "join_method: token"),
            ("tbot.yaml", "unix:///opt/machine-id/workload.sock", "unix://SOCKET"),
            ("tbot.yaml", "storage:\n", "admin_socket: DIR/admin.sock\nstorage:\n"),
            ("bot-token.yaml", "join_method: iam", "join_method: token"),
            (
                "bot-token.yaml",
                "  allow:\n    - aws_account: \"111111111111\"\n      aws_arn: \"arn:aws:sts::111111111111:assumed-role/teleport-bot-role/i-*\"\n",
                "",
            ),
        ],
    );
    let daemon = Daemon::start(dir, socket);
    let edited = daemon.dir.path().join("workload-identity.yaml");
    let text = std::fs::read_to_string(common::root().join("manifests/guide/workload-identity.yaml")).unwrap();
    std::fs::write(
        &edited,
        text.replace(
            "/svc/{{workload.systemd.service}}",
            "/v2/svc/{{workload.systemd.service}}",
        ),
    )
    .unwrap();
    let run = daemon.tbotctl(&["apply", "-f", edited.to_str().unwrap()]);
    assert_eq!(
        common::stdout(&run),
        "workload_identity/example-workload-identity configured\n",
        "{}",
        out(&run)
    );
    assert_eq!(run.status.code(), Some(0));
}

/// Waits until the open stream carries an SVID whose ID contains `want`.
async fn wait_for_id(stream: &mut Contexts, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if let Some(Ok(ctx)) = next_within(stream, 15).await
            && id(&ctx).contains(want)
        {
            return;
        }
    }
    panic!("no SVID with {want} arrived");
}

#[tokio::test(flavor = "multi_thread")]
async fn cp_and_vims_backup_rename_both_converge() {
    let daemon = quickstart("");
    let (mut stream, _) = open_stream(&daemon).await;
    let path = daemon.dir.path().join("etc/workload-identity.yaml");
    let original = std::fs::read_to_string(&path).unwrap();
    // cp: the file is truncated and written in place.
    let copy = daemon.dir.path().join("copy.yaml");
    std::fs::write(&copy, original.replace("id: \"/user/", "id: \"/copied/")).unwrap();
    std::fs::copy(&copy, &path).unwrap();
    wait_for_id(&mut stream, "/copied/").await;
    // vim: rename the original to a backup, write the new file, delete the backup.
    let backup = path.with_file_name("workload-identity.yaml~");
    std::fs::rename(&path, &backup).unwrap();
    std::fs::write(&path, original.replace("id: \"/user/", "id: \"/vimmed/")).unwrap();
    std::fs::remove_file(&backup).unwrap();
    wait_for_id(&mut stream, "/vimmed/").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_configmap_symlink_swap_converges() {
    use std::os::unix::fs::symlink;
    // Lay the quickstart out as Kubernetes mounts a ConfigMap: files behind `..data`.
    let (dir, socket) = common::copy_manifests("manifests/quickstart", &common::QUICKSTART_IN_MEMORY);
    let etc = dir.path().join("etc");
    let first = etc.join("..2026_11_23_01");
    std::fs::create_dir(&first).unwrap();
    let names: Vec<String> = std::fs::read_dir(&etc)
        .unwrap()
        .filter_map(|e| {
            let e = e.unwrap();
            e.file_type()
                .unwrap()
                .is_file()
                .then(|| e.file_name().into_string().unwrap())
        })
        .collect();
    for name in &names {
        std::fs::rename(etc.join(name), first.join(name)).unwrap();
        symlink(format!("..data/{name}"), etc.join(name)).unwrap();
    }
    symlink("..2026_11_23_01", etc.join("..data")).unwrap();
    let daemon = Daemon::start(dir, socket);
    let (mut stream, _) = open_stream(&daemon).await;
    // The kubelet writes a new timestamped directory and swaps `..data` atomically.
    let second = etc.join("..2026_11_23_02");
    std::fs::create_dir(&second).unwrap();
    for name in &names {
        let text = std::fs::read_to_string(first.join(name)).unwrap();
        std::fs::write(second.join(name), text.replace("id: \"/user/", "id: \"/configmap/")).unwrap();
    }
    symlink("..2026_11_23_02", etc.join("..data_tmp")).unwrap();
    std::fs::rename(etc.join("..data_tmp"), etc.join("..data")).unwrap();
    std::fs::remove_dir_all(&first).unwrap();
    wait_for_id(&mut stream, "/configmap/").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_document_that_is_a_symlink_follows_edits_of_its_target() {
    // The document is a link to a file whose name is not a document's: editing the target raises
    // an event only on the target's name, which a reload of just the named files would skip.
    let (dir, socket) = common::copy_manifests("manifests/quickstart", &common::QUICKSTART_IN_MEMORY);
    let etc = dir.path().join("etc");
    let target = etc.join(".workload-identity.yaml.real");
    std::fs::rename(etc.join("workload-identity.yaml"), &target).unwrap();
    std::os::unix::fs::symlink(".workload-identity.yaml.real", etc.join("workload-identity.yaml")).unwrap();
    let daemon = Daemon::start(dir, socket);
    let (mut stream, _) = open_stream(&daemon).await;
    let text = std::fs::read_to_string(&target).unwrap();
    std::fs::write(&target, text.replace("id: \"/user/", "id: \"/linked/")).unwrap();
    wait_for_id(&mut stream, "/linked/").await;
    // An event on another file, then one more edit of the target: still followed.
    std::fs::write(etc.join("notes.txt"), "not a document").unwrap();
    let text = std::fs::read_to_string(&target).unwrap();
    std::fs::write(&target, text.replace("id: \"/linked/", "id: \"/relinked/")).unwrap();
    wait_for_id(&mut stream, "/relinked/").await;
}

#[test]
fn a_refused_rejoin_stalls_until_an_edit_and_a_failed_bind_retries() {
    let daemon = quickstart("");
    // An expired token: the rejoin is refused (terminal) and waits for an edit.
    let token = "---\nkind: token\nversion: v2\nmetadata:\n  name: old-token\n  expires: '2020-01-01T00:00:00Z'\nspec:\n  roles: [Bot]\n  join_method: token\n  bot_name: quickstart\n---\nkind: token\nversion: v2\nmetadata:\n  name: fresh-token\nspec:\n  roles: [Bot]\n  join_method: token\n  bot_name: quickstart\n";
    let bot = daemon.dir.path().join("etc/bot.yaml");
    let text = std::fs::read_to_string(&bot).unwrap();
    save(&bot, &format!("{text}{token}"));
    edit(
        &daemon,
        "tbot.yaml",
        "token: quickstart-token-change-me",
        "token: old-token",
    );
    assert!(wait_for_log(&daemon, "the rejoin failed"), "{}", daemon.log());
    let get = common::stdout(&daemon.tbotctl(&["get", "agent_config"]));
    assert!(
        get.contains("Stalled:") && get.contains("the token expired") && get.contains("waiting for an edit"),
        "{get}"
    );
    // A listen path that cannot be bound (its parent is a file): retried with backoff.
    std::fs::write(daemon.dir.path().join("blocker"), "").unwrap();
    edit(&daemon, "tbot.yaml", "token: old-token", "token: fresh-token");
    let blocked = daemon.dir.path().join("blocker/w.sock");
    edit(
        &daemon,
        "tbot.yaml",
        &format!("unix://{}", daemon.socket.display()),
        &format!("unix://{}", blocked.display()),
    );
    assert!(wait_for_log(&daemon, "cannot serve every listener"), "{}", daemon.log());
    let get = common::stdout(&daemon.tbotctl(&["get", "agent_config"]));
    assert!(get.contains("retrying with backoff"), "{get}");
    // The old socket still serves meanwhile.
    assert!(std::os::unix::net::UnixStream::connect(&daemon.socket).is_ok());
    std::fs::remove_file(daemon.dir.path().join("blocker")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while std::os::unix::net::UnixStream::connect(&blocked).is_err() {
        assert!(
            Instant::now() < deadline,
            "the retry never bound the new socket: {}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let get = common::stdout(&daemon.tbotctl(&["get", "agent_config"]));
        if get.contains("True") && !get.contains("Stalled") {
            break;
        }
        assert!(Instant::now() < deadline, "{get}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_admin_api_plans_documents_and_streams_status_events() {
    use tbot::admin::proto::admin_client::AdminClient;
    use tbot::admin::proto::{Document, PlanRequest, WatchRequest};
    let daemon = quickstart("");
    let admin = daemon.dir.path().join("admin.sock");
    let channel = tbot::workload_api::client::connect(&admin.display().to_string())
        .await
        .unwrap();
    let mut client = AdminClient::new(channel);
    let etc = daemon.dir.path().join("etc");
    let files: Vec<Document> = std::fs::read_dir(&etc)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            let content = std::fs::read_to_string(&p)
                .unwrap()
                .replace("hint: quickstart", "hint: planned");
            Document {
                name: p.file_name().unwrap().to_string_lossy().into_owned(),
                content,
            }
        })
        .collect();
    let plan = client.plan(PlanRequest { files }).await.unwrap().into_inner();
    assert!(plan.errors.is_empty(), "{:?}", plan.errors);
    assert_eq!((plan.add, plan.change, plan.destroy), (0, 1, 0));
    assert_eq!(plan.changes[0].name, "quickstart");
    assert_eq!(plan.actions, ["~ SVIDs of workload_identity/quickstart reissued"]);
    let bad = vec![Document {
        name: "x.yaml".into(),
        content: "kind: role\nversion: v7\nmetadata: {name: r}\nspec: {alow: {}}\n".into(),
    }];
    let refused = client.plan(PlanRequest { files: bad }).await.unwrap().into_inner();
    assert!(
        refused
            .errors
            .iter()
            .any(|e| e.starts_with("x.yaml:4:") && e.contains("alow")),
        "{refused:?}"
    );

    let mut events = client.watch(WatchRequest {}).await.unwrap().into_inner();
    edit(&daemon, "workload-identity.yaml", "hint: quickstart", "hint: watched");
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        let Ok(Some(Ok(e))) = tokio::time::timeout(Duration::from_secs(15), events.next()).await else {
            break;
        };
        seen.push(format!("{}/{} {} {}", e.kind, e.name, e.r#type, e.status));
        if seen
            .iter()
            .any(|s| s == "workload_identity/quickstart ObservedGeneration ")
        {
            break;
        }
    }
    assert!(
        seen.contains(&"workload_identity/quickstart Generation ".to_owned()),
        "{seen:?}"
    );
    assert!(
        seen.iter()
            .any(|s| s == "workload_identity/quickstart ObservedGeneration "),
        "{seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_ca_edit_rotates_with_both_cas_in_the_bundle_and_reissues() {
    let daemon = quickstart("");
    let (mut stream, first) = open_stream(&daemon).await;
    let td = spiffe::TrustDomain::new("quickstart.tbot.local").unwrap();
    let cas = |ctx: &X509Context| ctx.bundle_set().get(&td).unwrap().authorities().len();
    assert_eq!(cas(&first), 1);
    edit(
        &daemon,
        "cluster.yaml",
        "key_algorithm: ecdsa-p256",
        "key_algorithm: ed25519",
    );
    // First the new CA is published, signing nothing: the same SVID with both CAs.
    let prepared = loop {
        let ctx = next_within(&mut stream, 15).await.expect("a new message").unwrap();
        if cas(&ctx) == 2 {
            break ctx;
        }
    };
    assert_eq!(prepared.svids()[0].leaf().as_ref(), first.svids()[0].leaf().as_ref());
    // It signs after the grace; `--force` brings that moment now.
    let forced = daemon.tbotctl(&["rotate", "ca", "--force"]);
    assert!(forced.status.success(), "{}", String::from_utf8_lossy(&forced.stderr));
    let deadline = Instant::now() + Duration::from_secs(15);
    let rotated = loop {
        let ctx = next_within(&mut stream, 15).await.expect("a new message").unwrap();
        let leaf = ctx.svids()[0].leaf().as_ref().to_vec();
        let (_, cert) = x509_parser::parse_x509_certificate(&leaf).unwrap();
        if cas(&ctx) == 2 && cert.signature_algorithm.algorithm.to_id_string() == "1.3.101.112" {
            break ctx;
        }
        assert!(Instant::now() < deadline, "no rotation");
    };
    // The new SVID is signed by the new (Ed25519) CA, and both CAs stay trusted.
    let leaf = rotated.svids()[0].leaf().as_ref().to_vec();
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf).unwrap();
    assert_eq!(
        cert.signature_algorithm.algorithm.to_id_string(),
        "1.3.101.112",
        "Ed25519"
    );
    assert!(
        daemon.log().contains("prepare a CA with the new settings"),
        "{}",
        daemon.log()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn debug_in_the_agent_config_switches_debug_logging_live() {
    let daemon = quickstart("debug: true\n");
    let (_stream, _) = open_stream(&daemon).await;
    assert!(
        wait_for_log(&daemon, "X509-SVID issued"),
        "debug lines appear: {}",
        daemon.log()
    );
    edit(&daemon, "tbot.yaml", "debug: true", "debug: false");
    assert!(wait_for_log(&daemon, "converging"), "{}", daemon.log());
    let before = daemon.log().matches("DEBUG").count();
    // A new identity's issuance would log at debug level; with debug off, nothing more.
    let client = WorkloadApiClient::connect_to(daemon.endpoint()).await.unwrap();
    client.fetch_jwt_svid(["x"], None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(daemon.log().matches("DEBUG").count(), before, "{}", daemon.log());
}

#[test]
fn a_new_file_that_fails_to_load_is_listed_by_status_get_readyz_and_metrics_until_removed() {
    let port = common::free_port();
    let daemon = quickstart(&format!("diag_addr: 127.0.0.1:{port}\n"));
    assert!(wait_for_log(&daemon, "diagnostics listening"), "{}", daemon.log());
    let broken = daemon.dir.path().join("etc/broken.yaml");
    std::fs::write(&broken, "kind: role\nversion: v7\nmetadata: {name: [x\n").unwrap();
    let listed = |text: &str| text.contains("broken.yaml:3:") && text.contains("Files that fail to load");
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let status = loop {
        let status = daemon.tbotctl(&["status"]);
        if listed(&common::stdout(&status)) || std::time::Instant::now() > deadline {
            break status;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = common::stdout(&status);
    assert!(listed(&text), "tbotctl status:\n{text}\n{}", daemon.log());
    assert_eq!(
        status.status.code(),
        Some(1),
        "status exits 1 while a file fails to load"
    );
    let get = common::stdout(&daemon.tbotctl(&["get"]));
    assert!(listed(&get), "tbotctl get:\n{get}");
    let json = common::stdout(&daemon.tbotctl(&["get", "-o", "json"]));
    let value: serde_json::Value = serde_json::from_str(&json).unwrap();
    let files = value["filesFailingToLoad"].as_array().expect("files in the JSON");
    assert!(
        files[0]["location"].as_str().unwrap().contains("broken.yaml:3:"),
        "{json}"
    );
    assert!(http_get(port, "/metrics").contains("tbot_config_files_failing 1"));
    let ready = http_get(port, "/readyz");
    assert!(ready.contains("\"config_files_failing\":1"), "{ready}");

    std::fs::remove_file(&broken).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while listed(&common::stdout(&daemon.tbotctl(&["status"]))) {
        assert!(std::time::Instant::now() < deadline, "still listed after removal");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(http_get(port, "/metrics").contains("tbot_config_files_failing 0"));
}

#[test]
fn tbotctl_status_and_the_start_log_give_the_ca_pin_that_openssl_computes() {
    let (dir, socket) = common::copy_manifests("manifests/quickstart", &common::QUICKSTART_ON_DISK);
    let daemon = Daemon::start(dir, socket);
    let issuer_dir = daemon.dir.path().join("state/issuer/quickstart.tbot.local");
    let ca = std::fs::read_dir(&issuer_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "der"))
        .expect("a CA certificate on disk");
    // The SubjectPublicKeyInfo, by openssl, and its SHA-256.
    let public_pem = daemon.dir.path().join("ca-public.pem");
    let public_der = daemon.dir.path().join("ca-public.der");
    let pem = common::openssl(&[
        "x509",
        "-inform",
        "DER",
        "-in",
        ca.to_str().unwrap(),
        "-pubkey",
        "-noout",
    ]);
    std::fs::write(&public_pem, pem).unwrap();
    common::openssl(&[
        "pkey",
        "-pubin",
        "-in",
        public_pem.to_str().unwrap(),
        "-outform",
        "DER",
        "-out",
        public_der.to_str().unwrap(),
    ]);
    let digest = common::openssl(&["dgst", "-sha256", "-r", public_der.to_str().unwrap()]);
    let pin = format!("sha256:{}", digest.split_whitespace().next().unwrap());
    assert_eq!(pin.len(), "sha256:".len() + 64);
    let status = common::stdout(&daemon.tbotctl(&["status"]));
    assert!(status.contains(&format!("CA pin: {pin}")), "{status}");
    assert!(wait_for_log(&daemon, &pin), "{}", daemon.log());
}
