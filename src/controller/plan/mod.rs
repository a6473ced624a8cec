//! The plan: a pure function from what the documents ask for and what was last applied to the typed
//! actions of the hot-reload table (docs/architecture.md), each with the objects that caused it. The watcher, `tbotctl apply` and
//! `tbotctl diff` all use this one function.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};

mod action;

use crate::manifest::DesiredState;
use crate::resource::agent::{AgentConfig, Listen, Service};
use crate::resource::{Document, HostRole, Kind, ObjectRef};
pub use action::Action;

/// What happens to one object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Change {
    Create,
    Update,
    Delete,
}

impl Change {
    /// The symbol `tbotctl diff` prints.
    pub fn symbol(self) -> &'static str {
        match self {
            Change::Create => "+",
            Change::Update => "~",
            Change::Delete => "-",
        }
    }
}

/// One action and the objects that caused it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub action: Action,
    pub causes: Vec<ObjectRef>,
}

/// Everything a change does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Objects created, updated or deleted, in order.
    pub changes: Vec<(ObjectRef, Change)>,
    pub steps: Vec<Step>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty() && self.steps.is_empty()
    }

    /// (to add, to change, to destroy) objects.
    pub fn counts(&self) -> (usize, usize, usize) {
        let count = |c| self.changes.iter().filter(|(_, x)| *x == c).count();
        (count(Change::Create), count(Change::Update), count(Change::Delete))
    }

    /// The identities whose SVIDs must be re-decided (issued, reissued or revoked).
    pub fn identities_to_redecide(&self) -> BTreeSet<String> {
        self.steps
            .iter()
            .filter_map(|s| match &s.action {
                Action::Issue { identity } | Action::Reissue { identity } | Action::Revoke { identity } => {
                    Some(identity.clone())
                }
                _ => None,
            })
            .collect()
    }
}

fn agent(state: &DesiredState) -> Option<&AgentConfig> {
    state.of_kind(Kind::AgentConfig).find_map(|(_, o)| match &o.document {
        Document::AgentConfig(a) => Some(a),
        _ => None,
    })
}

fn agent_ref() -> ObjectRef {
    ObjectRef::new(Kind::AgentConfig, ObjectRef::AGENT_CONFIG_NAME)
}

/// The trust domain the documents give, and the object it comes from; none on an agent of a
/// remote issuer (the issuer's CA is not this host's to create).
fn trust_domain(state: &DesiredState) -> Option<(String, ObjectRef)> {
    if HostRole::of(state.kinds()) == HostRole::Agent {
        return None;
    }
    for (r, o) in state.of_kind(Kind::Cluster) {
        if let Document::Cluster(c) = &o.document {
            return Some((c.metadata.name.to_string(), r.clone()));
        }
    }
    agent(state)
        .and_then(|a| a.server_host())
        .map(|h| (h.to_owned(), agent_ref()))
}

/// The issuance log's limits as `tbotctl diff` says them.
fn log_settings(state: &DesiredState) -> Option<String> {
    state.of_kind(Kind::Cluster).find_map(|(_, o)| match &o.document {
        Document::Cluster(c) => {
            let (history, bytes) = crate::resource::cluster::IssuanceLogSpec::limits(c.spec.issuance_log.as_ref());
            Some(format!(
                "keep records {} past their expiry, at most {} MiB",
                crate::resource::Duration::from_secs(history.as_secs()),
                bytes >> 20
            ))
        }
        _ => None,
    })
}

/// The CA settings that make a new CA: the algorithm and the validity (not the rotation schedule,
/// which the issuer follows without a new CA).
fn ca_settings(state: &DesiredState) -> Option<String> {
    state.of_kind(Kind::Cluster).find_map(|(_, o)| match &o.document {
        Document::Cluster(c) => Some(
            c.spec
                .ca
                .as_ref()
                .map(|ca| format!("{} {:?}", ca.key_algorithm, ca.validity))
                .unwrap_or_default(),
        ),
        _ => None,
    })
}

/// Each key's rotation schedule as a sentence (`ca`, `jwt`): the CA's thresholds, and the JWT
/// keys' validity and thresholds, defaults filled in.
fn schedules(state: &DesiredState) -> Option<[(&'static str, String); 2]> {
    use crate::resource::cluster::{DEFAULT_KEY_VALIDITY, RotationSpec};
    let show = |d: std::time::Duration| crate::resource::Duration::from_secs(d.as_secs()).to_string();
    let sentence = |validity: std::time::Duration, spec: Option<&RotationSpec>, valid: bool| {
        let (prepare, activate) = RotationSpec::thresholds(spec, validity);
        let valid = if valid {
            format!("new keys valid {}, ", show(validity))
        } else {
            String::new()
        };
        format!(
            "{valid}successor prepared {} and activated {} before the active key's end",
            show(prepare),
            show(activate)
        )
    };
    state.of_kind(Kind::Cluster).find_map(|(_, o)| match &o.document {
        Document::Cluster(c) => {
            let ca = c.spec.ca.as_ref();
            let jwt = c.spec.jwt.as_ref();
            Some([
                (
                    "ca",
                    sentence(
                        ca.and_then(|c| c.validity).map_or(DEFAULT_KEY_VALIDITY, |v| v.as_std()),
                        ca.and_then(|c| c.rotation.as_ref()),
                        false,
                    ),
                ),
                (
                    "jwt",
                    sentence(
                        jwt.and_then(|j| j.validity)
                            .map_or(DEFAULT_KEY_VALIDITY, |v| v.as_std()),
                        jwt.and_then(|j| j.rotation.as_ref()),
                        true,
                    ),
                ),
            ])
        }
        _ => None,
    })
}

/// The `workload-identity-api` services by name, with their listen address.
fn services(config: Option<&AgentConfig>) -> BTreeMap<String, (&Service, &Listen)> {
    config
        .map(|a| {
            a.services
                .iter()
                .filter_map(|s| Some((s.display_name().to_owned(), (s, s.socket()?))))
                .collect()
        })
        .unwrap_or_default()
}

/// The file outputs by name.
fn outputs(config: Option<&AgentConfig>) -> BTreeMap<String, &Service> {
    config
        .map(|a| {
            a.services
                .iter()
                .filter(|s| s.output().is_some())
                .map(|s| (s.display_name().to_owned(), s))
                .collect()
        })
        .unwrap_or_default()
}

/// Whether an output must be issued and written again: its settings, or the agent's lifetime it
/// falls back on, changed.
pub fn output_changed(
    old: &Service,
    new: &Service,
    old_ttl: crate::resource::Duration,
    new_ttl: crate::resource::Duration,
) -> bool {
    old != new || (new.credential_ttl.is_none() && old_ttl != new_ttl)
}

/// Plans the move from `actual` (what was last applied; `None` before the first start) to `desired`.
pub fn plan(desired: &DesiredState, actual: Option<&DesiredState>) -> Plan {
    let empty = DesiredState::default();
    let before = actual.unwrap_or(&empty);
    let mut out = Plan::default();
    // Both maps are sorted by reference: one walk over the two side by side (no lookups), creates
    // and updates in order, then deletes in order.
    let mut deletes = Vec::new();
    let (mut new, mut old) = (desired.objects.iter().peekable(), before.objects.iter().peekable());
    loop {
        let order = match (new.peek(), old.peek()) {
            (None, None) => break,
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some((a, _)), Some((b, _))) => a.cmp(b),
        };
        match order {
            Ordering::Less => {
                let (r, _) = new.next().expect("peeked");
                out.changes.push((r.clone(), Change::Create));
            }
            Ordering::Greater => {
                let (r, _) = old.next().expect("peeked");
                deletes.push((r.clone(), Change::Delete));
            }
            Ordering::Equal => {
                let ((r, o), (_, was)) = (new.next().expect("peeked"), old.next().expect("peeked"));
                if !std::sync::Arc::ptr_eq(o, was) && was.hash != o.hash {
                    out.changes.push((r.clone(), Change::Update));
                }
            }
        }
    }
    out.changes.extend(deletes);
    let changed: BTreeMap<&ObjectRef, Change> = out.changes.iter().map(|(r, c)| (r, *c)).collect();
    let mut steps: Vec<Step> = Vec::new();
    let mut step = |action: Action, causes: Vec<ObjectRef>| steps.push(Step { action, causes });

    // The CA.
    let (td_new, td_old) = (trust_domain(desired), trust_domain(before));
    let mut redecide_all: Vec<ObjectRef> = Vec::new();
    match (&td_new, &td_old) {
        (Some((new, cause)), old) if old.as_ref().map(|(o, _)| o) != Some(new) => {
            step(
                Action::CreateCa {
                    trust_domain: new.clone(),
                },
                vec![cause.clone()],
            );
            if actual.is_some() {
                redecide_all.push(cause.clone());
            }
        }
        // Nothing is reissued now: the new CA only signs once it activates, and then every agent
        // signs its SVIDs again by itself.
        (Some((td, cause)), Some(_)) if ca_settings(desired) != ca_settings(before) => {
            step(
                Action::RotateCa {
                    trust_domain: td.clone(),
                },
                vec![cause.clone()],
            );
        }
        _ => {}
    }
    if let (Some((_, cause)), Some(_)) = (&td_new, &td_old) {
        let rotating = ca_settings(desired) != ca_settings(before);
        if let (Some(new), Some(old)) = (schedules(desired), schedules(before)) {
            for ((key, new), (_, old)) in new.into_iter().zip(old) {
                if new != old && !(key == "ca" && rotating) {
                    step(
                        Action::Reschedule {
                            key: key.into(),
                            schedule: new,
                        },
                        vec![cause.clone()],
                    );
                }
            }
        }
    }

    if let (Some((_, cause)), Some(new), Some(old)) = (&td_new, log_settings(desired), log_settings(before))
        && new != old
    {
        step(Action::IssuanceLog { settings: new }, vec![cause.clone()]);
    }

    // The bot.
    let (agent_new, agent_old) = (agent(desired), agent(before));
    if let Some(new) = agent_new {
        let token_ref = ObjectRef::new(Kind::Token, new.onboarding.token.clone());
        match agent_old {
            None => step(Action::Join, vec![agent_ref()]),
            Some(old) => {
                let mut causes = Vec::new();
                let terms = |a: &AgentConfig| {
                    (
                        a.onboarding.join_method,
                        a.onboarding.token.clone(),
                        a.proxy_server.clone(),
                        a.auth_server.clone(),
                    )
                };
                let trust = |a: &AgentConfig| {
                    (
                        a.onboarding.ca_pins.clone(),
                        a.onboarding.ca_path.clone(),
                        a.onboarding.insecure,
                    )
                };
                let remote = HostRole::of(desired.kinds()) == HostRole::Agent;
                if terms(old) != terms(new) || (!remote && trust(old) != trust(new)) {
                    causes.push(agent_ref());
                } else if trust(old) != trust(new) {
                    step(Action::Retrust, vec![agent_ref()]);
                }
                if changed.contains_key(&token_ref) {
                    causes.push(token_ref.clone());
                }
                if !causes.is_empty() {
                    step(Action::Rejoin, causes);
                }
            }
        }
    }
    // Federations.
    for (r, change) in &out.changes {
        if r.kind != Kind::SpiffeFederation {
            continue;
        }
        let source = desired.objects.get(r).and_then(|o| match &o.document {
            Document::SpiffeFederation(f) => Some(crate::issuer::federation::source_name(&f.spec)),
            _ => None,
        });
        match (change, source) {
            (Change::Delete, _) | (_, None) => step(
                Action::Unfederate {
                    trust_domain: r.name.clone(),
                },
                vec![r.clone()],
            ),
            (change, Some(source)) => step(
                Action::Federate {
                    trust_domain: r.name.clone(),
                    source,
                    new: *change == Change::Create,
                },
                vec![r.clone()],
            ),
        }
    }

    // Roles and bots decide who may issue what: re-decide every identity.
    for (r, _) in &out.changes {
        if matches!(r.kind, Kind::Role | Kind::Bot) && actual.is_some() {
            redecide_all.push(r.clone());
        }
    }

    // Listeners.
    let (svc_new, svc_old) = (services(agent_new), services(agent_old));
    for (name, (s, listen)) in &svc_new {
        match svc_old.get(name) {
            None => step(
                Action::Bind {
                    service: name.clone(),
                    listen: listen.to_string(),
                },
                vec![agent_ref()],
            ),
            Some((old, old_listen)) => {
                if old_listen != listen {
                    step(
                        Action::Rebind {
                            service: name.clone(),
                            from: old_listen.to_string(),
                            to: listen.to_string(),
                        },
                        vec![agent_ref()],
                    );
                }
                let ttl_changed = s.credential_ttl.is_none()
                    && agent_old.map(|a| a.credential_ttl) != agent_new.map(|a| a.credential_ttl);
                if old.selector != s.selector
                    || old.attestors != s.attestors
                    || old.credential_ttl != s.credential_ttl
                    || ttl_changed
                {
                    step(Action::Reconfigure { service: name.clone() }, vec![agent_ref()]);
                }
            }
        }
    }
    for (name, (_, listen)) in &svc_old {
        if !svc_new.contains_key(name) {
            step(
                Action::Unbind {
                    service: name.clone(),
                    listen: listen.to_string(),
                },
                vec![agent_ref()],
            );
        }
    }

    // File outputs.
    let (out_new, out_old) = (outputs(agent_new), outputs(agent_old));
    let path = |s: &Service| s.output().map(|d| d.path.display().to_string()).unwrap_or_default();
    for (name, s) in &out_new {
        let output = name.clone();
        match (out_old.get(name), agent_old, agent_new) {
            (None, _, _) => step(Action::Write { output, path: path(s) }, vec![agent_ref()]),
            (Some(old), Some(a_old), Some(a_new))
                if output_changed(old, s, a_old.credential_ttl, a_new.credential_ttl) =>
            {
                step(Action::Rewrite { output, path: path(s) }, vec![agent_ref()])
            }
            _ => {}
        }
    }
    for (name, s) in &out_old {
        if !out_new.contains_key(name) {
            step(
                Action::StopOutput {
                    output: name.clone(),
                    path: path(s),
                },
                vec![agent_ref()],
            );
        }
    }

    // Identities: both states' identities walked side by side (each in name order); only those to
    // act on are named.
    let mut revokes = Vec::new();
    let (mut new, mut old) = (
        desired.of_kind(Kind::WorkloadIdentity).map(|(r, _)| r).peekable(),
        before.of_kind(Kind::WorkloadIdentity).map(|(r, _)| r).peekable(),
    );
    loop {
        let order = match (new.peek(), old.peek()) {
            (None, None) => break,
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some(a), Some(b)) => a.cmp(b),
        };
        match order {
            Ordering::Less => {
                let r = new.next().expect("peeked");
                step(
                    Action::Issue {
                        identity: r.name.clone(),
                    },
                    vec![r.clone()],
                );
            }
            Ordering::Greater => revokes.push(old.next().expect("peeked")),
            Ordering::Equal => {
                let r = new.next().expect("peeked");
                old.next();
                if changed.contains_key(r) {
                    step(
                        Action::Reissue {
                            identity: r.name.clone(),
                        },
                        vec![r.clone()],
                    );
                } else if !redecide_all.is_empty() {
                    step(
                        Action::Reissue {
                            identity: r.name.clone(),
                        },
                        redecide_all.clone(),
                    );
                }
            }
        }
    }
    for r in revokes {
        step(
            Action::Revoke {
                identity: r.name.clone(),
            },
            vec![r.clone()],
        );
    }

    // Settings that need a restart.
    if let (Some(new), Some(old)) = (agent_new, agent_old) {
        for (field, differs) in [
            ("storage", old.storage != new.storage),
            ("admin_socket", old.admin_socket != new.admin_socket),
            ("diag_addr", old.diag_addr != new.diag_addr),
        ] {
            if differs {
                step(Action::RestartRequired { field: field.into() }, vec![agent_ref()]);
            }
        }
    }
    let issuers = |state: &'_ DesiredState| {
        state.of_kind(Kind::Issuer).find_map(|(r, o)| match &o.document {
            Document::Issuer(i) => Some((r.clone(), i.spec.clone())),
            _ => None,
        })
    };
    if let (Some((r, new)), Some((_, old))) = (issuers(desired), issuers(before)) {
        for (field, differs) in [
            ("issuer.spec.listen", old.listen != new.listen),
            ("issuer.spec.public_addrs", old.public_addrs != new.public_addrs),
            ("issuer.spec.storage", old.storage != new.storage),
            ("issuer.spec.admin_socket", old.admin_socket != new.admin_socket),
            ("issuer.spec.proxy_protocol", old.proxy_protocol != new.proxy_protocol),
            (
                "issuer.spec.bundle_endpoint",
                old.bundle_endpoint != new.bundle_endpoint,
            ),
        ] {
            if differs {
                step(Action::RestartRequired { field: field.into() }, vec![r.clone()]);
            }
        }
    }
    out.steps = steps;
    out
}

#[cfg(test)]
mod tests;
