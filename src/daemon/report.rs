//! The one report: everything status shows about what runs is derived here, from the running parts
//! themselves, every time: the objects' conditions (failed steps, a failing renewal, a lost link to
//! the remote issuer, failing outputs), the CA pins of the bundle in force, the bot, the services
//! and outputs. Nothing copies a field into the status on one path only, so `tbotctl status`,
//! `/readyz` and the records agree with what the host does.

use std::collections::BTreeSet;
use std::sync::Arc;

use super::{Daemon, agent_ref};
use crate::agent::Agent;
use crate::controller::status::{ConditionType, IssuerLink, Reason, ServiceState, StatusTable};
use crate::resource::{Kind, ObjectRef};

/// The pins of the CAs in the trust bundle (`tbotctl status`, the start log).
pub(super) fn ca_pins(bundles: &crate::issuer::Bundles) -> Vec<String> {
    bundles
        .x509_authorities
        .iter()
        .filter_map(|der| crate::issuer::keys::ca::spki_pin(der))
        .collect()
}

/// The bot's object when the directory holds it, else the agent config (an agent of a remote
/// issuer, whose bot document lives on the issuer).
pub(super) fn bot_ref(agent: Option<&Arc<Agent>>, table: &StatusTable) -> ObjectRef {
    let Some(agent) = agent else { return agent_ref() };
    let bot = ObjectRef::new(Kind::Bot, agent.bot().certificate.bot.clone());
    if table.objects.contains_key(&bot) {
        bot
    } else {
        agent_ref()
    }
}

fn output_reason(report: &crate::agent::outputs::Report) -> (bool, Reason) {
    use crate::agent::outputs::OutputState;
    match report.state() {
        OutputState::Failing => (false, Reason::Failing),
        OutputState::HookFailed => (false, Reason::HookFailed),
        OutputState::Pending => (false, Reason::Pending),
        OutputState::Written => (true, Reason::Written),
    }
}

impl Daemon {
    /// Marks every object but `failed` converged, derives the rest of the status from what runs,
    /// and wakes whoever reads it (the admin API, `/readyz`, the records).
    pub(super) fn report(&mut self, failed: &BTreeSet<ObjectRef>) {
        let reports: Vec<_> = self
            .outputs
            .iter()
            .map(|(name, o)| {
                (
                    name.clone(),
                    o.output.spec.destination.path.display().to_string(),
                    o.output.report().borrow().clone(),
                )
            })
            .collect();
        let renewal = self.agent.as_ref().and_then(|a| a.renewal().borrow().clone());
        // An agent of a remote issuer that cannot reach it is stalled: it serves what it holds.
        let link = self.host.remote().map(|r| r.link().borrow().clone());
        let unlinked = link
            .clone()
            .filter(|l| !l.connected && l.refused.is_none() && self.agent.is_some());
        let refused = link
            .as_ref()
            .and_then(|l| l.refused.clone().map(|why| (l.address.clone(), why)));
        let failing: Vec<String> = reports
            .iter()
            .filter(|(_, _, report)| report.failing())
            .map(|(name, _, report)| format!("output {name}: {}", report.describe()))
            .collect();
        // The bundle in force: what the agent holds, else (an issuer host without an agent) the issuer's.
        let bundles = match (&self.agent, self.host.local()) {
            (Some(agent), _) => Some(agent.bundles().borrow().clone()),
            (None, Some(issuer)) => Some(issuer.current_bundles()),
            (None, None) => None,
        };
        let agent = self.agent.clone();
        let services: Vec<ServiceState> = self
            .services
            .iter()
            .map(|(name, r)| ServiceState {
                name: name.clone(),
                listen: r.listen.to_string(),
                ..ServiceState::default()
            })
            .chain(reports.iter().map(|(name, path, report)| ServiceState {
                name: name.clone(),
                listen: String::new(),
                destination: path.clone(),
                state: report.describe(),
                healthy: report.healthy(),
            }))
            .collect();
        let storage = self.persist.failures().borrow().clone();
        self.status.update(|s| {
            let bot = bot_ref(agent.as_ref(), &s.table);
            let mut failed = failed.clone();
            if renewal.is_some() {
                failed.insert(bot.clone());
            }
            if unlinked.is_some() || refused.is_some() || !failing.is_empty() {
                failed.insert(agent_ref());
            }
            s.table.converged_except(&failed);
            for (name, path, report) in &reports {
                let message = format!("{path}: {}", report.describe());
                let (ok, reason) = output_reason(report);
                s.table
                    .set(&agent_ref(), ConditionType::Output(name.clone()), ok, reason, &message);
            }
            if !failing.is_empty() {
                s.table.stalled(&agent_ref(), Reason::OutputFailed, &failing.join("; "));
            }
            if let Some(message) = &renewal {
                s.table.stalled(&bot, Reason::RenewalFailed, message);
            }
            if let Some(link) = unlinked {
                let message = format!(
                    "not connected to the issuer at {}: {}; cached SVIDs keep being served",
                    link.address, link.message
                );
                s.table.stalled(&agent_ref(), Reason::IssuerUnreachable, &message);
            }
            if let Some((address, why)) = &refused {
                let message = format!(
                    "the issuer at {address} refuses this agent's bot certificate: {why}; workloads get no new \
                     SVIDs until it holds one the issuer accepts. The agent renews by itself (an `iam` agent joins \
                     again); if renewing is refused too, put a new token (a `token` document on the issuer) in \
                     `onboarding.token` here"
                );
                s.table.stalled(&agent_ref(), Reason::BotRefused, &message);
            }
            // Whether the controller's records can be written shows on the agent config.
            if let Some(r) = s.table.objects.keys().find(|r| r.kind == Kind::AgentConfig).cloned() {
                let shown = s.table.objects[&r].condition(&ConditionType::StorageWritable).is_some();
                match &storage {
                    Some(message) => {
                        s.table
                            .set(&r, ConditionType::StorageWritable, false, Reason::WriteFailed, message)
                    }
                    // Shown once writes have failed, until the object goes.
                    None if shown => s
                        .table
                        .set(&r, ConditionType::StorageWritable, true, Reason::Written, ""),
                    None => {}
                }
            }
            // An agent config that has not joined yet: why, from its own condition.
            let pending = match (&agent, s.table.objects.get(&agent_ref())) {
                (None, Some(object)) => Some(
                    object
                        .condition(&ConditionType::Ready)
                        .filter(|c| !c.status && !c.message.is_empty())
                        .map_or_else(|| "joining".to_owned(), |c| c.message.clone()),
                ),
                _ => None,
            };
            let host = &mut s.host;
            host.bot_pending = pending.unwrap_or_default();
            if let Some(agent) = &agent {
                let bot = agent.bot();
                host.bot = bot.certificate.bot.clone();
                host.bot_expires = crate::rfc3339(bot.certificate.not_after);
            }
            if let Some(bundles) = &bundles {
                host.ca_pins = ca_pins(bundles);
                if !bundles.trust_domain.is_empty() {
                    host.trust_domain = bundles.trust_domain.clone();
                }
            }
            host.issuer_link = link.map(|l| IssuerLink {
                address: l.address,
                connected: l.connected,
                message: l.message,
                refused: l.refused.unwrap_or_default(),
            });
            host.services = services;
        });
        self.persist.save_status();
    }
}
