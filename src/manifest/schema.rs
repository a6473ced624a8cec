//! JSON Schemas of the kinds (generated from the types) and validation of a document against its
//! kind's schema, with every error turned into a located, worded [`Problem`].

use std::collections::BTreeMap;
use std::sync::LazyLock;

use jsonschema::error::{TypeKind, ValidationErrorKind};
use serde_json::Value;

use crate::resource::workload_identity::escape_pointer;
use crate::resource::{FORMATS, Kind, Problem, closest};

/// Stands in a hint for the value's text as written in the file; the loader fills it in.
pub const RAW: &str = "{raw}";

/// The JSON Schema of a kind, as committed under `schemas/`.
pub fn schema(kind: Kind) -> Value {
    let mut schema = kind.schema().to_value();
    if let Value::Object(map) = &mut schema {
        map.insert(
            "$id".into(),
            Value::String(format!("https://tbot.dev/schemas/{kind}.schema.json")),
        );
    }
    schema
}

struct Compiled {
    schema: Value,
    validator: jsonschema::Validator,
}

static COMPILED: LazyLock<BTreeMap<Kind, Compiled>> = LazyLock::new(|| {
    Kind::ALL
        .into_iter()
        .map(|kind| {
            let schema = schema(kind);
            let mut options = jsonschema::options().should_validate_formats(true);
            for (name, check) in FORMATS {
                options = options.with_format(name, move |s: &str| check(s).is_ok());
            }
            let validator = options
                .build(&schema)
                .expect("generated schemas are valid JSON Schemas");
            (kind, Compiled { schema, validator })
        })
        .collect()
});

/// Validates a document against its kind's schema. Returns every problem found.
pub fn validate(kind: Kind, instance: &Value) -> Vec<Problem> {
    let compiled = &COMPILED[&kind];
    let mut out = Vec::new();
    for error in compiled.validator.iter_errors(instance) {
        let pointer = error.instance_path().as_str().to_owned();
        let schema_path = error.schema_path().as_str().to_owned();
        describe(
            &mut out,
            &compiled.schema,
            &pointer,
            &schema_path,
            error.kind(),
            error.instance(),
        );
    }
    // A field named far from its real name (`url:` for `bundle_endpoint_url`) shows up as one unknown
    // and one missing field of the same mapping: that pair is one mistake, a rename.
    pair_renames(&mut out);
    // A misspelt field also shows up as a missing one: the "did you mean" says it all.
    let misspelt: Vec<String> = out
        .iter()
        .filter(|p| p.on_key)
        .filter_map(|p| {
            let near = p.hint.as_deref()?.strip_prefix("did you mean `")?.split('`').next()?;
            let parent = &p.pointer[..p.pointer.rfind('/')?];
            Some(format!("{parent}\u{0}missing field `{near}`"))
        })
        .collect();
    out.retain(|p| !misspelt.contains(&format!("{}\u{0}{}", p.pointer, p.message)));
    // A cluster's name is its trust domain: say so, with the trust domain's own rules.
    if kind == Kind::Cluster
        && let Some(Value::String(name)) = instance.pointer("/metadata/name")
        && let Err(why) = crate::resource::spiffe_id::TrustDomain::parse(name)
    {
        for problem in out.iter_mut().filter(|p| p.pointer == "/metadata/name") {
            problem.message = why.clone();
            problem.hint = Some("the cluster's name is its trust domain: rename it".into());
        }
    }
    for problem in out.iter_mut().filter(|p| p.hint.is_none()) {
        problem.hint = Some(format!(
            "`tbotctl schema {kind}` shows what each field of this document accepts"
        ));
    }
    out
}

/// Where a mapping has exactly one unknown field with no near name and exactly one missing field,
/// the unknown one is taken for the missing one under another name: its hint says which, and the
/// missing-field problem goes (the unknown field, at its own line, is the root cause).
fn pair_renames(out: &mut Vec<Problem>) {
    let parent_of = |p: &Problem| p.pointer.rfind('/').map(|i| p.pointer[..i].to_owned());
    let unknown_without_near = |p: &Problem| {
        p.on_key
            && p.message.starts_with("unknown field")
            && !p.hint.as_deref().is_some_and(|h| h.starts_with("did you mean"))
    };
    let mut renamed = Vec::new();
    for i in 0..out.len() {
        if !unknown_without_near(&out[i]) {
            continue;
        }
        let Some(parent) = parent_of(&out[i]) else { continue };
        let unknowns = out
            .iter()
            .filter(|p| p.on_key && p.message.starts_with("unknown field") && parent_of(p).as_deref() == Some(&parent))
            .count();
        let missing: Vec<usize> = (0..out.len())
            .filter(|&j| out[j].pointer == parent && out[j].message.starts_with("missing field `"))
            .collect();
        if unknowns != 1 || missing.len() != 1 {
            continue;
        }
        let field = out[missing[0]].message["missing field `".len()..]
            .trim_end_matches('`')
            .to_owned();
        let listing = out[i].hint.take().unwrap_or_default();
        out[i].hint = Some(format!(
            "did you mean `{field}`? It is required here and missing{}",
            if listing.is_empty() {
                String::new()
            } else {
                format!(" ({listing})")
            }
        ));
        renamed.push(missing[0]);
    }
    let mut index = 0;
    out.retain(|_| {
        index += 1;
        !renamed.contains(&(index - 1))
    });
}

fn describe(
    out: &mut Vec<Problem>,
    root: &Value,
    pointer: &str,
    schema_path: &str,
    kind: &ValidationErrorKind,
    instance: &Value,
) {
    let problem = match kind {
        ValidationErrorKind::AdditionalProperties { unexpected } => {
            let known = known_fields(root, schema_path);
            for field in unexpected {
                let mut problem = Problem::error(
                    format!("{pointer}/{}", escape_pointer(field)),
                    format!("unknown field `{field}`"),
                );
                problem.on_key = true;
                let listing = format!(
                    "the fields here are {}",
                    known.iter().map(|f| format!("`{f}`")).collect::<Vec<_>>().join(", ")
                );
                problem.hint = Some(match closest(field, known.iter().map(String::as_str)) {
                    Some(near) => format!("did you mean `{near}`? ({listing})"),
                    None if known.is_empty() => "remove it".into(),
                    None => listing,
                });
                out.push(problem);
            }
            return;
        }
        ValidationErrorKind::Required { property } => {
            let field = property.as_str().unwrap_or_default();
            Problem::error(pointer, format!("missing field `{field}`")).hint(format!("add `{field}:`"))
        }
        ValidationErrorKind::Type { kind } => {
            let expected = match kind {
                TypeKind::Single(t) => article(&t.to_string()),
                TypeKind::Multiple(set) => set
                    .iter()
                    .map(|t| article(&t.to_string()))
                    .collect::<Vec<_>>()
                    .join(" or "),
            };
            let format = keyword_parent(root, schema_path)
                .and_then(|node| node.get("format"))
                .and_then(Value::as_str);
            if format == Some("tbot-duration") && matches!(instance, Value::Number(_)) {
                // `renewal_interval: 20`: quoting it would still be wrong; it needs a unit.
                out.push(
                    Problem::error(
                        pointer,
                        format!("expected a duration, found {}: a duration needs a unit", describe_value(instance)),
                    )
                    .hint(format!(
                        "write it with a unit, such as `{RAW}s`, `{RAW}m` or `{RAW}h` (Go's syntax: `90s`, `20m`, `1h30m`)"
                    )),
                );
                return;
            }
            let mut problem = Problem::error(
                pointer,
                format!("expected {expected}, found {}", describe_value(instance)),
            );
            if expected == "a string" && matches!(instance, Value::Number(_) | Value::Bool(_)) {
                problem = problem.hint(format!(
                    "quote it: \"{RAW}\" (unquoted, YAML reads it as a number or boolean)"
                ));
            }
            problem
        }
        ValidationErrorKind::Enum { options } => {
            let options: Vec<&str> = options
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            not_one_of(pointer, instance, &options)
        }
        ValidationErrorKind::Format { format } => {
            let reason = FORMATS
                .iter()
                .find(|(name, _)| name == format)
                .and_then(|(_, check)| check(instance.as_str()?).err())
                .unwrap_or_else(|| format!("{instance} is not a valid `{format}`"));
            Problem::error(pointer, reason)
        }
        ValidationErrorKind::AnyOf { context } | ValidationErrorKind::OneOfNotValid { context }
            if !constants(context).is_empty() =>
        {
            let options = constants(context);
            not_one_of(
                pointer,
                instance,
                &options.iter().map(String::as_str).collect::<Vec<_>>(),
            )
        }
        ValidationErrorKind::AnyOf { context } | ValidationErrorKind::OneOfNotValid { context } => {
            // An optional field is "the type, or null": report the type's own errors.
            let typed: Vec<_> = context.iter().filter(|branch| !is_null_branch(branch)).collect();
            if let [branch] = typed.as_slice() {
                for e in branch.iter() {
                    describe(
                        out,
                        root,
                        e.instance_path().as_str(),
                        e.schema_path().as_str(),
                        e.kind(),
                        e.instance(),
                    );
                }
                return;
            }
            Problem::error(
                pointer,
                format!("{} does not have any of the accepted shapes", describe_value(instance)),
            )
            .hint(context_hint(context))
        }
        ValidationErrorKind::MinItems { limit } if *limit == 1 => {
            Problem::error(pointer, "the list is empty").hint("add at least one entry, or remove the field")
        }
        _ => Problem::error(pointer, error_text(kind, instance)),
    };
    out.push(problem);
}

fn not_one_of(pointer: &str, instance: &Value, options: &[&str]) -> Problem {
    let listing = options.iter().map(|o| format!("`{o}`")).collect::<Vec<_>>().join(", ");
    let given = instance
        .as_str()
        .map_or_else(|| describe_value(instance), |s| format!("`{s}`"));
    let problem = Problem::error(pointer, format!("{given} is not one of {listing}"));
    match instance.as_str().and_then(|s| closest(s, options.iter().copied())) {
        Some(near) => problem.hint(format!("did you mean `{near}`?")),
        None => problem,
    }
}

/// The allowed values when every branch of a `oneOf`/`anyOf` is a `const` (documented enums).
fn constants(context: &[Vec<jsonschema::ValidationError<'static>>]) -> Vec<String> {
    let values: Vec<String> = context
        .iter()
        .filter_map(|branch| match branch.as_slice() {
            [e] => match e.kind() {
                ValidationErrorKind::Constant { expected_value } => expected_value.as_str().map(str::to_owned),
                _ => None,
            },
            _ => None,
        })
        .collect();
    if values.len() == context.len() {
        values
    } else {
        Vec::new()
    }
}

fn is_null_branch(branch: &[jsonschema::ValidationError<'static>]) -> bool {
    matches!(branch, [e] if matches!(e.kind(), ValidationErrorKind::Type { kind: TypeKind::Single(t) } if t.to_string() == "null"))
}

fn error_text(kind: &ValidationErrorKind, instance: &Value) -> String {
    match kind {
        ValidationErrorKind::Pattern { pattern } => format!("{instance} does not match `{pattern}`"),
        ValidationErrorKind::MinLength { limit } => format!("{instance} is shorter than {limit} characters"),
        ValidationErrorKind::MaxLength { limit } => format!("{instance} is longer than {limit} characters"),
        ValidationErrorKind::Minimum { limit } => format!("{instance} is less than {limit}"),
        other => format!("{instance} is not valid here ({})", other.keyword()),
    }
}

fn context_hint(context: &[Vec<jsonschema::ValidationError<'static>>]) -> String {
    let shapes: Vec<String> = context
        .iter()
        .filter_map(|branch| {
            branch.iter().find_map(|e| match e.kind() {
                ValidationErrorKind::Type {
                    kind: TypeKind::Single(t),
                } => Some(article(&t.to_string())),
                _ => None,
            })
        })
        .collect();
    if shapes.is_empty() {
        "see `tbotctl schema` for the accepted forms".into()
    } else {
        format!("write {}", shapes.join(" or "))
    }
}

fn article(json_type: &str) -> String {
    match json_type {
        "object" => "a mapping".into(),
        "array" => "a list".into(),
        "integer" => "an integer".into(),
        "null" => "nothing (null)".into(),
        other => format!("a {other}"),
    }
}

fn describe_value(value: &Value) -> String {
    match value {
        Value::Null => "nothing (null)".into(),
        Value::Bool(b) => format!("a boolean ({b})"),
        Value::Number(_) => "a number".into(),
        Value::String(s) if s.chars().count() <= 40 => format!("a string (\"{s}\")"),
        Value::String(_) => "a string".into(),
        Value::Array(_) => "a list".into(),
        Value::Object(_) => "a mapping".into(),
    }
}

/// The property names of the schema object that owns `schema_path` (which ends in
/// `/additionalProperties`), following `$ref`s on the way.
fn known_fields(root: &Value, schema_path: &str) -> Vec<String> {
    keyword_parent(root, schema_path)
        .and_then(|node| node.get("properties"))
        .and_then(Value::as_object)
        .map(|props| props.keys().cloned().collect())
        .unwrap_or_default()
}

/// The schema node that holds the keyword `schema_path` ends in, with `$ref`s followed.
fn keyword_parent<'a>(root: &'a Value, schema_path: &str) -> Option<&'a Value> {
    let mut node = root;
    let segments: Vec<&str> = schema_path.split('/').skip(1).collect();
    for segment in &segments[..segments.len().saturating_sub(1)] {
        let segment = segment.replace("~1", "/").replace("~0", "~");
        node = match node.get(&segment) {
            Some(Value::String(reference)) if segment == "$ref" => {
                reference.strip_prefix('#').and_then(|p| root.pointer(p))?
            }
            Some(next) => next,
            None => return None,
        };
    }
    if let Some(Value::String(reference)) = node.get("$ref")
        && let Some(target) = reference.strip_prefix('#').and_then(|p| root.pointer(p))
    {
        node = target;
    }
    Some(node)
}
