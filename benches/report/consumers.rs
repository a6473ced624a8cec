//! The consumers that do not speak the Workload API:
//! - Envoy SDS: the first secret on a new connection (`StreamSecrets` for `default`, a cached
//!   identity), beside `FetchX509SVID`'s first message on the same daemon, timed the same way;
//! - file outputs: a rotation's files replaced (four atomic replacements: temp file, fsync, rename,
//!   fsync of the directory) and the `on_update` hook run (`exec: [true]`), p99, beside the same
//!   four files written in place (`O_TRUNC`, no fsync, as Teleport's tbot and spiffe-helper do) and
//!   the same hook.

use std::time::{Duration, Instant};

use tbot::workload_api::client;
use tbot::workload_api::sds::proto::DiscoveryRequest;
use tbot::workload_api::sds::proto::secret_discovery_service_client::SecretDiscoveryServiceClient;
use tokio_stream::StreamExt;

use crate::{Row, Scale, common, percentile};

const SECTION: &str = "consumers";

pub async fn run(scale: Scale) -> Vec<Row> {
    let mut rows = first_secret(scale).await;
    rows.extend(output_rotation(scale).await);
    rows
}

async fn first_secret(scale: Scale) -> Vec<Row> {
    let daemon = crate::daemon::LocalDaemon::start().await;
    let n = scale.pick(500, 20);
    // The first of each issues the SVID (or finds it): not counted.
    first_secrets(&daemon.address, 1).await;
    let sds = first_secrets(&daemon.address, n).await;
    common::first_messages(&daemon.address, 1).await;
    let api = common::first_messages(&daemon.address, n).await;
    vec![Row::duration(
        SECTION,
        format!("SDS first secret after connect, cached identity, p50 ({n} connections)"),
        percentile(&sds, 0.5),
        "`FetchX509SVID` first message after connect, same daemon, p50",
        percentile(&api, 0.5),
    )]
}

/// `n` new connections at `address`, each timed from connected to the first `StreamSecrets`
/// response for `default`; sorted.
async fn first_secrets(address: &str, n: usize) -> Vec<Duration> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let channel = client::connect(address).await.unwrap();
        let started = Instant::now();
        let mut stream = SecretDiscoveryServiceClient::new(channel)
            .stream_secrets(tokio_stream::once(DiscoveryRequest {
                resource_names: vec!["default".into()],
                type_url: tbot::workload_api::sds::SECRET_TYPE.into(),
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner();
        let first = stream.next().await.unwrap().unwrap();
        assert_eq!(first.resources.len(), 1);
        out.push(started.elapsed());
    }
    out.sort();
    out
}

async fn output_rotation(scale: Scale) -> Vec<Row> {
    use tbot::resource::agent::{Destination, DestinationType, OnUpdate};
    let dir = tempfile::tempdir().unwrap();
    let destination = Destination {
        kind: DestinationType::Directory,
        path: dir.path().join("out"),
        owner: None,
        group: None,
        mode: None,
    };
    let hook = OnUpdate {
        signal: None,
        pid_file: None,
        exec: vec!["true".into()],
        timeout: None,
    };
    let n = scale.pick(300, 10);
    let materials: Vec<_> = (0..n).map(|_| material()).collect();
    let bundles = tbot::issuer::Bundles {
        trust_domain: "bench.example.org".into(),
        x509_authorities: vec![material().svid.certificate],
        jwt_keys: vec![],
        sequence: 1,
        ..Default::default()
    };
    let (mut atomic, mut in_place) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let plain = dir.path().join("plain");
    std::fs::create_dir(&plain).unwrap();
    for m in &materials {
        let started = Instant::now();
        tbot::agent::outputs::write_x509(&destination, m, &bundles, false).unwrap();
        tbot::agent::outputs::run_hook(&hook).await.unwrap();
        atomic.push(started.elapsed());
        let started = Instant::now();
        let key = tbot::pem::private_key(&m.key);
        let cert = tbot::pem::certificates([&m.svid.certificate]);
        for (name, text) in [
            ("svid_key.pem", key.clone()),
            ("svid.pem", cert.clone()),
            ("svid_bundle.pem", tbot::pem::certificates(&bundles.x509_authorities)),
            ("credential-bundle.private-key.pem", format!("{key}{cert}")),
        ] {
            std::fs::write(plain.join(name), text).unwrap();
        }
        tbot::agent::outputs::run_hook(&hook).await.unwrap();
        in_place.push(started.elapsed());
    }
    atomic.sort();
    in_place.sort();
    let p99 = |v: &[Duration]| percentile(v, 0.99);
    vec![Row::duration(
        SECTION,
        format!("x509 output rotation: 4 files replaced atomically + `on_update` exec, p99 ({n} rotations)"),
        p99(&atomic),
        "the same 4 files written in place (no temp, no fsync) + the same hook, p99",
        p99(&in_place),
    )]
}

fn material() -> tbot::agent::X509Material {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["bench.local".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    tbot::agent::X509Material {
        svid: tbot::issuer::X509Svid {
            identity: "bench".into(),
            spiffe_id: "spiffe://bench.example.org/bench".into(),
            hint: None,
            certificate: cert.der().to_vec(),
            not_after: time::OffsetDateTime::now_utc(),
        },
        key: key.serialize_der(),
        signer: String::new(),
        tainted: false,
    }
}
