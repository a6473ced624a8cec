//! The `metadata` block every document but the agent config carries, and the small types it uses.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Deref;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::string_form;

/// Common metadata: the object's name, labels and an optional expiry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    /// The object's name, unique within its kind.
    pub name: Name,
    /// Free-form description for humans.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Labels: string keys and values, matched by role `workload_identity_labels` and service label selectors.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// When the object stops being valid, in RFC 3339 (`2026-12-31T00:00:00Z`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<Timestamp>,
}

/// An object name: 1 to 253 characters, no whitespace, no `/`, no control characters.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Name(String);

string_form!(
    Name,
    "tbot-name",
    "An object name: 1 to 253 bytes, no whitespace and no `/`."
);

impl Name {
    pub fn parse(s: &str) -> Result<Name, String> {
        if s.is_empty() {
            return Err("a name must not be empty".into());
        }
        if s.len() > 253 {
            return Err(format!("a name is at most 253 bytes; this one is {}", s.len()));
        }
        if let Some(c) = s.chars().find(|c| c.is_whitespace() || c.is_control() || *c == '/') {
            return Err(format!("a name must not contain {c:?}"));
        }
        Ok(Name(s.to_owned()))
    }
}

impl Deref for Name {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A point in time, written in RFC 3339.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timestamp(pub OffsetDateTime);

string_form!(
    Timestamp,
    "tbot-timestamp",
    "An RFC 3339 timestamp, for example `2026-12-31T23:59:59Z`."
);

impl Timestamp {
    pub fn parse(s: &str) -> Result<Timestamp, String> {
        OffsetDateTime::parse(s, &Rfc3339)
            .map(Timestamp)
            .map_err(|e| format!("`{s}` is not an RFC 3339 timestamp ({e}); write it like `2026-12-31T23:59:59Z`"))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = self.0.format(&Rfc3339).map_err(|_| fmt::Error)?;
        f.write_str(&text)
    }
}
