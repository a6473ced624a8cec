//! The admin gRPC service inside the daemon.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tonic::{Request, Response, Status};

use super::proto::admin_server::{Admin, AdminServer};
use super::proto::*;
use crate::controller::status::{self, StatusReader, StatusTable};
use crate::error::Explain;
use crate::workload_api::listener::{self, CallerInfo};

/// The daemon's side of the admin API.
#[derive(Clone)]
pub struct AdminApi {
    /// The daemon's status (its one writer is the daemon).
    pub status: StatusReader,
    /// Asks the loop for a reload; answered when it is done.
    pub reload: mpsc::Sender<oneshot::Sender<()>>,
    /// What the daemon last applied.
    pub applied: watch::Receiver<Arc<crate::manifest::DesiredState>>,
    /// The issuer in this process, for its bot instances.
    pub issuer: Option<Arc<crate::issuer::LocalIssuer>>,
    /// The agents connected to the issuer API, on an issuer host.
    pub sessions: Option<Arc<crate::issuer::server::Sessions>>,
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
        source: s.source().to_owned(),
        hash: s.hash.clone(),
        document_json: s.document_json(),
        instances: Vec::new(),
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
        let status = self.status.get();
        status
            .table
            .objects
            .values()
            .filter(|s| (kind.is_empty() || s.kind == kind) && (name.is_empty() || s.name == name))
            .map(|s| {
                let mut object = to_proto(s);
                if s.kind == "bot"
                    && let Some(issuer) = &self.issuer
                {
                    object.instances = instances(issuer, &s.name);
                }
                object
            })
            .collect()
    }

    fn all_ready(&self) -> bool {
        self.status.get().all_ready()
    }
}

/// The events between two snapshots of the status table.
fn events(before: &StatusTable, after: &StatusTable) -> Vec<Event> {
    let now = crate::rfc3339(time::OffsetDateTime::now_utc());
    let mut out = Vec::new();
    for (r, s) in &after.objects {
        let old = before.objects.get(r);
        let event = |kind: &str, status: &str, reason: &str, message: &str| Event {
            time: now.clone(),
            kind: s.kind.clone(),
            name: s.name.clone(),
            r#type: kind.to_owned(),
            status: status.to_owned(),
            reason: reason.to_owned(),
            message: message.to_owned(),
            generation: s.generation,
        };
        if old.map(|o| o.generation) != Some(s.generation) {
            out.push(event("Generation", "", "SpecChanged", ""));
        }
        if old.map(|o| o.observed_generation) != Some(s.observed_generation) {
            out.push(event("ObservedGeneration", "", "Converged", ""));
        }
        for c in &s.conditions {
            let was = old.and_then(|o| o.conditions.iter().find(|w| w.kind == c.kind));
            if was.map(|w| (w.status, &w.message)) != Some((c.status, &c.message)) {
                let status = if c.status { "True" } else { "False" };
                out.push(event(&c.kind, status, &c.reason, &c.message));
            }
        }
    }
    for (r, s) in &before.objects {
        if !after.objects.contains_key(r) {
            out.push(Event {
                time: now.clone(),
                kind: s.kind.clone(),
                name: s.name.clone(),
                r#type: "Deleted".into(),
                ..Event::default()
            });
        }
    }
    out
}

type EventStream = tokio_stream::wrappers::ReceiverStream<Result<Event, Status>>;

#[tonic::async_trait]
impl Admin for AdminApi {
    type WatchStream = EventStream;

    async fn plan(&self, request: Request<PlanRequest>) -> Result<Response<PlanResponse>, Status> {
        authorize(&request)?;
        let dir = tempfile::tempdir().map_err(|e| Status::internal(format!("cannot stage the documents: {e}")))?;
        for file in &request.get_ref().files {
            let name = Path::new(&file.name)
                .file_name()
                .ok_or_else(|| Status::invalid_argument(format!("`{}` is not a file name", file.name)))?;
            std::fs::write(dir.path().join(name), &file.content)
                .map_err(|e| Status::internal(format!("cannot stage {}: {e}", file.name)))?;
        }
        let staged = dir.path().to_owned();
        let loaded = tokio::task::spawn_blocking(move || crate::manifest::load(&[crate::manifest::Input::Dir(staged)]))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|d| Status::invalid_argument(d.message.clone()))?;
        if loaded.has_errors() {
            let errors = loaded
                .diagnostics
                .iter()
                .filter(|d| d.is_error())
                .map(|d| {
                    let name = d
                        .location
                        .path
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    match d.location.pos {
                        Some(p) => format!("{name}:{}:{}: {}", p.line, p.column, d.message),
                        None => format!("{name}: {}", d.message),
                    }
                })
                .collect();
            return Ok(Response::new(PlanResponse {
                errors,
                ..PlanResponse::default()
            }));
        }
        let applied = self.applied.borrow().clone();
        let plan = crate::controller::plan(&loaded.state, Some(&applied));
        let (add, change, destroy) = plan.counts();
        Ok(Response::new(PlanResponse {
            changes: plan
                .changes
                .iter()
                .map(|(r, c)| PlannedChange {
                    kind: r.kind.as_str().to_owned(),
                    name: r.name.clone(),
                    change: c.symbol().to_owned(),
                })
                .collect(),
            actions: plan.steps.iter().map(|s| s.action.to_string()).collect(),
            add: add as u32,
            change: change as u32,
            destroy: destroy as u32,
            errors: vec![],
        }))
    }

    async fn watch(&self, request: Request<WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        authorize(&request)?;
        let (tx, rx) = mpsc::channel(64);
        let mut status = self.status.clone();
        status.mark_unchanged();
        tokio::spawn(async move {
            let mut before = status.get().table.clone();
            while status.changed().await {
                let after = status.get().table.clone();
                for event in events(&before, &after) {
                    if tx.send(Ok(event)).await.is_err() {
                        return;
                    }
                }
                before = after;
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    async fn get(&self, request: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        authorize(&request)?;
        let GetRequest { kind, name } = request.into_inner();
        Ok(Response::new(GetResponse {
            objects: self.objects(&kind, &name),
            file_errors: file_errors(&self.status.get().table),
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
        let mut status = self.status.clone();
        let converged = tokio::time::timeout(wait, async {
            loop {
                if self.all_ready() {
                    return;
                }
                if !status.changed().await {
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
        let (info, objects, not_ready, failing) = {
            let status = self.status.get();
            let objects = &status.table.objects;
            let not_ready = objects.values().filter(|s| !s.is_ready()).count();
            (
                status.host.clone(),
                objects.len(),
                not_ready,
                file_errors(&status.table),
            )
        };
        // Replicas recorded in a shared store (a lone issuer's own record is not worth a table).
        let replicas = match &self.issuer {
            Some(issuer) if !issuer.backing().local => issuer.replicas(),
            _ => Vec::new(),
        };
        Ok(Response::new(StatusResponse {
            trust_domain: info.trust_domain,
            ca_pins: info.ca_pins,
            bot: info.bot,
            bot_expires: info.bot_expires,
            bot_pending: info.bot_pending,
            services: info
                .services
                .into_iter()
                .map(|s| ServiceStatus {
                    name: s.name,
                    listen: s.listen,
                    destination: s.destination,
                    state: s.state,
                    healthy: s.healthy,
                })
                .collect(),
            objects: objects as u64,
            not_ready: not_ready as u64,
            pid: std::process::id(),
            file_errors: failing,
            issuer_listen: info.issuer_listen,
            agents: self
                .sessions
                .as_ref()
                .map(|s| {
                    s.list()
                        .into_iter()
                        .map(|(a, seen)| ConnectedAgent {
                            bot: a.bot,
                            instance: a.instance,
                            address: a.address.to_string(),
                            generation: a.generation,
                            connected_at: rfc3339(a.connected_at),
                            last_seen: rfc3339(seen),
                            ca: a.ca,
                        })
                        .collect()
                })
                .unwrap_or_default(),
            refused: self
                .sessions
                .as_ref()
                .map(|s| {
                    s.refusals()
                        .into_iter()
                        .map(|r| RefusedAgent {
                            bot: r.bot,
                            instance: r.instance,
                            address: r.address.to_string(),
                            at: rfc3339(r.at),
                            reason: r.reason,
                        })
                        .collect()
                })
                .unwrap_or_default(),
            issuer: info.issuer_link.map(|l| IssuerLink {
                address: l.address,
                connected: l.connected,
                message: l.message,
                refused: l.refused,
            }),
            issuer_storage: info.issuer_storage,
            replicas: replicas.iter().map(|r| replica(r, &info.replica)).collect(),
            drift: crate::issuer::state::replicas::drift(&replicas)
                .into_iter()
                .map(|d| DocumentDrift {
                    document: d.document,
                    versions: d
                        .versions
                        .into_iter()
                        .map(|(replica, hash)| DocumentVersion {
                            replica,
                            hash: hash.unwrap_or_default(),
                        })
                        .collect(),
                })
                .collect(),
            keys: self.issuer.as_ref().map(|i| self.key_states(i)).unwrap_or_default(),
            bundle_endpoint: info.bundle_endpoint,
            federations: self
                .issuer
                .as_ref()
                .map(|i| i.federations().iter().map(federation).collect())
                .unwrap_or_default(),
        }))
    }

    type IssuedStream = super::issued::IssuedStream;

    async fn issued(&self, request: Request<IssuedRequest>) -> Result<Response<Self::IssuedStream>, Status> {
        authorize(&request)?;
        super::issued::answer(self.issuer.as_deref(), request.into_inner()).await
    }

    async fn lock(&self, request: Request<LockRequest>) -> Result<Response<LockResponse>, Status> {
        authorize(&request)?;
        super::issued::lock(self.issuer.as_deref(), request.into_inner()).await
    }

    async fn rotate(&self, request: Request<RotateRequest>) -> Result<Response<RotateResponse>, Status> {
        authorize(&request)?;
        let request = request.into_inner();
        let Some(issuer) = &self.issuer else {
            return Err(Status::failed_precondition(
                "this daemon is an agent of a remote issuer: run `tbotctl rotate` against the issuer's admin socket",
            ));
        };
        let jwt = match request.key.as_str() {
            "ca" => false,
            "jwt" => true,
            other => {
                return Err(Status::invalid_argument(format!(
                    "`{other}` is not a key to rotate: say `ca` or `jwt`"
                )));
            }
        };
        use crate::issuer::keys::rotation::{ByHand, Step};
        issuer.refresh_keys().await;
        let asked = match (request.taint_old, request.revoke_old) {
            (true, true) => {
                return Err(Status::invalid_argument(
                    "--taint-old and --revoke-old are two steps: taint first, revoke once every agent moved off the key",
                ));
            }
            (true, false) => ByHand::TaintOld,
            (false, true) => ByHand::RevokeOld,
            (false, false) => ByHand::Rotate {
                grace: Duration::from_secs(request.grace_seconds.into()),
                force: request.force,
            },
        };
        if asked == ByHand::RevokeOld {
            let names: Vec<String> = issuer
                .key_statuses()
                .into_iter()
                .filter(|k| k.kind == if jwt { "jwt" } else { "ca" })
                .filter(|k| matches!(k.phase, crate::issuer::keys::rotation::Phase::Tainted { .. }))
                .map(|k| k.name)
                .collect();
            self.wait_for_dependents(issuer, &names, request.force).await?;
        }
        let withdrawn = if jwt { Vec::new() } else { issuer.withdrawn_cas(asked) };
        if !withdrawn.is_empty() {
            let strand = request.strand || (asked == ByHand::RevokeOld && request.force);
            self.wait_for_renewals_off(issuer, &withdrawn, strand).await?;
        }
        let step = issuer.rotate_by_hand(jwt, asked).await.map_err(|e| match e {
            crate::issuer::IssuerError::Invalid(why) => Status::failed_precondition(why),
            e => Status::unavailable(e.explain()),
        })?;
        let what = if jwt { "JWT key" } else { "CA" };
        let message = match step {
            Step::Prepare { activate_at } => format!(
                "a new {what} is prepared: published in every bundle now, signing from {}",
                crate::issuer::keys::rotation::rfc3339(activate_at)
            ),
            Step::Activate { id } => {
                format!("{what} {id} signs from now on; the old one stays published until what it signed has expired")
            }
            Step::Retire => format!("the retiring {what} is no longer published"),
            Step::RetireEarly => {
                format!("the retiring {what} is withdrawn from every bundle now; what it signed no longer verifies")
            }
            Step::Taint { activate } => format!(
                "{}the old {what} is tainted: every agent issues again now what it signed, while it stays published. \
                 Watch `tbotctl status` until no agent depends on it, then withdraw it with --revoke-old",
                activate
                    .map(|id| format!("{what} {id} signs from now on; "))
                    .unwrap_or_default()
            ),
            Step::Revoke => format!(
                "the tainted {what} is withdrawn from every bundle (agents, replicas, the bundle endpoint): \
                 what it signed no longer verifies"
            ),
        };
        tracing::info!(%message, "rotation by hand");
        Ok(Response::new(RotateResponse {
            message,
            keys: self.key_states(issuer),
        }))
    }
}

impl AdminApi {
    /// Every CA's and JWT key's phase and who still depends on it, for `tbotctl status` and
    /// `tbotctl rotate`.
    fn key_states(&self, issuer: &crate::issuer::LocalIssuer) -> Vec<KeyState> {
        let at = |t: i64| {
            if t == 0 {
                String::new()
            } else {
                crate::issuer::keys::rotation::rfc3339(t)
            }
        };
        issuer
            .key_statuses()
            .into_iter()
            .map(|k| KeyState {
                key: k.kind.to_owned(),
                id: k.id,
                name: k.name,
                phase: k.phase.name().to_owned(),
                created: at(k.created),
                not_after: at(k.not_after),
                phase_ends: k.phase.ends().map(at).unwrap_or_default(),
                ..Default::default()
            })
            .map(|mut k| {
                if k.phase != "revoked" {
                    let d = self.dependents(issuer, &k.name, None);
                    (k.agents, k.svids) = (d.agents, d.svids);
                }
                k
            })
            .collect()
    }
}

fn federation(f: &crate::issuer::federation::FederationState) -> Federation {
    // Whole seconds, as every other time `tbotctl status` shows.
    let at = |t: Option<time::OffsetDateTime>| {
        t.and_then(|t| t.replace_nanosecond(0).ok())
            .map(rfc3339)
            .unwrap_or_default()
    };
    Federation {
        trust_domain: f.trust_domain.clone(),
        source: f.source.clone(),
        synced_at: at(f.synced_at),
        error: f.error.clone().unwrap_or_default(),
        next_sync: at(f.next_sync),
        x509_authorities: f.x509_authorities as u32,
        jwt_keys: f.jwt_keys as u32,
        sequence: f.sequence,
    }
}

fn replica(r: &crate::issuer::state::replicas::ReplicaRecord, this: &str) -> Replica {
    let heartbeat = time::OffsetDateTime::from_unix_timestamp(r.heartbeat)
        .map(rfc3339)
        .unwrap_or_default();
    Replica {
        name: r.name.clone(),
        address: r.address.clone(),
        started: r.started.clone(),
        heartbeat,
        ready: r.ready,
        this: r.name == this,
        conflict: r.conflict.clone(),
    }
}

use crate::rfc3339;

/// A bot's instances, as the issuer's ledger has them.
fn instances(issuer: &crate::issuer::LocalIssuer, bot: &str) -> Vec<BotInstance> {
    issuer
        .instances(Some(bot))
        .into_iter()
        .map(|(key, r)| {
            let info = r.info.unwrap_or_default();
            BotInstance {
                id: key.split_once('/').map_or(String::new(), |(_, id)| id.to_owned()),
                join_method: info.join_method,
                iam_arn: info.iam_arn,
                address: info.address,
                generation: r.generation,
                joined_at: info.joined_at,
                last_renewal: info.last_renewal,
                expires: time::OffsetDateTime::from_unix_timestamp(info.not_after)
                    .map(rfc3339)
                    .unwrap_or_default(),
                locked: r.locked.unwrap_or_default(),
            }
        })
        .collect()
}

fn file_errors(table: &StatusTable) -> Vec<FileError> {
    table
        .file_errors
        .iter()
        .map(|f| FileError {
            path: f.path.clone(),
            location: f.location.clone(),
            message: f.message.clone(),
            errors: f.errors as u32,
        })
        .collect()
}

/// Serves the admin API at `path` (`0600`) until `stop` becomes true.
pub fn serve(api: AdminApi, path: &Path, mut stop: watch::Receiver<bool>) -> Result<(), String> {
    let socket = listener::bind_unix(path).map_err(|e| format!("admin socket: {e}; {}", e.hint()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("admin socket: cannot chmod {}: {e}", path.display()))?;
    let incoming = listener::incoming_unix(socket, watch::channel(Default::default()).1, Default::default());
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
