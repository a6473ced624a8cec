//! The STS `GetCallerIdentity` call: signing it with SigV4 (the `aws-sigv4` crate) with the issuer's
//! challenge as a signed header, sending a signed request, and reading the reply in JSON or XML.

use std::time::SystemTime;

use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::client::identity::Identity;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::AwsError;
use super::credentials::Credentials;
use super::http::send;

/// The only body a join request may carry.
pub const BODY: &str = "Action=GetCallerIdentity&Version=2011-06-15";
/// The header that carries the issuer's challenge; it must be among the signed headers.
pub const CHALLENGE_HEADER: &str = "X-Teleport-Challenge";

/// An HTTP request exactly as the agent signed it; the issuer sends it on to STS unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedRequest {
    pub method: String,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl SignedRequest {
    /// The first value of a header, by case-insensitive name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// The STS endpoint of a region.
pub fn regional_endpoint(region: &str) -> String {
    if region.starts_with("cn-") {
        format!("https://sts.{region}.amazonaws.com.cn/")
    } else {
        format!("https://sts.{region}.amazonaws.com/")
    }
}

/// Signs a `GetCallerIdentity` POST for `region` carrying `challenge`.
pub fn sign_get_caller_identity(
    credentials: &Credentials,
    region: &str,
    challenge: &str,
) -> Result<SignedRequest, AwsError> {
    let url = regional_endpoint(region);
    let host = url.trim_start_matches("https://").trim_end_matches('/').to_owned();
    let mut headers = vec![
        ("Host".to_owned(), host),
        (
            "Content-Type".to_owned(),
            "application/x-www-form-urlencoded; charset=utf-8".to_owned(),
        ),
        ("Accept".to_owned(), "application/json".to_owned()),
        (CHALLENGE_HEADER.to_owned(), challenge.to_owned()),
    ];
    let identity: Identity = aws_credential_types::Credentials::new(
        &credentials.access_key_id,
        &credentials.secret_access_key,
        credentials.session_token.clone(),
        None,
        "tbot",
    )
    .into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name("sts")
        .time(SystemTime::now())
        .settings(SigningSettings::default())
        .build()
        .map_err(|e| AwsError::Sign(e.to_string()))?
        .into();
    let signable = SignableRequest::new(
        "POST",
        url.as_str(),
        headers.iter().map(|(n, v)| (n.as_str(), v.as_str())),
        SignableBody::Bytes(BODY.as_bytes()),
    )
    .map_err(|e| AwsError::Sign(e.to_string()))?;
    let (instructions, _signature) = sign(signable, &params)
        .map_err(|e| AwsError::Sign(e.to_string()))?
        .into_parts();
    for (name, value) in instructions.headers() {
        headers.push((name.to_owned(), value.to_owned()));
    }
    Ok(SignedRequest {
        method: "POST".into(),
        url,
        headers,
        body: BODY.into(),
    })
}

/// Who STS says signed the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallerIdentity {
    pub account: String,
    pub arn: String,
    pub user_id: String,
}

/// Sends a signed request to `endpoint` (the real STS endpoint for its host, or the operator's
/// override) with the request's own headers, and reads who signed it.
pub async fn get_caller_identity(request: &SignedRequest, endpoint: &str) -> Result<CallerIdentity, AwsError> {
    let reply = send(
        &request.method,
        endpoint,
        &request.headers,
        Bytes::from(request.body.clone()),
    )
    .await
    .map_err(AwsError::Unreachable)?;
    let body = String::from_utf8_lossy(&reply.body);
    match reply.status {
        200 => parse_identity(&reply.content_type, &body),
        400..=499 => Err(AwsError::Refused(describe_error(
            &reply.content_type,
            &body,
            reply.status,
        ))),
        status => Err(AwsError::Unreachable(format!(
            "STS at {endpoint} answered HTTP {status}: {}",
            describe_error(&reply.content_type, &body, status)
        ))),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct JsonReply {
    get_caller_identity_response: JsonResponse,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct JsonResponse {
    get_caller_identity_result: JsonResult,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct JsonResult {
    account: String,
    arn: String,
    user_id: String,
}

/// Reads a `GetCallerIdentity` reply, JSON or XML (STS answers XML when it ignores `Accept`).
pub fn parse_identity(content_type: &str, body: &str) -> Result<CallerIdentity, AwsError> {
    let malformed = |why: String| AwsError::Malformed(format!("STS reply: {why}"));
    if content_type.contains("json") || body.trim_start().starts_with('{') {
        let reply: JsonReply = serde_json::from_str(body).map_err(|e| malformed(e.to_string()))?;
        let r = reply.get_caller_identity_response.get_caller_identity_result;
        return Ok(CallerIdentity {
            account: r.account,
            arn: r.arn,
            user_id: r.user_id,
        });
    }
    let fields = xml_fields(body, &["Account", "Arn", "UserId"]).map_err(malformed)?;
    let take = |i: usize, name: &str| {
        fields[i]
            .clone()
            .ok_or_else(|| malformed(format!("no <{name}> in the reply")))
    };
    Ok(CallerIdentity {
        account: take(0, "Account")?,
        arn: take(1, "Arn")?,
        user_id: take(2, "UserId")?,
    })
}

/// The text of the first element of each name, anywhere in the document.
fn xml_fields(body: &str, names: &[&str]) -> Result<Vec<Option<String>>, String> {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_str(body);
    let mut out = vec![None; names.len()];
    let mut current: Option<usize> = None;
    loop {
        match reader.read_event().map_err(|e| e.to_string())? {
            Event::Start(e) => {
                current = names.iter().position(|n| n.as_bytes() == e.local_name().as_ref());
            }
            Event::Text(t) => {
                if let Some(i) = current
                    && out[i].is_none()
                {
                    let text = t.decode().map_err(|e| e.to_string())?;
                    let text = quick_xml::escape::unescape(&text).map_err(|e| e.to_string())?;
                    out[i] = Some(text.trim().to_owned());
                }
            }
            Event::End(_) => current = None,
            Event::Eof => break,
            _ => {}
        }
    }
    Ok(out)
}

/// `Code: Message` of an STS error reply, JSON or XML, else the status.
fn describe_error(content_type: &str, body: &str, status: u16) -> String {
    if content_type.contains("json") || body.trim_start().starts_with('{') {
        if let Ok(value) = serde_json::from_str::<serde_json::Value>(body) {
            let error = value.get("Error").unwrap_or(&value);
            let code = error.get("Code").and_then(|c| c.as_str()).unwrap_or("");
            let message = error.get("Message").and_then(|c| c.as_str()).unwrap_or("");
            if !code.is_empty() || !message.is_empty() {
                return format!("{code}: {message}");
            }
        }
    } else if let Ok(fields) = xml_fields(body, &["Code", "Message"])
        && let [Some(code), message] = fields.as_slice()
    {
        return format!("{code}: {}", message.as_deref().unwrap_or(""));
    }
    format!("HTTP {status}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xml_and_json_replies_read_the_same() {
        let xml = r#"<GetCallerIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <GetCallerIdentityResult>
    <Arn>arn:aws:sts::123456789012:assumed-role/r/i-0abc</Arn>
    <UserId>AROA:i-0abc</UserId>
    <Account>123456789012</Account>
  </GetCallerIdentityResult>
</GetCallerIdentityResponse>"#;
        let json = r#"{"GetCallerIdentityResponse":{"GetCallerIdentityResult":{"Account":"123456789012","Arn":"arn:aws:sts::123456789012:assumed-role/r/i-0abc","UserId":"AROA:i-0abc"},"ResponseMetadata":{"RequestId":"x"}}}"#;
        let a = parse_identity("text/xml", xml).unwrap();
        let b = parse_identity("application/json", json).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.account, "123456789012");
    }

    #[test]
    fn error_replies_name_the_code() {
        let xml = "<ErrorResponse><Error><Type>Sender</Type><Code>SignatureDoesNotMatch</Code><Message>bad</Message></Error></ErrorResponse>";
        assert_eq!(describe_error("text/xml", xml, 403), "SignatureDoesNotMatch: bad");
        let json = r#"{"Error":{"Code":"InvalidClientTokenId","Message":"no"}}"#;
        assert_eq!(
            describe_error("application/json", json, 403),
            "InvalidClientTokenId: no"
        );
    }

    #[test]
    fn the_challenge_is_a_signed_header() {
        let creds = Credentials {
            access_key_id: "AKIDEXAMPLE".into(),
            secret_access_key: "secret".into(),
            session_token: Some("session".into()),
            source: "test".into(),
        };
        let signed = sign_get_caller_identity(&creds, "eu-west-1", "Y2hhbGxlbmdl").unwrap();
        assert_eq!(signed.url, "https://sts.eu-west-1.amazonaws.com/");
        let auth = signed.header("authorization").unwrap();
        assert!(auth.starts_with("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/"), "{auth}");
        assert!(auth.contains("x-teleport-challenge"), "{auth}");
        assert_eq!(signed.header("x-amz-security-token"), Some("session"));
        assert_eq!(signed.body, BODY);
    }
}
