//! `tbot start`: load the documents, run the issuer when the directory holds the cluster-side
//! documents, join the bot, and serve every `workload-identity-api` service until SIGTERM/SIGINT.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use tonic::transport::Server;

use super::render;
use crate::agent::attest::{AttestSettings, DEFAULT_HASH_LIMIT};
use crate::agent::{Agent, JoinSettings};
use crate::issuer::{IdentitySelector, Issuer, LocalIssuer, Policy};
use crate::manifest::{self, Input};
use crate::resource::agent::{AgentConfig, Listen, StorageType};
use crate::resource::{Document, ObjectRef};
use crate::store::Store;
use crate::workload_api::listener::{self, Conn};
use crate::workload_api::proto::spiffe_workload_api_server::SpiffeWorkloadApiServer;
use crate::workload_api::server::WorkloadApi;

/// What `tbot start` was given.
#[derive(Debug, Clone)]
pub struct StartOptions {
    pub config_dirs: Vec<PathBuf>,
    pub config_file: Option<PathBuf>,
}

fn fail(message: impl std::fmt::Display, hint: &str) -> ExitCode {
    tracing::error!(hint, "{message}");
    ExitCode::from(1)
}

/// Runs the daemon; returns when it stops.
pub async fn run(options: StartOptions) -> ExitCode {
    let mut inputs: Vec<Input> = options.config_dirs.iter().cloned().map(Input::Dir).collect();
    inputs.extend(options.config_file.iter().cloned().map(Input::File));
    let loaded = match manifest::load(&inputs) {
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
    let Some(agent_config) = loaded.state.objects.values().find_map(|o| match &o.document {
        Document::AgentConfig(a) => Some(a.clone()),
        _ => None,
    }) else {
        return fail(
            "no agent config among the documents",
            "add the agent config (`version: v2`, no `kind`)",
        );
    };
    let policy = match Policy::from_state(&loaded.state) {
        Ok(p) => p,
        Err(e) => return fail(&e, &e.hint()),
    };
    if policy.bots.is_empty() {
        return fail(
            "the documents hold only an agent config: joining a remote issuer at `proxy_server` is not supported yet",
            "add the cluster-side documents (bot, token, role, workload_identity) so this daemon runs the issuer",
        );
    }
    tracing::info!(trust_domain = %policy.trust_domain.as_str(), "starting");
    let store = match open_store(&agent_config) {
        Ok(s) => s,
        Err(e) => return fail(&e, e.hint()),
    };
    tracing::info!(storage = %store.describe(), "storage opened");
    let issuer = match LocalIssuer::open(store.clone(), policy) {
        Ok(i) => Arc::new(i),
        Err(e) => return fail(&e, &e.hint()),
    };
    spawn_pruning(issuer.clone());
    let settings = JoinSettings {
        method: agent_config.onboarding.join_method,
        token: agent_config.onboarding.token.clone(),
        ttl: agent_config.credential_ttl.as_std(),
        renewal_interval: agent_config.renewal_interval.as_std(),
    };
    let agent = match Agent::start(issuer.clone() as Arc<dyn Issuer>, settings, store).await {
        Ok(a) => Arc::new(a),
        Err(e) => return fail(&e, &e.hint()),
    };
    let running = loaded
        .state
        .objects
        .iter()
        .map(|(r, o)| (r.clone(), o.hash.clone()))
        .collect();
    let _watcher = watch_for_changes(inputs, running);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut servers = Vec::new();
    let mut sockets = Vec::new();
    for service in &agent_config.services {
        let selector = match (&service.selector.name, &service.selector.labels) {
            (Some(name), _) => IdentitySelector::Name(name.to_string()),
            (None, labels) => IdentitySelector::Labels(labels.clone()),
        };
        let ttl = service.credential_ttl.unwrap_or(agent_config.credential_ttl).as_std();
        let api = WorkloadApi::new(agent.clone(), selector, ttl, stop_rx.clone());
        let incoming = match &service.listen {
            Listen::Unix(path) => {
                let listener = match listener::bind_unix(path) {
                    Ok(l) => l,
                    Err(e) => return fail(&e, e.hint()),
                };
                sockets.push(path.clone());
                let attest = AttestSettings {
                    hash_limit: service
                        .attestors
                        .unix
                        .as_ref()
                        .and_then(|u| u.binary_hash_max_size_bytes)
                        .unwrap_or(DEFAULT_HASH_LIMIT),
                    systemd: service.attestors.systemd.as_ref().is_some_and(|s| s.enabled),
                    ..AttestSettings::default()
                };
                listener::incoming_unix(listener, attest)
            }
            Listen::Tcp(addr) => {
                let listener = match tokio::net::TcpListener::bind(addr).await {
                    Ok(l) => l,
                    Err(e) => return fail(format!("cannot listen on {addr}: {e}"), "choose a free address"),
                };
                tracing::warn!(
                    service = service.display_name(),
                    %addr,
                    "TCP callers are not attested: only identities whose rules read no workload attribute are served"
                );
                listener::incoming_tcp(listener)
            }
        };
        tracing::info!(service = service.display_name(), listen = %service.listen, "Workload API listening");
        servers.push(tokio::spawn(serve(api, incoming, stop_rx.clone())));
    }
    wait_for_signal().await;
    tracing::info!("stopping: no new connections; open streams end");
    let _ = stop_tx.send(true);
    for server in servers {
        let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    }
    for path in sockets {
        let _ = std::fs::remove_file(&path);
    }
    tracing::info!("stopped");
    ExitCode::SUCCESS
}

fn open_store(config: &AgentConfig) -> Result<Store, crate::store::StoreError> {
    match config.storage.kind {
        StorageType::Memory => Ok(Store::memory()),
        StorageType::Directory => {
            let path = config
                .storage
                .path
                .clone()
                .unwrap_or_else(|| crate::resource::agent::Storage::DEFAULT_PATH.into());
            Store::open(&path)
        }
    }
}

async fn serve(
    api: WorkloadApi,
    incoming: tokio_stream::wrappers::ReceiverStream<std::io::Result<Conn>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<SpiffeWorkloadApiServer<WorkloadApi>>().await;
    let result = Server::builder()
        .add_service(health_service)
        .add_service(SpiffeWorkloadApiServer::new(api))
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "the Workload API server failed");
    }
}

/// Drops retired CAs once their overlap has ended.
fn spawn_pruning(issuer: Arc<LocalIssuer>) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(60)).await;
            if let Err(e) = issuer.prune() {
                tracing::warn!(error = %e, hint = %e.hint(), "cannot prune retired CAs");
            }
        }
    });
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("a SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("a SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Watches the configured directories (not single files: editors replace files) and says in the log
/// when the documents on disk no longer match what is running: at this stage a change needs a restart.
fn watch_for_changes(inputs: Vec<Input>, running: BTreeMap<ObjectRef, String>) -> Option<notify::RecommendedWatcher> {
    use notify::{EventKind, RecursiveMode, Watcher};
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Our own reads must not wake us; anything else (and any watcher error) means "look again".
        if !matches!(&event, Ok(e) if matches!(e.kind, EventKind::Access(_))) {
            let _ = tx.send(());
        }
    })
    .map_err(|e| tracing::warn!(error = %e, "cannot watch the configuration for changes"))
    .ok()?;
    for input in &inputs {
        let dir = match input {
            Input::Dir(dir) => dir.clone(),
            Input::File(file) => file.parent().map(PathBuf::from).unwrap_or_else(|| ".".into()),
        };
        if let Err(e) = watcher.watch(&dir, RecursiveMode::NonRecursive) {
            tracing::warn!(error = %e, dir = %dir.display(), "cannot watch this directory for changes");
        }
    }
    tokio::spawn(async move {
        let mut last_seen = running.clone();
        while rx.recv().await.is_some() {
            // Debounce: an editor's save is several events.
            tokio::time::sleep(Duration::from_millis(150)).await;
            while rx.try_recv().is_ok() {}
            let inputs = inputs.clone();
            let Ok(Ok(loaded)) = tokio::task::spawn_blocking(move || manifest::load(&inputs)).await else {
                continue;
            };
            let on_disk: BTreeMap<ObjectRef, String> = loaded
                .state
                .objects
                .iter()
                .map(|(r, o)| (r.clone(), o.hash.clone()))
                .collect();
            if on_disk == last_seen {
                continue;
            }
            let changed = on_disk
                .iter()
                .filter(|(r, h)| running.get(*r) != Some(*h))
                .map(|(r, _)| r.to_string())
                .chain(
                    running
                        .keys()
                        .filter(|r| !on_disk.contains_key(*r))
                        .map(|r| r.to_string()),
                )
                .collect::<Vec<_>>();
            if changed.is_empty() {
                tracing::info!("the documents on disk match the running ones again");
            } else {
                tracing::warn!(
                    changed = %changed.join(", "),
                    invalid = loaded.has_errors(),
                    "the documents changed on disk; restart tbot to apply them (this version does not reload live)"
                );
            }
            last_seen = on_disk;
        }
    });
    Some(watcher)
}
