//! Checks across documents: duplicates, the single agent config, references between documents,
//! and the trust domain. Each diagnostic names the location of every document involved.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use super::diagnostic::{Diagnostic, Location};
use super::{Parsed, Sources, Unloaded};
use crate::resource::agent::AgentConfig;
use crate::resource::spiffe_id::TrustDomain;
use crate::resource::{Document, HostRole, Kind, Problem, closest};

mod services;

pub(super) struct Outcome {
    pub diagnostics: Vec<Diagnostic>,
    /// Indexes of parsed documents that lost to an earlier one with the same `kind/name`.
    pub shadowed: BTreeSet<usize>,
}

struct Ctx<'a> {
    parsed: &'a [Parsed<'a>],
    sources: &'a Sources<'a>,
    /// Documents that failed to load: what they might define is not reported missing.
    unloaded: &'a [Unloaded],
    out: Vec<Diagnostic>,
}

impl Ctx<'_> {
    fn location(&self, i: usize) -> Location {
        let p = &self.parsed[i];
        Location::at(self.sources.paths[p.file], p.node.pos)
    }

    fn report(&mut self, i: usize, problem: Problem) -> &mut Diagnostic {
        let p = &self.parsed[i];
        let mut diagnostic = self.sources.diagnostic(p.file, p.node, &problem);
        let secret = problem.pointer == "/onboarding/token"
            || (p.document.kind() == Kind::Token && problem.pointer == "/metadata/name");
        if secret {
            // Token names are secrets: do not quote the line that holds one.
            diagnostic.snippet = None;
        }
        self.out.push(diagnostic);
        self.out.last_mut().expect("just pushed")
    }

    /// Whether a document that failed to load might be `kind`/`name` (any name when `None`): then
    /// its absence is a consequence of that failure, which is already reported.
    fn maybe_unloaded(&self, kind: Kind, name: Option<&str>) -> bool {
        self.unloaded.iter().any(|u| u.might_be(kind, name))
    }

    /// What the documents make of this host.
    fn role(&self) -> HostRole {
        HostRole::of(
            self.parsed
                .iter()
                .map(|p| p.document.kind())
                .chain(self.unloaded.iter().filter_map(|u| u.kind)),
        )
    }

    fn names(&self, kind: Kind) -> BTreeSet<&str> {
        self.parsed
            .iter()
            .filter(|p| p.document.kind() == kind)
            .map(|p| p.document.name())
            .collect()
    }
}

/// Runs every cross-document check. `complete_dir` is the first input directory when the set must
/// be complete: then a missing agent config is an error reported against it, and references must
/// resolve. A set of loose files (`-f`) may refer to documents it does not hold.
pub(super) fn run(parsed: &[Parsed], sources: &Sources, unloaded: &[Unloaded], complete_dir: Option<&Path>) -> Outcome {
    let mut ctx = Ctx {
        parsed,
        sources,
        unloaded,
        out: Vec::new(),
    };
    let shadowed = duplicates(&mut ctx);
    singletons(&mut ctx, complete_dir);
    if complete_dir.is_some() {
        references(&mut ctx);
    }
    trust_domain(&mut ctx);
    federations_of_others(&mut ctx);
    only_for_issuers(&mut ctx);
    cluster_documents_beside_remote_trust(&mut ctx);
    Outcome {
        diagnostics: ctx.out,
        shadowed,
    }
}

/// Whether `a` and `b` look the same to every check in this module: both workload identities with
/// one name, one set of labels and one set of `workload.*` attributes read. Of a workload identity
/// the checks read nothing else (and of the other kinds far more), so an edit of identities that
/// keeps these leaves the checks' outcome as it was: the loader patches such an edit into the last
/// load without running them (see `patch.rs`). A check that starts reading more of an identity
/// must say so here.
pub(super) fn same_to_checks(a: &super::Object, b: &super::Object) -> bool {
    match (&a.document, &b.document) {
        (Document::WorkloadIdentity(x), Document::WorkloadIdentity(y)) => {
            x.metadata.name == y.metadata.name && x.metadata.labels == y.metadata.labels && a.reads == b.reads
        }
        _ => false,
    }
}

fn duplicates(ctx: &mut Ctx) -> BTreeSet<usize> {
    // Keyed by borrowed names: a reload of 10,000 documents builds no string here.
    let mut first: std::collections::HashMap<(Kind, &str), usize, foldhash::fast::RandomState> =
        std::collections::HashMap::with_capacity_and_hasher(ctx.parsed.len(), Default::default());
    let mut shadowed = BTreeSet::new();
    for i in 0..ctx.parsed.len() {
        let document = ctx.parsed[i].document;
        if document.kind() == Kind::AgentConfig {
            continue;
        }
        match first.get(&(document.kind(), document.name())) {
            None => {
                first.insert((document.kind(), document.name()), i);
            }
            Some(&earlier) => {
                let object = document.object_ref();
                // A token's name is its secret: never print it.
                let message = if object.kind == Kind::Token {
                    "a second token with the same name".to_owned()
                } else {
                    format!("duplicate `{object}`")
                };
                let note_at = ctx.location(earlier);
                ctx.report(
                    i,
                    Problem::error("/metadata/name", message).hint("rename one of them, or delete one"),
                )
                .notes
                .push(super::Note {
                    location: note_at,
                    message: "first defined here".into(),
                });
                shadowed.insert(i);
            }
        }
    }
    shadowed
}

fn singletons(ctx: &mut Ctx, complete_dir: Option<&Path>) {
    for kind in [Kind::AgentConfig, Kind::Cluster, Kind::Issuer] {
        let all: Vec<usize> = (0..ctx.parsed.len())
            .filter(|&i| ctx.parsed[i].document.kind() == kind)
            .collect();
        let what = match kind {
            Kind::AgentConfig => "agent config",
            Kind::Issuer => "`issuer` document",
            _ => "`cluster` document",
        };
        for &extra in all.iter().skip(1) {
            let first = ctx.location(all[0]);
            let pointer = if kind == Kind::AgentConfig {
                ""
            } else {
                "/metadata/name"
            };
            ctx.report(
                extra,
                Problem::error(pointer, format!("a second {what}; there must be at most one"))
                    .hint("merge them into one, or delete one"),
            )
            .notes
            .push(super::Note {
                location: first,
                message: format!("the first {what} is here"),
            });
        }
    }
    let has = |kind| ctx.parsed.iter().any(|p| p.document.kind() == kind);
    if let (Some(dir), false) = (complete_dir, has(Kind::AgentConfig) || has(Kind::Issuer))
        && !ctx.maybe_unloaded(Kind::AgentConfig, None)
        && !ctx.maybe_unloaded(Kind::Issuer, None)
    {
        ctx.out.push(
            Diagnostic::error(
                Location::file(dir),
                "no agent config and no `issuer` document: the directory needs one of them",
            )
            .hint("add a `tbot.yaml` with `version: v2`, `onboarding` and `services` (see manifests/quickstart/)"),
        );
    }
}

fn references(ctx: &mut Ctx) {
    let bots = ctx.names(Kind::Bot);
    let roles = ctx.names(Kind::Role);
    // Built only for an agent config's service that selects by name: a reload of 10,000
    // identities selected by labels does not sort their names.
    let identities = std::cell::OnceCell::new();
    let identities = || identities.get_or_init(|| ctx.names(Kind::WorkloadIdentity));
    // On an agent of a remote issuer, the identities live on the issuer.
    let remote = ctx.role() == HostRole::Agent;
    let mut found = Vec::new();
    for (i, p) in ctx.parsed.iter().enumerate() {
        match p.document {
            Document::Token(token) => {
                let name: &str = &token.spec.bot_name;
                if !bots.contains(name) && !ctx.maybe_unloaded(Kind::Bot, Some(name)) {
                    found.push((i, dangling("/spec/bot_name", "bot", name, &bots)));
                }
            }
            Document::Bot(bot) => {
                for (j, role) in bot.spec.roles.iter().enumerate() {
                    if !roles.contains(&**role) && !ctx.maybe_unloaded(Kind::Role, Some(role)) {
                        found.push((i, dangling(&format!("/spec/roles/{j}"), "role", role, &roles)));
                    }
                }
            }
            Document::AgentConfig(agent) => {
                for (j, service) in agent.services.iter().enumerate().filter(|_| !remote) {
                    if let Some(name) = &service.selector.name {
                        if !identities().contains(&**name) && !ctx.maybe_unloaded(Kind::WorkloadIdentity, Some(name)) {
                            found.push((
                                i,
                                dangling(
                                    &format!("/services/{j}/selector/name"),
                                    "workload_identity",
                                    name,
                                    identities(),
                                ),
                            ));
                        }
                    } else if !service.selector.labels.is_empty()
                        && !labels_match_any(ctx.parsed, &service.selector.labels)
                        && !ctx.maybe_unloaded(Kind::WorkloadIdentity, None)
                    {
                        found.push((
                            i,
                            Problem::warning(
                                format!("/services/{j}/selector/labels"),
                                "no `workload_identity` has all of these labels; the service will issue nothing",
                            )
                            .hint("check the labels against the workload identities' `metadata.labels`"),
                        ));
                    }
                }
                found.extend(
                    services::outputs_reading_workloads(ctx.parsed, agent)
                        .into_iter()
                        .map(|p| (i, p)),
                );
                found.extend(
                    services::engines_not_attested(ctx.parsed, agent)
                        .into_iter()
                        .map(|p| (i, p)),
                );
                if !ctx.maybe_unloaded(Kind::Token, None) {
                    found.extend(onboarding(ctx.parsed, agent, remote).into_iter().map(|p| (i, p)));
                }
                if remote {
                    found.extend(remote_trust(agent).into_iter().map(|p| (i, p)));
                }
            }
            _ => {}
        }
    }
    for (i, problem) in found {
        ctx.report(i, problem);
    }
}

fn dangling(pointer: &str, kind: &str, name: &str, known: &BTreeSet<&str>) -> Problem {
    let problem = Problem::error(pointer, format!("no `{kind}` named `{name}`"));
    match closest(name, known.iter().copied()) {
        Some(near) => problem.hint(format!("did you mean `{near}`?")),
        None if known.is_empty() => problem.hint(format!("add a `{kind}` document named `{name}`")),
        None => problem.hint(format!(
            "add a `{kind}` document named `{name}`; the `{kind}` documents here are {}",
            known.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ")
        )),
    }
}

/// An output has no workload process behind it: an identity it writes must not read `workload.*`
/// attributes, or it could never be issued. Every such attribute is named at once.
fn labels_match_any(parsed: &[Parsed], wanted: &BTreeMap<String, String>) -> bool {
    parsed.iter().any(|p| match &p.document {
        Document::WorkloadIdentity(wi) => wanted.iter().all(|(k, v)| wi.metadata.labels.get(k) == Some(v)),
        _ => false,
    })
}

/// The agent's `onboarding.token` must name a token of the same join method when this host is its
/// own issuer (the agent joins it in this process), or when the directory holds tokens. Token names
/// are secrets, so the messages never print them.
fn onboarding(parsed: &[Parsed], agent: &AgentConfig, remote: bool) -> Option<Problem> {
    let tokens: Vec<_> = parsed
        .iter()
        .filter_map(|p| match &p.document {
            Document::Token(t) => Some(t),
            _ => None,
        })
        .collect();
    if tokens.is_empty() && remote {
        return None;
    }
    let Some(token) = tokens.iter().find(|t| *t.metadata.name == agent.onboarding.token) else {
        let hint = if tokens.is_empty() {
            "this directory holds cluster documents, so this host is its own issuer and its agent joins it with a `token` \
             of this directory: add one; if this host is meant to be an agent of a remote issuer, move the cluster \
             documents to the issuer host and set `onboarding.ca_pins`"
        } else {
            "set it to the `metadata.name` of one of the directory's `token` documents"
        };
        return Some(
            Problem::error(
                "/onboarding/token",
                "`onboarding.token` names no `token` in this directory",
            )
            .hint(hint),
        );
    };
    let (wanted, actual) = (agent.onboarding.join_method, token.spec.join_method);
    (wanted != actual).then(|| {
        Problem::error(
            "/onboarding/join_method",
            format!("`onboarding.join_method` is `{wanted}`, but the token it names is a `{actual}` token"),
        )
        .hint(format!("set `join_method: {actual}`"))
    })
}

/// An agent of a remote issuer must know which issuer to trust before it sends it anything.
fn remote_trust(agent: &AgentConfig) -> Option<Problem> {
    let o = &agent.onboarding;
    (o.ca_pins.is_empty() && o.ca_path.is_none() && !o.insecure).then(|| {
        Problem::error(
            "/onboarding",
            "this agent joins a remote issuer, and nothing says which issuer to trust: set `onboarding.ca_pins` or `onboarding.ca_path`",
        )
        .hint(
            "on the issuer host run `tbotctl status --dir <its directory>` and copy its `CA pin: sha256:…` into \
             `onboarding.ca_pins: [\"sha256:…\"]`",
        )
    })
}

/// On an agent of a remote issuer, a `spiffe_federation` has nothing to act on: its issuer keeps
/// the foreign bundles and pushes them. It is an error at its own place, not a silent change of
/// what the host is.
fn only_for_issuers(ctx: &mut Ctx) {
    if ctx.role() != HostRole::Agent {
        return;
    }
    let found: Vec<usize> = ctx
        .parsed
        .iter()
        .enumerate()
        .filter(|(_, p)| p.document.kind() == Kind::SpiffeFederation)
        .map(|(i, _)| i)
        .collect();
    for i in found {
        ctx.report(
            i,
            Problem::error(
                "",
                "a `spiffe_federation` belongs on the issuer host, beside the `cluster` document; this directory is an agent of a remote issuer (only an agent config, no `cluster` or `issuer` document), which receives the federated bundles from its issuer",
            )
            .hint("move this document to the issuer host's directory"),
        );
    }
}

/// An agent config that says how to trust a remote issuer (`ca_pins`, `ca_path`, `insecure`) makes
/// this host an agent of that issuer: cluster documents beside it, without an `issuer` document,
/// would make the host its own CA instead and ignore what the agent config says. Each is an error
/// at its own place, saying where it belongs, not a silent change of what the host is.
fn cluster_documents_beside_remote_trust(ctx: &mut Ctx) {
    let remote = ctx.parsed.iter().enumerate().find_map(|(i, p)| match &p.document {
        Document::AgentConfig(a) => {
            let o = &a.onboarding;
            if !o.ca_pins.is_empty() {
                Some((i, "`onboarding.ca_pins`", "/onboarding/ca_pins"))
            } else if o.ca_path.is_some() {
                Some((i, "`onboarding.ca_path`", "/onboarding/ca_path"))
            } else if o.insecure {
                Some((i, "`onboarding.insecure`", "/onboarding/insecure"))
            } else {
                None
            }
        }
        _ => None,
    });
    let Some((agent, setting, pointer)) = remote else {
        return;
    };
    if let HostRole::Issuer { agent: true } = ctx.role() {
        // An issuer host's agent uses the issuer in this process: remote trust settings would be
        // silently ignored.
        ctx.report(
            agent,
            Problem::error(
                pointer,
                format!(
                    "this directory holds an `issuer` document, so this host is the issuer and its agent uses it in this process; {setting} is for an agent of a remote issuer and would be ignored"
                ),
            )
            .hint(format!(
                "remove {setting}; if this host is meant to be an agent of another issuer, move the `issuer` and cluster documents to that issuer's host"
            )),
        );
        return;
    }
    if ctx.role() != HostRole::Single {
        return;
    }
    let found: Vec<(usize, Kind)> = ctx
        .parsed
        .iter()
        .enumerate()
        .map(|(i, p)| (i, p.document.kind()))
        .filter(|(_, kind)| !matches!(kind, Kind::AgentConfig | Kind::SpiffeFederation))
        .collect();
    for (i, kind) in found {
        ctx.report(
            i,
            Problem::error(
                "",
                format!(
                    "a `{kind}` belongs on the issuer host: this directory's agent config sets {setting}, so it is an agent of a remote issuer, and a `{kind}` here would make this host its own CA instead, ignoring {setting}"
                ),
            )
            .hint(format!(
                "move this document to the issuer host's directory; if this host is meant to be its own issuer, remove {setting} from the agent config"
            )),
        );
    }
}

/// A `spiffe_federation` names another trust domain: one named after the host's own would be
/// ignored, and its bundle never used.
fn federations_of_others(ctx: &mut Ctx) {
    // The trust domain as the issuer takes it: the `cluster` document's name, else the host of the
    // agent config's `proxy_server`/`auth_server`.
    let cluster = ctx.parsed.iter().find_map(|p| match &p.document {
        Document::Cluster(c) => Some(c.metadata.name.to_string()),
        _ => None,
    });
    let own = cluster.or_else(|| {
        ctx.parsed.iter().find_map(|p| match &p.document {
            Document::AgentConfig(a) => a.server_host().map(str::to_owned),
            _ => None,
        })
    });
    let Some(own) = own else { return };
    let found: Vec<usize> = ctx
        .parsed
        .iter()
        .enumerate()
        .filter(|(_, p)| p.document.kind() == Kind::SpiffeFederation && p.document.name() == own)
        .map(|(i, _)| i)
        .collect();
    for i in found {
        ctx.report(
            i,
            Problem::error(
                "/metadata/name",
                format!("`{own}` is this host's own trust domain: a federation is with another one"),
            )
            .hint(
                "name the document after the foreign trust domain, or remove it: a domain trusts its own CAs already",
            ),
        );
    }
}

fn trust_domain(ctx: &mut Ctx) {
    if ctx.parsed.iter().any(|p| p.document.kind() == Kind::Cluster) || ctx.maybe_unloaded(Kind::Cluster, None) {
        return;
    }
    let Some(i) = ctx.parsed.iter().position(|p| p.document.kind() == Kind::AgentConfig) else {
        if let Some(i) = ctx.parsed.iter().position(|p| p.document.kind() == Kind::Issuer) {
            ctx.report(
                i,
                Problem::error(
                    "",
                    "an issuer without an agent config needs a `cluster` document: it names the trust domain",
                )
                .hint("add `kind: cluster`, `version: v1`, `metadata: {name: <trust domain>}`"),
            );
        }
        return;
    };
    let Document::AgentConfig(agent) = &ctx.parsed[i].document else {
        return;
    };
    let pointer = if agent.proxy_server.is_some() {
        "/proxy_server"
    } else {
        "/auth_server"
    };
    if ctx.role() == HostRole::Agent {
        if agent.proxy_server.is_none() && agent.auth_server.is_none() {
            ctx.report(
                i,
                Problem::error(
                    "",
                    "this agent config sets neither `proxy_server` nor `auth_server`: there is no issuer to join",
                )
                .hint("set `proxy_server: <issuer host>:3025`, or add the cluster documents to run the issuer here"),
            );
        }
        return;
    }
    let problem = match agent.server_host() {
        None if agent.proxy_server.is_none() && agent.auth_server.is_none() => Some(
            Problem::error("", "no trust domain: the agent config sets neither `proxy_server` nor `auth_server`, and there is no `cluster` document")
                .hint("set `proxy_server: <host>:443`, or add a `cluster` document named after the trust domain"),
        ),
        None => None,
        Some(host) => TrustDomain::parse(host).err().map(|why| {
            Problem::error(pointer, format!("{why} (the trust domain is this host name)"))
                .hint("fix the host, or add a `cluster` document named after the trust domain")
        }),
    };
    if let Some(problem) = problem {
        ctx.report(i, problem);
    }
}
