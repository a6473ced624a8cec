//! The Workload API under load, on a real unix socket, against floors measured in the same run over
//! the same kind of socket:
//! - first-message latency of `FetchX509SVID` for a cached identity (a new stream on an open
//!   connection) against a bare tonic unary call (`grpc.health.v1.Health/Check`), p50 and p99;
//! - stream opens per second (open, first message, close) with 1, 16 and 256 concurrent clients, each
//!   on its own connection, against bare unary calls at the same concurrency, and against a bare
//!   `SpiffeWorkloadAPI` that answers every `FetchX509SVID` with the same prepared message and keeps
//!   the stream open (the cost of the streaming protocol itself, without anything of tbot's);
//! - X509-SVIDs minted for 1,000 one-shot fetches by one workload, one after the other, each on a new
//!   connection (a cron job, py-spiffe's `fetch_x509_svid()`): the floor is one.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rcgen::{KeyPair, PublicKeyData};
use tbot::agent::{Agent, JoinSettings};
use tbot::issuer::{IdentitySelector, Issuer};
use tbot::resource::agent::JoinMethod;
use tbot::store::Store;
use tbot::workload_api::client;
use tbot::workload_api::listener::{bind_unix, incoming_unix};
use tbot::workload_api::proto::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use tbot::workload_api::proto::spiffe_workload_api_server::SpiffeWorkloadApi;
use tbot::workload_api::proto::spiffe_workload_api_server::SpiffeWorkloadApiServer;
use tbot::workload_api::proto::{
    JwtBundlesRequest, JwtBundlesResponse, JwtsvidRequest, JwtsvidResponse, ValidateJwtsvidRequest,
    ValidateJwtsvidResponse, X509BundlesRequest, X509BundlesResponse, X509svidRequest, X509svidResponse,
};
use tbot::workload_api::server::{ServiceConfig, WorkloadApi};
use tokio_stream::StreamExt;
use tonic::transport::{Channel, Server};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use crate::{Row, Scale, Unit, common, percentile};

const IDENTITY: &str = "
kind: workload_identity
version: v1
metadata: {name: svc, labels: {app: bench}}
spec:
  rules:
    allow:
      - conditions: [{attribute: workload.unix.attested, eq: {value: 'true'}}]
  spiffe: {id: '/user/{{workload.unix.uid}}', hint: bench}
";

/// `n` clients connecting at once, each timed from its connect to the first message of a
/// `FetchX509SVID` stream it opens; sorted.
async fn reconnection_burst(address: &str, n: usize) -> Vec<Duration> {
    let go = Arc::new(tokio::sync::Barrier::new(n));
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (address, go) = (address.to_owned(), go.clone());
            tokio::spawn(async move {
                go.wait().await;
                let start = Instant::now();
                first_svid(client::connect(&address).await.unwrap()).await;
                start.elapsed()
            })
        })
        .collect();
    let mut times = Vec::with_capacity(n);
    for t in tasks {
        times.push(t.await.unwrap());
    }
    times.sort();
    times
}

async fn first_svid(channel: Channel) {
    let mut api = SpiffeWorkloadApiClient::new(channel);
    let mut stream = api
        .fetch_x509svid(client::request(X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    let message = stream.next().await.unwrap().unwrap();
    assert_eq!(message.svids.len(), 1);
}

/// A `SpiffeWorkloadAPI` with nothing behind it: every `FetchX509SVID` gets the same prepared message
/// on a stream that stays open; everything else is unimplemented.
struct Bare(X509svidResponse);

type BareStream<T> = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<T, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl SpiffeWorkloadApi for Bare {
    type FetchX509SVIDStream = BareStream<X509svidResponse>;
    type FetchX509BundlesStream = BareStream<X509BundlesResponse>;
    type FetchJWTBundlesStream = BareStream<JwtBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        _: tonic::Request<X509svidRequest>,
    ) -> Result<tonic::Response<Self::FetchX509SVIDStream>, tonic::Status> {
        let stream = tokio_stream::once(Ok(self.0.clone())).chain(tokio_stream::pending());
        Ok(tonic::Response::new(Box::pin(stream)))
    }

    async fn fetch_x509_bundles(
        &self,
        _: tonic::Request<X509BundlesRequest>,
    ) -> Result<tonic::Response<Self::FetchX509BundlesStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("bare"))
    }

    async fn fetch_jwtsvid(
        &self,
        _: tonic::Request<JwtsvidRequest>,
    ) -> Result<tonic::Response<JwtsvidResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("bare"))
    }

    async fn fetch_jwt_bundles(
        &self,
        _: tonic::Request<JwtBundlesRequest>,
    ) -> Result<tonic::Response<Self::FetchJWTBundlesStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("bare"))
    }

    async fn validate_jwtsvid(
        &self,
        _: tonic::Request<ValidateJwtsvidRequest>,
    ) -> Result<tonic::Response<ValidateJwtsvidResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("bare"))
    }
}

async fn health_check(channel: Channel) {
    let mut health = HealthClient::new(channel);
    health
        .check(HealthCheckRequest { service: String::new() })
        .await
        .unwrap();
}

/// Latencies of `n` sequential calls on one connection, sorted.
async fn latencies<F, Fut>(channel: &Channel, n: usize, call: F) -> Vec<Duration>
where
    F: Fn(Channel) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        call(channel.clone()).await;
        out.push(start.elapsed());
    }
    out.sort();
    out
}

/// Calls per second with `clients` concurrent clients, each on its own connection, for `window`.
async fn rate<F, Fut>(address: &str, clients: usize, window: Duration, call: F) -> f64
where
    F: Fn(Channel) -> Fut + Send + Sync + Copy + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let mut channels = Vec::new();
    for _ in 0..clients {
        channels.push(client::connect(address).await.unwrap());
    }
    let deadline = Instant::now() + window;
    let start = Instant::now();
    let tasks: Vec<_> = channels
        .into_iter()
        .map(|channel| {
            tokio::spawn(async move {
                let mut n = 0u64;
                while Instant::now() < deadline {
                    call(channel.clone()).await;
                    n += 1;
                }
                n
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    total as f64 / start.elapsed().as_secs_f64()
}

pub async fn run(scale: Scale) -> Vec<Row> {
    let n = scale.pick(2_000, 20);
    let window = scale.pick(Duration::from_secs(2), Duration::from_millis(100));
    let dir = tempfile::tempdir().unwrap();
    let store = Store::memory();
    let issuer: Arc<dyn Issuer> = Arc::new(common::issuer(IDENTITY, store.clone()).await);
    let settings = JoinSettings {
        method: JoinMethod::Token,
        token: "bench-token".into(),
        ttl: Duration::from_secs(3600),
        renewal_interval: Duration::from_secs(1200),
    };
    let agent = Arc::new(Agent::start(issuer, settings, store, Default::default()).await.unwrap());
    let minted = agent.clone();
    let (_stop_tx, stop) = tokio::sync::watch::channel(false);

    // The Workload API, attested, on one socket; the floor (health only, no attestation) on another.
    let api_path = dir.path().join("workload.sock");
    let config = ServiceConfig {
        selector: IdentitySelector::Name("svc".into()),
        ttl: Duration::from_secs(3600),
    };
    let (config_tx, config_rx) = tokio::sync::watch::channel(config);
    let api = WorkloadApi::new(agent, config_rx, stop, Default::default());
    let attest = tokio::sync::watch::channel(Default::default()).1;
    let incoming = incoming_unix(bind_unix(&api_path).unwrap(), attest, Default::default());
    tokio::spawn(
        Server::builder()
            .add_service(SpiffeWorkloadApiServer::new(api))
            .serve_with_incoming(incoming),
    );
    let floor_path = dir.path().join("floor.sock");
    let floor_listener = tokio::net::UnixListener::bind(&floor_path).unwrap();
    let (_health, health_service) = tonic_health::server::health_reporter();
    tokio::spawn(
        Server::builder()
            .add_service(health_service)
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(floor_listener)),
    );
    let api_address = format!("unix://{}", api_path.display());
    let floor_address = format!("unix://{}", floor_path.display());

    // Keep one stream open so the identity stays cached, as it is for a running workload.
    let keeper = client::connect(&api_address).await.unwrap();
    let mut keeper_api = SpiffeWorkloadApiClient::new(keeper.clone());
    let mut kept = keeper_api
        .fetch_x509svid(client::request(X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    let prepared = kept.next().await.unwrap().unwrap();
    let bare_path = dir.path().join("bare.sock");
    let bare_listener = tokio::net::UnixListener::bind(&bare_path).unwrap();
    tokio::spawn(
        Server::builder()
            .add_service(SpiffeWorkloadApiServer::new(Bare(prepared)))
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(bare_listener)),
    );
    let bare_address = format!("unix://{}", bare_path.display());
    let _ = KeyPair::generate().unwrap().subject_public_key_info(); // warm the crypto provider

    let api_channel = client::connect(&api_address).await.unwrap();
    let floor_channel = client::connect(&floor_address).await.unwrap();
    let svid = latencies(&api_channel, n, first_svid).await;
    let bare = latencies(&floor_channel, n, health_check).await;

    let mut rows = Vec::new();
    for (label, p) in [("p50", 0.50), ("p99", 0.99)] {
        rows.push(Row::duration(
            "api",
            format!("`FetchX509SVID` first message, cached identity, {label} ({n} calls)"),
            percentile(&svid, p),
            "bare tonic unary call (`Health/Check`), same socket kind",
            percentile(&bare, p),
        ));
    }
    for clients in scale.pick(vec![1, 16, 256], vec![1, 16]) {
        let opens = rate(&api_address, clients, window, first_svid).await;
        let calls = rate(&floor_address, clients, window, health_check).await;
        let bare_opens = rate(&bare_address, clients, window, first_svid).await;
        rows.push(Row::rate(
            "api",
            format!("`FetchX509SVID` stream opens, {clients} concurrent client(s)"),
            opens,
            "bare tonic unary calls, same concurrency",
            calls,
        ));
        rows.push(Row::rate(
            "api",
            format!("`FetchX509SVID` stream opens, {clients} concurrent client(s)"),
            opens,
            "bare tonic `FetchX509SVID`: the same message prepared, the stream left open",
            bare_opens,
        ));
    }

    // A burst of reconnections: `burst` workloads connect at once (as after an agent restart or a
    // node drain), each timed from its connect to its first message; attestation runs for each.
    let burst = scale.pick(1_000, 20);
    let attested = reconnection_burst(&api_address, burst).await;
    let bare_burst = reconnection_burst(&bare_address, burst).await;
    rows.push(Row::duration(
        "api",
        format!(
            "`FetchX509SVID` first message during a burst of {} new connections at once, p99",
            crate::thousands(burst as f64)
        ),
        percentile(&attested, 0.99),
        "the same burst against a bare tonic `FetchX509SVID` (the message prepared, no attestation)",
        percentile(&bare_burst, 0.99),
    ));

    // One workload fetching once, again and again, each time on a new connection. The identity
    // the kept stream holds is dropped first, so that the first of these fetches mints.
    drop(kept);
    drop(keeper_api);
    drop(keeper);
    let fetches = scale.pick(1_000, 20);
    let before = minted.cache.issued();
    let other_ttl = ServiceConfig {
        selector: IdentitySelector::Name("svc".into()),
        ttl: Duration::from_secs(1800),
    };
    config_tx.send_replace(other_ttl);
    for _ in 0..fetches {
        first_svid(client::connect(&api_address).await.unwrap()).await;
    }
    rows.push(Row::cost(
        "api",
        format!(
            "X509-SVIDs minted for {} one-shot fetches by one workload, one after the other",
            crate::thousands(fetches as f64)
        ),
        (minted.cache.issued() - before) as f64,
        Unit::Count,
        "one",
        1.0,
    ));
    rows
}
