//! Joins and renewals: `token` joins (a token consumed by one conditional write), `iam` joins
//! (a fresh challenge, the signed STS request), and renewals that move a bot instance's generation
//! by compare-and-swap (a copied certificate loses the race and is locked).

use crate::aws::{self, AwsError};
use crate::issuer::bots::join;
use crate::issuer::bots::{
    self, BotClaims, BotRecord, Consumed, InstanceInfo, bot_record_key, instance_key, token_key, token_record_key,
};
use crate::issuer::state::backing::json;
use crate::issuer::{BotCertificate, IssuerError, JoinRequest, RenewRequest};
use crate::kv::{Condition, Op};
use crate::resource::agent::JoinMethod;

use super::follower::{put_if_unchanged, read_record};
use super::{CHALLENGE_TTL, CONFLICT_RETRIES, LocalIssuer, REPLACED_GRACE, is_token, now, rfc3339};

use std::time::Duration;
use time::OffsetDateTime;

/// How long a consumed token's record outlives the token (see `consumed_lease`): long enough that
/// replicas whose documents disagree on `expires` during a rollout all refuse the token by then.
const CONSUMED_SLACK: Duration = Duration::from_secs(7 * 24 * 3600);

/// SHA-256 (hex) of a public key, as the ledger records it.
pub(super) fn key_digest(public_key: &[u8]) -> String {
    crate::sha256_hex(public_key)
}

impl LocalIssuer {
    pub(super) fn take_challenge(&self, challenge: &str) -> Result<(), IssuerError> {
        let mut challenges = self.inner.challenges.lock().expect("challenges poisoned");
        let now = now();
        challenges.retain(|_, issued| *issued + CHALLENGE_TTL > now);
        challenges.remove(challenge).map(drop).ok_or_else(|| {
            IssuerError::JoinRefused(
                "challenge: it was not issued by this issuer, was already used, or is older than 5 minutes".into(),
            )
        })
    }

    /// The lease a consumed token's record lives on in a shared store (etcd): until a week after the
    /// token expires, when every replica refuses it anyway, so the store does not keep one key per
    /// join forever. (Editing a used token's `expires` to a later date after that makes it usable
    /// again: make a new token instead.) `None` (kept) for a token without `expires`, whose record is what keeps it
    /// single-use, and in a store in this process (which keeps no leased key across a restart).
    async fn consumed_lease(&self, expires: Option<OffsetDateTime>) -> Result<Option<i64>, IssuerError> {
        let Some(expires) = expires.filter(|_| !self.inner.backing.local) else {
            return Ok(None);
        };
        let ttl = Duration::try_from(expires - now()).unwrap_or(Duration::ZERO) + CONSUMED_SLACK;
        Ok(Some(self.inner.backing.kv.grant(ttl).await?))
    }

    /// A `token` join, after its terms were checked: consume the token and make a bot instance at
    /// generation 1, in one transaction that only one joiner of the token wins, on any replica. The
    /// same joiner retrying (the same key: its answer was lost, or the store applied a write that
    /// timed out) gets its instance's certificate again. Says whether the instance is new (made by
    /// this join) rather than that of a retry: a retry proves no more than knowing the token and the
    /// public key, so the connection it came on is not bound to the certificate (see
    /// [`crate::issuer::server::tls::PeerInfo::bind`]).
    pub async fn join_token(&self, request: &JoinRequest) -> Result<(BotCertificate, bool), IssuerError> {
        let refuse = IssuerError::JoinRefused;
        let (bot, roles, dir, expires) = {
            let state = self.lock();
            // Validate, then write: a refused key spends no token and makes no instance.
            state.check_key(&request.public_key)?;
            let token = state.policy.tokens.get(&request.token).ok_or_else(|| {
                refuse(
                    "no token by that name exists (for `token` joins the name is the secret; check `onboarding.token`)"
                        .into(),
                )
            })?;
            join::check_token_terms(token, JoinMethod::Token, now())?;
            let bot = token.spec.bot_name.to_string();
            let expires = token.metadata.expires.as_ref().map(|t| t.0);
            (bot.clone(), state.bot_roles(&bot)?, state.dir(), expires)
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
        let consumed_op = match self.consumed_lease(expires).await? {
            Some(lease) => Op::Put {
                key: token_file.clone(),
                value: json(&consumed),
                lease,
            },
            None => Op::put(&token_file, json(&consumed)),
        };
        let (won, revision) = backing
            .kv
            .txn(
                vec![Condition::Absent(token_file.clone())],
                // The instance first, the token's record last: a store that writes the two one
                // after the other and is killed between them leaves an unused token (and an
                // instance nothing can use, pruned later), never a used token without the instance
                // its retry needs. (The directory store logs both as one record: all or none.)
                vec![Op::put(&bot_file, json(&record)), consumed_op],
            )
            .await?;
        let (instance, new) = if won {
            self.lock().remember(key, record, revision);
            (instance, true)
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
            (instance, false)
        };
        let claims = BotClaims {
            bot,
            roles,
            generation: 1,
            // Not the token's name: for a `token` join it is the secret, and the certificate is public.
            join: [("join.meta.join_method".to_owned(), "token".to_owned())].into(),
            instance,
        };
        let cert = self.inner.sign_bot(&claims, &request.public_key, request.ttl)?;
        Ok((cert, new))
    }

    /// Renews a `token` bot: checks and moves the instance's generation by compare-and-swap on its
    /// record. Of two holders of one certificate, one wins and the other finds the generation moved:
    /// the instance is locked. The winner retrying with the same new key is signed again.
    pub(super) async fn renew_token(&self, request: &RenewRequest) -> Result<BotCertificate, IssuerError> {
        let (verified, dir) = {
            let state = self.lock();
            let verified = bots::verify_bot_certificate(&state.authority, &request.certificate, now())?;
            state.not_revoked(&request.certificate)?;
            // Validate, then write: a refused key leaves the generation where it was.
            state.check_key(&request.public_key)?;
            (verified, state.dir())
        };
        let (claims, spki) = (verified.claims, verified.public_key);
        if !is_token(&claims) {
            return Err(IssuerError::Unauthenticated(
                "only `token`-joined bots renew; `iam` bots join again".into(),
            ));
        }
        crate::issuer::keys::public::verify(&spki, &request.public_key, &request.proof)?;
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
                tracing::warn!(%bot, %instance, %reason,
                    "bot instance locked: find where its identity was copied, then create a new token for the bot and join with it");
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
                // A certificate of an earlier version may carry the token's name: it stops here.
                join: claims
                    .join
                    .into_iter()
                    .filter(|(k, _)| k != bots::TOKEN_NAME_CLAIM)
                    .collect(),
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
            state.check_key(&request.public_key)?;
            // The name is not repeated: it may be a secret its owner mistyped.
            let token = state
                .policy
                .tokens
                .get(&request.token)
                .cloned()
                .ok_or_else(|| refuse("no token by that name exists; check `onboarding.token`".into()))?;
            (token, state.policy.sts_endpoint.clone())
        };
        join::check_token_terms(&token, JoinMethod::Iam, now())?;
        let real_endpoint = join::check_signed_request(signed, challenge)?;
        if registered {
            self.take_challenge(challenge)?;
        }
        let endpoint = sts_override.unwrap_or(real_endpoint);
        let identity = aws::get_caller_identity(signed, &endpoint).await.map_err(|e| match e {
            AwsError::Refused(why) => refuse(format!("signature refused by STS: {why}")),
            AwsError::Malformed(why) => refuse(why),
            other => IssuerError::StsUnavailable(other),
        })?;
        join::check_allow(&token, &identity)?;
        let bot = token.spec.bot_name.to_string();
        let (roles, dir, kept) = {
            let state = self.lock();
            // A joiner that holds a certificate of this bot from an earlier `iam` join keeps its
            // instance (a revoked certificate keeps nothing).
            let kept = request
                .current
                .as_deref()
                .filter(|der| state.not_revoked(der).is_ok())
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
            // A locked instance stays locked: joining again does not lift it (`tbotctl unlock` does).
            if let Some(reason) = previous.locked {
                return Err(IssuerError::Locked { bot, reason });
            }
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
