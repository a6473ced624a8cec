//! Rendering diagnostics and summaries for people (with source snippets) and for tools (JSON).

use std::fmt::Write;

use crate::manifest::{Diagnostic, Loaded, Severity};
use crate::resource::Kind;

/// `path:line:col: error: message`, the source line with the spot underlined, the hint, and notes.
pub fn diagnostic(d: &Diagnostic) -> String {
    let mut out = String::new();
    let severity = match d.severity {
        Severity::Error => "error",
        Severity::Warning => "warning",
    };
    let _ = writeln!(out, "{}: {severity}: {}", d.location, d.message);
    if let (Some(line_text), Some(pos)) = (&d.snippet, d.location.pos) {
        let number = pos.line.to_string();
        let gutter = " ".repeat(number.len());
        let indent: String = line_text
            .chars()
            .take(pos.column.saturating_sub(1) as usize)
            .map(|c| if c == '\t' { '\t' } else { ' ' })
            .collect();
        let _ = writeln!(out, "{gutter} |");
        let _ = writeln!(out, "{number} | {line_text}");
        let _ = writeln!(out, "{gutter} | {indent}{}", "^".repeat(d.width));
    }
    if let Some(hint) = &d.hint {
        let _ = writeln!(out, "  = hint: {hint}");
    }
    for note in &d.notes {
        let _ = writeln!(out, "{}: note: {}", note.location, note.message);
    }
    out
}

fn kind_words(kind: Kind, n: usize) -> String {
    let (one, many) = match kind {
        Kind::AgentConfig => ("agent config", "agent configs"),
        Kind::Cluster => ("cluster", "clusters"),
        Kind::Issuer => ("issuer", "issuers"),
        Kind::SpiffeFederation => ("spiffe_federation", "spiffe_federations"),
        Kind::Revocation => ("revocation", "revocations"),
        Kind::Bot => ("bot", "bots"),
        Kind::Token => ("token", "tokens"),
        Kind::Role => ("role", "roles"),
        Kind::WorkloadIdentity => ("workload_identity", "workload_identities"),
    };
    format!("{n} {}", if n == 1 { one } else { many })
}

fn plural(n: usize, word: &str) -> String {
    format!("{n} {word}{}", if n == 1 { "" } else { "s" })
}

/// The closing line of `tbotctl validate`.
pub fn summary(loaded: &Loaded) -> String {
    let errors = loaded.diagnostics.iter().filter(|d| d.is_error()).count();
    let warnings = loaded.diagnostics.len() - errors;
    if errors > 0 {
        let files: std::collections::BTreeSet<_> = loaded
            .diagnostics
            .iter()
            .filter(|d| d.is_error())
            .map(|d| &d.location.path)
            .collect();
        return format!(
            "invalid: {}, {} in {}; nothing was changed",
            plural(errors, "error"),
            plural(warnings, "warning"),
            plural(files.len(), "file")
        );
    }
    let counts = loaded.state.counts();
    let total: usize = counts.iter().map(|(_, n)| n).sum();
    let parts: Vec<String> = counts.iter().map(|(k, n)| kind_words(*k, *n)).collect();
    let mut line = format!("ok: {} ({})", plural(total, "document"), parts.join(", "));
    if warnings > 0 {
        line.push_str(&format!(", {}", plural(warnings, "warning")));
    }
    line
}

/// The JSON report of `tbotctl validate -o json`.
pub fn json_report(loaded: &Loaded) -> serde_json::Value {
    let counts: serde_json::Map<String, serde_json::Value> = loaded
        .state
        .counts()
        .into_iter()
        .map(|(k, n)| (k.to_string(), n.into()))
        .collect();
    serde_json::json!({
        "valid": !loaded.has_errors(),
        "files": loaded.files,
        "documents": loaded.state.objects.len(),
        "counts": counts,
        "diagnostics": loaded.diagnostics,
    })
}
