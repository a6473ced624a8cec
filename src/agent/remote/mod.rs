//! The `Issuer` trait over the network: an agent of a remote issuer (`proxy_server`/`auth_server`).
//! The issuer is trusted by pin (`onboarding.ca_pins`, checked inside the first TLS handshake), by
//! CA file (`onboarding.ca_path`), and afterwards by the trust bundle it pushes; `insecure` only when
//! written. Calls present the bot certificate as the TLS client certificate; a `Watch` stream keeps
//! the bundle and the policy revision current, reconnecting with jittered exponential backoff.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use tokio::sync::watch;
use tonic::transport::Channel;

use crate::error::Explain;
use crate::issuer::tls::provider;
use crate::issuer::wire::{self, proto};
use crate::issuer::{
    Attributes, BotCertificate, Bundles, IdentitySelector, Issuer, IssuerError, JoinRequest, JwtRequest, JwtSvid,
    PolicyEvent, RenewRequest, Resolution, X509Request, X509Svid,
};
use crate::store::Store;
use proto::bot_service_client::BotServiceClient;
use proto::workload_identity_service_client::WorkloadIdentityServiceClient;

mod joining;
mod trust;
mod watching;

use joining::PendingJoin;

use trust::{
    Connection, Identity, Target, Withdrawn, connect, load_bundle, load_withdrawn, note_withdrawn, save_bundle,
};
use watching::watch_loop;

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
    /// Why the issuer refuses this agent's bot certificate, while it does (a withdrawn CA, a locked
    /// or superseded instance): workloads are denied until the agent holds one it accepts.
    pub refused: Option<String>,
}

/// The remote issuer.
pub struct RemoteIssuer {
    target: RwLock<Arc<Target>>,
    /// The bot credential presented as the TLS client certificate.
    identity: Identity,
    /// Moves when the identity or the target changes: connections made before are not reused
    /// (except the one a join was answered on, which the issuer bound to the new certificate).
    epoch: watch::Sender<u64>,
    channel: Mutex<Option<(u64, Channel)>>,
    /// The last connection dialled.
    connection: Arc<Mutex<Connection>>,
    /// The connection the issuer bound to the certificate of a join answered on it, and that
    /// certificate: presenting it keeps the connection.
    bound: Mutex<Option<(Connection, Vec<u8>)>>,
    bundles: watch::Sender<Arc<Bundles>>,
    /// The pins of CAs seen leaving the bundle: not trusted by pin any more.
    withdrawn: Withdrawn,
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
    /// What the agent last reported holding: sent again on every new `Watch` stream (the issuer
    /// keeps it with the stream).
    held: Mutex<Option<crate::issuer::Holdings>>,
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
        let withdrawn = load_withdrawn(&store);
        let target = Target::new(settings.clone(), bundles.subscribe(), withdrawn.clone())?;
        if settings.insecure {
            tracing::warn!(
                issuer = %settings.address,
                "onboarding.insecure is set: the issuer's identity is NOT checked, and anyone on the network path \
                 can impersonate it; set `onboarding.ca_pins` instead"
            );
        }
        Ok(Arc::new(RemoteIssuer {
            target: RwLock::new(Arc::new(target)),
            identity: Identity::default(),
            epoch: watch::channel(0).0,
            channel: Mutex::new(None),
            connection: Arc::default(),
            bound: Mutex::new(None),
            bundles,
            withdrawn,
            events: watch::channel(Arc::new(PolicyEvent::default())).0,
            link: watch::channel(Link {
                address: settings.address.clone(),
                connected: false,
                message: "not connected yet".into(),
                refused: None,
            })
            .0,
            store,
            pending: Mutex::new(Vec::new()),
            watching: std::sync::Once::new(),
            local_ip: Mutex::new(None),
            connected: metrics.issuer_connected.clone(),
            held: Mutex::new(None),
        }))
    }

    /// Sends what the agent holds (see [`Issuer::report`]).
    async fn send_holdings(&self, holdings: crate::issuer::Holdings) -> Result<(), IssuerError> {
        let mut client = WorkloadIdentityServiceClient::new(self.channel()?);
        client
            .report(wire::holdings_to_wire(holdings))
            .await
            .map_err(|s| self.unreachable(&s))?;
        Ok(())
    }

    /// Sends the last report again (a new `Watch` stream: the issuer keeps reports with streams),
    /// in the background, retrying a few times: until it arrives the issuer counts this agent as
    /// one that may hold anything.
    pub(super) fn resend_holdings(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut wait = std::time::Duration::from_millis(500);
            for _ in 0..5 {
                let Some(issuer) = weak.upgrade() else { return };
                let held = issuer.held.lock().expect("held poisoned").clone();
                let Some(holdings) = held else { return };
                match issuer.send_holdings(holdings).await {
                    Ok(()) => return,
                    Err(e) => {
                        tracing::debug!(error = %e, "cannot report what this agent holds after reconnecting; retrying")
                    }
                }
                drop(issuer);
                tokio::time::sleep(wait).await;
                wait *= 2;
            }
        });
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
        let target = Target::new(settings.clone(), self.bundles.subscribe(), self.withdrawn.clone())?;
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
        self.channel_at().map(|(_, channel)| channel)
    }

    /// [`RemoteIssuer::channel`], with its epoch.
    fn channel_at(&self) -> Result<(u64, Channel), IssuerError> {
        let epoch = *self.epoch.borrow();
        let mut slot = self.channel.lock().expect("channel poisoned");
        if let Some((at, channel)) = slot.as_ref()
            && *at == epoch
        {
            return Ok((epoch, channel.clone()));
        }
        let target = self.target.read().expect("target poisoned").clone();
        let local = *self.local_ip.lock().expect("local address poisoned");
        let channel = connect(&target, self.identity.clone(), local, epoch, self.connection.clone())?;
        *slot = Some((epoch, channel.clone()));
        Ok((epoch, channel))
    }

    /// Whether the channel's last connection presents no certificate while this agent holds one:
    /// it was dialled before, and the issuer bound it to the join's certificate or (rarely) not.
    fn on_anonymous_connection(&self) -> bool {
        let made = *self.connection.lock().expect("connection note poisoned");
        made.epoch == *self.epoch.borrow()
            && !made.presented
            && self.identity.read().expect("identity poisoned").is_some()
    }

    /// A transport failure as an `Unavailable` error that says what went wrong, naming the pin the
    /// server presented when that was it.
    fn unreachable(&self, status: &tonic::Status) -> IssuerError {
        if status.code() == tonic::Code::Unauthenticated && self.on_anonymous_connection() {
            // A connection the issuer did not bind at the join (it went down right after, or the
            // issuer is older): the next call dials again, presenting the certificate.
            self.epoch.send_modify(|e| *e += 1);
            return IssuerError::Unavailable(
                "the connection to the issuer was made before this agent held its bot certificate; reconnecting with it"
                    .into(),
            );
        }
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
        if matches!(error, IssuerError::Unauthenticated(_) | IssuerError::Locked { .. }) {
            // The next step is the agent's own (see `set_refused`), not the generic hint.
            self.set_refused(error.to_string());
        }
        error
    }

    /// A call was answered: the bot certificate is accepted (a refusal from a replica that had not
    /// seen a renewal yet is over).
    fn accepted(&self) {
        self.link.send_if_modified(|l| {
            let was = l.refused.take().is_some();
            if was {
                tracing::info!(issuer = %l.address, "the issuer accepts this agent's bot certificate again");
            }
            was
        });
    }

    /// The issuer refused the bot certificate: said once at ERROR, and shown until a call is
    /// answered or a `Watch` stream is up again.
    fn set_refused(&self, why: String) {
        self.link.send_if_modified(|l| {
            if l.refused.is_none() {
                tracing::error!(issuer = %l.address, reason = %why,
                    "the issuer refuses this agent's bot certificate: workloads are denied new SVIDs until the agent \
                     holds one it accepts; the agent renews (an `iam` agent joins again) by itself, and a `token` \
                     agent whose renewal is refused needs a new token in `onboarding.token`");
            }
            let changed = l.refused.as_ref() != Some(&why);
            l.refused = Some(why);
            changed
        });
    }

    fn set_bundles(&self, bundles: Bundles) {
        let changed = self.bundles.send_if_modified(|current| {
            // Everything but the sequence: an activation changes only which CA or key signs, and
            // the agent must hear of it to sign its SVIDs again and renew its bot certificate; a
            // revocation changes only the CRLs.
            let same = Bundles {
                sequence: current.sequence,
                ..bundles.clone()
            } == **current;
            if !same {
                note_withdrawn(&self.store, &self.withdrawn, current, &bundles);
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
        // A stream that is up means the certificate is accepted again.
        if connected {
            self.accepted();
        }
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

#[async_trait::async_trait]
impl Issuer for RemoteIssuer {
    /// Opens an `iam` join stream and returns the challenge the issuer made inside it; the stream
    /// waits for [`Issuer::join`] with that challenge.
    async fn challenge(&self) -> Result<String, IssuerError> {
        self.start_iam_join().await
    }

    async fn join(&self, request: JoinRequest) -> Result<BotCertificate, IssuerError> {
        self.join_over(request).await
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
            .map_err(|s| self.unreachable(&s))
            .inspect(|_| self.accepted())?
            .into_inner();
        self.accept_bot(cert)
    }

    async fn resolve(
        &self,
        _bot_certificate: &[u8],
        selector: &IdentitySelector,
        workload: &Attributes,
    ) -> Result<Resolution, IssuerError> {
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
            .map_err(|s| self.unreachable(&s))
            .inspect(|_| self.accepted())?
            .into_inner();
        Ok(wire::resolved_from_wire(answer))
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
            .map_err(|s| self.unreachable(&s))
            .inspect(|_| self.accepted())?
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
            .map_err(|s| self.unreachable(&s))
            .inspect(|_| self.accepted())?
            .into_inner();
        wire::jwt_from_wire(svid)
    }

    async fn report(&self, _bot_certificate: &[u8], holdings: crate::issuer::Holdings) -> Result<(), IssuerError> {
        *self.held.lock().expect("held poisoned") = Some(holdings.clone());
        self.send_holdings(holdings).await
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
        // A bot key is ECDSA unless made otherwise: tried first, as the generic loader tries RSA
        // before it.
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.to_vec()));
        let signing = match rustls::crypto::aws_lc_rs::sign::any_ecdsa_type(&der)
            .or_else(|_| provider().key_provider.load_private_key(der))
        {
            Ok(k) => k,
            Err(e) => {
                tracing::error!(error = %e, "the bot key cannot be used for TLS");
                return;
            }
        };
        let cert = CertifiedKey::new(vec![CertificateDer::from(certificate.to_vec())], signing);
        *self.identity.write().expect("identity poisoned") = Some(Arc::new(cert));
        // The connection a join was just answered on is bound to this certificate: it stays, and
        // any connection made from now on presents the certificate. Any other is left.
        let bound = self.bound.lock().expect("bound poisoned").take();
        let made = *self.connection.lock().expect("connection note poisoned");
        let keep = bound.is_some_and(|(on, der)| on == made && on.epoch == *self.epoch.borrow() && der == certificate);
        if !keep {
            self.epoch.send_modify(|e| *e += 1);
        }
    }

    fn policy_events(&self) -> Option<watch::Receiver<Arc<PolicyEvent>>> {
        Some(self.events.subscribe())
    }
}
