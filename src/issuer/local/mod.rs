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
//!
//! Split by concern: [`view`] (memory), [`follower`] (the store into memory), [`keys`] (key
//! lifecycle, one scheduler), [`joins`] (joins and renewals), [`federations`] (foreign bundles).

mod evidence;
mod federations;
mod follower;
mod joins;
mod keys;
mod locks;
mod revocations;
mod view;

pub use self::view::Authenticated;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use base64::Engine;
use time::OffsetDateTime;
use tokio::sync::watch;

use crate::issuer::bots::{BotClaims, BotRecord};
use crate::issuer::keys::ca::Authority;
use crate::issuer::keys::jwt::JwtKeys;
use crate::issuer::keys::mint;
use crate::issuer::policy::decide::{self, Attributes};
use crate::issuer::state::backing::Backing;
use crate::issuer::state::issued::{IssuanceLog, IssuedKind};
use crate::issuer::state::replicas::ReplicaRecord;
use crate::issuer::{
    BotCertificate, Bundles, IdentitySelector, Issuer, IssuerError, JoinProof, JoinRequest, JwtRequest, JwtSvid,
    Policy, RenewRequest, Resolution, Resolved, X509Request, X509Svid,
};
use crate::resource::spiffe_id::TrustDomain;
use crate::store::Store;

use self::evidence::{Crls, flush_issued};
use self::follower::{follow, load_state};
use self::keys::schedule;

/// How long an `iam` challenge may wait for its join.
const CHALLENGE_TTL: time::Duration = time::Duration::minutes(5);
/// How many `iam` challenges may wait at once (each is 32 random bytes and a timestamp).
const MAX_CHALLENGES: usize = 10_000;
/// Verified bot certificates remembered, so issuance does not verify a signature every time: room
/// for every agent of a large fleet (each entry is its claims, a few hundred bytes).
const VERIFIED_CACHE: usize = 32_768;
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
    /// Verified bot certificates by SHA-256: their claims, expiry and the id of the CA that signed.
    verified: HashMap<[u8; 32], (Arc<BotClaims>, OffsetDateTime, u32)>,
    sequence: u64,
    /// The bundles of the trust domains this one federates with.
    federated: BTreeMap<String, Arc<crate::issuer::TrustBundle>>,
    /// The keys of the serving certificates and bundle-endpoint SVIDs this process minted (the
    /// latest [`SERVED_KEYS`]): no bot gets them certified.
    served: std::collections::VecDeque<crate::issuer::keys::public::Key>,
    /// The signed CRLs (none only until the first publish).
    crls: Option<Crls>,
    /// The revocations in the store (every replica's), by id (the SHA-256 of the name).
    stored_revocations: BTreeMap<String, revocations::StoredRevocation>,
}

/// Serving keys remembered (a serving certificate is renewed every few hours).
const SERVED_KEYS: usize = 16;

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
    /// What was issued, to whom.
    issued: IssuanceLog,
    /// When each serial a `revocation` names expires, once the log told (see [`Inner::revoked`]).
    revoked_expiries: Mutex<HashMap<String, OffsetDateTime>>,
    metrics: std::sync::RwLock<crate::issuer::metrics::IssuerMetrics>,
    /// What the agent in this process last reported holding (`bot/instance`, holdings).
    local_held: Mutex<Option<(String, crate::issuer::Holdings)>>,
    /// When this replica first applied each revocation document not in the store yet.
    first_seen: Mutex<HashMap<String, OffsetDateTime>>,
    /// Sharing a revocation through the store failed: tried again each second.
    share_failed: AtomicBool,
}

/// The issuer, in this process.
pub struct LocalIssuer {
    inner: Arc<Inner>,
    /// Follows the store's changes (other replicas' writes) into memory.
    follower: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Steps the CA's and the JWT key's rotations when they are due.
    schedule: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Writes the issuance log.
    flusher: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// One task per foreign trust domain, keeping its bundle.
    federations: Mutex<BTreeMap<String, crate::issuer::federation::Running>>,
}

impl Drop for LocalIssuer {
    /// Stops its tasks and closes its store: an aborted task may hold the issuer's state until it
    /// is next polled, but the store has let go of the storage directory when this returns (its
    /// lock goes with it unless another part of the daemon, such as the agent, holds it too).
    fn drop(&mut self) {
        for task in [&self.follower, &self.schedule, &self.flusher] {
            if let Some(task) = task.lock().expect("task poisoned").take() {
                task.abort();
            }
        }
        self.inner.backing.kv.close();
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

use crate::rfc3339;

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("issuer state poisoned")
    }

    fn publish(&self, state: &mut State) {
        state.sequence += 1;
        let revoked = self.revoked(state);
        state.update_crls(revoked);
        if let Some(crls) = &state.crls {
            let metrics = self.metrics();
            metrics.revoked.set(crls.revoked.len() as i64);
            metrics
                .crl_bytes
                .set(crls.crls.iter().map(Vec::len).sum::<usize>() as i64);
            metrics.crl_signed.set(crls.signed_at.unix_timestamp());
        }
        self.bundles.send_replace(Arc::new(state.bundles()));
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
        let td = state.policy.trust_domain.as_str();
        let issued = match IssuanceLog::open(backing.kv.clone(), td).await {
            Ok(log) => log,
            // The log is evidence, not state issuance needs: the issuer starts without reading it.
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the issuance log; starting without what it holds (tbotctl get svids reads it again)");
                IssuanceLog::unread(backing.kv.clone(), td)
            }
        };
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
            issued,
            revoked_expiries: Mutex::new(HashMap::new()),
            metrics: Default::default(),
            local_held: Mutex::new(None),
            first_seen: Mutex::new(HashMap::new()),
            share_failed: AtomicBool::new(false),
        });
        // The first bundle with the CRLs (of the revocations already in force, or none), and this
        // replica's revocations shared with the others.
        inner.publish(&mut inner.lock());
        let policy = inner.lock().policy.clone();
        inner.issued.set_limits(policy.issuance_log.0, policy.issuance_log.1);
        inner.share_revocations(&BTreeMap::new(), &policy).await;
        // Without a runtime (a synchronous harness) nothing else writes the store: no follower.
        let runtime = tokio::runtime::Handle::try_current().ok();
        let task = runtime
            .as_ref()
            .map(|runtime| runtime.spawn(follow(Arc::downgrade(&inner), dir, revision + 1)));
        let schedule = runtime
            .as_ref()
            .map(|runtime| runtime.spawn(schedule(Arc::downgrade(&inner))));
        let flusher = runtime.map(|runtime| runtime.spawn(flush_issued(Arc::downgrade(&inner))));
        let issuer = LocalIssuer {
            inner,
            follower: Mutex::new(task),
            schedule: Mutex::new(schedule),
            flusher: Mutex::new(flusher),
            federations: Mutex::new(BTreeMap::new()),
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            issuer.sync_federations();
        }
        Ok(issuer)
    }

    /// The issuance log's records that `filter` keeps, oldest first.
    pub async fn issued(
        &self,
        filter: &crate::issuer::state::issued::Filter,
    ) -> Result<Vec<crate::issuer::state::issued::Issued>, IssuerError> {
        Ok(self.inner.issued.list(filter).await?)
    }

    /// Counts into `metrics` from now on (registered at boot), and fills its gauges now.
    pub fn set_metrics(&self, metrics: crate::issuer::metrics::IssuerMetrics) {
        *self.inner.metrics.write().expect("metrics poisoned") = metrics;
        self.inner.publish(&mut self.lock());
    }

    /// Writes what the issuance log holds now (before a stop).
    pub async fn flush_issued(&self) -> Result<(), IssuerError> {
        Ok(self.inner.issued.flush().await?)
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

    /// What the agent in this process last reported holding (`bot/instance`, holdings).
    pub fn local_holdings(&self) -> Option<(String, crate::issuer::Holdings)> {
        self.inner.local_held.lock().expect("holdings poisoned").clone()
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
    /// The refusal of a bot certificate that a `revocation` names or whose instance is locked; `None`
    /// for any other outcome (a certificate renewed since keeps its open stream until it reconnects).
    pub fn revoked_or_locked(&self, der: &[u8]) -> Option<IssuerError> {
        let mut state = self.lock();
        if let Err(e) = state.not_revoked(der) {
            return Some(e);
        }
        match state.authenticate(der) {
            Err(e @ IssuerError::Locked { .. }) => Some(e),
            _ => None,
        }
    }

    pub fn authenticate(&self, der: &[u8]) -> Result<Arc<BotClaims>, IssuerError> {
        self.lock().authenticate(der)
    }

    /// [`LocalIssuer::authenticate`], with the id of the CA that signed the certificate.
    pub fn authenticate_signed(&self, der: &[u8]) -> Result<Authenticated, IssuerError> {
        self.lock().authenticate_signed(der)
    }

    /// The ids of the CAs that `asked` would withdraw from the bundles now (none if it withdraws
    /// nothing): every replaced CA for a forced retire, the tainted ones for a revoke.
    pub fn withdrawn_cas(&self, asked: crate::issuer::keys::rotation::ByHand) -> Vec<u32> {
        use crate::issuer::keys::rotation::Step;
        let state = self.lock();
        match state.authority.by_hand(asked, now()) {
            Ok(Step::RetireEarly) => state.authority.retiring(),
            Ok(Step::Revoke) => state.authority.tainted(),
            _ => Vec::new(),
        }
    }

    /// A serving certificate for the issuer API.
    pub fn serving_certificate(
        &self,
        names: &[String],
        ttl: Duration,
    ) -> Result<mint::ServingCertificate, IssuerError> {
        let mut state = self.lock();
        let minted = mint::serving_certificate(&state.authority, names, ttl, now())?;
        state.remember_served(&minted.certificate);
        Ok(minted)
    }

    /// The bundle endpoint's X509-SVID, `spiffe://<trust domain>/tbot/bundle-endpoint`.
    pub fn endpoint_svid(&self, ttl: Duration) -> Result<mint::ServingCertificate, IssuerError> {
        let state = self.lock();
        let id = format!("spiffe://{}/tbot/bundle-endpoint", state.policy.trust_domain.as_str());
        let minted = mint::endpoint_svid(&state.authority, &id, ttl, now())?;
        let mut state = state;
        state.remember_served(&minted.certificate);
        Ok(minted)
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
            self.inner
                .issued
                .set_limits(policy.issuance_log.0, policy.issuance_log.1);
            let before = {
                let mut state = self.lock();
                let before = std::mem::replace(&mut state.policy, Arc::new(policy));
                if before.revocations != state.policy.revocations {
                    self.inner.publish(&mut state);
                    Some((before, state.policy.clone()))
                } else {
                    None
                }
            };
            if let Some((before, after)) = before {
                self.inner.share_revocations(&before.revocations, &after).await;
            }
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

    /// The current bundle.
    pub fn current_bundles(&self) -> Arc<Bundles> {
        self.inner.bundles.borrow().clone()
    }
}

#[async_trait::async_trait]
impl Issuer for LocalIssuer {
    async fn challenge(&self) -> Result<String, IssuerError> {
        let mut bytes = [0u8; 32];
        crate::issuer::keys::random(&mut bytes)?;
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
            JoinProof::Token => self.join_token(&request).await.map(|(cert, _)| cert),
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
    ) -> Result<Resolution, IssuerError> {
        let mut state = self.lock();
        let names = match selector {
            IdentitySelector::Name(name) => {
                state.decide(bot_certificate, name, workload)?;
                vec![name.clone()]
            }
            IdentitySelector::Labels(labels) => {
                let claims = state.authenticate(bot_certificate)?;
                let attrs = state.attributes(&claims, workload)?;
                let decisions = decide::select(&state.policy, &claims.bot, labels, &attrs)?;
                decisions.into_iter().map(|d| d.identity).collect()
            }
        };
        let reads = |name: &str| {
            state
                .policy
                .identities
                .get(name)
                .map(|wi| wi.reads())
                .unwrap_or_default()
        };
        // What the answer depends on besides the bot: the rules and templates of every identity
        // the selector could pick (the roles read no workload attributes). Worked out when each
        // identity was loaded; only names not seen yet are copied.
        let mut decided_on: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
        let mut add = |read: &[String]| {
            for attribute in read {
                if !decided_on.contains(attribute) {
                    decided_on.insert(attribute.clone());
                }
            }
        };
        match selector {
            IdentitySelector::Name(name) => add(reads(name)),
            IdentitySelector::Labels(labels) => {
                for wi in state.policy.identities.values() {
                    if labels.iter().all(|(k, v)| wi.metadata.labels.get(k) == Some(v)) {
                        add(wi.reads());
                    }
                }
            }
        }
        Ok(Resolution {
            identities: names
                .into_iter()
                .map(|name| Resolved {
                    reads: reads(&name).to_vec(),
                    name,
                })
                .collect(),
            decided_on: Some(decided_on.into_iter().collect()),
        })
    }

    async fn issue_x509(&self, request: X509Request) -> Result<X509Svid, IssuerError> {
        let (svid, record) = {
            let mut state = self.lock();
            let (decision, claims) = state.decide(&request.bot_certificate, &request.identity, &request.workload)?;
            let key = state.check_key(&request.public_key)?;
            let minted = mint::x509_svid(
                &state.authority,
                decision,
                &request.public_key,
                &key,
                request.ttl,
                now(),
            )?;
            let kind = IssuedKind::X509Svid;
            let record = state.issued(
                kind,
                &claims,
                (&minted.made.identity, &minted.made.spiffe_id),
                &request.workload,
                minted.serial,
                minted.made.not_after,
            );
            (minted.made, record)
        };
        self.inner.record(record);
        self.inner.note_issued(svid.not_after);
        Ok(svid)
    }

    async fn issue_jwt(&self, request: JwtRequest) -> Result<JwtSvid, IssuerError> {
        let (svid, record) = {
            let mut state = self.lock();
            let (decision, claims) = state.decide(&request.bot_certificate, &request.identity, &request.workload)?;
            let minted = mint::jwt_svid(
                state.jwt.active(),
                state.policy.jwt_issuer.as_deref(),
                decision,
                &request.audience,
                request.ttl,
                now(),
            )?;
            let kind = IssuedKind::JwtSvid;
            let mut record = state.issued(
                kind,
                &claims,
                (&minted.made.identity, &minted.made.spiffe_id),
                &request.workload,
                minted.serial,
                minted.made.expires,
            );
            record.audience = request.audience;
            (minted.made, record)
        };
        self.inner.record(record);
        Ok(svid)
    }

    async fn report(&self, bot_certificate: &[u8], holdings: crate::issuer::Holdings) -> Result<(), IssuerError> {
        let claims = self.authenticate(bot_certificate)?;
        *self.inner.local_held.lock().expect("holdings poisoned") =
            Some((format!("{}/{}", claims.bot, claims.instance), holdings));
        Ok(())
    }

    fn bundles(&self) -> watch::Receiver<Arc<Bundles>> {
        self.inner.bundles.subscribe()
    }
}
