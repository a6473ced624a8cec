//! The issuer's API: the [`Issuer`] trait the agent reaches it through (in process or over the
//! network), its requests and answers, and [`IssuerError`], with its transient or terminal nature and
//! what to do next.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use time::OffsetDateTime;
use tokio::sync::watch;

use super::{Attributes, PolicyEvent};
use crate::aws::{AwsError, SignedRequest};
use crate::store::StoreError;

/// Why the issuer said no, or could not answer.
#[derive(Debug, thiserror::Error)]
pub enum IssuerError {
    /// The storage directory failed; see [`StoreError`].
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A persisted file is missing or unreadable. Restore it, or move the directory aside to start
    /// afresh (a new CA: every workload must fetch the new bundle).
    #[error("{} is damaged: {reason}", path.display())]
    Corrupt { path: PathBuf, reason: String },
    /// Key generation or signing failed inside the crypto library.
    #[error("crypto failure: {0}")]
    Crypto(String),
    /// A join was refused; the message names the check that failed.
    #[error("join refused: {0}")]
    JoinRefused(String),
    /// The remote issuer cannot be reached, or its connection broke: retry with backoff.
    #[error("the issuer cannot be reached: {0}")]
    Unavailable(String),
    /// The request exceeds a limit of the issuer (size, rate); the message names the limit.
    #[error("{0}")]
    Limited(String),
    /// STS could not be reached during an `iam` join: retry with backoff.
    #[error("join not decided yet: {0}")]
    StsUnavailable(AwsError),
    /// The bot's certificate is not one this issuer signed, has expired, or is stale.
    #[error("bot certificate not accepted: {0}")]
    Unauthenticated(String),
    /// A copy of a `token` bot's identity was detected; the bot stays locked until it joins with a
    /// new token.
    #[error("bot `{bot}` is locked: {reason}")]
    Locked { bot: String, reason: String },
    /// The caller may not have this identity; the message names the role, rule, condition or unset
    /// attribute that decided.
    #[error("{0}")]
    Denied(String),
    /// The request itself is wrong (no audience, a bad public key).
    #[error("invalid request: {0}")]
    Invalid(String),
}

impl crate::error::Explain for IssuerError {
    /// Transient errors may pass on a retry; terminal ones need an edit or an operator.
    fn is_transient(&self) -> bool {
        match self {
            IssuerError::Store(e) => e.is_transient(),
            IssuerError::StsUnavailable(_) | IssuerError::Unavailable(_) | IssuerError::Limited(_) => true,
            _ => false,
        }
    }

    /// What to do next.
    fn hint(&self) -> std::borrow::Cow<'_, str> {
        match self {
            IssuerError::Store(e) => e.hint(),
            IssuerError::Corrupt { .. } => {
                "restore the file from a backup, or move the storage directory aside to start with a new CA".into()
            }
            IssuerError::Crypto(_) => "this is a bug or a broken crypto library; report it with the log".into(),
            IssuerError::JoinRefused(_) => "fix the token document or the agent's `onboarding`, then save".into(),
            IssuerError::StsUnavailable(_) => "tbot retries with backoff; check the network path to STS".into(),
            IssuerError::Unavailable(_) => {
                "tbot retries with backoff; check that the issuer runs and that `proxy_server` reaches it".into()
            }
            IssuerError::Limited(_) => {
                "tbot retries later by itself; the issuer's limits are fixed (the message names the one reached): if this is normal load, spread the agents' work over time".into()
            }
            IssuerError::Unauthenticated(_) => {
                "the agent rejoins by itself; if it keeps failing, rejoin with a new token".into()
            }
            IssuerError::Locked { .. } => {
                "find where the bot's identity was copied, then create a new token for the bot and rejoin with it"
                    .into()
            }
            IssuerError::Denied(_) => {
                "the message names what refused it: change that document (`tbotctl diff` shows what an edit does), \
                 or the way the workload runs"
                    .into()
            }
            IssuerError::Invalid(_) => "fix the request".into(),
        }
    }
}

impl From<crate::issuer::policy::decide::Denial> for IssuerError {
    fn from(denial: crate::issuer::policy::decide::Denial) -> IssuerError {
        IssuerError::Denied(denial.to_string())
    }
}

impl From<crate::issuer::bots::join::JoinRefusal> for IssuerError {
    fn from(refusal: crate::issuer::bots::join::JoinRefusal) -> IssuerError {
        IssuerError::JoinRefused(refusal.to_string())
    }
}

/// How a bot proves it may join.
#[derive(Debug, Clone)]
pub enum JoinProof {
    /// `token`: the token's name is the secret.
    Token,
    /// `iam`: a `GetCallerIdentity` request signed over the issuer's challenge.
    Iam { challenge: String, request: SignedRequest },
}

/// A join: the token to join with, the bot's new public key, and the proof.
#[derive(Debug, Clone)]
pub struct JoinRequest {
    /// The `token` document's name.
    pub token: String,
    /// The bot key's SubjectPublicKeyInfo (DER); bot keys are ECDSA P-256.
    pub public_key: Vec<u8>,
    pub proof: JoinProof,
    /// The certificate lifetime asked for (`credential_ttl`); capped at 24h.
    pub ttl: Duration,
    /// The bot certificate the joiner holds now, if any (its key proven by the TLS handshake): a
    /// join with it keeps its bot instance.
    pub current: Option<Vec<u8>>,
    /// Where the join came from, for `tbotctl get bot` (empty in process).
    pub address: String,
}

/// A renewal of a `token`-joined bot: its current certificate, a new public key, and a signature over
/// the new public key with the current key.
#[derive(Debug, Clone)]
pub struct RenewRequest {
    pub certificate: Vec<u8>,
    pub public_key: Vec<u8>,
    /// ECDSA P-256 SHA-256 (ASN.1 DER) signature of `public_key` by the current key.
    pub proof: Vec<u8>,
    pub ttl: Duration,
    /// Where the renewal came from (empty in process).
    pub address: String,
}

/// A bot's certificate and what it says.
#[derive(Debug, Clone, PartialEq)]
pub struct BotCertificate {
    pub der: Vec<u8>,
    pub bot: String,
    pub roles: Vec<String>,
    /// The instance's generation: renewals (`token`) or joins (`iam`) so far.
    pub generation: u64,
    pub not_after: OffsetDateTime,
    /// `join.meta.*` and `join.iam.*`.
    pub join: Attributes,
    /// The bot instance (one per join).
    pub instance: String,
}

/// An X509-SVID request for one workload identity.
#[derive(Debug, Clone)]
pub struct X509Request {
    pub bot_certificate: Vec<u8>,
    pub identity: String,
    /// The caller's attested `workload.*` attributes; anything else is ignored.
    pub workload: Attributes,
    /// The SVID key's SubjectPublicKeyInfo (DER).
    pub public_key: Vec<u8>,
    pub ttl: Duration,
}

/// An X509-SVID (without its private key, which stays with whoever made it).
#[derive(Debug, Clone, PartialEq)]
pub struct X509Svid {
    pub identity: String,
    pub spiffe_id: String,
    pub hint: Option<String>,
    /// The leaf certificate (DER); the bundle's CAs sign it directly.
    pub certificate: Vec<u8>,
    pub not_after: OffsetDateTime,
}

/// A JWT-SVID request for one workload identity.
#[derive(Debug, Clone)]
pub struct JwtRequest {
    pub bot_certificate: Vec<u8>,
    pub identity: String,
    pub workload: Attributes,
    pub audience: Vec<String>,
    pub ttl: Duration,
}

/// A signed JWT-SVID.
#[derive(Debug, Clone, PartialEq)]
pub struct JwtSvid {
    pub identity: String,
    pub spiffe_id: String,
    pub hint: Option<String>,
    pub token: String,
    pub expires: OffsetDateTime,
}

/// The trust bundle of the issuer's trust domain, and those of the trust domains it federates with.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Bundles {
    pub trust_domain: String,
    /// Every trusted CA certificate (DER), oldest first: retiring, active and prepared CAs.
    pub x509_authorities: Vec<Vec<u8>>,
    /// Every JWT signing key as a JWK with `kid`.
    pub jwt_keys: Vec<Value>,
    /// Moves on every change.
    pub sequence: u64,
    /// Which of `x509_authorities` signs now: when it changes (a CA rotation's activation), cached
    /// SVIDs are signed again.
    pub active_ca: usize,
    /// The `kid` of the JWT key that signs now.
    pub active_kid: String,
    /// The bundles of foreign trust domains (`spiffe_federation`), by trust domain name.
    pub federated: BTreeMap<String, Arc<TrustBundle>>,
    /// The certificate revocation lists (DER), one per CA (listing nothing while nothing is revoked).
    pub crls: Arc<Vec<Vec<u8>>>,
    /// The serial numbers (lower-case hex) they list: a cached SVID among them is issued again.
    pub revoked: Arc<std::collections::BTreeSet<String>>,
    /// The positions in `x509_authorities` of the tainted CAs (`tbotctl rotate ca --taint-old`):
    /// what they signed is issued again now, the bot certificate included.
    pub tainted_cas: Vec<usize>,
    /// The `kid`s of the tainted JWT keys: JWT-SVIDs they signed are issued again now.
    pub tainted_kids: Vec<String>,
}

/// What an agent holds that is still valid, by the key that signed it: how the issuer knows who
/// still depends on a key (`tbotctl status`, `tbotctl rotate --revoke-old`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Holdings {
    /// Cached X509-SVIDs by the SPKI pin of the CA that signed them.
    pub x509: BTreeMap<String, u32>,
    /// Cached JWT-SVIDs by `kid`.
    pub jwt: BTreeMap<String, u32>,
    /// The SPKI pin of the CA that signed the agent's bot certificate.
    pub bot: String,
    /// Increases with every report of one agent process: a report that arrives after a newer one
    /// is not kept.
    pub sequence: u64,
}

impl Holdings {
    /// How many SVIDs signed by the key named `key` (a CA's pin or a `kid`), and whether the bot
    /// certificate is one of them.
    pub fn on(&self, key: &str) -> (u64, bool) {
        let count = |m: &BTreeMap<String, u32>| u64::from(m.get(key).copied().unwrap_or(0));
        (count(&self.x509) + count(&self.jwt), self.bot == key)
    }
}

/// A foreign trust domain's bundle, as its bundle endpoint (or a static document) gave it.
#[derive(Debug, Clone, PartialEq)]
pub struct TrustBundle {
    pub trust_domain: String,
    /// Its CA certificates (DER).
    pub x509_authorities: Vec<Vec<u8>>,
    /// Its JWT keys as JWKs.
    pub jwt_keys: Vec<Value>,
}

impl Bundles {
    /// The CA certificate that signs now (DER), if the bundle has one.
    pub fn signing_ca(&self) -> Option<&[u8]> {
        self.x509_authorities.get(self.active_ca).map(Vec::as_slice)
    }

    /// The tainted CA certificates (DER).
    pub fn tainted_x509(&self) -> impl Iterator<Item = &[u8]> {
        self.tainted_cas
            .iter()
            .filter_map(|i| self.x509_authorities.get(*i).map(Vec::as_slice))
    }
}

impl Bundles {
    /// The JWT bundle as a JWK Set.
    pub fn jwks(&self) -> Value {
        json!({ "keys": self.jwt_keys })
    }
}

/// One identity a caller may have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub name: String,
    /// The `workload.*` attributes its rules and templates read.
    pub reads: Vec<String>,
}

/// The answer to a `resolve`: the identities, and the `workload.*` attributes the decision read
/// (every caller that agrees on them gets the same answer while the documents stay the same).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Resolution {
    pub identities: Vec<Resolved>,
    /// `None` from an issuer that does not say (then only the same attributes get the same answer).
    pub decided_on: Option<Vec<String>>,
}

/// Which identities a service serves: one by name, or all that carry some labels.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum IdentitySelector {
    Name(String),
    Labels(BTreeMap<String, String>),
}

/// What the agent asks of an issuer, in-process or (later) over the network.
#[async_trait::async_trait]
pub trait Issuer: Send + Sync {
    /// A fresh single-use challenge for an `iam` join.
    async fn challenge(&self) -> Result<String, IssuerError>;
    /// Joins a bot; the answer is its certificate.
    async fn join(&self, request: JoinRequest) -> Result<BotCertificate, IssuerError>;
    /// Renews a `token`-joined bot's certificate (`iam` bots join again instead).
    async fn renew(&self, request: RenewRequest) -> Result<BotCertificate, IssuerError>;
    /// The identities a selector gives this caller, each with the attributes it reads (so a cache can
    /// share one SVID among callers that agree on them).
    async fn resolve(
        &self,
        bot_certificate: &[u8],
        selector: &IdentitySelector,
        workload: &Attributes,
    ) -> Result<Resolution, IssuerError>;
    /// Mints an X509-SVID.
    async fn issue_x509(&self, request: X509Request) -> Result<X509Svid, IssuerError>;
    /// Mints a JWT-SVID.
    async fn issue_jwt(&self, request: JwtRequest) -> Result<JwtSvid, IssuerError>;
    /// The bundle now and every change to it.
    fn bundles(&self) -> watch::Receiver<Arc<Bundles>>;
    /// The bot credential the agent holds from now on (certificate DER, PKCS#8 key DER), for an
    /// issuer that authenticates connections with it (the remote issuer's TLS client certificate).
    /// The in-process issuer needs nothing.
    fn present(&self, _certificate: &[u8], _key: &[u8]) {}
    /// Changes of the issuer's documents pushed to the agent (a remote issuer). In process there are
    /// none: the daemon that loads the documents tells the agent itself.
    fn policy_events(&self) -> Option<watch::Receiver<Arc<PolicyEvent>>> {
        None
    }
    /// What the agent holds now, by signing key (sent when it changes, and again after a reconnect).
    async fn report(&self, _bot_certificate: &[u8], _holdings: Holdings) -> Result<(), IssuerError> {
        Ok(())
    }
}
