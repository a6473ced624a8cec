//! The trust domain's certificate revocation lists: one per CA in the bundle (a CRL is signed by
//! the CA that issued what it lists; the serials are random, so listing every revoked serial in
//! each is harmless), `keyCompromise`, valid for [`CRL_VALIDITY`].

use std::collections::BTreeSet;

use rcgen::{CertificateRevocationListParams, KeyIdMethod, RevocationReason, RevokedCertParams, SerialNumber};
use time::OffsetDateTime;

use crate::issuer::IssuerError;
use crate::issuer::keys::ca::Authority;
use crate::resource::revocation::Serial;

/// How long a CRL says it holds (`nextUpdate`): a relying party that reads it from a file keeps it
/// that long; the issuer signs a new one whenever what is revoked or the CAs change.
pub const CRL_VALIDITY: time::Duration = time::Duration::days(7);

/// Signs a CRL of `revoked` with each CA of `authority` (DER, in the bundle's CA order).
pub fn sign(
    authority: &Authority,
    revoked: &BTreeSet<Serial>,
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
            .map(|serial| RevokedCertParams {
                serial_number: SerialNumber::from_slice(&serial.to_bytes()),
                revocation_time: now,
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
