//! The `bot` document (v1): an identity for a machine, with the roles that say what it may issue.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{Metadata, Name, vocabulary};

vocabulary! {
    /// `kind: bot`.
    BotKind { Bot = "bot" }
}

vocabulary! {
    /// The bot schema version.
    BotVersion { V1 = "v1" }
}

/// A bot: an identity for a machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Bot {
    pub kind: BotKind,
    pub version: BotVersion,
    pub metadata: Metadata,
    pub spec: BotSpec,
}

/// What the bot is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BotSpec {
    /// The roles the bot holds; they decide which workload identities it may issue.
    pub roles: Vec<Name>,
    /// Traits readable in templates as `user.traits.<name>`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub traits: Vec<Trait>,
}

/// A named list of values attached to a bot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Trait {
    pub name: String,
    pub values: Vec<String>,
}
