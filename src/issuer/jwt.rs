//! The JWT-SVID signing key (ES256) of a trust domain: persisted, with a stable `kid` derived from the
//! public key, its JWK for the bundle, and compact JWS signing.

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::IssuerError;
use super::backing::Backing;
use crate::kv::{Condition, Op};
use crate::resource::spiffe_id::TrustDomain;

/// The key that signs JWT-SVIDs.
pub struct JwtKey {
    pair: EcdsaKeyPair,
    kid: String,
    jwk: Value,
    rng: SystemRandom,
}

impl JwtKey {
    /// Loads the trust domain's JWT key, creating it on first use (conditionally: replicas racing
    /// here make one key, the losers load the winner's).
    pub async fn load_or_create(backing: &Backing, trust_domain: &TrustDomain) -> Result<JwtKey, IssuerError> {
        let name = format!("issuer/{}/jwt.key", trust_domain.as_str());
        let rng = SystemRandom::new();
        let pkcs8 = loop {
            if let Some(entry) = backing.kv.get(&name).await? {
                break backing.unseal(&name, entry.value)?;
            }
            let document = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
                .map_err(|_| IssuerError::Crypto("cannot generate the JWT signing key".into()))?;
            let sealed = backing.seal(&name, document.as_ref());
            let (created, _) = backing
                .kv
                .txn(vec![Condition::Absent(name.clone())], vec![Op::put(&name, sealed)])
                .await?;
            if created {
                break document.as_ref().to_vec();
            }
        };
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &pkcs8)
            .map_err(|e| backing.corrupt(&name, format!("not an ES256 PKCS#8 key: {e}")))?;
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
        Ok(JwtKey { pair, kid, jwk, rng })
    }

    /// The key id every JWT-SVID carries in its header.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public key as a JWK, with `kid`.
    pub fn jwk(&self) -> &Value {
        &self.jwk
    }

    /// Signs `claims` into a compact JWS with header `{alg: ES256, kid, typ: JWT}`.
    pub fn sign(&self, claims: &Value) -> Result<String, IssuerError> {
        let header = json!({"alg": "ES256", "kid": self.kid, "typ": "JWT"});
        let mut token = format!(
            "{}.{}",
            B64.encode(serde_json::to_vec(&header).expect("json")),
            B64.encode(serde_json::to_vec(claims).expect("json"))
        );
        let signature = self
            .pair
            .sign(&self.rng, token.as_bytes())
            .map_err(|_| IssuerError::Crypto("cannot sign a JWT-SVID".into()))?;
        token.push('.');
        token.push_str(&B64.encode(signature.as_ref()));
        Ok(token)
    }
}
