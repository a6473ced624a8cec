//! The trust domain's certificate revocation lists: one per CA in the bundle (a CRL is signed by
//! the CA that issued what it lists; the serials are random, so listing every revoked serial in
//! each is harmless), `keyCompromise`, valid for [`CRL_VALIDITY`].

use std::collections::BTreeMap;

use rcgen::{CertificateRevocationListParams, KeyIdMethod, RevocationReason, RevokedCertParams, SerialNumber};
use time::OffsetDateTime;

use crate::issuer::IssuerError;
use crate::issuer::keys::ca::Authority;
use crate::resource::revocation::Serial;

/// How long a CRL says it holds (`nextUpdate`): a relying party that reads it from a file keeps it
/// that long; the issuer signs a new one whenever what is revoked or the CAs change.
pub const CRL_VALIDITY: time::Duration = time::Duration::days(7);

/// A certificate's serial number as CRLs and the issuance log write it: lower-case hex, no leading
/// zeros.
pub fn serial_of(certificate: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(certificate).ok()?;
    Some(serial_of_raw(cert.tbs_certificate.raw_serial()))
}

/// A serial number's DER INTEGER content as lower-case hex without leading zeros.
pub fn serial_of_raw(raw: &[u8]) -> String {
    let hex = crate::hex(raw);
    let trimmed = hex.trim_start_matches('0');
    if trimmed.is_empty() {
        "0".into()
    } else {
        trimmed.to_owned()
    }
}

/// Signs a CRL of `revoked` with each CA of `authority` (DER, in the bundle's CA order).
pub fn sign(
    authority: &Authority,
    revoked: &BTreeMap<Serial, OffsetDateTime>,
    now: OffsetDateTime,
) -> Result<Vec<Vec<u8>>, IssuerError> {
    // Increases with every CRL this trust domain signs (milliseconds since the epoch).
    let number = (now.unix_timestamp_nanos() / 1_000_000) as u64;
    let params = CertificateRevocationListParams {
        this_update: now,
        next_update: now + CRL_VALIDITY,
        crl_number: SerialNumber::from(number),
        issuing_distribution_point: None,
        revoked_certs: revoked
            .iter()
            .map(|(serial, at)| RevokedCertParams {
                serial_number: SerialNumber::from_slice(&serial.to_bytes()),
                revocation_time: *at,
                reason_code: Some(RevocationReason::KeyCompromise),
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: KeyIdMethod::Sha256,
    };
    authority
        .cas()
        .iter()
        .map(|ca| {
            params
                .signed_by(ca.issuer())
                .map(|crl| crl.der().to_vec())
                .map_err(|e| IssuerError::Crypto(format!("signing the CRL: {e}")))
        })
        .collect()
}
