//! The issuer API's TLS: TLS 1.3 only (rustls, aws-lc-rs), ALPN `h2`, a serving certificate signed
//! by the trust domain's CA (re-made when the CA changes and before it expires), and client
//! certificates that are asked for but optional (a join has none yet). The handshake proves the
//! client holds the certificate's key; whether the certificate is a valid bot certificate is the
//! issuer's decision, per call.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use crate::issuer::IssuerError;
pub use crate::issuer::tls::{SERVING_TTL, ServingCert, certified, provider, tls12_refused, tls13_signature};

/// How long a TLS handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Asks for a client certificate, accepts any (or none), and checks the handshake signature: the
/// issuer decides per call whether the certificate is a bot certificate it accepts.
#[derive(Debug)]
struct AnyClientCert(Arc<CryptoProvider>);

impl ClientCertVerifier for AnyClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls12_refused()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls13_signature(&self.0, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The server's TLS config: TLS 1.3, ALPN h2, optional client certificates.
pub fn server_config(cert: Arc<ServingCert>) -> Result<rustls::ServerConfig, IssuerError> {
    let provider = provider();
    let mut config = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| IssuerError::Crypto(e.to_string()))?
        .with_client_cert_verifier(Arc::new(AnyClientCert(provider)))
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"h2".to_vec()];
    // No session tickets: an agent keeps its connection for hours, a cache of a few hundred
    // sessions would not hold a fleet's, and a resumed session would carry the client certificate
    // of the session it resumes. Each connection authenticates in full.
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// Who is on the other end of a connection.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub address: SocketAddr,
    /// The client certificate (DER), when one was presented in the handshake.
    presented: Option<Arc<[u8]>>,
    /// A connection that presented none takes the bot certificate of its first join as if it had
    /// (see [`PeerInfo::bind`]); shared by every call on the connection.
    joined: Arc<OnceLock<Arc<[u8]>>>,
}

impl PeerInfo {
    pub fn new(address: SocketAddr, presented: Option<Arc<[u8]>>) -> PeerInfo {
        PeerInfo {
            address,
            presented,
            joined: Arc::default(),
        }
    }

    /// The bot certificate this connection authenticates as: the TLS client certificate, or the
    /// one its join was answered with.
    pub fn certificate(&self) -> Option<Arc<[u8]>> {
        self.presented.clone().or_else(|| self.joined.get().cloned())
    }

    /// After a join that made a new bot instance was answered on this connection with
    /// `certificate`: a connection that has no certificate yet takes it, so the new agent's calls
    /// and `Watch` need no second TLS handshake. The joiner proved itself with the token (or signed
    /// request) on this very TLS session and the instance is its own: the connection can do nothing
    /// it could not do by joining with a key of its own. A join does not prove that the joiner
    /// holds the key, so a join that hands out an existing instance (a `token` join's retry) must
    /// not call this. Returns whether the connection took it (the answer says so, and the agent
    /// keeps the connection only then); a connection keeps the first certificate it had, for good.
    pub fn bind(&self, certificate: &[u8]) -> bool {
        self.presented.is_none() && self.joined.set(Arc::from(certificate)).is_ok()
    }
}

/// An accepted TLS connection.
pub struct TlsConn {
    io: TlsStream<TcpStream>,
    info: PeerInfo,
}

impl Connected for TlsConn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Accepts TCP connections and completes their TLS handshakes off the accept loop (a slow client
/// cannot hold up the others); handshakes that fail are logged at debug level and dropped.
pub fn incoming(
    listener: TcpListener,
    config: rustls::ServerConfig,
    proxy_protocol: bool,
) -> ReceiverStream<io::Result<TlsConn>> {
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let (tx, rx) = mpsc::channel(128);
    // A misconfigured balancer refuses every connection: one line per source every 10 s says so.
    let refusals = Arc::new(super::limits::RefusalLog::default());
    tokio::spawn(async move {
        loop {
            let (mut tcp, peer) = match listener.accept().await {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(error = %e, "issuer API: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            if tx.is_closed() {
                break;
            }
            let (acceptor, tx, refusals) = (acceptor.clone(), tx.clone(), refusals.clone());
            tokio::spawn(async move {
                // What went wrong, and whether the operator must hear of it (a missing PROXY header
                // is a misconfigured balancer; a failed TLS handshake is a client's business).
                let handshake = async {
                    // Behind a balancer that speaks the PROXY protocol, the agent's address comes first.
                    let address = if proxy_protocol {
                        match super::proxy::read_header(&mut tcp).await {
                            Ok(from) => from.unwrap_or(peer),
                            Err(e) => {
                                return Err((
                                    true,
                                    format!(
                                        "{e} (`issuer.spec.proxy_protocol` is on: does the balancer send it? haproxy: `send-proxy-v2`)"
                                    ),
                                ));
                            }
                        }
                    } else {
                        peer
                    };
                    let io = acceptor
                        .accept(tcp)
                        .await
                        .map_err(|e| (false, format!("TLS handshake failed: {e}")))?;
                    Ok((io, address))
                };
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
                    Ok(Ok((io, address))) => {
                        let certificate = io
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|c| c.first())
                            .map(|c| Arc::from(c.as_ref()));
                        let _ = tx
                            .send(Ok(TlsConn {
                                io,
                                info: PeerInfo::new(address, certificate),
                            }))
                            .await;
                    }
                    Ok(Err((true, e))) => refusals.connection(peer, &e),
                    Ok(Err((false, e))) => tracing::debug!(%peer, error = %e, "issuer API: connection dropped"),
                    Err(_) => tracing::debug!(%peer, "issuer API: handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}
