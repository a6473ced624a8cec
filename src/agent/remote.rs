//! The `Issuer` trait over the network: an agent of a remote issuer (`proxy_server`/`auth_server`).
//! The issuer is trusted by pin (`onboarding.ca_pins`, checked inside the first TLS handshake), by
//! CA file (`onboarding.ca_path`), and afterwards by the trust bundle it pushes; `insecure` only when
//! written. Calls present the bot certificate as the TLS client certificate; a `Watch` stream keeps
//! the bundle and the policy revision current, reconnecting with jittered exponential backoff.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use crate::error::Explain;
use crate::issuer::keys::ca::spki_pin;
use crate::issuer::tls::{self, provider};
use crate::issuer::wire::{self, proto};
use crate::issuer::{
    Attributes, BotCertificate, Bundles, IdentitySelector, Issuer, IssuerError, JoinProof, JoinRequest, JwtRequest,
    JwtSvid, PolicyEvent, RenewRequest, Resolved, X509Request, X509Svid,
};
use crate::store::{Secrecy, Store};
use proto::bot_service_client::BotServiceClient;
use proto::join_service_client::JoinServiceClient;
use proto::workload_identity_service_client::WorkloadIdentityServiceClient;

/// Where the remote issuer is and how to trust it: the agent config's `proxy_server` (or
/// `auth_server`) and `onboarding`.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteSettings {
    /// `host:port`.
    pub address: String,
    pub ca_pins: Vec<String>,
    pub ca_path: Option<PathBuf>,
    pub insecure: bool,
}

/// The state of the link to the issuer, for `tbotctl status`.
#[derive(Debug, Clone, PartialEq)]
pub struct Link {
    pub address: String,
    pub connected: bool,
    /// Why not, while not connected; empty when connected.
    pub message: String,
}

/// The saved trust bundle: a restart while the issuer is down still knows whom to trust.
const BUNDLE_FILE: &str = "agent/bundle.json";

#[derive(serde::Serialize, serde::Deserialize)]
struct SavedBundle {
    trust_domain: String,
    /// Base64 DER.
    x509_authorities: Vec<String>,
    jwt_keys: Vec<serde_json::Value>,
    sequence: u64,
    #[serde(default)]
    active_ca: usize,
    #[serde(default)]
    active_kid: String,
}

/// The remote issuer.
pub struct RemoteIssuer {
    target: RwLock<Arc<Target>>,
    /// The bot credential presented as the TLS client certificate.
    identity: RwLock<Option<Arc<CertifiedKey>>>,
    /// Moves when the identity or the target changes: connections made before are not reused.
    epoch: watch::Sender<u64>,
    channel: Mutex<Option<(u64, Channel)>>,
    bundles: watch::Sender<Arc<Bundles>>,
    events: watch::Sender<Arc<PolicyEvent>>,
    link: watch::Sender<Link>,
    store: Store,
    /// `iam` join streams waiting for their solution, by challenge.
    pending: Mutex<Vec<PendingJoin>>,
    watching: std::sync::Once,
    /// The local address connections come from (a load generator posing as many hosts); `None`
    /// lets the kernel choose, as for every real agent.
    local_ip: Mutex<Option<std::net::IpAddr>>,
    /// `tbot_remote_issuer_connected`.
    connected: crate::telemetry::Gauge,
}

struct PendingJoin {
    challenge: String,
    tx: mpsc::Sender<proto::JoinRequest>,
    responses: tonic::Streaming<proto::JoinResponse>,
    started: std::time::Instant,
}

/// The address and the trust of one configuration.
struct Target {
    settings: RemoteSettings,
    server_name: ServerName<'static>,
    verifier: Arc<PinVerifier>,
}

impl RemoteIssuer {
    /// A client of the issuer at `settings.address`; nothing is dialled until the first call.
    /// `metrics.issuer_connected` follows the link.
    pub fn new(
        settings: RemoteSettings,
        store: Store,
        metrics: &super::AgentMetrics,
    ) -> Result<Arc<RemoteIssuer>, IssuerError> {
        let saved = load_bundle(&store);
        let bundles = watch::channel(Arc::new(saved.unwrap_or_default())).0;
        let target = Target::new(settings.clone(), bundles.subscribe())?;
        if settings.insecure {
            tracing::warn!(
                issuer = %settings.address,
                "onboarding.insecure is set: the issuer's identity is NOT checked, and anyone on the network path \
                 can impersonate it; set `onboarding.ca_pins` instead"
            );
        }
        Ok(Arc::new(RemoteIssuer {
            target: RwLock::new(Arc::new(target)),
            identity: RwLock::new(None),
            epoch: watch::channel(0).0,
            channel: Mutex::new(None),
            bundles,
            events: watch::channel(Arc::new(PolicyEvent::default())).0,
            link: watch::channel(Link {
                address: settings.address.clone(),
                connected: false,
                message: "not connected yet".into(),
            })
            .0,
            store,
            pending: Mutex::new(Vec::new()),
            watching: std::sync::Once::new(),
            local_ip: Mutex::new(None),
            connected: metrics.issuer_connected.clone(),
        }))
    }

    /// The settings in force.
    pub fn settings(&self) -> RemoteSettings {
        self.target.read().expect("target poisoned").settings.clone()
    }

    /// New address or trust (an edit of `proxy_server` or `onboarding`): later calls go there.
    pub fn retarget(&self, settings: RemoteSettings) -> Result<(), IssuerError> {
        if self.settings() == settings {
            return Ok(());
        }
        let target = Target::new(settings.clone(), self.bundles.subscribe())?;
        *self.target.write().expect("target poisoned") = Arc::new(target);
        self.link.send_modify(|l| l.address = settings.address.clone());
        self.epoch.send_modify(|e| *e += 1);
        Ok(())
    }

    /// Connects from `ip` from now on (a load generator posing as many hosts, each with its own
    /// address, as the issuer's per-address limits expect).
    #[cfg(feature = "testing")]
    pub fn set_local_address(&self, ip: std::net::IpAddr) {
        *self.local_ip.lock().expect("local address poisoned") = Some(ip);
        self.epoch.send_modify(|e| *e += 1);
    }

    /// The link to the issuer, now and on every change.
    pub fn link(&self) -> watch::Receiver<Link> {
        self.link.subscribe()
    }

    /// A channel for the current identity and target, dialled lazily and kept until either changes.
    fn channel(&self) -> Result<Channel, IssuerError> {
        let epoch = *self.epoch.borrow();
        let mut slot = self.channel.lock().expect("channel poisoned");
        if let Some((at, channel)) = slot.as_ref()
            && *at == epoch
        {
            return Ok(channel.clone());
        }
        let target = self.target.read().expect("target poisoned").clone();
        let identity = self.identity.read().expect("identity poisoned").clone();
        let local = *self.local_ip.lock().expect("local address poisoned");
        let channel = connect(&target, identity, local)?;
        *slot = Some((epoch, channel.clone()));
        Ok(channel)
    }

    /// A transport failure as an `Unavailable` error that says what went wrong, naming the pin the
    /// server presented when that was it.
    fn unreachable(&self, status: &tonic::Status) -> IssuerError {
        let target = self.target.read().expect("target poisoned").clone();
        let refusal = target.verifier.last_refusal.lock().expect("refusal poisoned").take();
        let error = match (refusal, wire::from_status(status)) {
            (Some(why), _) => IssuerError::Unavailable(why),
            (None, IssuerError::Unavailable(message)) => IssuerError::Unavailable(format!(
                "{}: {message}{}",
                target.settings.address,
                source_chain(status)
            )),
            (None, other) => other,
        };
        // Until the `Watch` stream is up, the last failed call is why the agent is not connected.
        if matches!(error, IssuerError::Unavailable(_)) && !self.link.borrow().connected {
            self.set_link(false, error.explain());
        }
        error
    }

    fn set_bundles(&self, bundles: Bundles) {
        let changed = self.bundles.send_if_modified(|current| {
            let same = current.trust_domain == bundles.trust_domain
                && current.x509_authorities == bundles.x509_authorities
                && current.jwt_keys == bundles.jwt_keys;
            if !same {
                *current = Arc::new(bundles);
            }
            !same
        });
        if changed {
            save_bundle(&self.store, &self.bundles.borrow());
        }
    }

    fn set_link(&self, connected: bool, message: String) {
        self.connected.set(i64::from(connected));
        self.link.send_if_modified(|l| {
            if l.connected && !connected {
                tracing::warn!(issuer = %l.address, reason = %message,
                    "lost the connection to the issuer; cached SVIDs keep being served while it reconnects");
            }
            let changed = l.connected != connected || l.message != message;
            l.connected = connected;
            l.message = message;
            changed
        });
    }

    /// Keeps a `Watch` stream open (bundle and policy pushes) for as long as the issuer client
    /// lives; call it once the agent holds an identity. Calling it again does nothing.
    pub fn follow(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        self.watching.call_once(|| {
            tokio::spawn(watch_loop(weak));
        });
    }

    async fn open_join(
        &self,
    ) -> Result<(mpsc::Sender<proto::JoinRequest>, tonic::Streaming<proto::JoinResponse>), IssuerError> {
        let (tx, rx) = mpsc::channel(2);
        let mut client = JoinServiceClient::new(self.channel()?);
        let responses = client
            .join(ReceiverStream::new(rx))
            .await
            .map_err(|s| self.unreachable(&s))?
            .into_inner();
        Ok((tx, responses))
    }

    async fn join_result(
        &self,
        responses: &mut tonic::Streaming<proto::JoinResponse>,
    ) -> Result<BotCertificate, IssuerError> {
        let message = responses
            .message()
            .await
            .map_err(|s| self.unreachable(&s))?
            .ok_or_else(|| IssuerError::Unavailable("the issuer ended the join without an answer".into()))?;
        match message.response {
            Some(proto::join_response::Response::Result(cert)) => self.accept_bot(cert),
            _ => Err(IssuerError::Unavailable(
                "the issuer answered the join with something else than a certificate".into(),
            )),
        }
    }

    fn accept_bot(&self, cert: proto::BotCertificate) -> Result<BotCertificate, IssuerError> {
        let (cert, bundle) = wire::bot_from_wire(cert)?;
        if let Some(bundle) = bundle {
            self.set_bundles(bundle);
        }
        Ok(cert)
    }
}

fn source_chain(status: &tonic::Status) -> String {
    use std::error::Error;
    let mut out = String::new();
    let mut source = status.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

fn load_bundle(store: &Store) -> Option<Bundles> {
    use base64::Engine;
    let saved: SavedBundle = store.read_json(BUNDLE_FILE).ok().flatten()?;
    let engine = base64::engine::general_purpose::STANDARD;
    Some(Bundles {
        trust_domain: saved.trust_domain,
        x509_authorities: saved
            .x509_authorities
            .iter()
            .filter_map(|b| engine.decode(b).ok())
            .collect(),
        jwt_keys: saved.jwt_keys,
        sequence: saved.sequence,
        active_ca: saved.active_ca,
        active_kid: saved.active_kid,
        federated: Default::default(),
    })
}

fn save_bundle(store: &Store, bundles: &Bundles) {
    use base64::Engine;
    let engine = base64::engine::general_purpose::STANDARD;
    let saved = SavedBundle {
        trust_domain: bundles.trust_domain.clone(),
        x509_authorities: bundles.x509_authorities.iter().map(|d| engine.encode(d)).collect(),
        jwt_keys: bundles.jwt_keys.clone(),
        sequence: bundles.sequence,
        active_ca: bundles.active_ca,
        active_kid: bundles.active_kid.clone(),
    };
    if let Err(e) = store.write_json(BUNDLE_FILE, &saved, Secrecy::Public) {
        tracing::warn!(error = %e, "cannot save the trust bundle; a restart while the issuer is down will not know it");
    }
}

impl Target {
    fn new(settings: RemoteSettings, bundles: watch::Receiver<Arc<Bundles>>) -> Result<Target, IssuerError> {
        let host = crate::resource::agent::server_host(&settings.address).map_err(IssuerError::Invalid)?;
        let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
        let server_name = ServerName::try_from(host)
            .map_err(|e| IssuerError::Invalid(format!("`{}` is not a host name: {e}", settings.address)))?;
        let mut files = Vec::new();
        if let Some(path) = &settings.ca_path {
            let pem = std::fs::read(path).map_err(|e| {
                IssuerError::Invalid(format!(
                    "cannot read `onboarding.ca_path` {}: {e}; copy the issuer's CA certificate there",
                    path.display()
                ))
            })?;
            use rustls::pki_types::pem::PemObject;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| {
                    IssuerError::Invalid(format!(
                        "`onboarding.ca_path` {} is not a PEM certificate file: {e}; copy the issuer's CA \
                         certificate there",
                        path.display()
                    ))
                })?;
                files.push(cert.to_vec());
            }
            if files.is_empty() {
                return Err(IssuerError::Invalid(format!(
                    "`onboarding.ca_path` {} holds no PEM certificate",
                    path.display()
                )));
            }
        }
        Ok(Target {
            verifier: Arc::new(PinVerifier {
                provider: provider(),
                address: settings.address.clone(),
                pins: settings.ca_pins.clone(),
                files,
                bundles,
                insecure: settings.insecure,
                last_refusal: Mutex::new(None),
            }),
            settings,
            server_name,
        })
    }
}

/// Dials the issuer lazily: TCP, then TLS 1.3 with ALPN h2, presenting `identity` when there is one.
fn connect(
    target: &Target,
    identity: Option<Arc<CertifiedKey>>,
    local: Option<std::net::IpAddr>,
) -> Result<Channel, IssuerError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| IssuerError::Crypto(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(target.verifier.clone());
    let mut config = match identity {
        Some(key) => builder.with_client_cert_resolver(Arc::new(Present(key))),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let (address, name) = (target.settings.address.clone(), target.server_name.clone());
    let endpoint = Endpoint::from_shared(format!("http://{address}"))
        .map_err(|e| IssuerError::Invalid(format!("`{address}` is not an address: {e}")))?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true)
        .tcp_nodelay(true);
    Ok(endpoint.connect_with_connector_lazy(tower::service_fn(move |_| {
        let (connector, address, name) = (connector.clone(), address.clone(), name.clone());
        async move {
            let tcp = match local {
                None => tokio::net::TcpStream::connect(&address).await?,
                Some(ip) => {
                    let remote = tokio::net::lookup_host(&address)
                        .await?
                        .next()
                        .ok_or_else(|| std::io::Error::other(format!("{address} resolves to nothing")))?;
                    let socket = if ip.is_ipv4() {
                        tokio::net::TcpSocket::new_v4()?
                    } else {
                        tokio::net::TcpSocket::new_v6()?
                    };
                    socket.bind(std::net::SocketAddr::new(ip, 0))?;
                    socket.connect(remote).await?
                }
            };
            tcp.set_nodelay(true)?;
            let tls = connector.connect(name, tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    })))
}

/// Presents the bot certificate when the server asks for one.
#[derive(Debug)]
struct Present(Arc<CertifiedKey>);

impl ResolvesClientCert for Present {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Trusts the issuer's certificate when it chains to a CA that is pinned, in `ca_path`, or in the
/// trust bundle the issuer pushed since (rotations); names and dates are checked by webpki.
#[derive(Debug)]
struct PinVerifier {
    provider: Arc<CryptoProvider>,
    address: String,
    pins: Vec<String>,
    files: Vec<Vec<u8>>,
    bundles: watch::Receiver<Arc<Bundles>>,
    insecure: bool,
    /// Why the last handshake was refused, for the error the caller sees.
    last_refusal: Mutex<Option<String>>,
}

impl PinVerifier {
    fn refuse(&self, why: String) -> rustls::Error {
        *self.last_refusal.lock().expect("refusal poisoned") = Some(why.clone());
        rustls::Error::General(why)
    }
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self.insecure {
            return Ok(ServerCertVerified::assertion());
        }
        let mut roots = RootCertStore::empty();
        let mut presented = Vec::new();
        for ca in intermediates {
            let pin = spki_pin(ca).unwrap_or_default();
            if self.pins.contains(&pin) {
                let _ = roots.add(ca.clone().into_owned());
            }
            presented.push(pin);
        }
        for der in self.files.iter().chain(self.bundles.borrow().x509_authorities.iter()) {
            let _ = roots.add(CertificateDer::from(der.clone()));
        }
        // Nothing trusted signed it: say which CA the server presented, and where trust comes from.
        let untrusted = || {
            let presented = if presented.is_empty() {
                "no CA certificate".to_owned()
            } else {
                format!("CA pin {}", presented.join(", "))
            };
            let trusted = if self.files.is_empty() {
                "`onboarding.ca_pins`"
            } else {
                "`onboarding.ca_pins` nor the CA file `onboarding.ca_path`"
            };
            self.refuse(format!(
                "the server at {} presented {presented}, which is not in {trusted}; check the pin with `tbotctl \
                 status` on the issuer host (or `proxy_server` points at the wrong server)",
                self.address
            ))
        };
        if roots.is_empty() {
            return Err(untrusted());
        }
        let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .build()
            .map_err(|e| self.refuse(format!("cannot build the verifier: {e}")))?;
        verifier
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            .map_err(|e| match e {
                rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer) => untrusted(),
                e => self.refuse(format!(
                    "the server at {} is not the pinned issuer: {e}; check `proxy_server` against the issuer's \
                     `public_addrs`, and the pin",
                    self.address
                )),
            })
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls::tls12_refused()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls::tls13_signature(&self.provider, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// Reconnect delays: full jitter, 1 s doubling to 60 s; after a connection that was up, the first
/// retry waits a random 0–5 s so that agents do not all come back in the same instant.
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);
const SPREAD_AFTER_DROP: Duration = Duration::from_secs(5);

fn random_below(max: Duration) -> Duration {
    max.mul_f64((crate::agent::bot::jitter(1.0) / 2.0).clamp(0.0, 1.0))
}

async fn watch_loop(weak: std::sync::Weak<RemoteIssuer>) {
    let mut backoff = BACKOFF_MIN;
    let mut revision = 0u64;
    loop {
        let Some(issuer) = weak.upgrade() else { return };
        let mut epoch = issuer.epoch.subscribe();
        let started = *epoch.borrow_and_update();
        let was_up = match issuer.watch_once(&mut revision, &mut epoch).await {
            Ok(was_up) => was_up,
            Err(e) => {
                issuer.set_link(false, e.explain());
                false
            }
        };
        // A new identity (a renewal) or target: reconnect at once with it. Compared by value:
        // `watch_once` has already seen the change (`changed()` marks it seen), so `has_changed`
        // would say no, and every renewal would leave the agent without a stream for 0–5 s.
        if *epoch.borrow() != started {
            backoff = BACKOFF_MIN;
            continue;
        }
        let wait = if was_up {
            backoff = BACKOFF_MIN;
            random_below(SPREAD_AFTER_DROP)
        } else {
            let wait = random_below(backoff);
            backoff = (backoff * 2).min(BACKOFF_MAX);
            wait
        };
        drop(issuer);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = epoch.changed() => backoff = BACKOFF_MIN,
        }
    }
}

impl RemoteIssuer {
    /// One `Watch` stream, until it ends or the identity/target changes. Returns whether it was up.
    async fn watch_once(&self, revision: &mut u64, epoch: &mut watch::Receiver<u64>) -> Result<bool, IssuerError> {
        let mut client = WorkloadIdentityServiceClient::new(self.channel()?);
        let request = proto::WatchRequest {
            policy_revision: *revision,
        };
        let mut stream = tokio::select! {
            r = client.watch(request) => r.map_err(|s| self.unreachable(&s))?.into_inner(),
            _ = epoch.changed() => return Ok(false),
        };
        let mut up = false;
        loop {
            let message = tokio::select! {
                m = stream.message() => m,
                _ = epoch.changed() => return Ok(up),
            };
            let update = match message {
                Ok(Some(update)) => update,
                Ok(None) => {
                    self.set_link(false, "the issuer ended the stream; reconnecting".into());
                    return Ok(up);
                }
                Err(status) => {
                    let e = self.unreachable(&status);
                    self.set_link(false, e.explain());
                    return Ok(up);
                }
            };
            if !up {
                up = true;
                tracing::info!(issuer = %self.settings().address, "connected to the issuer");
                self.set_link(true, String::new());
            }
            if let Some(bundle) = update.bundle {
                self.set_bundles(wire::bundle_from_wire(bundle)?);
            }
            let first = *revision == 0;
            if update.policy_revision != *revision {
                *revision = update.policy_revision;
                if !first || update.all {
                    self.events.send_replace(Arc::new(PolicyEvent {
                        revision: update.policy_revision,
                        identities: update.identities.into_iter().collect(),
                        all: update.all,
                    }));
                }
            }
        }
    }
}

/// Pending `iam` join streams older than this are dropped (the issuer gives up after a minute).
const PENDING_TTL: Duration = Duration::from_secs(60);
const MAX_PENDING: usize = 16;

#[async_trait::async_trait]
impl Issuer for RemoteIssuer {
    /// Opens an `iam` join stream and returns the challenge the issuer made inside it; the stream
    /// waits for [`Issuer::join`] with that challenge.
    async fn challenge(&self) -> Result<String, IssuerError> {
        let (tx, mut responses) = self.open_join().await?;
        let init = proto::JoinRequest {
            request: Some(proto::join_request::Request::Init(proto::ClientInit {
                join_method: "iam".into(),
                ..Default::default()
            })),
        };
        tx.send(init)
            .await
            .map_err(|_| IssuerError::Unavailable("the join stream closed".into()))?;
        let message = responses
            .message()
            .await
            .map_err(|s| self.unreachable(&s))?
            .ok_or_else(|| IssuerError::Unavailable("the issuer ended the join without a challenge".into()))?;
        let Some(proto::join_response::Response::Challenge(c)) = message.response else {
            return Err(IssuerError::Unavailable(
                "the issuer did not answer with a challenge".into(),
            ));
        };
        let mut pending = self.pending.lock().expect("pending poisoned");
        pending.retain(|p| p.started.elapsed() < PENDING_TTL);
        if pending.len() >= MAX_PENDING {
            pending.remove(0);
        }
        pending.push(PendingJoin {
            challenge: c.challenge.clone(),
            tx,
            responses,
            started: std::time::Instant::now(),
        });
        Ok(c.challenge)
    }

    async fn join(&self, request: JoinRequest) -> Result<BotCertificate, IssuerError> {
        match request.proof {
            JoinProof::Token => {
                let (tx, mut responses) = self.open_join().await?;
                let init = proto::JoinRequest {
                    request: Some(proto::join_request::Request::Init(proto::ClientInit {
                        token_name: request.token,
                        join_method: "token".into(),
                        public_key: request.public_key,
                        ttl_seconds: wire::seconds(request.ttl),
                    })),
                };
                tx.send(init)
                    .await
                    .map_err(|_| IssuerError::Unavailable("the join stream closed".into()))?;
                self.join_result(&mut responses).await
            }
            JoinProof::Iam {
                challenge,
                request: signed,
            } => {
                let found = {
                    let mut pending = self.pending.lock().expect("pending poisoned");
                    pending
                        .iter()
                        .position(|p| p.challenge == challenge)
                        .map(|i| pending.remove(i))
                };
                let Some(mut join) = found else {
                    return Err(IssuerError::JoinRefused(
                        "challenge: its join stream is gone (older than a minute); join again".into(),
                    ));
                };
                let solution = proto::JoinRequest {
                    request: Some(proto::join_request::Request::Solution(proto::IamSolution {
                        method: signed.method,
                        url: signed.url,
                        headers: signed.headers.into_iter().collect(),
                        body: signed.body.into_bytes(),
                        token_name: request.token,
                        public_key: request.public_key,
                        ttl_seconds: wire::seconds(request.ttl),
                    })),
                };
                join.tx
                    .send(solution)
                    .await
                    .map_err(|_| IssuerError::Unavailable("the join stream closed".into()))?;
                self.join_result(&mut join.responses).await
            }
        }
    }

    async fn renew(&self, request: RenewRequest) -> Result<BotCertificate, IssuerError> {
        let mut client = BotServiceClient::new(self.channel()?);
        let cert = client
            .renew(proto::RenewRequest {
                public_key: request.public_key,
                proof: request.proof,
                ttl_seconds: wire::seconds(request.ttl),
            })
            .await
            .map_err(|s| self.unreachable(&s))?
            .into_inner();
        self.accept_bot(cert)
    }

    async fn resolve(
        &self,
        _bot_certificate: &[u8],
        selector: &IdentitySelector,
        workload: &Attributes,
    ) -> Result<Vec<Resolved>, IssuerError> {
        let mut client = WorkloadIdentityServiceClient::new(self.channel()?);
        let selector = match selector {
            IdentitySelector::Name(name) => proto::resolve_request::Selector::Name(name.clone()),
            IdentitySelector::Labels(labels) => proto::resolve_request::Selector::Labels(wire::labels(labels)),
        };
        let answer = client
            .resolve(proto::ResolveRequest {
                selector: Some(selector),
                workload: wire::attributes_to_wire(workload),
            })
            .await
            .map_err(|s| self.unreachable(&s))?
            .into_inner();
        Ok(answer
            .identities
            .into_iter()
            .map(|r| Resolved {
                name: r.name,
                reads: r.reads,
            })
            .collect())
    }

    async fn issue_x509(&self, request: X509Request) -> Result<X509Svid, IssuerError> {
        let mut client = WorkloadIdentityServiceClient::new(self.channel()?);
        let svid = client
            .issue_x509(proto::IssueX509Request {
                identity: request.identity,
                workload: wire::attributes_to_wire(&request.workload),
                public_key: request.public_key,
                ttl_seconds: wire::seconds(request.ttl),
            })
            .await
            .map_err(|s| self.unreachable(&s))?
            .into_inner();
        wire::x509_from_wire(svid)
    }

    async fn issue_jwt(&self, request: JwtRequest) -> Result<JwtSvid, IssuerError> {
        let mut client = WorkloadIdentityServiceClient::new(self.channel()?);
        let svid = client
            .issue_jwt(proto::IssueJwtRequest {
                identity: request.identity,
                workload: wire::attributes_to_wire(&request.workload),
                audience: request.audience,
                ttl_seconds: wire::seconds(request.ttl),
            })
            .await
            .map_err(|s| self.unreachable(&s))?
            .into_inner();
        wire::jwt_from_wire(svid)
    }

    fn bundles(&self) -> watch::Receiver<Arc<Bundles>> {
        self.bundles.subscribe()
    }

    fn present(&self, certificate: &[u8], key: &[u8]) {
        let same = self
            .identity
            .read()
            .expect("identity poisoned")
            .as_ref()
            .is_some_and(|k| k.cert.first().is_some_and(|c| c.as_ref() == certificate));
        if same {
            return;
        }
        let signing = match provider()
            .key_provider
            .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.to_vec())))
        {
            Ok(k) => k,
            Err(e) => {
                tracing::error!(error = %e, "the bot key cannot be used for TLS");
                return;
            }
        };
        let cert = CertifiedKey::new(vec![CertificateDer::from(certificate.to_vec())], signing);
        *self.identity.write().expect("identity poisoned") = Some(Arc::new(cert));
        self.epoch.send_modify(|e| *e += 1);
    }

    fn policy_events(&self) -> Option<watch::Receiver<Arc<PolicyEvent>>> {
        Some(self.events.subscribe())
    }
}
