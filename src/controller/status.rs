//! Status per object: `generation` (moves when the canonical hash does), `observedGeneration` (the
//! generation last converged), and conditions `Ready` / `Reconciling` / `Stalled` / `Invalid` /
//! `RestartRequired` with reason, message and a transition time that moves only on a flip. Kept in
//! memory and in the storage directory (`controller/status.json`), never in the watched directory.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::manifest::DesiredState;
use crate::resource::ObjectRef;
use crate::store::{Secrecy, Store};

pub const FILE: &str = "controller/status.json";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Condition {
    #[serde(rename = "type")]
    pub kind: String,
    pub status: bool,
    pub reason: String,
    pub message: String,
    pub last_transition_time: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ObjectStatus {
    pub kind: String,
    pub name: String,
    pub path: String,
    pub hash: String,
    pub generation: u64,
    pub observed_generation: u64,
    pub conditions: Vec<Condition>,
    pub source: String,
    /// The applied document, as JSON.
    #[serde(default)]
    pub document_json: String,
}

impl ObjectStatus {
    fn new(r: &ObjectRef) -> ObjectStatus {
        ObjectStatus {
            kind: r.kind.as_str().to_owned(),
            name: r.name.clone(),
            path: String::new(),
            hash: String::new(),
            generation: 0,
            observed_generation: 0,
            conditions: Vec::new(),
            source: String::new(),
            document_json: String::new(),
        }
    }

    pub fn condition(&self, kind: &str) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.kind == kind)
    }

    pub fn is_ready(&self) -> bool {
        self.observed_generation == self.generation && self.condition("Ready").is_some_and(|c| c.status)
    }

    /// Sets a condition; its transition time moves only when its status flips.
    fn set(&mut self, kind: &str, status: bool, reason: &str, message: &str) {
        match self.conditions.iter_mut().find(|c| c.kind == kind) {
            Some(c) if c.status == status && c.reason == reason && c.message == message => {}
            Some(c) => {
                if c.status != status {
                    c.last_transition_time = now();
                }
                c.status = status;
                c.reason = reason.to_owned();
                c.message = message.to_owned();
            }
            None => self.conditions.push(Condition {
                kind: kind.to_owned(),
                status,
                reason: reason.to_owned(),
                message: message.to_owned(),
                last_transition_time: now(),
            }),
        }
    }
}

fn now() -> String {
    OffsetDateTime::now_utc().format(&Rfc3339).unwrap_or_default()
}

/// A file of the watched directory that fails to load, with its first error. Listed until the
/// file is fixed or removed, new files included (they have no object to carry `Invalid`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileError {
    pub path: String,
    /// `file:line:column` (or the file alone when the problem is with the whole file).
    pub location: String,
    pub message: String,
    /// How many errors the file has in all.
    pub errors: usize,
}

/// Every object's status.
#[derive(Debug, Clone, Default)]
pub struct StatusTable {
    pub objects: BTreeMap<ObjectRef, ObjectStatus>,
    /// The files that fail to load now, by path.
    pub file_errors: Vec<FileError>,
    /// What was last written to the store, so a reload that changed nothing writes nothing.
    saved: Arc<BTreeMap<ObjectRef, ObjectStatus>>,
}

impl StatusTable {
    /// Takes in what the documents now ask for: new objects start at generation 1, changed ones move
    /// on and are `Reconciling`, deleted ones go.
    pub fn observe(&mut self, desired: &DesiredState) {
        self.objects.retain(|r, _| desired.objects.contains_key(r));
        for (r, o) in &desired.objects {
            if !self.objects.contains_key(r) {
                self.objects.insert(r.clone(), ObjectStatus::new(r));
            }
            let status = self.objects.get_mut(r).expect("just inserted");
            // Only what changed is rebuilt: a reload of 10,000 objects after one edit touches one.
            if Path::new(&status.path) != o.location.path {
                status.path = o.location.path.display().to_string();
            }
            if status.source != o.source {
                status.source = o.source.clone();
            }
            if status.hash != o.hash {
                status.hash = o.hash.clone();
                status.generation += 1;
                status.document_json = serde_json::to_string(&o.document).unwrap_or_default();
            }
        }
        let pending: Vec<ObjectRef> = self
            .objects
            .iter()
            .filter(|(_, s)| s.observed_generation != s.generation)
            .map(|(r, _)| r.clone())
            .collect();
        for r in pending {
            self.set(
                &r,
                "Reconciling",
                true,
                "SpecChanged",
                "converging to the new generation",
            );
        }
    }

    /// Sets a condition; its transition time moves only when its status flips.
    pub fn set(&mut self, r: &ObjectRef, kind: &str, status: bool, reason: &str, message: &str) {
        if let Some(object) = self.objects.get_mut(r) {
            object.set(kind, status, reason, message);
        }
    }

    /// Every object but `failed` converged at its generation.
    pub fn converged_except(&mut self, failed: &std::collections::BTreeSet<ObjectRef>) {
        for (_, o) in self.objects.iter_mut().filter(|(r, _)| !failed.contains(*r)) {
            o.observed_generation = o.generation;
            o.set("Ready", true, "Converged", "running what the document asks for");
            o.set("Reconciling", false, "Converged", "");
            o.set("Stalled", false, "Converged", "");
        }
    }

    /// The objects of `path` keep their last good version: the file fails to load now.
    pub fn invalid(&mut self, path: &Path, message: &str) {
        let shown = path.display().to_string();
        let refs: Vec<ObjectRef> = self
            .objects
            .iter()
            .filter(|(_, s)| s.path == shown)
            .map(|(r, _)| r.clone())
            .collect();
        for r in refs {
            self.set(&r, "Invalid", true, "LoadFailed", message);
        }
    }

    /// Takes in which files fail to load now (the first error of each; diagnostics are in file
    /// order), and clears `Invalid` from objects whose file loads again.
    pub fn files_failing(&mut self, diagnostics: &[crate::manifest::Diagnostic]) {
        let mut files: Vec<FileError> = Vec::new();
        for d in diagnostics.iter().filter(|d| d.is_error()) {
            let path = d.location.path.display().to_string();
            match files.iter_mut().find(|f| f.path == path) {
                Some(file) => file.errors += 1,
                None => files.push(FileError {
                    path,
                    location: d.location.to_string(),
                    message: d.message.clone(),
                    errors: 1,
                }),
            }
        }
        self.file_errors = files;
        let loads_again: Vec<ObjectRef> = self
            .objects
            .iter()
            .filter(|(_, s)| s.condition("Invalid").is_some_and(|c| c.status))
            .filter(|(_, s)| !self.file_errors.iter().any(|f| f.path == s.path))
            .map(|(r, _)| r.clone())
            .collect();
        for r in loads_again {
            self.set(&r, "Invalid", false, "Loaded", "");
        }
    }

    pub fn restart_required(&mut self, r: &ObjectRef, field: &str) {
        self.set(
            r,
            "RestartRequired",
            true,
            "FieldNeedsRestart",
            &format!("`{field}` changed: restart tbot to apply it"),
        );
    }

    /// The table to write, when it changed since the last write (which it then counts as written).
    pub fn unsaved(&mut self) -> Option<Arc<BTreeMap<ObjectRef, ObjectStatus>>> {
        if self.objects == *self.saved {
            return None;
        }
        self.saved = Arc::new(self.objects.clone());
        Some(self.saved.clone())
    }

    /// The last write failed: the next one writes whatever the table holds.
    pub fn forget_saved(&mut self) {
        self.saved = Arc::default();
    }

    /// Writes a table taken with [`StatusTable::unsaved`].
    pub fn save_snapshot(store: &Store, snapshot: &BTreeMap<ObjectRef, ObjectStatus>) -> Result<(), String> {
        let list: Vec<&ObjectStatus> = snapshot.values().collect();
        store
            .write_json(FILE, &list, Secrecy::Secret)
            .map_err(|e| format!("cannot save the status: {e}; {}", e.hint()))
    }
}
