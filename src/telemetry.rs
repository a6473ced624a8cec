//! Telemetry on the ground floor: the metric registry (the Prometheus project's `prometheus-client`),
//! the error counter every subsystem shares, and the exposition. Each subsystem owns the struct of
//! its metric families (`agent::AgentMetrics`, `workload_api::WorkloadApiMetrics`, …), registered
//! here at boot and passed in; a part built without one (a test, a bench) counts into families
//! nobody renders, so two daemons in one process never share counters.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

pub use prometheus_client::metrics::counter::Counter as CounterMetric;
pub use prometheus_client::metrics::gauge::Gauge;

/// A counter of seconds (a float).
pub type SecondsCounter = Counter<f64, std::sync::atomic::AtomicU64>;

/// The metrics of one process: register families into it, then render it.
#[derive(Default)]
pub struct Metrics {
    registry: Registry,
}

impl Metrics {
    /// Registers a family: `name` as exposed (a counter gains `_total` when rendered), `help` one
    /// sentence.
    pub fn register(&mut self, name: &str, help: &str, metric: impl prometheus_client::registry::Metric) {
        // The encoder ends the help with a full stop of its own.
        self.registry.register(name, help.trim_end_matches('.'), metric);
    }

    /// The OpenMetrics text exposition (`application/openmetrics-text; version=1.0.0`).
    pub fn openmetrics(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String");
        out
    }

    /// The Prometheus text exposition, version 0.0.4 (`text/plain`): what `/metrics` has always
    /// answered. The same samples as [`Metrics::openmetrics`]; a counter's `HELP` and `TYPE` name
    /// its sample (`…_total`), and there is no `# EOF`.
    pub fn prometheus_text(&self) -> String {
        let mut out = String::new();
        // A family's `HELP` comes before its `TYPE`, which says whether it is a counter.
        let mut help: Option<(&str, &str)> = None;
        let open = self.openmetrics();
        for line in open.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                help = Some(rest.split_once(' ').unwrap_or((rest, "")));
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
                let shown = if kind == "counter" {
                    format!("{name}_total")
                } else {
                    name.to_owned()
                };
                if let Some((_, text)) = help.take() {
                    out.push_str(&format!("# HELP {shown} {text}\n"));
                }
                out.push_str(&format!("# TYPE {shown} {kind}\n"));
                continue;
            }
            if line != "# EOF" {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

/// `tbot_errors_total{reason}`: errors by reason, one family shared by every subsystem.
#[derive(Clone, Default)]
pub struct Errors(Family<ReasonLabel, Counter>);

impl Errors {
    pub fn register(metrics: &mut Metrics) -> Errors {
        let errors = Errors::default();
        metrics.register("tbot_errors", "Errors by reason.", errors.0.clone());
        errors
    }

    /// Counts one error of `reason` (a short snake_case word: `sds_nack`, `rejoin`, …).
    pub fn count(&self, reason: &str) {
        self.0
            .get_or_create(&ReasonLabel {
                reason: reason.to_owned(),
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prometheus_text_names_a_counters_sample_in_its_help_and_type_and_has_no_eof() {
        let mut metrics = Metrics::default();
        let reconciles: CounterMetric = Counter::default();
        metrics.register("tbot_reconciles", "Reconciles run.", reconciles.clone());
        let streams: Gauge = Gauge::default();
        metrics.register(
            "tbot_workload_api_streams",
            "Open Workload API streams.",
            streams.clone(),
        );
        let errors = Errors::register(&mut metrics);
        reconciles.inc();
        streams.set(3);
        errors.count("sds_nack");
        errors.count("sds_nack");
        let text = metrics.prometheus_text();
        for line in [
            "# HELP tbot_reconciles_total Reconciles run.",
            "# TYPE tbot_reconciles_total counter",
            "tbot_reconciles_total 1",
            "# TYPE tbot_workload_api_streams gauge",
            "tbot_workload_api_streams 3",
            "# TYPE tbot_errors_total counter",
            "tbot_errors_total{reason=\"sds_nack\"} 2",
        ] {
            assert!(text.lines().any(|l| l == line), "no `{line}` in\n{text}");
        }
        assert!(!text.contains("# EOF"));
        let open = metrics.openmetrics();
        assert!(
            open.contains("# TYPE tbot_reconciles counter\n") && open.ends_with("# EOF\n"),
            "{open}"
        );
    }
}
