//! `tbotctl status`: the running daemon's trust domain and CA pins, bot, issuer link, services and
//! outputs, key phases, federations, replicas and document drift, and what is not ready.

use std::process::ExitCode;

use super::get::{print_file_errors, print_table};
use crate::admin::proto::StatusRequest;
use crate::cli::args::outln;
use crate::cli::args::{DaemonArgs, explain};

pub async fn status(args: &DaemonArgs) -> ExitCode {
    let mut client = match args.connect().await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let s = match client.status(StatusRequest {}).await {
        Ok(r) => r.into_inner(),
        Err(status) => return explain(status),
    };
    if s.trust_domain.is_empty() {
        outln!(
            "tbot (pid {}), trust domain not known yet (the agent has not reached its issuer)",
            s.pid
        );
    } else {
        outln!("tbot (pid {}) for trust domain {}", s.pid, s.trust_domain);
    }
    for pin in &s.ca_pins {
        outln!("CA pin: {pin}");
    }
    if let Some(link) = &s.issuer {
        if !link.refused.is_empty() {
            outln!(
                "issuer: {} (REFUSES this agent's bot certificate: {})",
                link.address,
                link.refused
            );
        } else if link.connected {
            outln!("issuer: {} (connected)", link.address);
        } else {
            outln!("issuer: {} (NOT connected: {})", link.address, link.message);
        }
    }
    if !s.issuer_listen.is_empty() {
        let agents = match s.agents.len() {
            1 => "1 agent".to_owned(),
            n => format!("{n} agents"),
        };
        outln!("issuer API: {} ({agents} connected)", s.issuer_listen);
        // A fleet has thousands: the longest-connected first, then a count.
        const SHOWN: usize = 25;
        if !s.agents.is_empty() {
            let rows: Vec<[String; 6]> = s
                .agents
                .iter()
                .take(SHOWN)
                .map(|a| {
                    [
                        format!("{}/{}", a.bot, a.instance),
                        a.address.clone(),
                        a.generation.to_string(),
                        if a.ca == 0 { "-".into() } else { a.ca.to_string() },
                        a.connected_at.clone(),
                        a.last_seen.clone(),
                    ]
                })
                .collect();
            print_table(
                "  ",
                ["BOT/INSTANCE", "ADDRESS", "GENERATION", "CA", "CONNECTED", "LAST SEEN"],
                &rows,
            );
            if s.agents.len() > SHOWN {
                outln!("  and {} more", s.agents.len() - SHOWN);
            }
        }
        for r in s.refused.iter().take(SHOWN) {
            outln!(
                "  REFUSED {}/{} ({}) at {}: {}",
                r.bot,
                r.instance,
                r.address,
                r.at,
                r.reason
            );
        }
    }
    if !s.issuer_storage.is_empty() {
        outln!("issuer storage: {}", s.issuer_storage);
    }
    print_replicas(&s.replicas, &s.drift);
    print_keys(&s.keys);
    if !s.bundle_endpoint.is_empty() {
        outln!("bundle endpoint: {}", s.bundle_endpoint);
    }
    print_federations(&s.federations);
    if !s.bot_pending.is_empty() {
        outln!("bot: not joined yet: {}", s.bot_pending);
    } else if s.bot.is_empty() {
        outln!("bot: none on this host (no agent config)");
    } else {
        outln!("bot: {} (certificate expires {})", s.bot, s.bot_expires);
    }
    for svc in &s.services {
        if svc.destination.is_empty() {
            outln!("listener {}: {} (Workload API and SDS)", svc.name, svc.listen);
        } else {
            outln!("output {}: {}: {}", svc.name, svc.destination, svc.state);
        }
    }
    outln!("objects: {} ({} not ready)", s.objects, s.not_ready);
    print_file_errors(&s.file_errors);
    let conflicts = s.replicas.iter().any(|r| !r.conflict.is_empty());
    if s.not_ready == 0 && s.file_errors.is_empty() && s.drift.is_empty() && !conflicts {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// Every CA and JWT key with its phase and dates.
pub(super) fn print_keys(keys: &[crate::admin::proto::KeyState]) {
    if keys.is_empty() {
        return;
    }
    outln!("keys:");
    let rows: Vec<[String; 7]> = keys
        .iter()
        .map(|k| {
            [
                format!("{} {}", k.key, k.id),
                k.phase.clone(),
                if k.phase == "revoked" {
                    "-".into()
                } else {
                    format!("{}/{}", k.agents, k.svids)
                },
                if k.phase_ends.is_empty() {
                    "-".into()
                } else {
                    k.phase_ends.clone()
                },
                if k.created.is_empty() {
                    "-".into()
                } else {
                    k.created.clone()
                },
                k.not_after.clone(),
                k.name.clone(),
            ]
        })
        .collect();
    print_table(
        "  ",
        [
            "KEY",
            "PHASE",
            "AGENTS/SVIDS",
            "PHASE ENDS",
            "CREATED",
            "NOT AFTER",
            "PIN / KID",
        ],
        &rows,
    );
}

/// The foreign trust domains and how fresh their bundles are.
/// How long ago an RFC 3339 time was, or `never` when it is not one.
pub(super) fn age(at: &str) -> String {
    time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339)
        .map(|t| format!("{}s ago", (time::OffsetDateTime::now_utc() - t).whole_seconds().max(0)))
        .unwrap_or_else(|_| "never".into())
}

pub(super) fn print_federations(federations: &[crate::admin::proto::Federation]) {
    for f in federations {
        let synced = if f.synced_at.is_empty() {
            "never fetched".to_owned()
        } else {
            format!("synced {} ({})", f.synced_at, age(&f.synced_at))
        };
        let error = if f.error.is_empty() {
            String::new()
        } else {
            format!("; FAILING: {}", f.error)
        };
        outln!(
            "federation {}: {} ({} CAs, {} JWT keys, {synced}, next {}){error}",
            f.trust_domain,
            f.source,
            f.x509_authorities,
            f.jwt_keys,
            f.next_sync
        );
    }
}

/// The replicas of a shared store, and the documents on which they differ.
pub(super) fn print_replicas(replicas: &[crate::admin::proto::Replica], drift: &[crate::admin::proto::DocumentDrift]) {
    if replicas.is_empty() {
        return;
    }
    outln!("replicas: {}", replicas.len());
    let rows: Vec<[String; 5]> = replicas
        .iter()
        .map(|r| {
            [
                if r.this {
                    format!("{} (this)", r.name)
                } else {
                    r.name.clone()
                },
                r.address.clone(),
                r.started.clone(),
                age(&r.heartbeat),
                if r.ready { "yes" } else { "no" }.into(),
            ]
        })
        .collect();
    print_table("  ", ["NAME", "ADDRESS", "STARTED", "LAST HEARTBEAT", "READY"], &rows);
    for r in replicas.iter().filter(|r| !r.conflict.is_empty()) {
        outln!(
            "  WARNING: {} is claimed by two processes ({} and another): give each replica its own `metadata.name`",
            r.name,
            r.conflict
        );
    }
    if drift.is_empty() {
        outln!("documents: the same on every replica");
        return;
    }
    outln!(
        "documents that differ between replicas ({}): a rollout has not reached every replica",
        drift.len()
    );
    for d in drift {
        let versions: Vec<String> = d
            .versions
            .iter()
            .map(|v| {
                let hash = if v.hash.is_empty() {
                    "missing".to_owned()
                } else {
                    v.hash.chars().take(12).collect()
                };
                format!("{}={hash}", v.replica)
            })
            .collect();
        outln!("  {}: {}", d.document, versions.join(" "));
    }
    outln!("  = hint: deploy the same documents to every replica (each reloads them live)");
}
