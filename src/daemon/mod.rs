//! The composition root: `tbot start` builds every part here and nowhere else. [`boot`] runs the
//! numbered start-up phases, [`event_loop`] turns every wake-up into a reconcile, [`reconcile`] is the
//! one pipeline (load → keep last good → plan → execute → record → report), [`execute`] carries out a
//! plan's steps, and [`report`] is the one writer of the status that `tbotctl status`, `/readyz` and
//! the records read. Nothing below this module knows it exists.

mod boot;
mod event_loop;
mod execute;
mod metrics;
mod outputs;
mod reconcile;
mod report;
mod services;
mod stores;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use crate::agent::Agent;
use crate::agent::remote::RemoteIssuer;
use crate::controller::persist::Persist;
use crate::controller::retry::Retry;
use crate::controller::status::StatusWriter;
use crate::issuer::{Issuer, LocalIssuer};
use crate::manifest::{self, DesiredState, Input};
use crate::resource::agent::AgentConfig;
use crate::resource::{Document, Kind, ObjectRef};
use crate::store::Store;

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

/// The role this host plays, from what its directory holds (`resource::HostRole`), with the issuer
/// the agent uses. Decided once at start: a change of role needs a restart.
pub enum Host {
    /// The issuer runs in this process; nothing listens on the network.
    Single { issuer: Arc<LocalIssuer> },
    /// An issuer replica serving the issuer API (and its own workloads when it has an agent config).
    Issuer { issuer: Arc<LocalIssuer> },
    /// An agent of the remote issuer at `proxy_server`.
    Agent { remote: Arc<RemoteIssuer> },
}

impl Host {
    /// The issuer in this process, when there is one.
    pub fn local(&self) -> Option<&Arc<LocalIssuer>> {
        match self {
            Host::Single { issuer } | Host::Issuer { issuer } => Some(issuer),
            Host::Agent { .. } => None,
        }
    }

    /// The client of the remote issuer, on an agent of one.
    pub fn remote(&self) -> Option<&Arc<RemoteIssuer>> {
        match self {
            Host::Agent { remote } => Some(remote),
            _ => None,
        }
    }

    /// The issuer the agent uses: the one in this process, or the remote one.
    pub fn issuer(&self) -> Arc<dyn Issuer> {
        match self {
            Host::Single { issuer } | Host::Issuer { issuer } => issuer.clone(),
            Host::Agent { remote } => remote.clone(),
        }
    }
}

/// The daemon's state: each part has one owner, this struct, and is changed only by the loop.
pub(crate) struct Daemon {
    inputs: Vec<Input>,
    /// What the last load read: a reload re-parses only the files that changed.
    load_cache: Arc<std::sync::Mutex<manifest::LoadCache>>,
    log_level: Option<LogLevel>,
    host: Host,
    /// The agent, once joined (an issuer host without an agent config has none).
    agent: Option<Arc<Agent>>,
    /// Where the agent keeps its identity (opened when the agent first starts: an agent config may
    /// arrive on a running issuer host).
    agent_store: Option<Store>,
    /// The issuer host's store and its directory, shared with the agent when they name the same.
    issuer_store: Option<(Store, Option<PathBuf>)>,
    /// The one writer of the status.
    status: StatusWriter,
    /// Woken when something shown by `tbotctl status` changes outside the loop (renewals, the link
    /// to the remote issuer, outputs, the storage directory).
    poke: Arc<tokio::sync::Notify>,
    /// What was last applied (the plan's "actual" side); saved to the store after each convergence
    /// and read by the admin API's Plan call and the replica heartbeat.
    applied: tokio::sync::watch::Sender<Arc<DesiredState>>,
    /// Objects waiting out a backoff or for an edit.
    retry: Retry,
    /// Writes `applied` and the status to the store, off the reconcile path.
    persist: Persist,
    services: BTreeMap<String, services::Running>,
    outputs: BTreeMap<String, outputs::RunningOutput>,
    telemetry: Telemetry,
}

/// Every subsystem's metric families, registered once at boot.
pub(crate) struct Telemetry {
    pub daemon: metrics::DaemonMetrics,
    pub agent: crate::agent::AgentMetrics,
    pub workload_api: crate::workload_api::metrics::WorkloadApiMetrics,
    pub issuer_api: crate::issuer::server::metrics::IssuerApiMetrics,
    pub issuer: crate::issuer::metrics::IssuerMetrics,
    /// The registry `/metrics` renders.
    pub metrics: Arc<crate::telemetry::Metrics>,
}

impl Telemetry {
    fn register() -> Telemetry {
        let mut metrics = crate::telemetry::Metrics::default();
        let errors = crate::telemetry::Errors::register(&mut metrics);
        Telemetry {
            daemon: metrics::DaemonMetrics::register(&mut metrics, &errors),
            agent: crate::agent::AgentMetrics::register(&mut metrics),
            workload_api: crate::workload_api::metrics::WorkloadApiMetrics::register(&mut metrics, &errors),
            issuer_api: crate::issuer::server::metrics::IssuerApiMetrics::register(&mut metrics),
            issuer: crate::issuer::metrics::IssuerMetrics::register(&mut metrics),
            metrics: Arc::new(metrics),
        }
    }
}

impl Daemon {
    /// What was last applied.
    fn applied(&self) -> Arc<DesiredState> {
        self.applied.borrow().clone()
    }

    /// Records what now runs and hands it to the writer of the records.
    fn set_applied(&mut self, applied: Arc<DesiredState>) {
        self.applied.send_replace(applied.clone());
        self.persist.save(applied);
    }

    async fn shutdown(self) {
        for (_, running) in self.services {
            running.stop().await;
        }
        for (_, running) in self.outputs {
            running.output.stop().await;
        }
        self.persist.flush().await;
        if let Some(issuer) = self.host.local()
            && let Err(e) = issuer.flush_issued().await
        {
            tracing::warn!(error = %e, "the issuance log's last records could not be written; they are in this log only");
        }
    }
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

fn agent_ref() -> ObjectRef {
    ObjectRef::new(Kind::AgentConfig, ObjectRef::AGENT_CONFIG_NAME)
}

/// Logs an error that stops the daemon, with what to do next, and returns the exit code.
fn fail(message: impl std::fmt::Display, hint: &str) -> ExitCode {
    tracing::error!(hint, "{message}");
    ExitCode::from(1)
}

/// Runs the daemon until SIGTERM or SIGINT (or, with `--oneshot`, until every output is written).
pub async fn run(options: StartOptions) -> ExitCode {
    let booted = match boot::boot(&options).await {
        Ok(booted) => booted,
        Err(code) => return code,
    };
    event_loop::run(booted).await
}
