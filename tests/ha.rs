//! A highly available issuer: three replicas (real `tbot start` processes) on one real 3-member
//! etcd cluster, sharing one CA sealed with one key encryption key; races across replicas; agents
//! behind haproxy surviving the loss of a replica and of etcd's quorum.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::fleet::{agent_config, start_agent, token_onboarding, wait_for_socket, wait_for_status};
use common::ha::{Replicas, issuer_document, write_kek};
use common::{Daemon, copy_manifests, renewal, save, stdout, token_join};
use rcgen::{KeyPair, PublicKeyData};
use tbot::agent::remote::{RemoteIssuer, RemoteSettings};
use tbot::error::Explain;
use tbot::issuer::{Attributes, Issuer, IssuerError, X509Request};
use tbot::store::Store;

const TOKEN: &str = "fleet-token-change-me";
const HOUR: Duration = Duration::from_secs(3600);

fn pin(status: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CA pin: "))
        .unwrap_or_else(|| panic!("no CA pin in:\n{status}"))
        .to_owned()
}

fn client(address: String, pin: &str) -> Arc<RemoteIssuer> {
    let settings = RemoteSettings {
        address,
        ca_pins: vec![pin.to_owned()],
        ca_path: None,
        insecure: false,
    };
    RemoteIssuer::new(settings, Store::memory(), &Default::default()).unwrap()
}

/// An X509-SVID request of the test workload (uid 1000) with a new key, by the bot holding `bot`.
fn svid_request(bot: &[u8]) -> X509Request {
    let mut workload = Attributes::new();
    workload.set("workload.unix.uid", 1000);
    X509Request {
        bot_certificate: bot.to_vec(),
        identity: "example-workload-identity".into(),
        workload,
        public_key: KeyPair::generate().unwrap().subject_public_key_info(),
        ttl: HOUR,
    }
}

/// The PKCS#8 header of an EC P-256 private key (SEQUENCE, version 0, id-ecPublicKey): a
/// plaintext CA or JWT key in etcd would contain it.
const PKCS8_EC: &[u8] = &[
    0x02, 0x01, 0x00, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01,
];

#[test]
fn three_replicas_started_at_once_share_one_ca_sealed_in_etcd_and_show_document_drift() {
    let Some(set) = Replicas::start(3) else { return };
    let statuses: Vec<String> = (0..3).map(|i| set.status(i)).collect();
    let pins: Vec<String> = statuses.iter().map(|s| pin(s)).collect();
    assert!(pins.iter().all(|p| *p == pins[0]), "one CA for every replica: {pins:?}");
    // Every replica lists all three, ready, and no drift.
    let status = wait_for_status(&set.get(0).daemon, "three replicas listed", |s| {
        s.contains("replicas: 3") && s.contains("documents: the same on every replica")
    });
    for i in 1..=3 {
        assert!(status.contains(&format!("replica-{i}")), "{status}");
    }
    assert!(status.contains("replica-1 (this)"), "{status}");
    assert!(status.contains("issuer storage: etcd http://127.0.0.1:"), "{status}");
    // etcd holds the CA and JWT keys sealed: no plaintext PKCS#8 anywhere under the prefix.
    let stored = set.etcd.get_prefix("/tbot/");
    let keys: Vec<&(String, Vec<u8>)> = stored.iter().filter(|(k, _)| k.ends_with(".key")).collect();
    assert!(
        keys.len() >= 2,
        "the CA key and the JWT key are in etcd: {:?}",
        stored.iter().map(|(k, _)| k).collect::<Vec<_>>()
    );
    for (key, value) in &keys {
        assert!(value.starts_with(b"tbot-sealed-v1"), "{key} is not sealed");
    }
    for (key, value) in &stored {
        assert!(
            !value.windows(PKCS8_EC.len()).any(|w| w == PKCS8_EC),
            "{key} holds a plaintext private key"
        );
    }
    // A rollout that reached one replica only shows as drift on every replica.
    let role = set.get(1).daemon.dir.path().join("etc/role.yaml");
    let text = std::fs::read_to_string(&role).unwrap();
    save(&role, &text.replace("- read", "- read\n          - create"));
    let edited = std::fs::read_to_string(&role).unwrap();
    assert_ne!(edited, text);
    let drift = wait_for_status(&set.get(2).daemon, "the drift is visible on replica-3", |s| {
        s.contains("documents that differ between replicas")
    });
    assert!(drift.contains("role/"), "{drift}");
    assert!(drift.contains("replica-2="), "{drift}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn joins_and_renewals_race_across_replicas_exactly_once() {
    let Some(set) = Replicas::start(3) else { return };
    let pin = pin(&set.status(0));
    let addresses: Vec<String> = (0..3).map(|i| format!("127.0.0.1:{}", set.get(i).port)).collect();
    // 64 joins with one single-use token, spread over the three replicas: exactly one joins.
    let joins: Vec<_> = (0..64)
        .map(|i| {
            let remote = client(addresses[i % 3].clone(), &pin);
            tokio::spawn(async move {
                let key = KeyPair::generate().unwrap();
                remote.join(token_join(&key, TOKEN)).await.map(|cert| (cert, key))
            })
        })
        .collect();
    let mut joined = Vec::new();
    let mut refusals = Vec::new();
    for j in joins {
        match j.await.unwrap() {
            Ok(done) => joined.push(done),
            Err(e) => refusals.push(e.to_string()),
        }
    }
    assert_eq!(joined.len(), 1, "exactly one join of a single-use token: {refusals:?}");
    assert!(refusals.iter().all(|r| r.contains("already used")), "{refusals:?}");
    let (first, k1) = joined.pop().unwrap();
    // Two renewals of one certificate at once, on two replicas: one wins, the copy is caught.
    let (a, b) = (client(addresses[1].clone(), &pin), client(addresses[2].clone(), &pin));
    a.present(&first.der, &k1.serialize_der());
    b.present(&first.der, &k1.serialize_der());
    let (ka, kb) = (KeyPair::generate().unwrap(), KeyPair::generate().unwrap());
    let (ra, rb) = tokio::join!(
        a.renew(renewal(&first.der, &k1, &ka)),
        b.renew(renewal(&first.der, &k1, &kb))
    );
    let outcomes = [&ra, &rb];
    let won = outcomes.iter().filter(|r| r.is_ok()).count();
    assert_eq!(won, 1, "one of two parallel renewals wins: {ra:?} / {rb:?}");
    let lost = outcomes.iter().find_map(|r| r.as_ref().err()).unwrap();
    assert!(matches!(lost, IssuerError::Locked { .. }), "the copy is caught: {lost}");
    // The instance is locked on every replica: the winner's new certificate no longer issues.
    let winner = ra.as_ref().or(rb.as_ref()).unwrap();
    let winner_key = if ra.is_ok() { &ka } else { &kb };
    let c = client(addresses[0].clone(), &pin);
    c.present(&winner.der, &winner_key.serialize_der());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let issued = c.issue_x509(svid_request(&winner.der)).await;
        match issued {
            Err(IssuerError::Locked { .. }) => break,
            other => assert!(Instant::now() < deadline, "the lock did not reach replica-1: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_renewal_retried_on_another_replica_with_the_same_key_is_signed_again() {
    let Some(set) = Replicas::start(3) else { return };
    let pin = pin(&set.status(0));
    let on = |i: usize| client(format!("127.0.0.1:{}", set.get(i).port), &pin);
    let k1 = KeyPair::generate().unwrap();
    let first = on(0).join(token_join(&k1, TOKEN)).await.unwrap();
    // The same join retried on another replica with the same key (its answer was lost): the same
    // instance, signed again, not a second use of the token.
    let again = on(1).join(token_join(&k1, TOKEN)).await.unwrap();
    assert_eq!(again.instance, first.instance);
    // A renewal on replica-2 whose answer was lost, retried on replica-3 with the same key: signed
    // again at the same generation, not locked.
    let k2 = KeyPair::generate().unwrap();
    let (r2, r3) = (on(1), on(2));
    r2.present(&first.der, &k1.serialize_der());
    r3.present(&first.der, &k1.serialize_der());
    let renewed = r2.renew(renewal(&first.der, &k1, &k2)).await.unwrap();
    let retried = r3.renew(renewal(&first.der, &k1, &k2)).await.unwrap();
    assert_eq!((renewed.generation, retried.generation), (2, 2));
    // The next renewal from the new certificate moves on, on yet another replica.
    let k3 = KeyPair::generate().unwrap();
    let r1 = on(0);
    r1.present(&retried.der, &k2.serialize_der());
    let third = r1.renew(renewal(&retried.der, &k2, &k3)).await.unwrap();
    assert_eq!(third.generation, 3);
}

#[test]
fn a_replica_with_a_wrong_or_badly_kept_key_file_refuses_to_start_and_says_why() {
    let Some(set) = Replicas::start(1) else { return };
    let keys = tempfile::tempdir().unwrap();
    let run = |kek: &Path| {
        let (dir, _) = copy_manifests("manifests/fleet/issuer", &[]);
        let port = common::etcd::free_ports(1)[0];
        let doc = issuer_document("intruder", port, &[], &set.etcd.endpoints_yaml(), "/tbot", kek)
            .replace("DIR", &dir.path().display().to_string());
        std::fs::write(dir.path().join("etc/issuer.yaml"), doc).unwrap();
        let admin = dir.path().join("admin.sock");
        let mut daemon = Daemon::spawn(dir, admin, &[]);
        let status = daemon.wait();
        assert!(!status.success(), "it must refuse to start");
        daemon.log()
    };
    // Another key: the CA in etcd does not open with it.
    let other = keys.path().join("other.kek");
    write_kek(&other);
    let log = run(&other);
    assert!(
        log.contains("cannot open the sealed key `issuer/") && log.contains("key encryption key of ID"),
        "{log}"
    );
    assert!(log.contains("same `key_encryption_key_file`"), "{log}");
    // A hex-encoded key, and a key others can read.
    let hex = keys.path().join("hex.kek");
    std::fs::write(
        &hex,
        "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n",
    )
    .unwrap();
    std::fs::set_permissions(&hex, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let log = run(&hex);
    assert!(
        log.contains("holds 65 bytes") && log.contains("head -c 32 /dev/urandom"),
        "{log}"
    );
    assert!(
        log.contains("etc/issuer.yaml:") && log.contains(": spec.storage.key_encryption_key_file: "),
        "the error names the document and the field: {log}"
    );
    let open = keys.path().join("open.kek");
    std::fs::copy(&set.kek, &open).unwrap();
    std::fs::set_permissions(&open, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let log = run(&open);
    assert!(
        log.contains("readable by other users") && log.contains("chmod 600"),
        "{log}"
    );
}

/// Fetches X509 SVIDs from `socket` in a loop (a new connection each time) until `stop`, counting
/// failures.
async fn fetch_loop(socket: String, stop: Arc<std::sync::atomic::AtomicBool>) -> (usize, usize, Vec<String>) {
    let (mut ok, mut failed, mut errors) = (0, 0, Vec::new());
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        let result = async {
            let client = spiffe::WorkloadApiClient::connect_to(&socket).await?;
            client.fetch_x509_svid().await
        }
        .await;
        match result {
            Ok(_) => ok += 1,
            Err(e) => {
                failed += 1;
                errors.push(e.to_string());
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (ok, failed, errors)
}

fn bot_expiry(status: &str) -> String {
    status
        .lines()
        .find(|l| l.starts_with("bot: "))
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agents_behind_haproxy_ride_out_a_lost_replica_and_a_lost_etcd_quorum() {
    let Some(mut set) = Replicas::start(3) else { return };
    if set.start_haproxy().is_none() {
        return;
    }
    let pin = pin(&set.status(0));
    let lb = set.lb_port;
    // The agent joins through haproxy and renews its bot identity every 5 s.
    let agent = start_agent(
        |dir| {
            agent_config(dir, lb, &token_onboarding(TOKEN, &pin), "example-workload-identity").replace(
                "version: v2\n",
                "version: v2\ncredential_ttl: 1h\nrenewal_interval: 5s\n",
            )
        },
        &[],
    );
    wait_for_socket(&agent);
    wait_for_status(&agent, "the agent is connected", |s| s.contains("(connected)"));
    let endpoint = agent.endpoint();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workload = tokio::spawn(fetch_loop(endpoint.clone(), stop.clone()));
    tokio::time::sleep(Duration::from_millis(500)).await;

    // SIGKILL the replica holding the agent's connection: the agent moves to another, its
    // renewals continue there, and no workload notices.
    let holder = |set: &Replicas, except: Option<usize>| {
        (0..3)
            .filter(|i| Some(*i) != except)
            .find(|i| set.replicas[*i].is_some() && set.status(*i).contains("(1 agent connected)"))
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let held = loop {
        if let Some(i) = holder(&set, None) {
            break i;
        }
        assert!(Instant::now() < deadline, "no replica lists the agent");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let renewed_before = bot_expiry(&stdout(&agent.tbotctl(&["status"])));
    let killed_at = Instant::now();
    let (dir, admin) = set.kill(held);
    let deadline = Instant::now() + Duration::from_secs(30);
    let moved_to = loop {
        if let Some(i) = holder(&set, Some(held)) {
            break i;
        }
        assert!(
            Instant::now() < deadline,
            "the agent did not move to another replica:\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let failover = killed_at.elapsed();
    wait_for_status(&agent, "renewals continue on another replica", |s| {
        s.contains("(connected)") && bot_expiry(s) != renewed_before
    });
    let restarting = Instant::now();
    set.restart(held, dir, admin);
    eprintln!(
        "replica-{} killed; the agent moved to replica-{} in {failover:?}; the replica restarted in {:?}",
        held + 1,
        moved_to + 1,
        restarting.elapsed()
    );

    // A bot that joined before etcd loses quorum.
    let c = client(format!("127.0.0.1:{lb}"), &pin);
    let bot_key = KeyPair::generate().unwrap();
    let bot = c.join(token_join(&bot_key, "third-token")).await.unwrap();
    c.present(&bot.der, &bot_key.serialize_der());
    // etcd loses quorum: a new agent's join fails naming the store; SVIDs are still issued from
    // the replicas' memory, and the running agent's workloads notice nothing.
    set.etcd.kill_member(1);
    set.etcd.kill_member(2);
    let newcomer = start_agent(
        |dir| {
            agent_config(
                dir,
                lb,
                &token_onboarding("second-token", &pin),
                "example-workload-identity",
            )
        },
        &[],
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let refused = loop {
        let out = stdout(&newcomer.tbotctl(&["get", "agent_config"]));
        if out.contains("etcd") {
            break out;
        }
        assert!(
            Instant::now() < deadline,
            "the newcomer's join does not name the store:\n{out}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(refused.contains("the store (etcd http://127.0.0.1:"), "{refused}");
    for _ in 0..3 {
        let issued = c.issue_x509(svid_request(&bot.der)).await;
        assert!(issued.is_ok(), "SVIDs flow without quorum: {issued:?}");
    }
    // Quorum returns: the newcomer joins by itself.
    set.etcd.start_member(1);
    set.etcd.start_member(2);
    set.etcd.wait_healthy();
    wait_for_status(&newcomer, "the newcomer joins once quorum is back", |s| {
        s.contains("(connected)") && s.contains("bot: example-bot")
    });

    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (ok, failed, errors) = workload.await.unwrap();
    assert_eq!(failed, 0, "the workload saw errors: {errors:?}");
    assert!(ok > 20, "the workload fetched {ok} times");
    eprintln!("{ok} fetches by the workload, 0 errors");
}

#[test]
fn a_ca_settings_change_deployed_to_every_replica_rotates_the_ca_once() {
    let Some(set) = Replicas::start(3) else { return };
    let before = pin(&set.status(0));
    // The same edit lands on all three replicas at once, as a config rollout would make it.
    for i in 0..3 {
        let cluster = set.get(i).daemon.dir.path().join("etc/cluster.yaml");
        let text = std::fs::read_to_string(&cluster).unwrap();
        save(
            &cluster,
            &format!("{}\nspec:\n  ca: {{key_algorithm: ed25519}}\n", text.trim_end()),
        );
    }
    let pins = |s: &str| -> Vec<String> {
        s.lines()
            .filter_map(|l| l.strip_prefix("CA pin: "))
            .map(str::to_owned)
            .collect()
    };
    for i in 0..3 {
        wait_for_status(&set.get(i).daemon, "the rotation reached every replica", |s| {
            pins(s).len() >= 2
        });
    }
    // Time for a second (wrong) rotation to show, had a replica made one.
    std::thread::sleep(Duration::from_secs(3));
    for i in 0..3 {
        let status = set.status(i);
        let now = pins(&status);
        assert_eq!(now.len(), 2, "one rotation, not one per replica: {now:?}\n{status}");
        assert_eq!(now[0], before, "the old CA stays in the bundle during the overlap");
    }
    let news: std::collections::BTreeSet<String> = (0..3).map(|i| pins(&set.status(i))[1].clone()).collect();
    assert_eq!(news.len(), 1, "every replica signs with the same new CA: {news:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn behind_haproxy_with_the_proxy_protocol_agents_are_seen_at_their_own_addresses() {
    let Some(mut set) = Replicas::start_with(3, true) else {
        return;
    };
    if set.start_haproxy().is_none() {
        return;
    }
    let pin = pin(&set.status(0));
    // An agent from its own address joins through haproxy, which sends a PROXY v2 header.
    let remote = client(format!("127.0.0.1:{}", set.lb_port), &pin);
    remote.set_local_address("127.3.0.7".parse().unwrap());
    let key = KeyPair::generate().unwrap();
    let joined = remote.join(token_join(&key, TOKEN)).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = stdout(&set.get(0).daemon.tbotctl(&["get", "bot/example-bot"]));
        if out.contains(&joined.instance) {
            assert!(
                out.contains("127.3.0.7:"),
                "the agent's own address, not haproxy's:\n{out}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "the instance never showed:\n{out}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A connection straight to a replica, without the header, is refused, and the log says why.
    let direct = client(format!("127.0.0.1:{}", set.get(1).port), &pin);
    let err = direct
        .join(token_join(&KeyPair::generate().unwrap(), "second-token"))
        .await
        .unwrap_err();
    assert!(err.is_transient(), "{err}");
    // The refusal is logged by the replica's accept loop, which may write it just after the client
    // has its error.
    let says_why =
        |log: &str| log.contains("does not start with a PROXY protocol v2 header") && log.contains("send-proxy-v2");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !says_why(&set.get(1).daemon.log()) {
        assert!(Instant::now() < deadline, "{}", set.get(1).daemon.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn two_replicas_given_one_name_are_reported_on_every_replica() {
    let Some(set) = Replicas::start(2) else { return };
    // A third process, deployed with replica-1's `issuer` document name.
    let (dir, _) = copy_manifests("manifests/fleet/issuer", &[]);
    let port = common::etcd::free_ports(1)[0];
    let doc = issuer_document("replica-1", port, &[], &set.etcd.endpoints_yaml(), "/tbot", &set.kek)
        .replace("DIR", &dir.path().display().to_string());
    std::fs::write(dir.path().join("etc/issuer.yaml"), doc).unwrap();
    let admin = dir.path().join("admin.sock");
    let _twin = Daemon::spawn(dir, admin, &[]);
    let status = wait_for_status(&set.get(1).daemon, "the name clash shows on replica-2", |s| {
        s.contains("WARNING: replica-1 is claimed by two processes")
    });
    assert!(status.contains("give each replica its own `metadata.name`"), "{status}");
    assert!(
        !set.get(1).daemon.tbotctl(&["status"]).status.success(),
        "status exits non-zero"
    );
}

/// The `keys:` rows of `tbotctl status`: (key, id, phase, pin or kid).
fn key_rows(status: &str) -> Vec<(String, u32, String, String)> {
    status
        .lines()
        .skip_while(|l| *l != "keys:")
        .skip(2)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // KEY (two words), PHASE, AGENTS/SVIDS, PHASE ENDS, CREATED, NOT AFTER, PIN / KID.
            if f.len() != 8 {
                return None;
            }
            Some((f[0].to_owned(), f[1].parse().ok()?, f[2].to_owned(), f[7].to_owned()))
        })
        .collect()
}

/// The automatic schedule on three replicas: every step is one conditional write by one replica (one
/// successor at a time, one key per id on every replica), a replica killed and restarted while a
/// successor is prepared resumes that rotation instead of starting another, and a remote agent's
/// workload never gets an SVID its bundle does not verify.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_take_each_automatic_rotation_step_once_and_a_restarted_replica_resumes_it() {
    // Keys live 40 s: successors are prepared 20 s and activated 10 s before the end.
    let schedule = "validity: 40s\n    rotation: {prepare_before: 20s, activate_before: 10s}";
    let cluster = format!("  name: example.teleport.sh\nspec:\n  ca:\n    {schedule}\n  jwt:\n    {schedule}\n");
    let edit = [("cluster.yaml", "  name: example.teleport.sh\n", cluster.as_str())];
    let Some(mut set) = Replicas::start_edited(3, false, &edit) else {
        return;
    };
    let pin = pin(&set.status(0));
    let port = set.get(0).port;
    let agent = start_agent(
        |dir| agent_config(dir, port, &token_onboarding(TOKEN, &pin), "example-workload-identity"),
        &[],
    );
    wait_for_socket(&agent);
    let (stream, _) = common::open_stream(&agent).await;
    let (failures, seen) = common::verify_stream(stream);

    let mut pins: std::collections::BTreeMap<(String, u32), std::collections::BTreeSet<String>> = Default::default();
    let mut restarted = false;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(55) {
        for i in 0..3 {
            if set.replicas[i].is_none() {
                continue;
            }
            let status = set.status(i);
            let rows = key_rows(&status);
            for key in ["ca", "jwt"] {
                let prepared = rows.iter().filter(|r| r.0 == key && r.2 == "prepared").count();
                assert!(prepared <= 1, "two {key} successors at once on replica {i}:\n{status}");
            }
            for (key, id, _, name) in rows {
                pins.entry((key, id)).or_default().insert(name);
            }
        }
        let prepared = key_rows(&set.status(2))
            .iter()
            .any(|r| r.0 == "ca" && r.2 == "prepared");
        if !restarted && prepared {
            let (dir, admin) = set.kill(2);
            set.restart(2, dir, admin);
            restarted = true;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(restarted, "no CA was ever prepared: {pins:?}");
    for ((key, id), names) in &pins {
        assert_eq!(
            names.len(),
            1,
            "{key} {id} is a different key on different replicas: {names:?}"
        );
    }
    for key in ["ca", "jwt"] {
        let ids: Vec<u32> = pins.keys().filter(|(k, _)| k == key).map(|(_, id)| *id).collect();
        assert!(ids.len() >= 3, "two {key} rotations in 55 s: {ids:?}");
        assert_eq!(
            ids,
            (1..=ids.len() as u32).collect::<Vec<_>>(),
            "one successor per rotation"
        );
    }
    assert!(
        failures.lock().unwrap().is_empty(),
        "{:?}\n{}",
        failures.lock().unwrap(),
        agent.log()
    );
    assert!(seen.lock().unwrap().len() >= 3, "the agent's workload saw every CA");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_consumed_token_with_an_expiry_leaves_etcd_a_week_after_it() {
    let Some(set) = Replicas::start(1) else { return };
    let pin = pin(&set.status(0));
    let expires = time::OffsetDateTime::now_utc() + time::Duration::hours(2);
    let token = format!(
        "kind: token\nversion: v2\nmetadata:\n  name: expiring-token\n  expires: \"{}\"\nspec:\n  roles: [Bot]\n  \
         join_method: token\n  bot_name: example-bot\n",
        expires.format(&time::format_description::well_known::Rfc3339).unwrap()
    );
    save(&set.get(0).daemon.dir.path().join("etc/expiring-token.yaml"), &token);
    let remote = client(format!("127.0.0.1:{}", set.get(0).port), &pin);
    let key = KeyPair::generate().unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match remote.join(token_join(&key, "expiring-token")).await {
            Ok(_) => break,
            // The document is picked up after the reload's debounce.
            Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(200)).await,
            Err(e) => panic!("{e}"),
        }
    }
    // The consumed record of this token is on a lease that ends a week after the token.
    let out = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args([
            "--endpoints",
            &set.etcd.endpoints().join(","),
            "get",
            "--prefix",
            "/tbot/",
            "-w",
            "json",
        ])
        .output()
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let digest = tbot::sha256_hex(b"expiring-token");
    let leased: Vec<i64> = json["kvs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|kv| {
            use base64::Engine;
            let k = base64::engine::general_purpose::STANDARD
                .decode(kv["key"].as_str().unwrap())
                .unwrap();
            String::from_utf8_lossy(&k).ends_with(&format!("/tokens/{digest}.json"))
        })
        .map(|kv| kv["lease"].as_i64().unwrap_or(0))
        .collect();
    assert_eq!(leased.len(), 1, "{json:#}");
    assert_ne!(leased[0], 0, "the record is on a lease");
    let ttl = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", &set.etcd.endpoints().join(","), "lease", "timetolive"])
        .arg(format!("{:x}", leased[0]))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&ttl.stdout);
    let seconds: i64 = said
        .split("remaining(")
        .nth(1)
        .and_then(|s| s.split('s').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{said}"));
    assert!((170 * 3600 - 120..=170 * 3600).contains(&seconds), "{said}");
}
