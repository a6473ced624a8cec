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
        let identity = match saved {
            Some(saved) => match bot::refresh(issuer.as_ref(), &settings, &saved).await {
                Ok(renewed) => {
                    tracing::info!(bot = %renewed.certificate.bot, expires = %renewed.certificate.not_after, "saved bot identity renewed");
                    renewed
                }
                Err(error) => {
                    tracing::warn!(%error, "the saved bot identity cannot be renewed; joining again");
                    bot::join(issuer.as_ref(), &settings).await?
                }
            },
            None => {
                let joined = bot::join(issuer.as_ref(), &settings).await?;
                tracing::info!(
                    bot = %joined.certificate.bot,
                    method = %settings.method,
                    expires = %joined.certificate.not_after,
                    "bot joined"
                );
                joined
            }
        };
        identity.save(&store)?;
        let (tx, rx) = watch::channel(Arc::new(identity));
        tokio::spawn(bot::keep_fresh(issuer.clone(), settings, store, tx));
        let cache = SvidCache::new(issuer.clone(), rx.clone());
        Ok(Agent { issuer, bot: rx, cache })
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
