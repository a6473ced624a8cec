//! A reload after the watcher named the changed files, patched into the last load instead of
//! assembled again: when the edit changes nothing the cross-document checks read, their outcome
//! stands, and the new state is the last one with the edited objects swapped in. An edit of a
//! workload identity's SPIFFE ID, TTL, rules or templates, the common edit in a directory of
//! 10,000 identities, costs that file's parse and one copy of the state's map (for the caller), not
//! the checks and the sorted rebuild of 10,000 objects.
//!
//! Anything else falls back to a full assembly from the cached parses, with every check: a file
//! added or removed, a document of another kind, a name, label or attribute read changed
//! (`checks::same_to_checks`), documents reordered, a document that failed to load (now or
//! before), an edited object that was not the one in force (a duplicate), or a cross-document
//! diagnostic that points into a changed file (its line could move). The files read for a refused
//! patch stay in the cache, so the fallback does not parse them again.

use std::collections::{BTreeSet, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

use super::{DesiredState, Diagnostic, LoadCache, Loaded, ReadFile, checks, read_file};

/// What the last load assembled, kept for [`patch`].
pub(super) struct Assembled {
    pub state: DesiredState,
    pub diagnostics: Vec<Diagnostic>,
    pub files: usize,
    /// The files a cross-document diagnostic points into, by its location or one of its notes.
    pub cross: HashSet<PathBuf, foldhash::fast::RandomState>,
}

impl Assembled {
    pub fn loaded(&self) -> Loaded {
        Loaded {
            state: self.state.clone(),
            diagnostics: self.diagnostics.clone(),
            files: self.files,
            patched: true,
        }
    }
}

/// The paths the cross-document `diagnostics` point into.
pub(super) fn cross_paths(diagnostics: &[Diagnostic]) -> HashSet<PathBuf, foldhash::fast::RandomState> {
    diagnostics
        .iter()
        .flat_map(|d| std::iter::once(&d.location).chain(d.notes.iter().map(|n| &n.location)))
        .map(|l| l.path.clone())
        .collect()
}

/// The load after the document files `changed` (all still listed) were edited, when the edit can be
/// patched into the last load; `None` when it needs a full assembly (the files read meanwhile are
/// left in `cache.files`, for it).
pub(super) fn patch(cache: &mut LoadCache, changed: &BTreeSet<PathBuf>) -> Option<Loaded> {
    let last = cache.assembled.as_ref()?;
    let mut fresh: Vec<(&PathBuf, Arc<ReadFile>)> = Vec::with_capacity(changed.len());
    let mut refused = false;
    for path in changed {
        // Listed and read last time, and readable now (else: added, removed or failing).
        let (Some(old), Ok(new)) = (cache.files.get(path), read_file(path, cache)) else {
            refused = true;
            break;
        };
        let patchable = !last.cross.contains(path)
            && old.unloaded.is_empty()
            && new.unloaded.is_empty()
            && old.documents.len() == new.documents.len()
            && old.documents.iter().zip(new.documents.iter()).all(|(o, n)| {
                checks::same_to_checks(&o.object, &n.object)
                    // The old object is the one in force (not one shadowed by a duplicate).
                    && last
                        .state
                        .objects
                        .get(&o.object.document.object_ref())
                        .is_some_and(|current| Arc::ptr_eq(current, &o.object))
            });
        fresh.push((path, new));
        if !patchable {
            refused = true;
            break;
        }
    }
    if refused {
        // Read already: the full assembly takes these as they are.
        for (path, file) in fresh {
            cache.files.insert(path.clone(), file);
        }
        return None;
    }
    let last = cache.assembled.as_mut()?;
    let mut diagnostics_moved = false;
    for (path, file) in &fresh {
        let old = &cache.files[*path];
        for document in file.documents.iter() {
            let object = last
                .state
                .objects
                .get_mut(&document.object.document.object_ref())
                .expect("checked above: the same names, each in force");
            *object = document.object.clone();
        }
        diagnostics_moved |= !old.diagnostics.is_empty() || !file.diagnostics.is_empty();
    }
    if diagnostics_moved {
        // No cross-document diagnostic points into these files (checked above): what is there is
        // each file's own.
        last.diagnostics
            .retain(|d| !fresh.iter().any(|(path, _)| d.location.path == **path));
        for (_, file) in &fresh {
            last.diagnostics.extend(file.diagnostics.iter().cloned());
        }
        last.diagnostics.sort_by(|a, b| a.location.cmp(&b.location));
    }
    let loaded = last.loaded();
    for (path, file) in fresh {
        cache.files.insert(path.clone(), file);
    }
    Some(loaded)
}
