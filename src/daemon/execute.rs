//! Carrying out a plan: the issuer takes the new documents (then rotates, if the CA settings
//! changed), the agent joins or rejoins, outputs and listeners follow the agent config, and the
//! identities the plan names are re-decided. Each step that fails is a typed [`Failure`] naming the
//! objects it ran for and whether a retry may help.

use std::sync::Arc;
use std::time::Duration;

use super::{Daemon, Host, agent_config, agent_ref};
use crate::agent::remote::RemoteSettings;
use crate::agent::{Agent, JoinSettings};
use crate::controller::plan::{Action, Plan};
use crate::controller::status::{ConditionType, Reason};
use crate::error::Explain;
use crate::issuer::{IssuerError, Policy};
use crate::manifest::DesiredState;
use crate::resource::agent::AgentConfig;
use crate::resource::{Kind, ObjectRef};

/// A step that failed, the objects it ran for, and whether a retry may help.
pub(super) struct Failure {
    pub causes: Vec<ObjectRef>,
    pub reason: Reason,
    /// What failed and what to do next.
    pub message: String,
    pub transient: bool,
}

impl Failure {
    /// A failure of the issuer (in process or remote): its message, its hint, and its own transient
    /// or terminal nature.
    pub fn issuer(causes: Vec<ObjectRef>, reason: Reason, error: &IssuerError) -> Failure {
        Failure {
            causes,
            reason,
            message: error.explain(),
            transient: error.is_transient(),
        }
    }
}

/// Where and how to reach the remote issuer.
pub(super) fn remote_settings(config: &AgentConfig) -> RemoteSettings {
    RemoteSettings {
        address: config
            .proxy_server
            .clone()
            .or_else(|| config.auth_server.clone())
            .unwrap_or_default(),
        ca_pins: config.onboarding.ca_pins.clone(),
        ca_path: config.onboarding.ca_path.clone(),
        insecure: config.onboarding.insecure,
    }
}

fn join_settings(config: &AgentConfig) -> JoinSettings {
    JoinSettings {
        method: config.onboarding.join_method,
        token: config.onboarding.token.clone(),
        ttl: config.credential_ttl.as_std(),
        renewal_interval: config.renewal_interval.as_std(),
    }
}

impl Daemon {
    /// Executes a plan; returns the steps that failed.
    pub(super) async fn execute(&mut self, plan: &Plan, desired: &DesiredState) -> Vec<Failure> {
        let mut failures = Vec::new();
        let errors = self.telemetry.daemon.errors.clone();
        let causes_of = |wanted: fn(&Action) -> bool| -> Vec<ObjectRef> {
            plan.steps
                .iter()
                .filter(|s| wanted(&s.action))
                .flat_map(|s| s.causes.iter().cloned())
                .collect()
        };
        let cluster_side: Vec<ObjectRef> = plan
            .changes
            .iter()
            .map(|(r, _)| r.clone())
            .filter(|r| r.kind != Kind::AgentConfig)
            .chain(causes_of(|a| matches!(a, Action::CreateCa { .. })))
            .collect();
        if let Some(issuer) = self.host.local()
            && !cluster_side.is_empty()
        {
            let applied = match Policy::from_state(desired) {
                Ok(policy) => issuer.set_policy(policy).await,
                Err(e) => Err(e),
            };
            match applied {
                Ok(()) => {
                    if let Some(agent) = &self.agent {
                        agent.forget_resolutions();
                    }
                }
                Err(e) => {
                    errors.count("issuer_policy");
                    tracing::error!(error = %e, hint = %e.hint(), "cannot apply the new documents to the issuer");
                    failures.push(Failure::issuer(cluster_side, Reason::IssuerFailed, &e));
                }
            }
        }
        let rotate = causes_of(|a| matches!(a, Action::RotateCa { .. }));
        // Rotate only once the issuer has the new settings.
        if !rotate.is_empty()
            && failures.is_empty()
            && let Some(issuer) = self.host.local()
            && let Err(e) = issuer.rotate_ca_for_settings().await
        {
            errors.count("ca_rotation");
            tracing::error!(error = %e, hint = %e.hint(), "cannot rotate the CA");
            failures.push(Failure::issuer(rotate, Reason::RotationFailed, &e));
        }
        let config = agent_config(desired).cloned();
        let rejoin = causes_of(|a| matches!(a, Action::Rejoin | Action::Retrust));
        if let (Some(config), None) = (&config, &self.agent) {
            if let Err(e) = self.start_agent(config).await {
                failures.push(Failure::issuer(vec![agent_ref()], Reason::JoinFailed, &e));
            }
        } else if !rejoin.is_empty()
            && let Some(config) = &config
            && let Err(e) = self.rejoin(config).await
        {
            errors.count("rejoin");
            tracing::error!(error = %e, hint = %e.hint(), "the rejoin failed; the current identity stays in force");
            failures.push(Failure::issuer(rejoin, Reason::RejoinFailed, &e));
        }
        if let Some(config) = &config
            && self.agent.is_some()
        {
            self.sync_outputs(config).await;
            if let Err(e) = self.sync_services(config).await {
                errors.count("listener");
                let message = super::services::explain_all(&e);
                tracing::error!(error = %message, "cannot serve every listener");
                failures.push(Failure {
                    causes: vec![agent_ref()],
                    reason: Reason::ListenFailed,
                    message,
                    transient: true,
                });
            }
        }
        for step in &plan.steps {
            if let Action::RestartRequired { field } = &step.action {
                tracing::warn!(
                    field,
                    "this change takes effect at the next restart: restart tbot to apply it"
                );
            }
        }
        let redecide = plan.identities_to_redecide();
        if !redecide.is_empty() {
            // Remote agents hear of it on their `Watch` streams.
            if let Some(issuer) = self.host.local() {
                issuer.announce(redecide.clone());
            }
            // Ready means the workloads have what the documents ask for: wait for the reissues.
            if let Some(agent) = &self.agent {
                agent.redecide(&redecide, Duration::from_secs(10)).await;
            }
        }
        failures
    }

    /// Joins (or renews the saved identity) and starts following the issuer.
    pub(super) async fn start_agent(&mut self, config: &AgentConfig) -> Result<(), IssuerError> {
        if let Host::Agent { remote } = &self.host {
            // The terms may have been edited since the last attempt.
            remote.retarget(remote_settings(config))?;
        }
        let store = match &self.agent_store {
            Some(store) => store.clone(),
            None => {
                let (issuer_store, issuer_path) = match &self.issuer_store {
                    Some((store, path)) => (Some(store), path.as_deref()),
                    None => (None, None),
                };
                let store = super::stores::open_agent_store(config, issuer_path, issuer_store)?;
                self.agent_store = Some(store.clone());
                store
            }
        };
        let metrics = self.telemetry.agent.clone();
        let agent = Arc::new(Agent::start(self.host.issuer(), join_settings(config), store, metrics).await?);
        agent.follow_policy_events();
        agent.follow_rotations();
        agent.report_holdings();
        if let Host::Agent { remote } = &self.host {
            remote.follow();
            renew_when_refused(remote.link(), Arc::downgrade(&agent));
        }
        // A renewal's outcome (and the new certificate's expiry) shows in `tbotctl status`.
        super::boot::poke_on(agent.renewal(), self.poke.clone());
        super::boot::poke_on(agent.bot_changes(), self.poke.clone());
        super::boot::poke_on(agent.bundles(), self.poke.clone());
        self.agent = Some(agent);
        self.note_join(Reason::Joined);
        Ok(())
    }

    /// Joins again after an edit of `onboarding`, `proxy_server` or the token. A retry of the agent
    /// config (say, for a listener) must not join again on terms it already joined with: a `token`
    /// joins once. An edit of only the trust (`ca_pins`, `ca_path`, `insecure`; `Action::Retrust`)
    /// re-checks the issuer at the next connection without joining again.
    async fn rejoin(&mut self, config: &AgentConfig) -> Result<(), IssuerError> {
        let Some(agent) = self.agent.clone() else { return Ok(()) };
        let mut moved = false;
        if let Host::Agent { remote } = &self.host {
            let settings = remote_settings(config);
            moved = remote.settings().address != settings.address;
            remote.retarget(settings)?;
        }
        if agent.joined_with(&join_settings(config)) && !moved {
            return Ok(());
        }
        agent.rejoin(join_settings(config)).await?;
        self.note_join(Reason::Rejoined);
        Ok(())
    }

    /// Records on the bot's object how and when it joined (`tbotctl get bot`).
    fn note_join(&mut self, reason: Reason) {
        let Some(agent) = &self.agent else { return };
        let bot = agent.bot();
        let message = format!(
            "joined by `{}` at {}; the certificate expires {}",
            agent.join_method(),
            crate::rfc3339(time::OffsetDateTime::now_utc()),
            crate::rfc3339(bot.certificate.not_after)
        );
        let agent = agent.clone();
        self.status.update(|s| {
            let r = super::report::bot_ref(Some(&agent), &s.table);
            s.table.set(&r, ConditionType::Joined, true, reason, &message);
        });
    }
}

/// When the issuer starts refusing the bot certificate, renews at once: a certificate of a CA that
/// is retiring moves onto the active one, and an `iam` agent joins again.
fn renew_when_refused(
    mut link: tokio::sync::watch::Receiver<crate::agent::remote::Link>,
    agent: std::sync::Weak<Agent>,
) {
    tokio::spawn(async move {
        let mut was = link.borrow_and_update().refused.is_some();
        while link.changed().await.is_ok() {
            let now = link.borrow_and_update().refused.is_some();
            let Some(agent) = agent.upgrade() else { return };
            if now && !was {
                agent.renew_now();
            }
            was = now;
        }
    });
}
