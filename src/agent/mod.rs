//! The agent: the bot identity lifecycle (join, renew, rejoin), workload attestation, and the shared
//! SVID cache with its rotation schedule. It reaches the issuer only through the `Issuer` trait.

pub mod attest;
pub mod bot;
pub mod cache;

use std::sync::Arc;

use tokio::sync::watch;

use crate::issuer::{Attributes, Bundles, IdentitySelector, Issuer, IssuerError, Resolved};
use crate::resource::agent::JoinMethod;
use crate::store::Store;
pub use bot::{BotIdentity, JoinSettings};
pub use cache::{Slot, SvidCache, X509Material};

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
    pub cache: Arc<SvidCache>,
}

impl Agent {
    /// Renews the identity saved in `store` (a restart), else joins; then keeps the bot identity
    /// fresh in the background.
    pub async fn start(issuer: Arc<dyn Issuer>, settings: JoinSettings, store: Store) -> Result<Agent, IssuerError> {
        let saved = match settings.method {
            JoinMethod::Token => BotIdentity::load(&store)?,
            JoinMethod::Iam => None,
        };
        // A join the last run did not see answered comes first: the issuer may already count the
        // bot from it, and renewing the older saved identity would then look like a copy.
        let mut finished = None;
        if settings.method == JoinMethod::Token && bot::join_pending(&store)? {
            match bot::join(issuer.as_ref(), &settings, &store).await {
                Ok(joined) => {
                    tracing::info!(bot = %joined.certificate.bot, "a join interrupted by a stop completed");
                    finished = Some(joined);
                }
                Err(error) => {
                    tracing::warn!(%error, "an interrupted join cannot be completed; using the saved identity")
                }
            }
        }
        let identity = match (finished, saved) {
            (Some(joined), _) => joined,
            (None, Some(saved)) => match bot::refresh(issuer.as_ref(), &settings, &saved, &store).await {
                Ok(renewed) => {
                    tracing::info!(bot = %renewed.certificate.bot, expires = %renewed.certificate.not_after, "saved bot identity renewed");
                    renewed
                }
                Err(error) => {
                    tracing::warn!(%error, "the saved bot identity cannot be renewed; joining again");
                    bot::join(issuer.as_ref(), &settings, &store).await?
                }
            },
            (None, None) => {
                let joined = bot::join(issuer.as_ref(), &settings, &store).await?;
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
        let (health_tx, renewal) = watch::channel(None);
        tokio::spawn(bot::keep_fresh(
            issuer.clone(),
            settings_rx,
            store.clone(),
            tx.clone(),
            health_tx,
        ));
        let cache = SvidCache::new(issuer.clone(), rx.clone());
        Ok(Agent {
            issuer,
            bot: rx,
            bot_tx: tx,
            settings: settings_tx,
            store,
            policy: watch::channel(0).0,
            renewal,
            cache,
        })
    }

    /// Joins again with new terms. The current identity stays in force until the join succeeds.
    pub async fn rejoin(&self, settings: JoinSettings) -> Result<(), IssuerError> {
        let identity = bot::join(self.issuer.as_ref(), &settings, &self.store).await?;
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
        self.policy.send_modify(|g| *g += 1);
        let all_done = async {
            for rx in &mut woken {
                let _ = rx.changed().await;
            }
        };
        let _ = tokio::time::timeout(wait, all_done).await;
    }

    /// Moves whenever callers must be re-resolved.
    pub fn policy_changes(&self) -> watch::Receiver<u64> {
        self.policy.subscribe()
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

    /// The current bot identity.
    pub fn bot(&self) -> Arc<BotIdentity> {
        self.bot.borrow().clone()
    }

    /// The identities `selector` gives a caller with these attested attributes.
    pub async fn resolve(
        &self,
        selector: &IdentitySelector,
        workload: &Attributes,
    ) -> Result<Vec<Resolved>, IssuerError> {
        self.issuer
            .resolve(&self.bot().certificate.der, selector, &workload.workload_only())
            .await
    }

    /// The trust bundle, now and on every change.
    pub fn bundles(&self) -> watch::Receiver<Arc<Bundles>> {
        self.issuer.bundles()
    }
}
