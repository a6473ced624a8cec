//! The shared SVID cache. One X509-SVID per (workload identity, values of the `workload.*`
//! attributes it reads, lifetime), shared by every stream and connection that resolves to it; renewed
//! at half its lifetime (±10% jitter) and pushed to every subscriber through a `watch` channel.
//! A slot that nobody holds any more stays until it would be renewed, so sequential one-shot
//! callers (a cron job, py-spiffe's `fetch_x509_svid()`) share one issuance; then it goes instead of
//! renewing. At most [`MAX_IDLE_SLOTS`] idle slots are kept (the least recently used go first), so
//! callers with ever new attributes cannot grow the cache without limit. JWT-SVIDs are cached per
//! (identity, attributes, audiences) and served until half their lifetime or a re-decision, then
//! issued again; while the issuer cannot be reached the held one is served until it expires. At most
//! [`MAX_JWTS`] of them.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rcgen::{KeyPair, PublicKeyData};
use time::OffsetDateTime;
use tokio::sync::{Notify, watch};

use super::bot::{BotIdentity, jitter};
use crate::error::Explain;
use crate::issuer::{Attributes, Issuer, IssuerError, JwtRequest, JwtSvid, Resolved, X509Request, X509Svid};

/// An X509-SVID with its private key.
#[derive(Debug)]
pub struct X509Material {
    pub svid: X509Svid,
    /// PKCS#8 DER.
    pub key: Vec<u8>,
    /// The SPKI pin of the bundle's CA that signed it (empty if none did): what the agent reports
    /// it depends on, and how a tainted CA's SVIDs are found.
    pub signer: String,
    /// Its CA was tainted when it arrived: the slot issues again at once.
    pub tainted: bool,
}

/// What a cache slot holds.
#[derive(Debug, Clone)]
pub enum Slot {
    /// The first issuance is under way.
    Pending,
    Ready(Arc<X509Material>),
    /// Issuance failed and nothing valid is cached. `denied`: the caller may not have it at all;
    /// `transient`: the issuer could not be asked (a retry may pass).
    Failed {
        error: String,
        denied: bool,
        transient: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    identity: String,
    attributes: Attributes,
    ttl: Duration,
    /// Renew this often instead of at half the lifetime (an output's `renewal_interval`).
    renew_every: Option<Duration>,
}

/// Idle X509-SVID slots (no stream holds them) kept for the next caller, at most. An idle slot costs
/// about 1.5 KiB (certificate, key, the slot's task), so the bound is about 6 MiB.
pub const MAX_IDLE_SLOTS: usize = 4096;

/// Cached JWT-SVIDs, at most (about 1 KiB each); the ones that expire first go first.
pub const MAX_JWTS: usize = 4096;

/// A held JWT-SVID is served during an outage only with at least this much life left.
const JWT_MARGIN: time::Duration = time::Duration::seconds(5);

/// One slot in the cache: its channel, the wake-up that makes its task reissue (or leave) now, and
/// when a caller last subscribed (the least recently used idle slots are evicted first).
struct SlotHandle {
    tx: watch::Sender<Slot>,
    wake: Arc<Notify>,
    /// Tells this slot from a later one with the same key (its task removes only its own).
    id: u64,
    last_used: tokio::time::Instant,
}

/// A cached JWT-SVID: served until `fresh_until` (half its lifetime) unless re-decided since
/// (`stale`); after that it is issued again, and the held one is served only while the issuer cannot
/// be reached, until it expires (as a cached X509-SVID is).
struct HeldJwt {
    svid: JwtSvid,
    fresh_until: OffsetDateTime,
    stale: bool,
}

/// A JWT-SVID's cache key: the identity's key and the sorted audiences.
type JwtKey = (Key, Vec<String>);

/// The cache, shared by every service of the agent.
pub struct SvidCache {
    issuer: Arc<dyn Issuer>,
    bot: watch::Receiver<Arc<BotIdentity>>,
    /// Each slot's channel, and how to wake its task to reissue now.
    slots: Mutex<HashMap<Key, SlotHandle>>,
    /// JWT-SVIDs with the time they stop being served from the cache (half their lifetime).
    jwts: Mutex<HashMap<JwtKey, HeldJwt>>,
    issued: AtomicU64,
    next_slot_id: AtomicU64,
    metrics: super::AgentMetrics,
    /// Moves whenever what the cache holds changes (an SVID issued, a slot gone, a JWT-SVID kept
    /// or dropped): the agent's report to the issuer follows it.
    changes: watch::Sender<u64>,
}

/// How long an SVID waits for the bundle holding its CA.
const BUNDLE_WAIT: Duration = Duration::from_secs(10);

/// Whether one of the bundle's CAs is the issuer of `certificate` (by name: each CA's subject
/// names its trust domain and number).
pub fn covers(bundles: &crate::issuer::Bundles, certificate: &[u8]) -> bool {
    bundles.x509_authorities.iter().any(|ca| signed_by(certificate, ca))
}

/// Whether `ca` (DER) issued `certificate` (DER), by name (each CA's subject names its trust
/// domain and number).
pub fn signed_by(certificate: &[u8], ca: &[u8]) -> bool {
    let (Ok((_, cert)), Ok((_, ca))) = (
        x509_parser::parse_x509_certificate(certificate),
        x509_parser::parse_x509_certificate(ca),
    ) else {
        return false;
    };
    cert.issuer().as_raw() == ca.subject().as_raw()
}

pub use crate::issuer::keys::crl::serial_of;

/// Only the attributes an identity reads: callers that agree on them share an SVID.
fn project(resolved: &Resolved, workload: &Attributes) -> Attributes {
    let mut out = Attributes::new();
    for (name, values) in workload.iter() {
        if resolved.reads.iter().any(|r| r == name) {
            out.set_many(name, values.to_vec());
        }
    }
    out
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

fn remaining(until: OffsetDateTime) -> Duration {
    (until - now()).try_into().unwrap_or(Duration::ZERO)
}

impl SvidCache {
    pub fn new(
        issuer: Arc<dyn Issuer>,
        bot: watch::Receiver<Arc<BotIdentity>>,
        metrics: super::AgentMetrics,
    ) -> Arc<SvidCache> {
        Arc::new(SvidCache {
            issuer,
            bot,
            slots: Mutex::new(HashMap::new()),
            jwts: Mutex::new(HashMap::new()),
            issued: AtomicU64::new(0),
            next_slot_id: AtomicU64::new(0),
            metrics,
            changes: watch::channel(0).0,
        })
    }

    /// Moves whenever what the cache holds changes.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn changed(&self) {
        self.changes.send_modify(|n| *n += 1);
    }

    /// How many X509-SVIDs this cache has had issued (for tests and benchmarks).
    pub fn issued(&self) -> u64 {
        self.issued.load(Ordering::Relaxed)
    }

    /// The current bot certificate.
    pub fn bot_certificate(&self) -> Vec<u8> {
        self.bot.borrow().certificate.der.clone()
    }

    /// Subscribes to the X509-SVID of `resolved` for a caller with `workload`, issuing it if the
    /// cache does not hold it yet.
    pub fn x509(self: &Arc<Self>, resolved: &Resolved, workload: &Attributes, ttl: Duration) -> watch::Receiver<Slot> {
        self.x509_every(resolved, workload, ttl, None)
    }

    /// As [`SvidCache::x509`], renewed every `renew_every` (when shorter than half the lifetime).
    pub fn x509_every(
        self: &Arc<Self>,
        resolved: &Resolved,
        workload: &Attributes,
        ttl: Duration,
        renew_every: Option<Duration>,
    ) -> watch::Receiver<Slot> {
        let key = Key {
            identity: resolved.name.clone(),
            attributes: project(resolved, workload),
            ttl,
            renew_every,
        };
        let now = tokio::time::Instant::now();
        let mut slots = self.slots.lock().expect("cache poisoned");
        if let Some(handle) = slots.get_mut(&key) {
            handle.last_used = now;
            return handle.tx.subscribe();
        }
        evict_idle(&mut slots, MAX_IDLE_SLOTS - 1);
        let (tx, rx) = watch::channel(Slot::Pending);
        let wake = Arc::new(Notify::new());
        let id = self.next_slot_id.fetch_add(1, Ordering::Relaxed);
        slots.insert(
            key.clone(),
            SlotHandle {
                tx: tx.clone(),
                wake: wake.clone(),
                id,
                last_used: now,
            },
        );
        tokio::spawn(self.clone().keep_fresh(key, id, tx, wake));
        rx
    }

    /// How many X509-SVID slots the cache holds, and how many of them no stream holds.
    #[cfg(test)]
    fn slots(&self) -> (usize, usize) {
        let slots = self.slots.lock().expect("cache poisoned");
        let idle = slots.values().filter(|h| h.tx.receiver_count() == 0).count();
        (slots.len(), idle)
    }

    /// Every identity with a cached SVID.
    pub fn identities(&self) -> BTreeSet<String> {
        let mut out: BTreeSet<String> = self
            .slots
            .lock()
            .expect("cache poisoned")
            .keys()
            .map(|k| k.identity.clone())
            .collect();
        out.extend(
            self.jwts
                .lock()
                .expect("cache poisoned")
                .keys()
                .map(|(k, _)| k.identity.clone()),
        );
        out
    }

    /// Re-decides the cached SVIDs of these identities now (their documents or the rules that apply
    /// to them changed): each is reissued, or revoked if the caller may no longer have it. Held
    /// JWT-SVIDs too, in the background: reissued, dropped on a "no", and on an unreachable issuer
    /// kept only as a fallback for while it stays unreachable.
    /// Returns the woken slots' channels, marked seen: each changes when its re-decision is done.
    pub fn redecide(self: &Arc<Self>, identities: &BTreeSet<String>) -> Vec<watch::Receiver<Slot>> {
        let mut woken = Vec::new();
        for (key, handle) in self.slots.lock().expect("cache poisoned").iter() {
            if identities.contains(&key.identity) {
                // An idle slot just goes (its task sees no one holds it): the next caller is decided anew.
                if handle.tx.receiver_count() > 0 {
                    let mut rx = handle.tx.subscribe();
                    rx.mark_unchanged();
                    woken.push(rx);
                }
                handle.wake.notify_one();
            }
        }
        let mut again = Vec::new();
        for ((key, audience), held) in self.jwts.lock().expect("cache poisoned").iter_mut() {
            if identities.contains(&key.identity) {
                held.stale = true;
                again.push((key.clone(), audience.clone()));
            }
        }
        if !again.is_empty() {
            let cache = self.clone();
            tokio::spawn(async move {
                for (key, audience) in again {
                    // What the held one was issued for: its identity and the attributes it read.
                    let resolved = Resolved {
                        name: key.identity.clone(),
                        reads: key.attributes.iter().map(|(name, _)| name.to_owned()).collect(),
                    };
                    let _ = cache.jwt(&resolved, &key.attributes, &audience, key.ttl).await;
                }
            });
        }
        woken
    }

    /// Forgets every cached JWT-SVID (the signing key changed).
    pub fn forget_jwts(&self) {
        self.jwts.lock().expect("cache poisoned").clear();
        self.changed();
    }

    /// Waits (a little) until the bundle holds the CA that signed `certificate`: a remote issuer's
    /// new CA may sign before its bundle reaches this agent, and no workload may get an SVID its
    /// bundle does not verify.
    async fn bundle_covering(&self, certificate: &[u8]) {
        let mut bundles = self.issuer.bundles();
        if covers(&bundles.borrow_and_update(), certificate) {
            return;
        }
        let waited = tokio::time::timeout(BUNDLE_WAIT, bundles.wait_for(|b| covers(b, certificate))).await;
        if waited.is_err() {
            tracing::warn!("an X509-SVID arrived signed by a CA the bundle does not hold yet; serving it anyway");
        }
    }

    async fn issue(&self, key: &Key) -> Result<X509Material, IssuerError> {
        let pair = KeyPair::generate().map_err(|e| IssuerError::Crypto(e.to_string()))?;
        let svid = self
            .issuer
            .issue_x509(X509Request {
                bot_certificate: self.bot_certificate(),
                identity: key.identity.clone(),
                workload: key.attributes.clone(),
                public_key: pair.subject_public_key_info(),
                ttl: key.ttl,
            })
            .await?;
        self.bundle_covering(&svid.certificate).await;
        self.issued.fetch_add(1, Ordering::Relaxed);
        self.metrics.x509_issued.inc();
        let (signer, tainted) = {
            let bundles = self.issuer.bundles();
            let bundles = bundles.borrow();
            let signer = bundles
                .x509_authorities
                .iter()
                .position(|ca| signed_by(&svid.certificate, ca));
            let pin = signer
                .and_then(|i| crate::issuer::keys::ca::spki_pin(&bundles.x509_authorities[i]))
                .unwrap_or_default();
            (pin, signer.is_some_and(|i| bundles.tainted_cas.contains(&i)))
        };
        if tainted {
            // Issued before the issuer's taint reached it (a remote issuer's reply in flight):
            // served for now, and issued again at once.
            tracing::info!(identity = %key.identity, "an X509-SVID arrived signed by a tainted CA; issuing it again");
        }
        Ok(X509Material {
            tainted,
            svid,
            key: pair.serialize_der(),
            signer,
        })
    }

    async fn keep_fresh(self: Arc<Self>, key: Key, id: u64, tx: watch::Sender<Slot>, wake: Arc<Notify>) {
        let mut backoff = Duration::from_secs(1);
        loop {
            let wait = match self.issue(&key).await {
                Ok(material) => {
                    let lifetime = remaining(material.svid.not_after);
                    let again_now = material.tainted;
                    tracing::debug!(identity = %key.identity, spiffe_id = %material.svid.spiffe_id, "X509-SVID issued");
                    tx.send_replace(Slot::Ready(Arc::new(material)));
                    self.changed();
                    backoff = Duration::from_secs(1);
                    let half = lifetime.mul_f64(0.5 * jitter(0.1));
                    if again_now {
                        Duration::from_millis(100)
                    } else {
                        key.renew_every.map_or(half, |every| every.min(half))
                    }
                }
                Err(error) => {
                    let still_valid =
                        matches!(&*tx.borrow(), Slot::Ready(m) if remaining(m.svid.not_after) > Duration::ZERO);
                    tracing::warn!(identity = %key.identity, %error, hint = %error.hint(), "X509-SVID issuance failed");
                    // A "no" revokes at once; a transient failure keeps serving what is still valid.
                    let denied = matches!(error, IssuerError::Denied(_));
                    if denied || !still_valid {
                        tx.send_replace(Slot::Failed {
                            denied,
                            transient: error.is_transient(),
                            error: error.explain(),
                        });
                    }
                    let wait = backoff.mul_f64(jitter(0.2));
                    backoff = (backoff * 2).min(Duration::from_secs(300));
                    wait
                }
            };
            // Until the renewal (or a re-decision): then, if no one holds the slot, it goes
            // instead of renewing. Someone subscribing meanwhile does so under the lock. A failure
            // is not kept for later callers: it goes as soon as no one holds it.
            let failed = matches!(&*tx.borrow(), Slot::Failed { .. });
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = wake.notified() => {}
                _ = tx.closed(), if failed => {}
            }
            let mut slots = self.slots.lock().expect("cache poisoned");
            if tx.receiver_count() == 0 {
                if slots.get(&key).is_some_and(|h| h.id == id) {
                    slots.remove(&key);
                }
                drop(slots);
                self.changed();
                return;
            }
        }
    }

    /// A new JWT-SVID for `audience`, neither taken from the cache nor kept in it (an output renews
    /// on its own schedule).
    pub async fn jwt_uncached(
        &self,
        resolved: &Resolved,
        workload: &Attributes,
        audience: &[String],
        ttl: Duration,
    ) -> Result<JwtSvid, IssuerError> {
        let svid = self
            .issuer
            .issue_jwt(JwtRequest {
                bot_certificate: self.bot_certificate(),
                identity: resolved.name.clone(),
                workload: project(resolved, workload),
                audience: audience.to_vec(),
                ttl,
            })
            .await?;
        self.metrics.jwt_issued.inc();
        Ok(svid)
    }

    /// A JWT-SVID for `audience`, from the cache while it has more than half its lifetime left.
    pub async fn jwt(
        &self,
        resolved: &Resolved,
        workload: &Attributes,
        audience: &[String],
        ttl: Duration,
    ) -> Result<JwtSvid, IssuerError> {
        let mut audience = audience.to_vec();
        audience.sort();
        audience.dedup();
        let key = (
            Key {
                identity: resolved.name.clone(),
                attributes: project(resolved, workload),
                ttl,
                renew_every: None,
            },
            audience.clone(),
        );
        if let Some(held) = self.jwts.lock().expect("cache poisoned").get(&key)
            && !held.stale
            && now() < held.fresh_until
        {
            return Ok(held.svid.clone());
        }
        let issued_at = now();
        let svid = match self.jwt_uncached(resolved, workload, &audience, ttl).await {
            Ok(svid) => svid,
            Err(error) => {
                let mut jwts = self.jwts.lock().expect("cache poisoned");
                // Only an unreachable issuer (not a rate limit a caller can provoke).
                if matches!(error, IssuerError::Unavailable(_))
                    && let Some(held) = jwts.get(&key).filter(|h| now() + JWT_MARGIN < h.svid.expires)
                {
                    tracing::debug!(identity = %resolved.name, %error, "the issuer cannot be reached; serving the JWT-SVID held");
                    return Ok(held.svid.clone());
                }
                // A "no" (or nothing valid held): nothing of it is served again.
                jwts.remove(&key);
                self.changed();
                return Err(error);
            }
        };
        let mut jwts = self.jwts.lock().expect("cache poisoned");
        jwts.retain(|_, held| now() < held.svid.expires);
        while jwts.len() >= MAX_JWTS {
            let soonest = jwts
                .iter()
                .min_by_key(|(_, held)| held.svid.expires)
                .map(|(k, _)| k.clone())
                .expect("not empty");
            jwts.remove(&soonest);
        }
        let fresh_until = issued_at + (svid.expires - issued_at) / 2;
        self.changed();
        jwts.insert(
            key,
            HeldJwt {
                svid: svid.clone(),
                fresh_until,
                stale: false,
            },
        );
        Ok(svid)
    }
}

/// Evicts the least recently used idle slots until at most `keep` are idle; their tasks are woken
/// to leave (they find no subscriber and another slot, or none, under their key).
fn evict_idle(slots: &mut HashMap<Key, SlotHandle>, keep: usize) {
    // The common case, no key copied: fewer slots in all than may be idle.
    if slots.len() <= keep {
        return;
    }
    let mut idle: Vec<(tokio::time::Instant, Key)> = slots
        .iter()
        .filter(|(_, h)| h.tx.receiver_count() == 0)
        .map(|(k, h)| (h.last_used, k.clone()))
        .collect();
    if idle.len() <= keep {
        return;
    }
    // Down to 7/8 of the bound, so a stream of new callers does not scan the map on every one.
    let target = keep - keep / 8;
    let evict = idle.len() - target;
    idle.sort_unstable_by_key(|(last_used, _)| *last_used);
    for (_, key) in idle.into_iter().take(evict) {
        if let Some(handle) = slots.remove(&key) {
            handle.wake.notify_one();
        }
    }
}

mod signers;
pub use signers::kid_of;

#[cfg(test)]
mod tests;
