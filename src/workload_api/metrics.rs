//! The Workload API's metric families: connections accepted, open streams, and its errors (SDS
//! NACKs). Registered at boot and passed in; `Default` counts into families nobody renders.

use crate::telemetry::{CounterMetric, Errors, Gauge, Metrics};

#[derive(Clone, Default)]
pub struct WorkloadApiMetrics {
    /// `tbot_workload_api_connections_total`.
    pub connections: CounterMetric,
    /// `tbot_workload_api_streams`.
    pub streams: Gauge,
    /// `tbot_errors_total{reason}`, shared.
    pub errors: Errors,
}

impl WorkloadApiMetrics {
    pub fn register(metrics: &mut Metrics, errors: &Errors) -> WorkloadApiMetrics {
        let m = WorkloadApiMetrics {
            errors: errors.clone(),
            ..WorkloadApiMetrics::default()
        };
        metrics.register(
            "tbot_workload_api_streams",
            "Open Workload API streams.",
            m.streams.clone(),
        );
        metrics.register(
            "tbot_workload_api_connections",
            "Workload API connections accepted.",
            m.connections.clone(),
        );
        m
    }
}
