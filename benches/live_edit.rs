//! Edit to new SVID: a running `tbot start` (the real binary) on a copy of the quickstart, one open
//! `FetchX509SVID` stream, and `workload_identity` edits saved the way editors do (write a temp file,
//! rename over). Prints the time from the rename to the new SVID on the stream, p50 and p99, against
//! the debounce interval (the floor: the daemon waits that long for more events before reloading).
//!
//! Run with `cargo bench --bench live_edit` (100 edits). Prints one table.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tbot::controller::daemon::DEBOUNCE;
use tbot::workload_api::client;
use tbot::workload_api::proto::X509svidRequest;
use tbot::workload_api::proto::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use tokio_stream::StreamExt;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return;
    }
    let edits = if args.iter().any(|a| a == "--bench") { 100 } else { 3 };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run(edits));
}

fn save(path: &Path, text: &str) {
    let temp = path.with_extension("yaml.tmp~");
    std::fs::write(&temp, text).unwrap();
    std::fs::rename(&temp, path).unwrap();
}

async fn run(edits: usize) {
    let dir = tempfile::tempdir().unwrap();
    let etc = dir.path().join("etc");
    std::fs::create_dir(&etc).unwrap();
    let socket = dir.path().join("workload.sock");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests/quickstart");
    for entry in std::fs::read_dir(root).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace(
                "unix:///tmp/tbot-quickstart/workload.sock",
                &format!("unix://{}", socket.display()),
            )
            .replace("type: directory\n  path: /tmp/tbot-quickstart/state", "type: memory");
        std::fs::write(etc.join(path.file_name().unwrap()), text).unwrap();
    }
    let mut daemon = Command::new(env!("CARGO_BIN_EXE_tbot"))
        .args(["start", "--config-dir"])
        .arg(&etc)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(Instant::now() < deadline, "the daemon did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let channel = client::connect(&format!("unix://{}", socket.display())).await.unwrap();
    let mut api = SpiffeWorkloadApiClient::new(channel);
    let mut stream = api
        .fetch_x509svid(client::request(X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    stream.next().await.unwrap().unwrap();
    let file = etc.join("workload-identity.yaml");
    let original = std::fs::read_to_string(&file).unwrap();
    let mut latencies = Vec::with_capacity(edits);
    for i in 0..edits {
        let text = original.replace("id: \"/user/", &format!("id: \"/edit-{i}/"));
        let want = format!("/edit-{i}/");
        let start = Instant::now();
        save(&file, &text);
        loop {
            let message = tokio::time::timeout(Duration::from_secs(10), stream.next())
                .await
                .expect("a new SVID within 10s")
                .unwrap()
                .unwrap();
            if message.svids.iter().any(|s| s.spiffe_id.contains(&want)) {
                break;
            }
        }
        latencies.push(start.elapsed());
    }
    let _ = Command::new("kill").args(["-TERM", &daemon.id().to_string()]).status();
    let _ = daemon.wait();
    latencies.sort();
    let pick = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p).round() as usize];
    let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1e3);
    println!("| edit → new SVID on an open stream ({edits} edits) | tbot | floor: debounce | ratio |");
    println!("|---|---:|---:|---:|");
    for (label, p) in [("p50", 0.5), ("p99", 0.99)] {
        let v = pick(p);
        println!(
            "| {label} | {} | {} | {:.2}x |",
            ms(v),
            ms(DEBOUNCE),
            v.as_secs_f64() / DEBOUNCE.as_secs_f64()
        );
    }
}
