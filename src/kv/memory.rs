//! The `memory` and `directory` backends: one engine in this process, with etcd's semantics
//! (global revision, conditional transactions, watches replayed from history, leases). `directory`
//! keeps every key without a lease in a file of the same name under the storage directory, and
//! loads them at open; revisions start again at each open, which is fine for the one process the
//! directory's lock admits.
//!
//! A `directory` transaction counts as done once its record is in the store's log on disk
//! ([`super::wal`]). It is decided at once, against the keys with the writes of the transactions
//! still waiting for the disk on top (so that of two joins with one token, one wins), and waits in
//! line: one writer thread appends the records of every waiting transaction with one `fdatasync`,
//! then applies them, in order, and answers them. Readers and watches see a write only once it is
//! on disk. When the writer is idle (at most once a second), or the log passes 4 MiB, it starts a
//! new log, and another thread writes the changed files from memory, many at a time with one
//! `syncfs`, then removes the older logs.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

mod journal;
mod keys;

use journal::{Journal, Waiting, start_writers};
use keys::Keys;

use super::wal::{self, Log};
use super::{Condition, Entry, Event, Kv, Op, WatchItem};
use crate::store::{Store, StoreError};

/// History kept for watches that start in the past; older revisions are compacted away.
const HISTORY: usize = 20_000;
/// ... and at most this many bytes of keys and values. A value the store no longer holds lives on
/// in the history until it is cut: without this bound, 20,000 events of the issuance log's keys
/// (up to 512 KiB each) or of `ca.json` saves could hold gigabytes. A watch that resumes before
/// the cut is told `Compacted` and lists again, as on etcd.
const HISTORY_BYTES: usize = 64 << 20;

struct Lease {
    ttl: Duration,
    deadline: Instant,
}

struct Watcher {
    prefix: String,
    tx: mpsc::Sender<WatchItem>,
}

/// An event of the history. A put shares its entry with `keys` while that is the key's value, so
/// a key that has not changed since is held once, not twice.
enum Past {
    Put(Arc<Entry>),
    Delete { key: String, mod_revision: i64 },
}

impl Past {
    fn key(&self) -> &str {
        match self {
            Past::Put(entry) => &entry.key,
            Past::Delete { key, .. } => key,
        }
    }

    fn revision(&self) -> i64 {
        match self {
            Past::Put(entry) => entry.mod_revision,
            Past::Delete { mod_revision, .. } => *mod_revision,
        }
    }

    /// What the event holds: its key, and a put's value.
    fn bytes(&self) -> usize {
        match self {
            Past::Put(entry) => entry.key.len() + entry.value.len(),
            Past::Delete { key, .. } => key.len(),
        }
    }

    fn event(&self) -> Event {
        match self {
            Past::Put(entry) => Event::Put(Entry::clone(entry)),
            Past::Delete { key, mod_revision } => Event::Delete {
                key: key.clone(),
                mod_revision: *mod_revision,
            },
        }
    }
}

#[derive(Default)]
struct Inner {
    revision: i64,
    /// Watches may start at this revision or later; the history before it is gone.
    compacted: i64,
    keys: Keys,
    /// Every event after `compacted`, oldest first.
    history: Vec<Past>,
    /// What `history` holds ([`Past::bytes`]).
    history_bytes: usize,
    watchers: Vec<Watcher>,
    leases: HashMap<i64, Lease>,
    next_lease: i64,
    /// A store with a log (`directory`): the transactions waiting for the disk.
    journal: Option<Journal>,
}

/// How long [`Kv::close`] waits for the writer thread to finish.
const CLOSE_WAIT: Duration = Duration::from_secs(10);

/// Whether `thread` ended within `wait` (it is left to end on its own if not).
fn joined_within(thread: JoinHandle<()>, wait: Duration) -> bool {
    let (done_tx, done) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = thread.join();
        let _ = done_tx.send(());
    });
    done.recv_timeout(wait).is_ok()
}

/// The in-process store; with a [`Store`] directory behind it, the `directory` backend.
pub struct MemoryKv {
    inner: Arc<Mutex<Inner>>,
    /// Keys are files under the storage directory (`directory` backend).
    disk: Option<Disk>,
    /// Wakes the writer thread (with `inner`'s lock).
    wake: Arc<Condvar>,
    /// The thread that writes the log and the files (`directory` on disk).
    writer: Mutex<Option<JoinHandle<()>>>,
}

/// The storage behind a `directory` store.
struct Disk {
    /// Until [`Kv::close`]: then the directory (and its lock) is let go of.
    store: Mutex<Option<Store>>,
    scope: String,
    /// The store as [`Store::describe`] and [`Store::path_of`] say it, also once closed.
    describe: String,
    root: Option<std::path::PathBuf>,
}

impl MemoryKv {
    /// An empty store in memory.
    pub fn new() -> MemoryKv {
        let kv = MemoryKv {
            inner: Arc::new(Mutex::new(Inner {
                next_lease: 1,
                ..Inner::default()
            })),
            disk: None,
            wake: Arc::new(Condvar::new()),
            writer: Mutex::new(None),
        };
        kv.spawn_reaper();
        kv
    }

    /// The `directory` backend: the keys under `scope` (such as `issuer/`) are the files of that
    /// name in `store`'s directory. Loads them now, with the log replayed over them (see the module
    /// docs); keeps them from now on. A memory [`Store`] is only read here: its keys then live in
    /// this store alone (copying every write into it held each value twice, the issuance log's
    /// among them, for no reader).
    pub fn directory(store: Store, scope: &str) -> Result<MemoryKv, StoreError> {
        let mut kv = MemoryKv::new();
        let mut names = Vec::new();
        let mut dirs = vec![scope.trim_end_matches('/').to_owned()];
        while let Some(dir) = dirs.pop() {
            names.extend(store.list(&dir)?);
            dirs.extend(store.list_dirs(&dir)?);
        }
        let mut files = BTreeMap::new();
        for name in names {
            if let Some(value) = store.read(&name)? {
                files.insert(name, value);
            }
        }
        let log = match store.root() {
            Some(_) => Some(Log::open(&store, scope, &mut files)?),
            None => None,
        };
        {
            let mut inner = kv.lock()?;
            for (name, value) in files {
                inner.revision += 1;
                let revision = inner.revision;
                inner.keys.insert(Arc::new(Entry {
                    key: name,
                    value,
                    create_revision: revision,
                    mod_revision: revision,
                    lease: 0,
                }));
            }
            // Nothing before this open can be replayed.
            inner.compacted = inner.revision + 1;
            inner.journal = log.is_some().then(Journal::default);
        }
        if let Some(log) = log {
            let path = log.path();
            let thread = start_writers(&kv.inner, &kv.wake, store.clone(), scope.to_owned(), log).map_err(|error| {
                StoreError::Io {
                    action: "start the writers of",
                    path,
                    error,
                }
            })?;
            kv.writer = Mutex::new(Some(thread));
        }
        kv.disk = Some(Disk {
            describe: store.describe(),
            root: store.root().map(ToOwned::to_owned),
            store: Mutex::new(Some(store)),
            scope: scope.to_owned(),
        });
        Ok(kv)
    }

    /// The keys, or `Panicked` once a panic while changing them left them in doubt (a directory
    /// store's log keeps every answered change, for the restart).
    fn lock(&self) -> Result<MutexGuard<'_, Inner>, StoreError> {
        self.inner.lock().map_err(|_| StoreError::Panicked {
            store: self.describe(),
            during: "changing its keys in memory",
        })
    }

    fn refused(&self, refusal: wal::Refusal) -> StoreError {
        StoreError::Refused {
            store: self.describe(),
            name: refusal.key,
            reason: refusal.reason,
        }
    }

    /// Expires leases in the background, so their keys go (and watches see it) without a write.
    fn spawn_reaper(&self) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let weak: Weak<Mutex<Inner>> = Arc::downgrade(&self.inner);
        runtime.spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let Some(inner) = weak.upgrade() else { return };
                let Ok(mut inner) = inner.lock() else { return };
                inner.expire();
            }
        });
    }

    fn closed(&self) -> StoreError {
        StoreError::Closed { store: self.describe() }
    }

    /// A store over a [`Store`] (a memory one here: a directory's log refuses on its own) takes no
    /// write once closed, as [`Kv::close`] says.
    fn refuse_once_closed(&self) -> Result<(), StoreError> {
        match &self.disk {
            Some(disk) if disk.store.lock().map_or(true, |s| s.is_none()) => Err(self.closed()),
            _ => Ok(()),
        }
    }
}

impl Default for MemoryKv {
    fn default() -> Self {
        MemoryKv::new()
    }
}

impl Drop for MemoryKv {
    fn drop(&mut self) {
        self.close();
    }
}

impl Inner {
    /// Whether a condition holds after the transactions waiting for the disk.
    fn holds(&self, condition: &Condition) -> bool {
        let waiting = |key: &str| self.journal.as_ref().and_then(|j| j.overlay.get(key).copied());
        match condition {
            Condition::Absent(key) => !waiting(key).unwrap_or_else(|| self.keys.contains_key(key)),
            Condition::Present(key) => waiting(key).unwrap_or_else(|| self.keys.contains_key(key)),
            Condition::ModRevision(key, revision) => match waiting(key) {
                // A waiting write has no revision anyone was told of: the key has changed since.
                Some(present) => !present && *revision == 0,
                None => self.keys.get(key).map_or(0, |e| e.mod_revision) == *revision,
            },
        }
    }

    /// Applies ops as one revision and tells the watchers.
    fn apply(&mut self, ops: Vec<Op>) {
        let revision = self.revision + 1;
        let first = self.history.len();
        for op in ops {
            match op {
                Op::Put { key, value, lease } => {
                    let create_revision = self.keys.get(&key).map_or(revision, |e| e.create_revision);
                    let entry = Arc::new(Entry {
                        key,
                        value,
                        create_revision,
                        mod_revision: revision,
                        lease,
                    });
                    self.keys.insert(entry.clone());
                    let past = Past::Put(entry);
                    self.history_bytes += past.bytes();
                    self.history.push(past);
                }
                Op::Delete(key) => {
                    if self.keys.remove(&key).is_some() {
                        let past = Past::Delete {
                            key,
                            mod_revision: revision,
                        };
                        self.history_bytes += past.bytes();
                        self.history.push(past);
                    }
                }
            }
        }
        if self.history.len() == first {
            return;
        }
        self.revision = revision;
        // Each watcher gets the events under its prefix; a value is copied only for a watcher that
        // wants it (the issuance log's keys, up to 512 KiB each, are watched by none).
        let fresh = &self.history[first..];
        self.watchers.retain(|w| {
            let mine: Vec<Event> = fresh
                .iter()
                .filter(|p| p.key().starts_with(&w.prefix))
                .map(Past::event)
                .collect();
            if mine.is_empty() {
                return !w.tx.is_closed();
            }
            // A watcher that cannot keep up is dropped: its channel closes, and it lists again.
            w.tx.try_send(Ok(mine)).is_ok()
        });
        if self.history.len() > HISTORY || self.history_bytes > HISTORY_BYTES {
            // Keep the newest half of each bound, cut at a revision boundary: a revision's events
            // are kept whole or not at all.
            let mut cut = self.history.len().saturating_sub(HISTORY / 2);
            let mut kept = self.history_bytes - self.history[..cut].iter().map(Past::bytes).sum::<usize>();
            while cut < self.history.len()
                && (kept > HISTORY_BYTES / 2 || self.history[cut].revision() == self.history[cut - 1].revision())
            {
                kept -= self.history[cut].bytes();
                cut += 1;
            }
            self.compacted = self.history.get(cut).map_or(self.revision + 1, Past::revision);
            self.history.drain(..cut);
            self.history_bytes = kept;
        }
    }

    /// Drops expired leases and their keys.
    fn expire(&mut self) {
        let now = Instant::now();
        let expired: Vec<i64> = self
            .leases
            .iter()
            .filter(|(_, l)| l.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            self.end_lease(id);
        }
    }

    fn end_lease(&mut self, id: i64) {
        self.leases.remove(&id);
        let keys: Vec<Op> = self
            .keys
            .values()
            .filter(|e| e.lease == id)
            .map(|e| Op::Delete(e.key.clone()))
            .collect();
        self.apply(keys);
    }
}

#[async_trait::async_trait]
impl Kv for MemoryKv {
    fn describe(&self) -> String {
        match &self.disk {
            Some(disk) => disk.describe.clone(),
            None => "memory".into(),
        }
    }

    fn locate(&self, key: &str) -> String {
        match self.disk.as_ref().and_then(|disk| disk.root.as_ref()) {
            Some(root) => root.join(key).display().to_string(),
            None => format!("memory:{key}"),
        }
    }

    /// Lets the writer finish (what waits is written, and the files are brought up to date), then
    /// lets go of the directory: its lock goes with the last holder, not with the last task that
    /// still holds this store. Writes after it fail; reads go on from memory. On a disk that hangs,
    /// it waits [`CLOSE_WAIT`] for the writer, then goes on without it, so the daemon still stops.
    fn close(&self) {
        let writer = self.writer.lock().map(|mut w| w.take()).unwrap_or(None);
        if let Some(writer) = writer {
            if let Ok(mut inner) = self.inner.lock()
                && let Some(journal) = inner.journal.as_mut()
            {
                journal.closing = true;
            }
            self.wake.notify_all();
            if !joined_within(writer, CLOSE_WAIT) {
                tracing::error!(
                    store = %self.describe(),
                    seconds = CLOSE_WAIT.as_secs(),
                    "the store's log writer did not finish in time (is the disk hung?); closing without it. \
                     No write it had not confirmed was acknowledged, and what it confirmed is in the log, \
                     which the next start replays: check the disk (`dmesg`) before starting again"
                );
            }
        }
        if let Some(disk) = &self.disk
            && let Ok(mut store) = disk.store.lock()
        {
            store.take();
        }
    }

    async fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        let mut inner = self.lock()?;
        inner.expire();
        Ok(inner.keys.get(key).map(|e| Entry::clone(e)))
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<Entry>, i64), StoreError> {
        let mut inner = self.lock()?;
        inner.expire();
        let entries = inner.keys.under(prefix).map(|e| Entry::clone(e)).collect();
        Ok((entries, inner.revision))
    }

    async fn txn(&self, conditions: Vec<Condition>, ops: Vec<Op>) -> Result<(bool, i64), StoreError> {
        if let Some(Disk { scope, .. }) = &self.disk {
            wal::check(&ops, scope).map_err(|r| self.refused(r))?;
        }
        let done = {
            let mut inner = self.lock()?;
            if let Some(journal) = inner.journal.as_ref() {
                if journal.closing {
                    return Err(self.closed());
                }
                if journal.stopped {
                    return Err(StoreError::Stopped {
                        store: self.describe(),
                        thread: "log writer",
                    });
                }
            }
            inner.expire();
            let held = conditions.iter().all(|c| inner.holds(c));
            if held {
                for op in &ops {
                    if let Op::Put { lease, .. } = op
                        && *lease != 0
                        && !inner.leases.contains_key(lease)
                    {
                        return Err(StoreError::LeaseExpired { lease: *lease });
                    }
                }
            }
            match (inner.journal.as_mut(), &self.disk) {
                // Waits for the log: it writes a file, or comes after one that does.
                (Some(journal), Some(Disk { scope, .. }))
                    if !journal.waiting.is_empty() || (held && ops.iter().any(|op| wal::on_disk(op, scope))) =>
                {
                    journal.admit(|| self.describe())?;
                    let (done, answer) = oneshot::channel();
                    if held {
                        wal::encode(&ops, scope, &mut journal.records).map_err(|r| self.refused(r))?;
                        for op in &ops {
                            match op {
                                Op::Put { key, .. } => journal.overlay.insert(key.clone(), true),
                                Op::Delete(key) => journal.overlay.insert(key.clone(), false),
                            };
                        }
                    }
                    journal.waiting.push_back(Waiting {
                        ops: held.then_some(ops),
                        done,
                    });
                    self.wake.notify_one();
                    answer
                }
                _ if !held => return Ok((false, inner.revision)),
                _ => {
                    self.refuse_once_closed()?;
                    inner.apply(ops);
                    return Ok((true, inner.revision));
                }
            }
        };
        // Decided and in line: it is written (and applied) even if this call is dropped now.
        done.await.unwrap_or_else(|_| {
            Err(StoreError::Stopped {
                store: self.describe(),
                thread: "log writer",
            })
        })
    }

    async fn watch(&self, prefix: &str, from: i64) -> Result<mpsc::Receiver<WatchItem>, StoreError> {
        let mut inner = self.lock()?;
        if from < inner.compacted {
            let (tx, rx) = mpsc::channel(1);
            let _ = tx.try_send(Err(StoreError::Compacted {
                revision: inner.compacted,
            }));
            return Ok(rx);
        }
        // Replay the history from `from`, one message per revision, into a channel with room for
        // all of it and 1,024 live revisions more.
        let replay = super::by_revision(
            inner
                .history
                .iter()
                .filter(|e| e.revision() >= from && e.key().starts_with(prefix))
                .map(Past::event),
        );
        let (tx, rx) = mpsc::channel(replay.len() + 1024);
        for batch in replay {
            tx.try_send(Ok(batch)).expect("the channel has room for the replay");
        }
        inner.watchers.push(Watcher {
            prefix: prefix.to_owned(),
            tx,
        });
        Ok(rx)
    }

    async fn grant(&self, ttl: Duration) -> Result<i64, StoreError> {
        let mut inner = self.lock()?;
        let id = inner.next_lease;
        inner.next_lease += 1;
        inner.leases.insert(
            id,
            Lease {
                ttl,
                deadline: Instant::now() + ttl,
            },
        );
        Ok(id)
    }

    async fn keep_alive(&self, lease: i64) -> Result<(), StoreError> {
        let mut inner = self.lock()?;
        inner.expire();
        let l = inner.leases.get_mut(&lease).ok_or(StoreError::LeaseExpired { lease })?;
        l.deadline = Instant::now() + l.ttl;
        Ok(())
    }

    async fn revoke(&self, lease: i64) -> Result<(), StoreError> {
        self.lock()?.end_lease(lease);
        Ok(())
    }

    async fn compact(&self, revision: i64) -> Result<(), StoreError> {
        let mut inner = self.lock()?;
        if revision > inner.compacted {
            inner.compacted = revision.min(inner.revision);
            let compacted = inner.compacted;
            inner.history.retain(|e| e.revision() >= compacted);
            inner.history_bytes = inner.history.iter().map(Past::bytes).sum();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
