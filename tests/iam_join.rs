//! End-to-end `iam` joins against moto (an STS stand-in with its signature checks on) and a small
//! IMDSv2 stand-in serving the assumed role's credentials to the agent's IMDS client.
//!
//! `scripts/test.sh` installs `moto[server]` into `target/test-venv`; with `CI=true` a missing moto
//! fails these tests instead of skipping them.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rcgen::{KeyPair, PublicKeyData};
use tbot::aws::{Imds, SignedRequest, iam_join_proof};
use tbot::error::Explain;
use tbot::issuer::{BotCertificate, Issuer, IssuerError, JoinProof, JoinRequest, LocalIssuer, Policy};
use tbot::store::Store;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const INSTANCE_ID: &str = "i-0abc123def4567890";
const ACCOUNT: &str = "123456789012";

fn venv() -> Option<PathBuf> {
    let dir = common::peer_dir("TBOT_TEST_VENV", "target/test-venv");
    if dir.join("bin/moto_server").exists() {
        return Some(dir);
    }
    let message = format!(
        "moto is not installed in {}; run scripts/test.sh, which creates that environment",
        dir.display()
    );
    common::peer_missing(&message);
    None
}

/// A moto server on a loopback port, stopped on drop, with an assumed role's credentials.
struct Moto {
    child: Child,
    endpoint: String,
    credentials: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_moto(venv: &std::path::Path) -> Moto {
    let port = common::free_port();
    let child = Command::new(venv.join("bin/moto_server"))
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("moto_server starts");
    let endpoint = format!("http://127.0.0.1:{port}");
    let mut moto = Moto {
        child,
        endpoint,
        credentials: String::new(),
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "moto_server did not listen within 60s");
        std::thread::sleep(Duration::from_millis(100));
    }
    let setup = Command::new(venv.join("bin/python"))
        .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/peers/moto_setup.py"))
        .args([&moto.endpoint, INSTANCE_ID])
        .output()
        .expect("the moto setup script runs");
    assert!(setup.status.success(), "{}", String::from_utf8_lossy(&setup.stderr));
    moto.credentials = String::from_utf8(setup.stdout).unwrap();
    moto
}

/// An IMDSv2 stand-in: tokens by PUT, role credentials and region by GET with the token.
async fn start_imds(credentials: String) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            let credentials = credentials.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
                let line = head.lines().next().unwrap_or("").to_owned();
                let has_token = head.contains("x-aws-ec2-metadata-token: imds-session");
                let (status, body) = match line.split_whitespace().take(2).collect::<Vec<_>>()[..] {
                    ["put", "/latest/api/token"] if head.contains("x-aws-ec2-metadata-token-ttl-seconds:") => {
                        ("200 OK", "imds-session".to_owned())
                    }
                    ["get", _] if !has_token => ("401 Unauthorized", String::new()),
                    ["get", "/latest/meta-data/iam/security-credentials/"] => ("200 OK", "teleport-bot-role".into()),
                    ["get", "/latest/meta-data/iam/security-credentials/teleport-bot-role"] => ("200 OK", credentials),
                    ["get", "/latest/meta-data/placement/region"] => ("200 OK", "us-east-1".into()),
                    _ => ("404 Not Found", String::new()),
                };
                let reply = format!(
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(reply.as_bytes()).await;
            });
        }
    });
    url
}

fn policy(sts_endpoint: &str) -> Policy {
    let text = format!(
        "
kind: cluster
version: v1
metadata: {{name: example.org}}
spec: {{aws: {{sts_endpoint: '{sts_endpoint}'}}}}
---
kind: role
version: v7
metadata: {{name: issuer}}
spec:
  allow:
    workload_identity_labels: {{'*': '*'}}
    rules: [{{resources: [workload_identity], verbs: [read, list]}}]
---
kind: bot
version: v1
metadata: {{name: ec2-bot}}
spec: {{roles: [issuer]}}
---
kind: token
version: v2
metadata: {{name: iam-token}}
spec:
  roles: [Bot]
  join_method: iam
  bot_name: ec2-bot
  allow:
    - aws_account: '{ACCOUNT}'
      aws_arn: 'arn:aws:sts::{ACCOUNT}:assumed-role/teleport-bot-role/i-*'
---
kind: token
version: v2
metadata: {{name: wrong-account}}
spec:
  roles: [Bot]
  join_method: iam
  bot_name: ec2-bot
  allow: [{{aws_account: '111111111111'}}]
---
kind: token
version: v2
metadata: {{name: wrong-arn}}
spec:
  roles: [Bot]
  join_method: iam
  bot_name: ec2-bot
  allow:
    - aws_account: '{ACCOUNT}'
      aws_arn: 'arn:aws:sts::{ACCOUNT}:assumed-role/other-role/*'
"
    );
    common::policy(&text)
}

async fn join(
    issuer: &LocalIssuer,
    token: &str,
    signed: SignedRequest,
    challenge: String,
) -> Result<BotCertificate, IssuerError> {
    let key = KeyPair::generate().unwrap();
    issuer
        .join(JoinRequest {
            token: token.into(),
            public_key: key.subject_public_key_info(),
            proof: JoinProof::Iam {
                challenge,
                request: signed,
            },
            ttl: Duration::from_secs(3600),
            current: None,
            address: String::new(),
        })
        .await
}

/// Asks for a challenge, gets credentials from the IMDS stand-in and signs, as the agent does.
async fn signed_join(issuer: &LocalIssuer, imds: &Imds, token: &str) -> Result<BotCertificate, IssuerError> {
    let challenge = issuer.challenge().await.unwrap();
    let signed = iam_join_proof(imds, &challenge).await.expect("the agent signs");
    join(issuer, token, signed, challenge).await
}

struct Peers {
    _moto: Moto,
    issuer: LocalIssuer,
    imds: Imds,
}

async fn peers() -> Option<Peers> {
    let venv = venv()?;
    let moto = tokio::task::spawn_blocking(move || start_moto(&venv)).await.unwrap();
    let imds = Imds::new(start_imds(moto.credentials.clone()).await);
    let issuer = LocalIssuer::open(Store::memory(), policy(&moto.endpoint))
        .await
        .unwrap();
    Some(Peers {
        _moto: moto,
        issuer,
        imds,
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn an_ec2_instance_joins_when_its_assumed_role_arn_matches_the_glob() {
    let Some(p) = peers().await else { return };
    let bot = signed_join(&p.issuer, &p.imds, "iam-token")
        .await
        .expect("the join succeeds");
    assert_eq!(bot.bot, "ec2-bot");
    assert_eq!(bot.generation, 1, "the first join of a new bot instance");
    assert_eq!(bot.instance.len(), 16, "a new instance ID");
    let attr = |name: &str| {
        let a = tbot::resource::template::Attribute::parse(name).unwrap();
        bot.join.get(&a).map(|v| v.join(","))
    };
    assert_eq!(attr("join.iam.account").as_deref(), Some(ACCOUNT));
    assert_eq!(
        attr("join.iam.arn").as_deref(),
        Some(format!("arn:aws:sts::{ACCOUNT}:assumed-role/teleport-bot-role/{INSTANCE_ID}").as_str())
    );
    assert_eq!(attr("join.meta.join_method").as_deref(), Some("iam"));
    // IAM joins are reusable: the agent rejoins at each renewal.
    signed_join(&p.issuer, &p.imds, "iam-token")
        .await
        .expect("a second join succeeds");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_account_or_an_arn_that_does_not_match_is_refused_naming_the_check() {
    let Some(p) = peers().await else { return };
    let err = signed_join(&p.issuer, &p.imds, "wrong-account").await.unwrap_err();
    assert!(matches!(err, IssuerError::JoinRefused(_)), "{err}");
    assert!(
        err.to_string()
            .contains(&format!("account: `{ACCOUNT}` is not an `aws_account`")),
        "{err}"
    );
    let err = signed_join(&p.issuer, &p.imds, "wrong-arn").await.unwrap_err();
    assert!(
        err.to_string()
            .contains("ARN: `arn:aws:sts::123456789012:assumed-role/teleport-bot-role/"),
        "{err}"
    );
    assert!(!err.is_transient());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tampered_challenge_is_refused_by_sts() {
    let Some(p) = peers().await else { return };
    // Sign over one challenge, then swap in another the issuer handed out: every local check passes,
    // and the signature no longer matches.
    let first = p.issuer.challenge().await.unwrap();
    let mut signed = iam_join_proof(&p.imds, &first).await.unwrap();
    let second = p.issuer.challenge().await.unwrap();
    for (name, value) in &mut signed.headers {
        if name.eq_ignore_ascii_case("x-teleport-challenge") {
            *value = second.clone();
        }
    }
    let err = join(&p.issuer, "iam-token", signed.clone(), second).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("signature refused by STS: SignatureDoesNotMatch"),
        "{err}"
    );
    // A challenge the issuer never sent is refused before STS.
    let err = join(&p.issuer, "iam-token", signed, "made-up".into())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("challenge:"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_host_not_on_the_allowlist_is_refused_before_any_network_call() {
    let Some(p) = peers().await else { return };
    // The issuer's STS endpoint counts connections: none may arrive.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let counting = format!("http://{}", listener.local_addr().unwrap());
    let connections = Arc::new(AtomicUsize::new(0));
    let seen = connections.clone();
    tokio::spawn(async move {
        while listener.accept().await.is_ok() {
            seen.fetch_add(1, Ordering::SeqCst);
        }
    });
    let issuer = LocalIssuer::open(Store::memory(), policy(&counting)).await.unwrap();
    let challenge = issuer.challenge().await.unwrap();
    let mut signed = iam_join_proof(&p.imds, &challenge).await.unwrap();
    signed.url = "https://sts.amazonaws.com.attacker.example/".into();
    for (name, value) in &mut signed.headers {
        if name.eq_ignore_ascii_case("host") {
            *value = "sts.amazonaws.com.attacker.example".into();
        }
    }
    let err = join(&issuer, "iam-token", signed, challenge).await.unwrap_err();
    assert!(err.to_string().contains("host not on the allowlist"), "{err}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(connections.load(Ordering::SeqCst), 0, "no request left the issuer");
}

#[tokio::test]
async fn an_unreachable_sts_is_transient_and_says_so() {
    // A port with nothing listening: the request passes every local check, then cannot be sent.
    let closed = format!("http://127.0.0.1:{}", common::free_port());
    let issuer = LocalIssuer::open(Store::memory(), policy(&closed)).await.unwrap();
    let challenge = issuer.challenge().await.unwrap();
    let credentials = tbot::aws::Credentials {
        access_key_id: "AKIDEXAMPLE".into(),
        secret_access_key: "secret".into(),
        session_token: None,
        source: "test".into(),
    };
    let signed = tbot::aws::sign_get_caller_identity(&credentials, "us-east-1", &challenge).unwrap();
    let err = join(&issuer, "iam-token", signed, challenge).await.unwrap_err();
    assert!(matches!(err, IssuerError::StsUnavailable(_)), "{err}");
    assert!(err.is_transient());
    assert!(err.to_string().contains("STS unreachable"), "{err}");
}

/// A TCP relay in front of moto that can be cut (listener closed, open connections dropped) and
/// restored on the same port: STS going away and coming back, as the issuer sees it.
struct Relay {
    port: u16,
    target: u16,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Relay {
    async fn start(target: u16) -> Relay {
        let mut relay = Relay {
            port: common::free_port(),
            target,
            task: None,
        };
        relay.restore().await;
        relay
    }

    async fn restore(&mut self) {
        let listener = TcpListener::bind(("127.0.0.1", self.port)).await.unwrap();
        let target = self.target;
        self.task = Some(tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((mut inbound, _)) = listener.accept().await {
                connections.spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        }));
    }

    /// Closes the listener and every open connection (dropping the task drops the JoinSet).
    async fn cut(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }
}

/// The seconds in each `retry_in=` of the daemon's log, in order.
fn retry_delays(log: &str) -> Vec<f64> {
    log.split("retry_in=")
        .skip(1)
        .filter_map(|rest| {
            let value: String = rest.chars().take_while(|c| !c.is_whitespace()).collect();
            let (number, scale) = match value.strip_suffix("ms") {
                Some(ms) => (ms, 1e-3),
                None => (value.strip_suffix('s')?, 1.0),
            };
            number.parse::<f64>().ok().map(|n| n * scale)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn with_sts_gone_an_iam_agent_serves_its_cache_reports_stalled_backs_off_and_recovers() {
    let Some(venv) = venv() else { return };
    let moto = tokio::task::spawn_blocking(move || start_moto(&venv)).await.unwrap();
    let imds = start_imds(moto.credentials.clone()).await;
    let moto_port: u16 = moto.endpoint.rsplit(':').next().unwrap().parse().unwrap();
    let mut relay = Relay::start(moto_port).await;

    let dir = tempfile::tempdir().unwrap();
    let etc = dir.path().join("etc");
    std::fs::create_dir(&etc).unwrap();
    let socket = dir.path().join("workload.sock");
    let agent = format!(
        "version: v2\nproxy_server: example.org:443\nonboarding:\n  join_method: iam\n  token: iam-token\n\
         storage:\n  type: memory\ncredential_ttl: 1m\nrenewal_interval: 2s\nadmin_socket: {admin}\n\
         services:\n  - type: workload-identity-api\n    listen: unix://{socket}\n    selector:\n      name: me\n",
        admin = dir.path().join("admin.sock").display(),
        socket = socket.display()
    );
    std::fs::write(etc.join("tbot.yaml"), agent).unwrap();
    let cluster = format!(
        "kind: cluster\nversion: v1\nmetadata: {{name: example.org}}\nspec: {{aws: {{sts_endpoint: 'http://127.0.0.1:{}'}}}}\n---\n\
         kind: role\nversion: v7\nmetadata: {{name: issuer}}\nspec:\n  allow:\n    workload_identity_labels: {{'*': '*'}}\n\
         \x20   rules: [{{resources: [workload_identity], verbs: [read, list]}}]\n---\n\
         kind: bot\nversion: v1\nmetadata: {{name: ec2-bot}}\nspec: {{roles: [issuer]}}\n---\n\
         kind: token\nversion: v2\nmetadata: {{name: iam-token}}\nspec:\n  roles: [Bot]\n  join_method: iam\n  bot_name: ec2-bot\n\
         \x20 allow: [{{aws_account: '{ACCOUNT}', aws_arn: 'arn:aws:sts::{ACCOUNT}:assumed-role/teleport-bot-role/i-*'}}]\n---\n\
         kind: workload_identity\nversion: v1\nmetadata: {{name: me}}\nspec:\n  rules:\n    allow:\n\
         \x20     - conditions: [{{attribute: workload.unix.attested, eq: {{value: 'true'}}}}]\n\
         \x20 spiffe: {{id: '/ec2/{{{{workload.unix.uid}}}}'}}\n",
        relay.port
    );
    std::fs::write(etc.join("cluster.yaml"), cluster).unwrap();
    let daemon = common::Daemon::start_with_env(
        dir,
        socket,
        &[
            ("AWS_EC2_METADATA_SERVICE_ENDPOINT", imds.as_str()),
            ("AWS_REGION", "us-east-1"),
        ],
    );
    let fetch = || async {
        let client = spiffe::WorkloadApiClient::connect_to(daemon.endpoint()).await.unwrap();
        client.fetch_x509_svid().await
    };
    let first = fetch().await.expect("the iam agent serves");
    assert!(first.spiffe_id().to_string().ends_with(&format!("/ec2/{}", my_uid())));

    let get_bot = || common::stdout(&daemon.tbotctl(&["get", "bot"]));
    let wait_for = |what: &str, want: &dyn Fn(&str) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = get_bot();
            if want(&out) {
                return out;
            }
            assert!(Instant::now() < deadline, "{what}:\n{out}\n{}", daemon.log());
            std::thread::sleep(Duration::from_millis(200));
        }
    };

    relay.cut().await;
    let stalled = wait_for("the bot shows Stalled", &|out| {
        out.contains("Stalled: cannot join again")
    });
    assert!(stalled.contains("STS unreachable"), "the reason: {stalled}");
    assert!(stalled.contains("retrying with backoff"), "{stalled}");
    // Backoff: wait for a few failed attempts; each waits about twice as long as the one before.
    let deadline = Instant::now() + Duration::from_secs(30);
    while retry_delays(&daemon.log()).len() < 3 {
        assert!(Instant::now() < deadline, "no retries:\n{}", daemon.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    let delays = retry_delays(&daemon.log());
    assert!(delays.windows(2).all(|w| w[1] > w[0]), "growing delays: {delays:?}");
    // Meanwhile the workload still gets its (cached) SVID.
    let during = fetch().await.expect("serving goes on from the cache");
    assert_eq!(during.spiffe_id(), first.spiffe_id());

    let renewed = || daemon.log().matches("bot identity renewed").count();
    let before = renewed();
    relay.restore().await;
    wait_for("the bot recovers by itself", &|out| !out.contains("Stalled"));
    assert!(renewed() > before, "{}", daemon.log());
    fetch().await.expect("serving after the recovery");
}

fn my_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").unwrap().uid()
}

/// The guide's topology with its `iam` join: two agents on "other hosts" join one remote issuer with
/// the same `iam` token, become two instances of one bot, keep their instance when they join again
/// (every `renewal_interval`), and serve the issuer's identity.
#[tokio::test(flavor = "multi_thread")]
async fn agents_on_other_hosts_join_a_remote_issuer_by_iam_as_instances_of_one_bot() {
    use common::fleet::{Issuer, agent_config, start_agent, wait_for_socket};
    let Some(venv) = venv() else { return };
    let moto = tokio::task::spawn_blocking(move || start_moto(&venv)).await.unwrap();
    let imds = start_imds(moto.credentials.clone()).await;
    let sts = format!(
        "  name: example.teleport.sh\nspec: {{aws: {{sts_endpoint: '{}'}}}}\n",
        moto.endpoint
    );
    let allow = format!(
        "join_method: iam\n  bot_name: example-bot\n  allow:\n    - aws_account: '{ACCOUNT}'\n      \
         aws_arn: 'arn:aws:sts::{ACCOUNT}:assumed-role/teleport-bot-role/i-*'\n"
    );
    let issuer = tokio::task::spawn_blocking(move || {
        Issuer::start(
            "/uid/{{workload.unix.uid}}",
            &[
                ("cluster.yaml", "  name: example.teleport.sh\n", &sts),
                (
                    "bot-token.yaml",
                    "join_method: token\n  bot_name: example-bot\n",
                    &allow,
                ),
            ],
        )
    })
    .await
    .unwrap();
    let onboarding = format!(
        "  join_method: iam\n  token: fleet-token-change-me\n  ca_pins: [\"{}\"]\n",
        issuer.pin
    );
    let env = [
        ("AWS_EC2_METADATA_SERVICE_ENDPOINT", imds.as_str()),
        ("AWS_REGION", "us-east-1"),
    ];
    let start = |onboarding: String| {
        let port = issuer.port;
        let agent = start_agent(
            move |dir| {
                agent_config(dir, port, &onboarding, "example-workload-identity")
                    .replace("storage:", "credential_ttl: 1m\nrenewal_interval: 2s\nstorage:")
            },
            &env,
        );
        wait_for_socket(&agent);
        agent
    };
    let first = start(onboarding.clone());
    let second = start(onboarding);
    for agent in [&first, &second] {
        let client = spiffe::WorkloadApiClient::connect_to(agent.endpoint()).await.unwrap();
        let svid = client.fetch_x509_svid().await.expect("the remote iam agent serves");
        assert_eq!(
            svid.spiffe_id().to_string(),
            format!("spiffe://example.teleport.sh/uid/{}", my_uid())
        );
    }
    // Both agents join again every 2 s; each keeps its own instance.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let bots = common::stdout(&issuer.daemon.tbotctl(&["get", "bot/example-bot"]));
    assert!(bots.contains("Instances of bot/example-bot (2):"), "{bots}");
    assert!(
        bots.contains(&format!(
            "arn:aws:sts::{ACCOUNT}:assumed-role/teleport-bot-role/{INSTANCE_ID}"
        )),
        "{bots}"
    );
    let generations: Vec<u64> = bots
        .lines()
        .filter(|l| l.contains(" iam "))
        .filter_map(|l| l.split_whitespace().nth(4)?.parse().ok())
        .collect();
    assert_eq!(generations.len(), 2, "{bots}");
    assert!(
        generations.iter().all(|g| *g >= 2),
        "each instance joined again: {bots}"
    );

    // One instance locked by hand stays locked while its agent keeps joining again (every 2 s):
    // a join with a certificate of a locked instance is refused, and the lock is not rewritten.
    let listed = common::stdout(&issuer.daemon.tbotctl(&["get", "bot/example-bot", "-o", "json"]));
    let view: serde_json::Value = serde_json::from_str(&listed).unwrap();
    let instance = view[0]["instances"][0]["id"].as_str().unwrap().to_owned();
    let lock = issuer.daemon.tbotctl(&[
        "lock",
        &format!("example-bot/{instance}"),
        "--reason",
        "imaged elsewhere",
    ]);
    assert!(lock.status.success(), "{}", String::from_utf8_lossy(&lock.stderr));
    tokio::time::sleep(Duration::from_secs(5)).await;
    let listed = common::stdout(&issuer.daemon.tbotctl(&["get", "bot/example-bot", "-o", "json"]));
    let view: serde_json::Value = serde_json::from_str(&listed).unwrap();
    let locked = view[0]["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == instance.as_str())
        .unwrap_or_else(|| panic!("{listed}"));
    assert_eq!(locked["locked"], "imaged elsewhere", "{listed}");
    let refused = [&first, &second]
        .iter()
        .filter(|a| a.log().contains("is locked: imaged elsewhere"))
        .count();
    assert_eq!(refused, 1, "one agent is refused, naming the lock");
}
