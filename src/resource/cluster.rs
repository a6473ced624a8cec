//! The optional `cluster` document (v1): the issuer's trust domain, CA and JWT settings.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::spiffe_id::TrustDomain;
use super::{Duration, Metadata, Problem, vocabulary};

vocabulary! {
    /// `kind: cluster`.
    ClusterKind { Cluster = "cluster" }
}

vocabulary! {
    /// The cluster schema version.
    ClusterVersion { V1 = "v1" }
}

vocabulary! {
    /// The CA's key algorithm.
    KeyAlgorithm {
        EcdsaP256 = "ecdsa-p256",
        Rsa2048 = "rsa-2048",
        Ed25519 = "ed25519",
    }
}

/// The issuer's settings. `metadata.name` is the trust domain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    pub kind: ClusterKind,
    pub version: ClusterVersion,
    /// `name` is the trust domain, such as `example.teleport.sh`.
    pub metadata: Metadata,
    #[serde(default)]
    pub spec: ClusterSpec,
}

/// CA, JWT and AWS settings.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ClusterSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<CaSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt: Option<JwtSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws: Option<AwsSpec>,
}

/// The certificate authority.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CaSpec {
    /// `ecdsa-p256` (default), `rsa-2048` or `ed25519`.
    #[serde(default = "default_key_algorithm")]
    pub key_algorithm: KeyAlgorithm,
    /// How long the CA certificate is valid (default `8760h`, one year).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validity: Option<Duration>,
}

fn default_key_algorithm() -> KeyAlgorithm {
    KeyAlgorithm::EcdsaP256
}

/// JWT-SVID settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JwtSpec {
    /// The `iss` claim, an `https://` URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
}

/// AWS settings for `iam` joins.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AwsSpec {
    /// Send every STS check to this endpoint instead of the real one (an STS stand-in, a VPC
    /// endpoint): an `http://` or `https://` URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sts_endpoint: Option<String>,
}

impl Cluster {
    pub fn trust_domain(&self) -> Result<TrustDomain, String> {
        TrustDomain::parse(&self.metadata.name)
    }

    pub fn problems(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        if let Err(message) = self.trust_domain() {
            out.push(Problem::error("/metadata/name", message).hint("the cluster's name is its trust domain"));
        }
        if let Some(issuer) = self.spec.jwt.as_ref().and_then(|j| j.issuer.as_deref())
            && !issuer.starts_with("https://")
        {
            out.push(Problem::error(
                "/spec/jwt/issuer",
                format!("`{issuer}` is not an `https://` URL"),
            ));
        }
        if let Some(endpoint) = self.spec.aws.as_ref().and_then(|a| a.sts_endpoint.as_deref())
            && !(endpoint.starts_with("https://") || endpoint.starts_with("http://"))
        {
            out.push(Problem::error(
                "/spec/aws/sts_endpoint",
                format!("`{endpoint}` is not an `http://` or `https://` URL"),
            ));
        }
        out
    }
}
