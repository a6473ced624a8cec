//! The issuer's view of the documents: the trust domain and cluster settings, and the bots, tokens,
//! roles and workload identities by name. Built from a validated `DesiredState`; swapped whole on reload.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::IssuerError;
use super::ca::{CaSettings, DEFAULT_VALIDITY};
use crate::manifest::{DesiredState, Object};
use crate::resource::Document;
use crate::resource::bot::Bot;
use crate::resource::role::Role;
use crate::resource::spiffe_id::TrustDomain;
use crate::resource::token::Token;
use crate::resource::workload_identity::WorkloadIdentity;

/// What the issuer enforces.
#[derive(Debug, Clone)]
pub struct Policy {
    pub trust_domain: TrustDomain,
    pub ca: CaSettings,
    /// The `iss` claim of JWT-SVIDs, when `cluster.spec.jwt.issuer` is set.
    pub jwt_issuer: Option<String>,
    /// Where STS checks go instead of the real endpoint (`cluster.spec.aws.sts_endpoint`).
    pub sts_endpoint: Option<String>,
    pub bots: BTreeMap<String, Bot>,
    pub tokens: BTreeMap<String, Token>,
    pub roles: BTreeMap<String, Role>,
    /// Shared with the loaded state, not copied: a reload of 10,000 identities copies none.
    pub identities: BTreeMap<String, Identity>,
}

/// A `workload_identity` document of the loaded state.
#[derive(Debug, Clone)]
pub struct Identity(Arc<Object>);

impl std::ops::Deref for Identity {
    type Target = WorkloadIdentity;

    fn deref(&self) -> &WorkloadIdentity {
        match &self.0.document {
            Document::WorkloadIdentity(identity) => identity,
            _ => unreachable!("only workload identities are wrapped"),
        }
    }
}

impl Policy {
    /// The policy of a loaded directory. Fails only when no trust domain can be found, which the
    /// loader already reports as a document error.
    pub fn from_state(state: &DesiredState) -> Result<Policy, IssuerError> {
        let mut trust_domain = None;
        let mut from_agent = None;
        let mut policy = Policy {
            trust_domain: TrustDomain::parse("placeholder").expect("a valid trust domain"),
            ca: CaSettings::default(),
            jwt_issuer: None,
            sts_endpoint: None,
            bots: BTreeMap::new(),
            tokens: BTreeMap::new(),
            roles: BTreeMap::new(),
            identities: BTreeMap::new(),
        };
        for object in state.objects.values() {
            match &object.document {
                Document::Cluster(cluster) => {
                    trust_domain = cluster.trust_domain().ok();
                    if let Some(ca) = &cluster.spec.ca {
                        policy.ca = CaSettings {
                            algorithm: ca.key_algorithm,
                            validity: ca.validity.map_or(DEFAULT_VALIDITY, |v| v.as_std()),
                        };
                    }
                    policy.jwt_issuer = cluster.spec.jwt.as_ref().and_then(|j| j.issuer.clone());
                    policy.sts_endpoint = cluster.spec.aws.as_ref().and_then(|a| a.sts_endpoint.clone());
                }
                Document::AgentConfig(agent) => {
                    from_agent = agent.server_host().and_then(|h| TrustDomain::parse(h).ok());
                }
                Document::Bot(bot) => {
                    policy.bots.insert(bot.metadata.name.to_string(), bot.clone());
                }
                Document::Token(token) => {
                    policy.tokens.insert(token.metadata.name.to_string(), token.clone());
                }
                Document::Role(role) => {
                    policy.roles.insert(role.metadata.name.to_string(), role.clone());
                }
                Document::Issuer(_) => {}
                Document::WorkloadIdentity(identity) => {
                    policy
                        .identities
                        .insert(identity.metadata.name.to_string(), Identity(object.clone()));
                }
            }
        }
        policy.trust_domain = trust_domain.or(from_agent).ok_or_else(|| {
            IssuerError::Invalid(
                "no trust domain: add a `cluster` document, or set `proxy_server` in the agent config".into(),
            )
        })?;
        Ok(policy)
    }
}

/// A policy from YAML documents, for tests.
#[cfg(test)]
pub(crate) fn policy_from_yaml(text: &str) -> Policy {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("docs.yaml");
    std::fs::write(&file, text).unwrap();
    let loaded = crate::manifest::load(&[crate::manifest::Input::File(file)]).unwrap();
    assert!(!loaded.has_errors(), "{:#?}", loaded.diagnostics);
    Policy::from_state(&loaded.state).unwrap()
}
