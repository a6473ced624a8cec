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

use crate::issuer::IssuerError;
use crate::resource::cluster::KeyAlgorithm;
use crate::resource::spiffe_id::TrustDomain;
use std::sync::Arc;

use crate::issuer::keys::rotation::{self, KeyRecord, KeyStatus, Phase, RevokedKey, Rotation, Step};
use crate::issuer::state::backing::Backing;
use crate::kv::Op;

/// The CA's validity when `cluster.spec.ca.validity` is not set: one year.
pub const DEFAULT_VALIDITY: std::time::Duration = std::time::Duration::from_secs(8760 * 3600);

/// How long a CA made for edited settings is published before it signs: every agent and every
/// federated domain gets it first (as `tbotctl rotate ca`'s default `--grace`).
pub const SETTINGS_GRACE: std::time::Duration = std::time::Duration::from_secs(600);

/// What the `cluster` document says about the CA.
#[derive(Debug, Clone, PartialEq)]
pub struct CaSettings {
    pub algorithm: KeyAlgorithm,
    pub validity: std::time::Duration,
    pub rotation: Rotation,
}

impl Default for CaSettings {
    fn default() -> Self {
        CaSettings {
            algorithm: KeyAlgorithm::EcdsaP256,
            validity: DEFAULT_VALIDITY,
            rotation: Rotation::default_for(DEFAULT_VALIDITY),
        }
    }
}

/// One CA as recorded in `ca.json`.
type CaRecord = KeyRecord;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct CaFile {
    active: u32,
    cas: Vec<CaRecord>,
    /// CAs withdrawn by hand, until their own end.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    revoked: Vec<RevokedKey>,
}

/// A CA with its key, ready to sign.
pub struct Ca {
    id: u32,
    not_after: i64,
    cert_der: Vec<u8>,
    issuer: rcgen::Issuer<'static, KeyPair>,
    public_key: Vec<u8>,
    /// The key in the form `keys::public` compares bots' keys against.
    held: Option<crate::issuer::keys::public::Key>,
    algorithm: KeyAlgorithm,
}

impl Ca {
    /// The CA's key as [`crate::issuer::keys::public::check`] compares it: no bot gets it certified.
    pub fn held_key(&self) -> Option<&crate::issuer::keys::public::Key> {
        self.held.as_ref()
    }

    /// The CA's public key as its certificate's `subjectPublicKey` holds it.
    pub fn public_key_raw(&self) -> &[u8] {
        &self.public_key
    }

    pub fn certificate_der(&self) -> &[u8] {
        &self.cert_der
    }

    pub fn not_after(&self) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(self.not_after).expect("a valid timestamp")
    }

    pub fn algorithm(&self) -> KeyAlgorithm {
        self.algorithm
    }

    pub(in crate::issuer) fn issuer(&self) -> &rcgen::Issuer<'static, KeyPair> {
        &self.issuer
    }

    fn verification(&self) -> &'static dyn VerificationAlgorithm {
        match self.algorithm {
            KeyAlgorithm::EcdsaP256 => &signature::ECDSA_P256_SHA256_ASN1,
            KeyAlgorithm::Rsa2048 => &signature::RSA_PKCS1_2048_8192_SHA256,
            KeyAlgorithm::Ed25519 => &signature::ED25519,
        }
    }

    /// Its id in `ca.json`.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Whether this CA signed `cert`.
    pub fn signed(&self, cert: &X509Certificate<'_>) -> bool {
        UnparsedPublicKey::new(self.verification(), &self.public_key)
            .verify(cert.tbs_certificate.as_ref(), &cert.signature_value.data)
            .is_ok()
    }
}

/// Every CA of a trust domain: the active one signs, a prepared one and the retiring ones are
/// trusted. Cheap to clone (the CAs are shared): a change is made on a copy, written to the store
/// conditionally on the revision it was read at, and swapped in when the write won.
#[derive(Clone)]
pub struct Authority {
    trust_domain: TrustDomain,
    /// Oldest first.
    cas: Vec<Arc<Ca>>,
    /// What `ca.json` says of each CA, in the same order.
    records: Vec<CaRecord>,
    /// The id of the CA that signs.
    active: u32,
    /// CAs withdrawn by hand (`tbotctl rotate ca --revoke-old`), until their own end.
    revoked: Vec<RevokedKey>,
    /// The `mod_revision` of `ca.json` this copy was read or written at.
    revision: i64,
    /// `issued_until` moved in memory and is not in the store yet.
    unsaved: bool,
}

fn dir(td: &TrustDomain) -> String {
    format!("issuer/{}", td.as_str())
}

fn file_key(td: &TrustDomain) -> String {
    format!("{}/ca.json", dir(td))
}

/// How long an outgoing CA stays trusted after activation at least, when no replica has
/// noted issuance with it yet: notes reach the store in the background.
const ACTIVATION_SLACK: time::Duration = time::Duration::minutes(10);

fn unix(t: OffsetDateTime) -> i64 {
    t.unix_timestamp()
}

impl Authority {
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The `mod_revision` of `ca.json` this authority reflects.
    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// The CA that signs new certificates.
    pub fn active(&self) -> &Ca {
        self.cas
            .iter()
            .find(|ca| ca.id == self.active)
            .expect("an authority always has its active CA")
    }

    fn active_record(&mut self) -> &mut CaRecord {
        let active = self.active;
        self.records
            .iter_mut()
            .find(|r| r.id == active)
            .expect("an authority always has its active CA")
    }

    /// The id of the CA that signs.
    pub fn active_id(&self) -> u32 {
        self.active
    }

    /// The position of the active CA in [`Authority::cas`].
    pub fn active_index(&self) -> usize {
        self.cas.iter().position(|ca| ca.id == self.active).unwrap_or(0)
    }

    /// The rotation step due at `now`, or when the next one is.
    pub fn due(&self, settings: &CaSettings, now: OffsetDateTime) -> (Option<Step>, Option<i64>) {
        rotation::due(&self.records, self.active, &settings.rotation, unix(now))
    }

    /// The step a CA settings edit (`key_algorithm`, `validity`) calls for: a successor made with
    /// them, activating after [`SETTINGS_GRACE`], unless the active CA has them or a successor is
    /// prepared already. Taken only when the edit is applied (not by the schedule: replicas whose
    /// documents differ during a rollout would otherwise rotate back and forth).
    pub fn for_settings(&self, settings: &CaSettings, now: OffsetDateTime) -> Option<Step> {
        let prepared = self
            .records
            .iter()
            .any(|r| matches!(rotation::phase(r, self.active), Phase::Prepared { .. }));
        (!prepared && !self.active_matches(settings)).then(|| Step::Prepare {
            activate_at: unix(now) + i64::try_from(SETTINGS_GRACE.as_secs()).unwrap_or(i64::MAX),
        })
    }

    /// What `tbotctl rotate ca` would do now, or why it is refused.
    pub fn by_hand(&self, asked: rotation::ByHand, now: OffsetDateTime) -> Result<Step, rotation::Refused> {
        rotation::by_hand(&self.records, self.active, asked, unix(now))
    }

    /// A copy with `step` taken, and the store writes it needs besides `ca.json` (then
    /// [`Authority::save`] it). Preparing makes a CA with `settings`.
    pub fn stepped(
        &self,
        backing: &Backing,
        step: Step,
        settings: &CaSettings,
        now: OffsetDateTime,
    ) -> Result<(Authority, Vec<Op>), IssuerError> {
        match step {
            Step::Prepare { activate_at } => self.with_new_ca(backing, settings, now, Some(activate_at)),
            Step::Activate { id } => {
                let mut next = self.clone();
                // What the old CA signed, as noted so far, and at least ACTIVATION_SLACK more:
                // notes of other replicas' issuance reach the store in the background.
                rotation::activate(&mut next.records, &mut next.active, id, |r| {
                    r.issued_until.max(unix(now + ACTIVATION_SLACK)).min(r.not_after)
                });
                Ok((next, Vec::new()))
            }
            Step::Retire => {
                let mut next = self.clone();
                next.prune(now);
                Ok((next, Vec::new()))
            }
            Step::RetireEarly => {
                let mut next = self.clone();
                rotation::retire_early(&mut next.records, &mut next.cas, next.active);
                Ok((next, Vec::new()))
            }
            Step::Taint { activate } => {
                let (mut next, _) = match activate {
                    Some(id) => self.stepped(backing, Step::Activate { id }, settings, now)?,
                    None => (self.clone(), Vec::new()),
                };
                rotation::taint(&mut next.records, next.active, unix(now));
                Ok((next, Vec::new()))
            }
            Step::Revoke => {
                let mut next = self.clone();
                let revoked = rotation::revoke(&mut next.records, &mut next.cas, next.active, unix(now), |ca| {
                    spki_pin(ca.certificate_der()).unwrap_or_default()
                });
                next.revoked.extend(revoked);
                Ok((next, Vec::new()))
            }
        }
    }

    /// Every CA's phase and dates.
    pub fn statuses(&self) -> Vec<KeyStatus> {
        self.records
            .iter()
            .zip(&self.cas)
            .map(|(r, ca)| KeyStatus {
                kind: "ca",
                id: r.id,
                name: spki_pin(ca.certificate_der()).unwrap_or_default(),
                phase: rotation::phase(r, self.active),
                created: r.created,
                not_after: r.not_after,
            })
            .chain(self.revoked.iter().map(|r| KeyStatus::revoked("ca", r)))
            .collect()
    }

    /// The positions in [`Authority::cas`] of the tainted CAs: agents issue again what they signed.
    pub fn tainted_indices(&self) -> Vec<usize> {
        self.records
            .iter()
            .enumerate()
            .filter(|(_, r)| r.tainted.is_some())
            .map(|(i, _)| i)
            .collect()
    }

    /// Every trusted CA, oldest first.
    pub fn cas(&self) -> &[Arc<Ca>] {
        &self.cas
    }

    /// Certificates that let a client holding the pin of any published CA (prepared, retiring)
    /// verify what the active CA signs: for each such CA, the active CA's key and name certified by
    /// it (a cross-signature), and that CA's own certificate. The issuer API serves them after its
    /// leaf, so a pin from before a rotation keeps joining new agents until its CA leaves the bundle,
    /// and so does the pin of a CA that is only prepared.
    pub fn cross_chain(&self, now: OffsetDateTime) -> Result<Vec<Vec<u8>>, IssuerError> {
        let active = self.active();
        let spki = x509_parser::parse_x509_certificate(active.certificate_der())
            .map(|(_, c)| c.tbs_certificate.subject_pki.raw.to_vec())
            .map_err(|e| IssuerError::Crypto(e.to_string()))?;
        let public_key = rcgen::SubjectPublicKeyInfo::from_der(&spki).map_err(crypto)?;
        let mut out = Vec::new();
        for other in self.cas.iter().filter(|ca| ca.id != active.id) {
            let mut params = ca_params(&self.trust_domain, active.id)?;
            params.not_before = now - time::Duration::minutes(1);
            let end = active.not_after.min(other.not_after);
            params.not_after = OffsetDateTime::from_unix_timestamp(end).map_err(crypto)?;
            let cross = params.signed_by(&public_key, &other.issuer).map_err(crypto)?;
            out.push(cross.der().to_vec());
            out.push(other.cert_der.clone());
        }
        Ok(out)
    }

    /// The ids of the tainted CAs (what `--revoke-old` withdraws).
    pub fn tainted(&self) -> Vec<u32> {
        self.records
            .iter()
            .filter(|r| r.tainted.is_some())
            .map(|r| r.id)
            .collect()
    }

    /// The ids of the CAs that are retiring, not tainted (what a forced retire withdraws).
    pub fn retiring(&self) -> Vec<u32> {
        self.records
            .iter()
            .filter(|r| matches!(rotation::phase(r, self.active), Phase::Retiring { .. }))
            .map(|r| r.id)
            .collect()
    }

    /// Whether `ca` (of this authority or an earlier copy of it) is still trusted: one of this
    /// authority's CAs, with the same id and key.
    pub fn trusts(&self, ca: &Ca) -> bool {
        self.cas.iter().any(|c| c.id == ca.id && c.public_key == ca.public_key)
    }

    /// The CA that signed `cert`, if any of ours did.
    pub fn signer_of(&self, cert: &X509Certificate<'_>) -> Option<&Ca> {
        self.cas.iter().rev().find(|ca| ca.signed(cert)).map(|ca| &**ca)
    }

    /// Whether the active CA was made with `settings`: a replica applying a CA settings change that
    /// another replica already rotated for has nothing to do.
    pub fn active_matches(&self, settings: &CaSettings) -> bool {
        let record = self
            .records
            .iter()
            .find(|r| r.id == self.active)
            .expect("an authority always has its active CA");
        // A key of an earlier version does not record its validity: only its algorithm is compared.
        record.algorithm == settings.algorithm.as_str()
            && record.validity.is_none_or(|v| v == settings.validity.as_secs())
    }

    /// Drops retired CAs whose overlap has ended (in memory; then [`Authority::save`]). Returns
    /// whether the bundle changed.
    pub fn prune(&mut self, now: OffsetDateTime) -> bool {
        let revoked = self.revoked.len();
        self.revoked.retain(|r| r.not_after > unix(now));
        rotation::retire(&mut self.records, &mut self.cas, self.active, unix(now)) || self.revoked.len() != revoked
    }

    /// Records that the active CA signed something valid until `not_after`, so a rotation keeps the
    /// CA trusted long enough. Returns whether the store needs the new value ([`Authority::save`]):
    /// about once an hour of advance, or while an earlier save failed.
    pub fn note_issued(&mut self, not_after: OffsetDateTime) -> bool {
        let record = self.active_record();
        if unix(not_after) > record.issued_until {
            record.issued_until = unix(not_after) + 3600;
            self.unsaved = true;
        }
        self.unsaved
    }

    /// Takes what another writer saved (a newer `ca.json` with the same CAs) while keeping this
    /// copy's later `issued_until`: the two replicas' notes merge, and the result still needs a
    /// save exactly when this copy knew of a later one than the store.
    pub fn merge_from(&mut self, newer: Authority) {
        let mut newer = newer;
        for record in &mut newer.records {
            if let Some(mine) = self.records.iter().find(|r| r.id == record.id)
                && mine.issued_until > record.issued_until
            {
                record.issued_until = mine.issued_until;
                newer.unsaved = true;
            }
        }
        *self = newer;
    }

    /// The same CAs (a `ca.json` write that only moved `issued_until` or `retire_after`).
    pub fn same_cas(&self, other: &Authority) -> bool {
        self.active == other.active
            && self.cas.len() == other.cas.len()
            && self.cas.iter().zip(&other.cas).all(|(a, b)| a.id == b.id)
            && self
                .records
                .iter()
                .zip(&other.records)
                .all(|(a, b)| a.activate_at == b.activate_at && a.tainted == b.tainted)
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
/// A CA certificate's name, constraints and serial (dates left to the caller): CA `id` of
/// `trust_domain`. The same name for its self-signed certificate and its cross-signatures.
fn ca_params(trust_domain: &TrustDomain, id: u32) -> Result<CertificateParams, IssuerError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, trust_domain.as_str());
    dn.push(
        DnType::CommonName,
        format!("tbot CA {id} for {}", trust_domain.as_str()),
    );
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.subject_alt_names = vec![SanType::URI(
        format!("spiffe://{}", trust_domain.as_str())
            .try_into()
            .map_err(crypto)?,
    )];
    params.serial_number = Some(random_serial()?);
    Ok(params)
}

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
    crate::issuer::keys::unique(&mut bytes)?;
    bytes[0] &= 0x7f;
    bytes[0] |= 0x40;
    Ok(SerialNumber::from_slice(&bytes))
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

mod stored;

#[cfg(test)]
mod tests;
