//! The store follower: the trust domain's state read from the kv store at start, and every change
//! under its directory (this replica's writes and other replicas') applied to memory. A broken watch
//! lists again and watches from there.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::issuer::bots::{self, BotRecord, instance_of_record};
use crate::issuer::keys::ca::Authority;
use crate::issuer::keys::jwt::JwtKeys;
use crate::issuer::state::backing::{Backing, json};
use crate::issuer::state::replicas::{self, ReplicaRecord};
use crate::issuer::{IssuerError, Policy};
use crate::kv::{Condition, Event, Op};
use crate::store::StoreError;

use super::{Inner, State, dir_of, now};

/// Reads a bot instance's record from the store: the record (default when there is none) and its
/// `mod_revision` (0: none).
pub(super) async fn read_record(backing: &Backing, file: &str) -> Result<(BotRecord, i64), IssuerError> {
    Ok(backing.get_json::<BotRecord>(file).await?.unwrap_or_default())
}

/// Writes a bot instance's record if it is still at `revision` (0: absent): the revision written,
/// or `None` when someone else wrote it since (read again and decide again).
pub(super) async fn put_if_unchanged(
    backing: &Backing,
    file: &str,
    revision: i64,
    record: &BotRecord,
) -> Result<Option<i64>, IssuerError> {
    let (written, at) = backing
        .kv
        .txn(
            vec![Condition::ModRevision(file.to_owned(), revision)],
            vec![Op::put(file, json(record))],
        )
        .await?;
    Ok(written.then_some(at))
}

/// Every bot instance record under `dir`, and the revision of the read.
pub(super) async fn load_bots(
    backing: &Backing,
    dir: &str,
) -> Result<(BTreeMap<String, (BotRecord, i64)>, i64), IssuerError> {
    let (entries, revision) = backing.kv.list(&format!("{dir}/bots/")).await?;
    let mut bots = BTreeMap::new();
    for entry in entries {
        if let Some(key) = instance_of_record(dir, &entry.key) {
            bots.insert(key, (backing.decode(&entry.key, &entry.value)?, entry.mod_revision));
        }
    }
    Ok((bots, revision))
}

/// The replica records under `dir`, by name (a record that does not decode is skipped).
pub(super) async fn load_replicas(
    backing: &Backing,
    dir: &str,
) -> Result<BTreeMap<String, ReplicaRecord>, IssuerError> {
    let (entries, _) = backing.kv.list(&format!("{dir}/replicas/")).await?;
    Ok(entries
        .iter()
        .filter_map(|e| {
            Some((
                replicas::name_of_record(dir, &e.key)?,
                backing.decode(&e.key, &e.value).ok()?,
            ))
        })
        .collect())
}

/// A trust domain's state, read from the store (the CA and JWT key created on first use).
pub(super) async fn load_state(backing: &Backing, policy: Policy) -> Result<(State, i64), IssuerError> {
    let td = policy.trust_domain.clone();
    let dir = dir_of(&td);
    bots::migrate_ledgers(backing, &dir).await?;
    // Listed first: the watch starts after this revision, so no later change is missed.
    let (bots, revision) = load_bots(backing, &dir).await?;
    let authority = Authority::load_or_create(backing, &td, &policy.ca, now()).await?;
    let jwt = JwtKeys::load_or_create(backing, &td, &policy.jwt, now()).await?;
    let replicas = load_replicas(backing, &dir).await?;
    let state = State {
        policy: Arc::new(policy),
        authority,
        jwt,
        federated: BTreeMap::new(),
        bots,
        replicas,
        verified: HashMap::new(),
        served: Default::default(),
        crls: None,
        sequence: 1,
        stored_revocations: super::revocations::load(backing, &dir).await?,
    };
    Ok((state, revision))
}

/// Follows the store from revision `from`: every change under the trust domain's directory reaches
/// memory. A broken watch (store down, history compacted) lists again and watches from there.
pub(super) async fn follow(inner: Weak<Inner>, dir: String, mut from: i64) {
    let mut delay = Duration::from_millis(250);
    loop {
        let Some(backing) = inner.upgrade().map(|i| i.backing.clone()) else {
            return;
        };
        let watched = backing.kv.watch(&format!("{dir}/"), from).await;
        // Not held while waiting: the store (and a directory's lock) goes with the issuer.
        drop(backing);
        match watched {
            Ok(mut rx) => {
                while let Some(item) = rx.recv().await {
                    let Some(strong) = inner.upgrade() else { return };
                    match item {
                        Ok(events) => {
                            if let Some(last) = events.last() {
                                from = last.revision() + 1;
                            }
                            strong.apply(events).await;
                            delay = Duration::from_millis(250);
                        }
                        Err(StoreError::Compacted { .. }) => break,
                        Err(e) => {
                            tracing::warn!(error = %e, "the store's watch broke; listing again");
                            break;
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot watch the store; retrying"),
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(10));
        let Some(strong) = inner.upgrade() else { return };
        match strong.resync().await {
            Ok(revision) => from = revision + 1,
            Err(e) => tracing::warn!(error = %e, "cannot list the store; retrying"),
        }
    }
}
impl Inner {
    /// Applies the store's changes (own writes and other replicas') to memory.
    pub(super) async fn apply(&self, events: Vec<Event>) {
        let mut reload_ca = false;
        let mut reload_jwt = false;
        let mut locked = false;
        let mut revocations = false;
        {
            let mut state = self.lock();
            let dir = state.dir();
            let ca_key = format!("{dir}/ca.json");
            let jwt_key = format!("{dir}/jwt.json");
            for event in events {
                let key = event.key().to_owned();
                if key == ca_key {
                    reload_ca |= event.revision() > state.authority.revision();
                } else if key == jwt_key {
                    reload_jwt |= event.revision() > state.jwt.revision();
                } else if let Some(instance) = instance_of_record(&dir, &key) {
                    match event {
                        Event::Put(entry) => match self.backing.decode::<BotRecord>(&key, &entry.value) {
                            Ok(record) => locked |= state.remember(instance, record, entry.mod_revision),
                            Err(e) => tracing::warn!(error = %e, "a bot instance record in the store does not decode"),
                        },
                        Event::Delete { .. } => {
                            state.bots.remove(&instance);
                        }
                    }
                } else if let Some(name) = super::revocations::id_of_record(&dir, &key) {
                    revocations = true;
                    match event {
                        Event::Put(entry) => match self.backing.decode(&key, &entry.value) {
                            Ok(record) => {
                                state.stored_revocations.insert(name, record);
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "a stored revocation does not decode; it is not listed")
                            }
                        },
                        Event::Delete { .. } => {
                            state.stored_revocations.remove(&name);
                        }
                    }
                } else if let Some(name) = replicas::name_of_record(&dir, &key) {
                    match event {
                        Event::Put(entry) => {
                            if let Ok(record) = self.backing.decode::<ReplicaRecord>(&key, &entry.value) {
                                state.replicas.insert(name, record);
                            }
                        }
                        Event::Delete { .. } => {
                            state.replicas.remove(&name);
                        }
                    }
                }
            }
            if revocations {
                self.publish(&mut state);
            }
        }
        if locked {
            self.locks.send_modify(|n| *n += 1);
        }
        if reload_ca {
            self.reload_authority().await;
        }
        if reload_jwt {
            self.reload_jwt().await;
        }
    }

    /// Loads `jwt.json` again after another writer changed it (a rotation step elsewhere).
    pub(super) async fn reload_jwt(&self) {
        let td = self.lock().policy.trust_domain.clone();
        let fresh = match JwtKeys::load(&self.backing, &td).await {
            Ok(Some(fresh)) => fresh,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "cannot load the JWT keys another replica changed; keeping the ones in memory");
                return;
            }
        };
        let mut state = self.lock();
        if fresh.revision() <= state.jwt.revision() || td != state.policy.trust_domain {
            return;
        }
        if self.backing.local {
            tracing::info!(
                keys = fresh.jwks().len(),
                "the JWT keys changed in the store; taking them"
            );
        } else {
            tracing::info!(
                keys = fresh.jwks().len(),
                "the JWT keys changed in the store (a rotation step by another replica)"
            );
        }
        state.jwt = fresh;
        self.publish(&mut state);
        drop(state);
        self.reschedule.notify_one();
    }

    /// Loads `ca.json` again after another writer changed it: a rotation or prune elsewhere changes
    /// the bundle (published to every agent); an `issued_until` note merges.
    pub(super) async fn reload_authority(&self) {
        let td = self.lock().policy.trust_domain.clone();
        let fresh = match Authority::load(&self.backing, &td).await {
            Ok(Some(fresh)) => fresh,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "cannot load the CA another replica changed; keeping the one in memory");
                return;
            }
        };
        let mut state = self.lock();
        if fresh.revision() <= state.authority.revision() || fresh.trust_domain() != state.authority.trust_domain() {
            return;
        }
        if state.authority.same_cas(&fresh) {
            let mut mine = state.authority.clone();
            mine.merge_from(fresh);
            state.authority = mine;
        } else {
            if self.backing.local {
                tracing::info!(cas = fresh.cas().len(), "the CA changed in the store; taking it");
            } else {
                tracing::info!(
                    cas = fresh.cas().len(),
                    "the CA changed in the store (a rotation by another replica)"
                );
            }
            state.authority = fresh;
            state.verified.clear();
            self.publish(&mut state);
            drop(state);
            self.reschedule.notify_one();
        }
    }

    /// Reads the bot instances and replica records again (after a watch broke or history was
    /// compacted: deletes in between were missed).
    pub(super) async fn resync(&self) -> Result<i64, IssuerError> {
        let dir = self.lock().dir();
        let (bots, revision) = load_bots(&self.backing, &dir).await?;
        let replicas = load_replicas(&self.backing, &dir).await?;
        let stored = super::revocations::load(&self.backing, &dir).await?;
        {
            let mut state = self.lock();
            if state.dir() == dir {
                state.bots = bots;
                state.replicas = replicas;
                if state.stored_revocations != stored {
                    state.stored_revocations = stored;
                    self.publish(&mut state);
                }
            }
        }
        self.reload_authority().await;
        Ok(revision)
    }
}
