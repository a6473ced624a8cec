//! Start-up, in numbered phases. Each phase's ordering rule is written once, at the phase:
//!
//! 1. **Watch, then load** the documents: the watcher starts first, so an edit made while they
//!    load raises an event (and the first event after start needs no full listing). Any error
//!    stops the start (a daemon never starts on a broken directory; after start, a broken file
//!    keeps its last good version instead). Then the sockets it will serve must be free, before
//!    anything is created or a token spent.
//! 2. **Signals**, before anything serves: a SIGHUP right after start reloads.
//! 3. **Stores**: the issuer's, the agent's, and where the records go. One directory is opened (and
//!    locked) once.
//! 4. **The issuer** (single host, issuer host) or the **client of the remote issuer** (an agent):
//!    this decides the [`Host`]. A shared store that does not answer yet is waited for.
//! 5. **Network servers** of an issuer host: the issuer API, the replica heartbeat, the bundle
//!    endpoint. A wrong address stops the start.
//! 6. **Status and records**: the one status writer, and the writer of the records.
//! 7. **The admin API**, so that `tbotctl` reaches the daemon while the agent joins (or cannot).
//! 8. **First convergence**, with the same functions as every later one ([`super::execute`]). The
//!    rule at start: in process, a join that fails is a document problem and stops the start; a
//!    remote issuer may come back, so the agent keeps trying. A listener that cannot bind stops it.
//! 9. **Diagnostics** (`/livez`, `/readyz`, `/metrics`), then READY=1 to the service manager.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;

use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::{mpsc, oneshot, watch};

use super::execute::{Failure, remote_settings};
use super::stores::{self, cluster_documents};
use super::{Daemon, Host, StartOptions, agent_config, fail, issuer_doc};
use crate::admin::server::AdminApi;
use crate::agent::remote::RemoteIssuer;
use crate::controller::persist::Persist;
use crate::controller::retry::Retry;
use crate::controller::status::{Reason, Status, StatusWriter};
use crate::error::Explain;
use crate::issuer::{Issuer, LocalIssuer, Policy};
use crate::manifest::{self, Input, render};
use crate::resource::HostRole;
use crate::resource::agent::AgentConfig;

/// What start-up hands the loop.
pub(super) struct Booted {
    pub daemon: Daemon,
    pub signals: Signals,
    /// File events from the watched directories.
    pub events: mpsc::UnboundedReceiver<crate::manifest::Changes>,
    /// Keeps the watcher alive.
    pub watcher: Box<dyn std::any::Any + Send>,
    /// `tbotctl apply`: reload, then answer.
    pub reloads: mpsc::Receiver<oneshot::Sender<()>>,
    /// Stops the admin API and the issuer's servers.
    pub stop: watch::Sender<bool>,
    /// When the first retry is due, if start-up left one.
    pub retry_at: Option<tokio::time::Instant>,
    /// `--oneshot`: write every output of the agent config once and exit.
    pub oneshot: bool,
}

pub(super) struct Signals {
    pub term: Signal,
    pub int: Signal,
    pub hup: Signal,
}

/// Phase 1: the documents, all valid.
fn load(inputs: &[Input]) -> Result<(manifest::LoadCache, manifest::Loaded), ExitCode> {
    let mut cache = manifest::LoadCache::default();
    let loaded = manifest::load_with(inputs, &mut cache).map_err(|diagnostic| {
        eprint!("{}", render::diagnostic(&diagnostic));
        ExitCode::from(2)
    })?;
    for d in &loaded.diagnostics {
        eprint!("{}", render::diagnostic(d));
    }
    if loaded.has_errors() {
        return Err(fail(
            render::summary(&loaded),
            "fix the documents (`tbotctl validate` shows the same) and start again",
        ));
    }
    Ok((cache, loaded))
}

/// Phase 1, last: the sockets this daemon will serve must not be another live process's. Checked
/// before anything is created or spent: a second daemon given the same socket stops here instead of
/// after it made a CA or used its token. A socket file nobody answers on is stale and is replaced
/// later.
fn sockets_free(state: &manifest::DesiredState, config: Option<&AgentConfig>, oneshot: bool) -> Result<(), ExitCode> {
    use crate::resource::agent::Listen;
    // `--oneshot` binds no listener, and runs without an admin API when its socket is taken.
    if oneshot {
        return Ok(());
    }
    let mut sockets: Vec<(String, std::path::PathBuf)> = Vec::new();
    if let Some(path) = crate::admin::socket_for(state) {
        sockets.push(("the admin socket (`admin_socket`)".into(), path));
    }
    for service in config.map(|c| c.services.as_slice()).unwrap_or_default() {
        if let Some(Listen::Unix(path)) = service.socket() {
            sockets.push((
                format!("the `listen` socket of service `{}`", service.display_name()),
                path.clone(),
            ));
        }
    }
    for (what, path) in sockets {
        if std::os::unix::net::UnixStream::connect(&path).is_ok() {
            return Err(fail(
                format!(
                    "{what} {} is in use by another running process (another tbot?)",
                    path.display()
                ),
                "stop the other daemon, or give this one its own `admin_socket` and `listen` paths; nothing was \
                 created and no token was used",
            ));
        }
    }
    Ok(())
}

/// Phase 4: the issuer in this process, waiting for a shared store that does not answer yet (etcd
/// starting, no quorum); a wrong key or damaged state stops the start.
async fn open_issuer(
    state: &manifest::DesiredState,
    store: &crate::store::Store,
    signals: &mut Signals,
) -> Result<Arc<LocalIssuer>, ExitCode> {
    let policy = Policy::from_state(state).map_err(|e| fail(&e, &e.hint()))?;
    let backing = stores::issuer_backing(state, store)
        .await
        .map_err(|e| fail(&e, &e.hint()))?;
    tracing::info!(trust_domain = %policy.trust_domain.as_str(), storage = %backing.describe(), "starting the issuer");
    let mut delay = std::time::Duration::from_secs(1);
    loop {
        match LocalIssuer::open_backing(backing.clone(), policy.clone()).await {
            Ok(issuer) => return Ok(Arc::new(issuer)),
            Err(e) if e.is_transient() => {
                tracing::warn!(error = %e, hint = %e.hint(), retry_in = ?delay, "the issuer's store does not answer yet");
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    _ = signals.term.recv() => return Err(ExitCode::SUCCESS),
                    _ = signals.int.recv() => return Err(ExitCode::SUCCESS),
                }
                delay = (delay * 2).min(std::time::Duration::from_secs(30));
            }
            Err(e) => return Err(fail(&e, &e.hint())),
        }
    }
}

/// Phase 5: what an issuer host serves on the network. Returns the agents' sessions and fills in the
/// status's issuer fields.
async fn serve_issuer(
    doc: &crate::resource::issuer::Issuer,
    issuer: &Arc<LocalIssuer>,
    applied: &watch::Sender<Arc<manifest::DesiredState>>,
    status: &mut Status,
    stop: &watch::Receiver<bool>,
    metrics: crate::issuer::server::metrics::IssuerApiMetrics,
) -> Result<Arc<crate::issuer::server::Sessions>, ExitCode> {
    let serving = crate::issuer::server::serve(
        issuer.clone(),
        doc.spec.listen,
        doc.serving_names(),
        doc.spec.proxy_protocol,
        stop.clone(),
        metrics,
    )
    .await
    .map_err(|e| fail(&e, &e.hint()))?;
    tracing::info!(listen = %serving.address, names = ?doc.serving_names(), "issuer API listening");
    status.host.issuer_listen = serving.address.to_string();
    status.host.issuer_storage = issuer.backing().describe();
    status.host.replica = doc.metadata.name.to_string();
    if !issuer.backing().local {
        let record = crate::issuer::state::replicas::ReplicaRecord::this_process(&doc.metadata.name, serving.address);
        let applied = applied.subscribe();
        let sessions = serving.sessions.clone();
        tokio::spawn(crate::issuer::state::replicas::heartbeat(
            issuer.clone(),
            record,
            move || cluster_documents(&applied.borrow()),
            {
                let issuer = issuer.clone();
                move || {
                    let mut held = sessions.held_by_key();
                    if let Some((_, local)) = issuer.local_holdings() {
                        crate::issuer::server::add_held(&mut held, Some(&local));
                    }
                    (sessions.by_ca(), held)
                }
            },
            stop.clone(),
        ));
    }
    if let Some(endpoint) = &doc.spec.bundle_endpoint {
        let address = crate::issuer::federation::bundle_endpoint::serve(issuer.clone(), endpoint.clone(), stop.clone())
            .await
            .map_err(|e| fail(&e, &e.hint()))?;
        status.host.bundle_endpoint = format!("https://{address}");
    }
    Ok(serving.sessions)
}

/// Wakes `poke` whenever `rx` changes, until its sender goes.
pub(super) fn poke_on<T: Send + Sync + 'static>(mut rx: watch::Receiver<T>, poke: Arc<tokio::sync::Notify>) {
    tokio::spawn(async move {
        while rx.changed().await.is_ok() {
            poke.notify_one();
        }
    });
}

/// Runs phases 1 to 9. `Err` is the exit code of a start that stopped.
pub(super) async fn boot(options: &StartOptions) -> Result<Booted, ExitCode> {
    // 1. Watch, then load.
    let dirs = options.config_dirs.iter().cloned().map(Input::Dir);
    let file = options.config_file.iter().cloned().map(Input::File);
    let inputs: Vec<Input> = dirs.chain(file).map(Input::absolute).collect();
    let (events_tx, events) = mpsc::unbounded_channel();
    let watcher = Box::new(crate::controller::watch::watch_inputs(&inputs, events_tx));
    let (load_cache, loaded) = load(&inputs)?;
    let telemetry = super::Telemetry::register();
    let role = HostRole::of(loaded.state.objects.keys().map(|r| r.kind));
    let config = agent_config(&loaded.state).cloned();
    let issuer_spec = issuer_doc(&loaded.state).cloned();
    if config.is_none() && issuer_spec.is_none() {
        return Err(fail(
            "no agent config and no `issuer` document among the documents",
            "add the agent config (`version: v2`, no `kind`), or an `issuer` document",
        ));
    }
    if let (Some(set), Some(config)) = (&options.log_level, &config) {
        set(config.debug);
    }
    sockets_free(&loaded.state, config.as_ref(), options.oneshot)?;

    // 2. Signals.
    let mut signals = Signals {
        term: signal(SignalKind::terminate()).expect("a SIGTERM handler"),
        int: signal(SignalKind::interrupt()).expect("a SIGINT handler"),
        hup: signal(SignalKind::hangup()).expect("a SIGHUP handler"),
    };

    // 3. Stores.
    let opened = stores::Opened::open(config.as_ref(), issuer_spec.as_ref()).map_err(|e| fail(&e, &e.hint()))?;
    tracing::info!(storage = %opened.records.describe(), role = ?role, "storage opened");

    // 4. The issuer, or the client of the remote one.
    let host = match (&config, role) {
        (Some(config), HostRole::Agent) => {
            let settings = remote_settings(config);
            tracing::info!(issuer = %settings.address, "agent of a remote issuer");
            let store = opened.agent.clone().expect("an agent store");
            let remote = RemoteIssuer::new(settings, store, &telemetry.agent).map_err(|e| fail(&e, &e.hint()))?;
            Host::Agent { remote }
        }
        (_, HostRole::Issuer { .. }) => Host::Issuer {
            issuer: open_issuer(&loaded.state, &opened.records, &mut signals).await?,
        },
        _ => Host::Single {
            issuer: open_issuer(&loaded.state, &opened.records, &mut signals).await?,
        },
    };
    let mut status = Status::default();
    if let Some(issuer) = host.local() {
        issuer.set_metrics(telemetry.issuer.clone());
        status.host.trust_domain = issuer.policy().trust_domain.as_str().to_owned();
        status.host.ca_pins = super::report::ca_pins(&issuer.current_bundles());
        tracing::info!(ca_pin = %status.host.ca_pins.join(", "), "the trust domain's CA");
    }

    // 5. Network servers of an issuer host.
    let (stop, stop_rx) = watch::channel(false);
    let applied = watch::Sender::new(Arc::new(loaded.state));
    let sessions = match (&issuer_spec, &host) {
        (Some(doc), Host::Issuer { issuer }) => {
            let metrics = telemetry.issuer_api.clone();
            Some(serve_issuer(doc, issuer, &applied, &mut status, &stop_rx, metrics).await?)
        }
        _ => None,
    };

    // 6. Status and records.
    status.table.observe(&applied.borrow());
    let status = StatusWriter::new(status);
    let persist = Persist::spawn(opened.records.clone(), status.reader(), applied.borrow().clone());
    let poke = Arc::new(tokio::sync::Notify::new());
    match &host {
        // The link and the bundle the remote issuer pushes show in `tbotctl status`.
        Host::Agent { remote } => {
            poke_on(remote.link(), poke.clone());
            poke_on(remote.bundles(), poke.clone());
        }
        // So does every bundle change of the issuer in process (a rotation step, by hand or
        // scheduled, another replica's, a prune): the CA pins shown are the ones presented.
        Host::Single { issuer } | Host::Issuer { issuer } => poke_on(issuer.bundles(), poke.clone()),
    }
    let daemon = Daemon {
        inputs,
        load_cache: Arc::new(std::sync::Mutex::new(load_cache)),
        log_level: options.log_level.clone(),
        host,
        agent: None,
        agent_store: opened.agent,
        issuer_store: opened
            .issuer
            .map(|s| (s, issuer_spec.as_ref().and_then(|d| d.spec.storage.path.clone()))),
        status,
        poke,
        applied,
        retry: Retry::default(),
        persist,
        services: BTreeMap::new(),
        outputs: BTreeMap::new(),
        telemetry,
    };

    // 7. The admin API.
    let (reload_tx, reloads) = mpsc::channel::<oneshot::Sender<()>>(16);
    let admin_path = crate::admin::socket_for(&daemon.applied()).expect("an agent config or an issuer");
    let admin = AdminApi {
        status: daemon.status.reader(),
        reload: reload_tx,
        applied: daemon.applied.subscribe(),
        issuer: daemon.host.local().cloned(),
        sessions,
    };
    match crate::admin::server::serve(admin, &admin_path, stop_rx) {
        Ok(()) => tracing::info!(path = %admin_path.display(), "admin API listening"),
        Err(e) => tracing::warn!(error = %e, "no admin API: tbotctl get/apply/status will not reach this daemon"),
    }
    let mut booted = Booted {
        daemon,
        signals,
        events,
        watcher,
        reloads,
        stop,
        retry_at: None,
        oneshot: options.oneshot,
    };
    if options.oneshot {
        return Ok(booted);
    }

    // 8. First convergence.
    if let Some(config) = &config
        && let Err(code) = first_convergence(&mut booted, config).await
    {
        let _ = booted.stop.send(true);
        booted.daemon.shutdown().await;
        return Err(code);
    }
    let daemon = &mut booted.daemon;
    daemon.set_applied(daemon.applied());
    daemon.report(&daemon.retry.waiting());

    // 9. Diagnostics, then ready.
    if let Some(addr) = options.diag_addr.or(config.as_ref().and_then(|c| c.diag_addr)) {
        let names = config
            .iter()
            .flat_map(|c| c.services.iter().map(|s| s.display_name().to_owned()))
            .collect();
        let metrics = daemon.telemetry.metrics.clone();
        match crate::admin::diag::serve(addr, daemon.status.reader(), names, metrics).await {
            Ok(()) => tracing::info!(%addr, "diagnostics listening: /livez /readyz /metrics"),
            Err(e) => tracing::warn!(error = %e, "no diagnostics endpoint"),
        }
    }
    crate::controller::notify::ready();
    Ok(booted)
}

/// Phase 8: join, then outputs and listeners, with the rule at start. `Err` stops the start.
async fn first_convergence(booted: &mut Booted, config: &AgentConfig) -> Result<(), ExitCode> {
    let daemon = &mut booted.daemon;
    if let Err(e) = daemon.start_agent(config).await {
        if daemon.host.remote().is_none() {
            // In process, a join that fails is a document problem: say so and stop.
            return Err(fail(&e, &e.hint()));
        }
        // A remote issuer may come back, or an edit may fix the terms: keep trying.
        tracing::error!(error = %e, hint = %e.hint(), "cannot join the issuer yet; retrying");
        let desired = daemon.applied();
        daemon.record(
            &[Failure::issuer(vec![super::agent_ref()], Reason::JoinFailed, &e)],
            &desired,
        );
        booted.retry_at = daemon.retry.next_due();
    }
    if daemon.agent.is_some() {
        daemon.sync_outputs(config).await;
        daemon.sync_services(config).await.map_err(|e| {
            fail(
                super::services::explain_all(&e),
                "fix the listener's address, or stop whatever holds it",
            )
        })?;
    }
    Ok(())
}
