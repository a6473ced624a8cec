//! The template language (`/svc/{{workload.systemd.service}}`, `{{ strings.lower(user.bot_name) }}`)
//! and the catalogue of attributes that templates and rule conditions may read.

use std::fmt;

use super::string_form;

/// What an attribute holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttrType {
    Bool,
    Int,
    String,
    /// A map of string keys, read one key at a time (`user.labels.team`).
    Map,
}

/// Every attribute a workload identity may read: where it comes from and what it holds.
pub const CATALOGUE: &[(&str, AttrType)] = &[
    ("workload.unix.attested", AttrType::Bool),
    ("workload.unix.pid", AttrType::Int),
    ("workload.unix.uid", AttrType::Int),
    ("workload.unix.gid", AttrType::Int),
    ("workload.unix.binary_path", AttrType::String),
    ("workload.unix.binary_hash", AttrType::String),
    ("workload.systemd.attested", AttrType::Bool),
    ("workload.systemd.service", AttrType::String),
    ("workload.docker.attested", AttrType::Bool),
    ("workload.docker.container.name", AttrType::String),
    ("workload.docker.container.image", AttrType::String),
    ("workload.docker.container.image_digest", AttrType::String),
    ("workload.docker.container.labels", AttrType::Map),
    ("workload.kubernetes.attested", AttrType::Bool),
    ("workload.kubernetes.namespace", AttrType::String),
    ("workload.kubernetes.pod_name", AttrType::String),
    ("workload.kubernetes.service_account", AttrType::String),
    ("workload.kubernetes.pod_uid", AttrType::String),
    ("workload.kubernetes.labels", AttrType::Map),
    ("workload.kubernetes.container.name", AttrType::String),
    ("workload.kubernetes.container.image", AttrType::String),
    ("workload.kubernetes.container.image_digest", AttrType::String),
    ("workload.podman.attested", AttrType::Bool),
    ("workload.podman.container.name", AttrType::String),
    ("workload.podman.container.image", AttrType::String),
    ("workload.podman.container.image_digest", AttrType::String),
    ("workload.podman.container.labels", AttrType::Map),
    ("workload.podman.pod.name", AttrType::String),
    ("workload.podman.pod.labels", AttrType::Map),
    ("user.name", AttrType::String),
    ("user.bot_name", AttrType::String),
    ("user.is_bot", AttrType::Bool),
    ("user.labels", AttrType::Map),
    ("user.traits", AttrType::Map),
    ("join.meta.join_method", AttrType::String),
    ("join.meta.join_token_name", AttrType::String),
    ("join.iam.account", AttrType::String),
    ("join.iam.arn", AttrType::String),
];

/// The longest string value of a workload attribute (a path is at most 4096 bytes on Linux).
pub const MAX_VALUE_BYTES: usize = 4096;

/// Why `values` cannot be what a workload holds for `name`, if they cannot: a bot sends them, and
/// each must have the catalogue's type (`Int`: decimal digits, `Bool`: `true`/`false`, strings
/// without control characters and at most [`MAX_VALUE_BYTES`]), one value each.
pub fn workload_value_problem(name: &str, values: &[String]) -> Option<String> {
    // A map's entries are named `<map>.<key>` or `<map>["<key>"]`.
    let entry = CATALOGUE.iter().find(|(n, kind)| {
        n.starts_with("workload.")
            && (*n == name
                || *kind == AttrType::Map
                    && name
                        .strip_prefix(n)
                        .is_some_and(|rest| rest.len() > 1 && (rest.starts_with('.') || rest.starts_with("[\""))))
    });
    let Some((_, kind)) = entry else {
        return Some("is not a workload attribute of the catalogue".into());
    };
    let [value] = values else {
        return Some(format!("has {} values; a workload attribute has one", values.len()));
    };
    match kind {
        AttrType::Int => {
            let digits = !value.is_empty() && value.len() <= 10 && value.bytes().all(|b| b.is_ascii_digit());
            let canonical = value == "0" || !value.starts_with('0');
            if !(digits && canonical && value.parse::<u32>().is_ok()) {
                return Some("is not a number (decimal digits, at most 4294967295)".into());
            }
        }
        AttrType::Bool if value != "true" && value != "false" => {
            return Some("is not `true` or `false`".into());
        }
        AttrType::String | AttrType::Map if value.chars().any(char::is_control) => {
            return Some("holds a control character".into());
        }
        AttrType::String | AttrType::Map if value.len() > MAX_VALUE_BYTES => {
            return Some(format!("is longer than {MAX_VALUE_BYTES} bytes"));
        }
        _ => {}
    }
    None
}

fn catalogue_names() -> String {
    CATALOGUE.iter().map(|(name, _)| *name).collect::<Vec<_>>().join(", ")
}

/// A reference to one catalogue attribute, with the key for map attributes (`user.traits.team`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Attribute {
    /// The catalogue entry, such as `workload.unix.uid` or `user.traits`.
    pub base: &'static str,
    /// The key, for map attributes.
    pub key: Option<String>,
}

string_form!(
    Attribute,
    "tbot-attribute",
    format!(
        "An attribute of the workload, the bot or its join: {}.",
        catalogue_names()
    )
);

/// Why a template or an attribute name does not parse; each says how to write it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("`{0}` has an unclosed `[`")]
    UnclosedBracket(String),
    #[error("`{0}`: write the key in quotes, like `user.traits[\"team\"]`")]
    UnquotedKey(String),
    #[error("`{0}` is not an attribute name; attributes look like `workload.unix.uid`")]
    NotAName(String),
    #[error("`{0}` is a map; name one key, like `{0}.team` or `{0}[\"team\"]`")]
    MapWithoutKey(String),
    #[error("`{0}` is not a map and takes no `[key]`")]
    NotAMap(String),
    /// `near`: the closest known attribute, when one is close.
    #[error("unknown attribute `{path}`; {}", match near {
        Some(near) => format!("did you mean `{near}`?"),
        None => "run `tbotctl schema workload_identity` for the list of attributes".to_owned(),
    })]
    Unknown { path: String, near: Option<String> },
    #[error("`{{{{ }}}}` is empty; put an attribute inside, like `{{{{workload.systemd.service}}}}`")]
    Empty,
    #[error("`{0}` has an unclosed `(`")]
    UnclosedParen(String),
    #[error("unknown function `{0}`; the functions are `strings.lower` and `strings.upper`")]
    UnknownFunction(String),
    #[error("`{0}` has a `{{{{` without its closing `}}}}`")]
    Unclosed(String),
    #[error("`}}}}` without an opening `{{{{` in `{0}`")]
    StrayClose(String),
}

/// A template read an attribute the caller does not have.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("attribute `{0}` is not set for this workload: {remedy}", remedy = unset_remedy(.0))]
pub struct Unset(pub String);

/// What makes `attribute` set for a caller, or what to do instead: said wherever an identity is
/// refused because a template or a rule reads an attribute the caller does not have.
pub fn unset_remedy(attribute: &str) -> &'static str {
    if attribute.starts_with("workload.kubernetes.") {
        "it is set only for a process in a pod's container on this node that calls a `unix://` socket whose \
         `kubernetes` attestor is enabled and can reach the kubelet; run the process in such a pod, or use \
         an identity whose templates and rules do not read it"
    } else if attribute.starts_with("workload.docker.") || attribute.starts_with("workload.podman.") {
        "it is set only for a process in a container of that engine that calls a `unix://` socket whose \
         `docker` or `podman` attestor is enabled and can reach the engine; run the process in such a \
         container, or use an identity whose templates and rules do not read it"
    } else if attribute.starts_with("workload.systemd.") {
        "it is set only for a process that runs in a systemd service and calls a `unix://` socket whose \
         `systemd` attestor is enabled; run the process as a service, or use an identity whose templates \
         and rules do not read it"
    } else if attribute.starts_with("workload.") {
        "it is set only for a process calling a `unix://` Workload API socket (never for an output or a \
         `tcp://` listener); call through such a socket, or use an identity whose templates and rules do \
         not read it"
    } else if attribute.starts_with("user.traits") || attribute.starts_with("user.labels") {
        "it comes from the bot: add it to the `bot` document's traits or labels, or use a template that does \
         not read it"
    } else if attribute.starts_with("join.iam.") {
        "it is set only for a bot that joined by `iam`; join that way, or use a template that does not read it"
    } else {
        "use a template that does not read it"
    }
}

impl Attribute {
    /// Parses `workload.unix.uid`, `user.traits.team` or `user.labels["team"]`.
    pub fn parse(text: &str) -> Result<Attribute, TemplateError> {
        let text = text.trim();
        let (path, bracket_key) = match text.split_once('[') {
            Some((path, rest)) => {
                let inner = rest
                    .strip_suffix(']')
                    .ok_or_else(|| TemplateError::UnclosedBracket(text.to_owned()))?;
                let key = unquote(inner.trim()).ok_or_else(|| TemplateError::UnquotedKey(text.to_owned()))?;
                (path, Some(key))
            }
            None => (text, None),
        };
        if path.is_empty()
            || path
                .split('.')
                .any(|seg| seg.is_empty() || !seg.chars().all(is_ident_char))
        {
            return Err(TemplateError::NotAName(text.to_owned()));
        }
        if let Some(&(base, ty)) = CATALOGUE.iter().find(|(name, _)| *name == path) {
            return match (ty, bracket_key) {
                (AttrType::Map, Some(key)) => Ok(Attribute { base, key: Some(key) }),
                (AttrType::Map, None) => Err(TemplateError::MapWithoutKey(path.to_owned())),
                (_, Some(_)) => Err(TemplateError::NotAMap(path.to_owned())),
                (_, None) => Ok(Attribute { base, key: None }),
            };
        }
        if bracket_key.is_none() {
            for &(base, ty) in CATALOGUE {
                if ty == AttrType::Map
                    && let Some(key) = path.strip_prefix(base).and_then(|r| r.strip_prefix('.'))
                    && !key.contains('.')
                {
                    return Ok(Attribute {
                        base,
                        key: Some(key.to_owned()),
                    });
                }
            }
        }
        // `user.trait.team` is a key of a misspelt map: suggest the map with the same key.
        let map_key = path.rsplit_once('.').and_then(|(prefix, key)| {
            let maps = CATALOGUE
                .iter()
                .filter(|(_, ty)| *ty == AttrType::Map)
                .map(|(name, _)| *name);
            super::closest(prefix, maps).map(|base| format!("{base}.{key}"))
        });
        let near = map_key.or_else(|| super::closest(path, CATALOGUE.iter().map(|(name, _)| *name)).map(str::to_owned));
        Err(TemplateError::Unknown {
            path: path.to_owned(),
            near,
        })
    }
}

impl fmt::Display for Attribute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.key {
            Some(key) if key.chars().all(is_ident_char) => write!(f, "{}.{key}", self.base),
            Some(key) => write!(f, "{}[{key:?}]", self.base),
            None => f.write_str(self.base),
        }
    }
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

fn unquote(s: &str) -> Option<String> {
    let inner = s
        .strip_prefix('"')
        .and_then(|r| r.strip_suffix('"'))
        .or_else(|| s.strip_prefix('\'').and_then(|r| r.strip_suffix('\'')))?;
    (!inner.is_empty()).then(|| inner.to_owned())
}

/// An expression inside `{{ }}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expr {
    Attribute(Attribute),
    Lower(Box<Expr>),
    Upper(Box<Expr>),
}

impl Expr {
    fn parse(text: &str) -> Result<Expr, TemplateError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(TemplateError::Empty);
        }
        if let Some(open) = text.find('(') {
            let function = text[..open].trim();
            let inner = text[open + 1..]
                .strip_suffix(')')
                .ok_or_else(|| TemplateError::UnclosedParen(text.to_owned()))?;
            let inner = Box::new(Expr::parse(inner)?);
            return match function {
                "strings.lower" => Ok(Expr::Lower(inner)),
                "strings.upper" => Ok(Expr::Upper(inner)),
                other => Err(TemplateError::UnknownFunction(other.to_owned())),
            };
        }
        Attribute::parse(text).map(Expr::Attribute)
    }

    fn attribute(&self) -> &Attribute {
        match self {
            Expr::Attribute(a) => a,
            Expr::Lower(e) | Expr::Upper(e) => e.attribute(),
        }
    }
}

/// One piece of a template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    Literal(String),
    Expr(Expr),
}

/// A string with `{{ expression }}` holes, parsed and checked against the attribute catalogue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    source: String,
    parts: Vec<Part>,
}

string_form!(
    Template,
    "tbot-template",
    format!(
        "Text with `{{{{ attribute }}}}` holes, optionally wrapped in `strings.lower(...)` or `strings.upper(...)`. Attributes: {}.",
        catalogue_names()
    )
);

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

impl Template {
    pub fn parse(source: &str) -> Result<Template, TemplateError> {
        let mut parts = Vec::new();
        let mut rest = source;
        while !rest.is_empty() {
            match rest.find("{{") {
                Some(open) => {
                    let literal = &rest[..open];
                    check_literal(literal)?;
                    if !literal.is_empty() {
                        parts.push(Part::Literal(literal.to_owned()));
                    }
                    let after = &rest[open + 2..];
                    let close = after
                        .find("}}")
                        .ok_or_else(|| TemplateError::Unclosed(source.to_owned()))?;
                    parts.push(Part::Expr(Expr::parse(&after[..close])?));
                    rest = &after[close + 2..];
                }
                None => {
                    check_literal(rest)?;
                    parts.push(Part::Literal(rest.to_owned()));
                    rest = "";
                }
            }
        }
        Ok(Template {
            source: source.to_owned(),
            parts,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    pub fn parts(&self) -> &[Part] {
        &self.parts
    }

    /// The attributes this template reads.
    pub fn attributes(&self) -> impl Iterator<Item = &Attribute> {
        self.parts.iter().filter_map(|p| match p {
            Part::Expr(e) => Some(e.attribute()),
            Part::Literal(_) => None,
        })
    }

    /// Renders the template with `value` giving each attribute's value (borrowed or owned); an
    /// attribute that is not set is an error naming it.
    pub fn render<V: AsRef<str>>(&self, mut value: impl FnMut(&Attribute) -> Option<V>) -> Result<String, Unset> {
        let mut out = String::with_capacity(self.source.len());
        for part in &self.parts {
            match part {
                Part::Literal(text) => out.push_str(text),
                Part::Expr(expr) => eval(expr, &mut value, &mut out)?,
            }
        }
        Ok(out)
    }
}

/// Appends what `expr` renders to `out`.
fn eval<V: AsRef<str>>(
    expr: &Expr,
    value: &mut impl FnMut(&Attribute) -> Option<V>,
    out: &mut String,
) -> Result<(), Unset> {
    match expr {
        Expr::Attribute(a) => out.push_str(value(a).ok_or_else(|| Unset(a.to_string()))?.as_ref()),
        Expr::Lower(e) | Expr::Upper(e) => {
            let mut inner = String::new();
            eval(e, value, &mut inner)?;
            let cased = if matches!(expr, Expr::Lower(_)) {
                inner.to_lowercase()
            } else {
                inner.to_uppercase()
            };
            out.push_str(&cased);
        }
    }
    Ok(())
}

fn check_literal(literal: &str) -> Result<(), TemplateError> {
    if literal.contains("}}") {
        return Err(TemplateError::StrayClose(literal.to_owned()));
    }
    Ok(())
}

impl crate::error::Explain for Unset {
    fn hint(&self) -> std::borrow::Cow<'_, str> {
        // The message says what sets it.
        "".into()
    }
}

impl crate::error::Explain for TemplateError {
    fn hint(&self) -> std::borrow::Cow<'_, str> {
        // Each message says how to write it.
        "".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_split_into_literals_and_attributes() {
        let t = Template::parse("/svc/{{ workload.systemd.service }}/{{strings.lower(user.traits.team)}}").unwrap();
        let attrs: Vec<String> = t.attributes().map(|a| a.to_string()).collect();
        assert_eq!(attrs, ["workload.systemd.service", "user.traits.team"]);
        let rendered = t
            .render(|a| Some(if a.base == "user.traits" { "Blue" } else { "web" }))
            .unwrap();
        assert_eq!(rendered, "/svc/web/blue");
    }

    #[test]
    fn unknown_attributes_are_refused_with_a_suggestion() {
        let err = Template::parse("/svc/{{workload.systemd.servce}}")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown attribute `workload.systemd.servce`"), "{err}");
        assert!(err.contains("did you mean `workload.systemd.service`"), "{err}");
    }

    #[test]
    fn malformed_templates_are_refused() {
        for bad in [
            "{{",
            "a}}b",
            "{{}}",
            "{{ strings.title(user.name) }}",
            "{{user.traits}}",
            "{{user.name[\"x\"]}}",
            "{{strings.lower(user.name}}",
        ] {
            assert!(Template::parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn map_attributes_take_a_key_in_either_spelling() {
        assert_eq!(
            Attribute::parse("user.labels[\"env\"]").unwrap(),
            Attribute::parse("user.labels.env").unwrap()
        );
    }

    #[test]
    fn rendering_names_an_unset_attribute() {
        let t = Template::parse("/svc/{{workload.systemd.service}}").unwrap();
        assert!(
            t.render(|_| None::<&str>)
                .unwrap_err()
                .to_string()
                .contains("workload.systemd.service")
        );
    }
}
