//! The running daemon: start (issuer, agent, listeners), then the level-triggered loop — any event
//! (a file changed, SIGHUP, the periodic resync, a retry) reloads the whole directory, plans against
//! what was last applied, and converges live. SIGTERM/SIGINT stop it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tonic::transport::Server;

use super::persist::Persist;
use super::plan::{Action, Plan, plan};
use super::status::StatusTable;
use super::watch::watch_inputs;
use crate::admin::server::{AdminApi, DaemonInfo};
use crate::agent::attest::{AttestSettings, DEFAULT_HASH_LIMIT};
use crate::agent::bot::jitter;
use crate::agent::outputs::{Output, OutputSpec};
use crate::agent::remote::{RemoteIssuer, RemoteSettings};
use crate::agent::{Agent, JoinSettings};
use crate::cli::render;
use crate::issuer::{IdentitySelector, Issuer, IssuerError, LocalIssuer, Policy};
use crate::manifest::{self, DesiredState, Input, Loaded};
use crate::resource::agent::{AgentConfig, Listen, Service, StorageType};
use crate::resource::issuer::IssuerStorageType;
use crate::resource::{Document, HostRole, Kind, ObjectRef};
use crate::store::Store;
use crate::workload_api::listener;
use crate::workload_api::proto::spiffe_workload_api_server::SpiffeWorkloadApiServer;
use crate::workload_api::sds::proto::secret_discovery_service_server::SecretDiscoveryServiceServer;
use crate::workload_api::server::{ServiceConfig, WorkloadApi};

/// How often the directory is reloaded even without an event (jittered ±20%).
pub const RESYNC: Duration = Duration::from_secs(300);
/// How long events are gathered before one reload.
pub const DEBOUNCE: Duration = Duration::from_millis(100);

/// What `tbot start` was given.
#[derive(Clone)]
pub struct StartOptions {
    pub config_dirs: Vec<PathBuf>,
    pub config_file: Option<PathBuf>,
    /// Overrides the agent config's `diag_addr`.
    pub diag_addr: Option<std::net::SocketAddr>,
    /// Applies the agent config's `debug:` to the log level (`None` when `RUST_LOG` decides).
    pub log_level: Option<LogLevel>,
    /// Write every file output once and exit (`tbot start --oneshot`).
    pub oneshot: bool,
}

/// Switches debug logging on (`true`) or back to the command line's level.
pub type LogLevel = Arc<dyn Fn(bool) + Send + Sync>;

fn fail(message: impl std::fmt::Display, hint: &str) -> ExitCode {
    tracing::error!(hint, "{message}");
    ExitCode::from(1)
}

/// One running file output, with the service it was started from and the agent's lifetime then.
struct RunningOutput {
    service: Service,
    agent_ttl: crate::resource::Duration,
    output: Output,
}

/// An output's condition type on the agent config.
fn output_condition(name: &str) -> String {
    format!("Output/{name}")
}

/// What an output does, from its service.
fn output_spec(service: &Service, agent: &AgentConfig) -> Option<OutputSpec> {
    let config = service_config(service, agent);
    Some(OutputSpec {
        name: service.display_name().to_owned(),
        kind: service.kind,
        selector: config.selector,
        ttl: config.ttl,
        renewal: service.renewal_interval.map(|d| d.as_std()),
        audiences: service.audiences.clone(),
        destination: service.output()?.clone(),
        on_update: service.on_update.clone(),
        federated: service.include_federated_trust_bundles,
    })
}

/// One serving `workload-identity-api` service.
struct Running {
    listen: Listen,
    config: watch::Sender<ServiceConfig>,
    attest: watch::Sender<AttestSettings>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Running {
    /// Stops accepting, ends the streams, and removes the socket.
    async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
        if let Listen::Unix(path) = &self.listen {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A step that failed, the objects it ran for, and whether a retry may help.
struct Failure {
    causes: Vec<ObjectRef>,
    reason: &'static str,
    message: String,
    transient: bool,
}

impl Failure {
    fn new(causes: Vec<ObjectRef>, reason: &'static str, error: &crate::issuer::IssuerError) -> Failure {
        Failure {
            causes,
            reason,
            message: format!("{error}; {}", error.hint()),
            transient: error.is_transient(),
        }
    }
}

/// One object's retry schedule: 1 s doubling to 5 min, ±20%.
struct Backoff {
    delay: Duration,
    next: tokio::time::Instant,
    /// The spec it failed with: an edit clears the backoff.
    hash: String,
}

struct Daemon {
    inputs: Vec<Input>,
    /// What the last load read: a reload re-parses only the files that changed.
    load_cache: Arc<std::sync::Mutex<manifest::LoadCache>>,
    log_level: Option<LogLevel>,
    status: Arc<std::sync::RwLock<StatusTable>>,
    status_version: watch::Sender<u64>,
    info: Arc<std::sync::RwLock<DaemonInfo>>,
    /// The issuer in this process (single host, or an issuer host).
    issuer: Option<Arc<LocalIssuer>>,
    /// The agent, once joined (an issuer host without an agent config has none).
    agent: Option<Arc<Agent>>,
    /// The client of the remote issuer (an agent-only host).
    remote: Option<Arc<RemoteIssuer>>,
    /// Where the agent keeps its identity (opened when the agent first starts: an agent config may
    /// arrive on a running issuer host).
    agent_store: Option<Store>,
    /// The issuer host's store and its directory, shared with the agent when they name the same.
    issuer_store: Option<(Store, Option<PathBuf>)>,
    /// Woken when something shown by `tbotctl status` changes outside the loop (renewals, the link
    /// to the remote issuer).
    poke: Arc<tokio::sync::Notify>,
    /// `applied`, shared with the admin API's Plan call.
    applied_shared: Arc<std::sync::RwLock<Arc<DesiredState>>>,
    /// Objects whose last run failed transiently, and when they may run again.
    backoff: BTreeMap<ObjectRef, Backoff>,
    /// Objects whose last run was refused (terminal), with the spec refused: they wait for an edit.
    refused: BTreeMap<ObjectRef, String>,
    /// What was last applied (the plan's "actual" side); saved to the store after each convergence.
    applied: Arc<DesiredState>,
    /// Writes `applied` and the status to the store, off the reconcile path.
    persist: Persist,
    services: BTreeMap<String, Running>,
    outputs: BTreeMap<String, RunningOutput>,
}

fn agent_config(state: &DesiredState) -> Option<&AgentConfig> {
    state.objects.values().find_map(|o| match &o.document {
        Document::AgentConfig(a) => Some(a),
        _ => None,
    })
}

/// The `issuer` document, on an issuer host.
fn issuer_doc(state: &DesiredState) -> Option<&crate::resource::issuer::Issuer> {
    state.objects.values().find_map(|o| match &o.document {
        Document::Issuer(i) => Some(i),
        _ => None,
    })
}

/// Where and how to reach the remote issuer.
fn remote_settings(config: &AgentConfig) -> RemoteSettings {
    RemoteSettings {
        address: config
            .proxy_server
            .clone()
            .or_else(|| config.auth_server.clone())
            .unwrap_or_default(),
        ca_pins: config.onboarding.ca_pins.clone(),
        ca_path: config.onboarding.ca_path.clone(),
        insecure: config.onboarding.insecure,
    }
}

fn agent_ref() -> ObjectRef {
    ObjectRef::new(Kind::AgentConfig, ObjectRef::AGENT_CONFIG_NAME)
}

fn join_settings(config: &AgentConfig) -> JoinSettings {
    JoinSettings {
        method: config.onboarding.join_method,
        token: config.onboarding.token.clone(),
        ttl: config.credential_ttl.as_std(),
        renewal_interval: config.renewal_interval.as_std(),
    }
}

fn service_config(service: &Service, agent: &AgentConfig) -> ServiceConfig {
    ServiceConfig {
        selector: match (&service.selector.name, &service.selector.labels) {
            (Some(name), _) => IdentitySelector::Name(name.to_string()),
            (None, labels) => IdentitySelector::Labels(labels.clone()),
        },
        ttl: service.credential_ttl.unwrap_or(agent.credential_ttl).as_std(),
    }
}

fn attest_settings(service: &Service) -> AttestSettings {
    AttestSettings {
        hash_limit: service
            .attestors
            .unix
            .as_ref()
            .and_then(|u| u.binary_hash_max_size_bytes)
            .unwrap_or(DEFAULT_HASH_LIMIT),
        systemd: service.attestors.systemd.as_ref().is_some_and(|s| s.enabled),
        ..AttestSettings::default()
    }
}

/// The state to converge to: the loaded objects, with the last good version of every object from a
/// file that now fails to load.
fn keep_last_good(loaded: &mut Loaded, last: &DesiredState) -> DesiredState {
    let broken: std::collections::BTreeSet<&PathBuf> = loaded
        .diagnostics
        .iter()
        .filter(|d| d.is_error())
        .map(|d| &d.location.path)
        .collect();
    let mut state = std::mem::take(&mut loaded.state);
    if broken.is_empty() {
        return state;
    }
    state.objects.retain(|_, o| !broken.contains(&o.location.path));
    for (r, o) in &last.objects {
        if broken.contains(&o.location.path) && !state.objects.contains_key(r) {
            state.objects.insert(r.clone(), o.clone());
        }
    }
    state
}

impl Daemon {
    async fn start_service(&self, service: &Service, listen: &Listen, config: &AgentConfig) -> Result<Running, String> {
        let (config_tx, config_rx) = watch::channel(service_config(service, config));
        let (attest_tx, attest_rx) = watch::channel(attest_settings(service));
        let (stop_tx, stop_rx) = watch::channel(false);
        let incoming = match listen {
            Listen::Unix(path) => {
                let l = listener::bind_unix(path).map_err(|e| format!("{e}; {}", e.hint()))?;
                listener::incoming_unix(l, attest_rx)
            }
            Listen::Tcp(addr) => {
                let l = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|e| format!("cannot listen on {addr}: {e}; choose a free address"))?;
                tracing::warn!(
                    service = service.display_name(),
                    %addr,
                    "TCP callers are not attested: only identities whose rules read no workload attribute are served"
                );
                listener::incoming_tcp(l)
            }
        };
        let agent = self.agent.clone().ok_or("the bot has not joined yet")?;
        let api = WorkloadApi::new(agent, config_rx, stop_rx.clone());
        let task = tokio::spawn(serve(api, incoming, stop_rx));
        tracing::info!(service = service.display_name(), %listen, "Workload API and SDS listening");
        Ok(Running {
            listen: listen.clone(),
            config: config_tx,
            attest: attest_tx,
            stop: stop_tx,
            task,
        })
    }

    /// Brings the listeners in line with `config`: new ones bound, moved ones bound at the new
    /// address before the old one closes, removed ones closed, the others reconfigured in place.
    async fn sync_services(&mut self, config: &AgentConfig) -> Result<(), String> {
        let mut errors = Vec::new();
        for service in &config.services {
            let Some(listen) = service.socket() else { continue };
            let name = service.display_name().to_owned();
            match self.services.get(&name) {
                Some(running) if &running.listen == listen => {
                    running.config.send_if_modified(|c| {
                        let new = service_config(service, config);
                        let changed = *c != new;
                        *c = new;
                        changed
                    });
                    running.attest.send_if_modified(|a| {
                        let new = attest_settings(service);
                        let changed = *a != new;
                        *a = new;
                        changed
                    });
                }
                _ => match self.start_service(service, listen, config).await {
                    Ok(new) => {
                        if let Some(old) = self.services.insert(name.clone(), new) {
                            tracing::info!(service = %name, from = %old.listen, "closing the old listener");
                            old.stop().await;
                        }
                    }
                    Err(e) => errors.push(format!("service {name}: {e}")),
                },
            }
        }
        let wanted: Vec<String> = config
            .services
            .iter()
            .filter(|s| s.socket().is_some())
            .map(|s| s.display_name().to_owned())
            .collect();
        let gone: Vec<String> = self.services.keys().filter(|n| !wanted.contains(n)).cloned().collect();
        for name in gone {
            if let Some(old) = self.services.remove(&name) {
                tracing::info!(service = %name, listen = %old.listen, "listener removed");
                old.stop().await;
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }

    /// Brings the file outputs in line with `config`: new ones started, changed ones restarted (they
    /// issue and write again), removed ones stopped with their files left in place. Waits (up to
    /// 10 s) for the new ones' first write, so `tbotctl apply` returns with the files there.
    async fn sync_outputs(&mut self, config: &AgentConfig) {
        let Some(agent) = self.agent.clone() else { return };
        let mut started = Vec::new();
        for service in &config.services {
            let Some(spec) = output_spec(service, config) else {
                continue;
            };
            let name = spec.name.clone();
            if let Some(running) = self.outputs.get(&name)
                && !super::plan::output_changed(&running.service, service, running.agent_ttl, config.credential_ttl)
            {
                continue;
            }
            if let Some(old) = self.outputs.remove(&name) {
                old.output.stop().await;
            }
            tracing::info!(output = %name, path = %spec.destination.path.display(), "output started");
            let output = Output::spawn(agent.clone(), spec);
            let mut report = output.report();
            started.push(report.clone());
            // Its writes, failures and hooks show in `tbotctl status`.
            let poke = self.poke.clone();
            tokio::spawn(async move {
                while report.changed().await.is_ok() {
                    poke.notify_one();
                }
            });
            self.outputs.insert(
                name,
                RunningOutput {
                    service: service.clone(),
                    agent_ttl: config.credential_ttl,
                    output,
                },
            );
        }
        let wanted: BTreeSet<&str> = config
            .services
            .iter()
            .filter(|s| s.output().is_some())
            .map(|s| s.display_name())
            .collect();
        let gone: Vec<String> = self
            .outputs
            .keys()
            .filter(|n| !wanted.contains(n.as_str()))
            .cloned()
            .collect();
        for name in gone {
            if let Some(old) = self.outputs.remove(&name) {
                let path = old.output.spec.destination.path.display().to_string();
                tracing::info!(output = %name, %path, "output removed; its files are left in place");
                old.output.stop().await;
                let mut table = self.status.write().expect("status poisoned");
                table.set(
                    &agent_ref(),
                    &output_condition(&name),
                    false,
                    "Removed",
                    &format!(
                        "no longer renewed: the files in {path} were left in place and expire; delete them once nothing reads them"
                    ),
                );
            }
        }
        let first_writes = async {
            for mut report in started {
                let _ = report.wait_for(|r| r.writes > 0 || r.error.is_some()).await;
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(10), first_writes).await;
    }

    /// Executes a plan; returns the steps that failed.
    async fn execute(&mut self, plan: &Plan, desired: &DesiredState) -> Vec<Failure> {
        let mut failures = Vec::new();
        let metrics = crate::admin::metrics::metrics();
        let causes_of = |wanted: fn(&Action) -> bool| -> Vec<ObjectRef> {
            plan.steps
                .iter()
                .filter(|s| wanted(&s.action))
                .flat_map(|s| s.causes.iter().cloned())
                .collect()
        };
        let cluster_side: Vec<ObjectRef> = plan
            .changes
            .iter()
            .map(|(r, _)| r.clone())
            .filter(|r| r.kind != Kind::AgentConfig)
            .chain(causes_of(|a| matches!(a, Action::CreateCa { .. })))
            .collect();
        let applied = match (&self.issuer, cluster_side.is_empty()) {
            (Some(issuer), false) => match Policy::from_state(desired) {
                Ok(policy) => issuer.set_policy(policy).await,
                Err(e) => Err(e),
            },
            _ => Ok(()),
        };
        if applied.is_ok()
            && !cluster_side.is_empty()
            && let Some(agent) = &self.agent
        {
            agent.forget_resolutions();
        }
        if let Err(e) = applied {
            metrics.error("issuer_policy");
            tracing::error!(error = %e, hint = %e.hint(), "cannot apply the new documents to the issuer");
            failures.push(Failure::new(cluster_side, "IssuerFailed", &e));
        }
        let rotate = causes_of(|a| matches!(a, Action::RotateCa { .. }));
        // Rotate only once the issuer has the new settings.
        if !rotate.is_empty()
            && failures.is_empty()
            && let Some(issuer) = &self.issuer
            && let Err(e) = issuer.rotate_ca_for_settings().await
        {
            metrics.error("ca_rotation");
            tracing::error!(error = %e, hint = %e.hint(), "cannot rotate the CA");
            failures.push(Failure::new(rotate, "RotationFailed", &e));
        }
        let config = agent_config(desired).cloned();
        let rejoin = causes_of(|a| matches!(a, Action::Rejoin | Action::Retrust));
        if let (Some(config), None) = (&config, &self.agent) {
            if let Err(e) = self.start_agent(config).await {
                failures.push(Failure::new(vec![agent_ref()], "JoinFailed", &e));
            }
        } else if !rejoin.is_empty()
            && let Some(config) = &config
            && let Err(e) = self.rejoin(config).await
        {
            metrics.error("rejoin");
            tracing::error!(error = %e, hint = %e.hint(), "the rejoin failed; the current identity stays in force");
            failures.push(Failure::new(rejoin, "RejoinFailed", &e));
        }
        if let Some(config) = &config
            && self.agent.is_some()
        {
            self.sync_outputs(config).await;
        }
        if let Some(config) = &config
            && self.agent.is_some()
            && let Err(e) = self.sync_services(config).await
        {
            metrics.error("listener");
            tracing::error!(error = %e, "cannot serve every listener");
            failures.push(Failure {
                causes: vec![ObjectRef::new(Kind::AgentConfig, ObjectRef::AGENT_CONFIG_NAME)],
                reason: "ListenFailed",
                message: e,
                transient: true,
            });
        }
        for step in &plan.steps {
            if let Action::RestartRequired { field } = &step.action {
                tracing::warn!(
                    field,
                    "this change takes effect at the next restart: restart tbot to apply it"
                );
            }
        }
        let redecide = plan.identities_to_redecide();
        if !redecide.is_empty() {
            // Remote agents hear of it on their `Watch` streams.
            if let Some(issuer) = &self.issuer {
                issuer.announce(redecide.clone());
            }
            // Ready means the workloads have what the documents ask for: wait for the reissues.
            if let Some(agent) = &self.agent {
                agent.redecide(&redecide, Duration::from_secs(10)).await;
            }
        }
        failures
    }

    /// The issuer the agent uses: the remote one, else the one in this process.
    fn agent_issuer(&self) -> Option<Arc<dyn Issuer>> {
        match (&self.remote, &self.issuer) {
            (Some(remote), _) => Some(remote.clone() as Arc<dyn Issuer>),
            (None, Some(local)) => Some(local.clone() as Arc<dyn Issuer>),
            (None, None) => None,
        }
    }

    /// Joins (or renews the saved identity) and starts following the issuer.
    async fn start_agent(&mut self, config: &AgentConfig) -> Result<(), IssuerError> {
        if let Some(remote) = &self.remote {
            // The terms may have been edited since the last attempt.
            remote.retarget(remote_settings(config))?;
        }
        let issuer = self
            .agent_issuer()
            .ok_or_else(|| IssuerError::Invalid("no issuer to join".into()))?;
        let store = match &self.agent_store {
            Some(store) => store.clone(),
            None => {
                let (issuer_store, issuer_path) = match &self.issuer_store {
                    Some((store, path)) => (Some(store), path.as_deref()),
                    None => (None, None),
                };
                let store = open_agent_store(config, issuer_path, issuer_store)?;
                self.agent_store = Some(store.clone());
                store
            }
        };
        let agent = Arc::new(Agent::start(issuer, join_settings(config), store).await?);
        agent.follow_policy_events();
        agent.follow_rotations();
        if let Some(remote) = &self.remote {
            remote.follow();
        }
        // A renewal's outcome (and the new certificate's expiry) shows in `tbotctl status`.
        let (mut renewal, mut identity, poke) = (agent.renewal(), agent.bot_changes(), self.poke.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    changed = renewal.changed() => if changed.is_err() { break },
                    changed = identity.changed() => if changed.is_err() { break },
                }
                poke.notify_one();
            }
        });
        self.agent = Some(agent);
        self.note_join("Joined");
        Ok(())
    }

    /// Joins again after an edit of `onboarding`, `proxy_server` or the token. A retry of the agent
    /// config (say, for a listener) must not join again on terms it already joined with: a `token`
    /// joins once. An edit of only the trust (`ca_pins`, `ca_path`, `insecure`; `Action::Retrust`)
    /// re-checks the issuer at the next connection without joining again.
    async fn rejoin(&self, config: &AgentConfig) -> Result<(), IssuerError> {
        let Some(agent) = &self.agent else { return Ok(()) };
        let mut moved = false;
        if let Some(remote) = &self.remote {
            let settings = remote_settings(config);
            moved = remote.settings().address != settings.address;
            remote.retarget(settings)?;
        }
        if agent.joined_with(&join_settings(config)) && !moved {
            return Ok(());
        }
        agent.rejoin(join_settings(config)).await?;
        self.note_join("Rejoined");
        Ok(())
    }

    /// Reloads the documents and converges. Returns when to retry objects that failed, if any.
    async fn reload(&mut self) -> Option<tokio::time::Instant> {
        let started = std::time::Instant::now();
        let retry = self.reload_once().await;
        let m = crate::admin::metrics::metrics();
        m.reconciles.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        m.reconcile_micros.fetch_add(
            started.elapsed().as_micros() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        retry
    }

    async fn reload_once(&mut self) -> Option<tokio::time::Instant> {
        let mut phases = Phases::new();
        let inputs = self.inputs.clone();
        let cache = self.load_cache.clone();
        let load = move || manifest::load_with(&inputs, &mut cache.lock().expect("load cache poisoned"));
        let mut loaded = match tokio::task::spawn_blocking(load).await {
            Ok(Ok(loaded)) => loaded,
            Ok(Err(diagnostic)) => {
                tracing::error!("{}", render::diagnostic(&diagnostic).trim_end());
                return self.next_retry();
            }
            Err(e) => {
                tracing::error!(error = %e, "the reload failed");
                return Some(tokio::time::Instant::now() + Duration::from_secs(1));
            }
        };
        for d in loaded.diagnostics.iter().filter(|d| d.is_error()) {
            tracing::error!(
                "{}\n  the last good version of this file's objects stays in force",
                render::diagnostic(d).trim_end()
            );
        }
        phases.mark("load");
        let mut desired = keep_last_good(&mut loaded, &self.applied);
        // An object waiting out its backoff keeps its applied version in this run, unless its spec
        // changed: a spec change clears the backoff and runs at once.
        let now = tokio::time::Instant::now();
        self.backoff
            .retain(|r, b| desired.objects.get(r).map(|o| &o.hash) == Some(&b.hash));
        self.refused
            .retain(|r, hash| desired.objects.get(r).map(|o| &o.hash) == Some(hash));
        for (r, b) in &self.backoff {
            if b.next > now {
                match self.applied.objects.get(r) {
                    Some(old) => desired.objects.insert(r.clone(), old.clone()),
                    None => desired.objects.remove(r),
                };
            }
        }
        {
            let mut table = self.status.write().expect("status poisoned");
            table.files_failing(&loaded.diagnostics);
            crate::admin::metrics::metrics()
                .files_failing
                .store(table.file_errors.len() as i64, std::sync::atomic::Ordering::Relaxed);
            for d in loaded.diagnostics.iter().filter(|d| d.is_error()) {
                table.invalid(
                    &d.location.path,
                    &format!("{}: {}; the last good version stays in force", d.location, d.message),
                );
            }
            table.observe(&desired);
        }
        // Watchers see `Reconciling` before the work starts.
        self.status_version.send_modify(|v| *v += 1);
        phases.mark("status");
        let plan = plan(&desired, Some(&self.applied));
        phases.mark("plan");
        // An agent that has not joined yet tries again, unless it was refused and waits for an edit.
        let to_join =
            self.agent.is_none() && agent_config(&desired).is_some() && !self.refused.contains_key(&agent_ref());
        if plan.is_empty() && !to_join {
            tracing::debug!("reloaded: nothing changed");
            self.publish_status(&self.waiting());
            return self.next_retry();
        }
        let (add, change, destroy) = plan.counts();
        tracing::info!(add, change, destroy, "documents changed; converging");
        for step in &plan.steps {
            let causes: Vec<String> = step.causes.iter().map(|c| c.to_string()).collect();
            tracing::info!(causes = %causes.join(", "), "{}", step.action);
        }
        if let (Some(set), Some(config)) = (&self.log_level, agent_config(&desired)) {
            set(config.debug);
        }
        let failures = self.execute(&plan, &desired).await;
        phases.mark("execute");
        {
            let mut table = self.status.write().expect("status poisoned");
            for step in &plan.steps {
                if let Action::RestartRequired { field } = &step.action {
                    for cause in &step.causes {
                        table.restart_required(cause, field);
                    }
                }
            }
        }
        let (retrying, failed) = self.record_failures(&failures, &desired);
        let mut applied = desired;
        for r in &retrying {
            match self.applied.objects.get(r) {
                Some(old) => applied.objects.insert(r.clone(), old.clone()),
                None => applied.objects.remove(r),
            };
        }
        self.applied = Arc::new(applied);
        self.save_inventory();
        let waiting: BTreeSet<ObjectRef> = failed.iter().chain(self.refused.keys()).cloned().collect();
        self.publish_status(&waiting);
        phases.mark("status");
        tracing::debug!(phases = %phases, "converged");
        self.next_retry()
    }

    /// Records failed steps: their conditions, a backoff for the transient ones (1 s doubling to
    /// 5 min, ±20%), and a refusal for the terminal ones (they wait for an edit). Returns the
    /// objects that will retry and every object that failed.
    fn record_failures(
        &mut self,
        failures: &[Failure],
        desired: &DesiredState,
    ) -> (BTreeSet<ObjectRef>, BTreeSet<ObjectRef>) {
        let retrying: BTreeSet<ObjectRef> = failures
            .iter()
            .filter(|f| f.transient)
            .flat_map(|f| f.causes.iter().cloned())
            .collect();
        let failed: BTreeSet<ObjectRef> = failures.iter().flat_map(|f| f.causes.iter().cloned()).collect();
        {
            let mut table = self.status.write().expect("status poisoned");
            for f in failures {
                let message = if f.transient {
                    format!("{} (retrying with backoff)", f.message)
                } else {
                    format!("{} (waiting for an edit)", f.message)
                };
                for cause in &f.causes {
                    table.set(cause, "Stalled", true, f.reason, &message);
                    table.set(cause, "Ready", false, f.reason, &message);
                }
            }
        }
        let now = tokio::time::Instant::now();
        for r in &retrying {
            let delay = self
                .backoff
                .get(r)
                .map_or(Duration::from_secs(1), |b| (b.delay * 2).min(Duration::from_secs(300)));
            let hash = desired.objects.get(r).map(|o| o.hash.clone()).unwrap_or_default();
            self.backoff.insert(
                r.clone(),
                Backoff {
                    delay,
                    next: now + delay.mul_f64(jitter(0.2)),
                    hash,
                },
            );
        }
        self.backoff.retain(|r, _| retrying.contains(r));
        for f in failures.iter().filter(|f| !f.transient) {
            for r in &f.causes {
                if let Some(o) = desired.objects.get(r) {
                    self.refused.insert(r.clone(), o.hash.clone());
                }
            }
        }
        (retrying, failed)
    }

    /// The objects waiting out a backoff or for an edit.
    fn waiting(&self) -> BTreeSet<ObjectRef> {
        self.backoff.keys().chain(self.refused.keys()).cloned().collect()
    }

    /// When the earliest backed-off object is due.
    fn next_retry(&self) -> Option<tokio::time::Instant> {
        self.backoff.values().map(|b| b.next).min()
    }

    /// Marks every object but `failed` converged, saves the status, and wakes whoever waits on it.
    fn publish_status(&self, failed: &BTreeSet<ObjectRef>) {
        let reports: Vec<_> = self
            .outputs
            .iter()
            .map(|(name, o)| (name, o, o.output.report().borrow().clone()))
            .collect();
        {
            let mut table = self.status.write().expect("status poisoned");
            let renewal = self.agent.as_ref().and_then(|a| a.renewal().borrow().clone());
            let bot = self.bot_ref(&table);
            let mut failed = failed.clone();
            if renewal.is_some() {
                failed.insert(bot.clone());
            }
            // An agent of a remote issuer that cannot reach it is stalled: it serves what it holds.
            let link = self.remote.as_ref().map(|r| r.link().borrow().clone());
            let unlinked = link.as_ref().filter(|l| !l.connected && self.agent.is_some());
            if unlinked.is_some() {
                failed.insert(agent_ref());
            }
            let failing: Vec<String> = reports
                .iter()
                .filter(|(_, _, report)| report.failing())
                .map(|(name, _, report)| format!("output {name}: {}", report.describe()))
                .collect();
            if !failing.is_empty() {
                failed.insert(agent_ref());
            }
            table.converged_except(&failed);
            for (name, o, report) in &reports {
                let message = format!("{}: {}", o.output.spec.destination.path.display(), report.describe());
                let (ok, reason) = report.condition();
                table.set(&agent_ref(), &output_condition(name), ok, reason, &message);
            }
            if !failing.is_empty() {
                let message = failing.join("; ");
                table.set(&agent_ref(), "Stalled", true, "OutputFailed", &message);
                table.set(&agent_ref(), "Ready", false, "OutputFailed", &message);
            }
            if let Some(message) = renewal {
                table.set(&bot, "Stalled", true, "RenewalFailed", &message);
                table.set(&bot, "Ready", false, "RenewalFailed", &message);
            }
            if let Some(link) = unlinked {
                let message = format!(
                    "not connected to the issuer at {}: {}; cached SVIDs keep being served",
                    link.address, link.message
                );
                table.set(&agent_ref(), "Stalled", true, "IssuerUnreachable", &message);
                table.set(&agent_ref(), "Ready", false, "IssuerUnreachable", &message);
            }
        }
        {
            let mut info = self.info.write().expect("info poisoned");
            if let Some(agent) = &self.agent {
                let bot = agent.bot();
                info.bot = bot.certificate.bot.clone();
                info.bot_expires = bot.certificate.not_after.to_string();
                let bundles = agent.bundles().borrow().clone();
                info.ca_pins = ca_pins(&bundles);
                if !bundles.trust_domain.is_empty() {
                    info.trust_domain = bundles.trust_domain.clone();
                }
            } else if let Some(issuer) = &self.issuer {
                info.ca_pins = ca_pins(&issuer.current_bundles());
            }
            info.issuer_link = self.remote.as_ref().map(|r| r.link().borrow().clone());
            info.services = self
                .services
                .iter()
                .map(|(n, r)| crate::admin::proto::ServiceStatus {
                    name: n.clone(),
                    listen: r.listen.to_string(),
                    ..Default::default()
                })
                .chain(
                    reports
                        .iter()
                        .map(|(name, o, report)| crate::admin::proto::ServiceStatus {
                            name: (*name).clone(),
                            listen: String::new(),
                            destination: o.output.spec.destination.path.display().to_string(),
                            state: report.describe(),
                            healthy: report.healthy(),
                        }),
                )
                .collect();
        }
        self.status_version.send_modify(|v| *v += 1);
        self.persist.save_status();
    }

    /// The bot's object when the directory holds it, else the agent config (an agent of a remote
    /// issuer, whose bot document lives on the issuer).
    fn bot_ref(&self, table: &StatusTable) -> ObjectRef {
        let Some(agent) = &self.agent else { return agent_ref() };
        let bot = ObjectRef::new(Kind::Bot, agent.bot().certificate.bot.clone());
        if table.objects.contains_key(&bot) {
            bot
        } else {
            agent_ref()
        }
    }

    /// Records on the bot's object how and when it joined (`tbotctl get bot`).
    fn note_join(&self, reason: &str) {
        let Some(agent) = &self.agent else { return };
        let bot = agent.bot();
        let method = agent.join_method();
        let message = format!(
            "joined by `{method}` at {}; the certificate expires {}",
            time::OffsetDateTime::now_utc()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default(),
            bot.certificate.not_after
        );
        let mut table = self.status.write().expect("status poisoned");
        let r = self.bot_ref(&table);
        table.set(&r, "Joined", true, reason, &message);
    }

    fn save_inventory(&self) {
        *self.applied_shared.write().expect("applied poisoned") = self.applied.clone();
        self.persist.save(self.applied.clone());
    }

    async fn shutdown(self) {
        for (_, running) in self.services {
            running.stop().await;
        }
        for (_, running) in self.outputs {
            running.output.stop().await;
        }
        self.persist.flush().await;
    }
}

fn open_store(config: &AgentConfig) -> Result<Store, crate::store::StoreError> {
    match config.storage.kind {
        StorageType::Memory => Ok(Store::memory()),
        StorageType::Directory => Store::open(
            &config
                .storage
                .path
                .clone()
                .unwrap_or_else(|| crate::resource::agent::Storage::DEFAULT_PATH.into()),
        ),
    }
}

/// Shows on the agent config (which names the storage) whether the controller's records can be
/// written.
fn storage_condition(table: &mut StatusTable, failure: Option<&str>) {
    let Some(r) = table.objects.keys().find(|r| r.kind == Kind::AgentConfig).cloned() else {
        return;
    };
    match failure {
        Some(message) => table.set(&r, "StorageWritable", false, "WriteFailed", message),
        None => table.set(&r, "StorageWritable", true, "Written", ""),
    }
}

/// Where a reload spent its time, for the debug log.
struct Phases {
    last: std::time::Instant,
    spent: Vec<(&'static str, Duration)>,
}

impl Phases {
    fn new() -> Phases {
        Phases {
            last: std::time::Instant::now(),
            spent: Vec::new(),
        }
    }

    fn mark(&mut self, phase: &'static str) {
        let now = std::time::Instant::now();
        self.spent.push((phase, now - self.last));
        self.last = now;
    }
}

impl std::fmt::Display for Phases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (phase, spent)) in self.spent.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            write!(f, "{sep}{phase} {:.1} ms", spent.as_secs_f64() * 1e3)?;
        }
        Ok(())
    }
}

/// Opens the agent's storage; the issuer's store when both name the same directory (a directory is
/// opened, and locked, once).
fn open_agent_store(
    config: &AgentConfig,
    issuer_path: Option<&std::path::Path>,
    issuer_store: Option<&Store>,
) -> Result<Store, crate::store::StoreError> {
    let same_dir = config.storage.kind == StorageType::Directory
        && issuer_path.is_some()
        && config.storage.path.as_deref() == issuer_path;
    match (same_dir, issuer_store) {
        (true, Some(store)) => Ok(store.clone()),
        _ => open_store(config),
    }
}

/// Opens the storage of the issuer host (`issuer.spec.storage`).
fn open_issuer_store(doc: &crate::resource::issuer::Issuer) -> Result<Store, crate::store::StoreError> {
    match (doc.spec.storage.kind, &doc.spec.storage.path) {
        (IssuerStorageType::Directory, Some(path)) => Store::open(path),
        _ => Ok(Store::memory()),
    }
}

/// The issuer's store: the local store (a directory, or memory), or etcd with the key encryption
/// key. Errors name the `issuer` document's file and line and the field.
async fn issuer_backing(
    state: &DesiredState,
    local: &Store,
) -> Result<crate::issuer::backing::Backing, (String, String)> {
    use crate::issuer::backing::Backing;
    let etcd = state.objects.values().find_map(|o| match &o.document {
        Document::Issuer(doc) if doc.spec.storage.kind == IssuerStorageType::Etcd => Some((doc, &o.location)),
        _ => None,
    });
    let Some((doc, location)) = etcd else {
        return Backing::local(local.clone()).map_err(|e| (e.to_string(), e.hint().to_owned()));
    };
    let storage = &doc.spec.storage;
    let kek_path = storage
        .key_encryption_key_file
        .as_deref()
        .expect("validation requires key_encryption_key_file for etcd");
    let kek = crate::kv::Kek::load(kek_path).map_err(|e| {
        (
            format!("{location}: spec.storage.key_encryption_key_file: {e}"),
            "every replica needs the same 32-byte file, mode 0600; fix the file or the path, then start again"
                .to_owned(),
        )
    })?;
    tracing::info!(kek_id = %kek.id(), file = %kek_path.display(), "key encryption key loaded");
    let kv = crate::kv::connect_etcd(&storage.etcd())
        .await
        .map_err(|e| (format!("{location}: spec.storage: {e}"), e.hint().to_owned()))?;
    Ok(Backing::new(Arc::new(kv), Some(kek)))
}

/// `kind/name` → canonical hash of the cluster-side documents (not the agent config nor the `issuer`
/// document, which differ per host by design), as a replica records them.
fn cluster_documents(state: &DesiredState) -> BTreeMap<String, String> {
    state
        .objects
        .iter()
        .filter(|(r, _)| !matches!(r.kind, Kind::AgentConfig | Kind::Issuer))
        .map(|(r, o)| (r.to_string(), o.hash.clone()))
        .collect()
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(options: StartOptions) -> ExitCode {
    let mut inputs: Vec<Input> = options.config_dirs.iter().cloned().map(Input::Dir).collect();
    inputs.extend(options.config_file.iter().cloned().map(Input::File));
    let mut load_cache = manifest::LoadCache::default();
    let loaded = match manifest::load_with(&inputs, &mut load_cache) {
        Ok(loaded) => loaded,
        Err(diagnostic) => {
            eprint!("{}", render::diagnostic(&diagnostic));
            return ExitCode::from(2);
        }
    };
    for d in &loaded.diagnostics {
        eprint!("{}", render::diagnostic(d));
    }
    if loaded.has_errors() {
        return fail(
            render::summary(&loaded),
            "fix the documents (`tbotctl validate` shows the same) and start again",
        );
    }
    let role = HostRole::of(loaded.state.objects.keys().map(|r| r.kind));
    let config = agent_config(&loaded.state).cloned();
    let issuer_spec = issuer_doc(&loaded.state).cloned();
    if config.is_none() && issuer_spec.is_none() {
        return fail(
            "no agent config and no `issuer` document among the documents",
            "add the agent config (`version: v2`, no `kind`), or an `issuer` document",
        );
    }
    if let (Some(set), Some(config)) = (&options.log_level, &config) {
        set(config.debug);
    }
    // Signal handlers first: a SIGHUP (systemctl reload) right after start must reload, not kill.
    use tokio::signal::unix::{SignalKind, signal};
    let (mut term, mut int, mut hup) = (
        signal(SignalKind::terminate()).expect("a SIGTERM handler"),
        signal(SignalKind::interrupt()).expect("a SIGINT handler"),
        signal(SignalKind::hangup()).expect("a SIGHUP handler"),
    );
    // Watch before anything serves: an edit made the moment the socket answers must not be missed.
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let _watcher = watch_inputs(&inputs, events_tx);

    // The stores: the issuer's (an issuer host), the agent's, and where the controller keeps its
    // records (the issuer's on an issuer host). One directory is opened once.
    let issuer_store = match &issuer_spec {
        Some(doc) => match open_issuer_store(doc) {
            Ok(s) => Some(s),
            Err(e) => return fail(&e, e.hint()),
        },
        None => None,
    };
    let issuer_path = issuer_spec.as_ref().and_then(|doc| doc.spec.storage.path.clone());
    let agent_store = match &config {
        Some(config) => match open_agent_store(config, issuer_path.as_deref(), issuer_store.as_ref()) {
            Ok(s) => Some(s),
            Err(e) => return fail(&e, e.hint()),
        },
        None => None,
    };
    let store = issuer_store
        .clone()
        .or(agent_store.clone())
        .expect("an agent config or an issuer");
    tracing::info!(storage = %store.describe(), role = ?role, "storage opened");

    let issuer = if role == HostRole::Agent {
        None
    } else {
        let policy = match Policy::from_state(&loaded.state) {
            Ok(p) => p,
            Err(e) => return fail(&e, &e.hint()),
        };
        let backing = match issuer_backing(&loaded.state, &store).await {
            Ok(b) => b,
            Err((message, hint)) => return fail(message, &hint),
        };
        tracing::info!(trust_domain = %policy.trust_domain.as_str(), storage = %backing.describe(), "starting the issuer");
        // A shared store that does not answer yet (etcd starting, no quorum) is waited for; a wrong
        // key or damaged state is not.
        let mut delay = std::time::Duration::from_secs(1);
        loop {
            match LocalIssuer::open_backing(backing.clone(), policy.clone()).await {
                Ok(i) => break Some(Arc::new(i)),
                Err(e) if e.is_transient() => {
                    tracing::warn!(error = %e, hint = %e.hint(), retry_in = ?delay, "the issuer's store does not answer yet");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        _ = term.recv() => return ExitCode::SUCCESS,
                        _ = int.recv() => return ExitCode::SUCCESS,
                    }
                    delay = (delay * 2).min(std::time::Duration::from_secs(30));
                }
                Err(e) => return fail(&e, &e.hint()),
            }
        }
    };
    let remote = match (&config, role) {
        (Some(config), HostRole::Agent) => {
            let settings = remote_settings(config);
            tracing::info!(issuer = %settings.address, "agent of a remote issuer");
            match RemoteIssuer::new(settings, agent_store.clone().expect("an agent store")) {
                Ok(r) => Some(r),
                Err(e) => return fail(&e, &e.hint()),
            }
        }
        _ => None,
    };
    let pins = issuer
        .as_ref()
        .map(|i| ca_pins(&i.current_bundles()))
        .unwrap_or_default();
    if !pins.is_empty() {
        tracing::info!(ca_pin = %pins.join(", "), "the trust domain's CA");
    }
    let status = Arc::new(std::sync::RwLock::new(StatusTable::default()));
    status.write().expect("status poisoned").observe(&loaded.state);
    let info = Arc::new(std::sync::RwLock::new(DaemonInfo {
        trust_domain: issuer
            .as_ref()
            .map(|i| i.policy().trust_domain.as_str().to_owned())
            .unwrap_or_default(),
        ca_pins: pins,
        ..DaemonInfo::default()
    }));
    let (admin_stop, admin_stop_rx) = watch::channel(false);
    // What the daemon last applied, as the admin API and the replica record show it.
    let applied_shared: Arc<std::sync::RwLock<Arc<DesiredState>>> = Arc::default();
    // The issuer API, on an issuer host.
    let mut sessions = None;
    if let (Some(doc), Some(issuer)) = (&issuer_spec, &issuer) {
        match crate::issuer::server::serve(
            issuer.clone(),
            doc.spec.listen,
            doc.serving_names(),
            doc.spec.proxy_protocol,
            admin_stop_rx.clone(),
        )
        .await
        {
            Ok(serving) => {
                tracing::info!(listen = %serving.address, names = ?doc.serving_names(), "issuer API listening");
                {
                    let mut info = info.write().expect("info poisoned");
                    info.issuer_listen = serving.address.to_string();
                    info.issuer_storage = issuer.backing().describe();
                    info.replica = doc.metadata.name.to_string();
                }
                sessions = Some(serving.sessions);
                if !issuer.backing().local {
                    let record =
                        crate::issuer::replicas::ReplicaRecord::this_process(&doc.metadata.name, serving.address);
                    let applied = applied_shared.clone();
                    tokio::spawn(crate::issuer::replicas::heartbeat(
                        issuer.clone(),
                        record,
                        move || cluster_documents(&applied.read().expect("applied poisoned")),
                        admin_stop_rx.clone(),
                    ));
                }
            }
            Err(e) => return fail(e, "fix `issuer.spec.listen`, or stop whatever holds the address"),
        }
        if let Some(endpoint) = &doc.spec.bundle_endpoint {
            match crate::issuer::bundle_endpoint::serve(issuer.clone(), endpoint.clone(), admin_stop_rx.clone()).await {
                Ok(address) => info.write().expect("info poisoned").bundle_endpoint = format!("https://{address}"),
                Err(e) => {
                    return fail(
                        e,
                        "fix `issuer.spec.bundle_endpoint` (its `listen` address, or its `cert_file`/`key_file`)",
                    );
                }
            }
        }
    }
    let (status_version, status_version_rx) = watch::channel(0u64);
    let applied = Arc::new(loaded.state);
    let persist = {
        let (status, version) = (status.clone(), status_version.clone());
        Persist::spawn(store.clone(), status.clone(), applied.clone(), move |failure| {
            storage_condition(&mut status.write().expect("status poisoned"), failure);
            version.send_modify(|v| *v += 1);
        })
    };
    let poke = Arc::new(tokio::sync::Notify::new());
    if let Some(remote) = &remote {
        // The link and the bundle the remote issuer pushes show in `tbotctl status`.
        let (mut link, mut bundles, poke) = (remote.link(), remote.bundles(), poke.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    changed = link.changed() => if changed.is_err() { break },
                    changed = bundles.changed() => if changed.is_err() { break },
                }
                poke.notify_one();
            }
        });
    }
    let mut daemon = Daemon {
        status: status.clone(),
        status_version,
        info: info.clone(),
        inputs: inputs.clone(),
        load_cache: Arc::new(std::sync::Mutex::new(load_cache)),
        log_level: options.log_level.clone(),
        issuer: issuer.clone(),
        agent: None,
        remote,
        agent_store: agent_store.clone(),
        issuer_store: issuer_store.clone().map(|s| (s, issuer_path.clone())),
        poke: poke.clone(),
        applied,
        persist,
        applied_shared,
        backoff: BTreeMap::new(),
        refused: BTreeMap::new(),
        services: BTreeMap::new(),
        outputs: BTreeMap::new(),
    };
    // The admin API next: while the agent joins (or cannot), tbotctl can reach the daemon.
    let (reload_tx, mut reload_requests) = mpsc::channel::<tokio::sync::oneshot::Sender<()>>(16);
    let admin_path = crate::admin::socket_for(&daemon.applied).expect("an agent config or an issuer");
    let admin = AdminApi {
        status,
        status_version: status_version_rx,
        info,
        reload: reload_tx,
        applied: daemon.applied_shared.clone(),
        issuer: issuer.clone(),
        sessions,
    };
    match crate::admin::server::serve(admin, &admin_path, admin_stop_rx) {
        Ok(()) => tracing::info!(path = %admin_path.display(), "admin API listening"),
        Err(e) => tracing::warn!(error = %e, "no admin API: tbotctl get/apply/status will not reach this daemon"),
    }
    let mut retry_at: Option<tokio::time::Instant> = None;
    if options.oneshot {
        let code = oneshot(&mut daemon, config.as_ref()).await;
        let _ = admin_stop.send(true);
        daemon.shutdown().await;
        return code;
    }
    if let Some(config) = &config {
        if let Err(e) = daemon.start_agent(config).await {
            if daemon.remote.is_none() {
                // In process, a join that fails is a document problem: say so and stop.
                let _ = admin_stop.send(true);
                daemon.shutdown().await;
                return fail(&e, &e.hint());
            }
            // A remote issuer may come back, or an edit may fix the terms: keep trying.
            tracing::error!(error = %e, hint = %e.hint(), "cannot join the issuer yet; retrying");
            let desired = daemon.applied.as_ref().clone();
            daemon.record_failures(&[Failure::new(vec![agent_ref()], "JoinFailed", &e)], &desired);
            retry_at = daemon.next_retry();
        }
        if daemon.agent.is_some() {
            daemon.sync_outputs(config).await;
        }
        if daemon.agent.is_some()
            && let Err(e) = daemon.sync_services(config).await
        {
            let _ = admin_stop.send(true);
            daemon.shutdown().await;
            return fail(e, "fix the listener's address, or stop whatever holds it");
        }
    }
    daemon.save_inventory();
    daemon.publish_status(&daemon.waiting());
    if let Some(addr) = options.diag_addr.or(config.as_ref().and_then(|c| c.diag_addr)) {
        let names = config
            .iter()
            .flat_map(|c| c.services.iter().map(|s| s.display_name().to_owned()))
            .collect();
        match crate::admin::diag::serve(addr, daemon.info.clone(), names).await {
            Ok(()) => tracing::info!(%addr, "diagnostics listening: /livez /readyz /metrics"),
            Err(e) => tracing::warn!(error = %e, "no diagnostics endpoint"),
        }
    }
    super::notify::ready();

    let mut resync = tokio::time::Instant::now() + RESYNC.mul_f64(jitter(0.2));
    let mut prune = tokio::time::interval(Duration::from_secs(60));
    loop {
        let retry_sleep = async {
            match retry_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            Some(()) = events.recv() => {
                let m = &crate::admin::metrics::metrics().watch_events;
                m.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(DEBOUNCE).await;
                while events.try_recv().is_ok() {
                    m.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
            _ = hup.recv() => tracing::info!("SIGHUP: reloading"),
            _ = poke.notified() => {
                daemon.publish_status(&daemon.waiting());
                continue;
            }
            Some(done) = reload_requests.recv() => {
                retry_at = daemon.reload().await;
                let _ = done.send(());
                continue;
            }
            _ = tokio::time::sleep_until(resync) => {}
            _ = retry_sleep => {}
            _ = prune.tick() => {
                if let Some(issuer) = &issuer
                    && let Err(e) = issuer.prune().await
                {
                    tracing::warn!(error = %e, hint = %e.hint(), "cannot prune retired CAs and expired bot instances");
                }
                continue;
            }
        }
        resync = tokio::time::Instant::now() + RESYNC.mul_f64(jitter(0.2));
        super::notify::reloading();
        retry_at = daemon.reload().await;
        super::notify::ready();
    }
    super::notify::stopping();
    let _ = admin_stop.send(true);
    tracing::info!("stopping: no new connections; open streams end");
    daemon.shutdown().await;
    tracing::info!("stopped");
    ExitCode::SUCCESS
}

/// `tbot start --oneshot`: joins (or renews), writes every file output once, runs their hooks, and
/// says which failed.
async fn oneshot(daemon: &mut Daemon, config: Option<&AgentConfig>) -> ExitCode {
    let Some(config) = config else {
        return fail(
            "--oneshot writes an agent's file outputs, and there is no agent config",
            "add the agent config with `workload-identity-x509` or `workload-identity-jwt` services",
        );
    };
    let specs: Vec<OutputSpec> = config.services.iter().filter_map(|s| output_spec(s, config)).collect();
    if specs.is_empty() {
        return fail(
            "--oneshot has nothing to write: the agent config has no `workload-identity-x509` or `workload-identity-jwt` service",
            "add an output service, or start without --oneshot to serve the Workload API",
        );
    }
    for service in config.services.iter().filter(|s| s.socket().is_some()) {
        tracing::warn!(
            service = service.display_name(),
            "--oneshot serves no socket; skipping this service"
        );
    }
    if let Err(e) = daemon.start_agent(config).await {
        return fail(format!("cannot join: {e}"), &e.hint());
    }
    let agent = daemon.agent.clone().expect("joined");
    let mut failed = Vec::new();
    for spec in specs {
        let name = spec.name.clone();
        let path = spec.destination.path.clone();
        let report = crate::agent::outputs::write_once(agent.clone(), spec).await;
        match (&report.error, &report.hook_error) {
            (None, None) => println!("output {name}: {}: {}", path.display(), report.describe()),
            (Some(e), _) => failed.push(format!("output {name} ({}): {e}", path.display())),
            (None, Some(e)) => failed.push(format!(
                "output {name} ({}): written, but on_update failed: {e}",
                path.display()
            )),
        }
    }
    if failed.is_empty() {
        return ExitCode::SUCCESS;
    }
    for f in &failed {
        eprintln!("error: {f}");
    }
    fail(
        format!("{} output(s) failed", failed.len()),
        "fix what each error names and run again",
    )
}

async fn serve(
    api: WorkloadApi,
    incoming: tokio_stream::wrappers::ReceiverStream<std::io::Result<listener::Conn>>,
    mut stop: watch::Receiver<bool>,
) {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<SpiffeWorkloadApiServer<WorkloadApi>>().await;
    let result = Server::builder()
        .add_service(health_service)
        .add_service(SecretDiscoveryServiceServer::new(api.clone()))
        .add_service(SpiffeWorkloadApiServer::new(api))
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "the Workload API server failed");
    }
}

/// The pins of the CAs in the trust bundle (`tbotctl status`, the start log).
fn ca_pins(bundles: &crate::issuer::Bundles) -> Vec<String> {
    bundles
        .x509_authorities
        .iter()
        .filter_map(|der| crate::issuer::ca::spki_pin(der))
        .collect()
}
