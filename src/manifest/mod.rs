//! Reading document files into a validated [`DesiredState`] plus located [`Diagnostic`]s.

mod checks;
pub mod diagnostic;
mod document;
pub mod files;
pub mod schema;
pub mod yaml;

use std::collections::BTreeMap;
use std::path::PathBuf;

use sha2::{Digest, Sha256};

pub use diagnostic::{Diagnostic, Location, Note, Severity};
pub use files::Input;

use crate::resource::{Document, Kind, ObjectRef, Problem};
use yaml::Node;

/// One object the documents ask for.
#[derive(Debug, Clone, PartialEq)]
pub struct Object {
    pub document: Document,
    /// Where the document starts.
    pub location: Location,
    /// SHA-256 (hex) of the object's canonical form: the decoded document with defaults applied,
    /// so comments, whitespace, key order and equivalent spellings (`60m`, `1h`) do not change it.
    pub hash: String,
    /// The document's text as written (comments included), for `tbotctl diff`.
    pub source: String,
}

/// The text of the document that contains 1-based `line`: from after the previous `---` line (so
/// its leading comments come along) to before the next `---` or `...` line.
pub fn document_text(text: &str, line: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let is_separator = |l: &&str| *l == "---" || l.starts_with("--- ") || *l == "...";
    let at = line.saturating_sub(1).min(lines.len());
    let start = lines[..at].iter().rposition(is_separator).map_or(0, |i| i + 1);
    let end = lines[at..]
        .iter()
        .position(is_separator)
        .map_or(lines.len(), |i| at + i);
    let mut out = lines[start..end].join("\n");
    out.push('\n');
    out
}

/// Everything the documents ask for, by object.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DesiredState {
    pub objects: BTreeMap<ObjectRef, Object>,
}

impl DesiredState {
    /// How many objects of each kind, in [`Kind::ALL`] order, leaving out kinds with none.
    pub fn counts(&self) -> Vec<(Kind, usize)> {
        Kind::ALL
            .into_iter()
            .map(|kind| (kind, self.objects.keys().filter(|r| r.kind == kind).count()))
            .filter(|(_, n)| *n > 0)
            .collect()
    }
}

/// The result of a load: the state built from every valid document, and every diagnostic.
#[derive(Debug, Clone, Default)]
pub struct Loaded {
    pub state: DesiredState,
    pub diagnostics: Vec<Diagnostic>,
    /// How many files were read.
    pub files: usize,
}

impl Loaded {
    pub fn has_errors(&self) -> bool {
        self.diagnostics.iter().any(Diagnostic::is_error)
    }
}

/// A document that decoded, with what the cross-document checks need to locate it.
pub(crate) struct Parsed {
    pub document: Document,
    pub node: Node,
    pub file: usize,
}

/// The files read during a load, for locating and quoting.
pub(crate) struct Sources {
    pub paths: Vec<PathBuf>,
    pub texts: Vec<String>,
}

impl Sources {
    /// A diagnostic for a problem found in a document of file `file`.
    pub fn diagnostic(&self, file: usize, root: &Node, problem: &Problem) -> Diagnostic {
        let (node, entry) = root.locate(&problem.pointer);
        let container = matches!(
            node.value,
            yaml::Value::Map(_) | yaml::Value::Seq(_) | yaml::Value::Null
        );
        let (pos, width) = match entry {
            Some(entry) if problem.on_key || container => (entry.key_pos, entry.key.chars().count()),
            _ => (node.pos, scalar_width(node)),
        };
        let location = Location::at(&self.paths[file], pos);
        let diagnostic = if problem.warning {
            Diagnostic::warning(location, &problem.message)
        } else {
            Diagnostic::error(location, &problem.message)
        };
        let text = &self.texts[file];
        let hint = problem
            .hint
            .as_ref()
            .map(|h| h.replace(schema::RAW, &raw_token(text, pos)));
        diagnostic.maybe_hint(hint).with_source(text, width)
    }
}

/// The plain scalar written at `pos`, as it appears in the file.
fn raw_token(text: &str, pos: yaml::Pos) -> String {
    let line = text
        .lines()
        .nth(pos.line.saturating_sub(1) as usize)
        .unwrap_or_default();
    line.chars()
        .skip(pos.column.saturating_sub(1) as usize)
        .take_while(|c| !c.is_whitespace() && !matches!(c, ',' | ']' | '}' | '#'))
        .collect()
}

fn scalar_width(node: &Node) -> usize {
    match &node.value {
        yaml::Value::String(s) if !s.contains('\n') => s.chars().count(),
        yaml::Value::Int(i) => i.to_string().len(),
        yaml::Value::UInt(u) => u.to_string().len(),
        yaml::Value::Bool(b) => b.to_string().len(),
        _ => 1,
    }
}

/// Loads the documents of the inputs. `Err` when an input directory cannot be read at all; every
/// other problem is a diagnostic and the rest still loads.
///
/// When any input is a directory the set must be complete (exactly one agent config); a set made
/// only of files (`-f`) may leave the agent config out.
pub fn load(inputs: &[Input]) -> Result<Loaded, Box<Diagnostic>> {
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("manifest-load".into())
            .stack_size(yaml::PARSE_STACK_BYTES)
            .spawn_scoped(scope, || load_here(inputs))
            .expect("a loader thread can be started")
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

fn load_here(inputs: &[Input]) -> Result<Loaded, Box<Diagnostic>> {
    let paths = files::discover(inputs)?;
    let mut sources = Sources {
        paths: Vec::new(),
        texts: Vec::new(),
    };
    let mut diagnostics = Vec::new();
    let mut parsed = Vec::new();
    for path in paths {
        let text = match files::read(&path) {
            Ok(text) => text,
            Err(diagnostic) => {
                diagnostics.push(*diagnostic);
                continue;
            }
        };
        let file = sources.paths.len();
        sources.paths.push(path.clone());
        sources.texts.push(text);
        let text = &sources.texts[file];
        let nodes = match yaml::parse(text) {
            Ok(nodes) => nodes,
            Err(err) => {
                diagnostics.push(
                    Diagnostic::error(Location::at(&path, err.pos), err.message)
                        .with_source(text, 1)
                        .hint("fix the YAML syntax, then run `tbotctl validate` again"),
                );
                continue;
            }
        };
        if nodes.is_empty() {
            diagnostics.push(
                Diagnostic::error(Location::file(&path), "the file holds no documents")
                    .hint("add a document, or delete the file"),
            );
        }
        for node in nodes {
            let (document, problems) = document::decode(&node);
            diagnostics.extend(problems.iter().map(|p| sources.diagnostic(file, &node, p)));
            if let Some(document) = document {
                parsed.push(Parsed { document, node, file });
            }
        }
    }
    let require_agent_config = inputs.iter().find_map(|i| match i {
        Input::Dir(dir) => Some(dir.clone()),
        Input::File(_) => None,
    });
    let outcome = checks::run(&parsed, &sources, require_agent_config.as_deref());
    diagnostics.extend(outcome.diagnostics);
    diagnostics.sort_by(|a, b| a.location.cmp(&b.location));
    let mut state = DesiredState::default();
    for (i, p) in parsed.into_iter().enumerate() {
        if outcome.shadowed.contains(&i) {
            continue;
        }
        let hash = canonical_hash(&p.document);
        let location = Location::at(&sources.paths[p.file], p.node.pos);
        let source = document_text(&sources.texts[p.file], p.node.pos.line as usize);
        state.objects.insert(
            p.document.object_ref(),
            Object {
                document: p.document,
                location,
                hash,
                source,
            },
        );
    }
    Ok(Loaded {
        state,
        diagnostics,
        files: sources.paths.len(),
    })
}

/// SHA-256 of the document's canonical JSON form.
pub fn canonical_hash(document: &Document) -> String {
    let canonical = serde_json::to_vec(&serde_json::to_value(document).expect("documents serialize"))
        .expect("JSON values serialize");
    Sha256::digest(&canonical).iter().map(|b| format!("{b:02x}")).collect()
}
