//! What the sections share: an in-process issuer for `bench.example.org` whose bot `b` joins with
//! `bench-token` and may issue every identity labelled `app: bench`, and a generated directory of
//! documents for the daemon.

use std::path::{Path, PathBuf};

use tbot::issuer::{LocalIssuer, Policy};
use tbot::manifest::{Input, load};
use tbot::store::Store;

const CLUSTER_SIDE: &str = "
kind: cluster
version: v1
metadata: {name: bench.example.org}
spec: {}
---
kind: role
version: v7
metadata: {name: r}
spec:
  allow:
    workload_identity_labels: {app: bench}
    rules: [{resources: [workload_identity], verbs: [read, list]}]
---
kind: bot
version: v1
metadata: {name: b}
spec: {roles: [r]}
---
kind: token
version: v2
metadata: {name: bench-token}
spec: {roles: [Bot], join_method: token, bot_name: b}
";

/// The issuer, over `store`, with one more `workload_identity` document (named `svc`).
pub async fn issuer(workload_identity: &str, store: Store) -> LocalIssuer {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("docs.yaml");
    std::fs::write(&file, format!("{CLUSTER_SIDE}---\n{workload_identity}")).unwrap();
    let loaded = load(&[Input::File(file)]).unwrap();
    assert!(!loaded.has_errors(), "{:#?}", loaded.diagnostics);
    LocalIssuer::open(store, Policy::from_state(&loaded.state).unwrap())
        .await
        .unwrap()
}

/// Writes a directory a daemon can run: the agent config (token join, one Workload API socket whose
/// selector takes every identity labelled `app: bench`, storage in `state`), the cluster side, and
/// `identities` workload identities, one per file. Identity 0 is for processes of `uid` (so the
/// benchmark itself gets it); identity `i` is for uid `100000 + i`.
pub fn write_directory(dir: &Path, identities: usize, socket: &Path, state: &Path, uid: u32) {
    let agent = format!(
        "version: v2\nproxy_server: bench.example.org:443\nonboarding:\n  join_method: token\n  token: bench-token\n\
         storage:\n  type: directory\n  path: {state}\ncredential_ttl: 1h\n\
         services:\n  - type: workload-identity-api\n    listen: unix://{socket}\n    selector:\n      labels:\n        app: bench\n",
        state = state.display(),
        socket = socket.display()
    );
    std::fs::write(dir.join("00-agent.yaml"), agent).unwrap();
    let cluster_side = [
        "kind: cluster\nversion: v1\nmetadata:\n  name: bench.example.org\nspec:\n  ca:\n    key_algorithm: ecdsa-p256\n---\n",
        "kind: token\nversion: v2\nmetadata:\n  name: bench-token\n",
        "spec:\n  roles: [Bot]\n  bot_name: bench\n  join_method: token\n---\n",
        "kind: bot\nversion: v1\nmetadata:\n  name: bench\nspec:\n  roles: [bench]\n---\n",
        "kind: role\nversion: v7\nmetadata:\n  name: bench\nspec:\n  allow:\n",
        "    workload_identity_labels:\n      app: [bench]\n",
        "    rules:\n      - resources: [workload_identity]\n        verbs: [read, list]\n",
    ];
    std::fs::write(dir.join(CLUSTER_FILE), cluster_side.concat()).unwrap();
    for i in 0..identities {
        let uid = if i == 0 { uid } else { 100_000 + i as u32 };
        std::fs::write(identity_file(dir, i), identity_text(i, uid, "")).unwrap();
    }
}

/// The file holding the cluster side (the CA's key algorithm is in it).
pub const CLUSTER_FILE: &str = "01-cluster.yaml";

pub fn identity_file(dir: &Path, i: usize) -> PathBuf {
    dir.join(format!("wi-{i:05}.yaml"))
}

/// Identity `i`'s document; `variant` goes into its SPIFFE ID (`/svc/<i><variant>/<uid>`).
pub fn identity_text(i: usize, uid: u32, variant: &str) -> String {
    format!(
        "kind: workload_identity\nversion: v1\nmetadata:\n  name: service-{i}\n  labels:\n    app: bench\nspec:\n  rules:\n    allow:\n\
         \x20     - conditions:\n          - attribute: workload.unix.uid\n            eq:\n              value: \"{uid}\"\n\
         \x20 spiffe:\n    id: \"/svc/{i}{variant}/{{{{workload.unix.uid}}}}\"\n    hint: service-{i}\n    x509:\n      dns_sans: [\"service-{i}.local\"]\n      maximum_ttl: 1h\n"
    )
}

/// The uid of this process.
pub fn my_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").unwrap().uid()
}

/// Starts `tbot start --config-dir etc` with its log in `log` (`RUST_LOG` from `TBOT_BENCH_LOG`,
/// default `warn`) and waits until `socket` answers; panics with the log when the daemon exits or
/// does not answer within two minutes.
pub async fn start_tbot(etc: &Path, log: &Path, socket: &Path) -> std::process::Child {
    let file = std::fs::File::create(log).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tbot"))
        .args(["start", "--config-dir"])
        .arg(etc)
        .env(
            "RUST_LOG",
            std::env::var("TBOT_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stderr(std::process::Stdio::from(file))
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        let log = || std::fs::read_to_string(log).unwrap_or_default();
        assert!(child.try_wait().unwrap().is_none(), "tbot start exited:\n{}", log());
        assert!(
            std::time::Instant::now() < deadline,
            "tbot start did not answer:\n{}",
            log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    child
}

/// Stops a daemon the benchmark started (SIGTERM, then waits).
pub fn terminate(child: &mut std::process::Child) {
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

/// A process's resident memory.
pub fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        .unwrap();
    kib / 1024.0
}

/// `n` new connections to the Workload API at `address`, each timed from connected to the first
/// `FetchX509SVID` message; sorted.
pub async fn first_messages(address: &str, n: usize) -> Vec<std::time::Duration> {
    use tbot::workload_api::client;
    use tbot::workload_api::proto::X509svidRequest;
    use tbot::workload_api::proto::spiffe_workload_api_client::SpiffeWorkloadApiClient;
    use tokio_stream::StreamExt;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let channel = client::connect(address).await.unwrap();
        let start = std::time::Instant::now();
        let mut stream = SpiffeWorkloadApiClient::new(channel)
            .fetch_x509svid(client::request(X509svidRequest {}))
            .await
            .unwrap()
            .into_inner();
        stream.next().await.unwrap().unwrap();
        out.push(start.elapsed());
    }
    out.sort();
    out
}
