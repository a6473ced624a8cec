//! The SPIFFE bundle endpoint (SPIFFE Federation §4–5): HTTPS on `issuer.spec.bundle_endpoint.listen`,
//! every `GET` (any path) answered with this trust domain's bundle — each CA as a JWK with `use:
//! x509-svid`, each JWT key with `use: jwt-svid`, `spiffe_sequence` and `spiffe_refresh_hint`.
//! `https_spiffe` presents the issuer's own X509-SVID `spiffe://<td>/tbot/bundle-endpoint`, re-made
//! on every bundle change and at half its life; `https_web` serves `cert_file`/`key_file`, re-read
//! when either file changes.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::Full;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use tokio::sync::watch;

use crate::issuer::LocalIssuer;
use crate::issuer::tls::{self, ServingCert};
use crate::resource::issuer::{BundleEndpoint, BundleProfile};

/// The endpoint SVID's lifetime (capped by the CA's end); re-made at half of it.
const SVID_TTL: Duration = Duration::from_secs(3600);
/// How often `https_web` certificate files are looked at.
const FILE_CHECK: Duration = Duration::from_secs(10);
/// How long a connection may take to say what it wants.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The refresh hint when the document gives none.
pub const DEFAULT_REFRESH_HINT: Duration = Duration::from_secs(300);

/// Why the bundle endpoint cannot serve (at start) or renew its certificate.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("{} holds no PEM certificate", .0.display())]
    NoCertificate(PathBuf),
    #[error("cannot read a PEM private key from {}: {source}", path.display())]
    Key {
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("{}: {source}", path.display())]
    KeyRejected { path: PathBuf, source: rustls::Error },
    /// The endpoint's SVID (`https_spiffe`) could not be made.
    #[error(transparent)]
    Issuer(#[from] crate::issuer::IssuerError),
    #[error("{0}")]
    Tls(#[from] rustls::Error),
    #[error("cannot listen on {listen} for the bundle endpoint: {source}")]
    Listen { listen: SocketAddr, source: std::io::Error },
}

fn web_key(cert_file: &PathBuf, key_file: &PathBuf) -> Result<CertifiedKey, EndpointError> {
    let chain: Vec<Vec<u8>> = CertificateDer::pem_file_iter(cert_file)
        .map_err(|source| EndpointError::Read {
            path: cert_file.clone(),
            source,
        })?
        .filter_map(Result::ok)
        .map(|c| c.to_vec())
        .collect();
    if chain.is_empty() {
        return Err(EndpointError::NoCertificate(cert_file.clone()));
    }
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|source| EndpointError::Key {
        path: key_file.clone(),
        source,
    })?;
    let signing = tls::provider()
        .key_provider
        .load_private_key(key)
        .map_err(|source| EndpointError::KeyRejected {
            path: key_file.clone(),
            source,
        })?;
    Ok(CertifiedKey::new(
        chain.into_iter().map(CertificateDer::from).collect(),
        signing,
    ))
}

fn modified(paths: &[&PathBuf]) -> Vec<Option<SystemTime>> {
    paths
        .iter()
        .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .collect()
}

fn spiffe_key(issuer: &LocalIssuer) -> Result<CertifiedKey, EndpointError> {
    let svid = issuer.endpoint_svid(SVID_TTL)?;
    Ok(tls::certified(vec![svid.certificate], svid.key)?)
}

/// Binds the endpoint and serves it until `stop`. Errors (the address, the files) are returned
/// before anything is served.
pub async fn serve(
    issuer: Arc<LocalIssuer>,
    settings: BundleEndpoint,
    mut stop: watch::Receiver<bool>,
) -> Result<SocketAddr, EndpointError> {
    let hint = settings.refresh_hint.map_or(DEFAULT_REFRESH_HINT, |d| d.as_std());
    // https_web's files (the document requires both for that profile).
    let files = [
        settings.cert_file.clone().unwrap_or_default(),
        settings.key_file.clone().unwrap_or_default(),
    ];
    let cert = match settings.profile {
        BundleProfile::HttpsSpiffe => ServingCert::of(spiffe_key(&issuer)?),
        BundleProfile::HttpsWeb => ServingCert::of(web_key(&files[0], &files[1])?),
    };
    let listen = settings.listen;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| EndpointError::Listen { listen, source })?;
    let address = listener
        .local_addr()
        .map_err(|source| EndpointError::Listen { listen, source })?;
    // Keeps the certificate fresh.
    {
        let (issuer, cert, settings, mut stop) = (issuer.clone(), cert.clone(), settings.clone(), stop.clone());
        tokio::spawn(async move {
            let mut bundles = crate::issuer::Issuer::bundles(&*issuer);
            let mut seen = modified(&[&files[0], &files[1]]);
            loop {
                let wait = match settings.profile {
                    BundleProfile::HttpsSpiffe => SVID_TTL / 2,
                    BundleProfile::HttpsWeb => FILE_CHECK,
                };
                tokio::select! {
                    changed = bundles.changed(), if settings.profile == BundleProfile::HttpsSpiffe => {
                        if changed.is_err() { break }
                    }
                    _ = tokio::time::sleep(wait) => {}
                    _ = async { stop.wait_for(|s| *s).await.map(drop) } => break,
                }
                bundles.borrow_and_update();
                let made = match settings.profile {
                    BundleProfile::HttpsSpiffe => spiffe_key(&issuer),
                    BundleProfile::HttpsWeb => {
                        let now = modified(&[&files[0], &files[1]]);
                        if now == seen {
                            continue;
                        }
                        seen = now;
                        web_key(&files[0], &files[1])
                    }
                };
                match made {
                    Ok(key) => cert.replace(key),
                    Err(e) => {
                        tracing::error!(
                            error = %e,
                            "cannot renew the bundle endpoint's certificate; the current one stays and it is tried \
                             again at the next check (https_web: fix `cert_file`/`key_file`, re-read when they \
                             change; https_spiffe: see the issuer's error above)"
                        )
                    }
                }
            }
        });
    }
    let mut config = rustls::ServerConfig::builder_with_provider(tls::provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    tracing::info!(%address, profile = %settings.profile, "bundle endpoint listening");
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "the bundle endpoint cannot accept");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = async { stop.wait_for(|s| *s).await.map(drop) } => break,
            };
            let (acceptor, issuer) = (acceptor.clone(), issuer.clone());
            tokio::spawn(async move {
                let Ok(Ok(tls)) = tokio::time::timeout(REQUEST_TIMEOUT, acceptor.accept(tcp)).await else {
                    tracing::debug!(%peer, "a bundle endpoint handshake failed or timed out");
                    return;
                };
                let service = hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
                    let issuer = issuer.clone();
                    async move { Ok::<_, Infallible>(answer(&issuer, request.method(), request.uri().path(), hint)) }
                });
                let connection = hyper::server::conn::http1::Builder::new()
                    .header_read_timeout(REQUEST_TIMEOUT)
                    .timer(hyper_util::rt::TokioTimer::new())
                    .keep_alive(false)
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service);
                let _ = tokio::time::timeout(REQUEST_TIMEOUT * 3, connection).await;
            });
        }
    });
    Ok(address)
}

/// The bundle for a `GET` (and headers for a `HEAD`) of any path but the CRLs'; `405` for anything
/// else. `/crl` is the active CA's CRL (DER, `application/pkix-crl`: AWS IAM Roles Anywhere imports
/// it), `/crl.pem` every CA's (PEM, for nginx `ssl_crl` or `curl --crlfile`).
fn answer(issuer: &LocalIssuer, method: &http::Method, path: &str, hint: Duration) -> http::Response<Full<Bytes>> {
    if method != http::Method::GET && method != http::Method::HEAD {
        return http::Response::builder()
            .status(http::StatusCode::METHOD_NOT_ALLOWED)
            .header(http::header::ALLOW, "GET, HEAD")
            .body(Full::new(Bytes::from_static(b"the bundle endpoint answers GET\n")))
            .expect("a valid response");
    }
    let bundles = issuer.current_bundles();
    let (body, content_type) = match path {
        "/crl" => (
            bundles.crls.get(bundles.active_ca).cloned().unwrap_or_default(),
            "application/pkix-crl",
        ),
        "/crl.pem" => (
            bundles
                .crls
                .iter()
                .map(|crl| crate::pem::block("X509 CRL", crl))
                .collect::<String>()
                .into_bytes(),
            "application/x-pem-file",
        ),
        _ => (
            crate::spiffe_bundle::encode(
                &bundles.x509_authorities,
                &bundles.jwt_keys,
                issuer.bundle_sequence(),
                hint,
            ),
            "application/json",
        ),
    };
    if body.is_empty() {
        return http::Response::builder()
            .status(http::StatusCode::SERVICE_UNAVAILABLE)
            .header(http::header::RETRY_AFTER, "1")
            .body(Full::new(Bytes::from_static(
                b"no CRL is signed yet: the issuer signs one at start; try again in a second\n",
            )))
            .expect("a valid response");
    }
    let len = body.len();
    let body = if method == http::Method::HEAD { Vec::new() } else { body };
    http::Response::builder()
        .header(http::header::CONTENT_TYPE, content_type)
        .header(http::header::CONTENT_LENGTH, len)
        .header(http::header::CACHE_CONTROL, "no-store")
        .body(Full::new(Bytes::from(body)))
        .expect("a valid response")
}

impl crate::error::Explain for EndpointError {
    fn hint(&self) -> std::borrow::Cow<'_, str> {
        match self {
            EndpointError::Read { .. }
            | EndpointError::NoCertificate(_)
            | EndpointError::Key { .. }
            | EndpointError::KeyRejected { .. } => {
                "fix `cert_file`/`key_file` of `issuer.spec.bundle_endpoint` (they are read again when they change)"
                    .into()
            }
            EndpointError::Issuer(e) => e.hint(),
            EndpointError::Tls(_) => "this is a bug or a broken TLS library; report it with the log".into(),
            EndpointError::Listen { .. } => {
                "choose a free address in `issuer.spec.bundle_endpoint.listen`, or stop whatever holds it".into()
            }
        }
    }
}
