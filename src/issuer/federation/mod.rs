//! SPIFFE federation, the consuming side: one task per `spiffe_federation` document keeps that
//! foreign trust domain's bundle. `static` is read once; `https_web` and `https_spiffe` endpoints are
//! fetched at their refresh hint (clamped to [1 s, 24 h]; 5 min without one), with backoff after a
//! failure. The last good bundle stays in force while an endpoint is down, across restarts too (it
//! is kept in the issuer's store), and a malformed or oversized bundle never replaces it.

pub mod bundle_endpoint;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::error::Explain;
use crate::issuer::TrustBundle;
use crate::issuer::state::backing::{Backing, json};
use crate::kv::Op;
use crate::resource::federation::FederationSpec;
use crate::spiffe_bundle;

/// The refresh hint when the endpoint gives none.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(300);
const MIN_REFRESH: Duration = Duration::from_secs(1);
const MAX_REFRESH: Duration = Duration::from_secs(24 * 3600);
/// One fetch, connection included.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// What `tbotctl status` shows of one foreign trust domain.
#[derive(Debug, Clone, Default)]
pub struct FederationState {
    pub trust_domain: String,
    pub source: String,
    /// The last good fetch (or load of a static bundle).
    pub synced_at: Option<OffsetDateTime>,
    /// Why the last fetch failed.
    pub error: Option<String>,
    pub next_sync: Option<OffsetDateTime>,
    pub x509_authorities: usize,
    pub jwt_keys: usize,
    pub sequence: u64,
}

/// Where a task delivers its bundle: into the issuer's published bundles.
pub type Publish = Arc<dyn Fn(Option<Arc<TrustBundle>>) + Send + Sync>;

/// A running federation: its spec, its task and what it reports.
pub struct Running {
    pub spec: FederationSpec,
    pub state: Arc<Mutex<FederationState>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The last good bundle, as kept in the store.
#[derive(Debug, Serialize, Deserialize)]
struct Kept {
    /// The bundle JSON as fetched.
    bundle: String,
    /// Unix seconds.
    synced_at: i64,
}

/// The store key of a foreign domain's last good bundle.
pub fn kept_key(dir: &str, foreign: &str) -> String {
    format!("{dir}/federation/{foreign}.json")
}

/// Where a federation's bundle comes from, in one phrase.
pub fn source_name(spec: &FederationSpec) -> String {
    let s = &spec.bundle_source;
    if let Some(web) = &s.https_web {
        format!("https_web {}", web.bundle_endpoint_url)
    } else if let Some(spiffe) = &s.https_spiffe {
        format!(
            "https_spiffe {} ({})",
            spiffe.bundle_endpoint_url, spiffe.endpoint_spiffe_id
        )
    } else {
        "static".into()
    }
}

/// Why a foreign bundle could not be fetched or taken. The last good bundle stays in force; the
/// fetch is retried with backoff.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("cannot read `ca_file` {}: {source}", path.display())]
    CaFile { path: PathBuf, source: std::io::Error },
    #[error("`ca_file` {} holds no PEM certificate", .0.display())]
    CaFileEmpty(PathBuf),
    #[error("{0}")]
    Tls(#[from] rustls::Error),
    #[error("no bundle of this domain is known to check its endpoint's SVID with: set `bootstrap_bundle`")]
    NoAnchors,
    #[error("a static bundle is not fetched")]
    Static,
    #[error("{url} did not answer within {FETCH_TIMEOUT:?}")]
    Timeout { url: String },
    #[error("`{0}` is not an https:// URL")]
    NotHttps(String),
    #[error("`{0}` has a bad port")]
    BadPort(String),
    #[error("cannot connect to {authority}: {source}")]
    Connect { authority: String, source: std::io::Error },
    #[error("`{host}` is not a host name: {source}")]
    HostName {
        host: String,
        source: rustls::pki_types::InvalidDnsNameError,
    },
    /// The handshake failed; the cause chain is kept whole (a certificate refusal names its reason).
    #[error("TLS with {authority} failed: {chain}")]
    Handshake { authority: String, chain: String },
    #[error("HTTP with {authority} failed: {source}")]
    Http { authority: String, source: hyper::Error },
    #[error("bad request for {url}: {source}")]
    Request { url: String, source: http::Error },
    #[error("{url}: {source}")]
    Send { url: String, source: hyper::Error },
    #[error("{url} answered {status}")]
    Status { url: String, status: http::StatusCode },
    #[error(
        "{url}: the body could not be read, or is larger than {} bytes: {why}",
        spiffe_bundle::MAX_BYTES
    )]
    Body { url: String, why: String },
    /// The bundle document's own refusal.
    #[error("{0}")]
    Bundle(String),
    #[error("the bundle holds no key: trusting it would distrust every SVID of the domain")]
    Empty,
}

impl crate::error::Explain for FetchError {
    fn hint(&self) -> std::borrow::Cow<'_, str> {
        match self {
            FetchError::CaFile { .. } | FetchError::CaFileEmpty(_) => "fix `ca_file` in the spiffe_federation document",
            FetchError::NoAnchors => "set `bootstrap_bundle` in the spiffe_federation document",
            FetchError::NotHttps(_) | FetchError::BadPort(_) | FetchError::HostName { .. } | FetchError::Static => {
                "fix `bundle_endpoint_url` in the spiffe_federation document"
            }
            _ => "it is retried with backoff; check that the endpoint answers at `bundle_endpoint_url`",
        }
        .into()
    }

    /// A fetch may pass later; a document error waits for an edit (the task still retries).
    fn is_transient(&self) -> bool {
        !matches!(
            self,
            FetchError::CaFile { .. }
                | FetchError::CaFileEmpty(_)
                | FetchError::NoAnchors
                | FetchError::Static
                | FetchError::NotHttps(_)
                | FetchError::BadPort(_)
                | FetchError::HostName { .. }
        )
    }
}

fn parse(trust_domain: &str, bytes: &[u8]) -> Result<(Arc<TrustBundle>, spiffe_bundle::Parsed), FetchError> {
    let parsed = spiffe_bundle::parse(bytes).map_err(FetchError::Bundle)?;
    Ok((to_bundle(trust_domain, &parsed)?, parsed))
}

fn to_bundle(trust_domain: &str, parsed: &spiffe_bundle::Parsed) -> Result<Arc<TrustBundle>, FetchError> {
    if parsed.x509_authorities.is_empty() && parsed.jwt_keys.is_empty() {
        return Err(FetchError::Empty);
    }
    Ok(Arc::new(TrustBundle {
        trust_domain: trust_domain.to_owned(),
        x509_authorities: parsed.x509_authorities.clone(),
        jwt_keys: parsed.jwt_keys.clone(),
    }))
}

/// Where a federation starts from: the bundle of that domain in force now (its spec was edited, say
/// from `static` to `https_spiffe`), kept across the change.
pub struct Start {
    pub trust_domain: String,
    pub spec: FederationSpec,
    pub known: Option<Arc<TrustBundle>>,
}

/// Starts keeping `trust_domain`'s bundle as `spec` says.
pub fn start(start: Start, backing: Backing, dir: String, publish: Publish) -> Running {
    let Start {
        trust_domain,
        spec,
        known,
    } = start;
    let state = Arc::new(Mutex::new(FederationState {
        trust_domain: trust_domain.clone(),
        source: source_name(&spec),
        ..FederationState::default()
    }));
    let task = tokio::spawn(keep(
        trust_domain,
        spec.clone(),
        known,
        backing,
        dir,
        publish,
        state.clone(),
    ));
    Running { spec, state, task }
}

async fn keep(
    trust_domain: String,
    spec: FederationSpec,
    known: Option<Arc<TrustBundle>>,
    backing: Backing,
    dir: String,
    publish: Publish,
    state: Arc<Mutex<FederationState>>,
) {
    let update = |f: &dyn Fn(&mut FederationState)| f(&mut state.lock().expect("federation state poisoned"));
    let source = &spec.bundle_source;
    let store_key = kept_key(&dir, &trust_domain);
    if let Some(fixed) = &source.fixed {
        match parse(&trust_domain, fixed.bundle.as_bytes()) {
            Ok((bundle, _)) => {
                update(&|s| {
                    s.synced_at = Some(OffsetDateTime::now_utc());
                    s.x509_authorities = bundle.x509_authorities.len();
                    s.jwt_keys = bundle.jwt_keys.len();
                });
                // Kept like a fetched one: a later switch to an endpoint starts from it.
                keep_in_store(&backing, &store_key, &trust_domain, fixed.bundle.as_bytes()).await;
                publish(Some(bundle));
            }
            Err(why) => update(&|s| s.error = Some(why.explain())),
        }
        return;
    }
    // The bundle in force (the source was edited), else the last good one (kept across restarts),
    // else the bootstrap bundle.
    let mut current: Option<Arc<TrustBundle>> = None;
    if let Some(bundle) = known {
        update(&|s| {
            s.x509_authorities = bundle.x509_authorities.len();
            s.jwt_keys = bundle.jwt_keys.len();
        });
        current = Some(bundle);
    } else if let Ok(Some((kept, _))) = backing.get_json::<Kept>(&store_key).await
        && let Ok((bundle, _)) = parse(&trust_domain, kept.bundle.as_bytes())
    {
        update(&|s| {
            s.synced_at = OffsetDateTime::from_unix_timestamp(kept.synced_at).ok();
            s.x509_authorities = bundle.x509_authorities.len();
            s.jwt_keys = bundle.jwt_keys.len();
        });
        current = Some(bundle);
    } else if let Some(bootstrap) = source.https_spiffe.as_ref().and_then(|s| s.bootstrap_bundle.as_ref())
        && let Ok((bundle, _)) = parse(&trust_domain, bootstrap.as_bytes())
    {
        current = Some(bundle);
    }
    if current.is_some() {
        publish(current.clone());
    }
    let mut backoff = MIN_REFRESH;
    loop {
        let fetched = fetch_once(&spec, current.as_deref()).await.and_then(|body| {
            let (bundle, parsed) = parse(&trust_domain, &body)?;
            Ok((body, bundle, parsed.sequence, parsed.refresh_hint))
        });
        let wait = match fetched {
            Ok((body, bundle, sequence, hint)) => {
                backoff = MIN_REFRESH;
                if current.as_deref() != Some(&*bundle) {
                    tracing::info!(
                        trust_domain = %trust_domain,
                        cas = bundle.x509_authorities.len(),
                        jwt_keys = bundle.jwt_keys.len(),
                        sequence = sequence.unwrap_or_default(),
                        "a federated bundle changed"
                    );
                    keep_in_store(&backing, &store_key, &trust_domain, &body).await;
                    current = Some(bundle.clone());
                    publish(Some(bundle.clone()));
                }
                update(&|s| {
                    s.synced_at = Some(OffsetDateTime::now_utc());
                    s.error = None;
                    s.x509_authorities = bundle.x509_authorities.len();
                    s.jwt_keys = bundle.jwt_keys.len();
                    s.sequence = sequence.unwrap_or_default();
                });
                hint.unwrap_or(DEFAULT_REFRESH).clamp(MIN_REFRESH, MAX_REFRESH)
            }
            Err(why) => {
                let kept = if current.is_some() {
                    "the last good bundle stays in force"
                } else {
                    "no bundle of this domain is known yet"
                };
                let why = why.explain();
                tracing::warn!(trust_domain = %trust_domain, error = %why, "cannot refresh a federated bundle; {kept}");
                update(&|s| s.error = Some(format!("{why}; {kept}")));
                let wait = backoff;
                backoff = (backoff * 2).min(DEFAULT_REFRESH);
                wait
            }
        };
        update(&|s| s.next_sync = Some(OffsetDateTime::now_utc() + wait));
        tokio::time::sleep(wait).await;
    }
}

/// Keeps `body`, a good bundle of `trust_domain`, in the store.
async fn keep_in_store(backing: &Backing, store_key: &str, trust_domain: &str, body: &[u8]) {
    let kept = Kept {
        bundle: String::from_utf8_lossy(body).into_owned(),
        synced_at: OffsetDateTime::now_utc().unix_timestamp(),
    };
    if let Err(e) = backing.kv.txn(vec![], vec![Op::put(store_key, json(&kept))]).await {
        tracing::warn!(error = %e, trust_domain = %trust_domain, "cannot keep the federated bundle in the store; a restart while its endpoint is down will not have it");
    }
}

/// One GET of the bundle endpoint, TLS checked as the profile says.
async fn fetch_once(spec: &FederationSpec, current: Option<&TrustBundle>) -> Result<Vec<u8>, FetchError> {
    let provider = crate::issuer::tls::provider();
    let source = &spec.bundle_source;
    let (url, config) = if let Some(web) = &source.https_web {
        let mut roots = rustls::RootCertStore::empty();
        match &web.ca_file {
            Some(path) => {
                use rustls::pki_types::pem::PemObject;
                let text = std::fs::read(path).map_err(|source| FetchError::CaFile {
                    path: path.clone(),
                    source,
                })?;
                for der in CertificateDer::pem_slice_iter(&text).flatten() {
                    let _ = roots.add(der);
                }
                if roots.is_empty() {
                    return Err(FetchError::CaFileEmpty(path.clone()));
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        (web.bundle_endpoint_url.as_str(), config)
    } else if let Some(spiffe) = &source.https_spiffe {
        let anchors = current.map(|b| b.x509_authorities.clone()).unwrap_or_default();
        if anchors.is_empty() {
            return Err(FetchError::NoAnchors);
        }
        let verifier = SpiffeVerifier {
            provider: provider.clone(),
            anchors,
            id: spiffe.endpoint_spiffe_id.clone(),
        };
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        (spiffe.bundle_endpoint_url.as_str(), config)
    } else {
        return Err(FetchError::Static);
    };
    tokio::time::timeout(FETCH_TIMEOUT, get(url, config))
        .await
        .map_err(|_| FetchError::Timeout { url: url.to_owned() })?
}

/// `GET url` over TLS with `config`: the body of a 200, at most [`spiffe_bundle::MAX_BYTES`].
pub async fn get(url: &str, mut config: rustls::ClientConfig) -> Result<Vec<u8>, FetchError> {
    let rest = url
        .strip_prefix("https://")
        .ok_or_else(|| FetchError::NotHttps(url.to_owned()))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => {
            (h, p.parse::<u16>().map_err(|_| FetchError::BadPort(url.to_owned()))?)
        }
        _ => (authority, 443),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let tcp = tokio::net::TcpStream::connect((host, port))
        .await
        .map_err(|source| FetchError::Connect {
            authority: authority.to_owned(),
            source,
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let name = ServerName::try_from(host.to_owned()).map_err(|source| FetchError::HostName {
        host: host.to_owned(),
        source,
    })?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| FetchError::Handshake {
            authority: authority.to_owned(),
            chain: crate::error_chain(&e),
        })?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .map_err(|source| FetchError::Http {
            authority: authority.to_owned(),
            source,
        })?;
    let connection = tokio::spawn(connection);
    let request = http::Request::get(path)
        .header(http::header::HOST, authority)
        .header(http::header::ACCEPT, "application/json")
        .body(Empty::<Bytes>::new())
        .map_err(|source| FetchError::Request {
            url: url.to_owned(),
            source,
        })?;
    let response = sender.send_request(request).await.map_err(|source| FetchError::Send {
        url: url.to_owned(),
        source,
    })?;
    let status = response.status();
    if status != http::StatusCode::OK {
        connection.abort();
        return Err(FetchError::Status {
            url: url.to_owned(),
            status,
        });
    }
    let body = Limited::new(response.into_body(), spiffe_bundle::MAX_BYTES)
        .collect()
        .await
        .map_err(|e| FetchError::Body {
            url: url.to_owned(),
            why: e.to_string(),
        })?
        .to_bytes();
    connection.abort();
    Ok(body.to_vec())
}

/// The `https_spiffe` check: the endpoint's chain reaches a CA of the foreign domain's bundle, and
/// its leaf carries exactly the configured SPIFFE ID (no host name is checked: SVIDs have none).
#[derive(Debug)]
pub struct SpiffeVerifier {
    pub provider: Arc<CryptoProvider>,
    pub anchors: Vec<Vec<u8>>,
    pub id: String,
}

impl ServerCertVerifier for SpiffeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let refuse = |why: String| rustls::Error::General(why);
        let ders: Vec<CertificateDer<'static>> = self.anchors.iter().map(|d| CertificateDer::from(d.clone())).collect();
        let anchors: Vec<_> = ders
            .iter()
            .filter_map(|d| webpki::anchor_from_trusted_cert(d).ok())
            .collect();
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(|e| refuse(format!("bad certificate: {e}")))?;
        cert.verify_for_usage(
            self.provider.signature_verification_algorithms.all,
            &anchors,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(|e| {
            refuse(format!(
                "the endpoint's SVID does not chain to the domain's bundle ({e}); if the domain rotated its CA \
                 while this issuer could not fetch, set `bootstrap_bundle` to its current bundle"
            ))
        })?;
        let (_, parsed) =
            x509_parser::parse_x509_certificate(end_entity).map_err(|e| refuse(format!("bad certificate: {e}")))?;
        let ids: Vec<String> = parsed
            .subject_alternative_name()
            .ok()
            .flatten()
            .map(|san| {
                san.value
                    .general_names
                    .iter()
                    .filter_map(|n| match n {
                        x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        if ids != [self.id.clone()] {
            return Err(refuse(format!(
                "the endpoint presented {:?}, not `{}`; check `endpoint_spiffe_id`",
                ids, self.id
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}
