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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuance_log: Option<IssuanceLogSpec>,
}

/// How much of the issuance log (every SVID and bot certificate signed: `tbotctl get svids`) the
/// issuer keeps in its store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IssuanceLogSpec {
    /// How long a record is kept after what it records expired (default `24h`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history: Option<Duration>,
    /// The most the log takes in the store, in MiB (default 64, at most 4096); over it, the oldest
    /// records go first, with a WARN.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_mib: Option<u32>,
}

/// The issuance log's limits when `cluster.spec.issuance_log` does not say.
pub const DEFAULT_LOG_HISTORY: std::time::Duration = std::time::Duration::from_secs(24 * 3600);
pub const DEFAULT_LOG_MIB: u32 = 64;
const MAX_LOG_MIB: u32 = 4096;

impl IssuanceLogSpec {
    /// The history and the size cap in bytes, with the defaults.
    pub fn limits(spec: Option<&IssuanceLogSpec>) -> (std::time::Duration, usize) {
        let history = spec.and_then(|s| s.history).map_or(DEFAULT_LOG_HISTORY, |h| h.as_std());
        let mib = spec.and_then(|s| s.max_mib).unwrap_or(DEFAULT_LOG_MIB);
        (history, (mib as usize) << 20)
    }
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
    /// When the CA's successor is prepared and activated, as times before the active CA's end
    /// (defaults: ½ and ⅙ of `validity`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<RotationSpec>,
    /// Whether the CA certifies RSA public keys (2048 to 8192 bits) that agents send for bot
    /// certificates and SVIDs. Default `false`: only ECDSA P-256 and Ed25519 keys, which is what
    /// tbot's agents make.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub accept_rsa_keys: bool,
}

/// A key's automatic rotation: its successor is *prepared* (published in every bundle, signing
/// nothing) `prepare_before` the active key's end, and *activated* (signs from then on; the old key
/// stays published until what it signed has expired) `activate_before` its end.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RotationSpec {
    /// Default: half of the key's validity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prepare_before: Option<Duration>,
    /// Default: a sixth of the key's validity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activate_before: Option<Duration>,
}

impl RotationSpec {
    /// The two thresholds for a key valid `validity`, with the defaults filled in.
    pub fn thresholds(
        spec: Option<&RotationSpec>,
        validity: std::time::Duration,
    ) -> (std::time::Duration, std::time::Duration) {
        let spec = spec.cloned().unwrap_or_default();
        (
            spec.prepare_before.map_or(validity / 2, |d| d.as_std()),
            spec.activate_before.map_or(validity / 6, |d| d.as_std()),
        )
    }

    /// What is wrong with these thresholds for a key valid `validity`, at `path`.
    fn problems(spec: Option<&RotationSpec>, validity: std::time::Duration, path: &str, out: &mut Vec<Problem>) {
        let (prepare, activate) = RotationSpec::thresholds(spec, validity);
        let show = |d: std::time::Duration| Duration::from_secs(d.as_secs()).to_string();
        if prepare >= validity {
            out.push(
                Problem::error(
                    format!("{path}/rotation/prepare_before"),
                    format!(
                        "`prepare_before` ({}) is not shorter than the key's validity ({})",
                        show(prepare),
                        show(validity)
                    ),
                )
                .hint(
                    "the successor is prepared that long before the active key ends; make it shorter than `validity`",
                ),
            );
        } else if activate >= prepare {
            out.push(
                Problem::error(
                    format!("{path}/rotation/activate_before"),
                    format!(
                        "`activate_before` ({}) is not shorter than `prepare_before` ({})",
                        show(activate),
                        show(prepare)
                    ),
                )
                .hint("a successor is activated after it was prepared: make `activate_before` shorter than `prepare_before`"),
            );
        }
    }
}

/// A CA's or JWT key's validity when the document does not say: one year.
pub const DEFAULT_KEY_VALIDITY: std::time::Duration = std::time::Duration::from_secs(8760 * 3600);

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
    /// How long a JWT signing key signs before its successor takes over (default `8760h`); no
    /// JWT-SVID outlives its key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validity: Option<Duration>,
    /// The signing key's automatic rotation (defaults: ½ and ⅙ of `validity`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<RotationSpec>,
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
        if let Some(ca) = &self.spec.ca {
            let validity = ca.validity.map_or(DEFAULT_KEY_VALIDITY, |v| v.as_std());
            RotationSpec::problems(ca.rotation.as_ref(), validity, "/spec/ca", &mut out);
        }
        if let Some(jwt) = &self.spec.jwt {
            let validity = jwt.validity.map_or(DEFAULT_KEY_VALIDITY, |v| v.as_std());
            RotationSpec::problems(jwt.rotation.as_ref(), validity, "/spec/jwt", &mut out);
        }
        if let Some(mib) = self.spec.issuance_log.as_ref().and_then(|l| l.max_mib)
            && !(1..=MAX_LOG_MIB).contains(&mib)
        {
            out.push(
                Problem::error(
                    "/spec/issuance_log/max_mib",
                    format!("{mib} MiB is outside 1 to {MAX_LOG_MIB}"),
                )
                .hint("the log lives in the issuer's store (etcd's default quota is 2 GiB for everything)"),
            );
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
