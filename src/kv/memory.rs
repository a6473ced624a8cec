//! The `memory` and `directory` backends: one engine in this process, with etcd's semantics
//! (global revision, conditional transactions, watches replayed from history, leases). `directory`
//! writes every key without a lease through to a file of the same name under the storage
//! directory before the transaction counts as done, and loads them at open; revisions start again
//! at each open, which is fine for the one process the directory's lock admits.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{Condition, Entry, Event, Kv, Op, WatchItem};
use crate::store::{Secrecy, Store, StoreError};

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
}

/// The in-process store; with a [`Store`] directory behind it, the `directory` backend.
pub struct MemoryKv {
    inner: Arc<Mutex<Inner>>,
    /// Keys are files under the storage directory (`directory` backend).
    disk: Option<(Store, String)>,
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
        };
        kv.spawn_reaper();
        kv
    }

    /// The `directory` backend: the keys under `scope` (such as `issuer/`) are the files of that
    /// name in `store`'s directory. Loads them now; writes them through from now on.
    pub fn directory(store: Store, scope: &str) -> Result<MemoryKv, StoreError> {
        let kv = MemoryKv::new();
        let mut names = Vec::new();
        let mut dirs = vec![scope.trim_end_matches('/').to_owned()];
        while let Some(dir) = dirs.pop() {
            names.extend(store.list(&dir)?);
            dirs.extend(store.list_dirs(&dir)?);
        }
        {
            let mut inner = kv.lock();
            for name in names {
                if let Some(value) = store.read(&name)? {
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
            }
            // Nothing before this open can be replayed.
            inner.compacted = inner.revision + 1;
        }
        Ok(MemoryKv {
            disk: Some((store, scope.to_owned())),
            ..kv
        })
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

    /// Writes the changed keys to the directory (before they count as committed).
    fn write_through(&self, ops: &[Op]) -> Result<(), StoreError> {
        let Some((store, scope)) = &self.disk else {
            return Ok(());
        };
        for op in ops {
            match op {
                Op::Put { key, value, lease: 0 } if key.starts_with(scope.as_str()) => {
                    let secrecy = if key.ends_with(".key") {
                        Secrecy::Secret
                    } else {
                        Secrecy::Public
                    };
                    store.write(key, value, secrecy)?;
                }
                Op::Delete(key) if key.starts_with(scope.as_str()) => store.remove(key)?,
                _ => {}
            }
        }
        Ok(())
    }
}

impl Default for MemoryKv {
    fn default() -> Self {
        MemoryKv::new()
    }
}

impl Inner {
    fn holds(&self, condition: &Condition) -> bool {
        match condition {
            Condition::Absent(key) => !self.keys.contains_key(key),
            Condition::Present(key) => self.keys.contains_key(key),
            Condition::ModRevision(key, revision) => self.keys.get(key).map_or(0, |e| e.mod_revision) == *revision,
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
            Some((store, _)) => store.describe(),
            None => "memory".into(),
        }
    }

    fn locate(&self, key: &str) -> String {
        match &self.disk {
            Some((store, _)) => store.path_of(key).display().to_string(),
            None => format!("memory:{key}"),
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
        let mut inner = self.lock();
        inner.expire();
        if !conditions.iter().all(|c| inner.holds(c)) {
            return Ok((false, inner.revision));
        }
        for op in &ops {
            if let Op::Put { lease, .. } = op
                && *lease != 0
                && !inner.leases.contains_key(lease)
            {
                return Err(StoreError::LeaseExpired { lease: *lease });
            }
        }
        self.write_through(&ops)?;
        inner.apply(ops);
        Ok((true, inner.revision))
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
