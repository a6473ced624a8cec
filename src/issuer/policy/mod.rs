//! The issuer's view of the documents: the trust domain and cluster settings, and the bots, tokens,
//! roles and workload identities by name. Built from a validated `DesiredState`; swapped whole on reload.

pub mod decide;
mod index;
pub mod rbac;

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::issuer::IssuerError;
use crate::issuer::keys::ca::{CaSettings, DEFAULT_VALIDITY};
use crate::issuer::keys::jwt::JwtSettings;
use crate::issuer::keys::rotation::Rotation;
use crate::resource::cluster::RotationSpec;

/// The rotation thresholds a document sets, with the defaults filled in.
fn rotation_of(spec: Option<&RotationSpec>, validity: std::time::Duration) -> Rotation {
    let (prepare_before, activate_before) = RotationSpec::thresholds(spec, validity);
    Rotation {
        prepare_before,
        activate_before,
    }
}
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
    pub jwt: JwtSettings,
    /// The foreign trust domains to federate with, by name.
    pub federations: BTreeMap<String, crate::resource::federation::FederationSpec>,
    /// The `iss` claim of JWT-SVIDs, when `cluster.spec.jwt.issuer` is set.
    pub jwt_issuer: Option<String>,
    /// Where STS checks go instead of the real endpoint (`cluster.spec.aws.sts_endpoint`).
    pub sts_endpoint: Option<String>,
    /// Whether RSA public keys are certified (`cluster.spec.ca.accept_rsa_keys`).
    pub accept_rsa_keys: bool,
    /// The issuance log's history and size cap in bytes (`cluster.spec.issuance_log`).
    pub issuance_log: (std::time::Duration, usize),
    pub bots: BTreeMap<String, Bot>,
    pub tokens: BTreeMap<String, Token>,
    pub roles: BTreeMap<String, Role>,
    /// Shared with the loaded state, not copied: a reload of 10,000 identities copies none.
    pub identities: BTreeMap<String, Identity>,
    /// The same identities by the values their rules require (built with them; nothing changes
    /// either after [`Policy::from_state`]).
    pub by_rules: index::RuleIndex,
    /// The `revocation` documents, by name.
    pub revocations: BTreeMap<String, crate::resource::revocation::Revocation>,
}

/// A `workload_identity` document of the loaded state.
#[derive(Debug, Clone)]
pub struct Identity(Arc<Object>);

impl Identity {
    /// The `workload.*` attributes its rules and templates read (worked out when it was loaded).
    pub fn reads(&self) -> &[String] {
        &self.0.reads
    }

    /// Its JWT claim templates, parsed when it was loaded, sorted by their text.
    pub fn claim_templates(&self) -> &[(String, crate::resource::template::Template)] {
        &self.0.claim_templates
    }
}

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
            jwt: JwtSettings::default(),
            federations: BTreeMap::new(),
            jwt_issuer: None,
            sts_endpoint: None,
            accept_rsa_keys: false,
            issuance_log: crate::resource::cluster::IssuanceLogSpec::limits(None),
            bots: BTreeMap::new(),
            tokens: BTreeMap::new(),
            roles: BTreeMap::new(),
            identities: BTreeMap::new(),
            by_rules: index::RuleIndex::default(),
            revocations: BTreeMap::new(),
        };
        for object in state.objects.values() {
            match &object.document {
                Document::Cluster(cluster) => {
                    trust_domain = cluster.trust_domain().ok();
                    if let Some(ca) = &cluster.spec.ca {
                        let validity = ca.validity.map_or(DEFAULT_VALIDITY, |v| v.as_std());
                        policy.ca = CaSettings {
                            algorithm: ca.key_algorithm,
                            validity,
                            rotation: rotation_of(ca.rotation.as_ref(), validity),
                        };
                    }
                    if let Some(jwt) = &cluster.spec.jwt {
                        let validity = jwt.validity.map_or(DEFAULT_VALIDITY, |v| v.as_std());
                        policy.jwt = JwtSettings {
                            validity,
                            rotation: rotation_of(jwt.rotation.as_ref(), validity),
                        };
                    }
                    policy.jwt_issuer = cluster.spec.jwt.as_ref().and_then(|j| j.issuer.clone());
                    policy.sts_endpoint = cluster.spec.aws.as_ref().and_then(|a| a.sts_endpoint.clone());
                    policy.accept_rsa_keys = cluster.spec.ca.as_ref().is_some_and(|ca| ca.accept_rsa_keys);
                    policy.issuance_log =
                        crate::resource::cluster::IssuanceLogSpec::limits(cluster.spec.issuance_log.as_ref());
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
                Document::SpiffeFederation(f) => {
                    policy.federations.insert(f.metadata.name.to_string(), f.spec.clone());
                }
                Document::Revocation(r) => {
                    policy.revocations.insert(r.metadata.name.to_string(), r.clone());
                }
                // Taken below, in one go.
                Document::WorkloadIdentity(_) => {}
            }
        }
        // In name order already: built in one go rather than by 10,000 inserts.
        policy.identities = state
            .of_kind(crate::resource::Kind::WorkloadIdentity)
            .map(|(r, object)| (r.name.clone(), Identity(object.clone())))
            .collect();
        policy.by_rules = index::RuleIndex::of(policy.identities.values());
        policy.trust_domain = trust_domain.or(from_agent).ok_or_else(|| {
            IssuerError::Invalid(
                "no trust domain: add a `cluster` document, or set `proxy_server` in the agent config".into(),
            )
        })?;
        Ok(policy)
    }
}
