//! The admin gRPC service inside the daemon.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tonic::{Request, Response, Status};

use super::proto::admin_server::{Admin, AdminServer};
use super::proto::*;
use crate::controller::status::{self, StatusTable};
use crate::workload_api::listener::{self, CallerInfo};

/// What `Status` reports besides the objects.
#[derive(Debug, Clone, Default)]
pub struct DaemonInfo {
    pub trust_domain: String,
    pub bot: String,
    pub bot_expires: String,
    pub services: Vec<(String, String)>,
}

/// The daemon's side of the admin API.
#[derive(Clone)]
pub struct AdminApi {
    pub status: Arc<RwLock<StatusTable>>,
    /// Moves whenever `status` changes.
    pub status_version: watch::Receiver<u64>,
    pub info: Arc<RwLock<DaemonInfo>>,
    /// Asks the loop for a reload; answered when it is done.
    pub reload: mpsc::Sender<oneshot::Sender<()>>,
}

fn to_proto(s: &status::ObjectStatus) -> ObjectStatus {
    ObjectStatus {
        kind: s.kind.clone(),
        name: s.name.clone(),
        path: s.path.clone(),
        generation: s.generation,
        observed_generation: s.observed_generation,
        conditions: s
            .conditions
            .iter()
            .map(|c| Condition {
                r#type: c.kind.clone(),
                status: if c.status { "True" } else { "False" }.into(),
                reason: c.reason.clone(),
                message: c.message.clone(),
                last_transition_time: c.last_transition_time.clone(),
            })
            .collect(),
        source: s.source.clone(),
        hash: s.hash.clone(),
        document_json: s.document_json.clone(),
    }
}

/// Root or the daemon's own uid, by the connection's peer credentials.
fn authorize<T>(request: &Request<T>) -> Result<(), Status> {
    let own = std::fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(0);
    let uid = request
        .extensions()
        .get::<CallerInfo>()
        .and_then(|c| c.0.peer.map(|p| p.uid))
        .ok_or_else(|| Status::permission_denied("the admin socket needs peer credentials"))?;
    if uid == 0 || uid == own {
        Ok(())
    } else {
        Err(Status::permission_denied(format!(
            "uid {uid} may not use the admin API: only root and the daemon's own uid ({own}) may"
        )))
    }
}

impl AdminApi {
    fn objects(&self, kind: &str, name: &str) -> Vec<ObjectStatus> {
        let table = self.status.read().expect("status poisoned");
        table
            .objects
            .values()
            .filter(|s| (kind.is_empty() || s.kind == kind) && (name.is_empty() || s.name == name))
            .map(to_proto)
            .collect()
    }

    fn all_ready(&self) -> bool {
        self.status
            .read()
            .expect("status poisoned")
            .objects
            .values()
            .all(|s| s.is_ready())
    }
}

#[tonic::async_trait]
impl Admin for AdminApi {
    async fn get(&self, request: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        authorize(&request)?;
        let GetRequest { kind, name } = request.into_inner();
        Ok(Response::new(GetResponse {
            objects: self.objects(&kind, &name),
        }))
    }

    async fn apply(&self, request: Request<ApplyRequest>) -> Result<Response<ApplyResponse>, Status> {
        authorize(&request)?;
        let wait = Duration::from_secs(request.get_ref().wait_seconds.into());
        let (done_tx, done_rx) = oneshot::channel();
        self.reload
            .send(done_tx)
            .await
            .map_err(|_| Status::unavailable("the daemon is stopping"))?;
        let _ = done_rx.await;
        let mut version = self.status_version.clone();
        let converged = tokio::time::timeout(wait, async {
            loop {
                if self.all_ready() {
                    return;
                }
                if version.changed().await.is_err() {
                    return;
                }
            }
        })
        .await
        .is_ok()
            && self.all_ready();
        Ok(Response::new(ApplyResponse {
            objects: self.objects("", ""),
            converged,
        }))
    }

    async fn status(&self, request: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        authorize(&request)?;
        let info = self.info.read().expect("info poisoned").clone();
        let table = self.status.read().expect("status poisoned");
        Ok(Response::new(StatusResponse {
            trust_domain: info.trust_domain,
            bot: info.bot,
            bot_expires: info.bot_expires,
            services: info
                .services
                .into_iter()
                .map(|(name, listen)| ServiceStatus { name, listen })
                .collect(),
            objects: table.objects.len() as u64,
            not_ready: table.objects.values().filter(|s| !s.is_ready()).count() as u64,
            pid: std::process::id(),
        }))
    }
}

/// Serves the admin API at `path` (`0600`) until `stop` becomes true.
pub fn serve(api: AdminApi, path: &Path, mut stop: watch::Receiver<bool>) -> Result<(), String> {
    let socket = listener::bind_unix(path).map_err(|e| format!("admin socket: {e}; {}", e.hint()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("admin socket: cannot chmod {}: {e}", path.display()))?;
    let incoming = listener::incoming_unix(socket, watch::channel(Default::default()).1);
    let path = path.to_owned();
    tokio::spawn(async move {
        let result = tonic::transport::Server::builder()
            .add_service(AdminServer::new(api))
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "the admin API failed");
        }
        let _ = std::fs::remove_file(&path);
    });
    Ok(())
}
