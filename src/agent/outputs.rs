//! File outputs (`workload-identity-x509`, `workload-identity-jwt`): SVIDs written to a directory for
//! programs that read PEM files and reload on a signal (nginx, HAProxy, PostgreSQL, Kafka, Java).
//! An output acts as the bot itself (no workload attestation). Every file is replaced atomically
//! (a temp file created `O_EXCL`, fsync, `rename(2)`, fsync of the directory), the key before the
//! certificate; `credential-bundle.private-key.pem` holds the key and the chain in one file, always
//! consistent in a single read. After each write `on_update` runs; a failure is reported and tried
//! again at the next write, never in a loop.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::bot::jitter;
use super::{Agent, Slot, X509Material};
use crate::error::Explain;
use crate::issuer::{Attributes, Bundles, IdentitySelector, IssuerError, Resolved};
use crate::resource::agent::{Destination, FileMode, OnUpdate, ServiceType, SignalName};
use crate::store::{Owner, replace_file};

/// The x509 output's files, in the order they are replaced.
pub const X509_FILES: [&str; 4] = [
    "svid_key.pem",
    "svid.pem",
    "svid_bundle.pem",
    "credential-bundle.private-key.pem",
];
/// The jwt output's files.
pub const JWT_FILES: [&str; 2] = ["jwt_svid", "jwt_bundle.json"];

/// How long `exec` may run by default.
pub const HOOK_TIMEOUT: Duration = Duration::from_secs(30);

/// What one output does, from its service in the agent config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputSpec {
    pub name: String,
    pub kind: ServiceType,
    pub selector: IdentitySelector,
    pub ttl: Duration,
    /// Renew this often instead of at half the lifetime.
    pub renewal: Option<Duration>,
    pub audiences: Vec<String>,
    pub destination: Destination,
    pub on_update: Option<OnUpdate>,
    /// `include_federated_trust_bundles`: `svid_bundle.pem` also holds the federated domains' CAs.
    pub federated: bool,
}

/// Where an output stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputState {
    /// The last issuance or write failed.
    Failing,
    /// Written, but `on_update` failed.
    HookFailed,
    /// Not written yet.
    Pending,
    /// Written, and its hook ran.
    Written,
}

/// What an output last did, for `tbotctl status`, the conditions and `--oneshot`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Successful writes so far.
    pub writes: u64,
    /// When the files were last replaced.
    pub written: Option<OffsetDateTime>,
    pub spiffe_id: String,
    /// When the SVID in the files expires.
    pub expires: Option<OffsetDateTime>,
    /// Why the last attempt to issue or write failed (cleared by the next write).
    pub error: Option<String>,
    /// Why `on_update` failed after the last write.
    pub hook_error: Option<String>,
}

impl Report {
    /// Whether the output has done what it is for (written, and its hook ran).
    pub fn healthy(&self) -> bool {
        self.state() == OutputState::Written
    }

    /// Whether the last issuance, write or hook failed.
    pub fn failing(&self) -> bool {
        self.error.is_some() || self.hook_error.is_some()
    }

    /// Where the output stands.
    pub fn state(&self) -> OutputState {
        match (&self.error, &self.hook_error, self.writes) {
            (Some(_), _, _) => OutputState::Failing,
            (None, Some(_), _) => OutputState::HookFailed,
            (None, None, 0) => OutputState::Pending,
            (None, None, _) => OutputState::Written,
        }
    }

    /// One line for status and logs.
    pub fn describe(&self) -> String {
        let format = |t: &OffsetDateTime| {
            t.format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default()
        };
        let mut out = match (&self.written, &self.expires) {
            (Some(w), Some(e)) => format!("{} written {}, expires {}", self.spiffe_id, format(w), format(e)),
            _ => "not written yet".to_owned(),
        };
        if let Some(e) = &self.error {
            out.push_str(&format!("; FAILING: {e}"));
        }
        if let Some(e) = &self.hook_error {
            out.push_str(&format!("; on_update FAILED: {e} (tried again at the next renewal)"));
        }
        out
    }
}

/// A running output.
pub struct Output {
    pub spec: OutputSpec,
    report: watch::Receiver<Report>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Output {
    /// Starts writing and renewing.
    pub fn spawn(agent: Arc<Agent>, spec: OutputSpec) -> Output {
        let (report_tx, report) = watch::channel(Report::default());
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(run(agent, spec.clone(), report_tx, stop_rx, false));
        Output {
            spec,
            report,
            stop,
            task,
        }
    }

    /// What it last did, and every change.
    pub fn report(&self) -> watch::Receiver<Report> {
        self.report.clone()
    }

    /// Stops renewing; the files stay.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
    }
}

/// Writes the output once and runs its hook (`tbot start --oneshot`).
pub async fn write_once(agent: Arc<Agent>, spec: OutputSpec) -> Report {
    let (report_tx, mut report) = watch::channel(Report::default());
    let (_stop, stop_rx) = watch::channel(false);
    run(agent, spec, report_tx, stop_rx, true).await;
    report.borrow_and_update().clone()
}

/// Why an output cannot issue or write. Each message says what to do next; the output tries again
/// with backoff, and its condition shows the message meanwhile.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("{source}; {} (an output acts as the bot itself: no workload attributes are attested)", source.hint())]
    Resolve { source: IssuerError },
    #[error("no workload identity matches the output's selector; check `selector` and the identities' rules")]
    NoMatch,
    #[error("the selector matches {} workload identities ({}); an output writes one: select it by `name`", .0.len(), .0.join(", "))]
    Several(Vec<String>),
    #[error(
        "workload_identity/{identity} reads {}, which an output cannot have (it acts as the bot itself, with no \
         workload attestation); give the output an identity whose rules and templates read only `bot.*` \
         and `join.*` attributes, or serve this one on a `workload-identity-api` socket",
        reads.join(", ")
    )]
    ReadsWorkload { identity: String, reads: Vec<String> },
    /// The shared cache's slot could not issue the X509-SVID (its message says why).
    #[error("{0}")]
    Issue(String),
    #[error("{source}; {}", source.hint())]
    Jwt { source: IssuerError },
    #[error(transparent)]
    Write(#[from] WriteError),
}

/// Why an output's files could not be written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(
        "cannot {action} {}: {source}; check the owner and permissions of its parent, or choose another `destination.path`",
        path.display()
    )]
    Directory {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cannot {action} {}: {source}; check that tbot may write there (owner, permissions, free space), \
         or choose another `destination.path`",
        path.display()
    )]
    Replace {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read {file}: {source}")]
    IdFile { file: &'static str, source: std::io::Error },
    #[error("no {what} `{name}` in {file}; write its numeric id instead")]
    NoId {
        what: &'static str,
        name: String,
        file: &'static str,
    },
}

/// Why `on_update` failed: each says what failed and what to check.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error(
        "cannot read the pid file {}: {source}; is the process running, and is `pid_file` its pid file?",
        path.display()
    )]
    PidFile { path: PathBuf, source: std::io::Error },
    #[error(
        "{} does not hold a pid (`{text}`); point `pid_file` at the file the process writes its pid to",
        path.display()
    )]
    NotAPid { path: PathBuf, text: String },
    #[error(
        "cannot send {signal} to pid {pid} (from {}): {source}; the process may have exited (a stale pid file), \
         or tbot may not signal it (run tbot as its user or as root)",
        path.display()
    )]
    Signal {
        signal: SignalName,
        pid: i32,
        path: PathBuf,
        source: rustix::io::Errno,
    },
    #[error(
        "`{command}` ran longer than {timeout:?} and was killed; make it return sooner, or raise `on_update.timeout`"
    )]
    Timeout { command: String, timeout: Duration },
    #[error("cannot run `{command}`: {source}; write the program's absolute path in `on_update.exec`")]
    Spawn { command: String, source: std::io::Error },
    #[error("`{command}` failed ({status}): {stderr}; run it by hand to see why")]
    Failed {
        command: String,
        status: std::process::ExitStatus,
        /// The end of what it said on stderr: the error is usually last.
        stderr: String,
    },
}

/// The one identity an output is for, checked to need no workload attributes.
async fn resolve(agent: &Agent, spec: &OutputSpec) -> Result<Resolved, OutputError> {
    let resolved = agent
        .resolve(&spec.selector, &Attributes::new())
        .await
        .map_err(|source| OutputError::Resolve { source })?;
    let resolved = match resolved.as_slice() {
        [one] => one.clone(),
        [] => return Err(OutputError::NoMatch),
        many => return Err(OutputError::Several(many.iter().map(|r| r.name.clone()).collect())),
    };
    if !resolved.reads.is_empty() {
        return Err(OutputError::ReadsWorkload {
            identity: resolved.name.clone(),
            reads: resolved.reads.clone(),
        });
    }
    Ok(resolved)
}

/// Why a writing loop ended.
enum Ended {
    /// The documents changed: resolve the output's identity again.
    Resolve,
    Stop,
}

/// What the writing loops work with.
struct Job<'a> {
    agent: &'a Agent,
    spec: &'a OutputSpec,
    report: &'a watch::Sender<Report>,
    /// Write once and end (`--oneshot`).
    once: bool,
}

async fn run(
    agent: Arc<Agent>,
    spec: OutputSpec,
    report: watch::Sender<Report>,
    mut stop: watch::Receiver<bool>,
    once: bool,
) {
    let job = Job {
        agent: &agent,
        spec: &spec,
        report: &report,
        once,
    };
    let mut policy = agent.policy_changes();
    let mut backoff = Duration::from_secs(1);
    // What the files hold: an edit that leaves the SVID as it was rewrites nothing and runs no hook.
    let mut written = None;
    loop {
        policy.mark_unchanged();
        let outcome = match resolve(&agent, &spec).await {
            Ok(resolved) => match spec.kind {
                ServiceType::WorkloadIdentityJwt => job.jwt(&resolved, &mut stop).await,
                _ => job.x509(&resolved, &mut stop, &mut written).await,
            },
            Err(error) => Err(error),
        };
        let wait = match outcome {
            Ok(Ended::Stop) => return,
            Ok(Ended::Resolve) => {
                backoff = Duration::from_secs(1);
                continue;
            }
            Err(error) => {
                tracing::warn!(output = %spec.name, %error, "the output cannot be written");
                agent.metrics.output(&spec.name, "failed");
                report.send_modify(|r| r.error = Some(error.to_string()));
                if once {
                    return;
                }
                let wait = backoff.mul_f64(jitter(0.2));
                backoff = (backoff * 2).min(Duration::from_secs(300));
                wait
            }
        };
        // A document edit may fix it at once.
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            Ok(()) = policy.changed() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// The SVID and bundle an x509 output's files hold.
type Written = Option<(Arc<X509Material>, Arc<Bundles>)>;

/// Waits for a change of the SVID (`slot`, when there is one) or the bundle (`None`), or for a
/// reason to end.
async fn changed(
    slot: Option<&mut watch::Receiver<Slot>>,
    bundles: &mut watch::Receiver<Arc<Bundles>>,
    policy: &mut watch::Receiver<u64>,
    stop: &mut watch::Receiver<bool>,
) -> Option<Ended> {
    let slot_changed = async {
        match slot {
            Some(slot) => slot.changed().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        Ok(()) = slot_changed => None,
        Ok(()) = bundles.changed() => None,
        Ok(()) = policy.changed() => Some(Ended::Resolve),
        _ = stop.wait_for(|s| *s) => Some(Ended::Stop),
        else => Some(Ended::Stop),
    }
}

impl Job<'_> {
    /// Writes the x509 files whenever the SVID or the bundle changes (the cache renews the SVID).
    async fn x509(
        &self,
        resolved: &Resolved,
        stop: &mut watch::Receiver<bool>,
        last: &mut Written,
    ) -> Result<Ended, OutputError> {
        let spec = self.spec;
        let mut slot = self
            .agent
            .cache
            .x509_every(resolved, &Attributes::new(), spec.ttl, spec.renewal);
        let (mut bundles, mut policy) = (self.agent.bundles(), self.agent.policy_changes());
        loop {
            let current = slot.borrow_and_update().clone();
            let bundle = bundles.borrow_and_update().clone();
            match current {
                Slot::Pending => {}
                Slot::Failed { error, .. } => return Err(OutputError::Issue(error)),
                Slot::Ready(material) => {
                    let same = last
                        .as_ref()
                        .is_some_and(|(m, b)| Arc::ptr_eq(m, &material) && Arc::ptr_eq(b, &bundle));
                    if !same {
                        write_x509(&spec.destination, &material, &bundle, spec.federated)?;
                        self.wrote(&material.svid.spiffe_id, material.svid.not_after).await;
                        *last = Some((material, bundle));
                        if self.once {
                            return Ok(Ended::Stop);
                        }
                    }
                }
            }
            if let Some(ended) = changed(Some(&mut slot), &mut bundles, &mut policy, stop).await {
                return Ok(ended);
            }
        }
    }

    /// Issues a JWT-SVID, writes it with the JWKS, and again at half its lifetime (or every
    /// `renewal_interval`); a bundle change rewrites the JWKS.
    async fn jwt(&self, resolved: &Resolved, stop: &mut watch::Receiver<bool>) -> Result<Ended, OutputError> {
        let spec = self.spec;
        let (mut bundles, mut policy) = (self.agent.bundles(), self.agent.policy_changes());
        loop {
            let issued = OffsetDateTime::now_utc();
            let svid = self
                .agent
                .cache
                .jwt_uncached(resolved, &Attributes::new(), &spec.audiences, spec.ttl)
                .await
                .map_err(|source| OutputError::Jwt { source })?;
            let lifetime: Duration = (svid.expires - issued).try_into().unwrap_or(Duration::ZERO);
            let renew_at = tokio::time::Instant::now()
                + spec
                    .renewal
                    .unwrap_or_else(|| lifetime.mul_f64(0.5 * jitter(0.1)))
                    .min(lifetime.mul_f64(0.9));
            loop {
                let bundle = bundles.borrow_and_update().clone();
                write_jwt(&spec.destination, &svid.token, &bundle)?;
                self.wrote(&svid.spiffe_id, svid.expires).await;
                if self.once {
                    return Ok(Ended::Stop);
                }
                tokio::select! {
                    _ = tokio::time::sleep_until(renew_at) => break,
                    ended = changed(None, &mut bundles, &mut policy, stop) => match ended {
                        None => continue,
                        Some(ended) => return Ok(ended),
                    },
                }
            }
        }
    }

    /// After a write: the hook, the report, the metric.
    async fn wrote(&self, spiffe_id: &str, expires: OffsetDateTime) {
        let spec = self.spec;
        let metrics = &self.agent.metrics;
        metrics.output(&spec.name, "written");
        let hook = match &spec.on_update {
            Some(hook) => run_hook(hook).await.err(),
            None => None,
        };
        if let Some(error) = &hook {
            metrics.output(&spec.name, "hook_failed");
            tracing::warn!(output = %spec.name, %error, "on_update failed; it runs again at the next renewal");
        }
        tracing::info!(output = %spec.name, spiffe_id, path = %spec.destination.path.display(), "output written");
        self.report.send_modify(|r| {
            r.writes += 1;
            r.written = Some(OffsetDateTime::now_utc());
            r.spiffe_id = spiffe_id.to_owned();
            r.expires = Some(expires);
            r.error = None;
            r.hook_error = hook.map(|h| h.to_string());
        });
    }
}

/// Sends the signal, or runs the command. An error says what failed and what to check.
pub async fn run_hook(hook: &OnUpdate) -> Result<(), HookError> {
    if let (Some(signal), Some(pid_file)) = (hook.signal, &hook.pid_file) {
        let text = std::fs::read_to_string(pid_file).map_err(|source| HookError::PidFile {
            path: pid_file.clone(),
            source,
        })?;
        let pid = text
            .trim()
            .parse::<i32>()
            .ok()
            .and_then(rustix::process::Pid::from_raw)
            .ok_or_else(|| HookError::NotAPid {
                path: pid_file.clone(),
                text: text.trim().to_owned(),
            })?;
        return rustix::process::kill_process(pid, signal_of(signal)).map_err(|source| HookError::Signal {
            signal,
            pid: pid.as_raw_nonzero().get(),
            path: pid_file.clone(),
            source,
        });
    }
    let Some((program, args)) = hook.exec.split_first() else {
        return Ok(());
    };
    let timeout = hook.timeout.map(|t| t.as_std()).unwrap_or(HOOK_TIMEOUT);
    let child = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let command = hook.exec.join(" ");
    match tokio::time::timeout(timeout, child).await {
        Err(_) => Err(HookError::Timeout { command, timeout }),
        Ok(Err(source)) => Err(HookError::Spawn { command, source }),
        Ok(Ok(out)) if out.status.success() => Ok(()),
        Ok(Ok(out)) => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let stderr = stderr.trim();
            // The end of what it said: the error is usually last.
            let start = stderr.char_indices().rev().nth(299).map_or(0, |(i, _)| i);
            Err(HookError::Failed {
                command,
                status: out.status,
                stderr: stderr[start..].to_owned(),
            })
        }
    }
}

fn signal_of(signal: SignalName) -> rustix::process::Signal {
    use rustix::process::Signal;
    match signal {
        SignalName::SIGHUP => Signal::HUP,
        SignalName::SIGUSR1 => Signal::USR1,
        SignalName::SIGUSR2 => Signal::USR2,
        SignalName::SIGINT => Signal::INT,
        SignalName::SIGQUIT => Signal::QUIT,
        SignalName::SIGTERM => Signal::TERM,
        SignalName::SIGWINCH => Signal::WINCH,
    }
}

/// Writes the x509 files: the key first, then the certificate, the bundle, the combined file.
pub fn write_x509(
    destination: &Destination,
    material: &X509Material,
    bundles: &Bundles,
    federated: bool,
) -> Result<(), WriteError> {
    let dir = Directory::open(destination)?;
    let key = crate::pem::private_key(&material.key);
    let chain = crate::pem::certificates([&material.svid.certificate]);
    let foreign = bundles
        .federated
        .values()
        .filter(|_| federated)
        .flat_map(|b| b.x509_authorities.iter());
    let bundle = crate::pem::certificates(bundles.x509_authorities.iter().chain(foreign));
    let combined = format!("{key}{chain}");
    for (name, text) in X509_FILES.iter().zip([&key, &chain, &bundle, &combined]) {
        dir.replace(name, text.as_bytes())?;
    }
    Ok(())
}

/// Writes the JWT-SVID (no trailing newline) and the JWT bundle (a JWK Set).
pub fn write_jwt(destination: &Destination, token: &str, bundles: &Bundles) -> Result<(), WriteError> {
    let dir = Directory::open(destination)?;
    dir.replace(JWT_FILES[0], token.as_bytes())?;
    let jwks = serde_json::to_vec_pretty(&bundles.jwks()).expect("JSON");
    dir.replace(JWT_FILES[1], &jwks)
}

/// An output directory, ready for atomic replacements.
struct Directory {
    path: PathBuf,
    mode: FileMode,
    owner: Owner,
}

impl Directory {
    /// Creates the directory if missing (with the files' mode plus `x` where `r`), and resolves the
    /// owner and group.
    fn open(destination: &Destination) -> Result<Directory, WriteError> {
        let mode = destination.mode.unwrap_or(FileMode::DEFAULT);
        let owner = Owner {
            uid: destination
                .owner
                .as_deref()
                .map(|o| id_of(o, "/etc/passwd", "user"))
                .transpose()?,
            gid: destination
                .group
                .as_deref()
                .map(|g| id_of(g, "/etc/group", "group"))
                .transpose()?,
        };
        let path = destination.path.clone();
        let fail = |action: &'static str, source: std::io::Error| WriteError::Directory {
            action,
            path: path.clone(),
            source,
        };
        if !path.is_dir() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(mode.directory())
                .create(&path)
                .map_err(|e| fail("create the directory", e))?;
            // The umask may have taken bits away.
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode.directory()))
                .map_err(|e| fail("set the mode of", e))?;
            if owner != Owner::default() {
                std::os::unix::fs::chown(&path, owner.uid, owner.gid)
                    .map_err(|e| fail("give its owner and group", e))?;
            }
        }
        Ok(Directory { path, mode, owner })
    }

    /// Replaces `name` atomically ([`crate::store::replace_file`]).
    fn replace(&self, name: &str, bytes: &[u8]) -> Result<(), WriteError> {
        let target = self.path.join(name);
        replace_file(&target, bytes, self.mode.0, self.owner).map_err(|(action, source)| WriteError::Replace {
            action,
            path: target.clone(),
            source,
        })
    }
}

/// A user or group by name (from `file`) or by number.
fn id_of(name: &str, file: &'static str, what: &'static str) -> Result<u32, WriteError> {
    if let Ok(id) = name.parse::<u32>() {
        return Ok(id);
    }
    let text = std::fs::read_to_string(file).map_err(|source| WriteError::IdFile { file, source })?;
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split(':');
            Some((fields.next()?, fields.nth(1)?))
        })
        .find(|(n, _)| *n == name)
        .and_then(|(_, id)| id.parse().ok())
        .ok_or_else(|| WriteError::NoId {
            what,
            name: name.to_owned(),
            file,
        })
}
