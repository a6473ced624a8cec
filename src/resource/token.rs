//! The `token` document (v2): how a bot may join, by secret token or by AWS IAM identity.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::agent::JoinMethod;
use super::{Metadata, Name, Problem, vocabulary};

vocabulary! {
    /// `kind: token`.
    TokenKind { Token = "token" }
}

vocabulary! {
    /// The token schema version.
    TokenVersion { V2 = "v2" }
}

vocabulary! {
    /// What a token lets its holder join as.
    TokenRole {
        /// A Machine & Workload Identity bot.
        Bot = "Bot",
    }
}

/// A join token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Token {
    pub kind: TokenKind,
    pub version: TokenVersion,
    /// For `token` joins the name is the secret; `expires` ends the token.
    pub metadata: Metadata,
    pub spec: TokenSpec,
}

/// The terms of a join.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenSpec {
    /// `[Bot]`.
    pub roles: Vec<TokenRole>,
    /// The bot that joins with this token.
    pub bot_name: Name,
    /// `token` (single use) or `iam` (reusable, checked against `allow`).
    pub join_method: JoinMethod,
    /// For `iam`: the AWS identities that may join; any rule may match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<AwsRule>,
}

/// One AWS identity allowed to join.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AwsRule {
    /// The 12-digit AWS account ID, quoted (`"111111111111"`).
    pub aws_account: String,
    /// The caller's ARN; `*` and `?` are wildcards and the whole ARN must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws_arn: Option<String>,
}

impl Token {
    pub fn problems(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        if !self.spec.roles.contains(&TokenRole::Bot) {
            out.push(Problem::error("/spec/roles", "`roles` must be `[Bot]`").hint("tbot tokens join bots"));
        }
        match self.spec.join_method {
            JoinMethod::Token if !self.spec.allow.is_empty() => out.push(
                Problem::error("/spec/allow", "`allow` is only for `join_method: iam`")
                    .hint("remove `allow`, or set `join_method: iam`"),
            ),
            JoinMethod::Iam if self.spec.allow.is_empty() => out.push(
                Problem::error("/spec/join_method", "an `iam` token needs at least one `allow` rule")
                    .hint("add `allow: [{aws_account: \"111111111111\", aws_arn: \"arn:aws:sts::111111111111:assumed-role/my-role/*\"}]`"),
            ),
            _ => {}
        }
        for (i, rule) in self.spec.allow.iter().enumerate() {
            if rule.aws_account.len() != 12 || !rule.aws_account.bytes().all(|b| b.is_ascii_digit()) {
                out.push(
                    Problem::error(
                        format!("/spec/allow/{i}/aws_account"),
                        format!("`{}` is not a 12-digit AWS account ID", rule.aws_account),
                    )
                    .hint("copy the account ID from `aws sts get-caller-identity`, quoted, such as \"111111111111\""),
                );
            }
            if let Some(arn) = &rule.aws_arn
                && let Err(message) = check_arn_glob(arn)
            {
                out.push(
                    Problem::error(format!("/spec/allow/{i}/aws_arn"), message)
                        .hint("use the ARN `aws sts get-caller-identity` prints; `*` and `?` are wildcards"),
                );
            }
        }
        out
    }
}

/// Checks that an ARN pattern has the shape `arn:partition:service:region:account:resource`, where
/// `*` and `?` may stand for characters.
pub fn check_arn_glob(arn: &str) -> Result<(), String> {
    if let Some(c) = arn.chars().find(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("the ARN pattern `{arn}` contains {c:?}"));
    }
    let parts: Vec<&str> = arn.splitn(6, ':').collect();
    if parts.len() < 6 || parts[0] != "arn" {
        return Err(format!(
            "`{arn}` is not an ARN pattern; ARNs look like `arn:aws:sts::111111111111:assumed-role/my-role/*`"
        ));
    }
    if parts[1].is_empty() || parts[2].is_empty() || parts[5].is_empty() {
        return Err(format!("`{arn}` has an empty partition, service or resource"));
    }
    Ok(())
}
