//! The issuer's state store: a key-value store with revisions, conditional transactions, ordered
//! watches and leases, behind one trait with three backends:
//! - `memory`: in this process, gone at exit (tests, benches);
//! - `directory`: the memory engine, with every key in a file under the storage directory, kept
//!   through a write-ahead log (`wal`; one process: the directory's lock keeps a second one out);
//! - `etcd`: a real etcd cluster (v3 API), shared by every issuer replica of a trust domain.
//!
//! Keys are relative names such as `issuer/example.teleport.sh/ca.json`; the etcd backend puts its
//! `prefix` in front. Revisions are etcd's: one global counter that every committed write moves,
//! `mod_revision` the revision of a key's last write, `create_revision` that of its creation.
//! `tests/store_conformance.rs` holds every backend to the same behaviour.

mod etcd;
mod memory;
pub mod seal;
mod wal;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

pub use etcd::{EtcdKv, EtcdSettings, EtcdTls, connect_etcd};
pub use memory::MemoryKv;
pub use seal::Kek;

use crate::store::StoreError;

/// One key as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    pub value: Vec<u8>,
    pub create_revision: i64,
    pub mod_revision: i64,
    /// The lease the key lives on (0: none).
    pub lease: i64,
}

/// What must hold for a transaction to apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Condition {
    /// The key does not exist.
    Absent(String),
    /// The key exists.
    Present(String),
    /// The key's last write was at this revision (0: it does not exist).
    ModRevision(String, i64),
}

/// A write in a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Writes the key; with a lease, the key goes when the lease does.
    Put { key: String, value: Vec<u8>, lease: i64 },
    /// Removes the key (a missing key is fine).
    Delete(String),
}

impl Op {
    pub fn put(key: impl Into<String>, value: impl Into<Vec<u8>>) -> Op {
        Op::Put {
            key: key.into(),
            value: value.into(),
            lease: 0,
        }
    }
}

/// A change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Put(Entry),
    Delete { key: String, mod_revision: i64 },
}

impl Event {
    pub fn key(&self) -> &str {
        match self {
            Event::Put(entry) => &entry.key,
            Event::Delete { key, .. } => key,
        }
    }

    pub fn revision(&self) -> i64 {
        match self {
            Event::Put(entry) => entry.mod_revision,
            Event::Delete { mod_revision, .. } => *mod_revision,
        }
    }
}

/// Groups events (in revision order) into one batch per revision, as a watch delivers them.
pub fn by_revision(events: impl IntoIterator<Item = Event>) -> Vec<Vec<Event>> {
    let mut batches: Vec<Vec<Event>> = Vec::new();
    for event in events {
        match batches.last_mut() {
            Some(batch) if batch[0].revision() == event.revision() => batch.push(event),
            _ => batches.push(vec![event]),
        }
    }
    batches
}

/// What a watch delivers: the events of one revision at a time, in revision order, or the error
/// that ended it (`StoreError::Compacted` when the start revision is gone: list again and watch
/// from there). The channel closes after an error.
pub type WatchItem = Result<Vec<Event>, StoreError>;

/// The store of an issuer's state.
#[async_trait::async_trait]
pub trait Kv: Send + Sync + 'static {
    /// `memory`, `directory /path` or `etcd http://…,http://… (prefix /tbot)`, for messages.
    fn describe(&self) -> String;

    /// Where a key lives, for messages: a file path, or the store and key.
    fn locate(&self, key: &str) -> String {
        format!("{} key {key}", self.describe())
    }

    /// One key, read at the newest revision.
    async fn get(&self, key: &str) -> Result<Option<Entry>, StoreError>;

    /// Every key under `prefix`, sorted, and the revision they were read at (watch from the next one
    /// to miss nothing).
    async fn list(&self, prefix: &str) -> Result<(Vec<Entry>, i64), StoreError>;

    /// Applies `ops` atomically if every condition holds. Returns whether it applied, and the
    /// store's revision after it.
    async fn txn(&self, conditions: Vec<Condition>, ops: Vec<Op>) -> Result<(bool, i64), StoreError>;

    /// The changes under `prefix` from revision `from` on (older ones replayed from history).
    async fn watch(&self, prefix: &str, from: i64) -> Result<mpsc::Receiver<WatchItem>, StoreError>;

    /// A lease of `ttl`; keys put with it go when it expires or is revoked.
    async fn grant(&self, ttl: Duration) -> Result<i64, StoreError>;

    /// Renews a lease for its full ttl; `StoreError::LeaseExpired` when it is gone.
    async fn keep_alive(&self, lease: i64) -> Result<(), StoreError>;

    /// Ends a lease now, removing its keys.
    async fn revoke(&self, lease: i64) -> Result<(), StoreError>;

    /// Forgets the history before `revision` (watches from before it fail with `Compacted`).
    async fn compact(&self, revision: i64) -> Result<(), StoreError>;

    /// Its owner is done with it: finish what is in flight and let go of what it holds now (a
    /// storage directory and its lock), although tasks may still hold references. Writes after
    /// it fail.
    fn close(&self) {}
}

/// A shared store.
pub type SharedKv = Arc<dyn Kv>;
