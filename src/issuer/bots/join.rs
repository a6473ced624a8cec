//! Join verification. `token`: the token exists, is a `token` token, has not expired and was not used.
//! `iam`: the signed `GetCallerIdentity` request goes to an allowlisted STS host with the exact body and
//! our challenge as a signed header; STS says who signed it; a rule of the token's `allow` matches.
//! Every refusal names the check that failed (and never the token's name, which may be a secret).

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::aws::sts::{BODY, CHALLENGE_HEADER};
use crate::aws::{CallerIdentity, SignedRequest};
use crate::resource::agent::JoinMethod;
use crate::resource::token::Token;

/// Why a join's terms are refused: each names the check that failed (and, for the token's own
/// terms, what to change).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoinRefusal {
    #[error("the token is for `{token}` joins, and this join used `{used}`; set `onboarding.join_method: {token}`")]
    WrongMethod { token: JoinMethod, used: JoinMethod },
    #[error("the token expired at {0}; create a new token or move `metadata.expires` later")]
    Expired(String),
    #[error("the signed request's URL `{0}` cannot be read")]
    Url(String),
    #[error("host not on the allowlist: `{0}` is not an AWS STS endpoint (sts[-fips].<region>.amazonaws.com)")]
    NotSts(String),
    #[error("host not on the allowlist: the Host header `{0}` differs from the URL's host")]
    HostHeader(String),
    #[error("the signed request is a `{0}`, not a POST")]
    Method(String),
    #[error("the signed request's path is not `/`")]
    Path,
    #[error("the signed request's body is not exactly `{BODY}`")]
    Body,
    #[error("challenge: the request carries no SigV4 Authorization header")]
    Unsigned,
    #[error("challenge: the `{CHALLENGE_HEADER}` header is not among the signed headers")]
    ChallengeUnsigned,
    #[error("challenge: the `{CHALLENGE_HEADER}` header does not equal the challenge this issuer sent")]
    ChallengeMismatch,
    #[error("challenge: the request has no `{CHALLENGE_HEADER}` header")]
    ChallengeMissing,
    #[error("the token has no `allow` rules, so no AWS identity may join with it")]
    NoAllowRules,
    #[error("account: `{0}` is not an `aws_account` of the token's `allow` rules")]
    Account(String),
    #[error("ARN: `{arn}` matches no `aws_arn` of the token's rules for account {account}")]
    Arn { arn: String, account: String },
}

/// Checks a token's own terms for a join by `method`: right method, not expired.
pub fn check_token_terms(token: &Token, method: JoinMethod, now: OffsetDateTime) -> Result<(), JoinRefusal> {
    if token.spec.join_method != method {
        return Err(JoinRefusal::WrongMethod {
            token: token.spec.join_method,
            used: method,
        });
    }
    if let Some(expires) = &token.metadata.expires
        && expires.0 <= now
    {
        return Err(JoinRefusal::Expired(expires.0.format(&Rfc3339).unwrap_or_default()));
    }
    Ok(())
}

/// Whether `host` is an AWS STS endpoint: global, regional, FIPS, China or GovCloud.
pub fn is_sts_host(host: &str) -> bool {
    if host == "sts.amazonaws.com" {
        return true;
    }
    let region = host
        .strip_suffix(".amazonaws.com")
        .and_then(|h| h.strip_prefix("sts.").or_else(|| h.strip_prefix("sts-fips.")))
        .or_else(|| {
            host.strip_suffix(".amazonaws.com.cn")
                .and_then(|h| h.strip_prefix("sts."))
                .filter(|r| r.starts_with("cn-"))
        });
    region.is_some_and(is_region)
}

/// `us-east-1`, `us-gov-west-1`, `cn-north-1`, `ap-southeast-5`: letters, dashes, a final number.
fn is_region(region: &str) -> bool {
    let parts: Vec<&str> = region.split('-').collect();
    parts.len() >= 3
        && parts[..parts.len() - 1]
            .iter()
            .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_lowercase()))
        && parts[parts.len() - 1].parse::<u8>().is_ok()
}

/// The checks made on a signed request before anything is sent: returns the STS URL for its host.
pub fn check_signed_request(request: &SignedRequest, challenge: &str) -> Result<String, JoinRefusal> {
    let uri: http::Uri = request.url.parse().map_err(|_| JoinRefusal::Url(request.url.clone()))?;
    let host = uri.host().unwrap_or("");
    if uri.scheme_str() != Some("https") || uri.port().is_some() || !is_sts_host(host) {
        let authority = uri.authority().map(|a| a.as_str()).unwrap_or("");
        return Err(JoinRefusal::NotSts(authority.to_owned()));
    }
    if let Some(header_host) = request.header("host")
        && !header_host.eq_ignore_ascii_case(host)
    {
        return Err(JoinRefusal::HostHeader(header_host.to_owned()));
    }
    if request.method != "POST" {
        return Err(JoinRefusal::Method(request.method.clone()));
    }
    if uri.path() != "/" || uri.query().is_some() {
        return Err(JoinRefusal::Path);
    }
    if request.body != BODY {
        return Err(JoinRefusal::Body);
    }
    let authorization = request.header("authorization").ok_or(JoinRefusal::Unsigned)?;
    let signed_headers = authorization
        .split(',')
        .find_map(|part| part.trim().strip_prefix("SignedHeaders="))
        .unwrap_or("");
    let challenge_name = CHALLENGE_HEADER.to_ascii_lowercase();
    if !signed_headers.split(';').any(|h| h == challenge_name) {
        return Err(JoinRefusal::ChallengeUnsigned);
    }
    match request.header(CHALLENGE_HEADER) {
        Some(value) if value == challenge => Ok(format!("https://{host}/")),
        Some(_) => Err(JoinRefusal::ChallengeMismatch),
        None => Err(JoinRefusal::ChallengeMissing),
    }
}

/// Matches STS's answer against the token's `allow` rules: any rule, account exact, ARN glob.
pub fn check_allow(token: &Token, identity: &CallerIdentity) -> Result<(), JoinRefusal> {
    let rules = &token.spec.allow;
    if rules.is_empty() {
        return Err(JoinRefusal::NoAllowRules);
    }
    let account_rules: Vec<_> = rules.iter().filter(|r| r.aws_account == identity.account).collect();
    if account_rules.is_empty() {
        return Err(JoinRefusal::Account(identity.account.clone()));
    }
    if account_rules.iter().any(|r| {
        r.aws_arn
            .as_deref()
            .is_none_or(|pattern| glob_match(pattern, &identity.arn))
    }) {
        return Ok(());
    }
    Err(JoinRefusal::Arn {
        arn: identity.arn.clone(),
        account: identity.account.clone(),
    })
}

/// An anchored glob: `*` any run of characters, `?` exactly one.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

impl crate::error::Explain for JoinRefusal {
    fn hint(&self) -> std::borrow::Cow<'_, str> {
        "fix the token document or the agent's `onboarding`, then save".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_are_anchored_and_know_star_and_question_mark() {
        let arn = "arn:aws:sts::123456789012:assumed-role/teleport-bot-role/i-0abc123";
        assert!(glob_match(
            "arn:aws:sts::123456789012:assumed-role/teleport-bot-role/i-*",
            arn
        ));
        assert!(glob_match("*", arn));
        assert!(glob_match("arn:aws:sts::12345678901?:*", arn));
        assert!(
            !glob_match("assumed-role/teleport-bot-role/i-*", arn),
            "not anchored at the start"
        );
        assert!(!glob_match(
            "arn:aws:sts::123456789012:assumed-role/teleport-bot-role/i-0",
            arn
        ));
        assert!(!glob_match("arn:aws:sts::123456789012:assumed-role/other-role/*", arn));
        assert!(glob_match("a*b*c", "aXXbYYc"));
        assert!(!glob_match("a?c", "ac"));
    }

    #[test]
    fn only_aws_sts_hosts_are_on_the_allowlist() {
        for good in [
            "sts.amazonaws.com",
            "sts.us-east-1.amazonaws.com",
            "sts.eu-west-3.amazonaws.com",
            "sts-fips.us-east-2.amazonaws.com",
            "sts.us-gov-west-1.amazonaws.com",
            "sts.cn-north-1.amazonaws.com.cn",
        ] {
            assert!(is_sts_host(good), "{good}");
        }
        for bad in [
            "sts.amazonaws.com.evil.example",
            "evil.example",
            "sts.us-east-1.amazonaws.com.evil",
            "sts..amazonaws.com",
            "s3.us-east-1.amazonaws.com",
            "sts.us-east.amazonaws.com",
            "127.0.0.1",
        ] {
            assert!(!is_sts_host(bad), "{bad}");
        }
    }
}
