//! Helpers shared by the integration tests: run the real binaries and read their output.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub mod etcd;
pub mod fleet;
pub mod ha;
pub mod haproxy;
pub mod podman;
pub mod scenario;

/// The repository root; the tests run the binaries from here so that printed paths are relative.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `tbotctl` with `args` from the repository root.
pub fn tbotctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tbotctl"))
        .args(args)
        .current_dir(root())
        .output()
        .expect("tbotctl runs")
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The lines of `tbotctl validate` output that a fixture pins: every `path[:line:col]: severity:`
/// line (errors, warnings, notes) and the closing `ok:`/`invalid:` line.
pub fn pinned_lines(text: &str) -> Vec<String> {
    text.lines()
        .filter(|line| {
            line.starts_with("ok: ")
                || line.starts_with("invalid: ")
                || [": error: ", ": warning: ", ": note: "].iter().any(|tag| {
                    line.split_once(tag)
                        .is_some_and(|(location, _)| !location.starts_with(' ') && !location.contains(" | "))
                })
        })
        .map(str::to_owned)
        .collect()
}

/// The path as the tests pass it to tbotctl: relative to the repository root.
pub fn relative(path: &Path) -> String {
    path.strip_prefix(root()).unwrap_or(path).display().to_string()
}

/// The issuer's policy from YAML documents (checked to load without errors).
pub fn policy(text: &str) -> tbot::issuer::Policy {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("docs.yaml");
    std::fs::write(&file, text).unwrap();
    let loaded = tbot::manifest::load(&[tbot::manifest::Input::File(file)]).unwrap();
    assert!(!loaded.has_errors(), "{:#?}", loaded.diagnostics);
    tbot::issuer::Policy::from_state(&loaded.state).unwrap()
}

/// DER as PEM with `label`.
pub fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!("-----BEGIN {label}-----\n{}\n-----END {label}-----\n", lines.join("\n"))
}

/// A `token` join with `key` (an hour's certificate), as an agent makes it.
pub fn token_join(key: &rcgen::KeyPair, token: &str) -> tbot::issuer::JoinRequest {
    use rcgen::PublicKeyData;
    tbot::issuer::JoinRequest {
        token: token.into(),
        public_key: key.subject_public_key_info(),
        proof: tbot::issuer::JoinProof::Token,
        ttl: Duration::from_secs(3600),
        current: None,
        address: String::new(),
    }
}

/// A renewal of `current` (held with `current_key`) for the new key `next`, signed as an agent signs it.
pub fn renewal(current: &[u8], current_key: &rcgen::KeyPair, next: &rcgen::KeyPair) -> tbot::issuer::RenewRequest {
    use rcgen::{PublicKeyData, SigningKey};
    let public_key = next.subject_public_key_info();
    tbot::issuer::RenewRequest {
        certificate: current.to_vec(),
        proof: current_key.sign(&public_key).unwrap(),
        public_key,
        ttl: Duration::from_secs(3600),
        address: String::new(),
    }
}

/// Runs `openssl` with `args`; panics with its output when it fails.
pub fn openssl(args: &[&str]) -> String {
    let out = Command::new("openssl").args(args).output().expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A running `tbot start`, stopped with SIGTERM on drop.
pub struct Daemon {
    child: Child,
    pub socket: PathBuf,
    pub dir: tempfile::TempDir,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
    }
}

impl Daemon {
    /// Stops the daemon (SIGTERM) and starts it again on the same directory and storage.
    pub fn restart(mut self) -> Daemon {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        let socket = self.socket.clone();
        drop(self);
        Daemon::start(dir, socket)
    }

    /// Runs `tbotctl` against this daemon's directory.
    pub fn tbotctl(&self, args: &[&str]) -> Output {
        let etc = self.dir.path().join("etc");
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--dir", etc.to_str().unwrap()]);
        tbotctl(&all)
    }

    pub fn endpoint(&self) -> String {
        format!("unix:{}", self.socket.display())
    }

    /// Starts `tbot start` on `dir` and waits until the socket answers.
    pub fn start(dir: tempfile::TempDir, socket: PathBuf) -> Daemon {
        Daemon::start_with_env(dir, socket, &[])
    }

    /// Like [`Daemon::start`], with extra environment variables.
    pub fn start_with_env(dir: tempfile::TempDir, socket: PathBuf, env: &[(&str, &str)]) -> Daemon {
        let mut daemon = Daemon::spawn(dir, socket, env);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(&daemon.socket).is_err() {
            if let Ok(Some(status)) = daemon.child.try_wait() {
                panic!("tbot start exited with {status}:\n{}", daemon.log());
            }
            assert!(Instant::now() < deadline, "no socket after 30s:\n{}", daemon.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        daemon
    }

    /// Starts `tbot start` on `dir` without waiting for anything (a new `tbot.log`).
    pub fn spawn(dir: tempfile::TempDir, socket: PathBuf, env: &[(&str, &str)]) -> Daemon {
        let log = std::fs::File::create(dir.path().join("tbot.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_tbot"))
            .args(["start", "--config-dir"])
            .arg(dir.path().join("etc"))
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("tbot starts");
        Daemon { child, socket, dir }
    }

    /// Kills the daemon with SIGKILL (no cleanup of any kind) and hands back its directory.
    pub fn crash(mut self) -> (tempfile::TempDir, PathBuf) {
        self.child.kill().expect("SIGKILL is delivered");
        let _ = self.child.wait();
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        (dir, self.socket.clone())
    }

    /// Whether the daemon has exited, without waiting.
    pub fn try_wait(&mut self) -> std::io::Result<Option<std::process::ExitStatus>> {
        self.child.try_wait()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the daemon to exit by itself.
    pub fn wait(&mut self) -> std::process::ExitStatus {
        self.child.wait().expect("the daemon can be waited for")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("tbot.log")).unwrap_or_default()
    }
}

/// Copies a bundled directory into a temporary one, applying `edits` (file, from, to) to its text.
pub fn copy_manifests(from: &str, edits: &[(&str, &str, &str)]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let etc = dir.path().join("etc");
    std::fs::create_dir(&etc).unwrap();
    let socket = dir.path().join("run/workload.sock");
    for entry in std::fs::read_dir(root().join(from)).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        let mut text = std::fs::read_to_string(&path).unwrap();
        for (file, old, new) in edits {
            if *file == name {
                assert!(text.contains(old), "{name} has no `{old}`");
                text = text.replace(
                    old,
                    &new.replace("SOCKET", socket.to_str().unwrap())
                        .replace("DIR", dir.path().to_str().unwrap()),
                );
            }
        }
        std::fs::write(etc.join(&name), text).unwrap();
    }
    (dir, socket)
}

/// Edits that make a copy of the quickstart private: its own socket and admin socket, memory storage.
pub const QUICKSTART_IN_MEMORY: [(&str, &str, &str); 3] = [
    (
        "tbot.yaml",
        "unix:///tmp/tbot-quickstart/workload.sock",
        "unix://SOCKET",
    ),
    (
        "tbot.yaml",
        "type: directory\n  path: /tmp/tbot-quickstart/state",
        "type: memory",
    ),
    (
        "tbot.yaml",
        "admin_socket: /tmp/tbot-quickstart/admin.sock",
        "admin_socket: DIR/admin.sock",
    ),
];

/// Like [`QUICKSTART_IN_MEMORY`], with directory storage under the copy's own `state/`.
pub const QUICKSTART_ON_DISK: [(&str, &str, &str); 3] = [
    (
        "tbot.yaml",
        "unix:///tmp/tbot-quickstart/workload.sock",
        "unix://SOCKET",
    ),
    ("tbot.yaml", "path: /tmp/tbot-quickstart/state", "path: DIR/state"),
    (
        "tbot.yaml",
        "admin_socket: /tmp/tbot-quickstart/admin.sock",
        "admin_socket: DIR/admin.sock",
    ),
];

/// The quickstart, in memory, on a temporary socket, with extra agent settings.
pub fn quickstart(agent_extra: &str) -> Daemon {
    let storage = "storage:\n  type: directory\n  path: /tmp/tbot-quickstart/state\n";
    let (dir, socket) = copy_manifests(
        "manifests/quickstart",
        &[
            (
                "tbot.yaml",
                "unix:///tmp/tbot-quickstart/workload.sock",
                "unix://SOCKET",
            ),
            (
                "tbot.yaml",
                storage,
                &format!("storage:\n  type: memory\n{agent_extra}"),
            ),
            ("tbot.yaml", "credential_ttl: 1h\nrenewal_interval: 20m\n", ""),
            (
                "tbot.yaml",
                "admin_socket: /tmp/tbot-quickstart/admin.sock\n",
                "admin_socket: DIR/admin.sock\n",
            ),
        ],
    );
    Daemon::start(dir, socket)
}

/// Waits (up to 15 s) until the daemon's log contains `needle`.
pub fn wait_for_log(daemon: &Daemon, needle: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if daemon.log().contains(needle) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Two identities that read no workload attribute (`server` and `client`, labelled like the
/// quickstart's): what file outputs can be given.
pub const OUTPUT_IDENTITIES: &str = "kind: workload_identity
version: v1
metadata:
  name: server
  labels: {app: quickstart}
spec:
  spiffe:
    id: /svc/server
---
kind: workload_identity
version: v1
metadata:
  name: client
  labels: {app: quickstart}
spec:
  spiffe:
    id: /svc/client
";

/// A free loopback port (bound and released).
pub fn free_port() -> u16 {
    // The kernel may hand the same port out again once its listener is gone: a test that asked for
    // two (an issuer's API and its bundle endpoint) once got one port twice. Never twice here.
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if GIVEN.lock().unwrap().insert(port) {
            return port;
        }
    }
}

/// A child process (a peer server the test started), killed and reaped on drop.
pub struct Reaped(pub Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A self-signed P-256 certificate made by `openssl req`, with `subject` and, when given, extra
/// `-addext` settings (a SAN).
pub fn self_signed(cert: &Path, key: &Path, subject: &str, addext: Option<&str>) {
    let mut args = vec![
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-days",
        "1",
        "-subj",
        subject,
        "-keyout",
        key.to_str().unwrap(),
        "-out",
        cert.to_str().unwrap(),
    ];
    if let Some(ext) = addext {
        args.extend(["-addext", ext]);
    }
    openssl(&args);
}

/// An HTTP/1.1 `GET /` over TLS with `openssl s_client` (which, unlike curl, checks no host name:
/// an SVID has only a URI SAN), presenting `client` (certificate, key) when given and verifying the
/// server against `ca`. Returns everything s_client printed: the server's certificate, then the
/// answer, or why the handshake failed.
pub fn tls_get(port: u16, client: Option<(&Path, &Path)>, ca: &Path) -> String {
    use std::io::Write;
    let address = format!("127.0.0.1:{port}");
    let mut args = vec![
        "s_client",
        "-connect",
        &address,
        "-ign_eof",
        "-verify_return_error",
        "-CAfile",
        ca.to_str().unwrap(),
    ];
    if let Some((cert, key)) = client {
        args.extend(["-cert", cert.to_str().unwrap(), "-key", key.to_str().unwrap()]);
    }
    let mut child = Command::new("openssl")
        .args(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl runs");
    // A refused handshake may end openssl before it reads the request: a broken pipe is its answer.
    let _ = child
        .stdin
        .take()
        .unwrap()
        .write_all(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    let out = child.wait_with_output().unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Polls `f` every 50 ms until it gives a value; panics naming `what` after `timeout`.
pub fn wait_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Replaces a file the way editors do: write a temporary file, then rename it over the old one.
pub fn save(path: &Path, text: &str) {
    let temp = path.with_extension("yaml.tmp~");
    std::fs::write(&temp, text).unwrap();
    std::fs::rename(&temp, path).unwrap();
}

/// Where `scripts/test.sh` installed a kind of test peer: `$var`, else `default` under the repository.
pub fn peer_dir(var: &str, default: &str) -> PathBuf {
    std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(default))
}

/// A test peer (a client nobody here wrote, a server) is not installed: with `CI=true` that fails
/// the test; elsewhere the test says so and returns.
pub fn peer_missing(message: &str) {
    assert!(std::env::var("CI").as_deref() != Ok("true"), "{message}");
    eprintln!("skipping: {message}");
}

/// The test venv's python when it can import `modules` (`"spiffe, grpc"`); else the missing peer is
/// reported ([`peer_missing`]) and `None` returned.
pub fn venv_python(modules: &str) -> Option<PathBuf> {
    let dir = peer_dir("TBOT_TEST_VENV", "target/test-venv");
    let python = dir.join("bin/python");
    let importable = Command::new(&python)
        .args(["-c", &format!("import {modules}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if importable {
        return Some(python);
    }
    peer_missing(&format!(
        "{modules} cannot be imported in {}; run scripts/test.sh, which installs the Python peers",
        dir.display()
    ));
    None
}

/// A `FetchX509SVID` stream as the `spiffe` crate gives it.
pub type Contexts =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<spiffe::X509Context, spiffe::WorkloadApiError>> + Send>>;

/// Opens a stream on the daemon's socket with the `spiffe` crate and reads its first message.
pub async fn open_stream(daemon: &Daemon) -> (Contexts, spiffe::X509Context) {
    use tokio_stream::StreamExt;
    let client = spiffe::WorkloadApiClient::connect_to(daemon.endpoint()).await.unwrap();
    let mut stream: Contexts = Box::pin(client.stream_x509_contexts().await.unwrap());
    let first = stream.next().await.unwrap().unwrap();
    (stream, first)
}

/// The SPIFFE ID of a context's first SVID.
pub fn id(ctx: &spiffe::X509Context) -> String {
    ctx.svids()[0].spiffe_id().to_string()
}

/// The cgroup directory of a systemd service, v1 `name=systemd` hierarchy first, else v2.
pub fn service_cgroup(service: &str) -> Option<PathBuf> {
    [
        Path::new("/sys/fs/cgroup/systemd"),
        Path::new("/sys/fs/cgroup/unified"),
        Path::new("/sys/fs/cgroup"),
    ]
    .iter()
    .find(|r| r.join("cgroup.procs").exists())
    .map(|root| root.join("system.slice").join(service))
}

/// The body of a child test process for systemd attestation: when `var` names an endpoint, waits
/// for a line on stdin (the parent moves it into a service's cgroup meanwhile), fetches an X509-SVID
/// with the `spiffe` crate and prints `SPIFFE_ID=…` or `ERROR=…`.
pub async fn child_fetch(var: &str) {
    let Ok(endpoint) = std::env::var(var) else { return };
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).unwrap();
    let client = spiffe::WorkloadApiClient::connect_to(endpoint).await.unwrap();
    match client.fetch_x509_svid().await {
        Ok(svid) => println!("SPIFFE_ID={}", svid.spiffe_id()),
        Err(e) => println!("ERROR={e:?}"),
    }
}

pub type Shared<T> = std::sync::Arc<std::sync::Mutex<T>>;

/// Checks each SVID of every context the stream delivers against the bundle delivered with it
/// (an ECDSA P-256 signature by a CA of that bundle); records the failures and every CA seen.
pub fn verify_stream(mut stream: Contexts) -> (Shared<Vec<String>>, Shared<std::collections::BTreeSet<Vec<u8>>>) {
    let failures = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = std::sync::Arc::new(std::sync::Mutex::new(std::collections::BTreeSet::new()));
    let (f, s) = (failures.clone(), seen.clone());
    tokio::spawn(async move {
        use tokio_stream::StreamExt;
        while let Some(next) = stream.next().await {
            let ctx = match next {
                Ok(ctx) => ctx,
                Err(e) => {
                    f.lock().unwrap().push(format!("stream error: {e}"));
                    break;
                }
            };
            for svid in ctx.svids() {
                let td = svid.spiffe_id().trust_domain();
                let cas: Vec<Vec<u8>> = ctx
                    .bundle_set()
                    .get(td)
                    .map(|b| b.authorities().iter().map(|c| c.as_ref().to_vec()).collect())
                    .unwrap_or_default();
                s.lock().unwrap().extend(cas.iter().cloned());
                let leaf = svid.leaf().as_ref();
                let (_, cert) = x509_parser::parse_x509_certificate(leaf).unwrap();
                let signed = cas.iter().any(|ca| {
                    let (_, ca) = x509_parser::parse_x509_certificate(ca).unwrap();
                    aws_lc_rs::signature::UnparsedPublicKey::new(
                        &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1,
                        &ca.public_key().subject_public_key.data,
                    )
                    .verify(cert.tbs_certificate.as_ref(), &cert.signature_value.data)
                    .is_ok()
                });
                if !signed {
                    f.lock().unwrap().push(format!(
                        "{} does not verify against the {} CAs sent with it",
                        svid.spiffe_id(),
                        cas.len()
                    ));
                }
            }
        }
    });
    (failures, seen)
}
