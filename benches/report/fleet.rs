//! The guide's topology: the real `tbot start` as an issuer host, agents of it over the issuer API
//! (TLS 1.3 on loopback).
//! - remote issuance: X509-SVIDs per second through the issuer API (16 agents, 4 calls in flight
//!   each), against in-process minting measured here;
//! - the first `FetchX509SVID` message from a remote agent with a warm cache, against the same on a
//!   single-host daemon (the cache is on the agent: they should be equal);
//! - edit on the issuer → new SVID on a remote agent's open stream, p50/p99;
//! - scale: a load generator speaking the issuer protocol as many simulated agents (each its own
//!   TLS connection, source address, bot instance and `Watch` stream), two SVIDs each: joins per
//!   second (beside TLS 1.3 handshakes per second: a join is one handshake, then its `Watch` on the
//!   same connection, which the issuer binds to the new bot certificate), the
//!   issuer's CPU and memory at rest and while every SVID is renewed, and edit → every agent
//!   notified. 20,000 agents, or as many as the hard open-file limit allows (each agent is an
//!   open file in this process and in the issuer's, which inherits this process's limit: 19,488
//!   where it is 20,000); `TBOT_BENCH_AGENTS=N` runs the scale part with N.
//!   `TBOT_BENCH_PAUSE=1` holds the fleet at rest for 90 s after the memory reading and prints the
//!   issuer's pid, for a profiler: `heaptrack` around the issuer, killed then, reports what it
//!   holds at rest as "leaked".

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rcgen::{KeyPair, PublicKeyData};
use tbot::agent::remote::{RemoteIssuer, RemoteSettings};
use tbot::daemon::DEBOUNCE;
use tbot::issuer::{Attributes, Issuer, JoinProof, JoinRequest, PolicyEvent, X509Request};
use tbot::store::Store;
use tokio::sync::watch;

use crate::{Row, Scale, Unit, common, percentile};

const HOUR: Duration = Duration::from_secs(3600);

/// An issuer host: `tbot start` on a generated directory with `tokens` single-use tokens.
pub struct IssuerHost {
    dir: tempfile::TempDir,
    pub child: Child,
    pub address: String,
    pub port: u16,
    pub pin: String,
}

impl Drop for IssuerHost {
    fn drop(&mut self) {
        common::terminate(&mut self.child);
    }
}

fn identity(name: &str, id: &str) -> String {
    format!(
        "kind: workload_identity\nversion: v1\nmetadata:\n  name: {name}\n  labels:\n    app: bench\n\
         spec:\n  spiffe:\n    id: \"{id}\"\n"
    )
}

impl IssuerHost {
    async fn start(tokens: usize) -> IssuerHost {
        IssuerHost::start_with(tokens, "bench", "{type: memory}").await
    }

    /// An issuer replica `name` with `storage` (a YAML flow mapping; `DIR` is its directory).
    pub async fn start_with(tokens: usize, name: &str, storage: &str) -> IssuerHost {
        let dir = tempfile::tempdir().unwrap();
        let etc = dir.path().join("etc");
        std::fs::create_dir(&etc).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let admin = dir.path().join("admin.sock");
        let storage = storage.replace("DIR", &dir.path().display().to_string());
        std::fs::write(
            etc.join("issuer.yaml"),
            format!(
                "kind: issuer\nversion: v1\nmetadata: {{name: {name}}}\nspec:\n  listen: 127.0.0.1:{port}\n  \
                 public_addrs: [\"127.0.0.1\"]\n  storage: {storage}\n  admin_socket: {}\n",
                admin.display()
            ),
        )
        .unwrap();
        let side = String::from(
            "kind: cluster\nversion: v1\nmetadata: {name: bench.example.org}\n---\n\
             kind: role\nversion: v7\nmetadata: {name: r}\nspec:\n  allow:\n    workload_identity_labels: {app: bench}\n\
             \x20   rules: [{resources: [workload_identity], verbs: [read, list]}]\n---\n\
             kind: bot\nversion: v1\nmetadata: {name: b}\nspec: {roles: [r]}\n",
        );
        std::fs::write(etc.join("cluster.yaml"), side).unwrap();
        // 250 tokens per file: the loader bounds the nodes of one file.
        for (f, chunk) in (0..tokens).collect::<Vec<_>>().chunks(250).enumerate() {
            let text: String = chunk
                .iter()
                .map(|i| {
                    format!(
                        "---\nkind: token\nversion: v2\nmetadata: {{name: agent-{i}}}\n\
                         spec: {{roles: [Bot], join_method: token, bot_name: b}}\n"
                    )
                })
                .collect();
            std::fs::write(etc.join(format!("tokens-{f:03}.yaml")), text).unwrap();
        }
        std::fs::write(
            etc.join("wi-uid.yaml"),
            identity("by-uid", "/uid/{{workload.unix.uid}}"),
        )
        .unwrap();
        let child = common::start_tbot(&etc, &dir.path().join("issuer.log"), &admin).await;
        let out = Command::new(env!("CARGO_BIN_EXE_tbotctl"))
            .args(["status", "--dir"])
            .arg(&etc)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let pin = text
            .lines()
            .find_map(|l| l.strip_prefix("CA pin: "))
            .unwrap()
            .to_owned();
        IssuerHost {
            dir,
            child,
            address: format!("127.0.0.1:{port}"),
            port,
            pin,
        }
    }

    fn etc(&self) -> PathBuf {
        self.dir.path().join("etc")
    }

    pub fn settings(&self) -> RemoteSettings {
        self.settings_for(&self.address)
    }

    /// Settings for reaching this host's trust domain at `address` (another replica, a balancer).
    pub fn settings_for(&self, address: &str) -> RemoteSettings {
        RemoteSettings {
            address: address.to_owned(),
            ca_pins: vec![self.pin.clone()],
            ca_path: None,
            insecure: false,
        }
    }

    /// (user + system CPU seconds, resident MiB) of the issuer process.
    fn usage(&self) -> (f64, f64) {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap();
        let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
        let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
        (ticks / 100.0, common::rss_mib(self.child.id()))
    }
}

/// A `token` join with `key` for an hour.
pub fn token_join(key: &KeyPair, token: String) -> JoinRequest {
    JoinRequest {
        token,
        public_key: key.subject_public_key_info(),
        proof: JoinProof::Token,
        ttl: HOUR,
        current: None,
        address: String::new(),
    }
}

/// A simulated agent: the real issuer client, joined, with its bot credential presented.
pub struct SimAgent {
    pub issuer: Arc<RemoteIssuer>,
    pub certificate: Vec<u8>,
    pub key: KeyPair,
    events: watch::Receiver<Arc<PolicyEvent>>,
}

async fn join(host: &IssuerHost, i: usize) -> SimAgent {
    join_at(host.settings(), i).await
}

/// Joins simulated agent `i` (token `agent-i`) through `settings`.
pub async fn join_at(settings: RemoteSettings, i: usize) -> SimAgent {
    let issuer = RemoteIssuer::new(settings, Store::memory(), &Default::default()).unwrap();
    // Each simulated host has its own source address, as the issuer's per-address limits expect.
    issuer.set_local_address(std::net::IpAddr::from([127, 1, (i / 250) as u8, (i % 250 + 1) as u8]));
    let key = KeyPair::generate().unwrap();
    let cert = issuer.join(token_join(&key, format!("agent-{i}"))).await.unwrap();
    issuer.present(&cert.der, &key.serialize_der());
    let events = issuer.policy_events().unwrap();
    issuer.follow();
    SimAgent {
        issuer,
        certificate: cert.der,
        key,
        events,
    }
}

pub async fn issue(agent: &SimAgent, uid: u32) {
    let mut workload = Attributes::new();
    workload.set("workload.unix.uid", uid);
    let key = KeyPair::generate().unwrap();
    agent
        .issuer
        .issue_x509(X509Request {
            bot_certificate: agent.certificate.clone(),
            identity: "by-uid".into(),
            workload,
            public_key: key.subject_public_key_info(),
            ttl: HOUR,
        })
        .await
        .unwrap();
}

/// Runs `work(i)` for i in 0..n with `in_flight` at once; returns the elapsed time.
pub async fn spread<F, Fut>(n: usize, in_flight: usize, work: F) -> Duration
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let work = Arc::new(work);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let tasks: Vec<_> = (0..in_flight)
        .map(|_| {
            let (work, next) = (work.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= n {
                        return;
                    }
                    work(i).await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    start.elapsed()
}

fn save(path: &Path, text: &str) {
    let temp = path.with_extension("yaml.tmp~");
    std::fs::write(&temp, text).unwrap();
    std::fs::rename(&temp, path).unwrap();
}

/// Remote issuance against in-process minting; also returns the in-process rate.
async fn issuance(scale: Scale, host: &IssuerHost) -> (Vec<Row>, f64) {
    let n = scale.pick(4_000, 40);
    let agents: Vec<Arc<SimAgent>> = {
        let mut v = Vec::new();
        for i in 0..16 {
            v.push(Arc::new(join(host, i).await));
        }
        v
    };
    let shared = Arc::new(agents);
    let elapsed = {
        let agents = shared.clone();
        spread(n, 64, move |i| {
            let agents = agents.clone();
            async move { issue(&agents[i % agents.len()], 1000 + i as u32).await }
        })
        .await
    };
    let remote = n as f64 / elapsed.as_secs_f64();
    // The floor: the same issuance in process (new key + `issue_x509`), measured now.
    let local = common::issuer(&identity("svc", "/uid/{{workload.unix.uid}}"), Store::memory()).await;
    let key = KeyPair::generate().unwrap();
    let bot = local.join(token_join(&key, "bench-token".into())).await.unwrap();
    let start = Instant::now();
    for i in 0..n {
        let mut workload = Attributes::new();
        workload.set("workload.unix.uid", 1000 + i);
        let key = KeyPair::generate().unwrap();
        local
            .issue_x509(X509Request {
                bot_certificate: bot.der.clone(),
                identity: "svc".into(),
                workload,
                public_key: key.subject_public_key_info(),
                ttl: HOUR,
            })
            .await
            .unwrap();
    }
    let in_process = n as f64 / start.elapsed().as_secs_f64();
    let rows = vec![Row::rate(
        "fleet",
        format!("X509-SVIDs through the issuer API (16 agents, 64 in flight, TLS 1.3 on loopback; {n})"),
        remote,
        "in-process `issue_x509` with a new key, one at a time",
        in_process,
    )];
    (rows, in_process)
}

/// An agent-only daemon of `host`, serving identity `by-uid` on a socket.
struct AgentHost {
    _dir: tempfile::TempDir,
    child: Child,
    address: String,
}

impl Drop for AgentHost {
    fn drop(&mut self) {
        common::terminate(&mut self.child);
    }
}

impl AgentHost {
    async fn start(host: &IssuerHost, token: &str) -> AgentHost {
        let dir = tempfile::tempdir().unwrap();
        let etc = dir.path().join("etc");
        std::fs::create_dir(&etc).unwrap();
        let socket = dir.path().join("workload.sock");
        std::fs::write(
            etc.join("tbot.yaml"),
            format!(
                "version: v2\nproxy_server: {}\nonboarding:\n  join_method: token\n  token: {token}\n  ca_pins: [\"{}\"]\n\
                 storage: {{type: memory}}\nadmin_socket: {}\nservices:\n  - type: workload-identity-api\n\
                 \x20   listen: unix://{}\n    selector: {{name: by-uid}}\n",
                host.address,
                host.pin,
                dir.path().join("admin.sock").display(),
                socket.display()
            ),
        )
        .unwrap();
        let child = common::start_tbot(&etc, &dir.path().join("agent.log"), &socket).await;
        AgentHost {
            _dir: dir,
            child,
            address: format!("unix://{}", socket.display()),
        }
    }
}

/// The agent's own figures: first message with a warm cache, and edit → new SVID across hosts.
async fn agent_paths(scale: Scale, host: &IssuerHost) -> Vec<Row> {
    let agent = AgentHost::start(host, "agent-63").await;
    let n = scale.pick(300, 5);
    common::first_messages(&agent.address, 1).await;
    let remote = common::first_messages(&agent.address, n).await;
    let local_daemon = crate::daemon::LocalDaemon::start().await;
    common::first_messages(&local_daemon.address, 1).await;
    let local = common::first_messages(&local_daemon.address, n).await;

    use tbot::workload_api::client;
    use tbot::workload_api::proto::X509svidRequest;
    use tbot::workload_api::proto::spiffe_workload_api_client::SpiffeWorkloadApiClient;
    use tokio_stream::StreamExt;
    let mut stream = SpiffeWorkloadApiClient::new(client::connect(&agent.address).await.unwrap())
        .fetch_x509svid(client::request(X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    stream.next().await.unwrap().unwrap();
    let file = host.etc().join("wi-uid.yaml");
    let mut latencies = Vec::new();
    for k in 0..scale.pick(50, 3) {
        let id = format!("/edit-{k}/{{{{workload.unix.uid}}}}");
        let start = Instant::now();
        save(&file, &identity("by-uid", &id));
        let want = format!("/edit-{k}/");
        loop {
            let m = tokio::time::timeout(Duration::from_secs(30), stream.next())
                .await
                .expect("a new SVID within 30 s")
                .unwrap()
                .unwrap();
            if m.svids.iter().any(|s| s.spiffe_id.contains(&want)) {
                break;
            }
        }
        latencies.push(start.elapsed());
    }
    latencies.sort();
    let mut rows = vec![Row::duration(
        "fleet",
        format!("`FetchX509SVID` first message, agent of a remote issuer, warm cache (p50 of {n})"),
        percentile(&remote, 0.5),
        "the same on a single-host daemon (issuer in process)",
        percentile(&local, 0.5),
    )];
    for (label, p) in [("p50", 0.5), ("p99", 0.99)] {
        rows.push(Row::duration(
            "fleet",
            format!(
                "edit on the issuer → new SVID on a remote agent's stream, {label} ({} edits)",
                latencies.len()
            ),
            percentile(&latencies, p),
            "the debounce interval",
            DEBOUNCE,
        ));
    }
    rows
}

/// Agents the scale part runs by default: the issue's 20,000, or as many as the hard open-file
/// limit lets both processes hold.
const AGENTS: usize = 20_000;

/// Open files a process needs besides one per agent.
const SPARE_FILES: usize = 512;

/// Many simulated agents against one issuer.
/// How many simulated agents the scale part runs (`TBOT_BENCH_AGENTS`; by default [`AGENTS`], or
/// fewer when the hard open-file limit is lower, said on stderr).
fn agents_at_scale(scale: Scale) -> usize {
    // Each agent is one connection in this process and one in the issuer's, which inherits this
    // process's limit: raise the soft open-file limit to the hard one, and say when it cannot fit.
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    let n = std::env::var("TBOT_BENCH_AGENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            let fit = limit
                .maximum
                .map_or(AGENTS, |m| (m as usize).saturating_sub(SPARE_FILES));
            if fit < AGENTS {
                eprintln!(
                    "the scale part runs {fit} agents, not {AGENTS}: the hard open-file limit here is {}",
                    fit + SPARE_FILES
                );
            }
            fit.min(AGENTS)
        });
    if let (Some(current), Some(maximum)) = (limit.current, limit.maximum)
        && current < maximum
    {
        let raised = rustix::process::Rlimit {
            current: Some(maximum),
            maximum: Some(maximum),
        };
        let _ = rustix::process::setrlimit(rustix::process::Resource::Nofile, raised);
    }
    if let Some(maximum) = limit.maximum.filter(|m| (n + SPARE_FILES) as u64 > *m) {
        eprintln!(
            "{n} agents need about {} open files in this process and in the issuer's; the hard limit here \
             is {maximum}",
            n + SPARE_FILES
        );
    }
    scale.pick(n, 40)
}

async fn at_scale(scale: Scale, in_process: f64) -> Vec<Row> {
    let agents_n = agents_at_scale(scale);
    let host = IssuerHost::start(agents_n).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (cpu0, idle_rss) = host.usage();
    tokio::time::sleep(Duration::from_secs(scale.pick(10, 1))).await;
    let (cpu1, _) = host.usage();
    let idle_cpu = (cpu1 - cpu0) / scale.pick(10.0, 1.0);

    // Joins.
    let joined = Arc::new(tokio::sync::Mutex::new(Vec::with_capacity(agents_n)));
    let host = Arc::new(host);
    let join_time = {
        let (joined, host) = (joined.clone(), host.clone());
        spread(agents_n, 32, move |i| {
            let (joined, host) = (joined.clone(), host.clone());
            async move {
                let agent = join(&host, i).await;
                joined.lock().await.push(Arc::new(agent));
            }
        })
        .await
    };
    let agents: Arc<Vec<Arc<SimAgent>>> = Arc::new(std::mem::take(&mut *joined.lock().await));
    // Every agent's `Watch` stream up.
    let deadline = Instant::now() + Duration::from_secs(300);
    while agents.iter().any(|a| !a.issuer.link().borrow().connected) {
        assert!(Instant::now() < deadline, "not every agent connected");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let joins_per_second = agents_n as f64 / join_time.as_secs_f64();
    let handshakes_per_second = tls_handshakes(agents_n, 32).await;

    // Two SVIDs per agent (the first issuance), then at rest.
    let issue_all = |agents: Arc<Vec<Arc<SimAgent>>>| {
        spread(agents.len() * 2, 64, move |i| {
            let agents = agents.clone();
            async move { issue(&agents[i / 2], (i % 2) as u32 + 2 * (i / 2) as u32).await }
        })
    };
    issue_all(agents.clone()).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (rest0, rest_rss) = host.usage();
    if std::env::var_os("TBOT_BENCH_PAUSE").is_some() {
        eprintln!(
            "at rest for 90 s: issuer pid {}, {rest_rss:.1} MiB resident",
            host.child.id()
        );
        tokio::time::sleep(Duration::from_secs(90)).await;
    }
    let window = scale.pick(10.0, 1.0);
    tokio::time::sleep(Duration::from_secs_f64(window)).await;
    let (rest1, _) = host.usage();
    let rest_cpu = (rest1 - rest0) / window;

    // Renewals: every SVID again.
    let (busy0, _) = host.usage();
    let renew_time = issue_all(agents.clone()).await;
    let (busy1, busy_rss) = host.usage();
    let renewals_per_second = (agents.len() * 2) as f64 / renew_time.as_secs_f64();
    let busy_cpu = (busy1 - busy0) / renew_time.as_secs_f64();

    // An edit on the issuer: the time until every agent has heard of it.
    let mut receivers: Vec<_> = agents.iter().map(|a| a.events.clone()).collect();
    for r in &mut receivers {
        r.borrow_and_update();
    }
    let start = Instant::now();
    save(
        &host.etc().join("wi-uid.yaml"),
        &identity("by-uid", "/edited/{{workload.unix.uid}}"),
    );
    let waits: Vec<_> = receivers
        .into_iter()
        .map(|mut r| {
            tokio::spawn(async move {
                tokio::time::timeout(Duration::from_secs(60), r.changed())
                    .await
                    .expect("notified within 60 s")
                    .unwrap();
                Instant::now()
            })
        })
        .collect();
    let mut notified = Vec::with_capacity(waits.len());
    for w in waits {
        notified.push(w.await.unwrap() - start);
    }
    notified.sort();
    drop(agents);

    let n = crate::thousands(agents_n as f64);
    let svids = crate::thousands((agents_n * 2) as f64);
    vec![
        Row::rate(
            "fleet",
            format!("{n} simulated agents joining (`token`, 32 at once, each a new TLS connection and address)"),
            joins_per_second,
            "in-process `issue_x509` with a new key (a join signs one certificate)",
            in_process,
        ),
        Row::rate(
            "fleet",
            format!(
                "the same {n} joins against bare TLS (a join is one handshake: its `Watch` stays on the \
                 join's connection)"
            ),
            joins_per_second,
            "TLS 1.3 handshakes on loopback (P-256 server certificate, no client certificate, each a new TCP \
             connection, 32 at once)",
            handshakes_per_second,
        ),
        Row::cost(
            "fleet",
            format!("issuer CPU at rest, {n} agents connected and {svids} SVIDs issued (cores busy)"),
            rest_cpu.max(0.001),
            Unit::Cores,
            "the same issuer with no agent (shown at least 0.001)",
            idle_cpu.max(0.001),
        ),
        Row::cost(
            "fleet",
            format!("issuer resident memory at rest, {n} agents connected"),
            rest_rss,
            Unit::MiB,
            "the same issuer with no agent",
            idle_rss,
        ),
        Row::rate(
            "fleet",
            format!("renewals: {svids} X509-SVIDs reissued by {n} agents (64 in flight)"),
            renewals_per_second,
            "in-process `issue_x509` with a new key, one at a time",
            in_process,
        ),
        Row::cost(
            "fleet",
            format!("issuer CPU during those renewals, issuer memory then {busy_rss:.0} MiB"),
            busy_cpu,
            Unit::Cores,
            "the cores of this machine (the load generator shares them)",
            std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64),
        ),
        Row::duration(
            "fleet",
            format!("edit on the issuer → all {n} agents notified, p99"),
            percentile(&notified, 0.99),
            "the debounce interval",
            DEBOUNCE,
        ),
        Row::duration(
            "fleet",
            format!("edit on the issuer → all {n} agents notified, last"),
            *notified.last().unwrap(),
            "the debounce interval",
            DEBOUNCE,
        ),
    ]
}

pub async fn run(scale: Scale) -> Vec<Row> {
    let host = IssuerHost::start(scale.pick(5_000, 64)).await;
    let (mut rows, in_process) = issuance(scale, &host).await;
    rows.extend(agent_paths(scale, &host).await);
    drop(host);
    rows.extend(at_scale(scale, in_process).await);
    rows
}

/// TLS 1.3 handshakes per second on loopback, `in_flight` at once, each on a new TCP connection: a
/// rustls server with a P-256 certificate (the issuer's kind), a rustls client that verifies it, and
/// nothing sent after the handshake. The floor of a join, which makes one such handshake, then its
/// join and `Watch` on the connection.
async fn tls_handshakes(n: usize, in_flight: usize) -> f64 {
    use tokio_rustls::rustls;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let key = KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der().clone()).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let accepting = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(tcp).await {
                    // Hold the connection until the client closes it, as a server would.
                    let mut byte = [0u8; 1];
                    let _ = tokio::io::AsyncReadExt::read(&mut tls, &mut byte).await;
                }
            });
        }
    });
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let elapsed = spread(n, in_flight, move |_| {
        let (connector, name) = (connector.clone(), name.clone());
        async move {
            let tcp = tokio::net::TcpStream::connect(address).await.unwrap();
            let mut tls = connector.connect(name, tcp).await.unwrap();
            // The server's half of the handshake is done once its first record is read.
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut tls).await;
        }
    })
    .await;
    accepting.abort();
    n as f64 / elapsed.as_secs_f64()
}
