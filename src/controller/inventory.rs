//! The inventory: every applied object with its hash, file and text, written to the storage
//! directory (`controller/applied.json`, never the watched directory) after each convergence, so
//! `tbotctl diff` can compare against it when no daemon answers.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::manifest::{DesiredState, Location, Object};
use crate::resource::{Document, Kind, ObjectRef};
use crate::store::{Secrecy, Store, StoreError};

/// Where the inventory lives inside the storage directory.
pub const FILE: &str = "controller/applied.json";

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    kind: String,
    name: String,
    hash: String,
    path: PathBuf,
    source: String,
    document: Value,
}

/// Saves the applied state.
pub fn save(store: &Store, state: &DesiredState) -> Result<(), StoreError> {
    let entries: Vec<Entry> = state
        .objects
        .iter()
        .map(|(r, o)| Entry {
            kind: r.kind.as_str().to_owned(),
            name: r.name.clone(),
            hash: o.hash.clone(),
            path: o.location.path.clone(),
            source: o.source.clone(),
            document: serde_json::to_value(&o.document).expect("documents serialize"),
        })
        .collect();
    // It holds token documents, whose names may be secrets.
    store.write_json(FILE, &entries, Secrecy::Secret)
}

/// A document of `kind` from its JSON form.
pub fn decode(kind: Kind, value: Value) -> Result<Document, serde_json::Error> {
    Ok(match kind {
        Kind::AgentConfig => Document::AgentConfig(serde_json::from_value(value)?),
        Kind::Bot => Document::Bot(serde_json::from_value(value)?),
        Kind::Token => Document::Token(serde_json::from_value(value)?),
        Kind::Role => Document::Role(serde_json::from_value(value)?),
        Kind::WorkloadIdentity => Document::WorkloadIdentity(serde_json::from_value(value)?),
        Kind::Cluster => Document::Cluster(serde_json::from_value(value)?),
        Kind::Issuer => Document::Issuer(serde_json::from_value(value)?),
        Kind::SpiffeFederation => Document::SpiffeFederation(serde_json::from_value(value)?),
        Kind::Revocation => Document::Revocation(serde_json::from_value(value)?),
    })
}

/// Reads the inventory of a storage directory without taking its lock (a daemon may hold it).
/// `Ok(None)` when nothing was applied there yet.
pub fn read(storage: &Path) -> Result<Option<DesiredState>, String> {
    let path = storage.join(FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let entries: Vec<Entry> =
        serde_json::from_slice(&bytes).map_err(|e| format!("{} is damaged: {e}", path.display()))?;
    let mut state = DesiredState::default();
    for entry in entries {
        let kind = Kind::ALL
            .into_iter()
            .find(|k| k.as_str() == entry.kind)
            .ok_or_else(|| format!("{}: unknown kind `{}`", path.display(), entry.kind))?;
        let document = decode(kind, entry.document).map_err(|e| format!("{}: {e}", path.display()))?;
        state.objects.insert(
            ObjectRef::new(kind, entry.name),
            std::sync::Arc::new(Object::new(
                document,
                Location {
                    path: entry.path,
                    pos: None,
                },
                entry.hash,
                entry.source,
            )),
        );
    }
    Ok(Some(state))
}
