//! The issuer API (`proto/issuer.proto`) over TLS: joins (`token`, and `iam` with its challenge kept
//! inside the join stream), renewals, resolution and issuance for the bot in the TLS client
//! certificate, and a stream that pushes bundle and policy changes to every connected agent. The
//! decisions are the in-process issuer's: this module only carries them.

mod join;
pub mod limits;
pub mod metrics;
pub mod proxy;
mod sessions;
pub mod tls;

pub use join::token_join_request;
pub use sessions::{AgentSession, Sessions, add_held};
use sessions::{CertDigest, SessionGuard};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use self::limits::{Buckets, check_len};
use self::tls::PeerInfo;
use crate::aws::SignedRequest;
use crate::issuer::wire::{self, proto};
use crate::issuer::{
    Authenticated, Bundles, IdentitySelector, Issuer, IssuerError, JoinProof, JoinRequest, JwtRequest, LocalIssuer,
    PolicyEvent, RenewRequest, X509Request,
};
use proto::bot_service_server::{BotService, BotServiceServer};
use proto::join_service_server::{JoinService, JoinServiceServer};
use proto::workload_identity_service_server::{WorkloadIdentityService, WorkloadIdentityServiceServer};

/// How long a join stream may wait for the agent's next message.
const JOIN_STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// The three services, sharing the issuer, the sessions and the limits.
#[derive(Clone)]
pub struct IssuerApi {
    issuer: Arc<LocalIssuer>,
    sessions: Arc<Sessions>,
    /// By source address.
    joins: Arc<Buckets<std::net::IpAddr>>,
    /// By bot certificate.
    calls: Arc<Buckets<CertDigest>>,
    refusals: Arc<limits::RefusalLog>,
    /// Malformed requests of authenticated bots.
    malformed: Arc<limits::RefusalLog>,
    /// Added to the policy revision so revisions never repeat across restarts (an agent that saw
    /// revision N before a restart must not take the new N for the same documents).
    revision_base: u64,
    metrics: metrics::IssuerApiMetrics,
}

impl IssuerApi {
    pub fn new(issuer: Arc<LocalIssuer>) -> IssuerApi {
        IssuerApi::with_limits(issuer, limits::JOINS_PER_ADDRESS, limits::CALLS_PER_INSTANCE)
    }

    /// With other rates than the defaults (the fuzz target, which calls far faster than any agent).
    pub fn with_limits(issuer: Arc<LocalIssuer>, joins: limits::Rate, calls: limits::Rate) -> IssuerApi {
        IssuerApi {
            issuer,
            sessions: Arc::default(),
            joins: Arc::new(Buckets::new("joins", joins)),
            calls: Arc::new(Buckets::new("calls", calls)),
            refusals: Arc::default(),
            malformed: Arc::default(),
            revision_base: (OffsetDateTime::now_utc().unix_timestamp() as u64) << 20,
            metrics: Default::default(),
        }
    }

    /// Counts into `metrics` (registered at boot) instead of families nobody renders.
    pub fn metered(mut self, metrics: metrics::IssuerApiMetrics) -> IssuerApi {
        self.sessions = Arc::new(Sessions::counted(metrics.agents_connected.clone()));
        self.metrics = metrics;
        self
    }

    pub fn sessions(&self) -> Arc<Sessions> {
        self.sessions.clone()
    }
}

fn peer<T>(request: &Request<T>) -> Result<PeerInfo, Status> {
    request
        .extensions()
        .get::<PeerInfo>()
        .cloned()
        .ok_or_else(|| Status::internal("no connection info"))
}

fn status(e: IssuerError) -> Status {
    wire::to_status(&e)
}

impl IssuerApi {
    /// The bot certificate of the caller's TLS session (and its SHA-256), after the
    /// per-certificate rate limit; the call counts as the certificate's last sign of life.
    fn bot_certificate<T>(&self, request: &Request<T>) -> Result<(Arc<[u8]>, PeerInfo, CertDigest), Status> {
        let peer = peer(request)?;
        let cert = peer.certificate().ok_or_else(|| {
            status(IssuerError::Unauthenticated(
                "this call needs the bot's certificate as the TLS client certificate: join first".into(),
            ))
        })?;
        let digest = CertDigest::of(&cert);
        self.calls.take(&digest).map_err(status)?;
        self.sessions.seen(&digest);
        Ok((cert, peer, digest))
    }

    /// The status of a refused call of a bot; a malformed request (what a tbot agent never sends:
    /// attribute values of the wrong type, keys that are not keys, oversize fields) is also logged.
    fn refuse(&self, peer: &PeerInfo, cert: &[u8], e: IssuerError) -> Status {
        if matches!(e, IssuerError::Invalid(_)) {
            let bot = || match self.issuer.authenticate(cert) {
                Ok(claims) => format!("{}/{}", claims.bot, claims.instance),
                Err(_) => "a bot whose certificate is no longer accepted".into(),
            };
            self.malformed.malformed(peer.address, bot, &e);
        }
        status(e)
    }
}

fn workload(attributes: &[proto::Attribute]) -> Result<crate::issuer::Attributes, IssuerError> {
    if attributes.len() > limits::MAX_ATTRIBUTES {
        return Err(IssuerError::Invalid(format!(
            "{} workload attributes; the limit is {}",
            attributes.len(),
            limits::MAX_ATTRIBUTES
        )));
    }
    for a in attributes {
        check_len("attribute name", a.name.len(), limits::MAX_NAME_BYTES)?;
        for v in &a.values {
            check_len(&a.name, v.len(), limits::MAX_ATTRIBUTE_BYTES)?;
        }
    }
    Ok(wire::attributes_from_wire(attributes))
}

fn ttl(seconds: u32) -> Duration {
    Duration::from_secs(u64::from(seconds.max(1)))
}

#[tonic::async_trait]
impl BotService for IssuerApi {
    async fn renew(&self, request: Request<proto::RenewRequest>) -> Result<Response<proto::BotCertificate>, Status> {
        let (cert, peer, _) = self.bot_certificate(&request)?;
        let refuse = |e: IssuerError| self.refuse(&peer, &cert, e);
        let m = request.into_inner();
        check_len("public_key", m.public_key.len(), limits::MAX_PUBLIC_KEY_BYTES).map_err(refuse)?;
        check_len("proof", m.proof.len(), 1024).map_err(refuse)?;
        let renewed = self
            .issuer
            .renew(RenewRequest {
                certificate: cert.to_vec(),
                public_key: m.public_key,
                proof: m.proof,
                ttl: ttl(m.ttl_seconds),
                address: peer.address.to_string(),
            })
            .await
            .map_err(refuse)?;
        Ok(Response::new(wire::bot_to_wire(
            &renewed,
            &self.issuer.current_bundles(),
        )))
    }
}

#[tonic::async_trait]
impl WorkloadIdentityService for IssuerApi {
    type WatchStream = std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<proto::WatchUpdate, Status>> + Send>>;

    async fn resolve(
        &self,
        request: Request<proto::ResolveRequest>,
    ) -> Result<Response<proto::ResolveResponse>, Status> {
        let (cert, peer, _) = self.bot_certificate(&request)?;
        let refuse = |e: IssuerError| self.refuse(&peer, &cert, e);
        let m = request.into_inner();
        let selector = match m.selector {
            Some(proto::resolve_request::Selector::Name(name)) => {
                check_len("name", name.len(), limits::MAX_NAME_BYTES).map_err(refuse)?;
                IdentitySelector::Name(name)
            }
            Some(proto::resolve_request::Selector::Labels(labels)) => {
                if labels.labels.len() > limits::MAX_ATTRIBUTES {
                    return Err(refuse(IssuerError::Invalid(
                        "more than 64 labels in the selector".into(),
                    )));
                }
                IdentitySelector::Labels(labels.labels.into_iter().collect())
            }
            None => return Err(refuse(IssuerError::Invalid("the selector is empty".into()))),
        };
        let workload = workload(&m.workload).map_err(refuse)?;
        let resolved = self.issuer.resolve(&cert, &selector, &workload).await.map_err(refuse)?;
        Ok(Response::new(wire::resolved_to_wire(resolved)))
    }

    async fn issue_x509(&self, request: Request<proto::IssueX509Request>) -> Result<Response<proto::X509Svid>, Status> {
        let (cert, peer, _) = self.bot_certificate(&request)?;
        let refuse = |e: IssuerError| self.refuse(&peer, &cert, e);
        let m = request.into_inner();
        check_len("identity", m.identity.len(), limits::MAX_NAME_BYTES).map_err(refuse)?;
        check_len("public_key", m.public_key.len(), limits::MAX_PUBLIC_KEY_BYTES).map_err(refuse)?;
        let svid = self
            .issuer
            .issue_x509(X509Request {
                bot_certificate: cert.to_vec(),
                identity: m.identity,
                workload: workload(&m.workload).map_err(refuse)?,
                public_key: m.public_key,
                ttl: ttl(m.ttl_seconds),
            })
            .await
            .map_err(refuse)?;
        self.metrics.x509_issued.inc();
        Ok(Response::new(wire::x509_to_wire(svid)))
    }

    async fn issue_jwt(&self, request: Request<proto::IssueJwtRequest>) -> Result<Response<proto::JwtSvid>, Status> {
        let (cert, peer, _) = self.bot_certificate(&request)?;
        let refuse = |e: IssuerError| self.refuse(&peer, &cert, e);
        let m = request.into_inner();
        check_len("identity", m.identity.len(), limits::MAX_NAME_BYTES).map_err(refuse)?;
        if m.audience.len() > limits::MAX_AUDIENCES {
            return Err(refuse(IssuerError::Invalid(format!(
                "{} audiences; the limit is {}",
                m.audience.len(),
                limits::MAX_AUDIENCES
            ))));
        }
        for a in &m.audience {
            check_len("audience", a.len(), limits::MAX_NAME_BYTES).map_err(refuse)?;
        }
        let svid = self
            .issuer
            .issue_jwt(JwtRequest {
                bot_certificate: cert.to_vec(),
                identity: m.identity,
                workload: workload(&m.workload).map_err(refuse)?,
                audience: m.audience,
                ttl: ttl(m.ttl_seconds),
            })
            .await
            .map_err(refuse)?;
        Ok(Response::new(wire::jwt_to_wire(svid)))
    }

    async fn report(&self, request: Request<proto::HoldingsReport>) -> Result<Response<proto::ReportAck>, Status> {
        let (cert, peer, digest) = self.bot_certificate(&request)?;
        self.issuer.authenticate(&cert).map_err(status)?;
        // Validated whole before anything is kept.
        let mut held = wire::holdings_from_wire(request.into_inner()).map_err(|e| self.refuse(&peer, &cert, e))?;
        // Only the names of this trust domain's keys are kept (what a bot says of others means
        // nothing here, and goes no further, heartbeats included).
        let known: std::collections::BTreeSet<String> =
            self.issuer.key_statuses().into_iter().map(|k| k.name).collect();
        held.x509.retain(|k, _| known.contains(k));
        held.jwt.retain(|k, _| known.contains(k));
        if !known.contains(&held.bot) {
            held.bot.clear();
        }
        self.sessions.hold(&digest, held);
        Ok(Response::new(proto::ReportAck {}))
    }

    async fn watch(&self, request: Request<proto::WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let (cert, peer, digest) = self.bot_certificate(&request)?;
        // Read before the check: a CA withdrawn after it is seen leaving by the first message.
        let last_bundle = self.issuer.current_bundles();
        let Authenticated {
            claims,
            signer: ca,
            not_after,
        } = self.issuer.authenticate_signed(&cert).map_err(status)?;
        let guard = self.sessions.open(AgentSession {
            bot: claims.bot.clone(),
            instance: claims.instance.clone(),
            address: peer.address,
            generation: claims.generation,
            connected_at: OffsetDateTime::now_utc(),
            certificate: digest,
            ca,
            held: None,
        });
        let seen_revision = request.into_inner().policy_revision;
        let state = WatchState {
            bundles: self.issuer.bundles(),
            events: self.issuer.policy_events(),
            locks: self.issuer.locks(),
            issuer: self.issuer.clone(),
            certificate: cert,
            base: self.revision_base,
            sent: None,
            seen_revision,
            // The stream ends when the certificate it was opened with expires: the agent reconnects
            // with its renewed one.
            until: tokio::time::Instant::now()
                + Duration::try_from(not_after - OffsetDateTime::now_utc()).unwrap_or_default(),
            ended: false,
            last_bundle,
            sessions: self.sessions.clone(),
            _guard: guard,
        };
        let stream = futures_util::stream::unfold(state, |mut state| async move {
            let update = state.next().await?;
            Some((update, state))
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// One agent's `Watch` stream.
struct WatchState {
    bundles: watch::Receiver<Arc<Bundles>>,
    events: watch::Receiver<Arc<PolicyEvent>>,
    locks: watch::Receiver<u64>,
    issuer: Arc<LocalIssuer>,
    /// The certificate the stream was opened with: when an instance is locked, it is checked again.
    certificate: Arc<[u8]>,
    base: u64,
    /// The revision last sent (`None` before the first message).
    sent: Option<u64>,
    /// The revision the agent said it had seen when it connected.
    seen_revision: u64,
    until: tokio::time::Instant,
    /// After an error the stream ends.
    ended: bool,
    /// The bundle the certificate was last checked against (shared, not copied), which the first
    /// message and each bundle message send: when a CA leaves, the certificate is checked again.
    last_bundle: Arc<Bundles>,
    sessions: Arc<Sessions>,
    _guard: SessionGuard,
}

impl WatchState {
    async fn next(&mut self) -> Option<Result<proto::WatchUpdate, Status>> {
        if self.ended {
            return None;
        }
        let Some(last) = self.sent else {
            let event = self.events.borrow_and_update().clone();
            let revision = self.base + event.revision;
            let now = self.bundles.borrow_and_update().clone();
            self.locks.borrow_and_update();
            // The certificate was checked when the stream opened, against `last_bundle`: a CA
            // withdrawn, a revocation or a lock since then is checked here (later ones wake the
            // loop below).
            if let Some(refused) = self.accept_bundle(now) {
                return Some(Err(refused));
            }
            if let Some(e) = self.issuer.revoked_or_locked(&self.certificate) {
                return Some(Err(self.refuse(e)));
            }
            self.sent = Some(revision);
            // An agent that saw another revision before (a reconnect, an issuer restart) may have
            // missed changes: it re-decides everything.
            let all = self.seen_revision != 0 && self.seen_revision != revision;
            return Some(Ok(update(revision, Vec::new(), all, Some(&self.last_bundle))));
        };
        loop {
            tokio::select! {
                changed = self.bundles.changed() => {
                    changed.ok()?;
                    let now = self.bundles.borrow_and_update().clone();
                    if let Some(refused) = self.accept_bundle(now) {
                        return Some(Err(refused));
                    }
                    return Some(Ok(update(last, Vec::new(), false, Some(&self.last_bundle))));
                }
                changed = self.events.changed() => {
                    changed.ok()?;
                    let event = self.events.borrow_and_update().clone();
                    return Some(Ok(self.policy_update(last, &event)));
                }
                changed = self.locks.changed() => {
                    changed.ok()?;
                    self.locks.borrow_and_update();
                    // A locked instance hears nothing more (nor a revoked certificate, which is
                    // refused before the lock is looked at).
                    if let Some(e) = self.issuer.revoked_or_locked(&self.certificate) {
                        return Some(Err(self.refuse(e)));
                    }
                }
                _ = tokio::time::sleep_until(self.until) => return None,
            }
        }
    }

    /// Takes `now` as the bundle to send, after checking the certificate against what changed
    /// since `last_bundle`: a CA withdrawn (a forced retire) may be the one that signed it, and a
    /// new revocation may name it. Then the stream ends with the refusal, and the agent says so.
    fn accept_bundle(&mut self, now: Arc<Bundles>) -> Option<Status> {
        let withdrawn = self
            .last_bundle
            .x509_authorities
            .iter()
            .any(|ca| !now.x509_authorities.contains(ca));
        let revoked = self.last_bundle.revoked != now.revoked;
        self.last_bundle = now;
        let refused = if withdrawn {
            self.issuer.authenticate(&self.certificate).err()
        } else if revoked {
            self.issuer.revoked_or_locked(&self.certificate)
        } else {
            None
        };
        refused.map(|e| self.refuse(e))
    }

    /// Ends the stream with `e`, recorded on the agent's session.
    fn refuse(&mut self, e: IssuerError) -> Status {
        self.ended = true;
        self.sessions.refused(&self._guard, &e.to_string());
        status(e)
    }

    /// The message of a policy change after revision `last`. It carries the bundle only when the
    /// bundle changed since the stream last sent it (the bundle's own message follows, with its
    /// checks): an agent never hears of an edit before a bundle the issuer had when it sent it.
    fn policy_update(&mut self, last: u64, event: &PolicyEvent) -> proto::WatchUpdate {
        let revision = self.base + event.revision;
        self.sent = Some(revision);
        // Coalesced events (two edits between two sends) lose the first's identities.
        let all = event.all || revision != last + 1;
        // Every publication is a new `Arc`: the same one is the bundle last checked and sent.
        let current = self.bundles.borrow().clone();
        let changed = !Arc::ptr_eq(&current, &self.last_bundle);
        let identities = event.identities.iter().cloned().collect();
        update(revision, identities, all, changed.then_some(&*current))
    }
}

/// A message of a `Watch` stream, with `bundle` or without (the agent keeps the last it was sent).
fn update(revision: u64, identities: Vec<String>, all: bool, bundle: Option<&Bundles>) -> proto::WatchUpdate {
    proto::WatchUpdate {
        bundle: bundle.map(wire::bundle_to_wire),
        policy_revision: revision,
        identities,
        all,
    }
}

/// A running issuer API.
pub struct Serving {
    pub address: SocketAddr,
    pub sessions: Arc<Sessions>,
}

/// Why the issuer API cannot serve.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {listen}: {source}")]
    Listen { listen: SocketAddr, source: std::io::Error },
    /// The serving certificate (or the TLS configuration) could not be made.
    #[error("the issuer API's serving certificate: {0}")]
    Certificate(#[from] IssuerError),
}

impl crate::error::Explain for ServeError {
    fn hint(&self) -> std::borrow::Cow<'_, str> {
        match self {
            ServeError::Listen { .. } => {
                "choose a free address in `issuer.spec.listen`, or stop whatever holds it".into()
            }
            ServeError::Certificate(e) => e.hint(),
        }
    }
}

/// Binds `listen`, makes the serving certificate for `names`, and serves until `stop` turns true.
/// The serving certificate is re-made when the CA changes and at half its life. With
/// `proxy_protocol`, every connection starts with a PROXY v2 header naming the agent's address.
pub async fn serve(
    issuer: Arc<LocalIssuer>,
    listen: SocketAddr,
    names: Vec<String>,
    proxy_protocol: bool,
    mut stop: watch::Receiver<bool>,
    metrics: metrics::IssuerApiMetrics,
) -> Result<Serving, ServeError> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| ServeError::Listen { listen, source })?;
    let address = listener
        .local_addr()
        .map_err(|source| ServeError::Listen { listen, source })?;
    let cert = tls::ServingCert::new(&issuer, &names)?;
    let config = tls::server_config(cert.clone())?;
    {
        let (issuer, names, mut stop) = (issuer.clone(), names.clone(), stop.clone());
        let mut bundles = issuer.bundles();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    changed = bundles.changed() => if changed.is_err() { break },
                    _ = tokio::time::sleep(tls::SERVING_TTL / 2) => {}
                    _ = stop.wait_for(|s| *s) => break,
                }
                bundles.borrow_and_update();
                if let Err(e) = cert.renew(&issuer, &names) {
                    tracing::error!(error = %e, "cannot renew the issuer API's serving certificate");
                }
            }
        });
    }
    let api = IssuerApi::new(issuer).metered(metrics);
    let sessions = api.sessions();
    let incoming = tls::incoming(listener, config, proxy_protocol);
    let max = limits::MAX_MESSAGE_BYTES;
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .max_concurrent_streams(Some(256))
        .add_service(JoinServiceServer::new(api.clone()).max_decoding_message_size(max))
        .add_service(BotServiceServer::new(api.clone()).max_decoding_message_size(max))
        .add_service(WorkloadIdentityServiceServer::new(api).max_decoding_message_size(max));
    tokio::spawn(async move {
        let result = server
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "the issuer API failed");
        }
    });
    Ok(Serving { address, sessions })
}

#[cfg(test)]
mod tests;
