//! What the file watcher says changed, and how a reload uses it: the named document files are read
//! again and every other file is taken from the last load without being examined. Anything the
//! watcher cannot vouch for (a Kubernetes ConfigMap's `..data` swap, a path outside the inputs, a
//! path that cannot be examined, an overflow, and any event at all while a document is a symlink,
//! whose target can change without an event on its name) asks for a full rescan, which also runs on
//! a timer: a missed event costs latency, never correctness.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use super::files::{Input, is_document_name};

/// What changed since the last load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Changes {
    /// Unknown: list the inputs and examine every file.
    Everything,
    /// Only these paths (as the watcher reported them) changed.
    Paths(BTreeSet<PathBuf>),
}

impl Changes {
    /// Adds what one watcher event says.
    pub fn add(&mut self, other: Changes) {
        match (&mut *self, other) {
            (Changes::Everything, _) => {}
            (_, Changes::Everything) => *self = Changes::Everything,
            (Changes::Paths(mine), Changes::Paths(theirs)) => mine.extend(theirs),
        }
    }
}

/// What a changed path means for the documents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Relevance {
    /// A document file of input `n` (listed or not, present or gone).
    Document(usize),
    /// Not a document (an editor's temp file or swap file in a watched directory).
    Ignore,
    /// Cannot be judged from the path alone: list everything again.
    Rescan,
}

/// Judges one changed path against the inputs.
pub(super) fn classify(inputs: &[Input], path: &Path) -> Relevance {
    let Some(name) = path.file_name() else {
        return Relevance::Rescan;
    };
    let name = name.to_string_lossy();
    let mut found = None;
    for (i, input) in inputs.iter().enumerate() {
        let this = match input {
            Input::File(file) if file == path => Relevance::Document(i),
            Input::File(_) => continue,
            // A directory itself moved or removed, or (`..data`, `..2026_…`) a ConfigMap swapped
            // every file at once behind symlinks.
            Input::Dir(dir) if dir == path => Relevance::Rescan,
            Input::Dir(dir) if path.parent() == Some(dir.as_path()) => {
                if name.starts_with("..") {
                    Relevance::Rescan
                } else if is_document_name(&name) {
                    Relevance::Document(i)
                } else {
                    Relevance::Ignore
                }
            }
            Input::Dir(_) => continue,
        };
        if found.is_some() {
            // The same path through two inputs: let the full listing sort it out.
            return Relevance::Rescan;
        }
        found = Some(this);
    }
    // A path under no input as given (spelled differently, say `./x.yaml` for `x.yaml`).
    found.unwrap_or(Relevance::Rescan)
}

/// Updates `listing` (the document files of the inputs, each with its input's index, sorted by
/// (input, path)) for `changed`, in place: each document path that exists now is in it, each that
/// does not is out. Returns the document paths among `changed` (to read again, or to forget), or
/// `None` when something needs a full rescan (`listing` is then half-updated: list again).
pub(super) fn relist(
    inputs: &[Input],
    listing: &mut Vec<(usize, PathBuf)>,
    changed: &BTreeSet<PathBuf>,
) -> Option<BTreeSet<PathBuf>> {
    let mut reread = BTreeSet::new();
    for path in changed {
        let input = match classify(inputs, path) {
            Relevance::Ignore => continue,
            Relevance::Rescan => return None,
            Relevance::Document(input) => input,
        };
        let key = (input, path.clone());
        // A file given by name stays listed even when missing: reading it says why. Only "not
        // found" means gone: any other failure (permissions, I/O) is left to a full load, which
        // keeps the last good version of a file it cannot read. A new symlink needs a full load
        // too (its target's changes are not events on its name).
        let present = match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_symlink() => return None,
            Ok(_) => true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(_) => return None,
        } || matches!(inputs[input], Input::File(_));
        match (listing.binary_search(&key), present) {
            (Ok(_), true) => {}
            (Ok(at), false) => {
                listing.remove(at);
            }
            (Err(at), true) => listing.insert(at, key),
            (Err(_), false) => {}
        }
        reread.insert(path.clone());
    }
    Some(reread)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(dir: &Path) -> Vec<Input> {
        vec![Input::Dir(dir.to_owned()), Input::File(PathBuf::from("/etc/tbot.yaml"))]
    }

    #[test]
    fn paths_are_judged_by_input_and_name() {
        let dir = Path::new("/etc/tbot.d");
        let inputs = inputs(dir);
        assert_eq!(classify(&inputs, &dir.join("bot.yaml")), Relevance::Document(0));
        assert_eq!(classify(&inputs, Path::new("/etc/tbot.yaml")), Relevance::Document(1));
        for editor in [".bot.yaml.swp", "bot.yaml~", "4913", "bot.yaml.tmp"] {
            assert_eq!(classify(&inputs, &dir.join(editor)), Relevance::Ignore, "{editor}");
        }
        for rescan in ["..data", "..2026_12_05_08_00_00.1", "..data_tmp"] {
            assert_eq!(classify(&inputs, &dir.join(rescan)), Relevance::Rescan, "{rescan}");
        }
        assert_eq!(classify(&inputs, dir), Relevance::Rescan);
        assert_eq!(classify(&inputs, Path::new("./tbot.yaml")), Relevance::Rescan);
        assert_eq!(classify(&inputs, Path::new("/etc/other/x.yaml")), Relevance::Rescan);
        let twice = vec![Input::Dir(dir.to_owned()), Input::Dir(dir.to_owned())];
        assert_eq!(classify(&twice, &dir.join("bot.yaml")), Relevance::Rescan);
    }

    #[test]
    fn a_relative_input_made_absolute_matches_the_paths_the_watcher_reports() {
        // `tbot start --config-dir etc`: the directory spelled from the working directory.
        let dir = tempfile::tempdir().unwrap();
        let up: PathBuf = std::env::current_dir()
            .unwrap()
            .components()
            .skip(1)
            .map(|_| "..")
            .collect();
        let relative = up.join(dir.path().strip_prefix("/").unwrap());
        assert!(relative.is_relative());
        let inputs = [Input::Dir(relative).absolute()];
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let _watcher = crate::controller::watch::watch_inputs(&inputs, tx).unwrap();
        std::fs::write(dir.path().join("a.yaml"), "kind: role\n").unwrap();
        let Some(Changes::Paths(paths)) = rx.blocking_recv() else {
            panic!("the watcher names the file it saw change")
        };
        for path in &paths {
            assert_eq!(classify(&inputs, path), Relevance::Document(0), "{}", path.display());
        }
    }

    #[test]
    fn the_listing_gains_new_files_in_order_and_loses_removed_ones() {
        let dir = tempfile::tempdir().unwrap();
        let inputs = vec![Input::Dir(dir.path().to_owned())];
        for name in ["a.yaml", "c.yaml", "b.yaml"] {
            std::fs::write(dir.path().join(name), "x").unwrap();
        }
        let mut listing = vec![(0, dir.path().join("a.yaml")), (0, dir.path().join("c.yaml"))];
        std::fs::remove_file(dir.path().join("c.yaml")).unwrap();
        let changed: BTreeSet<PathBuf> = ["b.yaml", "c.yaml", ".b.yaml.swp"]
            .iter()
            .map(|n| dir.path().join(n))
            .collect();
        let reread = relist(&inputs, &mut listing, &changed).unwrap();
        assert_eq!(
            listing,
            vec![(0, dir.path().join("a.yaml")), (0, dir.path().join("b.yaml"))]
        );
        let touched = BTreeSet::from([dir.path().join("b.yaml"), dir.path().join("c.yaml")]);
        assert_eq!(reread, touched, "documents only, present or gone");
        let swap = BTreeSet::from([dir.path().join("..data")]);
        assert!(
            relist(&inputs, &mut listing.clone(), &swap).is_none(),
            "a ConfigMap swap lists again"
        );
        // A new symlink, and a path that cannot be examined (not "not found"), list again too.
        std::os::unix::fs::symlink("a.yaml", dir.path().join("link.yaml")).unwrap();
        let link = BTreeSet::from([dir.path().join("link.yaml")]);
        assert!(
            relist(&inputs, &mut listing.clone(), &link).is_none(),
            "a symlink lists again"
        );
        let long = BTreeSet::from([dir.path().join(format!("{}.yaml", "x".repeat(300)))]);
        assert!(
            relist(&inputs, &mut listing.clone(), &long).is_none(),
            "ENAMETOOLONG is not a removal"
        );
    }

    #[test]
    fn changes_gather_until_one_says_everything() {
        let mut changes = Changes::Paths(BTreeSet::new());
        changes.add(Changes::Paths(BTreeSet::from([PathBuf::from("/a.yaml")])));
        changes.add(Changes::Paths(BTreeSet::from([PathBuf::from("/b.yaml")])));
        assert_eq!(
            changes,
            Changes::Paths(BTreeSet::from([PathBuf::from("/a.yaml"), PathBuf::from("/b.yaml")]))
        );
        changes.add(Changes::Everything);
        changes.add(Changes::Paths(BTreeSet::new()));
        assert_eq!(changes, Changes::Everything);
    }
}
