//! The `role` document (v6 to v8): which workload identities a bot may issue.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{Metadata, Problem, vocabulary};

vocabulary! {
    /// `kind: role`.
    RoleKind { Role = "role" }
}

vocabulary! {
    /// The role schema versions; all three read the same way here.
    RoleVersion { V6 = "v6", V7 = "v7", V8 = "v8" }
}

vocabulary! {
    /// What a rule lets a bot do with a resource.
    Verb {
        Read = "read",
        List = "list",
        Create = "create",
        Update = "update",
        Delete = "delete",
        /// Every verb.
        All = "*",
    }
}

/// A role.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Role {
    pub kind: RoleKind,
    pub version: RoleVersion,
    pub metadata: Metadata,
    pub spec: RoleSpec,
}

/// What the role allows and denies; a deny wins over any allow.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RoleSpec {
    #[serde(default)]
    pub allow: RoleConditions,
    #[serde(default)]
    pub deny: RoleConditions,
}

/// Label matchers and resource rules.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RoleConditions {
    /// Workload identities whose labels match: every key must match one of its values; `'*': '*'`
    /// matches everything.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub workload_identity_labels: BTreeMap<String, LabelValues>,
    /// Resource rules; issuing needs `read` and `list` on `workload_identity`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<Rule>,
}

/// One label value or a list of them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum LabelValues {
    One(String),
    Many(Vec<String>),
}

/// Verbs granted on resources.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Resource kinds: `workload_identity` (or `*`).
    pub resources: Vec<String>,
    /// `read`, `list`, `create`, `update`, `delete` or `*`.
    pub verbs: Vec<Verb>,
}

impl Role {
    pub fn problems(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        for (side, conditions) in [("allow", &self.spec.allow), ("deny", &self.spec.deny)] {
            for (i, rule) in conditions.rules.iter().enumerate() {
                for (j, resource) in rule.resources.iter().enumerate() {
                    if resource != "workload_identity" && resource != "*" {
                        out.push(
                            Problem::warning(
                                format!("/spec/{side}/rules/{i}/resources/{j}"),
                                format!("tbot has no `{resource}` resource; this entry has no effect"),
                            )
                            .hint("tbot reads rules on `workload_identity` only"),
                        );
                    }
                }
            }
        }
        out
    }
}
