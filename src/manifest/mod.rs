//! Reading document files into a validated [`DesiredState`] plus located [`Diagnostic`]s.

pub mod changes;
mod checks;
pub mod diagnostic;
mod document;
pub mod files;
mod patch;
pub mod render;
pub mod schema;
pub mod yaml;

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

pub use changes::Changes;
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
    /// The `workload.*` attributes a `workload_identity`'s rules and templates read (sorted; empty
    /// for other kinds), worked out once: the checks, label selection and every issuance record ask.
    pub reads: Vec<String>,
    /// A `workload_identity`'s JWT claim templates, parsed once (by their text, sorted): every
    /// JWT-SVID renders them.
    pub claim_templates: Vec<(String, crate::resource::template::Template)>,
}

impl Object {
    pub fn new(document: Document, location: Location, hash: String, source: String) -> Object {
        let (reads, claim_templates) = match &document {
            Document::WorkloadIdentity(wi) => (wi.workload_attributes_read(), wi.parse_claim_templates()),
            _ => (Vec::new(), Vec::new()),
        };
        Object {
            document,
            location,
            hash,
            source,
            reads,
            claim_templates,
        }
    }
}

/// The text of the document that contains 1-based `line`: from after the previous `---` line (so
/// its leading comments come along) to before the next `---` or `...` line.
pub fn document_text(text: &str, line: usize) -> String {
    let lines: Vec<&str> = yaml::source_lines(text).collect();
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
    pub objects: BTreeMap<ObjectRef, Arc<Object>>,
}

impl DesiredState {
    /// The objects of one kind, in name order, found without walking the others.
    pub fn of_kind(&self, kind: Kind) -> impl Iterator<Item = (&ObjectRef, &Arc<Object>)> {
        self.objects
            .range(ObjectRef::new(kind, String::new())..)
            .take_while(move |(r, _)| r.kind == kind)
    }

    /// The kinds that have objects, in [`Kind::ALL`] order.
    pub fn kinds(&self) -> impl Iterator<Item = Kind> + '_ {
        Kind::ALL
            .into_iter()
            .filter(|&kind| self.of_kind(kind).next().is_some())
    }

    /// How many objects of each kind, in [`Kind::ALL`] order, leaving out kinds with none.
    pub fn counts(&self) -> Vec<(Kind, usize)> {
        Kind::ALL
            .into_iter()
            .map(|kind| (kind, self.of_kind(kind).count()))
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
    /// Whether this load was patched into the last one (see `manifest::patch`), for the debug log.
    pub patched: bool,
}

impl Loaded {
    pub fn has_errors(&self) -> bool {
        self.diagnostics.iter().any(Diagnostic::is_error)
    }
}

/// A document that decoded, with what the cross-document checks need to locate it.
pub(crate) struct Parsed<'a> {
    pub document: &'a Document,
    pub node: &'a Node,
    pub file: usize,
    /// The `workload.*` attributes a `workload_identity` reads (empty for other kinds), worked out
    /// once when its file is parsed: the checks ask for it on every reload.
    pub workload_reads: &'a [String],
}

/// The files read during a load, for locating and quoting.
pub(crate) struct Sources<'a> {
    pub paths: Vec<&'a Path>,
    pub texts: Vec<&'a str>,
}

impl Sources<'_> {
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
        let location = Location::at(self.paths[file], pos);
        let diagnostic = if problem.warning {
            Diagnostic::warning(location, &problem.message)
        } else {
            Diagnostic::error(location, &problem.message)
        };
        let text = self.texts[file];
        let hint = problem
            .hint
            .as_ref()
            .map(|h| h.replace(schema::RAW, &raw_token(text, pos)));
        diagnostic.maybe_hint(hint).with_source(text, width)
    }
}

/// The plain scalar written at `pos`, as it appears in the file.
fn raw_token(text: &str, pos: yaml::Pos) -> String {
    let line = yaml::source_lines(text)
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
    load_with(inputs, &mut LoadCache::default())
}

/// [`load`], re-reading and re-parsing only the files that changed since the load that filled
/// `cache`: a reload of a directory of 10,000 documents after one edit parses one file. The
/// cross-document checks always run over everything.
pub fn load_with(inputs: &[Input], cache: &mut LoadCache) -> Result<Loaded, Box<Diagnostic>> {
    on_loader_thread(|| load_here(inputs, cache))
}

/// [`load_with`] after the watcher said what changed: only those paths are read again (and listed
/// or unlisted); every other file is taken from `cache` without being examined. Falls back to a
/// full load when `changes` cannot be trusted alone (see [`changes::classify`]) or nothing was
/// listed yet.
pub fn load_changed(inputs: &[Input], cache: &mut LoadCache, changes: &Changes) -> Result<Loaded, Box<Diagnostic>> {
    on_loader_thread(|| {
        // Taken out: updated in place, and left out (so the next load lists everything) if this
        // one fails.
        let mut listing = cache.listed.take();
        let reread = match (changes, &mut listing) {
            (Changes::Paths(paths), Some(listing)) if !cache.links => changes::relist(inputs, listing, paths),
            _ => None,
        };
        match (listing, reread) {
            (Some(listing), Some(reread)) => match patch::patch(cache, &reread) {
                Some(loaded) => {
                    cache.listed = Some(listing);
                    Ok(loaded)
                }
                None => load_listing(inputs, cache, listing, Some(&reread)),
            },
            _ => load_here(inputs, cache),
        }
    })
}

/// Runs `f` on a thread with the stack the YAML decoder needs (see [`yaml::PARSE_STACK_BYTES`]).
fn on_loader_thread<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("manifest-load".into())
            .stack_size(yaml::PARSE_STACK_BYTES)
            .spawn_scoped(scope, f)
            .expect("a loader thread can be started")
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// What earlier loads read, by file.
#[derive(Default)]
pub struct LoadCache {
    files: HashMap<PathBuf, Arc<ReadFile>, foldhash::fast::RandomState>,
    /// The document files the last load found, by input (`None` until a load listed them).
    listed: Option<Vec<(usize, PathBuf)>>,
    /// Whether one of them is a symlink: then every event lists everything again.
    links: bool,
    /// What the last load made of them, for an edit that can be patched in.
    assembled: Option<patch::Assembled>,
}

/// Identifies one version of a file without reading it. Every write moves `ctime`, and a rename
/// over the file changes `ino`.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    /// For text that did not come from a file on disk (or whose file could not be examined).
    const UNKNOWN: Stamp = Stamp {
        dev: 0,
        ino: 0,
        size: u64::MAX,
        mtime: (0, 0),
        ctime: (0, 0),
    };

    fn of(meta: &std::fs::Metadata) -> Stamp {
        Stamp {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

/// File timestamps tick with the kernel's coarse clock, so a file changed within this long of
/// being read could change again without its stamp moving; such a file is compared by content.
const RACY: Duration = Duration::from_secs(2);

/// One file as read and parsed.
struct ReadFile {
    stamp: Stamp,
    /// Changed so recently that the stamp alone cannot vouch for the text (see [`RACY`]).
    racy: bool,
    text: String,
    diagnostics: Arc<Vec<Diagnostic>>,
    documents: Arc<Vec<ReadDocument>>,
    /// The documents of this file that failed to load: what they might have defined.
    unloaded: Arc<Vec<Unloaded>>,
}

/// A document that failed to load, as far as it can be made out: the cross-document checks do not
/// report what it might have defined as missing (a cascade from the one root cause).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Unloaded {
    /// `None` when the kind cannot be read (a syntax error, an unreadable file): any kind.
    pub kind: Option<Kind>,
    /// `None` when `metadata.name` cannot be read: any name.
    pub name: Option<String>,
}

impl Unloaded {
    const ANYTHING: Unloaded = Unloaded { kind: None, name: None };

    /// Whether this document might have been `kind`/`name` (`name` `None`: any of the kind).
    pub fn might_be(&self, kind: Kind, name: Option<&str>) -> bool {
        self.kind.is_none_or(|k| k == kind) && (name.is_none() || self.name.is_none() || self.name.as_deref() == name)
    }

    fn of(node: &Node) -> Unloaded {
        let name = node
            .get("metadata")
            .and_then(|m| m.value.get("name"))
            .and_then(|n| match &n.value.value {
                yaml::Value::String(s) => Some(s.clone()),
                _ => None,
            });
        let kind = document::kind_of(node).ok();
        Unloaded { kind, name }
    }
}

struct ReadDocument {
    object: Arc<Object>,
    node: Node,
}

fn is_racy(meta: &std::fs::Metadata) -> bool {
    let at = |secs: i64, nanos: i64| match u64::try_from(secs) {
        Ok(secs) => SystemTime::UNIX_EPOCH + Duration::new(secs, nanos as u32),
        Err(_) => SystemTime::UNIX_EPOCH,
    };
    let changed = at(meta.ctime(), meta.ctime_nsec()).max(at(meta.mtime(), meta.mtime_nsec()));
    // A timestamp in the future is racy too (`duration_since` fails).
    !matches!(SystemTime::now().duration_since(changed), Ok(age) if age >= RACY)
}

/// Parses one file's text into its documents and the diagnostics that concern it alone.
fn parse_file(path: &Path, stamp: Stamp, racy: bool, text: String) -> ReadFile {
    let (diagnostics, documents, unloaded) = parse_text(path, &text);
    ReadFile {
        stamp,
        racy,
        text,
        diagnostics: Arc::new(diagnostics),
        documents: Arc::new(documents),
        unloaded: Arc::new(unloaded),
    }
}

fn parse_text(path: &Path, text: &str) -> (Vec<Diagnostic>, Vec<ReadDocument>, Vec<Unloaded>) {
    let mut diagnostics = Vec::new();
    let mut documents = Vec::new();
    let mut unloaded = Vec::new();
    let nodes = match yaml::parse(text) {
        Ok(nodes) => nodes,
        Err(err) => {
            diagnostics.push(
                Diagnostic::error(Location::at(path, err.pos), err.message)
                    .with_source(text, 1)
                    .hint("fix the YAML syntax, then run `tbotctl validate` again"),
            );
            return (diagnostics, documents, vec![Unloaded::ANYTHING]);
        }
    };
    if nodes.is_empty() {
        diagnostics.push(
            Diagnostic::error(Location::file(path), "the file holds no documents")
                .hint("add a document, or delete the file"),
        );
    }
    let sources = Sources {
        paths: vec![path],
        texts: vec![text],
    };
    for node in nodes {
        let (document, problems) = document::decode(&node);
        diagnostics.extend(problems.iter().map(|p| sources.diagnostic(0, &node, p)));
        if document.is_none() && problems.iter().any(|p| !p.warning) {
            unloaded.push(Unloaded::of(&node));
        }
        if let Some(document) = document {
            let hash = canonical_hash(&document);
            let source = document_text(text, node.pos.line as usize);
            let object = Object::new(document, Location::at(path, node.pos), hash, source);
            documents.push(ReadDocument {
                object: Arc::new(object),
                node,
            });
        }
    }
    (diagnostics, documents, unloaded)
}

/// The file at `path`: from the cache when its stamp (and, for a racy entry, its text) is unchanged.
fn read_file(path: &Path, cache: &LoadCache) -> Result<Arc<ReadFile>, Box<Diagnostic>> {
    let meta = std::fs::metadata(path).ok();
    let cached = cache.files.get(path);
    if let (Some(meta), Some(cached)) = (&meta, cached)
        && cached.stamp == Stamp::of(meta)
        && !cached.racy
    {
        return Ok(cached.clone());
    }
    let text = files::read(path)?;
    let Some(meta) = meta else {
        // Readable now though it could not be examined a moment ago: never trusted.
        return Ok(Arc::new(parse_file(path, Stamp::UNKNOWN, true, text)));
    };
    let stamp = Stamp::of(&meta);
    let racy = is_racy(&meta);
    if let Some(cached) = cached
        && cached.stamp == stamp
        && cached.text == text
    {
        // The same text: keep the parse (and drop the flag once the file is no longer racy).
        return Ok(Arc::new(ReadFile {
            stamp,
            racy,
            text,
            diagnostics: cached.diagnostics.clone(),
            documents: cached.documents.clone(),
            unloaded: cached.unloaded.clone(),
        }));
    }
    Ok(Arc::new(parse_file(path, stamp, racy, text)))
}

fn load_here(inputs: &[Input], cache: &mut LoadCache) -> Result<Loaded, Box<Diagnostic>> {
    cache.assembled = None;
    let listing = files::listing(inputs)?;
    cache.links = listing.links;
    load_listing(inputs, cache, listing.files, None)
}

/// Loads the files of `listing`. `changed: None` examines every file (its stamp vouches for the
/// cached parse); `Some` reads only those paths and takes every other cached file as it is.
fn load_listing(
    inputs: &[Input],
    cache: &mut LoadCache,
    listing: Vec<(usize, PathBuf)>,
    changed: Option<&std::collections::BTreeSet<PathBuf>>,
) -> Result<Loaded, Box<Diagnostic>> {
    let mut diagnostics = Vec::new();
    let mut read = Vec::with_capacity(listing.len());
    // A file that cannot be read might have defined anything.
    let mut unloaded = Vec::new();
    for (_, path) in &listing {
        let cached = match changed {
            Some(changed) if !changed.contains(path) => cache.files.get(path).cloned(),
            _ => None,
        };
        match cached.map_or_else(|| read_file(path, cache), Ok) {
            // Borrowed from the listing: a reload of 10,000 files copies no path.
            Ok(file) => read.push((path.as_path(), file)),
            Err(diagnostic) => {
                diagnostics.push(*diagnostic);
                unloaded.push(Unloaded::ANYTHING);
            }
        }
    }
    let require_agent_config = inputs.iter().find_map(|i| match i {
        Input::Dir(dir) => Some(dir.clone()),
        Input::File(_) => None,
    });
    let (loaded, cross) = assemble(&read, diagnostics, unloaded, require_agent_config.as_deref());
    cache.assembled = Some(patch::Assembled {
        state: loaded.state.clone(),
        diagnostics: loaded.diagnostics.clone(),
        files: loaded.files,
        cross,
    });
    match changed {
        // Only the changed entries move (a file leaves the listing only by changing); the rest of
        // the cache is what was just used.
        Some(changed) => {
            for path in changed {
                cache.files.remove(path);
            }
            cache.files.extend(
                read.into_iter()
                    .filter(|(p, _)| changed.contains(*p))
                    .map(|(p, f)| (p.to_owned(), f)),
            );
        }
        None => cache.files = read.into_iter().map(|(p, f)| (p.to_owned(), f)).collect(),
    }
    cache.listed = Some(listing);
    Ok(loaded)
}

/// Loads one file's bytes as if read from `path`, without touching the file system: the whole
/// pipeline (UTF-8, YAML, schema, typed decode, cross-document checks) for a set of loose files.
/// What the fuzz target `load` drives.
pub fn load_bytes(path: &Path, bytes: Vec<u8>) -> Loaded {
    let run = || match files::utf8(path, bytes) {
        Err(diagnostic) => Loaded {
            diagnostics: vec![*diagnostic],
            ..Loaded::default()
        },
        Ok(text) => {
            let file = Arc::new(parse_file(path, Stamp::UNKNOWN, true, text));
            assemble(&[(path, file)], Vec::new(), Vec::new(), None).0
        }
    };
    on_loader_thread(run)
}

/// The state and diagnostics of files already read and parsed, and the files the cross-document
/// diagnostics point into.
fn assemble(
    read: &[(&Path, Arc<ReadFile>)],
    mut diagnostics: Vec<Diagnostic>,
    mut unloaded: Vec<Unloaded>,
    complete_dir: Option<&Path>,
) -> (Loaded, std::collections::HashSet<PathBuf, foldhash::fast::RandomState>) {
    let sources = Sources {
        paths: read.iter().map(|(p, _)| *p).collect(),
        texts: read.iter().map(|(_, f)| f.text.as_str()).collect(),
    };
    let mut parsed = Vec::new();
    for (file, (_, f)) in read.iter().enumerate() {
        diagnostics.extend(f.diagnostics.iter().cloned());
        unloaded.extend(f.unloaded.iter().cloned());
        parsed.extend(f.documents.iter().map(|d| Parsed {
            document: &d.object.document,
            node: &d.node,
            file,
            workload_reads: &d.object.reads,
        }));
    }
    let outcome = checks::run(&parsed, &sources, &unloaded, complete_dir);
    let cross = patch::cross_paths(&outcome.diagnostics);
    diagnostics.extend(outcome.diagnostics);
    diagnostics.sort_by(|a, b| a.location.cmp(&b.location));
    // Built in one go (sorted, then bulk-loaded) rather than by 10,000 inserts; of two documents
    // with one name the later wins, as an insert would have it (the checks shadow the others).
    let documents = read.iter().flat_map(|(_, f)| f.documents.iter());
    let state = DesiredState {
        objects: documents
            .enumerate()
            .filter(|(i, _)| !outcome.shadowed.contains(i))
            .map(|(_, d)| (d.object.document.object_ref(), d.object.clone()))
            .collect(),
    };
    let loaded = Loaded {
        state,
        diagnostics,
        files: read.len(),
        patched: false,
    };
    (loaded, cross)
}

/// SHA-256 of the document's canonical JSON form.
pub fn canonical_hash(document: &Document) -> String {
    let canonical = serde_json::to_vec(&serde_json::to_value(document).expect("documents serialize"))
        .expect("JSON values serialize");
    crate::sha256_hex(&canonical)
}

#[cfg(test)]
mod tests;
