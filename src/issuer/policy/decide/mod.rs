//! Decisions: given a bot, its join, a workload's attested attributes and a `workload_identity`, decide
//! whether the workload gets it (roles, then the identity's `rules.allow`) and render what it gets:
//! SPIFFE ID, hint, DNS SANs, subject and extra claims. Every "no" says which role, rule, condition or
//! unset attribute decided it.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Map, Value};

use crate::issuer::policy::Policy;
use crate::issuer::policy::rbac;
use crate::resource::spiffe_id::{TrustDomain, check_id};
use crate::resource::template::{Attribute, Template};
use crate::resource::workload_identity::{Condition, WorkloadIdentity};

pub use caller::{Caller, Lookup};

/// The default and largest `x509.maximum_ttl`.
pub const DEFAULT_X509_MAX_TTL: Duration = Duration::from_secs(24 * 3600);
pub const LIMIT_X509_MAX_TTL: Duration = Duration::from_secs(14 * 24 * 3600);
/// The default and largest `jwt.maximum_ttl`.
pub const DEFAULT_JWT_MAX_TTL: Duration = Duration::from_secs(24 * 3600);
/// How many identities one label selector may resolve to.
pub const MAX_SELECTED: usize = 64;

/// Attribute values, keyed by attribute name (`workload.unix.uid`, `user.traits.team`). Traits may
/// hold several values; everything else holds one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Attributes(BTreeMap<String, Vec<String>>);

impl Attributes {
    pub fn new() -> Attributes {
        Attributes::default()
    }

    /// Sets an attribute to one value.
    pub fn set(&mut self, name: impl Into<String>, value: impl ToString) -> &mut Self {
        self.0.insert(name.into(), vec![value.to_string()]);
        self
    }

    /// Sets an attribute to several values (traits).
    pub fn set_many(&mut self, name: impl Into<String>, values: Vec<String>) -> &mut Self {
        self.0.insert(name.into(), values);
        self
    }

    pub fn get(&self, attribute: &Attribute) -> Option<&[String]> {
        // Most attributes have no key: looked up by their catalogue name, with no string built.
        match &attribute.key {
            None => self.0.get(attribute.base),
            Some(_) => self.0.get(&attribute.to_string()),
        }
        .map(Vec::as_slice)
    }

    /// Only the `workload.*` attributes: what an agent may assert about a caller.
    /// Whether every attribute is a `workload.*` one (as attestation makes them).
    pub fn is_workload_only(&self) -> bool {
        self.0.keys().all(|k| k.starts_with("workload."))
    }

    pub fn workload_only(&self) -> Attributes {
        Attributes(
            self.0
                .iter()
                .filter(|(k, _)| k.starts_with("workload."))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        )
    }

    /// Only the attributes named in `names`.
    pub fn only(&self, names: &[String]) -> Attributes {
        Attributes(
            self.0
                .iter()
                .filter(|(k, _)| names.iter().any(|n| n == *k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        )
    }

    /// Adds every attribute of `other`, replacing any of the same name.
    pub fn extend(&mut self, other: &Attributes) {
        for (k, v) in &other.0 {
            self.0.insert(k.clone(), v.clone());
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &[String])> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_slice()))
    }
}

/// The subject of an X509-SVID.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Subject {
    pub common_name: Option<String>,
    pub organization: Option<String>,
    pub organizational_unit: Option<String>,
}

/// What a workload gets from one `workload_identity`.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// The `workload_identity` it came from.
    pub identity: String,
    /// `spiffe://<trust domain><path>`.
    pub spiffe_id: String,
    pub hint: Option<String>,
    pub dns_sans: Vec<String>,
    pub subject: Subject,
    pub extra_claims: Map<String, Value>,
    pub x509_max_ttl: Duration,
    pub jwt_max_ttl: Duration,
}

/// Why a template cannot be rendered for a caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unrenderable {
    #[error("`{0}` is not set for this workload: {remedy}", remedy = crate::resource::template::unset_remedy(.0))]
    Unset(String),
    #[error("`{attribute}` has {count} values and a template needs exactly one")]
    Several { attribute: String, count: usize },
    /// A value would add a path segment to a SPIFFE ID.
    #[error("`{attribute}` holds a `/`, and a value fills one segment of a SPIFFE ID")]
    Slash { attribute: String },
    /// A value in a DNS SAN is not one DNS label (it would add labels, or a wildcard).
    #[error(
        "`{attribute}` is not one DNS label (letters, digits and `-`, at most 63, not starting or ending with `-`), and a value fills one label of a DNS SAN"
    )]
    DnsLabel { attribute: String },
    /// An attribute the template reads is not set.
    #[error(transparent)]
    Template(#[from] crate::resource::template::Unset),
}

/// Why a caller does not get an identity. Each message names the document and what failed; the
/// operator's move is an edit of that document (or of the workload's attributes).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denial {
    #[error("bot `{0}` no longer exists")]
    NoBot(String),
    #[error("workload_identity `{0}` does not exist")]
    NoIdentity(String),
    /// The bot's roles do not allow the identity.
    #[error(transparent)]
    Rbac(#[from] rbac::RbacDenial),
    /// No rule of `rules.allow` holds for the caller; one reason per rule.
    #[error("workload_identity `{identity}` does not allow this workload: {}", reasons.join("; "))]
    Rules { identity: String, reasons: Vec<String> },
    #[error("workload_identity `{identity}`: `{field}` cannot be rendered: {why}")]
    Render {
        identity: String,
        field: String,
        why: Unrenderable,
    },
    #[error("workload_identity `{identity}`: the rendered SPIFFE ID path `{path}` is not valid: {why}")]
    SpiffeId {
        identity: String,
        path: String,
        why: String,
    },
    #[error("workload_identity `{identity}`: DNS SAN `{san}` is not a DNS name: {why}")]
    DnsSan {
        identity: String,
        san: String,
        why: &'static str,
    },
    #[error("workload_identity `{identity}`: claim `{key}`: {why}")]
    Claim { identity: String, key: String, why: String },
    #[error(
        "the label selector picks {count} workload identities for this caller, more than the limit of {MAX_SELECTED}; narrow the selector's labels"
    )]
    TooMany { count: usize },
}

impl crate::error::Explain for Unrenderable {
    fn hint(&self) -> std::borrow::Cow<'_, str> {
        match self {
            // The message says what sets it.
            Unrenderable::Unset(_) | Unrenderable::Template(_) => "".into(),
            Unrenderable::Several { .. } => "use a rule or a template that reads one value".into(),
            Unrenderable::Slash { .. } => {
                "a value fills one path segment; put the `/` in the template instead, or use a rule to refuse such \
                 values"
                    .into()
            }
            Unrenderable::DnsLabel { .. } => {
                "a value fills one DNS label; put the dots in the template instead, or use a rule to refuse such values"
                    .into()
            }
        }
    }
}

impl crate::error::Explain for Denial {
    fn hint(&self) -> std::borrow::Cow<'_, str> {
        match self {
            Denial::TooMany { .. } => "".into(),
            Denial::NoBot(_) | Denial::NoIdentity(_) => "check the name, or add the document".into(),
            _ => "edit the document it names (`tbotctl diff` shows what the edit does)".into(),
        }
    }
}

/// Decides `identity` for a caller of `bot_name` with `attributes` (the workload's, the bot's and
/// its join's, already merged).
pub fn decide(policy: &Policy, bot_name: &str, identity: &str, attributes: &dyn Lookup) -> Result<Decision, Denial> {
    let bot = policy
        .bots
        .get(bot_name)
        .ok_or_else(|| Denial::NoBot(bot_name.to_owned()))?;
    let wi = policy
        .identities
        .get(identity)
        .ok_or_else(|| Denial::NoIdentity(identity.to_owned()))?;
    rbac::may_issue(policy, bot, wi)?;
    check_rules(wi, attributes)?;
    render(&policy.trust_domain, wi, wi.claim_templates(), attributes)
}

/// The identities a label selector picks for this caller: every identity carrying all `labels` that
/// the bot may issue and whose rules pass. More than [`MAX_SELECTED`] is an error.
pub fn select(
    policy: &Policy,
    bot_name: &str,
    labels: &BTreeMap<String, String>,
    attributes: &dyn Lookup,
) -> Result<Vec<Decision>, Denial> {
    let mut out = Vec::new();
    // Only the identities whose rules might pass (see `policy::index`), in name order.
    for wi in policy.by_rules.candidates(attributes) {
        // The cheap tests first: most identities a broad selector names are not this caller's.
        if !labels.iter().all(|(k, v)| wi.metadata.labels.get(k) == Some(v)) || !rules_pass(wi, attributes) {
            continue;
        }
        if let Ok(decision) = decide(policy, bot_name, &wi.metadata.name, attributes) {
            out.push(decision);
        }
    }
    if out.len() > MAX_SELECTED {
        return Err(Denial::TooMany { count: out.len() });
    }
    Ok(out)
}

/// `rules.allow`: no rules allow everyone; otherwise some rule must have all its conditions true.
fn check_rules(wi: &WorkloadIdentity, attributes: &dyn Lookup) -> Result<(), Denial> {
    let rules = &wi.spec.rules.allow;
    if rules.is_empty() {
        return Ok(());
    }
    let mut reasons = Vec::new();
    for (i, rule) in rules.iter().enumerate() {
        match rule.conditions.iter().find_map(|c| condition_fails(c, attributes)) {
            None => return Ok(()),
            Some(why) => reasons.push(format!("rule {}: {why}", i + 1)),
        }
    }
    Err(Denial::Rules {
        identity: wi.metadata.name.to_string(),
        reasons,
    })
}

/// Whether the condition holds, with nothing built: most conditions checked during a label
/// selection fail, and only the one decision asked for needs to say why.
fn condition_holds(condition: &Condition, attributes: &dyn Lookup) -> bool {
    let Some(values) = attributes.get(&condition.attribute) else {
        return false;
    };
    let any = |pred: &dyn Fn(&str) -> bool| values.iter().any(|v| pred(v));
    condition.eq.as_ref().is_none_or(|eq| any(&|v| v == eq.value))
        && condition.not_eq.as_ref().is_none_or(|n| !any(&|v| v == n.value))
        && condition
            .is_in
            .as_ref()
            .is_none_or(|is_in| any(&|v| is_in.values.iter().any(|w| w == v)))
        && condition
            .not_in
            .as_ref()
            .is_none_or(|not_in| !any(&|v| not_in.values.iter().any(|w| w == v)))
}

/// Whether some rule of `wi` lets the caller through (no rules: everyone), with nothing built.
fn rules_pass(wi: &WorkloadIdentity, attributes: &dyn Lookup) -> bool {
    let rules = &wi.spec.rules.allow;
    rules.is_empty()
        || rules
            .iter()
            .any(|rule| rule.conditions.iter().all(|c| condition_holds(c, attributes)))
}

/// Why a condition is false, or `None` when it holds.
fn condition_fails(condition: &Condition, attributes: &dyn Lookup) -> Option<String> {
    if condition_holds(condition, attributes) {
        return None;
    }
    let attribute = &condition.attribute;
    let Some(values) = attributes.get(attribute) else {
        return Some(Unrenderable::Unset(attribute.to_string()).to_string());
    };
    let shown = match values {
        [one] => format!("`{one}`"),
        many => format!("[{}]", many.join(", ")),
    };
    let any = |pred: &dyn Fn(&str) -> bool| values.iter().any(|v| pred(v));
    if let Some(eq) = &condition.eq
        && !any(&|v| v == eq.value)
    {
        return Some(format!("`{attribute}` is {shown}, not `{}`", eq.value));
    }
    if let Some(not_eq) = &condition.not_eq
        && any(&|v| v == not_eq.value)
    {
        return Some(format!("`{attribute}` is `{}`, which `not_eq` excludes", not_eq.value));
    }
    if let Some(is_in) = &condition.is_in
        && !any(&|v| is_in.values.iter().any(|w| w == v))
    {
        return Some(format!(
            "`{attribute}` is {shown}, not one of [{}]",
            is_in.values.join(", ")
        ));
    }
    if let Some(not_in) = &condition.not_in
        && any(&|v| not_in.values.iter().any(|w| w == v))
    {
        return Some(format!(
            "`{attribute}` is {shown}, which `not_in` [{}] excludes",
            not_in.values.join(", ")
        ));
    }
    None
}

/// The field of a workload identity a template fills, named (`spiffe.x509.dns_sans[0]`) only when
/// it cannot be rendered.
#[derive(Clone, Copy)]
enum Field<'a> {
    Id,
    Hint,
    DnsSan(usize),
    Subject(&'static str),
    Claim(&'a str),
}

impl std::fmt::Display for Field<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Field::Id => f.write_str("spiffe.id"),
            Field::Hint => f.write_str("spiffe.hint"),
            Field::DnsSan(i) => write!(f, "spiffe.x509.dns_sans[{i}]"),
            Field::Subject(name) => write!(f, "spiffe.x509.subject_template.{name}"),
            Field::Claim(key) => write!(f, "spiffe.jwt.extra_claims.{key}"),
        }
    }
}

fn render_field(
    wi: &WorkloadIdentity,
    field: Field<'_>,
    template: &Template,
    attributes: &dyn Lookup,
) -> Result<String, Denial> {
    let mut failure = None;
    // In a SPIFFE ID a value fills one segment: it never adds a `/`. In a DNS SAN it fills one
    // label: it never adds a label or a wildcard.
    let one_segment = matches!(field, Field::Id);
    let one_label = matches!(field, Field::DnsSan(_));
    let out = template.render(|a| match attributes.single(a) {
        Ok(v) if one_segment && v.contains('/') => {
            failure.get_or_insert(Unrenderable::Slash {
                attribute: a.to_string(),
            });
            None
        }
        Ok(v) if one_label && !is_dns_label(v) => {
            failure.get_or_insert(Unrenderable::DnsLabel {
                attribute: a.to_string(),
            });
            None
        }
        Ok(v) => Some(v),
        Err(why) => {
            failure.get_or_insert(why);
            None
        }
    });
    out.map_err(|fallback| Denial::Render {
        identity: wi.metadata.name.to_string(),
        field: field.to_string(),
        why: failure.unwrap_or(Unrenderable::Template(fallback)),
    })
}

/// One DNS label: 1 to 63 letters, digits and `-`, not starting or ending with `-`.
fn is_dns_label(value: &str) -> bool {
    (1..=63).contains(&value.len())
        && value.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !value.starts_with('-')
        && !value.ends_with('-')
}

/// Renders what `wi` gives a caller; `parsed` holds its claim templates already parsed, by their
/// text (any other is parsed here).
fn render(
    td: &TrustDomain,
    wi: &WorkloadIdentity,
    parsed: &[(String, Template)],
    attributes: &dyn Lookup,
) -> Result<Decision, Denial> {
    let spiffe = &wi.spec.spiffe;
    let name: &str = &wi.metadata.name;
    let path = render_field(wi, Field::Id, &spiffe.id, attributes)?;
    check_id(td, &path).map_err(|why| Denial::SpiffeId {
        identity: name.to_owned(),
        path: path.clone(),
        why: why.to_string(),
    })?;
    let hint = spiffe
        .hint
        .as_ref()
        .map(|t| render_field(wi, Field::Hint, t, attributes))
        .transpose()?;
    let x509 = spiffe.x509.as_ref();
    let mut dns_sans = Vec::new();
    for (i, t) in x509
        .map(|x| x.dns_sans.as_slice())
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let san = render_field(wi, Field::DnsSan(i), t, attributes)?;
        check_dns_name(&san).map_err(|why| Denial::DnsSan {
            identity: name.to_owned(),
            san: san.clone(),
            why,
        })?;
        dns_sans.push(san);
    }
    let mut subject = Subject::default();
    if let Some(st) = x509.and_then(|x| x.subject_template.as_ref()) {
        let field = |f: &'static str, t: &Option<Template>| {
            t.as_ref()
                .map(|t| render_field(wi, Field::Subject(f), t, attributes))
                .transpose()
        };
        subject.common_name = field("common_name", &st.common_name)?;
        subject.organization = field("organization", &st.organization)?;
        subject.organizational_unit = field("organizational_unit", &st.organizational_unit)?;
    }
    let mut extra_claims = Map::new();
    if let Some(jwt) = &spiffe.jwt {
        for (key, value) in &jwt.extra_claims {
            extra_claims.insert(key.clone(), render_claim(wi, parsed, key, value, attributes)?);
        }
    }
    let cap = |ttl: Option<Duration>, default: Duration, limit: Duration| ttl.unwrap_or(default).min(limit);
    Ok(Decision {
        identity: name.to_owned(),
        spiffe_id: format!("spiffe://{}{path}", td.as_str()),
        hint,
        dns_sans,
        subject,
        extra_claims,
        x509_max_ttl: cap(
            x509.and_then(|x| x.maximum_ttl).map(|d| d.as_std()),
            DEFAULT_X509_MAX_TTL,
            LIMIT_X509_MAX_TTL,
        ),
        jwt_max_ttl: cap(
            spiffe.jwt.as_ref().and_then(|j| j.maximum_ttl).map(|d| d.as_std()),
            DEFAULT_JWT_MAX_TTL,
            DEFAULT_JWT_MAX_TTL,
        ),
    })
}

/// Extra claims: strings are templates; arrays and objects are rendered inside; other values stay.
fn render_claim(
    wi: &WorkloadIdentity,
    parsed: &[(String, Template)],
    key: &str,
    value: &Value,
    attributes: &dyn Lookup,
) -> Result<Value, Denial> {
    Ok(match value {
        Value::String(s) if s.contains("{{") => {
            let known = parsed.binary_search_by(|(text, _)| text.as_str().cmp(s));
            let template = match known {
                Ok(at) => std::borrow::Cow::Borrowed(&parsed[at].1),
                Err(_) => std::borrow::Cow::Owned(Template::parse(s).map_err(|why| Denial::Claim {
                    identity: wi.metadata.name.to_string(),
                    key: key.to_owned(),
                    why: why.to_string(),
                })?),
            };
            Value::String(render_field(wi, Field::Claim(key), &template, attributes)?)
        }
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|v| render_claim(wi, parsed, key, v, attributes))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| {
                    Ok((
                        k.clone(),
                        render_claim(wi, parsed, &format!("{key}.{k}"), v, attributes)?,
                    ))
                })
                .collect::<Result<_, Denial>>()?,
        ),
        other => other.clone(),
    })
}

/// A DNS name for a SAN: labels of letters, digits and `-`, optionally a leading `*.`, at most 253 bytes.
fn check_dns_name(name: &str) -> Result<(), &'static str> {
    let rest = name.strip_prefix("*.").unwrap_or(name);
    if name.len() > 253 || rest.is_empty() {
        return Err("it is empty or longer than 253 characters");
    }
    for label in rest.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err("a label is empty or longer than 63 characters");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("a label starts or ends with `-`");
        }
        if !label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err("only letters, digits, `-` and `.` are allowed");
        }
    }
    Ok(())
}

mod caller;
#[cfg(test)]
mod hostile;
#[cfg(test)]
mod tests;
