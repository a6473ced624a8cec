//! The store conformance suite: every backend of the issuer's store (`memory`, `directory`, and a
//! real 3-member etcd cluster) must behave the same on conditional creates, compare-and-swap,
//! concurrent writers, watch order, replay from a revision, compaction and leases.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::etcd::EtcdCluster;
use tbot::error::Explain;
use tbot::kv::{Condition, EtcdSettings, EtcdTls, Event, Kv, MemoryKv, Op, SharedKv, connect_etcd};
use tbot::store::{Store, StoreError};

async fn next_batch(rx: &mut tokio::sync::mpsc::Receiver<tbot::kv::WatchItem>) -> Result<Vec<Event>, StoreError> {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("a watch message within 10 s")
        .expect("the watch is open")
}

async fn value(kv: &SharedKv, key: &str) -> Option<Vec<u8>> {
    kv.get(key).await.unwrap().map(|e| e.value)
}

async fn conditional_create(kv: &SharedKv, p: &str) {
    let key = format!("{p}/create");
    let (created, revision) = kv
        .txn(vec![Condition::Absent(key.clone())], vec![Op::put(&key, "one")])
        .await
        .unwrap();
    assert!(created);
    let entry = kv.get(&key).await.unwrap().unwrap();
    assert_eq!((entry.create_revision, entry.mod_revision), (revision, revision));
    let (again, _) = kv
        .txn(vec![Condition::Absent(key.clone())], vec![Op::put(&key, "two")])
        .await
        .unwrap();
    assert!(!again, "a second create of the same key must fail");
    assert_eq!(value(kv, &key).await.unwrap(), b"one");
    let (present, _) = kv
        .txn(
            vec![Condition::Present(key.clone())],
            vec![Op::put(format!("{p}/other"), "x")],
        )
        .await
        .unwrap();
    assert!(present);
    let (missing, _) = kv
        .txn(
            vec![Condition::Present(format!("{p}/none"))],
            vec![Op::put(format!("{p}/other"), "y")],
        )
        .await
        .unwrap();
    assert!(!missing);
    assert_eq!(
        value(kv, &format!("{p}/other")).await.unwrap(),
        b"x",
        "a failed txn writes nothing"
    );
}

async fn compare_and_swap(kv: &SharedKv, p: &str) {
    let key = format!("{p}/cas");
    let (created, _) = kv
        .txn(vec![Condition::ModRevision(key.clone(), 0)], vec![Op::put(&key, "v1")])
        .await
        .unwrap();
    assert!(created, "mod_revision 0 means absent");
    let seen = kv.get(&key).await.unwrap().unwrap();
    let swap = |v: &'static str| {
        kv.txn(
            vec![Condition::ModRevision(key.clone(), seen.mod_revision)],
            vec![Op::put(&key, v)],
        )
    };
    assert!(swap("v2").await.unwrap().0);
    assert!(!swap("v3").await.unwrap().0, "a stale revision must not swap");
    let now = kv.get(&key).await.unwrap().unwrap();
    assert_eq!(now.value, b"v2");
    assert_eq!(now.create_revision, seen.create_revision);
    assert!(now.mod_revision > seen.mod_revision);
    // Several keys in one transaction: all or nothing.
    let (both, _) = kv
        .txn(
            vec![
                Condition::ModRevision(key.clone(), now.mod_revision),
                Condition::Absent(format!("{p}/cas2")),
            ],
            vec![
                Op::put(&key, "v4"),
                Op::put(format!("{p}/cas2"), "w"),
                Op::Delete(format!("{p}/create")),
            ],
        )
        .await
        .unwrap();
    assert!(both);
    assert_eq!(value(kv, &key).await.unwrap(), b"v4");
    assert_eq!(value(kv, &format!("{p}/cas2")).await.unwrap(), b"w");
}

async fn concurrent_creates(kv: &SharedKv, p: &str) {
    let key = format!("{p}/race");
    let tasks: Vec<_> = (0..32)
        .map(|i| {
            let (kv, key) = (kv.clone(), key.clone());
            tokio::spawn(async move {
                kv.txn(
                    vec![Condition::Absent(key.clone())],
                    vec![Op::put(&key, format!("writer {i}"))],
                )
                .await
                .unwrap()
                .0
            })
        })
        .collect();
    let mut winners = 0;
    for t in tasks {
        winners += t.await.unwrap() as usize;
    }
    assert_eq!(winners, 1, "exactly one of 32 concurrent creates wins");
}

async fn watch_order_and_replay(kv: &SharedKv, p: &str) {
    let dir = format!("{p}/watched/");
    let (_, start) = kv.list(&dir).await.unwrap();
    let mut live = kv.watch(&dir, start + 1).await.unwrap();
    let mut written = Vec::new();
    for i in 0..5 {
        let (_, revision) = kv
            .txn(vec![], vec![Op::put(format!("{dir}k{}", i % 2), format!("{i}"))])
            .await
            .unwrap();
        written.push(revision);
        kv.txn(vec![], vec![Op::put(format!("{p}/unwatched"), "x")])
            .await
            .unwrap();
    }
    let (_, delete_revision) = kv.txn(vec![], vec![Op::Delete(format!("{dir}k0"))]).await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < 6 {
        for event in next_batch(&mut live).await.unwrap() {
            assert!(event.key().starts_with(&dir), "{event:?} is outside the prefix");
            seen.push(event);
        }
    }
    let revisions: Vec<i64> = seen.iter().map(Event::revision).collect();
    let mut expected = written.clone();
    expected.push(delete_revision);
    assert_eq!(revisions, expected, "events arrive once each, in revision order");
    assert!(matches!(&seen[5], Event::Delete { key, .. } if key == &format!("{dir}k0")));
    match &seen[4] {
        Event::Put(entry) => assert_eq!(
            (entry.key.as_str(), entry.value.as_slice()),
            (format!("{dir}k0").as_str(), b"4".as_slice())
        ),
        other => panic!("{other:?}"),
    }
    // Replay: a watch from the third write sees it and everything after, in order.
    let mut replay = kv.watch(&dir, written[2]).await.unwrap();
    let mut replayed = Vec::new();
    while replayed.len() < 4 {
        replayed.extend(next_batch(&mut replay).await.unwrap().iter().map(Event::revision));
    }
    assert_eq!(replayed, expected[2..]);
}

async fn compaction(kv: &SharedKv, p: &str) {
    let key = format!("{p}/compacted/k");
    let (_, old) = kv.txn(vec![], vec![Op::put(&key, "1")]).await.unwrap();
    let (_, newer) = kv.txn(vec![], vec![Op::put(&key, "2")]).await.unwrap();
    kv.compact(newer).await.unwrap();
    let mut rx = kv.watch(&format!("{p}/compacted/"), old).await.unwrap();
    match next_batch(&mut rx).await {
        Err(StoreError::Compacted { revision }) => assert!(revision >= newer, "{revision} < {newer}"),
        other => panic!("a watch from before the compaction must fail as compacted, got {other:?}"),
    }
    // After listing again, watching from the list's revision works.
    let (entries, at) = kv.list(&format!("{p}/compacted/")).await.unwrap();
    assert_eq!(entries[0].value, b"2");
    let mut rx = kv.watch(&format!("{p}/compacted/"), at + 1).await.unwrap();
    let (_, third) = kv.txn(vec![], vec![Op::put(&key, "3")]).await.unwrap();
    assert_eq!(next_batch(&mut rx).await.unwrap()[0].revision(), third);
}

async fn wait_gone(kv: &SharedKv, key: &str, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if kv.get(key).await.unwrap().is_none() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

async fn leases(kv: &SharedKv, p: &str) {
    let key = format!("{p}/leased");
    let lease = kv.grant(Duration::from_secs(2)).await.unwrap();
    kv.txn(
        vec![],
        vec![Op::Put {
            key: key.clone(),
            value: b"alive".to_vec(),
            lease,
        }],
    )
    .await
    .unwrap();
    assert_eq!(kv.get(&key).await.unwrap().unwrap().lease, lease);
    let (_, from) = kv.list(&key).await.unwrap();
    let mut rx = kv.watch(&key, from + 1).await.unwrap();
    // Kept alive past its ttl, it stays.
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        kv.keep_alive(lease).await.unwrap();
    }
    assert!(
        kv.get(&key).await.unwrap().is_some(),
        "a kept-alive lease keeps its key"
    );
    // Left alone, it expires and takes the key with it; the watch sees the delete.
    assert!(
        wait_gone(kv, &key, Duration::from_secs(15)).await,
        "the key outlived its lease"
    );
    assert!(matches!(&next_batch(&mut rx).await.unwrap()[0], Event::Delete { .. }));
    let expired = kv.keep_alive(lease).await;
    assert!(matches!(expired, Err(StoreError::LeaseExpired { .. })), "{expired:?}");
    // Revoked: gone at once.
    let lease = kv.grant(Duration::from_secs(30)).await.unwrap();
    kv.txn(
        vec![],
        vec![Op::Put {
            key: key.clone(),
            value: b"again".to_vec(),
            lease,
        }],
    )
    .await
    .unwrap();
    kv.revoke(lease).await.unwrap();
    assert!(wait_gone(kv, &key, Duration::from_secs(2)).await);
}

async fn suite(kv: SharedKv) {
    let p = format!("conformance-{}", std::process::id());
    conditional_create(&kv, &p).await;
    compare_and_swap(&kv, &p).await;
    concurrent_creates(&kv, &p).await;
    watch_order_and_replay(&kv, &p).await;
    compaction(&kv, &p).await;
    leases(&kv, &p).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_backend_conforms() {
    suite(Arc::new(MemoryKv::new())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_directory_backend_conforms_and_keeps_its_keys_across_opens() {
    let dir = tempfile::tempdir().unwrap();
    let kv = MemoryKv::directory(Store::open(dir.path()).unwrap(), "issuer/").unwrap();
    suite(Arc::new(kv)).await;
    {
        let kv = MemoryKv::directory(Store::open(dir.path()).unwrap(), "issuer/").unwrap();
        kv.txn(
            vec![],
            vec![
                Op::put("issuer/x/ca-1.key", "secret"),
                Op::put("issuer/x/bots/b@1.json", "{}"),
            ],
        )
        .await
        .unwrap();
        kv.txn(vec![], vec![Op::put("issuer/x/tokens/t.json", "{}")])
            .await
            .unwrap();
        kv.txn(vec![], vec![Op::Delete("issuer/x/tokens/t.json".into())])
            .await
            .unwrap();
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join("issuer/x/ca-1.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "private keys are 0600 on disk");
    let kv = MemoryKv::directory(Store::open(dir.path()).unwrap(), "issuer/").unwrap();
    let (entries, revision) = kv.list("issuer/").await.unwrap();
    let keys: Vec<&str> = entries.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(keys, ["issuer/x/bots/b@1.json", "issuer/x/ca-1.key"]);
    assert_eq!(kv.get("issuer/x/ca-1.key").await.unwrap().unwrap().value, b"secret");
    // History from before the open cannot be replayed: a watch from there is told to list again.
    let mut rx = kv.watch("issuer/", 1).await.unwrap();
    assert!(matches!(next_batch(&mut rx).await, Err(StoreError::Compacted { .. })));
    assert!(kv.watch("issuer/", revision + 1).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_member_etcd_cluster_conforms() {
    let Some(cluster) = EtcdCluster::start(3) else { return };
    let settings = EtcdSettings {
        endpoints: cluster.endpoints(),
        prefix: "/tbot-conformance".into(),
        tls: None,
    };
    let kv = connect_etcd(&settings).await.unwrap();
    assert!(kv.describe().contains(&cluster.endpoints()[0]), "{}", kv.describe());
    suite(Arc::new(kv)).await;
    // The prefix is where the keys live.
    assert!(
        cluster
            .get_prefix("/tbot-conformance/conformance-")
            .iter()
            .any(|(k, _)| k.ends_with("/cas"))
    );
}

/// Certificates made with openssl: a CA, a server certificate for 127.0.0.1, a client certificate.
fn etcd_certificates(dir: &std::path::Path) {
    let path = |name: &str| dir.join(name).display().to_string();
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    common::openssl(
        &[
            &["req", "-x509"][..],
            &ec,
            &[
                "-keyout",
                &path("ca.key"),
                "-out",
                &path("ca.pem"),
                "-subj",
                "/CN=etcd test CA",
                "-days",
                "2",
            ],
        ]
        .concat(),
    );
    for (name, ext) in [
        ("server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth"),
        ("client", "extendedKeyUsage=clientAuth"),
    ] {
        let ext_file = path(&format!("{name}.ext"));
        std::fs::write(&ext_file, ext).unwrap();
        common::openssl(
            &[
                &["req", "-new"][..],
                &ec,
                &[
                    "-keyout",
                    &path(&format!("{name}.key")),
                    "-out",
                    &path(&format!("{name}.csr")),
                    "-subj",
                    &format!("/CN=tbot-{name}"),
                ],
            ]
            .concat(),
        );
        common::openssl(&[
            "x509",
            "-req",
            "-in",
            &path(&format!("{name}.csr")),
            "-CA",
            &path("ca.pem"),
            "-CAkey",
            &path("ca.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &ext_file,
            "-out",
            &path(&format!("{name}.pem")),
        ]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_over_client_tls_conforms_and_refuses_a_client_without_a_certificate() {
    let certs = tempfile::tempdir().unwrap();
    etcd_certificates(certs.path());
    let Some(cluster) = EtcdCluster::start_with(1, Some(certs.path().to_owned())) else {
        return;
    };
    let file = |name: &str| Some(certs.path().join(name));
    let settings = EtcdSettings {
        endpoints: cluster.endpoints(),
        prefix: "/tbot-tls".into(),
        tls: Some(EtcdTls {
            ca_file: file("ca.pem"),
            cert_file: file("client.pem"),
            key_file: file("client.key"),
        }),
    };
    assert!(settings.endpoints[0].starts_with("https://"));
    let kv: SharedKv = Arc::new(connect_etcd(&settings).await.unwrap());
    conditional_create(&kv, "tls").await;
    watch_order_and_replay(&kv, "tls").await;
    // Without a client certificate etcd refuses the connection: a store error, not a hang.
    let anonymous = EtcdSettings {
        tls: Some(EtcdTls {
            ca_file: file("ca.pem"),
            cert_file: None,
            key_file: None,
        }),
        ..settings
    };
    let err = connect_etcd(&anonymous).await.unwrap().get("k").await.unwrap_err();
    assert!(err.to_string().contains("the store (etcd https://127.0.0.1:"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_cluster_without_quorum_fails_calls_naming_the_store_then_recovers() {
    let Some(mut cluster) = EtcdCluster::start(3) else {
        return;
    };
    let settings = EtcdSettings {
        endpoints: cluster.endpoints(),
        prefix: "/tbot-quorum".into(),
        tls: None,
    };
    let kv = connect_etcd(&settings).await.unwrap();
    kv.txn(vec![], vec![Op::put("k", "1")]).await.unwrap();
    // One member down: still a quorum. If it was the leader, calls fail until the others elect a
    // new one (an election, well under the deadline below even on a loaded machine).
    cluster.kill_member(0);
    let deadline = Instant::now() + Duration::from_secs(20);
    while let Err(e) = kv.txn(vec![], vec![Op::put("k", "2")]).await {
        assert!(
            Instant::now() < deadline,
            "one member down, and still no write after 20 s: {e}"
        );
    }
    cluster.kill_member(1);
    let err = kv.txn(vec![], vec![Op::put("k", "3")]).await.unwrap_err();
    assert!(err.is_transient());
    let message = err.to_string();
    assert!(message.contains("the store (etcd http://127.0.0.1:"), "{message}");
    cluster.start_member(0);
    cluster.start_member(1);
    cluster.wait_healthy();
    // Recovered: a write and then a read of it go through (restarted members may still be
    // catching up for a moment; that is what the deadline allows for).
    let deadline = Instant::now() + Duration::from_secs(30);
    let read = loop {
        let attempt = async {
            kv.txn(vec![], vec![Op::put("k", "4")]).await?;
            kv.get("k").await
        };
        match attempt.await {
            Ok(read) => break read,
            Err(e) => assert!(Instant::now() < deadline, "no recovery after quorum returned: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(read.expect("the key written").value, b"4");
}
