//! Decoding one YAML document in two phases: read `kind` and `version` from the node tree, then
//! check the document against its kind's schema and decode the concrete type.

use serde::de::DeserializeOwned;
use serde_json::Value as Json;

use super::schema;
use super::yaml::{Node, Value};
use crate::resource::{Document, Kind, Problem, closest};

/// Decodes a document. The document is returned when it has no errors; the problems (errors and
/// warnings) are located by JSON pointers into `node`.
pub(super) fn decode(node: &Node) -> (Option<Document>, Vec<Problem>) {
    let kind = match identify(node) {
        Ok(kind) => kind,
        Err(problem) => return (None, vec![problem]),
    };
    let json = node.to_json();
    let problems = schema::validate(kind, &json);
    if !problems.is_empty() {
        return (None, problems);
    }
    let decoded = match kind {
        Kind::AgentConfig => typed(&json).map(Document::AgentConfig),
        Kind::Bot => typed(&json).map(Document::Bot),
        Kind::Token => typed(&json).map(Document::Token),
        Kind::Role => typed(&json).map(Document::Role),
        Kind::WorkloadIdentity => typed(&json).map(Document::WorkloadIdentity),
        Kind::Cluster => typed(&json).map(Document::Cluster),
        Kind::Issuer => typed(&json).map(Document::Issuer),
        Kind::SpiffeFederation => typed(&json).map(Document::SpiffeFederation),
        Kind::Revocation => typed(&json).map(Document::Revocation),
    };
    let document = match decoded {
        Ok(document) => document,
        Err(problem) => return (None, vec![problem]),
    };
    let problems = match &document {
        Document::AgentConfig(d) => d.problems(),
        Document::Bot(_) => Vec::new(),
        Document::Token(d) => d.problems(),
        Document::Role(d) => d.problems(),
        Document::WorkloadIdentity(d) => d.problems(),
        Document::Cluster(d) => d.problems(),
        Document::Issuer(d) => d.problems(),
        Document::SpiffeFederation(d) => d.problems(),
        Document::Revocation(d) => d.problems(),
    };
    let valid = problems.iter().all(|p| p.warning);
    (valid.then_some(document), problems)
}

/// Phase one: which kind (and supported version) the document is.
fn identify(node: &Node) -> Result<Kind, Problem> {
    let kind = kind_of(node)?;
    check_version(node, kind)
}

/// Which kind the document is, from `kind` (none: the agent config), before anything else is read.
pub(super) fn kind_of(node: &Node) -> Result<Kind, Problem> {
    let Value::Map(_) = node.value else {
        return Err(Problem::error(
            "",
            format!("a document must be a mapping, but this one is {}", node.describe()),
        )
        .hint("a document looks like `kind: bot`, `version: v1`, `metadata: {name: ...}`, `spec: {...}`"));
    };
    let kind = match node.get("kind") {
        None if node.get("metadata").is_some() || node.get("spec").is_some() => {
            return Err(Problem::error("", "this document has no `kind`").hint(format!(
                "add `kind:` with one of {}; only the agent config has no kind",
                listing(Kind::named_kinds().map(Kind::as_str))
            )));
        }
        None => Kind::AgentConfig,
        Some(entry) => {
            let Value::String(text) = &entry.value.value else {
                return Err(Problem::error(
                    "/kind",
                    format!("`kind` must be a string, not {}", entry.value.describe()),
                ));
            };
            Kind::from_document(text).ok_or_else(|| {
                let known: Vec<&str> = Kind::named_kinds().map(Kind::as_str).collect();
                let problem = Problem::error("/kind", format!("unknown kind `{text}`"));
                match closest(text, known.iter().copied()) {
                    Some(near) => problem.hint(format!("did you mean `{near}`?")),
                    None => problem.hint(format!("the kinds are {}", listing(known.into_iter()))),
                }
            })?
        }
    };
    Ok(kind)
}

/// The document's `version` must be one its kind supports.
fn check_version(node: &Node, kind: Kind) -> Result<Kind, Problem> {
    let versions = kind.versions();
    let what = match kind {
        Kind::AgentConfig => "the agent config".to_owned(),
        other => format!("kind `{other}`"),
    };
    match node.get("version") {
        None => {
            Err(Problem::error("", format!("missing `version` for {what}"))
                .hint(format!("add `version: {}`", versions[0])))
        }
        Some(entry) => match &entry.value.value {
            Value::String(v) if versions.contains(&v.as_str()) => Ok(kind),
            Value::String(v) => Err(Problem::error("/version", format!("{what} has no version `{v}`"))
                .hint(format!("supported: {}", listing(versions.iter().copied())))),
            _ => Err(Problem::error(
                "/version",
                format!("`version` must be a string such as `{}`", versions[0]),
            )
            .hint(format!("write `version: {}`", versions[0]))),
        },
    }
}

fn listing<'a>(items: impl Iterator<Item = &'a str>) -> String {
    items.map(|i| format!("`{i}`")).collect::<Vec<_>>().join(", ")
}

/// Phase two: the concrete type, with the serde error located by its path.
fn typed<T: DeserializeOwned>(json: &Json) -> Result<T, Problem> {
    serde_path_to_error::deserialize(json).map_err(|err| {
        let mut pointer = String::new();
        for segment in err.path().iter() {
            match segment {
                serde_path_to_error::Segment::Map { key } => {
                    pointer.push('/');
                    pointer.push_str(&crate::resource::workload_identity::escape_pointer(key));
                }
                serde_path_to_error::Segment::Seq { index } => pointer.push_str(&format!("/{index}")),
                _ => {}
            }
        }
        let message = err.into_inner().to_string();
        // The standard library's words for a bad `ip:port` say neither the value nor the form.
        if message.contains("invalid socket address syntax") {
            let value = json.pointer(&pointer).and_then(Json::as_str).unwrap_or_default();
            return Problem::error(
                pointer,
                format!("`{value}` is not an `ip:port` address to listen on"),
            )
            .hint("write the IP address and the port, such as `0.0.0.0:3025` (all addresses) or `10.0.1.5:3025`; a host name is not an address to listen on");
        }
        Problem::error(pointer, message)
    })
}
