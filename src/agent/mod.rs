//! The agent: the bot identity lifecycle (join, renew, rejoin), workload attestation, and the shared
//! SVID cache with its rotation schedule. It reaches the issuer only through the `Issuer` trait.

pub mod attest;
pub mod bot;
pub mod cache;
pub mod containers;
pub mod metrics;
pub mod outputs;
pub mod remote;

use std::sync::Arc;

use tokio::sync::watch;

use crate::error::Explain;
use crate::issuer::{Attributes, Bundles, IdentitySelector, Issuer, IssuerError, Resolution, Resolved};
use crate::resource::agent::JoinMethod;
use crate::store::Store;
pub use bot::{BotIdentity, JoinSettings};
pub use cache::{Slot, SvidCache, X509Material};
pub use metrics::AgentMetrics;

/// A joined agent.
pub struct Agent {
    issuer: Arc<dyn Issuer>,
    bot: watch::Receiver<Arc<BotIdentity>>,
    bot_tx: watch::Sender<Arc<BotIdentity>>,
    settings: watch::Sender<JoinSettings>,
    store: Store,
    /// Moves whenever the documents that decide who gets what change: streams re-resolve.
    policy: watch::Sender<u64>,
    /// Why the bot identity cannot be renewed, while it cannot.
    renewal: watch::Receiver<Option<String>>,
    /// Wakes the renewal task to renew now.
    renew_now: Arc<tokio::sync::Notify>,
    pub cache: Arc<SvidCache>,
    /// The agent's metric families.
    pub metrics: AgentMetrics,
    /// Recent answers of the issuer's `resolve`, valid while the documents and the bot identity are
    /// the ones they were made with (as a stream's own resolution is): a stream open or a JWT fetch
    /// by a caller that agrees with a known one on what the decision reads asks the issuer nothing
    /// (a new process, a new connection, and so also while the issuer is down).
    resolutions: std::sync::Mutex<Resolutions>,
    /// At which policy generation each identity was last re-decided (`all`: every identity), so
    /// that a JWT output re-issues only when its own identity was.
    redecided: std::sync::Mutex<Redecided>,
}

#[derive(Default)]
struct Redecided {
    all: u64,
    by_identity: std::collections::HashMap<String, u64, foldhash::fast::RandomState>,
}

/// Cached resolutions by selector and workload attributes, for one (policy, bot identity) epoch.
#[derive(Default)]
struct Resolutions {
    policy: u64,
    bot: Option<Arc<BotIdentity>>,
    by_selector: std::collections::HashMap<IdentitySelector, Answers, foldhash::fast::RandomState>,
    /// The answers of the epoch before (a renewal, a policy event): asked only when the issuer
    /// cannot be reached, so a new process right after a renewal or a reconnect is still served
    /// during an outage (its SVID comes from the cache, which the re-decision already revoked if the
    /// documents took it away).
    previous: std::collections::HashMap<IdentitySelector, Answers, foldhash::fast::RandomState>,
    /// Moves on every [`Agent::forget_resolutions`]: an answer asked for before must not be kept.
    forgotten: u64,
}

/// One selector's answers, keyed on the attributes the issuer's decision read (all of them when
/// the issuer does not say which): never on the pid unless a document reads it.
#[derive(Default)]
struct Answers {
    decided_on: Option<Vec<String>>,
    by_attributes: std::collections::HashMap<Attributes, Vec<Resolved>, foldhash::fast::RandomState>,
}

impl Answers {
    fn key(&self, workload: &Attributes) -> Option<Attributes> {
        self.decided_on.as_ref().map(|names| workload.only(names))
    }

    fn get(&self, workload: &Attributes) -> Option<&Vec<Resolved>> {
        match self.key(workload) {
            Some(key) => self.by_attributes.get(&key),
            None => self.by_attributes.get(workload),
        }
    }

    fn insert(&mut self, workload: &Attributes, answer: Resolution) {
        if self.decided_on != answer.decided_on {
            self.by_attributes.clear();
            self.decided_on = answer.decided_on;
        }
        let key = self.key(workload).unwrap_or_else(|| workload.clone());
        self.by_attributes.insert(key, answer.identities);
    }
}

/// Cached resolutions at most; when full, the cache starts again (a caller not seen since asks again).
const MAX_RESOLUTIONS: usize = 4096;

impl Resolutions {
    /// Makes sure the cache belongs to this epoch: anything from another is forgotten.
    fn at(&mut self, policy: u64, bot: &Arc<BotIdentity>) -> bool {
        let same = self.policy == policy && self.bot.as_ref().is_some_and(|b| Arc::ptr_eq(b, bot));
        if !same {
            self.forget();
            // Another bot (a rejoin on other terms): nothing the last one was told holds.
            if self
                .bot
                .as_ref()
                .is_some_and(|b| b.certificate.bot != bot.certificate.bot)
            {
                self.previous.clear();
            }
            self.policy = policy;
            self.bot = Some(bot.clone());
        }
        same
    }

    /// Starts a new epoch; the current answers become the fallback.
    fn forget(&mut self) {
        if !self.by_selector.is_empty() {
            self.previous = std::mem::take(&mut self.by_selector);
        }
    }
}

impl Agent {
    /// Renews the identity saved in `store` (a restart), else joins; then keeps the bot identity
    /// fresh in the background.
    pub async fn start(
        issuer: Arc<dyn Issuer>,
        settings: JoinSettings,
        store: Store,
        metrics: AgentMetrics,
    ) -> Result<Agent, IssuerError> {
        let saved = match settings.method {
            JoinMethod::Token => BotIdentity::load(&store)?,
            JoinMethod::Iam => None,
        };
        // A join (a rejoin with a new token) the last run did not see answered comes before the
        // saved identity: the issuer may already count the bot from it, and renewing the older
        // saved identity would then look like a copy. Without a saved identity, the join below
        // retries it anyway, with the same key.
        let mut finished = None;
        if settings.method == JoinMethod::Token && saved.is_some() && bot::join_pending(&store)? {
            match bot::join(issuer.as_ref(), &settings, &store, None, &metrics).await {
                Ok(joined) => {
                    tracing::info!(bot = %joined.certificate.bot, "a join the last run did not see answered is done");
                    finished = Some(joined);
                }
                Err(error) => {
                    tracing::warn!(%error, "a join the last run did not see answered cannot be done now; renewing the saved identity instead")
                }
            }
        }
        // `onboarding` edited while the daemon was stopped: join on the new terms now, as a running
        // daemon would on the edit; the saved identity stays in force if that fails.
        if finished.is_none() && saved.is_some() && bot::terms_changed(&store, &settings) {
            match bot::join(issuer.as_ref(), &settings, &store, None, &metrics).await {
                Ok(joined) => {
                    tracing::info!(bot = %joined.certificate.bot, method = %settings.method,
                        "`onboarding` was edited while stopped: joined again on the new terms");
                    finished = Some(joined);
                }
                // Unreachable: the start is retried (the edit must not be forgotten by serving on).
                Err(error) if error.is_transient() => return Err(error),
                Err(error) => tracing::warn!(%error, hint = %error.hint(),
                    "`onboarding` was edited while stopped, and the new terms were refused; the saved identity stays in force"),
            }
        }
        if let Some(saved) = &saved {
            saved.present(issuer.as_ref());
        }
        let mut unrenewed = None;
        let identity = match (finished, saved) {
            (Some(joined), _) => joined,
            (None, Some(saved)) => match bot::refresh(issuer.as_ref(), &settings, &saved, &store, &metrics).await {
                Ok(renewed) => {
                    tracing::info!(bot = %renewed.certificate.bot, expires = %renewed.certificate.not_after, "saved bot identity renewed");
                    renewed
                }
                // The issuer is unreachable: start with the saved identity (still valid) and renew
                // in the background; workloads are served as soon as the issuer answers.
                Err(error) if error.is_transient() => {
                    tracing::warn!(%error, hint = %error.hint(), expires = %saved.certificate.not_after,
                        "the saved bot identity cannot be renewed now; starting with it and retrying in the background");
                    unrenewed = Some(format!(
                        "cannot renew: {error}; {}; retrying with backoff",
                        error.hint()
                    ));
                    saved
                }
                Err(error) => {
                    tracing::warn!(%error, "the saved bot identity cannot be renewed; joining again");
                    bot::join(issuer.as_ref(), &settings, &store, None, &metrics).await?
                }
            },
            (None, None) => {
                let joined = bot::join(issuer.as_ref(), &settings, &store, None, &metrics).await?;
                tracing::info!(
                    bot = %joined.certificate.bot,
                    method = %settings.method,
                    expires = %joined.certificate.not_after,
                    "bot joined"
                );
                joined
            }
        };
        let (tx, rx) = watch::channel(Arc::new(identity));
        let (settings_tx, settings_rx) = watch::channel(settings);
        let (health_tx, renewal) = watch::channel(unrenewed.clone());
        let renew_now = Arc::new(tokio::sync::Notify::new());
        tokio::spawn(bot::keep_fresh(
            issuer.clone(),
            settings_rx,
            store.clone(),
            bot::Renewal {
                tx: tx.clone(),
                health: health_tx,
                now: renew_now.clone(),
            },
            unrenewed.is_some(),
            metrics.clone(),
        ));
        let cache = SvidCache::new(issuer.clone(), rx.clone(), metrics.clone());
        Ok(Agent {
            issuer,
            bot: rx,
            bot_tx: tx,
            settings: settings_tx,
            store,
            policy: watch::channel(0).0,
            renewal,
            renew_now,
            cache,
            metrics,
            resolutions: Default::default(),
            redecided: Default::default(),
        })
    }

    /// Joins again with new terms. The current identity stays in force until the join succeeds.
    pub async fn rejoin(&self, settings: JoinSettings) -> Result<(), IssuerError> {
        let identity = bot::join(self.issuer.as_ref(), &settings, &self.store, None, &self.metrics).await?;
        tracing::info!(
            bot = %identity.certificate.bot,
            method = %settings.method,
            expires = %identity.certificate.not_after,
            "bot joined again with the new terms"
        );
        self.settings.send_replace(settings);
        self.bot_tx.send_replace(Arc::new(identity));
        Ok(())
    }

    /// The documents changed: open streams re-resolve their callers, and the SVIDs of `identities`
    /// are re-decided now (reissued, or revoked).
    /// Returns when every cached SVID concerned has been reissued or revoked (or after `wait`).
    pub async fn redecide(&self, identities: &std::collections::BTreeSet<String>, wait: std::time::Duration) {
        let mut woken = self.cache.redecide(identities);
        {
            let next = *self.policy.borrow() + 1;
            let mut redecided = self.redecided.lock().expect("redecided poisoned");
            for identity in identities {
                redecided.by_identity.insert(identity.clone(), next);
            }
        }
        self.policy.send_modify(|g| *g += 1);
        let all_done = async {
            for rx in &mut woken {
                let _ = rx.changed().await;
            }
        };
        let _ = tokio::time::timeout(wait, all_done).await;
    }

    /// Follows the changes a remote issuer pushes: each one forgets the cached resolutions and
    /// re-decides the SVIDs concerned (all of them after a gap). Nothing to do in process.
    pub fn follow_policy_events(self: &Arc<Self>) {
        let Some(mut events) = self.issuer.policy_events() else {
            return;
        };
        let agent = Arc::downgrade(self);
        tokio::spawn(async move {
            while events.changed().await.is_ok() {
                let event = events.borrow_and_update().clone();
                let Some(agent) = agent.upgrade() else { break };
                let identities = if event.all {
                    agent.cache.identities()
                } else {
                    event.identities.clone()
                };
                tracing::info!(
                    revision = event.revision,
                    identities = identities.len(),
                    all = event.all,
                    "the issuer's documents changed; re-deciding"
                );
                agent.forget_resolutions();
                if event.all {
                    // Identities nothing holds now (a JWT output's) are re-decided too.
                    let next = *agent.policy.borrow() + 1;
                    agent.redecided.lock().expect("redecided poisoned").all = next;
                }
                agent.redecide(&identities, std::time::Duration::ZERO).await;
            }
        });
    }

    /// Renews the bot identity now (in the background; [`Agent::renewal`] says if it fails).
    pub fn renew_now(&self) {
        self.renew_now.notify_one();
    }

    /// Moves whenever callers must be re-resolved.
    pub fn policy_changes(&self) -> watch::Receiver<u64> {
        self.policy.subscribe()
    }

    /// Whether `identity` was re-decided after policy generation `since` (a value of
    /// [`Agent::policy_changes`]).
    pub fn redecided_since(&self, identity: &str, since: u64) -> bool {
        let redecided = self.redecided.lock().expect("redecided poisoned");
        redecided.all > since || redecided.by_identity.get(identity).is_some_and(|g| *g > since)
    }

    /// Why renewing the bot identity fails (`None` while it works), now and on every change.
    pub fn renewal(&self) -> watch::Receiver<Option<String>> {
        self.renewal.clone()
    }

    /// How the bot joined.
    pub fn join_method(&self) -> crate::resource::agent::JoinMethod {
        self.settings.borrow().method
    }

    /// Whether the bot is already joined on these terms (method and token).
    pub fn joined_with(&self, settings: &JoinSettings) -> bool {
        let current = self.settings.borrow();
        current.method == settings.method && current.token == settings.token
    }

    /// The bot identity now and every new one (each renewal or rejoin).
    pub fn bot_changes(&self) -> watch::Receiver<Arc<BotIdentity>> {
        self.bot.clone()
    }

    /// The current bot identity.
    pub fn bot(&self) -> Arc<BotIdentity> {
        self.bot.borrow().clone()
    }

    /// The identities `selector` gives a caller with these attested attributes: from the cache when
    /// neither the documents nor the bot identity changed since the issuer last said.
    pub async fn resolve(
        &self,
        selector: &IdentitySelector,
        workload: &Attributes,
    ) -> Result<Vec<Resolved>, IssuerError> {
        // Attested attributes are all `workload.*` already: no copy on the hot path.
        let workload = if workload.is_workload_only() {
            std::borrow::Cow::Borrowed(workload)
        } else {
            std::borrow::Cow::Owned(workload.workload_only())
        };
        let workload = workload.as_ref();
        let bot = self.bot();
        let policy = *self.policy.borrow();
        let forgotten = {
            let mut cache = self.resolutions.lock().expect("resolutions poisoned");
            cache.at(policy, &bot);
            if let Some(hit) = cache.by_selector.get(selector).and_then(|m| m.get(workload)) {
                return Ok(hit.clone());
            }
            cache.forgotten
        };
        let resolved = match self.issuer.resolve(&bot.certificate.der, selector, workload).await {
            Ok(resolved) => resolved,
            // Only an unreachable issuer (not a rate limit a caller can provoke); what comes of the
            // answer is decided by the cache, whose SVIDs were re-decided when the documents changed.
            Err(error @ IssuerError::Unavailable(_)) => {
                let cache = self.resolutions.lock().expect("resolutions poisoned");
                return match cache.previous.get(selector).and_then(|m| m.get(workload)) {
                    Some(held) => Ok(held.clone()),
                    None => Err(error),
                };
            }
            Err(error) => return Err(error),
        };
        let mut cache = self.resolutions.lock().expect("resolutions poisoned");
        // Only if nothing changed meanwhile: an answer from before a change must not outlive it.
        if cache.at(policy, &bot) && cache.forgotten == forgotten && *self.policy.borrow() == policy {
            if cache.by_selector.values().map(|m| m.by_attributes.len()).sum::<usize>() >= MAX_RESOLUTIONS {
                cache.forget();
            }
            cache
                .by_selector
                .entry(selector.clone())
                .or_default()
                .insert(workload, resolved.clone());
        }
        Ok(resolved.identities)
    }

    /// The issuer's documents changed: forget every cached resolution (open streams keep theirs
    /// until [`Agent::redecide`] tells them).
    pub fn forget_resolutions(&self) {
        let mut cache = self.resolutions.lock().expect("resolutions poisoned");
        cache.forget();
        cache.forgotten += 1;
    }

    /// The trust bundle, now and on every change.
    pub fn bundles(&self) -> watch::Receiver<Arc<Bundles>> {
        self.issuer.bundles()
    }
}

mod keys;

#[cfg(test)]
mod tests;
