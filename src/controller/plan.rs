//! The plan: a pure function from what the documents ask for and what was last applied to the typed
//! actions of DESIGN §4, each with the objects that caused it. The watcher, `tbotctl apply` and
//! `tbotctl diff` all use this one function.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::manifest::DesiredState;
use crate::resource::agent::{AgentConfig, Listen, Service};
use crate::resource::{Document, HostRole, Kind, ObjectRef};

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

/// What the daemon does at run time.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Action {
    /// Load or create the CA of a trust domain (first start, or the trust domain changed).
    CreateCa {
        trust_domain: String,
    },
    /// A new CA for the same trust domain (key algorithm or validity changed); both stay trusted.
    RotateCa {
        trust_domain: String,
    },
    /// Join for the first time.
    Join,
    /// Join again with new terms; the old identity stays until the rejoin succeeds or expires.
    Rejoin,
    /// An agent of a remote issuer trusts it differently (`ca_pins`, `ca_path`, `insecure`): the
    /// next connection is checked against the new trust; no new join.
    Retrust,
    Bind {
        service: String,
        listen: String,
    },
    /// Bind the new socket, then drain and close the old one.
    Rebind {
        service: String,
        from: String,
        to: String,
    },
    Unbind {
        service: String,
        listen: String,
    },
    /// New selector, attestors or SVID lifetime for a service: re-decide its callers.
    Reconfigure {
        service: String,
    },
    /// A new file output: issue its SVID and write its files.
    Write {
        output: String,
        path: String,
    },
    /// An output's settings changed: issue again and replace its files.
    Rewrite {
        output: String,
        path: String,
    },
    /// An output removed: stop renewing; its files are left in place.
    StopOutput {
        output: String,
        path: String,
    },
    Issue {
        identity: String,
    },
    Reissue {
        identity: String,
    },
    Revoke {
        identity: String,
    },
    /// Trust a foreign trust domain: keep its bundle from `source` and give it to workloads.
    Federate {
        trust_domain: String,
        source: String,
        new: bool,
    },
    /// Stop trusting a foreign trust domain: its bundle is withdrawn from every workload.
    Unfederate {
        trust_domain: String,
    },
    /// A key's rotation schedule changed (`key` is `ca` or `jwt`): the issuer follows the new one
    /// from now on; the active key keeps its dates.
    Reschedule {
        key: String,
        schedule: String,
    },
    /// A change that only takes effect at the next start.
    RestartRequired {
        field: String,
    },
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::CreateCa { trust_domain } => write!(f, "+ ca {trust_domain}: create (or load) the CA"),
            Action::Federate {
                trust_domain,
                source,
                new: true,
            } => write!(
                f,
                "+ federation {trust_domain}: keep its bundle ({source}) and give it to workloads"
            ),
            Action::Federate {
                trust_domain, source, ..
            } => write!(
                f,
                "~ federation {trust_domain}: keep its bundle from {source} from now on"
            ),
            Action::Unfederate { trust_domain } => write!(
                f,
                "- federation {trust_domain}: withdraw its bundle from every workload"
            ),
            Action::RotateCa { trust_domain } => write!(f, "~ ca {trust_domain}: rotate; old and new CA in the bundle"),
            Action::Join => write!(f, "+ bot: join"),
            Action::Rejoin => write!(f, "~ bot: rejoin with the new terms"),
            Action::Retrust => write!(
                f,
                "~ issuer: check its certificate against the new trust at the next connection"
            ),
            Action::Bind { service, listen } => write!(f, "+ listener {service}: bind {listen}"),
            Action::Rebind { service, from, to } => write!(f, "~ listener {service}: rebind {from} → {to}"),
            Action::Unbind { service, listen } => write!(f, "- listener {service}: unbind {listen}"),
            Action::Reconfigure { service } => write!(f, "~ listener {service}: re-decide its callers"),
            Action::Write { output, path } => write!(f, "+ output {output}: write {path}"),
            Action::Rewrite { output, path } => {
                write!(f, "~ output {output}: issue again and replace the files in {path}")
            }
            Action::StopOutput { output, path } => write!(
                f,
                "- output {output}: stop renewing; the files in {path} are left in place"
            ),
            Action::Issue { identity } => write!(f, "+ SVIDs of workload_identity/{identity} issued"),
            Action::Reissue { identity } => write!(f, "~ SVIDs of workload_identity/{identity} reissued"),
            Action::Revoke { identity } => write!(f, "- SVIDs of workload_identity/{identity} revoked"),
            Action::Reschedule { key, schedule } => {
                write!(f, "~ {key} rotation: {schedule}; the active key keeps its dates")
            }
            Action::RestartRequired { field } => write!(f, "! {field} changed: takes effect at the next restart"),
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
    state.objects.values().find_map(|o| match &o.document {
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
    if HostRole::of(state.objects.keys().map(|r| r.kind)) == HostRole::Agent {
        return None;
    }
    for (r, o) in &state.objects {
        if let Document::Cluster(c) = &o.document {
            return Some((c.metadata.name.to_string(), r.clone()));
        }
    }
    agent(state)
        .and_then(|a| a.server_host())
        .map(|h| (h.to_owned(), agent_ref()))
}

/// The CA settings that make a new CA: the algorithm and the validity (not the rotation schedule,
/// which the issuer follows without a new CA).
fn ca_settings(state: &DesiredState) -> Option<String> {
    state.objects.values().find_map(|o| match &o.document {
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
    state.objects.values().find_map(|o| match &o.document {
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

fn identities(state: &DesiredState) -> BTreeSet<String> {
    state
        .objects
        .keys()
        .filter(|r| r.kind == Kind::WorkloadIdentity)
        .map(|r| r.name.clone())
        .collect()
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
    for (r, o) in &desired.objects {
        match before.objects.get(r) {
            None => out.changes.push((r.clone(), Change::Create)),
            Some(old) if old.hash != o.hash => out.changes.push((r.clone(), Change::Update)),
            Some(_) => {}
        }
    }
    for r in before.objects.keys() {
        if !desired.objects.contains_key(r) {
            out.changes.push((r.clone(), Change::Delete));
        }
    }
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
        (Some((td, cause)), Some(_)) if ca_settings(desired) != ca_settings(before) => {
            step(
                Action::RotateCa {
                    trust_domain: td.clone(),
                },
                vec![cause.clone()],
            );
            redecide_all.push(cause.clone());
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
                let remote = HostRole::of(desired.objects.keys().map(|r| r.kind)) == HostRole::Agent;
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

    // Identities.
    let (ids_new, ids_old) = (identities(desired), identities(before));
    for id in &ids_new {
        let r = ObjectRef::new(Kind::WorkloadIdentity, id.clone());
        if !ids_old.contains(id) {
            step(Action::Issue { identity: id.clone() }, vec![r]);
        } else if changed.contains_key(&r) {
            step(Action::Reissue { identity: id.clone() }, vec![r]);
        } else if !redecide_all.is_empty() {
            step(Action::Reissue { identity: id.clone() }, redecide_all.clone());
        }
    }
    for id in ids_old.difference(&ids_new) {
        step(
            Action::Revoke { identity: id.clone() },
            vec![ObjectRef::new(Kind::WorkloadIdentity, id.clone())],
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
        state.objects.iter().find_map(|(r, o)| match &o.document {
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
mod tests {
    use super::*;
    use crate::manifest::{Input, load};

    fn state(files: &[(&str, &str)]) -> DesiredState {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        let loaded = load(&[Input::Dir(dir.path().to_owned())]).unwrap();
        assert!(!loaded.has_errors(), "{:#?}", loaded.diagnostics);
        loaded.state
    }

    fn quickstart() -> Vec<(String, String)> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests/quickstart");
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let p = e.unwrap().path();
                (
                    p.file_name().unwrap().to_str().unwrap().to_owned(),
                    std::fs::read_to_string(&p).unwrap(),
                )
            })
            .collect();
        files.sort();
        files
    }

    fn edited(file: &str, from: &str, to: &str) -> DesiredState {
        edited_many(&[(file, from, to)])
    }

    fn edited_many(edits: &[(&str, &str, &str)]) -> DesiredState {
        let files: Vec<(String, String)> = quickstart()
            .into_iter()
            .map(|(n, mut t)| {
                for (file, from, to) in edits {
                    if n == *file {
                        assert!(t.contains(from), "{n} has no {from:?}");
                        t = t.replace(from, to);
                    }
                }
                (n, t)
            })
            .collect();
        let refs: Vec<(&str, &str)> = files.iter().map(|(n, t)| (n.as_str(), t.as_str())).collect();
        state(&refs)
    }

    fn base() -> DesiredState {
        edited("tbot.yaml", "version: v2", "version: v2")
    }

    fn actions(p: &Plan) -> Vec<String> {
        p.steps.iter().map(|s| s.action.to_string()).collect()
    }

    #[test]
    fn the_first_start_creates_the_ca_joins_binds_and_issues() {
        let p = plan(&base(), None);
        assert_eq!(
            actions(&p),
            [
                "+ ca quickstart.tbot.local: create (or load) the CA",
                "+ bot: join",
                "+ listener workload-identity-api: bind unix:///tmp/tbot-quickstart/workload.sock",
                "+ SVIDs of workload_identity/quickstart issued",
            ]
        );
        assert_eq!(p.counts(), (6, 0, 0));
    }

    #[test]
    fn a_comment_changes_nothing() {
        let p = plan(
            &edited("role.yaml", "kind: role", "# a comment\nkind: role"),
            Some(&base()),
        );
        assert!(p.is_empty(), "{p:?}");
    }

    #[test]
    fn a_workload_identity_edit_reissues_that_identity() {
        let p = plan(
            &edited("workload-identity.yaml", "hint: quickstart", "hint: other"),
            Some(&base()),
        );
        assert_eq!(actions(&p), ["~ SVIDs of workload_identity/quickstart reissued"]);
        assert_eq!(p.counts(), (0, 1, 0));
        assert_eq!(
            p.steps[0].causes,
            [ObjectRef::new(Kind::WorkloadIdentity, "quickstart")]
        );
    }

    #[test]
    fn a_role_edit_redecides_every_identity() {
        let p = plan(
            &edited("role.yaml", "verbs: [read, list]", "verbs: [read]"),
            Some(&base()),
        );
        assert_eq!(actions(&p), ["~ SVIDs of workload_identity/quickstart reissued"]);
        assert_eq!(p.steps[0].causes, [ObjectRef::new(Kind::Role, "quickstart-issuer")]);
    }

    #[test]
    fn a_listen_edit_rebinds() {
        let p = plan(&edited("tbot.yaml", "workload.sock", "other.sock"), Some(&base()));
        assert_eq!(
            actions(&p),
            [
                "~ listener workload-identity-api: rebind unix:///tmp/tbot-quickstart/workload.sock → unix:///tmp/tbot-quickstart/other.sock"
            ]
        );
    }

    #[test]
    fn a_token_edit_rejoins() {
        let p = plan(
            &edited("bot.yaml", "bot_name: quickstart", "bot_name: quickstart\n  # edited\n"),
            Some(&base()),
        );
        assert!(p.is_empty(), "a comment in the token changes nothing");
        let p = plan(
            &edited(
                "bot.yaml",
                "name: quickstart-token-change-me\n",
                "name: quickstart-token-change-me\n  expires: '2099-01-01T00:00:00Z'\n",
            ),
            Some(&base()),
        );
        assert_eq!(actions(&p), ["~ bot: rejoin with the new terms"]);
    }

    #[test]
    fn a_rotation_schedule_edit_reschedules_without_a_new_ca_and_a_validity_edit_rotates() {
        let p = plan(
            &edited(
                "cluster.yaml",
                "key_algorithm: ecdsa-p256",
                "key_algorithm: ecdsa-p256\n    rotation: {prepare_before: 2000h}\n  jwt:\n    validity: 720h",
            ),
            Some(&base()),
        );
        assert_eq!(
            actions(&p),
            [
                "~ ca rotation: successor prepared 2000h and activated 1460h before the active key's end; \
                 the active key keeps its dates",
                "~ jwt rotation: new keys valid 720h, successor prepared 360h and activated 120h before the \
                 active key's end; the active key keeps its dates",
            ]
        );
        let p = plan(
            &edited(
                "cluster.yaml",
                "key_algorithm: ecdsa-p256",
                "key_algorithm: ecdsa-p256\n    validity: 720h\n    rotation: {prepare_before: 300h}",
            ),
            Some(&base()),
        );
        assert_eq!(
            actions(&p)[0],
            "~ ca quickstart.tbot.local: rotate; old and new CA in the bundle"
        );
        assert!(
            !actions(&p).iter().any(|a| a.starts_with("~ ca rotation")),
            "{:?}",
            actions(&p)
        );
    }

    #[test]
    fn a_storage_edit_requires_a_restart() {
        let p = plan(
            &edited("tbot.yaml", "/tmp/tbot-quickstart/state", "/tmp/elsewhere"),
            Some(&base()),
        );
        assert_eq!(actions(&p), ["! storage changed: takes effect at the next restart"]);
    }

    #[test]
    fn a_selector_edit_reconfigures_the_service() {
        let p = plan(&edited("tbot.yaml", "enabled: true", "enabled: false"), Some(&base()));
        assert_eq!(actions(&p), ["~ listener workload-identity-api: re-decide its callers"]);
    }

    #[test]
    fn outputs_are_written_rewritten_on_an_edit_or_a_new_agent_lifetime_and_stopped() {
        const OUTPUT: &str = "    attestors:\n      unix: {}\n      systemd:\n        enabled: true\n  - type: workload-identity-x509\n    name: files\n    selector: {name: quickstart}\n    destination: {type: directory, path: /tmp/out}\n";
        let with = |extra: &[(&str, &str, &str)]| {
            let mut edits = vec![(
                "tbot.yaml",
                "    attestors:\n      unix: {}\n      systemd:\n        enabled: true\n",
                OUTPUT,
            )];
            edits.extend_from_slice(extra);
            edited_many(&edits)
        };
        assert_eq!(
            actions(&plan(&with(&[]), Some(&base()))),
            ["+ output files: write /tmp/out"]
        );
        let p = plan(
            &with(&[("tbot.yaml", "path: /tmp/out", "path: /tmp/elsewhere")]),
            Some(&with(&[])),
        );
        assert_eq!(
            actions(&p),
            ["~ output files: issue again and replace the files in /tmp/elsewhere"]
        );
        // The output takes the agent's lifetime: a new one issues again (and re-decides the listener).
        let p = plan(
            &with(&[("tbot.yaml", "credential_ttl: 1h", "credential_ttl: 2h")]),
            Some(&with(&[])),
        );
        assert!(
            actions(&p).contains(&"~ output files: issue again and replace the files in /tmp/out".to_owned()),
            "{:?}",
            actions(&p)
        );
        assert_eq!(
            actions(&plan(&base(), Some(&with(&[])))),
            ["- output files: stop renewing; the files in /tmp/out are left in place"]
        );
    }

    #[test]
    fn a_trust_domain_edit_creates_a_ca_and_reissues_everything() {
        let p = plan(
            &edited("cluster.yaml", "name: quickstart.tbot.local", "name: other.tbot.local"),
            Some(&base()),
        );
        assert_eq!(
            actions(&p),
            [
                "+ ca other.tbot.local: create (or load) the CA",
                "~ SVIDs of workload_identity/quickstart reissued"
            ]
        );
    }

    #[test]
    fn a_key_algorithm_edit_rotates_the_ca() {
        let p = plan(&edited("cluster.yaml", "ecdsa-p256", "ed25519"), Some(&base()));
        assert_eq!(
            actions(&p),
            [
                "~ ca quickstart.tbot.local: rotate; old and new CA in the bundle",
                "~ SVIDs of workload_identity/quickstart reissued"
            ]
        );
    }

    #[test]
    fn a_deleted_identity_is_revoked_and_a_new_one_issued() {
        let renamed = edited_many(&[
            ("workload-identity.yaml", "name: quickstart\n", "name: renamed\n"),
            ("tbot.yaml", "name: quickstart\n", "name: renamed\n"),
        ]);
        let p = plan(&renamed, Some(&base()));
        assert_eq!(
            actions(&p),
            [
                "~ listener workload-identity-api: re-decide its callers",
                "+ SVIDs of workload_identity/renamed issued",
                "- SVIDs of workload_identity/quickstart revoked"
            ]
        );
        assert_eq!(p.counts(), (1, 1, 1));
    }
}
