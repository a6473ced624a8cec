//! AWS credentials and region: from the environment, else from the EC2 instance metadata service
//! (IMDSv2: a session token by `PUT`, then the instance role's credentials).

use std::fmt;

use bytes::Bytes;
use serde::Deserialize;

use super::AwsError;
use super::http::send;

/// The IMDS endpoint unless `AWS_EC2_METADATA_SERVICE_ENDPOINT` says otherwise.
pub const IMDS_ENDPOINT: &str = "http://169.254.169.254";
/// The region when neither `AWS_REGION` nor IMDS names one.
pub const DEFAULT_REGION: &str = "us-east-1";

/// A set of AWS credentials. `Debug` never shows the secret parts.
#[derive(Clone)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
    /// Where they came from: `environment` or `imds (role NAME)`.
    pub source: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// `AWS_ACCESS_KEY_ID` + `AWS_SECRET_ACCESS_KEY` (+ `AWS_SESSION_TOKEN`), when both are set.
    pub fn from_env() -> Option<Credentials> {
        let var = |name| std::env::var(name).ok().filter(|v: &String| !v.is_empty());
        Some(Credentials {
            access_key_id: var("AWS_ACCESS_KEY_ID")?,
            secret_access_key: var("AWS_SECRET_ACCESS_KEY")?,
            session_token: var("AWS_SESSION_TOKEN"),
            source: "environment".into(),
        })
    }
}

/// A client of the instance metadata service, IMDSv2 only.
#[derive(Debug, Clone)]
pub struct Imds {
    endpoint: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RoleCredentials {
    access_key_id: String,
    secret_access_key: String,
    token: Option<String>,
}

impl Imds {
    /// The endpoint from `AWS_EC2_METADATA_SERVICE_ENDPOINT`, else the link-local default.
    pub fn from_env() -> Imds {
        let endpoint = std::env::var("AWS_EC2_METADATA_SERVICE_ENDPOINT")
            .ok()
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| IMDS_ENDPOINT.to_owned());
        Imds::new(endpoint)
    }

    pub fn new(endpoint: impl Into<String>) -> Imds {
        Imds {
            endpoint: endpoint.into().trim_end_matches('/').to_owned(),
        }
    }

    async fn token(&self) -> Result<String, AwsError> {
        let url = format!("{}/latest/api/token", self.endpoint);
        let headers = [("X-aws-ec2-metadata-token-ttl-seconds".to_owned(), "300".to_owned())];
        let reply = send("PUT", &url, &headers, Bytes::new())
            .await
            .map_err(AwsError::Imds)?;
        if reply.status != 200 {
            return Err(AwsError::Imds(format!(
                "IMDS refused a session token (HTTP {}); is IMDSv2 enabled on this instance?",
                reply.status
            )));
        }
        String::from_utf8(reply.body.to_vec()).map_err(|_| AwsError::Imds("IMDS sent a token that is not text".into()))
    }

    async fn get(&self, token: &str, path: &str) -> Result<String, AwsError> {
        let url = format!("{}{path}", self.endpoint);
        let headers = [("X-aws-ec2-metadata-token".to_owned(), token.to_owned())];
        let reply = send("GET", &url, &headers, Bytes::new())
            .await
            .map_err(AwsError::Imds)?;
        if reply.status != 200 {
            return Err(AwsError::Imds(format!(
                "IMDS answered HTTP {} for {path}",
                reply.status
            )));
        }
        String::from_utf8(reply.body.to_vec()).map_err(|_| AwsError::Imds(format!("IMDS sent non-text for {path}")))
    }

    /// The instance role's credentials.
    pub async fn credentials(&self) -> Result<Credentials, AwsError> {
        let token = self.token().await?;
        let base = "/latest/meta-data/iam/security-credentials/";
        let roles = self.get(&token, base).await?;
        let role = roles
            .lines()
            .next()
            .map(str::trim)
            .filter(|r| !r.is_empty())
            .ok_or_else(|| {
                AwsError::Imds("this instance has no IAM role; attach an instance profile with a role".into())
            })?;
        let body = self.get(&token, &format!("{base}{role}")).await?;
        let creds: RoleCredentials = serde_json::from_str(&body)
            .map_err(|e| AwsError::Imds(format!("IMDS sent credentials tbot cannot read: {e}")))?;
        Ok(Credentials {
            access_key_id: creds.access_key_id,
            secret_access_key: creds.secret_access_key,
            session_token: creds.token,
            source: format!("imds (role {role})"),
        })
    }

    /// The instance's region.
    pub async fn region(&self) -> Result<String, AwsError> {
        let token = self.token().await?;
        Ok(self
            .get(&token, "/latest/meta-data/placement/region")
            .await?
            .trim()
            .to_owned())
    }
}

/// Credentials from the environment, else from IMDS.
pub async fn resolve_credentials(imds: &Imds) -> Result<Credentials, AwsError> {
    match Credentials::from_env() {
        Some(creds) => Ok(creds),
        None => imds.credentials().await,
    }
}

/// The region from `AWS_REGION`, else IMDS, else `us-east-1`.
pub async fn resolve_region(imds: &Imds) -> String {
    if let Some(region) = std::env::var("AWS_REGION").ok().filter(|r| !r.is_empty()) {
        return region;
    }
    imds.region()
        .await
        .ok()
        .filter(|r| !r.is_empty())
        .unwrap_or_else(|| DEFAULT_REGION.to_owned())
}
