//! Revocations shared by every replica: a replica that applies a `revocation` document writes it to
//! the store (if absent: the first replica's time is the revocation time every CRL carries, stable
//! across replicas and restarts), and one that applies its removal deletes it. Every replica's CRLs
//! list what its own documents and the store name, so a `tbotctl revoke` on one replica reaches the
//! agents of every replica at once.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::issuer::state::backing::{Backing, json};
use crate::issuer::{IssuerError, Policy};
use crate::kv::{Condition, Op};
use crate::resource::revocation::{Revocation, Serial};

use super::{Inner, State, now};

/// Serial → when it was revoked.
pub(super) type Revoked = BTreeMap<Serial, OffsetDateTime>;

/// A revocation as the store keeps it, at `issuer/<td>/revocations/<SHA-256 of its name>.json` (a
/// name may be 253 bytes, more than a file name takes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredRevocation {
    /// The document's `metadata.name`.
    pub name: String,
    pub reason: String,
    /// Lower-case hex.
    pub serials: Vec<String>,
    /// `metadata.expires` (Unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<i64>,
    /// When the first replica applied it (Unix seconds).
    pub revoked_at: i64,
}

impl StoredRevocation {
    fn of(doc: &Revocation, at: OffsetDateTime) -> StoredRevocation {
        StoredRevocation {
            name: doc.metadata.name.to_string(),
            reason: doc.spec.reason.clone(),
            serials: doc.spec.serials.iter().map(|s| s.as_str().to_owned()).collect(),
            expires: doc.metadata.expires.as_ref().map(|e| e.0.unix_timestamp()),
            revoked_at: at.unix_timestamp(),
        }
    }
}

/// A revocation's id in the store: the SHA-256 of its name.
pub(super) fn id_of(name: &str) -> String {
    crate::sha256_hex(name.as_bytes())
}

fn record_key(dir: &str, name: &str) -> String {
    format!("{dir}/revocations/{}.json", id_of(name))
}

/// The revocation's id if `key` is a stored revocation under `dir`.
pub(super) fn id_of_record(dir: &str, key: &str) -> Option<String> {
    key.strip_prefix(&format!("{dir}/revocations/"))?
        .strip_suffix(".json")
        .map(str::to_owned)
}

/// Every stored revocation under `dir`, by id (one that does not decode is skipped, and said).
pub(super) async fn load(backing: &Backing, dir: &str) -> Result<BTreeMap<String, StoredRevocation>, IssuerError> {
    let (entries, _) = backing.kv.list(&format!("{dir}/revocations/")).await?;
    let mut out = BTreeMap::new();
    for entry in entries {
        let Some(id) = id_of_record(dir, &entry.key) else {
            continue;
        };
        match backing.decode::<StoredRevocation>(&entry.key, &entry.value) {
            Ok(record) => {
                out.insert(id, record);
            }
            Err(e) => tracing::warn!(error = %e, "a stored revocation does not decode; it is not listed"),
        }
    }
    Ok(out)
}

impl Inner {
    /// Writes the revocations of `after` the store does not have as they are (a new one only if
    /// absent; an edited one keeps its time), and deletes those `before` had and `after` has not. A store that fails is said: this replica's CRLs list its
    /// own documents meanwhile, and the next apply writes again.
    pub(super) async fn share_revocations(&self, before: &BTreeMap<String, Revocation>, after: &Policy) {
        let dir = super::dir_of(&after.trust_domain);
        let at = now();
        let mut ops = Vec::new();
        for (name, doc) in &after.revocations {
            let key = record_key(&dir, name);
            let stored = self.lock().stored_revocations.get(&id_of(name)).cloned();
            match stored {
                // An edited document keeps the time it was first applied at.
                Some(stored) => {
                    let at = OffsetDateTime::from_unix_timestamp(stored.revoked_at).unwrap_or(at);
                    let wanted = StoredRevocation::of(doc, at);
                    if wanted != stored {
                        ops.push((vec![], Op::put(&key, json(&wanted))));
                    }
                }
                None => ops.push((
                    vec![Condition::Absent(key.clone())],
                    Op::put(&key, json(&StoredRevocation::of(doc, at))),
                )),
            }
        }
        let mut gone: Vec<String> = before
            .keys()
            .filter(|n| !after.revocations.contains_key(*n))
            .cloned()
            .collect();
        // A store of this host alone (no other replica): what the documents no longer name goes,
        // also when it was removed while the daemon was stopped.
        if self.backing.local {
            gone.extend(
                self.lock()
                    .stored_revocations
                    .values()
                    .filter(|r| !after.revocations.contains_key(&r.name))
                    .map(|r| r.name.clone()),
            );
        }
        for name in gone {
            ops.push((vec![], Op::Delete(record_key(&dir, &name))));
        }
        let mut failed = false;
        for (conditions, op) in ops {
            if let Err(e) = self.backing.kv.txn(conditions, vec![op]).await {
                if !self.share_failed.load(std::sync::atomic::Ordering::Relaxed) {
                    tracing::warn!(error = %e, hint = %crate::error::Explain::hint(&e), "cannot share a revocation with the other replicas through the store; \
                        this replica's CRLs list it meanwhile, and it is tried again each second");
                }
                failed = true;
            }
        }
        self.share_failed.store(failed, std::sync::atomic::Ordering::Relaxed);
    }

    /// Shares again what failed to reach the store (each second while it fails), and forgets
    /// stored revocations that ended: past their `expires`, or every serial they name expired as
    /// the issuance log knows (a minute's check).
    pub(super) async fn tend_revocations(&self, minute: bool) {
        let policy = self.lock().policy.clone();
        if self.share_failed.load(std::sync::atomic::Ordering::Relaxed) {
            self.share_revocations(&policy.revocations, &policy).await;
        }
        if !minute {
            return;
        }
        let now = now();
        let ended: Vec<String> = {
            let state = self.lock();
            state
                .stored_revocations
                .iter()
                .filter(|(_, r)| !policy.revocations.contains_key(&r.name))
                .filter(|(_, r)| {
                    r.expires.is_some_and(|e| e <= now.unix_timestamp())
                        || (!r.serials.is_empty()
                            && r.serials
                                .iter()
                                .all(|s| self.issued.expiry(s).is_some_and(|end| end <= now)))
                })
                .map(|(_, r)| r.name.clone())
                .collect()
        };
        let dir = super::dir_of(&policy.trust_domain);
        for name in ended {
            if let Err(e) = self
                .backing
                .kv
                .txn(vec![], vec![Op::Delete(record_key(&dir, &name))])
                .await
            {
                tracing::debug!(error = %e, "cannot forget an ended revocation in the store; tried again in a minute");
            }
        }
    }

    /// The serials the CRL lists now, each with when it was revoked: those of this replica's
    /// `revocation` documents and of the store's (another replica's `tbotctl revoke`), not past
    /// their `expires`, whose certificates have not expired (as far as the issuance log knows). A
    /// revoked serial's expiry is remembered once the log tells it, while something names it (the
    /// log forgets expired certificates after its history).
    pub(super) fn revoked(&self, state: &State) -> Revoked {
        let now = now();
        let mut named: Revoked = BTreeMap::new();
        let mut name = |serial: Serial, at: OffsetDateTime| {
            let entry = named.entry(serial).or_insert(at);
            *entry = (*entry).min(at);
        };
        let mut first_seen = self.first_seen.lock().expect("first seen poisoned");
        for (doc_name, doc) in &state.policy.revocations {
            if doc.metadata.expires.as_ref().is_some_and(|e| e.0 <= now) {
                continue;
            }
            let at = match state.stored_revocations.get(&id_of(doc_name)) {
                Some(stored) => OffsetDateTime::from_unix_timestamp(stored.revoked_at).unwrap_or(now),
                // Whole seconds, as the store keeps it: the CRL does not change when it arrives.
                None => *first_seen
                    .entry(doc_name.clone())
                    .or_insert(OffsetDateTime::from_unix_timestamp(now.unix_timestamp()).unwrap_or(now)),
            };
            for serial in &doc.spec.serials {
                name(serial.clone(), at);
            }
        }
        first_seen.retain(|n, _| state.policy.revocations.contains_key(n));
        for stored in state.stored_revocations.values() {
            if stored.expires.is_some_and(|e| e <= now.unix_timestamp()) {
                continue;
            }
            let at = OffsetDateTime::from_unix_timestamp(stored.revoked_at).unwrap_or(now);
            for serial in stored.serials.iter().filter_map(|s| Serial::parse(s).ok()) {
                name(serial, at);
            }
        }
        let mut known = self.revoked_expiries.lock().expect("revoked expiries poisoned");
        known.retain(|serial, _| named.keys().any(|s| s.as_str() == serial));
        named.retain(|s, _| {
            let expiry = match known.get(s.as_str()) {
                Some(end) => Some(*end),
                None => self.issued.expiry(s.as_str()).inspect(|end| {
                    known.insert(s.as_str().to_owned(), *end);
                }),
            };
            expiry.is_none_or(|end| end > now)
        });
        named
    }
}
