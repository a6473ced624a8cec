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

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::wal::{self, Cleanup, Log};
use super::{Condition, Entry, Event, Kv, Op, WatchItem};
use crate::store::{Store, StoreError};

/// History kept for watches that start in the past; older revisions are compacted away.
const HISTORY: usize = 20_000;

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
    keys: BTreeMap<String, Arc<Entry>>,
    /// Every event after `compacted`, oldest first.
    history: Vec<Past>,
    watchers: Vec<Watcher>,
    leases: HashMap<i64, Lease>,
    next_lease: i64,
    /// A store with a log (`directory`): the transactions waiting for the disk.
    journal: Option<Journal>,
}

/// The transactions of a `directory` store that are decided but not yet on disk, in order.
#[derive(Default)]
struct Journal {
    waiting: VecDeque<Waiting>,
    /// What the waiting transactions leave each key they write: present, or deleted.
    overlay: HashMap<String, bool>,
    /// Their log records, not yet written.
    records: Vec<u8>,
    /// Keys the log changed since the files were last brought up to date.
    dirty: BTreeSet<String>,
    /// The store is being dropped: write what waits, bring the files up to date, and stop.
    closing: bool,
    /// The writer has stopped (closed, or it failed): nothing more is decided.
    stopped: bool,
    /// The last attempt to bring the files up to date has ended (for the writer thread).
    checkpointed: Option<Checkpointed>,
}

struct Waiting {
    /// Its writes, when its conditions held (otherwise it waits only to answer in order).
    ops: Option<Vec<Op>>,
    done: oneshot::Sender<Result<(bool, i64), StoreError>>,
}

/// The log grows to this before the files are brought up to date while transactions keep coming
/// (otherwise: whenever nothing waits).
const LOG_LIMIT: u64 = 4 << 20;

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
    /// docs); keeps them from now on. On a memory [`Store`], writes its files at once instead.
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
            let mut inner = kv.lock();
            for (name, value) in files {
                inner.revision += 1;
                let revision = inner.revision;
                inner.keys.insert(
                    name.clone(),
                    Arc::new(Entry {
                        key: name,
                        value,
                        create_revision: revision,
                        mod_revision: revision,
                        lease: 0,
                    }),
                );
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

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().expect("kv poisoned")
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
                inner.lock().expect("kv poisoned").expire();
            }
        });
    }

    /// Writes the changed keys to a memory [`Store`] behind this one (before they count as
    /// committed). A store on disk has a log instead.
    fn write_through(&self, ops: &[Op]) -> Result<(), StoreError> {
        let Some(disk) = &self.disk else {
            return Ok(());
        };
        let store = disk.store.lock().expect("kv poisoned");
        let Some(store) = store.as_ref() else {
            return Err(self.closed());
        };
        for op in ops.iter().filter(|op| wal::on_disk(op, &disk.scope)) {
            let (Op::Put { key, .. } | Op::Delete(key)) = op;
            match wal::file_of(op) {
                Some(value) => store.write(key, value, wal::secrecy(key))?,
                None => store.remove(key)?,
            }
        }
        Ok(())
    }

    fn closed(&self) -> StoreError {
        StoreError::Closed { store: self.describe() }
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

/// What bringing the files up to date came to: on failure, the keys it was for, and why.
type Checkpointed = Result<(), (Vec<String>, StoreError)>;

/// Bringing the files up to date with the logs before one: the keys the logs changed, with their
/// values now.
struct Checkpoint {
    cleanup: Cleanup,
    changed: BTreeMap<String, Option<Arc<Entry>>>,
}

/// Starts the threads of a `directory` store on disk: the log's writer, and the files' writer it
/// hands each [`Checkpoint`] to. Should either stop (closed, or a panic), the store stops deciding
/// transactions, and those waiting fail.
fn start_writers(
    shared: &Arc<Mutex<Inner>>,
    wake: &Arc<Condvar>,
    store: Store,
    scope: String,
    log: Log,
) -> std::io::Result<JoinHandle<()>> {
    let (checkpoints, queue) = std::sync::mpsc::channel::<Checkpoint>();
    let (files_shared, files_wake) = (shared.clone(), wake.clone());
    let files = std::thread::Builder::new()
        .name("tbot-store-files".into())
        .spawn(move || {
            for Checkpoint { cleanup, changed } in queue {
                let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| cleanup.run(&store, &changed)));
                let result = match ran {
                    Ok(result) => result,
                    Err(_) => Err(StoreError::Unavailable {
                        store: store.describe(),
                        reason: "writing its files panicked".into(),
                    }),
                };
                let result = result.map_err(|e| (changed.into_keys().collect(), e));
                let mut inner = files_shared.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                if let Some(journal) = inner.journal.as_mut() {
                    journal.checkpointed = Some(result);
                }
                files_wake.notify_all();
            }
        })?;
    let (shared, wake) = (shared.clone(), wake.clone());
    std::thread::Builder::new()
        .name("tbot-store-log".into())
        .spawn(move || {
            let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                write_log(&shared, &wake, &scope, log, &checkpoints)
            }));
            // Whatever ended it: nothing more is decided, and whatever waits is told.
            let mut inner = shared.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(journal) = inner.journal.as_mut() {
                journal.stopped = true;
                for waiting in journal.waiting.drain(..) {
                    let _ = waiting.done.send(Err(StoreError::Closed {
                        store: format!("its log writer stopped{}", if ran.is_err() { " (a panic)" } else { "" }),
                    }));
                }
                journal.overlay.clear();
                journal.records.clear();
            }
            drop(inner);
            drop(checkpoints);
            let _ = files.join();
        })
}

/// Files are brought up to date at most this often while the log is short (a burst of changes
/// costs one `syncfs`, not one each).
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

/// The log writer of a `directory` store on disk: appends the records of every waiting
/// transaction at once, then applies and answers them. When nothing waits (or the log is long), at
/// most once a second, it starts a new log and has the files' writer bring the files up to date
/// with the older ones; after a failure, again a second later. Returns once closed and idle.
fn write_log(
    shared: &Mutex<Inner>,
    wake: &Condvar,
    scope: &str,
    mut log: Log,
    checkpoints: &std::sync::mpsc::Sender<Checkpoint>,
) {
    let lock = || shared.lock().expect("kv poisoned");
    let mut inner = lock();
    let mut running = false;
    // A failed attempt left older logs: the next one covers them too, without a new log.
    let mut behind = false;
    // When the files may next be brought up to date (a second after the last attempt began).
    let mut next_at = std::time::Instant::now();
    let mut warned = false;
    loop {
        let journal = inner.journal.as_mut().expect("a store with a log has a journal");
        if let Some(result) = journal.checkpointed.take() {
            running = false;
            behind = result.is_err();
            match result {
                Ok(()) => warned = false,
                Err((keys, e)) => {
                    if !std::mem::replace(&mut warned, true) {
                        tracing::warn!(error = %e, hint = %crate::error::Explain::hint(&e),
                            "cannot bring the store's files up to date from its log; the log keeps every change, and this is tried again each second");
                    }
                    journal.dirty.extend(keys);
                }
            }
        }
        let waiting = journal.waiting.len();
        let now = std::time::Instant::now();
        let due = !running
            && !journal.dirty.is_empty()
            && ((waiting == 0 && (now >= next_at || journal.closing)) || log.len() >= LOG_LIMIT);
        if due {
            next_at = now + CHECKPOINT_EVERY;
            if !behind {
                // Only this thread appends: the new log can be made without the lock.
                drop(inner);
                let rotated = log.rotate();
                inner = lock();
                if let Err(e) = rotated {
                    inner
                        .journal
                        .as_mut()
                        .expect("a store with a log has a journal")
                        .checkpointed = Some(Err((Vec::new(), e)));
                    continue;
                }
                behind = true;
            }
            let cleanup = log.cleanup();
            let dirty = std::mem::take(&mut inner.journal.as_mut().expect("a store with a log has a journal").dirty);
            let changed: BTreeMap<String, Option<Arc<Entry>>> = dirty
                .into_iter()
                .map(|key| {
                    let entry = inner.keys.get(&key).cloned();
                    (key, entry)
                })
                .collect();
            match checkpoints.send(Checkpoint { cleanup, changed }) {
                Ok(()) => running = true,
                Err(unsent) => {
                    inner
                        .journal
                        .as_mut()
                        .expect("a store with a log has a journal")
                        .checkpointed = Some(Err((
                        unsent.0.changed.into_keys().collect(),
                        StoreError::Unavailable {
                            store: log.path().display().to_string(),
                            reason: "the thread that writes its files stopped".into(),
                        },
                    )));
                }
            }
            continue;
        }
        if waiting > 0 {
            let records = std::mem::take(&mut journal.records);
            let written = if records.is_empty() {
                // Only refusals, or writes of no file: nothing to wait for.
                Ok(())
            } else {
                drop(inner);
                let written = log.append(&records).map_err(|error| StoreError::Io {
                    action: "append to",
                    path: log.path(),
                    error,
                });
                if written.is_ok() {
                    crate::failpoint("store-logged");
                }
                inner = lock();
                written
            };
            inner.complete(waiting, written, scope);
            continue;
        }
        if journal.closing && !running && (journal.dirty.is_empty() || behind) {
            return;
        }
        inner = if !running && !journal.dirty.is_empty() {
            let wait = next_at.saturating_duration_since(now);
            wake.wait_timeout(inner, wait).expect("kv poisoned").0
        } else {
            wake.wait(inner).expect("kv poisoned")
        };
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

    /// After the log write of the first `count` waiting transactions: applies and answers them, or
    /// fails them and every transaction decided after them (which may depend on them).
    fn complete(&mut self, count: usize, written: Result<(), StoreError>, scope: &str) {
        let mut journal = self.journal.take().expect("a store with a log has a journal");
        let batch: Vec<Waiting> = journal.waiting.drain(..count).collect();
        match written {
            Ok(()) => {
                for waiting in batch {
                    let applied = waiting.ops.is_some();
                    if let Some(mut ops) = waiting.ops {
                        for op in ops.iter().filter(|op| wal::on_disk(op, scope)) {
                            let (Op::Put { key, .. } | Op::Delete(key)) = op;
                            journal.dirty.insert(key.clone());
                        }
                        // A lease that ended while the put waited takes the key with it at once.
                        ops.retain(|op| !matches!(op, Op::Put { lease, .. } if *lease != 0 && !self.leases.contains_key(lease)));
                        self.apply(ops);
                    }
                    let _ = waiting.done.send(Ok((applied, self.revision)));
                }
            }
            Err(error) => {
                // Those decided after them may depend on them: none of them happened.
                for waiting in batch.into_iter().chain(journal.waiting.drain(..)) {
                    let _ = waiting.done.send(Err(error.duplicate()));
                }
                journal.records.clear();
            }
        }
        journal.overlay = journal
            .waiting
            .iter()
            .filter_map(|w| w.ops.as_ref())
            .flatten()
            .map(|op| match op {
                Op::Put { key, .. } => (key.clone(), true),
                Op::Delete(key) => (key.clone(), false),
            })
            .collect();
        self.journal = Some(journal);
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
                        key: key.clone(),
                        value,
                        create_revision,
                        mod_revision: revision,
                        lease,
                    });
                    self.keys.insert(key, entry.clone());
                    self.history.push(Past::Put(entry));
                }
                Op::Delete(key) => {
                    if self.keys.remove(&key).is_some() {
                        self.history.push(Past::Delete {
                            key,
                            mod_revision: revision,
                        });
                    }
                }
            }
        }
        if self.history.len() == first {
            return;
        }
        self.revision = revision;
        let events: Vec<Event> = self.history[first..].iter().map(Past::event).collect();
        if self.history.len() > HISTORY {
            // Cut at a revision boundary: a revision's events are kept whole or not at all.
            let mut cut = self.history.len() - HISTORY / 2;
            while cut < self.history.len() && self.history[cut].revision() == self.history[cut - 1].revision() {
                cut += 1;
            }
            self.compacted = self.history.get(cut).map_or(self.revision + 1, Past::revision);
            self.history.drain(..cut);
        }
        self.watchers.retain(|w| {
            let mine: Vec<Event> = events
                .iter()
                .filter(|e| e.key().starts_with(&w.prefix))
                .cloned()
                .collect();
            if mine.is_empty() {
                return !w.tx.is_closed();
            }
            // A watcher that cannot keep up is dropped: its channel closes, and it lists again.
            w.tx.try_send(Ok(mine)).is_ok()
        });
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
    /// still holds this store. Writes after it fail; reads go on from memory.
    fn close(&self) {
        let writer = self.writer.lock().map(|mut w| w.take()).unwrap_or(None);
        if let Some(writer) = writer {
            if let Ok(mut inner) = self.inner.lock()
                && let Some(journal) = inner.journal.as_mut()
            {
                journal.closing = true;
            }
            self.wake.notify_all();
            let _ = writer.join();
        }
        if let Some(disk) = &self.disk
            && let Ok(mut store) = disk.store.lock()
        {
            store.take();
        }
    }

    async fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        let mut inner = self.lock();
        inner.expire();
        Ok(inner.keys.get(key).map(|e| Entry::clone(e)))
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<Entry>, i64), StoreError> {
        let mut inner = self.lock();
        inner.expire();
        let entries = inner
            .keys
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, e)| Entry::clone(e))
            .collect();
        Ok((entries, inner.revision))
    }

    async fn txn(&self, conditions: Vec<Condition>, ops: Vec<Op>) -> Result<(bool, i64), StoreError> {
        let done = {
            let mut inner = self.lock();
            if inner.journal.as_ref().is_some_and(|j| j.closing || j.stopped) {
                return Err(self.closed());
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
                    let (done, answer) = oneshot::channel();
                    if held {
                        wal::encode(&ops, scope, &mut journal.records)?;
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
                    self.write_through(&ops)?;
                    inner.apply(ops);
                    return Ok((true, inner.revision));
                }
            }
        };
        // Decided and in line: it is written (and applied) even if this call is dropped now.
        done.await.unwrap_or_else(|_| {
            Err(StoreError::Unavailable {
                store: self.describe(),
                reason: "its log writer stopped".into(),
            })
        })
    }

    async fn watch(&self, prefix: &str, from: i64) -> Result<mpsc::Receiver<WatchItem>, StoreError> {
        let mut inner = self.lock();
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
        let mut inner = self.lock();
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
        let mut inner = self.lock();
        inner.expire();
        let l = inner.leases.get_mut(&lease).ok_or(StoreError::LeaseExpired { lease })?;
        l.deadline = Instant::now() + l.ttl;
        Ok(())
    }

    async fn revoke(&self, lease: i64) -> Result<(), StoreError> {
        self.lock().end_lease(lease);
        Ok(())
    }

    async fn compact(&self, revision: i64) -> Result<(), StoreError> {
        let mut inner = self.lock();
        if revision > inner.compacted {
            inner.compacted = revision.min(inner.revision);
            let compacted = inner.compacted;
            inner.history.retain(|e| e.revision() >= compacted);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &std::path::Path) -> MemoryKv {
        MemoryKv::directory(Store::open(dir).unwrap(), "issuer/").unwrap()
    }

    #[tokio::test]
    async fn a_directory_log_is_replayed_over_the_files_at_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            store
                .write("issuer/x/a.json", b"old", crate::store::Secrecy::Public)
                .unwrap();
            store
                .write("issuer/x/b.json", b"gone", crate::store::Secrecy::Public)
                .unwrap();
        }
        // What a process killed before bringing its files up to date leaves, with the half-written
        // record of a transaction it never answered.
        let mut log = Vec::new();
        wal::encode(
            &[Op::put("issuer/x/a.json", "new"), Op::Delete("issuer/x/b.json".into())],
            "issuer/",
            &mut log,
        )
        .unwrap();
        wal::encode(&[Op::put("issuer/x/ca-1.key", "secret")], "issuer/", &mut log).unwrap();
        let mut torn = Vec::new();
        wal::encode(&[Op::put("issuer/x/never.json", "x")], "issuer/", &mut torn).unwrap();
        log.extend_from_slice(&torn[..torn.len() / 2]);
        std::fs::write(dir.path().join("issuer.1.wal"), &log).unwrap();

        let kv = open(dir.path());
        let (entries, _) = kv.list("issuer/").await.unwrap();
        let found: Vec<(&str, &[u8])> = entries.iter().map(|e| (e.key.as_str(), &e.value[..])).collect();
        assert_eq!(
            found,
            [("issuer/x/a.json", &b"new"[..]), ("issuer/x/ca-1.key", b"secret")]
        );
        // The files say the same, and the log is a new, empty one.
        let file = |name: &str| std::fs::read(dir.path().join(name)).ok();
        assert_eq!(file("issuer/x/a.json").as_deref(), Some(&b"new"[..]));
        assert_eq!(file("issuer/x/b.json"), None);
        assert_eq!(file("issuer/x/never.json"), None);
        use std::os::unix::fs::PermissionsExt;
        for (name, mode) in [("issuer/x/ca-1.key", 0o600), ("issuer.2.wal", 0o600)] {
            let meta = std::fs::metadata(dir.path().join(name)).unwrap();
            assert_eq!(meta.permissions().mode() & 0o777, mode, "{name}");
        }
        assert_eq!(file("issuer.1.wal"), None);
        assert_eq!(file("issuer.2.wal").unwrap().len(), 0);
    }

    #[tokio::test]
    async fn a_damaged_older_log_or_a_key_outside_the_scope_refuses_to_open() {
        let dir = tempfile::tempdir().unwrap();
        drop(Store::open(dir.path()).unwrap());
        let mut whole = Vec::new();
        wal::encode(&[Op::put("issuer/x/a.json", "1")], "issuer/", &mut whole).unwrap();
        // A newer log follows a damaged one: what was after the damage is lost, so say so.
        std::fs::write(dir.path().join("issuer.1.wal"), &whole[..whole.len() - 1]).unwrap();
        std::fs::write(dir.path().join("issuer.2.wal"), &whole).unwrap();
        let err = MemoryKv::directory(Store::open(dir.path()).unwrap(), "issuer/")
            .err()
            .unwrap();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("issuer.1.wal"), "{err}");
        // A record that names a file outside the scope.
        let mut outside = Vec::new();
        wal::encode(&[Op::put("issuer/../lock", "x")], "issuer/", &mut outside).unwrap();
        std::fs::remove_file(dir.path().join("issuer.1.wal")).unwrap();
        std::fs::write(dir.path().join("issuer.2.wal"), &outside).unwrap();
        let err = MemoryKv::directory(Store::open(dir.path()).unwrap(), "issuer/")
            .err()
            .unwrap();
        assert!(err.to_string().contains("outside `issuer/`"), "{err}");
    }

    #[tokio::test]
    async fn a_closed_directory_store_refuses_writes_and_lets_go_of_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let kv = open(dir.path());
        kv.txn(vec![], vec![Op::put("issuer/x/a.json", "1")]).await.unwrap();
        kv.close();
        let err = kv.txn(vec![], vec![Op::put("issuer/x/b.json", "2")]).await.unwrap_err();
        assert!(matches!(err, StoreError::Closed { .. }), "{err}");
        assert_eq!(
            kv.get("issuer/x/a.json").await.unwrap().unwrap().value,
            b"1",
            "reads go on"
        );
        // The directory is free while this store still exists.
        let again = open(dir.path());
        assert_eq!(again.get("issuer/x/a.json").await.unwrap().unwrap().value, b"1");
        assert_eq!(again.get("issuer/x/b.json").await.unwrap(), None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn directory_transactions_in_line_together_decide_in_order_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let kv = Arc::new(open(dir.path()));
        // Creates of one key race; every other write is its own key. Those decided while others
        // wait for the disk are decided against the waiting writes.
        let tasks: Vec<_> = (0..200)
            .map(|i| {
                let kv = kv.clone();
                tokio::spawn(async move {
                    let race = "issuer/x/tokens/t.json".to_owned();
                    let won = kv
                        .txn(
                            vec![Condition::Absent(race.clone())],
                            vec![Op::put(&race, format!("{i}"))],
                        )
                        .await
                        .unwrap()
                        .0;
                    kv.txn(vec![], vec![Op::put(format!("issuer/x/bots/b@{i}.json"), "{}")])
                        .await
                        .unwrap();
                    won
                })
            })
            .collect();
        let mut winners = 0;
        for task in tasks {
            winners += usize::from(task.await.unwrap());
        }
        assert_eq!(winners, 1);
        let (entries, revision) = kv.list("issuer/").await.unwrap();
        assert_eq!(entries.len(), 201);
        assert_eq!(revision, 201, "one revision per applied transaction");
        drop(kv);
        let kv = open(dir.path());
        assert_eq!(kv.list("issuer/").await.unwrap().0, {
            let mut again = entries.clone();
            for (n, e) in again.iter_mut().enumerate() {
                e.create_revision = n as i64 + 1;
                e.mod_revision = n as i64 + 1;
            }
            again
        });
    }

    #[tokio::test]
    async fn a_directory_transaction_dropped_once_decided_is_still_written() {
        use futures_util::FutureExt;
        let dir = tempfile::tempdir().unwrap();
        let kv = open(dir.path());
        // Polled once (as `note_issued` does), then dropped.
        let _ = kv.txn(vec![], vec![Op::put("issuer/x/ca.json", "{}")]).now_or_never();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while kv.get("issuer/x/ca.json").await.unwrap().is_none() {
            assert!(std::time::Instant::now() < deadline, "never written");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        drop(kv);
        assert_eq!(std::fs::read(dir.path().join("issuer/x/ca.json")).unwrap(), b"{}");
    }

    #[tokio::test]
    async fn history_is_trimmed_at_revision_boundaries() {
        let kv = MemoryKv::new();
        // Revisions of two events each, past the history bound.
        for i in 0..(HISTORY / 2 + 10) {
            kv.txn(
                vec![],
                vec![Op::put(format!("a/{i}"), "x"), Op::put(format!("b/{i}"), "y")],
            )
            .await
            .unwrap();
        }
        let inner = kv.lock();
        assert!(inner.history.len() <= HISTORY);
        let first = inner.history[0].revision();
        assert_eq!(first, inner.compacted);
        assert_eq!(
            inner.history.iter().filter(|e| e.revision() == first).count(),
            2,
            "the oldest revision kept is whole"
        );
    }

    #[tokio::test]
    async fn a_watch_replays_more_history_than_its_live_buffer() {
        let kv = MemoryKv::new();
        for i in 0..3000 {
            kv.txn(vec![], vec![Op::put(format!("k/{i}"), "x")]).await.unwrap();
        }
        let mut rx = kv.watch("k/", 1).await.unwrap();
        let mut seen = 0;
        while let Ok(item) = rx.try_recv() {
            seen += item.unwrap().len();
        }
        assert_eq!(seen, 3000, "every revision of the history is replayed");
    }
}
