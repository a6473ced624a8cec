//! The issuer's own metric families (beside `server::metrics`, the issuer API's): what it issued,
//! its certificate revocation lists, and its issuance log. Registered at boot and handed to the
//! issuer with [`crate::issuer::LocalIssuer::set_metrics`]; `Default` counts into families nobody
//! renders.

use crate::telemetry::{CounterMetric, Gauge, Metrics};

#[derive(Clone, Default)]
pub struct IssuerMetrics {
    /// `tbot_issuer_x509_svids_signed_total`.
    pub x509_signed: CounterMetric,
    /// `tbot_issuer_jwt_svids_signed_total`.
    pub jwt_signed: CounterMetric,
    /// `tbot_issuer_bot_certificates_signed_total`.
    pub bots_signed: CounterMetric,
    /// `tbot_issuer_revoked_certificates`.
    pub revoked: Gauge,
    /// `tbot_issuer_crl_bytes`.
    pub crl_bytes: Gauge,
    /// `tbot_issuer_crl_signed_timestamp_seconds`.
    pub crl_signed: Gauge,
    /// `tbot_issuer_issuance_log_bytes`.
    pub log_bytes: Gauge,
}

impl IssuerMetrics {
    pub fn register(metrics: &mut Metrics) -> IssuerMetrics {
        let m = IssuerMetrics::default();
        metrics.register(
            "tbot_issuer_x509_svids_signed",
            "X509-SVIDs this issuer signed (for agents in this process and remote ones).",
            m.x509_signed.clone(),
        );
        metrics.register(
            "tbot_issuer_jwt_svids_signed",
            "JWT-SVIDs this issuer signed.",
            m.jwt_signed.clone(),
        );
        metrics.register(
            "tbot_issuer_bot_certificates_signed",
            "Bot certificates this issuer signed (joins and renewals).",
            m.bots_signed.clone(),
        );
        metrics.register(
            "tbot_issuer_revoked_certificates",
            "Serial numbers the certificate revocation lists hold now (revocation documents, until expiry).",
            m.revoked.clone(),
        );
        metrics.register(
            "tbot_issuer_crl_bytes",
            "The size of the certificate revocation lists, all CAs together (DER).",
            m.crl_bytes.clone(),
        );
        metrics.register(
            "tbot_issuer_crl_signed_timestamp_seconds",
            "When the certificate revocation lists were last signed (Unix time): their age is time() minus this.",
            m.crl_signed.clone(),
        );
        metrics.register(
            "tbot_issuer_issuance_log_bytes",
            "What the issuance log this process knows of takes in the store.",
            m.log_bytes.clone(),
        );
        m
    }
}
