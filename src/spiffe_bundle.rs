//! The SPIFFE bundle format (SPIFFE Trust Domain and Bundle §4): a JWK Set whose keys carry `use:
//! x509-svid` (a CA certificate in `x5c`, exactly one) or `use: jwt-svid` (a JWT key with its
//! `kid`), plus `spiffe_sequence` and `spiffe_refresh_hint`. Written by the bundle endpoint, read
//! from other trust domains' endpoints and from `static` federation documents.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde_json::{Map, Value, json};
use x509_parser::public_key::PublicKey;

/// The largest bundle accepted from another trust domain.
pub const MAX_BYTES: usize = 256 * 1024;
/// The most keys accepted in one bundle.
pub const MAX_KEYS: usize = 256;

/// A bundle as read.
#[derive(Debug, Clone, PartialEq)]
pub struct Parsed {
    /// CA certificates (DER).
    pub x509_authorities: Vec<Vec<u8>>,
    /// JWT keys, each a JWK with `kid`.
    pub jwt_keys: Vec<Value>,
    pub sequence: Option<u64>,
    pub refresh_hint: Option<Duration>,
}

/// The JWK of a CA certificate: its public key's parameters, `use: x509-svid`, and the certificate
/// in `x5c` (standard base64 DER).
fn x509_jwk(der: &[u8]) -> Option<Value> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let b64 = |b: &[u8]| URL_SAFE_NO_PAD.encode(b);
    let mut jwk = match cert.public_key().parsed().ok()? {
        PublicKey::EC(point) => {
            let point = point.data();
            let (crv, size) = match point.len() {
                65 => ("P-256", 32),
                97 => ("P-384", 48),
                _ => return None,
            };
            let (x, y) = point[1..].split_at(size);
            json!({"kty": "EC", "crv": crv, "x": b64(x), "y": b64(y)})
        }
        PublicKey::RSA(rsa) => {
            let trim = |b: &[u8]| {
                let start = b.iter().position(|x| *x != 0).unwrap_or(b.len());
                b[start..].to_vec()
            };
            json!({"kty": "RSA", "n": b64(&trim(rsa.modulus)), "e": b64(&trim(rsa.exponent))})
        }
        PublicKey::Unknown(raw) if raw.len() == 32 => json!({"kty": "OKP", "crv": "Ed25519", "x": b64(raw)}),
        _ => return None,
    };
    jwk["use"] = json!("x509-svid");
    jwk["x5c"] = json!([STANDARD.encode(der)]);
    Some(jwk)
}

/// A bundle document: every CA and JWT key, the sequence and the refresh hint.
pub fn encode(x509_authorities: &[Vec<u8>], jwt_keys: &[Value], sequence: u64, refresh_hint: Duration) -> Vec<u8> {
    let keys: Vec<Value> = x509_authorities
        .iter()
        .filter_map(|der| x509_jwk(der))
        .chain(jwt_keys.iter().cloned())
        .collect();
    let doc = json!({
        "keys": keys,
        "spiffe_sequence": sequence,
        "spiffe_refresh_hint": refresh_hint.as_secs().max(1),
    });
    serde_json::to_vec_pretty(&doc).expect("json")
}

/// Reads a bundle document of trust domain `trust_domain`. Keys of another `use` are skipped, as
/// the format says; a key of a known use that is malformed refuses the whole bundle (its publisher
/// has a bug, and half a bundle would silently distrust some SVIDs).
pub fn parse(bytes: &[u8]) -> Result<Parsed, String> {
    if bytes.len() > MAX_BYTES {
        return Err(format!(
            "the bundle is {} bytes, more than the {MAX_BYTES} accepted",
            bytes.len()
        ));
    }
    let doc: Value = serde_json::from_slice(bytes).map_err(|e| format!("the bundle is not JSON: {e}"))?;
    let Value::Object(doc) = doc else {
        return Err("the bundle is not a JSON object".into());
    };
    let keys = match doc.get("keys") {
        Some(Value::Array(keys)) => keys,
        Some(_) => return Err("`keys` is not an array".into()),
        None => return Err("the bundle has no `keys` (it is not a JWK Set)".into()),
    };
    if keys.len() > MAX_KEYS {
        return Err(format!(
            "the bundle has {} keys, more than the {MAX_KEYS} accepted",
            keys.len()
        ));
    }
    let mut out = Parsed {
        x509_authorities: Vec::new(),
        jwt_keys: Vec::new(),
        sequence: None,
        refresh_hint: None,
    };
    for (i, key) in keys.iter().enumerate() {
        let Value::Object(key) = key else {
            return Err(format!("keys[{i}] is not an object"));
        };
        if key.get("kty").and_then(Value::as_str).is_none_or(str::is_empty) {
            return Err(format!("keys[{i}] has no `kty`"));
        }
        match key.get("use").and_then(Value::as_str) {
            Some("x509-svid") => out.x509_authorities.push(x509_authority(i, key)?),
            Some("jwt-svid") => {
                let kid = key.get("kid").and_then(Value::as_str).unwrap_or_default();
                if kid.is_empty() {
                    return Err(format!("keys[{i}] (jwt-svid) has no `kid`"));
                }
                if out.jwt_keys.iter().any(|k| k["kid"] == kid) {
                    return Err(format!("keys[{i}]: the kid `{kid}` is used twice"));
                }
                out.jwt_keys.push(Value::Object(key.clone()));
            }
            _ => {}
        }
    }
    out.sequence = match doc.get("spiffe_sequence") {
        None => None,
        Some(v) => Some(v.as_u64().ok_or("`spiffe_sequence` is not a non-negative integer")?),
    };
    out.refresh_hint = match doc.get("spiffe_refresh_hint") {
        None => None,
        Some(v) => Some(Duration::from_secs(
            v.as_u64()
                .ok_or("`spiffe_refresh_hint` is not a non-negative integer")?,
        )),
    };
    Ok(out)
}

fn x509_authority(i: usize, key: &Map<String, Value>) -> Result<Vec<u8>, String> {
    let x5c = match key.get("x5c") {
        Some(Value::Array(x5c)) if x5c.len() == 1 => x5c,
        _ => {
            return Err(format!(
                "keys[{i}] (x509-svid) must have exactly one certificate in `x5c`"
            ));
        }
    };
    let der = x5c[0]
        .as_str()
        .and_then(|s| STANDARD.decode(s).ok())
        .ok_or_else(|| format!("keys[{i}] (x509-svid): `x5c` is not base64"))?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| format!("keys[{i}] (x509-svid): not an X.509 certificate: {e}"))?;
    if !cert.is_ca() {
        return Err(format!("keys[{i}] (x509-svid): the certificate is not a CA"));
    }
    Ok(der)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca() -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn a_bundle_written_reads_back_and_bad_ones_say_why() {
        let cas = vec![ca(), ca()];
        let jwk = json!({"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA", "kid": "k1", "use": "jwt-svid"});
        let bytes = encode(&cas, std::slice::from_ref(&jwk), 7, Duration::from_secs(300));
        let parsed = parse(&bytes).unwrap();
        assert_eq!(parsed.x509_authorities, cas);
        assert_eq!(parsed.jwt_keys, vec![jwk]);
        assert_eq!(parsed.sequence, Some(7));
        assert_eq!(parsed.refresh_hint, Some(Duration::from_secs(300)));
        let doc: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(doc["keys"][0]["kty"], "EC");
        assert_eq!(doc["keys"][0]["crv"], "P-256");

        for (bad, why) in [
            (&b"[]"[..], "not a JSON object"),
            (br#"{"x": 1}"#, "no `keys`"),
            (br#"{"keys": [{"use": "x509-svid"}]}"#, "no `kty`"),
            (
                br#"{"keys": [{"kty": "EC", "use": "x509-svid", "x5c": []}]}"#,
                "exactly one",
            ),
            (br#"{"keys": [{"kty": "EC", "use": "jwt-svid"}]}"#, "no `kid`"),
            (br#"{"keys": [], "spiffe_sequence": -1}"#, "spiffe_sequence"),
        ] {
            let err = parse(bad).unwrap_err();
            assert!(err.contains(why), "{err} for {}", String::from_utf8_lossy(bad));
        }
        // Keys of another use are skipped.
        assert!(
            parse(br#"{"keys": [{"kty": "EC", "use": "enc"}]}"#)
                .unwrap()
                .x509_authorities
                .is_empty()
        );
        let huge = vec![b' '; MAX_BYTES + 1];
        assert!(parse(&huge).unwrap_err().contains("more than"));
    }
}
