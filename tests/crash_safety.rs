//! Crash safety: the real daemon killed with SIGKILL at random moments — while it starts (CA and
//! first join), while it rejoins with a new token, while it reissues after an edit, and while
//! `tbotctl apply` waits on it — with its bot renewing every second throughout. After every kill:
//! the storage directory opens, the CA and the JWT key are the ones first created, every token that
//! produced the identity on disk stays consumed (a join with it is refused), the consumed-token
//! ledger never shrinks, the watched directory loads, and a restarted daemon serves again.
//!
//! A random kill rarely lands in the few milliseconds between the issuer's answer and the agent
//! saving it, so those windows are also hit on purpose (`TBOT_FAILPOINT`, see `tbot::failpoint`).
//!
//! `TBOT_CRASH_ROUNDS` (default 100) and `TBOT_CRASH_SEED` replay a run; `TBOT_REPORT_DIR` receives
//! `crash_safety.json` (what `scripts/reliability.sh` puts in docs/reliability.md).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Daemon, QUICKSTART_ON_DISK, copy_manifests, save};
use rcgen::{KeyPair, PublicKeyData};
use spiffe::WorkloadApiClient;
use tbot::issuer::bots::token_key;
use tbot::issuer::{Issuer, JoinProof, JoinRequest, LocalIssuer, Policy};
use tbot::manifest::{Input, load};
use tbot::store::Store;

/// xorshift64*: small, seedable, good enough to pick moments.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
    }
}

const PHASES: [&str; 4] = ["start", "join", "reissue", "apply"];

/// What must never change or shrink from one kill to the next.
#[derive(Default)]
struct Invariants {
    bundle: Option<(Vec<Vec<u8>>, Vec<serde_json::Value>)>,
    consumed: BTreeSet<String>,
}

fn etc(dir: &Path) -> PathBuf {
    dir.join("etc")
}

/// The token the identity on disk was joined with, among `candidates`: the agent records a digest
/// of it beside the identity (the certificate does not carry a token's name: it is the secret).
fn identity_token(state: &Path, candidates: &[String]) -> Option<String> {
    std::fs::read(state.join("agent/identity.der")).ok()?;
    let terms: serde_json::Value = serde_json::from_slice(&std::fs::read(state.join("agent/terms.json")).ok()?).ok()?;
    let digest = terms["token_sha256"].as_str()?;
    candidates.iter().find(|c| token_key(c) == digest).cloned()
}

/// Checks the storage of a dead daemon; returns what it found for the report.
async fn check_storage(dir: &Path, invariants: &mut Invariants, round: usize) {
    let loaded = load(&[Input::Dir(etc(dir))]).unwrap();
    assert!(
        !loaded.has_errors(),
        "round {round}: the watched directory was left broken: {:?}",
        loaded.diagnostics
    );
    let state = dir.join("state");
    if !state.join("issuer").exists() {
        return; // killed before the CA was created
    }
    let store = Store::open(&state).unwrap_or_else(|e| panic!("round {round}: the storage does not open: {e}"));
    let issuer = LocalIssuer::open(store, Policy::from_state(&loaded.state).unwrap())
        .await
        .unwrap_or_else(|e| panic!("round {round}: the issuer's state does not load: {e}"));
    let bundles = issuer.current_bundles();
    let bundle = (bundles.x509_authorities.clone(), bundles.jwt_keys.clone());
    match &invariants.bundle {
        None => invariants.bundle = Some(bundle),
        Some(first) => assert!(*first == bundle, "round {round}: the CA or the JWT key changed"),
    }
    // One file per consumed token, named by the SHA-256 of the token's name.
    let tokens_dir = state.join("issuer/quickstart.tbot.local/tokens");
    let consumed: BTreeSet<String> = match std::fs::read_dir(&tokens_dir) {
        Ok(entries) => entries
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| !name.starts_with('.'))
            .map(|name| {
                let bytes = std::fs::read(tokens_dir.join(&name)).unwrap();
                serde_json::from_slice::<serde_json::Value>(&bytes)
                    .unwrap_or_else(|e| panic!("round {round}: tokens/{name} is damaged: {e}"));
                name.trim_end_matches(".json").to_owned()
            })
            .collect(),
        Err(_) => BTreeSet::new(),
    };
    assert!(
        consumed.is_superset(&invariants.consumed),
        "round {round}: a consumed token was forgotten"
    );
    invariants.consumed = consumed;
    let tokens: Vec<String> = loaded
        .state
        .objects
        .keys()
        .filter(|r| r.kind == tbot::resource::Kind::Token)
        .map(|r| r.name.clone())
        .collect();
    if let Some(token) = identity_token(&state, &tokens) {
        assert!(
            invariants.consumed.contains(&token_key(&token)),
            "round {round}: the identity on disk came from a token that is not recorded as used"
        );
        let stranger = KeyPair::generate().unwrap();
        let err = issuer
            .join(JoinRequest {
                token,
                public_key: stranger.subject_public_key_info(),
                proof: JoinProof::Token,
                ttl: Duration::from_secs(600),
                current: None,
                address: String::new(),
            })
            .await
            .expect_err("a used token must not join again");
        // Refused as used, or (when a later edit renamed it away) as unknown.
        let refused = ["already used", "no token by that name"];
        assert!(
            refused.iter().any(|r| err.to_string().contains(r)),
            "round {round}: {err}"
        );
    }
}

/// Waits until the daemon hands out an X509-SVID through the `spiffe` crate.
async fn serves(daemon: &Daemon, round: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(client) = WorkloadApiClient::connect_to(daemon.endpoint()).await
            && client.fetch_x509_svid().await.is_ok()
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "round {round}: no SVID 30 s after the restart:\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The text between `start` and `end` in a document file of the daemon.
fn field(dir: &Path, file: &str, start: &str, end: &str) -> String {
    let text = std::fs::read_to_string(etc(dir).join(file)).unwrap();
    let from = text.find(start).unwrap_or_else(|| panic!("{file} has no `{start}`")) + start.len();
    let len = text[from..].find(end).unwrap();
    text[from..from + len].to_owned()
}

/// Replaces `from` with `to` in a document file of the daemon, the way editors save.
fn edit(dir: &Path, file: &str, from: &str, to: &str) {
    let path = etc(dir).join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains(from), "{file} has no `{from}`");
    save(&path, &text.replace(from, to));
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_at_random_moments_never_damages_the_storage_or_frees_a_token() {
    let rounds: usize = std::env::var("TBOT_CRASH_ROUNDS").map_or(100, |v| v.parse().unwrap());
    let seed: u64 = std::env::var("TBOT_CRASH_SEED").map_or_else(
        |_| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        },
        |v| v.parse().unwrap(),
    );
    println!("TBOT_CRASH_SEED={seed} TBOT_CRASH_ROUNDS={rounds}");
    let mut rng = Rng(seed);
    let (mut dir, mut socket) = renewing_quickstart();
    let mut invariants = Invariants::default();
    let mut kills: BTreeMap<&str, usize> = BTreeMap::new();
    let started = Instant::now();
    for round in 0..rounds {
        // Round 0 always kills the very first start: the CA and the first join.
        let phase = if round == 0 {
            "start"
        } else {
            PHASES[rng.below(PHASES.len() as u64) as usize]
        };
        let delay = Duration::from_millis(rng.below(400));
        let mut apply = None;
        let daemon = if phase == "start" {
            Daemon::spawn(dir, socket, &[])
        } else {
            let daemon = Daemon::start(dir, socket);
            serves(&daemon, round).await;
            let at = daemon.dir.path();
            // As the files say now (an apply killed early may not have written its file).
            let token = field(at, "tbot.yaml", "token: ", "\n");
            let id = field(at, "workload-identity.yaml", "id: \"", "{{");
            match phase {
                "join" => {
                    let next = format!("crash-token-{round}");
                    edit(at, "bot.yaml", &format!("name: {token}"), &format!("name: {next}"));
                    edit(at, "tbot.yaml", &format!("token: {token}"), &format!("token: {next}"));
                }
                "reissue" => {
                    let next = format!("/round-{round}/");
                    edit(
                        at,
                        "workload-identity.yaml",
                        &format!("id: \"{id}"),
                        &format!("id: \"{next}"),
                    );
                }
                _ => {
                    let text = std::fs::read_to_string(etc(at).join("workload-identity.yaml")).unwrap();
                    let next = format!("/applied-{round}/");
                    let file = at.join("apply.yaml");
                    std::fs::write(&file, text.replace(&format!("id: \"{id}"), &format!("id: \"{next}"))).unwrap();
                    let etc = etc(at);
                    apply = Some(std::thread::spawn(move || {
                        let (file, etc) = (file.to_str().unwrap(), etc.to_str().unwrap());
                        common::tbotctl(&["apply", "-f", file, "--dir", etc, "--wait", "10s"])
                    }));
                }
            }
            daemon
        };
        tokio::time::sleep(delay).await;
        *kills.entry(phase).or_default() += 1;
        (dir, socket) = daemon.crash();
        if let Some(apply) = apply {
            apply.join().unwrap();
        }
        check_storage(dir.path(), &mut invariants, round).await;
    }
    // And after all that, a clean start serves.
    let daemon = Daemon::start(dir, socket);
    serves(&daemon, rounds).await;
    let elapsed = started.elapsed();
    println!("{rounds} SIGKILLs in {:.0} s: {kills:?}", elapsed.as_secs_f64());
    if let Some(report) = std::env::var_os("TBOT_REPORT_DIR") {
        let json = serde_json::json!({
            "rounds": rounds,
            "seed": seed,
            "kills_by_phase": kills,
            "seconds": elapsed.as_secs_f64(),
            "failures": 0,
        });
        std::fs::write(Path::new(&report).join("crash_safety.json"), json.to_string()).unwrap();
    }
}

/// The quickstart on disk, with a bot that renews every second.
fn renewing_quickstart() -> (tempfile::TempDir, PathBuf) {
    let mut edits = QUICKSTART_ON_DISK.to_vec();
    edits.push((
        "tbot.yaml",
        "credential_ttl: 1h\nrenewal_interval: 20m",
        "credential_ttl: 6s\nrenewal_interval: 1s",
    ));
    copy_manifests("manifests/quickstart", &edits)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_between_the_issuers_answer_and_its_saving_is_recovered() {
    // `identity-half-saved@2`: the first renewal's certificate is saved, its key not yet.
    // `store-logged@N`: the issuer's Nth log write is on disk, and nothing after it: no file, no
    // answer. At start these are the CA, the JWT key, the join, then what follows the join. The
    // restart replays the log.
    let points = ["join-answered", "renew-answered", "identity-half-saved@2"]
        .into_iter()
        .map(str::to_owned)
        .chain((1..=4).map(|n| format!("store-logged@{n}")));
    for point in points {
        let point = point.as_str();
        let (dir, socket) = renewing_quickstart();
        let mut daemon = Daemon::spawn(dir, socket, &[("TBOT_FAILPOINT", point)]);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !daemon.log().contains("aborting here") {
            assert!(Instant::now() < deadline, "{point}: never reached:\n{}", daemon.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let status = daemon.wait();
        assert!(!status.success(), "{point}: {status}");
        let (dir, socket) = daemon.crash();
        let mut invariants = Invariants::default();
        check_storage(dir.path(), &mut invariants, 0).await;
        // The retry presents the saved key: the used token joins again for it (join-answered), the
        // moved generation is signed again (renew-answered). Neither refuses nor locks the bot.
        let daemon = Daemon::start(dir, socket);
        serves(&daemon, 0).await;
        tokio::time::sleep(Duration::from_millis(2500)).await;
        serves(&daemon, 0).await;
        let log = daemon.log();
        for bad in ["already used", "locked", "two holders", "no matching key"] {
            assert!(!log.contains(bad), "{point}: `{bad}` after the restart:\n{log}");
        }
        assert!(
            std::fs::read(daemon.dir.path().join("state/agent/identity.der")).is_ok(),
            "{point}: an identity is saved"
        );
    }
}

/// A small tmpfs mounted over a directory, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// `None` (after saying why) where mounting is not allowed; with `CI=true` that fails the test.
    fn mount(at: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(at).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tbot-test"])
            .arg(at)
            .output()
            .unwrap();
        if out.status.success() {
            return Some(Tmpfs(at.to_owned()));
        }
        let why = String::from_utf8_lossy(&out.stderr);
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI must run the storage fault tests, and mounting a tmpfs failed: {why}"
        );
        println!("skipped: cannot mount a tmpfs here ({why})");
        None
    }

    /// Makes the directory read-only for every new open, by a read-only bind mount over it. (A plain
    /// `remount,ro` is refused while the daemon holds its lock file open for writing.)
    fn read_only(&self) {
        let at = self.0.to_str().unwrap();
        for args in [vec!["--bind", at, at], vec!["-o", "remount,bind,ro", at]] {
            let out = std::process::Command::new("mount").args(&args).output().unwrap();
            let why = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "mount {args:?}: {why}");
        }
    }

    /// Undoes [`Tmpfs::read_only`].
    fn writable(&self) {
        assert!(
            std::process::Command::new("umount")
                .arg(&self.0)
                .status()
                .unwrap()
                .success()
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        for _ in 0..2 {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_the_issuer_stores_writes_and_its_log_loses_nothing_after() {
    use tbot::kv::{Kv, MemoryKv, Op};
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let Some(tmpfs) = Tmpfs::mount(&state, "1m") else {
        return;
    };
    let kv = MemoryKv::directory(Store::open(&state).unwrap(), "issuer/").unwrap();
    kv.txn(vec![], vec![Op::put("issuer/x/before.json", "{}")])
        .await
        .unwrap();
    // The checkpoint after it done (the file written, one log left): the next may come only a
    // second later, after the writes below and the copy.
    let logs = || {
        std::fs::read_dir(&state)
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".wal"))
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(state.join("issuer/x/before.json").exists() && logs() == 1) {
        assert!(Instant::now() < deadline, "the first checkpoint did not finish");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // tmpfs allocates whole pages (4 KiB here, 64 KiB on some kernels): what is freed below is
    // whole pages, and the big write twice that.
    let page = rustix::fs::statvfs(&state).unwrap().f_bsize as usize;
    let half = (32 * 1024usize).div_ceil(page) * page;
    let filler = state.join("filler");
    {
        use std::io::Write as _;
        let mut f = std::fs::File::create(&filler).unwrap();
        while f.write_all(&[0u8; 64 * 1024]).is_ok() {}
        // Half of the big write below fits: it fails with its first half in the log.
        f.set_len(f.metadata().unwrap().len() - half as u64).unwrap();
        let _ = f.sync_all();
    }
    // Larger than the space left: the append fails part way.
    let big = vec![b'x'; 2 * half];
    let err = kv
        .txn(vec![], vec![Op::put("issuer/x/full.json", big.clone())])
        .await
        .expect_err("a full disk fails the write");
    let message = format!("{err} ({})", tbot::error::Explain::hint(&err));
    assert!(message.contains("No space left on device"), "{message}");
    assert!(message.contains(".wal"), "names the log: {message}");
    assert!(message.contains("free space"), "says what to do: {message}");
    assert_eq!(kv.get("issuer/x/full.json").await.unwrap(), None, "nothing applied");

    // Space again: the next write goes through, after the part of the failed one is cut away.
    std::fs::remove_file(&filler).unwrap();
    kv.txn(vec![], vec![Op::put("issuer/x/after.json", big.clone())])
        .await
        .unwrap();
    // A crash now: the directory as the disk holds it, copied while the store is open (closing it
    // brings the files up to date and removes the log, which would hide a failed write's bytes
    // left in the log). The log must replay to both writes, not stop at the failed one.
    let crashed = dir.path().join("crashed");
    copy_as_a_crash_leaves_it(&state, &crashed);
    assert!(
        !crashed.join("issuer/x/after.json").exists(),
        "a checkpoint ran before the copy, so the log was not tested; the steps above take far less than its second"
    );
    drop(kv);
    for at in [&state, &crashed] {
        let kv = MemoryKv::directory(Store::open(at).unwrap(), "issuer/").unwrap();
        let (entries, _) = kv.list("issuer/").await.unwrap();
        let keys: Vec<&str> = entries.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(
            keys,
            ["issuer/x/after.json", "issuer/x/before.json"],
            "{}",
            at.display()
        );
        assert_eq!(entries[0].value, big, "{}", at.display());
    }
    drop(tmpfs);
}

/// Copies a directory store's files while it runs, as a crash would leave them: the logs first,
/// then the rest (a checkpoint writes the files before it removes a log, so a log gone meanwhile
/// is in the files copied after it); a file renamed or removed meanwhile is skipped.
fn copy_as_a_crash_leaves_it(from: &Path, to: &Path) {
    fn copy(from: &Path, to: &Path, logs: bool) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let (source, target) = (entry.path(), to.join(entry.file_name()));
            let is_log = entry.file_name().to_string_lossy().ends_with(".wal");
            match entry.file_type() {
                Ok(t) if t.is_dir() && !logs => copy(&source, &target, false),
                Ok(t) if t.is_file() && is_log == logs => match std::fs::copy(&source, &target) {
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => panic!("copying {}: {e}", source.display()),
                },
                _ => {}
            }
        }
    }
    copy(from, to, true);
    copy(from, to, false);
}

/// Polls `tbotctl get` until its output satisfies `want`.
fn wait_for_get(daemon: &Daemon, what: &str, want: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = common::stdout(&daemon.tbotctl(&["get"]));
        if want(&out) {
            return out;
        }
        assert!(Instant::now() < deadline, "{what}:\n{out}\n{}", daemon.log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_or_read_only_storage_is_a_condition_and_serving_goes_on() {
    let (dir, socket) = copy_manifests("manifests/quickstart", &QUICKSTART_ON_DISK);
    let Some(tmpfs) = Tmpfs::mount(&dir.path().join("state"), "1m") else {
        return;
    };
    let daemon = Daemon::start(dir, socket);
    serves(&daemon, 0).await;
    let at = daemon.dir.path().to_owned();
    let failing = |out: &str| out.contains("StorageWritable: cannot save");

    // The workload identity's generation in controller/status.json, once the file is written.
    let generation = || {
        let text = std::fs::read_to_string(at.join("state/controller/status.json")).ok()?;
        let objects: Vec<serde_json::Value> = serde_json::from_str(&text).ok()?;
        let identity = objects.iter().find(|o| o["kind"] == "workload_identity")?;
        identity["generation"].as_u64()
    };
    let before = common::wait_until("the first status file", Duration::from_secs(20), generation);

    // Full: fill the tmpfs, then edit (the daemon converges and must write its records).
    let filler = at.join("state/filler");
    {
        use std::io::Write as _;
        let mut f = std::fs::File::create(&filler).unwrap();
        while f.write_all(&[0u8; 64 * 1024]).is_ok() {}
        let _ = f.sync_all();
    }
    let id = field(&at, "workload-identity.yaml", "id: \"", "{{");
    edit(&at, "workload-identity.yaml", &format!("id: \"{id}"), "id: \"/full/");
    let out = wait_for_get(&daemon, "a full disk shows on the agent config", failing);
    assert!(out.contains("No space left on device"), "{out}");
    assert!(out.contains("free space"), "the message says what to do: {out}");
    serves(&daemon, 0).await;

    // Space again: the condition clears by itself (the writer retries) and the records are written.
    std::fs::remove_file(&filler).unwrap();
    wait_for_get(&daemon, "the condition clears once there is space", |out| !failing(out));
    let applied = std::fs::read_to_string(at.join("state/controller/applied.json")).unwrap();
    assert!(applied.contains("/full/"), "the applied record on disk caught up");
    assert_eq!(generation(), Some(before + 1), "the status on disk caught up");

    // Read-only: the same, with the file system's own words.
    tmpfs.read_only();
    edit(&at, "workload-identity.yaml", "id: \"/full/", "id: \"/read-only/");
    let out = wait_for_get(&daemon, "a read-only storage shows on the agent config", failing);
    assert!(out.contains("Read-only file system"), "{out}");
    let client = WorkloadApiClient::connect_to(daemon.endpoint()).await.unwrap();
    let svid = client.fetch_x509_svid().await.unwrap();
    assert!(
        svid.spiffe_id().to_string().contains("/read-only/"),
        "issuing goes on from memory"
    );
    tmpfs.writable();
    wait_for_get(&daemon, "the condition clears once writable", |out| !failing(out));
    // Unmount before the temporary directory goes.
    let (dir, _) = daemon.crash();
    drop(tmpfs);
    drop(dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_inside_a_rejoin_with_a_new_token_is_recovered_without_locking_the_bot() {
    // The first join passes; the second (the rejoin after the token edit) dies with its answer.
    let (dir, socket) = renewing_quickstart();
    let mut daemon = Daemon::spawn(dir, socket, &[("TBOT_FAILPOINT", "join-answered@2")]);
    serves(&daemon, 0).await;
    let at = daemon.dir.path().to_owned();
    let token = field(&at, "tbot.yaml", "token: ", "\n");
    edit(&at, "bot.yaml", &format!("name: {token}"), "name: rejoin-token");
    edit(&at, "tbot.yaml", &format!("token: {token}"), "token: rejoin-token");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !daemon.log().contains("aborting here") {
        assert!(Instant::now() < deadline, "the rejoin never ran:\n{}", daemon.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    daemon.wait();
    let (dir, socket) = daemon.crash();
    // The issuer counts the bot from the new join; the identity on disk is the older one. The
    // restart must finish the join, not renew the older identity (which would look like a copy).
    let daemon = Daemon::start(dir, socket);
    serves(&daemon, 0).await;
    let log = daemon.log();
    for bad in ["locked", "two holders", "already used"] {
        assert!(!log.contains(bad), "`{bad}` after the restart:\n{log}");
    }
    assert_eq!(
        identity_token(
            &daemon.dir.path().join("state"),
            &["rejoin-token".to_owned(), "quickstart-token-change-me".to_owned()]
        )
        .as_deref(),
        Some("rejoin-token")
    );
}
