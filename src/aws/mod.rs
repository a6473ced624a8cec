//! AWS: credentials (environment, IMDSv2), SigV4 signing via `aws-sigv4`, and the STS
//! `GetCallerIdentity` call with its reply. No policy: the issuer decides what an identity may do.

pub mod credentials;
pub mod http;
pub mod sts;

pub use credentials::{Credentials, Imds, resolve_credentials, resolve_region};
pub use sts::{CallerIdentity, SignedRequest, get_caller_identity, sign_get_caller_identity};

/// What can go wrong talking to AWS.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AwsError {
    /// The instance metadata service failed or is not there (not on EC2, IMDSv2 disabled, hop limit).
    #[error("instance metadata: {0}")]
    Imds(String),
    /// The request could not be signed (bad credentials format).
    #[error("cannot sign the STS request: {0}")]
    Sign(String),
    /// STS could not be reached or failed on its side: worth retrying.
    #[error("STS unreachable: {0}")]
    Unreachable(String),
    /// STS refused the request (bad or expired signature, unknown key): retrying will not help.
    #[error("STS refused the signed request: {0}")]
    Refused(String),
    /// A reply tbot cannot read.
    #[error("{0}")]
    Malformed(String),
}

impl crate::error::Explain for AwsError {
    fn hint(&self) -> std::borrow::Cow<'_, str> {
        match self {
            AwsError::Imds(_) => "run on EC2 with IMDSv2 reachable (hop limit 2 in containers), or set AWS credentials",
            AwsError::Sign(_) => "check the AWS credentials in the environment",
            AwsError::Unreachable(_) => "tbot retries with backoff; check the network path to STS",
            AwsError::Refused(_) => "check the instance's IAM role and the clock",
            AwsError::Malformed(_) => "check that the STS endpoint is AWS's",
        }
        .into()
    }

    /// Network and server-side failures may pass; refusals will not.
    fn is_transient(&self) -> bool {
        matches!(self, AwsError::Imds(_) | AwsError::Unreachable(_))
    }
}

/// What an agent sends for an `iam` join: a `GetCallerIdentity` request signed over `challenge`
/// with credentials from the environment or IMDSv2, for the region from `AWS_REGION`, IMDS or the default.
pub async fn iam_join_proof(imds: &Imds, challenge: &str) -> Result<SignedRequest, AwsError> {
    let credentials = resolve_credentials(imds).await?;
    let region = resolve_region(imds).await;
    sign_get_caller_identity(&credentials, &region, challenge)
}
