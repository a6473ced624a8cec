//! The real `tbot start` binary on a generated directory (on-disk storage, one Workload API socket),
//! with clients on open `FetchX509SVID` streams. Edits are saved the way editors do (write a temp
//! file, rename over) and timed from the rename to the new SVID on the stream:
//! - `edit`: one identity, 100 edits, p50 and p99;
//! - `scale`: one of 1,000 and one of 10,000 identities edited, p50 and p99 — the time must not grow
//!   with the number of documents;
//! - `streams`: 1,000 open streams (each its own connection): the daemon's resident memory, and the
//!   time until every stream has a new SVID after a CA rotation (`tbotctl rotate ca`, then `--force`).
//!
//! The floor of a convergence is the debounce interval: the daemon waits that long for more events
//! before it reloads. The floor of the memory is the same daemon with no stream open.

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use rcgen::{KeyPair, SigningKey};
use tbot::daemon::DEBOUNCE;
use tbot::workload_api::client;
use tbot::workload_api::proto::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use tbot::workload_api::proto::{X509svidRequest, X509svidResponse};
use tokio_stream::StreamExt;
use tonic::Streaming;

use crate::{Row, Scale, Unit, common, percentile};

/// A running daemon on a generated directory; stopped on drop.
struct Running {
    _dir: tempfile::TempDir,
    etc: PathBuf,
    address: String,
    child: Child,
}

impl Running {
    async fn start(identities: usize) -> Running {
        let dir = tempfile::tempdir().unwrap();
        let etc = dir.path().join("etc");
        std::fs::create_dir(&etc).unwrap();
        let socket = dir.path().join("workload.sock");
        common::write_directory(&etc, identities, &socket, &dir.path().join("state"), common::my_uid());
        // TBOT_BENCH_LOG=debug TBOT_BENCH_LOG_FILE=/tmp/d.log keeps what the daemon said.
        let log_path = std::env::var_os("TBOT_BENCH_LOG_FILE").map_or(dir.path().join("daemon.log"), PathBuf::from);
        let child = common::start_tbot(&etc, &log_path, &socket).await;
        Running {
            address: format!("unix://{}", socket.display()),
            _dir: dir,
            etc,
            child,
        }
    }

    /// A new stream on its own connection, and its first message.
    async fn stream(&self) -> (Streaming<X509svidResponse>, X509svidResponse) {
        Running::stream_on(client::connect(&self.address).await.unwrap()).await
    }

    /// A new stream on `channel`, and its first message.
    async fn stream_on(channel: tonic::transport::Channel) -> (Streaming<X509svidResponse>, X509svidResponse) {
        let mut stream = SpiffeWorkloadApiClient::new(channel)
            .fetch_x509svid(client::request(X509svidRequest {}))
            .await
            .unwrap()
            .into_inner();
        let first = stream.next().await.unwrap().unwrap();
        (stream, first)
    }

    /// The daemon's resident memory.
    fn rss_mib(&self) -> f64 {
        common::rss_mib(self.child.id())
    }

    /// Times `edits` edits of identity 0, each until the stream carries its new SPIFFE ID.
    async fn edit_latencies(&self, edits: usize) -> Vec<Duration> {
        let (mut stream, _) = self.stream().await;
        let file = common::identity_file(&self.etc, 0);
        let mut latencies = Vec::with_capacity(edits);
        for k in 0..edits {
            let variant = format!("-edit-{k}");
            let want = format!("/svc/0{variant}/");
            let text = common::identity_text(0, common::my_uid(), &variant);
            let start = Instant::now();
            save(&file, &text);
            loop {
                let message = next(&mut stream).await;
                if message.svids.iter().any(|s| s.spiffe_id.contains(&want)) {
                    break;
                }
            }
            latencies.push(start.elapsed());
        }
        latencies.sort();
        latencies
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        common::terminate(&mut self.child);
    }
}

async fn next(stream: &mut Streaming<X509svidResponse>) -> X509svidResponse {
    tokio::time::timeout(Duration::from_secs(60), stream.next())
        .await
        .expect("a new SVID within 60s")
        .unwrap()
        .unwrap()
}

fn save(path: &Path, text: &str) {
    let temp = path.with_extension("yaml.tmp~");
    std::fs::write(&temp, text).unwrap();
    std::fs::rename(&temp, path).unwrap();
}

fn latency_rows(section: &'static str, what: &str, latencies: &[Duration]) -> Vec<Row> {
    [("p50", 0.5), ("p99", 0.99)]
        .into_iter()
        .map(|(label, p)| {
            Row::duration(
                section,
                format!("{what}, {label} ({} edits)", latencies.len()),
                percentile(latencies, p),
                "the debounce interval",
                DEBOUNCE,
            )
        })
        .collect()
}

pub async fn edits(scale: Scale) -> Vec<Row> {
    let daemon = Running::start(1).await;
    let latencies = daemon.edit_latencies(scale.pick(100, 3)).await;
    latency_rows("edit", "edit → new SVID on an open stream", &latencies)
}

pub async fn converge_at_scale(scale: Scale) -> Vec<Row> {
    let mut rows = Vec::new();
    for identities in scale.pick(vec![1_000, 10_000], vec![50]) {
        let daemon = Running::start(identities).await;
        let latencies = daemon.edit_latencies(scale.pick(20, 2)).await;
        let what = format!(
            "one of {} identities edited → new SVID",
            crate::thousands(identities as f64)
        );
        rows.extend(latency_rows("scale", &what, &latencies));
    }
    rows
}

pub async fn many_streams(scale: Scale) -> Vec<Row> {
    let streams = scale.pick(1_000, 20);
    let daemon = Running::start(1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = daemon.rss_mib();
    // First the bare connections (a health check on each: HTTP/2 set up, attested, no stream), then
    // a stream on each of them: the difference is what an open stream costs beyond its connection.
    let mut channels = Vec::with_capacity(streams);
    for _ in 0..streams {
        let channel = client::connect(&daemon.address).await.unwrap();
        tonic_health::pb::health_client::HealthClient::new(channel.clone())
            .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
            .await
            .unwrap();
        channels.push(channel);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let connected = daemon.rss_mib();
    let mut open = Vec::with_capacity(streams);
    for channel in &channels {
        open.push(Running::stream_on(channel.clone()).await);
    }
    let loaded = daemon.rss_mib();

    // Rotate the CA: a successor is prepared (`tbotctl rotate ca`, untimed), then activated at once
    // (`--force`, timed); every stream waits for an SVID other than its first.
    let rotate = |force: bool| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_tbotctl"));
        command.args(["rotate", "ca", "--dir"]).arg(&daemon.etc);
        if force {
            command.arg("--force");
        }
        let out = command.output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    rotate(false);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let start = Instant::now();
    rotate(true);
    let waiters: Vec<_> = open
        .into_iter()
        .map(|(mut stream, first)| {
            tokio::spawn(async move {
                loop {
                    let message = next(&mut stream).await;
                    if message.svids[0].x509_svid != first.svids[0].x509_svid {
                        return Instant::now();
                    }
                }
            })
        })
        .collect();
    let mut last = start;
    for w in waiters {
        last = last.max(w.await.unwrap());
    }
    let all = last - start;

    // The work the rotation cannot avoid, measured here: a new CA key, a new SVID key, one signature
    // (the best of 5: one try alone once read 31 ms on a busy machine).
    let floor = (0..5)
        .map(|_| {
            let work = Instant::now();
            let ca = KeyPair::generate().unwrap();
            let svid_key = KeyPair::generate().unwrap();
            std::hint::black_box((ca.sign(&[0x5a; 600]).unwrap(), svid_key));
            work.elapsed()
        })
        .min()
        .unwrap();

    let count = crate::thousands(streams as f64);
    let per_stream = (loaded - idle) * 1024.0 / streams as f64;
    let per_connection = (connected - idle) * 1024.0 / streams as f64;
    vec![
        Row::cost(
            "streams",
            format!("daemon resident memory, {count} open `FetchX509SVID` streams"),
            loaded,
            Unit::MiB,
            "the same daemon, no stream open",
            idle,
        ),
        Row::cost(
            "streams",
            "resident memory per open `FetchX509SVID` stream, with its connection".into(),
            per_stream,
            Unit::KiB,
            "per attested connection with no stream open (HTTP/2 set up by a health check)",
            per_connection,
        ),
        Row::duration(
            "streams",
            format!("CA activated (`tbotctl rotate ca --force`) → all {count} streams have a new SVID"),
            all,
            "a new CA key, SVID key and signature",
            floor,
        ),
    ]
}

/// A single-host daemon with one identity, for other sections' floors.
pub struct LocalDaemon {
    _running: Running,
    pub address: String,
}

impl LocalDaemon {
    pub async fn start() -> LocalDaemon {
        let running = Running::start(1).await;
        LocalDaemon {
            address: running.address.clone(),
            _running: running,
        }
    }
}
