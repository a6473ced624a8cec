//! Process-wide counters for `/metrics` (Prometheus text format): reconciles and their duration,
//! errors by reason, SVIDs issued, active streams and connections, joins by method and outcome,
//! watch events.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

#[derive(Default)]
pub struct Metrics {
    pub reconciles: AtomicU64,
    /// Microseconds spent reconciling, in total.
    pub reconcile_micros: AtomicU64,
    pub svids_issued: AtomicU64,
    pub jwt_svids_issued: AtomicU64,
    pub active_streams: AtomicI64,
    pub connections: AtomicU64,
    pub watch_events: AtomicU64,
    /// Files of the watched directory that fail to load now.
    pub files_failing: AtomicI64,
    /// X509-SVIDs signed for remote agents through the issuer API.
    pub remote_issued: AtomicU64,
    /// Agents with an open `Watch` stream to this issuer.
    pub agents_connected: AtomicI64,
    /// Whether this agent's stream to its remote issuer is up (1) or not (0).
    pub issuer_connected: AtomicI64,
    errors: Mutex<BTreeMap<String, u64>>,
    joins: Mutex<BTreeMap<(String, String), u64>>,
    /// File outputs' events (`written`, `failed`, `hook_failed`) by output.
    outputs: Mutex<BTreeMap<(String, &'static str), u64>>,
}

/// The one registry of this process.
pub fn metrics() -> &'static Metrics {
    static METRICS: std::sync::OnceLock<Metrics> = std::sync::OnceLock::new();
    METRICS.get_or_init(Metrics::default)
}

impl Metrics {
    pub fn error(&self, reason: &str) {
        *self
            .errors
            .lock()
            .expect("metrics poisoned")
            .entry(reason.to_owned())
            .or_default() += 1;
    }

    pub fn join(&self, method: &str, outcome: &str) {
        *self
            .joins
            .lock()
            .expect("metrics poisoned")
            .entry((method.to_owned(), outcome.to_owned()))
            .or_default() += 1;
    }

    /// Counts an output's event: `written`, `failed` (issue or write), `hook_failed`.
    pub fn output(&self, output: &str, event: &'static str) {
        *self
            .outputs
            .lock()
            .expect("metrics poisoned")
            .entry((output.to_owned(), event))
            .or_default() += 1;
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut counter = |name: &str, help: &str, kind: &str, value: String| {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"));
        };
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed).to_string();
        counter(
            "tbot_reconciles_total",
            "Reconciles run.",
            "counter",
            get(&self.reconciles),
        );
        counter(
            "tbot_reconcile_seconds_total",
            "Time spent reconciling.",
            "counter",
            format!("{:.6}", self.reconcile_micros.load(Ordering::Relaxed) as f64 / 1e6),
        );
        counter(
            "tbot_x509_svids_issued_total",
            "X509-SVIDs issued.",
            "counter",
            get(&self.svids_issued),
        );
        counter(
            "tbot_jwt_svids_issued_total",
            "JWT-SVIDs issued.",
            "counter",
            get(&self.jwt_svids_issued),
        );
        counter(
            "tbot_workload_api_streams",
            "Open Workload API streams.",
            "gauge",
            self.active_streams.load(Ordering::Relaxed).to_string(),
        );
        counter(
            "tbot_workload_api_connections_total",
            "Workload API connections accepted.",
            "counter",
            get(&self.connections),
        );
        counter(
            "tbot_watch_events_total",
            "File-system events seen.",
            "counter",
            get(&self.watch_events),
        );
        counter(
            "tbot_config_files_failing",
            "Files of the watched directory that fail to load now (their last good objects stay in force).",
            "gauge",
            self.files_failing.load(Ordering::Relaxed).to_string(),
        );
        counter(
            "tbot_issuer_api_x509_svids_issued_total",
            "X509-SVIDs signed for remote agents through the issuer API.",
            "counter",
            get(&self.remote_issued),
        );
        counter(
            "tbot_issuer_api_agents_connected",
            "Agents with an open Watch stream to this issuer.",
            "gauge",
            self.agents_connected.load(Ordering::Relaxed).to_string(),
        );
        counter(
            "tbot_remote_issuer_connected",
            "Whether this agent's stream to its remote issuer is up (1) or not (0).",
            "gauge",
            self.issuer_connected.load(Ordering::Relaxed).to_string(),
        );
        out.push_str("# HELP tbot_errors_total Errors by reason.\n# TYPE tbot_errors_total counter\n");
        for (reason, n) in self.errors.lock().expect("metrics poisoned").iter() {
            out.push_str(&format!("tbot_errors_total{{reason=\"{reason}\"}} {n}\n"));
        }
        out.push_str("# HELP tbot_joins_total Joins by method and outcome.\n# TYPE tbot_joins_total counter\n");
        for ((method, outcome), n) in self.joins.lock().expect("metrics poisoned").iter() {
            out.push_str(&format!(
                "tbot_joins_total{{method=\"{method}\",outcome=\"{outcome}\"}} {n}\n"
            ));
        }
        out.push_str(
            "# HELP tbot_output_events_total File outputs: files written, attempts failed, on_update hooks failed.\n# TYPE tbot_output_events_total counter\n",
        );
        for ((output, event), n) in self.outputs.lock().expect("metrics poisoned").iter() {
            out.push_str(&format!(
                "tbot_output_events_total{{output=\"{output}\",event=\"{event}\"}} {n}\n"
            ));
        }
        out
    }
}
