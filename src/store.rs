//! The storage directory: atomic writes (temp file, fsync, rename, fsync the directory), private keys
//! `0600`, the lock file that keeps two daemons out of one directory, and the layout of persisted state.
//!
//! Layout of a storage directory (`storage.path` in the agent config):
//!
//! ```text
//! <path>/                          0700
//!   lock                           held (flock) by the running daemon; holds its pid
//!   issuer.<n>.wal                 the issuer's log: changes not yet in its files (`kv::wal`), 0600
//!   issuer/<trust domain>/
//!     ca.json                      the CAs: which is active, which are retiring and until when
//!     ca-<n>.der                   CA certificate n (DER)
//!     ca-<n>.key                   its private key, PKCS#8 DER, 0600
//!     jwt.key                      the JWT-SVID signing key (ES256), PKCS#8 DER, 0600
//!     tokens/<sha256>.json         one single-use token already consumed (SHA-256 of the name, when)
//!     bots/<bot>@<instance>.json   one bot instance: generation, join, locked or not
//!   agent/
//!     identity.der                 the bot's current certificate
//!     identity.key                 its private key, PKCS#8 DER, 0600
//! ```
//!
//! `storage.type: memory` keeps the same names in memory: nothing survives a restart, and no lock is
//! taken. The issuer's keys (`issuer/`) are not among them: its store engine (`kv::MemoryKv`)
//! holds them itself. The controller's records (`controller/`) are not kept there: they are for readers outside
//! the process, which a memory store has none of.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Whether a file holds a secret (written `0600`) or not (`0644`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Secrecy {
    Public,
    Secret,
}

/// What can go wrong with the storage directory.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another process holds the directory's lock: two daemons would overwrite each other's state.
    /// Stop the other daemon, or give this one its own `storage.path`.
    #[error("storage directory {} is in use by another tbot (pid {holder})", path.display())]
    Locked { path: PathBuf, holder: String },
    /// A read, write or rename failed: permissions, a full disk, a read-only file system.
    #[error("cannot {action} {}: {error}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        error: io::Error,
    },
    /// A file in the directory is not what tbot wrote there.
    #[error("{} is damaged: {reason}", path.display())]
    Corrupt { path: PathBuf, reason: String },
    /// The shared store (etcd) did not answer, or has no quorum.
    #[error("the store ({store}) is unavailable: {reason}")]
    Unavailable { store: String, reason: String },
    /// A watch asked for history the store has compacted away: list again, then watch.
    #[error("the store's history before revision {revision} was compacted")]
    Compacted { revision: i64 },
    /// The lease has expired or was revoked.
    #[error("lease {lease:x} has expired")]
    LeaseExpired { lease: i64 },
    /// A sealed private key does not open with this replica's key encryption key.
    #[error("cannot open the sealed key `{key}` in {store}: {reason}")]
    Sealed { key: String, store: String, reason: String },
    /// The store was closed: the issuer that used it has stopped.
    #[error("the store ({store}) is closed: the issuer that used it has stopped")]
    Closed { store: String },
    /// One of a directory store's writer threads stopped (a panic): its log keeps every answered
    /// change.
    #[error("the store ({store}) cannot write: its {thread} stopped")]
    Stopped { store: String, thread: &'static str },
    /// A panic (a bug in tbot) while the store was `during` something; on a directory store its
    /// log keeps every answered change.
    #[error("the store ({store}) failed while {during}: a panic (a bug in tbot)")]
    Panicked { store: String, during: &'static str },
    /// A directory store's log is this far behind (its disk is slow or hung): new transactions are
    /// refused, not queued without bound, until it catches up. Nothing was written.
    #[error("the store ({store}) is behind its disk: {transactions} transactions ({} KiB) wait to be written", bytes / 1024)]
    Behind {
        store: String,
        bytes: usize,
        transactions: usize,
    },
    /// A name that would not stay inside the store (empty, absolute, `.` or `..`), or a value too
    /// large for its log: tbot chose it, so a bug; refused before anything was written.
    #[error("the store ({store}) refuses `{name}`: {reason}")]
    Refused {
        store: String,
        name: String,
        reason: String,
    },
}

impl StoreError {
    /// The same error again (an I/O error's kind and words), for each of several calls it fails.
    pub fn duplicate(&self) -> StoreError {
        match self {
            StoreError::Locked { path, holder } => StoreError::Locked {
                path: path.clone(),
                holder: holder.clone(),
            },
            StoreError::Io { action, path, error } => StoreError::Io {
                action,
                path: path.clone(),
                error: io::Error::new(error.kind(), error.to_string()),
            },
            StoreError::Corrupt { path, reason } => StoreError::Corrupt {
                path: path.clone(),
                reason: reason.clone(),
            },
            StoreError::Unavailable { store, reason } => StoreError::Unavailable {
                store: store.clone(),
                reason: reason.clone(),
            },
            StoreError::Compacted { revision } => StoreError::Compacted { revision: *revision },
            StoreError::LeaseExpired { lease } => StoreError::LeaseExpired { lease: *lease },
            StoreError::Sealed { key, store, reason } => StoreError::Sealed {
                key: key.clone(),
                store: store.clone(),
                reason: reason.clone(),
            },
            StoreError::Closed { store } => StoreError::Closed { store: store.clone() },
            StoreError::Stopped { store, thread } => StoreError::Stopped {
                store: store.clone(),
                thread,
            },
            StoreError::Panicked { store, during } => StoreError::Panicked {
                store: store.clone(),
                during,
            },
            StoreError::Behind {
                store,
                bytes,
                transactions,
            } => StoreError::Behind {
                store: store.clone(),
                bytes: *bytes,
                transactions: *transactions,
            },
            StoreError::Refused { store, name, reason } => StoreError::Refused {
                store: store.clone(),
                name: name.clone(),
                reason: reason.clone(),
            },
        }
    }
}

impl crate::error::Explain for StoreError {
    /// What the operator can do about it.
    fn hint(&self) -> std::borrow::Cow<'_, str> {
        std::borrow::Cow::Borrowed(match self {
            StoreError::Locked { .. } => "stop the other tbot, or give this one its own `storage.path`",
            StoreError::Io { .. } => "check the directory's owner, permissions and free space",
            StoreError::Corrupt { .. } => {
                "restore the file from a backup, or move the storage directory aside to start afresh"
            }
            StoreError::Unavailable { .. } => {
                "tbot retries by itself; check that the store answers and has quorum (`etcdctl endpoint health`)"
            }
            StoreError::Compacted { .. } | StoreError::LeaseExpired { .. } => "tbot lists the store again by itself",
            StoreError::Behind { .. } => {
                "tbot retries by itself, and the store takes writes again once its log catches up; the disk under the \
                 storage directory is not keeping up: check it (`dmesg`, `iostat -x 1`)"
            }
            StoreError::Sealed { .. } => {
                "give this replica the same `key_encryption_key_file` as the replica that created the CA (the same \
                 32 bytes on every replica)"
            }
            StoreError::Stopped { .. } => {
                "restart tbot: the start writes the files from the log on disk, which keeps every answered change; \
                 the log above says why the thread stopped (please report it)"
            }
            StoreError::Panicked { .. } => {
                "restart tbot (a directory store's start writes the files from its log, which keeps every answered \
                 change); the log above has the panic: please report it"
            }
            StoreError::Refused { .. } => {
                "nothing was written; tbot chose this name or value itself, so this is a bug in tbot: please report \
                 this message"
            }
            StoreError::Closed { .. } => {
                "the issuer is stopping or was replaced; if this shows while tbot serves, restart it (the log on disk \
                 keeps every answered change)"
            }
        })
    }

    /// I/O may succeed on a retry (space freed, permissions fixed); a held lock or a damaged file will not.
    fn is_transient(&self) -> bool {
        matches!(
            self,
            StoreError::Io { .. }
                | StoreError::Unavailable { .. }
                | StoreError::Compacted { .. }
                | StoreError::Behind { .. }
        )
    }
}

/// Why `name` cannot name a file of a store, if it cannot: it must be a relative path of plain
/// parts (none empty, `.` or `..`), which stays inside the store's directory.
pub(crate) fn name_problem(name: &str) -> Option<&'static str> {
    if name.contains('\0') {
        Some("it holds a NUL byte")
    } else if name.split('/').any(|part| matches!(part, "" | "." | "..")) {
        Some("it is empty, absolute, or has an empty, `.` or `..` part: it would not stay inside the store")
    } else {
        None
    }
}

/// The entries of directory `path` that `keep` (by name and type), as `prefix` + name, sorted; none
/// when it does not exist.
fn entries_of(path: &Path, prefix: &str, keep: impl Fn(&str, fs::FileType) -> bool) -> Result<Vec<String>, StoreError> {
    let entries = match fs::read_dir(path) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_error("list", path)(e)),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_error("list", path))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.file_type().is_ok_and(|kind| keep(&name, kind)) {
            names.push(format!("{prefix}{name}"));
        }
    }
    names.sort();
    Ok(names)
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StoreError {
    let path = path.to_owned();
    move |error| StoreError::Io { action, path, error }
}

/// Who a file written by [`replace_file`] belongs to (`None`: whoever writes it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Owner {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

/// Replaces `path` atomically: a reader (or a crash) sees the old content or the new, never a mix or
/// an empty file. A temp file beside it is created exclusively (`O_EXCL`: a symlink planted at its
/// name is never followed) with `mode` (set again: `open` applies the umask) and `owner`, written,
/// fsynced, renamed over `path`, and the directory fsynced. On failure, says which step failed.
pub fn replace_file(path: &Path, bytes: &[u8], mode: u32, owner: Owner) -> Result<(), (&'static str, io::Error)> {
    place_file(path, bytes, mode, owner, true)
}

/// [`replace_file`], with its two fsyncs only when `durable`. Without them, a crash may leave the old
/// content, the new, or (on some file systems) an empty file: only for a writer that makes the
/// files durable together afterwards ([`Store::sync`]) and can write them again after a crash.
fn place_file(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    owner: Owner,
    durable: bool,
) -> Result<(), (&'static str, io::Error)> {
    let dir = path.parent().expect("a file inside a directory");
    let file_name = path.file_name().expect("a file name").to_string_lossy();
    let temp = dir.join(format!(".{file_name}.tmp.{}", std::process::id()));
    match fs::remove_file(&temp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(("clear the temp file of", e)),
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&temp)
        .map_err(|e| ("create the temp file of", e))?;
    let mut write = || -> io::Result<()> {
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        if owner != Owner::default() {
            std::os::unix::fs::fchown(&file, owner.uid, owner.gid)?;
        }
        file.write_all(bytes)?;
        if durable { file.sync_all() } else { Ok(()) }
    };
    if let Err(e) = write() {
        let _ = fs::remove_file(&temp);
        return Err(("write", e));
    }
    fs::rename(&temp, path).map_err(|e| ("rename into place", e))?;
    if !durable {
        return Ok(());
    }
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| ("sync the directory of", e))
}

enum Backend {
    Directory { root: PathBuf, _lock: File },
    Memory(Mutex<BTreeMap<String, Vec<u8>>>),
}

/// Persisted state, in a directory or in memory. Names are relative paths such as `issuer/x/ca.json`.
/// Clones share the same directory (and lock) or the same memory.
#[derive(Clone)]
pub struct Store {
    backend: std::sync::Arc<Backend>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl Store {
    /// A store that keeps everything in memory (`storage.type: memory`).
    pub fn memory() -> Store {
        Store {
            backend: std::sync::Arc::new(Backend::Memory(Mutex::new(BTreeMap::new()))),
        }
    }

    /// Opens (creating it `0700` if missing) and locks a storage directory.
    pub fn open(root: &Path) -> Result<Store, StoreError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root)
            .map_err(io_error("create", root))?;
        let lock_path = root.join("lock");
        let mut lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(io_error("open", &lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = lock.read_to_string(&mut holder);
                let holder = match holder.trim() {
                    "" => "unknown".to_owned(),
                    pid => pid.to_owned(),
                };
                return Err(StoreError::Locked {
                    path: root.to_owned(),
                    holder,
                });
            }
            Err(TryLockError::Error(error)) => return Err(io_error("lock", &lock_path)(error)),
        }
        lock.set_len(0).map_err(io_error("write", &lock_path))?;
        writeln!(lock, "{}", std::process::id())
            .and_then(|()| lock.sync_all())
            .map_err(io_error("write", &lock_path))?;
        Ok(Store {
            backend: std::sync::Arc::new(Backend::Directory {
                root: root.to_owned(),
                _lock: lock,
            }),
        })
    }

    /// Whether it keeps everything in memory (nothing outside the process can read it).
    pub fn is_memory(&self) -> bool {
        matches!(&*self.backend, Backend::Memory(_))
    }

    /// `directory /path` or `memory`, for messages.
    pub fn describe(&self) -> String {
        match &*self.backend {
            Backend::Directory { root, .. } => format!("directory {}", root.display()),
            Backend::Memory(_) => "memory".to_owned(),
        }
    }

    /// Refuses a name that would not stay inside the store ([`name_problem`]), on either backend,
    /// so that a test on memory refuses what a directory would.
    fn check(&self, name: &str) -> Result<(), StoreError> {
        match name_problem(name) {
            None => Ok(()),
            Some(reason) => Err(StoreError::Refused {
                store: self.describe(),
                name: name.escape_debug().to_string(),
                reason: reason.to_owned(),
            }),
        }
    }

    /// Where a name lives on disk (for messages), or `memory:NAME`.
    pub fn path_of(&self, name: &str) -> PathBuf {
        match &*self.backend {
            Backend::Directory { root, .. } => root.join(name),
            Backend::Memory(_) => PathBuf::from(format!("memory:{name}")),
        }
    }

    /// Reads a file; `None` when it does not exist.
    pub fn read(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.check(name)?;
        match &*self.backend {
            Backend::Memory(files) => Ok(files.lock().expect("store poisoned").get(name).cloned()),
            Backend::Directory { root, .. } => {
                let path = root.join(name);
                match fs::read(&path) {
                    Ok(bytes) => Ok(Some(bytes)),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(io_error("read", &path)(e)),
                }
            }
        }
    }

    /// Reads and decodes a JSON file; `None` when it does not exist.
    pub fn read_json<T: serde::de::DeserializeOwned>(&self, name: &str) -> Result<Option<T>, StoreError> {
        let Some(bytes) = self.read(name)? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| StoreError::Corrupt {
                path: self.path_of(name),
                reason: e.to_string(),
            })
    }

    /// The directory, for a store on disk.
    pub fn root(&self) -> Option<&Path> {
        match &*self.backend {
            Backend::Directory { root, .. } => Some(root),
            Backend::Memory(_) => None,
        }
    }

    /// Writes a file atomically: a reader (or a crash) sees the old content or the new, never a mix.
    pub fn write(&self, name: &str, bytes: &[u8], secrecy: Secrecy) -> Result<(), StoreError> {
        self.put(name, bytes, secrecy, true)
    }

    /// Writes a file as [`Store::write`] does, without waiting for the disk: readers see the old
    /// content or the new, but a crash before the next [`Store::sync`] may lose or empty it. For a
    /// writer that can write it again after a crash (the issuer store's log).
    pub fn write_unsynced(&self, name: &str, bytes: &[u8], secrecy: Secrecy) -> Result<(), StoreError> {
        self.put(name, bytes, secrecy, false)
    }

    /// Makes every write to the directory's file system so far durable (`syncfs(2)`): one flush for
    /// many [`Store::write_unsynced`] files. Nothing to do for a memory store.
    pub fn sync(&self) -> Result<(), StoreError> {
        let Backend::Directory { root, .. } = &*self.backend else {
            return Ok(());
        };
        File::open(root)
            .and_then(|dir| rustix::fs::syncfs(&dir).map_err(io::Error::from))
            .map_err(io_error("sync the file system of", root))
    }

    fn put(&self, name: &str, bytes: &[u8], secrecy: Secrecy, durable: bool) -> Result<(), StoreError> {
        self.check(name)?;
        let root = match &*self.backend {
            Backend::Memory(files) => {
                files
                    .lock()
                    .expect("store poisoned")
                    .insert(name.to_owned(), bytes.to_vec());
                return Ok(());
            }
            Backend::Directory { root, .. } => root,
        };
        let path = root.join(name);
        let dir = path.parent().expect("a name inside the root");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_error("create", dir))?;
        let mode = match secrecy {
            Secrecy::Secret => 0o600,
            Secrecy::Public => 0o644,
        };
        place_file(&path, bytes, mode, Owner::default(), durable).map_err(|(action, e)| io_error(action, &path)(e))
    }

    /// Removes a file; a missing one is fine.
    pub fn remove(&self, name: &str) -> Result<(), StoreError> {
        self.check(name)?;
        match &*self.backend {
            Backend::Memory(files) => {
                files.lock().expect("store poisoned").remove(name);
                Ok(())
            }
            Backend::Directory { root, .. } => match fs::remove_file(root.join(name)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_error("remove", &root.join(name))(e)),
                _ => Ok(()),
            },
        }
    }

    /// The names of the files directly inside `dir` (`issuer/x/bots`), sorted; none when it does
    /// not exist. Temporary files of writes in progress are not listed.
    pub fn list(&self, dir: &str) -> Result<Vec<String>, StoreError> {
        self.check(dir.trim_end_matches('/'))?;
        let prefix = format!("{}/", dir.trim_end_matches('/'));
        match &*self.backend {
            Backend::Memory(files) => Ok(files
                .lock()
                .expect("store poisoned")
                .range(prefix.clone()..)
                .take_while(|(name, _)| name.starts_with(&prefix))
                .filter(|(name, _)| !name[prefix.len()..].contains('/'))
                .map(|(name, _)| name.clone())
                .collect()),
            Backend::Directory { root, .. } => entries_of(&root.join(dir), &prefix, |name, kind| {
                !name.starts_with('.') && kind.is_file()
            }),
        }
    }

    /// The subdirectories directly inside `dir`, as names like `issuer/x/bots` (memory stores: the
    /// prefixes that have files below them).
    pub fn list_dirs(&self, dir: &str) -> Result<Vec<String>, StoreError> {
        self.check(dir.trim_end_matches('/'))?;
        let prefix = format!("{}/", dir.trim_end_matches('/'));
        match &*self.backend {
            Backend::Memory(files) => {
                let mut dirs: Vec<String> = files
                    .lock()
                    .expect("store poisoned")
                    .keys()
                    .filter_map(|name| name.strip_prefix(&prefix))
                    .filter_map(|rest| rest.split_once('/').map(|(sub, _)| format!("{prefix}{sub}")))
                    .collect();
                dirs.dedup();
                Ok(dirs)
            }
            Backend::Directory { root, .. } => entries_of(&root.join(dir), &prefix, |_, kind| kind.is_dir()),
        }
    }

    /// Encodes a value as JSON and writes it atomically.
    pub fn write_json<T: serde::Serialize>(&self, name: &str, value: &T, secrecy: Secrecy) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec_pretty(value).expect("state serializes");
        self.write(name, &bytes, secrecy)
    }
}

#[cfg(test)]
mod tests;
