//! Finding and reading document files: which names count, the Kubernetes ConfigMap layout, and
//! every way a file can fail to be read, each as one diagnostic for that file.

use std::fs;
use std::io::{ErrorKind, Read};
use std::path::{Path, PathBuf};

use super::diagnostic::{Diagnostic, Location};
use super::yaml::Pos;

/// The largest document file read.
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// Where documents come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// Every `*.yaml` / `*.yml` directly in the directory (not in subdirectories).
    Dir(PathBuf),
    /// One file, whatever its name.
    File(PathBuf),
}

impl Input {
    /// The same input from the root, as the watcher reports changed paths (it joins a relative
    /// path to the working directory): a relative input's changes then match it and take the fast
    /// path instead of listing everything. `..` stays, as it does in the watcher's paths.
    pub fn absolute(self) -> Input {
        let absolute = |path: PathBuf| std::path::absolute(&path).unwrap_or(path);
        match self {
            Input::Dir(dir) => Input::Dir(absolute(dir)),
            Input::File(file) => Input::File(absolute(file)),
        }
    }
}

/// Whether a directory entry's name is a document file: `*.yaml` or `*.yml`, not hidden (which also
/// skips a ConfigMap's `..data` and `..2026_…` entries) and not an editor's leftover.
pub fn is_document_name(name: &str) -> bool {
    let leftover = name.starts_with('.')
        || name.ends_with('~')
        || name.ends_with(".swp")
        || name.ends_with(".swx")
        || name.ends_with(".tmp")
        || (name.starts_with('#') && name.ends_with('#'));
    !leftover && (name.ends_with(".yaml") || name.ends_with(".yml"))
}

/// Lists the document files of the inputs, in order: each directory's files sorted by name.
/// A directory that cannot be listed is an error that ends the load (`Err`).
pub fn discover(inputs: &[Input]) -> Result<Vec<PathBuf>, Box<Diagnostic>> {
    Ok(listing(inputs)?.files.into_iter().map(|(_, path)| path).collect())
}

/// The document files of the inputs.
pub struct Listing {
    /// Each file with the index of the input it came from, sorted by (input, path).
    pub files: Vec<(usize, PathBuf)>,
    /// Whether any of them is a symlink: a change to its target is not an event on its name.
    pub links: bool,
}

/// [`discover`], with each file's input and whether any is a symlink (from the directory entries:
/// no `stat` per file).
pub fn listing(inputs: &[Input]) -> Result<Listing, Box<Diagnostic>> {
    let mut files = Vec::new();
    let mut links = false;
    for (i, input) in inputs.iter().enumerate() {
        match input {
            Input::File(path) => {
                links |= fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
                files.push((i, path.clone()));
            }
            Input::Dir(dir) => {
                let entries = fs::read_dir(dir).map_err(|e| {
                    let hint = match e.kind() {
                        ErrorKind::NotFound => "create it, or pass the right `--dir`",
                        ErrorKind::PermissionDenied => "run as a user that can read it, or fix its permissions",
                        _ => "check that it is a readable directory",
                    };
                    Box::new(
                        Diagnostic::error(Location::file(dir), format!("cannot read directory: {}", io_reason(&e)))
                            .hint(hint),
                    )
                })?;
                // Names that are not UTF-8 are judged by their lossy form and still read, so that
                // a document is never skipped silently.
                let mut paths: Vec<PathBuf> = entries
                    .filter_map(Result::ok)
                    .filter(|e| is_document_name(&e.file_name().to_string_lossy()))
                    .inspect(|e| links |= e.file_type().is_ok_and(|t| t.is_symlink()))
                    .map(|e| e.path())
                    .collect();
                paths.sort();
                files.extend(paths.into_iter().map(|p| (i, p)));
            }
        }
    }
    Ok(Listing { files, links })
}

/// Reads one document file as UTF-8 text, refusing what is not a readable regular file of at most
/// [`MAX_FILE_BYTES`].
pub fn read(path: &Path) -> Result<String, Box<Diagnostic>> {
    let file_error =
        |message: String, hint: &str| Box::new(Diagnostic::error(Location::file(path), message).hint(hint));
    let meta = fs::metadata(path).map_err(|e| match e.raw_os_error() {
        Some(40) => file_error(
            "symlink loop: the link never reaches a file".into(),
            "point the link at a real file, or remove it",
        ),
        _ if e.kind() == ErrorKind::NotFound && fs::symlink_metadata(path).is_ok() => {
            let target = fs::read_link(path).map(|t| t.display().to_string()).unwrap_or_default();
            file_error(
                format!("dangling symlink to `{target}`"),
                "point the link at a file that exists, or remove it",
            )
        }
        _ => file_error(
            format!("cannot read: {}", io_reason(&e)),
            "check that the file exists and is readable",
        ),
    })?;
    if meta.is_dir() {
        return Err(file_error(
            "is a directory, not a file".into(),
            "documents live in files directly in the directory: rename it so it does not end in .yaml",
        ));
    }
    if !meta.is_file() {
        return Err(file_error(
            "not a regular file (a pipe, socket or device)".into(),
            "only regular files are read; remove it or rename it",
        ));
    }
    let too_big = |size: u64| {
        file_error(
            format!("file is {size} bytes; the limit is {MAX_FILE_BYTES} (1 MiB)"),
            "split its documents into several files",
        )
    };
    if meta.len() > MAX_FILE_BYTES {
        return Err(too_big(meta.len()));
    }
    let mut bytes = Vec::new();
    fs::File::open(path)
        .and_then(|f| f.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes))
        .map_err(|e| {
            let hint = if e.kind() == ErrorKind::PermissionDenied {
                "make it readable by the user tbot runs as (for example `chmod 0644`)"
            } else {
                "check the file and the disk"
            };
            file_error(format!("cannot read: {}", io_reason(&e)), hint)
        })?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(too_big(bytes.len() as u64));
    }
    utf8(path, bytes)
}

/// A document file's bytes as text; invalid UTF-8 is a diagnostic at the first bad byte.
pub fn utf8(path: &Path, bytes: Vec<u8>) -> Result<String, Box<Diagnostic>> {
    String::from_utf8(bytes).map_err(|e| {
        let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        let text = std::str::from_utf8(valid).expect("valid up to here");
        // Positions count lines as YAML does (LF, CR LF, lone CR).
        let lines: Vec<&str> = super::yaml::source_lines(text).collect();
        let (line, column) = match lines.last() {
            Some(last) if !text.ends_with(['\n', '\r']) => (lines.len(), last.chars().count() + 1),
            _ => (lines.len() + 1, 1),
        };
        let (line, column) = (line as u32, column as u32);
        Box::new(
            Diagnostic::error(
                Location::at(path, Pos { line, column }),
                format!("invalid UTF-8 (byte 0x{:02x})", e.as_bytes()[valid.len()]),
            )
            .hint("save the file as UTF-8"),
        )
    })
}

/// The reason of an I/O error without Rust's "(os error N)" suffix.
fn io_reason(e: &std::io::Error) -> String {
    let text = e.to_string();
    match text.find(" (os error") {
        Some(i) => text[..i].to_lowercase(),
        None => text.to_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::is_document_name;

    #[test]
    fn only_yaml_files_that_are_not_leftovers_count() {
        for yes in ["bot.yaml", "a.yml", "10-token.yaml"] {
            assert!(is_document_name(yes), "{yes}");
        }
        for no in [
            ".bot.yaml",
            "bot.yaml~",
            ".bot.yaml.swp",
            "bot.yaml.tmp",
            "#bot.yaml#",
            "..data",
            "bot.json",
            "..2026_01_01_00_00_00.1",
        ] {
            assert!(!is_document_name(no), "{no}");
        }
    }
}
