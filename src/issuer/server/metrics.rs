//! The issuer API's metric families: SVIDs signed for remote agents, and agents connected.
//! Registered at boot and passed in; `Default` counts into families nobody renders.

use crate::telemetry::{CounterMetric, Gauge, Metrics};

#[derive(Clone, Default)]
pub struct IssuerApiMetrics {
    /// `tbot_issuer_api_x509_svids_issued_total`.
    pub x509_issued: CounterMetric,
    /// `tbot_issuer_api_agents_connected`.
    pub agents_connected: Gauge,
}

impl IssuerApiMetrics {
    pub fn register(metrics: &mut Metrics) -> IssuerApiMetrics {
        let m = IssuerApiMetrics::default();
        metrics.register(
            "tbot_issuer_api_x509_svids_issued",
            "X509-SVIDs signed for remote agents through the issuer API.",
            m.x509_issued.clone(),
        );
        metrics.register(
            "tbot_issuer_api_agents_connected",
            "Agents with an open Watch stream to this issuer.",
            m.agents_connected.clone(),
        );
        m
    }
}
