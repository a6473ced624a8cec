//! Locks by hand (`tbotctl lock`/`unlock`, and `tbotctl revoke --bot-instance`): a bot instance whose
//! key leaked is refused for issuance, renewal and its `Watch` stream on every replica, until an
//! operator unlocks it. The same record field as the lock a copied identity sets.

use crate::issuer::IssuerError;
use crate::issuer::bots::{BotRecord, bot_record_key, instance_key};

use super::follower::{put_if_unchanged, read_record};
use super::{CONFLICT_RETRIES, LocalIssuer};

impl LocalIssuer {
    /// Locks `bot`'s `instance` with `reason`, or unlocks it (`None`). Open streams of a newly
    /// locked instance end.
    pub async fn set_lock(&self, bot: &str, instance: &str, reason: Option<String>) -> Result<(), IssuerError> {
        let key = instance_key(bot, instance);
        let file = bot_record_key(&self.lock().dir(), &key);
        let backing = &self.inner.backing;
        for _ in 0..CONFLICT_RETRIES {
            let (record, revision) = read_record(backing, &file).await?;
            if revision == 0 {
                return Err(IssuerError::Invalid(format!(
                    "bot `{bot}` has no instance `{instance}`: `tbotctl get bot/{bot}` lists its instances"
                )));
            }
            let updated = BotRecord {
                locked: reason.clone(),
                ..record
            };
            let Some(at) = put_if_unchanged(backing, &file, revision, &updated).await? else {
                continue;
            };
            let newly_locked = self.lock().remember(key.clone(), updated, at);
            let (bot, instance) = (bot.escape_debug(), instance.escape_debug());
            match &reason {
                Some(reason) => {
                    let reason = reason.escape_debug();
                    tracing::warn!(%bot, %instance, %reason, "bot instance locked by hand")
                }
                None => tracing::warn!(%bot, %instance, "bot instance unlocked by hand"),
            }
            if newly_locked {
                self.inner.locks.send_modify(|n| *n += 1);
            }
            return Ok(());
        }
        Err(IssuerError::Unavailable(format!(
            "the record of {key} kept changing under the lock; try again"
        )))
    }
}
