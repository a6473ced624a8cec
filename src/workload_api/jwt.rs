//! `ValidateJWTSVID`: a JWT-SVID checked against the JWT bundle (this trust domain's, or a federated
//! one's), with a typed reason for each way a token can be refused.

use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED, UnparsedPublicKey};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use serde_json::Value;

use crate::issuer::Bundles;

/// Why a JWT-SVID does not validate (the caller gets `InvalidArgument` with this text).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtInvalid {
    #[error("the JWT-SVID is not a compact JWS (three dot-separated parts)")]
    NotCompact,
    #[error("the JWT-SVID's {0} is not base64url")]
    Base64(&'static str),
    #[error("the JWT-SVID's header is not JSON")]
    HeaderJson,
    #[error("the JWT-SVID's `alg` is not ES256")]
    Alg,
    #[error("the JWT-SVID's header has no `kid`")]
    NoKid,
    #[error("the JWT-SVID's claims are not JSON")]
    ClaimsJson,
    #[error("the JWT-SVID's `sub` is not a SPIFFE ID")]
    Subject,
    #[error("the JWT-SVID is of trust domain {claimed}, which is neither {own} nor one it federates with")]
    ForeignDomain { claimed: String, own: String },
    #[error("no key `{kid}` in the JWT bundle of {domain}")]
    UnknownKey { kid: String, domain: String },
    #[error("the key `{kid}` of {domain} is not an EC P-256 key; only ES256 is validated")]
    KeyType { kid: String, domain: String },
    #[error("the bundle's key `{kid}` has no `{name}`")]
    Coordinate { kid: String, name: String },
    #[error("the JWT-SVID's signature does not verify")]
    Signature,
    #[error("the JWT-SVID's claims are not an object")]
    ClaimsObject,
    #[error("the JWT-SVID has expired")]
    Expired,
    #[error("the JWT-SVID has no `exp`")]
    NoExpiry,
    #[error("the JWT-SVID is not for audience `{0}`")]
    Audience(String),
    #[error("the JWT-SVID's `sub` is not a SPIFFE ID of {0}")]
    NotOurs(String),
}

/// Validates a JWT-SVID against the JWT bundle: ES256 signature by a key of the bundle (by `kid`),
/// not expired, `audience` among `aud`, `sub` a SPIFFE ID of the trust domain. Returns the claims.
pub fn validate_jwt(token: &str, audience: &str, bundles: &Bundles) -> Result<Value, JwtInvalid> {
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtInvalid::NotCompact);
    };
    let decode = |part: &str, what: &'static str| B64.decode(part).map_err(|_| JwtInvalid::Base64(what));
    let header: Value = serde_json::from_slice(&decode(header, "header")?).map_err(|_| JwtInvalid::HeaderJson)?;
    if header.get("alg").and_then(Value::as_str) != Some("ES256") {
        return Err(JwtInvalid::Alg);
    }
    let kid = header.get("kid").and_then(Value::as_str).ok_or(JwtInvalid::NoKid)?;
    // The key comes from the bundle of the trust domain the token claims (`sub`): this one, or a
    // federated one. Which domain is checked again once the signature is.
    let unverified: Value = serde_json::from_slice(&decode(payload, "payload")?).map_err(|_| JwtInvalid::ClaimsJson)?;
    let claimed = unverified
        .get("sub")
        .and_then(Value::as_str)
        .and_then(|sub| crate::resource::spiffe_id::SpiffeId::parse(sub).ok())
        .map(|id| id.trust_domain().as_str().to_owned())
        .ok_or(JwtInvalid::Subject)?;
    let keys = if claimed == bundles.trust_domain {
        &bundles.jwt_keys
    } else {
        &bundles
            .federated
            .get(&claimed)
            .ok_or_else(|| JwtInvalid::ForeignDomain {
                claimed: claimed.clone(),
                own: bundles.trust_domain.clone(),
            })?
            .jwt_keys
    };
    let jwk = keys
        .iter()
        .find(|k| k.get("kid").and_then(Value::as_str) == Some(kid))
        .ok_or_else(|| JwtInvalid::UnknownKey {
            kid: kid.to_owned(),
            domain: claimed.clone(),
        })?;
    if jwk.get("kty").and_then(Value::as_str) != Some("EC") || jwk.get("crv").and_then(Value::as_str) != Some("P-256") {
        return Err(JwtInvalid::KeyType {
            kid: kid.to_owned(),
            domain: claimed.clone(),
        });
    }
    let coordinate = |name: &str| {
        jwk.get(name)
            .and_then(Value::as_str)
            .and_then(|c| B64.decode(c).ok())
            .ok_or_else(|| JwtInvalid::Coordinate {
                kid: kid.to_owned(),
                name: name.to_owned(),
            })
    };
    let mut point = vec![4u8];
    point.extend(coordinate("x")?);
    point.extend(coordinate("y")?);
    let signing_input = &token[..token.len() - signature.len() - 1];
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &point)
        .verify(signing_input.as_bytes(), &decode(signature, "signature")?)
        .map_err(|_| JwtInvalid::Signature)?;
    let claims: Value = serde_json::from_slice(&decode(payload, "payload")?).map_err(|_| JwtInvalid::ClaimsJson)?;
    if !claims.is_object() {
        return Err(JwtInvalid::ClaimsObject);
    }
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    match claims.get("exp").and_then(Value::as_i64) {
        Some(exp) if exp > now => {}
        Some(_) => return Err(JwtInvalid::Expired),
        None => return Err(JwtInvalid::NoExpiry),
    }
    let audiences: Vec<&str> = match claims.get("aud") {
        Some(Value::String(one)) => vec![one],
        Some(Value::Array(many)) => many.iter().filter_map(Value::as_str).collect(),
        _ => vec![],
    };
    if !audiences.contains(&audience) {
        return Err(JwtInvalid::Audience(audience.to_owned()));
    }
    let sub = claims.get("sub").and_then(Value::as_str).unwrap_or_default();
    let ours = crate::resource::spiffe_id::SpiffeId::parse(sub)
        .is_ok_and(|id| id.trust_domain().as_str() == claimed && !id.path().is_empty());
    if !ours {
        return Err(JwtInvalid::NotOurs(claimed));
    }
    Ok(claims)
}

impl crate::error::Explain for JwtInvalid {
    fn hint(&self) -> std::borrow::Cow<'_, str> {
        "fetch a fresh JWT-SVID for this audience from the Workload API (`FetchJWTSVID`)".into()
    }
}
