//! The inventory: every applied object with its hash, file and text, written to the storage
//! directory (`controller/applied.json`, never the watched directory) after each convergence, so
//! `tbotctl diff` can compare against it when no daemon answers.

use std::path::{Path, PathBuf};
use std::sync::Arc;

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
    save_with(store, state, &mut Entries::default())
}

/// Each object's entry as JSON from the last save, with the object it was made from: a save after
/// one edit of 10,000 objects serializes one (a reload keeps every unchanged object's `Arc`).
#[derive(Default)]
pub struct Entries(Vec<(ObjectRef, (Arc<Object>, String))>);

/// [`save`], serializing only the objects that are not the ones `cache` holds.
pub fn save_with(store: &Store, state: &DesiredState, cache: &mut Entries) -> Result<(), StoreError> {
    let mut length = 4;
    super::sorted::remake(&mut cache.0, &state.objects, |r, o, kept| {
        let entry = match kept {
            Some((was, json)) if Arc::ptr_eq(&was, o) => (was, json),
            _ => {
                let json = serde_json::to_string(&Entry {
                    kind: r.kind.as_str().to_owned(),
                    name: r.name.clone(),
                    hash: o.hash.clone(),
                    path: o.location.path.clone(),
                    source: o.source.clone(),
                    document: serde_json::to_value(&o.document).expect("documents serialize"),
                })
                .expect("entries serialize");
                (o.clone(), json)
            }
        };
        length += entry.1.len() + 2;
        entry
    });
    let mut out = String::with_capacity(length);
    out.push('[');
    for (i, (_, (_, json))) in cache.0.iter().enumerate() {
        out.push_str(if i == 0 { "\n" } else { ",\n" });
        out.push_str(json);
    }
    out.push_str("\n]\n");
    // It holds token documents, whose names may be secrets.
    store.write(FILE, out.as_bytes(), Secrecy::Secret)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{Input, LoadCache, load_with};

    #[test]
    fn a_save_after_an_edit_reuses_the_other_entries_and_reads_back_whole() {
        let etc = tempfile::tempdir().unwrap();
        let from = Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests/quickstart");
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), etc.path().join(entry.file_name())).unwrap();
        }
        let state_dir = tempfile::tempdir().unwrap();
        let store = Store::open(state_dir.path()).unwrap();
        let inputs = [Input::Dir(etc.path().to_owned())];
        let mut files = LoadCache::default();
        let first = load_with(&inputs, &mut files).unwrap().state;
        let mut entries = Entries::default();
        save_with(&store, &first, &mut entries).unwrap();
        let role = std::fs::read_to_string(etc.path().join("role.yaml")).unwrap();
        std::fs::write(etc.path().join("role.yaml"), format!("{role}\n# edited\n")).unwrap();
        let second = load_with(&inputs, &mut files).unwrap().state;
        let kept = second
            .objects
            .iter()
            .filter(|(r, o)| first.objects.get(*r).is_some_and(|was| Arc::ptr_eq(was, o)))
            .count();
        assert_eq!(
            kept,
            second.objects.len() - 1,
            "one object is new, the rest are the same"
        );
        save_with(&store, &second, &mut entries).unwrap();
        let read = read(state_dir.path()).unwrap().unwrap();
        assert_eq!(read.objects.len(), second.objects.len());
        for (r, o) in &second.objects {
            let back = &read.objects[r];
            assert_eq!(
                (&back.hash, &back.source, &back.document),
                (&o.hash, &o.source, &o.document),
                "{r}"
            );
        }
        assert!(read.objects.values().any(|o| o.source.contains("# edited")));
    }
}
