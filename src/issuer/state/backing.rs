//! What the issuer keeps its state in: a [`Kv`](crate::kv::Kv) store, and the key encryption key
//! that seals private keys before they reach it (required for etcd; directory storage relies on
//! file modes, as before).

use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::issuer::IssuerError;
use crate::kv::{Kek, MemoryKv, SharedKv};
use crate::store::{Store, StoreError};

/// The issuer's store and, for shared stores, its key encryption key.
#[derive(Clone)]
pub struct Backing {
    pub kv: SharedKv,
    pub kek: Option<Arc<Kek>>,
    /// The store is in this process (memory, directory): a call is decided at once (a directory
    /// store's write then waits for its log on disk), and nothing is shared with another replica.
    pub local: bool,
}

impl Backing {
    pub fn new(kv: SharedKv, kek: Option<Kek>) -> Backing {
        Backing {
            kv,
            kek: kek.map(Arc::new),
            local: false,
        }
    }

    /// The issuer's state in a local [`Store`] (a directory, or memory): the `directory` backend.
    pub fn local(store: Store) -> Result<Backing, StoreError> {
        Ok(Backing {
            local: true,
            ..Backing::new(Arc::new(MemoryKv::directory(store, "issuer/")?), None)
        })
    }

    pub fn describe(&self) -> String {
        self.kv.describe()
    }

    /// A private key as it is written under `name`: sealed when there is a KEK.
    pub fn seal(&self, name: &str, plaintext: &[u8]) -> Vec<u8> {
        match &self.kek {
            Some(kek) => kek.seal(name, plaintext),
            None => plaintext.to_vec(),
        }
    }

    /// A private key read from `name`, opened with the KEK.
    pub fn unseal(&self, name: &str, stored: Vec<u8>) -> Result<Vec<u8>, IssuerError> {
        let sealed = |reason: String| {
            IssuerError::Store(StoreError::Sealed {
                key: name.to_owned(),
                store: self.describe(),
                reason,
            })
        };
        match &self.kek {
            Some(kek) => kek.open(name, &stored).map_err(sealed),
            None if stored.starts_with(b"tbot-sealed-") => Err(sealed(
                "it is sealed, and this issuer has no `key_encryption_key_file`".into(),
            )),
            None => Ok(stored),
        }
    }

    /// Reads and decodes a JSON value with its `mod_revision`.
    pub async fn get_json<T: DeserializeOwned>(&self, key: &str) -> Result<Option<(T, i64)>, IssuerError> {
        let Some(entry) = self.kv.get(key).await? else {
            return Ok(None);
        };
        self.decode(key, &entry.value).map(|v| Some((v, entry.mod_revision)))
    }

    /// Writes `value` as JSON to `key`, with `ops` in the same transaction, if `key` is still at
    /// `*revision` (the one it was read at), and moves `*revision` on. Returns whether it was
    /// written; when not, someone else wrote first: read again and decide again.
    pub async fn put_json_if_unchanged<T: Serialize>(
        &self,
        key: String,
        value: &T,
        revision: &mut i64,
        mut ops: Vec<crate::kv::Op>,
    ) -> Result<bool, IssuerError> {
        ops.push(crate::kv::Op::put(&key, json(value)));
        let (written, now) = self
            .kv
            .txn(vec![crate::kv::Condition::ModRevision(key, *revision)], ops)
            .await?;
        if written {
            *revision = now;
        }
        Ok(written)
    }

    /// Decodes a JSON value read from `key`.
    pub fn decode<T: DeserializeOwned>(&self, key: &str, value: &[u8]) -> Result<T, IssuerError> {
        serde_json::from_slice(value).map_err(|e| IssuerError::Corrupt {
            path: PathBuf::from(self.kv.locate(key)),
            reason: e.to_string(),
        })
    }

    /// A damaged-value error for `key`.
    pub fn corrupt(&self, key: &str, reason: impl Into<String>) -> IssuerError {
        IssuerError::Corrupt {
            path: PathBuf::from(self.kv.locate(key)),
            reason: reason.into(),
        }
    }
}

/// JSON as the store keeps it: compact, and no larger than it is (a memory or directory store
/// holds every value in memory, one per bot instance among them).
pub fn json<T: Serialize>(value: &T) -> Vec<u8> {
    let mut bytes = serde_json::to_vec(value).expect("state serializes");
    bytes.shrink_to_fit();
    bytes
}
