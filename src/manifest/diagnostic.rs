//! Diagnostics: what is wrong (or doubtful) in the documents, where, and what to do about it.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::yaml::Pos;

/// How bad a diagnostic is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

/// A place in a file; `pos` is absent for problems with a whole file or directory.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Location {
    pub path: PathBuf,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub pos: Option<Pos>,
}

impl Location {
    pub fn file(path: &Path) -> Location {
        Location {
            path: path.to_owned(),
            pos: None,
        }
    }

    pub fn at(path: &Path, pos: Pos) -> Location {
        Location {
            path: path.to_owned(),
            pos: Some(pos),
        }
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.pos {
            Some(pos) => write!(f, "{}:{}:{}", self.path.display(), pos.line, pos.column),
            None => write!(f, "{}", self.path.display()),
        }
    }
}

impl Serialize for Pos {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("Pos", 2)?;
        st.serialize_field("line", &self.line)?;
        st.serialize_field("column", &self.column)?;
        st.end()
    }
}

/// Another place that a diagnostic involves ("first defined here").
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Note {
    pub location: Location,
    pub message: String,
}

/// One finding about the documents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    pub severity: Severity,
    pub location: Location,
    pub message: String,
    /// What to do about it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<Note>,
    /// The source line the location points into, for snippets.
    #[serde(skip)]
    pub snippet: Option<String>,
    /// How many characters to underline in the snippet.
    #[serde(skip)]
    pub width: usize,
}

impl Diagnostic {
    pub fn error(location: Location, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            severity: Severity::Error,
            location,
            message: message.into(),
            hint: None,
            notes: Vec::new(),
            snippet: None,
            width: 1,
        }
    }

    pub fn warning(location: Location, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            severity: Severity::Warning,
            ..Diagnostic::error(location, message)
        }
    }

    pub fn hint(mut self, hint: impl Into<String>) -> Diagnostic {
        self.hint = Some(hint.into());
        self
    }

    pub fn maybe_hint(mut self, hint: Option<String>) -> Diagnostic {
        self.hint = hint;
        self
    }

    pub fn note(mut self, location: Location, message: impl Into<String>) -> Diagnostic {
        self.notes.push(Note {
            location,
            message: message.into(),
        });
        self
    }

    /// Attaches the source line for the snippet, and the width to underline.
    pub fn with_source(mut self, text: &str, width: usize) -> Diagnostic {
        if let Some(pos) = self.location.pos {
            self.snippet = super::yaml::source_lines(text)
                .nth(pos.line.saturating_sub(1) as usize)
                .map(str::to_owned);
        }
        self.width = width.max(1);
        self
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}
