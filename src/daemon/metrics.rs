//! The daemon's metric families: reconciles and their duration, file events, files failing to
//! load, and the errors of the steps it executes.

use crate::telemetry::{CounterMetric, Errors, Gauge, Metrics, SecondsCounter};

#[derive(Clone, Default)]
pub(crate) struct DaemonMetrics {
    pub reconciles: CounterMetric,
    pub reconcile_seconds: SecondsCounter,
    pub watch_events: CounterMetric,
    pub files_failing: Gauge,
    pub errors: Errors,
}

impl DaemonMetrics {
    pub fn register(metrics: &mut Metrics, errors: &Errors) -> DaemonMetrics {
        let m = DaemonMetrics {
            errors: errors.clone(),
            ..DaemonMetrics::default()
        };
        metrics.register("tbot_reconciles", "Reconciles run.", m.reconciles.clone());
        metrics.register(
            "tbot_reconcile_seconds",
            "Time spent reconciling.",
            m.reconcile_seconds.clone(),
        );
        metrics.register("tbot_watch_events", "File-system events seen.", m.watch_events.clone());
        metrics.register(
            "tbot_config_files_failing",
            "Files of the watched directory that fail to load now (their last good objects stay in force).",
            m.files_failing.clone(),
        );
        m
    }
}
