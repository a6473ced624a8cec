//! Whom the agent trusts as its issuer: the pinned CAs (`onboarding.ca_pins`), a CA file
//! (`onboarding.ca_path`), and afterwards the trust bundle the issuer pushed (saved, so a restart
//! while the issuer is down still knows). The TLS client: TCP, then TLS 1.3 with ALPN h2, presenting
//! the bot certificate when there is one.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};

use crate::issuer::keys::ca::spki_pin;
use crate::issuer::tls::{self, provider};
use crate::issuer::{Bundles, IssuerError};
use crate::store::{Secrecy, Store};

use super::RemoteSettings;

/// The saved trust bundle: a restart while the issuer is down still knows whom to trust.
pub(super) const BUNDLE_FILE: &str = "agent/bundle.json";

/// The pins of CAs this agent saw leave the trust bundle (retired, or withdrawn after a
/// compromise): a pin in `onboarding.ca_pins` no longer makes such a CA trusted.
pub(super) type Withdrawn = Arc<Mutex<std::collections::BTreeSet<String>>>;
const WITHDRAWN_FILE: &str = "agent/withdrawn-pins.json";

pub(super) fn load_withdrawn(store: &Store) -> Withdrawn {
    let pins: std::collections::BTreeSet<String> = store.read_json(WITHDRAWN_FILE).ok().flatten().unwrap_or_default();
    Arc::new(Mutex::new(pins))
}

/// Notes the CAs of `before` that `after` no longer holds; saves when that adds any.
pub(super) fn note_withdrawn(store: &Store, withdrawn: &Withdrawn, before: &Bundles, after: &Bundles) {
    let gone: Vec<String> = before
        .x509_authorities
        .iter()
        .filter(|ca| !after.x509_authorities.contains(ca))
        .filter_map(|ca| spki_pin(ca))
        .collect();
    if gone.is_empty() || before.trust_domain != after.trust_domain {
        return;
    }
    let mut pins = withdrawn.lock().expect("withdrawn poisoned");
    pins.extend(gone);
    if let Err(e) = store.write_json(WITHDRAWN_FILE, &*pins, Secrecy::Public) {
        tracing::warn!(error = %e, "cannot save the pins of withdrawn CAs");
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct SavedBundle {
    pub(super) trust_domain: String,
    /// Base64 DER.
    x509_authorities: Vec<String>,
    pub(super) jwt_keys: Vec<serde_json::Value>,
    pub(super) sequence: u64,
    #[serde(default)]
    pub(super) active_ca: usize,
    #[serde(default)]
    pub(super) active_kid: String,
    /// The foreign trust domains' bundles, so a restart while the issuer is down still serves them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    federated: Vec<SavedForeign>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct SavedForeign {
    trust_domain: String,
    /// Base64 DER.
    x509_authorities: Vec<String>,
    jwt_keys: Vec<serde_json::Value>,
}

/// The address and the trust of one configuration.
pub(super) struct Target {
    pub(super) settings: RemoteSettings,
    pub(super) server_name: ServerName<'static>,
    pub(super) verifier: Arc<PinVerifier>,
}

pub(super) fn load_bundle(store: &Store) -> Option<Bundles> {
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
        federated: saved
            .federated
            .into_iter()
            .map(|f| {
                let bundle = crate::issuer::TrustBundle {
                    trust_domain: f.trust_domain.clone(),
                    x509_authorities: f
                        .x509_authorities
                        .iter()
                        .filter_map(|b| engine.decode(b).ok())
                        .collect(),
                    jwt_keys: f.jwt_keys,
                };
                (f.trust_domain, Arc::new(bundle))
            })
            .collect(),
        // Not saved: the issuer sends its CRLs again when the agent connects.
        crls: Default::default(),
        revoked: Default::default(),
        tainted_cas: Vec::new(),
        tainted_kids: Vec::new(),
    })
}

pub(super) fn save_bundle(store: &Store, bundles: &Bundles) {
    use base64::Engine;
    let engine = base64::engine::general_purpose::STANDARD;
    let saved = SavedBundle {
        trust_domain: bundles.trust_domain.clone(),
        x509_authorities: bundles.x509_authorities.iter().map(|d| engine.encode(d)).collect(),
        jwt_keys: bundles.jwt_keys.clone(),
        sequence: bundles.sequence,
        active_ca: bundles.active_ca,
        active_kid: bundles.active_kid.clone(),
        federated: bundles
            .federated
            .values()
            .map(|f| SavedForeign {
                trust_domain: f.trust_domain.clone(),
                x509_authorities: f.x509_authorities.iter().map(|d| engine.encode(d)).collect(),
                jwt_keys: f.jwt_keys.clone(),
            })
            .collect(),
    };
    if let Err(e) = store.write_json(BUNDLE_FILE, &saved, Secrecy::Public) {
        tracing::warn!(error = %e, "cannot save the trust bundle; a restart while the issuer is down will not know it");
    }
}

impl Target {
    pub(super) fn new(
        settings: RemoteSettings,
        bundles: watch::Receiver<Arc<Bundles>>,
        withdrawn: Withdrawn,
    ) -> Result<Target, IssuerError> {
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
                withdrawn,
                insecure: settings.insecure,
                last_refusal: Mutex::new(None),
            }),
            settings,
            server_name,
        })
    }
}

/// The bot credential presented on new connections, shared with the issuer client: a connection
/// presents what it holds when the connection is made.
pub(super) type Identity = Arc<std::sync::RwLock<Option<Arc<CertifiedKey>>>>;

/// The last connection dialled to the issuer: of which channel (epoch), its number (counting every
/// connection the client dialled), and whether it presents a bot certificate.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub(super) struct Connection {
    pub(super) epoch: u64,
    pub(super) number: u64,
    pub(super) presented: bool,
}

/// Dials the issuer lazily: TCP, then TLS 1.3 with ALPN h2, presenting the bot certificate in
/// `identity` when there is one then; each connection is noted in `made` (the channel is `epoch`).
pub(super) fn connect(
    target: &Target,
    identity: Identity,
    local: Option<std::net::IpAddr>,
    epoch: u64,
    made: Arc<Mutex<Connection>>,
) -> Result<Channel, IssuerError> {
    let verifier = target.verifier.clone();
    // Checked here once, so that a connection cannot fail on it.
    client_config(&verifier, None)?;
    let (address, name) = (target.settings.address.clone(), target.server_name.clone());
    let endpoint = Endpoint::from_shared(format!("http://{address}"))
        .map_err(|e| IssuerError::Invalid(format!("`{address}` is not an address: {e}")))?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true)
        .tcp_nodelay(true);
    Ok(endpoint.connect_with_connector_lazy(tower::service_fn(move |_| {
        let (verifier, address, name) = (verifier.clone(), address.clone(), name.clone());
        let (identity, made) = (identity.clone(), made.clone());
        async move {
            // Noted as the dialling starts, with the credential read under the same lock: a
            // `present` that looks at the note after setting a new credential sees either this
            // connection (which then presents it) or the one before.
            let key = {
                let mut last = made.lock().expect("connection note poisoned");
                let key = identity.read().expect("identity poisoned").clone();
                if epoch >= last.epoch {
                    *last = Connection {
                        epoch,
                        number: last.number + 1,
                        presented: key.is_some(),
                    };
                }
                key
            };
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
            // Made for each connection (a few microseconds), with the credential it presents.
            let config = client_config(&verifier, key).map_err(std::io::Error::other)?;
            let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(name, tcp)
                .await?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    })))
}

/// TLS 1.3, ALPN h2, the issuer checked by `verifier`, `key` presented when there is one.
fn client_config(
    verifier: &Arc<PinVerifier>,
    key: Option<Arc<CertifiedKey>>,
) -> Result<rustls::ClientConfig, IssuerError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| IssuerError::Crypto(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone());
    let mut config = match key {
        Some(key) => builder.with_client_cert_resolver(Arc::new(Present(key))),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    // The issuer sends no session tickets (see `issuer::server::tls::server_config`).
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

/// Presents the bot certificate when the server asks for one.
#[derive(Debug)]
pub(super) struct Present(Arc<CertifiedKey>);

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
pub(super) struct PinVerifier {
    pub(super) provider: Arc<CryptoProvider>,
    pub(super) address: String,
    pub(super) pins: Vec<String>,
    pub(super) files: Vec<Vec<u8>>,
    pub(super) bundles: watch::Receiver<Arc<Bundles>>,
    pub(super) withdrawn: Withdrawn,
    pub(super) insecure: bool,
    /// Why the last handshake was refused, for the error the caller sees.
    pub(super) last_refusal: Mutex<Option<String>>,
}

impl PinVerifier {
    pub(super) fn refuse(&self, why: String) -> rustls::Error {
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
        let withdrawn = self.withdrawn.lock().expect("withdrawn poisoned").clone();
        for ca in intermediates {
            let pin = spki_pin(ca).unwrap_or_default();
            // A pinned CA that left the bundle since (retired, withdrawn) is trusted no more.
            if self.pins.contains(&pin) && !withdrawn.contains(&pin) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_saved_bundle_keeps_the_federated_domains_across_a_restart() {
        let store = Store::memory();
        let foreign = crate::issuer::TrustBundle {
            trust_domain: "b.test".into(),
            x509_authorities: vec![vec![1, 2, 3]],
            jwt_keys: vec![serde_json::json!({"kid": "k"})],
        };
        let bundles = Bundles {
            trust_domain: "a.test".into(),
            x509_authorities: vec![vec![9; 4], vec![8; 4]],
            sequence: 7,
            active_ca: 1,
            active_kid: "j".into(),
            federated: [("b.test".to_owned(), Arc::new(foreign))].into(),
            ..Bundles::default()
        };
        save_bundle(&store, &bundles);
        assert_eq!(load_bundle(&store), Some(bundles));
    }

    #[test]
    fn a_pinned_ca_that_left_the_bundle_is_trusted_no_more() {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "a retired CA");
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .unwrap()
            .signed_by(&leaf_key, &issuer)
            .unwrap();
        let pin = spki_pin(ca_cert.der()).unwrap();
        let settings = RemoteSettings {
            address: "127.0.0.1:3025".into(),
            ca_pins: vec![pin.clone()],
            ca_path: None,
            insecure: false,
        };
        let bundles = watch::channel(Arc::new(Bundles::default())).1;
        let withdrawn: Withdrawn = Arc::default();
        let target = Target::new(settings, bundles, withdrawn.clone()).unwrap();
        let verify = || {
            target.verifier.verify_server_cert(
                &CertificateDer::from(leaf.der().to_vec()),
                &[CertificateDer::from(ca_cert.der().to_vec())],
                &target.server_name,
                &[],
                UnixTime::now(),
            )
        };
        assert!(verify().is_ok(), "pinned: trusted");
        // The agent saw the CA leave its bundle: the pin no longer trusts it (a compromised CA's
        // key cannot impersonate the issuer to agents that were told).
        let store = Store::memory();
        let before = Bundles {
            trust_domain: "a.test".into(),
            x509_authorities: vec![ca_cert.der().to_vec(), vec![1]],
            ..Bundles::default()
        };
        let after = Bundles {
            trust_domain: "a.test".into(),
            x509_authorities: vec![vec![1]],
            ..Bundles::default()
        };
        note_withdrawn(&store, &withdrawn, &before, &after);
        assert!(verify().is_err(), "withdrawn: refused");
        assert!(
            load_withdrawn(&store).lock().unwrap().contains(&pin),
            "remembered across a restart"
        );
    }
}
