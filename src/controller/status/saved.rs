//! `controller/status.json`: each object's generation and conditions, made again only for the
//! objects whose status changed.

use std::collections::BTreeMap;

use super::{FILE, ObjectStatus};
use crate::resource::ObjectRef;
use crate::store::{Secrecy, Store, StoreError};

/// Each object's status as the status file last got it (a fingerprint), with its JSON: an edit of
/// one object of 10,000 serializes that one, not the whole table, and the file's text is all that
/// is kept of each.
#[derive(Default)]
pub struct SavedStatus {
    /// In the table's order.
    entries: Vec<(ObjectRef, (u64, String))>,
    /// The file holds what `entries` says (a failed write leaves this false: the next save writes).
    written: bool,
}

impl SavedStatus {
    /// Writes `text` (from [`StatusTable::status_file`]) to `controller/status.json`.
    pub fn write(&mut self, store: &Store, text: &str) -> Result<(), StoreError> {
        self.written = false;
        store.write(FILE, text.as_bytes(), Secrecy::Secret)?;
        self.written = true;
        Ok(())
    }

    /// The file's text for `objects` (a JSON array, one object per line, in the table's order), or
    /// `None` when it is what was written last.
    pub(super) fn render(&mut self, objects: &BTreeMap<ObjectRef, ObjectStatus>) -> Option<String> {
        // What the file holds of an object (not its text or document), with fixed seeds: a
        // fingerprint is compared with one made by an earlier render.
        let fingerprint = |o: &ObjectStatus| {
            use std::hash::{BuildHasher, Hash, Hasher};
            let mut h = foldhash::quality::FixedState::default().build_hasher();
            (&o.kind, &o.name, &o.path, &o.hash).hash(&mut h);
            (o.generation, o.observed_generation, &o.conditions).hash(&mut h);
            h.finish()
        };
        let mut changed = !self.written || self.entries.len() != objects.len();
        let mut length = 4;
        crate::controller::sorted::remake(&mut self.entries, objects, |_, o, kept| {
            let now = fingerprint(o);
            let entry = match kept {
                Some((was, json)) if was == now => (was, json),
                _ => {
                    changed = true;
                    (now, serde_json::to_string(o).expect("status serializes"))
                }
            };
            length += entry.1.len() + 2;
            entry
        });
        if !changed {
            return None;
        }
        let mut text = String::with_capacity(length);
        text.push('[');
        for (i, (_, (_, json))) in self.entries.iter().enumerate() {
            text.push_str(if i == 0 { "\n" } else { ",\n" });
            text.push_str(json);
        }
        text.push_str("\n]\n");
        Some(text)
    }
}
