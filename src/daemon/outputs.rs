//! The file outputs (`workload-identity-x509` / `-jwt` services): started, restarted when their
//! service or the agent's lifetime changes, stopped when removed (their files stay), and
//! `tbot start --oneshot`, which writes each once and exits.

use std::collections::BTreeSet;
use std::process::ExitCode;
use std::time::Duration;

use super::{Daemon, agent_ref, fail};
use crate::agent::outputs::{Output, OutputSpec};
use crate::controller::status::{ConditionType, Reason};
use crate::error::Explain;
use crate::resource::agent::{AgentConfig, Service};

/// One running file output, with the service it was started from and the agent's lifetime then.
pub(super) struct RunningOutput {
    service: Service,
    agent_ttl: crate::resource::Duration,
    pub output: Output,
}

/// What an output does, from its service.
fn output_spec(service: &Service, agent: &AgentConfig) -> Option<OutputSpec> {
    let config = super::services::service_config(service, agent);
    Some(OutputSpec {
        name: service.display_name().to_owned(),
        kind: service.kind,
        selector: config.selector,
        ttl: config.ttl,
        renewal: service.renewal_interval.map(|d| d.as_std()),
        audiences: service.audiences.clone(),
        destination: service.output()?.clone(),
        on_update: service.on_update.clone(),
        federated: service.include_federated_trust_bundles,
    })
}

impl Daemon {
    /// Brings the file outputs in line with `config`: new ones started, changed ones restarted (they
    /// issue and write again), removed ones stopped with their files left in place. Waits (up to
    /// 10 s) for the new ones' first write, so `tbotctl apply` returns with the files there.
    pub(super) async fn sync_outputs(&mut self, config: &AgentConfig) {
        let Some(agent) = self.agent.clone() else { return };
        let mut started = Vec::new();
        for service in &config.services {
            let Some(spec) = output_spec(service, config) else {
                continue;
            };
            let name = spec.name.clone();
            if let Some(running) = self.outputs.get(&name)
                && !crate::controller::plan::output_changed(
                    &running.service,
                    service,
                    running.agent_ttl,
                    config.credential_ttl,
                )
            {
                continue;
            }
            if let Some(old) = self.outputs.remove(&name) {
                old.output.stop().await;
            }
            tracing::info!(output = %name, path = %spec.destination.path.display(), "output started");
            let output = Output::spawn(agent.clone(), spec);
            let report = output.report();
            started.push(report.clone());
            // Its writes, failures and hooks show in `tbotctl status`.
            super::boot::poke_on(report, self.poke.clone());
            let running = RunningOutput {
                service: service.clone(),
                agent_ttl: config.credential_ttl,
                output,
            };
            self.outputs.insert(name, running);
        }
        let wanted: BTreeSet<&str> = config
            .services
            .iter()
            .filter(|s| s.output().is_some())
            .map(|s| s.display_name())
            .collect();
        let gone: Vec<String> = self
            .outputs
            .keys()
            .filter(|n| !wanted.contains(n.as_str()))
            .cloned()
            .collect();
        for name in gone {
            if let Some(old) = self.outputs.remove(&name) {
                let path = old.output.spec.destination.path.display().to_string();
                tracing::info!(output = %name, %path, "output removed; its files are left in place");
                old.output.stop().await;
                let message = format!(
                    "no longer renewed: the files in {path} were left in place and expire; delete them once nothing reads them"
                );
                self.status.update(|s| {
                    s.table.set(
                        &agent_ref(),
                        ConditionType::Output(name),
                        false,
                        Reason::Removed,
                        &message,
                    )
                });
            }
        }
        let first_writes = async {
            for mut report in started {
                let _ = report.wait_for(|r| r.writes > 0 || r.error.is_some()).await;
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(10), first_writes).await;
    }
}

/// `tbot start --oneshot`: joins (or renews), writes every file output once, runs their hooks, and
/// says which failed.
pub(super) async fn oneshot(daemon: &mut Daemon, config: Option<&AgentConfig>) -> ExitCode {
    let Some(config) = config else {
        return fail(
            "--oneshot writes an agent's file outputs, and there is no agent config",
            "add the agent config with `workload-identity-x509` or `workload-identity-jwt` services",
        );
    };
    let specs: Vec<OutputSpec> = config.services.iter().filter_map(|s| output_spec(s, config)).collect();
    if specs.is_empty() {
        return fail(
            "--oneshot has nothing to write: the agent config has no `workload-identity-x509` or `workload-identity-jwt` service",
            "add an output service, or start without --oneshot to serve the Workload API",
        );
    }
    for service in config.services.iter().filter(|s| s.socket().is_some()) {
        tracing::warn!(
            service = service.display_name(),
            "--oneshot serves no socket; skipping this service"
        );
    }
    if let Err(e) = daemon.start_agent(config).await {
        return fail(format!("cannot join: {e}"), &e.hint());
    }
    let agent = daemon.agent.clone().expect("joined");
    let mut failed = Vec::new();
    for spec in specs {
        let name = spec.name.clone();
        let path = spec.destination.path.clone();
        let report = crate::agent::outputs::write_once(agent.clone(), spec).await;
        match (&report.error, &report.hook_error) {
            (None, None) => println!("output {name}: {}: {}", path.display(), report.describe()),
            (Some(e), _) => failed.push(format!("output {name} ({}): {e}", path.display())),
            (None, Some(e)) => failed.push(format!(
                "output {name} ({}): written, but on_update failed: {e}",
                path.display()
            )),
        }
    }
    if failed.is_empty() {
        return ExitCode::SUCCESS;
    }
    for f in &failed {
        eprintln!("error: {f}");
    }
    fail(
        format!("{} output(s) failed", failed.len()),
        "fix what each error names and run again",
    )
}
