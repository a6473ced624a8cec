//! Replicas on etcd against one issuer on a storage directory: token joins per second and remote
//! issuance per second (the same clients, the same load), and renewal latency through haproxy while
//! a replica is SIGKILLed. Needs Debian's etcd and haproxy (skipped with a note without them).

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rcgen::{KeyPair, PublicKeyData, SigningKey};
use tbot::agent::remote::{RemoteIssuer, RemoteSettings};
use tbot::error::Explain;
use tbot::issuer::{Issuer, RenewRequest};
use tbot::store::Store;

use crate::etcd::EtcdCluster;
use crate::fleet::{IssuerHost, SimAgent, issue, join_at, spread, token_join};
use crate::{Row, Scale, haproxy, percentile};

const HOUR: Duration = Duration::from_secs(3600);
/// Tokens `agent-0..` are taken in ranges: issuance agents, renewing bots, then joins.
const ISSUERS: usize = 16;
const RENEWERS: usize = 16;
const FIRST_JOIN: usize = ISSUERS + 2 * RENEWERS;

/// `settings` with a source address of its own per simulated host (the per-address join limit).
fn client(settings: RemoteSettings, i: usize) -> Arc<RemoteIssuer> {
    let issuer = RemoteIssuer::new(settings, Store::memory(), &Default::default()).unwrap();
    issuer.set_local_address(std::net::IpAddr::from([127, 2, (i / 250) as u8, (i % 250 + 1) as u8]));
    issuer
}

/// (token joins/s, X509-SVIDs/s) against `addresses`, round robin.
async fn measure(host: &IssuerHost, addresses: &[String], joins: usize, n: usize) -> (f64, f64) {
    let settings: Vec<RemoteSettings> = addresses.iter().map(|a| host.settings_for(a)).collect();
    let all = Arc::new(settings.clone());
    let join_time = spread(joins, 32, move |i| {
        let settings = all[i % all.len()].clone();
        async move {
            let key = KeyPair::generate().unwrap();
            client(settings, FIRST_JOIN + i)
                .join(token_join(&key, format!("agent-{}", FIRST_JOIN + i)))
                .await
                .unwrap();
        }
    })
    .await;
    let mut agents: Vec<Arc<SimAgent>> = Vec::new();
    for i in 0..ISSUERS {
        agents.push(Arc::new(join_at(settings[i % settings.len()].clone(), i).await));
    }
    let agents = Arc::new(agents);
    let issue_time = spread(n, 64, move |i| {
        let agents = agents.clone();
        async move { issue(&agents[i % agents.len()], 1000 + i as u32).await }
    })
    .await;
    (
        joins as f64 / join_time.as_secs_f64(),
        n as f64 / issue_time.as_secs_f64(),
    )
}

/// Renewal latencies of bots `first..first+RENEWERS` renewing back to back through `settings` for
/// `window`; each renewal is retried until it is signed and timed from its first attempt. With
/// `kill`, that process is SIGKILLed a third of the way in.
async fn renewals(settings: RemoteSettings, first: usize, window: Duration, kill: Option<u32>) -> Vec<Duration> {
    let mut bots = Vec::new();
    for i in first..first + RENEWERS {
        bots.push(join_at(settings.clone(), i).await);
    }
    let deadline = Instant::now() + window;
    if let Some(pid) = kill {
        tokio::spawn(async move {
            tokio::time::sleep(window / 3).await;
            let _ = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status();
        });
    }
    let tasks: Vec<_> = bots
        .into_iter()
        .map(|bot| {
            tokio::spawn(async move {
                let SimAgent {
                    issuer,
                    mut certificate,
                    mut key,
                    ..
                } = bot;
                let mut latencies = Vec::new();
                while Instant::now() < deadline {
                    let next = KeyPair::generate().unwrap();
                    let public_key = next.subject_public_key_info();
                    let request = RenewRequest {
                        certificate: certificate.clone(),
                        proof: key.sign(&public_key).unwrap(),
                        public_key,
                        ttl: HOUR,
                        address: String::new(),
                    };
                    let started = Instant::now();
                    let renewed = loop {
                        match issuer.renew(request.clone()).await {
                            Ok(renewed) => break renewed,
                            Err(e) if e.is_transient() => tokio::time::sleep(Duration::from_millis(20)).await,
                            Err(e) => panic!("a renewal was refused: {e}"),
                        }
                    };
                    latencies.push(started.elapsed());
                    issuer.present(&renewed.der, &next.serialize_der());
                    (certificate, key) = (renewed.der, next);
                }
                latencies
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort();
    all
}

pub async fn run(scale: Scale) -> Vec<Row> {
    let joins = scale.pick(1_000, 30);
    let n = scale.pick(4_000, 40);
    let tokens = FIRST_JOIN + joins;
    let single = IssuerHost::start_with(tokens, "single", "{type: directory, path: DIR/state}").await;
    let (dir_joins, dir_issued) = measure(&single, std::slice::from_ref(&single.address), joins, n).await;
    drop(single);

    let Some(etcd) = EtcdCluster::start(3) else {
        eprintln!("ha: etcd is not installed; the section is skipped");
        return Vec::new();
    };
    let keys = tempfile::tempdir().unwrap();
    let kek = keys.path().join("issuer.kek");
    let mut bytes = [0u8; 32];
    aws_lc_rs::rand::fill(&mut bytes).unwrap();
    std::fs::write(&kek, bytes).unwrap();
    std::fs::set_permissions(&kek, std::fs::Permissions::from_mode(0o600)).unwrap();
    let storage = format!(
        "{{type: etcd, endpoints: {}, prefix: /bench, key_encryption_key_file: {}}}",
        etcd.endpoints_yaml(),
        kek.display()
    );
    let mut replicas = Vec::new();
    for i in 0..3 {
        replicas.push(IssuerHost::start_with(tokens, &format!("replica-{}", i + 1), &storage).await);
    }
    let addresses: Vec<String> = replicas.iter().map(|r| r.address.clone()).collect();
    let (etcd_joins, etcd_issued) = measure(&replicas[0], &addresses, joins, n).await;
    let mut rows = vec![
        Row::rate(
            "ha",
            format!("token joins, 3 replicas on a 3-member etcd (round robin, 32 in flight; {joins})"),
            etcd_joins,
            "one issuer on a storage directory, same load",
            dir_joins,
        ),
        Row::rate(
            "ha",
            format!("X509-SVIDs through the issuer API, 3 replicas on etcd (16 agents, 64 in flight; {n})"),
            etcd_issued,
            "one issuer on a storage directory, same load",
            dir_issued,
        ),
    ];
    let lb = crate::etcd::free_ports(1)[0];
    let ports: Vec<u16> = replicas.iter().map(|r| r.port).collect();
    let Some(_balancer) = haproxy::start(lb, &ports, false) else {
        return rows;
    };
    let through = replicas[0].settings_for(&format!("127.0.0.1:{lb}"));
    let window = Duration::from_secs(scale.pick(9, 3));
    let quiet = renewals(through.clone(), ISSUERS, window, None).await;
    let killed = renewals(through, ISSUERS + RENEWERS, window, Some(replicas[1].child.id())).await;
    assert!(
        replicas[1].child.try_wait().unwrap().is_some(),
        "replica-2 was SIGKILLed during the window"
    );
    rows.push(Row::duration(
        "ha",
        format!(
            "bot renewal p99 through haproxy while a replica is SIGKILLed ({RENEWERS} bots back to back, \
             retried until signed; {} renewals, max {:.0} ms)",
            killed.len(),
            killed.last().unwrap().as_secs_f64() * 1e3
        ),
        percentile(&killed, 0.99),
        "the same with every replica up",
        percentile(&quiet, 0.99),
    ));
    rows
}
