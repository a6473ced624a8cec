//! The in-process issuer: one trust domain's CA, JWT key and ledgers over a `Store`, enforcing a
//! `Policy` that the daemon swaps on reload.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1, UnparsedPublicKey};
use base64::Engine;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::sync::watch;

use super::bots::{self, BotClaims, BotRecord, Consumed, InstanceInfo, Ledger, instance_key, token_key};
use super::ca::Authority;
use super::decide::{self, Attributes, Decision};
use super::jwt::JwtKey;
use super::{
    BotCertificate, Bundles, IdentitySelector, Issuer, IssuerError, JoinProof, JoinRequest, JwtRequest, JwtSvid,
    Policy, RenewRequest, Resolved, X509Request, X509Svid, join, mint,
};
use crate::aws::{self, AwsError};
use crate::resource::agent::JoinMethod;
use crate::store::Store;

/// How long an `iam` challenge may wait for its join.
const CHALLENGE_TTL: time::Duration = time::Duration::minutes(5);
/// How many `iam` challenges may wait at once (each is 32 random bytes and a timestamp).
const MAX_CHALLENGES: usize = 10_000;
/// Verified bot certificates remembered, so issuance does not verify a signature every time.
const VERIFIED_CACHE: usize = 4096;

struct State {
    store: Store,
    policy: Arc<Policy>,
    authority: Authority,
    jwt: JwtKey,
    ledger: Ledger,
    verified: HashMap<[u8; 32], (BotClaims, OffsetDateTime)>,
    /// Per bot, the generation a renewal just replaced and until when it may still issue: the agent
    /// publishes its new certificate a moment after the issuer moved the generation, and issuance
    /// in that moment must not fail.
    replaced: HashMap<String, (u64, OffsetDateTime)>,
    sequence: u64,
}

/// How long the generation a renewal replaced may still issue (not renew).
const REPLACED_GRACE: time::Duration = time::Duration::seconds(30);

/// The issuer, in this process.
pub struct LocalIssuer {
    state: Mutex<State>,
    challenges: Mutex<HashMap<String, OffsetDateTime>>,
    bundles: watch::Sender<Arc<Bundles>>,
    policy_events: watch::Sender<Arc<PolicyEvent>>,
    /// Moves whenever a renewal was refused as locked: open streams of that instance end.
    locks: watch::Sender<u64>,
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

/// How long after its certificate expired a bot instance is forgotten (unless locked).
const INSTANCE_RETENTION: time::Duration = time::Duration::days(1);

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

impl State {
    fn open(store: Store, policy: Policy) -> Result<State, IssuerError> {
        let td = policy.trust_domain.clone();
        let authority = Authority::load_or_create(&store, &td, &policy.ca, now())?;
        let jwt = JwtKey::load_or_create(&store, &td)?;
        let ledger = Ledger::load(&store, format!("issuer/{}", td.as_str()))?;
        Ok(State {
            store,
            policy: Arc::new(policy),
            authority,
            jwt,
            ledger,
            verified: HashMap::new(),
            replaced: HashMap::new(),
            sequence: 1,
        })
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
            jwt_keys: vec![self.jwt.jwk().clone()],
            sequence: self.sequence,
        }
    }

    /// Verifies a bot certificate for issuance: ours, valid, not locked, the current generation.
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
        if claims.join.get("join.meta.join_method").map(String::as_str) == Some("token") {
            let key = claims.instance_key();
            let record = self.ledger.bots.get(&key).cloned().unwrap_or_default();
            if let Some(reason) = record.locked {
                return Err(IssuerError::Locked {
                    bot: claims.bot,
                    reason,
                });
            }
            let just_replaced = self
                .replaced
                .get(&key)
                .is_some_and(|(generation, until)| *generation == claims.generation && now() < *until);
            if record.generation != claims.generation && !just_replaced {
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

    fn sign_bot(
        &mut self,
        claims: &BotClaims,
        public_key: &[u8],
        ttl: Duration,
    ) -> Result<BotCertificate, IssuerError> {
        let cert = bots::sign_bot_certificate(&self.authority, claims, public_key, ttl, now())?;
        self.authority.note_issued(&self.store, cert.not_after)?;
        Ok(cert)
    }

    /// A `token` join, after its terms were checked: consume the token, make a bot instance at
    /// generation 1.
    fn join_token(&mut self, request: &JoinRequest) -> Result<BotCertificate, IssuerError> {
        let refuse = |why: String| IssuerError::JoinRefused(why);
        let token = self.policy.tokens.get(&request.token).ok_or_else(|| {
            refuse(
                "no token by that name exists (for `token` joins the name is the secret; check `onboarding.token`)"
                    .into(),
            )
        })?;
        join::check_token_terms(token, JoinMethod::Token, now()).map_err(refuse)?;
        let bot = token.spec.bot_name.to_string();
        let key = token_key(&request.token);
        let joiner = key_digest(&request.public_key);
        let instance = match self.ledger.tokens.get(&key) {
            Some(used) => {
                // The joiner retrying a join whose answer it lost (a crash before it saved the
                // certificate): the same key, and the instance untouched since (generation 1, that key).
                let instance = used.instance.clone().unwrap_or_default();
                let record = self.ledger.bots.get(&instance_key(&bot, &instance));
                let retry = used.key.as_deref() == Some(joiner.as_str())
                    && record
                        .is_some_and(|r| r.generation == 1 && r.locked.is_none() && r.key.as_ref() == Some(&joiner));
                if !retry {
                    return Err(refuse(format!(
                        "the token was already used by bot `{}` at {}; `token` joins are single-use: create a new token",
                        used.bot, used.at
                    )));
                }
                instance
            }
            None => bots::new_instance_id()?,
        };
        let roles = self.bot_roles(&bot)?;
        // Consume first: a crash after this point must not leave the token usable.
        if !self.ledger.tokens.contains_key(&key) {
            let consumed = Consumed {
                bot: bot.clone(),
                at: rfc3339(now()),
                key: Some(joiner.clone()),
                instance: Some(instance.clone()),
            };
            self.ledger.put_token(&self.store, key, consumed)?;
        }
        self.ledger.put_bot(
            &self.store,
            instance_key(&bot, &instance),
            BotRecord {
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
                key: Some(joiner),
            },
        )?;
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
        self.sign_bot(&claims, &request.public_key, request.ttl)
    }

    fn bot_roles(&self, bot: &str) -> Result<Vec<String>, IssuerError> {
        let doc = self.policy.bots.get(bot).ok_or_else(|| {
            IssuerError::JoinRefused(format!("the token names bot `{bot}`, and there is no bot by that name"))
        })?;
        Ok(doc.spec.roles.iter().map(|r| r.to_string()).collect())
    }

    fn renew(&mut self, request: &RenewRequest) -> Result<BotCertificate, IssuerError> {
        let verified = bots::verify_bot_certificate(&self.authority, &request.certificate, now())?;
        let (claims, spki) = (verified.claims, verified.public_key);
        if claims.join.get("join.meta.join_method").map(String::as_str) != Some("token") {
            return Err(IssuerError::Unauthenticated(
                "only `token`-joined bots renew; `iam` bots join again".into(),
            ));
        }
        let bot = claims.bot.clone();
        let instance = claims.instance_key();
        let record = self.ledger.bots.get(&instance).cloned().unwrap_or_default();
        if let Some(reason) = record.locked {
            return Err(IssuerError::Locked { bot, reason });
        }
        let key = key_digest(&request.public_key);
        // The holder retrying a renewal whose answer it lost (a crash before it saved the new
        // certificate): the previous generation, the same new key. Sign that generation again.
        let retry = record.generation == claims.generation + 1 && record.key.as_deref() == Some(key.as_str());
        if record.generation != claims.generation && !retry {
            let reason = format!(
                "a renewal presented generation {} while this instance of the bot is at generation {}: two holders \
                 share one identity",
                claims.generation, record.generation
            );
            self.ledger.put_bot(
                &self.store,
                instance.clone(),
                BotRecord {
                    locked: Some(reason.clone()),
                    ..record
                },
            )?;
            return Err(IssuerError::Locked { bot, reason });
        }
        check_possession(&spki, &request.public_key, &request.proof)?;
        let roles = self.bot_roles(&bot)?;
        let generation = if retry {
            record.generation
        } else {
            record.generation + 1
        };
        self.replaced
            .insert(instance.clone(), (generation - 1, now() + REPLACED_GRACE));
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
        self.ledger.put_bot(
            &self.store,
            instance,
            BotRecord {
                generation,
                info,
                locked: None,
                key: Some(key),
            },
        )?;
        let claims = BotClaims {
            roles,
            generation,
            ..claims
        };
        self.sign_bot(&claims, &request.public_key, request.ttl)
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

use x509_parser::prelude::FromDer;

impl LocalIssuer {
    /// Opens the issuer over `store`, creating the CA and JWT key of the policy's trust domain on first use.
    pub fn open(store: Store, policy: Policy) -> Result<LocalIssuer, IssuerError> {
        let state = State::open(store, policy)?;
        let (bundles, _) = watch::channel(Arc::new(state.bundles()));
        Ok(LocalIssuer {
            state: Mutex::new(state),
            challenges: Mutex::new(HashMap::new()),
            bundles,
            policy_events: watch::channel(Arc::new(PolicyEvent::default())).0,
            locks: watch::channel(0).0,
        })
    }

    /// Tells remote agents that the documents changed: they forget their resolutions and
    /// re-decide the SVIDs of `identities`.
    pub fn announce(&self, identities: std::collections::BTreeSet<String>) {
        self.policy_events.send_modify(|event| {
            *event = Arc::new(PolicyEvent {
                revision: event.revision + 1,
                identities,
                all: false,
            })
        });
    }

    /// The last policy change, and every new one.
    pub fn policy_events(&self) -> watch::Receiver<Arc<PolicyEvent>> {
        self.policy_events.subscribe()
    }

    /// Moves whenever a renewal is refused as locked (a copied identity, or a locked instance trying
    /// again): whoever holds a connection for a certificate checks it again.
    pub fn locks(&self) -> watch::Receiver<u64> {
        self.locks.subscribe()
    }

    /// Verifies a bot certificate as issuance does (ours, valid, not locked, current generation).
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

    /// The bot instances (all, or one bot's), by instance key.
    pub fn instances(&self, bot: Option<&str>) -> Vec<(String, BotRecord)> {
        let state = self.lock();
        state
            .ledger
            .bots
            .iter()
            .filter(|(key, record)| bot.is_none_or(|b| record.info.as_ref().map_or(key.as_str() == b, |i| i.bot == b)))
            .map(|(k, r)| (k.clone(), r.clone()))
            .collect()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("issuer state poisoned")
    }

    fn publish(&self, state: &mut State) {
        state.sequence += 1;
        self.bundles.send_replace(Arc::new(state.bundles()));
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<Policy> {
        self.lock().policy.clone()
    }

    /// Swaps the policy. A new trust domain loads (or creates) that domain's CA and publishes its bundle.
    pub fn set_policy(&self, policy: Policy) -> Result<(), IssuerError> {
        let mut state = self.lock();
        if policy.trust_domain != state.policy.trust_domain {
            let td = policy.trust_domain.clone();
            state.authority = Authority::load_or_create(&state.store, &td, &policy.ca, now())?;
            state.jwt = JwtKey::load_or_create(&state.store, &td)?;
            state.ledger = Ledger::load(&state.store, format!("issuer/{}", td.as_str()))?;
            state.verified.clear();
            state.policy = Arc::new(policy);
            self.publish(&mut state);
        } else {
            state.policy = Arc::new(policy);
        }
        Ok(())
    }

    /// Rotates the CA: a new CA signs from now on; both are in the bundle until everything the old
    /// one signed has expired ([`LocalIssuer::prune`] then drops it).
    pub fn rotate_ca(&self) -> Result<(), IssuerError> {
        let mut state = self.lock();
        let state = &mut *state;
        let settings = state.policy.ca.clone();
        state.authority.rotate(&state.store, &settings, now())?;
        self.publish(state);
        Ok(())
    }

    /// Drops CAs whose overlap has ended; publishes the bundle when it changed.
    pub fn prune(&self) -> Result<(), IssuerError> {
        let mut state = self.lock();
        let state = &mut *state;
        if state.authority.prune(&state.store, now())? {
            state.verified.clear();
            self.publish(state);
        }
        let horizon = (now() - INSTANCE_RETENTION).unix_timestamp();
        let expired: Vec<String> = state
            .ledger
            .bots
            .iter()
            .filter(|(_, r)| r.locked.is_none() && r.info.as_ref().is_some_and(|i| i.not_after <= horizon))
            .map(|(k, _)| k.clone())
            .collect();
        for key in expired {
            state.ledger.remove_bot(&state.store, &key)?;
        }
        Ok(())
    }

    /// The current bundle.
    pub fn current_bundles(&self) -> Arc<Bundles> {
        self.bundles.borrow().clone()
    }

    fn take_challenge(&self, challenge: &str) -> Result<(), IssuerError> {
        let mut challenges = self.challenges.lock().expect("challenges poisoned");
        let now = now();
        challenges.retain(|_, issued| *issued + CHALLENGE_TTL > now);
        challenges.remove(challenge).map(drop).ok_or_else(|| {
            IssuerError::JoinRefused(
                "challenge: it was not issued by this issuer, was already used, or is older than 5 minutes".into(),
            )
        })
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
        let mut state = self.lock();
        let bot = token.spec.bot_name.to_string();
        let roles = state.bot_roles(&bot)?;
        // A joiner that holds a certificate of this bot from an earlier `iam` join keeps its instance.
        let kept = request
            .current
            .as_deref()
            .and_then(|der| bots::verify_bot_certificate(&state.authority, der, now()).ok())
            .map(|v| v.claims)
            .filter(|c| c.bot == bot && c.join.get("join.meta.join_method").map(String::as_str) == Some("iam"))
            .map(|c| c.instance)
            .filter(|i| !i.is_empty());
        let instance = match kept {
            Some(instance) => instance,
            None => bots::new_instance_id()?,
        };
        let key = instance_key(&bot, &instance);
        let previous = state.ledger.bots.get(&key).cloned().unwrap_or_default();
        let generation = previous.generation + 1;
        let joined_at = previous
            .info
            .as_ref()
            .map_or_else(|| rfc3339(now()), |i| i.joined_at.clone());
        let store = state.store.clone();
        state.ledger.put_bot(
            &store,
            key,
            BotRecord {
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
            },
        )?;
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
        state.sign_bot(&claims, &request.public_key, request.ttl)
    }
}

#[async_trait::async_trait]
impl Issuer for LocalIssuer {
    async fn challenge(&self) -> Result<String, IssuerError> {
        let mut bytes = [0u8; 32];
        aws_lc_rs::rand::fill(&mut bytes).map_err(|_| IssuerError::Crypto("the random generator failed".into()))?;
        let challenge = base64::engine::general_purpose::STANDARD.encode(bytes);
        let mut challenges = self.challenges.lock().expect("challenges poisoned");
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
            JoinProof::Token => self.lock().join_token(&request),
            JoinProof::Iam {
                challenge,
                request: signed,
            } => self.join_iam(&request, challenge, signed, true).await,
        }
    }

    async fn renew(&self, request: RenewRequest) -> Result<BotCertificate, IssuerError> {
        let renewed = self.lock().renew(&request);
        if let Err(IssuerError::Locked { .. }) = &renewed {
            self.locks.send_modify(|n| *n += 1);
        }
        renewed
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
        let mut state = self.lock();
        let state = &mut *state;
        let decision = state.decide(&request.bot_certificate, &request.identity, &request.workload)?;
        let svid = mint::x509_svid(&state.authority, &decision, &request.public_key, request.ttl, now())?;
        state.authority.note_issued(&state.store, svid.not_after)?;
        Ok(svid)
    }

    async fn issue_jwt(&self, request: JwtRequest) -> Result<JwtSvid, IssuerError> {
        let mut state = self.lock();
        let decision = state.decide(&request.bot_certificate, &request.identity, &request.workload)?;
        mint::jwt_svid(
            &state.jwt,
            state.policy.jwt_issuer.as_deref(),
            &decision,
            &request.audience,
            request.ttl,
            now(),
        )
    }

    fn bundles(&self) -> watch::Receiver<Arc<Bundles>> {
        self.bundles.subscribe()
    }
}
