//! The `workload-identity-api` services: one Workload API + SDS server per socket. A new service is
//! bound; a moved one is bound at its new address before the old one closes; a removed one is
//! closed; the others are reconfigured in place (selector, lifetime, attestors) without a rebind.

use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::Server;

use super::Daemon;
use crate::agent::attest::{AttestSettings, DEFAULT_HASH_LIMIT};
use crate::agent::containers::engine::EngineSettings;
use crate::error::Explain;
use crate::issuer::IdentitySelector;
use crate::resource::agent::{AgentConfig, Engine, Listen, Service};
use crate::workload_api::listener;
use crate::workload_api::proto::spiffe_workload_api_server::SpiffeWorkloadApiServer;
use crate::workload_api::sds::proto::secret_discovery_service_server::SecretDiscoveryServiceServer;
use crate::workload_api::server::{ServiceConfig, WorkloadApi};

/// Why a service's socket is not served.
#[derive(Debug, thiserror::Error)]
pub(super) enum ServiceError {
    #[error("service {service}: {source}")]
    Bind {
        service: String,
        source: listener::ListenError,
    },
    #[error("service {service}: cannot listen on {addr}: {source}")]
    Tcp {
        service: String,
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("service {service}: the bot has not joined yet")]
    NotJoined { service: String },
}

impl Explain for ServiceError {
    fn hint(&self) -> std::borrow::Cow<'_, str> {
        match self {
            ServiceError::Bind { source, .. } => source.hint(),
            ServiceError::Tcp { .. } => "choose a free address".into(),
            ServiceError::NotJoined { .. } => "it is served once the bot joins".into(),
        }
    }

    fn is_transient(&self) -> bool {
        true
    }
}

/// Every failure of one sync, each with what to do next.
pub(super) fn explain_all(errors: &[ServiceError]) -> String {
    errors.iter().map(Explain::explain).collect::<Vec<_>>().join("; ")
}

/// One serving `workload-identity-api` service.
pub(super) struct Running {
    pub listen: Listen,
    config: watch::Sender<ServiceConfig>,
    attest: watch::Sender<AttestSettings>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Running {
    /// Stops accepting, ends the streams, and removes the socket.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
        if let Listen::Unix(path) = &self.listen {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Which identities a service asks for, and for how long.
pub(super) fn service_config(service: &Service, agent: &AgentConfig) -> ServiceConfig {
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
        engines: [
            (Engine::Docker, &service.attestors.docker),
            (Engine::Podman, &service.attestors.podman),
        ]
        .into_iter()
        .filter_map(|(engine, settings)| {
            let settings = settings.as_ref().filter(|s| s.enabled)?;
            Some(EngineSettings {
                engine,
                // A bad `addr` is a load error, so the document that gets here has a good one.
                socket: settings.socket(engine).ok()?,
                allow_rootless: settings.allow_rootless,
            })
        })
        .collect(),
        kubelet: service
            .attestors
            .kubernetes
            .as_ref()
            .filter(|k| k.enabled)
            .map(crate::agent::containers::kubernetes::KubeletSettings::of),
        ..AttestSettings::default()
    }
}

/// Replaces `current` with `new` and says whether it changed.
fn replace_if_changed<T: PartialEq>(current: &mut T, new: T) -> bool {
    let changed = *current != new;
    *current = new;
    changed
}

impl Daemon {
    async fn start_service(
        &self,
        service: &Service,
        listen: &Listen,
        config: &AgentConfig,
    ) -> Result<Running, ServiceError> {
        let name = || service.display_name().to_owned();
        let agent = self
            .agent
            .clone()
            .ok_or_else(|| ServiceError::NotJoined { service: name() })?;
        let (config_tx, config_rx) = watch::channel(service_config(service, config));
        let (attest_tx, attest_rx) = watch::channel(attest_settings(service));
        let (stop_tx, stop_rx) = watch::channel(false);
        let incoming = match listen {
            Listen::Unix(path) => {
                let l = listener::bind_unix(path).map_err(|source| ServiceError::Bind {
                    service: name(),
                    source,
                })?;
                listener::incoming_unix(l, attest_rx, self.telemetry.workload_api.connections.clone())
            }
            Listen::Tcp(addr) => {
                let l = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|source| ServiceError::Tcp {
                        service: name(),
                        addr: *addr,
                        source,
                    })?;
                tracing::warn!(
                    service = service.display_name(),
                    %addr,
                    "TCP callers are not attested: only identities whose rules read no workload attribute are served"
                );
                listener::incoming_tcp(l)
            }
        };
        let api = WorkloadApi::new(agent, config_rx, stop_rx.clone(), self.telemetry.workload_api.clone());
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
    pub(super) async fn sync_services(&mut self, config: &AgentConfig) -> Result<(), Vec<ServiceError>> {
        let mut errors = Vec::new();
        for service in &config.services {
            let Some(listen) = service.socket() else { continue };
            let name = service.display_name().to_owned();
            match self.services.get(&name) {
                Some(running) if &running.listen == listen => {
                    running
                        .config
                        .send_if_modified(|c| replace_if_changed(c, service_config(service, config)));
                    running
                        .attest
                        .send_if_modified(|a| replace_if_changed(a, attest_settings(service)));
                }
                _ => match self.start_service(service, listen, config).await {
                    Ok(new) => {
                        if let Some(old) = self.services.insert(name.clone(), new) {
                            tracing::info!(service = %name, from = %old.listen, "closing the old listener");
                            old.stop().await;
                        }
                    }
                    Err(e) => errors.push(e),
                },
            }
        }
        let wanted: Vec<&str> = config
            .services
            .iter()
            .filter(|s| s.socket().is_some())
            .map(|s| s.display_name())
            .collect();
        let gone: Vec<String> = self
            .services
            .keys()
            .filter(|n| !wanted.contains(&n.as_str()))
            .cloned()
            .collect();
        for name in gone {
            if let Some(old) = self.services.remove(&name) {
                tracing::info!(service = %name, listen = %old.listen, "listener removed");
                old.stop().await;
            }
        }
        if errors.is_empty() { Ok(()) } else { Err(errors) }
    }
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
