//! Checks of an agent config's services against the directory's identities: an output must write
//! one identity that reads nothing of a workload, and a Workload API service must run the attestors
//! whose attributes its identities read.

use super::Parsed;
use crate::resource::agent::AgentConfig;
use crate::resource::{Document, Problem};

/// An identity that reads `workload.docker.*`, `workload.podman.*` or `workload.kubernetes.*`,
/// selected by a Workload API service whose attestors do not include that one, can never hold for that service's callers.
pub(super) fn engines_not_attested(parsed: &[Parsed], agent: &AgentConfig) -> Vec<Problem> {
    let mut out = Vec::new();
    for (j, service) in agent.services.iter().enumerate().filter(|(_, s)| !s.kind.is_output()) {
        let kubernetes = service.attestors.kubernetes.as_ref().is_some_and(|k| k.enabled);
        for (name, enabled) in [
            ("docker", service.attestors.docker.as_ref().is_some_and(|s| s.enabled)),
            ("podman", service.attestors.podman.as_ref().is_some_and(|s| s.enabled)),
            ("kubernetes", kubernetes),
        ] {
            if enabled {
                continue;
            }
            let prefix = format!("workload.{name}.");
            // What a document reads was worked out when it was parsed; most read no engine's
            // attributes, so that test goes first and the selector is matched for the few left.
            let reading: Vec<&str> = parsed
                .iter()
                .filter(|p| p.workload_reads.iter().any(|a| a.starts_with(&prefix)))
                .filter_map(|p| match &p.document {
                    Document::WorkloadIdentity(wi) => Some(wi),
                    _ => None,
                })
                .filter(|wi| match &service.selector.name {
                    Some(name) => *wi.metadata.name == **name,
                    None => {
                        !service.selector.labels.is_empty()
                            && service
                                .selector
                                .labels
                                .iter()
                                .all(|(k, v)| wi.metadata.labels.get(k) == Some(v))
                    }
                })
                .map(|wi| &*wi.metadata.name)
                .collect();
            if reading.is_empty() {
                continue;
            }
            out.push(
                Problem::warning(
                    format!("/services/{j}/selector"),
                    format!(
                        "{} read{} `workload.{e}.*`, which this service never sets: it has no `{e}` attestor, so {} can never hold here",
                        reading.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", "),
                        if reading.len() == 1 { "s" } else { "" },
                        if reading.len() == 1 { "it" } else { "they" },
                        e = name
                    ),
                )
                .hint(format!("add `attestors: {{{name}: {{enabled: true, …}}}}` to the service")),
            );
        }
    }
    out
}

pub(super) fn outputs_reading_workloads(parsed: &[Parsed], agent: &AgentConfig) -> Vec<Problem> {
    let mut out = Vec::new();
    for (j, service) in agent.services.iter().enumerate() {
        // An output writes exactly one identity: labels that pick several cannot be written.
        if service.kind.is_output() && !service.selector.labels.is_empty() {
            let picked: Vec<&str> = parsed
                .iter()
                .filter(|p| match &p.document {
                    Document::WorkloadIdentity(wi) => service
                        .selector
                        .labels
                        .iter()
                        .all(|(k, v)| wi.metadata.labels.get(k) == Some(v)),
                    _ => false,
                })
                .map(|p| p.document.name())
                .collect();
            if picked.len() > 1 {
                out.push(
                    Problem::error(
                        format!("/services/{j}/selector/labels"),
                        format!(
                            "the output `{}` writes one identity, and these labels pick {}: {}",
                            service.display_name(),
                            picked.len(),
                            picked.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ")
                        ),
                    )
                    .hint("select it by `name`, or give it a label the others do not have"),
                );
            }
        }
        let Some(name) = service.selector.name.as_deref().filter(|_| service.kind.is_output()) else {
            continue;
        };
        let Some(wi) = parsed.iter().find_map(|p| match &p.document {
            Document::WorkloadIdentity(wi) if p.document.name() == name => Some(wi),
            _ => None,
        }) else {
            continue;
        };
        let read = wi.workload_attributes_read();
        if read.is_empty() {
            continue;
        }
        let listed = read.iter().map(|a| format!("`{a}`")).collect::<Vec<_>>().join(", ");
        out.push(
            Problem::error(
                format!("/services/{j}/selector/name"),
                format!(
                    "the output `{}` writes `{name}`, whose rules or templates read {listed}: an output has no \
                     workload process, so these are never set and it could never be issued",
                    service.display_name()
                ),
            )
            .hint(format!(
                "give the output a `workload_identity` that reads no `workload.*` attribute (it may read `user.*` \
                 and `join.*`), or serve `{name}` on a `workload-identity-api` socket instead"
            )),
        );
    }
    out
}
