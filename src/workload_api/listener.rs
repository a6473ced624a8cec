//! Binding the Workload API's sockets and attesting each connection once, at accept: a stale socket
//! file is replaced only when nothing answers on it; a live one is never stolen.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
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

/// A caller queued for the attestation threads ([`attestors`]).
struct Job {
    peer: Peer,
    settings: AttestSettings,
    /// Set by whoever runs the job: a pool thread, or the caller itself after
    /// [`ATTESTATION_QUEUED`].
    taken: Arc<AtomicBool>,
    answer: oneshot::Sender<Result<Attributes, AttestError>>,
}

/// A caller whose attestation no pool thread has taken within this long (each busy, most likely
/// stuck on a `/proc` read or an executable's open behind a hung process or file system) runs it on
/// tokio's blocking pool instead, so a few stuck callers cannot hold up every other's.
const ATTESTATION_QUEUED: std::time::Duration = std::time::Duration::from_secs(1);

/// How many attestation threads there are.
fn attestor_threads() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (2 * cores).clamp(2, 16)
}

/// Host attestations (reading `/proc`, opening the executable) run on a few threads of their own,
/// twice the cores (at least 2, at most 16), fed from one queue: during a burst of reconnecting
/// workloads each thread takes one caller after another without sleeping in between, where tokio's
/// blocking pool woke a thread for each caller, up to its 16, and on 2 cores those wake-ups and
/// switches cost more than the attestations. Measured on the first message during a burst of 1,000
/// connections, seven runs each: p99 53-70 ms (median 63 ms) here, 67-90 ms (median 76 ms) on the
/// blocking pool.
fn attestors() -> &'static std::sync::mpsc::Sender<Job> {
    static QUEUE: OnceLock<std::sync::mpsc::Sender<Job>> = OnceLock::new();
    QUEUE.get_or_init(|| {
        let (queue, jobs) = std::sync::mpsc::channel::<Job>();
        let jobs = Arc::new(Mutex::new(jobs));
        for i in 0..attestor_threads() {
            let jobs = jobs.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("tbot-attest-{i}"))
                .spawn(move || {
                    loop {
                        let job = match jobs.lock().map(|jobs| jobs.recv()) {
                            Ok(Ok(job)) => job,
                            _ => return,
                        };
                        // Its caller went away, or ran it itself.
                        if job.answer.is_closed() || job.taken.swap(true, Ordering::AcqRel) {
                            continue;
                        }
                        let _ = job.answer.send(attest_now(job.peer, &job.settings));
                    }
                });
            if let Err(e) = spawned {
                tracing::warn!(
                    error = %e,
                    "could not start an attestation thread: with none running, each caller waits a second and is then attested on tokio's blocking pool; check the process's thread limit (`ulimit -u`, systemd's TasksMax)"
                );
            }
        }
        queue
    })
}

/// Attests `peer` on the host here and now (blocking).
fn attest_now(peer: Peer, settings: &AttestSettings) -> Result<Attributes, AttestError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| attest::attest(peer, settings)))
        .unwrap_or_else(|_| Err(panicked(peer)))
}

/// An attestation of `peer` that panicked (a bug in tbot), or whose answer was lost with it.
fn panicked(peer: Peer) -> AttestError {
    AttestError::Proc {
        pid: peer.pid,
        reason: "attestation panicked".into(),
    }
}

/// Attests `peer` on the host (its process, its executable, its systemd unit) on the attestation
/// threads, or on tokio's blocking pool when none takes it in time.
async fn attest_host(peer: Peer, settings: &AttestSettings) -> Result<Attributes, AttestError> {
    let taken = Arc::new(AtomicBool::new(false));
    let (answer, mut answered) = oneshot::channel();
    let job = Job {
        peer,
        settings: settings.clone(),
        taken: taken.clone(),
        answer,
    };
    let lost = || Err(panicked(peer));
    if attestors().send(job).is_ok() {
        match tokio::time::timeout(ATTESTATION_QUEUED, &mut answered).await {
            Ok(done) => return done.unwrap_or_else(|_| lost()),
            // A pool thread has it: its answer comes.
            Err(_) if taken.swap(true, Ordering::AcqRel) => return answered.await.unwrap_or_else(|_| lost()),
            Err(_) => {}
        }
    }
    let settings = settings.clone();
    tokio::task::spawn_blocking(move || attest_now(peer, &settings))
        .await
        .unwrap_or_else(|_| lost())
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
                        let host = attest_host(peer, &settings).await;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every attestation thread stuck on a `/proc` read that does not return (here a FIFO with no
    /// writer stands in for `stat`): another caller is still attested, on tokio's blocking pool,
    /// once [`ATTESTATION_QUEUED`] has passed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn callers_are_attested_while_every_attestation_thread_is_stuck() {
        let dir = tempfile::tempdir().unwrap();
        let stuck_pid = 4242;
        std::fs::create_dir(dir.path().join(stuck_pid.to_string())).unwrap();
        let fifo = dir.path().join(stuck_pid.to_string()).join("stat");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
        assert!(made.success(), "mkfifo");
        let me = Peer {
            pid: std::process::id() as i32,
            uid: rustix::process::getuid().as_raw(),
            gid: rustix::process::getgid().as_raw(),
        };
        // One job per thread, queued ahead of the caller's: each thread takes one and is stuck.
        let stuck: Vec<_> = (0..attestor_threads())
            .map(|_| {
                let (answer, answered) = oneshot::channel();
                let job = Job {
                    peer: Peer { pid: stuck_pid, ..me },
                    settings: AttestSettings {
                        proc_root: dir.path().to_owned(),
                        ..Default::default()
                    },
                    taken: Arc::new(AtomicBool::new(false)),
                    answer,
                };
                attestors().send(job).unwrap();
                answered
            })
            .collect();

        let started = std::time::Instant::now();
        let attested = tokio::time::timeout(
            std::time::Duration::from_secs(20),
            attest_host(me, &AttestSettings::default()),
        )
        .await
        .expect("attested within 20 s")
        .expect("attested");
        let pid = attested.iter().find(|(name, _)| *name == "workload.unix.pid");
        assert_eq!(
            pid,
            Some(("workload.unix.pid", &[me.pid.to_string()][..])),
            "{attested:?}"
        );
        assert!(
            started.elapsed() >= ATTESTATION_QUEUED,
            "every attestation thread was busy, so only the fallback could answer"
        );

        // Later opens find an empty file; the threads waiting in the FIFO's open are let go by a
        // writer's open (which fails at once while no reader waits), and read nothing.
        let moved = dir.path().join("fifo");
        std::fs::rename(&fifo, &moved).unwrap();
        std::fs::write(&fifo, "").unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        for mut answered in stuck {
            loop {
                use rustix::fs::{Mode, OFlags};
                drop(rustix::fs::open(
                    &moved,
                    OFlags::WRONLY | OFlags::NONBLOCK,
                    Mode::empty(),
                ));
                match answered.try_recv() {
                    Ok(answer) => {
                        assert!(answer.is_err(), "an empty stat is no process");
                        break;
                    }
                    Err(oneshot::error::TryRecvError::Empty) => {
                        assert!(std::time::Instant::now() < deadline, "the stuck threads were let go");
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    }
                    Err(e) => panic!("{e}"),
                }
            }
        }
    }
}
