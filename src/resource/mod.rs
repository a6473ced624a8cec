//! Typed documents, one file per kind, with the object reference, durations and the template language.

pub mod agent;
pub mod bot;
pub mod cluster;
pub mod duration;
pub mod federation;
pub mod issuer;
mod meta;
pub mod revocation;
pub mod role;
pub mod spiffe_id;
pub mod template;
pub mod token;
pub mod workload_identity;

use std::fmt;

use serde::Serialize;

pub use duration::Duration;
pub use meta::{Metadata, Name, Timestamp};

/// Declares a closed string enum used for `kind`/`version`/`type` tags and other fixed vocabularies.
macro_rules! vocabulary {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $value:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
        pub enum $name {
            $($(#[$vdoc])* #[serde(rename = $value)] $variant),+
        }
        impl $name {
            /// The spelling used in documents.
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $value),+ }
            }
        }
        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}
pub(crate) use vocabulary;

/// Implements serde and schemars for a type written as one string: `parse` reads and checks it,
/// `Display` writes it back, and the schema names the `format` whose check is in [`FORMATS`].
macro_rules! string_form {
    ($ty:ident, $format:literal, $description:expr) => {
        impl serde::Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> serde::Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <String as serde::Deserialize>::deserialize(d)?;
                $ty::parse(&s).map_err(serde::de::Error::custom)
            }
        }
        impl schemars::JsonSchema for $ty {
            fn schema_name() -> std::borrow::Cow<'static, str> {
                stringify!($ty).into()
            }
            fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
                schemars::json_schema!({ "type": "string", "format": $format, "description": $description })
            }
        }
    };
}
pub(crate) use string_form;

vocabulary! {
    /// Every kind of document tbot reads. The agent config is the one document without a `kind` field.
    Kind {
        /// The host's agent config (`tbot.yaml`), recognised by having no `kind`.
        AgentConfig = "agent_config",
        Bot = "bot",
        Token = "token",
        Role = "role",
        WorkloadIdentity = "workload_identity",
        Cluster = "cluster",
        /// This host serves the issuer API to agents on other hosts.
        Issuer = "issuer",
        /// Trust another SPIFFE trust domain.
        SpiffeFederation = "spiffe_federation",
        /// Certificates the issuer's CRL lists (a leaked key).
        Revocation = "revocation",
    }
}

impl Kind {
    /// All kinds, in the order summaries list them.
    pub const ALL: [Kind; 9] = [
        Kind::AgentConfig,
        Kind::Cluster,
        Kind::Issuer,
        Kind::Bot,
        Kind::Token,
        Kind::Role,
        Kind::WorkloadIdentity,
        Kind::SpiffeFederation,
        Kind::Revocation,
    ];

    /// The kinds that carry a `kind` field, i.e. every kind but the agent config.
    pub fn named_kinds() -> impl Iterator<Item = Kind> {
        Self::ALL.into_iter().filter(|k| *k != Kind::AgentConfig)
    }

    /// Parses a `kind` value as written in a document.
    pub fn from_document(s: &str) -> Option<Kind> {
        Self::named_kinds().find(|k| k.as_str() == s)
    }

    /// The `version` values this kind accepts.
    pub fn versions(self) -> &'static [&'static str] {
        match self {
            Kind::AgentConfig => &["v2"],
            Kind::Bot
            | Kind::WorkloadIdentity
            | Kind::Cluster
            | Kind::Issuer
            | Kind::SpiffeFederation
            | Kind::Revocation => &["v1"],
            Kind::Token => &["v2"],
            Kind::Role => &["v6", "v7", "v8"],
        }
    }

    /// The JSON Schema of this kind's documents, generated from the types.
    pub fn schema(self) -> schemars::Schema {
        match self {
            Kind::AgentConfig => schemars::schema_for!(agent::AgentConfig),
            Kind::Bot => schemars::schema_for!(bot::Bot),
            Kind::Token => schemars::schema_for!(token::Token),
            Kind::Role => schemars::schema_for!(role::Role),
            Kind::WorkloadIdentity => schemars::schema_for!(workload_identity::WorkloadIdentity),
            Kind::Cluster => schemars::schema_for!(cluster::Cluster),
            Kind::Issuer => schemars::schema_for!(issuer::Issuer),
            Kind::SpiffeFederation => schemars::schema_for!(federation::SpiffeFederation),
            Kind::Revocation => schemars::schema_for!(revocation::Revocation),
        }
    }
}

/// What the documents of a directory make of this host (docs/architecture.md, "What runs").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostRole {
    /// Agent config and cluster documents, no `issuer`: the issuer runs in this process, nothing
    /// listens on the network.
    Single,
    /// An `issuer` document: this host serves the issuer API; `agent` when it also has an agent config.
    Issuer { agent: bool },
    /// Only an agent config: an agent of the remote issuer at `proxy_server`/`auth_server`.
    Agent,
}

impl HostRole {
    /// The role of a directory holding documents of these kinds.
    pub fn of(kinds: impl IntoIterator<Item = Kind>) -> HostRole {
        let (mut agent, mut issuer, mut cluster_side) = (false, false, false);
        for kind in kinds {
            match kind {
                Kind::AgentConfig => agent = true,
                Kind::Issuer => issuer = true,
                // Federations need an issuer of this host's own: alone, one never makes a host
                // its own CA (it is an error on an agent's host instead).
                Kind::SpiffeFederation => {}
                _ => cluster_side = true,
            }
        }
        match (issuer, agent, cluster_side) {
            (true, agent, _) => HostRole::Issuer { agent },
            (false, true, false) => HostRole::Agent,
            _ => HostRole::Single,
        }
    }
}

/// Identifies one object: its kind and its name (`bot/example-bot`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectRef {
    pub kind: Kind,
    pub name: String,
}

impl ObjectRef {
    /// The name given to the single agent config object, which has no `metadata.name`.
    pub const AGENT_CONFIG_NAME: &'static str = "agent";

    pub fn new(kind: Kind, name: impl Into<String>) -> Self {
        Self {
            kind,
            name: name.into(),
        }
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.kind, self.name)
    }
}

/// One decoded document of any kind.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Document {
    AgentConfig(agent::AgentConfig),
    Bot(bot::Bot),
    Token(token::Token),
    Role(role::Role),
    WorkloadIdentity(workload_identity::WorkloadIdentity),
    Cluster(cluster::Cluster),
    Issuer(issuer::Issuer),
    SpiffeFederation(federation::SpiffeFederation),
    Revocation(revocation::Revocation),
}

impl Document {
    pub fn kind(&self) -> Kind {
        match self {
            Document::AgentConfig(_) => Kind::AgentConfig,
            Document::Bot(_) => Kind::Bot,
            Document::Token(_) => Kind::Token,
            Document::Role(_) => Kind::Role,
            Document::WorkloadIdentity(_) => Kind::WorkloadIdentity,
            Document::Cluster(_) => Kind::Cluster,
            Document::Issuer(_) => Kind::Issuer,
            Document::SpiffeFederation(_) => Kind::SpiffeFederation,
            Document::Revocation(_) => Kind::Revocation,
        }
    }

    /// The object's name: `metadata.name`, or [`ObjectRef::AGENT_CONFIG_NAME`] for the agent config.
    pub fn name(&self) -> &str {
        match self {
            Document::AgentConfig(_) => ObjectRef::AGENT_CONFIG_NAME,
            Document::Bot(d) => &d.metadata.name,
            Document::Token(d) => &d.metadata.name,
            Document::Role(d) => &d.metadata.name,
            Document::WorkloadIdentity(d) => &d.metadata.name,
            Document::Cluster(d) => &d.metadata.name,
            Document::Issuer(d) => &d.metadata.name,
            Document::SpiffeFederation(d) => &d.metadata.name,
            Document::Revocation(d) => &d.metadata.name,
        }
    }

    pub fn object_ref(&self) -> ObjectRef {
        ObjectRef::new(self.kind(), self.name())
    }
}

/// A value check named by the schemas' `format` keyword, returning why a value fails.
pub type FormatCheck = fn(&str) -> Result<(), String>;

/// The `format`s the schemas use, with their checks. The loader validates them with the schema, so
/// every bad value in a document is reported at once, each with its own reason.
pub const FORMATS: [(&str, FormatCheck); 8] = [
    ("tbot-duration", |s| Duration::parse(s).map(drop)),
    ("tbot-template", |s| {
        template::Template::parse(s).map(drop).map_err(|e| e.to_string())
    }),
    ("tbot-attribute", |s| {
        template::Attribute::parse(s).map(drop).map_err(|e| e.to_string())
    }),
    ("tbot-listen", |s| agent::Listen::parse(s).map(drop)),
    ("tbot-file-mode", |s| agent::FileMode::parse(s).map(drop)),
    ("tbot-name", |s| Name::parse(s).map(drop)),
    ("tbot-timestamp", |s| Timestamp::parse(s).map(drop)),
    ("tbot-serial", |s| revocation::Serial::parse(s).map(drop)),
];

/// Edit distance, for "did you mean" hints.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The closest candidate to `word` when it is close enough to be a likely typo, else the one
/// candidate that holds `word` as whole `_`-separated parts (`prepare` for `prepare_before`).
pub fn closest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let candidates: Vec<&str> = candidates.into_iter().collect();
    let typo = candidates
        .iter()
        .map(|c| (edit_distance(word, c), *c))
        .filter(|(d, c)| *d > 0 && *d <= (c.len().max(word.len()) / 3).max(1))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c);
    typo.or_else(|| {
        if word.len() < 3 || word.contains('_') && word.split('_').any(str::is_empty) {
            return None;
        }
        let mut holding = candidates.iter().filter(|c| {
            **c != word
                && (c.starts_with(&format!("{word}_"))
                    || c.ends_with(&format!("_{word}"))
                    || c.contains(&format!("_{word}_")))
        });
        match (holding.next(), holding.next()) {
            (Some(only), None) => Some(*only),
            _ => None,
        }
    })
}

/// A problem with one document found after decoding, located by a JSON pointer into the document
/// (`/spec/renewal_interval`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub pointer: String,
    pub message: String,
    pub hint: Option<String>,
    /// A warning does not make the document invalid.
    pub warning: bool,
    /// Point at the mapping key at `pointer` rather than its value (unknown fields).
    pub on_key: bool,
}

impl Problem {
    pub fn error(pointer: impl Into<String>, message: impl Into<String>) -> Problem {
        Problem {
            pointer: pointer.into(),
            message: message.into(),
            hint: None,
            warning: false,
            on_key: false,
        }
    }

    pub fn warning(pointer: impl Into<String>, message: impl Into<String>) -> Problem {
        Problem {
            warning: true,
            ..Problem::error(pointer, message)
        }
    }

    pub fn hint(mut self, hint: impl Into<String>) -> Problem {
        self.hint = Some(hint.into());
        self
    }
}
