//! A `directory` store's transactions on their way to disk: the line of those decided and not yet
//! logged ([`Journal`]), the thread that logs them and answers them ([`write_log`]), and the one
//! that brings the files up to date from memory ([`Checkpoint`]).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::oneshot;

use super::super::wal::{self, Cleanup, Log};
use super::{Entry, Inner, Op};
use crate::store::{Store, StoreError};

/// The transactions of a `directory` store that are decided but not yet on disk, in order.
#[derive(Default)]
pub(super) struct Journal {
    pub(super) waiting: VecDeque<Waiting>,
    /// What the waiting transactions leave each key they write: present, or deleted.
    pub(super) overlay: HashMap<String, bool>,
    /// Their log records, not yet written.
    pub(super) records: Vec<u8>,
    /// Keys the log changed since the files were last brought up to date.
    pub(super) dirty: BTreeSet<String>,
    /// The store is being dropped: write what waits, bring the files up to date, and stop.
    pub(super) closing: bool,
    /// The writer has stopped (closed, or it failed): nothing more is decided.
    pub(super) stopped: bool,
    /// The last attempt to bring the files up to date has ended (for the writer thread).
    pub(super) checkpointed: Option<Checkpointed>,
    /// When a refusal for being behind was last logged, and how many were refused since.
    warned_behind: Option<std::time::Instant>,
    refused_behind: u64,
    /// Tests hold the writer, as a hung disk would.
    #[cfg(test)]
    pub(super) held: bool,
}

/// A `directory` store refuses new transactions while this many bytes of log records wait for the
/// disk, or this many transactions: each waiting one holds its writes in memory until the log
/// writer gets to it, and a caller that gave up (a client's timeout) and tried again adds another.
/// Without a bound, a hung or slow disk under a busy issuer grows its memory without end; with it,
/// callers are told the store is behind (a transient error: agents retry later) and nothing more
/// is held. A healthy disk never comes near it: the writer takes everything waiting at each
/// `fdatasync`.
pub(super) const BEHIND_BYTES: usize = 64 << 20;
const BEHIND_TRANSACTIONS: usize = 100_000;
/// A store that stays behind says so at most this often.
const BEHIND_WARN_EVERY: Duration = Duration::from_secs(10);

impl Journal {
    /// Whether one more transaction may wait for the disk: refused with [`StoreError::Behind`] past
    /// [`BEHIND_BYTES`] or [`BEHIND_TRANSACTIONS`]. `store` names the store.
    pub(super) fn admit(&mut self, store: impl FnOnce() -> String) -> Result<(), StoreError> {
        let (bytes, transactions) = (self.records.len(), self.waiting.len());
        if bytes < BEHIND_BYTES && transactions < BEHIND_TRANSACTIONS {
            return Ok(());
        }
        let error = StoreError::Behind {
            store: store(),
            bytes,
            transactions,
        };
        self.refused_behind += 1;
        let now = std::time::Instant::now();
        if self
            .warned_behind
            .is_none_or(|at| now.duration_since(at) >= BEHIND_WARN_EVERY)
        {
            self.warned_behind = Some(now);
            tracing::warn!(error = %error, refused = self.refused_behind, hint = %crate::error::Explain::hint(&error),
                "refusing new writes until the store's log catches up with its disk");
            self.refused_behind = 0;
        }
        Err(error)
    }

    /// Whether the writer must leave the waiting transactions alone (a test's hung disk).
    fn held(&self) -> bool {
        #[cfg(test)]
        return self.held;
        #[cfg(not(test))]
        false
    }
}

pub(super) struct Waiting {
    /// Its writes, when its conditions held (otherwise it waits only to answer in order).
    pub(super) ops: Option<Vec<Op>>,
    pub(super) done: oneshot::Sender<Result<(bool, i64), StoreError>>,
}

/// The log grows to this before the files are brought up to date while transactions keep coming
/// (otherwise: whenever nothing waits).
const LOG_LIMIT: u64 = 4 << 20;

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
pub(super) fn start_writers(
    shared: &Arc<Mutex<Inner>>,
    wake: &Arc<Condvar>,
    store: Store,
    scope: String,
    log: Log,
) -> std::io::Result<JoinHandle<()>> {
    let (checkpoints, queue) = std::sync::mpsc::channel::<Checkpoint>();
    let described = store.describe();
    let (files_shared, files_wake) = (shared.clone(), wake.clone());
    let files = std::thread::Builder::new()
        .name("tbot-store-files".into())
        .spawn(move || {
            for Checkpoint { cleanup, changed } in queue {
                let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| cleanup.run(&store, &changed)));
                let result = match ran {
                    Ok(result) => result,
                    // The thread goes on: the log keeps the changes, and the next checkpoint
                    // tries them again.
                    Err(_) => Err(StoreError::Panicked {
                        store: store.describe(),
                        during: "bringing its files up to date from its log",
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
                    let store = described.clone();
                    let _ = waiting.done.send(Err(match ran {
                        Ok(()) => StoreError::Closed { store },
                        Err(_) => StoreError::Stopped {
                            store,
                            thread: "log writer (a panic)",
                        },
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
            // A full log does not wait for idle, but a failed attempt still waits its second.
            && ((waiting == 0 && (now >= next_at || journal.closing))
                || (log.len() >= LOG_LIMIT && (now >= next_at || !behind)));
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
                        StoreError::Stopped {
                            store: log.path().display().to_string(),
                            thread: "files' writer",
                        },
                    )));
                }
            }
            continue;
        }
        if waiting > 0 && !journal.held() {
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
    /// After the log write of the first `count` waiting transactions: applies and answers them, or
    /// fails them and every transaction decided after them (which may depend on them).
    pub(super) fn complete(&mut self, count: usize, written: Result<(), StoreError>, scope: &str) {
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
}
