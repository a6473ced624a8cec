//! The one module that knows the YAML crate: it turns text into documents of positioned nodes.
//! Swapping the YAML crate touches this file only.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::{DuplicateKeyPolicy, SnippetMode, Spanned};

/// The deepest nesting of mappings and sequences a document may have.
pub const MAX_DEPTH: usize = 64;
/// Documents in one file, at most (a file is at most 1 MiB: some 10,000 small documents).
pub const MAX_DOCUMENTS: usize = 10_000;
/// Nodes (mappings, sequences and scalars, aliases expanded) in one file, at most.
pub const MAX_NODES: usize = 250_000;

/// The stack [`parse`] needs: the decoder recurses once per nesting level, and at [`MAX_DEPTH`] an
/// unoptimised build outgrows the 2 MiB of a spawned thread. Callers run it on a thread this big.
pub const PARSE_STACK_BYTES: usize = 32 * 1024 * 1024;

/// A 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Pos {
    pub line: u32,
    pub column: u32,
}

/// A value with the position where it starts.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub pos: Pos,
    pub value: Value,
}

/// A YAML value, after YAML 1.2 core-schema resolution of plain scalars.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    String(String),
    Seq(Vec<Node>),
    Map(Vec<Entry>),
}

/// One mapping entry; keys are scalars, held as their text.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub key: String,
    pub key_pos: Pos,
    pub value: Node,
}

/// Text that is not YAML, or YAML past our limits.
#[derive(Debug, Clone, PartialEq)]
pub struct SyntaxError {
    pub pos: Pos,
    pub message: String,
}

/// The lines of a document file as YAML counts them (and so as positions count them): a line ends
/// at LF, at CR LF, or at a lone CR. Like `str::lines`, a final line break adds no empty line.
pub fn source_lines(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = Some(text);
    std::iter::from_fn(move || {
        let t = rest?;
        match t.find(['\r', '\n']) {
            None => {
                rest = None;
                (!t.is_empty()).then_some(t)
            }
            Some(i) => {
                let skip = if t[i..].starts_with("\r\n") { 2 } else { 1 };
                rest = Some(&t[i + skip..]);
                Some(&t[..i])
            }
        }
    })
}

/// Parses every document of a file. Empty documents are skipped. Needs [`PARSE_STACK_BYTES`] of stack.
pub fn parse(text: &str) -> Result<Vec<Node>, SyntaxError> {
    let options = serde_saphyr::options! {
        budget: serde_saphyr::budget! { max_depth: MAX_DEPTH, max_documents: MAX_DOCUMENTS, max_nodes: MAX_NODES },
        duplicate_keys: DuplicateKeyPolicy::Error,
        strict_booleans: true,
        with_snippet: false,
    };
    serde_saphyr::from_multiple_with_options::<Node>(text, options).map_err(|err| {
        let pos = err
            .location()
            .map(|l| Pos {
                line: l.line() as u32,
                column: l.column() as u32,
            })
            .unwrap_or(Pos { line: 1, column: 1 });
        let rendered = err.render_with_options(serde_saphyr::render_options! { snippets: SnippetMode::Off });
        SyntaxError {
            pos,
            message: friendly(&rendered),
        }
    })
}

/// Rewords the parser's messages: drops its location prefix and explains budget breaches.
fn friendly(rendered: &str) -> String {
    let first = rendered.lines().next().unwrap_or(rendered);
    let mut text = first.strip_prefix("error: ").unwrap_or(first);
    if let Some((prefix, rest)) = text.split_once(": ")
        && prefix.starts_with("line ")
    {
        text = rest;
    }
    if let Some(i) = text.rfind(" at line ") {
        text = &text[..i];
    }
    if text.contains("budget breached: Depth") {
        return format!("the document nests deeper than {MAX_DEPTH} levels");
    }
    if text.contains("budget breached: Documents") {
        return format!("the file holds more than {MAX_DOCUMENTS} documents; split it into several files");
    }
    if text.contains("budget breached: Nodes") {
        return format!(
            "the file expands to more than {MAX_NODES} YAML nodes (mappings, lists and values, aliases expanded); \
             split it into several files, or use fewer aliases"
        );
    }
    if text.contains("budget breached") {
        let what = text.split("budget breached: ").nth(1).unwrap_or(text);
        let what = what.split([' ', '{', '(']).next().unwrap_or(what);
        return format!(
            "the file breaks the parser's `{what}` limit (aliases that repeat aliases, or too much in one file); \
             split it into several files"
        );
    }
    if let Some(key) = text.strip_prefix("duplicate mapping key: ") {
        let key = key.split(", set DuplicateKeyPolicy").next().unwrap_or(key);
        return format!("duplicate key `{key}`");
    }
    text.to_owned()
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let spanned = Spanned::<Value>::deserialize(d)?;
        let at = spanned.referenced;
        Ok(Node {
            pos: Pos {
                line: at.line() as u32,
                column: at.column() as u32,
            },
            value: spanned.value,
        })
    }
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ValueVisitor)
    }
}

struct ValueVisitor;

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        Value::deserialize(d)
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Int(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::UInt(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::Float(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<Value, E> {
        Err(E::custom("binary values are not supported; write text"))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Node>()? {
            items.push(item);
        }
        Ok(Value::Seq(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut entries = Vec::new();
        while let Some(key) = map.next_key::<Node>()? {
            let text = match key.value {
                Value::String(s) => s,
                Value::Bool(b) => b.to_string(),
                Value::Int(i) => i.to_string(),
                Value::UInt(u) => u.to_string(),
                Value::Float(f) => f.to_string(),
                Value::Null => "null".to_owned(),
                Value::Seq(_) | Value::Map(_) => {
                    return Err(de::Error::custom(
                        "a mapping key must be a plain value, not a list or a mapping",
                    ));
                }
            };
            let value = map.next_value::<Node>()?;
            entries.push(Entry {
                key: text,
                key_pos: key.pos,
                value,
            });
        }
        Ok(Value::Map(entries))
    }
}

impl Node {
    /// The value under `key`, when this node is a mapping.
    pub fn get(&self, key: &str) -> Option<&Entry> {
        match &self.value {
            Value::Map(entries) => entries.iter().find(|e| e.key == key),
            _ => None,
        }
    }

    /// What this node is, in words (`a mapping`, `a list`, `a string`).
    pub fn describe(&self) -> &'static str {
        match self.value {
            Value::Null => "empty (null)",
            Value::Bool(_) => "a boolean",
            Value::Int(_) | Value::UInt(_) => "an integer",
            Value::Float(_) => "a number",
            Value::String(_) => "a string",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }

    /// Follows a JSON pointer (`/spec/roles/0`). Returns the deepest node reached and, when the
    /// pointer ends at a mapping entry, that entry (so that callers can point at its key).
    pub fn locate(&self, pointer: &str) -> (&Node, Option<&Entry>) {
        let mut node = self;
        let mut entry = None;
        for raw in pointer.split('/').skip(1) {
            let segment = raw.replace("~1", "/").replace("~0", "~");
            let next = match &node.value {
                Value::Map(entries) => entries.iter().find(|e| e.key == segment).map(|e| (&e.value, Some(e))),
                Value::Seq(items) => segment
                    .parse::<usize>()
                    .ok()
                    .and_then(|i| items.get(i))
                    .map(|n| (n, None)),
                _ => None,
            };
            match next {
                Some((n, e)) => {
                    node = n;
                    entry = e;
                }
                None => break,
            }
        }
        (node, entry)
    }

    /// The node as JSON, for schema validation and typed decoding. Floats that JSON cannot hold
    /// become null.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value as J;
        match &self.value {
            Value::Null => J::Null,
            Value::Bool(b) => J::Bool(*b),
            Value::Int(i) => J::from(*i),
            Value::UInt(u) => J::from(*u),
            Value::Float(f) => serde_json::Number::from_f64(*f).map_or(J::Null, J::Number),
            Value::String(s) => J::String(s.clone()),
            Value::Seq(items) => J::Array(items.iter().map(Node::to_json).collect()),
            Value::Map(entries) => J::Object(entries.iter().map(|e| (e.key.clone(), e.value.to_json())).collect()),
        }
    }
}

/// Renders a value as YAML (for `tbotctl get -o yaml`).
pub fn to_string<T: serde::Serialize>(value: &T) -> Result<String, String> {
    serde_saphyr::to_string(value).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_end_where_yaml_says_so_lone_carriage_returns_included() {
        let lines = |t| source_lines(t).collect::<Vec<_>>();
        assert_eq!(lines("a\nb\r\nc\rd"), ["a", "b", "c", "d"]);
        assert_eq!(lines("a\n"), ["a"]);
        assert_eq!(lines("\n\n"), ["", ""]);
        assert!(lines("").is_empty());
        // The parser agrees: after a lone CR, `name` is on line 2.
        let docs = parse("kind: bot\rname: x\n").unwrap();
        assert_eq!(docs[0].get("name").unwrap().key_pos.line, 2);
    }

    #[test]
    fn positions_point_at_keys_and_values() {
        let docs = parse("kind: bot\nmetadata:\n  name: x\n---\nfoo: 1\n").unwrap();
        assert_eq!(docs.len(), 2);
        let name = docs[0].get("metadata").unwrap().value.get("name").unwrap();
        assert_eq!(name.key_pos, Pos { line: 3, column: 3 });
        assert_eq!(name.value.pos, Pos { line: 3, column: 9 });
        assert_eq!(docs[1].get("foo").unwrap().key_pos.line, 5);
    }

    #[test]
    fn yaml_1_2_scalars_resolve_as_the_core_schema_says() {
        let doc = &parse("a: yes\nb: true\nc: 012\nd: ~\ne: '1'\n").unwrap()[0];
        assert_eq!(doc.get("a").unwrap().value.value, Value::String("yes".into()));
        assert_eq!(doc.get("b").unwrap().value.value, Value::Bool(true));
        assert_eq!(doc.get("d").unwrap().value.value, Value::Null);
        assert_eq!(doc.get("e").unwrap().value.value, Value::String("1".into()));
    }

    #[test]
    fn duplicate_keys_are_errors_at_the_second_key() {
        let err = parse("a: 1\nb: 2\na: 3\n").unwrap_err();
        assert_eq!(err.pos.line, 3);
        assert_eq!(err.message, "duplicate key `a`");
    }

    fn parse_on_a_big_stack(text: String) -> Result<Vec<Node>, SyntaxError> {
        std::thread::Builder::new()
            .stack_size(PARSE_STACK_BYTES)
            .spawn(move || parse(&text))
            .unwrap()
            .join()
            .unwrap()
    }

    #[test]
    fn nesting_past_the_limit_is_an_error_not_a_crash() {
        let text = format!("a: {}{}", "[".repeat(200), "]".repeat(200));
        assert!(
            parse_on_a_big_stack(text)
                .unwrap_err()
                .message
                .contains("deeper than 64")
        );
    }

    #[test]
    fn nesting_up_to_the_limit_parses() {
        let depth = MAX_DEPTH - 1;
        let text = format!("a: {}{}", "[".repeat(depth), "]".repeat(depth));
        assert!(parse_on_a_big_stack(text).is_ok());
    }

    #[test]
    fn json_pointers_find_nested_nodes() {
        let doc = &parse("spec:\n  roles:\n  - a\n  - b\n").unwrap()[0];
        let (node, _) = doc.locate("/spec/roles/1");
        assert_eq!(node.pos, Pos { line: 4, column: 5 });
        let (_, entry) = doc.locate("/spec/roles");
        assert_eq!(entry.unwrap().key_pos, Pos { line: 2, column: 3 });
    }
}
