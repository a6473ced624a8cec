//! Where features meet: workloads that keep using an agent while events happen to it and its
//! issuer, and the invariants checked over everything they saw. Per agent:
//!
//! - a Rust `spiffe` stream whose every SVID is checked against the bundle delivered with it;
//! - a py-spiffe stream (`spiffe_peer.py watch`) that checks the same with Python `cryptography`;
//! - a new py-spiffe process every second (`spiffe_peer.py once`): an X509-SVID, and a JWT-SVID
//!   validated offline against the JWT bundle, on a new connection, as one-shot clients do;
//! - `tbotctl status` every half second, for its exit code.
//!
//! The invariants, each a named check: every SVID verifies against the bundle it came with; no
//! fetch is denied, and none fails outside the windows a scenario declares (an agent restarted
//! while its issuer is down holds nothing yet); and `tbotctl status` is never healthy while fetches
//! fail. Each event's time to convergence is kept for the report.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{Contexts, Daemon, Reaped, Shared, root, tbotctl, verify_stream};

/// How close in time `tbotctl status` must agree with what the workloads get.
const AGREE: Duration = Duration::from_secs(3);

/// The audience of the JWT-SVIDs the one-shot processes fetch.
pub const AUDIENCE: &str = "scenario";

/// One fetch by a new process: when it started and ended, and the SPIFFE ID or the error.
#[derive(Debug, Clone)]
pub struct Fetch {
    pub at: Instant,
    pub ended: Instant,
    pub outcome: Result<String, String>,
}

/// The workloads of one agent, and what they saw.
pub struct Workloads {
    pub name: String,
    rust_failures: Shared<Vec<String>>,
    watch_log: PathBuf,
    _watch: Reaped,
    fetches: Shared<Vec<Fetch>>,
    statuses: Shared<Vec<(Instant, Option<i32>)>>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// Windows in which fetches may fail with `Unavailable` (never `PermissionDenied`).
    allowed: Vec<(Instant, Instant)>,
}

impl Workloads {
    /// Starts the workloads on `daemon` (its socket and its directory for `tbotctl`). `python` is
    /// the test venv's.
    pub async fn start(name: &str, daemon: &Daemon, python: &Path, stream: Contexts) -> Workloads {
        let (rust_failures, _) = verify_stream(stream);
        let watch_log = daemon.dir.path().join(format!("watch-{name}.log"));
        let watch = Command::new(python)
            .arg(root().join("tests/peers/spiffe_peer.py"))
            .args(["watch", daemon.socket.to_str().unwrap()])
            .stdout(std::fs::File::create(&watch_log).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let fetches: Shared<Vec<Fetch>> = Arc::default();
        let statuses: Shared<Vec<(Instant, Option<i32>)>> = Arc::default();
        let mut threads = Vec::new();
        {
            let (stop, fetches, python, socket) =
                (stop.clone(), fetches.clone(), python.to_owned(), daemon.socket.clone());
            threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let at = Instant::now();
                    let out = Command::new(&python)
                        .arg(root().join("tests/peers/spiffe_peer.py"))
                        .args(["once", socket.to_str().unwrap(), AUDIENCE])
                        .output()
                        .unwrap();
                    let value: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(
                        |_| serde_json::json!({"error": "no output", "details": String::from_utf8_lossy(&out.stderr)}),
                    );
                    let outcome = match (value["spiffe_id"].as_str(), value["jwt"].as_str()) {
                        (Some(id), Some("validated")) => Ok(id.to_owned()),
                        _ => Err(value.to_string()),
                    };
                    let ended = Instant::now();
                    fetches.lock().unwrap().push(Fetch { at, ended, outcome });
                    std::thread::sleep(Duration::from_secs(1).saturating_sub(at.elapsed()));
                }
            }));
        }
        {
            let (stop, statuses, etc) = (stop.clone(), statuses.clone(), daemon.dir.path().join("etc"));
            threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let at = Instant::now();
                    let out = tbotctl(&["status", "--dir", etc.to_str().unwrap()]);
                    statuses.lock().unwrap().push((at, out.status.code()));
                    std::thread::sleep(Duration::from_millis(500));
                }
            }));
        }
        Workloads {
            name: name.to_owned(),
            rust_failures,
            watch_log,
            _watch: Reaped(watch),
            fetches,
            statuses,
            stop,
            threads,
            allowed: Vec::new(),
        }
    }

    /// From now until [`Workloads::end_window`], fetches may fail with `Unavailable`.
    pub fn begin_window(&mut self) {
        self.allowed
            .push((Instant::now(), Instant::now() + Duration::from_secs(3600)));
    }

    pub fn end_window(&mut self) {
        if let Some(last) = self.allowed.last_mut() {
            last.1 = Instant::now();
        }
    }

    /// The agent was restarted (in a declared window): its old Rust stream ended; `stream` is a
    /// new one. Whatever else the old stream saw must have verified.
    pub fn restarted(&mut self, stream: Contexts) {
        let old = std::mem::take(&mut *self.rust_failures.lock().unwrap());
        assert!(
            old.iter().all(|f| f.starts_with("stream error")),
            "[{}] every_svid_verifies_against_its_bundle (Rust): {old:?}",
            self.name
        );
        self.rust_failures = verify_stream(stream).0;
    }

    /// The last SPIFFE ID a new process got.
    pub fn last_id(&self) -> Option<String> {
        self.fetches
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find_map(|f| f.outcome.clone().ok())
    }

    /// Waits until a new process gets `id` (30 s).
    pub fn wait_for_id(&self, id: &str) -> Duration {
        let start = Instant::now();
        loop {
            let seen = self
                .fetches
                .lock()
                .unwrap()
                .iter()
                .any(|f| f.at >= start && f.outcome.as_deref() == Ok(id));
            if seen {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{}: no fetch of {id} in 30 s",
                self.name
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the probes and checks every invariant over what they saw.
    pub fn finish(mut self) -> Summary {
        self.stop.store(true, Ordering::Relaxed);
        for t in std::mem::take(&mut self.threads) {
            t.join().unwrap();
        }
        let fetches = self.fetches.lock().unwrap().clone();
        let statuses = self.statuses.lock().unwrap().clone();
        let name = &self.name;
        // Invariant 1: every SVID verifies against the bundle it came with, for both clients.
        let rust = self.rust_failures.lock().unwrap().clone();
        assert!(
            rust.is_empty(),
            "[{name}] every_svid_verifies_against_its_bundle (Rust): {rust:?}"
        );
        let watch = std::fs::read_to_string(&self.watch_log).unwrap_or_default();
        let lines: Vec<&str> = watch.lines().collect();
        assert!(!lines.is_empty(), "[{name}] the py-spiffe stream saw nothing");
        for line in &lines {
            // A stream breaks only when its agent restarts (a declared window).
            let broke = line.contains(" ERROR ") && !self.allowed.is_empty();
            assert!(
                line.ends_with(" verified") || broke,
                "[{name}] every_svid_verifies_against_its_bundle (py-spiffe): {line}"
            );
        }
        // Invariant 2: no fetch is denied; none fails outside the declared windows.
        let allowed = |f: &Fetch| self.allowed.iter().any(|(from, to)| f.ended >= *from && f.at <= *to);
        for f in &fetches {
            if let Err(e) = &f.outcome {
                assert!(
                    !e.contains("PERMISSION_DENIED") && !e.contains("PermissionDenied"),
                    "[{name}] no_held_identity_is_denied: {e}"
                );
                assert!(
                    allowed(f),
                    "[{name}] no_held_identity_is_denied (outside any window): {e}"
                );
            }
        }
        // Invariant 3: status agrees with the workloads within a few seconds: a fetch that fails
        // has `tbotctl status` unhealthy (exit code not 0) near it.
        // A fetch that found no daemon at all (restarted: its socket is gone) has no status to
        // disagree with: `tbotctl status` cannot be healthy then either.
        let no_daemon = |f: &&Fetch| {
            f.outcome.as_ref().is_err_and(|e| {
                // The socket gone, in the words of each client: ours, and grpcio's two (py-spiffe
                // says `No such file or directory` when the path is missing).
                e.contains("does not exist")
                    || e.contains("onnection refused")
                    || e.contains("No such file or directory")
            })
        };
        for f in fetches.iter().filter(|f| f.outcome.is_err()).filter(|f| !no_daemon(f)) {
            let near = |at: Instant| at + AGREE >= f.at && at <= f.ended + AGREE;
            let unhealthy = statuses.iter().any(|(at, code)| near(*at) && *code != Some(0));
            assert!(
                unhealthy,
                "[{name}] status_is_not_healthy_while_fetches_fail: {:?}",
                f.outcome
            );
        }
        Summary {
            fetches: fetches.len(),
            failed: fetches.iter().filter(|f| f.outcome.is_err()).count(),
            stream_messages: lines.len(),
            statuses: statuses.len(),
        }
    }
}

/// What one agent's workloads did in a scenario.
#[derive(Debug)]
pub struct Summary {
    pub fetches: usize,
    /// Inside the declared windows only.
    pub failed: usize,
    pub stream_messages: usize,
    pub statuses: usize,
}

/// Each event and its time to convergence, printed at the end (`--no-capture` shows it).
#[derive(Default)]
pub struct Timeline(Mutex<Vec<(String, Duration)>>);

impl Timeline {
    pub fn record(&self, event: &str, took: Duration) {
        self.0.lock().unwrap().push((event.to_owned(), took));
    }

    pub fn print(&self, topology: &str) {
        println!("scenario {topology}: event → converged");
        for (event, took) in self.0.lock().unwrap().iter() {
            println!("  {event:<70} {:>8.0} ms", took.as_secs_f64() * 1000.0);
        }
    }
}

/// Waits until `f` holds (30 s, [`super::wait_until`]); returns how long it took.
pub fn until(what: &str, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    super::wait_until(what, Duration::from_secs(30), || f().then_some(()));
    start.elapsed()
}
