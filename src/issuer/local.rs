//! The in-process issuer: one trust domain's CA, JWT key and bot instances over a [`Kv`] store
//! (a directory, memory, or etcd shared by several replicas), enforcing a `Policy` that the daemon
//! swaps on reload.
//!
//! What must be exact goes to the store in one conditional transaction: a token is consumed by
//! creating its record (one creator wins, on any replica), a generation moves by compare-and-swap on
//! the instance's record (a copied certificate loses the race and is locked), a CA is created or
//! rotated on the `ca.json` revision it was read at. What issuance reads — the policy, the CA, each
//! instance's generation and lock — is in memory, kept current by a watch on the store: SVIDs keep
//! flowing while the store is unreachable; only joins and renewals need it.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1, UnparsedPublicKey};
use base64::Engine;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::sync::watch;
use x509_parser::prelude::FromDer;

use super::backing::{Backing, json};
use super::bots::{
    self, BotClaims, BotRecord, Consumed, InstanceInfo, bot_record_key, instance_key, instance_of_record, token_key,
    token_record_key,
};
use super::ca::Authority;
use super::decide::{self, Attributes, Decision};
use super::jwt::JwtKeys;
use super::replicas::{self, ReplicaRecord};
use super::rotation::{KeyStatus, Step};
use super::{
    BotCertificate, Bundles, IdentitySelector, Issuer, IssuerError, JoinProof, JoinRequest, JwtRequest, JwtSvid,
    Policy, RenewRequest, Resolved, X509Request, X509Svid, join, mint,
};
use crate::aws::{self, AwsError};
use crate::kv::{Condition, Event, Op};
use crate::resource::agent::JoinMethod;
use crate::resource::spiffe_id::TrustDomain;
use crate::store::{Store, StoreError};

/// How long an `iam` challenge may wait for its join.
const CHALLENGE_TTL: time::Duration = time::Duration::minutes(5);
/// How many `iam` challenges may wait at once (each is 32 random bytes and a timestamp).
const MAX_CHALLENGES: usize = 10_000;
/// Verified bot certificates remembered, so issuance does not verify a signature every time.
const VERIFIED_CACHE: usize = 4096;
/// How long the generation a renewal replaced may still issue (not renew).
const REPLACED_GRACE: time::Duration = time::Duration::seconds(30);
/// How long after its certificate expired a bot instance is forgotten (unless locked).
const INSTANCE_RETENTION: time::Duration = time::Duration::days(1);
/// Conditional writes retried on a conflict before giving up (each retry re-reads).
const CONFLICT_RETRIES: usize = 8;

struct State {
    policy: Arc<Policy>,
    authority: Authority,
    jwt: JwtKeys,
    /// Each bot instance's record as the store has it, with its `mod_revision`, by instance key.
    bots: BTreeMap<String, (BotRecord, i64)>,
    /// Replica records seen in the store, by name.
    replicas: BTreeMap<String, ReplicaRecord>,
    verified: HashMap<[u8; 32], (BotClaims, OffsetDateTime)>,
    sequence: u64,
    /// The bundles of the trust domains this one federates with.
    federated: BTreeMap<String, Arc<super::TrustBundle>>,
}

struct Inner {
    backing: Backing,
    state: Mutex<State>,
    challenges: Mutex<HashMap<String, OffsetDateTime>>,
    bundles: watch::Sender<Arc<Bundles>>,
    policy_events: watch::Sender<Arc<PolicyEvent>>,
    /// Moves whenever an instance was locked: open streams of that instance end.
    locks: watch::Sender<u64>,
    /// A `ca.json` save is under way (one at a time, off the issuance path).
    saving: AtomicBool,
    /// Wakes the rotation schedule (the keys or the settings changed).
    reschedule: tokio::sync::Notify,
}

/// The issuer, in this process.
pub struct LocalIssuer {
    inner: Arc<Inner>,
    /// Follows the store's changes (other replicas' writes) into memory.
    follower: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Steps the CA's and the JWT key's rotations when they are due.
    schedule: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// One task per foreign trust domain, keeping its bundle.
    federations: Mutex<BTreeMap<String, super::federation::Running>>,
}

impl Drop for LocalIssuer {
    fn drop(&mut self) {
        for task in [&self.follower, &self.schedule] {
            if let Some(task) = task.lock().expect("task poisoned").take() {
                task.abort();
            }
        }
    }
}

/// A change of the documents that decide who gets what, as remote agents are told of it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PolicyEvent {
    /// Moves by one on every change.
    pub revision: u64,
    /// The identities whose SVIDs to re-decide.
    pub identities: std::collections::BTreeSet<String>,
    /// Re-decide every identity (an agent that missed revisions).
    pub all: bool,
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

/// The store directory of a trust domain's state: `issuer/<trust domain>`.
fn dir_of(td: &TrustDomain) -> String {
    format!("issuer/{}", td.as_str())
}

fn is_token(claims: &BotClaims) -> bool {
    claims.join.get("join.meta.join_method").map(String::as_str) == Some("token")
}

impl State {
    fn dir(&self) -> String {
        dir_of(&self.policy.trust_domain)
    }

    fn bundles(&self) -> Bundles {
        Bundles {
            trust_domain: self.authority.trust_domain().as_str().to_owned(),
            x509_authorities: self
                .authority
                .cas()
                .iter()
                .map(|ca| ca.certificate_der().to_vec())
                .collect(),
            jwt_keys: self.jwt.jwks(),
            sequence: self.sequence,
            active_ca: self.authority.active_index(),
            active_kid: self.jwt.active().kid().to_owned(),
            federated: self.federated.clone(),
        }
    }

    fn record(&self, key: &str) -> BotRecord {
        self.bots.get(key).map(|(r, _)| r.clone()).unwrap_or_default()
    }

    /// Takes a record read from or written to the store, unless memory already has a newer one.
    fn remember(&mut self, key: String, record: BotRecord, revision: i64) -> bool {
        if self.bots.get(&key).is_some_and(|(_, known)| *known >= revision) {
            return false;
        }
        let newly_locked = record.locked.is_some() && self.bots.get(&key).is_none_or(|(r, _)| r.locked.is_none());
        self.bots.insert(key, (record, revision));
        newly_locked
    }

    /// Verifies a bot certificate for issuance: ours, valid, not locked, not renewed since.
    fn authenticate(&mut self, der: &[u8]) -> Result<BotClaims, IssuerError> {
        let digest: [u8; 32] = Sha256::digest(der).into();
        let claims = match self.verified.get(&digest) {
            Some((claims, not_after)) if *not_after > now() => claims.clone(),
            _ => {
                let verified = bots::verify_bot_certificate(&self.authority, der, now())?;
                if self.verified.len() >= VERIFIED_CACHE {
                    self.verified.clear();
                }
                self.verified
                    .insert(digest, (verified.claims.clone(), verified.not_after));
                verified.claims
            }
        };
        if is_token(&claims) {
            let record = self.record(&claims.instance_key());
            if let Some(reason) = record.locked {
                return Err(IssuerError::Locked {
                    bot: claims.bot,
                    reason,
                });
            }
            let just_replaced = record
                .replaced
                .is_some_and(|(generation, until)| generation == claims.generation && now().unix_timestamp() < until);
            // A generation above the one in memory was signed by a replica whose write this one
            // has not seen yet: the signature proves it.
            if claims.generation < record.generation && !just_replaced {
                return Err(IssuerError::Unauthenticated(format!(
                    "the certificate is generation {}, and this instance of bot `{}` is at generation {}; it was renewed since",
                    claims.generation, claims.bot, record.generation
                )));
            }
        }
        Ok(claims)
    }

    /// The attributes a decision reads: the caller's `workload.*`, the bot's `user.*`, the join's `join.*`.
    fn attributes(&self, claims: &BotClaims, workload: &Attributes) -> Attributes {
        let mut attrs = workload.workload_only();
        attrs.set("user.name", format!("bot-{}", claims.bot));
        attrs.set("user.bot_name", &claims.bot);
        attrs.set("user.is_bot", true);
        if let Some(bot) = self.policy.bots.get(&claims.bot) {
            for (k, v) in &bot.metadata.labels {
                attrs.set(format!("user.labels.{k}"), v);
            }
            for t in &bot.spec.traits {
                attrs.set_many(format!("user.traits.{}", t.name), t.values.clone());
            }
        }
        attrs.extend(&claims.join_attributes());
        attrs
    }

    fn decide(&mut self, der: &[u8], identity: &str, workload: &Attributes) -> Result<Decision, IssuerError> {
        let claims = self.authenticate(der)?;
        let attrs = self.attributes(&claims, workload);
        decide::decide(&self.policy, &claims.bot, identity, &attrs).map_err(IssuerError::Denied)
    }

    fn bot_roles(&self, bot: &str) -> Result<Vec<String>, IssuerError> {
        let doc = self.policy.bots.get(bot).ok_or_else(|| {
            IssuerError::JoinRefused(format!("the token names bot `{bot}`, and there is no bot by that name"))
        })?;
        Ok(doc.spec.roles.iter().map(|r| r.to_string()).collect())
    }
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_default()
}

/// SHA-256 (hex) of a public key, as the ledger records it.
fn key_digest(public_key: &[u8]) -> String {
    crate::sha256_hex(public_key)
}

/// Checks that the holder of the certificate's key signed the new public key.
fn check_possession(certificate_spki: &[u8], message: &[u8], signature: &[u8]) -> Result<(), IssuerError> {
    let (_, spki) = x509_parser::x509::SubjectPublicKeyInfo::from_der(certificate_spki)
        .map_err(|_| IssuerError::Unauthenticated("the certificate's public key cannot be read".into()))?;
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, &spki.subject_public_key.data)
        .verify(message, signature)
        .map_err(|_| IssuerError::Unauthenticated("the renewal was not signed with the certificate's key".into()))
}

/// Reads a bot instance's record from the store: the record (default when there is none) and its
/// `mod_revision` (0: none).
async fn read_record(backing: &Backing, file: &str) -> Result<(BotRecord, i64), IssuerError> {
    Ok(backing.get_json::<BotRecord>(file).await?.unwrap_or_default())
}

/// Writes a bot instance's record if it is still at `revision` (0: absent): the revision written,
/// or `None` when someone else wrote it since (read again and decide again).
async fn put_if_unchanged(
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
async fn load_bots(backing: &Backing, dir: &str) -> Result<(BTreeMap<String, (BotRecord, i64)>, i64), IssuerError> {
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
async fn load_replicas(backing: &Backing, dir: &str) -> Result<BTreeMap<String, ReplicaRecord>, IssuerError> {
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
async fn load_state(backing: &Backing, policy: Policy) -> Result<(State, i64), IssuerError> {
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
        sequence: 1,
    };
    Ok((state, revision))
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("issuer state poisoned")
    }

    fn publish(&self, state: &mut State) {
        state.sequence += 1;
        self.bundles.send_replace(Arc::new(state.bundles()));
    }

    /// Signs a bot certificate with the CA in memory, noting its expiry.
    fn sign_bot(
        self: &Arc<Self>,
        claims: &BotClaims,
        public_key: &[u8],
        ttl: Duration,
    ) -> Result<BotCertificate, IssuerError> {
        let authority = self.lock().authority.clone();
        let cert = bots::sign_bot_certificate(&authority, claims, public_key, ttl, now())?;
        self.note_issued(cert.not_after);
        Ok(cert)
    }

    /// Records the expiry of something the active CA signed (see [`Authority::note_issued`]). When a
    /// write is due: a store in this process is written at once; a shared one in the background, so
    /// that issuance never waits for (or fails with) etcd.
    fn note_issued(self: &Arc<Self>, not_after: OffsetDateTime) {
        let due = self.lock().authority.note_issued(not_after);
        if !due {
            return;
        }
        // A store in this process answers at once: write now, as part of the call.
        if self.backing.local {
            use futures_util::FutureExt;
            if let Some(Err(e)) = self.save_authority().now_or_never() {
                tracing::warn!(error = %e, "cannot record the CA's issued-until; retrying at the next issuance");
            }
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if !self.saving.swap(true, Ordering::SeqCst) {
            let inner = Arc::downgrade(self);
            runtime.spawn(async move {
                let Some(inner) = inner.upgrade() else { return };
                if let Err(e) = inner.save_authority().await {
                    tracing::warn!(error = %e, "cannot record the CA's issued-until in the store; retrying at the next issuance");
                }
                inner.saving.store(false, Ordering::SeqCst);
            });
        }
    }

    /// Writes the in-memory `ca.json` (its `issued_until`), merging with another replica's newer one.
    async fn save_authority(&self) -> Result<(), IssuerError> {
        let mut copy = self.lock().authority.clone();
        for _ in 0..CONFLICT_RETRIES {
            if copy.save(&self.backing, Vec::new()).await? {
                // Memory takes the saved revision, keeping any note made since the copy was taken.
                let mut state = self.lock();
                if copy.revision() > state.authority.revision() && state.authority.same_cas(&copy) {
                    let mut mine = state.authority.clone();
                    mine.merge_from(copy);
                    state.authority = mine;
                }
                return Ok(());
            }
            let td = copy.trust_domain().clone();
            let Some(fresh) = Authority::load(&self.backing, &td).await? else {
                return Ok(());
            };
            if !fresh.same_cas(&copy) {
                // A rotation elsewhere: the watch brings it; the next note saves on top of it.
                return Ok(());
            }
            copy.merge_from(fresh);
        }
        Err(IssuerError::Unavailable(
            "ca.json keeps changing under this replica".into(),
        ))
    }

    /// Applies the store's changes (own writes and other replicas') to memory.
    async fn apply(&self, events: Vec<Event>) {
        let mut reload_ca = false;
        let mut reload_jwt = false;
        let mut locked = false;
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

    /// Sets (or, `None`, withdraws) a foreign trust domain's bundle, publishing it when it changed.
    fn set_federated(&self, trust_domain: &str, bundle: Option<Arc<super::TrustBundle>>) {
        let mut state = self.lock();
        let changed = match bundle {
            Some(b) => state.federated.insert(trust_domain.to_owned(), b.clone()).as_deref() != Some(&*b),
            None => state.federated.remove(trust_domain).is_some(),
        };
        if changed {
            self.publish(&mut state);
        }
    }

    /// Loads `jwt.json` again after another writer changed it (a rotation step elsewhere).
    async fn reload_jwt(&self) {
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
        tracing::info!(
            keys = fresh.jwks().len(),
            "the JWT keys changed in the store (a rotation step by another replica)"
        );
        state.jwt = fresh;
        self.publish(&mut state);
        drop(state);
        self.reschedule.notify_one();
    }

    /// Takes one rotation step of the CA (`jwt`: of the JWT key) if it is still what the keys in
    /// memory call for (`None`: the schedule's own due step; `Some`: a step by hand, checked by
    /// `check` against the keys as they are when written). Conditional on the store's revision;
    /// when another replica wrote first, memory takes its keys and the step is decided again.
    async fn step(
        &self,
        jwt: bool,
        decide: impl Fn(&State) -> Result<Option<Step>, String>,
    ) -> Result<Option<Step>, IssuerError> {
        for _ in 0..CONFLICT_RETRIES {
            let (step, settings) = {
                let state = self.lock();
                let step = decide(&state).map_err(IssuerError::Invalid)?;
                (step, state.policy.clone())
            };
            let Some(step) = step else { return Ok(None) };
            let written = if jwt {
                let current = self.lock().jwt.clone();
                let (mut next, ops) = current.stepped(&self.backing, step, &settings.jwt, now())?;
                let written = next.save(&self.backing, ops).await?;
                if written {
                    self.lock().jwt = next;
                }
                written
            } else {
                let current = self.lock().authority.clone();
                let (mut next, ops) = current.stepped(&self.backing, step, &settings.ca, now())?;
                let written = next.save(&self.backing, ops).await?;
                if written {
                    let mut state = self.lock();
                    state.authority = next;
                    state.verified.clear();
                }
                written
            };
            if written {
                tracing::info!(key = if jwt { "jwt" } else { "ca" }, ?step, "rotation step taken");
                let mut state = self.lock();
                self.publish(&mut state);
                drop(state);
                self.reschedule.notify_one();
                return Ok(Some(step));
            }
            if jwt {
                self.reload_jwt().await;
            } else {
                self.reload_authority().await;
            }
        }
        Err(IssuerError::Unavailable(
            "the keys keep changing under this replica; retry".into(),
        ))
    }

    /// Loads `ca.json` again after another writer changed it: a rotation or prune elsewhere changes
    /// the bundle (published to every agent); an `issued_until` note merges.
    async fn reload_authority(&self) {
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
            tracing::info!(
                cas = fresh.cas().len(),
                "the CA changed in the store (a rotation by another replica)"
            );
            state.authority = fresh;
            state.verified.clear();
            self.publish(&mut state);
            drop(state);
            self.reschedule.notify_one();
        }
    }

    /// Reads the bot instances and replica records again (after a watch broke or history was
    /// compacted: deletes in between were missed).
    async fn resync(&self) -> Result<i64, IssuerError> {
        let dir = self.lock().dir();
        let (bots, revision) = load_bots(&self.backing, &dir).await?;
        let replicas = load_replicas(&self.backing, &dir).await?;
        {
            let mut state = self.lock();
            if state.dir() == dir {
                state.bots = bots;
                state.replicas = replicas;
            }
        }
        self.reload_authority().await;
        Ok(revision)
    }
}

/// Follows the store from revision `from`: every change under the trust domain's directory reaches
/// memory. A broken watch (store down, history compacted) lists again and watches from there.
async fn follow(inner: Weak<Inner>, dir: String, mut from: i64) {
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

/// The longest the schedule sleeps without looking again (a clock jump, a missed wake-up).
const SCHEDULE_RECHECK: Duration = Duration::from_secs(60);

/// Steps the CA's and the JWT key's rotations when they are due: wakes at the next due time (or
/// when the keys or the settings change), takes the step (one replica wins each by a conditional
/// write; the others take its keys from the store), and looks again. A failed step is retried.
async fn schedule(inner: Weak<Inner>) {
    let mut failures = 0u32;
    loop {
        let Some(strong) = inner.upgrade() else { return };
        let (ca_next, jwt_next) = {
            let state = strong.lock();
            (
                state.authority.due(&state.policy.ca, now()),
                state.jwt.due(&state.policy.jwt, now()),
            )
        };
        let mut wait = SCHEDULE_RECHECK;
        for (jwt, (step, next)) in [(false, ca_next), (true, jwt_next)] {
            if step.is_some() {
                let taken = strong
                    .step(jwt, |state| {
                        Ok(if jwt {
                            state.jwt.due(&state.policy.jwt, now()).0
                        } else {
                            state.authority.due(&state.policy.ca, now()).0
                        })
                    })
                    .await;
                match taken {
                    Ok(_) => {
                        failures = 0;
                        wait = Duration::ZERO;
                    }
                    Err(e) => {
                        failures += 1;
                        tracing::warn!(error = %e, hint = %e.hint(), key = if jwt { "jwt" } else { "ca" }, "a rotation step failed; retrying");
                        wait = wait.min(Duration::from_secs(1 << failures.min(5)));
                    }
                }
            } else if let Some(at) = next {
                let until = Duration::try_from(OffsetDateTime::from_unix_timestamp(at).unwrap_or(now()) - now())
                    .unwrap_or(Duration::ZERO);
                // A second late at most: the due time is in whole seconds.
                wait = wait.min(until + Duration::from_millis(50));
            }
        }
        if wait.is_zero() {
            continue;
        }
        // Held while waiting: the issuer's drop aborts this task.
        let notified = strong.reschedule.notified();
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = notified => {}
        }
    }
}

impl LocalIssuer {
    /// Opens the issuer over a local `store` (a directory or memory), creating the CA and JWT key
    /// of the policy's trust domain on first use.
    pub async fn open(store: Store, policy: Policy) -> Result<LocalIssuer, IssuerError> {
        LocalIssuer::open_backing(Backing::local(store)?, policy).await
    }

    /// Opens the issuer over any store (etcd for replicas).
    pub async fn open_backing(backing: Backing, policy: Policy) -> Result<LocalIssuer, IssuerError> {
        let (state, revision) = load_state(&backing, policy).await?;
        let dir = state.dir();
        let (bundles, _) = watch::channel(Arc::new(state.bundles()));
        let inner = Arc::new(Inner {
            backing,
            state: Mutex::new(state),
            challenges: Mutex::new(HashMap::new()),
            bundles,
            policy_events: watch::channel(Arc::new(PolicyEvent::default())).0,
            locks: watch::channel(0).0,
            saving: AtomicBool::new(false),
            reschedule: tokio::sync::Notify::new(),
        });
        // Without a runtime (a synchronous harness) nothing else writes the store: no follower.
        let runtime = tokio::runtime::Handle::try_current().ok();
        let task = runtime
            .as_ref()
            .map(|runtime| runtime.spawn(follow(Arc::downgrade(&inner), dir, revision + 1)));
        let schedule = runtime.map(|runtime| runtime.spawn(schedule(Arc::downgrade(&inner))));
        let issuer = LocalIssuer {
            inner,
            follower: Mutex::new(task),
            schedule: Mutex::new(schedule),
            federations: Mutex::new(BTreeMap::new()),
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            issuer.sync_federations();
        }
        Ok(issuer)
    }

    /// The store the issuer keeps its state in.
    pub fn backing(&self) -> &Backing {
        &self.inner.backing
    }

    /// Tells remote agents that the documents changed: they forget their resolutions and
    /// re-decide the SVIDs of `identities`.
    pub fn announce(&self, identities: std::collections::BTreeSet<String>) {
        self.inner.policy_events.send_modify(|event| {
            *event = Arc::new(PolicyEvent {
                revision: event.revision + 1,
                identities,
                all: false,
            })
        });
    }

    /// The last policy change, and every new one.
    pub fn policy_events(&self) -> watch::Receiver<Arc<PolicyEvent>> {
        self.inner.policy_events.subscribe()
    }

    /// Moves whenever an instance is locked (a copied identity, on this replica or another): whoever
    /// holds a connection for a certificate checks it again.
    pub fn locks(&self) -> watch::Receiver<u64> {
        self.inner.locks.subscribe()
    }

    /// Verifies a bot certificate as issuance does (ours, valid, not locked, not renewed since).
    pub fn authenticate(&self, der: &[u8]) -> Result<BotClaims, IssuerError> {
        self.lock().authenticate(der)
    }

    /// A serving certificate for the issuer API.
    pub fn serving_certificate(
        &self,
        names: &[String],
        ttl: Duration,
    ) -> Result<mint::ServingCertificate, IssuerError> {
        mint::serving_certificate(&self.lock().authority, names, ttl, now())
    }

    /// The bundle endpoint's X509-SVID, `spiffe://<trust domain>/tbot/bundle-endpoint`.
    pub fn endpoint_svid(&self, ttl: Duration) -> Result<mint::ServingCertificate, IssuerError> {
        let state = self.lock();
        let id = format!("spiffe://{}/tbot/bundle-endpoint", state.policy.trust_domain.as_str());
        mint::endpoint_svid(&state.authority, &id, ttl, now())
    }

    /// The bot instances (all, or one bot's), by instance key.
    pub fn instances(&self, bot: Option<&str>) -> Vec<(String, BotRecord)> {
        let state = self.lock();
        state
            .bots
            .iter()
            .filter(|(key, (record, _))| {
                bot.is_none_or(|b| record.info.as_ref().map_or(key.as_str() == b, |i| i.bot == b))
            })
            .map(|(k, (r, _))| (k.clone(), r.clone()))
            .collect()
    }

    /// The issuer replicas recorded in the store (with their heartbeats), by name.
    pub fn replicas(&self) -> Vec<ReplicaRecord> {
        self.lock().replicas.values().cloned().collect()
    }

    /// One replica's record, as the store has it.
    pub fn replica(&self, name: &str) -> Option<ReplicaRecord> {
        self.lock().replicas.get(name).cloned()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.lock()
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<Policy> {
        self.lock().policy.clone()
    }

    /// Swaps the policy. A new trust domain loads (or creates) that domain's CA and publishes its bundle.
    pub async fn set_policy(&self, policy: Policy) -> Result<(), IssuerError> {
        // New rotation settings are looked at at once.
        self.inner.reschedule.notify_one();
        if policy.trust_domain == self.lock().policy.trust_domain {
            self.lock().policy = Arc::new(policy);
            self.sync_federations();
            return Ok(());
        }
        let (fresh, revision) = load_state(&self.inner.backing, policy).await?;
        let dir = fresh.dir();
        {
            let mut state = self.lock();
            let sequence = state.sequence;
            *state = fresh;
            state.sequence = sequence;
            self.inner.publish(&mut state);
        }
        let task = tokio::spawn(follow(Arc::downgrade(&self.inner), dir, revision + 1));
        if let Some(old) = self.follower.lock().expect("follower poisoned").replace(task) {
            old.abort();
        }
        // Another trust domain's federations start afresh.
        self.federations.lock().expect("federations poisoned").clear();
        self.sync_federations();
        Ok(())
    }

    /// Starts, restarts or stops the federation tasks to match the policy's `spiffe_federation`
    /// documents; a removed domain's bundle is withdrawn from every workload at once.
    fn sync_federations(&self) {
        let (wanted, own, dir) = {
            let state = self.lock();
            (
                state.policy.federations.clone(),
                state.policy.trust_domain.clone(),
                state.dir(),
            )
        };
        let mut running = self.federations.lock().expect("federations poisoned");
        let gone: Vec<String> = running
            .iter()
            .filter(|(td, r)| wanted.get(*td) != Some(&r.spec))
            .map(|(td, _)| td.clone())
            .collect();
        for td in gone {
            running.remove(&td);
            if !wanted.contains_key(&td) {
                self.inner.set_federated(&td, None);
                let backing = self.inner.backing.clone();
                let key = super::federation::kept_key(&dir, &td);
                tokio::spawn(async move {
                    let _ = backing.kv.txn(vec![], vec![Op::Delete(key)]).await;
                });
                tracing::info!(trust_domain = %td, "federation removed; its bundle is withdrawn");
            }
        }
        for (td, spec) in wanted {
            if running.contains_key(&td) {
                continue;
            }
            if td == own.as_str() {
                tracing::warn!(trust_domain = %td, "a spiffe_federation names this issuer's own trust domain; ignored");
                continue;
            }
            let inner = Arc::downgrade(&self.inner);
            let name = td.clone();
            let publish: super::federation::Publish = Arc::new(move |bundle| {
                if let Some(inner) = inner.upgrade() {
                    inner.set_federated(&name, bundle);
                }
            });
            let started = super::federation::start(td.clone(), spec, self.inner.backing.clone(), dir.clone(), publish);
            running.insert(td, started);
        }
    }

    /// What each federation last did.
    pub fn federations(&self) -> Vec<super::federation::FederationState> {
        self.federations
            .lock()
            .expect("federations poisoned")
            .values()
            .map(|r| r.state.lock().expect("federation state poisoned").clone())
            .collect()
    }

    /// The bundle sequence the bundle endpoint serves: moves whenever the CAs or JWT keys change,
    /// on any replica (the store's revisions only grow).
    pub fn bundle_sequence(&self) -> u64 {
        let state = self.lock();
        (state.authority.revision().max(0) + state.jwt.revision().max(0)) as u64
    }

    /// A rotation by hand (`tbotctl rotate`) of the CA or (`jwt`) the JWT key: prepares a successor
    /// that activates after `grace`; refused while a rotation is in progress, unless `force`, which
    /// takes its next step now (activates the prepared key, or retires the old one).
    pub async fn rotate_by_hand(&self, jwt: bool, grace: Duration, force: bool) -> Result<Step, IssuerError> {
        let step = self
            .inner
            .step(jwt, |state| {
                if jwt {
                    state.jwt.by_hand(grace, force, now())
                } else {
                    state.authority.by_hand(grace, force, now())
                }
                .map(Some)
            })
            .await?;
        Ok(step.expect("a rotation by hand always decides a step"))
    }

    /// Every CA's and JWT key's phase and dates.
    pub fn key_statuses(&self) -> Vec<KeyStatus> {
        let state = self.lock();
        let mut out = state.authority.statuses();
        out.extend(state.jwt.statuses());
        out
    }

    /// Rotates the CA: a new CA signs from now on; both are in the bundle until everything the old
    /// one signed has expired ([`LocalIssuer::prune`] then drops it). With several replicas, the
    /// first to write wins; the others adopt its CA.
    pub async fn rotate_ca(&self) -> Result<(), IssuerError> {
        let backing = &self.inner.backing;
        for _ in 0..CONFLICT_RETRIES {
            let (current, settings) = {
                let state = self.lock();
                (state.authority.clone(), state.policy.ca.clone())
            };
            let (mut next, ops) = current.rotated(backing, &settings, now())?;
            if next.save(backing, ops).await? {
                let mut state = self.lock();
                state.authority = next;
                state.verified.clear();
                self.inner.publish(&mut state);
                return Ok(());
            }
            let active = current.active().certificate_der().to_vec();
            self.inner.reload_authority().await;
            if self.lock().authority.active().certificate_der() != active {
                // Another replica rotated at the same moment: one rotation, theirs.
                return Ok(());
            }
        }
        Err(IssuerError::Unavailable(
            "ca.json keeps changing under this replica".into(),
        ))
    }

    /// Rotates the CA for the policy's CA settings, unless the active CA already has them: every
    /// replica applies a `cluster` edit, and only the first to get there rotates (the others see its
    /// new CA, through the store, and do nothing). Returns whether this call rotated.
    pub async fn rotate_ca_for_settings(&self) -> Result<bool, IssuerError> {
        self.inner.reload_authority().await;
        let matches = {
            let state = self.lock();
            state.authority.active_matches(&state.policy.ca)
        };
        if matches {
            return Ok(false);
        }
        self.rotate_ca().await?;
        Ok(true)
    }

    /// Drops CAs whose overlap has ended (publishing the bundle when it changed) and forgets bot
    /// instances that expired a day ago.
    pub async fn prune(&self) -> Result<(), IssuerError> {
        let backing = &self.inner.backing;
        for _ in 0..CONFLICT_RETRIES {
            let mut copy = self.lock().authority.clone();
            if !copy.prune(now()) {
                break;
            }
            if copy.save(backing, Vec::new()).await? {
                let mut state = self.lock();
                state.authority = copy;
                state.verified.clear();
                self.inner.publish(&mut state);
                break;
            }
            self.inner.reload_authority().await;
        }
        let horizon = (now() - INSTANCE_RETENTION).unix_timestamp();
        let (dir, expired): (String, Vec<(String, i64)>) = {
            let state = self.lock();
            let expired = state
                .bots
                .iter()
                .filter(|(_, (r, _))| r.locked.is_none() && r.info.as_ref().is_some_and(|i| i.not_after <= horizon))
                .map(|(k, (_, rev))| (k.clone(), *rev))
                .collect();
            (state.dir(), expired)
        };
        for (key, revision) in expired {
            let file = bot_record_key(&dir, &key);
            let (deleted, _) = backing
                .kv
                .txn(
                    vec![Condition::ModRevision(file.clone(), revision)],
                    vec![Op::Delete(file)],
                )
                .await?;
            if deleted {
                self.lock().bots.remove(&key);
            }
        }
        Ok(())
    }

    /// The current bundle.
    pub fn current_bundles(&self) -> Arc<Bundles> {
        self.inner.bundles.borrow().clone()
    }

    fn take_challenge(&self, challenge: &str) -> Result<(), IssuerError> {
        let mut challenges = self.inner.challenges.lock().expect("challenges poisoned");
        let now = now();
        challenges.retain(|_, issued| *issued + CHALLENGE_TTL > now);
        challenges.remove(challenge).map(drop).ok_or_else(|| {
            IssuerError::JoinRefused(
                "challenge: it was not issued by this issuer, was already used, or is older than 5 minutes".into(),
            )
        })
    }

    /// A `token` join, after its terms were checked: consume the token and make a bot instance at
    /// generation 1, in one transaction that only one joiner of the token wins, on any replica. The
    /// same joiner retrying (the same key: its answer was lost, or the store applied a write that
    /// timed out) gets its instance's certificate again.
    async fn join_token(&self, request: &JoinRequest) -> Result<BotCertificate, IssuerError> {
        let refuse = IssuerError::JoinRefused;
        let (bot, roles, dir) = {
            let state = self.lock();
            let token = state.policy.tokens.get(&request.token).ok_or_else(|| {
                refuse(
                    "no token by that name exists (for `token` joins the name is the secret; check `onboarding.token`)"
                        .into(),
                )
            })?;
            join::check_token_terms(token, JoinMethod::Token, now()).map_err(refuse)?;
            let bot = token.spec.bot_name.to_string();
            (bot.clone(), state.bot_roles(&bot)?, state.dir())
        };
        let backing = &self.inner.backing;
        let token_file = token_record_key(&dir, &token_key(&request.token));
        let joiner = key_digest(&request.public_key);
        let instance = bots::new_instance_id()?;
        let record = BotRecord {
            generation: 1,
            info: Some(InstanceInfo {
                bot: bot.clone(),
                join_method: "token".into(),
                address: request.address.clone(),
                joined_at: rfc3339(now()),
                not_after: (now() + request.ttl.min(bots::MAX_BOT_TTL)).unix_timestamp(),
                ..InstanceInfo::default()
            }),
            locked: None,
            key: Some(joiner.clone()),
            replaced: None,
        };
        let consumed = Consumed {
            bot: bot.clone(),
            at: rfc3339(now()),
            key: Some(joiner.clone()),
            instance: Some(instance.clone()),
        };
        let key = instance_key(&bot, &instance);
        let bot_file = bot_record_key(&dir, &key);
        let (won, revision) = backing
            .kv
            .txn(
                vec![Condition::Absent(token_file.clone())],
                vec![Op::put(&token_file, json(&consumed)), Op::put(&bot_file, json(&record))],
            )
            .await?;
        let instance = if won {
            self.lock().remember(key, record, revision);
            instance
        } else {
            // Used: by this same joiner (the same key, the instance untouched since), or by another.
            let (used, _) = backing
                .get_json::<Consumed>(&token_file)
                .await?
                .ok_or_else(|| IssuerError::Unavailable("the token's record vanished during the join; retry".into()))?;
            let instance = used.instance.clone().unwrap_or_default();
            let key = instance_key(&bot, &instance);
            let (record, revision) = read_record(backing, &bot_record_key(&dir, &key)).await?;
            let retry = used.key.as_deref() == Some(joiner.as_str())
                && record.generation == 1
                && record.locked.is_none()
                && record.key.as_ref() == Some(&joiner);
            if !retry {
                return Err(refuse(format!(
                    "the token was already used by bot `{}` at {}; `token` joins are single-use: create a new token",
                    used.bot, used.at
                )));
            }
            self.lock().remember(key, record, revision);
            instance
        };
        let claims = BotClaims {
            bot,
            roles,
            generation: 1,
            join: [
                ("join.meta.join_method".to_owned(), "token".to_owned()),
                ("join.meta.join_token_name".to_owned(), request.token.clone()),
            ]
            .into(),
            instance,
        };
        self.inner.sign_bot(&claims, &request.public_key, request.ttl)
    }

    /// Renews a `token` bot: checks and moves the instance's generation by compare-and-swap on its
    /// record. Of two holders of one certificate, one wins and the other finds the generation moved:
    /// the instance is locked. The winner retrying with the same new key is signed again.
    async fn renew_token(&self, request: &RenewRequest) -> Result<BotCertificate, IssuerError> {
        let (verified, dir) = {
            let state = self.lock();
            (
                bots::verify_bot_certificate(&state.authority, &request.certificate, now())?,
                state.dir(),
            )
        };
        let (claims, spki) = (verified.claims, verified.public_key);
        if !is_token(&claims) {
            return Err(IssuerError::Unauthenticated(
                "only `token`-joined bots renew; `iam` bots join again".into(),
            ));
        }
        check_possession(&spki, &request.public_key, &request.proof)?;
        let bot = claims.bot.clone();
        let instance = claims.instance_key();
        let file = bot_record_key(&dir, &instance);
        let key = key_digest(&request.public_key);
        let backing = &self.inner.backing;
        for _ in 0..CONFLICT_RETRIES {
            let (record, revision) = read_record(backing, &file).await?;
            if let Some(reason) = record.locked {
                return Err(IssuerError::Locked { bot, reason });
            }
            // The holder retrying a renewal whose answer it lost: the previous generation, the same
            // new key. Sign that generation again.
            let retry = record.generation == claims.generation + 1 && record.key.as_deref() == Some(key.as_str());
            if record.generation != claims.generation && !retry {
                let reason = format!(
                    "a renewal presented generation {} while this instance of the bot is at generation {}: two \
                     holders share one identity",
                    claims.generation, record.generation
                );
                let locked = BotRecord {
                    locked: Some(reason.clone()),
                    ..record
                };
                let Some(at) = put_if_unchanged(backing, &file, revision, &locked).await? else {
                    continue;
                };
                self.lock().remember(instance, locked, at);
                self.inner.locks.send_modify(|n| *n += 1);
                return Err(IssuerError::Locked { bot, reason });
            }
            let roles = self.lock().bot_roles(&bot)?;
            let generation = if retry {
                record.generation
            } else {
                record.generation + 1
            };
            let info = record.info.clone().map(|info| InstanceInfo {
                address: if request.address.is_empty() {
                    info.address.clone()
                } else {
                    request.address.clone()
                },
                last_renewal: rfc3339(now()),
                not_after: (now() + request.ttl.min(bots::MAX_BOT_TTL)).unix_timestamp(),
                ..info
            });
            let next = BotRecord {
                generation,
                info,
                locked: None,
                key: Some(key.clone()),
                replaced: Some((generation - 1, (now() + REPLACED_GRACE).unix_timestamp())),
            };
            let Some(at) = put_if_unchanged(backing, &file, revision, &next).await? else {
                continue;
            };
            self.lock().remember(instance, next, at);
            let claims = BotClaims {
                roles,
                generation,
                ..claims
            };
            return self.inner.sign_bot(&claims, &request.public_key, request.ttl);
        }
        Err(IssuerError::Unavailable(format!(
            "the record of bot instance `{instance}` kept changing during the renewal; retry"
        )))
    }

    /// An `iam` join. `registered`: the challenge came from [`Issuer::challenge`] and is taken from
    /// the table; else it was made inside the caller's own join stream (the issuer API), which
    /// already guarantees it is fresh and used once.
    pub async fn join_iam(
        &self,
        request: &JoinRequest,
        challenge: &str,
        signed: &aws::SignedRequest,
        registered: bool,
    ) -> Result<BotCertificate, IssuerError> {
        let refuse = IssuerError::JoinRefused;
        let (token, sts_override) = {
            let state = self.lock();
            let token = state.policy.tokens.get(&request.token).cloned().ok_or_else(|| {
                refuse(format!(
                    "no token named `{}` exists; check `onboarding.token`",
                    request.token
                ))
            })?;
            (token, state.policy.sts_endpoint.clone())
        };
        join::check_token_terms(&token, JoinMethod::Iam, now()).map_err(refuse)?;
        let real_endpoint = join::check_signed_request(signed, challenge).map_err(refuse)?;
        if registered {
            self.take_challenge(challenge)?;
        }
        let endpoint = sts_override.unwrap_or(real_endpoint);
        let identity = aws::get_caller_identity(signed, &endpoint).await.map_err(|e| match e {
            AwsError::Refused(why) => refuse(format!("signature refused by STS: {why}")),
            AwsError::Malformed(why) => refuse(why),
            other => IssuerError::StsUnavailable(other),
        })?;
        join::check_allow(&token, &identity).map_err(refuse)?;
        let bot = token.spec.bot_name.to_string();
        let (roles, dir, kept) = {
            let state = self.lock();
            // A joiner that holds a certificate of this bot from an earlier `iam` join keeps its instance.
            let kept = request
                .current
                .as_deref()
                .and_then(|der| bots::verify_bot_certificate(&state.authority, der, now()).ok())
                .map(|v| v.claims)
                .filter(|c| c.bot == bot && c.join.get("join.meta.join_method").map(String::as_str) == Some("iam"))
                .map(|c| c.instance)
                .filter(|i| !i.is_empty());
            (state.bot_roles(&bot)?, state.dir(), kept)
        };
        let instance = match kept {
            Some(instance) => instance,
            None => bots::new_instance_id()?,
        };
        let key = instance_key(&bot, &instance);
        let file = bot_record_key(&dir, &key);
        let backing = &self.inner.backing;
        for _ in 0..CONFLICT_RETRIES {
            let (previous, revision) = read_record(backing, &file).await?;
            let generation = previous.generation + 1;
            let joined_at = previous
                .info
                .as_ref()
                .map_or_else(|| rfc3339(now()), |i| i.joined_at.clone());
            let record = BotRecord {
                generation,
                info: Some(InstanceInfo {
                    bot: bot.clone(),
                    join_method: "iam".into(),
                    iam_arn: identity.arn.clone(),
                    address: request.address.clone(),
                    joined_at,
                    last_renewal: if generation > 1 { rfc3339(now()) } else { String::new() },
                    not_after: (now() + request.ttl.min(bots::MAX_BOT_TTL)).unix_timestamp(),
                }),
                locked: None,
                key: Some(key_digest(&request.public_key)),
                replaced: None,
            };
            let Some(at) = put_if_unchanged(backing, &file, revision, &record).await? else {
                continue;
            };
            self.lock().remember(key, record, at);
            let claims = BotClaims {
                bot,
                roles,
                generation,
                join: [
                    ("join.meta.join_method".to_owned(), "iam".to_owned()),
                    ("join.meta.join_token_name".to_owned(), request.token.clone()),
                    ("join.iam.account".to_owned(), identity.account),
                    ("join.iam.arn".to_owned(), identity.arn),
                ]
                .into(),
                instance,
            };
            return self.inner.sign_bot(&claims, &request.public_key, request.ttl);
        }
        Err(IssuerError::Unavailable(format!(
            "the record of bot instance `{key}` kept changing during the join; retry"
        )))
    }
}

#[async_trait::async_trait]
impl Issuer for LocalIssuer {
    async fn challenge(&self) -> Result<String, IssuerError> {
        let mut bytes = [0u8; 32];
        aws_lc_rs::rand::fill(&mut bytes).map_err(|_| IssuerError::Crypto("the random generator failed".into()))?;
        let challenge = base64::engine::general_purpose::STANDARD.encode(bytes);
        let mut challenges = self.inner.challenges.lock().expect("challenges poisoned");
        let now = now();
        challenges.retain(|_, issued| *issued + CHALLENGE_TTL > now);
        if challenges.len() >= MAX_CHALLENGES {
            return Err(IssuerError::Invalid(format!(
                "{MAX_CHALLENGES} join challenges are already waiting; try again in a few minutes"
            )));
        }
        challenges.insert(challenge.clone(), now);
        Ok(challenge)
    }

    async fn join(&self, request: JoinRequest) -> Result<BotCertificate, IssuerError> {
        match &request.proof {
            JoinProof::Token => self.join_token(&request).await,
            JoinProof::Iam {
                challenge,
                request: signed,
            } => self.join_iam(&request, challenge, signed, true).await,
        }
    }

    async fn renew(&self, request: RenewRequest) -> Result<BotCertificate, IssuerError> {
        self.renew_token(&request).await
    }

    async fn resolve(
        &self,
        bot_certificate: &[u8],
        selector: &IdentitySelector,
        workload: &Attributes,
    ) -> Result<Vec<Resolved>, IssuerError> {
        let mut state = self.lock();
        let names = match selector {
            IdentitySelector::Name(name) => {
                state.decide(bot_certificate, name, workload)?;
                vec![name.clone()]
            }
            IdentitySelector::Labels(labels) => {
                let claims = state.authenticate(bot_certificate)?;
                let attrs = state.attributes(&claims, workload);
                let decisions =
                    decide::select(&state.policy, &claims.bot, labels, &attrs).map_err(IssuerError::Denied)?;
                decisions.into_iter().map(|d| d.identity).collect()
            }
        };
        Ok(names
            .into_iter()
            .map(|name| Resolved {
                reads: state
                    .policy
                    .identities
                    .get(&name)
                    .map(|wi| decide::workload_attributes_read(wi))
                    .unwrap_or_default(),
                name,
            })
            .collect())
    }

    async fn issue_x509(&self, request: X509Request) -> Result<X509Svid, IssuerError> {
        let svid = {
            let mut state = self.lock();
            let decision = state.decide(&request.bot_certificate, &request.identity, &request.workload)?;
            mint::x509_svid(&state.authority, &decision, &request.public_key, request.ttl, now())?
        };
        self.inner.note_issued(svid.not_after);
        Ok(svid)
    }

    async fn issue_jwt(&self, request: JwtRequest) -> Result<JwtSvid, IssuerError> {
        let mut state = self.lock();
        let decision = state.decide(&request.bot_certificate, &request.identity, &request.workload)?;
        mint::jwt_svid(
            state.jwt.active(),
            state.policy.jwt_issuer.as_deref(),
            &decision,
            &request.audience,
            request.ttl,
            now(),
        )
    }

    fn bundles(&self) -> watch::Receiver<Arc<Bundles>> {
        self.inner.bundles.subscribe()
    }
}
