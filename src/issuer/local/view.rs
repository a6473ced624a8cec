//! The in-memory view of the trust domain: the policy, the CA and JWT key, the bot instances and
//! what issuance decides from them (authentication of bot certificates, attributes, decisions).

use sha2::{Digest, Sha256};

use crate::issuer::bots::{self, BotClaims, BotRecord};
use crate::issuer::policy::decide::{self, Attributes, Caller, Decision};
use crate::issuer::state::issued::{Issued, IssuedKind};
use crate::issuer::state::replicas::ReplicaRecord;
use crate::issuer::{Bundles, IssuerError};

use super::{Crls, State, VERIFIED_CACHE, dir_of, is_token, now};
use std::sync::Arc;

/// A bot certificate found good for a call: what it claims, the id of the CA that signed it, and
/// when it expires.
#[derive(Debug, Clone)]
pub struct Authenticated {
    pub claims: Arc<BotClaims>,
    pub signer: u32,
    pub not_after: time::OffsetDateTime,
}

impl State {
    /// Checks a public key a bot sent before anything is recorded or signed for it; the key as
    /// checked.
    pub(super) fn check_key(&self, spki: &[u8]) -> Result<crate::issuer::keys::public::Key, IssuerError> {
        crate::issuer::keys::public::check(spki, self.policy.accept_rsa_keys, |key| {
            self.authority.cas().iter().any(|ca| ca.held_key() == Some(key))
                || self.jwt.holds(key)
                || self.served.contains(key)
        })
    }

    /// Remembers the key of a serving certificate or endpoint SVID this process minted.
    pub(super) fn remember_served(&mut self, certificate: &[u8]) {
        if let Some(key) = crate::issuer::keys::public::Key::of_certificate(certificate) {
            if self.served.len() >= super::SERVED_KEYS {
                self.served.pop_front();
            }
            self.served.push_back(key);
        }
    }

    pub(super) fn dir(&self) -> String {
        dir_of(&self.policy.trust_domain)
    }

    pub(super) fn bundles(&self) -> Bundles {
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
            crls: self.crls.as_ref().map(|c| c.crls.clone()).unwrap_or_default(),
            revoked: self.crls.as_ref().map(|c| c.serials.clone()).unwrap_or_default(),
            tainted_cas: self.authority.tainted_indices(),
            tainted_kids: self.jwt.tainted_kids(),
        }
    }

    /// Whether the CRLs are due to be signed again: half their validity is gone.
    pub(super) fn crls_due(&self) -> bool {
        self.crls
            .as_ref()
            .is_none_or(|c| now() - c.signed_at > crate::issuer::keys::crl::CRL_VALIDITY / 2)
    }

    /// Signs the CRLs again if what is revoked or the CAs changed since they were signed, or they
    /// are [due](Self::crls_due). There is always one (listing nothing while nothing is revoked), so
    /// a relying party configured with a CRL file always has a current one.
    pub(super) fn update_crls(&mut self, revoked: super::revocations::Revoked) {
        let cas: Vec<u32> = self.authority.statuses().iter().map(|s| s.id).collect();
        if !self.crls_due() && self.crls.as_ref().is_some_and(|c| c.cas == cas && c.revoked == revoked) {
            return;
        }
        let signed_at = now();
        match crate::issuer::keys::crl::sign(&self.authority, &revoked, signed_at) {
            Ok(crls) => {
                tracing::info!(revoked = revoked.len(), "certificate revocation lists signed");
                self.crls = Some(Crls {
                    signed_at,
                    cas,
                    serials: Arc::new(revoked.keys().map(|s| s.as_str().to_owned()).collect()),
                    revoked,
                    crls: Arc::new(crls),
                });
            }
            Err(e) => tracing::error!(error = %e, "cannot sign the certificate revocation lists; the last ones stay"),
        }
    }

    /// Takes a record read from or written to the store, unless memory already has a newer one.
    pub(super) fn remember(&mut self, key: String, record: BotRecord, revision: i64) -> bool {
        if self.bots.get(&key).is_some_and(|(_, known)| *known >= revision) {
            return false;
        }
        let newly_locked = record.locked.is_some() && self.bots.get(&key).is_none_or(|(r, _)| r.locked.is_none());
        self.bots.insert(key, (record, revision));
        newly_locked
    }

    /// Refuses a bot certificate a `revocation` names: neither its holder nor a thief of its key
    /// gets anything with it, a renewal included (the instance must join again).
    pub(super) fn not_revoked(&self, der: &[u8]) -> Result<(), IssuerError> {
        // There is always a CRL: a certificate is parsed (on every issuance) only while it lists
        // something.
        let Some(crls) = self.crls.as_ref().filter(|c| !c.serials.is_empty()) else {
            return Ok(());
        };
        match crate::issuer::keys::crl::serial_of(der) {
            Some(serial) if crls.serials.contains(&serial) => Err(IssuerError::Unauthenticated(format!(
                "this bot certificate (serial {serial}) is revoked by a `revocation` document: the agent must join again (a `token` agent with a new token)"
            ))),
            _ => Ok(()),
        }
    }

    /// Verifies a bot certificate for issuance: ours, valid, not revoked, not locked, not renewed
    /// since.
    pub(super) fn authenticate(&mut self, der: &[u8]) -> Result<Arc<BotClaims>, IssuerError> {
        self.authenticate_signed(der).map(|a| a.claims)
    }

    /// Remembers a verified bot certificate (its signature is not checked again while it is
    /// valid): one seen in a call, or one this process has just signed.
    pub(super) fn remember_verified(&mut self, der: &[u8], verified: bots::VerifiedBot) {
        self.remember_digest(Sha256::digest(der).into(), verified);
    }

    /// [`State::remember_verified`] by the certificate's SHA-256; the claims, shared with the cache.
    fn remember_digest(&mut self, digest: [u8; 32], verified: bots::VerifiedBot) -> Arc<BotClaims> {
        if self.verified.len() >= VERIFIED_CACHE {
            self.verified.clear();
        }
        let claims = Arc::new(verified.claims);
        self.verified
            .insert(digest, (claims.clone(), verified.not_after, verified.signer));
        claims
    }

    /// [`State::authenticate`], with the id of the CA that signed the certificate and its expiry.
    /// The claims are shared with the cache of verified certificates: a call copies nothing.
    pub(super) fn authenticate_signed(&mut self, der: &[u8]) -> Result<Authenticated, IssuerError> {
        self.not_revoked(der)?;
        let digest: [u8; 32] = Sha256::digest(der).into();
        let cached = match self.verified.get(&digest) {
            Some((claims, not_after, signer)) if *not_after > now() => Some((claims.clone(), *signer, *not_after)),
            _ => None,
        };
        let (claims, signer, not_after) = match cached {
            Some(hit) => hit,
            None => {
                let verified = bots::verify_bot_certificate(&self.authority, der, now())?;
                let (signer, not_after) = (verified.signer, verified.not_after);
                (self.remember_digest(digest, verified), signer, not_after)
            }
        };
        let default = BotRecord::default();
        let record = self.bots.get(&claims.instance_key()).map_or(&default, |(r, _)| r);
        if let Some(reason) = &record.locked {
            return Err(IssuerError::Locked {
                bot: claims.bot.clone(),
                reason: reason.clone(),
            });
        }
        if is_token(&claims) {
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
        Ok(Authenticated {
            claims,
            signer,
            not_after,
        })
    }

    /// The attributes a decision reads: the caller's `workload.*` (each of its catalogue type, or
    /// the request is refused naming it), the bot's `user.*`, the join's `join.*`, each read
    /// where it is kept.
    pub(super) fn attributes<'a>(
        &'a self,
        claims: &'a BotClaims,
        workload: &'a Attributes,
    ) -> Result<Caller<'a>, IssuerError> {
        for (name, values) in workload.iter() {
            if let Some(why) = crate::resource::template::workload_value_problem(name, values) {
                // The name and values are the bot's: shown escaped, never raw.
                return Err(IssuerError::Invalid(format!(
                    "workload attribute `{}` = {:?} {why}",
                    name.escape_debug(),
                    values
                )));
            }
        }
        Ok(Caller::new(workload, claims, self.policy.bots.get(&claims.bot)))
    }

    pub(super) fn decide(
        &mut self,
        der: &[u8],
        identity: &str,
        workload: &Attributes,
    ) -> Result<(Decision, Arc<BotClaims>), IssuerError> {
        let claims = self.authenticate(der)?;
        let attrs = self.attributes(&claims, workload)?;
        let decision = decide::decide(&self.policy, &claims.bot, identity, &attrs)?;
        Ok((decision, claims))
    }

    /// An issuance log record of an SVID of `(identity, SPIFFE ID)` for `claims`' bot instance:
    /// the workload attributes recorded are those the identity reads.
    pub(super) fn issued(
        &self,
        kind: IssuedKind,
        claims: &BotClaims,
        (identity, spiffe_id): (&str, &str),
        workload: &Attributes,
        serial: String,
        not_after: time::OffsetDateTime,
    ) -> Issued {
        let reads = self
            .policy
            .identities
            .get(identity)
            .map(|wi| wi.reads())
            .unwrap_or_default();
        let read = |name: &str| {
            reads.iter().any(|r| {
                name == r
                    || name
                        .strip_prefix(r.as_str())
                        .is_some_and(|rest| rest.starts_with(['.', '[']))
            })
        };
        Issued {
            kind,
            serial,
            spiffe_id: spiffe_id.to_owned(),
            bot: claims.bot.clone(),
            instance: claims.instance.clone(),
            identity: identity.to_owned(),
            attributes: workload
                .iter()
                .filter(|(name, _)| read(name))
                .map(|(name, values)| (name.to_owned(), values.to_vec()))
                .collect(),
            audience: Vec::new(),
            issued_at: time::OffsetDateTime::now_utc(),
            not_after,
        }
    }

    pub(super) fn bot_roles(&self, bot: &str) -> Result<Vec<String>, IssuerError> {
        let doc = self.policy.bots.get(bot).ok_or_else(|| {
            IssuerError::JoinRefused(format!("the token names bot `{bot}`, and there is no bot by that name"))
        })?;
        Ok(doc.spec.roles.iter().map(|r| r.to_string()).collect())
    }
}

/// What the admin API and `tbotctl` read of the bot instances and the replicas.
impl super::LocalIssuer {
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
}
