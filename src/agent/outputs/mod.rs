//! File outputs (`workload-identity-x509`, `workload-identity-jwt`): SVIDs written to a directory for
//! programs that read PEM files and reload on a signal (nginx, HAProxy, PostgreSQL, Kafka, Java).
//! An output acts as the bot itself (no workload attestation). Every file is replaced atomically
//! (a temp file created `O_EXCL`, fsync, `rename(2)`, fsync of the directory), the key before the
//! certificate; `credential-bundle.private-key.pem` holds the key and the chain in one file, always
//! consistent in a single read. After each write `on_update` runs; a failure is reported and tried
//! again at the next write, never in a loop.

use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::bot::jitter;
use super::{Agent, Slot, X509Material};
use crate::error::Explain;
use crate::issuer::{Attributes, Bundles, IdentitySelector, IssuerError, Resolved};
use crate::resource::agent::{Destination, OnUpdate, ServiceType};

mod files;
mod hook;

pub use files::{CRL_FILE, JWT_FILES, WriteError, X509_FILES, write_jwt, write_x509};
pub use hook::{HOOK_TIMEOUT, HookError, run_hook};

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
        let format = |t: &OffsetDateTime| crate::rfc3339(*t);
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

/// Whether the key that signed `token` was tainted, or is no longer in the bundle.
fn signer_gone(token: &str, bundles: &Bundles) -> bool {
    let Some(kid) = crate::agent::cache::kid_of(token) else {
        return false;
    };
    bundles.tainted_kids.contains(&kid) || !bundles.jwt_keys.iter().any(|k| k["kid"] == kid.as_str())
}

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
            // An edit that does not re-decide this identity leaves the token as it is.
            let generation = *policy.borrow();
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
            let mut write = true;
            loop {
                if write {
                    let bundle = bundles.borrow_and_update().clone();
                    write_jwt(&spec.destination, &svid.token, &bundle)?;
                    self.wrote(&svid.spiffe_id, svid.expires).await;
                    if self.once {
                        return Ok(Ended::Stop);
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep_until(renew_at) => break,
                    ended = changed(None, &mut bundles, &mut policy, stop) => match ended {
                        // The key that signed the token was tainted or withdrawn: a new token now.
                        None if signer_gone(&svid.token, &bundles.borrow()) => break,
                        // The bundle changed: the JWKS is written again.
                        None => write = true,
                        Some(Ended::Resolve) if !self.agent.redecided_since(&resolved.name, generation) => {
                            write = false;
                        }
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

impl crate::error::Explain for OutputError {
    fn hint(&self) -> std::borrow::Cow<'_, str> {
        match self {
            OutputError::Issue(_) => "the output tries again with backoff".into(),
            // The others say what to do.
            _ => "".into(),
        }
    }

    fn is_transient(&self) -> bool {
        matches!(
            self,
            OutputError::Issue(_) | OutputError::Jwt { .. } | OutputError::Write(_)
        )
    }
}
