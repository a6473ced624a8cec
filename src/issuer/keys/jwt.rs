//! The JWT-SVID signing keys (ES256) of a trust domain: the active one signs, a prepared one and the
//! retiring ones are published in the JWKS, each with a stable `kid` derived from its public key.
//! `jwt.json` records them and the rotation schedule (`issuer::keys::rotation`); each key is
//! `jwt-<id>.key` (sealed), or `jwt.key` for the one key of earlier versions.

use std::sync::Arc;
use std::time::Duration;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::issuer::IssuerError;
use crate::issuer::keys::rotation::{self, KeyRecord, KeyStatus, RevokedKey, Rotation, Step};
use crate::issuer::state::backing::Backing;
use crate::kv::Op;
use crate::resource::cluster::DEFAULT_KEY_VALIDITY;
use crate::resource::spiffe_id::TrustDomain;

/// The longest a JWT-SVID lives (`jwt.maximum_ttl` is capped at it): a retired key stays published
/// this long after its successor took over.
const LONGEST_JWT: i64 = 24 * 3600;

/// What the `cluster` document says about the JWT signing key.
#[derive(Debug, Clone, PartialEq)]
pub struct JwtSettings {
    pub validity: Duration,
    pub rotation: Rotation,
}

impl Default for JwtSettings {
    fn default() -> Self {
        JwtSettings {
            validity: DEFAULT_KEY_VALIDITY,
            rotation: Rotation::default_for(DEFAULT_KEY_VALIDITY),
        }
    }
}

/// One key that signs (or signed, or will sign) JWT-SVIDs.
pub struct JwtKey {
    pair: EcdsaKeyPair,
    kid: String,
    jwk: Value,
    /// The token's encoded header `{alg: ES256, kid, typ: JWT}`, the same for every token.
    header: String,
    rng: SystemRandom,
    not_after: i64,
}

impl JwtKey {
    fn from_pkcs8(pkcs8: &[u8], not_after: i64) -> Result<JwtKey, aws_lc_rs::error::KeyRejected> {
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8)?;
        // The public key is the uncompressed point 04 || x || y.
        let point = pair.public_key().as_ref();
        let (x, y) = point[1..].split_at(32);
        let kid = B64.encode(&Sha256::digest(point)[..16]);
        let jwk = json!({
            "kty": "EC",
            "crv": "P-256",
            "x": B64.encode(x),
            "y": B64.encode(y),
            "kid": kid,
            "alg": "ES256",
            "use": "jwt-svid",
        });
        let header = json!({"alg": "ES256", "kid": kid, "typ": "JWT"});
        let header = B64.encode(serde_json::to_vec(&header).expect("json"));
        Ok(JwtKey {
            pair,
            kid,
            jwk,
            header,
            rng: SystemRandom::new(),
            not_after,
        })
    }

    /// The key id every JWT-SVID it signs carries in its header.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public key as a JWK, with `kid`.
    pub fn jwk(&self) -> &Value {
        &self.jwk
    }

    /// When the key stops signing at the latest: no JWT-SVID it signs lives longer.
    pub fn not_after(&self) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(self.not_after).expect("a valid timestamp")
    }

    /// Signs `claims` into a compact JWS with header `{alg: ES256, kid, typ: JWT}`.
    pub fn sign(&self, claims: &impl Serialize) -> Result<String, IssuerError> {
        let payload = serde_json::to_vec(claims).expect("json");
        // The token in one string sized for all of it: the header, the payload and the 64-byte
        // signature (86 characters) in base64.
        let mut token = String::with_capacity(self.header.len() + 2 + payload.len().div_ceil(3) * 4 + 86);
        token.push_str(&self.header);
        token.push('.');
        B64.encode_string(&payload, &mut token);
        let signature = self
            .pair
            .sign(&self.rng, token.as_bytes())
            .map_err(|_| IssuerError::Crypto("cannot sign a JWT-SVID".into()))?;
        token.push('.');
        B64.encode_string(signature.as_ref(), &mut token);
        Ok(token)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct JwtFile {
    active: u32,
    keys: Vec<KeyRecord>,
    /// Keys withdrawn by hand, until their own end.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    revoked: Vec<RevokedKey>,
}

/// Every JWT key of a trust domain. Cheap to clone; changed on a copy written conditionally, as
/// the CA's [`crate::issuer::keys::ca::Authority`].
#[derive(Clone)]
pub struct JwtKeys {
    trust_domain: TrustDomain,
    keys: Vec<Arc<JwtKey>>,
    records: Vec<KeyRecord>,
    active: u32,
    /// Keys withdrawn by hand (`tbotctl rotate jwt --revoke-old`), until their own end.
    revoked: Vec<RevokedKey>,
    revision: i64,
}

fn dir(td: &TrustDomain) -> String {
    format!("issuer/{}", td.as_str())
}

fn file_key(td: &TrustDomain) -> String {
    format!("{}/jwt.json", dir(td))
}

fn key_name(td: &TrustDomain, id: u32) -> String {
    match id {
        0 => format!("{}/jwt.key", dir(td)),
        id => format!("{}/jwt-{id}.key", dir(td)),
    }
}

fn new_pkcs8() -> Result<Vec<u8>, IssuerError> {
    EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
        .map(|d| d.as_ref().to_vec())
        .map_err(|_| IssuerError::Crypto("cannot generate a JWT signing key".into()))
}

impl JwtKeys {
    /// Loads the trust domain's JWT keys; `None` when `jwt.json` does not exist yet.
    pub async fn load(backing: &Backing, trust_domain: &TrustDomain) -> Result<Option<JwtKeys>, IssuerError> {
        let file_key = file_key(trust_domain);
        let Some((file, revision)) = backing.get_json::<JwtFile>(&file_key).await? else {
            return Ok(None);
        };
        let mut keys = Vec::new();
        for record in &file.keys {
            let name = key_name(trust_domain, record.id);
            let stored = backing
                .kv
                .get(&name)
                .await?
                .ok_or_else(|| backing.corrupt(&name, "it is missing"))?
                .value;
            let pkcs8 = backing.unseal(&name, stored)?;
            let key = JwtKey::from_pkcs8(&pkcs8, record.not_after)
                .map_err(|e| backing.corrupt(&name, format!("not an ES256 PKCS#8 key: {e}")))?;
            keys.push(Arc::new(key));
        }
        if !file.keys.iter().any(|r| r.id == file.active) {
            return Err(backing.corrupt(&file_key, format!("the active key {} is not listed", file.active)));
        }
        Ok(Some(JwtKeys {
            trust_domain: trust_domain.clone(),
            keys,
            records: file.keys,
            active: file.active,
            revoked: file.revoked,
            revision,
        }))
    }

    /// Loads the JWT keys, creating the first one when there is none (conditionally: replicas racing
    /// here make one, the losers load the winner's). The single `jwt.key` of earlier versions
    /// becomes the active key.
    pub async fn load_or_create(
        backing: &Backing,
        trust_domain: &TrustDomain,
        settings: &JwtSettings,
        now: OffsetDateTime,
    ) -> Result<JwtKeys, IssuerError> {
        loop {
            if let Some(keys) = JwtKeys::load(backing, trust_domain).await? {
                return Ok(keys);
            }
            let legacy = backing.kv.get(&key_name(trust_domain, 0)).await?.is_some();
            let empty = JwtKeys {
                trust_domain: trust_domain.clone(),
                keys: Vec::new(),
                records: Vec::new(),
                active: 0,
                revoked: Vec::new(),
                revision: 0,
            };
            let (mut created, ops) = if legacy {
                let mut adopted = empty;
                adopted.records.push(record(0, settings, now, None));
                (adopted, Vec::new())
            } else {
                empty.with_new_key(backing, settings, now, None)?
            };
            // Loaded again after the write, so an adopted key's material is read like any other.
            if created.save(backing, ops).await?
                && let Some(keys) = JwtKeys::load(backing, trust_domain).await?
            {
                return Ok(keys);
            }
        }
    }

    /// The id of the key that signs.
    pub fn active_id(&self) -> u32 {
        self.active
    }

    /// The key that signs.
    pub fn active(&self) -> &JwtKey {
        let at = self.records.iter().position(|r| r.id == self.active).unwrap_or(0);
        &self.keys[at]
    }

    /// Whether `key` (as [`crate::issuer::keys::public::check`] reads it) is one of these keys.
    pub fn holds(&self, key: &crate::issuer::keys::public::Key) -> bool {
        use crate::issuer::keys::public::Key;
        self.keys
            .iter()
            .any(|k| matches!(key, Key::P256(point) if point.as_slice() == k.pair.public_key().as_ref()))
    }

    /// Every published key as a JWK (prepared, active and retiring).
    pub fn jwks(&self) -> Vec<Value> {
        self.keys.iter().map(|k| k.jwk().clone()).collect()
    }

    /// The `mod_revision` of `jwt.json` this copy reflects.
    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// The rotation step due at `now`, or when the next one is.
    pub fn due(&self, settings: &JwtSettings, now: OffsetDateTime) -> (Option<Step>, Option<i64>) {
        rotation::due(&self.records, self.active, &settings.rotation, now.unix_timestamp())
    }

    /// What `tbotctl rotate jwt` would do now, or why it is refused.
    pub fn by_hand(&self, asked: rotation::ByHand, now: OffsetDateTime) -> Result<Step, rotation::Refused> {
        rotation::by_hand(&self.records, self.active, asked, now.unix_timestamp())
    }

    /// The `kid`s of the tainted keys: agents issue again the JWT-SVIDs they signed.
    pub fn tainted_kids(&self) -> Vec<String> {
        self.records
            .iter()
            .zip(&self.keys)
            .filter(|(r, _)| r.tainted.is_some())
            .map(|(_, k)| k.kid().to_owned())
            .collect()
    }

    /// A copy with `step` taken, and the store writes it needs besides `jwt.json`.
    pub fn stepped(
        &self,
        backing: &Backing,
        step: Step,
        settings: &JwtSettings,
        now: OffsetDateTime,
    ) -> Result<(JwtKeys, Vec<Op>), IssuerError> {
        let now_unix = now.unix_timestamp();
        let mut next = self.clone();
        match step {
            Step::Prepare { activate_at } => return self.with_new_key(backing, settings, now, Some(activate_at)),
            Step::Activate { id } => rotation::activate(&mut next.records, &mut next.active, id, |r| {
                (now_unix + LONGEST_JWT).min(r.not_after).max(now_unix)
            }),
            Step::Taint { activate } => {
                if let Some(id) = activate {
                    rotation::activate(&mut next.records, &mut next.active, id, |r| {
                        (now_unix + LONGEST_JWT).min(r.not_after).max(now_unix)
                    });
                }
                rotation::taint(&mut next.records, next.active, now_unix);
            }
            Step::Revoke => {
                let revoked = rotation::revoke(&mut next.records, &mut next.keys, next.active, now_unix, |k| {
                    k.kid().to_owned()
                });
                next.revoked.extend(revoked);
            }
            Step::Retire => {
                next.revoked.retain(|r| r.not_after > now_unix);
                rotation::retire(&mut next.records, &mut next.keys, next.active, now_unix);
            }
            Step::RetireEarly => {
                rotation::retire_early(&mut next.records, &mut next.keys, next.active);
            }
        }
        Ok((next, Vec::new()))
    }

    /// Every key's phase and dates.
    pub fn statuses(&self) -> Vec<KeyStatus> {
        self.records
            .iter()
            .zip(&self.keys)
            .map(|(r, k)| KeyStatus {
                kind: "jwt",
                id: r.id,
                name: k.kid().to_owned(),
                phase: rotation::phase(r, self.active),
                created: r.created,
                not_after: r.not_after,
            })
            .chain(self.revoked.iter().map(|r| KeyStatus::revoked("jwt", r)))
            .collect()
    }

    fn with_new_key(
        &self,
        backing: &Backing,
        settings: &JwtSettings,
        now: OffsetDateTime,
        activate_at: Option<i64>,
    ) -> Result<(JwtKeys, Vec<Op>), IssuerError> {
        let id = self.records.iter().map(|r| r.id).max().unwrap_or(0) + 1;
        let first = self.records.is_empty();
        let pkcs8 = new_pkcs8()?;
        let record = record(id, settings, now, if first { None } else { activate_at });
        let key = JwtKey::from_pkcs8(&pkcs8, record.not_after)
            .map_err(|e| IssuerError::Crypto(format!("not an ES256 PKCS#8 key: {e}")))?;
        let name = key_name(&self.trust_domain, id);
        let ops = vec![Op::put(&name, backing.seal(&name, &pkcs8))];
        let mut next = self.clone();
        next.records.push(record);
        next.keys.push(Arc::new(key));
        if first {
            next.active = id;
        }
        Ok((next, ops))
    }

    /// Writes `jwt.json` (with `ops`) if nobody wrote it since this copy was read. Returns whether
    /// it was written; when not, load the newer one and decide again.
    pub async fn save(&mut self, backing: &Backing, ops: Vec<Op>) -> Result<bool, IssuerError> {
        let file = JwtFile {
            active: self.active,
            keys: self.records.clone(),
            revoked: self.revoked.clone(),
        };
        backing
            .put_json_if_unchanged(file_key(&self.trust_domain), &file, &mut self.revision, ops)
            .await
    }
}

fn record(id: u32, settings: &JwtSettings, now: OffsetDateTime, activate_at: Option<i64>) -> KeyRecord {
    let now = now.unix_timestamp();
    KeyRecord {
        id,
        algorithm: "es256".into(),
        not_after: now + i64::try_from(settings.validity.as_secs()).unwrap_or(i64::MAX / 2),
        issued_until: now,
        retire_after: None,
        validity: Some(settings.validity.as_secs()),
        activate_at,
        created: now,
        tainted: None,
    }
}
