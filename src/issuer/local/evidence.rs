//! The evidence of what the issuer did, and its answer to a leaked key: the issuance log's writer
//! (each second, with the CRLs' minute check), what is recorded and counted, and which serials the
//! CRLs list now.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;

use crate::issuer::state::issued::IssuedKind;

use super::Inner;

/// CRLs as signed, with what they were signed for.
pub(super) struct Crls {
    pub(super) signed_at: OffsetDateTime,
    /// The CAs (ids) that signed them.
    pub(super) cas: Vec<u32>,
    pub(super) revoked: super::revocations::Revoked,
    pub(super) serials: Arc<BTreeSet<String>>,
    pub(super) crls: Arc<Vec<Vec<u8>>>,
}

/// Writes the issuance log every [`FLUSH_EVERY`](crate::issuer::state::issued::FLUSH_EVERY) while
/// the issuer lives; a store that fails is said (at most once a minute) and tried again.
/// Each minute it also signs the CRLs again when they are [due](super::State::crls_due).
pub(super) async fn flush_issued(inner: std::sync::Weak<Inner>) {
    let mut said: Option<std::time::Instant> = None;
    let mut ticks: u64 = 0;
    loop {
        tokio::time::sleep(crate::issuer::state::issued::FLUSH_EVERY).await;
        let Some(inner) = inner.upgrade() else { return };
        ticks += 1;
        if ticks.is_multiple_of(60) {
            // Due, or a revoked certificate expired (its serial leaves the CRL).
            let mut state = inner.lock();
            let revoked = inner.revoked(&state);
            if state.crls_due() || state.crls.as_ref().is_some_and(|c| c.revoked != revoked) {
                inner.publish(&mut state);
            }
        }
        inner.tend_revocations(ticks.is_multiple_of(60)).await;
        let flushed = inner.issued.flush().await;
        inner.metrics().log_bytes.set(inner.issued.bytes() as i64);
        if let Err(e) = flushed
            && said.is_none_or(|at| at.elapsed() > Duration::from_secs(60))
        {
            said = Some(std::time::Instant::now());
            tracing::warn!(error = %e, "cannot write the issuance log; its records are kept and written when the store answers");
        }
    }
}

impl Inner {
    pub(super) fn metrics(&self) -> crate::issuer::metrics::IssuerMetrics {
        self.metrics.read().expect("metrics poisoned").clone()
    }

    /// Records what was issued: in the issuance log, and counted.
    pub(super) fn record(&self, record: crate::issuer::state::issued::Issued) {
        {
            // Counted in place: a copy of the metrics is seven reference counts up and down.
            let metrics = self.metrics.read().expect("metrics poisoned");
            match record.kind {
                IssuedKind::X509Svid => metrics.x509_signed.inc(),
                IssuedKind::JwtSvid => metrics.jwt_signed.inc(),
                IssuedKind::BotCertificate => metrics.bots_signed.inc(),
            };
        }
        self.issued.record(record);
    }
}
