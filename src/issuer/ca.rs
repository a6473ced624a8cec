//! The X.509 certificate authority of one trust domain: created on first use, persisted through
//! `store`, reused across restarts, and rotated with an overlap during which both CAs are trusted.

use aws_lc_rs::signature::{self, UnparsedPublicKey, VerificationAlgorithm};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose, SanType,
    SerialNumber,
};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;

use super::IssuerError;
use crate::resource::cluster::KeyAlgorithm;
use crate::resource::spiffe_id::TrustDomain;
use crate::store::{Secrecy, Store};

/// The CA's validity when `cluster.spec.ca.validity` is not set: one year.
pub const DEFAULT_VALIDITY: std::time::Duration = std::time::Duration::from_secs(8760 * 3600);

/// What the `cluster` document says about the CA.
#[derive(Debug, Clone, PartialEq)]
pub struct CaSettings {
    pub algorithm: KeyAlgorithm,
    pub validity: std::time::Duration,
}

impl Default for CaSettings {
    fn default() -> Self {
        CaSettings {
            algorithm: KeyAlgorithm::EcdsaP256,
            validity: DEFAULT_VALIDITY,
        }
    }
}

/// One CA as recorded in `ca.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CaRecord {
    id: u32,
    algorithm: String,
    /// Unix seconds.
    not_after: i64,
    /// The latest expiry of anything this CA signed, rounded up (Unix seconds).
    issued_until: i64,
    /// Set when a newer CA took over: the CA stays in the bundle until then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    retire_after: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct CaFile {
    active: u32,
    cas: Vec<CaRecord>,
}

/// A CA with its key, ready to sign.
pub struct Ca {
    record: CaRecord,
    cert_der: Vec<u8>,
    issuer: rcgen::Issuer<'static, KeyPair>,
    public_key: Vec<u8>,
    algorithm: KeyAlgorithm,
}

impl Ca {
    pub fn certificate_der(&self) -> &[u8] {
        &self.cert_der
    }

    pub fn not_after(&self) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(self.record.not_after).expect("a valid timestamp")
    }

    pub fn algorithm(&self) -> KeyAlgorithm {
        self.algorithm
    }

    pub(super) fn issuer(&self) -> &rcgen::Issuer<'static, KeyPair> {
        &self.issuer
    }

    fn verification(&self) -> &'static dyn VerificationAlgorithm {
        match self.algorithm {
            KeyAlgorithm::EcdsaP256 => &signature::ECDSA_P256_SHA256_ASN1,
            KeyAlgorithm::Rsa2048 => &signature::RSA_PKCS1_2048_8192_SHA256,
            KeyAlgorithm::Ed25519 => &signature::ED25519,
        }
    }

    /// Whether this CA signed `cert`.
    pub fn signed(&self, cert: &X509Certificate<'_>) -> bool {
        UnparsedPublicKey::new(self.verification(), &self.public_key)
            .verify(cert.tbs_certificate.as_ref(), &cert.signature_value.data)
            .is_ok()
    }
}

/// Every CA of a trust domain: the active one signs, the retiring ones stay trusted.
pub struct Authority {
    trust_domain: TrustDomain,
    /// Oldest first; the active CA is the last.
    cas: Vec<Ca>,
}

fn dir(td: &TrustDomain) -> String {
    format!("issuer/{}", td.as_str())
}

fn unix(t: OffsetDateTime) -> i64 {
    t.unix_timestamp()
}

impl Authority {
    /// Loads the trust domain's CAs from the store, creating the first one when there is none.
    pub fn load_or_create(
        store: &Store,
        trust_domain: &TrustDomain,
        settings: &CaSettings,
        now: OffsetDateTime,
    ) -> Result<Authority, IssuerError> {
        let dir = dir(trust_domain);
        let Some(file) = store.read_json::<CaFile>(&format!("{dir}/ca.json"))? else {
            let mut authority = Authority {
                trust_domain: trust_domain.clone(),
                cas: Vec::new(),
            };
            authority.add_ca(store, settings, now)?;
            return Ok(authority);
        };
        let mut cas = Vec::new();
        for record in file.cas {
            let cert_name = format!("{dir}/ca-{}.der", record.id);
            let key_name = format!("{dir}/ca-{}.key", record.id);
            let missing = |name: &str| IssuerError::Corrupt {
                path: store.path_of(name),
                reason: "the file is missing".into(),
            };
            let cert_der = store.read(&cert_name)?.ok_or_else(|| missing(&cert_name))?;
            let key_der = store.read(&key_name)?.ok_or_else(|| missing(&key_name))?;
            let corrupt = |name: &str, e: rcgen::Error| IssuerError::Corrupt {
                path: store.path_of(name),
                reason: e.to_string(),
            };
            let key = KeyPair::try_from(key_der.as_slice()).map_err(|e| corrupt(&key_name, e))?;
            let algorithm = KeyAlgorithm::parse(&record.algorithm).ok_or_else(|| IssuerError::Corrupt {
                path: store.path_of(&format!("{dir}/ca.json")),
                reason: format!("unknown key algorithm `{}`", record.algorithm),
            })?;
            let public_key = key.public_key_raw().to_vec();
            let issuer = rcgen::Issuer::from_ca_cert_der(&cert_der.as_slice().into(), key)
                .map_err(|e| corrupt(&cert_name, e))?;
            cas.push(Ca {
                record,
                cert_der,
                issuer,
                public_key,
                algorithm,
            });
        }
        // The active CA goes last.
        let Some(active) = cas.iter().position(|ca| ca.record.id == file.active) else {
            return Err(IssuerError::Corrupt {
                path: store.path_of(&format!("{dir}/ca.json")),
                reason: format!("the active CA {} is not listed", file.active),
            });
        };
        let active = cas.remove(active);
        cas.push(active);
        Ok(Authority {
            trust_domain: trust_domain.clone(),
            cas,
        })
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The CA that signs new certificates.
    pub fn active(&self) -> &Ca {
        self.cas.last().expect("an authority always has a CA")
    }

    /// Every trusted CA, oldest first.
    pub fn cas(&self) -> &[Ca] {
        &self.cas
    }

    /// The CA that signed `cert`, if any of ours did.
    pub fn signer_of(&self, cert: &X509Certificate<'_>) -> Option<&Ca> {
        self.cas.iter().rev().find(|ca| ca.signed(cert))
    }

    /// Starts a rotation: a new CA signs from now on; the old one stays in the bundle until the last
    /// certificate it signed has expired.
    pub fn rotate(&mut self, store: &Store, settings: &CaSettings, now: OffsetDateTime) -> Result<(), IssuerError> {
        let old = self.cas.last_mut().expect("an authority always has a CA");
        old.record.retire_after = Some(old.record.issued_until.max(unix(now)));
        self.add_ca(store, settings, now)
    }

    /// Drops retired CAs whose overlap has ended. Returns whether the bundle changed.
    pub fn prune(&mut self, store: &Store, now: OffsetDateTime) -> Result<bool, IssuerError> {
        let before = self.cas.len();
        self.cas
            .retain(|ca| ca.record.retire_after.is_none_or(|until| until > unix(now)));
        if self.cas.len() == before {
            return Ok(false);
        }
        self.save(store)?;
        Ok(true)
    }

    /// Records that the active CA signed something valid until `not_after`, so a rotation keeps the
    /// CA trusted long enough. Writes at most about once an hour of advance.
    pub fn note_issued(&mut self, store: &Store, not_after: OffsetDateTime) -> Result<(), IssuerError> {
        let record = &mut self.cas.last_mut().expect("an authority always has a CA").record;
        if unix(not_after) <= record.issued_until {
            return Ok(());
        }
        record.issued_until = unix(not_after) + 3600;
        self.save(store)
    }

    fn add_ca(&mut self, store: &Store, settings: &CaSettings, now: OffsetDateTime) -> Result<(), IssuerError> {
        let id = self.cas.iter().map(|ca| ca.record.id).max().unwrap_or(0) + 1;
        let key = generate_key(settings.algorithm)?;
        let not_after = now + settings.validity;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, self.trust_domain.as_str());
        dn.push(
            DnType::CommonName,
            format!("tbot CA {id} for {}", self.trust_domain.as_str()),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.subject_alt_names = vec![SanType::URI(
            format!("spiffe://{}", self.trust_domain.as_str())
                .try_into()
                .map_err(crypto)?,
        )];
        params.serial_number = Some(random_serial()?);
        params.not_before = now - time::Duration::minutes(1);
        params.not_after = not_after;
        let cert = params.self_signed(&key).map_err(crypto)?;
        let dir = dir(&self.trust_domain);
        store.write(&format!("{dir}/ca-{id}.key"), key.serialized_der(), Secrecy::Secret)?;
        store.write(&format!("{dir}/ca-{id}.der"), cert.der(), Secrecy::Public)?;
        let public_key = key.public_key_raw().to_vec();
        let record = CaRecord {
            id,
            algorithm: settings.algorithm.as_str().to_owned(),
            not_after: unix(not_after),
            issued_until: unix(now),
            retire_after: None,
        };
        self.cas.push(Ca {
            record,
            cert_der: cert.der().to_vec(),
            issuer: rcgen::Issuer::new(params, key),
            public_key,
            algorithm: settings.algorithm,
        });
        self.save(store)
    }

    fn save(&self, store: &Store) -> Result<(), IssuerError> {
        let file = CaFile {
            active: self.active().record.id,
            cas: self.cas.iter().map(|ca| ca.record.clone()).collect(),
        };
        store.write_json(&format!("{}/ca.json", dir(&self.trust_domain)), &file, Secrecy::Public)?;
        Ok(())
    }
}

impl KeyAlgorithm {
    fn parse(s: &str) -> Option<KeyAlgorithm> {
        [KeyAlgorithm::EcdsaP256, KeyAlgorithm::Rsa2048, KeyAlgorithm::Ed25519]
            .into_iter()
            .find(|a| a.as_str() == s)
    }
}

fn crypto(e: impl std::fmt::Display) -> IssuerError {
    IssuerError::Crypto(e.to_string())
}

/// A new key pair of the given algorithm.
pub fn generate_key(algorithm: KeyAlgorithm) -> Result<KeyPair, IssuerError> {
    match algorithm {
        KeyAlgorithm::EcdsaP256 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256),
        KeyAlgorithm::Ed25519 => KeyPair::generate_for(&rcgen::PKCS_ED25519),
        KeyAlgorithm::Rsa2048 => KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048),
    }
    .map_err(crypto)
}

/// A random positive 128-bit serial number.
pub fn random_serial() -> Result<SerialNumber, IssuerError> {
    let mut bytes = [0u8; 16];
    aws_lc_rs::rand::fill(&mut bytes).map_err(|_| IssuerError::Crypto("the random generator failed".into()))?;
    bytes[0] &= 0x7f;
    bytes[0] |= 0x40;
    Ok(SerialNumber::from_slice(&bytes))
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

/// The pin of a CA certificate (DER), as Teleport writes it: `sha256:` and the hex SHA-256 of the
/// certificate's SubjectPublicKeyInfo. `None` when the certificate does not parse.
pub fn spki_pin(cert_der: &[u8]) -> Option<String> {
    use x509_parser::prelude::FromDer;
    let (_, cert) = X509Certificate::from_der(cert_der).ok()?;
    Some(format!(
        "sha256:{}",
        crate::sha256_hex(cert.tbs_certificate.subject_pki.raw)
    ))
}
