//! The memory engine's keys: each entry found by the key it holds.

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::kv::Entry;

/// The keys, each found by the key its entry holds (a map keyed by a copy of it held every key
/// twice: a key or more per bot instance).
#[derive(Default)]
pub(super) struct Keys(BTreeSet<ByKey>);

/// An entry, ordered and found by its key.
struct ByKey(Arc<Entry>);

impl std::borrow::Borrow<str> for ByKey {
    fn borrow(&self) -> &str {
        &self.0.key
    }
}

impl PartialEq for ByKey {
    fn eq(&self, other: &Self) -> bool {
        self.0.key == other.0.key
    }
}

impl Eq for ByKey {}

impl PartialOrd for ByKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ByKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.key.cmp(&other.0.key)
    }
}

impl Keys {
    pub(super) fn get(&self, key: &str) -> Option<&Arc<Entry>> {
        self.0.get(key).map(|k| &k.0)
    }

    pub(super) fn contains_key(&self, key: &str) -> bool {
        self.0.contains(key)
    }

    /// Puts the entry under its key, in place of what was there.
    pub(super) fn insert(&mut self, entry: Arc<Entry>) {
        self.0.replace(ByKey(entry));
    }

    pub(super) fn remove(&mut self, key: &str) -> Option<Arc<Entry>> {
        self.0.take(key).map(|k| k.0)
    }

    pub(super) fn values(&self) -> impl Iterator<Item = &Arc<Entry>> {
        self.0.iter().map(|k| &k.0)
    }

    /// The entries whose keys start with `prefix`, in key order.
    pub(super) fn under<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = &'a Arc<Entry>> {
        use std::ops::Bound;
        self.0
            .range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(move |k| k.0.key.starts_with(prefix))
            .map(|k| &k.0)
    }
}
