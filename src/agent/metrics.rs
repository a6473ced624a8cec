//! The agent's metric families: SVIDs issued, joins by method and outcome, the link to a remote
//! issuer, and file outputs' events. Registered at boot and passed in; `Default` counts into
//! families nobody renders (tests, benches).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;

use crate::telemetry::{CounterMetric, Gauge, Metrics};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JoinLabels {
    method: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutputLabels {
    output: String,
    event: String,
}

#[derive(Clone, Default)]
pub struct AgentMetrics {
    /// `tbot_x509_svids_issued_total`.
    pub x509_issued: CounterMetric,
    /// `tbot_jwt_svids_issued_total`.
    pub jwt_issued: CounterMetric,
    /// `tbot_tainted_svids_reissued_total`: SVIDs issued again (or forgotten, JWT) because a key
    /// that signed them was tainted.
    pub tainted_reissued: CounterMetric,
    /// `tbot_remote_issuer_connected`: 1 while the `Watch` stream to the remote issuer is up.
    pub issuer_connected: Gauge,
    joins: Family<JoinLabels, CounterMetric>,
    outputs: Family<OutputLabels, CounterMetric>,
}

impl AgentMetrics {
    pub fn register(metrics: &mut Metrics) -> AgentMetrics {
        let m = AgentMetrics::default();
        metrics.register("tbot_x509_svids_issued", "X509-SVIDs issued.", m.x509_issued.clone());
        metrics.register("tbot_jwt_svids_issued", "JWT-SVIDs issued.", m.jwt_issued.clone());
        metrics.register(
            "tbot_tainted_svids_reissued",
            "SVIDs issued again because the key that signed them was tainted.",
            m.tainted_reissued.clone(),
        );
        metrics.register("tbot_joins", "Joins by method and outcome.", m.joins.clone());
        metrics.register(
            "tbot_output_events",
            "File outputs: files written, attempts failed, on_update hooks failed.",
            m.outputs.clone(),
        );
        metrics.register(
            "tbot_remote_issuer_connected",
            "Whether this agent's stream to its remote issuer is up (1) or not (0).",
            m.issuer_connected.clone(),
        );
        m
    }

    /// Counts a join: `outcome` is `joined` or `refused`.
    pub fn join(&self, method: &str, outcome: &str) {
        let labels = JoinLabels {
            method: method.to_owned(),
            outcome: outcome.to_owned(),
        };
        self.joins.get_or_create(&labels).inc();
    }

    /// Counts an output's event: `written`, `failed` (issue or write), `hook_failed`.
    pub fn output(&self, output: &str, event: &str) {
        let labels = OutputLabels {
            output: output.to_owned(),
            event: event.to_owned(),
        };
        self.outputs.get_or_create(&labels).inc();
    }
}
