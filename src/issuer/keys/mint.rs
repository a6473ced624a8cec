//! Minting: X509-SVIDs (one URI SAN, `cA=false`, keyUsage digitalSignature, serverAuth + clientAuth,
//! random 128-bit serial, `notBefore` a minute back) and JWT-SVIDs (ES256, `kid`, `typ: JWT`, `sub`,
//! `aud`, `exp`, `iat`, `jti`, optional `iss`, extra claims), from a [`Decision`].

use std::time::Duration;

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, KeyUsagePurpose, PublicKeyData, SanType,
    SubjectPublicKeyInfo,
};
use serde::Serialize;
use serde_json::Value;
use time::OffsetDateTime;

use crate::issuer::keys::ca::{Authority, random_serial};
use crate::issuer::keys::jwt::JwtKey;
use crate::issuer::keys::public::Key;
use crate::issuer::{Decision, IssuerError, JwtSvid, X509Svid};
use crate::resource::workload_identity::RESERVED_CLAIMS;

fn invalid(e: impl std::fmt::Display) -> IssuerError {
    IssuerError::Invalid(e.to_string())
}

/// What a mint made, with the serial number (lower-case hex) or `jti` the issuance log records.
pub struct Minted<T> {
    pub made: T,
    pub serial: String,
}

/// Signs an X509-SVID for `public_key` (SPKI DER), which [`crate::issuer::keys::public::check`]
/// read as `checked`. The lifetime is `ttl` capped by the identity's `x509.maximum_ttl` and by the
/// CA's own expiry.
pub fn x509_svid(
    authority: &Authority,
    decision: Decision,
    public_key: &[u8],
    checked: &Key,
    ttl: Duration,
    now: OffsetDateTime,
) -> Result<Minted<X509Svid>, IssuerError> {
    let ca = authority.active();
    let not_after = (now + ttl.min(decision.x509_max_ttl)).min(ca.not_after());
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    let subject = &decision.subject;
    if let Some(o) = &subject.organization {
        dn.push(DnType::OrganizationName, o.as_str());
    }
    if let Some(ou) = &subject.organizational_unit {
        dn.push(DnType::OrganizationalUnitName, ou.as_str());
    }
    if let Some(cn) = &subject.common_name {
        dn.push(DnType::CommonName, cn.as_str());
    }
    params.distinguished_name = dn;
    params.subject_alt_names = vec![SanType::URI(decision.spiffe_id.as_str().try_into().map_err(invalid)?)];
    for san in &decision.dns_sans {
        params
            .subject_alt_names
            .push(SanType::DnsName(san.as_str().try_into().map_err(invalid)?));
    }
    end_entity(&mut params, public_key);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    let serial = random_serial()?;
    let serial_hex = crate::hex(serial.as_ref());
    params.serial_number = Some(serial);
    params.not_before = now - time::Duration::minutes(1);
    params.not_after = not_after;
    let cert = match checked {
        // The point as checked, in the form rcgen writes back: no second parse.
        Key::P256(point) => params.signed_by(&P256Point(point), ca.issuer()),
        _ => {
            let key = SubjectPublicKeyInfo::from_der(public_key)
                .map_err(|e| invalid(format!("the public key is not a DER SubjectPublicKeyInfo: {e}")))?;
            params.signed_by(&key, ca.issuer())
        }
    }
    .map_err(|e| IssuerError::Crypto(e.to_string()))?;
    Ok(Minted {
        made: X509Svid {
            identity: decision.identity,
            spiffe_id: decision.spiffe_id,
            hint: decision.hint,
            certificate: cert.der().to_vec(),
            not_after,
        },
        serial: serial_hex,
    })
}

/// An uncompressed P-256 point (`04 || x || y`) that [`crate::issuer::keys::public::check`]
/// accepted, as rcgen certifies it: `id-ecPublicKey` with the `prime256v1` curve.
struct P256Point<'a>(&'a [u8]);

impl PublicKeyData for P256Point<'_> {
    fn der_bytes(&self) -> &[u8] {
        self.0
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

/// Signs a JWT-SVID for `audience`. The lifetime is `ttl` capped by the identity's `jwt.maximum_ttl`
/// and by the key's own end.
pub fn jwt_svid(
    key: &JwtKey,
    issuer: Option<&str>,
    decision: Decision,
    audience: &[String],
    ttl: Duration,
    now: OffsetDateTime,
) -> Result<Minted<JwtSvid>, IssuerError> {
    if audience.is_empty() || audience.iter().any(String::is_empty) {
        return Err(invalid("a JWT-SVID needs at least one non-empty audience"));
    }
    let expires = (now + ttl.min(decision.jwt_max_ttl)).min(key.not_after());
    let mut jti = [0u8; 16];
    crate::issuer::keys::unique(&mut jti)?;
    let jti = crate::hex(&jti);
    let token = key.sign(&Claims {
        sub: &decision.spiffe_id,
        aud: Audience::of(audience),
        exp: expires.unix_timestamp(),
        iat: now.unix_timestamp(),
        jti: &jti,
        iss: issuer,
        extra: ExtraClaims(&decision.extra_claims),
    })?;
    Ok(Minted {
        made: JwtSvid {
            identity: decision.identity,
            spiffe_id: decision.spiffe_id,
            hint: decision.hint,
            token,
            expires,
        },
        serial: jti,
    })
}

/// A JWT-SVID's claims, written as they are (no JSON value built first).
#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    aud: Audience<'a>,
    exp: i64,
    iat: i64,
    jti: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
    #[serde(flatten)]
    extra: ExtraClaims<'a>,
}

/// `aud`: a string for one audience, as most verifiers expect, an array for several.
#[derive(Serialize)]
#[serde(untagged)]
enum Audience<'a> {
    One(&'a str),
    Many(&'a [String]),
}

impl Audience<'_> {
    fn of(audience: &[String]) -> Audience<'_> {
        match audience {
            [one] => Audience::One(one),
            many => Audience::Many(many),
        }
    }
}

/// The identity's `extra_claims`, without any claim tbot sets itself: the document check refuses
/// those names already, and a token never carries a claim twice.
struct ExtraClaims<'a>(&'a serde_json::Map<String, Value>);

impl Serialize for ExtraClaims<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(
            self.0
                .iter()
                .filter(|(name, _)| !RESERVED_CLAIMS.contains(&name.as_str())),
        )
    }
}

/// A serving certificate with its CA certificate and its key (PKCS#8 DER), all DER.
pub struct ServingCertificate {
    pub certificate: Vec<u8>,
    pub ca: Vec<u8>,
    pub key: Vec<u8>,
    /// Served after the CA: the active CA cross-signed by each other published CA, and that CA
    /// (the issuer API's only; see [`Authority::cross_chain`]).
    pub cross: Vec<Vec<u8>>,
}

/// A serving certificate for the issuer API: the names and addresses agents reach it by, signed by
/// the active CA (so one CA pin trusts every replica). The key is made here and never leaves the
/// process.
pub fn serving_certificate(
    authority: &Authority,
    names: &[String],
    ttl: Duration,
    now: OffsetDateTime,
) -> Result<ServingCertificate, IssuerError> {
    let mut sans = Vec::new();
    for name in names {
        sans.push(match name.parse::<std::net::IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(
                name.as_str()
                    .try_into()
                    .map_err(|e| invalid(format!("`{name}` cannot be a certificate name: {e}")))?,
            ),
        });
    }
    let cn = names.first().map_or("tbot issuer", String::as_str);
    let mut made = serving(authority, sans, cn, ttl, now)?;
    made.cross = authority.cross_chain(now)?;
    Ok(made)
}

/// The bundle endpoint's X509-SVID (`https_spiffe`): `spiffe_id` as its only name.
pub fn endpoint_svid(
    authority: &Authority,
    spiffe_id: &str,
    ttl: Duration,
    now: OffsetDateTime,
) -> Result<ServingCertificate, IssuerError> {
    let uri = SanType::URI(spiffe_id.try_into().map_err(invalid)?);
    serving(authority, vec![uri], "tbot bundle endpoint", ttl, now)
}

fn serving(
    authority: &Authority,
    sans: Vec<SanType>,
    cn: &str,
    ttl: Duration,
    now: OffsetDateTime,
) -> Result<ServingCertificate, IssuerError> {
    let pair = rcgen::KeyPair::generate().map_err(|e| IssuerError::Crypto(e.to_string()))?;
    let spki = rcgen::PublicKeyData::subject_public_key_info(&pair);
    let ca = authority.active();
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "tbot issuer");
    dn.push(DnType::CommonName, cn);
    params.distinguished_name = dn;
    params.subject_alt_names = sans;
    end_entity(&mut params, &spki);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial()?);
    params.not_before = now - time::Duration::minutes(1);
    params.not_after = (now + ttl).min(ca.not_after());
    let cert = params
        .signed_by(&pair, ca.issuer())
        .map_err(|e| IssuerError::Crypto(e.to_string()))?;
    Ok(ServingCertificate {
        certificate: cert.der().to_vec(),
        ca: ca.certificate_der().to_vec(),
        key: pair.serialize_der(),
        cross: Vec::new(),
    })
}

/// Marks `params` as an end-entity certificate in strict DER: a critical basicConstraints whose
/// `cA` is left out (DER forbids encoding a DEFAULT value, X.690 §11.5, and `cA` defaults to FALSE;
/// rcgen's `ExplicitNoCa` writes `cA FALSE`, which Python `cryptography`, BoringSSL and Go reject),
/// and a subjectKeyIdentifier (the first 20 bytes of SHA-256 over the SubjectPublicKeyInfo).
pub fn end_entity(params: &mut rcgen::CertificateParams, public_key: &[u8]) {
    use sha2::Digest;
    const BASIC_CONSTRAINTS: &[u64] = &[2, 5, 29, 19];
    const SUBJECT_KEY_IDENTIFIER: &[u64] = &[2, 5, 29, 14];
    params.is_ca = rcgen::IsCa::NoCa;
    // An empty SEQUENCE: cA FALSE by default, no pathLenConstraint.
    let mut basic = rcgen::CustomExtension::from_oid_content(BASIC_CONSTRAINTS, vec![0x30, 0x00]);
    basic.set_criticality(true);
    let digest = sha2::Sha256::digest(public_key);
    let mut ski = vec![0x04, 20];
    ski.extend_from_slice(&digest[..20]);
    params.custom_extensions.push(basic);
    params
        .custom_extensions
        .push(rcgen::CustomExtension::from_oid_content(SUBJECT_KEY_IDENTIFIER, ski));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(audience: &[String], extra: &serde_json::Map<String, Value>) -> String {
        serde_json::to_string(&Claims {
            sub: "spiffe://example.org/web",
            aud: Audience::of(audience),
            exp: 20,
            iat: 10,
            jti: "00ff",
            iss: None,
            extra: ExtraClaims(extra),
        })
        .unwrap()
    }

    #[test]
    fn the_claims_are_written_once_each_and_an_extra_claim_never_replaces_one_tbot_sets() {
        let extra = serde_json::json!({"sub": "spiffe://example.org/admin", "exp": 99, "team": "a"});
        let text = written(&["db".to_owned()], extra.as_object().unwrap());
        assert_eq!(
            text,
            r#"{"sub":"spiffe://example.org/web","aud":"db","exp":20,"iat":10,"jti":"00ff","team":"a"}"#
        );
        let text = written(&["db".to_owned(), "cache".to_owned()], &Default::default());
        assert_eq!(
            text,
            r#"{"sub":"spiffe://example.org/web","aud":["db","cache"],"exp":20,"iat":10,"jti":"00ff"}"#
        );
    }
}
