//! The bot identity: join through the issuer (`token` or `iam`), then keep it fresh — `token` bots
//! renew with their certificate, `iam` bots join again — every `renewal_interval`, with exponential
//! backoff and jitter on failure. The current identity is published on a `watch` channel; while
//! renewals fail, the last one stays in force until it expires.

use std::sync::Arc;
use std::time::Duration;

use rcgen::{KeyPair, PublicKeyData, SigningKey};
use tokio::sync::watch;

use super::AgentMetrics;
use crate::aws::{self, Imds};
use crate::error::Explain;
use crate::issuer::{BotCertificate, Issuer, IssuerError, JoinProof, JoinRequest, RenewRequest};
use crate::resource::agent::JoinMethod;
use crate::store::{Secrecy, Store};

/// A bot's certificate with its private key.
pub struct BotIdentity {
    pub certificate: BotCertificate,
    key: KeyPair,
}

impl std::fmt::Debug for BotIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BotIdentity")
            .field("bot", &self.certificate.bot)
            .field("generation", &self.certificate.generation)
            .field("not_after", &self.certificate.not_after)
            .finish_non_exhaustive()
    }
}

/// How the agent joins: the agent config's `onboarding` and `credential_ttl`.
#[derive(Debug, Clone)]
pub struct JoinSettings {
    pub method: JoinMethod,
    pub token: String,
    pub ttl: Duration,
    pub renewal_interval: Duration,
}

fn new_key() -> Result<KeyPair, IssuerError> {
    KeyPair::generate().map_err(|e| IssuerError::Crypto(e.to_string()))
}

/// Joins from scratch, saves the new identity to `store`, and counts the outcome. `current`, the
/// identity held now (an `iam` bot joining again), keeps its bot instance.
pub async fn join(
    issuer: &dyn Issuer,
    settings: &JoinSettings,
    store: &Store,
    current: Option<&BotIdentity>,
    metrics: &AgentMetrics,
) -> Result<BotIdentity, IssuerError> {
    let method = settings.method.as_str();
    let joined = join_once(issuer, settings, store, current).await;
    metrics.join(method, if joined.is_ok() { "joined" } else { "refused" });
    let identity = match joined {
        Ok(identity) => identity,
        Err(error) => {
            if !error.is_transient() {
                // Refused: there is no lost answer to retry.
                store.remove(PENDING_JOIN_KEY_FILE)?;
            }
            return Err(error);
        }
    };
    crate::failpoint("join-answered");
    identity.save(store)?;
    save_terms(store, settings)?;
    identity.present(issuer);
    // The new identity replaces the old one, and any renewal of the old one that was in flight.
    store.remove(PENDING_JOIN_KEY_FILE)?;
    store.remove(PENDING_KEY_FILE)?;
    Ok(identity)
}

/// What the saved identity joined with: its method and (a digest of) its token, so that an edit of
/// `onboarding` made while the daemon was stopped is seen at the next start.
const TERMS_FILE: &str = "agent/terms.json";

#[derive(serde::Serialize, serde::Deserialize, PartialEq, Eq)]
struct Terms {
    method: String,
    token_sha256: String,
}

impl Terms {
    fn of(settings: &JoinSettings) -> Terms {
        Terms {
            method: settings.method.as_str().to_owned(),
            token_sha256: crate::sha256_hex(settings.token.as_bytes()),
        }
    }
}

fn save_terms(store: &Store, settings: &JoinSettings) -> Result<(), IssuerError> {
    store.write_json(TERMS_FILE, &Terms::of(settings), Secrecy::Public)?;
    Ok(())
}

/// Whether the saved identity joined on other terms than `settings` (`onboarding` was edited while
/// the daemon was stopped). An identity saved by a version that did not record them counts as joined
/// on these.
pub fn terms_changed(store: &Store, settings: &JoinSettings) -> bool {
    let saved: Option<Terms> = store.read_json(TERMS_FILE).ok().flatten();
    saved.is_some_and(|saved| saved != Terms::of(settings))
}

/// Whether a `token` join was in flight when the process stopped: its answer may have been lost,
/// and the issuer may already count the bot from that join (so the saved, older identity must not
/// be renewed first).
pub fn join_pending(store: &Store) -> Result<bool, IssuerError> {
    Ok(store.read(PENDING_JOIN_KEY_FILE)?.is_some())
}

/// The key for the next certificate: the one saved by a join or renewal whose answer was lost, else a
/// new one, saved before the call so that a crash can retry with it.
fn pending_key(store: &Store, file: &str) -> Result<KeyPair, IssuerError> {
    if let Some(der) = store.read(file)?
        && let Ok(key) = KeyPair::try_from(der.as_slice())
    {
        return Ok(key);
    }
    let key = new_key()?;
    store.write(file, &key.serialize_der(), Secrecy::Secret)?;
    Ok(key)
}

async fn join_once(
    issuer: &dyn Issuer,
    settings: &JoinSettings,
    store: &Store,
    current: Option<&BotIdentity>,
) -> Result<BotIdentity, IssuerError> {
    // A `token` is single-use: a join retried after a crash must present the same key.
    let key = match settings.method {
        JoinMethod::Token => pending_key(store, PENDING_JOIN_KEY_FILE)?,
        JoinMethod::Iam => new_key()?,
    };
    let proof = match settings.method {
        JoinMethod::Token => JoinProof::Token,
        JoinMethod::Iam => {
            let challenge = issuer.challenge().await?;
            let request = aws::iam_join_proof(&Imds::from_env(), &challenge)
                .await
                .map_err(IssuerError::StsUnavailable)?;
            JoinProof::Iam { challenge, request }
        }
    };
    let certificate = issuer
        .join(JoinRequest {
            token: settings.token.clone(),
            public_key: key.subject_public_key_info(),
            proof,
            ttl: settings.ttl,
            current: current.map(|c| c.certificate.der.clone()),
            address: String::new(),
        })
        .await?;
    Ok(BotIdentity { certificate, key })
}

/// The key of a join or renewal in flight, saved before the call: if the answer is lost (a crash),
/// the retry presents the same key, and the issuer signs again instead of refusing the used token or
/// locking the bot.
const PENDING_KEY_FILE: &str = "agent/identity.next.key";
/// The same for a `token` join.
const PENDING_JOIN_KEY_FILE: &str = "agent/join.next.key";

/// Renews (`token`) or joins again (`iam`).
pub async fn refresh(
    issuer: &dyn Issuer,
    settings: &JoinSettings,
    current: &BotIdentity,
    store: &Store,
    metrics: &AgentMetrics,
) -> Result<BotIdentity, IssuerError> {
    if settings.method == JoinMethod::Iam {
        return join(issuer, settings, store, Some(current), metrics).await;
    }
    let key = pending_key(store, PENDING_KEY_FILE)?;
    let public_key = key.subject_public_key_info();
    let proof = current
        .key
        .sign(&public_key)
        .map_err(|e| IssuerError::Crypto(e.to_string()))?;
    let certificate = issuer
        .renew(RenewRequest {
            certificate: current.certificate.der.clone(),
            public_key,
            proof,
            ttl: settings.ttl,
            address: String::new(),
        })
        .await?;
    crate::failpoint("renew-answered");
    let identity = BotIdentity { certificate, key };
    identity.save(store)?;
    identity.present(issuer);
    store.remove(PENDING_KEY_FILE)?;
    Ok(identity)
}

const CERT_FILE: &str = "agent/identity.der";
const KEY_FILE: &str = "agent/identity.key";

impl BotIdentity {
    /// Hands the identity to the issuer client, which presents it on its connections from now on.
    pub fn present(&self, issuer: &dyn Issuer) {
        issuer.present(&self.certificate.der, &self.key.serialize_der());
    }

    /// Saves the identity so a restart renews it instead of joining again (a `token` joins once).
    /// The certificate goes first: a crash between the two writes leaves the new certificate with
    /// the old key file, and [`BotIdentity::load`] then finds the new key among the pending ones.
    pub fn save(&self, store: &Store) -> Result<(), IssuerError> {
        // 0600 like the key: whoever reads it learns the bot's claims.
        store.write(CERT_FILE, &self.certificate.der, Secrecy::Secret)?;
        crate::failpoint("identity-half-saved");
        store.write(KEY_FILE, &self.key.serialize_der(), Secrecy::Secret)?;
        Ok(())
    }

    /// The saved identity, if there is one and it has not expired.
    pub fn load(store: &Store) -> Result<Option<BotIdentity>, IssuerError> {
        let (Some(der), Some(key)) = (store.read(CERT_FILE)?, store.read(KEY_FILE)?) else {
            return Ok(None);
        };
        let corrupt = |reason: String| IssuerError::Corrupt {
            path: store.path_of(CERT_FILE),
            reason,
        };
        let key = KeyPair::try_from(key.as_slice()).map_err(|e| corrupt(e.to_string()))?;
        let (_, cert) = x509_parser::parse_x509_certificate(&der).map_err(|e| corrupt(e.to_string()))?;
        // The certificate's key: the saved one, or a pending one if a crash came between the writes.
        let wanted = cert.tbs_certificate.subject_pki.raw;
        let mut key = Some(key);
        for file in [PENDING_KEY_FILE, PENDING_JOIN_KEY_FILE] {
            if key.as_ref().is_some_and(|k| k.subject_public_key_info() == wanted) {
                break;
            }
            key = store.read(file)?.and_then(|der| KeyPair::try_from(der.as_slice()).ok());
        }
        let Some(key) = key.filter(|k| k.subject_public_key_info() == wanted) else {
            tracing::warn!(
                path = %store.path_of(CERT_FILE).display(),
                "the saved bot certificate has no matching key; it cannot be used, so the bot joins again"
            );
            return Ok(None);
        };
        let not_after = cert.validity().not_after.to_datetime();
        if not_after <= time::OffsetDateTime::now_utc() {
            return Ok(None);
        }
        let bot = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .unwrap_or_default()
            .to_owned();
        let certificate = BotCertificate {
            der: der.clone(),
            bot,
            roles: vec![],
            generation: 0,
            not_after,
            join: Default::default(),
            instance: String::new(),
        };
        Ok(Some(BotIdentity { certificate, key }))
    }
}

/// A random factor in [1 - spread, 1 + spread].
pub fn jitter(spread: f64) -> f64 {
    let mut b = [0u8; 8];
    let _ = aws_lc_rs::rand::fill(&mut b);
    let unit = (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64;
    1.0 - spread + 2.0 * spread * unit
}

/// What the renewal task publishes and listens to.
pub struct Renewal {
    /// Each new identity.
    pub tx: watch::Sender<Arc<BotIdentity>>,
    /// Why renewals fail (`None` once one succeeds).
    pub health: watch::Sender<Option<String>>,
    /// Renew at once.
    pub now: Arc<tokio::sync::Notify>,
}

/// Keeps the identity fresh forever (`overdue`: start with a retry): every `renewal_interval`, at
/// once when `renewal.now` is notified, and with backoff (1 s doubling to 5 min, ±20% jitter) after
/// a failure; publishes as [`Renewal`] says.
pub async fn keep_fresh(
    issuer: Arc<dyn Issuer>,
    mut settings_rx: watch::Receiver<JoinSettings>,
    store: Store,
    renewal: Renewal,
    overdue: bool,
    metrics: AgentMetrics,
) {
    let Renewal { tx, health, now } = renewal;
    let mut backoff = Duration::from_secs(1);
    // Every `renewal_interval`, and before half the certificate's life has gone at the latest: a
    // certificate capped by the CA's end (a CA rotation coming) is renewed in time.
    let due = |settings: &JoinSettings, identity: &BotIdentity| {
        let left: Duration = (identity.certificate.not_after - time::OffsetDateTime::now_utc())
            .try_into()
            .unwrap_or(Duration::ZERO);
        settings.renewal_interval.min(left / 2).max(Duration::from_secs(1))
    };
    let mut wait = if overdue {
        backoff.mul_f64(jitter(0.2))
    } else {
        due(&settings_rx.borrow(), &tx.borrow())
    };
    loop {
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            // Asked to renew at once (the CA that signs changed: the certificate moves onto it).
            _ = now.notified() => {}
            // New terms (a rejoin happened): start the renewal interval afresh.
            Ok(()) = settings_rx.changed() => {
                wait = due(&settings_rx.borrow(), &tx.borrow());
                continue;
            }
        }
        let settings = settings_rx.borrow().clone();
        let current = tx.borrow().clone();
        match refresh(issuer.as_ref(), &settings, &current, &store, &metrics).await {
            Ok(identity) => {
                tracing::info!(
                    bot = %identity.certificate.bot,
                    generation = identity.certificate.generation,
                    expires = %identity.certificate.not_after,
                    "bot identity renewed"
                );
                tx.send_replace(Arc::new(identity));
                health.send_if_modified(|h| h.take().is_some());
                backoff = Duration::from_secs(1);
                wait = due(&settings, &tx.borrow());
            }
            Err(error) => {
                wait = backoff.mul_f64(jitter(0.2));
                tracing::warn!(
                    %error,
                    hint = %error.hint(),
                    retry_in = ?wait,
                    expires = %current.certificate.not_after,
                    "bot identity renewal failed; cached SVIDs keep being served until they expire"
                );
                let what = if settings.method == JoinMethod::Iam {
                    "join again"
                } else {
                    "renew"
                };
                health.send_replace(Some(format!(
                    "cannot {what}: {error}; {}; retrying with backoff (next in {:.0?}); cached SVIDs keep being \
                     served, and the current identity is valid until {}",
                    error.hint(),
                    wait,
                    current.certificate.not_after
                )));
                backoff = (backoff * 2).min(Duration::from_secs(300));
            }
        }
    }
}
