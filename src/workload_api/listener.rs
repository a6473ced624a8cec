//! Binding the Workload API's sockets and attesting each connection once, at accept: a stale socket
//! file is replaced only when nothing answers on it; a live one is never stolen.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use crate::agent::attest::{self, AttestError, AttestSettings, Peer};
use crate::issuer::Attributes;

/// What is known about the other end of a connection.
#[derive(Debug)]
pub struct Caller {
    /// `None` over TCP, where there are no peer credentials.
    pub peer: Option<Peer>,
    /// Shared by every request of the connection.
    pub attested: Result<Arc<Attested>, AttestError>,
}

/// What attestation found about a caller: its attributes, and the attestors that could not be
/// asked (why each set nothing), which a denial names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attested {
    pub attributes: Attributes,
    pub unasked: Vec<String>,
}

/// The connection info tonic hands to every request of a connection.
#[derive(Debug, Clone)]
pub struct CallerInfo(pub Arc<Caller>);

enum Io {
    Unix(UnixStream),
    Tcp(TcpStream),
}

/// An accepted, attested connection.
pub struct Conn {
    io: Io,
    info: CallerInfo,
}

impl Connected for Conn {
    type ConnectInfo = CallerInfo;

    fn connect_info(&self) -> CallerInfo {
        self.info.clone()
    }
}

macro_rules! delegate {
    ($self:ident, $io:ident => $call:expr) => {
        match &mut $self.get_mut().io {
            Io::Unix($io) => {
                let $io = Pin::new($io);
                $call
            }
            Io::Tcp($io) => {
                let $io = Pin::new($io);
                $call
            }
        }
    };
}

impl AsyncRead for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        delegate!(self, io => io.poll_read(cx, buf))
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        delegate!(self, io => io.poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, io => io.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, io => io.poll_shutdown(cx))
    }
}

/// Why a socket could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// Another process answers on the socket: another tbot (or SPIRE agent) is serving there.
    #[error("{} is in use: something answers on it (another tbot?)", path.display())]
    InUse { path: PathBuf },
    /// The path exists and is not a socket: tbot will not delete it.
    #[error("{} exists and is not a socket", path.display())]
    NotASocket { path: PathBuf },
    #[error("cannot {action} {}: {error}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        error: io::Error,
    },
}

impl crate::error::Explain for ListenError {
    fn hint(&self) -> std::borrow::Cow<'_, str> {
        match self {
            ListenError::InUse { .. } => "stop the other daemon, or give this service another `listen` path",
            ListenError::NotASocket { .. } => "move the file away, or choose another `listen` path",
            ListenError::Io { .. } => "check the directory's owner and permissions",
        }
        .into()
    }
}

/// Binds a unix socket at `path`: creates the parent directory, replaces a stale socket file that
/// nothing answers on, and makes the socket `0777` (attestation decides who gets what).
pub fn bind_unix(path: &Path) -> Result<UnixListener, ListenError> {
    let io = |action, error| ListenError::Io {
        action,
        path: path.to_owned(),
        error,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| io("create the directory of", e))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(ListenError::InUse { path: path.to_owned() });
            }
            std::fs::remove_file(path).map_err(|e| io("remove the stale socket", e))?;
        }
        Ok(_) => return Err(ListenError::NotASocket { path: path.to_owned() }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("inspect", e)),
    }
    let listener = UnixListener::bind(path).map_err(|e| io("bind", e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777)).map_err(|e| io("chmod", e))?;
    Ok(listener)
}

enum Accepted<T> {
    Conn(T),
    /// Accepting failed (out of descriptors, say): try again; serving goes on once it passes.
    Failed,
    /// The server stopped: let go of the socket.
    Stopped,
}

/// The next connection of an accept loop feeding `tx`.
async fn accept_or_stop<T>(
    accept: impl std::future::Future<Output = io::Result<T>>,
    tx: &mpsc::Sender<io::Result<Conn>>,
) -> Accepted<T> {
    tokio::select! {
        accepted = accept => match accepted {
            Ok(conn) => Accepted::Conn(conn),
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                Accepted::Failed
            }
        },
        _ = tx.closed() => Accepted::Stopped,
    }
}

/// Accepts unix connections and attests each one (off the accept loop) before tonic sees it.
/// `settings` may change while serving: each new connection is attested with the current ones.
pub fn incoming_unix(
    listener: UnixListener,
    settings: tokio::sync::watch::Receiver<AttestSettings>,
    connections: crate::telemetry::CounterMetric,
) -> ReceiverStream<io::Result<Conn>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let stream = match accept_or_stop(listener.accept(), &tx).await {
                Accepted::Stopped => return,
                Accepted::Failed => continue,
                Accepted::Conn((stream, _)) => stream,
            };
            connections.inc();
            let tx = tx.clone();
            let settings = settings.borrow().clone();
            tokio::spawn(async move {
                let peer = stream.peer_cred().ok().and_then(|c| {
                    Some(Peer {
                        pid: c.pid()?,
                        uid: c.uid(),
                        gid: c.gid(),
                    })
                });
                let attested = match peer {
                    Some(peer) => {
                        let blocking = settings.clone();
                        let host = tokio::task::spawn_blocking(move || attest::attest(peer, &blocking))
                            .await
                            .unwrap_or(Err(AttestError::Proc {
                                pid: peer.pid,
                                reason: "attestation panicked".into(),
                            }));
                        match host {
                            Ok(mut attributes) => attest::attest_containers(peer, &settings).await.map(|found| {
                                attributes.extend(&found.attributes);
                                Attested {
                                    attributes,
                                    unasked: found.unasked,
                                }
                            }),
                            Err(e) => Err(e),
                        }
                    }
                    None => Err(AttestError::Proc {
                        pid: 0,
                        reason: "the socket gave no peer credentials".into(),
                    }),
                };
                let info = CallerInfo(Arc::new(Caller {
                    peer,
                    attested: attested.map(Arc::new),
                }));
                let _ = tx
                    .send(Ok(Conn {
                        io: Io::Unix(stream),
                        info,
                    }))
                    .await;
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Accepts TCP connections; they carry no attestation.
pub fn incoming_tcp(listener: TcpListener) -> ReceiverStream<io::Result<Conn>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let stream = match accept_or_stop(listener.accept(), &tx).await {
                Accepted::Stopped => return,
                Accepted::Failed => continue,
                Accepted::Conn((stream, _)) => stream,
            };
            let info = CallerInfo(Arc::new(Caller {
                peer: None,
                attested: Ok(Arc::new(Attested::default())),
            }));
            if tx
                .send(Ok(Conn {
                    io: Io::Tcp(stream),
                    info,
                }))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}

/// The caller's attested attributes.
pub(super) fn attested<T>(request: &tonic::Request<T>) -> Result<Arc<Attested>, tonic::Status> {
    let info = request
        .extensions()
        .get::<CallerInfo>()
        .ok_or_else(|| tonic::Status::internal("the connection carries no caller information"))?;
    match &info.0.attested {
        Ok(attrs) => Ok(attrs.clone()),
        Err(e @ AttestError::PidReused { .. }) => Err(tonic::Status::unavailable(e.to_string())),
        Err(e) => Err(tonic::Status::unavailable(format!("attestation failed: {e}"))),
    }
}
