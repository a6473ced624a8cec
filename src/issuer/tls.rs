//! TLS pieces both ends of the issuer API use (the server in `issuer::server`, the client in
//! `agent::remote`) and the bundle endpoint and federation: the one crypto provider, a serving chain
//! with its key (swapped whole when re-made), and the TLS 1.3-only handshake signature checks.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::DigitallySignedStruct;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::issuer::{IssuerError, LocalIssuer};

/// The crypto provider of every TLS config in tbot.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: std::sync::OnceLock<Arc<CryptoProvider>> = std::sync::OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .clone()
}

/// A chain (DER, leaf first) and its PKCS#8 key, ready to serve.
pub fn certified(chain: Vec<Vec<u8>>, pkcs8: Vec<u8>) -> Result<CertifiedKey, IssuerError> {
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pkcs8));
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| IssuerError::Crypto(e.to_string()))?;
    Ok(CertifiedKey::new(
        chain.into_iter().map(CertificateDer::from).collect(),
        signing,
    ))
}

/// Both ends of the issuer API speak TLS 1.3 only: a TLS 1.2 signature is never checked.
pub fn tls12_refused() -> Result<HandshakeSignatureValid, rustls::Error> {
    Err(rustls::Error::General("the issuer API speaks only TLS 1.3".into()))
}

/// Checks a TLS 1.3 handshake signature with `provider`'s algorithms (both ends use this).
pub fn tls13_signature(
    provider: &CryptoProvider,
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    rustls::crypto::verify_tls13_signature(message, cert, dss, &provider.signature_verification_algorithms)
}

/// How long a serving certificate lives; it is re-made at half that, or when the CA changes.
pub const SERVING_TTL: Duration = Duration::from_secs(24 * 3600);
/// The serving certificate, swapped whole.
#[derive(Debug)]
pub struct ServingCert {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ServingCert {
    /// Makes the first serving certificate.
    pub fn new(issuer: &LocalIssuer, names: &[String]) -> Result<Arc<ServingCert>, IssuerError> {
        Ok(Arc::new(ServingCert {
            current: RwLock::new(Arc::new(make(issuer, names)?)),
        }))
    }

    /// Makes a new one (the CA changed, or the old one is half way through its life).
    pub fn renew(&self, issuer: &LocalIssuer, names: &[String]) -> Result<(), IssuerError> {
        self.replace(make(issuer, names)?);
        Ok(())
    }

    /// A certificate made elsewhere (the bundle endpoint's).
    pub fn of(key: CertifiedKey) -> Arc<ServingCert> {
        Arc::new(ServingCert {
            current: RwLock::new(Arc::new(key)),
        })
    }

    /// Serves `key` from the next handshake on.
    pub fn replace(&self, key: CertifiedKey) {
        *self.current.write().expect("serving certificate poisoned") = Arc::new(key);
    }
}

fn make(issuer: &LocalIssuer, names: &[String]) -> Result<CertifiedKey, IssuerError> {
    let made = issuer.serving_certificate(names, SERVING_TTL)?;
    let mut chain = vec![made.certificate, made.ca];
    chain.extend(made.cross);
    certified(chain, made.key)
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().expect("serving certificate poisoned").clone())
    }
}
