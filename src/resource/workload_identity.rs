//! The `workload_identity` document (v1): which SPIFFE ID a workload gets, and which workloads may get it.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::spiffe_id;
use super::template::{Part, Template};
use super::{Duration, Metadata, Problem, vocabulary};

vocabulary! {
    /// `kind: workload_identity`.
    WorkloadIdentityKind { WorkloadIdentity = "workload_identity" }
}

vocabulary! {
    /// The workload_identity schema version.
    WorkloadIdentityVersion { V1 = "v1" }
}

/// JWT claims that tbot sets itself and `extra_claims` may not override.
pub const RESERVED_CLAIMS: [&str; 7] = ["sub", "aud", "exp", "iat", "iss", "jti", "nbf"];

/// A workload identity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkloadIdentity {
    pub kind: WorkloadIdentityKind,
    pub version: WorkloadIdentityVersion,
    pub metadata: Metadata,
    pub spec: WorkloadIdentitySpec,
}

/// The identity's rules and SPIFFE settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkloadIdentitySpec {
    /// Which workloads may receive this identity; with no rules, every workload the bot serves may.
    #[serde(default)]
    pub rules: Rules,
    pub spiffe: Spiffe,
}

/// Allow rules: any one rule whose conditions all hold lets a workload have the identity.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Rules {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<AllowRule>,
}

/// A set of conditions that must all hold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AllowRule {
    pub conditions: Vec<Condition>,
}

/// A test on one attribute; set exactly one of `eq`, `not_eq`, `in`, `not_in`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Condition {
    /// The attribute tested, such as `workload.unix.uid`.
    pub attribute: super::template::Attribute,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eq: Option<ValueTest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_eq: Option<ValueTest>,
    #[serde(default, rename = "in", skip_serializing_if = "Option::is_none")]
    pub is_in: Option<ValuesTest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_in: Option<ValuesTest>,
}

/// One value to compare with, as a string (`value: "1000"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ValueTest {
    pub value: String,
}

/// Values to compare with, as strings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ValuesTest {
    pub values: Vec<String>,
}

/// SPIFFE settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Spiffe {
    /// The SPIFFE ID's path, a template starting with `/` (`/svc/{{workload.systemd.service}}`); the
    /// trust domain is added.
    pub id: Template,
    /// A hint for workloads that receive several SVIDs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<Template>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x509: Option<X509>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt: Option<Jwt>,
}

/// X509-SVID settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct X509 {
    /// DNS subject alternative names, as templates.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_sans: Vec<Template>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject_template: Option<SubjectTemplate>,
    /// The longest lifetime an X509-SVID of this identity may have.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maximum_ttl: Option<Duration>,
}

/// The certificate subject, as templates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SubjectTemplate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub common_name: Option<Template>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub organization: Option<Template>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub organizational_unit: Option<Template>,
}

/// JWT-SVID settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Jwt {
    /// Claims added to every JWT-SVID; string leaves are templates.
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub extra_claims: serde_json::Map<String, serde_json::Value>,
    /// The longest lifetime a JWT-SVID of this identity may have.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maximum_ttl: Option<Duration>,
}

impl WorkloadIdentity {
    /// The `workload.*` attributes its rules and templates read, sorted: what a caller must have
    /// for it (and so what an agent's cache and an output's check look at).
    pub fn workload_attributes_read(&self) -> Vec<String> {
        let spiffe = &self.spec.spiffe;
        let mut templates: Vec<&Template> = vec![&spiffe.id];
        templates.extend(spiffe.hint.iter());
        if let Some(x509) = &spiffe.x509 {
            templates.extend(x509.dns_sans.iter());
            if let Some(st) = &x509.subject_template {
                templates.extend(
                    [&st.common_name, &st.organization, &st.organizational_unit]
                        .into_iter()
                        .flatten(),
                );
            }
        }
        let mut names: std::collections::BTreeSet<String> = templates
            .iter()
            .flat_map(|t| t.attributes())
            .map(|a| a.to_string())
            .collect();
        names.extend(
            self.spec
                .rules
                .allow
                .iter()
                .flat_map(|r| r.conditions.iter())
                .map(|c| c.attribute.to_string()),
        );
        // Claims are templates only where they contain `{{`.
        for (_, template) in self.parse_claim_templates() {
            names.extend(template.attributes().map(|a| a.to_string()));
        }
        names.into_iter().filter(|n| n.starts_with("workload.")).collect()
    }

    /// The templates among its `jwt.extra_claims` (a string with `{{`), parsed, sorted by their
    /// text: what [`crate::manifest::Object`] keeps so that no issuance parses them.
    pub fn parse_claim_templates(&self) -> Vec<(String, Template)> {
        let mut out = std::collections::BTreeMap::new();
        for value in self.spec.spiffe.jwt.iter().flat_map(|jwt| jwt.extra_claims.values()) {
            collect_claim_templates(value, &mut out);
        }
        out.into_iter().collect()
    }

    pub fn problems(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        check_id_template(&mut out, &self.spec.spiffe.id);
        for (i, rule) in self.spec.rules.allow.iter().enumerate() {
            if rule.conditions.is_empty() {
                out.push(
                    Problem::error(format!("/spec/rules/allow/{i}/conditions"), "a rule with no conditions")
                        .hint("add conditions, or remove `rules` to allow every workload"),
                );
            }
            for (j, c) in rule.conditions.iter().enumerate() {
                let set = [
                    c.eq.is_some(),
                    c.not_eq.is_some(),
                    c.is_in.is_some(),
                    c.not_in.is_some(),
                ];
                if set.iter().filter(|s| **s).count() != 1 {
                    out.push(
                        Problem::error(
                            format!("/spec/rules/allow/{i}/conditions/{j}"),
                            "a condition needs exactly one of `eq`, `not_eq`, `in`, `not_in`",
                        )
                        .hint("for example `eq: {value: \"web\"}` or `in: {values: [\"a\", \"b\"]}`"),
                    );
                }
            }
        }
        if let Some(jwt) = &self.spec.spiffe.jwt {
            for (name, value) in &jwt.extra_claims {
                let at = format!("/spec/spiffe/jwt/extra_claims/{}", escape_pointer(name));
                if RESERVED_CLAIMS.contains(&name.as_str()) {
                    out.push(
                        Problem::error(
                            at.clone(),
                            format!("the `{name}` claim is set by tbot and cannot be overridden"),
                        )
                        .hint("rename the claim, or remove it"),
                    );
                }
                check_claim_templates(&mut out, &at, value);
            }
        }
        out
    }
}

/// Checks the fixed parts of a SPIFFE ID template against the SPIFFE path rules, standing a valid
/// segment in for each `{{ }}`.
fn check_id_template(out: &mut Vec<Problem>, id: &Template) {
    let at = "/spec/spiffe/id";
    if let Some(rest) = id.as_str().strip_prefix("spiffe://") {
        let path = rest.find('/').map(|i| &rest[i..]).unwrap_or("/");
        out.push(
            Problem::error(
                at,
                format!("`{}` is a full SPIFFE ID; `id` is only its path", id.as_str()),
            )
            .hint(format!("write `{path}`: the trust domain is added")),
        );
        return;
    }
    let stand_in: String = id
        .parts()
        .iter()
        .map(|p| match p {
            Part::Literal(text) => text.as_str(),
            Part::Expr(_) => "x",
        })
        .collect();
    if let Err(message) = spiffe_id::check_path(&stand_in) {
        // The check quotes what it saw: show the operator's template, not the stand-in.
        let message = message.replace(&format!("`{stand_in}`"), &format!("`{}`", id.as_str()));
        out.push(
            Problem::error(at, message)
                .hint("a SPIFFE ID path looks like `/svc/web` or `/svc/{{workload.systemd.service}}`"),
        );
    }
}

fn check_claim_templates(out: &mut Vec<Problem>, at: &str, value: &serde_json::Value) {
    match value {
        serde_json::Value::String(text) => {
            if let Err(message) = Template::parse(text) {
                out.push(Problem::error(at, message.to_string()).hint(TEMPLATE_HINT));
            }
        }
        serde_json::Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                check_claim_templates(out, &format!("{at}/{i}"), item);
            }
        }
        serde_json::Value::Object(map) => {
            for (key, item) in map {
                check_claim_templates(out, &format!("{at}/{}", escape_pointer(key)), item);
            }
        }
        _ => {}
    }
}

const TEMPLATE_HINT: &str =
    "templates look like `{{workload.systemd.service}}`; `tbotctl schema workload_identity` lists the attributes";

/// Escapes one JSON pointer segment.
pub fn escape_pointer(segment: &str) -> String {
    segment.replace('~', "~0").replace('/', "~1")
}

/// Every string of `value` (a claim, or an array or object of them) that is a template, parsed,
/// by its text.
fn collect_claim_templates(value: &serde_json::Value, out: &mut std::collections::BTreeMap<String, Template>) {
    use serde_json::Value;
    match value {
        Value::String(s) if s.contains("{{") => {
            if let Ok(t) = Template::parse(s) {
                out.insert(s.clone(), t);
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_claim_templates(v, out)),
        Value::Object(map) => map.values().for_each(|v| collect_claim_templates(v, out)),
        _ => {}
    }
}
